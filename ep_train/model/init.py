"""Initial parameter values as a function of (seed, parameter name, global expert id) only.

Why: a rank builds only its own experts and its ZeRO-3 share of everything else (see
``ep_train.parallel.zero.materialize_partitioned``), so the values of one tensor must not depend on
which other tensors this process created before it, nor on the world or EP size. Each tensor (each
expert of a stacked expert tensor) draws from its own generator seeded by a hash of its name, so a
single-process build, any EP layout and any world size all start from the same model.

``materialize`` turns a model built on the ``meta`` device into a real one, one module at a time:
at most one module's own parameters exist in full at once, and an ``after(module)`` callback (ZeRO-3
partitioning) can shrink them before the next module is made.
``blockwise`` runs a model on ``meta`` a block at a time (analysis of a model larger than memory).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Protocol

import torch
import torch.nn as nn

from ep_train.config import ModelConfig, MoEConfig
from ep_train.model.experts import GroupedExperts


class ValueSource(Protocol):
    """Full values of one parameter: ``name`` as in ``named_parameters()``; ``expert_ids`` the global ids
    of the rows of a stacked expert tensor (None for other parameters). Returns fp32 (or the source's
    dtype) on CPU with exactly ``shape``."""

    def __call__(self, name: str, shape: tuple[int, ...], expert_ids: list[int] | None) -> torch.Tensor: ...


def _generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class SeededInit:
    """The model's initialisation: normal(init_std) for linear/embedding weights and experts,
    normal(router_init_std) for routers (small: early routing near uniform), ones for norms,
    zeros for the noisy router's noise weights."""

    def __init__(self, model: ModelConfig, moe: MoEConfig, seed: int) -> None:
        self.std, self.router_std, self.seed = model.init_std, moe.router_init_std, seed

    def __call__(self, name: str, shape: tuple[int, ...], expert_ids: list[int] | None) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name.endswith("router.noise_weight"):
            return torch.zeros(shape)
        std = self.router_std if name.endswith("router.weight") else self.std
        if expert_ids is None:
            return torch.randn(shape, generator=_generator(self.seed, name)) * std
        assert shape[0] == len(expert_ids), (name, shape, expert_ids)
        out = torch.empty(shape)
        for row, e in enumerate(expert_ids):  # one stream per global expert: independent of the EP layout
            out[row] = torch.randn(shape[1:], generator=_generator(self.seed, f"{name}/expert{e}")) * std
        return out


def materialize(model: nn.Module, source: ValueSource, *, dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu", after: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Give every ``meta`` parameter its value from ``source``, module by module.

    Python attributes set on the meta parameters (expert-parallel and ZeRO tags) carry over. Tied
    parameters (one Parameter in two modules) are made once and stay tied.
    """
    made: dict[int, nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        own = list(module._parameters.items())
        if not any(p is not None and (p.is_meta or id(p) in made) for _, p in own) and not any(
                b is not None and b.is_meta for b in module._buffers.values()):
            continue
        for n, p in own:
            if p is None:
                continue
            if id(p) in made:  # tied: already made under its first name
                module._parameters[n] = made[id(p)]
                continue
            if not p.is_meta:
                continue
            full = f"{mod_name}.{n}" if mod_name else n
            ids = module.global_expert_ids if isinstance(module, GroupedExperts) else None
            value = source(full, tuple(p.shape), ids)
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{full}: the source gives shape {tuple(value.shape)}, the model needs {tuple(p.shape)}")
            new = nn.Parameter(value.to(device=device, dtype=dtype or torch.float32), requires_grad=p.requires_grad)
            new.__dict__.update(p.__dict__)  # tags set while on meta
            made[id(p)] = new
            module._parameters[n] = new
        for n, b in list(module._buffers.items()):  # buffers (the routers' expert bias) start at zero
            if b is not None and b.is_meta:
                module._buffers[n] = torch.zeros(b.shape, dtype=b.dtype, device=device)
        if after is not None:
            after(module)
    return model


class _Under:
    """``source`` for a submodule: its parameter names as the whole model names them."""

    def __init__(self, source: ValueSource, prefix: str) -> None:
        self.source, self.prefix = source, prefix

    def __call__(self, name: str, shape: tuple[int, ...], expert_ids: list[int] | None) -> torch.Tensor:
        return self.source(f"{self.prefix}.{name}", shape, expert_ids)


@torch.no_grad()  # here, not left to callers: with autograd each kept hidden state would hold every block's tensors
def blockwise(model: nn.Module, source: ValueSource, batches: list[torch.Tensor],
              prepare: Callable[[int, nn.Module], None] | None = None) -> None:
    """The embedding and every block of ``model`` (a ``Transformer`` on ``meta``) over ``batches`` [B, S] of
    token ids, one block's parameters in memory at a time (made from ``source``, then back to ``meta``),
    for what hooks on the blocks observe (routing): the final norm and LM head are not run. Holds every
    batch's hidden states [B, S, D] and one block: a model of any depth, in the memory of one layer.
    ``prepare(i, block)`` runs after block i is made (buffers a source does not hold)."""
    from ep_train.model.transformer import rope_cos_sin
    from ep_train.sizes import fix_mmap_threshold

    # Each block's tensors are made and freed in turn; with glibc's dynamic threshold the smaller ones stay on
    # a heap that fragments and grows with the depth (measured at the 583M shape: +30 MiB RssAnon per block;
    # fixed at 1 MiB, flat).
    fix_mmap_threshold(2 ** 20)
    materialize(model.embed, _Under(source, "embed"))
    hidden = [model.embed(x) for x in batches]
    model.embed.to("meta")
    if model.cfg.tie_embeddings:  # materialize gave embed a new parameter: tie the head to it again
        model.lm_head.weight = model.embed.weight
    for i, block in enumerate(model.layers):
        materialize(block, _Under(source, f"layers.{i}"))
        if prepare is not None:
            prepare(i, block)
        for j, h in enumerate(hidden):
            cos, sin = rope_cos_sin(h.shape[1], model.head_dim, model.cfg.rope_theta, h.device)
            hidden[j] = block(h, cos, sin)[0]
        block.to("meta")
