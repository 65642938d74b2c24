"""Checkpoints you can trust: DeepSpeed's engine state plus the run's own, a manifest, safe loading.

Layout: ``RUN/checkpoints/step_XXXXXXXX/`` (DeepSpeed's files, ``ep_train_state.json``,
``rng_rank{r}.pt``, ``manifest.json``) and ``RUN/checkpoints/latest`` naming the newest complete one.

A checkpoint is *complete* when its ``manifest.json`` exists: written last, by rank 0, after every
rank finished writing and hashing its share of the files. ``latest`` moves (atomically) only after
that, so a crash mid-save leaves it on the previous complete checkpoint, and pruning counts only
complete checkpoints. At load the manifest is checked (sizes of every file and checksums of the small
ones by default, every checksum with ``train.verify_checkpoint: full``); ``resume: auto`` falls back to
the previous complete checkpoint when the newest fails, unless ``train.resume_fallback`` is off.

Nothing is unpickled beyond plain tensors and containers: DeepSpeed's own loader uses
``torch.load(weights_only=False)``, so the engine gets ``SafeCheckpointEngine`` (``weights_only=True``
with an allowlist of the one DeepSpeed class its ZeRO checkpoints hold).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ep_train.data.shards import sha256_file
from ep_train.files import atomic_write_text, fsync_path
from ep_train.parallel.ds_nvme import nvme_optimizer, restore_from_shard, write_swap_map

STATE_FILE = "ep_train_state.json"
MANIFEST = "manifest.json"
SMALL_FILE = 8 << 20  # files up to 8 MiB (metadata, RNG, ZeRO-3 model-state stubs) are hashed by the fast check


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or trusted; the message names the file and the fix."""


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- what is on disk -------------------------------------------------------------------------------
STEP_DIR = re.compile(r"step_(\d+)")
SET_ASIDE = "abandoned"  # RUN/checkpoints/abandoned/: folders moved out of the run's way, never deleted


def step_tag(step: int) -> str:
    """A checkpoint folder's name (what ``latest`` holds)."""
    return f"step_{step:08d}"


def step_of(path: Path) -> int:
    m = STEP_DIR.fullmatch(path.name)
    assert m is not None, path  # callers pass step_dirs() entries only
    return int(m.group(1))


