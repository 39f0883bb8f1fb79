"""The ``lipfast`` command.

    lipfast demo [--model resnet50|resnet18] [--rtol R]   # the default when no command is given

``demo`` builds the weight matrices of a ResNet-shaped network with random (He-initialised)
weights, each convolution kernel reshaped to (out_channels, in_channels * kh * kw) as
torch.nn.utils.spectral_norm reshapes it, and reports for every group of same-shaped layers the
spectral norm, the certified bracket, and the time taken against torch.linalg.matrix_norm(ord=2).
(These are norms of the reshaped matrices, not the operator norms of the convolutions.)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections import OrderedDict

import torch

import lipfast

# model -> (residual blocks per stage, whether the blocks are bottlenecks with 4x expansion)
_RESNETS = {
    "resnet18": ([2, 2, 2, 2], False),
    "resnet50": ([3, 4, 6, 3], True),
}


def resnet_layer_shapes(model: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, weight shape) of every conv and linear layer of a torchvision-style ResNet."""
    blocks, bottleneck = _RESNETS[model]
    shapes = [("conv1", (64, 3, 7, 7))]
    in_ch = 64
    for stage, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        out_ch = width * 4 if bottleneck else width
        for block in range(count):
            prefix = f"layer{stage}.{block}"
            if bottleneck:
                shapes += [
                    (f"{prefix}.conv1", (width, in_ch, 1, 1)),
                    (f"{prefix}.conv2", (width, width, 3, 3)),
                    (f"{prefix}.conv3", (out_ch, width, 1, 1)),
                ]
            else:
                shapes += [
                    (f"{prefix}.conv1", (width, in_ch, 3, 3)),
                    (f"{prefix}.conv2", (width, width, 3, 3)),
                ]
            if block == 0 and (in_ch != out_ch or stage > 1):
                shapes.append((f"{prefix}.downsample.0", (out_ch, in_ch, 1, 1)))
            in_ch = out_ch
    shapes.append(("fc", (1000, in_ch)))
    return shapes


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def demo(model: str = "resnet50", rtol: float = 1e-5, seed: int = 0, out=None) -> dict:
    """Runs the demo and prints its report to ``out`` (default: sys.stdout); returns the figures as a dict."""
    out = sys.stdout if out is None else out
    generator = torch.Generator().manual_seed(seed)
    groups: OrderedDict[tuple[int, int], list[torch.Tensor]] = OrderedDict()
    layers = resnet_layer_shapes(model)
    for _, shape in layers:
        fan_in = math.prod(shape[1:])
        weight = torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
        matrix = weight.reshape(shape[0], -1)
        groups.setdefault(tuple(matrix.shape), []).append(matrix)

    print(f"lipfast {lipfast.__version__} (backend: {lipfast.backend()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)", file=out)
    print(f"{model}: {len(layers)} layers with random He-initialised weights, as {len(groups)} batches of "
          f"same-shaped (out, in*k*k) matrices; rtol {rtol:g}\n", file=out)
    header = f"{'matrix shape':>14} {'layers':>6} {'max sigma':>10} {'certified bracket of the max':>30} " \
             f"{'lipfast':>9} {'SVD':>9}"
    print(header, file=out)
    print("-" * len(header), file=out)
    total_lip = total_bounds = total_svd = 0.0
    worst_error = 0.0
    product_upper = 1.0
    for shape, matrices in groups.items():
        batch = torch.stack(matrices)
        sigma, t_lip = _timed(lambda: lipfast.spectral_norm(batch, rtol=rtol))
        (lower, upper), t_bounds = _timed(lambda: lipfast.spectral_norm_bounds(batch))
        exact, t_svd = _timed(lambda: torch.linalg.matrix_norm(batch, ord=2))
        worst_error = max(worst_error, ((sigma - exact).abs() / exact).max().item())
        product_upper *= upper.double().prod().item()
        total_lip += t_lip
        total_bounds += t_bounds
        total_svd += t_svd
        top = int(sigma.argmax())
        bracket = f"[{lower[top].item():.5f}, {upper[top].item():.5f}]"
        print(f"{str(shape[0]) + 'x' + str(shape[1]):>14} {len(matrices):>6} {sigma[top].item():>10.5f} "
              f"{bracket:>30} {t_lip * 1e3:>7.1f}ms {t_svd * 1e3:>7.1f}ms", file=out)
    print("-" * len(header), file=out)
    print(f"spectral norms of all {len(layers)} layers: lipfast {total_lip * 1e3:.1f} ms, "
          f"torch.linalg.matrix_norm {total_svd * 1e3:.1f} ms ({total_svd / total_lip:.1f}x); "
          f"largest relative difference {worst_error:.1e}", file=out)
    print(f"certified brackets of all layers: {total_bounds * 1e3:.1f} ms", file=out)
    print(f"product of the certified upper bounds (the naive Lipschitz bound of the reshaped layers): "
          f"{product_upper:.4g}", file=out)
    return {
        "layers": len(layers),
        "seconds_lipfast": total_lip,
        "seconds_svd": total_svd,
        "seconds_bounds": total_bounds,
        "max_relative_error": worst_error,
        "product_upper": product_upper,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lipfast", description="Fast, certified Lipschitz constants for PyTorch.")
    commands = parser.add_subparsers(dest="command")
    demo_parser = commands.add_parser("demo", help="spectral norms and certified brackets of a ResNet's layers (default)")
    demo_parser.add_argument("--model", choices=sorted(_RESNETS), default="resnet50")
    demo_parser.add_argument("--rtol", type=float, default=1e-5, help="relative accuracy of the estimates (default 1e-5)")
    demo_parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command is None:  # the main job on its built-in default
        args = parser.parse_args(["demo"])
    if args.command == "demo":
        if not (math.isfinite(args.rtol) and args.rtol > 0):
            parser.error("--rtol must be a positive number")
        demo(model=args.model, rtol=args.rtol, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
