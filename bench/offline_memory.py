"""Memory of the offline tools at scale, in the one process each runs in: the universal conversion (resharded
resumes, exports, generation) and the expert analysis, against the model's size.

    python bench/offline_memory.py [--small] [--write] [--layers 4,8] [--out DIR]

Conversion: DeepSpeed 0.19.8's converter as shipped, and as ep-train runs it (ep_train/interop/universal.py
``_bounded_memory``: mapped loads, one expert parameter at a time, no optimizer shard in optimizer_state.pt).
Analysis: the routing of ``analyze-experts`` from the whole model built in the process (what it did before
2026-11-28) and block by block (``ep_train.model.init.blockwise``, what it does now).

Models: the 583M shape of bench/scale.py with 4 and 8 layers, trained 3 steps at world 2, EP 2,
ZeRO-3 + CPU offload, fp32, saved at the end. Each tool runs in its own process on the same checkpoint,
sampled from outside every 0.1 s: ``VmHWM`` (the kernel's peak RSS; it counts the resident pages of
memory-mapped files, which the kernel can drop and read again) and the largest ``RssAnon`` read (memory
that only the process can give back). The two conversions are compared file by file, tensor by tensor; the
two analyses expert id by expert id.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, publish  # noqa: E402
from bench.targets import describe  # noqa: E402
from bench.targets import verdict as target_verdict  # noqa: E402
from bench.scale import (GIB, LEAN_DS, LEAN_ENV, MIB, MODEL_583M, MODEL_SMALL, RESERVE, _mem_available,  # noqa: E402
                         _cfg, _overrides, _status_kib, prepare_data, run_trainer)

LAYERS = (4, 8)
CONVERTERS = ("deepspeed", "ep-train")
ANALYSES = ("whole model", "block by block")
ANALYSIS_TOKENS = 4096


def convert(which: str, step: Path, out: Path) -> None:
    """Runs in the measured process: one converter, ``step`` -> ``out``."""
    if which == "ep-train":
        from ep_train.interop.universal import to_universal

        to_universal(step, out)
        return
    from deepspeed.checkpoint import ds_to_universal

    from ep_train.train.checkpoint import only_safe_loads

    with only_safe_loads():  # what ep-train ran before _bounded_memory: the converter as shipped, safe loads
        ds_to_universal.main(argparse.Namespace(input_folder=str(step), output_folder=str(out), num_extract_workers=1,
                                                num_merge_workers=1, keep_temp_folder=False, strict=True,
                                                inject_missing_state=False))


def routing(which: str, step: Path, data: Path, out: Path) -> None:
    """Runs in the measured process: analyze-experts' routing of ``step`` over ``data``, saved to ``out``."""
    import numpy as np

    from ep_train.analyze import _batches, collect_routing
    from ep_train.api import load

    loaded = load(step, lazy=which == "block by block")
    batches, _ = _batches(str(data), None, loaded.config.data.seq_len, ANALYSIS_TOKENS)
    layers, _ = collect_routing(loaded.model, batches, loaded.source, loaded.expert_bias)
    np.savez(out, **{f"{i}_{k}": v for i, d in layers.items() for k, v in d.items()})


