#!/usr/bin/env bash
# GPU check: build lipfast for the GPU at hand, run the test suite with its CUDA cases, run the GPU
# benchmarks.  For a machine with an NVIDIA GPU and a python3 that has a CUDA torch and pytest (no
# network needed; its torch may differ from the one pinned for CPU machines).
#
#     bash benchmarks/gpu_check.sh          # from the repository root
#
# Full logs go under $OUT (or ./gpu_check_out), eight files (the most a device call brings back); a
# short summary is printed last.  Sized to finish in under 9 minutes on one H100 or H200 (the build,
# then GPU_CHECK_BUDGET).
#
# GPU_CHECK_TESTS: the pytest arguments (default: the CUDA cases of tests/, in 4 processes where
# pytest-xdist is installed; GPU_CHECK_ALL=1 runs the other tests after them in the time left: CI runs
# those on CPU machines); GPU_CHECK_ONLY_DENSE=1: run only the dense benchmark (for a short lease);
# GPU_CHECK_DENSE_SECTIONS: its sections (b,d,c); GPU_CHECK_BUDGET: seconds for the whole check after
# the build (default 450): each step's limit is cut to what is left of it, so the summary always comes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

$PY - <<'EOF' | tee "$OUT/env.txt"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))}")
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >>"$OUT/env.txt" 2>&1

# Build in place against this machine's torch, for this GPU only.
arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
export TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-$(nproc)} LIPFAST_CUDA=1
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
# The host compiler on the PATH (the one torch's wheels are built with), not the one Python's build
# configuration names: an extension whose C++ runtime differs from torch's crashes when it throws.
echo "CXX was '${CXX:-}', CC '${CC:-}', LDSHARED '${LDSHARED:-}'" >>"$OUT/env.txt"
export CXX=${LIPFAST_CXX:-$(command -v g++)}
export CC=$(dirname "$CXX")/gcc LDSHARED="$CXX -shared"
echo "building with $CXX: $($CXX --version | head -1)" >>"$OUT/env.txt"
start=$(date +%s)
if ! $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    echo "BUILD FAILED (log: $OUT/build.log)"
    exit 1
fi
build_s=$(($(date +%s) - start))
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Use (and so verify) the CUDA kernels that have not yet run on a GPU (lipfast/_ext.py: _UNVERIFIED).
export LIPFAST_CUDA_UNVERIFIED=1

$PY - <<'EOF' | tee -a "$OUT/env.txt"
import torch, lipfast
from lipfast import _ext
assert _ext.HAS_EXT, _ext.LOAD_ERROR
for op, devices in sorted(_ext._KERNELS.items()):
    print(f"kernel {op}: {', '.join(sorted(devices))}")
EOF

# Every later step runs under its own limit, cut to what is left of the budget.
deadline=$(($(date +%s) + ${GPU_CHECK_BUDGET:-450}))
limit() { local left=$((deadline - $(date +%s))); echo $(( left < $1 ? (left > 5 ? left : 5) : $1 )); }

# The CUDA cases first (the whole suite outgrew 300 s on an H200 in the eighth session, cut at 76%);
# the CPU cases only when asked for (CI runs them).
# Four test processes of a quarter of the cores each: with every process on all cores (16 threads
# each on an H200 machine), -n 8 got through 28% of the CUDA cases in 170 s; -n 4 of 4 threads, all
# 502 in 30 s.
xdist=""
if $PY -c "import xdist" 2>/dev/null; then
  xdist="-n 4"
  export OMP_NUM_THREADS=$(( $(nproc) / 4 > 0 ? $(nproc) / 4 : 1 ))
fi
start=$(date +%s)
if [ -n "${GPU_CHECK_TESTS:-}" ]; then
  timeout "$(limit 300)" $PY -X faulthandler -m pytest -q -p no:cacheprovider --tb=short -rf $GPU_CHECK_TESTS \
      >"$OUT/tests.log" 2>&1
  tests_rc=$?
