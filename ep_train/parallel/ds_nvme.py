"""ZeRO-3 checkpoints with optimizer states swapped to NVMe (DeepSpeed 0.19.8), for MoE and dense models.

With ``offload_optimizer.device: nvme`` DeepSpeed keeps, per optimizer sub-group, either

- a *swapped* sub-group (at least 1 MiB): fp32 master and Adam moments live in swap files; its
  ``save_checkpoint`` copies those files into ``step_N/offloaded_tensors/rankNN/`` and its load copies
  them back and rebuilds the parameters from the masters (``reset_swap_buffers``); the ZeRO shard
  (``*_optim_states.pt``) holds empty tensors for it; or
- an *in-memory* sub-group (smaller: norms, routers of a small model): master and moments in RAM,
  written to the ZeRO shard like any offloaded sub-group.

Two gaps in DeepSpeed 0.19.8 that this module closes:

1. ``engine._save_moe_checkpoint`` refuses AutoEP layers (ep-train's MoE layers, ``zero.py``) under
   ZeRO-3 with NVMe optimizer swapping, because AutoEP's ZeRO-3 format restores expert parameters from
   the optimizer's fp32 masters. With swapping those masters are in the copied swap files, which the load
   path restores for every swapped sub-group, experts included (``reset_swap_buffers`` writes the
   parameters from them). The refusal is the only use of the NVMe test in that method (the copy of the
   swap files happens after it, in ``save_checkpoint``), so ``allow_moe_save`` hides the NVMe setting from
   that one call.
2. With swapping, ``load_checkpoint`` skips the ZeRO shards altogether, so in-memory sub-groups keep
   their freshly initialised masters and moments, and every sub-group's Adam step count starts again
   from the initial one (bias correction then differs): the resumed run drifts from the unbroken one.
   (DeepSpeed's own shard loader, ``_rigid_load_state_dict``, crashes in CPU Adam when called for
   swapped states.) ``restore_from_shard`` reads this rank's shard after DeepSpeed's load and copies the
   step counts of every sub-group, and the masters, moments and parameters of the in-memory ones.
   tests/distributed/test_nvme.py checks that a resume continues exactly (MoE, EP 2).

Such a checkpoint resumes only with the optimizer on NVMe again, at the world size that wrote it (the swap
files are per rank and per sub-group); ``checkpoint_refusal`` names the mismatch before DeepSpeed meets it.
The universal form (resharding, export) reads the ZeRO shards, whose swapped sub-groups are empty:
``interop.universal.to_universal`` refuses such checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

OFFLOADED = "offloaded_tensors"  # DeepSpeed's folder of copied swap files in a step folder, one rankNN per rank


def nvme_optimizer(engine: Any) -> bool:
    return bool(engine.zero_optimization_partition_weights() and engine.zero_nvme_offload_optimizer())


def allow_moe_save(engine: Any) -> None:
    """Let ``engine.save_checkpoint`` save MoE layers with optimizer states on NVMe (see 1. above)."""
    if not (nvme_optimizer(engine) and engine.has_moe_layers):
        return
    save_moe = engine._save_moe_checkpoint

    def without_nvme_refusal(*args: Any, **kwargs: Any) -> Any:
        engine.zero_nvme_offload_optimizer = lambda: False  # instance attribute: this call only
        try:
            return save_moe(*args, **kwargs)
        finally:
            del engine.zero_nvme_offload_optimizer

    engine._save_moe_checkpoint = without_nvme_refusal


def checkpoint_refusal(step_dir: Path, nvme: bool, world: int) -> str | None:
    """Why a run with (``nvme``) or without optimizer states on NVMe cannot resume ``step_dir``, or None."""
    offloaded = step_dir / OFFLOADED
    if not offloaded.is_dir():
        if nvme:
            return (f"checkpoint {str(step_dir)!r} keeps its optimizer states in its ZeRO shards, but this run "
                    "swaps them to NVMe (parallel.nvme_offload_optimizer / offload_optimizer.device 'nvme'), "
                    "which resumes only from the swap files of a run that swapped them too; resume it with the "
                    "optimizer states in CPU RAM (parallel.nvme_offload_optimizer false)")
        return None
    if not nvme:
        return (f"checkpoint {str(step_dir)!r} was written with optimizer states swapped to NVMe (its "
                f"{OFFLOADED}/ folder); resume it with parallel.nvme_offload_optimizer true (or a DeepSpeed "
                "JSON whose offload_optimizer.device is 'nvme')")
    ranks = sorted(p.name for p in offloaded.iterdir() if p.is_dir())
    if len(ranks) != world:
        return (f"checkpoint {str(step_dir)!r} holds NVMe swap files of {len(ranks)} ranks and this run has "
                f"{world}: optimizer states swapped to NVMe resume only at the world size that wrote them; "
                f"launch {len(ranks)} processes")
    return None


def restore_from_shard(engine: Any, load_dir: str, tag: str) -> None:
    """After ``engine.load_checkpoint`` with NVMe swapping: what DeepSpeed's load left out (see 2. above)."""
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT, PARTITION_COUNT

    from ep_train.train.checkpoint import safe_load

    opt = engine.optimizer
    shard = safe_load(engine._get_zero_ckpt_name(load_dir, tag), map_location="cpu")[OPTIMIZER_STATE_DICT]
    assert PARTITION_COUNT in shard, "not a ZeRO-3 optimizer shard"
    saved_state = shard[OPTIMIZER_STATE_DICT]["state"]
    saved_fp32 = shard[FP32_FLAT_GROUPS]
    # The parameter groups' hyperparameters as the checkpoint's step left them (the learning rate the scheduler
    # set last: a restored scheduler only sets it again at its next step).
    saved_groups = shard[OPTIMIZER_STATE_DICT]["param_groups"]
    assert len(saved_groups) == len(opt.optimizer.param_groups), (len(saved_groups), len(opt.optimizer.param_groups))
    for group, saved_group in zip(opt.optimizer.param_groups, saved_groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    n = len(opt.fp16_groups)
    assert len(saved_fp32) == n, (len(saved_fp32), n)
    # torch's Optimizer.state_dict numbers parameters group by group; DeepSpeed's state_dict puts each
    # sub-group's fp32 partition into its parameter group in sub-group order (_set_fp32_optimizer_param_groups).
    order = sorted(range(n), key=lambda sg: (opt.sub_group_to_group_id[sg], sg))
    for index, sg in enumerate(order):
        master = opt.fp32_partitioned_groups_flat[sg]
        state = opt.optimizer.state[master]
        assert not state, f"sub-group {sg} already has optimizer state {sorted(state)}"
        saved = saved_state.get(index, {})
        if opt._swappable_optimizer_subgroup(sg):
            assert saved_fp32[sg].numel() == 0, f"sub-group {sg} is swapped here but not in the checkpoint"
            _register_swapped_moments(opt.optimizer_swapper, master, state, saved)
            continue
        assert master.shape == saved_fp32[sg].shape, (sg, master.shape, saved_fp32[sg].shape)
        for key, value in saved.items():  # CPU Adam makes the state of a fresh sub-group at its first step
            state[key] = value.to(master.device, copy=True) if torch.is_tensor(value) else value
        master.data.copy_(saved_fp32[sg])
        opt.fp16_partitioned_groups_flat[sg].data.copy_(master.data)  # the partitions are views of this buffer
    # Parameters kept whole on every rank (below stage3_param_persistence_threshold) were gathered at the end
    # of DeepSpeed's load, before the values above arrived: gather them again.
    opt.checkpoint_event_epilogue()  # collective


def _register_swapped_moments(swapper: Any, master: torch.Tensor, state: dict[str, Any], saved: dict[str, Any]) -> None:
    """Point a swapped sub-group's optimizer state at the moment files DeepSpeed's load copied back.

    The swapper learns a sub-group's state tensors from ``optimizer.state`` (``_update_param_state_info``),
    which a fresh process leaves empty: its next swap-in would read the master alone and CPU Adam would start
    new moments at step 0. Here each saved moment gets an empty stand-in named as DeepSpeed names its swap file
    (``<state>-<ds_id>``, ``_get_state_tensors``); the swap-in reads the file into a buffer and makes the
    stand-in that buffer (``SwapTensorContext.set_buffers``)."""
    info = swapper._get_param_swap_info(master)
    assert info is not None and not info.has_state_tensors, "a swapped sub-group without fresh swap info"
    stand_ins = []
    for key, value in saved.items():
        if not torch.is_tensor(value):
            state[key] = value  # the Adam step count
            continue
        t = torch.empty(0, dtype=master.dtype, device=master.device)
        t.ds_id = f"{key}-{master.ds_id}"
        assert (Path(swapper.swap_folder) / f"{t.ds_id}.tensor.swp").is_file(), t.ds_id
        state[key] = t
        stand_ins.append(t)
    info.add_state_tensors(stand_ins)
