"""Hugging Face Mixtral checkpoints -> ep_train models (load side).

Reads ``config.json`` and safetensors (single file or sharded with an index) as
``MixtralForCausalLM.save_pretrained`` writes them: the per-expert layout
(``block_sparse_moe.experts.{e}.w1.weight``) and the fused layout of transformers 5
(``mlp.experts.gate_up_proj`` [E, 2F, D], ``mlp.experts.down_proj`` [E, D, F]) are both understood.
Never unpickles anything: safetensors only.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from ep_train.config import Config, MoEConfig, normalizes_top_k, read_json_object, validate
from ep_train.model.transformer import Transformer


# transformers' defaults (MixtralConfig, LlamaConfig, MistralConfig) for the keys a config.json may omit:
# (rope_theta, rms_norm_eps).
HF_DEFAULTS: dict[str, tuple[float, float]] = {"mixtral": (1e6, 1e-5), "llama": (10000.0, 1e-6),
                                               "mistral": (10000.0, 1e-6)}
MIXTRAL_AUX_COEF = 0.001  # MixtralConfig's router_aux_loss_coef, for a config.json that leaves it out


def aux_weight_from_hf(coef: float, top_k: int) -> float:
    """ep-train's ``moe.aux_loss_weight`` for Mixtral's ``router_aux_loss_coef``. transformers 5.12.1's
    ``load_balancing_loss_func`` takes the routed share per expert as the mean over tokens of a [K, E] one-hot
    summed over the K choices (a share of T, not of T * K), so its loss is K times ep-train's Megatron-normalised
    one (1.0 when balanced, any K): the same balance pressure needs K times the coefficient."""
    return coef * top_k


def aux_coef_to_hf(weight: float, top_k: int, base: dict[str, Any] | None = None) -> float:
    """``router_aux_loss_coef`` for ``moe.aux_loss_weight`` (inverse of ``aux_weight_from_hf``). ``base``: the
    config.json the run started from; its coefficient when it imports as this weight, so from-hf then to-hf
    writes it back bit for bit (w / K need not give back c from c * K when K is not a power of two)."""
    c = (base or {}).get("router_aux_loss_coef")
    if isinstance(c, (int, float)) and not isinstance(c, bool) and aux_weight_from_hf(float(c), top_k) == weight:
        return c
    return weight / top_k


def _needer(hf: dict[str, Any], kind: str) -> Any:
    """``need(key)``: config.json's value for a key with no default, or a ValueError naming it."""
    def need(key: str) -> Any:
        if key not in hf:
            raise ValueError(f"config.json (model_type {kind!r}) has no {key!r}; it is not a complete Hugging Face "
                             "config: re-save the model with save_pretrained, or fetch config.json again")
        return hf[key]
    return need


def model_config_from_hf(hf: dict[str, Any], kinds: tuple[str, ...] = ("mixtral",)) -> Config:
    """The ``model`` section from a Hugging Face Llama-family config.json (Mixtral, or Llama/Mistral for
    upcycling); the checks refuse what ep-train's decoder would compute differently."""
    kind = hf.get("model_type")
    if kind not in kinds:
        hint = ("; a dense Llama/Mistral model becomes MoE with `ep-train convert upcycle`"
                if kind in ("llama", "mistral") else "")
        raise ValueError(f"config.json model_type = {kind!r}; this needs {' or '.join(map(repr, kinds))}{hint}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act = {hf['hidden_act']!r}; ep-train experts are SwiGLU (silu)")
    if hf.get("sliding_window") is not None:
        raise ValueError(f"config.json sliding_window = {hf['sliding_window']}; ep-train uses full causal "
                         "attention, set sliding_window to null for a model trained without it")
    for bias in ("attention_bias", "mlp_bias"):
        if hf.get(bias):
            raise ValueError(f"config.json {bias} = true; ep-train's linear layers have no bias")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config.json rope_parameters.rope_type = {rope.get('rope_type', rope.get('type'))!r}; "
                         "only 'default' is supported")
    c = Config()
    m = c.model
    need = _needer(hf, kind)
    m.vocab_size, m.hidden_size = need("vocab_size"), need("hidden_size")
    m.intermediate_size, m.num_layers = need("intermediate_size"), need("num_hidden_layers")
    m.num_heads = need("num_attention_heads")
    m.num_kv_heads = hf.get("num_key_value_heads") or m.num_heads
    m.head_dim = hf.get("head_dim")
    m.max_seq_len = hf.get("max_position_embeddings", m.max_seq_len)
    # A key left out means transformers' default for that model_type (save_pretrained omits some): Mixtral's
    # differ from Llama's and Mistral's (a Llama-2 config.json has no rope_theta: 10000, not Mixtral's 1e6).
    theta, eps = HF_DEFAULTS[kind]
    m.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", theta)))
    m.rms_norm_eps = float(hf.get("rms_norm_eps", eps))
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.init_std = float(hf.get("initializer_range", 0.02))
    c.moe.num_experts = 0
    c.data.seq_len = min(c.data.seq_len, m.max_seq_len)
    return c


