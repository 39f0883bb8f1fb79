"""Spectral normalization for training loops.

:func:`spectral_norm` registers a parametrization on a layer's weight, as
``torch.nn.utils.parametrizations.spectral_norm`` does, in one of two modes:

* ``mode="matrix"``: torch's semantics exactly (the weight reshaped to a matrix with ``dim`` first,
  the same parametrization structure, buffers ``_u`` / ``_v`` and state_dict keys, the random
  generator consumed the same way at registration, 15 warm-up iterations, ``n_power_iterations``
  per training-mode forward, none in eval), so checkpoints load both ways and give the same
  outputs.  Faster: each power-method step is one fused pass over W (:func:`lipfast.ops.spectral_norm_step`),
  sigma comes out of that pass, and in eval mode W / sigma is computed once and reused until the
  weight, the iterates or the mode change.
* ``mode="operator"``: the weight is scaled so that the TRUE operator norm of the layer's linear map
  (a convolution on inputs of the size it sees, see :func:`lipfast.operator_norm`) equals
  ``target``.  The iterate lives on the layer's input space and persists across steps.

:func:`converge` runs every lipfast spectral norm of a model to convergence (before certifying);
:func:`lipschitz_penalty` is a differentiable regulariser over the Linear and conv layers.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lipfast import _ext, conv, linalg, ops, reference

__all__ = ["spectral_norm", "converge", "lipschitz_penalty", "SpectralNorm", "OperatorNorm"]

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d) + _TRANSPOSED
_WARMUP = 15  # torch's power-method iterations at registration


def _spectral_norm_step(W: Tensor, u: Tensor, v: Tensor, iters: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(sigma, u, v) of torch's power method after `iters` steps; sigma = uᵀ W v, differentiable in W."""
    if _ext.use_kernel("spectral_norm_step", W.device):
        return ops.spectral_norm_step(W, u, v, iters, eps)
    with torch.no_grad():
        sigma, u, v = reference.spectral_norm_step(W, u, v, iters, eps)
    return linalg._with_singular_gradient(sigma, W, u, v), u, v


def _to_matrix(weight: Tensor, dim: int) -> Tensor:
    """weight reshaped as torch's spectral norm does: dim first, the rest flattened."""
    if dim != 0:
        weight = weight.permute(dim, *(d for d in range(weight.dim()) if d != dim))
    return weight.flatten(1)


def _from_matrix(matrix: Tensor, like: Tensor, dim: int) -> Tensor:
    """The inverse of _to_matrix, shaped like `like`."""
    if dim == 0:
        return matrix.reshape(like.shape)
    shape = (like.shape[dim],) + tuple(s for d, s in enumerate(like.shape) if d != dim)
    order = list(range(1, like.dim()))
    order.insert(dim, 0)
    return matrix.reshape(shape).permute(order)