else
  timeout "$(limit 240)" $PY -X faulthandler -m pytest -q -p no:cacheprovider --tb=short -rf $xdist \
      -k "cuda or gpu" tests >"$OUT/tests.log" 2>&1
  tests_rc=$?
  if [ "${GPU_CHECK_ALL:-0}" = 1 ]; then
    echo "## the other tests" >>"$OUT/tests.log"
    timeout "$(limit 300)" $PY -X faulthandler -m pytest -q -p no:cacheprovider --tb=short -rf $xdist \
        -k "not (cuda or gpu)" tests >>"$OUT/tests.log" 2>&1
    echo "the other tests: exit $?" >>"$OUT/tests.log"
  fi
fi
tests_s=$(($(date +%s) - start))
unset OMP_NUM_THREADS  # the benchmarks use every core
cuda_cases=$(grep -c "cuda" <($PY -m pytest -q -p no:cacheprovider --collect-only tests 2>/dev/null) || true)

start=$(date +%s)
timeout "$(limit 120)" $PY benchmarks/bench_dense_cuda.py ${GPU_CHECK_DENSE_SECTIONS:+--sections "$GPU_CHECK_DENSE_SECTIONS"} \
    >"$OUT/bench_dense_cuda.txt" 2>&1
dense_rc=$?
dense_s=$(($(date +%s) - start))

bench_rc=0 volatility_rc=0 network_rc=0 blocks_rc=0 bench_s=0 volatility_s=0 network_s=0 blocks_s=0
if [ "${GPU_CHECK_ONLY_DENSE:-0}" != 1 ]; then
  start=$(date +%s)
  timeout "$(limit 150)" $PY benchmarks/bench_conv.py --device cuda --skip-exact --cap 5 >"$OUT/bench_conv_cuda.txt" 2>&1
  bench_rc=$?
  bench_s=$(($(date +%s) - start))

  start=$(date +%s)
  timeout "$(limit 120)" $PY benchmarks/bench_network.py --device cuda >"$OUT/bench_network_cuda.txt" 2>&1
  network_rc=$?
  network_s=$(($(date +%s) - start))

  start=$(date +%s)
  timeout "$(limit 60)" $PY benchmarks/bench_blocks.py --device cuda --repeat 20 >"$OUT/bench_blocks_cuda.txt" 2>&1
  blocks_rc=$?
  blocks_s=$(($(date +%s) - start))

  start=$(date +%s)
  { timeout "$(limit 60)" $PY benchmarks/bench_volatility.py --device cuda --repeat 3 &&
    timeout "$(limit 60)" $PY benchmarks/bench_volatility.py --device cuda --n 100000 --d 768 --skip-baseline --repeat 2; } \
    >"$OUT/bench_volatility_cuda.txt" 2>&1
  volatility_rc=$?
  volatility_s=$(($(date +%s) - start))
fi

echo
echo "## summary"
cat "$OUT/env.txt"
echo "build: ${build_s} s"
echo "tests: exit ${tests_rc}, ${tests_s} s, ${cuda_cases} CUDA cases collected: $(tail -2 "$OUT/tests.log" | tr '\n' ' ')"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
echo "bench_dense_cuda: exit ${dense_rc}, ${dense_s} s"
grep -E "^(# |\| \(|\([bcd]\) |Traceback|[A-Za-z]*Error)" "$OUT/bench_dense_cuda.txt"
echo "bench_conv (cuda): exit ${bench_rc}, ${bench_s} s"
grep -E "^(## |total|# )" "$OUT/bench_conv_cuda.txt"
echo "bench_network (cuda): exit ${network_rc}, ${network_s} s"
grep -E "^(# |\| )" "$OUT/bench_network_cuda.txt"
echo "bench_blocks (cuda): exit ${blocks_rc}, ${blocks_s} s"
grep -E "^(# |\| )" "$OUT/bench_blocks_cuda.txt"
echo "bench_volatility (cuda): exit ${volatility_rc}, ${volatility_s} s"
grep -E "^(# |\| lipfast|\| cdist|time:)" "$OUT/bench_volatility_cuda.txt"
[ "$tests_rc" -eq 0 ] && [ "$dense_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$network_rc" -eq 0 ] &&
  [ "$blocks_rc" -eq 0 ] && [ "$volatility_rc" -eq 0 ]
