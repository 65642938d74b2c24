"""Bad data, one case per test: each asserts the message names the file/field and the fix, not just a code.

CLI-facing cases run ``tools/data_prep_tool.py`` in a subprocess as users do; the rest use the Python API
(``verify_for_training`` is what the trainer calls at start). Shards are copied from the session's
``built`` fixture before being damaged, so the shared fixture stays intact.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ep_train.data.loader import TokenWindows
from ep_train.data.prep import build
from ep_train.data.verify import verify_for_training
from tests.conftest import CORPUS

ROOT = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(ROOT / "tools" / "data_prep_tool.py")]


def tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOL, *args], capture_output=True, text=True, timeout=120)


def refused(p: subprocess.CompletedProcess) -> str:
    """A clean refusal: exit 2, one error line, no traceback. Returns stderr for the message checks."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    return p.stderr


@pytest.fixture
def shards(built, tmp_path) -> Path:
    """A private copy of the session's shards, free to damage."""
    return Path(shutil.copytree(built, tmp_path / "data"))


def first_shard(d: Path) -> Path:
    return d / json.loads((d / "manifest.json").read_text())["splits"]["train"]["shards"][0]["prefix"]


@pytest.fixture(scope="module")
def other_tok(tmp_path_factory) -> Path:
    """Same vocabulary size as the session tokenizer (1000) but trained on other text: another checksum."""
    from ep_train.data.prep import expand_inputs
    from ep_train.data.tokenizer import train_tokenizer

    files = [str(p) for p in expand_inputs([str(CORPUS[1])])]
    return train_tokenizer(files, 1000, str(tmp_path_factory.mktemp("other") / "sp"))


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory) -> Path:
    """600 pieces: the shards' ids up to 999 are out of its range."""
    from ep_train.data.tokenizer import train_tokenizer

    return train_tokenizer([str(CORPUS[-2])], 600, str(tmp_path_factory.mktemp("small") / "sp"))


# ---- shard files damaged after the build: found at training start, naming the file ------------------
def test_truncated_bin(shards) -> None:
    bin_path = Path(f"{first_shard(shards)}.bin")
    bin_path.write_bytes(bin_path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"{bin_path.name}.*(truncated|bytes).*rebuild"):
        verify_for_training(shards, "train", 1000)


def test_idx_wrong_magic(shards) -> None:
    idx = Path(f"{first_shard(shards)}.idx")
    idx.write_bytes(b"NOTMAGIC!" + idx.read_bytes()[9:])
    with pytest.raises(ValueError, match=rf"{idx.name}.*magic.*rebuild"):
        verify_for_training(shards, "train", 1000)


def test_idx_wrong_version(shards) -> None:
    idx = Path(f"{first_shard(shards)}.idx")
    raw = bytearray(idx.read_bytes())
    raw[9:17] = struct.pack("<Q", 2)
    idx.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"{idx.name}.*version 2.*expected 1"):
        verify_for_training(shards, "train", 1000)


def test_idx_cut_inside_its_header(shards) -> None:
    """Today: struct.error from deep inside the reader, which names no file."""
    idx = Path(f"{first_shard(shards)}.idx")
    idx.write_bytes(idx.read_bytes()[:20])
    with pytest.raises(ValueError, match=rf"{idx.name}.*(truncated|header)"):
        verify_for_training(shards, "train", 1000)


def test_shards_of_a_larger_vocabulary_than_the_model(built) -> None:
    with pytest.raises(ValueError, match=r"model.vocab_size = 512.*1000.*(vocab_size >= 1000|rebuild)"):
        verify_for_training(built, "train", 512)
    verify_for_training(built, "train", 1000)  # equal is fine
    verify_for_training(built, "train", 1024)  # a padded embedding table is fine too


def test_token_id_at_or_above_vocab_found_with_file_and_position(shards) -> None:
    """Today: an IndexError deep in the embedding on the first batch that holds the token."""
    prefix = first_shard(shards)
    bin_path = Path(f"{prefix}.bin")
    tokens = np.fromfile(bin_path, dtype=np.uint16)
    tokens[123] = 4000
    tokens.tofile(bin_path)
    with pytest.raises(ValueError, match=rf"{bin_path.name}.*token id 4000 at token position 123.*vocab"):
        verify_for_training(shards, "train", 1000)
    # the full hash (optional) also sees that the bytes differ from the manifest's checksum
    with pytest.raises(ValueError, match=rf"{bin_path.name}.*sha256"):
        verify_for_training(shards, "train", 8000, full_hash=True)


