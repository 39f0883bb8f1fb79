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

from lipfast import reference

__all__ = ["certified_radius"]

_UNIT = 2.0**-53
_TINY = 2.0**-1074


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
    Returns (N,) in logits' dtype (float32 for half types), never differentiable.  Computed in
    float64 with every rounding on the way bounded and rounded down to that dtype, so a radius is
    never above the formula's exact value for the logits and the weight as given.
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
    if last_layer_weight is not None:
        W = last_layer_weight.detach()
        if W.dim() != 2 or W.shape[0] != C:
            raise ValueError(f"lipfast.{fn}: last_layer_weight must be (C, F) with C = {C} classes, got {tuple(W.shape)}")
    out_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    z = logits.detach().double()
    labels = labels.to(z.device)
    rows = torch.arange(N, device=z.device)
    gaps = z[rows, labels][:, None] - z  # (N, C): z_y - z_j, each within u of the exact difference
    gaps[rows, labels] = math.inf  # j = y is no competitor
    if last_layer_weight is None:
        margin = gaps.min(dim=1).values.clamp_min(0)
        # the subtraction, sqrt(2), the product and the quotient round by at most 4 u in all: (1 - 8 u)
        radius = torch.where(margin > 0, margin / (math.sqrt(2) * L) * (1 - 8 * _UNIT), 0.0)  # 0/0 for L = 0
        return reference.round_directed(radius, out_dtype, up=False)
    # ‖w_y - w_j‖ from the differences (cdist's default for many rows expands ‖a‖^2 + ‖b‖^2 - 2 a.b,
    # which cancels for near rows: two rows 0.0155 apart, of norm 160, came out 0 in float32), of W
    # times 2^-e (largest |entry| in [0.5, 1): squares of entries beyond 2^±511 under- or overflow),
    # and pushed up by their rounding: the differences, squares, sum and root round by at most
    # gamma(F + 3) relative, squares that underflow by F 2^-1075 in all, the scaling by 2^-1075 an
    # entry.  A distance too small would be a radius too large.
    W = W.to(z.device).double()
    F = W.shape[1]
    largest = float(W.abs().max()) if W.numel() else 0.0
    e = math.frexp(largest)[1] if largest > 0 else 0
    Ws = reference._times_pow2_by(W, -e)
    distance = torch.cdist(Ws, Ws, compute_mode="donot_use_mm_for_euclid_dist")[labels]  # (N, C)
    distance = distance * (1 + reference._gamma(F + 4)) + math.sqrt(F * _TINY) + math.sqrt(F) * _TINY
    # equal rows (a float subtraction is 0 only for equal operands): distance 0 exactly, radius inf
    same = torch.cdist(W, W, p=math.inf)[labels] == 0
    distance = torch.where(same, 0.0, distance)
    if L == math.inf:  # no finite bound: nothing is certified (and inf * 0 is no distance)
        return torch.zeros(N, dtype=out_dtype, device=z.device)
    scaled = gaps.clamp_min(0) / (L * distance) * (1 - 8 * _UNIT)  # in units of 2^-e
    scaled = torch.where(gaps > 0, scaled, 0.0)  # 0/0 when the gap is 0
    per_pair = (reference._times_pow2_by(scaled, -e) - _TINY).clamp_min(0)
    per_pair = torch.where(torch.isfinite(scaled) & torch.isinf(per_pair), torch.finfo(torch.float64).max, per_pair)
    per_pair[rows, labels] = math.inf
    return reference.round_directed(per_pair.min(dim=1).values, out_dtype, up=False)
