"""The model on CUDA against the same model on CPU (run by bench/gpu_check.sh on a GPU machine).

Every CUDA test is skipped where ``torch.cuda.is_available()`` is false (CI); the alignment test of
the grouped-GEMM guard runs everywhere. Comparisons are fp32 CUDA vs fp32 CPU with TF32 off (only
summation order differs, so tolerances are ~1e-4 relative), except the grouped GEMM, which is bf16
against the per-expert loop in bf16 (same inputs, different kernels: bf16 rounding, ~1e-2).
"""

from __future__ import annotations

import inspect

import pytest
import torch

import ep_train.model.experts as experts_mod
from ep_train.config import ModelConfig, MoEConfig
from ep_train.model.experts import GroupedExperts, _aligned16
from ep_train.model.router import Router
from ep_train.model.transformer import build_model
from ep_train.model.dispatch import LocalDispatcher

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


@pytest.fixture(autouse=True)
def _no_tf32():
    # TF32 would make CUDA fp32 matmuls ~1e-3 off the CPU; the comparisons here want fp32 vs fp32.
    if not CUDA:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 on CPU (0 when both are 0)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_aligned16_rejects_offset_views_and_odd_strides() -> None:
    buf = torch.zeros(1024, dtype=torch.bfloat16)
    assert _aligned16(buf[:512].view(8, 64))
    assert not _aligned16(buf[1:513].view(8, 64))  # base 2 bytes past an aligned address
    assert not _aligned16(torch.zeros(8, 12, dtype=torch.bfloat16))  # row stride 24 bytes
    assert _aligned16(torch.zeros(2, 16, 8, dtype=torch.bfloat16).transpose(1, 2))


@needs_cuda
def test_router_cuda_matches_cpu() -> None:
    torch.manual_seed(0)
    r = Router(64, 8, 2, init_std=0.5)
    x = torch.randn(512, 64)
    cpu = r(x)
    gpu = r.to("cuda")(x.cuda())
    # A top-K choice may only differ where the K-th and (K+1)-th probabilities (nearly) tie.
    top = torch.topk(cpu.probs, 3, dim=-1).values
    decisive = (top[:, 1] - top[:, 2]) > 1e-5
    assert decisive.float().mean() > 0.95
    assert torch.equal(gpu.expert_ids.cpu()[decisive], cpu.expert_ids[decisive])
    assert torch.allclose(gpu.weights.cpu()[decisive], cpu.weights[decisive], rtol=1e-5, atol=1e-6)
    assert torch.allclose(gpu.probs.cpu(), cpu.probs, rtol=1e-5, atol=1e-6)
    assert abs(float(gpu.aux_loss) - float(cpu.aux_loss)) < 1e-4 * max(1.0, abs(float(cpu.aux_loss)))
    assert abs(float(gpu.z_loss) - float(cpu.z_loss)) < 1e-4 * max(1.0, abs(float(cpu.z_loss)))


