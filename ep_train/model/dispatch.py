"""Token dispatch inside one process: the dispatcher interface and the local (no communication) one.

Shape legend: T tokens on this rank, D model dim, E experts in total, E_l experts on this rank,
K experts per token, N rows handed to the local experts (grouped by local expert).

Interface (no parameters, swappable; ``ep_train.parallel.dispatch.AllToAllDispatcher`` is the
expert-parallel one):
    dispatch(x [T, D], expert_ids [T, K], keep [T, K]) -> (x_grouped [N, D], counts: list[int] (E_l), meta)
    combine(y_grouped [N, D], weights [T, K], meta) -> [T, D]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class DispatchMeta:
    token_idx: torch.Tensor  # [N_send] source token of each sent row
    order: torch.Tensor  # [N_send] flat (t*K + k) assignment index of each sent row
    send_splits: list[int] | None = None  # rows sent to each EP rank
    recv_splits: list[int] | None = None  # rows received from each EP rank
    perm: torch.Tensor | None = None  # received (source-major) row -> expert-major position


def sort_by_expert(expert_ids: torch.Tensor, keep: torch.Tensor, num_experts: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept assignments sorted by global expert id. Returns (order [N_kept], counts [E] on device)."""
    flat = expert_ids.reshape(-1).masked_fill(~keep.reshape(-1), num_experts)  # dropped -> sentinel E
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]  # [E]
    order = torch.argsort(flat, stable=True)  # dropped rows sort last; sliced off by the caller
    return order, counts


def weighted_scatter(y: torch.Tensor, weights: torch.Tensor, meta: DispatchMeta, num_tokens: int) -> torch.Tensor:
    w = weights.reshape(-1)[meta.order].to(y.dtype)  # [N_send]
    out = torch.zeros(num_tokens, y.shape[1], dtype=y.dtype, device=y.device)
    return out.index_add(0, meta.token_idx, y * w[:, None])


class LocalDispatcher:
    """All experts on this rank: a sort and a gather, no communication."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, keep: torch.Tensor
                 ) -> tuple[torch.Tensor, list[int], DispatchMeta]:
        order, counts = sort_by_expert(expert_ids, keep, self.num_experts)
        counts_list = counts.tolist()  # host sync: group sizes for the expert matmuls
        order = order[: sum(counts_list)]
        token_idx = order // expert_ids.shape[1]
        return x[token_idx], counts_list, DispatchMeta(token_idx, order)

    def combine(self, y: torch.Tensor, weights: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        return weighted_scatter(y, weights, meta, weights.shape[0])


class Dispatcher(Protocol):
    num_experts: int

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, keep: torch.Tensor
                 ) -> tuple[torch.Tensor, list[int], DispatchMeta]: ...

    def combine(self, y: torch.Tensor, weights: torch.Tensor, meta: DispatchMeta) -> torch.Tensor: ...
