"""Merging the run config into the DeepSpeed JSON, and refusing contradictions."""

from __future__ import annotations

import json

import pytest

from ep_train.config import load_config, parse_overrides
from ep_train.parallel.zero import build_ds_config, is_offloading_optimizer


def _cfg(tmp_path, ds: dict | None = None, *over: str):
    args = ["--micro_batch_size", "2", "--batch_size", "16", "--grad_clip", "0.5"]
    if ds is not None:
        p = tmp_path / "ds.json"
        p.write_text(json.dumps(ds))
        args += ["--ds_config", str(p)]
    return load_config(None, parse_overrides(args + list(over)))


def test_default_is_zero3_offload_with_run_values(tmp_path) -> None:
    ds = build_ds_config(_cfg(tmp_path), world=4, use_bf16=False)
    assert ds["zero_optimization"]["stage"] == 3 and is_offloading_optimizer(ds)
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        16, 2, 2)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False}


@pytest.mark.parametrize("ds,match", [
    ({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu = 4"),
    ({"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}, "gradient_clipping"),
    ({"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}}, "enables fp16"),
    ({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}, "optimizer"),
    ({"zero_optimization": {"stage": 0}}, "stage = 0"),
    # ep-train's own switches: a misspelt one names the known ones; a non-boolean value says what to use
    ({"zero_optimization": {"stage": 3}, "ep_train": {"fast_grad_paht": False}}, "no switch 'fast_grad_paht'.*fast_grad_path"),
    ({"zero_optimization": {"stage": 3}, "ep_train": {"dedup_offload_buffers": "no"}}, "dedup_offload_buffers = 'no'; use true"),
    ({"zero_optimization": {"stage": 3}, "ep_train": ["fast_grad_path"]}, "must be an object"),
])
def test_contradictions_are_refused(tmp_path, ds, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_ds_config(_cfg(tmp_path, ds), world=4, use_bf16=False)


def test_unknown_name_lists_known_configs(tmp_path) -> None:
    with pytest.raises(ValueError, match="zero3_offload"):
        build_ds_config(load_config(None, [("ds_config", "zero9")]), world=1, use_bf16=False)


def test_ep_train_switches_pass_through(tmp_path) -> None:
    block = {"dedup_offload_buffers": False, "fast_grad_path": True}
    ds = build_ds_config(_cfg(tmp_path, {"zero_optimization": {"stage": 3}, "ep_train": block}), world=4, use_bf16=False)
    assert ds["ep_train"] == block


NVME = {"device": "nvme", "nvme_path": "/tmp/x"}


@pytest.mark.parametrize("unit,zero,leaves", [
    ("auto", {"stage": 3}, 2), ("block", {"stage": 3}, 2), ("module", {"stage": 3}, 0), ("block", {"stage": 2}, 0),
    # parameters on NVMe: DeepSpeed swaps a block's partitions in together, one buffer each
    ("auto", {"stage": 3, "offload_param": NVME}, 0),  # DeepSpeed's default 5 buffers < a block's parameters
    ("auto", {"stage": 3, "offload_param": {**NVME, "buffer_count": 5}}, 0),
    ("auto", {"stage": 3, "offload_param": {**NVME, "buffer_count": 32}}, 2),
    ("block", {"stage": 3, "offload_param": {**NVME, "buffer_count": 32}}, 2),
    ("auto", {"stage": 3, "offload_param": {"device": "cpu"}}, 2),
])
def test_zero3_gather_marks_whole_blocks_as_leaves(unit, zero, leaves) -> None:
    """parallel.zero3_gather: block (and auto) mark each transformer block a DeepSpeed z3 leaf (its hooks stop
    there); module, a stage other than 3, or auto with too few NVMe swap buffers leave per-submodule hooks."""
    from deepspeed.utils import z3_leaf_module

    from ep_train.model.transformer import Block
    from ep_train.parallel.zero import gather_whole_blocks

    model = _tiny_meta_model(unit)
    assert gather_whole_blocks(model, {"zero_optimization": zero}, unit) == leaves
    marked = [m for m in model.modules() if z3_leaf_module(m)]
    assert len(marked) == leaves and all(isinstance(m, Block) for m in marked)


def test_zero3_gather_block_refuses_too_few_nvme_buffers() -> None:
    """An explicit block with parameters on NVMe and fewer swap buffers than a block's parameters: refused at
    start, naming the field, both values and the fix (DeepSpeed would fail at the first forward)."""
    from ep_train.parallel.zero import gather_whole_blocks

    model = _tiny_meta_model("block")
    need = max(len(list(b.parameters())) for b in model.layers)
    with pytest.raises(ValueError, match=rf"zero3_gather = 'block'.*buffer_count >= {need}.*gives 5.*auto or module"):
        gather_whole_blocks(model, {"zero_optimization": {"stage": 3, "offload_param": {**NVME, "buffer_count": 5}}},
                            "block")


def _tiny_meta_model(unit: str):
    from ep_train.model import build_model

    cfg = load_config(None, parse_overrides(["--num_layers", "2", "--hidden_size", "32", "--intermediate_size", "64",
                                             "--num_experts", "4", "--zero3_gather", unit]))
    assert cfg.parallel.zero3_gather == unit
    return build_model(cfg.model, cfg.moe, device="meta")
