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
ends. Their terms use ``expm1``/``log1p`` forms (``expm1``, ``log1p``: ``tl`` has neither).
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
scalars, nothing per element but one add."""

import os

import triton
import triton.language as tl

from ....divergences import Divergence
from ..config import PROGRAM_THREADS

# The DIVERGENCE constexpr codes, taken from the registry (0: no divergence).
FORWARD_KL = tl.constexpr(int(Divergence.FORWARD_KL))
REVERSE_KL = tl.constexpr(int(Divergence.REVERSE_KL))
JS = tl.constexpr(int(Divergence.JS))
TV = tl.constexpr(int(Divergence.TV))
HELLINGER = tl.constexpr(int(Divergence.HELLINGER))
CHI2 = tl.constexpr(int(Divergence.CHI2))
ALPHA = tl.constexpr(int(Divergence.ALPHA))


def codes_where(rule) -> int:
    """The codes of the registry's members that satisfy ``rule``, as a bit set: bit ``c`` for code ``c``."""
    return sum(1 << int(d) for d in Divergence if rule(d))


# The registry's rules as bit sets of codes, read at compile time as
# ``((CENTRED_CODES >> DIVERGENCE) & 1) == 1`` (Triton 3.2's constexprs shift and mask, but
# do not index a table). KNOWN_CODES: 0 and every member; any other code fails to compile.
# CENTRED_CODES: the divergences whose S is saved centred at the policy's argmax, with
# ref_at_argmax. SECOND_SWEEP_CODES: those summed in a second sweep over the row.
KNOWN_CODES = tl.constexpr(1 | codes_where(lambda d: True))
CENTRED_CODES = tl.constexpr(codes_where(lambda d: d.centred))
SECOND_SWEEP_CODES = tl.constexpr(codes_where(lambda d: d.second_sweep))


# Triton's interpreter runs no inline PTX: there the fast forms fall back to ``tl``'s own.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
TILE_LANES = tl.constexpr(PROGRAM_THREADS)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def fast_exp(x):
    """``exp(x)`` as one ``ex2`` of ``x log2(e)``: what ``tl.exp`` computes on GPUs, less its
    rescaling of results below ``2^-126`` (flushed to 0, far under every sum's rounding)."""
    return tl.math.exp2(x * LOG2E)


@triton.jit
def fast_log(x):
    """``log(x)`` as one ``lg2.approx`` times ``ln 2`` (absolute error about ``1e-7``, so
    callers use it only where ``|log x|`` is not small); ``tl.log`` in the interpreter."""
    if INTERPRETED:
        y = tl.log(x)
    else:
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                      is_pure=True, pack=1) * LN2
    return y


