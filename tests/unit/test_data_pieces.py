"""Large plain-text files are tokenized in pieces cut after newlines: the same tokens as the whole file.

The reference for every check is sentencepiece on the whole decoded text (what the build did before pieces
existed), the document's split from a hash computed here, and the shards read with this file's own reader.
The thresholds are lowered so that a few hundred KB of the standard library make many pieces.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from ep_train.data import prep
from ep_train.data.shards import IndexedShard, ShardWriter
from ep_train.data.tokenizer import document_lines, splits_at_newlines, train_tokenizer
from tests.conftest import STDLIB

BOM = b"\xef\xbb\xbf"


@pytest.fixture
def small_pieces(monkeypatch) -> None:
    monkeypatch.setattr(prep, "LARGE_TEXT_BYTES", 20_000)
    monkeypatch.setattr(prep, "PART_CHARS", 3_000)
    monkeypatch.setattr(prep, "READ_BYTES", 1_001)  # odd: multi-byte characters straddle the reads


def _raw(files: list[str], extra: bytes = b"") -> bytes:
    """Real text with the edge cases: BOM, an undecodable byte, CRLF, blank lines, non-ASCII, a line longer
    than a piece, no newline at the end."""
    text = b"".join((STDLIB / f).read_bytes() for f in files)
    return (BOM + text + b"caf\xc3\xa9 \xe2\x98\x83 \xff bad byte\r\n\r\n\n" + b"x" * 7_000 + b"\n"
            + "ünï ☃ ".encode() * 2_000 + extra)


def _reference(sp: spm.SentencePieceProcessor, raw: bytes) -> tuple[list[int], float, str]:
    text = raw.removeprefix(BOM).decode("utf-8", errors="replace")
    unit = int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2.0 ** 64
    return sp.encode(text, add_eos=True), unit, text


def _read(prefix: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sequence lengths, document index, tokens) from the format's layout."""
    idx = Path(f"{prefix}.idx").read_bytes()
    _, code, n, d = struct.unpack("<QBQQ", idx[9:34])
    sizes = np.frombuffer(idx, np.int32, n, 34)
    docs = np.frombuffer(idx, np.int64, d, 34 + 12 * n)
    return sizes, docs, np.frombuffer(Path(f"{prefix}.bin").read_bytes(), {8: np.uint16, 4: np.int32}[code])


def _split_tokens(out: Path, man: dict, split: str) -> tuple[list[int], list[int], int]:
    """(tokens, document lengths in tokens, sequences) of a split, over its shards in order."""
    tokens, doc_lengths, seqs = [], [], 0
    for s in man["splits"][split]["shards"]:
        sizes, docs, toks = _read(out / s["prefix"])
        assert docs[0] == 0 and docs[-1] == len(sizes) and (np.diff(docs) >= 0).all()
        ends = np.concatenate([[0], np.cumsum(sizes)])
        doc_lengths += [int(ends[b] - ends[a]) for a, b in zip(docs[:-1], docs[1:])]
        tokens += toks.tolist()
        seqs += len(sizes)
    return tokens, doc_lengths, seqs


def test_ep_train_tokenizers_split_at_newlines_and_dummy_prefix_ones_do_not(tokenizer, tmp_path) -> None:
    assert splits_at_newlines(spm.SentencePieceProcessor(model_file=str(tokenizer)))
    files = [str(STDLIB / "json" / "decoder.py"), str(STDLIB / "textwrap.py")]
    llama2 = train_tokenizer(files, 400, str(tmp_path / "l2"), add_dummy_prefix=True)
    assert not splits_at_newlines(spm.SentencePieceProcessor(model_file=str(llama2)))
    clean = train_tokenizer(files, 400, str(tmp_path / "cl"), remove_extra_whitespaces=True)
    assert not splits_at_newlines(spm.SentencePieceProcessor(model_file=str(clean)))
    # without byte fallback a newline is unknown, and sentencepiece joins a run of unknown characters into one
    # <unk>: "\n\n" whole is one token, cut between the newlines two
    bare = spm.SentencePieceProcessor(model_file=str(train_tokenizer(files, 400, str(tmp_path / "nb"),
                                                                      byte_fallback=False)))
    assert bare.encode("x\n\ny") != bare.encode("x\n") + bare.encode("\ny")
    assert not splits_at_newlines(bare)


