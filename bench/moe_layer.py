"""MoE layer forward + backward, and its all-to-all volume, side by side with peers.

    python bench/moe_layer.py [--repeat 5] [--iters 5] [--small] [--write] [--device cpu|cuda]

2 processes (gloo on CPU, nccl on CUDA), EP 2, fp32, Mixtral routing (top-2 of 8 experts, SwiGLU):
- ep-train: ``MoELayer`` + ``AllToAllDispatcher`` (dropless);
- DeepSpeed MoE: ``deepspeed.moe.layer.MoE`` at ep_size 2 with ``drop_tokens=False`` (drops nothing);
- DeepSpeed AutoEP: the ``AutoEPMoELayer`` that ``deepspeed.initialize`` puts in place of a one-layer
  ``transformers`` Mixtral's MoE block (``expert_parallel.autoep_size`` 2, preset ``mixtral``); built at
  ZeRO stage 0 so the time is the layer's own (ZeRO-3 is measured end to end in train_e2e.py);
- HF Mixtral: ``transformers``' ``MixtralSparseMoeBlock`` on the same tokens in one process with both threads;
- limit: dense SwiGLU matmuls over the same routed rows (same FLOPs, same threads) plus the measured
  time of all-to-all exchanges carrying the same bytes.
Peers run from their released packages. Times are per iteration for the whole batch (both ranks).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import append_section, machine, stats  # noqa: E402

E, K = 8, 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    x = torch.randn(t, d, generator=gen).to(device)
    g = torch.randn(t, d, generator=gen).to(device)
    res = {}

    # ---- ep-train
    torch.manual_seed(0)
    layer = MoELayer(d, f, E, K, router_init_std=0.5)
    for w in (layer.experts.w1, layer.experts.w2, layer.experts.w3):
        torch.nn.init.normal_(w, std=0.02)
    apply_expert_parallel(layer, dist.group.WORLD).to(device)
    xe = x.clone().requires_grad_(True)
    sent = {}

    def ep_step() -> None:
        y, st = layer(xe)
        (y * g).sum().backward()
        layer.zero_grad(set_to_none=True)
        xe.grad = None

    res["ep-train"] = _time_iters(ep_step, args.iters, args.repeat, device)
    # all-to-all volume of one forward: rows this rank sends to the other ranks, and the counts from the routing
    sent.update(_rows_sent(layer.router, layer.dispatcher, x, rank, world, ""))
    # group-limited routing (DeepSeek-V2): groups = the EP ranks' experts, each token picks 1 group
    grouped = Router(d, E, K, num_groups=world, top_groups=1)
    grouped.load_state_dict(layer.router.state_dict())  # the same router weights as the unlimited row
    sent.update(_rows_sent(grouped.to(device), layer.dispatcher, x, rank, world, "top_groups 1 of 2: "))
    leaving = sent["ep-train (its all-to-all send splits)"]

    # ---- DeepSpeed MoE (its long-standing layer), same expert math
    from deepspeed.moe.layer import MoE

    torch.manual_seed(0)
    ds = MoE(hidden_size=d, expert=SwiGLU(d, f), num_experts=E, ep_size=world, k=K, drop_tokens=False,
             use_rts=False, capacity_factor=1.0, min_capacity=0)
    ds.set_deepspeed_parallelism()
    ds = ds.to(device)
    xd = x.clone().requires_grad_(True)

    def ds_step() -> None:
        y, aux, _ = ds(xd.view(1, t, d))
        ((y.view(t, d) * g).sum() + aux).backward()
        ds.zero_grad(set_to_none=True)
        xd.grad = None

    res["DeepSpeed MoE"] = _time_iters(ds_step, args.iters, args.repeat, device)
    # both ranks run the profiled steps (they hold collectives); rank 0's tables are reported
    profiles = {"ep-train": _profile(ep_step, device), "DeepSpeed MoE": _profile(ds_step, device)}
    with torch.no_grad():  # DeepSpeed sends [E, C, D] capacity buffers padded to the largest expert
        _, _, counts = ds(x.view(1, t, d))
        cap = int(counts.max())  # drop_tokens=False: capacity = the busiest expert's count (all-reduced max)
        sent["DeepSpeed (padded capacity buffers)"] = cap * E // world * (world - 1)

    # ---- DeepSpeed AutoEP: its layer, as deepspeed.initialize builds it from a transformers Mixtral
    res["DeepSpeed AutoEP"] = _autoep(x, g, args, device)

    # ---- the limit: dense matmuls on the same rows + all-to-all of the same bytes
    rows = t * K  # each rank computes about T*K rows when balanced
    dense = SwiGLU(d, f).to(device)
    hx = torch.randn(rows, d, device=device, requires_grad=True)
    hg = torch.randn(rows, d, device=device)

    def dense_step() -> None:
        (dense(hx) * hg).sum().backward()
        dense.zero_grad(set_to_none=True)
        hx.grad = None

    res["limit: matmuls"] = _time_iters(dense_step, args.iters, args.repeat, device)
    half_t = torch.tensor([leaving], device=device)
    dist.all_reduce(half_t, op=dist.ReduceOp.MAX)  # same split on both ranks, so sends and receives pair up
    half = int(half_t.item())
    buf = torch.randn(rows, d, device=device)
    split = [rows - half, half] if rank == 0 else [half, rows - half]

    def a2a_step() -> None:
        for _ in range(4):  # dispatch + combine, forward and backward
            out = torch.empty_like(buf)
            dist.all_to_all_single(out, buf, split, split)

    res["limit: all-to-all"] = _time_iters(a2a_step, args.iters, args.repeat, device)
    queue.put((rank, res, sent, profiles))
    dist.barrier()
    dist.destroy_process_group()


def _rows_sent(router, dispatcher, x: torch.Tensor, rank: int, world: int, prefix: str) -> dict[str, int]:
    """Rows of D one dispatch sends to other ranks: one per routed (token, expert) assignment (what
    ep-train sent before dedup), what the dispatcher really sends, and the token-level minimum."""
    t = x.shape[0]
    with torch.no_grad():
        r = router(x)
        owner = r.expert_ids // (E // world)  # [T, K] EP rank of each assignment
        remote = r.keep & (owner != rank)
        per_token = torch.zeros(t, world + 1, dtype=torch.bool, device=x.device)  # column world: not remote
        per_token.scatter_(1, owner.masked_fill(~remote, world), True)
        _, _, meta = dispatcher.dispatch(x, r.expert_ids, r.keep)
    return {prefix + "per-assignment rows (routed assignments leaving the rank)": int(remote.sum()),
            prefix + "ep-train (its all-to-all send splits)":
                sum(n for i, n in enumerate(meta.send_splits) if i != rank),
            prefix + "token-level minimum (unique token, remote rank pairs)": int(per_token[:, :world].sum())}


def _combine_bench(t: int, d: int, repeat: int) -> dict[str, list[float]]:
    """The combine alone, forward + backward, one thread: index_add vs the slot gather (interleaved)."""
    from ep_train.model.dispatch import LocalDispatcher, weighted_scatter

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    ids = torch.argsort(torch.rand(t, E, generator=g), dim=1)[:, :K]  # [T, K] distinct experts
    disp = LocalDispatcher(E)
    x = torch.randn(t, d, generator=g)
    _, _, meta = disp.dispatch(x, ids, torch.ones_like(ids, dtype=torch.bool))
    y0, gout = torch.randn(t * K, d, generator=g), torch.randn(t, d, generator=g)
    w0 = torch.rand(t, K, generator=g)
    fns = {"index_add (zeros + index_add of y * w)": lambda y, w: weighted_scatter(y, w, meta.layout.slot, t),
           "slot gather + bmm (ep-train)": lambda y, w: disp.combine(y, w, meta)}
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


def _autoep(x: torch.Tensor, g: torch.Tensor, args: argparse.Namespace, device: str) -> list[float]:
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

    return _time_iters(step, args.iters, args.repeat, device)


def _hf(args: argparse.Namespace, world: int) -> list[float]:
    """HF's block, one process, both threads, all tokens of both ranks."""
    import transformers

    torch.set_num_threads(world)
    cfg = transformers.MixtralConfig(hidden_size=args.dim, intermediate_size=args.ffn, num_local_experts=E,
                                     num_experts_per_tok=K)
    block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(cfg).to(args.device)
    with torch.no_grad():
        block.gate.weight.normal_(std=0.5)
        block.experts.gate_up_proj.normal_(std=0.02)
        block.experts.down_proj.normal_(std=0.02)
    x = torch.randn(1, world * args.tokens, args.dim, device=args.device, requires_grad=True)
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
    port = _port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1800) for _ in range(world)]
    for p in procs:
        p.join(timeout=60)
        if p.exitcode not in (0, None):
            raise RuntimeError(f"benchmark worker failed with exit code {p.exitcode}")
    results.sort(key=lambda r: r[0])
    times = {k: [max(a, b) for a, b in zip(results[0][1][k], results[1][1][k])] for k in results[0][1]}
    times["HF Mixtral block (1 process)"] = _hf(args, world)
    limit = [a + b for a, b in zip(times.pop("limit: matmuls"), times.pop("limit: all-to-all"))]
    times["limit (matmuls + all-to-all)"] = limit
    ours = stats(times["ep-train"])[0]
    rows = ["| implementation | ms / iteration, median (min-max) | time / ep-train |", "|---|---|---|"]
    for name, ts in times.items():
        med, lo, hi = stats(ts)
        rows.append(f"| {name} | {med:.1f} ({lo:.1f}-{hi:.1f}) | {med / ours:.2f} |")
    sent = {k: sum(r[2][k] for r in results) for k in results[0][2]}
    base = sent["per-assignment rows (routed assignments leaving the rank)"]
    rows2 = ["| rows of D sent to the other rank (both ranks, one dispatch) | rows | ratio to one row per assignment |",
             "|---|---|---|"]
    for name, v in sent.items():
        rows2.append(f"| {name} | {v:,} | {v / base:.2f} |")
    comb_t, comb_d = (256, 64) if args.small else (8192, 1024)
    combine = _combine_bench(comb_t, comb_d, args.repeat)
    rows3 = [f"| combine, fwd + bwd (T={comb_t}, D={comb_d}, K={K}, 1 thread) | ms, median (min-max) |", "|---|---|"]
    for name, ts in combine.items():
        med, lo, hi = stats(ts)
        rows3.append(f"| {name} | {med:.1f} ({lo:.1f}-{hi:.1f}) |")
    table, table2, table3 = "\n".join(rows), "\n".join(rows2), "\n".join(rows3)
    profiles = "\n".join(f"{name} (rank 0, two iterations):\n\n```\n{text.strip()}\n```\n"
                         for name, text in results[0][3].items())
    print(table)
    print()
    print(table2)
    print()
    print(table3)
    ds_ratio = stats(times["DeepSpeed MoE"])[0] / ours
    aep_ratio = stats(times["DeepSpeed AutoEP"])[0] / ours
    lim_ratio = ours / stats(limit)[0]
    if args.write:
        append_section("MoE layer", f"""
`python bench/moe_layer.py --write` on {machine()}; device {args.device}.
D={args.dim}, F={args.ffn}, E={E}, k={K}, {args.tokens} tokens per rank, fp32, 2 processes (1 thread each), EP 2;
HF's block runs the same {world * args.tokens} tokens in one process with {world} threads. DeepSpeed AutoEP is
the `AutoEPMoELayer` that `deepspeed.initialize` (expert_parallel autoep_size 2, preset mixtral, ZeRO stage 0
so that ZeRO's gathers are not in the layer's time) puts in a one-layer `transformers` Mixtral.
{args.iters} iterations per sample, {args.repeat} samples.

{table}

Targets: at least 1.5x faster than DeepSpeed's MoE layer: **{'met' if ds_ratio >= 1.5 else 'MISSED'}**
({ds_ratio:.2f}x; DeepSpeed AutoEP's layer takes {aep_ratio:.2f}x ep-train's time); within 1.25x of the limit: **{'met' if lim_ratio <= 1.25 else 'MISSED'}** ({lim_ratio:.2f}x).
Why the first target cannot be met here: on CPU at these sizes the expert matmuls are nearly all of
the time, and DeepSpeed's layer itself runs within {stats(times["DeepSpeed MoE"])[0] / stats(limit)[0]:.2f}x of the limit,
so no implementation can be 1.5x faster than it on this work; the gap the target assumes comes from
DeepSpeed's padded [E, C, D] buffers and einsum dispatch, which cost little when routing is balanced
and the matmuls are slow. The comparison that can show it is a GPU run (`--device cuda`) or skewed routing.

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

Where the time goes (torch.profiler, operators by self CPU time; `aten::mm`/`bmm`/`addmm` are the expert
matmuls, which both layers spend most of their time in):

{profiles}
""")
    return {"times": times, "sent": sent, "combine": combine, "profiles": results[0][3]}


if __name__ == "__main__":
    main()
