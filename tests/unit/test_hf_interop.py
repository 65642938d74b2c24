"""from_hf_mixtral against Hugging Face's own MixtralForCausalLM (random tiny models, save_pretrained)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ep_train.interop.hf import HFMixtralSource, from_hf_mixtral  # noqa: E402


# ---- the previous, whole-checkpoint loader: an independent reference for the streamed one ----------
def _old_load(path):
    import json

    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    tensors = {}
    for f in files:
        tensors.update(load_file(str(path / f)))
    return tensors


def _unused(path):
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"no model.safetensors or model.safetensors.index.json in {str(path)!r}; "
                         "save the model with save_pretrained(..., safe_serialization=True)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(path / f)))
    return tensors


def hf_state_to_ep(tensors, c):
    """Rename/restack HF Mixtral weights into ep_train's state dict (full expert stacks)."""
    t = {k.removeprefix("model."): v for k, v in tensors.items()}
    out = {"embed.weight": t.pop("embed_tokens.weight"), "norm.weight": t.pop("norm.weight")}
    head = tensors.get("lm_head.weight")
    t.pop("lm_head.weight", None)
    out["lm_head.weight"] = head if head is not None else out["embed.weight"]
    e = c.moe.num_experts
    for i in range(c.model.num_layers):
        src, dst = f"layers.{i}.", f"layers.{i}."
        out[dst + "attn_norm.weight"] = t.pop(src + "input_layernorm.weight")
        out[dst + "ffn_norm.weight"] = t.pop(src + "post_attention_layernorm.weight")
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{dst}attn.{p}.weight"] = t.pop(f"{src}self_attn.{p}.weight")
        if src + "mlp.experts.gate_up_proj" in t:  # transformers 5 fused layout
            gate_up = t.pop(src + "mlp.experts.gate_up_proj")  # [E, 2F, D]
            w1, w3 = gate_up.chunk(2, dim=1)  # HF: gate, up = (x @ gate_up.T).chunk(2)
            w2 = t.pop(src + "mlp.experts.down_proj")  # [E, D, F]
            gate = t.pop(src + "mlp.gate.weight")
        else:
            moe = src + "block_sparse_moe."
            w1 = torch.stack([t.pop(f"{moe}experts.{j}.w1.weight") for j in range(e)])
            w2 = torch.stack([t.pop(f"{moe}experts.{j}.w2.weight") for j in range(e)])
            w3 = torch.stack([t.pop(f"{moe}experts.{j}.w3.weight") for j in range(e)])
            gate = t.pop(moe + "gate.weight")
        out[dst + "ffn.router.weight"] = gate
        out[dst + "ffn.experts.w1"], out[dst + "ffn.experts.w2"], out[dst + "ffn.experts.w3"] = w1, w2, w3
    leftover = [k for k in t if "rotary_emb" not in k]
    if leftover:
        raise ValueError(f"unexpected tensors in the Mixtral checkpoint: {leftover[:5]}; is it really Mixtral?")
    return out




@pytest.mark.parametrize("kw", [
    # k = 1 (Switch-style), MHA, tied embeddings
    dict(num_experts_per_tok=1, num_local_experts=4, num_attention_heads=4, num_key_value_heads=4,
         tie_word_embeddings=True),
    # k = 2, GQA, untied embeddings, explicit head_dim
    dict(num_experts_per_tok=2, num_local_experts=6, num_attention_heads=8, num_key_value_heads=2,
         tie_word_embeddings=False, head_dim=8),
])
def test_logits_equal_hugging_face(tmp_path, kw) -> None:
    torch.manual_seed(0)
    hf_cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                        max_position_embeddings=64, rope_theta=10000.0, **kw)
    hf = transformers.MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF's init gives tiny router logits; make routing decisive so ties can't hide bugs
        for layer in hf.model.layers:
            layer.mlp.gate.weight.normal_(std=0.5)
    hf.save_pretrained(tmp_path)
    model, cfg = from_hf_mixtral(tmp_path)
    model.eval()
    assert cfg.moe.num_experts_per_token == kw["num_experts_per_tok"]
    assert cfg.model.tie_embeddings == kw["tie_word_embeddings"]
    ids = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids).logits
    assert (got - ref).abs().max().item() < 1e-4
    if kw["tie_word_embeddings"]:
        assert model.lm_head.weight is model.embed.weight


def test_missing_directory_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        from_hf_mixtral(tmp_path)


