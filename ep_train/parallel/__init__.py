"""Parallelism applied to a plain model from outside: the one place that does it.

    model = build_model(cfg.model, cfg.moe, device="meta")   # shapes only, no memory
    parallelize(model, cfg, layout)                          # this rank's experts, all-to-all, recompute, DeepSpeed tags
    materialize_partitioned(model, source, ds_config, layout) # ep_train.parallel.zero: values, ZeRO-3 shares

``parallelize`` works on the ``meta`` device too, with a simulated layout (no process groups):
the planner and the tests use that to check every rank's shapes of a Mixtral-8x7B-sized model for free.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ep_train.config import Config, check_ep_layout
from ep_train.model.dispatch import LocalDispatcher
from ep_train.model.experts import SwiGLU
from ep_train.model.moe import MoELayer, RouterStats
from ep_train.model.transformer import Attention, Block
from ep_train.parallel.comm_replay import exchange, tape_contexts
from ep_train.parallel.dispatch import AllToAllDispatcher


@dataclass
class ParallelLayout:
    """Where this rank sits. EP groups are blocks of ``ep_size`` consecutive ranks; ranks at the same
    position in every block hold the same experts (expert-data-parallel group). Groups are None in a
    simulated layout (meta-device planning and shape checks)."""

    world_size: int
    rank: int
    ep_size: int
    ep_group: dist.ProcessGroup | None = None
    edp_group: dist.ProcessGroup | None = None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def group_name(self) -> str:  # DeepSpeed's name for the EP/EDP group pair of this size
        return f"ep_size_{self.ep_size}"


def _keep_local_experts(model: nn.Module, ep_size: int, ep_rank: int, ep_group: dist.ProcessGroup | None) -> None:
    """EP rank r keeps global experts [r * E_l, (r + 1) * E_l), E_l = E / ep."""
    for module in model.modules():
        if not isinstance(module, MoELayer):
            continue
        assert module.experts.num_local_experts == module.num_experts, "parallelize called twice"
        local = module.num_experts // ep_size
        module.experts.keep_experts(ep_rank * local, local)
        if ep_size > 1 and ep_group is not None:
            module.dispatcher = AllToAllDispatcher(module.num_experts, ep_group)
            if module.router.router_type == "expert_choice":  # the choice spans the EP group's tokens
                module.router.score_gather = _ScoreGather(ep_group)
        else:
            module.dispatcher = LocalDispatcher(module.num_experts)


def _sum_over_ranks(counts: torch.Tensor) -> torch.Tensor:
    def run() -> torch.Tensor:
        out = counts.detach().clone()
        dist.all_reduce(out)  # communication: E counts summed over every data-parallel rank (the world)
        return out

    return exchange(run, small=True)  # in a checkpointed block's recompute: the forward's sum (comm_replay)


def _global_balance_counts(model: nn.Module) -> None:
    """``moe.balance_stats: global_batch``: every router's Switch-loss counts are summed over all ranks
    (each rank sees different tokens, so the world is the data-parallel group) before the loss. Every
    rank runs every router, so the all-reduces pair up, also in the recompute."""
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.router.count_reducer = _sum_over_ranks


class _ScoreGather:
    """Expert choice under EP: every token's router scores of the EP group, and this rank's first row."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group, self.ep, self.rank = group, dist.get_world_size(group), dist.get_rank(group)

    def __call__(self, scores: torch.Tensor) -> tuple[torch.Tensor, int]:
        def run() -> torch.Tensor:
            parts = [torch.empty_like(scores) for _ in range(self.ep)]  # equal micro-batches on every rank
            dist.all_gather(parts, scores.contiguous(), group=self.group)  # communication: T * E scores per rank
            return torch.cat(parts)

        return exchange(run), self.rank * scores.shape[0]  # replayed in a recompute (comm_replay)


_CHECKPOINTED: dict[type, type] = {}
_small_tape_contexts = functools.partial(tape_contexts, "small")


