// CUDA row kernels: one thread block per row (grid-stride over rows), the same math as the
// CPU kernels from the shared headers.
//
// Forward: every thread folds its strided share of the row into a RowState (online
// softmax: running maxima, sums of exponentials, entropy and KL accumulators), the block
// merges the states (warp shuffles, then one warp over the per-warp states). For
// js/tv/hellinger/chi2/alpha a second sweep over the row, now read from L2, sums
// q f(t) and p (f'(t) - f'(t_k)) with both log-sum-exps known (k the policy's argmax, whose
// reference logit the merged state carries). Backward: one sweep that reads a (and b
// when the divergence term is active) and writes g, element by element, so g may alias a.
// Loads are 16 bytes wide when the rows share their alignment (the common case of
// contiguous tensors), with scalar head and tail; otherwise scalar. The js/alpha parameters
// come from make_div_params on the host; the NaN policy is the CPU kernels' (per-row
// guards log_norm - log_norm and div_s - div_s).
// Vocabulary slices (row states): fold_kernel merges the first pass's state of a slice
// [v0, v0 + vocab) into the row's running state, sweep_kernel runs the second sweep over a slice from the whole
// row's statistics, and the backward takes v0 for the label's index; the whole row is the
// slice at v0 = 0, so both run the forward's and backward's own loops.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/row_kernels.h"
#include "prefopt/common.h"
#include "prefopt/divergence.h"
#include "prefopt/elem.h"
#include "prefopt/fastmath.h"
#include "prefopt/fold_state.h"
#include "prefopt/softmax_state.h"

namespace prefopt {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// Element `i` (0 <= i < 16 / sizeof(T)) of a 16-byte vector.
template <int DT>
__device__ __forceinline__ float unpack(const uint4& v, int i) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  if constexpr (DT == kFloat32) {
    return bits_to_float(w[i]);
  } else {
    const uint32_t word = w[i >> 1];
    return Elem<DT>::load(static_cast<uint16_t>((i & 1) ? word >> 16 : word & 0xffffu));
  }
}

template <int DT>
__device__ __forceinline__ void pack(uint4& v, int i, float g) {
  uint32_t* w = reinterpret_cast<uint32_t*>(&v);
  if constexpr (DT == kFloat32) {
    w[i] = float_to_bits(g);
  } else {
    const uint32_t h = Elem<DT>::store(g);
    w[i >> 1] = (i & 1) ? ((w[i >> 1] & 0xffffu) | (h << 16)) : ((w[i >> 1] & 0xffff0000u) | h);
  }
}

// Calls f(j, a_j, b_j) for this thread's share of the row (raw logits in fp32; b = 0
// without REF). With STORE, f's return value is written to rg[j] in the element type. The
// 16-byte path runs when every row pointer used has the same offset modulo 16.
template <int DT, bool REF, bool STORE, class F>
__device__ __forceinline__ void row_loop(const typename Elem<DT>::T* ra,
                                         const typename Elem<DT>::T* rb,
                                         typename Elem<DT>::T* rg, int64_t vocab, F&& f) {
  using T = typename Elem<DT>::T;
  constexpr int kVec = 16 / sizeof(T);
  const int64_t tid = threadIdx.x;
  const int64_t nth = blockDim.x;
  const uintptr_t off = reinterpret_cast<uintptr_t>(ra) % 16;
  const bool vec = (!REF || reinterpret_cast<uintptr_t>(rb) % 16 == off) &&
                   (!STORE || reinterpret_cast<uintptr_t>(rg) % 16 == off) && off % sizeof(T) == 0;
  const int64_t head_len = vec ? static_cast<int64_t>(((16 - off) % 16) / sizeof(T)) : vocab;
  const int64_t head = head_len < vocab ? head_len : vocab;
  auto scalar = [&](int64_t j) {
    const float x = Elem<DT>::load(ra[j]);
    const float z = REF ? Elem<DT>::load(rb[j]) : 0.f;
    const float g = f(j, x, z);
    if constexpr (STORE) rg[j] = Elem<DT>::store(g);
  };
  for (int64_t j = tid; j < head; j += nth) scalar(j);
  if (!vec) return;
  const int64_t n_vec = (vocab - head) / kVec;
  const uint4* va = reinterpret_cast<const uint4*>(ra + head);
  const uint4* vb = reinterpret_cast<const uint4*>(REF ? rb + head : ra + head);
  uint4* vg = reinterpret_cast<uint4*>(STORE ? rg + head : nullptr);
  for (int64_t k = tid; k < n_vec; k += nth) {
    const uint4 A = va[k];
    uint4 B = A;
    if constexpr (REF) B = vb[k];
    uint4 G = A;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float x = unpack<DT>(A, i);
      const float z = REF ? unpack<DT>(B, i) : 0.f;
      const float g = f(head + k * kVec + i, x, z);
      if constexpr (STORE) pack<DT>(G, i, g);
    }
    if constexpr (STORE) vg[k] = G;
  }
  for (int64_t j = head + n_vec * kVec + tid; j < vocab; j += nth) scalar(j);
}

