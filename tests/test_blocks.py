"""1-Lipschitz building blocks, margin losses and export, against explicit computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, parametrizations

import lipfast
from conftest import DEVICES, require_ext, with_singular_values
from lipfast import ops, reference


def exact_norm(W: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(W.detach().double(), 2))


@pytest.mark.parametrize("group_size", [1, 2, 3])
def test_group_sort(group_size):
    g = torch.Generator().manual_seed(group_size)
    x = torch.randn(4, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = lipfast.nn.GroupSort(group_size)(x)
    expected = torch.stack([chunk.sort(dim=1, descending=True).values for chunk in x.split(group_size, dim=1)], 1)
    torch.testing.assert_close(y, expected.reshape(4, 6, 5), rtol=0, atol=0)
    # a permutation of the entries: gradients keep their norm
    v = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(y, x, v)
    assert float(grad.norm()) == pytest.approx(float(v.norm()), rel=1e-12)
    with pytest.raises(ValueError, match="multiple of group_size"):
        lipfast.nn.GroupSort(4)(torch.randn(2, 6))
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        lipfast.nn.GroupSort(0)


@pytest.mark.parametrize("group_size", [1, 2, 3])
def test_group_sort_scripted_and_traced(group_size):
    # torch.jit.script compiles it (its shape check included) and a trace records it without a
    # TracerWarning; lipschitz_bound rebuilds a scripted GroupSort (constant 1) and follows a
    # traced one through its sort, or MaxMin's max and min of two disjoint slices (1 either way)
    import warnings

    torch.manual_seed(group_size)
    model = nn.Sequential(nn.Linear(5, 6), lipfast.nn.GroupSort(group_size), nn.Linear(6, 3)).double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    scripted = torch.jit.script(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x[:1])
    for form in (scripted, traced):
        torch.testing.assert_close(form(x), model(x), rtol=0, atol=0)
    with pytest.raises(torch.jit.Error, match="multiple of group_size"):
        torch.jit.script(lipfast.nn.GroupSort(4))(torch.randn(2, 6))
    bound = lipfast.lipschitz_bound(model, (5,), progress=False).upper
    assert lipfast.lipschitz_bound(scripted, (5,), progress=False).upper == bound
    assert bound <= lipfast.lipschitz_bound(traced, (5,), progress=False).upper <= bound * (1 + 1e-12)


def test_activations_have_constant_one():
    model = nn.Sequential(nn.Linear(6, 8), lipfast.nn.GroupSort(), nn.Linear(8, 8), lipfast.nn.Abs(), nn.Linear(8, 3))
    report = lipfast.lipschitz_bound(model, (6,), progress=False)
    assert [layer.upper for layer in report.layers if layer.kind in ("GroupSort", "Abs")] == [1.0, 1.0]
    norms = [exact_norm(model[i].weight) for i in (0, 2, 4)]
    assert math.prod(norms) <= report.upper <= math.prod(norms) * (1 + 1e-2)


@pytest.mark.parametrize("shape", [(30, 20), (20, 30), (1, 7)])
def test_aol_is_one_lipschitz(shape):
    torch.manual_seed(sum(shape))
    layer = nn.Linear(shape[1], shape[0])
    raw = layer.weight.detach().double().clone()
    lipfast.nn.aol(layer)
    W = layer.weight.detach().double()
    d = (raw.T @ raw).abs().sum(dim=1).rsqrt()
    torch.testing.assert_close(W, raw * d, rtol=1e-6, atol=0)
    assert exact_norm(W) <= 1 + 1e-6
    report = lipfast.lipschitz_bound(layer, (shape[1],), progress=False)
    assert exact_norm(W) <= report.upper <= 1 + 1e-5
    with pytest.raises(TypeError, match="must be an nn.Linear or nn.Conv2d"):
        lipfast.nn.aol(nn.Conv1d(2, 2, 3))


def explicit_operator(layer: nn.Module, input_shape: tuple) -> torch.Tensor:
    """The bias-free layer as an explicit matrix (columns: the images of the basis vectors)."""
    n = math.prod(input_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
    with torch.no_grad():
        out = layer._conv_forward(basis, layer.weight, None)  # torch's own padding, without the bias
    return out.reshape(n, -1).T


@pytest.mark.parametrize("kernel", [(3, 3), (3, 5), (1, 1), (4, 4), (2, 3)])
def test_aol_conv_scales_by_shifts(kernel):
    """Large kernels take Toom-Cook (up to 4 x 4) or the per-shift products (larger); both must equal
    the convolution of K with itself."""
    from lipfast.blocks import _aol_scales

    g = torch.Generator().manual_seed(kernel[1])
    K = torch.randn(64, 256, *kernel, generator=g, dtype=torch.float64)
    K[:, 7] = 0  # a dead input channel keeps scale 0
    kh, kw = kernel
    KK = F.conv2d(K.transpose(0, 1), K.transpose(0, 1), padding=(kh - 1, kw - 1))
    sums = KK.abs().sum(dim=(1, 2, 3))
    expected = torch.where(sums > 0, sums.rsqrt(), 0.0)
    torch.testing.assert_close(_aol_scales(K), expected, rtol=1e-12, atol=0)
    assert float(_aol_scales(K)[7]) == 0.0


@pytest.mark.parametrize("kind", ["normal", "positive", "one position"])
def test_aol_toom_cook_keeps_float32_accuracy(kind):
    """Toom-Cook evaluates the kernel at points up to 2 and interpolates: in float32 its row sums must
    stay as close to the float64 answer as the per-shift products' (measured 1.5-9e-7)."""
    from lipfast.blocks import _abs_gram, _toom_shift_grams

    g = torch.Generator().manual_seed(3)
    if kind == "one position":  # every shift but 0 is exactly 0: rounding only adds to the sums
        K = torch.zeros(128, 96, 3, 3, dtype=torch.float64)
        K[:, :, 1, 1] = torch.randn(128, 96, generator=g, dtype=torch.float64)
    else:
        K = torch.randn(128, 96, 3, 3, generator=g, dtype=torch.float64)
        K = K.abs() if kind == "positive" else K
    half = _toom_shift_grams(K).abs()
    exact = half[0].sum(dim=1) + half[1:].sum(dim=(0, 2)) + half[1:].sum(dim=(0, 1))
    KK = F.conv2d(K.transpose(0, 1), K.transpose(0, 1), padding=2)
    torch.testing.assert_close(exact, KK.abs().sum(dim=(1, 2, 3)), rtol=1e-12, atol=0)
    single = _abs_gram(K.float()).sum(dim=1).double()
    assert float(((single - exact) / exact).abs().max()) < 2e-6


