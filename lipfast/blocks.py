"""1-Lipschitz building blocks and Lipschitz-margin losses (exposed as ``lipfast.nn.*``).

* activations that are 1-Lipschitz and preserve gradient norms: :class:`GroupSort` (MaxMin for
  groups of 2; Anil et al. 2019) and :class:`Abs`;
* :class:`SLLBlock`: the SDP-based Lipschitz residual layer of Araujo et al. (ICLR 2023),
  x ↦ x − 2 Wᵀ T⁻¹ relu(W x + b), 1-Lipschitz by construction (dense form);
* :func:`orthogonal`: Björck–Bowie orthonormalization of a Linear weight (Anil et al. 2019);
* :func:`aol`: the almost-orthogonal rescaling of Prach and Lampert (ECCV 2022), W ↦ W D with
  D = diag(Σ_j |WᵀW|_ij)^(-1/2), certified 1-Lipschitz by construction (nn.Linear, stride-1 nn.Conv2d);
* losses for certified training: :class:`LipschitzMarginLoss` (cross-entropy on logits shifted by
  the margin a radius eps needs, Tsuzuku et al. 2018) and :class:`HKRLoss` (hinge and
  Kantorovich–Rubinstein, Serrurier et al. 2021);
* :func:`export`: a copy of a model with every parametrized weight baked into a plain parameter,
  for inference without lipfast.

:func:`lipfast.lipschitz_bound` knows the activations (constant 1); parametrized layers are bounded
through their actual (normalized) weights, so their constants come out right with no special case.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lipfast import _ext, _toom, _util, linalg, ops, reference
from lipfast.network import register_lipschitz

__all__ = ["Abs", "GroupSort", "HKRLoss", "LipschitzMarginLoss", "SLLBlock", "SLLConv2d", "aol", "export", "orthogonal"]


class GroupSort(nn.Module):
    """Sorts the channels (dim 1) in groups of ``group_size``, each group in descending order.
    1-Lipschitz (it permutes entries piecewise) and gradient-norm preserving; ``group_size=2`` is
    MaxMin.  The number of channels must be a multiple of group_size."""

    def __init__(self, group_size: int = 2) -> None:
        super().__init__()
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"lipfast.nn.GroupSort: group_size must be an int >= 1, got {group_size!r}")
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        # (written so that torch.jit.script compiles it; a trace records the shapes it saw, so the
        # check is left out there, where it only warned)
        if not torch.jit.is_tracing() and (x.dim() < 2 or x.shape[1] % self.group_size != 0):
            raise ValueError(
                f"lipfast.nn.GroupSort: the input's dim 1 (shape {list(x.shape)}) must be a multiple of "
                f"group_size={self.group_size}"
            )
        groups = x.unflatten(1, [x.shape[1] // self.group_size, self.group_size])
        if self.group_size == 2:  # MaxMin: cheaper than a sort
            a, b = groups.select(2, 0), groups.select(2, 1)
            return torch.stack((torch.maximum(a, b), torch.minimum(a, b)), dim=2).flatten(1, 2)
        return groups.sort(dim=2, descending=True).values.flatten(1, 2)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class Abs(nn.Module):
    """|x|, entrywise: 1-Lipschitz and gradient-norm preserving."""

    def forward(self, x: Tensor) -> Tensor:
        return x.abs()


register_lipschitz(GroupSort, lambda module, input_shape: 1.0)
register_lipschitz(Abs, lambda module, input_shape: 1.0)


def _toom_shift_grams(W: Tensor) -> Tensor:
    """The R_s of _abs_gram for the shifts s from 0 down (row-major: R_-s = R_sᵀ gives the rest), as
    C ((2kh - 1)(2kw - 1) // 2 + 1, in, in), by Toom-Cook (lipfast._toom: 19 (out x in)ᵀ(out x in)
    products for a 3x3 kernel, against 45 one pair of positions at a time and the 81 a convolution
    of the kernel with itself costs)."""
    out, cin, kh, kw = W.shape
    dtype = torch.promote_types(W.dtype, torch.float32)  # half types: the products accumulate in float32 anyway
    positions = W.to(dtype).permute(2, 3, 0, 1).reshape(kh * kw, out, cin)
    return _toom.correlations(positions, (kh, kw)).to(W.dtype)


def _abs_gram(W: Tensor) -> Tensor:
    """S = Σ_s |R_s| (in, in): for a matrix W (m, n), |WᵀW|; for a conv kernel W (out, in, kh, kw),
    the sum over shifts s of |R_s|, where R_s[i, j] = Σ_o Σ_p K[o, i, p] K[o, j, p + s] is the kernel
    of the operator AᵀA of the stride-1 convolution.  Three ways, by size: convolving the kernel with
    itself ((2k − 1)² k² · 2 out in² flops with the padding, about 81 products of (out, in) position
    matrices for 3x3 counted without) for small channel counts, where one call beats a loop of
    products; Toom-Cook (_toom_shift_grams, 19 products for 3x3) for kernels up to 4 x 4; and for
    larger ones one product per pair of positions that overlap at a shift, for half of the shifts
    only (R_{-s} = R_sᵀ), k⁴/2 products."""
    if W.dim() == 2:
        return (W.mT @ W).abs()
    out, cin, kh, kw = W.shape
    toom = _toom.supported((kh, kw))
    if out * cin * cin < (2**20 if toom else 2**22):
        KK = F.conv2d(W.transpose(0, 1), W.transpose(0, 1), padding=(kh - 1, kw - 1))
        return KK.abs().sum(dim=(2, 3))
    if toom:
        C = _toom_shift_grams(W).abs()
        shifted = C[1:].sum(dim=0)
        return C[0] + shifted + shifted.mT
    positions = W.permute(2, 3, 0, 1).contiguous()  # (kh, kw, out, in): one (out, in) matrix per position
    S = torch.zeros(cin, cin, dtype=W.dtype, device=W.device)
    for da in range(kh):
        for db in range(-(kw - 1), kw):
            if da == 0 and db < 0:
                continue  # the shift -s: the transpose of shift s, added below
            R = torch.zeros(cin, cin, dtype=W.dtype, device=W.device)
            for a in range(kh - da):
                for b in range(max(0, -db), min(kw, kw - db)):
                    R = torch.addmm(R, positions[a, b].mT, positions[a + da, b + db])
            R = R.abs()
            S = S + (R + R.mT if da or db else R)
    return S


def _aol_scales(W: Tensor) -> Tensor:
    """d_i = (Σ_j S_ij)^(-1/2), S = _abs_gram(W) (0 for a zero column or input channel)."""
    return _inverse_sqrt(_abs_gram(W).sum(dim=-1))


def _inverse_sqrt(x: Tensor) -> Tensor:
    """x^(-1/2), and 0 where x = 0 (a zero column or channel keeps its zero)."""
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).rsqrt(), torch.zeros_like(x))


class _AOL(nn.Module):
    """W ↦ W diag(d) on the input dimension (dim 1), d from _aol_scales: ‖the layer's map‖ <= 1."""

    def forward(self, W: Tensor) -> Tensor:
        d = _aol_scales(W)
        return W * d.reshape(1, -1, *([1] * (W.dim() - 2)))


