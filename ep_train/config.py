"""Run configuration: one dataclass per concern, loaded from YAML/JSON plus command-line overrides.

Precedence: command line > file > dataclass defaults. Unknown keys are errors. The names users
know from MoE guides (``top_k``, ``experts_per_tok``, ``load_balance_alpha``, ...) are accepted as
aliases. Every cross-field check lives in :func:`validate`, which raises ``ValueError`` naming the
field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408  # dense SwiGLU FFN width (and the default expert width)
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    max_seq_len: int = 2048
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02


@dataclass
class MoEConfig:
    num_experts: int = 8  # 0 or 1 = dense model
    num_experts_per_token: int = 2  # K; router_type expert_choice ignores it (see capacity_factor there)
    expert_intermediate_size: int | None = None  # defaults to model.intermediate_size
    moe_layers: list[int] | None = None  # explicit list wins over the frequency rule below
    moe_layer_frequency: int = 1
    moe_layer_start: int = 0
    moe_layer_end: int | None = None  # exclusive; None = num_layers
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None  # defaults to the expert width
    router_type: str = "topk"  # "topk" (Mixtral) | "noisy_topk" (learned noise, training only) | "expert_choice"
    # Combine weights: true = the top-K probabilities renormalised to sum 1 (Mixtral), false = the router's
    # probabilities as they are (Switch Transformer). null = auto: true for K >= 2, false for K = 1, where
    # renormalising makes every weight p / p = 1 and the router learns nothing from the language-model loss
    # (true with K = 1 is refused). expert_choice ignores it: its weights are the raw probabilities.
    normalize_top_k: bool | None = None
    # Multiplicative jitter on the router's input only, training only. transformers' Mixtral (router_jitter_noise)
    # jitters the MoE block's input, which its experts then see too; an imported value keeps ep-train's meaning.
    router_jitter_noise: float = 0.0
    router_init_std: float = 0.01
    # Weight of the Switch loss, which is normalised as Megatron's (1.0 when balanced, for any K); transformers'
    # load_balancing_loss_func is K times it, so Mixtral's router_aux_loss_coef c is K * c here (import/export
    # convert). expert_choice has no Switch loss: any other value than this default or 0 is refused there.
    aux_loss_weight: float = 0.01
    router_z_loss_weight: float = 0.001
    capacity_factor: float | None = None  # None = dropless
    drop_policy: str = "drop"  # "drop" lowest-probability | "overflow" to next-best expert with room; not expert_choice
    cv_loss_weight: float = 0.0  # squared coefficient of variation of expert importance (GShard/Shazeer)
    router_entropy_loss_weight: float = 0.0  # penalty on per-token routing entropy (decisive routing)
    # Switch-loss counts: "micro_batch" (this rank) | "global_batch" (all ranks); not expert_choice (no Switch loss)
    balance_stats: str = "micro_batch"
    expert_dropout: float = 0.0  # training only: drop each assignment but a token's first kept one, with this chance
    num_expert_groups: int = 1  # group-limited routing: experts in this many groups of consecutive ids ...
    top_groups: int | None = None  # ... and a token uses at most this many groups (None = all: off)
    expert_bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3's gamma, e.g. 0.001); 0 = off


@dataclass
class ParallelConfig:
    ep_size: int = 1
    # A file path, or a name of ds_configs/ (zero3_offload, zero3, zero2, zero3_nvme). The trainer merges batch
    # sizes, precision and clipping into it and refuses contradictions.
    ds_config: str = "zero3_offload"
    # ZeRO-Infinity (ds_config zero3_nvme or any JSON with an offload device "nvme"): a folder on a fast
    # local disk that supports O_DIRECT (ext4/xfs on NVMe), one per run; written into the JSON's nvme_path.
    nvme_path: str | None = None
    # Also swap optimizer states (fp32 master weights, Adam moments) to nvme_path. Checkpoints then resume
    # only the same way, at the same world size (ep_train/parallel/ds_nvme.py).
    nvme_offload_optimizer: bool = False
    # What one ZeRO-3 fetch brings in: "block" = a transformer block's parameters at once (DeepSpeed's z3 leaf
    # module: one hook pair per block instead of one per submodule; the block's attention and local experts are
    # then live together, as ``ep-train plan`` assumes), "module" = DeepSpeed's default, each submodule's own.
    # "auto" = block, except with parameters on NVMe when offload_param.buffer_count cannot hold a block's
    # parameters (DeepSpeed swaps them in together, one buffer each): module there.
    zero3_gather: str = "auto"


@dataclass
class DataSource:
    """One folder of a weighted mixture (``data.sources``); see ep_train/data/mixture.py."""

    path: str  # output of `data_prep_tool build` (or `data_prep_tool adopt`)
    weight: float = 1.0  # share of the training samples (normalised over the sources)
    name: str | None = None  # for logs and metrics; defaults to the folder's name

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name

    @staticmethod
    def parse_flat(text: str, where: str) -> list[dict[str, Any]]:
        """Megatron's ``--data-path`` form: ``"0.7 web 0.3 code"`` -> [{path: web, weight: 0.7}, ...]."""
        parts = text.split()
        if not parts or len(parts) % 2:
            raise ValueError(f"{where} = {text!r} is invalid: expected pairs 'WEIGHT FOLDER ...' such as "
                             "'0.7 data/web 0.3 data/code'")
        out = []
        for weight, path in zip(parts[::2], parts[1::2]):
            try:
                out.append({"path": path, "weight": float(weight)})
            except ValueError:
                raise ValueError(f"{where} = {text!r} is invalid: {weight!r} is not a weight; write pairs "
                                 "'WEIGHT FOLDER', weight first (e.g. '0.7 data/web 0.3 data/code')") from None
        return out


@dataclass
class DataConfig:
    data_dir: str | None = None  # output of `data_prep_tool build` (one source)
    sources: list[DataSource] | None = None  # a weighted mixture instead of data_dir
    tokenizer: str | None = None  # if set, must be the model the shards were built with
    seq_len: int = 512
    shuffle: bool = True
    # Packed windows hold several documents: attend only inside one's own document (Llama 3; Megatron's
    # --reset-attention-mask), found by the tokenizer's EOS ending each document. Off by default, as Megatron.
    document_mask: bool = False
    reset_positions: bool = False  # with document_mask: rotary positions restart at 0 in each document
    # No loss on the target after an EOS (the next document's first token, which nothing before it predicts):
    # Megatron's --eod-mask-loss. Independent of document_mask; needs the shards' EOS id too.
    eod_mask_loss: bool = False


