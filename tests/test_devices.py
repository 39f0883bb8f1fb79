"""The public entry points with the model or the data on each device (CUDA where there is one):
certified results that hold there and agree with the CPU's.  (A network on CUDA once raised a device
mismatch in its matrix layers' batched bracket: no test had put a whole network there.)"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lipfast
from test_network import Residual, _max_jacobian_norm

RTOL = 1e-3


def _with_statistics(make: type, seed: int, dtype: torch.dtype) -> nn.Module:
    """make() seeded, its BatchNorm `bn` given statistics that differ by channel (so it is folded)."""
    torch.manual_seed(seed)
    model = make().to(dtype)
    with torch.no_grad():
        model.bn.running_var.uniform_(0.2, 2.0)
        model.bn.weight.uniform_(-2, 2)
    return model.eval()


def _residual(dtype: torch.dtype) -> nn.Module:
    return _with_statistics(Residual, 0, dtype)


def _one_lipschitz(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), lipfast.nn.GroupSort(), nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
        lipfast.nn.Abs(), nn.Flatten(), nn.Linear(4 * 6 * 6, 24), lipfast.nn.SLLBlock(24, inner=16),
        nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5),
    ).to(dtype)
    lipfast.nn.spectral_norm(model[0], mode="operator")
    lipfast.nn.aol(model[2])
    lipfast.nn.aol(model[5])
    lipfast.nn.orthogonal(model[7])
    lipfast.nn.spectral_norm(model[9])
    model(torch.randn(3, 2, 6, 6, dtype=dtype))  # one training step; the operator mode learns its input size
    return model.eval()


class _Wrapped(nn.Module):
    """An input normalization by stored tensors, a conv folded with its BatchNorm, a self-gated
    activation written out, a product by a stored matrix and a stored index: this session's rules."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4, 0.5]).view(2, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.3]).view(2, 1, 1))
        self.conv, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.W = nn.Parameter(torch.randn(6, 4))
        self.register_buffer("picks", torch.tensor([0, 2, 2, 3]))

    def forward(self, x):
        y = self.bn(self.conv((x - self.mean) / self.std))
        y = y * torch.sigmoid(1.702 * y)
        return (y @ self.W).index_select(-1, self.picks)


def _wrapped(dtype: torch.dtype) -> nn.Module:
    return _with_statistics(_Wrapped, 2, dtype)


