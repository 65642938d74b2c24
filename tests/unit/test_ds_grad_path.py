"""ep_train.parallel.ds_grad_path without processes: the switch and the fp64 gradient norm.

The trainer-level check (bitwise equal losses, masters and gradient norms with the patches on and off, and
that they ran) is tests/distributed/test_offload_dedup.py::test_fast_grad_path_is_bitwise_equal.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from ep_train.config import resolve_ds_config
from ep_train.parallel.ds_grad_path import apply_fast_grad_path, fast_grad_path_enabled, fp64_norm


def test_switch_and_where_it_applies() -> None:
    for name in ("zero3", "zero3_offload"):
        ds = json.loads(resolve_ds_config(name).read_text())
        assert fast_grad_path_enabled(ds)
        assert not fast_grad_path_enabled({**ds, "ep_train": {"fast_grad_path": False}})
    assert not fast_grad_path_enabled(json.loads(resolve_ds_config("zero2").read_text()))
    assert not apply_fast_grad_path(object(), {"zero_optimization": {"stage": 2}})  # nothing to patch


def test_not_applied_to_another_optimizer() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert not apply_fast_grad_path(opt, {"zero_optimization": {"stage": 3}})
    assert not hasattr(opt, "_constant_buffered_norm2")


def _exact_norm(t: torch.Tensor) -> float:
    """An independent reference: the exactly rounded sum of the squares (math.fsum over fp64 squares)."""
    return math.sqrt(math.fsum(v * v for v in t.double().reshape(-1).tolist()))


@pytest.mark.parametrize("piece", [7, 1000, 1 << 16])
def test_fp64_norm_matches_an_exact_sum(piece: int) -> None:
    g = torch.Generator().manual_seed(0)
    # magnitudes over 6 decades: where fp32 accumulation loses digits (below)
    t = torch.randn(300_001, generator=g) * torch.logspace(-3, 3, 300_001)
    got = fp64_norm(t, piece)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_exact_norm(t), rel=1e-13)
    assert fp64_norm(t[:0], piece).item() == 0.0


def test_one_piece_is_bitwise_deepspeeds_norm() -> None:
    """DeepSpeed 0.19.8's _constant_buffered_norm2 (one 250M-element piece): `part.to(fp64).norm(2)**2.0`,
    then `**0.5`."""
    t = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    deepspeed_value = (t.to(torch.float64).norm(2) ** 2.0) ** 0.5
    assert fp64_norm(t).item() == deepspeed_value.item()


def test_fp32_accumulation_would_not_do() -> None:
    """Why fp64 at all: on this data an fp32 norm is off by more than the tolerance above (the check can fail)."""
    t = torch.randn(300_001, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 300_001)
    fp32 = torch.linalg.vector_norm(t, 2).item()
    assert abs(fp32 - _exact_norm(t)) / _exact_norm(t) > 1e-9
