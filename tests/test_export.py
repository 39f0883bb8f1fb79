"""lipschitz_bound on programs made by torch.export: the same bound as the Python module."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipfast
from conftest import random_network
from lipfast import _torchscript


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.LeakyReLU(0.3, inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.act(self.stem(x))
        y = y + self.bn(self.conv(y))
        return self.head(self.drop(torch.flatten(self.pool(y), 1)))


def _model() -> Residual:
    torch.manual_seed(0)
    model = Residual().double().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.3, 2.0)
        model.bn.weight.uniform_(-2.0, 2.0)
    return model


def _jacobian_norm(model, shape) -> float:
    x = torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    jacobian = torch.autograd.functional.jacobian(lambda t: model(t).reshape(-1), x).reshape(-1, x.numel())
    return float(torch.linalg.matrix_norm(jacobian, 2))


@pytest.mark.parametrize("form", ["program", "module", "core-aten"])
def test_exported_program_gets_the_python_models_bound(form):
    # core-aten: run_decompositions() (aten.convolution, _native_batch_norm_legit_no_training and its
    # getitem, addmm for the Linear layer, _adaptive_avg_pool2d), the form backends take
    model = _model()
    program = torch.export.export(model, (torch.randn(1, 3, 8, 8, dtype=torch.float64),))
    if form == "core-aten":
        program = program.run_decompositions()
    eager = lipfast.lipschitz_bound(model, (3, 8, 8), progress=False)
    report = lipfast.lipschitz_bound(program.module() if form == "module" else program, (3, 8, 8), progress=False)
    assert any("exported program" in note for note in report.notes)
    assert {"F.conv2d", "F.batch_norm"} | ({"F.linear"} if form != "core-aten" else set()) <= \
        {layer.kind for layer in report.layers}
    # the layers as functions, each bracketed on its own: the same constants to the brackets' rtol
    assert math.isfinite(report.upper) and report.upper == pytest.approx(eager.upper, rel=2e-3)
    assert _jacobian_norm(model, (3, 8, 8)) <= report.upper


def test_in_place_operators_of_a_program():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4).double()

        def forward(self, x):
            y = self.lin(x)
            z = y.mul_(3.0)  # y now holds 3 lin(x): the output is 6 lin(x)
            return z + y

    torch.manual_seed(0)
    model = Scaled().eval()
    program = torch.export.export(model, (torch.randn(1, 4, dtype=torch.float64),))
    report = lipfast.lipschitz_bound(program, (4,), progress=False)
    assert report.upper == pytest.approx(6 * report.layers[0].upper, rel=1e-12)


def test_operators_with_no_rule_give_no_finite_bound_with_their_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)).eval()
    program = torch.export.export(model, (torch.randn(1, 4),))
    report = lipfast.lipschitz_bound(program, (4,), progress=False)
    assert report.upper == math.inf and any("layer_norm" in note for note in report.notes), report.notes


def test_a_wrong_translation_is_refused(monkeypatch):
    program = torch.export.export(_model(), (torch.randn(1, 3, 8, 8, dtype=torch.float64),))
    monkeypatch.setitem(_torchscript._FUNCTIONS, "leaky_relu", torch.nn.functional.relu)
    with pytest.raises(ValueError, match="cannot follow this exported program: .*does not reproduce"):
        lipfast.lipschitz_bound(program, (3, 8, 8), progress=False)
    with pytest.raises(TypeError, match="nn.Module or a torch.export.ExportedProgram"):
        lipfast.lipschitz_bound("model.pt2", (3, 8, 8), progress=False)


@pytest.mark.parametrize("mode", ["circular", "reflect", "replicate"])
@pytest.mark.parametrize("form", ["export", "trace"])
def test_a_pad_then_conv_is_bounded_as_the_padded_conv(mode, form):
    # nn.Conv2d with a padding mode that copies entries runs F.pad, then a conv with no padding: its
    # traced or exported graph shows both, and the pair is bracketed as the layer it came from (the
    # pad alone has norm above 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode), nn.ReLU(),
                          nn.Conv2d(4, 2, 5, padding=2, padding_mode=mode)).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    made = torch.export.export(model, (x,)) if form == "export" else torch.jit.trace(model, x)
    report = lipfast.lipschitz_bound(made, (3, 8, 8), progress=False)
    eager = lipfast.lipschitz_bound(model, (3, 8, 8), progress=False)
    assert report.upper == pytest.approx(eager.upper, rel=1e-9)
    assert [layer.input_shape for layer in report.layers if layer.kind == "F.conv2d"] == [(3, 8, 8), (4, 8, 8)]


def test_a_program_with_a_dynamic_batch_dimension():
    class Flattening(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return self.head(y.view(y.size(0), -1))  # exported as a size of the input (aten.sym_size)

    torch.manual_seed(0)
    model = Flattening().eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(2, 3, 6, 6),), dynamic_shapes=({0: batch},))
    report = lipfast.lipschitz_bound(program, (3, 6, 6), progress=False)
    assert report.upper == pytest.approx(lipfast.lipschitz_bound(model, (3, 6, 6), progress=False).upper, rel=1e-3)


class _FunctionalBlock(nn.Module):
    """One of eight small blocks of functional layers and selections (the forms traced and exported
    graphs are made of)."""

    def __init__(self, c: int, kind: int, rng) -> None:
        super().__init__()
        self.kind, self.mode = kind, rng.choice(["zeros", "circular", "reflect", "replicate"])
        self.conv = nn.Conv2d(c, c, 3, padding=1, padding_mode=self.mode).double()
        self.w = nn.Parameter(0.4 * torch.randn(c, c, 3, 3, dtype=torch.float64))
        self.register_buffer("mean", torch.randn(c, dtype=torch.float64))
        self.register_buffer("var", torch.rand(c, dtype=torch.float64) + 0.2)
        self.gamma = nn.Parameter(torch.randn(c, dtype=torch.float64) * 1.5)
        self.slope = nn.Parameter(torch.randn(c, dtype=torch.float64) * 2)

    def forward(self, x):
        F, k = torch.nn.functional, self.kind
        if k == 0:
            a, b = x.chunk(2, dim=1)
            return torch.cat([self.conv(x)[:, : a.shape[1]], F.relu(b)], 1)
        if k == 1:
            return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, None, False, 0.1, 1e-3)
        if k == 2:
            return F.prelu(self.conv(x), self.slope)
        if k == 3:
            return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular" if self.mode == "zeros" else self.mode), self.w) + x
        if k == 4:
            parts = torch.split(self.conv(x), [1, x.shape[1] - 1], dim=1)
            return torch.cat([parts[1], parts[0]], 1) * 2 - x
        if k == 5:
            return F.mish(self.conv(x)) + F.celu(x, 0.7)
        if k == 6:
            return F.selu(F.pad(x, (1, 1, 1, 1))[:, :, 1:-1, 1:-1]) + self.conv(x).narrow(1, 0, x.shape[1])
        return F.dropout(self.conv(x), 0.3, False) + x.movedim(1, 3).movedim(3, 1)


@pytest.mark.parametrize("seed", range(6))
def test_random_functional_networks_in_every_form(seed):
    model, c = random_network(_FunctionalBlock, 8, seed)
    x0 = torch.randn(1, c, 4, 4, dtype=torch.float64)
    eager = lipfast.lipschitz_bound(model, (c, 4, 4), progress=False).upper
    worst = max(_jacobian_norm(model, (c, 4, 4)), _jacobian_norm(lambda t: model(3 * t), (c, 4, 4)) / 3)
    for made in (torch.export.export(model, (x0,)), torch.jit.trace(model, x0, check_trace=False)):
        upper = lipfast.lipschitz_bound(made, (c, 4, 4), progress=False).upper
        assert math.isfinite(upper) and worst <= upper and upper == pytest.approx(eager, rel=2e-3)


class _WritesIntoAPiece(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4).double()

    def forward(self, x):
        y = self.lin(x)
        a, b = y.chunk(2, dim=1)
        a.mul_(3.0)  # y changes too: its first half is tripled
        return y


@pytest.mark.parametrize("form", ["script", "trace", "export"])
def test_in_place_on_a_piece_of_a_split_is_refused(form):
    model = _WritesIntoAPiece().eval().requires_grad_(False)
    x = torch.randn(1, 4, dtype=torch.float64)
    made = {"script": lambda: torch.jit.script(model), "trace": lambda: torch.jit.trace(model, x),
            "export": lambda: torch.export.export(model, (x,))}[form]()
    with pytest.raises(ValueError, match="shares memory with a view"):
        lipfast.lipschitz_bound(made, (4,), progress=False)


def test_local_constants_and_the_gap_of_a_program():
    model = _model()
    program = torch.export.export(model, (torch.randn(1, 3, 8, 8, dtype=torch.float64),))  # guards: batch 1
    inputs = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(lipfast.local_lipschitz(program, inputs), lipfast.local_lipschitz(model, inputs))
    gap = lipfast.lipschitz_gap(program, inputs, refine_steps=2)
    assert gap.lower <= gap.upper and gap.upper == lipfast.lipschitz_bound(program, (3, 8, 8), progress=False).upper


class _Flattened(nn.Module):
    """A conv, BatchNorm, ReLU and a Linear head on the flattened features: exported with a static
    batch above 1, flatten becomes a view to (batch, features), whose size is fixed in the program."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.head(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


