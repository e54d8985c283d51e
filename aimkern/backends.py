"""The values of every op's ``backend=`` argument, in one place (standard library only, so the command lines'
``--help`` can offer them without importing torch).

``"auto"`` lets aimkern pick the path (``aimkern.dispatch``), ``"triton"`` always runs the Triton kernel (on
CPU tensors through Triton's interpreter), ``"reference"`` always runs plain PyTorch.
"""
BACKENDS = ("auto", "triton", "reference")
