"""MoE layer forward + backward, and its all-to-all volume, side by side with peers.

    python bench/moe_layer.py [--repeat 5] [--iters 5] [--small] [--write] [--device cpu|cuda]

2 processes (gloo on CPU, nccl on CUDA), EP 2, fp32, Mixtral routing (top-2 of 8 experts, SwiGLU):
- ep-train: ``MoELayer`` + ``AllToAllDispatcher`` (dropless);
- DeepSpeed MoE: ``deepspeed.moe.layer.MoE`` at ep_size 2 with ``drop_tokens=False`` (drops nothing);
- DeepSpeed AutoEP: the ``AutoEPMoELayer`` that ``deepspeed.initialize`` puts in place of a one-layer
  ``transformers`` Mixtral's MoE block (``expert_parallel.autoep_size`` 2, preset ``mixtral``); built at
  ZeRO stage 0 so the time is the layer's own (ZeRO-3 is measured end to end in train_e2e.py);
- HF Mixtral: ``transformers``' ``MixtralSparseMoeBlock`` on as many tokens (drawn the same way) in one process
  with both threads;
- limit: dense SwiGLU matmuls over the busiest rank's routed rows (same FLOPs, same threads) plus the
  measured time of all-to-all exchanges carrying the same bytes.
Two routings, the same for every row: every implementation's router gets the same weight matrix, and
every token's last feature is 1, so that the router's last column is a per-expert logit bias:
- balanced: no bias (random router weights, each expert gets about 1/E of the assignments);
- skewed: a bias calibrated (on a fixed sample of tokens) so that expert choice follows a Zipf
  distribution (s = ZIPF_S) over the experts, the popular ones alternating between the EP ranks; padded
  designs (DeepSpeed's [E, C, D] capacity buffers) pay for the busiest expert on every expert.
DeepSpeed's top-2 gate runs with ``top2_2nd_expert_sampling=False`` (its default samples the second
expert with noise), so all rows choose the same top-2 experts.
Peers run from their released packages. Times are per iteration for the whole batch (both ranks).
Targets come from bench/targets.py; the verdicts are computed from this run's figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import append_section, free_port, machine, stats  # noqa: E402
from bench.targets import TARGETS, describe, figure, verdict  # noqa: E402

E, K = 8, 2
ZIPF_S = 1.2
ROUTINGS = ("balanced", "skewed")


def router_weights(d: int, world: int) -> tuple[dict[str, torch.Tensor], list[float], list[float]]:
    """The router weight [E, D] of each routing (same on every rank and for every implementation), the
    Zipf target share of each expert, and the share the skewed weights give on the calibration sample."""
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(E, d, generator=g) * 0.5
    w[:, -1] = 0.0  # the bias column: every token's last feature is 1
    sample = torch.randn(4096, d, generator=g)
    sample[:, -1] = 1.0
    order = [r * (E // world) + i for i in range(E // world) for r in range(world)]  # popularity -> expert
    z = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** ZIPF_S
    target = torch.zeros(E, dtype=torch.float64)
    target[order] = z / z.sum()
    base = (sample @ w.T).double()
    sigma, bias = float(base.std()), torch.zeros(E, dtype=torch.float64)
    for _ in range(200):  # move each expert's bias until its share of top-K assignments matches Zipf
        ids = torch.topk(base + bias, K, dim=1).indices
        share = torch.bincount(ids.flatten(), minlength=E).double() / ids.numel()
        bias += 0.3 * sigma * (target.log() - share.clamp_min(1e-4).log())
    skewed = w.clone()
    skewed[:, -1] = bias.float()
    return {"balanced": w, "skewed": skewed}, target.tolist(), share.tolist()


def _set_router(param: torch.Tensor, w: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(w.to(param.device, param.dtype))



def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_iters(fn, iters: int, repeat: int, device: str) -> list[float]:
    import torch.distributed as dist

    fn()  # warm-up
    out = []
    for _ in range(repeat):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        dist.barrier()
        out.append((time.perf_counter() - t0) / iters * 1000)
    return out


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from ep_train.model.experts import SwiGLU
    from ep_train.model.moe import MoELayer
    from ep_train.model.router import Router
    from ep_train.parallel import apply_expert_parallel

    device = args.device
    if device == "cuda":
        torch.cuda.set_device(rank)
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    d, f, t = args.dim, args.ffn, args.tokens
    gen = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(t, d, generator=gen)
    x[:, -1] = 1.0  # the router's bias feature (see the module doc)
    x = x.to(device)
    g = torch.randn(t, d, generator=gen).to(device)
    weights, _, _ = router_weights(d, world)
    res: dict[str, dict[str, list[float]]] = {case: {} for case in ROUTINGS}
    sent: dict[str, int] = {}
    load: dict[str, dict[str, int]] = {case: {} for case in ROUTINGS}

    # ---- ep-train
    torch.manual_seed(0)
    layer = MoELayer(d, f, E, K, router_init_std=0.5)
    for w in (layer.experts.w1, layer.experts.w2, layer.experts.w3):
        torch.nn.init.normal_(w, std=0.02)
    apply_expert_parallel(layer, dist.group.WORLD).to(device)
    xe = x.clone().requires_grad_(True)

    def ep_step() -> None:
        y, st = layer(xe)
        (y * g).sum().backward()
        layer.zero_grad(set_to_none=True)
        xe.grad = None

    # ---- DeepSpeed MoE (its long-standing layer), same expert math, deterministic top-2
    from deepspeed.moe.layer import MoE

    torch.manual_seed(0)
    ds = MoE(hidden_size=d, expert=SwiGLU(d, f), num_experts=E, ep_size=world, k=K, drop_tokens=False,
             use_rts=False, capacity_factor=1.0, min_capacity=0, top2_2nd_expert_sampling=False)
    ds.set_deepspeed_parallelism()
    ds = ds.to(device)
    xd = x.clone().requires_grad_(True)

    def ds_step() -> None:
        y, aux, _ = ds(xd.view(1, t, d))
        ((y.view(t, d) * g).sum() + aux).backward()
        ds.zero_grad(set_to_none=True)
        xd.grad = None

    # ---- DeepSpeed AutoEP: its layer, as deepspeed.initialize builds it from a transformers Mixtral
    autoep_step, autoep_router = _autoep(x, g, args, device)

    # ---- the limit's pieces
    dense = SwiGLU(d, f).to(device)
    profiles: dict[str, str] = {}
    for case in ROUTINGS:
        w = weights[case]
        _set_router(layer.router.weight, w)
        _set_router(ds.deepspeed_moe.gate.wg.weight, w)
        _set_router(autoep_router, w)
        prefix = "" if case == "balanced" else f"{case}: "
        res[case]["ep-train"] = _time_iters(ep_step, args.iters, args.repeat, device)
        # all-to-all volume of one forward: rows this rank sends to the other ranks, and the counts from the routing
        got, local_rows = _rows_sent(layer.router, layer.dispatcher, x, rank, world, prefix)
        sent.update(got)
        if case == "balanced":
            # group-limited routing (DeepSeek-V2): groups = the EP ranks' experts, each token picks 1 group
            grouped = Router(d, E, K, num_groups=world, top_groups=1)
            grouped.load_state_dict(layer.router.state_dict())  # the same router weights as the unlimited row
            sent.update(_rows_sent(grouped.to(device), layer.dispatcher, x, rank, world, "top_groups 1 of 2: ")[0])
        leaving = got[prefix + "ep-train (its all-to-all send splits)"]
        res[case]["DeepSpeed MoE"] = _time_iters(ds_step, args.iters, args.repeat, device)
        if case == "balanced":  # both ranks run the profiled steps (they hold collectives); rank 0's tables are reported
            profiles = {"ep-train": _profile(ep_step, device), "DeepSpeed MoE": _profile(ds_step, device)}
        with torch.no_grad():  # DeepSpeed sends [E, C, D] capacity buffers padded to the largest expert
            _, _, counts = ds(x.view(1, t, d))
            # drop_tokens=False: the capacity is the busiest expert's count over all ranks (DeepSpeed all-reduces
            # it with MAX in sharded_moe's gating; the counts it returns are this rank's own)
            cap_t = torch.tensor([int(counts.max())], device=device)
            dist.all_reduce(cap_t, op=dist.ReduceOp.MAX)
            cap = int(cap_t.item())
            sent[prefix + "DeepSpeed (padded capacity buffers)"] = cap * E // world * (world - 1)
            # each rank receives [E_l, C] rows from every rank: E_l * world * C = E * C rows for its experts
            load[case]["DeepSpeed rows per rank (padded)"] = cap * E
            load[case]["busiest expert, rows (tokens of one rank)"] = int(counts.max())
        res[case]["DeepSpeed AutoEP"] = _time_iters(autoep_step, args.iters, args.repeat, device)

        # the limit: dense matmuls on the busiest rank's rows + all-to-all of the same bytes
        rows_t = torch.tensor([local_rows, leaving], device=device)
        dist.all_reduce(rows_t, op=dist.ReduceOp.MAX)  # the busiest rank decides; same split on both ranks
        rows, half = (int(v) for v in rows_t.tolist())
        load[case]["ep-train rows on the busiest rank"] = rows
        hx = torch.randn(rows, d, device=device, requires_grad=True)
        hg = torch.randn(rows, d, device=device)

        def dense_step() -> None:
            (dense(hx) * hg).sum().backward()  # noqa: B023 - called within this iteration
            dense.zero_grad(set_to_none=True)
            hx.grad = None  # noqa: B023

        res[case]["limit: matmuls"] = _time_iters(dense_step, args.iters, args.repeat, device)
        n = max(rows, 2 * half)
        buf = torch.randn(n, d, device=device)
        split = [n - half, half] if rank == 0 else [half, n - half]

        def a2a_step() -> None:
            for _ in range(4):  # dispatch + combine, forward and backward
                out = torch.empty_like(buf)  # noqa: B023
                dist.all_to_all_single(out, buf, split, split)  # noqa: B023

        res[case]["limit: all-to-all"] = _time_iters(a2a_step, args.iters, args.repeat, device)
    queue.put((rank, res, sent, profiles, load))
    dist.barrier()
    dist.destroy_process_group()


def _rows_sent(router, dispatcher, x: torch.Tensor, rank: int, world: int, prefix: str
               ) -> tuple[dict[str, int], int]:
    """Rows of D one dispatch sends to other ranks: one per routed (token, expert) assignment (what
    ep-train sent before dedup), what the dispatcher really sends, and the token-level minimum; and the
    rows this rank's experts compute."""
    t = x.shape[0]
    with torch.no_grad():
        r = router(x)
        owner = r.expert_ids // (E // world)  # [T, K] EP rank of each assignment
        remote = r.keep & (owner != rank)
        per_token = torch.zeros(t, world + 1, dtype=torch.bool, device=x.device)  # column world: not remote
        per_token.scatter_(1, owner.masked_fill(~remote, world), True)
        _, local_counts, meta = dispatcher.dispatch(x, r.expert_ids, r.keep, r.weights)
    return {prefix + "per-assignment rows (routed assignments leaving the rank)": int(remote.sum()),
            prefix + "ep-train (its all-to-all send splits)":
                sum(n for i, n in enumerate(meta.send_splits) if i != rank),
            prefix + "token-level minimum (unique token, remote rank pairs)": int(per_token[:, :world].sum())
            }, sum(local_counts)


