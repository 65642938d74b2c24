"""`data_prep_tool adopt` on shards written by a Megatron-style writer (written here from the published
format, not with ep-train's writer), then inspected and trained on; bad shards refused by name and position."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from ep_train.data.loader import TokenWindows
from tests.conftest import STDLIB
from tests.e2e.test_data_prep_cli import run

# Megatron-LM core/datasets/indexed_dataset.py: DType codes and the _IndexWriter layout.
MEGATRON_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
                  np.uint16: 8}


def write_megatron(prefix: Path, documents: list[list[list[int]]], dtype: type) -> None:
    """Like IndexedDatasetBuilder: add_item per sequence, end_document after each document's sequences;
    .idx = b'MMIDIDX\\x00\\x00', <Q version 1, <B dtype code, <Q sequence count, <Q document count,
    int32 sequence lengths, int64 sequence byte pointers, int64 document indices (0, then one per end)."""
    lengths, doc_idx, data = [], [0], bytearray()
    for doc in documents:
        for seq in doc:
            data += np.asarray(seq, dtype=dtype).tobytes()
            lengths.append(len(seq))
        doc_idx.append(len(lengths))
    size = np.dtype(dtype).itemsize
    pointers = np.concatenate([[0], np.cumsum(np.asarray(lengths[:-1], dtype=np.int64) * size)]).astype(np.int64)
    Path(f"{prefix}.bin").write_bytes(bytes(data))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", MEGATRON_CODES[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(np.asarray(lengths, dtype=np.int32).tobytes())
        f.write(pointers.tobytes())
        f.write(np.asarray(doc_idx, dtype=np.int64).tobytes())


def _documents(sp: spm.SentencePieceProcessor, files: list[Path], eod_every: int) -> tuple[list, int]:
    """Sentence-split documents (one sequence per paragraph, like preprocess_data.py --split-sentences), EOS
    appended to all but every ``eod_every``-th document. Returns (documents, how many lack EOS)."""
    docs, missing = [], 0
    for i, f in enumerate(files):
        paras = [p for p in f.read_text().split("\n\n") if p.strip()]
        seqs = [sp.encode(p) for p in paras]
        if i % eod_every:
            seqs[-1] = seqs[-1] + [sp.eos_id()]
        else:
            missing += 1
        docs.append(seqs)
    return docs, missing


@pytest.fixture(scope="module")
def foreign(tokenizer, tmp_path_factory) -> tuple[Path, int, np.ndarray]:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    out = tmp_path_factory.mktemp("megatron")
    (out / "web").mkdir()
    train_docs, miss1 = _documents(sp, sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py")), 3)
    val_docs, miss2 = _documents(sp, sorted((STDLIB / "html").glob("*.py")), 3)
    write_megatron(out / "web" / "web_text_document", train_docs, np.int32)
    write_megatron(out / "web_valid_text_document", val_docs, np.int32)
    stream = np.concatenate([np.asarray(seq) for doc in train_docs for seq in doc])  # what training reads
    return out, miss1 + miss2, stream


def test_adopted_shards_are_read_inspected_and_trained_on(foreign, tokenizer, tmp_path) -> None:
    folder, missing_eos, stream = foreign
    p = run("adopt", str(folder), "--tokenizer", str(tokenizer), "--val", "*valid*")
    assert f"warning: {missing_eos:,} of" in p.stdout and "do not end with EOS" in p.stdout
    man = json.loads((folder / "manifest.json").read_text())
    assert man["dtype"] == "int32" and [s["prefix"] for s in man["splits"]["train"]["shards"]] == \
        ["web/web_text_document"]
    assert [s["prefix"] for s in man["splits"]["val"]["shards"]] == ["web_valid_text_document"]
    assert man["adopted"]["documents_without_eos"] == missing_eos
    w = TokenWindows(folder, "train", 32, tokenizer=tokenizer)  # the trainer's reader, tokenizer checked
    assert w.total_tokens == len(stream)
    assert w.window(3).tolist() == stream[96:129].tolist()

    p = run("inspect", str(folder), "--samples", "1")
    assert "checksums: OK" in p.stdout and "train: 1 shard(s)" in p.stdout
    seqs = man["splits"]["train"]["documents"]  # index entries: sequences, several per document here
    assert f"documents in {seqs:,} sequences" in p.stdout and "sequence length:" in p.stdout

    from tests.distributed.test_trainer import train

    out = train(tmp_path / "run", folder, 2, "--ep_size", "2", "--max_steps", "2", "--warmup_steps", "1",
                "--eval_interval", "2", "--eval_batches", "1")
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2] and any("val_loss" in r for r in recs), out

    # adopt again (same folder): its own manifest is replaced, not refused
    run("adopt", str(folder), "--tokenizer", str(tokenizer), "--val", "*valid*")
    assert man["append_bos"] is False  # no document starts with BOS here


def test_adopt_records_bos_when_every_document_starts_with_it(tokenizer, tmp_path) -> None:
    """Megatron's Llama tokenizer puts BOS before every document by default: the manifest says so, so prompts
    and exports add it too (it was always recorded false); BOS on only some documents is named, not assumed."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    docs, _ = _documents(sp, sorted((STDLIB / "json").glob("*.py")), 2)
    with_bos = [[[sp.bos_id()] + doc[0], *doc[1:]] for doc in docs]
    (tmp_path / "all").mkdir()
    write_megatron(tmp_path / "all" / "text_document", with_bos, np.int32)
    run("adopt", str(tmp_path / "all"), "--tokenizer", str(tokenizer))
    assert json.loads((tmp_path / "all" / "manifest.json").read_text())["append_bos"] is True
    (tmp_path / "some").mkdir()
    write_megatron(tmp_path / "some" / "text_document", with_bos[:2] + docs[2:], np.int32)
    p = run("adopt", str(tmp_path / "some"), "--tokenizer", str(tokenizer))
    assert f"warning: 2 of {len(docs)} documents start with BOS" in p.stdout, p.stdout
    assert json.loads((tmp_path / "some" / "manifest.json").read_text())["append_bos"] is False


