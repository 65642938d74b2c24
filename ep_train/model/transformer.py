"""Mixtral-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU or MoE FFNs.

Shape legend: B batch, S sequence (new tokens), P tokens already in the KV cache, D model dim,
H query heads, G kv heads, Hd head dim, V vocab.
Plain torch: no process groups here; parallelism is applied to this model from outside.

Two entry points: ``forward`` (training and full recompute: the whole sequence, losses) and
``forward_step`` (inference: only the new tokens, attending to the keys and values kept in a ``KVCache``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ep_train.config import ModelConfig, MoEConfig, moe_layer_indices
from ep_train.model.experts import SwiGLU
from ep_train.model.init import SeededInit, ValueSource, materialize
from ep_train.model.moe import MoELayer, RouterStats


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # normalise in fp32
        return self.weight * h.to(x.dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device, start: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [S, Hd] for positions ``start .. start + seq_len - 1``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(start, start + seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # [S, Hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [S, Hd]  (rotate-half convention, as Llama/Mixtral)
    return emb.cos(), emb.sin()


def rope_at(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, 1, S, Hd] for per-sequence positions [B, S] (documents restarting at 0)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
                                / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, S, Hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, S, Hd]: broadcasts over heads
    return emb.cos(), emb.sin()


def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, S] index of the document each token belongs to inside a packed window: a document ends with
    its EOS token, so a new one starts after each EOS (the EOS itself stays in the document it ends)."""
    ends = (input_ids == eos_id).long()
    return ends.cumsum(dim=1) - ends  # exclusive cumulative count


