"""The MoE feed-forward layer: router -> dispatcher -> grouped experts -> combine (+ shared experts).

Shape legend: T tokens on this rank, D model dim, F expert FFN dim, E experts in total,
E_l experts on this rank, K experts per token, N rows handed to the local experts.

The layer holds a dispatcher object, not a process group: it starts with a ``LocalDispatcher``;
``ep_train.parallel.parallelize`` swaps in the all-to-all one and keeps only local experts.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch
import torch.nn as nn

from ep_train.model.dispatch import Dispatcher, LocalDispatcher
from ep_train.model.experts import GroupedExperts, SwiGLU
from ep_train.model.router import Router, count_ids


class RouterStats(NamedTuple):
    """What one MoE layer reports per forward (tensors; no host sync needed to produce them).

    A NamedTuple so that ZeRO-3's hooks, which look into tuples but not dataclasses, see the tensors."""

    aux_loss: torch.Tensor  # scalar
    z_loss: torch.Tensor  # scalar
    tokens_per_expert: torch.Tensor  # [E] kept assignments per global expert on this rank's tokens
    dropped: torch.Tensor  # scalar, assignments dropped by capacity (expert choice: tokens no expert chose)
    assignments: torch.Tensor  # scalar, T * K (expert choice: T)
    entropy: torch.Tensor  # scalar, mean router entropy (nats); carries its gradient (entropy loss term)
    cv_loss: torch.Tensor  # scalar, squared coefficient of variation of expert importance

    def as_tensor(self) -> torch.Tensor:
        """Pack into one flat fp32 tensor (activation checkpointing returns tensors only)."""
        scalars = torch.stack([self.aux_loss, self.z_loss, self.dropped, self.assignments, self.entropy,
                               self.cv_loss])
        return torch.cat([scalars.float(), self.tokens_per_expert.float()])

    @staticmethod
    def from_tensor(t: torch.Tensor) -> "RouterStats":
        return RouterStats(t[0], t[1], t[6:], t[2], t[3], t[4], t[5])


