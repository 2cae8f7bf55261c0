"""The row-state kernels over a vocabulary slice: the first pass's unfinished state merged into
the running state of the row, and the second pass's partial sums (see
``prefopt_kernels.backends.row_state``)."""

import triton
import triton.language as tl

from .passes import first_pass, row_plan, second_pass
from .row_math import CENTRED_CODES, FORWARD_KL, KNOWN_CODES, REVERSE_KL, SECOND_SWEEP_CODES, aligned_row


# first_slice is 1 on a call's first vocabulary chunk and 0 after: not specialised on its value
# (1) or its divisibility (0), both launches run one compiled kernel.
@triton.jit(do_not_specialize=["first_slice"])
def slice_state_kernel(
    a_ptr, b_ptr, labels_ptr, weight_ptr,
    max_ptr, sum_exp_ptr, ent_acc_ptr, argmax_ptr, label_logit_ptr,
    ref_max_ptr, ref_sum_exp_ptr, ref_label_logit_ptr, ref_at_argmax_ptr, fkl_acc_ptr, rkl_acc_ptr, top_ptr,
    tokens_per_batch, stride_ab, stride_at, stride_bb, stride_bt,
    vocab, v0, first_slice, inv_temperature, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_REF: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    WANT_ENTROPY: tl.constexpr, DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr,
    CANDIDATES: tl.constexpr = 0, CAP: tl.constexpr = 1,
):
    """The first-pass state (``backends/row_state.py``) of the slice ``[v0, v0 + vocab)``,
    merged into the running state of each row that the pointers hold (read and written in place).

    The same first pass as a whole row, left unfinished: raw maxima, lane sums reduced to
    one per row, the argmax as a global index, and the label logits when the slice holds
    the label; then :func:`merge_into_row`. ``fkl_acc`` / ``rkl_acc`` is the forward /
    reverse KL accumulator, 0 where the divergence is off. Rows that are not read fold the
    empty state, which leaves theirs as it is. ``first_slice`` (non-zero): the running state
    is not read but taken as the empty one, so every row is written. With ``CANDIDATES > 0`` the same loads also
    leave the slice's ``CANDIDATES`` largest policy logits in the first slots of the row's
    ``CAP`` slots of ``top_ptr`` (as the whole-row forward, ``candidates.py``; rows not read
    are not touched).
    """
    tl.static_assert(((KNOWN_CODES >> DIVERGENCE) & 1) == 1, "unknown DIVERGENCE code")
    n = tl.program_id(0)
    label, read, div_on = row_plan(n, labels_ptr, weight_ptr, ignore_index, HAS_LABELS, HAS_WEIGHT)
    owned = read & (label >= v0) & (label < v0 + vocab)
    local = tl.minimum(tl.maximum(label - v0, 0), tl.maximum(vocab - 1, 0))
    ma = float("-inf")
    sum_za = 0.0
    ent = 0.0
    k_idx = -1
    a_y = 0.0
    mb = float("-inf")
    sum_zb = 0.0
    b_y = 0.0
    ref_at_argmax = 0.0
    kl = 0.0
    if read:
        a_base, lead = aligned_row(a_ptr, n, tokens_per_batch, stride_ab, stride_at, ALIGN)
        b_base, _ = aligned_row(b_ptr, n, tokens_per_batch, stride_bb, stride_bt, ALIGN)
        ma, za, h, mb, zb, k, ref_at_argmax, k_idx = first_pass(a_base, b_base, lead, vocab, inv_temperature,
                                                                 HAS_REF, WANT_ENTROPY, DIVERGENCE, True, BLOCK_V,
                                                                 top_ptr + n.to(tl.int64) * CAP, CANDIDATES, CAP,
                                                                 ALIGN == 1)
        sum_za = tl.sum(za, axis=0)
        ent = tl.sum(h, axis=0)
        sum_zb = tl.sum(zb, axis=0)
        kl = tl.where(div_on, tl.sum(k, axis=0), 0.0)
        if owned:
            a_y = tl.load(a_base + lead + local).to(tl.float32)
            if HAS_REF:
                b_y = tl.load(b_base + lead + local).to(tl.float32)
    merge_into_row(n, first_slice == 0, max_ptr, sum_exp_ptr, ent_acc_ptr, argmax_ptr, label_logit_ptr,
                   ref_max_ptr, ref_sum_exp_ptr, ref_label_logit_ptr, ref_at_argmax_ptr, fkl_acc_ptr, rkl_acc_ptr,
                   ma, sum_za, ent, tl.where(k_idx >= 0, k_idx + v0, -1).to(tl.int64), a_y,
                   mb, sum_zb, b_y, tl.where(k_idx >= 0, ref_at_argmax, 0.0), kl, inv_temperature,
                   HAS_REF, WANT_ENTROPY, DIVERGENCE)


