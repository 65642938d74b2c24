"""Config loading: aliases, precedence, unknown keys, and a table of bad configurations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ep_train.config import load_config, moe_layer_indices, parse_overrides, validate


def _write(tmp_path, data, name="c.yaml"):
    import yaml

    p = tmp_path / name
    p.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return p


def test_aliases_and_precedence(tmp_path) -> None:
    p = _write(tmp_path, {"model": {"num_layers": 4, "kv_heads": 2}, "moe": {"experts_per_tok": 1},
                          "load_balance_alpha": 0.05, "shared_expert_enabled": True})
    cfg = load_config(p, parse_overrides(["--top_k", "2", "--model.num_layers=6", "--ep_size", "2"]))
    assert cfg.model.num_layers == 6  # command line beats the file
    assert cfg.model.num_kv_heads == 2 and cfg.moe.num_experts_per_token == 2
    assert cfg.moe.aux_loss_weight == 0.05 and cfg.moe.num_shared_experts == 1
    assert cfg.parallel.ep_size == 2
    assert cfg.model.hidden_size == 512  # default survives


def test_json_and_list_override(tmp_path) -> None:
    p = _write(tmp_path, {"moe": {"num_experts": 4}}, "c.json")
    cfg = load_config(p, parse_overrides(["--moe_layers", "1,3"]))
    assert cfg.moe.moe_layers == [1, 3]
    assert moe_layer_indices(cfg.model, cfg.moe) == [1, 3]
    cfg = load_config(p, parse_overrides(["--moe_layer_frequency", "2", "--moe_layer_start", "1"]))
    assert moe_layer_indices(cfg.model, cfg.moe) == [1, 3, 5, 7]


BAD = [
    ({"moe.num_experts_per_token": 9}, "moe.num_experts_per_token"),  # k > E
    ({"top_k": 0}, "moe.num_experts_per_token"),
    ({"parallel.ep_size": 3}, "parallel.ep_size"),  # does not divide 8 experts
    ({"moe.moe_layers": [0, 8]}, "moe.moe_layers"),  # out of range for 8 layers
    ({"model.num_kv_heads": 3}, "model.num_kv_heads"),  # does not divide 8 heads
    ({"model.hidden_size": 100}, "model.hidden_size"),  # not divisible by heads
    ({"moe.capacity_factor": -1.0}, "moe.capacity_factor"),
    ({"moe.drop_policy": "random"}, "moe.drop_policy"),
    ({"moe.router_type": "sinkhorn"}, "moe.router_type"),
    ({"moe.aux_loss_weight": -0.1}, "moe.aux_loss_weight"),
    ({"model.num_layers": 0}, "model.num_layers"),
    ({"moe.moe_layer_frequency": 0}, "moe.moe_layer_frequency"),
    ({"moe.moe_layer_end": 99}, "moe.moe_layer_end"),
    ({"model.head_dim": 7}, "model.head_dim"),
    ({"model.rope_theta": 0}, "model.rope_theta"),
    ({"moe.router_jitter_noise": 1.5}, "moe.router_jitter_noise"),
    ({"moe.num_experts": "eight"}, "moe.num_experts"),  # wrong type
    ({"model.tie_embeddings": "maybe"}, "model.tie_embeddings"),
    ({"model.hidden_sise": 64}, "hidden_sise"),  # unknown key (typo)
    ({"optimizer.lr": 1.0}, "optimizer"),  # unknown section
    ({"train.profile_step": -1}, "train.profile_step"),
]


@pytest.mark.parametrize("override,field", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_config_names_the_field(tmp_path, override, field) -> None:
    p = _write(tmp_path, override)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as err:
        load_config(p)
    assert "=" in str(err.value) or "unknown" in str(err.value)


def test_world_size_check_needs_divisible_world() -> None:
    cfg = load_config(None, [("ep_size", 4)])
    validate(cfg, world_size=8)
    with pytest.raises(ValueError, match="world size"):
        validate(cfg, world_size=6)


def test_missing_file_and_bad_override(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="has no value"):
        parse_overrides(["--top_k"])


def test_a_non_string_key_and_an_empty_moe_layer_list_are_refused(tmp_path) -> None:
    """`2: 3` at the top of a config (YAML makes the key an int) gave a TypeError traceback; an empty
    moe.moe_layers with experts configured trained a dense model silently."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("2: 3\n")
    with pytest.raises(ValueError, match=r"config key 2 is a int, not a name"):
        load_config(bad)
    with pytest.raises(ValueError, match=r"moe.moe_layers = \[\] is invalid: lists no layer while moe.num_experts"):
        load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml",
                    parse_overrides(["--moe.moe_layers", "[]"]))
