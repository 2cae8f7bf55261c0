// CUDA row kernels: one thread block per row (grid-stride over rows), the same math as the
// CPU kernels from the shared headers; the hot loops and block reductions are in
// row_device.cuh.
//
// Forward: every thread folds its strided share of the row, one 16-byte chunk at a time,
// into an online-softmax state (running maxima, sums of exponentials, and only the entropy
// and KL accumulators the call asks for: ENT and the divergence are template parameters),
// the block merges the states as RowStates (warp shuffles, then one warp over the per-warp
// states). For js/tv/hellinger/chi2/alpha a second sweep over the row, now read from L2, sums
// q f(t) and p (f'(t) - f'(t_k)) with both log-sum-exps known (k the policy's argmax, whose
// reference logit the merged state carries). Backward: one sweep that reads a (and b
// when the divergence term is active) and writes g, chunk by chunk, so g may alias a.
// Loads are 16 bytes wide when the rows share their alignment (the common case of
// contiguous tensors), with scalar head and tail; otherwise scalar. The js/alpha parameters
// come from make_div_params on the host; the NaN policy is the CPU kernels' (per-row
// guards log_norm - log_norm and div_s - div_s).
// Vocabulary slices (row states): fold_kernel merges the first pass's state of a slice
// [v0, v0 + vocab) into the row's running state, sweep_kernel runs the second sweep over a
// slice from the whole row's statistics and adds its sums into the running ones, and the
// backward takes v0 for the label's index; the whole row is the slice at v0 = 0, so both run
// the forward's and backward's own loops.
// Sampler-matched forwards (args.candidates > 0) run candidates_forward_kernel: the same rows,
// with each row's largest policy logits gathered by the first pass's own read
// (candidates_device.cuh); forward_kernel's code does not change.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/candidates_device.cuh"
#include "cuda/row_device.cuh"
#include "cuda/row_kernels.h"
#include "cuda/sweep_terms.h"
#include "cuda/top_candidates.h"
#include "prefopt/common.h"
#include "prefopt/divergence.h"
#include "prefopt/elem.h"
#include "prefopt/fastmath.h"
#include "prefopt/finalize_state.h"
#include "prefopt/fold_state.h"
#include "prefopt/softmax_state.h"

