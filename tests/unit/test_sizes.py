"""Parameter counts from the config against a built model and against Mixtral 8x7B's published sizes."""

from __future__ import annotations

import pytest

from ep_train.config import Config, moe_layer_indices
from ep_train.model import build_model
from ep_train.sizes import model_size


@pytest.mark.parametrize("tie,shared,noisy,layers", [(False, 0, False, None), (True, 2, True, [1, 2])])
def test_counts_match_a_built_model(tie: bool, shared: int, noisy: bool, layers) -> None:
    c = Config()
    c.model.vocab_size, c.model.hidden_size, c.model.intermediate_size = 100, 32, 48
    c.model.num_layers, c.model.num_heads, c.model.num_kv_heads, c.model.tie_embeddings = 3, 4, 2, tie
    c.moe.num_experts, c.moe.num_shared_experts, c.moe.moe_layers = 4, shared, layers
    c.moe.router_type = "noisy_topk" if noisy else "topk"
    c.moe.expert_intermediate_size = 24
    model = build_model(c.model, c.moe)
    assert model_size(c).total == sum(p.numel() for p in model.parameters())


def test_mixtral_8x7b_published_sizes() -> None:
    c = Config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = 32000, 4096, 14336, 32
    m.num_heads, m.num_kv_heads = 32, 8
    c.moe.num_experts, c.moe.num_experts_per_token = 8, 2
    s = model_size(c)
    # Mistral AI: 46.7B total, 12.9B active per token.
    assert round(s.total / 1e9, 1) == 46.7
    assert round(s.active / 1e9, 1) == 12.9


@pytest.mark.parametrize("world", [16, 64])
def test_mixtral_8x7b_through_parallelize_on_meta(world: int) -> None:
    """configs/mixtral_8x7b.yaml through construction and parallelize on the meta device (no memory), at a
    simulated world of 16 and 64 with EP 8: every rank's shapes, and the planner's counts from the pieces."""
    from pathlib import Path

    from ep_train.config import load_config
    from ep_train.parallel import ParallelLayout, parallelize

    c = load_config(Path(__file__).resolve().parents[2] / "configs" / "mixtral_8x7b.yaml", [])
    c.train.activation_checkpointing = True
    s = model_size(c)
    assert f"{s.total / 1e9:.2f}B" == "46.70B" and f"{s.active / 1e9:.2f}B" == "12.88B"
    experts_by_id: dict[tuple[str, int], int] = {}
    dense_counts = set()
    for rank in range(world):
        model = parallelize(build_model(c.model, c.moe, device="meta"), c, ParallelLayout(world, rank, 8))
        dense = 0
        for name, p in model.named_parameters():
            assert p.is_meta, name  # nothing was allocated
            if name.endswith(("experts.w1", "experts.w2", "experts.w3")):
                want = (1, 14336, 4096) if not name.endswith("w2") else (1, 4096, 14336)
                assert tuple(p.shape) == want, (rank, name, tuple(p.shape))
                owner = model.get_submodule(name.rsplit(".", 1)[0])
                assert owner.global_expert_ids == [rank % 8]
                assert p.ds_zero_placement_family == "autoep_expert" and p.allreduce is False
                experts_by_id[(name, rank % 8)] = p.numel()
            else:
                dense += p.numel()
        dense_counts.add(dense)
        assert type(model.layers[0]).__name__ == "CheckpointedBlock"
    assert len(dense_counts) == 1  # every rank describes the same dense model
    assert dense_counts.pop() + sum(experts_by_id.values()) == s.total  # the 8 expert shards + dense = 46.70B


def _moe_cfg(**train):
    from ep_train.config import load_config, parse_overrides

    args = ["--vocab_size", "256", "--hidden_size", "64", "--intermediate_size", "128", "--num_layers", "2",
            "--num_heads", "4", "--num_kv_heads", "2", "--num_experts", "4", "--ep_size", "2", "--seq_len", "16",
            "--micro_batch_size", "1", "--batch_size", "2"]
    for k, v in train.items():
        args += [f"--{k}", str(v)]
    return load_config(None, parse_overrides(args))


def _bytes(plan: dict, name: str) -> int:
    return next(b["bytes"] for b in plan["breakdown"] if b["name"] == name)


