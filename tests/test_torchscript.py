"""lipschitz_bound on TorchScript models: the same layers and bound as the Python module."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipfast
from lipfast import _torchscript


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        return self.act(x + self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(Block(6), Block(6))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, 4)
        self.shared = nn.Tanh()  # called twice

    def forward(self, x):
        x = self.shared(self.stem(x))
        x = self.blocks(x)
        x = torch.flatten(self.pool(x), 1)
        return self.shared(self.head(x)) * 0.5 - 1.0


def _net(dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    net = Net().to(dtype).eval()
    with torch.no_grad():
        for block in net.blocks:
            block.bn.running_var.uniform_(0.5, 2.0)
            block.bn.weight.uniform_(-2.0, 2.0)
    return net


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scripted_model_gets_the_python_models_bound(dtype):
    net = _net(dtype)
    scripted = torch.jit.script(net)
    eager = lipfast.lipschitz_bound(net, (3, 8, 8), progress=False)
    report = lipfast.lipschitz_bound(scripted, (3, 8, 8), progress=False)
    assert report.method == "fx" and any("TorchScript" in note for note in report.notes)
    assert [layer.name for layer in report.layers] == [layer.name for layer in eager.layers]
    for a, b in zip(report.layers, eager.layers):
        assert (a.kind, a.input_shape, a.output_shape) == (b.kind, b.input_shape, b.output_shape)
        assert a.upper == pytest.approx(b.upper, rel=1e-12) and a.lower == pytest.approx(b.lower, rel=1e-12)
    assert math.isfinite(report.upper) and report.upper == pytest.approx(eager.upper, rel=1e-12)


def test_translation_computes_what_the_script_computes():
    net = _net(torch.float64)
    scripted = torch.jit.script(net)
    graph_module = _torchscript.to_graph_module(scripted)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(graph_module(x), scripted(x), rtol=0, atol=0)
    assert isinstance(graph_module.get_submodule("blocks.1.conv"), nn.Conv2d)
    assert graph_module.get_submodule("blocks.1.conv").weight.dtype == torch.float64


def test_one_scripted_layer():
    torch.manual_seed(1)
    layer = nn.Linear(7, 5)
    report = lipfast.lipschitz_bound(torch.jit.script(layer), (7,), progress=False)
    sigma = float(torch.linalg.matrix_norm(layer.weight.detach().double(), 2))
    assert sigma * (1 - 1e-6) <= report.upper <= sigma * (1 + 1e-3)


def test_untranslatable_scripts_raise_naming_the_operation():
    class Branching(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ValueError, match=r"cannot follow this TorchScript model: .*prim::If"):
        lipfast.lipschitz_bound(torch.jit.script(Branching()), (4,), progress=False)


def test_scaling_by_a_stored_tensor_gets_its_largest_entry():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.tensor([2.0, -3.0]))

        def forward(self, x):
            return x * self.scale

    report = lipfast.lipschitz_bound(torch.jit.script(Scaled()), (2,), progress=False)
    assert report.upper == 3.0


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        z = y.mul_(3.0)  # y now holds 3 lin(x): the output is 6 lin(x)
        return z + y


class _ScaledView(_Scaled):
    def forward(self, x):
        y = self.lin(x)
        v = y.view(4, -1)
        y.mul_(3.0)  # v changes too
        return v


class _ScaledFlat(_Scaled):
    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()

    def forward(self, x):
        y = self.lin(x)
        self.flat(y).mul_(3.0)  # Flatten returns a view of y: y changes too
        return y


def test_in_place_operations_in_a_script():
    torch.manual_seed(0)
    model = _Scaled().eval()
    report = lipfast.lipschitz_bound(torch.jit.script(model), (4,), progress=False)
    assert abs(report.upper - 6 * report.layers[0].upper) <= 1e-12 * report.upper
    for viewed in (_ScaledView(), _ScaledFlat()):
        with pytest.raises(ValueError, match="in-place"):
            lipfast.lipschitz_bound(torch.jit.script(viewed.eval()), (4,), progress=False)


def _jacobian_norm(model, shape, seed: int = 0) -> float:
    x = torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    jacobian = torch.autograd.functional.jacobian(lambda t: model(t).reshape(-1), x).reshape(-1, x.numel())
    return float(torch.linalg.matrix_norm(jacobian, 2))


@pytest.mark.parametrize("activation, slope", [(nn.LeakyReLU(3.0), 3.0), (nn.ELU(alpha=4.0), 4.0),
                                               (nn.Hardtanh(-2.0, 2.0), 1.0)])
def test_traced_layers_keep_their_settings(activation, slope):
    # a traced module keeps no constructor arguments: rebuilding it filled in defaults (slope 0.01,
    # alpha 1), a bound 3-4 times too small; its graph holds the true ones
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), activation).double().eval()
    traced = torch.jit.trace(model, torch.randn(2, 4, dtype=torch.float64))
    report = lipfast.lipschitz_bound(traced, (4,), progress=False)
    sigma = float(torch.linalg.matrix_norm(model[0].weight.detach(), 2))
    assert sigma * slope * (1 - 1e-9) <= report.upper <= sigma * slope * (1 + 1e-3)


@pytest.mark.parametrize("make", [torch.jit.script, lambda m: torch.jit.trace(m, torch.randn(2, 3, 8, 8))],
                         ids=["script", "trace"])
def test_traced_and_scripted_networks_against_the_python_one(make):
    net = _net(torch.float32)
    eager = lipfast.lipschitz_bound(net, (3, 8, 8), progress=False)
    report = lipfast.lipschitz_bound(make(net), (3, 8, 8), progress=False)
    # a traced model's layers are followed through its graph (F.conv2d, F.batch_norm, ...), each
    # bracketed on its own: the same constants to the brackets' rtol
    assert eager.upper * (1 - 1e-12) <= report.upper <= eager.upper * 1.01
    kinds = {layer.kind for layer in report.layers}
    assert kinds >= ({"Conv2d", "BatchNorm2d"} if make is torch.jit.script else {"F.conv2d", "F.batch_norm"})
    assert _jacobian_norm(net.double(), (3, 8, 8)) <= report.upper


def _shuffle(x, groups: int):
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class _Dispatching(nn.Module):
    """What torchvision's scripted models do: a helper method, a branch on a flag, compiled
    torch.nn.functional calls, a free function, and the pieces of a chunk unpacked."""

    def __init__(self, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def _body(self, x):
        a, b = x.chunk(2, dim=1)
        y = torch.cat([a, F.leaky_relu(self.conv(_shuffle(x, 2))[:, 2:] + b, 0.5)], dim=1)
        if self.residual:
            y = y + x
        y = F.dropout(F.adaptive_avg_pool2d(y, 1), 0.5, self.training)
        return self.head(torch.flatten(y, 1))

    def forward(self, x):
        return self._body(x)


@pytest.mark.parametrize("residual", [False, True])
def test_scripted_helper_methods_flags_and_functions(residual):
    torch.manual_seed(0)
    model = _Dispatching(residual).double().train()  # a training-mode script: bounded as in eval
    eager = lipfast.lipschitz_bound(model, (4, 6, 6), progress=False)
    report = lipfast.lipschitz_bound(torch.jit.script(model), (4, 6, 6), progress=False)
    assert math.isfinite(report.upper) and report.upper == pytest.approx(eager.upper, rel=1e-12)
    assert model.training
    assert _jacobian_norm(model.eval(), (4, 6, 6)) <= report.upper


def test_a_translation_that_does_not_compute_what_the_script_does_is_refused(monkeypatch):
    traced = torch.jit.trace(nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(3.0)), torch.randn(2, 4))
    monkeypatch.setitem(_torchscript._FUNCTIONS, "leaky_relu", F.relu)  # a wrong translation
    with pytest.raises(ValueError, match="does not reproduce its outputs"):
        lipfast.lipschitz_bound(traced, (4,), progress=False)


class _Traceable(nn.Module):
    """Layers whose traced graphs hold aten operations of their own: pads, same-padded and
    reflect-padded convs, upsampling, and activations with settings."""

    def __init__(self) -> None:
        super().__init__()
        self.reflect = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.same = nn.Conv2d(4, 4, 3, padding="same", dilation=2)
        self.prelu = nn.PReLU(4, init=-2.5)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.acts = nn.Sequential(nn.GELU(approximate="tanh"), nn.Mish(), nn.CELU(0.5), nn.SELU())
        self.pad = nn.ReplicationPad2d(1)

    def forward(self, x):
        y = self.prelu(self.same(self.reflect(x)))
        return self.acts(self.pad(self.up(y)))


def test_traced_graph_operations_are_followed():
    torch.manual_seed(0)
    model = _Traceable().double().eval()
    traced = torch.jit.trace(model, torch.randn(2, 3, 5, 5, dtype=torch.float64))
    report = lipfast.lipschitz_bound(traced, (3, 5, 5), progress=False)
    assert math.isfinite(report.upper), report.notes
    kinds = {layer.kind for layer in report.layers}
    assert {"F.conv2d", "F.prelu"} <= kinds
    prelu = next(layer for layer in report.layers if layer.kind == "F.prelu")
    assert prelu.upper == 2.5
    for seed in range(3):
        assert _jacobian_norm(model, (3, 5, 5), seed) <= report.upper


class _Dense(nn.Module):
    """A dense block as DenseNet's scripted form computes it: a list of features built in a loop."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Conv2d(2 + 2 * i, 2, 3, padding=1) for i in range(3)])
        self.repeats = 2

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(torch.relu(layer(torch.cat(features, 1))))
        y = torch.cat(features, 1)
        for _ in range(self.repeats):
            y = y * 0.5
        return y


