#!/usr/bin/env bash
# One prepared GPU check, for a bare machine with CUDA torch, Triton and nvcc (no vLLM, no network):
#   1. build the CUDA extension (csrc/cuda) in place
#   2. pytest -m gpu
#   3. CUDA-graph capture and replay of a decode step and a store of the Triton path (outside vLLM)
#   4. compute-sanitizer memcheck on one small store and decode per format (plain, calibrated, sinks, FibQuant)
#   5. store + decode of a calibrated, a sink and a FibQuant format per implementation against the reference
#   6. decode and store benchmarks at Llama-3.1-8B and SmolLM2 shapes (1x4K, 8x16K, 32x32K, 64x32K; block
#      tables as wide as a 128K max_model_len)
# and writes one Markdown report. Every step has its own time limit inside an 8-minute budget; a failed step
# is reported and the next one runs.
#
#   scripts/gpu_check.sh [--out REPORT.md] [--wheels DIR]   # on the GPU machine
#   scripts/gpu_check.sh --smoke [--out REPORT.md]          # CPU: Triton interpreter, tiny shapes (CI runs it)
#
# --wheels DIR installs the wheels in DIR (e.g. pydantic, pyyaml that the image lacks) into a private target
# first, offline. Exit status: 0 when every step that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
[[ -x .venv/bin/python && -z ${PYTHON:-} ]] && PY=.venv/bin/python
SMOKE=0
OUT=gpu_check_report.md
WHEELS=
BUDGET=${GPU_CHECK_BUDGET_S:-480}
while [[ $# -gt 0 ]]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --out) OUT=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    -h|--help) sed -n 2,18p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (allowed: --smoke, --out FILE, --wheels DIR)" >&2; exit 2 ;;
  esac
  shift
done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ -n $WHEELS ]]; then
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
SMOKE_FLAG=
if [[ $SMOKE == 1 ]]; then
  SMOKE_FLAG=--smoke
  export TRITON_INTERPRET=1
fi

LOGDIR=$(mktemp -d)
START=$SECONDS
FAILED=0
SUMMARY=()
DETAILS=()

# step NAME LIMIT_S COMMAND...: runs COMMAND under the smaller of LIMIT_S and what is left of the budget.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local log="$LOGDIR/$(echo "$name" | tr -c 'A-Za-z0-9' _).log"
  if ((left < 10)); then
    SUMMARY+=("| $name | not run: the ${BUDGET}s budget is spent | - |")
    FAILED=1
    return
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local status=passed
  if ((rc == 124 || rc == 137)); then status="timed out after ${limit}s"; FAILED=1
  elif ((rc != 0)); then status="FAILED (exit $rc)"; FAILED=1; fi
  SUMMARY+=("| $name | $status | $((SECONDS - t0)) |")
  DETAILS+=("### $name" "" "\`$*\`" "" '```' "$(grep -v -e 'Failed to initialize NumPy' -e '_conversion_method_template' "$log" | tail -n 60)" '```' "")
  echo "[$((SECONDS - START))s] $name: $status"
}

skip() { SUMMARY+=("| $1 | skipped: $2 | - |"); echo "$1: skipped ($2)"; }

step "environment" 60 "$PY" scripts/gpu_check_steps.py env $SMOKE_FLAG
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [[ $SMOKE == 0 && $HAS_CUDA != 1 ]]; then
  echo "gpu_check.sh: no CUDA device; run with --smoke on a CPU machine" >&2
  exit 1
fi

if [[ $SMOKE == 1 ]]; then
  skip "build CUDA extension" "smoke mode (CPU torch cannot build CUDA extensions)"
else
  step "build CUDA extension" 240 "$PY" setup.py -q build_ext --inplace
fi

if [[ $SMOKE == 1 ]]; then
  # On CPU every gpu test skips; collecting them still checks they import where vLLM is absent.
  step "pytest -m gpu" 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_graph.py tests/test_triton_kernels.py \
    tests/test_cuda_kernels.py
else
  step "pytest -m gpu" 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
fi

step "CUDA graph: decode + store capture and replay" 90 "$PY" scripts/gpu_check_steps.py graph $SMOKE_FLAG

if [[ $SMOKE == 0 ]] && command -v compute-sanitizer >/dev/null; then
  step "compute-sanitizer memcheck: store + decode" 120 \
    compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" scripts/gpu_check_steps.py sanitize
elif [[ $SMOKE == 1 ]]; then
  step "store + decode (compute-sanitizer runs on the GPU only)" 90 "$PY" scripts/gpu_check_steps.py sanitize --smoke
else
  skip "compute-sanitizer memcheck" "compute-sanitizer not found"
fi

step "store + decode: calibrated, sinks, fibquant2" 120 "$PY" scripts/gpu_check_steps.py formats $SMOKE_FLAG

SHAPES=1x4096,8x16384,32x32768,64x32768
step "decode benchmark" 200 "$PY" benchmarks/bench_decode.py $SMOKE_FLAG --shapes $SHAPES --max-model-len 131072 --reps 10
step "store benchmark" 90 "$PY" benchmarks/bench_store.py $SMOKE_FLAG --tokens 1,64,512,4096,65536 --reps 10

{
  echo "# vllm_kvq GPU check"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$([[ $SMOKE == 1 ]] && echo ', SMOKE mode (CPU, Triton interpreter): not a measurement'), $((SECONDS - START)) s of a ${BUDGET} s budget."
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  printf '%s\n' "${DETAILS[@]}"
} >"$OUT"
echo "report: $OUT ($((SECONDS - START))s)"
rm -rf "$LOGDIR"
exit $FAILED