def aol(module: nn.Module, name: str = "weight") -> nn.Module:
    """Registers the almost-orthogonal (AOL) rescaling on ``module.<name>`` and returns the module:
    an nn.Linear, or an nn.Conv2d with stride 1, dilation 1 and one group, padded with zeros (any
    amount) or circularly by at most kernel_size - 1 in total per dim.  The layer is 1-Lipschitz by
    construction: with D = diag(Σ_j |AᵀA|_ij)^(-1/2) over the input channels, ‖A D‖² = ‖D AᵀA D‖
    <= max_i Σ_j |D AᵀA D|_ij <= 1 (Prach and Lampert, ECCV 2022); for a convolution the sums run
    over the kernel of AᵀA, K ⋆ K, whose absolute row sums bound those of AᵀA on any input size when
    A is a set of rows of a convolution on a zero-padded or circular signal.  Reflect and replicate
    padding, and circular padding beyond kernel_size - 1, copy input entries (the operator's norm
    can then exceed 1 by up to the padding's own norm): refused.  One scale per input channel keeps
    it cheap: one Gram matrix per forward (of the kernel as an out × (kh kw in) matrix for a conv)."""
    if isinstance(module, nn.Conv2d):
        if module.stride != (1, 1) or module.dilation != (1, 1) or module.groups != 1:
            raise ValueError(
                "lipfast.nn.aol: a Conv2d needs stride 1, dilation 1 and groups 1 (the AOL bound is for that "
                f"operator), got stride={module.stride}, dilation={module.dilation}, groups={module.groups}"
            )
        # padding "same" pads kernel_size - 1 in total per dim, "valid" none, an int or tuple p: 2 p
        totals = (0, 0) if module.padding == "valid" else \
            tuple(k - 1 for k in module.kernel_size) if module.padding == "same" else tuple(2 * p for p in module.padding)
        copies = module.padding_mode in ("reflect", "replicate") or (
            module.padding_mode == "circular" and any(t > k - 1 for t, k in zip(totals, module.kernel_size)))
        if copies and any(totals):
            raise ValueError(
                f"lipfast.nn.aol: padding_mode={module.padding_mode!r} with padding={module.padding!r} copies input "
                "entries, and the AOL bound holds only for a convolution that does not (zero padding, or circular "
                "padding of at most kernel_size - 1 in total per dim)"
            )
    elif not isinstance(module, nn.Linear):
        raise TypeError(f"lipfast.nn.aol: module must be an nn.Linear or nn.Conv2d, got {type(module).__name__}")
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor) or weight.dim() not in (2, 4):
        raise ValueError(f"lipfast.nn.aol: module has no weight parameter {name!r} of 2 or 4 dims")
    parametrize.register_parametrization(module, name, _AOL())
    return module


