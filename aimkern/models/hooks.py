"""Where CausalViT's format methods live: ``from_checkpoint``, ``save_checkpoint``, ``from_timm``, ``to_timm``.

Reading and writing other formats (``aimkern.checkpoints``, ``aimkern.integrations.timm_convert``) builds on
the model: those modules import it, and the model must not import them, not even inside a function (that
would close an import circle; tests/test_package_structure.py). So the model's methods are thin forwarders
that ask here, by name, for the function that does the work. The composition root, ``aimkern/__init__.py``,
which Python runs before any module of the package, says which module provides each name; that module is
imported on the first call. Nothing here imports an aimkern module by name.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Tuple

_PROVIDERS: Dict[str, Tuple[str, str]] = {}  # method name -> (absolute module, function), from aimkern/__init__


def provide(name: str, module: str, function: str) -> None:
    """Declare that CausalViT's ``name`` is ``module.function`` (``module`` absolute, imported on first use)."""
    _PROVIDERS[name] = (module, function)


def provided(name: str) -> Callable:
    """The function behind CausalViT's ``name``; a LookupError when no module provides it."""
    if name not in _PROVIDERS:
        raise LookupError(f"CausalViT.{name}: no module provides it (aimkern/__init__.py declares the providers "
                          f"of {sorted(_PROVIDERS) or 'none'})")
    module, function = _PROVIDERS[name]
    return getattr(importlib.import_module(module), function)