@triton.jit
def merge_shift(m1, m2, inv_temperature):
    """``(m, d1, d2, c1, c2)``: the merged max, each side's ``(m_i - m) / T`` and ``exp`` of it;
    equal maxima (both ``-inf`` included) give ``d = 0``, the larger side ``c = 1``."""
    m = tl.maximum(m1, m2)
    same = m1 == m2
    d1 = tl.where(same | (m1 >= m2), 0.0, (m1 - m) * inv_temperature)
    d2 = tl.where(same | (m2 > m1), 0.0, (m2 - m) * inv_temperature)
    return m, d1, d2, tl.exp(d1), tl.exp(d2)


@triton.jit
def carried(c, acc, shift, weight):
    """One side's accumulator at the merged max: ``c (acc + shift * weight)``, 0 where its
    ``weight`` (sum of exponentials) or scale ``c`` is 0 (no ``0 * inf``)."""
    live = (weight > 0.0) & (c > 0.0)
    return tl.where(live, c * (acc + tl.where(live, shift, 0.0) * weight), 0.0)


@triton.jit
def kl_centre(ref_at_argmax):
    """Reverse KL's ``-inf``-safe centre: 0 in place of a ``-inf`` reference logit at the argmax."""
    return tl.where(ref_at_argmax == float("-inf"), 0.0, ref_at_argmax)


@triton.jit
def merge_into_row(n, stored, max_ptr, sum_exp_ptr, ent_acc_ptr, argmax_ptr, label_logit_ptr,
                   ref_max_ptr, ref_sum_exp_ptr, ref_label_logit_ptr, ref_at_argmax_ptr, fkl_acc_ptr, rkl_acc_ptr,
                   ma, za, ent, k, a_y, mb, zb, b_y, ref_at_argmax, kl, inv_temperature,
                   HAS_REF: tl.constexpr, WANT_ENTROPY: tl.constexpr, DIVERGENCE: tl.constexpr):
    """The fold's epilogue: a slice's state (``k`` its global argmax, -1 where nothing finite
    was folded) merged into row ``n`` of the running state, in place. The math of
    ``row_state.merge``: rescale to the larger max, the larger max (the smaller index on
    ties) owns the argmax and its reference logit, a side with argmax -1 never owns them,
    label logits add. Where not ``stored``, the running state is the empty one (each load's
    ``other``, the values an empty state holds: the result is bit-identical)."""
    CENTRED: tl.constexpr = ((CENTRED_CODES >> DIVERGENCE) & 1) == 1
    r_max = tl.load(max_ptr + n, mask=stored, other=float("-inf"))
    r_sum = tl.load(sum_exp_ptr + n, mask=stored, other=0.0)
    r_k = tl.load(argmax_ptr + n, mask=stored, other=-1)
    m, d1, d2, c1, c2 = merge_shift(r_max, ma, inv_temperature)
    running_owns = (k < 0) | ((r_k >= 0) & ((r_max > ma) | ((r_max == ma) & (r_k < k))))
    tl.store(max_ptr + n, m)
    tl.store(sum_exp_ptr + n, r_sum * c1 + za * c2)
    tl.store(argmax_ptr + n, tl.where(running_owns, r_k, k))
    tl.store(label_logit_ptr + n, tl.load(label_logit_ptr + n, mask=stored, other=0.0) + a_y)
    if WANT_ENTROPY:
        r_ent = tl.load(ent_acc_ptr + n, mask=stored, other=0.0)
        tl.store(ent_acc_ptr + n, carried(c1, r_ent, d1, r_sum) + carried(c2, ent, d2, za))
    if HAS_REF:
        r_ref_max = tl.load(ref_max_ptr + n, mask=stored, other=float("-inf"))
        r_ref_sum = tl.load(ref_sum_exp_ptr + n, mask=stored, other=0.0)
        mb_new, e1, e2, k1, k2 = merge_shift(r_ref_max, mb, inv_temperature)
        tl.store(ref_max_ptr + n, mb_new)
        tl.store(ref_sum_exp_ptr + n, r_ref_sum * k1 + zb * k2)
        tl.store(ref_label_logit_ptr + n, tl.load(ref_label_logit_ptr + n, mask=stored, other=0.0) + b_y)
        if CENTRED:
            r_ref_at_argmax = tl.load(ref_at_argmax_ptr + n, mask=stored, other=0.0)
            merged_ref_at_argmax = tl.where(running_owns, r_ref_at_argmax, ref_at_argmax)
            tl.store(ref_at_argmax_ptr + n, merged_ref_at_argmax)
        if DIVERGENCE == FORWARD_KL:
            r_fkl = tl.load(fkl_acc_ptr + n, mask=stored, other=0.0)
            tl.store(fkl_acc_ptr + n, carried(k1, r_fkl, e1 - d1, r_ref_sum) + carried(k2, kl, e2 - d2, zb))
        if DIVERGENCE == REVERSE_KL:
            centre = kl_centre(merged_ref_at_argmax)
            shift1 = d1 - (kl_centre(r_ref_at_argmax) - centre) * inv_temperature
            shift2 = d2 - (kl_centre(ref_at_argmax) - centre) * inv_temperature
            tl.store(rkl_acc_ptr + n, carried(c1, tl.load(rkl_acc_ptr + n, mask=stored, other=0.0), shift1, r_sum)
                     + carried(c2, kl, shift2, za))


