// Second-sweep terms of tv, hellinger and chi2 from base-2 log-probabilities, for the CUDA
// row loops (host-compilable so that the same code can be checked against a double
// reference on the CPU). With ap = log2 p and aq = log2 q formed once per element from the
// raw logit difference (one FMA each) and p = 2^ap, q = 2^aq:
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

#include "prefopt/common.h"
#include "prefopt/divergence.h"
#include "prefopt/fastmath.h"

namespace prefopt {
namespace cuda {

// 2^x: the MUFU unit on the GPU (about 2 ulp, -inf gives 0, subnormals flush to 0).
PREFOPT_HD PREFOPT_INLINE float sweep_ex2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}

// The divergences whose terms are here.
constexpr bool has_sweep_terms(int div) {
  return div == kTV || div == kHellinger || div == kChi2 || div == kAlpha;
}

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
  return sweep_ex2(fmaxf(fmaf(c.alpha, ap, c.one_minus_alpha * aq), -kInf));
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
    const float root = sweep_ex2(0.5f * (ap + aq));  // sqrt(pq)
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
    const float ratio = sweep_ex2(fmaxf(fmaf(2.f, ap, -aq), -kInf));  // p^2 / q
    value += fmaf(-2.f, p, ratio) + q;
    const float near = c.chi2_k * (p * expm1_small(-dl));
    centred += fabsf(dl) < 0.25f ? near : fmaf(-c.chi2_k, p, ratio);
  }
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
