"""Whole-network Lipschitz bounds (L2 -> L2) and certified accuracy.

:func:`lipschitz_bound` traces the model with torch.fx, so that residual connections and branches
are seen, records every leaf module's input and output shapes on one zero input, gives every leaf
module a certified constant for each input size it is called on (Linear and conv layers through
:func:`lipfast.operator_norm_bounds`, the others from their definition), and composes them node by
node with sound rules (each stated beside its code): a value counts as often as it is used, copies
as copies, an in-place call overwrites its input.  Linear and conv functions applied to weights
that do not depend on the input (stored, or computed from parameters in the forward) get brackets
of their own; rules that need sizes or such weights read them from a run of the traced graph.  What no rule covers gives no finite bound (inf), with the reason in the report.
Where tracing fails on a branch or loop on the input's sizes, the model is traced for the input
shape; where it still fails (control flow on the input's entries), the bound falls back to the
product over the leaf modules in call order, marked NOT CERTIFIED.  A TorchScript model is first
translated into an fx graph (lipfast/_torchscript.py).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import inspect
import math
import operator
import re
import string
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.fx.passes.shape_prop
import torch.nn.functional as F
from torch import Tensor, nn

from lipfast import _chains, _recurrent, _util, conv, linalg, reference
from lipfast.certify import certified_radius
from lipfast.models import eval_forward

# The composition's arithmetic is rounded upwards, so that no bound is below what its rule gives in
# exact arithmetic: each result is computed exactly (Fraction) and rounded up to a float (one to
# four per rule, on graphs of hundreds of nodes: nothing to time).  Exact results stay exact.


def _float_up(exact: Fraction | int) -> float:
    """The smallest float >= exact (>= 0), inf beyond the largest float."""
    try:
        value = float(exact)  # correctly rounded, to nearest
    except OverflowError:
        return math.inf
    return value if value == math.inf or Fraction(value) >= exact else math.nextafter(value, math.inf)


def _mul_up(a: float, b: float) -> float:
    """a b (both >= 0) rounded up; 0 when either is 0 (a constant map stays constant, not NaN)."""
    if a == 0 or b == 0:
        return 0.0
    if math.isinf(a) or math.isinf(b):
        return math.inf
    return _float_up(Fraction(a) * Fraction(b))


def _sum_up(terms: list[float]) -> float:
    """The sum of terms (>= 0) rounded up; 0 for none."""
    if any(math.isinf(t) for t in terms):
        return math.inf
    return _float_up(sum((Fraction(t) for t in terms), Fraction(0)))


def _sqrt_up(x: float | Fraction | int) -> float:
    """sqrt(x) (x >= 0) rounded up: the smallest float whose square is at least x (so sqrt(a^2) = a)."""
    if x == math.inf:
        return math.inf
    exact = Fraction(x)
    if exact == 0:
        return 0.0
    k = (exact.numerator.bit_length() - exact.denominator.bit_length()) // 2  # sqrt(x) = sqrt(x / 4^k) 2^k
    try:
        root = math.ldexp(math.sqrt(float(exact / Fraction(4) ** k)), k)
    except OverflowError:
        return math.inf
    if root == math.inf:
        return root
    while Fraction(root) ** 2 < exact:
        root = math.nextafter(root, math.inf)
    while root > 0 and Fraction(below := math.nextafter(root, 0.0)) ** 2 >= exact:
        root = below
    return root

__all__ = ["LayerBound", "LipschitzReport", "lipschitz_bound", "certified_accuracy", "register_lipschitz"]


@dataclass
class LayerBound:
    name: str
    kind: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    lower: float
    upper: float
    seconds: float
    note: str = ""


@dataclass
class LipschitzReport:
    """Certified upper bound of a network's L2 -> L2 Lipschitz constant, and how it was built."""

    upper: float
    naive_upper: float
    layers: list[LayerBound]
    method: str  # "fx" or "hooks"
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"{'layer':32s} {'kind':18s} {'lower':>10s} {'upper':>10s} {'gap':>8s} {'s':>7s}"]
        for layer in self.layers:
            gap = layer.upper / layer.lower - 1 if layer.lower > 0 and math.isfinite(layer.upper) else math.inf
            lines.append(f"{layer.name[:32]:32s} {layer.kind[:18]:18s} {layer.lower:10.5g} {layer.upper:10.5g} "
                         f"{gap:8.1e} {layer.seconds:7.3f}" + (f"  {layer.note}" if layer.note else ""))
        lines.append(f"network bound (composed over the graph, {self.method}): {self.upper:.6g}")
        lines.append(f"naive bound (product of every layer's upper): {self.naive_upper:.6g}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"time: {self.seconds:.2f} s")
        return "\n".join(lines)


# --- layer constants -----------------------------------------------------------------------------

_CONVS = conv._CONVS
#: modules that compute the identity in the eval-mode network that lipschitz_bound bounds
_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
               nn.FeatureAlphaDropout)
_ONE = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Flatten, nn.Unflatten, *_IDENTITIES,
        # permutations of the entries, and padding with a constant (or cropping, for negative amounts)
        nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.modules.padding._ConstantPadNd,
        # slopes in [0, 1]: 1 / (1 + |x|)^2, sigmoid(-x), tanh(x)^2, 0 or 1
        nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Softshrink)
#: elementwise activations by their largest |slope| (module type: slope, or a function of the module)
_SLOPES: dict[type, Callable[[nn.Module], float]] = {
    nn.Hardswish: lambda m: 1.5,  # (2x + 3) / 6 on (-3, 3), 0 below, 1 above: largest 9 / 6 just below 3
    nn.Hardsigmoid: lambda m: _float_up(Fraction(1, 6)),
    # scale x above 0, scale alpha (e^x - 1) below: largest scale * alpha as x -> 0-
    nn.SELU: lambda m: 1.0507009873554804934193349852946 * 1.6732632423543772848170429916717 * (1 + 1e-15),
    nn.CELU: lambda m: 1.0 if m.alpha > 0 else math.inf,  # slope e^(x / alpha) <= 1 below 0 (unbounded if alpha < 0)
    nn.Mish: lambda m: _mish_slope(),
    nn.PReLU: lambda m: max(1.0, float(m.weight.detach().abs().max())),
    # softmax's Jacobian diag(p) - p pᵀ is the covariance of v_X, X ~ p, for a unit v: by
    # Popoviciu's inequality at most (max v - min v)^2 / 4 <= 2 / 4
    nn.Softmax: lambda m: 0.5,
    nn.Softmax2d: lambda m: 0.5,  # softmax over the channels
    nn.Softmin: lambda m: 0.5,  # softmax(-x)
    # leaky with a slope drawn from [lower, upper] (training), or their mean (eval)
    nn.RReLU: lambda m: max(1.0, abs(m.lower), abs(m.upper)),
}
#: linear maps with nonnegative weights, bounded by _linear_pool_bound: averages, interpolation
#: (upsampling other than bicubic, whose weights take both signs: _separable_bound alone), padding
#: that copies entries
_NONNEGATIVE_LINEAR = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                       nn.AdaptiveAvgPool3d, nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd,
                       nn.modules.padding._CircularPadNd,
                       # sliding blocks taken apart (each input entry copied into every block holding it)
                       # and summed back: sqrt(the largest number of blocks holding one entry), exactly
                       nn.Unfold, nn.Fold)
#: pooling modules that can return (values, indices): the indices jump with the input (no constant)
_INDEXED_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                  nn.AdaptiveMaxPool3d, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d)
_NO_CONSTANT = {
    nn.LayerNorm: "LayerNorm divides by the input's own standard deviation: no global Lipschitz constant",
    nn.GroupNorm: "GroupNorm divides by the input's own standard deviation: no global Lipschitz constant",
    nn.RMSNorm: "RMSNorm divides by the input's own root mean square: no global Lipschitz constant",
    nn.modules.instancenorm._InstanceNorm: "InstanceNorm without running statistics divides by each input's own "
                                           "standard deviation: no global Lipschitz constant",
    nn.MultiheadAttention: "dot-product attention has no global Lipschitz constant (Kim et al. 2021)",
    nn.GLU: "GLU multiplies one half of its input by a gate on the other: no global Lipschitz constant",
    **dict.fromkeys((nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder, nn.TransformerEncoderLayer,
                     nn.TransformerDecoderLayer),
                    "a Transformer layer: dot-product attention has no global Lipschitz constant (Kim et al. 2021)"),
}
#: functions whose output has no global Lipschitz constant, and why
_NO_CONSTANT_FUNCTIONS = {
    F.layer_norm: "layer_norm divides by the input's own standard deviation",
    F.group_norm: "group_norm divides by the input's own standard deviation",
    F.rms_norm: "rms_norm divides by the input's own root mean square",
    F.normalize: "normalize divides by the input's own norm",
    F.scaled_dot_product_attention: "dot-product attention (Kim et al. 2021)",
    F.glu: "glu multiplies one half of its input by a gate on the other",
}
_REGISTRY: dict[type, Callable] = {}


def register_lipschitz(module_type: type, fn: Callable) -> None:
    """Registers ``fn(module, input_shape) -> float or (lower, upper)``: a Lipschitz constant (L2 ->
    L2, input_shape without batch dim) for modules of ``module_type`` (subclasses included)."""
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"lipfast.register_lipschitz: module_type must be an nn.Module subclass, got {module_type!r}")
    if not callable(fn):
        raise TypeError(f"lipfast.register_lipschitz: fn must be callable, got {type(fn).__name__}")
    _REGISTRY[module_type] = fn


def _max_slope(derivative: Callable[[Tensor], Tensor]) -> float:
    """sup |f'| of a smooth scalar function whose slope peaks within [-20, 20] and tends to 0 or 1
    outside: a dense grid in float64, refined around the best point, plus a relative margin of
    1e-9 for the refinement's resolution (the slopes here are smooth, with |f''| < 1)."""
    x = torch.linspace(-20, 20, 400001, dtype=torch.float64)
    best = x[derivative(x).abs().argmax()]
    fine = torch.linspace(float(best) - 1e-3, float(best) + 1e-3, 200001, dtype=torch.float64)
    return float(derivative(fine).abs().max()) * (1 + 1e-9) + 1e-12


@functools.lru_cache(maxsize=None)
def _gelu_slope(approximate: str) -> float:
    def derivative(x: Tensor) -> Tensor:
        x = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(F.gelu(x, approximate=approximate).sum(), x)
        return grad
    return _max_slope(derivative)


@functools.lru_cache(maxsize=None)
def _mish_slope() -> float:
    def derivative(x: Tensor) -> Tensor:
        x = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(F.mish(x).sum(), x)
        return grad
    return _max_slope(derivative)


@functools.lru_cache(maxsize=None)
def _silu_slope() -> float:
    return _max_slope(lambda x: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))))


def _log_softmax_slope(dim: int | None, shape: tuple[int, ...]) -> float:
    """The Lipschitz constant of log_softmax along dim of a tensor of shape (batch dim included):
    its Jacobian I - 1 pᵀ (p the softmax) has norm sqrt(max(1, n ‖p‖²)) (it is the identity off
    span{1, p}), which tends to sqrt(n) as p tends to a corner of the simplex (n = shape[dim] >= 2;
    a single entry's log_softmax is the constant 0).  dim None: torch's implicit choice."""
    if dim is None:
        dim = 0 if len(shape) in (0, 1, 3) else 1
    if not isinstance(dim, int) or isinstance(dim, bool) or not -len(shape) <= dim < len(shape):
        raise _Unsupported(f"log_softmax along dim={dim!r} of a tensor of shape {tuple(shape)}")
    if dim % len(shape) == 0:
        raise _Unsupported("log_softmax along the batch dim mixes the examples")
    n = shape[dim]
    return _sqrt_up(n) if n > 1 else 0.0


def _window_counts(n: int, k: int, s: int, p: int, d: int, out: int) -> int:
    """The largest number of pooling windows (out of `out`, kernel k, stride s, padding p, dilation
    d) that contain one input position of a length-n signal."""
    counts = [0] * n
    for o in range(out):
        for j in range(k):
            i = o * s - p + d * j
            if 0 <= i < n:
                counts[i] += 1
    return max(counts) if counts else 0


