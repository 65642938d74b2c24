"""``data_prep_tool adopt``: a ``manifest.json`` for Megatron / GPT-NeoX ``.bin/.idx`` shards made elsewhere.

The trainer reads only folders with a manifest (it names the tokenizer, the shards, their sizes and
checksums). Shards written by Megatron-LM's ``IndexedDatasetBuilder`` (``preprocess_data.py``) or GPT-NeoX
have the same file format as ep-train's own (``shards.py``), so adopting them means checking them against
the tokenizer they are said to come from and recording what was found:

- every ``PREFIX.idx`` parses and its ``PREFIX.bin`` has the size the index describes;
- the token dtype is an integer type that can hold every id of the tokenizer, and is the same in all shards;
- every id is in ``[0, vocab_size)`` (a chunked pass over each memory-mapped ``.bin``): the first bad one is
  refused with its shard, token position and document;
- the document index (``doc_idx``) starts at 0, ends at the sequence count and never decreases;
- documents that do not end with the tokenizer's EOS are counted and warned about (packing then joins
  them with the next document without a separator), not refused;
- sha256 of every file, recorded like a build's.

Nothing is moved or rewritten: the manifest names the shards where they are (prefixes relative to the
folder). Prefixes matching ``--val`` (fnmatch patterns) form the validation split; the rest are training.
Subfolders holding their own build (a ``manifest.json`` or ``progress.json``) are skipped. The tokenizer
must be a sentencepiece model, as everywhere in ep-train: shards made with a GPT-2/Hugging Face BPE
tokenizer cannot be adopted.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import numpy as np

from ep_train.data.shards import IndexedShard, sha256_file
from ep_train.data.tokenizer import load_tokenizer
from ep_train.data.verify import SCAN_CHUNK
from ep_train.files import atomic_write_text

ADOPTED = "data_prep_tool adopt"


def _first_bad_id(shard: IndexedShard, vocab: int) -> tuple[int, int] | None:
    tokens = shard.tokens
    for lo in range(0, len(tokens), SCAN_CHUNK):
        chunk = np.asarray(tokens[lo:lo + SCAN_CHUNK])
        bad = (chunk >= vocab) | (chunk < 0)
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            return lo + pos, int(chunk[pos])
    return None


def _documents_without_eos(shard: IndexedShard, eos: int) -> tuple[int, int]:
    """(documents, documents whose last token is not EOS); a document spans sequences doc_idx[i]..[i+1]."""
    doc_idx = shard.doc_idx
    ends = doc_idx[1:] - 1  # the last sequence of each document
    ends = ends[doc_idx[1:] > doc_idx[:-1]]  # empty documents have no last token
    if len(ends) == 0:
        return len(doc_idx) - 1, 0
    lengths = shard.lengths[ends].astype(np.int64)
    last_pos = shard.offsets[ends] // shard.dtype.itemsize + lengths - 1
    present = lengths > 0
    last = np.asarray(shard.tokens[last_pos[present]]) if present.any() else np.zeros(0, np.int64)
    return len(doc_idx) - 1, int((last != eos).sum() + (~present).sum())


def _documents_starting_with(shard: IndexedShard, token: int) -> tuple[int, int]:
    """(non-empty documents, those whose first token is ``token``): Megatron's tokenizers put BOS first
    by default, and the manifest's ``append_bos`` tells generation and export to do the same."""
    doc_idx = shard.doc_idx
    firsts = doc_idx[:-1][doc_idx[1:] > doc_idx[:-1]]  # the first sequence of each non-empty document
    firsts = firsts[shard.lengths[firsts] > 0]
    if len(firsts) == 0 or token < 0:
        return len(firsts), 0
    first = np.asarray(shard.tokens[shard.offsets[firsts] // shard.dtype.itemsize])
    return len(firsts), int((first == token).sum())


def adopt(folder: str | Path, tokenizer: str | Path, val_patterns: list[str] | None = None,
          log: Any = print) -> dict[str, Any]:
    """Check the shards under ``folder`` against ``tokenizer`` and write ``folder/manifest.json``."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder; give the folder holding the .bin/.idx pairs")
    existing = root / "manifest.json"
    if existing.is_file():
        try:
            prev = json.loads(existing.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            prev = {}
        adopted = prev.get("adopted") if isinstance(prev, dict) else None
        if not isinstance(adopted, dict) or adopted.get("tool") != ADOPTED:
            raise ValueError(f"{str(existing)!r} exists and was not written by {ADOPTED} (a data_prep_tool build?): "
                             "adopt never replaces another tool's manifest; use that folder as it is, or move the "
                             "shards to a new folder")
    sp = load_tokenizer(tokenizer)
    vocab, eos = sp.get_piece_size(), sp.eos_id()
    # Folders below that hold their own build (manifest.json, or progress.json of an unfinished one) are
    # not ours to adopt: an unmerged --num-tasks build or a parent of several builds would mix splits.
    nested = {p.parent for name in ("manifest.json", "progress.json") for p in root.rglob(name) if p.parent != root}
    idx_files = sorted(p for p in root.rglob("*.idx") if not any(n == p.parent or n in p.parents for n in nested))
    if nested:
        log(f"skipping {len(nested)} folder(s) holding their own build: {sorted(str(n) for n in nested)[:3]}")
    if not idx_files:
        raise ValueError(f"no .idx files under {str(folder)!r}; adopt takes Megatron/GPT-NeoX indexed datasets "
                         "(PREFIX.bin + PREFIX.idx); for raw text use data_prep_tool build")
    dtype: np.dtype | None = None
    first_prefix = ""
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    without_eos = documents_total = documents_nonempty = with_bos = 0
    for idx in idx_files:
        prefix = idx.with_suffix("")
        rel = str(prefix.relative_to(root))
        shard = IndexedShard(prefix)  # magic, version, dtype code, index and .bin lengths, offsets in order
        if not np.issubdtype(shard.dtype, np.integer):
            raise ValueError(f"{str(idx)!r} holds {shard.dtype} values, not token ids; adopt takes integer shards")
        if np.iinfo(shard.dtype).max < vocab - 1:
            raise ValueError(f"{str(idx)!r} stores tokens as {shard.dtype} (max {np.iinfo(shard.dtype).max}) but "
                             f"{tokenizer} has {vocab} pieces: ids would not fit; these shards were made with "
                             "another tokenizer, or pass the one they were made with")
        if dtype is None:
            dtype, first_prefix = shard.dtype, rel
        elif shard.dtype != dtype:
            raise ValueError(f"{str(idx)!r} stores tokens as {shard.dtype} but {first_prefix} as {dtype}: one "
                             "folder must hold one dtype; adopt them as two folders (two data.sources)")
        d = shard.doc_idx
        if len(d) == 0 or d[0] != 0 or d[-1] != len(shard) or (np.diff(d) < 0).any():
            raise ValueError(f"{str(idx)!r}: the document index is not 0 ... {len(shard)} in increasing order "
                             f"(first {d[:1].tolist()}, last {d[-1:].tolist()}); the file is damaged")
        if (bad := _first_bad_id(shard, vocab)) is not None:
            pos, value = bad
            seq = int(np.searchsorted(shard.offsets // shard.dtype.itemsize, pos, side="right")) - 1
            doc = int(np.searchsorted(d, seq, side="right")) - 1
            raise ValueError(f"{str(prefix)}.bin: token id {value} at token position {pos} (document {doc}) is "
                             f"outside [0, {vocab}) of {tokenizer}: these shards were made with another "
                             "tokenizer (pass that one) or are damaged")
        docs, no_eos = _documents_without_eos(shard, eos)
        documents_total += docs
        without_eos += no_eos
        nonempty, bos_first = _documents_starting_with(shard, sp.bos_id())
        documents_nonempty += nonempty
        with_bos += bos_first
        is_val = any(fnmatch.fnmatch(rel, pat) for pat in val_patterns or [])
        bin_path = Path(f"{prefix}.bin")
        # "documents" is what ep-train's index calls one entry (a sequence); Megatron's own document count is
        # kept beside it (they differ for sentence-split builds)
        splits["val" if is_val else "train"].append({
            "prefix": rel, "documents": len(shard), "megatron_documents": docs, "tokens": shard.num_tokens,
            "bin_sha256": sha256_file(bin_path), "idx_sha256": sha256_file(idx),
            "bin_bytes": bin_path.stat().st_size, "idx_bytes": idx.stat().st_size})
        log(f"{rel}: {len(shard):,} sequences, {docs:,} documents, {shard.num_tokens:,} tokens, {shard.dtype}"
            f"{', validation' if is_val else ''}")
    for pat in val_patterns or []:
        if not any(fnmatch.fnmatch(str(p.with_suffix("").relative_to(root)), pat) for p in idx_files):
            log(f"warning: --val {pat!r} matches no shard prefix (prefixes are relative to {folder}, without "
                ".bin/.idx)")
    if not splits["train"]:
        raise ValueError(f"every shard under {str(folder)!r} matched --val {val_patterns}: nothing is left to "
                         "train on; narrow the patterns")
    if without_eos:
        log(f"warning: {without_eos:,} of {documents_total:,} documents do not end with EOS (id {eos}); packed "
            "windows will run them into the next document without a separator (Megatron's preprocess_data.py "
            "adds EOS only with --append-eod)")
    # every document starting with BOS: made with BOS (Megatron's default); prompts and exports add it too
    append_bos = documents_nonempty > 0 and with_bos == documents_nonempty
    if 0 < with_bos < documents_nonempty:
        log(f"warning: {with_bos:,} of {documents_nonempty:,} documents start with BOS (id {sp.bos_id()}), not all: "
            "recorded as made without BOS (append_bos false); prompts will not start with BOS")
    elif append_bos:
        log(f"every document starts with BOS (id {sp.bos_id()}): recorded as append_bos true (prompts and "
            "exports start with BOS, as the training documents did)")
    assert dtype is not None
    manifest = {
        "format": "megatron-mmidx-v1", "dtype": dtype.name, "append_bos": append_bos,
        "tokenizer": {"path": str(Path(tokenizer).resolve()), "sha256": sha256_file(tokenizer), "vocab_size": vocab,
                      "eos_id": eos, "bos_id": sp.bos_id()},
        "adopted": {"tool": ADOPTED, "documents_without_eos": without_eos, "documents": documents_total},
        "splits": {s: {"shards": v, "documents": sum(x["documents"] for x in v), "tokens": sum(x["tokens"] for x in v)}
                   for s, v in splits.items()},
    }
    atomic_write_text(existing, json.dumps(manifest, indent=1))
    return manifest
