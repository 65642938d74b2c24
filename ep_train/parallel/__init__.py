"""Parallelism applied to a plain model from outside."""

from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn

from ep_train.parallel.dispatch import AllToAllDispatcher, LocalDispatcher


def apply_expert_parallel(model: nn.Module, ep_group: dist.ProcessGroup) -> nn.Module:
    """Keep only this rank's experts in every MoE layer and route tokens with all-to-all over ``ep_group``.

    EP rank r keeps global experts [r * E_l, (r + 1) * E_l), E_l = E / ep. Call it on a model built
    identically on every rank (same seed); the result computes the same function as the full model.
    """
    from ep_train.model.moe import MoELayer  # local import: ep_train.model imports the dispatchers from here

    ep, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    for module in model.modules():
        if not isinstance(module, MoELayer):
            continue
        if module.num_experts % ep:
            raise ValueError(f"ep_size ({ep}) must divide num_experts ({module.num_experts}); "
                             f"pick an EP group size that divides {module.num_experts}")
        assert module.experts.num_local_experts == module.num_experts, "apply_expert_parallel called twice"
        local = module.num_experts // ep
        module.experts.keep_experts(rank * local, local)
        module.dispatcher = AllToAllDispatcher(module.num_experts, ep_group)
    return model


__all__ = ["AllToAllDispatcher", "LocalDispatcher", "apply_expert_parallel"]