def _pooled_size(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The spatial size a pooling module's output has on inputs of input_shape (its values', where it
    also returns indices)."""
    with torch.no_grad():
        out = module(torch.zeros(1, *input_shape))
    return tuple((out[0] if isinstance(out, tuple) else out).shape[2:])


def _lp_pool_bound(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[float, float, str]:
    """LPPool: (K sum over a window of x^p / n_w)^(1/p) per window (torch's avg_pool of x^p times the
    kernel's size K, n_w the entries of a window cut off by ceil_mode), so for even p the window's
    p-norm times a_w^(1/p), a_w = K / n_w.  A p-norm with p >= 2 is 1-Lipschitz in the 2-norm, so
    ‖Δy‖^2 <= sum over windows of a_w^(2/p) ‖Δx_w‖^2 <= max over entries of the sum over the windows
    holding it of a_w^(2/p), times ‖Δx‖^2; a_w is a product over dims, and so is that sum.  p = 1 is
    linear (the window sums times a_w), p = +-inf a max pool of |x|; for odd p > 1, (sum x^p)^(1/p)
    has unbounded slope where the sum crosses 0, and other p are not defined for negative entries."""
    p = module.norm_type
    dims = len(input_shape) - 1
    k = _as_tuple(module.kernel_size, dims)
    s = _as_tuple(module.stride if module.stride is not None else module.kernel_size, dims)
    out = _pooled_size(module, input_shape)
    if p in (math.inf, -math.inf):
        m = math.prod(_window_counts(n, kd, sd, 0, 1, o) for n, kd, sd, o in zip(input_shape[1:], k, s, out))
        return 1.0, _sqrt_up(m), ""
    if p == 1:
        return (*_linear_pool_bound(module, input_shape), "")
    if not (float(p).is_integer() and p >= 2 and int(p) % 2 == 0):
        reason = "odd" if float(p).is_integer() and p > 1 else "not an even integer"
        return 0.0, math.inf, f"LPPool with norm_type={p} ({reason}): no Lipschitz constant"
    total = 1.0
    for n, kd, sd, o in zip(input_shape[1:], k, s, out):
        sums = [0.0] * n
        for j in range(o):
            lo, hi = j * sd, min(j * sd + kd, n)
            for i in range(lo, hi):
                sums[i] += (kd / (hi - lo)) ** (2 / p) * (1 + 1e-15)
        total *= max(sums) * (1 + 1e-14)
    return 1.0, _sqrt_up(total) * (1 + 1e-15), ""


def _as_tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


#: the most entries _separable_bound's probes along one dim hold (n_d times a channel's entries)
_SEPARABLE_MAX_ENTRIES = 1 << 22


def _separable_bound(module: Callable[[Tensor], Tensor], input_shape: tuple[int, ...]) -> tuple[float, float] | None:
    """The bracket of a linear map that acts on every channel alike, as a product of maps along the
    spatial dims (an interpolation of any mode, bicubic included; an average or sum pool; an
    adaptive average; a copying pad): A = lam A_1 ⊗ .. ⊗ A_k on each channel, so ‖A‖ = |lam| prod_d
    ‖A_d‖_2, each factor bracketed as a matrix (a Cholesky certificate).  A_d's columns are the map
    applied to e_i along dim d and ones along the others (a batch of n_d probes), read at the other
    dims' position where the probes' outputs are largest: A_d up to a factor, which lam, fitted on a
    random input, takes up.  The product is then checked against the map on two more random inputs,
    and None is returned where it differs (maps that are no such product), or where a dim's probes
    would hold more than _SEPARABLE_MAX_ENTRIES entries.  The weights are computed in float64, each
    within a few units of rounding, and the check passes within 1e-10: a relative margin of 1e-9
    covers both (‖dA_d‖ <= ‖dA_d‖_F <= 8 u sqrt(n_d) ‖A_d‖)."""
    spatial = tuple(input_shape[1:])
    if not spatial or math.prod(spatial) == 0 or max(spatial) * math.prod(spatial) > _SEPARABLE_MAX_ENTRIES:
        return None
    factors = []

    def product(x: Tensor) -> Tensor:
        for d, A in enumerate(factors):
            x = torch.movedim(torch.tensordot(x, A, dims=([2 + d], [1])), -1, 2 + d)
        return x

    try:
        with torch.no_grad():
            for d, n in enumerate(spatial):
                shape = [n, 1] + [1] * len(spatial)
                shape[2 + d] = n
                probe = torch.eye(n, dtype=torch.float64).reshape(shape).expand(n, 1, *spatial).contiguous()
                y = module(probe)
                if y.dim() != 2 + len(spatial) or y.shape[:2] != (n, 1):
                    return None
                y = y[:, 0].movedim(1 + d, -1)  # (n, other dims..., out_d)
                others = y.abs().sum(dim=(0, -1))  # (other dims...): where the ones come out largest
                at = torch.unravel_index(others.argmax(), others.shape) if others.dim() else ()
                factors.append(y[(slice(None), *at)].T.contiguous())  # (out_d, n): A_d times a number
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, 2, *spatial, generator=g, dtype=torch.float64)
            predicted, actual = product(x), module(x)
            if actual.shape != predicted.shape or float((predicted * predicted).sum()) == 0:
                return None
            lam = float((actual * predicted).sum()) / float((predicted * predicted).sum())
            for _ in range(2):
                x = torch.randn(1, 2, *spatial, generator=g, dtype=torch.float64)
                predicted, actual = lam * product(x), module(x)
                scale = float(actual.abs().max()) if actual.numel() else 0.0
                if not torch.allclose(actual, predicted, rtol=1e-10, atol=1e-12 * scale):
                    return None
    except (RuntimeError, ValueError, IndexError):
        return None
    if not (math.isfinite(lam) and lam != 0 and all(bool(torch.isfinite(A).all()) and bool((A != 0).any())
                                                     for A in factors)):
        return None
    brackets = conv.dense_brackets(factors, 1e-6, linalg.DEFAULT_MAX_ITERS)
    if brackets is None:
        return None
    lower, upper = math.prod(b[0] for b in brackets) * abs(lam), math.prod(b[1] for b in brackets) * abs(lam)
    return lower * (1 - 1e-9), upper * (1 + 1e-9)


def _linear_pool_bound(module: Callable[[Tensor], Tensor], input_shape: tuple[int, ...]) -> tuple[float, float]:
    """The bracket of a linear map A whose weights all have one sign (a pooling, an interpolation, a
    padding; an average pool with a negative divisor_override): (‖A 1‖ / ‖1‖, sqrt(‖A‖_1
    ‖A‖_inf)), a Rayleigh quotient below, and above from the row sums A 1 and column sums Aᵀ 1,
    whose sizes are the absolute row and column sums, computed in float64 (relative margins of
    1e-12 cover that arithmetic); narrowed to _separable_bound's where the map is a product over its
    dims (the norm itself: bilinear upsampling with align_corners 2.157 -> 2.092)."""
    x = torch.ones(1, *input_shape, dtype=torch.float64, requires_grad=True)
    y = module(x)
    (columns,) = torch.autograd.grad(y.sum(), x)
    y = y.detach()
    lower = float(torch.linalg.vector_norm(y)) / math.sqrt(x.numel()) * (1 - 1e-12)
    upper = math.sqrt(float(y.abs().max()) * float(columns.abs().max())) * (1 + 1e-12)
    separable = _separable_bound(module, input_shape)
    if separable is not None:
        lower, upper = max(lower, separable[0]), min(upper, separable[1])
    return lower, max(lower, upper)


def _layer_constant(name: str, module: nn.Module, input_shape: tuple[int, ...], rtol: float) -> tuple[float, float, str]:
    """(lower, upper, note) of one leaf module's Lipschitz constant on inputs of input_shape."""
    for kind, fn in _REGISTRY.items():
        if isinstance(module, kind):
            value = fn(module, input_shape)
            lower, upper = value if isinstance(value, tuple) else (0.0, float(value))
            return float(lower), float(upper), "registered"
    if isinstance(module, nn.Linear):
        lower, upper = linalg.spectral_norm_bounds(module.weight.detach(), rtol=rtol)
        return float(lower), float(upper), ""
    if isinstance(module, nn.RNNBase):
        return _recurrent.recurrent_bound(module, input_shape)
    if isinstance(module, _CONVS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the gap is in the report
            lower, upper = conv.operator_norm_bounds(module, input_shape[1:], rtol=rtol)
        return float(lower), float(upper), ""
    running_instance_norm = isinstance(module, nn.modules.instancenorm._InstanceNorm) and \
        module.track_running_stats and module.running_var is not None
    if isinstance(module, nn.modules.batchnorm._BatchNorm) or running_instance_norm:
        # eval: y = gamma (x - mean) / sqrt(var + eps) + beta, per channel: max |gamma| / sqrt(var + eps)
        # (an InstanceNorm that tracks running statistics computes this too, in eval mode)
        var = module.running_var.detach().double() if module.running_var is not None else None
        if var is None:
            return 0.0, math.inf, "BatchNorm without running statistics normalizes by the batch: no constant"
        gamma = module.weight.detach().double().abs() if module.weight is not None else torch.ones_like(var)
        value = float((gamma / torch.sqrt(var + module.eps)).max()) * (1 + 1e-12)
        note = "in training mode; the eval-mode constant is given" if module.training else ""
        return value, value, note
    if isinstance(module, nn.LogSoftmax):
        try:
            value = _log_softmax_slope(module.dim, (1, *input_shape))
        except _Unsupported as error:
            return 0.0, math.inf, str(error)
        return value, value, ""
    if isinstance(module, _ONE) or (isinstance(module, nn.Sequential) and len(module) == 0):
        return 1.0, 1.0, ""  # (an empty Sequential is the identity)
    if isinstance(module, nn.LeakyReLU):
        value = max(1.0, abs(module.negative_slope))
        return value, value, ""
    if isinstance(module, nn.ELU):
        value = max(1.0, abs(module.alpha))  # slope 1 above 0, alpha e^x below
        return value, value, ""
    if isinstance(module, nn.Sigmoid):
        return 0.25, 0.25, ""
    if isinstance(module, nn.GELU):
        value = _gelu_slope(module.approximate)
        return value, value, ""
    if isinstance(module, nn.SiLU):
        value = _silu_slope()
        return value, value, ""
    for kind, slope in _SLOPES.items():
        if isinstance(module, kind):
            value = slope(module)
            return (value, value, "") if math.isfinite(value) else (0.0, value, "CELU with alpha <= 0 has no constant")
    if isinstance(module, (nn.Hardshrink, nn.Threshold)):
        # a jump at ±lambd (or at threshold to value): no constant, unless there is no jump
        if (isinstance(module, nn.Hardshrink) and module.lambd == 0) or \
                (isinstance(module, nn.Threshold) and module.value == module.threshold):
            return 1.0, 1.0, ""
        return 0.0, math.inf, f"{type(module).__name__} jumps: no Lipschitz constant"
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        # ‖Δy‖^2 = sum over windows of (max over the window of Δx)^2 <= sum over windows ‖Δx_window‖^2
        # <= m ‖Δx‖^2, m the largest number of windows holding one input: L <= sqrt(m)
        dims = len(input_shape) - 1
        k, s = _as_tuple(module.kernel_size, dims), _as_tuple(module.stride or module.kernel_size, dims)
        p, d = _as_tuple(module.padding, dims), _as_tuple(module.dilation, dims)
        out = _pooled_size(module, input_shape)
        m = math.prod(_window_counts(n, *a) for n, *a in zip(input_shape[1:], k, s, p, d, out))
        return 1.0, _sqrt_up(m), ""
    if isinstance(module, (nn.FractionalMaxPool2d, nn.FractionalMaxPool3d)):
        # windows of kernel_size at pseudo-random but distinct starts (torch requires output + kernel - 1
        # <= input, so consecutive starts differ by at least 1): one input lies in at most k windows
        # per dim, whatever the draw, and L <= sqrt(m) as for MaxPool with m = prod k
        dims = 2 if isinstance(module, nn.FractionalMaxPool2d) else 3
        return 1.0, _sqrt_up(math.prod(_as_tuple(module.kernel_size, dims))), ""
    if isinstance(module, (nn.LPPool1d, nn.LPPool2d, nn.LPPool3d)):
        return _lp_pool_bound(module, input_shape)
    if isinstance(module, (nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d)):
        # the values placed at the given indices, each once (a later one overwriting): norm <= 1 in the
        # values for fixed indices.  Counted as 1 for the values and indices together: indices that
        # depend on the input come from a pool's indices or a rounding, which have no constant, so the
        # product is inf there, as it must be (the output jumps where the indices do)
        return 1.0, 1.0, ""
    if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        dims = len(input_shape) - 1
        out = _as_tuple(module.output_size, dims)
        m = 1
        for n, o in zip(input_shape[1:], out):
            o = n if o is None else o
            counts = [0] * n
            for w in range(o):
                for i in range((w * n) // o, -((-(w + 1) * n) // o)):
                    counts[i] += 1
            m *= max(counts)
        return 1.0, _sqrt_up(m), ""
    if isinstance(module, _NONNEGATIVE_LINEAR) or (isinstance(module, nn.Upsample) and module.mode != "bicubic"):
        return (*_linear_pool_bound(module, input_shape), "")
    if isinstance(module, nn.Upsample):  # bicubic: weights of both signs, but a product over the dims
        separable = _separable_bound(module, input_shape)
        if separable is None:
            return 0.0, math.inf, "bicubic interpolation on this input is not bounded (weights of both signs)"
        return (*separable, "")
    for kind, reason in _NO_CONSTANT.items():
        if isinstance(module, kind):
            return 0.0, math.inf, reason
    raise TypeError(
        f"lipfast.lipschitz_bound: no Lipschitz constant is known for module {name!r} of type "
        f"{type(module).__module__}.{type(module).__qualname__}; register one with "
        f"lipfast.register_lipschitz({type(module).__name__}, lambda module, input_shape: constant)"
    )


# --- composition over the graph ------------------------------------------------------------------

_SHAPE_ONLY_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
                         torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis, torch.t,
                         torch.unflatten, torch.ravel, F.pixel_shuffle, F.pixel_unshuffle, torch.pixel_shuffle,
                         torch.pixel_unshuffle, F.channel_shuffle, torch.channel_shuffle,
                         # permutations of the entries
                         torch.flip, torch.fliplr, torch.flipud, torch.roll, torch.rot90}
_SHAPE_ONLY_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "ravel", "permute",
                       "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "contiguous", "squeeze",
                       "unsqueeze", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type", "type_as",
                       "flip", "fliplr", "flipud", "roll", "rot90"}
# each output entry one input entry, no input entry taken twice (a slice, or a tuple of the pieces
# of a split, which together are a permutation): norm <= 1
_SELECTING_FUNCTIONS = {torch.narrow, torch.select, torch.chunk, torch.split, torch.tensor_split, torch.unbind,
                        torch.hsplit, torch.vsplit, torch.dsplit, torch.split_with_sizes, torch.unsafe_split,
                        torch.unsafe_chunk, torch.diagonal}
_SELECTING_METHODS = {"narrow", "select", "chunk", "split", "tensor_split", "unbind", "hsplit", "vsplit", "dsplit",
                      "split_with_sizes", "diagonal"}
# copies of every entry, each entry the same number of times (numel(out) / numel(in))
_REPLICATING_FUNCTIONS = {torch.tile, torch.broadcast_to}
_REPLICATING_METHODS = {"expand", "expand_as", "repeat", "tile", "broadcast_to"}
# each output the mean (the sum) of m = numel(in) / numel(out) entries, each entry in one output
_REDUCING_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum"}
_REDUCING_METHODS = {"mean", "sum"}
# the entrywise max (min) of two tensors: |max(a, b) - max(a', b')| <= max(|a - a'|, |b - b'|) in
# every entry, so ‖Δy‖^2 <= ‖Δa‖^2 + ‖Δb‖^2 when a and b have y's shape (a max and a min of the same
# two pieces of one tensor, concatenated, are MaxMin: _max_min_source)
_PAIRWISE_EXTREMA = {torch.maximum, torch.minimum, torch.fmax, torch.fmin}
_PAIRWISE_EXTREMA_METHODS = {"maximum", "minimum", "fmax", "fmin"}
# sorted values along one dim (and the top k of them): per slice ‖sort(a) − sort(b)‖ <= ‖a − b‖ (the
# rearrangement inequality: pairing both in sorted order minimizes the distance), so norm <= 1; the
# indices they also return jump, and have no constant (_sort_output)
_SORTS = {torch.sort: True, torch.topk: True, torch.msort: False}  # whether it returns (values, indices)
_SORT_METHODS = {"sort": True, "topk": True, "msort": False}
# the largest (smallest) entry of each slice along some dims: the slices are disjoint and per slice
# |max u − max v| <= ‖u − v‖_inf <= ‖u − v‖, so ‖Δy‖^2 <= ‖Δx‖^2: norm <= 1.  amax and amin, and max
# and min by their arguments (_extremum_form): of everything, along a dim (values and indices, as a
# sort), or of two tensors (as maximum)
_EXTREMA_REDUCTIONS = {torch.amax, torch.amin}
_EXTREMA_REDUCTION_METHODS = {"amax", "amin"}
_EXTREMA = {torch.max, torch.min}
_EXTREMA_METHODS = {"max", "min"}
# order statistics of each slice along a dim (or of everything): per slice |q(u) − q(v)| <= ‖u − v‖_inf
# (moving every entry by at most d moves every order statistic by at most d), so norm <= 1 as for
# max; along a dim they return (values, indices), as max does (_returns_pair)
_ORDER_STATISTICS = {torch.median, torch.nanmedian, torch.kthvalue}
_ORDER_STATISTIC_METHODS = {"median", "nanmedian", "kthvalue"}
# every output entry one input entry or zero, no input entry in two outputs (a 0/1 diagonal matrix,
# then entries placed): norm <= 1.  Not views (diagonal, a view, is a selection above)
_MASKING_FUNCTIONS = {torch.tril, torch.triu, torch.diag, torch.diag_embed}
_MASKING_METHODS = {"tril", "triu", "diag", "diag_embed"}
# the p-norm of each slice along some dims (torch.norm, Tensor.norm, torch.linalg.vector_norm, and
# torch.linalg.norm with ord=None, a vector 2-norm): _vector_norm_slope
_VECTOR_NORMS = {torch.norm: "p", torch.linalg.vector_norm: "ord", torch.linalg.norm: "ord"}
# linear maps with weights of one sign, bounded on their input's size as the module forms are
_FUNCTIONAL_POOLS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                     F.adaptive_avg_pool3d, F.interpolate, F.pad, F.fold, F.unfold}
# max pools (and below, LP pools): the module built from the same arguments (the functions take them
# in another order)
_FUNCTIONAL_MAX_POOLS = {
    F.max_pool1d: (nn.MaxPool1d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.max_pool3d: (nn.MaxPool3d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.adaptive_max_pool1d: (nn.AdaptiveMaxPool1d, ("output_size", "return_indices")),
    F.adaptive_max_pool2d: (nn.AdaptiveMaxPool2d, ("output_size", "return_indices")),
    F.adaptive_max_pool3d: (nn.AdaptiveMaxPool3d, ("output_size", "return_indices")),
}
# (called with return_indices=True, the functions above trace as these, which return (values, indices))
_FUNCTIONAL_INDEXED_POOLS = {
    F.max_pool1d_with_indices: F.max_pool1d, F.max_pool2d_with_indices: F.max_pool2d,
    F.max_pool3d_with_indices: F.max_pool3d, F.adaptive_max_pool1d_with_indices: F.adaptive_max_pool1d,
    F.adaptive_max_pool2d_with_indices: F.adaptive_max_pool2d, F.adaptive_max_pool3d_with_indices: F.adaptive_max_pool3d,
}
_FUNCTIONAL_MAX_POOLS.update({name: _FUNCTIONAL_MAX_POOLS[plain] for name, plain in _FUNCTIONAL_INDEXED_POOLS.items()})
# power-average pools: bounded as the module (_lp_pool_bound), built from the same arguments
_FUNCTIONAL_MAX_POOLS.update({
    F.lp_pool1d: (nn.LPPool1d, ("norm_type", "kernel_size", "stride", "ceil_mode")),
    F.lp_pool2d: (nn.LPPool2d, ("norm_type", "kernel_size", "stride", "ceil_mode")),
    F.lp_pool3d: (nn.LPPool3d, ("norm_type", "kernel_size", "stride", "ceil_mode")),
})
_FUNCTION_SLOPES = {F.relu: 1.0, torch.relu: 1.0, F.relu6: 1.0, torch.tanh: 1.0, F.tanh: 1.0, F.hardtanh: 1.0,
                    torch.abs: 1.0, torch.neg: 1.0, operator.neg: 1.0,
                    F.softplus: 1.0,  # its slope sigmoid(beta x) < 1 for every beta
                    torch.sigmoid: 0.25, F.sigmoid: 0.25, F.hardswish: _SLOPES[nn.Hardswish](None),
                    F.hardsigmoid: _SLOPES[nn.Hardsigmoid](None), F.softmax: _SLOPES[nn.Softmax](None),
                    torch.softmax: _SLOPES[nn.Softmax](None), F.softmin: _SLOPES[nn.Softmax](None),
                    F.selu: _SLOPES[nn.SELU](None),
                    torch.selu: _SLOPES[nn.SELU](None), F.softsign: 1.0, F.logsigmoid: 1.0,
                    # x - tanh(x): slope tanh(x)^2 < 1; softshrink: slope 0 or 1
                    F.tanhshrink: 1.0, F.softshrink: 1.0,
                    # |sin'|, |cos'| <= 1; atan' = 1 / (1 + x^2), asinh' = 1 / sqrt(1 + x^2): at most 1
                    **dict.fromkeys((torch.sin, torch.cos, torch.atan, torch.arctan, torch.asinh, torch.arcsinh), 1.0),
                    # erf' = 2 exp(-x^2) / sqrt(pi), largest at 0 (the division rounded, so a margin)
                    **dict.fromkeys((torch.erf, torch.special.erf, torch.erfc, torch.special.erfc),
                                    2 / math.sqrt(math.pi) * (1 + 1e-15))}
_METHOD_SLOPES = {"relu": 1.0, "tanh": 1.0, "sigmoid": 0.25, "abs": 1.0, "neg": 1.0, "sin": 1.0, "cos": 1.0,
                  "atan": 1.0, "arctan": 1.0, "asinh": 1.0, "arcsinh": 1.0,
                  "softmax": _SLOPES[nn.Softmax](None), "erf": _FUNCTION_SLOPES[torch.erf],
                  "erfc": _FUNCTION_SLOPES[torch.erf]}
_LOG_SOFTMAX = {F.log_softmax, torch.log_softmax}


class _Unsupported(Exception):
    pass


#: what a subclass of a torch.nn layer may define and still compute what the layer computes
_NOT_COMPUTING = {"__init__", "reset_parameters", "extra_repr", "__repr__", "__init_subclass__", "__setstate__",
                  "__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__",
                  "__firstlineno__", "__static_attributes__", "__constants__", "_version", "__parameters__",
                  "__orig_bases__"}


def _computes_as_torch_layer(m: nn.Module) -> bool:
    """Whether m computes what a torch.nn layer computes: it is one, or an instance of a subclass
    of one (a user's nn.Linear with its own initialization, say) that overrides nothing the forward
    pass uses: only __init__, reset_parameters, extra_repr and plain class attributes.  It then
    gets that layer's constant; anything else (a forward, a _conv_forward, a property) is traced
    into.  The classes torch.nn.utils.parametrize makes for a parametrized module only compute its
    parametrized tensors, and are looked through (torch.fx itself takes them for torch.nn layers,
    whatever the class below them computes)."""
    if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) or _overrides_methods(m):
        return False
    for cls in type(m).__mro__:
        if cls.__module__ == "torch.nn.utils.parametrize":
            continue
        if cls is nn.Module:
            return False
        if cls.__module__.startswith(("torch.nn.", "torch.ao.nn.")):
            return True
        if any(name not in _NOT_COMPUTING and (callable(value) or isinstance(value, (property, staticmethod, classmethod)))
               for name, value in vars(cls).items()):
            return False
    return False


class _AssigningProxy(torch.fx.Proxy):
    """A traced value that records an item assignment, y[index] = value (and y[index] *= 3, which
    Python runs as one), as operator.setitem(y, index, value): torch.fx refuses it, and the
    composition follows it as an in-place call on y."""

    def __setitem__(self, index, value) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping whole (as leaves) the module types given a constant with
    register_lipschitz, so that the registered constant is the one used, and the modules that
    compute what a torch.nn layer does (_computes_as_torch_layer: torch.fx's own rule, which keeps
    every torch.nn class whole, made exact for subclasses and parametrized modules); its values
    record item assignments (_AssigningProxy)."""

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _AssigningProxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) is nn.Module:  # a bare namespace for submodules (it has no forward): look inside
            return False
        return isinstance(m, tuple(_REGISTRY)) or _computes_as_torch_layer(m)


@contextlib.contextmanager
def _leaving_no_constants(model: nn.Module):
    """torch.fx keeps the tensors a trace computes from constants as attributes _tensor_constant<i>
    of the model it traces (the graph module takes its own references): they are removed from the
    model afterwards, which is left as it was."""
    before = set(vars(model))
    try:
        yield
    finally:
        for name in set(vars(model)) - before:
            if re.fullmatch(r"_tensor_constant\d+", name):
                delattr(model, name)


def _overrides_methods(m: nn.Module) -> bool:
    """Whether the module holds a method of its own (m.forward = ..., set on the instance), which
    Python calls instead of its class's."""
    return any(callable(value) and callable(getattr(type(m), name, None)) for name, value in vars(m).items())


def _with_own_forward(model: nn.Module) -> nn.Module:
    """The module to trace: torch.fx traces a module's class's forward, and a forward set on the
    instance (model.forward = ...) is what a call runs; then a shallow copy (the same parameters and
    submodules, under the same names) whose class runs that forward, for one input.  The copy's
    attributes are its own, so what tracing adds to it leaves the model as it is."""
    own = vars(model).get("forward")
    if own is None:
        return model
    inputs = [p for p in inspect.signature(own).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    if len(inputs) != 1:
        raise ValueError(f"the forward set on the model takes {len(inputs)} inputs, not one")

    class OwnForward(type(model)):
        def forward(self, input):
            return own(input)

    copy = object.__new__(OwnForward)
    copy.__dict__.update({name: value for name, value in vars(model).items() if name != "forward"})
    return copy


def _drop_unused(traced: torch.fx.GraphModule) -> None:
    """Removes the calls whose results nothing uses and that change nothing (a branch the forward
    computes and drops): a layer's only user is then the one that matters, so a BatchNorm whose
    input also fed a dead branch is still folded.  Calls that write in place (methods with a
    trailing underscore, inplace=True, item assignments, in-place modules), asserts, modules with
    hooks and modules of other libraries (whose forward might write into something) stay."""
    graph = traced.graph
    for node in reversed(list(graph.nodes)):
        if node.users or node.op not in ("call_function", "call_method", "call_module", "get_attr") or \
                _in_place(node) or node.target in (operator.setitem, torch._assert):
            continue
        if node.op == "call_module":  # torch.nn's and lipfast's own layers, with no hooks and not in place
            module = traced.get_submodule(node.target)
            if any(m._forward_hooks or m._forward_pre_hooks or getattr(m, "inplace", False) is True or
                   not type(m).__module__.startswith(("torch.nn.", "lipfast.")) for m in module.modules()):
                continue
        graph.erase_node(node)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    model = _with_own_forward(model)
    with _leaving_no_constants(model):
        return torch.fx.GraphModule(model, _Tracer().trace(model))


def _trace_for_shape(model: nn.Module, example: Tensor) -> torch.fx.GraphModule:
    """The model traced for inputs of example's shape (a batch of one), where plain tracing fails on
    a branch or loop on the input's sizes (a shape check, an assert, range(x.size(1))): torch.fx's
    meta tracer, made to compute every call on the example alongside the trace (ShapeTracer), so
    that sizes, dims and dtypes are numbers, while the entries stay symbolic (a branch on them still
    fails).  The graph is then checked against the model on a random input of that shape (as a
    translated script is); ValueError where it differs."""
    from torch.fx.experimental.meta_tracer import MetaAttribute, MetaDeviceAttribute, MetaProxy, MetaTracer

    def value(v):
        if isinstance(v, MetaDeviceAttribute):  # x.device: the example's, where MetaTracer says "meta"
            return value(v.root).device
        if isinstance(v, torch.fx.Proxy):
            known = v.known() if isinstance(v, Known) else None
            if known is None:
                raise LookupError("a value that was not computed")
            return known
        return v

    class Known:
        """What a proxy of the shape tracer knows: its value computed on the example, sizes read as
        numbers from it; an attribute (`x.sort(1).values`, `x.T`) is the attribute of its owner's."""

        def known(self):
            meta = self.__dict__.get("_tensor_meta")
            if meta is None and isinstance(self, MetaAttribute) and isinstance(self.root, Known):
                owner = self.root.known()
                meta = getattr(owner, self.attr, None) if owner is not None else None
                meta = None if callable(meta) else meta  # (a method: called, it is a call_method proxy)
            return meta

        def __getattr__(self, k: str):
            if k == "_tensor_meta":
                return self.__getattribute__(k)
            attribute = ShapeAttribute(self, k)
            meta = attribute.known()
            if meta is not None:  # (so that its size(), dim(), shape and dtype are numbers too)
                attribute.install_tensor_meta(meta)
            return attribute

        @property
        def ndim(self):  # a number, as size(), dim() and shape are (timm checks x.ndim)
            meta = self.known()
            return meta.ndim if isinstance(meta, Tensor) else ShapeAttribute(self, "ndim")

        def __len__(self) -> int:  # a number too: the example's (len(x.chunk(4, 1)), len(x))
            meta = self.known()
            return len(meta) if isinstance(meta, (Tensor, tuple, list)) else super().__len__()

        __setitem__ = _AssigningProxy.__setitem__  # (computed on the example too, in place, as the model does)

    class ShapeProxy(Known, MetaProxy):
        pass

    class ShapeAttribute(Known, MetaAttribute):
        pass

    class ShapeTracer(_Tracer, MetaTracer):
        """MetaTracer, with each call computed on the example's values where MetaTracer computes it
        on meta tensors: it makes the model's own tensors (a BatchNorm's running statistics read in
        a forward) and the tensors the forward creates meta tensors, which then meet the example's,
        and every size after them stays symbolic (timm's "same" padding after its BatchNormAct2d)."""

        def proxy(self, node: torch.fx.Node) -> MetaProxy:
            return ShapeProxy(node, self)

        def iter(self, obj: torch.fx.Proxy):
            """A loop over a value whose length the example gives (the pieces of chunk, split or
            unbind, a tensor's rows: `for part in x.chunk(4, 1)`, `sum(x.unbind(2))`): its items,
            taken by index, as many as there are for this input shape.  (Plain tracing unpacks
            only `a, b = x.chunk(2, 1)`, whose count the code spells out.)"""
            meta = obj.known() if isinstance(obj, Known) else None
            if isinstance(meta, (tuple, list)) or (isinstance(meta, Tensor) and meta.dim() > 0):
                return iter([obj[i] for i in range(len(meta))])
            return super().iter(obj)

        def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
            proxy = torch.fx.Tracer.create_proxy(self, kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
            if kind == "placeholder" and target in self.meta_args:
                proxy.install_tensor_meta(self.meta_args[target])
                return proxy
            try:
                a, k = torch.fx.node.map_aggregate(args, value), torch.fx.node.map_aggregate(kwargs, value)
                self._disable_module_getattr = True  # (the model's attributes as they are, not proxies)
                if kind == "call_function":
                    result = target(*a, **k)
                elif kind == "call_method":
                    result = getattr(a[0], target)(*a[1:], **k)
                elif kind == "call_module":
                    result = self.orig_forward(*a, **k)
                elif kind == "get_attr":  # a copy: an in-place call in the forward leaves the model as it is
                    result = functools.reduce(getattr, target.split("."), self.root)
                    result = result.detach().clone() if isinstance(result, Tensor) else result
                else:
                    return proxy
                proxy.install_tensor_meta(result)
            except Exception:  # (a value it depends on was not computed): its sizes stay symbolic
                pass
            finally:
                self._disable_module_getattr = False
            return proxy

    checked, model = model, _with_own_forward(model)
    inputs = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    if len(inputs) != 1:
        raise ValueError(f"its forward takes {len(inputs)} inputs, not one")
    with warnings.catch_warnings():  # (the meta tracer warns of each value it could not run: those stay symbolic)
        warnings.simplefilter("ignore")
        with _leaving_no_constants(model):
            # (a copy: the calls run on it, in-place ones included, and the caller's example is used again)
            traced = torch.fx.GraphModule(model, ShapeTracer().trace(model, meta_args={inputs[0].name: example.clone()}))
    from lipfast import _torchscript

    _torchscript.check_translation(checked, traced, tuple(example.shape[1:]))  # ValueError where they differ
    return traced


def _nodes_in(args) -> list[torch.fx.Node]:
    """The graph values in args (nested), each as often as it is passed: f(y, y) sees y twice, and
    node.all_input_nodes, which lists each input once, would miss that."""
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(args, found.append)
    return found


def _passed(args, bounds: dict) -> list[torch.fx.Node]:
    """The graph values in args that have a bound, with repeats."""
    return [a for a in _nodes_in(args) if a in bounds]


def _quadrature_up(terms: Iterable[float]) -> float:
    """sqrt of the sum of the squares of terms (>= 0), computed exactly and rounded up once; inf if
    any term is."""
    terms = list(terms)
    if any(math.isinf(t) for t in terms):
        return math.inf
    return _sqrt_up(sum((Fraction(t) ** 2 for t in terms), Fraction(0)))


def _concatenated(args, bounds: dict) -> float:
    """Lip of the values in args taken together: ‖(Δa, Δb, ...)‖ = sqrt(‖Δa‖^2 + ‖Δb‖^2 + ...) <=
    sqrt(L_a^2 + L_b^2 + ...) ‖Δx‖, a value passed twice counted twice."""
    return _quadrature_up(bounds[a] for a in _passed(args, bounds))


#: functions that apply a stored weight, by their arguments' names in order
_CONV_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_TRANSPOSED_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_BATCH_NORM_ARGUMENTS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_FUNCTIONAL_LAYERS = {
    F.linear: ("input", "weight", "bias"),
    F.conv1d: _CONV_ARGUMENTS, F.conv2d: _CONV_ARGUMENTS, F.conv3d: _CONV_ARGUMENTS,
    F.conv_transpose1d: _TRANSPOSED_ARGUMENTS, F.conv_transpose2d: _TRANSPOSED_ARGUMENTS,
    F.conv_transpose3d: _TRANSPOSED_ARGUMENTS,
    F.batch_norm: _BATCH_NORM_ARGUMENTS,  # y = weight (x - mean) / sqrt(var + eps) + bias, per channel
    F.prelu: ("input", "weight"),  # slope 1 above 0, weight (per channel) below
}
#: the tensors of each functional layer that must not depend on the input (they set its constant);
#: the bias may (its own bound is added), everything else must be a constant of the graph
_LAYER_TENSORS = {F.batch_norm: ("running_mean", "running_var", "weight")}


#: tensors made in the shape (and type) of another, whose values do not depend on that one's
_SHAPED_LIKE = {torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like}
_SHAPED_LIKE_METHODS = {"new_zeros", "new_ones", "new_full", "new_empty"}


def _reads_shape_only(node: torch.fx.Node) -> bool:
    """Whether node reads only its first argument's shape, type or device: a size (x.size(1),
    x.shape, x.dim()), or a tensor made in its shape (zeros_like(x), x.new_ones(3)); for the
    latter its other arguments still count (full_like(x, v) depends on v)."""
    if node.op == "call_method" and node.target in ("size", "dim", "numel"):
        return True
    if node.target is getattr and len(node.args) == 2 and \
            node.args[1] in ("shape", "ndim", "dtype", "device", "layout", "is_cuda", "requires_grad"):
        return True
    return (node.op == "call_function" and node.target in _SHAPED_LIKE) or \
        (node.op == "call_method" and node.target in _SHAPED_LIKE_METHODS)


def _input_dependent(graph_module: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """The nodes whose values depend on the model's input values (the others are constants:
    parameters, buffers, what the graph computes from them alone, such as a parametrized weight,
    and what it computes from the input's sizes alone, which the input shape fixes).  An in-place
    call whose result depends on the input (w.add_(x.mean()), w[0] = x.mean()) makes the value it
    writes into depend on it, and every value that may share that memory (for the calls after it:
    a weight so computed is no constant)."""
    depends: set[torch.fx.Node] = set()
    for node in graph_module.graph.nodes:
        read = node.all_input_nodes
        if node.op in ("call_function", "call_method") and _reads_shape_only(node):
            read = _nodes_in((node.args[1:], node.kwargs))
        if node.op == "placeholder" or any(a in depends for a in read):
            depends.add(node)
            written = node.args[0] if node.args else None
            if isinstance(written, torch.fx.Node) and written not in depends and (_in_place(node) or (
                    node.op == "call_module" and getattr(graph_module.get_submodule(node.target), "inplace", False))):
                depends |= _memory_family(written, graph_module)
    return depends


def _memory_base(node: torch.fx.Node, graph_module: torch.fx.GraphModule) -> torch.fx.Node:
    """The value whose memory node may view: its first argument where it may be a view of it (or the
    argument itself), and so on up."""
    while node.args and isinstance(node.args[0], torch.fx.Node) and _may_alias(node, graph_module):
        node = node.args[0]
    return node


def _memory_family(node: torch.fx.Node, graph_module: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """The values that may share node's memory: _memory_base's, and every view of it (and so on down)."""
    def views(value: torch.fx.Node, user: torch.fx.Node) -> bool:
        return bool(user.args) and user.args[0] is value and _may_alias(user, graph_module)

    base = _memory_base(node, graph_module)
    return {base} | {user for value, user in _users_through_views(base, views) if views(value, user)}


def _layer_arguments(node: torch.fx.Node, depends: set[torch.fx.Node]) -> dict | None:
    """F.linear / F.conv*d / F.conv_transpose*d's arguments by name, where the weight does not
    depend on the input (a parameter or buffer, or computed from them in the forward) and nothing
    but the input and the bias is computed in the graph; None otherwise (no rule bounds the call)."""
    names = _FUNCTIONAL_LAYERS.get(node.target) if node.op == "call_function" else None
    if names is None or len(node.args) > len(names):
        return None
    arguments = dict(zip(names, node.args), **node.kwargs)
    tensors = _LAYER_TENSORS.get(node.target, ("weight",))
    required = "running_var" if node.target is F.batch_norm else "weight"  # (BatchNorm's weight may be None)
    if not isinstance(arguments.get(required), torch.fx.Node) or "input" not in arguments:
        return None
    if any(arguments.get(name) in depends for name in tensors if isinstance(arguments.get(name), torch.fx.Node)):
        return None
    if _nodes_in([value for name, value in arguments.items() if name not in ("input", "bias") + tensors]):
        return None
    return arguments


def _layer_tensors(node: torch.fx.Node, arguments: dict) -> list[torch.fx.Node]:
    """The graph values that set a functional layer's constant (_LAYER_TENSORS)."""
    names = _LAYER_TENSORS.get(node.target, ("weight",))
    return [arguments[name] for name in names if isinstance(arguments.get(name), torch.fx.Node)]


def _propagated_shape(value) -> tuple[int, ...] | None:
    """The shape of a graph value (batch of one) from the shape propagation; None where it did not
    run, or the value is no tensor."""
    meta = value.meta.get("tensor_meta") if isinstance(value, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _example_shape(value) -> tuple[int, ...]:
    """One example's shape of a graph value; () where it is not known."""
    shape = _propagated_shape(value)
    return shape[1:] if shape is not None else ()


def _functional_layer(graph_module: torch.fx.GraphModule, node: torch.fx.Node, arguments: dict, rtol: float,
                      computed: dict[torch.fx.Node, Tensor | None], weight: Tensor | None = None,
                      groups: int | None = None) -> LayerBound:
    """The bracket of a linear or conv layer applied as a function (a custom module's forward
    calling F.conv2d(x, self.weight, ...)), as nn.Linear's or nn.ConvNd's would be (a conv on the
    input size the shape propagation recorded).  arguments: _layer_arguments(node); computed: the
    values of weights the graph computes (None where they could not be had, or differed between two
    runs of the forward)."""
    t0 = time.perf_counter()
    in_shape, out_shape = _example_shape(arguments["input"]), _example_shape(node)
    if node.target is F.batch_norm:
        value = _batch_norm_constant(graph_module, node, arguments, computed)
        return LayerBound(node.name, "F.batch_norm", in_shape, out_shape, value, value, time.perf_counter() - t0)
    if weight is None:  # (given: a weight with a BatchNorm folded in)
        weight = _tensor_value(graph_module, node, arguments["weight"], computed, "weight")
    if node.target is F.prelu:
        value = max(1.0, float(weight.double().abs().max()))
        return LayerBound(node.name, "F.prelu", in_shape, out_shape, value, value, time.perf_counter() - t0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the gap is in the report
        if node.target is F.linear:  # as an nn.Linear's: a Cholesky certificate, Gram iteration if that fails
            bracket = conv.dense_brackets([weight], rtol, linalg.DEFAULT_MAX_ITERS) if weight.dim() == 2 else None
            lower, upper = bracket[0] if bracket else linalg.spectral_norm_bounds(weight, rtol=rtol)
        else:
            if not in_shape:
                raise _Unsupported(f"{node.name}: the input size of {node.target.__name__} is not known")
            if len(in_shape) != weight.dim() - 1:
                raise _Unsupported(f"{node.name}: {node.target.__name__} called on an input of shape {(1, *in_shape)} "
                                   "with no batch dim (it takes the example's batch dim for its channels)")
            options = {k: arguments[k] for k in ("stride", "padding", "dilation", "groups", "output_padding",
                                                 "padding_mode") if k in arguments}
            if groups is not None:  # (a layer merged into it: _merged_weight)
                options["groups"] = groups
            lower, upper = conv.conv_spectral_norm_bounds(
                weight, in_shape[1:], transposed=node.target.__name__.startswith("conv_transpose"), rtol=rtol, **options)
    kind = node.meta["lipfast_module"][1] if "lipfast_module" in node.meta else f"F.{node.target.__name__}"
    return LayerBound(_node_label(node), kind, in_shape, out_shape, float(lower), float(upper), time.perf_counter() - t0)


#: the torch.nn padding modules, by the F.pad mode they call
_PAD_MODULE_MODES = ((nn.modules.padding._ConstantPadNd, "constant"), (nn.modules.padding._ReflectionPadNd, "reflect"),
                     (nn.modules.padding._ReplicationPadNd, "replicate"), (nn.modules.padding._CircularPadNd, "circular"))


def _pad_arguments(node) -> dict | None:
    """F.pad's arguments by name (input, pad, mode, value) of a pad call: F.pad itself, or a torch.nn
    padding module (ZeroPad2d, ReflectionPad1d, ...) called on one tensor, which calls F.pad with its
    own padding; None for anything else."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "call_function" and node.target is F.pad:
        return {"mode": "constant", "value": None, **dict(zip(("input", "pad", "mode", "value"), node.args)),
                **node.kwargs}
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    module = _stored_module(node)
    if module is None or not _plain_torch_layer(module):
        return None
    mode = next((mode for kind, mode in _PAD_MODULE_MODES if isinstance(module, kind)), None)
    if mode is None:
        return None
    return {"input": node.args[0], "pad": tuple(module.padding), "mode": mode, "value": getattr(module, "value", None)}


def _plain_torch_layer(module: nn.Module) -> bool:
    """Whether module computes what its torch.nn class does, as lipfast reads it: no registered
    constant, no hooks that could change its input or output, no forward of its own."""
    return not isinstance(module, tuple(_REGISTRY)) and not _hooks_note(module) and _computes_as_torch_layer(module)


def _stored_module(node: torch.fx.Node) -> nn.Module | None:
    """The module a call_module node calls, from the graph's owner; None where it has none."""
    owner = getattr(node.graph, "owning_module", None)
    try:
        return owner.get_submodule(node.target) if owner is not None else None
    except AttributeError:
        return None


_FUNCTIONAL_CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def _module_calls(traced: torch.fx.GraphModule) -> collections.Counter:
    """How many times the graph calls each module (by name)."""
    return collections.Counter(node.target for node in traced.graph.nodes if node.op == "call_module")


def _padded_convs_as_functions(traced: torch.fx.GraphModule) -> set[str]:
    """Rewrites in traced's graph each torch.nn Conv1d/2d/3d module called once, on the output of a
    pad (F.pad or a padding module), as the F.conv1d/2d/3d call it makes (its weight and bias read
    by get_attr nodes, its padding given when it pads with zeros): the same function, which
    _with_copying_pad can then fold the pad into, as for a functional conv.  The new node keeps the
    module's name and class (meta "lipfast_module") for the report.  Returns the names of the
    modules rewritten, whose leaf entries are no longer bounded as modules.  Modules with a
    registered constant, hooks, parametrizations or a forward of their own stay as they are."""
    graph = traced.graph
    counts = _module_calls(traced)
    rewritten = set()
    for node in list(graph.nodes):
        if node.op != "call_module" or counts[node.target] != 1 or len(node.args) != 1 or node.kwargs or \
                _pad_arguments(node.args[0]) is None:
            continue
        module = _stored_module(node)
        function = next((f for kind, f in _FUNCTIONAL_CONVS.items() if isinstance(module, kind)), None)
        if function is None or not _plain_torch_layer(module) or torch.nn.utils.parametrize.is_parametrized(module):
            continue
        # with padding_mode other than zeros the module pads by copying first (nothing, where its
        # padding is 0); that pad and the one before are not one pad: left as it is
        padding = module.padding if module.padding_mode == "zeros" else 0
        if module.padding_mode != "zeros" and module.padding != "valid" and any(module.padding):
            continue
        with graph.inserting_before(node):
            weight = graph.get_attr(f"{node.target}.weight")
            bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
            call = graph.call_function(function, (node.args[0], weight, bias, module.stride, padding,
                                                  module.dilation, module.groups))
        call.meta["lipfast_module"] = (node.target, type(module).__name__)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        rewritten.add(call.meta["lipfast_module"][0])
    if rewritten:
        traced.recompile()
    return rewritten


def _with_copying_pad(node: torch.fx.Node, arguments: dict) -> dict:
    """A conv2d applied to F.pad(x, p, mode) (or a padding module) with mode reflect, replicate or
    circular, equal amounts on both sides of each spatial dim and no padding of its own is
    nn.Conv2d(padding=p, padding_mode=mode) applied to x (that is how the module computes, and how a
    traced or exported one reads): its arguments then say so, so that the pair is bracketed as one
    operator, whose norm can be well below the product of the two (the pad alone copies entries:
    norm above 1).  A pad with zeros is folded in too, in any amounts, and added to the conv's own
    zero padding (conv._PadSides): one zero-padded operator on x, whose norm is at most the unpadded
    conv's on the padded grid, and whose bracket is cheaper (a smaller circulant grid, and the taps
    that only read padding cut off).  Others as they are."""
    source = arguments["input"]
    pad_arguments = _pad_arguments(source) if node.target in (F.conv1d, F.conv2d, F.conv3d) else None
    if pad_arguments is None:
        return arguments
    pad, mode = pad_arguments.get("pad"), pad_arguments.get("mode", "constant")
    zeros = mode == "constant" and pad_arguments.get("value") in (None, 0)
    dims = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}[node.target]
    own = arguments.get("padding", 0)
    own = (0,) * dims if own == "valid" else _as_tuple(own, dims) if isinstance(own, (int, list, tuple)) else None
    own = own if own is not None and len(own) == dims else None
    if not (zeros or mode in ("reflect", "replicate", "circular")) or not isinstance(pad, (list, tuple)) \
            or len(pad) != 2 * dims or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pad) \
            or own is None or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in own) \
            or (any(own) and not zeros):
        return arguments
    sides = [(pad[2 * i], pad[2 * i + 1]) for i in range(dims)][::-1]  # F.pad lists the last dim first
    if not isinstance(pad_arguments.get("input"), torch.fx.Node):
        return arguments
    if zeros:
        sides = [(lo + p, hi + p) for (lo, hi), p in zip(sides, own)]
        return {**arguments, "input": pad_arguments["input"], "padding": conv._PadSides(sides), "padding_mode": "zeros"}
    if all(left == right for left, right in sides):
        padding = tuple(left for left, _ in sides)
    else:
        # padding="same" with a copying mode pads d (k - 1) // 2 before and the rest after (stride 1),
        # as an even kernel needs: the module's own form, which traces as this pad and the conv
        stored = _stored_value(arguments.get("weight"))  # (a traced or exported module's): its shape is known now
        shape = tuple(stored.shape) if isinstance(stored, Tensor) else None
        dilation = _as_tuple(arguments.get("dilation", 1), dims)
        if shape is None or len(shape) != dims + 2 or _as_tuple(arguments.get("stride", 1), dims) != (1,) * dims:
            return arguments
        extents = [d * (k - 1) for d, k in zip(dilation, shape[2:])]
        if sides != [(e // 2, e - e // 2) for e in extents]:
            return arguments
        padding = "same"
    return {**arguments, "input": pad_arguments["input"], "padding": padding, "padding_mode": mode}


def _stored_value(node, model: nn.Module | None = None) -> object | None:
    """What a get_attr node reads from model (by default, the one its graph belongs to); None for any
    other value, or where the model has no such attribute."""
    model = model if model is not None else getattr(getattr(node, "graph", None), "owning_module", None)
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr" and model is not None):
        return None
    try:
        return functools.reduce(getattr, node.target.split("."), model)
    except AttributeError:
        return None


def _tensor_value(graph_module: torch.fx.GraphModule, node: torch.fx.Node, source: torch.fx.Node,
                  computed: dict[torch.fx.Node, Tensor | None], what: str) -> Tensor:
    """The value of a functional layer's constant tensor: stored (get_attr), or computed in the forward."""
    if _drawn(source):
        raise _Unsupported(f"{node.name}: {node.target.__name__}'s {what} is drawn at random in the forward (tracing "
                           "kept one draw)")
    value = _stored_value(source, graph_module) if source.op == "get_attr" else computed.get(source)
    if not isinstance(value, Tensor):
        raise _Unsupported(f"{node.name}: {node.target.__name__}'s {what} is computed in the forward, and its value "
                           "could not be had (or differed between two runs)")
    return value.detach()


def _batch_norm_constant(graph_module: torch.fx.GraphModule, node: torch.fx.Node, arguments: dict,
                         computed: dict[torch.fx.Node, Tensor | None]) -> float:
    """F.batch_norm with running statistics: y = gamma (x - mean) / sqrt(var + eps) + beta per channel,
    constant max |gamma| / sqrt(var + eps), as nn.BatchNorm's in eval mode; with batch statistics
    (training=True) it normalizes by the batch: no constant."""
    training, eps = arguments.get("training", False), arguments.get("eps", 1e-5)
    if training is not False or not isinstance(eps, (int, float)):
        raise _Unsupported(f"{node.name}: batch_norm with training={training!r} normalizes by the batch: no constant")
    var = _tensor_value(graph_module, node, arguments["running_var"], computed, "running_var").double()
    gamma = arguments.get("weight")
    gamma = _tensor_value(graph_module, node, gamma, computed, "weight").double().abs() if gamma is not None \
        else torch.ones_like(var)
    return float((gamma / torch.sqrt(var + eps)).max()) * (1 + 1e-12)


def _product(*factors: float) -> float:
    """The product of Lipschitz constants of maps composed in a chain, Lip(f o g) <= Lip(f) Lip(g),
    rounded up, and 0 when a factor is 0 even if another is inf: a chain through a constant map (a
    zero weight, say) is constant, and 0 * inf would be NaN.  1 for no factors."""
    result = 1.0
    for factor in factors:
        if factor == 0:
            return 0.0
        result = _mul_up(result, factor)
    return result


def _compose(graph_module: torch.fx.GraphModule, constants: dict[str, float],
             functional: dict[torch.fx.Node, tuple[float, dict]] | None = None,
             values: dict[torch.fx.Node, Tensor | None] | None = None,
             chains: dict[torch.fx.Node, tuple[torch.fx.Node, float, str]] | None = None,
             used: list[tuple[str, float, float]] | None = None) -> float:
    """L(node) bounds the Lipschitz constant of node's value as a function of the model's input;
    functional: the functional layers' (constant, arguments) (_functional_layer); values: the
    values of constant tensors the rules read (_propagate; a scale or divisor tensor); chains: per
    node, (source, constant, label) of a chain of layers bounded as one map (_chain_refinements):
    Lip(node) <= constant Lip(source) too, and the smaller bound is kept (each one holds); used
    collects (label, the rules' bound, the chain's) where a labelled chain's is the smaller."""
    values = values or {}
    chains = chains or {}
    bounds: dict[torch.fx.Node, float] = {}
    functional = functional or {}
    lp_pools, inside = {}, set()  # LPPools spelled out (_decomposed_lp_pool), and the nodes within them
    for node in graph_module.graph.nodes:
        if (found := _decomposed_lp_pool(node)) is not None:
            lp_pools[node] = found[:2]
            inside.update(found[2])
    for node in graph_module.graph.nodes:
        if node in inside:
            continue  # (bounded where the pool ends)
        if node in lp_pools:
            x, module = lp_pools[node]
            _, constant, reason = _lp_pool_bound(module, _shape(node, x)[1:])
            if bounds[x] > 0 and not math.isfinite(constant):
                raise _Unsupported(f"{node.name}: {reason}")
            bounds[node] = _product(bounds[x], constant) if bounds[x] > 0 else 0.0
        elif node in functional:
            # W x + b: Lip <= ‖W‖ Lip(x) + Lip(b) (b is a constant, but could be computed from x)
            constant, arguments = functional[node]
            bias = arguments.get("bias")  # added to every row (pixel): counted once per copy where it is not constant
            copies = _broadcast_copies(node, bias) if isinstance(bias, torch.fx.Node) and bounds.get(bias, 0) > 0 else 1
            bounds[node] = _sum_up([_product(constant, _concatenated([arguments["input"]], bounds)),
                                    _product(_concatenated([bias], bounds), _sqrt_up(copies))])
        elif node.op == "placeholder":
            bounds[node] = 1.0
        elif node.op == "get_attr":
            bounds[node] = 0.0  # a constant
        elif node.op == "call_module":
            # composition: Lip(f o g) <= Lip(f) Lip(g); a module of several tensor inputs sees them as
            # one concatenated input; a module of constants only (a parametrization computing a
            # weight, say) gives a constant
            inputs = _concatenated((node.args, node.kwargs), bounds)
            module = graph_module.get_submodule(node.target)
            if isinstance(module, nn.RNNBase) and not isinstance(module, tuple(_REGISTRY)):
                # its bound is for zero initial states: none given, or torch.zeros made in the forward
                states = [*node.args[1:], *node.kwargs.values()]
                if any(v is not None and not isinstance(v, (torch.fx.Node, tuple, list)) for v in states) or not all(
                        v.op == "call_function" and v.target is torch.zeros and not _changed_in_place(v)
                        for v in _nodes_in(states)):
                    raise _Unsupported(f"{node.name}: {type(module).__name__} called with an initial state other "
                                       "than torch.zeros (its bound is for zero initial states)")
            if inputs > 0 and _returns_pair(node) and any(user.target not in (operator.getitem, getattr)
                                                          for user in node.users):
                raise _Unsupported(f"{node.name}: the (values, indices) of {node.target} used whole: its indices jump")
            bounds[node] = _product(constants[node.target], inputs) if inputs > 0 else 0.0  # (no constant looked up)
            if getattr(graph_module.get_submodule(node.target), "inplace", False) is True:
                _overwrites(node, bounds, graph_module)
        elif node.op == "call_function" and node.target is operator.getitem and not node.users:
            continue  # a piece taken and never used (the indices of a sort, say): it changes nothing
        elif node.op in ("call_function", "call_method"):
            try:
                bounds[node] = _function_bound(node, bounds, values)
            except _Unsupported:
                raise
            except Exception as exc:  # a call a rule did not foresee: no finite bound (inf is always sound)
                raise _Unsupported(f"{node.name}: the rule for {node.target} could not be applied "
                                   f"({type(exc).__name__}: {exc})") from exc
            if _in_place(node):
                _overwrites(node, bounds, graph_module)
        elif node.op == "output":
            return _concatenated(node.args, bounds)  # a tuple of outputs: their concatenation
        if node in chains and node in bounds:
            source, constant, label = chains[node]
            chained = _product(bounds[source], constant)
            if chained < bounds[node]:
                if label and used is not None and bounds[source] > 0:
                    used.append((label, bounds[node] / bounds[source], constant))
                bounds[node] = chained
    raise _Unsupported("the graph has no output")


#: the names of sums, of products and quotients, and of matrix products (functions, methods, operators)
_SUM_NAMES = frozenset({"add", "sub", "__add__", "__sub__"})
_PRODUCT_NAMES = frozenset({"mul", "div", "truediv", "__mul__", "__truediv__"})
_MATMUL_NAMES = frozenset({"matmul", "mm", "mv", "bmm", "__matmul__", "__rmatmul__"})


def _call_name(node: torch.fx.Node) -> str:
    """A call's name: a method's, or a function's __name__ ("" for a target without one)."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def _rule_name(node: torch.fx.Node) -> str:
    """The name the rules know a call by: an in-place method's (x.relu_(), x.mul_(3)) is that of the
    method it does in place, which computes the same (what it overwrites, _overwrites follows)."""
    name = _call_name(node)
    in_place = node.op == "call_method" and name.endswith("_") and not name.startswith("_")
    return name[:-1] if in_place else name


def _in_place(node: torch.fx.Node) -> bool:
    """Whether a function or method call writes its result into its first argument (inplace=True,
    or a trailing underscore)."""
    name = _call_name(node)
    if name.endswith("_") and not name.startswith("_"):
        return True
    if node.op != "call_function":
        return False
    if node.target is operator.setitem:  # y[index] = value writes into y
        return True
    try:
        arguments = inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments
    except (TypeError, ValueError):  # a builtin without a Python signature, or arguments it would refuse
        return node.kwargs.get("inplace") is True
    return arguments.get("inplace") is True


def _overwrites(node: torch.fx.Node, bounds: dict, graph_module: torch.fx.GraphModule) -> None:
    """An in-place call replaces its first argument's value by its result, and later uses of that
    argument's node see the result: the node's bound becomes the larger of the two.  Where that
    raises it, a value taken from the argument before the call may be a view of it (a reshape, a
    slice, an Identity module) and change too; that is not followed: no finite bound then.

    The argument may itself be a view of another value, which the call then changes too.  Where the
    view holds all of that value's entries, each once (a reshape, a permutation, an Identity or an
    eval-mode Dropout, an earlier in-place call: _whole_view_source), the value's new entries are
    the result's, and its bound is raised the same way, and so on up the views (a BatchNorm, then
    an Identity, then an in-place activation, as timm's BatchNormAct2d computes).  A partial view (a
    slice) is not followed: no finite bound then."""
    target = node.args[0] if node.args else None
    if not (isinstance(target, torch.fx.Node) and target in bounds) or bounds[node] <= bounds[target]:
        return
    raised, child = bounds[node], node
    while True:
        if bounds[target] < raised:
            # its users already bounded came before the call: a view among them changes too
            views = [user.name for user in target.users if user is not child and user in bounds
                     and _may_alias(user, graph_module) and _read_from(user, node, graph_module)]
            if views:
                raise _Unsupported(f"{node.name}: an in-place call that can raise {target.name}'s constant after "
                                   f"{', '.join(views)} took a value from it that may share its memory")
            bounds[target] = raised
        if not _may_alias(target, graph_module):
            return
        source = _whole_view_source(target, graph_module)
        if source is None:
            raise _Unsupported(f"{node.name}: an in-place call that can raise {target.name}'s constant after "
                               f"{target.name}'s own source took a value from it that may share its memory")
        if source not in bounds:
            return
        child, target = target, source


def _read_from(view: torch.fx.Node, call: torch.fx.Node, graph_module: torch.fx.GraphModule) -> bool:
    """Whether the view's memory is read at the in-place call or after it: by the call, or by a user
    of the view (or of a view of it, and so on) that comes no earlier in the graph.  A view read only
    before the call (y[:, :2] *= 3 takes y[:, :2], multiplies it, and writes it back) sees nothing
    the call changes."""
    order = graph_module.graph.__dict__.get("_lipfast_order")
    if order is None or call not in order:
        order = graph_module.graph.__dict__["_lipfast_order"] = {n: i for i, n in enumerate(graph_module.graph.nodes)}
    return any(user not in order or order[user] >= order[call]
               for _, user in _users_through_views(view, lambda value, user: _may_alias(user, graph_module)))


def _users_through_views(x: torch.fx.Node, views: Callable[[torch.fx.Node, torch.fx.Node], bool]):
    """(value, user) for every user of x, and of every user that views(value, user) says is a view
    of its value, and so on down (a user of several of them once with each)."""
    done, pending = {x}, [x]
    while pending:
        value = pending.pop()
        for user in value.users:
            yield value, user
            if user not in done and views(value, user):
                done.add(user)
                pending.append(user)


def _whole_view_source(node: torch.fx.Node, graph_module: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The value whose entries node's value holds, all of them, each once, when node may be a view
    of it: node's first argument for a reshape or permutation (_SHAPE_ONLY_*), an Identity, Flatten,
    Unflatten or eval-mode Dropout module or F.dropout, and an in-place call (which returns its
    argument); None for anything else (a slice, an expand, a module lipfast does not know)."""
    source = node.args[0] if node.args else None
    if not isinstance(source, torch.fx.Node):
        return None
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        if isinstance(module, tuple(_REGISTRY)) or not _computes_as_torch_layer(module):
            return None
        whole = isinstance(module, (*_IDENTITIES, nn.Flatten, nn.Unflatten)) or getattr(module, "inplace", False) is True
    elif node.op == "call_method":
        whole = node.target in _SHAPE_ONLY_METHODS or _in_place(node)
    elif node.op == "call_function":
        whole = node.target in _SHAPE_ONLY_FUNCTIONS or _in_place(node) or (
            node.target is F.dropout and _dropout_arguments(node)[1] is False)
    else:
        whole = False
    return source if whole else None


#: functions whose result may share its input's memory (a view, or the input itself); methods: _util.VIEW_OPERATIONS
_ALIASING_FUNCTIONS = _SHAPE_ONLY_FUNCTIONS | _SELECTING_FUNCTIONS | {torch.broadcast_to, operator.getitem, getattr,
                                                                       F.dropout}


def _tensor_constants(traced: torch.fx.GraphModule) -> list[tuple[str, Tensor]]:
    """The tensors torch.fx kept as constants of the graph while tracing, in graph order."""
    found = []
    for node in traced.graph.nodes:
        if node.op == "get_attr" and re.fullmatch(r"_tensor_constant\d+", node.target):
            value = getattr(traced, node.target, None)
            if isinstance(value, Tensor):
                found.append((node.target, value))
    return found


def _mark_drawn_constants(traced: torch.fx.GraphModule, second: torch.fx.GraphModule) -> None:
    """torch.fx runs a call whose arguments are all known while tracing (torch.rand(2), 1 / self.std)
    and keeps its result as a constant of the graph: for a random call, one draw, where the model
    draws anew at every call.  The constants that differ between two traces are such draws; the
    nodes computed from them are recorded on the graph (_drawn), and no rule takes their values
    for the model's."""
    first, again = _tensor_constants(traced), _tensor_constants(second)
    drawn = {name for name, _ in first} if len(first) != len(again) else {
        name for (name, a), (_, b) in zip(first, again) if not (a.shape == b.shape and torch.equal(a, b))}
    nodes: set[torch.fx.Node] = set()
    for node in traced.graph.nodes:
        if (node.op == "get_attr" and node.target in drawn) or any(a in nodes for a in node.all_input_nodes):
            nodes.add(node)
    traced._lipfast_drawn = nodes


def _drawn(node) -> bool:
    """Whether a graph value is computed from a random draw that tracing kept as a constant."""
    return isinstance(node, torch.fx.Node) and node in getattr(node.graph.owning_module, "_lipfast_drawn", ())


def _scaling_tensors(traced: torch.fx.GraphModule, depends: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """The constant tensors that scale (multiply, divide, matrix-multiply, contract by einsum, weight
    a lerp) an input-dependent one: their values set the product's constant (_tensor_scale,
    _product_bound, _einsum_bound, _lerp_bound); and the conditions of
    where and masked_fill that do not depend on the input (_selected_bound counts copies on them)."""
    found = set()
    for node in traced.graph.nodes:
        name = _call_name(node)
        if node.op in ("call_function", "call_method") and name in _PRODUCT_NAMES | _MATMUL_NAMES:
            tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
            if len(tensors) == 2 and sum(a in depends for a in tensors) == 1:
                found.update(a for a in tensors if a not in depends)
        elif (node.target in (torch.where, torch.masked_fill) or (node.op == "call_method" and _rule_name(node) in (
                "where", "masked_fill"))) and len(node.args) + len(node.kwargs) == 3:
            arguments = _selection_arguments(node)
            condition = arguments.get("mask", arguments.get("condition"))
            if isinstance(condition, torch.fx.Node) and condition not in depends:  # its copies counted on the mask
                found.add(condition)
        elif node.op in ("call_function", "call_method") and name in _AFFINE_PRODUCTS:
            factors = [a for a in [*node.args[1:3], *(node.kwargs.get(k) for k in _AFFINE_PRODUCTS[name][1:])]
                       if isinstance(a, torch.fx.Node)]  # (input, a, b): the product's factors
            if len(factors) == 2 and sum(a in depends for a in factors) == 1:
                found.update(a for a in factors if a not in depends)
        elif node.target in _EINSUM_LIKE or (node.op == "call_method" and name in _EINSUM_LIKE_METHODS):
            tensors = _nodes_in((node.args, node.kwargs))  # the constants an einsum contracts with x
            if any(a in depends for a in tensors):
                found.update(a for a in tensors if a not in depends)
        elif node.target is operator.getitem and len(node.args) == 2 and node.args[0] in depends:
            # index tensors computed from constants (x[:, a[:, None], b]): _index_copies counts on them
            found.update(a for a in _nodes_in(node.args[1]) if a not in depends and a.meta.get("type") is not int)
        elif node.target is torch.lerp or (node.op == "call_method" and _rule_name(node) == "lerp"):
            weight = (_lerp_arguments(node) or {}).get("weight")
            if isinstance(weight, torch.fx.Node) and weight not in depends:
                found.add(weight)
    return found


def _propagate(traced: torch.fx.GraphModule, example: Tensor, weights: set) -> dict:
    """Runs the traced graph on the example in eval mode, recording every node's shape (the shape
    propagation the size rules read) and returning the values of `weights` (weights the forward
    computes from parameters).  Those come from a second run too, and one whose value differs
    between the two (a random weight) is returned as None: one draw bounds nothing."""
    with _util.eval_mode(traced), torch.no_grad():
        propagation = torch.fx.passes.shape_prop.ShapeProp(traced)
        propagation.garbage_collect_values = not weights  # keep the values only when some are wanted
        propagation.propagate(example)
        if not weights:
            return {}
        again = torch.fx.Interpreter(traced, garbage_collect_values=False)
        again.run(example)
    values = {}
    for node in weights:
        first, second = propagation.env.get(node), again.env.get(node)
        same = isinstance(first, Tensor) and isinstance(second, Tensor) and torch.equal(first, second)
        values[node] = first if same else None
    return values


def _may_alias(node: torch.fx.Node, graph_module: torch.fx.GraphModule) -> bool:
    """Whether node's value may share memory with its input: a view or the input itself (an
    in-place call, an Identity or eval-mode Dropout module, a module lipfast does not know).  A
    size read (x.shape, x.size()) holds no entries."""
    if _reads_size(node):
        return False
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        return _util.may_share_memory(module) or isinstance(module, tuple(_REGISTRY)) or \
            not _computes_as_torch_layer(module)
    if node.op == "call_method":
        return node.target in _util.VIEW_OPERATIONS or _in_place(node)
    if node.op == "call_function":
        return node.target in _ALIASING_FUNCTIONS or _in_place(node)
    return False


def _constant_integers(part) -> Tensor | None:
    """The value of a graph node that is an integer or boolean tensor constant of the model
    (torch.tensor([...]) in the forward, which torch.fx keeps as an attribute, or a stored one)."""
    value = _stored_value(part)
    if value is None or _drawn(part) or not isinstance(value, Tensor) or value.is_floating_point() or value.is_complex():
        return None
    return value


def _literal_index(part):
    """A 1-D index tensor that is a constant of the model as the list of ints it selects (a boolean
    mask: its true positions); anything else as it is."""
    value = _constant_integers(part)
    if value is None or value.dim() != 1:
        return part
    return value.nonzero().flatten().tolist() if value.dtype == torch.bool else value.tolist()


def _gathered_copies(node: torch.fx.Node, name: str) -> int:
    """The most times torch.gather(x, dim, index) or torch.index_select(x, dim, index) (function or
    method) takes one entry of x, for an index that is a constant of the model: each output entry is
    one entry of x (neither accepts negative indices), so ‖Δy‖^2 <= copies ‖Δx‖^2."""
    names = ("dim", "index") if node.op == "call_method" else ("input", "dim", "index")
    arguments = {**dict(zip(names, node.args[1:] if node.op == "call_method" else node.args)), **node.kwargs}
    dim, index = arguments.get("dim"), _constant_integers(arguments.get("index"))
    if index is None or index.dtype == torch.bool or not isinstance(dim, int) or isinstance(dim, bool):
        raise _Unsupported(f"{node.name}: {name} with an index that is not a stored constant of the model (computed in the "
                           "forward, its picks may jump)")
    if index.numel() == 0:
        return 0
    if name == "index_select":
        return int(torch.unique(index.flatten(), return_counts=True)[1].max())
    # gather: the entry taken at a position is x at that position with its dim coordinate replaced
    # by the index there: count the values within each fiber of the index along dim
    fibers = index.movedim(dim, -1).reshape(-1, index.shape[dim]).long()
    keys = torch.arange(fibers.shape[0]).unsqueeze(1) * (int(fibers.max()) + 1) + fibers
    return int(torch.unique(keys.flatten(), return_counts=True)[1].max())


def _advanced_index_copies(parts: tuple, values: dict, shape: tuple[int, ...]) -> int | None:
    """How many times x[parts] holds one entry of x (x of the given shape) at most, exactly, where
    its tensor and list indices are constants (stored, or values the forward computes from
    constants alone): they are broadcast together, and the most times one tuple of positions
    (negative ones taken modulo the dim's size) appears is the count; ints, slices and None select
    distinct entries.  None where some index is not such a constant, or with an Ellipsis."""
    dim, advanced = 0, []
    for part in parts:
        if part is None:
            continue
        if isinstance(part, (int, slice)) and not isinstance(part, bool):
            dim += 1
            continue
        if isinstance(part, torch.fx.Node) and part.meta.get("type") is int:
            dim += 1
            continue
        if isinstance(part, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in part):
            value = torch.tensor(part, dtype=torch.int64)
        elif isinstance(part, torch.fx.Node):
            value = _constant_integers(part)
            if value is None and not _drawn(part) and isinstance(values.get(part), Tensor):
                value = values[part]
            if value is None or value.is_floating_point() or value.is_complex():
                return None
        else:
            return None
        value = value.detach().cpu()
        if value.dtype == torch.bool:  # a mask over as many dims as it has: the positions it sets
            if value.dim() == 0:
                return None
            for column in value.nonzero().unbind(1):
                advanced.append((dim, column))
                dim += 1
            continue
        advanced.append((dim, value.long()))
        dim += 1
    if not advanced:
        return 1
    if dim > len(shape):
        return None
    try:
        broadcast = torch.broadcast_tensors(*[t for _, t in advanced])
    except RuntimeError:
        return None
    if broadcast[0].numel() == 0:
        return 1
    tuples = torch.stack([t.reshape(-1) % shape[d] for (d, _), t in zip(advanced, broadcast)], dim=1)
    return int(torch.unique(tuples, dim=0, return_counts=True)[1].max())


def _index_copies(index, values: dict | None = None, shape: tuple[int, ...] | None = None) -> int:
    """An upper bound on how many times x[index] holds one entry of x (fx's getitem): exactly
    _advanced_index_copies's where x's shape is known and every tensor index is a constant; else 1
    for ints, slices, None and Ellipsis (a selection of distinct entries), a list of ints may name
    one entry several times, and the lists of one index, broadcast together, at most the product of
    their counts.  A tensor index that is no constant is not followed."""
    parts = index if isinstance(index, tuple) else (index,)
    if shape is not None and Ellipsis not in parts:
        exact = _advanced_index_copies(tuple(map(_literal_index, parts)), values or {}, shape)
        if exact is not None:
            return exact
    copies = 1
    for part in map(_literal_index, parts):
        if isinstance(part, (list, tuple)):
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in part):
                raise _Unsupported(f"an index {part!r} that is not a list of ints")
            # an entry is named by i >= 0 or by i - size < 0: without the size, count both signs together
            counts: dict[int, int] = {}
            for i in part:
                counts[i] = counts.get(i, 0) + 1
            same_sign = all(i >= 0 for i in part) or all(i < 0 for i in part)
            copies *= max(counts.values(), default=1) if same_sign else len(part)
        elif isinstance(part, torch.fx.Node):
            if part.meta.get("type") is not int:  # an int computed in the graph selects; a tensor may repeat
                raise _Unsupported(f"indexing with {part.name}, not known to be an int")
        elif not (part is None or part is Ellipsis or isinstance(part, (int, slice))):
            raise _Unsupported(f"an index {part!r}")
    return copies


def _needs_sizes(node: torch.fx.Node) -> bool:
    """Whether node's rule reads sizes or types that only a forward through the graph tells."""
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target is operator.getitem:  # (index lists: their copies are counted on the source's shape)
        parts = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], tuple) else node.args[1:]
        return bool(_nodes_in(node.args[1:])) or any(isinstance(p, list) for p in parts)
    if node.target in _FUNCTIONAL_LAYERS:
        return True  # a conv's norm depends on its input's size
    name = _rule_name(node)
    if name in _SUM_NAMES | _PRODUCT_NAMES and \
            len(_nodes_in((node.args, node.kwargs))) > 1:
        return True  # two tensors: one may be broadcast to the other's shape
    if _extremum_form(node) == "pairwise":
        return True
    if name in ("where", "masked_fill"):
        return True  # an operand may be broadcast to the result's shape
    if name in ("cumsum", "diff", "norm") or node.target in _VECTOR_NORMS:
        return True  # the length along a dim, or the size of the slices
    if node.target is operator.setitem:
        return True  # what the index selects, and the value's shape
    if node.target in (torch.cat, torch.stack) and len(_nodes_in((node.args, node.kwargs))) > 1:
        return True  # branches of disjoint entries of one value (_disjoint_functions): the entries
    if node.target in _EINSUM_LIKE or node.target is torch.lerp or \
            (node.op == "call_method" and name in _EINSUM_LIKE_METHODS | {"lerp"}):
        return True  # the operands' dims (einsum's letters, broadcasting)
    if node.op == "call_method" and node.target in _CONVERSION_METHODS and \
            (node.target == "type_as" or _nodes_in((node.args[1:], node.kwargs))):
        return True  # the type of another tensor
    if node.op == "call_method":
        return (node.target in _REPLICATING_METHODS or node.target in _REDUCING_METHODS or node.target == "unfold"
                or node.target in _PAIRWISE_EXTREMA_METHODS or node.target == "log_softmax")
    return (node.target in _LOG_SOFTMAX or node.target in _REPLICATING_FUNCTIONS or node.target in _REDUCING_FUNCTIONS
            or node.target in _FUNCTIONAL_POOLS or node.target in _FUNCTIONAL_MAX_POOLS
            or node.target in _PAIRWISE_EXTREMA)


#: conversions whose type may be another than a float's: to an integer or boolean type they round,
#: and jump (no constant); between floating types they are the identity in exact arithmetic
_CONVERSION_METHODS = frozenset({"to", "type", "type_as"})


def _converted_dtype(node: torch.fx.Node) -> torch.dtype | None:
    """The dtype a to / type / type_as call gives: the one it names (a dtype, or a tensor type's name),
    the input's own where it names none (to a device, say), else the shape propagation's record of
    its output (a tensor's type); None where none of these tells."""
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "dtype"):
        return meta.dtype
    named = [v for v in (*node.args[1:], *node.kwargs.values()) if isinstance(v, (torch.dtype, str, torch.fx.Node))]
    for value in named:
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and value.endswith("Tensor"):
            try:
                return torch.empty(0).type(value).dtype
            except (TypeError, ValueError, RuntimeError):
                return None
    if node.target == "type_as" or any(isinstance(v, torch.fx.Node) for v in named):
        return None  # the type of another tensor: only the propagation knows it
    source = node.args[0] if node.args else None
    if node.target == "type" and len(node.args) + len(node.kwargs) == 1:
        return None  # x.type(): the name of its type, a string
    meta = source.meta.get("tensor_meta") if isinstance(source, torch.fx.Node) else None
    return meta.dtype if meta is not None and hasattr(meta, "dtype") else torch.get_default_dtype()


def _shape(node: torch.fx.Node, value) -> tuple[int, ...]:
    """The shape of a graph value that node's rule needs (no finite bound without it)."""
    shape = _propagated_shape(value)
    if shape is None:
        raise _Unsupported(f"{node.name}: the sizes of {node.target} are not known")
    return shape


def _copies(node: torch.fx.Node) -> Fraction:
    """numel(out) / numel(in) of a node whose input is its first argument: for an op that copies
    every entry the same number of times (expand, repeat, ...), the number of copies, so ‖Δy‖^2 =
    copies ‖Δx‖^2; for a mean over m entries per output, 1 / m, the square of its norm
    (‖(1/m) sum of m entries‖ <= ‖those entries‖ / sqrt(m), equal for equal entries)."""
    source = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    out, inp = math.prod(_shape(node, node)), math.prod(_shape(node, source))
    return Fraction(out, inp) if inp else Fraction(0)


def _unfolded_copies(node: torch.fx.Node) -> int:
    """x.unfold(dimension, size, step): the windows x[.., w step : w step + size, ..] side by side, so
    each entry is copied into every window that holds it (and one past the last window into none):
    ‖Δy‖^2 <= c ‖Δx‖^2 with c the largest number of windows holding one position, equal for a change
    at that position alone.  Returns c."""
    arguments = _size_values({**dict(zip(("dimension", "size", "step"), node.args[1:])), **node.kwargs})
    if arguments is None or set(arguments) != {"dimension", "size", "step"} or \
            not all(isinstance(v, int) and not isinstance(v, bool) for v in arguments.values()):
        raise _Unsupported(f"{node.name}: unfold with arguments computed in the graph")
    shape = _shape(node, node.args[0])
    dimension, size, step = arguments["dimension"], arguments["size"], arguments["step"]
    if not -len(shape) <= dimension < len(shape) or dimension % len(shape) == 0 or size < 1 or step < 1 or \
            size > shape[dimension]:
        raise _Unsupported(f"{node.name}: unfold over dim {dimension} (the batch dim, or none of the input's)")
    n = shape[dimension]
    return _window_counts(n, size, step, 0, 1, (n - size) // step + 1)


def _function_bound(node: torch.fx.Node, bounds: dict, values: dict | None = None) -> float:
    target = node.target
    name = _rule_name(node) if node.op == "call_method" else getattr(target, "__name__", str(target))
    tensor_args = _passed((node.args, node.kwargs), bounds)
    if all(bounds[a] == 0 for a in tensor_args):
        return 0.0  # a function of constants only (sizes, buffers, arithmetic on them)
    first = bounds[tensor_args[0]]
    if target is operator.setitem:
        return _assigned_bound(node, bounds)
    if target in _SCATTERS:
        return _scattered_bound(node, bounds)
    if target in (operator.add, torch.add, operator.sub, torch.sub) or name in _SUM_NAMES:
        # f(x) ± alpha g(x): Lip <= Lip(f) + |alpha| Lip(g) (so f + f gives 2 Lip(f)); a constant term adds
        # nothing; an operand broadcast to the result's shape counts once per copy of each entry
        alpha = node.kwargs.get("alpha", 1)
        if not isinstance(alpha, (int, float)):
            raise _Unsupported(f"{node.name}: {name} with alpha={alpha!r}")
        operands = list(node.args[:2]) + [node.kwargs[k] for k in ("input", "other") if k in node.kwargs]
        alone = len(_nodes_in(operands)) < 2  # a tensor and a number: nothing is broadcast
        terms = [_product(bounds[a], abs(alpha) if i == 1 else 1.0, 1.0 if alone else _sqrt_up(_broadcast_copies(node, a)))
                 for i, a in enumerate(operands) if isinstance(a, torch.fx.Node) and a in bounds and bounds[a] > 0]
        if _disjoint_functions([a for a in operands if isinstance(a, torch.fx.Node)], bounds):
            # functions of disjoint entries of one value (_disjoint_functions): in quadrature
            return _quadrature_up(terms)
        bound = _sum_up(terms)
        difference = _shifted_difference(node, bounds)
        if difference is not None:  # x[..., 1:] - x[..., :-1]: a finite difference, at most 2 where the sum gives 2
            source, norm = difference
            bound = min(_product(bounds[source], norm), bound)
        return _with_combination(node, bounds, values or {}, bound)  # one value along several paths
    if target in (operator.mul, torch.mul, operator.truediv, torch.div) or name in _PRODUCT_NAMES:
        operands = [a for a in node.args if isinstance(a, torch.fx.Node) and a in bounds]
        if len(operands) > 1 and all(bounds[a] > 0 for a in operands):
            gated = _self_gated(node, bounds) if target in (operator.mul, torch.mul) or name in ("mul", "__mul__") \
                else _softsign_bound(node, bounds)
            if gated is not None:
                return gated
            if target in (operator.truediv, torch.div) or name in ("div", "__truediv__", "truediv"):
                raise _Unsupported(f"{node.name}: dividing by the input has no global Lipschitz constant")
            raise _Unsupported(f"{node.name}: a product of two input-dependent tensors has no global Lipschitz constant")
        if len(operands) == 2 and not node.kwargs:  # by a constant tensor: (x - mean) / std, say
            x, c = operands if bounds[operands[0]] > 0 else operands[::-1]
            divide = target in (operator.truediv, torch.div) or name in ("div", "__truediv__")
            if divide and node.args[0] is not x:
                raise _Unsupported(f"{node.name}: dividing by the input has no global Lipschitz constant")
            scalar = _size_scalar(c)
            if scalar is not None:  # by a number computed from sizes: x / x.size(-1), say
                if divide and scalar == 0:
                    raise _Unsupported(f"{node.name}: dividing by 0")
                return _product(bounds[x], _float_up(1 / abs(Fraction(scalar))) if divide else abs(scalar))
            return _product(bounds[x], _tensor_scale(node, x, None if _drawn(c) else (values or {}).get(c), divide))
        other = [a for a in node.args if not isinstance(a, torch.fx.Node)]
        if not other or not isinstance(other[0], (int, float)):
            raise _Unsupported(f"{node.name}: scaling by a tensor that is not a known constant")
        if target in (operator.mul, torch.mul) or name in ("mul", "__mul__"):
            return _product(first, abs(other[0]))
        if not (isinstance(node.args[0], torch.fx.Node) and other[0] != 0):
            raise _Unsupported(f"{node.name}: dividing by the input has no global Lipschitz constant")
        if node.kwargs.get("rounding_mode") is not None:  # floor or trunc: steps, no constant
            raise _Unsupported(f"{node.name}: division with rounding_mode={node.kwargs['rounding_mode']!r}")
        return _float_up(Fraction(first) / abs(Fraction(other[0]))) if math.isfinite(first) else first  # x / c
    if target in (operator.matmul, torch.matmul, torch.mm, torch.mv, torch.bmm) or \
            (node.op == "call_method" and name in _MATMUL_NAMES):
        return _matmul_bound(node, bounds, values or {})
    if target in (torch.addmm, torch.addmv, torch.baddbmm) or (node.op == "call_method" and name in _AFFINE_PRODUCTS):
        return _affine_product_bound(node, bounds, values or {})
    if target in _EINSUM_LIKE or (node.op == "call_method" and name in _EINSUM_LIKE_METHODS):
        return _einsum_bound(node, bounds, values or {})
    if target is torch.lerp or (node.op == "call_method" and name == "lerp"):
        # (x.lerp(2 * x, w): one value along both paths)
        return _with_combination(node, bounds, values or {}, _lerp_bound(node, bounds, values or {}))
    if target in (torch.cat, torch.stack):
        source = _max_min_source(node)
        if source is not None:  # MaxMin written out: (max(a, b), min(a, b)) of disjoint pieces of one tensor
            return bounds[source] if source in bounds else math.inf
        operands = _passed((node.args, node.kwargs), bounds)
        if _disjoint_functions(operands, bounds):  # functions of disjoint entries of one value: the largest
            return max(bounds[a] for a in operands)
        return _concatenated((node.args, node.kwargs), bounds)  # concatenated branches
    if (target in _PAIRWISE_EXTREMA or (node.op == "call_method" and name in _PAIRWISE_EXTREMA_METHODS)
            or _extremum_form(node) == "pairwise"):
        shape = _shape(node, node)
        for a in tensor_args:  # a broadcast operand would count once per copy
            if bounds[a] > 0 and _shape(node, a) != shape:
                raise _Unsupported(f"{node.name}: {name} of an input-dependent operand broadcast to a larger shape")
        return _concatenated((node.args, node.kwargs), bounds)
    if node.op == "call_method" and name in _CONVERSION_METHODS:
        dtype = _converted_dtype(node)
        if dtype is None:
            raise _Unsupported(f"{node.name}: the type that {name} converts to is not known")
        if not (dtype.is_floating_point or dtype.is_complex):
            raise _Unsupported(f"{node.name}: a conversion to {dtype} rounds to whole numbers: it jumps, no Lipschitz "
                               "constant")
    if target in _SHAPE_ONLY_FUNCTIONS or (node.op == "call_method" and name in _SHAPE_ONLY_METHODS):
        return first  # a permutation of the entries, or a conversion between floating types: norm 1
    if target is F.dropout:
        return _product(first, _dropout_scale(node))
    if target in _SELECTING_FUNCTIONS or (node.op == "call_method" and name in _SELECTING_METHODS):
        return first  # distinct entries, each once: norm <= 1 (fx's getitem then picks a piece)
    if (target in _SORTS or (node.op == "call_method" and name in _SORT_METHODS) or _extremum_form(node)
            or _order_statistic_form(node)
            or target in _EXTREMA_REDUCTIONS or (node.op == "call_method" and name in _EXTREMA_REDUCTION_METHODS)):
        if _returns_pair(node) and any(user.target not in (operator.getitem, getattr) for user in node.users):
            raise _Unsupported(f"{node.name}: the (values, indices) of a {name} used whole: its indices jump")
        return first  # its values: norm <= 1 (its indices: _sort_output)
    if (target is operator.getitem or target is getattr) and (output := _sort_output(node)) is not None:
        if output != "values":
            raise _Unsupported(f"{node.name}: the indices that {node.args[0].name} returns jump: no Lipschitz constant")
        return first
    if target in (torch.where, torch.masked_fill) or (node.op == "call_method" and name in ("where", "masked_fill")):
        return _with_combination(node, bounds, values or {}, _selected_bound(node, bounds, values or {}))
    if target in (torch.gather, torch.index_select) or (node.op == "call_method" and name in ("gather", "index_select")):
        return _product(first, _sqrt_up(_gathered_copies(node, name)))
    if target is operator.getitem:
        # a selection of entries, each taken at most `copies` times: ‖Δy‖^2 <= copies ‖Δx‖^2
        source = node.args[0]
        shape = _propagated_shape(source) if isinstance(source, torch.fx.Node) else None
        return _product(first, _sqrt_up(_index_copies(node.args[1], values, shape)))
    if target in _REPLICATING_FUNCTIONS or (node.op == "call_method" and name in _REPLICATING_METHODS):
        return _product(first, _sqrt_up(_copies(node)))
    if node.op == "call_method" and name == "unfold":
        return _product(first, _sqrt_up(_unfolded_copies(node)))
    if target in _REDUCING_FUNCTIONS or (node.op == "call_method" and name in _REDUCING_METHODS):
        dtype = node.kwargs.get("dtype")
        if isinstance(dtype, torch.dtype) and not (dtype.is_floating_point or dtype.is_complex):
            raise _Unsupported(f"{node.name}: a {name} in {dtype} rounds its entries to whole numbers: it jumps, no "
                               "Lipschitz constant")
        reduction = _REDUCING_FUNCTIONS.get(target, name)
        ratio = _copies(node)  # 1 / m
        bound = _product(first, _sqrt_up(ratio) if reduction == "mean" else (_sqrt_up(1 / ratio) if ratio else 0.0))
        weighted = _weighted_sum_bound(node, bounds, values or {}, reduction == "mean")
        return bound if weighted is None else min(bound, weighted)
    if target is F.pad and node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant") == "constant":
        return first  # x with a constant around it: an isometry, plus a constant
    if target in _FUNCTIONAL_POOLS or target in _FUNCTIONAL_MAX_POOLS:
        # bounded as the module form is, on the input size the shape propagation recorded
        if not (node.args and isinstance(node.args[0], torch.fx.Node)):
            raise _Unsupported(f"{node.name}: {name} with its input passed by keyword")
        bicubic = target is F.interpolate and \
            node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest") == "bicubic"
        shape = _shape(node, node.args[0])
        if _spatial_dims(target) is not None and len(shape) - 1 == _spatial_dims(target):
            raise _Unsupported(f"{node.name}: {name} called on an input of shape {tuple(shape)} with no batch dim (it "
                               "takes the example's batch dim for its channels)")
        # arguments computed from sizes (interpolate(y, size=x.shape[-2:]), as feature pyramids do):
        # the numbers they are for this input shape
        resolved = _size_values((node.args[1:], node.kwargs))
        if resolved is None:
            raise _Unsupported(f"{node.name}: {name} with arguments computed in the graph")
        args, kwargs = resolved
        if target in _FUNCTIONAL_MAX_POOLS:
            if _returns_pair(node) and any(user.target not in (operator.getitem, getattr) for user in node.users):
                raise _Unsupported(f"{node.name}: the (values, indices) of a {name} used whole: its indices jump")
            kind, names = _FUNCTIONAL_MAX_POOLS[target]
            module = kind(**dict(zip(names, args)), **kwargs)
            return _product(first, _layer_constant(node.name, module, shape[1:], 1e-3)[1])
        # (a pad that copies entries: its constant value, if any, plays no part)
        if bicubic:  # weights of both signs: only as a product over the dims (_separable_bound)
            separable = _separable_bound(lambda t: target(t, *args, **kwargs), shape[1:])
            if separable is None:
                raise _Unsupported(f"{node.name}: bicubic interpolation on this input (weights of both signs)")
            return _product(first, separable[1])
        return _product(first, _linear_pool_bound(lambda t: target(t, *args, **kwargs), shape[1:])[1])
    if node.op == "call_method" and name in ("size", "dim", "numel"):
        return 0.0
    if _reads_shape_only(node):  # a tensor made in x's shape: its values do not depend on x's
        if any(bounds.get(a, 0.0) > 0 for a in _nodes_in((node.args[1:], node.kwargs))):
            raise _Unsupported(f"{node.name}: {name} filled with a value that depends on the input")
        return 0.0
    if target is getattr and len(node.args) == 2:  # x.shape and the like: constants; x.T: a permutation
        if node.args[1] in ("shape", "ndim", "dtype", "device", "layout", "is_cuda", "requires_grad"):
            return 0.0
        if node.args[1] in ("T", "mT", "H", "mH", "data"):
            return first
    if target in _FUNCTION_SLOPES:
        return _product(first, _FUNCTION_SLOPES[target])
    if target in (torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max) or \
            (node.op == "call_method" and name in ("clamp", "clip", "clamp_min", "clamp_max")):
        # the nearest point of an interval, entry by entry: 1-Lipschitz, for bounds that are constants
        if any(bounds.get(a, 0) > 0 for a in _nodes_in((node.args[1:], node.kwargs))):
            raise _Unsupported(f"{node.name}: {name} with bounds that depend on the input")
        return first
    if target in _LOG_SOFTMAX or (node.op == "call_method" and name == "log_softmax"):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        try:
            return _product(first, _log_softmax_slope(dim, _shape(node, node.args[0])))
        except _Unsupported as error:
            raise _Unsupported(f"{node.name}: {error}") from None
    if target in _NO_CONSTANT_FUNCTIONS:
        raise _Unsupported(f"{node.name}: {_NO_CONSTANT_FUNCTIONS[target]}: no global Lipschitz constant")
    if target is F.instance_norm:
        raise _Unsupported(f"{node.name}: instance_norm (with the input's own statistics, or statistics computed "
                           "in the forward): no global Lipschitz constant")
    if node.op == "call_method" and name in _METHOD_SLOPES:
        return _product(first, _METHOD_SLOPES[name])
    if target in (F.threshold, torch.threshold, F.threshold_, torch.threshold_):
        # (input, threshold, value): y = x above threshold, value elsewhere; a jump unless value ==
        # threshold, where y = max(x, threshold) is 1-Lipschitz
        padded = list(node.args) + [None] * 2
        level, value = node.kwargs.get("threshold", padded[1]), node.kwargs.get("value", padded[2])
        if not (_number(level) and _number(value)):
            raise _Unsupported(f"{node.name}: threshold with a threshold or value that is not a number")
        if level != value:
            raise _Unsupported(f"{node.name}: threshold jumps from {value!r} to {level!r}: no Lipschitz constant")
        return first
    if target in (F.rrelu, torch.rrelu, F.rrelu_, torch.rrelu_):
        # leaky with a slope drawn from [lower, upper] (training), or their mean (eval): as nn.RReLU
        lower = node.kwargs.get("lower", node.args[1] if len(node.args) > 1 else 1 / 8)
        upper = node.kwargs.get("upper", node.args[2] if len(node.args) > 2 else 1 / 3)
        if not (_number(lower) and _number(upper)):
            raise _Unsupported(f"{node.name}: rrelu with bounds that are not numbers")
        return _product(first, max(1.0, abs(lower), abs(upper)))
    if target in (F.leaky_relu,):
        slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
        return _product(first, max(1.0, abs(slope)))
    if target is F.gelu:
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return _product(first, _gelu_slope(approximate))
    if target is F.silu:
        return _product(first, _silu_slope())
    if target is F.mish:
        return _product(first, _mish_slope())
    if target is F.celu:  # slope 1 above 0, e^(x / alpha) below: at most 1 for alpha > 0
        alpha = node.kwargs.get("alpha", node.args[1] if len(node.args) > 1 else 1.0)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
            raise _Unsupported(f"{node.name}: celu with alpha={alpha!r}")
        return first
    if target is F.elu or target is torch._C._nn.elu:
        return _product(first, _elu_slope(node))
    if target is F.batch_norm:
        raise _Unsupported(f"{node.name}: batch_norm without stored running statistics (normalizing by the batch, "
                           "or by statistics computed from the input): no constant")
    if target in _FUNCTIONAL_LAYERS:
        raise _Unsupported(f"{node.name}: {name} with a weight that depends on the input, or with arguments "
                           "computed from it")
    if target in _MASKING_FUNCTIONS or (node.op == "call_method" and name in _MASKING_METHODS):
        return first
    if target is torch.repeat_interleave or (node.op == "call_method" and name == "repeat_interleave"):
        # every entry copied `repeats` times: ‖Δy‖^2 = repeats ‖Δx‖^2
        repeats = node.kwargs.get("repeats", node.args[1] if len(node.args) > 1 else None)
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 0:
            raise _Unsupported(f"{node.name}: repeat_interleave with repeats={repeats!r} (a number of copies "
                               "per entry is followed, not a tensor of them)")
        return _product(first, _sqrt_up(repeats))
    if target is torch.cumsum or (node.op == "call_method" and name == "cumsum"):
        return _product(first, _cumsum_norm(node))
    if target is torch.diff or (node.op == "call_method" and name == "diff"):
        return _product(first, _diff_norm(node, bounds))
    if target in _VECTOR_NORMS or (node.op == "call_method" and name == "norm"):
        return _product(first, _vector_norm_slope(node))
    if target in (torch.logsumexp, torch.special.logsumexp) or (node.op == "call_method" and name == "logsumexp"):
        # per slice the gradient of log sum exp is softmax, of 2-norm <= its 1-norm = 1; the slices
        # are disjoint: norm <= 1
        return first
    raise _Unsupported(f"{node.name}: no Lipschitz rule for {name}")


#: base with a part replaced by src, as core ATen writes an item assignment: (base, src, dim, ...)
_SCATTERS = {torch.slice_scatter, torch.select_scatter, torch.diagonal_scatter}


def _scattered_bound(node: torch.fx.Node, bounds: dict) -> float:
    """torch.slice_scatter / select_scatter / diagonal_scatter(base, src, ...): base with the part
    that slice (select, diagonal) takes replaced by src, entry for entry (src has that part's shape:
    no copies).  Each output entry is one entry of base or one of src, each read at most once, so
    ‖Δy‖^2 <= ‖Δbase‖^2 + ‖Δsrc‖^2 and Lip <= sqrt(L_base^2 + L_src^2)."""
    arguments = {**dict(zip(("input", "src"), node.args)), **node.kwargs}
    base, src = arguments.get("input"), arguments.get("src")
    return _quadrature_up(bounds.get(v, 0.0) if isinstance(v, torch.fx.Node) else 0.0 for v in (base, src))


def _assigned_bound(node: torch.fx.Node, bounds: dict) -> float:
    """The constant of y after y[index] = value (operator.setitem; y's node takes it, _overwrites):
    each entry of the new y is an entry of the old y or one of value's, and broadcasting puts each
    entry of value into c = numel(y[index]) / numel(value) of them, so ‖Δy'‖^2 <= ‖Δy‖^2 + c ‖Δvalue‖^2
    and Lip <= sqrt(L_y^2 + c L_value^2).  The index must be basic (ints, slices, None, ...), and
    what it selects known for this input's shape."""
    y, index, value = node.args
    parts = index if isinstance(index, tuple) else (index,)
    resolved = _size_values(parts)
    if resolved is None or not all(p is None or p is Ellipsis or (isinstance(p, int) and not isinstance(p, bool))
                                   or (isinstance(p, slice) and all(v is None or isinstance(v, int)
                                                                    for v in (p.start, p.stop, p.step)))
                                   for p in resolved):
        raise _Unsupported(f"{node.name}: an item assignment at {index!r} (ints, slices, None and ... are followed)")
    graph_module = node.graph.owning_module
    if isinstance(value, torch.fx.Node) and value.op in ("call_function", "call_method"):
        # y[index] += w runs w's addition in place on the view y[index] (traced: out of place, then
        # written back); where w views y's memory too, that reads entries it has already written
        # (y[:, 1:] += y.transpose(1, 2)[:, :3]), which the graph does not compute
        taken = [a for a in value.all_input_nodes if a.target is operator.getitem and a.args[0] is y]
        base = _memory_base(y, graph_module)
        if taken and any(_memory_base(a, graph_module) is base for a in value.all_input_nodes if a not in taken):
            raise _Unsupported(f"{node.name}: an item assignment y[index] op= w with w a view of y's memory (in place, "
                               "it reads entries it has written)")
    written = bounds.get(value, 0.0) if isinstance(value, torch.fx.Node) else 0.0
    if written == 0:
        return bounds[y]  # a constant written in: y's own entries, fewer of them
    if math.isinf(written) or math.isinf(bounds[y]):
        return math.inf
    region = torch.empty(_shape(node, y), device="meta")[tuple(resolved)]
    copies = Fraction(region.numel(), math.prod(_shape(node, value)) or 1)
    return _sqrt_up(Fraction(bounds[y]) ** 2 + copies * Fraction(written) ** 2)


def _dim_length(node: torch.fx.Node, dim: object, what: str) -> int:
    """The length of node's input along dim (an int, negative counting from the end)."""
    shape = _shape(node, node.args[0])
    if not isinstance(dim, int) or isinstance(dim, bool) or not -len(shape) <= dim < len(shape):
        raise _Unsupported(f"{node.name}: {what} along dim={dim!r}")
    return shape[dim]


def _floating_result(node: torch.fx.Node, what: str) -> None:
    """Refuses a call asked for an integer result (dtype=...): it rounds, and jumps."""
    dtype = node.kwargs.get("dtype")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype.is_complex)):
        raise _Unsupported(f"{node.name}: a {what} in {dtype} rounds its entries to whole numbers: it jumps, no "
                           "Lipschitz constant")


