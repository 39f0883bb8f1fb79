"""Certified radius against its formulas, and the digits example end to end."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import lipfast


def test_global_radius_formula():
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.2, 0.9, 0.1], [1.0, 1.0, 0.0], [0.0, 2.0, 5.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    r = lipfast.certified_radius(logits, labels, 2.0)
    expected = torch.tensor([2.0, 0.7, 0.0, 0.0], dtype=torch.float64) / (math.sqrt(2) * 2.0)
    torch.testing.assert_close(r, expected)  # a tie and a misclassified example have radius 0


def test_pairwise_radius_formula_and_soundness():
    torch.manual_seed(0)
    W = torch.randn(4, 6, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    features = torch.randn(50, 6, dtype=torch.float64)
    logits = features @ W.T + b
    labels = logits.argmax(1)
    labels[:5] = (labels[:5] + 1) % 4  # some misclassified
    r = lipfast.certified_radius(logits, labels, 1.0, last_layer_weight=W)
    for i in range(50):
        y = int(labels[i])
        pairs = [max(float(logits[i, y] - logits[i, j]), 0.0) / float((W[y] - W[j]).norm()) for j in range(4) if j != y]
        assert abs(float(r[i]) - min(pairs)) <= 1e-12 * max(1.0, min(pairs))
    assert (r[:5] == 0).all()
    # the identity network has Lipschitz constant 1: no perturbation inside the radius flips the class
    for i in range(5, 50):
        for _ in range(20):
            delta = torch.randn(6, dtype=torch.float64)
            delta *= 0.999 * float(r[i]) / delta.norm()
            assert int((((features[i] + delta) @ W.T) + b).argmax()) == int(labels[i])
    # the pairwise radius is never below the global one for the same network
    global_r = lipfast.certified_radius(logits, labels, float(torch.linalg.matrix_norm(W, 2)))
    assert (r >= global_r * (1 - 1e-12)).all()


def test_pairwise_radius_with_near_rows_in_float32():
    # two class rows 0.0155 apart at norm 160: the distance must come from their difference, not
    # from ‖a‖^2 + ‖b‖^2 - 2 a.b (which gave 0 in float32, and an infinite radius against class 1)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 256, generator=g) * 10
    W[1] = W[0] + 1e-3 * torch.randn(256, generator=g)
    features = torch.randn(8, 256, generator=g)
    logits = features @ W.T
    labels = torch.zeros(8, dtype=torch.int64)
    logits[:, 0] = logits[:, 2:].max(dim=1).values + 5.0  # class 0 wins, by little over class 1 only:
    logits[:, 1] = logits[:, 0] - 1e-4                      # the pair (0, 1) sets every radius
    r = lipfast.certified_radius(logits, labels, 1.0, last_layer_weight=W)
    assert r.dtype == torch.float32
    W64, z = W.double(), logits.double()
    for i in range(8):
        exact = min(float(z[i, 0] - z[i, j]) / float((W64[0] - W64[j]).norm()) for j in range(1, 40))
        assert abs(float(r[i]) - exact) <= 1e-6 * exact


def test_a_constant_network_certifies_every_correct_example():
    # lipschitz 0: the logits never change, so a correct prediction holds at any radius
    logits = torch.tensor([[3.0, 1.0], [0.5, 0.5], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 0])
    expected = torch.tensor([math.inf, 0.0, 0.0])
    torch.testing.assert_close(lipfast.certified_radius(logits, labels, 0.0), expected)
    W = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # equal rows too: still no NaN
    torch.testing.assert_close(lipfast.certified_radius(logits, labels, 0.0, last_layer_weight=W), expected)


@pytest.mark.parametrize("scale", [1.0, 1e-170, 1e170, 1e-310])
def test_radius_is_never_above_the_exact_formula(scale):
    # Computed in float64 with its roundings taken off, then rounded down: never above the exact
    # ratio (fractions.Fraction arithmetic here), whatever the dtype or the weight's scale; squares
    # of entries beyond 2^±511 once made the distance 0 or inf (radius inf or 0).
    from fractions import Fraction

    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 7, generator=g, dtype=torch.float64) * scale
    W[3] = W[2]  # equal rows: an infinite radius against that class
    logits = torch.randn(30, 5, generator=g, dtype=torch.float64)
    labels = logits.argmax(1)
    L = 0.3
    for dtype in (torch.float64, torch.float32):
        z = logits.to(dtype)
        r_global = lipfast.certified_radius(z, labels, L)
        r_pair = lipfast.certified_radius(z, labels, L, last_layer_weight=W)
        assert r_global.dtype == r_pair.dtype == dtype
        largest = Fraction(torch.finfo(dtype).max) ** 2

        def check(radius: float, exact_sq: Fraction) -> None:  # radius <= sqrt(exact_sq), and close to it
            assert math.isfinite(radius) and Fraction(radius) ** 2 <= exact_sq
            if exact_sq > Fraction(torch.finfo(dtype).tiny) ** 2:  # below that, 0 is the rounding down
                assert Fraction(radius) ** 2 >= Fraction(998, 1000) * min(exact_sq, largest)

        for i in range(30):
            y = int(labels[i])
            zi = [Fraction(float(v)) for v in z[i].double()]
            gaps = [zi[y] - zi[j] for j in range(5) if j != y]
            check(float(r_global[i]), min(gaps) ** 2 / (2 * Fraction(L) ** 2))  # squared: sqrt(2) stays exact
            pairs = []
            for j in range(5):
                if j == y:
                    continue
                d2 = sum((Fraction(float(a)) - Fraction(float(b))) ** 2 for a, b in zip(W[y], W[j]))
                if d2 == 0:
                    continue  # equal rows: no bound from this pair
                pairs.append((zi[y] - zi[j]) ** 2 / (Fraction(L) ** 2 * d2))
            check(float(r_pair[i]), min(pairs))
    equal = torch.tensor([[1.0, 0.0, 0.0, 3.0, 2.0]], dtype=torch.float64)
    assert float(lipfast.certified_radius(equal, torch.tensor([3]), L, last_layer_weight=W)) < math.inf
    only_equal = torch.tensor([[0.0, 0.0, 1.0, 0.5, 0.0]], dtype=torch.float64)
    W2 = W.clone()
    W2[[0, 1, 4]] = W[2]  # every competitor's row equals the label's
    assert float(lipfast.certified_radius(only_equal, torch.tensor([2]), L, last_layer_weight=W2)) == math.inf
    assert (lipfast.certified_radius(logits, labels, math.inf, last_layer_weight=W) == 0).all()


def test_bad_arguments():
    logits, labels = torch.randn(3, 4), torch.tensor([0, 1, 2])
    for bad in (-1.0, math.nan, torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="lipschitz"):
            lipfast.certified_radius(logits, labels, bad)
    with pytest.raises(ValueError, match="labels"):
        lipfast.certified_radius(logits, torch.tensor([0, 1, 4]), 1.0)
    with pytest.raises(ValueError, match="labels"):
        lipfast.certified_radius(logits, labels.float(), 1.0)
    with pytest.raises(ValueError, match="logits"):
        lipfast.certified_radius(torch.randn(3), labels, 1.0)
    with pytest.raises(ValueError, match="last_layer_weight"):
        lipfast.certified_radius(logits, labels, 1.0, last_layer_weight=torch.randn(5, 2))
    assert (lipfast.certified_radius(logits, labels, math.inf) == 0).all()


def test_digits_example_runs():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import digits

    results = digits.main(["--epochs", "4"])
    ours, torchs, blocks = results["lipfast"], results["torch"], results["1-lipschitz"]
    assert ours["lipschitz"] <= 1.001 + 1e-3  # operator mode after converge: every layer's norm is 1
    assert blocks["lipschitz"] <= 1 + 1e-3  # 1-Lipschitz by construction, up to Björck's residual
    for r in (ours, torchs, blocks):
        assert 0.5 < r["clean"] <= 1
        values = [r["certified"][radius] for radius in digits.RADII]
        assert all(a >= b for a, b in zip([r["clean"]] + values, values))  # monotone in the radius


def test_no_attack_succeeds_inside_the_certified_radius():
    """PGD in L2 (40 steps) on a digits CNN trained with operator-mode spectral norm: no image the
    model classifies correctly changes class within its certified radius."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import digits

    train_x, train_y, test_x, test_y = digits.load_digits(0)
    model = digits.normalized("lipfast", 0)
    digits.train(model, train_x, train_y, epochs=5, seed=0)
    lipfast.nn.converge(model)
    model.eval()
    x, y = test_x[:120], test_y[:120]
    with torch.no_grad():
        logits = model(x)
        L = lipfast.lipschitz_bound(model[:-1], (1, 8, 8), progress=False).upper
        radius = lipfast.certified_radius(logits, y, L, last_layer_weight=model[-1].weight)
    keep = (logits.argmax(1) == y) & (radius > 0)
    x, y, radius = x[keep], y[keep], radius[keep]
    assert len(y) > 50
    delta = torch.zeros_like(x, requires_grad=True)
    step = (radius / 10).view(-1, 1, 1, 1)
    for _ in range(40):
        logits = model(x + delta)
        others = logits.clone()
        others[torch.arange(len(y)), y] = -math.inf
        loss = (others.max(1).values - logits[torch.arange(len(y)), y]).sum()  # push the runner-up up
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta += step * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            norms = delta.flatten(1).norm(dim=1)
            delta *= (torch.minimum(norms, radius * 0.999) / norms.clamp_min(1e-12)).view(-1, 1, 1, 1)
    with torch.no_grad():
        assert (model(x + delta).argmax(1) == y).all()
        # and the attack did move the margins: it is a real attack, not a no-op
        margin_after = model(x + delta).gather(1, y[:, None]) - model(x + delta).topk(2).values[:, 1:]
        margin_before = model(x).gather(1, y[:, None]) - model(x).topk(2).values[:, 1:]
        assert (margin_after < margin_before).float().mean() > 0.9
