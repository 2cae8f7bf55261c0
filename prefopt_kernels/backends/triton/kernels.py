"""Triton kernels: one forward and one backward family, specialised by constexpr flags.

One program handles one token row. Logits are scaled by ``1/T`` on load and all arithmetic
is fp32. Sums run in ``BLOCK_V`` lane accumulators that are reduced by a tree at the end,
so accuracy does not degrade with V. Running maxima are per row (one block max per
iteration), so each element costs one ``exp`` per row it belongs to.

The forward keeps, per row and per distribution, a running maximum ``m`` of the raw logits
(a ``-inf``-safe copy ``m_s`` shifts the exponentials) and lane sums relative to it, with
``u = (x - m_s) / T`` (raw difference first: exact where ``p`` is large):

* ``z = sum exp(u)``, and the row's ``log_norm = log Z`` (saved with ``row_max = m_s``);
* entropy: ``h = sum exp(u) u``, so ``H = log Z - h / Z``;
* KL(q||p): ``k = sum exp(u_b) (u_b - u_a)``, so ``KL = k / Z_b - log Z_b + log Z_a``
  (reverse KL swaps the roles).

When a maximum grows by ``d``, earlier lane sums are rescaled by ``exp(-d / T)`` and the
relative terms shift by ``-d / T`` times the matching ``z``: one sweep, no second read. The
non-linear divergences need both log-sum-exps first, so they add a second sweep over the
same row inside the same program.
"""

import triton
import triton.language as tl

FORWARD_KL = tl.constexpr(1)
REVERSE_KL = tl.constexpr(2)
JS = tl.constexpr(3)
TV = tl.constexpr(4)
HELLINGER = tl.constexpr(5)
CHI2 = tl.constexpr(6)
ALPHA = tl.constexpr(7)