_BJORCK_WARMUP = 30  # power steps on the weight at registration


class _Bjorck(nn.Module):
    """W ↦ the Björck–Bowie iterate after `iters` steps from W / sigma (sigma: a power-method estimate
    of ‖W‖ whose iterate persists across training steps, as in spectral normalization):
        Q ← Q ((1 + beta) I − beta QᵀQ)   (the Gram on the smaller side for a wide W).
    Converges to the orthogonal polar factor of W for singular values of W / sigma in (0, sqrt(3))."""

    def __init__(self, weight: Tensor, iters: int, beta: float) -> None:
        super().__init__()
        self.iters, self.beta = iters, beta
        n = weight.shape[1]
        v = torch.randn(n, dtype=weight.dtype, device=weight.device)
        self.register_buffer("_v", v / v.norm())
        # The iteration diverges for singular values of W / sigma above sqrt(3), so sigma must not
        # fall short of ‖W‖ by that factor.  One step from a random start can: with one singular
        # value 3 and the rest 1 it gives about 1.02.  After k steps the shortfall is below sqrt(3)
        # unless the start's share of the top singular vector is under 3^(-2k) (k = 30: 1e-29).
        self._power_steps(weight, _BJORCK_WARMUP)

    @torch.no_grad()
    def _power_steps(self, W: Tensor, steps: int) -> None:
        self._v.copy_(linalg.power_iteration(W.detach(), self._v, steps)[2])

    def forward(self, W: Tensor) -> Tensor:
        if self.training:  # one power step on WᵀW per training forward, warm-started
            self._power_steps(W, 1)
        sigma = (W @ self._v).norm()  # differentiable in W, the iterate held fixed (as in spectral norm)
        Q = W / sigma.clamp_min(torch.finfo(W.dtype).tiny)
        wide = Q.shape[0] < Q.shape[1]
        if wide:
            Q = Q.mT.contiguous()
        for _ in range(self.iters):
            Q = _bjorck_step(Q, self.beta)
        return Q.mT if wide else Q