def config_from_hf(hf: dict[str, Any]) -> Config:
    c = model_config_from_hf(hf)
    e = c.moe
    need = _needer(hf, "mixtral")
    e.num_experts, e.num_experts_per_token = need("num_local_experts"), need("num_experts_per_tok")
    # Mixtral always renormalises its top-k weights (MixtralConfig has no norm_topk_prob, unlike the Qwen-MoE
    # configs, which ep-train does not import): said explicitly, so a top-1 Mixtral imports as it computes
    # (every weight 1). That model is exact for inference; run_config_for refuses to train it.
    e.normalize_top_k = True
    coef = hf.get("router_aux_loss_coef", MIXTRAL_AUX_COEF)
    e.aux_loss_weight = aux_weight_from_hf(float(coef), e.num_experts_per_token)
    # Kept as the value, with ep-train's meaning: Mixtral jitters the MoE block's input (router and experts),
    # ep-train the router's input only. Training-only noise either way; inference is the same.
    e.router_jitter_noise = float(hf.get("router_jitter_noise", 0.0))
    e.moe_layers = list(range(c.model.num_layers))
    validate(c, stored=True)  # the checkpoint's model as it is; a run from it validates as any run
    return c


def routing_changes(moe: MoEConfig) -> list[str]:
    """The settings of ``moe`` that route otherwise than Mixtral (softmax, then the top-k of all experts) from
    the first step, each with its fix: a run with them would not start from the function a Mixtral checkpoint
    computes (its logits differ at step 0) and ``to-hf`` refuses it later. Not here, as training choices that
    leave the checkpoint's function alone: capacity_factor (as in check_exportable and upcycle: the weights
    are the same, generation routes dropless, to-hf --allow-dropless), expert_bias_update_rate (the bias
    starts at 0; to-hf refuses the run once it has moved), router_jitter_noise and expert_dropout (noise)."""
    out: list[str] = []
    if moe.router_type == "expert_choice":
        out.append("moe.router_type = 'expert_choice' (each expert picks its tokens; Mixtral routes each token to "
                   "its own top-k experts): set moe.router_type to topk")
    elif moe.router_type != "topk":
        out.append(f"moe.router_type = {moe.router_type!r} (a learned noise scale the checkpoint does not have, and "
                   "noise of std ln 2 on every router logit from the first step): set moe.router_type to topk")
    if moe.top_groups is not None and moe.top_groups < moe.num_expert_groups:
        out.append(f"moe.top_groups = {moe.top_groups} of moe.num_expert_groups = {moe.num_expert_groups} "
                   "(group-limited routing; Mixtral picks the top-k of all experts): set moe.top_groups to null")
    return out


