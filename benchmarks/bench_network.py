"""Whole-network bounds: `lipfast.lipschitz_bound` against the plain-PyTorch loop over layers.

    python benchmarks/bench_network.py           # ResNet-18 (CIFAR, 32x32) and ResNet-50 (224x224)
    python benchmarks/bench_network.py --quick   # ResNet-18 only
    python benchmarks/bench_network.py --device cuda   # the networks on a GPU

lipfast: lipfast.lipschitz_bound(model, input_shape, rtol=1e-3), every layer's certified bracket
composed over the network's graph, timed after one untimed run (as the plain loop, which runs after
it, is).  Plain loop: for every conv and linear layer, power iteration
(conv2d and conv_transpose2d, or mv and mv on the transpose) stopped, knowing the answer, as soon
as it is within rtol (1e-3, the accuracy asked of lipfast) of lipfast's lower end, or within that
layer's certified bracket width where that is wider (which favours it), then the product of the
estimates: what a user would write, with no certificate and no structure.  (Not the bracket width
alone: spectral_norm_bounds_many brackets the matrix layers far more tightly than asked, and
matching that would make the loop pay for accuracy nobody asked for.)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

import lipfast
from lipfast.models import conv_layers, resnet18_cifar, resnet50_imagenet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conv import _sync, header, power_iteration_baseline  # noqa: E402

RTOL = 1e-3


def linear_power_iteration(W: torch.Tensor, truth: float, tol: float) -> float:
    v = torch.randn(W.shape[1], generator=torch.Generator().manual_seed(0)).to(W)
    _sync()
    start = time.perf_counter()
    while True:
        u = W @ v
        sigma = float(u.norm() / v.norm())
        if abs(sigma - truth) <= tol * truth:
            return time.perf_counter() - start
        v = W.T @ u
        v = v / v.norm()


def run(name: str, model: nn.Module, input_shape: tuple[int, ...], device: str, slowest: list[str]) -> None:
    model = model.to(device)
    # one untimed run first: a process's first bound of a network pays one-off costs (about 1 s for
    # ResNet-18 here: convolution primitives built per shape, first-touch memory), and the plain loop
    # runs after it, on the same warm primitives
    lipfast.lipschitz_bound(model, input_shape, rtol=RTOL, progress=False)
    _sync()
    start = time.perf_counter()
    report = lipfast.lipschitz_bound(model, input_shape, rtol=RTOL, progress=False)
    ours = time.perf_counter() - start
    brackets = {layer.name: layer for layer in report.layers}
    plain = 0.0
    for layer_name, layer, size in conv_layers(model, input_shape):
        bracket = brackets[layer_name]
        tol = max(bracket.upper / bracket.lower - 1, RTOL)
        with torch.no_grad():
            if isinstance(layer, nn.Linear):
                plain += linear_power_iteration(layer.weight.detach(), bracket.lower, tol)
            else:
                plain += power_iteration_baseline(layer, size, bracket.lower, tol, cap_s=60)[0]
    print(f"| {name} | {len(report.layers)} | {ours:.2f} | {plain:.2f} | {plain / ours:.2f} | {report.upper:.4g} | "
          f"{report.naive_upper:.4g} | {report.naive_upper / report.upper:.3g} |", flush=True)
    top = sorted(report.layers, key=lambda layer: -layer.seconds)[:5]
    slowest.append(f"# {name}: slowest layers (s, of {ours:.2f}): " +
                   ", ".join(f"{layer.name} {layer.kind} {layer.seconds:.3f}" for layer in top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ResNet-18 only")
    parser.add_argument("--device", default="cpu", help="where the networks live (cpu, cuda)")
    args = parser.parse_args()
    print(header(args.device))
    print("| network | layers | lipfast s | plain loop s | plain / lipfast | bound | naive product | naive / bound |")
    print("|---|---|---|---|---|---|---|---|")
    slowest: list[str] = []
    run("ResNet-18 CIFAR, zero padding", resnet18_cifar(), (3, 32, 32), args.device, slowest)
    run("ResNet-18 CIFAR, circular padding", resnet18_cifar(padding_mode="circular"), (3, 32, 32), args.device, slowest)
    if not args.quick:
        run("ResNet-50, 224x224", resnet50_imagenet(), (3, 224, 224), args.device, slowest)
    print()
    print("\n".join(slowest))


if __name__ == "__main__":
    main()
