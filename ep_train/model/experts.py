"""Stacked SwiGLU experts, computed over contiguous token groups.

Shape legend: N tokens routed to this rank's experts (grouped by local expert), D model dim,
F expert FFN dim, E_l experts held here.

Weights follow the layout DeepSpeed AutoEP and Hugging Face Mixtral use (``nn.Linear``-style
[out, in] per expert): ``w1`` gate [E_l, F, D], ``w3`` up [E_l, F, D], ``w2`` down [E_l, D, F].
"""

from __future__ import annotations

import itertools
import sys
import threading
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _aligned16(t: torch.Tensor) -> bool:
    """Base address and every non-unit stride a multiple of 16 bytes (what torch._grouped_mm's kernels need).

    ZeRO-3 hands a gathered parameter over as a view into a flat buffer, so its base address is not
    guaranteed to be aligned; an unaligned operand makes _grouped_mm raise instead of computing."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in t.stride() if s != 1)


def _grouped_mm_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    # torch._grouped_mm needs CUDA and 16-byte aligned operands; on CPU the slice loop wins. Hopper (sm90)
    # only: it is where ep-train's grouped path is tested and measured (bench/gpu_check.sh), and on Blackwell
    # (sm100) torch's kernel is reported to give an expert with no rows a non-zero weight gradient
    # (pytorch/pytorch#172439, open), which MoE routing produces all the time. Other GPUs take the loop.
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    if torch.cuda.get_device_capability(x.device)[0] != 9:
        return False
    return all(_aligned16(t) for t in (x, *weights))


# Where torch._grouped_mm can run, it computes the experts however few there are. Measured on an H200
# (bench/gpu_experts.py, bf16, forward + backward, 2026-11-28 06:22 UTC; 06:31 again after this change): one
# cuBLAS matmul per expert was 1.08x grouped_mm's time for Mixtral's experts two per GPU, 1.00x at one and
# 0.98x at eight, and 1.6x-2.4x for small experts (F 1408) at 2-64 per GPU. An earlier run (2026-11-27) had
# the loop at 0.94x for two Mixtral experts, and the rule then (the loop for one or two experts per GPU)
# took a path 1.64x slower for two small experts. No expert count is worth the loop on such a GPU; the
# knob stays (0) for tests.
LOOP_MAX_LOCAL_EXPERTS = 0


def _use_grouped_mm(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> bool:
    """The path GroupedExperts takes: torch._grouped_mm where it can run (and more than LOOP_MAX_LOCAL_EXPERTS
    experts are here)."""
    return w1.shape[0] > LOOP_MAX_LOCAL_EXPERTS and _grouped_mm_ok(x, w1, w2, w3)


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN (the dense layers and the shared experts)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GroupedExperts(nn.Module):
    """``E_l`` SwiGLU experts with stacked weights; each knows its global expert id."""

    def __init__(self, dim: int, hidden: int, num_experts: int, first_expert_id: int = 0) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.global_expert_ids: list[int] = list(range(first_expert_id, first_expert_id + num_experts))

    @property
    def num_local_experts(self) -> int:
        return len(self.global_expert_ids)  # not w1.shape[0]: a ZeRO-3 partition has shape [0]

    def keep_experts(self, start: int, count: int) -> None:
        """Keep local experts [start, start + count) (used by expert parallelism)."""
        for name in ("w1", "w2", "w3"):
            full = getattr(self, name)
            setattr(self, name, nn.Parameter(full.detach()[start:start + count].clone(),
                                             requires_grad=full.requires_grad))
        self.global_expert_ids = self.global_expert_ids[start:start + count]

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x: [N, D] grouped by local expert, ``counts[i]`` rows for local expert i -> [N, D].

        Runs (and touches every weight) even when N == 0, so ZeRO-3 gathers and the autograd graph
        are the same on every rank whatever the routing.
        """
        assert len(counts) == self.num_local_experts and sum(counts) == x.shape[0], (counts, x.shape)
        # A profiler scope (bench/step_breakdown.py counts the matmuls under it; nearly free without a profiler).
        with torch.profiler.record_function("ep_train.experts"):
            return self._forward(x, counts)

    def _forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        w1, w2, w3 = self.w1.to(x.dtype), self.w2.to(x.dtype), self.w3.to(x.dtype)
        if x.shape[0] > 0 and _use_grouped_mm(x, w1, w2, w3):
            # Group ends, summed on the host and sent from pinned memory without waiting (torch.tensor(...,
            # device=cuda) would copy from pageable memory and drain the GPU's queue first).
            ends = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, pin_memory=x.is_cuda)
            offs = ends.to(x.device, non_blocking=True)
            h = F.silu(torch._grouped_mm(x, w1.transpose(1, 2), offs=offs)) * torch._grouped_mm(
                x, w3.transpose(1, 2), offs=offs)
            return torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)
        return _ExpertLoop.apply(x, w1, w2, w3, counts)


def _fresh(likes: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty_like(w, memory_format=torch.contiguous_format) for w in likes)


