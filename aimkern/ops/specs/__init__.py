"""The built-in op specs (``aimkern.ops.spec.OpSpec``), one module per op, registered on import."""
from . import attention, cross_entropy, patch_embed, pixel_loss  # noqa: F401  (each registers its spec)
