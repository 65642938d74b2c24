"""CLIs whose reader goes away (``| head``) exit 0 without a traceback; the trainer keeps running.

The reader's end of the pipe is closed before the child writes anything, so every write fails:
the worst case of ``cmd | head -n 1``, made deterministic. The shell form under ``pipefail`` (what
tools/main_job.sh does) is run too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(ROOT / "tools" / "data_prep_tool.py")]


def _closed_reader(cmd: list[str], unbuffered: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    p.stdout.close()  # the reader is gone before the first write
    err = p.stderr.read().decode()
    rc = p.wait(timeout=300)
    return subprocess.CompletedProcess(cmd, rc, "", err)


@pytest.mark.parametrize("unbuffered", [False, True])
def test_inspect_into_a_closed_pipe_exits_zero_quietly(built, unbuffered) -> None:
    p = _closed_reader([*TOOL, "inspect", str(built), "--samples", "2"], unbuffered)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


@pytest.mark.parametrize("unbuffered", [False, True])
def test_plan_into_a_closed_pipe_exits_zero_quietly(unbuffered) -> None:
    cmd = [sys.executable, "-m", "ep_train.cli", "plan", "--config", "configs/mixtral_8x7b.yaml", "--nodes", "4"]
    p = _closed_reader(cmd, unbuffered)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_main_job_pipeline_under_pipefail(built) -> None:
    """The main job's exact form: ``inspect ... | head -n 8`` under ``set -o pipefail``, 5 times each way."""
    script = f'set -euo pipefail; for i in 1 2 3 4 5; do "{TOOL[0]}" "{TOOL[1]}" inspect "{built}" --samples 1 | head -n 2 >/dev/null; done'
    for unbuffered in ("", "1"):
        env = dict(os.environ, PYTHONUNBUFFERED=unbuffered) if unbuffered else {
            k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr
        assert "Traceback" not in p.stderr, p.stderr


def test_trainer_console_keeps_running_when_its_reader_goes(tmp_path) -> None:
    """A training process keeps going (and can write its files) after its console pipe closed."""
    done = tmp_path / "done"
    code = ("import sys; from ep_train.stdio import keep_running_on_broken_pipe; keep_running_on_broken_pipe()\n"
            "for i in range(20000): print('step', i, flush=i % 7 == 0)\n"
            "print('warning', file=sys.stderr)\n"
            f"open({str(done)!r}, 'w').write('ok')\n")
    p = _closed_reader([sys.executable, "-c", code], unbuffered=True)
    assert p.returncode == 0, p.stderr
    assert done.read_text() == "ok"
    assert "Traceback" not in p.stderr and "warning" in p.stderr
