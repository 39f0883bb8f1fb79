"""Lipschitz bounds of recurrent layers (nn.RNN, nn.LSTM, nn.GRU) in lipschitz_bound."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipfast


class _AllOutputs(nn.Module):
    """The recurrent layer's every output, flattened and concatenated: (output, h_n[, c_n])."""

    def __init__(self, rnn: nn.RNNBase, sequence_first: bool = False):
        super().__init__()
        self.rnn, self.sequence_first = rnn, sequence_first

    def forward(self, x):
        if self.sequence_first:
            x = x.transpose(0, 1)
        result = self.rnn(x)
        parts = [result[0], result[1][0], result[1][1]] if isinstance(self.rnn, nn.LSTM) else [result[0], result[1]]
        return torch.cat([part.transpose(0, 1).reshape(1, -1) if self.sequence_first or part is not result[0]
                          else part.reshape(1, -1) for part in parts], 1)


def _largest_jacobian_norm(model: nn.Module, shape: tuple, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    largest = 0.0
    for scale in (0.05, 0.5, 1.0, 3.0):
        for _ in range(3):
            x = torch.randn(1, *shape, generator=g, dtype=torch.float64) * scale
            J = torch.autograd.functional.jacobian(lambda t: model(t).reshape(-1), x).reshape(-1, x.numel())
            largest = max(largest, float(torch.linalg.matrix_norm(J, 2)))
    return largest


@pytest.mark.parametrize("make", [
    lambda: nn.RNN(3, 4, batch_first=True),
    lambda: nn.RNN(3, 4, num_layers=2, nonlinearity="relu", batch_first=True),
    lambda: nn.RNN(3, 4, bidirectional=True, batch_first=True),
    lambda: nn.GRU(3, 4, batch_first=True),
    lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True),
    lambda: nn.LSTM(3, 4, batch_first=True),
    lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True),
    lambda: nn.LSTM(3, 5, proj_size=2, batch_first=True),
    lambda: nn.GRU(3, 4, bias=False, batch_first=True),
], ids=["rnn", "rnn-relu-2", "rnn-bi", "gru", "gru-2-bi", "lstm", "lstm-2-bi", "lstm-proj", "gru-no-bias"])
def test_recurrent_bounds_are_never_below_a_jacobian(make):
    torch.manual_seed(0)
    rnn = make().double().eval()
    with torch.no_grad():  # biases of some size: saturated gates as well as open ones
        for name, p in rnn.named_parameters():
            if name.startswith("bias"):
                p.mul_(4)
    model = _AllOutputs(rnn).eval()
    shape = (4, 3)
    report = lipfast.lipschitz_bound(model, shape, progress=False)
    (layer,) = report.layers
    assert layer.input_shape == shape and "zero initial states" in layer.note
    attained = _largest_jacobian_norm(model, shape)
    assert 0 < layer.lower <= layer.upper and attained <= layer.upper <= report.upper


def test_one_step_of_an_rnn_is_bounded_tightly():
    # one step from h_0 = 0, zero biases: output and h_n are both tanh(W_ih x), whose Jacobian at 0 is
    # W_ih twice: the constant is sqrt(2) ‖W_ih‖, and the bound that
    torch.manual_seed(0)
    rnn = nn.RNN(5, 3, batch_first=True).double()
    with torch.no_grad():
        rnn.bias_ih_l0.zero_()
        rnn.bias_hh_l0.zero_()
    (layer,) = lipfast.lipschitz_bound(_AllOutputs(rnn), (1, 5), progress=False).layers
    exact = math.sqrt(2) * float(torch.linalg.matrix_norm(rnn.weight_ih_l0.detach(), 2))
    assert exact <= layer.upper <= exact * (1 + 2e-3)
    assert layer.lower == pytest.approx(exact, rel=1e-3)  # (power steps on the Jacobian at 0)


def test_sequence_first_layout_reads_the_steps():
    # batch_first=False: the layer sees (steps, batch, features); its bound is on the same sequence
    torch.manual_seed(0)
    first = nn.LSTM(3, 4, batch_first=True).double()
    second = nn.LSTM(3, 4).double()
    second.load_state_dict(first.state_dict())
    a = lipfast.lipschitz_bound(_AllOutputs(first), (6, 3), progress=False)
    b = lipfast.lipschitz_bound(_AllOutputs(second, sequence_first=True), (6, 3), progress=False)
    assert b.layers[0].input_shape == (6, 3) and a.upper == b.upper
    assert b.upper >= _largest_jacobian_norm(_AllOutputs(second, sequence_first=True), (6, 3))


def test_longer_sequences_get_larger_bounds():
    torch.manual_seed(0)
    model = _AllOutputs(nn.GRU(3, 4, batch_first=True)).eval()
    bounds = [lipfast.lipschitz_bound(model, (steps, 3), progress=False).upper for steps in (1, 2, 4)]
    assert bounds[0] < bounds[1] < bounds[2] and all(math.isfinite(b) for b in bounds)


class _WithState(nn.Module):
    def __init__(self, state: str):
        super().__init__()
        self.rnn, self.state = nn.GRU(3, 4, batch_first=True), state
        self.register_buffer("stored", torch.full((1, 1, 4), 0.5))

    def forward(self, x):
        if self.state == "zeros":
            return self.rnn(x, torch.zeros(1, x.shape[0], 4))[0]
        if self.state == "changed":
            h = torch.zeros(1, x.shape[0], 4)
            h.add_(0.5)
            return self.rnn(x, h)[0]
        return self.rnn(x, self.stored)[0]


@pytest.mark.parametrize("state", ["zeros", "changed", "stored"])
def test_an_initial_state_other_than_zeros_has_no_bound(state):
    torch.manual_seed(0)
    model = _WithState(state).eval()
    alone = lipfast.lipschitz_bound(_AllOutputs(model.rnn), (5, 3), progress=False)
    example = torch.randn(1, 5, 3)
    for made in (model, torch.jit.trace(model, example), torch.export.export(model, (example,))):
        report = lipfast.lipschitz_bound(made, (5, 3), progress=False)
        if state == "zeros":  # torch.zeros, as the layer makes its own: the same bound
            assert report.upper == alone.layers[0].upper
        else:
            assert report.upper == math.inf and "initial state" in " ".join(report.notes) or \
                "no Lipschitz rule for gru" in " ".join(report.notes), made


class _Classifier(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.rnn, self.fc = make(), nn.Linear(4 * (2 if make().bidirectional else 1), 2)

    def forward(self, x):
        out, _ = self.rnn(x.transpose(0, 1))
        return self.fc(out[-1])


@pytest.mark.parametrize("make", [
    lambda: nn.LSTM(3, 4, num_layers=2), lambda: nn.GRU(3, 4, bidirectional=True),
    lambda: nn.RNN(3, 4, nonlinearity="relu"), lambda: nn.LSTM(3, 5, proj_size=4, bias=False),
], ids=["lstm-2", "gru-bi", "rnn-relu", "lstm-proj-no-bias"])
def test_recurrent_layers_in_every_form(make):
    # scripted: the layer rebuilt from its settings; traced and exported: aten::lstm (gru, rnn_*)
    # rebuilt from its parameters, its initial states torch.zeros: one bound in every form
    torch.manual_seed(0)
    model = _Classifier(make).eval()
    example = torch.randn(1, 6, 3)
    bounds = [lipfast.lipschitz_bound(made, (6, 3), progress=False).upper
              for made in (model, torch.jit.script(model), torch.jit.trace(model, example),
                           torch.export.export(model, (example,)))]
    assert math.isfinite(bounds[0]) and bounds == [bounds[0]] * 4
