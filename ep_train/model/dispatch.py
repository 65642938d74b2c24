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
slots are zeroed) and reduces over C, and its backward is again a gather. This replaced
``zeros(T, D).index_add(token_idx, y * w)`` because it measured faster on CPU (one thread, T=8192,
D=1024, K=2, fp32, weights with gradient, combine fwd+bwd, 2 cores shared with other jobs):
``bench/moe_layer.py``'s combine table, interleaved, median of 3: index_add 115.7 ms, slot gather + bmm
89.7 ms; a standalone run, median of 7: index_add 339 ms, slot gather + bmm 143 ms, slot gather +
mul/sum 199 ms, a naive index_copy into a zeroed [T*K, D] buffer 315 ms (its zero-fill and scatter
cost what the gather saves, as a colleague found). The bmm is not always the right kernel, though:
- on CPU, torch's bmm runs a plain loop when a product has fewer than 400 multiply-adds (C * D here:
  ATen's small-matrix path), and then a broadcast multiply and a sum over C is 3-5x faster (forward +
  backward, one thread, S 2,048, torch 2.13, 2026-11-27: C 2 x D 192 bmm 2.69 ms, multiply + sum 0.48 ms;
  C 2 x D 208 0.43 vs 0.52 ms; C 4 x D 96 2.39 vs 0.42; C 4 x D 128 0.42 vs 0.59);
- on a GPU, S batched [1, C] x [C, D] products took 7.4 ms (forward and backward) of a 67 ms
  Mixtral-sized layer step (bench/gpu_check.py's profile, H200, 16,384 tokens, bf16).
There the weighted sum is the multiply and sum (memory-bound passes over [S, C, D]).
The unweighted sums over C (an expand's backward, the expert-parallel combine's sum over ranks) add the
C slices on CPU (``slot_sum``): torch's CPU reduction over a middle dimension measured 4.6x slower than one
add (S 8,192 x C 2 x D 512, fp32, one thread: sum(1) 7.1 ms, add 1.6 ms; C 4 x D 128: 2.1 vs 0.8 ms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ep_train.model.router import count_ids


BMM_MIN_PRODUCT = 400  # C * D from which torch's CPU bmm leaves its plain loop (ATen's small-matrix threshold)


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


def slot_sum(buf: torch.Tensor) -> torch.Tensor:
    """[S, C, D] -> [S, D], the sum over C. On CPU one add per slot (see the module docstring); on CUDA,
    and in bf16/fp16 with C > 2 (where each add would round; ``sum`` accumulates in fp32), ``sum(1)``."""
    c = buf.shape[1]
    if buf.is_cuda or c == 1 or (c > 2 and buf.dtype not in (torch.float32, torch.float64)):
        return buf.sum(1)
    out = buf[:, 0] + buf[:, 1]
    for i in range(2, c):
        out += buf[:, i]
    return out


class _SlotGather(torch.autograd.Function):
    """Rows -> slot buffer. Each row fills exactly one slot, so the backward is a gather too
    (autograd's own backward of ``y[src]`` would zero-fill [N, D] and scatter-add)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, lay: SlotLayout) -> torch.Tensor:  # type: ignore[override]
        ctx.lay = lay
        return _gather_slots(y, lay)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad.reshape(-1, grad.shape[-1])[ctx.lay.slot], None


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
    """Rows [N, D] -> each slot row's sum [S, D], the adjoint of ``_Expand``: its backward is a gather
    (autograd's over a gather and ``slot_sum`` would build the [S, C, D] gradient and gather from it)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, lay: SlotLayout) -> torch.Tensor:  # type: ignore[override]
        ctx.lay = lay
        return slot_sum(_gather_slots(y, lay))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad[ctx.lay.rows], None


def expand(x: torch.Tensor, lay: SlotLayout) -> torch.Tensor:
    return _Expand.apply(x, lay)


def combine_slots(y: torch.Tensor, weights: torch.Tensor | None, lay: SlotLayout) -> torch.Tensor:
    """out[s] = sum over s's slots of weight * row: y [N, D], weights [N] (None: all 1) -> [S, D]."""
    if weights is None:
        return _SlotSum.apply(y, lay)
    buf = _SlotGather.apply(y, lay)  # [S, C, D]
    w = weights.to(y.dtype).new_zeros(lay.num_rows * lay.width).index_copy(0, lay.slot, weights.to(y.dtype))
    batched = not y.is_cuda and lay.width * y.shape[1] >= BMM_MIN_PRODUCT  # see the module docstring
    return weighted_slot_sum(buf, w.view(lay.num_rows, lay.width), batched_matmul=batched)


def weighted_slot_sum(buf: torch.Tensor, w: torch.Tensor, batched_matmul: bool) -> torch.Tensor:
    """sum over c of w[s, c] * buf[s, c]: buf [S, C, D], w [S, C] -> [S, D]. The same function two ways:
    a bmm of [1, C] x [C, D] products (fastest on CPU for C * D >= BMM_MIN_PRODUCT, see the module
    docstring) or a broadcast multiply and a sum (on a GPU, and for smaller products on CPU)."""
    if batched_matmul:
        return torch.bmm(w.unsqueeze(1), buf).squeeze(1)
    # In bf16 each product is rounded before the sum (bmm accumulates in fp32): C <= K terms, a last-bit change.
    return (buf * w.unsqueeze(2)).sum(1)


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