def _combine_bench(t: int, d: int, repeat: int) -> dict[str, list[float]]:
    """The combine alone, forward + backward, one thread: index_add vs the slot gather (interleaved)."""
    from ep_train.model.dispatch import LocalDispatcher, combine_slots, weighted_scatter

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    ids = torch.argsort(torch.rand(t, E, generator=g), dim=1)[:, :K]  # [T, K] distinct experts
    disp = LocalDispatcher(E)
    x = torch.randn(t, d, generator=g)
    _, _, meta = disp.dispatch(x, ids, torch.ones_like(ids, dtype=torch.bool), torch.ones(t, K))
    y0, gout = torch.randn(t * K, d, generator=g), torch.randn(t, d, generator=g)
    w0 = torch.rand(t, K, generator=g)
    fns = {"index_add (zeros + index_add of y * w)": lambda y, w: weighted_scatter(y, w, meta.layout.slot, t),
           "slot gather + weighted sum (ep-train)": lambda y, w: combine_slots(y, w.reshape(-1)[meta.layout.slot], meta.layout)}
    out: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeat + 1):
        for name, fn in fns.items():
            y, w = y0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
            t0 = time.perf_counter()
            fn(y, w).backward(gout)
            if i:  # the first round warms up
                out[name].append((time.perf_counter() - t0) * 1000)
    return out


