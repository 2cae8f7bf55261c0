#!/usr/bin/env bash
# One command for a GPU machine: environment report, native build, the GPU tests, the
# benchmark suite. Installs nothing from the network. About 8 minutes on an H100.
#
#   scripts/gpu_check.sh OUTDIR
#
# OUTDIR receives, flat: setup.log tests.log bench.log results.json results.md results.png
#
# Environment:
#   PYTHON=python                 the interpreter (with torch and triton installed)
#   PREFOPT_GPU_CHECK_DRY=1       no GPU: the whole flow at tiny shapes, Triton interpreted
#   PREFOPT_GPU_CHECK_FULL=1      the full benchmark grid (all N, V, dtypes; far longer)
#   PREFOPT_GPU_CHECK_BUILD=0|1   build the native extension in place (default 1; 0 when DRY)
#   PREFOPT_CUDA_ARCHS=90         CUDA architectures for the native build (default: 90)
#   BENCH_ARGS="..."              extra arguments for python -m benchmarks
set -u

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python}
DRY=${PREFOPT_GPU_CHECK_DRY:-0}
FULL=${PREFOPT_GPU_CHECK_FULL:-0}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PREFOPT_CUDA_ARCHS=${PREFOPT_CUDA_ARCHS:-90}
BUILD=${PREFOPT_GPU_CHECK_BUILD:-1}
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1
    BUILD=${PREFOPT_GPU_CHECK_BUILD:-0}  # a dry run leaves the checkout's build alone
fi
START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START ))s] $*"; }

# --- setup: environment, local wheels, native extension ----------------------------------
{
    stamp "environment"
    nvidia-smi || echo "nvidia-smi: not available"
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda",
      torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
EOF
    if compgen -G ".whl/*.whl" > /dev/null; then
        stamp "installing local wheels from .whl/ (no index)"
        "$PY" -m pip install --no-index --find-links .whl .whl/*.whl
    fi
    if [ "$BUILD" = 1 ] && command -v cmake > /dev/null \
        && "$PY" -c "import pybind11" 2> /dev/null; then
        stamp "building the native extension in place (archs $PREFOPT_CUDA_ARCHS)"
        timeout 300 "$PY" setup.py -q build_ext --inplace || stamp "native build failed or timed out"
    else
        stamp "native build skipped (needs cmake and pybind11, or PREFOPT_GPU_CHECK_BUILD=0)"
    fi
    "$PY" -c "import prefopt_kernels as pk; print('backends', pk.available_backends())"
    stamp "setup done"
} > "$OUT/setup.log" 2>&1
tail -n 3 "$OUT/setup.log"

# --- GPU tests ---------------------------------------------------------------------------
TESTS_RC=0
if "$PY" -c "import pytest" 2> /dev/null; then
    stamp "pytest -m gpu"
    # On a GPU machine the native extension must carry its CUDA kernels.
    [ "$DRY" = 1 ] || export PREFOPT_EXPECT_CUDA=1
    timeout 240 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests > "$OUT/tests.log" 2>&1
    TESTS_RC=$?
    # 5: no test selected (e.g. none marked gpu yet) is not a failure of this script
    [ $TESTS_RC = 5 ] && TESTS_RC=0
    tail -n 2 "$OUT/tests.log"
else
    echo "pytest not installed (and no wheel for it in .whl/): GPU tests not run" > "$OUT/tests.log"
    TESTS_RC=0
fi

# --- benchmarks --------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
    ARGS=(--tiny --backends triton)
elif [ "$FULL" = 1 ]; then
    ARGS=(--full)
else
    ARGS=()
fi
BENCH_TIMEOUT=360
[ "$FULL" = 1 ] && BENCH_TIMEOUT=7200
stamp "python -m benchmarks ${ARGS[*]} ${BENCH_ARGS:-}"
# shellcheck disable=SC2086
timeout "$BENCH_TIMEOUT" "$PY" -m benchmarks "${ARGS[@]}" ${BENCH_ARGS:-} --no-progress \
    --out "$OUT" > "$OUT/bench.log" 2>&1
BENCH_RC=$?
[ $BENCH_RC = 124 ] && echo "benchmarks: stopped after ${BENCH_TIMEOUT}s" >> "$OUT/bench.log"
tail -n 1 "$OUT/bench.log"

stamp "done: tests rc=$TESTS_RC, benchmarks rc=$BENCH_RC; files in $OUT:"
ls "$OUT"
[ $TESTS_RC = 0 ] && [ $BENCH_RC = 0 ]
