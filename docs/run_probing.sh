#!/usr/bin/env bash
# The issue-6 probing experiment as it was run for docs/probing.md (2-core CPU, torch 2.13.0+cpu).
# Retention runs in two parallel lanes of one thread each (about 20% more throughput than one
# two-thread process on this machine); every lane shares one --output-dir, so the final commands
# reuse every fine-tuned stage and every cached feature and only recompute the probe rows.
set -euo pipefail
OUT=${OUT:-/work/probe-exp}
DATA=${DATA:-../shared/data/glue}
COMMON=(--data-dir "$DATA" --output-dir "$OUT" --steps 32 --batch-size 16 --lr 1e-4 --max-length 64
        --probe-train-examples 500 --probe-eval-examples 500 --cka-examples 300 --no-progress)
RET=(retention --chain sst2 qnli qqp rte --cycles 3)

# Both lanes rewrite <out>/retention.json with their own rows; the combined run below writes the real one.
mkdir -p "$OUT"
lane() { OMP_NUM_THREADS=1 r3f-probe "${RET[@]}" "${COMMON[@]}" "$@"; }
( lane --methods r3f --seeds 1 2 3 && lane --methods standard --seeds 1 ) > "$OUT/lane1.log" 2>&1 &
p1=$!
( lane --methods r4f --seeds 1 2 3 && lane --methods standard --seeds 2 3 ) > "$OUT/lane2.log" 2>&1 &
p2=$!
wait "$p1"
wait "$p2"

# All methods and seeds together: every stage and feature is reused, only the rows are recomputed.
# degradation reuses retention's first cycle, generalization its first stage (same budget, same folder).
r3f-probe "${RET[@]}" "${COMMON[@]}" --methods standard r3f r4f --seeds 1 2 3 > "$OUT/retention.log" 2>&1
r3f-probe degradation --chain sst2 qnli qqp rte "${COMMON[@]}" --methods standard r3f r4f --seeds 1 2 3 \
    > "$OUT/degradation.log" 2>&1
r3f-probe generalization --source sst2 --targets rte mrpc cola qnli mnli qqp "${COMMON[@]}" \
    --methods standard r3f r4f --seeds 1 2 3 > "$OUT/generalization.log" 2>&1