def test_aol_toom_cook_gradient():
    """AOL trains through these scales: Toom-Cook's gradient must be the exact one."""
    from lipfast.blocks import _toom_shift_grams

    K = torch.randn(3, 4, 3, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_toom_shift_grams, (K,))


@pytest.mark.parametrize("padding_mode,kernel", [("zeros", 3), ("circular", 3), ("zeros", (1, 1)), ("circular", (3, 5))])
def test_aol_conv_is_one_lipschitz(padding_mode, kernel):
    torch.manual_seed(7)
    layer = nn.Conv2d(3, 5, kernel, padding="same", padding_mode=padding_mode, dtype=torch.float64)
    raw = layer.weight.detach().clone()
    lipfast.nn.aol(layer)
    # the scales against the plain computation: K ⋆ K by a convolution of the kernel with itself
    kh, kw = raw.shape[-2:]
    KK = F.conv2d(raw.transpose(0, 1), raw.transpose(0, 1), padding=(kh - 1, kw - 1))
    torch.testing.assert_close(layer.weight.detach(), raw * KK.abs().sum(dim=(1, 2, 3)).rsqrt()[None, :, None, None],
                               rtol=1e-12, atol=0)
    A = explicit_operator(layer, (3, 6, 7))
    assert exact_norm(A) <= 1 + 1e-9
    report = lipfast.lipschitz_bound(nn.Sequential(layer), (3, 6, 7), progress=False)
    assert exact_norm(A) <= report.upper <= 1 + 1e-5
    with pytest.raises(ValueError, match="needs stride 1"):
        lipfast.nn.aol(nn.Conv2d(2, 2, 3, stride=2))


