"""The Triton paths, below everything that chooses among them.

One module per op (``attention``, ``attention_varlen``, ``cross_entropy``, ``patch_embed``, ``pixel_loss``,
``pixel_loss_varlen``): its params dataclass,
its launchers, its custom ops with their fakes and autograd formula, and one ``<op>_triton(tensors...,
params)`` entry that takes checked inputs. Beside them the launch layer (``_launch``: ``LaunchPolicy`` /
``launch_policy``, autotuning, the attention backward path), the typed custom-op helper (``_custom_op``) and
the cost counter (``_counting``). Nothing here imports ``aimkern.functional``, ``aimkern.specs`` or
``aimkern.dispatch``: the public ops (``aimkern.attention``, ...) live in ``aimkern.functional``, which
checks the inputs and picks a path (through ``aimkern.dispatch``) before it calls an entry here.

``aimkern.ops.attention`` etc. are the modules. The public ops this package once exported,
``aimkern.ops.attention_qkvpacked``, ``linear_cross_entropy`` and ``next_patch_pixel_loss``, are
``aimkern.<name>`` now; the old names still work for one release, with a DeprecationWarning, through
``aimkern.hooks`` (an import from ops up to the layer above it would close a circle: tests/test_layering.py,
tests/test_package_structure.py).
"""
import warnings

from .. import hooks
from ._launch import LaunchPolicy, current_policy, launch_policy
from .attention import AttentionParams
from .attention_varlen import VarlenAttentionParams
from .cross_entropy import CrossEntropyParams
from .patch_embed import PatchEmbedParams
from .pixel_loss import PixelLossParams
from .pixel_loss_varlen import PixelLossVarlenParams

__all__ = [
    "AttentionParams",
    "CrossEntropyParams",
    "LaunchPolicy",
    "PatchEmbedParams",
    "PixelLossParams",
    "PixelLossVarlenParams",
    "VarlenAttentionParams",
    "current_policy",
    "launch_policy",
]



def __getattr__(name: str):
    """The public packed op of issue 29's API (``aimkern.ops.attention_varlen_qkvpacked``, the same function as
    ``aimkern.attention_varlen_qkvpacked``) and the deprecated aliases of the public ops that moved to
    aimkern.functional (PEP 562)."""
    for kind in ("", "deprecated."):
        try:
            function = hooks.provided(f"aimkern.ops.{kind}{name}")
            break
        except LookupError:
            continue
    else:
        raise AttributeError(f"module 'aimkern.ops' has no attribute {name!r}")
    if kind:
        warnings.warn(f"aimkern.ops.{name} is deprecated and goes in the next release: use aimkern.{name} (the "
                      "public ops live in aimkern.functional; aimkern.ops holds the Triton paths)",
                      DeprecationWarning, stacklevel=2)
    return function
