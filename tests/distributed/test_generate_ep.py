"""Expert-parallel generation (``load(..., ep_group=)``, ``generate_tokens(..., group=)``) over gloo processes
gives the tokens of the whole model in one process, while each rank holds only its share of the experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ep_train.api import load
from ep_train.generation import generate_tokens
from ep_train.model.experts import GroupedExperts
from tests.distributed.harness import run_distributed

# Rank 0 continues prompts 0, 2, 4 (lengths 3, 4, 7: three batches), rank 1 prompts 1, 3 (5, 6: two): rank 1
# runs out of work first and must keep stepping with the other (the idle forward).
LENGTHS = [3, 5, 4, 6, 7]
NEW = 8


@pytest.fixture(scope="module")
def sharp_hf(tmp_path_factory) -> Path:
    """A random tiny Mixtral (4 experts, top-2) with large weights: decisive routing and logits, so a token
    sent to the wrong expert or rank changes the argmax."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("hf_sharp")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=32, rope_theta=10000.0,
                                     initializer_range=0.3)
    transformers.MixtralForCausalLM(cfg).save_pretrained(out)
    return out


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 64, (n,), generator=g).tolist() for n in LENGTHS]


def _runs(model: torch.nn.Module, eos: int, group: dist.ProcessGroup | None) -> tuple[list, list]:
    p = _prompts()
    greedy = generate_tokens(model, p, NEW, eos_id=eos, group=group).tokens
    sampled = generate_tokens(model, p, NEW, temperature=1.0, top_k=20, seed=3, group=group).tokens
    return greedy, sampled


def _worker(rank: int, world: int, folder: Path, eos: int) -> dict:
    torch.set_num_threads(1)
    model = load(folder, ep_group=dist.group.WORLD).model
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    greedy, sampled = _runs(model, eos, dist.group.WORLD)
    return {"ids": [m.global_expert_ids for m in experts], "rows": [m.w1.shape[0] for m in experts],
            "elements": sum(p.numel() for p in model.parameters()), "greedy": greedy, "sampled": sampled}


def test_expert_parallel_generation_equals_one_process(sharp_hf) -> None:
    whole = load(sharp_hf).model  # the reference: every expert in this process
    free = generate_tokens(whole, _prompts(), NEW).tokens
    eos = free[0][2]  # prompt 0 stops at its 3rd token or before: its rank moves on while the other works
    ref_greedy, ref_sampled = _runs(whole, eos, None)
    assert len(ref_greedy[0]) <= 3 and any(len(t) == NEW for t in ref_greedy), ref_greedy
    expert_elements = sum(p.numel() for m in whole.modules() if isinstance(m, GroupedExperts)
                          for p in m.parameters())
    dense_elements = sum(p.numel() for p in whole.parameters()) - expert_elements

    out = run_distributed(_worker, 2, sharp_hf, eos, timeout=240)
    for rank, r in enumerate(out):
        assert r["greedy"] == ref_greedy, (rank, r["greedy"], ref_greedy)
        assert r["sampled"] == ref_sampled, (rank, r["sampled"], ref_sampled)
        assert r["ids"] == [[2 * rank, 2 * rank + 1]] * 2 and r["rows"] == [2, 2], r
        assert r["elements"] == dense_elements + expert_elements // 2, (r["elements"], dense_elements)


def _refused(rank: int, world: int, folder: Path) -> str:
    try:
        load(folder, ep_group=dist.group.WORLD)
    except ValueError as e:
        return str(e)
    return "loaded"


def test_expert_parallel_generation_refuses_an_uneven_split(sharp_hf) -> None:
    msgs = run_distributed(_refused, 3, sharp_hf, timeout=240)
    for m in msgs:  # every rank gets the error (none is left waiting for the others)
        assert "over 3 processes" in m and "its 4 experts per MoE layer" in m and "divides moe.num_experts (4)" in m, m


def _outcome(rank: int, world: int, folder: Path, prompts_differ: bool) -> str:
    try:
        model = load(folder, ep_group=dist.group.WORLD).model
        p = _prompts()
        generate_tokens(model, p[rank:] if prompts_differ else p, 2, group=dist.group.WORLD)
    except Exception as e:  # the failed rank raises its own error (any type), the others a ValueError
        return f"{type(e).__name__}: {e}"
    return "generated"


def test_a_failure_on_one_rank_stops_every_rank(sharp_hf, tmp_path) -> None:
    """Rank 1 alone reads experts 2 and 3; when expert 3's weight is not where the index says, rank 1 fails while
    reading and rank 0 (which had loaded its share) must fail too, not wait in the first all-to-all for the
    process group's timeout. Different prompts on the ranks are refused on both, before any step."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sharded"
    shutil.copytree(sharp_hf, folder)
    single = folder / "model.safetensors"
    tensors = load_file(str(single))
    single.unlink()
    names = sorted(tensors)
    moved = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    assert moved in tensors, names  # save_pretrained writes the Hub's per-expert names
    a = {k: tensors[k] for k in names if k != moved}
    save_file(a, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file({"unused": torch.zeros(1)}, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in a}
    weight_map[moved] = "model-00002-of-00002.safetensors"  # exists, but does not hold it
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    out = run_distributed(_outcome, 2, folder, False, timeout=240)
    assert "experts.3.w1" in out[1] and out[0].startswith("ValueError: rank 1 of the expert-parallel group: "), out
    out = run_distributed(_outcome, 2, sharp_hf, True, timeout=240)
    assert all("asked for different generations" in o and "rank(s) [1]" in o for o in out), out
