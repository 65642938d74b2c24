"""Reading a build back: the manifest (checked), ``inspect``, and the checks training runs at start.

``verify_for_training`` is what the trainer calls before it reads a batch: a damaged, truncated or foreign
shard, or shards whose token ids do not fit the model, then fail at start with the file named, instead of
as a numpy or IndexError deep in a step hours later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ep_train.config import DataConfig, data_sources
from ep_train.data.shards import IndexedShard, sha256_file
from ep_train.data.tokenizer import check_tokenizer_path, load_tokenizer, safe_decode

SCAN_CHUNK = 1 << 24  # tokens per vectorised max/min: bounded memory whatever the shard size
MAX_PROBLEMS = 5
REBUILD = "rebuild the shards (data_prep_tool build --overwrite)"


MANIFEST_FIELDS = ("format", "dtype", "tokenizer.path", "tokenizer.sha256", "tokenizer.vocab_size", "splits")
SHARD_FIELDS = ("prefix", "documents", "tokens", "bin_sha256", "idx_sha256")


def run_manifest(data: DataConfig) -> dict | None:
    """The manifest of a run's first data source (every source has the run's tokenizer, checked at start),
    or None where it is not on this machine or not readable: for tools that only look (load, export)."""
    sources = data_sources(data)
    try:
        manifest = json.loads((Path(sources[0].path) / "manifest.json").read_text()) if sources else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def load_manifest(data_dir: str | Path) -> dict:
    """``DIR/manifest.json``, checked for the fields readers use; a ValueError names the file and field."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{str(path)!r} not found; --data_dir must be the output of data_prep_tool build "
                         "(after merge, for --num-tasks builds)")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); it is written last, atomically, by "
                         "data_prep_tool build/merge: rerun that (build --overwrite) to rewrite it") from None
    for name in MANIFEST_FIELDS:
        node: Any = m
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            raise ValueError(f"{str(path)!r} has no field {name!r}; it was not written by data_prep_tool or was "
                             "edited: rebuild (data_prep_tool build --overwrite)")
    for split, info in m["splits"].items():
        for i, shard in enumerate(info.get("shards", []) if isinstance(info, dict) else [None]):
            missing = [f for f in SHARD_FIELDS if not isinstance(shard, dict) or f not in shard]
            if missing:
                raise ValueError(f"{str(path)!r}: splits.{split}.shards[{i}] lacks {missing}; rebuild "
                                 "(data_prep_tool build --overwrite)")
    return m


def _inspect_tokenizer(data_dir: str, m: dict, tokenizer: str | None, force: bool) -> tuple[Any, str | None]:
    """The tokenizer to decode samples with, refused (ValueError) unless it is the build's own (by sha256)
    or ``force``; with ``force`` a warning line is returned instead."""
    path = tokenizer or m["tokenizer"]["path"]
    sp = load_tokenizer(path)
    have, want = sha256_file(path), m["tokenizer"]["sha256"]
    if have == want:
        return sp, None
    what = (f"tokenizer {str(path)!r} (sha256 {have[:12]}..., {sp.get_piece_size()} pieces) is not the one "
            f"{data_dir!r} was built with ({m['tokenizer']['path']}, sha256 {want[:12]}..., "
            f"{m['tokenizer']['vocab_size']} pieces)")
    if not force:
        raise ValueError(f"{what}: its samples would decode to garbage. Give the build's tokenizer with "
                         "--tokenizer, or add --force-tokenizer to decode with this one anyway")
    return sp, f"WARNING: {what}; samples decoded with it anyway (--force-tokenizer)"


def _missing_files(prefix: Path) -> list[str]:
    """The shard's .bin / .idx files that are not there."""
    return [f"{prefix}.{ext}" for ext in ("bin", "idx") if not Path(f"{prefix}.{ext}").is_file()]