def test_adopt_refuses_bad_shards_by_name_and_position(tokenizer, built, tmp_path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    bad = tmp_path / "bad"
    bad.mkdir()
    docs = [[sp.encode("def f():\n    return 1") + [sp.eos_id()]], [[5, 6, 7, sp.get_piece_size() + 4, 8]]]
    write_megatron(bad / "part", docs, np.uint16)
    p = run("adopt", str(bad), "--tokenizer", str(tokenizer), check=False)
    first = len(docs[0][0])
    assert p.returncode == 2 and not (bad / "manifest.json").exists()
    assert f"part.bin: token id {sp.get_piece_size() + 4} at token position {first + 3} (document 1)" in p.stderr

    nested = tmp_path / "nested"  # a folder holding its own build below is skipped, not mixed in
    nested.mkdir()
    write_megatron(nested / "mine", [[sp.encode("x = 1") + [sp.eos_id()]]], np.uint16)
    shutil.copytree(built, nested / "a_build")
    p = run("adopt", str(nested), "--tokenizer", str(tokenizer), "--val", "nothing*")
    man = json.loads((nested / "manifest.json").read_text())
    assert [s["prefix"] for s in man["splits"]["train"]["shards"]] == ["mine"] and not man["splits"]["val"]["shards"]
    assert "skipping 1 folder(s) holding their own build" in p.stdout and "--val 'nothing*' matches no" in p.stdout

    small = tmp_path / "small"  # uint8 cannot hold a 1,000-piece vocabulary
    small.mkdir()
    write_megatron(small / "x", [[[1, 2, 3]]], np.uint8)
    p = run("adopt", str(small), "--tokenizer", str(tokenizer), check=False)
    assert p.returncode == 2 and "stores tokens as uint8 (max 255)" in p.stderr

    p = run("adopt", str(built), "--tokenizer", str(tokenizer), check=False)  # an ep-train build: not replaced
    assert p.returncode == 2 and "was not written by data_prep_tool adopt" in p.stderr

    p = run("adopt", str(tmp_path / "nothing"), "--tokenizer", str(tokenizer), check=False)
    assert p.returncode == 2 and "is not a folder" in p.stderr
