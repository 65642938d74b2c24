"""The benchmark targets live in one table (bench/targets.py): no bench script types a target number
into a verdict or a target sentence, holds one in a variable of its own, and every script that writes a
verdict reads that table."""

from __future__ import annotations

import ast
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


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def verdict_offences(text: str) -> list[str]:
    """Each "met" / "MISSED" string literal outside bench/targets.py either reads a verdict (``verdict(...) ==
    'met'``) or is picked by a condition (``'met' if ok else 'MISSED'``) that, traced through the names it is
    made of (assignments in its function, arguments at the calls of a function whose parameter it is), compares
    a figure with a value read from ``TARGETS``: a goal held in a variable of the script's own (``goal = 0.5``)
    is a typed target too."""
    tree = ast.parse(text)
    parent = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    table = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) and "TARGETS" in _names(n.value)
             for t in n.targets if isinstance(t, ast.Name)} | {"TARGETS"}

    def scope(node: ast.AST) -> ast.AST:  # the innermost function around node, or the module
        while not isinstance(node, (*funcs, ast.Module)):
            node = parent[node]
        return node

    def sources(name: ast.Name) -> list[ast.AST]:  # the expressions the name's value comes from
        where = scope(name)
        out = [n.value for n in ast.walk(where) if isinstance(n, ast.Assign)
               and any(isinstance(t, ast.Name) and t.id == name.id for t in n.targets)]
        if isinstance(where, funcs) and name.id in (args := [a.arg for a in where.args.posonlyargs + where.args.args]):
            i = args.index(name.id)
            for call in ast.walk(tree):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == where.name:
                    out += call.args[i:i + 1] + [k.value for k in call.keywords if k.arg == name.id]
        return out

    def against_table(cond: ast.AST, seen: frozenset[str]) -> bool:
        if isinstance(cond, ast.Name):
            found = sources(cond)
            return cond.id not in seen and bool(found) and all(against_table(s, seen | {cond.id}) for s in found)
        if isinstance(cond, ast.BoolOp):
            return any(against_table(v, seen) for v in cond.values)
        if isinstance(cond, ast.UnaryOp):
            return against_table(cond.operand, seen)
        return any(isinstance(c, ast.Compare) and not all(isinstance(o, (ast.Eq, ast.NotEq, ast.Is, ast.IsNot,
                                                                          ast.In, ast.NotIn)) for o in c.ops)
                   and table & set().union(*map(_names, [c.left, *c.comparators])) for c in ast.walk(cond))

    bad = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and node.value in ("met", "MISSED")):
            continue
        up = parent[node]
        if isinstance(up, ast.Compare) and all(isinstance(o, (ast.Eq, ast.NotEq)) for o in up.ops):
            continue  # reads a verdict
        if not (isinstance(up, ast.IfExp) and node is not up.test and against_table(up.test, frozenset())):
            bad.append(f"{node.lineno}: {node.value!r} not from the table: {ast.unparse(up)}")
    return bad


def test_no_bench_script_types_a_target() -> None:
    found = {p.name: offences(p.read_text()) + verdict_offences(p.read_text()) for p in _scripts()}
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
    # a goal in a variable of the script's own, and a verdict set outside a conditional expression
    assert verdict_offences("goal = 0.5\nv = 0.6\nverdict = 'met' if v >= goal else 'MISSED'\n")
    assert verdict_offences("def f(v):\n    goal = 0.5\n    ok = v >= goal\n    return 'met' if ok else 'MISSED'\n")
    assert verdict_offences("def f(v):\n    if v >= TARGETS['x'].value:\n        return 'met'\n")
    assert verdict_offences("def f(ok):\n    return 'met' if ok else 'MISSED'\n\nf(0.6 >= 0.5)\n")
    # the forms bench/ uses: a goal read from the table, passed on through names and parameters, or a verdict read
    table = "from bench.targets import TARGETS\nGOAL = TARGETS['gpu_layer_mfu'].value\n"
    assert not verdict_offences(table + "def f(v, n):\n    ok = v is not None and v >= GOAL and n > 0\n"
                                "    return 'met' if ok else 'MISSED'\n")
    assert not verdict_offences(table + "def f(v):\n    met_ = v >= GOAL\n\n    def say(met):\n"
                                "        return 'met' if met else 'MISSED'\n    return say(met_)\n")
    assert not verdict_offences("n = sum(target_verdict('scale_plan_error', e) == 'met' for e in errors)\n")


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
