// CUDA-only device helpers of the row kernels: 16-byte vector loads with scalar head and
// tail, the per-thread first-pass state (an online softmax folded one 16-byte chunk at a
// time: one max per chunk, one exponential per element) and the block reductions.
//
// Exponentials of the hot loops use the MUFU unit: exp(u) = 2^(u log2 e) with the scaled
// difference (a - max) * (log2 e / T) formed from the raw difference, as the shared state
// forms (a - max) / T. ex2.approx.ftz is within about 2 ulp (CUDA's exp2f, documented at
// 2 ulp, is this instruction); the argument's own rounding adds |u| ulp-of-1 relative error
// to a term exp(u), which is negligible against the row's sum (every term <= 1, the max's
// term 1) and the 1e-5 contract; subnormal results flush to 0, as fast_exp's do.
// Statistics leave the thread as a RowState of the shared header (natural-log units), so
// the block and slice merges are the CPU's.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "prefopt/common.h"
#include "prefopt/elem.h"
#include "prefopt/fastmath.h"
#include "prefopt/softmax_state.h"

namespace prefopt {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
// Rescale exponents (log2 units) are clamped to [-kExpFloor, 0]: 2^-160 flushes to 0, and a
// finite clamp keeps 0 * exponent from forming NaN where a -inf max or a huge gap meets a zero
// sum. NaN rows keep their NaN in the sums, never in the exponents.
constexpr float kExpFloor = 160.f;

// 2^x on the MUFU unit (about 2 ulp; -inf gives +0, subnormals flush to 0, NaN stays NaN);
// std::exp2 where the same code is compiled for the host.
PREFOPT_HD PREFOPT_INLINE float ex2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}

// log2 x on the MUFU unit (absolute error about 2^-22, so used only where |log2 x| is not
// small); std::log2 on the host.
PREFOPT_HD PREFOPT_INLINE float lg2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::log2(x);
#endif
}

// Elements of one 16-byte vector as fp32 (exact conversions, as Elem<DT>::load).
template <int DT>
__device__ __forceinline__ void unpack(const uint4& v, float (&x)[16 / sizeof(typename Elem<DT>::T)]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (DT == kFloat32) {
      x[i] = __uint_as_float(w[i]);
    } else if constexpr (DT == kBFloat16) {
      x[2 * i] = __uint_as_float(w[i] << 16);
      x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
}

// fp32 values rounded to nearest even into one 16-byte vector (as Elem<DT>::store; NaN
// stays NaN).
template <int DT>
__device__ __forceinline__ uint4 pack(const float (&g)[16 / sizeof(typename Elem<DT>::T)]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (DT == kFloat32) {
      w[i] = __float_as_uint(g[i]);
    } else if constexpr (DT == kBFloat16) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(g[2 * i], g[2 * i + 1]);
      w[i] = *reinterpret_cast<const uint32_t*>(&h);
    } else {
      const __half2 h = __floats2half2_rn(g[2 * i], g[2 * i + 1]);
      w[i] = *reinterpret_cast<const uint32_t*>(&h);
    }
  }
  return uint4{w[0], w[1], w[2], w[3]};
}

// Calls f(j0, x, z, g) for this thread's share of the row in chunks of consecutive elements
// j0, j0 + 1, ...: x, z the raw logits in fp32 (z = x without REF), g the values to store at
// rg[j0 + i] with STORE. Chunks are 16-byte vectors (N = 16 / sizeof(T)) when every row
// pointer used has the same offset modulo 16, single elements (N = 1) in the head and tail
// and otherwise. Each thread sees its chunks in increasing index order.
template <int DT, bool REF, bool STORE, class F>
__device__ __forceinline__ void row_chunks(const typename Elem<DT>::T* ra,
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
    const float x[1] = {Elem<DT>::load(ra[j])};
    const float z[1] = {REF ? Elem<DT>::load(rb[j]) : x[0]};
    float g[1];
    f(j, x, z, g);
    if constexpr (STORE) rg[j] = Elem<DT>::store(g[0]);
  };
  for (int64_t j = tid; j < head; j += nth) scalar(j);
  if (!vec) return;
  const int64_t n_vec = (vocab - head) / kVec;
  const uint4* va = reinterpret_cast<const uint4*>(ra + head);
  const uint4* vb = reinterpret_cast<const uint4*>(REF ? rb + head : ra + head);
  uint4* vg = reinterpret_cast<uint4*>(STORE ? rg + head : nullptr);
