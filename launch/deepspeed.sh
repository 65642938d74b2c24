#!/usr/bin/env bash
# Launch ep-train with DeepSpeed's launcher (ssh/pdsh to the hosts of a hostfile, or this machine).
#   launch/deepspeed.sh --config C.yaml [--data DIR] [--run-dir DIR] [--resume auto|DIR]
#                       [--hostfile FILE] [--include SPEC] [--exclude SPEC] [--num_gpus N] [--num_nodes N]
#                       [--master_addr H] [--master_port P] [--no_ssh --node_rank R] [-- trainer overrides ...]
# --no_ssh: start this command on every node yourself (e.g. under srun) with its --node_rank;
# otherwise DeepSpeed reaches the hostfile's nodes by passwordless ssh/pdsh.
# Without a GPU, DeepSpeed runs CPU processes (gloo); --num_gpus then means processes per node.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/common.sh"
# DeepSpeed's runner reads this hostfile when none is given (runner.py DLTS_HOSTFILE)
DLTS_HOSTFILE=/job/hostfile

# How many hosts DeepSpeed reaches by ssh/pdsh: those of the hostfile (or of --include, or --num_nodes of
# them); 0 or 1 = a local launch (its runner starts one host's processes itself, with a list of arguments).
# --exclude is not counted: a host it removes would at worst make the checks below refuse a launch.
remote_hosts() {
  local file="${hostfile:-$DLTS_HOSTFILE}" n=0 line entries=()
  if [ "$no_ssh" = 1 ] || [ ! -f "$file" ]; then echo 0; return; fi
  while read -r line _; do
    case "$line" in ""|"#"*) ;; *) n=$((n + 1)) ;; esac
  done < "$file"
  if [ -n "$include" ]; then IFS=@ read -ra entries <<< "$include"; n=${#entries[@]}; fi
  if [[ "$num_nodes" =~ ^[0-9]+$ ]] && [ "$num_nodes" -ge 1 ] && [ "$num_nodes" -lt "$n" ]; then n=$num_nodes; fi
  echo "$n"
}

# In ssh/pdsh mode DeepSpeed's runner (multinode_runner.py, PDSHRunner) joins the remote command into one
# shell string: an argument with a space goes in "..." (where $, ` and \ still act), any other as it is, and
# `cd FOLDER;` and the Python unquoted; pdsh also replaces %n, %h, ... So ( ) $ ; ` * ? ~ & | < > ' " \ %
# in a path would run or break on every node. $1 = the mode, $2 = what, $3 = the text, $4 = 1 if DeepSpeed
# quotes it when it has a space.
ssh_safe() {
  local allowed='^[A-Za-z0-9_./:=,+@-]*$' spaces=""
  [ "$4" = 0 ] || { allowed='^[A-Za-z0-9_./:=,+@ -]*$'; spaces=" and spaces"; }
  [[ "$3" =~ $allowed ]] || die "$2 '$3' has characters that DeepSpeed's $1 passes unquoted to each node's \
shell, where they would run or break; use only letters, digits, _./:=,+@-$spaces there, or start this script on \
each node yourself with --no_ssh --node_rank R (e.g. under srun)"
}

config="" data="" run_dir="runs/default" resume="" hostfile="" include="" exclude="" num_gpus="" num_nodes=""
master_port=29500 master_addr="" no_ssh=0 node_rank=""
while [ $# -gt 0 ]; do
  case "$1" in
    --config) need_value "$@"; config="$2"; shift 2 ;;
    --data) need_value "$@"; data="$2"; shift 2 ;;
    --run-dir) need_value "$@"; run_dir="$2"; shift 2 ;;
    --resume) need_value "$@"; resume="$2"; shift 2 ;;
    --hostfile) need_value "$@"; hostfile="$2"; shift 2 ;;
    --include) need_value "$@"; include="$2"; shift 2 ;;
    --exclude) need_value "$@"; exclude="$2"; shift 2 ;;
    --num_gpus|--num-gpus) need_value "$@"; num_gpus="$2"; shift 2 ;;
    --num_nodes|--num-nodes) need_value "$@"; num_nodes="$2"; shift 2 ;;
    --master_port|--master-port) need_value "$@"; master_port="$2"; shift 2 ;;
    --master_addr|--master-addr) need_value "$@"; master_addr="$2"; shift 2 ;;
    --no_ssh|--no-ssh) no_ssh=1; shift ;;
    --node_rank|--node-rank) need_value "$@"; node_rank="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) die "unknown option '$1' (trainer overrides go after --)" ;;
  esac
done
check_inputs "$config" "$data" "$resume"
check_overrides "give it once, as --config" "give it once, as --run-dir" "${data:+give it once, as --data}" \
  "${resume:+give it once, as --resume}" "$@"
if [ -n "$hostfile" ]; then [ -f "$hostfile" ] || die "hostfile '$hostfile' not found (see launch/hostfile.example)"; fi
py="$(ep_python "$root")"
cmd=("$py" -m deepspeed.launcher.runner --master_port "$master_port")
[ -z "$hostfile" ] || cmd+=(--hostfile "$hostfile")
[ -z "$include" ] || cmd+=(--include "$include")
[ -z "$exclude" ] || cmd+=(--exclude "$exclude")
[ -z "$num_gpus" ] || cmd+=(--num_gpus "$num_gpus")
[ -z "$num_nodes" ] || cmd+=(--num_nodes "$num_nodes")
[ -z "$master_addr" ] || cmd+=(--master_addr "$master_addr")
if [ "$no_ssh" = 1 ]; then
  [ -n "$node_rank" ] || die "--no_ssh needs --node_rank (this node's index in the hostfile)"
  # without it DeepSpeed asks the first host for its address over ssh, which --no_ssh is meant to avoid
  [ -n "$master_addr" ] || die "--no_ssh needs --master_addr (the first hostfile node's address, reachable from \
every node)"
  cmd+=(--no_ssh --node_rank "$node_rank")
fi
trainer_args "$config" "$data" "$resume" "$@"
cmd+=(--module ep_train.train --run-dir "$run_dir" "${TRAINER_ARGS[@]}")
ssh_hosts="$(remote_hosts)"
if [ "$ssh_hosts" -gt 1 ]; then
  where="ssh/pdsh mode ($ssh_hosts hosts of ${hostfile:-$DLTS_HOSTFILE})"
  ssh_safe "$where" "the working folder" "$(pwd -P)" 0
  ssh_safe "$where" "the Python" "$py" 0
  ssh_safe "$where" "--master_addr" "$master_addr" 0
  ssh_safe "$where" "--master_port" "$master_port" 0
  for arg in --run-dir "$run_dir" "${TRAINER_ARGS[@]}"; do ssh_safe "$where" "the argument" "$arg" 1; done
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
check_config "$py" "" --run-dir "$run_dir" "${TRAINER_ARGS[@]}"
print_cmd "${cmd[@]}"
# Not exec: SIGUSR1/SIGTERM to this script reach this node's trainer workers (DeepSpeed's launcher
# would die of USR1 and orphan them); exit code 75 after a stop with a checkpoint.
rc=0
run_forwarding_stop "$run_dir" 0 "${cmd[@]}" || rc=$?
exit "$rc"