@triton.jit
def fast_div(x, y):
    """``x / y`` to 2 ulp for ``|y|`` in ``[2^-126, 2^126]`` (``div.approx``; outside it, callers
    discard the result); ``/`` in the interpreter."""
    if INTERPRETED:
        z = x / y
    else:
        z = tl.inline_asm_elementwise("div.approx.ftz.f32 $0, $1, $2;", "=r,r,r", [x, y], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return z


@triton.jit
def row_offset(n, tokens_per_batch, stride_batch, stride_token):
    """Element offset of token ``n`` in a ``[B, T, V]`` view, in int64."""
    n64 = n.to(tl.int64)
    return (n64 // tokens_per_batch) * stride_batch + (n64 % tokens_per_batch) * stride_token


@triton.jit
def aligned_row(ptr, n, tokens_per_batch, stride_batch, stride_token, ALIGN: tl.constexpr):
    """``(base, lead)`` of token ``n``'s row: ``base`` lies ``lead`` elements before the row's
    first one, at a multiple of ``ALIGN`` elements from ``ptr``. Tile ``t`` of a sweep covers
    the columns ``[t BLOCK_V - lead, (t + 1) BLOCK_V - lead)`` and, read from ``base``, loads
    as aligned vectors whatever the row's stride; only the first and last tiles are masked.
    ``ALIGN`` is 1 where the launch cannot promise aligned row pairs (``config.row_alignment``),
    and at most a tile: the first tile covers the lead."""
    offset = row_offset(n, tokens_per_batch, stride_batch, stride_token)
    lead = offset % ALIGN
    return ptr + tl.multiple_of(offset - lead, ALIGN), lead.to(tl.int32)


@triton.jit
def tile_count(vocab, lead, BLOCK_V: tl.constexpr):
    """The index of the last tile of a row of ``vocab`` entries that starts ``lead`` into its
    first tile (``aligned_row``); tiles ``1 .. last - 1`` are whole and read unmasked."""
    return tl.cdiv(vocab + lead, BLOCK_V) - 1


@triton.jit
def tile_pointers(tile_start, BLOCK_V: tl.constexpr, UNALIGNED: tl.constexpr):
    """``tile_start + tl.arange(0, BLOCK_V)``. ``UNALIGNED`` (rows read from their own starts,
    ``ALIGN`` 1: element by element) forms it as a per-register constant plus the thread's lane
    (``TILE_LANES`` lanes, the threads of a program), so that a thread addresses all its elements
    from one base register with immediate offsets; from the plain ``arange`` the compiler builds
    a 64-bit address per element. Aligned rows load whole vectors and keep the plain form."""
    if UNALIGNED:
        LANES: tl.constexpr = min(TILE_LANES, BLOCK_V)
        in_register = tl.arange(0, BLOCK_V // LANES)[:, None] * LANES
        lane = tl.arange(0, LANES)[None, :]
        pointers = tl.reshape(tile_start + in_register + lane, [BLOCK_V])
    else:
        pointers = tile_start + tl.arange(0, BLOCK_V)
    return pointers


@triton.jit
def edge_tile(tile, lead, vocab, BLOCK_V: tl.constexpr):
    """``(columns, mask)`` of a first or last tile: the row's columns it covers, and which
    lanes hold one."""
    columns = tile * BLOCK_V - lead + tl.arange(0, BLOCK_V)
    return columns, (columns >= 0) & (columns < vocab)


@triton.jit
def load_tile(ptr, mask, MASKED: tl.constexpr):
    """A tile's logits: masked lanes read as ``-inf``; a whole tile unmasked (aligned vectors)."""
    if MASKED:
        x = tl.load(ptr, mask=mask, other=float("-inf"))
    else:
        x = tl.load(ptr)
    return x


@triton.jit
def online_step(m, x, inv_temperature):
    """Fold one tile of raw logits ``x`` into a running row max ``m``.

    Returns the new max, the factor that rescales earlier lane sums, the shift of earlier
    relative terms (both 0-safe while the max is still ``-inf``), ``u = (x - max) / T`` and
    ``exp(u)``.
    """
    tile_max = tl.max(x, axis=0)
    m_new = tl.maximum(m, tile_max)
    m_new_s = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = fast_exp((m - m_new_s) * inv_temperature)
    shift = tl.where(m == float("-inf"), 0.0, (m - m_new_s) * inv_temperature)
    rel = (x - m_new_s) * inv_temperature
    return tile_max, m_new, scale, shift, rel, fast_exp(rel)


@triton.jit
def finish(m, z):
    """``(-inf-safe max, Z, log Z)`` of a row from its max and lane sums."""
    total = tl.sum(z, axis=0)
    return tl.where(m == float("-inf"), 0.0, m), total, tl.log(total)


@triton.jit
def expm1(x):
    """``exp(x) - 1``, also where it is tiny (as ``fast_expm1`` in fastmath.h, without its
    range reduction).

    For ``|x| <= ln2 / 2``: the Taylor series to degree 7 with the leading ``x`` exact
    (truncation below ``6e-9`` relative); elsewhere ``fast_exp(x) - 1``, which cancels at
    most a factor ``e^x / (e^x - 1) < 3.4`` there: a few ulp.
    """
    poly = x * 1.984126984126984e-04 + 1.388888888888889e-03
    poly = poly * x + 8.333333333333333e-03
    poly = poly * x + 4.1666666666666664e-02
    poly = poly * x + 1.6666666666666666e-01
    poly = poly * x + 0.5
    return tl.where(tl.abs(x) <= 0.34657359, x + (x * x) * poly, fast_exp(x) - 1.0)


@triton.jit
def log1p(x):
    """``log(1 + x)`` to a few ulp, also where it is tiny.

    For ``1 + x`` in ``[sqrt(1/2), sqrt(2))``: ``2 atanh(s)``, ``s = x / (2 + x)``, as
    ``x - s (x - s^2 R(s^2))`` (fast_log's series, with ``x`` itself exact in the leading
    term, so no platform ``log`` enters); elsewhere ``log(u)`` of the rounded ``u = 1 + x``
    (``fast_log``: ``|log u| > 0.34`` there) plus that sum's rounding error
    ``(x - (u - 1)) / u``. One quotient serves the branch taken.
    """
    u = 1.0 + x
    series_side = (x > -0.29289322) & (x < 0.41421357)
    divisor = tl.where(series_side, 2.0 + x, u)
    dividend = tl.where(series_side, x, x - (u - 1.0))
    quotient = fast_div(dividend, divisor)
    s2 = quotient * quotient
    poly = ((0.2222222222222222 * s2 + 0.2857142857142857) * s2 + 0.4) * s2 + 0.6666666666666666
    series = x - quotient * (x - s2 * poly)
    corr = tl.where((u > 0.0) & (u < float("inf")), quotient, 0.0)
    return tl.where(series_side, series, fast_log(u) + corr)


@triton.jit
def js_logs(lp, lq, beta, one_minus_beta, log_beta, log_one_minus_beta):
    """js's ``(log(p / m), log(q / m))``, ``m = beta q + (1 - beta) p``, for ``lp``, ``lq`` not
    both ``-inf``, without cancelling ``lm`` against a nearly equal log (as ``js_logs`` in
    divergence.h).

    The side of the larger weight, the "main" one (p for ``beta <= 1/2``, else q), is nearest
    to m. With ``b <= 1/2`` the other side's weight and ``w = log(other / main)``:
    ``log(m / main) = log1p(b expm1(w))`` for ``-1 <= w < -log b``, else
    ``logaddexp(log(1 - b), log b + w) = hi + log1p(exp(lo - hi))``;
    ``log(other / m) = w - log(m / main)``, or ``-log b - log1p(exp(lo - hi))`` once
    ``w >= -log b`` (there ``hi = log b + w`` moves with ``w``, so nothing cancels). Each
    entry takes one of the two ``log1p``, so one is evaluated, on the chosen argument. The logaddexp forms keep a row-constant part exact, so entries on the
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
    near = (w >= -1.0) & (w < -log_b)
    # log(m / main) near, else the tail log1p(exp(lo - hi)) of the logaddexp form.
    both = log1p(tl.where(near, b * expm1(w), fast_exp(lo - hi)))
    g = tl.where(near, both, hi + both)  # log(m / main)
    other = tl.where(w >= -log_b, -log_b - both, w - g)
    return tl.where(q_main, other, -g), tl.where(q_main, -g, other)


@triton.jit
def alpha_expansion(alpha, alpha_minus_one):
    """alpha's interior terms are expanded around the nearer of ``alpha = 1`` (``near_one``)
    and ``alpha = 0``: returns ``near_one``, ``c`` (``alpha - 1`` or ``alpha``), ``1 / c`` and
    the other one's inverse."""
    near_one = tl.abs(alpha_minus_one) <= tl.abs(alpha)
    c = tl.where(near_one, alpha_minus_one, alpha)
    inv_c = tl.where(near_one, 1.0 / alpha_minus_one, 1.0 / alpha)
    inv_o = tl.where(near_one, 1.0 / alpha, 1.0 / alpha_minus_one)
    return near_one, c, inv_c, inv_o


@triton.jit
def alpha_log_mixed(lp, lq, alpha, alpha_minus_one):
    """``log(p^a q^(1-a))`` for ``lp > -inf`` from the nearer expansion point (``lp + (a-1) d``
    or ``lq + a d``, ``d = lp - lq``); ``q = 0`` gives the support's edge, ``inf`` for
    ``alpha > 1``, else ``-inf``."""
    near_one, c, _, _ = alpha_expansion(alpha, alpha_minus_one)
    edge = tl.where(alpha > 1.0, float("inf"), float("-inf"))
    return tl.where(lq > float("-inf"), tl.where(near_one, lp, lq) + c * (lp - lq), edge)


@triton.jit
def f_value(lp, lq, beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
             DIVERGENCE: tl.constexpr):
    """``q f(t)`` of a non-linear divergence from ``lp = log p``, ``lq = log q`` (``-inf`` legal)."""
    has_p = lp > float("-inf")
    has_q = lq > float("-inf")
    p = fast_exp(lp)
    q = fast_exp(lq)
    zero = tl.zeros_like(lp)
    if DIVERGENCE == JS:
        lpm, lqm = js_logs(lp, lq, beta, one_minus_beta, log_beta, log_one_minus_beta)
        value = beta * tl.where(has_q, q * lqm, zero) + one_minus_beta * tl.where(has_p, p * lpm, zero)
    elif DIVERGENCE == TV:
        value = 0.5 * tl.abs(p - q)
    elif DIVERGENCE == HELLINGER:
        diff = fast_exp(0.5 * lp) - fast_exp(0.5 * lq)
        value = diff * diff
    elif DIVERGENCE == CHI2:
        # q (t - 1)^2 in log space, each branch on its own side of d = 0: t can overflow
        # where q underflows.
        d = lp - lq
        shrink = 1.0 - fast_exp(-tl.maximum(d, 0.0))
        grow = fast_exp(tl.minimum(d, 0.0)) - 1.0
        value = tl.where(d > 0.0, fast_exp(lp + d) * shrink * shrink, q * grow * grow)
        value = tl.where(has_q, value, tl.where(has_p, float("inf"), zero))
    elif DIVERGENCE == ALPHA:
        # Amari alpha inside the support: near alpha = 1, (p expm1((a-1) d) / (a-1) - (p - q)) / a;
        # near alpha = 0, (q expm1(a d) / a - (p - q)) / (a-1) (d = lp - lq): the definition
        # rearranged so that nothing of size p or q cancels against the small divisor.
        # base expm1(c d) is formed as exp(lb + c d) - base where |c d| >= 1: nothing cancels
        # there, and it stays finite where expm1 alone would overflow.
        near_one, c, inv_c, inv_o = alpha_expansion(alpha, alpha_minus_one)
        cd = c * (lp - lq)
        base = tl.where(near_one, p, q)
        rest = tl.where(tl.abs(cd) < 1.0, base * expm1(cd), fast_exp(tl.where(near_one, lp, lq) + cd) - base)
        inner = (rest * inv_c - (p - q)) * inv_o
        # At the support's edges p^a q^(1-a) is 0 unless an exponent blows it up.
        p_only = tl.where(alpha > 1.0, float("inf"), 0.0)
        q_only = tl.where(alpha < 0.0, float("inf"), 0.0)
        mixed = tl.where(has_p, p_only, tl.where(has_q, q_only, zero))
        edge = mixed * (1.0 / (alpha * alpha_minus_one)) - p * (1.0 / alpha_minus_one) + q * (1.0 / alpha)
        value = tl.where(has_p & has_q, inner, edge)
    else:
        tl.static_assert(False, "unknown DIVERGENCE code")
    return value


@triton.jit
def f_prime(lp, lq, beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
             DIVERGENCE: tl.constexpr):
    """``f'(t)`` of a non-linear divergence where ``p > 0`` (callers weight it by ``p``)."""
    if DIVERGENCE == JS:
        lpm, _ = js_logs(lp, lq, beta, one_minus_beta, log_beta, log_one_minus_beta)
        fprime = one_minus_beta * lpm
    elif DIVERGENCE == TV:
        fprime = tl.where(lp > lq, 0.5, tl.where(lp < lq, -0.5, 0.0))
    elif DIVERGENCE == HELLINGER:
        fprime = 1.0 - fast_exp(0.5 * (lq - lp))
    elif DIVERGENCE == CHI2:
        fprime = 2.0 * (fast_exp(lp - lq) - 1.0)
    elif DIVERGENCE == ALPHA:
        fprime = expm1(alpha_minus_one * (lp - lq)) * (1.0 / alpha_minus_one)
    else:
        tl.static_assert(False, "unknown DIVERGENCE code")
    return fprime


@triton.jit
def centred_slope(lp, lq, fprime_k, shift,
                   beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
                   DIVERGENCE: tl.constexpr):
    """``p (f'(t) - f'(t_k) - shift)``, 0 where ``p = 0``.

    Differences of ``f'`` first: exact at the argmax ``k``. Where ``f'(t)`` itself overflows
    (``t`` huge or tiny under a power) or ``p`` underflows while ``p f'(t)`` does not, the
    product is formed in log space instead: chi2 ``2 (exp(2 lp - lq) - p)``, alpha
    ``(exp(a lp + (1-a) lq) - p) / (a - 1)`` (exponent from ``alpha_log_mixed``).
    """
    p = fast_exp(lp)
    fprime = f_prime(lp, lq, beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
                      DIVERGENCE)
    centred = tl.where(p > 0.0, p * (fprime - fprime_k - shift), 0.0)
    if DIVERGENCE == CHI2 or DIVERGENCE == ALPHA:
        if DIVERGENCE == CHI2:
            p_fprime = 2.0 * (fast_exp(lp + (lp - lq)) - p)
        else:
            p_fprime = (fast_exp(alpha_log_mixed(lp, lq, alpha, alpha_minus_one)) - p) * (1.0 / alpha_minus_one)
        direct = (p > 0.0) & (tl.abs(fprime) < float("inf"))
        centred = tl.where(direct, centred, p_fprime - p * (fprime_k + shift))
        centred = tl.where(lp > float("-inf"), centred, 0.0)
    return centred
