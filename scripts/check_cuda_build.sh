#!/usr/bin/env bash
# Builds the CUDA variant of lipfast and checks that its ops have CUDA kernels; no GPU needed.
#
#     bash scripts/check_cuda_build.sh
#
# It uses a second virtual environment (.venv-cuda, with torch 2.14.1: a CUDA 13.0 build) and a
# temporary build folder, so the CPU build in the working tree and in .venv is left alone.  Needs a
# CUDA toolkit (CUDA_HOME, default /usr/local/cuda).  TORCH_CUDA_ARCH_LIST defaults to 9.0 (Hopper).
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "check_cuda_build: no CUDA toolkit at CUDA_HOME=$CUDA_HOME (nvcc not found)" >&2
  exit 1
fi
VENV=${LIPFAST_CUDA_VENV:-.venv-cuda}  # LIPFAST_CUDA_VENV: an existing venv with a CUDA torch
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade "setuptools>=64" wheel
"$VENV/bin/python" -m pip install --quiet torch==2.14.1 numpy ninja

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
if ! TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2} LIPFAST_CUDA=1 \
    "$VENV/bin/python" setup.py build_ext --build-temp "$work/temp" --build-lib "$work/lib" >"$work/build.log" 2>&1; then
  tail -60 "$work/build.log"
  echo "check_cuda_build: the CUDA build failed" >&2
  exit 1
fi
echo "check_cuda_build: built the CUDA variant in $(($(date +%s) - start)) s"
# The package as installed: the Python sources with the CUDA build of _C beside them.
mkdir -p "$work/site/lipfast"
cp lipfast/*.py "$work/site/lipfast/"
cp "$work"/lib/lipfast/_C*.so "$work/site/lipfast/"
PYTHONPATH="$work/site" "$VENV/bin/python" scripts/check_cuda_kernels.py
