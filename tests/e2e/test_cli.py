"""`ep-train` commands as users run them (fast ones; training runs live in tests/distributed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def ep_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ep_train.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_plan_mixtral_8x7b() -> None:
    p = ep_train("plan", "--config", "configs/mixtral_8x7b.yaml", "--nodes", "4", "--gpus-per-node", "8")
    assert p.returncode == 0, p.stderr
    assert "46.70B" in p.stdout and "12.88B" in p.stdout and "sparsity" in p.stdout
    assert "ZeRO-3 + CPU offload" in p.stdout


def test_plan_and_train_refuse_bad_values_by_name(tmp_path) -> None:
    p = ep_train("plan", "--config", "configs/mixtral_8x7b.yaml", "--top_k", "9")
    assert p.returncode == 2 and "moe.num_experts_per_token = 9" in p.stderr
    p = ep_train("plan", "--config", "configs/mixtral_8x7b.yaml", "--nodes", "1", "--gpus-per-node", "6")
    assert p.returncode == 2 and "parallel.ep_size" in p.stderr and "world size (6)" in p.stderr
    p = subprocess.run([sys.executable, "-m", "ep_train.train", "--config", "configs/tiny.yaml", "--num_expert", "4"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 2 and "unknown config key 'num_expert'" in p.stderr
    p = subprocess.run([sys.executable, "-m", "ep_train.train", "--config", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 2 and "missing.yaml" in p.stderr and "does not exist" in p.stderr


def test_check_command_validates_like_the_trainer(built, tmp_path) -> None:
    p = ep_train("check", "--config", "configs/tiny.yaml", "--world-size", "2", "--run-dir", "runs/x", "--top_k", "1",
                 "--data_dir", str(built))
    assert p.returncode == 0 and "config ok" in p.stdout, p.stderr
    # a training launch (--run-dir) without data, or with an init_from folder that is not a model: refused here,
    # once, not in every worker
    p = ep_train("check", "--config", "configs/tiny.yaml", "--run-dir", "runs/x")
    assert p.returncode == 2 and "data.data_dir is not set" in p.stderr, p.stderr
    p = ep_train("check", "--config", "configs/tiny.yaml", "--init_from", str(tmp_path))
    assert p.returncode == 2 and f"train.init_from = '{tmp_path}'" in p.stderr and "config.json" in p.stderr, p.stderr
    # a bad YAML value in an override, and YAML's boolean reading of the documented word off
    p = ep_train("check", "--config", "configs/tiny.yaml", "--moe.moe_layers", "[1,3")
    assert p.returncode == 2 and "override --moe.moe_layers '[1,3' is not a valid YAML value" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    p = ep_train("check", "--config", "configs/tiny.yaml", "--train.verify_checkpoint", "off")
    assert p.returncode == 0, p.stderr
    p = ep_train("check", "--config", "configs/tiny.yaml", "--world-size", "3")
    assert p.returncode == 2 and "ep-train check: error: parallel.ep_size = 2" in p.stderr, p.stderr


def test_commands_refuse_a_field_given_twice(tmp_path) -> None:
    """check (which the launch scripts run first), plan and train kept the last of two values for one field,
    also under two names; a config file already refused that."""
    run = tmp_path / "run"
    for command in (["check"], ["plan", "--device", "cpu"], ["train", "--run-dir", str(run)]):
        p = ep_train(*command, "--config", "configs/tiny.yaml", "--lr", "0.1", "--seed", "3",
                     "--train.learning_rate=2e-4")
        assert p.returncode == 2 and "Traceback" not in p.stderr, (command, p.stderr)
        assert f"ep-train {command[0]}: error: override --train.learning_rate '2e-4' sets train.learning_rate again " \
               "(already --lr '0.1'); give the field once" in p.stderr, (command, p.stderr)
    assert not run.exists()


def test_torch_extensions_dir_is_per_environment(tmp_path) -> None:
    """DeepSpeed's JIT ops (CPU Adam, shm_comm) build under the environment's own prefix unless the user
    chose a folder: torch's JIT build folder (what DeepSpeed's op builders load) follows it."""
    code = ("import os, ep_train; from torch.utils.cpp_extension import _get_build_directory; "
            "print(os.environ['TORCH_EXTENSIONS_DIR']); print(os.path.dirname(_get_build_directory('cpu_adam', False)))")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    want = os.path.join(os.path.realpath(sys.prefix), "torch_extensions")
    assert p.stdout.split() == [want, want]
    mine = str(tmp_path / "my_extensions")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**env, "TORCH_EXTENSIONS_DIR": mine})
    assert p.returncode == 0 and p.stdout.split() == [mine, mine], p.stdout + p.stderr


def test_named_ds_configs_travel_in_the_wheel(tmp_path) -> None:
    """A non-editable install must still resolve `zero3_offload` and friends: they are package data."""
    import zipfile

    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = tmp_path.glob("ep_train-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for cfg in ("zero3_offload", "zero3", "zero2", "zero3_nvme"):
        assert f"ep_train/ds_configs/{cfg}.json" in names, sorted(n for n in names if "ds_configs" in n)
    # and the resolver looks inside the package, not at the repository's top-level folder
    from ep_train.parallel.zero import resolve_ds_config

    assert resolve_ds_config("zero3_offload").parent.parent.name == "ep_train"
