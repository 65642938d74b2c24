"""ep-train models -> Hugging Face Mixtral folders (export side of ``hf.py``).

``to_hf`` writes what ``MixtralForCausalLM.save_pretrained`` (transformers 5.12.1) writes: ``config.json``,
safetensors in the Hub's per-expert layout (``block_sparse_moe.experts.{e}.w1.weight``), sharded with a
``model.safetensors.index.json`` when more than one file, ``generation_config.json``, and the run's
sentencepiece tokenizer with the files ``AutoTokenizer`` needs. Values come from any ``ValueSource``
(a universal checkpoint, a Hugging Face init folder, an upcycled model), one tensor (one expert) at a
time, and each safetensors file is streamed to disk (header first, then each tensor as it is read): the export
holds one tensor in memory, whatever ``max_shard_size``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from ep_train.config import Config, moe_layer_indices, normalizes_top_k
from ep_train.data.verify import run_manifest
from ep_train.interop.hf import aux_coef_to_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Source = Callable[[str, tuple[int, ...], "list[int] | None"], torch.Tensor]  # a ValueSource
# config.json fields ep-train has no field for: kept from the model a run started from (train.init_from),
# else transformers 5.12.1's defaults, so an import followed by an export gives the same config.json.
PASSTHROUGH = {"attention_dropout": 0.0, "output_router_logits": False, "use_cache": True,
               "transformers_version": "5.12.1"}


def check_exportable(cfg: Config, allow_dropless: bool = False) -> None:
    """Refuse what MixtralForCausalLM cannot compute, naming the config field."""
    m, e = cfg.model, cfg.moe
    why = None
    if e.num_experts <= 1:
        why = (f"moe.num_experts = {e.num_experts}: a dense model; Mixtral is MoE in every layer (make one with "
               "`ep-train convert upcycle`)")
    elif e.num_shared_experts:
        why = f"moe.num_shared_experts = {e.num_shared_experts}: Mixtral has no shared experts"
    elif moe_layer_indices(m, e) != list(range(m.num_layers)):
        why = (f"MoE only in layers {moe_layer_indices(m, e)} of {m.num_layers} (moe.moe_layers / "
               "moe_layer_frequency): Mixtral has an MoE FFN in every layer, no dense layers")
    elif e.router_type == "expert_choice":
        why = "moe.router_type = 'expert_choice': Mixtral routes each token to its own top-k experts"
    elif e.top_groups is not None and e.top_groups < e.num_expert_groups:
        why = (f"moe.top_groups = {e.top_groups} (group-limited routing): Mixtral picks the top-k of all "
               "experts")
    elif e.expert_bias_update_rate > 0:
        why = ("moe.expert_bias_update_rate > 0: the learned expert bias steers the selection and Mixtral has "
               "no place for it")
    elif not normalizes_top_k(e):
        why = (f"moe.normalize_top_k = {e.normalize_top_k} with moe.num_experts_per_token = {e.num_experts_per_token}"
               ": ep-train weighs each expert by its router probability, and Mixtral always renormalises the top-k "
               "router weights (with one expert per token, to 1)")
    elif e.capacity_factor is not None and not allow_dropless:
        why = (f"moe.capacity_factor = {e.capacity_factor}: Mixtral is dropless, ep-train drops over-capacity "
               "assignments also at inference; pass --allow-dropless to export the same weights as a dropless "
               "model (it computes what ep-train computes with moe.capacity_factor null)")
    # Fine: noisy_topk and jitter (training-only noise), expert dropout and the balance-loss terms
    # (training only); inference is plain top-k softmax.
    if why:
        raise ValueError(f"this model cannot be exported as Hugging Face Mixtral: {why}")


def hf_config(cfg: Config, dtype: str, base: dict[str, Any] | None = None,
              special: dict[str, int | None] | None = None) -> dict[str, Any]:
    """``config.json`` as transformers 5.12.1 writes it for this model (keys sorted, like save_pretrained)."""
    m, e = cfg.model, cfg.moe
    out: dict[str, Any] = {**PASSTHROUGH, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
    out.update({k: v for k, v in (base or {}).items() if k in (*PASSTHROUGH, "bos_token_id", "eos_token_id",
                                                               "pad_token_id")})
    out.update(special or {})
    out.update({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "dtype": dtype, "hidden_act": "silu",
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers,
        # Mixtral's intermediate_size is the expert width (every layer is MoE: the dense width is unused).
        "intermediate_size": e.expert_intermediate_size or m.intermediate_size,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.rms_norm_eps,
        "rope_parameters": {"rope_theta": m.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
        "num_local_experts": e.num_experts, "num_experts_per_tok": e.num_experts_per_token,
        # transformers' balance loss is K times ep-train's (hf.aux_weight_from_hf). The jitter keeps its value;
        # Mixtral applies it to the experts' input too (training only).
        "router_aux_loss_coef": aux_coef_to_hf(e.aux_loss_weight, e.num_experts_per_token, base),
        "router_jitter_noise": e.router_jitter_noise,
        "sliding_window": None,
    })
    return dict(sorted(out.items()))


class TensorSpec(NamedTuple):
    """One tensor of the export: its Hub name and shape, and how to make its value (nothing is read before)."""

    name: str
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]


def hf_tensors(cfg: Config, source: Source, dtype: torch.dtype) -> list[TensorSpec]:
    """Every tensor under its Hub Mixtral name, layer by layer, one expert at a time: shapes from the model on
    ``meta``, values read from ``source`` (and cast to ``dtype``) only when ``read`` is called."""
    from ep_train.model.transformer import build_model

    def reader(name: str, shape: tuple[int, ...], expert: int | None = None) -> Callable[[], torch.Tensor]:
        if expert is None:
            return lambda: source(name, shape, None).to(dtype)
        return lambda: source(name, (1, *shape[1:]), [expert])[0].to(dtype)

    ren = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
           "ffn.router.weight": "block_sparse_moe.gate.weight"}
    out: list[TensorSpec] = []
    for name, p in build_model(cfg.model, cfg.moe, device="meta").named_parameters():  # tied: named once
        shape = tuple(p.shape)
        if name.endswith("router.noise_weight"):
            continue  # noisy top-k's noise scale: training only, Mixtral routes without it
        if name in ("embed.weight", "norm.weight"):
            out.append(TensorSpec("model." + name.replace("embed", "embed_tokens"), shape, reader(name, shape)))
            continue
        if name == "lm_head.weight":
            out.append(TensorSpec(name, shape, reader(name, shape)))
            continue
        _, layer, rest = name.split(".", 2)
        pre = f"model.layers.{layer}."
        if rest.startswith("ffn.experts."):
            w = rest.removeprefix("ffn.experts.")
            for ex in range(shape[0]):  # one expert at a time: [F, D] or [D, F], nn.Linear [out, in] as HF
                out.append(TensorSpec(f"{pre}block_sparse_moe.experts.{ex}.{w}.weight", shape[1:],
                                      reader(name, shape, ex)))
        elif rest.startswith("attn."):
            out.append(TensorSpec(pre + "self_attn." + rest.removeprefix("attn."), shape, reader(name, shape)))
        else:
            out.append(TensorSpec(pre + ren[rest], shape, reader(name, shape)))
    return out


def parse_size(text: str | int) -> int:
    """'5GB' (10^9), '2GiB' (2^30), '500MB', '20KB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size = {text!r} is invalid: write a size such as 5GB, 500MB or 2GiB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}  # safetensors' dtype names