@pytest.mark.parametrize("decomposed", [False, True], ids=["export", "core-aten"])
def test_a_program_exported_for_a_batch_above_one(decomposed):
    # its guards and views fix the batch (3): one example followed by two zero examples, each output's
    # first row; the local constants in pieces of 3 (the last padded): the module's own results
    torch.manual_seed(2)
    model = _Flattened().double().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.3, 2.0)
    program = torch.export.export(model, (torch.randn(3, 3, 6, 6, dtype=torch.float64),))
    if decomposed:
        program = program.run_decompositions()
    with pytest.raises(Exception, match="Guard failed"):
        program.module()(torch.randn(1, 3, 6, 6, dtype=torch.float64))
    eager = lipfast.lipschitz_bound(model, (3, 6, 6), progress=False)
    report = lipfast.lipschitz_bound(program, (3, 6, 6), progress=False)
    assert any("exported for a batch of 3" in note for note in report.notes), report.notes
    assert math.isfinite(report.upper) and report.upper == pytest.approx(eager.upper, rel=2e-3)
    assert _jacobian_norm(model, (3, 6, 6)) <= report.upper
    inputs = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(lipfast.local_lipschitz(program, inputs), lipfast.local_lipschitz(model, inputs))


class _Constants(nn.Module):
    """Tensor constants in the forward: index lists (one with a repeat), a boolean mask, an offset."""

    def __init__(self, kind: int) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 6).double()
        self.kind = kind

    def forward(self, x):
        y = self.linear(x)
        if self.kind == 0:
            return y[:, [0, 2, 4]] + y[:, [1, 3, 5]]
        if self.kind == 1:
            return y[:, [0, 0, 3]]
        if self.kind == 2:
            return y[:, torch.tensor([True, False, True, True, False, False])]
        return 3 * y + torch.tensor([1.0, 2, 3, 4, 5, 6], dtype=torch.float64)