def _profile(fn, device: str, rows: int = 8) -> str:
    """torch.profiler over two iterations: where the time goes, by operator self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            fn()
        _sync(device)
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=40)


def _autoep(x: torch.Tensor, g: torch.Tensor, args: argparse.Namespace, device: str):
    """AutoEP's layer: (one training iteration, its router weight [E, D])."""
    import deepspeed
    import transformers

    t, d = x.shape
    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=d, intermediate_size=args.ffn, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=4, num_local_experts=E,
                                     num_experts_per_tok=K)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    with torch.no_grad():  # same initial scales as the other rows
        model.model.layers[0].mlp.gate.weight.normal_(std=0.5)
        model.model.layers[0].mlp.experts.gate_up_proj.normal_(std=0.02)
        model.model.layers[0].mlp.experts.down_proj.normal_(std=0.02)
    engine, _, _, _ = deepspeed.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0},
        "expert_parallel": {"enabled": True, "autoep_size": 2, "preset_model": "mixtral"}})
    layer = engine.module.model.layers[0].mlp
    assert type(layer).__name__ == "AutoEPMoELayer", f"AutoEP did not replace the block: {type(layer)}"
    layer = layer.to(device)
    xa = x.clone().view(1, t, d).requires_grad_(True)

    def step() -> None:
        y = layer(xa)
        y = y[0] if isinstance(y, tuple) else y
        (y.reshape(t, d) * g).sum().backward()
        layer.zero_grad(set_to_none=True)
        xa.grad = None

    routers = [p for n, p in layer.named_parameters() if tuple(p.shape) == (E, d) and ("gate" in n or "router" in n)]
    assert len(routers) == 1, [(n, tuple(p.shape)) for n, p in layer.named_parameters()]
    return step, routers[0]


