"""DeepSpeed side of expert parallelism: config merging and ZeRO expert-parameter placement.

DeepSpeed 0.19.8 refuses its own MoE layer under ZeRO-3 and resolves expert placement only for
modules it recognises as MoE (``engine.has_moe_layers``): its ``MoE`` and AutoEP's
``AutoEPMoELayer``. So each ep_train ``MoELayer`` becomes an instance of a subclass of both (its own
forward, AutoEP's identity; ``AutoEPMoELayer.__init__`` is never run) carrying the attributes the
engine reads, and every expert parameter is tagged so that ZeRO partitions it over its
expert-data-parallel group (ranks holding the same experts) instead of the whole world.
Untagged or half-tagged experts train silently wrong (partitioned and averaged over all ranks);
tests/distributed/test_trainer.py compares against a single-process run to catch exactly that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ep_train.config import (DS_CONFIG_DIR, EP_TRAIN_SWITCHES, Config, check_ep_train_block,  # noqa: F401
                             ep_train_switch, read_ds_json, resolve_ds_config)  # (re-exported)

_AUTOEP_CLASSES: dict[type, type] = {}


def build_ds_config(cfg: Config, world: int, use_bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON with the run's batch sizes, precision and clipping merged in.

    A value the JSON already sets must agree with the run config (one source of truth per number).
    """
    path = resolve_ds_config(cfg.parallel.ds_config)
    ds = read_ds_json(path)
    t = cfg.train
    gas = t.batch_size // (t.micro_batch_size * world)
    want = {"train_batch_size": t.batch_size, "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": gas, "gradient_clipping": t.grad_clip}
    names = {"train_batch_size": "train.batch_size", "train_micro_batch_size_per_gpu": "train.micro_batch_size",
             "gradient_accumulation_steps": "train.batch_size", "gradient_clipping": "train.grad_clip"}
    for key, value in want.items():
        if key in ds and ds[key] != "auto" and float(ds[key]) != float(value):
            raise ValueError(f"{path.name} sets {key} = {ds[key]} but the run config gives {names[key]} -> {value}; "
                             f"remove {key} from the JSON (ep-train fills it in) or make them agree")
        ds[key] = value
    for key in ("bf16", "fp16"):
        enabled = ds.get(key, {}).get("enabled", False)
        if enabled is True and not (key == "bf16" and use_bf16):
            raise ValueError(f"{path.name} enables {key} but train.mixed_precision resolves to "
                             f"{'bf16' if use_bf16 else 'fp32'}; set train.mixed_precision or drop {key} from the JSON")
    ds["bf16"] = {"enabled": use_bf16}
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError(f"{path.name} defines an optimizer/scheduler; ep-train builds them from train.* "
                         "(router lr multiplier, no decay on norms); remove those blocks")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ValueError(f"{path.name}: zero_optimization.stage = {stage}; ep-train supports ZeRO stages 1, 2 and 3")
    _merge_nvme(ds, cfg, path.name, world)
    check_ep_train_block(ds, path.name)
    from ep_train.parallel.ds_memory import dedup_enabled

    if use_bf16 and dedup_enabled(ds) and "grad_accum_dtype" not in ds.get("data_types", {}):
        # bf16 with deduplicated offload buffers: accumulating in fp32 costs no memory (the optimizer's fp32
        # gradient is the accumulation buffer: 18 bytes/param instead of 20 with a bf16 buffer plus an fp32
        # copy) and sums micro-batches without bf16 rounding. A JSON that sets data_types.grad_accum_dtype wins.
        ds.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    return ds


def aio_unavailable_reason() -> str | None:
    """Why DeepSpeed's async I/O op (needed by any nvme offload) cannot be built here, or None if it can."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if AsyncIOBuilder().is_compatible(verbose=False):
        return None
    return ("DeepSpeed's async_io op (ZeRO-Infinity NVMe offload) needs libaio: install it with "
            "`apt-get install libaio-dev` (Debian/Ubuntu) or `yum install libaio-devel`, or use "
            "parallel.ds_config zero3_offload")


def o_direct_unsupported(folder: Path) -> str | None:
    """Why swap files cannot live in ``folder`` (DeepSpeed's aio opens them with O_DIRECT, which some
    filesystems refuse, e.g. tmpfs before Linux 6.6), or None. Creates the folder."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / ".o_direct_probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError as e:
        return f"{folder} does not support O_DIRECT ({e}); NVMe offload needs a disk filesystem such as ext4/xfs"
    finally:
        probe.unlink(missing_ok=True)
    return None


