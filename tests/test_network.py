"""Whole-network Lipschitz bounds: exact chains, soundness against Jacobians, composition rules."""
from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipfast
from lipfast import network
from conftest import random_network, with_singular_values


def _linear(W: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(W.shape[1], W.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(W)
    return layer


def _orthogonal_with_first(u: torch.Tensor, seed: int) -> torch.Tensor:
    """A random orthogonal matrix whose first column is the unit vector u."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.cat([u[:, None], torch.randn(len(u), len(u) - 1, generator=g, dtype=torch.float64)], 1))
    return Q * torch.sign(Q[:, :1].T @ u)  # (the first column's sign: u itself)


def test_chain_with_known_norms():
    """Top singular vectors chained through positive vectors (biases zero): along x = t v_1, t > 0
    small, every ReLU passes and tanh has slope -> 1, so the network's constant is the product of
    the layers' norms, and the bound must reach it."""
    norms = [2.0, 0.5, 3.0]
    widths = [5, 6, 7, 4]
    g = torch.Generator().manual_seed(0)
    bases = [_orthogonal_with_first(torch.rand(n, generator=g, dtype=torch.float64) + 0.1, seed=n) for n in widths]
    layers = []
    for i, s in enumerate(norms):
        V, U = bases[i], bases[i + 1]
        k = min(U.shape[0], V.shape[0])
        sigma = torch.tensor([s, s / 2, s / 3, 0.1, 0.05, 0.01][:k], dtype=torch.float64)
        layers.append(_linear((U[:, :k] * sigma) @ V[:, :k].T))
        with torch.no_grad():
            layers[-1].bias.zero_()
    model = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.Tanh(), layers[2])
    report = lipfast.lipschitz_bound(model, (5,), rtol=1e-4, progress=False)
    exact = math.prod(norms)
    x = 1e-6 * bases[0][:, 0]
    attained = float(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(model, x), 2))
    assert attained == pytest.approx(exact, rel=1e-9)
    assert report.method == "fx" and exact <= report.upper <= exact * (1 + 1e-4) ** 3
    assert [layer.name for layer in report.layers] == ["0", "1", "2", "3", "4"]
    assert "network bound" in str(report) and report.to_dict()["upper"] == report.upper


def test_chain_with_unaligned_layers_is_bounded_below_the_product():
    """Random singular vectors: the chain bounded as one map (lipfast/_chains.py) is below the product
    of the layers' norms, and never below a Jacobian norm."""
    norms = [2.0, 0.5, 3.0]
    Ws = [with_singular_values(m, n, torch.tensor([s, s / 2, s / 3, 0.1, 0.05, 0.01]), seed=i)
          for i, ((m, n), s) in enumerate(zip([(6, 5), (7, 6), (4, 7)], norms))]
    model = nn.Sequential(_linear(Ws[0]), nn.ReLU(), _linear(Ws[1]), nn.Tanh(), _linear(Ws[2]))
    report = lipfast.lipschitz_bound(model, (5,), rtol=1e-4, progress=False)
    assert _max_jacobian_norm(model, (5,)) <= report.upper < 0.9 * math.prod(norms)
    assert any("bounded as one map" in note for note in report.notes)


@pytest.mark.parametrize("cholesky", [True, "lapack", False], ids=["dense_brackets", "lapack", "gram_iteration"])
def test_matrix_layers_bracketed_in_one_call(monkeypatch, cholesky):
    # Linear layers and 1x1 convs (grouped, strided, zero-padded) are matrices: one batched call for
    # all of them (conv.dense_brackets, or where that certifies not all, Gram iteration), each
    # layer's bracket still holding its exact norm (the largest over its groups).
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 1, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.Flatten(), nn.Linear(6 * 6 * 6, 10), nn.Tanh(), nn.Linear(10, 3),
    ).double()
    calls, gram_calls = [], []
    original, original_gram = lipfast.conv.dense_brackets, lipfast.linalg._gram_iteration_bounds_many

    def counting(matrices, rtol, max_iters):
        calls.append(len(matrices))
        return original(matrices, rtol, max_iters) if cholesky else None

    def counting_gram(Ws, *args, **kwargs):
        gram_calls.append(len(Ws))
        return original_gram(Ws, *args, **kwargs)

    if cholesky == "lapack":  # every matrix large enough for LAPACK's shared factorization
        monkeypatch.setattr(lipfast.conv, "_SHARED_CHOLESKY_SIZE", 1)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    monkeypatch.setattr(lipfast.conv, "dense_brackets", counting)
    monkeypatch.setattr(lipfast.linalg, "_gram_iteration_bounds_many", counting_gram)
    report = lipfast.lipschitz_bound(model, (4, 8, 8), rtol=1e-4, progress=False)
    # layer 2 is two matrices; the 3x3 conv's own bracket may end with its explicit matrix (one more call)
    assert calls[0] == 5 and calls[1:] in ([], [1]) and gram_calls == ([] if cholesky else [4])
    W2 = model[2].weight.detach().reshape(2, 4, 4)
    exact = {
        "0": float(torch.linalg.matrix_norm(model[0].weight.detach().reshape(8, 4), 2)),
        "2": float(torch.linalg.matrix_norm(W2, 2).max()),
        "6": float(torch.linalg.matrix_norm(model[6].weight.detach(), 2)),
        "8": float(torch.linalg.matrix_norm(model[8].weight.detach(), 2)),
    }
    layers = {layer.name: layer for layer in report.layers}
    for name, value in exact.items():
        assert layers[name].lower <= value * (1 + 1e-12) and value <= layers[name].upper * (1 + 1e-12)
        assert layers[name].upper <= layers[name].lower * (1 + 1e-4) and layers[name].seconds >= 0
    assert layers["4"].upper >= layers["4"].lower > 0  # the 3x3 conv: the one-by-one path


def test_nan_weight_still_named_with_batched_layers():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        lipfast.lipschitz_bound(model, (3,), progress=False)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 3, 3, padding=1, padding_mode="circular")
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.branch = nn.Conv2d(3, 2, 1)
        self.head = nn.Linear(5 * 3 * 3, 4)

    def forward(self, x):
        y = x + self.conv2(torch.relu(self.bn(self.conv1(x))))  # a skip connection
        y = self.pool(y)
        y = torch.cat([y, self.branch(y)], dim=1)  # concatenated branches
        return self.head(self.avg(y).flatten(1))


def _max_jacobian_norm(model, shape, points=6):
    best = 0.0
    for seed in range(points):
        x = torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        J = torch.autograd.functional.jacobian(model, x).reshape(-1, x.numel())
        best = max(best, float(torch.linalg.matrix_norm(J, 2)))
    return best


def test_sound_on_a_residual_network_with_batchnorm_and_pooling():
    torch.manual_seed(0)
    model = Residual().double()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.2, 2.0)
        model.bn.weight.uniform_(-2, 2)
    model.eval()
    report = lipfast.lipschitz_bound(model, (3, 6, 6), progress=False)
    assert report.method == "fx" and math.isfinite(report.upper)
    assert report.upper >= _max_jacobian_norm(model, (3, 6, 6))
    kinds = {layer.name: layer for layer in report.layers}
    assert kinds["pool"].upper == 3.0  # every input in 9 overlapping 3x3 windows: sqrt(9)
    assert abs(kinds["avg"].upper - 0.5) < 1e-9  # non-overlapping 2x2 averages: 1/sqrt(4)
    gamma_over_sigma = (model.bn.weight.abs() / torch.sqrt(model.bn.running_var + model.bn.eps)).max()
    assert abs(kinds["bn"].upper - float(gamma_over_sigma)) <= 1e-9


def test_activation_slopes():
    for module, exact in [(nn.GELU(), 1.128904145), (nn.SiLU(), 1.0998393), (nn.Sigmoid(), 0.25),
                          (nn.LeakyReLU(-2.0), 2.0), (nn.ELU(alpha=1.5), 1.5)]:
        report = lipfast.lipschitz_bound(nn.Sequential(module), (3,), progress=False)
        assert exact <= report.upper <= exact * (1 + 1e-6), (module, report.upper)


def test_no_global_constant_and_unknown_modules():
    report = lipfast.lipschitz_bound(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), (4,), progress=False)
    assert report.upper == math.inf and any("LayerNorm" in note for note in report.notes)

    class Square(nn.Module):
        def forward(self, x):
            return x * x

    report = lipfast.lipschitz_bound(Square(), (4,), progress=False)
    assert report.upper == math.inf and any("product of two" in note for note in report.notes)

    class Mystery(nn.Module):
        def forward(self, x):
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = nn.LocalResponseNorm(2)

        def forward(self, x):
            return self.m(x)

    with pytest.raises(TypeError, match="register_lipschitz"):
        lipfast.lipschitz_bound(Net(), (1, 4), progress=False)
    lipfast.register_lipschitz(nn.LocalResponseNorm, lambda module, shape: 1.0)
    try:
        assert lipfast.lipschitz_bound(Net(), (1, 4), progress=False).upper == 1.0
    finally:
        network._REGISTRY.pop(nn.LocalResponseNorm)
    with pytest.raises(ValueError, match="input_shape"):
        lipfast.lipschitz_bound(Net(), (0, 4))
    with pytest.raises(ValueError, match="does not accept"):
        lipfast.lipschitz_bound(nn.Linear(3, 2), (4,))


def test_a_zero_map_after_a_layer_with_no_constant_gives_zero_not_nan():
    # torchvision's ViT starts with a zero head after LayerNorms: the network is then constant, and
    # 0 * inf must not turn into NaN, in the bound, the naive product or the certified accuracy
    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    nn.init.zeros_(head.weight)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), head)
    report = lipfast.lipschitz_bound(model, (4,), progress=False)
    assert report.upper == 0.0 and report.naive_upper == 0.0
    x = torch.randn(10, 4)
    labels = model(x).argmax(1)
    assert lipfast.certified_accuracy(model, x, labels, 1e6, report=report) == 1.0

    class Scaled(nn.Module):  # x * 0 after a layer with no constant: traced, a functional rule
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(x) * 0.0 + 1.0

    assert lipfast.lipschitz_bound(Scaled(), (4,), progress=False).upper == 0.0


class _Functional2(nn.Module):
    def __init__(self, forward):
        super().__init__()
        self.fn = forward
        self.lin = nn.Linear(4, 4).double()
        self.register_buffer("mean", torch.randn(4, dtype=torch.float64))
        self.register_buffer("var", torch.rand(4, dtype=torch.float64) + 0.1)
        self.gamma = nn.Parameter(torch.randn(4, dtype=torch.float64) * 2)

    def forward(self, x):
        return self.fn(self, self.lin(x))


@pytest.mark.parametrize("forward, factor", [
    (lambda m, y: F.dropout(y, 0.75), 4.0),  # stays on (training=True, its default): every draw 1 / (1 - p)
    (lambda m, y: F.dropout(y, 0.75, m.training), 1.0),  # the eval-mode network's: off
    (lambda m, y: F.dropout(y, 1.0), 0.0),
    (lambda m, y: F.batch_norm(y, m.mean, m.var, m.gamma, None, False, 0.1, 1e-3), "bn"),
    (lambda m, y: F.batch_norm(y, m.mean, m.var, training=m.training), "bn1"),
], ids=["dropout-on", "dropout-training", "dropout-all", "batch-norm", "batch-norm-no-weight"])
def test_functional_dropout_and_batch_norm(forward, factor):
    torch.manual_seed(0)
    model = _Functional2(forward).train()
    report = lipfast.lipschitz_bound(model, (4,), progress=False)
    linear = next(layer for layer in report.layers if layer.kind == "Linear")
    if factor in ("bn", "bn1"):
        # the BatchNorm folded into the Linear before it: the bracket is of diag(s) W, s its scales
        scale = model.gamma.detach() / (model.var + 1e-3).sqrt() if factor == "bn" else 1 / (model.var + 1e-5).sqrt()
        exact = float(torch.linalg.matrix_norm(scale[:, None] * model.lin.weight.detach(), 2))
        assert exact <= report.upper <= exact * (1 + 1e-3) and report.upper == linear.upper
        assert "folded in" in linear.note and any(layer.note == "folded into lin's bracket" for layer in report.layers)
        factor = 1.0
    assert report.upper == pytest.approx(factor * linear.upper, rel=1e-9, abs=0)
    if factor:  # never below a draw's Jacobian (dropout: masks drawn at random)
        x = torch.randn(1, 4, dtype=torch.float64)
        with torch.no_grad():
            model.eval()
        J = torch.autograd.functional.jacobian(lambda t: model(t).reshape(-1), x).reshape(4, 4)
        assert float(torch.linalg.matrix_norm(J, 2)) <= report.upper * (1 + 1e-12)


def test_functional_batch_norm_on_batch_statistics_has_no_constant():
    class Normalized(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(4))
            self.register_buffer("var", torch.ones(4))

        def forward(self, x):
            return F.batch_norm(x, self.mean, self.var, training=True)

    report = lipfast.lipschitz_bound(Normalized(), (4, 3), progress=False)
    assert report.upper == math.inf and any("normalizes by the batch" in note for note in report.notes), report.notes


def test_certified_accuracy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3)).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    labels = model(x).argmax(1)
    labels[:10] = (labels[:10] + 1) % 3
    report = lipfast.lipschitz_bound(model, (6,), progress=False)
    radius = lipfast.certified_radius(model(x), labels, report.upper)
    for eps in (0.0, 0.05, 0.2):
        expected = float(((model(x).argmax(1) == labels) & (radius > eps)).double().mean())
        assert lipfast.certified_accuracy(model, x, labels, eps, report=report) == expected
    assert lipfast.certified_accuracy(model, x, labels, 0.05) == lipfast.certified_accuracy(model, x, labels, 0.05, report=report)
    for eps in (-0.1, math.nan):
        with pytest.raises(ValueError, match="eps"):
            lipfast.certified_accuracy(model, x, labels, eps, report=report)
    with pytest.raises(ValueError, match="inputs holds no examples"):
        lipfast.certified_accuracy(model, x[:0], labels[:0], 0.1, report=report)


def test_certified_accuracy_judges_the_eval_mode_network_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    x = torch.randn(40, 6, dtype=torch.float64)
    labels = model.eval()(x).argmax(1)
    model.train()
    stats = model[1].running_mean.clone(), model[1].num_batches_tracked.clone()
    report = lipfast.lipschitz_bound(model, (6,), progress=False)
    assert lipfast.certified_accuracy(model, x, labels, 0.0, report=report) == 1.0  # eval mode: every label right
    assert model.training and torch.equal(model[1].running_mean, stats[0])
    assert torch.equal(model[1].num_batches_tracked, stats[1])


def test_registered_custom_module_is_kept_whole_and_probes_leave_no_trace():
    class Scale(nn.Module):  # not a torch.nn module: torch.fx would trace into it
        def forward(self, x):
            return x * x  # no global constant by the rules; registered as 3 below

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.scale = Scale()

        def forward(self, x):
            return self.scale(self.bn(x))

    net = Net().train()
    lipfast.register_lipschitz(Scale, lambda module, shape: 3.0)
    stats = net.bn.running_mean.clone(), net.bn.num_batches_tracked.clone()
    report = lipfast.lipschitz_bound(net, (4,), progress=False)
    assert abs(report.upper - 3.0 / math.sqrt(1 + net.bn.eps)) < 1e-9 and report.method == "fx"  # BN: 1/sqrt(1 + eps)
    assert net.training and net.bn.training  # modes restored
    assert torch.equal(net.bn.running_mean, stats[0]) and torch.equal(net.bn.num_batches_tracked, stats[1])


def test_scaling_rules():
    class Half(nn.Module):
        def forward(self, x):
            return x / 2 + 3 * x

    class Reciprocal(nn.Module):
        def forward(self, x):
            return 1 / x

    assert abs(lipfast.lipschitz_bound(Half(), (4,), progress=False).upper - 3.5) < 1e-12
    report = lipfast.lipschitz_bound(Reciprocal(), (4,), progress=False)
    assert report.upper == math.inf and any("dividing by the input" in note for note in report.notes)


class _Uses(nn.Module):
    """y = W x, then `use(self, y)`: a value passed twice, copied or picked by an index."""

    def __init__(self, use):
        super().__init__()
        self.use = use
        self.lin = nn.Linear(4, 4, bias=False).double()
        self.register_buffer("wide", torch.zeros(1, 3, 4, dtype=torch.float64))
        self.register_buffer("picks", torch.tensor([0, 0, 1]))

    def forward(self, x):
        return self.use(self, self.lin(x))


@pytest.mark.parametrize("use, factor", [
    (lambda m, y: y + y, 2.0),  # one value on both sides of a sum counts twice
    (lambda m, y: torch.cat([y, y], 1), math.sqrt(2)),
    (lambda m, y: torch.sub(1.0, y, alpha=3), 3.0),  # alpha scales the second operand, a constant first
    (lambda m, y: y.unsqueeze(1).expand(-1, 3, -1), math.sqrt(3)),  # every entry copied 3 times
    (lambda m, y: y[:, m.picks], math.sqrt(2)),  # a stored index tensor: its picks counted (one entry twice)
    (lambda m, y: y.unsqueeze(1).expand_as(m.wide), math.sqrt(3)),
    (lambda m, y: y.repeat(1, 2), math.sqrt(2)),
    (lambda m, y: y[:, [0, 0, 1]], math.sqrt(2)),  # entry 0 picked twice: at most sqrt(2)
    (lambda m, y: y[:, [0, -4]], math.sqrt(2)),  # 0 and -4 may name one entry: counted as two
    (lambda m, y: y[:, 1:3], 1.0),
    (lambda m, y: y[:, : y.size(1) // 2], 1.0),  # an int computed in the graph still selects
    (lambda m, y: (y, y), math.sqrt(2)),  # two outputs: their concatenation
    (lambda m, y: -y - y / 4, 1.25),
    (lambda m, y: y.chunk(2, 1)[1], 1.0),  # a piece of a split: a selection
    (lambda m, y: torch.split(y, [1, 3], 1)[1] * 2, 2.0),
    (lambda m, y: torch.stack(y.unbind(1)[:2], 1), 1.0),
    (lambda m, y: torch.tensor_split(y, 3, dim=1)[2], 1.0),
    # the selected column is broadcast over the 2 of the slice: counted twice, sqrt(2); the two are
    # disjoint pieces of y, so they add in quadrature: sqrt(1 + 2), the exact norm
    (lambda m, y: y.narrow(1, 1, 2) + torch.select(y, 1, 0)[:, None], math.sqrt(3)),
    (lambda m, y: y.unflatten(1, (2, 2)).movedim(1, 2).swapaxes(1, 2).flatten(1).t(), 1.0),
], ids=["sum", "cat", "alpha", "expand", "stored-index", "expand_as", "repeat", "list-index", "signed-index", "slice",
        "computed-slice", "two-outputs", "neg", "chunk", "split", "unbind", "tensor_split", "narrow-select",
        "moves"])
def test_values_used_twice_or_copied(use, factor):
    torch.manual_seed(0)
    model = _Uses(use).eval()
    report = lipfast.lipschitz_bound(model, (4,), progress=False)
    x = torch.randn(1, 4, dtype=torch.float64)

    def flat(t):
        out = model(t)
        return torch.cat([o.reshape(-1) for o in out]) if isinstance(out, tuple) else out.reshape(-1)

    exact = float(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(flat, x).reshape(-1, 4), 2))
    layer = report.layers[0]
    assert report.method == "fx"
    assert exact * (1 - 1e-12) <= report.upper <= factor * layer.upper * (1 + 1e-12)
    assert report.upper >= factor * layer.lower * (1 - 1e-12)  # the rule's own factor, not a looser one


@pytest.mark.parametrize("use, reason", [
    (lambda m, y: y[:, y[0].argsort()], "argsort"),  # an index computed from the input
    (lambda m, y: torch.add(y, y, alpha=m.picks[0]), "alpha"),
    (lambda m, y: torch.div(y, 2, rounding_mode="floor"), "rounding_mode"),  # steps
    (lambda m, y: torch.nn.functional.leaky_relu(y, y.shape[1] * 0.5), "could not be applied"),  # a computed slope
], ids=["computed-index", "tensor-alpha", "floor-division", "computed-argument"])
def test_indices_and_factors_that_are_tensors_give_no_finite_bound(use, reason):
    report = lipfast.lipschitz_bound(_Uses(use).eval(), (4,), progress=False)
    assert report.upper == math.inf and any(reason in note for note in report.notes), report.notes


class _Gathers(nn.Module):
    """x.gather(dim, index) or x.index_select(dim, index) with a stored index (x: one example of 2 x 5)."""

    def __init__(self, kind, dim, index):
        super().__init__()
        self.kind, self.dim = kind, dim
        self.register_buffer("index", torch.tensor(index))

    def forward(self, x):
        return getattr(x, self.kind)(self.dim, self.index)


def _in_form(model: nn.Module, example: torch.Tensor, form: str):
    """model as it is ("python"), traced, exported, or exported and decomposed to core ATen."""
    if form == "python":
        return model
    if form == "trace":
        return torch.jit.trace(model, example)
    program = torch.export.export(model, (example,))
    return program.run_decompositions() if form == "core-aten" else program


@pytest.mark.parametrize("form", ["python", "trace", "export"])
@pytest.mark.parametrize("kind, dim, index, copies", [
    ("gather", 2, [[[0, 0, 4], [1, 3, 3]]], 2),  # within each row: 0 twice, 3 twice
    ("gather", 2, [[[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]]], 1),  # a permutation of each row
    ("gather", 1, [[[0, 0, 1, 0, 0], [0, 1, 1, 0, 0]]], 2),  # along the 2 rows: column 0 takes row 0 twice
    ("gather", 2, [[[2, 2, 2, 2], [0, 1, 2, 3]]], 4),
    ("index_select", 2, [1, 1, 1, 4], 3),
    ("index_select", 1, [1, 0], 1),
], ids=["gather-pairs", "gather-permutation", "gather-rows", "gather-four", "index_select-three", "index_select-rows"])
def test_gather_and_index_select_with_stored_indices_count_their_copies(form, kind, dim, index, copies):
    # each output entry is one input entry: the map's norm is sqrt(the most copies of one entry)
    model = _Gathers(kind, dim, index).double().eval()
    example = torch.randn(1, 2, 5, dtype=torch.float64)
    bounded = _in_form(model, example, form)
    report = lipfast.lipschitz_bound(bounded, (2, 5), progress=False)
    J = torch.autograd.functional.jacobian(lambda t: model(t).reshape(-1), example).reshape(-1, 10)
    exact = float(torch.linalg.matrix_norm(J, 2))
    assert abs(exact - math.sqrt(copies)) < 1e-12
    assert math.sqrt(copies) <= report.upper <= math.sqrt(copies) * (1 + 1e-15)


@pytest.mark.parametrize("index, reason", [
    (lambda x: x.argsort(1), "argsort"),  # from the input's entries: picks that jump
    (lambda x: torch.arange(x.size(1)).flip(0)[None], "not a stored constant"),  # computed in the forward
], ids=["from-entries", "computed"])
def test_gather_with_an_index_computed_in_the_forward_has_no_finite_bound(index, reason):
    report = lipfast.lipschitz_bound(_Applies(lambda x: x.gather(1, index(x))), (5,), progress=False)
    assert report.upper == math.inf and any(reason in note for note in report.notes), report.notes


class _Normalized(nn.Module):
    """y = f(x, c) for a stored tensor c: an input normalization ((x - mean) / std), a scale, a broadcast."""

    def __init__(self, fn, shape):
        super().__init__()
        self.fn = fn
        g = torch.Generator().manual_seed(0)
        self.register_buffer("c", torch.rand(shape, generator=g, dtype=torch.float64) * 3 + 0.2)
        self.register_buffer("mean", torch.rand(shape, generator=g, dtype=torch.float64))

    def forward(self, x):
        return self.fn(self, x)


@pytest.mark.parametrize("form", ["python", "trace", "export"])
@pytest.mark.parametrize("fn, c_shape, x_shape", [
    (lambda m, x: (x - m.mean) / m.c, (3, 1, 1), (3, 4, 4)),  # per-channel normalization: 1 / min c
    (lambda m, x: x.sub(m.mean).mul(1 / m.c), (3, 1, 1), (3, 4, 4)),
    (lambda m, x: m.c * x, (3, 4), (3, 4)),  # max |c|
    (lambda m, x: torch.div(x, m.c), (4,), (3, 4)),
    (lambda m, x: x * m.c, (3, 4), (3, 1)),  # x's entries broadcast: each scaled by 4 entries of c
    (lambda m, x: x / m.c, (2, 1, 3), (3,)),  # x repeated over a batch-like dim of 2
    (lambda m, x: x + m.c, (3, 4), (3, 1)),  # broadcast by a sum: sqrt(4) copies of every entry
    (lambda m, x: m.c - x, (2, 3), (3,)),
], ids=["normalize", "normalize-methods", "scale", "divide", "scale-broadcast", "divide-broadcast",
        "add-broadcast", "sub-broadcast"])
def test_scaling_by_stored_tensors_and_broadcasting(fn, c_shape, x_shape, form):
    model = _Normalized(fn, c_shape).eval()
    example = torch.randn(1, *x_shape, dtype=torch.float64)
    bounded = _in_form(model, example, form)
    report = lipfast.lipschitz_bound(bounded, x_shape, progress=False)
    J = torch.autograd.functional.jacobian(lambda t: model(t).reshape(-1), example).reshape(-1, example.numel())
    exact = float(torch.linalg.matrix_norm(J, 2))  # the map is linear (affine): this is its constant
    assert exact * (1 - 1e-12) <= report.upper <= exact * (1 + 1e-12)


class _Multiplies(nn.Module):
    def __init__(self, fn):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fn = fn
        self.W = nn.Parameter(torch.randn(6, 5, generator=g, dtype=torch.float64))
        self.v = nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))

    def forward(self, x):
        return self.fn(self, x)


