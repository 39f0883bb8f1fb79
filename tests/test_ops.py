"""The compiled ops themselves: opcheck (schema, fakes, autograd registration) and torch.compile."""
from __future__ import annotations

import pytest
import torch

import lipfast
from conftest import make_matrix, require_ext


@pytest.fixture(autouse=True)
def _needs_ext():
    require_ext()


def _samples():
    g = torch.Generator().manual_seed(0)
    for shape, dtype in [((6, 4), torch.float64), ((2, 3, 5, 7), torch.float32), ((3, 8, 8), torch.bfloat16)]:
        yield torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("W", list(_samples()), ids=lambda W: f"{tuple(W.shape)}-{W.dtype}")
def test_opcheck(W):
    n = W.shape[-1]
    v = torch.randn(*W.shape[:-2], n).to(W.dtype)
    Wg = W.clone().requires_grad_(W.dtype == torch.float64)
    torch.library.opcheck(torch.ops.lipfast.dense_spectral_norm.default, (Wg, None, 200, 1e-6))
    torch.library.opcheck(torch.ops.lipfast.dense_spectral_norm.default, (Wg, v, 200, 1e-6))
    torch.library.opcheck(torch.ops.lipfast.dense_spectral_norm_bounds.default, (W, 1e-3, 200, 16))
    torch.library.opcheck(torch.ops.lipfast.dense_spectral_norm_bounds_many.default, ([W, W.mT.double()], 1e-3, 16))
    torch.library.opcheck(torch.ops.lipfast.dense_power_iteration.default, (Wg, v, 3))
    u = torch.randn(*W.shape[:-1]).to(W.dtype)
    torch.library.opcheck(torch.ops.lipfast.spectral_norm_step.default, (Wg, u, v, 3, 1e-12))
    torch.library.opcheck(torch.ops.lipfast.spectral_norm_step.default, (Wg, u, v, 0, 1e-12))


def test_torch_compile_fullgraph():
    W = make_matrix("batched").float()

    def f(W, v):
        sigma = lipfast.spectral_norm(W)
        lower, upper = lipfast.spectral_norm_bounds(W)
        step_sigma, u, v_new = lipfast.power_iteration(W, v, 2)
        return sigma, lower, upper, step_sigma, v_new

    v = torch.ones(*W.shape[:-2], W.shape[-1])
    compiled = torch.compile(f, fullgraph=True)
    for got, expected in zip(compiled(W, v), f(W, v)):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    # and backward through the compiled graph
    Wg = W.clone().requires_grad_()
    torch.compile(lambda w: lipfast.spectral_norm(w).sum(), fullgraph=True)(Wg).backward()
    Wr = W.clone().requires_grad_()
    lipfast.spectral_norm(Wr).sum().backward()
    torch.testing.assert_close(Wg.grad, Wr.grad)


def test_conv_opcheck():
    g = torch.Generator().manual_seed(1)
    w64 = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w32 = torch.randn(3, 1, 3, generator=g)
    geometry64 = ([5, 4], [2, 1], [1, 1], [1, 1], [1, 2], 2, "reflect", [3, 2])
    geometry32 = ([6], [1], [2], [0], [1], 3, "zeros", [6])
    torch.library.opcheck(torch.ops.lipfast.conv_spectral_norm.default, (w64, None, *geometry64, 300, 1e-8))
    torch.library.opcheck(torch.ops.lipfast.conv_spectral_norm.default, (w32, torch.ones(3, 6), *geometry32, 300, 1e-6))
    torch.library.opcheck(torch.ops.lipfast.conv_spectral_norm.default, (w64, None, *geometry64, 300, 1e-8, 50.0))


def test_conv_torch_compile_fullgraph():
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)

    def f(w):
        return lipfast.conv_spectral_norm(w, (6, 6), stride=2, padding=1, padding_mode="circular")

    compiled = torch.compile(f, fullgraph=True)
    got, expected = compiled(w), f(w)
    torch.testing.assert_close(got, expected)
    (grad_compiled,) = torch.autograd.grad(got, w)
    (grad_eager,) = torch.autograd.grad(expected, w)
    torch.testing.assert_close(grad_compiled, grad_eager)
