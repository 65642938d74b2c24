"""Soak: a long run of the tiny model at world 2, watching per-rank memory and throughput over time.

    python bench/soak.py [--steps 3000] [--write] [--out DIR]

configs/tiny.yaml (EP 2, ZeRO-3 + CPU offload) on the Python standard library, 2 processes launched by
torchrun, a checkpoint every 500 steps (so saves are part of what is watched). A sampler reads each
trainer process's RSS (psutil) once a second (``--sample-interval``); tokens/s come from the run's
metrics.jsonl. After a warm-up (the first 10% of steps) the RSS of each rank is fitted with a straight
line against the step: the slope (MiB per 1000 steps) and the growth it predicts over the run are
reported, and the verdict "RSS does not grow" is computed from them (growth under bench/targets.py's
``soak_growth`` share of the rank's mean RSS). With ``--write`` the figures and a PNG plot (matplotlib,
the ``bench`` extra) go to docs/benchmarks.md and docs/soak.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import append_section, free_port, loss_of, machine  # noqa: E402
from bench.targets import TARGETS  # noqa: E402

GROWTH_LIMIT = TARGETS["soak_growth"].value  # predicted RSS growth over the run after warm-up, as a share of the mean



def _workers(launcher: "psutil.Process") -> list["psutil.Process"]:  # noqa: F821
    """The ranks: torchrun's direct children (a process a rank forks carries the same command line)."""
    import psutil

    out = []
    for c in launcher.children(recursive=False):
        try:
            if "ep_train.train" in " ".join(c.cmdline()):
                out.append(c)
        except psutil.NoSuchProcess:
            continue
    return out


def _last_step(metrics: Path) -> int:
    try:
        with open(metrics, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            lines = f.read().decode(errors="replace").splitlines()
        return max((json.loads(line).get("step", 0) for line in lines[1:] if line.startswith("{")), default=0)
    except (OSError, ValueError):
        return 0


def sample(proc: subprocess.Popen, metrics: Path, samples: list[tuple[int, int, float]], stop: threading.Event,
           interval: float = 1.0) -> None:
    """(latest logged step, rank index, RSS MiB) every ``interval`` seconds for each trainer process."""
    import psutil

    launcher = psutil.Process(proc.pid)
    rank_of: dict[int, int] = {}  # pid -> rank index, in the order the ranks were first seen
    while not stop.is_set():
        step = _last_step(metrics)
        for w in sorted(_workers(launcher), key=lambda p: p.pid):
            rank = rank_of.setdefault(w.pid, len(rank_of))
            try:
                samples.append((step, rank, w.memory_info().rss / 2**20))
            except psutil.NoSuchProcess:
                pass
        stop.wait(interval)


def analyse(samples: list[tuple[int, int, float]], total_steps: int) -> dict[int, dict[str, float]]:
    """Per rank: a straight line through RSS against step after warm-up; its slope and predicted growth."""
    out = {}
    for rank in sorted({r for _, r, _ in samples}):
        step = np.array([s for s, r, _ in samples if r == rank], dtype=np.float64)
        rss = np.array([m for _, r, m in samples if r == rank])
        keep = step >= 0.1 * total_steps  # after warm-up
        if keep.sum() < 3:
            continue
        slope, _ = np.polyfit(step[keep], rss[keep], 1)  # MiB per step
        mean = float(rss[keep].mean())
        growth = float(slope * (step[keep].max() - step[keep].min()))
        out[rank] = {"slope_mib_per_1000_steps": float(slope * 1000), "mean_mib": mean,
                     "peak_mib": float(rss.max()), "predicted_growth_mib": growth,
                     "growth_share": growth / mean, "samples": int(keep.sum())}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    ap.add_argument("--write", action="store_true", help="write docs/benchmarks.md and docs/soak.png")
    ap.add_argument("--save-interval", type=int, default=500)
    ap.add_argument("--sample-interval", type=float, default=1.0,
                    help="seconds between RSS samples (short runs need shorter: 3 samples after warm-up per rank)")
    args = ap.parse_args(argv)

    from ep_train.data.prep import build, expand_inputs
    from ep_train.data.tokenizer import train_tokenizer

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ep_soak_"))
    work.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    inputs = [str(stdlib / d) for d in ("json", "email", "asyncio", "logging", "unittest")]
    tok = work / "tok.model"
    if not tok.is_file():
        train_tokenizer([str(f) for f in expand_inputs(inputs)], 1024, str(work / "tok"))
    if not (work / "data" / "manifest.json").is_file():
        build(inputs, str(tok), str(work / "data"), progress=False)
    run_dir = work / "run"
    log_every = max(1, args.steps // 300)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "ep_train.train", "--config",
           str(ROOT / "configs/tiny.yaml"), "--run-dir", str(run_dir), "--data_dir", str(work / "data"),
           "--tokenizer", str(tok), "--max_steps", str(args.steps), "--warmup_steps", str(min(100, args.steps)),
           "--log_interval", str(log_every), "--save_interval", str(args.save_interval), "--keep_last", "2"]
    samples: list[tuple[int, int, float]] = []
    stop = threading.Event()
    t0 = time.monotonic()
    with open(work / "soak.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        sampler = threading.Thread(target=sample, args=(proc, run_dir / "metrics.jsonl", samples, stop,
                                                        args.sample_interval), daemon=True)
        sampler.start()
        rc = proc.wait()
        stop.set()
        sampler.join()
    wall = time.monotonic() - t0
    if rc:
        raise RuntimeError(f"soak run failed ({rc}); see {work / 'soak.log'}")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "tokens_per_sec" in r]
    per_rank = analyse(samples, args.steps)
    tok_s = [r["tokens_per_sec"] for r in recs if r["step"] >= 0.1 * args.steps]
    if not per_rank:  # no rank had enough samples after the warm-up: nothing says whether memory grows
        raise RuntimeError(f"soak: too few RSS samples after the warm-up ({len(samples)} in all) to judge growth; "
                           "run more steps or sample more often (--sample-interval)")
    grows = any(v["growth_share"] > GROWTH_LIMIT for v in per_rank.values())
    result = {"per_rank": per_rank, "tok_s_median": float(np.median(tok_s)) if tok_s else 0.0,
              "tok_s_first_last": (tok_s[0], tok_s[-1]) if tok_s else (0.0, 0.0), "wall_s": wall,
              "rss_grows": grows, "steps": args.steps, "samples": len(samples), "final_loss": loss_of(recs[-1]),
              "sample_interval": args.sample_interval, "save_interval": args.save_interval}
    if args.write:
        _write(result, samples, recs)
    print(json.dumps(result, indent=1))
    return result


