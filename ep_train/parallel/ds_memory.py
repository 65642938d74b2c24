"""Drop DeepSpeed 0.19.8's duplicate host buffers under ZeRO-3 with the optimizer offloaded to CPU.

Per partition element ``DeepSpeedZeroOptimizer_Stage3`` (runtime/zero/stage3.py) holds, with
``offload_optimizer.device: cpu``:

1. the parameter partition (``fp16_partitioned_groups_flat[i]``, a view of ``lp_param_buffer``) and an
   fp32 master (``fp32_partitioned_groups_flat[i]``). ``_create_fp32_partitions``' offload branch clones
   the partition even when it already is fp32 on the CPU (fp32 training); the non-offload branch shares
   it in that case. Duplicate: 4 bytes.
2. the gradient accumulation buffer ``grad_partitions_flat_buffer`` (``gradient_accumulation_dtype``,
   one slot of ``partition_numel()`` per parameter, in the order of ``chain(*fp16_groups)``) and, per
   sub-group, the optimizer's gradient ``fp32_partitioned_groups_flat[i].grad`` (a separate zeroed
   buffer, ``initialize_optimizer_states``), filled at each accumulation boundary by
   ``_offload_grad_partition_at_boundary`` with ``copy_`` at ``grad_position`` offsets. When the dtypes
   agree (fp32; bf16 with ``data_types.grad_accum_dtype: fp32``) the slot layouts are the same, so the
   sub-group's ``.grad`` can be the accumulation buffer's slice: the boundary copy becomes a copy of a
   tensor onto itself, which torch skips (``copy_`` returns early for the same storage, offset, sizes,
   strides and dtype). Duplicate: 4 bytes.

Why patches of two methods during construction, not a fix-up after ``deepspeed.initialize``: VmHWM is a
high-water mark; building every duplicate first and freeing it later would leave the set-up peak where
it was. Each patch calls DeepSpeed's own method unchanged and replaces the duplicate right after it
(clones: after ``_create_fp32_partitions``; optimizer gradients: after ``set_grad_positions``, which
``__init__`` calls right after ``_setup_for_real_optimizer`` made the accumulation buffer), so the
transient stays below the training peak
(fp32: 12 bytes/param at set-up against 16 in training). The patches live only inside the
``lean_offload_buffers`` context, around ``deepspeed.initialize``.

Every assumption is checked per sub-group before anything is shared (dtype, device, sizes, the
accumulation buffer's slot of every parameter at the sub-group's offset, equal values); a sub-group that
fails a check, is swapped to NVMe or is kept on the accelerator keeps DeepSpeed's own buffers. Another
DeepSpeed version, or a missing attribute, turns everything off with a log line.

What sharing changes, checked in DeepSpeed 0.19.8's code (the engine runs in managed gradient
accumulation: ``partition_grads`` copies a slot into the optimizer gradient during the last micro-step's
backward, for the parameters reduced in it; ``_finalize_offload_gradient_accumulation`` is not called):
- ``unscale_and_clip_grads`` scales ``.grad`` in place, so after a step the accumulation slots hold the
  clipped gradient (DeepSpeed's: the unclipped one). The next window's first micro-step overwrites them
  (``micro_step_id == 0``: ``copy_``) before anyone reads them.
- Nothing differs while every parameter gets a gradient in every micro-step, which ep_train's model
  does (an expert with no tokens still gets a zero gradient from the grouped matmul;
  tests/distributed/test_offload_dedup.py counts parameters without one and finds none). Otherwise, in
  DeepSpeed's own layout: a parameter with no gradient in a whole window steps on its previous window's
  clipped gradient (shared: the same, the slot holds that value); one with a gradient in an earlier
  micro-step but not the last keeps the previous window's gradient (shared: this window's, which is
  right; its norm is left out of clipping either way); one whose first gradient arrives after the first
  micro-step is added to the previous window's slot (shared: the patched ``partition_grads`` zeroes
  such a slot first, so it accumulates from zero).
- Overflow/inf checks read the accumulation buffer before the step (unchanged); the gradient norm is
  taken from the accumulation slots at the boundary (unchanged).
- Checkpoints: save reads ``fp32_partitioned_groups_flat`` (same values); every load path
  (``_restore_from_fp32_weights``, ``_restore_from_bit16_weights``, the universal loader) writes with
  ``.data.copy_`` into the existing tensors, so the sharing survives. After the step DeepSpeed copies
  the master into the parameter partition: with a shared master that copy is onto itself.
- ``offload_states``/``reload_states`` re-allocate the accumulation buffer (``.data =``) and would break
  the sharing: they raise on an optimizer with shared buffers.

Control: the DeepSpeed JSON's ``"ep_train": {"dedup_offload_buffers": false}`` turns it off (default on).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch

from ep_train.parallel.zero import ep_train_switch

log = logging.getLogger("DeepSpeed")  # DeepSpeed's own logger: it has a handler, so these lines show

SUPPORTED_DEEPSPEED = "0.19.8"
_MAPPING = "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"  # name-mangled __param_id_to_grad_partition
_METHODS = ("_create_fp32_partitions", "_setup_for_real_optimizer", "set_grad_positions",
            "initialize_optimizer_states", "partition_grads", "_offload_grad_partition_at_boundary",
            "unscale_and_clip_grads",
            "_swappable_optimizer_subgroup", "offload_states", "reload_states")
_MASTER_ATTRS = ("fp16_partitioned_groups_flat", "fp32_partitioned_groups_flat", "offload_optimizer",
                 "subgroup_to_device")
_STATE_ATTRS = ("fp16_groups", "fp16_partitioned_groups_flat", "fp16_partitioned_groups_flat_numel",
                "fp32_partitioned_groups_flat", "grad_partitions_flat_buffer", "grad_position", "offload_optimizer",
                "subgroup_to_device", "micro_step_id", "_offload_boundary_param_ids", _MAPPING)


def dedup_enabled(ds: dict[str, Any]) -> bool:
    """The JSON's switch (default on) and whether it can apply: ZeRO-3 with the optimizer offloaded to CPU."""
    z = ds.get("zero_optimization", {})
    wanted = ep_train_switch(ds, "dedup_offload_buffers")
    offload = z.get("offload_optimizer") or {}
    # SuperOffload (DeepSpeed's own Stage-3 subclass) steps CPU Adam inside its partition_grads: not patched
    return wanted and z.get("stage") == 3 and offload.get("device") == "cpu" and not offload.get("super_offload")