namespace prefopt {
namespace cuda {
namespace {

// Threads per block at most (threads_for); every kernel is compiled for two such blocks per
// SM, i.e. at most 64 registers per thread.
constexpr int kMaxThreads = 512;

// The label's position in the chunk of n elements at j0 (-1: not in it), so that the element
// loop compares it in 32 bits.
__device__ __forceinline__ int label_in_chunk(int64_t label, int64_t j0, int n) {
  const int64_t at = label - j0;
  return label >= 0 && at >= 0 && at < n ? static_cast<int>(at) : -1;
}

// The forward's first pass when it gathers no candidates (the plain forward and the folds).
struct NoCandidates {
  __device__ __forceinline__ void start_row() {}
  __device__ __forceinline__ void finish(float*) {}
  __device__ __forceinline__ void skip(float*) {}
};

// The merged first-pass state of the row under State, with `gather` offered every chunk of the
// policy's row when it gathers candidates (row_tiles), else row_state's own loop.
template <int DT, class State, bool TRACK, class Gather>
__device__ __forceinline__ RowState<float> read_row(const typename Elem<DT>::T* ra,
                                                    const typename Elem<DT>::T* rb, int64_t vocab,
                                                    float inv_temperature, RowState<float>* scratch,
                                                    Gather& gather) {
  if constexpr (std::is_same<Gather, NoCandidates>::value) {
    return row_state<DT, State, TRACK>(ra, rb, vocab, inv_temperature, scratch);
  } else {
    State st(kLog2e * inv_temperature);
    row_tiles<DT, State::kRef>(
        ra, rb, vocab,
        [&](int64_t j0, const auto& x, const auto& z, bool valid) {
          if (valid) st.add(j0, x, z);
          return gather.tile_enters(x, valid);
        },
        [&](const auto& x, bool valid) { gather.append(x, valid); });
    return block_merge<TRACK>(st.to_row_state(), inv_temperature, scratch);
  }
}

// The first pass of a row: with the reference when need_ref, and where the row has its
// divergence term (use_div) forward or reverse KL's accumulator and, for the centred
// divergences, the reference logit at the policy's argmax. ENT: the entropy accumulator.
// TRACK (vocabulary slices): the argmax's index, and its reference logit whenever the
// reference is read. `gather` sees the policy's row (NoCandidates: nothing).
template <int DT, int DIV, bool ENT, bool TRACK, class Gather>
__device__ RowState<float> first_pass(const typename Elem<DT>::T* ra,
                                      const typename Elem<DT>::T* rb, int64_t vocab,
                                      float inv_temperature, bool need_ref, bool use_div,
                                      RowState<float>* scratch, Gather& gather) {
  if (!need_ref)
    return read_row<DT, ThreadState<false, ENT, kNoDivergence, false, TRACK>, TRACK>(
        ra, rb, vocab, inv_temperature, scratch, gather);
  constexpr int kAcc = first_pass_divergence(DIV);
  constexpr bool kCentre = is_centred(DIV);
  if constexpr (kAcc != kNoDivergence || kCentre) {
    if (use_div)
      return read_row<DT, ThreadState<true, ENT, kAcc, kCentre || TRACK, TRACK>, TRACK>(
          ra, rb, vocab, inv_temperature, scratch, gather);
  }
  return read_row<DT, ThreadState<true, ENT, kNoDivergence, TRACK, TRACK>, TRACK>(
      ra, rb, vocab, inv_temperature, scratch, gather);
}

// The first pass without candidates (the plain forward and the folds).
template <int DT, int DIV, bool ENT, bool TRACK>
__device__ RowState<float> first_pass(const typename Elem<DT>::T* ra,
                                      const typename Elem<DT>::T* rb, int64_t vocab,
                                      float inv_temperature, bool need_ref, bool use_div,
                                      RowState<float>* scratch) {
  NoCandidates none;
  return first_pass<DT, DIV, ENT, TRACK>(ra, rb, vocab, inv_temperature, need_ref, use_div,
                                         scratch, none);
}

// The second sweep for js/tv/hellinger/chi2/alpha: block sums of q f(t) and of
// p (f'(t) - f'(t_k)) over the row (or slice), given the whole row's shifts and the reference
// logit ref_at_argmax at the policy's argmax k; every thread gets them. `scratch` holds 64
// floats. The terms come from base-2 log-probabilities (sweep_terms.h),
// log2 p = (a - shift) log2(e) / T - offset log2(e) and log2 q alike: one FMA each.
template <int DT, int DIV>
__device__ void div_sums(const typename Elem<DT>::T* ra, const typename Elem<DT>::T* rb,
                         int64_t vocab, float inv_temperature, LogProbShift sa, LogProbShift sb,
                         float ref_at_argmax, const DivParams& prm, float& value, float& centred,
                         float* scratch) {
  const float scale = kLog2e * inv_temperature;
  const float off_a = sa.offset * kLog2e;
  const float off_b = sb.offset * kLog2e;
  float sq = 0.f, sp = 0.f;
  if constexpr (DIV == kJS) {
    // Read the main side (sweep_terms.h) as the first row.
    const bool q_main = prm.js_q_main > 0.f;
    // log2 p_k = -offset log2(e) as the loop forms it (a_k = shift).
    const JsSweepConsts c =
        js_sweep_consts(prm, -off_a, fmaf(ref_at_argmax - sb.shift, scale, -off_b));
    const float shift_main = q_main ? sb.shift : sa.shift;
    const float shift_other = q_main ? sa.shift : sb.shift;
    const float off_main = q_main ? off_b : off_a;
    const float off_other = q_main ? off_a : off_b;
    JsSums sums{0.f, 0.f, 0.f, 0.f};
    row_chunks<DT, true, false>(q_main ? rb : ra, q_main ? ra : rb, nullptr, vocab,
                                [&](int64_t, const auto& x, const auto& z, auto&) {
      constexpr int N = sizeof(x) / sizeof(float);
#pragma unroll
      for (int i = 0; i < N; ++i)
        js_term(fmaf(x[i] - shift_main, scale, -off_main),
                fmaf(z[i] - shift_other, scale, -off_other), c, sums);
    });
    js_finish(sums, c, q_main, prm.one_minus_beta, sq, sp);
  } else {
    const float lq_k = lq_at_argmax(ref_at_argmax, sb, inv_temperature);
    const SweepConsts c = sweep_consts<DIV>(div_fprime<DIV>(-sa.offset, lq_k, prm), prm, inv_temperature,
                                            ref_at_argmax, sb.shift);
    // log2 q = (b - ref_centre) scale - off_bc.
    const float off_bc = fmaf(sb.shift - c.ref_centre, scale, off_b);
    row_chunks<DT, true, false>(ra, rb, nullptr, vocab,
                                [&](int64_t, const auto& x, const auto& z, auto&) {
      constexpr int N = sizeof(x) / sizeof(float);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float xs = x[i] - sa.shift;
        const float zs = z[i] - c.ref_centre;
        const float ap = fmaf(xs, scale, -off_a);
        const float aq = fmaf(zs, scale, -off_bc);
        sweep_term<DIV>(ap, aq, ex2(ap), ex2(aq), zs - xs, c, sq, sp);
      }
    });
    sweep_finish<DIV>(c, sq, sp);
  }
  block_sum2(sq, sp, scratch);
  value = sq;
  centred = sp;
}

// Thread 0's stores of the first pass's per-row outputs.
__device__ __forceinline__ void store_first_pass(const ForwardArgs& args, int64_t row,
                                                 LogProbShift sa, LogProbShift sb, float logp,
                                                 float ref_logp, float entropy) {
  args.row_max[row] = sa.shift;
  args.log_norm[row] = sa.offset;
  if (args.logp) args.logp[row] = logp;
  if (args.ref_logp) args.ref_logp[row] = ref_logp;
  if (args.entropy) args.entropy[row] = entropy;
  if (args.ref_row_max) args.ref_row_max[row] = sb.shift;
  if (args.ref_log_norm) args.ref_log_norm[row] = sb.offset;
}

// The rows of a forward; `gather` collects each row's candidates (NoCandidates: none). prm
// comes from make_div_params on the host (double arithmetic, rounded once).
template <int DT, int DIV, bool ENT, class Gather>
__device__ __forceinline__ void forward_rows(ForwardArgs args, DivParams prm,
                                             Gather& gather) {
  using T = typename Elem<DT>::T;
  __shared__ RowState<float> state_scratch[32];
  __shared__ float sum_scratch[64];
  const float inv_temperature = static_cast<float>(1.0 / args.temperature);
  const int64_t vocab = args.vocab;
  for (int64_t row = blockIdx.x; row < args.n_rows; row += gridDim.x) {
    const RowPlan plan = plan_row(args.labels, args.weight, args.ignore_index, DIV, row);
    float logp = 0.f, ref_logp = 0.f, entropy = 0.f, div = 0.f, div_s = 0.f, ref_at_argmax = 0.f;
    LogProbShift sa{0.f, 0.f}, sb{0.f, 0.f};
    if (!plan.skip) {
      const T* ra = args.logits_row<T>(row);
      const bool need_ref = args.ref != nullptr && (plan.use_div || args.want_ref_logp);
      const T* rb = need_ref ? args.ref_row<T>(row) : ra;
      gather.start_row();
      const RowState<float> st = first_pass<DT, DIV, ENT, false>(
          ra, rb, vocab, inv_temperature, need_ref, plan.use_div, state_scratch, gather);
      gather.finish(args.candidate_values + row * args.candidates);
      sa = shift_a(st);
      if constexpr (ENT) entropy = state_entropy(st);
      if (need_ref) sb = shift_b(st);
      if (plan.use_div && is_centred(DIV)) ref_at_argmax = st.ref_at_argmax;
      if (plan.label >= 0) {
        if (plan.label < vocab) {
          logp = (Elem<DT>::load(ra[plan.label]) - sa.shift) * inv_temperature - sa.offset;
          if (need_ref)
            ref_logp = (Elem<DT>::load(rb[plan.label]) - sb.shift) * inv_temperature - sb.offset;
        } else {  // an unchecked label (graph capture skips the check) must not read out of bounds
          logp = ref_logp = __int_as_float(0x7fc00000);
        }
      }
      // NaN policy (see the CPU kernels): log_norm - log_norm is NaN exactly when the row
      // holds a NaN or +inf; a divergence that is not finite stores div_s = NaN.
      const float guard_a = sa.offset - sa.offset;
      const float guard_b = sb.offset - sb.offset;
      // The per-row outputs of the first pass leave before the second sweep, so that none of
      // them (nor the label) stays live through its loop.
      if (threadIdx.x == 0) store_first_pass(args, row, sa, sb, logp + guard_a, ref_logp + guard_b,
                                             entropy + guard_a);
      if (plan.use_div) {
        if constexpr (DIV == kForwardKL) {
          div = state_forward_kl(st);
          div_s = -1.f;
        } else if constexpr (DIV == kReverseKL) {
          div = state_reverse_kl(st, inv_temperature);
          div_s = state_reverse_kl_s(st);
        } else if constexpr (needs_second_sweep(DIV)) {
          // S centred at the policy's argmax k: sum p (f'(t) - f'(t_k)).
          div_sums<DT, DIV>(ra, rb, vocab, inv_temperature, sa, sb, ref_at_argmax, prm, div, div_s,
                            sum_scratch);
        }
        div += guard_a + guard_b;
        div_s += div - div;
      }
    } else {
      gather.skip(args.candidate_values + row * args.candidates);
      if (threadIdx.x == 0) store_first_pass(args, row, sa, sb, logp, ref_logp, entropy);
    }
    if (threadIdx.x == 0) {
      if (args.div) args.div[row] = div;
      if (args.div_s) args.div_s[row] = div_s;
      if (args.ref_at_argmax) args.ref_at_argmax[row] = ref_at_argmax;
    }
  }
}

template <int DT, int DIV, bool ENT>
__global__ void __launch_bounds__(kMaxThreads, 2) forward_kernel(ForwardArgs args, DivParams prm) {
  NoCandidates none;
  forward_rows<DT, DIV, ENT>(args, prm, none);
}

// The forward that also writes each row's args.candidates largest policy logits
// (candidates_device.cuh). At most kCandidateThreads threads, so that the first pass keeps its
// registers across the gathering's calls: three blocks per SM at up to 80 registers.
template <int DT, int DIV, bool ENT>
__global__ void __launch_bounds__(kCandidateThreads, 3)
    candidates_forward_kernel(ForwardArgs args, DivParams prm) {
  CandidateGather gather(static_cast<int>(args.candidates),
                         static_cast<int>(blockDim.x) * (16 / static_cast<int>(sizeof(typename Elem<DT>::T))));
  forward_rows<DT, DIV, ENT>(args, prm, gather);
}

// First pass over a vocabulary slice (FoldArgs): the forward's row state with the argmax as
// a global index, merged by thread 0 into the row's running state in place (fold_state.h).
// DIV only selects the forward / reverse KL accumulators; ENT the entropy accumulator
// (ent_acc asked for).
template <int DT, int DIV, bool ENT>
__global__ void __launch_bounds__(kMaxThreads, 2) fold_kernel(FoldArgs args) {
  using T = typename Elem<DT>::T;
  __shared__ RowState<float> state_scratch[32];
  const float inv_temperature = static_cast<float>(1.0 / args.temperature);
  const int64_t vocab = args.vocab;
  for (int64_t row = blockIdx.x; row < args.n_rows; row += gridDim.x) {
    const RowPlan plan =
        plan_row(args.labels, args.weight, args.ignore_index, args.divergence, row);
    RowState<float> st = RowState<float>::empty();
    float label_a = 0.f, label_b = 0.f;
    const bool need_ref = args.ref != nullptr;
    if (!plan.skip && vocab > 0) {  // an empty slice's views may be null
      const T* ra = args.logits_row<T>(row);
      const T* rb = need_ref ? args.ref_row<T>(row) : ra;
      st = first_pass<DT, DIV, ENT, true>(ra, rb, vocab, inv_temperature, need_ref,
                                          plan.use_div, state_scratch);
      const int64_t y = slice_label(plan.label, args.v0, vocab);
      if (threadIdx.x == 0 && y >= 0) {
        label_a = Elem<DT>::load(ra[y]);
        if (need_ref) label_b = Elem<DT>::load(rb[y]);
      }
    }
    if (threadIdx.x == 0) {
      const bool found = st.ma > -kInf;
      st.k = found ? args.v0 + st.k : -1;
      st.ref_at_argmax = found ? st.ref_at_argmax : 0.f;
      merge_into_row<float>(args, row, st, label_a, label_b, inv_temperature);
    }
  }
}

// Second sweep over a vocabulary slice (SweepArgs), DIV one of js/tv/hellinger/chi2/alpha; its
// sums are added into the running ones (SweepArgs::accumulate).
template <int DT, int DIV>
__global__ void __launch_bounds__(kMaxThreads, 2) sweep_kernel(SweepArgs args, DivParams prm) {
  using T = typename Elem<DT>::T;
  __shared__ float sum_scratch[64];
  const float inv_temperature = static_cast<float>(1.0 / args.temperature);
  for (int64_t row = blockIdx.x; row < args.n_rows; row += gridDim.x) {
    const RowPlan plan = plan_row(args.labels, args.weight, args.ignore_index, DIV, row);
    float value = 0.f, centred = 0.f;
    // Uniform over the block (div_sums synchronises); an empty slice's views may be null.
    if (!plan.skip && plan.use_div && args.vocab > 0) {
      const T* ra = args.logits_row<T>(row);
      const T* rb = args.ref_row<T>(row);
      div_sums<DT, DIV>(ra, rb, args.vocab, inv_temperature,
                        LogProbShift{args.row_max[row], args.log_norm[row]},
                        LogProbShift{args.ref_row_max[row], args.ref_log_norm[row]},
                        args.ref_at_argmax[row], prm, value, centred, sum_scratch);
    }
    if (threadIdx.x == 0) args.accumulate(row, value, centred);
  }
}

// One element's share of a zero-sum row (zero_sum_row): column + 1 into `top` where the
// logit is the row's maximum (exact as a float below 2^24 columns; only read where the maximum
// is unique), its stored gradient into the thread's row sum elsewhere.
template <bool ZERO_SUM>
__device__ __forceinline__ void tally_zero_sum(float& row_sum, float& top, float g, float x,
                                               float row_max, int64_t column) {
  if constexpr (ZERO_SUM) {
    const bool is_top = x == row_max;
    top += is_top ? static_cast<float>(column + 1) : 0.f;
    row_sum += is_top ? 0.f : g;
  }
}

// g_j = [ gl (1[j = y] - p_j) - ge p_j (log p_j + H) + gd p_j (f'(t_j) - S) ] / T with
// c = gl + ge H and the centred div_s s (see the CPU kernels); DIV_ROW is the divergence of
// this row (none when it has no divergence term). ZERO_SUM (a row that takes the zero-sum
// rewrite, zero_sum_row) also tallies this thread's share of it into row_sum and top.
template <int DT, int DIV_ROW, bool ZERO_SUM>
__device__ __forceinline__ void backward_row(const typename Elem<DT>::T* ra,
                                             const typename Elem<DT>::T* rb,
                                             typename Elem<DT>::T* rg, int64_t vocab,
                                             float inv_temperature, LogProbShift sa,
                                             LogProbShift sb, float ref_at_argmax, float s,
                                             float c, float gl, float ge, float gd, float guard,
                                             int64_t label, const DivParams& prm, float& row_sum,
                                             float& top) {
  constexpr bool kRef = DIV_ROW != kNoDivergence;
  float fprime_k = 0.f;
  if constexpr (needs_second_sweep(DIV_ROW)) {
    const float lq_k = lq_at_argmax(ref_at_argmax, sb, inv_temperature);
    fprime_k = div_fprime<DIV_ROW>(-sa.offset, lq_k, prm);
  }
  // p = 2^((a - shift) log2(e) / T) exp(-offset) on the MUFU unit, q alike (see div_sums).
  const float scale = kLog2e * inv_temperature;
  if constexpr (DIV_ROW == kAlpha) {
    // From base-2 log-probabilities as in div_sums (sweep_terms.h): g = gd / (a-1) C -
    // p (ge lp + c + gd s) with C the centred term times a - 1.
    const float off_a = sa.offset * kLog2e;
    const float off_b = sb.offset * kLog2e;
    const SweepConsts k = sweep_consts<kAlpha>(fprime_k, prm, inv_temperature, ref_at_argmax, sb.shift);
    const float off_bc = fmaf(sb.shift - k.ref_centre, scale, off_b);
    const float gd_c = gd * prm.inv_alpha_minus_one;
    const float c_s = fmaf(gd, s, c);
    row_chunks<DT, true, true>(ra, rb, rg, vocab,
                               [&](int64_t j0, const auto& x, const auto& z, auto& out) {
      constexpr int N = sizeof(x) / sizeof(float);
      const int label_at = label_in_chunk(label, j0, N);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float xs = x[i] - sa.shift;
        const float zs = z[i] - k.ref_centre;
        const float ap = fmaf(xs, scale, -off_a);
        const float aq = fmaf(zs, scale, -off_bc);
        const float p = ex2(ap);
        const float inner = fmaf(ge * kLn2, ap, c_s);
        float g = gd_c * alpha_centred(ap, p, alpha_mixed(ap, aq, ap - aq, k), zs - xs, k);
        g += p > 0.f ? -p * inner : 0.f;
        g = i == label_at ? g + gl : g;
        out[i] = fmaf(g, inv_temperature, guard);
        tally_zero_sum<ZERO_SUM>(row_sum, top, out[i], x[i], sa.shift, j0 + i);
      }
    });
    return;
  }
  if constexpr (DIV_ROW == kJS) {
    // From base-2 log-probabilities as the js sweep forms them (sweep_terms.h): g =
    // gd (1 - beta) ln2 p G - p (ge lp + c + gd s), G = js_fprime_gap.
    const float off_a = sa.offset * kLog2e;
    const float off_b = sb.offset * kLog2e;
    const JsSweepConsts k = js_sweep_consts(prm, -off_a, fmaf(ref_at_argmax - sb.shift, scale, -off_b));
    const float gd_js = gd * (prm.one_minus_beta * kLn2);
    const float c_s = fmaf(gd, s, c);
    row_chunks<DT, true, true>(ra, rb, rg, vocab,
                               [&](int64_t j0, const auto& x, const auto& z, auto& out) {
      constexpr int N = sizeof(x) / sizeof(float);
      const int label_at = label_in_chunk(label, j0, N);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float ap = fmaf(x[i] - sa.shift, scale, -off_a);
        const float aq = fmaf(z[i] - sb.shift, scale, -off_b);
        const float p = ex2(ap);
        const float inner = fmaf(ge * kLn2, ap, c_s);
        float g = p > 0.f ? p * fmaf(gd_js, js_fprime_gap(ap, aq, k), -inner) : 0.f;
        g = i == label_at ? g + gl : g;
        out[i] = fmaf(g, inv_temperature, guard);
        tally_zero_sum<ZERO_SUM>(row_sum, top, out[i], x[i], sa.shift, j0 + i);
      }
    });
    return;
  }
  const float norm_a = fast_exp(-sa.offset);
  const float norm_b = DIV_ROW == kForwardKL ? fast_exp(-sb.offset) : 0.f;
  const float centre = kl_centre(ref_at_argmax);
  row_chunks<DT, kRef, true>(ra, rb, rg, vocab,
                             [&](int64_t j0, const auto& x, const auto& z, auto& out) {
    constexpr int N = sizeof(x) / sizeof(float);
    const int label_at = label_in_chunk(label, j0, N);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float dx = x[i] - sa.shift;
      const float xr = dx * inv_temperature;
      const float lp = xr - sa.offset;
      const float p = ex2(dx * scale) * norm_a;
      float inner = fmaf(ge, lp, c);  // the p-weighted part of -g
      float g = 0.f;
      if constexpr (DIV_ROW == kForwardKL) {
        g = gd * (p - ex2((z[i] - sb.shift) * scale) * norm_b);
      } else if constexpr (DIV_ROW == kReverseKL) {
        inner -= gd * (xr - (z[i] - centre) * inv_temperature - s);
      } else if constexpr (needs_second_sweep(DIV_ROW)) {
        const float lq = (z[i] - sb.shift) * inv_temperature - sb.offset;
        g = lp > -kInf ? gd * div_centred<DIV_ROW>(lp, lq, p, fprime_k, s, prm) : 0.f;
      }
      g += p > 0.f ? -p * inner : 0.f;
      g = i == label_at ? g + gl : g;
      out[i] = fmaf(g, inv_temperature, guard);
      tally_zero_sum<ZERO_SUM>(row_sum, top, out[i], x[i], sa.shift, j0 + i);
    }
  });
}