# (kind 0 adds two disjoint pieces of y: in quadrature, sqrt(2))
@pytest.mark.parametrize("kind, factor", [(0, math.sqrt(2)), (1, math.sqrt(2)), (2, 1), (3, 3)])
@pytest.mark.parametrize("form", ["trace", "export"])
def test_tensor_constants_of_a_traced_or_exported_model(kind, factor, form):
    # traced, each torch.tensor(...) is a constant of the graph (once an error in the translation's
    # code); exported, a lifted copy of one: an index list is counted as the module's getitem is
    torch.manual_seed(kind)
    model = _Constants(kind).eval()
    x = torch.randn(1, 5, dtype=torch.float64)
    made = torch.jit.trace(model, x) if form == "trace" else torch.export.export(model, (x,))
    L = lipfast.lipschitz_bound(model.linear, (5,), progress=False).upper
    expected = lipfast.lipschitz_bound(model, (5,), progress=False).upper
    assert factor * L <= expected <= factor * L * (1 + 1e-12)
    assert lipfast.lipschitz_bound(made, (5,), progress=False).upper == expected


def test_the_other_results_of_a_core_aten_batch_norm():
    # output 0 becomes F.batch_norm (which the rules know); the saved statistics, read by a later node,
    # come from the operator itself
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    weight, bias, mean, var = (graph.placeholder(name) for name in ("weight", "bias", "mean", "var"))
    outputs = _torchscript._aten(graph, "_native_batch_norm_legit_no_training", [x, weight, bias, mean, var, 0.1, 1e-5])
    assert len(outputs) == 3 and outputs[0].target is torch.nn.functional.batch_norm
    graph.output((outputs[0], outputs[2]))
    module = torch.fx.GraphModule(nn.Module(), graph)
    args = [torch.randn(2, 3, 4), torch.rand(3), torch.randn(3), torch.randn(3), torch.rand(3) + 0.5]
    expected = torch.ops.aten._native_batch_norm_legit_no_training(*args, 0.1, 1e-5)
    got = module(*args)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[2])


