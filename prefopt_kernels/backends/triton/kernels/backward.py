"""The backward kernel: the gradient of one vocabulary slice of a row (a whole row is
``v0 = 0``) from the forward's saved statistics."""

import triton
import triton.language as tl

from .passes import row_plan
from .row_math import (
    CENTRED_CODES,
    FORWARD_KL,
    KNOWN_CODES,
    REVERSE_KL,
    SECOND_SWEEP_CODES,
    aligned_row,
    centred_slope,
    edge_tile,
    f_prime,
    fast_exp,
    load_tile,
    tile_count,
)


# log_norm below this: p_k = exp(-log_norm) > 0.5016. Tied maxima each add exactly 1 to the row's
# sum of exponentials, so log_norm >= fl(ln 2) = 0.6931...: below the bound the maximum is unique.
PEAKED_LOG_NORM = tl.constexpr(0.69)
# Rows this wide or wider are not rewritten, as in the native kernels (zero_sum_row), whose float
# sum of column + 1 is exact only below it.
ZERO_SUM_MAX_VOCAB = 1 << 24


@triton.jit
def token_backward_kernel(
    a_ptr, b_ptr, grad_ptr, labels_ptr, weight_ptr,
    row_max_ptr, log_norm_ptr, entropy_ptr, ref_row_max_ptr, ref_log_norm_ptr, div_s_ptr, ref_at_argmax_ptr,
    grad_logp_ptr, grad_entropy_ptr, grad_div_ptr,
    tokens_per_batch, stride_ab, stride_at, stride_bb, stride_bt, stride_gb, stride_gt,
    vocab, v0, inv_temperature, ignore_index,
    beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
    HAS_LABELS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    GRAD_LOGP: tl.constexpr, GRAD_ENTROPY: tl.constexpr, DIVERGENCE: tl.constexpr,
    BLOCK_V: tl.constexpr, ALIGN: tl.constexpr, ZERO_SUM: tl.constexpr,
):
    """``g_j = (1/T)[g_logp (1[j=y] - p_j) - g_H p_j (log p_j + H) + g_D p_j (f'(t_j) - S)]``.

    ``f'(t_j) - S`` is formed as ``(f'(t_j) - f'(t_k)) - div_s`` with the centred ``div_s``
    of ``RowStats`` (forward KL: ``p_j f'(t_j) - p_j S = p_j - q_j`` directly).
    ``DIVERGENCE`` is 0 when no divergence gradient is needed. Every element of the row is
    read before it is written, so ``grad_ptr`` may alias ``a_ptr``. The three rows share
    their misalignment (``ALIGN``, ``row_math.aligned_row``). The row may be the
    slice ``[v0, v0 + vocab)`` of a wider vocabulary (a whole row has ``v0 = 0``): only the
    statistics of the whole row enter. A row that is not
    skipped gets ``log_norm - log_norm`` (and ``div_s - div_s`` where the divergence term is
    active) added to every element: NaN rows stay NaN whatever the upstream gradients.

    ``ZERO_SUM`` (a whole row, fp32 gradient): the gradient of any function of ``softmax(a / T)``
    sums to 0 over the row. Where the policy is peaked (``p_k > e^-0.69``, just over 1/2, so ``k`` is its
    one maximum), ``g_k`` is a difference of two numbers near ``1 / T`` whose fp32 ``log_norm`` carries
    a few eps, while every other ``g_j`` is accurate relative to its size; ``g_k`` is rewritten as
    ``-sum_{j != k} g_j`` (plus the row's NaN guard, which a one-entry row has nowhere else),
    summed in the same pass (a compare, a select and an add per element).
    """
    tl.static_assert(((KNOWN_CODES >> DIVERGENCE) & 1) == 1, "unknown DIVERGENCE code")
    CENTRED: tl.constexpr = ((CENTRED_CODES >> DIVERGENCE) & 1) == 1
    SECOND_SWEEP: tl.constexpr = ((SECOND_SWEEP_CODES >> DIVERGENCE) & 1) == 1
    n = tl.program_id(0)
    label, needed, div_on = row_plan(n, labels_ptr, weight_ptr, ignore_index, HAS_LABELS, HAS_WEIGHT)
    label = label - v0

    g_logp = 0.0
    if GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + n)
    g_entropy = 0.0
    entropy = 0.0
    if GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + n)
        entropy = tl.load(entropy_ptr + n)
    ma = tl.load(row_max_ptr + n)
    log_za = tl.load(log_norm_ptr + n)
    g_div = 0.0
    div_s = 0.0
    mb = 0.0
    log_zb = 0.0
    if DIVERGENCE != 0:
        g_div = tl.where(div_on, tl.load(grad_div_ptr + n), 0.0)
        div_s = tl.load(div_s_ptr + n)
        mb = tl.load(ref_row_max_ptr + n)
        log_zb = tl.load(ref_log_norm_ptr + n)
    ref_at_argmax = 0.0
    fprime_k = 0.0
    if CENTRED:
        ref_at_argmax = tl.load(ref_at_argmax_ptr + n)
    if SECOND_SWEEP:
        lq_k = (ref_at_argmax - mb) * inv_temperature - log_zb
        fprime_k = f_prime(-log_za, lq_k, beta, one_minus_beta, log_beta, log_one_minus_beta,
                            alpha, alpha_minus_one, DIVERGENCE)
    guard = log_za - log_za
    div_active = False
    if DIVERGENCE != 0:
        div_active = g_div != 0.0
        guard += tl.where(div_active, div_s - div_s, 0.0)
    guard = tl.where(needed, guard, 0.0)
    # The row is read only where some term of its gradient is asked for.
    compute = needed
    if not (GRAD_LOGP or GRAD_ENTROPY):
        compute = needed & div_active

    a_base, lead = aligned_row(a_ptr, n, tokens_per_batch, stride_ab, stride_at, ALIGN)
    b_base, _ = aligned_row(b_ptr, n, tokens_per_batch, stride_bb, stride_bt, ALIGN)
    g_base, _ = aligned_row(grad_ptr, n, tokens_per_batch, stride_gb, stride_gt, ALIGN)
    cols = tl.arange(0, BLOCK_V)
    last = tile_count(vocab, lead, BLOCK_V)
    columns, mask = edge_tile(0, lead, vocab, BLOCK_V)
    row_sum, top = gradient_tile(a_base + cols, b_base + cols, g_base + cols, columns, mask, True, compute, label,
                                 ma, log_za, mb, log_zb, entropy, ref_at_argmax, fprime_k, div_s, g_logp, g_entropy,
                                 g_div, div_active, guard, inv_temperature, beta, one_minus_beta, log_beta,
                                 log_one_minus_beta, alpha, alpha_minus_one, GRAD_LOGP, GRAD_ENTROPY, DIVERGENCE,
                                 ZERO_SUM)
    for tile in range(1, last):
        start = tile * BLOCK_V
        tile_sum, tile_top = gradient_tile(
            a_base + start + cols, b_base + start + cols, g_base + start + cols, start - lead + cols, mask, False,
            compute, label, ma, log_za, mb, log_zb, entropy, ref_at_argmax, fprime_k, div_s, g_logp, g_entropy,
            g_div, div_active, guard, inv_temperature, beta, one_minus_beta, log_beta, log_one_minus_beta, alpha,
            alpha_minus_one, GRAD_LOGP, GRAD_ENTROPY, DIVERGENCE, ZERO_SUM)
        if ZERO_SUM:
            row_sum += tile_sum
            top += tile_top
    if last > 0:
        start = last * BLOCK_V
        columns, mask = edge_tile(last, lead, vocab, BLOCK_V)
        tile_sum, tile_top = gradient_tile(
            a_base + start + cols, b_base + start + cols, g_base + start + cols, columns, mask, True, compute, label,
            ma, log_za, mb, log_zb, entropy, ref_at_argmax, fprime_k, div_s, g_logp, g_entropy, g_div, div_active,
            guard, inv_temperature, beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
            GRAD_LOGP, GRAD_ENTROPY, DIVERGENCE, ZERO_SUM)
        if ZERO_SUM:
            row_sum += tile_sum
            top += tile_top
    if ZERO_SUM:
        # k + 1 summed over the row's maxima: exactly k + 1 where the row is peaked.
        k = tl.sum(top, axis=0) - 1
        if compute & (log_za < PEAKED_LOG_NORM) & (k >= 0):
            # Every thread's stores of this row land before the argmax entry is overwritten.
            tl.debug_barrier()
            tl.store(g_base + lead + k, guard - tl.sum(row_sum, axis=0))