// TRACK: carry the argmax index k; without it k stays -1, a constant the compiler folds away
// (the whole-row forward, which needs no index, keeps its registers).
template <bool TRACK>
__device__ __forceinline__ void warp_merge(RowState<float>& s, float inv_temperature) {
#pragma unroll
  for (int lane_mask = 16; lane_mask > 0; lane_mask >>= 1) {
    RowState<float> o;
    o.ma = __shfl_xor_sync(kFullMask, s.ma, lane_mask);
    o.sa = __shfl_xor_sync(kFullMask, s.sa, lane_mask);
    o.ua = __shfl_xor_sync(kFullMask, s.ua, lane_mask);
    o.mb = __shfl_xor_sync(kFullMask, s.mb, lane_mask);
    o.sb = __shfl_xor_sync(kFullMask, s.sb, lane_mask);
    o.wf = __shfl_xor_sync(kFullMask, s.wf, lane_mask);
    o.wr = __shfl_xor_sync(kFullMask, s.wr, lane_mask);
    o.ref_at_argmax = __shfl_xor_sync(kFullMask, s.ref_at_argmax, lane_mask);
    o.k = TRACK ? __shfl_xor_sync(kFullMask, s.k, lane_mask) : int64_t(-1);
    merge_state(s, o, inv_temperature);
  }
}

// Merged state of the whole block; every thread gets it. `scratch` holds 32 states.
template <bool TRACK>
__device__ RowState<float> block_merge(RowState<float> s, float inv_temperature,
                                       RowState<float>* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = (blockDim.x + 31) >> 5;
  warp_merge<TRACK>(s, inv_temperature);
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  s = lane < n_warps ? scratch[lane] : RowState<float>::empty();
  warp_merge<TRACK>(s, inv_temperature);
  __syncthreads();  // scratch is reused by the next row
  return s;
}

// Block-wide sum of two floats; every thread gets them. `scratch` holds 64 floats.
__device__ void block_sum2(float& a, float& b, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) {
    a += __shfl_xor_sync(kFullMask, a, m);
    b += __shfl_xor_sync(kFullMask, b, m);
  }
  if (lane == 0) {
    scratch[warp] = a;
    scratch[32 + warp] = b;
  }
  __syncthreads();
  a = lane < n_warps ? scratch[lane] : 0.f;
  b = lane < n_warps ? scratch[32 + lane] : 0.f;
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) {
    a += __shfl_xor_sync(kFullMask, a, m);
    b += __shfl_xor_sync(kFullMask, b, m);
  }
  __syncthreads();
}

// The state of one element (raw logits x, z), merged into the thread's running state. An
// element with a -inf logit is an empty piece of that distribution; the KL term it adds is
// the +inf of a support mismatch, as in the CPU block states. A NaN or +inf logit gets the
// sum NaN (1 + (x - x)), which every merge keeps, so log_norm is NaN as on the CPU (NaN
// policy). The element is its own argmax (index k = j with TRACK, so that merges keep the
// first index of the max), so its ref_at_argmax is z, raw (merge_state centres reverse KL at
// kl_centre(z)).
template <bool REF, int DIV, bool TRACK>
__device__ __forceinline__ void push(RowState<float>& st, int64_t j, float x, float z,
                                     float inv_temperature) {
  RowState<float> e = RowState<float>::empty();
  e.ma = x;
  if constexpr (TRACK) e.k = j;
  e.sa = x == -kInf ? 0.f : 1.f + (x - x);
  if constexpr (REF) {
    e.mb = z;
    e.sb = z == -kInf ? 0.f : 1.f + (z - z);
    e.ref_at_argmax = z;
    if constexpr (DIV == kForwardKL) e.wf = (e.sb > 0.f && e.sa == 0.f) ? kInf : 0.f;
    if constexpr (DIV == kReverseKL) e.wr = (e.sa > 0.f && e.sb == 0.f) ? kInf : 0.f;
  }
  merge_state(st, e, inv_temperature);
}

// The merged state of the row (or slice); every thread gets it. With TRACK, k is the first
// index of the policy's max, but an arbitrary one when that max is -inf (callers store -1
// there); without it k = -1 and ties of the max leave ref_at_argmax to the merge order.
template <int DT, bool REF, int DIV, bool TRACK>
__device__ RowState<float> row_state(const typename Elem<DT>::T* ra,
                                     const typename Elem<DT>::T* rb, int64_t vocab,
                                     float inv_temperature, RowState<float>* scratch) {
  RowState<float> st = RowState<float>::empty();
  row_loop<DT, REF, false>(ra, rb, nullptr, vocab, [&](int64_t j, float x, float z) {
    push<REF, DIV, TRACK>(st, j, x, z, inv_temperature);
    return 0.f;
  });
  return block_merge<TRACK>(st, inv_temperature, scratch);
}

