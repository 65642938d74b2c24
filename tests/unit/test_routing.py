"""Routing, losses, capacity and the MoE layer against the naive per-token references."""

from __future__ import annotations

import pytest
import torch

from ep_train.model.moe import MoELayer
from ep_train.model.router import Router, expert_capacity
from tests.reference import naive_aux_loss, naive_capacity, naive_moe, naive_route, naive_swiglu, naive_z_loss

T, D, E = 40, 16, 6


def _router(k: int, cf: float | None = None, policy: str = "drop", seed: int = 0) -> Router:
    torch.manual_seed(seed)
    r = Router(D, E, k, init_std=0.5, capacity_factor=cf, drop_policy=policy)  # big init: decisive, skewed routing
    return r


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("cf,policy", [(None, "drop"), (0.5, "drop"), (1.0, "drop"), (0.5, "overflow"),
                                       (1.0, "overflow"), (0.25, "overflow")])
def test_routing_matches_naive(k: int, cf: float | None, policy: str) -> None:
    r = _router(k, cf, policy)
    x = torch.randn(T, D)
    out = r(x)
    logits = x @ r.weight.T
    # moe.normalize_top_k auto: renormalised for K >= 2 (Mixtral), the raw probability for K = 1 (Switch)
    probs, ids, weights, norms = naive_route(logits, k, normalize=k >= 2)
    assert torch.allclose(out.logits, logits, atol=1e-6)
    assert torch.allclose(out.aux_loss, naive_aux_loss(probs, ids, E), atol=1e-6)
    assert out.z_loss.item() == pytest.approx(naive_z_loss(logits), rel=1e-5)
    if cf is not None:
        cap = exact_capacity(T, E, k, str(cf))
        ids, weights, keep = naive_capacity(probs, ids, weights, norms, E, cap, policy)
        assert not all(all(row) for row in keep) or policy == "overflow", "test should force drops"
    else:
        keep = [[True] * k for _ in range(T)]
    assert out.expert_ids.tolist() == ids
    assert out.keep.tolist() == keep
    assert torch.allclose(out.weights, torch.tensor([[float(torch.as_tensor(w).detach()) for w in row] for row in weights]), atol=1e-6)
    if cf is not None:
        counts = torch.bincount(out.expert_ids[out.keep], minlength=E)
        assert int(counts.max()) <= exact_capacity(T, E, k, str(cf))


def exact_capacity(tokens: int, experts: int, k: int, factor: str) -> int:
    """ceil(tokens * k * factor / experts) in integers, ``factor`` as the decimal written ("1.1" = 11/10):
    the reference for ``expert_capacity``, which must not round binary float noise up."""
    whole, _, frac = factor.partition(".")
    num, den = int(whole + frac), 10 ** len(frac)
    return -(-(tokens * k * num) // (experts * den))


def test_expert_capacity_is_exact() -> None:
    """A sweep against integer arithmetic: ceil of the float product gave 56 for 100 tokens / 2 experts
    x 1.1 (100 / 2 * 1.1 = 55.000000000000007), and many more such cases."""
    assert expert_capacity(100, 2, 1, 1.1) == 55
    factors = ["0.1", "0.3", "0.7", "1.0", "1.1", "1.2", "1.25", "1.3", "1.4", "1.5", "1.7", "2.2", "3.3"]
    wrong = [(t, e, k, f, expert_capacity(t, e, k, float(f)), exact_capacity(t, e, k, f))
             for t in range(1, 257) for e in (1, 2, 3, 4, 6, 8) for k in (1, 2, 3) for f in factors
             if expert_capacity(t, e, k, float(f)) != exact_capacity(t, e, k, f)]
    assert not wrong, wrong[:10]


def test_overflow_reroutes_instead_of_dropping() -> None:
    r_drop, r_over = _router(2, 1.0, "drop"), _router(2, 1.0, "overflow")
    x = torch.randn(T, D)
    dropped, over = r_drop(x), r_over(x)
    assert (~dropped.keep).sum() > 0
    assert (~over.keep).sum() < (~dropped.keep).sum()  # capacity T*K/E*1.0 fits everyone when rerouted
    # Every token still uses distinct experts.
    kept = over.expert_ids.tolist()
    assert all(len(set(row)) == len(row) for row in kept)


def test_balanced_router_scores_one_and_z_loss_definition() -> None:
    r = Router(D, E, 2)
    torch.nn.init.zeros_(r.weight)  # uniform probabilities
    x = torch.randn(E * 10, D)
    out = r(x)
    # Uniform P_i = 1/E; whatever f is, E * sum(f_i / E) = sum f_i = 1.
    assert out.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    assert out.z_loss.item() == pytest.approx(torch.log(torch.tensor(float(E))).item() ** 2, rel=1e-6)


def test_noise_and_jitter_only_in_training() -> None:
    torch.manual_seed(0)
    r = Router(D, E, 2, router_type="noisy_topk", jitter_noise=0.1)
    torch.nn.init.normal_(r.noise_weight, std=1.0)
    x = torch.randn(T, D)
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a.logits, b.logits) and torch.allclose(a.logits, x @ r.weight.T, atol=1e-6)
    r.train()
    c = r(x)
    assert not torch.allclose(c.logits, a.logits)
    c.logits.sum().backward()
    assert r.noise_weight.grad is not None and r.noise_weight.grad.abs().sum() > 0  # noise scale is learned


