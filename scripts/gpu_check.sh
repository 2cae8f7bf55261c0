#!/usr/bin/env bash
# One command for a GPU machine: environment report, native build, the GPU tests, the
# benchmark suite. Installs nothing from the network (wheels in .whl/ only).
#
#   scripts/gpu_check.sh OUTDIR
#
# OUTDIR receives, flat: setup.log tests.log bench.log results.json results.md results.png
#
# Time: on one H100 the whole check ends within 10 minutes. Every step runs under its own
# limit (seconds; each stopped step gets 5 s more to exit), and the limits add up to
# 555 + 6 * 5 = 585 s:
#   environment report 30, local wheels 40, native build 150, extension check 20,
#   pytest -m gpu 240, benchmarks 75 (the default suite, cut short there: it writes its
#   results after every case, the most telling cases first; PREFOPT_GPU_CHECK_FULL lifts it).
# The native build is bounded by nvcc's one compile unit of CUDA kernels (75 s for sm_90 on
# a small CPU); the CPU kernel variants compile beside it.
#
# The GPU tests' cost on a fresh machine is mostly Triton JIT compiles: one per distinct
# specialisation (kernel, constexpr flags, pointer dtypes, BLOCK_V and num_warps, and
# Triton's own keys on the integer arguments: 16-divisible, equal to 1). The flags and
# dtypes alone give 330 variants per BLOCK_V (tests/ops/test_triton_compile.py counts 220 for
# fp32 and bf16; fp16 adds half again), and BLOCK_V takes up to 14 values (the next power
# of two of V, capped), but the tests reach only some: with the Hypothesis profile "gpu" (a
# tenth of every property test's examples, tests/conftest.py) the GPU subset launches the
# Triton kernels about 990 times in about 660 distinct specialisations (600 without the
# integer keys; counted by recording each launch's GPU key in a dry run), plus about 15
# in the tests that need CUDA (tests/ops/test_gpu.py, test_graph_capture.py, test_compile.py's
# CUDA cases, which also compile with Inductor). At 0.2 to 2 s a compile (measured for
# sm_90 on a small CPU; 0.7 s on average) that is 5 to 8 minutes in one process, so the tests
# run in PREFOPT_GPU_CHECK_WORKERS pytest-xdist processes (default 8 of the 16 cores; they
# share Triton's on-disk cache), one to two minutes of compiles. The log reports the number of
# kernels compiled.
#
# Environment:
#   PYTHON=python                 the interpreter with torch and triton (default: python, else
#                                 python3)
#   PREFOPT_GPU_CHECK_DRY=1       no GPU: the whole flow at tiny shapes, Triton interpreted,
#                                 serial tests, limits for a slow CPU
#   PREFOPT_GPU_CHECK_FULL=1      the full benchmark grid (all N, V, dtypes; far longer)
#   PREFOPT_GPU_CHECK_BUILD=0|1   build the native extension in place (default 1; 0 when DRY)
#   PREFOPT_GPU_CHECK_WORKERS=N   pytest-xdist processes for the tests (default 8, 0 when
#                                 DRY; 0 or xdist missing: one process)
#   PREFOPT_CUDA_ARCHS=90         CUDA architectures for the native build (default: 90)
#   BENCH_ARGS="..."              extra arguments for python -m benchmarks
set -u

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$(command -v python || echo python3)}
DRY=${PREFOPT_GPU_CHECK_DRY:-0}
FULL=${PREFOPT_GPU_CHECK_FULL:-0}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PREFOPT_CUDA_ARCHS=${PREFOPT_CUDA_ARCHS:-90}
BUILD=${PREFOPT_GPU_CHECK_BUILD:-1}
WORKERS=${PREFOPT_GPU_CHECK_WORKERS:-8}
T_ENV=30 T_WHEELS=40 T_BUILD=150 T_CHECK=20 T_TESTS=240 T_BENCH=75
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1
    BUILD=${PREFOPT_GPU_CHECK_BUILD:-0}  # a dry run leaves the checkout's build alone
    WORKERS=${PREFOPT_GPU_CHECK_WORKERS:-0}
    # The interpreter runs every kernel as Python on a CPU: the same flow, far slower.
    T_ENV=60 T_CHECK=60 T_TESTS=1800 T_BENCH=900
fi
[ "$FULL" = 1 ] && T_BENCH=7200
START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START ))s] $*"; }
# A stopped step gets SIGINT first, so pytest and the benchmarks still write their summaries.
limit() { local seconds=$1; shift; timeout -s INT -k 5 "$seconds" "$@"; }
TRITON_CACHE=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
cubins() { find "$TRITON_CACHE" -name '*.cubin' 2> /dev/null | wc -l; }

# --- setup: environment, local wheels, native extension ----------------------------------
NATIVE="not built"
{
    stamp "environment"
    if command -v nvidia-smi > /dev/null; then
        limit "$T_ENV" nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
        limit "$T_ENV" nvidia-smi
    else
        echo "nvidia-smi: not available"
    fi
    NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)  # CMake looks there too
    if [ -x "$NVCC" ]; then
        limit "$T_ENV" "$NVCC" --version | grep -E "release|Build"
    else
        echo "nvcc: not found (the native build makes CPU kernels only)"
    fi
    limit "$T_ENV" "$PY" - <<'EOF'
