"""Shards (read back by an independent reader), the build's bad-input handling, and the loader."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from ep_train.data.loader import DistributedBatches, TokenWindows
from ep_train.data.prep import build, check_dtype, expand_inputs
from tests.conftest import CORPUS


def read_megatron(prefix: Path) -> list[np.ndarray]:
    """Independent reader, from the format's layout (not ep_train's reader)."""
    idx = Path(f"{prefix}.idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    version, code, n, d = struct.unpack("<QBQQ", idx[9:34])
    assert version == 1
    dtype = {8: np.uint16, 4: np.int32}[code]
    sizes = np.frombuffer(idx, np.int32, n, 34)
    pointers = np.frombuffer(idx, np.int64, n, 34 + 4 * n)
    docs = np.frombuffer(idx, np.int64, d, 34 + 12 * n)
    assert docs.tolist() == list(range(n + 1))
    data = Path(f"{prefix}.bin").read_bytes()
    return [np.frombuffer(data, dtype, int(s), int(p)) for s, p in zip(sizes, pointers)]


def test_shards_hold_exactly_the_sentencepiece_tokens(built, tokenizer) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["splits"]["val"]["documents"] > 0
    assert len(manifest["splits"]["train"]["shards"]) >= 2  # rolled at the size cap
    docs = []
    for split in ("train", "val"):
        for s in manifest["splits"][split]["shards"]:
            docs += read_megatron(built / s["prefix"])
    files = [p for p in expand_inputs([str(c) for c in CORPUS]) if p.read_text().strip()]
    sources = {p.read_text() for p in files}
    assert len(docs) == len(files)
    seen = set()
    for doc in docs:
        assert doc[-1] == sp.eos_id() and sp.eos_id() not in doc[:-1].tolist()
        text = sp.decode(doc[:-1].tolist())
        assert text in sources  # identity normalisation: decoding gives the file back byte for byte
        assert doc[:-1].tolist() == sp.encode(text)
        seen.add(text)
    assert seen == sources


def test_validation_is_not_cut_with_every_training_shard(built) -> None:
    """Validation segments are closed with each training shard (resume) and joined at the end."""
    manifest = json.loads((built / "manifest.json").read_text())
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert len(train["shards"]) >= 2 and len(val["shards"]) == 1  # val holds far less than one 0.25 MB shard
    assert val["shards"][0]["prefix"] == "val_00000" and val["shards"][0]["documents"] == val["documents"] > 1
    assert not list(built.glob("valseg_*"))


def test_worker_count_does_not_change_bytes(tokenizer, built, tmp_path) -> None:
    build([str(c) for c in CORPUS], str(tokenizer), str(tmp_path), workers=2, val_fraction=0.1,
          shard_size_mb=0.25, progress=False)
    for f in built.iterdir():
        if f.suffix in (".bin", ".idx"):
            assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name


def _jsonl(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = "\n".join(lines) + "\n"
    if gz:
        path.write_bytes(gzip.compress(data.encode()))
    else:
        path.write_text(data)
    return path


def test_bad_rows_are_skipped_counted_and_located(tokenizer, tmp_path) -> None:
    good = json.dumps({"text": "def f(x):\n    return x + 1\n"})
    src = _jsonl(tmp_path / "a.jsonl", [good, "{not json", json.dumps({"body": "no text key"}),
                                        json.dumps({"text": "   "}), good])
    gz = _jsonl(tmp_path / "b.jsonl.gz", [good, "[1, 2"], gz=True)
    bad_bytes = tmp_path / "c.txt"
    bad_bytes.write_bytes(b"caf\xe9 au lait\xff\n")  # latin-1 bytes: not UTF-8
    man = build([str(src), str(gz), str(bad_bytes)], str(tokenizer), str(tmp_path / "out"), progress=False)
    r = man["report"]
    assert (r["malformed_json"], r["missing_text_key"], r["empty_documents"], r["replaced_characters"]) == (2, 1, 1, 2)
    assert any(f"{src}:2" in e for e in r["examples"]) and any(f"{gz}:2" in e for e in r["examples"])
    assert any(f"{src}:3" in e and "text" in e for e in r["examples"])
    assert man["splits"]["train"]["documents"] == 4  # 3 good json rows + the repaired text file


def test_strict_stops_at_first_bad_line(tokenizer, tmp_path) -> None:
    src = _jsonl(tmp_path / "a.jsonl", [json.dumps({"text": "ok"}), "{oops"])
    with pytest.raises(ValueError, match=rf"malformed json at {src}:2"):
        build([str(src)], str(tokenizer), str(tmp_path / "out"), strict=True, progress=False)


def test_missing_key_everywhere_is_an_error(tokenizer, tmp_path) -> None:
    src = _jsonl(tmp_path / "a.jsonl", [json.dumps({"content": "x"})] * 3)
    with pytest.raises(ValueError, match="--text-key"):
        build([str(src)], str(tokenizer), str(tmp_path / "out"), progress=False)
    man = build([str(src)], str(tokenizer), str(tmp_path / "out2"), text_key="content", progress=False)
    assert man["splits"]["train"]["documents"] == 3


def test_dtype_and_tokenizer_mismatch_errors(tokenizer, built, tmp_path) -> None:
    assert check_dtype(1000, None) == np.uint16 and check_dtype(70000, None) == np.int32
    with pytest.raises(ValueError, match="--dtype = uint16 cannot hold"):
        check_dtype(70000, "uint16")
    other = tmp_path / "other"
    from ep_train.data.tokenizer import train_tokenizer

    with pytest.raises(ValueError, match="--vocab-size 300"):
        train_tokenizer([str(CORPUS[-2])], 300, str(other))
    tok2 = train_tokenizer([str(CORPUS[-2])], 600, str(other))
    with pytest.raises(ValueError, match="another tokenizer"):
        build([str(CORPUS[-1])], str(tok2), str(built), progress=False)
    with pytest.raises(ValueError, match="differs from the one"):
        TokenWindows(built, "train", 16, tokenizer=tok2)
    TokenWindows(built, "train", 16, tokenizer=tokenizer)  # the right one is accepted


def _ids(batches: DistributedBatches) -> list[np.ndarray]:
    return [x.numpy() for x, _ in batches.next()]


def test_loader_resume_reshard_and_epoch_coverage(built) -> None:
    w = TokenWindows(built, "train", 32)
    stream = np.concatenate([np.concatenate(read_megatron(built / s["prefix"]))
                             for s in json.loads((built / "manifest.json").read_text())["splits"]["train"]["shards"]])
    # windows come from the stream with stride seq_len, across shard boundaries
    for i in (0, 1, w.num_windows // 2, w.num_windows - 1):
        assert w.window(i).tolist() == stream[i * 32: i * 32 + 33].tolist()

    g = 8
    straight = DistributedBatches(w, g, 2, 0, 1, seed=3)
    all_steps = [np.concatenate(_ids(straight)) for _ in range(6)]
    resumed = DistributedBatches(w, g, 2, 0, 1, seed=3, consumed_samples=3 * g)
    for step in range(3, 6):
        assert np.array_equal(np.concatenate(_ids(resumed)), all_steps[step])
    # two data-parallel ranks read the same global batch between them
    ranks = [DistributedBatches(w, g, 2, r, 2, seed=3) for r in range(2)]
    for step in range(6):
        both = np.concatenate([np.concatenate(_ids(b)) for b in ranks])
        assert sorted(map(bytes, both)) == sorted(map(bytes, all_steps[step]))
    # within an epoch, every window exactly once
    b = DistributedBatches(w, 1, 1, 0, 1, seed=5)
    firsts = [b.sample_window(s) for s in range(w.num_windows)]
    assert sorted(firsts) == list(range(w.num_windows))
    assert firsts != list(range(w.num_windows))  # shuffled
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        DistributedBatches(w, 6, 4, 0, 1, seed=0)


def test_parquet_arrow_and_json_array_inputs(tokenizer, tmp_path) -> None:
    """The `datasets` local loaders: parquet, arrow (IPC stream) and a JSON array, with --text-key."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [p.read_text() for p in sorted((CORPUS[0]).glob("*.py"))][:4]
    pq.write_table(pa.table({"content": texts[:2]}), tmp_path / "a.parquet")
    with pa.OSFile(str(tmp_path / "b.arrow"), "wb") as sink, pa.ipc.new_stream(sink, pa.schema(
            [("content", pa.string())])) as writer:
        writer.write_table(pa.table({"content": texts[2:3]}))
    (tmp_path / "c.json").write_text(json.dumps([{"content": texts[3]}, {"other": 1}]))
    man = build([str(tmp_path / n) for n in ("a.parquet", "b.arrow", "c.json")], str(tokenizer),
                str(tmp_path / "out"), text_key="content", progress=False)
    assert man["splits"]["train"]["documents"] == 4 and man["report"]["missing_text_key"] == 1
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    docs = read_megatron(tmp_path / "out" / man["splits"]["train"]["shards"][0]["prefix"])
    assert [sp.decode(d[:-1].tolist()) for d in docs] == texts



