"""Activation-checkpointing policies (train.recompute): same loss and gradients as no recompute, with
the right modules swapped, and no recompute (or grad) in eval/generation."""

from __future__ import annotations

import pytest
import torch

from ep_train.config import Config, validate
from ep_train.model import build_model
from ep_train.model.moe import MoELayer
from ep_train.model.transformer import Attention, Block
from ep_train.parallel import checkpoint_blocks


def _cfg() -> Config:
    c = Config()
    c.model.vocab_size, c.model.hidden_size, c.model.intermediate_size = 64, 32, 48
    c.model.num_layers, c.model.num_heads, c.model.num_kv_heads, c.model.max_seq_len = 3, 4, 2, 32
    c.moe.num_experts, c.moe.num_experts_per_token, c.moe.moe_layers = 4, 2, [0, 2]
    c.moe.router_jitter_noise, c.moe.expert_dropout = 0.1, 0.3  # random draws must replay in the recompute
    c.data.seq_len = 16
    validate(c, check_paths=False)
    return c


@pytest.mark.parametrize("policy,target", [("full", Block), ("attention", Attention), ("experts", MoELayer)])
def test_policy_matches_no_recompute(policy: str, target: type) -> None:
    c = _cfg()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    grads, losses = [], []
    for recompute in (False, True):
        model = build_model(c.model, c.moe, seed=1)
        if recompute:
            checkpoint_blocks(model, policy)
            swapped = [m for m in model.modules() if type(m).__name__.startswith("Checkpointed")]
            assert swapped and all(isinstance(m, target) for m in swapped)
            assert len(swapped) == sum(isinstance(m, target) for m in model.modules())
        torch.manual_seed(5)
        out = model(x, x.roll(-1, 1))
        out.loss.backward()
        losses.append(out.loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        stats = out.router_stats
        assert sorted(stats) == [0, 2] and all(int(s.tokens_per_expert.sum()) > 0 for s in stats.values())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
    # names unchanged (checkpoints, export)
    assert [n for n, _ in build_model(c.model, c.moe).named_parameters()] == list(grads[1])


def test_bad_policy_is_refused() -> None:
    c = _cfg()
    c.train.recompute = "mlp"
    with pytest.raises(ValueError, match=r"train\.recompute.*'mlp'.*'attention'"):
        validate(c, check_paths=False)
