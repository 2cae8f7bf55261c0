"""Every Triton kernel specialisation compiles for a GPU target, with no GPU present, and a
divergence code the registry does not know compiles in none.

The interpreter runs kernels as Python, so it cannot catch what only the compiler rejects
(non-constexpr globals, type mismatches across branches). Compiling each specialisation
for sm_90 to a cubin can; ``triton_compile_worker.py`` does it in a subprocess, because the
interpreter is switched on for this whole test session, with one compiling process per CPU.

The sweep runs on every Triton from the floor in pyproject.toml up: to check the floor,
run this test with that release first on ``PYTHONPATH``.
"""

import os
import signal
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_compile_worker.py")


def test_every_specialisation_compiles_for_sm90():
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = dict(os.environ, TRITON_INTERPRET="0")
    # A session of its own, so that a timeout ends the script's compiling processes with it.
    worker = subprocess.Popen([sys.executable, WORKER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        stdout, stderr = worker.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.communicate()
        raise
    assert worker.returncode == 0, stderr[-4000:]
    from prefopt_kernels.divergences import Divergence

    # Forward, backward and slice state for every (dtype, divergence or none, labels,
    # weight) but the label-less, divergence-less four; the sweep for second-sweep divergences.
    specialisations = 2 * (len(Divergence) + 1) * 4 - 2 * 2
    sweeps = 2 * sum(d.second_sweep for d in Divergence) * 4
    assert f"compiled {3 * specialisations + sweeps}" in stdout, stdout
