"""Hugging Face Mixtral checkpoints -> ep_train models (load side).

Reads ``config.json`` and safetensors (single file or sharded with an index) as
``MixtralForCausalLM.save_pretrained`` writes them: the per-expert layout
(``block_sparse_moe.experts.{e}.w1.weight``) and the fused layout of transformers 5
(``mlp.experts.gate_up_proj`` [E, 2F, D], ``mlp.experts.down_proj`` [E, D, F]) are both understood.
Never unpickles anything: safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ep_train.config import Config, validate
from ep_train.model.transformer import Transformer


def config_from_hf(hf: dict[str, Any]) -> Config:
    if hf.get("model_type") != "mixtral":
        raise ValueError(f"config.json model_type = {hf.get('model_type')!r}; from_hf_mixtral needs 'mixtral'")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act = {hf['hidden_act']!r}; ep-train experts are SwiGLU (silu)")
    if hf.get("sliding_window") is not None:
        raise ValueError(f"config.json sliding_window = {hf['sliding_window']}; ep-train uses full causal "
                         "attention, set sliding_window to null for a model trained without it")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"config.json rope_parameters.rope_type = {rope['rope_type']!r}; only 'default' is supported")
    c = Config()
    m, e = c.model, c.moe
    m.vocab_size, m.hidden_size = hf["vocab_size"], hf["hidden_size"]
    m.intermediate_size, m.num_layers = hf["intermediate_size"], hf["num_hidden_layers"]
    m.num_heads = hf["num_attention_heads"]
    m.num_kv_heads = hf.get("num_key_value_heads") or m.num_heads
    m.head_dim = hf.get("head_dim")
    m.max_seq_len = hf.get("max_position_embeddings", m.max_seq_len)
    m.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 1e6)))
    m.rms_norm_eps = float(hf.get("rms_norm_eps", 1e-5))
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.init_std = float(hf.get("initializer_range", 0.02))
    e.num_experts, e.num_experts_per_token = hf["num_local_experts"], hf["num_experts_per_tok"]
    e.aux_loss_weight = float(hf.get("router_aux_loss_coef", e.aux_loss_weight))
    e.router_jitter_noise = float(hf.get("router_jitter_noise", 0.0))
    e.moe_layers = list(range(m.num_layers))
    c.data.seq_len = min(c.data.seq_len, m.max_seq_len)
    validate(c)
    return c


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"no model.safetensors or model.safetensors.index.json in {str(path)!r}; "
                         "save the model with save_pretrained(..., safe_serialization=True)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(path / f)))
    return tensors


def hf_state_to_ep(tensors: dict[str, torch.Tensor], c: Config) -> dict[str, torch.Tensor]:
    """Rename/restack HF Mixtral weights into ep_train's state dict (full expert stacks)."""
    t = {k.removeprefix("model."): v for k, v in tensors.items()}
    out = {"embed.weight": t.pop("embed_tokens.weight"), "norm.weight": t.pop("norm.weight")}
    head = tensors.get("lm_head.weight")
    t.pop("lm_head.weight", None)
    out["lm_head.weight"] = head if head is not None else out["embed.weight"]
    e = c.moe.num_experts
    for i in range(c.model.num_layers):
        src, dst = f"layers.{i}.", f"layers.{i}."
        out[dst + "attn_norm.weight"] = t.pop(src + "input_layernorm.weight")
        out[dst + "ffn_norm.weight"] = t.pop(src + "post_attention_layernorm.weight")
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{dst}attn.{p}.weight"] = t.pop(f"{src}self_attn.{p}.weight")
        if src + "mlp.experts.gate_up_proj" in t:  # transformers 5 fused layout
            gate_up = t.pop(src + "mlp.experts.gate_up_proj")  # [E, 2F, D]
            w1, w3 = gate_up.chunk(2, dim=1)  # HF: gate, up = (x @ gate_up.T).chunk(2)
            w2 = t.pop(src + "mlp.experts.down_proj")  # [E, D, F]
            gate = t.pop(src + "mlp.gate.weight")
        else:
            moe = src + "block_sparse_moe."
            w1 = torch.stack([t.pop(f"{moe}experts.{j}.w1.weight") for j in range(e)])
            w2 = torch.stack([t.pop(f"{moe}experts.{j}.w2.weight") for j in range(e)])
            w3 = torch.stack([t.pop(f"{moe}experts.{j}.w3.weight") for j in range(e)])
            gate = t.pop(moe + "gate.weight")
        out[dst + "ffn.router.weight"] = gate
        out[dst + "ffn.experts.w1"], out[dst + "ffn.experts.w2"], out[dst + "ffn.experts.w3"] = w1, w2, w3
    leftover = [k for k in t if "rotary_emb" not in k]
    if leftover:
        raise ValueError(f"unexpected tensors in the Mixtral checkpoint: {leftover[:5]}; is it really Mixtral?")
    return out


def from_hf_mixtral(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, Config]:
    """Load a Hugging Face Mixtral checkpoint directory; returns ``(model, config)``."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{str(cfg_file)!r} not found; from_hf_mixtral needs a save_pretrained directory")
    c = config_from_hf(json.loads(cfg_file.read_text()))
    model = Transformer(c.model, c.moe)
    state = hf_state_to_ep(_load_tensors(path), c)
    if c.model.tie_embeddings:
        state.pop("lm_head.weight")
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype), c
