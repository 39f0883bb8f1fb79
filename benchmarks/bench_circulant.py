"""The circulant bound's pieces against their alternatives, side by side.

    python benchmarks/bench_circulant.py                    # compiled kernels against ATen forms
    python benchmarks/bench_circulant.py --compare grams    # Gram matrices: autocorrelation against symbols
    python benchmarks/bench_circulant.py --modes circular

For each conv layer of lipfast.models.resnet18_cifar (or, with --model resnet50, of the zero-padded
ResNet-50 at 224x224), lipfast.operator_norm_bounds(layer, input_size, rtol=1e-3) twice, alternating, the best
of --repeat runs each; everything else is the same code:

* --compare kernels (the default): with the compiled hermitian_gram, hermitian_cholesky_test and
  hermitian_power_gain (the frequencies' Gram matrices where they come from the symbols, the
  certificate's Cholesky test and the frequency ranking), and with their ATen forms from
  lipfast/reference.py (batched products for the full Gram matrices, a complex copy and LAPACK's
  Cholesky per matrix, batched matrix-vector products).
* --compare grams: the Gram matrices from the stacked symbols of every frequency (4 p q^2 flops
  each), and as the library makes them, from the kernel's autocorrelation where that costs fewer
  flops (conv._Autocorrelation; conv._use_autocorrelation decides).

Both brackets are certified; they differ only by the rounding of the Gram matrices (sums in another
order), and the table prints the larger relative difference of their two ends.
"""
from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch

import lipfast
from lipfast import _ext, conv
from lipfast.models import conv_layers, resnet18_cifar, resnet50_imagenet

OPS = ("hermitian_gram", "hermitian_cholesky_test", "hermitian_power_gain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="circular,zeros", help="padding modes to run, comma-separated")
    parser.add_argument("--compare", choices=("kernels", "grams"), default="kernels")
    parser.add_argument("--model", choices=("resnet18", "resnet50"), default="resnet18")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if not all(_ext.use_kernel(op, torch.device("cpu")) for op in OPS):
        raise SystemExit("bench_circulant: the compiled kernels are not loaded (build the extension first)")
    kernels = {op: _ext._KERNELS[op] for op in OPS}
    choose = conv._use_autocorrelation

    def use(new: bool) -> None:
        """new: the library's way (kernels; autocorrelation where cheaper); else the alternative."""
        for op, devices in kernels.items():
            _ext._KERNELS[op] = devices if new or args.compare != "kernels" else frozenset()
        conv._use_autocorrelation = choose if new or args.compare != "grams" else (lambda auto, direct: False)

    old_name, new_name = ("ATen forms", "kernels") if args.compare == "kernels" else ("symbols", "autocorrelation")
    warnings.simplefilter("ignore", RuntimeWarning)  # brackets wider than rtol (zero padding) warn
    print(f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeat}")
    try:
        for mode in args.modes.split(",") if args.model == "resnet18" else ["zeros"]:
            if args.model == "resnet50":
                model, shape = resnet50_imagenet(), (3, 224, 224)
            else:
                model, shape = resnet18_cifar(padding_mode=mode), (3, 32, 32)
            print(f"\n## {args.model}, {mode} padding\n")
            print(f"| layer | input | {old_name} s | {new_name} s | ratio | bracket difference |")
            print("|---|---|---|---|---|---|")
            totals = {False: 0.0, True: 0.0}
            for name, layer, size in conv_layers(model, shape):
                if not isinstance(layer, torch.nn.Conv2d) or conv.dense_form(layer, size) is not None:
                    continue  # 1x1 convs that are their channel matrix: no circulant bound
                best, brackets = {}, {}
                for _ in range(args.repeat):
                    for new in (False, True):
                        use(new)
                        start = time.perf_counter()
                        lower, upper = lipfast.operator_norm_bounds(layer, size, rtol=1e-3)
                        elapsed = time.perf_counter() - start
                        best[new] = min(best.get(new, float("inf")), elapsed)
                        brackets[new] = (float(lower), float(upper))
                for new in (False, True):
                    totals[new] += best[new]
                diff = max(abs(a - b) / abs(a) if a else abs(b) for a, b in zip(brackets[False], brackets[True]))
                shape_text = "x".join(map(str, size))
                print(f"| {name} | {shape_text} | {best[False]:.3f} | {best[True]:.3f} | {best[False] / best[True]:.2f} | {diff:.1e} |",
                      flush=True)
            print(f"\ntotal ({mode}): {old_name} {totals[False]:.2f} s; {new_name} {totals[True]:.2f} s = "
                  f"{totals[False] / totals[True]:.2f}x")
    finally:
        use(True)


if __name__ == "__main__":
    main()
