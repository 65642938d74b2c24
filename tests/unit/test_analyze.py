"""analyze-experts' routing collection and comparison against a naive per-token reference."""

from __future__ import annotations

import numpy as np
import torch

from ep_train.analyze import collect_routing, compare_layers
from ep_train.config import Config
from ep_train.model.moe import MoELayer
from ep_train.model.transformer import build_model


def _model(capacity_factor: float | None = None) -> torch.nn.Module:
    c = Config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = 64, 32, 48, 2
    m.num_heads, m.num_kv_heads, m.max_seq_len = 4, 2, 32
    c.moe.num_experts, c.moe.num_experts_per_token, c.moe.moe_layers = 4, 2, [1]
    c.moe.expert_bias_update_rate, c.moe.capacity_factor = 0.001, capacity_factor  # aux-loss-free bias buffer
    model = build_model(c.model, c.moe, seed=0).eval()
    with torch.no_grad():
        next(mod for mod in model.modules() if isinstance(mod, MoELayer)).router.weight.normal_(
            std=0.5, generator=torch.Generator().manual_seed(1))
    return model


def _first_choice(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Naive reference: capture the router's input, score every expert by hand (probs + bias)."""
    layer = next(mod for mod in model.modules() if isinstance(mod, MoELayer))
    seen = []
    h = layer.router.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    hidden = seen[0].reshape(-1, seen[0].shape[-1]).float()
    probs = torch.softmax(hidden @ layer.router.weight.float().T, dim=-1)
    return (probs + layer.router.expert_bias).argmax(-1).numpy()


def test_top1_agreement_compares_the_selected_experts() -> None:
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    model = _model()
    a, _ = collect_routing(model, [x])
    router = next(mod for mod in model.modules() if isinstance(mod, MoELayer)).router
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # expert 3 now wins every first choice
    b, _ = collect_routing(model, [x])
    ref_a = _first_choice(_model(), x)
    ref_b = _first_choice(model, x)
    assert (b[1]["first"] == 3).all() and (b[1]["first"] == ref_b).all() and (a[1]["first"] == ref_a).all()
    # the probabilities did not change, the selection did: the agreement follows the selection
    np.testing.assert_array_equal(a[1]["probs"], b[1]["probs"])
    assert compare_layers(a[1], b[1])["top1_agreement"] == float((ref_a == ref_b).mean()) < 0.5


def test_analysis_routing_does_not_drop_tokens_for_a_capacity_trained_model() -> None:
    x = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(3))
    layers, _ = collect_routing(_model(capacity_factor=0.5), [x])  # training routing would drop half the slots
    assert (layers[1]["ids"] >= 0).all()


def test_expert_choice_first_expert_is_the_most_probable_expert_that_took_the_token() -> None:
    c = Config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = 64, 32, 48, 1
    m.num_heads, m.num_kv_heads, m.max_seq_len = 4, 2, 32
    c.moe.num_experts, c.moe.num_experts_per_token, c.moe.router_type = 4, 2, "expert_choice"
    c.moe.capacity_factor = 1.0
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(4))
    firsts = []
    for seed in (0, 1):
        model = build_model(c.model, c.moe, seed=seed).eval()
        layers, _ = collect_routing(model, [x])
        ids, probs = layers[0]["ids"], layers[0]["probs"]  # ids: the experts that took each token, -1 elsewhere
        ref = np.array([max((e for e in row if e >= 0), key=lambda e: p[e], default=-1) for row, p in zip(ids, probs)])
        np.testing.assert_array_equal(layers[0]["first"], ref)
        firsts.append(layers[0])
    assert len(set(firsts[0]["first"].tolist())) > 1  # not one constant expert id for every token
    assert compare_layers(*firsts)["top1_agreement"] == float((firsts[0]["first"] == firsts[1]["first"]).mean())


def test_block_by_block_routing_equals_the_whole_models() -> None:
    """analyze-experts runs a checkpoint one block at a time (init.blockwise, the model on meta): the routing
    it records, biases included, must be the whole model's, and no two blocks may exist at once."""
    from ep_train.model.init import blockwise

    c = Config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = 64, 32, 48, 3
    m.num_heads, m.num_kv_heads, m.max_seq_len = 4, 2, 32
    c.moe.num_experts, c.moe.num_experts_per_token, c.moe.moe_layers = 4, 2, [0, 2]
    c.moe.expert_bias_update_rate, m.tie_embeddings = 0.001, True
    whole = build_model(c.model, c.moe, seed=3).eval()
    biases = {"0": [0.0, 0.3, 0.0, 0.0], "2": [0.0, 0.0, 0.0, 0.2]}
    for i, b in biases.items():
        whole.layers[int(i)].ffn.router.expert_bias.copy_(torch.tensor(b))
    state = whole.state_dict()

    def source(name: str, shape: tuple[int, ...], expert_ids: list[int] | None) -> torch.Tensor:
        value = state[name]
        return (value[expert_ids] if expert_ids is not None else value).clone()

    xs = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (4, 5)]
    want, tokens = collect_routing(whole, xs)
    lazy = build_model(c.model, c.moe, device="meta").eval()
    got, got_tokens = collect_routing(lazy, xs, source, biases)
    np.testing.assert_array_equal(tokens, got_tokens)
    assert sorted(got) == sorted(want) == [0, 2]
    for i in want:
        for key in ("ids", "first", "probs"):
            np.testing.assert_array_equal(want[i][key], got[i][key])
    unbiased, _ = collect_routing(lazy, xs, source)  # a lost bias would show: it moves selections here
    assert any((unbiased[i]["ids"] != want[i]["ids"]).any() for i in want)

    made: list[list[int]] = []
    blockwise(lazy, source, xs, lambda i, _: made.append([j for j, blk in enumerate(lazy.layers)
                                                          if not next(blk.parameters()).is_meta]))
    assert made == [[0], [1], [2]] and all(p.is_meta for p in lazy.parameters())
    assert lazy.lm_head.weight is lazy.embed.weight  # still tied
