"""lipfast: fast, certified Lipschitz constants of neural-network layers for PyTorch.

>>> import torch, lipfast
>>> W = torch.randn(8, 256, 128)
>>> sigma = lipfast.spectral_norm(W)                # (8,): largest singular value of each matrix
>>> lower, upper = lipfast.spectral_norm_bounds(W)  # certified: lower <= sigma_max <= upper
"""
from lipfast._ext import backend, set_backend
from lipfast.certify import certified_radius
from lipfast.continuity import (
    KnowledgeContinuity,
    LayerVolatility,
    knowledge_continuity,
    knowledge_continuity_penalty,
    volatility,
)
from lipfast.conv import conv_spectral_norm, conv_spectral_norm_bounds, operator_norm, operator_norm_bounds
from lipfast.linalg import power_iteration, spectral_norm, spectral_norm_bounds, spectral_norm_bounds_many
from lipfast.local import GapReport, lipschitz_gap, local_lipschitz
from lipfast.network import LipschitzReport, certified_accuracy, lipschitz_bound, register_lipschitz
from lipfast import distributed  # lipfast.distributed: sharded weights on torch.distributed
from lipfast import nn  # lipfast.nn: spectral normalization for training loops

__version__ = "0.1.0"

__all__ = [
    "GapReport",
    "KnowledgeContinuity",
    "LayerVolatility",
    "LipschitzReport",
    "backend",
    "certified_accuracy",
    "certified_radius",
    "conv_spectral_norm",
    "conv_spectral_norm_bounds",
    "distributed",
    "knowledge_continuity",
    "knowledge_continuity_penalty",
    "lipschitz_bound",
    "lipschitz_gap",
    "local_lipschitz",
    "nn",
    "operator_norm",
    "operator_norm_bounds",
    "power_iteration",
    "register_lipschitz",
    "set_backend",
    "spectral_norm",
    "spectral_norm_bounds",
    "spectral_norm_bounds_many",
    "volatility",
]
