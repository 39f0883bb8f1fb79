"""Loading the extension, choosing the backend, and the pure-Python install."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lipfast
from lipfast import _ext
from conftest import require_ext

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=full_env, cwd=cwd or ROOT, timeout=120,
    )


def test_backend_is_cpp_when_built():
    require_ext()
    assert lipfast.backend() == "cpp"
    assert _ext.use_kernel("dense_spectral_norm", torch.device("cpu"))


def test_set_backend_context_and_errors():
    require_ext()
    with lipfast.set_backend("python"):
        assert lipfast.backend() == "python"
        assert not _ext.use_kernel("dense_spectral_norm", torch.device("cpu"))
    assert lipfast.backend() == "cpp"
    with pytest.raises(ValueError, match="name must be one of"):
        lipfast.set_backend("fortran")


def test_unverified_kernels_are_opt_in(monkeypatch):
    """A compiled kernel that has not yet run on a GPU is used only with LIPFAST_CUDA_UNVERIFIED=1."""
    require_ext()
    cuda = torch.device("cuda")
    monkeypatch.setitem(_ext._KERNELS, "dense_power_iteration", frozenset({"cpu", "cuda"}))
    monkeypatch.setitem(_ext._KERNELS, "pairwise_volatility", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(_ext, "_UNVERIFIED", frozenset({("dense_power_iteration", "cuda")}))
    monkeypatch.delenv("LIPFAST_CUDA_UNVERIFIED", raising=False)
    assert not _ext.use_kernel("dense_power_iteration", cuda)
    assert _ext.use_kernel("dense_power_iteration", torch.device("cpu"))
    assert _ext.use_kernel("pairwise_volatility", cuda)  # run on a GPU: always used
    monkeypatch.setenv("LIPFAST_CUDA_UNVERIFIED", "1")
    assert _ext.use_kernel("dense_power_iteration", cuda)


def test_env_forces_python_backend():
    result = run_python(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, lipfast
        assert not [w for w in caught if "lipfast" in str(w.message)], [str(w.message) for w in caught]
        assert lipfast.backend() == "python", lipfast.backend()
        print(float(lipfast.spectral_norm(torch.eye(3) * 2)))
        """,
        env={"LIPFAST_BACKEND": "python"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2.0"


def test_broken_extension_warns_once_and_falls_back():
    # Blocking lipfast._C makes its import fail as a missing or broken build would.
    result = run_python(
        """
        import sys, warnings
        sys.modules["lipfast._C"] = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import lipfast
            import lipfast.linalg, lipfast.ops
        messages = [str(w.message) for w in caught if "compiled kernels could not be loaded" in str(w.message)]
        assert len(messages) == 1, messages
        import torch
        assert lipfast.backend() == "python"
        print(float(lipfast.spectral_norm(torch.diag(torch.tensor([1.0, -5.0, 3.0])))))
        """,
        env={"LIPFAST_BACKEND": ""},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "5.0"


def test_pure_python_install(tmp_path):
    """LIPFAST_NO_EXT=1 at build time installs the package without lipfast._C; it still works."""
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps", "--no-index",
         "--target", str(target), str(ROOT)],
        capture_output=True, text=True, env={**os.environ, "LIPFAST_NO_EXT": "1"}, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    installed = target / "lipfast"
    assert (installed / "__init__.py").exists()
    assert not list(installed.glob("_C*")), list(installed.glob("_C*"))
    result = run_python(
        f"""
        import sys
        sys.path.insert(0, {str(target)!r})
        # The development install's import hook would serve its own lipfast._C: hide it.
        sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import lipfast
        assert lipfast.__file__.startswith({str(target)!r}), lipfast.__file__
        assert lipfast.backend() == "python"
        assert any("could not be loaded" in str(w.message) for w in caught)
        import torch
        print(float(lipfast.spectral_norm(torch.eye(4) * 3)))
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3.0"
