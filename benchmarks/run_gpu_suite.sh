#!/usr/bin/env bash
# The GPU benchmark suite of docs/performance.md in one command: every mode of `shardline bench`
# on the Llama-3-8B shape with random bf16 weights, each with --roofline --json, into a results
# folder (one JSON per run, stderr logs beside them, and the machine's versions).
#
#   benchmarks/run_gpu_suite.sh [results_dir]        (env: PYTHON, MODEL, SKIP_TESTS=1, QUICK=1)
#
# Needs one CUDA GPU, torch and Triton; no Ray, no tokenizer, no weights (the model is a config).
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-benchmarks/configs/llama-3-8b}
OUT=${1:-benchmarks/results/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
COMMON=(--model "$MODEL" --load-format dummy --roofline --json)
failures=0

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("gpu", torch.cuda.get_device_name(0))'
  "$PYTHON" -c 'import triton; print("triton", triton.__version__)' 2>/dev/null || echo "triton missing"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
  git rev-parse HEAD 2>/dev/null | sed 's/^/commit /'
} > "$OUT/environment.txt"

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  # Correctness first, at real shapes on the GPU: the kernels and the graph/fused paths.
  "$PYTHON" -m pytest -q tests/test_kernels_attention.py tests/test_kernels_elementwise.py tests/test_kernels_matvec.py \
    tests/test_fast_path.py > "$OUT/gpu_tests.txt" 2>&1 || { echo "GPU tests failed: see $OUT/gpu_tests.txt"; failures=$((failures + 1)); }
fi

run() {  # run NAME MODE ARGS...: one benchmark into $OUT/NAME.json
  local name=$1; shift
  echo "== $name: shardline bench $*"
  local t0=$SECONDS
  if "$PYTHON" -m shardline bench "$@" "${COMMON[@]}" > "$OUT/$name.json" 2> "$OUT/$name.log"; then
    echo "   ok ($((SECONDS - t0)) s)"
  else
    echo "   FAILED ($((SECONDS - t0)) s): see $OUT/$name.log"; failures=$((failures + 1))
  fi
}

N=1; [[ "${QUICK:-0}" == 1 ]] && N=0  # QUICK=1: smaller workloads, to check the suite runs

# Targets (docs/performance.md): batch-1 decode, 500 x 200/180 at once, 10x transformers at
# batch 128, 75 % shared prefix vs cache off, TTFT of a 2048-token prompt.
run latency_b1_128_512 latency --input-len 128 --output-len $((N ? 512 : 64)) --iters 3
run offline_500x200_180 offline --num-prompts $((N ? 500 : 50)) --input-len 200 --output-len 180 --max-num-seqs 256
run offline_b128_vs_hf offline --num-prompts 128 --input-len 128 --output-len $((N ? 256 : 32)) --max-num-seqs 128 \
  --compare-hf --hf-max-batch 128
run prefix_2048_128 prefix --num-prompts $((N ? 64 : 16)) --input-len 2048 --output-len 128 --shared-fractions 0 0.25 0.5 0.75
# 8191, not 8192: the prompt and its one output token must fit max_position_embeddings (8192).
run prefill_ttft prefill --prompt-lens 512 2048 8191 --iters 5

# The rest of the issue's modes.
run offline_grid offline --num-prompts $((N ? 256 : 32)) --grid 128/128,128/2048,2048/128,2048/2048
run offline_uniform_100_1024 offline --num-prompts $((N ? 256 : 32)) --random-range 100 1024
run sweep_1k sweep --input-len 1024 --batch-sizes 1 8 32 128 256 --decode-steps 64
run serve_poisson serve --num-prompts $((N ? 500 : 50)) --input-len 200 --output-len 180 --request-rates 10 20 40 inf

echo "results in $OUT ($failures failed)"
exit $((failures > 0))
