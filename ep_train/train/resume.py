"""What may change between a checkpoint and the run that resumes it.

- Refused (a clear error before DeepSpeed touches the files): the model and MoE architecture and the
  data position's meaning (global batch ``train.batch_size``, sequence length, data seed, shuffling).
- Resharded: the world size and EP size. The checkpoint's ``ep_train_state.json`` says which shape
  wrote it; at another shape rank 0 converts it once to DeepSpeed's universal form
  (``step_N/universal``, kept for later resumes) and every rank loads its new share from there.
  Parameters, Adam moments, the schedule, the step and ``consumed_samples`` carry over. The data
  position is exact because ``consumed_samples`` counts the global batch, which cannot change (above):
  ``DistributedBatches`` cuts the same global batches at any world size; only the micro-batch split
  (gradient accumulation) differs.
- Refused: a ZeRO stage change to or from stage 3 (its files are not those of stages 1-2). Loaded through
  the universal form: a change of the optimizer's offload between none and cpu (torch's AdamW and DeepSpeed's
  CPU Adam keep different parameter-group keys and step counts; a direct load crashed in the first step). The
  checkpoint's ``ep_train_state.json`` says which it was written with (``zero``); for one that predates that
  field, its config's ``parallel.ds_config`` as it reads now.
- Applied and logged: optimizer hyperparameters (learning rate, router multiplier, betas, eps, weight
  decay), which DeepSpeed would otherwise silently restore from the checkpoint, and the schedule and
  clipping fields, which the run's own config already drives.
So the run's ``config.json`` always says what actually runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ep_train.config import DS_CONFIG_DIR, Config, config_to_dict, read_ds_json, resolve_ds_config
from ep_train.parallel.ds_nvme import checkpoint_refusal, swapped_checkpoint
from ep_train.train import checkpoint
from ep_train.train.optim import base_lr, schedule_factor

FIXED_TRAIN = ("batch_size", "seed")
FIXED_DATA = ("seq_len", "shuffle")
OPTIMIZER = ("learning_rate", "router_lr_multiplier", "beta1", "beta2", "eps", "weight_decay")
SCHEDULE = ("max_steps", "warmup_steps", "min_lr_ratio", "grad_clip", "micro_batch_size")


def _diff(old: dict[str, Any], new: dict[str, Any], section: str, keys: Any = None) -> list[str]:
    keys = keys if keys is not None else sorted(set(old) | set(new))
    return [f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config's sections over today's defaults: a field added to ep-train since the checkpoint was
    written reads as its default (the behaviour the run had), not as a change nobody can set back."""
    out = config_to_dict(Config())
    for section, values in saved.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def shape_changes(state: dict[str, Any], cfg: Config, world: int) -> list[str]:
    """How this run's world and EP size differ from the checkpoint's ([] at the same shape)."""
    changes = []
    if state.get("world_size") != world:
        changes.append(f"world size: {state.get('world_size')} -> {world}")
    return changes + _diff(state["config"]["parallel"], config_to_dict(cfg)["parallel"], "parallel", ["ep_size"])


def check_resumable(state: dict[str, Any], cfg: Config, world: int, path: Any) -> list[str]:
    """Refuse what cannot change (module docstring); return the shape changes that need resharding."""
    saved = with_defaults(state["config"])
    now = config_to_dict(cfg)
    fixed = (_diff(saved["model"], now["model"], "model") + _diff(saved["moe"], now["moe"], "moe")
             + _diff(saved["train"], now["train"], "train", FIXED_TRAIN)
             + _diff(saved["data"], now["data"], "data", FIXED_DATA))
    if fixed:
        raise ValueError(f"cannot resume {str(path)!r} with a different {', '.join(fixed)}; these define the "
                         "model or the data position: set them back to the checkpoint's values, or start a new run")
    return shape_changes(state, cfg, world)


