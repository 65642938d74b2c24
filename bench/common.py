"""Shared helpers for the benchmarks: repeated timing, machine/version header, docs/benchmarks.md."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


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
    """Run ``fn`` under torch.profiler (CPU) and write its operators by self time to ``table_path``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    table_path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows,
                                                    max_name_column_width=60))
    return out
