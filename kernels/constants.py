"""Numeric constants of the kernels, defined once: every kernel and launcher reads them from here.

The softmax kernels (attention, cross-entropy) work in the log2 domain, exp2 being the GPU's native
exponential: exp(x) = exp2(x * LOG2E), and a base-2 logsumexp goes back to natural log with * LN2.
Each is a ``tl.constexpr`` because a global read inside ``@triton.jit`` code must be one (a plain float
fails to compile; the interpreter would not notice); host code reads the float as ``LOG2E.value``.
"""
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e) = 1 / ln(2)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2) = 1 / log2(e)
