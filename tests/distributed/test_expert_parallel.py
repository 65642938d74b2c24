"""Expert parallelism over gloo processes equals a single-process run of the same model, seed and batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from ep_train.config import Config
from ep_train.model import MoELayer, build_model
from ep_train.parallel import ParallelLayout, apply_expert_parallel, parallelize
from ep_train.parallel.groups import new_ep_groups
from tests.distributed.harness import run_distributed

B_PER_RANK, S = 2, 12


def _cfg(k: int, num_experts: int, cf: float | None, variant: dict | None = None) -> Config:
    c = Config()
    for key, value in (variant or {}).items():
        setattr(c.moe, key, value)
    c.model.vocab_size, c.model.hidden_size, c.model.intermediate_size = 64, 32, 48
    c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = 3, 4, 2
    c.moe.num_experts, c.moe.num_experts_per_token, c.moe.capacity_factor = num_experts, k, cf
    c.moe.moe_layers = [0, 2]  # layer 1 stays dense
    c.moe.num_shared_experts = 1
    return c


def _make(c: Config, idle: bool) -> torch.nn.Module:
    model = build_model(c.model, c.moe, seed=1234)
    if idle:  # top-1 always picks expert 0 or 1: the upper half of the experts never gets a token
        for m in model.modules():
            if isinstance(m, MoELayer):
                u = torch.randn(m.router.weight.shape[1], generator=torch.Generator().manual_seed(7))
                with torch.no_grad():
                    m.router.weight.zero_()
                    m.router.weight[0] = 3 * u
                    m.router.weight[1] = -3 * u
    return model


def _worker(rank: int, world: int, ep: int, k: int, num_experts: int, cf: float | None, idle: bool,
            variant: dict | None = None, recompute_comm: bool = True) -> dict:
    torch.manual_seed(0)
    c = _cfg(k, num_experts, cf, variant)
    c.train.recompute_comm = recompute_comm
    # global balance counts and expert choice span every rank's tokens: the reference is one process
    # over the whole batch (world == EP here)
    global_batch = c.moe.balance_stats == "global_batch" or c.moe.router_type == "expert_choice"
    g = torch.Generator().manual_seed(99)
    tokens = torch.randint(0, c.model.vocab_size, (world * B_PER_RANK, S + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    mine = slice(rank * B_PER_RANK, (rank + 1) * B_PER_RANK)

    # Single-process reference: the full model on every rank's slice (as data parallelism averages it).
    ref = _make(c, idle)
    ref_losses, ref_logits = [], None
    if global_batch:  # balance counts over the whole batch: one forward over every rank's rows
        out = ref(x, y)
        out.loss.backward()
        ref_losses = [out.loss.item()] * world
        ref_logits = out.logits.detach()[mine]
    for r in range(0 if global_batch else world):
        sl = slice(r * B_PER_RANK, (r + 1) * B_PER_RANK)
        out = ref(x[sl], y[sl])
        (out.loss / world).backward()
        ref_losses.append(out.loss.item())
        if r == rank:
            ref_logits = out.logits.detach()

    # Expert-parallel run.
    ep_group, edp_group = new_ep_groups(ep)
    if variant:  # the trainer's path: parallelize (global balance counts, recompute), without DeepSpeed
        c.train.activation_checkpointing = True
        model = parallelize(_make(c, idle), c, ParallelLayout(world, rank, ep, ep_group, edp_group), deepspeed=False)
    else:
        model = apply_expert_parallel(_make(c, idle), ep_group)
    calls = {"all_to_all_single": 0, "all_reduce": 0, "all_gather": 0}  # the model's collectives, counted
    originals = {name: getattr(dist, name) for name in calls}

    def counted(name: str):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in calls:
        setattr(dist, name, counted(name))
    routed = [0]  # router forwards: once per MoE layer, twice when activation checkpointing recomputes it
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.router.register_forward_hook(lambda *_: routed.__setitem__(0, routed[0] + 1))
    try:
        out = model(x[mine], y[mine])
        out.loss.backward()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    if global_batch:  # the ranks' mean loss is the full batch's loss
        loss_t = out.loss.detach().clone()
        dist.all_reduce(loss_t)
        diffs_loss = abs(loss_t.item() / world - ref_losses[rank])
    ref_params = dict(ref.named_parameters())
    diffs = {"logits": (out.logits - ref_logits).abs().max().item(),
             "loss": diffs_loss if global_batch else abs(out.loss.item() - ref_losses[rank])}
    got_tokens = 0
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        if name.endswith(("experts.w1", "experts.w2", "experts.w3")):
            dist.all_reduce(grad, group=edp_group)  # same experts, other EP groups
            owner = next(m for n, m in model.named_modules() if name.startswith(n + ".") and isinstance(m, MoELayer))
            ids = owner.experts.global_expert_ids
            ref_grad = ref_params[name].grad[ids[0]: ids[-1] + 1]
            ref_w = ref_params[name].detach()[ids[0]: ids[-1] + 1]
            diffs["expert_weights"] = max(diffs.get("expert_weights", 0.0), (p.detach() - ref_w).abs().max().item())
        else:
            dist.all_reduce(grad)
            ref_grad = ref_params[name].grad
        grad /= world
        diffs[name] = (grad - ref_grad).abs().max().item()
    for st in out.router_stats.values():
        got_tokens += int(st.tokens_per_expert.sum())
    return {"diffs": diffs, "local_experts": owner.experts.global_expert_ids, "routed": got_tokens,
            "per_expert": [st.tokens_per_expert.tolist() for st in out.router_stats.values()], "calls": calls,
            "router_calls": routed[0]}


@pytest.mark.parametrize("world,ep,k,num_experts,cf,idle", [
    (2, 2, 2, 4, None, False),
    (2, 2, 1, 4, None, True),  # EP rank 1's experts receive no tokens at all
    (4, 2, 2, 4, None, False),
    (4, 4, 3, 8, None, False),
    (4, 4, 1, 4, None, True),  # ranks 2 and 3 hold only idle experts
    (2, 2, 2, 4, 0.75, False),  # capacity with drops, computed on each rank's own tokens
])
def test_expert_parallel_matches_single_process(world: int, ep: int, k: int, num_experts: int,
                                                 cf: float | None, idle: bool) -> None:
    _check_against_reference(world, ep, k, num_experts, cf, idle, None)


@pytest.mark.parametrize("variant", [
    # the extra balance terms and group-limited routing (groups = the EP ranks' experts), with recompute
    {"cv_loss_weight": 0.1, "router_entropy_loss_weight": 0.05, "num_expert_groups": 2, "top_groups": 1},
    # Switch-loss counts summed over the ranks: equals one process over the whole batch
    {"balance_stats": "global_batch", "aux_loss_weight": 0.5},
    # each expert chooses its tokens among the EP group's (all-gathered scores)
    {"router_type": "expert_choice"},
], ids=["cv-entropy-groups", "global-batch", "expert-choice"])
def test_routing_variants_match_single_process(variant: dict) -> None:
    cf = 1.5 if variant.get("router_type") == "expert_choice" else None
    results = _check_against_reference(2, 2, 2, 4, cf, False, variant)
    # per MoE layer (2): 3 all-to-alls in the forward (counts, tokens, back), the 2 token ones again in the
    # recompute (the counts are replayed), 2 in the backward
    assert all(r["calls"]["all_to_all_single"] == 2 * (3 + 2 + 2) for r in results), [r["calls"] for r in results]
    assert all(r["router_calls"] == 2 * 2 for r in results)  # the recompute ran: 2 MoE layers, twice each
    if cf is not None:  # every expert received exactly its capacity, counted over both ranks' tokens
        tokens = 2 * B_PER_RANK * S
        per_layer = [[a + b for a, b in zip(la, lb)] for la, lb in zip(results[0]["per_expert"],
                                                                       results[1]["per_expert"])]
        assert per_layer and all(counts == [math.ceil(tokens * cf / 4)] * 4 for counts in per_layer), per_layer


@pytest.mark.parametrize("recompute_comm", [False, True])
@pytest.mark.parametrize("variant", [
    {"balance_stats": "global_batch", "aux_loss_weight": 0.5},  # + the balance counts' all-reduce
    {"router_type": "expert_choice"},  # + the scores' all-gather
], ids=["global-batch", "expert-choice"])
def test_recompute_reuses_the_forwards_exchanges(variant: dict, recompute_comm: bool) -> None:
    """The same values as the single-process reference, and what the recompute communicates
    (ep_train.parallel.comm_replay): with train.recompute_comm false nothing; with true (the default) the tokens
    (their all-to-all and its return, and expert choice's score gather) but not the small exchanges (routing
    counts, balance counts)."""
    cf = 1.5 if variant.get("router_type") == "expert_choice" else None
    results = _check_against_reference(2, 2, 2, 4, cf, False, variant, recompute_comm=recompute_comm)
    other = "all_reduce" if "balance_stats" in variant else "all_gather"
    # per MoE layer (2 of them): 3 all-to-alls in the forward (counts, tokens, tokens back), 2 in the backward,
    # in the recompute none or the 2 token ones
    recompute_a2a = 2 if recompute_comm else 0
    recompute_other = 1 if recompute_comm and other == "all_gather" else 0
    for r in results:
        assert r["router_calls"] == 2 * 2  # the recompute did run (each MoE layer routed twice)
        assert r["calls"]["all_to_all_single"] == 2 * (3 + recompute_a2a + 2), r["calls"]
        assert r["calls"][other] == 2 * (1 + recompute_other), r["calls"]


def _check_against_reference(world: int, ep: int, k: int, num_experts: int, cf: float | None, idle: bool,
                             variant: dict | None, recompute_comm: bool = True) -> list[dict]:
    results = run_distributed(_worker, world, ep, k, num_experts, cf, idle, variant, recompute_comm, timeout=180)
    for rank, res in enumerate(results):
        worst = max(res["diffs"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, f"rank {rank}: {worst} (all: {res['diffs']})"
        local = num_experts // ep
        assert res["local_experts"] == list(range((rank % ep) * local, (rank % ep + 1) * local))
    if idle:
        for res in results:
            for layer_counts in res["per_expert"]:
                assert sum(layer_counts[2:]) == 0 and sum(layer_counts[:2]) > 0
    return results


def _recompute_worker(rank: int, world: int, variant: dict) -> dict[str, float]:
    """Gradients of two micro-batches of different lengths under random routing, with activation checkpointing
    off, with the recompute replaying the forward's exchanges, and with it exchanging again."""
    ep_group, edp_group = new_ep_groups(2)
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for mode in ("off", "replay", "exchange"):
        c = _cfg(2, 4, variant.get("capacity_factor"), {k: v for k, v in variant.items() if k != "capacity_factor"})
        if mode != "off":
            c.train.activation_checkpointing, c.train.recompute = True, "full"
            c.train.recompute_comm = mode == "exchange"
        model = parallelize(build_model(c.model, c.moe, seed=3), c, ParallelLayout(world, rank, 2, ep_group, edp_group),
                            deepspeed=False)
        model.train()
        for seq in (12, 7):  # the second micro-batch's shape differs: a stale replay would not fit it
            torch.manual_seed(100 + seq + rank)  # the routing noise: the same draws in every mode
            toks = torch.randint(0, 64, (2, seq + 1), generator=torch.Generator().manual_seed(seq + rank))
            model(toks[:, :-1], toks[:, 1:]).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["off"].keys() == grads["replay"].keys() == grads["exchange"].keys()
    return {m: max((grads["off"][n] - grads[m][n]).abs().max().item() for n in grads["off"])
            for m in ("replay", "exchange")}