@triton.jit(do_not_specialize=["first_slice"])
def slice_sweep_kernel(
    a_ptr, b_ptr, labels_ptr, weight_ptr,
    row_max_ptr, log_norm_ptr, ref_row_max_ptr, ref_log_norm_ptr, ref_at_argmax_ptr,
    value_ptr, centred_ptr,
    tokens_per_batch, stride_ab, stride_at, stride_bb, stride_bt,
    vocab, first_slice, inv_temperature, ignore_index,
    beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
    HAS_LABELS: tl.constexpr, HAS_WEIGHT: tl.constexpr, DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """A slice's partial second-sweep sums, given the row's final statistics (0 where the
    divergence is off), added into the row's running sums at ``value_ptr`` / ``centred_ptr``:
    ``acc = (first_slice ? 0 : acc) + sum`` in fp32, the stored sums not read on a first slice.
    ``first_slice`` is not specialised, as in :func:`slice_state_kernel`."""
    tl.static_assert(((SECOND_SWEEP_CODES >> DIVERGENCE) & 1) == 1,
                     "the sweep takes the DIVERGENCE code of a second-sweep divergence")
    n = tl.program_id(0)
    _, read, div_on = row_plan(n, labels_ptr, weight_ptr, ignore_index, HAS_LABELS, HAS_WEIGHT)
    value = 0.0
    centred = 0.0
    if div_on:
        a_base, lead = aligned_row(a_ptr, n, tokens_per_batch, stride_ab, stride_at, ALIGN)
        b_base, b_lead = aligned_row(b_ptr, n, tokens_per_batch, stride_bb, stride_bt, ALIGN)
        value, centred = second_pass(a_base, b_base, lead, vocab, inv_temperature,
                                      tl.load(row_max_ptr + n), tl.load(log_norm_ptr + n),
                                      tl.load(ref_row_max_ptr + n), tl.load(ref_log_norm_ptr + n),
                                      tl.load(ref_at_argmax_ptr + n),
                                      beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
                                      DIVERGENCE, BLOCK_V)
    stored = first_slice == 0
    tl.store(value_ptr + n, tl.load(value_ptr + n, mask=stored, other=0.0) + value)
    tl.store(centred_ptr + n, tl.load(centred_ptr + n, mask=stored, other=0.0) + centred)
