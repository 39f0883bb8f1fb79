"""Knowledge continuity on a real data set: scikit-learn's bundled digits (1,797 8x8 images).

    python examples/knowledge_continuity.py      # trains two small MLPs (a few seconds), prints the table

The same MLP (64 -> 128 -> 128 -> 10, ReLU) is trained twice with cross-entropy: plainly, and with
lipfast.knowledge_continuity_penalty on both hidden layers added to the loss (weight --weight).  Then,
on the test images, lipfast.knowledge_continuity gives every layer's k-volatility (the mean over all
pairs of test images of |loss_i - loss_j| / ‖h_i - h_j‖), with the test accuracy of each model.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import lipfast

LAYERS = ["1", "3", "4"]  # the two hidden representations (after ReLU) and the logits


def load_digits(seed: int = 0):
    """(train_x, train_y, test_x, test_y): flattened images (N, 64) in [0, 1], a seeded 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits  # ships with scikit-learn: no download

    data = sklearn_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def make_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def train(x: torch.Tensor, y: torch.Tensor, weight: float, epochs: int, seed: int) -> nn.Sequential:
    """Adam, batches of 128; with weight > 0 the penalty of both hidden layers is added to the loss."""
    torch.manual_seed(seed)
    model = make_mlp()
    hidden: dict[str, torch.Tensor] = {}
    for name in ("1", "3"):
        model.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: hidden.__setitem__(name, out))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(128):
            losses = F.cross_entropy(model(x[batch]), y[batch], reduction="none")
            loss = losses.mean()
            if weight > 0:
                loss = loss + weight * sum(lipfast.knowledge_continuity_penalty(h, losses) for h in hidden.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--weight", type=float, default=2.0, help="weight of the penalty (default 2.0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train_x, train_y, test_x, test_y = load_digits(args.seed)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    print(f"digits: {len(train_y)} training and {len(test_y)} test images, MLP 64-128-128-10, {args.epochs} epochs")
    results = {}
    for label, weight in (("plain", 0.0), (f"penalty {args.weight:g}", args.weight)):
        start = time.perf_counter()
        model = train(train_x, train_y, weight, args.epochs, args.seed).eval()
        with torch.no_grad():
            accuracy = (model(test_x).argmax(dim=1) == test_y).float().mean().item()
        kc = lipfast.knowledge_continuity(model, (test_x, test_y), loss_fn, LAYERS, progress=False)
        results[label] = (accuracy, kc, time.perf_counter() - start)

    labels = list(results)
    print()
    print(f"{'k-volatility (test set)':<26}" + "".join(f"{x:>14}" for x in labels))
    for name, title in zip(LAYERS, ("hidden 1 (layer 1)", "hidden 2 (layer 3)", "logits (layer 4)")):
        print(f"{title:<26}" + "".join(f"{results[x][1][name].score:>14.4f}" for x in labels))
    print(f"{'test accuracy':<26}" + "".join(f"{results[x][0]:>14.3f}" for x in labels))
    pairs = results[labels[0]][1][LAYERS[0]].pairs
    print(f"\n({pairs} pairs of test images per layer; training and evaluation took "
          + ", ".join(f"{results[x][2]:.1f} s" for x in labels) + ")")


if __name__ == "__main__":
    main()
