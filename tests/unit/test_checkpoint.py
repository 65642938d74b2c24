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


def test_folders_that_are_not_step_dirs_are_left_alone(tmp_path) -> None:
    """A user's copy (step_00000010_keep) or the abandoned/ folder is not one of the run's checkpoints: the
    listing skips it (it made step_of raise, on rank 0 alone, mid-save) and pruning never touches it."""
    for s in (10, 20, 30):
        _ckpt(tmp_path, s)
    (tmp_path / "step_00000010_keep").mkdir()
    (tmp_path / "step_00000010_keep" / ck.MANIFEST).write_text("{}")
    (tmp_path / "step_notes.txt").write_text("mine")
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step_00000010", "step_00000020", "step_00000030"]
    ck.prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000010_keep", "step_00000030",
                                                                  "step_notes.txt"]


def test_resuming_an_older_checkpoint_sets_the_newer_history_aside(tmp_path) -> None:
    """Resume at step 300 with 400 and 500 on disk (and a save of 600 cut short): 400 and 500 move to
    abandoned/ (kept), 600 is removed, latest names 300. Without this, pruning after the new saves 310,
    320, 330 kept 400 and 500 as the newest and deleted 310 and 320."""
    for s in (300, 400, 500):
        _ckpt(tmp_path, s)
    _ckpt(tmp_path, 600, complete=False)
    (tmp_path / "latest").write_text("step_00000500")
    moved, removed = ck.set_aside_newer(tmp_path, 300)
    assert [p.relative_to(tmp_path).as_posix() for p in moved] == ["abandoned/step_00000400",
                                                                     "abandoned/step_00000500"]
    assert [p.name for p in removed] == ["step_00000600"] and not removed[0].exists()
    assert ck.verify(tmp_path / "abandoned" / "step_00000500") is None  # intact where it went
    assert ck.latest_target(tmp_path) == tmp_path / "step_00000300"
    for s in (310, 320, 330):  # the new history's saves (latest moves), each followed by a prune (keep_last 3)
        _ckpt(tmp_path, s)
        (tmp_path / "latest").write_text(f"step_{s:08d}")
        ck.prune(tmp_path, keep_last=3)
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step_00000310", "step_00000320", "step_00000330"]
    assert sorted(p.name for p in (tmp_path / "abandoned").iterdir()) == ["step_00000400", "step_00000500"]
    # a second rollback past a step already set aside once: a numbered name, nothing overwritten
    _ckpt(tmp_path, 400)
    moved, _ = ck.set_aside_newer(tmp_path, 330)
    assert [p.name for p in moved] == ["step_00000400.1"]
    assert ck.latest_target(tmp_path) == tmp_path / "step_00000330"  # it named none of the moved ones
    assert ck.set_aside_newer(tmp_path, 330) == ([], [])  # nothing past it: nothing moves


def test_resuming_another_runs_checkpoint_leaves_no_dangling_latest(tmp_path) -> None:
    """Resumed from a step-300 folder of another run while this run has 100 and 400 (latest): 400 is set
    aside and latest, which named it, is removed rather than pointed at a step_00000300 that is not here
    (resume auto then quietly took step 100)."""
    for s in (100, 400):
        _ckpt(tmp_path, s)
    (tmp_path / "latest").write_text("step_00000400")
    moved, _ = ck.set_aside_newer(tmp_path, 300)
    assert [p.name for p in moved] == ["step_00000400"] and not (tmp_path / "latest").exists()
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step_00000100"]


def test_verify_names_the_file(tmp_path) -> None:
    p = _ckpt(tmp_path, 10)
    assert ck.verify(p) is None
    (p / "weights.pt").write_bytes(b"x" * 99)
    assert "weights.pt' has 99 bytes, the manifest says 100" in ck.verify(p)
    (p / "weights.pt").write_bytes(b"y" * 100)
    assert "weights.pt' does not match its checksum" in ck.verify(p)
    assert "has no manifest.json" in ck.verify(_ckpt(tmp_path, 20, complete=False))


