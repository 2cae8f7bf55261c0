r"""Mergeable per-row states: one protocol for whole rows, vocabulary tiles and vocabulary shards.

A row's first pass over any slice ``[v0, v1)`` of the vocabulary yields a :class:`RowState`;
states of disjoint slices merge associatively and commutatively (:func:`merge`); a backend's
``fold(state, slice..., first_slice=False)`` merges a slice's state into a running ``state``
in place (the native and Triton kernels in their epilogue, so a slice costs one launch; with
``first_slice`` into the empty state, without reading ``state``, which then need not be
filled: :func:`unfilled`), and
:func:`finalize` turns the state of the whole vocabulary into the forward's
:class:`~prefopt_kernels.backends.RowStats`. The divergences with a second sweep (js, tv,
hellinger, chi2, alpha) then sum ``q f(t)`` and the centred ``p (f'(t) - f'(t_k))`` per slice
given the final normalisers; those partial sums merge by addition: a backend's
``sweep(stats, slice..., value_sum, centred_sum, first_slice=False)`` adds them into running
accumulators in place (:func:`add_sweep_sums`; with ``first_slice`` without reading them, so
they may be allocated unfilled), and :func:`finish_sweep` completes the divergence.
:func:`finalize` and :func:`finish_sweep` here are the reference backend's; every backend has
both as ``backend.finalize`` / ``backend.finish_sweep``, one launch each on the native and
Triton backends, which the fused linear path and the sharded ops call.
The backward of a slice needs only the final statistics.

The state holds, per row, with ``u_a = (a - m_a) / T``, ``u_b = (b - m_b) / T`` and
``v = (b - b_k) / T`` (``b_k`` the reference logit at the policy's argmax ``k``):

=================  =========================================================================
``max``            ``m_a``, raw policy max (``-inf`` while nothing is folded)
``sum_exp``        ``Z_a = sum exp(u_a)``
``ent_acc``        ``sum exp(u_a) u_a`` (entropy: ``H = log Z_a - ent_acc / Z_a``)
``argmax``         ``k``, the global index of the first policy max (int64, -1 while empty)
``label_logit``    ``a_y`` (raw) once the slice holding the label is folded, else 0
``ref_max``        ``m_b``
``ref_sum_exp``    ``Z_b``
``ref_label_logit``  ``b_y`` as ``label_logit``
``ref_at_argmax``  ``b_k`` raw (``-inf`` where the reference excludes ``k``)
``fkl_acc``        ``sum exp(u_b) (u_b - u_a)``: ``KL(q||p) = fkl_acc / Z_b - log Z_b + log Z_a``
``rkl_acc``        ``sum exp(u_a) (u_a - v)``: ``KL(p||q) = rkl_acc / Z_a - log Z_a
                   - (b_k - m_b) / T + log Z_b``, and ``rkl_acc / Z_a`` is reverse KL's
                   centred ``S``
=================  =========================================================================

Every accumulator is relative to the maxima (and ``b_k``), so a merge rescales the side with
the smaller max by ``exp((m_old - m_new) / T)`` and shifts its relative terms, exactly as the
kernels' online softmax does inside a row: no accuracy is lost however the row is cut. The
argmax goes to the larger max, the smaller index on ties, so the result does not depend on
the order of merging. A NaN or ``+inf`` logit makes ``Z`` NaN, and NaN survives every merge.
All fields are fp32 ``[N]`` (``argmax`` int64); ``None`` where the spec does not need them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch

from ..divergences import Divergence
from . import OpSpec, RowStats, nan_guard, present_stats, rows_read


@dataclass
class RowState:
    """The running first-pass state of each row over the vocabulary folded so far."""

    max: torch.Tensor
    sum_exp: torch.Tensor
    argmax: torch.Tensor
    label_logit: torch.Tensor
    ent_acc: Optional[torch.Tensor] = None
    ref_max: Optional[torch.Tensor] = None
    ref_sum_exp: Optional[torch.Tensor] = None
    ref_label_logit: Optional[torch.Tensor] = None
    ref_at_argmax: Optional[torch.Tensor] = None
    fkl_acc: Optional[torch.Tensor] = None
    rkl_acc: Optional[torch.Tensor] = None

    def tensors(self) -> dict:
        """The fields that are present, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def present_fields(spec: OpSpec, has_ref: bool) -> tuple:
    """The :class:`RowState` fields a first pass of ``spec`` keeps (with a reference or not), in order.

    Those of every row, the running statistics behind the forward's
    :func:`~prefopt_kernels.backends.present_stats` (``ent_acc`` for ``entropy``, the
    reference's maximum, sum and label logit for ``ref_row_max``, ``ref_at_argmax`` as
    itself), and the divergence's first-pass sum, the registry's ``accumulator``.
    """
    stats = present_stats(spec, has_labels=False, has_ref=has_ref)
    member = spec.member if has_ref else None
    present = {
        "max": True, "sum_exp": True, "argmax": True, "label_logit": True,
        "ent_acc": "entropy" in stats,
        "ref_max": "ref_row_max" in stats, "ref_sum_exp": "ref_row_max" in stats,
        "ref_label_logit": "ref_row_max" in stats,
        "ref_at_argmax": "ref_at_argmax" in stats,
    }
    if member is not None and member.accumulator is not None:
        present[member.accumulator] = True
    return tuple(f.name for f in fields(RowState) if present.get(f.name, False))


