"""`ep-train convert`: Hugging Face Mixtral round trips (from-hf -> to-hf byte for byte), upcycling a dense model
(HF Llama and an ep-train dense run) and the tokenizer export, against transformers' own models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ep_train.interop.hf import from_hf, from_hf_mixtral  # noqa: E402
from ep_train.interop.hf_export import to_hf  # noqa: E402
from ep_train.interop.upcycle import upcycle  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# The CLIs' environment: this checkout first, then whatever PYTHONPATH the tests run under (on the GPU
# machine, bench/gpu_check.sh puts its carried wheels, deepspeed among them, there).
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ep_train.cli", "convert", *args], capture_output=True, text=True,
                          env=CHILD_ENV, cwd=ROOT, timeout=300)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def hub_names(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's fused expert tensors split into the Hub's per-expert names (views, same bytes)."""
    out = {}
    for k, v in t.items():
        pre = k.rsplit("mlp.", 1)[0]
        if k.endswith("mlp.experts.gate_up_proj"):  # [E, 2F, D]: gate rows first, then up
            f = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{pre}block_sparse_moe.experts.{e}.w1.weight"] = v[e, :f]
                out[f"{pre}block_sparse_moe.experts.{e}.w3.weight"] = v[e, f:]
        elif k.endswith("mlp.experts.down_proj"):
            for e in range(v.shape[0]):
                out[f"{pre}block_sparse_moe.experts.{e}.w2.weight"] = v[e]
        elif k.endswith("mlp.gate.weight"):
            out[pre + "block_sparse_moe.gate.weight"] = v
        else:
            out[k] = v
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and (
        a.contiguous().view(torch.uint8).flatten().numpy().tobytes() ==
        b.contiguous().view(torch.uint8).flatten().numpy().tobytes())


@pytest.mark.parametrize("style", ["hub_sharded", "fused_bf16_tied"])
def test_from_hf_then_to_hf_is_byte_identical(tmp_path, style) -> None:
    torch.manual_seed(7)
    tied = style == "fused_bf16_tied"
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **TINY, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=tied, router_aux_loss_coef=0.02))
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.gate.weight.normal_(std=0.5)
    src = tmp_path / "src"
    if tied:
        hf.to(torch.bfloat16).save_pretrained(src, save_original_format=False)  # transformers 5's fused names
    else:
        hf.save_pretrained(src, max_shard_size="100KB")  # the Hub's per-expert names, several shards
    run, out = tmp_path / "run", tmp_path / "out"
    if tied:
        from_hf(src, run)
        to_hf(run, out, max_shard_size="100KB")
    else:  # the real command line, as users run it
        r = cli("from-hf", "--hf", str(src), "--output", str(run))
        assert r.returncode == 0, r.stderr
        assert f"ep-train train --config {run}/config.yaml --run-dir {run}" in r.stdout
        r = cli("to-hf", "--checkpoint", str(run), "--output", str(out))
        assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    want, got = hub_names(tensors(src)), tensors(out)
    assert sorted(got) == sorted(want)
    for k in want:
        assert same_bytes(got[k], want[k]), k
    assert ("lm_head.weight" in got) == (not tied)
    assert (out / "model.safetensors.index.json").is_file() == tied  # 100KB shards; unsharded = one file
    back, orig = (transformers.MixtralForCausalLM.from_pretrained(p).eval() for p in (out, src))
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, orig(ids).logits)


def _llama(tmp_path: Path, tied: bool) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(3)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=tied)).eval()
    llama.save_pretrained(tmp_path / "llama")
    return llama, tmp_path / "llama"


@pytest.mark.parametrize("tied", [False, True])
def test_upcycled_hf_llama_computes_the_dense_model(tmp_path, tied) -> None:
    llama, src = _llama(tmp_path, tied)
    cfg_file = upcycle(src, tmp_path / "up", num_experts=4, experts_per_token=2)
    model, cfg = from_hf_mixtral(tmp_path / "up" / "init")
    assert (cfg.moe.num_experts, cfg.moe.num_experts_per_token, cfg.moe.normalize_top_k) == (4, 2, True)
    assert "init_from" in cfg_file.read_text()
    mixtral = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "up" / "init").eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = llama(ids).logits
        assert (model.eval()(ids).logits - ref).abs().max().item() < 1e-5
        assert (mixtral(ids).logits - ref).abs().max().item() < 1e-5
    # noise: every expert its own (seeded) perturbation of the dense FFN; a normal router
    upcycle(src, tmp_path / "noisy", num_experts=4, noise=0.01, router_init="normal", seed=1)
    w = tensors(tmp_path / "noisy" / "init")
    d = llama.model.layers[0].mlp.gate_proj.weight
    e0, e1 = (w[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] for e in (0, 1))
    assert not torch.equal(e0, e1) and 0.005 < (e0 - d).std().item() < 0.02
    assert w["model.layers.0.block_sparse_moe.gate.weight"].abs().sum() > 0


