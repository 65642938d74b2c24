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
   from the initial one (bias correction then differs), and the optimizer keeps a fresh start's learning
   rate until the scheduler's next step: the resumed run drifts from the unbroken one. (DeepSpeed's own
   shard loader, ``_rigid_load_state_dict``, crashes in CPU Adam when called for swapped states.)
   ``restore_from_shard`` reads this rank's shard after DeepSpeed's load, checks on every rank that the
   sub-groups are the checkpoint's, and restores the groups' hyperparameters, the step counts and moments of
   the swapped sub-groups (their moment files registered with the swapper) and the masters, moments and
   parameters of the in-memory ones (parameters through DeepSpeed's own post-step write, which swaps them out
   when they are on NVMe too), then gathers the persistent parameters again.
   tests/distributed/test_nvme.py checks that a resume continues exactly (MoE at EP 2 with parameters in RAM,
   and at EP 1 with parameters on NVMe too).

With the optimizer on NVMe again, such a checkpoint resumes only at the world size that wrote it (the swap
files are per rank and per sub-group); ``checkpoint_refusal`` names the mismatch before DeepSpeed meets it.
DeepSpeed's universal form (resharding, export, a resume with the optimizer in RAM) reads the ZeRO shards,
whose swapped sub-groups are empty: ``write_swap_map`` records at each save which sub-group of a rank's
shard lives in which swap files, and ``interop.universal.to_universal`` converts a copy of the shards with
those values filled in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

OFFLOADED = "offloaded_tensors"  # DeepSpeed's folder of copied swap files in a step folder, one rankNN per rank
SWAP_MAP = "nvme_swap_map_rank{rank}.json"  # in a step folder: a rank's swapped sub-groups (write_swap_map)


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


def swapped_checkpoint(step_dir: Path) -> bool:
    """Written with optimizer states swapped to NVMe (its ZeRO shards lack them)."""
    return (step_dir / OFFLOADED).is_dir()


def swapped_ranks(step_dir: Path) -> int:
    """How many ranks' swap files a swapped checkpoint holds (one ``OFFLOADED/rankNN`` folder each)."""
    return sum(1 for p in (step_dir / OFFLOADED).iterdir() if p.is_dir())


def checkpoint_refusal(step_dir: Path, nvme: bool, world: int) -> str | None:
    """Why a run with (``nvme``) or without optimizer states on NVMe cannot resume ``step_dir``, or None.
    (A swapped checkpoint resumed without NVMe goes through the universal form: resume.plan.)"""
    if not swapped_checkpoint(step_dir):
        if nvme:
            return (f"checkpoint {str(step_dir)!r} keeps its optimizer states in its ZeRO shards, but this run "
                    "swaps them to NVMe (parallel.nvme_offload_optimizer / offload_optimizer.device 'nvme'), "
                    "which resumes only from the swap files of a run that swapped them too; resume it with the "
                    "optimizer states in CPU RAM (parallel.nvme_offload_optimizer false)")
        return None
    if not nvme:
        return None
    ranks = swapped_ranks(step_dir)
    if ranks != world:
        return (f"checkpoint {str(step_dir)!r} holds NVMe swap files of {ranks} ranks and this run has "
                f"{world}: with the optimizer on NVMe it resumes only at the world size that wrote it; launch "
                f"{ranks} processes, or keep the optimizer states in RAM (parallel.nvme_offload_optimizer "
                "false), which reshards it through DeepSpeed's universal form")
    return None


def _state_order(opt: Any) -> list[int]:
    """Sub-group ids in the order of the ZeRO shard's optimizer state indices: torch's Optimizer.state_dict
    numbers parameters group by group, and DeepSpeed's state_dict puts each sub-group's fp32 partition into its
    parameter group in sub-group order (_set_fp32_optimizer_param_groups)."""
    return sorted(range(len(opt.fp16_groups)), key=lambda sg: (opt.sub_group_to_group_id[sg], sg))


def write_swap_map(engine: Any, step_dir: Path) -> None:
    """After ``engine.save_checkpoint`` with NVMe swapping: this rank's ``SWAP_MAP`` in ``step_dir``."""
    from deepspeed.checkpoint.ds_to_universal import dp_index_to_str

    from ep_train.files import atomic_write_text

    opt = engine.optimizer
    rank = engine.local_rank if engine.use_node_local_storage() else engine.global_rank  # as save_checkpoint
    subgroups = []
    for index, sg in enumerate(_state_order(opt)):
        if opt._swappable_optimizer_subgroup(sg):
            master = opt.fp32_partitioned_groups_flat[sg]
            subgroups.append({"index": index, "subgroup": sg, "swap_id": master.ds_id,
                              "numel": int(opt.fp16_partitioned_groups_flat_numel[sg]),
                              "dtype": str(master.dtype).removeprefix("torch.")})
    info = {"shard": Path(engine._get_zero_ckpt_name(str(step_dir.parent), step_dir.name)).name,
            "swap_dir": f"{OFFLOADED}/rank{dp_index_to_str(rank)}", "subgroups": subgroups}
    atomic_write_text(step_dir / SWAP_MAP.format(rank=engine.global_rank), json.dumps(info, indent=1))