# The fields that start at -inf; every other floating field starts at 0.
_NEGATIVE_INFINITE_STARTS = ("max", "ref_max")


def empty(n: int, spec: OpSpec, has_ref: bool, device, dtype=torch.float32) -> RowState:
    """The state of ``n`` rows before any slice is folded (the identity of :func:`merge`):
    the fields of :func:`present_fields`, maxima ``-inf``, ``argmax`` -1 and the rest 0.

    The floating fields are the rows of one ``[fields, n]`` buffer, maxima first, so the
    whole state is set by three fills (zeros, the maxima's ``-inf``, ``argmax``) whatever
    the number of fields; each field is a contiguous ``[n]`` row of it.
    """
    return _allocate(n, spec, has_ref, device, dtype, filled=True)


def unfilled(n: int, spec: OpSpec, has_ref: bool, device, dtype=torch.float32) -> RowState:
    """:func:`empty`'s fields and layout, allocated but not filled: for a fold of the rows'
    first slice (``first_slice``), which writes every field of every row without reading it."""
    return _allocate(n, spec, has_ref, device, dtype, filled=False)


def _allocate(n: int, spec: OpSpec, has_ref: bool, device, dtype, filled: bool) -> RowState:
    names = [name for name in present_fields(spec, has_ref) if name != "argmax"]
    names.sort(key=lambda name: name not in _NEGATIVE_INFINITE_STARTS)
    if not filled:
        buffer = torch.empty((len(names), n), dtype=dtype, device=device)
        argmax = torch.empty((n,), dtype=torch.int64, device=device)
    else:
        maxima = sum(name in _NEGATIVE_INFINITE_STARTS for name in names)
        buffer = torch.zeros((len(names), n), dtype=dtype, device=device)
        buffer[:maxima].fill_(-math.inf)
        argmax = torch.full((n,), -1, dtype=torch.int64, device=device)
    return RowState(**dict(zip(names, buffer.unbind(0))), argmax=argmax)


def reset(state: RowState) -> RowState:
    """``state`` set in place to the empty state of :func:`empty`; returns it."""
    for name, value in state.tensors().items():
        value.fill_(-1 if name == "argmax" else -math.inf if name in _NEGATIVE_INFINITE_STARTS else 0)
    return state


