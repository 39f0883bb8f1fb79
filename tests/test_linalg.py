"""lipfast.spectral_norm, spectral_norm_bounds and power_iteration against exact float64 answers."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import lipfast
from lipfast import ops, reference
from conftest import KINDS, exact_spectral_norm, make_matrix, with_singular_values

DTYPES = [torch.float32, torch.float64]
HALF_DTYPES = [torch.float16, torch.bfloat16]
# The float64 SVD we compare with is itself only accurate to a few units of roundoff.
SVD_SLACK = 1e-12


def assert_brackets(lower, upper, exact) -> None:
    """lower <= exact <= upper for every matrix, up to the float64 SVD's own error."""
    lower, upper, exact = (torch.as_tensor(x).cpu().double() for x in (lower, upper, exact))
    assert (lower <= exact * (1 + SVD_SLACK)).all(), (lower, exact)
    assert (upper >= exact * (1 - SVD_SLACK)).all(), (upper, exact)


def half_slack(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype in HALF_DTYPES else 0.0


@pytest.mark.parametrize("dtype", DTYPES + HALF_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_spectral_norm_matches_svd(backend, device, kind, dtype):
    W = make_matrix(kind).to(device=device, dtype=dtype)
    exact = exact_spectral_norm(W)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults must reach rtol without a warning
        sigma = lipfast.spectral_norm(W)
    assert sigma.shape == W.shape[:-2]
    assert sigma.dtype == dtype and sigma.device == W.device
    rel = ((sigma.cpu().double() - exact) / exact).abs().max().item()
    assert rel <= 1e-5 + half_slack(dtype), rel


@pytest.mark.parametrize("dtype", DTYPES + HALF_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_bounds_bracket_sigma(certificate, backend, device, kind, dtype):
    W = make_matrix(kind).to(device=device, dtype=dtype)
    exact = exact_spectral_norm(W)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lower, upper = lipfast.spectral_norm_bounds(W)
    assert lower.shape == upper.shape == W.shape[:-2]
    assert lower.dtype == upper.dtype == dtype
    assert_brackets(lower, upper, exact)
    lower, upper = lower.cpu().double(), upper.cpu().double()
    gap = (upper / lower - 1).max().item()
    assert gap <= 1e-3 + 4 * half_slack(dtype), gap


@pytest.mark.parametrize("rtol", [1e-2, 1e-6])
def test_bounds_honour_rtol(certificate, backend, rtol):
    W = make_matrix("close_gap")
    exact = exact_spectral_norm(W)
    lower, upper = lipfast.spectral_norm_bounds(W, rtol=rtol)
    assert_brackets(lower, upper, exact)
    assert upper / lower - 1 <= rtol


def test_bounds_stay_valid_when_capped(backend, monkeypatch):
    # One Gram step is far too few for a tight bracket: it must still be a valid one, with a warning.
    # The Cholesky certificate (120 x 100 qualifies) needs no Gram steps: tight whatever the cap.
    W = make_matrix("close_gap")
    exact = exact_spectral_norm(W)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lower, upper = lipfast.spectral_norm_bounds(W, max_gram_steps=1)
    assert_brackets(lower, upper, exact)
    assert upper / lower - 1 <= 1e-5
    monkeypatch.setattr(lipfast.linalg, "DENSE_CERTIFICATE_MIN_DIM", 10**9)
    with pytest.warns(RuntimeWarning, match="wider than rtol"):
        lower, upper = lipfast.spectral_norm_bounds(W, max_gram_steps=1)
    assert_brackets(lower, upper, exact)
    assert upper / lower - 1 > 1e-3


@pytest.mark.parametrize(
    "dtype, scale",
    [(torch.float64, 1e-150), (torch.float64, 1e150), (torch.float32, 1e-30), (torch.float32, 1e30),
     (torch.float64, 1e-160), (torch.float64, 1e160), (torch.float64, 1e-300), (torch.float64, 1e300)],
)
def test_extreme_scales(certificate, backend, dtype, scale):
    # sigma^2 under- or overflows the dtype here: nothing may square W unscaled.  Past 2^±511 the
    # squares of the entries themselves do (torch's norms square them as they are): at 1e-160 they
    # are subnormal, with a few bits each, which once put the lower end above sigma.
    W = (make_matrix("square") * scale).to(dtype)
    exact = exact_spectral_norm(W)
    sigma = lipfast.spectral_norm(W).double()
    assert abs(sigma - exact) <= 1e-5 * exact
    lower, upper = lipfast.spectral_norm_bounds(W)
    lower, upper = lower.double(), upper.double()
    assert_brackets(lower, upper, exact)
    assert upper / lower - 1 <= 1e-3


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e-41), (torch.float64, 1e-310)])
def test_subnormal_matrix(certificate, backend, dtype, scale):
    # Every entry subnormal: sigma itself has only ~17 significant bits there in float32, but the
    # bracket must hold and nothing may turn into NaN (in float64 the scaling up needs 2^1029 and
    # more, which is not a double: it comes in two factors).
    W = (make_matrix("square") * scale).to(dtype)
    exact = exact_spectral_norm(W)
    sigma = lipfast.spectral_norm(W, rtol=1e-3).double()
    assert abs(sigma - exact) <= 1e-3 * exact
    lower, upper = lipfast.spectral_norm_bounds(W)
    assert lower > 0
    assert_brackets(lower, upper, exact)


