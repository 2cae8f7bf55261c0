"""The finish of the rows' states, ``BLOCK`` rows per program: the forward's statistics from the
state of the whole vocabulary (``row_state.finalize``) and a second-sweep divergence from its
summed sweeps (``row_state.finish_sweep``), each in one launch."""

import triton
import triton.language as tl

from .row_math import CENTRED_CODES, FORWARD_KL, KNOWN_CODES, REVERSE_KL


@triton.jit
def _rows_read(rows, live, labels_ptr, weight_ptr, ignore_index,
               HAS_LABELS: tl.constexpr, HAS_WEIGHT: tl.constexpr, EVERY_ROW_READ: tl.constexpr):
    """``(read, div_on)`` of ``rows``: an ignored label skips its row; a zero weight drops the
    divergence, and skips the row without labels; ``EVERY_ROW_READ``: no row is skipped, and
    only a zero weight with labels drops the divergence."""
    keep = live
    if HAS_WEIGHT:
        keep = tl.load(weight_ptr + rows, mask=live, other=1.0) != 0.0
    if EVERY_ROW_READ:
        read = live
        div_on = live
        if HAS_LABELS:
            div_on = keep
    elif HAS_LABELS:
        read = tl.load(labels_ptr + rows, mask=live, other=ignore_index) != ignore_index
        div_on = read & keep
    else:
        read = keep
        div_on = keep
    return read, div_on


@triton.jit
def _finish_div(div_ptr, div_s_ptr, rows, live, div, div_s, div_on):
    """Store ``div`` and ``div_s`` (NaN where ``div`` is not finite), 0 where ``div_on`` is false."""
    finite = (div - div) == 0.0
    tl.store(div_ptr + rows, tl.where(div_on, div, 0.0), mask=live)
    tl.store(div_s_ptr + rows, tl.where(div_on, tl.where(finite, div_s, float("nan")), 0.0), mask=live)


@triton.jit
def _finish_head(max_ptr, sum_exp_ptr, label_logit_ptr, row_max_ptr, log_norm_ptr, logp_ptr, rows, live, read,
                 inv_temperature, WANT_LOGP: tl.constexpr):
    """One head's ``row_max`` (0 for a ``-inf`` max), ``log_norm = log Z`` and, asked for, its label
    log-prob ``(z_y - row_max) / T - log_norm``, stored where ``read`` (else 0); returns
    ``(row_max, log_norm, its NaN guard log Z - log Z, Z)``."""
    m = tl.load(max_ptr + rows, mask=live, other=0.0)
    row_max = tl.where(m == float("-inf"), 0.0, m)
    z = tl.load(sum_exp_ptr + rows, mask=live, other=1.0)
    log_norm = tl.log(z)
    guard = log_norm - log_norm
    tl.store(row_max_ptr + rows, tl.where(read, row_max, 0.0), mask=live)
    tl.store(log_norm_ptr + rows, tl.where(read, log_norm, 0.0), mask=live)
    if WANT_LOGP:
        z_y = tl.load(label_logit_ptr + rows, mask=live, other=0.0)
        logp = (z_y - row_max) * inv_temperature - log_norm + guard
        tl.store(logp_ptr + rows, tl.where(read, logp, 0.0), mask=live)
    return row_max, log_norm, guard, z