def _cumsum_norm(node: torch.fx.Node) -> float:
    """‖L_n‖ for x.cumsum(dim) of length n along dim (L_n: lower triangular, all ones; each slice
    along dim is multiplied by it).  L_n^-1 = I - S (S the shift down), so (L_n L_nᵀ)^-1 = (I - S)ᵀ(I - S)
    is tridiagonal (2 on the diagonal but 1 in its last entry, -1 beside it), with eigenvalues
    4 sin^2((2k - 1) pi / (4n + 2)), k = 1..n; so ‖L_n‖ = 1 / (2 sin(pi / (4n + 2))).  The few
    roundings in evaluating it are covered by a relative 1e-12."""
    _floating_result(node, "cumsum")
    n = _dim_length(node, node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None), "cumsum")
    return 1 / (2 * math.sin(math.pi / (4 * n + 2))) * (1 + 1e-12)


def _diff_norm(node: torch.fx.Node, bounds: dict) -> float:
    """The norm of x.diff(n, dim, prepend, append) in x: n first differences along dim of x with
    prepend and append (constants) around it.  The first difference of a length-m signal, D_m
    ((m - 1) x m), has singular values 2 sin(k pi / (2m)), k = 1..m-1, so ‖D_m‖ = 2 cos(pi / (2m));
    x is m' = (the output's length) + n long with what is prepended and appended, and the map from
    x to the output is a part of D_(m'-n+1) ... D_m', of norm at most the product of theirs."""
    arguments = {**dict(zip(("input", "n", "dim", "prepend", "append"), node.args)), **node.kwargs}
    n, dim = arguments.get("n", 1), arguments.get("dim", -1)
    for extra in ("prepend", "append"):
        value = arguments.get(extra)
        if isinstance(value, torch.fx.Node) and bounds.get(value, 0) > 0:
            raise _Unsupported(f"{node.name}: diff with {extra} that depends on the input")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise _Unsupported(f"{node.name}: diff with n={n!r}")
    _dim_length(node, dim, "diff")
    total = _shape(node, node)[dim] + n
    norm = 1.0
    for m in range(total - n + 1, total + 1):
        norm *= 2 * math.cos(math.pi / (2 * m))
    return norm * (1 + 1e-12 * (n + 1))


