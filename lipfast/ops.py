"""Thin wrappers over ``torch.ops.lipfast.*``, with their fake kernels and autograd formulas.

The fakes (shape and dtype propagation) let the ops run under ``torch.compile`` and
``torch.library.opcheck``; the autograd formulas make sigma differentiable.  Everything here is
registered only when the compiled library loaded.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lipfast import _ext


def dense_spectral_norm(W: Tensor, v0: Tensor | None, max_iters: int, rtol: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``torch.ops.lipfast.dense_spectral_norm``: (sigma, u, v, rel_err); see csrc/lipfast.cpp."""
    return torch.ops.lipfast.dense_spectral_norm.default(W, v0, max_iters, rtol)


def dense_spectral_norm_bounds(W: Tensor, rtol: float, max_iters: int, max_gram_steps: int) -> tuple[Tensor, Tensor]:
    """``torch.ops.lipfast.dense_spectral_norm_bounds``: certified (lower, upper)."""
    return torch.ops.lipfast.dense_spectral_norm_bounds.default(W, rtol, max_iters, max_gram_steps)


def dense_spectral_norm_bounds_many(
    Ws: list[Tensor], rtol: float, max_gram_steps: int
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """``torch.ops.lipfast.dense_spectral_norm_bounds_many``: certified (lowers, uppers, widest gap); see csrc/lipfast.cpp."""
    return torch.ops.lipfast.dense_spectral_norm_bounds_many.default(Ws, rtol, max_gram_steps)


def dense_power_iteration(W: Tensor, v: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.lipfast.dense_power_iteration``: (sigma, u, v) after ``iters`` fused steps."""
    return torch.ops.lipfast.dense_power_iteration.default(W, v, iters)


def spectral_norm_step(W: Tensor, u: Tensor, v: Tensor, iters: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.lipfast.spectral_norm_step``: torch's spectral-norm power method, fused; see csrc/lipfast.cpp."""
    return torch.ops.lipfast.spectral_norm_step.default(W, u, v, iters, eps)


def conv_spectral_norm(
    weight: Tensor, v0: Tensor | None, input_size: list[int], stride: list[int], pad_lo: list[int],
    pad_hi: list[int], dilation: list[int], groups: int, padding_mode: str, output_size: list[int],
    max_iters: int, rtol: float, upper: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``torch.ops.lipfast.conv_spectral_norm``: (sigma, u, v, rel_err) of a conv operator; see csrc/conv.h."""
    return torch.ops.lipfast.conv_spectral_norm.default(
        weight, v0, input_size, stride, pad_lo, pad_hi, dilation, groups, padding_mode, output_size, max_iters, rtol,
        upper,
    )


def hermitian_cholesky_test(re: Tensor, im: Tensor, shift: Tensor) -> Tensor:
    """``torch.ops.lipfast.hermitian_cholesky_test``: whether each Cholesky factorization completes; see csrc/lipfast.cpp."""
    return torch.ops.lipfast.hermitian_cholesky_test.default(re, im, shift)


def hermitian_power_gain(re: Tensor, im: Tensor, start: Tensor, steps: int) -> Tensor:
    """``torch.ops.lipfast.hermitian_power_gain``: ‖H x‖ after ``steps`` power steps; see csrc/lipfast.cpp."""
    return torch.ops.lipfast.hermitian_power_gain.default(re, im, start, steps)


def hermitian_gram(S: Tensor, p: int, negate: bool = False) -> tuple[Tensor, Tensor]:
    """``torch.ops.lipfast.hermitian_gram``: (re, im) of KᴴK (or -KᴴK) for K = S[:, :p] + i S[:, p:]; see csrc/lipfast.cpp."""
    return torch.ops.lipfast.hermitian_gram.default(S, p, negate)


def bjorck_step(Q: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``torch.ops.lipfast.bjorck_step``: (out, G) with G = QᵀQ and out = (1 + beta) Q - beta Q G; see csrc/lipfast.cpp."""
    return torch.ops.lipfast.bjorck_step.default(Q, beta)


def pairwise_volatility(hidden: Tensor, losses: Tensor, delta: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.lipfast.pairwise_volatility``: (score, per_sample, counts); see csrc/lipfast.cpp."""
    return torch.ops.lipfast.pairwise_volatility.default(hidden, losses, delta)


def _sigma_backward(ctx, grad_sigma: Tensor, *unused: Tensor):
    # sigma = uᵀ W v with unit singular vectors u, v: d sigma / d W = u vᵀ.  The vectors are treated
    # as constants (they are iterates, as in torch's spectral norm), so no gradient flows to v0 / v.
    u, v = ctx.saved_tensors
    grad_W = grad_sigma[..., None, None] * u[..., :, None] * v[..., None, :]
    return (grad_W,) + (None,) * (ctx.num_inputs - 1)


def _save_singular_vectors(num_inputs: int):
    def setup_context(ctx, inputs, output) -> None:
        ctx.num_inputs = num_inputs
        ctx.save_for_backward(output[1], output[2])
        ctx.mark_non_differentiable(*output[1:])

    return setup_context


if _ext.HAS_EXT:

    @torch.library.register_fake("lipfast::dense_spectral_norm")
    def _dense_spectral_norm_fake(W, v0, max_iters, rtol):
        batch, (m, n) = W.shape[:-2], W.shape[-2:]
        return (
            W.new_empty(batch),
            W.new_empty((*batch, m)),
            W.new_empty((*batch, n)),
            W.new_empty(batch, dtype=torch.float64),
        )

    @torch.library.register_fake("lipfast::dense_spectral_norm_bounds")
    def _dense_spectral_norm_bounds_fake(W, rtol, max_iters, max_gram_steps):
        batch = W.shape[:-2]
        return W.new_empty(batch), W.new_empty(batch)

    @torch.library.register_fake("lipfast::dense_spectral_norm_bounds_many")
    def _dense_spectral_norm_bounds_many_fake(Ws, rtol, max_gram_steps):
        total = sum(W.shape[:-2].numel() for W in Ws)
        dtypes = list(dict.fromkeys(W.dtype for W in Ws))
        lower = [Ws[0].new_empty(total, dtype=dtype) for dtype in dtypes]
        upper = [Ws[0].new_empty(total, dtype=dtype) for dtype in dtypes]
        return lower, upper, torch.empty((), dtype=torch.float64, device="cpu")

    @torch.library.register_fake("lipfast::dense_power_iteration")
    def _dense_power_iteration_fake(W, v, iters):
        batch, (m, n) = W.shape[:-2], W.shape[-2:]
        return W.new_empty(batch), W.new_empty((*batch, m)), W.new_empty((*batch, n))

    @torch.library.register_fake("lipfast::spectral_norm_step")
    def _spectral_norm_step_fake(W, u, v, iters, eps):
        batch, (m, n) = W.shape[:-2], W.shape[-2:]
        return W.new_empty(batch), W.new_empty((*batch, m)), W.new_empty((*batch, n))

    torch.library.register_autograd(
        "lipfast::spectral_norm_step", _sigma_backward, setup_context=_save_singular_vectors(5)
    )
    torch.library.register_autograd(
        "lipfast::dense_spectral_norm", _sigma_backward, setup_context=_save_singular_vectors(4)
    )
    torch.library.register_autograd(
        "lipfast::dense_power_iteration", _sigma_backward, setup_context=_save_singular_vectors(3)
    )

    @torch.library.register_fake("lipfast::conv_spectral_norm")
    def _conv_spectral_norm_fake(
        weight, v0, input_size, stride, pad_lo, pad_hi, dilation, groups, padding_mode, output_size, max_iters, rtol,
        upper=None,
    ):
        return (
            weight.new_empty(()),
            weight.new_empty((weight.shape[0], *output_size)),
            weight.new_empty((weight.shape[1] * groups, *input_size)),
            weight.new_empty((), dtype=torch.float64),
        )

    def _conv_sigma_backward(ctx, grad_sigma: Tensor, *unused: Tensor):
        # sigma = uᵀ A(weight) v, linear in weight: its gradient is the convolution's weight gradient
        # for output gradient u at input v (u, v treated as constants, as for the dense ops).
        from lipfast import reference

        u, v, weight = ctx.saved_tensors
        grad = reference.conv_weight_gradient(weight, u, v, *ctx.geometry)
        return (grad * grad_sigma,) + (None,) * 12

    def _conv_setup_context(ctx, inputs, output) -> None:
        weight, _, _, stride, pad_lo, pad_hi, dilation, groups, padding_mode = inputs[:9]
        ctx.geometry = (stride, pad_lo, pad_hi, dilation, groups, padding_mode)
        ctx.save_for_backward(output[1], output[2], weight)
        ctx.mark_non_differentiable(*output[1:])

    torch.library.register_autograd(
        "lipfast::conv_spectral_norm", _conv_sigma_backward, setup_context=_conv_setup_context
    )

    @torch.library.register_fake("lipfast::hermitian_cholesky_test")
    def _hermitian_cholesky_test_fake(re, im, shift):
        return re.new_empty(re.shape[:1], dtype=torch.bool)

    @torch.library.register_fake("lipfast::hermitian_power_gain")
    def _hermitian_power_gain_fake(re, im, start, steps):
        return re.new_empty(re.shape[:1])

    @torch.library.register_fake("lipfast::hermitian_gram")
    def _hermitian_gram_fake(S, p, negate=False):
        shape = (S.shape[0], S.shape[-1], S.shape[-1])
        return S.new_empty(shape), S.new_empty(shape)

    @torch.library.register_fake("lipfast::bjorck_step")
    def _bjorck_step_fake(Q, beta):
        return torch.empty_like(Q, memory_format=torch.contiguous_format), Q.new_empty((Q.shape[-1], Q.shape[-1]))

    def _bjorck_setup_context(ctx, inputs, output) -> None:
        ctx.beta = inputs[1]
        ctx.save_for_backward(inputs[0], output[1])

    def _bjorck_backward(ctx, grad_out: Tensor | None, grad_gram: Tensor | None):
        # out = (1 + b) Q - b Q G with G = QᵀQ, so for the cotangent Y of out:
        #   dL/dQ = (1 + b) Y - b (Y G + Q (QᵀY + YᵀQ)),
        # and a cotangent Ḡ of G adds Q (Ḡ + Ḡᵀ).  Written in torch ops, so it is differentiable again.
        Q, G = ctx.saved_tensors
        b = ctx.beta
        grad = None
        if grad_out is not None:
            T = Q.mT @ grad_out
            grad = torch.addmm(grad_out, grad_out, G, beta=1 + b, alpha=-b)
            grad = torch.addmm(grad, Q, T + T.mT, alpha=-b)
        if grad_gram is not None:
            extra = Q @ (grad_gram + grad_gram.mT)
            grad = extra if grad is None else grad + extra
        return grad, None

    torch.library.register_autograd("lipfast::bjorck_step", _bjorck_backward, setup_context=_bjorck_setup_context)

    @torch.library.register_fake("lipfast::pairwise_volatility")
    def _pairwise_volatility_fake(hidden, losses, delta):
        f64 = torch.float64
        return losses.new_empty((), dtype=f64), losses.new_empty(hidden.shape[:1], dtype=f64), losses.new_empty(3, dtype=torch.int64)
