"""Spectral normalization in training loops: lipfast.nn against torch's, side by side in one run.

    python benchmarks/bench_nn.py            # both tables
    python benchmarks/bench_nn.py --quick    # fewer repeats, for a smoke run

(1) One training step (forward, backward, SGD) of lipfast.models.resnet18_cifar, batch 64 of 32x32
    inputs, with spectral normalization on every conv and linear layer: (a) none, (b)
    torch.nn.utils.parametrizations.spectral_norm, (c) lipfast.nn.spectral_norm(mode="matrix"),
    (d) lipfast.nn.spectral_norm(mode="operator").  Median of the timed steps after two warm-up
    steps; the four models are timed in turns, so drift on the machine hits them alike.
(1b) The same spectral-norm work alone: the 21 normalized weights and a backward through them.
(2) The eval-mode forward of Linear(4096, 4096) on one input under torch.no_grad(): a plain layer,
    torch's spectral norm (which recomputes W / sigma on every call) and lipfast's (which reuses
    it until the weight or the iterates change).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrizations

import lipfast
from lipfast.models import resnet18_cifar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conv import header  # noqa: E402

_LAYERS = (nn.Linear, nn.Conv2d)


def _normalized(model: nn.Module, register) -> nn.Module:
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        if isinstance(module, _LAYERS):
            register(module)
    return model


def training_step_table(repeats: int) -> None:
    torch.manual_seed(0)
    base = resnet18_cifar().train()
    models = {
        "(a) no spectral norm": base,
        "(b) torch's spectral norm": _normalized(base, parametrizations.spectral_norm),
        "(c) lipfast, mode='matrix'": _normalized(base, lipfast.nn.spectral_norm),
        "(d) lipfast, mode='operator'": _normalized(base, lambda m: lipfast.nn.spectral_norm(m, mode="operator")),
    }
    x = torch.randn(64, 3, 32, 32)
    target = torch.randint(0, 10, (64,))
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3) for name, m in models.items()}

    def step(name: str) -> float:
        model, opt = models[name], optimizers[name]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in models}
    for name in models:
        step(name), step(name)  # warm-up
    for _ in range(repeats):
        for name in models:
            times[name].append(step(name))
    median = {name: statistics.median(t) for name, t in times.items()}
    none, torchs = median["(a) no spectral norm"], median["(b) torch's spectral norm"]
    print("## (1) ResNet-18 (CIFAR) training step, batch 64\n")
    print("| model | step s (median) | / (b) | overhead over (a) | overhead / (b)'s |")
    print("|---|---|---|---|---|")
    for name, t in median.items():
        overhead = t - none
        ratio = overhead / (torchs - none) if name not in ("(a) no spectral norm",) else float("nan")
        print(f"| {name} | {t:.3f} | {t / torchs:.2f} | {overhead * 1e3:+.0f} ms | {ratio:.2f} |")
    print()


def weights_only_table(repeats: int) -> None:
    """The spectral-norm work alone, without the network: every layer's normalized weight computed in
    training mode and a backward through all of them (with fixed random gradients)."""
    torch.manual_seed(0)
    base = resnet18_cifar().train()
    x = torch.zeros(1, 3, 32, 32)
    models = {
        "(b) torch's spectral norm": _normalized(base, parametrizations.spectral_norm),
        "(c) lipfast, mode='matrix'": _normalized(base, lipfast.nn.spectral_norm),
        "(d) lipfast, mode='operator'": _normalized(base, lambda m: lipfast.nn.spectral_norm(m, mode="operator")),
    }
    for model in models.values():
        model(x)  # operator mode records the input sizes

    layers = {name: [m for m in model.modules() if isinstance(m, _LAYERS)] for name, model in models.items()}
    grads = [torch.randn_like(m.weight) for m in layers["(b) torch's spectral norm"]]  # as a backward brings them

    def run(model: nn.Module) -> float:
        start = time.perf_counter()
        weights = [m.weight for m in model.modules() if isinstance(m, _LAYERS)]
        torch.autograd.backward(weights, grads)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():
        run(model)
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(run(model))
    median = {name: statistics.median(t) for name, t in times.items()}
    torchs = median["(b) torch's spectral norm"]
    print("## (1b) the spectral-norm work alone: all 21 normalized weights, forward and backward\n")
    print("| model | ms (median) | / (b) |")
    print("|---|---|---|")
    for name, t in median.items():
        print(f"| {name} | {t * 1e3:.1f} | {t / torchs:.2f} |")
    print()


def eval_forward_table(repeats: int) -> None:
    torch.manual_seed(0)
    plain = nn.Linear(4096, 4096).eval()
    models = {
        "plain Linear": plain,
        "torch's spectral norm": parametrizations.spectral_norm(copy.deepcopy(plain)).eval(),
        "lipfast.nn.spectral_norm": lipfast.nn.spectral_norm(copy.deepcopy(plain)).eval(),
    }
    x = torch.randn(1, 4096)
    best = {}
    with torch.no_grad():
        for name, model in models.items():
            model(x)
        for name, model in models.items():
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                samples.append(time.perf_counter() - start)
            best[name] = statistics.median(samples)
    print("## (2) Linear(4096, 4096), eval forward, batch 1, no_grad\n")
    print("| layer | ms (median) | / plain |")
    print("|---|---|---|")
    for name, t in best.items():
        print(f"| {name} | {t * 1e3:.3f} | {t / best['plain Linear']:.2f} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    print(header())
    eval_forward_table(20 if args.quick else 200)
    weights_only_table(3 if args.quick else 15)
    training_step_table(2 if args.quick else 7)


if __name__ == "__main__":
    main()
