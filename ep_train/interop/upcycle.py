"""Sparse upcycling: a dense model's FFN copied into every expert of an MoE (Komatsuzaki et al. 2022).

Sources: an ep-train run whose model has no MoE layer (``moe.num_experts`` 0 or 1; read through its
universal checkpoint) or a Hugging Face Llama/Mistral folder (``mlp.gate_proj/up_proj/down_proj``). Every
expert starts as the dense FFN (plus optional gaussian noise, seeded per tensor and expert); the router
starts at zero by default, so routing is uniform: softmax gives 1/E to every expert, top-k keeps K of
them and renormalising (``normalize_top_k``, always on here) gives each 1/K, so with zero noise the MoE
layer computes exactly the dense FFN. The result is written once, in the Hugging Face Mixtral layout
(``RUN/init``), so the trainer loads it like any imported checkpoint (``train.init_from``) and
``to-hf`` exports it as is.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

from ep_train.config import Config, data_sources, moe_layer_indices
from ep_train.interop.hf import (building, model_config_from_hf, read_hf_json, run_config_for, weight_map,
                                write_run_config)
from ep_train.interop.hf_export import (DTYPES, Source, check_exportable, copy_tokenizer_files, run_tokenizer,
                                       write_hf)
from ep_train.model.init import _generator


class HFDenseSource:
    """Values of a dense ep-train model read from a Hugging Face Llama/Mistral folder."""

    def __init__(self, path: Path, cfg: Config) -> None:
        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            self.where = weight_map(index)
        elif (path / "model.safetensors").is_file():
            with safe_open(str(path / "model.safetensors"), "pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ValueError(f"no model.safetensors or model.safetensors.index.json in {str(path)!r}; "
                             "save the model with save_pretrained")
        from ep_train.model.transformer import build_model

        # Tied, the model names its one matrix once (embed.weight). Untied, lm_head.weight must be there: a file
        # without it is damaged, and reading the embedding instead would upcycle another model (as HFMixtralSource).
        self.tied = cfg.model.tie_embeddings
        wanted = {self.hf_name(n) for n, _ in build_model(cfg.model, cfg.moe, device="meta").named_parameters()}
        missing = sorted(wanted - set(self.where))
        if missing:
            head = (" (config.json tie_word_embeddings is false: the output layer is a matrix of its own; fetch "
                    "the checkpoint again)" if "lm_head.weight" in missing else "")
            raise ValueError(f"{str(path)!r} does not match its config.json as a dense Llama/Mistral checkpoint: "
                             f"missing {missing[:5]}{head}")

    @staticmethod
    def hf_name(name: str) -> str:
        if name == "lm_head.weight":
            return name
        if name in ("embed.weight", "norm.weight"):
            return "model." + name.replace("embed", "embed_tokens")
        _, layer, rest = name.split(".", 2)
        rest = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                "ffn.w1.weight": "mlp.gate_proj.weight", "ffn.w3.weight": "mlp.up_proj.weight",
                "ffn.w2.weight": "mlp.down_proj.weight"}.get(rest, rest.replace("attn.", "self_attn."))
        return f"model.layers.{layer}.{rest}"

    def __call__(self, name: str, shape: tuple[int, ...], expert_ids: list[int] | None) -> torch.Tensor:
        key = self.hf_name(name)
        if key == "lm_head.weight" and self.tied:
            key = "model.embed_tokens.weight"  # one matrix, stored as the embedding (an lm_head copy is ignored)
        with safe_open(str(self.path / self.where[key]), "pt") as f:
            return f.get_tensor(key).float()


class UpcycledSource:
    """The MoE model's values from the dense model's: experts = dense FFN (+ noise), router zeros or normal."""

    def __init__(self, dense: Source, noise: float, router_init: str, router_std: float, seed: int) -> None:
        self.dense, self.noise, self.seed = dense, noise, seed
        self.router_init, self.router_std = router_init, router_std
        self._last: tuple[str, torch.Tensor] | None = None  # experts ask for one row at a time: read the FFN once

    def __call__(self, name: str, shape: tuple[int, ...], expert_ids: list[int] | None) -> torch.Tensor:
        if name.endswith("ffn.router.weight"):
            if self.router_init == "zeros":
                return torch.zeros(shape)
            return torch.randn(shape, generator=_generator(self.seed, name)) * self.router_std
        if expert_ids is None:
            return self.dense(name, shape, None)
        w = name.rsplit(".", 1)[1]  # layers.L.ffn.experts.w1 -> the dense layers.L.ffn.w1.weight
        dense_name = name.replace(f"ffn.experts.{w}", f"ffn.{w}.weight")
        if self._last is None or self._last[0] != dense_name:
            self._last = (dense_name, self.dense(dense_name, tuple(shape[1:]), None))
        out = self._last[1].expand(shape).clone()
        for row, e in enumerate(expert_ids):
            if self.noise > 0:  # seeded by tensor and global expert id: the same whatever the order asked
                out[row] += torch.randn(shape[1:], generator=_generator(self.seed, f"{name}/expert{e}")) * self.noise
        return out


def _dense_source(src: Path) -> tuple[Config, Source, str, dict[str, Any] | None]:
    """(dense config, values, dtype, Hugging Face config.json or None) of an ep-train run or an HF folder."""
    if (src / "config.json").is_file() and "model_type" in (hf := read_hf_json(src / "config.json")):
        if hf["model_type"] == "mixtral" or "num_local_experts" in hf:
            raise ValueError(f"{str(src)!r} is already an MoE model (model_type {hf['model_type']!r}); "
                             "upcycling needs a dense one. Import it with `ep-train convert from-hf`")
        cfg = model_config_from_hf(hf, kinds=("llama", "mistral"))
        return cfg, HFDenseSource(src, cfg), hf.get("dtype") or hf.get("torch_dtype") or "float32", hf
    import os

    from ep_train.interop.universal import UniversalSource, find_checkpoint, run_config, to_universal

    step = find_checkpoint(src)
    cfg = run_config(step)
    layers = moe_layer_indices(cfg.model, cfg.moe)
    if layers:
        raise ValueError(f"{str(step)!r} is already an MoE model (MoE layers {layers}, moe.num_experts = "
                         f"{cfg.moe.num_experts}); upcycling needs a dense run (moe.num_experts 0)")
    if not os.access(step, os.W_OK):
        raise ValueError(f"{str(step)!r} is read-only: the universal conversion is cached there; copy the "
                         "checkpoint folder somewhere writable")
    return cfg, UniversalSource(to_universal(step)), "float32", None


def upcycle(dense: str | Path, output: str | Path, num_experts: int, experts_per_token: int = 2,
            noise: float = 0.0, router_init: str = "zeros", seed: int = 0, config: str | Path | None = None,
            overrides: list[tuple[str, Any]] | None = None, log: Callable[[str], None] = print) -> Path:
    """Make a run directory whose model is ``dense`` upcycled to ``num_experts`` experts; returns its
    ``config.yaml``. ``dense``: an ep-train dense run (any checkpoint form ``to_hf`` takes) or a Hugging
    Face Llama/Mistral folder. ``noise``: std of gaussian noise added to each expert's weights (seeded
    by ``seed``, tensor name and expert id); ``router_init``: ``zeros`` (uniform routing: the MoE equals
    the dense model) or ``normal`` (std ``moe.router_init_std``). Streams tensor by tensor into
    ``RUN/init`` (Hugging Face Mixtral layout); ``RUN/config.yaml`` sets ``train.init_from`` to it.
    """
    src, out = Path(dense), Path(output)
    if router_init not in ("zeros", "normal"):
        raise ValueError(f"--router-init = {router_init!r} is invalid: use zeros or normal")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"--noise = {noise} is invalid: must be a finite value >= 0 (a standard deviation, e.g. 0.01)")
    if num_experts < 2:
        raise ValueError(f"--num-experts = {num_experts} is invalid: an MoE needs at least 2 experts")
    if (out / "config.yaml").exists() or (out / "init").exists() or (out / "checkpoints").exists():
        raise ValueError(f"--output {str(out)!r} already holds a run (config.yaml, init/ or checkpoints/); "
                         "pass a new folder")
    dense_cfg, values, dtype, hf = _dense_source(src)
    moe = Config()
    moe.model = dense_cfg.model
    moe.moe.num_experts, moe.moe.num_experts_per_token = num_experts, experts_per_token
    moe.moe.moe_layers = list(range(dense_cfg.model.num_layers))
    cfg = run_config_for(moe, config, overrides or [], f"the dense model {str(src)!r} upcycled",
                         ("num_experts", "num_experts_per_token", "moe_layers"))
    source = UpcycledSource(values, noise, router_init, cfg.moe.router_init_std, seed)
    # RUN/init is a Hugging Face Mixtral folder: refuse what it cannot hold before writing anything. Training
    # choices that leave the weights and the step-0 function alone do not stop the upcycle, as with from-hf and
    # train.init_from: the capacity factor, and the aux-loss-free expert bias (it starts at 0).
    weights_cfg = copy.deepcopy(cfg)
    weights_cfg.moe.expert_bias_update_rate = 0.0
    try:
        check_exportable(weights_cfg, allow_dropless=True)
    except ValueError as e:
        raise ValueError(f"cannot upcycle with this run config: RUN/init is written as a Hugging Face Mixtral "
                         f"folder, and {str(e).removeprefix('this model cannot be exported as Hugging Face Mixtral: ')}"
                         "; change that setting in --config") from None
    if dtype not in DTYPES:
        raise ValueError(f"{str(src)!r} config.json dtype = {dtype!r}: upcycle writes {sorted(DTYPES)}; set "
                         "\"dtype\" in that config.json to one of them")
    init = out / "init"
    tokenizer = None if hf is not None else run_tokenizer(dense_cfg, log)
    with building(init) as tmp:
        if hf is not None:
            copy_tokenizer_files(src, tmp)
        write_hf(tmp, weights_cfg, source, dtype, "2GB", base=hf, tokenizer=tokenizer, allow_dropless=True)
    cfg.train.init_from = str(init.resolve())
    dense_data = data_sources(dense_cfg.data)
    if hf is None and not data_sources(cfg.data) and dense_data and all(Path(s.path).is_dir() for s in dense_data):
        # keep training on the dense run's data (one folder or its mixture) unless told otherwise
        cfg.data.data_dir, cfg.data.sources = dense_cfg.data.data_dir, dense_cfg.data.sources
    return write_run_config(cfg, out)
