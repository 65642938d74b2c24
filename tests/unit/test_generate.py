"""Generation: the KV cache against full recompute, batching, the inference-only K, Hugging Face's generate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ep_train.config import Config
from ep_train.generation import generate_tokens, sample_next
from ep_train.model.moe import MoELayer, inference_routing
from ep_train.model.transformer import KVCache, Transformer, build_model


def tiny(num_experts: int = 4, k: int = 2, max_seq_len: int = 48, capacity_factor: float | None = None
         ) -> Transformer:
    c = Config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = 64, 32, 48, 2
    m.num_heads, m.num_kv_heads, m.max_seq_len, m.rope_theta = 4, 2, max_seq_len, 10000.0
    c.moe.num_experts, c.moe.num_experts_per_token, c.moe.capacity_factor = num_experts, k, capacity_factor
    model = build_model(c.model, c.moe, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # decisive routing and sharp attention, so a wrong expert or position shows
        for mod in model.modules():
            if isinstance(mod, MoELayer):
                mod.router.weight.normal_(std=0.5, generator=g)
                for w in (mod.experts.w1, mod.experts.w2, mod.experts.w3):
                    w.normal_(std=0.3, generator=g)
        for layer in model.layers:
            layer.attn.q_proj.weight.normal_(std=0.5, generator=g)
            layer.attn.k_proj.weight.normal_(std=0.5, generator=g)
    return model


def prompts(lengths: list[int], vocab: int = 64, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("k", [1, 2])
def test_cached_logits_equal_full_recompute_at_every_step(k) -> None:
    model = tiny(k=k)
    seq = torch.tensor(prompts([5, 5]))  # [B, S0]
    cache = KVCache(len(model.layers))
    feed = seq
    with torch.no_grad():
        for _ in range(12):
            cached = model.forward_step(feed, cache)[0]  # [B, S, V]
            full = model(seq).logits[:, -feed.shape[1]:]
            assert (cached - full).abs().max().item() < 1e-5
            feed = cached[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, feed], dim=1)
        assert cache.seq_len == seq.shape[1] - 1
        # several new tokens after a non-empty cache: causal among themselves, all past keys visible
        chunk = torch.tensor(prompts([4, 4], seed=5))
        cached = model.forward_step(chunk, cache)[0]
        full = model(torch.cat([seq[:, :-1], chunk], dim=1)).logits[:, -4:]
        assert (cached - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("num_experts,k", [(0, 2), (4, 2), (4, 1)])
def test_greedy_same_tokens_with_and_without_cache(num_experts, k) -> None:
    model = tiny(num_experts, k)
    p = prompts([6, 3, 6, 9])  # two share a length (one batch), the others run alone
    cached = generate_tokens(model, p, 10)
    recomputed = generate_tokens(model, p, 10, use_kv_cache=False)
    assert cached.tokens == recomputed.tokens
    assert [len(t) for t in cached.tokens] == [10] * 4 and cached.new_tokens == 40
    assert cached.tokens_per_sec > 0
    alone = [generate_tokens(model, [q], 10).tokens[0] for q in p]  # batching changes nothing
    assert cached.tokens == alone


def test_generation_is_dropless_and_restores_capacity() -> None:
    """With a capacity factor, a token's experts would depend on its batch; generation routes dropless."""
    model = tiny(capacity_factor=0.5)
    p = prompts([7, 7, 7])
    assert generate_tokens(model, p, 6).tokens == generate_tokens(model, p, 6, use_kv_cache=False).tokens
    assert all(m.router.capacity_factor == 0.5 for m in model.modules() if isinstance(m, MoELayer))


def test_experts_per_token_changes_routing_at_inference_only() -> None:
    model = tiny(k=2)
    p = prompts([8, 8])
    base = generate_tokens(model, p, 12).tokens
    with torch.no_grad():
        ids = torch.tensor(p)
        ref_logits = model(ids).logits
        with inference_routing(model, experts_per_token=1):
            k1_logits = model(ids).logits
    assert (k1_logits - ref_logits).abs().max().item() > 1e-3
    k1 = generate_tokens(model, p, 12, experts_per_token=1)
    assert k1.tokens != base
    assert k1.tokens == generate_tokens(model, p, 12, experts_per_token=1, use_kv_cache=False).tokens
    moe = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert moe and all(m.top_k == 2 and m.router.top_k == 2 for m in moe)  # the training K is back
    assert model.moe_cfg.num_experts_per_token == 2
    assert generate_tokens(model, p, 12).tokens == base
    with pytest.raises(ValueError, match=r"experts_per_token = 5 .*number of experts \(4;"):
        generate_tokens(model, p, 2, experts_per_token=5)
    assert all(m.top_k == 2 for m in moe)
    with pytest.raises(ValueError, match="no MoE layers"):
        generate_tokens(tiny(num_experts=0), p, 2, experts_per_token=1)


