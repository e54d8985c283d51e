"""Probes on frozen features: ``attentive`` (AIM's), ``linear`` and ``knn`` (DINO's weighted k-NN)."""
from .attentive import AttentiveConfig, AttentivePoolingHead, train_attentive
from .knn import KnnConfig, knn_probe
from .linear import LinearConfig, train_linear

PROBES = ("attentive", "linear", "knn")

__all__ = ["AttentiveConfig", "AttentivePoolingHead", "KnnConfig", "LinearConfig", "PROBES", "knn_probe",
           "train_attentive", "train_linear"]
