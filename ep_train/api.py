"""Python API: load a model from what a user has (a run, a checkpoint, a Hugging Face folder) and sample.

    import ep_train
    m = ep_train.load("runs/tiny")                      # run dir, checkpoints/step_N or HF Mixtral folder
    print(ep_train.generate(m.model, m.tokenizer, "def ", max_new_tokens=20))

Everything loads tensor by tensor (``ValueSource``), on ``device``: in one process, or expert parallel over a
process group (``load(..., ep_group=)``: each rank reads only its own experts).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple, TypeVar

import torch
import torch.distributed as dist

from ep_train.config import Config
from ep_train.data.verify import run_manifest
from ep_train.generation import generate
from ep_train.interop.hf import hf_folder_config
from ep_train.model.init import ValueSource
from ep_train.model.moe import set_expert_biases
from ep_train.model.transformer import Transformer, build_model

if TYPE_CHECKING:
    import sentencepiece as spm

T = TypeVar("T")
RUN_CONFIGS = ("config.yaml", "config.yml", "config.json")  # convert/upcycle write .yaml, the trainer .json


class Loaded(NamedTuple):
    model: Transformer  # eval mode, on the requested device and dtype
    tokenizer: spm.SentencePieceProcessor | None  # None when none was found (pass tokenizer=)
    config: Config  # the run's config (or one made from the Hugging Face config.json)
    weights: Path  # where the weights were read: a checkpoints/step_N folder or a Hugging Face folder
    add_bos: bool = False  # prompts start with BOS, as the training text did (see ``prompt_bos``)
    # load(lazy=True): the model stays on "meta"; its values come from source (init.blockwise), and the
    # aux-loss-free expert biases (layer index -> values) from expert_bias
    source: ValueSource | None = None
    expert_bias: dict[str, list[float]] | None = None


def _run_config(folder: Path) -> Config | None:
    from ep_train.config import _read_config_file, config_from_dict

    for name in RUN_CONFIGS:
        f = folder / name
        if f.is_file() and not (name == "config.json" and hf_folder_config(folder) is not None):
            data = _read_config_file(f)
            if not isinstance(data, dict):
                raise ValueError(f"{str(f)!r} must hold a mapping of config sections; it is not an ep-train run config")
            return config_from_dict(data)
    return None


def _has_checkpoint(p: Path) -> bool:
    from ep_train.train.checkpoint import STATE_FILE

    return (p.name.startswith("step_") or (p / STATE_FILE).is_file() or (p / "latest").exists()
            or any(p.glob("step_*")) or any((p / "checkpoints").glob("step_*")))


def prompt_bos(cfg: Config, weights: Path, tokenizer: spm.SentencePieceProcessor | None) -> bool:
    """Whether a prompt starts with BOS, as the model's training documents did: the run's data manifest says
    (``data_prep_tool build --append-bos``); without one, a Hugging Face folder's tokenizer_config.json
    (``add_bos_token``; Mixtral's and Llama's tokenizers add it, ep-train's exports say what the run did);
    else no (ep-train's default data has EOS after each document, no BOS)."""
    if tokenizer is None or tokenizer.bos_id() < 0:
        return False
    manifest = run_manifest(cfg.data)
    if manifest is not None:
        return bool(manifest.get("append_bos", False))
    try:
        tok_cfg = json.loads((weights / "tokenizer_config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return bool(tok_cfg.get("add_bos_token", True)) if isinstance(tok_cfg, dict) else False


def _tokenizer_candidates(cfg: Config, *folders: Path) -> list[Path]:
    out: list[Path] = []
    if cfg.data.tokenizer:
        out.append(Path(cfg.data.tokenizer))
    manifest = run_manifest(cfg.data)
    try:
        out.append(Path(manifest["tokenizer"]["path"]))  # type: ignore[index]
    except (KeyError, TypeError):
        pass
    out += [f / "tokenizer.model" for f in folders]
    return out


def resolve(path: str | Path) -> tuple[Config, ValueSource, Path, list[Path]]:
    """What ``path`` holds: (config, value source, weights folder, tokenizer files to try in order).

    In order: an ep-train checkpoint (a run dir with checkpoints/step_N, its checkpoints/ folder or a
    step_N folder: converted once to the universal form, then read per parameter); a Hugging Face
    Mixtral folder (config.json with model_type); a run dir without checkpoints whose config names
    ``train.init_from`` (what ``ep-train convert`` writes): its Hugging Face weights.
    """
    from ep_train.interop.hf import HFMixtralSource, init_folder

    p = Path(path)
    if not p.exists():
        raise ValueError(f"checkpoint path {str(p)!r} does not exist; pass a run directory, a checkpoints/step_N "
                         "folder or a Hugging Face Mixtral folder (config.json + model.safetensors)")
    if _has_checkpoint(p):
        from ep_train.interop.universal import UniversalSource, find_checkpoint, run_config, to_universal

        step = find_checkpoint(p)
        cfg = run_config(step)
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's converter talks; stdout is for completions
            universal = to_universal(step)
        return cfg, UniversalSource(universal), step, _tokenizer_candidates(cfg, step, step.parent.parent)
    if hf_folder_config(p) is not None:
        src = HFMixtralSource(p)
        return src.cfg, src, p, _tokenizer_candidates(src.cfg, p)
    cfg = _run_config(p) if p.is_dir() else None
    if cfg is not None and cfg.train.init_from:
        init = init_folder(p, cfg.train.init_from)  # as written, relative to the run, or RUN/init (moved)
        src = HFMixtralSource(init, cfg)  # checks that the run config describes these weights
        return cfg, src, init, _tokenizer_candidates(cfg, p, init)
    what = "a run config without train.init_from" if cfg is not None else "no checkpoint and no config"
    raise ValueError(f"{str(p)!r} holds {what}: nothing to load weights from; pass a run directory with "
                     "checkpoints/step_N, a checkpoints/step_N folder or a Hugging Face Mixtral folder")


def _on_every_rank(group: dist.ProcessGroup, fn: Callable[[], T]) -> T:
    """``fn()`` on every rank of ``group``; if it raised on any rank, every rank raises: the failed rank its own
    exception (traceback and all), the others a ``ValueError`` naming the first failed rank and its error,
    instead of going on into a collective the failed rank never reaches (and waiting there for the process
    group's timeout). Collective: one all_gather of the error texts."""
    failure: BaseException | None = None
    try:
        out = fn()
    except Exception as e:  # whatever it is (a converter's RuntimeError, a damaged file) must reach every rank
        out, failure = None, e
    mine = None if failure is None else (str(failure) or type(failure).__name__) if isinstance(failure, ValueError) \
        else f"{type(failure).__name__}: {failure}"
    errors: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, mine, group=group)  # communication
    if failure is not None:
        raise failure
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        raise ValueError(f"rank {failed[0][0]} of the expert-parallel group: {failed[0][1]}")
    return out  # type: ignore[return-value]


Resolved = tuple[Config, ValueSource, Path, list[Path]]  # what ``resolve`` returns


def _resolve_on_first_rank(path: str | Path, group: dist.ProcessGroup) -> Callable[[], Resolved]:
    """``resolve`` on the group's first rank now (an ep-train checkpoint is converted to the universal form
    once; a failure stops every rank), and what the other ranks call to resolve afterwards: the checkpoint the
    first one chose (a run directory's latest may move on while it converts: training saves another), whose
    conversion they then find, not the run directory again. Collective."""
    first: Resolved | None = None
    if dist.get_rank(group) == 0:
        first = _on_every_rank(group, lambda: resolve(path))
        chosen = [str(first[2]) if isinstance(first[1], _universal_source_type()) else None]
    else:
        _on_every_rank(group, lambda: None)
        chosen = [None]
    dist.broadcast_object_list(chosen, src=dist.get_global_rank(group, 0), group=group)  # communication
    if first is not None:
        return lambda: first
    return lambda: resolve(chosen[0] if chosen[0] is not None else path)


def _universal_source_type() -> type:
    from ep_train.interop.universal import UniversalSource

    return UniversalSource


def _check_generation_layout(cfg: Config, world: int) -> None:
    from ep_train.config import moe_layer_indices

    e = cfg.moe.num_experts if moe_layer_indices(cfg.model, cfg.moe) else 0
    if world > 1 and (e < world or e % world):
        what = f"its {e} experts per MoE layer" if e else "it has no MoE layers (a dense model)"
        raise ValueError(f"expert-parallel generation over {world} processes splits every MoE layer's experts "
                         f"evenly between them, but {what}: launch a number of processes that divides "
                         f"moe.num_experts ({e})" + (" or run one process" if e else "; run one process"))


def _check_tokenizer_digest(path: Path, manifest: dict | None) -> None:
    """A tokenizer found for a run must be the one its data was built with (the manifest's sha256): a file
    retrained or replaced in place would decode every token wrong without an error."""
    from ep_train.data.shards import sha256_file

    want = ((manifest or {}).get("tokenizer") or {}).get("sha256")
    got = sha256_file(path) if want else None
    if got != want:
        raise ValueError(f"tokenizer {str(path)!r} is not the one the run's data was built with (sha256 "
                         f"{got[:12]}..., the data manifest says {want[:12]}...): it was replaced or "
                         "retrained; pass the original with --tokenizer")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as torch reads it; a ValueError naming it when torch cannot parse it or this machine lacks it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device = {str(device)!r} is invalid ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device = {str(device)!r}: this machine has no CUDA device torch can use; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device = {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device = {str(device)!r} is not supported; use cpu, cuda or cuda:N")
    return dev


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         tokenizer: str | Path | None = None, lazy: bool = False,
         ep_group: dist.ProcessGroup | None = None) -> Loaded:
    """Load a model for inference from a run directory, a ``checkpoints/step_N`` folder or a Hugging
    Face Mixtral folder (see :func:`resolve`), in eval mode on ``device`` in ``dtype``. ``lazy``: read no
    weights; the model stays on ``meta`` with ``source`` and ``expert_bias`` to run it block by block
    (``init.blockwise`` makes each block in fp32 on the CPU: ``device`` and ``dtype`` do not apply).

    The tokenizer: ``tokenizer`` if given, else the first that exists of the run's ``data.tokenizer``,
    its data manifest's tokenizer, and ``tokenizer.model`` beside the weights; None if none exists.
    Errors (missing path, no weights, a config that does not match the weights) are ``ValueError``s
    that name the path and what to pass instead.

    ``ep_group`` (collective: every rank of the group calls it): expert parallel over that group. This rank
    reads and holds the dense weights and its 1/n of every MoE layer's experts (global experts
    [r * E/n, (r + 1) * E/n) on group rank r), never the others: a model whose experts fit only across n
    processes loads. Generate with ``generate_tokens(..., group=ep_group)``.
    """
    if ep_group is not None:
        if lazy:
            raise ValueError("lazy=True reads no weights (a model run block by block in one process); it cannot be "
                             "combined with ep_group: pass one or the other")
        resolved = _resolve_on_first_rank(path, ep_group)
        # every rank reads its own experts: a failure on one (a damaged shard) must stop all of them here
        return _on_every_rank(ep_group, lambda: _load(resolved(), device, dtype, tokenizer, False, ep_group))
    return _load(resolve(path), device, dtype, tokenizer, lazy, None)


def _load(resolved: Resolved, device: str | torch.device, dtype: torch.dtype,
          tokenizer: str | Path | None, lazy: bool, ep_group: dist.ProcessGroup | None) -> Loaded:
    from ep_train.data.tokenizer import load_tokenizer

    cfg, source, weights, candidates = resolved
    state_file = weights / "ep_train_state.json"
    # aux-loss-free expert biases live beside DeepSpeed's files (selection only)
    biases = json.loads(state_file.read_text()).get("expert_bias", {}) if state_file.is_file() else {}
    if lazy:
        model = build_model(cfg.model, cfg.moe, device="meta").eval()
    elif ep_group is not None:
        from ep_train.model.init import materialize
        from ep_train.parallel import apply_expert_parallel

        _check_generation_layout(cfg, dist.get_world_size(ep_group))
        model = build_model(cfg.model, cfg.moe, device="meta")  # shapes only
        apply_expert_parallel(model, ep_group)  # this rank's experts, all-to-all dispatch; still no memory
        materialize(model, source, device=check_device(device), dtype=dtype).eval()  # read this rank's share
        set_expert_biases(model, biases)
    else:  # each parameter made in dtype as it is read; buffers (the aux-loss-free expert bias) stay fp32, as
        # under DeepSpeed's mixed precision in training: a bf16 bias would round and could select other experts
        model = build_model(cfg.model, cfg.moe, device=check_device(device), source=source, dtype=dtype).eval()
        set_expert_biases(model, biases)
    tok_path = Path(tokenizer) if tokenizer is not None else next((c for c in candidates if c.is_file()), None)
    if tokenizer is None and tok_path is not None:
        _check_tokenizer_digest(tok_path, run_manifest(cfg.data))
    sp = load_tokenizer(tok_path) if tok_path is not None else None
    if sp is not None and sp.get_piece_size() > cfg.model.vocab_size:
        raise ValueError(f"tokenizer {str(tok_path)!r} has {sp.get_piece_size()} pieces, more than the model's "
                         f"vocabulary (model.vocab_size = {cfg.model.vocab_size}); pass the tokenizer the model "
                         "was trained with (--tokenizer)")
    return Loaded(model, sp, cfg, weights, prompt_bos(cfg, weights, sp), source if lazy else None,
                  biases if lazy else None)


__all__ = ["Loaded", "generate", "load", "resolve"]
