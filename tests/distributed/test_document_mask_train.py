"""data.document_mask + reset_positions + eod_mask_loss under EP 2, ZeRO-3 + CPU offload and activation
checkpointing at world 2: the losses equal the single-process reference with the same masking (its loss
mask written out there), and differ from the reference without each of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ep_train.config import load_config, parse_overrides
from ep_train.data.loader import DistributedBatches, TokenWindows
from tests.conftest import STDLIB
from tests.distributed.reference_train import reference_losses
from tests.distributed.test_trainer import COMMON, CONFIG, losses, train

STEPS = 6


@pytest.fixture(scope="module")
def short_docs(tokenizer, tmp_path_factory) -> Path:
    """Many short documents (each paragraph of some stdlib modules, as jsonl rows): windows span several."""
    from ep_train.data.prep import build

    out = tmp_path_factory.mktemp("short_docs")
    # json and urllib: enough text for 6 steps of training windows and a 10% validation split
    files = sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "urllib").glob("*.py"))
    rows = [json.dumps({"text": para}) for f in files
            for para in f.read_text().split("\n\n") if para.strip()]
    (out / "paragraphs.jsonl").write_text("\n".join(rows) + "\n")
    build([str(out / "paragraphs.jsonl")], str(tokenizer), str(out / "shards"), workers=1, val_fraction=0.1,
          progress=False)
    return out / "shards"


def test_document_mask_trains_like_the_reference(short_docs, tmp_path) -> None:
    built = short_docs
    args = ["--ep_size", "2", "--max_steps", str(STEPS), "--activation_checkpointing", "true",
            "--document_mask", "true", "--reset_positions", "true", "--eod_mask_loss", "true", "--seq_len", "256",
            "--eval_interval", str(STEPS), "--eval_batches", "2"]
    run = tmp_path / "masked"
    train(run, built, 2, *args)
    cfg = load_config(CONFIG, parse_overrides([*COMMON, "--data_dir", str(built), *args]))
    eos = json.loads((built / "manifest.json").read_text())["tokenizer"]["eos_id"]
    batches = DistributedBatches(TokenWindows(built, "train", 256), cfg.train.batch_size, 2, 0, 1, cfg.train.seed)
    boundaries = sum(int((x == eos).sum()) for _ in range(STEPS) for x, _ in batches.next())
    assert boundaries >= 2 * STEPS * cfg.train.batch_size  # the windows really pack several documents
    per_round = cfg.train.micro_batch_size * 2  # a micro-batch on each of the 2 ranks
    # eval_batches (2) global batches, cut to what the split holds (whole rounds)
    val_windows = min(2 * cfg.train.batch_size, TokenWindows(built, "val", 256).num_windows // per_round * per_round)
    assert val_windows >= per_round
    val: list[float] = []
    ref = reference_losses(cfg, STEPS, val_windows=val_windows, val=val)
    got = losses(run)
    assert max(abs(got[s] - ref[s - 1]) / abs(ref[s - 1]) for s in got) < 1e-4, (got, ref)
    # Validation: the mean over every counted target, whatever each micro-batch's count (EOS masking)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    got_val = [r["val_loss"] for r in logged if "val_loss" in r]
    # (a mean of the micro-batches' means differs here by 2.8e-6 relative; this one by about 1e-8)
    assert len(got_val) == 1 and abs(got_val[0] - val[0]) < 5e-7 * val[0], (got_val, val)
    cfg.data.eod_mask_loss = False
    no_loss_mask = reference_losses(cfg, STEPS)  # each masking changes what is learned: the comparison can fail
    assert max(abs(p - r) for p, r in zip(no_loss_mask, ref)) > 1e-4
    cfg.data.document_mask = cfg.data.reset_positions = False
    plain = reference_losses(cfg, STEPS)
    assert max(abs(p - r) for p, r in zip(plain, no_loss_mask)) > 1e-4
