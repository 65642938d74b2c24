"""End-to-end training throughput and memory of ep-train under each DeepSpeed config.

    python bench/train_e2e.py [--steps 30] [--small] [--write]

The same model (configs/demo.yaml), data (the Python standard library, tokenized here) and batch,
2 processes, EP 2: ZeRO-3 + CPU offload (default), ZeRO-3, ZeRO-2. Peer: the same model with
DeepSpeed's MoE layer under ZeRO-2 (bench/ds_moe_train.py). Reports tokens/s (median over the
logged steps after the first few), peak RSS of the largest rank, and model-state elements per rank
measured from the ZeRO partitions against the ideal (dense + experts) / world.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import append_section, busiest_rank_load, free_port, loss_of, machine, stdlib_data  # noqa: E402
from bench.targets import TARGETS, describe, figure  # noqa: E402
from bench.targets import verdict as target_verdict  # noqa: E402


PROFILE_STEP = 3  # one step of every run runs under torch.profiler; its time is left out of the stats
DS_MOE = "DeepSpeed MoE layer, ZeRO-2 (peer)"
AUTOEP = "DeepSpeed AutoEP, ZeRO-3 (peer)"
AUTOEP_OFF = "DeepSpeed AutoEP, ZeRO-3 + offload (peer)"
REUSE = "zero3_offload, recompute_comm false"
# ep-train from the AutoEP peer's initial weights and without router losses (AutoEP computes none): the same
# function from the same start as the peer, so both routers begin identical (what the AutoEP target is judged on)
MATCHED = "zero3, AutoEP's initial weights, no router losses"
MATCHED_OFF = "zero3_offload, AutoEP's initial weights, no router losses"
EP_SIZE = 2  # every run: 2 processes, EP 2 (configs/demo.yaml)



def _span(r: dict) -> str:
    return f"{min(r['tok_s']):,.0f}-{max(r['tok_s']):,.0f}"


def _overlap(a: dict, b: dict) -> bool:
    """Whether two runs' per-step tokens/s ranges overlap (then one run of each does not settle a small ratio)."""
    return min(a["tok_s"]) <= max(b["tok_s"]) and min(b["tok_s"]) <= max(a["tok_s"])


def _offload_sentence(ratio: float, overlap: bool) -> str:
    """ZeRO-3 + offload's tokens/s against ZeRO-3's, worded by the sign of the difference (on a CPU-only machine
    offload moves nothing off a GPU, and either may come out ahead); ``overlap``: the two runs' per-step ranges
    overlap, so one run of each does not settle the difference."""
    caveat = (" (one run of each; their per-step tokens/s ranges overlap: not a settled difference)" if overlap
              else " (one run of each)")
    if round(ratio, 2) == 1.0:
        return f"ZeRO-3 + offload runs at {ratio:.2f}x the tokens/s of ZeRO-3{caveat}."
    how = "costs" if ratio < 1 else "gains"
    return f"Offload {how}: ZeRO-3 + offload runs at {ratio:.2f}x the tokens/s of ZeRO-3{caveat}."


def _top(table: str, rows: int = 12) -> str:
    """The header and first ``rows`` operators of a torch.profiler table."""
    lines = table.strip().splitlines()
    return "\n".join(lines[:3 + rows] + [lines[-1]])


def save_autoep_init(cfg, out: Path) -> Path:  # type: ignore[no-untyped-def]
    """The AutoEP peer's seeded ``MixtralForCausalLM`` (bench/autoep_train.py ``hf_mixtral``) written as a Hugging
    Face folder (config.json + model.safetensors): the peer loads it back, ep-train starts from it
    (``train.init_from``), so both train from the same weights."""
    from safetensors.torch import save_file

    from bench.autoep_train import hf_mixtral

    model = hf_mixtral(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(out))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def like_for_like(init: Path) -> list[str]:
    """ep-train's overrides for AutoEP's function from AutoEP's initial weights (``save_autoep_init``'s folder)."""
    return ["--init_from", str(init), "--aux_loss_weight", "0", "--router_z_loss_weight", "0"]


def loss_drift(mine: dict, peer: dict) -> float:
    """The largest relative difference between two runs' per-step losses (same number of steps)."""
    return max(abs(a - b) / abs(b) for a, b in zip(mine["losses"], peer["losses"], strict=True))