class _Shuffle(nn.Module):
    """ShuffleNet's channel shuffle: a view, a transpose, contiguous, a view (core ATen: clone to the
    contiguous layout, which the last view needs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.conv(x).view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return y * torch.arange(1.0, 5.0, dtype=x.dtype).view(1, 4, 1, 1)


@pytest.mark.parametrize("form", ["trace", "export", "core-aten"])
def test_a_core_aten_clone_keeps_its_layout_for_a_later_view(form):
    # (and aten::arange's forms: its options are keywords of torch.arange's)
    torch.manual_seed(3)
    model = _Shuffle().double().eval()
    example = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    program = torch.jit.trace(model, example) if form == "trace" else torch.export.export(model, (example,))
    if form == "core-aten":
        program = program.run_decompositions()
    eager = lipfast.lipschitz_bound(model, (4, 3, 3), progress=False)
    report = lipfast.lipschitz_bound(program, (4, 3, 3), progress=False)
    assert math.isfinite(report.upper) and report.upper == pytest.approx(eager.upper, rel=1e-12)
    assert _jacobian_norm(model, (4, 3, 3)) <= report.upper


class _Assigned(nn.Module):
    """Item assignments (core ATen: slice_scatter, copy, a where on an arange mask), a reflection pad
    (core ATen: index by aranges, computed ahead as constants) and hardswish (core ATen: two clamps)."""

    def __init__(self) -> None:
        super().__init__()
        self.pad, self.conv, self.act = nn.ReflectionPad2d(1), nn.Conv2d(4, 4, 3), nn.Hardswish()

    def forward(self, x):
        y = self.act(self.conv(self.pad(x)))
        y[:, :2] *= 3
        y[:, 3] = x[:, 0] * 2
        return y


def test_core_aten_item_assignments_pads_and_clamps():
    # every step has a rule in core ATen too: a finite bound at or above the attained norm (looser than
    # the python module's: the pad is an index with copies, not bracketed with the conv, and each
    # scatter adds its base's whole constant)
    torch.manual_seed(4)
    model = _Assigned().double().eval()
    program = torch.export.export(model, (torch.randn(1, 4, 5, 5, dtype=torch.float64),)).run_decompositions()
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"aten.slice_scatter.default", "aten.copy.default", "aten.index.Tensor", "aten.clamp.default"} <= targets
    report = lipfast.lipschitz_bound(program, (4, 5, 5), progress=False)
    assert math.isfinite(report.upper), report.notes
    eager = lipfast.lipschitz_bound(model, (4, 5, 5), progress=False)
    assert _jacobian_norm(model, (4, 5, 5)) <= eager.upper <= report.upper <= 3 * eager.upper


class _Smooth(nn.Module):
    """softplus (with and without beta and threshold), Mish and logsumexp, which core ATen writes with
    a test on the input that picks a branch (torch.where on x > threshold, or on amax == inf)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn, self.lin = fn, nn.Linear(6, 6)

    def forward(self, x):
        return self.fn(self.lin(x))