@pytest.mark.parametrize("variant", [
    {"router_type": "noisy_topk", "router_jitter_noise": 0.3, "expert_dropout": 0.4},
    {"capacity_factor": 0.6, "drop_policy": "overflow", "router_jitter_noise": 0.2},
], ids=["noise-jitter-dropout", "capacity-overflow-jitter"])
def test_recompute_under_random_routing_gives_the_gradients_of_no_recompute(variant: dict) -> None:
    """The recompute routes as the forward did (torch.utils.checkpoint restores the RNG) and a replayed exchange
    belongs to its own micro-batch: gradients equal, bitwise, to those without activation checkpointing."""
    for rank, diffs in enumerate(run_distributed(_recompute_worker, 2, variant, timeout=180)):
        assert diffs == {"replay": 0.0, "exchange": 0.0}, (rank, diffs)


def _changed_router_worker(rank: int, world: int) -> str:
    """Routers zeroed between the forward and the backward (every token then ties: the recompute routes otherwise)."""
    ep_group, edp_group = new_ep_groups(2)
    c = _cfg(2, 4, None, {})
    c.train.activation_checkpointing, c.train.recompute = True, "full"  # recompute_comm true: counts replayed
    model = parallelize(build_model(c.model, c.moe, seed=3), c, ParallelLayout(world, rank, 2, ep_group, edp_group),
                        deepspeed=False)
    toks = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(rank))
    loss = model(toks[:, :-1], toks[:, 1:]).loss
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoELayer):
                m.router.weight.zero_()
    try:
        loss.backward()
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_a_recompute_that_routes_otherwise_is_caught() -> None:
    """The recompute takes the forward's routing counts from the tape, so its sizes cannot disagree with the
    forward's; its own counts are compared with them instead: a recompute that routes otherwise raises rather than
    computing gradients from mismatched rows."""
    for rank, msg in enumerate(run_distributed(_changed_router_worker, 2, timeout=120)):
        assert "the recompute routed otherwise than the forward" in msg, (rank, msg)
