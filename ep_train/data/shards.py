"""Megatron's indexed dataset format (``MMIDIDX``), written and read with numpy.

``.idx`` layout (little endian): magic ``MMIDIDX\\x00\\x00`` | version u64 (1) | dtype code u8 |
sequence count u64 | document count u64 | sequence lengths int32[n] | byte offsets int64[n] |
document indices int64[d]. ``.bin`` is the raw token stream. Here one sequence = one document (document
indices 0..n), except a document too large to tokenize in one piece (``prep.LARGE_TEXT_BYTES``): its pieces
are sequences of one document, as in Megatron's sentence-split builds. Shards written here load in
Megatron-LM and GPT-NeoX and vice versa.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + counts 8 + 8


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 below 65,500 tokens (Megatron's rule), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class _Growable:
    """Append-only numpy buffer (amortised doubling) for the index arrays."""

    def __init__(self, dtype: type) -> None:
        self.buf = np.empty(1024, dtype=dtype)
        self.n = 0

    def append(self, values: np.ndarray) -> None:
        need = self.n + len(values)
        if need > len(self.buf):
            self.buf = np.resize(self.buf, max(need, 2 * len(self.buf)))
        self.buf[self.n:need] = values
        self.n = need

    def view(self) -> np.ndarray:
        return self.buf[: self.n]


class ShardWriter:
    """Writes ``PREFIX.bin`` + ``PREFIX.idx``. Files appear under their final names only on ``close``:
    a crash leaves ``*.tmp`` files, never a shard that looks complete."""

    def __init__(self, prefix: str | Path, dtype: np.dtype) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self._bin_tmp = Path(f"{self.prefix}.bin.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self._lengths = _Growable(np.int32)
        self._ends = _Growable(np.bool_)  # per sequence: whether a document ends with it
        self.tokens = 0
        self.max_token = -1  # recorded in the manifest: the largest id, for vocabulary checks
        self._hash = hashlib.sha256()  # of the .bin, while writing: no second read at the end

    @property
    def num_docs(self) -> int:
        """Sequences (index entries): what the manifest's ``documents`` counts."""
        return self._lengths.n

    @property
    def num_documents(self) -> int:
        """Documents (Megatron's ``doc_idx``); a document still open when the shard closes ends there."""
        ends = self._ends.view()
        return int(ends.sum()) + int(len(ends) > 0 and not ends[-1])

    @property
    def nbytes(self) -> int:
        return self.tokens * self.dtype.itemsize

    def add(self, lengths: np.ndarray, tokens: np.ndarray, ends: np.ndarray | None = None) -> None:
        """Append sequences given as their lengths [n] and their concatenated tokens; ``ends`` [n] bool says
        which of them end a document (default: each is a whole document)."""
        data = np.asarray(tokens, dtype=self.dtype).tobytes()
        self._bin.write(data)
        self._hash.update(data)
        self._lengths.append(lengths)
        self._ends.append(np.ones(len(lengths), np.bool_) if ends is None else ends)
        self.tokens += int(lengths.sum())
        if len(data):
            self.max_token = max(self.max_token, int(np.asarray(tokens).max()))

    @property
    def bin_sha256(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> tuple[Path, Path]:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = self._lengths.view()
        offsets = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=offsets[1:])
        ends = self._ends.view().copy()
        if len(ends):
            ends[-1] = True  # Megatron's doc_idx ends at the sequence count: an open document ends with the shard
        doc_idx = np.concatenate([[0], np.flatnonzero(ends) + 1]).astype(np.int64)
        idx_tmp = Path(f"{self.prefix}.idx.tmp")
        with open(idx_tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(lengths.astype(np.int32).tobytes())
            f.write(offsets.tobytes())
            f.write(doc_idx.tobytes())
            f.flush()
            os.fsync(f.fileno())
        bin_path, idx_path = Path(f"{self.prefix}.bin"), Path(f"{self.prefix}.idx")
        os.replace(self._bin_tmp, bin_path)
        os.replace(idx_tmp, idx_path)  # the .idx appearing is what marks the shard complete
        return bin_path, idx_path

    def abort(self) -> None:
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)


class IndexedShard:
    """Memory-mapped reader of one shard."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise ValueError(f"shard file {str(p)!r} is missing; rebuild the data with data_prep_tool build")
        raw = idx_path.read_bytes()
        fix = "rebuild the shards (data_prep_tool build --overwrite)"
        if raw[:9] != MAGIC:
            raise ValueError(f"{str(idx_path)!r} is not a Megatron indexed dataset (bad magic {raw[:9]!r}, "
                             f"expected {MAGIC!r}); {fix}")
        if len(raw) < HEADER_BYTES:  # struct would raise a bare struct.error naming no file
            raise ValueError(f"{str(idx_path)!r} is truncated inside its header ({len(raw)} bytes, the header "
                             f"alone is {HEADER_BYTES}); {fix}")
        (version,) = struct.unpack_from("<Q", raw, 9)
        if version != 1:
            raise ValueError(f"{str(idx_path)!r}: index version {version} is unsupported (expected 1); {fix}")
        (code,) = struct.unpack_from("<B", raw, 17)
        if code not in DTYPE_CODES:
            raise ValueError(f"{str(idx_path)!r}: unknown dtype code {code}; {fix}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        n, d = struct.unpack_from("<QQ", raw, 18)
        pos = HEADER_BYTES
        expected = pos + n * 4 + n * 8 + d * 8
        if len(raw) != expected:
            raise ValueError(f"{str(idx_path)!r} is truncated or corrupt ({len(raw)} bytes, expected {expected}); "
                             f"{fix}")
        self.lengths = np.frombuffer(raw, np.int32, n, pos)
        self.offsets = np.frombuffer(raw, np.int64, n, pos + n * 4)
        self.doc_idx = np.frombuffer(raw, np.int64, d, pos + n * 12)
        size = os.path.getsize(bin_path)
        want = int(self.lengths.astype(np.int64).sum()) * self.dtype.itemsize
        if size != want:
            raise ValueError(f"{str(bin_path)!r} holds {size} bytes but its index describes {want}; "
                             f"the shard is truncated or damaged: {fix}")
        # documents must tile the .bin in order, else a window would read past a document or the file
        if n and (self.offsets[0] != 0 or (self.lengths < 0).any() or not np.array_equal(
                np.diff(self.offsets), self.lengths[:-1].astype(np.int64) * self.dtype.itemsize)):
            raise ValueError(f"{str(idx_path)!r}: document offsets do not follow the lengths; {fix}")
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = self.offsets[i] // self.dtype.itemsize
        return np.asarray(self.tokens[start: start + self.lengths[i]])

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def sequence_ends(self) -> np.ndarray:
        """[n] bool: which sequences end a document (from ``doc_idx``)."""
        ends = np.zeros(len(self), np.bool_)
        last = self.doc_idx[1:] - 1
        ends[last[last >= 0]] = True
        return ends
