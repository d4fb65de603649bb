#!/usr/bin/env bash
# The pre-registered study of docs/results.md ("Does R3F help, and why?"): all-MiniLM-L6-v2 on MRPC and CoLA.
#
#   bash docs/study/run.sh PHASE [--lane I/N] [--device DEV] [--dry-run]
#
# PHASE: pilot | main | ablation | all, or confirm (the follow-up of docs/results.md, planned 2026-12-01: the main
# arms again at seeds 21-30; not part of all).  Every run is resumable: a finished run (results.json) is skipped, a run
# with a checkpoint continues with --resume, so re-running the same command after an interruption (reboot,
# Ctrl-C, kill) picks up where it stopped.  --lane I/N runs every N-th job starting at the I-th (1-based), so N
# lanes can run side by side (one CPU thread each: OMP_NUM_THREADS defaults to 1 per lane on CPU).
# R3F_STUDY_OUT (default docs/results/study) is where the runs go; R3F_GLUE_DIR or R3F_DATA_DIR where GLUE is.
#   CPU, two lanes in the background:
#     for l in 1 2; do nohup nice -n 19 bash docs/study/run.sh pilot --lane $l/2 > /tmp/pilot$l.log 2>&1 & done
#   One GPU, everything:  bash docs/study/run.sh all --device cuda
#   A fresh reproduction (the committed runs would otherwise be skipped as finished):
#     R3F_STUDY_OUT=/tmp/study bash docs/study/run.sh all --device cuda
#   The committed plan.env is kept, so the pilot runs but the main and ablation phases use the pre-registered
#   plan; delete plan.env (then choose.py writes it from the new pilot) to let the new pilot choose.
# (all: pilot, then docs/study/choose.py applies the pilot's rule and writes plan.env if it is missing, then main
# and ablation; with several lanes, run the pilot in every lane first.)
# The main and ablation phases read their learning rate and epochs from docs/study/plan.env, fixed after the pilot
# (see docs/results.md, "Analysis plan") and not changed afterwards.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
phase=${1:?usage: run.sh pilot|main|ablation|all|confirm [--lane I/N] [--device DEV] [--dry-run]}; shift
opts=("$@")
lane=1/1; device=cpu; dry=0
while [ $# -gt 0 ]; do
  case $1 in
    --lane) lane=$2; shift 2;;
    --device) device=$2; shift 2;;
    --dry-run) dry=1; shift;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2;;
  esac
done
lane_i=${lane%/*}; lane_n=${lane#*/}
[[ $lane_i =~ ^[0-9]+$ && $lane_n =~ ^[0-9]+$ && $lane_i -ge 1 && $lane_i -le $lane_n ]] \
  || { echo "run.sh: --lane must be I/N with 1 <= I <= N, got $lane" >&2; exit 2; }
