"""Spawn W CPU processes with gloo, with a free port and a hard timeout (a hang fails, never blocks CI)."""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def read_losses(run_dir) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl (a resumed run appends; the latest record of a step wins)."""
    import json
    from pathlib import Path

    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = float("nan") if rec["loss"] is None else rec["loss"]  # null: a non-finite step
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, queue: Any, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
        queue.put((rank, "ok", result))
    except BaseException:  # report the failure instead of hanging the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes; return the per-rank results."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, queue, args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            rank, status, payload = queue.get(timeout=min(left, 1.0))
        except queue_mod.Empty:
            if any(p.exitcode not in (None, 0) for p in procs) and not errors:
                errors.append(f"a worker died: exit codes {[p.exitcode for p in procs]}")
                break
            continue
        if status == "ok":
            results[rank] = payload
        else:
            errors.append(f"rank {rank}:\n{payload}")
            break
    for p in procs:
        p.join(timeout=0 if errors or len(results) < world else 10)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    if len(results) < world:
        raise TimeoutError(f"distributed run timed out after {timeout}s (ranks done: {sorted(results)})")
    return [results[r] for r in range(world)]


def cmdline(p: Any) -> str:  # p: psutil.Process
    """A process's command line, or "" when it exited while we looked (short-lived helpers do)."""
    import psutil

    try:
        return " ".join(p.cmdline())
    except psutil.NoSuchProcess:
        return ""