#pragma unroll 1
  for (int64_t k = tid; k < n_vec; k += nth) {
    float x[kVec], z[kVec], g[kVec];
    const uint4 a = va[k];
    if constexpr (REF) {
      const uint4 b = vb[k];  // both loads in flight before either is used
      unpack<DT>(a, x);
      unpack<DT>(b, z);
    } else {
      unpack<DT>(a, x);
#pragma unroll
      for (int i = 0; i < kVec; ++i) z[i] = x[i];
    }
    f(head + k * kVec, x, z, g);
    if constexpr (STORE) vg[k] = pack<DT>(g);
  }
  for (int64_t j = head + n_vec * kVec + tid; j < vocab; j += nth) scalar(j);
}

// Rescale exponent (log2 units) of sums shifted by old_shift when the shift becomes new_shift.
__device__ __forceinline__ float rescale_exponent(float old_shift, float new_shift, float scale) {
  return fminf(fmaxf((old_shift - new_shift) * scale, -kExpFloor), 0.f);
}

// What one thread's first pass accumulates (the RowState fields of softmax_state.h):
// REF the reference's max and sum; ENT the entropy accumulator; ACC forward or reverse KL's
// accumulator (kNoDivergence: neither); CENTRE the reference logit at the policy's argmax;
// INDEX the argmax's index. Sums are relative to the safe shifts sha, shb (the raw maxima, 0
// while a max is -inf); ua, wf, wr in log2 units until to_row_state.
template <bool REF, bool ENT, int ACC, bool CENTRE, bool INDEX>
struct ThreadState {
  static_assert(REF || (ACC == kNoDivergence && !CENTRE), "KL and the centre need the reference");
  static constexpr bool kRef = REF;
  static constexpr bool kCentre = CENTRE || ACC == kReverseKL;
  float scale;  // log2(e) / T
  float ma = -kInf, sha = 0.f, sa = 0.f, ua = 0.f;
  float mb = -kInf, shb = 0.f, sb = 0.f, wf = 0.f, wr = 0.f;
  float ref_at_argmax = 0.f;
  int64_t k = -1;

  __device__ explicit ThreadState(float log2e_over_t) : scale(log2e_over_t) {}

