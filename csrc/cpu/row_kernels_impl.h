// Body of the CPU row kernels. Included once per instruction-set variant with
// PREFOPT_CPU_VARIANT naming the namespace; the variants differ only in compiler flags.
//
// Forward, per row:
//   pass 1, blocks of kBlock entries converted to fp32 in a stack buffer: block max, then
//   sum exp / entropy / KL accumulators relative to it (one vectorised loop), merged into
//   a double-precision RowState (online rescaling; see softmax_state.h). Per-block fp32
//   sums are short (kBlock / SIMD width terms per lane) and the row-level merge is in
//   double, so accuracy does not degrade as V grows.
//   pass 2, only for js/tv/hellinger/chi2/alpha: with both log-sum-exps known, sums of
//   q f(t) and p (f'(t) - f'(t_k)) over the row (k the policy's argmax, found in pass 1),
//   again blocked; the row is re-read from cache.
// Vocabulary slices (row states): fold runs pass 1 over a slice [v0, v0 + vocab) and merges
// its RowState into the row's running state (fold_state.h); sweep runs pass 2 over a slice
// with the whole row's final statistics and adds its sums into the running ones
// (SweepArgs::accumulate); the backward takes the slice offset v0 for the label's index.
// The whole row is the slice at v0 = 0, so every path runs the same loops.
// Backward, per row: one vectorised loop reading a (and b when the divergence term is
// active) and writing g in the output dtype, with log p from the saved row_max/log_norm;
// each element is read before it is written, so g may alias a.
// Every log-probability is formed as (a - row max) / T - log(sum), exact near the max.
// NaN policy: block_max skips NaN but exp(NaN) and inf - inf do not, so log_norm is NaN
// exactly when a row holds a NaN or +inf; log_norm - log_norm (0 or NaN) is added to the
// outputs and gradient elements that depend on the row (forward_row, backward_impl).
// Products with a scaled logit are guarded by its exponential (e > 0): at a tiny T a finite
// (a - max) / T can overflow to -inf.
#pragma once

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/row_kernels.h"
#include "prefopt/common.h"
#include "prefopt/divergence.h"
#include "prefopt/elem.h"
#include "prefopt/fastmath.h"
#include "prefopt/finalize_state.h"
#include "prefopt/fold_state.h"
#include "prefopt/softmax_state.h"

#ifndef PREFOPT_CPU_VARIANT
#error "define PREFOPT_CPU_VARIANT before including row_kernels_impl.h"
#endif

