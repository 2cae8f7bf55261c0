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
same row inside the same program. Products with a scaled logit are guarded by the
exponential that weights them (``e > 0``), not by ``x > -inf``: at a tiny ``T`` a finite
``(x - m) / T`` can overflow to ``-inf``.

js and alpha take their parameters derived in float64 on the host and rounded once
(``beta, 1 - beta, log beta, log(1 - beta)``; ``alpha, alpha - 1``): ``1 - beta`` or
``alpha - 1`` formed in fp32 from a rounded ``beta`` or ``alpha`` loses everything near the
ends. Their terms use ``expm1``/``log1p`` forms (``_expm1``, ``_log1p``: ``tl`` has neither).
The six travel as scalar arguments (``beta, one_minus_beta, log_beta, log_one_minus_beta,
alpha, alpha_minus_one``) through every helper that evaluates a divergence: Triton 3.2, the
oldest release supported, cannot pass a tuple to a jit function (it takes it for a
constexpr), and a parameter buffer on the device would cost a copy per launch.

Which divergences have a centred ``S`` or a second sweep is read from the registry's bit
sets of codes (``CENTRED_CODES``, ``SECOND_SWEEP_CODES``), never from the order of the codes.

NaN policy: ``log_norm`` is NaN exactly when a row holds a NaN or ``+inf`` (``inf - inf``
in the sweep), so ``log_norm - log_norm`` (0 or NaN) is added to every output that reads
the row, and a divergence that is not finite stores ``div_s = NaN``. The backward adds
``log_norm - log_norm`` to every element of a row it does not skip, and ``div_s - div_s``
where the divergence term is active (weight and upstream gradient non-zero): per-row
scalars, nothing per element but one add.
"""

import triton
import triton.language as tl

from ...divergences import Divergence

# The DIVERGENCE constexpr codes, taken from the registry (0: no divergence).
FORWARD_KL = tl.constexpr(int(Divergence.FORWARD_KL))
REVERSE_KL = tl.constexpr(int(Divergence.REVERSE_KL))
JS = tl.constexpr(int(Divergence.JS))
TV = tl.constexpr(int(Divergence.TV))
HELLINGER = tl.constexpr(int(Divergence.HELLINGER))
CHI2 = tl.constexpr(int(Divergence.CHI2))
ALPHA = tl.constexpr(int(Divergence.ALPHA))


def _codes_where(rule) -> int:
    """The codes of the registry's members that satisfy ``rule``, as a bit set: bit ``c`` for code ``c``."""
    return sum(1 << int(d) for d in Divergence if rule(d))


# The registry's rules as bit sets of codes, read at compile time as
# ``((CENTRED_CODES >> DIVERGENCE) & 1) == 1`` (Triton 3.2's constexprs shift and mask, but
# do not index a table). KNOWN_CODES: 0 and every member; any other code fails to compile.
# CENTRED_CODES: the divergences whose S is saved centred at the policy's argmax, with
# ref_at_argmax. SECOND_SWEEP_CODES: those summed in a second sweep over the row.
KNOWN_CODES = tl.constexpr(1 | _codes_where(lambda d: True))
CENTRED_CODES = tl.constexpr(_codes_where(lambda d: d.centred))
SECOND_SWEEP_CODES = tl.constexpr(_codes_where(lambda d: d.second_sweep))


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
def _expm1(x):
    """``exp(x) - 1`` to about 1.5 ulp, also where it is tiny (as ``fast_expm1`` in fastmath.h).

    ``x = k ln2 + r`` with ``|r| <= ln2 / 2``: ``expm1(x) = 2^k expm1(r) + (2^k - 1)``, with
    ``expm1(r)`` from its Taylor series to degree 7 (leading ``r`` exact) and ``2^k`` built
    from exponent bits in two factors (exact, where ``tl.exp`` is an approximation on GPUs).
    Past ``k = 64`` the ``- 1`` is below rounding and the two factors keep ``x`` up to
    the overflow threshold finite.
    """
    finite = x == x
    xc = tl.where(finite, tl.minimum(tl.maximum(x, -88.0), 88.8), 0.0)
    kf = tl.floor(xc * 1.4426950408889634 + 0.5)
    r = (xc - kf * 0.693145751953125) - kf * 1.4286068203094173e-06
    poly = r * 1.984126984126984e-04 + 1.388888888888889e-03
    poly = poly * r + 8.333333333333333e-03
    poly = poly * r + 4.1666666666666664e-02
    poly = poly * r + 1.6666666666666666e-01
    poly = poly * r + 0.5
    em1 = r + (r * r) * poly
    k = kf.to(tl.int32)
    k1 = k >> 1
    s1 = ((k1 + 127) << 23).to(tl.float32, bitcast=True)
    s2 = ((k - k1 + 127) << 23).to(tl.float32, bitcast=True)
    s = s1 * s2
    y = tl.where(k > 64, ((1.0 + em1) * s1) * s2, s * em1 + (s - 1.0))
    return tl.where(finite, y, x)


