"""Weighted mixtures (data.sources): shares, exact resume and data-parallel resharding, per-source passes,
and the refusals, against naive references written here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ep_train.config import DataSource, load_config, parse_overrides
from ep_train.data.loader import DistributedBatches, TokenWindows
from ep_train.data.mixture import BLOCK, Blend, Interleave
from tests.conftest import CORPUS

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny.yaml"


def naive_greedy(weights: list[float], n: int) -> list[int]:
    """Megatron's blending rule, one sample at a time: the source whose share lags its weight most."""
    w = [x / sum(weights) for x in weights]
    counts = [0] * len(w)
    out = []
    for i in range(n):
        k = max(range(len(w)), key=lambda j: (w[j] * (i + 1) - counts[j], -j))
        counts[k] += 1
        out.append(k)
    return out


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.25, 0.25], [3.0, 0.0, 1.0], [0.91, 0.09]])
def test_interleave_shares_order_and_counts(weights) -> None:
    mix = Interleave(weights)
    w = np.asarray(weights) / sum(weights)
    n = 2000
    assert [mix.locate(s)[0] for s in range(n)] == naive_greedy(weights, n)
    # any 2,000 consecutive samples, also far into a run and across a block boundary: within 2% of the weights
    for start in (0, BLOCK - 700, 10**7 + 123):
        got = np.bincount([mix.locate(s)[0] for s in range(start, start + n)], minlength=len(w)) / n
        assert np.abs(got - w).max() <= 0.02, (start, got, w)
    # each source's samples are its stream 0, 1, 2, ... in order, and counts() agrees with a brute-force count
    total = 3 * BLOCK + 517
    located = [mix.locate(s) for s in range(total)]
    for k in range(len(w)):
        assert [j for kk, j in located if kk == k] == list(range(sum(1 for kk, _ in located if kk == k)))
    for consumed in (0, 1, 999, BLOCK, total):
        assert mix.counts(consumed).tolist() == np.bincount([k for k, _ in located[:consumed]],
                                                            minlength=len(w)).tolist()
    assert mix.counts(total)[np.asarray(weights) == 0].sum() == 0  # weight 0: never read


def test_one_source_reads_what_data_dir_reads(built) -> None:
    """A one-source mixture keeps the stream of a data_dir run: permutation rng([seed, epoch]) per epoch."""
    w = TokenWindows(built, "train", 32)
    b = DistributedBatches(w, 1, 1, 0, 1, seed=7)
    n = w.num_windows
    for s in (0, 1, n - 1, n, 2 * n + 5):
        epoch, pos = divmod(s, n)
        assert b.sample_window(s) == int(np.random.default_rng([7, epoch]).permutation(n)[pos])


