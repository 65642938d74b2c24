"""Memory at scale: peak RSS per rank (set-up and training) against the world size, the largest MoE
that trains on this machine, and ``ep-train plan`` against every measured peak.

    python bench/scale.py [--small] [--write] [--worlds 1,2,4,8] [--sizes ...] [--skip-largest]

Every run is ``ep_train.train`` under torchrun (gloo, one thread per rank), 3 steps. This script
samples each rank process from outside: ``VmHWM`` (the kernel's peak RSS) of every rank read from
/proc/<pid>/status the moment rank 0 prints ``training: world`` (the end of set-up: engine built,
before the first step) is the set-up peak; the last ``VmHWM`` read before the ranks exit, every 0.2 s, is
the outside training peak. A short run can reach its peak less than one poll before it exits, so the
training peak of a rank is the larger of that and the rank's own final reading (``ru_maxrss`` after the
last save, the ``final_rss_mb_per_rank`` mark in metrics.jsonl); the outside reading must never exceed it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import DOC, append_section, free_port, loss_of, machine  # noqa: E402
from bench.targets import TARGETS, describe  # noqa: E402
from bench.targets import verdict as target_verdict  # noqa: E402

GIB, MIB = 2 ** 30, 2 ** 20
SETUP_LINE = "training: world"  # the trainer prints it once the engine is built, before step 1
STEPS = 3

# The fixed model of the scaling table (issue 11): hidden 1024, 8 layers, 8 experts of width 2816,
# vocabulary 4096; 16 query / 4 key-value heads give 583.0M parameters.
MODEL_583M = {"vocab_size": 4096, "hidden_size": 1024, "intermediate_size": 2816, "num_layers": 8, "num_heads": 16,
              "num_kv_heads": 4, "num_experts": 8, "num_experts_per_token": 2}
# The smoke test's model: the same code paths in seconds.
MODEL_SMALL = {"vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
               "num_kv_heads": 2, "num_experts": 4, "num_experts_per_token": 2}
# Candidates for the largest MoE at world 2 (smallest first; the search stops at the first failure):
# more layers of the 583M model's shape, so bytes per parameter compare like for like.
LARGEST_LAYERS = (12, 13, 14)
# The NVMe search (issue 11's ZeRO-Infinity target): the same shape, parameters and optimizer states swapped to
# disk. 36 layers: 2.59B parameters. EP 1 there: on CPU ep-train refuses parameter swapping when a ZeRO group
# has one rank (EP = world), see README "bf16 and NVMe offload".
NVME_LAYERS = (36,)



def _status_kib(pid: int, key: str) -> int | None:
    """A ``/proc/<pid>/status`` field in KiB (VmHWM: peak RSS; VmRSS: now), None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@dataclass
class RunResult:
    world: int
    ep: int
    precision: str
    params: int
    ok: bool
    setup_peak: list[int] = field(default_factory=list)  # bytes per rank (VmHWM at the end of set-up)
    train_peak: list[int] = field(default_factory=list)  # bytes per rank: max(outside_peak, trainer_final)
    outside_peak: list[int] = field(default_factory=list)  # bytes per rank (last VmHWM read before exit)
    trainer_final: list[int] = field(default_factory=list)  # bytes per rank (the trainer's final mark)
    trainer_max_rss: int = 0  # bytes, the trainer's max_rss_mb (largest rank)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    @property
    def finite(self) -> bool:
        import math

        return self.ok and len(self.losses) == STEPS and all(math.isfinite(x) for x in self.losses)


def _overrides(model: dict[str, Any], world: int, ep: int, seq_len: int, precision: str) -> list[str]:
    args: list[str] = []
    for k, v in model.items():
        args += [f"--{k}", str(v)]
    return args + ["--ep_size", str(ep), "--seq_len", str(seq_len), "--micro_batch_size", "1",
                   "--batch_size", str(world), "--max_steps", str(STEPS), "--warmup_steps", "1",
                   "--log_interval", "1", "--eval_interval", "0", "--save_interval", "0",
                   "--activation_checkpointing", "true", "--mixed_precision", precision,
                   "--log_expert_stats", "false"]


