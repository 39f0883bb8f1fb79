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


def test_bad_arguments():
    logits, labels = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="lipschitz"):
        lipfast.certified_radius(logits, labels, 0.0)
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
    ours, torchs = results["lipfast"], results["torch"]
    assert ours["lipschitz"] <= 1.001 + 1e-3  # operator mode after converge: every layer's norm is 1
    for r in (ours, torchs):
        assert 0.5 < r["clean"] <= 1
        values = [r["certified"][radius] for radius in digits.RADII]
        assert all(a >= b for a, b in zip([r["clean"]] + values, values))  # monotone in the radius
