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
    # with a capacity factor, so that the value check speaks, not "has no effect without moe.capacity_factor"
    ({"moe.drop_policy": "random", "moe.capacity_factor": 1.0},
     "moe.drop_policy = 'random' is invalid: use 'drop' or 'overflow'"),
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
    ({"train.profile_step": 10**9}, "train.profile_step"),  # past train.max_steps: nothing would be profiled
    ({"train.seed": 2**64}, "train.seed"),  # torch.manual_seed(seed + rank) overflowed at set-up
    ({"moe.moe_layers": [1], "moe.moe_layer_frequency": 2}, "moe.moe_layer_frequency"),  # the list wins: ignored
    ({"moe.shared_expert_intermediate_size": 64}, "moe.shared_expert_intermediate_size"),  # no shared experts
    ({"moe.drop_policy": "overflow"}, "moe.drop_policy"),  # dropless: nothing to move
]


@pytest.mark.parametrize("override,field", BAD, ids=[b[1].split()[0] + str(i) for i, b in enumerate(BAD)])
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


def test_normalize_top_k_auto_and_top1_renormalising_refused(tmp_path) -> None:
    """moe.normalize_top_k null (the default) renormalises for K >= 2 (Mixtral) and weighs by the raw
    probability at K = 1 (Switch); an explicit true at K = 1 makes every weight p / p = 1 and is refused,
    naming the field, the value, why and the fix."""
    from ep_train.config import normalizes_top_k

    cfg = load_config(None, parse_overrides(["--top_k", "1"]))
    assert cfg.moe.normalize_top_k is None and not normalizes_top_k(cfg.moe)
    assert normalizes_top_k(load_config(None).moe)
    assert not normalizes_top_k(load_config(None, parse_overrides(["--normalize_top_k", "false"])).moe)
    p = _write(tmp_path, {"moe": {"num_experts_per_token": 1, "normalize_top_k": True}})
    with pytest.raises(ValueError, match=r"moe\.normalize_top_k = True is invalid: .*num_experts_per_token = 1") as e:
        load_config(p)
    assert "learn nothing from the language-model loss" in str(e.value) and "null" in str(e.value)


def test_saved_configs_record_what_ran_and_old_ones_still_load() -> None:
    """A saved config (checkpoint, RUN/config.json) holds normalize_top_k resolved, so it says what ran and
    equals what ep-train wrote before auto existed (true at K >= 2: a resume compares them field by field).
    An old top-1 config holding true still loads (config_from_dict: export, analysis) and computes what it
    trained, weight 1; only a new start with it is refused."""
    import torch

    from ep_train.config import Config, config_from_dict, config_to_dict
    from ep_train.model.router import Router

    assert config_to_dict(Config())["moe"]["normalize_top_k"] is True  # the value every old checkpoint holds
    top1 = load_config(None, parse_overrides(["--top_k", "1"]))
    saved = config_to_dict(top1)
    assert saved["moe"]["normalize_top_k"] is False
    assert config_from_dict(saved).moe.normalize_top_k is False
    saved["moe"]["normalize_top_k"] = True  # written by an older ep-train, whose default was true
    old = config_from_dict(saved)
    assert old.moe.normalize_top_k is True and config_to_dict(old) == saved
    with pytest.raises(ValueError, match=r"moe\.normalize_top_k = True"):
        validate(old, check_paths=False)
    r = Router(8, 4, 1, normalize_top_k=old.moe.normalize_top_k)
    assert torch.equal(r(torch.randn(5, 8)).weights, torch.ones(5, 1))


def test_text_overrides_keep_the_command_line_text(tmp_path) -> None:
    """Override values were read as YAML: '/data/set #2' lost '#2' (a comment), a flat data_sources string
    lost the sources after a '#', and yes, 2024, null or 'a: b' changed type. Text fields (paths, names, the
    flat data_sources form) take the text as given; null, none, ~ or nothing set an optional field to null."""
    folders = [tmp_path / name for name in ("set #2", "web", "code")]
    for folder in folders:
        folder.mkdir()
        (folder / "manifest.json").write_text("{}")
    assert load_config(None, parse_overrides(["--data_dir", str(folders[0])])).data.data_dir == str(folders[0])
    got = dict(parse_overrides(["--tokenizer", "yes", "--init_from", "2024", "--nvme_path", "a: b", "--ds_config",
                                "null", "--resume", "None", "--router_type", "~", "--data.data-dir=null"]))
    assert got == {"tokenizer": "yes", "init_from": "2024", "nvme_path": "a: b", "ds_config": "null",
                   "resume": None, "router_type": "~", "data.data_dir": None}
    # text quoted for YAML, as the old parser needed (and its errors advised), loses one level of quotes: text,
    # booleans and the flat data_sources form alike
    assert dict(parse_overrides(["--tokenizer", "'a #b.model'", "--verify_checkpoint", '"off"', "--shuffle",
                                 "'false'", "--data_path", "'0.7 web 0.3 code'"])) == \
        {"tokenizer": "a #b.model", "verify_checkpoint": "off", "shuffle": "false", "data_path": "0.7 web 0.3 code"}
    flat = f"0.7 {folders[1]} #1 0.3 {folders[2]}"  # YAML kept '0.7 .../web': one source, silently
    assert parse_overrides(["--data_sources", flat]) == [("data_sources", flat)]
    with pytest.raises(ValueError, match=r"data\.sources = .*#1.* is invalid: expected pairs 'WEIGHT FOLDER"):
        load_config(None, parse_overrides(["--data_sources", flat]))


