#!/usr/bin/env bash
# Create .venv/ at the repo root and install ep-train with its test extra. Idempotent.
# torch is pinned first so pip takes the 2.13.0 wheel (the CPU build on machines without a GPU)
# instead of letting a dependency pull a multi-GB CUDA build. DeepSpeed ships only an sdist that
# imports torch at build time, hence --no-build-isolation.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
stamp=.venv/.ep_train_installed
version='import sys; print("%d.%d" % sys.version_info[:2])'
have="$(.venv/bin/python -c "$version" 2>/dev/null || true)"
# A .venv whose Python no longer runs (its interpreter was removed or upgraded away), or one of another version
# than an explicit PYTHON asks for, is made again from scratch: venv keeps a dangling python link otherwise.
if [ -e .venv ] && { [ -z "$have" ] || { [ -n "${PYTHON:-}" ] && [ "$have" != "$("$py" -c "$version")" ]; }; }; then
  echo "[setup] .venv's Python ${have:-does not run}; making .venv again with $("$py" --version)"
  "$py" -m venv --clear .venv
  rm -f "$stamp"
elif [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $("$py" --version)"
  "$py" -m venv .venv
fi
installed='import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ("ep_train", "torch", "deepspeed")))'
# Re-install when the package's metadata or this script (its pins) changed since the last install, or when
# what it installed is gone.
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt tools/setup_env.sh ] \
    && .venv/bin/python -I -c "$installed" 2>/dev/null; then  # -I: not the ep_train sources in this folder
  exit 0
fi
echo "[setup] installing torch==2.13.0, then ep-train[test] into .venv"
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q --no-build-isolation -e ".[test,bench]"
# DeepSpeed JIT-builds CPU Adam on first use; ep_train keeps such builds in .venv/torch_extensions (one
# folder per environment, see ep_train/__init__.py). Build it now, once, so the first training run
# and the first test that trains do not spend the minute (on 2 cores) inside their time limits.
# The stamp is written only once CPU Adam is built: a setup run again (after installing a compiler) tries again.
cxx="${CXX:-c++}"
if ! command -v "$cxx" >/dev/null 2>&1; then
  echo "[setup] WARNING: no C++ compiler ('$cxx' not found): DeepSpeed cannot build CPU Adam, which optimizer" \
    "offload (ds_config zero3_offload, the main job's) needs. Install one (Debian/Ubuntu: apt-get install g++;" \
    "or set CXX) and run tools/setup_env.sh again." >&2
else
  echo "[setup] building DeepSpeed's CPU Adam into .venv/torch_extensions (once, about a minute)"
  log=.venv/cpu_adam_build.log
  build='import ep_train; from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()'
  if .venv/bin/python -c "$build" >"$log" 2>&1; then
    touch "$stamp"
  else
    echo "[setup] note: CPU Adam did not build now (the first training run tries again; so does tools/setup_env.sh);" \
      "the build's last lines ($log):" >&2
    tail -n 15 "$log" >&2
  fi
fi
