"""Checkpoint pruning, manifests and the free-space check, on folders made here (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ep_train.data.shards import sha256_file
from ep_train.train import checkpoint as ck


def _ckpt(root: Path, step: int, complete: bool = True, payload: bytes = b"x" * 100) -> Path:
    p = root / f"step_{step:08d}"
    p.mkdir(parents=True)
    (p / "weights.pt").write_bytes(payload)
    if complete:
        (p / ck.MANIFEST).write_text(json.dumps({"files": {"weights.pt": {
            "bytes": len(payload), "sha256": sha256_file(p / "weights.pt")}}}))
    return p


def test_prune_counts_only_complete_checkpoints_and_keeps_latest(tmp_path) -> None:
    for s in (10, 20, 30, 40):
        _ckpt(tmp_path, s)
    _ckpt(tmp_path, 25, complete=False)  # crashed mid-save, older than the newest complete: cleaned up
    _ckpt(tmp_path, 50, complete=False)  # newer than the newest complete (a save under way?): kept
    (tmp_path / "latest").write_text("step_00000020")  # e.g. pointed back by hand: never removed
    removed = ck.prune(tmp_path, keep_last=1)
    left = sorted(p.name for p in tmp_path.glob("step_*"))
    assert left == ["step_00000020", "step_00000040", "step_00000050"], (left, removed)


def test_prune_keep_last_two_never_counts_a_partial_folder(tmp_path) -> None:
    for s in (10, 20):
        _ckpt(tmp_path, s)
    _ckpt(tmp_path, 30, complete=False)
    (tmp_path / "latest").write_text("step_00000020")
    ck.prune(tmp_path, keep_last=2)  # the old code counted step 30 and deleted step 10
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000010", "step_00000020", "step_00000030"]


def test_verify_names_the_file(tmp_path) -> None:
    p = _ckpt(tmp_path, 10)
    assert ck.verify(p) is None
    (p / "weights.pt").write_bytes(b"x" * 99)
    assert "weights.pt' has 99 bytes, the manifest says 100" in ck.verify(p)
    (p / "weights.pt").write_bytes(b"y" * 100)
    assert "weights.pt' does not match its checksum" in ck.verify(p)
    assert "has no manifest.json" in ck.verify(_ckpt(tmp_path, 20, complete=False))


def test_free_space_check_names_directory_bytes_and_the_intact_checkpoint(tmp_path, monkeypatch) -> None:
    _ckpt(tmp_path, 10, payload=b"z" * 1000)
    (tmp_path / "latest").write_text("step_00000010")
    need = ck.bytes_needed(tmp_path, estimate=1)
    assert need == 1000  # the size of the newest complete checkpoint, not the estimate

    class Usage:
        free = 500

    monkeypatch.setattr(ck.shutil, "disk_usage", lambda _p: Usage())
    with pytest.raises(ck.CheckpointError) as e:
        ck.check_free_space(tmp_path, need)
    msg = str(e.value)
    assert str(tmp_path) in msg and "1,000 bytes needed, 500 free" in msg
    assert "step_00000010 is intact and still latest" in msg


def test_collapse_watch_names_layer_and_expert_once_after_n_intervals() -> None:
    from ep_train.train.metrics import CollapseWatch

    w = CollapseWatch(threshold=0.1, intervals=3)  # below 0.1 x 1/4 = 2.5% of a layer's tokens
    starving = {1: [500, 490, 5, 5]}  # experts 2 and 3 get 0.5% each
    assert w.update(starving) == [] and w.update(starving) == []
    third = w.update(starving)
    assert len(third) == 2 and "layer 1 expert 2 received 0.5%" in third[0] and "3 logging intervals" in third[0]
    assert w.update(starving) == []  # once per streak
    assert w.update({1: [250, 250, 250, 250]}) == []  # recovered: the streak restarts
    assert CollapseWatch(0.0, 1).update(starving) == []  # off
