"""The dense kernels at the sizes where they change strategy, on every device.

On CUDA: one block per matrix with W in shared memory (up to 46 KiB) or read from global memory; for
a few large matrices the fused multi-block pass (power iteration, torch's spectral-norm step) and
the host-driven Lanczos on the shorter side's Gram matrix (2^18 entries or more); ATen's products or
the one-block kernels when a row is not a whole number of 16-byte vectors.  On the CPU: the batch-parallel and the
row-parallel loops.  Every result is checked against float64 SVD or the pure-PyTorch form.
"""
from __future__ import annotations

import pytest
import torch

import lipfast
from lipfast import reference

from conftest import require_ext

SHAPES = [
    (37, 64, 48),  # many small matrices (staged in shared memory on CUDA)
    (3, 300, 200),  # too large to stage: one block per matrix, read through the caches
    (2, 512, 1000),  # few and large, wide: Lanczos on W Wᵀ, fused multi-block passes
    (1, 1100, 1024),  # few and large, tall
    (1, 1023, 601),  # short side not a multiple of the 16-byte vector: ATen's products
    (1, 200, 6000),  # the longest rows: 512-thread fused pass (float32)
]
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}


def random_batch(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


@pytest.fixture(autouse=True)
def compiled():
    require_ext()
    with lipfast.set_backend("cpp"):
        yield


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectral_norm_and_bracket_against_svd(device, shape, dtype):
    W = random_batch(shape, dtype, device, seed=sum(shape))
    exact = torch.linalg.matrix_norm(W.double().cpu(), ord=2)
    sigma = lipfast.spectral_norm(W, rtol=1e-5)
    assert sigma.shape == shape[:1] and sigma.device == W.device
    rel = ((sigma.double().cpu() - exact).abs() / exact).max().item()
    assert rel <= TOLERANCE[dtype] + 2e-5, rel
    lower, upper = lipfast.spectral_norm_bounds(W, rtol=1e-3)
    lower, upper = lower.double().cpu(), upper.double().cpu()
    assert torch.all(lower <= exact) and torch.all(exact <= upper)
    assert (upper / lower - 1).max().item() <= 1e-3 + 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_power_iteration_matches_pure_pytorch(device, shape):
    W = random_batch(shape, torch.float32, device, seed=1 + sum(shape))
    v0 = random_batch((shape[0], shape[2]), torch.float32, device, seed=2)
    sigma, u, v = lipfast.power_iteration(W, v0, iters=30)
    with lipfast.set_backend("python"):
        sigma_ref, u_ref, v_ref = lipfast.power_iteration(W.double(), v0.double(), iters=30)
    assert ((sigma.double() - sigma_ref).abs() / sigma_ref).max().item() <= 1e-5
    assert (1 - (v.double() * v_ref).sum(-1).abs()).max().item() <= 1e-5
    # u = W v / sigma for the returned pair
    Wv = (W.double() @ v.double()[..., None])[..., 0]
    assert torch.allclose(u.double() * sigma.double()[:, None], Wv, rtol=1e-4, atol=1e-4 * sigma.max().item())
    assert not torch.equal(v0, v)  # the input iterate is not modified in place
    assert torch.equal(v0, random_batch((shape[0], shape[2]), torch.float32, device, seed=2))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("iters", [0, 3])
def test_spectral_norm_step_matches_pure_pytorch(device, shape, iters):
    W = random_batch(shape, torch.float32, device, seed=3 + sum(shape))
    u0 = random_batch(shape[:2], torch.float32, device, seed=4)
    v0 = random_batch((shape[0], shape[2]), torch.float32, device, seed=5)
    u0 = u0 / u0.norm(dim=-1, keepdim=True)
    v0 = v0 / v0.norm(dim=-1, keepdim=True)
    got = torch.ops.lipfast.spectral_norm_step(W, u0, v0, iters, 1e-12)
    want = reference.spectral_norm_step(W.double(), u0.double(), v0.double(), iters, 1e-12)
    for a, b in zip(got, want):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item()), (a, b)


def test_results_are_deterministic(device):
    for shape in SHAPES:
        W = random_batch(shape, torch.float32, device, seed=6)
        first = lipfast.spectral_norm(W, rtol=1e-5)
        assert torch.equal(first, lipfast.spectral_norm(W, rtol=1e-5))
        v0 = random_batch((shape[0], shape[2]), torch.float32, device, seed=7)
        assert torch.equal(lipfast.power_iteration(W, v0, 5)[2], lipfast.power_iteration(W, v0, 5)[2])


def test_scaled_and_nonfinite_matrices(device):
    W = random_batch((4, 200, 96), torch.float64, device, seed=8)
    W[1] *= 1e-200
    W[2] *= 1e200
    exact = torch.linalg.matrix_norm(W.cpu(), ord=2)
    sigma = lipfast.spectral_norm(W, rtol=1e-8).cpu()
    assert ((sigma - exact).abs() / exact).max().item() <= 1e-7
    W[3, 5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf entry in matrix W\[3\]"):
        lipfast.spectral_norm(W)
