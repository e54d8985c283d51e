"""Names that a lower layer answers with a function of a layer above it, looked up here by name.

Two lower layers offer a name whose work is done by a layer that imports them, and so must not be imported by
them, not even inside a function (that would close an import circle; tests/test_package_structure.py):

- ``CausalViT``'s format methods (``from_checkpoint``, ``save_checkpoint``, ``from_timm``, ``to_timm``):
  reading and writing other formats (``aimkern.checkpoints``, ``aimkern.integrations.timm_convert``) builds on
  the model;
- the public ops that ``aimkern.ops`` exported before they moved up to ``aimkern.functional``
  (``aimkern.ops.attention_qkvpacked`` etc., deprecated aliases for one release).

The composition root, ``aimkern/__init__.py``, which Python runs before any module of the package, says which
module provides each name; that module is imported on the first call. Nothing here imports an aimkern module
by a written name.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Tuple

_PROVIDERS: Dict[str, Tuple[str, str]] = {}  # qualified name -> (absolute module, attribute), from aimkern/__init__


def provide(name: str, module: str, attribute: str) -> None:
    """Declare that ``name`` (qualified by its asker, e.g. ``CausalViT.from_timm``) is ``module.attribute``
    (``module`` absolute, imported on first use)."""
    _PROVIDERS[name] = (module, attribute)


def provided(name: str) -> Callable:
    """The function behind ``name``; a LookupError when no module provides it."""
    if name not in _PROVIDERS:
        raise LookupError(f"{name}: no module provides it (aimkern/__init__.py declares the providers of "
                          f"{sorted(_PROVIDERS) or 'none'})")
    module, attribute = _PROVIDERS[name]
    return getattr(importlib.import_module(module), attribute)