def test_blend_reads_each_source_in_shuffled_passes(built, built_small) -> None:
    big, small = TokenWindows(built, "train", 256), TokenWindows(built_small, "train", 256)
    blend = Blend([big, small], [0.6, 0.4], seed=3, names=["big", "small"])
    n = 4 * small.num_windows  # the small source wraps around (about 1.6 passes), the big one does not
    seen: dict[int, list[int]] = {0: [], 1: []}
    for s in range(n):
        k, i = blend.locate(s)
        assert np.array_equal(blend.sample(s), (big, small)[k].window(i))
        seen[k].append(i)
    first_pass = seen[1][:small.num_windows]
    assert sorted(first_pass) == list(range(small.num_windows)) and first_pass != sorted(first_pass)
    assert len(set(seen[0])) == len(seen[0])  # within a pass, never twice
    counts = blend.samples_per_source(n)
    assert counts == [len(seen[0]), len(seen[1])]
    assert blend.epochs(n) == [1, -(-counts[1] // small.num_windows)] and blend.epochs(n)[1] >= 2
    assert blend.epochs(0) == [0, 0]


def test_mixture_resumes_exactly_and_reshards(built, built_small) -> None:
    def blend() -> Blend:
        return Blend([TokenWindows(built, "train", 32), TokenWindows(built_small, "train", 32)], [0.7, 0.3], seed=5)

    g = 8
    straight = DistributedBatches(blend(), g, 2, 0, 1, seed=5)
    steps = [np.concatenate([x.numpy() for x, _ in straight.next()]) for _ in range(6)]
    resumed = DistributedBatches(blend(), g, 2, 0, 1, seed=5, consumed_samples=3 * g)
    for step in range(3, 6):
        assert np.array_equal(np.concatenate([x.numpy() for x, _ in resumed.next()]), steps[step])
    ranks = [DistributedBatches(blend(), g, 2, r, 2, seed=5) for r in range(2)]  # data-parallel 2
    for step in range(6):
        both = np.concatenate([np.concatenate([x.numpy() for x, _ in b.next()]) for b in ranks])
        assert np.array_equal(both, steps[step])  # rank r reads the r-th half of the same global batch


def _cfg(*extra: str):  # type: ignore[no-untyped-def]
    return load_config(CONFIG, parse_overrides(list(extra)))


def test_sources_from_yaml_and_from_the_flat_form(built, built_small, tmp_path) -> None:
    flat = _cfg("--data_sources", f"0.7 {built} 0.3 {built_small}")
    assert flat.data.sources == [DataSource(str(built), 0.7), DataSource(str(built_small), 0.3)]
    import yaml

    data = yaml.safe_load(CONFIG.read_text())
    data.setdefault("data", {})["sources"] = [{"path": str(built), "weight": 0.7, "name": "web"},
                                              {"path": str(built_small), "weight": 0.3}]
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    assert [(s.label, s.weight) for s in cfg.data.sources] == [("web", 0.7), (built_small.name, 0.3)]


def test_bad_mixtures_are_refused_with_the_field_and_fix(built, built_small, tokenizer, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"data.sources\[1\].weight = -0.3 is invalid .*>= 0"):
        _cfg("--data_sources", f"0.7 {built} -0.3 {built_small}")
    with pytest.raises(ValueError, match=r"weights are all zero"):
        _cfg("--data_sources", f"0 {built} 0 {built_small}")
    with pytest.raises(ValueError, match=r"data.sources\[1\].path = '.*nowhere' is invalid: no such folder"):
        _cfg("--data_sources", f"0.7 {built} 0.3 {tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match=r"data.data_dir = .* is set together with data.sources"):
        _cfg("--data_dir", str(built), "--data_sources", f"1 {built_small}")
    with pytest.raises(ValueError, match=r"'0.7 a 0.3' is invalid: expected pairs"):
        _cfg("--data_sources", "0.7 a 0.3")
    with pytest.raises(ValueError, match=r"data.sources\[1\].weight = 1e-05 is invalid .* gets no sample in 4,096"):
        _cfg("--data_sources", f"1 {built} 0.00001 {built_small}")
    with pytest.raises(ValueError, match=r"used twice"):
        _cfg("--data_sources", f"0.5 {built} 0.5 {built}")
    # a source built with another tokenizer: ids would mean other pieces
    from ep_train.data.prep import build
    from ep_train.data.tokenizer import train_tokenizer

    tok2 = train_tokenizer([str(CORPUS[-2])], 600, str(tmp_path / "other"))
    other = tmp_path / "other_shards"
    build([str(CORPUS[-1])], str(tok2), str(other), workers=1, val_fraction=0.0, progress=False)
    with pytest.raises(ValueError, match=r"data.sources\[1\] .* was built with tokenizer .* Rebuild every source"):
        _cfg("--data_sources", f"0.7 {built} 0.3 {other}")
    # a source too small for one window and a positive weight: named at start
    with pytest.raises(ValueError, match=r"data source 'b' holds .* tokens: not one window"):
        Blend([TokenWindows(built, "train", 32), TokenWindows(built_small, "train", 10**6)], [0.5, 0.5], seed=0,
              names=["a", "b"])
    assert json.loads((built / "manifest.json").read_text())["splits"]  # nothing was touched
    shutil.rmtree(other)


def test_data_fingerprint_changes_when_a_source_is_rebuilt(tokenizer, tmp_path) -> None:
    """What a resume compares: the same shards give the same fingerprint; a rebuild of the folder with
    other input gives another (windows and shard digest), so the resume says the order does not continue."""
    from ep_train.data.mixture import data_fingerprint
    from ep_train.data.prep import build

    (tmp_path / "a.txt").write_text("alpha = 1\n" * 300)
    (tmp_path / "b.txt").write_text("beta = 2\n" * 300)
    out = tmp_path / "data"
    build([str(tmp_path / "a.txt")], str(tokenizer), str(out), progress=False)
    src = [DataSource(str(out), 1.0)]
    first = data_fingerprint(src, [TokenWindows(out, "train", 16).num_windows])
    assert first == data_fingerprint(src, [TokenWindows(out, "train", 16).num_windows])
    build([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], str(tokenizer), str(out), overwrite=True,
          progress=False)
    again = data_fingerprint(src, [TokenWindows(out, "train", 16).num_windows])
    key = str(out.resolve())
    assert again[key]["windows"] > first[key]["windows"]
    assert again[key]["shards_sha256"] != first[key]["shards_sha256"]
