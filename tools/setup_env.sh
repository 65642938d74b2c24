#!/usr/bin/env bash
# Create .venv/ at the repo root and install ep-train with its test extra. Idempotent.
# torch is pinned first so pip takes the 2.13.0 wheel (the CPU build on machines without a GPU)
# instead of letting a dependency pull a multi-GB CUDA build. DeepSpeed ships only an sdist that
# imports torch at build time, hence --no-build-isolation.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $("$py" --version)"
  "$py" -m venv .venv
fi
stamp=.venv/.ep_train_installed
# Re-install when the package's metadata or this script (its pins) changed since the last install.
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt tools/setup_env.sh ]; then
  exit 0
fi
echo "[setup] installing torch==2.13.0, then ep-train[test] into .venv"
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q --no-build-isolation -e ".[test,bench]"
# DeepSpeed JIT-builds CPU Adam on first use; ep_train keeps such builds in .venv/torch_extensions (one
# folder per environment, see ep_train/__init__.py). Build it now, once, so the first training run
# and the first test that trains do not spend the minute (on 2 cores) inside their time limits.
echo "[setup] building DeepSpeed's CPU Adam into .venv/torch_extensions (once, about a minute)"
.venv/bin/python -c "import ep_train; from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" \
  >/dev/null 2>&1 || echo "[setup] note: CPU Adam did not build now; the first training run will build it"
touch "$stamp"