template <int DT, int DIV>
__global__ void __launch_bounds__(kMaxThreads, 2) backward_kernel(BackwardArgs args, DivParams prm) {
  using T = typename Elem<DT>::T;
  __shared__ float sum_scratch[64];
  const float inv_temperature = static_cast<float>(1.0 / args.temperature);
  const int64_t vocab = args.vocab;
  for (int64_t row = blockIdx.x; row < args.n_rows; row += gridDim.x) {
    T* rg = args.grad_row<T>(row);
    const RowPlan plan = plan_row(args.labels, args.weight, args.ignore_index, DIV, row);
    const float gl = (args.grad_logp != nullptr && plan.label >= 0) ? args.grad_logp[row] : 0.f;
    const float ge = args.grad_entropy != nullptr ? args.grad_entropy[row] : 0.f;
    float gd = args.grad_div != nullptr ? args.grad_div[row] : 0.f;
    const bool use_div = DIV != kNoDivergence && plan.use_div && args.ref != nullptr && gd != 0.f;
    if (!use_div) gd = 0.f;
    // NaN policy: every element of a non-skipped row gets log_norm - log_norm, and where the
    // divergence term is active div_s - div_s (both 0 or NaN).
    const float s = use_div ? args.div_s[row] : 0.f;
    const float guard = plan.skip ? 0.f : (args.log_norm[row] - args.log_norm[row]) + (s - s);
    if (plan.skip || (gl == 0.f && ge == 0.f && gd == 0.f)) {
      const T fill = Elem<DT>::store(guard);
      for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) rg[j] = fill;
      continue;
    }
    const T* ra = args.logits_row<T>(row);
    const LogProbShift sa{args.row_max[row], args.log_norm[row]};
    const float h = ge != 0.f ? args.entropy[row] : 0.f;
    const int64_t label = slice_label(plan.label, args.v0, vocab);
    float row_sum = 0.f, top = 0.f;
    const auto sweep = [&](auto zero_sum) {
      constexpr bool kZeroSum = decltype(zero_sum)::value;
      if (use_div) {
        const T* rb = args.ref_row<T>(row);
        const LogProbShift sb{args.ref_row_max[row], args.ref_log_norm[row]};
        const float ref_at_argmax = is_centred(DIV) ? args.ref_at_argmax[row] : 0.f;
        backward_row<DT, DIV, kZeroSum>(ra, rb, rg, vocab, inv_temperature, sa, sb, ref_at_argmax, s,
                                        gl + ge * h, gl, ge, gd, guard, label, prm, row_sum, top);
      } else {
        backward_row<DT, kNoDivergence, kZeroSum>(ra, ra, rg, vocab, inv_temperature, sa, sa, 0.f,
                                                  0.f, gl + ge * h, gl, ge, 0.f, guard, label, prm,
                                                  row_sum, top);
      }
    };
    // Only a peaked fp32 row of a whole-row launch tallies; every other row (half gradients,
    // slices, the rest of the rows) runs the plain sweep. Uniform over the block (one row).
    if constexpr (DT == kFloat32) {
      if (zero_sum_row(args.whole_row != 0, vocab, sa.offset)) {
        sweep(std::true_type{});
        // block_sum2's barrier orders every thread's stores before the argmax entry is
        // overwritten; the guard too, which a row of one entry has nowhere else.
        block_sum2(row_sum, top, sum_scratch);
        if (threadIdx.x == 0 && top > 0.f) rg[static_cast<int64_t>(top) - 1] = guard - row_sum;
        continue;
      }
    }
    sweep(std::false_type{});
  }
}

