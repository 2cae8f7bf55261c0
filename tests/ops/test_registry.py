"""One registry: Python, Triton and C++ agree on every divergence code, on the rules that
follow from it (centred, second sweep, first-pass accumulator) and on the lists of per-row
statistics and row-state fields, and unknown codes fail."""

import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import prefopt_kernels as pk
from prefopt_kernels.backends import (SAVED_STATS, SWEEP_STATS, OpSpec, RowStats, present_stats, reference,
                                      row_state, saved_names)
from prefopt_kernels.divergences import DIVERGENCES, GENERATORS, Divergence, resolve

ROOT = Path(__file__).resolve().parents[2]


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
    # Exactly the divergences without a second sweep keep a first-pass sum, in a RowState field.
    assert {d: d.accumulator for d in Divergence if d.accumulator} == {
        Divergence.FORWARD_KL: "fkl_acc", Divergence.REVERSE_KL: "rkl_acc"}
    assert all(d.second_sweep == (d.accumulator is None) for d in Divergence)
    assert {d.accumulator for d in Divergence if d.accumulator} <= {f.name for f in fields(row_state.RowState)}


@pytest.mark.parametrize("has_labels", [False, True])
@pytest.mark.parametrize("has_ref", [False, True])
@pytest.mark.parametrize("code", [0] + [int(d) for d in Divergence])
def test_the_present_statistics_follow_the_registry(code, has_ref, has_labels):
    spec = OpSpec(divergence=code, want_logp=True, want_ref_logp=True, want_entropy=True)
    member = spec.member if has_ref else None
    stats = present_stats(spec, has_labels, has_ref)
    assert list(stats) == [f.name for f in fields(RowStats) if f.name in stats]
    assert ("div" in stats) == ("div_s" in stats) == (member is not None)
    assert ("ref_at_argmax" in stats) == (member is not None and member.centred)
    assert ("logp" in stats) == has_labels and ("ref_logp" in stats) == (has_labels and has_ref)
    # The saved statistics are those of the forward, whatever the labels.
    assert saved_names(spec, has_ref) == tuple(name for name in SAVED_STATS if name in stats)
    state = row_state.present_fields(spec, has_ref)
    assert ("ref_at_argmax" in state) == ("ref_at_argmax" in stats)
    assert {"fkl_acc", "rkl_acc"} & set(state) == ({member.accumulator} if member and member.accumulator else set())
    assert tuple(row_state.empty(2, spec, has_ref, "cpu").tensors()) == state


def test_the_cpp_enum_matches():
    header = (ROOT / "csrc" / "include" / "prefopt" / "common.h").read_text()
    body = re.search(r"enum Divergence : int \{(.*?)\};", header, re.S).group(1)
    cpp = {name.lower(): int(code) for name, code in re.findall(r"k(\w+) = (\d+)", body)}
    assert cpp.pop("nodivergence") == 0
    assert cpp == {d.name.replace("_", "").lower(): int(d) for d in Divergence}


def test_the_cpp_traits_match_the_registry():
    from prefopt_kernels.backends import native

    if not native.is_available():
        pytest.skip("native extension not built")
    for d in Divergence:
        assert native._C.divergence_traits(int(d)) == {
            "centred": d.centred, "second_sweep": d.second_sweep, "first_pass_accumulator": d.accumulator is not None}
    assert native._C.divergence_traits(0) == {"centred": False, "second_sweep": False, "first_pass_accumulator": False}
    with pytest.raises(ValueError, match="unknown divergence code"):
        native._C.divergence_traits(max(Divergence) + 1)


def test_the_triton_constants_match():
    row_math = pytest.importorskip("prefopt_kernels.backends.triton.kernels.row_math")
    for d in Divergence:
        assert getattr(row_math, d.name).value == int(d)

    def codes(bits):
        return {c for c in range(bits.value.bit_length()) if (bits.value >> c) & 1}

    assert codes(row_math.KNOWN_CODES) == {0} | {int(d) for d in Divergence}
    assert codes(row_math.CENTRED_CODES) == {int(d) for d in Divergence if d.centred}
    assert codes(row_math.SECOND_SWEEP_CODES) == {int(d) for d in Divergence if d.second_sweep}


def test_an_unknown_code_fails_loudly():
    with pytest.raises(ValueError, match="unknown divergence code"):
        Divergence(len(Divergence) + 1)
    with pytest.raises(ValueError, match="unknown divergence code"):
        present_stats(OpSpec(divergence=len(Divergence) + 1), False, True)
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
    sums = torch.empty(2), torch.empty(2)
    with pytest.raises(ValueError, match="unknown divergence code"):
        native.sweep(stats, rows, rows, None, None, OpSpec(divergence=len(Divergence) + 1), 0, *sums,
                     first_slice=True)
    # A known code that has no second sweep is refused too, never summed as something else.
    with pytest.raises(ValueError, match="sweep is for"):
        native.sweep(stats, rows, rows, None, None, OpSpec(divergence=Divergence.REVERSE_KL), 0, *sums,
                     first_slice=True)
    monkeypatch.setitem(native.DTYPE_CODES, torch.float32, len(native.DTYPE_CODES))
    with pytest.raises(ValueError, match="unknown dtype code"):
        native.forward(rows, None, rows, None, OpSpec(divergence=Divergence.JS))


def test_the_triton_kernels_refuse_unknown_codes():
    from prefopt_kernels.backends import triton as triton_backend

    if not triton_backend.is_available():
        pytest.skip("triton cannot run here")
    rows = torch.randn(1, 2, 5, device="cuda" if torch.cuda.is_available() else "cpu")
    unknown = OpSpec(divergence=len(Divergence) + 1)
    # The forward's allocation (present_stats) refuses it before a launch...
    with pytest.raises(ValueError, match="unknown divergence code"):
        triton_backend.forward(rows, None, rows, None, unknown)
    # ... and a kernel at compile time, as the backward (which allocates nothing) shows.
    stats = triton_backend.forward(rows, None, rows, None, OpSpec(divergence=Divergence.JS))
    with pytest.raises(Exception, match="unknown DIVERGENCE code"):
        triton_backend.backward(rows, None, rows, None, unknown, stats, None, None,
                                torch.ones(2, device=rows.device), torch.empty_like(rows))


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