def eod_masked_targets(input_ids: torch.Tensor, targets: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, S] targets with -100 (ignored by the loss) where the input token is EOS: the target there is the
    next document's first token, which nothing in the window predicts (Megatron's --eod-mask-loss)."""
    return targets.masked_fill(input_ids == eos_id, -100)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] position of each token inside its own document (0 at each document's first token)."""
    idx = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(new, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool: query i may attend to key j iff j <= i and both lie in one document."""
    s = doc_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # x: [B, h, S, Hd]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class LayerKV:
    """One attention layer's cached keys and values (after RoPE), k and v [B, G, P, Hd]; grows per step."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens' k, v [B, G, S, Hd]; returns all keys and values so far [B, G, P + S, Hd]."""
        if self.k is not None and self.v is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """Per-layer keys and values of the tokens a batch has seen so far (inference only).

    Create an empty one per batch of sequences and pass it to every ``Transformer.forward_step`` call:
    the first call feeds the prompts, each later call the tokens chosen since.
    """

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerKV() for _ in range(num_layers)]

    @property
    def seq_len(self) -> int:
        """P: tokens cached so far (the position of the next token)."""
        k = self.layers[0].k if self.layers else None
        return 0 if k is None else k.shape[2]


def causal_mask(s: int, past: int, device: torch.device) -> torch.Tensor | None:
    """Which keys each of S new queries may see after P cached tokens: all cached ones, then causally
    among the new ones. [S, P + S] bool (True = attend), or None when that is no restriction (S == 1)."""
    if s == 1:
        return None
    return torch.ones(s, past + s, dtype=torch.bool, device=device).tril(diagonal=past)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.h, self.g = cfg.num_heads, cfg.num_kv_heads
        self.hd = cfg.head_dim or cfg.hidden_size // cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.g * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.g * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerKV | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, S, D]; cos, sin [S, Hd] (or [B, 1, S, Hd]) at the new tokens' positions; mask [B, 1, S, S]
        # bool (True = attend) replaces plain causal attention (document masking; no cache then)
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.h, self.hd).transpose(1, 2)  # [B, H, S, Hd]
        k = self.k_proj(x).view(b, s, self.g, self.hd).transpose(1, 2)  # [B, G, S, Hd]
        v = self.v_proj(x).view(b, s, self.g, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = 0 if cache.k is None else cache.k.shape[2]  # P
            k, v = cache.append(k, v)  # [B, G, P + S, Hd]
        if mask is not None:  # (never with a cache: Transformer._run refuses that)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.g != self.h)
        elif past == 0:  # no cached keys: plain causal attention (the training path)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.g != self.h)
        else:  # is_causal would align the mask top-left; the new queries sit at the bottom-right
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(s, past, x.device),
                                               enable_gqa=self.g != self.h)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.h * self.hd))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig | None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn: nn.Module
        if moe is None:
            self.ffn = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        else:
            width = moe.expert_intermediate_size or cfg.intermediate_size
            self.ffn = MoELayer(
                cfg.hidden_size, width, moe.num_experts, moe.num_experts_per_token, router_type=moe.router_type,
                normalize_top_k=moe.normalize_top_k, jitter_noise=moe.router_jitter_noise,
                router_init_std=moe.router_init_std, capacity_factor=moe.capacity_factor,
                drop_policy=moe.drop_policy, num_shared_experts=moe.num_shared_experts,
                shared_hidden=moe.shared_expert_intermediate_size, expert_dropout=moe.expert_dropout,
                num_groups=moe.num_expert_groups, top_groups=moe.top_groups,
                bias_update_rate=moe.expert_bias_update_rate)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerKV | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterStats | None]:
        # positional arguments only: activation checkpointing passes them through torch.utils.checkpoint
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, mask)
        if self.is_moe:
            y, stats = self.ffn(self.ffn_norm(x))
            return x + y, stats
        return x + self.ffn(self.ffn_norm(x)), None


class ModelOutput(NamedTuple):  # NamedTuple: DeepSpeed's ZeRO-3 hooks look into tuples, not dataclasses
    logits: torch.Tensor  # [B, S, V]
    aux_loss: torch.Tensor  # scalar, mean over MoE layers (0 for a dense model)
    z_loss: torch.Tensor  # scalar, mean over MoE layers
    router_stats: dict[int, RouterStats]  # MoE layer index -> stats
    lm_loss: torch.Tensor | None = None  # when targets are given
    loss: torch.Tensor | None = None  # lm_loss + aux_loss_weight * aux_loss + z_loss_weight * z_loss (+ the
    # optional cv_loss_weight * cv and router_entropy_loss_weight * entropy, means over MoE layers)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig) -> None:
        super().__init__()
        self.cfg, self.moe_cfg = cfg, moe
        moe_layers = set(moe_layer_indices(cfg, moe))
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, moe if i in moe_layers else None) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads

    def _run(self, input_ids: torch.Tensor, cache: KVCache | None, doc_ids: torch.Tensor | None = None,
             positions: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, RouterStats]]:
        """Logits [B, S, V] of input_ids [B, S] placed after the cache's P tokens (P = 0 without a cache)."""
        assert cache is None or (doc_ids is None and positions is None), "document masking is a training option"
        s, start = input_ids.shape[1], cache.seq_len if cache is not None else 0
        if positions is not None:
            cos, sin = rope_at(positions, self.head_dim, self.cfg.rope_theta)  # [B, 1, S, Hd]
        else:
            cos, sin = rope_cos_sin(s, self.head_dim, self.cfg.rope_theta, input_ids.device, start=start)
        mask = document_mask(doc_ids) if doc_ids is not None else None
        x = self.embed(input_ids)  # [B, S, D]
        stats: dict[int, RouterStats] = {}
        for i, layer in enumerate(self.layers):
            # Training calls blocks with positional tensors only: activation checkpointing wraps that call.
            if cache is not None:
                x, st = layer(x, cos, sin, cache.layers[i])
            elif mask is not None:
                x, st = layer(x, cos, sin, None, mask)
            else:
                x, st = layer(x, cos, sin)
            if st is not None:
                stats[i] = st
        return self.lm_head(self.norm(x)), stats  # [B, S, V]

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> ModelOutput:
        """input_ids [B, S]; targets [B, S] already shifted (targets[:, i] follows input_ids[:, i]), -100 = ignore.
        ``doc_ids`` [B, S] (``document_ids``): attend only inside one's own document of a packed window;
        ``positions`` [B, S] (``document_positions``): rotary positions, e.g. restarting at each document."""
        logits, stats = self._run(input_ids, None, doc_ids, positions)
        zero = logits.new_zeros((), dtype=torch.float32)
        aux = torch.stack([st.aux_loss for st in stats.values()]).mean() if stats else zero
        zl = torch.stack([st.z_loss for st in stats.values()]).mean() if stats else zero
        if targets is None:
            return ModelOutput(logits, aux, zl, stats)
        lm = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        # A micro-batch whose every target is ignored (data.eod_mask_loss on a window of EOS tokens only) has
        # no LM term, not a NaN (0/0) that would stop the run; where() passes lm and its gradient unchanged
        # otherwise, and the test runs on the device (no host sync).
        lm = torch.where((targets != -100).any(), lm, zero)
        mc = self.moe_cfg
        loss = lm + mc.aux_loss_weight * aux + mc.router_z_loss_weight * zl
        if stats and mc.cv_loss_weight > 0:  # optional balance terms: in the loss only when weighted
            loss = loss + mc.cv_loss_weight * torch.stack([st.cv_loss for st in stats.values()]).mean()
        if stats and mc.router_entropy_loss_weight > 0:
            loss = loss + mc.router_entropy_loss_weight * torch.stack([st.entropy for st in stats.values()]).mean()
        return ModelOutput(logits, aux, zl, stats, lm, loss)

    def forward_step(self, input_ids: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Inference: logits [B, S, V] for the S new tokens input_ids [B, S] that follow the P tokens in
        ``cache``, and the cache grown (in place) by their keys and values. Feed the prompts first, then
        each chosen token; the result equals ``forward`` on the whole sequence (its last S positions).
        Each MoE layer routes the new tokens as usual. P + S must not exceed ``max_seq_len``."""
        if len(cache.layers) != len(self.layers):
            raise ValueError(f"cache has {len(cache.layers)} layers, the model {len(self.layers)}; "
                             "make it with KVCache(len(model.layers))")
        end = cache.seq_len + input_ids.shape[1]
        if end > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {end} exceeds model.max_seq_len ({self.cfg.max_seq_len}); "
                             "the model has not been trained for positions that far")
        logits, _ = self._run(input_ids, cache)
        return logits, cache


def build_model(cfg: ModelConfig, moe: MoEConfig, seed: int = 0, device: str | torch.device = "cpu",
                source: ValueSource | None = None, dtype: torch.dtype | None = None) -> Transformer:
    """The whole model in one process (single-process runs, references, small tools).

    ``device="meta"`` gives shapes only (no memory): what ``ep_train.parallel.parallelize`` starts from
    before each rank materialises its own share. Values come from ``source`` (default: ``SeededInit``,
    a function of seed, parameter name and global expert id, so every layout starts identical), each
    parameter made in ``dtype`` (default fp32) as it is read: a bf16 model never exists in fp32 whole.
    """
    with torch.device("meta"):
        model = Transformer(cfg, moe)
    if str(device) == "meta":
        return model
    return materialize(model, source or SeededInit(cfg, moe, seed), device=device, dtype=dtype)
