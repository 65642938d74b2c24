"""A run trained at world 2, EP 2 under ZeRO-3 + CPU offload, exported with `to-hf`: Hugging Face's
MixtralForCausalLM computes what ep-train computes, and what the trainer itself measured; imported back with
`from-hf`, the trainer starts from exactly those weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ep_train.config import load_config  # noqa: E402
from ep_train.data.loader import TokenWindows  # noqa: E402
from ep_train.interop.hf import from_hf  # noqa: E402
from ep_train.interop.hf_export import to_hf  # noqa: E402
from ep_train.interop.universal import UniversalSource, find_checkpoint, run_config, to_universal  # noqa: E402
from ep_train.model.transformer import build_model  # noqa: E402
from tests.distributed.reference_train import val_loss  # noqa: E402
from tests.distributed.test_trainer import CONFIG, train  # noqa: E402

WORLD = 2


def val_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


def trainer_eval_loss(model: torch.nn.Module, cfg, data: Path) -> float:
    """Trainer.evaluate's number from ``model``: the same held-out windows (the first eval_batches global batches,
    cut to whole rounds of a micro-batch per rank), the mean over every counted target, written out by the
    single-process reference."""
    t = cfg.train
    val = TokenWindows(data, "val", cfg.data.seq_len)
    per_round = t.micro_batch_size * WORLD
    n = min(t.batch_size * t.eval_batches, val.num_windows // per_round * per_round)
    return val_loss(model, val, n, None, cfg)


def test_world2_ep2_export_matches_hugging_face(tmp_path, built) -> None:
    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    train(run, built, WORLD, "--ep_size", "2", "--max_steps", "3", "--warmup_steps", "1", "--eval_interval", "3")
    to_hf(run, hf_dir, max_shard_size="200KB")
    hf, info = transformers.MixtralForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    hf.eval()
    step = find_checkpoint(run)
    cfg = run_config(step)
    ref = build_model(cfg.model, cfg.moe, source=UniversalSource(to_universal(step))).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 32))
    with torch.no_grad():
        assert (hf(ids).logits - ref(ids).logits).abs().max().item() < 1e-4
    # Independent of the universal conversion: the loss the distributed ZeRO-3/EP engine measured on the
    # validation split after its last step, recomputed by Hugging Face's model from the exported files.
    (logged,) = val_records(run)
    hf_val = trainer_eval_loss(hf, cfg, built)
    assert abs(hf_val - logged["val_loss"]) < 1e-4, (hf_val, logged)
    # and the trained weights, not the initial ones: apart by more than twice the matching tolerance above (3 steps
    # of a cosine that ends at min_lr_ratio on the last step move the loss by ~8e-4 here)
    assert abs(hf_val - trainer_eval_loss(build_model(cfg.model, cfg.moe, seed=1).eval(), cfg, built)) > 2e-4

    # Back in: a run made by from-hf starts from these weights (a learning rate of 1e-30 leaves them as
    # they are, so the trainer's validation loss after one step is the exported model's).
    run2 = tmp_path / "run2"
    cfg_file = from_hf(hf_dir, run2, CONFIG, [("data_dir", str(built)), ("seq_len", 32)])
    assert load_config(cfg_file).train.init_from == str((run2 / "init").resolve())
    train(run2, built, WORLD, "--config", str(cfg_file), "--max_steps", "1", "--warmup_steps", "0",
          "--learning_rate", "1e-30", "--eval_interval", "1")
    (again,) = val_records(run2)
    assert abs(again["val_loss"] - hf_val) < 1e-4, (again, hf_val)
