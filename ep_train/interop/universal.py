"""A checkpoint in a shape-free form, read tensor by tensor.

An ep-train checkpoint holds DeepSpeed's ZeRO-3 files: flat fp32 partitions of the optimizer, one
file per rank, laid out for the world and EP size that wrote them. DeepSpeed's *universal checkpoint*
(``deepspeed.checkpoint.ds_to_universal``) rewrites them as one folder per parameter
(``zero/<name>/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt``) holding the full tensor; stacked expert
tensors come out whole (``[E, ...]`` in global expert order, tagged as expert parameters), so they can
be re-sliced for any EP size. Resuming at another shape, exporting to Hugging Face and loading a run
for generation all read this one form.

Memory: DeepSpeed's converter as shipped holds every rank's optimizer file of an AutoEP checkpoint at once,
plus a copy of every expert's states, and writes rank 0's whole shard into ``zero/optimizer_state.pt``,
which every rank of a resume then loads (``_bounded_memory`` says how and what changes). Converted here, it
memory-maps what it reads and holds one parameter's states at a time; ``UniversalSource`` memory-maps one
parameter file per call and copies only the rows asked for. Nothing here holds the whole model.

Safety: DeepSpeed's converter calls ``torch.load(weights_only=False)``; it runs under
``only_safe_loads`` (``weights_only=True`` with ep-train's allowlist), so a crafted file fails with a
``CheckpointError`` instead of running code.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import socket
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ep_train.config import Config, config_from_dict
from ep_train.parallel.ds_nvme import SWAP_MAP, swapped_checkpoint, swapped_ranks
from ep_train.train.checkpoint import (MANIFEST, STATE_FILE, CheckpointError, complete_checkpoints, latest_target,
                                       only_safe_loads, safe_load, safe_load_mapped, verify)

UNIVERSAL = "universal"  # the converted form's folder inside a checkpoint folder


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from what users pass: a run directory (its latest complete checkpoint), its
    ``checkpoints/`` folder, or a ``checkpoints/step_N`` folder. Verified against its manifest (sizes and
    small-file checksums); every failure says what was found and what to pass instead."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist; pass a run directory, its "
                              "checkpoints/ folder or a checkpoints/step_N folder")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if not p.name.startswith("step_") and ((p / "latest").exists() or any(p.glob("step_*"))):
        target = latest_target(p)
        complete = complete_checkpoints(p)
        if target is None or not (target / MANIFEST).is_file():
            if not complete:
                raise CheckpointError(f"{str(p)!r} holds no complete checkpoint (no step_N folder with a "
                                      f"{MANIFEST}); the run has not saved one yet, or every save was interrupted")
            target = complete[-1]
        p = target
    if not (p / STATE_FILE).is_file() and not (p / MANIFEST).is_file():
        raise CheckpointError(f"{str(p)!r} is not an ep-train checkpoint (no {STATE_FILE}); pass a run directory "
                              "or a checkpoints/step_N folder")
    problem = verify(p)
    if problem:
        raise CheckpointError(f"checkpoint {str(p)!r} cannot be used: {problem}")
    return p


def run_config(step_dir: Path) -> Config:
    """The config of the run that wrote a checkpoint (from its ``ep_train_state.json``)."""
    state = json.loads((step_dir / STATE_FILE).read_text())
    return config_from_dict(state["config"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def to_universal(step_dir: Path, out: Path | None = None) -> Path:
    """The universal form of the checkpoint in ``step_dir``, converted once and reused.

    Written to ``out`` (default ``step_dir/universal``) through a temporary folder renamed at the end,
    so a crash mid-conversion never leaves a folder that looks finished. Single process: call it on one
    rank and barrier."""
    dest = out if out is not None else step_dir / UNIVERSAL
    if (dest / "zero").is_dir():
        return dest
    from deepspeed.checkpoint import ds_to_universal

    # This process's own temporary folder: two conversions of one checkpoint at once (an export while a
    # resharded resume converts) must not remove each other's work; the first to finish wins the rename.
    # A folder left by a killed conversion on this host (its process is gone) is removed here.
    host = socket.gethostname()
    for old in dest.parent.glob(f"{dest.name}.tmp.{host}.*"):
        pid = old.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = dest.parent / f"{dest.name}.tmp.{host}.{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        source = step_dir
        if swapped_checkpoint(step_dir):  # its ZeRO shards lack the states swapped to NVMe: a filled copy
            source = tmp / "filled"
            _fill_swapped_states(step_dir, source)
        # one worker: a second would hold a second rank's fragments and parameter at once
        args = argparse.Namespace(input_folder=str(source), output_folder=str(tmp / UNIVERSAL),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                  strict=True, inject_missing_state=False)
        with only_safe_loads(mmap=True), _bounded_memory(ds_to_universal):
            ds_to_universal.main(args)
        try:
            os.replace(tmp / UNIVERSAL, dest)
        except OSError:  # dest exists and is not empty: another conversion finished first
            if not (dest / "zero").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@contextlib.contextmanager
def _bounded_memory(m: ModuleType) -> Iterator[None]:
    """DeepSpeed 0.19.8's ZeRO-3 converter (``m``: ``ds_to_universal``) holding one parameter's states at a time.

    As shipped, ``_consolidate_zero3_autoep_expert_states`` loads every rank's model and optimizer files at
    once, clones every expert fragment of every layer and only then writes: about twice the model's optimizer
    states in RAM (AutoEP experts are most of an MoE). Here it runs once per expert parameter, DeepSpeed's own
    code and checks restricted to that one (the files, memory-mapped by the caller's
    ``only_safe_loads(mmap=True)``, are read through the page cache, which the kernel can reclaim).
    ``_save_optimizer_state_stage3`` copies rank 0's whole optimizer state dict (its fp32 masters and moments:
    1/world of the model's optimizer states) into ``zero/optimizer_state.pt``, which DeepSpeed's universal
    loader reads on every rank for its scalars, parameter groups and step counts only
    (``stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``); here it keeps just those."""
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT, PARAM_GROUPS

    consolidate, info, save_state = (m._consolidate_zero3_autoep_expert_states, m._autoep_expert_param_info,
                                     m._save_optimizer_state_stage3)

    def only(keep: str, metadata: Any) -> dict[str, Any]:
        return {name: entry for name, entry in info(metadata).items() if name == keep}

    def one_at_a_time(output_dir: str, model_files: list[str], optim_files: list[str]) -> None:
        names, _ = m._autoep_expert_param_names_by_rank(model_files)
        for name in sorted(names):
            m._autoep_expert_param_info = functools.partial(only, name)
            try:
                consolidate(output_dir, model_files, optim_files)
            finally:
                m._autoep_expert_param_info = info

    def global_state(args: argparse.Namespace, optim_files: list[str]) -> None:
        out = safe_load_mapped(optim_files[0], map_location="cpu")[OPTIMIZER_STATE_DICT]
        inner = out[OPTIMIZER_STATE_DICT]
        inner["state"] = {i: {k: v for k, v in s.items() if not torch.is_tensor(v) or v.numel() <= 1}
                          for i, s in inner["state"].items()}  # the step counts (int, or a 0-d tensor)
        out[FP32_FLAT_GROUPS] = []
        out[PARAM_GROUPS] = inner[PARAM_GROUPS]
        torch.save(out, Path(args.output_folder) / "zero" / "optimizer_state.pt")

    m._consolidate_zero3_autoep_expert_states, m._save_optimizer_state_stage3 = one_at_a_time, global_state
    try:
        yield
    finally:
        m._consolidate_zero3_autoep_expert_states, m._save_optimizer_state_stage3 = consolidate, save_state


def _fill_swapped_states(step_dir: Path, dest: Path) -> None:
    """``dest``: ``step_dir``'s DeepSpeed files, each rank's ZeRO shard rewritten with the fp32 masters and
    Adam moments its NVMe swap files hold (``ds_nvme.write_swap_map`` says which sub-group is in which file).
    One rank's shard in memory at a time here (the swap files are mapped)."""
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT

    ranks = swapped_ranks(step_dir)
    maps = [json.loads(p.read_text()) for p in sorted(step_dir.glob(SWAP_MAP.format(rank="*")))]
    if len(maps) != ranks:
        raise CheckpointError(f"checkpoint {str(step_dir)!r} holds NVMe swap files of {ranks} ranks and swap "
                              f"maps ({SWAP_MAP.format(rank='R')}) of {len(maps)}: it was written before ep-train "
                              "recorded them, or is incomplete; resume it as it was written (same world size, "
                              "parallel.nvme_offload_optimizer true)")
    dest.mkdir(parents=True)
    shards = {m["shard"]: m for m in maps}
    for f in step_dir.iterdir():
        if f.is_file() and f.name not in shards:
            (dest / f.name).symlink_to(f.resolve())
    for name, info in shards.items():
        sd = safe_load(step_dir / name, map_location="cpu")
        zero = sd[OPTIMIZER_STATE_DICT]
        state = zero[OPTIMIZER_STATE_DICT]["state"]
        swap = step_dir / info["swap_dir"]
        for e in info["subgroups"]:
            dtype = getattr(torch, e["dtype"])
            numel = e["numel"]
            zero[FP32_FLAT_GROUPS][e["subgroup"]] = _swap_file(swap / f"{e['swap_id']}.tensor.swp", numel, dtype)
            for key, value in state[e["index"]].items():
                if torch.is_tensor(value):
                    state[e["index"]][key] = _swap_file(swap / f"{key}-{e['swap_id']}.tensor.swp", numel, dtype)
        torch.save(sd, dest / name)
        del sd, zero, state