@triton.jit
def gradient_tile(a_tile, b_tile, g_tile, columns, mask, MASKED: tl.constexpr, compute, label, ma, log_za, mb,
                   log_zb, entropy, ref_at_argmax, fprime_k, div_s, g_logp, g_entropy, g_div, div_active, guard,
                   inv_temperature, beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
                   GRAD_LOGP: tl.constexpr, GRAD_ENTROPY: tl.constexpr, DIVERGENCE: tl.constexpr,
                   ZERO_SUM: tl.constexpr):
    """One tile of :func:`token_backward_kernel`'s gradient (pointers ``a_tile``, ``b_tile``,
    ``g_tile``; the row's ``columns``), stored in the gradient's dtype; a masked tile
    (``MASKED``) reads and writes only the lanes of ``mask``. Returns, for ``ZERO_SUM``, the
    stored fp32 values (0 off ``mask`` and where the logit is the row's max) and ``column + 1``
    where it is the max (else 0); zeros otherwise."""
    grad = tl.zeros(columns.shape, tl.float32)
    top = tl.zeros(columns.shape, tl.int32)
    if compute:
        x = load_tile(a_tile, mask, MASKED).to(tl.float32)
        if ZERO_SUM:
            top = tl.where(x == ma, columns + 1, 0)
        lp = (x - ma) * inv_temperature - log_za
        p = fast_exp(lp)
        if GRAD_LOGP:
            grad += g_logp * (tl.where(columns == label, 1.0, 0.0) - p)
        if GRAD_ENTROPY:
            grad -= g_entropy * tl.where(p > 0.0, p * (lp + entropy), 0.0)
        if DIVERGENCE != 0:
            if div_active:
                y = load_tile(b_tile, mask, MASKED).to(tl.float32)
                if DIVERGENCE == FORWARD_KL:
                    # p f'(t) = -q and S = -1: the gradient is p - q.
                    grad += g_div * (p - fast_exp((y - mb) * inv_temperature - log_zb))
                elif DIVERGENCE == REVERSE_KL:
                    centred = (x - ma) * inv_temperature - (y - ref_at_argmax) * inv_temperature - div_s
                    grad += g_div * tl.where(p > 0.0, p * centred, 0.0)
                else:
                    lq = (y - mb) * inv_temperature - log_zb
                    grad += g_div * centred_slope(lp, lq, fprime_k, div_s, beta, one_minus_beta, log_beta,
                                                   log_one_minus_beta, alpha, alpha_minus_one, DIVERGENCE)
    grad = grad * inv_temperature + guard
    if MASKED:
        tl.store(g_tile, grad.to(g_tile.dtype.element_ty), mask=mask)
        grad = tl.where(mask, grad, 0.0)
    else:
        tl.store(g_tile, grad.to(g_tile.dtype.element_ty))
    if ZERO_SUM:
        grad = tl.where(top > 0, 0.0, grad)
    else:
        grad = tl.zeros(columns.shape, tl.float32)
    return grad, top
