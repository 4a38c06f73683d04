#!/usr/bin/env bash
# The GPU checks, as one script for a machine with a CUDA device and torch, jax
# and cupy installed (no nox: that machine's own packages are used as they are).
#
#   OUT=/some/dir bash benchmarks/device_check.sh
#
# 1. The test suite three times at once: on cupy arrays, on torch arrays on
#    `cuda` (XINFLUENCE_DEVICE; tests/test_torch_device.py also runs every
#    influence model on a CUDA copy of a network against its CPU twin), and on
#    jax arrays on jax's default device (the GPU where jax sees one).
# 2. benchmarks/run_influence.py with model and data on `cuda`, both libraries.
#    pyDVL 0.10 and its dependencies must be importable (see --pydvl-python;
#    benchmarks/README.md, "On a GPU", says how they were carried as wheels).
# Logs and the benchmark table go to $OUT; SKIP_BENCH=1 runs the tests only.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/xinfluence-device}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
TEST_LIMIT=${TEST_LIMIT:-420}
BENCH_LIMIT=${BENCH_LIMIT:-270}

{
  nvidia-smi -L
  $PY - <<'EOF'
import sys, numpy, torch, jax, cupy
print("python", sys.version.split()[0], "numpy", numpy.__version__, "torch", torch.__version__,
      "jax", jax.__version__, jax.devices(), "cupy", cupy.__version__)
EOF
} >"$OUT/env.txt" 2>&1

suite() {  # name, environment assignment(s), then -- and pytest arguments
  local name=$1 vars=()
  shift
  while [ "$1" != "--" ]; do vars+=("$1"); shift; done
  shift
  local start=$SECONDS
  # -v names each outcome as it happens: a suite cut off by its time limit
  # still says which tests failed (the -ra summary comes only at the end)
  env "${vars[@]}" timeout "$TEST_LIMIT" "$PY" -m pytest tests -v -ra --durations=15 \
    -p no:cacheprovider "$@" \
    >"$OUT/test_$name.log" 2>&1
  echo "exit $? after $((SECONDS - start)) s" >>"$OUT/test_$name.log"
}
# Each framework's own test module runs in its own suite only. Tiny arrays on a
# GPU are launch-bound and jax compiles every shape anew: the suites take
# minutes there, so each is split over pytest-xdist workers where it is installed.
W4=() W8=()
if "$PY" -c "import xdist" 2>/dev/null; then W4=(-n 4) W8=(-n 8); fi
suite cupy XINFLUENCE_BACKEND=cupy -- "${W4[@]}" \
  --ignore=tests/test_torch_backend.py --ignore=tests/test_jax_backend.py &
suite torch_cuda XINFLUENCE_BACKEND=torch XINFLUENCE_DEVICE=cuda -- "${W4[@]}" \
  --ignore=tests/test_cupy_backend.py --ignore=tests/test_jax_backend.py &
suite jax_gpu XINFLUENCE_BACKEND=jax -- "${W8[@]}" --ignore=tests/test_cupy_backend.py \
  --ignore=tests/test_torch_backend.py --ignore=tests/test_torch_device.py &
wait
for f in "$OUT"/test_*.log; do
  echo "== $f"
  grep -E "(FAILED|ERROR)" "$f" | grep -v "^FAILED\|^ERROR" | head -n 20
  tail -n 3 "$f"
done

[ "${SKIP_BENCH:-0}" = 1 ] && exit 0
start=$SECONDS
timeout "$BENCH_LIMIT" "$PY" benchmarks/run_influence.py --device cuda --pydvl-python "$PY" \
  --threads 8 --repeats 3 --long-run 4 --output "$OUT/bench_cuda.md" >"$OUT/bench.log" 2>&1
echo "benchmark: exit $? after $((SECONDS - start)) s"
tail -n 60 "$OUT/bench.log"
