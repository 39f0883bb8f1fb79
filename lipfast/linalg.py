"""Spectral norms of dense matrices: estimates, certified brackets and warm-started power iteration.

Every function takes a batch of matrices ``W`` of shape ``(..., m, n)`` (any number of leading
batch dims; float32, float64, float16 or bfloat16) and works on each matrix independently.  Inputs
are never modified; non-contiguous inputs give the same results as contiguous copies.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from lipfast import _ext, _util, ops, reference

__all__ = ["spectral_norm", "spectral_norm_bounds", "spectral_norm_bounds_many", "power_iteration"]

#: Default cap on passes over W (each Lanczos or power step reads W once).
DEFAULT_MAX_ITERS = 1000
#: Default cap on Gram-iteration squarings for the certified upper bound.
DEFAULT_MAX_GRAM_STEPS = 16
#: spectral_norm_bounds certifies CPU matrices with min(m, n) at least this by one Cholesky test of
#: their Gram matrix (conv.dense_brackets); smaller ones by Gram iteration, whose fixed costs are lower.
DENSE_CERTIFICATE_MIN_DIM = 64
#: ... for at most about this many bytes of float64 matrices at a time.
_DENSE_CHUNK_BYTES = 64 << 20


def _check_matrices(fn: str, W: object, name: str = "W") -> None:
    if not isinstance(W, Tensor):
        raise TypeError(f"lipfast.{fn}: {name} must be a torch.Tensor, got {type(W).__name__}")
    if not W.is_floating_point():
        raise TypeError(
            f"lipfast.{fn}: {name} must be a floating-point tensor (float32, float64, float16 or bfloat16), "
            f"got {W.dtype}"
        )
    if W.dim() < 2:
        raise ValueError(f"lipfast.{fn}: {name} must have at least 2 dims (..., m, n), got shape {tuple(W.shape)}")
    if 0 in W.shape:
        raise ValueError(f"lipfast.{fn}: {name} must not have a zero-size dim, got shape {tuple(W.shape)}")


def _check_rtol(fn: str, rtol: object) -> float:
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not (math.isfinite(rtol) and rtol > 0):
        raise ValueError(f"lipfast.{fn}: rtol must be a positive finite number, got {rtol!r}")
    return float(rtol)


def _check_count(fn: str, name: str, value: object, default: int, minimum: int = 1) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"lipfast.{fn}: {name} must be an int >= {minimum} or None, got {value!r}")
    return value


def _check_finite(fn: str, W: Tensor, name: str = "W") -> None:
    # The compiled kernels run this check themselves, in the same pass that copies W.
    bad = reference.first_nonfinite_matrix(W)
    if bad is not None:
        batch = list(W.shape[:-2])
        where = ""
        if batch:
            index = ", ".join(str(int(i)) for i in _util.unravel(bad, W.shape[:-2]))
            where = f" in matrix {name}[{index}] (batch shape {batch})"
        raise ValueError(f"lipfast.{fn}: {name} has a NaN or Inf entry{where}")


def _with_singular_gradient(sigma: Tensor, W: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """sigma, carrying the gradient u vᵀ with respect to W (the fallback's autograd formula)."""
    if not W.requires_grad:
        return sigma
    bilinear = torch.einsum("...i,...ij,...j->...", u, W, v)  # uᵀ W v: its gradient is u vᵀ
    return sigma + (bilinear - bilinear.detach())


def spectral_norm(W: Tensor, *, rtol: float = 1e-5, max_iters: int | None = None) -> Tensor:
    """Largest singular value of each matrix: ``W (..., m, n) -> (...)``.

    Lanczos on WᵀW with full reorthogonalization (each step one pass over W), stopped when the
    residual bound says the relative error is at most ``rtol`` and the value has held for as many
    passes again (so that a start vector nearly orthogonal to the top singular vector cannot stop
    it at the second singular value).  Close top singular values, where
    power iteration crawls like (sigma_2/sigma_1)^(2k), cost Lanczos only about the square root of
    the steps.  Differentiable: d sigma / d W = u vᵀ (the top singular vectors).

    Args:
        W: matrices (..., m, n), float32/float64/float16/bfloat16 (half types accumulate in float32).
        rtol: relative accuracy to reach.
        max_iters: cap on passes over W (default 1000); if it stops the iteration before ``rtol``,
            a RuntimeWarning gives the accuracy reached.

    This is an estimate (a Rayleigh quotient ‖W v‖, never above sigma_max beyond rounding); use
    :func:`spectral_norm_bounds` for a certified bracket.
    """
    _check_matrices("spectral_norm", W)
    rtol = _check_rtol("spectral_norm", rtol)
    max_iters = _check_count("spectral_norm", "max_iters", max_iters, DEFAULT_MAX_ITERS)
    if _ext.use_kernel("dense_spectral_norm", W.device):
        sigma, _, _, rel_err = ops.dense_spectral_norm(W, None, max_iters, rtol)
    else:
        _check_finite("spectral_norm", W)
        with torch.no_grad():
            sigma, u, v, rel_err = reference.dense_spectral_norm(W, None, max_iters, rtol)
        sigma = _with_singular_gradient(sigma, W, u, v)
    if not torch.compiler.is_compiling():
        worst = float(rel_err.max())
        if not worst <= rtol:
            warnings.warn(
                f"lipfast.spectral_norm: stopped before reaching rtol={rtol:g} (max_iters={max_iters} passes); "
                f"relative accuracy reached: {worst:.3g}",
                RuntimeWarning,
                stacklevel=2,
            )
    return sigma


def spectral_norm_bounds(
    W: Tensor,
    *,
    rtol: float = 1e-3,
    max_iters: int | None = None,
    max_gram_steps: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Certified bracket ``lower <= sigma_max(W) <= upper`` for each matrix, each shaped like W.shape[:-2].

    ``lower`` is a Rayleigh quotient ‖W v‖/‖v‖ at a Lanczos vector, evaluated in float64 and
    decreased by a bound on its rounding error.  ``upper``, for float32 and float64 matrices on the
    CPU with min(m, n) >= 64: G = fl(AᵀA) in float64 (A = W on its taller side), a Lanczos
    estimate of lambda_max(G) to rtol / 1000, and one Cholesky test proving mu² I - G positive
    definite with the rounding of G and of the factorization bounded, at mu just above the estimate:
    a bracket about 1e-6 wide, whatever rtol (from 64 x 64 up, 2-5x faster than Gram iteration,
    which gets to about rtol).  Otherwise, and where that test fails: Gram iteration (G_{t+1} = G_tᵀ
    G_t, sigma_max <= ‖G_t‖_F^(1/2^t); Delattre et al., ICML 2023) in float64, with the rounding
    error of every product bounded and carried into the result, so rounding cannot push it below
    sigma_max; it stops when ``upper <= lower * (1 + rtol)`` or after ``max_gram_steps`` squarings
    (default 16; each costs one batched min(m, n)-sized matrix product).  Both ends are rounded
    outwards to W's dtype.  The bracket is valid either way, and a RuntimeWarning reports a gap
    wider than rtol.  For float16/bfloat16 the outward rounding of the result may widen the gap by
    up to two units in the last place.

    The bracket is not differentiable.
    """
    _check_matrices("spectral_norm_bounds", W)
    rtol = _check_rtol("spectral_norm_bounds", rtol)
    max_iters = _check_count("spectral_norm_bounds", "max_iters", max_iters, DEFAULT_MAX_ITERS)
    max_gram_steps = _check_count("spectral_norm_bounds", "max_gram_steps", max_gram_steps, DEFAULT_MAX_GRAM_STEPS)
    return _bracket(W.detach(), rtol, max_iters, max_gram_steps, dense=True)


def _bracket(W: Tensor, rtol: float, max_iters: int, max_gram_steps: int, *, dense: bool) -> tuple[Tensor, Tensor]:
    """spectral_norm_bounds on checked arguments; dense=False: Gram iteration only (for callers whose
    own conv.dense_brackets call just failed on W)."""
    bracket = _dense_certificate(W, rtol, max_iters) if dense else None
    if bracket is not None:
        lower, upper = bracket
    elif _ext.use_kernel("dense_spectral_norm_bounds", W.device):
        lower, upper = ops.dense_spectral_norm_bounds(W, rtol, max_iters, max_gram_steps)
    else:
        _check_finite("spectral_norm_bounds", W)
        lower, upper = reference.dense_spectral_norm_bounds(W, rtol, max_iters, max_gram_steps)
    if not torch.compiler.is_compiling() and W.dtype in (torch.float32, torch.float64):
        gap = float((upper.double() / lower.double().clamp_min(torch.finfo(torch.float64).tiny) - 1).max())
        widest = float((upper - lower).max())
        if widest > 0 and not gap <= rtol:
            warnings.warn(
                f"lipfast.spectral_norm_bounds: the bracket is valid but wider than rtol={rtol:g} "
                f"(upper/lower - 1 = {gap:.3g}); raise max_gram_steps or max_iters to tighten it",
                RuntimeWarning,
                stacklevel=3,
            )
    return lower, upper


def _gram_iteration_bounds(W: Tensor, rtol: float, max_iters: int = DEFAULT_MAX_ITERS,
                          max_gram_steps: int = DEFAULT_MAX_GRAM_STEPS) -> tuple[Tensor, Tensor]:
    """spectral_norm_bounds by Gram iteration alone, for W (a detached tensor of matrices) on which
    conv.dense_brackets has just failed; a RuntimeWarning reports a gap wider than rtol."""
    return _bracket(W, rtol, max_iters, max_gram_steps, dense=False)


def _dense_certificate(W: Tensor, rtol: float, max_iters: int) -> tuple[Tensor, Tensor] | None:
    """spectral_norm_bounds' (lower, upper) by conv.dense_brackets, or None where that does not apply
    (not float32/float64 CPU matrices at least DENSE_CERTIFICATE_MIN_DIM on each side, or under
    torch.compile) or fails (a NaN, a zero matrix, a Cholesky test that does not pass)."""
    if (W.device.type != "cpu" or W.dtype not in (torch.float32, torch.float64) or W.numel() == 0
            or min(W.shape[-2:]) < DENSE_CERTIFICATE_MIN_DIM or torch.compiler.is_compiling()):
        return None
    from lipfast import conv  # conv imports this module

    matrices = W.reshape(-1, *W.shape[-2:])
    # a few at a time: dense_brackets holds float64 copies, their Gram matrices and more (a batch of
    # 100,000 64 x 64 matrices at once would take over 10 GB)
    per = max(1, _DENSE_CHUNK_BYTES // (8 * W.shape[-2] * W.shape[-1]))
    brackets = []
    for chunk in matrices.split(per):
        part = conv.dense_brackets(list(chunk), rtol, max_iters)
        if part is None:
            return None
        brackets += part
    ends = torch.tensor(brackets, dtype=torch.float64)
    lower = reference.round_directed(ends[:, 0], W.dtype, up=False).reshape(W.shape[:-2])
    upper = reference.round_directed(ends[:, 1], W.dtype, up=True).reshape(W.shape[:-2])
    return lower, upper


def spectral_norm_bounds_many(
    Ws: Sequence[Tensor],
    *,
    rtol: float = 1e-3,
    max_gram_steps: int | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Certified brackets for many weight tensors of different shapes at once, e.g. every layer of a network.

    ``Ws`` is a sequence of tensors ``(..., m, n)`` (any shapes and floating dtypes, all on one
    device); returns one ``(lower, upper)`` pair per tensor, each shaped ``W.shape[:-2]`` in W's
    dtype, with ``lower <= sigma_max <= upper`` for every matrix, as :func:`spectral_norm_bounds`.

    Tensors of float32 or float64 CPU matrices at least 64 on each side get the Cholesky certificate
    of :func:`spectral_norm_bounds` (about 1e-6 wide; ResNet-50's 54 weights 0.9 -> 0.5 s).  The
    others, and every tensor on other devices, are bracketed by Gram iteration (certified as in
    :func:`spectral_norm_bounds`), those with the same ``min(m, n)`` squared together in one
    batched product per step, so a whole network costs a few dozen batched products and one
    device-to-host transfer per step, where one call per shape would pay each call's fixed costs
    again.  Their lower ends need no Lanczos: with ``G_t`` the Gram iterate after t squarings and
    ``j`` its largest diagonal entry, ``x = G_t (G_t e_j)`` is already 2^t power steps from
    ``e_j``, and ``‖W x‖/‖x‖`` is evaluated in float64 with its rounding margin.
    The iteration stops once every bracket has ``upper <= lower * (1 + rtol)`` or after
    ``max_gram_steps`` squarings (default 16); a RuntimeWarning reports a wider gap.
    """
    fn = "spectral_norm_bounds_many"
    if isinstance(Ws, Tensor) or not isinstance(Ws, Sequence):
        raise TypeError(f"lipfast.{fn}: Ws must be a list or tuple of tensors, got {type(Ws).__name__}")
    Ws = list(Ws)
    for i, W in enumerate(Ws):
        _check_matrices(fn, W, f"Ws[{i}]")
        if W.device != Ws[0].device:
            raise ValueError(f"lipfast.{fn}: every tensor must be on one device; Ws[0] is on {Ws[0].device}, "
                             f"Ws[{i}] on {W.device}")
    rtol = _check_rtol(fn, rtol)
    max_gram_steps = _check_count(fn, "max_gram_steps", max_gram_steps, DEFAULT_MAX_GRAM_STEPS)
    if not Ws:
        return []
    return _bracket_many([W.detach() for W in Ws], rtol, max_gram_steps, dense=True)


def _bracket_many(Ws: list[Tensor], rtol: float, max_gram_steps: int, *, dense: bool) -> list[tuple[Tensor, Tensor]]:
    """spectral_norm_bounds_many on checked, detached arguments: the Cholesky certificate for each
    tensor it applies to (dense=True), Gram iteration for the rest, batched."""
    fn = "spectral_norm_bounds_many"
    result: list[tuple[Tensor, Tensor] | None] = [
        _dense_certificate(W, rtol, DEFAULT_MAX_ITERS) if dense else None for W in Ws]
    rest = [i for i, bracket in enumerate(result) if bracket is None]
    if not rest:
        return result
    Wr = [Ws[i] for i in rest]
    kernel = _ext.use_kernel("dense_spectral_norm_bounds_many", Wr[0].device)
    if not kernel or len(rest) < len(Ws):  # the op checks too, but names tensors by their place in Wr
        for i in rest:
            _check_finite(fn, Ws[i], f"Ws[{i}]")
    if kernel:
        lowers, uppers, widest = ops.dense_spectral_norm_bounds_many(Wr, rtol, max_gram_steps)
    else:
        lowers, uppers, widest = reference.dense_spectral_norm_bounds_many(Wr, rtol, max_gram_steps)
    if not torch.compiler.is_compiling() and not float(widest) <= rtol:
        warnings.warn(
            f"lipfast.{fn}: the brackets are valid but the widest is wider than rtol={rtol:g} "
            f"(upper/lower - 1 = {float(widest):.3g}); raise max_gram_steps to tighten it",
            RuntimeWarning,
            stacklevel=3,
        )
    # The op returns one flat buffer per dtype (in order of first appearance), each holding every
    # matrix's brackets rounded to that dtype: each tensor's brackets are views of its slice.
    dtypes = list(dict.fromkeys(W.dtype for W in Wr))
    start = 0
    for i, W in zip(rest, Wr):
        d, count = dtypes.index(W.dtype), W.shape[:-2].numel()
        result[i] = (lowers[d][start:start + count].view(W.shape[:-2]), uppers[d][start:start + count].view(W.shape[:-2]))
        start += count
    return result


def _gram_iteration_bounds_many(Ws: Sequence[Tensor], rtol: float,
                                max_gram_steps: int = DEFAULT_MAX_GRAM_STEPS) -> list[tuple[Tensor, Tensor]]:
    """spectral_norm_bounds_many by Gram iteration alone, for matrices on which conv.dense_brackets
    has just failed (one device; errors name Ws[i] as the public function does)."""
    Ws = list(Ws)
    for i, W in enumerate(Ws):
        _check_matrices("spectral_norm_bounds_many", W, f"Ws[{i}]")
    return _bracket_many([W.detach() for W in Ws], rtol, max_gram_steps, dense=False)


def power_iteration(W: Tensor, v: Tensor, iters: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """``iters`` steps of power iteration on WᵀW from the iterate ``v (..., n)``; returns (sigma, u, v).

    For training loops that refine an estimate a little at every step: pass the returned ``v``
    back in next time.  Each step is one fused pass over W.  ``sigma = ‖W v‖`` for the new unit
    ``v`` (a lower bound on sigma_max, up to rounding) and ``u = W v / sigma``.  sigma is
    differentiable with d sigma / d W = u vᵀ (v treated as a constant).  Entries of W are not
    checked for NaN/Inf here (that would be a second read of W on every step).
    """
    _check_matrices("power_iteration", W)
    if not isinstance(v, Tensor):
        raise TypeError(f"lipfast.power_iteration: v must be a torch.Tensor, got {type(v).__name__}")
    if not v.is_floating_point():
        raise TypeError(f"lipfast.power_iteration: v must be a floating-point tensor, got {v.dtype}")
    if v.device != W.device:
        raise ValueError(f"lipfast.power_iteration: v must be on W's device ({W.device}), got {v.device}")
    expected = (*W.shape[:-2], W.shape[-1])
    if tuple(v.shape) != expected:
        raise ValueError(f"lipfast.power_iteration: v must have shape W.shape[:-2] + (n,) = {expected}, got {tuple(v.shape)}")
    iters = _check_count("power_iteration", "iters", iters, 1, minimum=0)
    v = v.detach()
    if _ext.use_kernel("dense_power_iteration", W.device):
        return ops.dense_power_iteration(W, v, iters)
    with torch.no_grad():
        sigma, u, v_new = reference.dense_power_iteration(W, v, iters)
    return _with_singular_gradient(sigma, W, u, v_new), u, v_new