@pytest.mark.parametrize("form", ["python", "trace", "export"])
@pytest.mark.parametrize("fn, shape", [
    (lambda m, x: x @ m.W, (6,)),
    (lambda m, x: x @ m.W, (3, 6)),  # each row of x times W
    (lambda m, x: m.W @ x, (5, 2)),  # each column
    (lambda m, x: torch.matmul(x, m.W.t()), (5,)),
    (lambda m, x: x.mm(m.W), (6,)),
    (lambda m, x: x @ m.v, (4, 5)),  # a vector: its norm
], ids=["row", "rows", "columns", "transposed", "mm", "vector"])
def test_matrix_products_with_a_stored_matrix(fn, shape, form):
    model = _Multiplies(fn)
    example = torch.randn(1, *shape, dtype=torch.float64)
    bounded = _in_form(model, example, form)
    report = lipfast.lipschitz_bound(bounded, shape, progress=False)
    J = torch.autograd.functional.jacobian(lambda t: model(t).reshape(-1), example).reshape(-1, example.numel())
    exact = float(torch.linalg.matrix_norm(J, 2))  # linear: its norm is ‖W‖ (‖v‖)
    assert exact * (1 - 1e-12) <= report.upper <= exact * (1 + 1e-3), report.notes


def test_products_with_tensors_that_are_not_constants_or_divide_by_zero():
    class ByZero(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.tensor([1.0, 0.0]))

        def forward(self, x):
            return x / self.c

    class ByRandom(nn.Module):
        def forward(self, x):
            return x * torch.rand(2)

    class Quadratic(nn.Module):
        def forward(self, x):
            return x @ x.transpose(-1, -2)

    for model, reason in ((ByZero(), "dividing by 0"), (ByRandom(), "differs between runs"),
                          (Quadratic(), "product of two input-dependent")):
        report = lipfast.lipschitz_bound(model, (2,), progress=False)
        assert report.upper == math.inf and any(reason in note for note in report.notes), report.notes


class _Applies(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_pairwise_maximum_and_minimum():
    # max(a, b) and min(a, b) of same-shape tensors: sqrt(La^2 + Lb^2); GroupSort traced or exported
    # (its max and min of two slices of one input, stacked) gets the module's 1 (_max_min_source);
    # a broadcast input-dependent operand (each entry used many times) has no finite bound here
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), lipfast.nn.GroupSort(2), nn.Linear(6, 3)).eval()
    module_bound = lipfast.lipschitz_bound(model, (4,), progress=False).upper
    x = torch.randn(1, 4)
    for translated in (torch.jit.trace(model, x), torch.export.export(model, (x,))):
        upper = lipfast.lipschitz_bound(translated, (4,), progress=False).upper
        assert module_bound <= upper <= module_bound * (1 + 1e-12), (upper, module_bound)
    upper = lipfast.lipschitz_bound(_Applies(lambda x: torch.maximum(x, torch.zeros(4)) + x.minimum(2 * x)), (4,),
                                    progress=False).upper
    assert math.sqrt(5) + 1 <= upper <= (math.sqrt(5) + 1) * (1 + 1e-12)
    upper = lipfast.lipschitz_bound(_Applies(lambda x: torch.max(x, 2 * x) + x.min(x * 0.5)), (4,), progress=False).upper
    assert math.sqrt(5) + math.sqrt(1.25) <= upper <= (math.sqrt(5) + math.sqrt(1.25)) * (1 + 1e-12)  # max/min of two
    report = lipfast.lipschitz_bound(_Applies(lambda x: torch.maximum(x, x[:, :1])), (4,), progress=False)
    assert report.upper == math.inf and "broadcast" in report.notes[-1]


class _Sorts(nn.Module):
    def __init__(self, kind: int):
        super().__init__()
        self.linear = nn.Linear(6, 6).double()
        self.kind = kind

    def forward(self, x):
        y = self.linear(x)
        if self.kind == 0:
            values, _ = y.sort(dim=1)  # the indices taken and never used
            return values
        if self.kind == 1:
            return torch.sort(y, 1, descending=True).values
        if self.kind == 2:
            return y.topk(3, dim=1)[0] + torch.msort(y)[:, :3]
        if self.kind == 3:
            return y.sort(stable=True, dim=1, descending=True)[0]
        if self.kind == 4:
            return y.gather(1, y.sort(dim=1)[1])
        return torch.sort(y).indices.double()


@pytest.mark.parametrize("kind, factor", [(0, 1), (1, 1), (2, 2), (3, 1), (4, None), (5, None)])
def test_sorted_values_and_their_indices(kind, factor):
    # sorted values (and the top k of them) have constant 1: ‖sort(a) − sort(b)‖ <= ‖a − b‖ per
    # slice; the indices jump, so a network that uses them has no finite bound.  The same for the
    # model traced and exported (aten::sort's two outputs, exported dtype checks left out).
    torch.manual_seed(kind)
    model = _Sorts(kind).eval()
    linear = lipfast.lipschitz_bound(model.linear, (6,), progress=False).upper
    x = torch.randn(1, 6, dtype=torch.float64)
    forms = [model, torch.export.export(model, (x,))] + ([torch.jit.trace(model, x)] if kind != 4 else [])
    for form in forms:
        report = lipfast.lipschitz_bound(form, (6,), progress=False)
        if factor is None:
            assert report.upper == math.inf and "indices" in report.notes[-1], report.notes
        else:
            assert report.upper == factor * linear, (type(form), report.upper, linear)
            assert report.upper >= _max_jacobian_norm(model, (6,)) * (1 - 1e-12)


_MAX_MINS = {  # MaxMin written out: (max(a, b), min(a, b)) of two pieces of one tensor, and pieces that are not disjoint
    "chunks": (lambda y: torch.cat([torch.max(*y.chunk(2, 1)), torch.min(*y.chunk(2, 1))], 1), True),
    "strided": (lambda y: torch.cat([torch.maximum(y[:, ::2], y[:, 1::2]), torch.minimum(y[:, 1::2], y[:, ::2])], 1), True),
    "columns": (lambda y: torch.stack([y[:, 0].max(y[:, 1]), y[:, 0].min(y[:, 1])], 1), True),
    "index lists": (lambda y: torch.cat([torch.maximum(y[:, [0, 2, 4]], y[:, [1, 3, 5]]),
                                         torch.minimum(y[:, [0, 2, 4]], y[:, [1, 3, 5]])], 1), True),
    "overlapping": (lambda y: torch.cat([torch.maximum(y[:, :4], y[:, 2:]), torch.minimum(y[:, :4], y[:, 2:])], 1), False),
    "repeated": (lambda y: torch.cat([torch.maximum(y[:, [0, 0, 4]], y[:, [1, 3, 5]]),
                                      torch.minimum(y[:, [0, 0, 4]], y[:, [1, 3, 5]])], 1), False),
    "with itself": (lambda y: torch.cat([torch.maximum(y, y.flip(1)), torch.minimum(y, y.flip(1))], 1), False),
    "two maxima": (lambda y: torch.cat([torch.maximum(y[:, :3], y[:, 3:]), torch.maximum(y[:, :3], y[:, 3:])], 1), False),
}


@pytest.mark.parametrize("name", list(_MAX_MINS))
def test_max_min_of_disjoint_pieces_has_the_constant_of_their_source(name):
    fn, disjoint = _MAX_MINS[name]
    torch.manual_seed(1)
    linear = nn.Linear(5, 6).double()
    model = nn.Sequential(linear, _Applies(fn)).eval()
    L = lipfast.lipschitz_bound(linear, (5,), progress=False).upper
    upper = lipfast.lipschitz_bound(model, (5,), progress=False).upper
    if disjoint:
        assert upper == L
    else:
        assert upper > 1.4 * L  # each piece counted apart
    assert upper >= _max_jacobian_norm(model, (5,), points=12) * (1 - 1e-12)


def test_max_min_of_a_copy_changed_in_place_has_the_copys_constant():
    # the pieces are of y, a copy of x that an in-place call scaled by 3: MaxMin of them has y's
    # constant 3, not x's 1 (the pieces were followed through the copy to x)
    def scaled_pieces(x):
        y = x.clone()
        y.mul_(3)
        a, b = y.chunk(2, 1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], 1)

    report = lipfast.lipschitz_bound(_Applies(scaled_pieces), (4, 2), progress=False)
    assert report.upper == 3.0, report.notes
    assert _max_jacobian_norm(_Applies(scaled_pieces), (4, 2)) == pytest.approx(3.0, rel=1e-12)


class _SplitBranches(nn.Module):
    """y = join(f(x_a), g(x_b)) with (x_a, x_b) two pieces of x, the branches as ShuffleNetV2's
    (convolutions, a BatchNorm, an in-place ReLU) or the identity."""

    def __init__(self, split, join, identity_first: bool):
        super().__init__()
        torch.manual_seed(3)
        self.split, self.join, self.identity_first = split, join, identity_first
        self.f = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(inplace=True)).double().eval()
        self.g = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 3, padding=1, groups=2)).double().eval()
        with torch.no_grad():
            self.f[1].running_var.uniform_(0.2, 0.5)
            self.g[1].weight.mul_(4)

    def forward(self, x):
        a, b = self.split(x)
        return self.join(a if self.identity_first else self.f(a), self.g(b))


@pytest.mark.parametrize("split, disjoint", [
    (lambda x: x.chunk(2, 1), True), (lambda x: (x[:, ::2], x[:, 1::2]), True),
    (lambda x: torch.split(x.flip(1), [2, 2], 1), True), (lambda x: tuple(x.reshape(1, 2, 2, 5, 5).unbind(1)), True),
    (lambda x: (x[:, :2], x[:, 1:3]), False), (lambda x: (x[:, :2], x[:, :2].flip(1)), False),
    # the second piece has the first added in place (its own constant is then 2)
    (lambda x: (x[:, :2], (x[:, 2:] * 0.5).add_(x[:, :2], alpha=0.5)), False),
], ids=["chunk", "strided", "split-flipped", "unbind", "overlapping", "same-piece", "mixed-in-place"])
@pytest.mark.parametrize("join", ["cat", "add"])
@pytest.mark.parametrize("identity_first", [True, False])
def test_branches_on_disjoint_pieces_of_one_value(split, disjoint, join, identity_first):
    # y = cat(f(x_a), g(x_b)) with disjoint pieces: ‖Δy‖^2 <= L_f^2 ‖Δx_a‖^2 + L_g^2 ‖Δx_b‖^2, so
    # Lip <= max(L_f, L_g) (ShuffleNetV2's blocks, identity_first); f(x_a) + g(x_b): sqrt(L_f^2 + L_g^2)
    joins = {"cat": lambda u, v: torch.cat([u, v], 1), "add": lambda u, v: u + v}
    model = _SplitBranches(split, joins[join], identity_first)
    report = lipfast.lipschitz_bound(model, (4, 5, 5), progress=False)
    layers = {layer.name: layer.upper for layer in report.layers}
    L_f = 1.0 if identity_first else layers["f.0"]
    L_g = layers["g.0"] * layers["g.1"]
    apart = max(L_f, L_g) if join == "cat" else math.hypot(L_f, L_g)
    together = math.hypot(L_f, L_g) if join == "cat" else L_f + L_g
    assert report.upper == pytest.approx(apart if disjoint else together, rel=1e-12), report.notes
    assert _max_jacobian_norm(model, (4, 5, 5)) <= report.upper


def test_layers_called_on_an_input_with_no_batch_dim_get_no_finite_bound():
    # x[:, 0] is (1, H, W): a Conv2d or a pool takes it as one example of 1 channel, which its
    # constant on (channels, H, W) does not cover (a max pool's was 1.73 where 2.45 is attained)
    for layer in (nn.Conv2d(1, 2, 3, padding=1).double(), nn.MaxPool2d(3, 1, 1), nn.LPPool2d(2, 2, 1),
                  lambda t: F.max_pool2d(t, 3, 1, 1), lambda t: F.conv2d(t, torch.ones(2, 1, 3, 3, dtype=t.dtype))):
        model = _Applies(lambda x, layer=layer: layer(x[:, 0]))
        if isinstance(layer, nn.Module):
            model.layer = layer
        report = lipfast.lipschitz_bound(model, (2, 5, 5), progress=False)
        assert report.upper == math.inf and any("no batch dim" in note for note in report.notes), (layer, report.notes)
    # a BatchNorm1d on (N, C) is batched
    mlp = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).double().eval()
    assert math.isfinite(lipfast.lipschitz_bound(mlp, (4,), progress=False).upper)


def _assign_slice(x):  # y' = (3 x_2, 3 x_3, x_2, x_3): exactly sqrt(10)
    y = x * 1.0
    y[:, :2] = 3 * x[:, 2:]
    return y


def _scale_slice(x):  # y[:, :2] *= 3: the view is read (multiplied) before it is written back
    y = x * 1.0
    y[:, :2] *= 3
    return y


def _zero_column(x):  # a constant written in: y's own constant
    y = x * 2.0
    y[:, 0] = 0
    return y


def _assign_in_loop(x):  # traced for the input's shape (a loop over pieces), assignments in the loop
    y = torch.zeros_like(x)
    for i, piece in enumerate(x.chunk(2, 1)):
        y[:, 2 * i : 2 * i + 2] = piece.flip(1) * (i + 1)
    return y


@pytest.mark.parametrize("fn, expected", [(_assign_slice, math.sqrt(10)), (_scale_slice, math.sqrt(10)),
                                          (_zero_column, 2.0), (_assign_in_loop, math.sqrt(5))])
def test_item_assignments(fn, expected):
    # y[index] = value: each entry of y an entry of y or of value (broadcast: c copies), so
    # Lip <= sqrt(L_y^2 + c L_value^2); torch.fx refuses to trace them, lipfast records them
    report = lipfast.lipschitz_bound(_Applies(fn), (4, 3), progress=False)
    assert report.method == "fx" and report.upper == pytest.approx(expected, rel=1e-12), report.notes
    assert _max_jacobian_norm(_Applies(fn), (4, 3)) <= report.upper * (1 + 1e-12)


def _read_after_write(x):
    y = x * 1.0
    v = y[:, :2]
    y[:, :2] = 5 * x[:, 2:]
    return torch.cat([v, y], 1)  # v holds the written values now


def _overlapping_update(x):  # in place, the addition reads entries it has already written
    y = x * 1.0
    y[:, 1:] += y.transpose(1, 2)[:, :2]
    return y


def _listed_index(x):
    y = x * 1.0
    y[:, [0, 0]] = x[:, 1:3]
    return y


@pytest.mark.parametrize("fn, reason", [(_read_after_write, "may share its memory"),
                                        (_overlapping_update, "reads entries it has written"),
                                        (_listed_index, "item assignment at")])
def test_item_assignments_that_get_no_finite_bound(fn, reason):
    report = lipfast.lipschitz_bound(_Applies(fn), (3, 3), progress=False)
    assert report.method == "fx" and report.upper == math.inf, report.notes
    assert any(reason in note for note in report.notes), report.notes


def _weight_added_to(x):
    w = torch.zeros(2, 2, 1, 1, dtype=x.dtype)
    w.add_(x.mean())
    return F.conv2d(x, w)


def _weight_assigned(x):
    w = torch.zeros(2, 2, 1, 1, dtype=x.dtype)
    w[0, 0, 0, 0] = x.mean()
    return F.conv2d(x, w)


def _weight_viewed_then_scaled(x):
    w = torch.ones(2, 2, 1, 1, dtype=x.dtype)
    v = w.view(2, 2, 1, 1)
    w.mul_(x.mean())
    return F.conv2d(x, v)


@pytest.mark.parametrize("fn", [_weight_added_to, _weight_assigned, _weight_viewed_then_scaled])
def test_a_weight_written_in_place_from_the_input_is_no_constant(fn):
    # each conv's weight is a function of x (x times its mean: no global constant); it was taken
    # for a constant, its value on the zero input (a bound of 0)
    report = lipfast.lipschitz_bound(_Applies(fn), (2, 3, 3), progress=False)
    assert report.upper == math.inf, report.notes


def test_maxima_and_minima_along_dims():
    # max/min of each slice (amax, amin, max and min along a dim or of everything): 1; their indices: none
    for fn in (lambda y: y.amax(dim=(2, 3)), lambda y: torch.amin(y, 1), lambda y: torch.max(y, 1)[0],
               lambda y: y.min(dim=1, keepdim=True).values, lambda y: y.max()[None]):
        report = lipfast.lipschitz_bound(_Applies(fn), (3, 4, 4), progress=False)
        assert report.upper == 1.0, report.notes
    report = lipfast.lipschitz_bound(_Applies(lambda y: y.max(dim=1).indices.double()), (3, 4, 4), progress=False)
    assert report.upper == math.inf and "indices" in report.notes[-1]


def test_composition_rounds_up():
    # 0.1 x + 0.7 x has constant 0.1 + 0.7 of the two doubles, exactly 0.79999999999999996..., whose
    # nearest double 0.7999999999999999 is below it: the composition rounds each result up instead.
    # Exact results stay exact: sqrt(2^2) for one branch of a concatenation, 3 * (1/3) rounded up.
    from fractions import Fraction

    upper = lipfast.lipschitz_bound(_Applies(lambda x: 0.1 * x + 0.7 * x), (3,), progress=False).upper
    assert Fraction(upper) >= Fraction(0.1) + Fraction(0.7) and upper == 0.8  # 0.1 + 0.7 == 0.7999999999999999
    upper = lipfast.lipschitz_bound(_Applies(lambda x: torch.cat([x * 2.0])), (3,), progress=False).upper
    assert upper == 2.0
    third = lipfast.lipschitz_bound(_Applies(lambda x: (x / 3.0) * 3.0), (3,), progress=False).upper
    assert third >= 1.0 and Fraction(third) >= Fraction(1) / 3 * 3
    # three copies of x: sqrt(3) rounded up, where the nearest double is below it
    copies = lipfast.lipschitz_bound(_Applies(lambda x: torch.cat([x, x, x])), (3,), progress=False).upper
    assert Fraction(copies) ** 2 >= 3 and Fraction(math.nextafter(copies, 0)) ** 2 < 3