@triton.jit
def _log1p(x):
    """``log(1 + x)`` to about 1.5 ulp, also where it is tiny.

    For ``1 + x`` in ``[sqrt(1/2), sqrt(2))``: ``2 atanh(s)``, ``s = x / (2 + x)``, as
    ``x - s (x - s^2 R(s^2))`` (fast_log's series, with ``x`` itself exact in the leading
    term, so no platform ``log`` enters); elsewhere ``log(u)`` of the rounded ``u = 1 + x``
    plus that sum's rounding error ``(x - (u - 1)) / u``.
    """
    s = x / (2.0 + x)
    s2 = s * s
    poly = ((0.2222222222222222 * s2 + 0.2857142857142857) * s2 + 0.4) * s2 + 0.6666666666666666
    series = x - s * (x - s2 * poly)
    u = 1.0 + x
    corr = tl.where((u > 0.0) & (u < float("inf")), (x - (u - 1.0)) / u, 0.0)
    return tl.where((x > -0.29289322) & (x < 0.41421357), series, tl.log(u) + corr)


@triton.jit
def _js_logs(lp, lq, beta, one_minus_beta, log_beta, log_one_minus_beta):
    """js's ``(log(p / m), log(q / m))``, ``m = beta q + (1 - beta) p``, for ``lp``, ``lq`` not
    both ``-inf``, without cancelling ``lm`` against a nearly equal log (as ``js_logs`` in
    divergence.h).

    The side of the larger weight, the "main" one (p for ``beta <= 1/2``, else q), is nearest
    to m. With ``b <= 1/2`` the other side's weight and ``w = log(other / main)``:
    ``log(m / main) = log1p(b expm1(w))`` for ``-1 <= w <= 30``, else
    ``logaddexp(log(1 - b), log b + w) = hi + log1p(exp(lo - hi))``;
    ``log(other / m) = w - log(m / main)``, or ``-log b - log1p(exp(lo - hi))`` once
    ``w >= -log b``. The logaddexp forms keep a row-constant part exact, so entries on the
    plateaus of the logs keep the small differences that the gradient's
    ``f'(t_j) - f'(t_k)`` is made of. The main side = 0 (``w = inf``) gives
    ``log(other / m) = -log b`` exactly, the other side = 0 gives ``log(main / m) = -log(1 - b)``.
    """
    q_main = beta > 0.5
    b = tl.where(q_main, one_minus_beta, beta)
    log_b = tl.where(q_main, log_one_minus_beta, log_beta)
    log_1mb = tl.where(q_main, log_beta, log_one_minus_beta)
    w = tl.where(q_main, lp - lq, lq - lp)
    u = log_b + w
    other_side = u >= log_1mb
    hi = tl.where(other_side, u, log_1mb)
    lo = tl.where(other_side, log_1mb, u)
    tail = _log1p(tl.exp(lo - hi))
    near = (w >= -1.0) & (w <= 30.0)
    g = tl.where(near, _log1p(b * _expm1(w)), hi + tail)  # log(m / main)
    other = tl.where(w >= -log_b, -log_b - tail, w - g)
    return tl.where(q_main, other, -g), tl.where(q_main, -g, other)