def _vector_norm_slope(node: torch.fx.Node) -> float:
    """The constant of the p-norms of the slices (groups of m entries) that torch.norm,
    Tensor.norm, torch.linalg.vector_norm or torch.linalg.norm (ord=None only) take.  Per group,
    |‖u‖_p − ‖v‖_p| <= ‖u − v‖_p <= c ‖u − v‖_2, with c = 1 for p >= 2 (inf included) and c =
    m^(1/p − 1/2) for 1 <= p < 2; summed in squares over the disjoint groups, ‖Δy‖ <= c ‖Δx‖.  For
    p = -inf (the smallest |entry|), |min |u| − min |v|| <= ‖u − v‖_inf: c = 1.  Below 1, p gives no
    norm (|t|^p has no slope at 0), and matrix norms are not followed."""
    target = node.target
    key = _VECTOR_NORMS.get(target, "p")
    names = ("input", key, "dim", "keepdim") if target is not torch.norm else ("input", "p", "dim", "keepdim")
    arguments = {**dict(zip(names, node.args)), **node.kwargs}
    _floating_result(node, _call_name(node))
    default = None if target is torch.linalg.norm else (2 if target is torch.linalg.vector_norm else "fro")
    p = arguments.get(key, default)
    if target is torch.linalg.norm and p is not None:
        raise _Unsupported(f"{node.name}: linalg.norm with ord={p!r} (a matrix norm where dim names two dims)")
    if p in (None, "fro"):
        p = 2
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not (p >= 1 or p == -math.inf):
        raise _Unsupported(f"{node.name}: {_call_name(node)} with p={p!r} (no Lipschitz constant below p = 1)")
    if p >= 2 or p == -math.inf:
        return 1.0
    groups = math.prod(_shape(node, node))
    m = math.prod(_shape(node, node.args[0])) // groups if groups else 1
    return float(m) ** (1 / p - 0.5) * (1 + 1e-12)  # (one pow, off by an ulp or two)


def _scaled_source(node) -> tuple[torch.fx.Node, Fraction] | None:
    """(x, c) for a node computing c x with a number c (products and quotients by numbers, and
    negations, followed back); (node, 1) for any other node; None for what is no graph value.  A
    value that some call changes in place is where the walk stops: c times it is what is read."""
    factor = Fraction(1)
    while isinstance(node, torch.fx.Node) and node.op in ("call_function", "call_method") and \
            not _changed_in_place(node):
        name = _call_name(node)
        numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)]
        nodes = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if name in ("neg", "__neg__") and len(nodes) == 1 and not node.kwargs:
            factor, node = -factor, nodes[0]
        elif name in ("mul", "__mul__") and len(nodes) == 1 and len(numbers) == 1 and not node.kwargs:
            factor, node = factor * Fraction(numbers[0]), nodes[0]
        elif name in ("div", "truediv", "__truediv__") and len(node.args) == 2 and node.args[0] is (nodes or [None])[0] \
                and numbers and numbers[0] != 0 and not node.kwargs:
            factor, node = factor / Fraction(numbers[0]), nodes[0]
        else:
            break
    return (node, factor) if isinstance(node, torch.fx.Node) else None


def _elementwise_kind(node: torch.fx.Node) -> tuple[str, torch.fx.Node] | None:
    """(kind, input) of a call of sigmoid, hardsigmoid, relu6 (or hardtanh(0, 6)), tanh, softplus
    with beta 1 or erf, as a function, a method or a torch.nn module; None for anything else."""
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        if type(module) in (nn.Hardtanh, nn.ReLU6) and (module.min_val, module.max_val) == (0, 6):
            kind = "relu6"
        elif type(module) in (nn.Softplus,) and module.beta == 1:
            kind = "softplus"
        else:
            kind = {nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid", nn.Tanh: "tanh"}.get(type(module))
        return (kind, node.args[0]) if kind and len(node.args) == 1 and not node.kwargs else None
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    target, args, kwargs = node.target, node.args, node.kwargs
    name = _call_name(node)
    clamped = _clamp_interval(node)
    if clamped is not None:  # clamp(t, 0, 6), or two clamps, one to [0, ...) and one to (..., 6] (core ATen's hardswish)
        t, low, high = clamped
        inner = _clamp_interval(t) if not _changed_in_place(t, node) and len(t.users) == 1 else None
        if inner is not None and (low, high, inner[1], inner[2]) in ((None, 6, 0, None), (0, None, None, 6)):
            return "relu6", inner[0]
        return ("relu6", t) if (low, high) == (0, 6) else None
    if target in (torch.sigmoid, F.sigmoid, torch.special.expit) or (node.op == "call_method" and name == "sigmoid"):
        return ("sigmoid", args[0]) if len(args) == 1 and not kwargs else None
    if target in (torch.tanh, F.tanh) or (node.op == "call_method" and name == "tanh"):
        return ("tanh", args[0]) if len(args) == 1 and not kwargs else None
    if target in (torch.erf, torch.special.erf) or (node.op == "call_method" and name == "erf"):
        return ("erf", args[0]) if len(args) == 1 and not kwargs else None
    if target is F.softplus:  # (input, beta=1, threshold=20)
        beta = kwargs.get("beta", args[1] if len(args) > 1 else 1)
        return ("softplus", args[0]) if beta == 1 and not isinstance(beta, bool) else None
    try:
        bound = inspect.signature(target).bind(*args, **kwargs).arguments if node.op == "call_function" else None
    except (TypeError, ValueError):
        return None
    if bound is None:
        return None
    if target is F.hardsigmoid:
        return "hardsigmoid", args[0]
    if target is F.relu6 or (target is F.hardtanh and (bound.get("min_val", -1.0), bound.get("max_val", 1.0)) == (0, 6)):
        return "relu6", args[0]
    return None


def _clamp_interval(node) -> tuple[torch.fx.Node, object, object] | None:
    """(t, min, max) for clamp or clip of t (function or method; min and max numbers or None); None
    for anything else."""
    if not (_call_of(node, ("clamp", "clip"), (torch.clamp, torch.clip)) and node.args and
            isinstance(node.args[0], torch.fx.Node)) or len(node.args) > 3 or set(node.kwargs) - {"min", "max"}:
        return None
    low = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
    high = node.kwargs.get("max", node.args[2] if len(node.args) > 2 else None)
    if not all(v is None or _number(v) for v in (low, high)):
        return None
    return node.args[0], low, high


def _shifted(node: torch.fx.Node, reader: torch.fx.Node | None = None) -> tuple[torch.fx.Node, Fraction] | None:
    """(v, b) for a node computing v + b, b + v or v - b with a number b (alpha 1), and changed by no
    in-place call (but its reader's: relu6(x + 3, inplace=True) reads x + 3 as it writes it); None
    otherwise."""
    if node.op not in ("call_function", "call_method") or len(node.args) != 2 or node.kwargs not in ({}, {"alpha": 1}) \
            or _changed_in_place(node, reader):
        return None
    name = _call_name(node)
    numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)]
    pieces = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if len(numbers) != 1 or len(pieces) != 1:
        return None
    if name in ("add", "__add__", "__radd__"):
        return pieces[0], Fraction(numbers[0])
    if name in ("sub", "__sub__") and node.args[0] is pieces[0]:
        return pieces[0], -Fraction(numbers[0])
    return None


