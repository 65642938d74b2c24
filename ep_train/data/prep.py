"""``data_prep_tool build`` / ``merge`` / ``inspect``: local text -> tokenized Megatron shards + manifest.

Pipeline: input files (sorted) -> a stream of documents (parquet and arrow through HF ``datasets`` local
loaders; JSON lines parsed line by line and JSON arrays element by element (``_json_array``), so a malformed
row can be reported by file and line; plain text read directly, one document per file, see ``_text_documents``;
a large one is tokenized in pieces cut after a newline, see ``_text_parts``)
-> batches encoded by N worker processes (one sentencepiece load per worker, ``imap`` keeps order, so
the bytes do not depend on N) -> EOS per document -> train/val by a stable hash of the text ->
shards rolled at a size cap. After each roll ``progress.json`` records how far the input stream got,
so a rerun after an interruption resumes there and produces the same bytes. ``progress.json`` and
``manifest.json`` carry the build's key (inputs, tokenizer, options; see ``resume.py``): a build into a
folder holding another build is refused instead of continuing or mixing it.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import itertools
import json
import math
import os
import re
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np

from ep_train.data import resume
from ep_train.data.resume import atomic_json as _atomic_json
from ep_train.data.shards import IndexedShard, ShardWriter, sha256_file, token_dtype
from ep_train.data.tokenizer import load_tokenizer, splits_at_newlines
from ep_train.data.verify import inspect, load_manifest  # noqa: F401  (re-exported: cli, older callers)

TEXT_SUFFIXES = (".txt", ".txt.gz", ".md", ".py", ".rst")
JSON_SUFFIXES = resume.JSON_SUFFIXES
TABLE_SUFFIXES = (".parquet", ".arrow")
BATCH_DOCS = 64  # a batch closes at this many documents or BATCH_CHARS characters, whichever comes first
BATCH_CHARS = 1 << 18
TEXT_GROUP = 512  # plain-text files per datasets call
MAX_EXAMPLES = 20
SNIFF_BYTES = 8192  # head of a text/JSON-lines file looked at to tell binary files from text
BINARY_BAD_SHARE = 0.3  # share of undecodable bytes in that head above which a file is taken for binary
# A plain-text file larger than this (on disk) is read and tokenized in pieces of about PART_CHARS characters,
# each ending just after a newline, when the tokenizer splits at newlines (tokenizer.splits_at_newlines):
# whole, tokenizing took ~50x the file's size in memory. Smaller files stay one piece (output unchanged).
LARGE_TEXT_BYTES = 16 << 20
# sentencepiece encodes short inputs faster (measured on stdlib text: 2.6M tokens/s at 16 K characters, 1.8M
# at 256 K), and a piece of 16 K is the size of a typical document here
PART_CHARS = 1 << 14
LONG_LINE_CHARS = 1 << 22  # a piece (one line) longer than this is said: its tokenization is not bounded
READ_BYTES = 1 << 16  # read size while streaming a large file (see _decoded_blocks)
IN_FLIGHT = 4  # batches per worker read ahead of the workers (bounds the main process's memory)
# Local files only: without these, every load_dataset call asks the Hub (a network round trip per file).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, globs and folders -> sorted, de-duplicated list of supported files.

    A file reached twice (given under two spellings: relative and absolute, with "..", through a symlink, or
    inside a folder also given) is kept once, under the first spelling met: it would be tokenized twice."""
    out: dict[Path, Path] = {}  # resolved path -> the first spelling met

    def add(path: Path) -> None:
        out.setdefault(path.resolve(), path)

    for item in inputs:
        matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))] or [Path(item)]
        for m in matches:
            if m.is_dir():
                for p in sorted(m.rglob("*")):  # sorted: which spelling is met first must not depend on the disk
                    if p.is_file() and p.name.endswith(TEXT_SUFFIXES + JSON_SUFFIXES + TABLE_SUFFIXES):
                        add(p)
            elif m.is_file():
                if not m.name.endswith(TEXT_SUFFIXES + JSON_SUFFIXES + TABLE_SUFFIXES):
                    raise ValueError(f"--input {str(m)!r}: unsupported file type; use .txt, .jsonl/.json(.gz), "
                                     ".parquet or .arrow")
                add(m)
            else:
                raise ValueError(f"--input {item!r} matches no file or folder")
    if not out:
        raise ValueError(f"--input {inputs} holds no .txt/.jsonl/.json/.parquet/.arrow files")
    return sorted(out.values())


@dataclass
class Report:
    """Bad input, counted; the first examples keep file and line."""

    malformed_json: int = 0
    missing_text_key: int = 0
    empty_documents: int = 0
    replaced_characters: int = 0
    binary_files: int = 0
    unreadable_files: int = 0  # truncated or corrupt (a cut-off .gz, a broken parquet footer): read up to there
    examples: list[str] = field(default_factory=list)

    def add(self, kind: str, where: str, n: int = 1) -> None:
        setattr(self, kind, getattr(self, kind) + n)
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{kind}: {where}")


class BadInput(ValueError):
    pass


class Part(NamedTuple):
    """A piece of a large document: tokenized alone, EOS only after the last piece, BOS only before the
    first; ``unit`` is the whole document's ``_hash_unit`` (its train/validation split)."""

    text: str
    first: bool
    last: bool
    unit: float


_replaced = 0


def _count_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    global _replaced
    _replaced += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("ep_train_count_replace", _count_replace)