@triton.jit
def _alpha_expansion(alpha, alpha_minus_one):
    """alpha's interior terms are expanded around the nearer of ``alpha = 1`` (``near_one``)
    and ``alpha = 0``: returns ``near_one``, ``c`` (``alpha - 1`` or ``alpha``), ``1 / c`` and
    the other one's inverse."""
    near_one = tl.abs(alpha_minus_one) <= tl.abs(alpha)
    c = tl.where(near_one, alpha_minus_one, alpha)
    inv_c = tl.where(near_one, 1.0 / alpha_minus_one, 1.0 / alpha)
    inv_o = tl.where(near_one, 1.0 / alpha, 1.0 / alpha_minus_one)
    return near_one, c, inv_c, inv_o


@triton.jit
def _alpha_log_mixed(lp, lq, alpha, alpha_minus_one):
    """``log(p^a q^(1-a))`` for ``lp > -inf`` from the nearer expansion point (``lp + (a-1) d``
    or ``lq + a d``, ``d = lp - lq``); ``q = 0`` gives the support's edge, ``inf`` for
    ``alpha > 1``, else ``-inf``."""
    near_one, c, _, _ = _alpha_expansion(alpha, alpha_minus_one)
    edge = tl.where(alpha > 1.0, float("inf"), float("-inf"))
    return tl.where(lq > float("-inf"), tl.where(near_one, lp, lq) + c * (lp - lq), edge)


@triton.jit
def _f_value(lp, lq, beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
             DIVERGENCE: tl.constexpr):
    """``q f(t)`` of a non-linear divergence from ``lp = log p``, ``lq = log q`` (``-inf`` legal)."""
    has_p = lp > float("-inf")
    has_q = lq > float("-inf")
    p = tl.exp(lp)
    q = tl.exp(lq)
    zero = tl.zeros_like(lp)
    if DIVERGENCE == JS:
        lpm, lqm = _js_logs(lp, lq, beta, one_minus_beta, log_beta, log_one_minus_beta)
        value = beta * tl.where(has_q, q * lqm, zero) + one_minus_beta * tl.where(has_p, p * lpm, zero)
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
    elif DIVERGENCE == ALPHA:
        # Amari alpha inside the support: near alpha = 1, (p expm1((a-1) d) / (a-1) - (p - q)) / a;
        # near alpha = 0, (q expm1(a d) / a - (p - q)) / (a-1) (d = lp - lq): the definition
        # rearranged so that nothing of size p or q cancels against the small divisor.
        # base expm1(c d) is formed as exp(lb + c d) - base where |c d| >= 1: nothing cancels
        # there, and it stays finite where expm1 alone would overflow.
        near_one, c, inv_c, inv_o = _alpha_expansion(alpha, alpha_minus_one)
        cd = c * (lp - lq)
        base = tl.where(near_one, p, q)
        rest = tl.where(tl.abs(cd) < 1.0, base * _expm1(cd), tl.exp(tl.where(near_one, lp, lq) + cd) - base)
        inner = (rest * inv_c - (p - q)) * inv_o
        # At the support's edges p^a q^(1-a) is 0 unless an exponent blows it up.
        p_only = tl.where(alpha > 1.0, float("inf"), 0.0)
        q_only = tl.where(alpha < 0.0, float("inf"), 0.0)
        mixed = tl.where(has_p, p_only, tl.where(has_q, q_only, zero))
        edge = mixed * (1.0 / (alpha * alpha_minus_one)) - p / alpha_minus_one + q / alpha
        value = tl.where(has_p & has_q, inner, edge)
    else:
        tl.static_assert(False, "unknown DIVERGENCE code")
    return value