def _write_shard(path: Path, specs: list[TensorSpec], dtype: torch.dtype) -> None:
    """One safetensors file, streamed: the header (every name, shape and offset, known from the specs) first,
    then each tensor's bytes as it is read. At most one tensor of the file is in memory at any time, whatever
    the shard size (save_file needs the whole file's tensors at once)."""
    assert sys.byteorder == "little", "safetensors stores little-endian bytes"
    size = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        n = math.prod(s.shape) * size
        header[s.name] = {"dtype": ST_DTYPES[dtype], "shape": list(s.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            t = s.read()
            if tuple(t.shape) != s.shape or t.dtype != dtype:
                raise ValueError(f"{s.name}: the source gives {tuple(t.shape)} {t.dtype}, the export needs "
                                 f"{s.shape} {dtype}")
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
            del t  # before the next is read
        f.flush()
        os.fsync(f.fileno())


def write_safetensors(out: Path, specs: list[TensorSpec], dtype: torch.dtype, max_shard_size: int) -> int:
    """Shards of at most ``max_shard_size`` bytes (a larger single tensor gets its own), named as
    save_pretrained names them, each written a tensor at a time (``_write_shard``): the export's memory is one
    tensor (one expert), not one shard. Returns the parameter count."""
    size = torch.empty((), dtype=dtype).element_size()
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    filled = total_size = total_params = 0
    for spec in specs:
        numel = math.prod(spec.shape)
        if current and filled + numel * size > max_shard_size:
            shards.append(current)
            current, filled = [], 0
        current.append(spec)
        filled += numel * size
        total_size += numel * size
        total_params += numel
    if current:
        shards.append(current)
    for i, shard in enumerate(shards):
        _write_shard(out / f"shard-{i}.tmp", shard, dtype)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, name in enumerate(names):
        os.replace(out / f"shard-{i}.tmp", out / name)
    if n > 1:
        weight_map = {spec.name: names[i] for i, shard in enumerate(shards) for spec in shard}
        index = {"metadata": {"total_parameters": total_params, "total_size": total_size},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total_params


def write_tokenizer(sp_model: Path, out: Path, max_len: int, add_bos: bool = False) -> dict[str, int | None]:
    """``tokenizer.model`` plus the configs ``AutoTokenizer`` loads as a LlamaTokenizer encoding exactly
    like sentencepiece: no EOS added (ep-train's data has EOS per document), BOS only if the run's data
    starts documents with it (``add_bos``: build --append-bos), and a dummy prefix space only if the model
    adds one itself. Returns the special token ids for config.json."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    shutil.copyfile(sp_model, out / "tokenizer.model")
    ids = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id(), "pad_token": sp.pad_id()}
    special = {k: sp.id_to_piece(i) for k, i in ids.items() if i >= 0}
    # sentencepiece keeps add_dummy_prefix in its protobuf; its effect is visible from the outside.
    prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")
    cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": add_bos, "add_eos_token": False,
           "add_prefix_space": prefix, "legacy": False, "clean_up_tokenization_spaces": False,
           "model_max_length": max_len, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return {f"{k.removesuffix('_token')}_token_id": (i if i >= 0 else None) for k, i in ids.items() if k != "unk_token"}


def write_hf(out: Path, cfg: Config, source: Source, dtype: str = "float32", max_shard_size: str | int = "2GB",
             base: dict[str, Any] | None = None, tokenizer: Path | None = None,
             allow_dropless: bool = False) -> Path:
    """A Hugging Face Mixtral folder for ``cfg`` with values from ``source``; config.json is written last,
    so an interrupted export is not a loadable folder."""
    check_exportable(cfg, allow_dropless)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype = {dtype!r} is invalid: use one of {sorted(DTYPES)}")
    cap = parse_size(max_shard_size)
    out.mkdir(parents=True, exist_ok=True)
    # BOS as the run's training documents had it (build --append-bos)
    add_bos = bool((run_manifest(cfg.data) or {}).get("append_bos", False))
    special = write_tokenizer(tokenizer, out, cfg.model.max_seq_len, add_bos) if tokenizer is not None else None
    write_safetensors(out, hf_tensors(cfg, source, DTYPES[dtype]), DTYPES[dtype], cap)
    config = hf_config(cfg, dtype, base, special)
    gen = {"_from_model_config": True, "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
           "output_attentions": False, "output_hidden_states": False,
           "transformers_version": config["transformers_version"], "use_cache": True}
    if config["pad_token_id"] is not None:
        gen["pad_token_id"] = config["pad_token_id"]
    (out / "generation_config.json").write_text(json.dumps(dict(sorted(gen.items())), indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# ---- run directories and checkpoints -----------------------------------------------------------------
def run_dir_config(path: Path) -> Config | None:
    """The config of a run directory that has none of its own checkpoints: the trainer's record
    (``config.json``, written at start) or what ``ep-train convert`` wrote (``config.yaml``)."""
    import yaml

    from ep_train.config import config_from_dict
    from ep_train.train.checkpoint import complete_checkpoints

    if not path.is_dir() or path.name.startswith("step_") or complete_checkpoints(path / "checkpoints"):
        return None
    for name, read in (("config.json", json.loads), ("config.yaml", yaml.safe_load)):
        if (path / name).is_file():
            return config_from_dict(read((path / name).read_text()))
    return None


def run_tokenizer(cfg: Config, log: Callable[[str], None] = print) -> Path | None:
    """The run's sentencepiece model: data.tokenizer, else the one its shards' manifest names."""
    t = cfg.data.tokenizer
    manifest = run_manifest(cfg.data)  # every source has the same tokenizer (checked at start)
    if t is None and manifest is not None:
        t = manifest["tokenizer"]["path"]
    if t is None:
        return None
    if not Path(t).is_file():  # a run from another machine: the weights are still worth exporting
        log(f"note: the run's tokenizer {t!r} is not here; exporting without tokenizer files")
        return None
    return Path(t)


def copy_tokenizer_files(src: Path, out: Path) -> bool:
    """Tokenizer files of a Hugging Face folder (the run started from), copied as they are."""
    names = [n for n in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
             if (src / n).is_file()]
    for n in names:
        shutil.copyfile(src / n, out / n)
    return bool(names)


def to_hf(checkpoint: str | Path, output: str | Path, dtype: str = "auto", max_shard_size: str | int = "2GB",
          allow_dropless: bool = False, log: Callable[[str], None] = print) -> Path:
    """Export a run as a Hugging Face Mixtral folder; returns ``output``.

    ``checkpoint``: a run directory (its latest complete checkpoint), its ``checkpoints/`` or a
    ``checkpoints/step_N`` folder of a run at any world/EP size (read through the universal form, cached
    in the step folder, or in a temporary folder under ``output`` when that is read-only), or a run
    directory without checkpoints whose config has ``train.init_from`` (its initial weights: what
    ``from-hf``/``upcycle`` made). ``dtype``: float32, bfloat16, float16 or auto (the source's: fp32 master
    weights of a checkpoint, the init folder's dtype). Peak memory: one shard (``max_shard_size``).
    """
    from ep_train.interop.hf import HFMixtralSource, hf_folder_config, init_folder, read_hf_json
    from ep_train.interop.universal import UniversalSource, find_checkpoint, run_config, to_universal

    src, out = Path(checkpoint), Path(output)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--output {str(out)!r} is not empty; pass a new folder")
    parse_size(max_shard_size)  # a bad size refused now, not after the conversion and with the tokenizer written
    hf = hf_folder_config(src)
    if hf is not None:  # its config.json is not a run config: parsed as one, it failed on "architectures"
        raise ValueError(f"--checkpoint {str(src)!r} is already a Hugging Face folder (config.json with model_type "
                         f"{hf['model_type']!r}); pass a run directory or RUN/checkpoints/step_N")
    cfg = run_dir_config(src)
    init = init_folder(src, cfg.train.init_from) if cfg is not None and cfg.train.init_from else None
    if cfg is not None and init is None:
        raise ValueError(f"{str(src)!r} has no checkpoint yet and starts from the seeded initialisation "
                         "(no train.init_from): nothing to export; train it first")
    tmp = None
    if init is not None:
        assert cfg is not None
        check_exportable(cfg, allow_dropless)
        base = read_hf_json(init / "config.json") if (init / "config.json").is_file() else None
        source: Source = HFMixtralSource(init, cfg)
        auto = (base or {}).get("dtype") or (base or {}).get("torch_dtype") or "float32"
    else:
        step = find_checkpoint(src)
        cfg = run_config(step)
        check_exportable(cfg, allow_dropless)  # before the (slow) conversion
        if os.access(step, os.W_OK):
            universal = to_universal(step)
        else:
            tmp = out / ".universal"
            log(f"note: {str(step)!r} is read-only; converting into {str(tmp)!r} (removed afterwards)")
            universal = to_universal(step, tmp / "universal")
        source = UniversalSource(universal)
        try:  # only for config.json's passthrough fields and the tokenizer files: optional
            init = init_folder(step.parent.parent, cfg.train.init_from) if cfg.train.init_from else None
        except ValueError:
            init = None
        base = read_hf_json(init / "config.json") if init and (init / "config.json").is_file() else None
        auto = "float32"  # the checkpoint's fp32 master weights
    try:
        tokenizer = run_tokenizer(cfg, log)
        if tokenizer is None and init is not None and init.is_dir():
            out.mkdir(parents=True, exist_ok=True)
            copy_tokenizer_files(init, out)
        write_hf(out, cfg, source, auto if dtype == "auto" else dtype, max_shard_size, base, tokenizer,
                 allow_dropless)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