@pytest.fixture(scope="module")
def dense_run(built, tmp_path_factory) -> Path:
    """A dense ep-train run with a checkpoint (one step, one process, ZeRO-3)."""
    run = tmp_path_factory.mktemp("dense") / "run"
    cmd = [sys.executable, "-m", "ep_train.train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--run-dir",
           str(run), "--data_dir", str(built), "--seq_len", "32", "--max_steps", "1", "--warmup_steps", "0",
           "--num_experts", "0", "--ep_size", "1", "--batch_size", "2", "--ds_config", "zero3"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=CHILD_ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run


def test_upcycle_an_ep_train_dense_run_then_export(tmp_path, dense_run, tokenizer) -> None:
    import sentencepiece as spm

    from ep_train.interop.universal import UniversalSource, find_checkpoint, run_config, to_universal
    from ep_train.model.transformer import build_model

    up, out = tmp_path / "up", tmp_path / "hf"
    r = cli("upcycle", "--dense", str(dense_run), "--output", str(up), "--num-experts", "4")
    assert r.returncode == 0, r.stderr
    step = find_checkpoint(dense_run)
    cfg = run_config(step)
    dense = build_model(cfg.model, cfg.moe, source=UniversalSource(to_universal(step))).eval()
    assert not any(b.is_moe for b in dense.layers)
    moe, _ = from_hf_mixtral(up / "init")
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24))
    with torch.no_grad():
        ref = dense(ids).logits
        assert (moe.eval()(ids).logits - ref).abs().max().item() < 1e-5
    # the upcycled run, not trained yet, exports its init weights, with the dense run's tokenizer
    to_hf(up, out)
    hf = transformers.MixtralForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (hf(ids).logits - ref).abs().max().item() < 1e-5
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in ["def f(x):\n    return  x + 12345", " leading space and tabs\t", "héllo wörld 中文 🙂", ""]:
        assert tok(text)["input_ids"] == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == text
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        sp.bos_id(), sp.eos_id(), sp.pad_id())


def _mixtral(tmp_path: Path, tied: bool = False, shards: bool = True) -> Path:
    torch.manual_seed(5)
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2,
                                                                    tie_word_embeddings=tied))
    hf.save_pretrained(tmp_path / "mixtral", max_shard_size="100KB" if shards else "1GB")
    return tmp_path / "mixtral"


def test_omitted_config_keys_take_transformers_defaults_for_that_model_type() -> None:
    """rope_theta / rms_norm_eps left out of config.json mean transformers' defaults for its model_type:
    Mixtral's differ from Llama's and Mistral's (it read Mixtral's 1e6 for a Llama-2 config.json)."""
    from ep_train.interop.hf import model_config_from_hf

    base = {k: v for k, v in TINY.items() if k != "rope_theta"}
    for kind, ref in (("llama", transformers.LlamaConfig()), ("mistral", transformers.MistralConfig()),
                      ("mixtral", transformers.MixtralConfig())):
        m = model_config_from_hf({**base, "model_type": kind}, kinds=(kind,)).model
        assert (m.rope_theta, m.rms_norm_eps) == (ref.rope_parameters["rope_theta"], ref.rms_norm_eps), kind
    with pytest.raises(ValueError, match=r"config.json \(model_type 'mixtral'\) has no 'num_local_experts'; .*"
                                         "save_pretrained"):
        from ep_train.interop.hf import config_from_hf

        config_from_hf({**TINY, "model_type": "mixtral", "num_experts_per_tok": 2})


def test_an_index_cannot_name_files_outside_its_folder(tmp_path) -> None:
    """A shard name in model.safetensors.index.json is a file beside it: '../x' would be read from, and
    copied to, places outside the folders (from-hf wrote outside --output; train.init_from reads through
    the same weight_map)."""
    src = _mixtral(tmp_path)
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = "../payload.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"weight_map\['{name}'\] = '../payload.safetensors' is not a file name in "
                                         "that folder"):
        from_hf(src, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "payload.safetensors").exists()


