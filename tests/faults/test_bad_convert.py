"""`ep-train convert` refuses bad input with one clear line (exit 2), before doing any slow work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ep_train.cli import main  # noqa: E402
from ep_train.config import Config, config_to_dict  # noqa: E402

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)


def run(capsys, *args: str) -> str:
    capsys.readouterr()  # drop what setting up wrote (save_pretrained's progress bars)
    assert main(["convert", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ep-train convert: error: ") and err.count("\n") == 1, err
    return err


def fake_checkpoint(root: Path, cfg: Config, manifest: bool = True) -> Path:
    """A step folder with the run's state (and a manifest listing it): what the checks read first."""
    from ep_train.data.shards import sha256_file

    step = root / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / "ep_train_state.json").write_text(json.dumps({"step": 1, "config": config_to_dict(cfg)}))
    if manifest:
        f = step / "ep_train_state.json"
        (step / "manifest.json").write_text(json.dumps(
            {"files": {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}}}))
        (root / "checkpoints" / "latest").write_text(step.name)
    return step


def test_to_hf_missing_and_partial_checkpoints(tmp_path, capsys) -> None:
    assert "does not exist" in run(capsys, "to-hf", "--checkpoint", str(tmp_path / "nope"), "--output",
                                   str(tmp_path / "o"))
    step = fake_checkpoint(tmp_path / "run", Config(), manifest=False)  # a save that did not finish
    assert "no complete checkpoint" in run(capsys, "to-hf", "--checkpoint", str(tmp_path / "run"), "--output",
                                           str(tmp_path / "o"))
    assert "no manifest.json" in run(capsys, "to-hf", "--checkpoint", str(step), "--output", str(tmp_path / "o"))
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.json").write_text(json.dumps(config_to_dict(Config())))
    assert "nothing to export" in run(capsys, "to-hf", "--checkpoint", str(tmp_path / "fresh"), "--output",
                                      str(tmp_path / "o"))


@pytest.mark.parametrize("field,value,says", [
    ("num_shared_experts", 1, "shared experts"),
    ("moe_layer_frequency", 2, "no dense layers"),
    ("normalize_top_k", False, "renormalises"),
    ("capacity_factor", 1.25, "--allow-dropless"),
    ("num_experts", 0, "dense model"),
    ("router_type", "expert_choice", "own top-k"),
    ("expert_bias_update_rate", 0.001, "expert bias"),
    ("top_groups", 2, "group-limited"),
])
def test_to_hf_refuses_what_mixtral_cannot_express(tmp_path, capsys, field, value, says) -> None:
    cfg = Config()
    setattr(cfg.moe, field, value)
    if field == "top_groups":
        cfg.moe.num_expert_groups = 4
    if value == "expert_choice":
        cfg.moe.capacity_factor = 2.0
    fake_checkpoint(tmp_path / "run", cfg)
    err = run(capsys, "to-hf", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "o"))
    assert says in err and field in err


def test_wrong_architectures_are_refused(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).save_pretrained(tmp_path / "llama")
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**SMALL, num_local_experts=4)).save_pretrained(
        tmp_path / "mixtral")
    transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64).save_pretrained(tmp_path / "gpt2")
    err = run(capsys, "from-hf", "--hf", str(tmp_path / "llama"), "--output", str(tmp_path / "a"))
    assert "model_type = 'llama'" in err and "upcycle" in err
    err = run(capsys, "upcycle", "--dense", str(tmp_path / "mixtral"), "--output", str(tmp_path / "b"),
              "--num-experts", "4")
    assert "already an MoE" in err and "from-hf" in err
    err = run(capsys, "upcycle", "--dense", str(tmp_path / "gpt2"), "--output", str(tmp_path / "c"),
              "--num-experts", "4")
    assert "model_type = 'gpt2'" in err
    fake_checkpoint(tmp_path / "moe_run", Config())  # an ep-train run that is MoE already
    err = run(capsys, "upcycle", "--dense", str(tmp_path / "moe_run"), "--output", str(tmp_path / "d"),
              "--num-experts", "4")
    assert "already an MoE" in err
    assert not any((tmp_path / n).exists() for n in "abcd")  # refused before writing anything


def test_ffn_shape_that_does_not_match_is_refused(tmp_path, capsys) -> None:
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).save_pretrained(tmp_path / "llama")
    err = run(capsys, "upcycle", "--dense", str(tmp_path / "llama"), "--output", str(tmp_path / "a"),
              "--num-experts", "4", "--moe.expert_intermediate_size", "96")
    assert "moe.expert_intermediate_size = 96" in err
    err = run(capsys, "upcycle", "--dense", str(tmp_path / "llama"), "--output", str(tmp_path / "a"),
              "--num-experts", "4", "--model.intermediate_size", "64")
    assert "model.intermediate_size = 64 but" in err and "48" in err
    err = run(capsys, "upcycle", "--dense", str(tmp_path / "llama"), "--output", str(tmp_path / "a"),
              "--num-experts", "1")
    assert "--num-experts = 1" in err


def test_to_hf_of_a_hugging_face_folder_says_so(tmp_path, capsys) -> None:
    """Its config.json is not a run config: read as one, it failed with "unknown config key 'architectures'"."""
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**SMALL, num_local_experts=4)).save_pretrained(
        tmp_path / "mixtral")
    err = run(capsys, "to-hf", "--checkpoint", str(tmp_path / "mixtral"), "--output", str(tmp_path / "o"))
    assert "mixtral' is already a Hugging Face folder (config.json with model_type 'mixtral')" in err
    assert "pass a run directory or RUN/checkpoints/step_N" in err and not (tmp_path / "o").exists()
