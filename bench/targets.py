"""Every benchmark target, in one place, each with where it comes from.

Benchmarks read their goals from ``TARGETS`` and compute the verdict with ``verdict``; no script types a
target number into its text (tests/unit/test_bench_targets.py checks that). ``describe`` gives the
target as words for the write-ups, e.g. "at least 1.2x".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    value: float
    op: str  # ">=": the measured figure must reach value; "<=": it must not exceed it
    unit: str  # "x" (a ratio), "%" (value is a fraction, shown in percent), "B" (parameters), "bytes", "" (plain)
    what: str  # the measured figure, in words
    source: str  # where the target was set

    def words(self) -> str:
        bound = "at least" if self.op == ">=" else "at most"
        return f"{bound} {fmt(self.value, self.unit)}"


def fmt(value: float, unit: str) -> str:
    if unit == "x":
        text = f"{value:g}"
        return (text if "." in text else text + ".0") + "x"
    if unit == "%":
        return f"{100 * value:.0f}%"
    if unit == "B":
        return f"{value / 1e9:.1f}B"
    if unit == "bytes":
        return f"{value:g} bytes"
    return f"{value:g}"


TARGETS: dict[str, Target] = {
    # issue 14 (performance): end to end
    "e2e_vs_autoep": Target(1.2, ">=", "x", "ep-train tokens/s / DeepSpeed AutoEP's, both ZeRO-3 (with and without "
                            "CPU offload), at the demo size and at 583M", "issue 14"),
    "e2e_vs_ds_moe": Target(1.0, ">=", "x", "ep-train tokens/s under ZeRO-3 / DeepSpeed-MoE's under its own ZeRO-2",
                            "issue 14"),
    # issue 14: the MoE layer
    "layer_vs_ds_skewed": Target(1.3, ">=", "x", "DeepSpeed MoE layer time / ep-train's, Zipf-skewed routing",
                                 "issue 14"),
    "layer_vs_ds_balanced": Target(1.0, ">=", "x", "DeepSpeed MoE layer time / ep-train's, balanced routing",
                                   "issue 14"),
    "layer_vs_limit": Target(1.1, "<=", "x", "ep-train layer time / the limit (matmuls + all-to-all of the same "
                             "rows and bytes)", "issue 14"),
    # issue 14: GPU (when a GPU is lent)
    "gpu_expert_mfu": Target(0.50, ">=", "%", "expert-matmul MFU of ep-train's layer, forward+backward, bf16",
                             "issue 14"),
    "gpu_layer_mfu": Target(0.40, ">=", "%", "whole-layer MFU of ep-train's layer, forward+backward, bf16",
                            "issue 14"),
    "gpu_expert_path": Target(1.05, "<=", "x", "time of the expert path ep-train picks by default / the faster of "
                              "grouped_mm and the per-expert loop, at every shape of bench/gpu_experts.py",
                              "issue 14 part 1 (grouped GEMM against a per-expert loop)"),
    "gpu_train_bf16_drift": Target(5e-3, "<=", "", "largest relative difference of the bf16 CUDA run's per-step "
                                   "losses from the CPU fp32 run's (bench/gpu_check.py, tiny model, 20 steps)",
                                   "issue 14 part 1 (losses track the CPU fp32 run within bf16 tolerance; why this "
                                   "value: gpu_check.TOLERANCE_NOTE)"),
    "gpu_train_fp32_drift": Target(1e-3, "<=", "", "largest relative difference of the fp32 CUDA run's per-step "
                                   "losses from the CPU fp32 run's (bench/gpu_check.py)",
                                   "issue 14 part 1 (see gpu_check.TOLERANCE_NOTE)"),
    # issue 14 part 4: where a step goes
    "step_non_matmul_share": Target(0.30, "<=", "%", "share of a 583M training step (CPU, ZeRO-3 + offload) "
                                    "outside the matmuls and the all-to-all", "issue 14 part 4"),
    # scale issue (issue 11): memory
    "scale_bf16_params": Target(1.0e9, ">=", "B", "largest MoE trained in bf16 with CPU offload at world 2",
                                "issue 11"),
    "scale_nvme_params": Target(2.5e9, ">=", "B", "largest MoE trained with NVMe offload at world 2",
                                "issue 11"),
    "scale_fp32_bytes_per_param": Target(22, "<=", "bytes", "583M in fp32 at world 2: training peaks summed over "
                                         "ranks / parameters", "issue 11"),
    "scale_plan_error": Target(0.15, "<=", "%", "|ep-train plan / measured training peak - 1|", "issue 11"),
    # scale (the brief: no code path may hold the whole model in one process)
    "offline_memory_growth": Target(0.05, "<=", "", "extra peak anonymous memory of an offline tool (conversion, "
                                    "analysis) per extra byte of the model, 4 to 8 layers of the 583M shape",
                                    "the brief's scale priority (bench/offline_memory.py): memory must not grow "
                                    "with the model"),
    # data preparation
    "data_prep_share": Target(0.85, ">=", "%", "ep-train's tokens/s as a share of the encode-only limit",
                              "data-prep issue (bench/data_prep.py)"),
    "corpus_memory_growth": Target(1.25, "<=", "x", "peak RSS of each process (build main, build worker, array "
                                   "task; main and worker of the one-.txt-file build) at the largest corpus over "
                                   "the smallest, the largest ratio",
                                   "data issue 15 (bench/corpus_scale.py): memory must not grow with the corpus"),
    # soak
    "soak_growth": Target(0.02, "<=", "%", "predicted RSS growth after warm-up over the run / mean RSS, every rank",
                          "soak issue (bench/soak.py)"),
}


def verdict(name: str, measured: float) -> str:
    """'met' or 'MISSED' for ``measured`` against ``TARGETS[name]``."""
    t = TARGETS[name]
    ok = measured >= t.value if t.op == ">=" else measured <= t.value
    return "met" if ok else "MISSED"


def figure(name: str, measured: float, places: int) -> str:
    """``measured`` in its target's unit ("x", "%") with ``places`` decimals, and more where that would print
    the target's own figure for a value on the other side of it: 1.104 shown as "1.10x" next to "at most
    1.1x: MISSED", 0.8496 as "85%" next to "at least 85%: MISSED" (up to 4 more decimals)."""
    t = TARGETS[name]
    scale, suffix = (100.0, "%") if t.unit == "%" else (1.0, "x" if t.unit == "x" else "")
    return beside(measured, t.value, places, scale, suffix)


def beside(measured: float, threshold: float, places: int, scale: float = 1.0, suffix: str = "") -> str:
    """``measured * scale`` with ``places`` decimals, more (up to 4) where it would print the threshold's own
    figure for a value on the other side of it (for goals that are not in TARGETS)."""
    p = places
    while p < places + 4 and measured != threshold and round(measured * scale, p) == round(threshold * scale, p):
        p += 1
    return f"{measured * scale:.{p}f}{suffix}"


def describe(name: str) -> str:
    """The target in words: 'at least 1.2x'."""
    return TARGETS[name].words()
