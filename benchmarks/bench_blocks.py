"""1-Lipschitz building blocks against the plain PyTorch a user would write, side by side.

    python benchmarks/bench_blocks.py
    python benchmarks/bench_blocks.py --device cuda   # on a GPU (float32, TF32 off for both)

* AOL rescaling of a ResNet-18-sized conv kernel (512, 512, 3, 3): lipfast forms every shift's matrix
  of K ⋆ K by Toom-Cook (the kernel's matrix polynomial evaluated at 25 points, 19 of which take a
  512³ product, the rest being transposes; then one interpolation): 19 products, where the plain way
  convolves the kernel with itself (F.conv2d with padding k - 1: 81 products of (512, 512) position
  matrices, counting only the taps that overlap).
* One Björck step on a 1024 x 1024 weight: lipfast's op (1 + b) Q - b Q (QᵀQ), one product and one
  addmm with the scaling fused in, against the textbook (1 + b) W - b W Wᵀ W (two products and three
  elementwise passes).  Both are two 1024³ products (4.3 GFLOP), so only the elementwise passes
  can be saved.
Times: the median of --repeat runs after one warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lipfast.blocks import _aol_scales, _bjorck_step


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int) -> tuple[float, object]:
    result = fn()
    times = []
    for _ in range(repeat):
        _sync()
        t0 = time.perf_counter()
        result = fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def aol_plain(K: torch.Tensor) -> torch.Tensor:
    kh, kw = K.shape[-2:]
    KK = F.conv2d(K.transpose(0, 1), K.transpose(0, 1), padding=(kh - 1, kw - 1))
    return KK.abs().sum(dim=(1, 2, 3)).rsqrt()


def bjorck_plain(W: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    return (1 + beta) * W - beta * W @ W.T @ W


def bjorck_lipfast(W: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    return _bjorck_step(W, beta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="where the weights live (cpu, cuda)")
    args = parser.parse_args()
    # full float32 on a GPU too: cuDNN's convolutions default to TF32 (10-bit mantissas), which lipfast's
    # products do not use (the sixteenth session's H200 run compared against TF32: 1.3e-5 apart)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator().manual_seed(0)
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"# torch {torch.__version__}, {where}; median of {args.repeat}")
    print()
    print("| case | plain s | lipfast s | plain / lipfast | max relative difference |")
    print("|---|---|---|---|---|")
    for shape in [(512, 512, 3, 3), (64, 64, 3, 3)]:
        K = (torch.randn(*shape, generator=g) / 48).to(args.device)
        t_plain, d_plain = timed(lambda: aol_plain(K), args.repeat)
        t_fast, d_fast = timed(lambda: _aol_scales(K), args.repeat)
        diff = float(((d_fast - d_plain).abs() / d_plain).max())
        print(f"| AOL scales, kernel {shape} | {t_plain:.4f} | {t_fast:.4f} | {t_plain / t_fast:.1f}x | {diff:.1e} |")
    W = (torch.randn(1024, 1024, generator=g) / 64).to(args.device)
    t_plain, q_plain = timed(lambda: bjorck_plain(W), args.repeat)
    t_fast, q_fast = timed(lambda: bjorck_lipfast(W), args.repeat)
    diff = float((q_fast - q_plain).norm() / q_plain.norm())
    print(f"| Björck step, 1024 x 1024 | {t_plain:.4f} | {t_fast:.4f} | {t_plain / t_fast:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