def _merge_nvme(ds: dict[str, Any], cfg: Config, json_name: str, world: int) -> None:
    """Write ``parallel.nvme_path`` (and ``parallel.nvme_offload_optimizer``) into the offload blocks.

    The folder is a run setting (it differs per machine and per run: two runs sharing it overwrite each
    other's swap files), so it lives in the run config and the JSON leaves ``nvme_path`` out (or "auto").
    """
    from ep_train.config import moe_layer_indices

    p = cfg.parallel
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.get("stage")
    if p.nvme_offload_optimizer:
        # Keeps the JSON's pin_memory/buffer settings; DeepSpeed's defaults fill the rest.
        zero["offload_optimizer"] = {**zero.get("offload_optimizer", {}), "device": "nvme"}
    nvme_blocks = [k for k in ("offload_optimizer", "offload_param")
                   if isinstance(zero.get(k), dict) and zero[k].get("device") == "nvme"]
    if not nvme_blocks:
        if p.nvme_path is not None:  # a path that silently does nothing would hide a misconfigured run
            raise ValueError(f"parallel.nvme_path = {p.nvme_path!r} is set but {json_name} offloads nothing to "
                             "nvme; use parallel.ds_config zero3_nvme or drop parallel.nvme_path")
        return
    if stage != 3:  # ZeRO-Infinity: DeepSpeed swaps to NVMe only under stage 3
        raise ValueError(f"{json_name} offloads {nvme_blocks[0]} to nvme with zero_optimization.stage = {stage}; "
                         "NVMe offload (ZeRO-Infinity) needs stage 3: use parallel.ds_config zero3_nvme")
    moe = bool(moe_layer_indices(cfg.model, cfg.moe))
    if "offload_optimizer" in nvme_blocks:
        import deepspeed

        from ep_train.parallel.ds_memory import SUPPORTED_DEEPSPEED

        opt = zero.get("offload_optimizer", {})
        for key in ("pipeline_read", "pipeline_write"):
            if opt.get(key):  # PipelinedOptimizerSwapper keeps swapped states in the saved shards (ds_nvme.py)
                raise ValueError(f"{json_name} sets zero_optimization.offload_optimizer.{key} = {opt[key]!r}: "
                                 "DeepSpeed's pipelined optimizer swapper leaves swapped states in the saved ZeRO "
                                 "shards, which a resume cannot tell from in-RAM ones; remove it (default false)")
        if deepspeed.__version__ != SUPPORTED_DEEPSPEED:  # ds_nvme.py completes that version's save and resume
            raise ValueError(f"{json_name} offload_optimizer.device = 'nvme' needs deepspeed {SUPPORTED_DEEPSPEED} "
                             f"(installed: {deepspeed.__version__}), whose checkpoints of swapped optimizer states "
                             "ep-train completes; install that version or keep optimizer states in CPU RAM")
    one_rank_group = world == 1 or (moe and world == p.ep_size)
    if "offload_param" in nvme_blocks and one_rank_group and not torch.cuda.is_available():
        # DeepSpeed 0.19.8 on CPU: a parameter whose ZeRO group has one rank is "gathered" as
        # ds_tensor.to("cpu"), an alias of its NVMe swap buffer, which the swapper hands to the next
        # parameter after the module runs; training then silently uses other weights (measured: losses
        # off by 1e-2 from step 2). On GPUs the .to() is a copy. Experts have a one-rank group when
        # ep_size equals the world size.
        raise ValueError(f"parallel.ep_size = {p.ep_size} is invalid with parameters offloaded to nvme on CPU at "
                         f"world size {world}: a ZeRO group of one rank (experts when ep_size = world size, "
                         "everything at world size 1) trains on stale weights there (DeepSpeed 0.19.8); use "
                         "ep_size < world size, or parallel.ds_config zero3_offload")
    if p.nvme_path is None:
        raise ValueError(f"parallel.nvme_path = None is invalid: {json_name} offloads "
                         f"{' and '.join('zero_optimization.' + k for k in nvme_blocks)} to nvme; pass "
                         "--parallel.nvme_path DIR (a folder on a fast local disk, one per run) or use "
                         "parallel.ds_config zero3_offload")
    folder = Path(p.nvme_path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"parallel.nvme_path = {p.nvme_path!r} is a file; give a folder (created if missing)")
    for key in nvme_blocks:
        given = zero[key].get("nvme_path")
        if given not in (None, "auto") and Path(given) != folder:
            raise ValueError(f"{json_name} sets zero_optimization.{key}.nvme_path = {given!r} but the run config "
                             f"gives parallel.nvme_path -> {p.nvme_path!r}; remove nvme_path from the JSON "
                             "(ep-train fills it in) or make them agree")
        zero[key]["nvme_path"] = str(folder)
    reason = aio_unavailable_reason()
    if reason is not None:
        raise ValueError(f"parallel.ds_config {json_name} offloads to nvme, but {reason}")


