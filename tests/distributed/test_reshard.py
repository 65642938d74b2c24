"""Resume at another world / EP size (torchrun, ZeRO-3 + CPU offload), against runs that never stopped.

Two straight runs of 8 steps save at step 4: one at world 2 / EP 2, one at world 1 / EP 1. Copies of
their step-4 checkpoints resume at other shapes (rank 0 converts them to DeepSpeed's universal form,
every rank loads its share); steps 5..8 must give the straight run's losses. The global batch stays 8,
so only the gradient accumulation changes (2 at world 2, 4 at world 1).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.distributed.harness import read_losses as losses
from tests.distributed.test_trainer import _kill_tree, launch, train

STEPS = 8
# A router learning-rate multiplier and weight decay: DeepSpeed's universal load gives every optimizer group
# group 0's settings (restored by ep_train.train.resume.restore_group_tags); with the multiplier at 1 that
# loss shows only as 4e-6 by step 8, with 4 as 1.1e-4 (measured); the fixed resumes differ by 5e-8 at most.
ARGS = ["--max_steps", str(STEPS), "--warmup_steps", "4", "--save_interval", "4", "--router_lr_multiplier", "4",
        "--weight_decay", "0.1"]
STEP4 = "checkpoints/step_00000004"


def _wait(root: Path, procs: dict[str, object]) -> None:
    for name, proc in procs.items():
        try:
            rc = proc.wait(timeout=600)
        except Exception:
            _kill_tree(proc)
            raise
        assert rc == 0, (root / f"{name}.log").read_text()[-5000:]


def _copy_step4(run: Path, dst: Path) -> Path:
    """A private copy of a run's step-4 checkpoint: each resume converts and writes its own."""
    shutil.copytree(run / STEP4, dst / STEP4)
    return dst / STEP4


@pytest.fixture(scope="module")
def straight(tmp_path_factory, built) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reshard")
    runs = {"w2ep2": root / "w2ep2", "w1ep1": root / "w1ep1", "w2ep2_no_offload": root / "w2ep2_no_offload"}
    _wait(root, {"w2ep2": launch(runs["w2ep2"], built, 2, *ARGS, "--ep_size", "2"),
                 "w1ep1": launch(runs["w1ep1"], built, 1, *ARGS, "--ep_size", "1")})
    _wait(root, {"w2ep2_no_offload": launch(runs["w2ep2_no_offload"], built, 2, *ARGS, "--ep_size", "2",
                                            "--ds_config", "zero3")})
    return {**runs, "root": root}


@pytest.fixture(scope="module")
def resumed(straight, built) -> dict[str, Path]:
    """The three resumes side by side, each from its own copy of a step-4 checkpoint, into a fresh run dir."""
    root = straight["root"]
    # The last two train without optimizer offload (torch's AdamW instead of CPU Adam): the universal loader
    # leaves CPU Adam's int step counts, which torch's Adam must get as tensors, and from a checkpoint torch's
    # AdamW wrote it gives every sub-group one shared step tensor, which AdamW would advance once per
    # sub-group and step (resume.separate_steps).
    shapes = {"w2ep2_to_w1ep1": ("w2ep2", 1, "1", []), "w2ep2_to_w2ep1": ("w2ep2", 2, "1", []),
              "w1ep1_to_w2ep2": ("w1ep1", 2, "2", []),
              "w2ep2_to_w1ep1_no_offload": ("w2ep2", 1, "1", ["--ds_config", "zero3"]),
              "w2ep2_no_offload_to_w1ep1": ("w2ep2_no_offload", 1, "1", ["--ds_config", "zero3"]),
              # at the same shape, the optimizer offload switched on and off: loaded through the universal form
              # (before: switched on, the first step failed in CPU Adam, KeyError 'bias_correction')
              "w2ep2_no_offload_to_w2ep2_offload": ("w2ep2_no_offload", 2, "2", []),
              "w2ep2_to_w2ep2_no_offload": ("w2ep2", 2, "2", ["--ds_config", "zero3"])}
    procs, runs = {}, {}
    for name, (src, nproc, ep, extra) in shapes.items():
        ckpt = _copy_step4(straight[src], root / f"{name}_ckpt")
        if name == "w2ep2_to_w2ep1":  # converted ahead of time by the offline form; the resume reuses it
            p = subprocess.run([sys.executable, "-m", "ep_train.cli", "convert", "reshard", "--checkpoint", str(ckpt)],
                               capture_output=True, text=True, timeout=300)
            assert p.returncode == 0 and "resumes at any world size" in p.stdout, p.stdout + p.stderr
            runs["offline_stamp"] = ckpt / "universal" / "zero"
            runs["offline_mtime"] = runs["offline_stamp"].stat().st_mtime_ns  # type: ignore[assignment]
        runs[name] = root / name
        procs[name] = launch(runs[name], built, nproc, *ARGS, "--ep_size", ep, "--resume", str(ckpt), *extra)
    _wait(root, procs)
    return runs


