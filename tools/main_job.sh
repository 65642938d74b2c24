#!/usr/bin/env bash
# The README's main job, from a fresh machine: set up .venv, turn real text already on the machine
# (the Python standard library's sources) into tokenized shards, then train a small MoE with expert
# parallelism (EP 2) over 2 processes under DeepSpeed ZeRO-3 + CPU offload.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/setup_env.sh"
cd "$root"
py=.venv/bin/python
out="${EP_TRAIN_DEMO_DIR:-runs/demo}"
stdlib="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
corpus=("$stdlib"/*.py "$stdlib/json" "$stdlib/email" "$stdlib/asyncio" "$stdlib/http" "$stdlib/unittest"
        "$stdlib/logging" "$stdlib/concurrent" "$stdlib/importlib" "$stdlib/xml")
mkdir -p "$out"
echo "== 1/3 tokenizer: sentencepiece BPE (4096 pieces) on the standard library's text"
if [ ! -f "$out/tokenizer.model" ]; then
  "$py" tools/data_prep_tool.py train-tokenizer --input "${corpus[@]}" --vocab-size 4096 \
    --output "$out/tokenizer" --input-sentence-size 300000
fi
echo "== 2/3 shards: data_prep_tool build (2 workers, 2% validation)"
"$py" tools/data_prep_tool.py build --input "${corpus[@]}" --tokenizer "$out/tokenizer.model" \
  --output "$out/data" --workers 2 --val-fraction 0.02 --shard-size-mb 4
"$py" tools/data_prep_tool.py inspect "$out/data" --samples 1 | head -n 8
echo "== 3/3 training: torchrun, 2 processes, EP 2, ZeRO-3 + CPU offload, activation checkpointing"
export OMP_NUM_THREADS=1
.venv/bin/torchrun --nnodes 1 --nproc_per_node 2 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29511}" \
  -m ep_train.train --config configs/demo.yaml --run-dir "$out/run" --data_dir "$out/data" \
  --tokenizer "$out/tokenizer.model" "$@" 2>&1 | grep -v -E '^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|FutureWarning|return func'
echo
echo "Done. Look at the run:"
echo "  loss/expert statistics per step:  $out/run/metrics.jsonl"
echo "  TensorBoard:                      .venv/bin/tensorboard --logdir $out/run/tensorboard"
echo "  checkpoints (resume with --resume auto): $out/run/checkpoints"