def run_trainer(run_dir: Path, data: Path, world: int, overrides: list[str], ds_config: str,
                env: dict[str, str] | None = None, timeout: float = 3600, keep_checkpoints: bool = False) -> RunResult:
    """One training run under torchrun, its rank processes sampled from outside (see the module doc).
    ``keep_checkpoints``: leave the run's checkpoints (removed by default: a ~1B model's is ~16 GB)."""
    precision = overrides[overrides.index("--mixed_precision") + 1]
    ep = int(overrides[overrides.index("--ep_size") + 1])
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(world),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "ep_train.train",
           "--run-dir", str(run_dir), "--data_dir", str(data), "--ds_config", ds_config, *overrides]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    import psutil

    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=ROOT)
    ranks: dict[int, int] = {}  # pid -> last VmHWM (KiB)
    setup: dict[int, int] = {}
    lock = threading.Lock()
    done = threading.Event()
    stopped: list[str] = []

    rank_of: dict[int, int] = {}  # pid -> RANK

    def workers() -> list[int]:
        try:
            # torchrun's agent starts the ranks as its direct children; deeper ones are short-lived forks of
            # a rank (subprocess calls) that show the rank's command line and a copy of its VmHWM.
            kids = psutil.Process(proc.pid).children(recursive=False)
        except psutil.NoSuchProcess:
            return []
        out = []
        for k in kids:
            try:
                if "ep_train.train" in " ".join(k.cmdline()):
                    if k.pid not in rank_of:
                        rank_of[k.pid] = int(k.environ()["RANK"])
                    out.append(k.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
                continue
        return out

    def sample() -> None:  # VmHWM only grows: the last value read before a rank exits is its peak
        while not done.is_set():
            if _mem_available() < LOW_MEMORY:  # the machine is shared: stop this run before the OOM killer picks
                stopped.append(f"stopped by bench/scale.py: MemAvailable fell below {LOW_MEMORY / GIB:.1f} GiB")
                for pid in workers():
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass
            for pid in workers():
                kib = _status_kib(pid, "VmHWM")
                if kib is not None:
                    with lock:
                        ranks[pid] = max(ranks.get(pid, 0), kib)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line])[-80:]
        if SETUP_LINE in line and not setup:
            for pid in workers():
                kib = _status_kib(pid, "VmHWM")
                if kib is not None:
                    setup[pid] = kib
                    with lock:
                        ranks[pid] = max(ranks.get(pid, 0), kib)
        if time.monotonic() - t0 > timeout:
            proc.kill()
            break
    rc = proc.wait()
    done.set()
    sampler.join()
    if not keep_checkpoints:  # not what is measured here
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    res = RunResult(world, ep, precision, 0, rc == 0, seconds=time.monotonic() - t0)
    def by_rank(kib_of: dict[int, int]) -> list[int]:
        return [kib * 1024 for _, kib in sorted((rank_of.get(pid, pid), kib) for pid, kib in kib_of.items())]

    res.setup_peak = by_rank(setup)
    res.outside_peak = by_rank(ranks)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        all_recs = [json.loads(x) for x in metrics.read_text().splitlines()]
        recs = [r for r in all_recs if "loss" in r and "max_rss_mb" in r]
        res.losses = [loss_of(r) for r in recs]
        if recs:
            res.trainer_max_rss = int(max(r["max_rss_mb"] for r in recs) * MIB)
        final = [r["final_rss_mb_per_rank"] for r in all_recs if "final_rss_mb_per_rank" in r]
        if final:
            res.trainer_final = [int(x * MIB) for x in final[-1]]
    res.train_peak = list(res.outside_peak)
    if len(res.trainer_final) == len(res.outside_peak):
        res.train_peak = [max(a, b) for a, b in zip(res.outside_peak, res.trainer_final)]
    if rc != 0:
        res.error = (stopped[0] + "\n" if stopped else "") + "".join(tail[-30:])
    return res


def prepare_data(out: Path, vocab: int = 4096) -> tuple[Path, Path]:
    """A sentencepiece model and shards from a few packages of the Python standard library (real text)."""
    from ep_train.data.prep import build, expand_inputs
    from ep_train.data.tokenizer import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    inputs = [str(stdlib / "json"), str(stdlib / "email"), str(stdlib / "asyncio")]
    if not (out / "data" / "manifest.json").is_file():
        tok = train_tokenizer([str(f) for f in expand_inputs(inputs)], vocab, str(out / "tok"))
        build(inputs, str(tok), str(out / "data"), progress=False)
    return out / "data", out / "tok.model"


# A leaner DeepSpeed JSON for every run here (written into the output folder and reported):
# smaller reduce and prefetch buckets (5e7 -> 1e7 elements: 150 MiB less per rank in fp32), the rest
# as in ds_configs/zero3_offload.json.
LEAN_DS = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
                                 "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                 "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 1e7,
                                 "stage3_prefetch_bucket_size": 1e7, "stage3_param_persistence_threshold": 0,
                                 "stage3_gather_16bit_weights_on_model_save": False},
           "steps_per_print": 1000000, "wall_clock_breakdown": False}
