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

from lipfast import _util
from lipfast.linalg import _check_rtol


__all__ = ["GapReport", "lipschitz_gap", "local_lipschitz"]

#: Default examples per batched pass: on a CPU, and on other devices (GPUs).
_CPU_CHUNK, _DEVICE_CHUNK = 32, 256
#: Up to this many outputs per example, the Jacobian is formed whole (one batched vector-Jacobian
#: product per output) and its norm is exact; beyond it, power iteration on JᵀJ.
_FULL_JACOBIAN_OUTPUTS = 64


def _jacobian_norms(model: nn.Module, x: Tensor, rtol: float, iters: int) -> tuple[Tensor, bool]:
    """‖J_f(x_i)‖₂ for each example of the chunk x, and whether every one reached rtol."""
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        out = model(x.clone())  # a copy: a model may write into its input (an in-place first activation)
    outputs = out[0].numel()
    if outputs <= _FULL_JACOBIAN_OUTPUTS:
        # the whole Jacobian, one output at a time over the batch: J (B, outputs, inputs), then exact norms
        # one backward per output over the whole chunk (torch.func.vmap over the outputs was 6x slower
        # on ResNet-18 on a CPU), by torch.autograd: torch.func's vjp imports torch._dynamo on its
        # first backward, 1.2 s here, which the `lipfast bound` command would pay every time
        basis = torch.eye(outputs, dtype=out.dtype, device=out.device)
        rows = [torch.autograd.grad(out, x, basis[k].expand(out.shape[0], outputs).reshape(out.shape),
                                    retain_graph=k < outputs - 1)[0] for k in range(outputs)]
        J = torch.stack(rows).reshape(outputs, x.shape[0], -1).transpose(0, 1).double()
        # sigma_max(J)^2 = lambda_max(J Jᵀ), the small (outputs x outputs) Gram matrix, in float64:
        # its rounding moves lambda_max by at most gamma(inputs) ‖J‖_F^2 (Weyl), far below rtol, and a
        # batch of symmetric eigenvalue problems of that size is much cheaper than batched SVDs.
        gram = J @ J.mT
        return torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt(), True
    # power iteration on JᵀJ: v <- Jᵀ J v / ‖.‖, sigma = ‖J v‖, per example (Jᵀ from the forward above)
    generator = torch.Generator().manual_seed(0x6C6970)
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    v = v / v.reshape(x.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (x.dim() - 1))
    sigma = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    forward_mode = True
    for _ in range(iters):
        if forward_mode:
            try:
                _, Jv = torch.func.jvp(model, (x.detach().clone(),), (v,))  # a copy, as above
            except NotImplementedError:  # an operation with no forward derivative (CUDA's fused LSTM cell)
                forward_mode = False
        if not forward_mode:
            Jv = _jacobian_vector_by_vjp(out, x, v)
        new = Jv.reshape(x.shape[0], -1).double().norm(dim=1)
        (w,) = torch.autograd.grad(out, x, Jv, retain_graph=True)
        norms = w.reshape(x.shape[0], -1).norm(dim=1)
        v = w / torch.where(norms > 0, norms, 1).reshape(-1, *[1] * (x.dim() - 1))
        # a step that moves every estimate by at most rtol / 16 (relative): power iteration's error is a
        # multiple of its last step, and 16 covers a ratio sigma_2 / sigma_1 up to about 0.94
        done = bool(((new - sigma).abs() <= rtol / 16 * new).all())
        sigma = new
        if done:
            return sigma, True
    return sigma, False


def _jacobian_vector_by_vjp(out: Tensor, x: Tensor, v: Tensor) -> Tensor:
    """J v at x from the graph of ``out = f(x)``, by reverse mode alone: u ↦ Jᵀ u is linear in u, so
    J v is the gradient in u of <Jᵀ u, v> (the double-vjp form; for models with an operation that has
    no forward derivative, at the cost of differentiating the backward pass)."""
    u = torch.zeros_like(out, requires_grad=True)
    (vjp,) = torch.autograd.grad(out, x, u, create_graph=True, retain_graph=True)
    (jv,) = torch.autograd.grad(vjp, u, v)
    return jv


