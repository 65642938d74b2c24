# Shared by the launch scripts (sourced, not run). Every user value stays quoted: no eval, no word splitting.

die() { echo "error: $*" >&2; exit 2; }

# The Python that runs ep-train: the repo's .venv if present, else python3 on PATH (EP_TRAIN_PYTHON overrides).
ep_python() {
  local root="$1"
  if [ -n "${EP_TRAIN_PYTHON:-}" ]; then echo "$EP_TRAIN_PYTHON"
  elif [ -x "$root/.venv/bin/python" ]; then echo "$root/.venv/bin/python"
  else command -v python3; fi
}

# Processes per node: the GPUs when there are any, else 2 CPU processes (gloo).
default_nproc() {
  local n=0
  if command -v nvidia-smi >/dev/null 2>&1; then n=$(nvidia-smi -L 2>/dev/null | wc -l); fi
  if [ "$n" -gt 0 ]; then echo "$n"; else echo 2; fi
}

check_inputs() {  # config, data dir, resume target: fail before any process starts
  local config="$1" data="$2" resume="$3"
  [ -n "$config" ] || die "--config is required (a YAML/JSON run config, e.g. configs/tiny.yaml)"
  [ -f "$config" ] || die "config file '$config' not found"
  if [ -n "$data" ]; then
    [ -d "$data" ] || die "data folder '$data' not found (make one with data_prep_tool build)"
    [ -f "$data/manifest.json" ] || die "data folder '$data' has no manifest.json (did data_prep_tool build/merge finish?)"
  fi
  if [ -n "$resume" ] && [ "$resume" != "auto" ]; then
    [ -d "$resume" ] || die "checkpoint folder '$resume' not found (use --resume auto or a checkpoints/step_* folder)"
  fi
}

print_cmd() { printf 'running:'; printf ' %q' "$@"; printf '\n'; }
