"""One registry: Python, Triton and C++ agree on every divergence code and on the lists of
per-row statistics and row-state fields, and unknown codes fail."""

import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import prefopt_kernels as pk
from prefopt_kernels.backends import SAVED_STATS, SWEEP_STATS, OpSpec, RowStats, reference, row_state
from prefopt_kernels.divergences import DIVERGENCES, GENERATORS, Divergence, resolve

ROOT = Path(__file__).resolve().parent.parent


def test_names_codes_and_generators_come_from_the_enum():
    assert DIVERGENCES == tuple(d.key for d in Divergence) == pk.DIVERGENCES
    assert sorted(int(d) for d in Divergence) == list(range(1, len(Divergence) + 1))
    assert set(GENERATORS) == set(Divergence)
    for d in Divergence:
        assert resolve(d.key, 0.5, 0.5)[0] is d
    # Forward KL alone has S = -1 exactly; the two KLs alone finish in the first sweep.
    assert [d for d in Divergence if not d.centred] == [Divergence.FORWARD_KL]
    assert {d for d in Divergence if not d.second_sweep} == {Divergence.FORWARD_KL, Divergence.REVERSE_KL}
    assert {d: d.parameter for d in Divergence if d.parameter} == {Divergence.JS: "beta", Divergence.ALPHA: "alpha"}


def test_the_cpp_enum_matches():
    header = (ROOT / "csrc" / "include" / "prefopt" / "common.h").read_text()
    body = re.search(r"enum Divergence : int \{(.*?)\};", header, re.S).group(1)
    cpp = {name.lower(): int(code) for name, code in re.findall(r"k(\w+) = (\d+)", body)}
    assert cpp.pop("nodivergence") == 0
    assert cpp == {d.name.replace("_", "").lower(): int(d) for d in Divergence}


def test_the_triton_constants_match():
    kernels = pytest.importorskip("prefopt_kernels.backends.triton.kernels")
    for d in Divergence:
        assert getattr(kernels, d.name).value == int(d)


def test_an_unknown_code_fails_loudly():
    with pytest.raises(ValueError):
        Divergence(len(Divergence) + 1)
    spec = OpSpec(divergence=len(Divergence) + 1)
    a = torch.randn(2, 5)
    with pytest.raises((KeyError, ValueError)):
        reference.evaluate(a, None, a, None, spec)


def test_the_native_dispatch_refuses_unknown_codes(monkeypatch):
    from prefopt_kernels.backends import native

    if not native.is_available():
        pytest.skip("native extension not built")
    rows = torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match="unknown divergence code"):
        native.forward(rows, None, rows, None, OpSpec(divergence=len(Divergence) + 1))
    stats = native.forward(rows, None, rows, None, OpSpec(divergence=Divergence.JS))
    with pytest.raises(ValueError, match="unknown divergence code"):
        native.backward(rows, None, rows, None, OpSpec(divergence=len(Divergence) + 1), stats,
                        None, None, torch.ones(2), torch.empty_like(rows))
    with pytest.raises(ValueError, match="unknown divergence code"):
        native.sweep(stats, rows, rows, None, None, OpSpec(divergence=len(Divergence) + 1), 0)
    # A known code that has no second sweep is refused too, never summed as something else.
    with pytest.raises(ValueError, match="sweep is for"):
        native.sweep(stats, rows, rows, None, None, OpSpec(divergence=Divergence.REVERSE_KL), 0)
    monkeypatch.setitem(native.DTYPE_CODES, torch.float32, len(native.DTYPE_CODES))
    with pytest.raises(ValueError, match="unknown dtype code"):
        native.forward(rows, None, rows, None, OpSpec(divergence=Divergence.JS))


def test_the_triton_kernels_refuse_unknown_codes():
    from prefopt_kernels.backends import triton as triton_backend

    if not triton_backend.is_available():
        pytest.skip("triton cannot run here")
    rows = torch.randn(1, 2, 5, device="cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(Exception, match="unknown DIVERGENCE code"):
        triton_backend.forward(rows, None, rows, None, OpSpec(divergence=len(Divergence) + 1))


def test_the_cpp_lists_match_the_python_ones():
    from prefopt_kernels.backends import native

    if not native.is_available():
        pytest.skip("native extension not built")
    assert native._C.SAVED_STATS == SAVED_STATS
    assert native._C.SWEEP_STATS == SWEEP_STATS
    assert native._C.ROW_STATE_FIELDS == tuple(f.name for f in fields(row_state.RowState))
    # The forward writes every RowStats field: the saved statistics and the per-token outputs.
    assert sorted(native._C.SAVED_STATS + native._C.TOKEN_OUTPUTS) == sorted(f.name for f in fields(RowStats))
    assert set(SWEEP_STATS) <= set(SAVED_STATS)


def test_the_triton_kernels_take_the_lists():
    kernels = pytest.importorskip("prefopt_kernels.backends.triton.kernels")

    def pointers(kernel):
        return {name[: -len("_ptr")] for name in kernel.arg_names if name.endswith("_ptr")}

    assert {f.name for f in fields(RowStats)} <= pointers(kernels.token_forward_kernel)
    assert set(SAVED_STATS) <= pointers(kernels.token_backward_kernel)
    assert set(SWEEP_STATS) <= pointers(kernels.slice_sweep_kernel)
    assert {f.name for f in fields(row_state.RowState)} <= pointers(kernels.slice_state_kernel)
