"""Where one training step goes: expert matmuls, dense matmuls, all-to-all, ZeRO gathers and
reduce-scatters, other all-reduces, the optimizer step, other.

    python bench/step_breakdown.py [--small] [--write] [--out DIR] [--lean-env] [--repeats N]

Runs ``ep_train.train`` under torchrun as bench/scale.py runs its 583M model (hidden 1024, 8 layers,
8 experts of width 2816, vocab 4096; world 2, EP 2, fp32, ZeRO-3 + CPU offload with scale.py's lean
DeepSpeed JSON, activation checkpointing, seq_len 128, micro batch 1), 3 steps, the last under
torch.profiler (``train.profile_step``): the trainer writes ``run_dir/profile/rank{r}_step3.json``
(Chrome trace) per rank, and this script classifies it. It makes ``--repeats`` such runs one after another
(3 by default): one profiled step varies from run to run by a few points of share (where the ranks wait moves),
so the table and the verdict are those of the median run (the lower middle one for an even N), and every
run's figure is listed beside it. The processes run with glibc's default malloc
settings, as a user's run does; ``--lean-env`` uses scale.py's ``LEAN_ENV`` instead (a 1 MiB mmap
threshold, chosen there so RSS follows the live tensors: every larger tensor is then a fresh mapping whose
pages are faulted in, which costs time that shows up as "other").

Method. Only the main thread of each rank is read (it runs forward, backward and the optimizer; gloo's
worker threads only carry the collectives the main thread waits on). Its events nest; every
microsecond of the step belongs to the innermost event running then (its *self time*: duration minus
its children's), and the step's wall time is the profiler's top-level event, so the categories are
disjoint and sum to the step exactly; time in no recorded op (Python between ops) is the top-level
event's self time and goes to "other". An event's category is the first of these rules that names it,
else its parent's (innermost wins):

- all-to-all: the ``ep_train.all_to_all`` scope (ep_train/parallel/dispatch.py: token, count and
  membership exchanges, forward and backward) and any other ``alltoall`` op;
- ZeRO gathers: ``allgather`` / ``all_gather`` ops (DeepSpeed's ZeRO-3 parameter fetches);
- ZeRO reduce-scatters: ``reduce_scatter`` ops (gradient partitioning);
- other all-reduces: ``allreduce`` ops (gradient norm / overflow check, the trainer's metrics);
- expert matmuls: ``aten::mm/bmm/addmm(_)/matmul/linear/_grouped_mm`` (and what runs inside them) under
  the ``ep_train.experts`` scope (ep_train/model/experts.py), or under an autograd backward node whose
  sequence number is that of an op recorded under that scope (the experts' backward);
- dense matmuls: the same ops anywhere else (attention projections and attention's own matmuls, the
  dense FFN layers, the router, the LM head), forward and backward; a fused attention kernel
  (``FUSED_ATTENTION``: its two matmuls and the softmax between them in one op) counts here;
- optimizer: the rest of ``engine.step()`` (the trainer's ``ep_train.optimizer_step`` scope: CPU Adam,
  the gradient norm, the copies between fp32 partitions and parameters);
- other: everything else (element-wise ops, SwiGLU's activation, norms, softmax, routing, dispatch
  bookkeeping, ZeRO-3's hooks and bucket copies, autograd overhead, Python).

Collective ops on gloo include the time a rank waits for the other to arrive, so load imbalance shows
as collective time. A waited-on collective is not always inside its op's event: c10d's recorded op
(``c10d::_reduce_scatter_base_``, ...) returns once the work is queued, and DeepSpeed's synchronous call
then blocks in ``work.wait()``, which records nothing, so the wait is the caller's self time (under
``AccumulateGrad``, where ZeRO-3's gradient hooks run). The caller's self time from the end of a
collective op to its next recorded op (or its own end) therefore goes to that collective's category
(``collective_waits`` in the JSON; the few microseconds of Python there go with it). The goal
(bench/targets.py ``step_non_matmul_share``) is judged on the mean of the ranks' shares outside the
matmuls and the all-to-all.

Waiting for a slower rank. A collective's time on one rank is the transfer plus the time it waited for the
others to arrive. The ranks' traces share one clock and make the same collective calls in the same order,
so ``arrival_waits`` pairs the i-th c10d op of every rank and counts, for each rank, the last arrival minus
its own (at most its time in that call). That part is uneven work between two collectives, reported
beside the table; the categories and the goal are unchanged by it.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, publish  # noqa: E402
from bench.scale import (LEAN_DS, LEAN_ENV, MODEL_583M, MODEL_SMALL, STEPS, _overrides, plan_host,  # noqa: E402
                         prepare_data, run_trainer)
from bench.targets import TARGETS, describe, figure, verdict  # noqa: E402

CATEGORIES = ("expert matmuls", "dense matmuls", "all-to-all", "ZeRO gathers", "ZeRO reduce-scatters",
              "other all-reduces", "optimizer", "other")
MATMUL_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::matmul",
              "aten::linear", "aten::_grouped_mm", "aten::mv", "aten::addmv", "aten::dot"}
# Fused attention kernels, forward and backward (SDPA's CPU flash kernel; CUDA's flash, memory-efficient and
# cuDNN kernels): the attention's own matmuls with the softmax between them in one op, counted with the dense
# matmuls. Not SDPA's math fallback (_scaled_dot_product_attention_math): it runs bmm and softmax as ops.
FUSED_ATTENTION = ("aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
                   "aten::_scaled_dot_product_cudnn_attention", "aten::_flash_attention",
                   "aten::_efficient_attention")

EXPERT_SCOPE, A2A_SCOPE, OPT_SCOPE = "ep_train.experts", "ep_train.all_to_all", "ep_train.optimizer_step"
BACKWARD = "autograd::engine::evaluate_function:"
COLLECTIVES = ("all-to-all", "ZeRO gathers", "ZeRO reduce-scatters", "other all-reduces")


def _is_matmul(name: str) -> bool:
    return name in MATMUL_OPS or name.startswith(FUSED_ATTENTION)


def _own_label(e: dict[str, Any], expert_seq: set[int]) -> str | None:
    """The category an event names itself, or a context marker ('expert scope'), or None (inherit)."""
    name = e["name"]
    low = name.lower()
    if name == A2A_SCOPE or "alltoall" in low or "all_to_all" in low:
        return "all-to-all"
    if "allgather" in low or "all_gather" in low:
        return "ZeRO gathers"
    if "reduce_scatter" in low or "reducescatter" in low:
        return "ZeRO reduce-scatters"
    if "allreduce" in low or "all_reduce" in low:
        return "other all-reduces"
    if _is_matmul(name):
        return "matmul"
    if name == EXPERT_SCOPE or (name.startswith(BACKWARD) and e.get("args", {}).get("Sequence number") in expert_seq):
        return "expert scope"
    if name == OPT_SCOPE or name.startswith("Optimizer.step#"):
        return "optimizer"
    return None


def _main_thread(trace: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The profiled step's top-level event and the events of the thread that ran the step, in time order."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    roots = [e for e in events if str(e["name"]).startswith(("PyTorch Profiler", "ProfilerStep"))]
    root = max(roots, key=lambda e: e["dur"])
    by_tid: dict[Any, list[dict[str, Any]]] = {}
    for e in events:
        if e is not root and e.get("cat") in ("cpu_op", "user_annotation"):
            by_tid.setdefault(e["tid"], []).append(e)
    main = max(by_tid.values(), key=lambda es: sum(e["dur"] for e in es))  # the thread that ran the step
    main.sort(key=lambda e: (e["ts"], -e["dur"]))
    return root, main


def _matmul_time(main: list[dict[str, Any]], windows: list[tuple[float, float]]) -> list[float]:
    """Microseconds of matmul ops (outermost ones) of the main thread starting inside each [a, b) window."""
    spans, end = [], -1.0
    for e in main:
        if _is_matmul(e["name"]) and e["ts"] >= end:
            spans.append((e["ts"], e["dur"]))
            end = e["ts"] + e["dur"]
    starts = [t for t, _ in spans]
    return [sum(d for _, d in spans[bisect.bisect_left(starts, a):bisect.bisect_left(starts, b)]) for a, b in windows]


def _collective_calls(root: dict[str, Any], main: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(op name, arrival, time in it) of each c10d op of the step's main thread, in call order (microseconds).
    The time in it runs from the op's start to the thread's next recorded event after the op returned, or
    the end of the event the op ran in if that comes first: the op and the wait after it, as ``classify``
    counts them (see the module doc)."""
    t0, t1 = root["ts"], root["ts"] + root["dur"]
    starts = [e["ts"] for e in main]
    calls = []
    stack: list[float] = []  # ends of the events enclosing the current one
    for e in main:
        while stack and e["ts"] >= stack[-1]:
            stack.pop()
        if str(e["name"]).startswith("c10d::") and t0 <= e["ts"] < t1:
            end = e["ts"] + e["dur"]
            i = bisect.bisect_left(starts, end)
            until = min(starts[i] if i < len(starts) else t1, stack[-1] if stack else t1, t1)
            calls.append((e["name"], e["ts"], until - e["ts"]))
        stack.append(e["ts"] + e["dur"])
    return calls