def measured(mode: str, which: str, *paths: Path) -> dict[str, Any]:
    """``convert`` or ``routing`` (``mode``) in a child process, sampled from outside; ``paths[-1]`` is its output."""
    cmd = [sys.executable, "-m", "bench.offline_memory", f"--{mode}", which, *map(str, paths)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak = {"VmHWM": 0, "RssAnon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key in peak:
                kib = _status_kib(proc.pid, key)
                if kib is not None:
                    peak[key] = max(peak[key], kib * 1024)
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log, _ = proc.communicate()
    done.set()
    sampler.join()
    out = paths[-1]
    row = {"tool": mode, "which": which, "ok": proc.returncode == 0, "seconds": time.monotonic() - t0,
           "peak_rss": peak["VmHWM"], "peak_anon": peak["RssAnon"],
           "out_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else 0}
    if proc.returncode != 0:
        row["error"] = log[-2000:]
    return row


def _flat(x: Any, path: str = "") -> Any:
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _flat(v, f"{path}/{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _flat(v, f"{path}[{i}]")
    else:
        yield path, x


def differences(stock: Path, ours: Path) -> list[str]:
    """What differs between two universal folders, file by file and tensor by tensor (bitwise). ep-train's
    optimizer_state.pt keeps only what DeepSpeed's universal loader reads: what it drops must be tensors of
    more than one element (rank 0's shard), and the step counts must stay."""
    import torch

    from ep_train.train.checkpoint import safe_load_mapped

    files = sorted(str(f.relative_to(stock)) for f in stock.rglob("*") if f.is_file())
    other = sorted(str(f.relative_to(ours)) for f in ours.rglob("*") if f.is_file())
    if files != other:
        return [f"file lists differ: {sorted(set(files) ^ set(other))[:5]}"]
    out = []
    for f in files:
        want = dict(_flat(safe_load_mapped(stock / f)))
        got = dict(_flat(safe_load_mapped(ours / f)))
        if f == "zero/optimizer_state.pt":
            dropped = set(want) - set(got)
            out += [f"{f}{k}: dropped, not a shard tensor" for k in sorted(dropped)
                    if not (torch.is_tensor(want[k]) and want[k].numel() > 1)]
            if not dropped or not any("step" in k for k in got):
                out.append(f"{f}: drops nothing, or the step counts")
            want = {k: v for k, v in want.items() if k not in dropped}
        if want.keys() != got.keys():
            out.append(f"{f}: keys differ: {sorted(set(want) ^ set(got))[:5]}")
            continue
        for k, v in want.items():
            # DeepSpeed's loss scaler compares by identity: its repr holds its settings
            same = (torch.is_tensor(got[k]) and v.dtype == got[k].dtype and torch.equal(v, got[k])) \
                if torch.is_tensor(v) else (v == got[k] or repr(v) == repr(got[k]))
            if not same:
                out.append(f"{f}{k}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="the tiny model of bench/scale.py, 1 and 2 layers")
    ap.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    ap.add_argument("--layers", default=",".join(map(str, LAYERS)), help="layer counts of the 583M shape")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one, removed at the end)")
    ap.add_argument("--convert", nargs=3, metavar=("WHICH", "STEP", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--routing", nargs=4, metavar=("WHICH", "STEP", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.convert:
        convert(args.convert[0], Path(args.convert[1]), Path(args.convert[2]))
        return {}
    if args.routing:
        routing(args.routing[0], *map(Path, args.routing[1:]))
        return {}
    import numpy as np

    from ep_train.interop.universal import to_universal
    from ep_train.sizes import model_size

    model = MODEL_SMALL if args.small else MODEL_583M
    layer_counts = [1, 2] if args.small else [int(x) for x in args.layers.split(",") if x]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_convert_"))
    out.mkdir(parents=True, exist_ok=True)
    data, _ = prepare_data(out)
    lean = out / "ds_lean.json"
    lean.write_text(json.dumps(LEAN_DS, indent=1))
    rows: list[dict[str, Any]] = []
    analyses: list[dict[str, Any]] = []
    for layers in layer_counts:
        m = {**model, "num_layers": layers}
        run = out / f"run_{layers}l"
        res = run_trainer(run, data, 2, _overrides(m, 2, 2, 32 if args.small else 128, "fp32"), str(lean),
                          env=LEAN_ENV, keep_checkpoints=True)
        if not res.ok:
            raise RuntimeError(f"training the {layers}-layer model failed:\n{res.error}")
        [step] = sorted((run / "checkpoints").glob("step_*"))
        params = model_size(_cfg(m, 2, 2, 128, "fp32", str(lean))).total
        optim = sum(f.stat().st_size for f in step.glob("*_optim_states.pt"))
        pair = {}
        for which in CONVERTERS:
            dest = out / f"universal_{layers}l_{which}"
            shutil.rmtree(dest, ignore_errors=True)
            need = 2.2 * optim if which == "deepspeed" else GIB  # DeepSpeed's: every shard + the expert copies
            if need + RESERVE > _mem_available():
                row = {"tool": "convert", "which": which, "ok": False,
                       "skipped": f"not run: needs about {need / GIB:.1f} GiB and "
                                  f"{_mem_available() / GIB:.1f} GiB were available"}
            else:
                row = measured("convert", which, step, dest)
            row.update(layers=layers, params=params, optim_bytes=optim)
            print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
            rows.append(row)
            pair[which] = row
        if all(r["ok"] for r in pair.values()):
            diff = differences(out / f"universal_{layers}l_deepspeed", out / f"universal_{layers}l_ep-train")
            pair["ep-train"]["same_as_deepspeed"] = not diff
            pair["ep-train"]["differences"] = diff[:5]
        for which in CONVERTERS:
            shutil.rmtree(out / f"universal_{layers}l_{which}", ignore_errors=True)
        to_universal(step)  # what both analyses read (cached in the step folder)
        got = {}
        for which in ANALYSES:
            npz = out / f"routing_{layers}l_{which.replace(' ', '_')}.npz"
            row = measured("routing", which, step, data, npz)
            row.update(layers=layers, params=params)
            print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
            analyses.append(row)
            if row["ok"]:
                got[which] = dict(np.load(npz))
        if len(got) == 2:
            a, b = got.values()
            analyses[-1]["same_as_whole"] = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    result = {"rows": rows, "growth": _growth(rows), "analyses": analyses, "analysis_growth": _growth(analyses, 4)}
    result["text"] = _report(result, args)
    publish("Offline tools at scale", result["text"], args.write, None if args.out else out)
    return result


def _growth(rows: list[dict[str, Any]], bytes_per_param: int | None = None) -> dict[str, float]:
    """Per tool: extra peak RssAnon per extra byte of the model, smallest to largest model (the checkpoint's
    optimizer states; with ``bytes_per_param``, its parameters at that many bytes each)."""
    def size(r: dict[str, Any]) -> int:
        return r["params"] * bytes_per_param if bytes_per_param else r["optim_bytes"]

    growth = {}
    for which in dict.fromkeys(r["which"] for r in rows):
        ran = sorted((r for r in rows if r["which"] == which and r["ok"]), key=size)
        if len(ran) >= 2 and size(ran[-1]) > size(ran[0]):
            growth[which] = (ran[-1]["peak_anon"] - ran[0]["peak_anon"]) / (size(ran[-1]) - size(ran[0]))
    return growth


def _report(result: dict[str, Any], args: argparse.Namespace) -> str:
    model = MODEL_SMALL if args.small else MODEL_583M
    head = (f"`python bench/offline_memory.py{' --small' if args.small else ''}` on {machine()}.\n"
            f"The shape of bench/scale.py's 583M MoE (hidden {model['hidden_size']}, {model['num_experts']} experts "
            f"of width {model['intermediate_size']}, vocab {model['vocab_size']}) with the layer counts below, "
            "trained 3 steps at world 2, EP 2, ZeRO-3 + CPU offload, fp32, and saved. Each tool runs in its own "
            "process, sampled every 0.1 s. \"Peak RSS\" is VmHWM, which counts resident pages of memory-mapped "
            "files (page cache the kernel can drop); \"peak anonymous\" is the largest RssAnon read, memory only the "
            "process can give back.\n\n"
            "**Conversion** to DeepSpeed's universal form (what resharded resumes, `ep-train convert to-hf` and "
            "generation read): \"deepspeed\" is DeepSpeed 0.19.8's `ds_to_universal` as shipped (what ep-train "
            "ran before 2026-11-28); \"ep-train\" is `interop/universal.py` (`_bounded_memory`).\n")
    lines = _table(["optimizer states in the checkpoint", "converter"], ["output", "output equal to DeepSpeed's"],
                   result["rows"], lambda r: f"{r['optim_bytes'] / GIB:.2f} GiB",
                   lambda r: f"{r['out_bytes'] / GIB:.2f} GiB", "same_as_deepspeed")
    tail = _verdict(result["growth"], "ep-train", "the checkpoint (extra bytes per extra byte of optimizer states",
                    "ep-train's conversion memory does not grow with the model's optimizer states")
    tail.append("The output of ep-train's conversion is DeepSpeed's minus rank 0's optimizer shard in "
                "`zero/optimizer_state.pt` (the universal loader reads that file on every rank for its scalars, "
                "parameter groups and step counts only): the \"output\" column's difference.")
    part2 = (f"**Analysis**: the routing `ep-train analyze-experts` records, over {ANALYSIS_TOKENS:,} tokens of the "
             "data's validation split, from the converted checkpoint: \"whole model\" builds the model in the process "
             "(what analyze-experts did before 2026-11-28), \"block by block\" runs it one block at a time "
             "(`ep_train.model.init.blockwise`, what it does now).\n")
    rows2 = _table(["fp32 parameters", "analysis"], ["routing equal to the whole model's"], result["analyses"],
                   lambda r: f"{r['params'] * 4 / GIB:.2f} GiB", None, "same_as_whole")
    tail2 = _verdict(result["analysis_growth"], "block by block",
                     "the model (extra bytes per extra byte of fp32 parameters",
                     "The block-by-block analysis's memory does not grow with the model")
    return (head + "\n" + "\n".join(lines) + "\n\n" + " ".join(tail) + "\n\n" + part2 + "\n" + "\n".join(rows2)
            + "\n\n" + " ".join(tail2))


def _table(middle: list[str], last: list[str], rows: list[dict[str, Any]], size: Callable[[dict[str, Any]], str],
           extra: Callable[[dict[str, Any]], str] | None, same_key: str) -> list[str]:
    """A markdown table of measured rows: layers, parameters, the ``middle`` columns (a size, the tool), the
    measured memory and time, then the ``last`` columns (``extra``'s cell if any, and the ``same_key`` verdict)."""
    head = ["layers", "parameters", *middle, "peak anonymous", "peak RSS", "seconds", *last]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["layers"]), f"{r['params']:,}", size(r), r["which"]]
        if not r["ok"]:
            cells += [_why(r)] + [""] * (len(head) - len(cells) - 1)
        else:
            cells += [f"{r['peak_anon'] / MIB:,.0f} MiB", f"{r['peak_rss'] / MIB:,.0f} MiB", f"{r['seconds']:.0f}",
                      *([extra(r)] if extra else []), {True: "yes", False: "**NO**", None: ""}[r.get(same_key)]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _why(r: dict[str, Any]) -> str:
    return r.get("skipped") or "failed: " + r.get("error", "")[-200:].replace("\n", " ").replace("|", "/")


def _verdict(growth: dict[str, float], ours: str, against: str, claim: str) -> list[str]:
    out = [f"Peak anonymous memory grows with {against}, smallest to largest model): "
           + ", ".join(f"{k} {v:.2f}" for k, v in growth.items()) + "."] if growth else []
    # the goal's line is always written: a run that could not measure it says so instead of leaving it out
    verdict = (f"**{target_verdict('offline_memory_growth', growth[ours])}**" if ours in growth else
               "**not measured** (fewer than two sizes of it finished)")
    out.append(f"{claim} (growth {describe('offline_memory_growth')}, bench/targets.py): {verdict}.")
    return out


if __name__ == "__main__":
    main()