def _hf(args: argparse.Namespace, world: int, router: torch.Tensor) -> list[float]:
    """HF's block, one process, both threads, all tokens of both ranks, the given router weights."""
    import transformers

    torch.set_num_threads(world)
    cfg = transformers.MixtralConfig(hidden_size=args.dim, intermediate_size=args.ffn, num_local_experts=E,
                                     num_experts_per_tok=K)
    block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(cfg).to(args.device)
    with torch.no_grad():
        block.gate.weight.copy_(router)
        block.experts.gate_up_proj.normal_(std=0.02)
        block.experts.down_proj.normal_(std=0.02)
    x = torch.randn(1, world * args.tokens, args.dim, device=args.device)
    x[..., -1] = 1.0  # the router's bias feature
    x.requires_grad_(True)
    g = torch.randn_like(x)

    def step() -> None:
        (block(x) * g).sum().backward()
        block.zero_grad(set_to_none=True)
        x.grad = None

    step()
    out = []
    for _ in range(args.repeat):
        _sync(args.device)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step()
        _sync(args.device)
        out.append((time.perf_counter() - t0) / args.iters * 1000)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--small", action="store_true", help="toy size (the test suite runs this)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    if args.small:
        args.dim, args.ffn, args.tokens, args.iters, args.repeat = 64, 128, 256, 2, 2
    world = 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1800) for _ in range(world)]
    for p in procs:
        p.join(timeout=60)
        if p.exitcode not in (0, None):
            raise RuntimeError(f"benchmark worker failed with exit code {p.exitcode}")
    results.sort(key=lambda r: r[0])
    weights, zipf, calibrated = router_weights(args.dim, world)
    times: dict[str, dict[str, list[float]]] = {}
    limit_parts: dict[str, dict[str, list[float]]] = {}
    for case in ROUTINGS:
        ts = {k: [max(a, b) for a, b in zip(results[0][1][case][k], results[1][1][case][k])]
              for k in results[0][1][case]}
        ts["HF Mixtral block (1 process)"] = _hf(args, world, weights[case])
        limit_parts[case] = {"matmuls": ts.pop("limit: matmuls"), "all-to-all": ts.pop("limit: all-to-all")}
        ts["limit (matmuls + all-to-all)"] = [a + b for a, b in zip(limit_parts[case]["matmuls"],
                                                                   limit_parts[case]["all-to-all"])]
        times[case] = ts
    med = {case: {k: stats(v)[0] for k, v in ts.items()} for case, ts in times.items()}
    head = "| implementation | " + " | ".join(f"{c}: ms / iteration, median (min-max) | {c}: time / ep-train"
                                              for c in ROUTINGS) + " |"
    rows = [head, "|---" * (1 + 2 * len(ROUTINGS)) + "|"]
    for name in times["balanced"]:
        cells = []
        for c in ROUTINGS:
            m, lo, hi = stats(times[c][name])
            cells.append(f"{m:.1f} ({lo:.1f}-{hi:.1f}) | {m / med[c]['ep-train']:.2f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    sent = {k: sum(r[2][k] for r in results) for k in results[0][2]}
    base = sent["per-assignment rows (routed assignments leaving the rank)"]
    rows2 = ["| rows of D sent to the other rank (both ranks, one dispatch) | rows | ratio to one row per assignment |",
             "|---|---|---|"]
    for name, v in sent.items():
        b = sent[name.split(": ")[0] + ": per-assignment rows (routed assignments leaving the rank)"] \
            if ": " in name else base
        rows2.append(f"| {name} | {v:,} | {v / b:.2f} |")
    # expert load: the busiest expert, the rows each design computes on a rank
    load = {c: {k: max(r[4][c][k] for r in results) for k in results[0][4][c]} for c in ROUTINGS}
    total = args.tokens * K  # assignments of one rank's tokens
    rows4 = ["| routing | busiest expert's share of assignments | ep-train rows on the busiest rank | "
             "DeepSpeed rows per rank (padded to the busiest expert) | DeepSpeed / ep-train rows |", "|---|---|---|---|---|"]
    for c in ROUTINGS:
        lc = load[c]
        rows4.append(f"| {c} | {lc['busiest expert, rows (tokens of one rank)'] / total:.1%} | "
                     f"{lc['ep-train rows on the busiest rank']:,} | {lc['DeepSpeed rows per rank (padded)']:,} | "
                     f"{lc['DeepSpeed rows per rank (padded)'] / lc['ep-train rows on the busiest rank']:.2f} |")
    comb_t, comb_d = (256, 64) if args.small else (8192, 1024)
    combine = _combine_bench(comb_t, comb_d, args.repeat)
    rows3 = [f"| combine, fwd + bwd (T={comb_t}, D={comb_d}, K={K}, 1 thread) | ms, median (min-max) |", "|---|---|"]
    for name, ts in combine.items():
        m, lo, hi = stats(ts)
        rows3.append(f"| {name} | {m:.1f} ({lo:.1f}-{hi:.1f}) |")
    table, table2, table3, table4 = "\n".join(rows), "\n".join(rows2), "\n".join(rows3), "\n".join(rows4)
    profiles = "\n".join(f"{name} (rank 0, two iterations, balanced routing):\n\n```\n{text.strip()}\n```\n"
                         for name, text in results[0][3].items())
    # the verdicts, from this run's figures and bench/targets.py
    ratios = {c: {"ds": med[c]["DeepSpeed MoE"] / med[c]["ep-train"],
                  "autoep": med[c]["DeepSpeed AutoEP"] / med[c]["ep-train"],
                  "limit": med[c]["ep-train"] / med[c]["limit (matmuls + all-to-all)"],
                  "ds_limit": med[c]["DeepSpeed MoE"] / med[c]["limit (matmuls + all-to-all)"]} for c in ROUTINGS}
    checks = [("layer_vs_ds_balanced", ratios["balanced"]["ds"], "balanced"),
              ("layer_vs_ds_skewed", ratios["skewed"]["ds"], "skewed"),
              ("layer_vs_limit", ratios["balanced"]["limit"], "balanced"),
              ("layer_vs_limit", ratios["skewed"]["limit"], "skewed")]
    verdicts = {f"{n} ({c})": verdict(n, v) for n, v, c in checks}
    lines = [f"- {TARGETS[n].what}{'' if 'routing' in TARGETS[n].what else f', {c} routing'}: {describe(n)} "
             f"({TARGETS[n].source}): **{verdict(n, v)}** ({figure(n, v, 2)})" for n, v, c in checks]
    facts = " ".join(
        f"{c.capitalize()}: DeepSpeed AutoEP's layer takes {ratios[c]['autoep']:.2f}x ep-train's time; DeepSpeed's MoE "
        f"layer runs at {ratios[c]['ds_limit']:.2f}x the limit and ep-train at {ratios[c]['limit']:.2f}x; of the limit, "
        f"the matmuls take {stats(limit_parts[c]['matmuls'])[0]:.1f} ms and the all-to-all "
        f"{stats(limit_parts[c]['all-to-all'])[0]:.1f} ms." for c in ROUTINGS)
    zipf_line = ("Skewed routing, expert shares of the assignments (experts 0-7; Zipf target / calibration sample): "
                 + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(zipf, calibrated)) + ".")
    print(table, table2, table4, table3, "\n".join(lines), facts, sep="\n\n")
    if args.write:
        append_section("MoE layer", f"""
`python bench/moe_layer.py --write` on {machine()}; device {args.device}.
D={args.dim}, F={args.ffn}, E={E}, k={K}, {args.tokens} tokens per rank, fp32, 2 processes (1 thread each), EP 2;
HF's block runs as many tokens ({world * args.tokens}, drawn the same way) in one process with {world} threads. DeepSpeed AutoEP is
the `AutoEPMoELayer` that `deepspeed.initialize` (expert_parallel autoep_size 2, preset mixtral, ZeRO stage 0
so that ZeRO's gathers are not in the layer's time) puts in a one-layer `transformers` Mixtral.
Every implementation gets the same router weights; "skewed" adds a per-expert logit bias so that expert
choice follows a Zipf distribution (s={ZIPF_S}), the popular experts alternating between the two ranks
(module docstring). DeepSpeed's gate picks its second expert deterministically (`top2_2nd_expert_sampling=False`).
The limit is dense SwiGLU matmuls over the busiest rank's routed rows plus all-to-all exchanges of
ep-train's bytes. {args.iters} iterations per sample, {args.repeat} samples.

{table}

Targets (bench/targets.py), computed from the medians above:

{chr(10).join(lines)}

{facts}

Expert load (rows of D the experts compute; DeepSpeed pads every expert to the busiest expert's count):

{table4}

{zipf_line}

All-to-all volume (rows of D fp32 values sent to the other rank in one dispatch; the combine sends
as many back):

{table2}

The per-assignment and token-level counts come from the routing decisions; ep-train's numbers are
read from its dispatcher's all-to-all send splits. ep-train sends a token once per remote rank that
holds any of its experts and expands it there; the receiver returns one partial weighted sum per
(token, rank), so the combine's exchange shrinks the same way. The "top_groups 1 of 2" rows route
with the same router weights, limited to one group of experts (groups = the EP ranks' experts,
DeepSeek-V2 device-limited routing): a token then reaches at most one remote rank. DeepSpeed pads
every expert to the busiest expert's count (its capacity buffers with drop_tokens=False).

The combine alone (one process, one thread, forward + backward, index_add and the slot gather
interleaved in one run):

{table3}

Where the time goes (torch.profiler, operators by self CPU time, balanced routing; `aten::mm`/`bmm`/`addmm`
are the matmuls):

{profiles}
""")
    return {"times": times, "sent": sent, "combine": combine, "profiles": results[0][3], "load": load,
            "verdicts": verdicts, "ratios": ratios, "zipf": zipf, "calibrated": calibrated}


if __name__ == "__main__":
    main()
