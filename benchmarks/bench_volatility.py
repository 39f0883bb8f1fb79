"""k-volatility over all pairs: lipfast's fused kernel against a torch.cdist computation that
materializes the n × n matrices.

    python benchmarks/bench_volatility.py                    # n = 20,000, d = 512 (issue 6's case)
    python benchmarks/bench_volatility.py --n 50000 --d 768 --skip-baseline
    python benchmarks/bench_volatility.py --device cuda --n 100000 --d 768 --skip-baseline

Each method runs in its own process, so that its peak memory can be measured: on the CPU the growth
of the process's peak resident set (VmHWM, reset after the inputs are made) while it runs, on a GPU
the peak of memory allocated on the device beyond the inputs.  Times are the best of --repeat runs
in that process (after one warm-up run on a GPU, synchronized).  Ratios are printed side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def cdist_volatility(H, losses, delta=None):
    """The plain-PyTorch way: every n × n matrix materialized (distances, loss gaps, mask)."""
    import torch

    D = torch.cdist(H, H)
    valid = D > 0
    valid.fill_diagonal_(False)  # the product-based cdist does not always give exactly 0 there
    if delta is not None:
        valid &= D <= delta
    R = torch.sub(losses[:, None], losses[None, :]).abs_().div_(D).masked_fill_(~valid, 0)
    count = valid.sum(dim=1, dtype=torch.int32)
    per_sample = R.sum(dim=1).double() / count
    score = R.sum(dtype=torch.float64) / count.sum()
    return score, per_sample


def worker(method: str, n: int, d: int, repeat: int, threads: int | None, device: str) -> None:
    import torch

    import lipfast

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    H = torch.randn(n, d, generator=g).to(device)
    losses = torch.rand(n, generator=g).to(device)
    fn = {"lipfast": lambda: lipfast.volatility(H, losses), "cdist": lambda: cdist_volatility(H, losses)}[method]
    cuda = device.startswith("cuda")
    if cuda:
        fn()  # warm-up: cuBLAS handles, kernel loading
        torch.cuda.synchronize()
    times, growth = [], 0
    for _ in range(repeat):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            _reset_peak()
            before = _peak_bytes()
        start = time.perf_counter()
        score, per_sample = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        growth = max(growth, (torch.cuda.max_memory_allocated() if cuda else _peak_bytes()) - before)
        del per_sample
    where = torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} threads"
    print(json.dumps({
        "method": method, "seconds": min(times), "all_seconds": times, "peak_growth": growth,
        "score": float(score), "where": where, "backend": lipfast.backend(), "torch": torch.__version__,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--skip-baseline", action="store_true", help="lipfast only (the baseline needs ~3 n² × 4 bytes)")
    parser.add_argument("--worker", choices=["lipfast", "cdist"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.n, args.d, args.repeat, args.threads, args.device)
        return

    methods = ["lipfast"] + ([] if args.skip_baseline else ["cdist"])
    results = {}
    for method in methods:
        cmd = [sys.executable, __file__, "--worker", method, "--n", str(args.n), "--d", str(args.d),
               "--repeat", str(args.repeat), "--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if out.returncode != 0:
            sys.exit(f"{method} failed:\n{out.stderr}")
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    first = results["lipfast"]
    print(f"# k-volatility, n = {args.n}, d = {args.d}, float32, {args.device}; torch {first['torch']}, {first['where']}, "
          f"backend {first['backend']}; best of {args.repeat}")
    print()
    print("| method | seconds | all runs | peak memory growth | score |")
    print("|---|---|---|---|---|")
    for r in results.values():
        runs = ", ".join(f"{t:.2f}" for t in r["all_seconds"])
        print(f"| {r['method']} | {r['seconds']:.3f} | {runs} | {r['peak_growth'] / 2**20:.1f} MiB | {r['score']:.9g} |")
    if "cdist" in results:
        base = results["cdist"]
        print()
        print(f"time: cdist / lipfast = {base['seconds'] / first['seconds']:.1f}x; "
              f"peak memory: cdist / lipfast = {base['peak_growth'] / max(first['peak_growth'], 1):.0f}x; "
              f"scores differ by {abs(base['score'] - first['score']) / abs(first['score']):.1e} (relative)")


if __name__ == "__main__":
    main()