@pytest.mark.parametrize("fn, module", [
    (torch.nn.functional.gelu, nn.GELU()),
    (lambda x: torch.nn.functional.gelu(x, approximate="tanh"), nn.GELU(approximate="tanh")),
    (torch.nn.functional.silu, nn.SiLU()),
    (lambda x: torch.nn.functional.elu(x, 1.5), nn.ELU(alpha=1.5)),
    (torch.nn.functional.softplus, nn.Softplus()),
    (lambda x: torch.nn.functional.softplus(x, beta=5.0), nn.Softplus(beta=5.0)),
    (torch.nn.functional.mish, nn.Mish()),
    (torch.nn.functional.selu, nn.SELU()),
    (lambda x: torch.nn.functional.celu(x, 0.5), nn.CELU(0.5)),
    (torch.nn.functional.softsign, nn.Softsign()),
    (torch.nn.functional.logsigmoid, nn.LogSigmoid()),
    (torch.nn.functional.tanhshrink, nn.Tanhshrink()),
    (lambda x: torch.nn.functional.softshrink(x, 0.3), nn.Softshrink(0.3)),
], ids=["gelu", "gelu-tanh", "silu", "elu", "softplus", "softplus-beta", "mish", "selu", "celu", "softsign",
        "logsigmoid", "tanhshrink", "softshrink"])
def test_functional_activations_get_their_modules_constants(fn, module):
    functional = lipfast.lipschitz_bound(_Applies(fn), (3,), progress=False)
    assert functional.notes == [] and functional.upper == lipfast.lipschitz_bound(module, (3,), progress=False).upper
    # and the constant holds: no difference quotient above it (but for the rounding of x - 0.3 in softshrink)
    x = torch.linspace(-6, 6, 20001, dtype=torch.float64)
    y = fn(x)
    assert float(((y[1:] - y[:-1]) / (x[1:] - x[:-1])).abs().max()) <= functional.upper * (1 + 1e-12)


@pytest.mark.parametrize("fn, module, shape", [
    (lambda x: torch.nn.functional.pad(x, (1, 2, 1, 0), "replicate"), nn.ReplicationPad2d((1, 2, 1, 0)), (2, 3, 3)),
    (lambda x: torch.nn.functional.pad(x, (2, 2), "circular"), nn.CircularPad1d(2), (2, 3)),
    (lambda x: torch.nn.functional.pad(x, (2, 1), value=3.0), nn.ConstantPad1d((2, 1), 3.0), (2, 4)),
], ids=["replicate", "circular", "constant"])
def test_functional_pads_get_their_modules_constants(fn, module, shape):
    functional = lipfast.lipschitz_bound(_Applies(fn), shape, progress=False)
    assert functional.notes == [] and functional.upper == lipfast.lipschitz_bound(module, shape, progress=False).upper
    x = torch.randn(1, *shape, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda t: fn(t).reshape(-1), x).reshape(-1, x.numel())
    assert float(torch.linalg.matrix_norm(J, 2)) <= functional.upper


def test_abs_and_negative_elu():
    assert lipfast.lipschitz_bound(_Applies(torch.abs), (3,), progress=False).upper == 1.0
    assert lipfast.lipschitz_bound(_Applies(lambda x: x.abs()), (3,), progress=False).upper == 1.0
    # alpha < 0: the slope below 0 is alpha e^x, up to |alpha| in size
    assert lipfast.lipschitz_bound(nn.ELU(alpha=-2.0), (3,), progress=False).upper == 2.0
    assert lipfast.lipschitz_bound(_Applies(lambda x: torch.nn.functional.elu(x, -2.0)), (3,), progress=False).upper == 2.0


class _TwoSizes(nn.Module):
    """One conv called on a 2x2 corner of the input, then on the whole 8x8 input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False).double()

    def forward(self, x):
        return torch.cat([self.conv(x[:, :, :2, :2]).flatten(1), self.conv(x).flatten(1)], 1)


def test_a_layer_called_on_two_input_sizes_is_bounded_on_each():
    torch.manual_seed(1)
    model = _TwoSizes().eval()
    report = lipfast.lipschitz_bound(model, (2, 8, 8), progress=False)
    assert [(layer.name, layer.input_shape) for layer in report.layers] == [("conv", (2, 2, 2)), ("conv", (2, 8, 8))]
    small, large = report.layers
    assert small.upper < large.upper  # the norm grows with the input: the first call's would not do
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda t: model(t).flatten(), x).reshape(-1, x.numel())
    assert report.upper >= float(torch.linalg.matrix_norm(J, 2))
    assert abs(report.upper - math.sqrt(2) * large.upper) <= 1e-12 * report.upper  # each call: the larger constant


class _Branchy(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it), and one layer applied twice."""

    def __init__(self, W):
        super().__init__()
        self.lin = _linear(W)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.lin(self.act(self.lin(x)))


def test_untraceable_model_falls_back_to_a_chain_of_every_call():
    W = with_singular_values(3, 3, torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64), seed=0)
    report = lipfast.lipschitz_bound(_Branchy(W).double(), (3,), progress=False)
    assert report.method == "hooks" and any("could not trace" in note for note in report.notes)
    assert [layer.name for layer in report.layers] == ["lin", "act"]
    assert 9.0 <= report.upper <= 9.0 * (1 + 1e-3) ** 2  # the layer counts once per call: 3 * 1 * 3
    # on the zero input nothing came between the layers, but that is one path: this model jumps where
    # x.sum() crosses 0 (lin(relu(lin(x))) against lin(relu(lin(-x)))), so 9 bounds nothing
    assert any("formed a chain" in note and "NOT CERTIFIED" in note for note in report.notes)
    model = _Branchy(W).double()
    x = torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)  # sum 0: lin(relu(lin(x)))
    y = x + 1e-9  # sum > 0: lin(relu(lin(-y)))
    assert float((model(x) - model(y)).norm()) > 1e6 * float((x - y).norm())  # a jump: no constant at all
    with pytest.raises(ValueError, match="NOT CERTIFIED"):  # and no certified accuracy rests on it
        lipfast.certified_accuracy(model, torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.int64), 0.1)

    class Skip(_Branchy):
        def forward(self, x):
            if x.sum() > 0:
                x = -x
            return self.lin(self.act(self.lin(x))) + x  # a skip outside the modules: the chain misses it

    report = lipfast.lipschitz_bound(Skip(W).double(), (3,), progress=False)
    assert report.method == "hooks" and any("NOT CERTIFIED" in note for note in report.notes)


