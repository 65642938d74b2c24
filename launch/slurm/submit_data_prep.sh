#!/usr/bin/env bash
# Submit the data preparation as an array of TASKS jobs plus a merge that runs when all succeeded.
#   launch/slurm/submit_data_prep.sh TASKS TOKENIZER OUTPUT INPUT [INPUT ...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$root/launch/common.sh"
[ $# -ge 4 ] || die "usage: launch/slurm/submit_data_prep.sh TASKS TOKENIZER OUTPUT INPUT [INPUT ...]"
tasks="$1"
shift
[[ "$tasks" =~ ^[1-9][0-9]*$ ]] || die "TASKS must be a positive integer, got '$tasks'"
[ -f "$1" ] || die "tokenizer '$1' not found"
mkdir -p logs
# The jobs find the repository through EP_TRAIN_ROOT (SLURM_SUBMIT_DIR is wherever this was run from).
array_id="$(sbatch --parsable --export=ALL,EP_TRAIN_ROOT="$root",EP_TRAIN_DATA_TASKS="$tasks" \
  --array="0-$((tasks - 1))" \
  "$root/launch/slurm/data_prep.sbatch" "$@")"
merge_id="$(sbatch --parsable --export=ALL,EP_TRAIN_ROOT="$root" --dependency="afterok:${array_id}" \
  "$root/launch/slurm/data_prep_merge.sbatch" "$2")"
echo "array job ${array_id} (${tasks} tasks), merge job ${merge_id}"
