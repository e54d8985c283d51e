#!/usr/bin/env bash
# The prepared GPU check (H100/H200): install, GPU-only tests, benchmarks, and a short summary table last.
#
#   bash benchmarks/gpu_check.sh                 # default stages, about 7-8 minutes on an H200
#   bash benchmarks/gpu_check.sh pretrain        # the end-to-end step benchmark (about 3-4 minutes)
#   bash benchmarks/gpu_check.sh fulltests       # the whole test suite compiled on the GPU (4-6 minutes)
#   bash benchmarks/gpu_check.sh tune            # python -m aimkern.tune for vit-b16 and aim-600m (~2-3 min)
#
# Dependencies the GPU machine lacks (it has no network) travel as wheels: put them in wheels/ (git-ignored)
# on the CPU machine, e.g. `pip download --no-deps -d wheels simplejpeg==1.9.0 'webdataset<1'` (simplejpeg
# is compiled: pick the wheel for the GPU machine's Python with --python-version / --platform), and name
# wheels/ in the device call's carry; they are installed first.
#
# Stages: report gputests attn patch_embed pixel_loss cross_entropy (the default), pretrain, fulltests, tune.
# "report" is the compile gate first (benchmarks/kernel_report.py on this machine's Triton, sm_90a, the
# configs this run meets): registers, spills, shared memory and wgmma of what the benchmarks then time.
# Each stage runs under its own time limit, so a call never outlives the sum of its stages' limits
# (default stages: 510 s). Outputs (JSON, PNG, logs) go to $OUT when set (the device tool brings them
# back), else benchmarks/out/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
export AIMKERN_BENCH_OUT="$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(report gputests attn patch_embed pixel_loss cross_entropy)
start=$(date +%s)
status=()

step() {  # step NAME LIMIT_S CMD...: run one stage under a time limit, keep its log, record rc and seconds
  local name=$1 limit=$2
  shift 2
  local t0
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s, $(date +%T))"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$OUT/$name.log"
  status+=("$(printf '%-15s rc=%-3s %4ss' "$name" "$rc" "$(( $(date +%s) - t0 ))")")
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
if compgen -G "wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-deps wheels/*.whl > "$OUT/wheels.log" 2>&1 || cat "$OUT/wheels.log"
fi
python3 -m pip install -q --no-deps --no-build-isolation . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

for s in "${stages[@]}"; do
  case "$s" in
    # bf16, ViT/AIM-size shapes and CUDA-only checks of every op (fixed attention configs: no autotune
    # compile storm inside tests).
    report) step report 60 python3 benchmarks/kernel_report.py --arch sm_90a --subset gpu-run --quiet \
              --jobs "$(nproc)" --json "$OUT/kernel_report.jsonl" ;;
    gputests) AIMKERN_AUTOTUNE=0 step gputests 90 python3 -m pytest -q -x tests -m "not gate" -k "gpu or cuda" ;;
    attn) step attn 180 python3 benchmarks/attn_throughput.py --quick ;;
    patch_embed) step patch_embed 50 python3 benchmarks/patch_embed.py ;;
    pixel_loss) step pixel_loss 40 python3 benchmarks/pixel_loss.py ;;
    cross_entropy) step cross_entropy 90 python3 benchmarks/cross_entropy.py --quick ;;
    pretrain) step pretrain 240 python3 benchmarks/pretrain_throughput.py --quick ;;
    fulltests) AIMKERN_AUTOTUNE=0 step fulltests 420 python3 -m pytest -q tests -m "not gate" --durations=15 ;;
    # A fresh cache folder: every op call of each step is verified and timed on this GPU.
    tune) AIMKERN_CACHE_DIR="$OUT/dispatch-cache" step tune 240 bash -c "python3 -m aimkern.tune --preset vit-b16 \
            --batch-size 256 --markdown --json $OUT/tune-vit-b16.json && python3 -m aimkern.tune --preset aim-600m \
            --batch-size 64 --markdown --json $OUT/tune-aim-600m.json" ;;
    *) echo "unknown stage '$s' (report gputests attn patch_embed pixel_loss cross_entropy pretrain fulltests tune)"; exit 2 ;;
  esac
done

echo
echo "=== summary ($(( $(date +%s) - start ))s in all; logs and JSON in $OUT)"
printf '%s\n' "${status[@]}"
