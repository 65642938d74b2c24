"""``data_prep_tool build`` / ``merge`` / ``inspect``: local text -> tokenized Megatron shards + manifest.

Pipeline: input files (sorted) -> a stream of documents (parquet, arrow and JSON arrays through HF
``datasets`` local loaders; JSON lines parsed line by line so a malformed line can be reported by file
and line; plain text read directly, one document per file, see ``_text_documents``)
-> batches encoded by N worker processes (one sentencepiece load per worker, ``imap`` keeps order, so
the bytes do not depend on N) -> EOS per document -> train/val by a stable hash of the text ->
shards rolled at a size cap. After each roll ``progress.json`` records how far the input stream got,
so a rerun after an interruption resumes there and produces the same bytes.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ep_train.data.shards import IndexedShard, ShardWriter, sha256_file, token_dtype
from ep_train.data.tokenizer import load_tokenizer

TEXT_SUFFIXES = (".txt", ".txt.gz", ".md", ".py", ".rst")
JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
TABLE_SUFFIXES = (".parquet", ".arrow")
BATCH_DOCS = 64  # a batch closes at this many documents or BATCH_CHARS characters, whichever comes first
BATCH_CHARS = 1 << 18
TEXT_GROUP = 512  # plain-text files per datasets call
MAX_EXAMPLES = 20
# Local files only: without these, every load_dataset call asks the Hub (a network round trip per file).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, globs and folders -> sorted, de-duplicated list of supported files."""
    out: set[Path] = set()
    for item in inputs:
        matches = [Path(m) for m in glob.glob(item, recursive=True)] or [Path(item)]
        for m in matches:
            if m.is_dir():
                out.update(p for p in m.rglob("*") if p.is_file() and p.name.endswith(
                    TEXT_SUFFIXES + JSON_SUFFIXES + TABLE_SUFFIXES))
            elif m.is_file():
                if not m.name.endswith(TEXT_SUFFIXES + JSON_SUFFIXES + TABLE_SUFFIXES):
                    raise ValueError(f"--input {str(m)!r}: unsupported file type; use .txt, .jsonl/.json(.gz), "
                                     ".parquet or .arrow")
                out.add(m)
            else:
                raise ValueError(f"--input {item!r} matches no file or folder")
    if not out:
        raise ValueError(f"--input {inputs} holds no .txt/.jsonl/.json/.parquet/.arrow files")
    return sorted(out)


@dataclass
class Report:
    """Bad input, counted; the first examples keep file and line."""

    malformed_json: int = 0
    missing_text_key: int = 0
    empty_documents: int = 0
    replaced_characters: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, kind: str, where: str, n: int = 1) -> None:
        setattr(self, kind, getattr(self, kind) + n)
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{kind}: {where}")


class BadInput(ValueError):
    pass


_replaced = 0


def _count_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    global _replaced
    _replaced += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("ep_train_count_replace", _count_replace)


def _documents(path: Path, text_key: str) -> Iterator[tuple[str, Any, str]]:
    """Yield ('doc', text, where) or (kind, None, where) for bad rows, in file order."""
    global _replaced
    name = path.name
    if name.endswith(JSON_SUFFIXES):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as f:
            head = f.read(4096).lstrip()
        if not head.startswith(b"["):
            with opener(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    where = f"{path}:{lineno}"
                    _replaced = 0
                    line = raw.decode("utf-8", errors="ep_train_count_replace")
                    if _replaced:
                        yield "replaced_characters", _replaced, where
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        yield "malformed_json", None, f"{where}: {e.msg}"
                        continue
                    if not isinstance(row, dict) or not isinstance(row.get(text_key), str):
                        yield "missing_text_key", None, f"{where}: no string field {text_key!r}"
                        continue
                    yield "doc", row[text_key], where
            return
    from datasets import load_dataset  # imported here: slow import, only needed for these formats

    if name.endswith(JSON_SUFFIXES):
        ds, key = load_dataset("json", data_files=[str(path)], split="train", streaming=True), text_key
    else:
        builder = "parquet" if name.endswith(".parquet") else "arrow"
        ds, key = load_dataset(builder, data_files=[str(path)], split="train", streaming=True), text_key
    for i, row in enumerate(ds):
        where = f"{path}:row {i}"
        if not isinstance(row.get(key), str):
            yield "missing_text_key", None, f"{where}: no string field {key!r}"
            continue
        yield "doc", row[key], where


def _text_documents(paths: list[Path]) -> Iterator[tuple[str, Any, str]]:
    """Plain-text files, one document each.

    Read here rather than through ``datasets``' text loader: with one document per file the loader
    only adds per-file set-up (fsspec, an Arrow table per file), which measured as a third of the
    build's time on the standard library (bench/data_prep.py), and it cannot count the bytes it
    replaces. Decoding here replaces and counts undecodable bytes in the same pass.
    """
    global _replaced
    for path in paths:
        _replaced = 0
        with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as f:
            text = f.read().decode("utf-8", errors="ep_train_count_replace")
        if _replaced:
            yield "replaced_characters", _replaced, str(path)
        yield "doc", text, str(path)


# ---- worker side -------------------------------------------------------------------------------
_sp = None
_opts: dict[str, Any] = {}


def _init_worker(model_path: str, opts: dict[str, Any]) -> None:
    global _sp, _opts
    _sp, _opts = load_tokenizer(model_path), opts  # one tokenizer load per worker


def _encode(batch: tuple[int, list[str], dict[str, int]]) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, dict]:
    end_pos, texts, bad = batch
    # sentencepiece appends EOS (and BOS) itself; tokens leave the worker already in the shard dtype
    ids = _sp.encode(texts, add_eos=True, add_bos=_opts["append_bos"])
    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=_opts["dtype"], count=int(lengths.sum()))
    frac = _opts["val_fraction"]
    is_val = np.array([frac > 0 and _hash_unit(t) < frac for t in texts], dtype=bool)
    return end_pos, lengths, tokens, is_val, bad


