#!/usr/bin/env bash
# Offline build, test and benchmark of jaxmps on an NVIDIA GPU host with no package index.
#
# Needs on the host: nvcc (CUDA 12/13), CMake >= 3.18, a C++20 compiler, and in the Python
# environment jax + jaxlib with the CUDA plugin (tested: JAX 0.11.2, CUDA 13), scikit-build-core,
# pytest and pytest-xdist (PyTorch optional, for the comparison columns). Nothing is downloaded:
# the XLA FFI headers are vendored and pip runs with --no-index --no-build-isolation.
#
# Usage:  [BENCH_LAYOUTS="NHWC NCHW"] [BENCH_FAMILY=all|norm|conv] [JAXMPS_LIB_DIR=prebuilt]
#         [PYTEST_WORKERS=8]
#         scripts/gpu_run.sh [OUT_DIR] [MODE]
#   OUT_DIR  where logs and results go (default benchmarks/gpu)
#   MODE     full  (default) build + self-check + whole test suite + benchmark (normalization
#                  and convolution, float32 and bfloat16, the layouts in BENCH_LAYOUTS)
#            tests build + self-check + whole test suite
#            bench build + benchmark
#            quick build + self-check + native-kernel tests + NHWC normalization benchmark
#            sweep build + window-norm benchmark (SWEEP_OPS, default spatial and local
#                  contrast; BENCH_LAYOUTS; no PyTorch) once per setting of a streaming-kernel
#                  knob: SWEEP_KNOB (default JAXMPS_CUDA_STREAM_DEPTH, rows in flight; or
#                  JAXMPS_CUDA_STREAM_LANES, lanes per CTA; JAXMPS_CUDA_COMPILED_BETA,
#                  0 = no compiled beta forms; JAXMPS_CUDA_STREAM_BALANCED, 0 = full-width
#                  strips; JAXMPS_CUDA_STREAM_GRAD_VW, 2 = two-lane spatial gradient;
#                  JAXMPS_CUDA_RESIDENT_WAVES, 1..8 or l2, with SWEEP_OPS=instance_norm;
#                  JAXMPS_CUDA_RESIDENT_BATCHES, 1..8, with SWEEP_OPS="instance_norm
#                  batch_norm"; scripts/gpu_knob_sweep.py sweeps in one process) unset
#                  (auto) and at each of SWEEP_VALUES (default 1 2 4 8)
# Writes: env.txt, build.log (tail), selfcheck.json, pytest.log, bench.json, bench.log
# (sweep: sweep_<knob>_<value>.json/.log).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-benchmarks/gpu}" && cd "${1:-benchmarks/gpu}" && pwd)
MODE=${2:-full}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Several pytest workers share the GPU: allocate on demand instead of 75% per process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
status=0
step() { echo "== $(date +%T) $*"; }

step "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvcc --version | tail -2 || true
  "$PY" -c "import sys, jax, jaxlib; print('python', sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

if [ -n "${JAXMPS_LIB_DIR:-}" ]; then
  # Libraries built elsewhere for this GPU (e.g. `cmake -S xla_ffi -B build/gpu90
  # -DJAXMPS_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90` on a machine with nvcc): skip the
  # build, run the source checkout against them.
  step "prebuilt libraries in $JAXMPS_LIB_DIR (no build)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  step "build and install (offline, CUDA required)"
  # JAXMPS_ENABLE_CUDA=ON: a missing nvcc is a configure error rather than a CPU-only build.
  if ! "$PY" -m pip install --no-index --no-build-isolation --no-deps -v \
      -Ccmake.define.JAXMPS_ENABLE_CUDA=ON -Cbuild-dir=build/gpu . > "$OUT/build.full.log" 2>&1; then
    tail -60 "$OUT/build.full.log" | tee "$OUT/build.log"
    exit 1
  fi
  grep -E "jaxmps|warning|error" "$OUT/build.full.log" | tail -40 > "$OUT/build.log"
  rm -f "$OUT/build.full.log"
fi
# The source checkout shadows the installed package; ffi.py finds the installed libraries.
"$PY" -c "import jaxmps; print(jaxmps.backends())" 2>&1 | tail -3 | tee -a "$OUT/env.txt"

if [ "$MODE" != bench ] && [ "$MODE" != sweep ]; then
  step "self-check (python -m jaxmps --json)"
  "$PY" -m jaxmps --json > "$OUT/selfcheck.json" 2> "$OUT/selfcheck.err" || status=1
  tail -c 300 "$OUT/selfcheck.json"; echo
  [ -s "$OUT/selfcheck.err" ] && tail -5 "$OUT/selfcheck.err"
  rm -f "$OUT/selfcheck.err"

  step "tests"
  # Native kernels must be present: a missing CUDA target fails instead of skipping.
  export JAXMPS_REQUIRE_NATIVE=1
  TESTS="tests"
  [ "$MODE" = quick ] && TESTS="tests/test_norm_native.py tests/test_norm_transforms.py tests/test_cuda_large.py"
  # shellcheck disable=SC2086
  "$PY" -m pytest -q -n "${PYTEST_WORKERS:-8}" -rfEs $TESTS > "$OUT/pytest.log" 2>&1 || status=1
  tail -15 "$OUT/pytest.log"
  unset JAXMPS_REQUIRE_NATIVE
fi

if [ "$MODE" = sweep ]; then
  KNOB=${SWEEP_KNOB:-JAXMPS_CUDA_STREAM_DEPTH}
  for value in auto ${SWEEP_VALUES:-${SWEEP_DEPTHS:-1 2 4 8}}; do
    step "window norms, $KNOB=$value"
    # shellcheck disable=SC2086
    ( [ "$value" = auto ] || export "$KNOB=$value"
      PYTHONPATH="$PWD" "$PY" scripts/gpu_bench.py --family norm --no-torch \
        --ops ${SWEEP_OPS:-spatial_norm local_contrast_norm} --layouts ${BENCH_LAYOUTS:-NHWC NCHW} \
        --repeats ${BENCH_REPEATS:-10} --json "$OUT/sweep_${KNOB}_$value.json" \
        > "$OUT/sweep_${KNOB}_$value.log" 2>&1 ) || status=1
    sed -n '/^all cases/,$p' "$OUT/sweep_${KNOB}_$value.log"
  done
elif [ "$MODE" != tests ]; then
  step "benchmark"
  # scripts/gpu_bench.py: python -m jaxmps.bench with pipelined timing (see its docstring).
  BENCH="--family ${BENCH_FAMILY:-all} --layouts ${BENCH_LAYOUTS:-NHWC NCHW}"
  [ "$MODE" = quick ] && BENCH="--family norm --layouts NHWC"
  # shellcheck disable=SC2086
  PYTHONPATH="$PWD" "$PY" scripts/gpu_bench.py $BENCH --repeats ${BENCH_REPEATS:-10} \
    --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1 || status=1
  sed -n '/^all cases/,$p' "$OUT/bench.log"
fi
step "done (status $status)"
exit $status