int threads_for(int64_t vocab) {
  return vocab >= 16384 ? kMaxThreads : (vocab >= 2048 ? 256 : 128);
}

unsigned grid_for(int64_t n_rows) {
  const int64_t cap = int64_t(1) << 20;  // rows beyond it are visited grid-stride
  return static_cast<unsigned>(n_rows < cap ? n_rows : cap);
}

// The finish of the rows' states (finalize_state.h), one thread per row, in fp32 with the
// fast_log of the forward's own log_norm.
__global__ void finalize_kernel(FinalizeArgs args) {
  const float inv_temperature = static_cast<float>(1.0 / args.temperature);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < args.n_rows;
       row += stride)
    finalize_row<float>(args, row, inv_temperature);
}

__global__ void finish_sweep_kernel(FinishSweepArgs args) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < args.n_rows;
       row += stride)
    finish_sweep_row(args, row);
}

constexpr int kFinishThreads = 256;

// Blocks of kFinishThreads rows, as many as the grid limit allows (the kernels stride).
unsigned finish_blocks(int64_t n_rows) {
  const int64_t blocks = (n_rows + kFinishThreads - 1) / kFinishThreads;
  return static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
}

// Calls f with std::true_type or std::false_type for a run-time flag.
template <class F>
void dispatch_flag(bool flag, F&& f) {
  if (flag)
    f(std::true_type{});
  else
    f(std::false_type{});
}

