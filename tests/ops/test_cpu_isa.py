"""The override of the native CPU kernels' run-time dispatch: ``PREFOPT_CPU_ISA`` in the
environment, ``native.cpu_isa`` in the process, loud failure on a name that cannot run, and
the ``cpu_isa`` mark that runs the kernel suites once per variant (``contract.with_cpu_isas``).
Each variant's numbers are held to the contract by those suites."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from prefopt_kernels.backends import native

from contract import DEVICE, with_cpu_isas

ALL_ISAS = ["avx512", "avx2", "generic"]
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not native.is_available(), reason="native extension not built")


def _child_isa(value: str) -> subprocess.CompletedProcess:
    """A fresh interpreter with ``PREFOPT_CPU_ISA=value`` that prints the variant in use."""
    env = dict(os.environ, PREFOPT_CPU_ISA=value)
    code = "from prefopt_kernels.backends import native; print(native.current_cpu_isa())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def test_supported_variants_are_widest_first_and_include_generic():
    supported = native.supported_cpu_isas()
    assert supported == [isa for isa in ALL_ISAS if isa in supported]
    assert supported[-1] == "generic"
    assert native.current_cpu_isa() in supported


def test_environment_selects_the_variant():
    proc = _child_isa("generic")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "generic"


def test_environment_with_an_unknown_name_fails_naming_the_variable():
    proc = _child_isa("avx3")
    assert proc.returncode != 0
    assert "ValueError: PREFOPT_CPU_ISA must be one of generic, avx2, avx512; got 'avx3'" in proc.stderr


def test_set_and_restore_every_variant():
    before = native.current_cpu_isa()
    for isa in native.supported_cpu_isas():
        with native.cpu_isa(isa):
            from prefopt_kernels import _C

            assert _C.cpu_isa() == native.current_cpu_isa() == isa
            with native.cpu_isa("generic"):
                assert native.current_cpu_isa() == "generic"
            assert native.current_cpu_isa() == isa
        assert native.current_cpu_isa() == before


def test_the_choice_is_process_wide():
    seen = []
    with native.cpu_isa("generic"):
        thread = threading.Thread(target=lambda: seen.append(native.current_cpu_isa()))
        thread.start()
        thread.join(timeout=60)
    assert seen == ["generic"]


@pytest.mark.parametrize("name", ["avx3", "AVX2", "", "native"])
def test_unknown_name_raises_naming_the_argument(name):
    before = native.current_cpu_isa()
    with pytest.raises(ValueError, match="isa must be one of generic, avx2, avx512"):
        native.cpu_isa(name)
    assert native.current_cpu_isa() == before


def test_variant_this_machine_cannot_run_raises():
    missing = [isa for isa in ALL_ISAS if isa not in native.supported_cpu_isas()]
    if not missing:
        pytest.skip("this CPU and build run every variant")
    before = native.current_cpu_isa()
    with pytest.raises(ValueError, match=f"isa='{missing[0]}': this CPU or build cannot run"):
        native.cpu_isa(missing[0])
    assert native.current_cpu_isa() == before


def test_native_parameters_cover_every_variant_once():
    params = with_cpu_isas(["native", "reference"])
    marked = [p.marks[0].args[0] for p in params if not isinstance(p, str)]
    if DEVICE.type != "cpu":
        assert params == ["native", "reference"]
        return
    assert params[0] == "native" and params[-1] == "reference"
    assert sorted(marked + [native.current_cpu_isa()]) == sorted(native.supported_cpu_isas())
    assert all(p.values == ("native",) for p in params if not isinstance(p, str))


@pytest.mark.cpu_isa("generic")
def test_the_mark_switches_for_the_test():
    assert native.current_cpu_isa() == "generic"