def restore_from_shard(engine: Any, load_dir: str, tag: str) -> None:
    """Collective. After ``engine.load_checkpoint`` with NVMe swapping: what DeepSpeed's load left out (see 2.
    above). Raises ``CheckpointError`` on every rank when this run's sub-groups do not match the checkpoint's."""
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT

    from ep_train.train.checkpoint import CheckpointError, _agree, safe_load

    opt = engine.optimizer
    path = engine._get_zero_ckpt_name(load_dir, tag)
    shard = safe_load(path, map_location="cpu")[OPTIMIZER_STATE_DICT]
    saved_state = shard[OPTIMIZER_STATE_DICT]["state"]
    saved_fp32 = shard[FP32_FLAT_GROUPS]
    saved_groups = shard[OPTIMIZER_STATE_DICT]["param_groups"]
    problem = _layout_problem(opt, saved_fp32, saved_state, saved_groups)
    if not _agree(problem is None):  # communication: no rank changes anything unless every rank can
        raise CheckpointError(f"resuming {str(path)!r} with optimizer states on NVMe: "
                              f"{problem or 'another rank found its sub-groups differ from the checkpoint'}; "
                              "resume with the DeepSpeed JSON the checkpoint was written with (sub_group_size and "
                              "aio.block_size decide which sub-groups are swapped)")
    # The parameter groups' hyperparameters as the checkpoint's step left them (the learning rate the scheduler
    # set last: a restored scheduler only sets it again at its next step).
    for group, saved_group in zip(opt.optimizer.param_groups, saved_groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for index, sg in enumerate(_state_order(opt)):
        master = opt.fp32_partitioned_groups_flat[sg]
        state = opt.optimizer.state[master]
        saved = saved_state.get(index, {})
        if opt._swappable_optimizer_subgroup(sg):
            _register_swapped_moments(opt.optimizer_swapper, master, state, saved)
            continue
        for key, value in saved.items():  # CPU Adam makes the state of a fresh sub-group at its first step
            state[key] = value.to(master.device, copy=True) if torch.is_tensor(value) else value
        master.data.copy_(saved_fp32[sg])
        # the parameters from the master, as after an optimizer step: into the host partitions, or written to
        # their swap files when the parameters are on NVMe too (no host buffer then)
        opt._reassign_or_swap_out_partitioned_parameters(sg)
    # Parameters kept whole on every rank (below stage3_param_persistence_threshold) were gathered at the end of
    # DeepSpeed's load, before the values above arrived: release and gather them again (a gather skips
    # parameters it holds whole already), as DeepSpeed's own shard loader does.
    opt._partition_all_parameters()
    opt.checkpoint_event_epilogue()  # collective


def _layout_problem(opt: Any, saved_fp32: list, saved_state: dict, saved_groups: list) -> str | None:
    """Whether this rank's optimizer sub-groups are the checkpoint's (count, sizes, which ones are swapped,
    their swap files present), or what differs. Nothing is changed."""
    if len(saved_groups) != len(opt.optimizer.param_groups) or len(saved_fp32) != len(opt.fp16_groups):
        return (f"the checkpoint has {len(saved_groups)} parameter groups and {len(saved_fp32)} sub-groups, this run "
                f"{len(opt.optimizer.param_groups)} and {len(opt.fp16_groups)}")
    for index, sg in enumerate(_state_order(opt)):
        master = opt.fp32_partitioned_groups_flat[sg]
        if opt.optimizer.state[master]:
            return f"sub-group {sg} already has optimizer state {sorted(opt.optimizer.state[master])}"
        numel = int(opt.fp16_partitioned_groups_flat_numel[sg])
        if opt._swappable_optimizer_subgroup(sg):
            if saved_fp32[sg].numel():
                return f"sub-group {sg} ({numel:,} elements) is swapped here but was kept in RAM by the checkpoint"
            for key, value in saved_state.get(index, {}).items():
                f = Path(opt.optimizer_swapper.swap_folder) / f"{key}-{master.ds_id}.tensor.swp"
                if torch.is_tensor(value) and not f.is_file():
                    return f"the swap file {str(f)!r} of sub-group {sg} is missing"
        elif saved_fp32[sg].numel() != numel:
            return (f"sub-group {sg} has {numel:,} elements in RAM here and {saved_fp32[sg].numel():,} in the "
                    "checkpoint (0: swapped there)")
    return None


def _register_swapped_moments(swapper: Any, master: torch.Tensor, state: dict[str, Any],
                              saved: dict[str, Any]) -> None:
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
        t.ds_id = f"{key}-{master.ds_id}"  # its file was checked by _layout_problem
        state[key] = t
        stand_ins.append(t)
    info.add_state_tensors(stand_ins)