def test_training_tokenizer_differs_from_the_shards(built, other_tok) -> None:
    with pytest.raises(ValueError, match=r"differs from the one .* was built with.*rebuild"):
        verify_for_training(built, "train", 1000, tokenizer_path=other_tok)


def test_missing_manifest(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"manifest.json.* not found.*data_prep_tool build"):
        verify_for_training(tmp_path, "train", 1000)
    p = refused(tool("inspect", str(tmp_path)))
    assert "manifest.json" in p and "not found" in p


def test_manifest_that_is_not_json(shards) -> None:
    (shards / "manifest.json").write_text('{"format": "megatron-mmidx-v1", "splits": {')
    with pytest.raises(ValueError, match=r"manifest.json.* not valid JSON.*(rerun|rebuild)"):
        TokenWindows(shards, "train", 16)
    err = refused(tool("inspect", str(shards)))
    assert "manifest.json" in err and "not valid JSON" in err


def test_manifest_missing_a_field(shards) -> None:
    m = json.loads((shards / "manifest.json").read_text())
    del m["tokenizer"]["vocab_size"]
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"manifest.json.*tokenizer.vocab_size"):
        verify_for_training(shards, "train", 1000)


def test_shard_listed_in_manifest_but_missing(shards) -> None:
    idx = Path(f"{first_shard(shards)}.idx")
    idx.unlink()
    with pytest.raises(ValueError, match=rf"{idx.name}.*missing"):
        verify_for_training(shards, "train", 1000)
    p = tool("inspect", str(shards))  # a MISSING line and a failed exit, not a FileNotFoundError traceback
    assert p.returncode == 1 and "Traceback" not in p.stderr, (p.stdout, p.stderr)
    assert f"MISSING: {first_shard(shards)}.idx" in p.stdout and "checksums: MISMATCH" in p.stdout


# ---- bad inputs to build ----------------------------------------------------------------------------
def test_empty_input_has_no_documents(tokenizer, tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    err = refused(tool("build", "--input", str(tmp_path / "empty.txt"), str(tmp_path / "blank.jsonl"),
                       str(tmp_path / "other.jsonl"), "--tokenizer", str(tokenizer), "--output",
                       str(tmp_path / "out"), "--no-progress"))
    assert "no documents" in err and "--text-key" in err and "empty.txt" in err
    # nothing was written that would block a fixed rerun
    ok = tool("build", "--input", str(tmp_path / "other.jsonl"), "--text-key", "body", "--tokenizer", str(tokenizer),
              "--output", str(tmp_path / "out"), "--no-progress")
    assert ok.returncode == 0, ok.stderr


def test_mixed_type_jsonl_rows_are_skipped_with_their_type(tokenizer, tmp_path) -> None:
    rows = [{"text": "def f():\n    return 1\n"}, {"text": 5}, [1, 2], {"text": ["a", "b"]}, "just a string",
            {"text": None}, {"text": "x = 2\n"}]
    src = tmp_path / "mixed.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    man = build([str(src)], str(tokenizer), str(tmp_path / "out"), progress=False)
    r = man["report"]
    assert man["splits"]["train"]["documents"] == 2 and r["missing_text_key"] == 5
    ex = "\n".join(r["examples"])
    assert f"{src}:2: field 'text' is int, not a string" in ex
    assert f"{src}:3: row is a list, not an object" in ex
    assert f"{src}:4: field 'text' is list" in ex and f"{src}:5: row is a str" in ex
    with pytest.raises(ValueError, match=rf"{src}:2: field 'text' is int"):
        build([str(src)], str(tokenizer), str(tmp_path / "strict"), strict=True, progress=False)



def test_unparsable_json_lines_are_counted_not_fatal(tokenizer, tmp_path) -> None:
    """An integer of over 4,300 digits (a plain ValueError) made the rest of the file 'unreadable'; a deeply
    nested line (RecursionError) crashed the build naming no file. Both are one malformed row at file:line."""
    good = [json.dumps({"text": f"value_{i} = {i}\n"}) for i in range(3)]
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join([good[0], '{"text": ' + "9" * 5000 + "}", good[1], "[" * 5000 + "]" * 5000, good[2]])
                   + "\n")
    man = build([str(src)], str(tokenizer), str(tmp_path / "out"), progress=False)
    r = man["report"]
    assert man["splits"]["train"]["documents"] == 3 and (r["malformed_json"], r["unreadable_files"]) == (2, 0), r
    assert f"malformed_json: {src}:2: Exceeds the limit (4300 digits)" in "\n".join(r["examples"])
    assert f"malformed_json: {src}:4: nested too deeply" in "\n".join(r["examples"])
    with pytest.raises(ValueError, match=rf"malformed json at {src}:2: Exceeds the limit"):
        build([str(src)], str(tokenizer), str(tmp_path / "strict"), strict=True, progress=False)


