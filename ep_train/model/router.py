"""Router: token -> top-K experts, the auxiliary losses, and capacity (token dropping).

Shape legend: T tokens on this rank, D model dim, E experts in total, K experts per token.
All routing math is fp32 whatever the model dtype (softmax over E in bf16 flips top-k choices).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class Routing(NamedTuple):  # a NamedTuple, not a dataclass: ZeRO-3 hooks only see tensors inside tuples
    expert_ids: torch.Tensor  # [T, K] int64, global expert ids (after capacity: overflowed slots rerouted)
    weights: torch.Tensor  # [T, K] fp32 combine weights, 0 where the assignment was dropped
    keep: torch.Tensor  # [T, K] bool, False = dropped by capacity
    logits: torch.Tensor  # [T, E] fp32
    probs: torch.Tensor  # [T, E] fp32 softmax over all experts
    aux_loss: torch.Tensor  # scalar, Switch load balance (1.0 when perfectly balanced)
    z_loss: torch.Tensor  # scalar, mean(logsumexp(logits)^2)


def load_balancing_loss(probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch loss ``E * sum_i f_i * P_i``.

    f_i = share of the T*K routing assignments that chose expert i (not differentiable),
    P_i = mean router probability of expert i. Normalising f by T*K (as Megatron does) makes a
    perfectly balanced router score exactly 1.0 for any K.
    """
    t, k = expert_ids.shape
    counts = torch.bincount(expert_ids.reshape(-1), minlength=num_experts).to(probs.dtype)  # [E]
    f = counts / max(t * k, 1)
    p = probs.mean(dim=0) if t > 0 else probs.sum(dim=0)  # [E]
    return num_experts * torch.sum(f * p)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): keeps router logits small so the fp32 softmax stays well conditioned."""
    if logits.shape[0] == 0:
        return logits.sum()
    return torch.logsumexp(logits, dim=-1).square().mean()


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    return math.ceil(num_tokens / num_experts * capacity_factor * top_k)


def _rank_within_expert(expert: torch.Tensor, score: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Position of each entry among entries with the same expert, ordered by score (desc), ties by index."""
    n = expert.numel()
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(expert[order], stable=True)]  # grouped by expert, by score inside
    counts = torch.bincount(expert, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long, device=expert.device)
    rank[order] = torch.arange(n, device=expert.device) - starts[expert[order]]
    return rank


