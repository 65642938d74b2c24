"""Peer for bench/train_e2e.py: the same model as a ``transformers`` Mixtral under DeepSpeed AutoEP.

Launched by torchrun (see train_e2e.py). ``MixtralForCausalLM`` with ep-train's config sizes (every
layer MoE: Mixtral has no dense layers, so train_e2e.py runs all rows with ``moe_layers`` = all),
``deepspeed.initialize`` with ``expert_parallel`` (autoep_size = ep_size, preset ``mixtral``) and
the same DeepSpeed JSON, batch, data, seed, optimizer kind and activation checkpointing as ep-train.
Writes one JSON line per step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import profiled  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile_step", type=int, default=0, help="profile this step (table next to --out)")
    args, overrides = ap.parse_known_args()  # the rest: ep-train config overrides (--ds_config zero3 ...)

    import deepspeed
    import torch.distributed as dist
    import transformers

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
    hf = transformers.MixtralConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=e.expert_intermediate_size
        or m.intermediate_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim or m.hidden_size // m.num_heads,
        max_position_embeddings=m.max_seq_len, rope_theta=m.rope_theta, rms_norm_eps=m.rms_norm_eps,
        tie_word_embeddings=m.tie_embeddings, num_local_experts=e.num_experts,
        num_experts_per_tok=e.num_experts_per_token, initializer_range=m.init_std, use_cache=False)
    torch.manual_seed(t.seed)
    model = transformers.MixtralForCausalLM(hf)
    if t.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ds = build_ds_config(cfg, world, use_bf16=False)
    ds["expert_parallel"] = {"enabled": True, "autoep_size": cfg.parallel.ep_size, "preset_model": "mixtral"}
    adam = dict(lr=t.learning_rate, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)
    if is_offloading_optimizer(ds):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(model.parameters(), adamw_mode=True, **adam)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), **adam)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    replaced = sum(type(mod).__name__ == "AutoEPMoELayer" for mod in engine.module.modules())
    assert replaced == m.num_layers, f"AutoEP replaced {replaced} of {m.num_layers} MoE blocks"
    # what this rank holds: its ZeRO-3 partition of each parameter (ds_tensor), or the whole tensor
    elements = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in engine.module.parameters())
    data = DistributedBatches(TokenWindows(args.data_dir, "train", cfg.data.seq_len), t.batch_size,
                              t.micro_batch_size, rank, world, seed=t.seed)
    out = open(args.out, "w") if rank == 0 else None
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        micro = data.next()

        def one_step() -> float:
            total = 0.0
            for x, y in micro:
                logits = engine(input_ids=x).logits
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
                engine.backward(loss)
                engine.step()
                total += loss.item()
            return total

        total = profiled(one_step, Path(f"{args.out}.rank{rank}.profile.txt")) if step == args.profile_step \
            else one_step()
        dist.barrier()
        dt = time.perf_counter() - t0
        rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)
        elem = torch.tensor([elements], dtype=torch.float64)
        dist.all_reduce(elem, op=dist.ReduceOp.MAX)
        if out:
            out.write(json.dumps({"step": step, "loss": total / len(micro), "max_rss_mb": float(rss.item()),
                                  "profiled": step == args.profile_step,
                                  "tokens_per_sec": t.batch_size * cfg.data.seq_len / dt,
                                  "elements": int(elem.item())}) + "\n")
            out.flush()
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