def test_scripted_loops_and_lists_are_unrolled():
    torch.manual_seed(0)
    model = _Dense().double().eval()
    report = lipfast.lipschitz_bound(torch.jit.script(model), (2, 5, 5), progress=False)
    eager = lipfast.lipschitz_bound(model, (2, 5, 5), progress=False)
    assert math.isfinite(report.upper) and report.upper == pytest.approx(eager.upper, rel=1e-12)
    assert _jacobian_norm(model, (2, 5, 5)) <= report.upper

    class Data(nn.Module):
        def forward(self, x):
            for _ in range(int(x.sum() > 0)):  # a trip count computed from the input
                x = x * 2
            return x

    with pytest.raises(ValueError, match="prim::"):
        lipfast.lipschitz_bound(torch.jit.script(Data()), (4,), progress=False)


class _SizeBranches(nn.Module):
    """A forward that checks its input's shape, scales by 10 on wide inputs and loops once per
    channel: branches and trip counts decided by sizes alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("expected (N, C, H, W)")
        torch._assert(x.size(1) == 2, "expected two channels")
        y = self.conv(x)
        if y.shape[-1] > 4:
            y = y * 10
        for _ in range(x.size(1)):
            y = y + self.conv(y)
        return self.head(y.flatten(1)[:, :12])


class _SizeBranchesTaken(nn.Module):
    """_SizeBranches with the branches that an input of width `width` takes, written out."""

    def __init__(self, source: _SizeBranches, width: int) -> None:
        super().__init__()
        self.conv, self.head, self.wide = source.conv, source.head, width > 4

    def forward(self, x):
        y = self.conv(x)
        if self.wide:
            y = y * 10
        y = y + self.conv(y)
        y = y + self.conv(y)
        return self.head(y.flatten(1)[:, :12])


@pytest.mark.parametrize("width", [3, 6])
def test_branches_and_loops_on_sizes_are_decided_for_the_input_shape(width):
    torch.manual_seed(width)
    model = _SizeBranches().double().eval()
    scripted = torch.jit.script(model)
    report = lipfast.lipschitz_bound(scripted, (2, 3, width), progress=False)
    taken = lipfast.lipschitz_bound(_SizeBranchesTaken(model, width), (2, 3, width), progress=False)
    assert report.upper == pytest.approx(taken.upper, rel=1e-12) and math.isfinite(report.upper)
    # the Python module too: torch.fx traces it for that input shape (plainly it cannot)
    eager = lipfast.lipschitz_bound(model, (2, 3, width), progress=False)
    assert eager.method == "fx" and any("traced it for inputs of shape" in note for note in eager.notes)
    assert eager.upper == pytest.approx(taken.upper, rel=1e-12)
    assert _jacobian_norm(model, (2, 3, width)) <= report.upper
    with pytest.raises(ValueError, match="raises an exception for this input.*expected two channels"):
        lipfast.lipschitz_bound(scripted, (3, 3, width), progress=False)

    class ValueBranch(nn.Module):  # a size and an entry: still refused
        def forward(self, x):
            if x.size(1) > 1 and bool(x[0, 0] > 0):
                return x * 3
            return x

    with pytest.raises(ValueError, match="prim::If"):
        lipfast.lipschitz_bound(torch.jit.script(ValueBranch()), (4,), progress=False)


class _NormThenSizedPad(nn.Module):
    """timm's BatchNormAct2d, then its "same" padding for a strided conv: F.batch_norm reads the
    model's own statistics in the forward, and the padding is computed from the normalized value's
    size, with max() on it (a branch on a size), after a check of its ndim."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3, stride=2)

    def forward(self, x):
        y = F.batch_norm(x, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, False, 0.1, 1e-5)
        if y.ndim != 4:  # (timm checks sizes this way too)
            raise ValueError("expected (N, C, H, W)")
        size = y.size(-1)
        total = max((-(-size // 2) - 1) * 2 + 3 - size, 0)
        return self.conv(F.pad(torch.relu(y), (total // 2, total - total // 2, total // 2, total - total // 2)))


@pytest.mark.parametrize("width", [5, 6])
def test_sizes_after_the_models_own_tensors_are_numbers_when_tracing_for_a_shape(width):
    torch.manual_seed(width)
    model = _NormThenSizedPad().double().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 2.0)
    report = lipfast.lipschitz_bound(model, (2, 4, width), progress=False)
    assert report.method == "fx" and any("traced it for inputs of shape" in note for note in report.notes), report.notes
    scale = (model.bn.weight / torch.sqrt(model.bn.running_var + 1e-5)).abs().max()
    total = max((-(-width // 2) - 1) * 2 + 3 - width, 0)  # the conv's input: padded by total in each dim
    conv = lipfast.operator_norm_bounds(model.conv, (4 + total, width + total))[1]
    assert math.isfinite(report.upper) and report.upper <= float(scale) * float(conv) * (1 + 1e-3)
    assert _jacobian_norm(model, (2, 4, width)) <= report.upper


def test_tracing_for_a_shape_leaves_the_example_as_it_is():
    class InPlace(nn.Module):  # the traced calls run on the example, in-place ones too
        def forward(self, x):
            x.mul_(2.0)
            return x * 3 if x.size(-1) > 2 else x

    from lipfast import network

    example = torch.randn(1, 4)
    kept = example.clone()
    traced = network._trace_for_shape(InPlace(), example)
    assert torch.equal(example, kept) and torch.equal(traced(example.clone()), 6 * kept)


@pytest.mark.parametrize("make", [lambda m: torch.jit.trace(m, torch.randn(1, 6)),
                                  lambda m: torch.export.export(m, (torch.randn(1, 6),))],
                         ids=["trace", "export"])
def test_parametrized_layers_and_copies_with_a_memory_format(make):
    # torch's orthogonal parametrization clones with a memory format (aten::clone(self, memory_format),
    # whose second argument Tensor.clone takes by keyword only)
    class Copies(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.utils.parametrizations.orthogonal(nn.Linear(6, 6))
            self.b = nn.utils.parametrizations.spectral_norm(nn.Linear(6, 3))

        def forward(self, x):
            return self.b(torch.relu(self.a(x)).clone(memory_format=torch.contiguous_format))

    torch.manual_seed(0)
    model = Copies().eval()
    expected = lipfast.lipschitz_bound(model, (6,), progress=False).upper
    assert lipfast.lipschitz_bound(make(model), (6,), progress=False).upper == pytest.approx(expected, rel=1e-6)


class _LoopsOverPieces(nn.Module):
    """Loops over the pieces of chunk and unbind, and over range(len(x)): plain tracing cannot
    iterate a traced value (it unpacks only `a, b = x.chunk(2, 1)`); traced for a shape, the
    example gives the count."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(2, 3, 3, padding=1) for _ in range(2))

    def forward(self, x):
        y = torch.cat([conv(part) for conv, part in zip(self.convs, x.chunk(2, 1))], 1)  # (1, 6, h, w)
        rows = sum(y.unbind(2))  # (1, 6, w): the sum of h slices
        return torch.stack([rows[:, i] * (i + 1) for i in range(len(rows[0]))], 1)


def test_loops_over_a_values_pieces_are_traced_for_the_input_shape():
    torch.manual_seed(0)
    model = _LoopsOverPieces().double().eval()
    report = lipfast.lipschitz_bound(model, (4, 3, 5), progress=False)
    assert report.method == "fx" and any("traced it for inputs of shape" in note for note in report.notes), report.notes
    # the rules' bound, spelled out: two convs on disjoint pieces of x, concatenated (the larger);
    # a sum of 3 disjoint slices (in quadrature); 6 channels scaled by 1..6 and stacked (the largest)
    convs = [float(lipfast.operator_norm_bounds(conv, (3, 5))[1]) for conv in model.convs]
    expected = max(convs) * math.sqrt(3) * 6
    assert report.upper == pytest.approx(expected, rel=1e-12)
    assert _jacobian_norm(model, (4, 3, 5)) <= report.upper


def test_attributes_of_values_are_known_when_tracing_for_a_shape():
    # x.sort(1).values: an attribute of a computed value, whose length and sizes the example gives
    class Attributes(nn.Module):
        def forward(self, x):
            v = x.sort(1).values
            return torch.stack(list(reversed(v.unbind(2))), 2) * v.shape[-1]

    report = lipfast.lipschitz_bound(Attributes(), (3, 5), progress=False)
    assert report.method == "fx" and any("traced it for inputs of shape" in note for note in report.notes), report.notes
    # sorted values (1), their 5 columns stacked (disjoint pieces of one value: 1), times 5
    assert report.upper == pytest.approx(5.0, rel=1e-12)
    assert _jacobian_norm(Attributes().double(), (3, 5)) <= report.upper
