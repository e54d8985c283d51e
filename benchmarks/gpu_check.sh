#!/usr/bin/env bash
# One call on a lent GPU (H100/H200): install, run the GPU-only tests (bf16, ViT-size shapes, compiled
# kernels), then every benchmark, and print a short summary table last. Budget: well under 10 minutes.
#
#   bash benchmarks/gpu_check.sh            # on the device machine, from the repo root
#
# Outputs (JSON, PNG, logs) go to $OUT when set (the device tool brings them back), else benchmarks/out/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
export AIMKERN_BENCH_OUT="$OUT"
start=$(date +%s)
status=()

step() {  # step NAME TIMEOUT_S CMD...: run one stage with a time limit, log it, record its exit status
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  status+=("$(printf '%-22s rc=%-3s %4ss' "$name" "$rc" "$(( $(date +%s) - t0 ))")")
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
python3 -m pip install -q --no-deps --no-build-isolation . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# GPU tests: the whole suite runs compiled kernels on CUDA (bf16 and large shapes included).
step tests 240 python3 -m pytest -x -q tests --durations=15

step attn_throughput 150 python3 benchmarks/attn_throughput.py --quick
step patch_embed 40 python3 benchmarks/patch_embed.py
step pixel_loss 40 python3 benchmarks/pixel_loss.py
step cross_entropy 60 python3 benchmarks/cross_entropy.py --quick
step pretrain_throughput 150 python3 benchmarks/pretrain_throughput.py --quick

echo
echo "=== summary ($(( $(date +%s) - start ))s in all)"
printf '%s\n' "${status[@]}"