def binary_reason(head: bytes) -> str | None:
    """Why the first bytes of a file look binary (None: text). Text never holds NUL bytes (UTF-16 does,
    and is not supported either); legacy 8-bit text has a few undecodable bytes, binaries mostly them."""
    if b"\x00" in head:
        return f"NUL bytes in the first {len(head):,} bytes"
    # undecodable bytes become lone surrogates U+DC80..U+DCFF under surrogateescape; a multi-byte
    # character cut at the end of the head adds at most 3, irrelevant against the threshold
    text = head.decode("utf-8", errors="surrogateescape")
    bad = sum(1 for c in text if "\udc80" <= c <= "\udcff")
    if head and bad / len(head) > BINARY_BAD_SHARE:
        return f"{bad / len(head):.0%} of the first {len(head):,} bytes are not UTF-8"
    return None


def _binary_event(path: Path, head: bytes) -> tuple[str, Any, str] | None:
    why = binary_reason(head)
    return None if why is None else ("binary_files", None, f"{path}: binary file ({why}), not tokenized")


SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's "\ud83d" alone (an emoji cut in half): no UTF-8 for it
BOM = b"\xef\xbb\xbf"


def _clean_text(text: str, where: str) -> Iterator[tuple[str, Any, str]]:
    """('replaced_characters', n, where) if ``text`` holds lone surrogates (each becomes U+FFFD: the
    tokenizer cannot take them), then ('doc', text, where)."""
    if not text.isascii() and SURROGATE.search(text):
        text, n = SURROGATE.subn("\ufffd", text)
        yield "replaced_characters", n, where
    yield "doc", text, where


def _unreadable(path: Path, e: BaseException) -> tuple[str, None, str]:
    msg = (str(e).strip().splitlines() or [""])[0][:200]
    return ("unreadable_files", None, f"{path}: could not be read to the end ({type(e).__name__}: {msg}); it is "
            "truncated, corrupt or not what its name says (re-download or re-encode it)")


def _documents(path: Path, text_key: str) -> Iterator[tuple[str, Any, str]]:
    """Yield ('doc', text, where) or (kind, None, where) for bad rows, in file order. A file that breaks off
    (a cut-off .gz, a corrupt parquet) gives its documents up to there, then one 'unreadable_files' event."""
    try:
        yield from _documents_of(path, text_key)
    except (OSError, EOFError, zlib.error, ValueError) as e:  # ValueError: pyarrow's ArrowInvalid, json's
        yield _unreadable(path, e)


def _documents_of(path: Path, text_key: str) -> Iterator[tuple[str, Any, str]]:
    global _replaced
    name = path.name
    if name.endswith(JSON_SUFFIXES):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
        if (event := _binary_event(path, head)) is not None:
            yield event
            return
        start = head.removeprefix(BOM).lstrip()
        if start.startswith(b"["):
            yield from _json_array(path, text_key)
            return
        if start.split(b"\n", 1)[0].strip() == b"{":
            # a lone "{" is never a JSON-lines row: this is one object spread over lines (json.dumps(indent=..),
            # jq's default output); read as JSON lines, every one of its lines would count as a malformed row
            yield ("malformed_json", None, f"{path}:1: neither JSON lines (one object per line) nor a JSON array: "
                   "it holds a JSON object spread over several lines; write one object per line (e.g. jq -c . "
                   f"{path.name} > rows.jsonl) or wrap the objects in one array [{{...}}, ...]")
            return
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1:
                    raw = raw.removeprefix(BOM)  # a UTF-8 byte-order mark is not part of the first row
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                _replaced = 0
                line = raw.decode("utf-8", errors="ep_train_count_replace")
                if _replaced:
                    yield "replaced_characters", _replaced, where
                yield from _json_row(line, text_key, where)
        return
    if name.endswith(".parquet"):
        # pyarrow's reader, batch by batch: datasets' streaming parquet reader sized its batches by row group 0
        # and failed on a file whose first group is empty (every row lost, the file reported corrupt)
        import pyarrow.parquet as pq

        rows: Iterable[dict[str, Any]] = (row for batch in pq.ParquetFile(path).iter_batches(batch_size=1024)
                                          for row in batch.to_pylist())
    else:
        from datasets import load_dataset  # imported here: slow import, only needed for this format

        rows = load_dataset("arrow", data_files=[str(path)], split="train", streaming=True)
    for i, row in enumerate(rows):
        where = f"{path}:row {i}"
        if (problem := _not_text(row, text_key)) is not None:
            yield "missing_text_key", None, f"{where}: {problem}"
            continue
        yield from _clean_text(row[text_key], where)


def _json_row(text: str, text_key: str, where: str) -> Iterator[tuple[str, Any, str]]:
    """One JSON row (a JSON line, an element of a JSON array) -> its events."""
    try:
        row = json.loads(text)
    # not only JSONDecodeError: an integer of over 4,300 digits raises a plain ValueError, a deeply nested
    # row RecursionError; either is one bad row, not the end of the file (or of the build)
    except (ValueError, RecursionError) as e:
        yield "malformed_json", None, f"{where}: {_json_problem(e)}"
        return
    if (problem := _not_text(row, text_key)) is not None:
        yield "missing_text_key", None, f"{where}: {problem}"
        return
    yield from _clean_text(row[text_key], where)


