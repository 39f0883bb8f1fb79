"""Certified robustness on a real data set: scikit-learn's bundled digits (1,797 8x8 images).

    python examples/digits.py            # trains three small CNNs (about half a minute), prints the table

The same CNN (conv 1->16, 3x3, pad 1; ReLU; conv 16->32, 3x3, stride 2, pad 1; ReLU; linear 512->10)
is trained twice: with lipfast's operator-mode spectral normalization (every layer's TRUE operator
norm is 1) and with torch's matrix-mode spectral_norm (the kernel reshaped to a matrix has norm 1;
the convolution itself does not).  A third network is 1-Lipschitz by construction (AOL-rescaled
stride-1 convs, GroupSort, a Björck-orthonormalized last layer: lipfast.nn's blocks) and is trained
with lipfast.nn.LipschitzMarginLoss for radius 0.25.  Then, in eval mode:

* L, a certified L2 Lipschitz bound of the network (lipfast.lipschitz_bound: every layer's certified
  upper bound, composed over the network's graph);
* the clean test accuracy, and the certified accuracy at L2 radii 0.1, 0.25 and 0.5 (pixels in
  [0, 1]): the fraction of test images classified correctly with a certified radius above the
  radius, the radius being lipfast.certified_radius with the last layer's rows (pairwise margins).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import lipfast

RADII = (0.1, 0.25, 0.5)


def load_digits(seed: int = 0):
    """(train_x, train_y, test_x, test_y): images (N, 1, 8, 8) scaled to [0, 1], a seeded 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits  # ships with scikit-learn: no download

    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def make_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def normalized(kind: str, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = make_cnn()
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            if kind == "lipfast":
                lipfast.nn.spectral_norm(layer, mode="operator")
            else:
                parametrizations.spectral_norm(layer)
    return model


def one_lipschitz(seed: int) -> nn.Sequential:
    """1-Lipschitz by construction: AOL-rescaled stride-1 convs, GroupSort, a Björck-orthonormalized
    last layer (the same widths as make_cnn, without the stride: AOL is for stride-1 convs)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), lipfast.nn.GroupSort(2),
        nn.Conv2d(16, 32, 3, padding=1), lipfast.nn.GroupSort(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )
    lipfast.nn.aol(model[0])
    lipfast.nn.aol(model[2])
    lipfast.nn.orthogonal(model[5])
    return model


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, loss_fn=None) -> None:
    """Adam on loss_fn(logits, y); by default the cross-entropy of 8 * logits (a 1-Lipschitz network's
    logits are small)."""
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(8.0 * logits, target))
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(64):
            opt.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            opt.step()


def lipschitz_upper(model: nn.Module) -> float:
    """A certified L2 Lipschitz bound of the network (lipfast.lipschitz_bound composes its layers)."""
    return lipfast.lipschitz_bound(model, (1, 8, 8), progress=False).upper


def evaluate(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        # the network before its last layer, and that layer's rows: pairwise margins
        L = lipschitz_upper(model[:-1])
        radius = lipfast.certified_radius(logits, y, L, last_layer_weight=model[-1].weight)
    correct = logits.argmax(1) == y
    return dict(
        lipschitz=lipschitz_upper(model),
        clean=float(correct.float().mean()),
        certified={r: float((correct & (radius > r)).float().mean()) for r in RADII},
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    train_x, train_y, test_x, test_y = load_digits(args.seed)
    results = {}
    for kind in ("lipfast", "torch"):
        model = normalized(kind, args.seed)
        train(model, train_x, train_y, args.epochs, args.seed)
        lipfast.nn.converge(model)  # lipfast's iterates to convergence (torch's are left as trained)
        results[kind] = evaluate(model, test_x, test_y)
    # the 1-Lipschitz network, trained with the margin loss for radius 0.25
    model = one_lipschitz(args.seed)
    train(model, train_x, train_y, args.epochs, args.seed,
          lipfast.nn.LipschitzMarginLoss(eps=0.25, temperature=0.125))
    results["1-lipschitz"] = evaluate(model, test_x, test_y)
    print(f"digits: {len(train_y)} training and {len(test_y)} test images (8x8, pixels in [0, 1]), "
          f"{args.epochs} epochs\n")
    print("| spectral norm | Lipschitz bound | clean | " + " | ".join(f"certified @ {r}" for r in RADII) + " |")
    print("|---|---|---|" + "---|" * len(RADII))
    names = {"lipfast": "lipfast, mode='operator'", "torch": "torch (matrix)",
             "1-lipschitz": "1-Lipschitz blocks + margin loss"}
    for kind, r in results.items():
        print(f"| {names[kind]} | {r['lipschitz']:.3f} | {r['clean']:.3f} | "
              + " | ".join(f"{r['certified'][radius]:.3f}" for radius in RADII) + " |")
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