def check_sweep_sums(value_sum: torch.Tensor, centred_sum: torch.Tensor, n: int, device) -> None:
    """Refuse, naming the argument, a second sweep's accumulators that are not contiguous fp32
    ``[n]`` tensors on ``device``: the sweep kernels add into them in place through raw pointers."""
    device = torch.device(device)
    for name, acc in (("value_sum", value_sum), ("centred_sum", centred_sum)):
        if (acc.dtype != torch.float32 or tuple(acc.shape) != (n,) or not acc.is_contiguous()
                or acc.device != device):
            raise ValueError(f"sweep: {name} must be a contiguous fp32 [{n}] tensor on {device}, got "
                             f"{acc.dtype} {tuple(acc.shape)} on {acc.device}")


def add_sweep_sums(value_sum: torch.Tensor, centred_sum: torch.Tensor, value, centred,
                   first_slice: bool):
    """``acc = (first_slice ? 0 : acc) + part`` in place for both accumulators (``value`` into
    ``value_sum``, ``centred`` into ``centred_sum``; ``[N]`` tensors, or a number for every row),
    rounded once to the accumulators' dtype: the sweep kernels' epilogue in torch ops. Returns them."""
    for acc, part in ((value_sum, value), (centred_sum, centred)):
        if first_slice:
            acc.zero_()
        acc.add_(part)
    return value_sum, centred_sum


def _shift(m1: torch.Tensor, m2: torch.Tensor, inv_temperature: float):
    """``(m, d1, d2, c1, c2)``: the merged max, each side's ``(m_i - m) / T`` and ``exp`` of it.

    Equal maxima (both ``-inf`` included) give ``d = 0``; the larger side keeps ``c = 1``.
    """
    m = torch.maximum(m1, m2)
    same = m1 == m2
    d1 = torch.where(same | (m1 >= m2), 0.0, (m1 - m) * inv_temperature)
    d2 = torch.where(same | (m2 > m1), 0.0, (m2 - m) * inv_temperature)
    return m, d1, d2, torch.exp(d1), torch.exp(d2)


def _scaled(c, acc, shift, weight):
    """``c (acc + shift * weight)``, 0 where ``weight`` or ``c`` is 0 (no ``0 * inf``)."""
    live = (weight > 0) & (c > 0)
    return torch.where(live, c * (acc + torch.where(live, shift, 0.0) * weight), 0.0)


def _centre(ref_at_argmax: torch.Tensor) -> torch.Tensor:
    """Reverse KL's ``-inf``-safe centre: 0 in place of a ``-inf`` ``ref_at_argmax`` (the KL is +inf there)."""
    return torch.where(ref_at_argmax == -math.inf, 0.0, ref_at_argmax)


def merge(s1: RowState, s2: RowState, spec: OpSpec) -> RowState:
    """The state of the union of two disjoint vocabulary slices; associative and commutative."""
    inv_temperature = 1.0 / spec.temperature
    m, d1, d2, c1, c2 = _shift(s1.max, s2.max, inv_temperature)
    # A slice without a finite policy logit has argmax -1 and never owns it.
    first_owns = (s2.argmax < 0) | ((s1.argmax >= 0) & (
        (s1.max > s2.max) | ((s1.max == s2.max) & (s1.argmax < s2.argmax))))
    out = RowState(
        max=m,
        sum_exp=s1.sum_exp * c1 + s2.sum_exp * c2,
        argmax=torch.where(first_owns, s1.argmax, s2.argmax),
        label_logit=s1.label_logit + s2.label_logit,
    )
    if s1.ent_acc is not None:
        out.ent_acc = _scaled(c1, s1.ent_acc, d1, s1.sum_exp) + _scaled(c2, s2.ent_acc, d2, s2.sum_exp)
    if s1.ref_max is not None:
        mb, e1, e2, k1, k2 = _shift(s1.ref_max, s2.ref_max, inv_temperature)
        out.ref_max = mb
        out.ref_sum_exp = s1.ref_sum_exp * k1 + s2.ref_sum_exp * k2
        out.ref_label_logit = s1.ref_label_logit + s2.ref_label_logit
        if s1.ref_at_argmax is not None:
            out.ref_at_argmax = torch.where(first_owns, s1.ref_at_argmax, s2.ref_at_argmax)
        if s1.fkl_acc is not None:
            out.fkl_acc = (_scaled(k1, s1.fkl_acc, e1 - d1, s1.ref_sum_exp)
                           + _scaled(k2, s2.fkl_acc, e2 - d2, s2.ref_sum_exp))
        if s1.rkl_acc is not None:
            centre = _centre(out.ref_at_argmax)
            shift1 = d1 - (_centre(s1.ref_at_argmax) - centre) * inv_temperature
            shift2 = d2 - (_centre(s2.ref_at_argmax) - centre) * inv_temperature
            out.rkl_acc = _scaled(c1, s1.rkl_acc, shift1, s1.sum_exp) + _scaled(c2, s2.rkl_acc, shift2, s2.sum_exp)
    return out


