"""The ``lipfast`` command.

    lipfast bound [MODEL] [--input-shape 3,32,32] [--json F] [--plot F.png] [--rtol R]   # the default
    lipfast certify                                       # the digits example: clean and certified accuracy
    lipfast demo [--model resnet50|resnet18] [--rtol R]   # spectral norms of a ResNet's weight matrices

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
from lipfast import _util

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


class _UsageError(Exception):
    """A bad argument or an unusable file: one line on stderr, exit code 2."""


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise _UsageError(f"--input-shape must be comma-separated positive ints like 3,32,32, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise _UsageError(f"--input-shape must be comma-separated positive ints like 3,32,32, got {text!r}")
    return shape


def _builtin(spec: str) -> torch.nn.Module:
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise _UsageError(f"cannot find model {spec!r}: {exc}") from None
    if not callable(factory):
        raise _UsageError(f"{spec} is a {type(factory).__name__}, not a function that builds a model")
    try:
        model = factory()
    except Exception as exc:  # a factory that needs arguments, or fails: the user's error, not ours
        raise _UsageError(f"{spec}() failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(model, torch.nn.Module):
        raise _UsageError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_model(spec: str | None, trust_pickle: bool = False) -> tuple[torch.nn.Module, tuple[int, ...] | None, str]:
    """(model in eval mode, its default input shape or None, a description) for the command line's
    MODEL: ``lipfast.models:NAME`` (a factory), a TorchScript file, a torch.export archive (``.pt2``;
    its example input gives the default shape), or a torch.save file (a state_dict
    for the built-in ResNet-18, or a plain weight matrix, loaded with weights_only=True; a whole
    pickled model only with trust_pickle)."""
    import os

    from lipfast.models import resnet18_cifar

    if spec is None:
        return resnet18_cifar().eval(), (3, 32, 32), "lipfast.models:resnet18_cifar (the built-in default)"
    if ":" in spec and not os.path.exists(spec):
        model = _builtin(spec)
        shape = (3, 32, 32) if spec.endswith("resnet18_cifar") else None
        return model.eval(), shape, spec
    if not os.path.isfile(spec):
        raise _UsageError(f"no such model file: {spec}")
    if spec.endswith(".pt2"):  # torch.export.save's archive (importing torch.export costs a second: only then)
        import logging

        logger = logging.getLogger("torch.export")
        level = logger.level
        logger.setLevel(logging.CRITICAL)  # its loader logs a traceback before raising: the error says it all
        try:
            program = torch.export.load(spec)
        except Exception as exc:
            raise _UsageError(f"cannot read {spec} as an exported program: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        finally:
            logger.setLevel(level)
        example = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"
                   and n.name in program.graph_signature.user_inputs]
        shape = tuple(example[0].shape[1:]) if len(example) == 1 and hasattr(example[0], "shape") else None
        return program.module(), shape, f"exported program {spec}"
    try:
        return torch.jit.load(spec, map_location="cpu").eval(), None, f"TorchScript file {spec}"
    except Exception:
        pass  # not TorchScript: a torch.save file
    try:
        obj = torch.load(spec, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:
        hint = "" if trust_pickle else " (a whole pickled model needs --trust-pickle)"
        raise _UsageError(f"cannot read {spec}: {type(exc).__name__}: {str(exc).splitlines()[0]}{hint}") from None
    if isinstance(obj, torch.nn.Module):
        return obj.eval(), None, f"pickled model {spec}"
    if isinstance(obj, torch.Tensor):
        if obj.dim() != 2 or not obj.is_floating_point():
            raise _UsageError(f"{spec} holds a tensor of shape {tuple(obj.shape)}; a weight matrix must be 2-D floating point")
        layer = torch.nn.Linear(obj.shape[1], obj.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(obj)
        return layer.eval(), (obj.shape[1],), f"weight matrix {spec} as a linear layer"
    if isinstance(obj, dict):
        model = resnet18_cifar()
        try:
            model.load_state_dict(obj)
        except RuntimeError as exc:
            raise _UsageError(f"{spec} is a state_dict, but not of the built-in ResNet-18: {str(exc).splitlines()[0]}") from None
        return model.eval(), (3, 32, 32), f"state_dict {spec} in the built-in ResNet-18"
    raise _UsageError(f"{spec} holds a {type(obj).__name__}, not a model, state_dict or weight matrix")


def _gap_inputs(shape, args) -> tuple[torch.Tensor | None, str] | None:
    """The inputs of the attained lower bound and where they come from: --data, read and checked
    before the bound's work, or None for --samples random ones (drawn after it)."""
    if args.samples == 0 and not args.data:
        return None
    if args.data:
        try:
            data = torch.load(args.data, weights_only=True, map_location="cpu")
        except Exception as exc:  # missing file, not a tensor file, pickled code refused
            raise _UsageError(f"--data {args.data}: cannot load a tensor ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        if not isinstance(data, torch.Tensor) or tuple(data.shape[1:]) != tuple(shape) or data.shape[0] == 0 \
                or not data.is_floating_point():
            got = f"{tuple(data.shape)} {data.dtype}" if isinstance(data, torch.Tensor) else type(data).__name__
            raise _UsageError(f"--data {args.data} must hold a floating-point tensor of inputs "
                              f"(N, {', '.join(map(str, shape))}), got {got}")
        return data, f"{data.shape[0]} inputs from {args.data}"
    return None, f"{args.samples} random inputs, uniform in [0, 1] (pass --data for real ones)"


def _gap(model, shape, inputs: tuple[torch.Tensor | None, str] | None, report, samples: int) -> str | None:
    """The attained lower bound (local Lipschitz constants at the inputs of _gap_inputs) and the gap."""
    if inputs is None:
        return None
    data, source = inputs
    if data is None:
        data = torch.rand(samples, *shape, generator=torch.Generator().manual_seed(0))
    dtype, device = _util.input_type(model)
    try:
        gap = lipfast.lipschitz_gap(model, data.to(dtype=dtype, device=device), report=report)
    except Exception as exc:  # a model torch.func cannot differentiate: the bound still stands
        return f"no attained lower bound: local Lipschitz constants failed ({type(exc).__name__}: {exc})"
    report.notes.append(f"attained lower bound at {source}: {gap.lower:.6g} (gap {gap.ratio:.4g})")
    return f"{gap}, at {source}"


def _check_output(option: str, path: str) -> None:
    """An output file's folder must exist and be writable (checked before the work, not after it)."""
    import os

    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise _UsageError(f"{option} {path}: is a folder, not a file")
    if not os.path.isdir(folder):
        raise _UsageError(f"{option} {path}: no such folder: {folder}")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise _UsageError(f"{option} {path}: not writable")


def _write(option: str, path: str, write) -> None:
    try:
        write()
    except OSError as exc:
        raise _UsageError(f"{option} {path}: cannot write it ({exc.strerror or exc})") from None


def _device(text: str) -> torch.device:
    """--device as a torch.device that this machine has (checked before the work)."""
    try:
        device = torch.device(text)
        torch.empty(0, device=device)
    except (RuntimeError, ValueError, AssertionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _UsageError(f"--device {text}: not a device this machine has ({reason})") from None
    if device.type == "meta":
        raise _UsageError(f"--device {text}: meta tensors hold no values to bound")
    return device


def bound(args, out=None) -> dict:
    out = out or sys.stdout
    if not (math.isfinite(args.rtol) and args.rtol > 0):
        raise _UsageError("--rtol must be a positive number")
    device = _device(args.device)
    if args.samples < 0:
        raise _UsageError(f"--samples must be >= 0, got {args.samples}")
    plt = None
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            _check_output(option, path)
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # said now, before the work; the rest of the command runs
            print("--plot needs matplotlib: pip install matplotlib", file=sys.stderr)
    model, default_shape, description = load_model(args.model, args.trust_pickle)
    model = model.to(device)
    shape = _parse_shape(args.input_shape) if args.input_shape else default_shape
    if shape is None:
        raise _UsageError("this model needs --input-shape (one example, no batch dim, e.g. 3,32,32)")
    inputs = _gap_inputs(shape, args)
    try:
        report = lipfast.lipschitz_bound(model, shape, rtol=args.rtol, progress=not args.no_progress)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    where = f", on {device}" if device.type != "cpu" else ""
    print(f"lipfast {lipfast.__version__} (backend: {lipfast.backend()}): {description}, input {shape}{where}", file=out)
    print(report, file=out)
    gap = _gap(model, shape, inputs, report, args.samples)
    if gap is not None:
        print(gap, file=out)
    if args.json:
        import json

        def write_json() -> None:
            with open(args.json, "w") as f:
                json.dump(report.to_dict(), f, indent=2, default=lambda v: list(v) if isinstance(v, tuple) else str(v))

        _write("--json", args.json, write_json)
        print(f"report written to {args.json}", file=out)
    if plt is not None:
        fig, ax = plt.subplots(figsize=(max(6, len(report.layers) * 0.3), 4))
        names = [layer.name for layer in report.layers]
        ax.bar(names, [layer.upper for layer in report.layers], color="tab:orange", label="upper")
        ax.bar(names, [layer.lower for layer in report.layers], color="tab:blue", label="lower")
        ax.set_yscale("log")
        ax.set_ylabel("Lipschitz constant")
        ax.tick_params(axis="x", rotation=90, labelsize=6)
        ax.legend()
        fig.tight_layout()
        _write("--plot", args.plot, lambda: fig.savefig(args.plot))
        plt.close(fig)
        print(f"plot written to {args.plot}", file=out)
    return report.to_dict()


def certify(args, out=None) -> dict:
    import importlib.util
    import os

    if args.epochs < 1:
        raise _UsageError(f"--epochs must be >= 1, got {args.epochs}")

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "digits.py")
    if not os.path.isfile(path):
        raise _UsageError("the digits example (examples/digits.py) ships with the source tree only")
    spec = importlib.util.spec_from_file_location("lipfast_digits_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    try:
        return example.main(["--epochs", str(args.epochs)])
    except ImportError as exc:
        raise _UsageError(f"the digits example needs scikit-learn (pip install scikit-learn): {exc}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lipfast", description="Fast, certified Lipschitz constants for PyTorch.")
    commands = parser.add_subparsers(dest="command")
    bound_parser = commands.add_parser(
        "bound", help="certified Lipschitz bound of a network, layer by layer (the default)",
        description="Certified L2 Lipschitz bound of MODEL. MODEL is lipfast.models:NAME, a TorchScript file, a "
                    "torch.export archive (.pt2; its example input sets the default --input-shape), or a torch.save "
                    "file (a state_dict of the built-in ResNet-18, or a 2-D weight matrix), read with "
                    "weights_only=True. A whole pickled model needs --trust-pickle: unpickling runs arbitrary code "
                    "from the file, so use it only for files you trust. Without MODEL: the built-in ResNet-18 for CIFAR-10.")
    bound_parser.add_argument("model", nargs="?", help="the network (default: lipfast.models:resnet18_cifar)")
    bound_parser.add_argument("--input-shape", help="one example's shape, no batch dim, e.g. 3,32,32")
    bound_parser.add_argument("--rtol", type=float, default=1e-3, help="relative accuracy of each layer's bracket")
    bound_parser.add_argument("--json", help="write the report as JSON to this file")
    bound_parser.add_argument("--plot", help="draw per-layer lower/upper bars (log scale) to this PNG (needs matplotlib)")
    bound_parser.add_argument("--trust-pickle", action="store_true",
                              help="allow a whole pickled model (runs arbitrary code from the file)")
    bound_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    bound_parser.add_argument("--device", default="cpu", help="where the model is bounded: cpu (default), cuda, cuda:1, ...")
    bound_parser.add_argument("--data", help="inputs (N, *input shape) saved with torch.save: the attained lower bound "
                                             "max ‖J(x)‖ over them, and the gap to the certified bound")
    bound_parser.add_argument("--samples", type=int, default=16,
                              help="without --data, this many random inputs for the attained lower bound (0: none)")
    certify_parser = commands.add_parser("certify", help="train two small CNNs on the digits data and certify them")
    certify_parser.add_argument("--epochs", type=int, default=60)
    demo_parser = commands.add_parser("demo", help="spectral norms and certified brackets of a ResNet's weight matrices")
    demo_parser.add_argument("--model", choices=sorted(_RESNETS), default="resnet50")
    demo_parser.add_argument("--rtol", type=float, default=1e-5, help="relative accuracy of the estimates (default 1e-5)")
    demo_parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command is None:  # the main job on its built-in default
        args = parser.parse_args(["bound"])
    try:
        if args.command == "bound":
            bound(args)
        elif args.command == "certify":
            certify(args)
        else:
            if not (math.isfinite(args.rtol) and args.rtol > 0):
                raise _UsageError("--rtol must be a positive number")
            demo(model=args.model, rtol=args.rtol, seed=args.seed)
    except _UsageError as exc:
        print(f"lipfast: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
