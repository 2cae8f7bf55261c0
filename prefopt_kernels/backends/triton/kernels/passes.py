"""The sweeps over one row that the kernels share: the first pass (maxima, sums of
exponentials, entropy and KL accumulators), the second pass of the non-linear divergences,
and which rows a program reads."""

import triton
import triton.language as tl

from .row_math import (
    ALPHA,
    CENTRED_CODES,
    CHI2,
    FORWARD_KL,
    JS,
    REVERSE_KL,
    centred_slope,
    edge_tile,
    f_prime,
    f_value,
    load_tile,
    online_step,
    tile_count,
    tile_pointers,
)
from .candidates import offer, store_largest
from .sweep_math import log2_sweep


@triton.jit
def first_pass(a_base, b_base, lead, vocab, inv_temperature,
                HAS_REF: tl.constexpr, WANT_ENTROPY: tl.constexpr, DIVERGENCE: tl.constexpr,
                TRACK_ARGMAX: tl.constexpr, BLOCK_V: tl.constexpr, top_ptr, CANDIDATES: tl.constexpr,
                CAP: tl.constexpr, UNALIGNED: tl.constexpr = False):
    """The first sweep over ``vocab`` entries of one row (a whole row, or a slice of it), read
    from the aligned bases ``a_base``, ``b_base`` whose row starts ``lead`` entries in
    (``row_math.aligned_row``): a masked first tile, whole tiles, a masked last tile.

    Returns ``(ma, za, h, mb, zb, k, ref_at_argmax, k_idx)``: raw maxima ``ma``, ``mb``; the
    lane sums ``za``, ``zb`` relative to them; the entropy lanes ``h`` (``WANT_ENTROPY``); the
    KL lanes ``k`` (forward KL relative to both maxima, reverse KL to ``ma`` and the centre
    ``ref_at_argmax``); the reference logit ``ref_at_argmax`` at the policy's first argmax;
    and, with ``TRACK_ARGMAX``, that argmax's index (-1 while every policy logit is ``-inf``).
    With ``CANDIDATES > 0`` the row's ``CANDIDATES`` largest policy logits go to its buffer of
    ``CAP`` slots at ``top_ptr``, of the policy row's dtype (``candidates.py``), from the same loads;
    ``UNALIGNED``: the rows are read from their own starts (``ALIGN == 1``), element by element.
    """
    cols = tl.arange(0, BLOCK_V)
    ma = float("-inf")
    mb = float("-inf")
    ref_at_argmax = 0.0
    k_idx = -1
    za = tl.zeros((BLOCK_V,), tl.float32)
    zb = tl.zeros((BLOCK_V,), tl.float32)
    h = tl.zeros((BLOCK_V,), tl.float32)
    k = tl.zeros((BLOCK_V,), tl.float32)
    size = 0
    threshold = float("-inf")
    last = tile_count(vocab, lead, BLOCK_V)
    _, mask = edge_tile(0, lead, vocab, BLOCK_V)
    raw = load_tile(a_base + cols, mask, True)
    x = raw.to(tl.float32)
    y = x
    if HAS_REF:
        y = load_tile(b_base + cols, mask, True).to(tl.float32)
    ma, za, h, mb, zb, k, ref_at_argmax, k_idx = fold_tile(
        ma, za, h, mb, zb, k, ref_at_argmax, k_idx, x, y, -lead, inv_temperature,
        HAS_REF, WANT_ENTROPY, DIVERGENCE, TRACK_ARGMAX, BLOCK_V)
    if CANDIDATES > 0:
        size, threshold = offer(raw, top_ptr, size, threshold, CANDIDATES, CAP, BLOCK_V, UNALIGNED)
    # Whole tiles: each one's loads are issued before the previous one's cross-warp reductions
    # (``whole``: all lanes or none, so the loads stay vectors; none past the last whole tile).
    whole = cols < tl.where(last > 1, BLOCK_V, 0)
    x_next = tl.load(a_base + BLOCK_V + cols, mask=whole, other=float("-inf"))
    y_next = x_next
    if HAS_REF:
        y_next = tl.load(b_base + BLOCK_V + cols, mask=whole, other=float("-inf"))
    for tile in range(1, last):
        raw = x_next
        x = raw.to(tl.float32)
        y = y_next.to(tl.float32)
        ahead = (tile + 1) * BLOCK_V + cols
        whole = cols < tl.where(tile + 1 < last, BLOCK_V, 0)
        x_next = tl.load(a_base + ahead, mask=whole, other=float("-inf"))
        if HAS_REF:
            y_next = tl.load(b_base + ahead, mask=whole, other=float("-inf"))
        ma, za, h, mb, zb, k, ref_at_argmax, k_idx = fold_tile(
            ma, za, h, mb, zb, k, ref_at_argmax, k_idx, x, y, tile * BLOCK_V - lead, inv_temperature,
            HAS_REF, WANT_ENTROPY, DIVERGENCE, TRACK_ARGMAX, BLOCK_V)
        if CANDIDATES > 0:
            size, threshold = offer(raw, top_ptr, size, threshold, CANDIDATES, CAP, BLOCK_V, UNALIGNED)
    if last > 0:
        _, mask = edge_tile(last, lead, vocab, BLOCK_V)
        raw = load_tile(a_base + last * BLOCK_V + cols, mask, True)
        x = raw.to(tl.float32)
        y = x
        if HAS_REF:
            y = load_tile(b_base + last * BLOCK_V + cols, mask, True).to(tl.float32)
        ma, za, h, mb, zb, k, ref_at_argmax, k_idx = fold_tile(
            ma, za, h, mb, zb, k, ref_at_argmax, k_idx, x, y, last * BLOCK_V - lead, inv_temperature,
            HAS_REF, WANT_ENTROPY, DIVERGENCE, TRACK_ARGMAX, BLOCK_V)
        if CANDIDATES > 0:
            size, threshold = offer(raw, top_ptr, size, threshold, CANDIDATES, CAP, BLOCK_V, UNALIGNED)
    if CANDIDATES > 0:
        store_largest(top_ptr, size, CANDIDATES, CAP)
    return ma, za, h, mb, zb, k, ref_at_argmax, k_idx


