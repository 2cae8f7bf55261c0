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

// Parameters of js and alpha, derived once on the host in double and rounded to fp32 once:
// 1 - beta and alpha - 1 formed from the rounded beta or alpha would lose everything near
// the ends (alpha = 1 + 1e-9 is 1.f).
struct DivParams {
  float beta;  // js: m = beta q + (1 - beta) p
  float one_minus_beta;
  float log_beta;
  float log_one_minus_beta;  // log(1 - beta)
  // js_logs expands around the side of the larger weight: q when js_q_main > 0 (beta > 1/2),
  // else p; js_b <= 1/2 is the other side's weight, js_log_b, js_log_1mb its logs. The
  // flags here are floats (1 or -1) because gcc does not vectorise a select on a bool
  // loaded from memory.
  float js_q_main;
  float js_b, js_log_b, js_log_1mb;
  float alpha;                      // alpha-divergence order
  float alpha_minus_one;            // alpha - 1
  float inv_alpha_minus_one;        // 1 / (alpha - 1)
  float inv_alpha;                  // 1 / alpha
  float inv_alpha_alpha_minus_one;  // 1 / (alpha (alpha - 1))
  // alpha's interior terms are expanded around the nearer of alpha = 1 (near_one > 0) and
  // alpha = 0: c is alpha - 1 or alpha, inv_c its inverse, inv_o the other one's inverse.
  float near_one;
  float c, inv_c, inv_o;
};

inline DivParams make_div_params(double beta, double alpha) {
  DivParams p;
  p.beta = static_cast<float>(beta);
  p.one_minus_beta = static_cast<float>(1.0 - beta);
  p.log_beta = static_cast<float>(std::log(beta));
  p.log_one_minus_beta = static_cast<float>(std::log1p(-beta));
  const bool q_main = beta > 0.5;
  p.js_q_main = q_main ? 1.f : -1.f;
  p.js_b = q_main ? p.one_minus_beta : p.beta;
  p.js_log_b = q_main ? p.log_one_minus_beta : p.log_beta;
  p.js_log_1mb = q_main ? p.log_beta : p.log_one_minus_beta;
  p.alpha = static_cast<float>(alpha);
  p.alpha_minus_one = static_cast<float>(alpha - 1.0);
  p.inv_alpha_minus_one = static_cast<float>(1.0 / (alpha - 1.0));
  p.inv_alpha = static_cast<float>(1.0 / alpha);
  p.inv_alpha_alpha_minus_one = static_cast<float>(1.0 / (alpha * (alpha - 1.0)));
  const bool near_one = std::fabs(alpha - 1.0) <= std::fabs(alpha);
  p.near_one = near_one ? 1.f : -1.f;
  p.c = near_one ? p.alpha_minus_one : p.alpha;
  p.inv_c = near_one ? p.inv_alpha_minus_one : p.inv_alpha;
  p.inv_o = near_one ? p.inv_alpha : p.inv_alpha_minus_one;
  return p;
}

// js's logs against the mixture m = beta q + (1 - beta) p, lpm = log(p / m) and
// lqm = log(q / m), for lp, lq not both -inf, without cancelling lm against a nearly equal
// log. The side of the larger weight, the "main" one (p for beta <= 1/2, else q), is
// nearest to m; with b <= 1/2 the other side's weight, w = log(other / main) and
// u = log b + w = log(b other / main):
//   log(m / main) = log1p(b expm1(w)) for -1 <= w <= 30 and u < 0, where it is small or
//                   grows with w ("near");
//                   logaddexp(log(1 - b), u) = hi + log1p(exp(lo - hi)) elsewhere, a sum of
//                   two positive terms where u >= 0;
//   log(other / m) = w - log(m / main), or -log b - log1p(exp(lo - hi)) once u >= 0.
// The logaddexp forms keep a row-constant part exact, so entries on the plateaus of the
// logs (q far below or above p) keep their small differences, which the gradient's
// f'(t_j) - f'(t_k) is made of. The main side = 0 (w = inf) gives log(other / m) = -log b
// exactly, the other side = 0 gives log(main / m) = -log(1 - b).
// Each entry takes one form, so one exponential (expm1(w) or exp(lo - hi) <= 1, from one
// range reduction) and one log1p serve it.
struct JsLogs {
  float lpm, lqm;
};