def test_plan_model_states_follow_deepspeed_semantics() -> None:
    """ZeRO-3 + offload keeps per partition element: parameter, fp32 master, gradient partition, fp32
    optimizer gradient, two Adam moments: 24 bytes in fp32, 20 in bf16 (2 + 4 + 2 + 4 + 8) in DeepSpeed 0.19.8.
    ep_train.parallel.ds_memory (default on) shares the fp32 master with an fp32 parameter partition and the
    optimizer gradient with the fp32 accumulation buffer: 16 bytes in fp32, 18 in bf16 (2 + 4 + 4 + 8, fp32
    accumulation)."""
    import json

    from ep_train.config import resolve_ds_config
    from ep_train.sizes import plan_memory

    states = ("parameters", "fp32 master", "gradient partition", "optimizer gradient", "Adam moments")
    fp32 = plan_memory(_moe_cfg(), 2, "cpu")
    assert fp32["precision"] == "fp32" and fp32["device_peak_bytes"] == 0
    assert sum(_bytes(fp32, n) for n in states) == 16 * fp32["partition_elements"]
    bf16 = plan_memory(_moe_cfg(), 2, "cuda")
    assert bf16["precision"] == "bf16" and bf16["device_peak_bytes"] > 0
    assert sum(_bytes(bf16, n) for n in states) == 18 * bf16["partition_elements"]
    off = {**json.loads(resolve_ds_config("zero3_offload").read_text()), "ep_train": {"dedup_offload_buffers": False}}
    assert sum(_bytes(plan_memory(_moe_cfg(), 2, "cpu", ds=off), n) for n in states) == 24 * fp32["partition_elements"]
    assert sum(_bytes(plan_memory(_moe_cfg(), 2, "cuda", ds=off), n) for n in states) == 20 * bf16["partition_elements"]
    # DeepSpeed's SuperOffload is never shared (ds_memory leaves its optimizer alone): DeepSpeed's own 24 bytes
    sup = json.loads(resolve_ds_config("zero3_offload").read_text())
    sup["zero_optimization"]["offload_optimizer"]["super_offload"] = True
    assert sum(_bytes(plan_memory(_moe_cfg(), 2, "cpu", ds=sup), n) for n in states) == 24 * fp32["partition_elements"]
    # without optimizer offload, DeepSpeed 0.19.8 means to reuse an fp32 parameter partition as the master, but
    # its device test compares a torch.device with a string, never equal in torch 2.13: it copies
    import torch

    assert torch.device("cpu") != "cpu"  # the comparison stage3._create_fp32_partitions makes (review, measured)
    ds = {"zero_optimization": {"stage": 3}}
    plain = plan_memory(_moe_cfg(), 2, "cpu", ds=ds)
    assert _bytes(plain, "fp32 master") == 4 * plain["partition_elements"]
    assert _bytes(plain, "fp32 gradient copy") > 0 and _bytes(plain, "AdamW temporaries") > 0
    # the partition shrinks with the world: dense over all ranks, experts over their EDP group
    assert plan_memory(_moe_cfg(), 4, "cpu")["partition_elements"] < fp32["partition_elements"]
    assert plan_memory(_moe_cfg(), 4, "cpu")["host_peak_bytes"] < fp32["host_peak_bytes"]


def test_plan_buffers_and_activations() -> None:
    from ep_train.sizes import activation_bytes, all_to_all_bytes_per_step, heap_threshold, plan_memory

    big = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 1e7}}
    cfg = _moe_cfg()
    size = model_size(cfg)
    local = size.total - size.experts // 2  # what EP rank 0 computes with: its 2 of 4 experts, all dense
    # only the filled part of the bucket is resident: a rank never fills more than its own gradients
    assert _bytes(plan_memory(cfg, 2, "cpu", ds=big), "reduce bucket") == local * 4
    tiny = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 1e4}}
    assert _bytes(plan_memory(cfg, 2, "cpu", ds=tiny), "reduce bucket") == 4e4
    assert plan_memory(cfg, 2, "cpu", ds=tiny)["host_peak_bytes"] < plan_memory(cfg, 2, "cpu", ds=big)["host_peak_bytes"]
    assert activation_bytes(cfg, True, 4)["blocks"] < activation_bytes(cfg, False, 4)["blocks"]
    assert all_to_all_bytes_per_step(cfg, 2, 4) > 0
    assert all_to_all_bytes_per_step(_moe_cfg(ep_size=1), 2, 4) == 0
    # train.recompute_comm false: the recompute sends nothing (4 exchanges per layer, not 6), and each MoE
    # layer keeps its received and returned rows (2 K D per token) for it
    ckpt, reuse = _moe_cfg(), _moe_cfg()
    ckpt.train.activation_checkpointing = reuse.train.activation_checkpointing = True
    reuse.train.recompute_comm = False
    assert all_to_all_bytes_per_step(reuse, 2, 4) * 6 == all_to_all_bytes_per_step(ckpt, 2, 4) * 4
    tokens, moe_layers = cfg.data.seq_len * cfg.train.micro_batch_size, len(moe_layer_indices(cfg.model, cfg.moe))
    kept = moe_layers * 2 * cfg.moe.num_experts_per_token * cfg.model.hidden_size * tokens * 4
    assert activation_bytes(reuse, True, 4)["blocks"] - activation_bytes(ckpt, True, 4)["blocks"] == kept
    assert heap_threshold({}) == 32 * 2 ** 20 and heap_threshold({"MALLOC_MMAP_THRESHOLD_": "65536"}) == 65536
    with pytest.raises(ValueError, match="MALLOC_MMAP_THRESHOLD_"):
        heap_threshold({"MALLOC_MMAP_THRESHOLD_": "lots"})
    with pytest.raises(ValueError, match="device = 'tpu'"):
        plan_memory(cfg, 2, "tpu")
    assert plan_memory(_moe_cfg(mixed_precision="bf16"), 2, "cpu")["precision"] == "bf16"  # the config wins


