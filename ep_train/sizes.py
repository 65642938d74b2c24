"""Parameter counts from the config alone (no model is built): total, active per token, sparsity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ep_train.config import Config, check_ep_layout, moe_layer_indices


@dataclass
class ModelSize:
    total: int  # every parameter
    active: int  # parameters one token touches (K routed experts + shared + dense parts)
    embedding: int  # input embedding (+ untied output head)
    attention: int
    dense_ffn: int
    experts: int  # routed expert weights, all layers
    router: int
    shared_experts: int
    norms: int

    @property
    def sparsity(self) -> float:
        """Share of parameters a token does not touch."""
        return 1.0 - self.active / self.total


def model_size(cfg: Config) -> ModelSize:
    m, e = cfg.model, cfg.moe
    d = m.hidden_size
    hd = m.head_dim or d // m.num_heads
    moe_layers = moe_layer_indices(m, e)
    n_moe, n_dense = len(moe_layers), m.num_layers - len(moe_layers)
    embedding = m.vocab_size * d * (1 if m.tie_embeddings else 2)
    attention = m.num_layers * (d * m.num_heads * hd * 2 + d * m.num_kv_heads * hd * 2)
    dense_ffn = n_dense * 3 * d * m.intermediate_size
    f_e = e.expert_intermediate_size or m.intermediate_size
    per_expert = 3 * d * f_e
    experts = n_moe * e.num_experts * per_expert
    router = n_moe * e.num_experts * d * (2 if e.router_type == "noisy_topk" else 1)
    f_s = e.shared_expert_intermediate_size or f_e
    shared = n_moe * e.num_shared_experts * 3 * d * f_s
    norms = (2 * m.num_layers + 1) * d
    total = embedding + attention + dense_ffn + experts + router + shared + norms
    # expert choice: capacity_factor is the mean number of experts per token (when no expert is full)
    per_token = e.capacity_factor if e.router_type == "expert_choice" and e.capacity_factor else e.num_experts_per_token
    active = total - experts + round(n_moe * per_token * per_expert)
    return ModelSize(total, active, embedding, attention, dense_ffn, experts, router, shared, norms)


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def format_size(cfg: Config) -> str:
    s = model_size(cfg)
    rows = [("total parameters", s.total), ("active per token", s.active), ("embeddings (+head)", s.embedding),
            ("attention", s.attention), ("dense FFN", s.dense_ffn), ("routed experts", s.experts),
            ("routers", s.router), ("shared experts", s.shared_experts), ("norms", s.norms)]
    lines = [f"{name:<20} {_fmt(v):>10} ({v:,})" for name, v in rows]
    lines.append(f"{'sparsity':<20} {s.sparsity:>10.1%} (share of parameters a token does not use)")
    return "\n".join(lines)


def model_state_bytes_per_rank(cfg: Config, world: int, zero_stage: int, offload: bool,
                               param_bytes: int = 2) -> dict[str, float]:
    """Model-state bytes per rank (params, grads, fp32 master + Adam moments) under ZeRO with EP.

    Dense parameters are partitioned over all ``world`` ranks; each rank holds E/ep experts, whose
    states are partitioned over the world/ep ranks of its expert-data-parallel group.
    ``offload`` moves the fp32 master weights and Adam moments (and, under ZeRO-3, the parameters)
    to CPU memory: the numbers are then what stays on the accelerator vs what goes to host RAM.
    """
    s = model_size(cfg)
    ep = cfg.parallel.ep_size
    check_ep_layout(ep, cfg.moe.num_experts, world)
    dense = s.total - s.experts
    edp = world // ep
    full_per_rank = dense + s.experts / ep  # what one rank would hold without ZeRO partitioning
    sharded = dense / world + s.experts / ep / edp
    params = (sharded if zero_stage >= 3 else full_per_rank) * param_bytes
    grads = (sharded if zero_stage >= 2 else full_per_rank) * param_bytes
    optim = (sharded if zero_stage >= 1 else full_per_rank) * 12  # fp32 master + Adam m and v
    device = params * (0 if offload and zero_stage >= 3 else 1) + grads + (0 if offload else optim)
    host = (optim if offload else 0) + (params if offload and zero_stage >= 3 else 0)
    return {"params": params, "grads": grads, "optimizer": optim, "device": device, "host": host}


# ---------------------------------------------------------------------------------------------
# The memory planner: what one rank holds at its peak, host and device, under the run's DeepSpeed JSON.
# ---------------------------------------------------------------------------------------------

MIB = 2 ** 20
# Per-process baseline on the host: Python + torch 2.13 + DeepSpeed 0.19.8 + ep_train imported, gloo
# initialised, DeepSpeed's CPU Adam extension loaded, the engine built around a model of almost no
# parameters. Measured with `python bench/scale.py --small` (VmHWM of each rank of a 0.75M-parameter
# model at world 2, less its ~10 MB of model states): 395 MiB at the end of set-up, 435 MiB after 3
# training steps (the first step's code paths, autograd and the CPU Adam step add ~40 MiB).
HOST_BASELINE_SETUP = 395 * MIB
HOST_BASELINE_TRAIN = 435 * MIB
# A CUDA process's device-side fixed cost (context, cuBLAS/cuDNN workspaces, NCCL buffers). Not measured
# on this project's machines (no GPU); 1 GiB is the usual torch figure on A100/H100-class GPUs.
DEVICE_BASELINE = 1024 * MIB
# glibc malloc serves allocations above its mmap threshold with mmap (returned to the OS on free) and
# smaller ones from its heap (kept resident after free, reused by later allocations). The threshold
# starts at 128 KiB and rises to the size of any freed mmapped chunk up to DEFAULT_MMAP_THRESHOLD_MAX,
# 32 MiB on 64-bit Linux (glibc malloc.c, mallopt(3)). Tensors at most this large therefore leave
# resident heap behind when freed.
GLIBC_MMAP_THRESHOLD_MAX = 32 * MIB


def heap_threshold(env: dict[str, str] | None = None) -> int:
    """Largest allocation glibc serves from its heap: MALLOC_MMAP_THRESHOLD_ when set (that also turns the
    dynamic threshold off, mallopt(3)), else the dynamic threshold's ceiling."""
    import os

    raw = (os.environ if env is None else env).get("MALLOC_MMAP_THRESHOLD_")
    if raw is None or raw == "":
        return GLIBC_MMAP_THRESHOLD_MAX
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"MALLOC_MMAP_THRESHOLD_ = {raw!r} is invalid: must be a byte count such as 1048576, "
                         "or unset") from None