def _swap_file(path: Path, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The first ``numel`` elements of a DeepSpeed swap file (raw, padded to its I/O alignment), mapped."""
    need = numel * torch.empty(0, dtype=dtype).element_size()
    size = path.stat().st_size if path.is_file() else -1
    if size < need:
        raise CheckpointError(f"NVMe swap file {str(path)!r} is {'missing' if size < 0 else f'{size:,} bytes'}; "
                              f"the swap map needs {need:,}: the checkpoint is incomplete or damaged")
    return torch.from_file(str(path), shared=False, size=numel, dtype=dtype)


def to_universal_everywhere(step_dir: Path) -> Path:
    """Collective: rank 0 converts (or finds the cached conversion), the others wait; every rank returns
    the folder or raises the same ``CheckpointError``, so a failed conversion never leaves ranks hanging.

    The folder must be visible to every rank (a shared filesystem, as for the checkpoints themselves).
    The other ranks wait inside a collective, so a conversion longer than the process group's timeout
    (30 minutes, ep_train.parallel.groups) fails them; convert such a model beforehand (``to_universal``
    caches its result in the step folder)."""
    err = ""
    if dist.get_rank() == 0:
        try:
            to_universal(step_dir)
        except Exception as e:  # DeepSpeed's converter raises what it meets (RuntimeError for a missing rank
            # file, AssertionError, KeyError...); whatever it is must reach every rank
            err = f"{type(e).__name__}: {e}"
    msg = [err]
    dist.broadcast_object_list(msg, src=0)  # communication: the other ranks wait here for the conversion
    if msg[0]:
        raise CheckpointError(f"converting checkpoint {str(step_dir)!r} to DeepSpeed's universal form (to resume "
                              f"at another world or EP size) failed: {msg[0]}. The checkpoint is incomplete or "
                              "damaged (train.verify_checkpoint full checks every file): resume another "
                              "checkpoints/step_N folder")
    return step_dir / UNIVERSAL


def read_param(universal: Path, name: str, shape: tuple[int, ...], rows: list[int] | None = None) -> torch.Tensor:
    """One parameter's full fp32 value with ``shape`` (ZeRO-3 stores dense parameters flat), or only
    ``rows`` of a stacked expert tensor, read from a memory-mapped file."""
    f = universal / "zero" / name / "fp32.pt"
    if not f.is_file():
        raise CheckpointError(f"{str(f)!r} is missing: the universal checkpoint has no parameter {name!r}")
    data = safe_load(f, map_location="cpu", mmap=True)
    t = data["param"] if isinstance(data, dict) else data
    if rows is not None:
        t = t[rows]
    if t.numel() != torch.Size(shape).numel():
        raise CheckpointError(f"{name}: the checkpoint holds {tuple(t.shape)}, the model needs {tuple(shape)}; "
                              "the run config does not describe this checkpoint's model")
    return t.reshape(shape).clone()  # copy out of the mapping: only what was asked


def param_names(universal: Path) -> list[str]:
    return sorted(p.name for p in (universal / "zero").iterdir() if (p / "fp32.pt").is_file())


class UniversalSource:
    """A ``ValueSource`` (``ep_train.model.init``) reading a universal checkpoint: any EP layout takes
    its experts' rows by global id."""

    def __init__(self, universal: Path) -> None:
        self.dir = universal

    def __call__(self, name: str, shape: tuple[int, ...], expert_ids: list[int] | None) -> torch.Tensor:
        if name == "lm_head.weight" and not (self.dir / "zero" / name).is_dir():
            name = "embed.weight"  # tied embeddings are stored once
        return read_param(self.dir, name, shape, expert_ids).float()