@pytest.mark.parametrize("padding_mode,padding", [("reflect", 1), ("replicate", "same"), ("circular", 2)])
def test_aol_refuses_padding_that_copies_entries(padding_mode, padding):
    # with nonnegative weights the scaled operator's norm exceeds 1: the bound does not hold there
    layer = nn.Conv2d(2, 2, 3, padding=padding, padding_mode=padding_mode, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
        scaled = nn.Conv2d(2, 2, 3, padding=padding, padding_mode=padding_mode, bias=False, dtype=torch.float64)
        K = layer.weight.transpose(0, 1)  # the AOL scales, by the plain computation of K ⋆ K
        scaled.weight.copy_(layer.weight * F.conv2d(K, K, padding=2).abs().sum(dim=(1, 2, 3)).rsqrt()[None, :, None, None])
    assert exact_norm(explicit_operator(scaled, (2, 4, 4))) > 1.01
    with pytest.raises(ValueError, match="padding_mode"):
        lipfast.nn.aol(layer)
    assert not torch.nn.utils.parametrize.is_parametrized(layer)  # refused before any change


def test_margin_loss_against_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 1, 1, 2])
    loss = lipfast.nn.LipschitzMarginLoss(eps=0.3, lipschitz=2.0, temperature=0.5)
    shifted = logits.detach().clone()
    for i, t in enumerate(target.tolist()):
        for j in range(4):
            if j != t:
                shifted[i, j] += math.sqrt(2) * 2.0 * 0.3
    expected = F.cross_entropy(shifted / 0.5, target)
    assert loss(logits, target).item() == pytest.approx(float(expected), rel=1e-12)
    assert lipfast.nn.LipschitzMarginLoss(eps=0.0)(logits, target).item() == pytest.approx(F.cross_entropy(logits, target).item())
    torch.autograd.gradcheck(lambda z: loss(z, target), (logits,))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        lipfast.nn.LipschitzMarginLoss(eps=-1.0)
    with pytest.raises(ValueError, match="reduction must be"):
        lipfast.nn.LipschitzMarginLoss(eps=0.1, reduction="max")


def test_hkr_loss_against_hand_computation():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 2, 1, 0])
    loss = lipfast.nn.HKRLoss(alpha=5.0, margin=0.7)
    total = 0.0
    z = logits.detach()
    for i, t in enumerate(target.tolist()):
        others = [float(z[i, j]) for j in range(3) if j != t]
        kr = float(z[i, t]) - sum(others) / 2
        hinge = max(0.0, 0.7 - (float(z[i, t]) - max(others)))
        total += 5.0 * hinge - kr
    assert loss(logits, target).item() == pytest.approx(total / 6, rel=1e-12)
    torch.autograd.gradcheck(lambda x: loss(x, target), (logits,))
    with pytest.raises(ValueError, match="at least 2 classes"):
        loss(torch.randn(3, 1), torch.zeros(3, dtype=torch.int64))


def normalized_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), lipfast.nn.GroupSort(), nn.Conv2d(4, 4, 3, padding=1), lipfast.nn.Abs(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 16), nn.ReLU(), nn.Linear(16, 8), nn.Linear(8, 3),
    )
    lipfast.nn.spectral_norm(model[0], mode="operator")
    lipfast.nn.spectral_norm(model[2])
    lipfast.nn.aol(model[5])
    parametrizations.orthogonal(model[7])
    lipfast.nn.spectral_norm(model[8])
    return model


def test_export_round_trip():
    model = normalized_model()
    x = torch.randn(7, 2, 5, 5)
    model(x)  # a training step of the power methods; the operator-mode layer learns its input size
    exported = lipfast.nn.export(model)
    assert model.training and exported.training
    assert not any(parametrize.is_parametrized(m) for m in exported.modules())
    assert [type(m) for m in exported] == [nn.Conv2d, lipfast.nn.GroupSort, nn.Conv2d, lipfast.nn.Abs, nn.Flatten,
                                           nn.Linear, nn.ReLU, nn.Linear, nn.Linear]
    assert all(not m._forward_pre_hooks for m in exported.modules())
    model.eval()
    exported.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=0, atol=1e-6)
    assert all(parametrize.is_parametrized(model[i]) for i in (0, 2, 5, 7, 8))  # the original is untouched
    # each exported layer's certified constant is never below its exact norm
    report = lipfast.lipschitz_bound(exported, (2, 5, 5), progress=False)
    for layer in report.layers:
        if layer.kind == "Linear":
            assert layer.upper >= exact_norm(exported.get_submodule(layer.name).weight) * (1 - 1e-6)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lipfast.nn.export(3)


def test_compile_blocks():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), lipfast.nn.GroupSort(), nn.Linear(8, 4), lipfast.nn.Abs())
    lipfast.nn.aol(model[0])
    lipfast.nn.aol(model[2])
    x = torch.randn(3, 6)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)