@needs_cuda
@pytest.mark.parametrize("counts", [[37, 0, 64, 5, 101, 16, 1, 32], [0, 0, 0, 0, 0, 0, 0, 256]])
def test_grouped_mm_matches_expert_loop_bf16(counts: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """torch._grouped_mm (bf16) against the per-expert loop, forward and every gradient; uneven,
    empty and non-multiple-of-8 groups on purpose."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("torch._grouped_mm path is used on sm90 (Hopper) only")
    torch.manual_seed(0)
    d, f, e = 128, 256, len(counts)
    ref = GroupedExperts(d, f, e)
    for w in (ref.w1, ref.w2, ref.w3):
        torch.nn.init.normal_(w, std=0.05)
    ref = ref.to("cuda", torch.bfloat16)
    grouped = GroupedExperts(d, f, e).to("cuda", torch.bfloat16)
    grouped.load_state_dict(ref.state_dict())
    x = torch.randn(sum(counts), d, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)

    calls = []
    real = torch._grouped_mm

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    xa = x.clone().requires_grad_(True)
    ya = grouped(xa, counts)
    (ya.float() * g.float()).sum().backward()
    assert len(calls) == 3, "the grouped path was not taken on CUDA bf16"

    monkeypatch.setattr(experts_mod, "_grouped_mm_ok", lambda *a: False)  # force the per-expert loop
    xb = x.clone().requires_grad_(True)
    yb = ref(xb, counts)
    (yb.float() * g.float()).sum().backward()
    assert len(calls) == 3

    assert rel_err(ya, yb) < 2e-2
    assert rel_err(xa.grad, xb.grad) < 2e-2
    for name in ("w1", "w2", "w3"):
        ga, gb = getattr(grouped, name).grad, getattr(ref, name).grad
        for i, n in enumerate(counts):
            if n == 0:
                assert float(ga[i].abs().max()) == 0.0 and float(gb[i].abs().max()) == 0.0, (name, i)
            else:
                assert rel_err(ga[i], gb[i]) < 2e-2, (name, i)


@needs_cuda
def test_grouped_guard_falls_back_on_unaligned_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight view at an odd offset (as a ZeRO-3 gather can produce) takes the loop, not an error."""
    d, f, e = 64, 128, 4
    ex = GroupedExperts(d, f, e).to("cuda", torch.bfloat16)
    flat = torch.randn(3 * e * f * d + 1, device="cuda", dtype=torch.bfloat16)
    views = [flat[1 + i * e * f * d: 1 + (i + 1) * e * f * d] for i in range(3)]
    ex.w1.data = views[0].view(e, f, d)
    ex.w3.data = views[1].view(e, f, d)
    ex.w2.data = views[2].view(e, d, f)
    x = torch.randn(40, d, device="cuda", dtype=torch.bfloat16)
    assert not experts_mod._grouped_mm_ok(x, ex.w1, ex.w2, ex.w3)
    y = ex(x, [10, 10, 10, 10])
    assert torch.isfinite(y.float()).all()


@needs_cuda
def test_local_dispatcher_cuda_matches_cpu() -> None:
    torch.manual_seed(0)
    t, d, e, k = 300, 32, 8, 2
    x = torch.randn(t, d)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])  # [T, K], distinct experts per token
    keep = torch.rand(t, k) > 0.1
    w = torch.rand(t, k)
    disp = LocalDispatcher(e)
    xc, cc, mc = disp.dispatch(x, ids, keep, w)
    xg, cg, mg = disp.dispatch(x.cuda(), ids.cuda(), keep.cuda(), w.cuda())
    assert cc == cg and sum(cc) == int(keep.sum())
    assert torch.equal(xg.cpu(), xc)
    yc = disp.combine(xc * 2, mc)
    yg = disp.combine(xg * 2, mg)
    assert torch.allclose(yg.cpu(), yc, rtol=1e-6, atol=1e-6)
    expect = 2 * x * (w * keep).sum(1, keepdim=True)  # identity experts: combine(dispatch(x)) = x * sum(w)
    assert torch.allclose(yg.cpu(), expect, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_transformer_fp32_cuda_matches_cpu() -> None:
    """Tiny MoE transformer, forward + backward in fp32: loss, logits and every gradient."""
    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=64)
    # router_init_std 0.5: decisive routing, so CPU/CUDA rounding cannot flip a top-2 choice
    moe = MoEConfig(num_experts=4, num_experts_per_token=2, aux_loss_weight=0.01, router_z_loss_weight=0.001,
                    router_init_std=0.5)
    cpu = build_model(cfg, moe, seed=0)
    gpu = build_model(cfg, moe, seed=0).cuda()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=gen)
    tgt = torch.randint(0, cfg.vocab_size, (2, 64), generator=gen)
    oc = cpu(ids, tgt)
    og = gpu(ids.cuda(), tgt.cuda())
    for i in oc.router_stats:  # same routing decisions per layer
        assert torch.equal(og.router_stats[i].tokens_per_expert.cpu(), oc.router_stats[i].tokens_per_expert), i
    assert abs(float(og.loss) - float(oc.loss)) < 1e-4 * abs(float(oc.loss))
    assert rel_err(og.logits, oc.logits) < 1e-4
    oc.loss.backward()
    og.loss.backward()
    gp = dict(gpu.named_parameters())
    for name, p in cpu.named_parameters():
        assert p.grad is not None and gp[name].grad is not None, name
        assert rel_err(gp[name].grad, p.grad) < 1e-3, name


