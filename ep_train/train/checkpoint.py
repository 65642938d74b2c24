"""Checkpoints: DeepSpeed's engine state plus the run's own (config, step, consumed_samples, RNG).

Layout: ``RUN/checkpoints/step_XXXXXXXX/`` (DeepSpeed's files, ``ep_train_state.json``,
``rng_rank{r}.pt``) and ``RUN/checkpoints/latest`` naming the newest complete one. ``latest`` is
replaced atomically only after every rank has finished writing, so a crash mid-save leaves it
pointing at the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STATE_FILE = "ep_train_state.json"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Any, root: Path, step: int, run_state: dict[str, Any], keep_last: int) -> Path:
    tag = f"step_{step:08d}"
    rank = dist.get_rank()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)  # collective
    torch.save(rng_state(), root / tag / f"rng_rank{rank}.pt")
    dist.barrier()  # every rank's files are on disk before "latest" moves
    if rank == 0:
        (root / tag / STATE_FILE).write_text(json.dumps(run_state, indent=2))
        tmp = root / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, root / "latest")
        tags = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in tags[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / tag


def find(resume: str, root: Path) -> Path | None:
    """``auto`` -> the latest complete checkpoint under ``root`` (or None); else an explicit folder."""
    if resume == "auto":
        latest = root / "latest"
        if not latest.is_file():
            return None
        path = root / latest.read_text().strip()
    else:
        path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"train.resume: {str(path)!r} is not a complete ep-train checkpoint (no {STATE_FILE}); "
                         "pass a checkpoints/step_* folder or --resume auto")
    return path


def load(engine: Any, path: Path) -> dict[str, Any]:
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load the checkpoint at {str(path)!r}; is it complete?")
    state = json.loads((path / STATE_FILE).read_text())
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():  # absent when resuming at another world size: fresh per-rank streams then
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state