def check_matches_hf(cfg: Config, hf: Config, path: str | Path) -> None:
    """The run's model must be the checkpoint's: every field that shapes or computes the model."""
    from ep_train.config import moe_layer_indices

    fields = [("model", f) for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                     "num_kv_heads", "rope_theta", "rms_norm_eps", "tie_embeddings")]
    fields += [("moe", f) for f in ("num_experts", "num_experts_per_token", "num_shared_experts")]
    diff = [f"{sec}.{f}: run {getattr(getattr(cfg, sec), f)!r} vs checkpoint {getattr(getattr(hf, sec), f)!r}"
            for sec, f in fields if getattr(getattr(cfg, sec), f) != getattr(getattr(hf, sec), f)]
    if normalizes_top_k(cfg.moe) != normalizes_top_k(hf.moe):  # null (auto) may mean the checkpoint's true
        diff.append(f"moe.normalize_top_k: run {normalizes_top_k(cfg.moe)} vs checkpoint {normalizes_top_k(hf.moe)}")
    head_dims = [c.model.head_dim or c.model.hidden_size // c.model.num_heads for c in (cfg, hf)]
    if head_dims[0] != head_dims[1]:  # unset means hidden_size / num_heads, what config.json often spells out
        diff.append(f"model.head_dim: run {cfg.model.head_dim!r} (= {head_dims[0]}) vs checkpoint {head_dims[1]}")
    if (cfg.moe.expert_intermediate_size or cfg.model.intermediate_size) != hf.model.intermediate_size:
        diff.append(f"moe.expert_intermediate_size: run {cfg.moe.expert_intermediate_size!r} vs checkpoint "
                    f"{hf.model.intermediate_size}")
    if moe_layer_indices(cfg.model, cfg.moe) != moe_layer_indices(hf.model, hf.moe):
        diff.append("moe layers: Mixtral has an MoE FFN in every layer")
    if diff:
        raise ValueError(f"train.init_from {str(path)!r} is another model than the run config: {'; '.join(diff)}; "
                         "make the run config match the checkpoint's config.json")
    routing = routing_changes(cfg.moe)
    if routing:
        raise ValueError(f"train.init_from {str(path)!r} is a Mixtral checkpoint and the run config routes "
                         f"otherwise from the first step: {'; '.join(routing)} (a run from a checkpoint starts "
                         "from the function it computes)")


def hf_folder_config(folder: Path) -> dict[str, Any] | None:
    """The config.json of a Hugging Face model folder (it names a model_type), else None: no such file, or an
    ep-train run's config.json (the trainer writes one too, without model_type)."""
    f = folder / "config.json"
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and "model_type" in data else None


def init_folder(run: Path, init_from: str) -> Path:
    """The folder a run directory's ``train.init_from`` names: as written (the trainer reads it so), else
    relative to the run directory, else the run's own ``init/``. from-hf and upcycle write ``RUN/init``'s
    absolute path, so a run folder moved or copied elsewhere still finds its weights (``ep_train.load`` and
    ``to-hf`` share this)."""
    init = Path(init_from)
    for folder in (init, run / init, run / "init"):  # run / an absolute path is that path
        if folder.is_dir():
            return folder
    raise ValueError(f"train.init_from = {init_from!r} (the run config of {str(run)!r}) is not a folder, and "
                     f"{str(run / 'init')!r} is not either (a run moved without its init/?); point "
                     "train.init_from at the Hugging Face folder the run starts from")


def read_hf_json(path: Path) -> dict[str, Any]:
    """A Hugging Face folder's JSON file (config.json, model.safetensors.index.json) as an object."""
    return read_json_object(path, repr(str(path)), "rewrite that file (save_pretrained writes it) or fetch it again")


def weight_map(index: Path) -> dict[str, str]:
    """``model.safetensors.index.json``'s tensor name -> shard file."""
    where = read_hf_json(index).get("weight_map")
    if not isinstance(where, dict):
        raise ValueError(f"{str(index)!r} has no \"weight_map\" object (tensor name -> shard file); rewrite that "
                         "file (save_pretrained writes it) or fetch it again")
    for name, shard in where.items():  # shards live beside the index: a path would read (and copy) elsewhere
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise ValueError(f"{str(index)!r}: weight_map[{name!r}] = {shard!r} is not a file name in that folder; "
                             "shard names must be plain file names (as save_pretrained writes them)")
    missing = sorted({shard for shard in where.values() if not (index.parent / shard).is_file()})
    if missing:  # a partial download: said before any tensor is read, not as a FileNotFoundError halfway
        raise ValueError(f"{str(index)!r} names {len(missing)} shard file(s) missing from {str(index.parent)!r}: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; fetch them again")
    return dict(where)


class HFMixtralSource:
    """Values of ep-train parameters read from a Hugging Face Mixtral folder, tensor by tensor.

    A ``ValueSource`` (``ep_train.model.init``): each call opens the memory-mapped safetensors file
    holding that tensor and reads only what is asked, an expert's rows for stacked experts
    (``get_slice``), so a rank never holds more than its share plus the tensor being made.
    Accepts the per-expert names of older checkpoints (``block_sparse_moe.experts.{e}.w1.weight``) and the
    fused ones transformers 5 writes (``mlp.experts.gate_up_proj`` [E, 2F, D], ``mlp.experts.down_proj``).
    """

    def __init__(self, path: str | Path, cfg: Config | None = None) -> None:
        self.path = Path(path)
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"{str(cfg_file)!r} not found; pass a Hugging Face Mixtral folder (save_pretrained)")
        own = config_from_hf(read_hf_json(cfg_file))
        if cfg is not None:
            check_matches_hf(cfg, own, self.path)  # a run config must describe this checkpoint's model
        self.cfg = cfg or own
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.where = weight_map(index)
        elif (self.path / "model.safetensors").is_file():
            with safe_open(str(self.path / "model.safetensors"), "pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ValueError(f"no model.safetensors or model.safetensors.index.json in {str(self.path)!r}; "
                             "save the model with save_pretrained(..., safe_serialization=True)")
        self.fused = any(k.endswith("mlp.experts.gate_up_proj") for k in self.where)
        self._check_names()

    def _hf_names(self, name: str, expert: int | None = None) -> tuple[str, slice | None]:
        """ep-train name (+ global expert id) -> (HF tensor name, rows of its second dim or None)."""
        m = "model."
        fixed = {"embed.weight": m + "embed_tokens.weight", "norm.weight": m + "norm.weight",
                 "lm_head.weight": "lm_head.weight"}
        if name in fixed:
            return fixed[name], None
        layer, rest = name.split(".", 2)[1], name.split(".", 2)[2]
        src = f"{m}layers.{layer}."
        simple = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight"}
        if rest in simple:
            return src + simple[rest], None
        if rest.startswith("attn."):
            return src + "self_attn." + rest.removeprefix("attn."), None
        if rest == "ffn.router.weight":
            return src + ("mlp.gate.weight" if self.fused else "block_sparse_moe.gate.weight"), None
        w = rest.removeprefix("ffn.experts.")
        assert w in ("w1", "w2", "w3") and expert is not None, name
        if not self.fused:
            return f"{src}block_sparse_moe.experts.{expert}.{w}.weight", None
        f = self.cfg.moe.expert_intermediate_size or self.cfg.model.intermediate_size
        if w == "w2":
            return src + "mlp.experts.down_proj", None
        return src + "mlp.experts.gate_up_proj", slice(0, f) if w == "w1" else slice(f, 2 * f)  # gate, up

    def _check_names(self) -> None:
        from ep_train.model.transformer import build_model

        wanted: set[str] = set()
        for name, p in build_model(self.cfg.model, self.cfg.moe, device="meta").named_parameters():
            experts = range(p.shape[0]) if name.endswith(("experts.w1", "experts.w2", "experts.w3")) else [None]
            wanted.update(self._hf_names(name, e)[0] for e in experts)
        if self.cfg.model.tie_embeddings:  # one matrix, stored as the embedding (an lm_head copy is ignored)
            wanted.discard("lm_head.weight")
        missing = sorted(wanted - set(self.where))
        extra = sorted(k for k in set(self.where) - wanted if "rotary_emb" not in k and k != "lm_head.weight")
        if missing or extra:
            raise ValueError(f"{str(self.path)!r} does not match its config.json as a Mixtral checkpoint: "
                             f"missing {missing[:5]}, unexpected {extra[:5]}")

    def _read(self, key: str, expert: int | None, rows: slice | None) -> torch.Tensor:
        with safe_open(str(self.path / self.where[key]), "pt") as f:  # memory-mapped: reads only the slice
            sl = f.get_slice(key)
            if expert is None:
                return sl[:]
            if rows is None:
                return sl[expert]
            return sl[expert, rows.start:rows.stop]

    def __call__(self, name: str, shape: tuple[int, ...], expert_ids: list[int] | None) -> torch.Tensor:
        if name == "lm_head.weight" and self.cfg.model.tie_embeddings:
            name = "embed.weight"  # tied: not asked for as a parameter of its own, but read as the embedding
        if expert_ids is None:
            key, _ = self._hf_names(name)
            return self._read(key, None, None).float()
        out = torch.empty(shape)
        for row, e in enumerate(expert_ids):
            key, rows = self._hf_names(name, e)
            per_expert = not self.fused
            out[row] = (self._read(key, None, None) if per_expert else self._read(key, e, rows)).float()
        return out


