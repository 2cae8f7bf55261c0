// Online softmax state of one row (or one piece of a row) for the policy logits x = a / T
// and the reference logits z = b / T, kept relative to running maxima:
//   sa = sum exp(x - ma)                      -> lse_a = ma + log sa
//   ua = sum exp(x - ma) (x - ma)             -> H(p) = log sa - ua / sa
//   sb = sum exp(z - mb)                      -> lse_b = mb + log sb
//   wf = sum exp(z - mb) ((z - mb) - (x - ma)) -> KL(q||p) = wf / sb - log sb + log sa
//   wr = sum exp(x - ma) ((x - ma) - (z - mb)) -> KL(p||q) = wr / sa - log sa + log sb
// Every accumulator is a sum of same-signed or shift-invariant terms relative to the max,
// so merging pieces (rescaling by exp(m_old - m_new)) loses no accuracy. An empty piece
// (all logits -inf) has max -inf and zero sums; merges never form 0 * inf from it.
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

template <typename Acc>
struct RowState {
  Acc ma, sa, ua, mb, sb, wf, wr;

  PREFOPT_HD static RowState empty() {
    const Acc ninf = -static_cast<Acc>(kInf);
    return RowState{ninf, Acc(0), Acc(0), ninf, Acc(0), Acc(0), Acc(0)};
  }
};

// Shift bookkeeping of one distribution when two pieces with maxima m1, m2 merge:
// d1, d2 = m_i - max(m1, m2) (<= 0, 0 for the larger), c1, c2 = exp(d1), exp(d2).
// One exponential per merge; equal maxima (including both -inf) give d = 0.
template <typename Acc>
struct Shift {
  Acc m, d1, d2, c1, c2;
};

template <typename Acc>
PREFOPT_HD PREFOPT_INLINE Shift<Acc> merge_shift(Acc m1, Acc m2) {
  const bool first_larger = m1 >= m2;
  const Acc d = m1 == m2 ? Acc(0) : -(first_larger ? m1 - m2 : m2 - m1);
  const Acc c = acc_exp(d);
  Shift<Acc> s;
  s.m = first_larger ? m1 : m2;
  s.d1 = first_larger ? Acc(0) : d;
  s.d2 = first_larger ? d : Acc(0);
  s.c1 = first_larger ? Acc(1) : c;
  s.c2 = first_larger ? c : Acc(1);
  return s;
}

// r <- r (+) o. Terms weighted by an empty distribution are dropped (they are zero), so a
// -inf shift never multiplies a zero sum. With the reference absent its fields stay empty.
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE void merge_state(RowState<Acc>& r, const RowState<Acc>& o) {
  const Shift<Acc> A = merge_shift(r.ma, o.ma);
  const Shift<Acc> B = merge_shift(r.mb, o.mb);
  const Acc zero(0);
  const Acc ua = (r.sa > zero ? A.c1 * (r.ua + A.d1 * r.sa) : zero) +
                 (o.sa > zero ? A.c2 * (o.ua + A.d2 * o.sa) : zero);
  const Acc wr = (r.sa > zero ? A.c1 * (r.wr + (A.d1 - B.d1) * r.sa) : zero) +
                 (o.sa > zero ? A.c2 * (o.wr + (A.d2 - B.d2) * o.sa) : zero);
  const Acc wf = (r.sb > zero ? B.c1 * (r.wf + (B.d1 - A.d1) * r.sb) : zero) +
                 (o.sb > zero ? B.c2 * (o.wf + (B.d2 - A.d2) * o.sb) : zero);
  r.sa = r.sa * A.c1 + o.sa * A.c2;
  r.sb = r.sb * B.c1 + o.sb * B.c2;
  r.ma = A.m;
  r.mb = B.m;
  r.ua = ua;
  r.wf = wf;
  r.wr = wr;
}

// Statistics of a finished row state.
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE Acc state_lse_a(const RowState<Acc>& s) { return s.ma + acc_log(s.sa); }
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE Acc state_lse_b(const RowState<Acc>& s) { return s.mb + acc_log(s.sb); }
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE Acc state_entropy(const RowState<Acc>& s) {
  return acc_log(s.sa) - s.ua / s.sa;
}
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE Acc state_forward_kl(const RowState<Acc>& s) {
  return s.wf / s.sb - acc_log(s.sb) + acc_log(s.sa);
}
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE Acc state_reverse_kl(const RowState<Acc>& s) {
  return s.wr / s.sa - acc_log(s.sa) + acc_log(s.sb);
}

PREFOPT_MATH_END
}  // namespace prefopt
