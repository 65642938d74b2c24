"""DeepSpeed 0.19.8's ZeRO-3 gradient path without avoidable full-size copies of gradients.

Measured with bench/step_breakdown.py on the 583M MoE (world 2, EP 2, ZeRO-3 + CPU offload, 2 cores):
the first two took about a quarter of a training step, all of it in fresh host allocations being faulted in
(a copy into memory already mapped runs ~5x faster than one into a new tensor of the same size).

1. The gradient norm. At every accumulation boundary ``_offload_grad_partition_at_boundary`` (and, without
   offload, ``set_norm_for_param_grad_in_gpu``) calls ``_constant_buffered_norm2``, which converts the whole
   gradient partition into a new fp64 tensor (``part.to(float64).norm(2)``, in 250M-element pieces): 8
   bytes per element allocated and filled for one scalar; ~14% of the step. The replacement on CPU
   accumulates in fp64 over pieces of ``NORM_PIECE`` elements, whose fp64 copy (512 KiB) stays below
   glibc's mmap threshold and is reused from the heap. Same precision (fp64 squares and sums, one piece is
   bitwise DeepSpeed's value); a multi-piece sum differs from DeepSpeed's only in summation order. On an
   accelerator DeepSpeed's own method runs (its caching allocator reuses memory, and small pieces would
   only add kernel launches).
2. Expert gradients on a one-rank partition group. When expert parallelism spans the data-parallel ranks
   (EP = world: each expert lives on one rank), DeepSpeed still reduce-scatters each expert gradient over
   its one-rank expert-data-parallel group (``reduce_scatter_coalesced``: a divide by 1, and a collective
   that gloo runs on a clone of the gradient), then rescales it out of place for AutoEP's averaging
   (``g.mul(scale)``, a new tensor). ``__avg_scatter_grads``' replacement computes the same values for a
   one-rank group in place on the gradient (which DeepSpeed drops right after): the reduce over one rank
   is the identity, the divide by 1 is exact, and the scale is the same Python float applied in the same
   dtype before the same conversion to the accumulation dtype (bf16 gradients, fp32 accumulation). On the
   first micro-step of a window (where DeepSpeed's ``partition_grads`` copies the result into the gradient
   partition buffer), with no dtype conversion and the buffer on the gradient's device (CPU training; with
   offload on a GPU the buffer is on the host and DeepSpeed's copy moves it), the scaled gradient is written
   straight into that buffer (``torch.mul(..., out=)``): the copy is then of a tensor onto itself, which
   torch skips, and one pass over the expert gradients (most of the model's elements) is saved (measured at
   583M: the in-place scale took ~1% of a step). Bitwise DeepSpeed's result. Every other case (groups of
   several ranks, a communication dtype other than the parameters', gradient pre-division, the quantized
   all-to-all reduce) calls DeepSpeed's method unchanged.
3. No bucket copy for those gradients. With ``contiguous_gradients`` DeepSpeed first copies every gradient
   that fits into its reduce bucket (``__add_grad_to_ipg_bucket``), so that a multi-rank reduce-scatter
   works on one flat buffer. A one-rank gradient is never reduced from that buffer (with ``reduce_scatter``
   on, the bucket's gradients are read one by one, as in 2.), so on the host the copy is a full pass over the
   expert gradients for nothing; here the gradient joins the bucket's list where it is, as DeepSpeed itself
   does for a gradient larger than the bucket. The bucket still counts its elements, so it flushes at the
   same points, and 2. reads the same values: bitwise DeepSpeed's result. The gradient then stays in its own
   storage until the flush (``partition_grads`` drops it); ep-train's expert backward reuses that storage
   only once nothing references it (ep_train/model/experts.py ``_GradScratch``).

The patches are bound to one optimizer object after ``deepspeed.initialize`` (nothing global is changed).
Another DeepSpeed version, or a missing attribute, leaves DeepSpeed's methods in place with a log line.
Control: the DeepSpeed JSON's ``"ep_train": {"fast_grad_path": false}`` turns all three off (default on).
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch

from ep_train.parallel.ds_memory import SUPPORTED_DEEPSPEED  # one pin for every DeepSpeed patch
from ep_train.parallel.zero import ep_train_switch

log = logging.getLogger("DeepSpeed")  # DeepSpeed's own logger: it has a handler, so these lines show

NORM_PIECE = 1 << 16  # elements per fp64 piece of the gradient norm (512 KiB in fp64)
_AVG_SCATTER = "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads"  # name-mangled __avg_scatter_grads
_GRAD_PARTITIONS = "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"  # ds_id -> gradient partition buffer
_ADD_TO_BUCKET = "_DeepSpeedZeroOptimizer_Stage3__add_grad_to_ipg_bucket"  # name-mangled __add_grad_to_ipg_bucket
_NEEDED = ("_constant_buffered_norm2", _AVG_SCATTER, _GRAD_PARTITIONS, _ADD_TO_BUCKET, "_get_param_partition_group",
           "_assert_same_partition_group", "_gradient_averaging_world_size", "dtype", "gradient_accumulation_dtype",
           "postscale_gradients", "gradient_predivide_factor", "all2all_process_group", "micro_step_id",
           "contiguous_gradients", "reduce_scatter", "ipg_buckets", "get_param_comm_dtype")


def fast_grad_path_enabled(ds: dict[str, Any]) -> bool:
    """The JSON's switch (default on) and whether it can apply: ZeRO stage 3."""
    wanted = ep_train_switch(ds, "fast_grad_path")
    return wanted and ds.get("zero_optimization", {}).get("stage") == 3


