#!/usr/bin/env bash
# GPU path, proven (issue 14 part 1): checks ep-train on one CUDA GPU in under 7 minutes and writes
# a report ($OUT/gpu_report.md when OUT is set, else --out PATH, else runs/gpu_check/gpu_report.md).
#
#   bash bench/gpu_check.sh                                        # on the GPU machine, from the repo root
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh --cpu-dry-run  # the same logic on CPU, tiny sizes
#
# Packages the GPU image lacks (deepspeed and its needs) travel as cp312 wheels in .whl/ (carried,
# git-ignored); they go into /tmp/site, first on PYTHONPATH. Nothing here uses the repo's .venv.
# Options are bench/gpu_check.py's (--budget, --sections, --out, --cpu-dry-run).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    echo "[gpu_check.sh] installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || echo "[gpu_check.sh] WARNING: wheel install failed; sections that need deepspeed will say so"
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "[gpu_check.sh] .whl/ holds cp312 wheels and $PY is not Python 3.12: not installing them"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" bench/gpu_check.py "$@"