def arrival_waits(traces: dict[int, dict[str, Any]]) -> dict[int, dict[str, float]] | None:
    """Milliseconds each rank spent at collectives waiting for a slower rank to arrive, per collective category,
    or None when the ranks' collective calls do not pair up. Also per rank: ``arrived_early``, how much earlier
    it arrived than the last rank, summed over the calls, and ``late_matmuls``, how much more matmul time the
    last rank had than this one in the work before those calls (each rank's work since its previous call).

    The ranks' traces share one clock (one machine). Every rank makes the same collective calls in the same
    order, so the i-th c10d op of each rank is one collective (at world 2 the shared groups span both ranks;
    an op on a one-rank group, if any, pairs with the other rank's matching one and counts at most its own
    brief time); a collective cannot complete before the last rank arrives, so a rank that arrived earlier
    waited ``last arrival - its arrival`` of its time in that call (at most all of it)."""
    threads = {r: _main_thread(t) for r, t in traces.items()}  # (step event, main thread's events) per rank
    calls = {r: _collective_calls(*threads[r]) for r in traces}
    names = {tuple(c[0] for c in cs) for cs in calls.values()}
    if len(names) != 1:
        return None
    out: dict[int, dict[str, float]] = {r: dict.fromkeys((*COLLECTIVES, "arrived_early", "late_matmuls"), 0.0)
                                        for r in calls}
    matmuls = {}
    for r, cs in calls.items():  # each rank's work before call i: from the end of call i-1 to its arrival
        root, main = threads[r]
        matmuls[r] = _matmul_time(main, [(cs[i - 1][1] + cs[i - 1][2] if i else root["ts"], c[1])
                                         for i, c in enumerate(cs)])
    for i, name in enumerate(next(iter(names))):
        cat = _own_label({"name": name}, set())
        assert cat in COLLECTIVES, name
        late = max(calls, key=lambda r: calls[r][i][1])
        last = calls[late][i][1]
        for r, cs in calls.items():
            out[r][cat] += min(last - cs[i][1], cs[i][2]) / 1000
            out[r]["arrived_early"] += (last - cs[i][1]) / 1000
            out[r]["late_matmuls"] += (matmuls[late][i] - matmuls[r][i]) / 1000
    return out