def _self_gated(node: torch.fx.Node, bounds: dict) -> float | None:
    """The constant of a self-gated activation written out, y = x * g(x) with g a squashing function
    of x (SiLU as x * sigmoid(x), QuickGELU x * sigmoid(1.702 x), hardswish x * relu6(x + 3) / 6,
    Mish x * tanh(softplus(x)), GELU x * 0.5 * (1 + erf(x / sqrt(2)))): an elementwise
    t -> a t g(t), whose slope is bounded in closed form by the module's constant; None for every
    other product.  With u = c t: t sigmoid(c t) = silu(u) / c, t hardsigmoid(c t) = hardswish(u) / c,
    t tanh(softplus(c t)) = mish(u) / c and t (1 + erf(c t)) = sqrt(2) gelu(sqrt(2) u) / c, so the slope
    is that of silu (hardswish, mish, 2 gelu) for every c != 0; t relu6(c t + b) has slope 0 for
    u < 0, 2u - b on (0, 6) and 6 above: at most max(|b|, |12 - b|, 6).  The values must not be
    changed in place on the way (the graph has no in-place call on x, or on what views it)."""
    a, b = node.args[:2]
    for x_side, gate_side in ((a, b), (b, a)):
        outer = _scaled_source(x_side)
        inner = _scaled_source(gate_side)
        if outer is None or inner is None:
            continue
        (x, k1), (gate, k2) = outer, inner
        found = _elementwise_kind(gate)
        offset = Fraction(0)
        if found is None and (shifted := _shifted(gate)) is not None and shifted[1] == 1:
            # 1 + erf(c x), or erf(c x) + 1: GELU's form
            erf = _elementwise_kind(shifted[0])
            found = ("1+erf", erf[1]) if erf is not None and erf[0] == "erf" else None
        if found is None:
            continue
        kind, argument = found
        form = [gate]  # the nodes the form reads through: none may be changed in place
        if kind == "1+erf":
            form.append(shifted[0])
        if kind == "tanh":  # Mish: tanh(softplus(x))
            inner_kind = _elementwise_kind(argument) if isinstance(argument, torch.fx.Node) else None
            if inner_kind is None or inner_kind[0] != "softplus":
                continue
            form.append(argument)
            kind, argument = "mish", inner_kind[1]
        if kind == "relu6" and (shifted := _shifted(argument, gate)) is not None:  # relu6(c x + b), b a number
            argument, offset = shifted
        if kind not in ("sigmoid", "hardsigmoid", "mish", "1+erf", "relu6"):
            continue
        scaled = _scaled_source(argument)
        if scaled is None or scaled[0] is not x or scaled[1] == 0 or \
                any(_changed_in_place(n) for n in [x, *form]):
            continue
        slope = {"sigmoid": lambda: _silu_slope(), "hardsigmoid": lambda: _SLOPES[nn.Hardswish](None),
                 "mish": lambda: _mish_slope(), "1+erf": lambda: _mul_up(2.0, _gelu_slope("none")),
                 "relu6": lambda: _float_up(max(abs(offset), abs(12 - offset), Fraction(6)))}[kind]()
        return _product(bounds[x], _float_up(abs(k1 * k2)), slope)
    return None


# the average pool an LPPool's decomposition calls: (the LPPool it computes, its dims)
_AVG_POOLS = {F.avg_pool1d: (nn.LPPool1d, 1), F.avg_pool2d: (nn.LPPool2d, 2), F.avg_pool3d: (nn.LPPool3d, 3)}


def _call_of(node, names: tuple[str, ...], functions: tuple = ()) -> bool:
    """Whether node calls one of the functions, or a torch function or method of one of the names."""
    if not isinstance(node, torch.fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    if node.op == "call_method":
        return node.target in names
    return node.target in functions or any(node.target is getattr(torch, name, None) for name in names)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _decomposed_lp_pool(node: torch.fx.Node) -> tuple[torch.fx.Node, nn.Module, list[torch.fx.Node]] | None:
    """(x, the LPPool module, the nodes between) where node ends F.lp_pool<n>d(x, p, kernel, stride,
    ceil_mode) as traced, scripted and exported models spell it out:
    (sign(a) * relu(|a|)).mul(prod kernel).pow(1 / p) with a = avg_pool<n>d(x.pow(p), kernel, stride,
    0, ceil_mode), and the nodes between used by nothing else; None for anything else.  Its bound is
    the module's (_lp_pool_bound), which the pieces one by one would not give (x^p has no constant)."""
    if not (_call_of(node, ("pow",)) and len(node.args) == 2 and not node.kwargs and _number(node.args[1])):
        return None
    scaled = node.args[0]
    if not (_call_of(scaled, ("mul",)) and len(scaled.args) == 2 and not scaled.kwargs and _number(scaled.args[1])):
        return None
    signed = scaled.args[0]
    if not (_call_of(signed, ("mul",)) and len(signed.args) == 2 and not signed.kwargs):
        return None
    sign, relu = signed.args if _call_of(signed.args[0], ("sign",)) else signed.args[::-1]
    if not (_call_of(sign, ("sign",)) and _call_of(relu, ("relu",), (F.relu,)) and len(relu.args) == 1
            and _call_of(relu.args[0], ("abs",)) and len(sign.args) == 1 and len(relu.args[0].args) == 1):
        return None
    pooled = sign.args[0]
    if relu.args[0].args[0] is not pooled or not (isinstance(pooled, torch.fx.Node) and pooled.target in _AVG_POOLS):
        return None
    module_class, dims = _AVG_POOLS[pooled.target]
    names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    arguments = {**dict(zip(names, pooled.args)), **pooled.kwargs}  # (the functions are builtins: no signature)
    powered = arguments["input"]
    if not (_call_of(powered, ("pow",)) and len(powered.args) == 2 and not powered.kwargs and _number(powered.args[1])):
        return None
    p, kernel = powered.args[1], arguments.get("kernel_size")
    stride = arguments.get("stride") or None  # (aten's default: an empty list)
    padding = arguments.get("padding", 0)
    if not (isinstance(kernel, (int, list, tuple)) and p != 0 and node.args[1] == 1.0 / p
            and scaled.args[1] == math.prod(_as_tuple(kernel, dims)) and padding in (0, [0] * dims, (0,) * dims)
            and arguments.get("count_include_pad", True) is True and arguments.get("divisor_override") is None):
        return None
    inner = [scaled, signed, sign, relu, relu.args[0], pooled, powered]
    if any(user not in inner and user is not node for value in inner for user in value.users):
        return None

    def size(value):  # aten's lists as the module takes them (a 1-d pool multiplies by its int kernel_size)
        return (value[0] if dims == 1 else tuple(value)) if isinstance(value, (list, tuple)) else value

    module = module_class(p, size(kernel), size(stride), bool(arguments.get("ceil_mode", False)))
    return powered.args[0], module, inner


def _softsign_bound(node: torch.fx.Node, bounds: dict) -> float | None:
    """The constant of softsign written out, y = k x / (a |m x| + c) with numbers k, m, a >= 0 and
    c > 0 (a traced or exported F.softsign is x / (|x| + 1)): an elementwise t -> k t / (b |t| + c),
    b = a |m| >= 0, whose slope k c / (b |t| + c)^2 is at most |k| / c; None for every other
    quotient.  x must not be changed in place on the way."""
    if len(node.args) != 2 or node.kwargs or not all(isinstance(a, torch.fx.Node) for a in node.args):
        return None
    numerator, denominator = _scaled_source(node.args[0]), _shifted(node.args[1])
    if numerator is None or denominator is None or denominator[1] <= 0:
        return None
    (x, k), (magnitude, c) = numerator, denominator
    outer = _scaled_source(magnitude)  # (|m x|, a)
    inner = _abs_source(outer[0]) if outer is not None and outer[1] >= 0 else None
    scaled = _scaled_source(inner) if inner is not None else None
    if scaled is None or scaled[0] is not x or _changed_in_place(x):
        return None
    return _product(bounds[x], _float_up(abs(k) / c))


def _abs_source(node: torch.fx.Node) -> torch.fx.Node | None:
    """v for a node computing |v| (torch.abs, the method, or abs()), and changed by no in-place call;
    None otherwise."""
    if node.op not in ("call_function", "call_method") or len(node.args) != 1 or node.kwargs or _changed_in_place(node):
        return None
    if node.target in (torch.abs, operator.abs) or (node.op == "call_method" and node.target in ("abs", "__abs__")):
        return node.args[0] if isinstance(node.args[0], torch.fx.Node) else None
    return None


def _changed_in_place(x: torch.fx.Node, other_than: torch.fx.Node | None = None) -> bool:
    """Whether some call writes into x's memory: an in-place call on x, or on a value that may view it
    (other than the call other_than)."""
    return bool(_in_place_writers(x, other_than))


def _in_place_writers(x: torch.fx.Node, other_than: torch.fx.Node | None = None) -> list[torch.fx.Node]:
    """The calls that write into x's memory: in-place calls on x, or on values that may view it
    (other than the call other_than)."""
    def views(value: torch.fx.Node, user: torch.fx.Node) -> bool:
        return user.op != "call_module" and (user.target in _ALIASING_FUNCTIONS or user.target in _util.VIEW_OPERATIONS)

    return [user for value, user in _users_through_views(x, views)
            if user.args and user.args[0] is value and user is not other_than and (_in_place(user) or (
                user.op == "call_module" and getattr(user.graph.owning_module.get_submodule(user.target), "inplace",
                                                     False) is True))]


def _matmul_bound(node: torch.fx.Node, bounds: dict, values: dict) -> float:
    """x @ W or W @ x (matmul, mm, mv, bmm) for a constant W: see _product_bound."""
    operands = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if len(operands) != 2 or len(node.args) != 2 or node.kwargs:
        raise _Unsupported(f"{node.name}: {_call_name(node)} with arguments {node.args!r}, {node.kwargs!r}")
    return _product_bound(node, operands[0], operands[1], bounds, values)


#: addmm(input, mat1, mat2), addmv(input, mat, vec), baddbmm(input, batch1, batch2): beta input + alpha product
_AFFINE_PRODUCTS = {"addmm": ("input", "mat1", "mat2"), "addmv": ("input", "mat", "vec"),
                    "baddbmm": ("input", "batch1", "batch2")}


def _affine_product_bound(node: torch.fx.Node, bounds: dict, values: dict) -> float:
    """beta input + alpha (a @ b), by the functions or the methods (input.addmm(a, b)), the product
    with a constant factor (a linear layer written out: x @ W.T + b, as torch.export decomposes
    nn.Linear): Lip <= |beta| sqrt(copies) Lip(input) + |alpha| Lip(a @ b), the sum rule with
    input's broadcast copies counted, and _product_bound for the product.  beta = 0 ignores input."""
    name = _call_name(node)
    arguments = {**dict(zip(_AFFINE_PRODUCTS[name], node.args)), **node.kwargs}
    beta, alpha = arguments.pop("beta", 1), arguments.pop("alpha", 1)
    if len(node.args) > 3 or set(arguments) != set(_AFFINE_PRODUCTS[name]) or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (beta, alpha)):
        raise _Unsupported(f"{node.name}: {name} with arguments {node.args!r}, {node.kwargs!r}")
    source, a, b = (arguments[k] for k in _AFFINE_PRODUCTS[name])
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
        raise _Unsupported(f"{node.name}: {name} of a product with an operand that is not a tensor")
    terms = [_product(abs(alpha), _product_bound(node, a, b, bounds, values))]
    if isinstance(source, torch.fx.Node) and beta != 0 and bounds.get(source, 0.0) > 0:
        terms.append(_product(bounds[source], abs(beta), _sqrt_up(_broadcast_copies(node, source))))
    return _sum_up(terms)


def _product_bound(node: torch.fx.Node, a: torch.fx.Node, b: torch.fx.Node, bounds: dict, values: dict) -> float:
    """The constant of a @ b (torch.matmul's broadcasting) when one factor W is a constant: every row
    of x (every column, for W @ x) is mapped by W, so ‖W‖_2 times x's constant (a certified upper end:
    a Cholesky test, as for nn.Linear).  A batch of matrices W_k (dims >= 3) maps each matrix of x by
    the W_k of its batch index: x's matrix i goes to the batches o that broadcasting copies it to, and
    ‖Δy‖^2 = sum_i sum_o ‖Δx_i W_o‖^2 <= max_i (sum_o ‖W_o‖^2) ‖Δx‖^2 (the largest ‖W_k‖ where x is
    not copied).  A product of two input-dependent tensors has none."""
    name = _call_name(node)
    if bounds[a] > 0 and bounds[b] > 0:
        raise _Unsupported(f"{node.name}: a product of two input-dependent tensors has no global Lipschitz constant")
    x, c = (a, b) if bounds[a] > 0 else (b, a)
    weight = _constant_operand(node, c, values, name)
    if weight.dim() == 0:
        raise _Unsupported(f"{node.name}: {name} with a 0-dim tensor")
    if weight.dim() == 1 or (weight.dim() == 2 and min(weight.shape) == 1):
        # a vector's norm: sqrt of a sum of squares, rounded up
        squares = float((weight**2).sum())
        return _product(bounds[x], _sqrt_up(squares * (1 + (weight.numel() + 2) * 2.0**-52)))
    uppers = _matrix_uppers(weight.reshape(-1, *weight.shape[-2:]))
    if weight.dim() == 2:
        return _product(bounds[x], float(uppers[0]))
    x_shape = _shape(node, x)
    x_batch = tuple(x_shape[:-2]) if len(x_shape) >= 2 else ()
    out_batch = torch.broadcast_shapes(x_batch, weight.shape[:-2])
    return _product(bounds[x], _repeated_norm(uppers.reshape(weight.shape[:-2]), out_batch, x_batch))


def _matrix_uppers(matrices: Tensor) -> Tensor:
    """Certified upper ends of ‖M_k‖_2 for a float64 batch of matrices (B, r, c), shape (B,): a
    Cholesky test as for nn.Linear (Gram iteration where it fails); where r or c is 1, the vectors'
    norms, sqrt of a sum of squares rounded up (each square and the sum of n of them within
    (n + 2) 2^-53 relative, the square root and its product within 2^-52 more)."""
    if min(matrices.shape[-2:]) == 1:
        squares = (matrices**2).sum(dim=(1, 2))
        n = matrices.shape[1] * matrices.shape[2]
        return torch.sqrt(squares * (1 + (n + 4) * 2.0**-52)) * (1 + 2.0**-50)
    bracket = conv.dense_brackets(list(matrices), 1e-3, linalg.DEFAULT_MAX_ITERS)
    if bracket:
        return torch.tensor([u for _, u in bracket], dtype=torch.float64)
    return linalg.spectral_norm_bounds(matrices)[1].cpu().double()


#: functions and methods that contract their tensor operands as einsum does (_einsum_form)
_EINSUM_LIKE = {torch.einsum, torch.tensordot, torch.inner, torch.outer, torch.ger, torch.dot, torch.vdot,
                torch.linalg.vecdot}
_EINSUM_LIKE_METHODS = {"inner", "outer", "ger", "dot", "vdot"}
_EINSUM_ARGUMENTS = {"outer": ("input", "vec2"), "ger": ("input", "vec2"), "dot": ("input", "tensor"),
                     "vdot": ("input", "other"), "inner": ("input", "other"), "tensordot": ("a", "b", "dims"),
                     "vecdot": ("x", "y")}


def _einsum_name(node: torch.fx.Node) -> str:
    """An einsum-like call's name: the method's, or the function's (vecdot for torch.linalg.vecdot)."""
    if node.op == "call_method":
        return _rule_name(node)
    return "vecdot" if node.target is torch.linalg.vecdot else getattr(node.target, "__name__", "")


def _einsum_form(node: torch.fx.Node) -> tuple[list[str], set[str], list]:
    """(subscripts, output letters, operands) of an einsum-like call: one string of letters per
    operand, one letter per dim (an ellipsis spelled out in letters of its own, right-aligned as
    broadcasting aligns them), and the set of the result's letters (the order of the result's dims
    plays no part in a norm)."""
    name = _einsum_name(node)
    if node.target is torch.einsum:
        equation = node.args[0] if node.args else None
        operands = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
            else list(node.args[1:])
        if node.kwargs or not isinstance(equation, str):
            raise _Unsupported(f"{node.name}: einsum in its sublist form, or with keyword arguments")
    else:
        arguments = {**dict(zip(_EINSUM_ARGUMENTS[name], node.args)), **node.kwargs}
        operands = [arguments.get(k) for k in _EINSUM_ARGUMENTS[name][:2]]
        if name == "tensordot" and arguments.get("out", None) is None:
            arguments.pop("out", None)
        unknown = set(arguments) - set(_EINSUM_ARGUMENTS[name]) - ({"dim"} if name == "vecdot" else set())
        if unknown or not all(isinstance(a, torch.fx.Node) for a in operands):
            raise _Unsupported(f"{node.name}: {name} with arguments {node.args!r}, {node.kwargs!r}")
        ranks = [len(_shape(node, a)) for a in operands]
        letters = iter(string.ascii_letters)

        def fresh(n: int) -> str:
            return "".join(next(letters) for _ in range(n))

        if name in ("outer", "ger"):
            equation = "a,b->ab"
        elif name in ("dot", "vdot"):
            equation = "a,a->"
        elif name == "inner":  # over the last dims; a 0-dim operand scales the other
            if 0 in ranks:
                a, b = fresh(ranks[0]), fresh(ranks[1])
                equation = f"{a},{b}->{a}{b}"
            else:
                a, b, k = fresh(ranks[0] - 1), fresh(ranks[1] - 1), fresh(1)
                equation = f"{a}{k},{b}{k}->{a}{b}"
        elif name == "tensordot":  # dims: a number n (a's last n with b's first n) or two lists of dims
            dims = arguments.get("dims", 2)
            a = fresh(ranks[0])
            if isinstance(dims, int) and not isinstance(dims, bool) and 0 <= dims <= min(ranks):
                pairs = [(ranks[0] - dims + i, i) for i in range(dims)]
            elif isinstance(dims, (list, tuple)) and len(dims) == 2 and all(isinstance(d, (list, tuple)) for d in dims) \
                    and len(dims[0]) == len(dims[1]) and all(isinstance(i, int) for d in dims for i in d):
                pairs = [(i % ranks[0], j % ranks[1]) for i, j in zip(*dims)]
            else:
                raise _Unsupported(f"{node.name}: tensordot with dims={dims!r}")
            b = list(fresh(ranks[1]))
            for i, j in pairs:
                b[j] = a[i]
            b = "".join(b)
            equation = f"{a},{b}->" + "".join(c for c in a + b if (a + b).count(c) == 1)
        else:  # vecdot: broadcast, then summed over dim
            dim = arguments.get("dim", -1)
            rank = max(ranks)
            if not isinstance(dim, int) or not -rank <= dim < rank:
                raise _Unsupported(f"{node.name}: vecdot with dim={dim!r}")
            all_letters = fresh(rank)
            a, b = all_letters[rank - ranks[0]:], all_letters[rank - ranks[1]:]
            summed = all_letters[dim % rank]
            if summed not in a or summed not in b:
                raise _Unsupported(f"{node.name}: vecdot over a dim that one operand lacks")
            equation = f"{a},{b}->" + all_letters.replace(summed, "")
    if not all(isinstance(a, torch.fx.Node) for a in operands):
        raise _Unsupported(f"{node.name}: {name} of operands that are not tensors")
    ranks = [len(_shape(node, a)) for a in operands]
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    spare = [c for c in string.ascii_letters if c not in equation]
    if len(terms) != len(ranks):
        raise _Unsupported(f"{node.name}: einsum {equation!r} on {len(ranks)} operands")
    spans = [rank - (len(t) - 3) for t, rank in zip(terms, ranks) if "..." in t]
    width = max(spans, default=0)
    if width > len(spare):
        raise _Unsupported(f"{node.name}: einsum {equation!r} with too many dims under its ellipsis")
    dots = "".join(spare[:width])
    subscripts = []
    for term, rank in zip(terms, ranks):
        if "..." in term:
            span = rank - (len(term) - 3)
            term = term.replace("...", dots[width - span:] if span > 0 else "")
        if len(term) != rank or not all(c in string.ascii_letters for c in term):
            raise _Unsupported(f"{node.name}: einsum {equation!r}: subscripts that do not match the operands' dims")
        subscripts.append(term)
    joined = "".join(subscripts)
    if arrow:  # (implicit: the letters that appear once, and the ellipsis's)
        output = set(rhs.replace("...", dots))
    else:
        output = {c for c in joined if joined.count(c) == 1} | set(dots)
    return subscripts, output, operands


def _einsum_bound(node: torch.fx.Node, bounds: dict, values: dict) -> float:
    """An einsum (tensordot, inner, outer, dot, vecdot) of one input-dependent operand x with
    constant tensors: linear in x, its norm _contraction_norm's."""
    subscripts, output, operands = _einsum_form(node)
    dependent = [k for k, a in enumerate(operands) if bounds.get(a, 0.0) > 0]
    name = _einsum_name(node)
    if len(dependent) > 1:
        raise _Unsupported(f"{node.name}: {name} of two input-dependent tensors (a product of them) has no global "
                           "Lipschitz constant")
    x_index = dependent[0]
    constants = []
    for k, a in enumerate(operands):
        if k != x_index:
            constants.append(_constant_operand(node, a, values, name))
    letters = [s for k, s in enumerate(subscripts) if k != x_index]
    norm = _contraction_norm(subscripts[x_index], _shape(node, operands[x_index]), constants, letters, output)
    return _product(bounds[operands[x_index]], norm)


def _constant_operand(node: torch.fx.Node, a: torch.fx.Node, values: dict, name: str) -> Tensor:
    """The value of a constant operand a of node, in float64 on the CPU."""
    value = None if _drawn(a) else values.get(a)
    if not isinstance(value, Tensor) or value.is_complex():
        raise _Unsupported(f"{node.name}: {name} with a tensor that is not a known constant (or differs between runs)")
    value = value.detach().double().cpu()
    if not torch.isfinite(value).all():
        raise _Unsupported(f"{node.name}: {name} with a constant whose entries are not finite")
    return value


def _contraction_norm(x_letters: str, x_shape: tuple[int, ...], constants: list[Tensor], constant_letters: list[str],
                      output: set[str]) -> float:
    """A certified upper end of the norm of x -> einsum(x, C_1, .., C_n) (subscripts x_letters and
    constant_letters, one letter per dim; the result's letters `output`), linear in x.  The
    constants contracted first make one tensor D over the letters that x or the result has (fl(D)
    within gamma(n + m) of D entrywise, relative to the same contraction of the |C_i|, m the terms
    summed: that error's Frobenius norm is added to each norm below).  The letters then split into
    batch letters b (x, D and the result), contracted letters k (x and D only), x's own letters i (x
    and the result: an identity over them), letters summed over x alone s, and the result's letters
    j that x lacks (D's own, and those where x has size 1 and broadcasting copies x's one block to
    every entry of D's).  For every b the map is x[b, i, k] -> sum_k x[b, i, k] D[b, k, j], an
    identity over i times the matrix D_b (k x j): its norm is max_b ‖D_b‖_2, times sqrt(the entries
    summed over the s) (a sum is a product by a vector of ones).  A repeated letter of x reads its
    diagonal: a selection, norm 1.  A contracted letter of size 1 in x and larger in D sums D over it
    (x's one entry meets all of them); a letter of size 1 in D and larger in x copies D along it."""
    x_size = dict(zip(x_letters, x_shape))
    in_constants = list(dict.fromkeys("".join(constant_letters)))
    # D keeps the letters x or the result has, but a contracted one where x's size is 1 (D summed over it)
    kept = [c for c in in_constants if c in output or (c in x_size and not (c not in output and x_size[c] == 1))]
    spec = ",".join(constant_letters) + "->" + "".join(kept)
    D = torch.einsum(spec, *constants) if constants else torch.ones((), dtype=torch.float64)
    summed = math.prod(max(t.shape[s.index(c)] for t, s in zip(constants, constant_letters) if c in s)
                       for c in in_constants if c not in kept)
    error = 0.0
    if len(constants) > 1 or summed > 1:  # products of the constants, sums of them: rounded
        gamma = reference._gamma(len(constants) + summed)  # (the magnitude is itself rounded: within gamma)
        magnitude = float(torch.einsum(spec, *[t.abs() for t in constants]).norm())
        error = (gamma * magnitude + math.sqrt(D.numel()) * summed * 2.0**-1074) * (1 + 2 * gamma) * (1 + 2.0**-50)
    d_size = dict(zip(kept, D.shape))
    copied = {c for c in kept if c in x_size and x_size[c] == 1 and d_size[c] > 1}  # x's one block to each
    batch = [c for c in kept if c in x_size and c in output and c not in copied]
    contracted = [c for c in kept if c in x_size and c not in output]
    own = [c for c in kept if c not in x_size or c in copied]
    alone = [c for c in dict.fromkeys(x_letters) if c not in kept and c not in output]
    targets = [d_size[c] for c in batch] + [x_size[c] for c in contracted] + [d_size[c] for c in own]
    D = D.permute([kept.index(c) for c in batch + contracted + own]).expand(targets)
    rows, cols = math.prod(x_size[c] for c in contracted), math.prod(d_size[c] for c in own)
    if D.numel() == 0 or math.prod(x_shape) == 0:
        return 0.0
    block = float((_matrix_uppers(D.reshape(-1, rows, cols)) + error).max())
    return _product(block, _sqrt_up(math.prod(x_size[c] for c in alone)))


def _weighted_sum_bound(node: torch.fx.Node, bounds: dict, values: dict, mean: bool) -> float | None:
    """(x * c).sum(dims) (or .mean) for a constant tensor c, a weighted sum (core ATen writes dot
    and vecdot so): the einsum of x and c over the product's broadcast shape, its norm
    _contraction_norm's (‖c‖ for a dot product, where the product's max |c| times the sum's sqrt(m)
    can be far larger), over m for a mean.  None where the sum's operand is no such product, or the
    product is changed in place."""
    source = node.args[0] if node.args else node.kwargs.get("input")
    if not (isinstance(source, torch.fx.Node) and source.op in ("call_function", "call_method") and
            (source.target in (operator.mul, torch.mul) or _rule_name(source) in ("mul", "__mul__"))):
        return None
    operands = [a for a in source.args if isinstance(a, torch.fx.Node)]
    if len(source.args) != 2 or source.kwargs or len(operands) != 2 or _changed_in_place(source) or \
            sum(bounds.get(a, 0.0) > 0 for a in operands) != 1:
        return None
    x, c = operands if bounds[operands[0]] > 0 else operands[::-1]
    value = None if _drawn(c) else values.get(c)
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if not isinstance(value, Tensor) or value.is_complex() or not torch.isfinite(value).all():
        return None
    shape = _shape(node, source)
    dims = [dims] if isinstance(dims, int) else list(dims or range(len(shape)))  # (none or [] : all of them)
    if not all(isinstance(d, int) and -len(shape) <= d < len(shape) for d in dims):
        return None
    letters = string.ascii_letters[:len(shape)]
    x_shape = _shape(node, x)
    summed = {letters[d % len(shape)] for d in dims}
    norm = _contraction_norm(letters[len(shape) - len(x_shape):], x_shape, [value.detach().double().cpu()],
                             [letters[len(shape) - value.dim():]], set(letters) - summed)
    entries = math.prod(shape[d % len(shape)] for d in set(dims))
    return _product(bounds[x], norm, _float_up(Fraction(1, entries)) if mean and entries else 1.0)


#: the most (leaf, path) pairs and the deepest walk _linear_parts takes
_COMBINATION_MAX_PATHS = 16
_COMBINATION_MAX_DEPTH = 12


def _unchanged(node: torch.fx.Node) -> bool:
    """Whether no call writes in place into node's memory: node, the value it views, or any view."""
    graph_module = node.graph.owning_module
    return not any(_changed_in_place(member) for member in _memory_family(node, graph_module))


def _linear_step(node: torch.fx.Node, bounds: dict, values: dict) -> list[tuple[torch.fx.Node, tuple]] | None:
    """node as a sum of entrywise-scaled input-dependent operands: [(operand, factor)], a factor
    ("number", c), ("tensor", C) (a stored tensor times), ("divide", C) or ("mask", M) (M a stored
    boolean tensor or its complement), broadcast to node's shape; None where node is no such step
    (then a leaf): a sum or difference (alpha too), a negation, a product or quotient by a number or
    a stored tensor, torch.where / masked_fill on a stored mask, torch.lerp with a number or stored
    weight.  Constant operands are left out."""
    if node.op not in ("call_function", "call_method") or _in_place(node):
        return None
    steps = _linear_operands(node, bounds, values)
    return steps if steps is not None and _unchanged(node) else None


def _linear_operands(node: torch.fx.Node, bounds: dict, values: dict) -> list[tuple[torch.fx.Node, tuple]] | None:
    """_linear_step's operands and factors, by the call's kind alone."""
    name, target = _rule_name(node), node.target

    def dependent(a) -> bool:
        return isinstance(a, torch.fx.Node) and bounds.get(a, 0.0) > 0

    def stored(a) -> Tensor | None:
        try:
            return _constant_operand(node, a, values, name)
        except _Unsupported:
            return None

    if target in (operator.add, torch.add, operator.sub, torch.sub) or name in _SUM_NAMES:
        alpha = node.kwargs.get("alpha", 1)
        if len(node.args) != 2 or set(node.kwargs) - {"alpha"} or not (_number(alpha) and math.isfinite(alpha)):
            return None
        sign = -1 if target in (operator.sub, torch.sub) or name in ("sub", "__sub__") else 1
        return [(a, ("number", 1 if i == 0 else sign * alpha)) for i, a in enumerate(node.args) if dependent(a)]
    if target in (operator.neg, torch.neg) or name in ("neg", "__neg__"):
        return [(node.args[0], ("number", -1))] if len(node.args) == 1 and not node.kwargs and dependent(node.args[0]) \
            else None
    product = target in (operator.mul, torch.mul) or name in ("mul", "__mul__")
    quotient = target in (operator.truediv, torch.div) or name in ("div", "truediv", "__truediv__")
    if (product or quotient) and len(node.args) == 2 and not node.kwargs:
        x, c = node.args if dependent(node.args[0]) else node.args[::-1]
        if not dependent(x) or dependent(c) or (quotient and x is not node.args[0]):
            return None
        if _number(c) and math.isfinite(c) and not (quotient and c == 0):
            return [(x, ("number", 1 / c if quotient else c))] if not quotient or c != 0 else None
        value = stored(c) if isinstance(c, torch.fx.Node) else None
        if value is None or (quotient and bool((value == 0).any())):
            return None
        return [(x, ("divide" if quotient else "tensor", value))]
    if target is torch.lerp or name == "lerp":  # start + w (end - start): (1 - w) start + w end
        arguments = _lerp_arguments(node)
        if arguments is None or dependent(arguments["weight"]):
            return None
        weight = arguments["weight"]
        if isinstance(weight, torch.fx.Node):
            weight = stored(weight)
            if weight is None:
                return None
            factors = (("tensor", 1 - weight), ("tensor", weight))
        elif _number(weight) and math.isfinite(weight):
            factors = (("number", 1 - weight), ("number", weight))
        else:
            return None
        return [(a, f) for a, f in zip((arguments["input"], arguments["end"]), factors) if dependent(a)]
    if target in (torch.where, torch.masked_fill) or name in ("where", "masked_fill"):
        arguments = _selection_arguments(node)
        if len(node.args) + len(node.kwargs) != 3:
            return None
        condition = arguments.get("mask", arguments.get("condition"))
        mask = stored(condition) if isinstance(condition, torch.fx.Node) and not dependent(condition) else None
        if mask is None or values[condition].dtype != torch.bool:
            return None
        mask = values[condition].detach().cpu()
        steps = []
        for key in ("input", "other"):  # where: input where the condition holds; masked_fill: where it does not
            keep = mask if (key == "input") != (name == "masked_fill") else ~mask
            if dependent(arguments.get(key)):
                steps.append((arguments[key], ("mask", keep)))
        return steps
    return None


