"""lipfast on torch.distributed: spectral norms of weights sharded across ranks.

A weight W (m × n) split by rows (``shard_dim=0``: rank r holds W_r, m_r × n) or by columns
(``shard_dim=1``: rank r holds m × n_r) is never gathered.  Every product with WᵀW is a local product
on the shard and one all-reduce of an n-vector (for column shards the same on Wᵀ, whose norm is
W's); the certified upper bound all-reduces the n × n Gram matrix once and carries the rounding error
of the sum into the bound.  Every rank returns the same result, equal to the single-process one to
rtol.  Ranks must run with the same number of CPU threads (checked): the iterations take their
decisions on every rank from replicated values, which must round alike.

With torch.distributed initialized, :func:`lipfast.lipschitz_bound` also shares the layers of a
network out across the ranks (``group=``).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import Tensor

from lipfast import conv, linalg, reference

__all__ = ["spectral_norm", "spectral_norm_bounds"]

_UNIT = 2.0**-53
_TINY = 2.0**-1074


def require_group(fn: str, group: object) -> object:
    """The process group to use (the default one for None); raises when torch.distributed is not up."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"lipfast.{fn}: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first"
        )
    return group if group is not None else dist.group.WORLD


def _local(fn: str, local_shard: object, shard_dim: object, group: object) -> tuple[object, object, object]:
    """(local tensor, shard_dim, group), read off a DTensor sharded on one mesh dimension
    (Shard(0) / Shard(1)) or passed through for a plain tensor."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch built without distributed
        DTensor = None
    if DTensor is not None and isinstance(local_shard, DTensor):
        placements = local_shard.placements
        if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim not in (0, 1):
            raise ValueError(f"lipfast.distributed.{fn}: a DTensor must be sharded on one mesh dimension as "
                             f"Shard(0) or Shard(1), got placements {placements}")
        if shard_dim is not None and shard_dim % 2 != placements[0].dim:
            raise ValueError(f"lipfast.distributed.{fn}: shard_dim={shard_dim} contradicts the DTensor's {placements[0]}")
        if group is not None:
            raise ValueError(f"lipfast.distributed.{fn}: a DTensor brings its own process group; pass group=None")
        return local_shard.to_local(), placements[0].dim, local_shard.device_mesh.get_group()
    if shard_dim is None:
        raise ValueError(f"lipfast.distributed.{fn}: shard_dim (0 for rows, 1 for columns) is needed for a plain tensor shard")
    return local_shard, shard_dim, require_group(f"distributed.{fn}", group)


def _row_shard(fn: str, local_shard: object, shard_dim: object, group: object) -> tuple[Tensor, int, int]:
    """This rank's shard as rows of a row-sharded matrix A (W, or Wᵀ for column shards), checked
    against every other rank's; returns (A_r, total rows, columns)."""
    # Every check is exchanged before anything is raised, so that an error on one rank is raised on
    # all of them and none is left waiting in a collective.
    problem = None
    if not isinstance(local_shard, Tensor):
        problem = f"local_shard must be a torch.Tensor, got {type(local_shard).__name__}"
    elif not local_shard.is_floating_point():
        problem = f"local_shard must be floating point, got {local_shard.dtype}"
    elif local_shard.dim() != 2:
        problem = f"local_shard must be a matrix (2 dims), got shape {tuple(local_shard.shape)}"
    elif shard_dim not in (0, 1, -1, -2) or isinstance(shard_dim, bool):
        problem = f"shard_dim must be 0 (rows) or 1 (columns), got {shard_dim!r}"
    elif not bool(torch.isfinite(local_shard).all()):
        problem = "local_shard has a NaN or Inf entry"
    A = None
    if problem is None:
        A = local_shard.detach() if shard_dim in (0, -2) else local_shard.detach().T
    mine = (problem, *(A.shape if A is not None else (0, 0)), str(getattr(A, "dtype", "")),
            getattr(getattr(A, "device", None), "type", ""), torch.get_num_threads())
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    problems = [(r, s[0]) for r, s in enumerate(everyone) if s[0] is not None]
    if problems:
        raise ValueError(f"lipfast.distributed.{fn}: " + "; ".join(f"on rank {r}: {p}" for r, p in problems))
    everyone = [s[1:] for s in everyone]
    if len({(cols, dtype, device) for _, cols, dtype, device, _ in everyone}) > 1:
        raise ValueError(
            f"lipfast.distributed.{fn}: the shards do not fit together: every rank must hold the same number of "
            f"{'columns' if shard_dim in (0, -2) else 'rows'}, dtype and device type; got "
            + ", ".join(f"rank {r}: {s[:2] if shard_dim in (0, -2) else s[1::-1]} {s[2]} {s[3]}" for r, s in enumerate(everyone))
        )
    if len({s[4] for s in everyone}) > 1:
        raise ValueError(
            f"lipfast.distributed.{fn}: ranks run with different numbers of CPU threads "
            f"({[s[4] for s in everyone]}); set the same torch.set_num_threads on every rank"
        )
    rows = sum(s[0] for s in everyone)
    if rows == 0 or A.shape[1] == 0:
        raise ValueError(f"lipfast.distributed.{fn}: the sharded matrix is empty ({rows} x {A.shape[1]})")
    return A, rows, A.shape[1]


