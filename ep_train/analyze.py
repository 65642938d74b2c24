"""``ep-train analyze-experts``: what each expert of a trained checkpoint takes.

    ep-train analyze-experts --checkpoint RUN_OR_STEP --data SHARDS --output DIR [--compare OTHER] [--tokens N]

Runs the model (one process, eval mode, one block's weights in memory at a time) over held-out windows
of a ``data_prep_tool`` output and records every MoE layer's routing with forward hooks on the routers
(the model is unchanged). Per layer: each expert's share of the routing assignments, the tokens it takes
most often (decoded, with how much of that token's traffic it gets), the mean routing entropy, and how
often two experts are chosen together. Writes ``report.json``, a readable ``report.md`` and ``heatmap.png`` (layers x
experts); with ``--compare`` the same data through a second checkpoint: share changes, the fraction
of tokens whose first expert stayed the same, and ``heatmap_change.png``. The trainer's TensorBoard
expert-load image stays the live view; this is the after-the-fact one.

Shape legend: N tokens analysed, E experts, K experts per token, L MoE layers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ep_train.model.init import ValueSource, blockwise
from ep_train.model.moe import inference_routing, set_expert_biases
from ep_train.model.router import Router, Routing


def collect_routing(model: torch.nn.Module, batches: list[torch.Tensor], source: ValueSource | None = None,
                    expert_bias: dict[str, list[float]] | None = None) -> tuple[dict[int, dict[str, np.ndarray]],
                                                                                np.ndarray]:
    """Per MoE layer: ``ids`` [N, K] expert ids (-1 where not kept), ``first`` [N] each token's first
    choice (what the router selected by, aux-loss-free bias included), ``probs`` [N, E]; and the input
    tokens [N] they belong to, in order. Routed as at inference (``inference_routing``: dropless, so a
    token's experts depend on that token only, not on the analysis batch), except expert-choice routers,
    whose choice depends on the batch by design. With ``source`` the model is on ``meta`` and runs one
    block at a time (``init.blockwise``; ``expert_bias``: the saved aux-loss-free biases, by layer)."""
    names = {m: int(n.split(".")[1]) for n, m in model.named_modules() if isinstance(m, Router)}
    seen: dict[int, list[Routing]] = {i: [] for i in names.values()}

    def hook(module: torch.nn.Module, _inp: Any, out: Routing) -> None:
        seen[names[module]].append(out)

    handles = [m.register_forward_hook(hook) for m in names]
    kinds = {i: m.router_type for m, i in names.items()}
    token_choice = "expert_choice" not in kinds.values()
    try:
        with torch.no_grad(), inference_routing(model) if token_choice else contextlib.nullcontext():
            if source is None:
                for x in batches:
                    model(x)
            else:
                biases = expert_bias or {}
                blockwise(model, source, batches,
                          lambda i, _: set_expert_biases(model, {str(i): biases[str(i)]} if str(i) in biases else {}))
    finally:
        for h in handles:
            h.remove()
    layers = {}
    for i, outs in seen.items():
        ids = torch.cat([torch.where(o.keep, o.expert_ids, torch.full_like(o.expert_ids, -1)) for o in outs])
        ec = kinds[i] == "expert_choice"
        layers[i] = {"ids": ids.numpy(), "first": torch.cat([_first_choice(o, ec) for o in outs]).numpy(),
                     "probs": torch.cat([o.probs for o in outs]).float().numpy()}
    return layers, torch.cat([x.reshape(-1) for x in batches]).numpy()


def _first_choice(r: Routing, expert_choice: bool) -> torch.Tensor:
    """[N] each token's first expert: top-k routers list the selected experts best first (by the scores they
    select with, aux-loss-free bias included); expert-choice routing lists every expert for every token
    (kept where the expert took it), so there it is the most probable expert that took the token, -1 if none."""
    if expert_choice:
        taken = torch.where(r.keep, r.probs.gather(1, r.expert_ids), torch.full_like(r.probs, -1.0))
        best = taken.argmax(1)
        return torch.where(taken.max(1).values >= 0, r.expert_ids.gather(1, best[:, None])[:, 0], -1)
    return r.expert_ids[:, 0]


def layer_report(ids: np.ndarray, probs: np.ndarray, tokens: np.ndarray, decode: Any, top: int = 8) -> dict[str, Any]:
    n, e = probs.shape
    kept = ids[ids >= 0]
    counts = np.bincount(kept, minlength=e)
    share = counts / max(kept.size, 1)
    entropy = float(-(probs * np.log(np.clip(probs, 1e-20, None))).sum(-1).mean())
    co = np.zeros((e, e), dtype=np.int64)  # tokens that chose both experts (diagonal: tokens that chose e)
    for row in ids:
        chosen = np.unique(row[row >= 0])
        co[np.ix_(chosen, chosen)] += 1
    token_total = Counter(tokens.tolist())
    experts = []
    for ex in range(e):
        mine = Counter(tokens[(ids == ex).any(-1)].tolist())
        experts.append({"expert": ex, "share": float(share[ex]), "tokens": int(counts[ex]),
                        "top_tokens": [{"token": decode(t), "id": int(t), "count": c,
                                        "of_its_occurrences": c / token_total[t]} for t, c in mine.most_common(top)]})
    pairs = [(int(a), int(b), int(co[a, b])) for a in range(e) for b in range(a + 1, e)]
    pairs.sort(key=lambda p: -p[2])
    return {"tokens": int(n), "share": share.tolist(),
            "load_cv": float(share.std() / share.mean()) if share.mean() > 0 else 0.0,
            "entropy": entropy, "entropy_max": math.log(e), "experts": experts,
            "co_selection": co.tolist(), "top_pairs": [{"experts": [a, b], "tokens": c, "fraction": c / max(n, 1)}
                                                       for a, b, c in pairs[:5]]}


def compare_layers(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, Any]:
    """Same tokens through two checkpoints: how routing moved."""
    sa = np.bincount(a["ids"][a["ids"] >= 0], minlength=a["probs"].shape[1]).astype(float)
    sb = np.bincount(b["ids"][b["ids"] >= 0], minlength=b["probs"].shape[1]).astype(float)
    sa, sb = sa / max(sa.sum(), 1), sb / max(sb.sum(), 1)
    # the experts selected, not argmax(probs): with aux-loss-free balancing the bias moves the selection
    first_same = float((a["first"] == b["first"]).mean())
    return {"share_change": (sb - sa).tolist(), "total_variation": float(0.5 * np.abs(sb - sa).sum()),
            "top1_agreement": first_same}


def heatmap(matrix: np.ndarray, layers: list[int], path: Path, title: str, diverging: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * matrix.shape[1], 1.2 + 0.45 * matrix.shape[0]))
    lim = float(np.abs(matrix).max()) or 1.0
    im = ax.imshow(matrix, cmap="RdBu_r" if diverging else "viridis", aspect="auto",
                   vmin=-lim if diverging else 0.0, vmax=lim)
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    ax.set_xlabel("expert")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _markdown(rep: dict[str, Any]) -> str:
    lines = [f"# Expert analysis of {rep['checkpoint']}", "",
             f"{rep['tokens']:,} tokens of {rep['data']} ({rep['split']} split).", ""]
    for i, lr in rep["layers"].items():
        lines += [f"## Layer {i}", "",
                  f"load CV {lr['load_cv']:.3f}; routing entropy {lr['entropy']:.3f} nats "
                  f"(uniform: {lr['entropy_max']:.3f})", "", "| expert | share | most frequent tokens (share of that token) |",
                  "| --- | --- | --- |"]
        for ex in lr["experts"]:
            toks = ", ".join(f"`{t['token']!r}` ({t['of_its_occurrences']:.0%})" for t in ex["top_tokens"][:6])
            lines.append(f"| {ex['expert']} | {ex['share']:.3f} | {toks} |")
        if lr["top_pairs"]:
            pairs = "; ".join(f"{p['experts'][0]}+{p['experts'][1]}: {p['fraction']:.1%}" for p in lr["top_pairs"])
            lines += ["", f"Chosen together most often: {pairs}"]
        if "compare" in rep:
            c = rep["compare"][i]
            lines += ["", f"Against {rep['compare_checkpoint']}: first expert unchanged for "
                          f"{c['top1_agreement']:.1%} of tokens; share moved by {c['total_variation']:.3f} "
                          "(total variation)"]
        lines.append("")
    return "\n".join(lines)


def _batches(data: str, split: str | None, seq_len: int, max_tokens: int) -> tuple[list[torch.Tensor], str]:
    from ep_train.data.loader import TokenWindows
    from ep_train.data.verify import load_manifest

    splits = load_manifest(data)["splits"]
    split = split or ("val" if splits.get("val", {}).get("tokens") else "train")  # held-out text when there is some
    windows = TokenWindows(data, split, seq_len)
    n = min(windows.num_windows, max(1, max_tokens // seq_len))
    if n == 0:
        raise ValueError(f"--data {data!r} split {split!r} has fewer than {seq_len + 1} tokens; pass more data "
                         "or a smaller --seq-len")
    rows = [torch.from_numpy(windows.window(i)[:-1]) for i in range(n)]
    return [torch.stack(rows[i:i + 8]) for i in range(0, n, 8)], split


def analyze(checkpoint: str, data: str, output: str, compare: str | None = None, max_tokens: int = 20000,
            split: str | None = None, seq_len: int | None = None, top: int = 8) -> dict[str, Any]:
    """The analysis as a function (the CLI's body); returns the report written to ``output``."""
    from ep_train.api import load
    from ep_train.data.tokenizer import safe_decode

    loaded = load(checkpoint, lazy=True)  # run block by block: one layer's weights in memory at a time
    if not any(isinstance(m, Router) for m in loaded.model.modules()):
        raise ValueError(f"--checkpoint {checkpoint!r} is a dense model: there are no experts to analyze")
    context = loaded.config.model.max_seq_len
    if seq_len is not None and seq_len > context:
        raise ValueError(f"--seq-len = {seq_len} is longer than the model's context (model.max_seq_len = {context}): "
                         f"positions past it were never trained; use --seq-len {context} or less")
    seq = seq_len or min(loaded.config.data.seq_len, context)
    batches, split = _batches(data, split, seq, max_tokens)
    vocab = loaded.config.model.vocab_size
    if max(int(b.max()) for b in batches) >= vocab:
        raise ValueError(f"--data {data!r} holds token ids >= the model's vocabulary ({vocab}): it was made with "
                         "another tokenizer; pass data prepared with the run's tokenizer")
    sp = loaded.tokenizer
    decode = (lambda t: safe_decode(sp, [int(t)])[0]) if sp is not None else (lambda t: f"<{int(t)}>")
    layers, tokens = collect_routing(loaded.model, batches, loaded.source, loaded.expert_bias)
    rep: dict[str, Any] = {"checkpoint": str(checkpoint), "data": str(data), "split": split, "tokens": int(tokens.size),
                           "layers": {i: layer_report(v["ids"], v["probs"], tokens, decode, top)
                                      for i, v in sorted(layers.items())}}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    order = sorted(layers)
    heatmap(np.array([rep["layers"][i]["share"] for i in order]), order, out / "heatmap.png",
            "share of routing assignments per expert")
    if compare is not None:
        other = load(compare, lazy=True)
        if other.config.model.vocab_size != vocab:
            raise ValueError(f"--compare {compare!r} has another vocabulary ({other.config.model.vocab_size} tokens) "
                             f"than --checkpoint {checkpoint!r} ({vocab}); compare checkpoints of the same model")
        layers_b, _ = collect_routing(other.model, batches, other.source, other.expert_bias)
        if sorted(layers_b) != order or any(layers_b[i]["probs"].shape != layers[i]["probs"].shape for i in order):
            raise ValueError(f"--compare {compare!r} is another architecture (MoE layers or experts differ) than "
                             f"--checkpoint {checkpoint!r}; compare checkpoints of the same model")
        rep["compare_checkpoint"] = str(compare)
        rep["compare"] = {i: compare_layers(layers[i], layers_b[i]) for i in order}
        heatmap(np.array([rep["compare"][i]["share_change"] for i in order]), order, out / "heatmap_change.png",
                f"share change: {Path(compare).name} minus {Path(checkpoint).name}", diverging=True)
    (out / "report.json").write_text(json.dumps(rep, indent=1))
    (out / "report.md").write_text(_markdown(rep))
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ep-train analyze-experts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="run dir, checkpoints/step_N or Hugging Face Mixtral folder")
    ap.add_argument("--data", required=True, help="a data_prep_tool build output (its val split if it has one)")
    ap.add_argument("--output", required=True, help="folder for report.md, report.json and the heatmaps")
    ap.add_argument("--compare", help="a second checkpoint of the same model: how routing changed")
    ap.add_argument("--tokens", type=int, default=20000, help="tokens to analyse (default 20000)")
    ap.add_argument("--split", help="data split (default: val if present, else train)")
    ap.add_argument("--seq-len", type=int, help="window length (default: the run's data.seq_len)")
    ap.add_argument("--top", type=int, default=8, help="most frequent tokens listed per expert")
    a = ap.parse_args(argv)
    if a.tokens < 1 or a.top < 1 or (a.seq_len is not None and a.seq_len < 1):
        raise ValueError("--tokens, --top and --seq-len must be positive integers")
    rep = analyze(a.checkpoint, a.data, a.output, a.compare, a.tokens, a.split, a.seq_len, a.top)
    for i, lr in rep["layers"].items():
        busiest = max(lr["experts"], key=lambda x: x["share"])
        print(f"layer {i}: load CV {lr['load_cv']:.3f} | entropy {lr['entropy']:.3f}/{lr['entropy_max']:.3f} | "
              f"busiest expert {busiest['expert']} ({busiest['share']:.1%})"
              + (f" | top-1 unchanged {rep['compare'][i]['top1_agreement']:.1%}" if "compare" in rep else ""))
    print(f"wrote {Path(a.output) / 'report.md'}, report.json and heatmap.png")
    return 0