def inspect(data_dir: str, samples: int = 3, tokenizer: str | None = None, verify: bool = True,
            force_tokenizer: bool = False) -> tuple[str, bool]:
    """Human-readable summary; returns (text, checksums_ok)."""
    m = load_manifest(data_dir)
    sp, warning = None, None
    if samples or tokenizer:  # checked first: a wrong tokenizer is refused before the slow checksums
        sp, warning = _inspect_tokenizer(data_dir, m, tokenizer, force_tokenizer)
    lines = [f"{data_dir}: dtype {m['dtype']}, tokenizer {m['tokenizer']['path']} "
             f"(vocab {m['tokenizer']['vocab_size']}, sha256 {m['tokenizer']['sha256'][:12]}...)"]
    if warning:
        lines.append(warning)
    ok = True
    for split, info in m["splits"].items():
        # An index entry is a document in ep-train's builds; Megatron's sentence-split builds (adopted) hold
        # several sequences per document: say which is counted.
        docs = sum(s.get("megatron_documents", s["documents"]) for s in info["shards"])
        seqs = sum(s["documents"] for s in info["shards"])
        unit = "document" if docs == seqs else "sequence"
        lines.append(f"{split}: {len(info['shards'])} shard(s), {docs:,} documents"
                     + (f" in {seqs:,} sequences" if docs != seqs else "") + f", {info['tokens']:,} tokens")
        lengths = []
        for s in info["shards"]:
            prefix = Path(data_dir) / s["prefix"]
            gone = _missing_files(prefix)
            if gone:  # named, and the summary goes on (the checksum read raised FileNotFoundError)
                ok = False
                lines.extend(f"  MISSING: {f}" for f in gone)
                continue
            if verify:
                for ext in ("bin", "idx"):
                    if sha256_file(f"{prefix}.{ext}") != s[f"{ext}_sha256"]:
                        ok = False
                        lines.append(f"  CHECKSUM MISMATCH: {prefix}.{ext}")
            lengths.append(IndexedShard(prefix).lengths)
        if lengths:
            all_len = np.concatenate(lengths)
            edges = np.unique(np.geomspace(1, max(int(all_len.max()), 2), 9).astype(int))
            hist, edges = np.histogram(all_len, bins=edges)
            lines.append(f"  {unit} length: min {all_len.min()}, median {int(np.median(all_len))}, "
                         f"max {all_len.max()}")
            for n, lo, hi in zip(hist, edges[:-1], edges[1:]):
                lines.append(f"  {lo:>8}-{hi:<8} {'#' * int(40 * n / max(hist.max(), 1)):<40} {n}")
    if verify:
        lines.append("checksums: " + ("OK" if ok else "MISMATCH"))
    train = m["splits"].get("train", {}).get("shards", [])
    first = Path(data_dir) / train[0]["prefix"] if train else None
    if samples and first is not None and sp is not None and not _missing_files(first):
        shard = IndexedShard(first)
        for i in range(min(samples, len(shard))):
            text, oov = safe_decode(sp, shard[i].tolist())  # never IndexError on ids past the vocabulary
            note = f", {oov} id(s) out of range for this tokenizer" if oov else ""
            lines.append(f"--- sample {i} ({len(shard[i])} tokens{note}) ---\n{text[:400]}")
    r = m.get("report", {})
    lines.append(f"report: malformed json {r.get('malformed_json', 0)}, missing text key "
                 f"{r.get('missing_text_key', 0)}, empty documents {r.get('empty_documents', 0)}, replaced "
                 f"characters {r.get('replaced_characters', 0)}, binary files {r.get('binary_files', 0)}, "
                 f"unreadable files {r.get('unreadable_files', 0)}")
    return "\n".join(lines), ok


def has_split(data_dir: str | Path, split: str) -> bool:
    """Whether the build holds at least one shard of ``split`` (a build without validation has none)."""
    return bool(load_manifest(data_dir)["splits"].get(split, {}).get("shards"))


def check_tokenizer(data_dir: str | Path, manifest: dict, tokenizer_path: str | Path) -> None:
    """The training tokenizer must be the one the shards were built with (by sha256)."""
    check_tokenizer_path(tokenizer_path)
    want, have = sha256_file(tokenizer_path), manifest["tokenizer"]["sha256"]
    if want != have:
        raise ValueError(f"data.tokenizer {str(tokenizer_path)!r} (sha256 {want[:12]}...) differs from the one "
                         f"{str(data_dir)!r} was built with ({manifest['tokenizer']['path']}, sha256 "
                         f"{have[:12]}...); rebuild the shards or point data.tokenizer at that model")


def _scan_tokens(shard: IndexedShard, limit: int) -> tuple[int, int] | None:
    """First (position, id) in the shard with id outside [0, limit), or None. Memory-mapped, chunked."""
    tokens = shard.tokens
    signed = np.issubdtype(tokens.dtype, np.signedinteger)
    for lo in range(0, len(tokens), SCAN_CHUNK):
        chunk = np.asarray(tokens[lo:lo + SCAN_CHUNK])
        if chunk.max() >= limit or (signed and chunk.min() < 0):  # the common case stops here
            pos = int(np.flatnonzero((chunk >= limit) | (chunk < 0))[0])
            return lo + pos, int(chunk[pos])
    return None