def _linear_parts(node: torch.fx.Node, bounds: dict, values: dict) -> list[tuple[torch.fx.Node, list]] | None:
    """node as sum over paths of (factors along the path) times a leaf: [(leaf, [factor, ...])], the
    walk through _linear_step from node down to values that are no such step; None where it is
    deeper than _COMBINATION_MAX_DEPTH or has more than _COMBINATION_MAX_PATHS paths."""
    parts, pending = [], [(node, [], 0)]
    while pending:
        value, factors, depth = pending.pop()
        if value is node:  # (its own value, as it is computed: what later calls do to it plays no part)
            steps = _linear_operands(node, bounds, values)
        else:
            steps = _linear_step(value, bounds, values) if depth < _COMBINATION_MAX_DEPTH else None
        if steps is None:
            if depth >= _COMBINATION_MAX_DEPTH and value is not node:
                return None
            parts.append((value, factors))
        else:
            pending.extend((a, factors + [factor], depth + 1) for a, factor in steps)
        if len(parts) + len(pending) > _COMBINATION_MAX_PATHS:
            return None
    return parts


def _linear_combination_bound(node: torch.fx.Node, bounds: dict, values: dict) -> float | None:
    """A sum (or where) of values that reach one input-dependent value along several paths, through
    sums, negations, products and quotients by numbers or stored tensors, and selections on stored
    masks: y = sum over leaves l of D_l(l) + constant, D_l scaling each entry of l (broadcast to y's
    shape) by the sum over l's paths of the product of their factors.  Lip(y) <= sum_l ‖D_l‖ Lip(l),
    ‖D_l‖ = sqrt(max over l's entries of the sum of coef^2 over their copies) (_repeated_norm): (1 -
    w) x + w f(x) gets |1 - w| + |w| Lip(f) where the node-by-node rules give 1 + |w| (1 + Lip(f)),
    and x - 0.5 x gets 0.5.  The coefficients are computed in float64: each path's product of at most
    d factors is within gamma(d) of exact (relative), a sum of p of them within gamma(d + p) of the
    sum of their magnitudes, which is added.  None where no leaf is reached twice (the node-by-node
    rules give the same then), or where some value on the way, or a leaf, is changed in place (its
    uses would read different values)."""
    if _in_place(node):
        return None
    parts = _linear_parts(node, bounds, values)
    if parts is None or len({leaf for leaf, _ in parts}) == len(parts):
        return None
    if not all(_unchanged(leaf) for leaf, _ in parts if leaf is not node):
        return None
    out = _shape(node, node)
    if math.prod(out) > 1 << 22:
        return None
    coefficients: dict[torch.fx.Node, list[Tensor]] = {}
    depth = max(len(factors) for _, factors in parts)
    try:
        for leaf, factors in parts:
            coef = torch.ones(out, dtype=torch.float64)
            for kind, factor in factors:
                if kind == "number":
                    coef = coef * float(factor)
                elif kind == "mask":
                    coef = coef * torch.broadcast_to(factor, out).double()
                else:
                    scale = torch.broadcast_to(factor, out)
                    coef = coef / scale if kind == "divide" else coef * scale
            coefficients.setdefault(leaf, []).append(coef)
    except RuntimeError:  # (shapes that do not broadcast as recorded)
        return None
    gamma = reference._gamma(2 * depth + len(parts) + 2)
    terms = []
    for leaf, coefs in coefficients.items():
        if bounds[leaf] == 0:
            continue
        total, magnitude = sum(coefs), sum(c.abs() for c in coefs)
        upper = total.abs() + gamma * magnitude * (1 + 4 * gamma) + len(coefs) * 2.0**-1070
        terms.append(_product(bounds[leaf], _repeated_norm(upper, out, _shape(node, leaf))))
    return _sum_up(terms)


def _with_combination(node: torch.fx.Node, bounds: dict, values: dict, bound: float) -> float:
    """bound (a node-by-node rule's), or _linear_combination_bound's where that is lower."""
    combined = _linear_combination_bound(node, bounds, values)
    return bound if combined is None else min(bound, combined)


def _lerp_arguments(node: torch.fx.Node) -> dict | None:
    """torch.lerp's (input, end, weight) by name (the method's input is its tensor), or None where
    the call passes others."""
    arguments = {**dict(zip(("input", "end", "weight"), node.args)), **node.kwargs}
    return arguments if set(arguments) == {"input", "end", "weight"} else None


def _lerp_bound(node: torch.fx.Node, bounds: dict, values: dict) -> float:
    """torch.lerp(start, end, weight) = (1 - w) start + w end, for a weight that is a number or a
    constant tensor: Lip <= ‖(1 - w) .‖ Lip(start) + ‖w .‖ Lip(end), the sum rule with each term a
    scaling (_tensor_scale: its broadcast copies counted).  A weight that depends on the input makes
    a product of input-dependent values: no constant."""
    arguments = _lerp_arguments(node)
    if arguments is None:
        raise _Unsupported(f"{node.name}: lerp with arguments {node.args!r}, {node.kwargs!r}")
    start, end, weight = arguments["input"], arguments["end"], arguments["weight"]
    if isinstance(weight, torch.fx.Node) and bounds.get(weight, 0.0) > 0:
        raise _Unsupported(f"{node.name}: lerp with a weight that depends on the input (a product of input-dependent "
                           "values) has no global Lipschitz constant")
    if isinstance(weight, torch.fx.Node):
        weight = None if _drawn(weight) else values.get(weight)
        if not isinstance(weight, Tensor):
            raise _Unsupported(f"{node.name}: lerp with a weight that is not a known constant (or differs between runs)")
        weight = weight.detach().double()
    elif not _number(weight):
        raise _Unsupported(f"{node.name}: lerp with weight={weight!r}")
    terms = []
    for operand, factor in ((start, 1 - weight), (end, weight)):  # (1 - w in float64: within 2^-53 relative)
        if isinstance(operand, torch.fx.Node) and bounds.get(operand, 0.0) > 0:
            if isinstance(factor, Tensor):
                scale = _tensor_scale(node, operand, factor, divide=False) * (1 + 2.0**-51)
            else:
                scale = abs(float(factor)) * (1 + 2.0**-51) * _sqrt_up(_broadcast_copies(node, operand))
            terms.append(_product(bounds[operand], scale))
    return _sum_up(terms)


def _selection_arguments(node: torch.fx.Node) -> dict:
    """torch.where's (condition, input, other), x.where's (input = x, condition, other) or
    masked_fill's (input, mask, value), by name."""
    method = node.op == "call_method"
    names = ("input", "mask", "value") if _rule_name(node) == "masked_fill" else \
        (("input", "condition", "other") if method else ("condition", "input", "other"))
    return {**dict(zip(names, node.args)), **node.kwargs}


def _selected_bound(node: torch.fx.Node, bounds: dict, values: dict) -> float:
    """torch.where(cond, a, b) (x.where(cond, b): a = x) and masked_fill(x, mask, value): each output
    entry is one entry of one operand, as a condition that does not depend on the input says, so
    ‖Δy‖^2 <= sum over the operands of copies ‖Δoperand‖^2, and Lip <= sqrt(sum of copies L^2).
    copies: the most output entries that take one entry of the operand, counted on the condition
    where its value is known (a mask made from aranges: diag_embed and tril in core ATen, whose
    operand is broadcast but each copy but one masked out), else how often broadcasting repeats each
    entry.  A condition computed from the input makes the output jump between operands: no constant."""
    arguments = _selection_arguments(node)
    if len(node.args) + len(node.kwargs) != 3:
        raise _Unsupported(f"{node.name}: {_rule_name(node)} with {len(node.args) + len(node.kwargs)} arguments")
    condition = arguments.get("mask", arguments.get("condition"))
    if isinstance(condition, torch.fx.Node) and bounds.get(condition, 0.0) > 0:
        raise _Unsupported(f"{node.name}: {_rule_name(node)} on a condition that depends on the input: the output "
                           "jumps between its operands")
    operands = [(k, arguments[k]) for k in ("input", "other", "value") if isinstance(arguments.get(k), torch.fx.Node)
                and bounds.get(arguments[k], 0.0) > 0]
    if any(math.isinf(bounds[a]) for _, a in operands):
        return math.inf
    mask = values.get(condition) if isinstance(condition, torch.fx.Node) and not _drawn(condition) else None
    out = _shape(node, node)
    if isinstance(mask, Tensor) and mask.dtype == torch.bool and math.prod(out) > 0:
        mask = mask.detach().cpu()
        terms = []
        for key, a in operands:  # where: input where the condition holds; masked_fill: input where the mask does not
            chosen = mask if (key == "input") != (_rule_name(node) == "masked_fill") else ~mask
            terms.append(_product(bounds[a], _repeated_norm(torch.broadcast_to(chosen, out).double(), out, _shape(node, a))))
        return _quadrature_up(terms)
    return _sqrt_up(sum((Fraction(bounds[a]) ** 2 * _broadcast_copies(node, a) for _, a in operands), Fraction(0)))


def _broadcast_copies(node: torch.fx.Node, operand: torch.fx.Node) -> Fraction:
    """How many times node's result holds each entry of operand: numel(result) / numel(operand), 1
    where the shapes are equal (broadcasting repeats every entry equally often)."""
    out, inp = _shape(node, node), _shape(node, operand)
    if out == inp:
        return Fraction(1)
    return Fraction(math.prod(out), math.prod(inp)) if math.prod(inp) else Fraction(0)


def _tensor_scale(node: torch.fx.Node, x: torch.fx.Node, value, divide: bool) -> float:
    """The norm of x -> x * c (x / c with divide) for a constant tensor c: max |c| (1 / min |c|) where
    x has the result's shape; where broadcasting repeats x's entries, each entry's copies count
    together: sqrt(max over entries of x of the sum of c^2 over its copies)."""
    if not isinstance(value, Tensor) or value.is_complex():
        raise _Unsupported(f"{node.name}: scaling by a tensor that is not a known constant (or differs between runs)")
    weights = value.detach().double().abs().cpu()
    if not torch.isfinite(weights).all() or (divide and (weights == 0).any()):
        raise _Unsupported(f"{node.name}: scaling by a tensor with entries that are not finite (or dividing by 0)")
    out, inp = _shape(node, node), _shape(node, x)
    if weights.numel() == 0 or math.prod(out) == 0:
        return 0.0
    if out == inp:  # each entry of x scaled once: exactly the largest scale
        return _float_up(1 / Fraction(float(weights.min()))) if divide else float(weights.max())
    if divide:
        weights = 1 / weights  # each within 2^-53 of the exact quotient (covered by _repeated_norm's margin)
    return _repeated_norm(weights, out, inp)


def _repeated_norm(weights: Tensor, out: tuple[int, ...], inp: tuple[int, ...]) -> float:
    """sqrt(max over the entries of an operand of shape inp of the sum of weights^2 over the entries of
    the broadcast shape out it is copied to): the norm of a map that scales each copy of an entry by
    its weight (weights >= 0, float64, broadcastable to out), rounded up."""
    aligned = (1,) * (len(out) - len(inp)) + tuple(inp)
    repeated = [d for d, (a, o) in enumerate(zip(aligned, out)) if a == 1 and o != 1]
    squares = torch.broadcast_to(weights, out) ** 2
    sums = squares.sum(dim=repeated) if repeated else squares
    terms = math.prod(out[d] for d in repeated)
    if sums.numel() == 0:
        return 0.0
    # float64: each weight (a quotient, say), square and the sum of `terms` of them within (terms + 3) 2^-53 relative
    return _sqrt_up(float(sums.max()) * (1 + (terms + 4) * 2.0**-52))


def _extremum_form(node: torch.fx.Node) -> str | None:
    """For max or min (function or method): "pairwise" (of two tensors), "pair" (along a dim: values
    and indices) or "reduction" (of every entry); None for every other node."""
    if not ((node.op == "call_function" and node.target in _EXTREMA)
            or (node.op == "call_method" and node.target in _EXTREMA_METHODS)):
        return None
    second = node.args[1] if len(node.args) > 1 else node.kwargs.get("other", node.kwargs.get("dim"))
    if isinstance(second, torch.fx.Node):
        return "pairwise"  # (a dim computed in the graph lands here too: it has no shape, so no bound)
    return "reduction" if second is None else "pair"


def _order_statistic_form(node: torch.fx.Node) -> str | None:
    """For median, nanmedian and kthvalue (function or method): "pair" (along a dim: values and
    indices; kthvalue always) or "reduction" (median of every entry); None for every other node."""
    if not ((node.op == "call_function" and node.target in _ORDER_STATISTICS)
            or (node.op == "call_method" and node.target in _ORDER_STATISTIC_METHODS)):
        return None
    if _call_name(node) == "kthvalue":
        return "pair"
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return "reduction" if dim is None else "pair"


def _returns_pair(node: torch.fx.Node) -> bool:
    """Whether node is a sort, topk, max or min along a dim, or a max pool asked for its indices, which
    return (values, indices)."""
    if _extremum_form(node) == "pair" or _order_statistic_form(node) == "pair":
        return True
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target) if node.graph.owning_module else None
        return isinstance(module, _INDEXED_POOLS) and bool(module.return_indices)
    if node.op == "call_function":
        return bool(_SORTS.get(node.target)) or node.target in _FUNCTIONAL_INDEXED_POOLS
    return node.op == "call_method" and bool(_SORT_METHODS.get(node.target))


#: operations that take entries of their first argument and move them, without arithmetic: run on a
#: tensor of entry numbers, they tell which entries a value holds (_entries)
_MOVING_FUNCTIONS = _SHAPE_ONLY_FUNCTIONS | _SELECTING_FUNCTIONS | {operator.getitem}
_MOVING_METHODS = (_SHAPE_ONLY_METHODS - {"float", "double", "half", "bfloat16", "to", "type", "type_as", "detach"}) \
    | _SELECTING_METHODS


def _entries(node: torch.fx.Node, depth: int = 0) -> tuple[torch.fx.Node, object] | None:
    """(g, E): node's value is made of entries of g's value moved by shape and selection operations
    alone, and E is that value computed on g's entry numbers (an int64 tensor, or a tuple of them
    after a split); None where some step is not such an operation or a size is not known.  A value
    that some call changes in place is not followed to its source: a copy (clone, contiguous, a
    conversion) no longer holds the source's entries then (y = x.clone(); y.mul_(3)), so g is that
    value itself, whose bound the in-place call raised."""
    moving = ((node.op == "call_function" and node.target in _MOVING_FUNCTIONS)
              or (node.op == "call_method" and node.target in _MOVING_METHODS)) and not _changed_in_place(node)
    source = node.args[0] if node.args else None
    if depth < 32 and moving and isinstance(source, torch.fx.Node) and not _nodes_in((node.args[1:], node.kwargs)):
        found = _entries(source, depth + 1)
        if found is not None:
            g, numbers = found
            try:
                if node.op == "call_function":
                    return g, node.target(numbers, *node.args[1:], **node.kwargs)
                return g, getattr(numbers, node.target)(*node.args[1:], **node.kwargs)
            except Exception:
                return None
    shape = _propagated_shape(node)
    if shape is None or math.prod(shape) > 1 << 26:
        return None
    return node, torch.arange(math.prod(shape)).reshape(shape)


def _shifted_difference(node: torch.fx.Node, bounds: dict) -> tuple[torch.fx.Node, float] | None:
    """(g, c) for a - b (sub, alpha 1) of two same-shape selections of one value g (_entries) whose
    entries differ by one fixed step δ != 0 (a vector of index offsets), neither reading an entry
    twice: x[..., 1:] - x[..., :-1] (a finite difference, and torch.diff in core ATen), or
    x[:, 1:, 1:] - x[:, :-1, :-1] (diagonal).  Each output is g_u - g_(u + δ), so y = B g with BᵀB
    the Laplacian of a graph on g's entries whose edges join u and u + δ: every entry has at most one
    edge on each side, so the graph is disjoint paths along δ, none of more than k = min over the
    dims d that δ moves of ceil(m_d / |δ_d|) entries (m_d: g's length along d), and a path of k
    vertices has Laplacian eigenvalues 2 - 2 cos(π j / k): ‖B‖ <= 2 cos(π / (2k)), the constant c
    (below 2, the two selections' sum).  None for every other node."""
    if _call_name(node) not in ("sub", "__sub__") or len(node.args) != 2 or node.kwargs not in ({}, {"alpha": 1}):
        return None
    a, b = node.args
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)) or a is b:
        return None
    found = [_entries(a), _entries(b)]
    if any(f is None or not isinstance(f[1], Tensor) for f in found) or found[0][0] is not found[1][0]:
        return None
    (g, first), (_, second) = found
    shape = _propagated_shape(g)
    if g is a or g is b or shape is None or not shape or first.shape != second.shape or first.numel() == 0 or \
            any(e.unique().numel() != e.numel() for e in (first, second)):
        return None
    steps = torch.stack(torch.unravel_index(first.reshape(-1), shape)) - \
        torch.stack(torch.unravel_index(second.reshape(-1), shape))
    moved = [d for d in range(len(shape)) if bool((steps[d] != 0).any())]
    if not moved or not bool((steps == steps[:, :1]).all()):
        return None
    k = min(-(-shape[d] // abs(int(steps[d, 0]))) for d in moved)
    return g, 2 * math.cos(math.pi / (2 * k)) * (1 + 1e-12)


def _dominator(node: torch.fx.Node, bounds: dict, memo: dict) -> torch.fx.Node | None:
    """The nearest value every path from the model's input to node passes through (its immediate
    dominator among the input-dependent values: those with a positive bound); None for the input
    itself, or where node depends on the input by no path (or by several inputs)."""
    if node not in memo:
        memo[node] = None
        preds = [a for a in node.all_input_nodes if bounds.get(a, 0) > 0]
        if node.op != "placeholder" and preds:
            meet = preds[0]
            for other in preds[1:]:
                meet = _meet(meet, other, bounds, memo)
                if meet is None:
                    break
            memo[node] = meet
    return memo[node]


def _meet(a: torch.fx.Node, b: torch.fx.Node, bounds: dict, memo: dict) -> torch.fx.Node | None:
    """The nearest value that is a or dominates it and is b or dominates it (None: no such value)."""
    chain = set()
    while a is not None:
        chain.add(a)
        a = _dominator(a, bounds, memo)
    while b is not None and b not in chain:
        b = _dominator(b, bounds, memo)
    return b


#: _disjoint_functions follows at most this many values back, with masks of at most this many entries
_DISJOINT_MAX_NODES = 2000
_DISJOINT_MAX_ENTRIES = 1 << 22


def _disjoint_functions(operands: list[torch.fx.Node], bounds: dict) -> bool:
    """Whether the input-dependent operands are functions of disjoint sets of entries of one value h:
    h is their nearest common dominator d (every path from the input to any of them passes through
    it), or the value d's entries are moved from (a split: x.chunk(2, 1) before its pieces' branches);
    each operand's entries of h are those of the moves from h that it reaches h through (a move's
    entries exactly: _entries, which stops at a value changed in place; any other call depends on
    the union of its inputs' entries, and so does a value an in-place activation changed).  Then
    each operand is g_i(h restricted to S_i) with the S_i disjoint, and its bound b_i = c_i L(h) with
    c_i >= Lip(g_i) (every rule is homogeneous in its inputs' bounds), so for a concatenation
    ‖Δy‖^2 = Σ ‖Δo_i‖^2 <= Σ c_i^2 ‖Δh_(S_i)‖^2 <= max c_i^2 ‖Δh‖^2: Lip <= max_i b_i; for a sum,
    ‖Δy‖ <= Σ c_i ‖Δh_(S_i)‖ <= sqrt(Σ c_i^2) ‖Δh‖: Lip <= sqrt(Σ b_i^2).  False where an in-place
    call on the way writes another input-dependent value in, or an operand is passed twice, or the
    entries are not known."""
    operands = [a for a in operands if bounds.get(a, 0) > 0]
    if len(operands) < 2 or len(set(operands)) < len(operands) or not all(math.isfinite(bounds[a]) for a in operands):
        return False
    graph = operands[0].graph
    memo = graph.__dict__.setdefault("_lipfast_dominators", {})
    d = operands[0]
    for other in operands[1:]:
        d = _meet(d, other, bounds, memo)
        if d is None:
            return False
    found = _entries(d)
    if found is None:
        return False
    h = found[0]
    shape = _propagated_shape(h)
    size = math.prod(shape) if shape is not None else 0
    masks: dict[torch.fx.Node, Tensor | None] = {}

    def mixed_in(node: torch.fx.Node) -> bool:
        """Whether an in-place call writes into node's memory values of another input-dependent
        tensor (node.add_(y)); an in-place activation (x.relu_(), ReLU(inplace=True)) writes a
        function of node's own entries, and changes no dependence."""
        return any(bounds.get(a, 1) > 0 for writer in _in_place_writers(node)
                   for a in _nodes_in((writer.args[1:], writer.kwargs)))

    if shape is None or size > _DISJOINT_MAX_ENTRIES or mixed_in(h):
        return False

    def reached(node: torch.fx.Node, depth: int = 0) -> Tensor | None:
        """The entries of h that node's value depends on (a boolean mask), or None where it depends
        on the input some other way, or where that is not known."""
        if node in masks:
            return masks[node]
        masks[node] = None  # (a cycle cannot occur; this only guards the recursion)
        if node is h:
            mask = torch.ones(size, dtype=torch.bool)
        elif node in bounds and bounds[node] == 0:  # a constant (a node left unbounded is followed)
            mask = torch.zeros(size, dtype=torch.bool)
        elif depth > 512 or len(masks) > _DISJOINT_MAX_NODES or node.op == "placeholder" or mixed_in(node):
            return None
        else:
            moved = _entries(node)
            if moved is not None and moved[0] is h:
                mask = torch.zeros(size, dtype=torch.bool)
                for numbers in (moved[1] if isinstance(moved[1], (tuple, list)) else (moved[1],)):
                    if not isinstance(numbers, Tensor):
                        return None
                    mask[numbers.reshape(-1)] = True
            else:
                mask = torch.zeros(size, dtype=torch.bool)
                for a in node.all_input_nodes:
                    part = reached(a, depth + 1)
                    if part is None:
                        return None
                    mask |= part
        masks[node] = mask
        return mask

    total = torch.zeros(size, dtype=torch.int64)
    for a in operands:
        mask = reached(a)
        if mask is None:
            return False
        total += mask
    return bool((total <= 1).all())


def _max_min_source(node: torch.fx.Node) -> torch.fx.Node | None:
    """For cat or stack of exactly (max(a, b), min(a, b)) (either order; the two a's, and the two b's,
    the same entries of one value g, taken by two calls or one; all of one shape), where a and b hold
    distinct entries of g: g.  Per entry the pair is a sort of (a_i, b_i), so ‖Δ(max, min)‖^2 <=
    ‖Δa‖^2 + ‖Δb‖^2 <= ‖Δg‖^2: the pair's constant is g's (MaxMin traced or exported, or written
    out, gets 1 where the two values counted apart give 2)."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    if not (isinstance(tensors, (list, tuple)) and len(tensors) == 2 and all(isinstance(t, torch.fx.Node) for t in tensors)):
        return None
    operands = []
    for t in tensors:
        kind = getattr(t.target, "__name__", t.target) if t.op in ("call_function", "call_method") else None
        if kind not in ("maximum", "minimum", "max", "min") or t.kwargs or len(t.args) != 2 or \
                not all(isinstance(a, torch.fx.Node) for a in t.args):
            return None
        operands.append((kind in ("maximum", "max"), t.args))
    (first_is_max, (a, b)), (second_is_max, (c, d)) = operands
    shapes = {_propagated_shape(v) for v in (a, b, c, d, *tensors)}
    if first_is_max == second_is_max or len(shapes) != 1 or None in shapes:
        return None
    found = [_entries(v) for v in (a, b, c, d)]
    if any(f is None or f[0] is not found[0][0] or f[0] in (a, b, c, d) or not isinstance(f[1], torch.Tensor)
           for f in found):
        return None
    na, nb, nc, nd = (f[1] for f in found)
    if not ((torch.equal(na, nc) and torch.equal(nb, nd)) or (torch.equal(na, nd) and torch.equal(nb, nc))):
        return None
    taken = torch.cat([na.flatten(), nb.flatten()])
    return found[0][0] if taken.unique().numel() == taken.numel() else None


def _sort_output(node: torch.fx.Node) -> str | None:
    """For x[i] or x.<name> of the (values, indices) pair that a sort or topk returns: "values" or
    "indices" (anything else taken from it counts as the indices); None for every other node."""
    source = node.args[0] if node.args else None
    if not (isinstance(source, torch.fx.Node) and len(node.args) == 2 and _returns_pair(source)):
        return None
    return "values" if node.args[1] in (0, -2, "values") else "indices"


def _dropout_scale(node: torch.fx.Node) -> float:
    """F.dropout(x, p, training): the identity when training is False; when it is True (its default:
    dropout that stays on, as in Monte Carlo dropout) each draw keeps entries scaled by 1 / (1 - p),
    so every draw has constant 1 / (1 - p) (0 for p = 1, which zeroes everything)."""
    p, training = _dropout_arguments(node)
    if not isinstance(training, bool) or not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p <= 1:
        raise _Unsupported(f"{node.name}: dropout with p={p!r}, training={training!r}")
    if not training:
        return 1.0
    return _float_up(1 / (1 - Fraction(p))) if p < 1 else 0.0


def _dropout_arguments(node: torch.fx.Node) -> tuple:
    """(p, training) of an F.dropout call, as written (torch's defaults where left out)."""
    arguments = {**dict(zip(("input", "p", "training", "inplace"), node.args)), **node.kwargs}
    return arguments.get("p", 0.5), arguments.get("training", True)


def _elu_slope(node: torch.fx.Node) -> float:
    """F.elu(x, alpha), or aten::elu(x, alpha, scale, input_scale) from a TorchScript graph: slope
    scale above 0 and scale alpha input_scale e^(input_scale x) below, so |slope| <= |scale|
    max(1, |alpha input_scale|) when input_scale >= 0 (and unbounded otherwise)."""
    alpha = node.kwargs.get("alpha", node.args[1] if len(node.args) > 1 else 1.0)
    scale, input_scale = (node.args[2], node.args[3]) if len(node.args) == 4 else (1.0, 1.0)
    numbers = (alpha, scale, input_scale)
    if not all(_number(v) for v in numbers) or input_scale < 0:
        raise _Unsupported(f"{node.name}: elu with alpha, scale, input_scale = {numbers!r}")
    return _float_up(abs(Fraction(scale)) * max(Fraction(1), abs(Fraction(alpha) * Fraction(input_scale))))


def _leaf_modules(model: nn.Module, example: Tensor) -> tuple[list[tuple[str, nn.Module, tuple, tuple]], bool]:
    """(name, module, input shape, output shape) of the leaf modules a forward on example reaches, in
    order; and whether they form a chain: each called with one tensor, the previous one's output
    (the first with the input), and the model returning the last one's output."""
    found = []
    hooks = []
    tracer = _Tracer()
    leaves: list[str] = []
    chain = {"ok": True, "last": example}
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in leaves):
            continue  # the model itself, or inside a module already taken whole
        if isinstance(module, torch.nn.utils.parametrize.ParametrizationList):
            leaves.append(name)  # it computes a weight from other weights: not a layer of the network
            continue
        if tracer.is_leaf_module(module, name):  # the modules torch.fx keeps whole (torch.nn's own)
            leaves.append(name)
            def hook(mod, args, kwargs, out, name=name):
                x = args[0] if args and isinstance(args[0], Tensor) else None
                in_shape = tuple(x.shape[1:]) if x is not None else ()
                if isinstance(mod, nn.RNNBase) and x is not None:  # one sequence: (steps, features)
                    in_shape = tuple(x.shape) if x.dim() == 2 else \
                        (x.shape[0 if not mod.batch_first else 1], x.shape[2]) if x.dim() == 3 else ()
                found.append((name, mod, in_shape, tuple(out.shape[1:]) if isinstance(out, Tensor) else ()))
                chain["ok"] = chain["ok"] and x is chain["last"] and len(args) == 1 and not kwargs
                chain["last"] = out
            hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        result = eval_forward(model, example)
    finally:
        for h in hooks:
            h.remove()
    return found, chain["ok"] and result is chain["last"]


def _layer_cost(module: nn.Module, in_shape: tuple) -> float:
    """A rough cost of bounding one layer, to balance layers over ranks (arbitrary units).

    For a conv: the Lanczos passes, each one application (weight entries times input pixels), plus
    the certificate, a Gram matrix and a Cholesky factorization of size min(p, q) per frequency of
    the (padded) grid, p q min(p, q) each; a dense layer is a conv on one pixel.  The weights (0.08 and
    a fixed 3e6 per layer) are least-squares fits to the ResNet-50 layers' measured times at 64x64
    and 112x112 inputs (correlation 0.90-0.97); other layers cost their input size."""
    weight = getattr(module, "weight", None)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                           nn.ConvTranspose3d, nn.Linear)) and isinstance(weight, Tensor):
        if isinstance(module, nn.Linear):
            p, q, pixels, grid = module.out_features, module.in_features, 1, 1
        else:
            p, q = module.out_channels, module.in_channels // module.groups
            pixels = math.prod(in_shape[1:])
            padding = module.padding if isinstance(module.padding, tuple) else (0,) * len(module.kernel_size)
            pointwise = all(k == 1 for k in module.kernel_size)  # bounded as a matrix
            grid = 1 if pointwise else math.prod(s + 2 * pad for s, pad in zip(in_shape[1:], padding))
        return _bracket_cost(weight.numel(), p, q, pixels, grid)
    return float(math.prod(in_shape))


