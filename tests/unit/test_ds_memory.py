"""ep_train.parallel.ds_memory without processes: the switch, the bf16 accumulation default, the version guard.

The trainer-level checks (bitwise equal losses, shared storage, peak RSS) are in
tests/distributed/test_offload_dedup.py.
"""

from __future__ import annotations

import json

from ep_train.config import load_config, parse_overrides, resolve_ds_config
from ep_train.parallel.ds_memory import dedup_enabled, lean_offload_buffers, unsupported_reason
from ep_train.parallel.zero import build_ds_config


def _cfg(tmp_path, ds: dict | None = None):
    args = ["--micro_batch_size", "2", "--batch_size", "16"]
    if ds is not None:
        p = tmp_path / "ds.json"
        p.write_text(json.dumps(ds))
        args += ["--ds_config", str(p)]
    return load_config(None, parse_overrides(args))


def test_switch_and_where_it_applies() -> None:
    offload = json.loads(resolve_ds_config("zero3_offload").read_text())
    assert dedup_enabled(offload)  # on by default
    assert not dedup_enabled({**offload, "ep_train": {"dedup_offload_buffers": False}})
    assert not dedup_enabled(json.loads(resolve_ds_config("zero3").read_text()))  # no optimizer offload
    assert not dedup_enabled({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})


def test_bf16_accumulates_in_fp32_where_the_buffers_are_shared(tmp_path) -> None:
    assert build_ds_config(_cfg(tmp_path), 4, use_bf16=True)["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in build_ds_config(_cfg(tmp_path), 4, use_bf16=False)  # fp32 already is
    offload = json.loads(resolve_ds_config("zero3_offload").read_text())
    off = build_ds_config(_cfg(tmp_path, {**offload, "ep_train": {"dedup_offload_buffers": False}}), 4, True)
    assert "data_types" not in off  # without sharing an fp32 buffer would cost 2 more bytes per parameter
    given = build_ds_config(_cfg(tmp_path, {**offload, "data_types": {"grad_accum_dtype": "bf16"}}), 4, True)
    assert given["data_types"] == {"grad_accum_dtype": "bf16"}  # the JSON wins


def test_patches_exist_only_inside_the_context() -> None:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    assert unsupported_reason() is None  # the pinned DeepSpeed 0.19.8
    before = (Stage3._create_fp32_partitions, Stage3.set_grad_positions)
    with lean_offload_buffers(json.loads(resolve_ds_config("zero3_offload").read_text())):
        assert (Stage3._create_fp32_partitions, Stage3.set_grad_positions) != before
    assert (Stage3._create_fp32_partitions, Stage3.set_grad_positions) == before
    with lean_offload_buffers(json.loads(resolve_ds_config("zero3").read_text())):  # nothing to share: untouched
        assert (Stage3._create_fp32_partitions, Stage3.set_grad_positions) == before