def _all_reduce(x: Tensor, group: object, op=dist.ReduceOp.SUM) -> Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


def _largest_exponent(A: Tensor, group: object) -> int:
    """e with the largest |entry| over all shards in [2^(e-1), 2^e) (frexp's exponent; 0 when all are 0)."""
    local = A.abs().max().double().reshape(1) if A.numel() else torch.zeros(1, dtype=torch.float64, device=A.device)
    big = float(_all_reduce(local, group, dist.ReduceOp.MAX)[0])
    return math.frexp(big)[1] if big > 0 else 0


def _power_of_two_scale(e: int, dtype: torch.dtype) -> float:
    """2^(1-e), bringing the largest |entry| (of exponent e, _largest_exponent) into [1, 2) when it
    lies outside [2^-32, 2^32] (products of the order of sigma^2 must neither overflow nor
    underflow), else 1.  The factor is kept finite in dtype (what A is scaled in): a subnormal
    largest entry is then brought up to about 2^-22 in float32, 2^-50 in float64, well inside."""
    if e == 0 or abs(e - 1) <= 32:
        return 1.0
    return math.ldexp(1.0, min(1 - e, math.frexp(torch.finfo(dtype).max)[1] - 1))


def _top_vector(A: Tensor, rows: int, n: int, group: object, rtol: float, max_iters: int,
                e: int) -> tuple[Tensor, Tensor, float]:
    """Lanczos on AᵀA = Σ_r A_rᵀ A_r (one all-reduce per step), A's largest entry of exponent e: the
    unit Ritz vector (n,), its residual bound, identical on every rank, and the power of two A was
    scaled by for it."""
    compute = reference._compute_dtype(A.dtype)
    scale = _power_of_two_scale(e, compute)
    scaled = A.to(compute) * scale

    def gram(x: Tensor) -> Tensor:
        return _all_reduce(scaled.T @ (scaled @ x[0]), group)[None]

    start = torch.zeros(1, n, dtype=compute, device=A.device)
    v, rel_err = reference._lanczos_top(gram, start, max_iters, rtol, min(rows, n))
    return v[0], rel_err[0], scale


def spectral_norm(local_shard: Tensor, shard_dim: int | None = None, *, group=None, rtol: float = 1e-5,
                  max_iters: int | None = None) -> Tensor:
    """Largest singular value of a matrix sharded across the ranks of ``group`` (default: the world):
    ``local_shard`` is this rank's rows (``shard_dim=0``) or columns (``shard_dim=1``), in rank order,
    or a DTensor sharded as Shard(0) or Shard(1) on a one-dimensional mesh (shard_dim and group then
    come from it).

    Lanczos as :func:`lipfast.spectral_norm` (to relative accuracy ``rtol``; a RuntimeWarning when
    ``max_iters`` passes stop it earlier), each pass one local product and one all-reduce of a vector.
    Returns a 0-dim tensor in the shard's dtype, the same on every rank.  Differentiable: each rank's
    gradient with respect to its shard is its block of u vᵀ.
    """
    fn = "spectral_norm"
    local_shard, shard_dim, group = _local(fn, local_shard, shard_dim, group)
    rtol = linalg._check_rtol(f"distributed.{fn}", rtol)
    max_iters = linalg._check_count(f"distributed.{fn}", "max_iters", max_iters, linalg.DEFAULT_MAX_ITERS)
    A, rows, n = _row_shard(fn, local_shard, shard_dim, group)
    with torch.no_grad():
        v, rel_err, scale = _top_vector(A, rows, n, group, rtol, max_iters, _largest_exponent(A, group))
        Av = (A.double() * scale) @ v.double()  # scaled: its squares neither under- nor overflow
        sigma = _all_reduce(Av.square().sum().reshape(1), group)[0].sqrt() / scale
    if not float(rel_err) <= rtol:
        warnings.warn(
            f"lipfast.distributed.{fn}: stopped before reaching rtol={rtol:g} (max_iters={max_iters} passes); "
            f"relative accuracy reached: {float(rel_err):.3g}",
            RuntimeWarning,
            stacklevel=2,
        )
    result = sigma.to(local_shard.dtype)
    if local_shard.requires_grad:
        # sigma = uᵀ W v: this shard's part of the gradient is u_r vᵀ (rows) or u v_rᵀ (columns).
        u = (Av / (sigma * scale).clamp_min(torch.finfo(torch.float64).tiny)).to(local_shard.dtype)  # Av is scaled
        W = local_shard if shard_dim in (0, -2) else local_shard.T
        bilinear = u @ W @ v.to(local_shard.dtype)
        result = result + (bilinear - bilinear.detach())
    return result


