"""Packed variable-length sequences (native resolution): the work count of varlen attention.

``cost``: the work the varlen attention kernels (launched by ``aimkern.ops.attention_varlen``) issue for a list
of sequence lengths, against the visible-pairs minimum; the cost report (benchmarks/kernel_cost.py) and its
tests read it. The op itself is ``aimkern.attention_varlen`` (aimkern/functional.py, spec in
aimkern/specs/attention_varlen.py); the references live in ``aimkern.reference`` (attention_varlen,
pixel_loss_varlen); the image packing in ``aimkern.data.packing``.
"""
