"""Optimizer parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn

from ep_train.config import Config, TrainConfig


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """The factor of step index ``step`` (0-based): linear warmup reaching 1 at the last warmup step, then cosine
    down to ``min_ratio`` at the last step (index ``max_steps - 1``). Counting the cosine from the step after
    the peak: from ``step - warmup`` the first step after warmup repeated the peak and the last one stopped
    short of ``min_ratio`` (0.1098 for 0.1 over 15 decay steps)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step + 1 - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_factor(t: TrainConfig, step: int) -> float:
    """The run's learning-rate factor at ``step`` (0-based): ``lr_factor`` with the config's settings."""
    return lr_factor(step, t.warmup_steps, t.max_steps, t.min_lr_ratio)


def lr_schedule(optimizer: torch.optim.Optimizer, t: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's schedule over every parameter group's base rate (DeepSpeed steps it once per global step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule_factor(t, s))


def base_lr(t: TrainConfig, router: bool) -> float:
    """A group's peak learning rate: the router's at ``router_lr_multiplier`` times the rest's."""
    return t.learning_rate * (t.router_lr_multiplier if router else 1.0)


def decays(name: str, shape: Sequence[int]) -> bool:
    """Whether a parameter gets weight decay: matrices yes; norms, biases and other 1-D parameters no."""
    return len(shape) >= 2 and not name.endswith("bias")


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
        decay = decays(n, shape)
        expert = getattr(p, "allreduce", True) is False
        buckets.setdefault((router, decay, expert), []).append(p)
    groups = []
    for (router, decay, expert), params in sorted(buckets.items()):
        g: dict[str, Any] = {"params": params, "weight_decay": t.weight_decay if decay else 0.0,
                             "router": router, "decay": decay,  # read back when a resume changes them
                             "lr": base_lr(t, router),
                             "name": f"{'router' if router else 'expert' if expert else 'dense'}"
                                     f"_{'decay' if decay else 'no_decay'}"}
        if expert:  # ZeRO-1/2 look the expert-data-parallel group up by this exact name
            g["moe"], g["name"] = True, f"ep_size_{cfg.parallel.ep_size}"
        groups.append(g)
    return groups