def fix_mmap_threshold(nbytes: int) -> None:
    """Fix this process's glibc mmap threshold at ``nbytes`` (mallopt(3) M_MMAP_THRESHOLD, which also turns
    the dynamic rule above off): allocations above it go back to the OS when freed instead of staying on
    a fragmented heap. For processes that make and free the same large tensors over and over (a data build's
    batches, a model run block by block). No-op without glibc's mallopt."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


@dataclass
class _Shapes:
    """Per-rank element counts read off the parallelized ``meta`` model (no memory is allocated)."""

    partition: int  # elements of this rank's ZeRO partitions (ceil per parameter, as ZeRO pads)
    partition_small: int  # ... of those partitions small enough for glibc's heap (see heap_threshold)
    local_full: int  # elements of every parameter this rank computes with (its experts, all dense) in full
    block_full: int  # the largest transformer block's parameters in full (this rank's experts)
    block_gathered: int  # ... of those that ZeRO-3 must all-gather (partition group > 1)
    largest_module_full: int  # the largest module's own parameters in full: what construction makes at once
    largest_subgroup: int  # the largest DeepSpeed optimizer sub-group's partition elements (sub_group_size)
    largest_subgroup_full: int  # the full (unpartitioned) elements of the parameters of that sub-group


def _largest_subgroup(sizes: list[tuple[int, int]], sub_group_size: int) -> tuple[int, int]:
    """DeepSpeed's ``_create_fp16_sub_groups``: a group's parameters in order, a sub-group closed once it holds
    at least ``sub_group_size`` partition elements. ``sizes``: (partition, full) elements per parameter ->
    the largest sub-group's (partition, full) elements."""
    if sub_group_size >= sum(n for n, _ in sizes):
        return sum(n for n, _ in sizes), sum(f for _, f in sizes)
    largest, run = (0, 0), (0, 0)
    for n, f in sizes:
        run = (run[0] + n, run[1] + f)
        if run[0] >= sub_group_size:
            largest, run = max(largest, run), (0, 0)
    return max(largest, run)