def is_offloading_optimizer(ds: dict[str, Any]) -> bool:
    """Optimizer states off the accelerator (CPU RAM or NVMe): the step runs on the CPU, so DeepSpeedCPUAdam."""
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def _autoep_class(cls: type) -> type:
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    if cls not in _AUTOEP_CLASSES:
        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False,
                                      folding_group_handles: Any = None) -> None:
            # The engine calls this; groups already exist and the dispatcher already holds the EP group.
            from deepspeed.utils import groups

            self.ep_group = groups._get_expert_parallel_group(self.ep_group_name)

        # ep_train's forward first in the MRO; AutoEPMoELayer only lends its type to the engine.
        _AUTOEP_CLASSES[cls] = type(f"DeepSpeed{cls.__name__}", (cls, AutoEPMoELayer),
                                    {"set_deepspeed_parallelism": set_deepspeed_parallelism})
    return _AUTOEP_CLASSES[cls]


def tag_experts_for_deepspeed(model: nn.Module, layout: Any) -> nn.Module:
    """Give each MoE layer AutoEP's identity and tag its (already sliced) expert parameters.

    Runs on a ``meta`` model too: it only sets attributes (``materialize`` carries them over).
    ``layout`` is an ``ep_train.parallel.ParallelLayout``; its groups may be None (simulated).
    """
    from deepspeed.checkpoint.autoep_affine import (autoep_experts_for_rank, autoep_placement_to_affine_map,
                                                    legacy_uniform_autoep_placement_descriptor)
    from deepspeed.checkpoint.constants import (AFFINE_MAP, AUTOEP_EXPERT_PLACEMENT, AUTOEP_PARAM_EP_RANK,
                                                AUTOEP_PARAM_LOCAL_EXPERTS, AUTOEP_PARAM_LOGICAL_SHAPE,
                                                DS_AUTOEP_UC_META)

    from ep_train.model.moe import MoELayer

    ep_size, ep_rank, name = layout.ep_size, layout.ep_rank, layout.group_name
    for module in model.modules():
        if not isinstance(module, MoELayer):
            continue
        module.__class__ = _autoep_class(type(module))
        e = module.num_experts
        module.ep_size, module.ep_rank, module.ep_group_name, module.ep_group = ep_size, ep_rank, name, layout.ep_group
        module.num_local_experts = e // ep_size
        module.expert_placement_descriptor = legacy_uniform_autoep_placement_descriptor(e, e // ep_size, ep_size)
        local = list(autoep_experts_for_rank(module.expert_placement_descriptor, ep_rank))
        assert local == module.experts.global_expert_ids, (local, module.experts.global_expert_ids)
        for p in (module.experts.w1, module.experts.w2, module.experts.w3):
            logical = [e, *p.shape[1:]]
            setattr(p, DS_AUTOEP_UC_META, {
                AUTOEP_EXPERT_PLACEMENT: module.expert_placement_descriptor,
                AFFINE_MAP: autoep_placement_to_affine_map(module.expert_placement_descriptor, logical).to_dict(),
                AUTOEP_PARAM_LOGICAL_SHAPE: logical, AUTOEP_PARAM_EP_RANK: ep_rank,
                AUTOEP_PARAM_LOCAL_EXPERTS: local})
            p.allreduce = False  # an expert parameter: reduced over its expert-data-parallel group
            p.group_name = name
            p.ds_zero_placement_family = "autoep_expert"
            p.ds_zero_partition_group_name = name
        dense = list(module.router.parameters())
        if module.shared_experts is not None:
            dense += list(module.shared_experts.parameters())
        for p in dense:
            p.allreduce = True
            p.ds_zero_placement_family = "replicated"
    return model


def gather_whole_blocks(model: nn.Module, ds: dict[str, Any], unit: str) -> int:
    """``parallel.zero3_gather``: with ``block`` ZeRO-3 fetches and releases each transformer block's
    parameters at once.

    DeepSpeed installs its ZeRO-3 hooks on every submodule (norms, attention projections, router, experts):
    a Python fetch/release pair per module in the forward, again in the recompute and the backward, and one
    gradient hook per parameter. Marked as a z3 leaf module (DeepSpeed's API for MoE blocks), a block gets
    one pair, and its gradients are reduced together after its backward. On the demo model (4 layers, 2
    processes, 2 cores, ZeRO-3 + offload, every layer MoE) it ran at 1.03x and 1.05x the tokens/s of
    per-module hooks in two interleaved pairs of 30-step runs (1.08-1.11x in runs far apart), with the same
    losses; on the 583M model the step time and peak RSS did not change. Costs: the block's attention and its
    local experts are live together (``ep-train plan`` counts the largest block gathered either way), and the
    gradients of a block are reduced after the whole block's backward rather than parameter by parameter.
    With parameters on NVMe, DeepSpeed swaps a block's partitions in together, one swap buffer each
    (``offload_param.buffer_count``, 5 in zero3_nvme; partitions under 1 MiB stay in RAM): ``auto`` then
    keeps per-submodule fetches unless the buffers can hold every parameter of a block, and ``block`` is
    refused. Call before ``deepspeed.initialize`` (it reads the mark when it registers hooks). Returns the
    number of blocks marked (0 outside ZeRO-3, for ``module``, or ``auto`` falling back).
    """
    from deepspeed.runtime.zero.offload_config import DeepSpeedZeroOffloadParamConfig
    from deepspeed.utils import set_z3_leaf_modules

    from ep_train.model.transformer import Block

    assert unit in ("auto", "block", "module"), unit  # validated with the config
    zero = ds.get("zero_optimization", {})
    if unit == "module" or zero.get("stage") != 3:
        return 0
    param = zero.get("offload_param") or {}
    if param.get("device") == "nvme":
        need = max((len(list(m.parameters())) for m in model.modules() if isinstance(m, Block)), default=0)
        have = int(param.get("buffer_count", DeepSpeedZeroOffloadParamConfig().buffer_count))  # DeepSpeed's default
        if have < need:
            if unit == "auto":
                return 0
            raise ValueError(f"parallel.zero3_gather = 'block' with parameters offloaded to nvme needs "
                             f"zero_optimization.offload_param.buffer_count >= {need} (a block's parameters, swapped "
                             f"in together, one buffer each); the DeepSpeed JSON gives {have}. Raise buffer_count "
                             "(each buffer holds buffer_size elements of RAM) or use parallel.zero3_gather auto "
                             "or module")
    return len(set_z3_leaf_modules(model, [Block]))


def materialize_partitioned(model: nn.Module, source: Any, ds: dict[str, Any], layout: Any,
                            dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Turn a parallelized ``meta`` model into this rank's share, one module at a time.

    Why the meta route and not ``deepspeed.zero.Init`` around the constructor: experts are sliced on
    ``meta`` with the same code as everywhere else, nothing patches ``torch`` globally, and values
    come from a ``ValueSource`` (seeded init or a streamed Hugging Face checkpoint) by name and global
    expert id. Per module: the module's own parameters are made in full (at most one tensor of the
    model, or this rank's local experts of one weight, at a time), then under ZeRO-3 handed to
    ``zero.Init(module=...)``, which broadcasts them from the group's first rank (communication)
    and keeps this rank's partition. Expert parameters are partitioned over their
    expert-data-parallel group (``ds_zero_partition_process_group``; DeepSpeed's engine checks that
    group), everything else over the world. Under ZeRO-1/2 every rank keeps its full copy.
    """
    from ep_train.model.init import materialize

    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage < 3:
        return materialize(model, source, dtype=dtype, device=device)
    import deepspeed

    # A copy with memory_efficient_linear off: zero.Init(module=...) would otherwise replace
    # torch.nn.functional.linear for the whole process.
    init_cfg = json.loads(json.dumps(ds))
    init_cfg["zero_optimization"]["memory_efficient_linear"] = False
    edp = layout.edp_group
    # Parameters offloaded to NVMe: every zero.Init would build its own swapper, and each new swapper
    # empties the rank's swap folder (deleting the partitions earlier modules swapped out) and reserves
    # its own buffer pool (buffer_count x buffer_size per module). One swapper serves them all.
    swapper: list[Any] = [None]

    def partition(module: nn.Module) -> None:
        own = [p for p in module._parameters.values() if p is not None]
        for p in own:
            if getattr(p, "ds_zero_placement_family", None) == "autoep_expert":
                p.ds_zero_partition_process_group = edp  # read by zero.Init's _convert_to_deepspeed_param
        if any(not hasattr(p, "ds_id") for p in own):
            # No dtype argument: with a config, zero.Init(dtype=float32) gives bf16 on CPU
            # (operator precedence in partition_parameters.py); the tensors already have the run's dtype.
            init = deepspeed.zero.Init(module=module, config_dict_or_path=init_cfg, param_swapper=swapper[0])
            swapper[0] = swapper[0] or init.param_swapper

    return materialize(model, source, dtype=dtype, device=device, after=partition)