def _bjorck_step(Q: Tensor, beta: float) -> Tensor:
    """(1 + beta) Q − beta Q QᵀQ: one op (two products, the scaling fused into the second), or its
    PyTorch form."""
    if Q.dtype in (torch.float32, torch.float64) and _ext.use_kernel("bjorck_step", Q.device):
        return ops.bjorck_step(Q, beta)[0]
    return reference.bjorck_step(Q, beta)[0]


def orthogonal(module: nn.Module, name: str = "weight", *, method: str = "bjorck", iters: int = 15,
               beta: float = 0.5) -> nn.Module:
    """Registers Björck–Bowie orthonormalization on ``module.<name>`` (an nn.Linear) and returns the
    module: the weight used is W / sigma carried through ``iters`` Björck steps (sigma a power-method
    estimate of ‖W‖, run to convergence at registration and refined by one step per training forward),
    differentiable through all of them.  After convergence its singular values are 1 to within the
    iteration's residual, which :func:`lipfast.lipschitz_bound` certifies from the actual weight (so the
    residual is part of the certified constant).  Each step grows a small singular value by at most 1.5x:
    a weight whose singular values span more than about 1.5^iters (a fresh 1024 x 1024 layer's do) keeps
    some below 1 -- still at most 1-Lipschitz, but not gradient-norm preserving; raise ``iters`` there.
    Each step is one op: two matrix products through the smaller side's Gram matrix, the scaling fused
    into the second."""
    if method != "bjorck":
        raise ValueError(f"lipfast.nn.orthogonal: method must be 'bjorck', got {method!r}")
    if not isinstance(module, nn.Linear):
        raise TypeError(f"lipfast.nn.orthogonal: module must be an nn.Linear, got {type(module).__name__}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"lipfast.nn.orthogonal: iters must be an int >= 1, got {iters!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 0.5:
        raise ValueError(f"lipfast.nn.orthogonal: beta must be in (0, 0.5], got {beta!r}")
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"lipfast.nn.orthogonal: module has no 2-dim parameter {name!r}")
    parametrize.register_parametrization(module, name, _Bjorck(weight.detach(), iters, float(beta)))
    return module


class SLLBlock(nn.Module):
    """SDP-based Lipschitz residual layer (Araujo, Havens, Delattre, Allauzen, Hu; ICLR 2023), dense form:

        h(x) = x − 2 Wᵀ T⁻¹ relu(W x + b),   T = diag(t),  t_i = Σ_j |W Wᵀ|_ij q_j / q_i,  q = exp(log_q)

    for inputs (..., features), W (inner, features).  T − W Wᵀ is diagonally dominant after the
    positive rescaling by q, hence positive semidefinite, and that makes h 1-Lipschitz for any
    activation with slopes in [0, 1] (their Theorem 3).  A row of W that is zero gets t_i = 0 and
    contributes nothing (its T⁻¹ entry is taken as 0)."""

    def __init__(self, features: int, inner: int | None = None, *, device=None, dtype=None) -> None:
        super().__init__()
        inner = features if inner is None else inner
        for label, value in (("features", features), ("inner", inner)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"lipfast.nn.SLLBlock: {label} must be an int >= 1, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.features, self.inner = features, inner
        self.weight = nn.Parameter(torch.empty(inner, features, **factory))
        self.bias = nn.Parameter(torch.empty(inner, **factory))
        self.log_q = nn.Parameter(torch.empty(inner, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.weight)
        bound = 1 / math.sqrt(self.features)
        nn.init.uniform_(self.bias, -bound, bound)
        nn.init.normal_(self.log_q, std=0.1)

    def scales(self) -> Tensor:
        """1 / t_i (0 where t_i = 0): the diagonal of T⁻¹."""
        return _sll_scales(self.weight, self.log_q)

    def forward(self, x: Tensor) -> Tensor:
        z = torch.relu(F.linear(x, self.weight, self.bias)) * self.scales()
        return x - 2 * F.linear(z, self.weight.T)

    def extra_repr(self) -> str:
        return f"features={self.features}, inner={self.inner}"


def _sll_scales(weight: Tensor, log_q: Tensor) -> Tensor:
    """1 / t (0 where t = 0) with t_i = Σ_j S_ij q_j / q_i, S = Σ_s |kernel of A Aᵀ| for the map A of
    ``weight`` (a matrix (inner, features), or a conv kernel (inner, channels, k, k)), q = exp(log_q)."""
    q = log_q.exp()
    t = (_abs_gram(weight.transpose(0, 1)) @ q) / q  # A Aᵀ of A is AᵀA of Aᵀ; a flip of s changes no sum
    return torch.where(t > 0, 1 / t.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(t))


class SLLConv2d(nn.Module):
    """SDP-based Lipschitz residual layer, convolutional form (Araujo et al., ICLR 2023):

        h(x) = x − 2 Aᵀ T⁻¹ relu(A x + b),   t_i = Σ_j Σ_s |(K ⋆ K)_{ij}(s)| q_j / q_i

    with A the stride-1, zero-padded ("same") convolution by K (inner, channels, k, k), Aᵀ its
    adjoint (the transposed convolution) and K ⋆ K the kernel of A Aᵀ.  1-Lipschitz, for any input
    size; k must be odd."""

    def __init__(self, channels: int, inner: int | None = None, kernel_size: int = 3, *, device=None, dtype=None) -> None:
        super().__init__()
        inner = channels if inner is None else inner
        for label, value in (("channels", channels), ("inner", inner)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"lipfast.nn.SLLConv2d: {label} must be an int >= 1, got {value!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"lipfast.nn.SLLConv2d: kernel_size must be an odd int >= 1, got {kernel_size!r}")
        factory = {"device": device, "dtype": dtype}
        self.channels, self.inner, self.kernel_size = channels, inner, kernel_size
        self.weight = nn.Parameter(torch.empty(inner, channels, kernel_size, kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(inner, **factory))
        self.log_q = nn.Parameter(torch.empty(inner, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.weight)
        bound = 1 / math.sqrt(self.channels * self.kernel_size**2)
        nn.init.uniform_(self.bias, -bound, bound)
        nn.init.normal_(self.log_q, std=0.1)

    def scales(self) -> Tensor:
        """1 / t_i (0 where t_i = 0): the diagonal of T⁻¹, one per inner channel."""
        return _sll_scales(self.weight, self.log_q)

    def forward(self, x: Tensor) -> Tensor:
        pad = self.kernel_size // 2
        z = torch.relu(F.conv2d(x, self.weight, self.bias, padding=pad)) * self.scales()[:, None, None]
        return x - 2 * F.conv_transpose2d(z, self.weight, padding=pad)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, inner={self.inner}, kernel_size={self.kernel_size}"


def _sll_constant(module: SLLBlock | SLLConv2d, input_shape) -> tuple[float, float]:
    # 1 in exact arithmetic; t is computed in the parameters' dtype: products of length up to the
    # weight's size per inner unit, summed over inner units and shifts.  Its relative rounding,
    # gamma(terms), can let ‖I − 2 Aᵀ T⁻¹ D A‖ exceed 1 by about twice that.
    unit = torch.finfo(module.weight.dtype).eps / 2
    shifts = (2 * module.kernel_size - 1) ** 2 if isinstance(module, SLLConv2d) else 1
    k = module.weight.numel() // module.inner + module.inner * shifts + 4
    return 0.0, 1.0 + 4.0 * k * unit / (1.0 - k * unit)


register_lipschitz(SLLBlock, _sll_constant)
register_lipschitz(SLLConv2d, _sll_constant)


class LipschitzMarginLoss(nn.Module):
    """Cross-entropy on logits whose non-target entries are raised by sqrt(2) · lipschitz · eps (Tsuzuku
    et al. 2018): for a network with L2 Lipschitz constant ``lipschitz``, driving this loss down drives
    the margin z_y − max_{j≠y} z_j above the sqrt(2) L eps a certified radius eps needs.
    ``temperature`` divides the shifted logits before the cross-entropy.  ``reduction`` as torch's."""

    def __init__(self, eps: float, lipschitz: float = 1.0, *, temperature: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        for label, value in (("eps", eps), ("lipschitz", lipschitz), ("temperature", temperature)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (label != "eps" and value == 0):
                raise ValueError(f"lipfast.nn.LipschitzMarginLoss: {label} must be a finite number "
                                 f"{'>= 0' if label == 'eps' else '> 0'}, got {value!r}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"lipfast.nn.LipschitzMarginLoss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.margin = math.sqrt(2.0) * lipschitz * eps
        self.temperature = temperature
        self.reduction = reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        shift = self.margin * (1 - F.one_hot(target, logits.shape[-1]).to(logits.dtype))
        return F.cross_entropy((logits + shift) / self.temperature, target, reduction=self.reduction)


class HKRLoss(nn.Module):
    """Hinge plus Kantorovich–Rubinstein loss for 1-Lipschitz classifiers (Serrurier et al. 2021),
    multiclass:  alpha · hinge − KR, averaged over the batch, with, for logits z and label y,
        KR = z_y − mean_{j≠y} z_j,    hinge = relu(margin − (z_y − max_{j≠y} z_j)).
    The KR term pushes the true class up against the others; the hinge asks for a margin."""

    def __init__(self, alpha: float = 10.0, margin: float = 1.0) -> None:
        super().__init__()
        for label, value in (("alpha", alpha), ("margin", margin)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"lipfast.nn.HKRLoss: {label} must be a finite number >= 0, got {value!r}")
        self.alpha = alpha
        self.margin = margin

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        classes = logits.shape[-1]
        if classes < 2:
            raise ValueError(f"lipfast.nn.HKRLoss: needs at least 2 classes, got logits of shape {tuple(logits.shape)}")
        true = logits.gather(-1, target[:, None])[:, 0]
        others = logits.masked_fill(F.one_hot(target, classes).bool(), -math.inf)
        kr = true - (logits.sum(-1) - true) / (classes - 1)
        hinge = torch.relu(self.margin - (true - others.amax(-1)))
        return (self.alpha * hinge - kr).mean()


def export(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every parametrized tensor (lipfast's spectral norms, AOL, torch's
    own parametrizations) is replaced by a plain parameter holding its current value, computed in
    eval mode (no power-method step).  The copy runs without lipfast and gives the same outputs (to
    rounding); ``model`` itself is left as it was.  The copy keeps ``model``'s train/eval modes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"lipfast.nn.export: model must be an nn.Module, got {type(model).__name__}")
    from lipfast.nn import _record_input_size

    exported = copy.deepcopy(model)
    with _util.eval_mode(exported), torch.no_grad():
        for module in exported.modules():
            if parametrize.is_parametrized(module):
                # The copy shares its dynamically made Parametrized<Module> class with the original,
                # and removing a parametrization deletes the property from that class: give the copy
                # a class of its own first, so that the original keeps working.
                cls = type(module)
                module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
                for name in list(module.parametrizations.keys()):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
            for key, hook in list(module._forward_pre_hooks.items()):
                if hook is _record_input_size:
                    del module._forward_pre_hooks[key]
    return exported
