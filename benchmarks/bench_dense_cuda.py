"""Dense spectral norms on a GPU: lipfast's CUDA kernels against plain PyTorch on the same device.

    python benchmarks/bench_dense_cuda.py          # needs a CUDA GPU; benchmarks/gpu_check.sh runs it

Times are medians of CUDA-event-timed repeats after a warm-up.
(a) device bandwidth: a 1 GiB device-to-device copy (bytes read + bytes written).
(b) one power-iteration step on an 8192 x 8192 float32 matrix: lipfast's fused pass (W read once),
    from power_iteration(iters=20) minus power_iteration(iters=0), against two torch.mv calls; its
    bandwidth as a share of (a).
(c) a (4096, 64, 64) float32 batch to rtol 1e-5: one lipfast.spectral_norm call against one batched
    torch.linalg.matrix_norm(ord=2) call, against a Python loop of torch power iteration (stopped
    when successive estimates agree to 1e-5; run on the first 128 matrices and scaled by 32), and
    against lipfast's pure-PyTorch Lanczos (the first 512 matrices, scaled by 8).
(d) certified brackets (rtol 1e-3) of every layer of the ResNet-50-shaped network, each weight
    reshaped to (out, in * k * k) as torch's spectral_norm sees it: one spectral_norm_bounds_many
    call for all of them, against one spectral_norm_bounds call per distinct shape and per layer.
"""
from __future__ import annotations

import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("LIPFAST_CUDA_UNVERIFIED", "1")

import torch  # noqa: E402

import lipfast  # noqa: E402
from lipfast.models import conv_layers, resnet50_imagenet  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dense import plain_power_steps, power_iteration_loop  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs, timed with CUDA events after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    x = torch.randn(2**28, device="cuda")
    y = torch.empty_like(x)
    seconds = timed(lambda: y.copy_(x), 20)
    return 2 * x.numel() * 4 / seconds / 1e9


def bench_step(bandwidth: float) -> list[str]:
    n, steps = 8192, 20
    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(n, n, device="cuda", generator=g)
    v = torch.randn(n, device="cuda", generator=g)

    t_plain = timed(lambda: plain_power_steps(W, v, steps), 10) / steps
    t_none = timed(lambda: lipfast.power_iteration(W, v, 0), 10)
    t_fused = (timed(lambda: lipfast.power_iteration(W, v, steps), 10) - t_none) / steps
    gbs = W.numel() * 4 / t_fused / 1e9
    # the fused kernel must compute what the two products compute
    with lipfast.set_backend("python"):
        ref = lipfast.power_iteration(W.double(), v.double(), steps)[0].item()
    got = lipfast.power_iteration(W, v, steps)[0].item()
    # Where a step's time goes, kernel by kernel.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        lipfast.power_iteration(W, v, steps)
        torch.cuda.synchronize()
    print(f"(b) kernels of power_iteration(iters={steps}):", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=4), flush=True)
    return [
        f"| (b) one step, {n}x{n} float32 | 2 x torch.mv {t_plain * 1e6:.0f} us | lipfast fused {t_fused * 1e6:.1f} us "
        f"| **{t_plain / t_fused:.2f}x** | {gbs:.0f} GB/s = **{100 * gbs / bandwidth:.1f}%** of the copy bandwidth; "
        f"sigma rel. diff. to float64 {abs(got - ref) / ref:.1e} |",
    ]