class _Sequence(nn.Module):
    """A conv, its BatchNorm, a pointwise conv and its BatchNorm (merged into one bracket), an LPPool,
    a GRU over the positions and a Linear head on every step: the nineteenth session's rules."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4)
        self.pointwise, self.bn2 = nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6)
        self.pool = nn.LPPool1d(2, 2, stride=1)
        self.gru, self.head = nn.GRU(6, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x):
        y = self.pool(self.bn2(self.pointwise(self.bn(self.conv(x)))))
        return self.head(self.gru(y.transpose(1, 2))[0])


def _sequence(dtype: torch.dtype) -> nn.Module:
    model = _with_statistics(_Sequence, 3, dtype)
    with torch.no_grad():
        model.bn2.running_var.uniform_(0.2, 2.0)
    return model


def _overlap(a, b, margin: float) -> bool:
    """Whether two certified brackets of one number can both hold, up to a relative margin (a
    parametrized weight, recomputed on each device, differs there in its last bits)."""
    return a.lower <= b.upper * (1 + margin) and b.lower <= a.upper * (1 + margin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make, shape", [(_residual, (3, 6, 6)), (_one_lipschitz, (2, 6, 6)), (_wrapped, (2, 6, 6)),
                                         (_sequence, (3, 7))], ids=["residual", "blocks", "wrapped", "sequence"])
def test_network_bound_on_the_models_device(device, dtype, make, shape):
    # every layer kind of both networks on the device: zero-padded and circular convs, BatchNorm,
    # pools, a concatenation, the 1-Lipschitz blocks, and the matrix layers' one batched bracket
    model = make(dtype)
    on_cpu = lipfast.lipschitz_bound(model, shape, rtol=RTOL, progress=False)
    moved = copy.deepcopy(model).to(device)
    there = lipfast.lipschitz_bound(moved, shape, rtol=RTOL, progress=False)
    assert there.method == on_cpu.method == "fx" and not there.notes
    assert [layer.name for layer in there.layers] == [layer.name for layer in on_cpu.layers]
    for a, b in zip(there.layers, on_cpu.layers):
        assert 0 <= a.lower <= a.upper < math.inf and _overlap(a, b, 1e-4 if dtype == torch.float32 else 1e-9), (a, b)
    # the same composition of brackets each within rtol of the other's
    assert there.upper <= on_cpu.upper * (1 + RTOL) ** len(there.layers)
    assert on_cpu.upper <= there.upper * (1 + RTOL) ** len(there.layers)
    margin = 1e-4 if dtype == torch.float32 else 1e-9  # (the float64 copy recomputes parametrized weights)
    assert there.upper >= _max_jacobian_norm(copy.deepcopy(model).double(), shape) * (1 - margin)
    assert next(moved.parameters()).device.type == torch.device(device).type  # left where it was


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_certified_radius_and_accuracy_on_the_device(device, dtype):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    W[1] = W[0] + 1e-3 * torch.randn(12, generator=g, dtype=torch.float64)  # a near pair of rows
    features = torch.randn(60, 12, generator=g, dtype=torch.float64)
    logits = (features @ W.T).to(dtype)
    labels = logits.argmax(1)
    labels[:6] = (labels[:6] + 1) % 5
    for last in (None, W.to(dtype)):
        expected = lipfast.certified_radius(logits, labels, 1.5, last_layer_weight=last)
        r = lipfast.certified_radius(logits.to(device), labels.to(device), 1.5,
                                     last_layer_weight=None if last is None else last.to(device))
        assert r.device.type == torch.device(device).type and r.dtype == expected.dtype
        # each a rounded-down float64 formula: equal up to the rounding of the pairwise distances
        torch.testing.assert_close(r.cpu(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
        assert (r[:6] == 0).all()
    model = nn.Sequential(nn.Linear(12, 5)).to(dtype)
    x = features.to(dtype)
    y = model(x).argmax(1)
    y[:10] = (y[:10] + 1) % 5
    report = lipfast.lipschitz_bound(model, (12,), progress=False)
    for eps in (0.0, 0.1, 0.3):
        expected = lipfast.certified_accuracy(model, x, y, eps, report=report)
        moved = copy.deepcopy(model).to(device)
        assert lipfast.certified_accuracy(moved, x.to(device), y.to(device), eps) == expected


@pytest.mark.parametrize("mode", ["matrix", "operator"])
def test_spectral_norm_training_step_on_the_device(device, mode):
    torch.manual_seed(4)
    base = nn.Conv2d(3, 6, 3, padding=1).double()
    x = torch.randn(4, 3, 7, 7, dtype=torch.float64)
    size = {"input_size": (7, 7)} if mode == "operator" else {}  # its iterate drawn now, on the CPU
    registered = lipfast.nn.spectral_norm(base, mode=mode, **size)
    results = []
    for where in ("cpu", device):  # the same power-method state moved over: the same step
        layer = copy.deepcopy(registered).to(where)
        out = layer(x.to(where))
        out.square().sum().backward()
        results.append((out.detach().cpu(), layer.parametrizations.weight.original.grad.cpu(), layer))
    (out_cpu, grad_cpu, _), (out_dev, grad_dev, layer) = results
    torch.testing.assert_close(out_dev, out_cpu, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad_dev, grad_cpu, rtol=1e-6, atol=1e-8)
    if mode == "operator":  # converged, the normalized layer's operator norm is 1 there too
        lipfast.nn.converge(layer)
        layer.eval()
        lower, upper = lipfast.operator_norm_bounds(layer, (7, 7))
        assert lower.device.type == torch.device(device).type
        assert float(lower) <= 1 + 1e-5 and float(upper) >= 1 - 1e-5 and float(upper) <= 1 + 2e-3


def test_lipschitz_gap_on_the_device(device):
    # the attained lower bound (local constants, then a climb) and the certified upper bound there
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.randn(20, 8, dtype=torch.float64)
    on_cpu = lipfast.lipschitz_gap(model, x, refine_steps=3)
    there = lipfast.lipschitz_gap(copy.deepcopy(model).to(device), x.to(device), refine_steps=3)
    assert 0 < there.lower <= there.upper < math.inf
    assert abs(there.lower - on_cpu.lower) <= 1e-6 * on_cpu.lower
    assert abs(there.upper - on_cpu.upper) <= 1e-3 * on_cpu.upper


def test_one_lipschitz_blocks_train_and_export_on_the_device(device):
    # a training step of every block there, then export: plain layers on the device, same outputs
    model = copy.deepcopy(_one_lipschitz(torch.float64)).to(device).train()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64, device=device)
    loss = lipfast.nn.LipschitzMarginLoss(0.1)(model(x), torch.arange(5, device=device) % 5)
    loss.backward()
    assert all(p.grad is not None and p.grad.device == x.device for p in model.parameters() if p.requires_grad)
    model.eval()
    exported = lipfast.nn.export(model)
    assert all(p.device == x.device for p in exported.parameters())
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=0, atol=1e-6)


class _Recurrent(nn.Module):
    """An LSTM's whole output sequence (20 steps of 5: wider than the 64 outputs formed whole, so its
    local constants take power iteration, jvp then vjp) or a GRU's last step through a Linear head."""

    def __init__(self, wide: bool):
        super().__init__()
        self.wide = wide
        self.rnn = nn.LSTM(3, 5, batch_first=True) if wide else nn.GRU(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        y = self.rnn(x)[0]
        return y if self.wide else self.head(y[:, -1])


@pytest.mark.parametrize("wide", [False, True], ids=["gru-head", "lstm-sequence"])
def test_local_constants_of_a_recurrent_model_on_the_device(device, wide):
    # autograd through a recurrent layer in eval mode, which cuDNN's kernels cannot differentiate:
    # local constants and the gap's climb agree with the CPU's
    torch.manual_seed(7)
    model = _Recurrent(wide).double().eval()
    x = torch.randn(6, 20, 3, dtype=torch.float64)
    on_cpu = lipfast.local_lipschitz(model, x, rtol=1e-8)
    there = lipfast.local_lipschitz(copy.deepcopy(model).to(device), x.to(device), rtol=1e-8)
    assert there.device.type == torch.device(device).type
    torch.testing.assert_close(there.cpu(), on_cpu, rtol=1e-6, atol=0)
    if not wide:
        gap_cpu = lipfast.lipschitz_gap(model, x, refine_steps=2)
        gap = lipfast.lipschitz_gap(copy.deepcopy(model).to(device), x.to(device), refine_steps=2)
        assert 0 < gap.lower <= gap.upper < math.inf
        assert abs(gap.lower - gap_cpu.lower) <= 1e-6 * gap_cpu.lower