def test_a_pretty_printed_json_object_is_one_clear_report_not_a_bad_row_per_line(tokenizer, tmp_path) -> None:
    obj = tmp_path / "config.json"
    obj.write_text(json.dumps({"text": "a document", "meta": {"a": 1}}, indent=2) + "\n")
    good = tmp_path / "good.txt"
    good.write_text("x = 1\n")
    man = build([str(obj), str(good)], str(tokenizer), str(tmp_path / "out"), progress=False)
    assert man["report"]["malformed_json"] == 1 and man["splits"]["train"]["documents"] == 1
    [example] = [e for e in man["report"]["examples"] if "malformed_json" in e]
    assert f"{obj}:1: neither JSON lines" in example and "one object per line (e.g. jq -c . config.json" in example

def test_binary_file_named_txt_is_skipped_and_counted(tokenizer, tmp_path) -> None:
    exe = tmp_path / "python.txt"
    exe.write_bytes(Path(sys.executable).resolve().read_bytes()[:65536])  # a real ELF/Mach-O head
    blob = tmp_path / "blob.jsonl"
    blob.write_bytes(bytes(range(256)) * 64)  # no newline structure, mostly undecodable
    good = tmp_path / "good.txt"
    good.write_text("print('hello')\n")
    p = tool("build", "--input", str(exe), str(blob), str(good), "--tokenizer", str(tokenizer), "--output",
             str(tmp_path / "out"), "--no-progress")
    assert p.returncode == 0, p.stderr
    assert '"binary_files": 2' in p.stdout and f"binary_files: {exe}" in p.stdout and str(blob) in p.stdout
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["splits"]["train"]["documents"] == 1 and man["report"]["binary_files"] == 2
    assert man["report"]["malformed_json"] == 0  # not tokenized line by line as garbage either
    err = refused(tool("build", "--input", str(exe), "--tokenizer", str(tokenizer), "--output", str(tmp_path / "s"),
                       "--strict", "--no-progress"))
    assert "binary" in err and str(exe) in err


def test_directory_given_as_tokenizer(tmp_path) -> None:
    err = refused(tool("build", "--input", str(CORPUS[-1]), "--tokenizer", str(tmp_path), "--output",
                       str(tmp_path / "out"), "--no-progress"))
    assert f"'{tmp_path}' is a directory" in err and ".model" in err


def test_missing_tokenizer_file(built, tmp_path) -> None:
    err = refused(tool("build", "--input", str(CORPUS[-1]), "--tokenizer", str(tmp_path / "nope.model"), "--output",
                       str(tmp_path / "out"), "--no-progress"))
    assert "nope.model" in err and "not found" in err and "train-tokenizer" in err
    with pytest.raises(ValueError, match=r"nope.model.*not found"):
        verify_for_training(built, "train", 1000, tokenizer_path=tmp_path / "nope.model")