def _rank_shapes(cfg: Config, world: int, zero_stage: int, param_bytes: int, threshold: int,
                 sub_group_size: int = int(1e9)) -> _Shapes:
    import math

    import torch

    from ep_train.model.experts import GroupedExperts
    from ep_train.model.transformer import Block, build_model
    from ep_train.parallel import ParallelLayout, parallelize

    ep = cfg.parallel.ep_size
    edp = world // ep
    # Every rank holds E/ep experts of identical shapes, so rank 0 describes them all.
    model = parallelize(build_model(cfg.model, cfg.moe, device="meta"), cfg, ParallelLayout(world, 0, ep),
                        deepspeed=False)
    part = small = local = 0
    groups: dict[tuple[bool, bool, bool], list[tuple[int, int]]] = {}
    expert_ids = set()
    for mod in model.modules():
        if isinstance(mod, GroupedExperts):
            expert_ids.update(id(p) for p in mod.parameters())
    for name, p in model.named_parameters():
        group = edp if id(p) in expert_ids else world
        n = math.ceil(p.numel() / group) if zero_stage >= 1 else p.numel()
        part += n
        local += p.numel()
        if n * param_bytes <= threshold:
            small += n
        key = (".router." in name, p.dim() >= 2, id(p) in expert_ids)  # train/optim.py's groups
        groups.setdefault(key, []).append((n, p.numel()))
    block_full = block_gathered = 0
    for mod in model.modules():
        if isinstance(mod, Block):
            full = gathered = 0
            for p in mod.parameters():
                full += p.numel()
                group = edp if id(p) in expert_ids else world
                gathered += p.numel() if group > 1 else 0  # a group of 1 needs no gather (DeepSpeed skips it)
            if full > block_full:
                block_full, block_gathered = full, gathered
    largest_module = max(sum(p.numel() for p in m._parameters.values() if p is not None)
                         for m in model.modules())
    sub, sub_full = max(_largest_subgroup(sizes, sub_group_size) for sizes in groups.values())
    del torch
    return _Shapes(part, small, local, block_full, block_gathered, largest_module, sub, sub_full)