@pytest.mark.parametrize("fn, kinds", [
    (lambda y: nn.functional.softplus(y), {"aten.log1p.default", "aten.where.self"}),
    (lambda y: nn.functional.softplus(y, beta=2.0, threshold=3.0), {"aten.log1p.default", "aten.div.Tensor"}),
    (lambda y: nn.functional.mish(y), {"aten.log1p.default", "aten.tanh.default"}),
    (lambda y: torch.logsumexp(y.reshape(-1, 2, 3), dim=(1, 2)), {"aten.amax.default", "aten.squeeze.dims"}),
    (lambda y: torch.logsumexp(y, 1, keepdim=True) - y, {"aten.amax.default", "aten.log.default"}),
], ids=["softplus", "softplus-beta", "mish", "logsumexp", "logsumexp-keepdim"])
def test_core_aten_softplus_mish_and_logsumexp_keep_their_constants(fn, kinds):
    # recomposed into the functions themselves: the core-ATen program gets the python module's bound
    torch.manual_seed(2)
    model = _Smooth(fn).double().eval()
    program = torch.export.export(model, (torch.randn(2, 6, dtype=torch.float64),)).run_decompositions()
    assert kinds <= {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    report = lipfast.lipschitz_bound(program, (6,), progress=False)
    eager = lipfast.lipschitz_bound(model, (6,), progress=False)
    assert math.isfinite(eager.upper) and report.upper == eager.upper, report.notes
    assert _jacobian_norm(model, (6,)) <= report.upper


class _PaddedConv(nn.Module):
    def __init__(self, mode: str, pad: tuple[int, ...]) -> None:
        super().__init__()
        self.mode, self.pad, self.conv = mode, pad, nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(nn.functional.pad(x, self.pad, mode=self.mode))


@pytest.mark.parametrize("mode, pad", [("reflect", (1, 1, 1, 1)), ("reflect", (2, 0, 1, 2)), ("replicate", (1, 1, 1, 1)),
                                       ("replicate", (0, 2, 0, 0))])
def test_core_aten_reflection_and_replication_pads_are_bracketed_with_their_conv(mode, pad):
    # core ATen gathers the padded rows, then the padded columns, by aranges: recognized as one pad,
    # bracketed with the conv after it as the python module's is
    torch.manual_seed(3)
    model = _PaddedConv(mode, pad).double().eval()
    program = torch.export.export(model, (torch.randn(1, 3, 6, 5, dtype=torch.float64),)).run_decompositions()
    assert "aten.index.Tensor" in {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    report = lipfast.lipschitz_bound(program, (3, 6, 5), progress=False)
    eager = lipfast.lipschitz_bound(model, (3, 6, 5), progress=False)
    assert report.upper == eager.upper
    # the same operator as the python module's: the conv with its pad where that pads as a conv's
    # padding can (the same amounts on both sides), else the conv on the padded input after the pad
    assert [layer.input_shape for layer in report.layers] == [layer.input_shape for layer in eager.layers]
    assert (report.layers[0].input_shape == (3, 6, 5)) == (pad[0] == pad[1] and pad[2] == pad[3])


@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_blocks_bounded_as_one_map_in_exported_programs(mode):
    # a downsampling block's chain and its shortcut (F.conv2d, F.batch_norm) are found in the
    # exported graph as in the python module's: the same bound
    from test_network import _Downsampling

    torch.manual_seed(2)
    block = _Downsampling(mode, nn.ReLU())
    program = torch.export.export(block, (torch.randn(1, 2, 6, 6, dtype=torch.float64),))
    eager = lipfast.lipschitz_bound(block, (2, 6, 6), progress=False)
    report = lipfast.lipschitz_bound(program, (2, 6, 6), progress=False)
    assert any("bounded as one map" in note for note in report.notes)
    assert report.upper == pytest.approx(eager.upper, rel=1e-12)