def test_boolean_overrides_take_the_words_coerce_documents() -> None:
    """`--shuffle 1` was refused: YAML made 1 an int before the boolean check, which reads "1"/"0"."""
    for text, want in (("1", True), ("0", False), ("yes", True), ("OFF", False), ("on", True), ("False", False)):
        assert load_config(None, parse_overrides(["--shuffle", text])).data.shuffle is want, text
    assert load_config(None, parse_overrides(["--normalize_top_k", "0"])).moe.normalize_top_k is False
    assert load_config(None, parse_overrides(["--normalize_top_k", "null"])).moe.normalize_top_k is None
    with pytest.raises(ValueError, match=r"data\.shuffle = '2' is invalid: expected true/false"):
        load_config(None, parse_overrides(["--shuffle", "2"]))


def test_transformers_aux_coefficient_is_refused_with_its_conversion_not_mapped() -> None:
    """router_aux_loss_coef weighs a loss K times ep-train's: taken 1:1 it would halve Mixtral's balance pressure
    at K = 2 (from-hf converts it; a hand-written override must too)."""
    with pytest.raises(ValueError, match=r"router_aux_loss_coef' is not ep-train's: .*aux_loss_weight = K \* c"):
        parse_overrides(["--router_aux_loss_coef", "0.02"])


def test_a_resume_continues_the_checkpoints_model_as_it_was_trained(tmp_path) -> None:
    """The refusals for a model that starts training now (top-1 renormalised, expert-choice settings it
    ignores) wait for a resume to find no checkpoint (the trainer calls check_new_run then), so a run saved
    before them still resumes; a missing train.init_from folder is not needed by a resume either."""
    from ep_train.config import check_new_run

    top1 = ["--top_k", "1", "--normalize_top_k", "true"]
    with pytest.raises(ValueError, match="moe.normalize_top_k = True is invalid"):
        load_config(None, parse_overrides(top1))
    resumed = load_config(None, parse_overrides([*top1, "--resume", "auto"]))
    assert resumed.moe.normalize_top_k is True
    with pytest.raises(ValueError, match="moe.normalize_top_k = True is invalid"):
        check_new_run(resumed.moe)  # what the trainer runs when the resume finds nothing
    ec = ["--router_type", "expert_choice", "--capacity_factor", "2.0", "--drop_policy", "overflow"]
    with pytest.raises(ValueError, match="moe.drop_policy = 'overflow' is invalid"):
        load_config(None, parse_overrides(ec))
    load_config(None, parse_overrides([*ec, "--resume", "auto"]))
    gone = str(tmp_path / "moved" / "init")
    with pytest.raises(ValueError, match="train.init_from"):
        load_config(None, parse_overrides(["--init_from", gone]))
    assert load_config(None, parse_overrides(["--init_from", gone, "--resume", "auto"])).train.init_from == gone


def test_yaml_1_1_octal_and_base_60_numbers_are_refused(tmp_path) -> None:
    """PyYAML reads 0100 as 64 and 2:00 as 120 (YAML 1.1): refused by name, in files and overrides, instead of
    training with a number nobody wrote; plain decimals, floats and exponents read as before."""
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  seed: 0123\n")
    with pytest.raises(ValueError, match=r"c\.yaml:2:9: '0123' is read by YAML 1\.1 as a base-8 or base-60 number.*"
                                         "write 123 without the leading zero"):
        load_config(p)
    for args, fix in ((["--save_interval", "0100"], "100 without the leading zero"),
                      (["--max_steps", "2:00"], "the decimal number without colons"),
                      (["--moe_layers", "[1, 03]"], "3 without the leading zero")):
        with pytest.raises(ValueError, match=rf"override {args[0]} .*is invalid: .*YAML 1\.1.*{fix}"):
            parse_overrides(args)
    with pytest.raises(ValueError, match=r"moe\.moe_layers = .* is invalid: .*YAML 1\.1"):  # the comma form too
        load_config(None, parse_overrides(["--moe_layers", "01,03"]))
    p.write_text("train:\n  seed: 0\n  max_steps: 100\n  learning_rate: 3.0e-4\n")
    cfg = load_config(p, parse_overrides(["--save_interval", "10", "--warmup_steps", "0"]))
    assert (cfg.train.seed, cfg.train.max_steps, cfg.train.learning_rate, cfg.train.save_interval) == (0, 100, 3e-4, 10)


def test_a_stored_config_that_never_reached_its_profile_step_still_loads() -> None:
    """profile_step past max_steps is refused for a run, not for a checkpoint's saved config (older versions
    accepted it: generation, export and resume read that config back)."""
    from ep_train.config import Config, config_from_dict, config_to_dict

    saved = config_to_dict(Config())
    saved["train"].update(max_steps=50, warmup_steps=5, profile_step=60)
    assert config_from_dict(saved).train.profile_step == 60
    with pytest.raises(ValueError, match="train.profile_step = 60"):
        validate(config_from_dict(saved))


def test_a_zero_stage_change_is_refused_only_to_or_from_stage_3(tmp_path) -> None:
    """Stages 1 and 2 write the same files (and optimizer); ZeRO-3's are other files: refused, named."""
    from ep_train.train.resume import _zero_change

    layout = {"offload_optimizer": "none"}
    assert _zero_change({**layout, "stage": 1}, {**layout, "stage": 2}, tmp_path) is None
    with pytest.raises(ValueError, match=r"written under ZeRO stage 2\) with parallel.ds_config of stage 3"):
        _zero_change({**layout, "stage": 2}, {**layout, "stage": 3}, tmp_path)
    assert _zero_change({"stage": 3, "offload_optimizer": "none"}, {"stage": 3, "offload_optimizer": "cpu"},
                           tmp_path) == "optimizer offload: none -> cpu"