# ZeRO-Infinity: parameters and optimizer states swapped to parallel.nvme_path (the trainer writes it in).
# sub_group_size 1e8: the optimizer swaps a sub-group at a time through 4 pinned fp32 buffers of the largest
# sub-group (DeepSpeed's default 1e9 would pin ~15 GiB per rank); buffer_size holds the largest parameter
# partition of the 583M shape (an expert weight [8, 2816, 1024] over 2 ranks: 11.5M elements).
NVME_DS = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "pin_memory": True, "buffer_count": 5,
                                                                 "buffer_size": 1.2e7, "max_in_cpu": 0},
                                 "offload_optimizer": {"device": "nvme", "pin_memory": True}, "sub_group_size": 1e8,
                                 "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 1e7,
                                 "stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0,
                                 "stage3_param_persistence_threshold": 0,
                                 "stage3_gather_16bit_weights_on_model_save": False},
           "steps_per_print": 1000000, "wall_clock_breakdown": False}
# glibc: a fixed 1 MiB mmap threshold returns every freed tensor above 1 MiB to the OS at once (the
# construction partitions DeepSpeed copies into its flat buffers); the planner reads the same variable.
LEAN_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 20)}
RESERVE = 1 * GIB  # what a run must leave free for the other users of the machine
LOW_MEMORY = GIB // 2  # a run still going when MemAvailable falls below this is stopped
WAIT_FOR_MEMORY = 60.0  # seconds a run waits for others' work to free enough memory before it is skipped


def _mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _cfg(model: dict[str, Any], world: int, ep: int, seq_len: int, precision: str, ds_config: str,
         extra: list[str] = ()):
    from ep_train.config import load_config, parse_overrides

    return load_config(None, parse_overrides(_overrides(model, world, ep, seq_len, precision)
                                             + ["--ds_config", ds_config, *extra]))


def plan_host(model: dict[str, Any], world: int, ep: int, seq_len: int, precision: str, ds_config: str,
              env: dict[str, str], extra: list[str] = ()) -> dict[str, Any]:
    from ep_train.sizes import model_size, plan_memory

    cfg = _cfg(model, world, ep, seq_len, precision, ds_config, extra)
    plan = plan_memory(cfg, world, "cpu", env=env)
    return {"params": model_size(cfg).total, "host": plan["host_peak_bytes"], "setup": plan["host_setup_bytes"]}


def measure(name: str, model: dict[str, Any], world: int, seq_len: int, precision: str, ds_config: str,
            env: dict[str, str], data: Path, out: Path, ep: int | None = None,
            extra: list[str] = ()) -> dict[str, Any]:
    """One run, or a reason it was not run (the plan says it would not fit next to the machine's other load).
    ``ep``: default the largest EP dividing the world and the experts; ``extra``: more trainer overrides."""
    if ep is None:
        ep = max(e for e in range(1, world + 1) if world % e == 0 and model["num_experts"] % e == 0)
    plan = plan_host(model, world, ep, seq_len, precision, ds_config, env, extra)
    row = {"name": name, "world": world, "ep": ep, "precision": precision, "params": plan["params"],
           "plan_host": plan["host"], "plan_setup": plan["setup"], "ds_config": ds_config, "env": env}
    cache = out / "rows" / f"{name}_w{world}_{precision}.json"  # a re-run with the same --out reuses results
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("params") == row["params"] and cached.get("ds_config") == ds_config and cached.get("env") == env:
            print(f"{name} world {world} {precision}: reusing {cache}", flush=True)
            return {**cached, "plan_host": row["plan_host"], "plan_setup": row["plan_setup"]}
    need = plan["host"] * world * 1.10  # the plan's accuracy on CPU is +-15%; measured within 10% so far
    deadline = time.monotonic() + WAIT_FOR_MEMORY
    while need + RESERVE > _mem_available() and time.monotonic() < deadline:
        time.sleep(5)
    avail = _mem_available()
    if need + RESERVE > avail:
        row["skipped"] = (f"not run: the plan needs {need / GIB:.1f} GiB (+10%) for {world} ranks, plus "
                          f"{RESERVE / GIB:.0f} GiB left to the machine's other users, and {avail / GIB:.1f} GiB "
                          "were available")
        print(f"{name}: {row['skipped']}", flush=True)
        return row
    res = run_trainer(out / f"{name}_w{world}_{precision}", data, world,
                      _overrides(model, world, ep, seq_len, precision) + list(extra), ds_config, env=env)
    row.update(ok=res.ok, finite=res.finite, losses=res.losses, seconds=res.seconds,
               setup_peak=res.setup_peak, train_peak=res.train_peak, outside_peak=res.outside_peak,
               trainer_final=res.trainer_final, trainer_max_rss=res.trainer_max_rss,
               busy=_other_load())
    if not res.ok:
        row["error"] = res.error[-2000:]
    print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(row))
    return row


