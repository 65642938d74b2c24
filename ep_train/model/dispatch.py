"""Token dispatch inside one process: the dispatcher interface, the slot layout that expands and
combines rows, and the local (no communication) dispatcher.

Shape legend: T tokens on this rank, D model dim, E experts in total, E_l experts on this rank,
K experts per token, N rows handed to the local experts (grouped by local expert),
S rows of a slot layout, each with C slots (S * C >= N).

Interface (no parameters, swappable; ``ep_train.parallel.dispatch.AllToAllDispatcher`` is the
expert-parallel one):
    dispatch(x [T, D], expert_ids [T, K], keep [T, K], weights [T, K]) -> (x_grouped [N, D], counts: list[int]
             (E_l), meta)
    combine(y_grouped [N, D], meta) -> [T, D]: each token's rows summed with its routing weights
The weights go in at dispatch so that an expert-parallel dispatcher can send them with the tokens.
A token's kept experts are distinct (every router makes them so).

Expand and combine go through a slot layout: grouped row n fills slot ``slot[n]`` of S rows x C
slots (row ``slot // C``). Expanding (``expand``) is a gather ``x[slot // C]`` whose backward sums a
row's copies; combining (``combine_slots``) gathers the N rows into an [S, C, D] buffer (only empty
slots are zeroed) and adds the C slices with their weights, and its backward is again a gather (each
row's gradient is its slot row's, times its weight; the weight's is a dot product with the row). This
replaced ``zeros(T, D).index_add(token_idx, y * w)`` because it measured faster on CPU (one thread,
T=8192, D=1024, K=2, fp32, weights with gradient, combine fwd+bwd): ``bench/moe_layer.py``'s combine
table, interleaved: index_add 115.7 ms, slot gather + bmm 89.7 ms. The weighted sum itself, forward +
backward, one thread, torch 2.13, 2026-11-27, median of 11 (S x D; C 2): one multiply-add per slot with
the gather backward above 4,096 x 512 9.4 ms, 1,024 x 128 0.41 ms, 4,096 x 64 0.93 ms; a bmm of
[1, C] x [C, D] products under autograd 11.3 / 1.22 / 2.64 ms (torch's CPU bmm runs a plain loop below
400 multiply-adds per product); a broadcast multiply and a sum over C 14.4 / 0.55 / 1.35 ms. On a GPU
the bmm took 7.4 ms of a 67 ms Mixtral-sized layer step (bench/gpu_check.py's profile, H200, bf16); with
the multiply-add form the layer's forward + backward took 59.5-60.0 ms at 16,384 tokens against 61.3 ms
with multiply + sum before it (H200, runs hours apart: no worse, not a measured gain; docs/benchmarks.md).
The unweighted sums over C add the C slices (``slot_sum``): torch's CPU reduction over a middle
dimension measured 4.6x slower than one add (S 8,192 x C 2 x D 512, fp32, one thread: sum(1) 7.1 ms,
add 1.6 ms; C 4 x D 128: 2.1 vs 0.8 ms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.autograd.function import once_differentiable

from ep_train.model.router import count_ids


@dataclass
class SlotLayout:
    """N rows placed in S rows x C slots; index tensors only (no host sync to build it)."""

    slot: torch.Tensor  # [N] flat slot (row * C + c) of each grouped row, distinct
    rows: torch.Tensor  # [N] slot // C: the row of S each grouped row belongs to
    src: torch.Tensor  # [S * C] grouped row filling each slot (0 where empty; zeroed after the gather)
    empty: torch.Tensor | None  # [S * C - N] empty slots, None when every slot is filled
    num_rows: int  # S
    width: int  # C


def slot_layout(slot: torch.Tensor, num_rows: int, width: int) -> SlotLayout:
    n, total = slot.numel(), num_rows * width
    ar = torch.arange(n, device=slot.device)
    src = torch.zeros(total, dtype=torch.long, device=slot.device).index_copy_(0, slot, ar)
    empty = None
    if n < total:  # the empty slots, found by a sort of a known size instead of nonzero() (a host sync)
        filled = torch.zeros(total, dtype=torch.uint8, device=slot.device).index_fill_(0, slot, 1)
        empty = torch.argsort(filled)[: total - n]
    return SlotLayout(slot, torch.div(slot, width, rounding_mode="floor"), src, empty, num_rows, width)


def _gather_slots(y: torch.Tensor, lay: SlotLayout) -> torch.Tensor:
    """[N, D] -> [S, C, D], empty slots zero."""
    if y.shape[0] == 0:
        return y.new_zeros(lay.num_rows, lay.width, y.shape[1])
    buf = y[lay.src]  # [S * C, D]
    if lay.empty is not None:
        buf.index_fill_(0, lay.empty, 0)
    return buf.view(lay.num_rows, lay.width, y.shape[1])


def _exact_adds(buf: torch.Tensor) -> bool:
    """Whether adding C slices one by one is as accurate as ``sum``: at most two terms (one rounding of the
    exact sum either way), or fp32/fp64 (the same terms in another order; low precision rounds at each add)."""
    return buf.shape[1] <= 2 or buf.dtype in (torch.float32, torch.float64)


def slot_sum(buf: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """[S, C, D] (weights w [S, C] or None) -> [S, D], the (weighted) sum over C: one add or multiply-add
    per slot (see the module docstring). In bf16/fp16 with C > 2, where each add would round, and
    unweighted on CUDA, torch's reduction (which accumulates in fp32)."""
    c = buf.shape[1]
    if w is None:
        if buf.is_cuda or c == 1 or not _exact_adds(buf):
            return buf.sum(1)
        out = buf[:, 0] + buf[:, 1]
        for i in range(2, c):
            out += buf[:, i]
        return out
    w = w.unsqueeze(2)  # [S, C, 1]
    if not _exact_adds(buf):
        return (buf * w).sum(1)
    out = buf[:, 0] * w[:, 0]
    for i in range(1, c):
        out.addcmul_(buf[:, i], w[:, i])
    return out


