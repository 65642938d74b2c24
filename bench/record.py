"""Run one benchmark's ``main`` and keep what it returns: ``python -m bench.record NAME[@LABEL] [ARGS...]``.

``bench/run_all`` calls every benchmark through this; with ``BENCH_RESULTS`` set, ``NAME.json`` (the
figures ``main`` returned; ``NAME_LABEL.json`` for a second run of one benchmark) goes into that folder,
so that ``tests/e2e/test_bench.py`` checks one run of ``bash bench/run_all --small`` instead of running
each benchmark a second time.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m bench.record NAME[@LABEL] [ARGS...]   (NAME: a module of bench/, e.g. moe_layer; "
              "@LABEL names a second run's JSON)", file=sys.stderr)
        return 2
    name, _, label = argv[0].partition("@")
    args = argv[1:]
    out = importlib.import_module(f"bench.{name}").main(args)
    name = f"{name}_{label}" if label else name
    dest = os.environ.get("BENCH_RESULTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        (Path(dest) / f"{name}.json").write_text(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