class _UpTo(nn.Module):
    """A transposed conv called with output_size, which picks output_padding = 1 at call time."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, bias=False).double()

    def forward(self, x):
        return self.up(x, output_size=(8, 8))


def test_transposed_conv_is_bounded_with_the_output_padding_of_its_call():
    torch.manual_seed(0)
    model = _UpTo().eval()
    with torch.no_grad():
        model.up.weight.uniform_(0, 1)
    report = lipfast.lipschitz_bound(model, (2, 4, 4), progress=False)
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda t: model(t).flatten(), x).reshape(-1, x.numel())
    exact = float(torch.linalg.matrix_norm(J, 2))
    assert report.layers[0].output_shape == (2, 8, 8) and model.up.output_padding == (0, 0)  # the module untouched
    assert exact <= report.upper <= exact * (1 + 1e-3)
    # the module's own output_padding (0) gives a smaller operator, whose bound is below the truth
    assert float(lipfast.operator_norm_bounds(model.up, (4, 4))[1]) < exact


@pytest.mark.parametrize("module", [
    nn.Upsample(scale_factor=2), nn.Upsample(scale_factor=(2, 3), mode="bilinear"),
    nn.Upsample(size=(7, 5), mode="bilinear", align_corners=True), nn.UpsamplingNearest2d(scale_factor=3),
    nn.ReflectionPad2d(2), nn.ReplicationPad2d((1, 0, 2, 1)), nn.CircularPad2d(1), nn.ZeroPad2d(2),
    nn.ConstantPad2d(-1, 3.0), nn.PixelShuffle(2), nn.PixelUnshuffle(2), nn.ChannelShuffle(2),
    nn.AvgPool2d(2, divisor_override=-3), nn.Unfold(2), nn.Unfold((3, 2), dilation=(1, 2), padding=1, stride=(2, 1)),
], ids=lambda m: type(m).__name__)
def test_linear_resampling_and_padding_layers(module):
    shape = (4, 4, 6)
    report = lipfast.lipschitz_bound(nn.Sequential(module), shape, progress=False)
    x = torch.zeros(1, *shape, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda t: module(t).flatten(), x).reshape(-1, x.numel())
    exact = float(torch.linalg.matrix_norm(J, 2))
    layer = report.layers[0]
    assert layer.lower <= exact * (1 + 1e-9) and exact <= report.upper
    if not isinstance(module, nn.Upsample) or module.mode == "nearest":
        assert report.upper <= exact * (1 + 1e-9)  # copies and permutations: sqrt of the largest count, exact


@pytest.mark.parametrize("use, factor", [  # of the 4 outputs: the mean's norm is ‖W‖ / 2 at most, the sum's 2 ‖W‖
    (lambda m, y: y.mean(), 0.5), (lambda m, y: y.mean(dim=1, keepdim=True), 0.5),
    (lambda m, y: torch.mean(y, (0, 1)), 0.5), (lambda m, y: y.sum(1), 2.0), (lambda m, y: torch.sum(y), 2.0),
    (lambda m, y: torch.sum(input=y, dim=1), 2.0),
], ids=["mean", "mean-dim", "torch-mean", "sum-dim", "torch-sum", "keyword-input"])
def test_means_and_sums(use, factor):
    torch.manual_seed(0)
    model = _Uses(use).eval()
    report = lipfast.lipschitz_bound(model, (4,), progress=False)
    x = torch.randn(1, 4, dtype=torch.float64)
    exact = float(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(
        lambda t: model(t).reshape(-1), x).reshape(-1, 4), 2))
    assert report.notes == [] and exact * (1 - 1e-12) <= report.upper
    assert report.upper <= factor * report.layers[0].upper * (1 + 1e-12)


@pytest.mark.parametrize("use", [lambda m, y: y.sum(-1), lambda m, y: y.sum(), lambda m, y: y.mean(-1, keepdim=True)],
                         ids=["sum-dim", "sum", "mean-dim"])
def test_sums_and_means_traced_and_exported(use):
    # aten's sum and mean carry the dtype positionally (torch's take it by keyword): one bound in every form
    torch.manual_seed(0)
    model = _Uses(use).eval()
    bound = lipfast.lipschitz_bound(model, (4,), progress=False).upper
    example = torch.randn(1, 4, dtype=torch.float64)
    for made in (torch.jit.trace(model, example), torch.export.export(model, (example,))):
        assert lipfast.lipschitz_bound(made, (4,), progress=False).upper == bound


def test_a_sum_in_an_integer_type_has_no_constant():
    # the entries are rounded to whole numbers first: the sum jumps (its bound was that of a float sum)
    report = lipfast.lipschitz_bound(_Uses(lambda m, y: y.sum(-1, dtype=torch.long).double()), (4,), progress=False)
    assert report.upper == math.inf and any("whole numbers" in note for note in report.notes)


@pytest.mark.parametrize("use, factor", [
    (lambda x: x / x.size(-1), 1 / 4), (lambda x: x * x.shape[-1] ** -0.5, 1 / 2),
    (lambda x: x.sum(-1) / x.size(-1), 1 / 2), (lambda x: x / x.size()[1], 1 / 3),
    (lambda x: x / (x.size(1) * x.size(2) - 2), 1 / 10), (lambda x: x * x.dim(), 3.0),
    (lambda x: x / x.size(0), math.inf), (lambda x: x / x.numel(), math.inf),  # the batch's size: not one example's map
], ids=["div-size", "pow-size", "mean-written-out", "size-list", "arithmetic", "dim", "batch", "numel"])
def test_scaling_by_numbers_computed_from_sizes(use, factor):
    # the sizes of an example's dims are fixed by the input shape (as branches on them are), so a
    # number computed from them scales as a constant; one that involves the batch's size does not
    model = _Applies(use)
    example = torch.randn(1, 3, 4, dtype=torch.float64)
    for made in (model, torch.jit.trace(model, example), torch.export.export(model, (example,))):
        report = lipfast.lipschitz_bound(made, (3, 4), progress=False)
        if factor == math.inf:
            assert report.upper == math.inf
            break  # (traced, the batch's size is a constant of the trace)
        assert report.upper == pytest.approx(factor, rel=1e-15) and report.upper >= factor
    J = torch.autograd.functional.jacobian(lambda t: use(t).reshape(-1), example).reshape(-1, example.numel())
    assert float(torch.linalg.matrix_norm(J, 2)) <= report.upper * (1 + 1e-12)


class _Masked(nn.Module):
    def __init__(self, use):
        super().__init__()
        self.use, self.lin = use, nn.Linear(4, 4).double()
        self.register_buffer("mask", torch.tensor([True, False, True, False]))
        self.register_buffer("b", torch.randn(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))

    def forward(self, x):
        return self.use(self, x)


@pytest.mark.parametrize("use, bound", [
    (lambda m, x: torch.where(m.mask, x, m.b), 1.0),  # x's entries where the mask is set, constants elsewhere
    # one value along both: each entry of x scaled by 1 or 2 (the map's exact norm, where each entry
    # taken from one operand or the other gives sqrt(1 + 2^2))
    (lambda m, x: torch.where(m.mask, x, 2 * x), 2.0),
    (lambda m, x: x.where(m.mask, 3 * x), 3.0),
    (lambda m, x: torch.masked_fill(3 * x, m.mask, 1.0), 3.0),
    # a (4, 4) result: x[:, :1] broadcast to 16 entries, x to 4 rows, but the mask's 2 set rows take
    # x[:, :1] 8 times and its 2 clear rows each entry of x twice: sqrt(8 + 2), not sqrt(16 + 4)
    (lambda m, x: torch.where(m.mask.reshape(4, 1), x[:, :1], x), math.sqrt(10)),
    (lambda m, x: torch.where(x > 0, x, 0.5 * x), math.inf),  # a condition on the input: jumps in general
], ids=["constant", "two-operands", "method", "masked-fill", "broadcast", "input-condition"])
def test_selection_by_a_constant_mask(use, bound):
    model = _Masked(use)
    example = torch.randn(1, 4, dtype=torch.float64)
    for made in (model, torch.jit.trace(model, example), torch.export.export(model, (example,))):
        assert lipfast.lipschitz_bound(made, (4,), progress=False).upper == pytest.approx(bound, rel=1e-15)
    if math.isfinite(bound):
        J = torch.autograd.functional.jacobian(lambda t: use(model, t).reshape(-1), example).reshape(-1, 4)
        assert float(torch.linalg.matrix_norm(J, 2)) <= bound * (1 + 1e-12)


class _Pyramid(nn.Module):
    """A feature pyramid's top-down step: the coarse map resized to the fine one's size, read from it."""

    def __init__(self, use):
        super().__init__()
        torch.manual_seed(0)
        self.fine, self.coarse, self.lateral = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 1)
        self.use = use

    def forward(self, x):
        a = self.fine(x)
        return self.use(self, a, self.coarse(a))


@pytest.mark.parametrize("use", [
    lambda m, a, b: m.lateral(a) + F.interpolate(b, size=a.shape[-2:], mode="nearest"),
    lambda m, a, b: m.lateral(a) + F.interpolate(b, size=(a.size(2), a.size(3)), mode="bilinear"),
    lambda m, a, b: F.pad(b, (0, a.size(-1) - b.size(-1), 0, a.size(-2) - b.size(-2)), mode="replicate"),
], ids=["nearest-to-shape", "bilinear-to-sizes", "pad-to-sizes"])
def test_resampling_to_sizes_read_from_the_graph(use):
    # arguments computed from an example's sizes are numbers for the input shape: bounded as given
    model = _Pyramid(use).eval()
    report = lipfast.lipschitz_bound(model, (3, 6, 6), progress=False)
    assert math.isfinite(report.upper) and report.notes == []
    example = torch.randn(1, 3, 6, 6)
    for made in (torch.jit.trace(model, example), torch.export.export(model, (example,))):
        assert lipfast.lipschitz_bound(made, (3, 6, 6), progress=False).upper == pytest.approx(report.upper, rel=1e-6)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    double = copy.deepcopy(model).double()
    J = torch.autograd.functional.jacobian(lambda t: double(t).reshape(-1), x).reshape(-1, x.numel())
    assert float(torch.linalg.matrix_norm(J, 2)) <= report.upper


@pytest.mark.parametrize("use, shape, bound", [
    (lambda x: (3 * x).relu_(), (4,), 3.0),  # in place: the rule of the method it does in place
    (lambda x: (2 * x).mul_(3), (4,), 6.0),
    (lambda x: (2 * x).clamp_(-1, 1), (4,), 2.0),
    (lambda x: x.clamp_min(0.0) * 2, (4,), 2.0),
    (lambda x: torch.clamp_max(x, 1.0), (4,), 1.0),
    (lambda x: x + torch.zeros_like(x), (4,), 1.0),  # made in x's shape: constants
    (lambda x: x * torch.full_like(x, 3.0), (4,), 3.0),
    (lambda x: torch.cat([x, x.new_zeros(x.size(0), 2)], 1), (4,), 1.0),
    (lambda x: 2 * F.pixel_shuffle(x, 2), (4, 2, 2), 2.0),  # a permutation
    (lambda x: F.channel_shuffle(x, 2), (4, 2, 2), 1.0),
], ids=["relu_", "mul_", "clamp_", "clamp_min", "clamp_max", "zeros_like", "full_like", "new_zeros", "pixel_shuffle",
        "channel_shuffle"])
def test_in_place_methods_clamps_and_tensors_made_in_a_shape(use, shape, bound):
    report = lipfast.lipschitz_bound(_Applies(use), shape, progress=False)
    assert report.upper == bound and report.notes == []
    x = torch.randn(1, *shape, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda t: use(t.clone()).reshape(-1), x).reshape(-1, x.numel())
    assert float(torch.linalg.matrix_norm(J, 2)) <= bound * (1 + 1e-12)


class _GlobalPool(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1).double()
        self.fn = fn

    def forward(self, x):
        return self.fn(self.conv(x))


@pytest.mark.parametrize("fn, factor", [  # factor: the pool's exact constant, where it is simple
    (lambda y: y.mean((2, 3)), 1 / 6), (lambda y: torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1), 1 / 6),
    (lambda y: torch.nn.functional.avg_pool2d(y, 3, stride=1), None),
    (lambda y: torch.nn.functional.interpolate(y, scale_factor=2), 2.0),
    (lambda y: torch.nn.functional.interpolate(y, size=(5, 7), mode="bilinear"), None),
    (lambda y: torch.nn.functional.max_pool2d(y, 3, 1, 1), 3.0),  # up to 9 windows hold one entry
    (lambda y: torch.nn.functional.max_pool2d(y, 2, ceil_mode=True), 1.0),
    (lambda y: torch.nn.functional.adaptive_max_pool2d(y, (4, 5)), 2.0),  # 2 windows per dim
    (lambda y: torch.nn.functional.unfold(y, 3, padding=1), 3.0),  # up to 9 blocks hold one entry
    (lambda y: torch.nn.functional.fold(y.flatten(2)[:, :, :12], (4, 5), (1, 3)), 3**0.5),  # summed back: 3 blocks
    (lambda y: torch.nn.functional.max_pool2d(y, 2, return_indices=True)[0], 1.0),  # the values only
], ids=["mean", "adaptive", "avg-overlapping", "nearest", "bilinear", "max-overlapping", "max-ceil", "adaptive-max",
        "unfold", "fold", "max-values"])
def test_functional_pools_match_their_modules(fn, factor):
    torch.manual_seed(0)
    model = _GlobalPool(fn).eval()
    report = lipfast.lipschitz_bound(model, (2, 6, 6), progress=False)
    x = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda t: model(t).flatten(), x).reshape(-1, x.numel())
    assert report.notes == [] and float(torch.linalg.matrix_norm(J, 2)) <= report.upper
    if factor is not None:
        assert report.upper <= factor * report.layers[0].upper * (1 + 1e-9)
    # bicubic weights take both signs: bounded as a product over the dims (test_linear_resampling_...)
    bicubic = _GlobalPool(lambda y: torch.nn.functional.interpolate(y, scale_factor=2, mode="bicubic"))
    report = lipfast.lipschitz_bound(bicubic, (2, 6, 6), progress=False)
    J = torch.autograd.functional.jacobian(lambda t: bicubic(t).flatten(), x).reshape(-1, x.numel())
    assert report.notes == [] and float(torch.linalg.matrix_norm(J, 2)) <= report.upper < math.inf


def test_fold_sums_overlapping_blocks_back():
    # the adjoint of unfold: sqrt(the largest number of blocks holding one output entry), exactly
    module = nn.Fold((4, 5), (2, 3))  # (2 * 2 * 3, 3 * 3) in, 2 channels out
    report = lipfast.lipschitz_bound(nn.Sequential(module), (12, 9), progress=False)
    x = torch.zeros(1, 12, 9, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda t: module(t).flatten(), x).reshape(-1, x.numel())
    exact = float(torch.linalg.matrix_norm(J, 2))
    assert exact == pytest.approx(math.sqrt(6), rel=1e-12) and exact <= report.upper <= exact * (1 + 1e-9)
    # traced and exported, unfold and fold are aten's im2col and col2im: the same bounds
    model = _Applies(lambda x: F.fold(F.unfold(x, 2, padding=1), (4, 5), 2, padding=1))
    bound = lipfast.lipschitz_bound(model, (2, 4, 5), progress=False).upper
    assert bound == pytest.approx(4.0, rel=1e-9)  # sqrt(4 copies), twice
    example = torch.randn(1, 2, 4, 5)
    for made in (torch.jit.trace(model, example), torch.export.export(model, (example,))):
        assert lipfast.lipschitz_bound(made, (2, 4, 5), progress=False).upper == bound


@pytest.mark.parametrize("module, shape, exact", [
    (nn.LPPool2d(2, 2), (2, 4, 6), 1.0),  # disjoint windows: each a 2-norm
    (nn.LPPool2d(2, 2, ceil_mode=True), (2, 5, 5), 2.0),  # the corner window holds 1 of 4 entries: 2 |x|
    (nn.LPPool1d(4, 3, stride=1), (2, 7), None),  # 3 windows hold an entry: sqrt(3)
    (nn.LPPool2d(2, 3, stride=1), (1, 5, 5), None),
    (nn.LPPool1d(1, 2), (2, 6), math.sqrt(2)),  # linear: sums of 2
    (nn.LPPool2d(math.inf, 2), (2, 4, 4), 1.0),  # a max pool of |x|
    (nn.FractionalMaxPool2d(2, output_size=3), (2, 5, 5), None),
    (nn.FeatureAlphaDropout(0.3), (3, 4), 1.0),
], ids=["lp2", "lp2-ceil", "lp4-overlapping", "lp2-overlapping", "lp1", "lp-inf", "fractional", "feature-alpha-dropout"])
def test_more_pooling_layers_are_bounded(module, shape, exact):
    report = lipfast.lipschitz_bound(nn.Sequential(module), shape, progress=False)
    assert report.notes == [] and math.isfinite(report.upper)
    if isinstance(module, (nn.LPPool1d, nn.LPPool2d)):  # traced and exported: aten's pow, avg_pool, ... pow
        example = torch.randn(1, *shape)
        for made in (torch.jit.trace(nn.Sequential(module), example), torch.export.export(nn.Sequential(module), (example,))):
            assert lipfast.lipschitz_bound(made, shape, progress=False).upper == report.upper
    if exact is not None:
        assert report.upper == pytest.approx(exact, rel=1e-9)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # never below a Jacobian's norm (at points with no zero window)
        x = (torch.rand(1, *shape, generator=g, dtype=torch.float64) + 0.5) * torch.where(
            torch.rand(1, *shape, generator=g) < 0.5, -1.0, 1.0).double()
        J = torch.autograd.functional.jacobian(lambda t: module(t).flatten(), x).reshape(-1, x.numel())
        assert float(torch.linalg.matrix_norm(J, 2)) <= report.upper * (1 + 1e-12)


@pytest.mark.parametrize("p", [3, 1.5, -2])
def test_lp_pools_without_a_constant(p):
    report = lipfast.lipschitz_bound(nn.Sequential(nn.LPPool1d(p, 2)), (2, 6), progress=False)
    assert report.upper == math.inf and "no Lipschitz constant" in report.layers[0].note
    example = torch.rand(1, 2, 6) + 0.5  # (pow of a negative entry: nan, which the translation check refuses)
    for made in (torch.jit.trace(nn.Sequential(nn.LPPool1d(p, 2)), example),
                 torch.export.export(nn.Sequential(nn.LPPool1d(p, 2)), (example,))):
        report = lipfast.lipschitz_bound(made, (2, 6), progress=False)
        assert report.upper == math.inf and "no Lipschitz constant" in " ".join(report.notes)


class _PoolIndices(nn.Module):
    def __init__(self, use, pool):
        super().__init__()
        self.pool, self.unpool, self.use = pool, nn.MaxUnpool2d(2), use

    def forward(self, x):
        return self.use(self, x)


@pytest.mark.parametrize("use, pool, exportable", [
    (lambda m, x: m.pool(x)[1].double(), nn.MaxPool2d(2, return_indices=True), True),
    (lambda m, x: m.pool(x)[1] * 1.0, nn.AdaptiveMaxPool2d(2, return_indices=True), True),
    # SegNet's decoder (torch.export cannot take MaxUnpool: it checks the indices' values)
    (lambda m, x: m.unpool(m.pool(x)[0], m.pool(x)[1]), nn.MaxPool2d(2, return_indices=True), False),
    (lambda m, x: F.max_pool2d(x, 2, return_indices=True)[1].double(), None, True),
    (lambda m, x: m.pool(x)[0] + m.pool(x)[1].double(), nn.FractionalMaxPool2d(2, output_size=2, return_indices=True),
     False),
], ids=["max-pool", "adaptive", "unpool", "functional", "fractional"])
def test_the_indices_a_pool_returns_have_no_constant(use, pool, exportable):
    # argmax positions: piecewise constant with jumps, so no Lipschitz constant (a bound of 1 or sqrt(m)
    # for them, as for the values, would be below the truth); the values alone keep theirs
    model = _PoolIndices(use, pool).double()
    report = lipfast.lipschitz_bound(model, (2, 4, 4), progress=False)
    assert report.upper == math.inf and any("indices" in note and "jump" in note for note in report.notes), report.notes
    example = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    if exportable:  # the traced and exported forms too, where aten's pools return (values, indices)
        for made in (torch.jit.trace(model, example), torch.export.export(model, (example,))):
            assert lipfast.lipschitz_bound(made, (2, 4, 4), progress=False).upper == math.inf
    if pool is None:
        return
    values_only = _PoolIndices(lambda m, x: m.pool(x)[0], pool).double()
    values = lipfast.lipschitz_bound(values_only, (2, 4, 4), progress=False)
    assert values.upper in (1.0, 2.0) and values.notes == []
    if not isinstance(pool, nn.FractionalMaxPool2d):  # (its draws differ between runs: no trace is checked equal)
        for made in (torch.jit.trace(values_only, example), torch.export.export(values_only, (example,))):
            assert lipfast.lipschitz_bound(made, (2, 4, 4), progress=False).upper == values.upper


@pytest.mark.parametrize("use, bound", [
    (lambda x: x.to(torch.long).double(), math.inf),
    (lambda x: x.to(dtype=torch.int32) * 1.0, math.inf),
    (lambda x: x.type("torch.LongTensor").double(), math.inf),
    (lambda x: x.type_as(torch.zeros(1, dtype=torch.int64)).double(), math.inf),
    (lambda x: x.to(torch.bool).double(), math.inf),
    (lambda x: 2 * x.to(torch.float32).double(), 2.0),
    (lambda x: 2 * x.type_as(x), 2.0),
    (lambda x: 2 * x.to("cpu"), 2.0),
    (lambda x: 2 * x.half().double(), 2.0),
], ids=["to-long", "to-int32", "type-name", "type-as-long", "to-bool", "to-float", "type-as-self", "to-device", "half"])
def test_conversions_to_whole_numbers_have_no_constant(use, bound):
    # truncating to an integer type jumps at every whole number; a conversion between floating types
    # is the identity in exact arithmetic (the rules' model), as float() and double() are; the same
    # in the traced and exported forms (aten::to, aten::_to_copy)
    model = _Applies(use)
    example = torch.randn(1, 4, dtype=torch.float64)
    for made in (model, torch.jit.trace(model, example), torch.export.export(model, (example,))):
        report = lipfast.lipschitz_bound(made, (4,), progress=False)
        assert report.upper == bound
        if bound == math.inf:
            assert any("rounds to whole numbers" in note for note in report.notes), report.notes


class _InPlace(nn.Module):
    def __init__(self, use):
        super().__init__()
        self.lin = nn.Linear(4, 4).double()
        self.act = nn.LeakyReLU(3.0, inplace=True)
        self.use = use

    def forward(self, x):
        return self.use(self, self.lin(x))


@pytest.mark.parametrize("use", [
    lambda m, y: m.act(y) + y,  # y itself now holds act(y): the output is 2 act(y)
    lambda m, y: torch.nn.functional.leaky_relu(y, 3.0, True) + y,
    lambda m, y: torch.nn.functional.elu(y, alpha=3.0, inplace=True) + y,
], ids=["module", "function", "keyword"])
def test_in_place_activations_overwrite_their_input(use):
    torch.manual_seed(0)
    model = _InPlace(use).eval()
    report = lipfast.lipschitz_bound(model, (4,), progress=False)
    with torch.no_grad():
        model.lin.bias.fill_(-1e-9)  # at x = 0 every output just below 0: slope 3 (the bias changes no constant)
    x = torch.zeros(1, 4, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda t: model(t).reshape(-1), x).reshape(-1, 4)
    exact = float(torch.linalg.matrix_norm(J, 2))
    assert exact > 5.9 * report.layers[0].upper  # 2 x 3 x ‖W‖: above the 3 + 1 of reading y as untouched
    assert report.upper >= exact


@pytest.mark.parametrize("module, exact", [
    (nn.Hardswish(), 1.5), (nn.Hardsigmoid(), 1 / 6), (nn.SELU(), 1.0507009873554805 * 1.6732632423543772),
    (nn.CELU(2.0), 1.0), (nn.Mish(), 1.0884), (nn.Softsign(), 1.0), (nn.LogSigmoid(), 1.0), (nn.Tanhshrink(), 1.0),
    (nn.Softshrink(0.5), 1.0), (nn.Softmax(dim=1), 0.5), (nn.Softmin(dim=1), 0.5), (nn.RReLU(0.1, 0.3).eval(), 1.0),
    (nn.RReLU(-2.0, -1.0).eval(), 2.0),  # its eval slope is -1.5; 2 covers every draw of training mode
], ids=lambda v: type(v).__name__ + (str(v.lower) if isinstance(v, nn.RReLU) else "") if isinstance(v, nn.Module) else "")
def test_more_activations(module, exact):
    report = lipfast.lipschitz_bound(nn.Sequential(module), (6,), progress=False)
    assert report.notes == [] and exact * (1 - 1e-4) <= report.upper <= exact * (1 + 1e-4)
    # no difference quotient along a line exceeds it (softmax: along a random direction)
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(6, generator=g, dtype=torch.float64)
    direction /= direction.norm()
    t = torch.linspace(-8, 8, 40001, dtype=torch.float64)
    y = module(t[:, None] * direction)
    quotient = (y[1:] - y[:-1]).norm(dim=1) / (t[1:] - t[:-1])
    assert float(quotient.max()) <= report.upper * (1 + 1e-9)


@pytest.mark.parametrize("form", ["module", "F", "torch", "method", "script", "trace", "export"])
@pytest.mark.parametrize("dim, n", [(1, 3), (-1, 5), (2, 5)])
def test_log_softmax_has_constant_sqrt_n(form, dim, n):
    # its Jacobian I - 1 pᵀ has norm sqrt(n ‖p‖²): sqrt(n) in the limit p -> a corner, n the size along dim
    forms = {"module": nn.LogSoftmax(dim), "F": _Applies(lambda x: F.log_softmax(x, dim=dim)),
             "torch": _Applies(lambda x: torch.log_softmax(x, dim)), "method": _Applies(lambda x: x.log_softmax(dim))}
    example = torch.randn(1, 3, 5)
    model = {"script": lambda: torch.jit.script(nn.LogSoftmax(dim)),
             "trace": lambda: torch.jit.trace(nn.LogSoftmax(dim), example),
             "export": lambda: torch.export.export(nn.LogSoftmax(dim), (example,))}.get(form, lambda: forms[form])()
    report = lipfast.lipschitz_bound(model, (3, 5), progress=False)
    assert (form not in forms or report.notes == []) and math.sqrt(n) <= report.upper <= math.sqrt(n) * (1 + 1e-15)
    x = torch.zeros(1, 3, 5, dtype=torch.float64)
    x.select(dim, 0).fill_(40.0)  # softmax at a corner along dim: the Jacobian's norm is sqrt(n) to 1e-15
    J = torch.autograd.functional.jacobian(lambda t: torch.log_softmax(t, dim).reshape(-1), x).reshape(15, 15)
    # (the float64 SVD of J is itself off by a few units in the last place: on an AVX-512 Xeon with
    # MKL, 1.7320508075688776 for n = 3, two above sqrt(3), whose rounded-up bound is one above)
    assert math.sqrt(n) * (1 - 1e-9) <= float(torch.linalg.matrix_norm(J, 2)) <= report.upper * (1 + 15 * 2.0**-52)


def test_softmax_over_channels_and_softmin():
    for model in (nn.Softmax2d(), _Applies(lambda x: F.softmin(x, dim=1))):
        report = lipfast.lipschitz_bound(model, (3, 2, 2), progress=False)
        assert report.notes == [] and report.upper == 0.5
        # the largest Jacobian norm, near a point where two channels share the mass: 1/2
        x = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
        x[:, :2] = 30.0 if isinstance(model, nn.Softmax2d) else -30.0  # (softmin: the smallest take the mass)
        J = torch.autograd.functional.jacobian(lambda t: model(t).reshape(-1), x).reshape(12, 12)
        assert 0.5 * (1 - 1e-9) <= float(torch.linalg.matrix_norm(J, 2)) <= 0.5


def test_softmax_along_one_entry_batch_dim_and_implicit_dim():
    assert lipfast.lipschitz_bound(nn.LogSoftmax(1), (1, 4), progress=False).upper == 0.0  # the constant 0
    implicit = lipfast.lipschitz_bound(nn.LogSoftmax(), (7,), progress=False).upper  # torch's choice: dim 1
    assert math.sqrt(7) <= implicit <= math.sqrt(7) * (1 + 1e-15)
    report = lipfast.lipschitz_bound(nn.LogSoftmax(0), (7,), progress=False)
    assert report.upper == math.inf and any("batch dim" in note for note in report.notes), report.notes
    assert lipfast.lipschitz_bound(_Applies(lambda x: x.softmax(-1)), (7,), progress=False).upper == 0.5


@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_with_running_statistics_is_affine_and_without_has_no_constant(affine):
    norm = nn.InstanceNorm2d(3, affine=affine, track_running_stats=True).eval()
    with torch.no_grad():
        norm.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        norm.running_var.copy_(torch.tensor([0.25, 4.0, 0.01]))
        if affine:
            norm.weight.copy_(torch.tensor([1.0, -3.0, 0.05]))
    report = lipfast.lipschitz_bound(norm, (3, 2, 2), progress=False)
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda t: norm.double()(t).reshape(-1), x).reshape(12, 12)
    exact = float(torch.linalg.matrix_norm(J, 2))  # eval mode: a diagonal map, its norm the largest scale
    assert report.notes == [] and exact <= report.upper <= exact * (1 + 1e-9)
    report = lipfast.lipschitz_bound(nn.InstanceNorm2d(3, affine=affine), (3, 2, 2), progress=False)
    assert report.upper == math.inf and any("InstanceNorm" in note for note in report.notes), report.notes


@pytest.mark.parametrize("model, reason", [
    (nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), "Transformer"),
    (nn.RMSNorm(8), "RMSNorm"),
    (_Applies(lambda x: F.layer_norm(x, (8,))), "layer_norm divides"),
    (_Applies(lambda x: F.normalize(x, dim=-1)), "normalize divides"),
    (_Applies(lambda x: F.scaled_dot_product_attention(x, x, x)), "attention"),
    (_Applies(lambda x: F.instance_norm(x)), "instance_norm"),
    (nn.GLU(), "GLU multiplies"), (_Applies(lambda x: F.glu(x)), "glu multiplies"),
], ids=["transformer", "rmsnorm", "layer_norm", "normalize", "attention", "instance_norm", "GLU", "glu"])
def test_layers_with_no_global_constant_name_their_reason(model, reason):
    report = lipfast.lipschitz_bound(model.eval(), (4, 8), progress=False)
    assert report.upper == math.inf and any(reason in note for note in report.notes), report.notes


@pytest.mark.parametrize("form", ["python", "trace", "export"])
@pytest.mark.parametrize("fn, module, scale", [
    (lambda x: x * torch.sigmoid(x), nn.SiLU(), 1.0),  # Swish
    (lambda x: x.sigmoid().mul(x), nn.SiLU(), 1.0),
    (lambda x: x * torch.sigmoid(1.702 * x), nn.SiLU(), 1.0),  # QuickGELU: the slope of silu at any scale
    (lambda x: -x * torch.sigmoid(x / -4), nn.SiLU(), 1.0),
    (lambda x: x * F.relu6(x + 3.0) / 6.0, nn.Hardswish(), 1.0),
    (lambda x: x * F.relu6(x + 3.0, inplace=True) / 6.0, nn.Hardswish(), 1.0),  # in place on x + 3 only
    (lambda x: x * (F.hardtanh(x + 3, 0.0, 6.0) / 6), nn.Hardswish(), 1.0),
    (lambda x: 2 * x * F.hardsigmoid(x), nn.Hardswish(), 2.0),
    (lambda x: x * torch.tanh(F.softplus(x)), nn.Mish(), 1.0),
    (lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))), nn.GELU(), 1.0),  # BERT's gelu
    (lambda x: 0.5 * x * (torch.erf(x * 0.7071067811865476) + 1), nn.GELU(), 1.0),
    (lambda x: x * F.relu6(2 * x - 1), None, 13.0),  # slope 2u + 1 on 0 < u = 2x - 1 < 6: up to 13
], ids=["swish", "swish-method", "quickgelu", "swish-negative", "hardswish", "hardswish-in-place",
        "hardswish-hardtanh", "hardsigmoid", "mish", "gelu-erf", "gelu-erf-reversed", "relu6-shifted"])
def test_self_gated_activations_written_out_get_their_constant(fn, module, scale, form):
    model = _Applies(fn).double()
    example = torch.randn(1, 5, dtype=torch.float64)
    bounded = {"python": lambda: model, "trace": lambda: torch.jit.trace(model, example.clone()),
               "export": lambda: torch.export.export(model, (example.clone(),))}[form]()
    report = lipfast.lipschitz_bound(bounded, (5,), progress=False)
    exact = scale * (lipfast.lipschitz_bound(module, (5,), progress=False).upper if module is not None else 1.0)
    assert exact <= report.upper <= exact * (1 + 1e-12), report.notes
    t = torch.linspace(-12, 12, 480001, dtype=torch.float64)
    y = fn(t.clone()[:, None])[:, 0]
    quotients = (y[1:] - y[:-1]) / (t[1:] - t[:-1])
    assert report.upper * (1 - 1e-4) <= float(quotients.abs().max()) <= report.upper


@pytest.mark.parametrize("fn", [
    lambda x: x * x, lambda x: x * F.relu(x), lambda x: x * torch.sigmoid(x + 1),
    lambda x: x * torch.sigmoid(x.flip(-1)), lambda x: x * torch.erf(x), lambda x: x * torch.tanh(x),
    lambda x: x * F.relu6(x, inplace=True),  # x itself changed in place: x is then relu6(x)
    lambda x: x * torch.tanh(F.softplus(x, beta=2.0)),
], ids=["square", "x-relu", "shifted-sigmoid", "other-source", "x-erf", "x-tanh", "in-place-on-x", "softplus-beta"])
def test_products_outside_the_self_gated_forms_get_no_finite_bound(fn):
    report = lipfast.lipschitz_bound(_Applies(fn), (5,), progress=False)
    assert report.upper == math.inf and any("product of two" in note for note in report.notes), report.notes


def _gate_changed(x):  # x * sigmoid(x), its gate scaled in place: 5 x sigmoid(x), slope 5.5
    s = torch.sigmoid(x)
    s.mul_(5)
    return x * s


def _copy_shifted(x):  # y = x, sigmoid(y), then y shifted in place: (x + 10) sigmoid(x), slope 3 at 0
    y = x * 1.0
    s = torch.sigmoid(y)
    y.add_(10)
    return y * s


def _erf_changed(x):  # GELU written out, its erf scaled in place: slope 3 at 0
    t = torch.erf(x / 2**0.5)
    t.mul_(4)
    return x * 0.5 * (1 + t)


def _softplus_changed(x):  # Mish written out, its softplus scaled in place
    sp = F.softplus(x)
    sp.mul_(5)
    return x * torch.tanh(sp)


def _denominator_changed(x):  # softsign written out, its denominator scaled in place: x / (0.01 |x| + 0.01), slope 100
    d = x.abs() + 1
    d.mul_(0.01)
    return x / d


def _magnitude_changed(x):  # softsign written out, |x| scaled in place: x / (0.1 |x| + 1)
    a = x.abs()
    a.mul_(0.1)
    return x / (a + 1)


@pytest.mark.parametrize("fn", [_gate_changed, _copy_shifted, _erf_changed, _softplus_changed, _denominator_changed,
                                _magnitude_changed])
def test_gated_and_softsign_forms_changed_in_place_on_the_way_get_no_finite_bound(fn):
    # each reads a value that an in-place call changed after the form's other side read it: not the
    # activation it looks like (these got SiLU's, GELU's, Mish's or softsign's constant, some far
    # below their slopes)
    report = lipfast.lipschitz_bound(_Applies(fn), (5,), progress=False)
    assert report.upper == math.inf, report.notes
    assert lipfast.lipschitz_bound(_Applies(lambda x: x * torch.sigmoid(x)), (5,), progress=False).upper < 1.1


def test_a_gate_module_changed_in_place_gets_no_finite_bound():
    class Gated(nn.Module):
        def __init__(self, scale: float | None):
            super().__init__()
            self.gate, self.scale = nn.Sigmoid(), scale

        def forward(self, x):
            g = self.gate(x)
            if self.scale is not None:
                g.mul_(self.scale)
            return x * g

    assert lipfast.lipschitz_bound(Gated(5.0), (5,), progress=False).upper == math.inf
    assert lipfast.lipschitz_bound(Gated(None), (5,), progress=False).upper < 1.1


@pytest.mark.parametrize("form", ["python", "trace", "export"])
@pytest.mark.parametrize("fn, exact", [
    (lambda x: x.flip(-1) + torch.roll(x, 2, 1), 2.0), (lambda x: torch.rot90(x, 1, (1, 2)), 1.0),
    (lambda x: torch.erf(x) + x.erfc(), 4 / math.sqrt(math.pi)),
    (lambda x: x.clamp(0, 1) + torch.clamp(x, min=-1) + torch.clip(x, max=0.5), 3.0),
    (lambda x: torch.sin(x) + x.cos() + torch.atan(x) + torch.asinh(x), 4.0),
], ids=["flip-roll", "rot90", "erf", "clamp", "sin-cos"])
def test_permutations_clamps_and_smooth_functions(fn, exact, form):
    model = _Applies(fn)
    example = torch.randn(1, 3, 3)
    bounded = _in_form(model, example, form)
    report = lipfast.lipschitz_bound(bounded, (3, 3), progress=False)
    assert (form != "python" or report.notes == []) and exact <= report.upper <= exact * (1 + 1e-14), report.notes


def _jacobian_norm_of(fn, shape: tuple[int, ...], seed: int) -> float:
    x = torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    J = torch.autograd.functional.jacobian(lambda t: fn(t).reshape(-1), x).reshape(-1, x.numel())
    return float(torch.linalg.matrix_norm(J, 2))


@pytest.mark.parametrize("form", ["python", "trace", "export"])
@pytest.mark.parametrize("fn, linear", [
    (lambda x: x.cumsum(2), True), (lambda x: torch.cumsum(x, 1) * 2, True),
    (lambda x: torch.diff(x, dim=2), True), (lambda x: x.diff(dim=1, prepend=torch.zeros(1, 2, 4)), False),
    (lambda x: torch.diff(x, n=2, dim=-1), False),
    (lambda x: torch.tril(x, 1) + x.triu(), True), (lambda x: torch.diag_embed(x).sum(1), True),
    (lambda x: x.diagonal(0, 1, 2) * 3, True), (lambda x: torch.diag(x[0, :, 1]), True),
    (lambda x: torch.repeat_interleave(x, 3, dim=2), True), (lambda x: x.repeat_interleave(2), True),
    (lambda x: x.norm(dim=1), False), (lambda x: torch.linalg.vector_norm(x, ord=1, dim=2), False),
    (lambda x: torch.norm(x, p=float("inf"), dim=(1, 2)), False), (lambda x: torch.linalg.norm(x, dim=1), False),
    (lambda x: x.median(1).values + torch.median(x), False), (lambda x: x.kthvalue(2, 2)[0], False),
    (lambda x: torch.logsumexp(x, dim=(1, 2)), False),
], ids=["cumsum", "cumsum-scaled", "diff", "diff-prepend", "diff-twice", "tril-triu", "diag-embed", "diagonal",
        "diag", "repeat-interleave", "repeat-interleave-flat", "norm", "norm-1", "norm-inf", "linalg-norm",
        "median", "kthvalue", "logsumexp"])
def test_cumulative_sums_differences_masks_norms_and_order_statistics(fn, linear, form):
    # each rule against the Jacobian's norm (its SVD's rounding allowed for): for the linear maps that
    # is their exact norm, which the rules give (up to their rounding margin); for the rest (and a
    # difference of part of a longer signal) the bound is never below it
    model = _Applies(fn)
    example = torch.randn(1, 3, 4)
    bounded = _in_form(model, example, form)
    report = lipfast.lipschitz_bound(bounded, (3, 4), progress=False)
    assert math.isfinite(report.upper), report.notes
    attained = max(_jacobian_norm_of(fn, (3, 4), seed) for seed in range(4))
    assert attained <= report.upper * (1 + 1e-14)
    if linear:
        assert report.upper <= attained * (1 + 1e-10)


def test_the_constants_of_norms_and_order_statistics():
    # ‖·‖_2 and ‖·‖_inf of slices: 1; ‖·‖_1 of slices of m entries: sqrt(m), attained wherever no
    # entry is 0 (its gradient is the signs); median and kthvalue: 1 (a selection, where no two tie)
    cases = [(lambda x: x.norm(dim=2), 1.0), (lambda x: torch.norm(x, p=1, dim=2), 2.0),
             (lambda x: torch.linalg.vector_norm(x, ord=1.5, dim=(1, 2)), 12 ** (1 / 1.5 - 0.5)),
             (lambda x: x.median(2).values, 1.0), (lambda x: torch.linalg.vector_norm(x, ord=-math.inf, dim=1), 1.0)]
    for fn, constant in cases:
        report = lipfast.lipschitz_bound(_Applies(fn), (3, 4), progress=False)
        assert constant <= report.upper <= constant * (1 + 1e-11), report.notes
    assert _jacobian_norm_of(cases[1][0], (3, 4), 0) == pytest.approx(2.0, rel=1e-12)


@pytest.mark.parametrize("fn, reason", [
    (lambda x: x.repeat_interleave(torch.tensor([1, 3, 1, 2]), dim=2), "a tensor of them"),
    (lambda x: torch.linalg.norm(x, ord=2, dim=(1, 2)), "a matrix norm"),
    (lambda x: torch.norm(x, p=0.5, dim=1), "below p = 1"),
    (lambda x: x.cumsum(1, dtype=torch.int64).double(), "whole numbers"),
    (lambda x: torch.median(x, 1).indices.double(), "indices"),
    (lambda x: torch.diff(x, dim=1, append=x[:, :1]), "append that depends on the input"),
], ids=["repeat-interleave-tensor", "spectral-norm", "p-below-1", "integer-cumsum", "median-indices", "diff-append"])
def test_cumulative_sums_norms_and_order_statistics_that_have_no_constant(fn, reason):
    report = lipfast.lipschitz_bound(_Applies(fn), (3, 4), progress=False)
    assert report.upper == math.inf and any(reason in note for note in report.notes), report.notes


def test_clamp_to_bounds_that_depend_on_the_input_has_no_finite_bound():
    report = lipfast.lipschitz_bound(_Applies(lambda x: x.clamp(max=x.mean())), (3,), progress=False)
    assert report.upper == math.inf and any("bounds that depend on the input" in note for note in report.notes)


def test_prelu_and_jumps():
    prelu = nn.PReLU(3, init=0.25)
    with torch.no_grad():
        prelu.weight[1] = -2.5
    assert lipfast.lipschitz_bound(nn.Sequential(prelu), (3, 4), progress=False).upper == 2.5
    for module in (nn.Hardshrink(0.5), nn.Threshold(0.1, 20.0), nn.CELU(-1.0)):
        report = lipfast.lipschitz_bound(nn.Sequential(module), (3,), progress=False)
        assert report.upper == math.inf and report.notes, module
    assert lipfast.lipschitz_bound(nn.Sequential(nn.Threshold(0.1, 0.1)), (3,), progress=False).upper == 1.0


class _Threshold(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return F.threshold(x, 0.2, self.value)


class _RReLU(nn.Module):
    def forward(self, x):
        return F.rrelu(x, -2.0, -1.0)


class _ScaledSoftsign(nn.Module):
    def forward(self, x):
        return 2 * x / (3 * x.abs() + 0.5)  # slope 2 * 0.5 / (3 |x| + 0.5)^2: 4 at 0


class _NearestExact(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=1.5, mode="nearest-exact")


class _LPPool(nn.Module):
    def forward(self, x):
        return F.lp_pool2d(x, 2, 3, stride=1)


@pytest.mark.parametrize("layer, exact", [
    (nn.Threshold(0.1, 0.1), 1.0), (_Threshold(0.2), 1.0), (nn.RReLU(0.1, 0.3).eval(), 1.0), (_RReLU(), 2.0),
    (nn.Softsign(), 1.0), (_ScaledSoftsign(), 4.0), (nn.Upsample(scale_factor=1.5, mode="nearest-exact"), None),
    (_NearestExact(), None), (_LPPool(), None),
], ids=["Threshold", "threshold", "RReLU", "rrelu", "Softsign", "scaled-softsign", "Upsample-nearest-exact",
        "interpolate-nearest-exact", "lp_pool2d"])
def test_activations_and_resampling_in_every_form(layer, exact):
    # the Python model, and its traced, scripted and exported forms (aten::threshold, aten::rrelu,
    # softsign as x / (|x| + 1), aten::_upsample_nearest_exact2d, F.lp_pool2d as pow, avg_pool2d,
    # sign, relu, abs, mul, pow): one bound, never below a Jacobian
    shape = (2, 4, 4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), layer).double().eval()
    example = torch.randn(1, *shape, dtype=torch.float64)
    forms = [model, torch.jit.trace(model, example), torch.export.export(model, (example,)), torch.jit.script(model)]
    bounds = [lipfast.lipschitz_bound(made, shape, progress=False).upper for made in forms]
    conv = lipfast.lipschitz_bound(model[0], shape, progress=False).upper
    assert math.isfinite(bounds[0]) and bounds == [bounds[0]] * len(forms)
    if exact is not None:
        assert bounds[0] == pytest.approx(exact * conv, rel=1e-12)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(1, *shape, generator=g, dtype=torch.float64) * 0.3
        J = torch.autograd.functional.jacobian(lambda t: model(t).flatten(), x).reshape(-1, x.numel())
        assert float(torch.linalg.matrix_norm(J, 2)) <= bounds[0] * (1 + 1e-12)


@pytest.mark.parametrize("layer", [nn.Threshold(0.1, 20.0), _Threshold(0.0)], ids=["Threshold", "threshold"])
def test_threshold_jumps_in_every_form(layer):
    model = nn.Sequential(nn.Linear(3, 3), layer).eval()
    example = torch.randn(1, 3)
    for made in (model, torch.jit.trace(model, example), torch.jit.script(model),
                 torch.export.export(model, (example,))):
        report = lipfast.lipschitz_bound(made, (3,), progress=False)
        assert report.upper == math.inf and any("jump" in note for note in report.notes), made


def test_quotients_that_are_not_softsign_have_no_constant():
    for fn in (lambda x: x / (x.abs() - 1),  # a pole at |x| = 1
               lambda x: x / (-2 * x.abs() + 3),  # a pole at |x| = 1.5
               lambda x: x / (x.abs() + 1 + x)):  # not |x| + c
        report = lipfast.lipschitz_bound(_Applies(fn), (3,), progress=False)
        assert report.upper == math.inf and "dividing by the input" in " ".join(report.notes)


class _InitOnlyLinear(nn.Linear):
    """A user's nn.Linear with its own initialization: it computes what nn.Linear computes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        nn.init.orthogonal_(self.weight)


