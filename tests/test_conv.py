"""Operator norms of convolution layers against the SVD of the explicit operator matrix."""
from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from torch import nn

import lipfast
from lipfast import conv

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def explicit_matrix(module: nn.Module, input_size, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's operator as a float64 matrix: torch's own forward (bias removed) on every unit
    input; with ``weight``, differentiable with respect to it."""
    module = module.double()
    c_in = module.in_channels
    n = c_in * math.prod(input_size)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, c_in, *input_size)
    bias, module.bias = module.bias, None
    try:
        if weight is None:
            with torch.no_grad():
                y = module(eye)
        else:
            y = torch.func.functional_call(module, {"weight": weight}, (eye,))
    finally:
        module.bias = bias
    return y.reshape(n, -1).T


def exact_norm(module: nn.Module, input_size) -> float:
    return float(torch.linalg.matrix_norm(explicit_matrix(module, input_size), ord=2))


def _kwargs(module: nn.Module, input_size) -> dict:
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    kwargs = dict(
        input_size=input_size, stride=module.stride, padding=module.padding, dilation=module.dilation,
        groups=module.groups, padding_mode=module.padding_mode, transposed=transposed,
    )
    if transposed:
        kwargs["output_padding"] = module.output_padding
    return kwargs


def _random_configs(count: int, seed: int):
    """Valid layers drawn over dims 1-3, kernel 1-5, stride 1-3, padding 0/1/2/'same'/'valid',
    dilation 1-2, groups 1/2/4, all padding modes, transposed with output_padding, odd and even sizes."""
    rng = random.Random(seed)
    configs = []
    while len(configs) < count:
        dims = rng.choice([1, 2, 2, 3])
        groups = rng.choice([1, 2, 4])
        transposed = rng.random() < 0.25
        kernel = rng.randint(1, 5) if dims < 3 else rng.randint(1, 3)
        stride = rng.randint(1, 3)
        dilation = rng.randint(1, 2)
        padding = rng.choice([0, 1, 2] if transposed else [0, 1, 2, "same", "valid"])
        mode = "zeros" if transposed else rng.choice(["zeros", "circular", "reflect", "replicate"])
        if padding == "same":
            stride = 1
        size = tuple(rng.randint(3, 9 if dims == 1 else (6 if dims == 2 else 4)) for _ in range(dims))
        c_in = groups * rng.randint(1, 2)
        c_out = groups * rng.randint(1, 2)
        try:
            if transposed:
                output_padding = rng.randint(0, max(stride, dilation) - 1)
                module = _TRANSPOSED[dims](c_in, c_out, kernel, stride, padding, output_padding, groups, False, dilation)
            else:
                module = _CONV[dims](c_in, c_out, kernel, stride, padding, dilation, groups, False, mode)
            torch.manual_seed(len(configs))
            for p in module.parameters():
                nn.init.normal_(p)
            explicit_matrix(module, size)  # torch accepts this layer at this size
        except (RuntimeError, ValueError):
            continue
        configs.append((module, size))
    return configs


CONFIGS = _random_configs(48, seed=3) + [
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), (6, 6)),
    (nn.Conv2d(2, 6, 3, stride=2, padding=1, padding_mode="circular"), (6, 4)),
    (nn.Conv2d(2, 4, 4, stride=2, padding=(2, 1), padding_mode="circular"), (8, 4)),
    (nn.Conv1d(3, 3, 5, stride=3, padding=4, dilation=2, padding_mode="circular"), (9,)),
    (nn.Conv3d(2, 2, 3, padding=1, padding_mode="circular", groups=2), (4, 3, 4)),
    (nn.Conv2d(4, 8, 1, stride=2), (6, 6)),
    (nn.Conv2d(4, 8, 1, stride=3), (7, 5)),
    (nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), (4, 5)),
    (nn.ConvTranspose1d(3, 2, 3, stride=1, padding=1, output_padding=1, dilation=2), (7,)),
    (nn.Conv2d(2, 4, 4, padding="same", padding_mode="replicate", dilation=2), (7, 6)),
    # 1-tap kernels: exactly max over groups of the channel matrix's norm, unless padding copies
    (nn.Conv2d(4, 6, 1, stride=2, padding=1, groups=2), (5, 5)),
    (nn.ConvTranspose2d(4, 6, 1, stride=2, output_padding=1), (3, 2)),
    (nn.Conv2d(3, 6, 1, padding=1, padding_mode="reflect"), (4, 4)),
    (nn.Conv1d(2, 3, 1, stride=3, padding=1), (1,)),  # every output reads padding: the zero map
    # kernels larger than their inputs: the taps that only ever read padding are cut off
    (nn.Conv2d(4, 4, 7, padding=3), (2, 2)),
    (nn.Conv2d(2, 4, 5, stride=2, padding=4, dilation=2), (3, 4)),
    (nn.Conv1d(3, 2, 7, padding=3), (1,)),
    (nn.ConvTranspose2d(4, 2, 5, stride=2, padding=2, output_padding=1), (2, 1)),
    (nn.Conv3d(2, 2, 5, padding=2, groups=2), (1, 2, 3)),
]


def _id(config) -> str:
    module, size = config
    return f"{type(module).__name__}-{tuple(module.weight.shape)}-{size}-{module.padding_mode}"


def _is_circulant(module: nn.Module, input_size) -> bool:
    """Circular padding of total d (k - 1) per dim (or 1-tap, unpadded), and stride dividing the size."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return False
    op = conv.conv_operator("test", module.weight, input_size, module.stride, module.padding, module.dilation,
                            module.groups, module.padding_mode)
    _, exact, _ = conv._grids(op)
    return exact


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_estimate_and_bracket_against_svd(config, backend, device):
    module, size = config
    exact = exact_norm(module, size)
    for dtype in (torch.float64, torch.float32):
        w = module.weight.detach().to(device=device, dtype=dtype)
        kwargs = _kwargs(module, size)
        sigma = lipfast.conv_spectral_norm(w, **kwargs)
        assert sigma.shape == () and sigma.dtype == dtype and sigma.device == w.device
        exact_stored = exact if dtype == torch.float64 else exact_norm(_with_weight(module, w.cpu()), size)
        assert abs(float(sigma) - exact_stored) <= 1e-4 * exact_stored
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # zero padding may not reach rtol
            lower, upper = lipfast.conv_spectral_norm_bounds(w, **kwargs)
        assert lower.dtype == upper.dtype == dtype and lower.device == upper.device == w.device
        assert float(lower) <= exact_stored <= float(upper)
        if _is_circulant(module, size):
            assert float(upper) <= exact_stored * (1 + 1e-3)


def _with_weight(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    import copy

    clone = copy.deepcopy(module)
    clone.weight = nn.Parameter(weight.double())
    return clone


@pytest.fixture(params=["autocorrelation", "toom-cook", "symbols"])
def gram_method(request, monkeypatch):
    """The circulant bound's Gram matrices made one way only (the library picks the cheaper): the
    autocorrelation by pairs of taps, or by Toom-Cook wherever it applies, or the symbols."""
    monkeypatch.setattr(conv, "_use_autocorrelation", lambda auto, direct: request.param != "symbols")
    monkeypatch.setattr(conv, "_TOOM_SIZE", 0 if request.param == "toom-cook" else math.inf)
    return request.param


def _seeded(module: nn.Module) -> nn.Module:
    torch.manual_seed(sum(module.weight.shape))
    nn.init.normal_(module.weight)
    return module


# Strided layers whose stored per-frequency matrix is K_f itself (more output channels than phases x
# input channels): the autocorrelation's Gram matrices then have cross-phase blocks.
WIDE_STRIDED = [
    (_seeded(nn.Conv2d(2, 16, 3, stride=2, padding=1, bias=False)), (6, 6)),
    (_seeded(nn.Conv1d(1, 8, 5, stride=3, padding=2, bias=False)), (9,)),
    (_seeded(nn.Conv2d(2, 12, 3, stride=(2, 1), padding=1, padding_mode="circular", bias=False)), (6, 5)),
    (_seeded(nn.Conv3d(1, 9, 3, stride=2, padding=1, bias=False)), (4, 4, 4)),
    (_seeded(nn.Conv2d(4, 20, 3, stride=2, padding=1, groups=2, bias=False)), (6, 6)),
]


@pytest.mark.parametrize("config", CONFIGS[:24] + CONFIGS[-10:] + WIDE_STRIDED, ids=_id)
def test_circulant_bounds_alone_are_valid(config, monkeypatch, gram_method):
    """The structural bounds without the explicit-matrix refinement: still never below the norm,
    and within rtol of it on circulant layers, whichever way the Gram matrices were made."""
    monkeypatch.setattr(conv, "EXPLICIT_MATRIX_LIMIT", 0)
    module, size = config
    exact = exact_norm(module, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lower, upper = lipfast.operator_norm_bounds(module.double(), size)
    assert float(lower) <= exact <= float(upper)
    if _is_circulant(module, size):
        assert float(upper) <= exact * (1 + 1e-3)


def _circulant_configs() -> list:
    # as bracket() has them: with the taps that only read padding cut off
    ops = [(conv._reaching_taps(conv._module_operator("test", module.double(), size)), (module, size))
           for module, size in CONFIGS + WIDE_STRIDED]
    return [pytest.param(op, id=_id(config)) for op, config in ops if not conv._pointwise(op)]


def test_wide_strided_layers_store_k_itself():
    """WIDE_STRIDED is what it claims: the stored matrix is K_f, with more than one phase block."""
    for module, size in WIDE_STRIDED:
        grids = conv._grids(conv._module_operator("test", module, size))[0][0]
        assert not conv._Autocorrelation(module.weight, module.groups, grids).transposed
        assert math.prod(g.phases for g in grids) > 1


@pytest.mark.parametrize("toom", [False, True], ids=["pairs", "toom-cook"])
@pytest.mark.parametrize("op", _circulant_configs())
def test_autocorrelation_grams_match_the_symbols(op, toom, monkeypatch):
    """The Gram matrices from the kernel's autocorrelation against those of the stacked symbols, on
    every candidate grid (strides, groups, dilation, 1-3 dims, both orientations, twisted grids):
    the same matrices to rounding, each within the other's stated rounding bound, their fro2 an
    upper bound on the symbols' Frobenius norms (and not a loose one), and exactly real matrices
    at the frequencies that are their own mirrors.  The autocorrelation formed one product per
    pair of taps, and by Toom-Cook wherever it applies (one phase per dim, kernels up to 4 per dim;
    these test layers are below the size where it is used by itself)."""
    w = op.weight.detach()
    grids, _, _ = conv._grids(op)
    monkeypatch.setattr(conv, "_TOOM_SIZE", 0 if toom else math.inf)
    correlation = conv._Autocorrelation(w, op.groups, grids[0])
    inner = w.shape[1] if correlation.transposed else w.shape[0] // op.groups
    applies = all(g.phases == 1 for g in grids[0]) and max(op.kernel) <= 4 and math.prod(op.kernel) > 1 and \
        conv._toom_basis_error(op.kernel, inner) <= conv._TOOM_ERROR
    assert correlation.toom == (toom and applies)
    auto = correlation.grams(grids, conv._tap_abs_norm(w))
    for grid, a in zip(grids, auto):
        d = conv._direct_grams(w, op.groups, grid)
        sym = conv._symbol_stack(w, op.groups, grid)
        assert a.transposed == d.transposed and torch.equal(a.kept, d.kept)
        assert a.Hr.shape == d.Hr.shape and a.Hi.shape == d.Hi.shape
        lower = lambda X: torch.tril(X)  # what the certificate reads
        diff = torch.complex(lower(a.Hr - d.Hr), lower(a.Hi - d.Hi))
        diff = diff + diff.mH - torch.diag_embed(torch.diagonal(diff, dim1=-2, dim2=-1))
        gap = torch.linalg.matrix_norm(diff, 2)
        scale = torch.linalg.matrix_norm(torch.complex(d.Hr, d.Hi), 2)
        if correlation.toom:  # every value mixes all the taps: its error goes with the largest symbol's size
            scale = scale.max()
        assert bool((gap <= 1e-13 * scale + 1e-300).all())
        symbol = conv._symbol_error(conv._tap_abs_norm(w), w.dim() - 2, math.prod(w.shape[2:]))
        slack = 2 * d.fro2.sqrt() * symbol + symbol**2
        assert bool((gap <= a.rounding + d.rounding + slack).all())
        fro2 = torch.linalg.vector_norm(sym.S, dim=(-2, -1)).square()
        # (Toom-Cook's rounding bound is looser: fro2 at most 1e-7 above, not 1e-9, on the smallest symbols)
        loose = 1e-7 if correlation.toom else 1e-9
        assert bool((a.fro2 >= fro2 * (1 - 1e-12)).all()) and bool((a.fro2 <= fro2 * (1 + loose) + 1e-300).all())
        index = torch.stack(torch.unravel_index(a.kept, [g.frequencies for g in grid]), 1)
        own_mirror = torch.ones(a.kept.numel(), dtype=torch.bool)
        for dim, g in enumerate(grid):
            own_mirror &= g.mirror()[index[:, dim]] == index[:, dim]
        own_mirror = own_mirror.repeat_interleave(op.groups)
        assert bool((a.Hi[own_mirror] == 0).all())
        # one frequency's symbols alone (as for the plane wave): the same matrices
        f = int(a.kept.numel()) // 2
        one = conv._symbol_stack(w, op.groups, grid, a.kept[f : f + 1])
        assert one.p == sym.p and one.transposed == sym.transposed
        want = sym.S[f * op.groups : (f + 1) * op.groups]
        assert torch.allclose(one.S, want, rtol=0, atol=1e-13 * float(want.abs().max()))


def test_low_estimates_are_retried(monkeypatch):
    """A frequency whose Lanczos estimate comes back too low fails its certificate and is certified
    again higher up: the bracket stays valid."""
    dense_top = conv._dense_top
    monkeypatch.setattr(conv, "_dense_top", lambda A, rtol, max_iters: (lambda s, v: (s * 0.9, v))(*dense_top(A, rtol, max_iters)))
    for module, size in CONFIGS[48:53]:
        exact = exact_norm(module, size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lower, upper = lipfast.operator_norm_bounds(module.double(), size)
        assert float(lower) <= exact <= float(upper)


@pytest.mark.parametrize("config", [c for c in CONFIGS[48:] if _is_circulant(*c)], ids=_id)
def test_plane_wave_is_a_top_singular_vector_of_a_circulant(config, gram_method):
    """The Lanczos start built from the top frequency (used for zero padding) gains exactly the
    circulant's norm on circular layers, whatever the stride, groups or matrix orientation."""
    module, size = config
    op = conv._module_operator("test", module.double(), size)
    grids, exact, _ = conv._grids(op)
    assert exact
    w = op.weight.detach()
    circulant = conv._CirculantBound(conv._gram_stacks(w, op.groups, grids, conv._tap_abs_norm(w))[0], 1e-6, 1000, torch.float64)
    estimate, v = circulant.estimate, circulant.v
    top = int(estimate.argmax())
    f = top // op.groups
    sym = conv._symbol_stack(w, op.groups, grids[0], circulant.grams.kept[f : f + 1])
    x = conv._plane_wave(op, grids[0], sym, top, v[top])
    gain = float(op.apply(x[None], op.weight.detach()).norm() / x.norm())
    assert abs(gain - float(estimate[top])) <= 1e-6 * float(estimate[top])


@pytest.mark.parametrize("scale", [2.0**600, 2.0**-600, 2.0**-1040])
def test_extreme_weight_scales(scale, backend):
    """Estimates and brackets of float64 weights far outside float32's range scale with the weight;
    at 2^-1040 every entry is subnormal (with 12 to 30 significant bits), and scaling it up takes
    more than one double's worth of 2^k."""
    for module, size in (CONFIGS[48], CONFIGS[55]):
        w = module.weight.detach().double() * scale
        exact = exact_norm(_with_weight(module, w / scale), size)  # of the weight as rounded, in units of scale
        sigma = lipfast.conv_spectral_norm(w, **_kwargs(module, size))
        assert abs(float(sigma) / scale - exact) <= 1e-4 * exact
        lower, upper = lipfast.conv_spectral_norm_bounds(w, **_kwargs(module, size))
        assert float(lower) / scale <= exact <= float(upper) / scale
        assert float(upper) <= float(lower) * (1 + 1e-3)


def test_modules_and_linear(backend):
    torch.manual_seed(0)
    conv2d = nn.Conv2d(3, 5, 3, stride=2, padding=1).double()
    exact = exact_norm(conv2d, (7, 6))
    assert abs(float(lipfast.operator_norm(conv2d, (7, 6)).detach()) - exact) <= 1e-4 * exact
    linear = nn.Linear(7, 4).double()
    exact = float(torch.linalg.matrix_norm(linear.weight.detach(), 2))
    assert abs(float(lipfast.operator_norm(linear).detach()) - exact) <= 1e-5 * exact
    lower, upper = lipfast.operator_norm_bounds(linear)
    assert float(lower) <= exact <= float(upper)
    # spectral norm of the reshaped kernel (what torch normalizes) is not the operator norm
    circular = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", bias=False).double()
    reshaped = float(torch.linalg.matrix_norm(circular.weight.detach().reshape(4, -1), 2))
    assert abs(float(lipfast.operator_norm(circular, (8, 8))) - reshaped) > 1e-3 * reshaped


def test_gradient(backend, device):
    torch.manual_seed(1)
    for module, size in [
        (nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="reflect", bias=False), (5, 4)),
        (nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2, bias=False), (5,)),
    ]:
        kwargs = _kwargs(module, size)
        w = module.weight.detach().to(device=device, dtype=torch.float64).requires_grad_()
        torch.autograd.gradcheck(lambda w: lipfast.conv_spectral_norm(w, rtol=1e-12, **kwargs), (w,))
        # and the gradient is that of the exact norm
        lipfast.conv_spectral_norm(w, **kwargs).backward()
        w2 = w.detach().cpu().clone().requires_grad_()
        torch.linalg.matrix_norm(explicit_matrix(module, size, w2), 2).backward()
        torch.testing.assert_close(w.grad.cpu(), w2.grad, rtol=1e-4, atol=1e-6)


def test_warm_start_and_no_input_change():
    torch.manual_seed(2)
    w = torch.randn(4, 3, 3, 3)
    before = w.clone()
    lipfast.conv_spectral_norm(w, (6, 6), padding=1)
    lipfast.conv_spectral_norm_bounds(w, (6, 6), padding=1)
    assert torch.equal(w, before)


BAD = [
    (dict(weight=torch.randn(6, 2, 3, 3), input_size=(5, 5), groups=4), "groups"),
    (dict(weight=torch.randn(4, 2, 3, 3), input_size=(2, 2)), "smaller than the dilated kernel"),
    (dict(weight=torch.randn(4, 2, 3, 3), input_size=(5, 5), dilation=3), "smaller than the dilated kernel"),
    (dict(weight=torch.randn(4, 2, 3, 3), input_size=(5, 5), stride=0), "stride"),
    (dict(weight=torch.randn(4, 2, 3, 3), input_size=(5, 5), dilation=-1), "dilation"),
    (dict(weight=torch.randn(4, 2, 3, 3), input_size=(5, 5), padding_mode="mirror"), "padding_mode"),
    (dict(weight=torch.randn(4, 2, 3, 3), input_size=(5, 5, 5)), "input_size"),
    (dict(weight=torch.randn(4, 2, 3, 3), input_size=None), "input_size"),
    (dict(weight=torch.randn(4, 2, 3, 3), input_size=(5, 5), padding="full"), "padding"),
    (dict(weight=torch.randn(4, 2, 3, 3), input_size=(5, 5), padding="same", stride=2), "padding='same'"),
    (dict(weight=torch.randn(4, 2, 3, 3), input_size=(5, 5), padding=5, padding_mode="reflect"), "reflect"),
    (dict(weight=torch.randn(4, 2, 3, 3), input_size=(5, 5), transposed=True, output_padding=2), "output_padding"),
    (dict(weight=torch.randn(4, 2, 3), input_size=(5,), rtol=0), "rtol"),
    (dict(weight=torch.full((4, 2, 3), math.nan), input_size=(5,)), "NaN"),
    (dict(weight=torch.randn(4, 2), input_size=(5,)), "3, 4 or 5 dims"),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c[1])
def test_bad_input(case):
    kwargs, message = case
    for fn in (lipfast.conv_spectral_norm, lipfast.conv_spectral_norm_bounds):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            fn(**kwargs)


def test_bad_modules():
    with pytest.raises(ValueError, match="input_size is required for Conv2d"):
        lipfast.operator_norm(nn.Conv2d(2, 2, 3))
    with pytest.raises(TypeError, match="module must be"):
        lipfast.operator_norm_bounds(nn.ReLU(), (4, 4))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        lipfast.conv_spectral_norm([1.0], (4,))


def test_reused_buffers_change_nothing(monkeypatch):
    """Inside conv.reused_buffers() the Gram matrices of one layer after another are written into
    the same buffers (grown as needed): every bracket is the same to the bit as outside it, and the
    buffers are gone after the block."""
    monkeypatch.setattr(conv, "_use_autocorrelation", lambda auto, direct: True)
    configs = [(m, s) for m, s in CONFIGS[:30] if not conv._pointwise(conv._module_operator("t", m, s))]
    configs = configs + configs[::-1]  # buffers grown, then smaller layers in larger buffers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fresh = [lipfast.operator_norm_bounds(m, s) for m, s in configs]
        with conv.reused_buffers():
            reused = [lipfast.operator_norm_bounds(m, s) for m, s in configs]
            assert conv._buffers.get()  # the buffers were used
    assert conv._buffers.get() is None
    for (lo, up), (lo2, up2) in zip(fresh, reused):
        assert float(lo) == float(lo2) and float(up) == float(up2)


def test_border_envelope_brings_the_start_closer():
    """With zero padding, the circulant's top plane wave times the border envelope lies closer to
    the operator's top right singular vector (explicit-matrix SVD) than the plane wave alone: on
    17 of 18 seeded layers here (the exception: a plane wave nearly orthogonal to it either way)."""
    closer, total = 0, 0
    for seed in range(6):
        torch.manual_seed(seed)
        for c_in, c_out, k, stride, size in [(4, 4, 3, 1, (12, 12)), (3, 6, 3, 2, (12, 10)), (4, 4, 5, 1, (10, 9))]:
            module = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False).double()
            v = torch.linalg.svd(explicit_matrix(module, size))[2][0]
            op = conv._module_operator("test", module, size)
            grids, _, _ = conv._grids(op)
            w = op.weight.detach()
            bounds = [(conv._CirculantBound(g, 1e-6, 1000, torch.float64), grid)
                      for g, grid in zip(conv._gram_stacks(w, op.groups, grids, conv._tap_abs_norm(w)), grids)]
            circulant, grid = min(bounds, key=lambda c: c[0].top())
            top = int(circulant.estimate.argmax())
            f = top // op.groups
            sym = conv._symbol_stack(w, op.groups, grid, circulant.grams.kept[f : f + 1])
            x = conv._plane_wave(op, grid, sym, top, circulant.v[top])
            faded = conv._border_envelope(x)
            assert faded.shape == x.shape
            cosine = [float((y.flatten() @ v).abs() / y.norm()) for y in (x, faded)]
            closer += cosine[1] > cosine[0]
            total += 1
    assert closer >= 16 and total == 18


def test_lanczos_told_the_upper_end_stops_for_the_bracket(backend):
    """Given a known upper bound U of sigma_max, the operator's Lanczos stops once the bracket
    [sigma, U] is within 8 rtol or its residual bound is an eighth of the bracket's width (after 16
    passes at least), with sigma still a lower bound; without U it converges to rtol."""
    torch.manual_seed(3)
    module = nn.Conv2d(6, 8, 3, padding=1, bias=False).double()
    size = (10, 10)
    exact = exact_norm(module, size)
    op = conv._module_operator("test", module, size)
    rtol = 1e-9
    with torch.no_grad():
        sigma, _, _, rel_err = conv._top_singular(op, rtol, 1000)
        assert float(rel_err) <= rtol and abs(float(sigma) / exact - 1) <= 1e-8
        # a wide bracket: stopped on the residual test long before rtol
        upper = 2 * exact
        sigma, _, _, rel_err = conv._top_singular(op, rtol, 1000, None, upper)
        width = upper / float(sigma) - 1
        assert float(sigma) <= exact * (1 + 1e-12)
        assert 8 * float(rel_err) <= width and float(rel_err) > 1e3 * rtol
        # a narrow one: stopped once within 8 rtol of U
        upper = exact * (1 + 4 * rtol)
        sigma, _, _, rel_err = conv._top_singular(op, rtol, 1000, None, upper)
        assert exact * (1 + 1e-12) >= float(sigma) >= upper / (1 + 8 * rtol)


def test_lanczos_upper_end_must_not_be_negative():
    from conftest import require_ext

    require_ext()
    w = torch.randn(3, 2, 3)
    with pytest.raises(ValueError, match="upper must be >= 0"):
        torch.ops.lipfast.conv_spectral_norm(w, None, [6], [1], [1], [1], [1], 1, "zeros", [6], 100, 1e-6, -1.0)


def _dense_cases():
    from conftest import with_singular_values

    g = torch.Generator().manual_seed(5)
    clustered = torch.tensor([3.0, 2.9999, 2.9998] + [1.0] * 37, dtype=torch.float64)
    return [
        torch.randn(30, 12, generator=g, dtype=torch.float64),
        torch.randn(12, 30, generator=g),  # wide, float32
        torch.randn(12, 30, generator=g, dtype=torch.float64) * 2.0**600,
        torch.randn(12, 30, generator=g, dtype=torch.float64) * 2.0**-600,
        with_singular_values(40, 40, clustered, seed=6),
        torch.randn(64, 64, generator=g),
        torch.randn(64, 64, generator=g),  # same shape: batched with the one before
        torch.randn(530, 700, generator=g),  # wide, float32, 530 columns once turned tall: a blocked Gram
    ]


@pytest.mark.parametrize("shape", [(700, 530), (3, 600, 1030), (40, 511)])
def test_symmetric_gram_is_the_product(shape):
    """The blocked Gram matrix (lower block triangle, mirrored) is AᵀA: with small integer entries
    every float64 sum is exact, so it must equal the int64 product entry for entry (batched or not,
    with 530 columns in 4 blocks and 1030 in 8 of unequal widths; below 512 columns one product)."""
    g = torch.Generator().manual_seed(sum(shape))
    A = torch.randint(-8, 9, shape, generator=g)
    G = conv._symmetric_gram(A.double())
    assert G.dtype == torch.float64 and G.shape == (*shape[:-2], shape[-1], shape[-1])
    assert torch.equal(G, (A.mT @ A).double())


def test_dense_brackets_against_svd():
    """Each matrix's bracket holds the float64 SVD's largest singular value, and is narrow: the
    Lanczos estimate runs to rtol / 1000 and mu starts that far above it."""
    matrices = _dense_cases()
    brackets = conv.dense_brackets(matrices, 1e-3, 1000)
    assert brackets is not None and len(brackets) == len(matrices)
    for W, (lower, upper) in zip(matrices, brackets):
        exact = float(torch.linalg.matrix_norm(W.double(), ord=2))
        assert lower <= exact <= upper
        assert upper <= lower * (1 + 1e-5)


def test_dense_brackets_retry_a_low_estimate_and_give_up_on_a_bad_one(monkeypatch):
    matrices = _dense_cases()[:2]
    exact = [float(torch.linalg.matrix_norm(W.double(), ord=2)) for W in matrices]
    real_top = conv._dense_top

    def low(factor):
        def top(G, rtol, max_iters):
            square, v = real_top(G, rtol, max_iters)
            return square * factor**2, v
        return top

    monkeypatch.setattr(conv, "_dense_top", low(1 - 1e-5))  # certified at the third mu
    for (lower, upper), sigma in zip(conv.dense_brackets(matrices, 1e-3, 1000), exact):
        assert lower <= sigma <= upper <= sigma * (1 + 1e-4)
    monkeypatch.setattr(conv, "_dense_top", low(0.5))  # no mu tried reaches sigma
    assert conv.dense_brackets(matrices, 1e-3, 1000) is None


def test_dense_brackets_leave_nan_and_zero_matrices_to_gram_iteration():
    assert conv.dense_brackets([torch.full((3, 2), math.nan)], 1e-3, 1000) is None
    assert conv.dense_brackets([torch.zeros(3, 2), torch.ones(3, 2)], 1e-3, 1000) is None


def test_skipped_grids_could_not_narrow_the_bracket_much(monkeypatch):
    """A zero-padded layer's second candidate grid is certified only where the bracket is wider than
    rtol and the grid could lower the upper end by more than an eighth of its width: certified
    afterwards, a grid skipped with the bracket wider than rtol is never below upper * (1 - width / 8)."""
    made, certified = [], []
    original, original_certify = conv._CirculantBound.__init__, conv._CirculantBound.certify

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    def certifying(self):
        certified.append(self)
        return original_certify(self)

    monkeypatch.setattr(conv._CirculantBound, "__init__", recording)
    monkeypatch.setattr(conv._CirculantBound, "certify", certifying)
    skipped = 0
    for seed, (channels, size) in enumerate([(32, 8), (32, 16), (24, 12), (16, 24)]):
        torch.manual_seed(seed)
        module = nn.Conv2d(channels, channels, 3, padding=1, bias=False).double()
        with torch.no_grad():
            module.weight.mul_(0.75 / module.weight.abs().max())  # max |w| in [0.5, 1): no rescaling
        made.clear()
        certified.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lower, upper = (float(x) for x in lipfast.operator_norm_bounds(module, (size, size)))
        assert len(made) == 2
        width = upper / lower - 1
        for circulant in made:
            if not any(circulant is c for c in certified) and width > 1e-3:
                skipped += 1
                assert original_certify(circulant) >= upper * (1 - width / 8) * (1 - 1e-9)
    assert skipped > 0


def test_no_second_grid_once_the_bracket_is_within_rtol(monkeypatch):
    """With the first grid's bracket within rtol, the other grid is not certified, whatever its
    estimates say (on a flat spectrum they can be percents low, and certifying it costs Lanczos runs
    on hundreds of frequencies); the bracket holds the exact norm."""
    certified = []
    original_certify = conv._CirculantBound.certify
    monkeypatch.setattr(conv._CirculantBound, "certify", lambda self: certified.append(self) or original_certify(self))
    monkeypatch.setattr(conv._CirculantBound, "top", lambda self: 0.0)  # every other grid looks worth certifying
    torch.manual_seed(3)
    module = nn.Conv2d(8, 8, 3, padding=1, bias=False).double()
    exact = exact_norm(module, (16, 16))
    for rtol, grids in [(1e-3, 2), (0.5, 1)]:
        certified.clear()
        lower, upper = (float(x) for x in lipfast.conv_spectral_norm_bounds(module.weight, (16, 16), padding=1, rtol=rtol))
        assert len(certified) == grids
        assert lower <= exact <= upper <= lower * (1 + rtol)


def test_lanczos_on_many_frequencies_runs_in_chunks(monkeypatch):
    """When the ranking misses the top frequencies, every frequency above mu gets its own Lanczos
    estimate, a few real forms at a time: the same brackets as all at once, holding the exact norm."""
    ranking = conv._ranking_estimates
    monkeypatch.setattr(conv, "_ranking_estimates", lambda Hr, Hi, steps: -ranking(Hr, Hi, steps))  # the lowest first
    sizes = []
    refine = conv._CirculantBound._refine
    monkeypatch.setattr(conv._CirculantBound, "_refine", lambda self, idx: sizes.append(idx.numel()) or refine(self, idx))
    cases = [(nn.Conv2d(6, 6, 3, padding=1, bias=False), (10, 10)), (nn.Conv2d(4, 5, 3, padding=1, padding_mode="circular", bias=False), (9, 9))]
    chunk_bytes = conv._REFINE_CHUNK_BYTES
    for module, size in cases:
        module = _seeded(module.double())
        exact = exact_norm(module, size)
        brackets = []
        for chunk in (chunk_bytes, 1):  # all at once, then two matrices at a time
            monkeypatch.setattr(conv, "_REFINE_CHUNK_BYTES", chunk)
            sizes.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                brackets.append([float(x) for x in lipfast.operator_norm_bounds(module, size)])
            assert max(sizes) > 8
        whole, chunked = brackets
        assert whole == chunked
        assert whole[0] <= exact <= whole[1]


@pytest.mark.parametrize("config", [c for c in CONFIGS + WIDE_STRIDED if c[0].padding_mode == "zeros"], ids=_id)
def test_zero_padded_matrices_are_the_operator(config):
    """The matrices assembled entry by entry (one per group, rows and columns in their own order)
    have the singular values of the operator's matrix, transposed layers included."""
    module, size = config
    op = conv._module_operator("test", module.double(), size)
    matrices = conv._zero_padded_matrices(op, op.weight.detach())
    assembled = torch.cat([torch.linalg.svdvals(M) for M in matrices]).sort(descending=True).values
    exact = torch.linalg.svdvals(explicit_matrix(module.double(), size))
    k = min(len(assembled), len(exact))
    torch.testing.assert_close(assembled[:k], exact[:k], rtol=1e-12, atol=1e-12)
    assert (assembled[k:].abs() <= 1e-12).all() and (exact[k:].abs() <= 1e-12).all()


@pytest.mark.parametrize("config", CONFIGS + WIDE_STRIDED, ids=_id)
def test_taps_that_only_read_padding_are_cut_off(config):
    module, size = config
    op = conv._module_operator("test", module.double(), size)
    cut = conv._reaching_taps(op)
    x = torch.randn(2, op.weight.shape[1] * op.groups, *op.input_size, dtype=torch.float64)
    torch.testing.assert_close(cut.apply(x), op.apply(x), rtol=1e-12, atol=1e-12)  # the same map
    assert cut.output_size == op.output_size and min(cut.pad_lo + cut.pad_hi) >= 0
    if op.padding_mode != "zeros":
        assert cut is op


def test_a_kernel_larger_than_its_input_is_cut_to_the_taps_that_reach_it():
    op = conv._module_operator("test", nn.Conv2d(4, 4, 7, padding=3), (2, 2))
    cut = conv._reaching_taps(op)
    assert cut.kernel == (3, 3) and cut.pad_lo == cut.pad_hi == (1, 1)
    torch.testing.assert_close(cut.weight, op.weight[:, :, 2:5, 2:5].detach())
    one = conv._reaching_taps(conv._module_operator("test", nn.Conv1d(3, 2, 7, padding=3), (1,)))
    assert one.kernel == (1,) and conv._pointwise(one)  # one input position: the channel matrix's norm


def test_small_operators_get_brackets_from_their_exact_matrix():
    # a 3x3 input with 24 channels: the circulant bound is some 10-20% above the norm; the explicit
    # matrix (216 x 216, assembled exactly) closes the bracket to rtol
    torch.manual_seed(0)
    module = nn.Conv2d(24, 24, 3, padding=1, bias=False).double()
    exact = exact_norm(module, (3, 3))
    lower, upper = lipfast.operator_norm_bounds(module, (3, 3), rtol=1e-5)
    assert float(lower) <= exact <= float(upper) <= float(lower) * (1 + 1e-5)


@pytest.mark.parametrize("config", [c for c in CONFIGS + WIDE_STRIDED if c[0].padding_mode == "zeros"], ids=_id)
def test_zero_padded_grams_are_the_matrices_grams(config):
    """The Gram matrices summed from the kernel's tap-pair products are those of the assembled
    matrices on their smaller side (up to the same permutation of rows and columns: the spectra
    agree), within the rounding bound they come with, and fro2 bounds the matrices' squared
    Frobenius norm; formed even where the dense product would be cheaper (force)."""
    module, size = config
    op = conv._reaching_taps(conv._module_operator("test", module.double(), size))
    w = op.weight.detach()
    matrices = conv._zero_padded_matrices(op, w)
    G, fro2, rounding = conv._zero_padded_grams(op, w, force=True)
    assert G.shape[0] == len(matrices)
    for M, g, f, r in zip(matrices, G, fro2, rounding):
        exact = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
        assert g.shape == exact.shape
        torch.testing.assert_close(torch.linalg.eigvalsh(g), torch.linalg.eigvalsh(exact), rtol=0,
                                   atol=2 * float(r) + 1e-13 * float(f))
        assert float(torch.linalg.matrix_norm(M) ** 2) <= float(f) and 0 < float(r) <= 1e-10 * float(f) + 1e-300


def test_gram_brackets_and_the_estimate_test_hold_the_norm():
    # DenseNet's shape: 128 -> 32 channels, 3x3, on 8x8 (M is 2048 x 8192): bracketed from M Mᵀ summed
    # from 81 tap-pair products (far cheaper than the product of M); with a good estimate (the
    # operator's Lanczos) one Cholesky test, while a low one falls back to the Lanczos on the Gram
    # matrix; the bracket holds the norm and meets rtol either way
    torch.manual_seed(0)
    module = nn.Conv2d(128, 32, 3, padding=1, bias=False).double()
    op = conv._module_operator("test", module, (8, 8))
    w = op.weight.detach()
    assert conv._zero_padded_grams(op, w) is not None
    exact = exact_norm(module, (8, 8))
    lower, upper = conv._explicit_bracket(op, 1e-3, 1000, w)
    assert lower <= exact <= upper <= lower * (1 + 1e-3)
    lower, upper = conv._explicit_bracket(op, 1e-3, 1000, w, [exact * (1 - 1e-5)])
    assert lower == 0.0 and upper == pytest.approx(exact * (1 - 1e-5) * (1 + 1e-3 / 4), rel=1e-12)
    asked = []

    def estimates():  # a low one, then a good one, asked for only once the first has failed
        yield exact * 0.9
        asked.append(True)
        yield exact * (1 - 2e-4)

    lower, upper = conv._explicit_bracket(op, 1e-3, 1000, w, estimates())
    assert asked and lower == 0.0 and upper == pytest.approx(exact * (1 - 2e-4) * (1 + 1e-3 / 4), rel=1e-12)
    lower, upper = conv._explicit_bracket(op, 1e-3, 1000, w, [exact * 0.9])  # the test fails: Lanczos on G
    assert lower <= exact <= upper <= lower * (1 + 1e-3)
    lower, upper = lipfast.operator_norm_bounds(module, (8, 8))
    assert float(lower) <= exact <= float(upper) <= float(lower) * (1 + 1e-3)


@pytest.mark.parametrize("groups, dims, stride", [(1, 1, 1), (2, 2, 2), (4, 3, 1), (1, 2, 3)])
def test_gram_rayleigh_lower_is_below_the_norm(groups, dims, stride):
    torch.manual_seed(groups + dims)
    module = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](8, 4 * groups, 3, stride=stride, padding=1, groups=groups,
                                                              bias=False).double()
    size = {1: (11,), 2: (5, 6), 3: (3, 4, 3)}[dims]
    op = conv._module_operator("test", module, size)
    G, fro2, rounding = conv._zero_padded_grams(op, op.weight.detach(), force=True)
    _, v = conv._dense_top(G, 1e-8, 1000)
    lower = conv._gram_rayleigh_lower(G, v, fro2, rounding)
    exact = [float(torch.linalg.matrix_norm(M, 2)) for M in conv._zero_padded_matrices(op, op.weight.detach())]
    for lo, e in zip(lower.tolist(), exact):
        assert e * (1 - 1e-6) <= lo <= e