@dataclass
class TrainConfig:
    seed: int = 1234
    micro_batch_size: int = 4  # sequences per rank per forward
    batch_size: int = 32  # global batch in sequences (micro x data-parallel ranks x accumulation)
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 100
    max_steps: int = 1000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    router_lr_multiplier: float = 1.0  # guides recommend 2-5x for the router
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the static-shape parts of each block (the guides' --compile_model)
    recompute: str = "full"  # with activation_checkpointing: "full" block | "attention" only | "experts" (MoE layers)
    # with activation_checkpointing: false = the recompute reuses the forward's all-to-all results instead of
    # exchanging again (fewer collectives; keeps the exchanged rows, ~2 K D per token per MoE layer); true sends
    # the tokens again but still reuses the routing counts (a few integers per expert: no count exchange or its
    # host sync in the recompute)
    recompute_comm: bool = True
    log_interval: int = 10
    log_expert_stats: bool = True
    eval_interval: int = 0  # 0 = never
    eval_batches: int = 4  # global batches (train.batch_size windows each) per evaluation, as Megatron's eval_iters
    save_interval: int = 0  # 0 = only at the end (and on a stop signal)
    # false: no checkpoint when the run reaches max_steps (a benchmark, a throwaway run; a run started again
    # then trains its last steps again); interval saves and stop-signal saves still happen
    save_at_end: bool = True
    keep_last: int = 3
    resume: str | None = None  # "auto" = the latest checkpoint in run_dir/checkpoints, or a checkpoint folder
    verify_checkpoint: str = "fast"  # at resume: fast (sizes + small-file checksums) | full (every checksum) | off
    resume_fallback: bool = True  # resume auto: fall back to the previous complete checkpoint if the newest fails
    init_from: str | None = None  # a Hugging Face Mixtral folder: initial weights, streamed per tensor
    max_consecutive_skips: int = 5  # non-finite losses in a row before the run stops
    inject_nonfinite_steps: list[int] | None = None  # fault injection, for testing the skip logic
    inject_nonfinite_into: str = "loss"  # loss | grad (one parameter's gradient: the final norm's weight)
    collapse_threshold: float = 0.0  # warn when an expert's share of tokens stays below this x (1/E); 0 = off
    collapse_intervals: int = 3  # ... for this many logging intervals in a row
    profile_step: int = 0  # > 0: that step runs under torch.profiler -> run_dir/profile/ (trace + table)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# Names from MoE guides and Hugging Face configs -> (section, field, converter).
ALIASES: dict[str, tuple[str, str]] = {
    "data_sources": ("data", "sources"),
    "data_path": ("data", "sources"),  # Megatron's --data-path "0.7 web 0.3 code"
    "top_k": ("moe", "num_experts_per_token"),
    "experts_per_tok": ("moe", "num_experts_per_token"),
    "num_experts_per_tok": ("moe", "num_experts_per_token"),
    "num_local_experts": ("moe", "num_experts"),
    "load_balance_alpha": ("moe", "aux_loss_weight"),
    "n_group": ("moe", "num_expert_groups"),
    "topk_group": ("moe", "top_groups"),
    "moe_intermediate_size": ("moe", "expert_intermediate_size"),
    "shared_expert": ("moe", "num_shared_experts"),
    "shared_expert_enabled": ("moe", "num_shared_experts"),
    "kv_heads": ("model", "num_kv_heads"),
    "num_key_value_heads": ("model", "num_kv_heads"),
    "num_attention_heads": ("model", "num_heads"),
    "num_hidden_layers": ("model", "num_layers"),
    "max_position_embeddings": ("model", "max_seq_len"),
    "tie_word_embeddings": ("model", "tie_embeddings"),
    "expert_parallel_size": ("parallel", "ep_size"),
    "lr": ("train", "learning_rate"),
    "global_batch_size": ("train", "batch_size"),
    "train_micro_batch_size_per_gpu": ("train", "micro_batch_size"),
    "gradient_clipping": ("train", "grad_clip"),
}


def _sections(cfg_cls: type = Config) -> dict[str, type]:
    return {f.name: typing.get_type_hints(cfg_cls)[f.name] for f in dataclasses.fields(cfg_cls)}


def _field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


# Names other stacks use for a setting whose scale differs here: refused with the conversion, never mapped 1:1.
NOT_ALIASES: dict[str, str] = {
    "router_aux_loss_coef": "transformers' Mixtral coefficient c weighs a balance loss K times ep-train's (K = "
                            "moe.num_experts_per_token), so it is moe.aux_loss_weight = K * c here (from-hf converts "
                            "it); pass --aux_loss_weight with that value",
}


def _resolve_key(key: str, cfg_cls: type = Config) -> tuple[str, str]:
    """Map 'section.field', 'field' or an alias onto (section, field); raise on unknown keys."""
    if not isinstance(key, str):  # YAML reads `2: 3` or `true: x` as a number or boolean key
        raise ValueError(f"config key {key!r} is a {type(key).__name__}, not a name; keys are section and field "
                         "names (e.g. train: {learning_rate: 0.001})")
    sections = _sections(cfg_cls)
    if "." in key:
        section, name = key.split(".", 1)
        if section not in sections:
            raise ValueError(f"unknown config section '{section}' in '{key}'; known sections: {sorted(sections)}")
        if name in ALIASES and ALIASES[name][0] == section:
            return ALIASES[name]
        if name not in _field_types(sections[section]):
            raise ValueError(f"unknown config key '{key}'; {section} accepts: {sorted(_field_types(sections[section]))}")
        return section, name
    if key in ALIASES:
        return ALIASES[key]
    if key in NOT_ALIASES:
        raise ValueError(f"config key '{key}' is not ep-train's: {NOT_ALIASES[key]}")
    owners = [s for s, cls in sections.items() if key in _field_types(cls)]
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        raise ValueError(f"config key '{key}' is ambiguous ({owners}); write it as section.key, e.g. {owners[0]}.{key}")
    raise ValueError(f"unknown config key '{key}'; check the spelling (the keys are the fields of the dataclasses in ep_train/config.py)")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check/convert one value against a dataclass field annotation."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        candidates = [arg for arg in args if arg is not type(None)]
        if len(candidates) == 1:  # `X | None`: the error of X names what is wrong
            return _coerce(value, candidates[0], where)
        for arg in candidates:
            try:
                return _coerce(value, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where} = {value!r} is invalid: expected {typ}")
    if origin is list:
        (inner,) = typing.get_args(typ)
        if isinstance(value, str) and dataclasses.is_dataclass(inner):
            value = inner.parse_flat(value, where)
        elif isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
            try:
                value = [yaml.load(v, Loader=_StrictSafeLoader) for v in value]  # noqa: S506 - safe subclass
            except yaml.YAMLError as e:
                raise ValueError(f"{where} = {value!r} is invalid: {getattr(e, 'problem', None) or e}") from None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # "--moe_layers 3" means [3]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} = {value!r} is invalid: expected a list (write e.g. [1, 3] or 1,3)")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(typ):
        return _coerce_record(value, typ, where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        # a string: a command-line value (parse_overrides) or a quoted one in a file; on/off as YAML 1.1 reads them
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{where} = {value!r} is invalid: expected true/false")
    if typ is int:
        if isinstance(value, bool):
            raise ValueError(f"{where} = {value!r} is invalid: expected an integer")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"{where} = {value!r} is invalid: expected an integer")
    if typ is float:
        if isinstance(value, bool):
            raise ValueError(f"{where} = {value!r} is invalid: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} = {value!r} is invalid: expected a number") from None
    if typ is str:
        if where in BOOLEAN_WORDS and isinstance(value, bool) and value in BOOLEAN_WORDS[where]:
            return BOOLEAN_WORDS[where][value]  # YAML 1.1 read the documented word (off) as a boolean
        if not isinstance(value, str):
            hint = (" (YAML reads yes/no/on/off/true/false as booleans: quote the word)"
                    if isinstance(value, bool) else "")
            raise ValueError(f"{where} = {value!r} is invalid: expected a string{hint}")
        return value
    raise AssertionError(f"unsupported annotation {typ} for {where}")


def _coerce_record(value: Any, typ: type, where: str) -> Any:
    """A mapping (``{path: web, weight: 0.7}``) or an instance -> the dataclass ``typ``, each field checked."""
    hints = typing.get_type_hints(typ)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if not isinstance(value, dict):
        raise ValueError(f"{where} = {value!r} is invalid: expected a mapping with keys {sorted(hints)}")
    unknown = sorted(set(value) - set(hints))
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; it accepts {sorted(hints)}")
    required = [f.name for f in dataclasses.fields(typ)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in value]
    if missing:
        raise ValueError(f"{where} lacks {missing}; write e.g. {{path: data/web, weight: 0.7}}")
    return typ(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in value.items()})


