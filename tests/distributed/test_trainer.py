"""`ep-train train` under torchrun + DeepSpeed ZeRO-3 + CPU offload + EP, against a single-process run.

Each run is a real multi-process job (gloo) launched as users launch it, with a hard timeout.
"""

from __future__ import annotations

import json
import math
import os
import shutil
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
from tests.distributed.harness import read_losses as losses
from tests.distributed.reference_train import reference_losses

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny.yaml"
STEPS = 20
COMMON = ["--seq_len", "32", "--max_steps", str(STEPS), "--warmup_steps", "4"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(run_dir: Path, data: Path, nproc: int, *extra: str, fsize_limit: int | str | None = None,
           limited_rank: int = 0) -> subprocess.Popen:
    """``fsize_limit``: a file-size limit on rank ``limited_rank`` only, standing in for a full disk on its node
    (the trainer turns SIGXFSZ into EFBIG)."""
    trainer = ["-m", "ep_train.train"] if fsize_limit is None else \
        ["-m", "tests.distributed.limited_rank", str(fsize_limit), str(limited_rank)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *trainer,
           "--config", str(CONFIG), "--run-dir", str(run_dir), "--data_dir", str(data), *COMMON, *extra]
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)


def train(run_dir: Path, data: Path, nproc: int, *extra: str, expect_rc: int = 0, timeout: float = 600) -> str:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    proc = launch(run_dir, data, nproc, *extra)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise
    out = (run_dir.parent / f"{run_dir.name}.log").read_text()
    assert rc == expect_rc, f"exit {rc} (wanted {expect_rc}):\n{out[-5000:]}"
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()


@pytest.fixture(scope="module")
def reference(built) -> list[float]:
    cfg = load_config(CONFIG, parse_overrides(["--data_dir", str(built), *COMMON]))
    return reference_losses(cfg, STEPS)


def _assert_close(got: dict[int, float], ref: list[float], skip: set[int] = frozenset()) -> None:
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, want in enumerate(ref, 1):
        if step in skip:
            assert math.isnan(got[step])
            continue
        assert abs(got[step] - want) <= 1e-5 * abs(want), f"step {step}: {got[step]} vs reference {want}"


@pytest.mark.parametrize("nproc,ckpt", [(2, "false"), (2, "full"), (4, "false"), (4, "experts"), (2, "attention"),
                                        (2, "compile"), (2, "full-reuse-comm"), (4, "full-module-gather")])
