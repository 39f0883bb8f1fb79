"""lipfast.spectral_norm_bounds_many: certified brackets of many tensors of different shapes at once."""
from __future__ import annotations

import warnings

import pytest
import torch

import lipfast
from conftest import KINDS, exact_spectral_norm, make_matrix, require_ext, with_singular_values
from test_linalg import assert_brackets, half_slack

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def network_like(device: torch.device) -> list[torch.Tensor]:
    """Shapes as the layers of a small network have them, several sharing min(m, n), with batches."""
    g = torch.Generator().manual_seed(3)
    shapes = [(16, 27), (16, 144), (2, 32, 144), (32, 288), (64, 32), (3, 64, 576), (10, 64), (64, 64)]
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(device) for s in shapes]


def check(Ws: list[torch.Tensor], rtol: float = 1e-3, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults must reach rtol without a warning
        result = lipfast.spectral_norm_bounds_many(Ws, rtol=rtol, **kwargs)
    assert len(result) == len(Ws)
    for W, (lower, upper) in zip(Ws, result):
        assert lower.shape == upper.shape == W.shape[:-2]
        assert lower.dtype == upper.dtype == W.dtype
        assert lower.device == upper.device == W.device
        assert_brackets(lower, upper, exact_spectral_norm(W))
        slack = 4 * half_slack(W.dtype)
        lower, upper = lower.cpu().double(), upper.cpu().double()
        gap = torch.where(upper > 0, upper / lower - 1, 0.0).max().item()
        assert gap <= rtol + slack, (tuple(W.shape), gap)
    return result


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_kind_in_one_call(certificate, backend, device, dtype):
    check([make_matrix(kind).to(device=device, dtype=dtype) for kind in KINDS])


def test_network_shapes(certificate, backend, device):
    check(network_like(device))


def test_mixed_dtypes_each_rounded_to_its_own(certificate, backend, device):
    Ws = [W.to(dtype) for W, dtype in zip(network_like(device), DTYPES * 2)]
    check(Ws)


@pytest.mark.parametrize("rtol", [1e-2, 1e-6])
def test_honours_rtol(certificate, backend, device, rtol):
    Ws = [make_matrix("close_gap").to(device), make_matrix("tall").to(device), make_matrix("large").to(device)]
    check(Ws, rtol=rtol)


def test_close_and_repeated_top_singular_values(certificate, backend, device):
    # sigma_1 = sigma_2 exactly, and sigma_2 / sigma_1 = 1 - 1e-6: the lower end comes from Gram
    # iterates, never from Lanczos, and must still reach the bracket.
    s_repeated = torch.cat([torch.tensor([2.0, 2.0]), torch.linspace(1.9, 0.1, 38)]).double()
    s_close = torch.cat([torch.tensor([1.0, 1.0 - 1e-6]), torch.linspace(0.9, 0.1, 38)]).double()
    Ws = [with_singular_values(60, 40, s_repeated, seed=1).to(device),
          with_singular_values(40, 60, s_close, seed=2).to(device)]
    check(Ws, rtol=1e-4)


def test_zero_and_rank_one_and_scalar(certificate, backend, device):
    Ws = [torch.zeros(3, 5, 7, device=device), make_matrix("rank1").to(device), torch.tensor([[-3.0]], device=device)]
    result = check(Ws)
    assert (result[0][0] == 0).all() and (result[0][1] == 0).all()
    assert result[2][0].item() <= 3.0 <= result[2][1].item()


@pytest.mark.parametrize(
    "dtype, scale",
    [(torch.float64, 1e-300), (torch.float64, 1e300), (torch.float32, 1e-41), (torch.float32, 1e37),
     (torch.float64, 1e-310)],
)
def test_extreme_scales(certificate, backend, device, dtype, scale):
    # The largest entry sets the first scaling: 1e300 squared must not overflow, 1e-300 not underflow.
    Ws = [(make_matrix(kind) * scale).to(device=device, dtype=dtype) for kind in ("square", "wide")]
    result = lipfast.spectral_norm_bounds_many(Ws)
    for W, (lower, upper) in zip(Ws, result):
        exact = exact_spectral_norm(W)
        assert_brackets(lower, upper, exact)
        assert lower > 0 and torch.isfinite(upper).all()
        if dtype == torch.float64 or scale > 1e-40:  # subnormal float32 entries leave sigma ~17 bits
            assert (upper.double() / lower.double() - 1).max() <= 1e-3


def test_agrees_with_one_tensor_at_a_time(certificate, backend, device):
    # The same brackets' validity either way; a list of one tensor and the tensor alone both hold sigma.
    Ws = network_like(device)
    together = lipfast.spectral_norm_bounds_many(Ws)
    for W, (lower, upper) in zip(Ws, together):
        (alone_lower, alone_upper), = lipfast.spectral_norm_bounds_many([W])
        exact = exact_spectral_norm(W)
        assert_brackets(alone_lower, alone_upper, exact)
        assert_brackets(lower, upper, exact)


def test_kernel_matches_reference(device):
    # The compiled op and the pure-PyTorch form run the same float64 operations.
    require_ext()
    Ws = network_like(device) + [make_matrix("close_gap").to(device).float(), torch.zeros(2, 3, device=device)]
    with lipfast.set_backend("cpp"):
        got = lipfast.spectral_norm_bounds_many(Ws)
    with lipfast.set_backend("python"):
        want = lipfast.spectral_norm_bounds_many(Ws)
    for (lower, upper), (lo, up) in zip(got, want):
        torch.testing.assert_close(lower, lo, rtol=1e-12, atol=0)
        torch.testing.assert_close(upper, up, rtol=1e-12, atol=0)


def test_capped_steps_stay_valid_and_warn(backend, device):
    Ws = [make_matrix("close_gap").to(device), make_matrix("square").to(device)]
    with pytest.warns(RuntimeWarning, match="wider than rtol"):
        result = lipfast.spectral_norm_bounds_many(Ws, max_gram_steps=1)
    for W, (lower, upper) in zip(Ws, result):
        assert_brackets(lower, upper, exact_spectral_norm(W))


def test_deterministic_and_inputs_untouched(certificate, backend, device):
    Ws = network_like(device)
    copies = [W.clone() for W in Ws]
    first = lipfast.spectral_norm_bounds_many(Ws)
    second = lipfast.spectral_norm_bounds_many(tuple(Ws))
    for (a, b), (c, d) in zip(first, second):
        assert torch.equal(a, c) and torch.equal(b, d)
    for W, copy in zip(Ws, copies):
        assert torch.equal(W, copy)


def test_non_contiguous_and_grad_inputs(certificate, backend, device):
    W = make_matrix("tall").to(device)
    Ws = [W.T, W.detach().clone().requires_grad_(True), make_matrix("batched").to(device).transpose(-1, -2)]
    check(Ws)


def test_empty_list(backend):
    assert lipfast.spectral_norm_bounds_many([]) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_entry_names_the_tensor_and_matrix(certificate, backend, bad):
    W = torch.randn(2, 3, 4, 5)
    W[1, 2, 0, 0] = bad
    with pytest.raises(ValueError, match=r"Ws\[1\] has a NaN or Inf entry in matrix Ws\[1\]\[1, 2\]"):
        lipfast.spectral_norm_bounds_many([torch.randn(4, 4), W])
    with pytest.raises(ValueError, match=r"Ws\[1\] has a NaN or Inf entry$"):
        lipfast.spectral_norm_bounds_many([torch.randn(4, 4), W[1, 2]])


def test_bad_arguments(backend):
    fn = lipfast.spectral_norm_bounds_many
    with pytest.raises(TypeError, match="Ws must be a list or tuple"):
        fn(torch.randn(3, 3))
    with pytest.raises(TypeError, match=r"Ws\[1\] must be a torch.Tensor"):
        fn([torch.randn(3, 3), "W"])
    with pytest.raises(TypeError, match=r"Ws\[0\] must be a floating-point"):
        fn([torch.ones(3, 3, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"Ws\[1\] must have at least 2 dims"):
        fn([torch.randn(3, 3), torch.randn(3)])
    with pytest.raises(ValueError, match=r"Ws\[0\] must not have a zero-size dim"):
        fn([torch.randn(0, 3, 3)])
    with pytest.raises(ValueError, match="rtol must be a positive finite number"):
        fn([torch.randn(3, 3)], rtol=0.0)
    with pytest.raises(ValueError, match="max_gram_steps must be an int >= 1"):
        fn([torch.randn(3, 3)], max_gram_steps=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_tensors_on_two_devices_raise(backend):
    with pytest.raises(ValueError, match="every tensor must be on one device"):
        lipfast.spectral_norm_bounds_many([torch.randn(3, 3), torch.randn(3, 3, device="cuda")])