def test_eos_stops_a_prompt_and_training_mode_is_restored() -> None:
    model = tiny()
    p = prompts([5, 5])
    free = generate_tokens(model, p, 10).tokens
    eos = free[0][3]
    got = generate_tokens(model, p, 10, eos_id=eos).tokens
    assert got[0] == free[0][:free[0].index(eos) + 1]  # stops after its EOS (included)
    assert got[1] == (free[1][:free[1].index(eos) + 1] if eos in free[1] else free[1])
    model.train()
    generate_tokens(model, p, 2)
    assert model.training


def test_prompts_past_the_context_are_refused() -> None:
    model = tiny(max_seq_len=16)
    with pytest.raises(ValueError, match=r"prompt 1 is 17 tokens long.*model.max_seq_len = 16"):
        generate_tokens(model, prompts([3, 17]), 1)
    with pytest.raises(ValueError, match=r"\(10 tokens\) \+ max_new_tokens \(8\) = 18.*lower max_new_tokens to 7"):
        generate_tokens(model, prompts([10]), 8)
    # the 7th new token is sampled from position 16's logits and never fed back: 16 positions, the context
    got = generate_tokens(model, prompts([10]), 7, use_kv_cache=False).tokens
    assert len(got[0]) == 7 and got == generate_tokens(model, prompts([10]), 7).tokens  # with the KV cache too
    assert len(generate_tokens(model, prompts([16]), 1).tokens[0]) == 1  # a prompt that fills it gets one token
    with pytest.raises(ValueError, match="empty"):
        generate_tokens(model, [[]], 1)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.forward_step(torch.zeros(1, 17, dtype=torch.long), KVCache(len(model.layers)))