def test_fused_transformers5_layout(tmp_path) -> None:
    """The in-memory layout of transformers 5 (gate_up_proj / down_proj), written straight to safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    hf_cfg = transformers.MixtralConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=32)
    hf = transformers.MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.gate.weight.normal_(std=0.5)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    hf_cfg.save_pretrained(tmp_path)
    model, _ = from_hf_mixtral(tmp_path)
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        assert (model.eval()(ids).logits - hf(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("style", ["per_expert_sharded", "fused"])
def test_streamed_import_equals_the_whole_checkpoint_loader(tmp_path, style) -> None:
    """Every parameter read through HFMixtralSource (slices, per expert) equals the old load-everything path,
    for the names save_pretrained writes (here sharded with an index) and transformers 5's fused names."""
    from safetensors.torch import save_file

    from ep_train.model.transformer import build_model

    torch.manual_seed(3)
    hf_cfg = transformers.MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=32)
    hf = transformers.MixtralForCausalLM(hf_cfg)
    if style == "fused":
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
        hf_cfg.save_pretrained(tmp_path)
    else:
        hf.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
    src = HFMixtralSource(tmp_path)
    assert src.fused == (style == "fused")
    ref = hf_state_to_ep(_old_load(tmp_path), src.cfg)
    meta = build_model(src.cfg.model, src.cfg.moe, device="meta")
    for name, p in meta.named_parameters():
        if name.endswith(("experts.w1", "experts.w2", "experts.w3")):
            ids = [3, 1]  # a rank's subset, in any order: rows come from the global expert ids
            got = src(name, (2, *p.shape[1:]), ids)
            assert torch.equal(got, ref[name][ids]), name
        else:
            assert torch.equal(src(name, tuple(p.shape), None), ref[name]), name


def test_streamed_import_refuses_a_checkpoint_that_is_not_its_config(tmp_path) -> None:
    hf_cfg = transformers.MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    transformers.MixtralForCausalLM(hf_cfg).save_pretrained(tmp_path)
    hf_cfg.num_hidden_layers = 3  # config.json now promises a layer the weights do not have
    hf_cfg.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="missing .*model.layers.2"):
        HFMixtralSource(tmp_path)


