"""Peer for bench/train_e2e.py: the same model as a ``transformers`` Mixtral under DeepSpeed AutoEP.

Launched by torchrun (see train_e2e.py). ``MixtralForCausalLM`` with ep-train's config sizes (every
layer MoE: Mixtral has no dense layers, so train_e2e.py runs all rows with ``moe_layers`` = all),
``deepspeed.initialize`` with ``expert_parallel`` (autoep_size = ep_size, preset ``mixtral``) and
the same DeepSpeed JSON, batch, data, seed, optimizer kind and activation checkpointing as ep-train.
Writes one JSON line per step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import peer_args, peer_optimizer_settings, peer_train_loop  # noqa: E402


def hf_mixtral(cfg):  # type: ignore[no-untyped-def]
    """A ``transformers`` MixtralForCausalLM with ep-train config ``cfg``'s sizes and seeded weights, or with
    ``train.init_from`` that folder's values (train_e2e.py saves this model there so ep-train starts from it)."""
    import transformers

    m, e = cfg.model, cfg.moe
    hf = transformers.MixtralConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=e.expert_intermediate_size
        or m.intermediate_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim or m.hidden_size // m.num_heads,
        max_position_embeddings=m.max_seq_len, rope_theta=m.rope_theta, rms_norm_eps=m.rms_norm_eps,
        tie_word_embeddings=m.tie_embeddings, num_local_experts=e.num_experts,
        num_experts_per_tok=e.num_experts_per_token, initializer_range=m.init_std, use_cache=False)
    torch.manual_seed(cfg.train.seed)
    model = transformers.MixtralForCausalLM(hf)
    if cfg.train.init_from:  # the same module with the saved values (strict: every tensor, no other)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(Path(cfg.train.init_from) / "model.safetensors")), strict=True)
    return model


def main() -> None:
    args, overrides = peer_args()  # the rest: ep-train config overrides

    import deepspeed
    import torch.distributed as dist

    from ep_train.config import load_config, moe_layer_indices, parse_overrides
    from ep_train.data.loader import DistributedBatches, TokenWindows
    from ep_train.parallel.zero import build_ds_config, is_offloading_optimizer

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(args.config, parse_overrides(overrides))
    t, m, e = cfg.train, cfg.model, cfg.moe
    if moe_layer_indices(m, e) != list(range(m.num_layers)):
        raise ValueError("a transformers Mixtral has MoE in every layer; pass --moe_layers "
                         f"'{list(range(m.num_layers))}' so both sides train the same model")
    model = hf_mixtral(cfg)
    if t.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ds = build_ds_config(cfg, world, use_bf16=False)
    ds["expert_parallel"] = {"enabled": True, "autoep_size": cfg.parallel.ep_size, "preset_model": "mixtral"}
    # ep-train's groups and schedule; the router is each block's `mlp.gate` (AutoEP carries the groups over to
    # the parameters of the layers it puts in)
    groups, schedule = peer_optimizer_settings(model.named_parameters(), cfg, lambda n: ".mlp.gate." in n)
    adam = dict(lr=t.learning_rate, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)
    if is_offloading_optimizer(ds):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **adam)
    else:
        optimizer = torch.optim.AdamW(groups, **adam)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule(optimizer),
                                           config=ds)
    replaced = sum(type(mod).__name__ == "AutoEPMoELayer" for mod in engine.module.modules())
    assert replaced == m.num_layers, f"AutoEP replaced {replaced} of {m.num_layers} MoE blocks"
    # what this rank holds: its ZeRO-3 partition of each parameter (ds_tensor), or the whole tensor
    elements = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in engine.module.parameters())
    data = DistributedBatches(TokenWindows(args.data_dir, "train", cfg.data.seq_len), t.batch_size,
                              t.micro_batch_size, rank, world, seed=t.seed)

    # Rows per expert: each AutoEP layer's router returns this rank's num_tokens_per_expert [E]; counted in the
    # forward only (activation checkpointing runs the routers again inside backward)
    layers = [mod for mod in engine.module.modules() if type(mod).__name__ == "AutoEPMoELayer"]
    counts: list[torch.Tensor] = [torch.zeros(e.num_experts, dtype=torch.float64) for _ in layers]
    counting = [False]

    def count(i: int):
        def hook(_module, _inputs, output) -> None:
            if counting[0]:
                counts[i] += output[2].detach().to("cpu", torch.float64)  # (scores, experts, tokens per expert)
        return hook

    for i, layer in enumerate(layers):
        layer.router.register_forward_hook(count(i))

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        counting[0] = True
        try:
            logits = engine(input_ids=x).logits
        finally:
            counting[0] = False
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    def take_counts() -> list[torch.Tensor]:
        taken = [c.clone() for c in counts]
        for c in counts:
            c.zero_()
        return taken

    peer_train_loop(engine, loss_fn, data, args, t.batch_size * cfg.data.seq_len, elements, take_counts)
    os._exit(0)


if __name__ == "__main__":
    main()
