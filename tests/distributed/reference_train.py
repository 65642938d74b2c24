"""Single-process training without DeepSpeed: the reference the distributed trainer must match.

Plain torch: the model with all experts and a LocalDispatcher, torch.optim.AdamW, the same data order
(one data-parallel rank reading the whole global batch) and the same learning-rate schedule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ep_train.config import Config, data_sources
from ep_train.data.loader import DistributedBatches, TokenWindows
from ep_train.data.mixture import Blend
from ep_train.model import build_model
from ep_train.model.transformer import document_ids, document_positions


def reference_losses(cfg: Config, steps: int, skip: set[int] = frozenset(),
                     biases: dict[int, dict[str, list[float]]] | None = None,
                     val_windows: int = 0, val: list[float] | None = None) -> list[float]:
    """Per-step mean loss; steps in ``skip`` (1-based) consume their batch but change nothing.
    ``biases``, when given, receives the routers' expert biases after every step (step -> layer -> values).
    ``val``, when given, receives the trained model's validation loss over the first ``val_windows`` windows of
    the first source's val split: the mean over every counted target (``val_loss``)."""
    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, cfg.moe, seed=t.seed)
    decay, no_decay, router_decay, router_no_decay = [], [], [], []
    for n, p in model.named_parameters():
        router = ".router." in n
        if p.dim() >= 2:
            (router_decay if router else decay).append(p)
        else:
            (router_no_decay if router else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay, "lr": t.learning_rate},
              {"params": no_decay, "weight_decay": 0.0, "lr": t.learning_rate},
              {"params": router_decay, "weight_decay": t.weight_decay, "lr": t.learning_rate * t.router_lr_multiplier},
              {"params": router_no_decay, "weight_decay": 0.0, "lr": t.learning_rate * t.router_lr_multiplier}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=t.learning_rate, betas=(t.beta1, t.beta2),
                            eps=t.eps)

    def factor(s: int) -> float:  # written out again, independently of ep_train.train.lr_factor
        if s < t.warmup_steps:
            return (s + 1) / t.warmup_steps
        decay_steps = t.max_steps - t.warmup_steps  # the cosine's steps; the last of them ends at the minimum
        prog = min(1.0, (s - t.warmup_steps + 1) / max(1, decay_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    sources = data_sources(cfg.data)
    blend = Blend([TokenWindows(s.path, "train", cfg.data.seq_len) for s in sources], [s.weight for s in sources],
                  t.seed, cfg.data.shuffle)
    data = DistributedBatches(blend, t.batch_size, t.micro_batch_size, 0, 1, seed=t.seed)
    eos = None
    if cfg.data.document_mask or cfg.data.eod_mask_loss:
        import json
        from pathlib import Path

        eos = json.loads((Path(sources[0].path) / "manifest.json").read_text())["tokenizer"]["eos_id"]
    losses = []
    rate = cfg.moe.expert_bias_update_rate
    for step in range(1, steps + 1):
        micro = data.next()
        total = 0.0
        counts: dict[int, torch.Tensor] = {}  # MoE layer -> tokens per expert over the whole step
        for x, y in micro:
            doc = document_ids(x, eos) if cfg.data.document_mask else None
            pos = document_positions(doc) if doc is not None and cfg.data.reset_positions else None
            if cfg.data.eod_mask_loss:  # written out: cross-entropy over the targets whose input is not EOS
                mc = cfg.moe
                assert mc.cv_loss_weight == 0 and mc.router_entropy_loss_weight == 0  # not written out here
                out = model(x, None, doc, pos)
                keep = x != eos
                loss = (F.cross_entropy(out.logits[keep].float(), y[keep])
                        + mc.aux_loss_weight * out.aux_loss + mc.router_z_loss_weight * out.z_loss)
            else:
                out = model(x, y, doc, pos)
                loss = out.loss
            (loss / len(micro)).backward()
            total += loss.item()
            for i, st in out.router_stats.items():
                counts[i] = counts.get(i, 0) + st.tokens_per_expert.float()
        if step in skip:
            opt.zero_grad()
            losses.append(float("nan"))
            continue
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad()
        sched.step()
        if rate > 0:  # aux-loss-free balancing, written out: bias += rate * sign(mean load - load)
            for i, c in counts.items():
                bias = model.layers[i].ffn.router.expert_bias
                with torch.no_grad():
                    bias += rate * torch.sign(c.mean() - c)
            if biases is not None:
                biases[step] = {str(i): model.layers[i].ffn.router.expert_bias.tolist() for i in sorted(counts)}
        losses.append(total / len(micro))
    if val is not None:
        model.eval()
        val.append(val_loss(model, TokenWindows(sources[0].path, "val", cfg.data.seq_len), val_windows, eos, cfg))
    return losses


@torch.no_grad()
def val_loss(model: torch.nn.Module, windows: TokenWindows, n: int, eos: int | None, cfg: Config) -> float:
    """Cross-entropy summed over the counted targets of windows 0..n-1 (without EOS inputs' targets under
    eod_mask_loss), one window at a time, over their number."""
    total, counted = 0.0, 0
    for i in range(n):
        w = torch.from_numpy(windows.window(i))
        x, y = w[None, :-1], w[1:]
        doc = document_ids(x, eos) if cfg.data.document_mask else None
        pos = document_positions(doc) if doc is not None and cfg.data.reset_positions else None
        keep = x[0] != eos if cfg.data.eod_mask_loss else torch.ones_like(y, dtype=torch.bool)
        logits = model(x, None, doc, pos).logits[0].float()
        total += float(F.cross_entropy(logits[keep], y[keep], reduction="sum"))
        counted += int(keep.sum())
    return total / counted
