"""The logged EP-rank imbalance (``Trainer._ep_rank_imbalance``) is measured within each EP group: 4 gloo
processes, two EP groups of 2, routing unbalanced in opposite directions. From the world's summed counts the
two groups cancel (1.0); each group waits for a rank holding all its rows (2.0)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist

from ep_train.train.trainer import Trainer
from tests.distributed.harness import run_distributed

E = 4  # experts; EP 2: an EP rank holds 2


def _worker(rank: int, world: int) -> dict[int, float]:
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in order

    def all_reduce(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(t, op=op)
        return t

    fake = SimpleNamespace(cfg=SimpleNamespace(parallel=SimpleNamespace(ep_size=2)),
                           model=SimpleNamespace(moe_cfg=SimpleNamespace(num_experts=E)), device=torch.device("cpu"),
                           ep_group=groups[rank // 2], world=world, _all_reduce=all_reduce)
    # this rank's rows per expert, then (as the trainer's layer rows) dropped, assigned, entropy
    first_half = rank // 2 == 0  # group 0 sends everything to EP rank 0's experts, group 1 to EP rank 1's
    counts = [30.0, 10.0, 0.0, 0.0] if first_half else [0.0, 0.0, 25.0, 15.0]
    layer_1 = torch.tensor([*counts, 0.0, 40.0, 0.5])
    layer_3 = torch.tensor([10.0, 10.0, 10.0, 10.0, 0.0, 40.0, 0.5])  # balanced everywhere: 1.0
    return Trainer._ep_rank_imbalance(fake, {1: layer_1, 3: layer_3})


def test_ep_rank_imbalance_is_measured_per_group() -> None:
    out = run_distributed(_worker, 4, timeout=120)
    for got in out:
        assert got == {1: 2.0, 3: 1.0}, out
    world_rows = [2 * (30 + 10), 2 * (25 + 15)]  # the world's sum per EP rank: 80 and 80, "balanced"
    assert max(world_rows) / (sum(world_rows) / 2) == 1.0
