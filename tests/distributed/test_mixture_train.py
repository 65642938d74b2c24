"""`ep-train train` on a weighted mixture of three shard folders at world 2, EP 2, ZeRO-3 + CPU offload:
losses equal the single-process reference reading the same mixture, per-source tokens and validation
losses are logged, a source that runs out wraps around with a log line, and a stop + resume continues the
unbroken run exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ep_train.config import load_config, parse_overrides
from ep_train.data.loader import TokenWindows
from ep_train.data.mixture import Blend
from tests.conftest import STDLIB
from tests.distributed.reference_train import reference_losses
from tests.distributed.test_trainer import COMMON, CONFIG, losses, train

STEPS = 8
SEQ = 64


@pytest.fixture(scope="module")
def tiny_source(tokenizer, tmp_path_factory) -> Path:
    """A source of about ten windows (at seq_len 64), no validation split: it must wrap around within the run."""
    from ep_train.data.prep import build

    out = tmp_path_factory.mktemp("shards_tiny")
    build([str(STDLIB / "this.py")], str(tokenizer), str(out), workers=1, val_fraction=0.0, progress=False)
    return out


def _mix(built: Path, built_small: Path, tiny: Path) -> list[str]:
    # tests.distributed.test_trainer.launch passes --data_dir; the mixture replaces it (data_dir "" = unset)
    return ["--data_sources", f"0.6 {built} 0.15 {built_small} 0.25 {tiny}", "--data_dir", "",
            "--seq_len", str(SEQ), "--max_steps", str(STEPS), "--eval_interval", str(STEPS), "--eval_batches", "1"]


@pytest.fixture(scope="module")
def mixed_run(built, built_small, tiny_source, tmp_path_factory) -> tuple[Path, str, list[str]]:
    args = _mix(built, built_small, tiny_source)
    run = tmp_path_factory.mktemp("mix") / "run"
    out = train(run, built, 2, "--ep_size", "2", *args, "--save_interval", str(STEPS // 2))
    return run, out, args


def test_mixture_trains_like_the_reference_and_logs_per_source(mixed_run, built, built_small, tiny_source) -> None:
    run, out, args = mixed_run
    cfg = load_config(CONFIG, parse_overrides([*COMMON, *args]))  # what launch() passes
    ref = reference_losses(cfg, STEPS)
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - ref[s - 1]) / abs(ref[s - 1]) for s in got) < 1e-4, (got, ref)

    names = [built.name, built_small.name, tiny_source.name]
    blend = Blend([TokenWindows(p, "train", SEQ) for p in (built, built_small, tiny_source)], [0.6, 0.15, 0.25], 0)
    want = blend.samples_per_source(STEPS * cfg.train.batch_size)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in recs if r.get("step") == STEPS and "loss" in r][0]
    assert last["tokens_by_source"] == {n: c * SEQ for n, c in zip(names, want)}
    assert sum(last["tokens_by_source"].values()) == last["tokens"]
    val = [r for r in recs if "val_loss" in r][-1]
    assert set(val["val_loss_by_source"]) == set(names[:2])  # the tiny source has no validation split
    w = {names[0]: 0.6, names[1]: 0.15}
    expect = sum(val["val_loss_by_source"][k] * w[k] for k in w) / sum(w.values())
    assert abs(val["val_loss"] - expect) < 1e-9
    passes = blend.epochs(STEPS * cfg.train.batch_size)
    assert passes[2] >= 2 and passes[0] == 1  # the set-up really makes the tiny source wrap
    assert f"data: source {names[2]!r} wrapped around" in out and f"data: source {names[0]!r} wrapped" not in out
    assert f"data: source {names[2]!r} ({tiny_source}): weight 0.250" in out


def test_mixture_resume_continues_exactly(mixed_run, built, tmp_path) -> None:
    """Resumed from the unbroken run's step-4 checkpoint in a new run folder: steps 5-8 are bit-identical."""
    run, _, args = mixed_run
    step4 = run / "checkpoints" / f"step_{STEPS // 2:08d}"
    assert step4.is_dir()
    split = tmp_path / "split"
    out = train(split, built, 2, "--ep_size", "2", *args, "--resume", str(step4))
    assert f"resumed from {step4}" in out and "data sources or weights differ" not in out
    assert "changed since the checkpoint" not in out  # the same folders, untouched: no data warning
    assert set(json.loads((step4 / "ep_train_state.json").read_text())["data"]) == {
        str(Path(p).resolve()) for p in args[1].split()[1::2]}  # every source's fingerprint was saved
    a, b = losses(run), losses(split)
    assert sorted(b) == list(range(STEPS // 2 + 1, STEPS + 1))
    assert [b[s] for s in sorted(b)] == [a[s] for s in sorted(b)]
    # the same checkpoint resumed with other weights: allowed (a curriculum), and said
    other = tmp_path / "reweighted"
    args2 = [a if not a.startswith("0.6 ") else a.replace("0.6 ", "0.5 ", 1) for a in args]
    out = train(other, built, 2, "--ep_size", "2", *args2, "--resume", str(step4), "--max_steps", str(STEPS // 2 + 1))
    assert "data sources or weights differ from the checkpoint's" in out
