"""Test configuration shared by the whole suite.

The tests live in folders by area (``ops/``, ``linear/``, ``losses/``, ``integrations/``,
``distributed/``, ``examples/``); the helpers they share (``contract.py``, ``strategies.py``,
``dpo_rounding.py``, ``launch.py``, ``toy_margin_loss.py``) stay here and are imported by their plain names, so this
directory is put on ``sys.path`` for every test module, whatever folder it is in. What the tests
of one folder share is in one module of that folder (``linear/linear_cases.py``,
``distributed/distributed_cases.py``, ``losses/losses_cases.py``, ``integrations/trl_cases.py``),
which they import by its plain name too (pytest puts a test module's folder on ``sys.path``).
Test module names must be unique across the folders (they are imported by their plain names too).

Without a CUDA device the Triton kernels run on CPU tensors in Triton's interpreter; the
variable must be set before Triton compiles anything, so it is set here, before any test
module imports the package.
"""

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# Each folder's helper module (linear_cases.py, ...) holds checks the tests of that folder share:
# pytest rewrites their asserts as it does a test module's, so that a failing one shows its values.
pytest.register_assert_rewrite("linear_cases", "distributed_cases", "losses_cases", "trl_cases")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

_QUIET = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("default", derandomize=True, max_examples=100, **_QUIET)
# Long runs, off in CI: every property test draws 20 times its default count
# (strategies.scaled reads max_examples), with fresh random examples each run.
settings.register_profile("thorough", max_examples=2000, **_QUIET)
# The GPU check (scripts/gpu_check.sh), which has minutes for the whole GPU subset: every
# property test draws a tenth of its default count, so that the distinct shapes, each a
# Triton compile on a GPU, stay few.
settings.register_profile("gpu", derandomize=True, max_examples=10, **_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    """The GPU subset (``-m gpu``) also holds every test of a backend that runs on the GPU
    here: Triton always, the native backend when a CUDA device is present."""
    gpu_backends = ("triton", "native") if torch.cuda.is_available() else ("triton",)
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("backend") in gpu_backends:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _cpu_isa(request):
    """A test marked ``cpu_isa(name)`` runs the native CPU kernels' ``name`` variant; the
    previous one is restored after it (``contract.with_cpu_isas`` adds the marks)."""
    marker = request.node.get_closest_marker("cpu_isa")
    if marker is None:
        yield
        return
    from prefopt_kernels.backends import native

    with native.cpu_isa(marker.args[0]):
        yield


# Every function of a backend module that runs kernels: the logits ops' forward and backward,
# the linear ops' fold, sweep and slice backward, and the row states' finish.
KERNEL_ENTRY_POINTS = ("forward", "backward", "fold", "sweep", "slice_backward", "finalize", "finish_sweep")


@pytest.fixture
def no_kernels(request, monkeypatch):
    """Bad input must be refused before any kernel runs: every kernel entry point of every
    available backend fails the test if reached. Parametrized indirectly with a backend name
    (``@pytest.mark.parametrize("no_kernels", names, indirect=True)``), the fixture also
    selects that backend for the test (``pk.use_backend``)."""
    import prefopt_kernels as pk

    def refuse(*args, **kwargs):
        raise AssertionError("a kernel ran on bad input")

    for name in pk.available_backends():
        module = importlib.import_module(f"prefopt_kernels.backends.{name}")
        for entry_point in KERNEL_ENTRY_POINTS:
            if hasattr(module, entry_point):
                monkeypatch.setattr(module, entry_point, refuse)
    backend = getattr(request, "param", None)
    if backend is None:
        yield
        return
    with pk.use_backend(backend):
        yield
