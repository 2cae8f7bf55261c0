// Second-sweep terms of js (below, with its own constants and sums), tv, hellinger, chi2
// and alpha from base-2 log-probabilities, for the CUDA row loops (host-compilable so that
// the same code can be checked against a double reference on the CPU). With ap = log2 p and
// aq = log2 q formed once per element from the raw logits less a centre (one FMA each: the
// policy's max a_k, the reference's logit b_k at the policy's argmax k, or its max where b_k
// is -inf), p = 2^ap, q = 2^aq, and dr = (b - b_k) - (a - a_k) (exact but for one rounding,
// exactly 0 at k; dl = dr / T = log t_k - log t):
//   tv         value |p - q| (halved once per row), centred p (sign(p - q) / 2 - f'(t_k))
//   hellinger  value p + q - 2 sqrt(pq), sqrt(pq) = 2^((ap + aq) / 2); centred
//              p (f'(t) - f'(t_k)) = -sqrt(q_k / p_k) p expm1(h), h = dl / 2
//   chi2       value p^2/q - 2p + q, p^2/q = 2^(2 ap - aq); centred (halved until the row's
//              end) t_k p expm1(-dl)
// Each divergence scales dr to its series argument with one FMA (SweepConsts). The
// value sums need only 1e-5 absolute, so their per-element cancellation (a few ulp of p or q)
// is harmless. The centred sums feed the gradient and must stay accurate where policy ~
// reference, i.e. f'(t) - f'(t_k) small: there (|dl| < 1/4; |h| < 1/4 for hellinger) the
// terms are expm1 by its Taylor series, elsewhere the plain forms p (1 - f'(t_k)) - sqrt(pq)
// and p^2/q - t_k p, which lose at most a factor 1/(1 - e^-1/4) ~ 4.5 of ulp to cancellation
// and stay finite where t overflows. Entries with p = 0 contribute 0 to the centred sums;
// p = q = 0 contributes 0 to the values (chi2's 2^(2ap - aq) is 2^NaN there, taken as 0 by
// the fmax).
// alpha (a): with c, o and the base side as make_div_params has them (c = a-1, o = a, base p
// near a = 1; c = a, o = a-1, base q near a = 0) and d2 = ap - aq, m = p^a q^(1-a) =
// 2^(log2 base + c d2) (one ex2; an inf - inf exponent is a p = q = 0 entry or a 0^0 edge,
// taken as 0); value (m - a p - (1-a) q) / (a (a-1)) = sum base expm1(c d2 ln2) / (c o) -
// sum (p - q) / o, where the second sum is 0 over a row (the slices' sweeps add up to the
// row's) and is left out: that costs |sum p - sum q| / |o| <= 2 |sum p - sum q| of the
// rounded p and q (their normalisers' rounding, a few 1e-7). base expm1(c d2 ln2) by its
// series where |c d2 ln2| < 1/4, else m - base (so nothing of size p or q meets the small
// divisor c); centred p (f'(t) - f'(t_k)) = t_k^(a-1) p expm1(y) / (a-1), y = -(a-1) dl, by
// the series where |y| < 1/4, else (m - t_k^(a-1) p) / (a-1); the divisors applied once per
// row. Both series are minimax fits of degree 5 with the row's factors in their coefficients.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/row_device.cuh"
#include "prefopt/common.h"
#include "prefopt/divergence.h"
#include "prefopt/fastmath.h"

