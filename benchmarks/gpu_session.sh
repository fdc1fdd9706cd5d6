#!/usr/bin/env bash
# Every GPU figure of the sensitivity pass in ONE device call: about 6 minutes expected,
# at most 530 s of steps (each has its own time limit):
#   1. the Llama-3.1-8B-shaped workload (random bf16, LoRA r16 on 7 projections, residual scope,
#      128 synthetic examples), variants BUDGET/RECOMPUTE/LEAN of our pass: the defaults (planned budget,
#      recompute and lean activations auto), every decoder layer recomputed, neither lean nor
#      recomputed, and fixed budgets 4096 (with and without lean) and 2048; the paper's code path;
#      each against a float32 reference; the FLOP floor at a measured bf16 matmul rate; the top
#      CUDA operators of the default pass; four held-out evaluations at the planned budget;
#   2. refine's defaults never run out of memory: a 1B model on a simulated 24 GB card and the 8B
#      model on an 80 GB card (set_per_process_memory_fraction).
# Needs torch (CUDA), transformers and peft; never imports vLLM. Writes logs, JSON and a markdown
# snippet for benchmarks/RESULTS.md to $OUT (default ./gpu-session-out).
#   run from the repository root:   bash benchmarks/gpu_session.sh
#   check every step on a CPU:      DRY_RUN=1 bash benchmarks/gpu_session.sh   (tiny shapes, ~3 min)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-session-out}
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TOKENIZERS_PARALLELISM=false
BENCH=benchmarks/sensitivity_pass.py
EXTRA=()
if [ "${DRY_RUN:-0}" = 1 ]; then
    EXTRA=(--dry-run --device cpu)
    # prove that nothing imports vLLM (the GPU image has none)
    SHIM=$(mktemp -d)
    mkdir -p "$SHIM/vllm" && echo 'raise ImportError("vllm must not be imported here")' >"$SHIM/vllm/__init__.py"
    export PYTHONPATH=$SHIM:$PYTHONPATH
fi
status=0
step() {  # step NAME TIMEOUT_S ARGS...: run one benchmark invocation, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
    timeout "$limit" "$PY" "$BENCH" "$@" "${EXTRA[@]}" --json "$OUT/$name.json" --markdown "$OUT/$name.md" \
        2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name exit $rc"
    [ "$rc" = 0 ] || status=1
}

{
    echo "=== versions"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'gpu', \
torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} 2>&1 | tee "$OUT/versions.txt"

step llama8b 330 --llama8b-shape --simulate-card 80 --profile \
    --variants auto/auto/auto,auto/all/auto,auto/off/off,4096/off/off,4096/off/auto,2048/off/auto
step card-1b-24gb 90 --card-check 1b-24gb
step card-8b-80gb 110 --card-check 8b-80gb

{
    echo "## Sensitivity pass on a GPU (benchmarks/gpu_session.sh, $(date -u +%Y-%m-%d))"
    echo
    echo '```'
    cat "$OUT/versions.txt"
    echo '```'
    echo
    echo "### Llama-3.1-8B shape: ours vs the paper's code path"
    echo
    cat "$OUT/llama8b.md" 2>/dev/null || echo "(no result: see llama8b.log)"
    echo
    echo "### Defaults on smaller cards (simulated with set_per_process_memory_fraction)"
    echo
    cat "$OUT/card-1b-24gb.md" "$OUT/card-8b-80gb.md" 2>/dev/null || echo "(no result: see the logs)"
} >"$OUT/RESULTS-gpu.md"
echo "=== wrote $OUT/RESULTS-gpu.md (exit $status)"
exit $status
