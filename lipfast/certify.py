"""Certified robustness from a Lipschitz bound.

If every logit difference z_y - z_j of a network is a function of the input whose L2 Lipschitz
constant is at most K_yj, no perturbation of L2 norm below (z_y - z_j) / K_yj can make j overtake
y.  With L an L2 -> L2 Lipschitz bound of the whole network, K_yj <= sqrt(2) L (the map z -> z_y - z_j
has norm sqrt(2) on R^C), which gives Tsuzuku et al.'s (2018) radius; with L a bound of the network
before its last linear layer W, K_yj <= L ‖w_y - w_j‖, usually much smaller.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["certified_radius"]


def _check_lipschitz(fn: str, lipschitz) -> float:
    value = float(lipschitz.detach()) if isinstance(lipschitz, Tensor) and lipschitz.numel() == 1 else lipschitz
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"lipfast.{fn}: lipschitz must be a number >= 0 (inf allowed), got {lipschitz!r}")
    return float(value)


def certified_radius(
    logits: Tensor, labels: Tensor, lipschitz: float | Tensor, *, last_layer_weight: Tensor | None = None
) -> Tensor:
    """The L2 radius around each input within which the predicted class provably stays ``labels``.

    ``logits`` (N, C) are the network's outputs, ``labels`` (N,) the classes to certify.  Without
    ``last_layer_weight``, ``lipschitz`` bounds the whole network and the radius is
    ``max(z_y - max_{j != y} z_j, 0) / (sqrt(2) L)``.  With ``last_layer_weight`` W (C, F), the
    logits' last linear layer, ``lipschitz`` bounds the network up to W's input, and the radius is
    ``min_{j != y} max(z_y - z_j, 0) / (L ‖w_y - w_j‖)`` (infinite for a pair whose rows are equal
    and whose logits differ in y's favour).  A misclassified example (or a tie) has radius 0; with
    ``lipschitz`` 0 (a constant network) a correctly classified one has an infinite radius.
    Returns (N,) in logits' dtype (float32 for half types), never differentiable.
    """
    fn = "certified_radius"
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point() or logits.shape[1] < 2:
        raise ValueError(f"lipfast.{fn}: logits must be a floating-point (N, C) tensor with C >= 2, got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != logits.shape[0] \
            or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"lipfast.{fn}: labels must be an integer (N,) tensor with N = {logits.shape[0]}")
    N, C = logits.shape
    if N and (int(labels.min()) < 0 or int(labels.max()) >= C):
        raise ValueError(f"lipfast.{fn}: labels must lie in [0, {C}), got values in [{int(labels.min())}, {int(labels.max())}]")
    L = _check_lipschitz(fn, lipschitz)
    z = logits.detach()
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    labels = labels.to(z.device)
    rows = torch.arange(N, device=z.device)
    gaps = z[rows, labels][:, None] - z  # (N, C): z_y - z_j
    gaps[rows, labels] = math.inf  # j = y is no competitor
    if last_layer_weight is None:
        margin = gaps.min(dim=1).values.clamp_min(0)
        return torch.where(margin > 0, margin / (math.sqrt(2) * L), torch.zeros_like(margin))  # 0/0 for L = 0
    W = last_layer_weight.detach().to(z.device)
    if W.dim() != 2 or W.shape[0] != C:
        raise ValueError(f"lipfast.{fn}: last_layer_weight must be (C, F) with C = {C} classes, got {tuple(W.shape)}")
    # ‖w_y - w_j‖ from the differences, in float64: cdist's default for many rows expands
    # ‖a‖^2 + ‖b‖^2 - 2 a.b, which cancels for near rows (two rows 0.0155 apart, of norm 160, came
    # out 0 in float32), and a distance too small is a radius too large
    W = W.double()
    distance = torch.cdist(W, W, compute_mode="donot_use_mm_for_euclid_dist")[labels]  # (N, C)
    per_pair = gaps.double().clamp_min(0) / (L * distance)
    per_pair = torch.where(gaps > 0, per_pair, torch.zeros_like(per_pair))  # 0/0 when the gap is 0
    per_pair[rows, labels] = math.inf
    return per_pair.min(dim=1).values.to(z.dtype)
