"""Toom-Cook autocorrelations (lipfast._toom) against the sums over pairs of kernel positions."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from lipfast import _toom


def _pair_sums(P: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """C_u = Σ over p, p' with p' - p = k - 1 - u of P_pᵀ P_p', every u, row-major, one product a pair."""
    positions = list(itertools.product(*(range(k) for k in kernel)))
    outputs = list(itertools.product(*(range(2 * k - 1) for k in kernel)))
    C = P.new_zeros(len(outputs), *P.shape[1:-2], P.shape[-1], P.shape[-1])
    for i, u in enumerate(outputs):
        for a, p in enumerate(positions):
            q = tuple(x + k - 1 - v for x, k, v in zip(p, kernel, u))
            if all(0 <= x < k for x, k in zip(q, kernel)):
                C[i] += P[a].mT @ P[positions.index(q)]
    return C


@pytest.mark.parametrize("kernel", [(1,), (2,), (3,), (4,), (1, 1), (2, 2), (3, 3), (4, 4), (1, 3), (2, 4), (3, 3, 3), (2, 3, 1)])
@pytest.mark.parametrize("stored", ["as given", "transposed"])
def test_correlations_equal_the_pair_sums(kernel, stored):
    g = torch.Generator().manual_seed(len(kernel) * 10 + sum(kernel))
    P = torch.randn(math.prod(kernel), 2, 5, 4, generator=g, dtype=torch.float64)  # a batch of 2 groups
    if stored == "transposed":  # a view of the transposed layout (the circulant bounds pass W_jᵀ so)
        P = P.mT.contiguous().mT
    exact = _pair_sums(P, kernel)
    half = _toom.correlations(P, kernel)
    n = exact.shape[0]
    assert half.shape == (n // 2 + 1, 2, 4, 4)
    torch.testing.assert_close(half, exact[(n - 1) // 2 :], rtol=0, atol=1e-12 * float(exact.abs().max()))
    torch.testing.assert_close(exact[: (n - 1) // 2 + 1].flip(0), half.mT, rtol=0, atol=1e-12 * float(exact.abs().max()))


@pytest.mark.parametrize("kernel", [(3, 3), (4, 4), (3, 3, 3), (3,)])
def test_rounding_stays_within_the_stated_bound(kernel):
    # integer entries: the pair sums are exact in float64 (every partial sum below 2^53), so what
    # differs is Toom-Cook's own rounding.  The circulant bounds use C_u +- C_uᵀ = Z +- Zᵀ, Z = (F +- B) M:
    # each Z within error() T entrywise, so Z +- Zᵀ within 2 error() T plus the rounding of the sum
    g = torch.Generator().manual_seed(7)
    inner, block = 48, 16
    P = torch.randint(-50, 51, (math.prod(kernel), inner, block), generator=g).double()
    exact = _pair_sums(P, kernel)[math.prod(2 * k - 1 for k in kernel) // 2 :]
    plan = _toom.plan(kernel)
    M = _toom.values(P, kernel).reshape(plan.products, -1)
    absolute = P.abs().sum(dim=0)
    T = absolute.mT @ absolute
    c = plan.error(inner, 2.0**-53)
    bound = (2 * c + 2.0**-53 * 2 * plan.amplification * (1 + c)) * T
    worst = 0.0
    for weights, sign in ((plan.sums, 1), (plan.differences, -1)):
        Z = (weights @ M).view(-1, block, block)
        error = ((Z + sign * Z.mT) - (exact + sign * exact.mT)).abs()
        assert bool((error <= bound).all())
        worst = max(worst, float((error / T).max()))
    assert worst > 0  # (rounding does happen: 1/3 and 1/6 are among the weights)
    assert c < 1e-10


def test_points_whose_values_are_transposes_take_no_product():
    assert _toom.plan((3, 3)).products == 19 and _toom.plan((3,)).products == 4
    assert _toom.plan((4, 4)).products == 33 and _toom.plan((1, 1)).products == 1
    assert not _toom.supported((5, 3)) and _toom.supported((4, 1, 2))