def classify(trace: dict[str, Any]) -> dict[str, float]:
    """Milliseconds per category of the profiled step in one rank's Chrome trace (see the module doc)."""
    root, main = _main_thread(trace)
    t0, t1 = root["ts"], root["ts"] + root["dur"]

    # Sequence numbers of the ops recorded under the experts' scope: their backward nodes carry the same.
    expert_seq: set[int] = set()
    stack: list[dict[str, Any]] = []
    for e in main:
        while stack and e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"]:
            stack.pop()
        if any(s["name"] == EXPERT_SCOPE for s in stack) and "Sequence number" in e.get("args", {}):
            expert_seq.add(e["args"]["Sequence number"])
        stack.append(e)

    out = dict.fromkeys(CATEGORIES, 0.0)
    other: dict[str, float] = {}  # what "other" is made of: self time per op name
    waits = 0.0  # self time right after a collective op returned (its wait: see the module doc)
    top = {"end": t1, "cat": "other", "expert": False, "cursor": t0, "after": None, "name": "(no recorded op: Python)",
           "ctx": ""}
    stack2 = [top]

    def self_time(frame: dict[str, Any], until: float) -> None:
        """The frame's own time from its cursor to `until`: its category, or the collective it waits on."""
        nonlocal waits
        gap = max(0.0, until - frame["cursor"])
        if frame["after"] is not None and frame["after"] != frame["cat"]:
            out[frame["after"]] += gap
            waits += gap
        else:
            out[frame["cat"]] += gap
            if frame["cat"] == "other":
                other[frame["name"]] = other.get(frame["name"], 0.0) + gap
        frame["cursor"] = max(frame["cursor"], until)

    def close(frame: dict[str, Any]) -> None:
        self_time(frame, frame["end"])
        if len(stack2):
            parent = stack2[-1]
            parent["cursor"] = max(parent["cursor"], frame["end"])
            parent["after"] = frame["cat"] if frame["cat"] in COLLECTIVES else None

    for e in main:
        start = max(e["ts"], t0)
        while len(stack2) > 1 and start >= stack2[-1]["end"]:
            close(stack2.pop())
        parent = stack2[-1]
        end = min(e["ts"] + e["dur"], parent["end"])
        if end <= start:
            continue
        label = _own_label(e, expert_seq)
        in_expert = parent["expert"] or label == "expert scope"
        if label == "matmul":
            cat = "expert matmuls" if in_expert else "dense matmuls"
            if parent["cat"] in ("expert matmuls", "dense matmuls"):
                cat = parent["cat"]  # aten::mm inside aten::matmul: the outer call decides
        elif label in (None, "expert scope"):
            cat = parent["cat"]
            if label == "expert scope" and cat in ("expert matmuls", "dense matmuls"):
                cat = "other"
        else:
            cat = label
        self_time(parent, start)
        parent["after"] = None
        name = e["name"]
        ctx = parent["ctx"] if name.startswith("aten::") else name.replace(BACKWARD, "").strip()
        if name.startswith("aten::") and ctx:
            name = f"{name} under {ctx}"  # e.g. aten::fill_ under SelectBackward0
        stack2.append({"end": end, "cat": cat, "expert": in_expert, "cursor": start, "after": None, "name": name,
                       "ctx": ctx})
    while stack2:
        close(stack2.pop())
    return {k: v / 1000 for k, v in out.items()} | {"step": root["dur"] / 1000, "collective_waits": waits / 1000,
                                                      "other_by_op": {k: v / 1000 for k, v in other.items()}}