def _assert_matches(got: dict[int, float], ref: dict[int, float]) -> None:
    assert sorted(got) == list(range(5, STEPS + 1))
    for step in got:  # measured <= 3.5e-8; without the group fix 1.1e-4, a wrong data position more
        assert abs(got[step] - ref[step]) <= 1e-6 * abs(ref[step]), (step, got[step], ref[step])


@pytest.mark.parametrize("name, ref", [("w2ep2_to_w1ep1", "w2ep2"), ("w2ep2_to_w2ep1", "w2ep2"),
                                       ("w1ep1_to_w2ep2", "w1ep1"), ("w2ep2_to_w1ep1_no_offload", "w2ep2"),
                                       ("w2ep2_no_offload_to_w1ep1", "w2ep2_no_offload")])
def test_resume_at_another_shape_continues_the_run(resumed, straight, name, ref) -> None:
    _assert_matches(losses(resumed[name]), losses(straight[ref]))
    log = (resumed[name].parent / f"{name}.log").read_text()
    assert "resumed from" in log and "at step 4 (32 samples), resharded (" in log, log[-3000:]


@pytest.mark.parametrize("name, ref, change", [("w2ep2_no_offload_to_w2ep2_offload", "w2ep2_no_offload", "none -> cpu"),
                                               ("w2ep2_to_w2ep2_no_offload", "w2ep2", "cpu -> none")])
def test_an_optimizer_offload_change_continues_the_run(resumed, straight, name, ref, change) -> None:
    """Torch's AdamW (no offload) and DeepSpeed's CPU Adam keep different group keys and step counts; the
    resume loads through the universal form, and the run continues the straight run's losses."""
    _assert_matches(losses(resumed[name]), losses(straight[ref]))
    log = (resumed[name].parent / f"{name}.log").read_text()
    assert f"was written with another optimizer offload: {change}" in log, log[-3000:]
    assert "at step 4 (32 samples)" in log and "resharded" not in log.split("resumed from")[1].split("\n")[0]


def test_a_zero_stage_change_is_refused(straight, built, tmp_path) -> None:
    """ZeRO-2's files are not ZeRO-3's: refused by name before DeepSpeed reads them (before: an AssertionError
    deep in DeepSpeed's loader). A checkpoint that predates the recorded layout is judged by its config."""
    ckpt = _copy_step4(straight["w2ep2"], tmp_path / "stage")
    out = train(tmp_path / "zero2_run", built, 1, *ARGS, "--ep_size", "1", "--ds_config", "zero2", "--resume",
                str(ckpt), expect_rc=1)
    assert "(written under ZeRO stage 3) with parallel.ds_config of stage 2" in out, out[-3000:]
    assert "zero3_offload" in out and not (ckpt / "universal").exists()

    import json

    from ep_train.train.resume import saved_zero_layout

    state = json.loads((ckpt / "ep_train_state.json").read_text())
    assert state["zero"] == {"stage": 3, "offload_optimizer": "cpu"}
    del state["zero"]  # as written before the field existed: the config's ds_config (zero3_offload) says it
    assert saved_zero_layout(state) == {"stage": 3, "offload_optimizer": "cpu"}


def test_the_offline_conversion_is_reused(resumed) -> None:
    """ep-train convert reshard wrote the universal form; the resume used it instead of converting again."""
    assert resumed["offline_stamp"].stat().st_mtime_ns == resumed["offline_mtime"]


def test_the_conversion_is_kept_and_the_checkpoint_still_verifies(resumed, straight) -> None:
    """The universal form stays in the step folder (a later resume reuses it); the manifest check ignores it."""
    from ep_train.train.checkpoint import verify

    step4 = straight["root"] / "w2ep2_to_w1ep1_ckpt" / STEP4
    assert (step4 / "universal" / "zero").is_dir() and not (step4 / "universal.tmp").exists()
    assert verify(step4, full=True) is None


