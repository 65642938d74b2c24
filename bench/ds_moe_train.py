"""Peer for bench/train_e2e.py: the same model with DeepSpeed's own MoE layer, under ZeRO-2.

Launched by torchrun (see train_e2e.py). Same config, data, seed and batch as ep-train's run; the
MoE FFNs are ``deepspeed.moe.layer.MoE`` (top-2, ep_size 2, ``drop_tokens=False``: no dropping, like
ep-train's dropless default) with SwiGLU experts of the same width. Writes one JSON line per step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import peer_args, peer_optimizer_settings, peer_train_loop  # noqa: E402


def main() -> None:
    args, overrides = peer_args()  # the rest: ep-train config overrides

    import deepspeed
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from ep_train.config import load_config, parse_overrides
    from ep_train.data.loader import DistributedBatches, TokenWindows
    from ep_train.model import MoELayer, RouterStats, build_model
    from ep_train.model.experts import SwiGLU
    from ep_train.parallel.zero import build_ds_config
    from ep_train.parallel import checkpoint_blocks

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(args.config, parse_overrides(overrides + ["--ds_config", "zero2"]))
    t, m, e = cfg.train, cfg.model, cfg.moe

    class DeepSpeedMoEFFN(MoELayer):
        """DeepSpeed's MoE layer behind ep-train's FFN interface (forward -> (y, RouterStats))."""

        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.num_experts = e.num_experts
            width = e.expert_intermediate_size or m.intermediate_size
            self.moe = MoE(hidden_size=m.hidden_size, expert=SwiGLU(m.hidden_size, width), num_experts=e.num_experts,
                           ep_size=cfg.parallel.ep_size, k=e.num_experts_per_token, drop_tokens=False, use_rts=False,
                           min_capacity=0)

        def forward(self, x: torch.Tensor):  # type: ignore[override]
            y, aux, counts = self.moe(x)
            zero = aux.detach() * 0
            return y, RouterStats(aux, zero, counts.detach(), zero, zero, zero, zero)  # no entropy or CV losses

    model = build_model(m, e, seed=t.seed)
    for block in model.layers:
        if isinstance(block.ffn, MoELayer):
            block.ffn = DeepSpeedMoEFFN()
    if t.activation_checkpointing:
        checkpoint_blocks(model)
    # ep-train's groups and schedule (the router: DeepSpeed's gate, `deepspeed_moe.gate.wg`), each split by DeepSpeed
    # into its expert and non-expert parameters
    groups, schedule = peer_optimizer_settings(model.named_parameters(), cfg, lambda n: ".gate.wg." in n)
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2), eps=t.eps,
                                  weight_decay=t.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule(optimizer),
                                           config=build_ds_config(cfg, world, use_bf16=False))
    data = DistributedBatches(TokenWindows(args.data_dir, "train", cfg.data.seq_len), t.batch_size,
                              t.micro_batch_size, rank, world, seed=t.seed)
    elements = sum(p.numel() for p in model.parameters())  # ZeRO-2: every rank holds its parameters whole
    counts: dict[int, torch.Tensor] = {}  # MoE layer -> this rank's rows per expert (the gate's exp_counts)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = engine(x, y)
        for i, st in out.router_stats.items():
            counts[i] = counts.get(i, 0) + st.tokens_per_expert
        return out.loss

    def take_counts() -> list[torch.Tensor]:
        taken = [counts[i] for i in sorted(counts)]
        counts.clear()
        return taken

    peer_train_loop(engine, loss_fn, data, args, t.batch_size * cfg.data.seq_len, elements, take_counts)
    os._exit(0)


if __name__ == "__main__":
    main()