// The first pass of a row: with the reference when need_ref, and forward or reverse KL's
// accumulator when DIV is one of them and the row has its divergence term (use_div).
template <int DT, int DIV, bool TRACK>
__device__ RowState<float> first_pass(const typename Elem<DT>::T* ra,
                                      const typename Elem<DT>::T* rb, int64_t vocab,
                                      float inv_temperature, bool need_ref, bool use_div,
                                      RowState<float>* scratch) {
  if (!need_ref)
    return row_state<DT, false, kNoDivergence, TRACK>(ra, rb, vocab, inv_temperature, scratch);
  constexpr int kAcc = first_pass_divergence(DIV);
  if (kAcc != kNoDivergence && use_div)
    return row_state<DT, true, kAcc, TRACK>(ra, rb, vocab, inv_temperature, scratch);
  return row_state<DT, true, kNoDivergence, TRACK>(ra, rb, vocab, inv_temperature, scratch);
}

// The second sweep for js/tv/hellinger/chi2/alpha: block sums of q f(t) and of
// p (f'(t) - f'(t_k)) over the row (or slice), given the whole row's shifts and the reference
// logit ref_at_argmax at the policy's argmax k; every thread gets them. `scratch` holds 64
// floats.
template <int DT, int DIV>
__device__ void div_sums(const typename Elem<DT>::T* ra, const typename Elem<DT>::T* rb,
                         int64_t vocab, float inv_temperature, LogProbShift sa, LogProbShift sb,
                         float ref_at_argmax, const DivParams& prm, float& value, float& centred,
                         float* scratch) {
  const float lq_k = lq_at_argmax(ref_at_argmax, sb, inv_temperature);
  const float fprime_k = div_fprime<DIV>(-sa.offset, lq_k, prm);
  float sq = 0.f, sp = 0.f;
  row_loop<DT, true, false>(ra, rb, nullptr, vocab, [&](int64_t, float x, float z) {
    const float lp = (x - sa.shift) * inv_temperature - sa.offset;
    const float lq = (z - sb.shift) * inv_temperature - sb.offset;
    sq += div_value<DIV>(lp, lq, prm);
    const float p = fast_exp(lp);
    sp += lp > -kInf ? div_centred<DIV>(lp, lq, p, fprime_k, 0.f, prm) : 0.f;
    return 0.f;
  });
  block_sum2(sq, sp, scratch);
  value = sq;
  centred = sp;
}

// prm comes from make_div_params on the host (double arithmetic, rounded once).
template <int DT, int DIV>
__global__ void forward_kernel(ForwardArgs args, DivParams prm) {
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
      const RowState<float> st = first_pass<DT, DIV, false>(ra, rb, vocab, inv_temperature,
                                                            need_ref, plan.use_div, state_scratch);
      sa = shift_a(st);
      entropy = state_entropy(st);
      if (need_ref) sb = shift_b(st);
      if (plan.use_div) {
        if constexpr (is_centred(DIV)) ref_at_argmax = st.ref_at_argmax;
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
      }
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
      logp += guard_a;
      entropy += guard_a;
      ref_logp += guard_b;
      if (plan.use_div) {
        div += guard_a + guard_b;
        div_s += div - div;
      }
    }
    if (threadIdx.x == 0) {
      args.row_max[row] = sa.shift;
      args.log_norm[row] = sa.offset;
      if (args.logp) args.logp[row] = logp;
      if (args.ref_logp) args.ref_logp[row] = ref_logp;
      if (args.entropy) args.entropy[row] = entropy;
      if (args.div) args.div[row] = div;
      if (args.ref_row_max) args.ref_row_max[row] = sb.shift;
      if (args.ref_log_norm) args.ref_log_norm[row] = sb.offset;
      if (args.div_s) args.div_s[row] = div_s;
      if (args.ref_at_argmax) args.ref_at_argmax[row] = ref_at_argmax;
    }
  }
}

// First pass over a vocabulary slice (FoldArgs): the forward's row state with the argmax as
// a global index, merged by thread 0 into the row's running state in place (fold_state.h). DIV only selects the forward / reverse KL accumulators.
template <int DT, int DIV>
__global__ void fold_kernel(FoldArgs args) {
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
      st = first_pass<DT, DIV, true>(ra, rb, vocab, inv_temperature, need_ref, plan.use_div,
                                     state_scratch);
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

// Second sweep over a vocabulary slice (SweepArgs), DIV one of js/tv/hellinger/chi2/alpha.
template <int DT, int DIV>
__global__ void sweep_kernel(SweepArgs args, DivParams prm) {
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
    if (threadIdx.x == 0) {
      args.value_sum[row] = value;
      args.centred_sum[row] = centred;
    }
  }
}