def _write(result: dict, samples: list, recs: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for rank in sorted({r for _, r, _ in samples}):
        a.plot([s for s, r, _ in samples if r == rank], [m for _, r, m in samples if r == rank], label=f"rank {rank}")
    a.set_ylabel("RSS (MiB)")
    a.legend()
    b.plot([r["step"] for r in recs], [r["tokens_per_sec"] for r in recs], color="tab:green")
    b.set_ylabel("tokens/s")
    b.set_xlabel("step")
    fig.suptitle(f"soak: tiny MoE, world 2, EP 2, ZeRO-3 + CPU offload, {result['steps']} steps")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "soak.png", dpi=90)
    rows = ["| rank | mean RSS (MiB) | peak RSS (MiB) | slope after warm-up (MiB / 1000 steps) | "
            "predicted growth over the run | share of mean |", "|---|---|---|---|---|---|"]
    for rank, v in result["per_rank"].items():
        rows.append(f"| {rank} | {v['mean_mib']:.0f} | {v['peak_mib']:.0f} | {v['slope_mib_per_1000_steps']:+.2f} | "
                    f"{v['predicted_growth_mib']:+.1f} MiB | {v['growth_share']:+.2%} |")
    first, last = result["tok_s_first_last"]
    body = (f"`python bench/soak.py --steps {result['steps']} --write` on {machine()}.\n"
            f"configs/tiny.yaml, world 2, EP 2, ZeRO-3 + CPU offload, a checkpoint every {result['save_interval']} "
            f"steps; RSS of each trainer sampled every {result['sample_interval']:g} s ({result['samples']} samples), "
            f"wall time {result['wall_s']:.0f} s, "
            f"final loss {result['final_loss']:.3f}.\n\n" + "\n".join(rows) +
            f"\n\ntokens/s after warm-up: median {result['tok_s_median']:,.0f} (first {first:,.0f}, last {last:,.0f}).\n"
            f"Verdict (predicted growth after warm-up under {GROWTH_LIMIT:.0%} of the mean on every rank): "
            f"**{'RSS GROWS' if result['rss_grows'] else 'RSS does not grow'}**.\n\n![soak](soak.png)\n")
    append_section("Soak: memory and throughput over a long run", body)


if __name__ == "__main__":
    main()
