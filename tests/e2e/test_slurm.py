"""The SLURM templates on a real one-node Slurm (started by the test): train, preempt + requeue, data prep."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import CORPUS
from tests.distributed.harness import read_losses as _losses
from tests.e2e.slurm_cluster import SlurmCluster, ensure_installed
from tests.e2e.test_launchers import start_decoy

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["--seq_len", "32", "--max_steps", "16", "--warmup_steps", "2", "--ep_size", "2", "--log_interval", "1"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    cluster.env.update(EP_TRAIN_ROOT=str(ROOT), OMP_NUM_THREADS="1")
    yield cluster
    cluster.stop()


def _submit_train(slurm: SlurmCluster, tmp: Path, run: Path, data: Path) -> str:
    return slurm.run("sbatch", "--parsable", f"--output={tmp}/train-%j.out", str(ROOT / "launch/slurm/train.sbatch"),
                     str(ROOT / "configs/tiny.yaml"), str(run), str(data), *TRAIN, cwd=tmp).strip().split(";")[0]


@pytest.fixture(scope="module")
def straight(slurm, built, tmp_path_factory) -> dict[int, float]:
    """An uninterrupted run through train.sbatch."""
    tmp = tmp_path_factory.mktemp("straight")
    run = tmp / "run"
    job = _submit_train(slurm, tmp, run, built)
    state = slurm.wait(job)
    log = (tmp / f"train-{job}.out").read_text()
    assert state == "COMPLETED", f"{state}\n{log[-4000:]}\n{slurm.log_tail()}"
    assert (run / "checkpoints" / "latest").read_text() == "step_00000016"
    assert "running:" in log and "--rdzv-backend c10d" in log  # the script says what it runs
    # each node's torchrun (one task per node) may use the job's CPUs on that node: a step without -c gets
    # them (Slurm 22.05.8 with task/affinity; a step asking fewer, e.g. srun -c1, is bound to fewer and fails here)
    assert re.search(r": 2 worker\(s\) on 2 CPU\(s\)", log), log[-3000:]
    return _losses(run)


def test_train_sbatch_runs_to_the_end(straight) -> None:
    assert sorted(straight) == list(range(1, 17))
    assert straight[16] < straight[1]


def test_preempted_job_checkpoints_requeues_and_finishes_identically(slurm, built, tmp_path, straight) -> None:
    """Also: a trainer of another job on the same node (a decoy with a matching command line, which the
    old `pkill -f` reached) must not receive the job's stop signal."""
    decoy, hit = start_decoy(tmp_path)
    try:
        _preempt_and_finish(slurm, built, tmp_path, straight)
        assert decoy.poll() is None and not hit.exists(), "the job's USR1 reached a process outside the job"
    finally:
        decoy.kill()


def _preempt_and_finish(slurm: SlurmCluster, built: Path, tmp_path: Path, straight: dict[int, float]) -> None:
    run = tmp_path / "run"
    job = _submit_train(slurm, tmp_path, run, built)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").is_file() and max(_losses(run), default=0) >= 4:
            break
        assert slurm.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), slurm.job_state(job)
        time.sleep(0.5)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    # the job stops, saves, requeues itself, runs again and completes
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and slurm.job_field(job, "Restarts") in ("", "0"):
        time.sleep(0.5)
    assert slurm.job_field(job, "Restarts") == "1", slurm.log_tail()
    if slurm.job_state(job) == "PENDING":  # a requeued job waits for its BeginTime; let it start soon
        # Not "now": slurmd revokes the job's credential when it is requeued and refuses a credential made in
        # the same second ("Killing non-startable batch JobId=N: Job credential revoked", seen in CI).
        slurm.run("scontrol", "update", f"jobid={job}", "StartTime=now+2")
    state = slurm.wait(job)
    log = (tmp_path / f"train-{job}.out").read_text()
    assert state == "COMPLETED", f"{state}\n{log[-4000:]}"
    assert "caught USR1" in log and "requeueing job" in log and "stopped on signal at step" in log
    stopped = int(log.split("stopped on signal at step ")[1].split(";")[0])
    assert 4 <= stopped < 16
    assert f"step_{stopped:08d}" in log and "resumed from" in log
    got = _losses(run)
    assert sorted(got) == list(range(1, 17))
    for step in range(1, 17):  # same numbers as the uninterrupted job
        assert abs(got[step] - straight[step]) <= 1e-5 * abs(straight[step]), (step, got[step], straight[step])
    assert not (run / "stopped_on_signal.json").exists()