@triton.jit
def _f_prime(lp, lq, beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
             DIVERGENCE: tl.constexpr):
    """``f'(t)`` of a non-linear divergence where ``p > 0`` (callers weight it by ``p``)."""
    if DIVERGENCE == JS:
        lpm, _ = _js_logs(lp, lq, beta, one_minus_beta, log_beta, log_one_minus_beta)
        fprime = one_minus_beta * lpm
    elif DIVERGENCE == TV:
        fprime = tl.where(lp > lq, 0.5, tl.where(lp < lq, -0.5, 0.0))
    elif DIVERGENCE == HELLINGER:
        fprime = 1.0 - tl.exp(0.5 * (lq - lp))
    elif DIVERGENCE == CHI2:
        fprime = 2.0 * (tl.exp(lp - lq) - 1.0)
    elif DIVERGENCE == ALPHA:
        fprime = _expm1(alpha_minus_one * (lp - lq)) / alpha_minus_one
    else:
        tl.static_assert(False, "unknown DIVERGENCE code")
    return fprime


@triton.jit
def _centred_slope(lp, lq, fprime_k, shift,
                   beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
                   DIVERGENCE: tl.constexpr):
    """``p (f'(t) - f'(t_k) - shift)``, 0 where ``p = 0``.

    Differences of ``f'`` first: exact at the argmax ``k``. Where ``f'(t)`` itself overflows
    (``t`` huge or tiny under a power) or ``p`` underflows while ``p f'(t)`` does not, the
    product is formed in log space instead: chi2 ``2 (exp(2 lp - lq) - p)``, alpha
    ``(exp(a lp + (1-a) lq) - p) / (a - 1)`` (exponent from ``_alpha_log_mixed``).
    """
    p = tl.exp(lp)
    fprime = _f_prime(lp, lq, beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
                      DIVERGENCE)
    centred = tl.where(p > 0.0, p * (fprime - fprime_k - shift), 0.0)
    if DIVERGENCE == CHI2 or DIVERGENCE == ALPHA:
        if DIVERGENCE == CHI2:
            p_fprime = 2.0 * (tl.exp(lp + (lp - lq)) - p)
        else:
            p_fprime = (tl.exp(_alpha_log_mixed(lp, lq, alpha, alpha_minus_one)) - p) / alpha_minus_one
        direct = (p > 0.0) & (tl.abs(fprime) < float("inf"))
        centred = tl.where(direct, centred, p_fprime - p * (fprime_k + shift))
        centred = tl.where(lp > float("-inf"), centred, 0.0)
    return centred