def apply_capacity(expert_ids: torch.Tensor, weights: torch.Tensor, probs: torch.Tensor, capacity: int,
                   policy: str, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Enforce ``capacity`` assignments per expert.

    ``drop``: each expert keeps its ``capacity`` highest-probability assignments; the rest are dropped
    (weight 0; the token still flows through the residual). ``overflow``: rejected assignments move,
    in rounds, to the token's next-best expert (by probability) that the token does not already use;
    in each round an expert with room accepts its highest-probability proposals. A moved assignment
    weighs ``probs[new] / norm`` (norm = the token's top-K renormaliser, 1 when not renormalising).
    Returns (expert_ids [T, K], weights [T, K], keep [T, K]).
    """
    t, k = expert_ids.shape
    e = probs.shape[1]
    flat_ids = expert_ids.reshape(-1)
    flat_p = probs.detach().gather(1, expert_ids).reshape(-1)
    rank = _rank_within_expert(flat_ids, flat_p, e)
    keep = rank < capacity
    if policy == "drop" or bool(keep.all()):
        keep = keep.view(t, k)
        return expert_ids, torch.where(keep, weights, torch.zeros_like(weights)), keep

    assert policy == "overflow", policy
    # Candidate order per token: all experts by descending probability (ties: lower expert id).
    cand = torch.argsort(probs.detach(), dim=-1, descending=True, stable=True)  # [T, E]
    dev = probs.device
    ids, keep = flat_ids.clone(), keep.clone()
    load = torch.bincount(flat_ids[keep], minlength=e)  # [E] accepted so far
    used = torch.zeros(t, e, dtype=torch.bool, device=dev)  # experts a token already uses or was refused by
    used[torch.arange(t, device=dev).repeat_interleave(k), flat_ids] = True
    ptr = torch.zeros(t, dtype=torch.long, device=dev)  # per token: next position in cand
    pending = ~keep  # [T*K]
    while True:  # host sync per round; each round accepts or exhausts something, so <= E + K rounds
        slots = pending.nonzero().squeeze(1)
        if slots.numel() == 0:
            break
        # One proposal per token per round: its lowest pending slot, to its next unused candidate.
        tok_of = slots // k
        first = torch.ones_like(tok_of, dtype=torch.bool)
        first[1:] = tok_of[1:] != tok_of[:-1]
        slot, tok = slots[first], tok_of[first]
        p = ptr[tok]
        for _ in range(k + 1):  # skip candidates the token already uses (at most K of them)
            skip = (p < e) & used[tok, cand[tok, p.clamp(max=e - 1)]]
            p = p + skip.long()
        exhausted = p >= e
        pending[slot[exhausted]] = False  # no expert left for this token: dropped
        slot, tok, p = slot[~exhausted], tok[~exhausted], p[~exhausted]
        if slot.numel() == 0:
            continue
        cur = cand[tok, p]
        room = (capacity - load).clamp(min=0)
        rank = _rank_within_expert(cur, probs.detach()[tok, cur], e)
        accept = rank < room[cur]
        ids[slot[accept]] = cur[accept]
        keep[slot[accept]] = True
        pending[slot[accept]] = False
        load += torch.bincount(cur[accept], minlength=e)
        used[tok, cur] = True  # accepted: now used; refused: that expert is full for good
        ptr[tok] = p + 1
    new_ids = ids.view(t, k)
    keep = keep.view(t, k)
    w = torch.where(new_ids != expert_ids, probs.gather(1, new_ids) / norm, weights)
    return new_ids, torch.where(keep, w, torch.zeros_like(w)), keep


class Router(nn.Module):
    """Top-K softmax router (Mixtral-exact by default), optional learned noise and input jitter."""

    def __init__(self, dim: int, num_experts: int, top_k: int, *, router_type: str = "topk",
                 normalize_top_k: bool = True, jitter_noise: float = 0.0, init_std: float = 0.01,
                 capacity_factor: float | None = None, drop_policy: str = "drop") -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.normalize_top_k, self.jitter_noise = normalize_top_k, jitter_noise
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.init_std = init_std
        # Parameters owned directly (no nn.Linear child): ZeRO-3 gathers a module's own parameters
        # around its forward and backward, and the fp32 matmul below must happen inside this module.
        self.weight = nn.Parameter(torch.empty(num_experts, dim))  # [E, D]
        # Noisy top-k (Shazeer et al. 2017): learned per-expert noise scale, training only.
        self.noise_weight = nn.Parameter(torch.empty(num_experts, dim)) if router_type == "noisy_topk" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    def forward(self, x: torch.Tensor) -> Routing:  # x: [T, D]
        x = x.float()
        if self.training and self.jitter_noise > 0:
            # Switch-style jitter on the router input only; the experts see the clean tokens.
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = F.linear(x, self.weight.float())  # [T, E]
        if self.noise_weight is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(F.linear(x, self.noise_weight.float()))
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        top_p, expert_ids = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        norm = top_p.sum(dim=-1, keepdim=True) if self.normalize_top_k else torch.ones_like(top_p[:, :1])
        weights = top_p / norm
        aux = load_balancing_loss(probs, expert_ids, self.num_experts)
        zl = z_loss(logits)
        keep = torch.ones_like(expert_ids, dtype=torch.bool)
        if self.capacity_factor is not None:
            cap = expert_capacity(x.shape[0], self.num_experts, self.top_k, self.capacity_factor)
            expert_ids, weights, keep = apply_capacity(expert_ids, weights, probs, cap, self.drop_policy, norm)
        return Routing(expert_ids, weights, keep, logits, probs, aux, zl)
