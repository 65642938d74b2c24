"""Optimizer parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch.nn as nn

from ep_train.config import Config


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``max_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms/biases/1-D params; router at lr x router_lr_multiplier.

    Experts and dense weights also go to separate groups (DeepSpeed's MoE optimizer requirement).
    """
    t = cfg.train
    buckets: dict[tuple[bool, bool, bool], list[nn.Parameter]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        router = ".router." in n
        shape = getattr(p, "ds_shape", p.shape)  # a ZeRO-3 partition is [0]: use the full shape
        decay = len(shape) >= 2 and not n.endswith("bias")
        expert = getattr(p, "allreduce", True) is False
        buckets.setdefault((router, decay, expert), []).append(p)
    groups = []
    for (router, decay, expert), params in sorted(buckets.items()):
        g: dict[str, Any] = {"params": params, "weight_decay": t.weight_decay if decay else 0.0,
                             "router": router, "decay": decay,  # read back when a resume changes them
                             "lr": t.learning_rate * (t.router_lr_multiplier if router else 1.0),
                             "name": f"{'router' if router else 'expert' if expert else 'dense'}"
                                     f"_{'decay' if decay else 'no_decay'}"}
        if expert:  # ZeRO-1/2 look the expert-data-parallel group up by this exact name
            g["moe"], g["name"] = True, f"ep_size_{cfg.parallel.ep_size}"
        groups.append(g)
    return groups
