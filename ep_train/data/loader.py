"""Rank-sharded, exactly resumable reader of ``data_prep_tool build`` output.

The split's shards form one token stream, cut into windows of ``seq_len + 1`` tokens (stride
``seq_len``: inputs are window[:-1], targets window[1:]). Sample ``s`` of the run is window
``perm_e[s % W]`` with ``e = s // W`` and ``perm_e`` a permutation seeded by (seed, e). A global batch
is samples [consumed, consumed + G); data-parallel rank r reads its contiguous 1/dp of it. So the
position is one integer (``consumed_samples``), and resuming with another number of data-parallel
ranks (same G) reads the same samples. A weighted mixture of folders (``data.sources``) maps the same
sample index onto (source, window) instead: see ``mixture.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ep_train.data.mixture import Blend
from ep_train.data.shards import IndexedShard
from ep_train.data.verify import check_tokenizer, load_manifest


class TokenWindows:
    def __init__(self, data_dir: str | Path, split: str, seq_len: int, tokenizer: str | Path | None = None) -> None:
        manifest = load_manifest(data_dir)
        if tokenizer is not None:
            check_tokenizer(data_dir, manifest, tokenizer)
        if split not in manifest["splits"]:
            raise ValueError(f"split {split!r} not in {str(data_dir)!r}; it has {sorted(manifest['splits'])}")
        self.shards = [IndexedShard(Path(data_dir) / s["prefix"]) for s in manifest["splits"][split]["shards"]]
        self.seq_len = seq_len
        sizes = np.array([s.num_tokens for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # token offset of each shard in the stream
        self.total_tokens = int(self.starts[-1])
        self.vocab_size = int(manifest["tokenizer"]["vocab_size"])
        self.num_windows = max((self.total_tokens - 1) // seq_len, 0)

    def window(self, i: int) -> np.ndarray:
        """Tokens [i*S, i*S + S + 1) of the stream, across shard boundaries if needed."""
        assert 0 <= i < self.num_windows, (i, self.num_windows)
        lo, hi = i * self.seq_len, i * self.seq_len + self.seq_len + 1
        out = np.empty(hi - lo, dtype=np.int64)
        k = int(np.searchsorted(self.starts, lo, side="right")) - 1
        pos = 0
        while pos < len(out):
            shard_lo = lo + pos - int(self.starts[k])
            take = min(len(out) - pos, self.shards[k].num_tokens - shard_lo)
            out[pos:pos + take] = self.shards[k].tokens[shard_lo:shard_lo + take]
            pos += take
            k += 1
        return out


class DistributedBatches:
    """This rank's micro-batches of each global batch, positioned by ``consumed_samples``."""

    def __init__(self, windows: TokenWindows | Blend, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int, seed: int, consumed_samples: int = 0, shuffle: bool = True) -> None:
        if global_batch % (micro_batch * dp_size):
            raise ValueError(f"train.batch_size ({global_batch}) must be a multiple of micro_batch_size x "
                             f"data-parallel ranks ({micro_batch} x {dp_size})")
        if isinstance(windows, TokenWindows):
            if windows.num_windows == 0:
                raise ValueError(f"the data holds {windows.total_tokens} tokens: not one window of seq_len + 1 "
                                 f"({windows.seq_len + 1}); use more text or a shorter seq_len")
            windows = Blend.single(windows, seed, shuffle)
        self.blend = windows
        self.g, self.mb, self.rank, self.dp = global_batch, micro_batch, dp_rank, dp_size
        self.consumed_samples = consumed_samples

    def sample_window(self, s: int) -> int:
        """The window (inside its source) that global sample ``s`` reads."""
        return self.blend.locate(s)[1]

    @property
    def grad_accum_steps(self) -> int:
        return self.g // (self.mb * self.dp)

    def global_sample_ids(self, consumed: int) -> list[int]:
        return list(range(consumed, consumed + self.g))

    def next(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Micro-batches (inputs [mb, S], targets [mb, S]) for this rank; advances by one global batch."""
        per_rank = self.g // self.dp
        first = self.consumed_samples + self.rank * per_rank
        rows = np.stack([self.blend.sample(s) for s in range(first, first + per_rank)])
        self.consumed_samples += self.g
        t = torch.from_numpy(rows)
        return [(t[i:i + self.mb, :-1], t[i:i + self.mb, 1:]) for i in range(0, per_rank, self.mb)]