def _checkpointed_class(cls: type) -> type:
    """A subclass of ``cls`` whose call runs under activation checkpointing.

    The module's own ``__call__`` (and so every ZeRO-3 hook of its children) runs inside
    ``torch.utils.checkpoint``. Routing statistics come out of the first forward only (returned,
    never accumulated in buffers), so the recompute cannot count them twice; every rank recomputes
    the same modules in the same order, so the all-to-alls still pair up. The RNG state is replayed
    (router noise, expert dropout draw the same values). A class swap, not a wrapper module, so
    parameter names (checkpoints, Hugging Face export) do not change. Without gradients (eval,
    generation with a KV cache) there is nothing to recompute and the plain call runs.
    """
    if cls not in _CHECKPOINTED:
        def __call__(self, *args: object, **kwargs: object) -> object:
            call = super(sub, self).__call__
            if not torch.is_grad_enabled() or kwargs:
                return call(*args, **kwargs)

            def run(*a: object) -> object:
                out = call(*a)
                if isinstance(out, tuple):  # (y, RouterStats | None): tensors only through checkpoint
                    y, st = out
                    return y, (st.as_tensor() if st is not None else None)
                return out

            # the recompute reuses the forward's exchanges: all of them with train.recompute_comm false, else
            # the small ones (routing counts; comm_replay)
            contexts = tape_contexts if getattr(self, "replay_comm", False) else _small_tape_contexts
            out = torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, context_fn=contexts)
            if isinstance(out, tuple):
                y, packed = out
                return y, (RouterStats.from_tensor(packed) if packed is not None else None)
            return out

        sub = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})
        _CHECKPOINTED[cls] = sub
    return _CHECKPOINTED[cls]


# train.recompute: what activation checkpointing recomputes in the backward
RECOMPUTE: dict[str, type] = {"full": Block, "attention": Attention, "experts": MoELayer}


def checkpoint_blocks(model: nn.Module, policy: str = "full", recompute_comm: bool = True) -> nn.Module:
    """Activation checkpointing: ``full`` recomputes every transformer block (least memory), ``attention``
    only the attention sub-blocks, ``experts`` only the MoE layers (router, all-to-all, experts; the
    dense parts keep their activations). See ``_checkpointed_class``. ``recompute_comm`` False: the
    recompute takes the forward's all-to-all (and other exchange) results instead of communicating
    again (``ep_train.parallel.comm_replay``)."""
    target = RECOMPUTE[policy]
    for module in model.modules():
        if isinstance(module, target):
            module.__class__ = _checkpointed_class(type(module))
            module.replay_comm = not recompute_comm
    return model


def compile_blocks(model: nn.Module) -> nn.Module:
    """``train.compile``: ``torch.compile`` the parts of every block whose shapes never change: attention
    (with its norm-free projections and rotary math) and dense SwiGLU FFNs (dense layers, shared experts).

    Not the MoE layer: its per-expert row counts change every step, so a compiled MoE layer recompiles
    or turns dynamic, and under activation checkpointing the recompute can then pick another compiled
    graph than the forward did (torch.utils.checkpoint raises "a different number of tensors was saved",
    pytorch/pytorch#166926; seen in CI). Static shapes keep forward and recompute on the same graph.
    ``nn.Module.compile`` compiles the module's call, with ZeRO-3's gather hooks where DeepSpeed put them
    (on these modules under ``parallel.zero3_gather: module``; on the whole block under ``block``)."""
    for module in model.modules():
        if isinstance(module, (Attention, SwiGLU)):
            module.compile()
    return model


def parallelize(model: nn.Module, cfg: Config, layout: ParallelLayout, *, deepspeed: bool = True) -> nn.Module:
    """Keep this rank's experts, route with all-to-all over the EP group, recompute blocks when
    ``train.activation_checkpointing`` is on, and (``deepspeed``) give DeepSpeed the expert-placement
    identity and tags it needs (``ep_train.parallel.zero``). Works on a ``meta`` model."""
    check_ep_layout(layout.ep_size, cfg.moe.num_experts, layout.world_size)
    _keep_local_experts(model, layout.ep_size, layout.ep_rank, layout.ep_group)
    if cfg.moe.balance_stats == "global_batch" and layout.world_size > 1 and dist.is_initialized():
        _global_balance_counts(model)
    if cfg.train.activation_checkpointing:
        checkpoint_blocks(model, cfg.train.recompute, cfg.train.recompute_comm)
    if deepspeed:
        from ep_train.parallel.zero import tag_experts_for_deepspeed

        tag_experts_for_deepspeed(model, layout)
    return model


def apply_expert_parallel(model: nn.Module, ep_group: dist.ProcessGroup) -> nn.Module:
    """Expert parallelism alone (no DeepSpeed, no recompute) over ``ep_group`` spanning the world:
    for plain-torch uses such as the layer benchmark."""
    ep = dist.get_world_size(ep_group)
    moe = next((m for m in model.modules() if isinstance(m, MoELayer)), None)
    check_ep_layout(ep, moe.num_experts if moe is not None else 0)
    _keep_local_experts(model, ep, dist.get_rank(ep_group), ep_group)
    return model


__all__ = ["compile_blocks", "AllToAllDispatcher", "LocalDispatcher", "ParallelLayout", "apply_expert_parallel", "checkpoint_blocks",
           "parallelize"]
