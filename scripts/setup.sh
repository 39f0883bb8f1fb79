#!/usr/bin/env bash
# Sets lipfast up from a fresh clone and runs its main job on the built-in default:
#   a virtual environment in .venv, the CPU build of torch 2.13.0, lipfast built against it,
#   then `lipfast bound` (the certified Lipschitz bound of the built-in ResNet-18).  Pass --no-demo to
#   stop after the build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch is pinned: an unpinned torch pulls a several-GB CUDA build.  scikit-learn: the digits data set of
# examples/digits.py ships inside it (no download).
.venv/bin/python -m pip install --quiet --upgrade "setuptools>=64" wheel
.venv/bin/python -m pip install --quiet torch==2.13.0 numpy pytest ninja scikit-learn tqdm
# --no-build-isolation: build against the torch just installed (an isolated build would download
# another, multi-GB torch into a throwaway environment and compile against that one).
.venv/bin/python -m pip install --quiet --no-build-isolation -e .
.venv/bin/python -c "import lipfast; print('lipfast', lipfast.__version__, 'backend:', lipfast.backend())"

if [ "${1:-}" != "--no-demo" ]; then
  .venv/bin/lipfast bound
fi
