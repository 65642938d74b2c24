"""bench/step_breakdown.py's classifier on a hand-made Chrome trace (microseconds), against sums done by hand."""

from __future__ import annotations

import pytest

from bench.step_breakdown import CATEGORIES, classify


def _ev(name: str, ts: float, dur: float, tid: int = 1, cat: str = "cpu_op") -> dict:
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid, "cat": cat, "args": {}}


def test_wait_after_a_collective_op_goes_to_the_collective() -> None:
    """ZeRO-3's gradient hook under AccumulateGrad: the reduce-scatter op returns after 1 ms, the caller then
    blocks 5 ms in work.wait() (no event), copies for 2 ms, runs Python for 1 ms."""
    trace = {"traceEvents": [
        _ev("ProfilerStep#3", 0, 100, cat="user_annotation"),
        _ev("aten::mm", 0, 20),                                      # a dense matmul
        _ev("torch::autograd::AccumulateGrad", 30, 10),              # 30..40
        _ev("c10d::_reduce_scatter_base_", 31, 1),                   # 31..32, then waits 32..37
        _ev("aten::copy_", 37, 2),                                   # 37..39, then 39..40 Python
        _ev("aten::all_to_all", 50, 4, cat="user_annotation"),       # 50..54, then 54..60 top-level gap
        _ev("aten::mul", 60, 3),
        _ev("gloo:worker", 0, 30, tid=2),                            # another thread: ignored
    ]}
    got = classify(trace)
    assert sum(got[c] for c in CATEGORIES) == pytest.approx(got["step"]) == pytest.approx(0.100)
    assert got["dense matmuls"] == pytest.approx(0.020)
    assert got["ZeRO reduce-scatters"] == pytest.approx(0.001 + 0.005)
    assert got["collective_waits"] == pytest.approx(0.005 + 0.006)  # the reduce-scatter's and the all-to-all's
    assert got["all-to-all"] == pytest.approx(0.004 + 0.006)
    # 20..30 and 40..50 and 63..100 top-level Python, 30..31 hook Python, copy 2, 39..40 Python, mul 3
    assert got["other"] == pytest.approx(0.010 + 0.010 + 0.037 + 0.001 + 0.002 + 0.001 + 0.003)