@triton.jit
def finalize_kernel(
    labels_ptr, weight_ptr,
    max_ptr, sum_exp_ptr, ent_acc_ptr, label_logit_ptr,
    ref_max_ptr, ref_sum_exp_ptr, ref_label_logit_ptr, ref_at_argmax_ptr, fkl_acc_ptr, rkl_acc_ptr,
    row_max_ptr, log_norm_ptr, logp_ptr, entropy_ptr,
    ref_row_max_ptr, ref_log_norm_ptr, ref_logp_ptr, div_ptr, div_s_ptr,
    n_rows, inv_temperature, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_WEIGHT: tl.constexpr, EVERY_ROW_READ: tl.constexpr,
    WANT_LOGP: tl.constexpr, WANT_ENTROPY: tl.constexpr, HAS_REF: tl.constexpr, WANT_REF_LOGP: tl.constexpr,
    DIVERGENCE: tl.constexpr, BLOCK: tl.constexpr,
):
    """The forward's statistics of ``BLOCK`` rows from their states (``row_state.finalize``).

    ``row_max = m_a`` (0 for ``-inf``), ``log_norm = log Z_a`` (``tl.log``, as the whole-row
    kernels' own), ``logp = (a_y - row_max) / T - log_norm``, ``entropy = log_norm - ent_acc /
    Z_a``, the reference's likewise; forward KL ``div = fkl_acc / Z_b - log Z_b + log Z_a``,
    ``div_s = -1``; reverse KL ``div_s = rkl_acc / Z_a``, ``div = div_s - log Z_a - (b_k - m_b) / T
    + log Z_b``; each output plus its rows' NaN guards (``log Z - log Z``). Rows not read hold 0,
    the divergence's fields (a centred one's ``ref_at_argmax``, rewritten in place) 0 where its
    term is off. A second-sweep divergence (no first-pass accumulator) leaves ``div``/``div_s``.
    """
    tl.static_assert(((KNOWN_CODES >> DIVERGENCE) & 1) == 1, "unknown DIVERGENCE code")
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = rows < n_rows
    read, div_on = _rows_read(rows, live, labels_ptr, weight_ptr, ignore_index, HAS_LABELS, HAS_WEIGHT,
                              EVERY_ROW_READ)
    _, log_norm, guard_a, za = _finish_head(max_ptr, sum_exp_ptr, label_logit_ptr, row_max_ptr, log_norm_ptr,
                                            logp_ptr, rows, live, read, inv_temperature, WANT_LOGP)
    if WANT_ENTROPY:
        h = log_norm - tl.load(ent_acc_ptr + rows, mask=live, other=0.0) / za + guard_a
        tl.store(entropy_ptr + rows, tl.where(read, h, 0.0), mask=live)
    if HAS_REF:
        ref_row_max, ref_log_norm, guard_b, zb = _finish_head(
            ref_max_ptr, ref_sum_exp_ptr, ref_label_logit_ptr, ref_row_max_ptr, ref_log_norm_ptr, ref_logp_ptr, rows,
            live, read, inv_temperature, WANT_REF_LOGP)
        if ((CENTRED_CODES >> DIVERGENCE) & 1) == 1:
            b_k = tl.load(ref_at_argmax_ptr + rows, mask=live, other=0.0)
            tl.store(ref_at_argmax_ptr + rows, tl.where(div_on, b_k, 0.0), mask=live)
        if DIVERGENCE == FORWARD_KL:
            div = tl.load(fkl_acc_ptr + rows, mask=live, other=0.0) / zb - ref_log_norm + log_norm
            _finish_div(div_ptr, div_s_ptr, rows, live, div + guard_a + guard_b, tl.zeros_like(div) - 1.0, div_on)
        if DIVERGENCE == REVERSE_KL:
            div_s = tl.load(rkl_acc_ptr + rows, mask=live, other=0.0) / za
            centre = tl.where(b_k == float("-inf"), 0.0, b_k)
            div = div_s - log_norm - (centre - ref_row_max) * inv_temperature + ref_log_norm
            _finish_div(div_ptr, div_s_ptr, rows, live, div + guard_a + guard_b, div_s, div_on)


@triton.jit
def finish_sweep_kernel(
    labels_ptr, weight_ptr, log_norm_ptr, ref_log_norm_ptr, value_sum_ptr, centred_sum_ptr, div_ptr, div_s_ptr,
    n_rows, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_WEIGHT: tl.constexpr, EVERY_ROW_READ: tl.constexpr, BLOCK: tl.constexpr,
):
    """A second-sweep divergence of ``BLOCK`` rows (``row_state.finish_sweep``): ``div =
    value_sum`` plus the NaN guards of ``log_norm`` and ``ref_log_norm``, ``div_s = centred_sum``
    (NaN where ``div`` is not finite), both 0 where the divergence's term is off."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = rows < n_rows
    _, div_on = _rows_read(rows, live, labels_ptr, weight_ptr, ignore_index, HAS_LABELS, HAS_WEIGHT,
                           EVERY_ROW_READ)
    log_norm = tl.load(log_norm_ptr + rows, mask=live, other=0.0)
    ref_log_norm = tl.load(ref_log_norm_ptr + rows, mask=live, other=0.0)
    div = tl.load(value_sum_ptr + rows, mask=live, other=0.0) + ((log_norm - log_norm) + (ref_log_norm - ref_log_norm))
    _finish_div(div_ptr, div_s_ptr, rows, live, div, tl.load(centred_sum_ptr + rows, mask=live, other=0.0), div_on)