class _GradScratch:
    """Host memory for the expert weight gradients, reused across layers and steps (CPU only).

    Why: a layer's three expert weight gradients are large (46 MB each at 583M), above glibc's largest mmap
    threshold (32 MB), so every one is a fresh mapping whose pages fault in while its matmuls first write it,
    and is unmapped again once ZeRO's hook has copied it away. Measured (one thread, 4 experts, F 2816, D 1024,
    64 rows each, the backward's three weight-gradient matmuls): 104 ms per layer into fresh tensors, 50-56 ms
    into reused ones. GPUs have a caching allocator; this is the host's.

    The memory is handed out again only when nothing else references it: no tensor (torch's count of the
    storage's references is ours alone: a gradient a ZeRO hook has copied and dropped, or one an optimizer's
    ``zero_grad`` has set to None) and no Python handle to the storage itself (``t.untyped_storage()`` returns
    the object this cache holds, so its Python reference count is checked too). A gradient still held anywhere
    (single-process training between backward and the optimizer step, a bucket that keeps it) gets a fresh
    tensor, as without this cache. Memory reached only through a raw pointer or a weak reference is not seen:
    nothing in ep-train or DeepSpeed's CPU path keeps gradients that way. One storage per dtype, grown to the
    largest request: at most one layer's expert weight gradients stay allocated. A lock makes the check and the
    hand-out one step for backward passes in several threads.
    """

    def __init__(self) -> None:
        self._storage: dict[torch.dtype, torch.UntypedStorage] = {}
        self._lock = threading.Lock()

    def take(self, likes: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Uninitialised contiguous tensors shaped as ``likes`` (CPU, one dtype): views of the reused storage if
        it is free, else fresh."""
        dtype = likes[0].dtype
        if any(w.device.type != "cpu" or w.dtype != dtype for w in likes) or not _CAN_COUNT_REFS:
            return _fresh(likes)
        need = sum(w.numel() for w in likes) * likes[0].element_size()
        with self._lock:
            st = self._storage.get(dtype)
            # in use: a tensor references the storage, or a Python name besides the dict's, `st` and the argument
            if st is not None and (torch._C._storage_Use_Count(st._cdata) != 1 or sys.getrefcount(st) > 3):
                return _fresh(likes)
            if st is None or st.nbytes() < need:
                st = self._storage[dtype] = torch.UntypedStorage(need)
            out, offset = [], 0
            for w in likes:
                out.append(torch.empty(0, dtype=dtype, device="cpu").set_(st, offset, w.shape))  # offset: elements
                offset += w.numel()
            return tuple(out)


_CAN_COUNT_REFS = hasattr(torch._C, "_storage_Use_Count")  # torch's own (private) count; without it: no reuse
_GRAD_SCRATCH = _GradScratch()


class _ExpertLoop(torch.autograd.Function):
    """The experts one group at a time (CPU; GPUs without torch._grouped_mm), with a hand-written backward.

    Why not autograd over a loop of slices: each expert's weight gradient came back as its own tensor and
    UnbindBackward stacked them into a fresh [E_l, F, D] gradient, one more full-size copy per weight
    (9% of a 583M CPU step, bench/step_breakdown.py), and autograd kept four [N, F] activations (gate,
    silu(gate), up, their product). Here the weight gradients are written in place by their matmuls
    (``out=``), and only gate and up ([N, F] each) are kept: silu and the product are recomputed in the
    backward (element-wise, cheap beside the matmuls). tests/unit/test_experts.py checks values and
    gradients against autograd over a plain per-expert loop, and gradcheck in fp64.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                counts: list[int]) -> torch.Tensor:
        n, f = x.shape[0], w1.shape[1]
        gate, up = x.new_empty(n, f), x.new_empty(n, f)  # [N, F]
        y = x.new_empty(x.shape)  # [N, D]
        start = 0
        for i, c in enumerate(counts):  # loop over groups (E_l), not over tokens; an empty group still runs
            rows = slice(start, start + c)
            torch.mm(x[rows], w1[i].t(), out=gate[rows])
            torch.mm(x[rows], w3[i].t(), out=up[rows])
            torch.mm(F.silu(gate[rows]).mul_(up[rows]), w2[i].t(), out=y[rows])
            start += c
        ctx.counts = counts
        ctx.save_for_backward(x, w1, w2, w3, gate, up)
        return y

    @staticmethod
    @once_differentiable  # in-place products below: no graph of the backward itself
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w1, w2, w3, gate, up = ctx.saved_tensors
        assert len(ctx.counts) == w1.shape[0], (ctx.counts, w1.shape)  # every expert's gradient gets written
        need_w = any(ctx.needs_input_grad[1:4])
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        # Every expert's weight gradient is written (zeros for an empty group: mm over 0 rows): uninitialised
        # memory is safe. On the host it is reused from the last layer's, once that one was dropped (_GradScratch).
        dw1, dw2, dw3 = _GRAD_SCRATCH.take((w1, w2, w3)) if need_w else (None, None, None)
        dy = dy.contiguous()
        start = 0
        for i, c in enumerate(ctx.counts):
            rows = slice(start, start + c)
            xi, dyi, g, u = x[rows], dy[rows], gate[rows], up[rows]
            s = F.silu(g)  # recomputed: [n_i, F]
            dh = dyi @ w2[i]  # [n_i, F]
            if need_w:
                torch.mm(dyi.t(), s * u, out=dw2[i])  # [D, F]
            du = s.mul_(dh)  # in place: silu(gate) is not needed after dw2 (one [n_i, F] buffer fewer)
            dg = torch.ops.aten.silu_backward(dh.mul_(u), g)  # dh is not needed after du
            if need_w:
                torch.mm(dg.t(), xi, out=dw1[i])  # [F, D]
                torch.mm(du.t(), xi, out=dw3[i])
            if dx is not None:
                torch.mm(dg, w1[i], out=dx[rows])  # [n_i, D]
                dx[rows].addmm_(du, w3[i])
            start += c
        return dx, dw1, dw2, dw3, None
