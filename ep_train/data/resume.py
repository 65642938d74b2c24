"""What a ``data_prep_tool build`` output folder holds, and whether a new build may continue it.

A build is identified by its *build key*: the exact input files, the tokenizer's sha256 and every option
that changes the bytes written. ``progress.json`` (an unfinished build) and ``manifest.json`` (a finished
one) both record the key; a build into a folder holding either is allowed only when the keys are equal
(resume, or nothing to do), otherwise it is refused with the differences named. ``--overwrite`` removes
the previous build's files first, and only those: names the tool writes, manifests it recognises.

Inputs are identified by resolved path, size and modification time (ns), not by content hash: a hash
costs a full extra read of the corpus before every start and every resume (reading is most of a big
build's time), while stat costs one call per file. Every usual way of changing an input (append, edit,
replace, regenerate, add or remove a file) changes the size or the mtime. What it misses is an edit of
the same size whose mtime is then set back by hand; copying the corpus elsewhere or touching it makes
a resume refuse, which is the safe direction.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ep_train.files import atomic_write_text

# 2: validation written as valseg_* segments, joined at the end; 3: JSON arrays read row by row (a row whose
# text is not a string costs that row, not the array), odd JSON rows (huge integers, deep nesting) cost one
# row: the same JSON inputs can give other tokens, so a version-2 build of any .json/.jsonl(.gz) input is neither
# resumed nor taken as done. Other inputs (text, parquet, arrow) read alike in both: their version-2 builds stay
# valid (``reads_alike``), so a finished corpus of them is not rebuilt for nothing.
KEY_VERSION = 3
JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")  # the JSON inputs (prep reads them from here)
# How ``build --num-tasks N`` splits the sorted inputs: task i takes the contiguous block [i*n//N, (i+1)*n//N).
# In the build key of --num-tasks parts only (single builds keep their key); parts made before it took every
# Nth file and lack it, so they are refused by name instead of being resumed or merged with these.
TASK_SPLIT = "contiguous"
MANIFEST, PROGRESS, INPUTS = "manifest.json", "progress.json", "inputs.json"
# Every file name the build writes (shards, their temporaries, the state files): --overwrite and the
# resume clean-up delete these and nothing else.
OWN_FILE = re.compile(r"^((train|val|valseg)_\d{5}\.(bin|idx)|manifest\.json|progress\.json|inputs\.json)(\.tmp)?$")
SHARD_FILE = re.compile(r"^(?P<prefix>(train|val|valseg)_\d{5})\.(bin|idx)(\.tmp)?$")


def input_records(files: list[Path]) -> list[dict[str, Any]]:
    """One record per input file: resolved path, size, mtime (ns), in build order."""
    out = []
    for p in files:
        st = p.stat()
        out.append({"path": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def inputs_digest(records: list[dict[str, Any]]) -> str:
    """sha256 of an input list (``input_records``)."""
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def build_key(records: list[dict[str, Any]], tokenizer_sha256: str, options: dict[str, Any]) -> dict[str, Any]:
    """The identity of a build. The input list is kept as a digest here (progress.json is rewritten at every
    shard roll; a million-file list would make that slow) and in full in ``inputs.json`` / the manifest."""
    return {"version": KEY_VERSION, "tokenizer_sha256": tokenizer_sha256, "options": dict(options),
            "inputs_sha256": inputs_digest(records), "num_inputs": len(records)}


def _first(paths: list[str], n: int = 3) -> str:
    more = f" and {len(paths) - n} more" if len(paths) > n else ""
    return ", ".join(paths[:n]) + more


def _input_differences(old: list[dict[str, Any]] | None, new: list[dict[str, Any]]) -> list[str]:
    if old is None:
        return [f"the input files differ (the previous list was not kept; now {len(new)} file(s))"]
    before, now = {r["path"]: r for r in old}, {r["path"]: r for r in new}
    out = []
    added = [p for p in now if p not in before]
    removed = [p for p in before if p not in now]
    changed = [p for p in now if p in before and (now[p]["bytes"], now[p].get("mtime_ns")) !=
               (before[p]["bytes"], before[p].get("mtime_ns"))]
    if added:
        out.append(f"input(s) not in the previous build: {_first(added)}")
    if removed:
        out.append(f"input(s) of the previous build now missing: {_first(removed)}")
    if changed:
        out.append(f"input(s) changed since (size or modification time): {_first(changed)}")
    if not out:
        out.append("the input files are the same but in another order")
    return out


def reads_alike(old: Any, new: int, inputs: list[dict[str, Any]]) -> bool:
    """Whether a build key of version ``old`` and one of ``new`` tokenize ``inputs`` (``input_records``) alike:
    versions 2 and 3 differ only in how JSON files are read."""
    return old == new or ({old, new} == {2, 3} and not any(r["path"].endswith(JSON_SUFFIXES) for r in inputs))


def differences(old_key: dict[str, Any], new_key: dict[str, Any], old_inputs: list[dict[str, Any]] | None,
                new_inputs: list[dict[str, Any]], old_tokenizer_path: str, new_tokenizer_path: str) -> list[str]:
    """Human-readable list of what differs between two build keys (empty: the same build)."""
    out: list[str] = []
    if "task_split" in new_key["options"] and "task_split" not in old_key["options"]:
        return [f"it is part {old_key['options'].get('task_id')} of a --num-tasks build made by an older "
                "data_prep_tool, which gave each task every Nth input file (tasks now take contiguous blocks of "
                "files, so that the merged data keeps the single build's order): its files are not this task's. "
                "Rebuild every task of that build with --overwrite"]
    if not reads_alike(old_key.get("version"), new_key["version"], new_inputs):
        return [f"it was made by another data_prep_tool version (build key {old_key.get('version')}, "
                f"now {new_key['version']}), which reads some of these inputs differently"]
    if old_key["tokenizer_sha256"] != new_key["tokenizer_sha256"]:
        out.append(f"it was made with another tokenizer ({old_tokenizer_path}, sha256 "
                   f"{old_key['tokenizer_sha256'][:12]}...) than --tokenizer {new_tokenizer_path} (sha256 "
                   f"{new_key['tokenizer_sha256'][:12]}...)")
    for name, value in new_key["options"].items():
        if old_key["options"].get(name) != value:
            out.append(f"option {name} was {old_key['options'].get(name)!r}, now {value!r}")
    if old_key["inputs_sha256"] != new_key["inputs_sha256"]:
        out += _input_differences(old_inputs, new_inputs)
    return out


def read_own_json(path: Path, kind: str) -> dict[str, Any] | None:
    """A state file this tool wrote, or None if absent; a foreign or unreadable file is refused (never
    taken for ours, never deleted)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); if it is a damaged {kind} of data_prep_tool, "
                         "delete it and rerun, or use another --output") from None
    marker = "format" if path.name == MANIFEST else "consumed"
    if not isinstance(data, dict) or marker not in data:
        raise ValueError(f"{str(path)!r} was not written by data_prep_tool build; choose another --output "
                         "(this file is left alone, also by --overwrite)")
    return data


