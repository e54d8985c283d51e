"""The run-time spec of every public op (``OpSpec``, aimkern/specs/opspec.py), one module per op.

``aimkern.functional`` runs a call through its op's spec (check, autocast, path, call), ``aimkern.dispatch``
chooses among the spec's candidates. The specs import the Triton paths (``aimkern.ops``) and the references,
never the layers above them.
"""
from . import attention, attention_varlen, cross_entropy, patch_embed, pixel_loss, pixel_loss_varlen  # noqa: F401  (each registers its spec)
from .opspec import SPECS, Candidate, OpSpec, Problem, SupportRule, Tolerance, describe, dtype_name, outputs

__all__ = ["Candidate", "OpSpec", "Problem", "SupportRule", "Tolerance", "all_specs", "describe", "dtype_name",
           "get_spec", "outputs"]


def get_spec(op: str) -> OpSpec:
    """The registered spec of ``op``."""
    if op not in SPECS:
        raise ValueError(f"unknown op {op!r}; the ops with specs are {sorted(SPECS)}")
    return SPECS[op]


def all_specs() -> list:
    return list(SPECS.values())