def test_sll_block_is_one_lipschitz():
    torch.manual_seed(4)
    block = lipfast.nn.SLLBlock(12, inner=20, dtype=torch.float64)
    with torch.no_grad():
        block.log_q.normal_(std=1.0)  # far from uniform q: the rescaling must still hold
    W = block.weight.detach()
    t_inv = block.scales().detach()
    q = block.log_q.detach().exp()
    t = ((W @ W.T).abs() @ q) / q
    torch.testing.assert_close(t_inv, 1 / t, rtol=1e-12, atol=0)
    # the Jacobian I - 2 Wᵀ T⁻¹ D W for activation slopes D in [0, 1]: norm <= 1 for every D
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for trial in range(200):
        d = torch.rand(20, generator=g, dtype=torch.float64)
        if trial % 2:
            d = (d > 0.5).double()
        J = torch.eye(12, dtype=torch.float64) - 2 * W.T @ torch.diag(t_inv * d) @ W
        worst = max(worst, exact_norm(J))
    assert worst <= 1 + 1e-12
    # the forward pass agrees with the formula, and lipschitz_bound knows the block
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = x - 2 * torch.relu(x @ W.T + block.bias.detach()) * t_inv @ W
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
    report = lipfast.lipschitz_bound(nn.Sequential(block, lipfast.nn.SLLBlock(12, dtype=torch.float64)), (12,), progress=False)
    assert 1.0 <= report.upper <= 1.0 + 1e-12
    torch.autograd.gradcheck(lambda inp: block(inp), (x.requires_grad_(True),))
    with pytest.raises(ValueError, match="inner must be an int >= 1"):
        lipfast.nn.SLLBlock(4, inner=0)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (20, 20)])
def test_bjorck_orthonormalizes(shape):
    torch.manual_seed(shape[0] + 2 * shape[1])
    layer = nn.Linear(shape[1], shape[0])
    lipfast.nn.orthogonal(layer)
    for _ in range(3):  # training forwards move the warm-started power iterate
        layer(torch.randn(4, shape[1]))
    layer.eval()
    W = layer.weight.detach()
    s = torch.linalg.svdvals(W.double())
    assert float((s - 1).abs().max()) <= 1e-3
    exported = lipfast.nn.export(layer)
    report = lipfast.lipschitz_bound(exported, (shape[1],), progress=False)
    exact = exact_norm(exported.weight)
    assert exact <= report.upper <= exact * (1 + 1e-3)
    # differentiable through the iterations
    small = nn.Linear(5, 6, dtype=torch.float64)
    lipfast.nn.orthogonal(small, iters=4)
    small.eval()
    original = small.parametrizations.weight.original
    torch.autograd.gradcheck(lambda w: small.parametrizations.weight[0](w), (original.detach().clone().requires_grad_(True),))
    with pytest.raises(ValueError, match="beta must be in"):
        lipfast.nn.orthogonal(nn.Linear(3, 3), beta=0.9)
    with pytest.raises(ValueError, match="method must be 'bjorck'"):
        lipfast.nn.orthogonal(nn.Linear(3, 3), method="cayley")


@pytest.mark.parametrize("top", [3.0, 30.0])
def test_bjorck_converges_on_a_weight_with_one_dominant_singular_value(top):
    """Björck diverges for singular values of W / sigma above sqrt(3).  With one singular value `top`
    and 199 at 1, a single power step from a random start estimates sigma near 1, and the weight used
    to come out non-finite; the power method now runs to convergence at registration."""
    s = torch.ones(200, dtype=torch.float64)
    s[0] = top
    layer = nn.Linear(200, 200)
    with torch.no_grad():
        layer.weight.copy_(with_singular_values(200, 200, s, seed=int(top)))
    torch.manual_seed(0)
    lipfast.nn.orthogonal(layer)
    layer.eval()
    got = torch.linalg.svdvals(layer.weight.detach().double())
    assert float((got - 1).abs().max()) <= 1e-5


def _bjorck_steps():
    """Both forms of the Björck step: the compiled op and reference.py's."""
    require_ext()
    return {"cpp": ops.bjorck_step, "python": reference.bjorck_step}