@triton.jit
def _first_pass(a_row, b_row, vocab, inv_temperature,
                HAS_REF: tl.constexpr, WANT_ENTROPY: tl.constexpr, DIVERGENCE: tl.constexpr,
                TRACK_ARGMAX: tl.constexpr, BLOCK_V: tl.constexpr):
    """The first sweep over ``vocab`` entries of one row (a whole row, or a slice of it).

    Returns ``(ma, za, h, mb, zb, k, ref_at_argmax, k_idx)``: raw maxima ``ma``, ``mb``; the
    lane sums ``za``, ``zb`` relative to them; the entropy lanes ``h`` (``WANT_ENTROPY``); the
    KL lanes ``k`` (forward KL relative to both maxima, reverse KL to ``ma`` and the centre
    ``ref_at_argmax``); the reference logit ``ref_at_argmax`` at the policy's first argmax;
    and, with ``TRACK_ARGMAX``, that argmax's index (-1 while every policy logit is ``-inf``).
    """
    CENTRED: tl.constexpr = ((CENTRED_CODES >> DIVERGENCE) & 1) == 1
    cols = tl.arange(0, BLOCK_V)
    ma = float("-inf")
    mb = float("-inf")
    ref_at_argmax = 0.0
    k_idx = -1
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
            h = tl.where(scale_a > 0.0, scale_a * (h + shift_a * za), 0.0) + tl.where(ea > 0.0, ea * x_rel, 0.0)
        if TRACK_ARGMAX or (HAS_REF and CENTRED):
            # The policy's running argmax (the first on ties). NaN logits are left out (the
            # interpreter rejects an all-NaN tile); such a row is NaN anyway.
            k_block = tl.argmax(tl.where(x == x, x, float("-inf")), axis=0)
            if TRACK_ARGMAX:
                k_idx = tl.where(block_max > ma, start + k_block, k_idx)
        if HAS_REF:
            y = tl.load(b_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            _, mb_new, scale_b, shift_b, y_rel, eb = _online_step(mb, y, inv_temperature)
            if DIVERGENCE == FORWARD_KL:
                k = tl.where(scale_b > 0.0, scale_b * (k + (shift_b - shift_a) * zb), 0.0)
                k += tl.where(eb > 0.0, eb * (y_rel - x_rel), 0.0)
            if CENTRED:
                # The reference logit at the policy's running argmax: the centre of S.
                ref_at_block_argmax = tl.sum(tl.where(cols == k_block, y, 0.0), axis=0)
                new_ref_at_argmax = tl.where(block_max > ma, ref_at_block_argmax, ref_at_argmax)
            if DIVERGENCE == REVERSE_KL:
                # Terms u_a - v with v = (y - b_k) / T, shifted as b_k moves. A -inf b_k
                # (q_k = 0: the KL is +inf) is centred at 0 instead, which keeps it +inf.
                centre = tl.where(ref_at_argmax == float("-inf"), 0.0, ref_at_argmax)
                new_centre = tl.where(new_ref_at_argmax == float("-inf"), 0.0, new_ref_at_argmax)
                shift_v = (centre - new_centre) * inv_temperature
                v = (y - new_centre) * inv_temperature
                k = tl.where(scale_a > 0.0, scale_a * (k + (shift_a - shift_v) * za), 0.0)
                k += tl.where(ea > 0.0, ea * (x_rel - v), 0.0)
            if CENTRED:
                ref_at_argmax = new_ref_at_argmax
            zb = zb * scale_b + eb
            mb = mb_new
        za = za * scale_a + ea
        ma = ma_new
    return ma, za, h, mb, zb, k, ref_at_argmax, k_idx


@triton.jit
def _second_pass(a_row, b_row, vocab, inv_temperature, ma_s, log_za, mb_s, log_zb, ref_at_argmax,
                 beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
                 DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr):
    """``(sum q f(t), sum p (f'(t) - f'(t_k)))`` over ``vocab`` entries, given the row's final
    statistics; ``f'(t_k)`` at the policy's argmax, whose ``log p`` is exactly ``-log_za``."""
    lq_k = (ref_at_argmax - mb_s) * inv_temperature - log_zb
    fprime_k = _f_prime(-log_za, lq_k, beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
                        DIVERGENCE)
    cols = tl.arange(0, BLOCK_V)
    values = tl.zeros((BLOCK_V,), tl.float32)
    centred = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, vocab, BLOCK_V):
        mask = start + cols < vocab
        x = tl.load(a_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        y = tl.load(b_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        lp = (x - ma_s) * inv_temperature - log_za
        lq = (y - mb_s) * inv_temperature - log_zb
        value = _f_value(lp, lq, beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one, DIVERGENCE)
        values += tl.where(mask, value, 0.0)
        centred += _centred_slope(lp, lq, fprime_k, 0.0,
                                  beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one, DIVERGENCE)
    return tl.sum(values, axis=0), tl.sum(centred, axis=0)


@triton.jit
def _row_plan(n, labels_ptr, weight_ptr, ignore_index,
              HAS_LABELS: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """``(label, read, div_on)`` of row ``n``: an ignored label skips the row; a zero weight
    drops the divergence, and skips the row when the op has no labels."""
    valid = True
    label = -1
    if HAS_LABELS:
        label = tl.load(labels_ptr + n)
        valid = label != ignore_index
    div_on = valid
    if HAS_WEIGHT:
        div_on = valid & (tl.load(weight_ptr + n) != 0.0)
    read = div_on
    if HAS_LABELS:
        read = valid
    return label, read, div_on


@triton.jit
def token_forward_kernel(
    a_ptr, b_ptr, labels_ptr, weight_ptr,
    row_max_ptr, log_norm_ptr, logp_ptr, entropy_ptr, ref_row_max_ptr, ref_log_norm_ptr, ref_logp_ptr,
    div_ptr, div_s_ptr, ref_at_argmax_ptr,
    tokens_per_batch, stride_ab, stride_at, stride_bb, stride_bt,
    vocab, inv_temperature, ignore_index,
    beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
    HAS_LABELS: tl.constexpr, HAS_REF: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    WANT_LOGP: tl.constexpr, WANT_ENTROPY: tl.constexpr, WANT_REF_LOGP: tl.constexpr, DIVERGENCE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """A whole row: the first pass, finished in the program, and the second where needed.

    Each ``WANT_*`` flag (and ``DIVERGENCE``) says whether its output was allocated: an output
    not asked for has only the placeholder pointer, and is neither computed nor stored.
    """
    tl.static_assert(((KNOWN_CODES >> DIVERGENCE) & 1) == 1, "unknown DIVERGENCE code")
    CENTRED: tl.constexpr = ((CENTRED_CODES >> DIVERGENCE) & 1) == 1
    SECOND_SWEEP: tl.constexpr = ((SECOND_SWEEP_CODES >> DIVERGENCE) & 1) == 1
    n = tl.program_id(0)
    label, needed, div_on = _row_plan(n, labels_ptr, weight_ptr, ignore_index, HAS_LABELS, HAS_WEIGHT)
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
        a_row = a_ptr + _row_offset(n, tokens_per_batch, stride_ab, stride_at)
        b_row = b_ptr + _row_offset(n, tokens_per_batch, stride_bb, stride_bt)
        ma, za, h, mb, zb, k, ref_at_argmax, _ = _first_pass(a_row, b_row, vocab, inv_temperature, HAS_REF,
                                                             WANT_ENTROPY, DIVERGENCE, False, BLOCK_V)
        ma_s, sum_za, log_za = _finish(ma, za)
        if WANT_LOGP:
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
                    centre = tl.where(ref_at_argmax == float("-inf"), 0.0, ref_at_argmax)
                    div = div_s - log_za - (centre - mb_s) * inv_temperature + log_zb
                elif SECOND_SWEEP:
                    div, div_s = _second_pass(a_row, b_row, vocab, inv_temperature, ma_s, log_za, mb_s, log_zb,
                                              ref_at_argmax, beta, one_minus_beta, log_beta,
                                              log_one_minus_beta, alpha, alpha_minus_one, DIVERGENCE, BLOCK_V)
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
    label, read, div_on = _row_plan(n, labels_ptr, weight_ptr, ignore_index, HAS_LABELS, HAS_WEIGHT)
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
        a_row = a_ptr + _row_offset(n, tokens_per_batch, stride_ab, stride_at)
        b_row = b_ptr + _row_offset(n, tokens_per_batch, stride_bb, stride_bt)
        ma, za, h, mb, zb, k, ref_at_argmax, k_idx = _first_pass(a_row, b_row, vocab, inv_temperature, HAS_REF,
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
    _, read, div_on = _row_plan(n, labels_ptr, weight_ptr, ignore_index, HAS_LABELS, HAS_WEIGHT)
    value = 0.0
    centred = 0.0
    if div_on:
        a_row = a_ptr + _row_offset(n, tokens_per_batch, stride_ab, stride_at)
        b_row = b_ptr + _row_offset(n, tokens_per_batch, stride_bb, stride_bt)
        value, centred = _second_pass(a_row, b_row, vocab, inv_temperature,
                                      tl.load(row_max_ptr + n), tl.load(log_norm_ptr + n),
                                      tl.load(ref_row_max_ptr + n), tl.load(ref_log_norm_ptr + n),
                                      tl.load(ref_at_argmax_ptr + n),
                                      beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
                                      DIVERGENCE, BLOCK_V)
    tl.store(value_ptr + n, value)
    tl.store(centred_ptr + n, centred)


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
    BLOCK_V: tl.constexpr,
):
    """``g_j = (1/T)[g_logp (1[j=y] - p_j) - g_H p_j (log p_j + H) + g_D p_j (f'(t_j) - S)]``.

    ``f'(t_j) - S`` is formed as ``(f'(t_j) - f'(t_k)) - div_s`` with the centred ``div_s``
    of ``RowStats`` (forward KL: ``p_j f'(t_j) - p_j S = p_j - q_j`` directly).
    ``DIVERGENCE`` is 0 when no divergence gradient is needed. Every element of the row is
    read before it is written, so ``grad_ptr`` may alias ``a_ptr``. The row may be the
    slice ``[v0, v0 + vocab)`` of a wider vocabulary (a whole row has ``v0 = 0``): only the
    statistics of the whole row enter. A row that is not
    skipped gets ``log_norm - log_norm`` (and ``div_s - div_s`` where the divergence term is
    active) added to every element: NaN rows stay NaN whatever the upstream gradients.
    """
    tl.static_assert(((KNOWN_CODES >> DIVERGENCE) & 1) == 1, "unknown DIVERGENCE code")
    CENTRED: tl.constexpr = ((CENTRED_CODES >> DIVERGENCE) & 1) == 1
    SECOND_SWEEP: tl.constexpr = ((SECOND_SWEEP_CODES >> DIVERGENCE) & 1) == 1
    n = tl.program_id(0)
    label, needed, div_on = _row_plan(n, labels_ptr, weight_ptr, ignore_index, HAS_LABELS, HAS_WEIGHT)
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
        fprime_k = _f_prime(-log_za, lq_k, beta, one_minus_beta, log_beta, log_one_minus_beta,
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

    a_row = a_ptr + _row_offset(n, tokens_per_batch, stride_ab, stride_at)
    b_row = b_ptr + _row_offset(n, tokens_per_batch, stride_bb, stride_bt)
    g_row = grad_ptr + _row_offset(n, tokens_per_batch, stride_gb, stride_gt)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, vocab, BLOCK_V):
        mask = start + cols < vocab
        grad = tl.zeros((BLOCK_V,), tl.float32)
        if compute:
            x = tl.load(a_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            lp = (x - ma) * inv_temperature - log_za
            p = tl.exp(lp)
            if GRAD_LOGP:
                grad += g_logp * (tl.where(start + cols == label, 1.0, 0.0) - p)
            if GRAD_ENTROPY:
                grad -= g_entropy * tl.where(p > 0.0, p * (lp + entropy), 0.0)
            if DIVERGENCE != 0:
                if div_active:
                    y = tl.load(b_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
                    if DIVERGENCE == FORWARD_KL:
                        # p f'(t) = -q and S = -1: the gradient is p - q.
                        grad += g_div * (p - tl.exp((y - mb) * inv_temperature - log_zb))
                    elif DIVERGENCE == REVERSE_KL:
                        centred = (x - ma) * inv_temperature - (y - ref_at_argmax) * inv_temperature - div_s
                        grad += g_div * tl.where(p > 0.0, p * centred, 0.0)
                    else:
                        lq = (y - mb) * inv_temperature - log_zb
                        grad += g_div * _centred_slope(lp, lq, fprime_k, div_s, beta, one_minus_beta,
                                                       log_beta, log_one_minus_beta, alpha, alpha_minus_one,
                                                       DIVERGENCE)
        grad = grad * inv_temperature + guard
        tl.store(g_row + start + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
