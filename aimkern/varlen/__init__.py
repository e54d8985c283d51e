"""Packed variable-length sequences (native resolution): the pieces below the ops layer.

``_launch_varlen``: the Triton launchers of varlen attention (tensors + ``VarlenAttentionParams``);
``cost``: the work those kernels issue for a list of sequence lengths, against the visible-pairs minimum;
``gate``: their compile-gate problems (meta-tensor launches), for the op spec.
The references live in ``aimkern.reference`` (attention_varlen, pixel_loss_varlen); the image packing in
``aimkern.data.packing``.
"""