def test_large_files_in_pieces_give_the_whole_files_tokens_and_splits(tokenizer, tmp_path, small_pieces) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    raws = {"a.txt": _raw(["json/decoder.py", "json/encoder.py"]), "b.txt": _raw(["textwrap.py"], b"\n"),
            "c.txt": _raw(["json/scanner.py", "json/tool.py"])}
    for name, raw in raws.items():
        (tmp_path / name).write_bytes(raw)
    (tmp_path / "d.txt").write_text("small file, one piece\n")  # under the threshold: as before
    refs = {n: _reference(sp, r) for n, r in raws.items()}
    refs["d.txt"] = _reference(sp, (tmp_path / "d.txt").read_bytes())
    # a fraction that sends at least one large file to each split (checked below), from the reference hashes
    units = sorted(refs[n][1] for n in raws)
    frac = (units[0] + units[1]) / 2
    out = tmp_path / "out"
    man = prep.build([str(tmp_path)], str(tokenizer), str(out), val_fraction=frac, shard_size_mb=0.01,
                     progress=False)
    for split, want_val in (("train", False), ("val", True)):
        names = [n for n in sorted(refs) if (refs[n][1] < frac) == want_val]
        assert any(n in raws for n in names)
        tokens, doc_lengths, seqs = _split_tokens(out, man, split)
        # tokens across shards, whatever the shard cuts: each file's whole encoding, in order
        assert tokens == [t for n in names for t in refs[n][0]], split
        # documents that end inside one shard are the files; the pieces are the sequences
        assert sum(doc_lengths) == len(tokens) and seqs > len(names)
        assert man["splits"][split]["documents"] == seqs
    assert man["report"]["replaced_characters"] == 3  # one undecodable byte in each large file
    assert "text_pieces" in man["build_key"]["options"]


def test_one_shard_holds_a_large_file_as_one_document(tokenizer, tmp_path, small_pieces) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    raw = _raw(["json/decoder.py", "json/encoder.py"])
    (tmp_path / "a.txt").write_bytes(raw)
    out = tmp_path / "out"
    man = prep.build([str(tmp_path / "a.txt")], str(tokenizer), str(out), progress=False)
    [entry] = man["splits"]["train"]["shards"]
    sizes, docs, toks = _read(out / entry["prefix"])
    assert docs.tolist() == [0, len(sizes)] and len(sizes) > 10  # many sequences, one document
    assert entry["documents"] == len(sizes) and entry["megatron_documents"] == 1
    assert toks.tolist() == _reference(sp, raw)[0]
    assert IndexedShard(out / entry["prefix"]).sequence_ends().tolist() == [False] * (len(sizes) - 1) + [True]
    # the pieces are the text cut just after newlines
    text = raw.removeprefix(BOM).decode("utf-8", errors="replace")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    pieces = [sp.decode(toks[a:a + n].tolist()) for a, n in zip(starts, sizes)]
    assert "".join(pieces) == text and all(piece.endswith("\n") for piece in pieces[:-1])


def test_build_resumed_inside_a_large_file_writes_the_same_bytes(tokenizer, tmp_path, small_pieces,
                                                                 monkeypatch) -> None:
    monkeypatch.setattr(prep, "BATCH_DOCS", 8)  # batches (and so shard rolls) of 8 pieces
    (tmp_path / "a.txt").write_bytes(_raw(["json/decoder.py", "json/encoder.py", "textwrap.py"]) * 2)
    (tmp_path / "z.jsonl").write_text(json.dumps({"text": "last"}) + "\n{broken\n")
    common = dict(shard_size_mb=0.002, val_fraction=0.0, progress=False)
    ref = prep.build([str(tmp_path / "a.txt"), str(tmp_path / "z.jsonl")], str(tokenizer), str(tmp_path / "ref"),
                     **common)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="malformed json"):  # stops after shards were rolled inside a.txt
        prep.build([str(tmp_path / "a.txt"), str(tmp_path / "z.jsonl")], str(tokenizer), str(out), strict=True,
                   **common)
    assert len(list(out.glob("train_*.idx"))) >= 2
    man = prep.build([str(tmp_path / "a.txt"), str(tmp_path / "z.jsonl")], str(tokenizer), str(out), **common)
    assert man["splits"] == ref["splits"]
    for s in ref["splits"]["train"]["shards"]:
        for ext in ("bin", "idx"):
            assert (out / f"{s['prefix']}.{ext}").read_bytes() == (tmp_path / "ref" / f"{s['prefix']}.{ext}").read_bytes()


def test_a_tokenizer_that_cannot_be_cut_keeps_large_files_whole(tmp_path, small_pieces, capsys) -> None:
    tok = train_tokenizer([str(STDLIB / "json" / "decoder.py"), str(STDLIB / "textwrap.py")], 400,
                          str(tmp_path / "l2"), add_dummy_prefix=True)
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    raw = _raw(["json/decoder.py"])
    (tmp_path / "a.txt").write_bytes(raw)
    man = prep.build([str(tmp_path / "a.txt")], str(tok), str(tmp_path / "out"), progress=False)
    [entry] = man["splits"]["train"]["shards"]
    sizes, docs, toks = _read(tmp_path / "out" / entry["prefix"])
    assert len(sizes) == 1 and toks.tolist() == _reference(sp, raw)[0]
    assert "text_pieces" not in man["build_key"]["options"]
    err = capsys.readouterr().err
    assert "tokenized whole" in err and "a.txt" in err


