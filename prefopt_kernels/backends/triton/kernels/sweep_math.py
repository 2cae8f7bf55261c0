"""The second sweep of js, chi2 and alpha in base-2 logs: per element a few ``ex2``, at most
one ``lg2`` and short polynomials, the sums finished once per row.

The sweep reads ``lp2 = log2 p`` and ``lq2 = log2 q`` (``(x - max) / T`` first, then the
scale ``log2(e)``: exact where ``p`` is large) and accumulates lane sums from which the row's
``sum q f(t)`` and centred ``sum p (f'(t) - f'(t_k))`` follow (``k`` the policy's argmax):

* js, ``m = beta q + (1 - beta) p``: with "main" the side of the larger weight (``p`` for
  ``beta <= 1/2``), ``b <= 1/2`` the other side's weight and ``w2 = log2(other / main)``:
  ``A = log2(m / main) = log2(1 + z)``, ``z = b (2^w2 - 1)``, by a polynomial while
  ``|z| <= 0.2`` (there ``lg2.approx``'s absolute error would be a large relative one; its
  relative error stays ``1.4e-7``), else by ``lg2``; past ``w2 >= log2(1 / b)`` ("far")
  from ``y = m / other = b + (1 - b) / r``, ``A = w2 + log2 y``, ``log2(other / m) = -log2 y``,
  so that neither cancels against ``w2``. The sums: ``main A``, ``other log2(other / m)``,
  ``main``, ``other``; ``D = ln2 (b sum other lom - (1 - b) sum main A)`` and
  ``f' = (1 - beta) ln2 (p main ? -A : lom)``.
* chi2: ``u = 2^-|d2|``, ``d2 = lp2 - lq2``, the larger of ``p``, ``q`` from one ``ex2`` and
  the smaller as its product with ``u``; ``p t = p^2 / q`` as ``ex2(2 lp2 - lq2)`` where
  ``p > q`` (it may exceed fp32 only where the divergence does), else ``small u``. Sums:
  ``q (t - 1)^2 = (p > q ? p t : q) (1 - u)^2`` and ``p (t - t_k)``, ``t = ex2(d2)`` formed as
  ``t_k`` is (so the argmax's term is exactly 0), or ``p t - p t_k`` where ``t`` overflows.
* alpha: with ``c`` the nearer of ``alpha - 1`` and ``alpha`` and ``base`` the matching side
  (``p`` near 1, else ``q``), ``M = p^a q^(1-a) = ex2(log2 base + c d2)`` and
  ``rest = M - base = base expm1(c d)`` (the Taylor series where ``|c d| < ln2 / 2``).
  Sums: ``rest``, ``p - q`` and ``X - p C``: near 1 ``X = rest``, ``C = expm1((a-1) d_k)``,
  else ``X = M``, ``C = t_k^(a-1)``; ``D = (sum rest / c - sum (p - q)) / (the other of
  a, a - 1)``, centred ``= sum (X - p C) / (a - 1)``.

``-inf`` logits (and masked columns) are clamped to ``-2^100`` in base-2 log space (js,
alpha) or in ``d2`` (chi2): every product then has a finite factor and a ``0`` one gives
0, never NaN; ``ex2`` of such a clamp is exactly 0. Rows with NaN or ``+inf`` are NaN by the
kernels' row-level policy."""

import triton
import triton.language as tl

from .row_math import CHI2, INTERPRETED, JS, LN2, LOG2E, edge_tile, expm1, load_tile, tile_count, tile_pointers

# log2(1 + z) / z on |z| <= 0.2: Chebyshev fit, relative error below 1.4e-7 in fp32.
JS_SMALL_Z = tl.constexpr(0.2)
LOG2_FLOOR = tl.constexpr(-1.2676506002282294e30)  # -2^100


@triton.jit
def widen(x):
    """``x`` as fp32; bf16 as its bits shifted into the top half (one instruction an element,
    whether it was loaded alone or in a vector)."""
    y = x.to(tl.float32)
    if x.dtype == tl.bfloat16:
        y = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return y


@triton.jit
def fast_log2(x):
    """``log2(x)`` as one ``lg2.approx`` (absolute error about ``2^-22``: callers use it only
    where ``|log2 x|`` is not small); ``tl.log2`` in the interpreter."""
    if INTERPRETED:
        y = tl.log2(x)
    else:
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return y


@triton.jit
def js_row_constants(beta, one_minus_beta, log_beta, log_one_minus_beta):
    """``(p_main, b, 1 - b, far threshold log2(1 / b), b (1 - b))`` of js's main-side form."""
    q_main = beta > 0.5
    b = tl.where(q_main, one_minus_beta, beta)
    one_minus_b = tl.where(q_main, beta, one_minus_beta)
    far_from = -tl.where(q_main, log_one_minus_beta, log_beta) * LOG2E
    return q_main, b, one_minus_b, far_from, b * one_minus_b


