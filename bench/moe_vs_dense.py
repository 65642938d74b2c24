"""MoE against dense at matched *active* parameters: same data, token budget, schedule and seed.

    python bench/moe_vs_dense.py [--steps 400] [--experts 8] [--top-k 2] [--small] [--write]

Both models are configs/demo.yaml's shape (every FFN an MoE for the MoE model, plain SwiGLU for the
dense one) trained by ``ep-train train`` on the same tokenized standard-library text, 2 processes,
ZeRO-3 + CPU offload (the MoE at EP 2). The dense FFN is ``K x`` the expert width, so one token
touches the same number of FFN parameters in both (the router's E x D per layer is the only extra).
Reports validation loss over training, tokens/s, total and active parameters, and a loss-curve PNG;
every sentence of the write-up is computed from this run's figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import append_section, free_port, loss_of, machine, stdlib_data  # noqa: E402

PNG = ROOT / "docs" / "moe_vs_dense.png"



def shapes(experts: int, top_k: int, small: bool) -> dict[str, list[str]]:
    """Trainer overrides of the two models (demo.yaml otherwise)."""
    width = 32 if small else 256  # expert FFN width F
    common = ["--moe_layers", "null", "--moe_layer_frequency", "1"]
    if small:
        common += ["--hidden_size", "32", "--seq_len", "32", "--num_layers", "2"]
    moe = common + ["--num_experts", str(experts), "--num_experts_per_token", str(top_k),
                    "--intermediate_size", str(width), "--ep_size", "2"]
    dense = common + ["--num_experts", "0", "--intermediate_size", str(top_k * width), "--ep_size", "1"]
    return {"dense": dense, "moe": moe}


def run(name: str, extra: list[str], data: Path, tok: Path, out: Path, steps: int) -> dict:
    # --eval_batches 4: 4 global batches of 16 = the 64 validation windows the committed table was measured on
    # (before 2026-11-29 eval_batches counted micro-batches per rank, and this passed 8: 8 x 4 x 2 processes)
    run_dir = out / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "ep_train.train", "--config",
           str(ROOT / "configs/demo.yaml"), "--run-dir", str(run_dir), "--data_dir", str(data), "--tokenizer",
           str(tok), "--max_steps", str(steps), "--warmup_steps", str(max(1, min(20, steps // 10))),
           "--log_interval", "1", "--eval_interval", str(max(1, steps // 10)), "--eval_batches", "4",
           "--save_interval", "0", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"{name} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    val = [r for r in recs if "val_loss" in r]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    from ep_train.config import config_from_dict
    from ep_train.sizes import model_size

    size = model_size(config_from_dict(json.loads((run_dir / "config.json").read_text())))
    return {"train": [(r["tokens"], loss_of(r)) for r in train],
            "val": [(r["tokens"], loss_of(r, "val_loss")) for r in val],
            "tok_s": statistics.median(r["tokens_per_sec"] for r in train[min(3, len(train) - 1):]),
            "total": size.total, "active": size.active}


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        tokens, loss = zip(*r["train"])
        line, = ax.plot(tokens, loss, alpha=0.35, lw=0.8, label=f"{name} train")
        if r["val"]:
            vt, vl = zip(*r["val"])
            ax.plot(vt, vl, "o-", color=line.get_color(), label=f"{name} validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_title("MoE vs dense at matched active parameters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reading(r: dict[str, dict]) -> str:
    d, m = r["dense"], r["moe"]
    dv, mv = d["val"][-1][1], m["val"][-1][1]
    better = "lower" if mv < dv else "higher"
    return (f"At {m['active'] / d['active']:.3f}x the dense model's active parameters and "
            f"{m['total'] / d['total']:.2f}x its total, the MoE's final validation loss is {mv:.4f} against "
            f"{dv:.4f}: {abs(mv - dv):.4f} {better} (perplexity {math.exp(mv):.1f} vs "
            f"{math.exp(dv):.1f}), after the same {d['val'][-1][0]:,} tokens. It trains at "
            f"{m['tok_s'] / d['tok_s']:.2f}x the dense model's tokens/s on this machine.")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="a toy size for the test (seconds)")
    ap.add_argument("--write", action="store_true", help="write the section and PNG into docs/")
    ap.add_argument("--out", help="keep the runs here (default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    tmp = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_moe_dense_"))
    tmp.mkdir(parents=True, exist_ok=True)
    packages = ["json", "email"] if args.small else ["json", "email", "asyncio", "logging", "unittest", "http", "xml"]
    tok, data = stdlib_data(tmp, packages, 1000 if args.small else 4096, val_fraction=0.05)
    steps = 6 if args.small else args.steps
    extra = ["--vocab_size", "1000"] if args.small else []
    results = {name: run(name, extra + ov, data, tok, tmp, steps)
               for name, ov in shapes(args.experts, args.top_k, args.small).items()}
    rows = ["| model | total params | active per token | tokens/s (median) | final val loss | best val loss |",
            "|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['total']:,} | {r['active']:,} | {r['tok_s']:,.0f} | {r['val'][-1][1]:.4f} | "
                    f"{min(v for _, v in r['val']):.4f} |")
    text = "\n".join(rows) + "\n\n" + reading(results)
    print(text)
    if args.write:
        plot(results, PNG)
        cmd = f"python bench/moe_vs_dense.py --steps {steps} --experts {args.experts} --top-k {args.top_k}"
        append_section("MoE vs dense at matched active parameters",
                       f"`{cmd}` ({machine()}). configs/demo.yaml's shape with every FFN an MoE of {args.experts} "
                       f"experts, top-{args.top_k}, against a dense SwiGLU {args.top_k}x as wide; same data "
                       "(standard-library text), batch, schedule and seed; 2 processes, ZeRO-3 + CPU offload.\n\n"
                       + text + "\n\n![loss curves](moe_vs_dense.png)")
    elif args.small:
        plot(results, tmp / "moe_vs_dense.png")
    if not args.out:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