def from_hf_mixtral(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, Config]:
    """Load a Hugging Face Mixtral checkpoint directory into one process; returns ``(model, config)``.

    Streams tensor by tensor (``HFMixtralSource``): peak memory is the model plus one tensor. The
    trainer reads the same source per rank (``train.init_from``) into its own share only.
    """
    from ep_train.model.transformer import build_model

    source = HFMixtralSource(path)  # each parameter made in dtype as it is read (no fp32 copy of the model)
    return build_model(source.cfg.model, source.cfg.moe, source=source, dtype=dtype), source.cfg


# The MoE fields a Mixtral checkpoint (or an upcycled model) fixes; the other moe fields (z-loss weight,
# capacity, router_init_std ...) are training choices and come from the base config.
MIXTRAL_MOE = {"num_shared_experts": 0, "shared_expert_intermediate_size": None, "normalize_top_k": True,
               "router_type": "topk", "expert_intermediate_size": None, "moe_layer_frequency": 1, "moe_layer_start": 0,
               "moe_layer_end": None}
SHAPE_FIELDS = [("model", f) for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                       "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_embeddings")]
SHAPE_FIELDS += [("moe", f) for f in ("num_experts", "num_experts_per_token", "expert_intermediate_size",
                                      *MIXTRAL_MOE)]