# ---- inspect with the wrong tokenizer ---------------------------------------------------------------
def test_inspect_with_a_different_tokenizer(built, tokenizer, other_tok) -> None:
    err = refused(tool("inspect", str(built), "--samples", "1", "--tokenizer", str(other_tok), "--no-verify"))
    from ep_train.data.shards import sha256_file

    assert str(other_tok) in err and str(tokenizer) in err
    assert sha256_file(other_tok)[:12] in err and sha256_file(tokenizer)[:12] in err and "--force-tokenizer" in err
    ok = tool("inspect", str(built), "--samples", "1", "--tokenizer", str(tokenizer), "--no-verify")
    assert ok.returncode == 0 and "sample 0" in ok.stdout


def test_inspect_with_a_smaller_vocabulary_tokenizer(built, small_tok) -> None:
    """Today: IndexError: piece id is out of range."""
    err = refused(tool("inspect", str(built), "--samples", "2", "--tokenizer", str(small_tok), "--no-verify"))
    assert "600" in err and "1000" in err and "--force-tokenizer" in err
    p = tool("inspect", str(built), "--samples", "2", "--tokenizer", str(small_tok), "--no-verify",
             "--force-tokenizer")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert "sample 1" in p.stdout and "out of range" in p.stdout and "WARNING" in p.stdout


# ---- builds into a folder that already holds one ----------------------------------------------------
def _docs(tag: str, n: int) -> list[str]:
    lines = [ln for ln in (CORPUS[-2]).read_text().splitlines() if ln.strip()]
    return [json.dumps({"text": f"# {tag} {i}\n{lines[i % len(lines)]}\n"}) for i in range(n)]


def _listing(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


def test_changed_inputs_after_a_failed_build_are_refused(tokenizer, tmp_path) -> None:
    """The 192/200 report: a failed build's progress.json used to be applied to other inputs (exit 0)."""
    old, new, out = tmp_path / "old", tmp_path / "new", tmp_path / "out"
    old.mkdir(), new.mkdir()
    (old / "a.jsonl").write_text("\n".join(_docs("old", 200)) + "\n")
    (old / "b.jsonl").write_text("{broken\n")  # --strict stops here, after several shards rolled
    (new / "a.jsonl").write_text("\n".join(_docs("new", 200)) + "\n")
    common = ["--tokenizer", str(tokenizer), "--output", str(out), "--shard-size-mb", "0.002", "--no-progress"]
    err = refused(tool("build", "--input", str(old), "--strict", *common))
    assert "malformed json" in err
    assert (out / "progress.json").is_file() and len(list(out.glob("train_*.bin"))) >= 3
    before = _listing(out)
    err = refused(tool("build", "--input", str(new), *common))
    assert str(out) in err and "unfinished build" in err and "--overwrite" in err and "same inputs" in err
    assert f"{new / 'a.jsonl'}" in err and f"{old / 'a.jsonl'}" in err  # what differs, by name
    assert _listing(out) == before  # refused: nothing deleted or altered
    # other options that change the bytes are refused too, naming the option
    err = refused(tool("build", "--input", str(old), "--val-fraction", "0.5", *common))
    assert "val_fraction" in err and "0.5" in err
    # --overwrite starts over with the new inputs: every document in the shards is a new one
    p = tool("build", "--input", str(new), "--overwrite", *common)
    assert p.returncode == 0, p.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert man["splits"]["train"]["documents"] == 200 and not (out / "progress.json").exists()
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    toks = np.concatenate([np.fromfile(out / f"{s['prefix']}.bin", np.uint16) for s in man["splits"]["train"]["shards"]])
    assert sp.decode(toks.tolist()).count("# new ") == 200 and "# old " not in sp.decode(toks.tolist())


def test_build_into_a_finished_folder(tokenizer, tmp_path) -> None:
    a, b, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "out"
    a.write_text("\n".join(_docs("a", 20)) + "\n")
    b.write_text("\n".join(_docs("b", 30)) + "\n")
    common = ["--tokenizer", str(tokenizer), "--output", str(out), "--no-progress"]
    assert tool("build", "--input", str(a), *common).returncode == 0
    (out / "notes.tmp").write_text("mine")  # not the tool's: must survive even --overwrite
    (out / "model.bin").write_text("mine too")
    before = _listing(out)
    err = refused(tool("build", "--input", str(b), *common))
    assert f"'{out}' already holds a finished build" in err and "--overwrite" in err and "another --output" in err
    assert str(b) in err
    assert _listing(out) == before
    same = tool("build", "--input", str(a), *common)  # the identical build: a no-op that says so
    assert same.returncode == 0 and "already holds this build" in same.stdout and "nothing to do" in same.stdout
    assert _listing(out) == before
    p = tool("build", "--input", str(b), "--overwrite", *common)
    assert p.returncode == 0, p.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert man["splits"]["train"]["documents"] == 30
    assert (out / "notes.tmp").read_text() == "mine" and (out / "model.bin").read_text() == "mine too"


def test_train_tokenizer_too_small_vocab_suggests_an_option_that_exists(tmp_path) -> None:
    """sentencepiece's own advice names --character_coverage, which data_prep_tool does not have."""
    import sysconfig

    from ep_train.data.tokenizer import train_tokenizer

    src = [str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "__init__.py")]
    with pytest.raises(ValueError) as e:
        train_tokenizer(src, 40, str(tmp_path / "sp"))
    msg = str(e.value)
    assert "character_coverage" not in msg and "--vocab-size 40 is too small" in msg
    suggested = int(msg.rsplit("--vocab-size ", 1)[1].split()[0])
    assert train_tokenizer(src, suggested, str(tmp_path / "ok")).is_file()  # the advice works


