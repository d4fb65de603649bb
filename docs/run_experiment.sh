#!/usr/bin/env bash
# The experiment of docs/results.md: all-MiniLM-L6-v2, standard vs R3F vs R4F on RTE, MRPC, CoLA and a
# 10k-example SST-2 subset, 3 seeds, one fixed budget per task shared by all methods.
# Usage: bash docs/run_experiment.sh GLUE_DIR OUT_DIR   (runs are sequential; each uses all cores)
set -euo pipefail
GLUE=${1:?GLUE data dir}; OUT=${2:?output dir}
# task -> per-task budget: batch size, steps (same for every method and seed)
declare -A BS=([rte]=16 [mrpc]=16 [cola]=32 [sst2]=32)
declare -A STEPS=([rte]=80 [mrpc]=100 [cola]=150 [sst2]=200)
declare -A EXTRA=([sst2]="--max-train-examples 10000")
COMMON="--lr 1e-4 --warmup-ratio 0.06 --max-length 128 --weight-decay 0.01 --max-grad-norm 1.0 --lam 1.0 --eps 1e-5 --noise uniform --no-progress"
for seed in 1 2 3; do
  for task in rte mrpc cola sst2; do
    for method in standard r3f r4f; do
      dir="$OUT/$task-$method-seed$seed"
      [ -f "$dir/results.json" ] && continue
      r3f-finetune --task "$task" --data-dir "$GLUE" --method "$method" --seed "$seed" --output-dir "$dir" \
        --batch-size "${BS[$task]}" --max-steps "${STEPS[$task]}" ${EXTRA[$task]:-} $COMMON --overwrite
    done
  done
done