def merge_into(state: RowState, piece: RowState, spec: OpSpec) -> RowState:
    """``state`` set to :func:`merge` ``(state, piece)`` in place (each field copied back); returns ``state``.

    The fold contract of every backend: the native and Triton kernels do this merge in their
    epilogue, the reference backend here.
    """
    for name, value in merge(state, piece, spec).tensors().items():
        getattr(state, name).copy_(value)
    return state


def _tempered(x: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """``x * (1 / T)``; ``x`` itself at ``T = 1``, where the product is exactly ``x`` (one launch fewer)."""
    return x if inv_temperature == 1.0 else x * inv_temperature


def finalize(state: RowState, labels: Optional[torch.Tensor], weight: Optional[torch.Tensor],
             spec: OpSpec, every_row_read: bool = False) -> RowStats:
    """The forward's :class:`RowStats` from the state of the whole vocabulary.

    Forward and reverse KL are complete here; for a second-sweep divergence ``div`` and
    ``div_s`` are left for :func:`finish_sweep`. Rows that are not computed hold 0 (skipped
    rows everywhere, the divergence fields where ``weight`` is 0), and the NaN policy of
    ``prefopt_kernels.ops`` is applied. ``every_row_read``: the caller knows that no row is
    skipped (its rows were compacted), so only the divergence's zero weights are masked.
    """
    inv_temperature = 1.0 / spec.temperature
    if every_row_read:
        read = None
        div_on = None if weight is None or labels is None else weight != 0
    else:
        read, div_on = rows_read(labels, weight, spec, state.max.shape[0], state.max.device)

    def kept(x, rows=read):
        return x if rows is None else torch.where(rows, x, 0.0)

    row_max = torch.where(state.max == -math.inf, 0.0, state.max)
    log_norm = torch.log(state.sum_exp)
    guard_a = nan_guard(log_norm)
    stats = RowStats(row_max=kept(row_max), log_norm=kept(log_norm))
    if labels is not None and spec.want_logp:
        stats.logp = kept(_tempered(state.label_logit - row_max, inv_temperature) - log_norm + guard_a)
    if spec.want_entropy:
        stats.entropy = kept(log_norm - state.ent_acc / state.sum_exp + guard_a)
    if state.ref_max is None:
        return stats
    ref_row_max = torch.where(state.ref_max == -math.inf, 0.0, state.ref_max)
    ref_log_norm = torch.log(state.ref_sum_exp)
    guard_b = nan_guard(ref_log_norm)
    stats.ref_row_max, stats.ref_log_norm = kept(ref_row_max), kept(ref_log_norm)
    if spec.want_ref_logp:
        stats.ref_logp = kept(_tempered(state.ref_label_logit - ref_row_max, inv_temperature) - ref_log_norm
                              + guard_b)
    if not spec.divergence:
        return stats
    divergence = Divergence(spec.divergence)
    if divergence.centred:
        stats.ref_at_argmax = kept(state.ref_at_argmax, div_on)
    if divergence == Divergence.FORWARD_KL:
        div = state.fkl_acc / state.ref_sum_exp - ref_log_norm + log_norm
        return _set_divergence(stats, div + guard_a + guard_b, torch.full_like(div, -1.0), div_on)
    if divergence == Divergence.REVERSE_KL:
        div_s = state.rkl_acc / state.sum_exp
        div = div_s - log_norm - _tempered(_centre(state.ref_at_argmax) - ref_row_max, inv_temperature) + ref_log_norm
        return _set_divergence(stats, div + guard_a + guard_b, div_s, div_on)
    return stats


def kernel_outputs(spec: OpSpec, has_labels: bool, has_ref: bool) -> tuple:
    """The :class:`RowStats` fields a backend's finalize kernel writes, in field order:
    :func:`~prefopt_kernels.backends.present_stats` less ``ref_at_argmax`` (a centred divergence's
    statistic is the state's own field, masked in place) and, for a second-sweep divergence,
    less ``div`` and ``div_s`` (:func:`finish_sweep` writes them)."""
    member = spec.member if has_ref else None
    later = {"ref_at_argmax"} | ({"div", "div_s"} if member is not None and member.second_sweep else set())
    return tuple(name for name in present_stats(spec, has_labels, has_ref) if name not in later)


def finalize_launch(state: RowState, has_labels: bool, spec: OpSpec, launch) -> RowStats:
    """What a backend's ``finalize`` does around its one launch: refuse a state field that is not
    contiguous (the kernels take raw pointers), allocate the fields the kernel writes
    (:func:`kernel_outputs`), call ``launch(stats)`` to fill them (not with no row: empty tensors
    may have null data pointers), and hand a centred divergence's ``ref_at_argmax`` over as the
    state's own field (masked in place by the kernel: the state is spent)."""
    for name, field in state.tensors().items():
        if not field.is_contiguous():
            raise ValueError(f"finalize: state.{name} must be contiguous")
    n = state.max.shape[0]
    has_ref = state.ref_max is not None
    stats = RowStats.empty(n, kernel_outputs(spec, has_labels, has_ref), state.max.device)
    if n:
        launch(stats)
    member = spec.member if has_ref else None
    if member is not None and member.centred:
        stats.ref_at_argmax = state.ref_at_argmax
    return stats


def _set_divergence(stats: RowStats, div, div_s, div_on) -> RowStats:
    """Store ``div`` and ``div_s`` where the divergence is computed (``div_on`` ``None``: every row);
    ``div_s`` NaN where ``div`` is not finite."""
    div_s = torch.where(torch.isfinite(div), div_s, math.nan)
    stats.div = div if div_on is None else torch.where(div_on, div, 0.0)
    stats.div_s = div_s if div_on is None else torch.where(div_on, div_s, 0.0)
    return stats


def finish_sweep(stats: RowStats, value_sum: torch.Tensor, centred_sum: torch.Tensor,
                 labels: Optional[torch.Tensor], weight: Optional[torch.Tensor], spec: OpSpec,
                 every_row_read: bool = False) -> RowStats:
    """Complete a second-sweep divergence from the summed partial sweeps of every slice.

    ``value_sum = sum_i q_i f(t_i)`` and ``centred_sum = sum_i p_i (f'(t_i) - f'(t_k))``, fp32
    ``[N]``, each the sum of the slices' partial sums. ``every_row_read`` as in :func:`finalize`.
    """
    if every_row_read:
        div_on = None if weight is None or labels is None else weight != 0
    else:
        _, div_on = rows_read(labels, weight, spec, value_sum.shape[0], value_sum.device)
    guard = nan_guard(stats.log_norm) + nan_guard(stats.ref_log_norm)
    return _set_divergence(stats, value_sum + guard, centred_sum, div_on)