@pytest.mark.parametrize("rtol", [1e-3, 1e-8])
def test_spectral_norm_rtol(backend, rtol):
    W = make_matrix("close_gap")
    exact = exact_spectral_norm(W)
    sigma = lipfast.spectral_norm(W, rtol=rtol)
    assert abs(sigma - exact) / exact <= rtol


def test_repeated_top_singular_value(certificate, backend):
    s = torch.tensor([2.0, 2.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    W = with_singular_values(9, 6, s, seed=11)
    assert abs(lipfast.spectral_norm(W).item() - 2.0) <= 1e-5 * 2.0
    lower, upper = lipfast.spectral_norm_bounds(W)
    assert_brackets(lower, upper, 2.0)
    assert upper / lower - 1 <= 1e-3


@pytest.mark.parametrize("shape", [(1, 50_000), (3, 20_000), (20_000, 2)])
def test_very_wide_and_tall(certificate, backend, shape):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    exact = exact_spectral_norm(W)
    assert abs(lipfast.spectral_norm(W).double() - exact) <= 1e-5 * exact
    lower, upper = lipfast.spectral_norm_bounds(W)
    assert_brackets(lower, upper, exact)


@pytest.mark.parametrize("shape", [(100_000, 2, 2), (20_000, 3, 7), (20_000, 7, 3), (5_000, 16, 16)])
def test_many_tiny_matrices_never_settle_on_a_lower_singular_value(certificate, backend, shape):
    # With a fixed start vector, about 1 in 10^5 random 2 x 2 matrices has it within rtol of the
    # second singular vector, where the residual test alone would stop at sigma_2.
    W = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    exact = exact_spectral_norm(W)
    sigma = lipfast.spectral_norm(W).double()
    assert ((sigma - exact).abs() <= 1e-5 * exact).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lower, upper = lipfast.spectral_norm_bounds(W)
    assert (upper.double() / lower.double() - 1 <= 1e-3).all()


def _default_start_vector(n: int) -> torch.Tensor:
    # Lanczos on the identity stops after one step, returning its (normalized) start vector.
    eye = torch.eye(n, dtype=torch.float64)
    if lipfast.backend() == "cpp":
        return ops.dense_spectral_norm(eye, None, 1, 1e-5)[2]
    return reference.dense_spectral_norm(eye, None, 1, 1e-5)[2]


def test_start_vector_nearly_orthogonal_to_the_top_singular_vector(certificate, backend):
    # The start vector's component along v1 is 1e-8: the Ritz value of sigma_2 = 0.99 converges
    # first and passes the residual test, and sigma_1 = 1 emerges only some steps later.  Without
    # the confirmation steps this returns 0.99.
    n = 100
    start = _default_start_vector(n)
    g = torch.Generator().manual_seed(0)
    other = torch.randn(n, generator=g, dtype=torch.float64)
    other -= (other @ start) * start
    other /= other.norm()
    delta = 1e-8
    v1 = math.sqrt(1 - delta**2) * other + delta * start
    V, _ = torch.linalg.qr(torch.cat([v1[:, None], torch.randn(n, n - 1, generator=g, dtype=torch.float64)], 1))
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.cat([torch.tensor([1.0, 0.99], dtype=torch.float64), torch.linspace(0.99 * 0.99, 0.1, n - 2, dtype=torch.float64)])
    W = (U * s) @ V.T
    assert abs(lipfast.spectral_norm(W).item() - 1.0) <= 1e-5
    lower, upper = lipfast.spectral_norm_bounds(W)
    assert_brackets(lower, upper, 1.0)
    assert upper / lower - 1 <= 1e-3


def test_max_iters_warns_with_accuracy(backend):
    W = make_matrix("close_gap")
    with pytest.warns(RuntimeWarning, match="accuracy reached"):
        sigma = lipfast.spectral_norm(W, max_iters=3)
    assert sigma <= exact_spectral_norm(W) * (1 + SVD_SLACK)  # still a Rayleigh quotient


def test_gradient_is_top_singular_pair(backend):
    W = make_matrix("batched").requires_grad_()
    sigma = lipfast.spectral_norm(W, rtol=1e-12)
    weights = torch.arange(1.0, 1.0 + sigma.numel(), dtype=torch.float64).reshape(sigma.shape)
    (sigma * weights).sum().backward()
    U, S, Vh = torch.linalg.svd(W.detach())
    expected = weights[..., None, None] * U[..., :, :1] @ Vh[..., :1, :]
    torch.testing.assert_close(W.grad, expected, rtol=1e-8, atol=1e-10)


def test_gradcheck(backend):
    W = make_matrix("tall")[:12, :7].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w: lipfast.spectral_norm(w, rtol=1e-13), (W,))
    # With iters=0, sigma = ‖W v‖ / ‖v‖ for a v that does not depend on W: u vᵀ is its exact gradient.
    # (With iters > 0 the iterate is treated as a constant, as in torch's spectral norm.)
    v = torch.linspace(-1.0, 2.0, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w: lipfast.power_iteration(w, v, 0)[0], (W,))


@pytest.mark.parametrize("dtype", DTYPES + HALF_DTYPES)
def test_zero_matrix(certificate, backend, dtype):
    W = torch.zeros(2, 5, 4, dtype=dtype, requires_grad=True)
    sigma = lipfast.spectral_norm(W)
    assert torch.equal(sigma, torch.zeros(2, dtype=dtype))
    sigma.sum().backward()
    assert torch.equal(W.grad, torch.zeros_like(W))
    lower, upper = lipfast.spectral_norm_bounds(W)
    assert torch.equal(lower, torch.zeros(2, dtype=dtype))
    assert (upper >= 0).all() and (upper.double() < 1e-100).all()


def test_non_contiguous_inputs(certificate, backend):
    base = make_matrix("batched").to(torch.float32)
    views = [base.mT, base[..., ::2, :], base[:, 1:, ::3, 1:]]
    for view in views:
        assert not view.is_contiguous()
        assert torch.equal(lipfast.spectral_norm(view), lipfast.spectral_norm(view.contiguous()))
        for a, b in zip(lipfast.spectral_norm_bounds(view), lipfast.spectral_norm_bounds(view.contiguous())):
            assert torch.equal(a, b)


def test_deterministic(backend):
    W = make_matrix("large").float()
    assert torch.equal(lipfast.spectral_norm(W), lipfast.spectral_norm(W))


def test_batch_and_single_matrix_paths_agree(backend):
    # A batch of one large matrix takes the row-parallel path; a batch of several, the per-matrix one.
    W = make_matrix("large")
    batch = torch.stack([W, 2 * W, W.flip(0)])
    single = torch.stack([lipfast.spectral_norm(x) for x in batch])
    torch.testing.assert_close(lipfast.spectral_norm(batch), single, rtol=1e-9, atol=0)


def test_inputs_not_modified(certificate, backend):
    W = make_matrix("batched")
    W.requires_grad_()
    before = W.detach().clone()
    v = torch.randn(*W.shape[:-2], W.shape[-1], dtype=W.dtype)
    v_before = v.clone()
    lipfast.spectral_norm(W)
    lipfast.spectral_norm_bounds(W)
    lipfast.power_iteration(W, v, 2)
    assert torch.equal(W.detach(), before) and torch.equal(v, v_before)


# --- power iteration ----------------------------------------------------------------------------


def test_power_iteration_converges_on_gapped_matrix(backend):
    s = torch.tensor([3.0, 1.5, 1.0, 0.5, 0.1], dtype=torch.float64)
    W = with_singular_values(8, 5, s, seed=3)
    v = torch.ones(5, dtype=torch.float64)
    sigma, u, v_new = lipfast.power_iteration(W, v, iters=60)
    assert abs(sigma.item() - 3.0) < 1e-12
    torch.testing.assert_close(W @ v_new, sigma * u)
    assert abs(torch.linalg.vector_norm(v_new).item() - 1) < 1e-12


def test_power_iteration_warm_start(backend):
    W = make_matrix("batched")
    v0 = torch.ones(*W.shape[:-2], W.shape[-1], dtype=W.dtype)
    sigma_all, _, v_all = lipfast.power_iteration(W, v0, iters=5)
    v = v0
    for _ in range(5):
        sigma, _, v = lipfast.power_iteration(W, v, iters=1)
    torch.testing.assert_close(sigma, sigma_all, rtol=1e-12, atol=0)
    torch.testing.assert_close(v, v_all, rtol=1e-10, atol=1e-12)
    exact = exact_spectral_norm(W)
    assert (sigma <= exact * (1 + SVD_SLACK)).all()
    assert (sigma > 0.5 * exact).all()


def test_power_iteration_zero_iters_is_rayleigh_quotient(backend):
    W = make_matrix("tall")
    v = torch.randn(30, dtype=torch.float64)
    sigma, u, v_new = lipfast.power_iteration(W, v, iters=0)
    torch.testing.assert_close(v_new, v / v.norm())
    torch.testing.assert_close(sigma, torch.linalg.vector_norm(W @ v) / v.norm())


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [lipfast.spectral_norm, lipfast.spectral_norm_bounds])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_entries_name_the_matrix(backend, fn, bad):
    W = torch.randn(3, 4, 5, 6)
    W[1, 2, 3, 4] = bad
    W[2, 0, 0, 0] = bad
    before = W.clone()
    with pytest.raises(ValueError, match=r"NaN or Inf entry in matrix W\[1, 2\]"):
        fn(W)
    assert torch.equal(W, before) if bad == bad else True


