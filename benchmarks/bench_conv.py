"""Conv operator norms: lipfast's certified brackets against plain-PyTorch baselines, side by side.

    python benchmarks/bench_conv.py                 # every conv layer of ResNet-18 (CIFAR, 32x32)
    python benchmarks/bench_conv.py --quick         # a few layers, for a smoke run
    python benchmarks/bench_conv.py --device cuda --modes circular --skip-exact   # on a GPU

For each conv layer of lipfast.models.resnet18_cifar (seeded random weights) with circular padding
(its 3x3 convs are then exact circulants) and with the usual zero padding:

  lipfast  lipfast.operator_norm_bounds(layer, input_size, rtol=1e-3): a certified bracket.
  (a)      plain power iteration on the operator: conv2d, and its adjoint conv_transpose2d (on the
           padded grid, wrapped borders added back, for circular padding), stopped as soon as its estimate is within
           the bracket's relative width (upper/lower - 1, the accuracy lipfast certifies) of the
           true norm: it cannot know that in practice, so this favours it.  Capped at --cap seconds.
  (b)      a plain Gram-iteration-on-FFT bound (Delattre et al. 2023 style): torch.fft.fft2 of the
           kernel on the input grid (stride ignored, as such code does), batched Gram iteration in
           complex64 with Frobenius rescaling, the max over frequencies; the number of steps is the
           smallest that brings it within 1e-3 of the norm it bounds, and only that run is timed.
           Circular layers only (on zero-padded layers it is not a bound of the layer).
  (c)      on 8x8 inputs, the SVD of the explicit operator matrix where it has <= 2^24 entries:
           the exact norm, against which the bracket is checked.
"""
from __future__ import annotations

import argparse
import math
import platform
import time
import warnings

import torch
import torch.nn.functional as F

import lipfast
from lipfast.models import conv_layers, resnet18_cifar

RTOL = 1e-3


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - start, out


def _adjoint(layer, y: torch.Tensor, size) -> torch.Tensor:
    """The adjoint of x -> layer(x) without bias: conv_transpose2d, with output_padding making the
    sizes match; for circular padding on the padded grid, then each wrapped border added back."""
    w = layer.weight.detach()
    circular = layer.padding_mode == "circular"
    pad = (0, 0) if circular else layer.padding
    full = [n + 2 * p for n, p in zip(size, layer.padding)] if circular else list(size)
    extra = [f + 2 * p - ((o - 1) * s + d * (k - 1) + 1)
             for f, p, o, s, d, k in zip(full, pad, y.shape[2:], layer.stride, layer.dilation, w.shape[2:])]
    x = F.conv_transpose2d(y, w, None, layer.stride, pad, extra, layer.groups, layer.dilation)
    if circular:
        for dim, (n, p) in enumerate(zip(size, layer.padding), start=2):
            if p:
                core = x.narrow(dim, p, n).clone()
                core.narrow(dim, n - p, p).add_(x.narrow(dim, 0, p))
                core.narrow(dim, 0, p).add_(x.narrow(dim, n + p, p))
                x = core
    return x


def power_iteration_baseline(layer, size, truth: float, tol: float, cap_s: float) -> tuple[float, int, bool]:
    w = layer.weight.detach()
    x = torch.randn(1, layer.in_channels, *size, generator=torch.Generator().manual_seed(0)).to(w.device)
    _sync()
    start = time.perf_counter()
    iters = 0
    with torch.no_grad():
        while True:
            y = layer._conv_forward(x, w, None)
            sigma = float(y.norm() / x.norm())
            iters += 1
            if abs(sigma - truth) <= tol * truth:
                return time.perf_counter() - start, iters, True
            if time.perf_counter() - start > cap_s:
                return time.perf_counter() - start, iters, False
            x = _adjoint(layer, y, size)
            x = x / x.norm()


def gram_fft_bound(w: torch.Tensor, size, steps: int) -> float:
    K = torch.fft.fft2(w, s=size).permute(2, 3, 0, 1).reshape(-1, w.shape[0], w.shape[1])
    if K.shape[1] < K.shape[2]:
        K = K.mH
    log_scale = torch.zeros(K.shape[0], dtype=torch.float64, device=w.device)
    for t in range(steps):
        norm = torch.linalg.matrix_norm(K)
        K = K / norm[:, None, None]
        log_scale = log_scale + torch.log(norm.double()) / 2**t
        K = K.mH @ K
    bound = torch.exp(log_scale + torch.log(torch.linalg.matrix_norm(K).double()) / 2**steps)
    return float(bound.max())


def gram_baseline(layer, size, cap_steps: int = 14) -> tuple[float, int, float]:
    w = layer.weight.detach()
    # the norm the baseline converges to: its own bound with many steps
    limit = gram_fft_bound(w.double(), size, 18)
    for steps in range(1, cap_steps + 1):
        if gram_fft_bound(w, size, steps) <= limit * (1 + RTOL):
            break
    gram_fft_bound(w, size, steps)  # warm
    seconds, bound = timed(lambda: gram_fft_bound(w, size, steps))
    return seconds, steps, bound


