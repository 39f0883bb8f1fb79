"""Checks that the lipfast library just imported (a CUDA build) has a CUDA kernel for every op.

Run by scripts/check_cuda_build.sh against the CUDA variant; needs no GPU (it asks the dispatcher,
not the device).  Exits non-zero, naming the ops, when one is missing.
"""
from __future__ import annotations

import sys

import torch

import lipfast
from lipfast import _ext

# Ops whose CUDA kernel is still to be written (issue 7): on CUDA tensors they run their pure-PyTorch
# form.  The check fails if one of these gains a kernel without leaving this list, so it only shrinks.
PENDING: set[str] = set()


def main() -> int:
    if not _ext.HAS_EXT:
        print(f"the compiled library did not load: {_ext.LOAD_ERROR}")
        return 1
    if torch.version.cuda is None:
        print(f"torch {torch.__version__} is not a CUDA build")
        return 1
    ops = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("lipfast::"))
    has = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"lipfast::{op}", "CUDA") for op in ops}
    for op in ops:
        unverified = " (not yet run on a GPU: opt-in, LIPFAST_CUDA_UNVERIFIED=1)" if (op, "cuda") in _ext._UNVERIFIED else ""
        state = f"cuda kernel{unverified}" if has[op] else ("pending (pure-PyTorch form on CUDA)" if op in PENDING else "MISSING")
        print(f"lipfast::{op}: {state}")
    missing = [op for op in ops if not has[op] and op not in PENDING]
    stale = [op for op in PENDING if op in has and has[op]]
    unknown = sorted(PENDING - set(ops))
    if missing:
        print(f"no CUDA kernel for: {', '.join(missing)}")
    if stale or unknown:
        print(f"scripts/check_cuda_kernels.py: remove from PENDING: {', '.join(stale + unknown)}")
    print(f"lipfast {lipfast.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}): "
          f"{sum(has.values())} of {len(ops)} ops have a CUDA kernel")
    return 1 if missing or stale or unknown else 0


if __name__ == "__main__":
    sys.exit(main())