def test_sampling_options() -> None:
    model = tiny()
    p = prompts([6, 6])
    greedy = generate_tokens(model, p, 8).tokens
    a = generate_tokens(model, p, 8, temperature=1.0, seed=3).tokens
    assert a == generate_tokens(model, p, 8, temperature=1.0, seed=3).tokens  # seeded: reproducible
    assert a == generate_tokens(model, p, 8, temperature=1.0, seed=3, use_kv_cache=False).tokens
    assert generate_tokens(model, p, 8, temperature=1.0, top_k=1, seed=4).tokens == greedy
    assert generate_tokens(model, p, 8, temperature=0.7, top_p=1e-6, seed=5).tokens == greedy
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    draws = {sample_next(logits, 1.0, top_p=0.9, generator=torch.Generator().manual_seed(i)).item()
             for i in range(200)}
    assert draws == {1, 2, 3}  # p = .64, .24, .09, .03: .64 + .24 < 0.9, so the nucleus needs token 1 too
    draws = {sample_next(logits, 5.0, top_k=2, generator=torch.Generator().manual_seed(i)).item() for i in range(200)}
    assert draws == {2, 3}
    # a tiny temperature is greedy (before: inf - inf in the softmax, NaN probabilities, multinomial raised)
    assert generate_tokens(model, p, 8, temperature=1e-45, seed=6).tokens == greedy
    assert sample_next(logits, 1e-45, generator=torch.Generator().manual_seed(0)).item() == 3
    for kw, field in ((dict(temperature=-1.0), "temperature"), (dict(temperature=float("inf")), "temperature"),
                      (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k")):
        with pytest.raises(ValueError, match=field):
            generate_tokens(model, p, 2, **kw)


def test_import_ep_train_stays_light() -> None:
    code = ("import sys, ep_train; assert 'torch' not in sys.modules; "
            "assert callable(ep_train.load) and 'torch' in sys.modules; import ep_train.generation as g; "
            "assert ep_train.generate is g.generate and ep_train.Loaded; "
            "from ep_train.interop import hf, hf_export, upcycle; import ep_train.analyze as a; "
            "assert ep_train.to_hf is hf_export.to_hf and ep_train.from_hf is hf.from_hf; "
            "assert ep_train.upcycle is upcycle.upcycle and ep_train.analyze_experts is a.analyze")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_prompt_ids_outside_the_vocabulary_are_refused() -> None:
    """An id the embedding has no row for raised a bare IndexError (a device-side assert on CUDA)."""
    model = tiny()  # vocab 64
    with pytest.raises(ValueError, match=r"prompt 1 has token id 64 at position 2, outside the model's vocabulary "
                                         r"\[0, 64\) \(model.vocab_size = 64\)"):
        generate_tokens(model, [[1, 2, 3], [4, 5, 64]], 1)
    with pytest.raises(ValueError, match=r"prompt 0 has token id -1 at position 1"):
        generate_tokens(model, [[7, -1]], 1)
    assert len(generate_tokens(model, [[0, 63]], 1).tokens[0]) == 1  # both ends of the range are ids


# ---- decoding the new text ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prefix_tokenizer(tmp_path_factory) -> Path:
    """A sentencepiece model that adds a dummy prefix space, as Mixtral's and Llama's tokenizers do (ep-train's
    own default does not): decoded alone, a sequence loses its first piece's leading space."""
    from ep_train.data.tokenizer import train_tokenizer
    from tests.conftest import STDLIB

    out = tmp_path_factory.mktemp("tok_prefix")
    return train_tokenizer([str(STDLIB / "textwrap.py"), str(STDLIB / "this.py")], 400, str(out / "sp"),
                           add_dummy_prefix=True)


def forced(vocab: int, token: int) -> Transformer:
    """A tiny model whose next token is always ``token`` (its logit raised far above the others)."""
    c = Config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = vocab, 32, 48, 1
    m.num_heads, m.num_kv_heads, m.max_seq_len = 4, 2, 48
    c.moe.num_experts, c.moe.num_experts_per_token = 4, 2
    model = build_model(c.model, c.moe, seed=0).eval()
    model.lm_head.register_forward_hook(lambda _m, _i, out: out.index_fill(-1, torch.tensor([token]), 1e4))
    return model


def test_the_continuation_keeps_its_leading_space(prefix_tokenizer, monkeypatch, capsys) -> None:
    """prompt + completion reads as the whole sequence decodes: 'hello' + ' the', not 'hello' + 'the'
    (the new ids decoded alone lost their first word's space), in the API and in `ep-train generate`."""
    import sentencepiece as spm

    from ep_train import generation
    from ep_train.api import Loaded

    sp = spm.SentencePieceProcessor(model_file=str(prefix_tokenizer))
    word = sp.piece_to_id("\u2581the")
    assert sp.id_to_piece(word) == "\u2581the" and sp.decode([word]) == "the"  # the space a word start loses alone
    model = forced(sp.get_piece_size(), word)
    prompts = ["hello", "the text"]
    for add_bos in (False, True):
        texts = generation.generate(model, sp, prompts, max_new_tokens=2, add_bos=add_bos)
        assert texts == [" the the", " the the"]
        for prompt, text in zip(prompts, texts):  # the reference: sentencepiece decoding the whole sequence
            assert prompt + text == sp.decode([*sp.encode(prompt), word, word])
    cfg = Config()
    cfg.model.vocab_size = sp.get_piece_size()
    monkeypatch.setattr("ep_train.api.load", lambda *a, **k: Loaded(model, sp, cfg, Path("ckpt")))
    capsys.readouterr()
    assert generation.main(["--checkpoint", "ckpt", "--prompt", "hello", "--max-new-tokens", "1"]) == 0
    assert capsys.readouterr().out.startswith("=== 'hello'\nhello the\n")


# ---- Hugging Face Mixtral --------------------------------------------------------------------------
def hf_mixtral(tmp_path, vocab: int = 96, **kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64, rope_theta=10000.0, **kw)
    hf = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # decisive routing (HF's init gives near-uniform routers)
        for layer in hf.model.layers:
            layer.mlp.gate.weight.normal_(std=0.5)
            layer.self_attn.q_proj.weight.normal_(std=0.5)
            layer.self_attn.k_proj.weight.normal_(std=0.5)
    hf.save_pretrained(tmp_path)
    return hf


def test_greedy_tokens_equal_hugging_face_generate(tmp_path) -> None:
    import ep_train

    hf = hf_mixtral(tmp_path / "hf")
    loaded = ep_train.load(tmp_path / "hf")
    assert loaded.tokenizer is None and not loaded.model.training
    p = prompts([7, 7], vocab=96, seed=2)
    ids = torch.tensor(p)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                          min_new_tokens=12, eos_token_id=None, pad_token_id=0)[:, 7:]
    got = generate_tokens(loaded.model, p, 12)
    assert got.tokens == ref.tolist()
    assert generate_tokens(loaded.model, p, 12, use_kv_cache=False).tokens == ref.tolist()


def test_load_resolves_paths(tmp_path) -> None:
    """A run dir that only names its initial weights (convert/upcycle) loads them; bad paths say why."""
    import yaml

    import ep_train
    from ep_train.api import load

    hf_mixtral(tmp_path / "run" / "init")
    ref = load(tmp_path / "run" / "init")
    run_cfg = {"model": {k: getattr(ref.config.model, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                                   "num_layers", "num_heads", "num_kv_heads",
                                                                   "max_seq_len", "rope_theta")},
               "moe": {"num_experts": 4, "num_experts_per_token": 2},
               "data": {"seq_len": 32}, "train": {"init_from": "init"}}  # relative to the run dir
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(run_cfg))
    run = ep_train.load(tmp_path / "run", dtype=torch.bfloat16)
    assert run.weights == tmp_path / "run" / "init" and run.model.embed.weight.dtype == torch.bfloat16
    assert torch.equal(run.model.embed.weight.float(), ref.model.embed.weight.bfloat16().float())
    with pytest.raises(ValueError, match=r"--device = 'gpu' is invalid"):
        load(tmp_path / "run", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load(tmp_path / "run", device="cuda")
    # a learned aux-loss-free bias stays fp32 in a bf16 model, as in training (a bf16 one rounds: other experts)
    bias = [0.0123456789, -0.5, 0.25, 1.0009765625]  # the last is between two bf16 values
    (tmp_path / "run" / "init" / "ep_train_state.json").write_text(json.dumps({"expert_bias": {"0": bias}}))
    run_cfg["moe"]["expert_bias_update_rate"] = 0.001
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(run_cfg))
    got = ep_train.load(tmp_path / "run", dtype=torch.bfloat16).model.layers[0].ffn.router.expert_bias
    assert got.dtype == torch.float32 and torch.equal(got, torch.tensor(bias))
    del run_cfg["moe"]["expert_bias_update_rate"]
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(run_cfg))
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="nothing to load weights from"):
        load(tmp_path / "empty")
    run_cfg["model"]["num_layers"] = 3
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(run_cfg))
    with pytest.raises(ValueError, match="num_layers"):
        load(tmp_path / "run")


