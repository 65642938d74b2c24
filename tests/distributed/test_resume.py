"""Checkpoints you can trust, end to end (torchrun, 2 processes, ZeRO-3 + CPU offload, EP 2).

One straight run and one run that saves at step 13 (not a multiple of the accumulation or logging
interval) are the references; the resumes below start from copies of the second run's checkpoints.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.distributed.harness import read_losses as losses
from tests.distributed.test_trainer import _kill_tree, launch, train

STEPS = 24
ARGS = ["--max_steps", str(STEPS), "--log_interval", "2", "--ep_size", "2"]  # accumulation 2 (8 = 2 x 2 x 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, built) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    straight, saved = root / "straight", root / "saved"
    a = launch(straight, built, 2, *ARGS)  # the two run side by side
    b = launch(saved, built, 2, *ARGS, "--save_interval", "13")
    assert a.wait(timeout=900) == 0, (root / "straight.log").read_text()[-3000:]
    assert b.wait(timeout=900) == 0, (root / "saved.log").read_text()[-3000:]
    return {"straight": straight, "saved": saved, "root": root}


def _copy(runs: dict[str, Path], name: str) -> Path:
    dst = runs["root"] / name
    shutil.copytree(runs["saved"] / "checkpoints", dst / "checkpoints")
    return dst


def _corrupt_middle(path: Path, n: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes((b ^ 0x5A) for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def test_corrupted_newest_falls_back_and_resume_from_step_13_is_exact(runs, built) -> None:
    """4 KB of garbage in the middle of an optimizer file of the newest checkpoint: refused, named, and
    --resume auto falls back to step 13; from there the run equals the straight one (steps 14..24)."""
    run = _copy(runs, "fallback")
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000024"
    victim = sorted((ckpts / "step_00000024").glob("*optim_states.pt"))[0]
    _corrupt_middle(victim)

    refused = _copy(runs, "no_fallback")
    _corrupt_middle(sorted((refused / "checkpoints" / "step_00000024").glob("*optim_states.pt"))[0])
    out = train(refused, built, 2, *ARGS, "--max_steps", "26", "--resume", "auto", "--resume_fallback", "false",
                expect_rc=1)
    assert "does not match its checksum" in out and victim.name in out and "resume_fallback" in out

    out = train(run, built, 2, *ARGS, "--max_steps", str(STEPS), "--resume", "auto", "--keep_last", "1")
    assert f"checkpoint step_00000024 refused: '{victim}' does not match its checksum" in out
    assert "falling back to step_00000013" in out and "resumed from" in out and "at step 13" in out
    ref, got = losses(runs["straight"]), losses(run)
    assert sorted(got) == [s for s in range(14, STEPS + 1, 2)]
    for step in got:  # 2e-8 measured; a wrong data position, LR step or RNG state gives 1e-4 or more
        assert abs(got[step] - ref[step]) <= 1e-6 * abs(ref[step]), (step, got[step], ref[step])
    # keep_last 1 pruned the older complete checkpoints; the newest is the one just written
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000024"]
    assert (ckpts / "latest").read_text() == "step_00000024"


def test_a_planted_pickle_payload_does_not_run(runs, built, tmp_path) -> None:
    """A model-state file replaced by a pickle that would run code when unpickled (manifest updated to
    match, as an attacker would): loading refuses it and the code never runs."""
    import pickle

    from ep_train.data.shards import sha256_file
    from ep_train.train.checkpoint import MANIFEST

    run = _copy(runs, "pickle")
    step = run / "checkpoints" / "step_00000013"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    target = step / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    target.write_bytes(pickle.dumps({"module": Payload()}))
    man = json.loads((step / MANIFEST).read_text())
    man["files"][target.name] = {"bytes": target.stat().st_size, "sha256": sha256_file(target)}
    (step / MANIFEST).write_text(json.dumps(man))
    out = train(run, built, 2, *ARGS, "--resume", str(step), expect_rc=1)
    assert "holds objects ep-train does not load" in out and target.name in out
    assert not marker.exists()


def test_resume_with_changed_fields(runs, built) -> None:
    """A changed learning rate is applied and logged (and config.json records it); a changed model is refused
    with a clear error comparing with ep_train_state.json (no DeepSpeed traceback). A stale stop marker does
    not survive a failed resume. (Another world or EP size is resharded: tests/distributed/test_reshard.py.)"""
    from ep_train.train.signals import STOP_MARKER

    run = _copy(runs, "changed")
    step13 = run / "checkpoints" / "step_00000013"
    (run / STOP_MARKER).write_text("{}")  # left by an earlier attempt
    out = train(run, built, 2, *ARGS, "--resume", str(step13), "--hidden_size", "32", expect_rc=1)
    assert "model.hidden_size: 64 -> 32" in out
    assert not (run / STOP_MARKER).exists()

    out = train(run, built, 2, *ARGS, "--resume", str(step13), "--max_steps", "14", "--learning_rate", "0.0005")
    assert "applying changed train.learning_rate: 0.001 -> 0.0005" in out
    # step 24 belongs to the history this resume leaves: set aside whole (not pruned, not written over)
    aside = run / "checkpoints" / "abandoned" / "step_00000024"
    assert f"moved to {aside}" in out and not (run / "checkpoints" / "step_00000024").exists()
    from ep_train.train.checkpoint import verify

    assert verify(aside) is None
    assert (run / "checkpoints" / "latest").read_text() == "step_00000014"
    rec = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r][-1]
    from ep_train.train.optim import lr_factor

    assert math.isclose(rec["lr"], 0.0005 * lr_factor(13, 4, 14, 0.1), rel_tol=1e-9), rec
    assert json.loads((run / "config.json").read_text())["train"]["learning_rate"] == 0.0005


def test_a_finished_run_started_again_writes_nothing(runs, built) -> None:
    """A run resumed at max_steps (a requeue after a stop notice during the last step, or the same command
    run twice) trains nothing and leaves its checkpoint as it was: it saved step 24 again, in place, into
    the folder `latest` names (a kill mid-save then left no good checkpoint with keep_last 1)."""
    run = _copy(runs, "finished")
    step24 = run / "checkpoints" / "step_00000024"
    before = {f.name: f.stat().st_mtime_ns for f in step24.rglob("*") if f.is_file()}
    out = train(run, built, 2, *ARGS, "--resume", "auto")
    assert "at step 24" in out and "saved checkpoint" not in out
    assert {f.name: f.stat().st_mtime_ns for f in step24.rglob("*") if f.is_file()} == before


def _save_at_15_with_a_fault(runs, built, name: str, fault: int | str, rank: int) -> str:
    """Resume the saved run from step 13 (latest) to 15 with ``fault`` on ``rank`` (tests.distributed.limited_rank);
    the save at step 15 must stop every rank (within 300 s: before, some hung) and leave step 13 latest."""
    run = _copy(runs, name)
    shutil.rmtree(run / "checkpoints" / "step_00000024")
    (run / "checkpoints" / "latest").write_text("step_00000013")
    proc = launch(run, built, 2, *ARGS, "--resume", "auto", "--max_steps", "15", fsize_limit=fault, limited_rank=rank)
    try:
        rc = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise
    out = (run.parent / f"{run.name}.log").read_text()
    assert rc != 0, out[-3000:]
    assert "step_00000013 is intact and still latest" in out
    assert not (run / "checkpoints" / "step_00000015").exists()
    assert (run / "checkpoints" / "latest").read_text() == "step_00000013"
    return out


def test_a_save_that_cannot_be_written_keeps_the_previous_checkpoint(runs, built) -> None:
    """A file-size limit smaller than the optimizer files on rank 1 alone (a full disk on one node): every rank
    stops with one message naming the folder, the failing rank and the bytes (before, rank 0 waited in
    DeepSpeed's barrier for a rank that had left the save: a hang); the partial folder is gone and `latest`
    still names step 13."""
    out = _save_at_15_with_a_fault(runs, built, "full_disk", 1 << 20, 1)
    assert "saving checkpoint" in out and "rank 1: " in out and "rank 0: " not in out and "bytes needed" in out


def test_a_failed_recovery_script_copy_on_rank_0_stops_every_rank(runs, built) -> None:
    """DeepSpeed copies zero_to_fp32.py into the checkpoint on rank 0 with shutil, outside its checkpoint engine; a
    full disk there raised on rank 0 alone while rank 1 waited in DeepSpeed's barrier (a hang until the process
    group's timeout). Now the failure is agreed like a failed write: both ranks stop, step 13 stays latest."""
    out = _save_at_15_with_a_fault(runs, built, "script_copy", "copyfile", 0)
    assert "rank 0: " in out and "zero_to_fp32.py" in out and "No space left" in out, out[-3000:]


def test_two_single_process_runs_at_once_do_not_meet_on_a_port(tmp_path, built) -> None:
    """No launcher, no MASTER_PORT: each picks a free port (a fixed default made the second one hang)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "ep_train.train", "--config", "configs/tiny.yaml",
                               "--run-dir", str(tmp_path / f"r{i}"), "--data_dir", str(built), "--seq_len", "32",
                               "--ep_size", "1", "--max_steps", "2", "--warmup_steps", "1"],
                              cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
        assert "step 2/2" in out


def test_init_from_hugging_face_streams_each_ranks_share(tmp_path, built) -> None:
    """--init_from a transformers Mixtral (shaped like configs/tiny.yaml) at world 2, EP 2: the first step's
    loss equals the same batch through from_hf_mixtral in one process; a mismatched run config is refused."""
    import torch
    transformers = pytest.importorskip("transformers")

    from ep_train.config import load_config, parse_overrides
    from ep_train.data.loader import DistributedBatches, TokenWindows
    from ep_train.interop.hf import from_hf_mixtral
    from tests.distributed.test_trainer import CONFIG, COMMON

    torch.manual_seed(0)
    hf_cfg = transformers.MixtralConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=256, rope_theta=1e6)
    hf = transformers.MixtralForCausalLM(hf_cfg)
    with torch.no_grad():
        for layer in hf.model.layers:  # decisive routing, so a wrong expert shows in the loss
            layer.mlp.gate.weight.normal_(std=0.5)
    hf.save_pretrained(tmp_path / "hf")

    run = tmp_path / "run"
    train(run, built, 2, "--ep_size", "2", "--max_steps", "1", "--warmup_steps", "1", "--init_from", str(tmp_path / "hf"))
    got = losses(run)[1]

    cfg = load_config(CONFIG, parse_overrides(["--data_dir", str(built), *COMMON]))
    model, _ = from_hf_mixtral(tmp_path / "hf")
    micro = DistributedBatches(TokenWindows(built, "train", cfg.data.seq_len), cfg.train.batch_size,
                               cfg.train.micro_batch_size, 0, 1, seed=cfg.train.seed).next()
    model.moe_cfg.aux_loss_weight = cfg.moe.aux_loss_weight  # the run's loss weights, not HF's
    model.moe_cfg.router_z_loss_weight = cfg.moe.router_z_loss_weight
    with torch.no_grad():
        want = sum(model(x, y).loss.item() for x, y in micro) / len(micro)
    assert abs(got - want) <= 1e-5 * abs(want), (got, want)

    out = train(tmp_path / "bad", built, 2, "--ep_size", "2", "--max_steps", "1", "--warmup_steps", "1",
                "--init_from", str(tmp_path / "hf"), "--hidden_size", "32", expect_rc=1)
    assert "is another model than the run config: model.hidden_size: run 32 vs checkpoint 64" in out

    # Resumed, the run reads its weights from its checkpoint alone: with the Hugging Face folder gone (moved),
    # step 2 equals that of a run that went straight on from the folder.
    straight = tmp_path / "straight"
    train(straight, built, 2, "--ep_size", "2", "--max_steps", "2", "--warmup_steps", "1", "--init_from",
          str(tmp_path / "hf"))
    (tmp_path / "hf").rename(tmp_path / "hf_moved")
    train(run, built, 2, "--ep_size", "2", "--max_steps", "2", "--warmup_steps", "1", "--init_from",
          str(tmp_path / "hf"), "--resume", "auto")
    assert losses(run)[2] == losses(straight)[2], (losses(run), losses(straight))