def _inner(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> over all entries: one pass, accumulated in float32 for the half types."""
    if a.dtype in (torch.float16, torch.bfloat16):
        return torch.sum(a * b, dtype=torch.float32)
    return torch.vdot(a.reshape(-1), b.reshape(-1))


class _ScaleBySigma(torch.autograd.Function):
    """W' = target * W / sigma with sigma = uᵀ W v (u, v constants), in one pass each way.

    Backward: d/dW <G, W'> = (target / sigma) G - (<G, W'> / sigma) u vᵀ: one reduction and one
    rank-one update over W, where autograd would take the division's two products, the outer
    product and the accumulation separately."""

    @staticmethod
    def forward(ctx, weight: Tensor, sigma: Tensor, u: Tensor, v: Tensor, target: float, dim: int) -> Tensor:
        out = weight / sigma if target == 1.0 else weight * (target / sigma)
        ctx.save_for_backward(out, sigma, u, v)
        ctx.target, ctx.dim = target, dim
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out, sigma, u, v = ctx.saved_tensors
        c = _inner(grad, out)
        G = _to_matrix(grad, ctx.dim)
        # (target / sigma) (G - (c / target) u vᵀ)
        M = torch.addr(G, (u * (-c / ctx.target)).to(G.dtype), v.to(G.dtype))
        M = M.mul_((ctx.target / sigma).to(M.dtype))
        return _from_matrix(M, grad, ctx.dim), None, None, None, None, None


class _CachedInEval(nn.Module):
    """Holds W / sigma from the last eval-mode forward, keyed by everything it depends on."""

    def __init__(self) -> None:
        super().__init__()
        self._cache: tuple[tuple, Tensor] | None = None

    def _cache_key(self, weight: Tensor) -> tuple | None:
        """The key under which an eval-mode result may be reused, or None when it may not: while
        compiling, and when autograd must see a fresh graph."""
        if self.training or torch.compiler.is_compiling() or (torch.is_grad_enabled() and weight.requires_grad):
            return None
        state = tuple((b.data_ptr(), b._version) for b in self.buffers())
        return (weight.data_ptr(), weight._version, weight.dtype, weight.device, weight.shape, state)

    def _cached(self, weight: Tensor, compute) -> Tensor:
        key = self._cache_key(weight)
        if key is not None and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        out = compute(weight)
        self._cache = (key, out) if key is not None else None
        return out

    def __getstate__(self):  # deepcopy and pickling: the cache is derived state
        state = self.__dict__.copy()
        state["_cache"] = None
        return state


class SpectralNorm(_CachedInEval):
    """The parametrization of ``spectral_norm(..., mode="matrix")``: W -> target * W / sigma(W) with
    sigma from torch's power method on W reshaped to a matrix (``dim`` first)."""

    def __init__(self, weight: Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12,
                 target: float = 1.0) -> None:
        super().__init__()
        ndim = weight.ndim
        if dim >= ndim or dim < -ndim:
            raise IndexError(f"Dimension out of range (expected to be in range of [-{ndim}, {ndim - 1}] but got {dim})")
        if n_power_iterations <= 0:
            raise ValueError(
                f"Expected n_power_iterations to be positive, but got n_power_iterations={n_power_iterations}"
            )
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps = eps
        self.target = float(target)
        if ndim > 1:
            self.n_power_iterations = n_power_iterations
            weight_mat = self._reshape_weight_to_matrix(weight.detach())
            h, w = weight_mat.size()
            # the generator is consumed exactly as torch's: two normal_ draws, u then v
            u = weight_mat.new_empty(h).normal_(0, 1)
            v = weight_mat.new_empty(w).normal_(0, 1)
            self.register_buffer("_u", F.normalize(u, dim=0, eps=self.eps))
            self.register_buffer("_v", F.normalize(v, dim=0, eps=self.eps))
            self._power_method(weight_mat, _WARMUP)

    def _reshape_weight_to_matrix(self, weight: Tensor) -> Tensor:
        return _to_matrix(weight, self.dim)

    @torch.no_grad()
    def _power_method(self, weight_mat: Tensor, n_power_iterations: int) -> None:
        _, u, v = _spectral_norm_step(weight_mat, self._u, self._v, n_power_iterations, self.eps)
        self._u.copy_(u)  # in place, as torch does (DataParallel replicas share the buffers)
        self._v.copy_(v)

    def _scaled(self, weight: Tensor, iters: int) -> Tensor:
        # one fused op for the steps and sigma = uᵀ W v of the final pair; then W' and its gradient
        with torch.no_grad():
            sigma, u, v = _spectral_norm_step(self._reshape_weight_to_matrix(weight), self._u, self._v, iters, self.eps)
            if iters:
                self._u.copy_(u)
                self._v.copy_(v)
        return _ScaleBySigma.apply(weight, sigma, u, v, self.target, self.dim)

    def forward(self, weight: Tensor) -> Tensor:
        if weight.ndim == 1:
            return self.target * F.normalize(weight, dim=0, eps=self.eps)
        if self.training:
            self._cache = None
            return self._scaled(weight, self.n_power_iterations)
        return self._cached(weight, self._eval_forward)

    def _eval_forward(self, weight: Tensor) -> Tensor:
        return self._scaled(weight, 0)

    def right_inverse(self, value: Tensor) -> Tensor:
        return value

    @torch.no_grad()
    def converge(self, weight: Tensor, rtol: float) -> None:
        """Lanczos to rtol from the current v; then u = W v / ‖W v‖, so that uᵀ W v = sigma_max."""
        if weight.ndim == 1:
            return
        weight_mat = self._reshape_weight_to_matrix(weight.detach())
        if _ext.use_kernel("dense_spectral_norm", weight_mat.device):
            _, u, v, _ = ops.dense_spectral_norm(weight_mat, self._v, linalg.DEFAULT_MAX_ITERS, rtol)
        else:
            _, u, v, _ = reference.dense_spectral_norm(weight_mat, self._v, linalg.DEFAULT_MAX_ITERS, rtol)
        self._u.copy_(u)
        self._v.copy_(v)


