"""Expert-parallel token dispatch: an uneven, differentiable all-to-all over the EP group.

Shape legend: T tokens on this rank, D model dim, E experts in total, E_l experts on this rank,
K experts per token, N rows handed to the local experts (grouped by local expert), ep EP size.
Same interface as ``ep_train.model.dispatch.LocalDispatcher``; swapped in by ``parallelize``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ep_train.model.dispatch import DispatchMeta, sort_by_expert, weighted_scatter


class _AllToAll(torch.autograd.Function):
    """Uneven all_to_all_single whose backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)  # communication
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        out = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)  # communication
        return out, None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    return _AllToAll.apply(x, send, recv, group)


class AllToAllDispatcher:
    """Experts split over an EP group: rank r holds global experts [r*E_l, (r+1)*E_l).

    Every rank enters the same two-or-three collectives per layer in the same order, whatever the
    routing (a rank with nothing to send or receive passes empty splits), so nothing can hang.
    """

    def __init__(self, num_experts: int, group: dist.ProcessGroup) -> None:
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        assert num_experts % self.ep_size == 0, (num_experts, self.ep_size)
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, keep: torch.Tensor
                 ) -> tuple[torch.Tensor, list[int], DispatchMeta]:
        ep, el = self.ep_size, self.num_local
        order, counts = sort_by_expert(expert_ids, keep, self.num_experts)  # counts [E]
        recv_counts = torch.empty_like(counts)  # [ep * E_l]: block r = rows rank r sends to my experts
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # communication: counts exchange
        both = torch.cat([counts, recv_counts]).tolist()  # the one host sync of the layer
        send_m = torch.tensor(both[: self.num_experts]).view(ep, el)  # [ep, E_l] (CPU)
        recv_m = torch.tensor(both[self.num_experts:]).view(ep, el)  # [ep, E_l]
        send_splits, recv_splits = send_m.sum(1).tolist(), recv_m.sum(1).tolist()
        order = order[: sum(send_splits)]
        token_idx = order // expert_ids.shape[1]
        received = all_to_all(x[token_idx], send_splits, recv_splits, self.group)  # [N, D] source-major
        # Regroup the received rows expert-major: rows arrive as (source rank, local expert) blocks.
        block_expert = torch.arange(el).repeat(ep)  # [ep * E_l]
        row_expert = torch.repeat_interleave(block_expert, recv_m.reshape(-1)).to(x.device)
        perm = torch.argsort(row_expert, stable=True)  # [N]
        meta = DispatchMeta(token_idx, order, send_splits, recv_splits, perm)
        return received[perm], recv_m.sum(0).tolist(), meta

    def combine(self, y: torch.Tensor, weights: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        assert meta.perm is not None and meta.send_splits is not None and meta.recv_splits is not None
        back = torch.empty_like(y).index_copy(0, meta.perm, y)  # expert-major -> source-major
        returned = all_to_all(back, meta.recv_splits, meta.send_splits, self.group)  # [N_send, D]
        return weighted_scatter(returned, weights, meta, weights.shape[0])
