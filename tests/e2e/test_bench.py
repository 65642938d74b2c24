"""Each benchmark at toy size, so they keep working (no timing is asserted: speed lives in docs/benchmarks.md).

``bash bench/run_all --small`` runs once (module fixture); each test checks one benchmark's figures, as
that run returned them (``bench/record.py`` writes them as JSON: dict keys become strings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, dict]:
    results = tmp_path_factory.mktemp("bench_results")
    p = subprocess.run(["bash", str(ROOT / "bench" / "run_all"), "--small"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "BENCH_RESULTS": str(results)}, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return {f.stem: json.loads(f.read_text()) for f in results.glob("*.json")}


def test_run_all_small_ran_every_benchmark(small) -> None:
    assert set(small) == {"moe_layer", "data_prep", "corpus_scale", "train_e2e", "train_e2e_583m", "step_breakdown",
                          "recompute", "moe_vs_dense"}


def test_moe_layer_bench_small(small) -> None:
    from bench.moe_layer import ROUTINGS

    out = small["moe_layer"]
    impls = {"ep-train", "DeepSpeed MoE", "DeepSpeed AutoEP", "HF Mixtral block (1 process)",
             "limit (matmuls + all-to-all)"}
    assert set(out["times"]) == set(ROUTINGS) == {"balanced", "skewed"}
    for case in ROUTINGS:
        assert set(out["times"][case]) == impls
        assert all(min(ts) > 0 for ts in out["times"][case].values())
    # the profiles of the two layers name the operators the time went to
    assert set(out["profiles"]) == {"ep-train", "DeepSpeed MoE"}
    assert all("aten::" in text for text in out["profiles"].values())
    # ep-train's dispatch sends each token once per remote rank: the token-level minimum counted from
    # the routing, below one row per assignment (top-2 of 8 over 2 ranks: many tokens have 2 remote experts)
    sent = out["sent"]
    ours = "ep-train (its all-to-all send splits)"
    per_assignment = "per-assignment rows (routed assignments leaving the rank)"
    assert sent[ours] == sent["token-level minimum (unique token, remote rank pairs)"] > 0
    assert sent[ours] < sent[per_assignment] <= sent["DeepSpeed (padded capacity buffers)"]
    # group-limited routing, one group = one rank per token: both of a crossing token's experts are on
    # that rank, so it sends exactly one row for the two assignments, and fewer rows than unlimited routing
    g = "top_groups 1 of 2: "
    assert 2 * sent[g + ours] == sent[g + per_assignment] > 0
    assert sent[g + ours] == sent[g + "token-level minimum (unique token, remote rank pairs)"] < sent[ours]
    # skewed routing: the calibrated bias reproduces the Zipf shares, the busiest expert carries far more
    # than 1/E, and DeepSpeed's padded buffers make each rank compute more rows than ep-train's busiest rank
    assert max(abs(a - b) for a, b in zip(out["zipf"], out["calibrated"])) < 0.01
    bal, skew = out["load"]["balanced"], out["load"]["skewed"]
    busiest = "busiest expert, rows (tokens of one rank)"
    assert skew[busiest] > 2 * bal[busiest]
    assert skew["DeepSpeed rows per rank (padded)"] > 1.5 * skew["ep-train rows on the busiest rank"]
    assert sent["skewed: " + ours] > 0
    # verdicts are computed for every target, from the run's ratios
    assert set(out["verdicts"]) == {"layer_vs_ds_balanced (balanced)", "layer_vs_ds_skewed (skewed)",
                                    "layer_vs_limit (balanced)", "layer_vs_limit (skewed)"}
    assert set(out["verdicts"].values()) <= {"met", "MISSED"}
    # the combine micro-benchmark timed both implementations
    assert all(len(ts) == 2 and min(ts) > 0 for ts in out["combine"].values()) and len(out["combine"]) == 2


def test_corpus_scale_bench_small(small) -> None:
    """Two corpus sizes: build and array tasks + merge give the same tokens, every process was sampled."""
    out = small["corpus_scale"]
    rows = out["rows"]
    assert len(rows) == 2 and rows[1]["chars"] > 3 * rows[0]["chars"] and rows[1]["tokens"] > 3 * rows[0]["tokens"]
    for r in rows:
        assert r["array_tokens"] == r["tokens"] == r["limit_tokens"]  # the whole toy corpus fits the limit's budget
        assert min(r["build_main_peak"], r["build_worker_peak"], r["array_task_peak"]) > 10 * 2**20
        assert r["build_tok_s"] > 0 and r["limit_tok_s"] > 0
        assert r["text_tokens"] > 0 and min(r["text_main_peak"], r["text_worker_peak"]) > 10 * 2**20
    # --small's 5 MiB text file is below the pieces threshold: the text rows are not compared across sizes
    assert out["growth"] == max(rows[1][k] / rows[0][k] for k in ("build_main_peak", "build_worker_peak",
                                                                   "array_task_peak"))
    # one large .txt file tokenized whole (the earlier path, the reference) and in pieces: the same shards
    cmp = out["compare"]
    assert cmp["same_shards"] and cmp["whole"]["tokens"] == cmp["pieces"]["tokens"] > 0
    assert cmp["whole"]["shards"] and all(len(s) == 3 for s in cmp["pieces"]["shards"])


def test_data_prep_bench_small(small) -> None:
    out = small["data_prep"]
    assert out["tokens"]["ep-train"] > 0 and out["share"] > 0


def test_train_e2e_bench_small(small) -> None:
    out = small["train_e2e"]
    matched, matched_off = ("zero3, AutoEP's initial weights, no router losses",
                            "zero3_offload, AutoEP's initial weights, no router losses")
    assert set(out) == {"zero3_offload", "zero3", "zero2", "zero3_offload, recompute_comm false", matched,
                        matched_off, "DeepSpeed MoE layer, ZeRO-2 (peer)", "DeepSpeed AutoEP, ZeRO-3 (peer)",
                        "DeepSpeed AutoEP, ZeRO-3 + offload (peer)"}
    # From AutoEP's initial weights without router losses ep-train trains AutoEP's function (a transformers Mixtral
    # under DeepSpeed AutoEP, an independent implementation): the same loss at every step, the first before any
    # update (the forward) and the next ones after it (backward, ZeRO-3 + EP gradients, the optimizer)
    for mine, peer in ((matched, "DeepSpeed AutoEP, ZeRO-3 (peer)"),
                       (matched_off, "DeepSpeed AutoEP, ZeRO-3 + offload (peer)")):
        assert len(out[mine]["losses"]) == len(out[peer]["losses"]) == 4
        assert out[mine]["losses"] == pytest.approx(out[peer]["losses"], rel=1e-5), (mine, peer)
        assert out[mine]["expert_counts"] == out[peer]["expert_counts"], (mine, peer)  # the same routing, step by step
        # the verdict's pairs: at --small only the table's runs (tokens/s of each side, their loss drift)
        [(mine_tok, peer_tok, drift)] = out[mine]["pairs"]
        assert mine_tok > 0 and peer_tok > 0 and drift <= 1e-5, out[mine]["pairs"]
    # ... which a run from other weights or with router losses does not (the comparison can fail)
    assert out["zero3"]["losses"][1:] != pytest.approx(out["DeepSpeed AutoEP, ZeRO-3 (peer)"]["losses"][1:], rel=1e-5)
    # the same function with or without the recompute's exchanges: the same final loss
    assert out["zero3_offload, recompute_comm false"]["final_loss"] == pytest.approx(out["zero3_offload"]["final_loss"],
                                                                                     rel=1e-6)
    for r in out.values():
        assert r["elements"] > 0 and r["tok_s"]
        assert "aten::" in r["profile"]  # the profiled step's operator table
    assert out["zero3"]["elements"] < out["zero2"]["elements"]  # ZeRO-3 really partitions parameters
    # AutoEP's ZeRO-3 partitions: each rank holds a share, as ep-train's do
    assert out["DeepSpeed AutoEP, ZeRO-3 (peer)"]["elements"] < out["DeepSpeed MoE layer, ZeRO-2 (peer)"]["elements"]
    # every run reports each step's rows per expert, summed over ranks and micro-batches: each of the 4 MoE
    # layers routes every token of the global batch (16 x 32 tokens at --small) to 2 experts, exactly once
    # (the peers' counts must not include activation checkpointing's recompute)
    for name, r in out.items():
        assert len(r["expert_counts"]) == 4, name
        for step in r["expert_counts"]:
            assert sorted(step) == ["0", "1", "2", "3"], name
            assert {sum(row) for row in step.values()} == {16 * 32 * 2}, (name, step)
        assert 1.0 <= r["rank_load"] <= 2.0, name
    # the peers train at ep-train's learning rates: the same warmup and cosine per step, the router group at the
    # config's multiplier (configs/demo.yaml: 2.0)
    want = out["zero3_offload"]["lr"]
    assert len(want) == 4 and want[0] < want[1]  # a warmup
    for name in ("DeepSpeed MoE layer, ZeRO-2 (peer)", "DeepSpeed AutoEP, ZeRO-3 (peer)"):
        got = out[name]["lr"]
        assert [min(g) for g in got] == pytest.approx(want, rel=1e-9), name
        assert [max(g) for g in got] == pytest.approx([2.0 * w for w in want], rel=1e-9), name


def test_busiest_rank_load_against_hand_counts() -> None:
    from bench.common import busiest_rank_load

    # EP 2, 4 experts: layer 0 rank loads 3 and 1 (busiest 3, mean 2), layer 1 even (2 and 2): (3 + 2) / (2 + 2)
    assert busiest_rank_load({"0": [1, 2, 0, 1], "1": [0, 2, 2, 0]}, 2) == pytest.approx(5 / 4)
    assert busiest_rank_load({"0": [4, 0, 0, 0]}, 2) == 2.0  # one rank gets every row
    assert busiest_rank_load({"0": [1, 1, 1, 1]}, 4) == 1.0


def test_train_e2e_583m_bench_small(small) -> None:
    """`--size 583m --small`: ep-train and the AutoEP peer on the same (here tiny) model, both measured."""
    out = small["train_e2e_583m"]
    matched = "ep-train, ZeRO-3 + offload, AutoEP's initial weights, no router losses"
    assert set(out) == {"ep-train, ZeRO-3 + offload", matched, "DeepSpeed AutoEP, ZeRO-3 + offload (peer)"}
    for r in out.values():
        assert r["tok_s"] and min(r["tok_s"]) > 0 and r["rss"] > 0 and r["final_loss"] > 0
    # the judged row trains AutoEP's function from its weights (micro batch 1 x accumulation 1 here)
    assert out[matched]["losses"] == pytest.approx(out["DeepSpeed AutoEP, ZeRO-3 + offload (peer)"]["losses"], rel=1e-5)


def test_soak_bench_small(tmp_path) -> None:
    from bench.soak import main

    # a 30-step run trains for a few seconds: sample often enough for 3 samples per rank after warm-up
    out = main(["--steps", "30", "--save-interval", "15", "--sample-interval", "0.1", "--out", str(tmp_path)])
    assert sorted(out["per_rank"]) == [0, 1]  # both trainer processes were sampled
    for v in out["per_rank"].values():
        assert v["mean_mib"] > 100 and v["samples"] >= 3
    assert out["tok_s_median"] > 0 and out["final_loss"] > 0


def test_scale_bench_small(tmp_path) -> None:
    """bench/scale.py on a tiny model: every run measured from outside, planned, reported, plotted."""
    from bench.scale import main

    out = main(["--small", "--out", str(tmp_path)])
    assert [r["world"] for r in out["scaling"]] == [1, 2]
    for r in out["scaling"] + out["largest"]:
        assert not r.get("skipped"), r
        assert r["finite"] and len(r["setup_peak"]) == len(r["train_peak"]) == r["world"]
        assert 0 < max(r["setup_peak"]) <= max(r["train_peak"])  # VmHWM only grows
        # Two readings of one kernel counter: from outside (polled, may miss the last moments) and the rank's own
        # after its last save. The outside one can only be lower, and the step records lie between them.
        assert len(r["outside_peak"]) == len(r["trainer_final"]) == r["world"]
        for outside, own, peak in zip(r["outside_peak"], r["trainer_final"], r["train_peak"]):
            assert 0 < outside <= own + 2 * 2**20 and peak == max(outside, own)
        assert max(r["setup_peak"]) <= r["trainer_max_rss"] <= max(r["train_peak"]) + 2**20
        assert r["plan_host"] > 0
    assert {r["precision"] for r in out["largest"]} == {"fp32", "bf16"}
    # parameters and optimizer states on NVMe (ZeRO-Infinity), or the reason it could not run here
    [nvme] = out["nvme"]
    if nvme.get("skipped"):
        assert "not run:" in nvme["skipped"] and "**not measured**" in out["text"]
    else:
        assert nvme["finite"] and nvme["ep"] == 1 and nvme["swap_bytes"] > 0 and nvme["plan_host"] > 0, nvme
        assert "| bf16 | 2l |" in out["text"].split("NVMe offload at world 2")[1]
    assert isinstance(out["shrinks"], bool) and "shrinks with the world size" in out["text"]
    assert "bytes / parameter" in out["text"] and "| 2 | 2 |" in out["text"]
    assert (tmp_path / "scale.png").stat().st_size > 0 and (tmp_path / "scale.csv").is_file()


def test_offline_memory_bench_small(tmp_path) -> None:
    """bench/offline_memory.py on a tiny model: both converters and both analyses measured from outside, their
    outputs compared."""
    from bench.offline_memory import main

    out = main(["--small", "--out", str(tmp_path)])
    rows, analyses = out["rows"], out["analyses"]
    assert [(r["layers"], r["which"]) for r in rows] == [(1, "deepspeed"), (1, "ep-train"),
                                                        (2, "deepspeed"), (2, "ep-train")]
    assert [(r["layers"], r["which"]) for r in analyses] == [(1, "whole model"), (1, "block by block"),
                                                            (2, "whole model"), (2, "block by block")]
    for r in rows + analyses:
        assert r["ok"] and 0 < r["peak_anon"] <= r["peak_rss"], r
    for stock, ours in zip(rows[::2], rows[1::2]):
        assert ours["same_as_deepspeed"] is True, ours["differences"]
        assert 0 < ours["out_bytes"] < stock["out_bytes"]  # rank 0's optimizer shard is not copied
    assert all(r["same_as_whole"] is True for r in analyses[1::2])
    assert set(out["growth"]) == {"deepspeed", "ep-train"} and set(out["analysis_growth"]) == set(
        ["whole model", "block by block"])
    assert "| 2 | 746,304 |" in out["text"] and "routing equal to the whole model's" in out["text"]


def test_moe_vs_dense_bench_small(small) -> None:
    """Both models train on the same tokens; active parameters matched up to the routers."""
    from bench.moe_vs_dense import reading

    out = small["moe_vs_dense"]
    d, m = out["dense"], out["moe"]
    assert d["val"] and m["val"] and d["val"][-1][0] == m["val"][-1][0]  # same token budget
    assert m["total"] > d["total"] and abs(m["active"] - d["active"]) / d["active"] < 0.05
    assert d["tok_s"] > 0 and m["tok_s"] > 0
    assert "validation loss" in reading(out)


def test_recompute_bench_small(small) -> None:
    """Every policy runs end to end and computes the same function."""
    out = small["recompute"]
    assert set(out) == {"no recompute", "recompute full blocks", "recompute attention only", "recompute experts only",
                        "full recompute, exchanges reused", "full recompute + document mask"}
    losses = [r["loss"] for k, r in out.items() if "document mask" not in k]
    assert max(losses) - min(losses) < 1e-4
    assert all(r["tok_s"] > 0 and r["rss"] > 0 for r in out.values())


def test_step_breakdown_bench_small(small) -> None:
    """bench/step_breakdown.py on a tiny model: a profiled trainer step split into disjoint categories."""
    from bench.step_breakdown import CATEGORIES, COLLECTIVES

    out = small["step_breakdown"]
    assert sorted(out["per_rank"]) == ["0", "1"]
    for r in out["per_rank"].values():
        assert set(CATEGORIES) <= set(r) and r["step"] > 0
        assert all(r[c] >= 0 for c in CATEGORIES)
        assert abs(sum(r[c] for c in CATEGORIES) - r["step"]) <= 1e-3 * r["step"]  # disjoint, sum to the step
        assert r["expert matmuls"] > 0 and r["dense matmuls"] > 0 and r["all-to-all"] > 0
        assert r["optimizer"] > 0  # the trainer's engine.step() scope was found
        # the two ranks' collective calls pair up; a wait for the other rank is part of that collective's time
        waits = r["arrival_waits"]
        assert waits is not None and all(0 <= waits[c] <= r[c] + 1e-6 for c in COLLECTIVES), waits
    assert out["verdict"] in ("met", "MISSED") and "bench/targets.py" in out["text"]