namespace prefopt {
namespace cpu {
namespace PREFOPT_CPU_VARIANT {
namespace {

constexpr int64_t kBlock = 512;

#include "cpu/top_values.h"

template <int DT>
PREFOPT_INLINE void load_block(const typename Elem<DT>::T* __restrict src, int64_t n,
                               float* __restrict dst) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = Elem<DT>::load(src[j]);
}

PREFOPT_INLINE float block_max(const float* __restrict x, int64_t n) {
  float m = -kInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// State of one block with policy max ma (precomputed). A block whose logits are all -inf
// gets max -inf and zero sums; its shift for the exponentials is then 0 so that no
// -inf - -inf is formed. ref_at_argmax is the raw reference logit at the policy's running
// argmax, which the caller has already moved to this block if its max is the new one; reverse
// KL's terms are centred at kl_centre(ref_at_argmax); k is the row index of that argmax.
template <bool REF, int DIV, bool ENT>
PREFOPT_INLINE RowState<double> block_state(const float* __restrict xa,
                                            const float* __restrict xb, int64_t n, float ma,
                                            float ref_at_argmax, int64_t k,
                                            float inv_temperature) {
  const float sha = ma == -kInf ? 0.f : ma;
  float mb = -kInf;
  float shb = 0.f;
  if constexpr (REF) {
    mb = block_max(xb, n);
    shb = mb == -kInf ? 0.f : mb;
  }
  const float centre = kl_centre(ref_at_argmax);
  float sa = 0.f, ua = 0.f, sb = 0.f, wf = 0.f, wr = 0.f;
#pragma omp simd reduction(+ : sa, ua, sb, wf, wr)
  for (int64_t j = 0; j < n; ++j) {
    const float da = (xa[j] - sha) * inv_temperature;
    const float ea = fast_exp_nonpositive(da);
    sa += ea;
    if constexpr (ENT) ua += ea > 0.f ? ea * da : 0.f;
    if constexpr (REF) {
      const float db = (xb[j] - shb) * inv_temperature;
      const float eb = fast_exp_nonpositive(db);
      sb += eb;
      if constexpr (DIV == kForwardKL) wf += eb > 0.f ? eb * (db - da) : 0.f;
      if constexpr (DIV == kReverseKL)
        wr += ea > 0.f ? ea * (da - (xb[j] - centre) * inv_temperature) : 0.f;
    }
  }
  return RowState<double>{ma, sa, ua, mb, sb, wf, wr, ref_at_argmax, k};
}

// Requests the block two blocks after the one at c0 into the cache, so that its loads
// overlap this block's arithmetic (the hardware prefetcher alone leaves the sweeps stalled
// on memory).
template <int DT>
PREFOPT_INLINE void prefetch_block(const typename Elem<DT>::T* row, int64_t c0, int64_t vocab) {
  constexpr int64_t kAhead = 2 * kBlock;
  constexpr int64_t kLine = 64 / int64_t(sizeof(typename Elem<DT>::T));
  const int64_t end = std::min(c0 + kAhead + kBlock, vocab);
  for (int64_t j = c0 + kAhead; j < end; j += kLine) __builtin_prefetch(row + j);
}

// fp32 rows are read in place; the 16-bit types are converted into `buf` first.
template <int DT>
PREFOPT_INLINE const float* block_view(const typename Elem<DT>::T* src, int64_t n, float* buf) {
  if constexpr (DT == kFloat32) {
    return src;
  } else {
    load_block<DT>(src, n, buf);
    return buf;
  }
}

// Pass 1 over a whole row (or slice): the merged state of all its blocks. With `track`, the
// state's k follows the first index of the policy's max and ref_at_argmax the reference
// logit there (the centre of the divergence's S); without it k stays -1 and ref_at_argmax 0.
// ENT: accumulate ua (only the entropy needs it). `top`, when not null, is offered every block
// of the policy's row (the sampler-matched forward's candidates).
template <int DT, bool REF, int DIV, bool ENT>
RowState<double> row_state(const typename Elem<DT>::T* ra, const typename Elem<DT>::T* rb,
                           int64_t vocab, float inv_temperature, bool track, TopValues* top) {
  alignas(64) float buf_a[kBlock];
  alignas(64) float buf_b[kBlock];
  RowState<double> st = RowState<double>::empty();
  float ref_at_argmax = 0.f;
  int64_t k = -1;
  for (int64_t c0 = 0; c0 < vocab; c0 += kBlock) {
    const int64_t n = std::min(kBlock, vocab - c0);
    prefetch_block<DT>(ra, c0, vocab);
    if constexpr (REF) prefetch_block<DT>(rb, c0, vocab);
    const float* xa = block_view<DT>(ra + c0, n, buf_a);
    const float* xb = REF ? block_view<DT>(rb + c0, n, buf_b) : buf_b;
    const float ma = block_max(xa, n);
    if (top != nullptr) top->offer(xa, n, ma);
    // Strictly larger: an equal max in a later block keeps the first occurrence.
    if (track && ma > st.ma) {  // rare after the first blocks: a short scan
      int64_t j = 0;
      while (xa[j] != ma) ++j;
      k = c0 + j;
      if constexpr (REF) ref_at_argmax = xb[j];
    }
    merge_state(st, block_state<REF, DIV, ENT>(xa, xb, n, ma, ref_at_argmax, k, inv_temperature),
                double(inv_temperature));
  }
  return st;
}

// Pass 1 of a row: with the reference when need_ref, and DIV's accumulator where the row has
// its divergence term (use_div).
template <int DT, bool ENT, int DIV>
RowState<double> first_pass(const typename Elem<DT>::T* ra, const typename Elem<DT>::T* rb,
                            int64_t vocab, float inv_temperature, bool need_ref, bool use_div,
                            bool track, TopValues* top = nullptr) {
  constexpr int kAcc = first_pass_divergence(DIV);
  if (!need_ref)
    return row_state<DT, false, kNoDivergence, ENT>(ra, rb, vocab, inv_temperature, track, top);
  if (kAcc != kNoDivergence && use_div)
    return row_state<DT, true, kAcc, ENT>(ra, rb, vocab, inv_temperature, track, top);
  return row_state<DT, true, kNoDivergence, ENT>(ra, rb, vocab, inv_temperature, track, top);
}

// Pass 2 for the divergences that are non-linear in p and q: sums of q f(t) and of
// p (f'(t) - f'(t_k)). log p_k = -log_norm exactly (a_k - row_max = 0), so f'(t_k) is the
// value the loop itself computes at j = k.
template <int DT, int DIV>
void div_sums(const typename Elem<DT>::T* ra, const typename Elem<DT>::T* rb, int64_t vocab,
              float inv_temperature, LogProbShift sa, LogProbShift sb, float ref_at_argmax,
              const DivParams& prm, double& sum_value, double& sum_centred) {
  const float lq_k = lq_at_argmax(ref_at_argmax, sb, inv_temperature);
  const float fprime_k = div_fprime<DIV>(-sa.offset, lq_k, prm);
  sum_value = 0.0;
  sum_centred = 0.0;
  for (int64_t c0 = 0; c0 < vocab; c0 += kBlock) {
    const int64_t n = std::min(kBlock, vocab - c0);
    const typename Elem<DT>::T* a = ra + c0;
    const typename Elem<DT>::T* b = rb + c0;
    float bv = 0.f, bc = 0.f;
#pragma omp simd reduction(+ : bv, bc)
    for (int64_t j = 0; j < n; ++j) {
      const float lp = (Elem<DT>::load(a[j]) - sa.shift) * inv_temperature - sa.offset;
      const float lq = (Elem<DT>::load(b[j]) - sb.shift) * inv_temperature - sb.offset;
      const DivSumTerms t = div_sum_terms<DIV>(lp, lq, fprime_k, prm);
      bv += t.value;
      bc += t.centred;
    }
    sum_value += bv;
    sum_centred += bc;
  }
}

// Per-row results of the forward pass (double until stored).
struct RowOut {
  double logp = 0, ref_logp = 0, entropy = 0, div = 0, div_s = 0;
  float ref_at_argmax = 0.f;
  LogProbShift a{0.f, 0.f}, b{0.f, 0.f};
};

// DIV is the call's divergence; plan.use_div says whether this row has its term. `top` (null
// when the call asks for no candidates) gathers the row's largest values.
template <int DT, int DIV>
RowOut forward_row(const ForwardArgs& args, const RowPlan& plan, int64_t row,
                   float inv_temperature, const DivParams& prm, TopValues* top) {
  using T = typename Elem<DT>::T;
  const int64_t vocab = args.vocab;
  const T* ra = args.logits_row<T>(row);
  const bool need_ref = args.ref != nullptr && (plan.use_div || args.want_ref_logp);
  const T* rb = need_ref ? args.ref_row<T>(row) : nullptr;
  const bool use_div = plan.use_div;
  const bool centred = use_div && is_centred(DIV);

  const RowState<double> st =
      args.entropy != nullptr
          ? first_pass<DT, true, DIV>(ra, rb, vocab, inv_temperature, need_ref, use_div, centred, top)
          : first_pass<DT, false, DIV>(ra, rb, vocab, inv_temperature, need_ref, use_div, centred, top);

  RowOut out;
  const double inv_temperature_d = 1.0 / args.temperature;
  out.a = shift_a(st);
  if (args.entropy != nullptr) out.entropy = state_entropy(st);
  if (need_ref) out.b = shift_b(st);
  if (centred) out.ref_at_argmax = static_cast<float>(st.ref_at_argmax);
  if (plan.label >= 0) {
    if (plan.label < vocab) {
      out.logp = (double(Elem<DT>::load(ra[plan.label])) - st.ma) * inv_temperature_d -
                 std::log(st.sa);
      if (need_ref)
        out.ref_logp = (double(Elem<DT>::load(rb[plan.label])) - st.mb) * inv_temperature_d -
                       std::log(st.sb);
    } else {  // an unchecked label (graph capture skips the check) must not read out of bounds
      out.logp = out.ref_logp = NAN;
    }
  }
  if (use_div) {
    if constexpr (DIV == kForwardKL) {
      out.div = state_forward_kl(st);
      out.div_s = -1.0;  // sum_i p_i (-q_i / p_i)
    } else if constexpr (DIV == kReverseKL) {
      out.div = state_reverse_kl(st, inv_temperature_d);
      out.div_s = state_reverse_kl_s(st);
    } else if constexpr (needs_second_sweep(DIV)) {
      div_sums<DT, DIV>(ra, rb, vocab, inv_temperature, out.a, out.b, out.ref_at_argmax, prm,
                        out.div, out.div_s);
    }
  }
  // NaN policy: log_norm is NaN exactly when the row holds a NaN or +inf (inf - inf in the
  // sweep), so log_norm - log_norm (0 or NaN) marks every output that reads that row; the
  // guards cost a few flops per row and no branch per element.
  const double guard_a = double(out.a.offset) - double(out.a.offset);
  const double guard_b = double(out.b.offset) - double(out.b.offset);
  out.logp += guard_a;
  out.entropy += guard_a;
  out.ref_logp += guard_b;
  if (use_div) out.div += guard_a + guard_b;
  return out;
}

PREFOPT_INLINE void store_opt(float* dst, int64_t row, double v) {
  if (dst != nullptr) dst[row] = static_cast<float>(v);
}

int thread_count(int requested) {
#if defined(_OPENMP)
  return requested > 0 ? requested : omp_get_max_threads();
#else
  return requested > 0 ? requested : 1;
#endif
}

// Rows per OpenMP work item: about 16k elements, so short rows do not pay per-row overhead.
int64_t row_chunk(int64_t vocab) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(vocab, 1)); }

template <int DT, int DIV>
void forward_impl(const ForwardArgs& args) {
  const float inv_temperature = static_cast<float>(1.0 / args.temperature);
  const DivParams prm = make_div_params(args.beta, args.alpha);
  const int64_t chunk = row_chunk(args.vocab);
#pragma omp parallel for schedule(dynamic, chunk) num_threads(thread_count(args.num_threads))
  for (int64_t row = 0; row < args.n_rows; ++row) {
    const RowPlan plan = plan_row(args.labels, args.weight, args.ignore_index, DIV, row);
    alignas(64) float top_storage[2 * kMaxCandidates];
    TopValues top(args.candidates, top_storage);
    TopValues* wanted = args.candidates > 0 && !plan.skip ? &top : nullptr;
    RowOut out;
    if (!plan.skip) out = forward_row<DT, DIV>(args, plan, row, inv_temperature, prm, wanted);
    if (args.candidates > 0) top.finish(args.candidate_values + row * args.candidates);
    store_opt(args.row_max, row, out.a.shift);
    store_opt(args.log_norm, row, out.a.offset);
    store_opt(args.logp, row, out.logp);
    store_opt(args.ref_logp, row, out.ref_logp);
    store_opt(args.entropy, row, out.entropy);
    // A divergence that is not finite (NaN, or +inf where the supports disagree) stores
    // div_s = NaN, so that its gradient row comes out NaN (the backward adds div_s - div_s).
    const float div = static_cast<float>(out.div);
    store_opt(args.div, row, div);
    store_opt(args.ref_row_max, row, out.b.shift);
    store_opt(args.ref_log_norm, row, out.b.offset);
    store_opt(args.div_s, row, out.div_s + double(div - div));
    if (args.ref_at_argmax != nullptr) args.ref_at_argmax[row] = out.ref_at_argmax;
  }
}

// Pass 1 over a vocabulary slice (FoldArgs): the forward's first pass with the argmax always
// tracked, merged into the row's running state in place (fold_state.h). Skipped rows fold
// the empty state, which leaves the running state as it is. DIV only selects the forward /
// reverse KL accumulators. With args.candidates the same read gathers the slice's largest
// policy logits, as forward_impl does for a whole row.
template <int DT, int DIV>
void fold_impl(const FoldArgs& args) {
  using T = typename Elem<DT>::T;
  const float inv_temperature = static_cast<float>(1.0 / args.temperature);
  const int64_t vocab = args.vocab;
  const int64_t chunk = row_chunk(vocab);
#pragma omp parallel for schedule(dynamic, chunk) num_threads(thread_count(args.num_threads))
  for (int64_t row = 0; row < args.n_rows; ++row) {
    const RowPlan plan =
        plan_row(args.labels, args.weight, args.ignore_index, args.divergence, row);
    RowState<double> st = RowState<double>::empty();
    float label_a = 0.f, label_b = 0.f;
    alignas(64) float top_storage[2 * kMaxCandidates];
    TopValues top(args.candidates, top_storage);
    if (!plan.skip && vocab > 0) {  // an empty slice's views may be null
      const T* ra = args.logits_row<T>(row);
      const T* rb = args.ref != nullptr ? args.ref_row<T>(row) : nullptr;
      const bool need_ref = rb != nullptr;
      const bool use_div = plan.use_div;
      TopValues* wanted = args.candidates > 0 ? &top : nullptr;
      st = args.ent_acc != nullptr
               ? first_pass<DT, true, DIV>(ra, rb, vocab, inv_temperature, need_ref, use_div, true, wanted)
               : first_pass<DT, false, DIV>(ra, rb, vocab, inv_temperature, need_ref, use_div, true, wanted);
      const int64_t y = slice_label(plan.label, args.v0, vocab);
      if (y >= 0) {
        label_a = Elem<DT>::load(ra[y]);
        if (need_ref) label_b = Elem<DT>::load(rb[y]);
      }
    }
    if (args.candidates > 0) top.finish(args.candidate_values + row * args.candidates);
    st.k = st.k >= 0 ? args.v0 + st.k : -1;
    merge_into_row<double>(args, row, st, label_a, label_b, 1.0 / args.temperature);
  }
}

// Pass 2 over a vocabulary slice (SweepArgs), from the whole row's final statistics; DIV is
// one of js, tv, hellinger, chi2 and alpha.
template <int DT, int DIV>
void sweep_impl(const SweepArgs& args) {
  using T = typename Elem<DT>::T;
  const float inv_temperature = static_cast<float>(1.0 / args.temperature);
  const DivParams prm = make_div_params(args.beta, args.alpha);
  const int64_t chunk = row_chunk(args.vocab);
#pragma omp parallel for schedule(dynamic, chunk) num_threads(thread_count(args.num_threads))
  for (int64_t row = 0; row < args.n_rows; ++row) {
    const RowPlan plan = plan_row(args.labels, args.weight, args.ignore_index, DIV, row);
    double value = 0.0, centred = 0.0;
    if (!plan.skip && plan.use_div && args.vocab > 0) {  // an empty slice's views may be null
      const T* ra = args.logits_row<T>(row);
      const T* rb = args.ref_row<T>(row);
      div_sums<DT, DIV>(ra, rb, args.vocab, inv_temperature,
                        LogProbShift{args.row_max[row], args.log_norm[row]},
                        LogProbShift{args.ref_row_max[row], args.ref_log_norm[row]},
                        args.ref_at_argmax[row], prm, value, centred);
    }
    args.accumulate(row, static_cast<float>(value), static_cast<float>(centred));
  }
}

// Per-row constants of the backward.
struct GradRow {
  LogProbShift sa, sb;
  float inv_temperature, centre, fprime_k, s, c, ge, gd;
  DivParams prm;
};

// g_j = [ gl (1[j = y] - p_j) - ge p_j (log p_j + H) + gd p_j (f'(t_j) - S) ] / T, with
// c = gl + ge H and the divergence term formed from the centred div_s s of RowStats:
// forward KL p_j - q_j; reverse KL p_j ((a_j - a_k) / T - (b_j - b_k) / T - s) with b_k
// taken as kl_centre(b_k), as in the forward; the others
// p_j (f'(t_j) - f'(t_k) - s) (div_centred). p_j = 0 entries (logit -inf) get exactly
// 0 from the p-weighted terms rather than 0 * -inf. This is T g_j without the label's gl
// (added once, outside the vectorised loop).
template <int DT, int DIV>
PREFOPT_INLINE float grad_elem(const typename Elem<DT>::T* ra, const typename Elem<DT>::T* rb,
                               int64_t j, const GradRow& r) {
  const float xr = (Elem<DT>::load(ra[j]) - r.sa.shift) * r.inv_temperature;
  const float lp = xr - r.sa.offset;
  const float p = fast_exp_nonpositive(lp);
  float inner = r.c + r.ge * lp;  // the p-weighted part of -g
  float g = 0.f;
  if constexpr (DIV == kForwardKL) {
    const float lq = (Elem<DT>::load(rb[j]) - r.sb.shift) * r.inv_temperature - r.sb.offset;
    g = r.gd * (p - fast_exp_nonpositive(lq));
  } else if constexpr (DIV == kReverseKL) {
    inner -= r.gd * (xr - (Elem<DT>::load(rb[j]) - r.centre) * r.inv_temperature - r.s);
  } else if constexpr (needs_second_sweep(DIV)) {
    const float lq = (Elem<DT>::load(rb[j]) - r.sb.shift) * r.inv_temperature - r.sb.offset;
    g = lp > -kInf ? r.gd * div_centred<DIV>(lp, lq, p, r.fprime_k, r.s, r.prm) : 0.f;
  }
  return g + (p > 0.f ? -p * inner : 0.f);
}

// The label's element is computed first (it is read before anything is written, as g may
// alias a) and stored last, so that the loop carries no index comparison. `guard` (0 or
// NaN, see backward_impl) is added to every element. `zero_sum` (fp32 only, zero_sum_row):
// the loop also sums the row but its maximum k, which it finds, and g_k is rewritten as
// -sum_{j != k} g_j. Kept out of line: inlined into backward_impl's row loop, gcc emits a
// longer element loop for some divergences.
template <int DT, int DIV>
__attribute__((noinline)) void backward_row(const typename Elem<DT>::T* ra, const typename Elem<DT>::T* rb,
                  typename Elem<DT>::T* rg, int64_t vocab, float inv_temperature, LogProbShift sa,
                  LogProbShift sb, float ref_at_argmax, float s, float c, float gl, float ge,
                  float gd, float guard, int64_t label, const DivParams& prm, bool zero_sum) {
  float fprime_k = 0.f;
  if constexpr (needs_second_sweep(DIV))
    fprime_k = div_fprime<DIV>(-sa.offset, lq_at_argmax(ref_at_argmax, sb, inv_temperature), prm);
  const GradRow r{sa, sb, inv_temperature, kl_centre(ref_at_argmax), fprime_k, s, c, ge, gd, prm};
  const float g_label =
      label >= 0 ? (grad_elem<DT, DIV>(ra, rb, label, r) + gl) * inv_temperature + guard : 0.f;
  // k + 1 summed over the row's maxima: k + 1 where the row is peaked. A float, as row_sum (exact
  // below 2^24 columns, zero_sum_row): gcc's AVX-512 code for an int64 sum beside a float one in
  // one simd reduction came out wrong.
  float row_sum = 0.f, top = 0.f;
  for (int64_t c0 = 0; c0 < vocab; c0 += kBlock) {
    const int64_t end = std::min(c0 + kBlock, vocab);
    prefetch_block<DT>(ra, c0, vocab);
    if constexpr (DIV != kNoDivergence) prefetch_block<DT>(rb, c0, vocab);
    if constexpr (DT == kFloat32) {
      if (zero_sum) {
#pragma omp simd reduction(+ : row_sum, top)
        for (int64_t j = c0; j < end; ++j) {
          const bool is_top = ra[j] == sa.shift;
          const float g = grad_elem<DT, DIV>(ra, rb, j, r) * inv_temperature + guard;
          rg[j] = g;
          top += is_top ? static_cast<float>(j + 1) : 0.f;
          row_sum += is_top ? 0.f : g;
        }
        continue;
      }
    }
#pragma omp simd
    for (int64_t j = c0; j < end; ++j)
      rg[j] = Elem<DT>::store(grad_elem<DT, DIV>(ra, rb, j, r) * inv_temperature + guard);
  }
  const int64_t k = static_cast<int64_t>(top) - 1;  // the row's one maximum where zero_sum
  if (label >= 0) {
    // The loop's sum holds the label's element without its gl term.
    if constexpr (DT == kFloat32) {
      if (zero_sum && label != k) row_sum += g_label - rg[label];
    }
    rg[label] = Elem<DT>::store(g_label);
  }
  if constexpr (DT == kFloat32) {
    if (zero_sum && k >= 0) rg[k] = guard - row_sum;  // the guard, for a row of one entry
  }
}

// A fresh gradient buffer (torch.empty of N x V) is untouched memory: every 4 KiB page
// faults on first write and the kernel zeroes it, which costs as much as the backward's
// own arithmetic. Asking for transparent huge pages makes that one fault per 2 MiB. Only
// advice: without THP (or on a populated buffer) nothing changes.
void advise_huge_pages(void* base, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < int64_t(4 * kHuge)) return;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(base) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(base) + uintptr_t(bytes)) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)base;
  (void)bytes;
