"""Loading lipfast's compiled library, and choosing between it and the pure-PyTorch fallback.

Importing this module never raises: when ``lipfast._C`` is missing or broken, it warns once and every
function uses :mod:`lipfast.reference`.  ``LIPFAST_BACKEND=python`` in the environment (read at
import) forces the fallback; :func:`set_backend` changes the choice at run time.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch

HAS_EXT: bool = False
#: Why the compiled library did not load (``None`` when it did).
LOAD_ERROR: str | None = None

_BACKENDS = ("auto", "cpp", "python")


def _initial_choice() -> str:
    choice = os.environ.get("LIPFAST_BACKEND", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        warnings.warn(
            f"lipfast: ignoring LIPFAST_BACKEND={choice!r}; expected one of {', '.join(_BACKENDS)}",
            RuntimeWarning,
            stacklevel=3,
        )
        choice = "auto"
    return choice


_choice = _initial_choice()

try:
    from lipfast import _C  # noqa: F401  -- loading it runs the TORCH_LIBRARY registrations

    HAS_EXT = True
except Exception as exc:  # ImportError, OSError (undefined symbols), anything a broken build raises
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    if _choice != "python":
        warnings.warn(
            "lipfast: the compiled kernels could not be loaded "
            f"({LOAD_ERROR}); using the pure-PyTorch fallback, which computes the same results more "
            "slowly. Rebuild with `pip install --no-build-isolation .` against the installed torch, "
            "or set LIPFAST_BACKEND=python to silence this warning.",
            RuntimeWarning,
            stacklevel=2,
        )

#: op name -> device types ("cpu", "cuda") that have a compiled kernel for it.
_KERNELS: dict[str, frozenset[str]] = {}
if HAS_EXT:
    for _op in (
        "dense_spectral_norm", "dense_spectral_norm_bounds", "dense_spectral_norm_bounds_many", "dense_power_iteration",
        "spectral_norm_step",
        "conv_spectral_norm", "pairwise_volatility", "hermitian_cholesky_test", "hermitian_power_gain",
        "hermitian_gram", "bjorck_step",
    ):
        _KERNELS[_op] = frozenset(
            device
            for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"lipfast::{_op}", key)
        )


def backend() -> str:
    """The backend in use: ``"cpp"`` when the compiled kernels are used, ``"python"`` otherwise."""
    if _choice == "python" or not HAS_EXT:
        return "python"
    return "cpp"


def set_backend(name: str) -> contextlib.AbstractContextManager[None]:
    """Chooses the backend: ``"cpp"``, ``"python"`` or ``"auto"`` (compiled kernels when loaded).

    Takes effect at once; used as a context manager, restores the previous choice on exit::

        with lipfast.set_backend("python"):
            ...
    """
    global _choice
    if not isinstance(name, str) or name.lower() not in _BACKENDS:
        raise ValueError(f"lipfast.set_backend: name must be one of {_BACKENDS}, got {name!r}")
    name = name.lower()
    if name == "cpp" and not HAS_EXT:
        raise RuntimeError(f"lipfast.set_backend: the compiled kernels are not available ({LOAD_ERROR})")
    previous, _choice = _choice, name
    return _restore(previous)


@contextlib.contextmanager
def _restore(previous: str) -> Iterator[None]:
    global _choice
    try:
        yield
    finally:
        _choice = previous


#: Compiled kernels that have not yet run on real hardware of that kind (the CUDA code is compiled on
#: machines without a GPU).  They are used only when LIPFAST_CUDA_UNVERIFIED=1 (benchmarks/gpu_check.sh
#: sets it, to verify them); otherwise those ops take the pure-PyTorch form there.
_UNVERIFIED: frozenset[tuple[str, str]] = frozenset()  # every CUDA kernel has run on an H100 or H200


def use_kernel(op: str, device: torch.device) -> bool:
    """Whether ``torch.ops.lipfast.<op>`` should run for a tensor on ``device``."""
    if backend() != "cpp" or device.type not in _KERNELS.get(op, ()):
        return False
    return (op, device.type) not in _UNVERIFIED or os.environ.get("LIPFAST_CUDA_UNVERIFIED") == "1"