import importlib.util, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch.version.cuda",
      torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("triton", "pytest", "hypothesis", "xdist"):
    if importlib.util.find_spec(name) is None:
        print(name, "not installed")
    else:
        print(name, getattr(__import__(name), "__version__", "installed"))
EOF
    if compgen -G ".whl/*.whl" > /dev/null; then
        stamp "installing local wheels from .whl/ (no index)"
        limit "$T_WHEELS" "$PY" -m pip install --no-index --find-links .whl .whl/*.whl
    fi
    if [ "$BUILD" = 1 ] && command -v cmake > /dev/null \
        && "$PY" -c "import pybind11" 2> /dev/null; then
        stamp "building the native extension in place (archs $PREFOPT_CUDA_ARCHS)"
        # setup.py exits 0 when the extension fails to build, and a module left by an earlier
        # build would then stand in for this one: remove it, and judge by what imports after.
        rm -f prefopt_kernels/_C.*.so
        limit "$T_BUILD" "$PY" setup.py -q build_ext --inplace || stamp "native build stopped or failed"
        if limit "$T_CHECK" "$PY" -c "import prefopt_kernels._C as c; assert c.has_cuda()"; then
            NATIVE="built with CUDA kernels"
        elif limit "$T_CHECK" "$PY" -c "import prefopt_kernels._C"; then
            NATIVE="built without CUDA kernels"
        else
            NATIVE="build failed"
        fi
        stamp "native extension: $NATIVE"
    else
        stamp "native build skipped (needs cmake and pybind11, or PREFOPT_GPU_CHECK_BUILD=0)"
    fi
    limit "$T_CHECK" "$PY" -c "import prefopt_kernels as pk; print('backends', pk.available_backends())"
    stamp "setup done"
} > "$OUT/setup.log" 2>&1
tail -n 3 "$OUT/setup.log"

# --- GPU tests ---------------------------------------------------------------------------
TESTS_RC=0
MISSING=""
for module in pytest hypothesis; do
    "$PY" -c "import $module" 2> /dev/null || MISSING="$MISSING $module"
done
if [ -n "$MISSING" ]; then
    echo "not installed (and no wheel for it in .whl/):$MISSING: GPU tests not run" | tee "$OUT/tests.log"
    TESTS_RC=1
else
    ARGS=(-m gpu -q -rs -p no:cacheprovider --durations=15)
    if [ "$WORKERS" -gt 0 ] && "$PY" -c "import xdist" 2> /dev/null; then
        ARGS+=(-n "$WORKERS")
    fi
    # Only a build that made the CUDA kernels is expected to have them (tests/ops/test_backends.py).
    [ "$NATIVE" = "built with CUDA kernels" ] && export PREFOPT_EXPECT_CUDA=1
    stamp "pytest ${ARGS[*]} (Hypothesis profile gpu, limit ${T_TESTS}s)"
    BEFORE=$(cubins)
    HYPOTHESIS_PROFILE=gpu limit "$T_TESTS" "$PY" -m pytest "${ARGS[@]}" tests > "$OUT/tests.log" 2>&1
    TESTS_RC=$?
    case $TESTS_RC in 124 | 137) echo "pytest: stopped after ${T_TESTS}s" >> "$OUT/tests.log" ;; esac
    [ "$DRY" = 1 ] || echo "Triton kernels compiled by the tests: $(( $(cubins) - BEFORE ))" >> "$OUT/tests.log"
    # 5: no test selected is not a failure of this script
    [ $TESTS_RC = 5 ] && TESTS_RC=0
    grep -E "passed|failed|error|stopped|compiled by" "$OUT/tests.log" | tail -n 3
fi

# --- benchmarks --------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
    ARGS=(--tiny --backends triton)
elif [ "$FULL" = 1 ]; then
    ARGS=(--full)
else
    ARGS=()
fi
stamp "python -m benchmarks ${ARGS[*]} ${BENCH_ARGS:-} (limit ${T_BENCH}s)"
# shellcheck disable=SC2086
limit "$T_BENCH" "$PY" -m benchmarks "${ARGS[@]}" ${BENCH_ARGS:-} --no-progress \
    --out "$OUT" > "$OUT/bench.log" 2>&1
BENCH_RC=$?
if [ $BENCH_RC = 124 ] || [ $BENCH_RC = 137 ]; then
    # The suite checkpoints after every case: results.* hold the cases that finished.
    echo "benchmarks: stopped after ${T_BENCH}s; results.* hold the finished cases" >> "$OUT/bench.log"
    BENCH_RC=0
fi
tail -n 1 "$OUT/bench.log"

stamp "done: native extension $NATIVE; tests rc=$TESTS_RC, benchmarks rc=$BENCH_RC; files in $OUT:"
ls "$OUT"
[ $TESTS_RC = 0 ] && [ $BENCH_RC = 0 ]
