"""Build script for lipfast's compiled library ``lipfast._C``.

Switches (environment variables read at build time):
  LIPFAST_NO_EXT=1   build nothing: a pure-Python install that always uses the PyTorch fallback.
  LIPFAST_CUDA=0/1   force the CUDA sources off or on.  By default they are built when the installed
                     torch is a CUDA build (torch.version.cuda) and a CUDA toolkit is found
                     (CUDA_HOME); torch.cuda.is_available() is never asked, so a GPU-less build
                     machine can still produce CUDA kernels.

Install with ``pip install --no-build-isolation .`` so that the extension is compiled against the
torch that will load it.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None or value == "" else value


def _extensions():
    if _flag("LIPFAST_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover - exercised only on broken environments
        raise RuntimeError(
            "lipfast's C++ kernels are built against the installed torch, and none was found. "
            "Install torch first, then `pip install --no-build-isolation .` "
            "(or set LIPFAST_NO_EXT=1 for a pure-Python install)."
        ) from exc

    sources = ["csrc/lipfast.cpp"] + sorted(glob.glob("csrc/*_common.cpp")) + sorted(
        glob.glob("csrc/cpu/*.cpp")
    )
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    forced = _flag("LIPFAST_CUDA")
    if forced is not None:
        use_cuda = forced == "1"
    else:
        use_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    use_cuda = use_cuda and bool(cuda_sources)

    # No -std: the C++ standard is the one torch's BuildExtension picks for its headers.
    # -fno-math-errno, -fno-trapping-math: sqrt sets no errno and floating-point exception flags are
    # not part of any result, so loops with square roots, divisions and selects can vectorize (both
    # leave every computed value as it is).
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    ext_kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "lipfast._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DLIPFAST_WITH_CUDA"], "nvcc": ["-O3"]},
            **ext_kwargs,
        )
    else:
        ext = cpp_extension.CppExtension(
            "lipfast._C", sources, extra_compile_args={"cxx": cxx_flags}, **ext_kwargs
        )
    cmdclass = {"build_ext": cpp_extension.BuildExtension}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