class _InitOnlyConv(nn.Conv2d):
    scale = 2.0  # a plain class attribute changes nothing


class _DoubledConv(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):  # not what nn.Conv2d computes: traced into, not trusted
        return super()._conv_forward(x, 2 * weight, bias)


def test_subclasses_of_torch_layers():
    torch.manual_seed(0)
    model = nn.Sequential(_InitOnlyLinear(5, 5).double(), nn.ReLU(), _InitOnlyLinear(5, 3).double())
    report = lipfast.lipschitz_bound(model, (5,), progress=False)
    assert [layer.kind for layer in report.layers] == ["_InitOnlyLinear", "ReLU", "_InitOnlyLinear"]
    assert abs(report.upper - 1.0) < 1e-5  # orthogonal rows and columns: norm 1 each
    conv = _InitOnlyConv(2, 3, 3, padding=1).double()
    report = lipfast.lipschitz_bound(conv, (2, 5, 5), progress=False)
    assert report.layers[0].kind == "_InitOnlyConv"
    assert report.upper == float(lipfast.operator_norm_bounds(nn.Sequential(conv)[0], (5, 5))[1])
    doubled = _DoubledConv(2, 3, 3, padding=1).double()
    report = lipfast.lipschitz_bound(nn.Sequential(doubled), (2, 5, 5), progress=False)
    assert [layer.kind for layer in report.layers] == ["F.conv2d"]  # traced into, its computed weight bounded
    plain = nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    with torch.no_grad():
        plain.weight.copy_(2 * doubled.weight)
    assert report.upper == float(lipfast.operator_norm_bounds(plain, (5, 5))[1])


class _Functional(nn.Module):
    """A custom module applying its stored weights through torch.nn.functional."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.kernel = nn.Parameter(torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64))
        self.register_buffer("up", torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64))
        self.weight = nn.Parameter(torch.randn(6, 2, generator=g, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(6, dtype=torch.float64))

    def forward(self, x):
        y = torch.nn.functional.conv2d(x, self.kernel, padding=1)
        z = torch.nn.functional.conv_transpose2d(y, self.up, stride=2, padding=1, output_padding=1)
        return torch.nn.functional.linear(z.mean((2, 3)), self.weight, bias=self.bias)


def test_functional_layers_with_stored_weights():
    model = _Functional()
    report = lipfast.lipschitz_bound(model, (2, 5, 5), progress=False)
    kinds = {layer.kind: layer for layer in report.layers}
    assert list(kinds) == ["F.conv2d", "F.conv_transpose2d", "F.linear"]
    x = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda t: model(t).flatten(), x).reshape(-1, x.numel())
    assert float(torch.linalg.matrix_norm(J, 2)) <= report.upper
    # each layer as the module form bounds it, on the sizes the calls saw; the mean over 10 x 10: 1/10
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    up = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(model.kernel)
        up.weight.copy_(model.up)
    assert kinds["F.conv2d"].upper == float(lipfast.operator_norm_bounds(conv, (5, 5))[1])
    assert kinds["F.conv_transpose2d"].upper == float(lipfast.operator_norm_bounds(up, (5, 5))[1])
    assert kinds["F.conv_transpose2d"].input_shape == (3, 5, 5) and kinds["F.conv_transpose2d"].output_shape == (2, 10, 10)
    expected = kinds["F.conv2d"].upper * kinds["F.conv_transpose2d"].upper / 10 * kinds["F.linear"].upper
    assert abs(report.upper - expected) <= 1e-12 * expected


@pytest.mark.parametrize("progress", [True, False])
def test_functional_layers_progress_bar(monkeypatch, progress):
    # the functional layers get a progress bar of their own, as the modules do (the Linear is in
    # the dense layers' one batched call, before the bar), and only when asked
    shown = []

    def recording(items, desc, unit):
        items = list(items)
        shown.append((desc, len(items)))
        return items

    monkeypatch.setattr(network._util, "progress", recording)
    model = nn.Sequential(nn.Linear(4, 2 * 5 * 5).double(), nn.Unflatten(1, (2, 5, 5)), _Functional())
    report = lipfast.lipschitz_bound(model, (4,), progress=progress)
    assert [layer.kind for layer in report.layers] == ["Linear", "Unflatten", "F.conv2d", "F.conv_transpose2d", "F.linear"]
    assert shown == ([("lipfast: layer bounds", 1), ("lipfast: functional layer bounds", 3)] if progress else [])
    shown.clear()  # no module to bound: no empty bar for them
    lipfast.lipschitz_bound(_Functional(), (2, 5, 5), progress=progress)
    assert shown == ([("lipfast: functional layer bounds", 3)] if progress else [])


def test_functional_layers_with_computed_weights():
    class Scaled(_Functional):  # a weight computed from parameters: bounded from its value
        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.kernel / self.kernel.norm(), padding=1)

    class Dropped(_Functional):  # a random weight: one draw bounds nothing
        def forward(self, x):
            keep = torch.rand(self.kernel.shape, dtype=self.kernel.dtype) > 0.5
            return torch.nn.functional.conv2d(x, self.kernel * keep, padding=1)

    class Steered(_Functional):  # a weight that depends on the input: no constant
        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.kernel * x.mean(), padding=1)

    model = Scaled()
    report = lipfast.lipschitz_bound(model, (2, 5, 5), progress=False)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(model.kernel / model.kernel.norm())
    assert report.upper == float(lipfast.operator_norm_bounds(conv, (5, 5))[1])
    for model, reason in ((Dropped(), "differed"), (Steered(), "weight that depends on the input")):
        report = lipfast.lipschitz_bound(model, (2, 5, 5), progress=False)
        assert report.upper == math.inf and any(reason in note for note in report.notes), report.notes


def test_a_parametrized_subclass_with_its_own_forward_is_traced_into():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    layer = torch.nn.utils.parametrizations.spectral_norm(Doubled(4, 4).double())
    report = lipfast.lipschitz_bound(layer, (4,), progress=False)
    x = torch.randn(1, 4, dtype=torch.float64)
    exact = float(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(layer.eval(), x).reshape(4, 4), 2))
    assert report.upper == math.inf or report.upper >= exact  # never its Linear's constant alone
    plain = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(4, 4).double())  # still a layer
    assert [layer.kind for layer in lipfast.lipschitz_bound(plain, (4,), progress=False).layers] == ["ParametrizedLinear"]


def test_tensor_attributes():
    class Shaped(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6).double()

        def forward(self, x):
            y = self.lin(x.reshape(x.shape[0], -1))[:, : x.shape[1] * 3]
            return y.T

    model = Shaped()
    report = lipfast.lipschitz_bound(model, (2, 3), progress=False)
    assert report.notes == [] and report.upper == report.layers[0].upper  # a slice and a transpose: 1


_ACTIVATIONS = [nn.ReLU, lambda: nn.ReLU(inplace=True), lambda: nn.LeakyReLU(2.5, inplace=True), lambda: nn.ELU(1.7),
                nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.SELU, lambda: nn.PReLU(init=-1.3), nn.Sigmoid]


class _RandomBlock(nn.Module):
    """One of ten small blocks mixing the composition rules: skips, reuse, in-place activations,
    concatenation and slices, functional convs and pools, means expanded back, copies."""

    def __init__(self, c: int, kind: int, rng: "random.Random"):
        super().__init__()
        self.kind = kind
        mode = rng.choice(["zeros", "circular", "reflect", "replicate"])
        self.conv = nn.Conv2d(c, c, 3, padding=1, padding_mode=mode).double()
        self.conv2 = nn.Conv2d(c, c, rng.choice([1, 3]), padding="same", groups=rng.choice([1, c])).double()
        self.bn = nn.BatchNorm2d(c).double()
        with torch.no_grad():
            self.bn.running_var.uniform_(0.2, 2)
            self.bn.weight.uniform_(-2, 2)
        self.act = _ACTIVATIONS[rng.randrange(len(_ACTIVATIONS))]().double()
        self.act2 = _ACTIVATIONS[rng.randrange(len(_ACTIVATIONS))]().double()
        self.w = nn.Parameter(0.3 * torch.randn(c, c, 3, 3, dtype=torch.float64))

    def forward(self, x):
        F = torch.nn.functional
        k = self.kind
        if k == 0:
            return x + self.bn(self.conv(self.act(x)))
        if k == 1:
            y = self.act(self.conv(x))
            return y + y * 0.5 - x
        if k == 2:
            return torch.cat([self.conv(x), self.act(x)], 1)[:, : x.shape[1]] + self.conv2(x)
        if k == 3:
            y = self.conv(x)
            return self.act(y) + self.act2(y)
        if k == 4:
            return F.conv2d(self.act(x), self.w, padding=1) + self.conv(x).mean((2, 3), keepdim=True).expand_as(x)
        if k == 5:
            y = self.conv(x)
            self.act(y)  # in place or not: y may now hold act(y)
            return y + x
        if k == 6:
            return self.conv2(self.conv2(x)) + F.avg_pool2d(x, 3, 1, 1)
        if k == 7:
            return F.interpolate(F.max_pool2d(x, 2), scale_factor=2) + self.act(self.conv(x))
        if k == 8:
            return self.conv(x)[:, :, :, [0, 1, 1, 2, 3, 3]][:, :, :, :4] * 2
        return self.act(x)


@pytest.mark.parametrize("seed", range(12))
def test_random_networks_are_never_bounded_below_their_jacobians(seed):
    model, c = random_network(_RandomBlock, 10, seed)
    report = lipfast.lipschitz_bound(model, (c, 4, 4), progress=False)
    assert math.isfinite(report.upper), report.notes
    f = lambda z: model(z.clone()).flatten()  # noqa: E731
    for t in range(8):
        x = torch.randn(1, c, 4, 4, dtype=torch.float64) * (3 if t % 2 else 0.3)
        try:
            J = torch.autograd.functional.jacobian(f, x).reshape(-1, x.numel())
            assert float(torch.linalg.matrix_norm(J, 2)) <= report.upper * (1 + 1e-9)
        except RuntimeError:  # autograd cannot follow some in-place patterns: difference quotients instead
            with torch.no_grad():
                for v in torch.randn(32, *x.shape, dtype=torch.float64):
                    v /= v.norm()
                    assert float((f(x + 1e-3 * v) - f(x)).norm()) / 1e-3 <= report.upper * (1 + 1e-9)


def test_in_place_raise_after_a_possible_view_gives_no_finite_bound():
    class Viewed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4).double()
            self.act = nn.LeakyReLU(3.0, inplace=True)

        def forward(self, x):
            y = self.lin(x)
            v = y.view(-1, 4)  # shares y's storage: act below changes it too
            self.act(y)
            return v

    class SliceOf(Viewed):
        def forward(self, x):
            y = self.lin(x)
            self.act(y[:, :2])  # part of y is overwritten: y changes too, and a slice is not followed
            return y

    for model in (Viewed(), SliceOf()):
        report = lipfast.lipschitz_bound(model, (4,), progress=False)
        assert report.upper == math.inf and any("in-place" in note for note in report.notes), report.notes


class _NormAct(nn.Module):
    """timm's BatchNormAct2d: a BatchNorm, then an Identity (its drop), then an in-place activation
    on the Identity's output, which is the BatchNorm's: written in place through the Identity."""

    def __init__(self, channels: int, act: nn.Module):
        super().__init__()
        self.bn, self.drop, self.act = nn.BatchNorm2d(channels), nn.Identity(), act

    def forward(self, x):
        return self.act(self.drop(self.bn(x)))


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _NormAct(4, nn.SiLU(inplace=True))),
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _NormAct(4, nn.LeakyReLU(3.0, inplace=True)), nn.Flatten(),
                          nn.Dropout(), nn.Hardswish(inplace=True)),
    lambda: _InPlaceThroughViews(),
], ids=["norm-act", "norm-act-flatten-dropout", "views"])
def test_in_place_call_through_whole_views_raises_their_sources(make):
    # the values a view holds all of are overwritten with it: their bounds are raised, and the
    # network's bound is the one of the same network computed out of place
    torch.manual_seed(0)
    model = make().double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 2.0)
            m.running_var.uniform_(0.5, 2.0)
    report = lipfast.lipschitz_bound(model, (3, 5, 5), progress=False)
    assert math.isfinite(report.upper) and report.notes == [], report.notes
    out_of_place = copy.deepcopy(model)
    for m in out_of_place.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    out_of_place.in_place = False
    assert report.upper == lipfast.lipschitz_bound(out_of_place, (3, 5, 5), progress=False).upper
    for _ in range(4):  # (autograd cannot follow some of the in-place forms: the same function out of place)
        x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
        assert torch.equal(model(x), out_of_place(x))
        J = torch.autograd.functional.jacobian(lambda t: out_of_place(t).flatten(), x).reshape(-1, x.numel())
        assert float(torch.linalg.matrix_norm(J, 2)) <= report.upper * (1 + 1e-9)


class _InPlaceThroughViews(nn.Module):
    """A conv whose output is overwritten through a reshape of it, and then a permutation of that."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.in_place = True

    def forward(self, x):
        y = self.conv(x)
        if self.in_place:
            y.view(y.shape[0], -1).mul_(3.0)
            y.permute(0, 2, 3, 1).tanh_()
            return y
        return torch.tanh(3.0 * y)


