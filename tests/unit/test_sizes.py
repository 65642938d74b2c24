"""Parameter counts from the config against a built model and against Mixtral 8x7B's published sizes."""

from __future__ import annotations

import pytest

from ep_train.config import Config
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