NON_MATMUL = ("ZeRO gathers", "ZeRO reduce-scatters", "other all-reduces", "optimizer", "other")


def breakdown(run_dir: Path) -> dict[int, dict[str, Any]]:
    traces = {}
    for f in sorted((run_dir / "profile").glob("rank*_step*.json")):
        traces[int(f.name[4:f.name.index("_")])] = json.loads(f.read_text())
    per_rank: dict[int, dict[str, Any]] = {r: classify(t) for r, t in traces.items()}
    waits = arrival_waits(traces)
    for r in per_rank:
        per_rank[r]["arrival_waits"] = None if waits is None else waits[r]
    return per_rank


def rank_shares(per_rank: dict[int, dict[str, Any]]) -> dict[int, float]:
    """Each rank's share of its step outside the matmuls and the all-to-all."""
    return {r: sum(v[c] for c in NON_MATMUL) / v["step"] for r, v in per_rank.items()}


def mean_share(per_rank: dict[int, dict[str, Any]]) -> float:
    """The goal's measure for one run: ``rank_shares``, mean of ranks."""
    shares = rank_shares(per_rank)
    return sum(shares.values()) / len(shares)


def report(per_rank: dict[int, dict[str, float]], args: argparse.Namespace, params: int, seq: int,
           run_shares: list[float] | None = None) -> dict[str, Any]:
    """The section for one profiled run (``per_rank``); ``run_shares``: the goal's measure in every run made
    (this one is their median), or None for a single run."""
    ranks = sorted(per_rank)
    shares = rank_shares(per_rank)
    goal_share = mean_share(per_rank)
    runs = run_shares or [goal_share]
    head = "| category | " + " | ".join(f"rank {r}, ms" for r in ranks) + " | share of the step (mean of ranks) |"
    rows = [head, "|---" * (len(ranks) + 2) + "|"]
    for c in CATEGORIES + ("step",):
        share = sum(per_rank[r][c] / per_rank[r]["step"] for r in ranks) / len(ranks)
        name = "**step (wall time)**" if c == "step" else c
        rows.append(f"| {name} | " + " | ".join(f"{per_rank[r][c]:,.0f}" for r in ranks) + f" | {share:.1%} |")
    summed = {r: sum(per_rank[r][c] for c in CATEGORIES) for r in ranks}
    mm = {r: per_rank[r]["expert matmuls"] + per_rank[r]["dense matmuls"] for r in ranks}
    a2a = {r: per_rank[r]["all-to-all"] for r in ranks}
    name = "step_non_matmul_share"
    result = verdict(name, goal_share)
    per_rank_words = ", ".join(f"rank {r} {shares[r]:.1%}" for r in ranks)
    if len(runs) > 1:
        spread = all(verdict(name, v) == result for v in runs)
        goal = (f"Goal (bench/targets.py `{name}`, {TARGETS[name].source}): everything other than matmuls and the "
                f"all-to-all {describe(name)} of the step: **{result}** (the median of {len(runs)} independent runs' "
                f"mean shares, {figure(name, goal_share, 1)}: the run in the table, {per_rank_words}; all runs: "
                + ", ".join(figure(name, v, 1) for v in runs) + "; "
                + ("every run on the same side of the goal)." if spread else
                   "the runs fall on both sides of the goal: not met or missed with a margin)."))
    else:
        goal = (f"Goal (bench/targets.py `{name}`, {TARGETS[name].source}): everything other than matmuls and the "
                f"all-to-all {describe(name)} of the step: **{result}** (mean {figure(name, goal_share, 1)}; "
                + per_rank_words + ").")
    facts = ("Per rank: " + "; ".join(
        f"rank {r}: matmuls {mm[r] / per_rank[r]['step']:.1%} (expert "
        f"{per_rank[r]['expert matmuls'] / per_rank[r]['step']:.1%}), all-to-all {a2a[r] / per_rank[r]['step']:.1%}, "
        f"ZeRO gathers + reduce-scatters "
        f"{(per_rank[r]['ZeRO gathers'] + per_rank[r]['ZeRO reduce-scatters']) / per_rank[r]['step']:.1%}, "
        f"optimizer {per_rank[r]['optimizer'] / per_rank[r]['step']:.1%}" for r in ranks) + ". "
        "Of the collectives' time, waits after a collective op had returned (the caller blocked in work.wait(), "
        "see the method): " + ", ".join(f"rank {r} {per_rank[r]['collective_waits']:,.0f} ms" for r in ranks) + ".")
    arrival = {r: per_rank[r].get("arrival_waits") for r in ranks}
    if all(a is not None for a in arrival.values()):
        waited = {r: sum(arrival[r][c] for c in COLLECTIVES) for r in ranks}
        outside = {r: sum(per_rank[r][c] - (arrival[r][c] if c in COLLECTIVES else 0.0) for c in NON_MATMUL)
                   for r in ranks}
        early = sum(arrival[r]["arrived_early"] for r in ranks)
        late_mm = sum(arrival[r]["late_matmuls"] for r in ranks)
        level = {r: outside[r] / (per_rank[r]["step"] - waited[r]) for r in ranks}
        facts += (" Waiting for the other rank to arrive at a collective (the ranks' traces matched call by call, "
                  "see `arrival_waits`): " + ", ".join(
                      f"rank {r} {waited[r]:,.0f} ms ({waited[r] / per_rank[r]['step']:.1%} of the step; "
                      f"{arrival[r]['all-to-all']:,.0f} ms of it at all-to-alls)" for r in ranks)
                  + f"; this is uneven work between two collectives, not communication: summed over the calls the "
                  f"ranks arrived {early:,.0f} ms before the last one, and the last one had {late_mm:,.0f} ms more "
                  "matmul time in the work before those calls (with dropless routing each rank's experts get a "
                  "different number of rows in each layer). Without the waits the share outside the "
                  f"matmuls and the all-to-all would be {figure(name, sum(level.values()) / len(level), 1)} (mean "
                  "of ranks), "
                  f"**{verdict(name, sum(level.values()) / len(level))}** on that measure; the goal's own measure "
                  "counts the waits at all-to-alls as all-to-all time and those at the other collectives (gathers, "
                  "reduce-scatters, all-reduces) as outside it, "
                  "so where the ranks happen to wait moves its verdict.")
    else:
        facts += " The ranks' collective calls did not pair up, so waits for a slower rank are not separated."
    names: dict[str, float] = {}
    for r in ranks:
        for k, v in per_rank[r]["other_by_op"].items():
            names[k] = names.get(k, 0.0) + v / per_rank[r]["step"] / len(ranks)
    biggest = sorted(names.items(), key=lambda kv: -kv[1])[:6]
    other_line = ("The largest parts of \"other\" (self time, mean share of the step; an op is named with the "
                  "nearest recorded non-aten event around it): " + "; ".join(f"`{k}` {v:.1%}" for k, v in biggest) + ".")
    model = MODEL_SMALL if args.small else MODEL_583M
    table = "\n".join(rows)
    env_words = (f"scale.py's environment {' '.join(f'{k}={v}' for k, v in LEAN_ENV.items())}" if args.lean_env
                 else "glibc's default malloc settings, as a user's run")
    sums = ", ".join(f"rank {r} {summed[r]:,.0f} of {per_rank[r]['step']:,.0f} ms" for r in ranks)
    runs_words = (f" in each of {len(runs)} independent runs (the table: the run with the median share outside "
                  "the matmuls and the all-to-all)" if len(runs) > 1 else "")
    cmd = f"python bench/step_breakdown.py{' --small' if args.small else ''}{f' --repeats {len(runs)}' if len(runs) > 1 else ''}"
    text = f"""`{cmd} --write` on {machine()}.
The {params / 1e6:.1f}M-parameter MoE of bench/scale.py (hidden {model['hidden_size']}, {model['num_layers']} layers,
{model['num_experts']} experts of width {model['intermediate_size']}, vocab {model['vocab_size']}), world 2, EP 2, fp32,
ZeRO-3 + CPU offload (scale.py's lean DeepSpeed JSON; {env_words}), activation checkpointing,
seq_len {seq}, micro batch 1; step {STEPS} of {STEPS} under torch.profiler{runs_words}, each rank's main thread
classified by self time (innermost event wins; the method is in the script's docstring), so the
categories sum to the step's wall time (sums: {sums}).

{table}

{goal}
{facts}

{other_line}

Collectives on gloo include the time a rank waits for the other to arrive (load imbalance shows there).
"Other" holds the element-wise work (SwiGLU's activation, norms, softmax, routing, dispatch
bookkeeping), ZeRO-3's hooks and bucket copies, autograd overhead and Python between ops.
"""
    return {"per_rank": per_rank, "shares": shares, "other_top": biggest, "mean_share": goal_share, "verdict": result,
            "run_shares": runs, "text": text, "table": table}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="a tiny model (seconds): the test suite runs this")
    ap.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default=None, help="run folder (default: a temporary one, removed at the end)")
    ap.add_argument("--reuse", action="store_true", help="classify the traces already in --out (no new run)")
    ap.add_argument("--lean-env", action="store_true",
                    help="bench/scale.py's LEAN_ENV (a 1 MiB mmap threshold: every larger tensor is a fresh mapping "
                         "faulted in; lower RSS, slower step) instead of glibc's defaults")
    ap.add_argument("--repeats", type=int, default=None,
                    help="independent profiled runs; the table and the verdict are the median run's (default: 3, "
                         "1 with --small)")
    args = ap.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.small else 3)
    if repeats < 1:
        ap.error(f"--repeats {repeats}: at least 1")
    model = MODEL_SMALL if args.small else MODEL_583M
    seq = 32 if args.small else args.seq_len
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_step_"))
    out.mkdir(parents=True, exist_ok=True)
    lean = out / "ds_lean.json"
    lean.write_text(json.dumps(LEAN_DS, indent=1))
    env = LEAN_ENV if args.lean_env else {}
    params = plan_host(model, 2, 2, seq, "fp32", str(lean), env)["params"]
    run_dirs = [out / ("run" if i == 0 else f"run{i}") for i in range(repeats)]
    if args.reuse:  # the runs already in --out
        run_dirs = sorted(d for d in out.glob("run*") if (d / "profile").is_dir())
        if not run_dirs:
            ap.error(f"--reuse: no run*/profile folder in {str(out)!r} (run once without --reuse, with --out there)")
    else:
        data, _ = prepare_data(out)
        for run_dir in run_dirs:  # one after another: independent runs of the same command
            res = run_trainer(run_dir, data, 2, _overrides(model, 2, 2, seq, "fp32") + ["--profile_step", str(STEPS)],
                              str(lean), env=env)
            if not res.ok:
                raise RuntimeError(f"the profiled run failed:\n{res.error}")
    runs = [breakdown(d) for d in run_dirs]
    shares = [mean_share(r) for r in runs]
    median = sorted(range(len(runs)), key=lambda i: shares[i])[(len(runs) - 1) // 2]  # a run's own value
    result = report(runs[median], args, params, seq, shares if len(runs) > 1 else None)
    publish("Where a step goes", result["text"], args.write, None if args.out else out)
    return result


if __name__ == "__main__":
    main()
