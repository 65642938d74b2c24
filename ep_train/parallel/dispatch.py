"""Expert-parallel token dispatch: an uneven, differentiable all-to-all over the EP group that sends a
token once per EP rank holding any of its experts.

Shape legend: T tokens on this rank, D model dim, E experts in total, E_l experts on this rank,
K experts per token, ep EP size, M_s rows this rank sends (distinct (token, destination rank) pairs),
M rows it receives, N rows handed to the local experts (grouped by local expert).
Same interface as ``ep_train.model.dispatch.LocalDispatcher``; swapped in by ``parallelize``.

Dedup: a token whose experts share a rank crosses once, with a membership mask [M_s, E_l] saying
which of the receiver's experts it goes to, and its routing weights for those experts [M_s, E_l] (fp32):
the receiver expands it (the expand's backward sums the copies' gradients), computes the partial
weighted sum over its experts and sends back one row per (token, rank); the source adds the rows of
its ranks. The other choice, keeping the weights on the source, would need one returned row per
(token, expert): only the dispatch direction would shrink. Measured by ``bench/moe_layer.py`` (top-2 of
8, EP 2, 4096 tokens per rank, router std 0.5): rows of D sent to the other rank, each direction, both
ranks: 8,307 before (one per assignment), 6,502 now (0.78, the token-level minimum); with groups = EP
ranks and top_groups 1 (same router weights): 8,408 per assignment, 4,204 now (0.51 of the unlimited
per-assignment rows).

Rows, weights and membership travel in ONE exchange (``_PackedAllToAll``: each sent row's bytes are the
token row, its fp32 weights and its membership bytes side by side; the backward sends the rows' and
weights' gradients back the same way). Cost per layer: forward 3 collectives (counts; rows + weights +
membership; rows back), backward 2, as many as one row per assignment needed; the packed extras are
5 * E_l bytes per sent row against D * element-size bytes for the row (1% at D=512, E_l=4, fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ep_train.model.dispatch import SlotLayout, combine_slots, expand, slot_layout
from ep_train.parallel.comm_replay import exchange


A2A_SCOPE = "ep_train.all_to_all"  # profiler scope of every EP exchange (tokens, counts, expert membership)


class _AllToAll(torch.autograd.Function):
    """Uneven all_to_all_single whose backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group

        def run() -> torch.Tensor:
            out = x.new_empty(sum(recv), *x.shape[1:])
            with torch.profiler.record_function(A2A_SCOPE):  # bench/step_breakdown.py reads this scope
                dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)  # communication
            return out

        return exchange(run)  # in a checkpointed block's recompute: the forward's result (comm_replay)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        out = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        with torch.profiler.record_function(A2A_SCOPE):
            dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)  # communication
        return out, None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    return _AllToAll.apply(x, send, recv, group)


def _pack(parts: list[torch.Tensor]) -> torch.Tensor:
    """[R, *] tensors of any dtypes -> [R, bytes] uint8, side by side (a bit copy, no conversion)."""
    return torch.cat([q.contiguous().reshape(q.shape[0], math.prod(q.shape[1:])).view(torch.uint8) for q in parts],
                     dim=1)


