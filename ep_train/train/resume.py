"""What may change between a checkpoint and the run that resumes it.

- Refused (a clear error before DeepSpeed touches the files): the model and MoE architecture, the
  world size and EP size (resharding to another shape is the portability issue's work), the data
  position's meaning (global batch, sequence length, data seed).
- Applied and logged: optimizer hyperparameters (learning rate, router multiplier, betas, eps, weight
  decay), which DeepSpeed would otherwise silently restore from the checkpoint, and the schedule and
  clipping fields, which the run's own config already drives.
So the run's ``config.json`` always says what actually runs.
"""

from __future__ import annotations

from typing import Any

from ep_train.config import Config, config_to_dict
from ep_train.train.optim import lr_factor

FIXED_TRAIN = ("batch_size", "seed")
FIXED_DATA = ("seq_len", "shuffle")
OPTIMIZER = ("learning_rate", "router_lr_multiplier", "beta1", "beta2", "eps", "weight_decay")
SCHEDULE = ("max_steps", "warmup_steps", "min_lr_ratio", "grad_clip", "micro_batch_size")


def _diff(old: dict[str, Any], new: dict[str, Any], section: str, keys: Any = None) -> list[str]:
    keys = keys if keys is not None else sorted(set(old) | set(new))
    return [f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def check_resumable(state: dict[str, Any], cfg: Config, world: int, path: Any) -> None:
    saved = state["config"]
    now = config_to_dict(cfg)
    shape = []
    if state.get("world_size") != world:
        shape.append(f"world size: {state.get('world_size')} -> {world}")
    shape += _diff(saved["parallel"], now["parallel"], "parallel", ["ep_size"])
    if shape:
        raise ValueError(f"checkpoint {str(path)!r} was written at another cluster shape ({'; '.join(shape)}); "
                         f"ep-train resumes only at the saved shape today: launch {state.get('world_size')} "
                         f"processes with parallel.ep_size {saved['parallel']['ep_size']} (see the saved "
                         "ep_train_state.json)")
    fixed = (_diff(saved["model"], now["model"], "model") + _diff(saved["moe"], now["moe"], "moe")
             + _diff(saved["train"], now["train"], "train", FIXED_TRAIN)
             + _diff(saved["data"], now["data"], "data", FIXED_DATA))
    if fixed:
        raise ValueError(f"cannot resume {str(path)!r} with a different {', '.join(fixed)}; these define the "
                         "model or the data position: set them back to the checkpoint's values, or start a new run")


def apply_changes(scheduler: Any, saved: dict[str, Any], cfg: Config, step: int) -> list[str]:
    """Put the run's optimizer hyperparameters into the loaded optimizer and schedule; return what changed."""
    t = cfg.train
    changed = _diff(saved["train"], config_to_dict(cfg)["train"], "train", OPTIMIZER + SCHEDULE)
    if not changed:
        return []
    factor = lr_factor(step, t.warmup_steps, t.max_steps, t.min_lr_ratio)
    for i, g in enumerate(scheduler.optimizer.param_groups):
        base = t.learning_rate * (t.router_lr_multiplier if g["router"] else 1.0)
        scheduler.base_lrs[i] = base
        g["initial_lr"] = base
        g["lr"] = base * factor
        g["betas"], g["eps"] = (t.beta1, t.beta2), t.eps
        g["weight_decay"] = t.weight_decay if g["decay"] else 0.0
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
    return changed
