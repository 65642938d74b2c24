"""Router: token -> top-K experts, the auxiliary losses, and capacity (token dropping).

Shape legend: T tokens on this rank, D model dim, E experts in total, K experts per token,
G expert groups, M groups a token may use.
All routing math is fp32 whatever the model dtype (softmax over E in bf16 flips top-k choices).

Options beyond Mixtral's top-K softmax: expert choice (Zhou et al. 2022: each expert takes its C
best tokens, C = ceil(T_all * capacity_factor / E); a token may get 0..E experts, so the routing comes
out as E slots per token with a ``keep`` mask, and the dispatchers need no change), group-limited routing (DeepSeek-V2: a token picks its M best
groups of experts, then its top-K inside them; groups of E/G consecutive experts, which are the EP
ranks' experts when G = ep_size), expert dropout (training only), and balance terms besides the
Switch loss: the squared coefficient of variation of expert importance (Shazeer et al. 2017, as in
GShard's implementations), and a per-token routing-entropy penalty. The Switch loss can use counts
reduced over the data-parallel ranks (``count_reducer``, set from outside by ``parallelize``): the
global-batch balance of Qwen's "global-batch load balancing".
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, NamedTuple

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
    cv_loss: torch.Tensor  # scalar, squared coefficient of variation of expert importance (0 = balanced)
    entropy: torch.Tensor  # scalar, mean per-token routing entropy (nats); differentiable
    # [T, K] bool: kept by capacity, before expert dropout (``keep`` after it): what the load statistics, the
    # dropped fraction and the aux-loss-free bias count, so that dropout neither reads as capacity drops nor
    # moves the bias toward experts mostly picked second
    routed: torch.Tensor


def importance_cv_squared(probs: torch.Tensor) -> torch.Tensor:
    """``Var(I) / Mean(I)^2`` over experts of the importance ``I_i = sum_t p_ti`` (population variance,
    as Shazeer et al.'s code): 0 when every expert gets the same probability mass."""
    if probs.shape[0] == 0:
        return probs.sum()
    importance = probs.sum(dim=0)  # [E]
    return importance.var(unbiased=False) / importance.mean().square().clamp_min(1e-20)


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``-sum_i p_i log p_i``; as a loss term it pushes towards decisive routing."""
    if probs.shape[0] == 0:
        return probs.sum()
    return -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1).mean()


def limit_to_groups(probs: torch.Tensor, num_groups: int, top_groups: int) -> torch.Tensor:
    """``probs`` with every expert outside the token's ``top_groups`` best groups set to -1, so top-K
    picks only inside them. A group's score is its best expert's probability (DeepSeek-V2)."""
    t, e = probs.shape
    group_score = probs.detach().view(t, num_groups, e // num_groups).amax(-1)  # [T, G]
    chosen = torch.topk(group_score, top_groups, dim=-1).indices  # [T, M]
    allowed = torch.zeros(t, num_groups, dtype=torch.bool, device=probs.device).scatter_(1, chosen, True)
    allowed = allowed.repeat_interleave(e // num_groups, dim=1)  # [T, E]
    # -inf, not a finite mark: the scores may carry an expert bias (aux-loss-free balancing) that drifts
    # below any finite value, and then an expert outside the token's groups would outrank an allowed one.
    return probs.masked_fill(~allowed, float("-inf"))


def expert_choice_keep(probs: torch.Tensor, capacity_factor: float,
                       gather: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None) -> torch.Tensor:
    """Expert choice: ``keep`` [T, E], True where expert e chose token t among its C best tokens.

    ``gather`` (set by ``parallelize`` under EP) returns the scores of every token of the EP group
    [T_all, E] and this rank's first row: each expert's choice is then global over the tokens it would
    see in one process, and every rank computes the same choice redundantly (cost: one all-gather of
    T * E scores per layer, no second exchange). Among tied scores torch's top-k picks (not necessarily
    the lower token index); every rank runs it on the same [T_all, E] tensor, so they agree."""
    t, e = probs.shape
    scores, first = gather(probs.detach()) if gather is not None else (probs.detach(), 0)
    t_all = scores.shape[0]
    cap = min(t_all, expert_capacity(t_all, e, 1, capacity_factor))
    chosen = torch.topk(scores, cap, dim=0, sorted=False).indices  # [C, E] token rows per expert
    keep_all = torch.zeros(t_all, e, dtype=torch.bool, device=probs.device).scatter_(0, chosen, True)
    return keep_all[first: first + t]


def drop_experts(weights: torch.Tensor, keep: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert dropout: each kept assignment is dropped with probability ``rate`` (never a token's first
    kept one, so no token loses every expert to it), the remaining weights rescaled to the sum they had.
    Training only. Random: under activation checkpointing the recompute replays the same draws
    (``torch.utils.checkpoint`` restores the RNG state)."""
    drop = torch.rand(keep.shape, device=keep.device) < rate
    # The first *kept* slot, not slot 0: capacity may have dropped the token's first choice already, and
    # then slot 0 protects nothing. argmax returns the first maximum; a token with no kept slot gets 0,
    # which is not kept and so changes nothing.
    first_kept = keep.long().argmax(dim=-1, keepdim=True)  # [T, 1]
    drop.scatter_(1, first_kept, False)
    new_keep = keep & ~drop
    kept_w = torch.where(new_keep, weights, torch.zeros_like(weights))
    scale = weights.sum(-1, keepdim=True) / kept_w.sum(-1, keepdim=True).clamp_min(1e-20)
    return kept_w * scale, new_keep


