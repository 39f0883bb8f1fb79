"""Shared parameters: backend (cpp, python), device (cpu, and cuda when present), test matrices."""
from __future__ import annotations

import os

import pytest
import torch

import lipfast
from lipfast import _ext

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def require_ext() -> None:
    """Fail (never skip) when the compiled kernels should be there and are not."""
    if not _ext.HAS_EXT:
        if os.environ.get("LIPFAST_NO_EXT") == "1":
            pytest.skip("pure-Python install (LIPFAST_NO_EXT=1): no compiled kernels to test")
        pytest.fail(f"the compiled kernels did not load: {_ext.LOAD_ERROR}")


@pytest.fixture(params=["cpp", "python"])
def backend(request):
    if request.param == "cpp":
        require_ext()
    with lipfast.set_backend(request.param):
        yield request.param


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=["dense", "gram"])
def certificate(request, monkeypatch):
    """spectral_norm_bounds' two certificates on every size: the Cholesky test of the Gram matrix
    (CPU float32/float64; from 64 columns by default), and Gram iteration."""
    monkeypatch.setattr(lipfast.linalg, "DENSE_CERTIFICATE_MIN_DIM", 1 if request.param == "dense" else 10**9)
    return request.param


def with_singular_values(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """U diag(s) Vᵀ with random orthogonal U (m x m) and V (n x n), float64."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    return (U[:, :k] * s[:k]) @ V[:, :k].T


def make_matrix(kind: str) -> torch.Tensor:
    """The test matrices, float64 (cast by the tests)."""
    g = torch.Generator().manual_seed(sum(map(ord, kind)))
    if kind == "square":
        return torch.randn(50, 50, generator=g, dtype=torch.float64)
    if kind == "tall":
        return torch.randn(120, 30, generator=g, dtype=torch.float64)
    if kind == "wide":
        return torch.randn(30, 120, generator=g, dtype=torch.float64)
    if kind == "batched":
        return torch.randn(2, 3, 20, 25, generator=g, dtype=torch.float64)
    if kind == "rank1":
        a = torch.randn(40, 1, generator=g, dtype=torch.float64)
        b = torch.randn(1, 30, generator=g, dtype=torch.float64)
        return a @ b
    if kind == "diagonal":
        return torch.diag(torch.linspace(-3.0, 2.5, 25, dtype=torch.float64))
    if kind == "close_gap":
        # sigma_2 / sigma_1 = 0.999, the rest spread below: power iteration's worst case.
        s = torch.cat([torch.tensor([1.0, 0.999]), torch.linspace(0.99, 0.01, 98)]).double()
        return with_singular_values(120, 100, s, seed=7)
    if kind == "large":
        # one matrix big enough for the row-parallel path of the C++ kernels
        return torch.randn(400, 300, generator=g, dtype=torch.float64)
    if kind == "tiny":
        return torch.randn(1, 1, 7, generator=g, dtype=torch.float64)
    raise KeyError(kind)


KINDS = ["square", "tall", "wide", "batched", "rank1", "diagonal", "close_gap", "large", "tiny"]


def exact_spectral_norm(W: torch.Tensor) -> torch.Tensor:
    """sigma_max of each matrix as stored, by a float64 SVD."""
    return torch.linalg.matrix_norm(W.detach().cpu().double(), ord=2)


def random_network(block: type, kinds: int, seed: int) -> tuple[torch.nn.Module, int]:
    """(model, c): 1 to 3 blocks ``block(c, kind, rng)`` of random kinds on (c, 4, 4) inputs, then a
    Linear to 3 outputs, float64, in eval mode, all drawn from ``seed``."""
    import random

    rng = random.Random(seed)
    torch.manual_seed(seed)
    c = rng.choice([2, 4])
    blocks = [block(c, rng.randrange(kinds), rng) for _ in range(rng.randint(1, 3))]
    return torch.nn.Sequential(*blocks, torch.nn.Flatten(), torch.nn.Linear(c * 16, 3).double()).eval(), c
