"""GroupedExperts' per-group loop and its hand-written backward, against autograd over a plain loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ep_train.model.experts import GroupedExperts, _ExpertLoop


def _naive(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Autograd reference: each expert's SwiGLU on its rows, written the textbook way."""
    outs, start = [], 0
    for i, c in enumerate(counts):
        xi = x[start:start + c]
        outs.append((F.silu(xi @ w1[i].T) * (xi @ w3[i].T)) @ w2[i].T)
        start += c
    return torch.cat(outs)


@pytest.mark.parametrize("counts", [[5, 3, 0, 9], [0, 0, 0, 0], [17]])
def test_forward_and_gradients_match_autograd(counts: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    e, d, f = len(counts), 12, 20
    ex = GroupedExperts(d, f, e)
    for w in ex.parameters():
        w.data.copy_(torch.randn(w.shape, generator=g) * 0.3)
    x = torch.randn(sum(counts), d, generator=g, requires_grad=True)
    dy = torch.randn(sum(counts), d, generator=g)
    ref_w = [w.detach().clone().requires_grad_() for w in (ex.w1, ex.w2, ex.w3)]
    x_ref = x.detach().clone().requires_grad_()
    y_ref = _naive(x_ref, *ref_w, counts)
    y_ref.backward(dy)
    y = ex(x, counts)
    y.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for w, r in zip((ex.w1, ex.w2, ex.w3), ref_w):
        assert w.grad is not None and w.grad.shape == w.shape
        torch.testing.assert_close(w.grad, r.grad if r.grad is not None else torch.zeros_like(r), rtol=1e-5, atol=1e-6)
    for i, c in enumerate(counts):
        if c == 0:  # an expert without tokens gets an exact zero gradient (ZeRO-3 expects one for every weight)
            assert not ex.w1.grad[i].any() and not ex.w2.grad[i].any() and not ex.w3.grad[i].any()


def test_gradcheck_fp64() -> None:
    g = torch.Generator().manual_seed(1)
    counts = [3, 0, 4]
    x = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w3 = torch.randn(3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _ExpertLoop.apply(*a, counts), (x, w1, w2, w3))


def test_keeps_two_activations_per_row() -> None:
    """Saved for backward: the input, the three weights, gate and up ([N, F] each), nothing else."""
    counts = [4, 6]
    ex = GroupedExperts(8, 16, 2)
    x = torch.randn(10, 8, requires_grad=True)
    y = ex(x, counts)
    saved = [t for t in y.grad_fn.saved_tensors]
    assert sorted(tuple(t.shape) for t in saved) == sorted([(10, 8), (2, 16, 8), (2, 8, 16), (2, 16, 8),
                                                             (10, 16), (10, 16)])


def test_grouped_mm_whenever_it_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch._grouped_mm can run (as on an sm90 GPU; torch runs it on CPU too), GroupedExperts uses it
    at every expert count, one included (bench/gpu_experts.py's H200 measurements); LOOP_MAX_LOCAL_EXPERTS,
    0, still sends that many experts or fewer to the loop. Both paths give the plain loop's values."""
    import ep_train.model.experts as experts_mod

    monkeypatch.setattr(experts_mod, "_grouped_mm_ok", lambda *a: True)
    calls: list[int] = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(4)
    for loop_max, e, grouped in ((0, 1, True), (0, 2, True), (0, 8, True), (2, 2, False), (2, 3, True)):
        monkeypatch.setattr(experts_mod, "LOOP_MAX_LOCAL_EXPERTS", loop_max)
        ex = GroupedExperts(16, 32, e)
        for w in ex.parameters():
            w.data.copy_(torch.randn(w.shape, generator=g) * 0.3)
        counts = [3 + i for i in range(e)]
        x = torch.randn(sum(counts), 16, generator=g)
        calls.clear()
        y = ex(x, counts)
        assert len(calls) == (3 if grouped else 0), (loop_max, e)
        torch.testing.assert_close(y, _naive(x, ex.w1, ex.w2, ex.w3, counts).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not hasattr(torch._C, "_storage_Use_Count"), reason="this torch cannot count storage references")
def test_weight_gradient_memory_is_reused_only_once_dropped() -> None:
    """_GradScratch hands the host memory out again only when nothing references it any more."""
    from ep_train.model.experts import _GradScratch

    scratch = _GradScratch()
    likes = (torch.empty(2, 3, 4), torch.empty(2, 4, 3), torch.empty(2, 3, 4))
    first = scratch.take(likes)
    assert [t.shape for t in first] == [t.shape for t in likes] and all(t.is_contiguous() for t in first)
    ptr = first[0].data_ptr()
    assert len({t.data_ptr() for t in first}) == 3  # three distinct regions of one storage
    kept = first[1]
    kept.fill_(7.0)
    del first
    second = scratch.take(likes)  # `kept` still references the storage: fresh memory
    assert second[0].data_ptr() != ptr
    for t in second:
        t.fill_(-1.0)
    assert bool((kept == 7.0).all())  # untouched
    handle = kept.untyped_storage()  # the storage object itself, held without any tensor
    del kept, second
    assert scratch.take(likes)[0].data_ptr() != ptr  # held through `handle`: fresh memory again
    del handle
    third = scratch.take(likes)  # now free: reused
    assert third[0].data_ptr() == ptr


def _seeded_layers(seed: int, n: int, counts: list[int], d: int = 8, f: int = 12):  # type: ignore[no-untyped-def]
    """``n`` expert layers with seeded weights, their autograd-loop copies, and the generator for the inputs."""
    g = torch.Generator().manual_seed(seed)
    layers = [GroupedExperts(d, f, len(counts)) for _ in range(n)]
    for ex in layers:
        for w in ex.parameters():
            w.data.copy_(torch.randn(w.shape, generator=g) * 0.3)
    refs = [[w.detach().clone().requires_grad_() for w in (ex.w1, ex.w2, ex.w3)] for ex in layers]
    return g, layers, refs


def _backward_both(x: torch.Tensor, layers, refs, counts: list[int]) -> None:  # type: ignore[no-untyped-def]
    """The layers in sequence and the autograd loop in sequence on ``x``, each loss backward."""
    y, y_ref = x, x
    for ex, ref in zip(layers, refs):
        y, y_ref = ex(y, counts), _naive(y_ref, *ref, counts)
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()


def test_gradients_accumulate_exactly_when_layers_keep_theirs() -> None:
    """Two expert layers, two backward passes without zero_grad (gradient accumulation in plain PyTorch: every
    layer's gradient stays referenced), against the autograd loop: no layer's gradient is overwritten by
    another's through reused memory."""
    counts = [3, 5, 0, 4]
    g, layers, refs = _seeded_layers(2, 2, counts)
    for _ in range(2):  # two micro-batches
        _backward_both(torch.randn(sum(counts), 8, generator=g), layers, refs, counts)
    for ex, ref in zip(layers, refs):
        for w, r in zip((ex.w1, ex.w2, ex.w3), ref):
            torch.testing.assert_close(w.grad, r.grad, rtol=1e-5, atol=1e-6)


def test_gradients_match_autograd_when_each_is_taken_and_dropped_as_zero_does() -> None:
    """The path the reuse is for: each weight gradient is copied away and dropped as soon as it is accumulated
    (what ZeRO's hooks do), so the next layer's gradients are written into the same memory; every copy must still
    equal autograd's over the plain loop."""
    counts = [4, 0, 6]
    g, layers, refs = _seeded_layers(3, 3, counts)
    taken: dict[int, torch.Tensor] = {}
    ptrs: set[int] = set()

    def take_and_drop(p: torch.nn.Parameter) -> None:
        ptrs.add(p.grad.untyped_storage().data_ptr())
        taken[id(p)] = p.grad.clone()
        p.grad = None

    for ex in layers:
        for w in ex.parameters():
            w.register_post_accumulate_grad_hook(take_and_drop)
    _backward_both(torch.randn(sum(counts), 8, generator=g), layers, refs, counts)
    if hasattr(torch._C, "_storage_Use_Count"):
        assert len(ptrs) == 1  # the three layers' gradients shared one storage, one layer after another
    for ex, ref in zip(layers, refs):
        for w, r in zip((ex.w1, ex.w2, ex.w3), ref):
            torch.testing.assert_close(taken[id(w)], r.grad if r.grad is not None else torch.zeros_like(r),
                                       rtol=1e-5, atol=1e-6)
