"""bench/gpu_check.py's section 5: ep-train's two expert paths on one GPU, across expert shapes.

GroupedExperts computes its experts either with torch._grouped_mm (one kernel per matmul for all local
experts) or with one cuBLAS matmul per expert (``_ExpertLoop``, its hand-written backward). Which is faster
depends on the shape: a few large experts (Mixtral) or many small ones (fine-grained MoEs), and on how many
of them one GPU holds under expert parallelism. This section times both paths, forward + backward with
weight gradients, bf16, on the same rows and weights, at shapes that span those cases; it reports the times
and which path ep-train's default (``experts._use_grouped_mm``) takes, and judges that default: within
``TOLERANCE`` of the faster path at every shape.

    python bench/gpu_experts.py [--cpu-dry-run]   # alone; gpu_check.py runs it as a section

Shape legend: E_l experts on the GPU, D model dim, F expert FFN dim, R rows per expert on average.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.gpu_check import allow_grouped_mm_on_cpu, expert_matmul_flops, md_table, time_steps  # noqa: E402
from bench.targets import TARGETS, beside  # noqa: E402  (the one table of targets)

# (name, E_l, D, F, R): Mixtral 8x7B (16k tokens x top-2 over 8 experts: R 4096) on one GPU and under EP 4
# and 8; a DeepSeek-MoE-16B-like fine-grained layer (64 experts of F 1408, top-6: R 1536) on one GPU and under
# EP 4, 8 and 32. The EP 8 / EP 32 rows were added when experts.LOOP_MAX_LOCAL_EXPERTS sent one or two experts
# per GPU to the loop: the fine-grained two-expert row found that rule 1.64x off (2026-11-28).
SHAPES: list[tuple[str, int, int, int, int]] = [
    ("Mixtral 8x7B, 8 experts per GPU", 8, 4096, 14336, 4096),
    ("Mixtral 8x7B, EP 4: 2 experts per GPU", 2, 4096, 14336, 4096),
    ("Mixtral 8x7B, EP 8: 1 expert per GPU", 1, 4096, 14336, 4096),
    ("fine-grained (DeepSeek-MoE-16B-like), 64 experts per GPU", 64, 2048, 1408, 1536),
    ("fine-grained, EP 4: 16 experts per GPU", 16, 2048, 1408, 1536),
    ("fine-grained, EP 8: 8 experts per GPU", 8, 2048, 1408, 1536),
    ("fine-grained, EP 32: 2 experts per GPU", 2, 2048, 1408, 1536),
]
DRY_SHAPES: list[tuple[str, int, int, int, int]] = [("dry, 8 experts", 8, 64, 128, 64),
                                                    ("dry, 2 experts", 2, 64, 128, 64),
                                                    ("dry, 1 expert", 1, 64, 128, 64)]
TOLERANCE = TARGETS["gpu_expert_path"].value  # the default path's time over the faster path's, at most
GROUPED, LOOP = "grouped_mm", "per-expert loop"


def uneven_counts(total: int, experts: int, seed: int) -> list[int]:
    """``total`` rows over ``experts`` groups, unevenly (each group 0.5x to 1.5x the mean), summing exactly."""
    import torch

    g = torch.Generator().manual_seed(seed)
    p = torch.rand(experts, generator=g) + 0.5
    counts = [int(c) for c in (p / p.sum() * total).floor().tolist()]
    counts[-1] += total - sum(counts)
    return counts


def worker(out_path: Path, dry: bool, iters: int = 5, warmup: int = 2) -> None:
    """Time both paths at every shape; one JSON line per measurement (flushed: a kill keeps the rest)."""
    import torch

    import ep_train.model.experts as experts_mod
    from ep_train.model.experts import GroupedExperts

    cuda = torch.cuda.is_available() and not dry
    dev = torch.device("cuda" if cuda else "cpu")
    real_ok, real_use = experts_mod._grouped_mm_ok, experts_mod._use_grouped_mm
    if not cuda:
        allow_grouped_mm_on_cpu(experts_mod)
    calls, real_gmm = [0], torch._grouped_mm

    def spy(*a: Any, **kw: Any) -> torch.Tensor:
        calls[0] += 1
        return real_gmm(*a, **kw)

    torch._grouped_mm = spy
    try:
        with open(out_path, "a") as fh:
            for name, e, d, f, r in SHAPES if cuda else DRY_SHAPES:
                counts = uneven_counts(e * r, e, seed=e)
                ex = GroupedExperts(d, f, e).to(dev, torch.bfloat16)
                for w in ex.parameters():
                    torch.nn.init.normal_(w, std=0.02)
                x = torch.randn(sum(counts), d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                dy = torch.randn_like(x)
                rec: dict[str, Any] = {"shape": name, "experts": e, "dim": d, "ffn": f, "rows": sum(counts),
                                       "default": GROUPED if real_use(x, ex.w1, ex.w2, ex.w3) else LOOP}

                def step() -> None:
                    ex(x, counts).backward(dy)
                    x.grad = None
                    for w in ex.parameters():
                        w.grad = None

                for path, use in ((GROUPED, experts_mod._grouped_mm_ok), (LOOP, lambda *a: False)):
                    experts_mod._use_grouped_mm = use  # force the path (grouped_mm only where it can run)
                    calls[0] = 0
                    rec[path] = statistics.median(time_steps(step, cuda, iters, warmup))
                    rec[f"{path} calls"] = calls[0]  # torch._grouped_mm calls: which path really ran
                experts_mod._use_grouped_mm = real_use
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                print(json.dumps(rec), flush=True)
                del ex, x, dy
                if cuda:
                    torch.cuda.empty_cache()
    finally:
        experts_mod._grouped_mm_ok, experts_mod._use_grouped_mm = real_ok, real_use
        torch._grouped_mm = real_gmm


def summarize(recs: list[dict[str, Any]], peak: float | None) -> tuple[str, str, str]:
    """(status, key line, markdown body) from the worker's records; the verdict is computed here."""
    rows, worst = [], None
    for r in recs:
        fast = min(r[GROUPED], r[LOOP])
        over = r[r["default"]] / fast  # the default's time over the faster path's
        worst = over if worst is None else max(worst, over)
        fl = expert_matmul_flops(r["rows"], 1, r["dim"], r["ffn"], backward=True)  # rows: tokens x top-k already
        mfu = {p: (fl / (r[p] * 1e-3) / 1e12 / peak if peak else None) for p in (GROUPED, LOOP)}
        rows.append([r["shape"], r["experts"], r["dim"], r["ffn"], r["rows"],
                     *(f"{r[p]:.2f}" + ("" if mfu[p] is None else f" ({100 * mfu[p]:.0f}%)") for p in (GROUPED, LOOP)),
                     f"{r[LOOP] / r[GROUPED]:.2f}", r["default"], f"{over:.2f}"])
    if not recs:
        return "FAIL", "no measurement", "The worker measured nothing."
    # Records without the call counts predate them (2026-11-27's H200 run): not judged on this.
    ran_grouped = all(r.get(f"{GROUPED} calls", 1) > 0 for r in recs)
    ok = worst is not None and worst <= TOLERANCE and ran_grouped
    shown = "n/a" if worst is None else beside(worst, TOLERANCE, 2, suffix="x")  # 1.054 is not "1.05x: MISSED"
    head = ["shape", "E_l", "D", "F", "rows", f"{GROUPED} ms (MFU)", f"{LOOP} ms (MFU)", "loop / grouped",
            "ep-train's default", "default / faster"]
    body = ("Forward + backward (weight gradients included) of the experts alone, bf16, uneven rows per expert "
            "(0.5x-1.5x the mean), median of 5 after 2 warm-ups; MFU = the three matmuls' FLOPs (x3 with "
            f"backward) over the time, against a peak of {peak} TFLOP/s.\n\n" + md_table(head, rows) +
            f"\n\n- goal (ep-train's default path within {TOLERANCE:.2f}x of the faster path at every shape; worst "
            f"{shown}): **{'met' if ok else 'MISSED'}**"
            + ("" if ran_grouped else "\n- torch._grouped_mm was NOT called in the grouped_mm column: both columns "
               "timed the loop"))
    key = f"default path within {TOLERANCE:.2f}x of the faster at every shape (worst {shown}): " + \
        ("met" if ok else "MISSED") + ("" if ran_grouped else "; torch._grouped_mm NOT used (not sm90+ bf16?)")
    return ("PASS" if ok else "FAIL"), key, body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--out", default="runs/gpu_experts.jsonl")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    worker(out, args.cpu_dry_run)
    recs = [json.loads(ln) for ln in out.read_text().splitlines() if ln.strip()]
    print(summarize(recs, None)[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