def test_plan_keeps_nvme_offloaded_states_off_the_device_and_counts_the_swap_buffers() -> None:
    """ZeRO-Infinity: partitions swapped to NVMe are in neither peak; DeepSpeed's pinned swap buffers are on the
    host (partitioned_param_swapper: buffer_count x buffer_size elements; the optimizer's: buffer_count x the
    largest sub-group, fp32). The plan once counted NVMe-offloaded parameters on the GPU."""
    import json

    from ep_train.config import resolve_ds_config
    from ep_train.sizes import plan_memory

    cfg = _moe_cfg()
    nvme = json.loads(resolve_ds_config("zero3_nvme").read_text())
    cpu_off = json.loads(json.dumps(nvme))  # the same JSON with the parameters in host memory instead
    cpu_off["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    plan, ref = plan_memory(cfg, 2, "cuda", ds=nvme), plan_memory(cfg, 2, "cuda", ds=cpu_off)
    where = {b["name"]: b["where"] for b in plan["breakdown"]}
    assert plan["offload_param"] and where["parameters"] == "nvme" and where["Adam moments"] == "host"
    assert _bytes(plan, "NVMe parameter buffers") == 5 * 10**8 * 2  # bf16 on cuda
    assert plan["device_peak_bytes"] == ref["device_peak_bytes"]  # the parameters were on the host there
    assert plan["host_peak_bytes"] == (ref["host_peak_bytes"] - _bytes(ref, "parameters")
                                       + _bytes(plan, "NVMe parameter buffers")
                                       + _bytes(plan, "NVMe parameter write-back"))
    # DeepSpeed's default max_in_cpu (1e9) keeps a small model's partitions in pinned RAM: nothing to write back
    roomy = json.loads(json.dumps(nvme))
    del roomy["zero_optimization"]["offload_param"]["max_in_cpu"]
    kept = plan_memory(cfg, 2, "cuda", ds=roomy)
    names = {b["name"] for b in kept["breakdown"]}
    assert _bytes(kept, "parameters kept in RAM") == _bytes(ref, "parameters") and _bytes(kept, "parameters") == 0
    assert "NVMe parameter write-back" not in names
    assert "NVMe parameter write-back" in {b["name"] for b in plan["breakdown"]}  # max_in_cpu 0: every sub-group
    # parallel.nvme_offload_optimizer moves the optimizer's states too, as the trainer's merge does
    cfg.parallel.nvme_offload_optimizer = True
    both = plan_memory(cfg, 2, "cuda", ds=nvme)
    where = {b["name"]: b["where"] for b in both["breakdown"]}
    assert where["Adam moments"] == where["fp32 master"] == "nvme" and _bytes(both, "NVMe optimizer buffers") > 0
    # CPU Adam makes a sub-group's moments at its first step (fp32, 2 per element) before they are swapped out
    assert _bytes(both, "first-step Adam moments") * 4 == _bytes(both, "NVMe optimizer buffers") * 2
    assert both["host_peak_bytes"] < plan["host_peak_bytes"] + _bytes(both, "NVMe optimizer buffers")


def test_largest_subgroup_follows_deepspeed() -> None:
    """The plan's sub-group split against DeepSpeed 0.19.8's own ``_create_fp16_sub_groups``."""
    import random
    from types import SimpleNamespace

    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    from ep_train.sizes import _largest_subgroup

    rng = random.Random(0)
    for _ in range(200):
        sizes = [(rng.randint(1, 50), rng.randint(50, 120)) for _ in range(rng.randint(1, 12))]
        sub_group_size = rng.randint(1, 300)
        params = [SimpleNamespace(n=n, full=f, partition_numel=lambda n=n: n) for n, f in sizes]
        groups = Stage3._create_fp16_sub_groups(SimpleNamespace(sub_group_size=sub_group_size), params)
        want = max((sum(p.n for p in g), sum(p.full for p in g)) for g in groups)
        assert _largest_subgroup(sizes, sub_group_size)[0] == want[0], (sizes, sub_group_size)
