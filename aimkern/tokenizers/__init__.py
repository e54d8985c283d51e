"""Open patch tokenizers for the token objective (``CausalViT`` with ``head="token"``).

``KMeansPatchTokenizer``: nearest-centroid ids of per-patch-normalized pixels, fit by k-means.
"""
from .kmeans import KMeansPatchTokenizer

__all__ = ["KMeansPatchTokenizer"]