@pytest.mark.parametrize("module, size", [
    (nn.Conv2d(6, 5, (1, 7), padding=(0, 3)), (5, 9)),  # Inception's 1x7
    (nn.Conv2d(6, 5, (7, 1), padding=(3, 0)), (9, 5)),
    (nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1)), (3, 4, 4)),  # a (2+1)-D video conv
    (nn.Conv2d(4, 6, (1, 3), stride=2, padding=(2, 1), dilation=(3, 1), groups=2), (7, 8)),  # outputs reading padding
    (nn.Conv2d(4, 3, (1, 3), padding=(0, 1), padding_mode="circular"), (4, 6)),
    (nn.Conv2d(4, 3, (1, 3), padding=(1, 1), padding_mode="reflect"), (4, 6)),  # copying on the 1-tap axis: kept
    (nn.ConvTranspose2d(4, 3, (1, 3), stride=(2, 1), padding=(0, 1), output_padding=(1, 0)), (3, 5)),
    (nn.Conv1d(3, 2, 1, padding=2), (4,)),
], ids=["1x7", "7x1", "video", "strided-dilated-groups", "circular", "reflect", "transposed", "1d-pointwise"])
def test_one_tap_axes_collapse_to_one_position(module, size):
    """Along an axis where the kernel has one tap the operator is block diagonal with equal blocks:
    collapsed to one position it has the same norm, and brackets hold the exact one."""
    torch.manual_seed(0)
    module = module.double()
    op = conv._module_operator("test", module, size)
    collapsed = conv._collapsed_axes(op)
    n = op.weight.shape[1] * op.groups * math.prod(collapsed.input_size)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, -1, *collapsed.input_size)
    exact = exact_norm(module, size)
    assert float(torch.linalg.matrix_norm(collapsed.apply(eye).reshape(n, -1), 2)) == pytest.approx(exact, rel=1e-12)
    kept = [d for d, k in enumerate(op.kernel) if k != 1 or (op.padding_mode != "zeros" and op.pad_lo[d] + op.pad_hi[d])]
    assert [d for d, n in enumerate(collapsed.input_size) if n > 1] == [d for d in kept if op.input_size[d] > 1]
    lower, upper = lipfast.operator_norm_bounds(module, size)
    assert float(lower) <= exact <= float(upper)
    # the estimate runs on the collapsed operator too, and its gradient is the exact norm's
    sigma = lipfast.operator_norm(module, size)
    assert float(sigma) == pytest.approx(exact, rel=1e-4)
    sigma.backward()
    weight = module.weight.detach().clone().requires_grad_(True)
    torch.linalg.matrix_norm(explicit_matrix(module, size, weight), 2).backward()
    torch.testing.assert_close(module.weight.grad, weight.grad, rtol=0, atol=1e-3 * float(weight.grad.abs().max()))



def test_a_depthwise_layer_is_sized_for_its_explicit_matrices_by_group():
    # 64 groups of 81 x 81 (a 7x7 kernel on 9x9): 0.4M entries apart, where the whole matrix would
    # be 5184 square; bracketed from them to rtol (the circulant bracket is 20-40% wide here)
    torch.manual_seed(0)
    module = nn.Conv2d(64, 64, 7, groups=64, padding="same", bias=False).double()
    op = conv._module_operator("test", module, (9, 9))
    assert conv._dense_fits(op) and not conv._gram_plan(op).cheaper
    exact = max(float(torch.linalg.matrix_norm(
        nn.functional.conv2d(torch.eye(81, dtype=torch.float64).reshape(81, 1, 9, 9), module.weight[g : g + 1].detach(),
                             padding=3).reshape(81, -1), 2)) for g in range(64))
    lower, upper = lipfast.operator_norm_bounds(module, (9, 9))
    assert float(lower) <= exact <= float(upper) <= float(lower) * (1 + 1e-3)