class _Expand(torch.autograd.Function):
    """x [S, D] -> one copy per grouped row [N, D]; backward sums each row's copies (a slot gather)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lay: SlotLayout) -> torch.Tensor:  # type: ignore[override]
        ctx.lay = lay
        return x[lay.rows]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return slot_sum(_gather_slots(grad, ctx.lay)), None


class _SlotSum(torch.autograd.Function):
    """Rows [N, D] (weights [N] or None) -> each slot row's weighted sum [S, D], the adjoint of ``_Expand``
    (times the weights). Backward: row n's gradient is its slot row's times its weight (a gather), its
    weight's the dot product of that gradient with the row; nothing of size [S, C, D] is kept."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, weights: torch.Tensor | None, lay: SlotLayout
                ) -> torch.Tensor:  # type: ignore[override]
        ctx.lay = lay
        w = None
        if weights is not None:  # the unweighted backward needs neither y nor weights
            ctx.save_for_backward(y, weights)
            # [N] -> [S, C], zero in the empty slots
            w = weights.new_zeros(lay.num_rows * lay.width).index_copy(0, lay.slot, weights)
            w = w.view(lay.num_rows, lay.width)
        return slot_sum(_gather_slots(y, lay), w)

    @staticmethod
    @once_differentiable  # the backward works in place on its own gather
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        gy = grad[ctx.lay.rows]  # [N, D]
        saved = ctx.saved_tensors  # read once: activation checkpointing unpacks each saved tensor once
        if not saved:
            return gy, None, None
        y, weights = saved
        gw = torch.linalg.vecdot(gy, y) if ctx.needs_input_grad[1] else None  # [N]
        return gy.mul_(weights.unsqueeze(1)), gw, None


def expand(x: torch.Tensor, lay: SlotLayout) -> torch.Tensor:
    return _Expand.apply(x, lay)


def combine_slots(y: torch.Tensor, weights: torch.Tensor | None, lay: SlotLayout) -> torch.Tensor:
    """out[s] = sum over s's slots of weight * row: y [N, D], weights [N] (None: all 1) -> [S, D]."""
    return _SlotSum.apply(y, None if weights is None else weights.to(y.dtype), lay)


def sort_by_expert(expert_ids: torch.Tensor, keep: torch.Tensor, num_experts: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept assignments sorted by global expert id. Returns (order [N_kept], counts [E] on device)."""
    flat = expert_ids.reshape(-1).masked_fill(~keep.reshape(-1), num_experts)  # dropped -> sentinel E
    counts = count_ids(flat, num_experts + 1)[:num_experts]  # [E]
    order = torch.argsort(flat, stable=True)  # dropped rows sort last; sliced off by the caller
    return order, counts


def weighted_scatter(y: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The index_add combine the slot layout replaced (kept for the benchmark's comparison):
    y [N, D] rows of flat assignments ``order`` [N] (t * K + k), weights [T, K] -> [T, D]."""
    w = weights.reshape(-1)[order].to(y.dtype)  # [N]
    token_idx = torch.div(order, weights.shape[1], rounding_mode="floor")
    return y.new_zeros(num_tokens, y.shape[1]).index_add(0, token_idx, y * w[:, None])


@dataclass
class DispatchMeta:
    layout: SlotLayout  # grouped rows -> (token, k) slots: S = T, C = K, slot = t * K + k
    weights: torch.Tensor  # [N] routing weight of each grouped row


class LocalDispatcher:
    """All experts on this rank: a sort and a gather, no communication."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor
                 ) -> tuple[torch.Tensor, list[int], DispatchMeta]:
        order, counts = sort_by_expert(expert_ids, keep, self.num_experts)
        counts_list = counts.tolist()  # host sync: group sizes for the expert matmuls
        lay = slot_layout(order[: sum(counts_list)], expert_ids.shape[0], expert_ids.shape[1])
        return expand(x, lay), counts_list, DispatchMeta(lay, weights.reshape(-1)[lay.slot])

    def combine(self, y: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        return combine_slots(y, meta.weights, meta.layout)


class Dispatcher(Protocol):
    """``combine`` takes the meta its own ``dispatch`` returned (each dispatcher has its own kind)."""

    num_experts: int

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor
                 ) -> tuple[torch.Tensor, list[int], Any]: ...

    def combine(self, y: torch.Tensor, meta: Any) -> torch.Tensor: ...