def nvme_search(layer_counts: list[int], model: dict[str, Any], seq: int, precision: str, data: Path, out: Path,
                nvme_root: Path) -> list[dict[str, Any]]:
    """The largest MoE at world 2 with parameters and optimizer states swapped to ``nvme_root`` (smallest first,
    stopping at the first size that fails, does not fit in memory or whose swap files would not fit on disk)."""
    from ep_train.parallel.zero import aio_unavailable_reason, o_direct_unsupported

    ds = out / "ds_nvme.json"
    ds.write_text(json.dumps(NVME_DS, indent=1))
    nvme_root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for layers in layer_counts:
        m = {**model, "num_layers": layers}
        name = f"nvme_{layers}l"
        swap = nvme_root / name
        shutil.rmtree(swap, ignore_errors=True)
        extra = ["--nvme_path", str(swap), "--save_at_end", "false"]  # a checkpoint would double the disk needed
        params = plan_host(m, 2, 1, seq, precision, str(ds), LEAN_ENV, extra)["params"]
        # swap files: the parameter partitions, fp32 master, two fp32 moments, the fp32 optimizer gradient
        need = params * ({"fp32": 4, "bf16": 2}[precision] + 16)
        free = shutil.disk_usage(nvme_root).free
        reason = aio_unavailable_reason() or o_direct_unsupported(swap)
        if reason is None and need + RESERVE > free:
            reason = (f"its swap files need about {need / GIB:.0f} GiB and {free / GIB:.0f} GiB are free on "
                      f"{nvme_root}")
        if reason is not None:
            rows.append({"name": name, "world": 2, "ep": 1, "precision": precision, "params": params,
                         "plan_host": 0, "skipped": f"not run: {reason}"})
            print(f"{name}: not run: {reason}", flush=True)
            break
        row = measure(name, m, 2, seq, precision, str(ds), LEAN_ENV, data, out, ep=1, extra=extra)
        if "swap_bytes" not in row and row.get("train_peak"):  # a new run: the files it swapped to, kept after it
            row["swap_bytes"] = sum(f.stat().st_size for f in swap.rglob("*") if f.is_file())
            (out / "rows" / f"{name}_w2_{precision}.json").write_text(json.dumps(row))
        shutil.rmtree(swap, ignore_errors=True)
        rows.append(row)
        if row.get("skipped") or not row.get("finite"):
            break
    return rows


def _other_load() -> str:
    """The 1-minute load average against this machine's cores: other users' work shows up here."""
    one = os.getloadavg()[0]
    return f"{one:.1f}"