def _per_step(recs: list[dict], warm: list[dict]) -> dict:
    """What ep-train's and the peers' per-step lines both give: ``recs`` every step, ``warm`` the counted ones."""
    return {"tok_s": [r["tokens_per_sec"] for r in warm], "rss": recs[-1]["max_rss_mb"],
            # median over the counted steps of the busiest EP rank's expert rows over the mean rank's
            "rank_load": statistics.median(busiest_rank_load(r["expert_counts"], EP_SIZE) for r in warm),
            "expert_counts": [r["expert_counts"] for r in recs],
            "losses": [loss_of(r) for r in recs],  # per step: the mean over ranks and micro-batches
            "final_loss": loss_of(recs[-1]),
            "lr": [r["lr"] for r in recs]}  # per step: ep-train the dense parameters' rate, a peer one per group


def run(ds_config: str, data: Path, tok: Path, out: Path, steps: int, extra: list[str], label: str = "") -> dict:
    run_dir = out / (label or ds_config)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "ep_train.train", "--config",
           str(ROOT / "configs/demo.yaml"), "--run-dir", str(run_dir), "--data_dir", str(data), "--tokenizer",
           str(tok), "--ds_config", ds_config, "--max_steps", str(steps),
           "--warmup_steps", str(min(20, steps)), "--log_interval", "1", "--eval_interval",
           "0", "--save_interval", "0", "--profile_step", str(PROFILE_STEP), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"{ds_config} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "tokens_per_sec" in r]
    warm = [r for r in recs[min(3, len(recs) - 1):] if r["step"] != PROFILE_STEP]
    parts = [json.loads((run_dir / "partitions" / f"rank{r}.json").read_text()) for r in range(2)]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the final save: 9.3 GB at 583M, not measured here
    return {**_per_step(recs, warm), "elements": max(p["dense"] + p["expert"] for p in parts),
            "profile": _top((run_dir / "profile" / f"rank0_step{PROFILE_STEP}.txt").read_text())}