class _ScaleByOperatorNorm(torch.autograd.Function):
    """W' = target * W / sigma with sigma = ‖A_W v‖ for the unit iterate v (a constant).

    Backward: d/dW <G, W'> = (target / sigma) G - (<G, W'> / sigma) d sigma / dW, and d sigma / dW
    is the convolution's weight gradient at output u = A_W v / sigma and input v (one sample)."""

    @staticmethod
    def forward(ctx, weight: Tensor, v: Tensor, op: conv.ConvOperator, target: float) -> Tensor:
        with torch.no_grad():
            y = op.apply(v[None].to(weight.dtype), weight)[0]
            sigma = torch.linalg.vector_norm(y)
            u = y / sigma
        out = weight * (target / sigma)
        ctx.save_for_backward(out, sigma, u, v.to(weight.dtype).clone())
        ctx.op, ctx.target = op, target
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out, sigma, u, v = ctx.saved_tensors
        op = ctx.op
        c = _inner(grad, out)
        d_sigma = reference.conv_weight_gradient(
            out, u, v, op.stride, op.pad_lo, op.pad_hi, op.dilation, op.groups, op.padding_mode
        )
        d_sigma = d_sigma.mul_((c / ctx.target).to(d_sigma.dtype))
        return torch.sub(grad, d_sigma).mul_((ctx.target / sigma).to(grad.dtype)), None, None, None