template <int DT, int DIV>
void launch_forward(const ForwardArgs& a, cudaStream_t s) {
  const int threads = threads_for(a.vocab);
  const DivParams prm = make_div_params(a.beta, a.alpha);
  dispatch_flag(a.entropy != nullptr, [&](auto ent) {
    if (a.candidates > 0) {
      candidates_forward_kernel<DT, DIV, decltype(ent)::value>
          <<<grid_for(a.n_rows), threads < kCandidateThreads ? threads : kCandidateThreads, 0, s>>>(
              a, prm);
    } else {
      forward_kernel<DT, DIV, decltype(ent)::value><<<grid_for(a.n_rows), threads, 0, s>>>(a, prm);
    }
  });
}

template <int DT, int DIV>
void launch_backward(const BackwardArgs& a, cudaStream_t s) {
  backward_kernel<DT, DIV><<<grid_for(a.n_rows), threads_for(a.vocab), 0, s>>>(
      a, make_div_params(a.beta, a.alpha));
}

template <int DT, int DIV>
void launch_fold(const FoldArgs& a, cudaStream_t s) {
  dispatch_flag(a.ent_acc != nullptr, [&](auto ent) {
    fold_kernel<DT, DIV, decltype(ent)::value>
        <<<grid_for(a.n_rows), threads_for(a.vocab), 0, s>>>(a);
  });
}

