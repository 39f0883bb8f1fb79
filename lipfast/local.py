"""Local Lipschitz constants at data points, and how far the certified bound sits above them.

For a differentiable model f, ‖J_f(x)‖₂ at any input x is a lower bound on f's global L2 Lipschitz
constant; the largest over real inputs, beside :func:`lipfast.lipschitz_bound`'s certified upper bound,
brackets the truth for the whole network.  The model runs in eval mode (every module's mode is
restored); examples must not interact (BatchNorm in eval mode is fine), since the Jacobians of a
batch are taken through one batched forward pass.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn


__all__ = ["GapReport", "lipschitz_gap", "local_lipschitz"]

#: Up to this many outputs per example, the Jacobian is formed whole (one batched vector-Jacobian
#: product per output) and its norm is exact; beyond it, power iteration on JᵀJ.
_FULL_JACOBIAN_OUTPUTS = 64


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _jacobian_norms(model: nn.Module, x: Tensor, rtol: float, iters: int) -> tuple[Tensor, bool]:
    """‖J_f(x_i)‖₂ for each example of the chunk x, and whether every one reached rtol."""
    x = x.detach()
    out, vjp_fn = torch.func.vjp(model, x)
    outputs = out[0].numel()
    if outputs <= _FULL_JACOBIAN_OUTPUTS:
        # the whole Jacobian, one output at a time over the batch: J (B, outputs, inputs), then exact norms
        # one backward per output over the whole chunk (torch.func.vmap over the outputs was 6x slower
        # on ResNet-18 on a CPU)
        basis = torch.eye(outputs, dtype=out.dtype, device=out.device)
        rows = [vjp_fn(basis[k].expand(out.shape[0], outputs).reshape(out.shape))[0] for k in range(outputs)]
        J = torch.stack(rows).reshape(outputs, x.shape[0], -1).transpose(0, 1).double()
        return torch.linalg.matrix_norm(J, ord=2), True
    # power iteration on JᵀJ: v <- Jᵀ J v / ‖.‖, sigma = ‖J v‖, per example
    generator = torch.Generator().manual_seed(0x6C6970)
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    v = v / v.reshape(x.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (x.dim() - 1))
    sigma = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for _ in range(iters):
        _, Jv = torch.func.jvp(model, (x,), (v,))
        new = Jv.reshape(x.shape[0], -1).double().norm(dim=1)
        w = vjp_fn(Jv)[0]
        norms = w.reshape(x.shape[0], -1).norm(dim=1)
        v = w / torch.where(norms > 0, norms, 1).reshape(-1, *[1] * (x.dim() - 1))
        # a step that moves every estimate by at most rtol / 16 (relative): power iteration's error is a
        # multiple of its last step, and 16 covers a ratio sigma_2 / sigma_1 up to about 0.94
        done = bool(((new - sigma).abs() <= rtol / 16 * new).all())
        sigma = new
        if done:
            return sigma, True
    return sigma, False


def local_lipschitz(model: nn.Module, inputs: Tensor, *, rtol: float = 1e-4, iters: int = 500,
                    chunk_size: int = 32, progress: bool = False) -> Tensor:
    """‖J_f(x)‖₂ for each example x of ``inputs (N, ...)``: (N,) float64 on inputs' device.

    Models with at most 64 outputs per example (classifiers) get the exact norm: the Jacobian is formed
    with one batched vector-Jacobian product per output and its largest singular value computed
    directly.  Wider outputs use power iteration on JᵀJ (jvp then vjp through torch.func), batched over
    the examples, stopped when every estimate moved by at most ``rtol`` (relative) in one step, or after
    ``iters`` steps (a RuntimeWarning then).  Examples are processed ``chunk_size`` at a time, which
    bounds memory.  Each value is a lower bound on the model's global Lipschitz constant (up to the
    estimate's accuracy).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lipfast.local_lipschitz: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError("lipfast.local_lipschitz: inputs must be a non-empty floating-point tensor (N, ...)")
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not (math.isfinite(rtol) and rtol > 0):
        raise ValueError(f"lipfast.local_lipschitz: rtol must be a positive finite number, got {rtol!r}")
    for label, value in (("iters", iters), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"lipfast.local_lipschitz: {label} must be an int >= 1, got {value!r}")
    modes = _modes(model)
    model.eval()
    chunks = inputs.split(chunk_size)
    if progress:
        try:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc="lipfast: local Lipschitz", unit="chunk", leave=False)
        except ImportError:
            pass
    results, converged = [], True
    try:
        for chunk in chunks:
            norms, ok = _jacobian_norms(model, chunk, rtol, iters)
            results.append(norms.detach())
            converged &= ok
    finally:
        for m, mode in modes:
            m.training = mode
    if not converged:
        warnings.warn(f"lipfast.local_lipschitz: power iteration stopped after iters={iters} steps before rtol={rtol:g}",
                      RuntimeWarning, stacklevel=2)
    return torch.cat(results)


@dataclass
class GapReport:
    """How loose a certified bound is: ``lower`` (the largest local Lipschitz constant found at the
    inputs, attained) <= the true constant <= ``upper`` (certified); ``ratio = upper / lower``."""

    lower: float
    upper: float
    ratio: float
    argmax: int  #: the input at which ``lower`` was attained
    inputs: int
    note: str = ""

    def __str__(self) -> str:
        text = (f"attained lower bound {self.lower:.6g} (input {self.argmax} of {self.inputs}), certified upper bound "
                f"{self.upper:.6g}: the certificate is within a factor {self.ratio:.4f} of the truth")
        return text + (f" ({self.note})" if self.note else "")


def lipschitz_gap(model: nn.Module, inputs: Tensor, *, report=None, rtol: float = 1e-4, progress: bool = False) -> GapReport:
    """The attained lower bound max_x ‖J_f(x)‖₂ over ``inputs`` (:func:`local_lipschitz`) against the
    certified upper bound of :func:`lipfast.lipschitz_bound` (computed for ``inputs.shape[1:]`` unless
    ``report`` is given).  Both bound the same constant, so upper / lower says how far the certificate
    can be from the truth."""
    from lipfast.network import lipschitz_bound

    local = local_lipschitz(model, inputs, rtol=rtol, progress=progress)
    if report is None:
        report = lipschitz_bound(model, tuple(inputs.shape[1:]), progress=progress)
    index = int(local.argmax())
    lower = float(local[index])
    upper = float(report.upper)
    ratio = upper / lower if lower > 0 else math.inf
    note = ""
    if lower > upper * (1 + 10 * rtol):
        note = "the attained value exceeds the certified bound: the bound does not hold for this model"
    return GapReport(lower, upper, ratio, index, int(inputs.shape[0]), note)