def local_lipschitz(model: nn.Module, inputs: Tensor, *, rtol: float = 1e-4, iters: int = 500,
                    chunk_size: int | None = None, progress: bool = False) -> Tensor:
    """‖J_f(x)‖₂ for each example x of ``inputs (N, ...)``: (N,) float64 on inputs' device.

    Models with at most 64 outputs per example (classifiers) get the exact norm: the Jacobian is formed
    with one batched vector-Jacobian product per output and its largest singular value computed
    directly.  Wider outputs use power iteration on JᵀJ (J v by torch.func.jvp, or by two vector-Jacobian
    products where an operation has no forward derivative; then Jᵀ by autograd), batched over the
    examples, stopped when every estimate moved by at most ``rtol`` (relative) in one step, or after
    ``iters`` steps (a RuntimeWarning then).  Examples are processed ``chunk_size`` at a time, which
    bounds memory (default: 32 on a CPU, where larger batches no longer fit the caches and gain
    nothing, and 256 on other devices, where small batches leave a GPU idle).  Each value is a lower
    bound on the model's global Lipschitz constant (up to the estimate's accuracy).  A program made
    by torch.export (or its ``.module()``, whose guards fix the batch size) runs as its translation
    into torch functions, as :func:`lipfast.lipschitz_bound` reads it.
    """
    from lipfast import _export

    model = _export.runnable(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"lipfast.local_lipschitz: model must be an nn.Module or a torch.export.ExportedProgram, "
                        f"got {type(model).__name__}")
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError("lipfast.local_lipschitz: inputs must be a non-empty floating-point tensor (N, ...)")
    rtol = _check_rtol("local_lipschitz", rtol)
    if chunk_size is None:
        chunk_size = _CPU_CHUNK if inputs.device.type == "cpu" else _DEVICE_CHUNK
    for label, value in (("iters", iters), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"lipfast.local_lipschitz: {label} must be an int >= 1, got {value!r}")
    chunks = inputs.split(chunk_size)
    if progress:
        chunks = _util.progress(chunks, "lipfast: local Lipschitz", "chunk")
    results, converged = [], True
    # no TF32: the norms are accurate to rtol
    with _util.eval_mode(model), _util.full_float32(), _util.differentiable_in_eval(model):
        for chunk in chunks:
            norms, ok = _jacobian_norms(model, chunk, rtol, iters)
            results.append(norms.detach())
            converged &= ok
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


def _refine(model: nn.Module, x: Tensor, steps: int, step_size: float) -> tuple[float, int]:
    """Normalized gradient ascent on x ↦ ‖J_f(x)‖₂ from one example x: the best value seen, and at
    which step (0: the start)."""

    def norm_at(z: Tensor) -> Tensor:
        J = torch.func.jacrev(lambda y: model(y[None])[0])(z)
        outputs = J.numel() // z.numel()
        return torch.linalg.matrix_norm(J.reshape(outputs, -1).double(), ord=2)

    value_and_grad = torch.func.grad_and_value(norm_at)
    best, best_step = -math.inf, 0
    z = x.detach().clone()
    for step in range(steps + 1):
        with torch.no_grad():  # no graph to the parameters (torch.func's gradient in z still forms)
            grad, value = value_and_grad(z)
        if float(value) > best:
            best, best_step = float(value), step
        size = grad.norm()
        if step == steps or not float(size) > 0:  # the last value, or a flat point (piecewise-linear nets)
            break
        z = z + step_size * grad.to(z.dtype) / size.to(z.dtype)
    return best, best_step


def lipschitz_gap(model: nn.Module, inputs: Tensor, *, report=None, rtol: float = 1e-4, refine_steps: int = 0,
                  step_size: float = 0.01, progress: bool = False) -> GapReport:
    """The attained lower bound max_x ‖J_f(x)‖₂ over ``inputs`` (:func:`local_lipschitz`) against the
    certified upper bound of :func:`lipfast.lipschitz_bound` (computed for ``inputs.shape[1:]`` unless
    ``report`` is given).  Both bound the same constant, so upper / lower says how far the certificate
    can be from the truth.

    ``refine_steps > 0`` then climbs ‖J_f(x)‖₂ from the best input by that many normalized gradient
    steps of length ``step_size`` (in input units; the points reached need not be data: any x gives a
    lower bound), through ``torch.func.jacrev`` (models with at most 64 outputs).  On piecewise-linear
    networks (ReLU) the Jacobian is locally constant and the climb stops at once."""
    from lipfast.network import lipschitz_bound

    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise ValueError(f"lipfast.lipschitz_gap: refine_steps must be an int >= 0, got {refine_steps!r}")
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"lipfast.lipschitz_gap: step_size must be a positive finite number, got {step_size!r}")
    from lipfast import _export

    runnable = _export.runnable(model)  # an exported program translated once, for the local constants and the climb
    local = local_lipschitz(runnable, inputs, rtol=rtol, progress=progress)
    if report is None:
        report = lipschitz_bound(model, tuple(inputs.shape[1:]), progress=progress)
    model = runnable
    index = int(local.argmax())
    lower = float(local[index])
    notes = []
    if refine_steps:
        with _util.eval_mode(model), _util.differentiable_in_eval(model):
            refined, step = _refine(model, inputs[index], refine_steps, step_size)
        # step 0 is the start itself, its norm computed another way (an SVD of J, not the eigenvalues
        # of J Jᵀ): a last-bit difference there is no climb
        if step > 0 and refined > lower:
            notes.append(f"raised from {lower:.6g} by gradient ascent on ‖J(x)‖ (best after {step} of {refine_steps} steps)")
            lower = refined
    upper = float(report.upper)
    ratio = upper / lower if lower > 0 else math.inf
    if lower > upper * (1 + 10 * rtol):
        notes.append("the attained value exceeds the certified bound: the bound does not hold for this model")
    return GapReport(lower, upper, ratio, index, int(inputs.shape[0]), "; ".join(notes))