def count_ids(ids: torch.Tensor, num_bins: int) -> torch.Tensor:
    """``torch.bincount(ids, minlength=num_bins)`` -> [num_bins] int64, without bincount's host sync on CUDA
    (it reads the largest id back to size its output): a scatter-add. Every id must lie in [0, num_bins)
    (bincount would grow its output; this raises on CPU and asserts on the device)."""
    flat = ids.reshape(-1).long()
    return torch.zeros(num_bins, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int,
                        count_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Switch loss ``E * sum_i f_i * P_i``.

    f_i = share of the T*K routing assignments that chose expert i (not differentiable),
    P_i = mean router probability of expert i. Normalising f by T*K (as Megatron does) makes a
    perfectly balanced router score exactly 1.0 for any K. With ``count_reducer`` (a sum over the
    data-parallel ranks) f is the global batch's share; P stays this rank's, so the ranks' averaged
    gradients equal a single process's over the whole batch.
    """
    t, k = expert_ids.shape
    counts = count_ids(expert_ids, num_experts).to(probs.dtype)  # [E]
    if count_reducer is not None:
        counts = count_reducer(counts)  # communication: all-reduce of E counts
    f = counts / counts.sum().clamp_min(1)
    p = probs.mean(dim=0) if t > 0 else probs.sum(dim=0)  # [E]
    return num_experts * torch.sum(f * p)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): keeps router logits small so the fp32 softmax stays well conditioned."""
    if logits.shape[0] == 0:
        return logits.sum()
    return torch.logsumexp(logits, dim=-1).square().mean()


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments an expert takes: ``ceil(num_tokens * top_k * capacity_factor / num_experts)``, exactly,
    with the capacity factor as the decimal written (1.1 = 11/10). In floats, 100 / 2 * 1.1 is
    55.000000000000007, and its ceiling 56: the noise of the binary 1.1 rounded up into one more slot."""
    factor = Fraction(repr(float(capacity_factor)))  # repr: the shortest decimal that reads back as this float
    return math.ceil(num_tokens * top_k * factor / num_experts)


def _rank_within_expert(expert: torch.Tensor, score: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Position of each entry among entries with the same expert, ordered by score (desc), ties by index."""
    n = expert.numel()
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(expert[order], stable=True)]  # grouped by expert, by score inside
    counts = count_ids(expert, num_experts)
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
    # host sync (overflow only: "drop" short-circuits before it): whether anything overflowed; the rounds below
    # sync too (boolean indexing sizes its output on the host)
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
    """Top-K softmax router (Mixtral-exact by default for K >= 2), optional learned noise and input jitter."""

    def __init__(self, dim: int, num_experts: int, top_k: int, *, router_type: str = "topk",
                 normalize_top_k: bool | None = None, jitter_noise: float = 0.0, init_std: float = 0.01,
                 capacity_factor: float | None = None, drop_policy: str = "drop", expert_dropout: float = 0.0,
                 num_groups: int = 1, top_groups: int | None = None, bias_update_rate: float = 0.0) -> None:
        super().__init__()
        assert num_experts % num_groups == 0 and (top_groups or num_groups) <= num_groups
        self.num_experts, self.top_k = num_experts, top_k
        self.expert_dropout, self.num_groups, self.top_groups = expert_dropout, num_groups, top_groups or num_groups
        self.router_type = router_type
        # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for *selection*
        # only, moved by ``update_bias`` after each optimizer step. A buffer, not a parameter: no gradient.
        self.bias_update_rate = bias_update_rate
        self.expert_bias: torch.Tensor | None
        self.register_buffer("expert_bias", torch.zeros(num_experts) if bias_update_rate > 0 else None)
        # Set from outside (parallelize): global-batch balance statistics (sums E counts over the ranks),
        # and expert choice over the EP group's tokens (gathers their scores).
        self.count_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.score_gather: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None
        # None = auto (moe.normalize_top_k): renormalise the top-K weights for K >= 2 (Mixtral); for K = 1 that
        # weight is p / p = 1, which leaves the router no gradient from the LM loss, so top-1 weighs the expert
        # by the probability itself (Switch Transformer). Fixed from the training K here: inference_routing's
        # other K keeps the combine rule the model was trained with.
        self.normalize_top_k = normalize_top_k if normalize_top_k is not None else top_k >= 2
        self.jitter_noise = jitter_noise
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
            # Switch-style jitter on the router input only; the experts see the clean tokens (transformers'
            # Mixtral jitters the block's input, so its experts see the jittered tokens too).
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = F.linear(x, self.weight.float())  # [T, E]
        if self.noise_weight is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(F.linear(x, self.noise_weight.float()))
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        if self.router_type == "expert_choice":
            return self._expert_choice(logits, probs)
        if self.top_groups < self.num_groups or self.expert_bias is not None:
            select = probs.detach() + self.expert_bias if self.expert_bias is not None else probs.detach()
            if self.top_groups < self.num_groups:
                select = limit_to_groups(select, self.num_groups, self.top_groups)
            _, expert_ids = torch.topk(select, self.top_k, dim=-1)
            top_p = probs.gather(1, expert_ids)  # [T, K] weights from the unbiased, unrestricted softmax
        else:
            top_p, expert_ids = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        norm = top_p.sum(dim=-1, keepdim=True) if self.normalize_top_k else torch.ones_like(top_p[:, :1])
        weights = top_p / norm
        aux = load_balancing_loss(probs, expert_ids, self.num_experts, self.count_reducer)
        zl = z_loss(logits)
        keep = torch.ones_like(expert_ids, dtype=torch.bool)
        if self.capacity_factor is not None:
            cap = expert_capacity(x.shape[0], self.num_experts, self.top_k, self.capacity_factor)
            expert_ids, weights, keep = apply_capacity(expert_ids, weights, probs, cap, self.drop_policy, norm)
        routed = keep
        if self.training and self.expert_dropout > 0:  # after capacity: a dropped-out slot frees no room
            weights, keep = drop_experts(weights, keep, self.expert_dropout)
        return Routing(expert_ids, weights, keep, logits, probs, aux, zl, importance_cv_squared(probs),
                       routing_entropy(probs), routed)

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """One aux-loss-free balancing update from this step's token counts per expert [E] (summed
        over the data-parallel ranks by the caller, so every rank moves its bias identically):
        overloaded experts' bias goes down by the rate, underloaded ones' up."""
        assert self.expert_bias is not None
        load = counts.to(self.expert_bias)
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def _expert_choice(self, logits: torch.Tensor, probs: torch.Tensor) -> Routing:
        """E slots per token (slot e = expert e), kept where expert e chose the token; its weight is the
        token's softmax probability of e. Balanced by construction: the Switch loss is 0 here. The top-K
        settings (top_k, normalize_top_k, drop_policy) play no part; config validation refuses them set."""
        assert self.capacity_factor is not None  # refused by config validation
        t, e = probs.shape
        keep = expert_choice_keep(probs, self.capacity_factor, self.score_gather)
        expert_ids = torch.arange(e, device=probs.device).expand(t, e)
        weights = torch.where(keep, probs, torch.zeros_like(probs))
        return Routing(expert_ids, weights, keep, logits, probs, probs.sum() * 0, z_loss(logits),
                       importance_cv_squared(probs), routing_entropy(probs), keep)  # no expert dropout here