PREFOPT_HD PREFOPT_INLINE JsLogs js_logs(float lp, float lq, const DivParams& prm) {
  const float w = prm.js_q_main > 0.f ? lp - lq : lq - lp;
  const float u = prm.js_log_b + w;
  const bool other_side = u >= prm.js_log_1mb;
  const float hi = other_side ? u : prm.js_log_1mb;
  const float lo = other_side ? prm.js_log_1mb : u;
  const bool other_large = w >= -prm.js_log_b;  // u >= 0
  const bool near = w >= -1.f && w <= 30.f && !other_large;
  const float x = near ? w : lo - hi;
  // 2^k (1 + expm1(r)) - 1 or 2^k (1 + expm1(r)), as fast_expm1 and fast_exp form them
  // (k <= 43 on the near side; exp(x) <= 1 flushed to 0 below -87.3 on the other).
  const Ln2Split s = split_ln2(x);
  const float em1 = expm1_reduced(s.r);
  const float scale = exp2_int(s.k);
  const float e = near ? fmadd(scale, em1, scale - 1.f) : (x < -87.3f ? 0.f : (1.f + em1) * scale);
  const float l = fast_log1p(near ? prm.js_b * e : e);
  const float g = near ? l : hi + l;  // log(m / main)
  const float other = other_large ? -prm.js_log_b - l : w - g;
  return JsLogs{prm.js_q_main > 0.f ? other : -g, prm.js_q_main > 0.f ? -g : other};
}

// alpha's p^a q^(1-a) - base for lp, lq > -inf, base = p (near_one) or q: base expm1(c d)
// with d = lp - lq where |c d| < 1, else exp(lb + c d) - base (lb = log base), which
// cancels nothing there and stays finite where expm1 alone would overflow.
PREFOPT_HD PREFOPT_INLINE float alpha_rest(float lp, float lq, float p, float q,
                                           const DivParams& prm) {
  const float cd = prm.c * (lp - lq);
  const float lb = prm.near_one > 0.f ? lp : lq;
  const float base = prm.near_one > 0.f ? p : q;
  return (cd < 1.f && cd > -1.f) ? base * fast_expm1(cd) : fast_exp(lb + cd) - base;
}

// log(p^a q^(1-a)) for lp > -inf, from the same expansion point as alpha_rest; q = 0 gives
// the support's edge: inf for alpha > 1, else -inf.
PREFOPT_HD PREFOPT_INLINE float alpha_log_mixed(float lp, float lq, const DivParams& prm) {
  const float edge = prm.alpha > 1.f ? kInf : -kInf;
  return lq > -kInf ? (prm.near_one > 0.f ? lp : lq) + prm.c * (lp - lq) : edge;
}

// js's b q log(q/m) + (1-b) p log(p/m) and f'(t) = (1-b) log(p/m) from its logs.
PREFOPT_HD PREFOPT_INLINE float js_value(float lp, float lq, float p, float q, JsLogs l,
                                         const DivParams& prm) {
  const float tq = lq > -kInf ? q * l.lqm : 0.f;
  const float tp = lp > -kInf ? p * l.lpm : 0.f;
  return prm.beta * tq + prm.one_minus_beta * tp;
}

PREFOPT_HD PREFOPT_INLINE float js_fprime(JsLogs l, const DivParams& prm) {
  return prm.one_minus_beta * l.lpm;
}

// q f(t) of the non-linear divergences:
//   js(b)      b q log(q/m) + (1-b) p log(p/m), m = b q + (1-b) p (logs from js_logs)
//   tv         |p - q| / 2
//   hellinger  (sqrt p - sqrt q)^2
//   chi2       q (t - 1)^2, in log space on each side of d = lp - lq = 0 (t can overflow
//              where q underflows): exp(lp + d) (1 - exp(-d))^2 for d > 0, else
//              q (exp(d) - 1)^2
//   alpha(a)   (p^a q^(1-a) - a p - (1-a) q) / (a (a-1)), expanded around a = 1 or 0
template <int DIV>
PREFOPT_HD PREFOPT_INLINE float div_value(float lp, float lq, const DivParams& prm) {
  const bool has_p = lp > -kInf;
  const bool has_q = lq > -kInf;
  const float p = fast_exp_nonpositive(lp);
  const float q = fast_exp_nonpositive(lq);
  if constexpr (DIV == kJS) {
    return js_value(lp, lq, p, q, js_logs(lp, lq, prm), prm);
  } else if constexpr (DIV == kTV) {
    return 0.5f * (p > q ? p - q : q - p);
  } else if constexpr (DIV == kHellinger) {
    const float d = fast_exp_nonpositive(0.5f * lp) - fast_exp_nonpositive(0.5f * lq);
    return d * d;
  } else if constexpr (DIV == kChi2) {
    const float d = lp - lq;
    const float shrink = 1.f - fast_exp_nonpositive(-(d > 0.f ? d : 0.f));
    const float grow = fast_exp_nonpositive(d < 0.f ? d : 0.f) - 1.f;
    const float v = d > 0.f ? fast_exp(lp + d) * shrink * shrink : q * grow * grow;
    return has_q ? v : (has_p ? kInf : 0.f);
  } else {
    static_assert(DIV == kAlpha, "div_value: not a second-sweep divergence code");
    // Inside the support: near alpha = 1, (p expm1((a-1) d) / (a-1) - (p - q)) / a; near
    // alpha = 0, (q expm1(a d) / a - (p - q)) / (a-1); both are the definition rearranged,
    // with nothing of size p or q left to cancel against the small divisor.
    const float inner = (alpha_rest(lp, lq, p, q, prm) * prm.inv_c - (p - q)) * prm.inv_o;
    // At the support's edges p^a q^(1-a) is 0 unless an exponent blows it up.
    const float p_only = prm.alpha > 1.f ? kInf : 0.f;
    const float q_only = prm.alpha < 0.f ? kInf : 0.f;
    const float mixed = has_p ? p_only : (has_q ? q_only : 0.f);
    const float edge = mixed * prm.inv_alpha_alpha_minus_one - p * prm.inv_alpha_minus_one + q * prm.inv_alpha;
    return has_p && has_q ? inner : edge;
  }
}