@triton.jit
def fold_tile(ma, za, h, mb, zb, k, ref_at_argmax, k_idx, x, y, first_column, inv_temperature,
               HAS_REF: tl.constexpr, WANT_ENTROPY: tl.constexpr, DIVERGENCE: tl.constexpr,
               TRACK_ARGMAX: tl.constexpr, BLOCK_V: tl.constexpr):
    """One tile of fp32 logits ``x`` (policy) and ``y`` (reference), whose lane 0 is the row's
    column ``first_column``, folded into the first pass's state (:func:`first_pass`)."""
    CENTRED: tl.constexpr = ((CENTRED_CODES >> DIVERGENCE) & 1) == 1
    cols = tl.arange(0, BLOCK_V)
    # Differences of raw logits first, then the temperature: exact where p is large.
    block_max, ma_new, scale_a, shift_a, x_rel, ea = online_step(ma, x, inv_temperature)
    if WANT_ENTROPY:
        h = tl.where(scale_a > 0.0, scale_a * (h + shift_a * za), 0.0) + tl.where(ea > 0.0, ea * x_rel, 0.0)
    if TRACK_ARGMAX or (HAS_REF and CENTRED):
        # The policy's running argmax (the first on ties): the least lane holding the tile's
        # max, one integer reduction; tiles come in column order. A tile whose max is NaN
        # matches no lane; it never moves the argmax (NaN > ma is false), and such a row is
        # NaN anyway.
        k_block = tl.min(tl.where(x == block_max, cols, BLOCK_V), axis=0)
        if TRACK_ARGMAX:
            k_idx = tl.where(block_max > ma, first_column + k_block, k_idx)
    if HAS_REF:
        _, mb_new, scale_b, shift_b, y_rel, eb = online_step(mb, y, inv_temperature)
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
def second_pass(a_base, b_base, lead, vocab, inv_temperature, ma_s, log_za, mb_s, log_zb, ref_at_argmax,
                 beta, one_minus_beta, log_beta, log_one_minus_beta, alpha, alpha_minus_one,
                 DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr, UNALIGNED: tl.constexpr = False):
    """``(sum q f(t), sum p (f'(t) - f'(t_k)))`` over ``vocab`` entries, given the row's final
    statistics; ``f'(t_k)`` at the policy's argmax, whose ``log p`` is exactly ``-log_za``.
    The rows are read as :func:`first_pass` reads them; ``UNALIGNED``: read from their own
    starts (``ALIGN`` 1), whole tiles addressed as ``row_math.tile_pointers`` says. js, chi2
    and alpha take the base-2 forms of ``sweep_math``."""
    if (DIVERGENCE == JS or DIVERGENCE == CHI2) or DIVERGENCE == ALPHA:
        value, centred = log2_sweep(a_base, b_base, lead, vocab, inv_temperature, ma_s, log_za, mb_s, log_zb,
                                    ref_at_argmax, beta, one_minus_beta, log_beta, log_one_minus_beta, alpha,
                                    alpha_minus_one, DIVERGENCE, BLOCK_V, UNALIGNED)
    else:
        lq_k = (ref_at_argmax - mb_s) * inv_temperature - log_zb
        fprime_k = f_prime(-log_za, lq_k, beta, one_minus_beta, log_beta, log_one_minus_beta, alpha,
                            alpha_minus_one, DIVERGENCE)
        cols = tl.arange(0, BLOCK_V)
        values = tl.zeros((BLOCK_V,), tl.float32)
        centred_lanes = tl.zeros((BLOCK_V,), tl.float32)
        last = tile_count(vocab, lead, BLOCK_V)
        _, mask = edge_tile(0, lead, vocab, BLOCK_V)
        values, centred_lanes = sweep_tile(values, centred_lanes, a_base + cols, b_base + cols, mask, True,
                                           inv_temperature, ma_s, log_za, mb_s, log_zb, fprime_k, DIVERGENCE)
        for tile in range(1, last):
            values, centred_lanes = sweep_tile(values, centred_lanes,
                                               tile_pointers(a_base + tile * BLOCK_V, BLOCK_V, UNALIGNED),
                                               tile_pointers(b_base + tile * BLOCK_V, BLOCK_V, UNALIGNED), mask,
                                               False, inv_temperature, ma_s, log_za, mb_s, log_zb, fprime_k,
                                               DIVERGENCE)
        if last > 0:
            _, mask = edge_tile(last, lead, vocab, BLOCK_V)
            values, centred_lanes = sweep_tile(values, centred_lanes, a_base + last * BLOCK_V + cols,
                                               b_base + last * BLOCK_V + cols, mask, True, inv_temperature,
                                               ma_s, log_za, mb_s, log_zb, fprime_k, DIVERGENCE)
        value = tl.sum(values, axis=0)
        centred = tl.sum(centred_lanes, axis=0)
    return value, centred


@triton.jit
def sweep_tile(values, centred_lanes, a_tile, b_tile, mask, MASKED: tl.constexpr, inv_temperature,
                ma_s, log_za, mb_s, log_zb, fprime_k, DIVERGENCE: tl.constexpr):
    """tv's or hellinger's lane sums of :func:`second_pass` with one more tile (its pointers)."""
    x = load_tile(a_tile, mask, MASKED).to(tl.float32)
    y = load_tile(b_tile, mask, MASKED).to(tl.float32)
    lp = (x - ma_s) * inv_temperature - log_za
    lq = (y - mb_s) * inv_temperature - log_zb
    # The generators' parameters are js's and alpha's: unused here.
    value = f_value(lp, lq, 0.5, 0.5, 0.0, 0.0, 0.5, -0.5, DIVERGENCE)
    if MASKED:
        value = tl.where(mask, value, 0.0)
    centred = centred_slope(lp, lq, fprime_k, 0.0, 0.5, 0.5, 0.0, 0.0, 0.5, -0.5, DIVERGENCE)
    return values + value, centred_lanes + centred


@triton.jit
def row_plan(n, labels_ptr, weight_ptr, ignore_index,
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
