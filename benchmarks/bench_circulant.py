"""The circulant bound's batched Hermitian kernels against their ATen forms, side by side.

    python benchmarks/bench_circulant.py                  # every conv layer of ResNet-18 (CIFAR)
    python benchmarks/bench_circulant.py --modes circular

For each conv layer of lipfast.models.resnet18_cifar, lipfast.operator_norm_bounds(layer, input_size,
rtol=1e-3) twice: with the compiled hermitian_gram, hermitian_cholesky_test and hermitian_power_gain
(the frequencies' Gram matrices, the certificate's Cholesky test and the frequency ranking), and with
their ATen forms from lipfast/reference.py (batched products for the full Gram matrices, a complex
copy and LAPACK's Cholesky per matrix, batched matrix-vector products), alternating, the best of
--repeat runs each.  Everything else is the same code.  Both brackets are certified; they differ only
by the rounding of the Gram matrices (sums in another order), and the table prints the larger
relative difference of their two ends.
"""
from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch

import lipfast
from lipfast import _ext
from lipfast.models import conv_layers, resnet18_cifar

OPS = ("hermitian_gram", "hermitian_cholesky_test", "hermitian_power_gain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="circular,zeros", help="padding modes to run, comma-separated")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if not all(_ext.use_kernel(op, torch.device("cpu")) for op in OPS):
        raise SystemExit("bench_circulant: the compiled kernels are not loaded (build the extension first)")
    kernels = {op: _ext._KERNELS[op] for op in OPS}

    def use_kernels(on: bool) -> None:
        for op, devices in kernels.items():
            _ext._KERNELS[op] = devices if on else frozenset()

    warnings.simplefilter("ignore", RuntimeWarning)  # brackets wider than rtol (zero padding) warn
    print(f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeat}")
    try:
        for mode in args.modes.split(","):
            model = resnet18_cifar(padding_mode=mode)
            print(f"\n## {mode} padding\n")
            print("| layer | input | ATen forms s | kernels s | ratio | bracket difference |")
            print("|---|---|---|---|---|---|")
            totals = {False: 0.0, True: 0.0}
            for name, layer, size in conv_layers(model, (3, 32, 32)):
                if not isinstance(layer, torch.nn.Conv2d):
                    continue
                best, brackets = {}, {}
                for _ in range(args.repeat):
                    for on in (False, True):
                        use_kernels(on)
                        start = time.perf_counter()
                        lower, upper = lipfast.operator_norm_bounds(layer, size, rtol=1e-3)
                        elapsed = time.perf_counter() - start
                        best[on] = min(best.get(on, float("inf")), elapsed)
                        brackets[on] = (float(lower), float(upper))
                for on in (False, True):
                    totals[on] += best[on]
                diff = max(abs(a - b) / abs(a) if a else abs(b) for a, b in zip(brackets[False], brackets[True]))
                shape = "x".join(map(str, size))
                print(f"| {name} | {shape} | {best[False]:.3f} | {best[True]:.3f} | {best[False] / best[True]:.2f} | {diff:.1e} |",
                      flush=True)
            print(f"\ntotal ({mode}): ATen forms {totals[False]:.2f} s; kernels {totals[True]:.2f} s = "
                  f"{totals[False] / totals[True]:.2f}x")
    finally:
        use_kernels(True)


if __name__ == "__main__":
    main()