def test_a_forward_set_on_the_instance_is_the_one_bounded():
    # torch.fx traces a module's class's forward, but a call runs the one set on the instance
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).double().eval()
    model.forward = lambda x: 10 * model[2](model[1](model[0](x)))
    report = lipfast.lipschitz_bound(model, (4,), progress=False)
    # (the two layers and the ReLU are one chain, bounded as one map: the note that says so is the only one)
    assert report.method == "fx" and "forward" in vars(model)
    assert len(report.notes) == 1 and "0 .. 2: bounded as one map" in report.notes[0]
    plain = lipfast.lipschitz_bound(nn.Sequential(*model), (4,), progress=False).upper  # the class's forward
    assert report.upper == pytest.approx(10 * plain, rel=1e-12) and report.upper >= _jacobian_norm(model, (4,))
    # a torch.nn layer with a method of its own is not that layer: followed through its forward
    layer = nn.Linear(4, 4).double()
    layer.forward = lambda x: 10 * F.linear(x, layer.weight, layer.bias)
    report = lipfast.lipschitz_bound(nn.Sequential(layer, nn.Tanh()), (4,), progress=False)
    exact = 10 * float(torch.linalg.matrix_norm(layer.weight, 2))
    assert exact <= report.upper <= exact * (1 + 2e-3)
    two = nn.Identity()
    two.forward = lambda x, y: x + y
    with pytest.raises(ValueError, match="forward set on the model takes 2 inputs"):
        network._with_own_forward(two)


def test_forward_hooks_that_may_change_a_layer_give_no_finite_bound():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    handle = model[2].register_forward_hook(lambda module, args, out: 10 * out)  # the network is now 10x
    report = lipfast.lipschitz_bound(model, (4,), progress=False)
    assert report.upper == math.inf and any("forward hooks" in note for note in report.notes)
    handle.remove()
    assert math.isfinite(lipfast.lipschitz_bound(model, (4,), progress=False).upper)
    # hooks that only recompute the weight are covered by the constant read from that weight
    torch.nn.utils.spectral_norm(model[0])
    torch.nn.utils.prune.l1_unstructured(model[2], "weight", 0.5)
    report = lipfast.lipschitz_bound(model.eval(), (4,), progress=False)
    # no note of hooks (the one note: the layers and the ReLU bounded as one map)
    assert math.isfinite(report.upper) and len(report.notes) == 1 and "bounded as one map" in report.notes[0]
    x = torch.randn(1, 4)
    J = torch.autograd.functional.jacobian(lambda t: model(t).flatten(), x).reshape(2, 4)
    assert float(torch.linalg.matrix_norm(J.double(), 2)) <= report.upper * (1 + 1e-6)


def test_a_compiled_model_is_bounded_as_the_module_it_compiles():
    # torch.compile's wrapper has no forward of its own for torch.fx: the module inside is traced,
    # skips and all (the hooks fallback would only multiply the layers)
    torch.manual_seed(0)
    model = _ResidualForCompile().eval()
    compiled = torch.compile(model)
    report = lipfast.lipschitz_bound(compiled, (4,), progress=False)
    eager = lipfast.lipschitz_bound(model, (4,), progress=False)
    assert report.method == "fx" and report.upper == eager.upper
    assert [layer.name for layer in report.layers] == [layer.name for layer in eager.layers]


class _ResidualForCompile(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


def _jacobian_norm(model: nn.Module, shape: tuple) -> float:
    x = torch.randn(1, *shape, dtype=torch.float64)
    model = copy.deepcopy(model).double().eval()
    J = torch.autograd.functional.jacobian(lambda t: model(t).reshape(-1), x).reshape(-1, x.numel())
    return float(torch.linalg.matrix_norm(J, 2))


def _explicit_norm(model: nn.Module, shape: tuple) -> float:
    """The exact norm of a linear model (its bias removed by a difference), from its matrix in float64."""
    model = copy.deepcopy(model).double().eval()
    zero = model(torch.zeros(1, *shape, dtype=torch.float64))
    basis = torch.eye(math.prod(shape), dtype=torch.float64).reshape(-1, *shape)
    with torch.no_grad():
        matrix = (model(basis) - zero).reshape(basis.shape[0], -1)
    return float(torch.linalg.matrix_norm(matrix, 2))


def _checked_bound(make, shape: tuple) -> tuple[nn.Module, float, "lipfast.LipschitzReport"]:
    """(model, its exact norm, its report) for make() in eval mode (seed 0), the bound checked to be
    at or above the exact norm and within 2e-3 of it."""
    torch.manual_seed(0)
    model = make().eval()
    exact = _explicit_norm(model, shape)
    report = lipfast.lipschitz_bound(model, shape, progress=False)
    assert exact <= report.upper <= exact * (1 + 2e-3)
    return model, exact, report


def _same_in_every_form(model: nn.Module, shape: tuple, upper: float) -> None:
    """The traced, exported and scripted forms get the same bound."""
    example = torch.randn(1, *shape)
    for made in (torch.jit.trace(model, example), torch.export.export(model, (example,)), torch.jit.script(model)):
        assert lipfast.lipschitz_bound(made, shape, progress=False).upper == pytest.approx(upper, rel=2e-3)


def _varied_norm(channels: int, dim: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim](channels)
    with torch.no_grad():
        norm.running_var.copy_(torch.rand(channels, generator=g) * 4 + 0.01)
        norm.running_mean.copy_(torch.randn(channels, generator=g))
        norm.weight.copy_(torch.randn(channels, generator=g) * 2)
        norm.bias.copy_(torch.randn(channels, generator=g))
    return norm.eval()


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv2d(3, 5, 3, padding=1), (3, 5, 5)),
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="circular"), (4, 6, 6)),
    (nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, padding_mode="reflect"), (4, 5, 5)),
    (nn.Conv2d(2, 3, (3, 5), padding="same", padding_mode="replicate", bias=False), (2, 4, 5)),
    (nn.Conv2d(2, 3, (2, 4), padding="same", padding_mode="reflect"), (2, 4, 5)),
    (nn.Conv1d(3, 4, 5, padding=2), (3, 9)),
    (nn.Conv3d(2, 3, 3, padding=1), (2, 3, 3, 3)),
    (nn.Linear(6, 5), (6,)),
], ids=["zeros", "circular-strided", "reflect-groups", "replicate-same", "reflect-same-even", "1d", "3d", "linear"])
def test_a_batch_norm_after_a_layer_is_folded_into_its_bracket(layer, shape):
    # BatchNorm(conv(x)) = conv'(x) + b with conv' the conv with output channel c scaled by
    # s_c = gamma_c / sqrt(var_c + eps): its norm, often far below ‖conv‖ max |s|
    torch.manual_seed(0)
    dim = 1 if isinstance(layer, nn.Linear) else layer.weight.dim() - 2
    norm = _varied_norm(layer.weight.shape[0], dim)
    model = nn.Sequential(layer, norm).eval()  # float32: the folded weight is rounded, and the margin covers it
    exact = _explicit_norm(model, shape)
    report = lipfast.lipschitz_bound(model, shape, progress=False)
    assert exact <= report.upper <= exact * (1 + 2e-3)
    first, second = report.layers
    assert first.lower <= exact <= first.upper and first.note == "1 folded in: the bracket is of 1 after 0"
    assert second.note == "folded into 0's bracket" and report.naive_upper == first.upper
    unfolded = float(lipfast.operator_norm_bounds(layer, shape[1:] or None)[1]) * second.upper
    assert report.upper <= unfolded * (1 + 2e-3)  # ‖diag(s) W‖ <= max |s| ‖W‖, up to the brackets' widths
    # the same bound for the traced, exported and scripted forms (their functional layers fold too)
    example = torch.randn(1, *shape)
    for made in (torch.jit.trace(model, example), torch.export.export(model, (example,)), torch.jit.script(model)):
        assert lipfast.lipschitz_bound(made, shape, progress=False).upper == pytest.approx(report.upper, rel=2e-3)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("kernel, dilation", [(4, 1), ((2, 3), 1), (2, 3)], ids=["4", "2x3", "2-dilated"])
def test_even_kernel_same_padding_is_one_operator_in_every_form(mode, kernel, dilation):
    # padding="same" with an even extent pads d (k - 1) // 2 before and the rest after: traced and
    # exported, an asymmetric F.pad and then the conv, bracketed as the module is (they were bounded
    # apart: the pad's copies times the conv's norm)
    torch.manual_seed(0)
    shape = (2, 5, 6)
    model = nn.Sequential(nn.Conv2d(2, 3, kernel, padding="same", dilation=dilation, padding_mode=mode)).double().eval()
    exact = _explicit_norm(model, shape)
    example = torch.randn(1, *shape, dtype=torch.float64)
    bounds = [lipfast.lipschitz_bound(made, shape, progress=False).upper
              for made in (model, torch.jit.trace(model, example), torch.export.export(model, (example,)))]
    assert exact <= bounds[0] <= exact * (1 + 2e-3) and bounds == [bounds[0]] * 3


def test_an_asymmetric_copying_pad_other_than_same_stays_apart():
    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 2).double()

        def forward(self, x):
            return self.conv(F.pad(x, (1, 0, 0, 1), mode="replicate"))  # "same" would be (0, 1, 0, 1)

    torch.manual_seed(0)
    model, shape = Padded().eval(), (2, 4, 4)
    report = lipfast.lipschitz_bound(model, shape, progress=False)
    assert math.isfinite(report.upper) and report.upper >= _explicit_norm(model, shape)
    conv = lipfast.lipschitz_bound(model.conv, (2, 5, 5), progress=False).upper
    assert report.upper == pytest.approx(conv * math.sqrt(4), rel=1e-9)  # the pad apart: a corner copied 4 times


class _ZeroPadded(nn.Module):
    """F.pad with zeros, then a conv with no padding of its own, as a function (timm's Conv2dSame)."""

    def __init__(self, conv: nn.Module, pad: tuple) -> None:
        super().__init__()
        self.conv, self.pad = conv, pad

    def forward(self, x):
        return self.conv._conv_forward(F.pad(x, self.pad), self.conv.weight, self.conv.bias)


@pytest.mark.parametrize("conv, pad, shape", [
    (nn.Conv2d(3, 4, 3, stride=2), (0, 1, 0, 1), (3, 6, 6)),  # timm's "same" for k 3, s 2 on an even input
    (nn.Conv2d(2, 4, 7, stride=2), (2, 3, 3, 3), (2, 2, 3)),  # a kernel larger than the input: taps cut off
    (nn.Conv1d(2, 3, 4, dilation=2), (3, 3), (2, 5)),
    (nn.Conv3d(2, 2, 3), (1, 1, 0, 2, 1, 0), (2, 3, 2, 3)),
], ids=["strided-same", "large-kernel", "1d-dilated", "3d"])
def test_a_zero_pad_before_a_conv_is_folded_into_it_in_every_form(conv, pad, shape):
    # conv(F.pad(x)) is one zero-padded operator on x: bracketed as that, its norm at most the
    # unpadded conv's on the padded grid
    torch.manual_seed(0)
    model = _ZeroPadded(conv, pad).eval()
    exact = _explicit_norm(model, shape)
    report = lipfast.lipschitz_bound(model, shape, progress=False)
    assert exact <= report.upper <= exact * (1 + 2e-3)
    (layer,) = [layer for layer in report.layers if "conv" in layer.kind]
    assert layer.input_shape == shape and layer.lower <= exact <= layer.upper
    padded = tuple(n + pad[-2 * i - 2] + pad[-2 * i - 1] for i, n in enumerate(shape[1:]))
    assert report.upper <= float(lipfast.operator_norm_bounds(conv, padded)[1]) * (1 + 2e-3)
    _same_in_every_form(model, shape, report.upper)


@pytest.mark.parametrize("pad, conv, shape", [
    (nn.ReflectionPad2d(1), nn.Conv2d(3, 4, 3), (3, 6, 6)),  # a ResNet generator's block (CycleGAN, pix2pix)
    (nn.ReflectionPad2d((1, 2, 1, 2)), nn.Conv2d(3, 4, 4), (3, 5, 6)),  # "same" for an even kernel
    (nn.ReplicationPad1d(2), nn.Conv1d(2, 3, 5, stride=2), (2, 9)),
    (nn.CircularPad3d(1), nn.Conv3d(2, 2, 3), (2, 3, 4, 3)),
    (nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 4, 3, stride=2), (3, 6, 6)),
    (nn.ZeroPad2d(1), nn.Conv2d(3, 4, 5, padding=1), (3, 5, 5)),  # the pad and the conv's own padding add up
    (nn.ConstantPad1d((1, 2), 0.0), nn.Conv1d(2, 3, 4, dilation=2, groups=1), (2, 6)),
], ids=["reflect", "reflect-same-even", "replicate-1d-strided", "circular-3d", "zeros-strided", "zeros-and-own",
        "constant-0-1d"])
def test_a_padding_module_before_a_conv_module_is_folded_into_it(pad, conv, shape):
    # nn.Sequential(pad, conv) is one padded operator: bracketed as that (a copying pad alone has norm
    # above 1, sqrt(2) for ReflectionPad2d(1) on one axis), the conv listed under its own name and
    # class, in its place, its input the pad's
    torch.manual_seed(0)
    model = nn.Sequential(pad, conv, nn.ReLU()).eval()
    exact = _explicit_norm(model[:2], shape)
    report = lipfast.lipschitz_bound(model, shape, progress=False)
    assert exact <= report.upper <= exact * (1 + 2e-3)
    assert [(layer.name, layer.kind) for layer in report.layers] == \
        [("0", type(pad).__name__), ("1", type(conv).__name__), ("2", "ReLU")]
    assert report.layers[1].input_shape == shape and report.layers[1].lower <= exact
    padded = lipfast.lipschitz_bound(nn.Sequential(conv), model[0](torch.zeros(1, *shape)).shape[1:], progress=False)
    # at most the pad's constant times the conv's on the padded input (the two apart, as they were bounded)
    assert report.upper <= report.layers[0].upper * padded.upper * (1 + 2e-3)
    _same_in_every_form(model, shape, report.upper)


def test_a_module_conv_after_f_pad_is_folded_and_a_batch_norm_after_it_too():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 4, 3), _varied_norm(4)

        def forward(self, x):
            return torch.relu(self.norm(self.conv(F.pad(x, (1, 1, 1, 1), mode="reflect"))))

    torch.manual_seed(0)
    model, shape = Block().eval(), (3, 5, 5)
    linear = nn.Sequential(nn.ReflectionPad2d(1), model.conv, model.norm).eval()
    exact = _explicit_norm(linear, shape)
    report = lipfast.lipschitz_bound(model, shape, progress=False)
    assert exact <= report.upper <= exact * (1 + 2e-3)
    conv_layer, = [layer for layer in report.layers if layer.name == "conv"]
    assert conv_layer.kind == "Conv2d" and conv_layer.note == "norm folded in: the bracket is of norm after conv"
    assert [layer.note for layer in report.layers if layer.name == "norm"] == ["folded into conv's bracket"]


def test_a_conv_module_called_twice_or_parametrized_after_a_pad_stays_a_module():
    # the rewrite is for one call of a plain torch.nn conv: a shared conv is bounded once per input
    # size, on its padded input; a parametrized one computes its weight in its forward
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            return self.conv(F.pad(self.conv(F.pad(x, (1, 1, 1, 1), mode="reflect")), (1, 1, 1, 1)))

    torch.manual_seed(0)
    shape = (3, 5, 5)
    model = Twice().eval()
    report = lipfast.lipschitz_bound(model, shape, progress=False)
    (layer,) = report.layers
    assert (layer.name, layer.kind, layer.input_shape) == ("conv", "Conv2d", (3, 7, 7))
    assert report.upper >= _jacobian_norm(model, shape)
    model = nn.Sequential(nn.ReflectionPad2d(1), torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))).eval()
    report = lipfast.lipschitz_bound(model, shape, progress=False)
    assert report.layers[1].input_shape == (3, 7, 7)  # apart from the pad
    assert report.upper >= _explicit_norm(model, shape)


def test_a_pad_with_another_value_or_a_crop_stays_apart():
    torch.manual_seed(0)
    class Padded(_ZeroPadded):
        def forward(self, x):
            return self.conv._conv_forward(F.pad(x, self.pad, value=self.value), self.conv.weight, self.conv.bias)

    for pad, value in [((1, 1, 1, 1), 2.0), ((1, -1, 0, 1), 0.0)]:
        model = nn.Sequential(nn.Conv2d(2, 3, 3)).double().eval()
        padded = Padded(model[0], pad)
        padded.value = value
        report = lipfast.lipschitz_bound(padded, (2, 5, 5), progress=False)
        (layer,) = [layer for layer in report.layers if "conv" in layer.kind]
        size = (5 + pad[2] + pad[3], 5 + pad[0] + pad[1])
        assert layer.input_shape == (2, *size)  # the conv on the padded input, apart from the pad
        assert report.upper == pytest.approx(float(lipfast.operator_norm_bounds(model[0], size)[1]), rel=1e-9)


class _SeparableConv(nn.Module):
    """Depthwise then pointwise, as functions (timm's SeparableConv2d, written out)."""

    def __init__(self):
        super().__init__()
        self.depthwise = nn.Parameter(torch.randn(4, 1, 3, 3))
        self.pointwise = nn.Parameter(torch.randn(6, 4, 1, 1) * 0.5)

    def forward(self, x):
        return F.conv2d(F.conv2d(x, self.depthwise, padding=1, groups=4), self.pointwise)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4)), (6,)),
    (lambda: nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4)), (3, 6)),  # rows of a 2-d example
    (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 6, 1)), (4, 5, 5)),
    (lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect"), nn.Conv2d(6, 3, 1)),
     (4, 5, 5)),
    (lambda: nn.Sequential(nn.Conv2d(4, 6, 2, stride=2, padding="valid"), nn.Conv2d(6, 3, 1, padding="same")),
     (4, 7, 7)),
    (lambda: nn.Sequential(nn.Conv1d(3, 5, 3, padding=1, dilation=2), nn.Conv1d(5, 2, 1)), (3, 8)),
    (_SeparableConv, (4, 5, 5)),
    # with BatchNorms folded into either layer: a MobileNetV2 block's projection (1x1 conv and
    # BatchNorm, no activation), then the next block's expansion (1x1 conv and BatchNorm)
    (lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), _varied_norm(6), nn.Conv2d(6, 5, 1), _varied_norm(5, seed=1)),
     (4, 5, 5)),
    (lambda: nn.Sequential(nn.Conv2d(4, 6, 1), _varied_norm(6), nn.Conv2d(6, 8, 1)), (4, 5, 5)),
    (lambda: nn.Sequential(_varied_norm(4), nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 5, 1), _varied_norm(5, seed=1)),
     (4, 5, 5)),
    (lambda: nn.Sequential(nn.Linear(6, 8), _varied_norm(8, 1), nn.Linear(8, 4), _varied_norm(4, 1, seed=1)), (6,)),
], ids=["linear", "linear-rows", "depthwise-pointwise", "grouped-reflect", "strided", "1d-dilated", "functional",
        "conv-bn-pointwise-bn", "pointwise-bn-pointwise", "bn-conv-pointwise-bn", "linear-bn-linear-bn"])
def test_a_pointwise_layer_after_a_layer_is_merged_into_its_bracket(make, shape):
    # y = B(A(x)) with B a linear layer or a 1x1 conv (stride 1, no padding, groups 1) is one linear
    # map: the conv of weight sum_o B[d, o] A[o, c] with A's settings and groups 1, whose norm can be
    # far below ‖B‖ ‖A‖ (a depthwise conv and its pointwise mix: a separable conv)
    model, exact, report = _checked_bound(make, shape)
    merged = [layer for layer in report.layers if "folded in:" in layer.note]
    assert len(merged) == 1 and all("folded into" in layer.note for layer in report.layers if layer not in merged)
    assert merged[0].lower <= exact <= merged[0].upper and report.naive_upper == merged[0].upper
    if len(report.layers) == 2:  # (no BatchNorm)
        assert report.upper <= (1 + 2e-3) * _product_of_brackets(model, shape)
    _same_in_every_form(model, shape, report.upper)


def _product_of_brackets(model: nn.Module, shape: tuple) -> float:
    """‖B‖ ‖A‖ for a model of two layers, each bracketed on its own (the unmerged bound)."""
    if isinstance(model, _SeparableConv):
        a = lipfast.conv_spectral_norm_bounds(model.depthwise.detach(), shape[1:], padding=1, groups=4)[1]
        b = lipfast.conv_spectral_norm_bounds(model.pointwise.detach(), shape[1:])[1]
        return float(a) * float(b)
    first, second = model
    if isinstance(first, nn.Linear):
        return float(lipfast.operator_norm_bounds(first)[1]) * float(lipfast.operator_norm_bounds(second)[1])
    out = tuple(first(torch.zeros(1, *shape)).shape[2:])
    return float(lipfast.operator_norm_bounds(first, shape[1:])[1]) * float(lipfast.operator_norm_bounds(second, out)[1])


