"""Weighted mixtures of shard folders (``data.sources``), positioned by one integer like a single folder.

Global sample ``s`` of the run (the index across all data-parallel ranks, as in ``loader.py``) is taken
from source ``pattern[s % B]``, a fixed interleaving of ``B = BLOCK`` samples built once from the weights
by the greedy rule Megatron's blended dataset uses: sample ``i`` goes to the source whose share so far
lags its weight the most (``argmax_k w_k (i + 1) - count_k``). Within one block every source's count is
within about one sample of ``w_k B``, so over any span the shares are exact to about ``1 / B`` plus one block.
Sample ``s`` is then that source's ``j``-th sample, ``j = (s // B) count_k + (its rank inside the block)``,
which is O(1) to compute: no table grows with the run, and a run resumed at ``consumed_samples`` or at
another data-parallel size reads the same samples (the position is a function of ``s`` alone).

Each source is read in epochs, without replacement inside one: its ``j``-th sample is window
``perm(seed, k, e)[j % n_k]`` with ``e = j // n_k``, a fresh permutation per epoch. A source whose weight
asks for more samples than it holds therefore wraps around (is repeated, reshuffled) and the trainer logs
when that happens; a small weight leaves part of a large source unseen. Source 0 uses the permutations of
a single ``data_dir`` run, so a one-source mixture reads exactly what ``data_dir`` reads.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ep_train.data.verify import load_manifest

if TYPE_CHECKING:
    from ep_train.config import DataSource
    from ep_train.data.loader import TokenWindows

BLOCK = 4096  # samples per interleaving period: shares exact to ~1/4096, any weights


def check_weights(sources: list[DataSource], where: str = "data.sources") -> None:
    for i, s in enumerate(sources):
        if not math.isfinite(s.weight) or s.weight < 0:
            raise ValueError(f"{where}[{i}].weight = {s.weight!r} is invalid ({s.path}): weights must be finite "
                             "and >= 0 (they are normalised to sum to 1)")
    if not sum(s.weight for s in sources) > 0:
        raise ValueError(f"{where} weights are all zero ({[s.weight for s in sources]}): give at least one "
                         "source a positive weight")
    per_block = Interleave([s.weight for s in sources]).per_block
    for i, s in enumerate(sources):
        if s.weight > 0 and per_block[i] == 0:
            total = sum(x.weight for x in sources)
            raise ValueError(f"{where}[{i}].weight = {s.weight!r} is invalid ({s.path}): its share "
                             f"{s.weight / total:.2e} gets no sample in {BLOCK:,}, so the source would never be "
                             "read; raise it, or set 0 to leave the source out")
    names = [s.label for s in sources]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{where}: the name(s) {dup} are used twice (a source is named after its folder unless "
                         "it has one); give each source a distinct `name:`")


def mixture_key(sources: list[DataSource]) -> list[tuple[Path, float]]:
    """What decides which sample comes from where: each folder (resolved) and its normalised weight."""
    total = sum(s.weight for s in sources)
    return [(Path(s.path).resolve(), s.weight / total) for s in sources]


def data_fingerprint(sources: list[DataSource], windows: list[int]) -> dict[str, dict[str, Any]]:
    """Per source (resolved folder): its training windows and a digest of its train shards (names, sizes,
    checksums, from the manifest): what the data position of a checkpoint indexes into."""
    out = {}
    for s, n in zip(sources, windows):
        shards = load_manifest(s.path)["splits"]["train"]["shards"]
        key = [(x["prefix"], x.get("bin_sha256"), x["tokens"]) for x in shards]
        out[str(Path(s.path).resolve())] = {"windows": n, "shards_sha256": hashlib.sha256(
            json.dumps(key).encode()).hexdigest()}
    return out


def check_same_tokenizer(sources: list[DataSource]) -> None:
    """Every source must be built with one tokenizer (sha256, vocabulary): ids mean the same in every shard."""
    ref = None
    for i, s in enumerate(sources):
        m = load_manifest(s.path)  # a ValueError naming the file when it is not a valid manifest
        tok = m.get("tokenizer", {})
        mine = (tok.get("sha256"), tok.get("vocab_size"))
        if ref is None:
            ref = (s, mine, tok.get("path"))
        elif mine != ref[1]:
            raise ValueError(
                f"data.sources[{i}] ({s.path}) was built with tokenizer {tok.get('path')} (sha256 "
                f"{str(mine[0])[:12]}..., vocab {mine[1]}) but data.sources[0] ({ref[0].path}) with {ref[2]} "
                f"(sha256 {str(ref[1][0])[:12]}..., vocab {ref[1][1]}): token ids differ between them. Rebuild "
                "every source with one tokenizer (data_prep_tool build --tokenizer SAME.model)")


class Interleave:
    """Global sample -> (source, that source's sample ordinal); the per-source counts of any prefix."""

    def __init__(self, weights: list[float], block: int = BLOCK) -> None:
        w = np.asarray(weights, dtype=np.float64)
        assert w.ndim == 1 and len(w) > 0 and (w >= 0).all() and w.sum() > 0, weights
        w = w / w.sum()
        self.block = block
        self.pattern = np.empty(block, dtype=np.int64)
        self.ordinal = np.empty(block, dtype=np.int64)  # rank of sample i among its source's in the block
        counts = np.zeros(len(w), dtype=np.int64)
        # prefix[i, k]: samples of source k among the block's first i (for counts of any consumed prefix)
        self.prefix = np.zeros((block + 1, len(w)), dtype=np.int64)
        for i in range(block):
            k = int(np.argmax(w * (i + 1) - counts))  # ties go to the lower index: deterministic
            self.pattern[i], self.ordinal[i] = k, counts[k]
            counts[k] += 1
            self.prefix[i + 1] = counts
        self.per_block = counts

    def locate(self, s: int) -> tuple[int, int]:
        b, i = divmod(s, self.block)
        k = int(self.pattern[i])
        return k, b * int(self.per_block[k]) + int(self.ordinal[i])

    def counts(self, consumed: int) -> np.ndarray:
        """Samples taken from each source by global samples [0, consumed)."""
        b, i = divmod(consumed, self.block)
        return b * self.per_block + self.prefix[i]


class Blend:
    """Samples of a weighted mixture of ``TokenWindows`` (one per source), by global sample index."""

    def __init__(self, windows: list[TokenWindows], weights: list[float], seed: int, shuffle: bool = True,
                 names: list[str] | None = None) -> None:
        assert len(windows) == len(weights) > 0
        self.windows, self.seed, self.shuffle = windows, seed, shuffle
        self.names = names or [str(i) for i in range(len(windows))]
        self.mix = Interleave(weights)
        self.seq_len = windows[0].seq_len
        for name, w, wt in zip(self.names, windows, weights):
            if w.num_windows == 0 and wt > 0:
                raise ValueError(f"data source {name!r} holds {w.total_tokens} tokens: not one window of seq_len + 1 "
                                 f"({w.seq_len + 1}); give it more text, weight 0, or a shorter seq_len")
        self._perm: dict[int, tuple[int, np.ndarray]] = {}

    @classmethod
    def single(cls, windows: TokenWindows, seed: int, shuffle: bool = True) -> Blend:
        return cls([windows], [1.0], seed, shuffle)

    def locate(self, s: int) -> tuple[int, int]:
        """Global sample ``s`` -> (source, window index inside that source)."""
        k, j = self.mix.locate(s)
        n = self.windows[k].num_windows
        epoch, pos = divmod(j, n)
        if not self.shuffle:
            return k, pos
        cached = self._perm.get(k)
        if cached is None or cached[0] != epoch:
            # Source 0 keeps a single data_dir run's stream ([seed, epoch]); the others get their own.
            key = [self.seed, epoch] if k == 0 else [self.seed, epoch, k]
            cached = (epoch, np.random.default_rng(key).permutation(n))
            self._perm[k] = cached
        return k, int(cached[1][pos])

    def sample(self, s: int) -> np.ndarray:
        k, i = self.locate(s)
        return self.windows[k].window(i)

    def samples_per_source(self, consumed: int) -> list[int]:
        return [int(c) for c in self.mix.counts(consumed)]

    def epochs(self, consumed: int) -> list[int]:
        """Per source, how many times it has been started (1 = first pass; 0 = not read yet)."""
        return [-(-c // w.num_windows) if w.num_windows else 0
                for c, w in zip(self.samples_per_source(consumed), self.windows)]
