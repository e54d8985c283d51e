"""aimkern.kernels: only @triton.jit code and its launch configs, one file per kernel family.

Import these modules only after deciding on Triton's interpreter (TRITON_INTERPRET=1 on CPU-only
machines), since @triton.jit reads it when a kernel is defined.
"""
