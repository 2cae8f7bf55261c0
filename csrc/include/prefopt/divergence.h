// Divergence generators in log space. For lp = log p_i, lq = log q_i, t = p_i / q_i:
//   qf  = q_i f(t_i)      (summed over the row: the divergence D_f)
//   pfp = p_i f'(t_i)     (summed: S = sum_i p_i f'(t_i), which the gradient needs:
//                          dD/da_j = (p_j f'(t_j) - p_j S) / T)
// with 0 log 0 = 0: an entry with p = q = 0 (both logits -inf) contributes 0 to both, never
// NaN. An entry where only one side is 0 gives the mathematically right value, which may be
// +inf for divergences that are unbounded there.
#pragma once

#include "prefopt/common.h"
#include "prefopt/fastmath.h"

namespace prefopt {
PREFOPT_MATH_BEGIN

struct DivParams {
  float beta;       // js: m = beta q + (1 - beta) p
  float one_m_beta;
  float alpha;      // alpha-divergence order
  float inv_am1;    // 1 / (alpha - 1)
  float inv_aam1;   // 1 / (alpha (alpha - 1))
};

PREFOPT_HD PREFOPT_INLINE DivParams make_div_params(float beta, float alpha) {
  DivParams p;
  p.beta = beta;
  p.one_m_beta = 1.f - beta;
  p.alpha = alpha;
  p.inv_am1 = 1.f / (alpha - 1.f);
  p.inv_aam1 = 1.f / (alpha * (alpha - 1.f));
  return p;
}

// Generators of the DIVERGENCE_CODES table:
//   forward_kl f = -log t           q f = q (lq - lp)              p f' = -q
//   reverse_kl f = t log t          q f = p (lp - lq)              p f' = p (lp - lq + 1)
//   js(b)      q f = b q log(q/m) + (1-b) p log(p/m), m = b q + (1-b) p;  p f' = (1-b) p log(p/m)
//   tv         q f = |p - q| / 2                                   p f' = p sign(p - q) / 2
//   hellinger  q f = (sqrt p - sqrt q)^2                           p f' = sqrt p (sqrt p - sqrt q)
//   chi2       q f = (p - q)(t - 1)                                p f' = 2 p (t - 1)
//   alpha(a)   q f = (p^a q^(1-a) - a p - (1-a) q) / (a(a-1))      p f' = (p^a q^(1-a) - p) / (a-1)
template <int DIV>
PREFOPT_HD PREFOPT_INLINE void div_terms(float lp, float lq, const DivParams& prm, float& qf,
                                         float& pfp) {
  const float p = fast_exp(lp);
  const float q = fast_exp(lq);
  if constexpr (DIV == kForwardKL) {
    qf = q > 0.f ? q * (lq - lp) : 0.f;
    pfp = -q;
  } else if constexpr (DIV == kReverseKL) {
    const float d = lp - lq;
    qf = p > 0.f ? p * d : 0.f;
    pfp = p > 0.f ? p * (d + 1.f) : 0.f;
  } else if constexpr (DIV == kJS) {
    const float m = prm.beta * q + prm.one_m_beta * p;
    const float lm = fast_log(m < kFltMin ? kFltMin : m);
    const float tp = p > 0.f ? p * (lp - lm) : 0.f;
    const float tq = q > 0.f ? q * (lq - lm) : 0.f;
    qf = prm.beta * tq + prm.one_m_beta * tp;
    pfp = prm.one_m_beta * tp;
  } else if constexpr (DIV == kTV) {
    qf = 0.5f * (p > q ? p - q : q - p);
    const float half_sign = (lp > lq ? 0.5f : 0.f) - (lp < lq ? 0.5f : 0.f);
    pfp = half_sign * p;
  } else if constexpr (DIV == kHellinger) {
    const float sp = fast_exp(0.5f * lp);
    const float d = sp - fast_exp(0.5f * lq);
    qf = d * d;
    pfp = sp * d;
  } else if constexpr (DIV == kChi2) {
    const float tm1 = fast_exp(lp - lq) - 1.f;
    qf = p > 0.f ? (p - q) * tm1 : q;
    pfp = p > 0.f ? 2.f * p * tm1 : 0.f;
  } else if constexpr (DIV == kAlpha) {
    const bool both_zero = lp == -kInf && lq == -kInf;
    const float e = prm.alpha * lp + (1.f - prm.alpha) * lq;
    const float pw = fast_exp(both_zero ? -kInf : e);
    qf = (pw - prm.alpha * p - (1.f - prm.alpha) * q) * prm.inv_aam1;
    pfp = (pw - p) * prm.inv_am1;
  } else {
    qf = 0.f;
    pfp = 0.f;
  }
}

PREFOPT_MATH_END
}  // namespace prefopt