def test_a_damaged_manifest_is_a_refusal_not_an_exception(tmp_path) -> None:
    """Any damage is named by verify (in the fast mode only rank 0 verifies: an exception there left the other
    ranks waiting at the next collective instead of falling back)."""
    p = _ckpt(tmp_path, 10)
    for damaged in (b"\xff\xfe not utf-8", b"[1, 2]", b'{"files": []}', b'{"files": {"weights.pt": {"sha256": "0"}}}',
                    b'{"files": {"weights.pt": 5}}', b'{"nofiles": 1}', b"{"):
        (p / ck.MANIFEST).write_bytes(damaged)
        problem = ck.verify(p)
        assert problem is not None and "is not a valid manifest" in problem and "manifest.json" in problem, damaged


def test_a_wrong_resume_path_is_named_as_wrong_not_as_an_unfinished_save(tmp_path) -> None:
    _ckpt(tmp_path / "checkpoints", 10)
    assert "does not exist or is not a folder" in ck.verify(tmp_path / "checkpoints" / "step_00000011")
    assert "is not a checkpoint folder" in ck.verify(tmp_path / "checkpoints")  # the parent, not a step folder
    assert "has no manifest.json: it is incomplete" in ck.verify(_ckpt(tmp_path / "checkpoints", 20, complete=False))