def fp64_norm(t: torch.Tensor, piece: int = NORM_PIECE) -> torch.Tensor:
    """The 2-norm of ``t`` with fp64 squares and sums, converting ``piece`` elements at a time -> [] fp64."""
    total: torch.Tensor | None = None
    for part in t.detach().reshape(-1).split(piece):
        sq = torch.linalg.vector_norm(part, 2, dtype=torch.float64) ** 2.0  # DeepSpeed's `to(fp64).norm(2)**2.0`
        total = sq if total is None else total + sq
    if total is None:  # an empty partition
        return torch.zeros((), dtype=torch.float64, device=t.device)
    return total ** 0.5


def apply_fast_grad_path(optimizer: Any, ds: dict[str, Any]) -> bool:
    """Bind the three replacements to this ZeRO-3 optimizer; True when they were applied."""
    if not fast_grad_path_enabled(ds):
        return False
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3
    from deepspeed.runtime.zero.utils import get_norm_dtype

    if deepspeed.__version__ != SUPPORTED_DEEPSPEED or not isinstance(optimizer, Stage3):
        log.info("ep_train: DeepSpeed's gradient path kept (deepspeed %s, optimizer %s; checked on %s, stage 3)",
                 deepspeed.__version__, type(optimizer).__name__, SUPPORTED_DEEPSPEED)
        return False
    missing = [a for a in _NEEDED if not hasattr(optimizer, a)]
    if missing:
        log.warning("ep_train: DeepSpeed's gradient path kept: the optimizer lacks %s", missing)
        return False
    own_norm = optimizer._constant_buffered_norm2
    own_avg_scatter = getattr(optimizer, _AVG_SCATTER)
    own_add_to_bucket = getattr(optimizer, _ADD_TO_BUCKET)
    optimizer.ep_train_bucket_copies_skipped = 0  # read by tests/distributed/test_offload_dedup.py

    def constant_buffered_norm2(self: Any, input: torch.Tensor, buffer_size: int = 250_000_000) -> torch.Tensor:
        if input.device.type != "cpu" or get_norm_dtype() != torch.float64:
            return own_norm(input, buffer_size)
        return fp64_norm(input)

    def avg_scatter_grads(self: Any, params: list, communication_data_type: torch.dtype) -> list[torch.Tensor]:
        group = self._get_param_partition_group(params[0])
        if (dist.get_world_size(group) != 1 or communication_data_type != self.dtype
                or (self.postscale_gradients and self.gradient_predivide_factor != 1.0)
                or self.all2all_process_group is not None):
            return own_avg_scatter(params, communication_data_type)
        self._assert_same_partition_group(params)
        averaging = self._gradient_averaging_world_size(params, 1)
        out = [p.grad.reshape(-1) for p in params]  # a one-rank reduce-scatter returns its input
        if averaging != 1:
            scale = 1 / float(averaging)  # DeepSpeed: partition_world_size / float(averaging_world_size)
            if (self.micro_step_id == 0 and communication_data_type == self.gradient_accumulation_dtype
                    and not getattr(self, "zenflow", False)):
                # into the buffers partition_grads copies to at this micro-step: its copy_ is then a no-op
                # (only where buffer and gradient share a device: with offload on a GPU the buffer is on the host)
                bufs = getattr(self, _GRAD_PARTITIONS)
                dests = [bufs[p.ds_id].narrow(0, 0, g.numel()) for p, g in zip(params, out)]
                if all(d.device == g.device for d, g in zip(dests, out)):
                    return [torch.mul(g, scale, out=d) for g, d in zip(out, dests)]
            for g in out:
                g.mul_(scale)  # in place: DeepSpeed drops param.grad once partition_grads has copied it
        if communication_data_type != self.gradient_accumulation_dtype:  # bf16 grads, fp32 accumulation
            out = [g.to(self.gradient_accumulation_dtype) for g in out]  # after the scale, as DeepSpeed does
        return out

    def add_grad_to_ipg_bucket(self: Any, param: Any) -> None:
        grad, comm_dtype = param.grad, self.get_param_comm_dtype(param)
        group = self._get_param_partition_group(param)
        # where DeepSpeed would copy: contiguous buffers; with reduce_scatter off it reduces from bucket.buffer itself
        if not (self.contiguous_gradients and self.reduce_scatter and grad.device.type == "cpu"
                and grad.dtype == comm_dtype and grad.is_contiguous() and dist.get_world_size(group) == 1
                and not getattr(self, "zenflow", False)):
            return own_add_to_bucket(param)
        bucket = self.ipg_buckets[comm_dtype]  # DeepSpeed's bookkeeping, without the copy into bucket.buffer
        bucket.params.append(param)
        bucket.process_group = group
        bucket.elements += grad.numel()
        self.ep_train_bucket_copies_skipped += 1

    optimizer._constant_buffered_norm2 = types.MethodType(constant_buffered_norm2, optimizer)
    setattr(optimizer, _AVG_SCATTER, types.MethodType(avg_scatter_grads, optimizer))
    setattr(optimizer, _ADD_TO_BUCKET, types.MethodType(add_grad_to_ipg_bucket, optimizer))
    log.info("ep_train: ZeRO-3 gradient norm, one-rank gradient reduce and bucket without full-size copies "
             "(ep_train/parallel/ds_grad_path.py)")
    return True
