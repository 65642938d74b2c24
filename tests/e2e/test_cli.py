"""`ep-train` commands as users run them (fast ones; training runs live in tests/distributed)."""

from __future__ import annotations

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