GLUE=${R3F_GLUE_DIR:-${R3F_DATA_DIR:-$(cd "$here/../../.." && pwd)/shared/data}/glue}
OUT=${R3F_STUDY_OUT:-$(cd "$here/.." && pwd)/results/study}
[ "$device" = cpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
declare -A BS=([mrpc]=16 [cola]=32)
# Fixed for every run: AdamW, 6 % warm-up then linear decay, clipping at 1, 128 tokens, R3F's paper defaults.
COMMON=(--data-dir "$GLUE" --device "$device" --warmup-ratio 0.06 --max-length 128 --weight-decay 0.01
        --max-grad-norm 1.0 --noise uniform --eval-every epoch --no-progress)

jobs=()  # "dir|args..." one per run, in a fixed order
pilot() {
  for seed in 1 2; do for task in mrpc cola; do for lr in 5e-5 1e-4 2e-4; do
    jobs+=("pilot/$task-standard-lr$lr-seed$seed|--task $task --method standard --lr $lr --epochs 5 --batch-size ${BS[$task]} --seed $seed")
  done; done; done
}
plan() {
  [ -f "$here/plan.env" ] || { echo "run.sh: $here/plan.env is missing: the pilot fixes it (docs/results.md)" >&2; exit 2; }
  # shellcheck source=/dev/null
  source "$here/plan.env"
}
main_runs() {
  plan
  local seeds=${1:-$MAIN_SEEDS} phase_dir=${2:-main}
  # per seed: mrpc standard, mrpc r3f, cola r3f, cola standard: with two lanes each lane gets one standard and one
  # R3F run (R3F costs about twice a standard run) of every seed, and a seed's four runs finish together
  local order
  for seed in $seeds; do for task in mrpc cola; do
    [ $task = mrpc ] && order="standard r3f" || order="r3f standard"
    for method in $order; do
      lr=LR_${task^^}; ep=EPOCHS_${task^^}
      jobs+=("$phase_dir/$task-$method-seed$seed|--task $task --method $method --lam 1 --eps 1e-5 --lr ${!lr} --epochs ${!ep} --batch-size ${BS[$task]} --seed $seed")
    done
  done; done
}
ablation() {
  plan
  local base="--task mrpc --lr $LR_MRPC --epochs $EPOCHS_MRPC --batch-size ${BS[mrpc]}"
  for seed in $ABLATION_SEEDS; do
    jobs+=("ablation/mrpc-r3f-eps0-seed$seed|$base --method r3f --lam 1 --eps 0 --seed $seed")
    jobs+=("ablation/mrpc-r3f-samedropout-seed$seed|$base --method r3f --lam 1 --eps 1e-5 --same-dropout --seed $seed")
    jobs+=("ablation/mrpc-r3f-lam5-seed$seed|$base --method r3f --lam 5 --eps 1e-5 --seed $seed")
    jobs+=("ablation/mrpc-r4f-lam0-seed$seed|$base --method r4f --lam 0 --eps 1e-5 --seed $seed")
    jobs+=("ablation/mrpc-r4f-lam1-seed$seed|$base --method r4f --lam 1 --eps 1e-5 --seed $seed")
  done
}
case $phase in
  pilot) pilot;; main) main_runs;; ablation) ablation;;
  confirm) main_runs "21 22 23 24 25 26 27 28 29 30" confirm;;  # the follow-up's seeds, fixed in its plan
  all)  # the phases in turn; between them the pilot's rule fixes plan.env (choose.py) unless it exists
    bash "$0" pilot "${opts[@]}"
    if [ ! -f "$here/plan.env" ]; then
      if [ "$dry" = 1 ]; then echo "then: python $here/choose.py $OUT/pilot --write, and the main and ablation runs"; exit 0; fi
      "${PYTHON:-python}" "$here/choose.py" "$OUT/pilot" --write || [ -f "$here/plan.env" ] \
        || { echo "run.sh: the pilot fixed no plan (above: unfinished runs in another lane, or a task that did not" \
                  "learn); main and ablation not started" >&2; exit 3; }
    fi
    bash "$0" main "${opts[@]}"
    exec bash "$0" ablation "${opts[@]}";;
  *) echo "run.sh: unknown phase $phase (pilot, main, ablation, all, confirm)" >&2; exit 2;;
esac

k=0
for job in "${jobs[@]}"; do
  k=$((k + 1))
  [ $(( (k - 1) % lane_n + 1 )) -eq "$lane_i" ] || continue
  dir="$OUT/${job%%|*}"; read -r -a args <<< "${job#*|}"
  if [ -f "$dir/results.json" ]; then echo "done     $dir"; continue; fi
  resume=(); [ -f "$dir/checkpoint.pt" ] && resume=(--resume)
  echo "$(date -u +%FT%TZ) run ${resume[*]:-} $dir"
  [ "$dry" = 1 ] && continue
  r3f-finetune --output-dir "$dir" "${args[@]}" "${COMMON[@]}" "${resume[@]}"
done