@pytest.mark.parametrize("fn", [lipfast.spectral_norm, lipfast.spectral_norm_bounds])
def test_nonfinite_entry_of_a_single_matrix(backend, fn):
    W = torch.randn(4, 5)
    W[3, 1] = math.nan
    with pytest.raises(ValueError, match=r"W has a NaN or Inf entry$"):
        fn(W)


@pytest.mark.parametrize("fn", [lipfast.spectral_norm, lipfast.spectral_norm_bounds])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8])
def test_non_floating_dtypes_raise_type_error(backend, fn, dtype):
    W = torch.ones(3, 3, dtype=dtype)
    with pytest.raises(TypeError, match="W must be a floating-point tensor"):
        fn(W)


@pytest.mark.parametrize("fn", [lipfast.spectral_norm, lipfast.spectral_norm_bounds])
@pytest.mark.parametrize("shape", [(), (5,), (0, 3), (3, 0), (0, 2, 2)])
def test_bad_shapes_raise_value_error(backend, fn, shape):
    with pytest.raises(ValueError, match=r"W must (have at least 2 dims|not have a zero-size dim)"):
        fn(torch.ones(shape))


def test_not_a_tensor(backend):
    with pytest.raises(TypeError, match="W must be a torch.Tensor"):
        lipfast.spectral_norm([[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize("rtol", [0, -1e-3, math.nan, math.inf, "1e-3", True])
def test_bad_rtol(backend, rtol):
    with pytest.raises(ValueError, match="rtol must be a positive finite number"):
        lipfast.spectral_norm(torch.ones(2, 2), rtol=rtol)
    with pytest.raises(ValueError, match="rtol must be a positive finite number"):
        lipfast.spectral_norm_bounds(torch.ones(2, 2), rtol=rtol)


@pytest.mark.parametrize("max_iters", [0, -5, 2.5, True])
def test_bad_max_iters(backend, max_iters):
    with pytest.raises(ValueError, match="max_iters must be an int >= 1"):
        lipfast.spectral_norm(torch.ones(2, 2), max_iters=max_iters)


def test_power_iteration_bad_iterate(backend):
    W = torch.ones(2, 3, 4)
    with pytest.raises(ValueError, match=r"v must have shape W.shape\[:-2\] \+ \(n,\) = \(2, 4\)"):
        lipfast.power_iteration(W, torch.ones(4))
    with pytest.raises(TypeError, match="v must be a floating-point tensor"):
        lipfast.power_iteration(W, torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="v must be on W's device"):
        lipfast.power_iteration(W, torch.ones(2, 4, device="meta"))
    with pytest.raises(ValueError, match="iters must be an int >= 0"):
        lipfast.power_iteration(W, torch.ones(2, 4), iters=-1)


def test_dense_certificate_in_chunks(monkeypatch):
    """A batch goes through the Cholesky certificate a few matrices at a time (float64 copies and
    Gram matrices of a whole large batch would not fit in memory): the same brackets, chunked or not,
    each holding the exact norm and about 1e-6 wide."""
    W = torch.randn(7, 70, 65, generator=torch.Generator().manual_seed(2))
    whole = lipfast.spectral_norm_bounds(W)
    monkeypatch.setattr(lipfast.linalg, "_DENSE_CHUNK_BYTES", 3 * 8 * 70 * 65)  # three at a time
    calls = []
    dense_brackets = lipfast.conv.dense_brackets
    monkeypatch.setattr(lipfast.conv, "dense_brackets", lambda Ms, rtol, it: calls.append(len(Ms)) or dense_brackets(Ms, rtol, it))
    chunked = lipfast.spectral_norm_bounds(W)
    assert calls == [3, 3, 1]
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    assert_brackets(*whole, exact_spectral_norm(W))
    assert float((whole[1].double() / whole[0].double() - 1).max()) <= 1e-5
