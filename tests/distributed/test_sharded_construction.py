"""Sharded construction: each rank makes only its experts and its ZeRO-3 share, yet the model (gathered)
equals a single-process build, for world 1/2/4 and EP 1/2/4."""

from __future__ import annotations

import math

import pytest
import torch

from ep_train.config import Config
from tests.distributed.harness import run_distributed


def _cfg(ep: int) -> Config:
    c = Config()
    c.model.vocab_size, c.model.hidden_size, c.model.intermediate_size = 96, 32, 48
    c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = 3, 4, 2
    c.moe.num_experts, c.moe.num_experts_per_token, c.moe.moe_layers = 4, 2, [0, 2]
    c.moe.num_shared_experts = 1
    c.parallel.ep_size, c.parallel.ds_config = ep, "zero3"
    c.train.micro_batch_size, c.train.batch_size = 1, 4
    return c


def _worker(rank: int, world: int, ep: int) -> dict:
    import deepspeed

    from ep_train.model import build_model
    from ep_train.model.init import SeededInit
    from ep_train.parallel import parallelize
    from ep_train.parallel.groups import deepspeed_layout
    from ep_train.parallel.zero import build_ds_config, materialize_partitioned

    deepspeed.init_distributed(dist_backend="gloo")
    c = _cfg(ep)
    seeded = SeededInit(c.model, c.moe, seed=77)
    largest = [0]

    def source(name: str, shape: tuple[int, ...], ids: list[int] | None) -> torch.Tensor:
        largest[0] = max(largest[0], math.prod(shape))  # the most this rank ever makes in full at once
        # Every parameter made so far is already partitioned (nothing whole is left of it), but those of the
        # module being made now: only one module's parameters are ever in full together.
        module = name.rsplit(".", 1)[0] if "." in name else ""
        for other, p in model.named_parameters():
            if not p.is_meta and other.rsplit(".", 1)[0] != module:
                assert p.numel() == 0 and hasattr(p, "ds_tensor"), f"{other} is in full while {name} is made"
        return seeded(name, shape, ids)

    layout = deepspeed_layout(ep)
    model = parallelize(build_model(c.model, c.moe, device="meta"), c, layout)
    materialize_partitioned(model, source, build_ds_config(c, world, use_bf16=False), layout,
                            dtype=torch.float32, device=torch.device("cpu"))

    ref = dict(build_model(c.model, c.moe, seed=77).named_parameters())  # one process, every expert
    diffs, held, ids_seen = {}, 0, {}
    for name, p in model.named_parameters():
        assert p.numel() == 0 and hasattr(p, "ds_tensor"), name  # partitioned: nothing whole is left
        held += p.ds_tensor.numel()
        with deepspeed.zero.GatheredParameters([p]):
            full = p.detach().clone()
        if name.endswith(("experts.w1", "experts.w2", "experts.w3")):
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            ids_seen[name] = owner.global_expert_ids
            want = ref[name][owner.global_expert_ids]
            assert p.ds_process_group is not None
            group = torch.distributed.get_world_size(p.ds_process_group)
            assert group == world // ep, (name, group)  # partitioned over the expert-data-parallel group only
        else:
            want = ref[name]
        diffs[name] = (full - want).abs().max().item() if full.shape == want.shape else float("inf")
    biggest_param = max(math.prod(p.ds_shape) for p in model.parameters())
    return {"diffs": diffs, "held": held, "largest": largest[0], "biggest_param": biggest_param, "ids": ids_seen,
            "full_model": sum(p.numel() for p in ref.values())}


@pytest.mark.parametrize("world,ep", [(1, 1), (2, 1), (4, 2), (4, 4)])
def test_sharded_construction_equals_single_process_build(world: int, ep: int) -> None:
    results = run_distributed(_worker, world, ep, timeout=240)
    for rank, res in enumerate(results):
        bad = {k: v for k, v in res["diffs"].items() if v != 0.0}
        assert not bad, f"rank {rank}: {bad}"  # bit-identical: values depend on name and global expert id only
        local = 4 // ep
        for name, ids in res["ids"].items():
            assert ids == list(range((rank % ep) * local, (rank % ep + 1) * local)), (name, ids)
        # Never more than one parameter (this rank's experts of one weight) in full at a time.
        assert res["largest"] <= res["biggest_param"]
        if world > 1:
            assert res["held"] < res["full_model"] / world * 1.5, res  # about its share, padding aside
    assert sum(r["held"] for r in results) >= results[0]["full_model"]  # the shares together are the model
