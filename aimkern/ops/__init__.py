"""The Triton paths, below everything that chooses among them.

One module per op (``attention``, ``cross_entropy``, ``patch_embed``, ``pixel_loss``): its params dataclass,
its launchers, its custom ops with their fakes and autograd formula, and one ``<op>_triton(tensors...,
params)`` entry that takes checked inputs. Beside them the launch layer (``_launch``: ``LaunchPolicy`` /
``launch_policy``, autotuning, the attention backward path), the typed custom-op helper (``_custom_op``) and
the cost counter (``_counting``). Nothing here imports ``aimkern.functional``, ``aimkern.specs`` or
``aimkern.dispatch``: the public ops (``aimkern.attention``, ...) live in ``aimkern.functional``, which
checks the inputs and picks a path (through ``aimkern.dispatch``) before it calls an entry here.

``aimkern.ops.attention_qkvpacked``, the packed public op's old address, still works (a deprecated alias of
``aimkern.attention_qkvpacked``, resolved on first use); ``aimkern.ops.attention`` etc. are the modules.
"""
from ._launch import LaunchPolicy, current_policy, launch_policy
from .attention import AttentionParams
from .cross_entropy import CrossEntropyParams
from .patch_embed import PatchEmbedParams
from .pixel_loss import PixelLossParams

__all__ = [
    "AttentionParams",
    "CrossEntropyParams",
    "LaunchPolicy",
    "PatchEmbedParams",
    "PixelLossParams",
    "current_policy",
    "launch_policy",
]

# Public ops that this package exported before they moved up to aimkern.functional. The one name that does
# not clash with a module of this package keeps working for a release, with a DeprecationWarning; the
# forwarder is the only reference from aimkern.ops up to the layer above it (tests/test_layering.py).
_MOVED_TO_FUNCTIONAL = ("attention_qkvpacked",)


def __getattr__(name: str):
    if name not in _MOVED_TO_FUNCTIONAL:
        raise AttributeError(f"module 'aimkern.ops' has no attribute {name!r}")
    import warnings

    from .. import functional

    warnings.warn(f"aimkern.ops.{name} moved to aimkern.{name} (aimkern.functional); the old name goes in the "
                  "next release", DeprecationWarning, stacklevel=2)
    return getattr(functional, name)