def run_peer(script: str, data: Path, out: Path, steps: int, extra: list[str]) -> dict:
    """A peer script (bench/ds_moe_train.py, bench/autoep_train.py) on the same config, data and batch."""
    log = out / f"peer_{len(list(out.glob('peer_*.jsonl')))}.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "bench" / script), "--config",
           str(ROOT / "configs/demo.yaml"), "--data_dir", str(data), "--steps", str(steps), "--out", str(log),
           "--profile_step", str(PROFILE_STEP), *extra,
           # the learning-rate schedule ep-train's run() gets (bench/common.py peer_optimizer_settings)
           "--max_steps", str(steps), "--warmup_steps", str(min(20, steps))]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"peer {script} {extra} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    warm = [r for r in recs[min(3, len(recs) - 1):] if not r["profiled"]]
    return {**_per_step(recs, warm), "elements": recs[-1]["elements"],
            "profile": _top(Path(f"{log}.rank0.profile.txt").read_text())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--repeats", type=int, default=3,
                    help="demo: runs of each judged pair (ep-train from AutoEP's weights, then AutoEP), with and "
                         "without offload; the AutoEP verdict takes the median of the pairs' ratios (1 at --small)")
    ap.add_argument("--size", choices=("demo", "583m"), default="demo",
                    help="583m: ep-train against DeepSpeed AutoEP on bench/scale.py's 583M model (ZeRO-3 + offload)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: at least 1 (one pair: the table's runs)")
    if args.size == "583m":
        return main_583m(args)
    from ep_train.config import load_config, parse_overrides
    from ep_train.sizes import model_size

    tmp = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    tok, _ = stdlib_data(tmp, ["json", "email", "asyncio"], 4096)
    # every layer MoE: a transformers Mixtral (the AutoEP peer) has no dense layers
    extra = ["--moe_layers", "[0, 1, 2, 3]"]
    if args.small:
        extra += ["--hidden_size", "32", "--intermediate_size", "64", "--seq_len", "32"]
    steps = 4 if args.small else args.steps
    cfg = load_config(ROOT / "configs/demo.yaml", parse_overrides(extra))  # the model every run trains
    size = model_size(cfg)
    init = save_autoep_init(cfg, tmp / "autoep_init")
    results = {name: run(name, tmp / "data", tok, tmp, steps, extra) for name in ("zero3_offload", "zero3", "zero2")}
    # not the default: the recompute reuses the forward's exchanges (more memory); reported, not judged
    results[REUSE] = run("zero3_offload", tmp / "data", tok, tmp, steps, extra + ["--recompute_comm", "false"],
                         label="zero3_offload_reuse")
    same = like_for_like(init)
    results[MATCHED] = run("zero3", tmp / "data", tok, tmp, steps, extra + same, label="zero3_matched")
    results[MATCHED_OFF] = run("zero3_offload", tmp / "data", tok, tmp, steps, extra + same,
                               label="zero3_offload_matched")
    results[DS_MOE] = run_peer("ds_moe_train.py", tmp / "data", tmp, steps, extra)
    peer = extra + ["--init_from", str(init)]
    results[AUTOEP] = run_peer("autoep_train.py", tmp / "data", tmp, steps, peer + ["--ds_config", "zero3"])
    results[AUTOEP_OFF] = run_peer("autoep_train.py", tmp / "data", tmp, steps, peer + ["--ds_config",
                                                                                         "zero3_offload"])
    # The judged ratio again from pairs run back to back (one run of either system varies by several percent from
    # the next): the verdict takes the median of the pairs' ratios.
    judged = {MATCHED: ("zero3", AUTOEP), MATCHED_OFF: ("zero3_offload", AUTOEP_OFF)}
    for mine, (_, peer_name) in judged.items():
        results[mine]["pairs"] = [(statistics.median(results[mine]["tok_s"]),
                                   statistics.median(results[peer_name]["tok_s"]),
                                   loss_drift(results[mine], results[peer_name]))]
    for i in range(1, 1 if args.small else args.repeats):
        for mine, (ds_config, peer_name) in judged.items():
            a = run(ds_config, tmp / "data", tok, tmp, steps, extra + same, label=f"{ds_config}_matched_{i}")
            b = run_peer("autoep_train.py", tmp / "data", tmp, steps, peer + ["--ds_config", ds_config])
            results[mine]["pairs"].append((statistics.median(a["tok_s"]), statistics.median(b["tok_s"]),
                                           loss_drift(a, b)))
    ideal = size.total / 2  # (dense + experts) / world: each rank E/ep experts over world/ep EDP ranks
    shutil.rmtree(tmp, ignore_errors=True)
    profiles = "\n".join(f"{name} (rank 0, step {PROFILE_STEP}):\n\n```\n{results[name]['profile']}\n```\n"
                         for name in ("zero3", AUTOEP, DS_MOE))
    base = statistics.median(results["zero3_offload"]["tok_s"])
    rows = ["| run | tokens/s, median (min-max) | vs ZeRO-3 + offload | busiest EP rank's expert rows / mean | "
            "peak RSS, largest rank | parameter elements held per rank | vs ideal |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        med = statistics.median(r["tok_s"])
        rows.append(f"| {name} | {med:,.0f} ({min(r['tok_s']):,.0f}-{max(r['tok_s']):,.0f}) | {med / base:.2f} | "
                    f"{r['rank_load']:.2f} | {r['rss']:,.0f} MiB | {r['elements']:,} | {r['elements'] / ideal:.2f} |")
    table = "\n".join(rows)
    print(table)
    med = {k: statistics.median(r["tok_s"]) for k, r in results.items()}
    vs_ds = med["zero3"] / med[DS_MOE]
    offload_overlap = _overlap(results["zero3_offload"], results["zero3"])
    ratios = {k: [a / b for a, b, _ in results[k]["pairs"]] for k in judged}
    vs_aep, vs_aep_off = statistics.median(ratios[MATCHED]), statistics.median(ratios[MATCHED_OFF])
    drift = {k: max(d for _, _, d in results[k]["pairs"]) for k in judged}
    n_pairs = len(ratios[MATCHED])
    pairs_note = ""
    if n_pairs > 1:
        span = {k: {side: f"{min(p[side] for p in results[k]['pairs']):,.0f}-"
                          f"{max(p[side] for p in results[k]['pairs']):,.0f}" for side in (0, 1)} for k in judged}
        pairs_note = (f" Median of {n_pairs} pairs of runs (the table's runs, then {n_pairs - 1} more pairs run "
                      f"back to back): without offload {', '.join(f'{x:.2f}x' for x in ratios[MATCHED])}; with offload "
                      f"{', '.join(f'{x:.2f}x' for x in ratios[MATCHED_OFF])}. Tokens/s over the pairs: ep-train "
                      f"{span[MATCHED][0]} and AutoEP {span[MATCHED][1]} without offload, ep-train "
                      f"{span[MATCHED_OFF][0]} and AutoEP {span[MATCHED_OFF][1]} with offload.")
    verdict = (f"Targets (bench/targets.py, {TARGETS['e2e_vs_autoep'].source}): ep-train ZeRO-3 + EP "
               f"{describe('e2e_vs_autoep')} DeepSpeed AutoEP's tokens/s under ZeRO-3, with and without offload, "
               f"judged on the rows that train AutoEP's function from AutoEP's initial weights: "
               f"**{target_verdict('e2e_vs_autoep', min(vs_aep, vs_aep_off))}** "
               f"({figure('e2e_vs_autoep', vs_aep, 2)} without offload, {figure('e2e_vs_autoep', vs_aep_off, 2)} "
               f"with offload; their per-step losses differ from AutoEP's by at most "
               f"{drift[MATCHED]:.1e} and {drift[MATCHED_OFF]:.1e} relative over the {steps} steps, in every pair)."
               f"{pairs_note} ep-train's "
               f"default rows (its own initial weights and router losses) run at {med['zero3'] / med[AUTOEP]:.2f}x "
               f"and {med['zero3_offload'] / med[AUTOEP_OFF]:.2f}x AutoEP's tokens/s. "
               f"ep-train ZeRO-3 {describe('e2e_vs_ds_moe')} DeepSpeed-MoE under ZeRO-2: "
               f"**{target_verdict('e2e_vs_ds_moe', vs_ds)}** (ZeRO-3 {figure('e2e_vs_ds_moe', vs_ds, 2)}, "
               f"ZeRO-3 + offload "
               f"{med['zero3_offload'] / med[DS_MOE]:.2f}x the peer; on the peer's own ZeRO stage ep-train is "
               f"{med['zero2'] / med[DS_MOE]:.2f}x; judged on one run of each, not paired: tokens/s per step "
               f"{_span(results['zero3'])} for ZeRO-3 and {_span(results[DS_MOE])} for the peer"
               f"{', ranges that overlap' if _overlap(results['zero3'], results[DS_MOE]) else ''}). "
               f"{_offload_sentence(med['zero3_offload'] / med['zero3'], offload_overlap)} With `train.recompute_comm: "
               f"false` (not the default: the recompute reuses the forward's all-to-all results and keeps them), "
               f"ZeRO-3 + offload runs at {med[REUSE] / med['zero3_offload']:.2f}x its default's tokens/s, "
               f"{med[REUSE] / med[AUTOEP_OFF]:.2f}x AutoEP's with offload and {med[REUSE] / med[DS_MOE]:.2f}x "
               "DeepSpeed-MoE's (reported, not judged).")
    load = {k: r["rank_load"] for k, r in results.items()}
    same_routing = all(results[mine]["expert_counts"] == results[peer]["expert_counts"]
                       for mine, peer in ((MATCHED, AUTOEP), (MATCHED_OFF, AUTOEP_OFF)))
    balance = (f"Routing balance between the two ranks (the table's busiest-rank column, median over the counted "
               f"steps): ep-train ZeRO-3 {load['zero3']:.2f}, ZeRO-3 + offload {load['zero3_offload']:.2f}; from "
               f"AutoEP's weights without router losses {load[MATCHED]:.2f} and {load[MATCHED_OFF]:.2f}; AutoEP "
               f"{load[AUTOEP]:.2f} and {load[AUTOEP_OFF]:.2f}; DeepSpeed-MoE {load[DS_MOE]:.2f}. At 1.00 each rank's "
               "experts get half the rows; above it, in ep-train and AutoEP the other rank waits at every MoE layer "
               "for the busier one (DeepSpeed's MoE layer pads every expert to the busiest expert's count on every "
               "rank instead, so its cost follows that count).")
    print(verdict + "\n" + balance)
    if args.write:
        append_section("End-to-end training and memory", f"""
`python bench/train_e2e.py --steps {steps} --write` on {machine()}.
configs/demo.yaml with every layer MoE (`--moe_layers '[0, 1, 2, 3]'`, as in a `transformers` Mixtral;
{size.total:,} parameters, {size.active:,} active per token), 2 processes, EP 2,
global batch 16 x 128 tokens, activation checkpointing, fp32 on CPU; {steps} steps, the first 3 not counted.

{table}

{verdict}

{balance}

ZeRO-3 vs ZeRO-2 is the price of partitioning parameters (gather before use, release after), which the
DeepSpeed-MoE peer does not pay because its layer refuses ZeRO-3. Where a step's time goes at 583M:
the "Where a step goes" section (bench/step_breakdown.py).

"Parameter elements held per rank" is read from each rank's ZeRO partitions (`partitions/rank*.json`
written by the trainer; the largest rank shown); the ideal is (dense + experts) / world = {ideal:,.0f}:
under ZeRO-3 each rank keeps E/ep experts partitioned over its world/ep expert-data-parallel ranks.
ZeRO-2 keeps full parameters on every rank (its partitioning covers gradients and optimizer states).
Model-state bytes follow from the elements: fp32 parameter + gradient + two Adam moments = 16 bytes each.

On offload: on this CPU-only machine "offload" moves nothing off a GPU, so the difference is
DeepSpeed's offload machinery (CPU Adam, host buffers) rather than PCIe traffic.
The DeepSpeed-MoE row is the same model with `deepspeed.moe.layer.MoE` (top-2, ep_size 2,
`drop_tokens=False`) in the MoE layers, trained by DeepSpeed under ZeRO-2 (DeepSpeed's MoE layer refuses
ZeRO-3) with torch AdamW (no offload). The AutoEP rows are the same sizes as a `transformers`
`MixtralForCausalLM` that `deepspeed.initialize` converts (expert_parallel autoep_size 2, preset mixtral)
under the same DeepSpeed JSONs, optimizer kind and activation checkpointing (bench/autoep_train.py);
it computes no router losses (AutoEP does not support them yet), ep-train computes both. Both peers train
with ep-train's optimizer settings (bench/common.py `peer_optimizer_settings`: the router at the config's
learning-rate multiplier, no weight decay on 1-D parameters, the same warmup and cosine schedule), so
their routers move at the same rates; how evenly the routers split the tokens between the two ranks
still differs from run to run and moves tokens/s (the busier rank sets the pace). The busiest-rank column is
computed the same way for every run (bench/common.py `busiest_rank_load`): from each step's rows per expert,
summed over ranks and micro-batches (ep-train's metrics.jsonl `expert_counts`; for the peers, DeepSpeed-MoE's gate
counts and AutoEP's router counts, taken in the forward pass only), the busiest rank's rows over the mean
rank's, summed over the MoE layers (the counts are per step: a single micro-batch can be more uneven).
The ep-train rows are `ep_train.train` under each DeepSpeed config. The rows "AutoEP's initial weights, no
router losses" start from the AutoEP peer's own seeded `MixtralForCausalLM`, saved as a Hugging Face folder that
both load (`train.init_from`; bench/train_e2e.py `save_autoep_init`), with `--aux_loss_weight 0
--router_z_loss_weight 0`: the function AutoEP trains, from the same start, on the same data and optimizer
settings, so that their tokens/s compare the systems alone. Both gave every expert the same number of rows at
every step (the per-step counts compared, with and without offload): **{'yes' if same_routing else 'NO'}**; their
losses agree as the verdict says. The default rows keep ep-train's initial weights and
router losses: another routing history, whose balance between the ranks moves tokens/s (see the busiest-rank
column).

Where the time goes: step {PROFILE_STEP} of each run under torch.profiler (operators by self CPU time; the
trainer's `--profile_step N` writes the same table and a Chrome trace to `RUN_DIR/profile/`):

{profiles}
""")
    return results


def main_583m(args: argparse.Namespace) -> dict:
    """ep-train and DeepSpeed AutoEP on the 583M MoE of bench/scale.py, both under ZeRO-3 + CPU offload."""
    from bench.scale import MODEL_583M, MODEL_SMALL

    model = MODEL_SMALL if args.small else MODEL_583M
    steps = 5 if args.small else args.steps
    tmp = Path(tempfile.mkdtemp(prefix="bench_e2e583_"))
    tok, _ = stdlib_data(tmp, ["json", "email", "asyncio"], model["vocab_size"])
    extra = [a for k, v in model.items() for a in (f"--{k}", str(v))]
    extra += ["--moe_layers", str(list(range(model["num_layers"]))), "--micro_batch_size", "1", "--batch_size", "2",
              "--seq_len", "128"]
    from ep_train.config import load_config, parse_overrides

    init = save_autoep_init(load_config(ROOT / "configs/demo.yaml", parse_overrides(extra)), tmp / "autoep_init")
    same = like_for_like(init)
    mine = "ep-train, ZeRO-3 + offload"
    matched = "ep-train, ZeRO-3 + offload, AutoEP's initial weights, no router losses"
    peer = extra + ["--init_from", str(init), "--ds_config", "zero3_offload"]
    results = {mine: run("zero3_offload", tmp / "data", tok, tmp, steps, extra),
               matched: run("zero3_offload", tmp / "data", tok, tmp, steps, extra + same, label="matched"),
               AUTOEP_OFF: run_peer("autoep_train.py", tmp / "data", tmp, steps, peer)}
    shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(r["tok_s"]) for k, r in results.items()}
    rows = ["| run | tokens/s, median (min-max) | vs AutoEP | busiest EP rank's expert rows / mean | "
            "peak RSS, largest rank | final loss |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {med[name]:,.1f} ({min(r['tok_s']):,.1f}-{max(r['tok_s']):,.1f}) | "
                    f"{med[name] / med[AUTOEP_OFF]:.2f} | {r['rank_load']:.2f} | {r['rss']:,.0f} MiB | "
                    f"{r['final_loss']:.4f} |")
    table = "\n".join(rows)
    ratio = med[matched] / med[AUTOEP_OFF]
    drift = loss_drift(results[matched], results[AUTOEP_OFF])
    verdict = (f"Target (bench/targets.py, {TARGETS['e2e_vs_autoep'].source}): ep-train {describe('e2e_vs_autoep')} "
               f"DeepSpeed AutoEP's tokens/s under ZeRO-3 + offload at this size, judged on the row that trains "
               f"AutoEP's function from AutoEP's initial weights: **{target_verdict('e2e_vs_autoep', ratio)}** "
               f"({figure('e2e_vs_autoep', ratio, 2)}; its per-step losses differ from AutoEP's by at most "
               f"{drift:.1e} relative). ep-train's "
               f"default row (its own initial weights and router losses) runs at {med[mine] / med[AUTOEP_OFF]:.2f}x.")
    print(table + "\n" + verdict)
    if args.write:
        append_section("End-to-end training at 583M", f"""
`python bench/train_e2e.py --size 583m --steps {steps} --write` on {machine()}.
The 583M MoE of bench/scale.py (hidden {model['hidden_size']}, {model['num_layers']} layers, every layer MoE with
{model['num_experts']} experts of width {model['intermediate_size']}, top-{model['num_experts_per_token']},
vocab {model['vocab_size']}), 2 processes, EP 2, ZeRO-3 + CPU offload (`zero3_offload`) for both, activation
checkpointing, fp32, global batch 2 x 128 tokens; {steps} steps, the first 3 and the profiled step not counted.
The AutoEP row is bench/autoep_train.py (a `transformers` `MixtralForCausalLM` of the same sizes converted by
`deepspeed.initialize`, as in "End-to-end training and memory"); the row "AutoEP's initial weights, no router
losses" is ep-train from that model's saved weights with AutoEP's loss, as in that section, and the default row
ep-train from its own initial weights with its router losses (its final loss is not a comparison: another start
and another loss). The busiest-rank column is the demo section's (bench/common.py `busiest_rank_load`, median
over the counted steps).

{table}

{verdict}

Where ep-train's step goes at this size: "Where a step goes" (bench/step_breakdown.py). ep-train's
ZeRO-3 gradient path (ep_train/parallel/ds_grad_path.py) and expert backward (ep_train/model/experts.py)
remove full-size copies that DeepSpeed's own path and autograd make; the AutoEP peer runs stock DeepSpeed.
""")
    return results


if __name__ == "__main__":
    main()