template <int DT, int DIV>
void launch_sweep(const SweepArgs& a, cudaStream_t s) {
  sweep_kernel<DT, DIV><<<grid_for(a.n_rows), threads_for(a.vocab), 0, s>>>(
      a, make_div_params(a.beta, a.alpha));
}

// Only forward and reverse KL change the first pass: the other codes share one kernel.
template <int DT>
void fold_dt(const FoldArgs& a, cudaStream_t s) {
  PREFOPT_DISPATCH_DIVERGENCE(
      a.divergence, DIV,
      launch_fold<DT, first_pass_divergence(DIV)>(a, s));
}

template <int DT>
void sweep_dt(const SweepArgs& a, cudaStream_t s) {
  PREFOPT_DISPATCH_DIVERGENCE(a.divergence, DIV,
                              if constexpr (needs_second_sweep(DIV)) launch_sweep<DT, DIV>(a, s);
                              else throw std::invalid_argument(
                                  "prefopt: sweep is for js, tv, hellinger, chi2 and alpha"));
}

template <int DT>
void forward_dt(const ForwardArgs& a, cudaStream_t s) {
  PREFOPT_DISPATCH_DIVERGENCE(a.divergence, DIV, launch_forward<DT, DIV>(a, s));
}

template <int DT>
void backward_dt(const BackwardArgs& a, cudaStream_t s) {
  PREFOPT_DISPATCH_DIVERGENCE(a.divergence, DIV, launch_backward<DT, DIV>(a, s));
}

