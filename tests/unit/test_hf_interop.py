"""from_hf_mixtral against Hugging Face's own MixtralForCausalLM (random tiny models, save_pretrained)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ep_train.interop.hf import from_hf_mixtral  # noqa: E402


@pytest.mark.parametrize("kw", [
    # k = 1 (Switch-style), MHA, tied embeddings
    dict(num_experts_per_tok=1, num_local_experts=4, num_attention_heads=4, num_key_value_heads=4,
         tie_word_embeddings=True),
    # k = 2, GQA, untied embeddings, explicit head_dim
    dict(num_experts_per_tok=2, num_local_experts=6, num_attention_heads=8, num_key_value_heads=2,
         tie_word_embeddings=False, head_dim=8),
])
def test_logits_equal_hugging_face(tmp_path, kw) -> None:
    torch.manual_seed(0)
    hf_cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                        max_position_embeddings=64, rope_theta=10000.0, **kw)
    hf = transformers.MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF's init gives tiny router logits; make routing decisive so ties can't hide bugs
        for layer in hf.model.layers:
            layer.mlp.gate.weight.normal_(std=0.5)
    hf.save_pretrained(tmp_path)
    model, cfg = from_hf_mixtral(tmp_path)
    model.eval()
    assert cfg.moe.num_experts_per_token == kw["num_experts_per_tok"]
    assert cfg.model.tie_embeddings == kw["tie_word_embeddings"]
    ids = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids).logits
    assert (got - ref).abs().max().item() < 1e-4
    if kw["tie_word_embeddings"]:
        assert model.lm_head.weight is model.embed.weight


def test_missing_directory_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        from_hf_mixtral(tmp_path)


def test_fused_transformers5_layout(tmp_path) -> None:
    """The in-memory layout of transformers 5 (gate_up_proj / down_proj), written straight to safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    hf_cfg = transformers.MixtralConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=32)
    hf = transformers.MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.gate.weight.normal_(std=0.5)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    hf_cfg.save_pretrained(tmp_path)
    model, _ = from_hf_mixtral(tmp_path)
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        assert (model.eval()(ids).logits - hf(ids).logits).abs().max().item() < 1e-4