def test_blank_and_truncated_large_files_are_counted(tokenizer, tmp_path, small_pieces) -> None:
    (tmp_path / "blank.txt").write_text(" \n\t\n" * 10_000)
    good = _raw(["json/decoder.py"])
    packed = gzip.compress(b"".join(f.read_bytes() for f in sorted((STDLIB / "email").glob("*.py"))))
    assert len(packed) > 2 * prep.LARGE_TEXT_BYTES
    (tmp_path / "cut.txt.gz").write_bytes(packed[:len(packed) // 2])  # a download cut in half
    (tmp_path / "good.txt").write_bytes(good)
    man = prep.build([str(tmp_path)], str(tokenizer), str(tmp_path / "out"), progress=False)
    r = man["report"]
    assert r["empty_documents"] == 1 and r["unreadable_files"] == 1, r
    assert any("cut.txt.gz" in e and "could not be read" in e for e in r["examples"])
    assert man["splits"]["train"]["tokens"] == len(_reference(spm.SentencePieceProcessor(
        model_file=str(tokenizer)), good)[0])


def test_tokenizer_training_lines_of_a_large_file_are_the_whole_files(tmp_path, small_pieces) -> None:
    raw = _raw(["json/decoder.py"])
    (tmp_path / "a.txt").write_bytes(raw)
    text = raw.removeprefix(BOM).decode("utf-8", errors="replace")
    assert list(document_lines([str(tmp_path / "a.txt")], "text")) == [ln for ln in text.split("\n") if ln]


def test_shard_writer_records_documents_over_sequences(tmp_path) -> None:
    w = ShardWriter(tmp_path / "s", np.dtype(np.uint16))
    w.add(np.array([2, 3]), np.arange(5), np.array([False, True]))  # one document in two sequences
    w.add(np.array([1]), np.arange(1))  # a whole document
    w.add(np.array([2]), np.arange(2), np.array([False]))  # a document still open at close ends there
    assert (w.num_docs, w.num_documents) == (4, 3)
    w.close()
    shard = IndexedShard(tmp_path / "s")
    assert shard.doc_idx.tolist() == [0, 2, 3, 4]
    assert shard.sequence_ends().tolist() == [False, True, True, True]


def test_array_tasks_with_a_large_file_in_one_task_merge_to_the_single_build(tokenizer, tmp_path,
                                                                            small_pieces) -> None:
    """Every task carries the pieces option when any file of the corpus is large (not only the task holding it):
    merge requires equal options. Five files over three tasks: each task takes a contiguous block of the sorted
    files, so the merged token stream is the single build's, train and validation (with every Nth file per
    task, the merged stream held the files in the order a, d, b, e, c)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(_raw(["json/decoder.py"]))
    (tmp_path / "in" / "b.txt").write_text("small\n")
    (tmp_path / "in" / "c.jsonl").write_text("".join(json.dumps({"text": f"row {i} = {i}\n" * (i + 1)}) + "\n"
                                                     for i in range(40)))
    (tmp_path / "in" / "d.txt").write_bytes((STDLIB / "json" / "encoder.py").read_bytes())
    (tmp_path / "in" / "e.txt").write_bytes((STDLIB / "json" / "scanner.py").read_bytes())
    common = dict(val_fraction=0.2, progress=False)
    single = prep.build([str(tmp_path / "in")], str(tokenizer), str(tmp_path / "one"), **common)
    for task in (0, 1, 2):
        prep.build([str(tmp_path / "in")], str(tokenizer), str(tmp_path / "arr"), num_tasks=3, task_id=task,
                   **common)
    merged = prep.merge(str(tmp_path / "arr"))
    assert [s["path"] for s in merged["sources"]] == [s["path"] for s in single["sources"]]
    for split in ("train", "val"):
        assert merged["splits"][split]["documents"] == single["splits"][split]["documents"] > 0
        got = _split_tokens(tmp_path / "arr", merged, split)
        assert got == _split_tokens(tmp_path / "one", single, split) and len(got[1]) > 1, split


def test_a_large_gz_is_judged_by_its_text_size(tokenizer, tmp_path, small_pieces) -> None:
    raw = _raw(["json/decoder.py"])
    packed = gzip.compress(raw)
    assert len(packed) < prep.LARGE_TEXT_BYTES < len(raw)  # small on disk, large as text
    (tmp_path / "a.txt.gz").write_bytes(packed)
    man = prep.build([str(tmp_path / "a.txt.gz")], str(tokenizer), str(tmp_path / "out"), progress=False)
    [entry] = man["splits"]["train"]["shards"]
    assert entry["documents"] > 1 and entry["megatron_documents"] == 1
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    assert _read(tmp_path / "out" / entry["prefix"])[2].tolist() == _reference(sp, raw)[0]


def test_a_file_that_changes_between_the_two_reads_is_refused(tokenizer, tmp_path, small_pieces,
                                                             monkeypatch) -> None:
    (tmp_path / "a.txt").write_bytes(_raw(["json/decoder.py"]))
    reads = []
    real = prep._decoded_blocks

    def changing(path: Path):
        reads.append(path)
        for i, text in enumerate(real(path)):
            yield text + ("edited\n" if len(reads) == 2 and i == 3 else "")

    monkeypatch.setattr(prep, "_decoded_blocks", changing)
    with pytest.raises(ValueError, match="a.txt: changed while the build read it"):
        prep.build([str(tmp_path / "a.txt")], str(tokenizer), str(tmp_path / "out"), progress=False)
