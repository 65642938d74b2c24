"""`ep-train analyze-experts` on a tiny trained run: report, heatmaps, --compare, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.harness import free_port

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ep_train.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


@pytest.fixture(scope="module")
def run(built, tokenizer, tmp_path_factory) -> Path:
    """4 steps of configs/tiny.yaml in one process, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("analyze") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
           "-m", "ep_train.train", "--config", str(ROOT / "configs/tiny.yaml"), "--run-dir", str(out),
           "--data_dir", str(built), "--tokenizer", str(tokenizer), "--ep_size", "1", "--seq_len", "32",
           "--max_steps", "4", "--warmup_steps", "1", "--save_interval", "2", "--learning_rate", "0.01"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def test_report_heatmap_and_compare(run: Path, built: Path, tmp_path: Path) -> None:
    out = tmp_path / "analysis"
    step2 = run / "checkpoints" / "step_00000002"
    p = _cli("analyze-experts", "--checkpoint", str(run), "--data", str(built), "--output", str(out),
             "--tokens", "2000", "--compare", str(step2))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "layer 0: load CV" in p.stdout and "top-1 unchanged" in p.stdout
    for png in ("heatmap.png", "heatmap_change.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads((out / "report.json").read_text())
    assert sorted(rep["layers"]) == ["0", "1"]  # tiny.yaml: every layer MoE
    for layer in rep["layers"].values():
        assert abs(sum(layer["share"]) - 1.0) < 1e-9
        assert len(layer["experts"]) == 4 and all(ex["top_tokens"] for ex in layer["experts"])
        co = layer["co_selection"]  # K = 2: every token chose two distinct experts
        assert sum(co[i][i] for i in range(4)) == 2 * layer["tokens"]
        assert 0 < layer["entropy"] <= layer["entropy_max"] + 1e-9
    for c in rep["compare"].values():
        assert 0 <= c["top1_agreement"] <= 1 and abs(sum(c["share_change"])) < 1e-9
    md = (out / "report.md").read_text()
    assert "## Layer 1" in md and "| expert | share |" in md


def test_bad_input_is_refused(run: Path, built: Path, tmp_path: Path) -> None:
    p = _cli("analyze-experts", "--checkpoint", str(tmp_path / "nope"), "--data", str(built), "--output",
             str(tmp_path / "o"))
    assert p.returncode == 2 and "does not exist" in p.stderr, p.stderr[-2000:]
    p = _cli("analyze-experts", "--checkpoint", str(run), "--data", str(tmp_path), "--output", str(tmp_path / "o"))
    assert p.returncode == 2 and "manifest" in p.stderr, p.stderr[-2000:]
    # windows longer than the model's context: positions it never trained on
    p = _cli("analyze-experts", "--checkpoint", str(run), "--data", str(built), "--output", str(tmp_path / "o"),
             "--seq-len", "100000")
    assert p.returncode == 2 and "--seq-len = 100000 is longer than the model's context" in p.stderr, p.stderr[-2000:]
