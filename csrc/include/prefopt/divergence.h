// Divergence generators in log space, for lp = log p_i, lq = log q_i, t = p_i / q_i:
//   div_value  = q_i f(t_i)   (summed over the row: the divergence D_f)
//   div_fprime = f'(t_i)      (only where p_i > 0; callers weight it by p_i)
// -inf on either side is legal input: an entry with p = q = 0 contributes 0 to the value,
// never NaN; an entry where only one side is 0 gives the mathematically right value, which
// may be +inf for divergences that are unbounded there.
//
// The gradient needs S = sum_i p_i f'(t_i); the kernels keep it centred at the policy's
// argmax k, div_s = sum_i p_i (f'(t_i) - f'(t_k)), so that f'(t_j) - S is formed as
// (f'(t_j) - f'(t_k)) - div_s without cancelling two large numbers (see RowStats).
// Forward and reverse KL are linear in the logits and are handled by the sweeps directly.
#pragma once

#include <cmath>

#include "prefopt/common.h"
#include "prefopt/fastmath.h"

namespace prefopt {
PREFOPT_MATH_BEGIN

struct DivParams {
  float beta;  // js: m = beta q + (1 - beta) p
  float one_m_beta;
  float log_beta;
  float log_one_m_beta;
  float alpha;     // alpha-divergence order
  float inv_am1;   // 1 / (alpha - 1)
  float inv_aam1;  // 1 / (alpha (alpha - 1))
};

PREFOPT_HD PREFOPT_INLINE DivParams make_div_params(float beta, float alpha) {
  DivParams p;
  p.beta = beta;
  p.one_m_beta = 1.f - beta;
  p.log_beta = static_cast<float>(::log(static_cast<double>(beta)));
  p.log_one_m_beta = static_cast<float>(::log(1.0 - static_cast<double>(beta)));
  p.alpha = alpha;
  p.inv_am1 = 1.f / (alpha - 1.f);
  p.inv_aam1 = 1.f / (alpha * (alpha - 1.f));
  return p;
}

// log(beta q + (1 - beta) p), exact where either side is -inf.
PREFOPT_HD PREFOPT_INLINE float log_mixture(float lp, float lq, const DivParams& prm) {
  const float u = prm.log_beta + lq;
  const float v = prm.log_one_m_beta + lp;
  const float hi = u > v ? u : v;
  const float lo = u > v ? v : u;
  return lo > -kInf ? hi + fast_log(1.f + fast_exp(lo - hi)) : hi;
}

// q f(t) of the non-linear divergences:
//   js(b)      b q log(q/m) + (1-b) p log(p/m), m = b q + (1-b) p
//   tv         |p - q| / 2
//   hellinger  (sqrt p - sqrt q)^2
//   chi2       q (t - 1)^2, in log space on each side of d = lp - lq = 0 (t can overflow
//              where q underflows): exp(lp + d) (1 - exp(-d))^2 for d > 0, else
//              q (exp(d) - 1)^2
//   alpha(a)   (p^a q^(1-a) - a p - (1-a) q) / (a (a-1))
template <int DIV>
PREFOPT_HD PREFOPT_INLINE float div_value(float lp, float lq, const DivParams& prm) {
  const bool has_p = lp > -kInf;
  const bool has_q = lq > -kInf;
  const float p = fast_exp(lp);
  const float q = fast_exp(lq);
  if constexpr (DIV == kJS) {
    const float lm = log_mixture(lp, lq, prm);
    const float tq = has_q ? q * (lq - lm) : 0.f;
    const float tp = has_p ? p * (lp - lm) : 0.f;
    return prm.beta * tq + prm.one_m_beta * tp;
  } else if constexpr (DIV == kTV) {
    return 0.5f * (p > q ? p - q : q - p);
  } else if constexpr (DIV == kHellinger) {
    const float d = fast_exp(0.5f * lp) - fast_exp(0.5f * lq);
    return d * d;
  } else if constexpr (DIV == kChi2) {
    const float d = lp - lq;
    const float shrink = 1.f - fast_exp(-(d > 0.f ? d : 0.f));
    const float grow = fast_exp(d < 0.f ? d : 0.f) - 1.f;
    const float v = d > 0.f ? fast_exp(lp + d) * shrink * shrink : q * grow * grow;
    return has_q ? v : (has_p ? kInf : 0.f);
  } else if constexpr (DIV == kAlpha) {
    // p^a q^(1-a) at the support's edges is 0 unless an exponent blows it up.
    const float p_only = prm.alpha > 1.f ? kInf : 0.f;
    const float q_only = prm.alpha < 0.f ? kInf : 0.f;
    const float both = fast_exp(prm.alpha * lp + (1.f - prm.alpha) * lq);
    const float mixed = has_p && has_q ? both : (has_p ? p_only : (has_q ? q_only : 0.f));
    return (mixed - prm.alpha * p - (1.f - prm.alpha) * q) * prm.inv_aam1;
  } else {
    return 0.f;
  }
}

// f'(t) of the non-linear divergences where p > 0:
//   js (1-b)(lp - lm); tv sign(lp - lq)/2; hellinger 1 - exp((lq - lp)/2);
//   chi2 2 (exp(lp - lq) - 1); alpha (exp((a-1)(lp - lq)) - 1) / (a-1)
template <int DIV>
PREFOPT_HD PREFOPT_INLINE float div_fprime(float lp, float lq, const DivParams& prm) {
  if constexpr (DIV == kJS) {
    return prm.one_m_beta * (lp - log_mixture(lp, lq, prm));
  } else if constexpr (DIV == kTV) {
    return (lp > lq ? 0.5f : 0.f) - (lp < lq ? 0.5f : 0.f);
  } else if constexpr (DIV == kHellinger) {
    return 1.f - fast_exp(0.5f * (lq - lp));
  } else if constexpr (DIV == kChi2) {
    return 2.f * (fast_exp(lp - lq) - 1.f);
  } else if constexpr (DIV == kAlpha) {
    return (fast_exp((prm.alpha - 1.f) * (lp - lq)) - 1.f) * prm.inv_am1;
  } else {
    return 0.f;
  }
}

// p ((f'(t) - f'(t_k)) - s) of the non-linear divergences where p > 0 (lp > -inf), with
// fk = f'(t_k) and s the centred S (0 in the forward's sum). Where f'(t) is finite and p does
// not underflow it is formed in that order, which is exactly -p s at the argmax k itself;
// elsewhere p f'(t) is formed as ONE expression in
// log space, since f'(t) overflows (or p underflows) long before the product does, e.g.
// chi2's 2 p (t - 1) = 2 (exp(2 lp - lq) - p) where q is far below p.
template <int DIV>
PREFOPT_HD PREFOPT_INLINE float div_centred(float lp, float lq, float p, float fk, float s,
                                            const DivParams& prm) {
  const float fp = div_fprime<DIV>(lp, lq, prm);
  float pfp = p * fp;
  if constexpr (DIV == kHellinger) {
    pfp = p - fast_exp(0.5f * (lp + lq));
  } else if constexpr (DIV == kChi2) {
    pfp = 2.f * (fast_exp(lp + (lp - lq)) - p);
  } else if constexpr (DIV == kAlpha) {
    pfp = (fast_exp(prm.alpha * lp + (1.f - prm.alpha) * lq) - p) * prm.inv_am1;
  }
  const bool direct = p > 0.f && fp - fp == 0.f;  // fp finite
  return direct ? p * ((fp - fk) - s) : pfp - p * fk - p * s;
}

PREFOPT_MATH_END
}  // namespace prefopt
