"""Pure-PyTorch implementations of every lipfast op: the fallback where the compiled kernels are
not loaded, and an independent implementation for the tests.

Each function takes and returns what the op of the same name in ``torch.ops.lipfast`` does (see
csrc/lipfast.cpp), runs on any device, and works on a whole batch at once.  The certified pieces
follow the same rounding-error analysis as csrc/dense_common.cpp.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor

from lipfast import _util

__all__ = [
    "bjorck_step",
    "dense_spectral_norm",
    "dense_spectral_norm_bounds",
    "dense_spectral_norm_bounds_many",
    "dense_power_iteration",
    "first_nonfinite_matrix",
    "hermitian_cholesky_test",
    "hermitian_gram",
    "hermitian_power_gain",
    "pairwise_volatility",
    "sampled_volatility",
]

_UNIT = 2.0**-53  # unit roundoff of float64
_TINY = 2.0**-1074  # smallest positive float64
_MAX_BASIS = 256
# Below this rank bound min(m, n) the residual test is not trusted; see csrc/cpu/dense_kernel.cpp.
_FULL_KRYLOV_RANK = 16
_MIN_CONFIRMATION = 16


def _gamma(k: float) -> float:
    if k * _UNIT >= 0.5:
        raise ValueError("lipfast: matrix too large for the rounding-error bound")
    return k * _UNIT / (1.0 - k * _UNIT)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _flatten(W: Tensor) -> tuple[Tensor, torch.Size]:
    batch = W.shape[:-2]
    # contiguous: the same summation order, so the same result, for every memory layout of W
    return W.reshape(-1, *W.shape[-2:]).to(_compute_dtype(W.dtype)).contiguous(), batch


def first_nonfinite_matrix(W: Tensor) -> int | None:
    """Flat index of the first matrix of W (..., m, n) holding a NaN or Inf, or None."""
    bad = ~torch.isfinite(W).reshape(-1, W.shape[-2] * W.shape[-1]).all(dim=1)
    if not bool(bad.any()):
        return None
    return int(bad.nonzero()[0, 0])


def _default_start(B: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(0x6C6970)
    return (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1).to(dtype).to(device).expand(B, n).clone()


def _normalized(x: Tensor) -> tuple[Tensor, Tensor]:
    norm = torch.linalg.vector_norm(x.double(), dim=-1)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    return (x / safe.to(x.dtype)[..., None]), norm


def _gram(A: Tensor, x: Tensor) -> Tensor:
    return (A.mT @ (A @ x[..., None]))[..., 0]


def _lanczos_top(
    gram: Callable[[Tensor], Tensor],
    v: Tensor,
    max_passes: int,
    rtol: float,
    rank_bound: int,
    max_basis: int = _MAX_BASIS,
    upper: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Batched Lanczos on the symmetric operators x -> gram(x) = AᵀA x (x: (B, n)) with full
    reorthogonalization, all operators in lock step.  rank_bound >= rank(A) (min(m, n) for a matrix).
    upper > 0: a known upper bound of every sigma_max, as LanczosControl's (csrc/lanczos.h): an
    operator is also done, unconfirmed, once width = upper / sqrt(theta) - 1 <= 8 rtol, or (residual
    trusted, and after _MIN_CONFIRMATION passes) 8 rel_err <= width.

    Returns the unit Ritz vectors (B, n) of the largest Ritz values and the residual bounds
    ‖AᵀA y - theta y‖ / (2 theta), as dense_spectral_norm's rel_err.
    """
    B, n = v.shape
    ct, f64, device = v.dtype, torch.float64, v.device
    eps = torch.finfo(ct).eps
    cap = min(max_basis, n)
    trust_residual = rank_bound > _FULL_KRYLOV_RANK
    breakdown = eps if trust_residual else 16 * math.sqrt(n) * eps
    v, norm = _normalized(v)
    v = torch.where((norm > 0)[:, None], v, _normalized(_default_start(B, n, ct, device))[0])
    # Confirmation (see lanczos_top in csrc/cpu/dense_kernel.cpp): a residual test passed after p
    # passes is accepted only if theta has not grown by p + max(p, 16) passes.
    confirm_at = torch.full((B,), -1, dtype=torch.int64, device=device)
    claimed = torch.zeros(B, dtype=f64, device=device)
    confirmed = torch.zeros(B, dtype=torch.bool, device=device)
    passes = 0
    while True:
        Q = v.new_zeros(B, cap + 1, n)
        Q[:, 0] = v
        alpha = torch.zeros(B, cap, dtype=f64, device=device)
        beta = torch.zeros(B, cap, dtype=f64, device=device)
        for k in range(cap):
            q = Q[:, k]
            w = gram(q)
            passes += 1
            a = (q.double() * w.double()).sum(-1)
            w = w - a.to(ct)[:, None] * q
            if k > 0:
                w = w - beta[:, k - 1].to(ct)[:, None] * Q[:, k - 1]
            basis = Q[:, : k + 1]
            for _ in range(2):  # classical Gram–Schmidt, twice
                w = w - (basis.mT @ (basis @ w[..., None]))[..., 0]
            b = torch.linalg.vector_norm(w.double(), dim=-1)
            alpha[:, k] = a
            T = torch.diag_embed(alpha[:, : k + 1]) + torch.diag_embed(beta[:, :k], 1) + torch.diag_embed(beta[:, :k], -1)
            evals, evecs = torch.linalg.eigh(T)
            theta, s = evals[:, -1], evecs[:, :, -1]
            residual = b * s[:, k].abs()
            rel_err = torch.where(
                theta > 0,
                residual / (2 * theta).clamp_min(torch.finfo(f64).tiny),
                torch.where(residual > 0, math.inf, 0.0),
            )
            exhausted = (b <= breakdown * theta) | (b == 0) | (k + 1 == n)
            if upper > 0:
                width = torch.where(theta > 0, upper / theta.clamp_min(torch.finfo(f64).tiny).sqrt() - 1, math.inf)
                narrow = (width <= 8 * rtol) | ((8 * rel_err <= width) & (trust_residual and passes >= _MIN_CONFIRMATION))
                confirmed |= narrow & torch.isfinite(width) & ~exhausted
            if trust_residual:
                small = (rel_err <= rtol) & ~exhausted
                due = small & (confirm_at >= 0) & (passes >= confirm_at)
                confirmed |= due & (theta <= claimed * (1 + 2 * rtol))
                restart_claim = small & ~confirmed & ((confirm_at < 0) | due)
                confirm_at = torch.where(restart_claim, passes + max(passes, _MIN_CONFIRMATION), confirm_at)
                claimed = torch.where(restart_claim, theta, claimed)
            done = bool((confirmed | exhausted).all()) or passes >= max_passes
            if done or k + 1 == cap:
                ritz = (s.to(ct)[:, :, None] * basis).sum(1)
                ritz, ritz_norm = _normalized(ritz)
                v = torch.where((ritz_norm > 0)[:, None], ritz, Q[:, 0])
                if done:
                    return v, rel_err
                break
            beta[:, k] = torch.where(exhausted, 0.0, b)
            # A matrix whose Krylov space is exhausted continues with zero vectors: its T only gains
            # a zero block, which leaves the top Ritz pair as it is.
            safe_b = torch.where(exhausted | (b == 0), math.inf, b)
            Q[:, k + 1] = w / safe_b.to(ct)[:, None]