const char* launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* forward(const ForwardArgs& args, void* stream) {
  if (args.candidates < 0 || args.candidates > kMaxCandidates)
    throw std::invalid_argument("prefopt: candidates must be in [0, kMaxCandidates]");
  if (args.n_rows == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  PREFOPT_DISPATCH_DTYPE(args.dtype, DT, forward_dt<DT>(args, s));
  return launch_error();
}

const char* backward(const BackwardArgs& args, void* stream) {
  if (args.n_rows == 0 || args.vocab == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  PREFOPT_DISPATCH_DTYPE(args.dtype, DT, backward_dt<DT>(args, s));
  return launch_error();
}

const char* fold(const FoldArgs& args, void* stream) {
  if (args.n_rows == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  PREFOPT_DISPATCH_DTYPE(args.dtype, DT, fold_dt<DT>(args, s));
  return launch_error();
}

const char* sweep(const SweepArgs& args, void* stream) {
  if (args.n_rows == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  PREFOPT_DISPATCH_DTYPE(args.dtype, DT, sweep_dt<DT>(args, s));
  return launch_error();
}

const char* finalize(const FinalizeArgs& args, void* stream) {
  if (args.n_rows == 0) return nullptr;
  finalize_kernel<<<finish_blocks(args.n_rows), kFinishThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return launch_error();
}

const char* finish_sweep(const FinishSweepArgs& args, void* stream) {
  if (args.n_rows == 0) return nullptr;
  finish_sweep_kernel<<<finish_blocks(args.n_rows), kFinishThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      args);
  return launch_error();
}

}  // namespace cuda
}  // namespace prefopt