class OperatorNorm(_CachedInEval):
    """The parametrization of ``spectral_norm(..., mode="operator")`` on a conv layer: W -> target * W /
    ‖A_W‖ with A_W the layer's bias-free linear map on inputs of size ``input_size`` (recorded
    from the first forward when not given), its norm from a power method whose iterate ``_v`` (an
    input of the layer's canonical operator) persists across steps; ``_input_size`` is kept in
    the state_dict too.  Give input_size up front under DistributedDataParallel, so that the
    iterate exists (and is broadcast) from the start."""

    def __init__(self, module: nn.Module, weight: Tensor, n_power_iterations: int = 1, eps: float = 1e-12,
                 target: float = 1.0, input_size: Sequence[int] | None = None) -> None:
        super().__init__()
        if n_power_iterations <= 0:
            raise ValueError(
                f"Expected n_power_iterations to be positive, but got n_power_iterations={n_power_iterations}"
            )
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.target = float(target)
        transposed = isinstance(module, _TRANSPOSED)
        self.geometry = dict(
            stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups,
            padding_mode=module.padding_mode, transposed=transposed,
            output_padding=module.output_padding if transposed else 0,
        )
        self.register_buffer("_v", weight.detach().new_empty(0))
        # the input size: a Python tuple for the code (no tensor read while compiling), and a buffer
        # for the state_dict
        self.register_buffer("_input_size", torch.zeros(0, dtype=torch.int64))
        self._size: tuple[int, ...] | None = None
        self._fresh = True  # the iterate is a random draw: warm it up at the next step
        if input_size is not None:
            self.set_input_size(input_size, weight)

    @property
    def input_size(self) -> tuple[int, ...] | None:
        return self._size

    @torch.no_grad()
    def set_input_size(self, size: Sequence[int], weight: Tensor) -> None:
        """Records the spatial input size; a new size draws a new iterate (from torch's generator)."""
        size = tuple(int(s) for s in size)
        if size == self.input_size and self._v.numel():
            return
        op = conv.conv_operator("nn.spectral_norm", weight, size, **self.geometry)
        self._size = size
        self._input_size = torch.tensor(size, dtype=torch.int64, device=self._input_size.device)
        self._v = weight.detach().new_empty(weight.shape[1] * op.groups, *op.input_size).normal_(0, 1)
        self._fresh = True
        self._cache = None

    def _operator(self, weight: Tensor) -> conv.ConvOperator:
        if self.input_size is None:
            raise RuntimeError(
                "lipfast.nn.spectral_norm: mode='operator' needs the layer's input size: pass input_size, or run "
                "the layer once (its first forward records it)"
            )
        return conv.conv_operator("nn.spectral_norm", weight, self.input_size, **self.geometry)

    @torch.no_grad()
    def _power_steps(self, op: conv.ConvOperator, steps: int) -> None:
        if self._fresh:
            steps, self._fresh = max(steps, _WARMUP), False
        w = op.weight.detach()
        x = self._v[None].to(w.dtype)
        geometry = (op.stride, op.pad_lo, op.pad_hi, op.dilation, op.groups, op.padding_mode)
        for _ in range(steps):
            x = F.normalize(x.flatten(), dim=0, eps=self.eps).reshape(x.shape)
            y = reference.conv_apply(w, x, *geometry, op.output_size)
            x = reference.conv_adjoint(w, y, op.input_size, *geometry)
        self._v.copy_(F.normalize(x.flatten(), dim=0, eps=self.eps).reshape(self._v.shape))

    def forward(self, weight: Tensor) -> Tensor:
        if self.training:
            op = self._operator(weight)
            self._power_steps(op, self.n_power_iterations)
            self._cache = None
            return _ScaleByOperatorNorm.apply(weight, self._v, op, self.target)
        return self._cached(weight, self._eval_forward)

    def _eval_forward(self, weight: Tensor) -> Tensor:
        op = self._operator(weight)
        if self._fresh:
            self._power_steps(op, 0)
        return _ScaleByOperatorNorm.apply(weight, self._v, op, self.target)

    def right_inverse(self, value: Tensor) -> Tensor:
        return value

    @torch.no_grad()
    def converge(self, weight: Tensor, rtol: float) -> None:
        """Lanczos on the operator to rtol, started from the current iterate."""
        op = self._operator(weight.detach())
        _, _, v, _ = conv._top_singular(op, rtol, linalg.DEFAULT_MAX_ITERS, self._v)
        self._v.copy_(v.reshape(self._v.shape))
        self._fresh = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the iterate's shape follows the input size: take the checkpoint's
        for name in ("_v", "_input_size"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        self._cache = None
        self._fresh = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._size = tuple(int(s) for s in self._input_size) or None


def _record_input_size(module: nn.Module, args) -> None:
    """Forward pre-hook of operator-mode layers: the spatial size of the input (batched or not)."""
    if not args or not isinstance(args[0], Tensor) or not parametrize.is_parametrized(module, "weight"):
        return  # (the hook stays after remove_parametrizations, and then does nothing)
    size = tuple(args[0].shape[-len(module.kernel_size):])
    for p in module.parametrizations.weight:
        if isinstance(p, OperatorNorm):
            p.set_input_size(size, module.parametrizations.weight.original)


def _is_dtensor(x: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(x, DTensor)


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    *,
    mode: str = "matrix",
    input_size: Sequence[int] | None = None,
    target: float = 1.0,
) -> nn.Module:
    """Registers spectral normalization on ``module.<name>`` and returns the module.

    ``mode="matrix"`` is ``torch.nn.utils.parametrizations.spectral_norm`` (same arguments, same
    state_dict keys, the same random draws at registration, so the same seed gives the same
    results and checkpoints load both ways), with the weight divided by sigma then multiplied by
    ``target``; faster (see the module docstring).  ``mode="operator"`` scales the weight of an
    ``nn.Linear`` or conv layer so that the operator norm of the layer's linear map equals
    ``target``: for a conv layer on inputs of spatial size ``input_size`` (default: the size its
    first forward sees; a new size re-initializes the iterate).  ``dim`` applies to matrix mode
    only.  Either way, ``n_power_iterations`` steps run per training-mode forward, warm-started;
    :func:`converge` finishes the job, e.g. before certifying.
    """
    if mode not in ("matrix", "operator"):
        raise ValueError(f"lipfast.nn.spectral_norm: mode must be 'matrix' or 'operator', got {mode!r}")
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if _is_dtensor(weight):
        raise ValueError(
            f"lipfast.nn.spectral_norm: {name} is a DTensor (sharded, e.g. by FSDP2's fully_shard); register "
            "spectral_norm before sharding: fully_shard then gathers the weight for each forward, the "
            "normalization sees the whole matrix, and the u, v iterates stay identical on every rank"
        )
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not (math.isfinite(target) and target > 0):
        raise ValueError(f"lipfast.nn.spectral_norm: target must be a positive number, got {target!r}")
    if mode == "operator" and isinstance(module, _CONVS):
        if name != "weight":
            raise ValueError(f"lipfast.nn.spectral_norm: mode='operator' normalizes a conv layer's 'weight', got name={name!r}")
        if dim is not None:
            raise ValueError("lipfast.nn.spectral_norm: dim applies to mode='matrix' only")
        if input_size is not None:
            input_size = conv._tuple("nn.spectral_norm", "input_size", input_size, weight.dim() - 2, 1)
        parametrization = OperatorNorm(module, weight, n_power_iterations, eps, target, input_size)
        # unsafe: registration would evaluate the parametrization, which needs the input size
        parametrize.register_parametrization(module, name, parametrization, unsafe=True)
        module.register_forward_pre_hook(_record_input_size)
        return module
    if mode == "operator" and not isinstance(module, nn.Linear):
        raise TypeError(
            f"lipfast.nn.spectral_norm: mode='operator' supports nn.Linear and conv layers, got {type(module).__name__}"
        )
    if dim is None:
        dim = 1 if isinstance(module, _TRANSPOSED) else 0
    parametrize.register_parametrization(module, name, SpectralNorm(weight, n_power_iterations, dim, eps, target))
    return module


def _parametrizations(model: nn.Module):
    """(module, name, parametrization) for every lipfast spectral norm in model."""
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, (SpectralNorm, OperatorNorm)):
                    yield module, name, p