// g_j = [ gl (1[j = y] - p_j) - ge p_j (log p_j + H) + gd p_j (f'(t_j) - S) ] / T with
// c = gl + ge H and the centred div_s s (see the CPU kernels); DIV_ROW is the divergence of
// this row (none when it has no divergence term).
template <int DT, int DIV_ROW>
__device__ __forceinline__ void backward_row(const typename Elem<DT>::T* ra,
                                             const typename Elem<DT>::T* rb,
                                             typename Elem<DT>::T* rg, int64_t vocab,
                                             float inv_temperature, LogProbShift sa,
                                             LogProbShift sb, float ref_at_argmax, float s,
                                             float c, float gl, float ge, float gd, float guard,
                                             int64_t label, const DivParams& prm) {
  constexpr bool kRef = DIV_ROW != kNoDivergence;
  float fprime_k = 0.f;
  if constexpr (needs_second_sweep(DIV_ROW)) {
    const float lq_k = lq_at_argmax(ref_at_argmax, sb, inv_temperature);
    fprime_k = div_fprime<DIV_ROW>(-sa.offset, lq_k, prm);
  }
  row_loop<DT, kRef, true>(ra, rb, rg, vocab, [&](int64_t j, float x, float z) {
    const float xr = (x - sa.shift) * inv_temperature;
    const float lp = xr - sa.offset;
    const float p = fast_exp(lp);
    float inner = c + ge * lp;  // the p-weighted part of -g
    float g = 0.f;
    if constexpr (DIV_ROW == kForwardKL) {
      g = gd * (p - fast_exp((z - sb.shift) * inv_temperature - sb.offset));
    } else if constexpr (DIV_ROW == kReverseKL) {
      inner -= gd * (xr - (z - kl_centre(ref_at_argmax)) * inv_temperature - s);
    } else if constexpr (needs_second_sweep(DIV_ROW)) {
      const float lq = (z - sb.shift) * inv_temperature - sb.offset;
      g = lp > -kInf ? gd * div_centred<DIV_ROW>(lp, lq, p, fprime_k, s, prm) : 0.f;
    }
    g += p > 0.f ? -p * inner : 0.f;
    g = j == label ? g + gl : g;
    return g * inv_temperature + guard;
  });
}

template <int DT, int DIV>
__global__ void backward_kernel(BackwardArgs args, DivParams prm) {
  using T = typename Elem<DT>::T;
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
    if (use_div) {
      const T* rb = args.ref_row<T>(row);
      const LogProbShift sb{args.ref_row_max[row], args.ref_log_norm[row]};
      const float ref_at_argmax = is_centred(DIV) ? args.ref_at_argmax[row] : 0.f;
      backward_row<DT, DIV>(ra, rb, rg, vocab, inv_temperature, sa, sb, ref_at_argmax, s,
                            gl + ge * h, gl, ge, gd, guard, label, prm);
    } else {
      backward_row<DT, kNoDivergence>(ra, ra, rg, vocab, inv_temperature, sa, sa, 0.f, 0.f,
                                      gl + ge * h, gl, ge, 0.f, guard, label, prm);
    }
  }
}

int threads_for(int64_t vocab) { return vocab >= 16384 ? 512 : (vocab >= 2048 ? 256 : 128); }

unsigned grid_for(int64_t n_rows) {
  const int64_t cap = int64_t(1) << 20;  // rows beyond it are visited grid-stride
  return static_cast<unsigned>(n_rows < cap ? n_rows : cap);
}

template <int DT, int DIV>
void launch_forward(const ForwardArgs& a, cudaStream_t s) {
  forward_kernel<DT, DIV><<<grid_for(a.n_rows), threads_for(a.vocab), 0, s>>>(
      a, make_div_params(a.beta, a.alpha));
}

template <int DT, int DIV>
void launch_backward(const BackwardArgs& a, cudaStream_t s) {
  backward_kernel<DT, DIV><<<grid_for(a.n_rows), threads_for(a.vocab), 0, s>>>(
      a, make_div_params(a.beta, a.alpha));
}

template <int DT, int DIV>
void launch_fold(const FoldArgs& a, cudaStream_t s) {
  fold_kernel<DT, DIV><<<grid_for(a.n_rows), threads_for(a.vocab), 0, s>>>(a);
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

}  // namespace cuda
}  // namespace prefopt
