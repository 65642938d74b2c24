"""Shared helpers for the benchmarks: repeated timing, machine/version header, docs/benchmarks.md."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def free_port() -> int:
    """A free TCP port on localhost (torchrun's master port, the benchmarks' process groups)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stdlib_data(out: Path, packages: list[str], vocab: int, val_fraction: float = 0.0) -> tuple[Path, Path]:
    """Real text already on the machine: a sentencepiece model trained on some standard-library packages
    and their tokenized shards, in ``out``. Returns (tokenizer model, data folder)."""
    import sysconfig

    from ep_train.data.prep import build, expand_inputs
    from ep_train.data.tokenizer import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    inputs = [str(stdlib / p) for p in packages]
    tok = train_tokenizer([str(f) for f in expand_inputs(inputs)], vocab, str(out / "tok"))
    build(inputs, str(tok), str(out / "data"), progress=False, val_fraction=val_fraction)
    return tok, out / "data"


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def stats(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def machine() -> str:
    import torch

    versions = [f"torch {torch.__version__}"]
    for mod in ("deepspeed", "transformers", "datasets", "sentencepiece"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - a peer that is missing is reported, not fatal
            versions.append(f"{mod} missing")
    cpu = platform.processor() or platform.machine()
    return (f"{datetime.date.today().isoformat()}, {platform.system()} {cpu}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, " + ", ".join(versions))


def publish(title: str, text: str, write: bool, scratch: Path | None) -> None:
    """A bench's end: print its report, make it docs/benchmarks.md's section ``title`` with --write, and remove
    its scratch folder (None: the user's --out, kept)."""
    print(text)
    if write:
        append_section(title, text)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


def append_section(title: str, body: str) -> None:
    """Replace (or add) the section ``## title`` in docs/benchmarks.md."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.is_file() else "# Benchmarks\n\nProduced by the commands in `bench/`; each " \
        "section says how to reproduce it. Times are medians of repeated runs (min-max in brackets).\n"
    start = text.find(f"\n## {title}\n")
    section = f"\n## {title}\n\n{body.strip()}\n"
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    else:
        text += section
    DOC.write_text(text)


def profiled(fn: Callable[[], object], table_path: Path, rows: int = 25) -> object:
    """Run ``fn`` under torch.profiler (CPU); write its operators by self time to ``table_path`` and its
    Chrome trace next to it (``.json``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    table_path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows,
                                                    max_name_column_width=60))
    prof.export_chrome_trace(str(table_path.with_suffix(".json")))  # bench/step_breakdown.classify reads it
    return out


def peer_args() -> tuple[object, list[str]]:
    """The command line shared by the peer training scripts; the rest are ep-train config overrides."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile_step", type=int, default=0, help="profile this step (table next to --out)")
    return ap.parse_known_args()


def loss_of(rec: dict, key: str = "loss") -> float:
    """A metrics.jsonl record's loss (or ``key``): null (a value that was not finite; metrics.jsonl has no NaN)
    read as NaN, so the figures and checks that follow see a non-finite number, as the run did."""
    return float("nan") if rec[key] is None else float(rec[key])


def busiest_rank_load(counts: dict[str, list[int]], ep_size: int) -> float:
    """How far one step's expert rows sit from an even split between the EP ranks: the sum over MoE layers of
    the busiest rank's rows over the sum of the mean rank's (1.0 even; ``ep_size`` when one rank gets them all).
    In a dropless design that computes each rank's rows as they come (ep-train, AutoEP) every rank waits for the
    busiest one at each layer's all-to-alls, so the step's expert work goes as this factor; DeepSpeed's MoE layer
    pads every expert to the busiest expert's count on every rank, so its cost follows that count instead. The
    counts are summed over the step's micro-batches first, so a micro-batch's own imbalance can be larger.
    ``counts``: layer -> rows per global expert [E] for the whole step (all ranks and micro-batches); rank r
    holds experts [r E/ep, (r + 1) E/ep) in ep-train, DeepSpeed's MoE layer and AutoEP."""
    busiest = mean = 0.0
    for row in counts.values():
        assert len(row) % ep_size == 0, (len(row), ep_size)
        per = len(row) // ep_size
        ranks = [sum(row[r * per:(r + 1) * per]) for r in range(ep_size)]
        busiest += max(ranks)
        mean += sum(ranks) / ep_size
    return busiest / mean if mean > 0 else 0.0


def peer_optimizer_settings(named_params, cfg, is_router: Callable[[str], bool]) -> tuple[list[dict], Callable]:
    """A peer's AdamW parameter groups and learning-rate schedule, by ep-train's rules (ep_train.train.optim):
    the router at lr x router_lr_multiplier, no weight decay on 1-D parameters and biases, linear warmup then
    cosine (``lr_factor``). Returns (groups, a function making the LambdaLR for an optimizer), so a peer
    trains with the same settings and its routing evolves under the same schedule as ep-train's."""
    from ep_train.train.optim import base_lr, decays, lr_schedule

    t = cfg.train
    buckets: dict[tuple[bool, bool], list] = {}
    for name, param in named_params:
        buckets.setdefault((is_router(name), decays(name, param.shape)), []).append(param)
    groups = [{"params": params, "name": f"{'router' if router else 'rest'}_{'decay' if decay else 'no_decay'}",
               "weight_decay": t.weight_decay if decay else 0.0, "lr": base_lr(t, router)}
              for (router, decay), params in sorted(buckets.items())]
    assert any(g["name"].startswith("router") for g in groups), "no router parameter matched"
    return groups, lambda optimizer: lr_schedule(optimizer, t)


def peer_train_loop(engine, loss_fn: Callable, data, args, tokens_per_step: int, elements: int,
                    take_counts: Callable | None = None) -> None:
    """Train ``args.steps`` global batches; rank 0 writes one JSON line per step to ``args.out``.

    ``loss_fn(x, y)`` returns the loss of one micro-batch through ``engine``. ``take_counts()`` returns this
    rank's rows per global expert since its last call, one [E] tensor per MoE layer (forward passes only, not
    activation checkpointing's recompute); summed over ranks, they are the line's ``expert_counts`` (as in
    ep-train's metrics.jsonl).
    """
    import json
    import resource

    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    out = open(args.out, "w") if rank == 0 else None  # noqa: SIM115 - written step by step
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        lr = [float(v) for v in engine.get_lr()]  # per parameter group, the rates this step uses
        micro = data.next()

        def one_step() -> float:
            total = 0.0
            for x, y in micro:  # noqa: B023 - called within this iteration
                loss = loss_fn(x, y)
                engine.backward(loss)
                engine.step()
                total += loss.item()
            return total

        total = profiled(one_step, Path(f"{args.out}.rank{rank}.profile.txt")) if step == args.profile_step \
            else one_step()
        dist.barrier()
        dt = time.perf_counter() - t0
        rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)
        elem = torch.tensor([elements], dtype=torch.float64)
        dist.all_reduce(elem, op=dist.ReduceOp.MAX)  # the largest rank's share
        loss = torch.tensor([total / len(micro)], dtype=torch.float64)
        dist.all_reduce(loss)  # the mean over ranks, as ep-train logs it
        counts = None
        if take_counts is not None:  # after the timing: not part of the step
            counts = torch.stack([c.to(torch.float64) for c in take_counts()])  # [layers, E]
            dist.all_reduce(counts)
        if out:
            rec = {"step": step, "loss": float(loss.item()) / dist.get_world_size(), "max_rss_mb": float(rss.item()),
                   "profiled": step == args.profile_step, "tokens_per_sec": tokens_per_step / dt,
                   "elements": int(elem.item()), "lr": lr}
            if counts is not None:
                rec["expert_counts"] = {str(i): [int(v) for v in row] for i, row in enumerate(counts.tolist())}
            out.write(json.dumps(rec) + "\n")
            out.flush()
    dist.barrier()