@triton.jit
def js_logs2(lm2, lo2, b, one_minus_b, far_from, b_one_minus_b):
    """``(log2(m / main), log2(other / m))`` from finite ``lm2 = log2 main``, ``lo2 = log2 other``."""
    w2 = lo2 - lm2
    far = w2 >= far_from
    w_far = tl.where(far, w2, 0.0)
    # 2^w2 = r, or 2^(log2(1/b) - w2) = 1 / (b r) <= 1 once far.
    e = tl.math.exp2(tl.where(far, far_from - w2, w2))
    z = b * e - b
    y = tl.where(far, b_one_minus_b * e + b, b * e + one_minus_b)
    log_y = fast_log2(y)
    poly = 0.2195388525724411 * z - 0.2536127269268036
    poly = poly * z + 0.288197785615921
    poly = poly * z - 0.3604068160057068
    poly = poly * z + 0.4809010922908783
    poly = poly * z - 0.7213488817214966
    poly = poly * z + 1.4426950216293335
    # Far: w2 >= log2(1 / b) >= 1 keeps |z| + w_far out of the polynomial's range, and
    # w2 - w_far is exactly 0 (log2(other / m) = -log2 y, uncancelled). Nothing reads ``far``
    # past y: predicates held across the lg2 and the polynomial spilled to a register.
    log_near = tl.where(tl.abs(z) + w_far <= JS_SMALL_Z, z * poly, log_y)
    return log_near + w_far, (w2 - w_far) - log_near


@triton.jit
def expm1_series(x):
    """``exp(x) - 1`` for ``|x| <= ln2 / 2`` by its Taylor series to degree 7 (``row_math.expm1``
    without the branch for larger ``x``, which callers form as a difference)."""
    poly = x * 1.984126984126984e-04 + 1.388888888888889e-03
    poly = poly * x + 8.333333333333333e-03
    poly = poly * x + 4.1666666666666664e-02
    poly = poly * x + 1.6666666666666666e-01
    poly = poly * x + 0.5
    return x + (x * x) * poly


@triton.jit
def log2_tile(x, y, m_main, m_other, scale2, lz_main, lz_other, js_b, js_one_minus_b, js_far_from,
               js_b_one_minus_b, chi2_t_k, alpha_near_one, alpha_c, alpha_centre, DIVERGENCE: tl.constexpr):
    """One tile's four lane terms (module docstring) from raw logits ``x`` (main side or policy)
    and ``y``; masked columns hold ``-inf`` and give 0."""
    l1 = (widen(x) - m_main) * scale2 - lz_main
    l2 = (widen(y) - m_other) * scale2 - lz_other
    if DIVERGENCE == JS:
        l1 = tl.maximum(l1, LOG2_FLOOR)
        l2 = tl.maximum(l2, LOG2_FLOOR)
        main = tl.math.exp2(l1)
        other = tl.math.exp2(l2)
        log_m_main, log_other_m = js_logs2(l1, l2, js_b, js_one_minus_b, js_far_from, js_b_one_minus_b)
        t1 = main * log_m_main
        t2 = other * log_other_m
        t3 = main
        t4 = other
    elif DIVERGENCE == CHI2:
        d2 = tl.maximum(l1 - l2, LOG2_FLOOR)
        u = tl.math.exp2(-tl.abs(d2))
        big = tl.math.exp2(tl.maximum(l1, l2))
        small = big * u
        p_big = d2 > 0.0
        p = tl.where(p_big, big, small)
        pt = tl.where(p_big, tl.math.exp2(l1 + d2), small * u)
        shortfall = 1.0 - u
        t1 = tl.where(p_big, pt, big) * (shortfall * shortfall)
        # p (t - t_k) with t formed as t_k is: exactly 0 at the argmax; p t - p t_k where t overflows.
        t = tl.math.exp2(d2)
        t2 = tl.where(t < float("inf"), p * (t - chi2_t_k), pt - p * chi2_t_k)
        t3 = t1
        t4 = t2
    else:
        l1 = tl.maximum(l1, LOG2_FLOOR)
        l2 = tl.maximum(l2, LOG2_FLOOR)
        p = tl.math.exp2(l1)
        q = tl.math.exp2(l2)
        cd2 = alpha_c * (l1 - l2)
        mixed = tl.math.exp2(tl.where(alpha_near_one, l1, l2) + cd2)
        base = tl.where(alpha_near_one, p, q)
        t1 = tl.where(tl.abs(cd2) < 0.5, base * expm1_series(cd2 * LN2), mixed - base)
        t2 = p - q
        t3 = tl.where(alpha_near_one, t1, mixed) - p * alpha_centre
        t4 = t3
    return t1, t2, t3, t4


