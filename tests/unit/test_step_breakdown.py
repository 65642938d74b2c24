"""bench/step_breakdown.py's classifier on a hand-made Chrome trace (microseconds), against sums done by hand."""

from __future__ import annotations

import pytest

from bench.step_breakdown import CATEGORIES, arrival_waits, classify


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


def _rank_trace(calls: list[tuple[str, float, float, float]], matmuls: tuple[tuple[float, float], ...] = ()) -> dict:
    """A step of 0..100 whose main thread makes the given collective calls: (op, start, op duration, next recorded
    event's start: the wait runs until then), and matmuls (start, duration)."""
    events = [_ev("ProfilerStep#3", 0, 100, cat="user_annotation")] + [_ev("aten::mm", t, d) for t, d in matmuls]
    for name, start, dur, resume in calls:
        events += [_ev(name, start, dur), _ev("aten::mul", resume, 1)]
    return {"traceEvents": events}


def test_arrival_waits_pair_the_ranks_calls() -> None:
    """Rank 0 reaches the all-to-all at 10 and rank 1 at 25: rank 0 waited 15 of its 16 us there; rank 1 reaches
    the reduce-scatter at 50, rank 0 at 70, but rank 1 was in it only 8 us (the cap)."""
    r0 = _rank_trace([("c10d::alltoall_base_", 10, 1, 26), ("c10d::_reduce_scatter_base_", 70, 1, 75)],
                     matmuls=((30, 20),))  # rank 0's work before the reduce-scatter: 20 us of matmul
    r1 = _rank_trace([("c10d::alltoall_base_", 25, 1, 26), ("c10d::_reduce_scatter_base_", 50, 1, 58)],
                     matmuls=((5, 12), (27, 3)))  # 12 us before the all-to-all, 3 before the reduce-scatter
    got = arrival_waits({0: r0, 1: r1})
    assert got is not None
    assert got[0]["all-to-all"] == pytest.approx(0.015) and got[1]["all-to-all"] == pytest.approx(0.0)
    assert got[1]["ZeRO reduce-scatters"] == pytest.approx(0.008) and got[0]["ZeRO reduce-scatters"] == 0.0
    # how much earlier each arrived than the last rank, and the last rank's extra matmul time before that call
    assert got[0]["arrived_early"] == pytest.approx(0.015) and got[1]["arrived_early"] == pytest.approx(0.020)
    assert got[0]["late_matmuls"] == pytest.approx(0.012) and got[1]["late_matmuls"] == pytest.approx(0.017)
    # a call inside an event that ends first (a gradient hook returning): its time ends there, as in classify
    hooked = _rank_trace([("c10d::alltoall_base_", 10, 1, 30)])
    hooked["traceEvents"].append(_ev("torch::autograd::AccumulateGrad", 8, 6))  # 8..14
    late = _rank_trace([("c10d::alltoall_base_", 25, 1, 26)])
    assert arrival_waits({0: hooked, 1: late})[0]["all-to-all"] == pytest.approx(0.004)  # 10..14, not 10..25
    # calls that do not pair up (another op, or one call more) are not matched
    r2 = _rank_trace([("c10d::allreduce_", 25, 1, 26), ("c10d::_reduce_scatter_base_", 50, 1, 58)])
    assert arrival_waits({0: r0, 1: r2}) is None
    assert arrival_waits({0: r0, 1: _rank_trace([("c10d::alltoall_base_", 25, 1, 26)])}) is None


def test_fused_attention_counts_as_dense_matmuls() -> None:
    """SDPA's fused CPU kernel (attention's two matmuls and the softmax between them in one op), forward and
    backward, with the allocation inside it: dense matmul time, like the unfused attention's aten::bmm."""
    trace = {"traceEvents": [
        _ev("ProfilerStep#3", 0, 100, cat="user_annotation"),
        _ev("aten::_scaled_dot_product_flash_attention_for_cpu", 10, 20),          # 10..30
        _ev("aten::empty", 12, 2),                                                 # inside it
        _ev("aten::_scaled_dot_product_flash_attention_for_cpu_backward", 40, 15),  # 40..55
        _ev("aten::softmax", 60, 5),                                               # unfused: other
        _ev("aten::_scaled_dot_product_attention_math", 70, 20),                   # the math fallback: its
        _ev("aten::bmm", 72, 6),                                                   # ops decide (bmm: matmul,
        _ev("aten::_softmax", 80, 4),                                              # softmax: other)
    ]}
    got = classify(trace)
    assert got["dense matmuls"] == pytest.approx(0.020 + 0.015 + 0.006)
    assert got["other"] == pytest.approx(0.100 - 0.041)
