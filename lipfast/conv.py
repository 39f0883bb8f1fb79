"""True operator norms of convolution layers, with certified brackets.

``torch.nn.utils.spectral_norm`` normalizes a conv kernel reshaped to a (out x in*k*k) matrix, whose
norm can be far from the norm of the convolution itself: that depends on the input size, the stride
and the padding.  The functions here compute the norm of the actual linear map x -> conv(x) (no
bias) on inputs of shape (in_channels, *input_size), for every conv PyTorch has, with every argument
meaning exactly what it means for ``nn.ConvNd`` / ``nn.ConvTransposeNd``.

How (see the comments beside each bound for its inequality):

* estimate and lower end: Lanczos on AᵀA, A applied with ATen's convolution and its adjoint (the
  transposed convolution), one compiled loop (``torch.ops.lipfast.conv_spectral_norm``);
* upper end: the operator is, or is a compression of, a block-circulant operator whose spectrum the
  discrete Fourier transform of the kernel gives exactly (Sedghi et al., ICLR 2019): one small
  complex matrix per frequency, stride handled exactly by the polyphase (space-to-depth) form.  Each
  frequency's norm is certified by a Cholesky factorization of mu^2 I - KᴴK in float64 whose rounding
  error is bounded (a Rump-style test), at mu just above a Lanczos estimate of that frequency's norm.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor, nn

from lipfast import _ext, linalg, ops, reference

__all__ = ["conv_spectral_norm", "conv_spectral_norm_bounds", "operator_norm", "operator_norm_bounds"]

IntOrTuple = Union[int, Sequence[int]]

_UNIT = 2.0**-53
_TINY = 2.0**-1074


# --- the canonical operator ----------------------------------------------------------------------


@dataclass(frozen=True)
class ConvOperator:
    """A conv layer's operator as x (C_in, *input_size) -> crop(conv(pad(x))) (C_out, *output_size).

    ``weight`` is (C_out, C_in / groups, *kernel).  A transposed convolution is the adjoint of a
    convolution with the same weight tensor, so it is represented by that convolution (same norm)."""

    weight: Tensor
    input_size: tuple[int, ...]
    output_size: tuple[int, ...]
    stride: tuple[int, ...]
    pad_lo: tuple[int, ...]
    pad_hi: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    def op_args(self) -> tuple:
        """The geometry arguments of torch.ops.lipfast.conv_spectral_norm, in order."""
        return (
            list(self.input_size), list(self.stride), list(self.pad_lo), list(self.pad_hi),
            list(self.dilation), self.groups, self.padding_mode, list(self.output_size),
        )

    def apply(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """A on a batch x (B, C_in, *input_size)."""
        w = self.weight if weight is None else weight
        return reference.conv_apply(
            w, x, self.stride, self.pad_lo, self.pad_hi, self.dilation, self.groups, self.padding_mode, self.output_size
        )


def _tuple(fn: str, name: str, value: object, dims: int, minimum: int) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * dims
    if (
        not isinstance(value, (tuple, list, torch.Size))
        or len(value) != dims
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"lipfast.{fn}: {name} must be an int or a sequence of {dims} ints, got {value!r}")
    if any(v < minimum for v in value):
        raise ValueError(f"lipfast.{fn}: {name} must be >= {minimum} in every dim, got {tuple(value)}")
    return tuple(int(v) for v in value)


def conv_operator(
    fn: str,
    weight: Tensor,
    input_size: IntOrTuple | None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | str = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    transposed: bool = False,
    output_padding: IntOrTuple = 0,
) -> ConvOperator:
    """Checks a conv layer's arguments as torch would and returns its canonical operator."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"lipfast.{fn}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"lipfast.{fn}: weight must be a floating-point tensor, got {weight.dtype}")
    if weight.dim() not in (3, 4, 5):
        raise ValueError(
            f"lipfast.{fn}: weight must have 3, 4 or 5 dims (a Conv1d/2d/3d kernel), got shape {tuple(weight.shape)}"
        )
    if 0 in weight.shape:
        raise ValueError(f"lipfast.{fn}: weight must not have a zero-size dim, got shape {tuple(weight.shape)}")
    dims = weight.dim() - 2
    if input_size is None:
        raise ValueError(f"lipfast.{fn}: input_size is required for a convolution (the spatial size of one input)")
    input_size = _tuple(fn, "input_size", input_size, dims, 1)
    stride = _tuple(fn, "stride", stride, dims, 1)
    dilation = _tuple(fn, "dilation", dilation, dims, 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"lipfast.{fn}: groups must be a positive int, got {groups!r}")
    if weight.shape[0] % groups:
        what = "in_channels" if transposed else "out_channels"
        raise ValueError(
            f"lipfast.{fn}: weight.shape[0] ({what} = {weight.shape[0]}) must be divisible by groups={groups}"
        )
    if padding_mode not in reference.PAD_MODES:
        raise ValueError(f"lipfast.{fn}: padding_mode must be one of {reference.PAD_MODES}, got {padding_mode!r}")
    kernel = tuple(weight.shape[2:])
    extent = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel))

    if transposed:
        if padding_mode != "zeros":
            raise ValueError(f"lipfast.{fn}: a transposed convolution supports padding_mode='zeros' only, got {padding_mode!r}")
        if isinstance(padding, str):
            raise ValueError(f"lipfast.{fn}: padding must be an int or a tuple for a transposed convolution, got {padding!r}")
        pad = _tuple(fn, "padding", padding, dims, 0)
        out_pad = _tuple(fn, "output_padding", output_padding, dims, 0)
        for op, s, d in zip(out_pad, stride, dilation):
            if not (op < s or op < d):
                raise ValueError(
                    f"lipfast.{fn}: output_padding must be smaller than stride or dilation, got output_padding={out_pad}, "
                    f"stride={stride}, dilation={dilation}"
                )
        # y = conv_transpose(x) has size (n - 1) s - 2p + d (k - 1) + output_padding + 1, and is the
        # adjoint of the convolution A of y with the same weight, cropped to the n outputs x has.
        full = tuple((n - 1) * s - 2 * p + e + op for n, s, p, e, op in zip(input_size, stride, pad, extent, out_pad))
        if any(size < 1 for size in full):
            raise ValueError(
                f"lipfast.{fn}: input_size {input_size} gives an empty output {full} with this stride, padding and kernel"
            )
        return ConvOperator(weight, full, input_size, stride, pad, pad, dilation, groups, "zeros")

    if output_padding not in (0, (0,) * dims, [0] * dims):
        raise ValueError(f"lipfast.{fn}: output_padding applies to transposed convolutions only, got {output_padding!r}")
    if isinstance(padding, str):
        if padding == "valid":
            lo = hi = (0,) * dims
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"lipfast.{fn}: padding='same' needs stride 1 (as in torch), got stride={stride}")
            # torch: left = total // 2, right = total - left, total = d (k - 1)
            lo = tuple((e - 1) // 2 for e in extent)
            hi = tuple(e - 1 - left for e, left in zip(extent, lo))
        else:
            raise ValueError(f"lipfast.{fn}: padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
    else:
        lo = hi = _tuple(fn, "padding", padding, dims, 0)
    for n, a, b in zip(input_size, lo, hi):
        if padding_mode == "reflect" and max(a, b) >= n:
            raise ValueError(f"lipfast.{fn}: padding_mode='reflect' needs padding < input size, got padding {max(a, b)} for size {n}")
        if padding_mode == "circular" and max(a, b) > n:
            raise ValueError(f"lipfast.{fn}: padding_mode='circular' needs padding <= input size, got padding {max(a, b)} for size {n}")
    for n, a, b, e in zip(input_size, lo, hi, extent):
        if n + a + b < e:
            raise ValueError(
                f"lipfast.{fn}: input_size {input_size} (padded: {tuple(x + p + q for x, p, q in zip(input_size, lo, hi))}) "
                f"is smaller than the dilated kernel {extent}"
            )
    out = tuple(reference.conv_full_output_size(input_size, kernel, stride, lo, hi, dilation))
    return ConvOperator(weight, input_size, out, stride, lo, hi, dilation, groups, padding_mode)


# --- estimate ------------------------------------------------------------------------------------


def _check_finite_weight(fn: str, weight: Tensor) -> None:
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(weight).all()):
        raise ValueError(f"lipfast.{fn}: weight has a NaN or Inf entry")


def _top_singular(op: ConvOperator, rtol: float, max_iters: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(sigma, u, v, rel_err) of the operator, sigma differentiable with respect to op.weight."""
    w = op.weight
    if _ext.use_kernel("conv_spectral_norm", w.device):
        return ops.conv_spectral_norm(w, None, *op.op_args(), max_iters, rtol)
    with torch.no_grad():
        sigma, u, v, rel_err = reference.conv_spectral_norm(w, None, *op.op_args(), max_iters, rtol)
    if w.requires_grad:
        # uᵀ A(w) v has gradient u vᵀ-through-the-convolution; its value is sigma
        bilinear = (u * op.apply(v[None].to(w.dtype), w)[0]).sum()
        sigma = sigma + (bilinear - bilinear.detach())
    return sigma, u, v, rel_err


def conv_spectral_norm(
    weight: Tensor,
    input_size: IntOrTuple,
    *,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | str = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    transposed: bool = False,
    output_padding: IntOrTuple = 0,
    rtol: float = 1e-5,
    max_iters: int | None = None,
) -> Tensor:
    """The operator norm (largest singular value) of a convolution layer's linear map, a 0-dim tensor.

    ``weight`` is laid out as the torch module stores it: (out, in/groups, *k) for ConvNd, (in,
    out/groups, *k) with ``transposed=True`` for ConvTransposeNd; every other argument means what
    it means there, and ``input_size`` is the spatial size of one input (1, 2 or 3 ints).  The map
    is x -> conv(x) without bias on inputs (in_channels, *input_size), padding effects included.

    Lanczos on AᵀA, with A the convolution and Aᵀ its transposed convolution, stopped at relative
    accuracy ``rtol`` (as :func:`lipfast.spectral_norm`).  Differentiable with respect to
    ``weight``.  An estimate from below; :func:`conv_spectral_norm_bounds` gives a certified bracket.
    """
    fn = "conv_spectral_norm"
    op = conv_operator(fn, weight, input_size, stride, padding, dilation, groups, padding_mode, transposed, output_padding)
    rtol = linalg._check_rtol(fn, rtol)
    max_iters = linalg._check_count(fn, "max_iters", max_iters, linalg.DEFAULT_MAX_ITERS)
    _check_finite_weight(fn, weight)
    sigma, _, _, rel_err = _top_singular(op, rtol, max_iters)
    if not torch.compiler.is_compiling() and not float(rel_err) <= rtol:
        warnings.warn(
            f"lipfast.{fn}: stopped before reaching rtol={rtol:g} (max_iters={max_iters} passes); "
            f"relative accuracy reached: {float(rel_err):.3g}",
            RuntimeWarning,
            stacklevel=2,
        )
    return sigma


# --- certified bracket ---------------------------------------------------------------------------


_gamma = reference._gamma  # gamma(k) = k u / (1 - k u), the float64 dot-product error factor


@dataclass(frozen=True)
class _DimGrid:
    """One spatial dim of a block-circulant operator: ``frequencies`` points (w + twist/2) / frequencies,
    ``phases`` polyphase components (the stride), and each kernel tap's input offset."""

    frequencies: int
    phases: int
    offsets: tuple[int, ...]
    twist: int  # 0: circulant; 1: skew-circulant (frequencies shifted by half a step)

    def twiddles(self) -> Tensor:
        """E[w, r, j] = [offset_j in phase r] exp(-i (2 pi (w + twist/2) / M) floor(offset_j / s)), complex128."""
        M, s = self.frequencies, self.phases
        offsets = torch.tensor(self.offsets, dtype=torch.int64)
        phase = torch.remainder(offsets, s)
        shift = torch.div(offsets - phase, s, rounding_mode="floor")
        w = torch.arange(M, dtype=torch.int64)
        # the angle pi t / M with t = shift (2w + twist) reduced mod 2M exactly in integers
        t = torch.remainder(shift[None, :] * (2 * w[:, None] + self.twist), 2 * M).double()
        angle = -math.pi * t / M
        values = torch.polar(torch.ones_like(angle), angle)  # (M, k)
        mask = phase[None, :] == torch.arange(s)[:, None]  # (s, k)
        return values[:, None, :] * mask[None].to(values.dtype)

    def mirror(self) -> Tensor:
        """Index of the frequency -(w + twist/2), whose matrix is the complex conjugate of w's."""
        w = torch.arange(self.frequencies)
        return torch.remainder(self.frequencies - w - self.twist, self.frequencies)


def _symbol_matrices(weight: Tensor, groups: int, grids: Sequence[_DimGrid]) -> Tensor:
    """The per-frequency matrices (F * groups, C_out/groups, C_in/groups * phases) of the
    block-circulant operator, complex128, one frequency of each conjugate pair only."""
    dims = len(grids)
    letters = "abc"[:dims]
    freq, phase = "xyz"[:dims], "rst"[:dims]
    spec = (
        f"oi{letters},"
        + ",".join(f"{freq[d]}{phase[d]}{letters[d]}" for d in range(dims))
        + f"->{freq}oi{phase}"
    )
    K = torch.einsum(spec, weight.to(torch.complex128), *[g.twiddles() for g in grids])
    sizes = [g.frequencies for g in grids]
    F = math.prod(sizes)
    c_out, c_in = weight.shape[0], weight.shape[1]
    K = K.reshape(F, groups, c_out // groups, c_in * math.prod(g.phases for g in grids))
    # keep frequency f when f <= its mirror: the other half has conjugate matrices, same singular values
    flat = torch.arange(F).reshape(sizes)
    mirror = flat
    for d, g in enumerate(grids):
        mirror = mirror.index_select(d, g.mirror())
    keep = (flat <= mirror).reshape(-1).nonzero()[:, 0]
    return K.index_select(0, keep).reshape(-1, c_out // groups, K.shape[-1])


def _symbol_error(weight: Tensor, dims: int) -> float:
    """Bound on ‖K_computed - K_exact‖_2 for every frequency's matrix.

    Each twiddle's angle pi t / M (t exact) is off by at most 4 u |angle| <= 8 pi u, and cos/sin by
    one more unit (the libm assumption); a product of `dims` twiddles then lies within 64 dims u of
    the exact one, and each entry sum_j w_j E_j adds 4 gamma(2 taps + 8) sum_j |w_j|.  So every
    entry is off by c sum_j |w_j| (the taps of its phase), and ‖dK‖_2 <= ‖dK‖_F <= c ‖(sum_j |w_oij|)_oi‖_F."""
    taps = math.prod(weight.shape[2:])
    c = 64 * dims * _UNIT + 4 * _gamma(2 * taps + 8)
    w1 = torch.linalg.vector_norm(weight.double().abs().sum(dim=tuple(range(2, weight.dim())))).item()
    return c * w1 * (1 + 4 * _gamma(weight.numel() + 4)) + 64 * _TINY


def _frobenius_upper(K: Tensor) -> Tensor:
    entries = 2.0 * K.shape[-2] * K.shape[-1]
    return torch.linalg.vector_norm(K, dim=(-2, -1)) * (1 + 2 * _gamma(entries + 4)) + math.sqrt(entries * _TINY) + _TINY


def _certify_below(K: Tensor, mu: Tensor) -> Tensor:
    """For each complex matrix K (B, m, n) as stored: True where sigma_max(K) < mu is proven.

    The test: with H = fl(KᴴK) (or KKᴴ, the smaller), e_H >= ‖H - KᴴK‖_2 and a shift delta, the
    Cholesky factorization of A = (mu^2 - e_H - delta) I - H completes.  Cholesky's backward error
    (R̃ᴴR̃ = Ã + D, |D| <= c |R̃ᴴ||R̃|, any summation order; c = 8 gamma(2p + 4) covers complex
    arithmetic) gives ‖D‖ <= c ‖R̃‖_F^2 <= 2 c p mu^2, and forming A's diagonal costs u (mu^2 + H_ii);
    delta exceeds both, so A is positive definite and KᴴK < H + e_H I < mu^2 I.  Everything is first
    scaled by an exact power of two that brings mu into [0.5, 1)."""
    m, n = K.shape[-2:]
    p, inner = min(m, n), max(m, n)
    scale = torch.ldexp(torch.ones_like(mu), -torch.frexp(mu).exponent.double())  # exact 2^-e
    Ks = K * scale[:, None, None]
    mus = mu * scale
    H = Ks @ Ks.mH if m < n else Ks.mH @ Ks
    fro2 = _frobenius_upper(Ks) ** 2 * (1 + 4 * _UNIT)
    e_H = 8 * _gamma(2 * inner + 4) * fro2 + p * inner * 2.0**-1000
    c = 8 * _gamma(2 * p + 4)
    delta = 2 * (2 * c * p * mus**2 + 3 * _UNIT * mus**2 + _UNIT * fro2) + 2.0**-1000
    a = mus**2 - e_H - delta
    eye = torch.eye(p, dtype=H.dtype, device=H.device)
    _, info = torch.linalg.cholesky_ex(a[:, None, None] * eye - H)
    return (info == 0) & (a > 0) & torch.isfinite(fro2)


def _real_embedding(K: Tensor, dtype: torch.dtype) -> Tensor:
    """[[Re K, -Im K], [Im K, Re K]]: a real matrix with the singular values of K (each twice)."""
    re, im = K.real, K.imag
    return torch.cat([torch.cat([re, -im], -1), torch.cat([im, re], -1)], -2).to(dtype).contiguous()


def _dense_top(A: Tensor, rtol: float, max_iters: int) -> tuple[Tensor, Tensor]:
    """(sigma estimates, top right singular vectors) of a batch of real matrices."""
    if _ext.use_kernel("dense_spectral_norm", A.device):
        sigma, _, v, _ = ops.dense_spectral_norm(A, None, max_iters, rtol)
    else:
        sigma, _, v, _ = reference.dense_spectral_norm(A, None, max_iters, rtol)
    return sigma, v


def _circulant_upper(K: Tensor, rtol: float, max_iters: int, estimate_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Certified max over the matrices K (F, m, n) of sigma_max(K_f) as stored, plus the estimates
    (F,) and the right singular vectors of their real embeddings (for a lower bound)."""
    R = _real_embedding(K, estimate_dtype)
    estimate, v = _dense_top(R, rtol / 16, max_iters)
    estimate = estimate.double()
    upper = _frobenius_upper(K)  # sigma <= ‖K‖_F always
    mu = estimate * (1 + rtol / 4)
    pending = torch.arange(K.shape[0])
    for attempt in range(6):
        if pending.numel() == 0:
            break
        candidate = mu[pending] * (1 + rtol) ** (4**attempt - 1)
        # frequencies already bounded below their estimate by Frobenius need no test
        test = candidate < upper[pending]
        proven = torch.zeros_like(test)
        if bool(test.any()):
            idx = pending[test]
            proven[test] = _certify_below(K[idx], candidate[test])
        upper[pending[proven]] = candidate[proven]
        pending = pending[~proven & test]
    return upper.max(), estimate, v


def _pad_norm(op: ConvOperator) -> float:
    """‖Pad‖_2: padding copies input entries; the norm is the square root of the largest number of
    copies of one entry, multiplied over dims (the padding is a tensor product of 1-D paddings)."""
    copies = 1
    for n, lo, hi in zip(op.input_size, op.pad_lo, op.pad_hi):
        index = reference.pad_source_index(n, lo, hi, op.padding_mode)
        index = index[index >= 0]
        copies *= int(torch.bincount(index, minlength=n).max())
    return math.sqrt(copies)


def _grids(op: ConvOperator) -> tuple[list[list[_DimGrid]], bool, float]:
    """Candidate block-circulant operators whose norm bounds op's, whether the first one IS op
    (up to a unitary change of basis), and the factor their norms must be multiplied by.

    Per dim, with offset_j = d j - lo the input position tap j reads for output 0:
    * circular padding with lo + hi = d (k - 1) (or a 1-tap kernel with no padding): y_i =
      sum_j w_j x_((s i + offset_j) mod n), a circulant; exact when s divides n (polyphase, n/s
      frequencies); otherwise the rows of the stride-1 circulant, whose norm is at least op's.
    * zeros: for N >= n + max(lo, hi) (and N > s (out - 1)), no tap of an output reaches across the
      wrap of a length-N signal holding x at [0, n), so op is a compression of the length-N
      (skew-)circulant with stride s, and its norm is at most that one's.  N is a multiple of s.
    * reflect, replicate (and other circular paddings): op = C P with P the padding (‖P‖ = _pad_norm)
      and C the unpadded convolution of the padded signal, bounded as a zero-padded one with lo = hi = 0.
    """
    per_dim: list[list[_DimGrid]] = []
    exact = True
    factor = 1.0
    for n, k, s, lo, hi, d, out in zip(
        op.input_size, op.kernel, op.stride, op.pad_lo, op.pad_hi, op.dilation, op.output_size
    ):
        offsets = tuple(d * j - lo for j in range(k))
        circulant = (op.padding_mode == "circular" and lo + hi == d * (k - 1)) or (k == 1 and lo == hi == 0)
        if circulant and out == -(-n // s):
            if n % s == 0:
                per_dim.append([_DimGrid(n // s, s, offsets, 0)])
            else:
                per_dim.append([_DimGrid(n, 1, offsets, 0)])
                exact = False
            continue
        exact = False
        if op.padding_mode != "zeros":
            n, lo, hi = n + lo + hi, 0, 0
            offsets = tuple(d * j for j in range(k))
        N = max(n + max(lo, hi), s * (out - 1) + 1)
        N = -(-N // s) * s
        per_dim.append([_DimGrid(N // s, s, offsets, 0), _DimGrid(N // s, s, offsets, 1)])
    if op.padding_mode in ("reflect", "replicate") or (op.padding_mode == "circular" and not exact):
        factor = _pad_norm(op)
    choices = max(len(c) for c in per_dim)
    grids = [[c[min(i, len(c) - 1)] for c in per_dim] for i in range(choices)]
    return grids, exact, factor


def _operator_lower(op: ConvOperator, v: Tensor) -> float:
    """‖A v‖ / ‖v‖ evaluated in float64, decreased by a bound on its rounding error: each output is a
    sum of C_in/groups * taps products, off by gamma(that) (|A| |v|)_i, and ‖|A| |v|‖ <= _abs_norm ‖v‖."""
    w = op.weight.detach().double()
    vd = v.detach().double().reshape(1, -1, *op.input_size)
    y = op.apply(vd, w)
    norm_y = torch.linalg.vector_norm(y).item()
    norm_v = torch.linalg.vector_norm(vd).item()
    if norm_v == 0:
        return 0.0
    taps = math.prod(op.kernel)
    error = _gamma(w.shape[1] * taps + 2) * _abs_norm(op, w) * norm_v + y.numel() * _TINY
    lower = (norm_y * (1 - 2 * _gamma(y.numel() + 4)) - error) / (norm_v * (1 + 2 * _gamma(vd.numel() + 4)))
    return max(lower * (1 - 8 * _UNIT), 0.0)


#: Operators with at most this many matrix entries (and min dim <= 1024) whose circulant bound misses
#: rtol are bracketed once more from their explicit matrix.
EXPLICIT_MATRIX_LIMIT = 1 << 22


def _abs_norm(op: ConvOperator, weight: Tensor) -> float:
    """Upper bound on ‖|A|‖_2: A = sum over taps j of (a 0/1 selection of padded positions, norm <= 1)
    after the padding P, times the channel matrix W_j; so ‖|A|‖_2 <= ‖P‖ sum_j ‖W_j‖_F."""
    fro = torch.linalg.vector_norm(weight.double().flatten(2), dim=(0, 1)).sum().item()
    return _pad_norm(op) * fro * (1 + 2 * _gamma(weight.numel() + 8))


def _explicit_bracket(op: ConvOperator, rtol: float, max_iters: int) -> tuple[float, float]:
    """The bracket of the operator's explicit matrix M (its columns: A applied to the unit vectors,
    in float64), widened by ‖M - A‖_2 <= gamma(C_in/groups * taps + 2) ‖|A|‖_2."""
    w = op.weight.detach().double()
    n = w.shape[1] * op.groups * math.prod(op.input_size)
    eye = torch.eye(n, dtype=torch.float64, device=w.device).reshape(n, -1, *op.input_size)
    M = op.apply(eye, w).reshape(n, -1).T
    lower, upper = linalg.spectral_norm_bounds(M, rtol=rtol / 2, max_iters=max_iters, max_gram_steps=32)
    error = _gamma(w.shape[1] * math.prod(op.kernel) + 2) * _abs_norm(op, w)
    return max(float(lower) - error, 0.0), float(upper) + error


def bracket(op: ConvOperator, rtol: float, max_iters: int) -> tuple[float, float]:
    """Certified (lower, upper) in float64 for the operator's norm."""
    weight = op.weight.detach()
    dims = weight.dim() - 2
    grids, exact, factor = _grids(op)
    error = _symbol_error(weight, dims)
    estimate_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    upper = math.inf
    lower = 0.0
    for i, grid in enumerate(grids):
        K = _symbol_matrices(weight.cpu(), op.groups, grid)
        grid_upper, estimate, v = _circulant_upper(K, rtol, max_iters, estimate_dtype)
        bound = (float(grid_upper) + error) * (1 + 4 * _UNIT) * factor * (1 + 4 * _UNIT)
        upper = min(upper, bound)
        if i == 0 and exact:
            # op is unitarily equivalent to the block-diagonal of the K_f: its norm is max_f sigma(K_f)
            top = int(estimate.argmax())
            R = _real_embedding(K[top : top + 1], torch.float64)
            lower = float(reference.certified_rayleigh_lower(R, v[top : top + 1].double())[0]) - error
            lower = max(lower * (1 - 4 * _UNIT), 0.0)
    if not exact:
        with torch.no_grad():
            _, _, v, _ = _top_singular(op, rtol / 8, max_iters)
        lower = _operator_lower(op, v)
        n_in = op.weight.shape[1] * op.groups * math.prod(op.input_size)
        n_out = op.weight.shape[0] * math.prod(op.output_size)
        if upper > lower * (1 + rtol) and n_in * n_out <= EXPLICIT_MATRIX_LIMIT and min(n_in, n_out) <= 1024:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                explicit_lower, explicit_upper = _explicit_bracket(op, rtol, max_iters)
            lower, upper = max(lower, explicit_lower), min(upper, explicit_upper)
    return lower, max(upper, lower)


def conv_spectral_norm_bounds(
    weight: Tensor,
    input_size: IntOrTuple,
    *,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | str = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    transposed: bool = False,
    output_padding: IntOrTuple = 0,
    rtol: float = 1e-3,
    max_iters: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Certified bracket ``lower <= ‖conv‖_2 <= upper`` (0-dim tensors of weight's dtype) for a
    convolution layer's operator; the arguments are those of :func:`conv_spectral_norm`.

    ``upper`` comes from the spectrum of a block-circulant operator (FFT of the kernel, Sedghi et
    al. 2019): for circular padding that operator is the layer itself (stride by the polyphase form
    when it divides the input size) and the bracket is as tight as rtol; for zero padding the layer
    is a compression of a circulant on a slightly larger grid (two grids are tried), and for reflect
    or replicate padding the bound carries the norm of the padding map, so the bracket can stay
    wider than rtol: a RuntimeWarning then says how wide.  Each frequency's norm is certified in
    float64 with its rounding error bounded; ``lower`` is a Rayleigh quotient with its rounding
    error subtracted.  Both ends are rounded outwards to weight's dtype.  Not differentiable.
    """
    fn = "conv_spectral_norm_bounds"
    op = conv_operator(fn, weight, input_size, stride, padding, dilation, groups, padding_mode, transposed, output_padding)
    rtol = linalg._check_rtol(fn, rtol)
    max_iters = linalg._check_count(fn, "max_iters", max_iters, linalg.DEFAULT_MAX_ITERS)
    _check_finite_weight(fn, weight)
    return _finish_bracket(fn, *bracket(op, rtol, max_iters), weight, rtol)


def _finish_bracket(fn: str, lower: float, upper: float, weight: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    if lower > 0 and upper / lower - 1 > rtol:
        warnings.warn(
            f"lipfast.{fn}: the bracket is valid but wider than rtol={rtol:g} (upper/lower - 1 = {upper / lower - 1:.3g})",
            RuntimeWarning,
            stacklevel=3,
        )
    values = torch.tensor([lower, upper], dtype=torch.float64)
    low = reference.round_directed(values[:1], weight.dtype, up=False)[0]
    high = reference.round_directed(values[1:], weight.dtype, up=True)[0]
    return low.to(weight.device), high.to(weight.device)


# --- modules -------------------------------------------------------------------------------------

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _module_operator(fn: str, module: nn.Module, input_size: IntOrTuple | None) -> ConvOperator | None:
    """The module's conv operator, or None for nn.Linear."""
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, _CONVS):
        raise TypeError(
            f"lipfast.{fn}: module must be nn.Linear, nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d, got {type(module).__name__}"
        )
    if input_size is None:
        raise ValueError(
            f"lipfast.{fn}: input_size is required for {type(module).__name__} (the spatial size of one input)"
        )
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    return conv_operator(
        fn, module.weight, input_size, module.stride, module.padding, module.dilation, module.groups,
        module.padding_mode, transposed, module.output_padding if transposed else 0,
    )


def operator_norm(module: nn.Module, input_size: IntOrTuple | None = None, *, rtol: float = 1e-5) -> Tensor:
    """The operator norm of a layer's linear map (bias excluded): nn.Linear (input_size not needed),
    nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d (input_size: the spatial size of one input).
    Differentiable with respect to the weight.  See :func:`conv_spectral_norm`."""
    fn = "operator_norm"
    op = _module_operator(fn, module, input_size)
    if op is None:
        return linalg.spectral_norm(module.weight, rtol=rtol)
    rtol = linalg._check_rtol(fn, rtol)
    _check_finite_weight(fn, op.weight)
    return _top_singular(op, rtol, linalg.DEFAULT_MAX_ITERS)[0]


def operator_norm_bounds(
    module: nn.Module, input_size: IntOrTuple | None = None, *, rtol: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """Certified bracket (lower, upper) on a layer's operator norm; see :func:`conv_spectral_norm_bounds`."""
    fn = "operator_norm_bounds"
    op = _module_operator(fn, module, input_size)
    if op is None:
        return linalg.spectral_norm_bounds(module.weight, rtol=rtol)
    rtol = linalg._check_rtol(fn, rtol)
    _check_finite_weight(fn, op.weight)
    return _finish_bracket(fn, *bracket(op, rtol, linalg.DEFAULT_MAX_ITERS), op.weight, rtol)