def test_train_sbatch_refuses_overrides_it_passes_itself(tmp_path) -> None:
    """No cluster needed: the script checks before it asks Slurm anything. A user's --resume DIR replaced the
    script's --resume auto, so every requeue restarted from DIR; --run-dir moved the trainer away from the
    folder the script watches for the stop marker; --config and --data_dir replaced the script's own."""
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    for extra, want in ((["--resume", str(tmp_path / "step_100")], "needs its --resume auto to continue from RUN_DIR"),
                        (["--run_dir=elsewhere"], "would move the trainer out of the run folder"),
                        (["--config", "other.yaml"], "give it once, as CONFIG (the first argument)"),
                        (["--data.data_dir", str(data)], "give it once, as DATA_DIR (the third argument)")):
        p = subprocess.run(["bash", str(ROOT / "launch/slurm/train.sbatch"), str(ROOT / "configs/tiny.yaml"), str(run),
                            str(data), "--lr", "0.001", *extra], capture_output=True, text=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin", "EP_TRAIN_ROOT": str(ROOT)})
        assert p.returncode == 2 and p.stderr.count("error:") == 1 and want in p.stderr, (extra, p.stderr)
    assert not run.exists()  # refused before the script made anything


def _stub(folder: Path, name: str, body: str) -> None:
    (folder / name).write_text(f"#!/bin/sh\n{body}\n")
    (folder / name).chmod(0o755)


def test_train_sbatch_takes_data_dir_from_the_config_and_overrides_after_a_double_dash(tmp_path, built) -> None:
    """No cluster needed (scontrol and srun are stubs that record what they get): DATA_DIR "" leaves the config's
    own data.data_dir, as launch/torchrun.sh does (the config check was given --data_dir "" and refused the
    config: 'data.data_dir is not set'), and overrides may follow a "--" as with torchrun.sh (it was passed on)."""
    bin_dir, run = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    _stub(bin_dir, "scontrol", "echo localhost")
    _stub(bin_dir, "srun", f'printf "%s\\n" "$@" > "{tmp_path}/srun_args"')
    import yaml

    cfg = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    cfg.setdefault("data", {})["data_dir"] = str(built)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "EP_TRAIN_ROOT": str(ROOT), "SLURM_JOB_ID": "7", "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "localhost", "EP_TRAIN_NPROC_PER_NODE": "2"}
    p = subprocess.run(["bash", str(ROOT / "launch/slurm/train.sbatch"), str(config), str(run), "", "--",
                        "--lr", "0.001"], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert args.count("--") == 1 and args[args.index("--") + 1:] == ["--lr", "0.001"], args
    assert "--data" not in args, args  # DATA_DIR "" passes no --data to torchrun.sh


def test_data_prep_sbatch_needs_the_builds_task_count(tmp_path, tokenizer) -> None:
    """A rerun of one failed task (--array=5) took the array's size (1) as the build's task count; now the count
    comes from EP_TRAIN_DATA_TASKS (set by submit_data_prep.sh), and an array that is not 0-N without it is
    refused, as is a task id outside the count."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "python", "echo \"$@\"")
    base = {"PATH": "/usr/bin:/bin", "EP_TRAIN_ROOT": str(ROOT), "EP_TRAIN_PYTHON": str(bin_dir / "python")}
    cases = [({"SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_MAX": "5", "SLURM_ARRAY_TASK_COUNT": "1",
               "SLURM_ARRAY_TASK_ID": "5"}, "is not 0-N"),
             ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "1", "EP_TRAIN_DATA_TASKS": "8"},
              "array task 9 is outside the build's 8 tasks"),
             ({"SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_MAX": "5", "SLURM_ARRAY_TASK_COUNT": "1",
               "SLURM_ARRAY_TASK_ID": "5", "EP_TRAIN_DATA_TASKS": "8"}, None),
             ({"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "2", "SLURM_ARRAY_TASK_COUNT": "3",
               "SLURM_ARRAY_TASK_ID": "1"}, None)]
    for env, error in cases:
        p = subprocess.run(["bash", str(ROOT / "launch/slurm/data_prep.sbatch"), str(tokenizer), str(tmp_path / "o"),
                            str(CORPUS[0])], capture_output=True, text=True, timeout=60, env={**base, **env})
        if error:
            assert p.returncode == 2 and error in p.stderr, (env, p.stderr)
        else:
            tasks = env.get("EP_TRAIN_DATA_TASKS", env["SLURM_ARRAY_TASK_COUNT"])
            assert p.returncode == 0 and f"--num-tasks {tasks} --task-id {env['SLURM_ARRAY_TASK_ID']}" in p.stdout, p


def test_data_prep_array_job_and_merge(slurm, tokenizer, tmp_path) -> None:
    out = tmp_path / "shards"
    text = slurm.run(str(ROOT / "launch/slurm/submit_data_prep.sh"), "2", str(tokenizer), str(out),
                     *map(str, CORPUS), cwd=tmp_path)
    m = re.search(r"array job (\d+) \(2 tasks\), merge job (\d+)", text)
    assert m, text
    array_id, merge_id = m.groups()
    assert slurm.wait(merge_id) == "COMPLETED", slurm.log_tail() + "\n".join(
        p.read_text() for p in (tmp_path / "logs").glob("*"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert {Path(s["prefix"]).parent.name for s in manifest["splits"]["train"]["shards"]} == {"part_00000",
                                                                                                "part_00001"}
    from ep_train.data.prep import build

    single = build([str(c) for c in CORPUS], str(tokenizer), str(tmp_path / "single"), progress=False)
    assert manifest["splits"]["train"]["tokens"] == single["splits"]["train"]["tokens"]
    assert array_id != merge_id
    assert os.path.isdir(tmp_path / "logs")
