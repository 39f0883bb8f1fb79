"""Local Lipschitz constants of ResNet-18 (CIFAR) at N inputs: lipfast.local_lipschitz against
torch.autograd.functional.jacobian and an SVD per example, side by side.

    python benchmarks/bench_local.py             # N = 256
"""
from __future__ import annotations

import argparse
import time

import torch

import lipfast
from lipfast.models import resnet18_cifar


def per_example(model, x: torch.Tensor) -> torch.Tensor:
    norms = []
    for xi in x:
        J = torch.autograd.functional.jacobian(lambda z: model(z[None])[0], xi)
        norms.append(torch.linalg.matrix_norm(J.reshape(J.shape[0], -1).double(), 2))
    return torch.stack(norms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256)
    args = parser.parse_args()
    model = resnet18_cifar().eval()
    x = torch.rand(args.n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    ours = lipfast.local_lipschitz(model, x)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = per_example(model, x)
    t_ref = time.perf_counter() - t0
    diff = float(((ours - ref).abs() / ref).max())
    print(f"# ResNet-18 (CIFAR), {args.n} inputs uniform in [0, 1]; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print()
    print("| method | seconds | per input ms |")
    print("|---|---|---|")
    print(f"| lipfast.local_lipschitz | {t_ours:.2f} | {1000 * t_ours / args.n:.1f} |")
    print(f"| jacobian + SVD per input | {t_ref:.2f} | {1000 * t_ref / args.n:.1f} |")
    print()
    print(f"ratio: {t_ref / t_ours:.2f}x; max relative difference {diff:.1e}; largest local constant {float(ours.max()):.6g}")


if __name__ == "__main__":
    main()
