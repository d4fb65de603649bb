#!/usr/bin/env bash
# One-shot GPU suite (issue 15): everything the kernels need checked on a real GPU, in one results folder.
#
#   bash bench/gpu_suite.sh               # on a machine with one CUDA GPU (an H200: under 8 minutes)
#   bash bench/gpu_suite.sh --dry-run     # print the steps and their commands, run nothing
#   bash bench/gpu_suite.sh --out DIR     # results folder (default bench/results/gpu-<UTC date-time>)
#
# Steps (each with its own time limit, its log kept in DIR/logs/; a failing step is reported and the next
# one runs; the exit status is 1 if any step failed):
#   1. environment: GPU name, driver, CUDA, python/torch/triton/ptxas versions, git commit, date, command;
#   2. tests: the correctness tests of both kernels against the PyTorch path and float64 references
#      (tests/core/test_symmetric_kl.py, tests/kernels/test_sym_kl_*.py, test_linear_kl_kernel.py,
#      test_spectral_norm_{kernel,torch_parity}.py: on a CUDA machine conftest leaves the interpreter off, so they run the compiled kernels on the GPU;
#      and the same_dropout test of tests/core/test_methods.py, whose CUDA cases check the replay of the CUDA
#      generator), one pytest process
#      per file side by side (they compile ~220 specialisations), JUnit XML per file (tests-<file>.xml);
#   3. sm90: python -m bench.sm90 --gpu --quick: the CI set of specialisations the launchers plan for this GPU,
#      compiled through its driver and loaded (the driver's register/spill counts beside the SASS statistics;
#      the full set compiles for some 4 minutes, cold, on a 2-core VM: too long for this step's limit);
#   4. sym_kl: python -m bench.sym_kl on CUDA (the kernel vs eager, torch.compile, the PyTorch path, Liger)
#      at 2048 rows x V in {2, 50257, 128256}, bfloat16 and float32: tiny, odd and large vocabularies;
#   5. spectral_norm: python -m bench.spectral_norm on CUDA;
#   6. lm_head: python -m bench.lm_step --objective-only on a real-size head (H 4096, V 128256, 8192 rows, bf16):
#      CE + KL_S fused vs materialised logits vs Liger's fused linear CE alone (if liger-kernel is importable).
# Commit DIR (without logs/ if they are large) and quote its summary.md in docs/kernels.md.
set -euo pipefail

COMMAND="bash bench/gpu_suite.sh $*"
PYTHON=${PYTHON:-python}
DRY=0
OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."  # the repository root
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=${OUT:-bench/results/gpu-$STAMP}
LOGS="$OUT/logs"

environment() {  # what ran where: kept as DIR/environment.txt
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || echo "nvidia-smi: not found"
  "$PYTHON" - <<'PY'
import pathlib, platform, subprocess
import torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", triton.__version__)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (torch sees no CUDA GPU)")
ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
print(subprocess.run([str(ptxas), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
PY
  echo "git $(git rev-parse HEAD)"
  git status --short --untracked-files=no | head -20
}
export -f environment

parallel_tests() {  # one pytest process per file, side by side: compiling ~220 kernel specialisations one
  # after another would take minutes; Triton's on-disk cache is shared between the processes. Each file's
  # output is appended to the step's log when all are done; the exit status is 1 if any file failed.
  local pids=() names=() rc=0 f name
  for f in "$@"; do
    name=$(basename "${f%%::*}" .py)  # a test's node id (file::test) logs under its file's name
    "$PYTHON" -m pytest -q -p no:cacheprovider "$f" --junitxml="$OUT/tests-$name.xml" > "$LOGS/tests-$name.log" 2>&1 &
    pids+=("$!"); names+=("$name")
  done
  for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then echo "== ${names[$i]}: passed"; else echo "== ${names[$i]}: FAILED"; rc=1; fi
    cat "$LOGS/tests-${names[$i]}.log"
  done
  return $rc
}
export -f environment parallel_tests
export PYTHON

# name | time limit (s) | command (bash -c, in the repository root). The limits add up to 8 minutes.
STEPS=(
  "environment|15|environment"
  "tests|180|parallel_tests tests/core/test_symmetric_kl.py tests/kernels/test_sym_kl_kernel.py tests/kernels/test_sym_kl_faults.py tests/kernels/test_linear_kl_kernel.py tests/kernels/test_spectral_norm_kernel.py tests/kernels/test_spectral_norm_torch_parity.py tests/core/test_methods.py::test_same_dropout_measures_the_noise_alone"
  "sm90|60|$PYTHON -m bench.sm90 --gpu --quick --quiet --json $OUT/sm90_gpu.json"
  "sym_kl|120|$PYTHON -m bench.sym_kl --device cuda --vocab 2 50257 128256 --rows 2048 --dtypes bfloat16 float32 --budget 0.3 --no-plot --out $OUT/sym_kl_cuda.json"
  "spectral_norm|45|$PYTHON -m bench.spectral_norm --out $OUT/spectral_norm_cuda.json"
  "lm_head|60|$PYTHON -m bench.lm_step --objective-only --hidden 4096 --vocab 128256 --batch 8 --seq 1024 --dtype bfloat16 --memory-dtypes bfloat16 --warmup 2 --steps 5 --no-plot --out $OUT/lm_head_cuda.json"
)

if [[ $DRY == 1 ]]; then
  echo "results folder: $OUT (not created: dry run)"
  total=0
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$step"
    total=$((total + limit))
    printf '%-14s limit %4ss: %s\n' "$name" "$limit" "$cmd"
  done
  echo "time limits add up to ${total}s"
  exit 0
fi

mkdir -p "$LOGS"
export OUT LOGS
{
  echo "command: $COMMAND"
  echo "date (UTC): $(date -u '+%Y-%m-%d %H:%M:%S')"
  echo "host: $(hostname)"
} > "$OUT/run.txt"

SUMMARY="$OUT/summary.md"
printf '| step | status | seconds | log |\n|---|---|---|---|\n' > "$SUMMARY"
failed=()
i=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$step"
  i=$((i + 1))
  log="$LOGS/$i-$name.log"
  echo "[$i/${#STEPS[@]}] $name (limit ${limit}s): $cmd" | tee "$log" >&2
  start=$(date +%s)
  # `if` keeps set -e from ending the suite on a failing step; the step's status is kept instead.
  if timeout --kill-after=10 "$limit" bash -c "$cmd" >> "$log" 2>&1; then rc=0; else rc=$?; fi
  secs=$(( $(date +%s) - start ))
  if [[ $rc == 0 ]]; then status="ok"; elif [[ $rc == 124 || $rc == 137 ]]; then status="TIMEOUT"; else status="FAILED (exit $rc)"; fi
  [[ $rc == 0 ]] || failed+=("$name")
  printf '| %s | %s | %s | logs/%s |\n' "$name" "$status" "$secs" "$(basename "$log")" >> "$SUMMARY"
  echo "    -> $status in ${secs}s (log: $log)" >&2
done
cp "$LOGS/1-environment.log" "$OUT/environment.txt" 2>/dev/null || true
cp "$SUMMARY" "$SUMMARY.tmp" && { cat "$OUT/run.txt"; echo; cat "$SUMMARY.tmp"; } > "$SUMMARY" && rm -f "$SUMMARY.tmp"

echo >&2
cat "$SUMMARY" >&2
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "gpu_suite: ${#failed[@]} step(s) failed: ${failed[*]} (logs in $LOGS)" >&2
  exit 1
fi
echo "gpu_suite: all steps passed; results in $OUT" >&2