def _bracket_cost(entries: int, p: int, q: int, pixels: int, grid: int) -> float:
    """_layer_cost of a conv with `entries` weight entries, p x q channel matrices, on `pixels` input
    positions and a circulant grid of `grid` (1 and 1 for a matrix)."""
    return float(entries * pixels + 0.08 * grid * p * q * min(p, q) + 3e6)


def _bound_functional_layers(traced: torch.fx.GraphModule, calls: dict[torch.fx.Node, dict],
                             folds: dict[torch.fx.Node, "_Fold"], rtol: float,
                             computed: dict[torch.fx.Node, Tensor | None],
                             group: object, progress: bool = False) -> dict[torch.fx.Node, "LayerBound | _Unsupported"]:
    """The bracket of every functional layer (calls: _layer_arguments), its BatchNorm folded in where
    folds has one, in graph order; for a layer with none, the _Unsupported saying why.  One process
    stops at the first such layer (the network's bound is then inf).  With a process group of
    several ranks the layers are shared out as _bound_layers shares the modules (F.conv2d in a
    custom forward, and a conv module after a pad, rewritten as one), and the results
    all-gathered: every rank returns the same.  ``progress``: a progress bar over this rank's layers."""
    nodes = list(calls)
    world, rank = (dist.get_world_size(group), dist.get_rank(group)) if group is not None else (1, 0)
    if world > 1:
        owner = _share_out([_functional_cost(traced, node, calls[node], computed, folds.get(node)) for node in nodes],
                           world)
    else:
        owner = [0] * len(nodes)
    results: dict[str, LayerBound | _Unsupported] = {}
    failure = None
    mine = [node for node, r in zip(nodes, owner) if r == rank]
    iterator = _util.progress(mine, "lipfast: functional layer bounds", "layer") if progress and mine else mine
    with conv.reused_buffers():  # as _bound_layers: the conv layers' Gram matrices reuse one set of buffers
        for node in iterator:
            fold = folds.get(node)
            try:
                if fold is not None:
                    layer = _with_margin(_functional_layer(traced, node, calls[node], rtol, computed, fold.weight,
                                                           fold.groups), fold)
                else:
                    layer = _functional_layer(traced, node, calls[node], rtol, computed)
                results[node.name] = layer
            except _Unsupported as exc:
                results[node.name] = exc
                if world == 1:
                    break
            except Exception as exc:  # re-raised on every rank after the exchange (no rank left waiting)
                if world == 1:
                    raise
                failure = f"{node.name}: {type(exc).__name__}: {exc}"
                break
    if world > 1:
        _exchange(results, failure, world, group)
    return {node: results[node.name] for node in nodes if node.name in results}


def _exchange(results: dict, failure: str | None, world: int, group: object) -> None:
    """Adds every rank's results to this rank's (all-gathered), or raises on every rank where
    some rank failed (failure: what went wrong there; None on a rank where nothing did)."""
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (results, failure), group=group)
    failures = [f"rank {r}: {f}" for r, (_, f) in enumerate(gathered) if f is not None]
    if failures:
        raise RuntimeError("lipfast.lipschitz_bound: bounding layers failed on " + "; ".join(failures))
    for part, _ in gathered:
        results.update(part)


def _functional_cost(traced: torch.fx.GraphModule, node: torch.fx.Node, arguments: dict,
                     computed: dict[torch.fx.Node, Tensor | None], fold: "_Fold | None") -> float:
    """_layer_cost of a functional layer: that of the nn.Linear or nn.ConvNd it computes as (its
    weight's shape, the input size the shape propagation recorded); a small constant for the rest."""
    in_shape = _example_shape(arguments["input"])
    if node.target in (F.batch_norm, F.prelu):
        return float(math.prod(in_shape))
    try:
        weight = fold.weight if fold is not None else _tensor_value(traced, node, arguments["weight"], computed, "weight")
    except _Unsupported:
        return 0.0
    if node.target is F.linear or weight.dim() < 3 or not in_shape:
        return _bracket_cost(weight.numel(), weight.shape[0], weight[0].numel(), 1, 1)
    transposed = node.target.__name__.startswith("conv_transpose")
    p, q = (weight.shape[1], weight.shape[0]) if transposed else (weight.shape[0], weight.shape[1])
    pixels = math.prod(in_shape[1:])
    return _bracket_cost(weight.numel(), p, q, pixels, 1 if all(k == 1 for k in weight.shape[2:]) else pixels)


def _share_out(costs: list[float], world: int) -> list[int]:
    """The rank for each item: longest first, each to the least loaded rank (ties: the lowest rank)."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += costs[i]
    return owner


def _bound_dense_layers(items: list, rtol: float, results: dict[tuple[str, tuple, tuple], LayerBound]) -> list:
    """Brackets every layer of ``items`` whose norm is that of a few matrices (nn.Linear, and 1-tap
    convs that pad with zeros: conv.dense_form), all in one batched call, into ``results``; each
    shares the call's time equally.  Returns the other items.  The call is conv.dense_brackets (one
    Gram product and one Cholesky test per matrix), or where that does not certify every matrix,
    spectral_norm_bounds_many (Gram iteration); where that fails too (a NaN weight, say), those
    layers are left to the one-by-one path, which names the layer."""
    dense, rest = [], []
    for item in items:
        name, module, in_shape, _ = item
        matrices = None
        if not isinstance(module, tuple(_REGISTRY)) and isinstance(module, (nn.Linear, *_CONVS)):
            try:
                matrices = conv.dense_form(module, in_shape[1:] if isinstance(module, _CONVS) else None)
            except (TypeError, ValueError):
                matrices = None  # the one-by-one path reports it
        (dense if matrices is not None else rest).append((item, matrices))
    if not dense:
        return items
    t0 = time.perf_counter()
    flat = [matrix for _, matrices in dense for matrix in matrices.reshape(-1, *matrices.shape[-2:])]
    pairs = conv.dense_brackets(flat, rtol, linalg.DEFAULT_MAX_ITERS)
    brackets = []  # per layer: the largest lower and upper end over its matrices
    if pairs is not None:
        start = 0
        for _, matrices in dense:
            mine = pairs[start : start + matrices.shape[:-2].numel()]
            brackets.append((max(lower for lower, _ in mine), max(upper for _, upper in mine)))
            start += len(mine)
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the gap is in the report
                many = linalg._gram_iteration_bounds_many([m for _, m in dense], rtol)
        except ValueError:
            return items
        brackets = [(float(lower.max()), float(upper.max())) for lower, upper in many]
    share = (time.perf_counter() - t0) / len(dense)
    for ((name, module, in_shape, out_shape), _), (lower, upper) in zip(dense, brackets):
        results[name, in_shape, out_shape] = LayerBound(name, type(module).__name__, in_shape, out_shape, lower, upper, share)
    return [item for item, _ in rest]


def _weight_hooks() -> tuple:
    """Forward pre-hooks that only recompute a module's weight from other tensors (torch's
    spectral_norm, weight_norm and pruning; lipfast.nn's input-size record), which the layer's
    constant, read from the weight they leave, already covers."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return SpectralNorm, WeightNorm, BasePruningMethod


def _spatial_dims(kind: object) -> int | None:
    """The number of spatial dims of a torch.nn layer class (or torch.nn.functional function) made
    for a fixed number of them (Conv2d, MaxPool3d, F.max_pool2d, ReflectionPad1d, ...); None for
    the rest."""
    for cls in (kind.__mro__ if isinstance(kind, type) else (kind,)):
        if getattr(cls, "__module__", "").startswith(("torch.nn.modules", "torch.nn.functional", "torch._C._nn")):
            found = re.search(r"([123])d(_with_indices)?$", cls.__name__)
            return int(found.group(1)) if found else None
    return None


def _unbatched_note(module: nn.Module, input_shape: tuple[int, ...]) -> str:
    """Why a layer made for a fixed number of spatial dims has no constant here ("" where it has):
    called on an input with no batch dim (x[:, 0] into a Conv2d: (1, H, W), which it takes as one
    example of 1 channel), it does not compute what its constant on (channels, *spatial) bounds."""
    dims = _spatial_dims(type(module))
    # (a BatchNorm1d takes (N, C) batched: the layers whose constants read the spatial sizes only)
    laid_out = isinstance(module, _CONVS) or any(cls.__module__ in ("torch.nn.modules.pooling", "torch.nn.modules.padding")
                                                 for cls in type(module).__mro__)
    if dims is None or not laid_out or isinstance(module, _ONE) or len(input_shape) != dims:
        return ""
    return (f"called on an input of shape {(1, *input_shape)} with no batch dim (it takes the example's batch dim "
            "for its channels): no constant")


def _hooks_note(module: nn.Module) -> str:
    """Why the module's forward hooks could make it compute something its constant does not cover
    ("" where they cannot): a forward hook may replace the output, a pre-hook the input."""
    from lipfast.nn import _record_input_size

    kinds = _weight_hooks()
    pre = [h for h in (*module._forward_pre_hooks.values(), *torch.nn.modules.module._global_forward_pre_hooks.values())
           if not (isinstance(h, kinds) or h is _record_input_size)]
    post = [*module._forward_hooks.values(), *torch.nn.modules.module._global_forward_hooks.values()]
    if not pre and not post:
        return ""
    names = ", ".join(getattr(h, "__qualname__", type(h).__name__) for h in pre + post)
    return f"forward hooks ({names}) may change its input or output: no constant (remove them to bound it)"


def _as_called(module: nn.Module, in_shape: tuple, out_shape: tuple) -> nn.Module:
    """The module as the call applied it.  A transposed conv called with output_size picks its
    output_padding then, and a larger output_padding adds output rows, and with them norm: the
    bound is for a shallow copy (the same weights) holding the output_padding the call used."""
    if not isinstance(module, nn.modules.conv._ConvTransposeNd) or len(out_shape) != len(in_shape):
        return module
    used = tuple(
        out - ((n - 1) * s - 2 * p + d * (k - 1) + 1)
        for n, out, s, p, d, k in zip(in_shape[1:], out_shape[1:], module.stride, module.padding, module.dilation,
                                      module.kernel_size)
    )
    if used == tuple(module.output_padding):
        return module
    called = copy.copy(module)  # shares the parameters; the attribute set below is the copy's own
    called.output_padding = used
    return called


@dataclass
class _Fold:
    """A conv (or Linear) layer next to a BatchNorm on running statistics, with nothing else using
    the value between them: the two are one linear map, the layer with each output channel (each
    input channel, for a BatchNorm before it) scaled by the BatchNorm's gamma / sqrt(running_var +
    eps), plus a constant, often of much smaller norm than the product of the two constants.
    `weight` is that scaled weight in the layer's type; `margin` bounds the norm of its difference
    from the exact product (rounding), added to the bracket's upper end and taken from its lower end."""

    norm: torch.fx.Node  # the BatchNorm's call (a module's, or F.batch_norm); or the 1x1 conv or linear layer merged in
    weight: Tensor
    margin: float
    before: bool = False  # the BatchNorm comes before the layer
    groups: int | None = None  # the merged layer's groups (1), where it is not the layer's own
    also: tuple[torch.fx.Node, ...] = ()  # the nodes merged in after norm (a 1x1 conv or linear layer, and its BatchNorm), in order
    merged: bool = False  # a layer after it is merged in (_merged_weight)


#: per floating type: the unit roundoff, and the spacing of its subnormals
_ROUNDING = {torch.float64: (2.0**-53, 2.0**-1074), torch.float32: (2.0**-24, 2.0**-149),
             torch.float16: (2.0**-11, 2.0**-24), torch.bfloat16: (2.0**-8, 2.0**-133)}


