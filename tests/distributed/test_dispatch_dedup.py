"""The all-to-all dispatcher sends a token once per destination EP rank, and its dispatch + combine
(values and gradients) equal the plain per-assignment formula."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ep_train.model.router import Router
from ep_train.parallel.dispatch import AllToAllDispatcher
from tests.distributed.harness import run_distributed

T, D = 40, 8


def _naive_pairs(ids: torch.Tensor, keep: torch.Tensor, num_local: int, ep: int) -> list[int]:
    """Distinct (token, destination rank) pairs per destination, counted one token at a time."""
    out = [0] * ep
    for t in range(ids.shape[0]):
        for r in {int(i) // num_local for i, kp in zip(ids[t], keep[t]) if kp}:
            out[r] += 1
    return out


def _routing(rank: int, k: int, num_experts: int, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    if kind == "expert_choice":  # the real router: E slots per token, kept where the expert chose it
        torch.manual_seed(3)
        router = Router(D, num_experts, k, router_type="expert_choice", capacity_factor=1.5, init_std=0.5)
        r = router(torch.randn(T, D, generator=g))
        return r.expert_ids, r.weights.detach(), r.keep
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(T)])  # [T, K] distinct
    keep = torch.rand(T, k, generator=g) > 0.15  # some assignments dropped
    return ids, torch.rand(T, k, generator=g), keep


def _worker(rank: int, world: int, k: int, num_experts: int, kind: str) -> dict:
    ids, w, keep = _routing(rank, k, num_experts, kind)
    disp = AllToAllDispatcher(num_experts, dist.group.WORLD)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(50 + rank), requires_grad=True)
    w = w.clone().requires_grad_(True)
    xg, counts, meta = disp.dispatch(x, ids, keep, w)
    # identity experts scaled by (global id + 1): an expert's rows are told apart by the factor
    scale = torch.cat([torch.full((n,), float(rank * disp.num_local + j + 1)) for j, n in enumerate(counts)])
    out = disp.combine(xg * scale[:, None], meta)
    g = torch.randn(T, D, generator=torch.Generator().manual_seed(70 + rank))
    (out * g).sum().backward()
    # reference: out[t] = sum_k keep * w[t, k] * (id + 1) * x[t], on this rank alone
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = ((wr * keep * (ids + 1)).sum(1, keepdim=True)) * xr
    (ref * g).sum().backward()
    return {"sent": meta.send_splits, "naive": _naive_pairs(ids, keep, disp.num_local, world),
            "assignments": int(keep.sum()), "out": (out - ref).abs().max().item(),
            "x_grad": (x.grad - xr.grad).abs().max().item(), "w_grad": (w.grad - wr.grad).abs().max().item()}


@pytest.mark.parametrize("ep,k,num_experts,kind", [
    (2, 2, 8, "topk"), (2, 3, 8, "topk"), (4, 2, 8, "topk"), (4, 3, 8, "topk"),
    (2, 0, 8, "expert_choice"), (4, 0, 8, "expert_choice"),
])
def test_rows_sent_equal_distinct_token_rank_pairs(ep: int, k: int, num_experts: int, kind: str) -> None:
    results = run_distributed(_worker, ep, k or 1, num_experts, kind, timeout=120)
    for rank, res in enumerate(results):
        assert res["sent"] == res["naive"], (rank, res)
        for key in ("out", "x_grad", "w_grad"):
            assert res[key] < 1e-5, (rank, key, res)
    # a token with two experts on one rank crosses once: fewer rows than assignments
    assert sum(sum(r["sent"]) for r in results) < sum(r["assignments"] for r in results)