@pytest.mark.parametrize("case", ["strided", "padded", "grouped", "used-twice", "activation-between"])
def test_layers_that_are_not_one_map_are_not_merged(case):
    torch.manual_seed(0)
    shape = (4, 6, 6)
    second = {"strided": nn.Conv2d(6, 3, 1, stride=2), "padded": nn.Conv2d(6, 3, 1, padding=1),
              "grouped": nn.Conv2d(6, 3 * 2, 1, groups=2)}.get(case, nn.Conv2d(6, 3, 1))
    if case == "used-twice":
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Conv2d(4, 6, 3, padding=1), second

            def forward(self, x):
                y = self.a(x)
                return torch.cat([self.b(y).flatten(1), y.flatten(1)], 1)

        model = Net().eval()
    elif case == "activation-between":
        model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), second).eval()
    else:
        model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), second).eval()
    report = lipfast.lipschitz_bound(model, shape, progress=False)
    assert not any("folded" in layer.note for layer in report.layers)
    if case != "activation-between":
        assert report.upper >= _explicit_norm(model, shape)


@pytest.mark.parametrize("case", ["used-twice", "uniform-scale", "linear-on-rows", "called-twice", "transposed",
                                  "dropout-on"])
def test_a_batch_norm_is_not_folded_where_the_two_are_not_one_map(case):
    torch.manual_seed(0)
    if case == "used-twice":  # the conv's output also skips past the norm
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), _varied_norm(3)

            def forward(self, x):
                y = self.conv(x)
                return self.bn(y) + y
        model, shape = Net(), (3, 4, 4)
    elif case == "uniform-scale":  # nothing to gain: every channel scaled alike
        model, shape = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)), (3, 4, 4)
    elif case == "linear-on-rows":  # BatchNorm1d normalizes dim 1 of (batch, rows, features): the rows
        model, shape = nn.Sequential(nn.Linear(4, 4), _varied_norm(3, 1)), (3, 4)
    elif case == "called-twice":
        conv = nn.Conv2d(3, 3, 3, padding=1)
        model, shape = nn.Sequential(conv, _varied_norm(3), nn.ReLU(), conv), (3, 4, 4)
    elif case == "dropout-on":  # dropout that stays on (Monte Carlo) between the norm and the layer: not one map
        model, shape = _DroppedNorm(training_dropout=True), (3, 4, 4)
    else:
        model, shape = nn.Sequential(nn.ConvTranspose2d(3, 3, 3), _varied_norm(3)), (3, 4, 4)
    model.eval()
    report = lipfast.lipschitz_bound(model, shape, progress=False)
    assert not any("folded" in layer.note for layer in report.layers)
    assert report.upper >= _jacobian_norm(model, shape) if case != "linear-on-rows" else True
    assert report.naive_upper == pytest.approx(math.prod(layer.upper for layer in report.layers), rel=1e-12)


def test_folding_tightens_a_resnet_with_trained_like_statistics_and_stays_sound(monkeypatch):
    from lipfast import network
    from lipfast.models import resnet18_cifar

    model = resnet18_cifar()
    for i, module in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        module.load_state_dict({**module.state_dict(), **{k: v for k, v in _varied_norm(module.num_features, seed=i)
                                                          .state_dict().items() if k != "num_batches_tracked"}})
    model.eval()
    report = lipfast.lipschitz_bound(model, (3, 8, 8), progress=False)
    folded = sum("folded in:" in layer.note for layer in report.layers)
    assert folded == 20  # every conv of ResNet-18 (17 3x3, 3 shortcuts) feeds its own BatchNorm
    monkeypatch.setattr(network, "_folds", lambda *args: {})
    unfolded = lipfast.lipschitz_bound(model, (3, 8, 8), progress=False)
    assert report.upper < unfolded.upper / 10  # each block's branch is far tighter folded
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    double = copy.deepcopy(model).double()
    worst = max(float(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(
        lambda t: double(t).reshape(-1), x[i : i + 1]).reshape(10, -1), 2)) for i in range(3))
    assert worst <= report.upper


@pytest.mark.parametrize("fn, reason", [
    (lambda x: x * torch.rand(4), "differs between runs"),  # torch.fx runs torch.rand(4) once while tracing
    (lambda x: x[:, torch.randint(0, 4, (6,))], "not known to be an int"),  # one draw of picks
    (lambda x: F.linear(x, torch.randn(3, 4)), "drawn at random"),
], ids=["scale", "index", "weight"])
def test_values_drawn_at_random_in_the_forward_are_not_taken_from_one_trace(fn, reason):
    report = lipfast.lipschitz_bound(_Applies(fn), (4,), progress=False)
    assert report.upper == math.inf and any(reason in note for note in report.notes), report.notes


def test_tracing_leaves_no_constants_on_the_model():
    model = _Applies(lambda x: (x - torch.tensor([1.0, 2.0])) / torch.tensor([2.0, 4.0]))
    before = set(vars(model))
    report = lipfast.lipschitz_bound(model, (2,), progress=False)
    assert report.upper == 0.5 and set(vars(model)) == before


def test_a_bias_computed_from_the_input_counts_once_per_row_it_is_added_to():
    class Biased(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))

        def forward(self, x):
            return F.linear(x, self.W, x[0, 0, :3])  # the first row's first entries, added to all 5 rows

    model = Biased()
    report = lipfast.lipschitz_bound(model, (5, 4), progress=False)
    weight = float(torch.linalg.matrix_norm(model.W.detach(), 2))
    assert weight + math.sqrt(5) <= report.upper <= (weight + math.sqrt(5)) * (1 + 1e-3)
    assert _jacobian_norm(model, (5, 4)) <= report.upper
    assert _jacobian_norm(model, (5, 4)) > weight + 1  # where counting the bias once would fall


class _DroppedNorm(nn.Module):
    def __init__(self, training_dropout: bool = False):
        super().__init__()
        self.bn, self.weight, self.on = _varied_norm(3, 2, seed=8), nn.Parameter(torch.randn(2, 3, 3, 3)), training_dropout

    def forward(self, x):
        return F.conv2d(F.dropout(self.bn(x), 0.2, training=self.on or self.training), self.weight, padding=1)


class _ViewHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.fc = _varied_norm(3, 2, seed=5), nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        y = self.bn(x)
        return self.fc(y.view(y.size(0), -1))


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Sequential(_varied_norm(6, 1), nn.Linear(6, 4)), (6,)),
    (lambda: nn.Sequential(_varied_norm(3, 2, seed=1), nn.Conv2d(3, 4, 3, padding=1)), (3, 5, 5)),
    (lambda: nn.Sequential(_varied_norm(4, 2, seed=2), nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect")),
     (4, 5, 5)),
    (lambda: nn.Sequential(_varied_norm(3, 2, seed=3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)), (3, 4, 4)),
    (lambda: nn.Sequential(_varied_norm(2, 1, seed=4), nn.Conv1d(2, 3, 3, stride=2, padding=1, padding_mode="circular")),
     (2, 7)),
    (lambda: _ViewHead(), (3, 4, 4)),
    (lambda: nn.Sequential(_varied_norm(6, 1, seed=6), nn.Dropout(0.3), nn.Linear(6, 4)), (6,)),
    # the face-recognition head: BatchNorm2d, Dropout, Flatten, Linear
    (lambda: nn.Sequential(_varied_norm(3, 2, seed=7), nn.Dropout(0.4), nn.Flatten(), nn.Identity(), nn.Linear(48, 5)),
     (3, 4, 4)),
    (lambda: _DroppedNorm(), (3, 4, 4)),
], ids=["linear", "conv", "groups-reflect", "through-flatten", "1d-circular", "through-view", "through-dropout",
        "dropout-flatten-identity", "functional-dropout"])
def test_a_batch_norm_before_a_layer_is_folded_into_its_bracket(make, shape):
    # conv(s x + b) = conv'(x) + a constant, conv' the conv with input channel i scaled by s_i
    # (any padding: it is linear); through a flatten, a linear layer's columns of channel i
    model, exact, report = _checked_bound(make, shape)
    norm, *_, layer = report.layers
    assert norm.note == f"folded into {layer.name}'s bracket"
    assert layer.note == f"{norm.name} folded in: the bracket is of {layer.name} after {norm.name}"
    _same_in_every_form(model, shape, report.upper)


def test_a_batch_norm_between_two_layers_is_folded_once():
    # conv, BatchNorm, conv: folded into the first (after it), not also into the second, where its
    # scale would count twice (‖conv2 S‖ ‖S conv1‖ can be below ‖conv2 S conv1‖)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), _varied_norm(3), nn.Conv2d(3, 2, 3, padding=1)).eval()
    report = lipfast.lipschitz_bound(model, (3, 5, 5), progress=False)
    assert [layer.note for layer in report.layers] == ["1 folded in: the bracket is of 1 after 0",
                                                        "folded into 0's bracket", ""]
    assert _explicit_norm(model, (3, 5, 5)) <= report.upper


def test_a_batch_norm_whose_padded_value_is_also_used_elsewhere_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = _varied_norm(2), nn.Conv2d(2, 3, 3)

        def forward(self, x):
            p = F.pad(self.bn(x), (1, 1, 1, 1), mode="reflect")  # (read as the conv's own padding)
            return torch.cat([self.conv(p).flatten(1), p.flatten(1)], 1)  # the padded value, used twice

    model = Shared().eval()
    example = torch.randn(1, 2, 4, 4)
    for made in (model, torch.jit.trace(model, example), torch.export.export(model, (example,))):
        # (traced and exported, the pad and the conv are one conv with reflect padding: _with_copying_pad)
        report = lipfast.lipschitz_bound(made, (2, 4, 4), progress=False)
        assert not any("folded" in layer.note for layer in report.layers)
        assert _explicit_norm(model, (2, 4, 4)) <= report.upper


class _Windows(nn.Module):
    """x.unfold(dimension, size, step), then a linear layer over each window (a 1-D framing)."""

    def __init__(self, dimension: int, size: int, step: int, features: int) -> None:
        super().__init__()
        self.dimension, self.size, self.step = dimension, size, step
        self.linear = nn.Linear(size, features)

    def forward(self, x):
        return self.linear(x.unfold(self.dimension, self.size, self.step))


@pytest.mark.parametrize("arguments, shape", [
    ((-1, 3, 1), (2, 7)), ((-1, 3, 2), (2, 7)), ((-1, 2, 3), (2, 8)), ((1, 2, 1), (3, 5, 4)), ((3, 3, 2), (2, 3, 8)),
], ids=["overlapping", "half-overlapping", "gaps", "channels", "3d"])
def test_tensor_unfold_counts_the_windows_holding_an_entry(arguments, shape):
    # each entry is copied into every window holding it: sqrt(the largest count), exactly, alone
    unfold = _Windows(*arguments, features=1)
    unfold.forward = lambda x: x.unfold(*arguments)
    exact = _explicit_norm(unfold, shape)
    report = lipfast.lipschitz_bound(unfold, shape, progress=False)
    assert report.upper == pytest.approx(exact, rel=1e-12) and report.upper >= exact
    torch.manual_seed(0)
    model = _Windows(*arguments, features=4).eval()
    report = lipfast.lipschitz_bound(model, shape, progress=False)
    assert report.upper >= _explicit_norm(model, shape)
    assert report.upper == pytest.approx(exact * report.layers[0].upper, rel=1e-12)
    _same_in_every_form(model, shape, report.upper)  # (aten::unfold, the same method)


def test_tensor_unfold_over_the_batch_dim_gets_no_bound():
    model = _Windows(0, 1, 1, features=3)
    model.forward = lambda x: x.unfold(0, 1, 1)
    report = lipfast.lipschitz_bound(model, (2, 3), progress=False)
    assert report.upper == math.inf and "unfold over dim 0" in report.notes[-1]


class _Stored(nn.Module):
    """fn(self, x) with stored normal constants of the given shapes, drawn in order from one seed."""

    def __init__(self, fn, seed: int, dtype: torch.dtype, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        self.fn = fn
        g = torch.Generator().manual_seed(seed)
        for name, shape in shapes.items():
            self.register_buffer(name, torch.randn(shape, generator=g, dtype=dtype))

    def forward(self, x):
        return self.fn(self, x)


def _Products(fn) -> _Stored:
    """Matrices W (4, 4), M (5, 12), batches B (3, 4, 2), C (2, 4, 5), a vector c (5,)."""
    return _Stored(fn, 5, torch.float32, {"W": (4, 4), "M": (5, 12), "B": (3, 4, 2), "C": (2, 4, 5), "c": (5,)})


_PRODUCT_CASES = {  # fn, the exact constant (None: the bound only has to hold)
    "addmm": (lambda m, x: torch.addmm(m.c[:4], x.reshape(-1, 4), m.W), lambda m: _norm2(m.W)),
    "addmm-method-scaled": (lambda m, x: m.c[:4].addmm(x.reshape(-1, 4), m.W, beta=0.5, alpha=-2),
                            lambda m: 2 * _norm2(m.W)),
    "addmm-input-dependent": (lambda m, x: torch.addmm(x.reshape(-1, 4), x.reshape(-1, 4), m.W, beta=0.5), None),
    "addmv": (lambda m, x: torch.addmv(m.c, m.M, x.reshape(-1), alpha=3), lambda m: 3 * _norm2(m.M)),
    "bmm": (lambda m, x: torch.bmm(x.transpose(0, 1), m.B), lambda m: max(_norm2(b) for b in m.B)),
    "baddbmm": (lambda m, x: torch.baddbmm(m.c[:2], x.transpose(0, 1), m.B, beta=0), lambda m: max(_norm2(b) for b in m.B)),
    "matmul-batch": (lambda m, x: x.transpose(0, 1) @ m.B, lambda m: max(_norm2(b) for b in m.B)),
    "matmul-copied": (lambda m, x: x @ m.C, None),  # x's one matrix copied to C's two
    "matmul-left": (lambda m, x: m.B.transpose(1, 2) @ x.transpose(0, 1).mT, lambda m: max(_norm2(b) for b in m.B)),
}


def _norm2(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix.double(), 2))


@pytest.mark.parametrize("form", ["python", "trace", "export", "core-aten"])
@pytest.mark.parametrize("case", list(_PRODUCT_CASES))
def test_affine_and_batched_products_by_constants(case, form):
    # addmm / addmv / baddbmm (torch.export's core ATen form of nn.Linear is addmm) and products by
    # batches of matrices: exact for the linear maps, never below the attained norm
    fn, exact = _PRODUCT_CASES[case]
    model = _Products(fn).eval()
    example = torch.randn(1, 3, 4)
    bounded = _in_form(model, example, form)
    report = lipfast.lipschitz_bound(bounded, (3, 4), progress=False)
    assert math.isfinite(report.upper), report.notes
    double = copy.deepcopy(model).double()
    attained = max(_jacobian_norm_of(lambda t: double(t), (3, 4), seed) for seed in range(3))
    assert attained <= report.upper * (1 + 1e-12)
    if exact is not None:
        assert report.upper <= exact(double) * (1 + 2e-3)
        assert attained == pytest.approx(exact(double), rel=1e-10)


@pytest.mark.parametrize("form", ["python", "trace", "export", "core-aten"])
@pytest.mark.parametrize("fn, expected, difference", [
    (lambda x: x[:, :, 1:] - x[:, :, :-1], 2 * math.cos(math.pi / 10), True),  # along a dim of 5
    (lambda x: x[..., :-2] - x[..., 2:], 2 * math.cos(math.pi / 6), True),  # 2 apart: paths of 3 and 2 entries
    (lambda x: x[:, 1:] - x[:, :-1], 2 * math.cos(math.pi / 8), True),  # along a dim of 4
    (lambda x: torch.diff(x, dim=2), 2 * math.cos(math.pi / 10), True),  # (core ATen: a cat, two slices, a sub)
    (lambda x: x[:, 1:, 1:] - x[:, :-1, :-1], 2 * math.cos(math.pi / 8), True),  # diagonal: paths of at most 4
    (lambda x: x[:, 1:] - x[:, :1], 2.0, False),  # broadcast disjoint pieces: sqrt(1 + 3 copies), in quadrature
    (lambda x: x[:, 1:, :] - x[:, :-1, :].flip(2), 2.0, False),  # offsets that vary: the sum rule's 2
], ids=["last-dim", "step-2", "middle-dim", "diff", "diagonal", "broadcast", "flipped"])
def test_differences_of_shifted_selections(fn, expected, difference, form):
    # x[..., 1:] - x[..., :-1] is a finite difference: 2 cos(pi / 2m) along a dim of m (its exact
    # norm), not the 2 of two selections added
    model = _Applies(fn)
    example = torch.randn(1, 4, 5)
    bounded = _in_form(model, example, form)
    report = lipfast.lipschitz_bound(bounded, (4, 5), progress=False)
    attained = max(_jacobian_norm_of(fn, (4, 5), seed) for seed in range(2))
    assert attained <= report.upper * (1 + 1e-14)
    if difference:
        assert attained == pytest.approx(expected, rel=1e-12)
        assert report.upper <= expected * (1 + 1e-11), report.notes
    else:
        assert report.upper == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("fn, expected", [
    (lambda x: torch.where(torch.eye(5, dtype=torch.bool), x.unsqueeze(-1), 0.0), 1.0),  # diag_embed written out
    (lambda x: torch.where(torch.arange(5)[:, None] == torch.arange(5), 0.0, x.unsqueeze(-2)), 2.0),  # off-diagonal: 4 copies
    (lambda x: torch.where(torch.ones(5, 5, dtype=torch.bool).tril(), x.unsqueeze(-2), x.unsqueeze(-1)), None),
    (lambda x: x.masked_fill(torch.arange(5) % 2 == 0, 1.0), 1.0),
], ids=["eye", "off-diagonal", "tril-both", "masked-fill"])
def test_selections_counted_on_a_known_mask(fn, expected):
    # a broadcast operand of where counts once per output entry the mask gives it, not once per copy
    model = _Applies(fn)
    report = lipfast.lipschitz_bound(model, (3, 5), progress=False)
    attained = max(_jacobian_norm_of(fn, (3, 5), seed) for seed in range(2))
    assert attained <= report.upper * (1 + 1e-14), report.notes
    if expected is not None:
        assert attained == pytest.approx(expected, rel=1e-12)
        assert report.upper <= expected * (1 + 1e-12), report.notes
    else:  # at most 5 copies of an entry from the first operand (rows i >= j) and 4 from the second
        # (columns j > i): sqrt(5 + 4), where broadcasting alone counts sqrt(5 + 5)
        assert report.upper == pytest.approx(3.0, rel=1e-12)


@pytest.mark.parametrize("fn", [
    lambda x: torch.diag_embed(x).sum(1), lambda x: torch.tril(x, 1) + x.triu(), lambda x: torch.cumsum(x, 2),
    lambda x: x.diagonal(0, 1, 2) * 3, lambda x: torch.repeat_interleave(x, 3, dim=2),
], ids=["diag-embed", "tril-triu", "cumsum", "diagonal", "repeat-interleave"])
def test_core_aten_forms_of_the_linear_rules(fn):
    # run_decompositions() writes these with aranges, masks and where: the same bound as the function's rule
    model = _Applies(fn)
    example = torch.randn(1, 3, 4)
    program = torch.export.export(model, (example,)).run_decompositions()
    eager = lipfast.lipschitz_bound(model, (3, 4), progress=False)
    report = lipfast.lipschitz_bound(program, (3, 4), progress=False)
    assert math.isfinite(eager.upper) and report.upper == pytest.approx(eager.upper, rel=1e-9), report.notes


@pytest.mark.parametrize("fn, expected", [
    (lambda x: x * torch.clamp(x + 3, 0, 6) / 6, 1.5),  # hardswish, relu6 as one clamp
    (lambda x: x * (x + 3).clamp(min=0).clamp(max=6) / 6, 1.5),  # and as two (core ATen's)
    (lambda x: x * torch.clamp(x + 3, 0, 5) / 6, None),  # not relu6: a product of two input-dependent values
    (lambda x: torch.slice_scatter(x, x[:, :2] * 3, dim=1, start=0, end=2), math.sqrt(10)),
    (lambda x: torch.select_scatter(x, x[:, 0] * 2, 1, 2), math.sqrt(5)),
], ids=["clamp", "two-clamps", "clamp-0-5", "slice-scatter", "select-scatter"])
def test_clamped_gates_and_scatters(fn, expected):
    report = lipfast.lipschitz_bound(_Applies(fn), (3, 4), progress=False)
    if expected is None:
        assert report.upper == math.inf and any("two input-dependent" in n for n in report.notes), report.notes
        return
    assert report.upper == pytest.approx(expected, rel=1e-12), report.notes
    assert max(_jacobian_norm_of(fn, (3, 4), seed) for seed in range(3)) <= report.upper


class _DeadBranch(nn.Module):
    """A conv and its BatchNorm, whose input also feeds a branch the forward computes and drops."""

    def __init__(self, dead: bool):
        super().__init__()
        self.dead = dead
        self.conv, self.bn, self.head = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.dead:
            unused = self.head(y) + y  # noqa: F841 (computed, never used)
            z = x * 1.0
            z.mul_(3)  # in place, and no later call reads its result: it still counts (z is returned)
            return self.bn(y), z
        return self.bn(y), x * 3.0


def test_calls_whose_results_nothing_uses_are_dropped():
    # the dead branch would make the conv's output two-use and stop the BatchNorm's fold
    torch.manual_seed(5)
    live, dead = _DeadBranch(False), _DeadBranch(True)
    with torch.no_grad():
        live.bn.running_var.uniform_(0.2, 2.0)
        live.bn.weight.uniform_(-2, 2)
    dead.load_state_dict(live.state_dict())
    expected = lipfast.lipschitz_bound(live.eval(), (2, 5, 5), progress=False)
    report = lipfast.lipschitz_bound(dead.eval(), (2, 5, 5), progress=False)
    assert report.upper == expected.upper and math.isfinite(report.upper)
    assert any("folded" in (layer.note or "") for layer in report.layers), [layer.note for layer in report.layers]


def _Contracts(fn) -> _Stored:
    """float64 constants A (4, 6), B (6, 3), C (3, 5, 4), D (5, 4, 3), v (6,)."""
    return _Stored(fn, 11, torch.float64, {"A": (4, 6), "B": (6, 3), "C": (3, 5, 4), "D": (5, 4, 3), "v": (6,)})


