#!/usr/bin/env bash
# The longer GPU benchmark grid of docs/performance.md: every mode of `shardline bench`
# on the Llama-3-8B shape with random bf16 weights, each with --roofline --json, into a results
# folder (one JSON per run, stderr logs beside them, and the machine's versions).
#
#   benchmarks/run_gpu_suite.sh [results_dir]
#
# env:  PYTHON       interpreter (default: python, else python3)
#       MODEL        config directory (default benchmarks/configs/llama-3-8b)
#       ONLY         space-separated step names to run (default: all; see LIST=1); gpu_tests is a step
#       SKIP_TESTS=1 leave out gpu_tests
#       QUICK=1      smaller workloads, to check that the suite runs
#       EXTRA_ARGS   flags appended to every `shardline bench` line (e.g. "--device cpu" for a smoke run)
#       RUN_TIMEOUT  seconds one step may take before it is stopped and counted as failed (default: none)
#       LIST=1       print every step's name and exact command line, run nothing
#
# The longer grid, for a machine held longer than the one-command check (benchmarks/gpu_check.sh).
# Needs one CUDA GPU, torch and Triton; no Ray, no tokenizer, no weights (the model is a config), no
# network: benchmarks/ensure_shardline.sh installs the project when `import shardline` fails.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
if [[ -z "${PYTHON:-}" ]]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
MODEL=${MODEL:-benchmarks/configs/llama-3-8b}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
COMMON=(--model "$MODEL" --load-format dummy --roofline --json)
N=1; [[ "${QUICK:-0}" == 1 ]] && N=0  # QUICK=1: smaller workloads, to check the suite runs
failures=0
MODE=list  # list: collect the step names; plan: print them; run: run them

step_selected() {  # step_selected NAME: is NAME to run under ONLY / SKIP_TESTS?
  if [[ $1 == gpu_tests && "${SKIP_TESTS:-0}" == 1 ]]; then return 1; fi
  [[ -z "${ONLY:-}" ]] && return 0
  [[ " $ONLY " == *" $1 "* ]]
}

plan_line() {  # plan_line NAME CMD...: "NAME: CMD" with CMD shell-quoted, one line
  printf '%s:' "$1"; shift; printf ' %q' "$@"; echo
}

with_timeout() {  # with_timeout CMD...: CMD under RUN_TIMEOUT seconds when it is set
  if [[ -n "${RUN_TIMEOUT:-}" ]] && command -v timeout >/dev/null 2>&1; then
    timeout --kill-after=10 "$RUN_TIMEOUT" "$@"
  else
    "$@"
  fi
}

gpu_tests() {  # correctness first, at real shapes on the GPU: the kernels and the graph/fused paths
  local cmd=("$PYTHON" -m pytest -q tests/test_kernels_attention.py tests/test_kernels_elementwise.py
             tests/test_kernels_matvec.py tests/test_fast_path.py tests/test_no_host_sync.py)
  case $MODE in
    list) NAMES+=(gpu_tests); return ;;
    plan) step_selected gpu_tests && plan_line gpu_tests "${cmd[@]}"; return ;;
  esac
  step_selected gpu_tests || return 0
  echo "== gpu_tests: ${cmd[*]}"
  local t0=$SECONDS
  if with_timeout "${cmd[@]}" > "$OUT/gpu_tests.txt" 2>&1; then
    echo "   ok ($((SECONDS - t0)) s)"
  else
    echo "   FAILED ($((SECONDS - t0)) s): see $OUT/gpu_tests.txt"; failures=$((failures + 1))
  fi
}