def test_a_lone_surrogate_is_replaced_and_counted(tokenizer, tmp_path) -> None:
    """JSON's "\\ud83d" alone (an emoji cut in half, common in scraped text) made sentencepiece raise a
    TypeError naming nothing, on every rerun; it becomes U+FFFD, counted with the replaced characters."""
    src = tmp_path / "tweets.jsonl"
    src.write_text('{"text": "tweet cut \\ud83d here"}\n{"text": "whole \\ud83d\\ude00 emoji"}\n')
    man = build([str(src)], str(tokenizer), str(tmp_path / "out"), progress=False)
    assert man["splits"]["train"]["documents"] == 2 and man["report"]["replaced_characters"] == 1
    assert f"replaced_characters: {src}:1" in man["report"]["examples"]


def test_a_byte_order_mark_does_not_cost_the_first_row(tokenizer, tmp_path) -> None:
    rows = tmp_path / "bom.jsonl"
    rows.write_bytes(b"\xef\xbb\xbf" + b'{"text": "first row"}\n{"text": "second row"}\n')
    array = tmp_path / "bom_array.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": "only document"}]).encode())
    man = build([str(rows)], str(tokenizer), str(tmp_path / "a"), progress=False)
    assert man["splits"]["train"]["documents"] == 2 and man["report"]["malformed_json"] == 0
    man = build([str(array)], str(tokenizer), str(tmp_path / "b"), progress=False)
    assert man["splits"]["train"]["documents"] == 1 and man["report"]["malformed_json"] == 0