def step_dirs(root: Path) -> list[Path]:
    """Folders named step_<digits> (complete or not), oldest first; anything else in ``root`` (a user's
    copy such as step_00000100_keep, ``abandoned/``) is not the run's and is left alone."""
    found = [p for p in root.glob("step_*") if STEP_DIR.fullmatch(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(found, key=step_of)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (manifest written), oldest first."""
    return [p for p in step_dirs(root) if (p / MANIFEST).is_file()]


def latest_target(root: Path) -> Path | None:
    latest = root / "latest"
    return root / latest.read_text().strip() if latest.is_file() else None


def prune(root: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest ``keep_last`` complete checkpoints, and partial folders older than the
    newest complete one (a crash mid-save). Never the newest complete one, never what ``latest`` names,
    never a partial folder newer than the newest complete one (a save may be under way)."""
    dirs = step_dirs(root)
    complete = [p for p in dirs if (p / MANIFEST).is_file()]
    if not complete:
        return []
    protect = {complete[-1].resolve()}
    target = latest_target(root)
    if target is not None:
        protect.add(target.resolve())
    doomed = [p for p in complete[:-keep_last] if p.resolve() not in protect]
    newest = step_of(complete[-1])
    doomed += [p for p in dirs if p not in complete and step_of(p) < newest and p.resolve() not in protect]
    for p in doomed:
        failed: list[str] = []
        shutil.rmtree(p, onerror=lambda _f, path, exc: failed.append(f"{path}: {exc[1]}"))
        if failed:  # the run goes on (the checkpoint it saved is complete); the user hears of the disk it keeps
            print(f"WARNING: pruning could not remove all of {p} ({len(failed)} errors, first: {failed[0]}); "
                  "remove it by hand", flush=True)
    return doomed


def set_aside(root: Path, folders: list[Path]) -> list[Path]:
    """Move ``folders`` into ``root/abandoned/`` (a numbered suffix where the name is taken there); return
    where each went. Nothing is deleted: the user decides what to keep."""
    moved = []
    for p in folders:
        dest = root / SET_ASIDE / p.name
        n = 1
        while dest.exists():
            dest, n = root / SET_ASIDE / f"{p.name}.{n}", n + 1
        dest.parent.mkdir(exist_ok=True)
        os.replace(p, dest)
        moved.append(dest)
    return moved


def set_aside_newer(root: Path, step: int) -> tuple[list[Path], list[Path]]:
    """Rank 0, on resuming at ``step``: every step folder past it belongs to a history this run abandons (a
    resume from an older checkpoint, a fallback past a refused newest one, a save cut short). Left in place,
    pruning would count a complete one as the newest and delete the new saves, ``resume auto`` could go back
    to it, and a save at the same step would write into the folder. Complete ones are moved to ``abandoned/``
    (kept: the user decides), partial ones (no manifest: not checkpoints) removed, and ``latest`` names
    ``step`` if it named one of them. Returns (moved to, removed)."""
    newer = [p for p in step_dirs(root) if step_of(p) > step]
    complete = [p for p in newer if (p / MANIFEST).is_file()]
    partial = [p for p in newer if p not in complete]
    target = latest_target(root)
    moved = set_aside(root, complete)
    for p in partial:
        shutil.rmtree(p)
    if target is not None and target in newer:  # latest names the resumed step if it is here, else nothing
        if (root / step_tag(step) / MANIFEST).is_file():
            atomic_write_text(root / "latest", step_tag(step))
        else:  # resumed from another run's folder: this run's next save writes latest again
            (root / "latest").unlink()
    return moved, partial


# ---- save ------------------------------------------------------------------------------------------
def bytes_needed(root: Path, estimate: int) -> int:
    """The newest complete checkpoint's size (the next one is the same size), else ``estimate``."""
    complete = complete_checkpoints(root)
    if complete:
        try:
            return sum(f["bytes"] for f in _manifest_files(complete[-1] / MANIFEST).values())
        except (OSError, ValueError, KeyError, TypeError):  # a damaged manifest: resume refuses it
            pass
    return estimate


def _previous(latest: Path | None) -> str:
    return f"the previous checkpoint {latest.name} is intact and still latest" if latest and latest.is_dir() else \
        "there is no previous checkpoint"


def check_free_space(root: Path, need: int) -> None:
    free = shutil.disk_usage(root).free
    if free < need * 1.1:  # 10% headroom: DeepSpeed writes a few extra files, sizes vary a little
        latest = latest_target(root)
        raise CheckpointError(
            f"not enough disk space to save a checkpoint in {str(root)!r}: about {need:,} bytes needed, "
            f"{free:,} free. Nothing was written; {_previous(latest)}. "
            "Free space (or lower train.keep_last) and resume with --resume auto")


def _comm_device() -> torch.device:
    """Where collectives' tensors must live: NCCL takes only CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(ok: bool) -> bool:
    t = torch.tensor([1.0 if ok else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)  # communication: every rank takes the same branch
    return bool(t.item())


def _all_done(err: str, root: Path, path: Path, estimate: int) -> None:
    """Collective: return if no rank has an ``err``; else every rank raises the same ``CheckpointError``, naming
    each failing rank, after rank 0 removed ``path`` (unless it is complete or what ``latest`` names)."""
    errs: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(errs, err)  # communication: every rank takes the same branch
    failed = [f"rank {r}: {e}" for r, e in enumerate(errs) if e]
    if not failed:
        return
    msg = [""]
    if dist.get_rank() == 0:
        kept = (path / MANIFEST).is_file() or latest_target(root) == path
        if not kept:
            shutil.rmtree(path, ignore_errors=True)  # a partial folder must not look like a checkpoint
        what = (f"{path.name} is complete but `latest` still names {_latest_name(root)}: resume with "
                f"--resume {path}" if kept else f"the partial folder was removed; {_previous(latest_target(root))}")
        msg[0] = (f"saving checkpoint {str(path)!r} failed ({'; '.join(failed)}); about "
                  f"{bytes_needed(root, estimate):,} bytes needed, {shutil.disk_usage(root).free:,} free. {what}")
    dist.broadcast_object_list(msg, src=0)  # communication
    raise CheckpointError(msg[0])


def _latest_name(root: Path) -> str:
    target = latest_target(root)
    return target.name if target is not None else "nothing"


def _failure(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def save(engine: Any, root: Path, step: int, run_state: dict[str, Any], keep_last: int, estimate: int) -> Path:
    """Collective. Raises ``CheckpointError`` (on every rank) if the save cannot be completed.

    Every file is flushed to disk (fsync) before the manifest makes the checkpoint complete, and the
    manifest before ``latest`` moves and older checkpoints are pruned: after a power loss the newest
    complete checkpoint holds data, not empty files. A failure on some ranks only (a full local disk, a
    quota) is agreed on at each phase, so no rank is left waiting at a collective the others skipped."""
    tag = step_tag(step)
    path = root / tag
    rank, world = dist.get_rank(), dist.get_world_size()
    root.mkdir(parents=True, exist_ok=True)
    err = ""
    if rank == 0:
        try:
            if path.exists():  # a folder of this step from before (see set_aside_newer): never write into it
                moved = set_aside(root, [path])[0]
                print(f"checkpoint: {path.name} already existed; moved to {moved} before saving step {step}",
                      flush=True)
            check_free_space(root, bytes_needed(root, estimate))
        except Exception as e:  # raised on rank 0 alone: the others must hear of it, not wait at a collective
            err = str(e) if isinstance(e, CheckpointError) else \
                f"preparing to save checkpoint {str(path)!r} failed ({_failure(e)}); nothing was written"
    msg = [err]
    dist.broadcast_object_list(msg, src=0)  # communication
    if msg[0]:
        raise CheckpointError(msg[0])
    # 1. every rank writes its files. The engine records a failed write and goes on, so DeepSpeed's own
    # collectives inside save_checkpoint (gathers, its final barrier) still meet on every rank; so do DeepSpeed's
    # copies outside the engine (_record_copies).
    writer = _checkpoint_engine(engine)
    writer.failed = ""
    err = ""
    try:
        with _record_copies(engine, writer):
            engine.save_checkpoint(str(root), tag=tag, save_latest=False)  # collective
        err = writer.failed
        if not err:
            torch.save(rng_state(), path / f"rng_rank{rank}.pt")
            fsync_path(path / f"rng_rank{rank}.pt")
            if nvme_optimizer(engine):
                write_swap_map(engine, path)  # which swap files hold which sub-group (for the universal form)
    except (OSError, RuntimeError) as e:  # disk full (ENOSPC), file-size limit (EFBIG); torch.save raises RuntimeError
        err = _failure(e)
    _all_done(err, root, path, estimate)
    # 2. rank 0 writes the run state and lists the folder for everyone: on a shared filesystem another node's
    # listing can lag, and a file no rank hashed would be missing from the manifest (and never checked)
    listing: list[Any] = [None]
    err = ""
    if rank == 0:
        try:
            atomic_write_text(path / STATE_FILE, json.dumps(run_state, indent=2))
            listing[0] = sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and f.name != MANIFEST)
        except OSError as e:
            err = _failure(e)
    _all_done(err, root, path, estimate)
    dist.broadcast_object_list(listing, src=0)  # communication
    files: list[str] = listing[0]
    # 3. the hashing is spread over the ranks; each also flushes the files it reads (the writer's flush covers
    # DeepSpeed's checkpoint files; this one every other file, such as NVMe swap copies and scripts)
    mine: dict[str, Any] = {}
    err = ""
    try:
        for f in files[rank::world]:
            mine[f] = {"bytes": (path / f).stat().st_size, "sha256": sha256_file(path / f)}
            fsync_path(path / f)
    except OSError as e:
        err = _failure(e)
    _all_done(err, root, path, estimate)
    shares: list[dict[str, Any]] = [{} for _ in range(world)]
    dist.all_gather_object(shares, mine)  # communication
    # 4. rank 0 makes it complete (manifest), then moves latest and prunes
    err = ""
    if rank == 0:
        try:
            for d in [path, *(p for p in path.rglob("*") if p.is_dir())]:
                fsync_path(d)  # every file's folder entry, before the manifest says they are there
            entries = {k: v for share in shares for k, v in share.items()}
            atomic_write_text(path / MANIFEST, json.dumps(  # complete from here on
                {"step": step, "world_size": world, "files": dict(sorted(entries.items()))}, indent=1))
            atomic_write_text(root / "latest", tag)
        except OSError as e:
            err = _failure(e)
        else:
            try:
                prune(root, keep_last)
            except OSError as e:  # the new checkpoint is complete and latest: the run goes on, the user hears of it
                print(f"WARNING: pruning old checkpoints in {root} failed ({_failure(e)}); remove them by hand",
                      flush=True)
    _all_done(err, root, path, estimate)
    return path


# ---- verify and choose -----------------------------------------------------------------------------
def _manifest_files(man_file: Path) -> dict[str, dict[str, Any]]:
    """The manifest's ``files`` entries, each checked to hold an int ``bytes`` and a str ``sha256``."""
    files = json.loads(man_file.read_text(encoding="utf-8"))["files"]
    if not isinstance(files, dict):
        raise TypeError(f"'files' is a {type(files).__name__}, not an object")
    for name, want in files.items():
        if not (isinstance(want, dict) and isinstance(want.get("bytes"), int) and isinstance(want.get("sha256"), str)):
            raise TypeError(f"the entry of {name!r} is {want!r}, not {{'bytes': int, 'sha256': str}}")
    return files


def verify(path: Path, full: bool = False, files: list[str] | None = None) -> str | None:
    """None if ``path`` matches its manifest, else what is wrong (naming the file). ``files`` limits the
    checksum work to these names (sizes are always checked for every file)."""
    man_file = path / MANIFEST
    if not path.is_dir():
        return (f"{str(path)!r} does not exist or is not a folder; give a checkpoint folder "
                "(RUN/checkpoints/step_XXXXXXXX) or auto")
    if not man_file.is_file():
        if not STEP_DIR.fullmatch(path.name):
            return (f"{str(path)!r} is not a checkpoint folder (no {MANIFEST}); give one of its step_XXXXXXXX "
                    "folders, or auto")
        return f"{str(path)!r} has no {MANIFEST}: it is incomplete (a save that did not finish)"
    try:
        entries = _manifest_files(man_file)
    except (OSError, ValueError, TypeError, KeyError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return f"{str(man_file)!r} is not a valid manifest ({type(e).__name__}: {e})"
    for name, want in entries.items():
        f = path / name
        if not f.is_file():
            return f"{str(f)!r} is missing (the manifest lists it)"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{str(f)!r} has {size:,} bytes, the manifest says {want['bytes']:,} (truncated or replaced)"
    for name, want in entries.items():
        if files is not None and name not in files:
            continue
        if (full or want["bytes"] <= SMALL_FILE) and sha256_file(path / name) != want["sha256"]:
            return f"{str(path / name)!r} does not match its checksum in the manifest (corrupted)"
    return None


def _verify_or_say(path: Path, full: bool, files: list[str] | None) -> str | None:
    try:
        return verify(path, full=full, files=files)
    except OSError as e:  # an unreadable file (EIO, permissions): a refusal like any other, on this rank alone
        return f"reading {str(path)!r} failed ({_failure(e)})"


def _verify_everywhere(path: Path, mode: str) -> str | None:
    """Collective: rank 0 checks sizes and small files; with ``full`` the checksums of every file are
    spread over the ranks. Every rank returns the same answer."""
    rank, world = dist.get_rank(), dist.get_world_size()
    problem: str | None = None
    if mode == "full":
        names: list[str] = []
        if (path / MANIFEST).is_file():
            try:
                names = sorted(_manifest_files(path / MANIFEST))
            except (OSError, ValueError, TypeError, KeyError):
                names = []  # verify() names the problem
        problem = _verify_or_say(path, True, names[rank::world])
    elif rank == 0:
        problem = _verify_or_say(path, False, None)
    found: list[str | None] = [None] * world
    dist.all_gather_object(found, problem)  # communication
    return next((p for p in found if p), None)


def choose(resume: str, root: Path, mode: str, fallback: bool, log: Any = print) -> Path | None:
    """Collective. ``auto``: the newest complete checkpoint that passes verification (older ones on
    failure, saying so, when ``fallback``); a folder: that one, verified. None when there is nothing."""
    if resume == "auto":
        found: list[Any] = [None]
        if dist.get_rank() == 0:  # one listing for every rank (another node's view of a shared disk can lag)
            try:
                candidates = list(reversed(complete_checkpoints(root)))
                target = latest_target(root)
                if target is not None and target in candidates:  # `latest` first (normally also the newest)
                    if candidates[0] != target:  # set back by hand (as in Megatron), or a save cut short after
                        # its manifest: the newer ones are set aside at the resume, not deleted
                        log(f"resume auto: latest names {target.name}, older than the newest complete checkpoint "
                            f"{candidates[0].name}; resuming {target.name} (pass --resume {candidates[0]} to "
                            "continue from the newest instead)")
                    candidates.remove(target)
                    candidates.insert(0, target)
                found = [[str(p) for p in candidates]]
            except Exception as e:  # raised on rank 0 alone: every rank must hear of it
                found = [f"listing the checkpoints in {str(root)!r} failed ({type(e).__name__}: {e})"]
        dist.broadcast_object_list(found, src=0)  # communication
        if isinstance(found[0], str):
            raise CheckpointError(f"{found[0]}; fix that folder (permissions, a damaged 'latest') and resume again")
        candidates = [Path(p) for p in found[0]]
        if not candidates:
            return None
    else:
        candidates = [Path(resume)]
    for i, path in enumerate(candidates):
        problem = _verify_everywhere(path, mode) if mode != "off" else (
            None if (path / STATE_FILE).is_file() else f"{str(path)!r} has no {STATE_FILE}")
        if problem is None:
            return path
        if resume != "auto" or not fallback or i + 1 == len(candidates):
            hint = ("pass another checkpoints/step_* folder" if resume != "auto" else
                    "no older complete checkpoint passes either" if fallback else
                    "set train.resume_fallback true to fall back to the previous complete checkpoint")
            raise CheckpointError(f"checkpoint refused: {problem}; {hint}")
        if dist.get_rank() == 0:
            log(f"WARNING: checkpoint {path.name} refused: {problem}; falling back to {candidates[i + 1].name}")
    return None


# ---- load ------------------------------------------------------------------------------------------
def _allowed() -> list[type]:
    # The non-tensor, non-container classes DeepSpeed 0.19.8 puts in ZeRO checkpoints: the stage enum
    # and the loss scaler (plain attributes; restoring them runs no code of the file's choosing).
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


_TORCH_LOAD = torch.load


def safe_load(path: str | Path, map_location: Any = None, **kwargs: Any) -> Any:
    """``torch.load`` with ``weights_only=True`` and the allowlist above; anything else is a
    ``CheckpointError`` naming the file, never a fallback to pickle."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(_allowed()):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, **kwargs)
    except Exception as e:  # UnpicklingError and friends
        if not (isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e)):
            # not a refusal: the file could not be read (truncated, not a torch file, an I/O error)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise CheckpointError(f"checkpoint file {str(path)!r} could not be read ({type(e).__name__}: {first}); "
                                  "it is truncated or corrupted: resume from another checkpoint") from None
        m = re.search(r"Unsupported global: GLOBAL [\w.]+|WeightsUnpickler error:\s*[^\n]+", str(e))
        why = " ".join(m.group(0).split()) if m else type(e).__name__
        raise CheckpointError(f"checkpoint file {str(path)!r} holds objects ep-train does not load "
                              f"(weights_only=True refused it: {why}); "
                              "it is corrupted or was not written by ep-train") from None


def safe_load_mapped(path: str | Path, map_location: Any = None, **kwargs: Any) -> Any:
    """``safe_load`` with the tensors memory-mapped (read from the page cache when touched) where the file
    allows it: torch's zip format. Files in torch's legacy format (DeepSpeed's engine writes it when
    configured with ``checkpoint_serialization: false``, and did after every resume before ep-train kept
    its config) are read into memory."""
    kwargs.pop("mmap", None)
    mappable = isinstance(path, (str, os.PathLike)) and zipfile.is_zipfile(path)
    return safe_load(path, map_location=map_location, mmap=mappable, **kwargs)


@contextlib.contextmanager
def only_safe_loads(mmap: bool = False) -> Iterator[None]:
    """Within this block every ``torch.load`` is ``safe_load``: for DeepSpeed code that calls
    ``torch.load(weights_only=False)`` itself (``ds_to_universal``, the universal loader). ``mmap``:
    ``safe_load_mapped``."""
    torch.load = safe_load_mapped if mmap else safe_load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD  # type: ignore[assignment]


@functools.cache
def _safe_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``. Each file it saves is
        flushed to disk (fsync); a save that fails is recorded in ``failed`` (the first error) instead of
        raised, and later saves of the same checkpoint are skipped: DeepSpeed's ``save_checkpoint`` then goes on
        to its collectives on this rank as on the others, and ``save`` agrees on the failure afterwards."""

        failed = ""

        def save(self, state_dict: Any, path: str) -> None:  # type: ignore[override]
            if self.failed:
                return
            try:
                super().save(state_dict, path)
                fsync_path(path)
            except (OSError, RuntimeError) as e:  # ENOSPC, EFBIG (torch.save raises RuntimeError for some)
                self.failed = _failure(e)

        def load(self, path: str, map_location: Any = None) -> Any:  # type: ignore[override]
            return safe_load(path, map_location=map_location)

    return SafeCheckpointEngine


@contextlib.contextmanager
def _record_copies(engine: Any, writer: Any) -> Iterator[None]:
    """DeepSpeed's save_checkpoint copies files outside its checkpoint engine: rank 0's recovery scripts
    (zero_to_fp32.py, zero_to_torch.py: ``engine._copy_recovery_script``, with the shutil.copyfile it imported) and,
    with the optimizer on NVMe, each rank's swap files (``shutil.copytree``, looked up in shutil at that point of
    every save; the checkpoint's largest files, so the likeliest to meet a full disk). A failed copy raised out of
    save_checkpoint on that rank alone while the others waited in its final barrier. For the length of the save
    both are wrapped: a failed copy is recorded like a failed write (``SafeCheckpointEngine.failed``), later copies
    are skipped, and the save goes on to the barrier."""
    def recorded(copy: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            if writer.failed:
                return None
            try:
                return copy(*args, **kwargs)
            except OSError as e:  # shutil.Error (the errors of several files) is an OSError too
                writer.failed = _failure(e)
                return None
        return run

    own_tree = shutil.copytree
    engine._copy_recovery_script = recorded(engine._copy_recovery_script)  # an instance attribute over the method
    shutil.copytree = recorded(own_tree)  # type: ignore[assignment]
    try:
        yield
    finally:
        shutil.copytree = own_tree  # type: ignore[assignment]
        del engine._copy_recovery_script  # the class's method again


def safe_checkpoint_engine(config_params: Any = None) -> Any:
    """DeepSpeed's torch checkpoint engine with ``weights_only=True`` loading and flushed, agreed saves."""
    return _safe_engine_class()(config_params)


def _checkpoint_engine(engine: Any) -> Any:
    """The engine's checkpoint engine, made a ``SafeCheckpointEngine`` (with the engine's config: without one
    DeepSpeed saves in torch's legacy format, slower to load and not memory-mappable) if it is not one."""
    if not isinstance(engine.checkpoint_engine, _safe_engine_class()):
        engine.checkpoint_engine = safe_checkpoint_engine(engine._config)
    return engine.checkpoint_engine


def load(engine: Any, path: Path, universal: Path | None = None) -> dict[str, Any]:
    """Load ``path`` into the engine; ``universal`` (its converted form, the engine built with
    ``checkpoint.load_universal``) when the checkpoint was written at another world or EP size."""
    _checkpoint_engine(engine)  # every later checkpoint of the run is saved by it too
    where = universal if universal is not None else path
    # The universal loader reads its per-parameter files with torch.load(weights_only=False) itself; mapped, a
    # rank reads the rows of its own experts (and its own partition of a dense parameter) from each file.
    with only_safe_loads(mmap=True) if universal is not None else contextlib.nullcontext():
        load_path, _ = engine.load_checkpoint(str(where.parent), tag=where.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is not None and universal is None and nvme_optimizer(engine):
        restore_from_shard(engine, str(where.parent), where.name)  # what DeepSpeed skips with NVMe swapping
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint at {str(where)!r}; is it complete?")
    state = json.loads((path / STATE_FILE).read_text())
    # Each rank restores the RNG streams its rank number had (router noise, dropout). At a new world size
    # a rank without a file (rank 1 of a checkpoint written by one process) keeps the stream it was
    # seeded with (train.seed + rank): such a run is not bit-identical to continuing where noise is drawn;
    # the default routing draws none.
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())
