"""The whole-row forward kernel: one program per token row, both sweeps inside it.

At large V the second sweep re-reads both rows from HBM, not from L2: the resident programs'
row pairs (608 KB each at V = 151936 in bf16) outgrow a 50 MB L2, so a second-sweep
divergence moves each row twice and its second loop is costed as a read of its own."""

import triton
import triton.language as tl

from .passes import first_pass, row_plan, second_pass
from .row_math import (
    CENTRED_CODES,
    FORWARD_KL,
    KNOWN_CODES,
    REVERSE_KL,
    SECOND_SWEEP_CODES,
    aligned_row,
    finish,
)


@triton.jit
def token_forward_kernel(
    a_ptr, b_ptr, labels_ptr, weight_ptr,
    row_max_ptr, log_norm_ptr, logp_ptr, entropy_ptr, ref_row_max_ptr, ref_log_norm_ptr, ref_logp_ptr,
    div_ptr, div_s_ptr, ref_at_argmax_ptr, top_ptr,
    tokens_per_batch, stride_ab, stride_at, stride_bb, stride_bt,
    vocab, inv_temperature, ignore_index,
    beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
    HAS_LABELS: tl.constexpr, HAS_REF: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    WANT_LOGP: tl.constexpr, WANT_ENTROPY: tl.constexpr, WANT_REF_LOGP: tl.constexpr, DIVERGENCE: tl.constexpr,
    BLOCK_V: tl.constexpr, ALIGN: tl.constexpr, CANDIDATES: tl.constexpr = 0, CAP: tl.constexpr = 1,
):
    """A whole row: the first pass, finished in the program, and the second where needed.

    Each ``WANT_*`` flag (and ``DIVERGENCE``) says whether its output was allocated: an output
    not asked for has only the placeholder pointer, and is neither computed nor stored. Both
    rows share their misalignment (``ALIGN``, ``row_math.aligned_row``). With ``CANDIDATES > 0``
    (the sampler-matched log-probs) the first pass also leaves the row's ``CANDIDATES`` largest
    policy logits in the first slots of its row of ``top_ptr`` (``[N, CAP]`` fp32,
    ``candidates.py``; skipped rows are not touched).
    """
    tl.static_assert(((KNOWN_CODES >> DIVERGENCE) & 1) == 1, "unknown DIVERGENCE code")
    CENTRED: tl.constexpr = ((CENTRED_CODES >> DIVERGENCE) & 1) == 1
    SECOND_SWEEP: tl.constexpr = ((SECOND_SWEEP_CODES >> DIVERGENCE) & 1) == 1
    n = tl.program_id(0)
    label, needed, div_on = row_plan(n, labels_ptr, weight_ptr, ignore_index, HAS_LABELS, HAS_WEIGHT)
    label = tl.minimum(tl.maximum(label, 0), vocab - 1)

    ma_s = 0.0
    log_za = 0.0
    ref_at_argmax = 0.0
    logp = 0.0
    entropy = 0.0
    mb_s = 0.0
    log_zb = 0.0
    ref_logp = 0.0
    div = 0.0
    div_s = 0.0
    if needed:
        a_base, lead = aligned_row(a_ptr, n, tokens_per_batch, stride_ab, stride_at, ALIGN)
        b_base, _ = aligned_row(b_ptr, n, tokens_per_batch, stride_bb, stride_bt, ALIGN)
        ma, za, h, mb, zb, k, ref_at_argmax, _ = first_pass(a_base, b_base, lead, vocab, inv_temperature, HAS_REF,
                                                             WANT_ENTROPY, DIVERGENCE, False, BLOCK_V,
                                                             top_ptr + n.to(tl.int64) * CAP, CANDIDATES, CAP,
                                                             ALIGN == 1)
        ma_s, sum_za, log_za = finish(ma, za)
        if WANT_LOGP:
            logp = (tl.load(a_base + lead + label).to(tl.float32) - ma_s) * inv_temperature - log_za
        if WANT_ENTROPY:
            entropy = log_za - tl.sum(h, axis=0) / sum_za
        if HAS_REF:
            mb_s, sum_zb, log_zb = finish(mb, zb)
            if WANT_REF_LOGP:
                ref_logp = (tl.load(b_base + lead + label).to(tl.float32) - mb_s) * inv_temperature - log_zb
            if div_on:
                if DIVERGENCE == FORWARD_KL:
                    div = tl.sum(k, axis=0) / sum_zb - log_zb + log_za
                    div_s = -1.0
                elif DIVERGENCE == REVERSE_KL:
                    div_s = tl.sum(k, axis=0) / sum_za
                    centre = tl.where(ref_at_argmax == float("-inf"), 0.0, ref_at_argmax)
                    div = div_s - log_za - (centre - mb_s) * inv_temperature + log_zb
                elif SECOND_SWEEP:
                    div, div_s = second_pass(a_base, b_base, lead, vocab, inv_temperature, ma_s, log_za, mb_s, log_zb,
                                              ref_at_argmax, beta, one_minus_beta, log_beta,
                                              log_one_minus_beta, alpha, alpha_minus_one, DIVERGENCE, BLOCK_V,
                                              ALIGN == 1)
                # NaN policy (module docstring), in the one branch that sets div and div_s.
                # A second ``if div_on`` does not compile on Triton 3.2 (forward KL with
                # weights): its combine-tensor-select-and-if pass folds the select that
                # forward KL's constant div_s becomes into the first if, and leaves the
                # second if's use of it undominated.
                div += (log_za - log_za) + (log_zb - log_zb)
                div_s += div - div
        # NaN policy (module docstring): 0, or NaN for a row with a NaN or +inf logit.
        logp += log_za - log_za
        entropy += log_za - log_za
        if HAS_REF:
            ref_logp += log_zb - log_zb
    tl.store(row_max_ptr + n, ma_s)
    tl.store(log_norm_ptr + n, log_za)
    if WANT_LOGP:
        tl.store(logp_ptr + n, logp)
    if WANT_ENTROPY:
        tl.store(entropy_ptr + n, entropy)
    if HAS_REF:
        tl.store(ref_row_max_ptr + n, mb_s)
        tl.store(ref_log_norm_ptr + n, log_zb)
        if WANT_REF_LOGP:
            tl.store(ref_logp_ptr + n, ref_logp)
        if DIVERGENCE != 0:
            tl.store(div_ptr + n, div)
            tl.store(div_s_ptr + n, div_s)
        if CENTRED:
            # 0 on rows without the divergence term, as for div and div_s.
            tl.store(ref_at_argmax_ptr + n, tl.where(div_on, ref_at_argmax, 0.0))
