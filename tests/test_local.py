"""Local Lipschitz constants at inputs, against Jacobians computed by hand and by autograd + SVD."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lipfast


def jacobian_norms(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    norms = []
    for xi in x:
        J = torch.autograd.functional.jacobian(lambda z: model(z[None])[0], xi.double())
        norms.append(torch.linalg.matrix_norm(J.reshape(J.shape[0] if J.dim() > 1 else 1, -1), 2))
    return torch.stack(norms)


@pytest.mark.parametrize("out_features", [5, 100])  # the whole Jacobian, and power iteration
def test_linear_map_local_equals_global(device, out_features):
    torch.manual_seed(out_features)
    layer = nn.Linear(30, out_features, dtype=torch.float64)
    x = torch.randn(7, 30, dtype=torch.float64)
    exact = float(torch.linalg.matrix_norm(layer.weight.detach(), 2))
    local = lipfast.local_lipschitz(layer.to(device), x.to(device)).cpu()
    assert local.shape == (7,) and local.dtype == torch.float64
    torch.testing.assert_close(local, torch.full((7,), exact, dtype=torch.float64), rtol=1e-4, atol=0)


def test_relu_network_active_path():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 6)).double()
    x = torch.randn(9, 12, dtype=torch.float64)
    local = lipfast.local_lipschitz(model, x)
    W1, b1, W2 = model[0].weight.detach(), model[0].bias.detach(), model[2].weight.detach()
    for i in range(9):
        active = (W1 @ x[i] + b1 > 0).double()
        J = W2 @ torch.diag(active) @ W1  # the active-path matrix
        assert float(local[i]) == pytest.approx(float(torch.linalg.matrix_norm(J, 2)), rel=1e-10)


@pytest.mark.parametrize("outputs", [10, 90])
def test_against_autograd_jacobian(device, outputs):
    torch.manual_seed(outputs)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, outputs)
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    expected = jacobian_norms(model, x)
    model.train()
    local = lipfast.local_lipschitz(model.to(device), x.to(device), chunk_size=2)
    assert model.training and model[1].training  # modes restored
    assert local.device == x.to(device).device
    torch.testing.assert_close(local.cpu(), expected, rtol=1e-4, atol=0)
    # float32 on the device, with the default chunk: the same norms to float32 accuracy
    local32 = lipfast.local_lipschitz(model.float(), x.float().to(device))
    torch.testing.assert_close(local32.cpu(), expected, rtol=1e-4, atol=0)


class _CubeWithoutForwardDerivative(torch.autograd.Function):
    """x ↦ x³ with a backward and no jvp: forward-mode AD raises NotImplementedError on it, as on
    PyTorch's fused LSTM cell on CUDA."""

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * grad


class _Cube(nn.Module):
    def forward(self, x):
        return _CubeWithoutForwardDerivative.apply(x)


def test_power_iteration_without_forward_derivatives(device):
    # 90 outputs take power iteration; its J v falls back to the double-vjp form, same norms
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 40), _Cube(), nn.Linear(40, 90)).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    with pytest.raises(NotImplementedError):
        torch.func.jvp(model, (x,), (x,))
    local = lipfast.local_lipschitz(model.to(device), x.to(device), rtol=1e-8)
    torch.testing.assert_close(local.cpu(), jacobian_norms(model.cpu(), x), rtol=1e-6, atol=0)


def test_gap_is_sound():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )
    x = torch.rand(20, 3, 8, 8)
    gap = lipfast.lipschitz_gap(model, x)
    assert 0 < gap.lower <= gap.upper and gap.ratio == pytest.approx(gap.upper / gap.lower)
    assert gap.inputs == 20 and 0 <= gap.argmax < 20 and not gap.note
    local = lipfast.local_lipschitz(model, x)
    assert gap.lower == float(local.max()) and "within a factor" in str(gap)


def test_bad_input():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lipfast.local_lipschitz(lambda x: x, torch.randn(2, 3))
    with pytest.raises(ValueError, match="non-empty floating-point tensor"):
        lipfast.local_lipschitz(nn.Linear(3, 2), torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="rtol must be a positive finite number"):
        lipfast.local_lipschitz(nn.Linear(3, 2), torch.randn(2, 3), rtol=0)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        lipfast.local_lipschitz(nn.Linear(3, 2), torch.randn(2, 3), chunk_size=0)


def test_gap_refinement_climbs_and_stays_sound():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64) * 3  # saturated tanh: small Jacobians to climb from
    plain = lipfast.lipschitz_gap(model, x)
    refined = lipfast.lipschitz_gap(model, x, refine_steps=30, step_size=0.2, report=None)
    assert refined.lower > plain.lower and "gradient ascent" in refined.note
    assert refined.lower <= refined.upper
    # a Jacobian norm anywhere is at most the product of the layers' norms (tanh' <= 1)
    W1, W2 = model[0].weight.detach(), model[2].weight.detach()
    assert refined.lower <= float(torch.linalg.matrix_norm(W2, 2) * torch.linalg.matrix_norm(W1, 2))
    # a ReLU network's Jacobian is locally constant: the climb stops at once and changes nothing
    relu = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x3 = torch.randn(3, 4)
    flat = lipfast.lipschitz_gap(relu, x3, refine_steps=5)
    assert flat.lower == lipfast.lipschitz_gap(relu, x3).lower and flat.note == ""
    with pytest.raises(ValueError, match="refine_steps must be an int >= 0"):
        lipfast.lipschitz_gap(relu, torch.randn(3, 4), refine_steps=-1)


def test_full_float32_inside_and_settings_restored():
    # No TF32 while the Jacobians are formed (the norms are accurate to rtol), the caller's settings after.
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))
            return x * 2

    torch.set_float32_matmul_precision("high")
    try:
        local = lipfast.local_lipschitz(Probe(), torch.randn(3, 4))
        assert seen and all(s == ("highest", False) for s in seen)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        torch.testing.assert_close(local, torch.full((3,), 2.0, dtype=torch.float64))
    finally:
        torch.set_float32_matmul_precision("highest")


@pytest.mark.parametrize("out_features", [3, 100])  # the whole Jacobian, and power iteration
def test_a_model_that_writes_into_its_input(out_features):
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(6, out_features)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    kept = x.clone()
    norms = lipfast.local_lipschitz(model, x)
    assert torch.equal(x, kept)  # the caller's inputs untouched
    for i in range(5):
        J = torch.autograd.functional.jacobian(lambda z: model(z.clone()), x[i])
        assert abs(float(norms[i]) - float(torch.linalg.matrix_norm(J, 2))) <= 1e-4 * float(norms[i]) + 1e-12