def spectral_norm_bounds(local_shard: Tensor, shard_dim: int | None = None, *, group=None, rtol: float = 1e-3,
                         max_iters: int | None = None, max_gram_steps: int | None = None) -> tuple[Tensor, Tensor]:
    """Certified bracket ``lower <= sigma_max(W) <= upper`` of a matrix sharded across ranks, as
    :func:`spectral_norm` shards it; 0-dim tensors in the shard's dtype (rounded outwards), the same
    on every rank.

    lower: ‖W v‖ at a Lanczos vector v, from every shard's certified lower bound of ‖W_r v‖.  upper:
    the Gram matrix AᵀA (A = W row-sharded, or Wᵀ) is formed in float64 as one all-reduced sum of the
    shards' products, with the rounding error of the products and of the sum bounded (E, in spectral
    norm).  On the CPU, one Cholesky test of mu² I - G with E folded into its rounding, at mu just
    above a Lanczos estimate, proves sigma_max(W) <= mu (as :func:`lipfast.spectral_norm_bounds`
    does: a bracket about 1e-6 wide).  On other devices, or where that test fails, Gram iteration on
    G (certified, as :func:`lipfast.spectral_norm_bounds`) gives sigma_max(AᵀA) <= U and
    sigma_max(W) <= sqrt(U + E); it stops at ``upper <= lower (1 + rtol)`` or after
    ``max_gram_steps`` squarings (a RuntimeWarning reports a wider gap).  Not differentiable.  The
    Gram matrix is n × n (n: the dimension that is not sharded), on every rank.
    """
    fn = "spectral_norm_bounds"
    local_shard, shard_dim, group = _local(fn, local_shard, shard_dim, group)
    rtol = linalg._check_rtol(f"distributed.{fn}", rtol)
    max_iters = linalg._check_count(f"distributed.{fn}", "max_iters", max_iters, linalg.DEFAULT_MAX_ITERS)
    max_gram_steps = linalg._check_count(f"distributed.{fn}", "max_gram_steps", max_gram_steps, linalg.DEFAULT_MAX_GRAM_STEPS)
    A, rows, n = _row_shard(fn, local_shard, shard_dim, group)
    P = dist.get_world_size(group)
    m_r = A.shape[0]
    with torch.no_grad():
        k_entry = _largest_exponent(A, group)
        v, _, _ = _top_vector(A, rows, n, group, rtol / 8, max_iters, k_entry)
        # Scale all shards by one power of two 2^-k so that the Gram matrix is of order 1: k from the
        # global Frobenius norm of the shards times 2^-k_entry (largest |entry| over all shards in
        # [0.5, 1): torch's norms square the entries as they are, which under- or overflow beyond
        # 2^±511).  Entries that underflow in the scaled copy change ‖A‖ by at most sqrt(rows n)
        # 2^-1075 (scaled units), taken into account below.
        Ae = reference._times_pow2_by(A.double(), -k_entry)
        fro_r = reference._frobenius_upper(Ae[None])[0] if m_r else A.new_zeros((), dtype=torch.float64)
        fro = _all_reduce(fro_r.square().reshape(1), group)[0].sqrt() * (1.0 + 2.0 * (P + 4) * _UNIT)
        k = k_entry + (math.frexp(float(fro))[1] if float(fro) > 0 else 0)
        As = reference._times_pow2_by(A.double(), -k)
        underflow = math.sqrt(rows * n) * _TINY

        # lower: ‖A v‖ / ‖v‖ = sqrt(Σ_r (‖A_r v‖ / ‖v‖)²) >= sqrt(Σ_r lower_r²), rounded down, in the
        # scaled units (the squares of order 1; P 2^-1075 covers those that underflow), less the
        # underflow of the scaling, then in A's units.
        lower_r = reference.certified_rayleigh_lower(As[None], v[None])[0] if m_r else A.new_zeros((), dtype=torch.float64)
        lower_s = _all_reduce(lower_r.square().reshape(1), group)[0].sqrt() * (1.0 - 4.0 * (P + 4) * _UNIT)
        lower_s = (lower_s - math.sqrt(P * _TINY) - underflow).clamp_min(0.0)
        lower = (reference._times_pow2_by(lower_s, k) - _TINY).clamp_min(0.0)

        fro_s = reference._frobenius_upper(As[None])[0] if m_r else A.new_zeros((), dtype=torch.float64)
        G = conv._symmetric_gram(As) if As.device.type == "cpu" else As.T @ As  # CPU: from its lower block triangle
        # Error of this rank's product (entrywise gamma(m_r) |A|ᵀ|A|, whose Frobenius norm is at most
        # gamma(m_r) ‖A‖_F², plus underflow), then of the float64 sum over P ranks (gamma(P) times the
        # sum of the terms' Frobenius norms).
        local_error = reference._gamma(m_r) * fro_s * fro_s * (1.0 + 4.0 * _UNIT) + n * (m_r + 1.0) * _TINY
        sums = _all_reduce(torch.stack([local_error, fro_s * fro_s]).double(), group)
        E = (sums[0] + reference._gamma(P) * (1.0 + reference._gamma(rows) + 8.0 * _UNIT) * sums[1] * (1.0 + 4.0 * _UNIT)) \
            * (1.0 + 2.0 * (P + 4) * _UNIT) + P * n * n * _TINY
        G = _all_reduce(G, group)  # the same bits on every rank
        upper_s = torch.tensor(math.inf, dtype=torch.float64)
        if G.device.type == "cpu":
            # One Cholesky test of mu^2 I - G, E folded into its rounding, at mu just above a Lanczos
            # estimate (as lipfast.spectral_norm_bounds does on one process): a bracket about 1e-6 wide.
            square, _ = conv._dense_top(G[None], conv._DENSE_ESTIMATE_RTOL * rtol, max_iters)
            fro2 = sums[1] * (1.0 + 2.0 * (P + 4) * _UNIT)
            upper_s = conv.certify_gram(G[None], fro2.reshape(1), E.reshape(1), square.double().clamp_min(0).sqrt(), rtol)[0]
            upper_s = upper_s * (1.0 + 4.0 * _UNIT) + underflow
            # LAPACK's factorization need not round alike in every process: the largest (or inf: a
            # rank whose test failed sends them all to Gram iteration) is every rank's bound
            upper_s = _all_reduce(upper_s.reshape(1), group, dist.ReduceOp.MAX)[0]
        if not bool(torch.isfinite(upper_s)):  # other devices, or no test held: Gram iteration on G
            target = (lower_s * reference.bracket_stop_factor(rtol, local_shard.dtype)) ** 2
            upper_G = reference.gram_upper_bound(G[None], target.reshape(1), max_gram_steps)[0]
            upper_s = torch.sqrt((upper_G + E) * (1.0 + 4.0 * _UNIT)) * (1.0 + 4.0 * _UNIT) + underflow
        upper = reference._times_pow2_by(upper_s, k)
        upper = upper * (1.0 + 4.0 * _UNIT) + _TINY  # + 2^-1074: a subnormal result rounds to nearest
    dtype = local_shard.dtype
    lower_out = reference.round_directed(lower.reshape(1), dtype, up=False)[0]
    upper_out = reference.round_directed(upper.reshape(1), dtype, up=True)[0]
    if not float(upper_out) <= float(lower_out) * (1 + rtol):
        warnings.warn(
            f"lipfast.distributed.{fn}: the bracket [{float(lower_out):.6g}, {float(upper_out):.6g}] is wider than "
            f"rtol={rtol:g} after max_gram_steps={max_gram_steps} squarings",
            RuntimeWarning,
            stacklevel=2,
        )
    return lower_out, upper_out