def test_zero3_offload_ep_matches_single_process(tmp_path, built, reference, nproc, ckpt) -> None:
    run = tmp_path / "run"
    profile = (nproc, ckpt) == (2, "full")  # one case also profiles a step: it must not change the numbers
    recompute = {"false": ["--activation_checkpointing", "false"],  # torch.compile per block, with recompute:
                 "compile": ["--activation_checkpointing", "true", "--compile", "true"],
                 # the recompute takes the forward's all-to-all results (train.recompute_comm false)
                 "full-reuse-comm": ["--activation_checkpointing", "true", "--recompute_comm", "false"],
                 # DeepSpeed's per-submodule ZeRO-3 gathers (the default gathers a whole block at once)
                 "full-module-gather": ["--activation_checkpointing", "true", "--zero3_gather", "module"]}.get(
        ckpt, ["--activation_checkpointing", "true", "--recompute", ckpt])
    out = train(run, built, nproc, *recompute, "--ep_size", "2", *(["--profile_step", "5"] if profile else []))
    _assert_close(losses(run), reference)
    if profile:
        for rank in range(nproc):
            assert "aten::mm" in (run / "profile" / f"rank{rank}_step5.txt").read_text()
            trace = json.loads((run / "profile" / f"rank{rank}_step5.json").read_text())
            assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    assert reference[-1] < reference[0] - 0.1  # it really learns
    # ZeRO-3 really partitions: dense over all ranks, experts over their expert-data-parallel group.
    model_cfg = load_config(CONFIG, parse_overrides(["--seq_len", "32"]))
    from ep_train.model import build_model

    full = {n: p.numel() for n, p in build_model(model_cfg.model, model_cfg.moe).named_parameters()}
    ep, edp = 2, nproc // 2
    for rank in range(nproc):
        rep = json.loads((run / "partitions" / f"rank{rank}.json").read_text())
        for name, (local, logical) in rep["params"].items():
            if name.endswith(("experts.w1", "experts.w2", "experts.w3")):
                assert logical == full[name] // ep, name  # this rank's experts only
                assert local == math.ceil(logical / edp), name
            else:
                assert logical == full[name], name
                assert local == math.ceil(logical / nproc), name
    assert "expert cv" in out and "saved checkpoint" in out
    assert ("gathered a block at a time: 2 blocks" in out) == (ckpt != "full-module-gather")  # parallel.zero3_gather
    # The busiest EP rank's rows over the mean rank's, per layer: measured within each EP group. With one group
    # (2 processes) it is the figure from the world's counts; with two (4 processes) at least that (groups
    # unbalanced in opposite directions cancel in the world's sum, not in the per-group mean).
    recs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "expert_counts" in r]
    assert recs
    for r in recs:
        for layer, counts in r["expert_counts"].items():
            first, second = sum(counts[:len(counts) // 2]), sum(counts[len(counts) // 2:])
            whole = max(first, second) / ((first + second) / 2)
            got = r["moe"][layer]["ep_rank_max_over_mean"]
            assert (abs(got - whole) < 1e-9) if nproc == 2 else (got >= whole - 1e-9), (r["step"], layer, got, whole)


VARIANT = ["--expert_bias_update_rate", "0.01", "--cv_loss_weight", "0.05", "--router_entropy_loss_weight", "0.02",
           "--num_expert_groups", "2", "--top_groups", "1"]


def test_routing_variants_under_zero3_offload_match_single_process(tmp_path, built) -> None:
    """Aux-loss-free bias (updated from counts summed over the ranks), the CV^2 and entropy terms and
    group-limited routing at world 2, EP 2, ZeRO-3 + offload, activation checkpointing, against the
    single-process reference with the bias update written out; the bias survives a save exactly."""
    cfg = load_config(CONFIG, parse_overrides(["--data_dir", str(built), *COMMON, *VARIANT]))
    ref_bias: dict[int, dict[str, list[float]]] = {}
    ref = reference_losses(cfg, STEPS, biases=ref_bias)
    run = tmp_path / "run"
    train(run, built, 2, "--activation_checkpointing", "true", "--ep_size", "2", "--save_interval", "10", *VARIANT)
    _assert_close(losses(run), ref)
    saved = [json.loads((run / "checkpoints" / f"step_{s:08d}" / "ep_train_state.json").read_text())["expert_bias"]
             for s in (10, 20)]
    assert set(saved[0]) == {"0", "1"} and all(len(v) == 4 for v in saved[0].values())
    assert saved == [ref_bias[10], ref_bias[20]]  # bit-exact: the same float32 updates from the same counts
    assert any(b != 0 for step in ref_bias.values() for v in step.values() for b in v)  # it does move
    # resume from step 10: the restored bias must give the straight run's steps 11-20
    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoints" / "step_00000010", resumed / "checkpoints" / "step_00000010")
    (resumed / "checkpoints" / "latest").write_text("step_00000010")
    train(resumed, built, 2, "--activation_checkpointing", "true", "--ep_size", "2", "--resume", "auto", *VARIANT)
    got = losses(resumed)
    assert sorted(got) == list(range(11, STEPS + 1))
    for step in range(11, STEPS + 1):
        assert abs(got[step] - ref[step - 1]) <= 1e-5 * abs(ref[step - 1]), (step, got[step], ref[step - 1])
    final = json.loads((resumed / "checkpoints" / "step_00000020" / "ep_train_state.json").read_text())
    assert final["expert_bias"] == saved[1]  # bit-exact after the round trip and 10 more updates
    import ep_train
    from ep_train.model.moe import expert_biases

    assert expert_biases(ep_train.load(resumed).model) == saved[1]  # generation selects as training did


def test_expert_choice_trains_under_zero3_offload(tmp_path, built) -> None:
    """Expert-choice routing end to end at world 2, EP 2, ZeRO-3 + offload with recompute and global
    balance statistics switched on: finite, learning, every expert at capacity."""
    run = tmp_path / "run"
    out = train(run, built, 2, "--activation_checkpointing", "true", "--ep_size", "2", "--router_type",
                "expert_choice", "--capacity_factor", "2.0", "--max_steps", "8", "--warmup_steps", "2")
    got = losses(run)
    assert sorted(got) == list(range(1, 9)) and all(math.isfinite(v) for v in got.values())
    assert got[8] < got[1]
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    counts = [r["expert_counts"] for r in recs if r.get("expert_counts")]
    assert counts, out[-2000:]
    for layer_counts in counts[-1].values():
        assert len(set(layer_counts)) == 1  # every expert took exactly its capacity


def test_resume_after_signal_gives_the_same_losses(tmp_path, built, reference) -> None:
    """SIGUSR1 mid-run, while an interval save is being written: the run stops on that checkpoint (no step
    trained, no second save), exit 75; --resume auto continues and gives the straight run's losses."""
    run = tmp_path / "run"
    run.parent.mkdir(parents=True, exist_ok=True)
    proc = launch(run, built, 2, "--ep_size", "2", "--save_interval", "3")
    ckpts, deadline, signalled = run / "checkpoints", time.monotonic() + 600, None
    while time.monotonic() < deadline and proc.poll() is None and signalled is None:
        for step in range(9, STEPS, 3):  # a save under way: its folder exists, its manifest not yet
            folder = ckpts / f"step_{step:08d}"
            if folder.is_dir() and not (folder / "manifest.json").exists():
                workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                           if "ep_train.train" in _cmdline(c)]
                assert workers, "no trainer processes found"
                for w in workers:
                    w.send_signal(signal.SIGUSR1)
                # the notice is in before the save ended only if the manifest was still missing after it
                signalled = step if not (folder / "manifest.json").exists() else -1
                break
        time.sleep(0.005)
    rc = proc.wait(timeout=600)
    log = (run.parent / "run.log").read_text()
    assert rc != 0 and "stopped on signal" in log, log[-3000:]
    stopped_at = max(losses(run))
    assert 9 <= stopped_at < STEPS
    if signalled != -1:  # -1: the save had ended when the notice came (the run then stops after the next step)
        assert stopped_at == signalled, (signalled, log[-3000:])
        assert log.count(f"saved checkpoint {ckpts / f'step_{stopped_at:08d}'}") == 1
    assert (run / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
    train(run, built, 2, "--ep_size", "2", "--resume", "auto")
    _assert_close(losses(run), reference)
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped_at:08d}'}" in (run.parent / "run.log").read_text()

    # TensorBoard holds the scalars users look for (read back with tensorboard's own reader).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lm_loss", "train/aux_loss", "train/z_loss", "train/lr", "train/grad_norm",
                "throughput/tokens_per_sec", "moe/layer_0/tokens_per_expert_cv", "moe/layer_1/entropy",
                "moe/layer_1/dropped_frac"):
        assert tag in tags, (tag, sorted(tags))
    assert "moe/expert_load" in acc.Tags()["images"]
    assert [e.step for e in acc.Scalars("train/loss")][-1] == STEPS


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, built) -> None:
    cfg = load_config(CONFIG, parse_overrides(["--data_dir", str(built), *COMMON]))
    ref = reference_losses(cfg, STEPS, skip={3})
    run = tmp_path / "one"
    train(run, built, 2, "--ep_size", "2", "--inject_nonfinite_steps", "3")
    _assert_close(losses(run), ref, skip={3})  # step 3 changed nothing: later losses follow the reference
    last = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r][-1]
    assert last["skipped_steps"] == 1

    # NaN in one parameter's gradient (the loss stays finite): DeepSpeed skips the update, counted alike;
    # a routing-collapse watch set to fire (threshold near the balanced share) names layer and expert.
    run = tmp_path / "grad"
    out = train(run, built, 2, "--ep_size", "2", "--inject_nonfinite_steps", "3", "--inject_nonfinite_into", "grad",
                "--collapse_threshold", "0.99", "--collapse_intervals", "2")
    got = losses(run)
    assert math.isfinite(got[3])
    _assert_close({k: (float("nan") if k == 3 else v) for k, v in got.items()}, ref, skip={3})
    assert "skipped 1" in out
    assert "WARNING: routing collapse? layer " in out and "for 2 logging intervals in a row" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/skipped_steps")][-1] == 1

    run = tmp_path / "many"
    out = train(run, built, 2, "--ep_size", "2", "--inject_nonfinite_steps", "3,4,5", "--max_consecutive_skips", "3",
                expect_rc=1)  # torchrun reports a failed worker as 1
    assert "3 consecutive steps had a non-finite loss" in out
    assert (run / "checkpoints" / "latest").read_text() == "step_00000005"

    # A stop in the middle of the streak (after step 4) and a resume: the count goes on (before: it restarted at 0
    # and the resumed run trained past the limit). Its data has no validation split: said before step 1.
    data = tmp_path / "no_val"
    shutil.copytree(built, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"] = []
    (data / "manifest.json").write_text(json.dumps(manifest))
    run = tmp_path / "streak"
    streak = ["--ep_size", "2", "--inject_nonfinite_steps", "3,4,5", "--max_consecutive_skips", "3",
              "--eval_interval", "2"]
    out = train(run, data, 2, *streak, "--max_steps", "4")
    assert "WARNING: train.eval_interval = 2 but no data source has validation split" in out, out[-3000:]
    out = train(run, data, 2, *streak, "--resume", "auto", expect_rc=1)
    assert "3 consecutive steps had a non-finite loss (step 5)" in out, out[-3000:]


def test_memory_marks_in_metrics(tmp_path, built) -> None:
    """The set-up peak (engine built, before step 1) and the final peak (after the last save) are logged.
    With train.save_at_end false the run keeps its interval checkpoint (step 1) and writes none at the end."""
    run = tmp_path / "run"
    out = train(run, built, 2, "--ep_size", "2", "--max_steps", "2", "--warmup_steps", "1", "--save_interval", "1",
                "--save_at_end", "false")
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001"]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000001"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    setup = [r for r in recs if r.get("phase") == "setup"]
    final = [r for r in recs if r.get("phase") == "final"]
    steps = [r for r in recs if "max_rss_mb" in r]
    assert len(setup) == 1 and len(final) == 1 and steps
    assert recs.index(setup[0]) < recs.index(steps[0]) and recs[-1] is final[0]
    assert 0 < setup[0]["setup_max_rss_mb"] <= steps[-1]["max_rss_mb"] <= final[0]["final_max_rss_mb"]
    per_rank = final[0]["final_rss_mb_per_rank"]
    assert len(per_rank) == 2 and min(per_rank) > 0 and max(per_rank) == final[0]["final_max_rss_mb"]
    assert all(a <= b for a, b in zip(setup[0]["setup_rss_mb_per_rank"], per_rank))  # peaks only grow
    assert "peak RSS of the largest rank, setup" in out