def test_parquet_with_empty_row_groups_is_read_whole(tokenizer, tmp_path) -> None:
    """A valid parquet whose first row group is empty (common after filtering) gave every row up as a corrupt
    file (datasets sized its batches by row group 0); a parquet of 0 rows is empty, not unreadable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [p.read_text() for p in sorted((CORPUS[0]).glob("*.py"))][:3]
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(tmp_path / "a.parquet", schema) as w:
        w.write_table(pa.table({"text": pa.array([], pa.string())}))  # row group 0: no rows
        w.write_table(pa.table({"text": texts}))
    assert pq.ParquetFile(tmp_path / "a.parquet").metadata.row_group(0).num_rows == 0
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "b.parquet")
    man = build([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], str(tokenizer), str(tmp_path / "out"),
                progress=False, strict=True)
    assert man["report"]["unreadable_files"] == 0
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    docs = read_megatron(tmp_path / "out" / man["splits"]["train"]["shards"][0]["prefix"])
    assert [sp.decode(d[:-1].tolist()) for d in docs] == texts


def test_bad_build_options_and_outputs_are_refused(tokenizer, tmp_path) -> None:
    from ep_train.data.prep import merge

    f = _jsonl(tmp_path / "a.jsonl", [json.dumps({"text": f"a {i}"}) for i in range(5)])
    for size in (float("nan"), float("inf")):  # no shard would roll over, and nan never equals itself on resume
        with pytest.raises(ValueError, match=f"--shard-size-mb = {size} is invalid"):
            build([str(f)], str(tokenizer), str(tmp_path / "o"), shard_size_mb=size, progress=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        build([str(f)], str(tokenizer), str(tmp_path / "afile"), progress=False)
    # --num-tasks parts (and their merge) into a folder holding a single build: its manifest would be replaced
    g = _jsonl(tmp_path / "b.jsonl", [json.dumps({"text": f"b {i}"}) for i in range(5)])
    single = build([str(f), str(g)], str(tokenizer), str(tmp_path / "mx"), progress=False)
    with pytest.raises(ValueError, match="holds another build's manifest.json"):
        build([str(f), str(g)], str(tokenizer), str(tmp_path / "mx"), num_tasks=2, task_id=0, progress=False)
    (tmp_path / "mx" / "part_00000").mkdir()  # parts made before the root build, say
    with pytest.raises(ValueError, match="holds another build's manifest.json"):
        merge(str(tmp_path / "mx"))
    assert json.loads((tmp_path / "mx" / "manifest.json").read_text())["splits"] == single["splits"]
    (tmp_path / "mx" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a readable manifest"):
        merge(str(tmp_path / "mx"))


def test_json_array_rows_are_checked_one_by_one_and_keep_their_text(tokenizer, tmp_path, monkeypatch) -> None:
    """One non-string text in a JSON array made HF datasets turn the whole column into JSON-encoded strings
    (every document tokenized with its quotes and escapes, nothing reported). Now each element is a row checked
    as a JSON line is; read in 5-byte blocks so that rows, strings, escapes and UTF-8 characters straddle them."""
    from ep_train.data import prep

    monkeypatch.setattr(prep, "READ_BYTES", 5)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))

    def decoded(man: dict, out: Path) -> list[str]:
        return [sp.decode(d[:-1].tolist()) for s in man["splits"]["train"]["shards"]
                for d in read_megatron(out / s["prefix"])]

    (tmp_path / "repro.json").write_text(json.dumps([{"text": 'say "hi"'}, {"text": 5}]))  # the review's case
    man = build([str(tmp_path / "repro.json")], str(tokenizer), str(tmp_path / "repro"), progress=False)
    assert decoded(man, tmp_path / "repro") == ['say "hi"'] and man["report"]["missing_text_key"] == 1
    texts = ['say "hi" \\ back\\slash, [brackets] {braces}, commas\n\ttabs', "naïve ☃ ünï", "x = [1, {2: 3}]\n",
             "ends in a backslash \\"]
    rows = [{"text": texts[0]}, {"text": 5}, [1], "a string", {"other": "no text"}, {"text": texts[1], "n": [{}]},
            {"text": None}, {"text": texts[2]}, {"text": texts[3]}]
    parts = [json.dumps(row, indent=1, ensure_ascii=False) for row in rows]
    pretty = tmp_path / "pretty.json"  # a row over a few lines: the examples name each row's first line
    pretty.write_text("[\n" + ",\n".join(parts) + "\n]\n")
    lines = [2 + sum(p.count("\n") + 1 for p in parts[:i]) for i in range(len(rows))]
    packed = tmp_path / "packed.json.gz"  # one line, gzip
    packed.write_bytes(gzip.compress(json.dumps(rows).encode()))
    empty = tmp_path / "empty.json"
    empty.write_text("[ ]\n")
    man = build([str(pretty), str(packed), str(empty)], str(tokenizer), str(tmp_path / "out"), progress=False)
    assert decoded(man, tmp_path / "out") == texts + texts  # exactly the strings, in order
    r = man["report"]
    assert (r["missing_text_key"], r["malformed_json"], r["replaced_characters"]) == (10, 0, 0), r
    ex = "\n".join(r["examples"])
    assert f"{pretty}:{lines[1]} (row 1): field 'text' is int, not a string" in ex
    assert f"{pretty}:{lines[2]} (row 2): row is a list" in ex and f"{pretty}:{lines[3]} (row 3): row is a str" in ex
    assert f"{packed}:1 (row 6): field 'text' is NoneType" in ex
    with pytest.raises(ValueError, match=rf"missing text key at {pretty}:{lines[1]} \(row 1\)"):
        build([str(pretty)], str(tokenizer), str(tmp_path / "strict"), strict=True, progress=False)


def test_bad_json_array_elements_cost_their_row_only(tokenizer, tmp_path, monkeypatch) -> None:
    """Malformed, unparsable (a 5,000-digit integer, deep nesting) and undecodable elements are counted at
    their line; the rows after them are kept. A file cut inside the array keeps the rows before the cut."""
    from ep_train.data import prep

    monkeypatch.setattr(prep, "READ_BYTES", 7)
    good = [json.dumps({"text": f"row {i} = {i}"}) for i in range(5)]
    src = tmp_path / "a.json"
    src.write_bytes(("[" + good[0] + ",\n" + '{"text" "no colon"},\n' + good[1] + ",\n"
                     + '{"text": ' + "7" * 5000 + "},\n" + good[2] + ",\n" + "[" * 5000 + "]" * 5000 + ",\n"
                     + '{"text": "caf').encode() + b"\xe9\"},\n" + (good[3] + "]\n").encode())
    cut = tmp_path / "cut.json"
    cut.write_text("[" + good[4] + ",\n" + '{"text": "never closed')
    man = build([str(src), str(cut)], str(tokenizer), str(tmp_path / "out"), progress=False)
    r = man["report"]
    assert man["splits"]["train"]["documents"] == 6 and r["unreadable_files"] == 0, r  # 4 good + 'caf?' + cut's
    assert (r["malformed_json"], r["replaced_characters"]) == (4, 1), r
    ex = "\n".join(r["examples"])
    assert f"{src}:2 (row 1): Expecting ':' delimiter" in ex
    assert f"{src}:4 (row 3): Exceeds the limit (4300 digits)" in ex and "set_int_max_str_digits" not in ex
    assert f"{src}:6 (row 5): nested too deeply" in ex
    assert f"{cut}:2 (row 1): the file ends inside this row" in ex and f"replaced_characters: {src}:7 (row 6)" in ex
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    docs = [d for s in man["splits"]["train"]["shards"] for d in read_megatron(tmp_path / "out" / s["prefix"])]
    assert [sp.decode(d[:-1].tolist()) for d in docs] == [f"row {i} = {i}" for i in range(3)] + [
        "caf\ufffd", "row 3 = 3", "row 4 = 4"]


def test_inputs_given_twice_under_other_spellings_are_read_once(tokenizer, tmp_path, monkeypatch) -> None:
    """The same file as relative, absolute, with "..", and inside a folder given too: tokenized once."""
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("alpha = 1\n")
    (tmp_path / "d" / "b.txt").write_text("beta = 2\n")
    monkeypatch.chdir(tmp_path)
    spellings = ["d/b.txt", str(tmp_path / "d" / "sub" / ".." / "a.txt"), str(tmp_path / "d" / "a.txt"), "d"]
    assert expand_inputs(spellings) == sorted([Path("d/b.txt"), tmp_path / "d" / "sub" / ".." / "a.txt"])
    man = build(spellings, str(tokenizer), str(tmp_path / "out"), progress=False)
    assert man["splits"]["train"]["documents"] == 2 and len(man["sources"]) == 2

# ---- resume keyed to the exact build (reliability issue 10) ---------------------------------------------
def _shard_files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.suffix in (".bin", ".idx")}


def test_resume_continues_only_the_same_build(tokenizer, tmp_path) -> None:
    import os

    lines = [json.dumps({"text": f"doc {i}: " + "x = 1\n" * (i % 7 + 1)}) for i in range(150)]
    src = _jsonl(tmp_path / "a.jsonl", [*lines, "{broken"])
    common = dict(shard_size_mb=0.001, progress=False)
    ref = build([str(src)], str(tokenizer), str(tmp_path / "ref"), **common)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="malformed json"):  # a failed build: shards rolled, progress.json left
        build([str(src)], str(tokenizer), str(out), strict=True, **common)
    assert (out / "progress.json").is_file() and len(list(out.glob("train_*.idx"))) >= 2
    before = _shard_files(out)
    # every option that changes the bytes, and the tokenizer, is part of the key: each is refused by name
    from ep_train.data.tokenizer import train_tokenizer

    tok2 = train_tokenizer([str(CORPUS[-2])], 600, str(tmp_path / "tok2"))
    for change, expect in [(dict(shard_size_mb=0.002), "option shard_size_mb was 0.001, now 0.002"),
                           (dict(val_fraction=0.2), "option val_fraction was 0.0, now 0.2"),
                           (dict(append_bos=True), "option append_bos was False, now True"),
                           (dict(dtype="int32"), "option dtype was 'uint16', now 'int32'"),
                           (dict(text_key="body"), "option text_key was 'text', now 'body'"),
                           (dict(tokenizer=str(tok2)), "another tokenizer")]:
        kw = {**common, **change}
        tok = kw.pop("tokenizer", str(tokenizer))
        with pytest.raises(ValueError, match=rf"unfinished build.*{expect}.*--overwrite"):
            build([str(src)], tok, str(out), **kw)
    # an unfinished build of an older version reads some inputs differently: refused, not resumed
    prog = json.loads((out / "progress.json").read_text())
    (out / "progress.json").write_text(json.dumps({**prog, "build_key": {**prog["build_key"], "version": 2}}))
    with pytest.raises(ValueError, match=r"unfinished build.*another data_prep_tool version \(build key 2, now 3\)"):
        build([str(src)], str(tokenizer), str(out), **common)
    (out / "progress.json").write_text(json.dumps(prog))
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: the same path, another mtime
    with pytest.raises(ValueError, match=rf"changed since .*{src.name}"):
        build([str(src)], str(tokenizer), str(out), **common)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _shard_files(out) == before  # the refusals changed nothing
    man = build([str(src)], str(tokenizer), str(out), **common)  # same inputs and options: resumes
    assert _shard_files(out) == _shard_files(tmp_path / "ref")
    assert man["splits"] == ref["splits"] and man["report"]["malformed_json"] == 1
    assert not (out / "progress.json").exists() and not (out / "inputs.json").exists()
    again = build([str(src)], str(tokenizer), str(out), **common)  # the identical finished build: no-op
    assert again["already_built"] is True and _shard_files(out) == _shard_files(tmp_path / "ref")


def test_a_version_2_build_is_kept_unless_it_read_json(tokenizer, tmp_path) -> None:
    """Build key 3 changed only how JSON inputs are read: a finished version-2 build of text files is still done
    (a corpus is not rebuilt for nothing); one of JSON lines is refused by version."""
    text = tmp_path / "a.txt"
    text.write_text("".join(f"line {i}: x = {i}\n" for i in range(200)))
    lines = _jsonl(tmp_path / "b.jsonl", [json.dumps({"text": f"row {i}"}) for i in range(50)])
    for src, kept in ((text, True), (lines, False)):
        out = tmp_path / f"out_{src.suffix[1:]}"
        build([str(src)], str(tokenizer), str(out), progress=False)
        man = json.loads((out / "manifest.json").read_text())
        (out / "manifest.json").write_text(json.dumps({**man, "build_key": {**man["build_key"], "version": 2}}))
        if kept:
            assert build([str(src)], str(tokenizer), str(out), progress=False)["already_built"] is True
        else:
            with pytest.raises(ValueError, match=r"another data_prep_tool version \(build key 2, now 3\), which "
                                                 r"reads some of these inputs differently"):
                build([str(src)], str(tokenizer), str(out), progress=False)


def test_parts_of_two_versions_merge_when_they_read_alike(tokenizer, tmp_path) -> None:
    """A --num-tasks build whose older part (build key 2) holds only text files merges with a newer part like an
    all-new build; with JSON inputs in the older part the merge is refused by version."""
    from ep_train.data.prep import merge

    files = []
    for i, suffix in enumerate((".txt", ".txt", ".jsonl")):
        f = tmp_path / f"f{i}{suffix}"
        rows = [f"file {i} line {j}: y = {j}" for j in range(120)]
        f.write_text("\n".join(json.dumps({"text": r}) for r in rows) + "\n" if suffix == ".jsonl" else
                     "\n".join(rows) + "\n")
        files.append(str(f))
    out = tmp_path / "out"
    for task in range(2):  # task 0: f0 (text); task 1: f1 (text), f2 (JSON lines)
        build(files, str(tokenizer), str(out), num_tasks=2, task_id=task, progress=False)
    want = merge(str(out))
    for part, refused in (("part_00000", False), ("part_00001", True)):
        man_path = out / part / "manifest.json"
        man = json.loads(man_path.read_text())
        man_path.write_text(json.dumps({**man, "build_key": {**man["build_key"], "version": 2}}))
        if refused:
            with pytest.raises(ValueError, match=r"different data_prep_tool versions \(build keys 2, 3\).*part_00001"):
                merge(str(out))
        else:
            assert merge(str(out))["splits"] == want["splits"]
        man_path.write_text(json.dumps(man))


def test_overwrite_removes_only_the_tools_files(tokenizer, tmp_path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", [json.dumps({"text": f"a {i}"}) for i in range(5)])
    b = _jsonl(tmp_path / "b.jsonl", [json.dumps({"text": f"b {i}"}) for i in range(7)])
    out = tmp_path / "out"
    build([str(a)], str(tokenizer), str(out), progress=False)
    mine = {"notes.txt": "n", "weights.bin": "w", "train_1.bin": "t", "manifest.json.bak": "m", "x.idx": "i"}
    for name, text in mine.items():
        (out / name).write_text(text)
    man = build([str(b)], str(tokenizer), str(out), overwrite=True, progress=False)
    assert man["splits"]["train"]["documents"] == 7
    assert {n: (out / n).read_text() for n in mine} == mine
    # a manifest.json this tool did not write is never taken for a build, nor deleted
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"name": "my web app"}))
    with pytest.raises(ValueError, match="not written by data_prep_tool"):
        build([str(a)], str(tokenizer), str(foreign), overwrite=True, progress=False)
    assert json.loads((foreign / "manifest.json").read_text()) == {"name": "my web app"}
    # shard files with no state saying what they hold are not silently replaced
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "train_00000.bin").write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match=r"train_00000.bin.*no manifest.json or progress.json.*--overwrite"):
        build([str(a)], str(tokenizer), str(stray), progress=False)
    assert (stray / "train_00000.bin").read_bytes() == b"\x01\x00"


def test_manifest_records_sizes_and_old_manifests_still_load(built, tokenizer, tmp_path) -> None:
    import shutil

    from ep_train.data.prep import inspect
    from ep_train.data.verify import verify_for_training

    m = json.loads((built / "manifest.json").read_text())
    for s in m["splits"]["train"]["shards"] + m["splits"]["val"]["shards"]:
        tokens = np.fromfile(built / f"{s['prefix']}.bin", np.uint16)
        assert s["bin_bytes"] == (built / f"{s['prefix']}.bin").stat().st_size == 2 * s["tokens"]
        assert s["idx_bytes"] == (built / f"{s['prefix']}.idx").stat().st_size
        assert s["max_token_id"] == int(tokens.max()) < 1000
    assert m["build_key"]["tokenizer_sha256"] == m["tokenizer"]["sha256"] and "mtime_ns" in m["sources"][0]
    # a manifest written before this change: no sizes, no build key, no binary_files counter
    old = Path(shutil.copytree(built, tmp_path / "old"))
    del m["build_key"], m["report"]["binary_files"]
    for s in m["splits"]["train"]["shards"] + m["splits"]["val"]["shards"]:
        del s["bin_bytes"], s["idx_bytes"], s["max_token_id"]
    (old / "manifest.json").write_text(json.dumps(m))
    verify_for_training(old, "train", 1000, tokenizer_path=tokenizer)
    assert TokenWindows(old, "train", 16).num_windows > 0
    text, ok = inspect(str(old), samples=1)
    assert ok and "binary files 0" in text
    # the size check still works without recorded sizes (tokens x itemsize), before any index parsing
    first = old / f"{m['splits']['train']['shards'][0]['prefix']}.bin"
    first.write_bytes(first.read_bytes() + b"\x00\x00")
    with pytest.raises(ValueError, match=rf"{first.name}.*bytes"):
        verify_for_training(old, "train", 1000)
    with pytest.raises(ValueError, match="older data_prep_tool.*--overwrite"):
        build([str(c) for c in CORPUS], str(tokenizer), str(old), val_fraction=0.1, shard_size_mb=0.25,
              progress=False)


def test_binary_detector_and_safe_decode(tokenizer) -> None:
    from ep_train.data.prep import binary_reason
    from ep_train.data.tokenizer import safe_decode

    assert binary_reason("plain text, ünïcödé ✓\n".encode()) is None
    assert binary_reason(b"caf\xe9 au lait, cr\xe8me br\xfbl\xe9e\n") is None  # legacy latin-1 text: kept
    assert "NUL" in binary_reason(b"\x7fELF\x02\x01\x01\x00\x00")
    assert "not UTF-8" in binary_reason(bytes(range(128, 256)) * 4)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    ids = sp.encode("def f(): return 1")
    assert safe_decode(sp, ids) == ("def f(): return 1", 0)
    text, bad = safe_decode(sp, [*ids[:2], 5000, *ids[2:], -1])
    assert bad == 2 and "<id 5000 out of range>" in text and "<id -1 out of range>" in text