MODEL_MOE = ("num_experts", "num_experts_per_token", "aux_loss_weight", "router_jitter_noise", "moe_layers")


def run_config_for(model: Config, base: str | Path | None, overrides: list[tuple[str, Any]], what: str,
                   moe_fields: tuple[str, ...] = MODEL_MOE) -> Config:
    """A run config for a model given by a checkpoint: the model section and the MoE fields the model fixes
    come from ``model`` (over the base file, a recipe that may describe another model); everything else
    from the base file; command-line overrides last, refused when they contradict the model (``what``
    names it in the message)."""
    import copy

    from ep_train.config import _set, load_config

    # A run from a checkpoint is a Mixtral (MIXTRAL_MOE: renormalised top-k weights); with K = 1 that weight
    # is 1 for every token, and ep-train's own top-1 weight (the probability) would be another model.
    if model.moe.num_experts_per_token == 1:
        raise ValueError(f"{what} routes each token to one expert (num_experts_per_tok 1) with Mixtral's renormalised "
                         "weight, which is 1 for every token: trained so, its router would learn nothing from the "
                         "language-model loss, and ep-train's top-1 weight (the router probability, as in Switch "
                         "Transformer) would make it another model; use 2 or more experts per token (upcycle "
                         "--experts-per-token), or use such a checkpoint for inference only (ep-train generate)")
    # the base config's paths are the training machine's: checked when it trains, not here
    cfg = load_config(base, check_paths=False) if base is not None else Config()
    cfg.model = copy.deepcopy(model.model)
    for f in moe_fields:
        setattr(cfg.moe, f, copy.deepcopy(getattr(model.moe, f)))
    for f, v in MIXTRAL_MOE.items():
        setattr(cfg.moe, f, v)
    cfg.data.seq_len = min(cfg.data.seq_len, cfg.model.max_seq_len)
    for key, value in overrides:
        _set(cfg, key, value, Config)

    def value(c: Config, sec: str, f: str) -> Any:  # normalize_top_k null (auto) may mean the model's true
        return normalizes_top_k(c.moe) if (sec, f) == ("moe", "normalize_top_k") else getattr(getattr(c, sec), f)

    diff = [f"{sec}.{f} = {getattr(getattr(cfg, sec), f)!r} but {what} has {getattr(getattr(model, sec), f)!r}"
            for sec, f in SHAPE_FIELDS if value(cfg, sec, f) != value(model, sec, f)]
    if diff:
        raise ValueError(f"the requested config does not describe {what}: {'; '.join(diff)}; drop those "
                         "overrides (the model's shape comes from its weights)")
    routing = routing_changes(cfg.moe)
    if routing:  # what check_matches_hf would refuse at the first training step: refused before writing the run
        raise ValueError(f"the requested config (--config and overrides) routes otherwise than {what} from the "
                         f"first step: {'; '.join(routing)} (a run from a checkpoint starts from the function "
                         "it computes)")
    validate(cfg)
    return cfg


