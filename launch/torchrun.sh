#!/usr/bin/env bash
# Launch ep-train with torchrun: one node, or several (static ranks or c10d rendezvous).
#   launch/torchrun.sh --config C.yaml [--data DIR] [--run-dir DIR] [--resume auto|DIR]
#                      [--nproc N] [--nnodes N --node-rank R --master-addr H --master-port P]
#                      [--rdzv HOST:PORT --rdzv-id ID] [--max-restarts K] [-- trainer overrides ...]
# Stop signals: SIGUSR1 or SIGTERM sent to this script reach the trainer workers (not torchrun), which
# finish the step, checkpoint and stop; the script then exits 75. A bad config exits 2 before torchrun starts.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/common.sh"
config="" data="" run_dir="runs/default" resume="" nproc="" nnodes=1 node_rank=0
master_addr=127.0.0.1 master_port=29500 rdzv="" rdzv_id="ep-train" max_restarts=0 addr_given=0
rank_given=0
while [ $# -gt 0 ]; do
  case "$1" in
    --config) need_value "$@"; config="$2"; shift 2 ;;
    --data) need_value "$@"; data="$2"; shift 2 ;;
    --run-dir) need_value "$@"; run_dir="$2"; shift 2 ;;
    --resume) need_value "$@"; resume="$2"; shift 2 ;;
    --nproc|--nproc-per-node) need_value "$@"; nproc="$2"; shift 2 ;;
    --nnodes) need_value "$@"; nnodes="$2"; shift 2 ;;
    --node-rank) need_value "$@"; node_rank="$2"; rank_given=1; shift 2 ;;
    --master-addr) need_value "$@"; master_addr="$2"; addr_given=1; shift 2 ;;
    --master-port) need_value "$@"; master_port="$2"; shift 2 ;;
    --rdzv) need_value "$@"; rdzv="$2"; shift 2 ;;
    --rdzv-id) need_value "$@"; rdzv_id="$2"; shift 2 ;;
    --max-restarts) need_value "$@"; max_restarts="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) die "unknown option '$1' (trainer overrides go after --)" ;;
  esac
done
check_inputs "$config" "$data" "$resume"
check_overrides "give it once, as --config" "give it once, as --run-dir" "${data:+give it once, as --data}" \
  "${resume:+give it once, as --resume}" "$@"
if [ "$nnodes" != 1 ] && [ -z "$rdzv" ] && [ "$addr_given" = 0 ]; then
  # every node would wait for a master at its own 127.0.0.1 until the rendezvous timed out
  die "--nnodes $nnodes needs --master-addr (the address of the node with --node-rank 0) or --rdzv HOST:PORT"
fi
if [ -z "$rdzv" ] && [ "$max_restarts" = 0 ] && [[ "$nnodes" =~ ^[0-9]+$ ]] && [ "$nnodes" -gt 1 ]; then
  # Static ranks: a node without --node-rank would be rank 0 as well, and both would wait for the others forever.
  # (With --rdzv or --max-restarts the c10d rendezvous numbers the nodes itself.)
  [ "$rank_given" = 1 ] || die "--nnodes $nnodes needs --node-rank R on each node, its own from 0 (the \
--master-addr node) to $((nnodes - 1)), or --rdzv HOST:PORT on every node"
  [[ "$node_rank" =~ ^[0-9]+$ ]] && [ "$node_rank" -lt "$nnodes" ] || die "--node-rank $node_rank is invalid with \
--nnodes $nnodes: give each node its own rank from 0 (the --master-addr node) to $((nnodes - 1))"
fi
[ -n "$nproc" ] || nproc="$(default_nproc)"
py="$(ep_python "$root")"
cmd=("$py" -m torch.distributed.run --nnodes "$nnodes" --nproc-per-node "$nproc" --max-restarts "$max_restarts")
if [ -z "$rdzv" ] && [ "$max_restarts" != 0 ]; then
  # Restarted workers must meet in a fresh rendezvous round; the static one reuses stale store keys.
  rdzv="${master_addr}:${master_port}"
  echo "note: --max-restarts $max_restarts uses c10d rendezvous at $rdzv"
fi
if [ -n "$rdzv" ]; then
  cmd+=(--rdzv-backend c10d --rdzv-endpoint "$rdzv" --rdzv-id "$rdzv_id")
else
  cmd+=(--node-rank "$node_rank" --master-addr "$master_addr" --master-port "$master_port")
fi
trainer_args "$config" "$data" "$resume" "$@"
cmd+=(-m ep_train.train --run-dir "$run_dir" "${TRAINER_ARGS[@]}")
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
world=""
case "$nnodes$nproc" in *[!0-9]*) ;; *) world=$((nnodes * nproc)) ;; esac  # unknown for elastic MIN:MAX
check_config "$py" "$world" --run-dir "$run_dir" "${TRAINER_ARGS[@]}"
print_cmd "${cmd[@]}"
# what this node's workers may run on (its CPU affinity: a scheduler's binding shows here)
echo "$(hostname): $nproc worker(s) on $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) CPU(s)"
# Not exec: this script stays to forward SIGUSR1/SIGTERM to the workers and to exit 75 after a stop.
rc=0
run_forwarding_stop "$run_dir" "$max_restarts" "${cmd[@]}" || rc=$?
exit "$rc"