namespace prefopt {
namespace cuda {

// expm1(y) for |y| <= 1/4 by its Taylor series to degree 6 (truncation < 5e-8 relative).
PREFOPT_HD PREFOPT_INLINE float expm1_small(float y) {
  float r = 1.f / 720.f;
  r = fmaf(r, y, 1.f / 120.f);
  r = fmaf(r, y, 1.f / 24.f);
  r = fmaf(r, y, 1.f / 6.f);
  r = fmaf(r, y, 0.5f);
  return fmaf(y * y, r, y);
}

// Minimax fits of degree 5 on |y| <= 1/4, relative error below 8.5e-8 (1.4 ulp):
// expm1(y) ~ y (a1 + y (a2 + ...)) and 2^u - 1 ~ u (b1 + u (b2 + ...)) on |u ln2| <= 1/4.
// alpha takes them with its per-row factors folded into the coefficients (sweep_consts).
#define PREFOPT_EXPM1_FIT \
  {0.9999999924506011f, 0.49999830897088915f, 0.16666739318205245f, 0.04177515051192451f, \
   0.008333329885882259f}
#define PREFOPT_EXP2M1_FIT \
  {0.693147175327101f, 0.24022569449906733f, 0.055504350612352094f, 0.009643170986747716f, \
   0.001333355263071212f}

// x (k[0] + x (k[1] + ... + x k[4])).
PREFOPT_HD PREFOPT_INLINE float series5(float x, const float (&k)[5]) {
  float r = fmaf(k[4], x, k[3]);
  r = fmaf(r, x, k[2]);
  r = fmaf(r, x, k[1]);
  r = fmaf(r, x, k[0]);
  return x * r;
}

// All ones where the row-wide flag (+1 or -1) is positive, else 0: its sign bit spread,
// inverted. Not a comparison, on which the compiler would unswitch the loop; with select_bits
// a per-element choice of side is one bitwise select and the loop is not duplicated.
PREFOPT_HD PREFOPT_INLINE uint32_t flag_bits(float flag) {
  return ~static_cast<uint32_t>(static_cast<int32_t>(float_to_bits(flag)) >> 31);
}

// if_set where mask is all ones, else if_clear.
PREFOPT_HD PREFOPT_INLINE float select_bits(float if_set, float if_clear, uint32_t mask) {
  return bits_to_float((float_to_bits(if_set) & mask) | (float_to_bits(if_clear) & ~mask));
}

// Per-row constants of the terms: from f'(t_k) (fprime_k) at the policy's argmax k, and each
// divergence's series argument fma(dr, arg_scale, arg_offset) (header).
struct SweepConsts {
  float c_above, c_below, c_equal;  // tv: sign(p - q) / 2 - f'(t_k) on each side
  float hellinger_k;                // 1 - f'(t_k) = sqrt(q_k / p_k)
  float chi2_k;                     // 1 + f'(t_k) / 2 = t_k
  float ref_centre, arg_scale, arg_offset;
  // alpha (a; c, o and the base side as make_div_params has them): 1 / c, 1 / o, 1 / (a-1),
  // t_k^(a-1) = 1 + (a-1) f'(t_k); c and the series of base expm1(c d2 ln2) in d2 = ap - aq
  // (coefficients c^j b_j) with its range |d2| < value_near; the series of t_k^(a-1)
  // expm1(y) (coefficients t_k^(a-1) a_j); which side is the base (flag_bits; all ones: p).
  float inv_c, inv_o, inv_am1, alpha_k;
  float alpha_c, value_near;
  float value_fit[5], centred_fit[5];
  uint32_t base_p_bits;
};

// dr's scale in each divergence's series argument: h = dl / 2 (hellinger), -dl (chi2) and
// y = -(a-1) dl (alpha), dl = dr / T.
template <int DIV>
PREFOPT_HD PREFOPT_INLINE float arg_scale(const DivParams& prm, float inv_temperature) {
  if constexpr (DIV == kHellinger) return 0.5f * inv_temperature;
  if constexpr (DIV == kChi2) return -inv_temperature;
  if constexpr (DIV == kAlpha) return -prm.alpha_minus_one * inv_temperature;
  return 0.f;
}

// ref_at_argmax = b_k, ref_shift the reference row's max; ref_centre (SweepConsts) the
// reference logit the loop subtracts: b_k, or ref_shift where b_k = -inf.
template <int DIV>
PREFOPT_HD PREFOPT_INLINE SweepConsts sweep_consts(float fprime_k, const DivParams& prm,
                                                   float inv_temperature, float ref_at_argmax,
                                                   float ref_shift) {
  SweepConsts c{};
  const bool finite_k = ref_at_argmax > -kInf;
  c.ref_centre = finite_k ? ref_at_argmax : ref_shift;
  c.c_above = 0.5f - fprime_k;
  c.c_below = -0.5f - fprime_k;
  c.c_equal = -fprime_k;
  c.hellinger_k = 1.f - fprime_k;
  c.chi2_k = 1.f + 0.5f * fprime_k;
  c.arg_scale = arg_scale<DIV>(prm, inv_temperature);
  // The argument's offset, -(b_k - ref_centre) times the scale: 0 for a finite b_k (k's own
  // dr and argument are exactly 0), else infinite, which takes every entry to the plain forms.
  c.arg_offset = finite_k ? 0.f : kInf * c.arg_scale;
  c.inv_c = prm.inv_c;
  c.inv_o = prm.inv_o;
  c.inv_am1 = prm.inv_alpha_minus_one;
  c.alpha_k = fmaf(prm.alpha_minus_one, fprime_k, 1.f);
  c.alpha_c = prm.c;
  c.value_near = 0.25f / (0.693147180559945309f * fabsf(prm.c));
  const float expm1_fit[5] = PREFOPT_EXPM1_FIT;
  const float exp2m1_fit[5] = PREFOPT_EXP2M1_FIT;
  float power = 1.f;
  for (int j = 0; j < 5; ++j) {
    power *= prm.c;
    c.value_fit[j] = power * exp2m1_fit[j];
    c.centred_fit[j] = c.alpha_k * expm1_fit[j];
  }
  c.base_p_bits = flag_bits(prm.near_one);
  return c;
}

// The base side of alpha's terms: from_p where base_p_bits is all ones, else from_q.
PREFOPT_HD PREFOPT_INLINE float alpha_base(float from_p, float from_q, const SweepConsts& c) {
  return select_bits(from_p, from_q, c.base_p_bits);
}

// alpha's m = p^a q^(1-a) = 2^(log2 base + c d2) (0 where the exponent is inf - inf).
PREFOPT_HD PREFOPT_INLINE float alpha_mixed(float ap, float aq, float d2, const SweepConsts& c) {
  return ex2(fmaxf(fmaf(c.alpha_c, d2, alpha_base(ap, aq, c)), -kInf));
}

// alpha's centred term times a - 1: t_k^(a-1) p expm1(y) or m - t_k^(a-1) p, y = -(a-1) dl
// from dr. p = 0 gives y = inf or NaN, so the plain form, with m taken as 0 there.
PREFOPT_HD PREFOPT_INLINE float alpha_centred(float ap, float p, float mixed, float dr,
                                              const SweepConsts& c) {
  const float y = fmaf(dr, c.arg_scale, c.arg_offset);
  const float near = p * series5(y, c.centred_fit);
  const float far = fmaf(-c.alpha_k, p, ap > -kInf ? mixed : 0.f);
  return fabsf(y) < 0.25f ? near : far;
}

// Adds the element's value and centred terms (before the per-row factors of
// sweep_finish) to the running sums; dr as in the header.
template <int DIV>
PREFOPT_HD PREFOPT_INLINE void sweep_term(float ap, float aq, float p, float q, float dr,
                                          const SweepConsts& c, float& value, float& centred) {
  if constexpr (DIV == kTV) {
    value += fabsf(p - q);
    const float side = ap > aq ? c.c_above : (ap < aq ? c.c_below : c.c_equal);
    centred = fmaf(p, side, centred);
  } else if constexpr (DIV == kHellinger) {
    const float root = ex2(0.5f * (ap + aq));  // sqrt(pq)
    value += fmaf(-2.f, root, p + q);
    const float h = fmaf(dr, c.arg_scale, c.arg_offset);
    const float near = -c.hellinger_k * (p * expm1_small(h));
    centred += fabsf(h) < 0.25f ? near : fmaf(p, c.hellinger_k, -root);
  } else if constexpr (DIV == kAlpha) {
    const float d2 = ap - aq;
    const float mixed = alpha_mixed(ap, aq, d2, c);
    const float base = alpha_base(p, q, c);
    const float rest = fabsf(d2) < c.value_near ? base * series5(d2, c.value_fit) : mixed - base;
    value += rest;
    centred += alpha_centred(ap, p, mixed, dr, c);
  } else {
    static_assert(DIV == kChi2, "sweep_term: tv, hellinger, chi2 or alpha");
    const float ratio = ex2(fmaxf(fmaf(2.f, ap, -aq), -kInf));  // p^2 / q
    value += fmaf(-2.f, p, ratio) + q;
    const float y = fmaf(dr, c.arg_scale, c.arg_offset);  // -dl
    const float near = c.chi2_k * (p * expm1_small(y));
    centred += fabsf(y) < 0.25f ? near : fmaf(-c.chi2_k, p, ratio);
  }
}

// js in base-2 logs, m = beta q + (1 - beta) p. "main" is the side of the larger weight (p
// for beta <= 1/2, else q), b <= 1/2 the other side's weight; with lm2, lo2 the base-2 logs
// of main and other and w2 = lo2 - lm2: A = log2(m / main) = log2(1 + z), z = b (2^w2 - 1),
// by a polynomial while |z| <= 0.2 (where lg2's absolute error would be a large relative
// one), else by lg2; once far (w2 >= log2(1 / b), the other side dominates) from
// y = m / other = b + (1 - b) 2^-w2 as A = w2 + log2 y and log2(other / m) = -log2 y, so that
// neither cancels against w2. -inf logs are clamped to -2^100 first: ex2 of the clamp is 0
// and every product keeps a finite factor, so no NaN.
constexpr float kJsLog2Floor = -0x1p100f;

struct JsSweepConsts {
  float b, one_minus_b;
  float far_from;        // log2(1 / b)
  float b_one_minus_b;   // b (1 - b)
  float log_m_main_k, log_other_m_k;  // at the policy's argmax k
  uint32_t q_main_bits;               // flag_bits: all ones where q is the main side
};

// (log2(m / main), log2(other / m)) from clamped (finite) lm2, lo2.
PREFOPT_HD PREFOPT_INLINE void js_logs2(float lm2, float lo2, const JsSweepConsts& c,
                                        float& log_m_main, float& log_other_m) {
  const float w2 = lo2 - lm2;
  const bool far = w2 >= c.far_from;
  // 2^w2, or 2^(log2(1 / b) - w2) = 1 / (b 2^w2) <= 1 once far.
  const float e = ex2(far ? c.far_from - w2 : w2);
  const float z = fmaf(c.b, e, -c.b);
  const float log_y = lg2(far ? fmaf(c.b_one_minus_b, e, c.b) : fmaf(c.b, e, c.one_minus_b));
  // log2(1 + z) / z on |z| <= 0.2: Chebyshev fit, relative error below 1.4e-7 in fp32.
  float r = fmaf(0.2195388525724411f, z, -0.2536127269268036f);
  r = fmaf(r, z, 0.288197785615921f);
  r = fmaf(r, z, -0.3604068160057068f);
  r = fmaf(r, z, 0.4809010922908783f);
  r = fmaf(r, z, -0.7213488817214966f);
  r = fmaf(r, z, 1.4426950216293335f);
  const bool small = fabsf(z) <= 0.2f && !far;
  log_m_main = small ? z * r : (far ? w2 + log_y : log_y);
  log_other_m = far ? -log_y : w2 - log_m_main;
}

// js's constants from the base-2 logs lp2_k, lq2_k at the policy's argmax k.
PREFOPT_HD PREFOPT_INLINE JsSweepConsts js_sweep_consts(const DivParams& prm, float lp2_k,
                                                        float lq2_k) {
  const bool q_main = prm.js_q_main > 0.f;
  const float one_minus_b = q_main ? prm.beta : prm.one_minus_beta;
  JsSweepConsts c{prm.js_b, one_minus_b, -prm.js_log_b * 1.44269504088896341f,
                  prm.js_b * one_minus_b, 0.f, 0.f, flag_bits(prm.js_q_main)};
  js_logs2(fmaxf(q_main ? lq2_k : lp2_k, kJsLog2Floor), fmaxf(q_main ? lp2_k : lq2_k, kJsLog2Floor),
           c, c.log_m_main_k, c.log_other_m_k);
  return c;
}

// js's per-thread sums: main log2(m / main), other log2(other / m), and the centred terms
// of either side, main (A_k - A) and other (log2(other / m) - its value at k), formed per
// element so that the argmax's own term is exactly 0 and nothing of size f'(t_k) cancels.
struct JsSums {
  float main_log, other_log, main_centred, other_centred;
};

PREFOPT_HD PREFOPT_INLINE void js_term(float lm2, float lo2, const JsSweepConsts& c,
                                       JsSums& s) {
  lm2 = fmaxf(lm2, kJsLog2Floor);
  lo2 = fmaxf(lo2, kJsLog2Floor);
  const float main = ex2(lm2);
  const float other = ex2(lo2);
  float log_m_main, log_other_m;
  js_logs2(lm2, lo2, c, log_m_main, log_other_m);
  s.main_log = fmaf(main, log_m_main, s.main_log);
  s.other_log = fmaf(other, log_other_m, s.other_log);
  s.main_centred = fmaf(main, c.log_m_main_k - log_m_main, s.main_centred);
  s.other_centred = fmaf(other, log_other_m - c.log_other_m_k, s.other_centred);
}

// (f'(t) - f'(t_k)) / ((1 - beta) ln2) of the policy's entry with base-2 logs ap, aq, from
// the sweep's forms: A_k - A where p is the main side, log2(other / m) less its value at k
// where q is; exactly 0 at k, and no difference of nearly equal large logs.
PREFOPT_HD PREFOPT_INLINE float js_fprime_gap(float ap, float aq, const JsSweepConsts& c) {
  ap = fmaxf(ap, kJsLog2Floor);
  aq = fmaxf(aq, kJsLog2Floor);
  float log_m_main, log_other_m;
  js_logs2(select_bits(aq, ap, c.q_main_bits), select_bits(ap, aq, c.q_main_bits), c, log_m_main,
           log_other_m);
  return select_bits(log_other_m - c.log_other_m_k, c.log_m_main_k - log_m_main, c.q_main_bits);
}

// The value sum q f(t) = ln2 (b sum other log2(other / m) - (1 - b) sum main log2(m / main))
// and the centred sum p (f'(t) - f'(t_k)) with f' = (1 - beta) ln2 log2(p / m) (-A where p
// is main, log2(other / m) where q is).
PREFOPT_HD PREFOPT_INLINE void js_finish(const JsSums& s, const JsSweepConsts& c, bool q_main,
                                         float one_minus_beta, float& value, float& centred) {
  const float ln2 = 0.693147180559945309f;
  value = ln2 * fmaf(c.b, s.other_log, -c.one_minus_b * s.main_log);
  centred = (one_minus_beta * ln2) * (q_main ? s.other_centred : s.main_centred);
}

// The per-row factors left out of sweep_term.
template <int DIV>
PREFOPT_HD PREFOPT_INLINE void sweep_finish(const SweepConsts& c, float& value, float& centred) {
  if constexpr (DIV == kTV) value *= 0.5f;
  if constexpr (DIV == kChi2) centred *= 2.f;
  if constexpr (DIV == kAlpha) {
    value *= c.inv_c * c.inv_o;
    centred *= c.inv_am1;
  }
}

}  // namespace cuda
}  // namespace prefopt