def header(device: torch.device | str = "cpu") -> str:
    """The line each benchmark's output starts with: versions, backend, threads, and the CPU or GPU."""
    device = torch.device(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return (f"# lipfast {lipfast.__version__}, backend {lipfast.backend()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {where}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="four layers only")
    parser.add_argument("--cap", type=float, default=20.0, help="seconds allowed to the power-iteration baseline per layer")
    parser.add_argument("--device", default="cpu", help="where the layers live (cpu, cuda)")
    parser.add_argument("--modes", default="circular,zeros", help="padding modes to run, comma-separated")
    parser.add_argument("--skip-exact", action="store_true", help="skip table (c), the explicit-matrix SVDs")
    args = parser.parse_args()
    device = torch.device(args.device)
    warnings.simplefilter("ignore", RuntimeWarning)
    print(header(device))
    for mode in args.modes.split(","):
        layers = conv_layers(resnet18_cifar(padding_mode=mode).to(device), (3, 32, 32))
        layers = [entry for entry in layers if isinstance(entry[1], torch.nn.Conv2d)]
        if args.quick:
            layers = [layers[i] for i in (1, 7, 11, 16)]
        print(f"## padding_mode={mode}, 32x32 input\n")
        print("| layer | input | lipfast s | lower | upper | gap | (a) s | (a) iters | (a)/lipfast | (b) s | (b) steps | (b)/lipfast |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        totals = dict(ours=0.0, a=0.0, b=0.0, ours_b=0.0)
        reached_all = True
        for name, layer, size in layers:
            lipfast.operator_norm_bounds(layer, size, rtol=RTOL)  # warm
            ours, (lower, upper) = timed(lambda: lipfast.operator_norm_bounds(layer, size, rtol=RTOL))
            lower, upper = float(lower), float(upper)
            # equal accuracy: the baseline's estimate within the bracket's certified relative width
            a_s, a_iters, reached = power_iteration_baseline(layer, size, lower, max(upper / lower - 1, 1e-6), args.cap)
            reached_all &= reached
            totals["ours"] += ours
            totals["a"] += a_s
            row = f"| {name} | {size[0]}x{size[1]} | {ours:.3f} | {lower:.5f} | {upper:.5f} | {upper / lower - 1:.1e} | " \
                  f"{a_s:.2f}{'' if reached else ' (cap)'} | {a_iters} | {a_s / ours:.1f} |"
            if mode == "circular":
                b_s, b_steps, _ = gram_baseline(layer, size)
                totals["b"] += b_s
                totals["ours_b"] += ours
                row += f" {b_s:.3f} | {b_steps} | {b_s / ours:.1f} |"
            else:
                row += " - | - | - |"
            print(row, flush=True)
        summary = f"\ntotal: lipfast {totals['ours']:.2f} s; (a) {totals['a']:.1f} s = {totals['a'] / totals['ours']:.1f}x"
        summary += "" if reached_all else " (some runs capped: the true ratio is higher)"
        if totals["b"]:
            summary += f"; (b) {totals['b']:.2f} s = {totals['b'] / totals['ours_b']:.1f}x"
        print(summary + "\n")

    if args.skip_exact:
        return
    print("## (c) exact norms by SVD of the explicit matrix, 8x8 input\n")
    print("| padding | layer | entries | SVD s | lipfast s | exact | lower | upper | upper/exact - 1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in ("circular", "zeros"):
        for name, layer, size in conv_layers(resnet18_cifar(padding_mode=mode), (3, 8, 8)):
            if not isinstance(layer, torch.nn.Conv2d):
                continue
            n_in = layer.in_channels * math.prod(size)
            eye = torch.eye(n_in).reshape(n_in, layer.in_channels, *size)
            with torch.no_grad():
                n_out = layer(eye[:1]).numel()
            if n_in * n_out > 2**24 or (args.quick and n_in * n_out > 2**20):
                continue
            def exact():
                with torch.no_grad():
                    M = layer.double()(eye.double()).reshape(n_in, -1)
                layer.float()
                return float(torch.linalg.matrix_norm(M, 2))
            svd_s, truth = timed(exact)
            ours, (lower, upper) = timed(lambda: lipfast.operator_norm_bounds(layer, size, rtol=RTOL))
            lower, upper = float(lower), float(upper)
            assert lower <= truth * (1 + 1e-6) and upper >= truth * (1 - 1e-6), (name, lower, truth, upper)
            print(f"| {mode} | {name} | {n_in * n_out} | {svd_s:.2f} | {ours:.3f} | {truth:.5f} | {lower:.5f} | "
                  f"{upper:.5f} | {upper / truth - 1:.1e} |", flush=True)


if __name__ == "__main__":
    main()