def _hash_unit(text: str) -> float:
    """Stable hash of a document in [0, 1): the same document lands in the same split on every run."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2.0 ** 64


# ---- main side ---------------------------------------------------------------------------------
def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _batches(files: list[Path], text_key: str, skip: int, strict: bool) -> Iterator[tuple[int, list[str], dict]]:
    """Group the document stream into batches; each carries its end position and its bad-row events."""
    pos = chars = 0
    texts: list[str] = []
    bad: dict[str, Any] = {}
    groups: list[list[Path]] = []  # runs of consecutive plain-text files are read together
    for path in files:
        is_text = path.name.endswith(TEXT_SUFFIXES)
        if is_text and groups and groups[-1][0].name.endswith(TEXT_SUFFIXES) and len(groups[-1]) < TEXT_GROUP:
            groups[-1].append(path)
        else:
            groups.append([path])
    for group in groups:
        docs = _text_documents(group) if group[0].name.endswith(TEXT_SUFFIXES) else _documents(group[0], text_key)
        for kind, payload, where in docs:
            pos += 1
            if pos <= skip:
                continue
            if kind == "doc" and not payload.strip():
                kind, where = "empty_documents", where
            if kind == "doc":
                texts.append(payload)
                chars += len(payload)
            else:
                n = payload if kind == "replaced_characters" else 1
                if strict and kind != "replaced_characters":
                    raise BadInput(f"{kind.replace('_', ' ')} at {where} (--strict stops at the first bad row; "
                                   "drop --strict to skip and count them)")
                bad.setdefault(kind, []).append((where, n))
            if len(texts) >= BATCH_DOCS or chars >= BATCH_CHARS:
                yield pos, texts, bad
                texts, bad, chars = [], {}, 0
    yield pos, texts, bad


def check_dtype(vocab: int, dtype: str | None) -> np.dtype:
    """The token dtype for a vocabulary (``None``: Megatron's rule), refusing one too small for it."""
    np_dtype = token_dtype(vocab) if dtype is None else np.dtype(dtype)
    if vocab - 1 > np.iinfo(np_dtype).max:
        raise ValueError(f"--dtype = {np_dtype} cannot hold the tokenizer's vocabulary ({vocab} tokens, max id "
                         f"{vocab - 1} > {np.iinfo(np_dtype).max}); use --dtype int32 or leave it unset")
    return np_dtype


def build(inputs: list[str], tokenizer: str, output: str, workers: int = 1, text_key: str = "text",
          val_fraction: float = 0.0, shard_size_mb: float = 256.0, append_bos: bool = False, strict: bool = False,
          num_tasks: int = 1, task_id: int = 0, dtype: str | None = None, progress: bool = True) -> dict:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction = {val_fraction} is invalid: use a number in [0, 1), e.g. 0.01")
    if shard_size_mb <= 0:
        raise ValueError(f"--shard-size-mb = {shard_size_mb} is invalid: use a positive size, e.g. 256")
    if num_tasks < 1 or not 0 <= task_id < num_tasks:
        raise ValueError(f"--task-id = {task_id} is invalid: use 0 <= task-id < --num-tasks ({num_tasks})")
    if workers < 1:
        raise ValueError(f"--workers = {workers} is invalid: use 1 or more")
    files = expand_inputs(inputs)[task_id::num_tasks]
    sp = load_tokenizer(tokenizer)
    vocab = sp.get_piece_size()
    np_dtype = check_dtype(vocab, dtype)
    tok_sha = sha256_file(tokenizer)
    out = Path(output) if num_tasks == 1 else Path(output) / f"part_{task_id:05d}"
    out.mkdir(parents=True, exist_ok=True)
    state_path, manifest_path = out / "progress.json", out / "manifest.json"
    for previous in (manifest_path, state_path):
        if previous.is_file():
            old = json.loads(previous.read_text())
            if old["tokenizer"]["sha256"] != tok_sha:
                raise ValueError(f"--output {str(out)!r} holds shards made with another tokenizer "
                                 f"({old['tokenizer']['path']}, sha256 {old['tokenizer']['sha256'][:12]}...); "
                                 "use an empty folder or the same tokenizer")
    if manifest_path.is_file():
        return json.loads(manifest_path.read_text())  # already complete
    eos = sp.eos_id()
    if eos < 0:
        raise ValueError(f"tokenizer {tokenizer!r} has no EOS piece; train it with an eos_id (the default is 2)")
    if append_bos and sp.bos_id() < 0:
        raise ValueError(f"--append-bos: tokenizer {tokenizer!r} has no BOS piece; drop --append-bos")
    opts = {"append_bos": append_bos, "val_fraction": val_fraction, "dtype": np_dtype.str}
    state: dict[str, Any] = {"tokenizer": {"path": str(Path(tokenizer).resolve()), "sha256": tok_sha},
                             "consumed": 0, "shards": {"train": [], "val": []}, "report": Report().__dict__}
    if state_path.is_file():
        state = json.loads(state_path.read_text())
    done = {s["prefix"] for split in state["shards"].values() for s in split}
    for f in out.iterdir():  # anything not recorded as finished is a leftover of an interruption
        stem = f.name.split(".")[0]
        if f.suffix in (".bin", ".idx", ".tmp") and stem not in done:
            f.unlink()
    report = Report(**state["report"])
    cap = shard_size_mb * 2 ** 20
    writers: dict[str, ShardWriter | None] = {"train": None, "val": None}

    def writer(split: str) -> ShardWriter:
        if writers[split] is None:
            writers[split] = ShardWriter(out / f"{split}_{len(state['shards'][split]):05d}", np_dtype)
        return writers[split]  # type: ignore[return-value]

    def roll(consumed: int) -> None:
        for split, w in writers.items():
            if w is not None and w.num_docs:
                bin_p, idx_p = w.close()
                state["shards"][split].append({"prefix": bin_p.stem, "documents": w.num_docs, "tokens": w.tokens,
                                               "bin_sha256": w.bin_sha256, "idx_sha256": sha256_file(idx_p)})
            elif w is not None:
                w.abort()
            writers[split] = None
        state["consumed"], state["report"] = consumed, report.__dict__
        _atomic_json(state_path, state)  # only now do the closed shards count as finished

    from tqdm import tqdm

    bar = tqdm(desc="build", unit="doc", disable=not progress, dynamic_ncols=True)
    ctx = get_context("spawn" if os.environ.get("EP_TRAIN_SPAWN") else "fork")
    batches = _batches(files, text_key, state["consumed"], strict)
    pool = ctx.Pool(workers, _init_worker, (tokenizer, opts)) if workers > 1 else None
    if pool is None:
        _init_worker(tokenizer, opts)
    results = pool.imap(_encode, batches, chunksize=1) if pool else map(_encode, batches)
    t0, tokens_seen = time.monotonic(), 0
    try:
        for end_pos, lengths, tokens, is_val, bad in results:
            for kind, events in bad.items():
                for where, n in events:
                    report.add(kind, where, n)
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            for split, mask in (("train", ~is_val), ("val", is_val)):
                if mask.any():
                    sel = np.concatenate([tokens[s:s + n] for s, n in zip(starts[mask], lengths[mask])])
                    writer(split).add(lengths[mask], sel)
            tokens_seen += int(lengths.sum())
            bar.update(len(lengths))
            bar.set_postfix(tok_s=f"{tokens_seen / max(time.monotonic() - t0, 1e-9):,.0f}")
            if writers["train"] is not None and writers["train"].nbytes >= cap:
                roll(end_pos)
            last = end_pos
        roll(last)
    except BaseException:
        for w in writers.values():
            if w is not None:
                w.abort()
        raise
    finally:
        bar.close()
        if pool:
            pool.terminate()
    manifest = {
        "format": "megatron-mmidx-v1", "dtype": np_dtype.name, "append_bos": append_bos, "text_key": text_key,
        "tokenizer": {**state["tokenizer"], "vocab_size": vocab, "eos_id": eos, "bos_id": sp.bos_id()},
        "val_fraction": val_fraction, "sources": [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in files],
        "splits": {s: {"shards": state["shards"][s], "documents": sum(x["documents"] for x in state["shards"][s]),
                       "tokens": sum(x["tokens"] for x in state["shards"][s])} for s in ("train", "val")},
        "report": report.__dict__,
    }
    if manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 0:
        raise ValueError(f"no documents found in {len(files)} file(s); check --text-key ({text_key!r}) "
                         f"and the report: {report.examples[:3]}")
    _atomic_json(manifest_path, manifest)
    state_path.unlink(missing_ok=True)
    return manifest


def merge(output: str) -> dict:
    """Write one manifest over ``part_*`` folders made by ``build --num-tasks``."""
    root = Path(output)
    parts = sorted(p for p in root.glob("part_*") if p.is_dir())
    if not parts:
        raise ValueError(f"{output!r} has no part_* folders; run build with --num-tasks/--task-id first")
    manifests = []
    for p in parts:
        if not (p / "manifest.json").is_file():
            raise ValueError(f"{str(p)!r} has no manifest.json: that task did not finish; rerun it")
        manifests.append(json.loads((p / "manifest.json").read_text()))
    shas = {m["tokenizer"]["sha256"] for m in manifests}
    if len(shas) != 1:
        raise ValueError(f"parts were built with different tokenizers ({len(shas)} distinct); rebuild them")
    merged = dict(manifests[0])
    merged["sources"] = [s for m in manifests for s in m["sources"]]
    merged["splits"] = {}
    for split in ("train", "val"):
        shards = [{**s, "prefix": f"{p.name}/{s['prefix']}"} for p, m in zip(parts, manifests)
                  for s in m["splits"][split]["shards"]]
        merged["splits"][split] = {"shards": shards, "documents": sum(s["documents"] for s in shards),
                                   "tokens": sum(s["tokens"] for s in shards)}
    merged["report"] = {k: sum(m["report"][k] for m in manifests) for k in Report().__dict__ if k != "examples"}
    merged["report"]["examples"] = [e for m in manifests for e in m["report"]["examples"]][:MAX_EXAMPLES]
    _atomic_json(root / "manifest.json", merged)
    return merged


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{str(path)!r} not found; --data_dir must be the output of data_prep_tool build "
                         "(after merge, for --num-tasks builds)")
    return json.loads(path.read_text())