def _layer(k: int, cf: float | None, policy: str, shared: int, normalize: bool | None = True) -> MoELayer:
    torch.manual_seed(1)
    # normalize True by default: naive_moe renormalises the top-K weights (Mixtral) for every K
    layer = MoELayer(D, 24, E, k, capacity_factor=cf, drop_policy=policy, num_shared_experts=shared,
                     router_init_std=0.5, normalize_top_k=normalize)
    for w in (layer.experts.w1, layer.experts.w2, layer.experts.w3):
        torch.nn.init.normal_(w, std=0.2)
    return layer


@pytest.mark.parametrize("k,cf,policy,shared", [(1, None, "drop", 0), (2, None, "drop", 1), (3, None, "drop", 0),
                                                (2, 0.5, "drop", 0), (2, 0.5, "overflow", 2), (1, 0.75, "drop", 0)])
def test_moe_layer_matches_naive_loop(k: int, cf: float | None, policy: str, shared: int) -> None:
    layer = _layer(k, cf, policy, shared)
    x = torch.randn(T, D, requires_grad=True)
    g = torch.randn(T, D)
    y, stats = layer(x.view(2, T // 2, D))
    ((y.view(T, D) * g).sum() + stats.aux_loss + stats.z_loss).backward()

    params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    x2 = x.detach().clone().requires_grad_(True)
    shared_fn = None
    if shared:
        def shared_fn(v: torch.Tensor) -> torch.Tensor:
            return naive_swiglu(v, params["shared_experts.w1.weight"], params["shared_experts.w3.weight"],
                                params["shared_experts.w2.weight"])
    cap = exact_capacity(T, E, k, str(cf)) if cf is not None else None
    y2 = naive_moe(x2, params["router.weight"], params["experts.w1"], params["experts.w3"],
                   params["experts.w2"], k, cap, policy, shared_fn)
    logits = x2 @ params["router.weight"].T
    probs, ids, _, _ = naive_route(logits, k)
    ((y2 * g).sum() + naive_aux_loss(probs, ids, E) + naive_z_loss_t(logits)).backward()

    assert torch.allclose(y.view(T, D), y2, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    for n, p in layer.named_parameters():
        assert torch.allclose(p.grad, params[n].grad, atol=1e-5), n
    if cf is not None and policy == "drop":
        assert stats.dropped.item() > 0


def naive_z_loss_t(logits: torch.Tensor) -> torch.Tensor:
    # differentiable version of the definition for the gradient check
    return torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in logits]).mean()


def test_top1_router_learns_from_the_lm_loss_like_a_naive_switch_loop() -> None:
    """K = 1 with moe.normalize_top_k auto: y_t = p_te * FFN_e(x_t) (Switch Transformer), so a loss on the
    output alone (the LM loss; no aux or z-loss here) reaches the router. Renormalising would make every
    weight p / p = 1 and that gradient ~1e-7. Output and gradients equal a per-token loop's."""
    layer = _layer(1, None, "drop", 0, normalize=None)
    x = torch.randn(T, D, requires_grad=True)
    g = torch.randn(T, D)
    y, _ = layer(x.view(2, T // 2, D))
    (y.view(T, D) * g).sum().backward()

    params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    x2 = x.detach().clone().requires_grad_(True)
    rows = []
    for t in range(T):
        p = torch.softmax(params["router.weight"] @ x2[t], dim=-1)
        e = max(range(E), key=lambda j: (p[j].item(), -j))
        rows.append(p[e] * naive_swiglu(x2[t], params["experts.w1"][e], params["experts.w3"][e],
                                        params["experts.w2"][e]))
    y2 = torch.stack(rows)
    (y2 * g).sum().backward()

    assert torch.allclose(y.view(T, D), y2, atol=1e-5)
    router_grad = layer.router.weight.grad
    assert router_grad.norm().item() > 1e-2  # ~1e-7 when the top-1 weight was renormalised to 1
    assert torch.allclose(router_grad, params["router.weight"].grad, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_top1_model_router_gets_a_gradient_from_the_lm_loss_alone() -> None:
    """The whole model with the config's defaults at K = 1 and every router loss off: lm_loss alone moves
    every router, by about as much as at K = 2."""
    from ep_train.config import Config, validate
    from ep_train.model import build_model

    norms = {}
    for k in (1, 2):
        c = Config()
        c.model.vocab_size, c.model.hidden_size, c.model.intermediate_size = 64, 32, 48
        c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = 2, 4, 2
        c.moe.num_experts, c.moe.num_experts_per_token = 4, k
        c.moe.aux_loss_weight = c.moe.router_z_loss_weight = 0.0
        validate(c, check_paths=False)
        model = build_model(c.model, c.moe, seed=3)
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        model(ids, ids.roll(-1, 1)).lm_loss.backward()
        norms[k] = [m.router.weight.grad.norm().item() for m in model.modules() if isinstance(m, MoELayer)]
    assert len(norms[1]) == 2 and all(n > 0.05 * min(norms[2]) for n in norms[1]), norms


def test_empty_input_still_touches_every_expert_weight() -> None:
    layer = _layer(2, None, "drop", 0)
    y, stats = layer(torch.zeros(0, D))
    (y.sum() + stats.aux_loss).backward()
    for w in (layer.experts.w1, layer.experts.w2, layer.experts.w3):
        assert w.grad is not None and torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_combine_matches_index_add(dtype: torch.dtype) -> None:
    """combine_slots with weights (a multiply-add per slot, gather backward): values and the gradients of
    rows and weights against autograd over zeros + index_add of w * y, for 1-4 slots with empty ones."""
    from ep_train.model.dispatch import combine_slots, slot_layout

    g = torch.Generator().manual_seed(3)
    s, d = 6, 5
    for c in (1, 2, 3, 4):
        slot = torch.randperm(s * c, generator=g)[: (s * c * 2) // 3]  # a third of the slots empty
        lay = slot_layout(slot, s, c)
        rows = slot // c
        y = torch.randn(len(slot), d, generator=g).to(dtype).requires_grad_()
        w = torch.rand(len(slot), generator=g).to(dtype).requires_grad_()
        dz = torch.randn(s, d, generator=g).to(dtype)
        y_ref, w_ref = y.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = torch.zeros(s, d, dtype=torch.float64).index_add(0, rows, y_ref * w_ref[:, None])
        ref.backward(dz.double())
        out = combine_slots(y, w, lay)
        out.backward(dz)
        tol = dict(rtol=8e-3, atol=8e-3) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, **tol)
        torch.testing.assert_close(y.grad.double(), y_ref.grad, **tol)
        torch.testing.assert_close(w.grad.double(), w_ref.grad, **tol)


def test_count_ids_is_bincount() -> None:
    """The sync-free count (scatter-add) equals torch.bincount, empty input and unused bins included."""
    from ep_train.model.router import count_ids

    g = torch.Generator().manual_seed(5)
    for shape, bins in (((40, 2), 6), ((0, 2), 4), ((7,), 9)):
        ids = torch.randint(0, bins - 1, shape, generator=g)  # the last bin stays empty
        assert torch.equal(count_ids(ids, bins), torch.bincount(ids.reshape(-1), minlength=bins))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_sum_is_the_sum_over_slots(dtype: torch.dtype) -> None:
    """slot_sum (one add per slot on CPU) against torch's sum over C, for 1-4 slots."""
    from ep_train.model.dispatch import slot_sum

    g = torch.Generator().manual_seed(7)
    for c in (1, 2, 3, 4):
        buf = torch.randn(9, c, 6, generator=g).to(dtype)
        exact = buf.double().sum(1)  # exact for these few terms
        got = slot_sum(buf)
        assert got.shape == (9, 6) and got.dtype == dtype
        if c <= 2:  # one rounding of the exact sum
            assert torch.equal(got, exact.to(dtype)), c
        else:  # fp32: the same terms added in another order; bf16: one rounding of an fp32 sum
            torch.testing.assert_close(got.double(), exact, rtol=8e-3 if dtype == torch.bfloat16 else 1e-6,
                                       atol=1e-6)


def test_expand_and_unweighted_combine_are_adjoint_gathers() -> None:
    """expand (x[row of each grouped row]) and combine_slots without weights (each slot row's sum):
    values and gradients against index_select / index_add, with empty slots in the layout."""
    from ep_train.model.dispatch import combine_slots, expand, slot_layout

    g = torch.Generator().manual_seed(8)
    s, c, d = 5, 3, 4
    slot = torch.tensor([0, 4, 2, 7, 9, 13, 14, 3])  # 8 of 15 slots, rows 0, 1, 0, 2, 3, 4, 4, 1
    lay = slot_layout(slot, s, c)
    rows = slot // c
    x = torch.randn(s, d, generator=g, requires_grad=True)
    dy = torch.randn(len(slot), d, generator=g)
    out = expand(x, lay)
    out.backward(dy)
    torch.testing.assert_close(out, x.detach()[rows])
    torch.testing.assert_close(x.grad, torch.zeros(s, d).index_add(0, rows, dy))
    y = torch.randn(len(slot), d, generator=g, requires_grad=True)
    dz = torch.randn(s, d, generator=g)
    z = combine_slots(y, None, lay)
    z.backward(dz)
    torch.testing.assert_close(z, torch.zeros(s, d).index_add(0, rows, y.detach()))
    torch.testing.assert_close(y.grad, dz[rows])