def _json_problem(e: ValueError | RecursionError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return e.msg
    if isinstance(e, RecursionError):
        return "nested too deeply to parse (over ~1,000 levels of arrays/objects)"
    return str(e).split(";")[0]  # drop Python's advice (sys.set_int_max_str_digits): not for a CLI user


# A JSON array is read element by element: each element's extent is found by scanning for brackets and
# strings (below), then the element is parsed alone like a JSON line, so a bad element costs that row only.
# Memory is bounded by the largest element (as for JSON lines, by the longest line); an array whose brackets
# never balance reads the rest of the file as one element. Parsing the whole array at once (what HF datasets'
# json loader did) holds the whole file and several times its size in Python objects, and one bad row made
# the loader turn every row into its JSON-encoded text.
_ARRAY_TOKEN = re.compile(rb'[\[\]{},"]')  # bytes: UTF-8's multi-byte characters never hold an ASCII byte
_SPACE = re.compile(rb"[ \t\r\n]*")  # JSON's whitespace


def _element_end(data: bytes, start: int) -> int | None:
    """Index of the ',' or ']' (or a stray '}') that ends the array element starting at ``start``; None
    when ``data`` ends first."""
    depth, i = 0, start
    while m := _ARRAY_TOKEN.search(data, i):
        c, i = m.group(), m.end()
        if c == b'"':
            if (i := _string_end(data, m.start())) < 0:
                return None  # the string goes on past the bytes read so far
        elif c in b"[{":
            depth += 1
        elif depth == 0:
            return m.start()
        elif c in b"]}":
            depth -= 1
    return None


def _string_end(data: bytes, start: int) -> int:
    """Index after the JSON string opening at ``start`` (-1: it goes on past ``data``). A quote ends it unless
    an odd number of backslashes precedes it. bytes.find steps over text at memchr speed: with a regex matching
    the string and its escapes, arrays of source code (an escape every few dozen bytes) were read 4x slower."""
    j = start
    while (j := data.find(b'"', j + 1)) >= 0:
        k = j - 1
        while data[k] == 0x5C:  # a backslash; data[start] is the opening quote, so k stays above start
            k -= 1
        if (j - 1 - k) % 2 == 0:
            return j + 1
    return -1


def _raw_blocks(path: Path) -> Iterator[bytes]:
    with _open_text(path) as f:
        first = True
        while block := f.read(READ_BYTES):
            if first:
                block, first = block.removeprefix(BOM), False
            yield block


class _Blocks:
    """A file's bytes read on demand: ``data[at:]`` is not consumed yet, ``line`` is the line number at ``at``."""

    def __init__(self, path: Path) -> None:
        self.blocks, self.data, self.at, self.line, self.eof = _raw_blocks(path), b"", 0, 1, False

    def more(self) -> bool:
        """Read at least as much again as is unconsumed (a rescan after it then costs linear time in all);
        False at the end of the file."""
        if self.eof:
            return False
        parts, want, got = [self.data[self.at:]], max(2 * (len(self.data) - self.at), 1), 0
        while got < want:
            if (block := next(self.blocks, None)) is None:
                self.eof = True
                break
            parts.append(block)
            got += len(block)
        self.data, self.at = b"".join(parts), 0
        return got > 0

    def advance(self, to: int) -> None:
        self.line += self.data.count(b"\n", self.at, to)
        self.at = to

    def next_byte(self) -> bytes | None:
        """The next non-whitespace byte (moved to, not consumed); None at the end of the file."""
        while True:
            space = _SPACE.match(self.data, self.at)
            assert space is not None  # "*" matches the empty string too
            self.advance(space.end())
            if self.at < len(self.data):
                return self.data[self.at:self.at + 1]
            if not self.more():
                return None


def _json_array(path: Path, text_key: str) -> Iterator[tuple[str, Any, str]]:
    """A file holding one JSON array: each element a row, decoded and checked as a JSON line is; rows are
    located by line and index (``path:line (row i)``)."""
    global _replaced
    f = _Blocks(path)
    f.next_byte()  # the "[" (the caller saw it)
    f.advance(f.at + 1)
    for index in itertools.count():
        if (c := f.next_byte()) is None:
            yield "malformed_json", None, f"{path}:{f.line}: the file ends inside the array (no closing ']')"
            return
        if c == b"]" and index == 0:  # an empty array
            f.advance(f.at + 1)
            break
        where = f"{path}:{f.line} (row {index})"
        while (end := _element_end(f.data, f.at)) is None:
            if not f.more():
                yield "malformed_json", None, f"{where}: the file ends inside this row (no closing ']')"
                return
        _replaced = 0
        element, delimiter = f.data[f.at:end].decode("utf-8", errors="ep_train_count_replace"), f.data[end:end + 1]
        f.advance(end + 1)
        if _replaced:
            yield "replaced_characters", _replaced, where
        yield from _json_row(element, text_key, where)
        if delimiter == b"]":
            break
        if delimiter != b",":  # a stray "}": where the next row would start is unknown
            yield "malformed_json", None, f"{where}: unmatched '}}' after this row; the rest of the file is not read " \
                "(fix the file's brackets)"
            return
    if f.next_byte() is not None:
        yield "malformed_json", None, f"{path}:{f.line}: data after the array's closing ']' is not read (a .json " \
            "file holds one array, or JSON lines: one object per line)"


def _not_text(row: Any, key: str) -> str | None:
    """Why a row holds no text under ``key`` (None: it does), naming the type found."""
    if not isinstance(row, dict):
        return f"row is a {type(row).__name__}, not an object with a string field {key!r}"
    if key not in row:
        return f"no string field {key!r} (fields: {sorted(row)[:5]}; see --text-key)"
    if not isinstance(row[key], str):
        return f"field {key!r} is {type(row[key]).__name__}, not a string"
    return None


def _text_documents(paths: list[Path], in_pieces: bool = False) -> Iterator[tuple[str, Any, str]]:
    """Plain-text files, one document each; with ``in_pieces``, a file over ``LARGE_TEXT_BYTES`` comes as
    ('part', Part, where) events (``_text_parts``).

    Read here rather than through ``datasets``' text loader: with one document per file the loader
    only adds per-file set-up (fsspec, an Arrow table per file), which measured as a third of the
    build's time on the standard library (bench/data_prep.py), and it cannot count the bytes it
    replaces. Decoding here replaces and counts undecodable bytes in the same pass.
    """
    global _replaced
    for path in paths:
        _replaced = 0
        try:
            with _open_text(path) as f:
                head = f.read(SNIFF_BYTES)
                if (event := _binary_event(path, head)) is not None:
                    yield event  # the rest of the file is never read
                    continue
                parts = in_pieces and _text_size(path) > LARGE_TEXT_BYTES
                if not parts:
                    text = (head + f.read()).removeprefix(BOM).decode("utf-8", errors="ep_train_count_replace")
        except (OSError, EOFError, zlib.error) as e:  # a cut-off or mislabelled .gz: its document is not whole
            yield _unreadable(path, e)
            continue
        if parts:
            yield from _text_parts(path)
            continue
        if _replaced:
            yield "replaced_characters", _replaced, str(path)
        yield "doc", text, str(path)


def _open_text(path: Path) -> Any:
    return (gzip.open if path.name.endswith(".gz") else open)(path, "rb")


def _text_size(path: Path) -> int:
    """Bytes of text in a plain-text file: for a .gz, its trailer's size field (the size mod 2^32; the
    compressed size where larger) instead of the compressed size."""
    size = path.stat().st_size
    if path.name.endswith(".gz") and size >= 4:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            size = max(size, int.from_bytes(f.read(4), "little"))
    return size


def _decoded_blocks(path: Path) -> Iterator[str]:
    """The file's text as ``_text_documents`` decodes it (BOM dropped, bad bytes replaced and counted in
    ``_replaced``), in blocks of about READ_BYTES; memory bounded whatever the file's size. Small blocks:
    decoding 1 MiB blocks grew this process's heap with the bytes read (glibc raises its mmap threshold
    after the first freed large block; measured 400 MiB after 500 MB), 64 KiB ones stay on a reused heap."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ep_train_count_replace")
    with _open_text(path) as f:
        first = True
        while block := f.read(READ_BYTES):
            if first:
                block, first = block.removeprefix(BOM), False
            yield decoder.decode(block)
        yield decoder.decode(b"", final=True)


def _text_parts(path: Path) -> Iterator[tuple[str, Any, str]]:
    """A large plain-text file as one document in pieces, read twice: first for the document's split
    (the hash of its whole text, as ``_hash_unit``), whether it is blank, and the bytes replaced; then
    for its pieces, each ending just after a newline (a line longer than PART_CHARS stays whole in its
    piece). Reading twice costs far less than tokenizing; memory stays bounded."""
    global _replaced
    _replaced, digest, blank = 0, hashlib.sha1(), True
    try:
        for text in _decoded_blocks(path):
            digest.update(text.encode("utf-8", "surrogatepass"))
            blank = blank and (not text or text.isspace())
    except (OSError, EOFError, zlib.error) as e:
        yield _unreadable(path, e)
        return
    if _replaced:
        yield "replaced_characters", _replaced, str(path)
    if blank:
        yield "doc", "", str(path)  # counted as an empty document, as a small blank file is
        return
    unit = _unit_of(digest.digest())
    pending: str | None = None  # a piece is sent once the next one exists: only then is it known not last
    buf, index, again, longest = "", 0, hashlib.sha1(), 0
    try:
        open_line = False  # buf holds no newline at all (a line longer than a piece): look in new text only
        for text in _decoded_blocks(path):
            again.update(text.encode("utf-8", "surrogatepass"))
            buf += text
            if open_line and "\n" not in text:
                continue
            open_line = False
            while len(buf) >= PART_CHARS:
                cut = buf.rfind("\n", 0, PART_CHARS) + 1 or buf.find("\n", PART_CHARS) + 1
                if not cut:
                    open_line = True
                    break
                if pending is not None:
                    yield "part", Part(pending, index == 0, False, unit), f"{path} (piece {index})"
                    index += 1
                pending, buf = buf[:cut], buf[cut:]
                longest = max(longest, cut)
    except (OSError, EOFError, zlib.error) as e:  # it read to the end a moment ago: changed while building
        raise BadInput(f"{path}: could not be read a second time ({type(e).__name__}: {e}); it changed during "
                       "the build: leave inputs alone while building, then rerun") from e
    if again.digest() != digest.digest():  # the split and the pieces must come from the same text
        raise BadInput(f"{path}: changed while the build read it (its text differs between two reads); leave "
                       "inputs alone while building, then rerun")
    pieces = [t for t in (pending, buf) if t]
    longest = max([longest, *map(len, pieces)])
    for i, piece in enumerate(pieces):
        yield "part", Part(piece, index == 0, i == len(pieces) - 1, unit), f"{path} (piece {index})"
        index += 1
    if longest > LONG_LINE_CHARS:  # the bounded memory of pieces holds only where the text has newlines
        print(f"warning: {path}: a line of {longest:,} characters (no newline to cut at) was tokenized as one piece; "
              "sentencepiece needs tens of bytes per character of it (about 0.9 GB for 20 M measured): split such "
              "text into lines", file=sys.stderr, flush=True)


# ---- worker side -------------------------------------------------------------------------------
_sp = None
_opts: dict[str, Any] = {}


def _init_worker(model_path: str, opts: dict[str, Any]) -> None:
    global _sp, _opts
    _sp, _opts = load_tokenizer(model_path), opts  # one tokenizer load per worker


def _encode(batch: tuple[int, list[str | Part], dict[str, int]]
            ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """-> (end position, lengths [n], tokens, is_val [n], ends [n]: the sequence ends its document, bad)."""
    end_pos, texts, bad = batch
    bos = _opts["append_bos"]
    # sentencepiece appends EOS (and BOS) itself: one list call per (BOS, EOS) choice, as lists encode on
    # several threads; tokens leave the worker already in the shard dtype
    flags = [(bos, True) if isinstance(t, str) else (bos and t.first, t.last) for t in texts]
    ids: list[list[int]] = [[] for _ in texts]
    for add_bos, add_eos in set(flags):
        where = [i for i, f in enumerate(flags) if f == (add_bos, add_eos)]
        group = [t if isinstance(t, str) else t.text for t in (texts[i] for i in where)]
        for i, out in zip(where, _sp.encode(group, add_bos=add_bos, add_eos=add_eos)):
            ids[i] = out
    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=_opts["dtype"], count=int(lengths.sum()))
    frac = _opts["val_fraction"]
    is_val = np.array([frac > 0 and (_hash_unit(t) if isinstance(t, str) else t.unit) < frac for t in texts],
                      dtype=bool)
    ends = np.array([isinstance(t, str) or t.last for t in texts], dtype=bool)
    return end_pos, lengths, tokens, is_val, ends, bad


def _hash_unit(text: str) -> float:
    """Stable hash of a document in [0, 1): the same document lands in the same split on every run."""
    return _unit_of(hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest())


def _unit_of(sha1: bytes) -> float:
    return int.from_bytes(sha1[:8], "big") / 2.0 ** 64


# ---- main side ---------------------------------------------------------------------------------
def _batches(files: list[Path], text_key: str, skip: int, strict: bool, in_pieces: bool
             ) -> Iterator[tuple[int, list[str | Part], dict]]:
    """Group the document stream into batches; each carries its end position and its bad-row events.
    ``in_pieces``: large plain-text files come in pieces (``_text_parts``)."""
    pos = chars = 0
    texts: list[str | Part] = []
    bad: dict[str, Any] = {}
    groups: list[list[Path]] = []  # runs of consecutive plain-text files are read together
    for path in files:
        is_text = path.name.endswith(TEXT_SUFFIXES)
        if is_text and groups and groups[-1][0].name.endswith(TEXT_SUFFIXES) and len(groups[-1]) < TEXT_GROUP:
            groups[-1].append(path)
        else:
            groups.append([path])
    for group in groups:
        docs = (_text_documents(group, in_pieces) if group[0].name.endswith(TEXT_SUFFIXES)
                else _documents(group[0], text_key))
        for kind, payload, where in docs:
            pos += 1
            if pos <= skip:
                continue
            if kind == "doc" and not payload.strip():
                kind, where = "empty_documents", where
            if kind in ("doc", "part"):
                texts.append(payload)
                chars += len(payload) if kind == "doc" else len(payload.text)
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


def _fixed_mmap_threshold() -> None:
    """Fix glibc's mmap threshold of this process at its initial 128 KiB. The build's main process passes
    ~128 KiB buffers (pickled batches, token arrays) back and forth with the workers; with the threshold's
    dynamic rule (it rises after the first freed large block) they land on the heap and fragment it: measured
    on one text file, the main process grew from 79 MiB (0.54 GB) to 99 MiB (2.15 GB); fixed, it stays near
    50 MiB at the same speed. Workers are left alone (fixed there too, the build ran 16% slower)."""
    from ep_train.sizes import fix_mmap_threshold

    fix_mmap_threshold(128 * 1024)


def check_dtype(vocab: int, dtype: str | None) -> np.dtype:
    """The token dtype for a vocabulary (``None``: Megatron's rule), refusing one too small for it."""
    np_dtype = token_dtype(vocab) if dtype is None else np.dtype(dtype)
    if vocab - 1 > np.iinfo(np_dtype).max:
        raise ValueError(f"--dtype = {np_dtype} cannot hold the tokenizer's vocabulary ({vocab} tokens, max id "
                         f"{vocab - 1} > {np.iinfo(np_dtype).max}); use --dtype int32 or leave it unset")
    return np_dtype


def build(inputs: list[str], tokenizer: str, output: str, workers: int = 1, text_key: str = "text",
          val_fraction: float = 0.0, shard_size_mb: float = 256.0, append_bos: bool = False, strict: bool = False,
          num_tasks: int = 1, task_id: int = 0, dtype: str | None = None, progress: bool = True,
          overwrite: bool = False) -> dict:
    """Tokenize ``inputs`` into shards + manifest.json in ``output``; returns the manifest.

    Resumes an interrupted build of the same inputs, tokenizer and options; refuses (ValueError, nothing
    changed) a folder holding another build, finished or not, unless ``overwrite`` (which first deletes
    that build's files, and only those). Rerunning a finished identical build is a no-op: it returns the
    existing manifest with ``already_built: True`` added (not stored).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction = {val_fraction} is invalid: use a number in [0, 1), e.g. 0.01")
    if not (math.isfinite(shard_size_mb) and shard_size_mb > 0):  # nan/inf: no shard would ever roll over
        raise ValueError(f"--shard-size-mb = {shard_size_mb} is invalid: use a positive finite size, e.g. 256")
    if num_tasks < 1 or not 0 <= task_id < num_tasks:
        raise ValueError(f"--task-id = {task_id} is invalid: use 0 <= task-id < --num-tasks ({num_tasks})")
    if workers < 1:
        raise ValueError(f"--workers = {workers} is invalid: use 1 or more")
    root = Path(output).resolve()
    # Never this tool's own state files (manifest.json, progress.json, inputs.json, of this build or of a
    # --num-tasks part) when --output lies inside an input folder; the user's files there stay inputs.
    every = [f for f in expand_inputs(inputs)
             if not (resume.OWN_FILE.match(f.name) and root in f.resolve().parents)]
    if not every:
        raise ValueError(f"--input {inputs} holds no input files besides this tool's own files in --output "
                         f"{output!r}; pass the corpus")
    if num_tasks > len(every):
        raise ValueError(f"--num-tasks = {num_tasks} is more than the {len(every)} input file(s): each task takes "
                         f"whole files, so a task would have none; use --num-tasks {len(every)} or fewer")
    # a contiguous block of the sorted files per task: merge joins the parts in task order, so the merged token
    # stream is the single build's (every Nth file per task interleaved the files)
    block = slice(task_id * len(every) // num_tasks, (task_id + 1) * len(every) // num_tasks)
    files = every[block]
    sp = load_tokenizer(tokenizer)
    vocab = sp.get_piece_size()
    np_dtype = check_dtype(vocab, dtype)
    eos = sp.eos_id()
    if eos < 0:
        raise ValueError(f"tokenizer {tokenizer!r} has no EOS piece; train it with an eos_id (the default is 2)")
    if append_bos and sp.bos_id() < 0:
        raise ValueError(f"--append-bos: tokenizer {tokenizer!r} has no BOS piece; drop --append-bos")
    tok_sha = sha256_file(tokenizer)
    out = Path(output) if num_tasks == 1 else Path(output) / f"part_{task_id:05d}"
    for folder in (Path(output), out):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--output {output!r}: {str(folder)!r} is a file, not a folder; pass a folder path")
    if num_tasks > 1:
        _refuse_other_root_build(Path(output))
    out.mkdir(parents=True, exist_ok=True)
    state_path, manifest_path = out / resume.PROGRESS, out / resume.MANIFEST
    every_record = resume.input_records(every)  # one stat per file, for the task's list and the corpus digest
    records = every_record[block]
    # Everything that changes the bytes written, batching constants included (a shard rolls at a batch end).
    options = {"val_fraction": val_fraction, "shard_size_mb": shard_size_mb, "append_bos": append_bos,
               "dtype": np_dtype.name, "text_key": text_key, "num_tasks": num_tasks, "task_id": task_id,
               "batch_docs": BATCH_DOCS, "batch_chars": BATCH_CHARS}
    if num_tasks > 1:  # the whole corpus's identity, the same in every task: merge checks the parts share it
        options["corpus_sha256"] = resume.inputs_digest(every_record)
        # parts made before this key (task i took every Nth file) hold other files: refused, never mixed in
        options["task_split"] = resume.TASK_SPLIT
    # over the whole corpus, not this task's files: every --num-tasks part must have the same options
    large = [f for f in every if f.name.endswith(TEXT_SUFFIXES) and _text_size(f) > LARGE_TEXT_BYTES]
    in_pieces = bool(large) and splits_at_newlines(sp)  # pieces exactly when the build key says so
    if in_pieces:  # only then: every other build keeps its key (a finished one stays "done")
        options["text_pieces"] = {"large_text_bytes": LARGE_TEXT_BYTES, "part_chars": PART_CHARS}
    elif large:
        print(f"warning: {len(large)} plain-text file(s) over {LARGE_TEXT_BYTES >> 20} MiB (e.g. {str(large[0])!r}) "
              f"are tokenized whole, which takes ~50x the file's size in memory: tokenizer {tokenizer!r} may join "
              "pieces across newlines, so they cannot be cut there; split such files into documents (one per "
              "JSON line) or use a tokenizer trained by data_prep_tool train-tokenizer", file=sys.stderr)
    key = resume.build_key(records, tok_sha, options)
    action, previous = resume.check_previous(out, key, records, tokenizer, overwrite)
    if action == "done":
        for f in out.glob("valseg_*"):  # a crash between the manifest and the clean-up left them
            if f.is_file() and resume.SHARD_FILE.match(f.name):
                f.unlink()
        return {**previous, "already_built": True}  # type: ignore[dict-item]
    opts = {"append_bos": append_bos, "val_fraction": val_fraction, "dtype": np_dtype.str}
    state: dict[str, Any] = {"tokenizer": {"path": str(Path(tokenizer).resolve()), "sha256": tok_sha},
                             "build_key": key, "consumed": 0, "shards": {"train": [], "val": []},
                             "report": Report().__dict__}
    if action == "resume":
        state = previous  # type: ignore[assignment]
    else:  # the full input list once, and the key before any shard exists: a crash at any point leaves
        _atomic_json(out / resume.INPUTS, records)  # a state that a later build can compare against
        _atomic_json(state_path, state)
    resume.remove_unfinished_shards(out, {s["prefix"] for split in state["shards"].values() for s in split})
    report = Report(**state["report"])
    cap = shard_size_mb * 2 ** 20
    writers: dict[str, ShardWriter | None] = {"train": None, "val": None}

    def writer(split: str) -> ShardWriter:
        if writers[split] is None:
            # Validation is written in segments closed with each training shard (so a resume re-reads at most
            # one training shard's input) and joined into shards of up to the size cap at the end.
            name = "valseg" if split == "val" else split
            writers[split] = ShardWriter(out / f"{name}_{len(state['shards'][split]):05d}", np_dtype)
        return writers[split]  # type: ignore[return-value]

    def roll(consumed: int) -> None:
        for split, w in writers.items():
            if w is not None and w.num_docs:
                state["shards"][split].append(_close_shard(w))
            elif w is not None:
                w.abort()
            writers[split] = None
        state["consumed"], state["report"] = consumed, report.__dict__
        _atomic_json(state_path, state)  # only now do the closed shards count as finished

    from tqdm import tqdm

    bar = tqdm(desc="build", unit="doc", disable=not progress, dynamic_ncols=True)
    ctx = get_context("spawn" if os.environ.get("EP_TRAIN_SPAWN") else "fork")
    batches = _batches(files, text_key, state["consumed"], strict, in_pieces)
    pool = ctx.Pool(workers, _init_worker, (tokenizer, opts)) if workers > 1 else None
    if pool is not None:
        _fixed_mmap_threshold()  # here, after the fork: the workers keep glibc's defaults (they are faster so)
    if pool is None:
        _init_worker(tokenizer, opts)
    slots, stop = threading.Semaphore(IN_FLIGHT * workers), threading.Event()

    def throttled() -> Iterator[tuple[int, list[str | Part], dict]]:
        """The pool's feeder thread takes batches as fast as they are read: without a bound a fast reader
        (plain text) queues the whole corpus in this process's memory ahead of the workers."""
        for batch in batches:
            while not slots.acquire(timeout=0.2):
                if stop.is_set():  # the build is ending: let the pool's feeder thread finish
                    return
            yield batch

    results = pool.imap(_encode, throttled(), chunksize=1) if pool else map(_encode, batches)
    t0, tokens_seen = time.monotonic(), 0
    try:
        for end_pos, lengths, tokens, is_val, ends, bad in results:
            slots.release()
            for kind, events in bad.items():
                for where, n in events:
                    report.add(kind, where, n)
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            for split, mask in (("train", ~is_val), ("val", is_val)):
                if mask.any():
                    sel = np.concatenate([tokens[s:s + n] for s, n in zip(starts[mask], lengths[mask])])
                    writer(split).add(lengths[mask], sel, ends[mask])
            tokens_seen += int(lengths.sum())
            bar.update(int(ends.sum()))
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
        stop.set()
        if pool:
            pool.terminate()
    segments = state["shards"]["val"]
    state["shards"]["val"] = _join_segments(out, segments, cap, np_dtype)
    manifest = {
        "format": "megatron-mmidx-v1", "dtype": np_dtype.name, "append_bos": append_bos, "text_key": text_key,
        "tokenizer": {**state["tokenizer"], "vocab_size": vocab, "eos_id": eos, "bos_id": sp.bos_id()},
        "val_fraction": val_fraction, "build_key": key, "sources": records,
        "splits": {s: {"shards": state["shards"][s], "documents": sum(x["documents"] for x in state["shards"][s]),
                       "tokens": sum(x["tokens"] for x in state["shards"][s])} for s in ("train", "val")},
        "report": report.__dict__,
    }
    # A --num-tasks part without documents (its files all empty, binary or without --text-key) is a finished,
    # empty part; merge fails only if every part is empty. Refused here, merge took the task for unfinished and
    # every rerun of it failed again.
    if manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 0 and num_tasks == 1:
        # no shard was written: drop the state too, so a rerun with fixed inputs is not refused as a resume
        state_path.unlink(missing_ok=True)
        (out / resume.INPUTS).unlink(missing_ok=True)
        names = ", ".join(p.name for p in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise ValueError(f"no documents found in {len(files)} input file(s) ({names}): all empty, binary or "
                         f"without a string field --text-key ({text_key!r}); the report: {report.examples[:3]}")
    _atomic_json(manifest_path, manifest)
    for seg in segments:  # only once the manifest (naming the joined shards) is written
        assert seg["prefix"].startswith("valseg_"), seg  # never a joined shard
        for ext in ("bin", "idx"):
            (out / f"{seg['prefix']}.{ext}").unlink(missing_ok=True)
    state_path.unlink(missing_ok=True)  # the manifest now holds the key and the input list
    (out / resume.INPUTS).unlink(missing_ok=True)
    return manifest


def _join_segments(out: Path, segments: list[dict], cap: float, dtype: np.dtype) -> list[dict]:
    """Validation segments -> shards ``val_00000 ...`` of up to ``cap`` bytes each, documents in order.
    Rerun after a crash, it rewrites the same shards (``ShardWriter`` renames only finished files)."""
    shards: list[dict] = []
    w: ShardWriter | None = None

    for seg in segments:
        part = IndexedShard(out / seg["prefix"])
        if w is not None and w.nbytes and w.nbytes + part.num_tokens * dtype.itemsize > cap:
            shards.append(_close_shard(w))
            w = None
        if w is None:
            w = ShardWriter(out / f"val_{len(shards):05d}", dtype)
        step = 4096  # documents per copy: memory bounded by a few thousand documents, whatever the size
        ends = part.sequence_ends()
        for lo in range(0, len(part), step):
            lengths = part.lengths[lo:lo + step]
            start = int(part.offsets[lo]) // dtype.itemsize
            w.add(lengths, part.tokens[start:start + int(lengths.astype(np.int64).sum())], ends[lo:lo + step])
    if w is not None and w.num_docs:
        shards.append(_close_shard(w))
    return shards


def _close_shard(w: ShardWriter) -> dict:
    """Close ``w``; its manifest entry. Sizes let training start check every shard without reading it
    (verify.py); ``documents`` counts index entries (sequences), ``megatron_documents`` appears where a
    large document's pieces make the two differ."""
    bin_p, idx_p = w.close()
    entry = {"prefix": bin_p.stem, "documents": w.num_docs, "tokens": w.tokens, "bin_sha256": w.bin_sha256,
             "idx_sha256": sha256_file(idx_p), "bin_bytes": bin_p.stat().st_size,
             "idx_bytes": idx_p.stat().st_size, "max_token_id": w.max_token}
    if w.num_documents != w.num_docs:
        entry["megatron_documents"] = w.num_documents
    return entry


def _check_parts(output: str, parts: list[Path], manifests: list[dict]) -> None:
    """The parts must be the tasks 0..N-1 of one ``--num-tasks N`` build with one set of options (inputs,
    tokenizer, every option but the task id): a missing task would leave its files out of the data, a stale
    part of another build would add (or repeat) data, both silently."""
    keys = [m.get("build_key") for m in manifests]
    if any(not isinstance(k, dict) or "options" not in k for k in keys):
        raise ValueError(f"{output!r}: a part's manifest.json has no build key (made by an older data_prep_tool); "
                         "rebuild every task with this one")
    # parts of one older version agree with each other; mixed with newer ones, those holding JSON inputs do not
    versions = sorted({str(key.get("version")) for key in keys})
    stale = [p.name for p, m, key in zip(parts, manifests, keys)
             if not resume.reads_alike(key.get("version"), resume.KEY_VERSION, m.get("sources") or [])]
    if len(versions) > 1 and stale:
        raise ValueError(f"{output!r}: the part_* folders were made by different data_prep_tool versions (build keys "
                         f"{', '.join(versions)}), and {', '.join(stale)} hold(s) JSON inputs, which version "
                         f"{resume.KEY_VERSION} reads differently; rebuild those parts with --overwrite")
    opts = [{k: v for k, v in key["options"].items() if k != "task_id"} for key in keys]
    rest = [{k: v for k, v in key.items() if k not in ("options", "inputs_sha256", "num_inputs", "version")}
            for key in keys]
    if any("corpus_sha256" not in o for o in opts):
        raise ValueError(f"{output!r}: a part's build key does not say which corpus it is a part of (made by an "
                         "older data_prep_tool); rebuild every task with this one")
    if any(o != opts[0] for o in opts) or any(r != rest[0] for r in rest):
        raise ValueError(f"{output!r}: the part_* folders come from builds of different inputs, options or "
                         f"tokenizers ({', '.join(p.name for p in parts)}); remove the stale ones and rerun their "
                         "tasks")
    n = opts[0].get("num_tasks")
    ids = [key["options"].get("task_id") for key in keys]
    named = [int(p.name.removeprefix("part_")) for p in parts]
    if ids != named:
        raise ValueError(f"{output!r}: part folder names {[p.name for p in parts]} do not match the task ids in "
                         f"their manifests {ids}; rebuild them (build --num-tasks N --task-id I)")
    missing = sorted(set(range(n)) - set(ids)) if isinstance(n, int) else []
    extra = sorted(i for i in ids if not isinstance(n, int) or i >= n)
    if missing or extra:
        raise ValueError(f"{output!r}: a --num-tasks {n} build needs parts 0..{n - 1}; "
                         + (f"missing task(s) {missing} (run build --num-tasks {n} --task-id I for each)"
                            if missing else f"stray part(s) {extra} (remove them)") + "; nothing was merged")


def _refuse_other_root_build(root: Path) -> None:
    """``build --num-tasks`` parts and their merge own the root's manifest.json: refuse a root holding a
    single build's or an adopted one (a merge would replace it and leave its shards orphaned)."""
    manifest = root / resume.MANIFEST
    if not manifest.is_file():
        return
    try:
        held = json.loads(manifest.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(manifest)!r} is not a readable manifest ({type(e).__name__}: {e}); it is damaged or "
                         "not this tool's: move it away, or build the tasks into a new folder") from None
    if not isinstance(held, dict) or "merged_from" not in held:
        raise ValueError(f"{str(root)!r} holds another build's manifest.json (a single build or adopted shards): "
                         "merging --num-tasks parts there would replace it and orphan its shards; build the "
                         "tasks into a new folder")


def merge(output: str) -> dict:
    """Write one manifest over ``part_*`` folders made by ``build --num-tasks``."""
    root = Path(output)
    _refuse_other_root_build(root)
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
    _check_parts(output, parts, manifests)
    merged = dict(manifests[0])
    # not one build's key: a later `build` into this root must not take it for task 0's build
    merged.pop("build_key", None)
    merged["merged_from"] = [p.name for p in parts]
    merged["sources"] = [s for m in manifests for s in m["sources"]]
    merged["splits"] = {}
    for split in ("train", "val"):
        shards = [{**s, "prefix": f"{p.name}/{s['prefix']}"} for p, m in zip(parts, manifests)
                  for s in m["splits"][split]["shards"]]
        merged["splits"][split] = {"shards": shards, "documents": sum(s["documents"] for s in shards),
                                   "tokens": sum(s["tokens"] for s in shards)}
    if merged["splits"]["train"]["documents"] + merged["splits"]["val"]["documents"] == 0:
        examples = [e for m in manifests for e in m["report"].get("examples", [])][:3]
        raise ValueError(f"{output!r}: no documents found in any of the {len(parts)} parts' input files "
                         f"({len(merged['sources'])} file(s)): all empty, binary or without a string field --text-key "
                         f"({merged.get('text_key')!r}); the report: {examples}. Nothing was merged: fix the inputs "
                         "(or --text-key) and rebuild every task with --overwrite")
    # .get: parts built before a counter existed (binary_files) still merge
    merged["report"] = {k: sum(m["report"].get(k, 0) for m in manifests) for k in Report().__dict__
                        if k != "examples"}
    merged["report"]["examples"] = [e for m in manifests for e in m["report"].get("examples", [])][:MAX_EXAMPLES]
    _atomic_json(root / "manifest.json", merged)
    return merged
