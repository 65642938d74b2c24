"""The benchmark targets live in one table (bench/targets.py): no bench script types a target number
into a verdict or a target sentence, and every script that writes a verdict reads that table."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

VERDICT = re.compile(r"\bmet\b|MISSED")
# a target typed in as text: "at least 1.2x", "at most 22 bytes", "within 15%", "goal >= 50%" ...
TYPED = re.compile(r"(at least|at most|within|under|goal|target)\s*(>=|<=)?\s*\d+(\.\d+)?\s*(x\b|%|B\b|bytes)",
                   re.IGNORECASE)
# a target typed in as code next to a verdict: "'met' if share >= 0.85"
COMPARED = re.compile(r"[<>]=?\s*\d")


def _scripts() -> list[Path]:
    return [p for p in sorted((ROOT / "bench").glob("*.py")) if p.name not in ("targets.py", "__init__.py")]


def offences(text: str) -> list[str]:
    bad = []
    for i, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        if TYPED.search(code):
            bad.append(f"{i}: typed target: {line.strip()}")
        if VERDICT.search(code) and COMPARED.search(code):
            bad.append(f"{i}: verdict against a literal: {line.strip()}")
    return bad


def test_no_bench_script_types_a_target() -> None:
    found = {p.name: offences(p.read_text()) for p in _scripts()}
    assert not {k: v for k, v in found.items() if v}


def test_every_verdict_writer_reads_the_table() -> None:
    for p in _scripts():
        text = p.read_text()
        if re.search(r"\*\*\{?.*(met|MISSED)", text) or "'MISSED'" in text or '"MISSED"' in text:
            assert "from bench.targets import" in text, p.name


def test_the_check_catches_typed_targets() -> None:
    """The patterns above flag the forms the scripts used before the table existed."""
    assert offences('verdict = "met" if share >= 0.85 else "MISSED"')
    assert offences("f\"Targets: ep-train at least 1.2x DeepSpeed AutoEP under ZeRO-3: **{v}**\"")
    assert offences("f\"583M in fp32 at most 22 bytes per parameter: **{'met' if bpp <= 22 else 'MISSED'}**\"")
    assert offences("within 15% of the measured training peak")
    assert not offences("f\"{describe('e2e_vs_autoep')}: **{target_verdict('e2e_vs_autoep', r)}** ({r:.2f}x)\"")


def test_targets_table() -> None:
    from bench.targets import TARGETS, describe, verdict

    assert all(t.source and t.what and t.op in (">=", "<=") for t in TARGETS.values())
    assert describe("e2e_vs_autoep") == "at least 1.2x" and verdict("e2e_vs_autoep", 1.19) == "MISSED"
    assert verdict("layer_vs_limit", 1.1) == "met" and verdict("layer_vs_limit", 1.11) == "MISSED"
    assert describe("step_non_matmul_share") == "at most 30%"


def test_a_figure_next_to_its_verdict_never_prints_the_target_itself() -> None:
    """Rounded to the usual places, 1.104x would read "1.10x" beside "at most 1.1x: MISSED"; ``figure`` adds
    the places that tell a value from the target (none where they differ anyway, or the value is the target)."""
    from bench.targets import TARGETS, figure, verdict

    assert TARGETS["layer_vs_limit"].value == 1.1 and TARGETS["data_prep_share"].value == 0.85
    assert (figure("layer_vs_limit", 1.104, 2), verdict("layer_vs_limit", 1.104)) == ("1.104x", "MISSED")
    assert figure("layer_vs_limit", 1.0961, 2) == "1.096x"  # within the target, but "1.10x" would look like it
    assert figure("layer_vs_limit", 1.2345, 2) == "1.23x" and figure("layer_vs_limit", 1.1, 2) == "1.10x"
    assert (figure("data_prep_share", 0.8496, 0), verdict("data_prep_share", 0.8496)) == ("84.96%", "MISSED")
    assert figure("data_prep_share", 0.912, 0) == "91%"