  // Folds the chunk j0, j0 + 1, ... (policy x, reference z) into the state.
  template <int N>
  __device__ __forceinline__ void add(int64_t j0, const float (&x)[N], const float (&z)[N]) {
    float mc = x[0];
#pragma unroll
    for (int i = 1; i < N; ++i) mc = fmaxf(mc, x[i]);
    const float ma_new = fmaxf(ma, mc);
    const float sha_new = ma_new == -kInf ? 0.f : ma_new;
    const float da = rescale_exponent(sha, sha_new, scale);
    const float ca = ex2(da);
    float centre_shift = 0.f;  // (old centre - new centre) * scale
    if constexpr (kCentre || INDEX) {
      // First index of the chunk's max; the chunk owns the argmax only with a larger max
      // (earlier indices win ties).
      float zk = 0.f;
      int ik = 0;
#pragma unroll
      for (int i = N - 1; i >= 0; --i) {
        const bool hit = x[i] == mc;
        if constexpr (kCentre) zk = hit ? z[i] : zk;
        if constexpr (INDEX) ik = hit ? i : ik;
      }
      const bool own = mc > ma;
      if constexpr (kCentre) {
        const float ref_new = own ? zk : ref_at_argmax;
        centre_shift = (kl_centre(ref_at_argmax) - kl_centre(ref_new)) * scale;
        ref_at_argmax = ref_new;
      }
      if constexpr (INDEX) k = own ? j0 + ik : k;
    }
    const float centre = kl_centre(ref_at_argmax);
    float db = 0.f, cb = 0.f, shb_new = 0.f;
    if constexpr (REF) {
      float mz = z[0];
#pragma unroll
      for (int i = 1; i < N; ++i) mz = fmaxf(mz, z[i]);
      const float mb_new = fmaxf(mb, mz);
      shb_new = mb_new == -kInf ? 0.f : mb_new;
      db = rescale_exponent(shb, shb_new, scale);
      cb = ex2(db);
      mb = mb_new;
    }
    // The chunk's own sums (a few terms: summed in order), then added to the rescaled ones.
    float sum_a = 0.f, sum_u = 0.f, sum_b = 0.f, sum_f = 0.f, sum_r = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float dxa = x[i] - sha_new;
      const float ua2 = dxa * scale;
      const float ea = ex2(ua2);
      sum_a += ea;
      if constexpr (ENT) sum_u = fmaf(ea, fmaxf(ua2, -kExpFloor), sum_u);  // NaN stays in ea
      if constexpr (REF) {
        const float dzb = z[i] - shb_new;
        const float eb = ex2(dzb * scale);
        sum_b += eb;
        // Terms of an empty side are dropped (0 * inf); the other side's -inf gives the
        // +inf of a support mismatch.
        if constexpr (ACC == kForwardKL) sum_f += eb > 0.f ? eb * ((dzb - dxa) * scale) : 0.f;
      }
      if constexpr (ACC == kReverseKL)
        sum_r += ea > 0.f ? ea * ((dxa - (z[i] - centre)) * scale) : 0.f;
    }
    // Old sums rescaled as merge_state does; empty sums stay 0 (exponents are finite).
    if constexpr (ENT) ua = fmaf(ca, fmaf(da, sa, ua), sum_u);
    if constexpr (ACC == kReverseKL) wr = fmaf(ca, fmaf(da - centre_shift, sa, wr), sum_r);
    if constexpr (ACC == kForwardKL) wf = fmaf(cb, fmaf(db - da, sb, wf), sum_f);
    sa = fmaf(sa, ca, sum_a);
    ma = ma_new;
    sha = sha_new;
    if constexpr (REF) {
      sb = fmaf(sb, cb, sum_b);
      shb = shb_new;
    }
  }

  // The state in the shared header's units (sums relative to the raw maxima, natural logs).
  __device__ RowState<float> to_row_state() const {
    RowState<float> s = RowState<float>::empty();
    s.ma = ma;
    s.sa = sa;
    s.ua = ua * kLn2;
    s.mb = mb;
    s.sb = sb;
    s.wf = wf * kLn2;
    s.wr = wr * kLn2;
    s.ref_at_argmax = ref_at_argmax;
    s.k = k;
    return s;
  }
};

// TRACK: carry the argmax index k; without it k stays -1, a constant the compiler folds away.
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
__device__ inline void block_sum2(float& a, float& b, float* scratch) {
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

// The merged first-pass state of the row (or slice) under the accumulation of State; every
// thread gets it. With TRACK, k is the first index of the policy's max (arbitrary when that
// max is -inf: callers store -1 there).
template <int DT, class State, bool TRACK>
__device__ RowState<float> row_state(const typename Elem<DT>::T* ra,
                                     const typename Elem<DT>::T* rb, int64_t vocab,
                                     float inv_temperature, RowState<float>* scratch) {
  State st(kLog2e * inv_temperature);
  row_chunks<DT, State::kRef, false>(ra, rb, nullptr, vocab,
                                     [&](int64_t j0, const auto& x, const auto& z, auto&) {
                                       st.add(j0, x, z);
                                     });
  return block_merge<TRACK>(st.to_row_state(), inv_temperature, scratch);
}

}  // namespace cuda
}  // namespace prefopt
