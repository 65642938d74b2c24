"""Console line, TensorBoard scalars and images, and metrics.jsonl (rank 0 writes; all ranks compute)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ep_train.files import atomic_write_text


def expert_summary(counts: np.ndarray, ep_size: int = 1) -> dict[str, float]:
    """Load statistics of one layer from its per-expert token counts [E]. ``ep_rank_max_over_mean``: the rows
    of the EP rank whose experts (rank r holds experts [r E/ep, (r + 1) E/ep)) get the most, over the mean
    rank's: under expert parallelism every rank waits for that one at the layer's all-to-alls. (From counts
    summed over several EP groups this understates each group's; the trainer passes its per-group figure.)"""
    mean = counts.mean()
    ranks = counts.reshape(ep_size, -1).sum(1)  # [ep] rows per EP rank
    return {"cv": float(counts.std() / mean) if mean > 0 else 0.0,
            "max_over_mean": float(counts.max() / mean) if mean > 0 else 0.0,
            "min_share": float(counts.min() / counts.sum()) if counts.sum() > 0 else 0.0,
            "ep_rank_max_over_mean": float(ranks.max() / ranks.mean()) if ranks.sum() > 0 else 0.0}


class CollapseWatch:
    """Routing collapse: warns once when an expert's share of its layer's tokens stays below
    ``threshold / E`` for ``intervals`` logging intervals in a row (the share is over all ranks)."""

    def __init__(self, threshold: float, intervals: int) -> None:
        self.threshold, self.intervals = threshold, intervals
        self.streak: dict[tuple[int, int], int] = {}

    def update(self, expert_counts: dict[int, list[int]]) -> list[str]:
        if self.threshold <= 0:
            return []
        warnings = []
        for layer, counts in expert_counts.items():
            total = max(sum(counts), 1)
            floor = self.threshold / len(counts)
            for e, c in enumerate(counts):
                key = (layer, e)
                self.streak[key] = self.streak.get(key, 0) + 1 if c / total < floor else 0
                if self.streak[key] == self.intervals:
                    warnings.append(f"WARNING: routing collapse? layer {layer} expert {e} received {c / total:.1%} of "
                                    f"the tokens (below {floor:.1%} = train.collapse_threshold x 1/{len(counts)}) for "
                                    f"{self.intervals} logging intervals in a row")
        return warnings


def _finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (a skipped step's loss or grad norm) as None: JSON has no NaN or
    Infinity (json.dumps would write them, and strict readers such as jq or JSON.parse refuse the file);
    the record's ``nonfinite`` field says why the value is missing."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


class MetricsLogger:
    """TensorBoard: ``RUN/tensorboard`` holds the series over steps, ``RUN/tensorboard/by_tokens`` those over
    tokens seen (``train_by_tokens/*``, ``val_by_tokens/*``; its own folder so that a resume can drop each
    series' abandoned points by its own x-axis)."""

    def __init__(self, run_dir: Path, enabled: bool, max_steps: int, collapse: CollapseWatch | None = None,
                 ep_size: int = 1) -> None:
        self.enabled, self.max_steps, self.ep_size = enabled, max_steps, ep_size
        self.collapse = collapse or CollapseWatch(0.0, 1)
        self.tb = None
        self.tb_tokens = None
        self.jsonl = None
        self.run_dir = run_dir
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._open_tensorboard()
            self.path = run_dir / "metrics.jsonl"
            self.jsonl = open(self.path, "a")

    def _open_tensorboard(self, step: int | None = None, tokens: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        main, by_tokens = self.run_dir / "tensorboard", self.run_dir / "tensorboard" / "by_tokens"
        # A run begun before the by-tokens series had their own folder keeps them beside the step series (so
        # its tokens curve stays in one place), and no purge: it would drop that curve's earlier points too.
        legacy = not by_tokens.is_dir() and any(main.glob("events.out.tfevents.*"))
        # purge_step: TensorBoard (its Python reader) hides the points at or past it that earlier writers of the
        # folder logged; its default data server drops a tag's points from a step logged again instead
        self.tb = SummaryWriter(str(main), purge_step=None if step is None or legacy else step + 1)
        self.tb_tokens = self.tb if legacy else SummaryWriter(str(by_tokens), purge_step=None if tokens is None
                                                              else tokens + 1)

    def resume_at(self, step: int, tokens: int) -> int:
        """On resuming at ``step`` (``tokens`` seen by then): records of steps past it in metrics.jsonl come from
        a history the run leaves (it crashed after its last checkpoint, or resumed an older one), and the run
        will log those steps again; they move to metrics.abandoned.jsonl (appended, with any line cut short by a
        crash), so each step appears once. TensorBoard drops its points past the step (and past ``tokens`` on
        the by-tokens axis) the same way. Returns how many lines moved."""
        if not self.enabled:
            return 0
        self.tb.close()
        self.tb_tokens.close()  # (the same writer for a run begun before by_tokens/: closing twice is harmless)
        self._open_tensorboard(step, tokens)
        self.jsonl.close()
        keep, gone = [], []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                past = json.loads(line)["step"] > step
            except (ValueError, KeyError, TypeError):
                past = True  # not a record (a write cut short)
            (gone if past else keep).append(line if line.endswith("\n") else line + "\n")
        if gone:
            with open(self.path.with_name("metrics.abandoned.jsonl"), "a") as fh:
                fh.writelines(gone)
            atomic_write_text(self.path, "".join(keep))
        self.jsonl = open(self.path, "a")
        return len(gone)

    def log(self, rec: dict[str, Any], counts: dict[int, list[int]], layer_stats: dict[int, dict],
            per_expert: bool = True) -> None:
        """One logged step. ``per_expert`` (train.log_expert_stats): the per-expert figures (console lines,
        TensorBoard scalars and image, metrics.jsonl's expert_counts); the collapse watch and each layer's
        entropy and dropped fraction do not depend on it."""
        if not self.enabled:
            return
        collapse_warnings = self.collapse.update(counts)  # not gated: a safety warning, not a statistic
        expert_counts = counts if per_expert else {}
        step, tokens = rec["step"], rec["tokens"]
        summary = {i: expert_summary(np.asarray(c, dtype=np.float64), self.ep_size) for i, c in expert_counts.items()}
        for i, s in summary.items():  # the trainer's figure, measured per EP group (the world's sum can hide it)
            if "ep_rank_max_over_mean" in layer_stats.get(i, {}):
                s["ep_rank_max_over_mean"] = layer_stats[i]["ep_rank_max_over_mean"]
        grad = f"{rec['grad_norm']:.3f}" if rec.get("grad_norm") is not None else "n/a"
        # lm: the language-model loss alone, the figure val_loss compares with (loss adds the router losses)
        line = (f"step {step}/{self.max_steps} | loss {rec['loss']:.4f} | lm {rec['lm_loss']:.4f} | "
                f"aux {rec['aux_loss']:.4f} | "
                f"z {rec['z_loss']:.4f} | lr {rec['lr']:.2e} | grad {grad} | "
                f"tok/s {rec['tokens_per_sec']:.0f}")
        if summary:
            line += f" | expert cv {float(np.mean([s['cv'] for s in summary.values()])):.3f}"
            if self.ep_size > 1:  # mean over the MoE layers: each layer waits for its busiest EP rank
                ranks = np.mean([s["ep_rank_max_over_mean"] for s in summary.values()])
                line += f" | ep rank load max/mean {ranks:.2f}"
        if rec.get("skipped_steps"):
            line += f" | skipped {rec['skipped_steps']}"
        print(line, flush=True)
        for warning in collapse_warnings:
            print(warning, flush=True)
        for i, counts in expert_counts.items():
            share = np.asarray(counts, dtype=np.float64) / max(sum(counts), 1)
            ranks = f" | ep rank max/mean {summary[i]['ep_rank_max_over_mean']:.2f}" if self.ep_size > 1 else ""
            print(f"    layer {i}: tokens/expert {' '.join(f'{x:.2f}' for x in share)} | "
                  f"entropy {layer_stats[i]['entropy']:.3f} | dropped {layer_stats[i]['dropped_frac']:.3f}{ranks}",
                  flush=True)
        for key in ("loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm"):
            if rec.get(key) is not None and math.isfinite(rec[key]):
                self.tb.add_scalar(f"train/{key}", rec[key], step)
                self.tb_tokens.add_scalar(f"train_by_tokens/{key}", rec[key], tokens)
        self.tb.add_scalar("throughput/tokens_per_sec", rec["tokens_per_sec"], step)
        self.tb.add_scalar("train/skipped_steps", rec.get("skipped_steps", 0), step)
        for i, s in summary.items():
            self.tb.add_scalar(f"moe/layer_{i}/tokens_per_expert_cv", s["cv"], step)
            self.tb.add_scalar(f"moe/layer_{i}/max_over_mean", s["max_over_mean"], step)
            if self.ep_size > 1:
                self.tb.add_scalar(f"moe/layer_{i}/ep_rank_max_over_mean", s["ep_rank_max_over_mean"], step)
        for i, stats in layer_stats.items():
            self.tb.add_scalar(f"moe/layer_{i}/entropy", stats["entropy"], step)
            self.tb.add_scalar(f"moe/layer_{i}/dropped_frac", stats["dropped_frac"], step)
        for name, n in rec.get("tokens_by_source", {}).items():
            self.tb.add_scalar(f"data/tokens/{name}", n, step)
        if expert_counts:
            load = np.stack([np.asarray(c, dtype=np.float64) for c in expert_counts.values()])  # [layers, E]
            share = load / np.maximum(load.sum(1, keepdims=True), 1)
            img = share / max(share.max(), 1e-9)  # one row per MoE layer, brighter = more tokens
            self.tb.add_image("moe/expert_load", img[None], step, dataformats="CHW")
        self._write({**rec, "expert_counts": {str(k): v for k, v in expert_counts.items()},
                     "moe": {str(k): v for k, v in layer_stats.items()}})
        self.tb.flush()
        self.tb_tokens.flush()

    def _write(self, rec: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(_finite_or_none(rec), allow_nan=False) + "\n")
        self.jsonl.flush()

    def log_eval(self, step: int, tokens: int, by_source: dict[str, float], weights: dict[str, float]) -> None:
        """Validation loss per source; ``val_loss`` is their mean weighted as the training mixture is (over
        the sources that have a validation split), which with one source is that source's loss."""
        if not self.enabled:
            return
        w = {k: weights[k] for k in by_source}
        total = sum(w.values())
        val_loss = (sum(by_source[k] * w[k] for k in by_source) / total if total > 0
                    else sum(by_source.values()) / len(by_source))
        line = f"step {step}/{self.max_steps} | val_loss {val_loss:.4f} | val_ppl {math.exp(min(val_loss, 50)):.2f}"
        if len(by_source) > 1 or set(by_source) != set(weights):
            line += " | " + " | ".join(f"{k} {v:.4f}" for k, v in by_source.items())
        print(line, flush=True)
        self.tb.add_scalar("val/loss", val_loss, step)
        self.tb_tokens.add_scalar("val_by_tokens/loss", val_loss, tokens)
        rec: dict[str, Any] = {"step": step, "tokens": tokens, "val_loss": val_loss}
        if len(weights) > 1:
            rec["val_loss_by_source"] = by_source
            for k, v in by_source.items():
                self.tb.add_scalar(f"val/{k}/loss", v, step)
        self._write(rec)
        self.tb_tokens.flush()

    def log_memory(self, step: int, phase: str, rss_mb_per_rank: list[float]) -> None:
        """A memory mark: ``setup`` (engine built, before the first step) or ``final`` (after the last save),
        with every rank's peak RSS so far (MiB, index = rank)."""
        if not self.enabled:
            return
        top = max(rss_mb_per_rank)
        print(f"peak RSS of the largest rank, {phase}: {top:,.0f} MiB", flush=True)
        self.jsonl.write(json.dumps({"step": step, "phase": phase, f"{phase}_max_rss_mb": top,
                                     f"{phase}_rss_mb_per_rank": rss_mb_per_rank}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb_tokens.close()
        if self.jsonl is not None:
            self.jsonl.close()