def write_run_config(cfg: Config, out: Path) -> Path:
    """``RUN/config.yaml``: the whole config (every section), so the run does not depend on the base file."""
    import yaml

    from ep_train.config import config_to_dict

    if cfg.train.resume is None:
        cfg.train.resume = "auto"  # the first start begins at init_from; a restart continues from its checkpoint
    path = out / "config.yaml"
    path.write_text("# written by `ep-train convert`; train with:\n#   ep-train train --config "
                    f"{path} --run-dir {out} [--data_dir DIR]\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


@contextlib.contextmanager
def building(final: Path) -> Iterator[Path]:
    """A folder to write ``final`` in: ``final.partial``, renamed to ``final`` when the block succeeds and
    removed when it fails, so a failed or killed conversion leaves no ``final`` that would make the retry
    refuse the output folder as already holding a run (a ``.partial`` left by a kill is ours to replace)."""
    import shutil

    tmp = final.with_name(final.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, final)


HF_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.model",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def from_hf(hf_dir: str | Path, output: str | Path, config: str | Path | None = None,
            overrides: list[tuple[str, Any]] | None = None, link: bool = False) -> Path:
    """Make a run directory that starts from a Hugging Face Mixtral folder; returns its ``config.yaml``.

    The folder's safetensors, config and tokenizer files are copied (``link``: hard-linked, no extra disk,
    but a later in-place rewrite of the source would change the run's weights) into ``RUN/init/``, and
    ``RUN/config.yaml`` gets ``train.init_from: RUN/init`` (absolute), the model section from
    config.json, the rest from ``config`` and ``overrides``. Train with ``ep-train train --config
    RUN/config.yaml --run-dir RUN``: every rank streams its share of ``RUN/init`` (``HFMixtralSource``).
    The weights are the HF files themselves, so ``to_hf`` of the run before any step writes them back
    bit for bit.
    """
    import shutil

    src, out = Path(hf_dir), Path(output)
    source = HFMixtralSource(src)  # checks config.json and that the tensors are that model's
    if (out / "config.yaml").exists() or (out / "init").exists() or (out / "checkpoints").exists():
        raise ValueError(f"--output {str(out)!r} already holds a run (config.yaml, init/ or checkpoints/); "
                         "pass a new folder")
    cfg = run_config_for(source.cfg, config, overrides or [], f"the checkpoint {str(src)!r}")
    init = out / "init"
    with building(init) as tmp:
        for name in sorted({*source.where.values(), *(f for f in HF_FILES if (src / f).is_file())}):
            if link:
                try:
                    os.link(src / name, tmp / name)
                    continue
                except OSError:  # another file system: copy instead
                    pass
            shutil.copyfile(src / name, tmp / name)
    cfg.train.init_from = str(init.resolve())
    return write_run_config(cfg, out)