def activation_bytes(cfg: Config, checkpointing: bool, act_bytes: int) -> dict[str, int]:
    """Activation memory of one micro-batch (bytes), from the model's shapes.

    Per token and layer the forward keeps (elements; D hidden, Dkv = kv heads x head dim, F expert
    width, K experts per token, E experts):
      attention: 2 D (norm in/out) + D + 2 Dkv (q, k, v) + D + Dkv (rotary q, k in fp32 views) + D (SDPA
        out) + D (o_proj in) + D (residual) = 7 D + 3 Dkv
      MoE FFN:   2 D (norm) + 3 E (router logits, probabilities, fp32) + K D (gathered rows) + K D
        (all-to-all received) + K D (regrouped) + 4 K F (gate, up, silu, product) + K D (expert out)
        + 2 K D (combine: back + returned) + 2 D (weighted sum, residual) = (4 + 6 K) D + 4 K F + 3 E
      dense FFN: 2 D + 4 F + 2 D
    The head keeps logits [T, V] in the model dtype plus an fp32 copy and its gradient (3 V per token).
    Gradients of activations are freed layer by layer as the backward runs, so the peak is the saved
    forward activations. With activation checkpointing a block keeps only its input (D per token) and
    one block is recomputed at a time; with ``train.recompute_comm`` off, each MoE layer also keeps its
    forward's exchanged rows for the recompute (received and returned, about K D each under even routing;
    a rank whose experts are popular receives more). Checked on an NVIDIA H200 (torch 2.11, bf16, the 583M
    MoE of bench/scale.py, one process, torch.cuda.max_memory_allocated): planned / measured 1.09 (seq
    2048) and 1.12 (4096) without recompute, 1.15 and 1.26 with it (the recompute's transients are freed
    sooner than this counts).
    """
    m, e = cfg.model, cfg.moe
    d = m.hidden_size
    hd = m.head_dim or d // m.num_heads
    dkv = m.num_kv_heads * hd
    f = e.expert_intermediate_size or m.intermediate_size
    tokens = cfg.data.seq_len * cfg.train.micro_batch_size
    moe_layers = set(moe_layer_indices(m, e))
    attn = 7 * d + 3 * dkv
    per_layer = []
    for i in range(m.num_layers):
        if i in moe_layers:
            ffn = (4 + 6 * e.num_experts_per_token) * d + 4 * e.num_experts_per_token * f + 3 * e.num_experts
        else:
            ffn = 4 * d + 4 * m.intermediate_size
        per_layer.append(attn + ffn)
    head = 3 * m.vocab_size * tokens * 4
    if checkpointing:
        kept = m.num_layers * d * tokens * act_bytes + max(per_layer) * tokens * act_bytes
        if not cfg.train.recompute_comm and cfg.train.recompute != "attention" and cfg.parallel.ep_size > 1:
            # the forward's exchanges kept for the recompute: received and returned rows (~K D each, even routing)
            kept += len(moe_layers) * 2 * e.num_experts_per_token * d * tokens * act_bytes
    else:
        kept = sum(per_layer) * tokens * act_bytes
    return {"blocks": int(kept), "head": int(head), "total": int(kept + head)}


def all_to_all_bytes_per_step(cfg: Config, world: int, act_bytes: int) -> int:
    """Bytes one rank sends through the MoE all-to-alls in one optimizer step (uniform routing).

    Per MoE layer and micro-batch: T*K assignments, (ep-1)/ep of them to other ranks, rows of D values;
    dispatch and combine in the forward, the same two reversed in the backward, and one more forward
    pair when activation checkpointing recomputes the block and ``train.recompute_comm`` is on: 4 or 6.
    """
    ep = cfg.parallel.ep_size
    if ep <= 1:
        return 0
    t = cfg.train
    tokens = cfg.data.seq_len * t.micro_batch_size
    micro = t.batch_size // (t.micro_batch_size * world)
    n_moe = len(moe_layer_indices(cfg.model, cfg.moe))
    exchanges = 6 if t.activation_checkpointing and t.recompute_comm and t.recompute != "attention" else 4
    rows = tokens * cfg.moe.num_experts_per_token * (ep - 1) / ep
    return int(n_moe * micro * exchanges * rows * cfg.model.hidden_size * act_bytes)