def _shard_problem(data_dir: Path, manifest: dict, entry: dict, limit: int, full_hash: bool,
                   scan_tokens: bool) -> str | None:
    """The first thing wrong with one shard of the manifest (None: fine), naming its file."""
    prefix = data_dir / entry["prefix"]
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    for p in (idx_path, bin_path):
        if not p.is_file():
            return f"{str(p)!r} is listed in manifest.json but missing; {REBUILD}"
    try:
        shard = IndexedShard(prefix)  # magic, version, dtype code, index length, .bin length vs index
    except ValueError as e:
        return str(e)
    dtype = np.dtype(manifest["dtype"])
    if shard.dtype != dtype:
        return f"{str(idx_path)!r} holds {shard.dtype} tokens but manifest.json says {dtype}; {REBUILD}"
    # old manifests have no sizes: the .bin size follows from the token count and the dtype
    want_bin = entry.get("bin_bytes", entry["tokens"] * dtype.itemsize)
    for path, want in ((bin_path, want_bin), (idx_path, entry.get("idx_bytes"))):
        size = path.stat().st_size
        if want is not None and size != want:
            return (f"{str(path)!r} holds {size} bytes but manifest.json records {want}: truncated or replaced "
                    f"since the build; {REBUILD}")
    if len(shard) != entry["documents"]:
        return f"{str(idx_path)!r} indexes {len(shard)} documents, manifest.json {entry['documents']}; {REBUILD}"
    checks = [(idx_path, "idx_sha256")] + ([(bin_path, "bin_sha256")] if full_hash else [])
    for path, field in checks:
        if sha256_file(path) != entry[field]:
            return f"{str(path)!r}: sha256 differs from manifest.json's {field}; the file changed, {REBUILD}"
    if scan_tokens and (bad := _scan_tokens(shard, limit)) is not None:
        pos, value = bad
        doc = int(np.searchsorted(shard.offsets // dtype.itemsize, pos, side="right")) - 1
        return (f"{str(bin_path)!r}: token id {value} at token position {pos} (document {doc}) is outside "
                f"[0, {limit}) (model.vocab_size and the tokenizer's vocab_size); the embedding lookup would "
                f"fail with an IndexError. The shard is damaged or from another tokenizer: {REBUILD}")
    return None


def verify_for_training(data_dir: str | Path, split: str, vocab_size: int, tokenizer_path: str | Path | None = None,
                        full_hash: bool = False, scan_tokens: bool = True) -> None:
    """Check at training start that ``data_dir``'s ``split`` fits this run; ValueError naming file and fix.

    (a) every shard file exists, parses (magic, version, lengths) and has the manifest's size and the
    ``.idx`` its sha256 (``full_hash`` also hashes every ``.bin``: a full read); (b) the shards' vocabulary
    fits ``vocab_size`` and ``tokenizer_path``, if given, is the build's tokenizer; (c) no token id is
    outside [0, min(vocab_size, tokenizer vocab)) (``scan_tokens``: a chunked vectorised pass over the
    memory-mapped ``.bin`` files, about as fast as the disk or page cache reads).
    """
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    if tokenizer_path is not None:
        check_tokenizer(data_dir, manifest, tokenizer_path)
    tok_vocab = int(manifest["tokenizer"]["vocab_size"])
    if tok_vocab > vocab_size:
        raise ValueError(f"model.vocab_size = {vocab_size} is smaller than the vocabulary of the tokenizer "
                         f"{str(data_dir)!r} was built with ({manifest['tokenizer']['path']}: {tok_vocab} tokens); "
                         f"set model.vocab_size >= {tok_vocab}, or rebuild the shards with a tokenizer of at most "
                         f"{vocab_size} pieces")
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in {str(data_dir)!r}; it has {sorted(manifest['splits'])}")
    limit = min(vocab_size, tok_vocab)
    problems = []
    for entry in manifest["splits"][split]["shards"]:
        if (p := _shard_problem(data_dir, manifest, entry, limit, full_hash, scan_tokens)) is not None:
            problems.append(p)
    if problems:
        more = f"\n  ... and {len(problems) - MAX_PROBLEMS} more shard(s)" if len(problems) > MAX_PROBLEMS else ""
        raise ValueError(f"{len(problems)} shard(s) of {str(data_dir)!r} ({split}) cannot be used:\n  "
                         + "\n  ".join(problems[:MAX_PROBLEMS]) + more)
