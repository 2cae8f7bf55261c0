// The epilogue of the fold kernels: one slice's first-pass state merged into the running
// state of its row, read from and written back to the FoldArgs fields in place. The math
// is prefopt_kernels.backends.row_state.merge's, in the kernel's accumulator type:
//   m = max(m1, m2), c_i = exp((m_i - m) / T) (1 for the larger side, no exp of a -inf gap)
//   sum_exp = s1 c1 + s2 c2; ent_acc, fkl_acc and rkl_acc rescaled by c_i and shifted by
//   (m_i - m) / T (fkl_acc by the reference's shift less the policy's, rkl_acc also by its
//   change of centre), each side's term dropped where its sum or scale is 0 (no 0 * inf);
//   argmax and ref_at_argmax to the side with the larger max, the smaller index on ties; a
//   side with argmax -1 (nothing finite folded) never owns them; label logits add (only the
//   slice holding the label has a non-zero one).
#pragma once

#include <cstdint>

#include "prefopt/args.h"
#include "prefopt/common.h"
#include "prefopt/softmax_state.h"

namespace prefopt {
PREFOPT_MATH_BEGIN

// One side's accumulator carried to the merged max: c (acc + shift * weight), 0 where the
// weight (its sum of exponentials) or its scale c is 0.
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE Acc carried(Acc c, Acc acc, Acc shift, Acc weight) {
  return weight > Acc(0) && c > Acc(0) ? c * (acc + shift * weight) : Acc(0);
}

template <typename Acc>
PREFOPT_HD PREFOPT_INLINE Acc load_or_zero(const float* field, int64_t row) {
  return field != nullptr ? static_cast<Acc>(field[row]) : Acc(0);
}

template <typename Acc>
PREFOPT_HD PREFOPT_INLINE void store_if(float* field, int64_t row, Acc value) {
  if (field != nullptr) field[row] = static_cast<float>(value);
}

// Merge the slice's state `o` (its k already the global index, -1 where nothing finite was
// folded) and label logits into row `row` of the running state that `args` points at; with
// args.first_slice, into the empty state instead of the stored one (the same values the
// stored empty state would load, so the result is bit-identical).
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE void merge_into_row(const FoldArgs& args, int64_t row, const RowState<Acc>& o,
                                              float label_a, float label_b, Acc inv_temperature) {
  RowState<Acc> r = RowState<Acc>::empty();
  float r_label_a = 0.f, r_label_b = 0.f;
  if (args.first_slice == 0) {
    r.ma = static_cast<Acc>(args.max[row]);
    r.sa = static_cast<Acc>(args.sum_exp[row]);
    r.k = args.argmax[row];
    r.ua = load_or_zero<Acc>(args.ent_acc, row);
    r.mb = args.ref_max != nullptr ? static_cast<Acc>(args.ref_max[row]) : -static_cast<Acc>(kInf);
    r.sb = load_or_zero<Acc>(args.ref_sum_exp, row);
    r.ref_at_argmax = load_or_zero<Acc>(args.ref_at_argmax, row);
    r.wf = load_or_zero<Acc>(args.fkl_acc, row);
    r.wr = load_or_zero<Acc>(args.rkl_acc, row);
    r_label_a = args.label_logit[row];
    if (args.ref_label_logit != nullptr) r_label_b = args.ref_label_logit[row];
  }

  const Shift<Acc> A = merge_shift(r.ma, o.ma, inv_temperature);
  const bool running_owns =
      o.k < 0 || (r.k >= 0 && (r.ma > o.ma || (r.ma == o.ma && r.k < o.k)));
  args.max[row] = static_cast<float>(A.m);
  args.sum_exp[row] = static_cast<float>(r.sa * A.c1 + o.sa * A.c2);
  args.argmax[row] = running_owns ? r.k : o.k;
  args.label_logit[row] = r_label_a + label_a;
  store_if(args.ent_acc, row, carried(A.c1, r.ua, A.d1, r.sa) + carried(A.c2, o.ua, A.d2, o.sa));
  if (args.ref_max == nullptr) return;
  const Shift<Acc> B = merge_shift(r.mb, o.mb, inv_temperature);
  args.ref_max[row] = static_cast<float>(B.m);
  args.ref_sum_exp[row] = static_cast<float>(r.sb * B.c1 + o.sb * B.c2);
  args.ref_label_logit[row] = r_label_b + label_b;
  const Acc ref_at_argmax = running_owns ? r.ref_at_argmax : o.ref_at_argmax;
  store_if(args.ref_at_argmax, row, ref_at_argmax);
  store_if(args.fkl_acc, row, carried(B.c1, r.wf, B.d1 - A.d1, r.sb) + carried(B.c2, o.wf, B.d2 - A.d2, o.sb));
  if (args.rkl_acc != nullptr) {
    const Acc centre = kl_centre(ref_at_argmax);
    const Acc shift1 = A.d1 - (kl_centre(r.ref_at_argmax) - centre) * inv_temperature;
    const Acc shift2 = A.d2 - (kl_centre(o.ref_at_argmax) - centre) * inv_temperature;
    args.rkl_acc[row] = static_cast<float>(carried(A.c1, r.wr, shift1, r.sa) + carried(A.c2, o.wr, shift2, o.sa));
  }
}

PREFOPT_MATH_END
}  // namespace prefopt