def _set(cfg: Any, key: str, value: Any, cfg_cls: type) -> None:
    section, name = _resolve_key(key, cfg_cls)
    if key.split(".")[-1] in ("shared_expert", "shared_expert_enabled") and isinstance(value, bool):
        value = int(value)  # the guides' boolean switch means one shared expert
    typ = _field_types(type(getattr(cfg, section)))[name]
    setattr(getattr(cfg, section), name, _coerce(value, typ, f"{section}.{name}"))


def _flatten(data: dict[str, Any], cfg_cls: type) -> list[tuple[str, Any]]:
    """Nested {section: {key: v}} or flat {key: v} -> [(key, v)] in file order."""
    sections = _sections(cfg_cls)
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        if key in sections and isinstance(value, dict):
            items += [(f"{key}.{k}", v) for k, v in value.items()]
        elif key in sections:
            raise ValueError(f"config section '{key}' must be a mapping, got {value!r}")
        else:
            items.append((key, value))
    return items


class _StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain mappings, lists, strings and numbers only: a ``!!python/...`` tag is
    refused, so a config file cannot run code) that also refuses a key given twice in one mapping.
    PyYAML keeps the last of two equal keys silently, so a forgotten earlier line would win or lose
    without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges are meant to be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: SafeConstructor reports it below, with its line
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first on line {first.start_mark.line + 1}); "
                    "delete one of the two lines (YAML would silently keep the last)", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        _refuse_yaml11_number(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        _refuse_yaml11_number(node)
        return super().construct_yaml_float(node)


# YAML 1.1 (PyYAML) reads a leading zero as octal (0100 -> 64) and colons as base 60 (2:00 -> 120): numbers no
# one means in a run config; refused by name instead of read so (YAML 1.2 and JSON have neither)
_YAML11_NUMBER = re.compile(r"[-+]?0[0-7_]+|[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?")


def _refuse_yaml11_number(node: yaml.ScalarNode) -> None:
    if _YAML11_NUMBER.fullmatch(node.value):
        fix = ("the decimal number without colons" if ":" in node.value else
               f"{node.value[0] if node.value[0] in '+-' else ''}{node.value.lstrip('+-').lstrip('0_') or '0'} "
               "without the leading zero")
        raise yaml.constructor.ConstructorError(
            None, None, f"{node.value!r} is read by YAML 1.1 as a base-8 or base-60 number, not as written; write "
            f"{fix}, or quote it if it is text", node.start_mark)


_StrictSafeLoader.add_constructor("tag:yaml.org,2002:int", _StrictSafeLoader.construct_yaml_int)
_StrictSafeLoader.add_constructor("tag:yaml.org,2002:float", _StrictSafeLoader.construct_yaml_float)


class _DuplicateJSONKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing duplicate keys (``json.loads`` keeps the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateJSONKey(key)
        out[key] = value
    return out


def _read_config_file(path: Path) -> Any:
    """Parse a YAML or JSON config; every problem becomes a ``ValueError`` naming ``file:line``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {str(path)!r} is not UTF-8 text (byte {e.start}); "
                         "pass a YAML or JSON run config") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text, object_pairs_hook=_json_pairs)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}; fix the syntax "
                             "there (JSON wants double quotes and no trailing commas)") from None
        except _DuplicateJSONKey as e:
            # The hook sees no positions: point at the lines where the key text occurs.
            lines = [text.count("\n", 0, m.start()) + 1
                     for m in re.finditer(re.escape(json.dumps(e.key)) + r"\s*:", text)]
            where = f"{path}:{lines[1]}" if len(lines) > 1 else str(path)
            first = f" (first on line {lines[0]})" if len(lines) > 1 else ""
            raise ValueError(f"config file {where}: key {e.key!r} appears twice in one object{first}; delete one "
                             "of the two (JSON readers would silently keep the last)") from None
    try:
        return yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = e.problem or ""
        if "could not determine a constructor for the tag" in problem:
            tag = problem.split("tag", 1)[1].strip()
            raise ValueError(f"config file {where}: the tag {tag} is refused: configs are read with a safe loader "
                             "that builds only mappings, lists, strings and numbers (a python/... tag could run "
                             "code); write the plain value instead") from None
        if "appears twice" in problem or "YAML 1.1" in problem:
            raise ValueError(f"config file {where}: {problem}") from None
        context = ""
        if e.context:  # e.g. "while parsing a flow sequence": say where that began (an unclosed '[' or quote)
            began = f" that began on line {e.context_mark.line + 1}" if e.context_mark is not None else ""
            context = f" ({e.context}{began})"
        raise ValueError(f"config file {where}: invalid YAML: {problem}{context}; fix the syntax there "
                         "(indentation, a missing ':' or an unclosed quote or bracket)") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path}: invalid YAML: {e}; fix the syntax") from None


# String settings whose documented values YAML 1.1 reads as booleans when unquoted (`verify_checkpoint: off`).
BOOLEAN_WORDS: dict[str, dict[bool, str]] = {"train.verify_checkpoint": {False: "off"}}


# What sets an optional field (``str | None``, ``int | None``, ...) to null on the command line: ``--tokenizer
# null`` (also none, ~ or an empty value, in any case). A folder really named so is written ./null.
NULL_WORDS = ("", "null", "none", "~")


def _override_value(raw: str, typ: Any, where: str) -> Any:
    """One command-line value for a field of type ``typ``. Text fields (paths, names, the flat
    ``data.sources`` form) take the text as it is: read as YAML, ``/data/set #2`` lost its ``#2`` (a
    comment), ``0.7 web #1 0.3 code`` a source, and ``null``, ``yes``, ``2024`` or ``a: b`` changed type.
    Booleans take the text to :func:`_coerce` (YAML made ``1`` an int, which a boolean refuses). Numbers
    and lists are read as YAML scalars (``1e-4``, ``.inf``, ``[1, 3]``)."""
    args = typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) else (typ,)
    optional = type(None) in args
    base = [a for a in args if a is not type(None)]
    if optional and raw.strip().lower() in NULL_WORDS:
        return None
    kind = base[0] if len(base) == 1 else None
    flat = typing.get_origin(kind) is list and dataclasses.is_dataclass(typing.get_args(kind)[0])
    if (kind in (str, bool) or flat) and len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        # YAML-quoted, as the old parser needed for such text (and its errors advised): one level unquoted
        try:
            unquoted = yaml.safe_load(raw)
        except yaml.YAMLError:
            unquoted = None
        if isinstance(unquoted, str):
            raw = unquoted
    if kind in (str, bool):
        return raw
    if flat and not raw.lstrip().startswith(("[", "{")):
        return raw  # the flat 'WEIGHT FOLDER ...' form; a YAML list of mappings starts with '[' or '{'
    try:
        return yaml.load(raw, Loader=_StrictSafeLoader) if raw != "" else None  # noqa: S506 - safe subclass
    except yaml.constructor.ConstructorError as e:
        raise ValueError(f"{where} {raw!r} is invalid: {e.problem}") from None
    except yaml.YAMLError as e:
        why = " ".join(str(e).split())[:160]
        raise ValueError(f"{where} {raw!r} is not a valid YAML value ({why}); fix it: a number, true/false, or "
                         "a list such as [1, 3] or 1,3") from None


def parse_overrides(argv: list[str], cfg_cls: type = Config, *, refuse_repeated: bool = False
                    ) -> list[tuple[str, Any]]:
    """['--moe.top_k', '2', '--seed=3'] -> [('moe.top_k', 2), ('seed', 3)]: each value read for its field's
    type (:func:`_override_value`). ``refuse_repeated``: a field given twice, under one name or two (``--lr``
    and ``--train.learning_rate``), is refused as in a config file, where the last would win without a word
    (under SLURM a user's ``--resume`` replaced the script's ``--resume auto`` on every requeue). The ``ep-train``
    commands and so the launch scripts (which run ``ep-train check`` first) refuse; False keeps the last, for
    ``python -m ep_train.train`` as started by hand, whose tests (tests/distributed) give defaults first and
    then the values a test changes."""
    out: list[tuple[str, Any]] = []
    given: dict[tuple[str, str], tuple[str, str]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; overrides look like --section.key value")
        if "=" in arg:
            flag, raw = arg.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ValueError(f"override {arg} has no value; write {arg} VALUE")
            flag, raw = arg, argv[i + 1]
            i += 2
        key = flag[2:].replace("-", "_")
        target = _resolve_key(key, cfg_cls)
        if target in given and refuse_repeated:
            first, first_raw = given[target]
            raise ValueError(f"override {flag} {raw!r} sets {target[0]}.{target[1]} again (already {first} "
                             f"{first_raw!r}); give the field once (the last would win silently)")
        given[target] = (flag, raw)
        typ = _field_types(_sections(cfg_cls)[target[0]])[target[1]]
        out.append((key, _override_value(raw, typ, f"override {flag}")))
    return out


def load_config(path: str | Path | None = None, overrides: list[tuple[str, Any]] | None = None,
                cfg_cls: type = Config, *, check_paths: bool = True) -> Any:
    """Defaults <- file <- overrides, then :func:`validate`; ``check_paths=False`` for a config meant for
    another machine (``ep-train plan`` on a laptop for a cluster run, the conversion tools' base configs)."""
    cfg = cfg_cls()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"config file {str(path)!r} is a folder; pass the YAML/JSON file itself to --config")
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist; pass an existing --config path")
        data = _read_config_file(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top, got {type(data).__name__}; "
                             "write sections such as 'train:' with 'key: value' lines under them")
        _set_all(cfg, _flatten(data, cfg_cls), cfg_cls, f"config file {path}")
    for key, value in overrides or []:
        _set(cfg, key, value, cfg_cls)
    validate(cfg, check_paths=check_paths)
    return cfg


def _set_all(cfg: Any, items: list[tuple[str, Any]], cfg_cls: type, source: str) -> None:
    """Set file values, refusing one field given twice under two spellings (``lr`` and
    ``train.learning_rate``): the later one would win silently, like a duplicate key."""
    given: dict[tuple[str, str], str] = {}
    for key, value in items:
        target = _resolve_key(key, cfg_cls)
        if target in given:
            raise ValueError(f"{source} sets {target[0]}.{target[1]} twice (as '{given[target]}' and '{key}'); "
                             "keep one of them")
        given[target] = key
        _set(cfg, key, value, cfg_cls)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as it is saved (checkpoints, RUN/config.json, RUN/config.yaml). ``moe.normalize_top_k``'s
    auto (null) is written as what it resolves to: the record says what ran, and a resume, which compares
    the saved config field by field, finds true where checkpoints from before auto existed hold the old
    default true."""
    out = dataclasses.asdict(cfg)
    moe = getattr(cfg, "moe", None)
    if isinstance(moe, MoEConfig):
        out["moe"]["normalize_top_k"] = normalizes_top_k(moe)
    return out


def config_from_dict(data: dict[str, Any], cfg_cls: type = Config) -> Any:
    cfg = cfg_cls()
    for key, value in _flatten(data, cfg_cls):
        _set(cfg, key, value, cfg_cls)
    # A stored config (e.g. a checkpoint's) names paths of the machine that wrote it: check values only. It
    # describes a model that exists: what older versions accepted still loads (``validate``'s ``stored``).
    validate(cfg, check_paths=False, stored=True)
    return cfg


def normalizes_top_k(moe: MoEConfig) -> bool:
    """``moe.normalize_top_k`` resolved: null (auto) renormalises for K >= 2 (Mixtral) and not for K = 1
    (Switch Transformer: the weight is the router probability, so the router gets a gradient)."""
    return moe.normalize_top_k if moe.normalize_top_k is not None else moe.num_experts_per_token >= 2


def data_sources(d: DataConfig) -> list[DataSource]:
    """The run's training sources: ``data.sources``, or ``data.data_dir`` as one source of weight 1."""
    if d.sources:
        return list(d.sources)
    return [DataSource(d.data_dir, 1.0)] if d.data_dir is not None else []


def moe_layer_indices(model: ModelConfig, moe: MoEConfig) -> list[int]:
    """Which decoder layers get an MoE FFN."""
    if moe.num_experts <= 1:
        return []
    if moe.moe_layers is not None:
        return sorted(set(moe.moe_layers))
    end = model.num_layers if moe.moe_layer_end is None else moe.moe_layer_end
    return list(range(moe.moe_layer_start, end, moe.moe_layer_frequency))


def _check(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ValueError(f"{name} = {value!r} is invalid: {fix}")


def check_new_run(e: MoEConfig) -> None:
    """Settings refused for a model that starts training now because it would not learn what they say (the
    fields expert choice ignores; K = 1 with renormalised weights, whose router gets no gradient from the LM
    loss). Not for a stored model, nor for a resume, which continues the checkpoint's model as it was trained
    (its saved config must match the run's): the trainer runs this when a resume finds no checkpoint."""
    if e.router_type == "expert_choice":
        _check_expert_choice_ignored(e)
    elif e.num_experts > 1:
        _check(not (e.normalize_top_k and e.num_experts_per_token == 1), "moe.normalize_top_k", e.normalize_top_k,
               "with moe.num_experts_per_token = 1 the renormalised weight is p / p = 1 for every token, so the "
               "router would learn nothing from the language-model loss; leave it unset (null: the expert output "
               "is weighed by the router probability, as in Switch Transformer) or set it false")
    if e.num_experts > 1:  # set, yet without effect: refused rather than trained believing they act
        rule = {"moe_layer_frequency": (e.moe_layer_frequency, 1), "moe_layer_start": (e.moe_layer_start, 0),
                "moe_layer_end": (e.moe_layer_end, None)}
        for name, (value, default) in rule.items():
            _check(e.moe_layers is None or value == default, f"moe.{name}", value,
                   f"has no effect with the explicit moe.moe_layers = {e.moe_layers} (the list wins); remove it "
                   "(or set moe.moe_layers null to place MoE layers by the rule)")
        _check(e.shared_expert_intermediate_size is None or e.num_shared_experts > 0,
               "moe.shared_expert_intermediate_size", e.shared_expert_intermediate_size,
               "has no effect with moe.num_shared_experts = 0; set num_shared_experts, or remove it")
        _check(e.drop_policy == "drop" or e.capacity_factor is not None, "moe.drop_policy", e.drop_policy,
               "has no effect without moe.capacity_factor (dropless routing drops nothing to move); set a capacity "
               "factor, or remove it")


def _check_expert_choice_ignored(e: MoEConfig) -> None:
    """Fields expert choice has no use for, refused at any value but the one users keep (the default, or
    0 for a loss weight), so that no run trains believing they act. normalize_top_k true passes: it was
    the default until null (auto) came, and every saved expert-choice config holds it."""
    ignored = "has no effect with moe.router_type = 'expert_choice'"
    default = MoEConfig.num_experts_per_token
    _check(e.num_experts_per_token == default, "moe.num_experts_per_token", e.num_experts_per_token,
           f"{ignored}: each expert takes its ceil(tokens x moe.capacity_factor / moe.num_experts) best tokens, so a "
           f"token gets moe.capacity_factor experts on average; remove it (default {default}) and set "
           "moe.capacity_factor")
    _check(e.normalize_top_k is not False, "moe.normalize_top_k", e.normalize_top_k,
           f"{ignored}: its combine weights are the raw router probabilities anyway; remove it (null)")
    _check(e.drop_policy == MoEConfig.drop_policy, "moe.drop_policy", e.drop_policy,
           f"{ignored}: each expert takes exactly its capacity, nothing overflows; remove it "
           f"(default {MoEConfig.drop_policy!r})")
    balanced = "it has no Switch loss (balanced by construction)"
    _check(e.balance_stats == MoEConfig.balance_stats, "moe.balance_stats", e.balance_stats,
           f"{ignored}: it sets the counts of the Switch loss, and {balanced}; remove it "
           f"(default {MoEConfig.balance_stats!r})")
    _check(e.aux_loss_weight in (MoEConfig.aux_loss_weight, 0), "moe.aux_loss_weight", e.aux_loss_weight,
           f"{ignored}: {balanced} (no Switch loss to weigh); remove it (default {MoEConfig.aux_loss_weight}) "
           "or set 0")


def check_ep_layout(ep_size: int, num_experts: int | None = None, world_size: int | None = None) -> None:
    """The one check of the expert-parallel layout (validate, the planner, the groups and parallelize use it)."""
    _check(ep_size >= 1, "parallel.ep_size", ep_size, "must be >= 1")
    if ep_size > 1 and num_experts is not None:
        _check(num_experts > 1, "parallel.ep_size", ep_size, "expert parallelism needs moe.num_experts > 1")
        _check(num_experts % ep_size == 0, "parallel.ep_size", ep_size,
               f"must divide moe.num_experts ({num_experts}); pick a divisor of {num_experts}")
    if world_size is not None:
        _check(world_size >= 1, "world size", world_size,
               "must be >= 1; launch at least one process (nodes x processes per node)")
        _check(world_size % ep_size == 0, "parallel.ep_size", ep_size,
               f"must divide the world size ({world_size}); launch a multiple of {ep_size} processes")


# The named DeepSpeed configs (``parallel.ds_config: zero3_offload``); ep_train/parallel/zero.py
# resolves names the same way when it builds the engine's config.
DS_CONFIG_DIR = Path(__file__).resolve().parent / "ds_configs"  # package data (works after `pip install .`)


def resolve_ds_config(name_or_path: str) -> Path:
    """``parallel.ds_config``: a JSON file, or the name of one in ``ds_configs/`` (zero3_offload, ...)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    named = DS_CONFIG_DIR / f"{name_or_path}.json"
    known = sorted(f.stem for f in DS_CONFIG_DIR.glob("*.json"))
    _check(named.is_file(), "parallel.ds_config", name_or_path,
           f"is neither a file nor one of {known}; pass a DeepSpeed JSON path or one of those names")
    return named


EP_TRAIN_SWITCHES = {
    "dedup_offload_buffers": "share DeepSpeed's duplicate fp32 master and gradient buffers (ep_train/parallel/ds_memory.py)",
    "fast_grad_path": "ZeRO-3 gradient norm and one-rank reduce without full-size copies (ep_train/parallel/ds_grad_path.py)",
}


def ep_train_switch(ds: dict[str, Any], name: str) -> bool:
    """A switch of the DeepSpeed JSON's "ep_train" block (checked at load by ``check_ep_train_block``); every
    switch is on unless the JSON says false."""
    assert name in EP_TRAIN_SWITCHES, name
    return bool(ds.get("ep_train", {}).get(name, True))


def check_ep_train_block(ds: dict[str, Any], name: str) -> None:
    """The JSON's "ep_train" block (DeepSpeed ignores it): known switches, true or false. A misspelt switch
    would otherwise be ignored silently and leave the default in force."""
    block = ds.get("ep_train", {})
    if not isinstance(block, dict):
        raise ValueError(f'{name}: "ep_train" = {block!r}; it must be an object of switches, e.g. '
                         '{"dedup_offload_buffers": false}')
    for key, value in block.items():
        if key not in EP_TRAIN_SWITCHES:
            known = "; ".join(f"{k}: {v}" for k, v in EP_TRAIN_SWITCHES.items())
            raise ValueError(f'{name}: "ep_train" has no switch {key!r}; the switches are {known}')
        if not isinstance(value, bool):
            raise ValueError(f'{name}: "ep_train".{key} = {value!r}; use true or false')


def read_json_object(path: Path, label: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; a file that does not parse, or holds another JSON value, is refused with
    ``label`` (the file, and the field that names it if any) and ``fix``."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{label} is not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{label} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def read_ds_json(path: Path) -> dict[str, Any]:
    """The DeepSpeed JSON at ``path`` (``resolve_ds_config``'s result)."""
    return read_json_object(path, f"parallel.ds_config {str(path)!r}",
                            'pass a DeepSpeed JSON object such as {"zero_optimization": {"stage": 3}} (e.g. a copy '
                            "of ep_train/ds_configs/zero3_offload.json) or one of the shipped names")


def _example(section: str, name: str, default: Any) -> str:
    return f"set {section}.{name} to a finite number" + (f" (default {default!r})" if default is not None else "")


def _check_finite(cfg: Any) -> None:
    """NaN/inf anywhere numeric (``learning_rate: .inf``, ``--lr nan``) passes every ``>`` check in one
    direction or the other, so refuse it first, for every float field of every section."""
    for sec in dataclasses.fields(cfg):
        obj = getattr(cfg, sec.name)
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            values = v if isinstance(v, list) else [v]
            values = [x.weight if isinstance(x, DataSource) else x for x in values]
            if any(isinstance(x, float) and not math.isfinite(x) for x in values):
                default = None if f.default is dataclasses.MISSING else f.default
                _check(False, f"{sec.name}.{f.name}", v, f"must be a finite number; {_example(sec.name, f.name, default)}")


def _check_paths(cfg: Any) -> None:
    """Files the run will open, checked before any process (or process group) starts."""
    p, d, t = getattr(cfg, "parallel", None), getattr(cfg, "data", None), getattr(cfg, "train", None)
    if p is not None:  # the DeepSpeed JSON parses, and its "ep_train" block is valid (the rest: build_ds_config)
        path = resolve_ds_config(p.ds_config)
        check_ep_train_block(read_ds_json(path), path.name)
    if d is not None and d.tokenizer is not None:
        tok = Path(d.tokenizer)
        _check(not tok.is_dir(), "data.tokenizer", d.tokenizer,
               "is a folder; pass the sentencepiece .model file (data_prep_tool train-tokenizer writes PREFIX.model)")
        _check(tok.is_file(), "data.tokenizer", d.tokenizer,
               "no such file; pass the sentencepiece .model the shards were built with, or leave data.tokenizer unset")
    if d is not None and d.data_dir is not None:
        data = Path(d.data_dir)
        _check(data.is_dir(), "data.data_dir", d.data_dir,
               "no such folder; pass the output folder of data_prep_tool build")
        _check((data / "manifest.json").is_file(), "data.data_dir", d.data_dir,
               "has no manifest.json; pass the output folder of data_prep_tool build (after merge, for "
               "--num-tasks builds) and check that the build finished")
    if d is not None and d.sources:
        from ep_train.data.mixture import check_same_tokenizer

        for i, src in enumerate(d.sources):
            data = Path(src.path)
            _check(data.is_dir(), f"data.sources[{i}].path", src.path,
                   "no such folder; each source is the output folder of data_prep_tool build (or adopt)")
            _check((data / "manifest.json").is_file(), f"data.sources[{i}].path", src.path,
                   "has no manifest.json; pass the output of data_prep_tool build, or run data_prep_tool adopt "
                   "on shards made by another tool")
        check_same_tokenizer(d.sources)
    if t is not None and t.resume not in (None, "auto"):
        _check(Path(t.resume).is_dir(), "train.resume", t.resume,
               "no such checkpoint folder; pass a run's checkpoints/step_* folder, or auto for the latest one")
    if t is not None and t.init_from and t.resume is None:  # a resume reads its weights from the checkpoint
        _check((Path(t.init_from) / "config.json").is_file(), "train.init_from", t.init_from,
               "has no config.json; pass a Hugging Face Mixtral folder (save_pretrained, or ep-train convert "
               "from-hf / upcycle, which write RUN/init)")


def require_data(cfg: Any) -> None:
    """A training run needs data: one folder or a mixture (``ep-train check`` and the trainer)."""
    if not data_sources(cfg.data):
        raise ValueError("data.data_dir is not set; pass --data_dir DIR (the output of data_prep_tool build), or "
                         "a weighted mixture as --data_sources '0.7 DIR_A 0.3 DIR_B'")


def validate(cfg: Any, world_size: int | None = None, *, check_paths: bool = True, stored: bool = False) -> None:
    """All checks, in one place, run before any process group exists. ``world_size`` adds the checks
    that need it; ``check_paths=False`` skips the file-system checks (for a config stored elsewhere).
    ``stored``: the config of a model that exists (a checkpoint's saved config, a Hugging Face config.json);
    the settings refused only because training with them would not do what they say, which older versions
    accepted (normalize_top_k true with K = 1, the fields expert choice ignores), are then kept, so the
    model still loads and computes what it was trained to. A run (new or resumed) validates without it."""
    _check_finite(cfg)
    if world_size is not None:
        _check(world_size >= 1, "world size", world_size,
               "must be >= 1; launch at least one process (nodes x processes per node)")
    m, e, p = cfg.model, cfg.moe, cfg.parallel
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "max_seq_len"):
        _check(getattr(m, name) > 0, f"model.{name}", getattr(m, name), "must be a positive integer")
    _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", m.num_kv_heads,
           f"must divide model.num_heads ({m.num_heads}); pick a divisor such as 1 or {m.num_heads}")
    head_dim = m.head_dim if m.head_dim is not None else m.hidden_size // m.num_heads
    if m.head_dim is None:
        _check(m.hidden_size % m.num_heads == 0, "model.hidden_size", m.hidden_size,
               f"must be divisible by model.num_heads ({m.num_heads}), or set model.head_dim")
    _check(head_dim > 0 and head_dim % 2 == 0, "model.head_dim", head_dim,
           "must be a positive even number (rotary embeddings rotate pairs)")
    _check(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be positive (Mixtral uses 1e6)")
    _check(m.rms_norm_eps > 0, "model.rms_norm_eps", m.rms_norm_eps, "must be positive, e.g. 1e-5")
    _check(m.init_std > 0, "model.init_std", m.init_std, "must be positive, e.g. 0.02")

    _check(e.num_experts >= 0, "moe.num_experts", e.num_experts, "must be >= 0 (0 or 1 = dense model)")
    if e.num_experts > 1:
        _check(1 <= e.num_experts_per_token <= e.num_experts, "moe.num_experts_per_token", e.num_experts_per_token,
               f"must be between 1 and moe.num_experts ({e.num_experts})")
    for name in ("expert_intermediate_size", "shared_expert_intermediate_size"):
        v = getattr(e, name)
        _check(v is None or v > 0, f"moe.{name}", v, "must be a positive integer or null")
    _check(e.num_shared_experts >= 0, "moe.num_shared_experts", e.num_shared_experts, "must be >= 0")
    _check(e.moe_layer_frequency >= 1, "moe.moe_layer_frequency", e.moe_layer_frequency, "must be >= 1")
    _check(0 <= e.moe_layer_start < m.num_layers, "moe.moe_layer_start", e.moe_layer_start,
           f"must be in [0, model.num_layers={m.num_layers})")
    if e.moe_layer_end is not None:
        _check(e.moe_layer_start < e.moe_layer_end <= m.num_layers, "moe.moe_layer_end", e.moe_layer_end,
               f"must be in (moe.moe_layer_start={e.moe_layer_start}, model.num_layers={m.num_layers}]")
    if e.moe_layers is not None:
        bad = [i for i in e.moe_layers if not 0 <= i < m.num_layers]
        _check(not bad, "moe.moe_layers", e.moe_layers,
               f"layer indices {bad} are out of range; use indices in [0, {m.num_layers - 1}]")
        _check(bool(e.moe_layers) or e.num_experts == 0, "moe.moe_layers", e.moe_layers,
               f"lists no layer while moe.num_experts = {e.num_experts}: the model would be dense; list the MoE "
               "layers, or set moe.num_experts 0 for a dense model")
    _check(e.router_type in ("topk", "noisy_topk", "expert_choice"), "moe.router_type", e.router_type,
           "use 'topk', 'noisy_topk' or 'expert_choice'")
    if e.router_type == "expert_choice":
        _check(e.capacity_factor is not None, "moe.capacity_factor", e.capacity_factor,
               "expert_choice needs a capacity factor (each expert takes ceil(tokens * capacity_factor / "
               "num_experts) tokens; 2.0 gives two experts per token on average)")
        _check(e.top_groups is None and e.expert_dropout == 0 and e.expert_bias_update_rate == 0, "moe.router_type",
               e.router_type, "expert_choice does not combine with moe.top_groups, moe.expert_dropout or "
               "moe.expert_bias_update_rate (it is balanced by construction); unset them")
    resuming = getattr(getattr(cfg, "train", None), "resume", None) is not None
    if not stored and not resuming:  # a resume checks them when it finds no checkpoint (check_new_run)
        check_new_run(e)
    _check(e.router_jitter_noise >= 0 and e.router_jitter_noise < 1, "moe.router_jitter_noise",
           e.router_jitter_noise, "must be in [0, 1), e.g. 0.01")
    _check(e.router_init_std > 0, "moe.router_init_std", e.router_init_std, "must be positive (0.01 is typical)")
    _check(e.aux_loss_weight >= 0, "moe.aux_loss_weight", e.aux_loss_weight, "must be >= 0 (0.01 is typical)")
    _check(e.router_z_loss_weight >= 0, "moe.router_z_loss_weight", e.router_z_loss_weight,
           "must be >= 0 (0.001 is typical)")
    if e.capacity_factor is not None:
        _check(e.capacity_factor > 0 and math.isfinite(e.capacity_factor), "moe.capacity_factor", e.capacity_factor,
               "must be a positive number (1.0-1.25 is typical) or null for dropless")
    _check(e.drop_policy in ("drop", "overflow"), "moe.drop_policy", e.drop_policy, "use 'drop' or 'overflow'")
    tr = getattr(cfg, "train", None)
    if tr is not None:
        _check(tr.recompute in ("full", "attention", "experts"), "train.recompute", tr.recompute,
               "use 'full' (whole blocks), 'attention' or 'experts' (the MoE layers)")
    _check(e.cv_loss_weight >= 0, "moe.cv_loss_weight", e.cv_loss_weight, "must be >= 0 (0.01 is typical; 0 = off)")
    _check(e.router_entropy_loss_weight >= 0, "moe.router_entropy_loss_weight", e.router_entropy_loss_weight,
           "must be >= 0 (0 = off)")
    _check(e.balance_stats in ("micro_batch", "global_batch"), "moe.balance_stats", e.balance_stats,
           "use 'micro_batch' (per rank) or 'global_batch' (counts summed over the data-parallel ranks)")
    _check(0 <= e.expert_bias_update_rate < 1 and math.isfinite(e.expert_bias_update_rate),
           "moe.expert_bias_update_rate", e.expert_bias_update_rate,
           "must be in [0, 1) (DeepSeek-V3 uses 0.001; 0 = off)")
    _check(0 <= e.expert_dropout < 1, "moe.expert_dropout", e.expert_dropout, "must be in [0, 1), e.g. 0.1")
    if e.num_experts > 1:
        _check(e.num_expert_groups >= 1 and e.num_experts % e.num_expert_groups == 0, "moe.num_expert_groups",
               e.num_expert_groups, f"must divide moe.num_experts ({e.num_experts}); 1 = no groups")
        if e.top_groups is not None:
            _check(1 <= e.top_groups <= e.num_expert_groups, "moe.top_groups", e.top_groups,
                   f"must be in [1, moe.num_expert_groups = {e.num_expert_groups}], or null for no limit")
            per_group = e.num_experts // e.num_expert_groups
            _check(e.top_groups * per_group >= e.num_experts_per_token, "moe.top_groups", e.top_groups,
                   f"{e.top_groups} group(s) of {per_group} experts cannot hold moe.num_experts_per_token = "
                   f"{e.num_experts_per_token} experts; raise top_groups")
            _check(e.drop_policy != "overflow" or e.capacity_factor is None or e.top_groups == e.num_expert_groups,
                   "moe.drop_policy", e.drop_policy, f"'overflow' moves an assignment over capacity to the token's "
                   f"next-best expert of all experts, outside its moe.top_groups = {e.top_groups} group(s); use "
                   "'drop' with group-limited routing")

    check_ep_layout(p.ep_size, e.num_experts, world_size)
    _check(p.zero3_gather in ("auto", "block", "module"), "parallel.zero3_gather", p.zero3_gather,
           "use 'auto' (the default), 'block' (one ZeRO-3 fetch per transformer block) or 'module' (DeepSpeed's "
           "per-submodule fetches: lower peak when attention and experts are both large)")
    # NVMe offload: the JSON-dependent check (an nvme device needs parallel.nvme_path) is in build_ds_config.
    _check(p.nvme_path is None or p.nvme_path.strip() != "", "parallel.nvme_path", p.nvme_path,
           "must be a folder on a fast local disk (e.g. /local_nvme/run1) or null")
    _check(not p.nvme_offload_optimizer or p.nvme_path is not None, "parallel.nvme_offload_optimizer",
           p.nvme_offload_optimizer, "needs parallel.nvme_path (the folder the optimizer states are swapped to)")
    t, d = getattr(cfg, "train", None), getattr(cfg, "data", None)
    if t is not None:
        _check(t.verify_checkpoint in ("fast", "full", "off"), "train.verify_checkpoint", t.verify_checkpoint,
               "use fast (sizes and small-file checksums), full (every checksum) or off")
        for name in ("micro_batch_size", "batch_size", "max_steps", "log_interval", "keep_last", "eval_batches"):
            default = getattr(TrainConfig, name)
            _check(getattr(t, name) > 0, f"train.{name}", getattr(t, name),
                   f"must be a positive integer; set train.{name} >= 1 (default {default})")
        top = 2 ** 64 - (world_size or 1)  # each rank seeds torch with seed + rank: at most 2**64 - 1
        _check(0 <= t.seed <= top, "train.seed", t.seed, f"must be a non-negative integer, at most {top} (numpy refuses "
               "negative seeds; each rank seeds torch with seed + rank, which must fit 64 bits), e.g. 1234")
        _check(t.learning_rate > 0, "train.learning_rate", t.learning_rate,
               "must be a positive number; set train.learning_rate, e.g. 3e-4")
        _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio,
               "must be in [0, 1] (the cosine ends at learning_rate x min_lr_ratio), e.g. 0.1")
        _check(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0 (0 = no warmup)")
        _check(t.warmup_steps <= t.max_steps, "train.warmup_steps", t.warmup_steps,
               f"must not exceed train.max_steps ({t.max_steps}), or the learning rate never reaches "
               "train.learning_rate; lower train.warmup_steps (a few % of max_steps is typical)")
        for name, typical in (("beta1", 0.9), ("beta2", 0.95)):
            v = getattr(t, name)
            _check(0 <= v < 1, f"train.{name}", v, f"must be in [0, 1) (Adam's moving-average decay), e.g. {typical}")
        _check(t.eps > 0, "train.eps", t.eps, "must be positive (Adam divides by sqrt(v) + eps), e.g. 1e-8")
        _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay,
               "must be >= 0 (0 turns decoupled weight decay off; 0.1 is typical)")
        _check(t.save_interval >= 0, "train.save_interval", t.save_interval,
               "must be >= 0: N > 0 saves every N steps, 0 saves only at the end and on a stop signal")
        _check(t.eval_interval >= 0, "train.eval_interval", t.eval_interval,
               "must be >= 0: N > 0 evaluates every N steps, 0 never")
        _check(t.inject_nonfinite_into in ("loss", "grad"), "train.inject_nonfinite_into", t.inject_nonfinite_into,
               "use loss or grad")
        _check(0 <= t.collapse_threshold < 1, "train.collapse_threshold", t.collapse_threshold,
               "must be in [0, 1): a fraction of the balanced share 1/num_experts (0.1 is typical; 0 = off)")
        _check(t.collapse_intervals >= 1, "train.collapse_intervals", t.collapse_intervals, "must be >= 1")
        bad = [s for s in t.inject_nonfinite_steps or [] if s < 1]
        _check(not bad, "train.inject_nonfinite_steps", t.inject_nonfinite_steps,
               f"steps {bad} do not exist; steps count from 1")
        _check(t.grad_clip >= 0, "train.grad_clip", t.grad_clip,
               "must be >= 0: the maximum gradient norm, e.g. 1.0 (0 turns clipping off)")
        _check(t.router_lr_multiplier > 0, "train.router_lr_multiplier", t.router_lr_multiplier,
               "must be positive (guides recommend 2-5)")
        _check(t.mixed_precision in ("auto", "bf16", "fp32"), "train.mixed_precision", t.mixed_precision,
               "use auto, bf16 or fp32")
        _check(t.batch_size % t.micro_batch_size == 0, "train.batch_size", t.batch_size,
               f"must be a multiple of train.micro_batch_size ({t.micro_batch_size})")
        _check(t.max_consecutive_skips >= 1, "train.max_consecutive_skips", t.max_consecutive_skips, "must be >= 1")
        _check(t.profile_step >= 0, "train.profile_step", t.profile_step, "must be >= 0 (0 = no profiling)")
        # not for a stored config: a checkpoint of a run that never reached its profile_step still loads
        _check(stored or t.profile_step <= t.max_steps, "train.profile_step", t.profile_step,
               f"must not exceed train.max_steps ({t.max_steps}), or no step is profiled; pick a step after the "
               "first few (set-up and allocator warm-up)")
        if world_size is not None:
            _check(t.batch_size % (t.micro_batch_size * world_size) == 0, "train.batch_size", t.batch_size,
                   f"must be a multiple of micro_batch_size x world size ({t.micro_batch_size} x {world_size})")
    if d is not None:
        _check(d.seq_len > 0, "data.seq_len", d.seq_len, "must be a positive integer; set data.seq_len, e.g. 512")
        _check(d.document_mask or not d.reset_positions, "data.reset_positions", d.reset_positions,
               "needs data.document_mask: true (positions restart per document, so attention must stay in it)")
        if d.sources is not None:
            from ep_train.data.mixture import check_weights

            _check(d.data_dir is None, "data.data_dir", d.data_dir,
                   "is set together with data.sources; give one of them (data_dir is the one-source form)")
            _check(len(d.sources) > 0, "data.sources", d.sources,
                   "is empty; list at least one {path, weight}, or use data.data_dir")
            check_weights(d.sources)
        _check(d.seq_len <= m.max_seq_len, "data.seq_len", d.seq_len,
               f"must not exceed model.max_seq_len ({m.max_seq_len})")
    if check_paths:
        _check_paths(cfg)
