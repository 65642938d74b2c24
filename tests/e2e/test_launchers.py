"""launch/torchrun.sh (two "nodes" on loopback, restarts) and launch/deepspeed.sh, as users run them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ep_train.config import load_config, parse_overrides
from tests.distributed.harness import cmdline as _cmdline
from tests.distributed.harness import free_port
from tests.distributed.harness import read_losses as _losses
from tests.distributed.reference_train import reference_losses

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny.yaml"
STEPS = 12
OVERRIDES = ["--seq_len", "32", "--max_steps", str(STEPS), "--warmup_steps", "3"]


@pytest.fixture(scope="module")
def reference(built) -> list[float]:
    return reference_losses(load_config(CONFIG, parse_overrides(["--data_dir", str(built), *OVERRIDES])), STEPS)


def _check(run: Path, reference: list[float]) -> None:
    got = _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, want in enumerate(reference, 1):
        assert abs(got[step] - want) <= 1e-5 * abs(want), (step, got[step], want)


def _start(script: str, *args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def _finish(p: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for c in psutil.Process(p.pid).children(recursive=True):
            c.kill()
        p.kill()
        raise
    text = log.read_text()
    assert rc == 0, text[-4000:]
    return text


def test_torchrun_two_nodes_on_loopback(tmp_path, built, reference) -> None:
    """Two torchrun agents (node ranks 0 and 1, two processes each) = world 4, EP 4 spans both "nodes"."""
    port = str(free_port())
    run = tmp_path / "run"
    common = ["--config", str(CONFIG), "--data", str(built), "--run-dir", str(run), "--nproc", "2", "--nnodes", "2",
              "--master-addr", "127.0.0.1", "--master-port", port, "--", *OVERRIDES, "--ep_size", "4"]
    node1 = _start("torchrun.sh", "--node-rank", "1", *common, log=tmp_path / "node1.log")
    node0 = _start("torchrun.sh", "--node-rank", "0", *common, log=tmp_path / "node0.log")
    out = _finish(node0, tmp_path / "node0.log")
    _finish(node1, tmp_path / "node1.log")
    assert "running:" in out and "--node-rank 0" in out
    assert "world 4, ep_size 4" in out
    _check(run, reference)


def test_deepspeed_launcher_with_localhost_hostfile(tmp_path, built, reference) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run = tmp_path / "run"
    port = str(free_port())
    p = _start("deepspeed.sh", "--config", str(CONFIG), "--data", str(built), "--run-dir", str(run), "--hostfile",
               str(hostfile), "--master_addr", "127.0.0.1", "--master_port", port, "--no_ssh",
               "--node_rank", "0", "--", *OVERRIDES, "--ep_size", "2", log=tmp_path / "ds.log")
    seen: set[str] = set()
    while p.poll() is None:  # DeepSpeed's shared-memory allreduce segments of this run, while they exist
        seen |= {f.name for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*")}
        time.sleep(0.05)
    out = _finish(p, tmp_path / "ds.log")
    assert "deepspeed.launcher.runner" in out and "world 2, ep_size 2" in out
    _check(run, reference)
    # The launcher sets LOCAL_SIZE, so DeepSpeed made one /dev/shm segment per rank; none outlives the run.
    left = sorted(f.name for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))
    assert left == [], left
    if not seen:
        pytest.skip("no shared-memory segment was observed (too brief to sample, or not made): leak check inconclusive")


def test_sigkill_of_a_rank_restarts_and_resumes(tmp_path, built, reference) -> None:
    run = tmp_path / "run"
    p = _start("torchrun.sh", "--config", str(CONFIG), "--data", str(built), "--run-dir", str(run), "--nproc", "2",
               "--master-port", str(free_port()), "--max-restarts", "1", "--resume", "auto", "--",
               *OVERRIDES, "--ep_size", "2", "--save_interval", "4", log=tmp_path / "tr.log")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and p.poll() is None:
        if (run / "checkpoints" / "latest").is_file() and max(_losses(run), default=0) >= 6:
            break
        time.sleep(0.1)
    workers = [c for c in psutil.Process(p.pid).children(recursive=True)
               if "-m ep_train.train" in _cmdline(c) and "torch.distributed.run" not in _cmdline(c)]
    assert len(workers) == 2, [w.cmdline() for w in workers]
    workers[1].kill()  # SIGKILL one rank mid-training
    out = _finish(p, tmp_path / "tr.log")
    assert "resumed from" in out and "step_00000004" in out
    _check(run, reference)  # steps redone after the restart overwrite their records with the same numbers


DECOY = """import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGUSR1, lambda *_: Path(sys.argv[-1]).write_text("got USR1"))
Path(sys.argv[-1] + ".ready").write_text("")
time.sleep(600)
"""


def start_decoy(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """Another job's trainer, as `pkill -f` sees it: `python -m ep_train.train ...` on the same machine.
    Returns the process and the file it writes if a SIGUSR1 reaches it."""
    pkg = tmp_path / "decoy" / "ep_train" / "train"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(DECOY)
    hit = tmp_path / "decoy_hit"
    p = subprocess.Popen([sys.executable, "-m", "ep_train.train", "--config", "other_job.yaml", str(hit)],
                         cwd=pkg.parent.parent, env={"PATH": "/usr/bin:/bin"})
    deadline = time.monotonic() + 60
    while not Path(str(hit) + ".ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return p, hit


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for_step(p: subprocess.Popen, run: Path, step: int, log: Path) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and p.poll() is None:
        if (run / "metrics.jsonl").is_file() and max(_losses(run), default=0) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"no step {step} (rc {p.poll()}):\n{log.read_text()[-4000:]}")


@pytest.mark.parametrize("launcher", ["torchrun", "torchrun-max-restarts", "deepspeed"])
def test_usr1_to_launch_script_checkpoints_and_exits_75(tmp_path, built, launcher) -> None:
    """SIGUSR1 sent to launch/torchrun.sh or deepspeed.sh reaches its workers (the launcher alone would die
    and orphan them): they checkpoint, nothing is left running, the script exits 75 (plain torchrun would
    say 1), no restart happens with --max-restarts, and a matching trainer outside the launch is not
    signalled."""
    decoy, hit = start_decoy(tmp_path)
    run, log = tmp_path / "run", tmp_path / "tr.log"
    common = ["--config", str(CONFIG), "--data", str(built), "--run-dir", str(run)]
    # OVERRIDES with max_steps 200 instead (a field given twice is refused)
    trainer = ["--", "--seq_len", "32", "--warmup_steps", "3", "--ep_size", "2", "--max_steps", "200"]
    if launcher == "deepspeed":
        (tmp_path / "hostfile").write_text("localhost slots=2\n")
        p = _start("deepspeed.sh", *common, "--hostfile", str(tmp_path / "hostfile"), "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), "--no_ssh", "--node_rank", "0", *trainer, log=log)
    else:
        restarts = "1" if launcher == "torchrun-max-restarts" else "0"
        p = _start("torchrun.sh", *common, "--nproc", "2", "--master-port", str(free_port()), "--max-restarts",
                   restarts, *trainer, log=log)
    tree: list[psutil.Process] = []
    try:
        _wait_for_step(p, run, 3, log)
        tree = psutil.Process(p.pid).children(recursive=True)
        p.send_signal(signal.SIGUSR1)
        rc = p.wait(timeout=300)
        time.sleep(1.0)  # orphans, if any, would still be running now
        orphans = [c for c in tree if _alive(c)]
    finally:
        for c in tree + (psutil.Process(p.pid).children(recursive=True) if p.poll() is None else []):
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass
        p.kill()
        decoy.kill()
    out = log.read_text()
    assert not orphans, f"orphaned workers: {[c.pid for c in orphans]}"
    assert rc == 75, out[-4000:]
    assert "stopped on signal at step" in out and "exit code 75" in out, out[-4000:]
    stopped = json.loads((run / "stopped_on_signal.json").read_text())["step"]
    assert 3 <= stopped < 200 and (run / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    assert "resumed from" not in out  # --max-restarts 1 did not start the workers again
    assert not hit.exists(), "the stop signal reached a trainer outside this launch"


def test_bad_config_is_refused_once_before_torchrun_starts(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: .inf\n")
    p = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "--config", str(bad), "--nproc", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("train.learning_rate = inf") == 1 and "running:" not in p.stdout, p.stdout + p.stderr
    p = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "--config", str(CONFIG), "--nproc", "3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and "must divide the world size (3)" in p.stderr, p.stderr


def test_scripts_fail_early_with_clear_messages(tmp_path, built) -> None:
    cases = [
        (["torchrun.sh", "--config", str(tmp_path / "nope.yaml")], "config file"),
        (["torchrun.sh", "--config", str(CONFIG), "--data", str(tmp_path)], "no manifest.json"),
        (["torchrun.sh", "--config", str(CONFIG), "--resume", str(tmp_path / "ck")], "checkpoint folder"),
        (["deepspeed.sh", "--config", str(CONFIG), "--hostfile", str(tmp_path / "hosts")], "hostfile"),
        (["torchrun.sh", "--config", str(CONFIG), "--bogus", "1"], "unknown option '--bogus'"),
        (["slurm/train.sbatch", str(CONFIG)], "usage"),
        (["torchrun.sh", "--config", str(CONFIG)], "data.data_dir is not set"),  # once here, not per worker
        (["torchrun.sh", "--config", str(CONFIG), "--data", str(built), "--nnodes", "2"], "needs --master-addr"),
        (["deepspeed.sh", "--config", str(CONFIG), "--data", str(built), "--no_ssh", "--node_rank", "0"],
         "--no_ssh needs --master_addr"),  # DeepSpeed would ssh to the first host for its address
        (["torchrun.sh", "--data", str(built), "--config"], "--config needs a value"),  # was: $2: unbound variable
        (["deepspeed.sh", "--config", str(CONFIG), "--hostfile"], "--hostfile needs a value"),
    ]
    for args, msg in cases:
        p = subprocess.run(["bash", str(ROOT / "launch" / args[0]), *args[1:]], capture_output=True, text=True,
                           cwd=ROOT, timeout=60, env={"PATH": "/usr/bin:/bin", "EP_TRAIN_ROOT": str(ROOT)})
        assert p.returncode == 2 and msg in p.stderr, (args, p.stderr)
    # a Python without ep-train's packages (no .venv on a compute node; from the repo folder it still finds the
    # ep_train sources): the fix is named, not a ModuleNotFoundError from inside a worker
    bare = getattr(sys, "_base_executable", sys.executable)  # the interpreter the .venv was made from
    lacks = subprocess.run([bare, "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60).stdout.strip()
    cases = [("/bin/false", "lacks (the Python does not run): run tools/setup_env.sh")]
    if lacks == "True":  # (where the base interpreter has torch itself, only the other case runs)
        cases.append((bare, "torch deepspeed: run tools/setup_env.sh"))
    for python, says in cases:
        p = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "--config", str(CONFIG), "--data",
                            str(built)], capture_output=True, text=True, cwd=ROOT, timeout=60,
                           env={"PATH": "/usr/bin:/bin", "EP_TRAIN_PYTHON": python})
        assert p.returncode == 2 and says in p.stderr and "EP_TRAIN_PYTHON" in p.stderr, (python, p.stderr)
    # an sbatch template submitted from outside the repository, without EP_TRAIN_ROOT
    p = subprocess.run(["bash", str(ROOT / "launch/slurm/train.sbatch"), "c", "r", "d"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 2 and "set EP_TRAIN_ROOT=/path/to/ep-train" in p.stderr, p.stderr
    # a value with spaces and glob characters stays one argument (no word splitting, no eval)
    weird = tmp_path / "my config *.yaml"
    p = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "--config", str(weird)], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and f"'{weird}' not found" in p.stderr


def test_launchers_refuse_what_would_misrun_before_starting(tmp_path) -> None:
    """Refused with one error line and exit 2 before anything starts: trainer overrides that replace what the
    launcher passes itself (the trainer's argparse keeps the last --config/--run-dir, even abbreviated); static
    multi-node torchrun without --node-rank (a second rank 0: a hang); in DeepSpeed's ssh/pdsh mode, a path or
    value that the remote shell, which gets them unquoted, would run or break. The config refuses an infinite
    learning rate, so a launch passing the launcher's checks stops at `ep-train check`, never starts a worker."""
    bad = tmp_path / "bad.yaml"
    odd = tmp_path / "c(1).yaml"  # fine locally, a syntax error for the remote shell
    for config in (bad, odd):
        config.write_text("train:\n  learning_rate: .inf\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    (tmp_path / "two").write_text("a.invalid slots=1\nb.invalid slots=1\n")
    (tmp_path / "one").write_text("localhost slots=2\n")
    (tmp_path / "w;x").mkdir()
    static = ["--nnodes", "2", "--master-addr", "127.0.0.1"]
    ssh = ["deepspeed.sh", "--config", str(bad), "--data", str(data), "--hostfile", str(tmp_path / "two")]
    cases = [  # (arguments, working folder, what the error says); None = passes to ep-train check
        (["torchrun.sh", "--config", str(bad), "--data", str(data), *static], ROOT, "needs --node-rank R on each"),
        (["torchrun.sh", "--config", str(bad), "--data", str(data), *static, "--node-rank", "2"], ROOT,
         "--node-rank 2 is invalid with --nnodes 2"),
        (["torchrun.sh", "--config", str(bad), "--data", str(data), *static, "--node-rank", "1"], ROOT, None),
        (["torchrun.sh", "--config", str(bad), "--data", str(data), "--", "--run-dir", "x"], ROOT,
         "'--run-dir x' would move the trainer out of the run folder"),
        (["torchrun.sh", "--config", str(bad), "--", "--seed", "1", "--conf=x.yaml"], ROOT,
         "'--conf=x.yaml' would replace the config"),
        (["torchrun.sh", "--config", str(bad), "--data", str(data), "--", "--data-dir", "x"], ROOT,
         "'--data-dir x' sets data.data_dir, which this script passes itself; give it once, as --data"),
        (["torchrun.sh", "--config", str(bad), "--", "--data-dir", str(data), "--resume", "auto"], ROOT, None),
        (["deepspeed.sh", "--config", str(bad), "--resume", "auto", "--", "--train.resume=auto"], ROOT,
         "'--train.resume=auto' sets train.resume"),
        ([*ssh[:2], str(odd), *ssh[3:]], ROOT, f"the argument '{odd}' has characters"),
        ([*ssh, "--", "--tokenizer", "t$(id).model"], ROOT, "the argument 't$(id).model' has characters"),
        (ssh, tmp_path / "w;x", f"the working folder '{tmp_path / 'w;x'}' has characters"),
        ([*ssh, "--", "--data_path", "0.5 a 0.5 b"], ROOT, None),  # quoted by DeepSpeed: a space is safe
        ([*ssh[:2], str(odd), *ssh[3:], "--no_ssh", "--node_rank", "0", "--master_addr", "127.0.0.1"], ROOT, None),
        ([*ssh[:2], str(odd), *ssh[3:6], str(tmp_path / "one")], tmp_path / "w;x", None),  # one host: local
    ]
    for args, cwd, msg in cases:
        p = subprocess.run(["bash", str(ROOT / "launch" / args[0]), *args[1:]], capture_output=True, text=True,
                           cwd=cwd, timeout=60, env={"PATH": "/usr/bin:/bin"})
        want = msg or "train.learning_rate = inf"
        assert p.returncode == 2 and p.stderr.count("error:") == 1 and want in p.stderr, (args, cwd, p.stderr)
        assert "running:" not in p.stdout, (args, p.stdout)


def test_default_nproc_counts_the_gpus_this_node_may_use(tmp_path) -> None:
    """launch/common.sh default_nproc: only `nvidia-smi -L`'s "GPU N:" lines (without a GPU it prints "No devices
    were found", which counted as 1 process), narrowed to CUDA_VISIBLE_DEVICES when set (8 listed, 2 visible
    gave 8): "" or -1 = none, so 2 CPU processes; CUDA ignores the entries from the first invalid one on."""
    smi = tmp_path / "nvidia-smi"
    eight = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i}a)\n" for i in range(8))
    for listing, visible, want in (("No devices were found\n", None, "2"), (eight, None, "8"), (eight, "0,1,2", "3"),
                                   (eight, "", "2"), (eight, "-1", "2"), (eight, "5,6,7,-1,0", "3"),
                                   (eight, ",".join(map(str, range(10))), "8")):
        smi.write_text(f"#!/bin/sh\ncat <<'EOF'\n{listing}EOF\n")
        smi.chmod(0o755)
        env = {"PATH": f"{tmp_path}:/usr/bin:/bin", **({} if visible is None else {"CUDA_VISIBLE_DEVICES": visible})}
        p = subprocess.run(["bash", "-c", 'source "$1" && default_nproc', "-", str(ROOT / "launch" / "common.sh")],
                           capture_output=True, text=True, env=env, timeout=30)
        assert (p.returncode, p.stdout.strip()) == (0, want), (listing[:30], visible, p.stderr)