def zero_layout(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The ZeRO stage and optimizer offload device a DeepSpeed config trains with (saved with each checkpoint)."""
    z = ds_config.get("zero_optimization", {})
    return {"stage": int(z.get("stage", 0)), "offload_optimizer": (z.get("offload_optimizer") or {}).get("device")
            or "none"}


def saved_zero_layout(state: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's ``zero_layout``; for a checkpoint that predates the field, its config's ds_config as that
    reads now (None when it no longer resolves: nothing to compare)."""
    if "zero" in state:
        return state["zero"]
    try:
        return zero_layout(read_ds_json(resolve_ds_config(with_defaults(state["config"])["parallel"]["ds_config"])))
    except (ValueError, OSError):
        return None


def _zero_change(then: dict[str, Any] | None, now: dict[str, Any], path: Path) -> str | None:
    """Refuse a ZeRO stage change to or from stage 3; describe an optimizer offload change between none and cpu
    (None when there is none)."""
    if then is None:
        return None
    if then["stage"] != now["stage"] and 3 in (then["stage"], now["stage"]):  # stages 1 and 2 share their files
        shipped = [f.stem for f in sorted(DS_CONFIG_DIR.glob("*.json")) if zero_layout(read_ds_json(f))["stage"]
                   == then["stage"]]
        raise ValueError(f"cannot resume {str(path)!r} (written under ZeRO stage {then['stage']}) with "
                         f"parallel.ds_config of stage {now['stage']}: DeepSpeed's ZeRO-3 checkpoint files are not "
                         "those of stages 1-2; "
                         f"resume with a parallel.ds_config of stage {then['stage']} (shipped: {', '.join(shipped)})")
    devices = (then["offload_optimizer"], now["offload_optimizer"])
    if devices[0] == devices[1] or "nvme" in devices:  # NVMe swap files: ep_train.parallel.ds_nvme decides
        return None
    return f"optimizer offload: {devices[0]} -> {devices[1]}"


@dataclass
class ResumePlan:
    path: Path  # the chosen checkpoint folder (step_N)
    state: dict[str, Any]  # its ep_train_state.json
    reshard: list[str]  # shape changes ("world size: 2 -> 1", ...); [] at the same shape
    universal: Path | None  # step_N/universal: resharding, or NVMe-swapped states into a run that keeps them in RAM


def plan(cfg: Config, root: Path, world: int, rank: int, ds_config: dict[str, Any],
         log: Callable[[str], None] = print) -> ResumePlan | None:
    """Collective. Which checkpoint to resume and how; None when there is nothing to resume.

    Runs before ``deepspeed.initialize``: loading at another shape is a ds_config switch
    (``checkpoint.load_universal``) that the engine reads when it is built."""
    t = cfg.train
    if t.resume is None:
        return None
    path = checkpoint.choose(t.resume, root, t.verify_checkpoint, t.resume_fallback, log=log)
    if path is None:
        return None
    state = checkpoint.read_state(path)
    reshard = check_resumable(state, cfg, world, path)  # before DeepSpeed reads a file
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    nvme = offload.get("device") == "nvme"
    refusal = checkpoint_refusal(path, nvme, world)  # swap files vs this run
    if refusal:
        raise checkpoint.CheckpointError(refusal)
    # Optimizer states swapped to NVMe and this run keeps them in RAM: DeepSpeed would read the ZeRO shards,
    # which lack them; the universal form is converted with them filled in (ds_nvme.py), at any shape.
    from_swap = swapped_checkpoint(path) and not nvme
    offload_change = _zero_change(saved_zero_layout(state), zero_layout(ds_config), path)
    if not reshard and not from_swap and offload_change is None:
        return ResumePlan(path, state, [], None)
    if nvme:
        # DeepSpeed 0.19.8's load_checkpoint skips the ZeRO (and so the universal) load when the optimizer
        # lives on NVMe and copies the old world's per-rank swap files instead: no resharding there.
        raise checkpoint.CheckpointError(
            f"checkpoint {str(path)!r} was written at another shape ({'; '.join(reshard)}) and this run offloads "
            "the optimizer to nvme, which DeepSpeed cannot reshard; resume at the saved shape (world size "
            f"{state.get('world_size')}, parallel.ep_size {state['config']['parallel']['ep_size']}) or offload "
            "the optimizer to cpu (parallel.ds_config zero3_offload)")
    from ep_train.interop.universal import to_universal_everywhere

    if rank == 0:
        why = (f"was written at another shape ({'; '.join(reshard)}); resharding" if reshard else
               "keeps optimizer states in NVMe swap files and this run keeps them in RAM; loading" if from_swap else
               f"was written with another {offload_change} (the optimizers keep different states); loading")
        log(f"resume: checkpoint {path.name} {why} through DeepSpeed's universal form in {path / 'universal'}")
    return ResumePlan(path, state, reshard, to_universal_everywhere(path))


def apply_changes(scheduler: Any, saved: dict[str, Any], cfg: Config, applied_steps: int,
                  force: bool = False) -> list[str]:
    """Put the run's optimizer hyperparameters into the loaded optimizer and schedule; return what changed.
    ``force``: write them even when the config did not change (after a universal load, see below).
    ``applied_steps``: the optimizer steps taken, skipped (non-finite) ones left out. DeepSpeed does not step
    the scheduler on a skipped step, so the schedule's position is this count, not the trainer's step."""
    t = cfg.train
    changed = _diff(with_defaults(saved)["train"], config_to_dict(cfg)["train"], "train", OPTIMIZER + SCHEDULE)
    if not changed and not force:
        return []
    factor = schedule_factor(t, applied_steps)
    for i, g in enumerate(scheduler.optimizer.param_groups):
        base = base_lr(t, g["router"])
        scheduler.base_lrs[i] = base
        g["initial_lr"] = base
        g["lr"] = base * factor
        g["betas"], g["eps"] = (t.beta1, t.beta2), t.eps
        g["weight_decay"] = t.weight_decay if g["decay"] else 0.0
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
    return changed


GROUP_TAGS = ("router", "decay", "name", "moe")  # what optimizer_param_groups marks each group with


def group_tags(optimizer: Any) -> list[dict[str, Any]]:
    return [{k: g[k] for k in GROUP_TAGS if k in g} for g in optimizer.param_groups]


def separate_steps(optimizer: Any) -> None:
    """DeepSpeed 0.19.8's universal loader sets every sub-group's Adam ``step`` to one object, the checkpoint's
    value as saved (``stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``): a Python int when CPU Adam
    wrote it (optimizer offload), else torch's 0-d tensor. torch's Adam/AdamW keep ``step`` as a tensor and
    increment it in place, once per sub-group's step: with an int the increment never sticks (every later step
    would use the first resumed step's bias correction) and the foreach path fails; with one shared tensor it
    advances once per sub-group and step (measured: a resharded no-offload run off by 2e-3 in its second step).
    Each sub-group gets its own tensor, as torch's ``load_state_dict`` would give (``Adam.__setstate__``).
    DeepSpeed's CPU Adam counts with ints (``state["step"] += 1``): from a checkpoint torch's AdamW wrote (the
    optimizer offload switched on), the shared tensor would advance once per sub-group and step there too
    (measured: 3e-4 relative off in the second step after the resume); each gets an int."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    ints = isinstance(optimizer, DeepSpeedCPUAdam)
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = int(state["step"]) if ints else torch.tensor(float(state["step"]), dtype=torch.float32)


def restore_group_tags(optimizer: Any, tags: list[dict[str, Any]]) -> None:
    """DeepSpeed 0.19.8's universal loader (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3)
    copies the checkpoint's group 0 settings onto every group: each group would train with the dense
    no-decay group's weight decay (0) and learning rate (no router multiplier), and our tags would all say
    "dense, no decay". The tags go back by position (the same optimizer object, so the order is the one
    it was built with); ``apply_changes(force=True)`` then rewrites the hyperparameters from the config."""
    for g, tag in zip(optimizer.param_groups, tags, strict=True):
        for k in GROUP_TAGS:
            g.pop(k, None)
        g.update(tag)