def check_previous(out: Path, key: dict[str, Any], records: list[dict[str, Any]], tokenizer: str,
                   overwrite: bool) -> tuple[str, dict[str, Any] | None]:
    """Decide what a build into ``out`` does: ('fresh', None), ('resume', state), ('done', manifest).

    Raises ValueError (and changes nothing) when ``out`` holds another build and ``overwrite`` is off.
    """
    manifest = read_own_json(out / MANIFEST, "manifest")
    state = read_own_json(out / PROGRESS, "progress file")
    if (out / INPUTS).is_file() and not _own_inputs(out / INPUTS):
        raise ValueError(f"{str(out / INPUTS)!r} was not written by data_prep_tool build (it keeps its input "
                         "list under that name); choose another --output (this file is left alone, also by "
                         "--overwrite)")
    if overwrite:
        remove_previous(out)
        return "fresh", None
    if manifest is not None:
        old_key = manifest.get("build_key")
        if old_key:
            diffs = differences(old_key, key, manifest.get("sources"), records, manifest["tokenizer"]["path"],
                                tokenizer)
        elif "merged_from" in manifest:
            diffs = [f"it is the merged manifest of a --num-tasks build ({_first(manifest['merged_from'])})"]
        else:
            diffs = ["it was made by an older data_prep_tool that did not record its inputs and options"]
        if not diffs:
            return "done", manifest
        raise ValueError(f"--output {str(out)!r} already holds a finished build (manifest.json) that differs: "
                         + "; ".join(diffs) + ". Nothing was changed. To replace it, add --overwrite (deletes "
                         "that build's shards and manifest.json, nothing else); to keep it, choose another --output")
    if state is not None:
        old_key = state.get("build_key")
        old_inputs = None
        if (out / INPUTS).is_file():
            old_inputs = json.loads((out / INPUTS).read_text())
        diffs = (differences(old_key, key, old_inputs, records, state["tokenizer"]["path"], tokenizer) if old_key
                 else ["it was made by an older data_prep_tool that did not record its inputs and options"])
        if diffs:
            raise ValueError(f"--output {str(out)!r} holds an unfinished build (progress.json) of other inputs or "
                             "options: " + "; ".join(diffs) + ". Nothing was changed. To resume it, rerun with the "
                             "same inputs and options as that build; to start over, add --overwrite (deletes its "
                             "shards and progress.json, nothing else)")
        return "resume", state
    stray = sorted(f.name for f in out.iterdir() if SHARD_FILE.match(f.name) and not f.name.endswith(".tmp"))
    if stray:  # shards without the state that says what they hold: refuse rather than overwrite them
        raise ValueError(f"--output {str(out)!r} holds shard files ({_first(stray)}) but no manifest.json or "
                         "progress.json saying what they hold; nothing was changed. Add --overwrite to replace "
                         "them, or choose another --output")
    return "fresh", None


def _own_inputs(path: Path) -> bool:
    """Whether ``inputs.json`` is the list ``input_records`` writes (a user's file of that name is not)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, list) and all(isinstance(r, dict) and set(r) == {"path", "bytes", "mtime_ns"}
                                          for r in data)


def remove_previous(out: Path) -> list[str]:
    """Delete the files a previous build wrote in ``out`` (by name pattern; state files only if ours)."""
    read_own_json(out / MANIFEST, "manifest")  # refuses a foreign manifest.json before anything is deleted
    read_own_json(out / PROGRESS, "progress file")
    removed = []
    for f in sorted(out.iterdir()):
        if f.is_file() and OWN_FILE.match(f.name):
            f.unlink()
            removed.append(f.name)
    return removed


def remove_unfinished_shards(out: Path, done: set[str]) -> None:
    """After an interruption: shard files (and temporaries) not recorded as finished are leftovers."""
    for f in out.iterdir():
        m = SHARD_FILE.match(f.name)
        if m and f.is_file() and (f.name.endswith(".tmp") or m["prefix"] not in done):
            f.unlink()


def atomic_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))