@torch.no_grad()
def converge(model: nn.Module, rtol: float = 1e-5) -> None:
    """Runs every lipfast spectral norm in ``model`` to convergence: Lanczos to relative accuracy
    ``rtol`` from the current iterate, which it replaces.  Call it before certifying, so that the
    normalized weights have norm ``target`` up to rtol (not up to what a few power steps reached)."""
    rtol = linalg._check_rtol("nn.converge", rtol)
    for module, name, p in _parametrizations(model):
        p.converge(module.parametrizations[name].original, rtol)
        p._cache = None


def lipschitz_penalty(model: nn.Module, target: float = 1.0, *, input_shape: Sequence[int] | None = None,
                      rtol: float = 1e-3) -> Tensor:
    """A differentiable regulariser: ``sum over layers of max(0, sigma_l / target - 1)^2``.

    The layers are every nn.Linear and conv layer of ``model``; sigma_l is the operator norm of the
    layer's linear map (its weight as the layer uses it, parametrizations applied): for a conv
    layer on the input size it sees when ``input_shape`` (one input, no batch dim) is given, or
    that a lipfast operator-mode spectral norm recorded; otherwise the norm of the weight reshaped
    to (out, in * k...) as torch's spectral norm reshapes it.  Each sigma is a Lanczos estimate to
    ``rtol`` with gradient u vᵀ (through the convolution for conv layers), so the penalty pushes
    every layer's norm down to target and is zero once all are there.
    """
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not (math.isfinite(target) and target > 0):
        raise ValueError(f"lipfast.nn.lipschitz_penalty: target must be a positive number, got {target!r}")
    sizes: dict[nn.Module, tuple[int, ...]] = {}
    if input_shape is not None:
        from lipfast.models import conv_layers

        sizes = {layer: size for _, layer, size in conv_layers(model, tuple(input_shape))}
    terms = []
    for module in model.modules():
        if not isinstance(module, (nn.Linear,) + _CONVS):
            continue
        size = sizes.get(module)
        if size is None and parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, OperatorNorm) and p.input_size is not None:
                    size = p.input_size
        if isinstance(module, _CONVS) and size is not None:
            sigma = conv.operator_norm(module, size, rtol=rtol)
        else:
            w = module.weight
            matrix = w.transpose(0, 1) if isinstance(module, _TRANSPOSED) else w
            sigma = linalg.spectral_norm(matrix.flatten(1), rtol=rtol)
        terms.append(torch.relu(sigma / target - 1) ** 2)
    if not terms:
        return torch.zeros(())
    return torch.stack([t.to(terms[0].dtype) for t in terms]).sum()


# 1-Lipschitz building blocks, losses and export (lipfast/blocks.py), in this namespace too.
from lipfast.blocks import (  # noqa: E402
    Abs, GroupSort, HKRLoss, LipschitzMarginLoss, SLLBlock, SLLConv2d, aol, export, orthogonal,
)

__all__ += ["Abs", "GroupSort", "HKRLoss", "LipschitzMarginLoss", "SLLBlock", "SLLConv2d", "aol", "export", "orthogonal"]
