"""Toom-Cook for the autocorrelation of a kernel's tap matrices.

Given one matrix P_p (inner x block) per kernel position p (a tuple over the kernel's dims), the
autocorrelation is C_u = Σ over p, p' with p' - p = k - 1 - u of P_pᵀ P_p' (u per dim in
0 .. 2k - 2), which AOL, SLL and the circulant bounds of zero-padded convolutions need: for a conv
kernel K with P_p = K[:, :, p] it is the kernel of AᵀA (R_s = C_(k-1-s), R_s = Σ_p K_pᵀ K_(p+s)).

One product per pair of overlapping positions costs about k^(2 dims) / 2 products (45 for 3x3,
using R_-s = R_sᵀ).  Here instead: with P(x) = Σ_p P_p x^p and P~ the same with the positions
reversed, P(x)ᵀ P~(x) = Σ_u C_u x^u is a matrix polynomial of degree 2 (k - 1) per dim, so its
values at a grid of Π (2k - 1) points, one product each, give every C_u by interpolation; and
C_(2k-2-u) = C_uᵀ makes the value at (1/x_1, 1/x_2, ...) that at x transposed, times Π x_i^-(2k_i - 2),
so only points with no inverse earlier in the grid take a product: 19 of 25 for a 3x3 kernel.

Only the centre and the outputs after it are formed (the rest are their transposes): with F the
interpolation weights of the points that take a product and B those of the others, moved onto
their source points and scaled, C_u = (F M)_u + (B M)_uᵀ, so that C_u +- C_uᵀ = Z +- Zᵀ with
Z = (F +- B) M, which the circulant bounds use (lipfast.conv._Autocorrelation).

Rounding of Z (any float type with unit u, gamma(n) = n u / (1 - n u)): the points are 0, +-1,
+-2, 1/2 and infinity, so every evaluation coefficient e_p(x) is exact, and the weights F +- B are
the exact rationals rounded once.  The value at a point x is off by at most g1 E_x E~_x T
entrywise, g1 = gamma(inner + 2 taps + 1), E_x the largest |e_p(x)| (E~_x for the reversed
positions), T = |P|ᵀ|P| with |P| = Σ_p |P_p|: each evaluation is a sum of taps terms (off by
gamma(taps) Σ_p |e_p(x)| |P_p| <= gamma(taps) E_x |P|), then one product over inner.  A point whose
value is its source's transposed times a power of 2 (exactly) has E_x E~_x equal to that power
times its source's, so it is off by that power times its source's error.  Z sums the taken points' values with their weights (off by one unit each), so with
g2 = gamma(points + 1) (1 + g1) + g1,

    |fl(Z_u) - Z_u| <= g2 A T,   A = max_u Σ_x |V_ux| E_x E~_x   (all points x, V the interpolation),

A from the plan, exactly (42.25 for a 3x3 kernel, 196 for 4x4, 274.6 for 3x3x3), plus underflow.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

#: evaluation points per kernel size k along a dim (2k - 1 of them; None: infinity, whose "value" is
#: the leading coefficient), closed under x -> 1/x as far as they can be (0 and infinity, 2 and 1/2,
#: 1 and -1 with themselves).  Measured in float32 against float64 on random, positive and single-tap
#: kernels, AOL's row sums came out within 1.6-4.5e-7 for k <= 4 (the per-shift products: 1.5-9e-7);
#: k = 5 needs larger points and lost a factor 10, so larger kernels take the per-pair products.
POINTS: dict[int, tuple[Fraction | None, ...]] = {
    1: (Fraction(1),),
    2: (Fraction(0), Fraction(1), None),
    3: (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), None),
    4: (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2), None),
}

Rows = list[list[Fraction]]


def supported(kernel: tuple[int, ...]) -> bool:
    """Whether correlations() takes a kernel of this shape."""
    return all(k in POINTS for k in kernel)


def _powers(points: tuple[Fraction | None, ...], n: int) -> Rows:
    """The row of x is (1, x, ..., x^(n-1)); the row of infinity picks the leading coefficient."""
    return [[Fraction(int(e == n - 1)) if x is None else x**e for e in range(n)] for x in points]


def _inverted(rows: Rows) -> Rows:
    """The exact inverse, by Gauss-Jordan elimination on rationals."""
    n = len(rows)
    A = [row[:] + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(rows)]
    for c in range(n):
        pivot = next(r for r in range(c, n) if A[r][c] != 0)
        A[c], A[pivot] = A[pivot], A[c]
        A[c] = [v / A[c][c] for v in A[c]]
        for r in range(n):
            if r != c and A[r][c] != 0:
                A[r] = [a - A[r][c] * b for a, b in zip(A[r], A[c])]
    return [row[n:] for row in A]


def _kron(factors: list[Rows]) -> Rows:
    out = factors[0]
    for factor in factors[1:]:
        out = [[a * b for a in left for b in right] for left in out for right in factor]
    return out


def _inverse(x: Fraction | None) -> Fraction | None:
    return None if x == 0 else Fraction(0) if x is None else 1 / x


def _tensor(rows: Rows) -> Tensor:
    """float64, each entry the exact one rounded to nearest (float() of a Fraction)."""
    return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)


@dataclass(frozen=True)
class Plan:
    """What the functions below need for one kernel shape, float64 on the CPU, each entry the exact
    rational rounded once (the evaluations come out exact): the evaluations at the points that take
    a product, of the positions and then of the reversed positions ((2 taken, taps), positions
    row-major); the interpolation onto the upper half of the outputs (u >= the centre, row-major:
    C_u for the others is C_(2k-2-u)ᵀ), split as C_u = Σ_x F_ux M_x + (Σ_x B_ux M_x)ᵀ over the taken
    points' values M_x (B: the weights of the points whose values are transposes, moved to their
    source points and scaled), and F + B, F - B; and the rounding factor A."""

    evaluate: Tensor
    forward: Tensor
    backward: Tensor
    sums: Tensor  # F + B and F - B, each rounded once from the exact
    differences: Tensor
    points: int
    amplification: float

    @property
    def products(self) -> int:
        return self.forward.shape[1]

    def error(self, inner: int, eps: float) -> float:
        """The factor c with |fl(Z_u) - Z_u| <= c T entrywise for Z = (F +- B) M (module docstring),
        for products over `inner` terms in a type of unit eps."""
        def gamma(n: float) -> float:
            return n * eps / (1 - n * eps)
        g1 = gamma(inner + 2 * self.evaluate.shape[1] + 1)
        g2 = gamma(self.points + 1) * (1 + g1) + g1
        return g2 * self.amplification * (1 + 2 * eps)


@functools.lru_cache(maxsize=None)
def plan(kernel: tuple[int, ...]) -> Plan:
    grid = list(itertools.product(*(POINTS[k] for k in kernel)))
    where = {point: i for i, point in enumerate(grid)}
    taken: list[int] = []
    mirrored: list[tuple[int, int, Fraction]] = []  # (point, index of its inverse among the taken, scale)
    for i, point in enumerate(grid):
        j = where.get(tuple(_inverse(x) for x in point))
        if j is None or j >= i:
            taken.append(i)
            continue
        scale = Fraction(1)
        for v, k in zip(grid[j], kernel):
            if v is not None and v != 0:
                scale *= v ** (2 - 2 * k)  # the value at 1/v is v^-(2k - 2) times the one at v, transposed
        mirrored.append((i, taken.index(j), scale))
    evaluations = [_powers(POINTS[k], k) for k in kernel]
    evaluate = _kron(evaluations)
    evaluate_reversed = _kron([[row[::-1] for row in E] for E in evaluations])
    interpolate = _kron([_inverted(_powers(POINTS[k], 2 * k - 1)) for k in kernel])  # exact: the bound needs it
    # E_x E~_x per point (a mirrored point's equals its scale times its source's), then A, exactly
    reach = [max(map(abs, a)) * max(map(abs, b)) for a, b in zip(evaluate, evaluate_reversed)]
    amplification = max(sum(abs(v) * r for v, r in zip(row, reach)) for row in interpolate)
    half = interpolate[(len(grid) - 1) // 2 :]
    forward = [[row[x] for x in taken] for row in half]
    backward = [[Fraction(0)] * len(taken) for _ in half]
    for point, source, scale in mirrored:
        for row, weights in zip(half, backward):
            weights[source] += row[point] * scale
    return Plan(
        _tensor([evaluate[x] for x in taken] + [evaluate_reversed[x] for x in taken]),
        _tensor(forward), _tensor(backward),
        _tensor([[f + b for f, b in zip(*rows)] for rows in zip(forward, backward)]),
        _tensor([[f - b for f, b in zip(*rows)] for rows in zip(forward, backward)]),
        len(grid), float(amplification) * (1 + 2.0**-50),
    )


def values(P: Tensor, kernel: tuple[int, ...], out: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """M (taken, *batch, block, block): P(x)ᵀ P~(x) at the points that take a product, from P (taps,
    *batch, inner, block), its positions row-major over `kernel` (supported()); out: optional
    buffers for the evaluations (2 taken, taps) @ (taps, rest) and for M, as 2-D tensors."""
    steps = plan(tuple(kernel))
    taken = steps.products
    evaluate = steps.evaluate.to(device=P.device, dtype=P.dtype)
    flipped = not P.is_contiguous() and P.mT.is_contiguous()  # a transposed view: evaluate what is stored
    stored = P.mT if flipped else P
    both = torch.mm(evaluate, stored.reshape(P.shape[0], -1), out=None if out is None else out[0])
    A, B = (both[i * taken : (i + 1) * taken].view(taken, *stored.shape[1:]) for i in range(2))
    if flipped:
        A, B = A.mT, B.mT
    shape = (taken, *P.shape[1:-2], P.shape[-1], P.shape[-1])
    return torch.matmul(A.mT, B, out=None if out is None else out[1].view(shape))


def correlations(P: Tensor, kernel: tuple[int, ...]) -> Tensor:
    """C (Π (2k - 1) // 2 + 1, *batch, block, block): C_u = Σ_(p' - p = k - 1 - u) P_pᵀ P_p' for
    the u from the centre up (row-major; C_(2k-2-u) = C_uᵀ gives the rest), from P (taps, *batch,
    inner, block), its positions row-major over `kernel` (supported())."""
    steps = plan(tuple(kernel))
    M = values(P, kernel)
    flat = M.reshape(M.shape[0], -1)
    forward, backward = (t.to(device=P.device, dtype=P.dtype) for t in (steps.forward, steps.backward))
    return (forward @ flat).view(-1, *M.shape[1:]) + (backward @ flat).view(-1, *M.shape[1:]).mT
