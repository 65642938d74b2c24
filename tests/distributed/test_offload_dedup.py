"""ep_train.parallel.ds_memory: ZeRO-3 + CPU offload without DeepSpeed's duplicate master and gradient buffers.

World 2, EP 2, accumulation 2 (8 = 2 micro x 2 ranks x 2), gradient clipping active on every step, and a
router that starves experts on some steps (expert 0 on one step in three, both of EP rank 0's experts on
another, so that rank's expert weights get no tokens at all). With and without the deduplication the
losses and the final fp32 masters are bitwise equal; a resume under it continues exactly; the buffers
really share storage and the peak RSS falls by the bytes they held.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ep_train.config import load_config, parse_overrides
from tests.distributed.harness import read_losses, run_distributed

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny.yaml"
STEPS = 8
COMMON = ["--seq_len", "32", "--warmup_steps", "2", "--ep_size", "2", "--grad_clip", "0.05", "--log_interval", "1"]


def _ds_json(folder: Path, dedup: bool, fp32_accum: bool = False, fast: bool = True) -> str:
    ds = json.loads((ROOT / "ds_configs" / "zero3_offload.json").read_text())
    ds["ep_train"] = {"dedup_offload_buffers": dedup, "fast_grad_path": fast}
    if fp32_accum:
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    path = folder / f"ds_{'on' if dedup else 'off'}{'_fp32acc' if fp32_accum else ''}{'' if fast else '_slow'}.json"
    path.write_text(json.dumps(ds))
    return str(path)


def _starve_routers(trainer: Any) -> None:
    """Route no token to expert 0 on steps 1, 4, 7 and to experts 0 and 1 (all of EP rank 0's) on steps 2, 5:
    a replacement is the lowest unstarved expert not already in the token's row. Keyed on the step, so the
    recompute of activation checkpointing and a resumed run route alike."""
    import torch

    from ep_train.model.router import Router

    orig = Router.forward

    def forward(self: Router, x: torch.Tensor):  # type: ignore[no-untyped-def]
        r = orig(self, x)
        starved = {1: [0], 2: [0, 1]}.get(trainer.step % 3, [])
        if not starved:
            return r
        ids = r.expert_ids.clone()  # [T, K]
        for col in range(ids.shape[1]):
            for e in starved:
                hit = ids[:, col] == e
                for c in (c for c in range(self.num_experts) if c not in starved):
                    free = hit & ~(ids == c).any(dim=1)
                    ids[free, col] = c
                    hit = hit & ~free
        assert not any((ids == e).any() for e in starved)
        return r._replace(expert_ids=ids)

    Router.forward = forward  # this worker process only


def _train(rank: int, world: int, data: str, run_dir: str, ds: str, extra: list[str]) -> dict[str, Any]:
    import hashlib

    import torch

    from ep_train.parallel.ds_memory import shared_summary
    from ep_train.train.trainer import Trainer

    cfg = load_config(CONFIG, parse_overrides(["--data_dir", data, *COMMON, "--ds_config", ds, *extra]))
    trainer = Trainer(cfg, Path(run_dir))
    _starve_routers(trainer)
    opt = trainer.engine.optimizer
    # Parameters (with real data in this rank's partition) that got no gradient in a micro-step / a window:
    # there DeepSpeed's buffers and the shared ones could differ (see ds_memory's docstring).
    real = [p for g in opt.fp16_groups for p in g
            if p.partition_numel() * opt._get_param_partition_rank(p) < p.ds_numel]
    seen: set[int] = set()
    missing: dict[str, list[int]] = {"micro_steps": [], "windows": []}
    partition_grads, backward, pre_step = opt.partition_grads, trainer.engine.backward, opt._pre_step

    def recording_partition_grads(params: list, grads: list) -> Any:
        seen.update(p.ds_id for p in params)
        return partition_grads(params, grads)

    def recording_backward(*args: Any, **kwargs: Any) -> Any:
        seen.clear()
        out = backward(*args, **kwargs)
        missing["micro_steps"].append(sum(p.ds_id not in seen for p in real))
        return out

    def recording_pre_step() -> None:
        missing["windows"].append(sum(p.ds_id not in opt._offload_boundary_param_ids for p in real))
        pre_step()

    opt.partition_grads, trainer.engine.backward, opt._pre_step = (recording_partition_grads, recording_backward,
                                                                   recording_pre_step)
    assert trainer.fit() == 0
    acc = opt.grad_partitions_flat_buffer
    out: dict[str, Any] = {"summary": shared_summary(opt), "missing_grads": missing, "grad_accum_dtype": str(acc.dtype),
                           "masters": hashlib.sha256(b"".join(t.detach().numpy().tobytes()
                                                              for t in opt.fp32_partitioned_groups_flat)).hexdigest(),
                           "partition_elements": sum(t.numel() for t in opt.fp32_partitioned_groups_flat)}
    # ds_grad_path: bound to this optimizer, and expert partitions on one-rank groups (its in-place path)
    out["fast_grad_path"] = "_constant_buffered_norm2" in vars(opt)
    out["bucket_copies_skipped"] = getattr(opt, "ep_train_bucket_copies_skipped", None)  # None: not patched
    out["one_rank_groups"] = sum(torch.distributed.get_world_size(opt._get_param_partition_group(p)) == 1
                                 for g in opt.fp16_groups for p in g)
    out["grad_shares_acc"] = [t.grad.untyped_storage().data_ptr() == acc.untyped_storage().data_ptr()
                              for t in opt.fp32_partitioned_groups_flat]
    out["master_shares_param"] = [m.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
                                  for m, p in zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat)]
    status = Path("/proc/self/status").read_text()
    out["vmhwm_kb"] = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    return out


def _run(tmp: Path, name: str, data: Path, ds: str, *extra: str) -> tuple[dict[int, float], list[dict[str, Any]]]:
    run = tmp / name
    args = ["--max_steps", str(STEPS), "--save_interval", "4", *extra]
    infos = run_distributed(_train, 2, str(data), str(run), ds, args, timeout=300)
    return read_losses(run), infos


def _grad_norms(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in recs if "grad_norm" in r]


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory, built) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("dedup_fp32")
    return {"tmp": tmp, "data": built, "off": _run(tmp, "off", built, _ds_json(tmp, False)),
            "on": _run(tmp, "on", built, _ds_json(tmp, True))}


def test_fp32_dedup_is_bitwise_equal_and_shares_storage(fp32_runs) -> None:
    (loss_off, off), (loss_on, on) = fp32_runs["off"], fp32_runs["on"]
    assert sorted(loss_on) == list(range(1, STEPS + 1))
    assert loss_on == loss_off  # bitwise: float equality of every step's loss
    assert [i["masters"] for i in on] == [i["masters"] for i in off]  # final fp32 masters, bytes
    print("parameters without a gradient per micro-step / window, per rank:", [i["missing_grads"] for i in on])
    for i in on:  # the recorders saw every backward and every step
        assert len(i["missing_grads"]["micro_steps"]) == 2 * STEPS and len(i["missing_grads"]["windows"]) == STEPS
        # Starved experts still get (zero) gradients: the precondition of bitwise equality (ds_memory docstring)
        assert not any(i["missing_grads"]["micro_steps"]) and not any(i["missing_grads"]["windows"]), i
    norms = _grad_norms(fp32_runs["tmp"] / "on")
    assert len(norms) == STEPS and min(norms) > 0.05, norms  # clipping scaled every step's gradient
    for i in on:
        assert all(i["grad_shares_acc"]) and all(i["master_shares_param"]), i
        assert i["summary"] == {"master_elements": i["partition_elements"], "grad_elements": i["partition_elements"]}
    for i in off:
        assert not any(i["grad_shares_acc"]) and not any(i["master_shares_param"]), i
        assert i["summary"] == {"master_elements": 0, "grad_elements": 0}


def test_fast_grad_path_is_bitwise_equal(fp32_runs) -> None:
    """ep_train.parallel.ds_grad_path (on in fp32_runs) against DeepSpeed's own gradient norm and reduce:
    losses, clipped gradient norms and final fp32 masters bitwise equal (every gradient partition of this
    model fits in one fp64 piece of the norm; tests/unit/test_ds_grad_path.py checks several pieces)."""
    tmp = fp32_runs["tmp"]
    loss_on, on = fp32_runs["on"]
    loss_slow, slow = _run(tmp, "slow", fp32_runs["data"], _ds_json(tmp, True, fast=False))
    assert [i["fast_grad_path"] for i in on] == [True, True] and [i["fast_grad_path"] for i in slow] == [False, False]
    assert all(i["one_rank_groups"] > 0 for i in on), on  # EP 2 of world 2: experts reduce over one rank
    # their gradients skipped DeepSpeed's bucket copy: 3 expert weights x 2 MoE layers x 2 micro-steps x 8 steps
    assert [i["bucket_copies_skipped"] for i in on] == [96, 96]
    assert [i["bucket_copies_skipped"] for i in slow] == [None, None]
    assert sorted(loss_on) == list(range(1, STEPS + 1)) and loss_on == loss_slow
    assert _grad_norms(tmp / "on") == _grad_norms(tmp / "slow")
    assert [i["masters"] for i in on] == [i["masters"] for i in slow]


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, built) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("dedup_bf16")
    bf16 = ("--mixed_precision", "bf16")
    return {"tmp": tmp, "off": _run(tmp, "off", built, _ds_json(tmp, False, fp32_accum=True), *bf16),
            "on": _run(tmp, "on", built, _ds_json(tmp, True, fp32_accum=True), *bf16),
            "slow": _run(tmp, "slow", built, _ds_json(tmp, True, fp32_accum=True, fast=False), *bf16)}


def test_bf16_fp32_accumulation_dedup_is_bitwise_equal(bf16_runs) -> None:
    (loss_off, off), (loss_on, on) = bf16_runs["off"], bf16_runs["on"]
    assert sorted(loss_on) == list(range(1, STEPS + 1))
    assert loss_on == loss_off
    assert [i["masters"] for i in on] == [i["masters"] for i in off]
    for i in on + off:
        assert i["grad_accum_dtype"] == "torch.float32", i
    for i in on:  # the bf16 parameters cannot be the fp32 masters; the fp32 gradients are shared
        assert all(i["grad_shares_acc"]) and not any(i["master_shares_param"]), i
        assert i["summary"] == {"master_elements": 0, "grad_elements": i["partition_elements"]}
    for i in off:
        assert not any(i["grad_shares_acc"]), i


def test_bf16_fast_grad_path_is_bitwise_equal(bf16_runs) -> None:
    """bf16 gradients accumulated in fp32: ds_grad_path scales the one-rank expert gradients in bf16, then
    converts, as DeepSpeed does."""
    (loss_on, on), (loss_slow, slow) = bf16_runs["on"], bf16_runs["slow"]
    assert [i["fast_grad_path"] for i in on] == [True, True] and [i["fast_grad_path"] for i in slow] == [False, False]
    assert [i["bucket_copies_skipped"] for i in on] == [96, 96], on  # bf16 gradients, bf16 communication: too
    assert [i["bucket_copies_skipped"] for i in slow] == [None, None], slow
    assert sorted(loss_on) == list(range(1, STEPS + 1)) and loss_on == loss_slow
    assert _grad_norms(bf16_runs["tmp"] / "on") == _grad_norms(bf16_runs["tmp"] / "slow")
    assert [i["masters"] for i in on] == [i["masters"] for i in slow]


def test_resume_under_dedup_continues_exactly(fp32_runs, built) -> None:
    """The deduplicated run saved at step 4 (save_interval 4); a new run resumed from there equals it."""
    tmp = fp32_runs["tmp"]
    step4 = tmp / "on" / "checkpoints" / "step_00000004"
    assert step4.is_dir(), sorted(p.name for p in step4.parent.iterdir())
    run = tmp / "resumed"
    run_distributed(_train, 2, str(built), str(run), _ds_json(tmp, True),
                    ["--max_steps", str(STEPS), "--resume", str(step4)], timeout=300)
    straight = fp32_runs["on"][0]
    got = read_losses(run)
    assert sorted(got) == list(range(5, STEPS + 1))
    assert got == {s: straight[s] for s in got}  # bitwise


def test_dedup_releases_host_memory(tmp_path, built, monkeypatch) -> None:
    """A 50M-parameter variant: the peak RSS of each rank falls by ~8 bytes per partition element. Freed
    tensors above 1 MiB go back to the OS (as in bench/scale.py), so glibc's heap does not blur the peaks."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(2 ** 20))  # inherited by the spawned ranks
    big = ("--hidden_size", "512", "--intermediate_size", "4096", "--max_steps", "2")
    peaks = {}
    for dedup in (False, True):
        infos = run_distributed(_train, 2, str(built), str(tmp_path / f"big_{dedup}"), _ds_json(tmp_path, dedup),
                                list(big), timeout=300)
        peaks[dedup] = [i["vmhwm_kb"] * 1024 for i in infos]
        elements = [i["partition_elements"] for i in infos]
    saved = [off - on for off, on in zip(peaks[False], peaks[True])]
    expected = [8 * n for n in elements]
    print(f"VmHWM per rank without / with dedup: {peaks[False]} / {peaks[True]} bytes; saved {saved}, "
          f"8 bytes x partition = {expected}")
    assert sum(saved) > 0.75 * sum(expected), (saved, expected)
    for s, e in zip(saved, expected):
        assert s > 0.5 * e, (saved, expected)


SUPER_OFFLOAD = r'''
import os, sys, types
import torch
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed
import deepspeed.runtime.superoffload.superoffload_stage3 as so
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.adam import DeepSpeedCPUAdam
import ep_train.parallel.ds_memory as m

so._validate_superoffload_accelerator = lambda: None  # its CUDA check; construction runs on the CPU
acc = get_accelerator()
stream = acc.current_stream
acc.current_stream = lambda *a, **k: stream(*a, **k) or types.SimpleNamespace(synchronize=lambda: None)
deepspeed.init_distributed(dist_backend="gloo")
ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0,
      "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "super_offload": True},
                            "stage3_param_persistence_threshold": 0}}
assert not m.dedup_enabled(ds)  # the JSON's super_offload switches the sharing off
m.dedup_enabled = lambda ds: True  # and were it on, the subclass itself is left alone
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
with m.lean_offload_buffers(ds):
    engine, *_ = deepspeed.initialize(model=model, optimizer=DeepSpeedCPUAdam(model.parameters(), lr=1e-2), config=ds)
opt = engine.optimizer
assert type(opt).__name__ == "SuperOffloadOptimizer_Stage3", type(opt)
assert "partition_grads" not in vars(opt) and m.shared_summary(opt) == {"master_elements": 0, "grad_elements": 0}
print("OK")
'''


def test_superoffload_keeps_its_own_optimizer_step(tmp_path) -> None:
    """DeepSpeed's SuperOffload (a ZeRO-3 subclass) steps CPU Adam inside its own partition_grads; the sharing
    replaced that method with the base class's, and the offloaded weights never changed (grad_clip 0; review).
    Now neither its JSON switch nor its class is patched."""
    import subprocess
    import sys

    from tests.distributed.harness import free_port

    script = tmp_path / "so.py"
    script.write_text(SUPER_OFFLOAD)
    p = subprocess.run([sys.executable, str(script), str(free_port())], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