@pytest.fixture
def synced(monkeypatch) -> list[str]:
    """The paths os.fsync is called on (through to the real fsync), in order."""
    import os

    paths: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (paths.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    return paths


def test_save_engine_flushes_each_file_and_records_a_failed_write(tmp_path, synced) -> None:
    """The checkpoint engine given to DeepSpeed fsyncs what it writes, and a failing write (a full disk) is
    recorded, not raised, so that DeepSpeed's own collectives after it still meet on every rank."""
    import torch

    eng = ck.safe_checkpoint_engine()
    eng.save({"w": torch.ones(3)}, str(tmp_path / "a.pt"))
    assert synced == [str(tmp_path / "a.pt")] and eng.failed == ""
    assert torch.equal(eng.load(str(tmp_path / "a.pt"))["w"], torch.ones(3))
    (tmp_path / "b.pt").mkdir()  # a write that fails (IsADirectoryError)
    eng.save({"w": torch.ones(3)}, str(tmp_path / "b.pt"))
    assert "b.pt" in eng.failed
    eng.save({"w": torch.ones(3)}, str(tmp_path / "c.pt"))  # after a failure nothing more of this checkpoint
    assert not (tmp_path / "c.pt").exists() and "b.pt" in eng.failed


def test_files_written_atomically_are_flushed_with_their_folder(tmp_path, synced) -> None:
    from ep_train.files import atomic_write_text

    atomic_write_text(tmp_path / "latest", "step_00000010")
    assert synced == [str(tmp_path / "latest.tmp"), str(tmp_path)]


def test_resume_auto_says_when_latest_is_not_the_newest_complete_checkpoint(tmp_path) -> None:
    """`latest` wins (set back by hand, or a save cut short between its manifest and `latest`), and the log says
    which newer one exists and how to take it instead (one process, a real gloo group: choose() is collective)."""
    import torch.distributed as dist

    from tests.distributed.harness import free_port

    _ckpt(tmp_path, 13)
    _ckpt(tmp_path, 24)
    (tmp_path / "latest").write_text("step_00000013")
    said: list[str] = []
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert ck.choose("auto", tmp_path, "fast", True, log=said.append) == tmp_path / "step_00000013"
        (tmp_path / "latest").write_text("step_00000024")
        assert ck.choose("auto", tmp_path, "fast", True, log=said.append) == tmp_path / "step_00000024"
    finally:
        dist.destroy_process_group()
    assert len(said) == 1 and "latest names step_00000013" in said[0] and "step_00000024" in said[0], said


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


def test_without_per_expert_stats_the_collapse_watch_and_layer_scalars_stay(tmp_path, capsys) -> None:
    """train.log_expert_stats false drops the per-expert figures only: the collapse warning (a safety check) and
    each layer's entropy and dropped fraction stay; a grad norm DeepSpeed did not compute shows as n/a, not 0."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ep_train.train.metrics import CollapseWatch, MetricsLogger

    rec = {"step": 1, "tokens": 900, "loss": 5.0, "lm_loss": 4.9, "aux_loss": 1.0, "z_loss": 0.1, "lr": 1e-3,
           "grad_norm": None,
           "tokens_per_sec": 100.0}
    log = MetricsLogger(tmp_path / "run", True, 10, collapse=CollapseWatch(threshold=0.1, intervals=1))
    log.log(rec, {1: [500, 490, 5, 5]}, {1: {"entropy": 0.7, "dropped_frac": 0.25}}, per_expert=False)
    out = capsys.readouterr().out
    assert "routing collapse? layer 1 expert 2" in out and "tokens/expert" not in out and "| grad n/a |" in out
    log.tb.flush()
    tags = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload().Tags()
    assert {"moe/layer_1/entropy", "moe/layer_1/dropped_frac"} <= set(tags["scalars"]), tags
    assert "moe/layer_1/tokens_per_expert_cv" not in tags["scalars"] and "moe/expert_load" not in tags["images"]
    assert "train/grad_norm" not in tags["scalars"]
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["grad_norm"] is None and line["expert_counts"] == {} and line["moe"]["1"]["entropy"] == 0.7


def test_lr_schedule_peaks_once_and_ends_at_the_minimum() -> None:
    """Against torch's own CosineAnnealingLR over the decay steps: the step after warmup is its first step, the
    last step (index max_steps - 1) ends at min_lr_ratio; warmup is linear to 1 at its last step."""
    import torch

    from ep_train.train.optim import lr_factor

    warmup, max_steps, ratio = 5, 20, 0.1
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_steps - warmup, eta_min=ratio)
    for step in range(warmup, max_steps):
        opt.step()
        ref.step()
        assert abs(lr_factor(step, warmup, max_steps, ratio) - opt.param_groups[0]["lr"]) < 1e-12, step
    factors = [lr_factor(s, warmup, max_steps, ratio) for s in range(max_steps)]
    assert factors[:warmup] == [0.2, 0.4, 0.6, 0.8, 1.0] and factors.count(1.0) == 1
    assert abs(factors[-1] - ratio) < 1e-12 and lr_factor(max_steps + 3, warmup, max_steps, ratio) == factors[-1]


def test_expert_load_logs_the_busiest_ep_rank(tmp_path, capsys) -> None:
    """Per layer, the rows of the EP rank whose experts get the most over the mean rank's (EP rank r holds
    experts [r E/ep, (r + 1) E/ep)), on the console and in TensorBoard; absent without EP."""
    import numpy as np

    from ep_train.train.metrics import MetricsLogger, expert_summary

    counts = [300, 100, 50, 50, 200, 100, 100, 0]  # EP 2: rank 0 gets 500 rows, rank 1 400; EP 4: 400/100/300/100
    assert expert_summary(np.asarray(counts, dtype=float), 2)["ep_rank_max_over_mean"] == 500 / 450
    assert expert_summary(np.asarray(counts, dtype=float), 4)["ep_rank_max_over_mean"] == 400 / 225
    assert expert_summary(np.asarray(counts, dtype=float))["ep_rank_max_over_mean"] == 1.0  # one rank holds all
    rec = {"step": 1, "tokens": 900, "loss": 5.0, "lm_loss": 4.9, "aux_loss": 1.0, "z_loss": 0.1, "lr": 1e-3,
           "grad_norm": 1.0,
           "tokens_per_sec": 100.0}
    stats = {1: {"entropy": 1.5, "dropped_frac": 0.0}, 3: {"entropy": 1.5, "dropped_frac": 0.0}}
    log = MetricsLogger(tmp_path / "ep2", True, 10, ep_size=2)
    log.log(rec, {1: counts, 3: [100] * 8}, stats)  # layer 3 balanced: 1.00
    out = capsys.readouterr().out
    assert f"ep rank load max/mean {(500 / 450 + 1.0) / 2:.2f}" in out and "layer 1:" in out
    assert f"ep rank max/mean {500 / 450:.2f}" in out and "ep rank max/mean 1.00" in out
    log.tb.flush()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(tmp_path / "ep2" / "tensorboard")).Reload().Tags()["scalars"]
    assert "moe/layer_1/ep_rank_max_over_mean" in tags
    MetricsLogger(tmp_path / "ep1", True, 10).log(rec, {1: counts}, stats)
    assert "ep rank" not in capsys.readouterr().out


def test_a_cached_universal_conversion_neither_breaks_verify_nor_outlives_pruning(tmp_path) -> None:
    """Resharding leaves step_N/universal (not in the manifest) behind: verify ignores it, prune removes it
    with its step folder."""
    old = _ckpt(tmp_path, 10)
    (old / "universal" / "zero" / "embed.weight").mkdir(parents=True)
    (old / "universal" / "zero" / "embed.weight" / "fp32.pt").write_bytes(b"y" * 10)
    assert ck.verify(old, full=True) is None
    _ckpt(tmp_path, 20)
    (tmp_path / "latest").write_text("step_00000020")
    ck.prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000020"]


def _tiny_cfg(*overrides: str):  # type: ignore[no-untyped-def]
    from ep_train.config import load_config, parse_overrides

    root = Path(__file__).resolve().parents[2]
    return load_config(root / "configs" / "tiny.yaml", parse_overrides(list(overrides)))


def test_resume_reshards_another_shape_and_refuses_another_batch() -> None:
    from ep_train.config import config_to_dict
    from ep_train.train.resume import check_resumable

    saved = {"world_size": 2, "config": config_to_dict(_tiny_cfg("--ep_size", "2"))}
    assert check_resumable(saved, _tiny_cfg("--ep_size", "2"), 2, "ck") == []
    assert check_resumable(saved, _tiny_cfg("--ep_size", "1"), 1, "ck") == ["world size: 2 -> 1",
                                                                          "parallel.ep_size: 2 -> 1"]
    with pytest.raises(ValueError, match=r"train.batch_size: 8 -> 16"):
        check_resumable(saved, _tiny_cfg("--ep_size", "1", "--batch_size", "16"), 1, "ck")


def test_a_checkpoint_from_before_a_config_field_existed_still_resumes() -> None:
    """Fields added to ep-train since a checkpoint was written read as their defaults (what that run did), not
    as a change ("None -> 0.0") nobody can set back."""
    from ep_train.config import config_to_dict
    from ep_train.train.resume import apply_changes, check_resumable

    cfg = _tiny_cfg("--ep_size", "2")
    old = config_to_dict(cfg)
    del old["moe"]["expert_bias_update_rate"], old["train"]["min_lr_ratio"], old["data"]["reset_positions"]
    assert check_resumable({"world_size": 2, "config": old}, cfg, 2, "ck") == []
    assert apply_changes(None, old, cfg, 3) == []
    with pytest.raises(ValueError, match=r"moe.expert_bias_update_rate: 0.0 -> 0.01"):
        check_resumable({"world_size": 2, "config": old}, _tiny_cfg("--ep_size", "2", "--expert_bias_update_rate",
                                                                    "0.01"), 2, "ck")


def test_group_settings_come_back_after_a_universal_load() -> None:
    """DeepSpeed 0.19.8's universal load copies group 0's settings (and our tags) onto every group;
    restore_group_tags + apply_changes(force=True) give each group its own again."""
    import torch

    from ep_train.model.transformer import build_model
    from ep_train.train.optim import lr_factor, optimizer_param_groups
    from ep_train.config import config_to_dict
    from ep_train.train.resume import apply_changes, group_tags, restore_group_tags

    cfg = _tiny_cfg("--ep_size", "1", "--router_lr_multiplier", "4", "--warmup_steps", "2")
    t = cfg.train
    model = build_model(cfg.model, cfg.moe)
    opt = torch.optim.AdamW(optimizer_param_groups(model, cfg), lr=t.learning_rate, betas=(t.beta1, t.beta2),
                            eps=t.eps, weight_decay=t.weight_decay)  # as the trainer builds it
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.min_lr_ratio))
    for _ in range(3):
        opt.step()
        sched.step()
    want = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    assert len({g["weight_decay"] for g in want}) == 2 and len({g["lr"] for g in want}) == 2

    tags = group_tags(opt)
    first = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    for g in opt.param_groups:  # what stage3.py does after a universal load
        g.update(first)
    restore_group_tags(opt, tags)
    assert apply_changes(sched, config_to_dict(cfg), cfg, 3, force=True) == []
    got = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    assert got == want
    assert sched.get_last_lr() == [g["lr"] for g in want]


def test_a_changed_schedule_on_resume_follows_the_applied_steps_not_the_step_count() -> None:
    """DeepSpeed does not step the scheduler on a skipped (non-finite) step: after 3 steps with one skipped
    the schedule is at 2, and apply_changes must set the rate the scheduler gives (it used the step count, 3:
    the first step after such a resume ran at another rate)."""
    import torch

    from ep_train.config import config_to_dict
    from ep_train.model.transformer import build_model
    from ep_train.train.optim import lr_schedule, optimizer_param_groups
    from ep_train.train.resume import apply_changes

    cfg = _tiny_cfg("--ep_size", "1", "--warmup_steps", "4", "--max_steps", "10")
    model = build_model(cfg.model, cfg.moe)
    opt = torch.optim.AdamW(optimizer_param_groups(model, cfg), lr=cfg.train.learning_rate)
    sched = lr_schedule(opt, cfg.train)
    for step in (1, 2, 3):
        opt.step()
        if step != 2:  # step 2 skipped: DeepSpeed steps neither the optimizer nor the scheduler
            sched.step()
    want = sched.get_last_lr()
    assert apply_changes(sched, config_to_dict(cfg), cfg, 3 - 1, force=True) == []
    assert sched.get_last_lr() == want and [g["lr"] for g in opt.param_groups] == want
    apply_changes(sched, config_to_dict(cfg), cfg, 3, force=True)  # the step count: another rate
    assert sched.get_last_lr() != want


def test_metrics_past_the_resumed_step_move_aside(tmp_path) -> None:
    """A run that crashed at step 7 after its step-4 checkpoint logs steps 5-7 again after the resume:
    the first records of 5-7 (and a line cut short by the crash) move to metrics.abandoned.jsonl, so each
    step appears once in metrics.jsonl; nothing is lost."""
    from ep_train.train.metrics import MetricsLogger

    lines = [json.dumps({"step": s, "loss": 10.0 - s}) for s in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 8, "lo')
    m = MetricsLogger(tmp_path, True, 10)
    assert m.resume_at(4, 400) == 4
    m.log_memory(4, "setup", [1.0, 2.0])  # the resumed run's own records follow
    m.close()
    kept = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 4] and kept[-1]["phase"] == "setup"
    gone = (tmp_path / "metrics.abandoned.jsonl").read_text().splitlines()
    assert gone == lines[4:] + ['{"step": 8, "lo']
    again = MetricsLogger(tmp_path, True, 10)
    assert again.resume_at(4, 400) == 0  # nothing past it: the file stays as it is
    again.close()


def test_tensorboard_drops_the_abandoned_history_on_resume(tmp_path) -> None:
    """A run logged steps 1-6 (600 tokens each), crashed, and resumes at its step-3 checkpoint: TensorBoard's
    reader must show steps 4-6 once, from the resumed run (it showed both histories, 1-6 then 4-6 again), on
    the step axis and on the tokens axis alike, as metrics.jsonl does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ep_train.train.metrics import MetricsLogger

    def rec(step: int, loss: float) -> dict:
        return {"step": step, "tokens": 600 * step, "loss": loss, "lm_loss": loss, "aux_loss": 0.0, "z_loss": 0.0,
                "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 1.0}

    first = MetricsLogger(tmp_path, True, 6)
    for step in range(1, 7):
        first.log(rec(step, 10.0 + step), {}, {})
    first.close()  # the crash
    again = MetricsLogger(tmp_path, True, 6)
    again.resume_at(3, 1800)
    for step in range(4, 7):
        again.log(rec(step, 20.0 + step), {}, {})
    again.close()
    by_step = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Scalars("train/loss")
    assert [(e.step, e.value) for e in by_step] == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0)]
    by_tokens = EventAccumulator(str(tmp_path / "tensorboard" / "by_tokens")).Reload().Scalars("train_by_tokens/loss")
    want = [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0)]
    assert [(e.step, e.value) for e in by_tokens] == [(600 * s, v) for s, v in want]


