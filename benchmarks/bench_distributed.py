"""lipschitz_bound of the ResNet-50-shaped network on 1 process against 2 gloo processes.

    python benchmarks/bench_distributed.py                 # (3, 224, 224), both runs
    python benchmarks/bench_distributed.py --shape 3 64 64 # smaller input, quicker

The single process uses every core (torch's default threads); each of the P processes uses
cores / P threads, so both runs have the same machine.  For each rank: the wall time of the call,
the seconds spent bounding its own share of the layers, and the seconds inside the all-gather of the
results (which include waiting for the slowest rank: load imbalance, not bytes, on one machine).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, shape: tuple, threads: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    import lipfast
    from lipfast import models, network

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gather_seconds = [0.0]
    original = dist.all_gather_object

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            gather_seconds[0] += time.perf_counter() - t0

    network.dist.all_gather_object = timed
    model = models.resnet50_imagenet()
    dist.barrier()
    t0 = time.perf_counter()
    report = lipfast.lipschitz_bound(model, shape, progress=False)
    wall = time.perf_counter() - t0
    names = [layer.name for layer in report.layers]
    kinds = {layer.name: layer for layer in report.layers}
    leaves = [(layer.name, dict(model.named_modules())[layer.name], layer.input_shape) for layer in report.layers]
    owner = network._share_out([network._layer_cost(m, s) for _, m, s in leaves], world)
    own = sum(kinds[n].seconds for n, r in zip(names, owner) if r == rank)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "wall": wall, "own": own, "gather": gather_seconds[0], "upper": report.upper,
                   "layers": sum(1 for r in owner if r == rank), "threads": threads}, f)
    dist.destroy_process_group()


def _run(world: int, shape: tuple, threads: int) -> list[dict]:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(world, _free_port(), shape, threads, out), nprocs=world, start_method="spawn")
        results = []
        for r in range(world):
            with open(os.path.join(out, f"rank{r}.json")) as f:
                results.append(json.load(f))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs="+", default=[3, 224, 224])
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    shape = tuple(args.shape)
    cores = os.cpu_count() or 1
    import torch

    single = _run(1, shape, cores)[0]
    shared = _run(args.processes, shape, max(1, cores // args.processes))
    print(f"# lipschitz_bound(resnet50_imagenet(), {shape}); torch {torch.__version__}, {cores} cores")
    print()
    print("| run | rank | threads | layers | wall s | own layers s | all-gather s | upper |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| 1 process | 0 | {single['threads']} | {single['layers']} | {single['wall']:.2f} | {single['own']:.2f} | - | {single['upper']:.6g} |")
    for r in shared:
        print(f"| {args.processes} processes | {r['rank']} | {r['threads']} | {r['layers']} | {r['wall']:.2f} | {r['own']:.2f} | "
              f"{r['gather']:.2f} | {r['upper']:.6g} |")
    wall = max(r["wall"] for r in shared)
    comm = max(r["gather"] for r in shared)
    print()
    print(f"speedup: {single['wall'] / wall:.2f}x; all-gather share of the slowest rank's wall time: {comm / wall:.0%} "
          f"(minimum over ranks, the waiting excluded: {min(r['gather'] for r in shared):.3f} s); "
          f"bounds equal: {all(r['upper'] == single['upper'] for r in shared)}")


if __name__ == "__main__":
    sys.exit(main())