def test_run_config_matches_a_checkpoint_that_spells_out_head_dim() -> None:
    """config.json gives head_dim (transformers writes hidden_size / num_heads); a run config that leaves it unset
    means the same and matches; another value is refused, naming the field."""
    from ep_train.interop.hf import check_matches_hf, config_from_hf

    hf_cfg = transformers.MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        head_dim=4)
    ckpt = config_from_hf(hf_cfg.to_dict())
    assert ckpt.model.head_dim == 4
    run = config_from_hf(hf_cfg.to_dict())
    run.model.head_dim = None  # 16 / 4 = 4
    check_matches_hf(run, ckpt, "ckpt")
    run.model.head_dim = 8
    with pytest.raises(ValueError, match=r"model.head_dim: run 8 \(= 8\) vs checkpoint 4"):
        check_matches_hf(run, ckpt, "ckpt")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_imported_aux_loss_weight_gives_transformers_balance_pressure(k) -> None:
    """transformers' load_balancing_loss_func sums the routed share over the K choices: its loss is K times
    ep-train's (1.0 when balanced, any K). After import, coef_hf * loss_hf == weight_ep * loss_ep on the same
    router logits; the export writes the coefficient back as it was."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from ep_train.interop.hf import config_from_hf
    from ep_train.interop.hf_export import hf_config
    from ep_train.model.router import load_balancing_loss

    e = 6
    hf = transformers.MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=e,
                                    num_experts_per_tok=k, router_aux_loss_coef=0.02).to_dict()
    cfg = config_from_hf(hf)
    logits = torch.randn(50, e, generator=torch.Generator().manual_seed(k)) * 2
    loss_hf = load_balancing_loss_func((logits,), e, k)
    probs = torch.softmax(logits, -1)
    loss_ep = load_balancing_loss(probs, torch.topk(probs, k, -1).indices, e)
    assert loss_hf.item() == pytest.approx(k * loss_ep.item(), rel=1e-5)  # the factor itself
    assert 0.02 * loss_hf.item() == pytest.approx(cfg.moe.aux_loss_weight * loss_ep.item(), rel=1e-5)
    assert hf_config(cfg, "float32")["router_aux_loss_coef"] == pytest.approx(0.02, rel=1e-15)
    assert hf_config(cfg, "float32", base=hf)["router_aux_loss_coef"] == 0.02  # from-hf then to-hf: exact
    del hf["router_aux_loss_coef"]  # left out: MixtralConfig's default, 0.001
    assert config_from_hf(hf).moe.aux_loss_weight == pytest.approx(0.001 * k)


def test_top1_mixtral_imports_as_it_computes_but_is_not_trained_or_exported_switch_style(tmp_path) -> None:
    """A top-1 Mixtral renormalises its one weight to 1: imported, it computes exactly that (inference,
    test_logits_equal_hugging_face), but a training run from it is refused (its router would learn
    nothing from the LM loss), and an ep-train top-1 model (raw probability weights) cannot be exported."""
    from ep_train.config import Config
    from ep_train.interop.hf import config_from_hf, from_hf
    from ep_train.interop.hf_export import check_exportable

    hf_cfg = transformers.MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=1)
    assert config_from_hf(hf_cfg.to_dict()).moe.normalize_top_k is True
    transformers.MixtralForCausalLM(hf_cfg).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"routes each token to one expert .* learn nothing from the language-model"):
        from_hf(tmp_path / "hf", tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()
    c = Config()
    c.moe.num_experts_per_token = 1  # normalize_top_k auto: the router probability (Switch)
    with pytest.raises(ValueError, match=r"moe\.normalize_top_k = None .*renormalises"):
        check_exportable(c)
    c.moe.normalize_top_k = True  # an old top-1 run that renormalised: what Mixtral computes
    check_exportable(c)


def test_init_from_refuses_a_run_that_combines_experts_otherwise() -> None:
    from ep_train.interop.hf import check_matches_hf, config_from_hf

    hf_cfg = transformers.MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    ckpt = config_from_hf(hf_cfg.to_dict())
    run = config_from_hf(hf_cfg.to_dict())
    run.moe.normalize_top_k = None  # auto at K = 2: renormalises, as Mixtral
    check_matches_hf(run, ckpt, "ckpt")
    run.moe.normalize_top_k = False
    with pytest.raises(ValueError, match=r"moe.normalize_top_k: run False vs checkpoint True"):
        check_matches_hf(run, ckpt, "ckpt")


@pytest.mark.parametrize("moe,says", [
    (dict(router_type="expert_choice", capacity_factor=2.0), r"moe.router_type = 'expert_choice' .*set moe.router_type "
                                                             "to topk"),
    (dict(router_type="noisy_topk"), r"moe.router_type = 'noisy_topk' .*set moe.router_type to topk"),
    (dict(num_expert_groups=2, top_groups=1), r"moe.top_groups = 1 of moe.num_expert_groups = 2 .*set "
                                              "moe.top_groups to null"),
])
def test_init_from_refuses_routing_that_is_not_mixtrals_from_the_first_step(tmp_path, moe, says) -> None:
    """Expert choice and group-limited routing give other logits than the checkpoint at step 0 (to-hf refused
    the run later); noisy top-k needs a noise weight the checkpoint does not have (it failed an assert)."""
    import copy

    from ep_train.interop.hf import config_from_hf

    hf_cfg = transformers.MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    transformers.MixtralForCausalLM(hf_cfg).save_pretrained(tmp_path)
    run = copy.deepcopy(config_from_hf(hf_cfg.to_dict()))
    for k, v in moe.items():
        setattr(run.moe, k, v)
    with pytest.raises(ValueError, match=rf"train.init_from '.*' is a Mixtral checkpoint and the run config routes "
                                         rf"otherwise from the first step: {says}"):
        HFMixtralSource(tmp_path, run)


@pytest.mark.parametrize("moe", [dict(expert_bias_update_rate=0.001), dict(num_expert_groups=2),
                                 dict(num_expert_groups=2, top_groups=2)])
def test_init_from_keeps_training_choices_that_compute_mixtral_at_the_start(tmp_path, moe) -> None:
    """The aux-loss-free expert bias starts at 0 and groups without a limit (top_groups null or all of them)
    select from every expert: the run's model at step 0 is the checkpoint's (transformers' logits)."""
    from ep_train.interop.hf import config_from_hf
    from ep_train.model.transformer import build_model

    torch.manual_seed(0)
    hf_cfg = transformers.MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    hf = transformers.MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # decisive routing, so another selection shows in the logits
        for layer in hf.model.layers:
            layer.mlp.gate.weight.normal_(std=0.5)
    hf.save_pretrained(tmp_path)
    run = config_from_hf(hf_cfg.to_dict())
    for k, v in moe.items():
        setattr(run.moe, k, v)
    model = build_model(run.model, run.moe, source=HFMixtralSource(tmp_path, run)).eval()
    ids = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() < 1e-4
