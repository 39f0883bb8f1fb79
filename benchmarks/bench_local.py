"""Local Lipschitz constants of ResNet-18 (CIFAR) at N inputs: lipfast.local_lipschitz against
torch.autograd.functional.jacobian and an SVD per example, side by side.

    python benchmarks/bench_local.py                  # N = 256, on the CPU
    python benchmarks/bench_local.py --device cuda    # on a GPU (the pure-PyTorch code needs no build)
"""
from __future__ import annotations

import argparse
import time

import torch

import lipfast
from lipfast import _util
from lipfast.models import resnet18_cifar


def per_example(model, x: torch.Tensor) -> torch.Tensor:
    norms = []
    for xi in x:
        J = torch.autograd.functional.jacobian(lambda z: model(z[None])[0], xi)
        norms.append(torch.linalg.matrix_norm(J.reshape(J.shape[0], -1).double(), 2))
    return torch.stack(norms)


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = resnet18_cifar().eval().to(device)
    x = torch.rand(args.n, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    if device.type == "cuda":  # warm-up: cuDNN's algorithm choice and the first launches, for both methods
        lipfast.local_lipschitz(model, x[:2])
        with _util.full_float32():
            per_example(model, x[:2])
    t_ours, ours = timed(lambda: lipfast.local_lipschitz(model, x), device)
    with _util.full_float32():  # the same full-float32 arithmetic lipfast uses (no TF32): equal accuracy
        t_ref, ref = timed(lambda: per_example(model, x), device)
    diff = float(((ours - ref).abs() / ref).max())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"# ResNet-18 (CIFAR), {args.n} inputs uniform in [0, 1]; torch {torch.__version__}, {where}")
    print()
    print("| method | seconds | per input ms |")
    print("|---|---|---|")
    print(f"| lipfast.local_lipschitz | {t_ours:.2f} | {1000 * t_ours / args.n:.1f} |")
    print(f"| jacobian + SVD per input | {t_ref:.2f} | {1000 * t_ref / args.n:.1f} |")
    print()
    print(f"ratio: {t_ref / t_ours:.2f}x; max relative difference {diff:.1e}; largest local constant {float(ours.max()):.6g}")


if __name__ == "__main__":
    main()