def inspect(data_dir: str, samples: int = 3, tokenizer: str | None = None, verify: bool = True) -> tuple[str, bool]:
    """Human-readable summary; returns (text, checksums_ok)."""
    m = load_manifest(data_dir)
    lines = [f"{data_dir}: dtype {m['dtype']}, tokenizer {m['tokenizer']['path']} "
             f"(vocab {m['tokenizer']['vocab_size']}, sha256 {m['tokenizer']['sha256'][:12]}...)"]
    ok = True
    for split, info in m["splits"].items():
        lines.append(f"{split}: {len(info['shards'])} shard(s), {info['documents']:,} documents, "
                     f"{info['tokens']:,} tokens")
        lengths = []
        for s in info["shards"]:
            prefix = Path(data_dir) / s["prefix"]
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
            lines.append(f"  document length: min {all_len.min()}, median {int(np.median(all_len))}, "
                         f"max {all_len.max()}")
            for n, lo, hi in zip(hist, edges[:-1], edges[1:]):
                lines.append(f"  {lo:>8}-{hi:<8} {'#' * int(40 * n / max(hist.max(), 1)):<40} {n}")
    if verify:
        lines.append("checksums: " + ("OK" if ok else "MISMATCH"))
    train = m["splits"]["train"]["shards"]
    if samples and train:
        sp = load_tokenizer(tokenizer or m["tokenizer"]["path"])
        shard = IndexedShard(Path(data_dir) / train[0]["prefix"])
        for i in range(min(samples, len(shard))):
            text = sp.decode(shard[i].tolist())
            lines.append(f"--- sample {i} ({len(shard[i])} tokens) ---\n{text[:400]}")
    r = m["report"]
    lines.append(f"report: malformed json {r['malformed_json']}, missing text key {r['missing_text_key']}, "
                 f"empty documents {r['empty_documents']}, replaced characters {r['replaced_characters']}")
    return "\n".join(lines), ok