def test_truncated_or_mislabelled_files_are_counted_by_name(tokenizer, tmp_path) -> None:
    """A cut-off .jsonl.gz gives its rows up to the cut, then an 'unreadable_files' entry naming it; a plain
    file named .txt.gz and a corrupt parquet likewise (they ended the build with EOFError / BadGzipFile /
    'Parquet magic bytes not found' tracebacks naming no file); --strict stops at them."""
    import gzip

    cut = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress("".join(json.dumps({"text": f"row {i} " * 20}) + "\n" for i in range(400)).encode())
    cut.write_bytes(whole[: len(whole) // 2])
    fake = tmp_path / "plain.txt.gz"
    fake.write_text("plain text, not gzip")
    bad_parquet = tmp_path / "broken.parquet"
    bad_parquet.write_bytes(b"PAR1" + b"\x00" * 64)
    good = tmp_path / "good.txt"
    good.write_text("print('hello')\n")
    man = build([str(p) for p in (cut, fake, bad_parquet, good)], str(tokenizer), str(tmp_path / "out"),
                progress=False)
    r = man["report"]
    assert r["unreadable_files"] == 3, r
    ex = "\n".join(r["examples"])
    for f in (cut, fake, bad_parquet):
        assert f"unreadable_files: {f}: could not be read to the end" in ex
    assert 1 < man["splits"]["train"]["documents"] < 400  # the cut file's rows before the cut, and good.txt
    with pytest.raises(ValueError, match=rf"unreadable files at {fake}: could not be read"):
        build([str(fake)], str(tokenizer), str(tmp_path / "strict"), strict=True, progress=False)


def test_an_output_inside_an_input_folder_is_not_read_back(tokenizer, tmp_path) -> None:
    """`build --input corp --output corp/tok` twice: the second run read the first's manifest.json as an
    input and was refused; with --overwrite it deleted the finished build and crashed."""
    corp = tmp_path / "corp"
    corp.mkdir()
    (corp / "a.jsonl").write_text(json.dumps({"text": "def f():\n    return 1\n"}) + "\n")
    first = build([str(corp)], str(tokenizer), str(corp / "tok"), progress=False)
    again = build([str(corp)], str(tokenizer), str(corp / "tok"), progress=False)
    assert again.get("already_built") and again["splits"] == first["splits"]
    over = build([str(corp)], str(tokenizer), str(corp / "tok"), overwrite=True, progress=False)
    assert over["splits"]["train"]["documents"] == 1 and (corp / "tok" / "manifest.json").is_file()
    # the user's files under --output stay inputs (only the tool's own state files are left out)
    mine = build([str(corp / "a.jsonl")], str(tokenizer), str(corp), progress=False)
    assert mine["splits"]["train"]["documents"] == 1


def test_more_tasks_than_files_is_refused_up_front(tokenizer, tmp_path) -> None:
    for i in range(2):
        (tmp_path / f"f{i}.txt").write_text(f"x = {i}\n")
    with pytest.raises(ValueError, match=r"--num-tasks = 3 is more than the 2 input file\(s\).*--num-tasks 2 or fewer"):
        build([str(tmp_path / "f0.txt"), str(tmp_path / "f1.txt")], str(tokenizer), str(tmp_path / "out"),
              num_tasks=3, task_id=2, progress=False)


def test_merge_refuses_a_missing_task_or_a_stale_part(tokenizer, tmp_path) -> None:
    """merge over part_* folders: a --num-tasks 2 build with only task 0 done merged half the data
    silently; a part left from a build with other options was merged too."""
    from ep_train.data.prep import merge

    files = []
    for i in range(4):
        (tmp_path / f"f{i}.txt").write_text(f"value_{i} = {i} * 2\n" * 5)
        files.append(str(tmp_path / f"f{i}.txt"))
    out = tmp_path / "out"
    build(files, str(tokenizer), str(out), num_tasks=2, task_id=0, progress=False)
    with pytest.raises(ValueError, match=r"needs parts 0..1; missing task\(s\) \[1\]"):
        merge(str(out))
    build(files, str(tokenizer), str(out), num_tasks=2, task_id=1, progress=False)
    assert merge(str(out))["splits"]["train"]["documents"] == 4
    stale = tmp_path / "stale"
    build(files, str(tokenizer), str(stale), num_tasks=3, task_id=2, progress=False)
    shutil.copytree(stale / "part_00002", out / "part_00002")
    with pytest.raises(ValueError, match="different inputs, options or tokenizers"):
        merge(str(out))
    # a part of another corpus split the same way (same options): refused too
    shutil.rmtree(out / "part_00002")
    (tmp_path / "g.txt").write_text("gamma = 3\n" * 5)
    other = tmp_path / "other"
    build([*files[:3], str(tmp_path / "g.txt")], str(tokenizer), str(other), num_tasks=2, task_id=1,
          progress=False)
    shutil.rmtree(out / "part_00001")
    shutil.copytree(other / "part_00001", out / "part_00001")
    with pytest.raises(ValueError, match="different inputs, options or tokenizers"):
        merge(str(out))



def _tree(d: Path) -> dict[str, bytes]:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.suffix in (".bin", ".idx")}


def test_an_interrupted_task_resumes_and_a_part_of_the_old_split_is_refused(tokenizer, tmp_path) -> None:
    """Tasks take contiguous blocks of files (task i took every Nth file before): a task stopped midway resumes
    to the bytes of an uninterrupted run; a part made with the old split is refused by name, not resumed or
    merged (its files are not the task's)."""
    from ep_train.data import resume
    from ep_train.data.prep import merge

    files = []
    for i in range(5):
        rows = [json.dumps({"text": f"f{i} row {j}: " + "x = 1\n" * (j % 5 + 1)}) for j in range(150)]
        (tmp_path / f"f{i}.jsonl").write_text("\n".join(rows + (["{broken"] if i == 2 else [])) + "\n")
        files.append(str(tmp_path / f"f{i}.jsonl"))
    common = dict(num_tasks=3, shard_size_mb=0.0005, progress=False)
    ref = tmp_path / "ref"
    for task in range(3):
        build(files, str(tokenizer), str(ref), task_id=task, **common)
    assert [r["path"] for r in json.loads((ref / "part_00001" / "manifest.json").read_text())["sources"]] == [
        str((tmp_path / f"f{i}.jsonl").resolve()) for i in (1, 2)]  # the block [5//3, 10//3) = files 1, 2
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="malformed json"):  # stops in f2, the end of task 1: progress.json left
        build(files, str(tokenizer), str(out), task_id=1, strict=True, **common)
    part = out / "part_00001"
    assert (part / "progress.json").is_file() and len(list(part.glob("train_*.idx"))) >= 2
    old = Path(shutil.copytree(part, tmp_path / "old_unfinished"))
    build(files, str(tokenizer), str(out), task_id=1, **common)  # resumes
    assert _tree(part) == _tree(ref / "part_00001")

    # the old split: task 1 of 3 held f1, f4; its key had no task_split
    shutil.rmtree(part)
    shutil.copytree(old, part)
    state = json.loads((part / "progress.json").read_text())
    del state["build_key"]["options"]["task_split"]
    old_records = resume.input_records([Path(files[1]), Path(files[4])])
    state["build_key"]["inputs_sha256"] = resume.inputs_digest(old_records)
    (part / "progress.json").write_text(json.dumps(state))
    (part / "inputs.json").write_text(json.dumps(old_records))
    before = _tree(part)
    with pytest.raises(ValueError, match=r"unfinished build.*older data_prep_tool, which gave each task every Nth "
                                         r"input file.*--overwrite"):
        build(files, str(tokenizer), str(out), task_id=1, **common)
    assert _tree(part) == before  # nothing touched
    # a finished part of the old split among new ones: merge refuses it
    for task in (0, 2):
        shutil.copytree(ref / f"part_0000{task}", out / f"part_0000{task}")
    shutil.rmtree(part)
    shutil.copytree(ref / "part_00001", part)
    man = json.loads((part / "manifest.json").read_text())
    del man["build_key"]["options"]["task_split"]
    (part / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="different inputs, options or tokenizers"):
        merge(str(out))
    with pytest.raises(ValueError, match=r"finished build.*every Nth input file"):
        build(files, str(tokenizer), str(out), task_id=1, **common)
    # a finished part of an older data_prep_tool version (same split) among new ones: merge names the versions
    man = json.loads((ref / "part_00001" / "manifest.json").read_text())
    (part / "manifest.json").write_text(json.dumps({**man, "build_key": {**man["build_key"], "version": 2}}))
    with pytest.raises(ValueError, match=r"different data_prep_tool versions \(build keys 2, 3\).*--overwrite"):
        merge(str(out))


