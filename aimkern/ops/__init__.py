"""The Triton paths, below everything that chooses among them.

One module per op (``attention``, ``attention_varlen``, ``cross_entropy``, ``patch_embed``, ``pixel_loss``,
``pixel_loss_varlen``): its params dataclass,
its launchers, its custom ops with their fakes and autograd formula, and one ``<op>_triton(tensors...,
params)`` entry that takes checked inputs. Beside them the launch layer (``_launch``: ``LaunchPolicy`` /
``launch_policy``, autotuning, the attention backward path), the typed custom-op helper (``_custom_op``) and
the cost counter (``_counting``). Nothing here imports ``aimkern.functional``, ``aimkern.specs`` or
``aimkern.dispatch``: the public ops (``aimkern.attention``, ...) live in ``aimkern.functional``, which
checks the inputs and picks a path (through ``aimkern.dispatch``) before it calls an entry here.

``aimkern.ops.attention`` etc. are the modules; the packed public op, once ``aimkern.ops.attention_qkvpacked``,
is ``aimkern.attention_qkvpacked`` (a forwarder here would be an import from ops up to the layer above it,
a circle: tests/test_layering.py, tests/test_package_structure.py).
"""
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