def test_a_missing_shard_file_is_named_before_anything_is_read_or_written(tmp_path) -> None:
    """A partial download (a shard the index names is gone): a ValueError naming the file, before from-hf
    writes anything (before: a FileNotFoundError halfway through the tensors)."""
    src = _mixtral(tmp_path)
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[1].unlink()
    with pytest.raises(ValueError, match=rf"names 1 shard file\(s\) missing .*{shards[1].name}; fetch them again"):
        from_hf(src, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_export_refuses_a_bad_shard_size_before_writing(tmp_path) -> None:
    """--max-shard-size is read first: a typo left the tokenizer in --output, and the retry was refused as
    'not empty'."""
    run, src = tmp_path / "run", _mixtral(tmp_path)
    (src / "tokenizer_config.json").write_text("{}")  # copied into --output before the weights are written
    from_hf(src, run)
    with pytest.raises(ValueError, match="5XB"):
        to_hf(run, tmp_path / "out", max_shard_size="5XB")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert (to_hf(run, tmp_path / "out", max_shard_size="100KB") / "config.json").is_file()


def test_from_hf_mixtral_makes_each_parameter_in_the_dtype(tmp_path) -> None:
    model, _ = from_hf_mixtral(_mixtral(tmp_path), dtype=torch.bfloat16)
    fp32, _ = from_hf_mixtral(tmp_path / "mixtral")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for (name, a), (_, b) in zip(model.named_parameters(), fp32.named_parameters()):
        assert torch.equal(a, b.bfloat16()), name


def test_upcycle_refuses_infinite_noise(tmp_path) -> None:
    _, src = _llama(tmp_path, False)
    with pytest.raises(ValueError, match="--noise = inf is invalid"):
        upcycle(src, tmp_path / "up", num_experts=4, noise=float("inf"))
    assert not (tmp_path / "up").exists()


def test_an_untied_model_without_lm_head_is_refused_not_tied(tmp_path) -> None:
    """tie_word_embeddings false and no lm_head.weight: a damaged checkpoint, named; it was silently loaded
    with the embedding as the output layer."""
    from ep_train.interop.hf import HFMixtralSource

    src = _mixtral(tmp_path)
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["lm_head.weight"]
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        HFMixtralSource(src)


def test_upcycle_ignores_the_capacity_choice_and_a_failure_leaves_no_init(tmp_path, monkeypatch) -> None:
    """A base config with moe.capacity_factor (a training choice) upcycles; a write that fails leaves no
    RUN/init behind, so the same command can run again (it was refused as 'already holds a run')."""
    import ep_train.interop.upcycle as up

    _, src = _llama(tmp_path, False)
    base = tmp_path / "base.yaml"
    base.write_text("moe:\n  capacity_factor: 1.25\n")
    real = up.write_hf

    def broken(*a, **k):
        real(*a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(up, "write_hf", broken)
    with pytest.raises(OSError, match="No space left"):
        upcycle(src, tmp_path / "up", num_experts=4, config=base)
    assert not (tmp_path / "up" / "init").exists() and not (tmp_path / "up" / "init.partial").exists()
    monkeypatch.setattr(up, "write_hf", real)
    cfg_file = upcycle(src, tmp_path / "up", num_experts=4, config=base)
    assert "capacity_factor: 1.25" in cfg_file.read_text() and (tmp_path / "up" / "init" / "config.json").is_file()


@pytest.mark.parametrize("add_bos", [False, True])
def test_exported_tokenizer_adds_bos_as_the_training_data_did(tokenizer, tmp_path, add_bos) -> None:
    """build --append-bos data starts every document with BOS: transformers' tokenizer of the export adds it too
    (and only then), so a Hugging Face user's prompts look like the training text."""
    import sentencepiece as spm

    from ep_train.interop.hf_export import write_tokenizer

    write_tokenizer(tokenizer, tmp_path, 64, add_bos=add_bos)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "def f(x):\n    return x"
    assert tok(text)["input_ids"] == sp.encode(text, add_bos=add_bos)


def test_a_base_config_that_routes_otherwise_is_refused_and_training_choices_pass(tmp_path) -> None:
    """from-hf and upcycle take the training recipe from --config; group-limited routing there changes the
    checkpoint's routing at step 0 (from-hf wrote the run anyway, and to-hf refused it later). The capacity
    factor and the expert bias (0 at the start) are training choices: the run is written (upcycle refused
    the bias; from-hf took it)."""
    import yaml

    src = _mixtral(tmp_path)
    _, llama = _llama(tmp_path, False)
    base = tmp_path / "base.yaml"
    base.write_text("moe:\n  num_expert_groups: 2\n  top_groups: 1\n")
    says = (r"routes otherwise than .* from the first step: moe.top_groups = 1 of moe.num_expert_groups = 2 "
            r"\(group-limited routing; .*set moe.top_groups to null")
    with pytest.raises(ValueError, match=says):
        from_hf(src, tmp_path / "a", config=base)
    with pytest.raises(ValueError, match=says):
        upcycle(llama, tmp_path / "b", num_experts=4, config=base)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    base.write_text("moe:\n  num_expert_groups: 2\n  capacity_factor: 1.25\n  expert_bias_update_rate: 0.001\n")
    for cfg_file in (from_hf(src, tmp_path / "a", config=base),
                     upcycle(llama, tmp_path / "b", num_experts=4, config=base)):
        moe = yaml.safe_load(cfg_file.read_text())["moe"]
        assert (moe["num_expert_groups"], moe["top_groups"], moe["capacity_factor"],
                moe["expert_bias_update_rate"]) == (2, None, 1.25, 0.001)
    # a recipe with shared experts: the Mixtral has none, and their width goes with them (not refused as a
    # width without shared experts)
    base.write_text("moe:\n  num_shared_experts: 1\n  shared_expert_intermediate_size: 128\n")
    moe = yaml.safe_load(from_hf(src, tmp_path / "c", config=base).read_text())["moe"]
    assert (moe["num_shared_experts"], moe["shared_expert_intermediate_size"]) == (0, None)


def test_upcycling_an_untied_llama_without_lm_head_is_refused_not_tied(tmp_path) -> None:
    """tie_word_embeddings false and no lm_head.weight: a damaged checkpoint, refused as the Mixtral loader
    refuses it; upcycle tied the output layer to the embedding without a word."""
    from safetensors.torch import load_file, save_file

    _, src = _llama(tmp_path, False)
    weights = load_file(str(src / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\] \(config.json tie_word_embeddings is false"):
        upcycle(src, tmp_path / "up", num_experts=4)
    assert not (tmp_path / "up").exists()


def test_a_moved_run_loads_and_exports_from_its_own_init(tmp_path) -> None:
    """from-hf writes train.init_from absolute: ep_train.load of the run moved elsewhere read the old path
    (to-hf fell back to RUN/init); both now share that fallback, and name train.init_from when it fails."""
    import shutil

    import ep_train

    src = _mixtral(tmp_path)
    from_hf(src, tmp_path / "run")
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "run", moved)
    loaded = ep_train.load(moved)
    assert loaded.weights == moved / "init"
    ref = transformers.MixtralForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert (loaded.model(ids).logits - ref(ids).logits).abs().max().item() < 1e-5
    to_hf(moved, tmp_path / "hf")
    assert tensors(tmp_path / "hf").keys() == hub_names(tensors(src)).keys()
    shutil.rmtree(moved / "init")
    says = r"train.init_from = '.*/run/init' \(the run config of '.*moved'\) is not a folder"
    with pytest.raises(ValueError, match=says):
        ep_train.load(moved)
    with pytest.raises(ValueError, match=says):
        to_hf(moved, tmp_path / "hf2")


def test_reshard_of_a_read_only_checkpoint_says_so(tmp_path, monkeypatch) -> None:
    """reshard writes into the step folder: a read-only one is named before the conversion starts (root
    ignores permissions, so the check is driven through os.access here)."""
    import ep_train.interop.convert as convert
    import ep_train.interop.universal as universal

    step = tmp_path / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    monkeypatch.setattr(universal, "find_checkpoint", lambda path: step)
    monkeypatch.setattr(universal, "to_universal", lambda s: pytest.fail("converted a read-only checkpoint"))
    monkeypatch.setattr(convert.os, "access", lambda path, mode: Path(path) != step)
    with pytest.raises(ValueError, match="is read-only: reshard writes its conversion into the step folder"):
        convert.main(["reshard", "--checkpoint", str(step)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_safetensors_are_streamed_one_tensor_at_a_time(tmp_path, dtype) -> None:
    """write_safetensors holds one tensor in memory, whatever the shard size (it held a whole shard, so
    --max-shard-size 10GB held 10 GB): each value is read only after the previous one is gone, and the files
    read back (safetensors' own reader) as the values, in the shards and index save_pretrained would write."""
    import gc
    import weakref

    from safetensors import safe_open

    from ep_train.interop.hf_export import TensorSpec, write_safetensors

    shapes = [(7, 5), (3,), (4, 4, 2), (11,), (2, 9)]
    values = [torch.randn(s, generator=torch.Generator().manual_seed(i)).to(dtype) for i, s in enumerate(shapes)]
    alive: list[weakref.ref] = []

    def reader(i: int):
        def read() -> torch.Tensor:
            gc.collect()
            assert all(r() is None for r in alive), f"tensor {len(alive)} read while an earlier one is held"
            t = values[i].clone()
            alive.append(weakref.ref(t))
            return t
        return read

    specs = [TensorSpec(f"t{i}", s, reader(i)) for i, s in enumerate(shapes)]
    size = values[0].element_size()
    cap = (32 + 11) * size  # t0 and t1 (35 + 3) fill the first file, t2 + t3 the second, t4 the third
    assert write_safetensors(tmp_path, specs, dtype, cap) == sum(v.numel() for v in values)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["weight_map"] == {"t0": files[0], "t1": files[0], "t2": files[1], "t3": files[1], "t4": files[2]}
    assert index["metadata"]["total_size"] == sum(v.numel() for v in values) * size
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / file), framework="pt") as f:
            got = f.get_tensor(name)
        assert same_bytes(got, values[int(name[1:])]), name
    assert not list(tmp_path.glob("*.tmp"))
