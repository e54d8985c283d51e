#!/usr/bin/env bash
# The compile gate (benchmarks/kernel_report.py) on Triton 3.6, the GPU machine's version, for sm_90a over
# the problems the GPU run meets (--subset gpu-run: bf16 / fp16 at the benchmark shapes).
#
#   bash benchmarks/compile_gate_triton36.sh        # from the project's activated venv (torch, aimkern)
#
# A small venv beside the project's holds only triton==3.6.0; a .pth file then adds the project's venv
# (torch 2.14, the editable aimkern) behind it, so `import triton` finds 3.6 while torch and aimkern come
# from the project. The report only uses torch to drive the launchers on meta tensors: what it checks is
# Triton 3.6's compile of every kernel and config.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TRITON36_VENV:-.venv-triton36}"
TRITON_VERSION="${TRITON36_VERSION:-3.6.0}"
main_site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
[ -x "$VENV/bin/python" ] || python -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --no-deps "triton==$TRITON_VERSION"
gate_site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$main_site')" > "$gate_site/aimkern-project-venv.pth"
"$VENV/bin/python" -c "import triton, torch; assert triton.__version__ == '$TRITON_VERSION', triton.__version__"
"$VENV/bin/python" benchmarks/kernel_report.py --arch sm_90a --subset gpu-run --quiet "$@"
