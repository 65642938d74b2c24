"""data_prep_tool as users run it: train-tokenizer, build (killed and resumed), inspect, array tasks + merge."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import CORPUS, STDLIB

ROOT = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(ROOT / "tools" / "data_prep_tool.py")]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([*TOOL, *args], capture_output=True, text=True, timeout=600)
    if check and p.returncode:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def _shard_bytes(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.suffix in (".bin", ".idx")}


def test_killed_build_resumes_to_the_same_bytes(tmp_path, tokenizer) -> None:
    inputs = [str(STDLIB / "*.py")]
    common = ["--tokenizer", str(tokenizer), "--shard-size-mb", "0.05", "--val-fraction", "0.05", "--no-progress"]
    run("build", "--input", *inputs, "--output", str(tmp_path / "ref"), *common)

    out = tmp_path / "killed"
    proc = subprocess.Popen([*TOOL, "build", "--input", *inputs, "--output", str(out), *common],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        prog = out / "progress.json"
        if prog.is_file() and len(json.loads(prog.read_text())["shards"]["train"]) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the build finished before it could be killed"
    finished = len(json.loads((out / "progress.json").read_text())["shards"]["train"])
    before = _shard_bytes(out)
    # other inputs or options into the killed build's folder: refused, naming what differs; nothing touched
    p = run("build", "--input", *inputs, str(STDLIB / "json"), "--output", str(out), *common, check=False)
    assert p.returncode == 2 and "unfinished build" in p.stderr and "json" in p.stderr and "--overwrite" in p.stderr
    p = run("build", "--input", *inputs, "--output", str(out), *common, "--append-bos", check=False)
    assert p.returncode == 2 and "option append_bos was False, now True" in p.stderr
    assert _shard_bytes(out) == before
    run("build", "--input", *inputs, "--output", str(out), *common)
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "ref")
    assert not list(out.glob("*.tmp")) and finished >= 3
    ref_manifest = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    assert json.loads((out / "manifest.json").read_text())["splits"] == ref_manifest["splits"]


def test_cli_train_build_inspect_and_array_merge(tmp_path) -> None:
    p = run("train-tokenizer", "--input", *map(str, CORPUS), "--vocab-size", "800", "--output", str(tmp_path / "tok"))
    assert (tmp_path / "tok.model").is_file() and json.loads((tmp_path / "tok.json").read_text())["options"][
        "byte_fallback"] is True
    tok = str(tmp_path / "tok.model")
    run("build", "--input", *map(str, CORPUS), "--tokenizer", tok, "--output", str(tmp_path / "one"), "--no-progress")
    for task in range(2):
        run("build", "--input", *map(str, CORPUS), "--tokenizer", tok, "--output", str(tmp_path / "arr"),
            "--num-tasks", "2", "--task-id", str(task), "--no-progress")
    run("merge", str(tmp_path / "arr"))
    p = run("build", "--input", *map(str, CORPUS), "--tokenizer", tok, "--output", str(tmp_path / "arr"),
            "--no-progress", check=False)  # a single build into the merged root: refused, not mixed in
    assert p.returncode == 2 and "merged manifest of a --num-tasks build (part_00000, part_00001)" in p.stderr
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    arr = json.loads((tmp_path / "arr" / "manifest.json").read_text())
    assert arr["splits"]["train"]["documents"] == one["splits"]["train"]["documents"]
    assert arr["splits"]["train"]["tokens"] == one["splits"]["train"]["tokens"]
    # token for token: each task takes a contiguous block of the sorted files and merge joins them in task order
    def stream(d: Path, m: dict) -> bytes:
        return b"".join((d / f"{s['prefix']}.bin").read_bytes() for s in m["splits"]["train"]["shards"])

    assert len(arr["splits"]["train"]["shards"]) == 2 and stream(tmp_path / "arr", arr) == stream(tmp_path / "one", one)
    p = run("inspect", str(tmp_path / "arr"), "--samples", "1")
    assert "checksums: OK" in p.stdout and "sample 0" in p.stdout
    # a corrupted shard is caught by inspect
    shard = tmp_path / "one" / (one["splits"]["train"]["shards"][0]["prefix"] + ".bin")
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    p = run("inspect", str(tmp_path / "one"), "--samples", "0", check=False)
    assert p.returncode == 1 and "CHECKSUM MISMATCH" in p.stdout
    p = run("build", "--input", str(tmp_path / "missing.txt"), "--tokenizer", tok, "--output", str(tmp_path / "x"),
            check=False)
    assert p.returncode == 2 and "missing.txt" in p.stderr
