// Online softmax state of one row (or one piece of a row) for the policy logits a and the
// reference logits b at temperature T. The maxima ma, mb are kept in RAW logit units and
// every sum uses the scaled differences (a - ma) / T, which are exact for the entries near
// the max that dominate the sums (the scaled logits a / T themselves would carry a rounding
// error of ulp(max|a| / T)):
//   sa = sum exp((a - ma)/T)                       -> lse_a = ma / T + log sa
//   ua = sum exp((a - ma)/T) (a - ma)/T            -> H(p) = log sa - ua / sa
//   sb = sum exp((b - mb)/T)                       -> lse_b = mb / T + log sb
//   wf = sum exp((b - mb)/T) ((b - mb) - (a - ma))/T -> KL(q||p) = wf / sb - log sb + log sa
//   wr = sum exp((a - ma)/T) ((a - ma) - (b - b_k))/T -> KL(p||q) = wr / sa - log sa
//                                                          - (b_k - mb) / T + log sb
// with b_k = ref_at_argmax the reference logit at the policy's argmax, kept raw (-inf where
// the reference excludes it; 0 for an empty row) since the other divergences need f'(t_k)
// from it; reverse KL's terms use kl_centre(b_k), which is 0 in place of -inf (the KL is
// +inf there anyway). k is the index of that argmax, the first occurrence of the max (-1
// while untracked): the piece with the larger max owns (k, ref_at_argmax), the smaller k on
// equal maxima, so merges stay commutative and a piece can be merged with the states of
// other vocabulary slices. wr / sa = sum_i p_i (f'(t_i) - f'(t_k)) is reverse KL's centred
// S (RowStats), formed from raw differences, so it stays accurate when a peaked policy is
// far from the reference. Every accumulator is a sum of same-signed or shift-invariant terms
// relative to the max (and b_k), so merging pieces (rescaling by exp((m_old - m_new)/T),
// re-centring wr on the new argmax) loses no accuracy. An empty piece (all logits -inf) has
// max -inf and zero sums; merges never form 0 * inf from it.
#pragma once

#include <cmath>

#include "prefopt/common.h"
#include "prefopt/fastmath.h"

namespace prefopt {
PREFOPT_MATH_BEGIN

PREFOPT_HD PREFOPT_INLINE float acc_exp(float x) { return fast_exp(x); }
PREFOPT_HD PREFOPT_INLINE double acc_exp(double x) { return ::exp(x); }
PREFOPT_HD PREFOPT_INLINE float acc_log(float x) { return fast_log(x); }
PREFOPT_HD PREFOPT_INLINE double acc_log(double x) { return ::log(x); }

// The -inf-safe centre of reverse KL's terms for the raw reference logit at the argmax.
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE Acc kl_centre(Acc ref_at_argmax) {
  return ref_at_argmax == -static_cast<Acc>(kInf) ? Acc(0) : ref_at_argmax;
}

template <typename Acc>
struct RowState {
  Acc ma, sa, ua, mb, sb, wf, wr, ref_at_argmax;
  int64_t k;

