// Second-sweep terms of js (below, with its own constants and sums), tv, hellinger, chi2
// and alpha from base-2 log-probabilities, for the CUDA row loops (host-compilable so that
// the same code can be checked against a double reference on the CPU). With ap = log2 p and
// aq = log2 q formed once per element from the raw logit difference (one FMA each) and
// p = 2^ap, q = 2^aq:
//   tv         value |p - q| (halved once per row), centred p (sign(p - q) / 2 - f'(t_k))
//   hellinger  value p + q - 2 sqrt(pq), sqrt(pq) = 2^((ap + aq) / 2); centred
//              p (f'(t) - f'(t_k)) = -sqrt(q_k / p_k) p expm1(h), h = dl / 2
//   chi2       value p^2/q - 2p + q, p^2/q = 2^(2 ap - aq); centred (halved until the row's
//              end) t_k p expm1(-dl)
// with dl = (log q - log p) - (log q_k - log p_k) = ((b - a) - (b_k - a_k)) / T from the raw
// logits, exact but for one rounding. The value sums need only 1e-5 absolute, so their
// per-element cancellation (a few ulp of p or q) is harmless. The centred sums feed the
// gradient and must stay accurate where policy ~ reference, i.e. f'(t) - f'(t_k) small: there
// (|dl| < 1/4; |h| < 1/4 for hellinger) the terms are expm1 by its Taylor series, elsewhere the plain forms
// p (1 - f'(t_k)) - sqrt(pq) and p^2/q - t_k p, which lose at most a factor 1/(1 - e^-1/4) ~ 4.5
// of ulp to cancellation and stay finite where t overflows. Entries with p = 0 contribute 0 to
// the centred sums; p = q = 0 contributes 0 to the values (chi2's 2^(2ap - aq) is 2^NaN
// there, taken as 0 by the fmax).
// alpha (a) with m = p^a q^(1-a) = 2^(a ap + (1-a) aq) (one ex2; an inf - inf exponent is a
// p = q = 0 entry or a 0^0 edge, taken as 0): value (m - a p - (1-a) q) / (a (a-1)) as
// (base expm1(c d) / c - (p - q)) / o with d = log p - log q and, as alpha_rest does, base,
// c, o = p, a-1, a near a = 1 or q, a, a-1 near a = 0: base expm1(c d) by the series where
// |c d| < 1/4, else m - base (so nothing of size p or q meets the small divisor); centred
// p (f'(t) - f'(t_k)) = t_k^(a-1) p expm1(-(a-1) dl) / (a-1) by the series where
// |(a-1) dl| < 1/4, else (m - t_k^(a-1) p) / (a-1), the divisors applied once per row.
#pragma once

#include <cmath>

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

// Per-row constants of the terms: from f'(t_k) (fprime_k) at the policy's argmax k.
struct SweepConsts {
  float c_above, c_below, c_equal;  // tv: sign(p - q) / 2 - f'(t_k) on each side
  float hellinger_k;                // 1 - f'(t_k) = sqrt(q_k / p_k)
  float chi2_k;                     // 1 + f'(t_k) / 2 = t_k
  // alpha: a, 1 - a, a - 1, t_k^(a-1) = 1 + (a-1) f'(t_k), c ln 2 and 1 / c (c, o and the
  // base side from make_div_params), 1 / o and 1 / (a-1); base = base_p p + base_q q with
  // weights 0 and 1 (arithmetic, so that the loop is not duplicated for the two sides).
  float alpha, one_minus_alpha, alpha_minus_one, alpha_k, c_ln2, inv_c, inv_o, inv_am1;
  float base_p, base_q;
};

PREFOPT_HD PREFOPT_INLINE SweepConsts sweep_consts(float fprime_k, const DivParams& prm) {
  return SweepConsts{0.5f - fprime_k,
                     -0.5f - fprime_k,
                     -fprime_k,
                     1.f - fprime_k,
                     1.f + 0.5f * fprime_k,
                     prm.alpha,
                     -prm.alpha_minus_one,
                     prm.alpha_minus_one,
                     fmaf(prm.alpha_minus_one, fprime_k, 1.f),
                     prm.c * 0.693147180559945309f,
                     prm.inv_c,
                     prm.inv_o,
                     prm.inv_alpha_minus_one,
                     prm.near_one > 0.f ? 1.f : 0.f,
                     prm.near_one > 0.f ? 0.f : 1.f};
}

// alpha's m = p^a q^(1-a) (0 where the exponent is inf - inf).
PREFOPT_HD PREFOPT_INLINE float alpha_mixed(float ap, float aq, const SweepConsts& c) {
  return ex2(fmaxf(fmaf(c.alpha, ap, c.one_minus_alpha * aq), -kInf));
}

// alpha's centred term times a - 1: t_k^(a-1) p expm1(-(a-1) dl) or m - t_k^(a-1) p. p = 0
// gives dl = inf or NaN, so the far form, with m taken as 0 there.
PREFOPT_HD PREFOPT_INLINE float alpha_centred(float ap, float p, float mixed, float dl,
                                              const SweepConsts& c) {
  const float y = -c.alpha_minus_one * dl;
  const float near = c.alpha_k * (p * expm1_small(y));
  const float far = fmaf(-c.alpha_k, p, ap > -kInf ? mixed : 0.f);
  return fabsf(y) < 0.25f ? near : far;
}

// Adds the element's value and centred terms (before the per-row factors of
// sweep_finish) to the running sums.
template <int DIV>
PREFOPT_HD PREFOPT_INLINE void sweep_term(float ap, float aq, float p, float q, float dl,
                                          const SweepConsts& c, float& value, float& centred) {
  if constexpr (DIV == kTV) {
    value += fabsf(p - q);
    const float side = ap > aq ? c.c_above : (ap < aq ? c.c_below : c.c_equal);
    centred = fmaf(p, side, centred);
  } else if constexpr (DIV == kHellinger) {
    const float root = ex2(0.5f * (ap + aq));  // sqrt(pq)
    value += fmaf(-2.f, root, p + q);
    const float h = 0.5f * dl;
    const float near = -c.hellinger_k * (p * expm1_small(h));
    centred += fabsf(h) < 0.25f ? near : fmaf(p, c.hellinger_k, -root);
  } else if constexpr (DIV == kAlpha) {
    const float mixed = alpha_mixed(ap, aq, c);
    const float base = fmaf(c.base_p, p, c.base_q * q);
    const float cd = c.c_ln2 * (ap - aq);
    const float rest = fabsf(cd) < 0.25f ? base * expm1_small(cd) : mixed - base;
    value += fmaf(rest, c.inv_c, q - p);
    centred += alpha_centred(ap, p, mixed, dl, c);
  } else {
    static_assert(DIV == kChi2, "sweep_term: tv, hellinger, chi2 or alpha");
    const float ratio = ex2(fmaxf(fmaf(2.f, ap, -aq), -kInf));  // p^2 / q
    value += fmaf(-2.f, p, ratio) + q;
    const float near = c.chi2_k * (p * expm1_small(-dl));
    centred += fabsf(dl) < 0.25f ? near : fmaf(-c.chi2_k, p, ratio);
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
                  prm.js_b * one_minus_b, 0.f, 0.f};
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
    value *= c.inv_o;
    centred *= c.inv_am1;
  }
}

}  // namespace cuda
}  // namespace prefopt
