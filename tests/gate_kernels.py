"""Two tiny kernels for tests/test_kernel_report.py, compiled in a clean subprocess (no interpreter)."""
import triton
import triton.language as tl

SCALE = 0.5  # a plain Python float: Triton's interpreter reads it, the compiler refuses it
SCALE_OK = tl.constexpr(0.5)


@triton.jit
def scale_plain_global(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * SCALE, mask=offs < n)


@triton.jit
def scale_constexpr_global(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * SCALE_OK, mask=offs < n)
