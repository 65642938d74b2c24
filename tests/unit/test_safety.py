"""Nothing loaded can run code: a scan of the package, tools and bench for the three ways it could.

Parsed with ``ast`` (calls, not text, so comments and docstrings that mention the calls don't count):
- ``torch.load(...)`` must pass ``weights_only=True``, and so must a call through a name the file binds to it
  (``_TORCH_LOAD = torch.load``, ``from torch import load as _load``);
- ``yaml.load(...)`` must pass ``Loader=`` a class whose name or bases say Safe (``safe_load`` is fine);
- no ``subprocess``/``os`` call with ``shell=True``; no ``pickle.load(s)``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("ep_train", "tools", "bench") for p in (ROOT / d).rglob("*.py"))


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _safe_loader_classes(tree: ast.AST) -> set[str]:
    """Classes defined in the file that derive from a yaml Safe* loader."""
    return {c.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
            and any("Safe" in _name(b) for b in c.bases)}


def _torch_load_names(tree: ast.AST) -> set[str]:
    """Names that call ``torch.load`` in this file: ``torch.load`` itself, ``T.load`` after ``import torch as T``,
    names imported as it (``from torch import load [as X]``) and names assigned it (``X = torch.load``, then
    ``Y = X``), to a fixed point."""
    names = {"torch.load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            names |= {a.asname or a.name for a in node.names if a.name == "load"}
        if isinstance(node, ast.Import):
            names |= {f"{a.asname}.load" for a in node.names if a.name == "torch" and a.asname}
    while True:
        more = {_name(t) for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
                and node.value is not None and _name(node.value) in names
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])} - {""} - names
        if not more:
            return names
        names |= more


def problems(source: str, where: str) -> list[str]:
    tree = ast.parse(source)
    safe_classes = _safe_loader_classes(tree)
    loads = _torch_load_names(tree)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn = _name(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        line = f"{where}:{node.lineno}"
        if fn in loads or fn.endswith("torch.load") or (fn == "load" and "weights_only" in kw):
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                out.append(f"{line}: torch.load without weights_only=True")
        if fn == "yaml.load":
            loader = _name(kw["Loader"]) if "Loader" in kw else ""
            if not ("Safe" in loader or loader in safe_classes):
                out.append(f"{line}: yaml.load without a safe Loader")
        if "shell" in kw and isinstance(kw["shell"], ast.Constant) and kw["shell"].value is True:
            out.append(f"{line}: shell=True")
        if fn in ("pickle.load", "pickle.loads"):
            out.append(f"{line}: pickle.load")
    return out


def test_scanner_finds_each_unsafe_form() -> None:
    bad = ("import torch, yaml, subprocess, pickle\n"
           "torch.load('x')\ntorch.load('x', weights_only=False)\nyaml.load(s)\nyaml.load(s, Loader=yaml.Loader)\n"
           "subprocess.run('ls', shell=True)\npickle.loads(b'')\n")
    assert len(problems(bad, "bad.py")) == 6
    aliased = ("import torch\nfrom torch import load\nfrom torch import load as _load2\n_TORCH_LOAD = torch.load\n"
               "_AGAIN = _TORCH_LOAD\nload('x')\n_load2('x', weights_only=False)\n_TORCH_LOAD('x')\n"
               "_TORCH_LOAD('x', map_location='cpu', weights_only=False)\n_AGAIN('x')\n"
               "import torch as th\nth.load('x')\n")
    assert [p.split(":")[1] for p in problems(aliased, "aliased.py")] == ["6", "7", "8", "9", "10", "12"]
    good = ("import torch, yaml\nclass L(yaml.SafeLoader): pass\n"
            "torch.load('x', weights_only=True)\nyaml.load(s, Loader=L)\nyaml.safe_load(s)\n"
            "# torch.load(x) in a comment\n"
            "from torch import load as _load\n_TORCH_LOAD = torch.load\n_load('x', weights_only=True)\n"
            "_TORCH_LOAD('x', map_location='cpu', weights_only=True)\nnp.load('x.npy')\n")
    assert problems(good, "good.py") == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_loading_or_shell(path: Path) -> None:
    assert problems(path.read_text(), str(path.relative_to(ROOT))) == []