  PREFOPT_HD static RowState empty() {
    const Acc ninf = -static_cast<Acc>(kInf);
    return RowState{ninf, Acc(0), Acc(0), ninf, Acc(0), Acc(0), Acc(0), Acc(0), -1};
  }
};

// Shift bookkeeping of one distribution when two pieces with raw maxima m1, m2 merge:
// d1, d2 = (m_i - max(m1, m2)) / T (<= 0, 0 for the larger), c1, c2 = exp(d1), exp(d2).
// One exponential per merge; equal maxima (including both -inf) give d = 0.
template <typename Acc>
struct Shift {
  Acc m, d1, d2, c1, c2;
};

template <typename Acc>
PREFOPT_HD PREFOPT_INLINE Shift<Acc> merge_shift(Acc m1, Acc m2, Acc inv_temperature) {
  const bool first_larger = m1 >= m2;
  const Acc d = m1 == m2 ? Acc(0) : -(first_larger ? m1 - m2 : m2 - m1) * inv_temperature;
  const Acc c = acc_exp(d);
  Shift<Acc> s;
  s.m = first_larger ? m1 : m2;
  s.d1 = first_larger ? Acc(0) : d;
  s.d2 = first_larger ? d : Acc(0);
  s.c1 = first_larger ? Acc(1) : c;
  s.c2 = first_larger ? c : Acc(1);
  return s;
}

// r <- r (+) o. Terms weighted by an empty distribution, or by a scale that underflowed to
// 0, are dropped (they are zero: exp(d) d -> 0), so a -inf shift (a -inf max, or a tiny T
// whose scaled gap overflows) never multiplies a zero. With the reference absent its fields
// stay empty. A NaN sum (a NaN or +inf logit) stays NaN through every merge.
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE void merge_state(RowState<Acc>& r, const RowState<Acc>& o,
                                           Acc inv_temperature) {
  const Shift<Acc> A = merge_shift(r.ma, o.ma, inv_temperature);
  const Shift<Acc> B = merge_shift(r.mb, o.mb, inv_temperature);
  const Acc zero(0);
  const Acc ua = (r.sa > zero && A.c1 > zero ? A.c1 * (r.ua + A.d1 * r.sa) : zero) +
                 (o.sa > zero && A.c2 > zero ? A.c2 * (o.ua + A.d2 * o.sa) : zero);
  // The larger policy max (the smaller index on ties) owns the argmax, and so the centre.
  // Written as >= and a tie test on k so that an untracked k (-1 throughout) folds away.
  const bool own = r.ma >= o.ma && !(r.ma == o.ma && o.k < r.k);
  const Acc ref_at_argmax = own ? r.ref_at_argmax : o.ref_at_argmax;
  const Acc c = kl_centre(ref_at_argmax);
  const Acc wr =
      (r.sa > zero && A.c1 > zero
           ? A.c1 * (r.wr + (A.d1 - (kl_centre(r.ref_at_argmax) - c) * inv_temperature) * r.sa)
           : zero) +
      (o.sa > zero && A.c2 > zero
           ? A.c2 * (o.wr + (A.d2 - (kl_centre(o.ref_at_argmax) - c) * inv_temperature) * o.sa)
           : zero);
  const Acc wf = (r.sb > zero && B.c1 > zero ? B.c1 * (r.wf + (B.d1 - A.d1) * r.sb) : zero) +
                 (o.sb > zero && B.c2 > zero ? B.c2 * (o.wf + (B.d2 - A.d2) * o.sb) : zero);
  r.sa = r.sa * A.c1 + o.sa * A.c2;
  r.sb = r.sb * B.c1 + o.sb * B.c2;
  r.ma = A.m;
  r.mb = B.m;
  r.ua = ua;
  r.wf = wf;
  r.wr = wr;
  r.ref_at_argmax = ref_at_argmax;
  r.k = own ? r.k : o.k;
}

// Statistics of a finished row state.
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE Acc state_lse_a(const RowState<Acc>& s, Acc inv_temperature) {
  return s.ma * inv_temperature + acc_log(s.sa);
}
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE Acc state_lse_b(const RowState<Acc>& s, Acc inv_temperature) {
  return s.mb * inv_temperature + acc_log(s.sb);
}

// log p_j = (a_j - shift) / T - offset (and the same for q): the form every sweep after the
// first uses, exact where it matters (entries near the max) in fp32. shift and offset are
// the row_max and log_norm statistics the forward saves for the backward.
struct LogProbShift {
  float shift;   // raw row max (0 for an empty row)
  float offset;  // log of the sum of exponentials relative to it
};

// log q_k at the policy's argmax k (reference logit ref_at_argmax there), as the row loops
// form log q: f'(t_k) from it equals the loop's own value at j = k, since log p_k is
// exactly -offset of the policy.
PREFOPT_HD PREFOPT_INLINE float lq_at_argmax(float ref_at_argmax, LogProbShift sb,
                                             float inv_temperature) {
  return (ref_at_argmax - sb.shift) * inv_temperature - sb.offset;
}

template <typename Acc>
PREFOPT_HD PREFOPT_INLINE LogProbShift shift_a(const RowState<Acc>& s) {
  return LogProbShift{s.ma == -static_cast<Acc>(kInf) ? 0.f : static_cast<float>(s.ma),
                      static_cast<float>(acc_log(s.sa))};
}
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE LogProbShift shift_b(const RowState<Acc>& s) {
  return LogProbShift{s.mb == -static_cast<Acc>(kInf) ? 0.f : static_cast<float>(s.mb),
                      static_cast<float>(acc_log(s.sb))};
}
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE Acc state_entropy(const RowState<Acc>& s) {
  return acc_log(s.sa) - s.ua / s.sa;
}
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE Acc state_forward_kl(const RowState<Acc>& s) {
  return s.wf / s.sb - acc_log(s.sb) + acc_log(s.sa);
}
// Reverse KL's centred S (the div_s of RowStats) and the divergence from it.
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE Acc state_reverse_kl_s(const RowState<Acc>& s) {
  return s.wr / s.sa;
}
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE Acc state_reverse_kl(const RowState<Acc>& s, Acc inv_temperature) {
  const Acc mb = s.mb == -static_cast<Acc>(kInf) ? Acc(0) : s.mb;
  return s.wr / s.sa - acc_log(s.sa) - (kl_centre(s.ref_at_argmax) - mb) * inv_temperature +
         acc_log(s.sb);
}

PREFOPT_MATH_END
}  // namespace prefopt