def bench_batch() -> list[str]:
    g = torch.Generator(device="cuda").manual_seed(1)
    W = torch.randn(4096, 64, 64, device="cuda", generator=g)
    exact = torch.linalg.matrix_norm(W.double().cpu(), ord=2)

    def emit(line: str) -> None:  # printed as soon as measured, so a timeout still leaves the figures
        print(line, flush=True)

    t_small = timed(lambda: lipfast.spectral_norm(W[:512], rtol=1e-5), 3)
    print(f"(c) lipfast.spectral_norm on the first 512 matrices: {t_small * 1e3:.2f} ms", flush=True)
    t_lip = timed(lambda: lipfast.spectral_norm(W, rtol=1e-5), 10)
    err = ((lipfast.spectral_norm(W, rtol=1e-5).double().cpu() - exact).abs() / exact).max().item()
    print(f"(c) lipfast.spectral_norm: {t_lip * 1e3:.2f} ms, max rel. error {err:.1e}", flush=True)
    t_svd = timed(lambda: torch.linalg.matrix_norm(W, ord=2), 1)
    err_svd = ((torch.linalg.matrix_norm(W, ord=2).double().cpu() - exact).abs() / exact).max().item()
    emit(f"| (c) 4096 x (64x64) float32, rtol 1e-5 | batched matrix_norm(ord=2) {t_svd * 1e3:.1f} ms | lipfast {t_lip * 1e3:.2f} ms "
         f"| **{t_svd / t_lip:.1f}x** | lipfast max rel. error {err:.1e}, matrix_norm {err_svd:.1e} |")
    t_bounds = timed(lambda: lipfast.spectral_norm_bounds(W, rtol=1e-3), 3)
    lower, upper = lipfast.spectral_norm_bounds(W, rtol=1e-3)
    ok = bool(torch.all(lower.double().cpu() <= exact) and torch.all(exact <= upper.double().cpu()))
    emit(f"| (c) same batch, certified brackets rtol 1e-3 | | spectral_norm_bounds {t_bounds * 1e3:.2f} ms | | "
         f"brackets hold the float64 answer: {ok} |")

    sample = W[:128]

    t_loop = timed(lambda: power_iteration_loop(sample), 1) * (W.shape[0] / sample.shape[0])
    emit(f"| (c) same batch | Python loop of power iteration {t_loop:.1f} s (128 matrices x 32) | lipfast {t_lip * 1e3:.2f} ms "
         f"| **{t_loop / t_lip:.0f}x** | |")
    with lipfast.set_backend("python"):
        t_ref = timed(lambda: lipfast.spectral_norm(W[:512], rtol=1e-5), 1) * 8
    emit(f"| (c) same batch | pure-PyTorch Lanczos (lipfast's fallback; 512 matrices x 8) {t_ref * 1e3:.0f} ms "
         f"| lipfast {t_lip * 1e3:.2f} ms | **{t_ref / t_lip:.1f}x** | |")
    return []  # each row was printed as it was measured


def bench_resnet50() -> list[str]:
    model = resnet50_imagenet()
    weights = [layer.weight.detach().reshape(layer.weight.shape[0], -1).cuda() for _, layer, _ in
               conv_layers(model, (3, 224, 224))]
    groups: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)
    for w in weights:
        groups[tuple(w.shape)].append(w)
    stacks = [torch.stack(ws) for ws in groups.values()]
    exact = [torch.linalg.matrix_norm(w.double(), ord=2).cpu() for w in weights]

    def grouped():
        return [lipfast.spectral_norm_bounds(s, rtol=1e-3) for s in stacks]

    def many():
        return lipfast.spectral_norm_bounds_many(weights, rtol=1e-3)

    t_many = timed(many, 10)
    brackets = many()
    holds = all(bool(lo.double().cpu() <= e <= up.double().cpu()) for (lo, up), e in zip(brackets, exact))
    widest = max(float(up.double() / lo.double() - 1) for lo, up in brackets)
    print(f"(d) spectral_norm_bounds_many, all {len(weights)} layers in one call: {t_many * 1e3:.1f} ms; "
          f"brackets hold the float64 SVD answer: {holds}; widest gap {widest:.1e}", flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        many()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20), flush=True)
    t_grouped = timed(grouped, 5)
    print(f"(d) one spectral_norm_bounds call per shape: {t_grouped * 1e3:.1f} ms", flush=True)
    t_layer = timed(lambda: [lipfast.spectral_norm_bounds(w, rtol=1e-3) for w in weights], 3)
    biggest = max(weights, key=torch.Tensor.numel)
    return [
        f"| (d) ResNet-50 brackets, {len(weights)} layers in {len(stacks)} shapes (largest {tuple(biggest.shape)}) "
        f"| spectral_norm_bounds per layer {t_layer * 1e3:.1f} ms, per shape {t_grouped * 1e3:.1f} ms "
        f"| spectral_norm_bounds_many **{t_many * 1e3:.1f} ms** | {t_grouped / t_many:.1f}x per shape "
        f"| all hold the SVD answer: {holds}; widest gap {widest:.1e} |"
    ]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="b,d,c", help="which of b, c, d to run, in order (default: b,d,c)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_dense_cuda: no CUDA device")
    from lipfast import _ext

    print(f"# lipfast {lipfast.__version__}, backend {lipfast.backend()}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name(0)}; dense_spectral_norm on CUDA by kernel: "
          f"{_ext.use_kernel('dense_spectral_norm', torch.device('cuda'))}\n")
    print("| case | PyTorch | lipfast | speedup | notes |")
    print("|---|---|---|---|---|")
    bandwidth = copy_bandwidth()
    print(f"| (a) device-to-device copy, 1 GiB | {bandwidth:.0f} GB/s (read + write) | | | |")
    sections = {"b": lambda: bench_step(bandwidth), "c": bench_batch, "d": bench_resnet50}
    for name in args.sections.split(","):
        for line in sections[name.strip()]():
            print(line, flush=True)


if __name__ == "__main__":
    main()