@pytest.mark.parametrize("m, n", [(1, 1), (5, 40), (50, 17), (64, 64), (300, 200), (700, 520)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bjorck_step_matches_exact_formula(m, n, dtype):
    """out = (1 + b) Q - b Q QᵀQ and G = QᵀQ against float64 products, within the rounding of sums
    of m (G) and n (Q G) products, tall, wide and square."""
    g = torch.Generator().manual_seed(7 * m + n)
    Q = (torch.randn(m, n, generator=g, dtype=torch.float64) / max(m, n) ** 0.5).to(dtype)
    Qd = Q.double()
    G_exact = Qd.mT @ Qd
    out_exact = 1.25 * Qd - 0.25 * Qd @ G_exact
    unit = torch.finfo(dtype).eps
    G_err = 2 * m * unit * (Qd.abs().mT @ Qd.abs())
    out_err = 4 * (m + n) * unit * (1.25 * Qd.abs() + 0.25 * Qd.abs() @ (Qd.abs().mT @ Qd.abs()))
    for name, step in _bjorck_steps().items():
        out, G = step(Q, 0.25)
        assert out.dtype == G.dtype == dtype and out.shape == (m, n) and G.shape == (n, n), name
        assert bool(((G.double() - G_exact).abs() <= G_err).all()), name
        assert bool(((out.double() - out_exact).abs() <= out_err).all()), name


def test_bjorck_step_errors_gradients_and_opcheck():
    require_ext()
    with pytest.raises(ValueError, match="Q must be a matrix"):
        ops.bjorck_step(torch.zeros(2, 3, 4), 0.5)
    with pytest.raises(ValueError, match="Q must be float32 or float64"):
        ops.bjorck_step(torch.zeros(3, 3, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="beta must be finite"):
        ops.bjorck_step(torch.zeros(3, 3), float("nan"))
    Q = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) / 3
    torch.library.opcheck(torch.ops.lipfast.bjorck_step.default, (Q, 0.5))
    Qg = Q.clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda q: ops.bjorck_step(q, 0.5), (Qg,))  # both outputs
    torch.autograd.gradgradcheck(lambda q: ops.bjorck_step(q, 0.5)[0], (Qg,))


def test_orthogonal_uses_the_fused_step(monkeypatch):
    """The parametrization runs the op once per iteration and agrees with the PyTorch form, for tall
    and wide weights."""
    require_ext()
    calls = []
    fused_step = ops.bjorck_step
    monkeypatch.setattr(ops, "bjorck_step", lambda Q, beta: calls.append(Q.shape) or fused_step(Q, beta))
    for shape in [(40, 24), (24, 40)]:
        torch.manual_seed(sum(shape))
        layer = nn.Linear(shape[1], shape[0], dtype=torch.float64)
        lipfast.nn.orthogonal(layer, iters=6)
        layer.eval()
        fused = layer.weight.detach()
        with lipfast.set_backend("python"):
            plain = layer.weight.detach()
        torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    # 6 iterations per evaluation (registration evaluates once too), the wide weight as its transpose
    assert calls == [(40, 24)] * 24


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
def test_bjorck_step_cuda_matches_cpu(device):
    Q = torch.randn(70, 40, dtype=torch.float64) / 8
    got = torch.ops.lipfast.bjorck_step(Q.to(device), 0.5)
    for g, w in zip(got, reference.bjorck_step(Q, 0.5)):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-12, atol=1e-12)


def test_sll_conv_is_one_lipschitz():
    torch.manual_seed(5)
    block = lipfast.nn.SLLConv2d(2, inner=3, kernel_size=3, dtype=torch.float64)
    with torch.no_grad():
        block.log_q.normal_(std=1.0)
    shape = (2, 5, 4)
    n = math.prod(shape)
    K = block.weight.detach()
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    A = F.conv2d(basis, K, padding=1).reshape(n, -1).T  # the convolution as a matrix (inner·H·W, n)
    t_inv = block.scales().detach()
    q = block.log_q.detach().exp()
    KK = F.conv2d(K, K, padding=2)  # kernel of A Aᵀ: (inner, inner, 5, 5)
    t = (KK.abs().sum(dim=(2, 3)) @ q) / q
    torch.testing.assert_close(t_inv, 1 / t, rtol=1e-12, atol=0)
    scale = t_inv.repeat_interleave(5 * 4)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for trial in range(100):
        d = torch.rand(A.shape[0], generator=g, dtype=torch.float64)
        if trial % 2:
            d = (d > 0.5).double()
        J = torch.eye(n, dtype=torch.float64) - 2 * A.T @ torch.diag(scale * d) @ A
        worst = max(worst, exact_norm(J))
    assert worst <= 1 + 1e-12
    x = torch.randn(3, *shape, dtype=torch.float64)
    pre = (x.reshape(3, n) @ A.T) + block.bias.detach().repeat_interleave(20)
    expected = x.reshape(3, n) - 2 * (torch.relu(pre) * scale) @ A
    torch.testing.assert_close(block(x).reshape(3, n), expected, rtol=1e-12, atol=1e-12)
    report = lipfast.lipschitz_bound(nn.Sequential(block), shape, progress=False)
    assert 1.0 <= report.upper <= 1.0 + 1e-10
    with pytest.raises(ValueError, match="kernel_size must be an odd int"):
        lipfast.nn.SLLConv2d(2, kernel_size=2)