def test_an_ep_size_that_does_not_divide_the_experts_is_refused(straight, built, tmp_path) -> None:
    out = train(tmp_path / "ep3", built, 1, *ARGS, "--ep_size", "3", "--resume", str(straight["w2ep2"] / STEP4),
                expect_rc=1)
    assert "parallel.ep_size" in out and "must divide" in out


def test_a_partial_checkpoint_is_refused_at_another_shape(straight, built, tmp_path) -> None:
    """No manifest (a save that did not finish): refused by name before any conversion. With verification
    off and a rank's optimizer file gone, rank 0's conversion fails and both ranks stop with its error."""
    ckpt = _copy_step4(straight["w2ep2"], tmp_path / "partial")
    (ckpt / "manifest.json").unlink()
    out = train(tmp_path / "partial_run", built, 1, *ARGS, "--ep_size", "1", "--resume", str(ckpt), expect_rc=1)
    assert "has no manifest.json: it is incomplete" in out
    assert not (ckpt / "universal").exists()

    ckpt = _copy_step4(straight["w2ep2"], tmp_path / "damaged")
    (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    out = train(tmp_path / "damaged_run", built, 2, *ARGS, "--ep_size", "1", "--resume", str(ckpt),
                "--verify_checkpoint", "off", expect_rc=1, timeout=300)
    failed = "to DeepSpeed's universal form (to resume at another world or EP size) failed: RuntimeError: ZeRO-3"
    assert out.count(failed) == 2, out[-5000:]  # the same error on both ranks
    assert not (ckpt / "universal").exists()


def _stock_universal(step: Path, out: Path) -> Path:
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    from ep_train.train.checkpoint import only_safe_loads

    with only_safe_loads():
        ds_to_universal.main(argparse.Namespace(input_folder=str(step), output_folder=str(out),
                                                num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                                strict=True, inject_missing_state=False))
    return out


def _assert_same_universal(stock: Path, ours: Path) -> None:
    """File by file, tensor by tensor (bench.offline_memory.differences: the bench compares the same way at 583M);
    ep-train's optimizer_state.pt keeps only what the universal loader reads (the resumes above load it)."""
    from bench.offline_memory import differences

    files = [str(f.relative_to(stock)) for f in stock.rglob("*") if f.is_file()]
    assert sum("experts" in f for f in files) >= 3 * 3 * 2  # w1, w2, w3 x (fp32, exp_avg, exp_avg_sq) x 2 layers
    assert differences(stock, ours) == []


@pytest.mark.parametrize("which", ["w2ep2 step 4", "w1ep1 step 4", "w2ep1 step 8"])
def test_the_bounded_memory_conversion_writes_what_deepspeeds_converter_writes(straight, resumed, which,
                                                                               tmp_path) -> None:
    """ep-train runs DeepSpeed's converter one expert parameter at a time from mapped files
    (universal._bounded_memory); its output must be the stock converter's."""
    from ep_train.interop.universal import to_universal

    step = {"w2ep2 step 4": straight["w2ep2"] / STEP4, "w1ep1 step 4": straight["w1ep1"] / STEP4,
            "w2ep1 step 8": resumed["w2ep2_to_w2ep1"] / "checkpoints" / "step_00000008"}[which]
    # Written in torch's zip format, as the run's first checkpoints are; a resumed run's engine saved in the legacy
    # format once (checkpoint.load gave it DeepSpeed's checkpoint engine without the config), which cannot be mapped.
    assert all(zipfile.is_zipfile(f) for f in step.glob("*.pt"))
    _assert_same_universal(_stock_universal(step, tmp_path / "stock"), to_universal(step, tmp_path / "ours"))


def test_a_checkpoint_in_torchs_legacy_format_converts_too(straight, tmp_path) -> None:
    """Files in torch's legacy format (DeepSpeed's checkpoint_serialization: false, or a resumed run before the
    engine kept its config) cannot be memory-mapped: read whole, the conversion is the same."""
    import torch

    from ep_train.interop.universal import to_universal

    step = _copy_step4(straight["w2ep2"], tmp_path / "legacy")
    for f in step.glob("*_states.pt"):
        torch.save(torch.load(f, weights_only=False), f, _use_new_zipfile_serialization=False)
        assert not zipfile.is_zipfile(f)
    _assert_same_universal(_stock_universal(straight["w2ep2"] / STEP4, tmp_path / "stock"),
                           to_universal(step, tmp_path / "ours"))