def _unpack(buf: torch.Tensor, like: list[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """Inverse of ``_pack`` for parts of (dtype, columns): [R, bytes] -> [R, columns] each."""
    out, at = [], 0
    for dtype, cols in like:
        width = cols * torch.empty((), dtype=dtype).element_size()
        # a fresh copy: .contiguous() keeps a one-row slice's stride, which view(dtype) refuses
        out.append(buf[:, at:at + width].clone(memory_format=torch.contiguous_format).view(dtype))
        at += width
    return out


def _exchange(buf: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    out = buf.new_empty(sum(recv), buf.shape[1])
    with torch.profiler.record_function(A2A_SCOPE):
        dist.all_to_all_single(out, buf, recv, send, group=group)  # communication
    return out


class _PackedAllToAll(torch.autograd.Function):
    """Token rows [M_s, D], their routing weights [M_s, E_l] (fp32) and membership [M_s, E_l] (uint8) in
    one uneven all_to_all; the backward returns the rows' and weights' gradients in one reverse exchange."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, w: torch.Tensor, member: torch.Tensor, send: list[int],  # type: ignore[override]
                recv: list[int], group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        ctx.like = [(rows.dtype, rows.shape[1]), (w.dtype, w.shape[1])]
        got = exchange(lambda: _exchange(_pack([rows, w, member]), send, recv, group))  # or replayed
        r, wr, m = _unpack(got, [*ctx.like, (member.dtype, member.shape[1])])
        ctx.mark_non_differentiable(m)
        return r, wr, m

    @staticmethod
    def backward(ctx, g_rows: torch.Tensor, g_w: torch.Tensor, _: torch.Tensor):  # type: ignore[override]
        back = _exchange(_pack([g_rows, g_w]), ctx.recv, ctx.send, ctx.group)
        gr, gw = _unpack(back, ctx.like)
        return gr, gw, None, None, None, None


def _positions(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Flat indices of the ``n`` True entries of a 1-D mask, in order; ``n`` is known on the host, so a
    stable sort stands in for nonzero() (a host sync on GPU)."""
    return torch.argsort((~mask).to(torch.uint8), stable=True)[:n]


@dataclass
class AllToAllMeta:
    send_layout: SlotLayout  # sent rows -> (token, destination) slots: S = T, C = min(K, ep)
    recv_layout: SlotLayout  # grouped rows -> (received row, local expert) slots: S = M, C = min(K, E_l)
    send_token: torch.Tensor  # [M_s] token of each sent row (rank-major)
    send_rank: torch.Tensor  # [M_s] its destination
    grouped_weights: torch.Tensor  # [N] routing weight of each grouped row (fp32, differentiable)
    send_splits: list[int]
    recv_splits: list[int]


class AllToAllDispatcher:
    """Experts split over an EP group: rank r holds global experts [r*E_l, (r+1)*E_l).

    Every rank enters the same collectives per layer in the same order, whatever the routing (a rank
    with nothing to send or receive passes empty splits), so nothing can hang.
    """

    def __init__(self, num_experts: int, group: dist.ProcessGroup) -> None:
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        assert num_experts % self.ep_size == 0, (num_experts, self.ep_size)
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor
                 ) -> tuple[torch.Tensor, list[int], AllToAllMeta]:
        ep, el, e = self.ep_size, self.num_local, self.num_experts
        t, k = expert_ids.shape
        ids = expert_ids.masked_fill(~keep, e)  # [T, K], dropped -> sentinel column E
        routed = torch.zeros(t, e + 1, dtype=torch.bool, device=x.device).scatter_(1, ids, True)[:, :e]
        routed = routed.view(t, ep, el)  # [T, ep, E_l] token t uses expert j of rank r
        need = routed.any(-1)  # [T, ep] token t crosses to rank r (once)
        counts = torch.cat([routed.sum(0), need.sum(0)[:, None]], 1)  # [ep, E_l + 1]: per expert, rows

        def count_exchange() -> tuple[list[list[int]], torch.Tensor]:
            recv_counts = torch.empty_like(counts)
            with torch.profiler.record_function(A2A_SCOPE):
                dist.all_to_all_single(recv_counts, counts, group=self.group)  # communication: counts exchange
            return torch.cat([counts, recv_counts]).tolist(), counts  # the one host sync of the layer

        # A recompute replays it: no collective, no host sync here. Its sizes then come from the forward, so a
        # recompute that routed otherwise would not change a shape; its own counts are checked against the
        # forward's on the device instead (no host sync on a GPU; a failure there is reported asynchronously).
        both, forward_counts = exchange(count_exchange, small=True)
        if forward_counts is not counts:
            torch._assert_async((forward_counts == counts).all(), "the recompute routed otherwise than the forward")
        send_splits = [row[el] for row in both[:ep]]
        recv_splits = [row[el] for row in both[ep:]]
        local_counts = [sum(row[j] for row in both[ep:]) for j in range(el)]  # [E_l] rows per local expert

        # Sender: one row per (token, rank) pair, rank-major, tokens in order within a rank.
        pair = _positions(need.t().reshape(-1), sum(send_splits))  # [M_s] index r * T + t
        send_rank, send_token = torch.div(pair, t, rounding_mode="floor"), pair % t
        c_s = min(k, ep)
        c = (need.cumsum(1) - 1)[send_token, send_rank]  # the pair's slot among the token's destinations
        send_layout = slot_layout(send_token * c_s + c, t, c_s)
        member = routed[send_token, send_rank].to(torch.uint8)  # [M_s, E_l]
        # The token's weights for the destination's experts: [M_s, E_l] (0 where it does not go).
        w_full = weights.float().new_zeros(t, e + 1).scatter(1, ids, weights.float())[:, :e].view(t, ep, el)
        w_send = w_full[send_token, send_rank]  # [M_s, E_l]
        received, w_recv, recv_member = _PackedAllToAll.apply(  # [M, D], [M, E_l], [M, E_l]; communication
            expand(x, send_layout), w_send, member, send_splits, recv_splits, self.group)

        # Receiver: expand each received row to its local experts, expert-major.
        m_rows = recv_member.shape[0]
        p = _positions(recv_member.bool().t().reshape(-1), sum(local_counts))  # [N] index j * M + m
        j, m = torch.div(p, max(m_rows, 1), rounding_mode="floor"), p % max(m_rows, 1)
        c_r = min(k, el)
        c = (recv_member.long().cumsum(1) - 1)[m, j]
        recv_layout = slot_layout(m * c_r + c, m_rows, c_r)
        meta = AllToAllMeta(send_layout, recv_layout, send_token, send_rank, w_recv.reshape(-1)[m * el + j],
                            send_splits, recv_splits)
        return expand(received, recv_layout), local_counts, meta

    def combine(self, y: torch.Tensor, meta: AllToAllMeta) -> torch.Tensor:
        partial = combine_slots(y, meta.grouped_weights, meta.recv_layout)  # [M, D]
        returned = all_to_all(partial, meta.recv_splits, meta.send_splits, self.group)  # [M_s, D]
        return combine_slots(returned, None, meta.send_layout)  # [T, D]: the sum over the token's ranks
