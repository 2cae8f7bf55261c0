"""The row-state kernels over a vocabulary slice: the first pass's unfinished state, and the
second pass's partial sums (see ``prefopt_kernels.backends.row_state``)."""

import triton
import triton.language as tl

from .passes import first_pass, row_plan, second_pass
from .row_math import CENTRED_CODES, FORWARD_KL, KNOWN_CODES, REVERSE_KL, SECOND_SWEEP_CODES, row_offset


@triton.jit
def slice_state_kernel(
    a_ptr, b_ptr, labels_ptr, weight_ptr,
    max_ptr, sum_exp_ptr, ent_acc_ptr, argmax_ptr, label_logit_ptr,
    ref_max_ptr, ref_sum_exp_ptr, ref_label_logit_ptr, ref_at_argmax_ptr, fkl_acc_ptr, rkl_acc_ptr,
    tokens_per_batch, stride_ab, stride_at, stride_bb, stride_bt,
    vocab, v0, inv_temperature, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_REF: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    WANT_ENTROPY: tl.constexpr, DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """The first-pass state (``backends/row_state.py``) of the slice ``[v0, v0 + vocab)``.

    The same first pass as a whole row, left unfinished: raw maxima, lane sums reduced to
    one per row, the argmax as a global index, and the label logits when the slice holds
    the label. ``fkl_acc`` / ``rkl_acc`` is the forward / reverse KL accumulator, 0 where
    the divergence is off. Rows that are not read get the empty state.
    """
    tl.static_assert(((KNOWN_CODES >> DIVERGENCE) & 1) == 1, "unknown DIVERGENCE code")
    CENTRED: tl.constexpr = ((CENTRED_CODES >> DIVERGENCE) & 1) == 1
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
        a_row = a_ptr + row_offset(n, tokens_per_batch, stride_ab, stride_at)
        b_row = b_ptr + row_offset(n, tokens_per_batch, stride_bb, stride_bt)
        ma, za, h, mb, zb, k, ref_at_argmax, k_idx = first_pass(a_row, b_row, vocab, inv_temperature, HAS_REF,
                                                                 WANT_ENTROPY, DIVERGENCE, True, BLOCK_V)
        sum_za = tl.sum(za, axis=0)
        ent = tl.sum(h, axis=0)
        sum_zb = tl.sum(zb, axis=0)
        kl = tl.where(div_on, tl.sum(k, axis=0), 0.0)
        if owned:
            a_y = tl.load(a_row + local).to(tl.float32)
            if HAS_REF:
                b_y = tl.load(b_row + local).to(tl.float32)
    tl.store(max_ptr + n, ma)
    tl.store(sum_exp_ptr + n, sum_za)
    tl.store(argmax_ptr + n, tl.where(k_idx >= 0, k_idx + v0, -1).to(tl.int64))
    tl.store(label_logit_ptr + n, a_y)
    if WANT_ENTROPY:
        tl.store(ent_acc_ptr + n, ent)
    if HAS_REF:
        tl.store(ref_max_ptr + n, mb)
        tl.store(ref_sum_exp_ptr + n, sum_zb)
        tl.store(ref_label_logit_ptr + n, b_y)
        if CENTRED:
            tl.store(ref_at_argmax_ptr + n, tl.where(k_idx >= 0, ref_at_argmax, 0.0))
        if DIVERGENCE == FORWARD_KL:
            tl.store(fkl_acc_ptr + n, kl)
        if DIVERGENCE == REVERSE_KL:
            tl.store(rkl_acc_ptr + n, kl)


@triton.jit
def slice_sweep_kernel(
    a_ptr, b_ptr, labels_ptr, weight_ptr,
    row_max_ptr, log_norm_ptr, ref_row_max_ptr, ref_log_norm_ptr, ref_at_argmax_ptr,
    value_ptr, centred_ptr,
    tokens_per_batch, stride_ab, stride_at, stride_bb, stride_bt,
    vocab, inv_temperature, ignore_index,
    beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
    HAS_LABELS: tl.constexpr, HAS_WEIGHT: tl.constexpr, DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """A slice's partial second-sweep sums, given the row's final statistics (0 where the
    divergence is off)."""
    tl.static_assert(((SECOND_SWEEP_CODES >> DIVERGENCE) & 1) == 1,
                     "the sweep takes the DIVERGENCE code of a second-sweep divergence")
    n = tl.program_id(0)
    _, read, div_on = row_plan(n, labels_ptr, weight_ptr, ignore_index, HAS_LABELS, HAS_WEIGHT)
    value = 0.0
    centred = 0.0
    if div_on:
        a_row = a_ptr + row_offset(n, tokens_per_batch, stride_ab, stride_at)
        b_row = b_ptr + row_offset(n, tokens_per_batch, stride_bb, stride_bt)
        value, centred = second_pass(a_row, b_row, vocab, inv_temperature,
                                      tl.load(row_max_ptr + n), tl.load(log_norm_ptr + n),
                                      tl.load(ref_row_max_ptr + n), tl.load(ref_log_norm_ptr + n),
                                      tl.load(ref_at_argmax_ptr + n),
                                      beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
                                      DIVERGENCE, BLOCK_V)
    tl.store(value_ptr + n, value)
    tl.store(centred_ptr + n, centred)