@triton.jit
def log2_sweep(a_base, b_base, lead, vocab, inv_temperature, ma_s, log_za, mb_s, log_zb, ref_at_argmax,
                beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
                DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr, UNALIGNED: tl.constexpr):
    """``(sum q f(t), sum p (f'(t) - f'(t_k)))`` of js, chi2 or alpha (``DIVERGENCE``) over
    ``vocab`` entries, given the row's final statistics. The rows start ``lead`` entries past
    the aligned ``a_base``, ``b_base`` (``row_math.aligned_row``): whole tiles are read
    unmasked (as aligned vectors unless ``UNALIGNED``, ``row_math.tile_pointers``), the
    first and the last with a mask."""
    scale2 = inv_temperature * LOG2E
    lza2 = log_za * LOG2E
    lzb2 = log_zb * LOG2E
    lp2_k = -lza2
    lq2_k = (ref_at_argmax - mb_s) * scale2 - lzb2
    # Rows of the main and the other side (js), else the policy and the reference.
    main_row = a_base
    other_row = b_base
    m_main = ma_s
    m_other = mb_s
    lz_main = lza2
    lz_other = lzb2
    q_main = False
    b = 0.0
    one_minus_b = 0.0
    far_from = 0.0
    b_one_minus_b = 0.0
    t_k = 0.0
    near_one = False
    c = 1.0
    centre = 0.0
    if DIVERGENCE == JS:
        q_main, b, one_minus_b, far_from, b_one_minus_b = js_row_constants(beta, one_minus_beta, log_beta,
                                                                           log_one_minus_beta)
        main_row = tl.where(q_main, b_base, a_base)
        other_row = tl.where(q_main, a_base, b_base)
        m_main = tl.where(q_main, mb_s, ma_s)
        m_other = tl.where(q_main, ma_s, mb_s)
        lz_main = tl.where(q_main, lzb2, lza2)
        lz_other = tl.where(q_main, lza2, lzb2)
    elif DIVERGENCE == CHI2:
        t_k = tl.math.exp2(lp2_k - lq2_k)
    else:
        near_one = tl.abs(alpha_minus_one) <= tl.abs(alpha)
        c = tl.where(near_one, alpha_minus_one, alpha)
        c_k = alpha_minus_one * (lp2_k - lq2_k)
        centre = tl.where(near_one, expm1(c_k * LN2), tl.math.exp2(c_k))
    cols = tl.arange(0, BLOCK_V)
    last = tile_count(vocab, lead, BLOCK_V)
    _, mask = edge_tile(0, lead, vocab, BLOCK_V)
    s1, s2, s3, s4 = log2_tile(load_tile(main_row + cols, mask, True), load_tile(other_row + cols, mask, True),
                               m_main, m_other, scale2, lz_main, lz_other, b, one_minus_b, far_from,
                               b_one_minus_b, t_k, near_one, c, centre, DIVERGENCE)
    for tile in range(1, last):
        t1, t2, t3, t4 = log2_tile(tl.load(tile_pointers(main_row + tile * BLOCK_V, BLOCK_V, UNALIGNED)),
                                   tl.load(tile_pointers(other_row + tile * BLOCK_V, BLOCK_V, UNALIGNED)),
                                   m_main, m_other, scale2, lz_main, lz_other, b, one_minus_b, far_from,
                                   b_one_minus_b, t_k, near_one, c, centre, DIVERGENCE)
        s1 += t1
        s2 += t2
        s3 += t3
        s4 += t4
    if last > 0:
        _, mask = edge_tile(last, lead, vocab, BLOCK_V)
        t1, t2, t3, t4 = log2_tile(load_tile(main_row + last * BLOCK_V + cols, mask, True),
                                   load_tile(other_row + last * BLOCK_V + cols, mask, True),
                                   m_main, m_other, scale2, lz_main, lz_other, b, one_minus_b, far_from,
                                   b_one_minus_b, t_k, near_one, c, centre, DIVERGENCE)
        s1 += t1
        s2 += t2
        s3 += t3
        s4 += t4
    if DIVERGENCE == JS:
        sum_main_log = tl.sum(s1, axis=0)
        sum_other_log = tl.sum(s2, axis=0)
        value = LN2 * (b * sum_other_log - one_minus_b * sum_main_log)
        main_k = tl.maximum(tl.where(q_main, lq2_k, lp2_k), LOG2_FLOOR)
        other_k = tl.maximum(tl.where(q_main, lp2_k, lq2_k), LOG2_FLOOR)
        log_m_main_k, log_other_m_k = js_logs2(main_k, other_k, b, one_minus_b, far_from, b_one_minus_b)
        # sum p f' - f'_k sum p, with f' / ((1 - beta) ln2) = log2(p / m).
        centred = tl.where(q_main, sum_other_log - log_other_m_k * tl.sum(s4, axis=0),
                           log_m_main_k * tl.sum(s3, axis=0) - sum_main_log)
        centred = centred * (one_minus_beta * LN2)
    elif DIVERGENCE == CHI2:
        value = tl.sum(s1, axis=0)
        centred = 2.0 * tl.sum(s2, axis=0)
    else:
        inv_other = tl.where(near_one, 1.0 / alpha, 1.0 / alpha_minus_one)
        value = (tl.sum(s1, axis=0) / c - tl.sum(s2, axis=0)) * inv_other
        centred = tl.sum(s3, axis=0) / alpha_minus_one
    return value, centred