def _in_range(A: Tensor) -> tuple[Tensor, Tensor]:
    """A copy of A (B, m, n) with each matrix whose max|A| lies outside [2^-32, 2^32] multiplied by
    the power of two that brings it into [1, 2), and those factors (B,): the iterations form AᵀA x,
    of the order of sigma^2, which must neither underflow nor overflow."""
    big = A.abs().amax(dim=(-2, -1)).double()
    exponent = torch.frexp(torch.where(big > 0, big, torch.ones_like(big))).exponent - 1
    # at most the largest finite power of two of A's dtype (2^1023 in float64: a subnormal largest
    # entry is then brought up to 2^-50 or more, not to [1, 2))
    exponent = torch.where(exponent.abs() > 32, -exponent, 0).clamp(max=math.frexp(torch.finfo(A.dtype).max)[1] - 1)
    scales = torch.ldexp(torch.ones_like(big), exponent.double()).to(A.dtype)
    return A * scales[:, None, None], scales


def _left_vector(A: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    u, sigma = _normalized((A @ v[..., None])[..., 0])
    return torch.where((sigma > 0)[:, None], u, torch.zeros_like(u)), sigma


def _start_vectors(v0: Tensor | None, B: int, n: int, ct: torch.dtype, device: torch.device) -> Tensor:
    if v0 is None:
        return torch.zeros(B, n, dtype=ct, device=device)
    return v0.reshape(B, n).to(ct)


def dense_spectral_norm(W: Tensor, v0: Tensor | None, max_iters: int, rtol: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    A, batch = _flatten(W)
    B, m, n = A.shape
    A, scales = _in_range(A)
    start = _start_vectors(v0, B, n, A.dtype, A.device)
    v, rel_err = _lanczos_top(lambda x: _gram(A, x), start, max_iters, rtol, min(m, n))
    u, sigma = _left_vector(A, v)
    dt = W.dtype
    return (
        (sigma / scales.double()).to(dt).reshape(batch),
        u.to(dt).reshape(*batch, m),
        v.to(dt).reshape(*batch, n),
        rel_err.reshape(batch),
    )


def dense_power_iteration(W: Tensor, v: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    A, batch = _flatten(W)
    B, m, n = A.shape
    x, norm = _normalized(v.reshape(B, n).to(A.dtype))
    for _ in range(iters):
        y, norm_y = _normalized(_gram(A, x))
        x = torch.where((norm_y > 0)[:, None], y, x)  # W x = 0: x is in the null space; keep it
    u, sigma = _left_vector(A, x)
    dt = W.dtype
    return sigma.to(dt).reshape(batch), u.to(dt).reshape(*batch, m), x.to(dt).reshape(*batch, n)


def spectral_norm_step(W: Tensor, u: Tensor, v: Tensor, iters: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """torch.nn.utils.parametrizations.spectral_norm's power method, as the op computes it."""
    A, batch = _flatten(W)
    B, m, n = A.shape
    u = u.detach().reshape(B, m).to(A.dtype)
    v = v.detach().reshape(B, n).to(A.dtype)
    if iters == 0:
        sigma = (u * (A @ v[..., None])[..., 0]).sum(-1)
    for _ in range(iters):
        t = (A @ v[..., None])[..., 0]
        u = t / torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_min(eps)
        z = (A.mT @ u[..., None])[..., 0]
        norm_z = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
        v = z / norm_z.clamp_min(eps)
        sigma = (norm_z * norm_z / norm_z.clamp_min(eps))[..., 0]
    dt = W.dtype
    return sigma.to(dt).reshape(batch), u.to(dt).reshape(*batch, m), v.to(dt).reshape(*batch, n)


# --- the certified bracket -----------------------------------------------------------------------


def _times_pow2(x: Tensor, k: Tensor) -> Tensor:
    """x * 2^k, exactly unless the product under- or overflows (k: int64, one per matrix).  A new
    tensor: one product by 2^k where every k is a normal double's exponent (known without a device
    sync where k lives on the CPU), else two, 2^k1 2^k2 with k = k1 + k2."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    if k.device.type == "cpu" and bool(((k >= -1022) & (k <= 1023)).all()):
        return x * ((k + 1023) << 52).view(torch.float64).reshape(shape)
    k1 = torch.div(k, 2, rounding_mode="floor").clamp(-1022, 1023)
    k2 = (k - k1).clamp(-1022, 1023)
    p1 = ((k1 + 1023) << 52).view(torch.float64).reshape(shape)
    p2 = ((k2 + 1023) << 52).view(torch.float64).reshape(shape)
    return x * p1 * p2


def _times_pow2_by(x: Tensor, k: int) -> Tensor:
    """x * 2^k for one exponent k (-2044 to 2046: a subnormal largest entry needs 2^1073, which is
    not a double) as _times_pow2 does it: exact where the result is normal."""
    return _times_pow2(x[None], torch.tensor([k], device=x.device))[0]


def _binary_exponent(x: Tensor) -> Tensor:
    return torch.frexp(x).exponent.to(torch.int64)


def _largest_magnitude(x: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """x.abs().amax(dim), NaN included, from two reductions over x as it lies: no copy of x (on a
    25088 x 4096 float64 matrix 0.08 s, where abs() writes 800 MB first: 0.47 s)."""
    return torch.maximum(x.amax(dim=dim), -x.amin(dim=dim))


def _frobenius_upper(X: Tensor) -> Tensor:
    entries = float(X.shape[-2] * X.shape[-1])
    norm = torch.linalg.vector_norm(X, dim=(-2, -1))
    return norm * (1.0 + 2.0 * _gamma(entries + 4)) + math.sqrt(entries * _TINY) + _TINY


def certified_rayleigh_lower(A: Tensor, v: Tensor) -> Tensor:
    """‖A v‖ / ‖v‖ in float64, decreased by a bound on its rounding error (A: (B, m, n), v: (B, n)).
    Each A_b and v_b is first scaled by the power of two that brings its largest |entry| into
    [0.5, 1), as csrc/dense_common.cpp does (the norms square the entries, which must neither under-
    nor overflow); entries of A lost to underflow there move the quotient by at most sqrt(m n) 2^-1075."""
    m, n = A.shape[-2:]
    if m == 0 or n == 0:
        return A.new_zeros(A.shape[:1], dtype=torch.float64)
    Ad, vd = A.double(), v.double()
    k = _binary_exponent(_largest_magnitude(Ad, (-2, -1)))
    if k.device.type != "cpu" or bool(k.any()):  # (dense_brackets passes A scaled already)
        Ad = _times_pow2(Ad, -k)
    vd = _times_pow2(vd, -_binary_exponent(vd.abs().amax(dim=-1)))
    norm_y = torch.linalg.vector_norm((Ad @ vd[..., None])[..., 0], dim=-1)
    norm_v = torch.linalg.vector_norm(vd, dim=-1)
    norm_A = torch.linalg.vector_norm(Ad, dim=(-2, -1))
    # as _rayleigh_lower, operation for operation
    v_upper = norm_v + math.sqrt(n * _TINY)
    product_error = _gamma(n) * (norm_A + math.sqrt(m * n * _TINY)) * v_upper * (1.0 + 2.0 * _gamma(m * n + n + 8)) + m * n * _TINY
    lower = (norm_y * (1.0 - 2.0 * _gamma(m + 4)) - math.sqrt(m * _TINY) - product_error) / (v_upper * (1.0 + 2.0 * _gamma(n + 4)))
    scaled = (lower * (1.0 - 8.0 * _UNIT)).clamp_min(0.0)
    scaled = torch.where(k > 0, scaled - math.sqrt(m * n) * _TINY, scaled)
    # back in A's units, exactly where normal; a subnormal result rounds to nearest: 2^-1074 off
    return (_times_pow2(scaled, k) - _TINY).clamp_min(0.0)


def gram_upper_bound(A: Tensor, target: Tensor, max_steps: int) -> Tensor:
    """Certified upper bound on sigma_max by Gram iteration in float64; see csrc/dense_common.cpp."""
    G = A.double()
    if A.shape[-2] < A.shape[-1]:
        G = G.mT
    entries = float(A.shape[-2] * A.shape[-1])
    if entries == 0:
        return torch.zeros(A.shape[:1], dtype=torch.float64, device=A.device)  # sigma of an empty matrix: 0
    # k0 from the norm of G times 2^-k_entry (largest |entry| in [0.5, 1)), as csrc/dense_common.cpp:
    # torch's vector norm squares the entries as they are, which under- or overflow beyond 2^±511
    k_entry = _binary_exponent(G.abs().amax(dim=(-2, -1)))
    norm_W = torch.linalg.vector_norm(_times_pow2(G, -k_entry), dim=(-2, -1))
    k0 = k_entry + _binary_exponent(norm_W)
    G = _times_pow2(G, -k0)
    exponents: list[Tensor] = []
    errors: list[Tensor] = []
    upper = torch.full(A.shape[:1], math.inf, dtype=torch.float64, device=A.device)
    for step in range(max_steps):
        inner, cols = float(G.shape[-2]), float(G.shape[-1])
        fro = _frobenius_upper(G)
        P = G.mT @ G
        errors.append(_gamma(inner) * fro * fro * (1.0 + 4.0 * _UNIT) + cols * (inner + 1.0) * _TINY)
        k = _binary_exponent(torch.linalg.vector_norm(P, dim=(-2, -1)))
        exponents.append(k)
        G = _times_pow2(P, -k)
        bound = _frobenius_upper(G)
        for j in range(step, -1, -1):
            bound = torch.sqrt(_times_pow2(bound, exponents[j]) + 2.0 * _TINY + errors[j]) * (1.0 + 8.0 * _UNIT)
        candidate = _times_pow2((bound + math.sqrt(entries) * _TINY) * (1.0 + 4.0 * _UNIT), k0) * (1.0 + 4.0 * _UNIT) + _TINY
        upper = torch.minimum(upper, torch.where(norm_W > 0, candidate, 0.0))  # W = 0: sigma = 0 exactly
        if bool((upper <= target).all()):
            break
    return upper


def bracket_stop_factor(rtol: float, dtype: torch.dtype) -> float:
    """1 + rtol, shrunk by the outward rounding of both ends to ``dtype`` where that is small against rtol."""
    eps = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}.get(dtype, 0.0)
    return (1.0 + rtol) * (1.0 - 4.0 * eps) if 4.0 * eps <= rtol / 4.0 else 1.0 + rtol


def round_directed(x: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """Rounds non-negative float64 values to ``dtype`` upwards (or downwards), never across x."""
    if dtype == torch.float64:
        return x
    y = x.to(dtype)
    back = y.double()
    off = back < x if up else back > x
    bits = y.view({2: torch.int16, 4: torch.int32}[y.element_size()])
    return torch.where(off, bits + 1 if up else bits - 1, bits).view(dtype)


def dense_spectral_norm_bounds(W: Tensor, rtol: float, max_iters: int, max_gram_steps: int) -> tuple[Tensor, Tensor]:
    A, batch = _flatten(W)
    B, m, n = A.shape
    scaled = _in_range(A)[0]
    start = torch.zeros(B, n, dtype=A.dtype, device=A.device)
    v, _ = _lanczos_top(lambda x: _gram(scaled, x), start, max_iters, rtol / 8, min(m, n))
    lower = certified_rayleigh_lower(A, v)
    upper = gram_upper_bound(A, lower * bracket_stop_factor(rtol, W.dtype), max_gram_steps)
    return (
        round_directed(lower, W.dtype, up=False).reshape(batch),
        round_directed(upper, W.dtype, up=True).reshape(batch),
    )


def _pow2_factors(k: int) -> tuple[float, float]:
    """2^k1, 2^k2 with k1 + k2 = k where in reach, as csrc/dense_common.cpp's pow2_factors."""
    k1 = min(max(k // 2, -1022), 1023)
    k2 = min(max(k - k1, -1022), 1023)
    return math.ldexp(1.0, k1), math.ldexp(1.0, k2)


def _ldexp2(x: float, k: int) -> float:
    """x * 2^k as the scalar times_pow2: two factors, the same roundings."""
    p1, p2 = _pow2_factors(k)
    return x * p1 * p2


def _ieee_div(x: float, y: float) -> float:
    """x / y with IEEE results where Python raises (division by zero), as C++ computes it."""
    if y == 0:
        return math.nan if x == 0 or math.isnan(x) else math.copysign(math.inf, x) * math.copysign(1.0, y)
    return x / y


def _ieee_sqrt(x: float) -> float:
    return math.sqrt(x) if x >= 0 else math.nan


def _frobenius_upper_scalar(norm: float, entries: float) -> float:
    return norm * (1.0 + 2.0 * _gamma(entries + 4)) + math.sqrt(entries * _TINY) + _TINY


def _scaled_frobenius_upper(norm: float, entries: float, e: int) -> float:
    """Upper bound on ‖fl(X 2^-e)‖_F from the computed ‖X‖_F (csrc: scaled_frobenius_upper)."""
    return (_ldexp2(_frobenius_upper_scalar(norm, entries), -e) + math.sqrt(entries) * _TINY) * (1.0 + 4.0 * _UNIT)


def _rayleigh_lower(norm_y: float, norm_v: float, norm_W: float, m: float, n: float) -> float:
    """certified_rayleigh_lower's bound from its three norms, for one matrix (csrc: rayleigh_lower)."""
    v_upper = norm_v + math.sqrt(n * _TINY)
    product_error = _gamma(n) * (norm_W + math.sqrt(m * n * _TINY)) * v_upper * (1.0 + 2.0 * _gamma(m * n + n + 8)) + m * n * _TINY
    lower = _ieee_div(norm_y * (1.0 - 2.0 * _gamma(m + 4)) - math.sqrt(m * _TINY) - product_error,
                      v_upper * (1.0 + 2.0 * _gamma(n + 4)))
    return max(lower * (1.0 - 8.0 * _UNIT), 0.0)


class _GramChain:
    """One matrix's Gram-iteration chain on the host (csrc/dense_common.cpp: GramChain)."""

    def __init__(self, k0: int, entries: float, nonzero: bool) -> None:
        self.k0, self.entries, self.nonzero = k0, entries, nonzero
        self.exponents: list[int] = []
        self.errors: list[float] = []
        self.upper = math.inf

    def add_step(self, fro: float, k: int, inner: float, cols: float, next_fro: float) -> None:
        self.errors.append(_gamma(inner) * fro * fro * (1.0 + 4.0 * _UNIT) + cols * (inner + 1.0) * _TINY)
        self.exponents.append(k)
        bound = next_fro
        for k_j, e_j in zip(reversed(self.exponents), reversed(self.errors)):
            bound = math.sqrt(_ldexp2(bound, k_j) + 2.0 * _TINY + e_j) * (1.0 + 8.0 * _UNIT)
        candidate = _ldexp2((bound + math.sqrt(self.entries) * _TINY) * (1.0 + 4.0 * _UNIT), self.k0) * (1.0 + 4.0 * _UNIT) + _TINY
        self.upper = min(self.upper, candidate if self.nonzero else 0.0)


def _times_pow2_inverse(x: Tensor, e: Tensor) -> Tensor:
    """x * 2^-e per matrix, e int32 with |e| <= 1022 (csrc: times_pow2_inverse)."""
    bits = ((1023 - e).to(torch.int64) << 52).view(torch.float64)
    return x * bits.reshape((-1,) + (1,) * (x.dim() - 1))


def _rayleigh_estimate(G: Tensor, G1: Tensor) -> tuple[Tensor, Tensor]:
    """x = G (G e_j), j the largest diagonal entry of G, and (xᵀ G1 x, xᵀ x) (csrc: rayleigh_estimate)."""
    N, c = G.shape[0], G.shape[-1]
    j = torch.argmax(torch.diagonal(G, 0, 1, 2), dim=1, keepdim=True)
    x = G @ torch.gather(G, 2, j[:, None].expand(N, c, 1))
    return x, (x.mT @ torch.cat([G1 @ x, x], 2)).reshape(N, 2)


def dense_spectral_norm_bounds_many(
    Ws: list[Tensor], rtol: float, max_gram_steps: int
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Certified brackets of every matrix of every tensor by Gram iteration alone; see csrc/dense.h.

    Returns what the op does: per dtype among Ws (in order of first appearance) every matrix's
    bounds, flattened in the order of Ws, rounded outwards to that dtype; and the widest gap.

    The same float64 operations as the compiled op, in the same order: tensors of one shape (on the
    taller side) stacked into a block, blocks of one Gram size c squared together as a group, the
    bounds' scalar arithmetic on the host.
    """
    f64 = torch.float64
    if not Ws:
        return [], [], torch.tensor(-1.0, dtype=f64)
    flat = [_flatten(W) for W in Ws]
    shapes: list[tuple[int, int]] = []
    stacked: list[list[Tensor]] = []
    block_of, offset_in_block = [], []
    for a, _ in flat:
        A = a.double() if a.shape[-2] >= a.shape[-1] else a.double().mT
        key = (A.shape[1], A.shape[2])
        if key not in shapes:
            shapes.append(key)
            stacked.append([])
        k = shapes.index(key)
        block_of.append(k)
        offset_in_block.append(sum(t.shape[0] for t in stacked[k]))
        stacked[k].append(A)
    blocks = [ts[0] if len(ts) == 1 else torch.cat(ts) for ts in stacked]
    first = [0]
    for blk in blocks:
        first.append(first[-1] + blk.shape[0])
    total = first[-1]
    position = [0] * total  # of global matrix a in the tensors' order
    factor = [1.0] * total
    start = 0
    for i, (W, (a, _)) in enumerate(zip(Ws, flat)):
        g0 = first[block_of[i]] + offset_in_block[i]
        for b in range(a.shape[0]):
            position[g0 + b] = start + b
            factor[g0 + b] = bracket_stop_factor(rtol, W.dtype)
        start += a.shape[0]
    big = torch.cat([blk.abs().amax((1, 2)) for blk in blocks]).tolist()
    k_entry = [-math.frexp(x)[1] for x in big]

    G0, G1s, step0 = [], [], []
    for k, blk in enumerate(blocks):
        p = torch.tensor([_pow2_factors(e) for e in k_entry[first[k]:first[k + 1]]], dtype=f64).T.to(blk.device)
        scaled = blk * p[0].reshape(-1, 1, 1) * p[1].reshape(-1, 1, 1)
        norm_scaled = torch.linalg.vector_norm(scaled, dim=(1, 2))
        e0 = torch.frexp(norm_scaled).exponent
        G0.append(_times_pow2_inverse(scaled, e0))
        P = G0[-1].mT @ G0[-1]
        norm_P = torch.linalg.vector_norm(P, dim=(1, 2))
        e1 = torch.frexp(norm_P).exponent
        G1s.append(_times_pow2_inverse(P, e1))
        step0.append((norm_scaled.tolist(), norm_P.tolist()))  # the exponents are taken again on the host
    sizes = list(dict.fromkeys(c for _, c in shapes))  # groups of one Gram size c, in order of appearance
    members = [[k for k, (_, c) in enumerate(shapes) if c == size] for size in sizes]
    group_offset = [0] * len(blocks)
    for ids in members:
        for j, k in enumerate(ids[1:], 1):
            group_offset[k] = group_offset[ids[j - 1]] + blocks[ids[j - 1]].shape[0]
    G1 = [torch.cat([G1s[k] for k in ids]) if len(ids) > 1 else G1s[ids[0]] for ids in members]
    G = list(G1)
    chains: list[_GramChain] = []
    k0, k1, fro, fro0 = [0] * total, [0] * total, [0.0] * total, [0.0] * total
    for k, (n_s, n_P) in enumerate(step0):
        r, c = shapes[k]
        for b in range(len(n_s)):
            a = first[k] + b
            e0 = math.frexp(n_s[b])[1]
            k0[a], k1[a] = e0 - k_entry[a], math.frexp(n_P[b])[1]  # G0 = A 2^k_entry 2^-e0
            fro0[a] = _scaled_frobenius_upper(n_s[b], float(r * c), e0)
            fro[a] = _scaled_frobenius_upper(n_P[b], float(c * c), k1[a])
            chains.append(_GramChain(k0[a], float(r * c), big[a] > 0))
            chains[a].add_step(fro0[a], k1[a], float(r), float(c), fro[a])
    active = [True] * len(sizes)  # a group stops squaring once its estimates say it may
    x_of: list[Tensor] = [torch.empty(0)] * len(sizes)
    lower = [0.0] * total
    for step in range(max_gram_steps):
        estimated = True
        for g, c in enumerate(sizes):
            if not active[g]:
                continue
            if step > 0:
                P = G[g].mT @ G[g]
                norm_P = torch.linalg.vector_norm(P, dim=(1, 2))
                e = torch.frexp(norm_P).exponent
                G[g] = _times_pow2_inverse(P, e)
                n_P = norm_P.tolist()
                for blk in members[g]:
                    for b in range(blocks[blk].shape[0]):
                        a, j = first[blk] + b, group_offset[blk] + b
                        e_j = math.frexp(n_P[j])[1]
                        following = _scaled_frobenius_upper(n_P[j], float(c * c), e_j)
                        chains[a].add_step(fro[a], e_j, float(c), float(c), following)
                        fro[a] = following
            x_of[g], quad = _rayleigh_estimate(G[g], G1[g])
            quad = quad.tolist()
            narrow = True
            for blk in members[g]:
                for b in range(blocks[blk].shape[0]):
                    a, j = first[blk] + b, group_offset[blk] + b
                    sigma = _ldexp2(_ieee_sqrt(_ldexp2(_ieee_div(quad[j][0], quad[j][1]), k1[a])), k0[a])
                    narrow = narrow and (chains[a].upper == 0 or chains[a].upper <= sigma * factor[a])
            active[g] = not narrow
            estimated = estimated and narrow
        if not estimated and step + 1 < max_gram_steps:
            continue
        certified = True
        for k, blk in enumerate(blocks):
            g = sizes.index(shapes[k][1])
            x = x_of[g][group_offset[k]:group_offset[k] + blk.shape[0]]
            norm_y = torch.linalg.vector_norm(G0[k] @ x, dim=(1, 2)).tolist()
            norm_x = torch.linalg.vector_norm(x, dim=(1, 2)).tolist()
            r, c = shapes[k]
            for b in range(blk.shape[0]):
                a = first[k] + b
                value = _ldexp2(_rayleigh_lower(norm_y[b], norm_x[b], fro0[a], float(r), float(c)), k0[a]) - _TINY
                lower[a] = value if value >= 0 else 0.0
                if not (chains[a].upper == 0 or chains[a].upper <= lower[a] * factor[a]):
                    certified, active[g] = False, True  # the estimate was optimistic
        if certified:
            break
    lower_all, upper_all = torch.empty(total, dtype=f64), torch.empty(total, dtype=f64)
    for a in range(total):
        lower_all[position[a]], upper_all[position[a]] = lower[a], chains[a].upper
    out_lower, out_upper, widest = [], [], -1.0
    for dtype in dict.fromkeys(W.dtype for W in Ws):
        lo, up = round_directed(lower_all, dtype, up=False), round_directed(upper_all, dtype, up=True)
        if dtype in (torch.float32, f64):
            gap = up.double() / lo.double().clamp_min(torch.finfo(f64).tiny) - 1
            start = 0
            for W, (a, _) in zip(Ws, flat):
                if W.dtype == dtype:
                    widest = max(widest, float(gap[start:start + a.shape[0]].max()))
                start += a.shape[0]
        out_lower.append(lo.to(Ws[0].device))
        out_upper.append(up.to(Ws[0].device))
    return out_lower, out_upper, torch.tensor(widest, dtype=f64)


# --- batched Hermitian matrices (the circulant bound's helpers) -----------------------------------
# Each Hermitian H = re + i im is held as two real (B, q, q) tensors: re symmetric, im antisymmetric.


def hermitian_cholesky_test(re: Tensor, im: Tensor, shift: Tensor) -> Tensor:
    """``torch.ops.lipfast.hermitian_cholesky_test``: whether the Cholesky factorization of re + i im
    + diag(shift) completes (lower triangles read), bool (B,); see csrc/lipfast.cpp."""
    M = torch.complex(re, im)
    M.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
    return torch.linalg.cholesky_ex(M).info == 0


def hermitian_gram(S: Tensor, p: int, negate: bool = False) -> tuple[Tensor, Tensor]:
    """``torch.ops.lipfast.hermitian_gram``: (re, im) with re + i im = KᴴK (-KᴴK when negate) for
    K = A + i B stacked as S = [A; B] (B, 2p, q): re = AᵀA + BᵀB = SᵀS, im = AᵀB - BᵀA, made exactly
    symmetric and antisymmetric; see csrc/lipfast.cpp."""
    re = S.mT @ S
    re = re.tril() + re.tril(-1).mT
    X = S[:, :p].mT @ S[:, p:]
    im = X - X.mT
    return (-re, -im) if negate else (re, im)


def bjorck_step(Q: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``torch.ops.lipfast.bjorck_step``: (out, G) with G = QᵀQ and out = (1 + beta) Q - beta Q G,
    for Q (m, n); see csrc/lipfast.cpp."""
    G = Q.mT @ Q
    return torch.addmm(Q, Q, G, beta=1 + beta, alpha=-beta), G


def hermitian_power_gain(re: Tensor, im: Tensor, start: Tensor, steps: int) -> Tensor:
    """``torch.ops.lipfast.hermitian_power_gain``: ‖H x‖ after ``steps`` normalized power steps from
    the unit start[0] + i start[1], for every H = re + i im; see csrc/lipfast.cpp."""
    B, q = re.shape[0], re.shape[-1]
    xr, xi = start[0].reshape(1, q, 1).expand(B, q, 1), start[1].reshape(1, q, 1).expand(B, q, 1)
    gain = re.new_zeros(B)
    for _ in range(steps):
        yr = torch.baddbmm(re @ xr, im, xi, alpha=-1)
        yi = torch.baddbmm(im @ xr, re, xi)
        gain = (yr.square().sum((1, 2)) + yi.square().sum((1, 2))).sqrt()
        scale = gain.clamp_min(torch.finfo(re.dtype).tiny)[:, None, None]
        xr, xi = yr / scale, yi / scale
    return gain


# --- convolution operators -----------------------------------------------------------------------
#
# A convolution layer's operator, in the canonical form used by every conv op (lipfast/conv.py
# reduces every torch conv, transposed ones included, to it):
#     x (C_in, *input_size)  ->  crop(conv(pad(x)))  (C_out, *output_size)
# pad: pad_lo / pad_hi entries on each side of each spatial dim, by padding_mode; conv: no padding,
# the given stride, dilation and groups; crop: keep the first output_size outputs of each dim.

PAD_MODES = ("zeros", "circular", "reflect", "replicate")


def pad_source_index(n: int, lo: int, hi: int, mode: str) -> Tensor:
    """For each position of a dim padded from n to lo + n + hi: the input position it copies
    (int64), or -1 where it is a zero."""
    q = torch.arange(-lo, n + hi, dtype=torch.int64)
    if mode == "zeros":
        return torch.where((q >= 0) & (q < n), q, -1)
    if mode == "circular":
        return torch.remainder(q, n)
    if mode == "replicate":
        return q.clamp(0, n - 1)
    if mode == "reflect":  # mirror about the end samples, which are not repeated
        if n == 1:
            return torch.zeros_like(q)
        r = torch.remainder(q, 2 * n - 2)
        return torch.where(r >= n, 2 * n - 2 - r, r)
    raise ValueError(f"lipfast: unknown padding_mode {mode!r}")


def _conv_pad(x: Tensor, pad_lo: list[int], pad_hi: list[int], mode: str) -> Tensor:
    spatial = x.dim() - 2
    if mode == "zeros":
        flat = [p for d in reversed(range(spatial)) for p in (pad_lo[d], pad_hi[d])]
        return torch.nn.functional.pad(x, flat)
    for d in range(spatial):
        index = pad_source_index(x.shape[2 + d], pad_lo[d], pad_hi[d], mode).to(x.device)
        x = x.index_select(2 + d, index)
    return x


def _conv_pad_adjoint(y: Tensor, input_size: list[int], pad_lo: list[int], mode: str) -> Tensor:
    spatial = y.dim() - 2
    if mode == "zeros":
        for d in range(spatial):
            y = y.narrow(2 + d, pad_lo[d], input_size[d])
        return y
    for d in reversed(range(spatial)):
        index = pad_source_index(input_size[d], pad_lo[d], y.shape[2 + d] - pad_lo[d] - input_size[d], mode)
        shape = list(y.shape)
        shape[2 + d] = input_size[d]
        y = y.new_zeros(shape).index_add_(2 + d, index.to(y.device), y)
    return y


def conv_full_output_size(input_size, kernel, stride, pad_lo, pad_hi, dilation) -> list[int]:
    """Outputs per dim of conv(pad(x)) before any crop."""
    return [
        (n + lo + hi - d * (k - 1) - 1) // s + 1
        for n, k, s, lo, hi, d in zip(input_size, kernel, stride, pad_lo, pad_hi, dilation)
    ]


def _convolution(x, weight, stride, dilation, transposed, output_padding, groups) -> Tensor:
    """ATen's convolution without padding, never in TF32 (cuDNN's default for float32 on recent GPUs,
    about 1e-3 relative error per product)."""
    spatial = weight.dim() - 2
    return torch.ops.aten._convolution(
        x, weight, None, list(stride), [0] * spatial, list(dilation), transposed, list(output_padding), groups,
        False, False, torch.backends.cudnn.enabled, False,
    )


def conv_apply(weight, x, stride, pad_lo, pad_hi, dilation, groups, padding_mode, output_size) -> Tensor:
    """The operator on a batch x (B, C_in, *input_size) -> (B, C_out, *output_size)."""
    spatial = weight.dim() - 2
    y = _convolution(_conv_pad(x, pad_lo, pad_hi, padding_mode), weight, stride, dilation, False, [0] * spatial, groups)
    for d in range(spatial):
        y = y.narrow(2 + d, 0, output_size[d])
    return y


def conv_adjoint(weight, y, input_size, stride, pad_lo, pad_hi, dilation, groups, padding_mode) -> Tensor:
    """The adjoint operator on a batch y (B, C_out, *output_size) -> (B, C_in, *input_size)."""
    spatial = weight.dim() - 2
    kernel = weight.shape[2:]
    full = conv_full_output_size(input_size, kernel, stride, pad_lo, pad_hi, dilation)
    extend = [p for d in reversed(range(spatial)) for p in (0, full[d] - y.shape[2 + d])]
    y = torch.nn.functional.pad(y, extend)
    padded = [n + lo + hi for n, lo, hi in zip(input_size, pad_lo, pad_hi)]
    # output_padding makes the transposed convolution's output exactly the padded input size
    output_padding = [
        L - ((o - 1) * s + d * (k - 1) + 1) for L, o, s, d, k in zip(padded, full, stride, dilation, kernel)
    ]
    x = _convolution(y, weight, stride, dilation, True, output_padding, groups)
    return _conv_pad_adjoint(x, list(input_size), list(pad_lo), padding_mode)


def conv_weight_gradient(weight, u, v, stride, pad_lo, pad_hi, dilation, groups, padding_mode) -> Tensor:
    """d (uᵀ A(weight) v) / d weight for the operator's vectors u (C_out, *out), v (C_in, *in)."""
    spatial = weight.dim() - 2
    x = _conv_pad(v[None], list(pad_lo), list(pad_hi), padding_mode)
    full = conv_full_output_size(v.shape[1:], weight.shape[2:], stride, pad_lo, pad_hi, dilation)
    g = torch.nn.functional.pad(u[None], [p for d in reversed(range(spatial)) for p in (0, full[d] - u.shape[1 + d])])
    with torch.backends.cudnn.flags(torch.backends.cudnn.enabled, allow_tf32=False) if weight.is_cuda else nullcontext():
        return torch.ops.aten.convolution_backward(
            g, x, weight, None, list(stride), [0] * spatial, list(dilation), False, [0] * spatial, groups,
            [False, True, False],
        )[1]


def conv_spectral_norm(
    weight, v0, input_size, stride, pad_lo, pad_hi, dilation, groups, padding_mode, output_size, max_iters, rtol,
    upper=None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Lanczos on AᵀA for the canonical conv operator A; returns (sigma, u, v, rel_err) like the op
    (upper: a known upper bound of sigma_max, or None; see _lanczos_top)."""
    ct = _compute_dtype(weight.dtype)
    # max |entry| outside [2^-32, 2^32]: iterate on w * 2^-e, max |entry| in [0.5, 1), as the op does
    largest = float(weight.detach().abs().max()) if weight.numel() else 0.0
    exponent = math.frexp(largest)[1] if 0 < largest < math.inf else 0
    exponent = 0 if abs(exponent) <= 32 else exponent
    # 2^-e in two factors (a subnormal largest entry has e down to -1073), as csrc/conv_common.cpp
    first = min(-exponent, 1023)
    w = weight.detach().to(ct) if exponent == 0 else (
        weight.detach().double() * math.ldexp(1.0, first) * math.ldexp(1.0, -exponent - first)).to(ct)
    c_in = w.shape[1] * groups
    in_shape = (c_in, *input_size)
    n = int(math.prod(in_shape))
    geometry = (stride, pad_lo, pad_hi, dilation, groups, padding_mode)

    def forward(x: Tensor) -> Tensor:
        return conv_apply(w, x.reshape(-1, *in_shape), stride, pad_lo, pad_hi, dilation, groups, padding_mode, output_size)

    def gram(x: Tensor) -> Tensor:
        return conv_adjoint(w, forward(x), input_size, *geometry).reshape(x.shape)

    start = torch.zeros(1, n, dtype=ct, device=w.device) if v0 is None else v0.reshape(1, n).to(ct)
    rank = min(n, w.shape[0] * int(math.prod(output_size)))
    scaled_upper = 0.0 if upper is None else math.ldexp(upper, -exponent)
    v, rel_err = _lanczos_top(gram, start, max_iters, rtol, rank, max_basis=_conv_basis_cap(n, ct), upper=scaled_upper)
    u, sigma = _normalized(forward(v).reshape(1, -1))
    u = torch.where(sigma > 0, u, torch.zeros_like(u))
    dt = weight.dtype
    if exponent:
        sigma = sigma.double() * math.ldexp(1.0, exponent)
    return (
        sigma.to(dt).reshape(()),
        u.to(dt).reshape(w.shape[0], *output_size),
        v.to(dt).reshape(in_shape),
        rel_err.reshape(()),
    )


def _conv_basis_cap(n: int, dtype: torch.dtype) -> int:
    """Lanczos basis size for operators with n unknowns: at most 256 vectors and about 256 MiB."""
    itemsize = torch.finfo(dtype).bits // 8
    return int(max(16, min(_MAX_BASIS, (256 << 20) // (n * itemsize))))


# ---------------------------------------------------------------------------------------------------
# k-volatility (knowledge continuity): the same tiled method as csrc/cpu/volatility_kernel.cpp.

_NEAR_FRACTION = 1.0 / 16.0
_VOLATILITY_TILE = 2048


def near_fraction(d: int, unit: float) -> float:
    """Pairs whose product-based squared distance is at most this fraction of ‖c_i‖² + ‖c_j‖² are
    recomputed exactly (csrc/volatility.h)."""
    du = d * unit
    if du >= 0.5:
        return 1.0
    return min(1.0, max(_NEAR_FRACTION, 8.0 * du / (1.0 - du)))


def pair_distances(hidden: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """‖h_i − h_j‖₂ for index pairs (i, j), in float64 from the rows as stored: scaled by the largest
    |difference|, so that it is 0 exactly when the rows are equal and never under- or overflows."""
    diff = hidden[i].double() - hidden[j].double()
    if diff.shape[1] == 0:
        return diff.new_zeros(diff.shape[0])
    largest = diff.abs().amax(dim=1)
    safe = torch.where(largest > 0, largest, torch.ones_like(largest))
    return torch.linalg.vector_norm(diff / safe[:, None], dim=1) * largest


def _centred(hidden: Tensor, compute: torch.dtype) -> tuple[Tensor, Tensor, float]:
    """C = (h − column mean) · 2^−e in `compute`, max |c| in [1/2, 1); a = ‖c_i‖² (float64); 2^e."""
    mean = hidden.double().mean(dim=0)
    rows = range(0, hidden.shape[0], _VOLATILITY_TILE)
    largest = 0.0
    if hidden.shape[1] > 0:
        largest = max(float((hidden[r : r + _VOLATILITY_TILE].double() - mean).abs().max()) for r in rows)
    e = min(max(math.frexp(largest)[1], -1022), 1023) if largest > 0 else 0
    inverse = math.ldexp(1.0, -e)
    C = torch.cat([((hidden[r : r + _VOLATILITY_TILE].double() - mean) * inverse).to(compute) for r in rows])
    return C, C.double().square().sum(dim=1), math.ldexp(1.0, e)


def pairwise_volatility(hidden: Tensor, losses: Tensor, delta: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.lipfast.pairwise_volatility``: (score, per_sample, counts); see csrc/lipfast.cpp."""
    n, d = hidden.shape
    device, f64 = hidden.device, torch.float64
    compute = f64 if hidden.dtype == f64 else torch.float32
    limit = math.inf if delta is None else float(delta)
    # Exact equality groups (+ 0 makes -0 and +0 one value).
    if d == 0:
        group = torch.zeros(n, dtype=torch.int64, device=device)
    else:
        group = torch.unique(hidden.to(compute) + 0, dim=0, return_inverse=True)[1]
    C, a, scale = _centred(hidden, compute)
    fraction = near_fraction(d, torch.finfo(compute).eps / 2)
    per_sum = torch.zeros(n, dtype=f64, device=device)
    per_count = torch.zeros(n, dtype=torch.int64, device=device)
    total = torch.zeros((), dtype=f64, device=device)
    counts = torch.zeros(3, dtype=torch.int64, device=device)
    T = _VOLATILITY_TILE
    with _util.full_float32():
        for i0 in range(0, n, T):
            I = torch.arange(i0, min(i0 + T, n), device=device)
            for j0 in range(i0, n, T):
                J = torch.arange(j0, min(j0 + T, n), device=device)
                s = a[I, None] + a[None, J]
                d2 = s - 2 * (C[I] @ C[J].T).double()
                upper = I[:, None] < J[None, :]  # each unordered pair once
                near = (d2 <= fraction * s) & upper
                far = upper & ~near
                dist = torch.sqrt(torch.where(far, d2, 1.0)) * scale
                dl = (losses[I, None] - losses[None, J]).abs()
                ok = far & (dist <= limit)
                ratio = torch.where(ok, dl / dist, 0.0)
                # Near pairs: equal rows are at distance 0; the others are recomputed from the input
                # and written into the tile, so that all sums below are plain (deterministic) reductions.
                pi, pj = near.nonzero(as_tuple=True)
                same = group[I[pi]] == group[J[pj]]
                counts[1] += same.sum()
                counts[2] += (same & (dl[pi, pj] > 0)).sum()
                pi, pj = pi[~same], pj[~same]
                exact = pair_distances(hidden, I[pi], J[pj])
                exact_ok = exact <= limit
                ratio[pi, pj] = torch.where(exact_ok, dl[pi, pj] / exact, 0.0)
                ok[pi, pj] = exact_ok
                total += ratio.sum()
                counts[0] += ok.sum()
                per_sum[I] += ratio.sum(dim=1)
                per_sum[J] += ratio.sum(dim=0)
                per_count[I] += ok.sum(dim=1)
                per_count[J] += ok.sum(dim=0)
    return total / counts[0], per_sum / per_count, counts


def sampled_volatility(
    hidden: Tensor, losses: Tensor, delta: float | None, pairs: int, seed: int, chunk: int = 1 << 16
) -> tuple[Tensor, Tensor, Tensor]:
    """pairwise_volatility over ``pairs`` unordered pairs {i, j}, i != j, drawn uniformly at random
    with replacement (a torch.Generator seeded with ``seed``), distances exact as pair_distances."""
    n = hidden.shape[0]
    device, f64 = hidden.device, torch.float64
    limit = math.inf if delta is None else float(delta)
    generator = torch.Generator().manual_seed(seed)
    # Per-sample sums are scattered on the CPU, where index_add_ is deterministic (on a GPU it adds
    # with atomics, in no fixed order).
    per_sum = torch.zeros(n, dtype=f64)
    per_count = torch.zeros(n, dtype=torch.int64)
    total = torch.zeros((), dtype=f64)
    counts = torch.zeros(3, dtype=torch.int64)
    for start in range(0, pairs, chunk):
        k = min(chunk, pairs - start)
        i = torch.randint(n, (k,), generator=generator)
        j = torch.randint(n - 1, (k,), generator=generator)
        j += j >= i  # uniform over the other n - 1 rows
        dist = pair_distances(hidden, i.to(device), j.to(device)).cpu()
        dl = (losses[i.to(device)] - losses[j.to(device)]).abs().cpu()
        zero = dist == 0
        ok = ~zero & (dist <= limit)
        ratio = torch.where(ok, dl / torch.where(zero, 1.0, dist), 0.0)
        total += ratio.sum()
        counts[0] += ok.sum()
        counts[1] += zero.sum()
        counts[2] += (zero & (dl > 0)).sum()
        per_sum.index_add_(0, i, ratio).index_add_(0, j, ratio)
        per_count.index_add_(0, i, ok.long()).index_add_(0, j, ok.long())
    total, per_sum, per_count, counts = (x.to(device) for x in (total, per_sum, per_count, counts))
    return total / counts[0], per_sum / per_count, counts