def test_a_task_without_documents_writes_an_empty_part(tokenizer, tmp_path) -> None:
    """A task whose files hold no document raised 'no documents found' and wrote no manifest: merge then said the
    task had not finished, and rerunning it failed again. It writes an empty part; merge skips it and fails
    only when the whole corpus is empty."""
    from ep_train.data.prep import merge

    (tmp_path / "a_empty.txt").write_text("")
    (tmp_path / "b_other_key.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    for name in ("c.txt", "d.txt"):
        (tmp_path / name).write_text(f"{name[0]} = 1\n" * 3)
    files = [str(tmp_path / n) for n in ("a_empty.txt", "b_other_key.jsonl", "c.txt", "d.txt")]
    single = build(files, str(tokenizer), str(tmp_path / "one"), progress=False)
    for task in range(4):  # a task per file: tasks 0 and 1 find no document
        man = build(files, str(tokenizer), str(tmp_path / "arr"), num_tasks=4, task_id=task, progress=False)
        assert man["splits"]["train"]["documents"] == (0 if task < 2 else 1)
    assert build(files, str(tokenizer), str(tmp_path / "arr"), num_tasks=4, task_id=0, progress=False)[
        "already_built"]  # a rerun of the empty task: done, not failed again
    merged = merge(str(tmp_path / "arr"))
    assert [s["prefix"] for s in merged["splits"]["train"]["shards"]] == ["part_00002/train_00000",
                                                                          "part_00003/train_00000"]
    assert all(merged["splits"][s][k] == single["splits"][s][k] for s in ("train", "val") for k in ("documents",
                                                                                                  "tokens"))
    assert (merged["report"]["empty_documents"], merged["report"]["missing_text_key"]) == (1, 1)
    assert TokenWindows(tmp_path / "arr", "train", 4).num_windows > 0
    # the whole corpus empty: each task finishes, merge says so
    for task in range(2):
        build(files[:2], str(tokenizer), str(tmp_path / "none"), num_tasks=2, task_id=task, progress=False)
    with pytest.raises(ValueError, match=r"no documents found in any of the 2 parts' input files.*--text-key"):
        merge(str(tmp_path / "none"))
    assert not (tmp_path / "none" / "manifest.json").exists()

def test_a_users_inputs_json_in_the_output_is_left_alone(tokenizer, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "inputs.json").write_text('{"my": "precious config"}')
    (tmp_path / "a.txt").write_text("x = 1\n")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"inputs.json' was not written by data_prep_tool build"):
            build([str(tmp_path / "a.txt")], str(tokenizer), str(out), overwrite=overwrite, progress=False)
    assert (out / "inputs.json").read_text() == '{"my": "precious config"}'


