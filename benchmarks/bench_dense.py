"""Dense spectral norms: lipfast against the plain-PyTorch code a user would write, side by side.

    python benchmarks/bench_dense.py            # prints a table of ratios and achieved GB/s
    python benchmarks/bench_dense.py --quick    # smaller repeat counts, for a smoke run

(a) one power-iteration step on a 4096x4096 float32 matrix: lipfast's fused step (one pass over W)
    against two torch.mv calls; achieved GB/s against the read bandwidth measured in the same run
    (torch.sum over a 1 GiB float32 tensor).
    The same step on an 8192x8192 matrix (256 MiB, well past the 32 MiB L3 of the machine measured)
    shows the DRAM-bound figure.
(b) a (512, 64, 64) float32 batch to rtol 1e-5: one lipfast.spectral_norm call against Python loops
    over the matrices (plain power iteration stopped when successive estimates agree to 1e-5, and
    torch.linalg.matrix_norm(ord=2)), and against one batched torch.linalg.matrix_norm call.
(c) a 2000x2000 float32 matrix with sigma_2/sigma_1 = 0.999 to rtol 1e-6: lipfast.spectral_norm
    against plain power iteration (two torch.mv per step, stopped as soon as it is within 1e-6 of
    the exact answer, which favours it) and against torch.linalg.matrix_norm(ord=2).
(d) certified brackets of float32 matrices (1024x1024, 4096x4096, and VGG-11's 4096x25088 first
    classifier layer; --quick: 1024 only): lipfast.spectral_norm_bounds (one Cholesky test of the
    float64 Gram matrix) against the same call forced to Gram iteration (its fallback, and its only
    certificate before) and against torch.linalg.matrix_norm(ord=2) (the full SVD, up to 4096).
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

import lipfast


def best_time(fn, repeats: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(repeats: int) -> float:
    x = torch.ones(2**28)  # 1 GiB of float32
    seconds = best_time(lambda: x.sum(), repeats)
    return x.numel() * 4 / seconds / 1e9


def plain_power_steps(W: torch.Tensor, v: torch.Tensor, steps: int) -> torch.Tensor:
    """The baseline step: two torch.mv calls and two normalizations, `steps` times."""
    x = v
    for _ in range(steps):
        u = torch.mv(W, x)
        u = u / u.norm()
        x = torch.mv(W.T, u)
        x = x / x.norm()
    return x


def power_iteration_loop(batch: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    """The baseline a user writes: a Python loop over the matrices, each iterated until successive
    estimates agree to `tol`."""
    sigmas = []
    for w in batch:
        x = torch.ones(w.shape[1], device=w.device) / w.shape[1] ** 0.5
        previous = 0.0
        for _ in range(10_000):
            u = torch.mv(w, x)
            sigma = u.norm()
            x = torch.mv(w.T, u / sigma)
            x = x / x.norm()
            s = sigma.item()
            if abs(s - previous) <= tol * s:
                break
            previous = s
        sigmas.append(sigma)
    return torch.stack(sigmas)


def bench_step(repeats: int, bandwidth: float, n: int = 4096) -> list[str]:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(n, n, generator=g)
    v = torch.randn(n, generator=g)
    steps = 20

    def plain():
        return plain_power_steps(W, v, steps)

    # power_iteration(iters=k) = k fused steps + one W v for u and sigma: difference out the latter.
    t_plain = best_time(plain, repeats) / steps
    t_many = best_time(lambda: lipfast.power_iteration(W, v, steps), repeats)
    t_none = best_time(lambda: lipfast.power_iteration(W, v, 0), repeats)
    t_fused = (t_many - t_none) / steps
    gbs = W.numel() * 4 / t_fused / 1e9
    plain_gbs = 2 * W.numel() * 4 / t_plain / 1e9
    return [
        f"| (a) one step, {n}x{n} float32 | plain (2 x torch.mv) {t_plain * 1e3:.2f} ms | lipfast fused {t_fused * 1e3:.2f} ms "
        f"| **{t_plain / t_fused:.2f}x** | lipfast {gbs:.1f} GB/s = {100 * gbs / bandwidth:.0f}% of read bandwidth; "
        f"plain {plain_gbs:.1f} GB/s |"
    ]


def bench_batch(repeats: int) -> list[str]:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(512, 64, 64, generator=g)
    exact = torch.linalg.matrix_norm(W.double(), ord=2)
    t_lip = best_time(lambda: lipfast.spectral_norm(W, rtol=1e-5), repeats)
    t_loop = best_time(lambda: torch.stack([torch.linalg.matrix_norm(w, ord=2) for w in W]), max(1, repeats // 2))

    t_power = best_time(lambda: power_iteration_loop(W), 1)
    err_power = ((power_iteration_loop(W).double() - exact).abs() / exact).max().item()
    t_batched = best_time(lambda: torch.linalg.matrix_norm(W, ord=2), repeats)
    err = ((lipfast.spectral_norm(W, rtol=1e-5).double() - exact).abs() / exact).max().item()
    return [
        f"| (b) 512 x (64x64) float32, rtol 1e-5 | Python loop of power iteration {t_power * 1e3:.0f} ms | lipfast {t_lip * 1e3:.2f} ms "
        f"| **{t_power / t_lip:.0f}x** | power iteration max rel. error {err_power:.1e} |",
        f"| (b) same batch | Python loop of matrix_norm {t_loop * 1e3:.1f} ms | lipfast {t_lip * 1e3:.2f} ms "
        f"| **{t_loop / t_lip:.0f}x** | max rel. error {err:.1e} |",
        f"| (b) same batch | batched matrix_norm {t_batched * 1e3:.1f} ms | lipfast {t_lip * 1e3:.2f} ms "
        f"| **{t_batched / t_lip:.1f}x** | |",
    ]


def close_gap_matrix(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.cat([torch.tensor([1.0, 0.999], dtype=torch.float64), torch.linspace(0.99, 0.01, n - 2, dtype=torch.float64)])
    return ((U * s) @ V.T).float()


def bench_close_gap(repeats: int) -> list[str]:
    n, rtol = 2000, 1e-6
    W = close_gap_matrix(n)
    exact = torch.linalg.matrix_norm(W.double(), ord=2).item()

    v0 = torch.randn(n, generator=torch.Generator().manual_seed(3))
    steps_needed = [0]

    def power_iteration_to_accuracy():
        x, steps = v0 / v0.norm(), 0
        while True:
            for _ in range(50):
                u = torch.mv(W, x)
                sigma = u.norm()
                x = torch.mv(W.T, u / sigma)
                x = x / x.norm()
                steps += 1
            if abs(sigma.item() - exact) <= rtol * exact:
                steps_needed[0] = steps
                return sigma

    t_lip = best_time(lambda: lipfast.spectral_norm(W, rtol=rtol), repeats)
    err_lip = abs(lipfast.spectral_norm(W, rtol=rtol).item() - exact) / exact
    start = time.perf_counter()
    power_iteration_to_accuracy()
    t_power = time.perf_counter() - start
    t_svd = best_time(lambda W=W: torch.linalg.matrix_norm(W, ord=2), max(1, repeats // 3))
    err_svd = abs(torch.linalg.matrix_norm(W, ord=2).item() - exact) / exact
    return [
        f"| (c) 2000x2000 float32, sigma2/sigma1 = 0.999, rtol 1e-6 | power iteration {t_power:.2f} s "
        f"({steps_needed[0]} steps) | lipfast {t_lip * 1e3:.1f} ms | **{t_power / t_lip:.0f}x** | lipfast rel. error {err_lip:.1e} |",
        f"| (c) same matrix | matrix_norm (full SVD) {t_svd * 1e3:.0f} ms | lipfast {t_lip * 1e3:.1f} ms "
        f"| **{t_svd / t_lip:.1f}x** | SVD rel. error {err_svd:.1e} |",
    ]


def bench_bounds(repeats: int, sizes) -> list[str]:
    import warnings

    from lipfast import linalg

    rows = []
    g = torch.Generator().manual_seed(3)
    for m, n in sizes:
        W = torch.randn(m, n, generator=g) / n**0.5
        t_chol = best_time(lambda W=W: lipfast.spectral_norm_bounds(W), repeats)
        lo, up = lipfast.spectral_norm_bounds(W)
        default = linalg.DENSE_CERTIFICATE_MIN_DIM
        linalg.DENSE_CERTIFICATE_MIN_DIM = 10**9
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                t_gram = best_time(lambda W=W: lipfast.spectral_norm_bounds(W), repeats)
                glo, gup = lipfast.spectral_norm_bounds(W)
        finally:
            linalg.DENSE_CERTIFICATE_MIN_DIM = default
        gap, ggap = float(up.double() / lo.double() - 1), float(gup.double() / glo.double() - 1)
        rows.append(f"| (d) bracket, {m}x{n} float32 | Gram iteration {t_gram:.3f} s (gap {ggap:.1e}) "
                    f"| lipfast {t_chol:.3f} s (gap {gap:.1e}) | **{t_gram / t_chol:.1f}x** | |")
        if max(m, n) <= 4096:
            t_svd = best_time(lambda W=W: torch.linalg.matrix_norm(W, ord=2), max(1, repeats // 3))
            rows.append(f"| (d) same matrix | matrix_norm (full SVD) {t_svd:.3f} s | lipfast {t_chol:.3f} s "
                        f"| **{t_svd / t_chol:.1f}x** | the SVD certifies nothing |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 10
    print(f"lipfast {lipfast.__version__} backend={lipfast.backend()} torch {torch.__version__} "
          f"threads={torch.get_num_threads()} cpu={platform.processor() or platform.machine()}")
    bandwidth = read_bandwidth(repeats)
    print(f"read bandwidth (torch.sum over 1 GiB float32): {bandwidth:.1f} GB/s\n")
    print("| case | baseline | lipfast | speed-up | notes |")
    print("|---|---|---|---|---|")
    bounds = bench_bounds(2, [(1024, 1024)] if args.quick else [(1024, 1024), (4096, 4096), (4096, 25088)])
    for rows in (bench_step(repeats, bandwidth), bench_step(max(2, repeats // 3), bandwidth, 8192), bench_batch(repeats),
                 bench_close_gap(max(2, repeats // 3)), bounds):
        for row in rows:
            print(row, flush=True)


if __name__ == "__main__":
    main()
