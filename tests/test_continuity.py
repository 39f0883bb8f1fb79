"""k-volatility (knowledge continuity) against a brute-force float64 implementation of the definition."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lipfast
from lipfast import _ext, reference

from conftest import require_ext


def brute_force(hidden: torch.Tensor, losses: torch.Tensor, delta: float | None = None):
    """The definition, pair by pair, in float64 from the rows as stored: (score, per_sample, counts)."""
    H = hidden.detach().cpu().double().reshape(hidden.shape[0], -1)
    ell = losses.detach().cpu().double()
    n = H.shape[0]
    i, j = torch.triu_indices(n, n, 1)
    # exact power-of-two scaling, so that tiny and huge rows neither underflow nor overflow
    e = math.frexp(float(H.abs().max())) if H.numel() else (0.5, 0)
    d = (H[i] * 2.0 ** -e[1] - H[j] * 2.0 ** -e[1]).norm(dim=1) * 2.0 ** e[1]
    dl = (ell[i] - ell[j]).abs()
    valid = d > 0
    if delta is not None:
        valid &= d <= delta
    ratio = torch.where(valid, dl / torch.where(valid, d, 1.0), 0.0)
    per_sum = torch.zeros(n, dtype=torch.float64).index_add_(0, i, ratio).index_add_(0, j, ratio)
    per_count = torch.zeros(n, dtype=torch.float64).index_add_(0, i, valid.double()).index_add_(0, j, valid.double())
    zero = d == 0
    counts = (int(valid.sum()), int(zero.sum()), int((zero & (dl > 0)).sum()))
    return float(ratio.sum() / valid.sum()), per_sum / per_count, counts


def with_duplicates(n: int, d: int, seed: int, dtype=torch.float32):
    """Random rows and losses, with repeated rows: some with equal losses, some with different ones."""
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    ell = torch.rand(n, generator=g, dtype=torch.float64)
    if n < 6:
        return H, ell
    H[1] = H[0]  # equal losses: a zero-distance pair, no discontinuity
    ell[1] = ell[0]
    H[2] = H[0]  # a different loss: two discontinuities (with 0 and with 1)
    H[n - 1] = H[n // 2]  # across tiles, different losses
    if d > 0:
        H[4, 0] = 0.0
        H[3] = H[4]
        H[3, 0] = -0.0  # equal to +0: still the same row
    return H, ell


def middle_distance(H: torch.Tensor) -> float:
    """A cut near the median pair distance, in the widest gap between neighbouring distances there, so
    that no pair sits on the boundary d_ij = delta (where rounding decides)."""
    n = H.shape[0]
    i, j = torch.triu_indices(n, n, 1)
    d = (H[i].double() - H[j].double()).norm(dim=1).sort().values
    m = d.numel() // 2
    window = d[max(m - 50, 0) : m + 51]
    k = int(window.diff().argmax())
    return float(window[k] + window[k + 1]) / 2


def assert_matches(result, expected, rtol):
    score, per_sample, counts = result
    e_score, e_per, e_counts = expected
    assert counts == e_counts
    if math.isnan(e_score):
        assert math.isnan(score)
    else:
        assert score == pytest.approx(e_score, rel=rtol)
    per = per_sample.cpu()
    assert torch.equal(torch.isnan(per), torch.isnan(e_per))
    ok = ~torch.isnan(e_per)
    torch.testing.assert_close(per[ok], e_per[ok], rtol=rtol, atol=0)


def run(hidden, losses, **kw):
    kc = lipfast.continuity._layer_volatility("volatility", hidden, losses, kw.get("delta"), kw.get("max_pairs"), 0)
    return kc.score, kc.per_sample, (kc.pairs, kc.zero_distance_pairs, kc.discontinuities)


@pytest.mark.parametrize("n,d", [(2, 1), (7, 3), (300, 24), (1100, 9), (2100, 5)])
@pytest.mark.parametrize("delta", [None, "median"])
def test_against_brute_force(backend, device, n, d, delta):
    H, ell = with_duplicates(n, d, seed=n + d)
    if delta == "median":
        delta = middle_distance(H) if n > 2 else 1.0
    expected = brute_force(H, ell, delta)
    assert_matches(run(H.to(device), ell.to(device), delta=delta), expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(backend, device, dtype):
    H, ell = with_duplicates(600, 12, seed=3, dtype=dtype)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_matches(run(H.to(device), ell.to(device)), brute_force(H, ell), rtol=rtol)


def test_cancellation(backend, device):
    # Rows far from the origin and close to each other: |h|² − 2 h·h' + |h'|² cancels almost
    # entirely without centring, and some pairs differ in one low-order bit only.
    g = torch.Generator().manual_seed(5)
    base = 1000 + torch.randn(1, 32, generator=g, dtype=torch.float64)
    H = (base + 1e-3 * torch.randn(400, 32, generator=g, dtype=torch.float64)).float()
    H[10] = H[11]
    H[10, 5] = torch.nextafter(H[11, 5], torch.tensor(math.inf))  # one ulp apart: tiny but not 0
    ell = torch.rand(400, generator=g, dtype=torch.float64)
    expected = brute_force(H, ell)
    assert expected[2] == (400 * 399 // 2, 0, 0)
    assert_matches(run(H.to(device), ell.to(device)), expected, rtol=1e-5)


@pytest.mark.parametrize("scale,dtype", [(1e-30, torch.float32), (1e30, torch.float32), (1e-300, torch.float64), (1e250, torch.float64)])
def test_extreme_scales(backend, device, scale, dtype):
    H, ell = with_duplicates(200, 6, seed=9, dtype=torch.float64)
    H = (H * scale).to(dtype)
    assert_matches(run(H.to(device), ell.to(device)), brute_force(H, ell), rtol=1e-5)


def test_all_rows_equal_and_empty_rows(backend, device):
    H = torch.ones(50, 4, device=device)
    ell = torch.arange(50.0, device=device) % 3
    score, per, counts = run(H, ell)
    assert math.isnan(score) and torch.isnan(per).all()
    pairs = 50 * 49 // 2
    equal_loss = sum(k * (k - 1) // 2 for k in (17, 17, 16))
    assert counts == (0, pairs, pairs - equal_loss)
    score, per, counts = run(torch.empty(5, 0, device=device), torch.rand(5, device=device))
    assert counts == (0, 10, 10)


def test_delta_excludes_everything(backend):
    H, ell = with_duplicates(30, 3, seed=1)
    score, per, counts = run(H, ell, delta=1e-9)
    assert math.isnan(score) and torch.isnan(per).all() and counts[0] == 0
    assert counts == brute_force(H, ell, 1e-9)[2]


def test_public_function_and_shapes(backend, device):
    H, ell = with_duplicates(40, 6, seed=2)
    H = H.reshape(40, 2, 3).to(device)
    score, per_sample = lipfast.volatility(H, ell.float().to(device))
    e_score, e_per, _ = brute_force(H, ell.float())
    assert score.dtype == torch.float64 and score.shape == () and score.device.type == device.type
    assert per_sample.shape == (40,) and per_sample.dtype == torch.float64
    assert float(score) == pytest.approx(e_score, rel=1e-6)
    # non-contiguous input, integer losses
    Ht = torch.randn(6, 50, device=device).T
    li = torch.arange(50, device=device) % 2
    s1, p1 = lipfast.volatility(Ht, li)
    s2, p2 = lipfast.volatility(Ht.contiguous(), li.double())
    assert float(s1) == pytest.approx(float(s2), rel=1e-12)


def test_backends_agree():
    require_ext()
    H, ell = with_duplicates(1500, 20, seed=11)
    with lipfast.set_backend("cpp"):
        cpp = run(H, ell, delta=6.0)
    with lipfast.set_backend("python"):
        py = run(H, ell, delta=6.0)
    assert cpp[2] == py[2]
    assert cpp[0] == pytest.approx(py[0], rel=1e-9)
    torch.testing.assert_close(cpp[1], py[1], rtol=1e-9, atol=0, equal_nan=True)


def test_deterministic(backend, device):
    H, ell = with_duplicates(2500, 16, seed=4)
    H, ell = H.to(device), ell.to(device)
    a = lipfast.volatility(H, ell)
    b = lipfast.volatility(H, ell)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_op_registration(device):
    require_ext()
    assert device.type in _ext._KERNELS["pairwise_volatility"]
    H, ell = with_duplicates(20, 4, seed=6)
    H, ell = H.to(device), ell.to(device)
    torch.library.opcheck(torch.ops.lipfast.pairwise_volatility.default, (H, ell, None))
    torch.library.opcheck(torch.ops.lipfast.pairwise_volatility.default, (H.double(), ell, 2.5))


def test_sampled(backend, device):
    H, ell = with_duplicates(300, 8, seed=8)
    H, ell = H.to(device), ell.to(device)
    total = 300 * 299 // 2
    exact = lipfast.continuity._layer_volatility("volatility", H, ell, None, None, 0)
    full = lipfast.continuity._layer_volatility("volatility", H, ell, None, total, 0)
    assert not exact.sampled and not full.sampled and full.pairs == exact.pairs
    s = lipfast.continuity._layer_volatility("volatility", H, ell, None, 20000, 0)
    again = lipfast.continuity._layer_volatility("volatility", H, ell, None, 20000, 0)
    other = lipfast.continuity._layer_volatility("volatility", H, ell, None, 20000, 1)
    assert s.sampled and s.pairs <= 20000 and s.score == again.score and s.score != other.score
    # a uniform sample of 20,000 pairs: the mean ratio within a few standard errors of the exact one
    assert s.score == pytest.approx(exact.score, rel=0.05)
    # a sample from a small set must hit the zero-distance pairs and count them
    H2, ell2 = with_duplicates(5, 3, seed=8)
    small = lipfast.continuity._layer_volatility("volatility", H2.to(device), ell2.to(device), None, 9, 3)
    e_score, _, e_counts = brute_force(H2, ell2)
    assert small.sampled and small.pairs + small.zero_distance_pairs == 9


def test_sampled_matches_definition_on_its_pairs():
    # With the generator's draws replayed, the sampled statistics are the definition on those pairs.
    H, ell = with_duplicates(50, 4, seed=12)
    score, per, counts = reference.sampled_volatility(H, ell, None, 500, seed=3)
    g = torch.Generator().manual_seed(3)
    i = torch.randint(50, (500,), generator=g)
    j = torch.randint(49, (500,), generator=g)
    j += j >= i
    d = (H[i].double() - H[j].double()).norm(dim=1)
    dl = (ell[i] - ell[j]).abs()
    ok = d > 0
    assert int(counts[0]) == int(ok.sum()) and int(counts[1]) == int((~ok).sum())
    assert float(score) == pytest.approx(float((dl[ok] / d[ok]).mean()), rel=1e-12)


@pytest.mark.parametrize(
    "hidden,losses,kw,error,match",
    [
        ("nan", None, {}, ValueError, "hidden has a NaN or Inf entry \\(row 3\\)"),
        ("inf", None, {}, ValueError, "hidden has a NaN or Inf entry"),
        (None, "nan", {}, ValueError, "losses has a NaN or Inf entry \\(row 2\\)"),
        ("one", None, {}, ValueError, "at least 2 examples"),
        (None, "short", {}, ValueError, "losses must be \\(n,\\)"),
        (None, "2d", {}, ValueError, "losses must be \\(n,\\)"),
        ("int", None, {}, TypeError, "hidden must be a floating-point"),
        ("list", None, {}, TypeError, "hidden must be a torch.Tensor"),
        (None, None, {"delta": 0.0}, ValueError, "delta must be a positive number"),
        (None, None, {"delta": -1.0}, ValueError, "delta must be a positive number"),
        (None, None, {"delta": float("nan")}, ValueError, "delta must be a positive number"),
        (None, None, {"max_pairs": 0}, ValueError, "max_pairs must be an int >= 1"),
        (None, None, {"seed": 1.5}, ValueError, "seed must be an int"),
    ],
)
def test_bad_input(hidden, losses, kw, error, match):
    H = torch.randn(10, 4)
    ell = torch.rand(10)
    if hidden == "nan":
        H[3, 1] = math.nan
    elif hidden == "inf":
        H[0, 0] = math.inf
    elif hidden == "one":
        H, ell = H[:1], ell[:1]
    elif hidden == "int":
        H = torch.ones(10, 4, dtype=torch.int64)
    elif hidden == "list":
        H = H.tolist()
    if losses == "nan":
        ell[2] = math.nan
    elif losses == "short":
        ell = ell[:9]
    elif losses == "2d":
        ell = ell[:, None]
    with pytest.raises(error, match=match):
        lipfast.volatility(H, ell, **kw)


# ---------------------------------------------------------------------------------------------------
# The penalty

def test_penalty_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    H = torch.randn(9, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ell = torch.rand(9, generator=g, dtype=torch.float64, requires_grad=True)
    value = lipfast.knowledge_continuity_penalty(H, ell, eps=1e-3)
    Hf, ell_ = H.detach().reshape(9, -1), ell.detach()
    expected = sum(
        abs(float(ell_[i] - ell_[j])) / (float((Hf[i] - Hf[j]).norm()) + 1e-3) for i in range(9) for j in range(i + 1, 9)
    ) / 36
    assert value.item() == pytest.approx(expected, rel=1e-12)
    torch.autograd.gradcheck(lambda h, l: lipfast.knowledge_continuity_penalty(h, l, eps=1e-3), (H, ell))


def test_penalty_equal_rows_and_dtypes():
    H = torch.randn(6, 4)
    H[1] = H[0]
    H.requires_grad_(True)
    ell = torch.rand(6)
    value = lipfast.knowledge_continuity_penalty(H, ell)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(H.grad).all()
    half = lipfast.knowledge_continuity_penalty(H.detach().bfloat16(), ell)
    assert half.dtype == torch.float32 and torch.isfinite(half)


@pytest.mark.parametrize(
    "kw,error,match",
    [
        ({"eps": 0.0}, ValueError, "eps must be a positive finite number"),
        ({"eps": math.inf}, ValueError, "eps must be a positive finite number"),
        ({"losses": torch.rand(5)}, ValueError, "losses must be \\(n,\\)"),
        ({"hidden": torch.randn(1, 3)}, ValueError, "at least 2 examples"),
    ],
)
def test_penalty_bad_input(kw, error, match):
    args = {"hidden": torch.randn(6, 3), "losses": torch.rand(6)}
    eps = kw.pop("eps", 1e-6)
    args.update(kw)
    if "losses" not in kw and args["hidden"].shape[0] != 6:
        args["losses"] = torch.rand(args["hidden"].shape[0])
    with pytest.raises(error, match=match):
        lipfast.knowledge_continuity_penalty(args["hidden"], args["losses"], eps=eps)


# ---------------------------------------------------------------------------------------------------
# The model-level function

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8), nn.BatchNorm1d(8))
        self.pair = PairOut()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.body(x)
        h, _ = self.pair(h)
        return self.head(h)


class PairOut(nn.Module):
    def forward(self, x):
        return torch.tanh(x), x.sum()


def test_model_level_against_hooks(backend, device):
    torch.manual_seed(0)
    model = Net().to(device).train()
    x = torch.randn(70, 5, device=device)
    x[5] = x[4]  # equal inputs: equal representations at every layer, equal losses
    y = torch.randint(0, 3, (70,), device=device)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    running_mean = model.body[4].running_mean.clone()
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    kc = lipfast.knowledge_continuity(model, batches, loss_fn, ["body.1", "pair", "head"], progress=False)
    assert list(kc) == ["body.1", "pair", "head"]
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.body[4].running_mean, running_mean)
    # by hand, in eval mode
    model.eval()
    with torch.no_grad():
        h1 = model.body[1](model.body[0](x))
        h2 = torch.tanh(model.body(x))
        out = model.head(h2)
        ell = loss_fn(out, y)
    for name, h in (("body.1", h1), ("pair", h2), ("head", out)):
        score, per, counts = brute_force(h, ell)
        r = kc[name]
        assert not r.sampled
        assert (r.pairs, r.zero_distance_pairs, r.discontinuities) == counts
        assert r.score == pytest.approx(score, rel=1e-5)
        torch.testing.assert_close(r.per_sample.cpu(), per, rtol=1e-5, atol=0, equal_nan=True)
    assert kc["head"].zero_distance_pairs >= 1
    assert "k-volatility" in str(kc) and "body.1" in str(kc) and "valid pairs" in str(kc["head"])


def test_model_level_options():
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Embedding(20, 6), nn.Linear(6, 4))
    model = nn.Sequential(seq, Pool())
    tokens = torch.randint(0, 20, (40, 7))
    targets = torch.randn(40)
    loss_fn = lambda out, t: (out.squeeze(1) - t) ** 2  # noqa: E731
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, targets), batch_size=16)
    kc = lipfast.knowledge_continuity(model, data, loss_fn, "0.1", progress=False, delta=2.0, max_pairs=10**9)
    kf = lipfast.knowledge_continuity(model, (tokens, targets), loss_fn, ["0.1"], progress=False, pool="flatten")
    with torch.no_grad():
        h = seq(tokens)
        ell = loss_fn(model(tokens), targets)
    assert kc["0.1"].score == pytest.approx(brute_force(h.mean(dim=1), ell, 2.0)[0], rel=1e-5)
    assert kf["0.1"].score == pytest.approx(brute_force(h.reshape(40, -1), ell)[0], rel=1e-5)
    ks = lipfast.knowledge_continuity(model, (tokens, targets), loss_fn, ["0.1"], progress=False, max_pairs=100)
    assert ks["0.1"].sampled and ks["0.1"].pairs <= 100


class Pool(nn.Module):
    def forward(self, h):
        return h.mean(dim=(1, 2))[:, None]


def test_model_level_bad_input():
    model = Net()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    loss = nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(ValueError, match="unknown layer name\\(s\\) 'body.9'; the model's layers are 'body', 'body.0'"):
        lipfast.knowledge_continuity(model, (x, y), loss, ["body.9"], progress=False)
    with pytest.raises(ValueError, match="reduction='none'"):
        lipfast.knowledge_continuity(model, (x, y), nn.CrossEntropyLoss(), ["head"], progress=False)
    with pytest.raises(ValueError, match="layers must be"):
        lipfast.knowledge_continuity(model, (x, y), loss, [], progress=False)
    with pytest.raises(ValueError, match="data holds no batches"):
        lipfast.knowledge_continuity(model, [], loss, ["head"], progress=False)
    with pytest.raises(TypeError, match="data must be"):
        lipfast.knowledge_continuity(model, 3, loss, ["head"], progress=False)
    with pytest.raises(ValueError, match="pool must be"):
        lipfast.knowledge_continuity(model, (x, y), loss, ["head"], progress=False, pool="max")
    x[2, 0] = math.nan
    with pytest.raises(ValueError, match="hidden has a NaN or Inf entry \\(row 2\\)"):
        lipfast.knowledge_continuity(model, (x, y), loss, ["head"], progress=False)
    assert model.training


def test_large_n_never_materializes_pairs():
    """n = 50,000: an n × n float32 matrix would be 10 GB; the kernel's peak memory stays small."""
    require_ext()
    script = textwrap.dedent(
        """
        import torch, lipfast
        n, d = 50000, 8
        H = torch.randn(n, d); ell = torch.rand(n)
        def peak():
            return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
        open('/proc/self/clear_refs', 'w').write('5')
        before = peak()
        score, per = lipfast.volatility(H, ell)
        print(peak() - before, float(score), int(torch.isnan(per).sum()))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=os.environ)
    growth, score, nans = out.stdout.split()
    assert int(growth) < 200 * 2**20, f"peak memory grew by {int(growth) / 2**20:.0f} MiB"
    assert math.isfinite(float(score)) and int(nans) == 0