def test_train_tokenizer_learns_the_documents_not_the_json_around_them(tmp_path) -> None:
    """A .jsonl and a .json.gz give sentencepiece the texts that build would tokenize, streamed (given the
    files themselves, it learned JSON's quotes and keys and never saw inside the .gz). The CLI refuses to
    replace an existing PREFIX.model without --overwrite."""
    import gzip

    import sentencepiece as spm

    from ep_train.data.tokenizer import document_lines, train_tokenizer

    texts = [t for f in sorted(CORPUS[0].glob("*.py")) if (t := f.read_text()).strip()][:6]  # json's sources
    plain = "".join(t if t.endswith("\n") else t + "\n" for t in texts)
    rows, rest = tmp_path / "rows.jsonl", tmp_path / "rest.json.gz"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:3]))
    rest.write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts[3:]).encode()))
    assert len(texts) == 5
    got = list(document_lines([str(rows), str(rest)], "text"))  # what sentencepiece now reads: the texts' lines
    assert got == [line for line in plain.split("\n") if line]

    def escapes(model: Path) -> set[str]:  # pieces holding JSON's escaped quote: \" (a backslash, a quote)
        sp = spm.SentencePieceProcessor(model_file=str(model))
        return {p for p in map(sp.id_to_piece, range(sp.get_piece_size())) if '\\"' in p}

    model = train_tokenizer([str(rows), str(rest)], 500, str(tmp_path / "b"))
    assert not escapes(model)
    # the control: sentencepiece on the .jsonl itself learns JSON (so the check above can fail)
    spm.SentencePieceTrainer.train(input=str(rows), model_prefix=str(tmp_path / "raw"), vocab_size=500,
                                   max_sentence_length=1 << 20, minloglevel=2)  # a row is one long line
    assert escapes(tmp_path / "raw.model")
    (tmp_path / "plain.txt").write_text(plain)
    train_tokenizer([str(tmp_path / "plain.txt")], 500, str(tmp_path / "a"))
    err = refused(tool("train-tokenizer", "--input", str(tmp_path / "plain.txt"), "--vocab-size", "500",
                       "--output", str(tmp_path / "a")))
    assert "a.model exists already" in err and "--overwrite" in err