class MoELayer(nn.Module):
    def __init__(self, dim: int, expert_hidden: int, num_experts: int, top_k: int, *, router_type: str = "topk",
                 normalize_top_k: bool | None = None, jitter_noise: float = 0.0, router_init_std: float = 0.01,
                 capacity_factor: float | None = None, drop_policy: str = "drop", num_shared_experts: int = 0,
                 shared_hidden: int | None = None, expert_dropout: float = 0.0, num_groups: int = 1,
                 top_groups: int | None = None, bias_update_rate: float = 0.0) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = Router(dim, num_experts, top_k, router_type=router_type, normalize_top_k=normalize_top_k,
                             jitter_noise=jitter_noise, init_std=router_init_std,
                             capacity_factor=capacity_factor, drop_policy=drop_policy,
                             expert_dropout=expert_dropout, num_groups=num_groups, top_groups=top_groups,
                             bias_update_rate=bias_update_rate)
        self.experts = GroupedExperts(dim, expert_hidden, num_experts)
        # Shared experts are always active: one SwiGLU of width n * F_shared is the same function.
        self.shared_experts = (SwiGLU(dim, num_shared_experts * (shared_hidden or expert_hidden))
                               if num_shared_experts > 0 else None)
        self.dispatcher: Dispatcher = LocalDispatcher(num_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:  # x: [B, S, D]
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        r = self.router(x)
        xg, counts, meta = self.dispatcher.dispatch(x, r.expert_ids, r.keep, r.weights)  # [N, D]; may communicate
        yg = self.experts(xg, counts)  # always called, even with N == 0 (ZeRO-3 hooks, collective order)
        y = self.dispatcher.combine(yg, meta)  # [T, D]; may communicate
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        # the statistics count the routing (r.routed), not what expert dropout left of it (r.keep)
        if self.router.router_type == "expert_choice":  # unrouted tokens pass through the residual only
            dropped, assignments = (~r.routed.any(-1)).sum(), float(x.shape[0])
        else:
            dropped, assignments = (~r.routed).sum(), float(r.routed.numel())
        stats = RouterStats(
            aux_loss=r.aux_loss, z_loss=r.z_loss,
            # no boolean indexing or bincount here: both are host syncs on CUDA
            tokens_per_expert=count_ids(r.expert_ids.masked_fill(~r.routed, self.num_experts),
                                        self.num_experts + 1)[: self.num_experts],
            # torch.full, not torch.tensor(..., device=...): a host-to-GPU copy would wait for the layer's queued work
            dropped=dropped.detach(), assignments=torch.full((), assignments, device=x.device),
            entropy=r.entropy, cv_loss=r.cv_loss)
        return y.reshape(shape), stats


def update_expert_biases(model: nn.Module, counts: dict[int, torch.Tensor]) -> None:
    """Aux-loss-free balancing step for every MoE layer with an expert bias: ``counts`` maps the
    layer's index in ``model.layers`` to its token counts per expert [E] for the step just taken
    (the trainer sums them over the data-parallel ranks first)."""
    layers = getattr(model, "layers")
    for i, c in counts.items():
        router = layers[i].ffn.router
        if router.expert_bias is not None:
            router.update_bias(c)


def expert_biases(model: nn.Module) -> dict[str, list[float]]:
    """The routers' aux-loss-free biases by MoE layer index (str keys: they go into JSON)."""
    return {str(i): b.ffn.router.expert_bias.tolist() for i, b in enumerate(getattr(model, "layers"))
            if isinstance(b.ffn, MoELayer) and b.ffn.router.expert_bias is not None}


def set_expert_biases(model: nn.Module, biases: dict[str, list[float]]) -> None:
    """Put saved biases (``expert_biases``' output, from ``ep_train_state.json``) back, exactly."""
    layers = getattr(model, "layers")
    for i, values in biases.items():
        bias = layers[int(i)].ffn.router.expert_bias
        assert bias is not None, f"layer {i} has no expert bias to restore"
        bias.copy_(torch.tensor(values, dtype=bias.dtype))


@contextlib.contextmanager
def inference_routing(model: nn.Module, experts_per_token: int | None = None) -> Iterator[None]:
    """Route for inference inside the block; every MoE layer gets its own settings back on exit.

    Dropless (``capacity_factor`` off): which experts a token uses then depends on that token only, not
    on the other prompts in the batch or on how many tokens one step feeds (a KV-cached step routes one
    token per sequence, a full recompute all of them). ``experts_per_token``: route each token to this
    many experts instead of the trained K, combined as in training (a model that renormalises renormalises
    over the new K; a top-1 model trained with raw probability weights keeps them).
    The config and the layers' K after the block are the training ones.
    """
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if any(m.router.router_type == "expert_choice" for m in layers):
        raise ValueError("moe.router_type = 'expert_choice': an expert picks among the tokens of the whole batch, "
                         "so one decoded token's experts depend on the others; such a model cannot generate "
                         "token by token (use it for scoring whole sequences, or train with 'topk')")
    if experts_per_token is not None:
        if not layers:
            raise ValueError(f"experts_per_token = {experts_per_token} given, but the model has no MoE layers; "
                             "leave it unset for a dense model")
        # with group-limited routing a token may use only its top_groups' experts
        e = min(m.num_experts // m.router.num_groups * m.router.top_groups for m in layers)
        if not 1 <= experts_per_token <= e:
            raise ValueError(f"experts_per_token = {experts_per_token} is invalid: must be between 1 and the "
                             f"number of experts ({e}; with moe.top_groups, those of a token's groups); e.g. 1 for "
                             "the cheapest routing")
    saved = [(m.top_k, m.router.top_k, m.router.capacity_factor) for m in layers]
    try:
        for m in layers:
            if experts_per_token is not None:
                m.top_k = m.router.top_k = experts_per_token
            m.router.capacity_factor = None
        yield
    finally:
        for m, (k, router_k, cf) in zip(layers, saved):
            m.top_k, m.router.top_k, m.router.capacity_factor = k, router_k, cf
