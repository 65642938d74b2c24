"""Parameter counts from the config alone (no model is built): total, active per token, sparsity."""

from __future__ import annotations

from dataclasses import dataclass

from ep_train.config import Config, check_ep_layout, moe_layer_indices


@dataclass
class ModelSize:
    total: int  # every parameter
    active: int  # parameters one token touches (K routed experts + shared + dense parts)
    embedding: int  # input embedding (+ untied output head)
    attention: int
    dense_ffn: int
    experts: int  # routed expert weights, all layers
    router: int
    shared_experts: int
    norms: int

    @property
    def sparsity(self) -> float:
        """Share of parameters a token does not touch."""
        return 1.0 - self.active / self.total


def model_size(cfg: Config) -> ModelSize:
    m, e = cfg.model, cfg.moe
    d = m.hidden_size
    hd = m.head_dim or d // m.num_heads
    moe_layers = moe_layer_indices(m, e)
    n_moe, n_dense = len(moe_layers), m.num_layers - len(moe_layers)
    embedding = m.vocab_size * d * (1 if m.tie_embeddings else 2)
    attention = m.num_layers * (d * m.num_heads * hd * 2 + d * m.num_kv_heads * hd * 2)
    dense_ffn = n_dense * 3 * d * m.intermediate_size
    f_e = e.expert_intermediate_size or m.intermediate_size
    per_expert = 3 * d * f_e
    experts = n_moe * e.num_experts * per_expert
    router = n_moe * e.num_experts * d * (2 if e.router_type == "noisy_topk" else 1)
    f_s = e.shared_expert_intermediate_size or f_e
    shared = n_moe * e.num_shared_experts * 3 * d * f_s
    norms = (2 * m.num_layers + 1) * d
    total = embedding + attention + dense_ffn + experts + router + shared + norms
    active = total - experts + n_moe * e.num_experts_per_token * per_expert
    return ModelSize(total, active, embedding, attention, dense_ffn, experts, router, shared, norms)


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def format_size(cfg: Config) -> str:
    s = model_size(cfg)
    rows = [("total parameters", s.total), ("active per token", s.active), ("embeddings (+head)", s.embedding),
            ("attention", s.attention), ("dense FFN", s.dense_ffn), ("routed experts", s.experts),
            ("routers", s.router), ("shared experts", s.shared_experts), ("norms", s.norms)]
    lines = [f"{name:<20} {_fmt(v):>10} ({v:,})" for name, v in rows]
    lines.append(f"{'sparsity':<20} {s.sparsity:>10.1%} (share of parameters a token does not use)")
    return "\n".join(lines)


def model_state_bytes_per_rank(cfg: Config, world: int, zero_stage: int, offload: bool,
                               param_bytes: int = 2) -> dict[str, float]:
    """Model-state bytes per rank (params, grads, fp32 master + Adam moments) under ZeRO with EP.

    Dense parameters are partitioned over all ``world`` ranks; each rank holds E/ep experts, whose
    states are partitioned over the world/ep ranks of its expert-data-parallel group.
    ``offload`` moves the fp32 master weights and Adam moments (and, under ZeRO-3, the parameters)
    to CPU memory: the numbers are then what stays on the accelerator vs what goes to host RAM.
    """
    s = model_size(cfg)
    ep = cfg.parallel.ep_size
    check_ep_layout(ep, cfg.moe.num_experts, world)
    dense = s.total - s.experts
    edp = world // ep
    full_per_rank = dense + s.experts / ep  # what one rank would hold without ZeRO partitioning
    sharded = dense / world + s.experts / ep / edp
    params = (sharded if zero_stage >= 3 else full_per_rank) * param_bytes
    grads = (sharded if zero_stage >= 2 else full_per_rank) * param_bytes
    optim = (sharded if zero_stage >= 1 else full_per_rank) * 12  # fp32 master + Adam m and v
    device = params * (0 if offload and zero_stage >= 3 else 1) + grads + (0 if offload else optim)
    host = (optim if offload else 0) + (params if offload and zero_stage >= 3 else 0)
    return {"params": params, "grads": grads, "optimizer": optim, "device": device, "host": host}