#endif
}

// DIV is the call's divergence; a row without its term, or without an upstream gradient for
// it, runs the kNoDivergence loop.
template <int DT, int DIV>
void backward_impl(const BackwardArgs& args) {
  using T = typename Elem<DT>::T;
  if (args.vocab == 0) return;  // an empty slice: nothing to write, views may be null
  if (args.grad != args.logits && args.n_rows > 0) {
    const int64_t last = row_offset(args.n_rows - 1, args.tokens, args.grad_batch_stride,
                                    args.grad_token_stride);
    advise_huge_pages(args.grad, (last + args.vocab) * int64_t(sizeof(T)));
  }
  const float inv_temperature = static_cast<float>(1.0 / args.temperature);
  const DivParams prm = make_div_params(args.beta, args.alpha);
  const int64_t vocab = args.vocab;
  const int64_t chunk = row_chunk(vocab);
  // NaN policy: a non-skipped row gets log_norm - log_norm added to every element (NaN when
  // its logits hold a NaN or +inf), and where the divergence term is active div_s - div_s
  // (NaN when the divergence was not finite: a NaN/+inf reference or disagreeing supports).
#pragma omp parallel for schedule(dynamic, chunk) num_threads(thread_count(args.num_threads))
  for (int64_t row = 0; row < args.n_rows; ++row) {
    T* rg = args.grad_row<T>(row);
    const RowPlan plan = plan_row(args.labels, args.weight, args.ignore_index, DIV, row);
    const float gl = (args.grad_logp != nullptr && plan.label >= 0) ? args.grad_logp[row] : 0.f;
    const float ge = args.grad_entropy != nullptr ? args.grad_entropy[row] : 0.f;
    float gd = args.grad_div != nullptr ? args.grad_div[row] : 0.f;
    const bool use_div = plan.use_div && args.ref != nullptr && gd != 0.f;
    if (!use_div) gd = 0.f;
    const float s = use_div ? args.div_s[row] : 0.f;
    const float guard = plan.skip ? 0.f : (args.log_norm[row] - args.log_norm[row]) + (s - s);
    if (plan.skip || (gl == 0.f && ge == 0.f && gd == 0.f)) {
      const T fill = Elem<DT>::store(guard);
#pragma omp simd
      for (int64_t j = 0; j < vocab; ++j) rg[j] = fill;
      continue;
    }
    const T* ra = args.logits_row<T>(row);
    const LogProbShift sa{args.row_max[row], args.log_norm[row]};
    const float h = ge != 0.f ? args.entropy[row] : 0.f;
    const float c = gl + ge * h;
    const int64_t label = slice_label(plan.label, args.v0, vocab);
    const bool zero_sum = zero_sum_row(DT == kFloat32 && args.whole_row != 0, vocab, sa.offset);
    if constexpr (DIV != kNoDivergence) {
      if (use_div) {
        const T* rb = args.ref_row<T>(row);
        const LogProbShift sb{args.ref_row_max[row], args.ref_log_norm[row]};
        const float ref_at_argmax = is_centred(DIV) ? args.ref_at_argmax[row] : 0.f;
        backward_row<DT, DIV>(ra, rb, rg, vocab, inv_temperature, sa, sb, ref_at_argmax, s, c, gl,
                              ge, gd, guard, label, prm, zero_sum);
        continue;
      }
    }
    backward_row<DT, kNoDivergence>(ra, nullptr, rg, vocab, inv_temperature, sa,
                                    LogProbShift{0.f, 0.f}, 0.f, 0.f, c, gl, ge, 0.f, guard, label,
                                    prm, zero_sum);
  }
}

}  // namespace