def _plot(rows: list[dict[str, Any]], path: Path) -> str:
    """Set-up and training peak per rank (and summed) against the world size, as a PNG.

    matplotlib when installed; else Pillow (a tensorboard dependency, so always present with ep-train).
    """
    done = [r for r in rows if r.get("train_peak")]
    if not done:
        return "no measured runs to plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        w = [r["world"] for r in done]
        ax[0].plot(w, [max(r["setup_peak"]) / GIB for r in done], "o-", label="set-up peak")
        ax[0].plot(w, [max(r["train_peak"]) / GIB for r in done], "s-", label="training peak")
        ax[0].plot(w, [r["plan_host"] / GIB for r in done], "x--", label="ep-train plan")
        ax[1].plot(w, [sum(r["train_peak"]) / GIB for r in done], "s-", label="training, summed")
        for a, t in zip(ax, ("per rank (largest)", "summed over ranks")):
            a.set_xlabel("world size (EP = world)"), a.set_ylabel("GiB"), a.set_title(t), a.legend()
        fig.tight_layout()
        fig.savefig(path)
        return "matplotlib"
    except ImportError:
        pass
    from PIL import Image, ImageDraw

    width, height, pad = 900, 420, 60
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    series = [("set-up peak per rank", [max(r["setup_peak"]) for r in done], (31, 119, 180)),
              ("training peak per rank", [max(r["train_peak"]) for r in done], (214, 39, 40)),
              ("ep-train plan per rank", [r["plan_host"] for r in done], (44, 160, 44)),
              ("training peak summed", [sum(r["train_peak"]) for r in done], (120, 120, 120))]
    top = max(max(v) for _, v, _ in series) / GIB * 1.1
    xs = [r["world"] for r in done]

    def px(i: int, v: float) -> tuple[float, float]:
        x = pad + (width - 2 * pad) * (i + 0.5) / len(xs)
        return x, height - pad - (height - 2 * pad) * (v / GIB) / top

    d.line([(pad, pad), (pad, height - pad), (width - pad, height - pad)], fill="black")
    for g in range(0, int(top) + 1, max(1, int(top) // 8)):
        y = px(0, g * GIB)[1]
        d.line([(pad - 4, y), (width - pad, y)], fill=(225, 225, 225))
        d.text((8, y - 6), f"{g} GiB", fill="black")
    for i, wv in enumerate(xs):
        d.text((px(i, 0)[0] - 20, height - pad + 8), f"world {wv}", fill="black")
    for k, (label, vals, color) in enumerate(series):
        pts = [px(i, v) for i, v in enumerate(vals)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=3)
        for x, y in pts:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        d.text((pad + 10 + 210 * k, 15), label, fill=color)
    d.text((pad, height - 22), "583M MoE, 3 steps; EP = world (bench/scale.py)", fill="black")
    img.save(path)
    return "Pillow (matplotlib is not installed)"


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="a tiny model at world 1 and 2 (seconds): a smoke test")
    ap.add_argument("--write", action="store_true", help="write the section (and the PNG) into docs/")
    ap.add_argument("--worlds", default="1,2,4,8")
    ap.add_argument("--largest-layers", default=",".join(map(str, LARGEST_LAYERS)),
                    help="layer counts tried for the largest model at world 2 (583M's shape, more layers)")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default=None, help="run folder (default: a temporary one, removed at the end)")
    ap.add_argument("--nvme-layers", default=",".join(map(str, NVME_LAYERS)),
                    help="layer counts tried with parameters and optimizer states on NVMe at world 2 ('' skips)")
    ap.add_argument("--nvme-precision", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--nvme-path", default=None,
                    help="folder on a fast local disk with O_DIRECT (ext4/xfs) for the swap files (default: --out)")
    args = ap.parse_args(argv)
    worlds = [1, 2] if args.small else [int(w) for w in args.worlds.split(",") if w]
    model = MODEL_SMALL if args.small else MODEL_583M
    seq = 32 if args.small else args.seq_len
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    out.mkdir(parents=True, exist_ok=True)
    data, _ = prepare_data(out)
    lean = out / "ds_lean.json"
    lean.write_text(json.dumps(LEAN_DS, indent=1))

    # 1. One model, world 1..8, the default DeepSpeed JSON and environment.
    scaling = [measure("scale", model, w, seq, "fp32", str(lean), LEAN_ENV, data, out) for w in worlds]
    ran = _finished(scaling)
    setups = [max(r["setup_peak"]) for r in ran]
    shrinks = len(setups) >= 2 and all(b < a for a, b in zip(setups, setups[1:]))

    # 2. The largest MoE that trains at world 2 (lean JSON + fixed mmap threshold), per precision.
    largest: list[dict[str, Any]] = []
    layer_counts = [model["num_layers"]] if args.small else \
        [model["num_layers"]] + [int(x) for x in args.largest_layers.split(",") if x]
    for precision in args.precisions.split(","):
        for layers in layer_counts:
            m = {**model, "num_layers": layers}
            same = [r for r in scaling if r["world"] == 2 and precision == "fp32" and layers == model["num_layers"]]
            if same:  # the scaling table's world-2 run is this very run: reuse it (counted once in the plan error)
                row = {**same[0], "name": f"largest_{layers}l", "reused": True}
            else:
                row = measure(f"largest_{layers}l", m, 2, seq, precision, str(lean), LEAN_ENV, data, out)
            largest.append(row)
            if row.get("skipped") or not row.get("finite"):
                break
    # 3. The largest MoE with parameters and optimizer states swapped to NVMe, at world 2.
    nvme_layers = [model["num_layers"]] if args.small else [int(x) for x in args.nvme_layers.split(",") if x]
    nvme_root = Path(args.nvme_path) if args.nvme_path else out / "nvme"
    nvme = nvme_search(nvme_layers, model, seq, args.nvme_precision, data, out, nvme_root)
    result = {"scaling": scaling, "largest": largest, "shrinks": shrinks, "nvme": nvme}
    (out / "scale.json").write_text(json.dumps(result, indent=1))
    with open(out / "scale.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "world", "ep", "precision", "params", "setup_peak_max_MiB", "train_peak_max_MiB",
                     "train_peak_sum_MiB", "trainer_max_rss_MiB", "plan_host_MiB", "plan_setup_MiB", "skipped"])
        for r in scaling + largest + nvme:
            w.writerow([r["name"], r["world"], r["ep"], r["precision"], r["params"],
                        round(max(r.get("setup_peak") or [0]) / MIB), round(max(r.get("train_peak") or [0]) / MIB),
                        round(sum(r.get("train_peak") or [0]) / MIB), round(r.get("trainer_max_rss", 0) / MIB),
                        round(r["plan_host"] / MIB), round(r["plan_setup"] / MIB), r.get("skipped", "")])
    result["text"] = _report(result, args, seq, lean)
    print(result["text"])
    if args.write:
        png = DOC.parent / "scale.png"
        result["plot"] = _plot(scaling, png)
        append_section("Memory at scale", result["text"] + f"\n\n![peak RSS against world size](scale.png)\n\n"
                       f"Plot drawn with {result['plot']}; the numbers are in the tables above.\n")
    else:
        result["plot"] = _plot(scaling, out / "scale.png")
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return result