@triton.jit
def _row_offset(n, tokens_per_batch, stride_batch, stride_token):
    """Element offset of token ``n`` in a ``[B, T, V]`` view, in int64."""
    n64 = n.to(tl.int64)
    return (n64 // tokens_per_batch) * stride_batch + (n64 % tokens_per_batch) * stride_token


@triton.jit
def _online_step(m, x, inv_temperature):
    """Fold one tile of raw logits ``x`` into a running row max ``m``.

    Returns the new max, the factor that rescales earlier lane sums, the shift of earlier
    relative terms (both 0-safe while the max is still ``-inf``), ``u = (x - max) / T`` and
    ``exp(u)``.
    """
    tile_max = tl.max(x, axis=0)
    m_new = tl.maximum(m, tile_max)
    m_new_s = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = tl.exp((m - m_new_s) * inv_temperature)
    shift = tl.where(m == float("-inf"), 0.0, (m - m_new_s) * inv_temperature)
    rel = (x - m_new_s) * inv_temperature
    return tile_max, m_new, scale, shift, rel, tl.exp(rel)


@triton.jit
def _finish(m, z):
    """``(-inf-safe max, Z, log Z)`` of a row from its max and lane sums."""
    total = tl.sum(z, axis=0)
    return tl.where(m == float("-inf"), 0.0, m), total, tl.log(total)


@triton.jit
def _f_value(lp, lq, beta, alpha, DIVERGENCE: tl.constexpr):
    """``q f(t)`` of a non-linear divergence from ``lp = log p``, ``lq = log q`` (``-inf`` legal)."""
    has_p = lp > float("-inf")
    has_q = lq > float("-inf")
    p = tl.exp(lp)
    q = tl.exp(lq)
    zero = tl.zeros_like(lp)
    if DIVERGENCE == JS:
        lm = _log_mixture(lp, lq, beta)
        value = beta * tl.where(has_q, q * (lq - lm), zero) + (1.0 - beta) * tl.where(has_p, p * (lp - lm), zero)
    elif DIVERGENCE == TV:
        value = 0.5 * tl.abs(p - q)
    elif DIVERGENCE == HELLINGER:
        diff = tl.exp(0.5 * lp) - tl.exp(0.5 * lq)
        value = diff * diff
    elif DIVERGENCE == CHI2:
        # q (t - 1)^2 in log space, each branch on its own side of d = 0: t can overflow
        # where q underflows.
        d = lp - lq
        shrink = 1.0 - tl.exp(-tl.maximum(d, 0.0))
        grow = tl.exp(tl.minimum(d, 0.0)) - 1.0
        value = tl.where(d > 0.0, tl.exp(lp + d) * shrink * shrink, q * grow * grow)
        value = tl.where(has_q, value, tl.where(has_p, float("inf"), zero))
    else:
        # Amari alpha; p^a q^(1-a) at the support's edges is 0 unless an exponent blows it up.
        p_only = tl.where(alpha > 1.0, float("inf"), 0.0)
        q_only = tl.where(alpha < 0.0, float("inf"), 0.0)
        mixed = tl.where(
            has_p & has_q,
            tl.exp(alpha * lp + (1.0 - alpha) * lq),
            tl.where(has_p, p_only, tl.where(has_q, q_only, zero)),
        )
        value = (mixed - alpha * p - (1.0 - alpha) * q) / (alpha * (alpha - 1.0))
    return value


@triton.jit
def _f_prime(lp, lq, beta, alpha, DIVERGENCE: tl.constexpr):
    """``f'(t)`` of a non-linear divergence where ``p > 0`` (callers weight it by ``p``)."""
    if DIVERGENCE == JS:
        fprime = (1.0 - beta) * (lp - _log_mixture(lp, lq, beta))
    elif DIVERGENCE == TV:
        fprime = tl.where(lp > lq, 0.5, tl.where(lp < lq, -0.5, 0.0))
    elif DIVERGENCE == HELLINGER:
        fprime = 1.0 - tl.exp(0.5 * (lq - lp))
    elif DIVERGENCE == CHI2:
        fprime = 2.0 * (tl.exp(lp - lq) - 1.0)
    else:
        fprime = (tl.exp((alpha - 1.0) * (lp - lq)) - 1.0) / (alpha - 1.0)
    return fprime


@triton.jit
def _centred_slope(lp, lq, fprime_k, shift, beta, alpha, DIVERGENCE: tl.constexpr):
    """``p (f'(t) - f'(t_k) - shift)``, 0 where ``p = 0``.

    Differences of ``f'`` first: exact at the argmax ``k``. Where ``f'(t)`` itself overflows
    (``t`` huge or tiny under a power) or ``p`` underflows while ``p f'(t)`` does not, the
    product is formed in log space instead: chi2 ``2 (exp(2 lp - lq) - p)``, alpha
    ``(exp(a lp + (1-a) lq) - p) / (a - 1)``.
    """
    p = tl.exp(lp)
    fprime = _f_prime(lp, lq, beta, alpha, DIVERGENCE)
    centred = tl.where(p > 0.0, p * (fprime - fprime_k - shift), 0.0)
    if DIVERGENCE == CHI2 or DIVERGENCE == ALPHA:
        if DIVERGENCE == CHI2:
            p_fprime = 2.0 * (tl.exp(lp + (lp - lq)) - p)
        else:
            p_fprime = (tl.exp(alpha * lp + (1.0 - alpha) * lq) - p) / (alpha - 1.0)
        direct = (p > 0.0) & (tl.abs(fprime) < float("inf"))
        centred = tl.where(direct, centred, p_fprime - p * (fprime_k + shift))
        centred = tl.where(lp > float("-inf"), centred, 0.0)
    return centred


@triton.jit
def _log_mixture(lp, lq, beta):
    """``log(beta q + (1 - beta) p)``, exact where either side is ``-inf``."""
    u = tl.log(beta) + lq
    v = tl.log(1.0 - beta) + lp
    hi = tl.maximum(u, v)
    lo = tl.minimum(u, v)
    return tl.where(lo > float("-inf"), hi + tl.log(1.0 + tl.exp(lo - hi)), hi)


@triton.jit
def token_forward_kernel(
    a_ptr, b_ptr, labels_ptr, weight_ptr,
    row_max_ptr, log_norm_ptr, logp_ptr, entropy_ptr, ref_row_max_ptr, ref_log_norm_ptr, ref_logp_ptr,
    div_ptr, div_s_ptr, ref_at_argmax_ptr,
    tokens_per_batch, stride_ab, stride_at, stride_bb, stride_bt,
    vocab, inv_temperature, ignore_index, beta, alpha,
    HAS_LABELS: tl.constexpr, HAS_REF: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    WANT_ENTROPY: tl.constexpr, WANT_REF_LOGP: tl.constexpr, DIVERGENCE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0)
    valid = True
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + n)
        valid = label != ignore_index
        label = tl.minimum(tl.maximum(label, 0), vocab - 1)
    div_on = valid
    if HAS_WEIGHT:
        div_on = valid & (tl.load(weight_ptr + n) != 0.0)
    # Without labels the divergence is the only output: a zero weight skips the row.
    needed = div_on
    if HAS_LABELS:
        needed = valid

    ma_s = 0.0
    log_za = 0.0
    y_at_argmax = 0.0
    logp = 0.0
    entropy = 0.0
    mb_s = 0.0
    log_zb = 0.0
    ref_logp = 0.0
    div = 0.0
    div_s = 0.0
    if needed:
        a_row = a_ptr + _row_offset(n, tokens_per_batch, stride_ab, stride_at)
        b_row = b_ptr + _row_offset(n, tokens_per_batch, stride_bb, stride_bt)
        cols = tl.arange(0, BLOCK_V)
        ma = float("-inf")
        mb = float("-inf")
        y_am = 0.0
        za = tl.zeros((BLOCK_V,), tl.float32)
        zb = tl.zeros((BLOCK_V,), tl.float32)
        h = tl.zeros((BLOCK_V,), tl.float32)
        k = tl.zeros((BLOCK_V,), tl.float32)
        for start in range(0, vocab, BLOCK_V):
            mask = start + cols < vocab
            x = tl.load(a_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            # Differences of raw logits first, then the temperature: exact where p is large.
            block_max, ma_new, scale_a, shift_a, x_rel, ea = _online_step(ma, x, inv_temperature)
            if WANT_ENTROPY:
                h = scale_a * (h + shift_a * za) + tl.where(x > float("-inf"), ea * x_rel, 0.0)
            if HAS_REF:
                y = tl.load(b_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
                _, mb_new, scale_b, shift_b, y_rel, eb = _online_step(mb, y, inv_temperature)
                if DIVERGENCE == FORWARD_KL:
                    k = scale_b * (k + (shift_b - shift_a) * zb) + tl.where(y > float("-inf"), eb * (y_rel - x_rel), 0.0)
                if DIVERGENCE >= REVERSE_KL:
                    # The reference logit at the policy's running argmax: the centre of S.
                    y_block = tl.sum(tl.where(cols == tl.argmax(x, axis=0), y, 0.0), axis=0)
                    y_am_new = tl.where(block_max > ma, y_block, y_am)
                if DIVERGENCE == REVERSE_KL:
                    # Terms u_a - v with v = (y - y_am) / T, shifted as y_am moves. A -inf y_am
                    # (q_k = 0: the KL is +inf) is centred at 0 instead, which keeps it +inf.
                    y_am_s = tl.where(y_am == float("-inf"), 0.0, y_am)
                    y_am_new_s = tl.where(y_am_new == float("-inf"), 0.0, y_am_new)
                    shift_v = (y_am_s - y_am_new_s) * inv_temperature
                    v = (y - y_am_new_s) * inv_temperature
                    k = scale_a * (k + (shift_a - shift_v) * za) + tl.where(x > float("-inf"), ea * (x_rel - v), 0.0)
                if DIVERGENCE >= REVERSE_KL:
                    y_am = y_am_new
                zb = zb * scale_b + eb
                mb = mb_new
            za = za * scale_a + ea
            ma = ma_new
        ma_s, sum_za, log_za = _finish(ma, za)
        if HAS_LABELS:
            logp = (tl.load(a_row + label).to(tl.float32) - ma_s) * inv_temperature - log_za
        if WANT_ENTROPY:
            entropy = log_za - tl.sum(h, axis=0) / sum_za
        if HAS_REF:
            mb_s, sum_zb, log_zb = _finish(mb, zb)
            if WANT_REF_LOGP:
                ref_logp = (tl.load(b_row + label).to(tl.float32) - mb_s) * inv_temperature - log_zb
            if div_on:
                if DIVERGENCE == FORWARD_KL:
                    div = tl.sum(k, axis=0) / sum_zb - log_zb + log_za
                    div_s = -1.0
                elif DIVERGENCE == REVERSE_KL:
                    div_s = tl.sum(k, axis=0) / sum_za
                    y_am_s = tl.where(y_am == float("-inf"), 0.0, y_am)
                    div = div_s - log_za - (y_am_s - mb_s) * inv_temperature + log_zb
                elif DIVERGENCE != 0:
                    # f'(t_k) at the policy's argmax k, whose log p is exactly -log_za.
                    fprime_k = _f_prime(-log_za, (y_am - mb_s) * inv_temperature - log_zb, beta, alpha, DIVERGENCE)
                    values = tl.zeros((BLOCK_V,), tl.float32)
                    centred = tl.zeros((BLOCK_V,), tl.float32)
                    for start in range(0, vocab, BLOCK_V):
                        mask = start + cols < vocab
                        x = tl.load(a_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
                        y = tl.load(b_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
                        lp = (x - ma_s) * inv_temperature - log_za
                        lq = (y - mb_s) * inv_temperature - log_zb
                        values += tl.where(mask, _f_value(lp, lq, beta, alpha, DIVERGENCE), 0.0)
                        centred += _centred_slope(lp, lq, fprime_k, 0.0, beta, alpha, DIVERGENCE)
                    div = tl.sum(values, axis=0)
                    div_s = tl.sum(centred, axis=0)
                y_at_argmax = y_am
    tl.store(row_max_ptr + n, ma_s)
    tl.store(log_norm_ptr + n, log_za)
    if HAS_LABELS:
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
        if DIVERGENCE >= REVERSE_KL:
            tl.store(ref_at_argmax_ptr + n, y_at_argmax)


@triton.jit
def token_backward_kernel(
    a_ptr, b_ptr, grad_ptr, labels_ptr, weight_ptr,
    row_max_ptr, log_norm_ptr, entropy_ptr, ref_row_max_ptr, ref_log_norm_ptr, div_s_ptr, ref_at_argmax_ptr,
    grad_logp_ptr, grad_entropy_ptr, grad_div_ptr,
    tokens_per_batch, stride_ab, stride_at, stride_bb, stride_bt, stride_gb, stride_gt,
    vocab, inv_temperature, ignore_index, beta, alpha,
    HAS_LABELS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    GRAD_LOGP: tl.constexpr, GRAD_ENTROPY: tl.constexpr, DIVERGENCE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``g_j = (1/T)[g_logp (1[j=y] - p_j) - g_H p_j (log p_j + H) + g_D p_j (f'(t_j) - S)]``.

    ``f'(t_j) - S`` is formed as ``(f'(t_j) - f'(t_k)) - div_s`` with the centred ``div_s``
    of ``RowStats`` (forward KL: ``p_j f'(t_j) - p_j S = p_j - q_j`` directly).
    ``DIVERGENCE`` is 0 when no divergence gradient is needed. Every element of the row is
    read before it is written, so ``grad_ptr`` may alias ``a_ptr``.
    """
    n = tl.program_id(0)
    valid = True
    label = -1
    if HAS_LABELS:
        label = tl.load(labels_ptr + n)
        valid = label != ignore_index
    div_on = valid
    if HAS_WEIGHT:
        div_on = valid & (tl.load(weight_ptr + n) != 0.0)
    # With only a divergence gradient to write, a zero weight skips the row's reads.
    needed = valid
    if not (GRAD_LOGP or GRAD_ENTROPY):
        needed = div_on

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
    y_am = 0.0
    fprime_k = 0.0
    if DIVERGENCE >= REVERSE_KL:
        y_am = tl.load(ref_at_argmax_ptr + n)
    if DIVERGENCE > REVERSE_KL:
        fprime_k = _f_prime(-log_za, (y_am - mb) * inv_temperature - log_zb, beta, alpha, DIVERGENCE)

    a_row = a_ptr + _row_offset(n, tokens_per_batch, stride_ab, stride_at)
    b_row = b_ptr + _row_offset(n, tokens_per_batch, stride_bb, stride_bt)
    g_row = grad_ptr + _row_offset(n, tokens_per_batch, stride_gb, stride_gt)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, vocab, BLOCK_V):
        mask = start + cols < vocab
        grad = tl.zeros((BLOCK_V,), tl.float32)
        if needed:
            x = tl.load(a_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            lp = (x - ma) * inv_temperature - log_za
            p = tl.exp(lp)
            if GRAD_LOGP:
                grad += g_logp * (tl.where(start + cols == label, 1.0, 0.0) - p)
            if GRAD_ENTROPY:
                grad -= g_entropy * tl.where(p > 0.0, p * (lp + entropy), 0.0)
            if DIVERGENCE != 0:
                if div_on:
                    y = tl.load(b_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
                    if DIVERGENCE == FORWARD_KL:
                        # p f'(t) = -q and S = -1: the gradient is p - q.
                        grad += g_div * (p - tl.exp((y - mb) * inv_temperature - log_zb))
                    elif DIVERGENCE == REVERSE_KL:
                        centred = (x - ma) * inv_temperature - (y - y_am) * inv_temperature - div_s
                        grad += g_div * tl.where(p > 0.0, p * centred, 0.0)
                    else:
                        lq = (y - mb) * inv_temperature - log_zb
                        grad += g_div * _centred_slope(lp, lq, fprime_k, div_s, beta, alpha, DIVERGENCE)
            grad = grad * inv_temperature
        tl.store(g_row + start + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