def _padding_copies(padding_mode: str, padding, dilation: tuple, kernel: tuple, spatial: tuple) -> int:
    """The most times a conv's padding repeats one input entry (1 for zeros; circular wraps, reflect
    mirrors once per side, replicate repeats the edges): its norm squared at most."""
    if padding_mode == "zeros":
        return 1
    if isinstance(padding, str):
        totals = [0 if padding == "valid" else d * (k - 1) for d, k in zip(dilation, kernel)]
    else:
        totals = [2 * p for p in padding]
    copies = 1
    for total, n in zip(totals, spatial):
        if padding_mode == "circular":
            copies *= 1 + 2 * -(-total // (2 * n))
        elif padding_mode == "reflect":
            copies *= 3 if total else 1
        else:
            copies *= 1 + total
    return copies


def _folded_weight(weight: Tensor, scale: Tensor, copies: int) -> tuple[Tensor, float] | None:
    """(W', margin): a conv's or linear layer's weight times `scale` (float64, broadcast to the
    weight: a BatchNorm's s = gamma / sqrt(running_var + eps) along the output or input channels), in
    the weight's type; and a bound on the norm of the map of W' - scale W (rounding), the padding
    repeating each input entry at most `copies` times.  None where the scaled weight is not finite."""
    if weight.dtype not in _ROUNDING:
        return None
    scaled = (weight.detach().double() * scale).to(weight.dtype)
    if not torch.isfinite(scaled).all():
        return None
    # each entry w' of W' is the exact product w s times (1 + d), |d| <= 2^-50 (float64: the sum,
    # root, quotient and product, each within 2^-53), then rounded to the weight's type: within u
    # (its unit roundoff) of that, plus its subnormal step (Higham's model); so |w' - w s| <= ((u +
    # 2^-50) |w'| + step) / (1 - u) with room to spare.  The map of those errors E is a sum over taps
    # of the tap's matrix E_t applied after the padding and a selection of distinct positions, so
    # ‖E‖ <= sqrt(copies) sum_t ‖E_t‖_F
    unit, step = _ROUNDING[weight.dtype]
    taps = scaled.double().abs().reshape(*scaled.shape[:2], -1)
    per_tap = torch.linalg.vector_norm((taps * (unit + 2.0**-50) + step) / (1 - unit), dim=(0, 1))
    return scaled, math.sqrt(copies) * float(per_tap.sum()) * (1 + 1e-9)


def _merged_weight(first: Tensor, groups: int, second: Tensor, copies: int) -> tuple[Tensor, float] | None:
    """(M, margin): the weight of the map x -> second(first(x)), a linear layer (second (d, o)) or
    1x1 conv (second (d, o, 1, ...)) applied to a linear or conv layer's output (first (o, i / groups,
    *kernel)): M[d, c] = sum_o second[d, o] first[o, c], with first made dense over the groups (one
    conv of groups 1, first's other settings), formed in float64 and rounded to first's type; and a
    bound on the norm of the map of M - the exact product, the padding repeating each input entry at
    most `copies` times.  None where it is not finite or the types are not floating."""
    if first.dtype not in _ROUNDING or second.dtype != first.dtype:
        return None
    out_c, in_per_group = first.shape[:2]
    mix = second.detach().double().reshape(second.shape[0], second.shape[1])
    # output channel o of group g reads input channels g (in / groups) + j: M's columns of group g
    # are mix's columns of g's outputs times first's rows of them (the dense first's other entries
    # are zeros: groups times fewer flops, 1080 x 1080 x 49 for a depthwise 7x7 before a pointwise)
    per_group = first.detach().double().reshape(groups, out_c // groups, -1)  # (g, o_g, in_g * taps)
    mix_g = mix.reshape(mix.shape[0], groups, out_c // groups).transpose(0, 1)  # (g, d, o_g)
    shape = (mix.shape[0], in_per_group * groups, *first.shape[2:])

    def product(a: Tensor, b: Tensor) -> Tensor:  # (g, d, in_g * taps) -> (d, in, *kernel)
        return torch.bmm(a, b).reshape(groups, shape[0], in_per_group, -1).transpose(0, 1).reshape(shape)

    exact_abs = product(mix_g.abs(), per_group.abs())
    merged = product(mix_g, per_group).to(first.dtype)
    if not torch.isfinite(merged).all() or not torch.isfinite(exact_abs).all():
        return None
    # each float64 entry is a sum of o products: within gamma(o) of its sum of |products| (Higham 3.5),
    # then rounded to first's type (within u |m'| + step, with u + 2^-50 covering the float64 error's
    # effect); the map of the errors E, a sum over taps of E_t after the padding and a selection of
    # distinct positions, has ‖E‖ <= sqrt(copies) sum_t ‖E_t‖_F (as _folded_weight's)
    unit, step = _ROUNDING[first.dtype]
    gamma64 = out_c * 2.0**-53 / (1 - out_c * 2.0**-53)
    error = (exact_abs * gamma64 * (1 + unit) + merged.double().abs() * unit + step) / (1 - unit)
    per_tap = torch.linalg.vector_norm(error.reshape(*error.shape[:2], -1), dim=(0, 1))
    return merged, math.sqrt(copies) * float(per_tap.sum()) * (1 + 1e-9)


#: elementwise activations by their slope interval [a, b] (the derivative's range, or the divided
#: differences' for the piecewise-linear ones): modules, functions, methods
_INTERVALS_MODULES = {nn.ReLU: (0.0, 1.0), nn.ReLU6: (0.0, 1.0), nn.Tanh: (0.0, 1.0), nn.Softplus: (0.0, 1.0),
                   nn.Sigmoid: (0.0, 0.25), nn.Hardtanh: (0.0, 1.0)}
_INTERVALS_FUNCTIONS = {torch.relu: (0.0, 1.0), F.relu: (0.0, 1.0), torch.relu_: (0.0, 1.0), F.relu_: (0.0, 1.0),
                     F.relu6: (0.0, 1.0), torch.tanh: (0.0, 1.0), F.tanh: (0.0, 1.0),
                     torch.sigmoid: (0.0, 0.25), F.sigmoid: (0.0, 0.25)}
_INTERVALS_METHODS = {"relu": (0.0, 1.0), "relu_": (0.0, 1.0), "tanh": (0.0, 1.0), "tanh_": (0.0, 1.0),
                   "sigmoid": (0.0, 0.25), "sigmoid_": (0.0, 0.25)}


def _slope_interval(node: torch.fx.Node, value: torch.fx.Node) -> tuple[float, float] | None:
    """[a, b] containing every divided difference of the elementwise activation node applies to value
    (nothing else of the input reaching it), or None where node is not such a call.  Softplus:
    sigmoid-shaped derivative in (0, 1), linear above its threshold; Hardtanh: 0 or 1; LeakyReLU(s):
    s or 1; ELU(alpha >= 0): alpha e^x in (0, alpha] below 0, 1 above."""
    if node.args[:1] != (value,):
        return None
    if node.op == "call_module":
        module = _stored_module(node)
        if module is None or len(node.args) != 1 or node.kwargs or not _plain_torch_layer(module):
            return None
        if type(module) in _INTERVALS_MODULES:
            if isinstance(module, nn.Hardtanh) and not module.min_val < module.max_val:
                return None
            return _INTERVALS_MODULES[type(module)]
        if type(module) is nn.LeakyReLU:
            s = float(module.negative_slope)
            return (min(s, 1.0), max(s, 1.0)) if math.isfinite(s) else None
        if type(module) is nn.ELU and module.alpha >= 0 and math.isfinite(module.alpha):
            return 0.0, max(1.0, float(module.alpha))
        return None
    if node.op == "call_function" and node.target in _INTERVALS_FUNCTIONS:
        extra = dict(node.kwargs)
        extra.pop("inplace", None)
        return _INTERVALS_FUNCTIONS[node.target] if len(node.args) == 1 and not extra else None
    if node.op == "call_function" and node.target is F.leaky_relu:
        s = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        if len(node.args) > 3 or set(node.kwargs) - {"negative_slope", "inplace"} or not _number(s):
            return None
        return min(float(s), 1.0), max(float(s), 1.0)
    if node.op == "call_method" and node.target in _INTERVALS_METHODS and len(node.args) == 1 and not node.kwargs:
        return _INTERVALS_METHODS[node.target]
    return None


def _residual_sum(node: torch.fx.Node, a: torch.fx.Node, b: torch.fx.Node) -> bool:
    """Whether node computes a + b (either order), nothing scaled."""
    plain = (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)) or \
        (node.op == "call_method" and node.target in ("add", "add_"))
    extra = dict(node.kwargs)
    if extra.pop("alpha", 1) != 1 or isinstance(node.kwargs.get("alpha"), bool):
        return False
    return plain and not extra and len(node.args) == 2 and set(node.args) == {a, b} and a is not b


def _chain_refinements(traced: torch.fx.GraphModule, leaves: list, folds: dict[torch.fx.Node, _Fold],
                       constants: dict[str, float], rtol: float, calls: dict[torch.fx.Node, dict],
                       computed: dict[torch.fx.Node, Tensor | None], uppers: dict[torch.fx.Node, float]
                       ) -> dict[torch.fx.Node, tuple[torch.fx.Node, float, str]]:
    """Chains of Linear or conv modules with elementwise activations between them, each value between
    them used by the next step alone (a BatchNorm folded into its layer counts as the layer),
    bounded as one map by _chains.chain_bounds (module calls, or functional ones: calls their
    arguments, uppers their brackets' upper ends): per chain end (a layer after the first, or the sum of
    the chain and its input: a residual block), (the chain's input, its constant, a label for the
    report; only the last end is labelled).  Their inequalities are in lipfast/_chains.py."""
    counts = _module_calls(traced)
    shapes = {name: (in_shape, out_shape) for name, _, in_shape, out_shape in leaves}

    def piece(node: torch.fx.Node):  # (Piece, its value's node (after a BatchNorm folded in), input, in and out shapes)
        try:
            found = _layer_call(traced, node, calls, computed, counts, shapes)
            if found is None:
                return None
            source, weight, settings, in_shape, out_shape = found
            fold = folds.get(node)
            # a BatchNorm that _folds left alone (its scale is the same on every channel) is folded here
            norm = _running_norm(traced, next(iter(node.users)), calls, computed, counts, uniform=True) \
                if fold is None and len(node.users) == 1 else None
        except _Unsupported:
            return None
        upper = constants.get(node.target, math.inf) if node.op == "call_module" else uppers.get(node, math.inf)
        margin, value = 0.0, node
        if fold is not None:
            if fold.before or fold.also or fold.merged or fold.groups is not None or fold.norm.args[:1] != (node,):
                return None
            weight, margin, value = fold.weight, fold.margin, fold.norm
        elif norm is not None and norm[0] is node:
            if norm[1].numel() != weight.shape[0] or (settings is None and len(out_shape) != 1):
                return None
            copies = _layer_copies(weight, settings, in_shape)
            folded = _folded_weight(weight, norm[1].reshape(-1, *[1] * (weight.dim() - 1)), copies) \
                if copies is not None else None
            if folded is None:
                return None
            (weight, margin), value = folded, next(iter(node.users))
            # the layer's bracket is the unscaled layer's: ‖diag(s) W‖ <= max |s| ‖W‖, and the stored
            # folded weight is within the margin of diag(s) W
            upper = _sum_up([_mul_up(upper, float(norm[1].abs().max()) * (1 + 2.0**-50)), margin])
        if weight.dtype not in (torch.float32, torch.float64) or not math.isfinite(upper):
            return None
        op = None
        if settings is not None:
            try:
                op = conv.conv_operator("lipschitz_bound", weight, in_shape[1:], settings["stride"], settings["padding"],
                                        settings["dilation"], settings["groups"], settings["padding_mode"])
            except (TypeError, ValueError):
                return None
        return _chains.Piece(weight, op, margin, upper), value, source, in_shape, out_shape

    def onward(value: torch.fx.Node):  # (value past the identities that alone use it, its one user or None)
        while len(value.users) == 1:
            user = next(iter(value.users))
            module = _stored_module(user) if user.op == "call_module" else None
            if not (isinstance(module, _IDENTITIES) and user.args == (value,) and not user.kwargs and
                    _plain_torch_layer(module)):
                return value, user
            value = user
        return value, None

    refined: dict[torch.fx.Node, tuple[torch.fx.Node, float, str]] = {}
    inside: set[torch.fx.Node] = set()
    for node in traced.graph.nodes:
        if node in inside or (first := piece(node)) is None:
            continue
        source = first[2]
        if not isinstance(source, torch.fx.Node) or _changed_in_place(source):
            continue
        steps, slopes = [first], []
        while True:
            value, act = onward(steps[-1][1])
            interval = _slope_interval(act, value) if act is not None else None
            if interval is None:
                break
            value, following = onward(act)
            found = piece(following) if following is not None else None
            if found is None and following is not None and len(following.users) == 1 and \
                    calls.get(pad_user := next(iter(following.users)), {}).get("input") is value:
                following, found = pad_user, piece(pad_user)  # (a copying pad, merged into the conv after it)
            if found is None or found[2] is not value:
                break
            steps.append(found)
            slopes.append(interval)
            inside.add(following)
        end, add = onward(steps[-1][1])
        shortcut = None
        if add is not None and not _residual_sum(add, end, source):
            # or the sum with a shortcut: one layer (a BatchNorm folded in) on the same input
            other = [a for a in add.args if a is not end]
            layer_node = other[0] if len(other) == 1 and isinstance(other[0], torch.fx.Node) else None
            try:
                if layer_node is not None and layer_node.args and \
                        _layer_call(traced, layer_node, calls, computed, counts, shapes) is None:
                    layer_node = layer_node.args[0]  # (a BatchNorm's node: the layer before it)
            except _Unsupported:
                layer_node = None
            found = piece(layer_node) if isinstance(layer_node, torch.fx.Node) else None
            if found is not None and found[2] is source and onward(found[1]) == (other[0], add) and \
                    _residual_sum(add, end, other[0]) and found[4] == steps[-1][4]:
                shortcut = found
            else:
                add = None
        elif add is not None and steps[0][3] != steps[-1][4]:
            add = None
        if len(steps) < 2 and add is None:
            continue
        try:
            found = _chains.chain_bounds([s[0] for s in steps], slopes, add is not None, rtol,
                                         shortcut[0] if shortcut is not None else None)
        except Exception:  # (a chain the bound does not fit after all: the rules' bound stands)
            found = None
        if found is None:
            continue
        G, R = found
        label = f"{_node_label(node)} .. {_node_label(end)}" + (
            "" if add is None else " + its input" if shortcut is None else f" + {_node_label(shortcut[1])}")
        for j in range(1, len(steps)):
            refined[steps[j][1]] = (source, G[j], "" if add is not None or j < len(steps) - 1 else label)
        if add is not None:
            refined[add] = (source, R, label)
    return refined


def _norm_scale(var: Tensor, gamma: Tensor | None, eps: float, *, uniform: bool = False) -> Tensor | None:
    """A BatchNorm's per-channel scale gamma / sqrt(running_var + eps) in float64; None where every
    |s| is equal, where folding could narrow nothing (‖diag(s) W‖ >= min |s| ‖W‖), unless uniform."""
    var = var.detach().double()
    gamma = gamma.detach().double() if gamma is not None else torch.ones_like(var)
    scale = gamma / torch.sqrt(var + eps)
    return None if not uniform and float(scale.abs().max()) <= float(scale.abs().min()) * (1 + 1e-4) else scale


def _with_margin(layer: LayerBound, fold: _Fold) -> LayerBound:
    """The bracket of a layer with its BatchNorm folded in, widened by the fold's margin."""
    if not math.isfinite(layer.upper):
        return layer
    labels = [_node_label(node) for node in (fold.norm, *fold.also)]
    chain = ([labels[0], layer.name] + labels[1:]) if fold.before else [layer.name] + labels  # in the order applied
    return replace(layer, lower=max(layer.lower - fold.margin, 0.0), upper=_sum_up([layer.upper, fold.margin]),
                   note=f"{', '.join(labels)} folded in: the bracket is of {' after '.join(reversed(chain))}")


def _called_once(traced: torch.fx.GraphModule, node: torch.fx.Node, counts: collections.Counter) -> nn.Module | None:
    """The module a call_module node calls, where the graph calls it once and it computes as its
    torch.nn class does (_plain_torch_layer); None otherwise.  counts: _module_calls(traced)."""
    module = traced.get_submodule(node.target)
    return module if counts[node.target] == 1 and _plain_torch_layer(module) else None


def _layer_call(traced: torch.fx.GraphModule, node: torch.fx.Node, calls: dict[torch.fx.Node, dict],
                computed: dict[torch.fx.Node, Tensor | None], counts: collections.Counter, shapes: dict):
    """(input node, weight, settings, input shape, output shape) of a linear or conv layer's call: a
    Linear or (not transposed) ConvNd module called once on one input (_called_once; shapes: its
    leaf's, by name), or F.linear / F.conv1d/2d/3d (calls: their arguments, whose input is past a
    copying pad merged into them); settings None for a linear layer, else the conv's padding_mode,
    padding (a tuple, or "same" / "valid"), dilation (a tuple), stride and groups.  None for any
    other node; _Unsupported where a functional layer's weight cannot be had."""
    if node.op == "call_module" and node.target in shapes and (module := _called_once(traced, node, counts)) is not None:
        if isinstance(module, nn.Linear):
            settings = None
        elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            settings = dict(padding_mode=module.padding_mode, padding=module.padding, dilation=module.dilation,
                            stride=module.stride, groups=module.groups)
        else:
            return None
        if len(node.args) != 1 or node.kwargs:
            return None
        return (node.args[0], module.weight.detach(), settings, *shapes[node.target])
    if node in calls and node.target in (F.conv1d, F.conv2d, F.conv3d, F.linear):
        arguments = calls[node]
        weight = _tensor_value(traced, node, arguments["weight"], computed, "weight")
        dims = weight.dim() - 2
        padding = arguments.get("padding", 0)
        settings = None if node.target is F.linear else dict(
            padding_mode=arguments.get("padding_mode", "zeros"),
            padding=padding if isinstance(padding, str) else _as_tuple(padding, dims),
            dilation=_as_tuple(arguments.get("dilation", 1), dims), stride=arguments.get("stride", 1),
            groups=arguments.get("groups", 1))
        return arguments["input"], weight, settings, _example_shape(arguments["input"]), _example_shape(node)
    return None


def _running_norm(traced: torch.fx.GraphModule, node: torch.fx.Node, calls: dict[torch.fx.Node, dict],
                  computed: dict[torch.fx.Node, Tensor | None], counts: collections.Counter, *,
                  uniform: bool = False) -> tuple[object, Tensor] | None:
    """(input, per-channel scale) of a BatchNorm on running statistics (a module called once, or
    F.batch_norm in eval mode); None for any other node, and (unless uniform) where every channel's
    scale is the same (_norm_scale)."""
    if node.op == "call_module":
        module = _called_once(traced, node, counts)
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.running_var is None or \
                len(node.args) != 1 or node.kwargs:
            return None
        var, gamma, eps, source = module.running_var, module.weight, module.eps, node.args[0]
    elif node in calls and node.target is F.batch_norm:
        arguments = calls[node]
        eps = arguments.get("eps", 1e-5)
        if arguments.get("training", False) is not False or not isinstance(eps, (int, float)) or \
                isinstance(eps, bool):
            return None
        var = _tensor_value(traced, node, arguments["running_var"], computed, "running_var")
        gamma = arguments.get("weight")
        gamma = _tensor_value(traced, node, gamma, computed, "weight") if gamma is not None else None
        source = arguments.get("input")
    else:
        return None
    if var.dim() != 1 or (gamma is not None and gamma.shape != var.shape):
        return None
    scale = _norm_scale(var, gamma, eps, uniform=uniform)
    return (source, scale) if scale is not None else None


def _layer_copies(weight: Tensor, settings: dict | None, in_shape: tuple) -> int | None:
    """The most times the layer's padding repeats one input entry (_padding_copies; 1 for a linear
    layer); None where the weight does not fit the input's dims."""
    if settings is None:
        return 1 if weight.dim() == 2 else None
    if len(in_shape) != weight.dim() - 1:
        return None
    return _padding_copies(settings["padding_mode"], settings["padding"], settings["dilation"],
                           tuple(weight.shape[2:]), in_shape[1:])


def _folds(traced: torch.fx.GraphModule, leaves: list, calls: dict[torch.fx.Node, dict],
           computed: dict[torch.fx.Node, Tensor | None]) -> dict[torch.fx.Node, _Fold]:
    """The conv (Conv1d/2d/3d, F.conv1d/2d/3d) and linear layers of the graph next to a BatchNorm on
    running statistics (a module's, or F.batch_norm's) with that BatchNorm folded into the weight
    (_Fold), by the layer's node: a BatchNorm that is the layer's only user, or else one whose only
    user is the layer (for a linear layer, also through a flatten of its channels and positions;
    and through eval-mode Dropouts and Identities, the identity in the eval-mode network bounded).
    A module must be called once and keep no hooks; each BatchNorm is folded once (twice would
    count its scale twice); calls: the functional layers' arguments (_layer_arguments)."""
    counts = _module_calls(traced)
    shapes = {name: (in_shape, out_shape) for name, _, in_shape, out_shape in leaves}

    def plain(node: torch.fx.Node) -> nn.Module | None:
        return _called_once(traced, node, counts)

    def layer(node: torch.fx.Node):
        return _layer_call(traced, node, calls, computed, counts, shapes)

    def norm(node: torch.fx.Node):
        return _running_norm(traced, node, calls, computed, counts)

    def flattened(node: torch.fx.Node) -> torch.fx.Node | None:  # x for a flatten of dims 1 to -1 of x
        name = _call_name(node)
        if not node.args or not isinstance(node.args[0], torch.fx.Node) or node.kwargs:
            return None
        if node.op == "call_module":
            module = traced.get_submodule(node.target)
            ok = type(module) is nn.Flatten and (module.start_dim, module.end_dim) == (1, -1) and len(node.args) == 1
        elif node.op in ("call_function", "call_method") and name == "flatten":  # (x, 1) or (x, 1, -1)
            ok = tuple(node.args[1:]) in ((1,), (1, -1))
        elif node.op in ("call_function", "call_method") and name in ("view", "reshape"):  # to (batch, -1)
            source = node.args[0]  # its shape, batch dim included: from the module calls where it is one
            full = (1, *shapes[source.target][1]) if source.op == "call_module" and source.target in shapes \
                else _propagated_shape(source)
            sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            sizes = tuple(full[0] if full is not None and _is_size_of(size, node.args[0], 0) else size for size in sizes)
            ok = full is not None and len(full) > 1 and sizes in (
                (full[0], math.prod(full[1:])), (full[0], -1), (-1, math.prod(full[1:])))
        else:
            ok = False
        return node.args[0] if ok else None

    def through_identities(source, consumer):  # back over eval-mode Dropouts and Identities that feed only consumer
        while isinstance(source, torch.fx.Node) and source.args and isinstance(source.args[0], torch.fx.Node) and \
                all(user is consumer or _reads_size(user) for user in source.users):
            if source.op == "call_module":
                if not isinstance(plain(source), _IDENTITIES) or len(source.args) != 1 or source.kwargs:
                    break
            elif not (source.op == "call_function" and source.target is F.dropout and
                      _dropout_arguments(source)[1] is False):
                break
            source, consumer = source.args[0], source
        return source, consumer

    folds: dict[torch.fx.Node, _Fold] = {}
    folded: set[torch.fx.Node] = set()
    nodes = list(traced.graph.nodes)
    for node in nodes:  # a BatchNorm after the layer: scales its output channels
        try:
            found = layer(node) if len(node.users) == 1 else None
            after = norm(next(iter(node.users))) if found is not None else None
        except _Unsupported:  # a value that could not be had: no fold
            continue
        if after is None or after[0] is not node:
            continue
        _, weight, settings, in_shape, out_shape = found
        if after[1].numel() != weight.shape[0] or (settings is None and len(out_shape) != 1):
            continue  # (BatchNorm1d normalizes a linear layer's features only when its output is 1-D)
        count = _layer_copies(weight, settings, in_shape)
        result = _folded_weight(weight, after[1].reshape(-1, *[1] * (weight.dim() - 1)), count) \
            if count is not None else None
        if result is not None:
            (user,) = node.users
            folds[node], folded = _Fold(user, *result), folded | {user}
    for node in nodes:  # a BatchNorm before the layer (not folded already): scales its input channels
        if node in folds or node in folded:
            continue
        try:
            found = layer(node)
            if found is None:
                continue
            # the value the BatchNorm must feed, and nothing else: the layer's own argument (a copying
            # pad that _with_copying_pad merged into a conv's arguments, which must feed only the conv),
            # or a flatten into a linear layer
            source, consumer, flat = found[0], node, False
            if node.op == "call_function" and node.args and node.args[0] is not source:  # a merged pad
                pad = node.args[0]
                if not (isinstance(pad, torch.fx.Node) and len(pad.users) == 1 and pad.args and pad.args[0] is source):
                    continue
                consumer = pad
            source, consumer = through_identities(source, consumer)
            if isinstance(source, torch.fx.Node) and found[2] is None and len(source.users) == 1 and \
                    (inner := flattened(source)) is not None:
                source, consumer, flat = inner, source, True
                source, consumer = through_identities(source, consumer)
            sole = isinstance(source, torch.fx.Node) and all(  # (besides reads of its size, as x.view(x.size(0), -1))
                user is consumer or _reads_size(user) for user in source.users)
            before = norm(source) if sole else None
        except _Unsupported:
            continue
        if before is None or source in folded:
            continue
        _, weight, settings, in_shape, out_shape = found
        scale = before[1]
        if settings is None:  # a linear layer: its columns are the BatchNorm's channels (times the positions)
            shape = shapes[source.target][1] if source.op == "call_module" and source.target in shapes \
                else _example_shape(source)
            if weight.dim() != 2 or not shape or shape[0] != scale.numel() or \
                    (not flat and len(shape) != 1) or math.prod(shape) != weight.shape[1]:
                continue
            scale = scale.repeat_interleave(math.prod(shape[1:])).reshape(1, -1)
        else:
            if not in_shape or in_shape[0] != scale.numel() or in_shape[0] % weight.shape[1]:
                continue
            groups = in_shape[0] // weight.shape[1]  # input channel of (o, j): (o // (out / groups)) (in / groups) + j
            index = (torch.arange(weight.shape[0])[:, None] // (weight.shape[0] // groups)) * weight.shape[1] + \
                torch.arange(weight.shape[1])[None, :]
            scale = scale.cpu()[index].to(scale.device).reshape(*weight.shape[:2], *[1] * (weight.dim() - 2))
        count = _layer_copies(weight, settings, in_shape)
        result = _folded_weight(weight, scale.to(weight.device), count) if count is not None else None
        if result is not None:
            folds[node], folded = _Fold(source, *result, before=True), folded | {source}
    for node in nodes:  # a linear layer, or a 1x1 conv of stride 1, no padding and groups 1, right after the layer
        fold = folds.get(node)  # (either one may have its BatchNorm folded in: then the three or four are one map)
        if node in folded or (fold is not None and fold.merged):
            continue
        tail = fold.norm if fold is not None and not fold.before else node  # what the layer's output is
        if len(tail.users) != 1:
            continue
        (user,) = tail.users
        second_fold = folds.get(user)
        try:
            found = layer(node)
            following = layer(user) if found is not None and user not in folded and \
                not (second_fold is not None and (second_fold.before or second_fold.merged)) else None
        except _Unsupported:
            continue
        if following is None or following[0] is not tail:
            continue
        first, settings, in_shape = (fold.weight if fold is not None else found[1]), found[2], found[3]
        second, second_settings = (second_fold.weight if second_fold is not None else following[1]), following[2]
        stride, second_groups = (second_settings["stride"], second_settings["groups"]) if second_settings else (1, 1)
        if settings is None:  # linear then linear: each row (the last dim) through both
            if second_settings is not None or first.dim() != 2 or second.dim() != 2:
                continue
            groups = 1
        else:
            dims = first.dim() - 2
            padding = second_settings["padding"] if second_settings is not None else None
            if second.dim() != first.dim() or any(k != 1 for k in second.shape[2:]) or second_groups != 1 or \
                    _as_tuple(stride, dims) != (1,) * dims or not (padding in ("valid", "same") or not any(
                        _as_tuple(padding, dims))) or not in_shape or in_shape[0] % first.shape[1]:
                continue
            groups = in_shape[0] // first.shape[1]
        if second.shape[1] != first.shape[0]:
            continue
        count = _layer_copies(first, settings, in_shape)
        result = _merged_weight(first, groups, second, count) if count is not None else None
        if result is None:
            continue
        merged, margin = result
        # the folded weights' maps are F_a = W_a + E_a and F_b = W_b + E_b, W the exact maps and ‖E‖ within
        # the folds' margins m: W_b W_a - F_b F_a = -E_b F_a - F_b E_a + E_b E_a, so it is at most m_b ‖F_a‖
        # + ‖F_b‖ m_a + m_a m_b, with ‖F_a‖ <= sqrt(copies) sum_t ‖F_a,t‖_F (as _abs_norm's), ‖F_b‖ <= ‖F_b‖_F
        first_margin, second_margin = (fold.margin if fold else 0.0), (second_fold.margin if second_fold else 0.0)
        if first_margin or second_margin:
            crude = math.sqrt(count) * float(torch.linalg.vector_norm(
                first.double().reshape(*first.shape[:2], -1), dim=(0, 1)).sum()) * (1 + 1e-9)
            second_norm = float(torch.linalg.vector_norm(second.double())) * (1 + 1e-9)
            margin = _sum_up([margin, _mul_up(second_margin, crude), _mul_up(second_norm, first_margin),
                              _mul_up(first_margin, second_margin)])
        absorbed = ([fold.norm] if fold is not None else []) + [user] + ([second_fold.norm] if second_fold else [])
        folds[node] = _Fold(absorbed[0], merged, margin, before=fold is not None and fold.before,
                            groups=1 if settings is not None else None, also=tuple(absorbed[1:]), merged=True)
        folds.pop(user, None)
        folded.update(absorbed)
    return folds


def _reads_size(node: torch.fx.Node) -> bool:
    """Whether a use of a value reads only its size (x.size(...), x.shape, x.dim())."""
    return (node.op == "call_method" and node.target in ("size", "dim")) or \
        (node.target is getattr and len(node.args) == 2 and node.args[1] in ("shape", "ndim"))


_SCALAR_ARITHMETIC = frozenset({operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
                                operator.pow, operator.neg})


def _size_scalar(value, depth: int = 0) -> float | None:
    """The number a graph value is when it is computed from sizes of the input's example dims (not the
    batch dim: a batch-dependent number does not fix the map of one example) and numbers, by plain
    arithmetic: x.size(-1), x.shape[2] ** 0.5, x.dim(); None for anything else.  The sizes are those of
    the input shape the graph was traced and propagated for, which fixes them as branches on sizes are."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if not isinstance(value, torch.fx.Node) or depth > 16:
        return None
    if value.op == "call_function" and value.target in _SCALAR_ARITHMETIC and not value.kwargs:
        operands = [_size_scalar(a, depth + 1) for a in value.args]
        if None in operands:
            return None
        try:
            result = value.target(*operands)
        except (ArithmeticError, ValueError):
            return None
        return result if isinstance(result, (int, float)) and math.isfinite(result) else None
    if (value.op == "call_method" and value.target == "dim" and len(value.args) == 1) or \
            (value.target is getattr and len(value.args) == 2 and value.args[1] == "ndim"):
        shape = _propagated_shape(value.args[0])
        return len(shape) if shape is not None else None
    source, dim = _util.size_read(value) or (None, None)
    if not isinstance(dim, int) or isinstance(dim, bool):
        return None
    shape = _propagated_shape(source)
    if shape is None or not -len(shape) <= dim < len(shape) or dim % len(shape) == 0:
        return None  # (dim 0: the batch)
    return shape[dim]


def _size_values(value):
    """value (numbers, strings, None, and lists, tuples and dicts of them) with every graph value in it
    replaced by the number or sizes it is for this input shape (_size_scalar, or a slice of a shape
    that leaves out the batch dim: x.shape[-2:]); None where some graph value is neither."""
    if isinstance(value, torch.fx.Node):
        scalar = _size_scalar(value)
        if scalar is not None:
            return scalar
        source, index = _util.size_read(value) or (None, None)
        shape = _propagated_shape(source) if isinstance(index, slice) else None
        if shape is None or 0 in range(len(shape))[index]:
            return None  # (the batch dim: no part of one example's map)
        return tuple(shape[index])
    if isinstance(value, (list, tuple)):
        items = [_size_values(v) for v in value]
        return None if any(i is None and v is not None for i, v in zip(items, value)) else type(value)(items)
    if isinstance(value, dict):
        items = {k: _size_values(v) for k, v in value.items()}
        return None if any(items[k] is None and value[k] is not None for k in value) else items
    return value


def _is_size_of(value, x: torch.fx.Node, dim: int) -> bool:
    """Whether a graph value is x.size(dim) (or x.shape[dim]): x.view(x.size(0), -1) flattens."""
    read = _util.size_read(value)
    return read is not None and read[0] is x and isinstance(read[1], int) and read[1] == dim


def _node_label(node: torch.fx.Node) -> str:
    """How the report names a call: a module by its name (also where its call was rewritten as the
    function it calls), a function by its node's."""
    if "lipfast_module" in node.meta:
        return node.meta["lipfast_module"][0]
    return node.target if node.op == "call_module" else node.name


def _plain_layer(layer: nn.Module, weight: Tensor, groups: int | None = None) -> nn.Module:
    """A torch.nn Linear or ConvNd with layer's settings (but its output channels, the weight's, and
    groups where given) and the given weight, no bias."""
    if isinstance(layer, nn.Linear):
        module = nn.Linear(layer.in_features, weight.shape[0], bias=False, device="meta")
    else:  # the torch.nn class it computes as (a subclass, or a parametrized one, is not rebuilt)
        base = next(c for c in type(layer).__mro__ if c in (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        module = base(layer.in_channels, weight.shape[0], layer.kernel_size, layer.stride, layer.padding,
                      layer.dilation, layer.groups if groups is None else groups, False, layer.padding_mode,
                      device="meta")
    module.weight = nn.Parameter(weight, requires_grad=False)
    return module


def _bound_layers(leaves: list, rtol: float, progress: bool, group: object,
                  folds: dict[str, _Fold] | None = None) -> list[LayerBound]:
    """A LayerBound for every distinct leaf and input shape (a conv's norm depends on its input's
    size, so a layer called on two sizes is bounded on each), in call order; with a process group,
    each rank bounds its share of the layers and the results are all-gathered (every rank returns
    the same list).  A layer in folds (by name) is bracketed with its BatchNorm folded in (_Fold)."""
    folds = folds or {}
    first_calls: dict[tuple[str, tuple, tuple], tuple] = {}
    for name, module, in_shape, out_shape in leaves:
        module = _plain_layer(module, folds[name].weight, folds[name].groups) if name in folds \
            else _as_called(module, in_shape, out_shape)
        first_calls.setdefault((name, in_shape, out_shape), (name, module, in_shape, out_shape))
    unique = list(first_calls.values())
    world, rank = (dist.get_world_size(group), dist.get_rank(group)) if group is not None else (1, 0)
    owner = _share_out([_layer_cost(m, s) for _, m, s, _ in unique], world) if world > 1 else [0] * len(unique)
    mine = [item for item, r in zip(unique, owner) if r == rank]
    results: dict[tuple[str, tuple, tuple], LayerBound] = {}
    for name, module, in_shape, out_shape in mine:
        note = _hooks_note(module) or _unbatched_note(module, in_shape)
        if note:
            results[name, in_shape, out_shape] = LayerBound(name, type(module).__name__, in_shape, out_shape, 0.0,
                                                            math.inf, 0.0, note)
    mine = [item for item in mine if (item[0], item[2], item[3]) not in results]
    mine = _bound_dense_layers(mine, rtol, results)
    iterator = _util.progress(mine, "lipfast: layer bounds", "layer") if progress and mine else mine
    failure = None
    with conv.reused_buffers():  # the conv layers' Gram matrices reuse one set of buffers
        for name, module, in_shape, out_shape in iterator:
            t0 = time.perf_counter()
            try:
                lower, upper, note = _layer_constant(name, module, in_shape, rtol)
            except Exception as exc:  # re-raised on every rank after the exchange (no rank left waiting)
                failure = f"{name} ({type(module).__name__}): {type(exc).__name__}: {exc}"
                if group is None:
                    raise
                break
            results[name, in_shape, out_shape] = LayerBound(name, type(module).__name__, in_shape, out_shape, lower, upper,
                                                 time.perf_counter() - t0, note)
    if group is not None and world > 1:
        _exchange(results, failure, world, group)
    for key, layer in results.items():
        if layer.name in folds:
            results[key] = _with_margin(layer, folds[layer.name])
    return [results[name, in_shape, out_shape] for name, _, in_shape, out_shape in unique]


def _translated(model: nn.Module, input_shape: tuple[int, ...], notes: list[str]) -> nn.Module:
    """model itself, or for a TorchScript model or an exported program (aten operators), which
    neither torch.fx nor hooks can follow, its translation into a graph of torch functions and
    torch.nn layers, checked against it on a random input (a note says so)."""
    from lipfast import _export, _torchscript

    if _export.is_aten_graph(model):
        kind, translate = "exported program", _export.to_graph_module
        note = "its aten operators followed as torch functions"
    elif isinstance(model, torch.jit.ScriptModule):
        kind, translate = "TorchScript model", lambda script: _torchscript.to_graph_module(script, input_shape)
        note = ("its torch.nn layers rebuilt from their weights where it keeps their settings, the rest followed "
                "through its TorchScript graphs")
    else:
        return model
    batch = _export.fixed_batch(model) if kind == "exported program" else 1
    try:
        with _util.eval_mode(model):  # the eval-mode network: its branches on self.training too
            translated = translate(model)
        _torchscript.check_translation(model, translated, input_shape, batch)
    except _torchscript.InputRejected as exc:
        raise ValueError(f"lipfast.lipschitz_bound: the model does not accept an input of shape {input_shape}: "
                         f"{exc}") from exc
    except ValueError as exc:
        raise ValueError(f"lipfast.lipschitz_bound: cannot follow this {kind}: {exc}") from exc
    except Exception as exc:  # a form the translation did not foresee: refused, plainly
        raise ValueError(f"lipfast.lipschitz_bound: cannot follow this {kind}: its translation failed "
                         f"({type(exc).__name__}: {exc}; pass the Python module instead)") from exc
    notes.append(f"{kind}: {note} (checked against it on a random input)")
    if batch > 1:  # its views and guards fix a batch of `batch`: one example padded with zero examples
        dtype, device = _util.input_type(model)
        translated = _export.one_example(translated, batch, torch.zeros(1, *input_shape, dtype=dtype, device=device))
        notes.append(f"exported for a batch of {batch}: bounded on one example followed by {batch - 1} zero "
                     f"example{'s' if batch > 2 else ''}")
    return translated


def lipschitz_bound(model: nn.Module, input_shape, *, rtol: float = 1e-3, progress: bool = True,
                    group=None) -> LipschitzReport:
    """A certified upper bound on the L2 -> L2 Lipschitz constant of ``model`` on inputs of
    ``input_shape`` (one example, no batch dim), composed over its torch.fx graph; see the module
    docstring.  ``model`` may also be a TorchScript model (scripted or traced) or a program made by
    torch.export (or its ``.module()``): either is translated into such a graph first, and the
    translation checked against it on a random input.  ``progress`` shows a progress bar (tqdm,
    when installed) while layers are bounded.

    With torch.distributed initialized (or a process ``group`` given), the layers are shared out
    across the group's ranks, balanced by a cost estimate (weight entries times input pixels for a
    conv); each rank bounds its share and the results are all-gathered, so every rank returns the
    same report (the single-process one).  Every rank must call it with the same model and
    arguments."""
    from lipfast import _export

    if _export.is_exported_program(model):
        model = model.module()
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod  # torch.compile's wrapper: the module it compiles computes the same function
    if not isinstance(model, nn.Module):
        raise TypeError(f"lipfast.lipschitz_bound: model must be an nn.Module or a torch.export.ExportedProgram, "
                        f"got {type(model).__name__}")
    if isinstance(input_shape, int):
        input_shape = (input_shape,)
    if not isinstance(input_shape, (tuple, list, torch.Size)) or not input_shape or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape):
        raise ValueError(f"lipfast.lipschitz_bound: input_shape must be a non-empty tuple of positive ints, got {input_shape!r}")
    rtol = linalg._check_rtol("lipschitz_bound", rtol)
    start = time.perf_counter()
    notes: list[str] = []
    dtype, device = _util.input_type(model)
    model = _translated(model, tuple(input_shape), notes)
    if _Tracer().is_leaf_module(model, ""):
        model = nn.Sequential(model)  # one layer: make it a module call in the graph (named "0")
    try:
        example = torch.zeros(1, *input_shape, dtype=dtype, device=device)
    except RuntimeError as exc:  # out of memory: an input this large is not one the model can take either
        raise ValueError(f"lipfast.lipschitz_bound: input_shape {tuple(input_shape)} is too large: one example of "
                         f"{math.prod(input_shape)} entries cannot be allocated ({str(exc).splitlines()[0]})") from None
    try:
        leaves, chain = _leaf_modules(model, example)
    except Exception as exc:  # the model rejects this input: say so plainly
        raise ValueError(f"lipfast.lipschitz_bound: the model does not accept an input of shape {tuple(input_shape)}: {exc}") from exc
    if group is not None or (dist.is_available() and dist.is_initialized()):
        from lipfast.distributed import require_group

        group = require_group("lipschitz_bound", group)
    traced, failure = None, None
    try:
        with _util.eval_mode(model):  # the bound is the eval-mode network's: so are its branches on self.training
            try:
                traced = _trace(model)
                again = _trace
            except Exception as plain:  # a branch on the input: on its sizes alone, the trace for this shape holds
                try:
                    traced = _trace_for_shape(model, example)
                    again = functools.partial(_trace_for_shape, example=example)
                except Exception:
                    raise plain from None
                notes.append(f"torch.fx traced it for inputs of shape {tuple(input_shape)}, its branches and loops "
                             f"on sizes decided for that shape (plainly: {type(plain).__name__}: {plain})")
            _mark_drawn_constants(traced, again(model))
            _drop_unused(traced)
    except Exception as exc:  # tracing failed (data-dependent control flow, ...): a chain of the leaves
        traced, failure = None, exc  # (also where the second trace failed: its draws would be unknown)
    calls: dict[torch.fx.Node, dict] = {}  # the functional layers' arguments
    computed: dict[torch.fx.Node, Tensor | None] = {}
    order: dict[str, int] = {}  # the leaf modules in call order (a module rewritten as its function keeps its place)
    for name, *_ in leaves:
        order.setdefault(name, len(order))
    if traced is not None:
        as_functions = _padded_convs_as_functions(traced)
        leaves = [leaf for leaf in leaves if leaf[0] not in as_functions]
        depends = _input_dependent(traced)
        calls = {node: _with_copying_pad(node, arguments) for node in traced.graph.nodes
                 if (arguments := _layer_arguments(node, depends)) is not None}
        weights = {t for node, arguments in calls.items() for t in _layer_tensors(node, arguments) if t.op != "get_attr"}
        weights |= _scaling_tensors(traced, depends)
        if weights or any(_needs_sizes(node) for node in traced.graph.nodes):  # one more forward, only then
            try:
                computed = _propagate(traced, example, weights)
            except Exception:  # nodes then lack sizes, and the rules that need them give no finite bound
                pass
    folds = _folds(traced, leaves, calls, computed) if traced is not None else {}
    # BatchNorm (or a layer merged in) -> the layer it is folded into
    folded_norms = {absorbed: node for node, fold in folds.items() for absorbed in (fold.norm, *fold.also)}
    layers = _bound_layers(leaves, rtol, progress, group,
                           {node.target: fold for node, fold in folds.items() if node.op == "call_module"})
    # a folded BatchNorm module: listed with its own constant, counted in its layer's bracket (and not
    # again in the composition or in naive_upper)
    folded_modules = {norm.target: layer for norm, layer in folded_norms.items() if norm.op == "call_module"}
    layers = [replace(layer, note=f"folded into {_node_label(folded_modules[layer.name])}'s bracket")
              if layer.name in folded_modules else layer for layer in layers]
    uncounted = {id(layer) for layer in layers if layer.name in folded_modules}
    constants: dict[str, float] = {}  # a layer called on several input sizes: the largest of its constants
    for layer in layers:
        constants[layer.name] = max(constants.get(layer.name, 0.0), 1.0 if id(layer) in uncounted else layer.upper)
    for layer in layers:
        if not math.isfinite(layer.upper):
            notes.append(f"{layer.name} ({layer.kind}): {layer.note}")
    method = "fx"
    if traced is None:
        method = "hooks"
        per_call = {(layer.name, layer.input_shape, layer.output_shape): layer.upper for layer in layers}
        upper = _product(*(per_call[name, in_shape, out_shape] for name, _, in_shape, out_shape in leaves))  # every call
        if chain:
            # one path, the zero input's: a branch on the entries can take another for other inputs,
            # and jump between the two (x if x.sum() > 0 else -x has no constant at all)
            notes.append(f"torch.fx could not trace this model ({type(failure).__name__}: {failure}); on the zero input "
                         "its leaf modules formed a chain (each took the previous one's output, and the model "
                         "returned the last one's), and the bound is the product of their constants: NOT "
                         "CERTIFIED, another input may take another path through the forward")
        else:
            notes.append(f"torch.fx could not trace this model ({type(failure).__name__}: {failure}); the bound treats the "
                         "leaf modules as a chain in call order, but they are not one (operations outside modules, "
                         "or a module's input from elsewhere): NOT CERTIFIED, it misses what happens between them")
    else:
        try:
            functional = {}
            bounded = _bound_functional_layers(traced, calls, folds, rtol, computed, group, progress)
            for node, arguments in calls.items():
                layer = bounded.get(node)
                if not isinstance(layer, LayerBound):  # (the first with no bracket: the single process stops there)
                    raise layer if layer is not None else _Unsupported(f"{node.name}: not bounded")
                if node in folded_norms:
                    layer = replace(layer, note=f"folded into {_node_label(folded_norms[node])}'s bracket")
                    uncounted.add(id(layer))
                layers.append(layer)
                functional[node] = (1.0 if node in folded_norms else layer.upper, arguments)
            chains = _chain_refinements(traced, leaves, folds, constants, rtol, calls, computed,
                                        {node: functional[node][0] for node in functional})
            used: list[tuple[str, float, float]] = []
            upper = _compose(traced, constants, functional, computed, chains, used)
            for label, before, after in used:
                notes.append(f"{label}: bounded as one map (lipfast/_chains.py), {after:.6g} where the rules "
                             f"compose {before:.6g}")
        except _Unsupported as exc:  # an operation with no global constant: no finite bound
            upper = math.inf
            notes.append(f"no finite bound: {exc}")
    naive = _product(*(layer.upper for layer in layers if id(layer) not in uncounted))
    layers.sort(key=lambda layer: order.get(layer.name, len(order)))  # (stable: the functions after, in graph order)
    return LipschitzReport(float(upper), float(naive), layers, method, notes, time.perf_counter() - start)


@torch.no_grad()
def certified_accuracy(model: nn.Module, inputs: Tensor, labels: Tensor, eps: float, *,
                       report: LipschitzReport | None = None) -> float:
    """The fraction of ``inputs`` that ``model`` classifies as ``labels`` with a certified L2 radius
    above ``eps`` (global margin radius, :func:`lipfast.certified_radius`, with the bound of
    :func:`lipschitz_bound`, computed unless ``report`` is given)."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"lipfast.certified_accuracy: eps must be a number >= 0, got {eps!r}")
    if not isinstance(inputs, Tensor) or inputs.dim() < 2:
        raise ValueError(f"lipfast.certified_accuracy: inputs must be a batch tensor (N, ...), got "
                         f"{tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__}")
    if inputs.shape[0] == 0:  # a fraction of nothing: 0 would read as a network that certifies nothing
        raise ValueError(f"lipfast.certified_accuracy: inputs holds no examples (shape {tuple(inputs.shape)})")
    if report is None:
        report = lipschitz_bound(model, tuple(inputs.shape[1:]), progress=False)
    if report.method == "hooks":
        raise ValueError("lipfast.certified_accuracy: the network bound is NOT CERTIFIED (torch.fx could not trace "
                         "the model, and the hooks fallback saw one path through its forward): no certified "
                         "accuracy rests on it")
    logits = eval_forward(model, inputs)  # the bound is the eval-mode network's; and nothing is updated
    radius = certified_radius(logits, labels, report.upper)
    correct = logits.argmax(1) == labels.to(logits.device)
    # in float64, where eps is exact (compared with a float32 tensor, eps would be rounded to float32)
    return float((correct & (radius.double() > eps)).double().mean())
