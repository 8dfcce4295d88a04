#!/usr/bin/env bash
# The GPU check in one command (issue 11): correctness at real shapes, then every performance target
# of one engine on the Llama-3-8B shape (random bf16 weights), then transformers for the ratio, then
# a Qwen3-30B-A3B-shaped mixture of experts at batch 1 and 64 (issue 17), then a summary table, all
# in one process that ends by itself within BUDGET_S seconds. The steps, their caps and estimates
# are in shardline/check/plan.py and docs/performance.md.
#
#   benchmarks/gpu_check.sh OUT_DIR [extra flags for `shardline bench check`]
#
# env:  BUDGET_S  the whole command's budget in seconds, install and imports included (default 540)
#       MODEL     config directory (default benchmarks/configs/llama-3-8b)
#       MOE_MODEL config directory of the mixture-of-experts steps (default benchmarks/configs/qwen3-30b-a3b;
#                 none: skip them)
#       PYTHON    interpreter (default: python, else python3)
#       LINEAR_CHOICE_TABLE  a linear_choice.json of an earlier run on this kind of machine (default
#                 out/linear_choice.json, which each run leaves there): shapes it holds are not timed
#                 again at start-up; it is used only when GPU, torch, Triton and the kernels match
#
# Writes, as it goes: OUT_DIR/results.jsonl (one JSON line per step), OUT_DIR/progress.log
# (timestamped lines, also printed), OUT_DIR/errors.log (tracebacks), and last OUT_DIR/summary.txt,
# printed at the end. If the process has to be killed (a step stuck inside one call past the
# budget), the summary is printed from results.jsonl all the same.
#
# CPU smoke run (a few minutes at most on 2 cores; the kernels run in Triton's interpreter):
#   MODEL=benchmarks/configs/tiny-llama MOE_MODEL=benchmarks/configs/tiny-qwen3-moe \
#     benchmarks/gpu_check.sh /tmp/check --device cpu --kv-cache-memory-gb 0.25
set -uo pipefail

START=$(date +%s.%N)
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [flags for shardline bench check]}
shift
cd "$(dirname "$0")/.."
ROOT=$PWD
if [[ -z "${PYTHON:-}" ]]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
BUDGET_S=${BUDGET_S:-540}
[[ $BUDGET_S =~ ^[0-9]+$ ]] || { echo "BUDGET_S: whole seconds, got '$BUDGET_S'" >&2; exit 2; }
MODEL=${MODEL:-benchmarks/configs/llama-3-8b}
MOE_MODEL=${MOE_MODEL:-benchmarks/configs/qwen3-30b-a3b}

# shellcheck source=benchmarks/ensure_shardline.sh
source "$ROOT/benchmarks/ensure_shardline.sh"
mkdir -p "$OUT"

# The check stops its own steps and ends within the budget; `timeout` is the last resort for a
# step blocked inside one call (a hung kernel), 20 s after the budget.
elapsed=$(awk -v s="$START" -v n="$(date +%s.%N)" 'BEGIN { printf "%d", n - s }')
timeout --kill-after=5 $((BUDGET_S - elapsed + 20)) \
  "$PYTHON" -m shardline bench check --model "$MODEL" --moe-model "$MOE_MODEL" --load-format dummy --out-dir "$OUT" \
  --budget-s "$BUDGET_S" --started-at "$START" --linear-choice-table "${LINEAR_CHOICE_TABLE:-out/linear_choice.json}" "$@"
rc=$?
if [[ -s "$OUT/linear_choice.json" ]]; then  # out/ is git-ignored: kept on a warm machine between calls
  mkdir -p out && cp "$OUT/linear_choice.json" out/linear_choice.json
fi
if [[ ! -s "$OUT/summary.txt" ]]; then
  echo "the check ended without its summary (exit $rc); the summary of what it wrote:"
  "$PYTHON" -m shardline.check.summary "$OUT"
fi
exit $rc