@needs_cuda
def test_expert_loop_backward_on_cuda_matches_cpu() -> None:
    """The hand-written backward of the per-expert loop (experts._ExpertLoop) on CUDA fp32 against CPU fp32:
    output and every gradient; an empty group included."""
    torch.manual_seed(0)
    counts = [37, 0, 64, 5]
    d, f = 64, 96
    ws = [torch.randn(len(counts), f, d) * 0.05, torch.randn(len(counts), d, f) * 0.05,
          torch.randn(len(counts), f, d) * 0.05]
    x, g = torch.randn(sum(counts), d), torch.randn(sum(counts), d)
    out = {}
    for dev in ("cpu", "cuda"):
        # Fresh leaves per device (x.to("cpu") is x itself: requires_grad_ on it would make the CUDA copy a non-leaf).
        xa = x.to(dev).clone().requires_grad_(True)
        wa = [w.to(dev).clone().requires_grad_(True) for w in ws]
        y = experts_mod._ExpertLoop.apply(xa, *wa, counts)
        (y * g.to(dev)).sum().backward()
        out[dev] = [y, xa.grad, *(w.grad for w in wa)]
    for a, b in zip(out["cuda"], out["cpu"]):
        assert rel_err(a, b) < 1e-5
    assert not out["cuda"][2][1].any()  # the empty expert's gate weight gradient is exactly zero


def _syncs_during(fn) -> list[str]:
    """The host syncs CUDA's sync debug mode reports while ``fn`` runs (message and where)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Each sync warns "called a synchronizing CUDA operation"; the first warning of a process only says the
    # debug mode is a prototype (seen on an H200 run, 2026-11-27) and is no sync.
    return [str(w.message)[:200] + f" ({w.filename}:{w.lineno})" for w in caught
            if "called a synchronizing" in str(w.message)]


@needs_cuda
@pytest.mark.parametrize("routing", [{}, {"capacity_factor": 1.0}])
def test_moe_forward_host_syncs(routing: dict) -> None:
    """A MoE layer's forward on CUDA, dropless or with capacity (drop policy), syncs with the host once, where
    it must: the group sizes read back for the expert matmuls. Each extra sync (bincount, boolean indexing, a
    host-to-GPU copy from pageable memory) drains the GPU's queue. The overflow policy syncs once per round
    (not covered here). The message lists the syncs found."""
    from ep_train.model.moe import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(64, 128, 8, 2, **routing).to("cuda", torch.bfloat16)
    x = torch.randn(2, 96, 64, device="cuda", dtype=torch.bfloat16)
    layer(x)  # warm up (lazy CUDA initialisation syncs)
    syncs = _syncs_during(lambda: layer(x))
    assert len(syncs) == 1, syncs
    lines, first = inspect.getsourcelines(LocalDispatcher.dispatch)
    where = first + next(i for i, ln in enumerate(lines) if "host sync: group sizes" in ln)
    assert syncs[0].endswith(f"dispatch.py:{where})"), syncs  # the one it must: the group sizes


@needs_cuda
def test_moe_backward_host_syncs() -> None:
    """The backward of a dropless MoE layer on CUDA: the group sizes are known from the forward, so it needs no
    host sync at all. The message lists the syncs found."""
    from ep_train.model.moe import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(64, 128, 8, 2).to("cuda", torch.bfloat16)
    x = torch.randn(2, 96, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x)[0].float().square().mean().backward()  # warm up
    y, stats = layer(x)
    loss = y.float().square().mean() + stats.aux_loss
    syncs = _syncs_during(lambda: loss.backward())
    assert syncs == [], syncs

    class SyncingBackward(torch.autograd.Function):  # control: a sync inside a backward is seen
        @staticmethod
        def forward(ctx, t: torch.Tensor) -> torch.Tensor:
            return t * 1

        @staticmethod
        def backward(ctx, g: torch.Tensor) -> torch.Tensor:
            return g * float(g.sum())  # .item(): one host sync

    z = SyncingBackward.apply(x).float().sum()
    assert len(_syncs_during(lambda: z.backward())) == 1