// f'(t) of the non-linear divergences where p > 0:
//   js (1-b)(lp - lm); tv sign(lp - lq)/2; hellinger 1 - exp((lq - lp)/2);
//   chi2 2 (exp(lp - lq) - 1); alpha expm1((a-1)(lp - lq)) / (a-1)
template <int DIV>
PREFOPT_HD PREFOPT_INLINE float div_fprime(float lp, float lq, const DivParams& prm) {
  if constexpr (DIV == kJS) {
    return js_fprime(js_logs(lp, lq, prm), prm);
  } else if constexpr (DIV == kTV) {
    return (lp > lq ? 0.5f : 0.f) - (lp < lq ? 0.5f : 0.f);
  } else if constexpr (DIV == kHellinger) {
    return 1.f - fast_exp(0.5f * (lq - lp));
  } else if constexpr (DIV == kChi2) {
    return 2.f * (fast_exp(lp - lq) - 1.f);
  } else {
    static_assert(DIV == kAlpha, "div_fprime: not a second-sweep divergence code");
    return fast_expm1(prm.alpha_minus_one * (lp - lq)) * prm.inv_alpha_minus_one;
  }
}

// p ((f'(t) - f'(t_k)) - s) of the non-linear divergences where p > 0 (lp > -inf), with
// fprime_k = f'(t_k) and s the centred S (0 in the forward's sum). Where f'(t) is finite and
// p does not underflow it is formed in that order, which is exactly -p s at the argmax k
// itself; elsewhere p f'(t) is formed as ONE expression in log space, since f'(t) overflows
// (or p underflows) long before the product does, e.g. chi2's 2 p (t - 1) =
// 2 (exp(2 lp - lq) - p) where q is far below p, alpha's (p^a q^(1-a) - p) / (a-1)
// (alpha_log_mixed).
// div_centred_from takes fp = f'(t) already formed.
template <int DIV>
PREFOPT_HD PREFOPT_INLINE float div_centred_from(float lp, float lq, float p, float fp,
                                                 float fprime_k, float s, const DivParams& prm) {
  float pfp = p * fp;
  if constexpr (DIV == kHellinger) {
    pfp = p - fast_exp_nonpositive(0.5f * (lp + lq));
  } else if constexpr (DIV == kChi2) {
    pfp = 2.f * (fast_exp(lp + (lp - lq)) - p);
  } else if constexpr (DIV == kAlpha) {
    pfp = (fast_exp(alpha_log_mixed(lp, lq, prm)) - p) * prm.inv_alpha_minus_one;
  }
  const bool direct = p > 0.f && fp - fp == 0.f;  // fp finite
  return direct ? p * ((fp - fprime_k) - s) : pfp - p * fprime_k - p * s;
}

template <int DIV>
PREFOPT_HD PREFOPT_INLINE float div_centred(float lp, float lq, float p, float fprime_k,
                                            float s, const DivParams& prm) {
  return div_centred_from<DIV>(lp, lq, p, div_fprime<DIV>(lp, lq, prm), fprime_k, s, prm);
}

// One entry's terms of the forward's two sums: q f(t) and p (f'(t) - f'(t_k)) (0 where
// p = 0). js's logs are formed once for both (a compiler does not reliably share them
// between div_value and div_centred once it has vectorised them under different masks).
struct DivSumTerms {
  float value, centred;
};

template <int DIV>
PREFOPT_HD PREFOPT_INLINE DivSumTerms div_sum_terms(float lp, float lq, float fprime_k,
                                                    const DivParams& prm) {
  const float p = fast_exp_nonpositive(lp);
  float value, fp;
  if constexpr (DIV == kJS) {
    const JsLogs l = js_logs(lp, lq, prm);
    value = js_value(lp, lq, p, fast_exp_nonpositive(lq), l, prm);
    fp = js_fprime(l, prm);
  } else {
    value = div_value<DIV>(lp, lq, prm);
    fp = div_fprime<DIV>(lp, lq, prm);
  }
  const float centred = div_centred_from<DIV>(lp, lq, p, fp, fprime_k, 0.f, prm);
  return DivSumTerms{value, lp > -kInf ? centred : 0.f};
}

PREFOPT_MATH_END
}  // namespace prefopt