run() {  # run NAME MODE ARGS...: one benchmark into $OUT/NAME.json
  local name=$1; shift
  local cmd=("$PYTHON" -m shardline bench "$@" "${COMMON[@]}" ${EXTRA[@]+"${EXTRA[@]}"})
  case $MODE in
    list) NAMES+=("$name"); return ;;
    plan) step_selected "$name" && plan_line "$name" "${cmd[@]}"; return ;;
  esac
  step_selected "$name" || return 0
  echo "== $name: shardline bench $*"
  local t0=$SECONDS
  if with_timeout "${cmd[@]}" > "$OUT/$name.json" 2> "$OUT/$name.log"; then
    echo "   ok ($((SECONDS - t0)) s)"
  else
    echo "   FAILED ($((SECONDS - t0)) s): see $OUT/$name.log"; failures=$((failures + 1))
  fi
}

suite() {
  gpu_tests
  # Targets (docs/performance.md): batch-1 decode, 500 x 200/180 at once, 10x transformers at
  # batch 128, 75 % shared prefix vs cache off, TTFT of a 2048-token prompt.
  run latency_b1_128_512 latency --input-len 128 --output-len $((N ? 512 : 64)) --iters 3
  # The same with overlapped scheduling off: what the overlap buys at batch 1.
  run latency_b1_128_512_sync latency --input-len 128 --output-len $((N ? 512 : 64)) --iters 3 --no-async-scheduling
  run offline_500x200_180 offline --num-prompts $((N ? 500 : 50)) --input-len 200 --output-len 180 --max-num-seqs 256
  run offline_b128_vs_hf offline --num-prompts 128 --input-len 128 --output-len $((N ? 256 : 32)) --max-num-seqs 128 \
    --compare-hf --hf-max-batch 128
  run prefix_2048_128 prefix --num-prompts $((N ? 64 : 16)) --input-len 2048 --output-len 128 --shared-fractions 0 0.25 0.5 0.75
  # 8191, not 8192: the prompt and its one output token must fit max_position_embeddings (8192).
  run prefill_ttft prefill --prompt-lens 512 2048 8191 --iters 5

  # The rest of the issue's modes. The offline grid (128/128, 128/2048, 2048/128, 2048/2048) is one
  # step per cell, so that a slow cell cannot take the others down with it.
  local cell
  for cell in 128/128 128/2048 2048/128 2048/2048; do
    run "offline_grid_${cell/\//_}" offline --num-prompts $((N ? 256 : 32)) --input-len "${cell%/*}" --output-len "${cell#*/}"
  done
  run offline_uniform_100_1024 offline --num-prompts $((N ? 256 : 32)) --random-range 100 1024
  run sweep_1k sweep --input-len 1024 --batch-sizes 1 8 32 128 256 --decode-steps 64
  # Speculative decoding's verification cost: k + 1 = 2..9 query tokens per sequence against 1.
  run verify_1k verify --input-len 1024 --batch-sizes 1 8 32 --query-lens 1 2 3 5 9 --decode-steps $((N ? 32 : 8))
  run serve_poisson serve --num-prompts $((N ? 500 : 50)) --input-len 200 --output-len 180 --request-rates 10 20 40 inf
}

NAMES=()
suite
for name in ${ONLY:-}; do
  if [[ " ${NAMES[*]} " != *" $name "* ]]; then
    echo "ONLY names an unknown step: $name (steps: ${NAMES[*]})" >&2
    exit 2
  fi
done
if [[ "${LIST:-0}" == 1 ]]; then
  MODE=plan suite
  exit 0
fi

# shellcheck source=benchmarks/ensure_shardline.sh
source "$ROOT/benchmarks/ensure_shardline.sh"

OUT=${1:-benchmarks/results/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  "$PYTHON" -c '
import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
  "$PYTHON" -c 'import triton; print("triton", triton.__version__)' 2>/dev/null || echo "triton missing"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
  git rev-parse HEAD 2>/dev/null | sed 's/^/commit /'
  echo "steps ${ONLY:-all} quick ${QUICK:-0} extra_args ${EXTRA_ARGS:-}"
} >> "$OUT/environment.txt"

MODE=run suite
echo "results in $OUT ($failures failed)"
exit $((failures > 0))