_CONTRACTIONS = {  # fn, one example's shape, whether core ATen's decomposition keeps the bound exact
    "matrix": (lambda m, x: torch.einsum("bi,ij->bj", x, m.A), (4,), True),
    "per-head": (lambda m, x: torch.einsum("bhqd,hkd->bhqk", x, m.C), (3, 2, 4), True),  # max over heads
    "copied-to-blocks": (lambda m, x: torch.einsum("bij,bjk->bik", x, m.D), (2, 4), True),  # x's block to 5
    "ellipsis": (lambda m, x: torch.einsum("...i,ij->...j", x, m.A), (2, 3, 4), True),
    "two-constants": (lambda m, x: torch.einsum("bi,ij,jk->bk", x, m.A, m.B), (4,), False),  # ‖AB‖, not ‖A‖‖B‖
    "implicit-output": (lambda m, x: torch.einsum("bij,jk", x, m.B), (3, 6), True),
    "diagonal-and-sum": (lambda m, x: torch.einsum("bii->b", x), (4, 4), True),  # a trace: sqrt(4)
    "tensordot": (lambda m, x: torch.tensordot(x, m.C, dims=([1, 2], [1, 2])), (5, 4), True),
    "inner": (lambda m, x: torch.inner(x, m.A), (3, 6), True),
    "outer": (lambda m, x: torch.outer(x.reshape(-1), m.v), (4,), True),
    "dot": (lambda m, x: torch.dot(x.reshape(-1), m.v), (6,), True),
    "vecdot": (lambda m, x: torch.linalg.vecdot(x, m.A), (4, 6), True),
    "weighted-sum": (lambda m, x: (x * m.v).sum(-1), (3, 6), True),  # ‖v‖, not max |v| sqrt(6)
    "weighted-mean": (lambda m, x: torch.mean(m.A * x[:, :, None], dim=1), (4,), True),
}


@pytest.mark.parametrize("form", ["python", "trace", "export", "core-aten"])
@pytest.mark.parametrize("case", list(_CONTRACTIONS))
def test_contractions_with_constants_get_their_exact_norm(case, form):
    # einsum and its relatives with one input-dependent operand are linear maps: the bound is their
    # norm (to the Cholesky certificate's 1e-3), from the explicit Jacobian in float64
    fn, shape, exact_in_core = _CONTRACTIONS[case]
    model = _Contracts(fn).eval()
    example = torch.randn(1, *shape, dtype=torch.float64)
    report = lipfast.lipschitz_bound(_in_form(model, example, form), shape, progress=False)
    J = torch.autograd.functional.jacobian(lambda t: model(t).reshape(-1), example).reshape(-1, example.numel())
    exact = float(torch.linalg.matrix_norm(J, 2))
    assert exact * (1 - 1e-12) <= report.upper, report.notes
    if form != "core-aten" or exact_in_core:
        assert report.upper <= exact * (1 + 1e-3), (report.upper, exact)


@pytest.mark.parametrize("fn, reason", [
    (lambda m, x: torch.einsum("bi,bj->bij", x, x), "two input-dependent"),  # a product of the input with itself
    (lambda m, x: torch.einsum("bi,ij->bj", x, torch.randn(6, 6, dtype=torch.float64)), "not a known constant"),
    (lambda m, x: torch.lerp(x, 2 * x, torch.sigmoid(x)), "weight that depends on the input"),
], ids=["quadratic", "random-constant", "lerp-input-weight"])
def test_contractions_and_interpolations_outside_the_linear_forms_get_no_finite_bound(fn, reason):
    report = lipfast.lipschitz_bound(_Contracts(fn).eval(), (6,), progress=False)
    assert report.upper == math.inf and any(reason in note for note in report.notes), report.notes


@pytest.mark.parametrize("form", ["python", "trace", "export"])
@pytest.mark.parametrize("fn, shape, expected", [
    (lambda m, x: torch.lerp(x, m.v, 0.25), (6,), lambda m: 0.75),  # towards a constant: (1 - w)
    (lambda m, x: x.lerp(torch.tanh(x) * 3, 0.5), (6,), lambda m: 0.5 + 1.5),  # the sum rule: |1 - w| + |w| 3
    (lambda m, x: torch.lerp(m.v, x, m.v.abs()), (6,), lambda m: float(m.v.abs().max())),  # a stored weight
    # x of shape (1, 6) copied to (6, 6) by a weight of shape (6, 1): every copy counts, and x is
    # both ends, so its coefficients add, (1 - w) - w (each term apart: sqrt(sum (1 - w)^2) + sqrt(sum w^2))
    (lambda m, x: torch.lerp(x, -x, m.v[:, None]), (1, 6), lambda m: float(((1 - 2 * m.v) ** 2).sum()) ** 0.5),
], ids=["number", "method", "tensor-weight", "broadcast-weight"])
def test_lerp_with_a_constant_weight(fn, shape, expected, form):
    # (1 - w) start + w end: each term a scaling of its operand, bounded apart (the sum rule)
    model = _Contracts(fn).eval()
    example = torch.randn(1, *shape, dtype=torch.float64)
    report = lipfast.lipschitz_bound(_in_form(model, example, form), shape, progress=False)
    assert report.upper == pytest.approx(expected(model), rel=1e-12), report.notes
    attained = max(_jacobian_norm_of(lambda t: model(t), shape, seed) for seed in range(3))
    assert attained <= report.upper * (1 + 1e-12)


class _Combines(nn.Module):
    """y = fn(self, x) with a stored weight w (6,), a stored (3, 1) matrix C and a stored mask (6,)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        g = torch.Generator().manual_seed(7)
        self.register_buffer("w", torch.rand(6, generator=g, dtype=torch.float64) * 2 - 0.5)
        self.register_buffer("C", torch.randn(3, 1, generator=g, dtype=torch.float64))
        self.register_buffer("mask", torch.tensor([True, False, True, True, False, False]))

    def forward(self, x):
        return self.fn(self, x.clone())


@pytest.mark.parametrize("form", ["python", "trace", "export", "core-aten"])
@pytest.mark.parametrize("fn, expected", [
    (lambda m, x: x - 0.5 * x, lambda m: 0.5),  # one value along two paths: its coefficients add
    (lambda m, x: x + 0.3 * (2 * torch.tanh(x) - x), lambda m: 0.7 + 0.6),  # (1 - t) x + t f(x)
    (lambda m, x: torch.lerp(x, 2 * torch.tanh(x), 0.3), lambda m: 0.7 + 0.6),  # (core ATen: a where on w's size)
    (lambda m, x: x.lerp(2 * x, m.w), lambda m: float((1 + m.w).abs().max())),  # (1 - w) x + w 2x
    (lambda m, x: x * m.w + x * (1 - m.w), lambda m: 1.0),  # stored coefficients, entry by entry
    (lambda m, x: torch.where(m.mask, 2 * x, -x), lambda m: 2.0),
    (lambda m, x: (lambda v: v * m.C - v)(x[:, None]), lambda m: float(((m.C - 1) ** 2).sum()) ** 0.5),  # copies
], ids=["difference", "interpolation", "lerp", "lerp-one-value", "stored-weights", "where", "broadcast"])
def test_one_value_reached_along_several_linear_paths(fn, expected, form):
    # y = sum over values l of D_l(l), D_l an entrywise scaling summed over l's paths: the exact norm
    # here (each model's map is linear, or its bound attained at 0 where tanh' = 1)
    model = _Combines(fn).eval()
    example = torch.randn(1, 6, dtype=torch.float64)
    report = lipfast.lipschitz_bound(_in_form(model, example, form), (6,), progress=False)
    assert report.upper == pytest.approx(expected(model), rel=1e-12), report.notes
    attained = _jacobian_norm_of(lambda t: model(t), (6,), 0)
    zero = float(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(
        lambda t: model(t).reshape(-1), torch.zeros(1, 6, dtype=torch.float64)).reshape(-1, 6), 2))
    assert max(attained, zero) <= report.upper * (1 + 1e-12)
    assert zero == pytest.approx(expected(model), rel=1e-12)


def _changed_between_uses(m, x):
    u = x * -1
    x.mul_(-1)  # x is -x0 from here: u + x = -2 x0, where the coefficients would cancel to 0
    return u + x


def _view_changed_between_uses(m, x):
    v = x.view(1, 6)
    u = v * -1
    x.mul_(-1)  # through x, v changes too
    return u + v


@pytest.mark.parametrize("fn", [_changed_between_uses, _view_changed_between_uses], ids=["value", "view"])
def test_paths_through_a_value_changed_in_place_are_not_combined(fn):
    report = lipfast.lipschitz_bound(_Combines(fn).eval(), (6,), progress=False)
    attained = _jacobian_norm_of(lambda t: _Combines(fn)(t), (6,), 0)
    assert attained == pytest.approx(2.0) and attained <= report.upper * (1 + 1e-12), report.notes


@pytest.mark.parametrize("form", ["python", "trace", "export"])
@pytest.mark.parametrize("fn, shape", [
    (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True), (2, 6, 8)),
    (lambda x: F.interpolate(x, size=(5, 7), mode="bilinear"), (2, 6, 8)),
    (lambda x: F.interpolate(x, scale_factor=3, mode="bicubic"), (1, 4, 5)),  # weights of both signs
    (lambda x: F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True), (2, 6, 8)),
    (lambda x: F.interpolate(x, size=(4, 5, 6), mode="trilinear"), (1, 3, 3, 3)),
    (lambda x: F.interpolate(x, size=(3, 5), mode="area"), (2, 7, 6)),
    (nn.AvgPool2d(3, 2, 1), (2, 7, 6)),  # the padding counted: border rows sum to less than 1
    (nn.AvgPool1d(4, 3, ceil_mode=True), (2, 11)),
    (nn.Upsample(scale_factor=2, mode="bicubic"), (1, 5, 4)),
    (nn.ReflectionPad2d((1, 2, 0, 1)), (2, 5, 6)),
], ids=["bilinear-corners", "bilinear-size", "bicubic", "antialias", "trilinear", "area", "avg-padded", "avg-ceil",
        "upsample-bicubic", "reflection-pad"])
def test_linear_resampling_gets_its_exact_norm(fn, shape, form):
    # each is a product of maps along the dims, one per channel: the norm is the product of the
    # dims' matrix norms, exactly (the row and column sums gave 2.157 for the first, 2.092 exact)
    model = _Applies(fn).double().eval()
    example = torch.randn(1, *shape, dtype=torch.float64)
    report = lipfast.lipschitz_bound(_in_form(model, example, form), shape, progress=False)
    J = torch.autograd.functional.jacobian(lambda t: model(t).reshape(-1), example).reshape(-1, example.numel())
    exact = float(torch.linalg.matrix_norm(J, 2))
    assert exact * (1 - 1e-12) <= report.upper <= exact * (1 + 1e-6), report.notes


class _Indexes(nn.Module):
    """x[index(self)] for stored index tensors a = [0, 1, 1, 2], b = [0, 2, -1] and a (3, 4) mask."""

    def __init__(self, index):
        super().__init__()
        self.index = index
        self.register_buffer("a", torch.tensor([0, 1, 1, 2]))
        self.register_buffer("b", torch.tensor([0, 2, -1]))
        self.register_buffer("mask", torch.tensor([[True, False, True, False], [False, False, True, True],
                                                   [True, True, False, False]]))

    def forward(self, x):
        return x[self.index(self)]


@pytest.mark.parametrize("form", ["python", "trace", "export", "core-aten"])
@pytest.mark.parametrize("index, copies", [
    (lambda m: (slice(None), slice(None), m.a[:, None], m.b[None, :]), 2),  # the pairs (1, b_j) twice each
    (lambda m: (slice(None), slice(None), m.a[:, None], m.a[None, :]), 4),  # (1, 1) four times
    (lambda m: (slice(None), slice(None), m.a[:3], m.b), 1),  # zipped: (0, 0), (1, 2), (1, 3): distinct
    (lambda m: (slice(None), slice(None), m.b, m.b + 1), 1),  # -1 is the last entry: (0, 1), (2, 3), (3, 4 - 4)
    (lambda m: (slice(None), 1, m.mask), 1),  # a mask over two dims: each set entry once
    (lambda m: (slice(None), m.a[1:3, None], m.mask), 2),  # rows [1, 1], each with the mask's entries
], ids=["outer", "outer-repeated", "zipped", "negative", "mask", "mask-broadcast"])
def test_indexing_with_several_stored_index_tensors_counts_copies_exactly(index, copies, form):
    model = _Indexes(index).double().eval()
    example = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    report = lipfast.lipschitz_bound(_in_form(model, example, form), (2, 3, 4), progress=False)
    J = torch.autograd.functional.jacobian(lambda t: model(t).reshape(-1), example).reshape(-1, example.numel())
    exact = float(torch.linalg.matrix_norm(J, 2))
    assert exact == pytest.approx(math.sqrt(copies), rel=1e-12)
    assert exact * (1 - 1e-12) <= report.upper <= exact * (1 + 1e-12), report.notes


# --- chains of layers bounded as one map (lipfast/_chains.py) ------------------------------------


def _explicit_linear_map(fn, shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix of the affine map fn's linear part on inputs of shape (float64)."""
    n = math.prod(shape)
    with torch.no_grad():
        return (fn(torch.eye(n, dtype=torch.float64).reshape(n, *shape)) -
                fn(torch.zeros(1, *shape, dtype=torch.float64))).reshape(n, -1).T


class _Block(nn.Module):
    """x -> c2(act(bn(c1(x)))), plus x where residual: a ResNet basic block, or two layers in a chain."""

    def __init__(self, c: int, k: int, mode: str, act: nn.Module, residual: bool, dilation: int = 1) -> None:
        super().__init__()
        pad = dilation * (k - 1) // 2
        self.c1 = nn.Conv2d(c, c, k, padding=pad, padding_mode=mode, dilation=dilation).double()
        self.bn = nn.BatchNorm2d(c).double()
        self.c2 = nn.Conv2d(c, c, k, padding=pad, padding_mode=mode, dilation=dilation).double()
        self.act, self.residual = act, residual
        with torch.no_grad():
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(-2, 2)
        self.eval()

    def forward(self, x):
        y = self.c2(self.act(self.bn(self.c1(x))))
        return x + y if self.residual else y


def _largest_over_slopes(A1: torch.Tensor, A2: torch.Tensor, a: float, b: float, residual: bool, seed: int) -> float:
    """max over sampled diagonal D (entries a or b, or uniform in [a, b]) of ‖A2 D A1 (+ I)‖: every
    change of the block between two inputs is such a map, so the bound must be above all of them."""
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    for t in range(200):
        r = torch.rand(A1.shape[0], generator=g, dtype=torch.float64)
        d = torch.where(r < 0.5, a, b).double() if t < 100 else a + (b - a) * r
        J = A2 @ (d[:, None] * A1)
        if residual:
            J = J + torch.eye(J.shape[0], dtype=torch.float64)
        best = max(best, float(torch.linalg.matrix_norm(J, 2)))
    return best


@pytest.mark.parametrize("mode", ["zeros", "circular"])
@pytest.mark.parametrize("act,a,b", [(nn.ReLU(), 0.0, 1.0), (nn.LeakyReLU(0.3), 0.3, 1.0), (nn.Tanh(), 0.0, 1.0),
                                     (nn.Sigmoid(), 0.0, 0.25)], ids=["relu", "leaky", "tanh", "sigmoid"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "chain"])
def test_conv_chains_bounded_as_one_map_are_sound(mode, act, a, b, residual):
    torch.manual_seed(3)
    block = _Block(3, 3, mode, act, residual, dilation=2 if mode == "zeros" else 1)
    shape = (3, 6, 6)
    report = lipfast.lipschitz_bound(block, shape, progress=False)
    A1 = _explicit_linear_map(lambda x: block.bn(block.c1(x)), shape)
    A2 = _explicit_linear_map(block.c2, shape)
    assert _largest_over_slopes(A1, A2, a, b, residual, seed=0) <= report.upper
    assert report.upper >= _max_jacobian_norm(block, shape)


@pytest.mark.parametrize("mode", ["circular", "linear"])
def test_residual_block_with_identity_activation_is_exact(mode):
    """LeakyReLU(1) is the identity: the block is the linear map I + A2 A1, whose norm the chain
    bound must reach (the rules' 1 + ‖A2‖ ‖A1‖ is far above it)."""
    torch.manual_seed(1)
    if mode == "circular":
        block, shape = _Block(4, 3, "circular", nn.LeakyReLU(1.0), True), (4, 5, 5)
    else:
        class Dense(nn.Module):
            def __init__(self):
                super().__init__()
                self.l1, self.l2, self.act = nn.Linear(8, 12).double(), nn.Linear(12, 8).double(), nn.LeakyReLU(1.0)

            def forward(self, x):
                return x + self.l2(self.act(self.l1(x)))
        block, shape = Dense().eval(), (8,)
    report = lipfast.lipschitz_bound(block, shape, rtol=1e-4, progress=False)
    exact = float(torch.linalg.matrix_norm(_explicit_linear_map(block, shape), 2))
    assert exact <= report.upper <= exact * (1 + 1e-3)
    assert any("+ its input: bounded as one map" in note for note in report.notes)


def test_chain_source_changed_in_place_is_not_bounded_as_one_map():
    """x + f(x) where x is scaled in place after f read it: the sum is 3 x + f(x), not x + f(x)."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(6, 6).double(), nn.Linear(6, 6).double()

        def forward(self, x):
            h = x * 1.0
            y = self.l2(torch.relu(self.l1(h)))
            h.mul_(3)
            return y + h

    torch.manual_seed(0)
    model = Scaled().eval().requires_grad_(False)
    report = lipfast.lipschitz_bound(model, (6,), progress=False)
    assert not any("bounded as one map" in note for note in report.notes)
    assert report.upper >= _max_jacobian_norm(model, (6,))


def test_resnet18_blocks_bounded_as_one_map():
    """The built-in ResNet-18: each of its eight blocks is bounded as one map (five with an identity
    skip, three with a 1x1 shortcut conv), which brings the network's bound from 654.5 (the rules
    alone) below 150."""
    from lipfast.models import resnet18_cifar

    report = lipfast.lipschitz_bound(resnet18_cifar(), (3, 32, 32), progress=False)
    chained = [note for note in report.notes if "bounded as one map" in note]
    assert len(chained) == 8 and sum("+ its input" in note for note in chained) == 5
    assert sum(".shortcut.1: bounded" in note for note in chained) == 3
    assert 100 < report.upper < 150


@pytest.mark.parametrize("mode", ["zeros", "circular"])
@pytest.mark.parametrize("act,a,b", [(nn.Sigmoid(), 0.0, 0.25), (nn.Tanh(), 0.0, 1.0)], ids=["sigmoid", "tanh"])
def test_chain_folds_a_batchnorm_of_one_scale_with_its_constant(mode, act, a, b):
    """One channel: the BatchNorm's scale is the same everywhere, so _folds leaves it to its own
    constant, and the chain folds it into the layer itself; the layer's bracket (of the unscaled
    weight) must then be scaled too (it was not: x + f(x) got 0.987 where 1 is attained)."""
    for seed in range(4):
        torch.manual_seed(seed)
        block = _Block(1, 1, mode, act, True)
        shape = (1, 4, 4)
        report = lipfast.lipschitz_bound(block, shape, progress=False)
        A1 = _explicit_linear_map(lambda x: block.bn(block.c1(x)), shape)
        A2 = _explicit_linear_map(block.c2, shape)
        assert _largest_over_slopes(A1, A2, a, b, True, seed=seed) <= report.upper


class _Downsampling(nn.Module):
    """A ResNet block that changes the shape: bn2(c2(act(bn1(c1 x)))) + shortcut(x), c1 and the 1x1
    shortcut conv of stride 2 (or, dense: Linear layers, the shortcut one too)."""

    def __init__(self, mode: str, act: nn.Module) -> None:
        super().__init__()
        if mode == "linear":
            self.c1, self.b1, self.c2, self.b2 = nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 4), nn.BatchNorm1d(4)
            self.shortcut = nn.Sequential(nn.Linear(6, 4, bias=False), nn.BatchNorm1d(4))
        else:
            self.c1 = nn.Conv2d(2, 3, 3, 2, 1, padding_mode=mode)
            self.b1, self.c2, self.b2 = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 3, 1, 1, padding_mode=mode), nn.BatchNorm2d(3)
            self.shortcut = nn.Sequential(nn.Conv2d(2, 3, 1, 2, bias=False), nn.BatchNorm2d(3))
        self.act = act
        with torch.no_grad():
            for norm in (self.b1, self.b2, self.shortcut[1]):
                norm.running_var.uniform_(0.5, 2.0)
                norm.weight.uniform_(-2, 2)
        self.double().eval()

    def forward(self, x):
        return self.b2(self.c2(self.act(self.b1(self.c1(x))))) + self.shortcut(x)


@pytest.mark.parametrize("mode", ["zeros", "circular", "linear"])
@pytest.mark.parametrize("act,a,b", [(nn.ReLU(), 0.0, 1.0), (nn.Tanh(), 0.0, 1.0)], ids=["relu", "tanh"])
def test_blocks_with_a_shortcut_layer_bounded_as_one_map_are_sound(mode, act, a, b):
    """S + A2 D A1 over sampled D, S the shortcut's map: never above the bound, which is the chain's."""
    torch.manual_seed(2)
    block = _Downsampling(mode, act)
    shape = (6,) if mode == "linear" else (2, 6, 6)
    report = lipfast.lipschitz_bound(block, shape, progress=False)
    assert any("+ shortcut.1: bounded as one map" in note for note in report.notes)
    mid = (5,) if mode == "linear" else (3, 3, 3)
    A1 = _explicit_linear_map(lambda x: block.b1(block.c1(x)), shape)
    A2 = _explicit_linear_map(lambda x: block.b2(block.c2(x)), mid)
    S = _explicit_linear_map(block.shortcut, shape)
    g = torch.Generator().manual_seed(0)
    for t in range(200):
        r = torch.rand(A1.shape[0], generator=g, dtype=torch.float64)
        d = torch.where(r < 0.5, a, b).double() if t < 100 else a + (b - a) * r
        assert float(torch.linalg.matrix_norm(S + A2 @ (d[:, None] * A1), 2)) <= report.upper
