// The finish of a row's state over the whole vocabulary: prefopt_kernels.backends.row_state's
// finalize and finish_sweep, one row at a time, shared by the CPU entry points (Acc = double)
// and the CUDA kernels (Acc = float, with the fast_log their own log_norm uses). Per row, with
// u the state's fields (softmax_state.h has their meaning):
//   row_max = m_a (0 for -inf), log_norm = log Z_a, guard_a = log_norm - log_norm (NaN where
//   the row held a NaN or +inf logit), logp = (a_y - row_max) / T - log_norm + guard_a,
//   entropy = log_norm - ent_acc / Z_a + guard_a; the reference's likewise (guard_b);
//   forward KL: div = fkl_acc / Z_b - log Z_b + log Z_a (+ both guards), div_s = -1;
//   reverse KL: div_s = rkl_acc / Z_a, div = div_s - log Z_a - (b_k - m_b) / T + log Z_b
//   (+ both guards, b_k = 0 where -inf); div_s is NaN where div is not finite.
// Rows not read hold 0 in every statistic; the divergence's fields (div, div_s and the
// ref_at_argmax statistic) hold 0 where its term is off (RowsRead).
#pragma once

#include <cstdint>

#include "prefopt/args.h"
#include "prefopt/common.h"
#include "prefopt/fastmath.h"
#include "prefopt/softmax_state.h"

namespace prefopt {
PREFOPT_MATH_BEGIN

// The rows a pass reads and those with the divergence term (backends.rows_read): an ignored
// label skips its row; a zero weight drops the divergence, and skips the row without labels.
// every_row_read: no row is skipped (the caller compacted them); only zero weights with
// labels drop the divergence.
struct RowsRead {
  bool read;
  bool div_on;
};

PREFOPT_HD PREFOPT_INLINE RowsRead rows_read(const int64_t* labels, const float* weight,
                                             int64_t ignore_index, int64_t every_row_read,
                                             int64_t row) {
  const bool zero_weight = weight != nullptr && weight[row] == 0.f;
  if (every_row_read != 0) return RowsRead{true, !(labels != nullptr && zero_weight)};
  if (labels == nullptr) return RowsRead{!zero_weight, !zero_weight};
  const bool read = labels[row] != ignore_index;
  return RowsRead{read, read && !zero_weight};
}

// x where `on`, else 0, stored where the pointer is non-null.
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE void store_kept(float* field, int64_t row, Acc x, bool on) {
  if (field != nullptr) field[row] = on ? static_cast<float>(x) : 0.f;
}

// NaN where x is not finite, else 0 (the guards' x - x).
template <typename Acc>
PREFOPT_HD PREFOPT_INLINE Acc nan_guard(Acc x) {
  return x - x;
}

// div and div_s of one row: div_s NaN where the stored div is not finite, both 0 where the
// divergence's term is off.
PREFOPT_HD PREFOPT_INLINE void store_divergence(float* div_field, float* div_s_field, int64_t row,
                                                float div, float div_s, bool div_on) {
  const bool finite = nan_guard(div) == 0.f;
  div_field[row] = div_on ? div : 0.f;
  div_s_field[row] = div_on ? (finite ? div_s : __builtin_nanf("")) : 0.f;
}

// One head's finish: row_max (0 for a -inf max), log_norm = log Z and, where `logp` is
// non-null, (z_y - row_max) / T - log_norm + guard, each stored where the row is read.
template <typename Acc>
struct HeadFinish {
  Acc row_max, log_norm, guard, sum_exp;
};

template <typename Acc>
PREFOPT_HD PREFOPT_INLINE HeadFinish<Acc> finish_head(const float* max, const float* sum_exp,
                                                      const float* label_logit, float* row_max_field,
                                                      float* log_norm_field, float* logp, int64_t row,
                                                      Acc inv_temperature, bool read) {
  const Acc m = max[row];
  HeadFinish<Acc> head;
  head.row_max = m == -static_cast<Acc>(kInf) ? Acc(0) : m;
  head.sum_exp = sum_exp[row];
  head.log_norm = acc_log(head.sum_exp);
  head.guard = nan_guard(head.log_norm);
  store_kept(row_max_field, row, head.row_max, read);
  store_kept(log_norm_field, row, head.log_norm, read);
  if (logp != nullptr)
    store_kept(logp, row,
               (static_cast<Acc>(label_logit[row]) - head.row_max) * inv_temperature - head.log_norm + head.guard,
               read);
  return head;
}

template <typename Acc>
PREFOPT_HD PREFOPT_INLINE void finalize_row(const FinalizeArgs& args, int64_t row, Acc inv_temperature) {
  const RowsRead rr = rows_read(args.labels, args.weight, args.ignore_index, args.every_row_read, row);
  const HeadFinish<Acc> a = finish_head(args.max, args.sum_exp, args.label_logit, args.row_max, args.log_norm,
                                        args.logp, row, inv_temperature, rr.read);
  const Acc log_norm = a.log_norm, guard_a = a.guard, za = a.sum_exp;
  if (args.entropy != nullptr)
    store_kept(args.entropy, row, log_norm - static_cast<Acc>(args.ent_acc[row]) / za + guard_a, rr.read);
  if (args.ref_max == nullptr) return;
  const HeadFinish<Acc> b = finish_head(args.ref_max, args.ref_sum_exp, args.ref_label_logit, args.ref_row_max,
                                        args.ref_log_norm, args.ref_logp, row, inv_temperature, rr.read);
  const Acc ref_row_max = b.row_max, ref_log_norm = b.log_norm, guard_b = b.guard, zb = b.sum_exp;
  const Acc ref_at_argmax = args.ref_at_argmax != nullptr ? static_cast<Acc>(args.ref_at_argmax[row]) : Acc(0);
  if (args.ref_at_argmax != nullptr && is_centred(args.divergence))
    args.ref_at_argmax[row] = rr.div_on ? static_cast<float>(ref_at_argmax) : 0.f;
  if (args.div == nullptr) return;
  if (args.divergence == kForwardKL) {
    const Acc div = static_cast<Acc>(args.fkl_acc[row]) / zb - ref_log_norm + log_norm + guard_a + guard_b;
    store_divergence(args.div, args.div_s, row, static_cast<float>(div), -1.f, rr.div_on);
  } else if (args.divergence == kReverseKL) {
    const Acc div_s = static_cast<Acc>(args.rkl_acc[row]) / za;
    const Acc div = div_s - log_norm - (kl_centre(ref_at_argmax) - ref_row_max) * inv_temperature + ref_log_norm +
                    guard_a + guard_b;
    store_divergence(args.div, args.div_s, row, static_cast<float>(div), static_cast<float>(div_s), rr.div_on);
  }
}

// div = value_sum + both guards, div_s = centred_sum (NaN where div is not finite), in fp32
// as the sums are.
PREFOPT_HD PREFOPT_INLINE void finish_sweep_row(const FinishSweepArgs& args, int64_t row) {
  const RowsRead rr = rows_read(args.labels, args.weight, args.ignore_index, args.every_row_read, row);
  const float guard = nan_guard(args.log_norm[row]) + nan_guard(args.ref_log_norm[row]);
  store_divergence(args.div, args.div_s, row, args.value_sum[row] + guard, args.centred_sum[row], rr.div_on);
}

PREFOPT_MATH_END
}  // namespace prefopt