void forward(const ForwardArgs& args) {
  PREFOPT_DISPATCH_DTYPE(
      args.dtype, DT,
      PREFOPT_DISPATCH_DIVERGENCE(args.divergence, DIV, forward_impl<DT, DIV>(args)));
}

void backward(const BackwardArgs& args) {
  PREFOPT_DISPATCH_DTYPE(
      args.dtype, DT,
      PREFOPT_DISPATCH_DIVERGENCE(args.divergence, DIV, backward_impl<DT, DIV>(args)));
}

// Only forward and reverse KL change the first pass: the other codes share one instantiation.
void fold(const FoldArgs& args) {
  PREFOPT_DISPATCH_DTYPE(
      args.dtype, DT,
      PREFOPT_DISPATCH_DIVERGENCE(args.divergence, DIV,
                                  fold_impl<DT, first_pass_divergence(DIV)>(args)));
}

void sweep(const SweepArgs& args) {
  PREFOPT_DISPATCH_DTYPE(
      args.dtype, DT,
      PREFOPT_DISPATCH_DIVERGENCE(args.divergence, DIV,
                                  if constexpr (needs_second_sweep(DIV)) sweep_impl<DT, DIV>(args);
                                  else throw std::invalid_argument(
                                      "prefopt: sweep is for js, tv, hellinger, chi2 and alpha")));
}

// The finishing entry points read a few floats per row: OpenMP work items of this many rows.
constexpr int64_t kFinishChunk = 4096;

// In double, as the forward's own log_norm (finalize_state.h).
void finalize(const FinalizeArgs& args) {
  const double inv_temperature = 1.0 / args.temperature;
#pragma omp parallel for schedule(static, kFinishChunk) num_threads(thread_count(args.num_threads))
  for (int64_t row = 0; row < args.n_rows; ++row) finalize_row<double>(args, row, inv_temperature);
}

void finish_sweep(const FinishSweepArgs& args) {
#pragma omp parallel for schedule(static, kFinishChunk) num_threads(thread_count(args.num_threads))
  for (int64_t row = 0; row < args.n_rows; ++row) finish_sweep_row(args, row);
}

}  // namespace PREFOPT_CPU_VARIANT
}  // namespace cpu
}  // namespace prefopt
