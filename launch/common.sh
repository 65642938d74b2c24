# Shared by the launch scripts (sourced, not run). Every user value stays quoted: no eval, no word splitting.

die() { echo "error: $*" >&2; exit 2; }

need_value() { [ $# -ge 2 ] || die "$1 needs a value (e.g. $1 VALUE)"; }  # "$@" of an option parser's loop

# The Python that runs ep-train: the repo's .venv if present, else python3 on PATH (EP_TRAIN_PYTHON overrides).
ep_python() {
  local root="$1"
  if [ -n "${EP_TRAIN_PYTHON:-}" ]; then echo "$EP_TRAIN_PYTHON"
  elif [ -x "$root/.venv/bin/python" ]; then echo "$root/.venv/bin/python"
  else command -v python3; fi
}

# Processes per node: one per GPU this node's workers may use, else 2 CPU processes (gloo). GPUs are the
# `nvidia-smi -L` lines "GPU N: ..." only (without a GPU it prints "No devices were found"; MIG devices are
# indented lines). CUDA_VISIBLE_DEVICES, when set, leaves its entries up to the first invalid one, as CUDA
# reads it: "" or -1 = none (then CPU processes). nvidia-smi itself ignores it and lists every GPU.
default_nproc() {
  local n=0 visible=0 entry entries=()
  if command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -cE '^GPU [0-9]+:' || true)
  fi
  if [ "$n" -gt 0 ] && [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    IFS=, read -ra entries <<< "$CUDA_VISIBLE_DEVICES"
    for entry in "${entries[@]}"; do
      entry="${entry// /}"
      case "$entry" in ""|-*) break ;; esac
      visible=$((visible + 1))
    done
    [ "$visible" -ge "$n" ] || n=$visible
  fi
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

# The user's trainer overrides (after --) must not set what the launcher passes itself: the trainer's
# argparse keeps the last --config or --run-dir (or an abbreviation such as --run-d), so the run would use
# another config, or write where this script does not look for the stop marker; a field given twice
# (--resume, --data_dir) is refused by the trainer, whose message cannot say that the launcher gave one.
# $1..$4 = the fix for a --config, --run-dir, data.data_dir and train.resume override ("" = this launcher
# does not pass that field), then the overrides.
check_overrides() {
  local fix_config="$1" fix_run="$2" fix_data="$3" fix_resume="$4" arg key name shown i
  shift 4
  local args=("$@")
  for ((i = 0; i < ${#args[@]}; i++)); do  # argparse reads its options anywhere, also in a value's place
    arg="${args[i]}" key="${args[i]%%=*}" shown="${args[i]}"
    [ "${#key}" -ge 3 ] && [ "${key:0:2}" = "--" ] || continue
    [ "$key" != "$arg" ] || [ $((i + 1)) -ge ${#args[@]} ] || shown="$arg ${args[i + 1]}"
    if [[ "--config" == "$key"* ]]; then
      die "trainer override '$shown' would replace the config this script passes (the trainer takes the last); \
$fix_config"
    fi
    if [[ "--run-dir" == "$key"* || "--run_dir" == "$key"* ]]; then
      die "trainer override '$shown' would move the trainer out of the run folder this script passes and \
watches (stop marker); $fix_run"
    fi
  done
  while [ $# -gt 0 ]; do  # KEY VALUE or KEY=VALUE pairs, as ep_train.config.parse_overrides reads them
    arg="$1" key="${1%%=*}" shown="$1"
    [ "$key" != "$arg" ] || [ $# -lt 2 ] || shown="$1 $2"
    name="${key#--}"
    case "${name//-/_}" in
      data_dir|data.data_dir) [ -z "$fix_data" ] || die "trainer override '$shown' sets data.data_dir, which this \
script passes itself; $fix_data" ;;
      resume|train.resume) [ -z "$fix_resume" ] || die "trainer override '$shown' sets train.resume, which this \
script passes itself; $fix_resume" ;;
    esac
    if [ "$key" = "$arg" ] && [ $# -ge 2 ]; then shift 2; else shift; fi
  done
}

print_cmd() { printf 'running:'; printf ' %q' "$@"; printf '\n'; }

# The trainer's arguments, as both launchers pass them to the workers and to check_config: the config, the
# data dir and resume target when given ("" = not given), then the user's overrides. Sets TRAINER_ARGS.
trainer_args() {
  TRAINER_ARGS=(--config "$1")
  [ -z "$2" ] || TRAINER_ARGS+=(--data_dir "$2")
  [ -z "$3" ] || TRAINER_ARGS+=(--resume "$3")
  shift 3
  TRAINER_ARGS+=("$@")
}

# The trainer's own config checks (ep-train check: no torch, well under a second) before any process
# starts: a bad config gives one "error: ..." and exit 2 here, instead of one copy per worker plus
# torchrun's failure report. $1 = python, $2 = world size or "" (unknown), then the trainer's arguments.
check_config() {
  local py="$1" world="$2"; shift 2
  local args=(-m ep_train.cli check)
  local missing  # what the trainer needs, looked up without importing (ep_train itself is found in the repo folder)
  missing="$("$py" -c 'import importlib.util as u
print(" ".join(n for n in ("ep_train", "yaml", "torch", "deepspeed") if u.find_spec(n) is None))' 2>/dev/null)" \
    || missing="(the Python does not run)"
  [ -z "$missing" ] || die "the Python '$py' lacks $missing: run tools/setup_env.sh in the ep-train folder (it \
makes .venv, which the launch scripts use), or set EP_TRAIN_PYTHON to a Python that has ep-train installed (on a \
cluster: one the compute nodes can run)"
  [ -z "$world" ] || args+=(--world-size "$world")
  "$py" "${args[@]}" "$@" >/dev/null || exit 2
}

# PIDs of trainer workers (python [-u] -m ep_train.train ...) among the descendants of process $1 only:
# never another job's or another user's trainers on the same node (what `pkill -f` reached).
trainer_pids() {
  local child args i
  for child in $(children_of "$1"); do
    # the arguments one by one (NUL-separated): an interpreter path with spaces stays one argument
    { mapfile -d '' args < "/proc/$child/cmdline"; } 2>/dev/null || continue  # gone since listed: skip it
    i=1
    [ "${args[1]:-}" != "-u" ] || i=2
    if [[ "${args[0]:-}" == *python* ]] && [ "${args[i]:-}" = "-m" ] && [ "${args[i + 1]:-}" = "ep_train.train" ]; then
      echo "$child"
    fi
    trainer_pids "$child"
  done
}

# PIDs whose parent is $1: pgrep where procps is installed, else read from /proc (slim images lack pgrep).
children_of() {
  if command -v pgrep >/dev/null; then
    pgrep -P "$1" || true
    return
  fi
  local stat line ppid
  for stat in /proc/[0-9]*/stat; do
    { read -r line < "$stat"; } 2>/dev/null || continue
    read -r _ ppid _ <<< "${line##*) }"  # after the command name, which may hold spaces and ')'
    [ "$ppid" != "$1" ] || { stat="${stat#/proc/}"; echo "${stat%/stat}"; }
  done
}

# Run a launcher (torchrun, deepspeed) and turn SIGUSR1 or SIGTERM sent to this script into SIGUSR1 for
# the launcher's trainer workers, which finish the step, checkpoint and exit 75. The launcher itself
# runs with SIGUSR1 ignored: torchrun has no handler for it and would die, orphaning its workers, when
# SLURM signals every process of a job step. Exit code: 75 when the trainers stopped on the signal
# with a checkpoint (torchrun itself reports any worker exit code other than 0 as 1), else the launcher's.
# $1 = run folder, $2 = the launcher's restart count, then the launcher command.
STOP_REQUESTED=0
run_forwarding_stop() {
  local run_dir="$1" restarts="$2"; shift 2
  local marker="$run_dir/stopped_on_signal.json" start rc=0 stopped=0 signalled="" pid
  start="$(date +%s)"
  ( trap '' USR1; exec "$@" ) &
  LAUNCHER_PID=$!
  # A worker that is still importing has no handler yet (USR1 is ignored there): re-sent below.
  forward_stop() { STOP_REQUESTED=1; echo "caught a stop signal: asking the trainers to checkpoint and stop" >&2; }
  trap forward_stop USR1 TERM
  trap 'kill -TERM "$LAUNCHER_PID" 2>/dev/null' INT  # Ctrl-C: stop now (the launcher ignores INT as a job)
  while :; do
    if [ "$STOP_REQUESTED" = 1 ]; then
      pid="$(trainer_pids "$LAUNCHER_PID" | tr '\n' ' ')"
      # shellcheck disable=SC2086  # one word per PID
      [ -z "$pid" ] || kill -USR1 $pid 2>/dev/null || true
      signalled="${signalled:-$pid}"
      if [ "$restarts" != 0 ] && [ -n "$signalled" ] && ! kill -0 $signalled 2>/dev/null; then
        # The signalled workers are gone: stop the launcher before it restarts them (they would
        # resume and train on, past the preemption notice). Read the marker before a restart could.
        if [ -f "$marker" ] && [ "$(stat -c %Y "$marker")" -ge "$start" ]; then stopped=1; fi
        kill -TERM "$LAUNCHER_PID" 2>/dev/null || true
      fi
      if ! kill -0 "$LAUNCHER_PID" 2>/dev/null; then wait "$LAUNCHER_PID" && rc=0 || rc=$?; break; fi
      sleep 0.5
    else
      wait "$LAUNCHER_PID" && rc=0 || rc=$?  # returns early when a trap runs
      kill -0 "$LAUNCHER_PID" 2>/dev/null || break
    fi
  done
  trap - USR1 TERM INT
  if [ -f "$marker" ] && [ "$(stat -c %Y "$marker")" -ge "$start" ]; then stopped=1; fi
  if [ "$stopped" = 1 ]; then
    echo "trainers stopped on a signal with a checkpoint ($(cat "$marker" 2>/dev/null)); exit code 75" >&2
    return 75
  fi
  return "$rc"
}