def unsupported_reason() -> str | None:
    """Why this DeepSpeed cannot be patched (version, missing methods), or None."""
    import deepspeed
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    if deepspeed.__version__ != SUPPORTED_DEEPSPEED:
        return (f"deepspeed {deepspeed.__version__} is not {SUPPORTED_DEEPSPEED}, "
                "the version these patches were checked on")
    missing = [m for m in _METHODS if not callable(getattr(Stage3, m, None))]
    return f"DeepSpeedZeroOptimizer_Stage3 lacks {missing}" if missing else None


def _cpu_subgroup(opt: Any, i: int) -> bool:
    """A sub-group whose optimizer runs on the CPU from in-memory buffers (not NVMe, not partial offload)."""
    return bool(opt.offload_optimizer and not opt._swappable_optimizer_subgroup(i)
                and opt.subgroup_to_device.get(i) == "cpu")


def _share_masters(opt: Any) -> None:
    """fp32 master = the fp32 parameter partition itself (what DeepSpeed means to do without offload; see sizes.py)."""
    shared = 0
    for i, master in enumerate(opt.fp32_partitioned_groups_flat):
        lp = opt.fp16_partitioned_groups_flat[i] if _cpu_subgroup(opt, i) else None  # None: swapped to NVMe
        if (lp is None or lp.dtype != master.dtype or lp.device != master.device or lp.shape != master.shape
                or master.grad is not None or not torch.equal(lp, master)):
            continue
        master.data = lp.data  # same Python object: ds_id, requires_grad and optimizer.state keys stay
        shared += master.numel()
    opt._ep_shared_master_elements = shared


def _share_grads(opt: Any) -> None:
    """Each CPU sub-group's optimizer gradient = its slice of the accumulation buffer (same slot layout)."""
    acc = opt.grad_partitions_flat_buffer
    slots = getattr(opt, _MAPPING)
    base = acc.storage_offset()
    offset = shared = 0
    opt._ep_shared_grad_groups = set()
    for i, group in enumerate(opt.fp16_groups):
        numel = sum(p.partition_numel() for p in group)
        start, offset = offset, offset + numel
        master = opt.fp32_partitioned_groups_flat[i]
        grad = master.grad
        if not _cpu_subgroup(opt, i) or grad is None or grad.dtype != acc.dtype or grad.device != acc.device:
            continue
        if numel != int(opt.fp16_partitioned_groups_flat_numel[i]) or grad.numel() != numel or master.numel() != numel:
            continue
        inner, ok = 0, True
        for p in group:  # every parameter's accumulation slot sits where the optimizer gradient expects it
            slot = slots.get(p.ds_id)
            where = opt.grad_position.get(opt.get_param_id(p))
            ok = ok and slot is not None and where == [i, inner, p.partition_numel()]
            ok = ok and slot.untyped_storage().data_ptr() == acc.untyped_storage().data_ptr()
            ok = ok and slot.storage_offset() == base + start + inner and slot.numel() == p.partition_numel()
            inner += p.partition_numel()
        if not ok or not torch.equal(grad, acc.narrow(0, start, numel)):  # both still zero here
            log.warning("ep_train: optimizer sub-group %d keeps its own gradient buffer (slot layout differs)", i)
            continue
        master.grad = acc.narrow(0, start, numel)
        opt._ep_shared_grad_groups.add(i)
        shared += numel
    opt._ep_shared_grad_elements = shared


def dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _refuse(name: str):  # type: ignore[no-untyped-def]
    def method(self: Any, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"{name} re-allocates the gradient buffer that ep_train shares with the optimizer; "
                                  'set "ep_train": {"dedup_offload_buffers": false} in the DeepSpeed JSON to use it')
    return method


@contextlib.contextmanager
def lean_offload_buffers(ds: dict[str, Any]) -> Iterator[None]:
    """Around ``deepspeed.initialize``: ZeRO-3 optimizers built inside share the duplicate buffers."""
    reason = None if dedup_enabled(ds) else "off (DeepSpeed JSON or no ZeRO-3 CPU optimizer offload)"
    reason = reason or unsupported_reason()
    if reason is not None:
        log.info("ep_train: DeepSpeed offload buffers not deduplicated: %s", reason)
        yield
        return
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    orig = {m: getattr(Stage3, m) for m in ("_create_fp32_partitions", "set_grad_positions")}

    def create_fp32_partitions(self: Any) -> None:
        orig["_create_fp32_partitions"](self)
        if type(self) is not Stage3:  # a subclass (SuperOffload) may depend on its own buffers and methods
            log.info("ep_train: %s is not DeepSpeed's plain ZeRO-3 optimizer; buffers not shared", type(self).__name__)
            return
        missing = [a for a in _MASTER_ATTRS if not hasattr(self, a)]
        if missing:
            log.warning("ep_train: DeepSpeed optimizer lacks %s; fp32 masters not shared", missing)
            return
        _share_masters(self)

    def set_grad_positions(self: Any) -> None:
        # Called once, by __init__ right after _setup_for_real_optimizer (which made the accumulation buffer):
        # the first point where both the buffer and grad_position exist.
        orig["set_grad_positions"](self)
        if type(self) is not Stage3:  # its partition_grads may do more than Stage3's (SuperOffload steps Adam there)
            return
        missing = [a for a in _STATE_ATTRS if not hasattr(self, a)]
        if missing:
            log.warning("ep_train: DeepSpeed optimizer lacks %s; gradients not shared", missing)
            return
        _share_grads(self)
        if dist_rank() == 0:
            shared = shared_summary(self)
            log.info("ep_train: shared %d fp32 master and %d gradient elements of %d (ep_train/parallel/ds_memory.py)",
                     shared["master_elements"], shared["grad_elements"],
                     sum(t.numel() for t in self.fp32_partitioned_groups_flat))
        if self._ep_shared_grad_groups:
            self.partition_grads = _partition_grads_from_zero.__get__(self)
            self.offload_states = _refuse("offload_states").__get__(self)
            self.reload_states = _refuse("reload_states").__get__(self)

    Stage3._create_fp32_partitions = create_fp32_partitions
    Stage3.set_grad_positions = set_grad_positions
    try:
        yield
    finally:
        for name, fn in orig.items():
            setattr(Stage3, name, fn)


def _partition_grads_from_zero(self: Any, params_to_release: list, grad_partitions: list) -> Any:
    """DeepSpeed's ``partition_grads``, after zeroing the slot of a parameter whose first gradient of this
    window arrives at a later micro-step (DeepSpeed would add it to the previous window's slot, which
    now holds the clipped gradient the optimizer stepped on)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    if self.micro_step_id != 0:
        slots = getattr(self, _MAPPING)
        for p in params_to_release:
            real = p.partition_numel() * self._get_param_partition_rank(p) < p.ds_numel  # as DeepSpeed tests
            if real and p.ds_id not in self._offload_boundary_param_ids and \
                    self.grad_position[self.get_param_id(p)][0] in self._ep_shared_grad_groups:
                slots[p.ds_id].zero_()
    return Stage3.partition_grads(self, params_to_release, grad_partitions)


def shared_summary(optimizer: Any) -> dict[str, int]:
    """Elements whose master / optimizer gradient are shared (0 when nothing was)."""
    return {"master_elements": getattr(optimizer, "_ep_shared_master_elements", 0),
            "grad_elements": getattr(optimizer, "_ep_shared_grad_elements", 0)}