def _finished(scaling: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The scaling runs that count: finished with finite losses (a failed run's peaks are partial)."""
    return [r for r in scaling if r.get("setup_peak") and r.get("finite")]


def _report(result: dict[str, Any], args: argparse.Namespace, seq: int, lean: Path) -> str:
    scaling, largest = result["scaling"], result["largest"]
    rows = ["| world | EP | set-up peak, largest rank | set-up peak, summed | training peak, largest rank | "
            "training peak, summed | trainer max_rss_mb | plan (host, per rank) | plan / measured | load avg |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in scaling:
        if r.get("skipped") or not r.get("train_peak") or not r.get("finite"):
            why = r.get("skipped") or ("failed (peaks of a partial run left out)" if not r.get("ok") else
                                       "ran, loss not finite")
            rows.append(f"| {r['world']} | {r['ep']} | {why} |  |  |  |  | {_gib(r['plan_host'])} GiB |  |  |")
            continue
        tp = max(r["train_peak"])
        rows.append(f"| {r['world']} | {r['ep']} | {_gib(max(r['setup_peak']))} GiB | {_gib(sum(r['setup_peak']))} GiB "
                    f"| {_gib(tp)} GiB | {_gib(sum(r['train_peak']))} GiB | {_gib(r['trainer_max_rss'])} GiB "
                    f"| {_gib(r['plan_host'])} GiB | {r['plan_host'] / tp:.2f} | {r['busy']} |")
    ran = _finished(scaling)
    setups = ", ".join(f"{_gib(max(r['setup_peak']))}" for r in ran)
    shrink = (f"A rank's set-up peak shrinks with the world size: **{'yes' if result['shrinks'] else 'NO'}** "
              f"({setups} GiB at world {', '.join(str(r['world']) for r in ran)}).")
    measured = ran + [r for r in largest + result["nvme"]
                      if r.get("train_peak") and r.get("finite") and not r.get("skipped") and not r.get("reused")]
    errors = [abs(r["plan_host"] / max(r["train_peak"]) - 1) for r in measured]
    plan_v = (f"`ep-train plan --device cpu` error against the measured training peak {describe('scale_plan_error')}, "
              "every run (the largest-model runs included): ")
    if errors:
        plan_v += (f"**{target_verdict('scale_plan_error', max(errors))}** (largest error {max(errors):.0%}; "
                   f"{sum(target_verdict('scale_plan_error', e) == 'met' for e in errors)} of {len(errors)} runs within).")
    else:
        plan_v += "**not measured** (no run finished)."
    from ep_train.parallel.ds_memory import dedup_enabled

    # model-state bytes per parameter under the lean JSON (see the text below): the floor each precision meets
    dedup = dedup_enabled(LEAN_DS)
    floors = {"fp32": 16 if dedup else 24, "bf16": 18 if dedup else 20}
    lrows = ["| precision | layers | parameters | result | training peak, summed | bytes / parameter (summed) | "
             f"vs its floor ({floors['fp32']} B fp32, {floors['bf16']} B bf16) | plan (per rank) / measured | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    best: dict[str, dict[str, Any]] = {}
    for r in largest:
        layers = r["name"].split("_")[1]
        if r.get("skipped") or not r.get("train_peak"):
            why = r.get("skipped") or "failed"
            lrows.append(f"| {r['precision']} | {layers} | {r['params'] / 1e9:.3f}B | {why} |  |  |  |  |  |")
            continue
        total = sum(r["train_peak"])
        bpp = total / r["params"]
        ok = "trains, finite loss" if r.get("finite") else "ran, loss not finite" if r.get("ok") else "failed"
        lrows.append(f"| {r['precision']} | {layers} | {r['params'] / 1e9:.3f}B | {ok} | {_gib(total)} GiB | "
                     f"{bpp:.1f} | {bpp / floors[r['precision']]:.2f}x | {r['plan_host'] / max(r['train_peak']):.2f} | "
                     f"{r['seconds']:.0f} |")
        if r.get("finite") and (r["precision"] not in best or r["params"] > best[r["precision"]]["params"]):
            best[r["precision"]] = r
    verdicts = []
    bf = best.get("bf16")
    goal = f"Largest MoE trained in bf16 with CPU offload at world 2 {describe('scale_bf16_params')} parameters"
    tried_bf = [r for r in largest if r["precision"] == "bf16" and not r.get("skipped")]
    # the largest that trained is the memory limit only if a larger size was tried and failed
    bound = ("a larger one failed" if any(r["params"] > bf["params"] for r in tried_bf) else
             "the largest size tried; none failed, so the limit is above it") if bf else ""
    verdicts.append(f"{goal}: **{target_verdict('scale_bf16_params', bf['params'])}** (largest that trained: "
                    f"{bf['params'] / 1e9:.3f}B, {bound})" if bf else f"{goal}: **MISSED** (no bf16 run trained)")
    fp = next((r for r in largest if r["precision"] == "fp32" and r["name"] == "largest_8l" and r.get("finite")), None)
    if fp:
        bpp = sum(fp["train_peak"]) / fp["params"]
        verdicts.append(f"583M in fp32 at world 2, {describe('scale_fp32_bytes_per_param')} per parameter (summed "
                        f"over ranks): **{target_verdict('scale_fp32_bytes_per_param', bpp)}** ({bpp:.1f} bytes)")
    else:
        verdicts.append(f"583M in fp32 at world 2, {describe('scale_fp32_bytes_per_param')} per parameter: "
                        "**not measured**")
    nrows = ["| precision | layers | parameters | result | training peak, summed | bytes / parameter in RAM (summed) | "
             "swap files on disk | plan (per rank) / measured | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    nbest = None
    for r in result["nvme"]:
        layers = r["name"].split("_")[1]
        if r.get("skipped") or not r.get("train_peak"):
            nrows.append(f"| {r['precision']} | {layers} | {r['params'] / 1e9:.3f}B | {r.get('skipped') or 'failed'} "
                         "|  |  |  |  |  |")
            continue
        total = sum(r["train_peak"])
        ok = "trains, finite loss" if r.get("finite") else "ran, loss not finite" if r.get("ok") else "failed"
        nrows.append(f"| {r['precision']} | {layers} | {r['params'] / 1e9:.3f}B | {ok} | {_gib(total)} GiB | "
                     f"{total / r['params']:.1f} | {_gib(r.get('swap_bytes', 0))} GiB | "
                     f"{r['plan_host'] / max(r['train_peak']):.2f} | {r['seconds']:.0f} |")
        if r.get("finite") and (nbest is None or r["params"] > nbest["params"]):
            nbest = r
    goal = f"{TARGETS['scale_nvme_params'].what}: {describe('scale_nvme_params')} parameters"
    tried = [r for r in result["nvme"] if not r.get("skipped")]
    if nbest:
        sizes = f"{len(tried)} size{'s' if len(tried) > 1 else ''} tried"
        verdicts.append(f"{goal}: **{target_verdict('scale_nvme_params', nbest['params'])}** (largest tried that "
                        f"trained: {nbest['params'] / 1e9:.3f}B, {sizes})")
    elif tried:
        verdicts.append(f"{goal}: **MISSED** (no NVMe run trained)")
    else:
        verdicts.append(f"{goal}: **not measured** ({result['nvme'][0]['skipped'] if result['nvme'] else 'no size'})")
    return f"""`python bench/scale.py{' --small' if args.small else ''} --write` on {machine()}.
Every run: `ep_train.train` under torchrun, gloo, 1 thread per rank, {STEPS} steps, seq_len {seq}, micro batch 1,
activation checkpointing, CPU offload. Peaks are VmHWM of each rank process read from /proc by this script:
**set-up** at the moment rank 0 prints `training: world` (engine built, before step 1), **training** the
last reading before the ranks exit (every 0.2 s), or the rank's own reading after its last save where that is
larger (a short run can peak less than one poll before it exits); "trainer max_rss_mb" is the largest rank's
figure in the step logs.
"load avg" is the machine's 1-minute load average at the end of the run ({os.cpu_count()} cores; the run's own
processes, one per rank, count in it, so a world of 8 loads it to about 8 by itself; memory figures are per
process and not affected by it).

### One model against the world size

The {scaling[0]['params'] / 1e6:.1f}M-parameter MoE (hidden {(MODEL_SMALL if args.small else MODEL_583M)['hidden_size']}, {(MODEL_SMALL if args.small else MODEL_583M)['num_layers']} layers,
{(MODEL_SMALL if args.small else MODEL_583M)['num_experts']} experts of width {(MODEL_SMALL if args.small else MODEL_583M)['intermediate_size']}), EP = world (or the
largest EP dividing the experts), fp32, the lean DeepSpeed JSON and environment below (they let more of
these runs fit next to the other users of this machine).

{chr(10).join(rows)}

{shrink} {plan_v}

### The largest MoE at world 2

The 583M model's shape with more layers, fp32 and bf16 (`train.mixed_precision`), smallest first; the search
stops at the first size that fails or that the plan says would not fit next to the machine's other load.
A leaner DeepSpeed JSON (written by the script to its output folder):
`{json.dumps(LEAN_DS['zero_optimization'])}`, and the environment `{' '.join(f'{k}={v}' for k, v in LEAN_ENV.items())}`
(freed tensors above 1 MiB go back to the OS; `ep-train plan` reads the same variable).
Bytes per parameter are the training peaks summed over both ranks divided by the parameter count; the
floors are the model states alone, per parameter (below). DeepSpeed's
ZeRO-3 with optimizer offload holds per partition element: the parameter, an fp32 master clone (also in fp32),
a gradient-accumulation partition, a second fp32 gradient for the optimizer, two moments: 24 bytes in fp32,
20 in bf16. ep-train removes the duplicates (`ep_train/parallel/ds_memory.py`, on unless the DeepSpeed JSON
sets `"ep_train": {{"dedup_offload_buffers": false}}`): the fp32 master is the fp32 parameter partition and the
optimizer's gradient is the accumulation buffer, which bf16 runs then keep in fp32: 16 bytes in fp32 and 18 in
bf16 (bf16 parameter + fp32 master + fp32 gradient + two fp32 Adam moments), before the process baseline and
buffers. This run's JSON {'keeps that on' if dedup else 'turns that off'}: floors of {floors['fp32']} and {floors['bf16']} bytes.

{chr(10).join(lrows)}

### MoE with NVMe offload at world 2

The same shape with more layers ({', '.join(r['name'].split('_')[1] for r in result['nvme'])} tried, smallest first,
stopping at the first failure), {args.nvme_precision}, EP 1 (experts partitioned over both ranks: on CPU ep-train
refuses parameter swapping when a ZeRO group has one rank), parameters and optimizer states (fp32 masters, Adam
moments, the optimizer's fp32 gradients) swapped to files on this machine's disk through DeepSpeed's async I/O
(ZeRO-Infinity; `parallel.nvme_path`, `parallel.nvme_offload_optimizer`), no checkpoint at the end
(`train.save_at_end: false`: a checkpoint copies the optimizer's swap files, which would not fit on this
disk twice). The DeepSpeed JSON: `{json.dumps(NVME_DS['zero_optimization'])}`. "Swap files on disk" is the size of
the swap folder after the run; RAM holds the bf16/fp32 gradient accumulation partition, the swap buffers and the
activations. The plan's NVMe terms (DeepSpeed's pinned write-back buffer for swapped parameters, CPU Adam's
first-step moments of a sub-group, the swap buffers in the set-up peak) were added after measuring the 2.59B
run and a 583M run of this configuration (2026-11-28): its accuracy here is not an out-of-sample test.
Resuming this configuration from a checkpoint is tested at small size (tests/distributed/test_nvme.py).

{chr(10).join(nrows)}

{chr(10).join('- ' + v for v in verdicts)}
"""


if __name__ == "__main__":
    main()
