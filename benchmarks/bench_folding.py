"""BatchNorm folding in `lipfast.lipschitz_bound`: the network bound with and without it, side by side.

    python benchmarks/bench_folding.py            # ResNet-18 (CIFAR, 32x32)
    python benchmarks/bench_folding.py --resnet50 # and ResNet-50 at 224x224

The built-in networks' BatchNorms hold their initial statistics (every channel scaled alike), where
folding has nothing to gain and is skipped.  Here they get statistics as training leaves them, per
channel: gamma drawn uniformly from [0.2, 1.5] (seeded), then the running means and variances of a
few train-mode passes over random inputs uniform in [0, 1) (cumulative averages, seeded).  Then:

  folded    lipfast.lipschitz_bound(model, shape): every conv that feeds its own BatchNorm is
            bracketed with the BatchNorm folded into its weight.
  unfolded  the same, with folding switched off (each conv and BatchNorm bounded on its own, the
            product of the two in the composition): what lipfast computed before.
  attained  the largest Jacobian norm at random inputs (3; 1 for ResNet-50): the truth is at least this.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from torch import nn

import lipfast
from lipfast import network
from lipfast.models import resnet18_cifar, resnet50_imagenet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conv import header  # noqa: E402


def with_statistics(model: nn.Module, shape: tuple[int, ...], passes: int = 4, batch: int = 16) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative averages
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.num_features, generator=generator) * 1.3 + 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(torch.rand(batch, *shape, generator=generator))
    return model.eval()


def attained(model: nn.Module, shape: tuple[int, ...], inputs: int = 3) -> float:
    generator = torch.Generator().manual_seed(1)
    best = 0.0
    for _ in range(inputs):
        x = torch.rand(1, *shape, generator=generator)
        J = torch.autograd.functional.jacobian(lambda t: model(t).reshape(-1), x).reshape(-1, x.numel())
        best = max(best, float(torch.linalg.matrix_norm(J.double(), 2)))
    return best


def run(name: str, model: nn.Module, shape: tuple[int, ...], inputs: int = 3) -> None:
    model = with_statistics(model, shape)
    lipfast.lipschitz_bound(model, shape, progress=False)  # warm: one-off costs of a first bound
    start = time.perf_counter()
    folded = lipfast.lipschitz_bound(model, shape, progress=False)
    folded_s = time.perf_counter() - start
    with mock.patch.object(network, "_folds", lambda *args: {}):
        start = time.perf_counter()
        unfolded = lipfast.lipschitz_bound(model, shape, progress=False)
        unfolded_s = time.perf_counter() - start
    pairs = sum("folded in:" in layer.note for layer in folded.layers)
    truth = attained(model, shape, inputs)
    print(f"| {name} | {pairs} | {unfolded.upper:.4g} | {folded.upper:.4g} | {unfolded.upper / folded.upper:.3g} | "
          f"{truth:.4g} | {unfolded_s:.2f} | {folded_s:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resnet50", action="store_true", help="ResNet-50 at 224x224 too")
    args = parser.parse_args()
    print(header())
    print("| network | pairs folded | unfolded bound | folded bound | unfolded / folded | attained (truth >=) "
          "| unfolded s | folded s |")
    print("|---|---|---|---|---|---|---|---|")
    run("ResNet-18 CIFAR", resnet18_cifar(), (3, 32, 32))
    if args.resnet50:
        run("ResNet-50, 224x224", resnet50_imagenet(), (3, 224, 224), inputs=1)  # (1000 backward passes each)


if __name__ == "__main__":
    main()