def resolve_precision(cfg: Config, device: str) -> str:
    """``train.mixed_precision`` as the trainer resolves it: auto = bf16 on CUDA, fp32 on CPU."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device = {device!r} is invalid: use cpu or cuda")
    mp = cfg.train.mixed_precision
    if mp == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return mp


def plan_memory(cfg: Config, world: int, device: str = "cuda", ds: dict[str, Any] | None = None,
                zero_stage: int | None = None, offload: bool | None = None,
                env: dict[str, str] | None = None) -> dict[str, Any]:
    """Per-rank host and device peaks (bytes) of a training run, with the breakdown.

    ``ds`` is the run's DeepSpeed JSON (default: ``parallel.ds_config`` resolved like the trainer does);
    ``zero_stage``/``offload`` override what it says; ``env`` is the training processes' environment
    (default: this one), read for glibc's MALLOC_MMAP_THRESHOLD_. Every term follows DeepSpeed 0.19.8's ZeRO code
    (runtime/zero/stage3.py, stage_1_and_2.py); each carries the reason in the breakdown's comments.
    On ``device="cpu"`` everything is host memory.
    """
    if ds is None:
        from ep_train.parallel.zero import read_ds_json, resolve_ds_config

        ds = read_ds_json(resolve_ds_config(cfg.parallel.ds_config))
    check_ep_layout(cfg.parallel.ep_size, cfg.moe.num_experts, world)
    z = ds.get("zero_optimization", {})
    stage = z.get("stage", 0) if zero_stage is None else zero_stage
    # ZeRO-Infinity: "nvme" swaps the partition to disk (stage 3 only), through pinned host buffers;
    # parallel.nvme_offload_optimizer turns the optimizer's block to nvme as the trainer does (zero._merge_nvme)
    opt_dev = "nvme" if cfg.parallel.nvme_offload_optimizer else z.get("offload_optimizer", {}).get("device", "none")
    par_dev = z.get("offload_param", {}).get("device", "none")
    off_opt = opt_dev in ("cpu", "nvme")
    off_par = par_dev in ("cpu", "nvme") and stage >= 3
    if offload is not None:
        off_opt, off_par = offload, offload and stage >= 3
    opt_nvme = off_opt and opt_dev == "nvme" and stage >= 3
    par_nvme = off_par and par_dev == "nvme"
    precision = resolve_precision(cfg, device)
    pb = _DTYPE_BYTES[precision]
    from ep_train.parallel.ds_memory import dedup_enabled

    # ep_train.parallel.ds_memory: under ZeRO-3 with the optimizer offloaded to CPU (and the JSON's switch on)
    # the fp32 master shares an fp32 parameter partition on the host, and the optimizer's gradient is the
    # accumulation buffer when both are fp32.
    dedup = dedup_enabled({**ds, "zero_optimization": {**z, "stage": stage, "offload_optimizer": {
        **(z.get("offload_optimizer") or {}),  # its other switches (super_offload turns the sharing off)
        "device": "cpu" if off_opt and not opt_nvme else "none"}}})  # (NVMe-swapped sub-groups keep their own)
    # DeepSpeed accumulates gradients in the model dtype unless data_types.grad_accum_dtype says otherwise
    # (engine.get_data_types); build_ds_config makes that fp32 for bf16 when the deduplication applies.
    accum = ds.get("data_types", {}).get("grad_accum_dtype", "fp32" if dedup and precision == "bf16" else precision)
    gb = _DTYPE_BYTES.get(str(accum).lower(), pb)
    threshold = heap_threshold(env)
    s = _rank_shapes(cfg, world, stage, pb, threshold, int(float(z.get("sub_group_size", 1e9))))
    p = s.partition
    cpu = device == "cpu"

    def where(on_host: bool) -> str:
        return "host" if cpu or on_host else "device"

    items: list[tuple[str, str, int, str]] = []  # (name, host|device|nvme, bytes, why); nvme: in neither peak
    # --- model states ---------------------------------------------------------------------------
    lp = p if stage >= 3 else s.local_full
    # offload_param.max_in_cpu: DeepSpeed keeps up to that many parameter elements in pinned host buffers
    # (_create_param_groups_fp16_flat_cpu_memory) and swaps only the rest
    in_cpu = min(lp, int(float(z.get("offload_param", {}).get("max_in_cpu", 1e9)))) if par_nvme else 0
    if in_cpu:
        items.append(("parameters kept in RAM", "host", in_cpu * pb,
                      "offload_param.max_in_cpu: parameter partitions held in pinned host buffers, not swapped"))
    items.append(("parameters", "nvme" if par_nvme else where(off_par), (lp - in_cpu) * pb,
                  f"{precision} parameters: the ZeRO-3 partition (offload_param: DeepSpeed's flat host buffer)"
                  if stage >= 3 else f"{precision} parameters: full copy under ZeRO-{stage}"))
    # With offload ds_memory shares the fp32 master with the parameter partition when that is on the host too
    # (offload_param, or a CPU run; NVMe-swapped partitions have no host copy to share). Without offload
    # stage3._create_fp32_partitions means to reuse an fp32 partition, but its test compares a torch.device with
    # a string (False in torch 2.13), so DeepSpeed 0.19.8 always makes the copy (measured: a separate tensor).
    shared_master = stage >= 3 and pb == 4 and off_opt and dedup and not par_nvme and (off_par or cpu)
    items.append(("fp32 master", "nvme" if opt_nvme else where(off_opt), 0 if shared_master else p * 4,
                  "fp32 master partition (none in fp32: it is the parameter partition)" if shared_master else
                  "fp32 master partition"))
    grad_elems = p if stage >= 2 else s.local_full
    items.append(("gradient partition", where(off_opt and stage >= 3), grad_elems * gb,
                  "gradients accumulated per partition (stage3 grad_partitions_flat_buffer, grad_accum dtype)"))
    shared_grad = dedup and gb == 4  # the optimizer steps on its slice of the accumulation buffer
    if opt_nvme:  # _swap_out_offload_fp32_gradients: written at the boundary, read back into a swap buffer
        items.append(("optimizer gradient", "nvme", p * 4, "fp32 gradients of the swapped sub-groups, swap files"))
    elif off_opt:
        items.append(("optimizer gradient", where(True), 0 if shared_grad else p * 4,
                      "none: the optimizer's fp32 gradient is the accumulation buffer (ep_train ds_memory)"
                      if shared_grad else "fp32 gradient the offloaded optimizer steps on (a second buffer, pinned)"))
    items.append(("Adam moments", "nvme" if opt_nvme else where(off_opt), p * 8,
                  "exp_avg and exp_avg_sq, fp32, created at step 1"))
    if par_nvme:  # partitioned_param_swapper: buffer_count buffers of buffer_size elements, pinned
        o = z.get("offload_param", {})
        count, size = int(o.get("buffer_count", 5)), int(float(o.get("buffer_size", 1e8)))
        items.append(("NVMe parameter buffers", "host", count * size * pb,
                      f"offload_param: {count} pinned swap buffers of {size:.0e} elements"))
        if in_cpu < lp:  # stage3 reserve_partitioned_swap_space: only when a sub-group has no host buffer,
            # sized by the full (ds_numel) sizes of the largest sub-group
            items.append(("NVMe parameter write-back", "host", s.largest_subgroup_full * pb,
                          "pinned buffer the optimizer step writes a sub-group's parameters through (full sizes)"))
    if opt_nvme:  # optimizer_utils: buffer_count buffers of the largest sub-group, fp32, pinned
        count = int(z.get("offload_optimizer", {}).get("buffer_count", 4))
        items.append(("NVMe optimizer buffers", "host", count * s.largest_subgroup * 4,
                      f"offload_optimizer: {count} pinned fp32 swap buffers of the largest optimizer sub-group"))
        items.append(("first-step Adam moments", "host", s.largest_subgroup * 8,
                      "CPU Adam creates a sub-group's moments at its first step, before they are swapped out"))
    # --- DeepSpeed buffers ----------------------------------------------------------------------
    bucket = int(float(z.get("reduce_bucket_size", 5e8)))
    # torch.empty: only the pages gradients are copied into become resident, and a rank never puts more
    # than its own full gradients (every parameter it computes with) into the bucket.
    items.append(("reduce bucket", where(False), min(bucket, s.local_full) * gb,
                  f"contiguous_gradients bucket: reduce_bucket_size {bucket:.0e} elements, resident as filled"))
    prefetch = int(float(z.get("stage3_prefetch_bucket_size", 5e7))) if stage >= 3 else 0
    max_live = int(float(z.get("stage3_max_live_parameters", 1e9)))
    # a one-rank partition group (experts at EP = world) needs no all-gather, but with parameters offloaded to
    # the host DeepSpeed's NoGatherHandle still copies the partition to the device (ds_tensor.to(device))
    block = s.block_full if off_par and not cpu else s.block_gathered
    gathered = min(max_live, block + min(prefetch, block)) if stage >= 3 else 0
    items.append(("gathered parameters", where(False), gathered * pb,
                  "ZeRO-3 all-gathers of the largest block plus the prefetch bucket, capped by "
                  "stage3_max_live_parameters"))
    items.append(("block gradients", where(False), s.block_full * pb,
                  "full gradients of one block before the reduce-scatter partitions them"))
    items.append(("reduce temporaries", where(False), min(bucket, s.block_full) * gb,
                  "averaged/scattered copy of one bucket's gradients during the reduce"))
    if not off_opt:  # stage3._prepare_fp32_grad_for_sub_group flattens a sub-group's gradients: a copy in fp32 too
        items.append(("fp32 gradient copy", where(False), s.largest_subgroup * 4,
                      "fp32 copy of the largest optimizer sub-group's gradients at the step"))
        # torch's AdamW steps each sub-group's flat partition: on the CPU its single-tensor path makes
        # (exp_avg_sq.sqrt() / c), two partition-sized temporaries at once; on CUDA its foreach path one
        temps = 1 if device == "cuda" else 2
        items.append(("AdamW temporaries", where(False), s.largest_subgroup * 4 * temps,
                      f"torch AdamW's denominator: {temps} temporary copies of the largest sub-group at the step"))
    # --- activations ----------------------------------------------------------------------------
    act = activation_bytes(cfg, cfg.train.activation_checkpointing, pb)
    how = "no recompute"
    if cfg.train.activation_checkpointing:
        how = "checkpointed blocks" + ("" if cfg.train.recompute_comm else ", exchanged rows kept for the recompute")
    items.append(("activations", where(False), act["total"], f"one micro-batch ({how})"))
    # --- allocator and baseline -----------------------------------------------------------------
    if stage >= 3:
        # A module's initial values are made in fp32, one tensor of at most 3 (SwiGLU) heap-sized at a time.
        retained = s.partition_small * pb + min(s.largest_module_full * 4, threshold * 3)
        items.append(("freed heap (construction)", "host", retained,
                      f"partitions made during construction (<= {threshold / MIB:g} MiB each: glibc heap) that "
                      "DeepSpeed copies into its flat buffers, plus one module's fp32 initial values: freed, "
                      "kept resident"))
    items.append(("process baseline", "host", HOST_BASELINE_TRAIN,
                  "torch + DeepSpeed imported, gloo, CPU Adam loaded (measured)"))
    if not cpu:
        items.append(("CUDA context", "device", DEVICE_BASELINE, "context and library workspaces (typical)"))

    setup_names = {"parameters", "fp32 master", "gradient partition", "optimizer gradient",
                   "freed heap (construction)", "NVMe parameter buffers", "NVMe parameter write-back",
                   "parameters kept in RAM",
                   "NVMe optimizer buffers"}  # (all allocated by deepspeed.initialize)
    host = sum(b for _, w, b, _ in items if w == "host")
    dev = sum(b for _, w, b, _ in items if w == "device")
    setup_host = sum(b for n, w, b, _ in items if w == "host" and n in setup_names) + HOST_BASELINE_SETUP
    if shared_grad and off_opt:
        setup_host += p * 4  # DeepSpeed's own optimizer gradient exists until ds_memory swaps in the slice
    per_rank = [{"rank": r, "host_peak_bytes": host, "device_peak_bytes": dev, "host_setup_bytes": setup_host}
                for r in range(world)]
    return {"world": world, "ep_size": cfg.parallel.ep_size, "zero_stage": stage, "device": device,
            "precision": precision, "offload_param": off_par, "offload_optimizer": off_opt,
            "partition_elements": p, "host_peak_bytes": host, "device_peak_bytes": dev,
            "host_setup_bytes": setup_host, "ranks": per_rank,
            "all_to_all_bytes_per_step": all_to_all_bytes_per_step(cfg, world, pb),
            "activations": act,
            "breakdown": [{"name": n, "where": w, "bytes": b, "why": why} for n, w, b, why in items]}