def test_a_run_begun_with_one_tensorboard_folder_keeps_its_tokens_curve_there(tmp_path) -> None:
    """A run that logged before the by-tokens series had their own folder (both in RUN/tensorboard) keeps
    writing them there after a resume, unpurged: a purge by step would drop its whole tokens curve (its
    x-axis is tokens), and a new folder would split it in two."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from ep_train.train.metrics import MetricsLogger

    old = SummaryWriter(str(tmp_path / "tensorboard"))  # the earlier layout: one folder
    for step in (1, 2):
        old.add_scalar("train/loss", 10.0 + step, step)
        old.add_scalar("train_by_tokens/loss", 10.0 + step, 600 * step)
    old.close()
    log = MetricsLogger(tmp_path, True, 6)
    log.resume_at(2, 1200)
    log.log({"step": 3, "tokens": 1800, "loss": 13.0, "lm_loss": 13.0, "aux_loss": 0.0, "z_loss": 0.0, "lr": 1e-3,
             "grad_norm": 1.0, "tokens_per_sec": 1.0}, {}, {})
    log.close()
    assert not (tmp_path / "tensorboard" / "by_tokens").exists()
    acc = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [e.step for e in acc.Scalars("train_by_tokens/loss")] == [600, 1200, 1800]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]


def test_metrics_jsonl_stays_json_when_a_step_is_not_finite(tmp_path, capsys) -> None:
    """A skipped step's loss and grad norm are NaN / inf: metrics.jsonl wrote NaN and Infinity, which JSON does not
    have (jq, JSON.parse and Go refuse the file); they are null now, with nonfinite saying why."""
    from ep_train.train.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, True, 10)
    log.log({"step": 3, "tokens": 30, "loss": float("nan"), "lm_loss": float("nan"), "aux_loss": 0.5, "z_loss": 0.1,
             "lr": 1e-3, "grad_norm": float("inf"), "tokens_per_sec": 1.0, "nonfinite": True},
            {1: [3, 1]}, {1: {"entropy": float("nan"), "dropped_frac": 0.0}})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[-1]
    assert "NaN" not in line and "Infinity" not in line, line
    got = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert got["loss"] is None and got["grad_norm"] is None and got["nonfinite"] is True
    assert got["aux_loss"] == 0.5 and got["moe"]["1"] == {"entropy": None, "dropped_frac": 0.0}
    assert "| loss nan | lm nan |" in capsys.readouterr().out  # the console still shows what happened


def test_a_truncated_file_is_named_as_unreadable_not_as_foreign(tmp_path) -> None:
    """safe_load keeps the cause: a cut-off torch file is 'could not be read (...): truncated', a pickle
    with a forbidden global is 'holds objects ep-train does not load' (tests/distributed/test_resume.py)."""
    import torch

    f = tmp_path / "optim_states.pt"
    torch.save({"w": torch.ones(1000)}, f)
    assert ck.safe_load(f)["w"].sum().item() == 1000
    f.write_bytes(f.read_bytes()[:1500])
    with pytest.raises(ck.CheckpointError, match=r"optim_states.pt' could not be read \(\w+Error: .+\); it is "
                                                 r"truncated or corrupted"):
        ck.safe_load(f)
    import pickle

    f.write_bytes(pickle.dumps({"x": print}, protocol=2))  # a pickle naming a function: refused by the allowlist
    with pytest.raises(ck.CheckpointError, match=r"holds objects ep-train does not load \(weights_only=True "
                                                 r"refused it: .*GLOBAL print"):
        ck.safe_load(f)


def test_pruning_reports_what_it_could_not_remove(tmp_path, monkeypatch, capsys) -> None:
    for s in (10, 20):
        _ckpt(tmp_path, s)
    real = ck.shutil.rmtree

    def stubborn(path, onerror=None, **kw):  # as on a filesystem that refuses one file
        onerror(None, str(Path(path) / "weights.pt"), (OSError, OSError(13, "Permission denied"), None))

    monkeypatch.setattr(ck.shutil, "rmtree", stubborn)
    assert [p.name for p in ck.prune(tmp_path, keep_last=1)] == ["step_00000010"]
    out = capsys.readouterr().out
    assert "WARNING: pruning could not remove all of" in out and "step_00000010" in out and "Permission denied" in out
    monkeypatch.setattr(ck.shutil, "rmtree", real)