def test_prompts_start_with_bos_as_the_training_documents_did(tokenizer, tmp_path) -> None:
    """The BOS choice follows the data manifest (build --append-bos), else a Hugging Face folder's
    tokenizer_config.json; generate_text then completes [BOS] + prompt, as a hand-made call does."""
    import json

    import sentencepiece as spm

    from ep_train.api import prompt_bos
    from ep_train.generation import generate_text

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    cfg = Config()
    data = tmp_path / "data"
    data.mkdir()
    cfg.data.data_dir = str(data)
    for append_bos in (True, False):
        (data / "manifest.json").write_text(json.dumps({"append_bos": append_bos}))
        assert prompt_bos(cfg, tmp_path, sp) is append_bos
    cfg.data.data_dir = str(tmp_path / "elsewhere")  # the data is not on this machine: the folder's tokenizer says
    assert prompt_bos(cfg, tmp_path, sp) is False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    assert prompt_bos(cfg, tmp_path, sp) is True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert prompt_bos(cfg, tmp_path, sp) is False

    c = Config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = sp.get_piece_size(), 32, 48, 1
    m.num_heads, m.num_kv_heads, m.max_seq_len = 4, 2, 48
    c.moe.num_experts, c.moe.num_experts_per_token = 4, 2
    model = build_model(c.model, c.moe, seed=0).eval()
    prompt = "def f(x):"
    for add_bos, ids in ((True, [sp.bos_id(), *sp.encode(prompt)]), (False, sp.encode(prompt))):
        _, gen = generate_text(model, sp, [prompt], 6, add_bos=add_bos)
        assert gen.tokens == generate_tokens(model, [ids], 6, eos_id=sp.eos_id()).tokens
    seen: list[torch.Tensor] = []  # what the model was fed first: the prompt, with BOS in front or not
    hook = model.embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    generate_text(model, sp, [prompt], 1, add_bos=True)
    generate_text(model, sp, [prompt], 1)
    hook.remove()
    assert seen[0][0].tolist() == [sp.bos_id(), *sp.encode(prompt)] and seen[1][0].tolist() == sp.encode(prompt)


def test_a_replaced_tokenizer_is_refused_by_its_digest(tokenizer, tmp_path) -> None:
    import shutil

    from ep_train.api import _check_tokenizer_digest
    from ep_train.data.shards import sha256_file

    copy = tmp_path / "tok.model"
    shutil.copyfile(tokenizer, copy)
    manifest = {"tokenizer": {"path": str(copy), "sha256": sha256_file(tokenizer)}}
    _check_tokenizer_digest(copy, manifest)  # the file the data was built with
    _check_tokenizer_digest(copy, None)  # no manifest here: nothing to compare with
    copy.write_bytes(copy.read_bytes() + b"\n")  # retrained / replaced in place
    with pytest.raises(ValueError, match=r"tok.model' is not the one the run's data was built with.*--tokenizer"):
        _check_tokenizer_digest(copy, manifest)
