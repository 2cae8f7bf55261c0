"""Host builds of the CUDA headers' rules: a driver source compiled by nvcc for the CPU, so that
the device code's arithmetic and selection run here against float64 and torch references."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_host_driver(tmp_path_factory, name: str, source: str) -> str:
    """Compile ``source`` (CUDA C++ that includes ``csrc`` headers) for the host; the binary's path.
    Skips the test without nvcc; a failed compile fails it with nvcc's message."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    work = tmp_path_factory.mktemp(name)
    driver, binary = work / "driver.cu", work / "driver"
    driver.write_text(source)
    done = subprocess.run([nvcc, "-O2", "-std=c++17", "--expt-relaxed-constexpr", "-x", "cu",
                           "-I", os.path.join(ROOT, "csrc"), "-I", os.path.join(ROOT, "csrc", "include"),
                           str(driver), "-o", str(binary)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return str(binary)
