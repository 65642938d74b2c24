"""`ep-train generate` as users run it, on a Hugging Face Mixtral folder with a sentencepiece tokenizer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def ep_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ep_train.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def hf_dir(tokenizer, tmp_path_factory) -> Path:
    """A random tiny Mixtral (vocab = the tokenizer's 1000 pieces, context 32) with tokenizer.model beside it."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=1000, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=32, rope_theta=10000.0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(out)
    shutil.copy(tokenizer, out / "tokenizer.model")
    return out


def test_generate_prints_completions_and_throughput(hf_dir, tmp_path) -> None:
    p = ep_train("generate", "--checkpoint", str(hf_dir), "--prompt", "def ", "--max-new-tokens", "5")
    assert p.returncode == 0, p.stderr
    assert "=== 'def '\ndef " in p.stdout
    assert "5 tokens in" in p.stdout and "tokens/s (1 prompt(s), KV cache, cpu)" in p.stdout
    greedy = p.stdout.split("\n")[1]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import json\n\nclass Foo:\n")
    p = ep_train("generate", "--checkpoint", str(hf_dir), "--prompt", "def ", "--prompts-file", str(prompts),
                 "--max-new-tokens", "5", "--no-kv-cache", "--experts-per-token", "1", "--temperature", "0.8",
                 "--top-p", "0.9", "--top-k", "50", "--seed", "1")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("=== ") == 3 and "15 tokens in" in p.stdout and "no KV cache" in p.stdout
    p = ep_train("generate", "--checkpoint", str(hf_dir), "--prompt", "def ", "--max-new-tokens", "5", "--no-kv-cache")
    assert p.returncode == 0 and p.stdout.split("\n")[1] == greedy, p.stderr  # same greedy text without the cache


def test_generate_clear_errors(hf_dir, tmp_path) -> None:
    long_prompt = "def function_with_a_long_name(argument, another_argument):\n    return argument\n" * 3
    p = ep_train("generate", "--checkpoint", str(hf_dir), "--prompt", long_prompt, "--max-new-tokens", "5")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "ep-train generate: error: prompt 0 'def function_with" in p.stderr
    assert "model.max_seq_len = 32" in p.stderr and "Traceback" not in p.stderr
    p = ep_train("generate", "--checkpoint", str(hf_dir), "--prompt", "def ", "--max-new-tokens", "40")
    assert p.returncode == 2 and "lower max_new_tokens to" in p.stderr, p.stderr
    p = ep_train("generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "def ")
    assert p.returncode == 2 and "missing' does not exist" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = ep_train("generate", "--checkpoint", str(hf_dir), "--prompt", "def ", "--experts-per-token", "9",
                 "--max-new-tokens", "5")
    assert p.returncode == 2 and "experts_per_token = 9" in p.stderr, p.stderr


def test_generate_under_torchrun_is_expert_parallel(hf_dir) -> None:
    """Two processes, each holding half of every layer's experts, print what one process prints."""
    from tests.distributed.harness import free_port

    args = ["generate", "--checkpoint", str(hf_dir), "--prompt", "def ", "--prompt", "import os",
            "--prompt", "class ", "--max-new-tokens", "6"]
    alone = ep_train(*args)
    assert alone.returncode == 0, alone.stderr
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "ep_train.cli", *args], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    completions = alone.stdout.rsplit("\n", 2)[0]  # all but the tokens/s line
    assert p.stdout.startswith(completions + "\n") and p.stdout.count("=== ") == 3, (p.stdout, alone.stdout)
    assert "18 tokens in" in p.stdout and "(3 prompt(s), KV cache, cpu, 2 processes, expert parallel)" in p.stdout
    bad = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port",
                          str(free_port()), "-m", "ep_train.cli", *args], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert bad.returncode != 0 and "launch a number of processes that divides moe.num_experts (4)" in bad.stderr
