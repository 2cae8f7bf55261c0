// The CUDA forward's candidates: each row's C largest raw logits (fp32), gathered by the block
// while its first pass reads the row, with the rules of top_candidates.h.
//
// The block reads the row in tiles (row_tiles: one 16-byte chunk per thread per tile, so that
// every thread takes part in each tile and the block can synchronise there). Per tile each
// thread compares its chunk's max, which the online softmax forms anyway, with the running
// threshold (a register, the same in every thread) and one barrier (__syncthreads_or) tells
// whether any chunk beats it: after the first tiles almost never, so the common case costs a
// compare and a barrier per chunk. Otherwise the values above the threshold append their order
// keys to the buffer in shared memory (warp prefix sums, one shared atomic per warp), and when
// fewer than a tile's slots are left the block compacts the buffer to its C largest (radix
// selection) and raises the threshold. At the row's end the kept keys are sorted (bitonic) and
// written in descending order, -inf padded. Compaction and the end are function calls, so that
// the row's loop stays one short loop; the buffers are in shared memory, candidate_shared_words
// of them for the largest C and tile.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/row_device.cuh"
#include "cuda/top_candidates.h"
#include "prefopt/args.h"
#include "prefopt/common.h"
#include "prefopt/elem.h"

namespace prefopt {
namespace cuda {

// Threads per block of the gathering kernels at most, and the most values one tile offers (a
// 16-byte chunk per thread, 8 values at most).
constexpr int kCandidateThreads = 256;
constexpr int kMaxCandidateTile = kCandidateThreads * 8;

// The block's words: sized for the most candidates and the widest tile (static, so that the
// kernels that gather nothing keep their shared memory as it is).
__shared__ uint32_t candidate_shared[candidate_shared_words(kMaxCandidates, kMaxCandidateTile)];

// Their layout: the counters, the digit histogram, the buffer (capacity cap), the scratch.
__device__ __forceinline__ uint32_t* candidate_counters() { return candidate_shared; }
__device__ __forceinline__ uint32_t* candidate_histogram() { return candidate_shared + kCounterCount; }
__device__ __forceinline__ uint32_t* candidate_buffer() {
  return candidate_shared + kCounterCount + kDigitCount;
}

// Tiles over `chunks` chunks of N values, chunk k to thread k mod blockDim.x: load(k, valid, x,
// z) reads one, f(k, x, z, valid) folds it and returns whether the tile needs the slow path
// (the same answer in every thread), slow(x, valid) runs it on that tile's chunks. The common
// tiles stay in the inner loop, which leaves only for a slow tile.
template <int N, class Load, class F, class Slow>
__device__ __forceinline__ void tile_loop(int64_t chunks, Load&& load, F&& f, Slow&& slow) {
  int64_t t0 = 0;
#pragma unroll 1
  while (t0 < chunks) {
    float x[N], z[N];
    bool valid, slow_tile;
#pragma unroll 1
    do {
      const int64_t k = t0 + threadIdx.x;
      valid = k < chunks;
      load(k, valid, x, z);
      slow_tile = f(k, x, z, valid);
      t0 += blockDim.x;
    } while (!slow_tile && t0 < chunks);
    if (slow_tile) slow(x, valid);
  }
}

// Calls f(j0, x, z, valid) as row_chunks does (same chunks, each thread in increasing index
// order), but in tiles that every thread of the block enters the same number of times: a thread
// with no chunk left in a tile gets valid = false (x and z then hold no values of the row). f
// returns whether the tile needs slow(x, valid) (tile_loop).
template <int DT, bool REF, class F, class Slow>
__device__ __forceinline__ void row_tiles(const typename Elem<DT>::T* ra, const typename Elem<DT>::T* rb,
                                          int64_t vocab, F&& f, Slow&& slow) {
  using T = typename Elem<DT>::T;
  constexpr int kVec = 16 / sizeof(T);
  const uintptr_t off = reinterpret_cast<uintptr_t>(ra) % 16;
  const bool vec = (!REF || reinterpret_cast<uintptr_t>(rb) % 16 == off) && off % sizeof(T) == 0;
  const int64_t head_len = vec ? static_cast<int64_t>(((16 - off) % 16) / sizeof(T)) : vocab;
  const int64_t head = head_len < vocab ? head_len : vocab;
  auto scalars = [&](int64_t begin, int64_t end) {
    tile_loop<1>(
        end - begin,
        [&](int64_t k, bool valid, float(&x)[1], float(&z)[1]) {
          x[0] = valid ? Elem<DT>::load(ra[begin + k]) : 0.f;
          z[0] = valid && REF ? Elem<DT>::load(rb[begin + k]) : x[0];
        },
        [&](int64_t k, const float(&x)[1], const float(&z)[1], bool valid) {
          return f(begin + k, x, z, valid);
        },
        slow);
  };
  scalars(0, head);
  if (!vec) return;
  const int64_t n_vec = (vocab - head) / kVec;
  const uint4* va = reinterpret_cast<const uint4*>(ra + head);
  const uint4* vb = reinterpret_cast<const uint4*>(REF ? rb + head : ra + head);
  tile_loop<kVec>(
      n_vec,
      [&](int64_t k, bool valid, float(&x)[kVec], float(&z)[kVec]) {
        uint4 a{0u, 0u, 0u, 0u}, b{0u, 0u, 0u, 0u};
        if (valid) {
          a = va[k];
          if constexpr (REF) b = vb[k];  // both loads in flight before either is used
        }
        unpack<DT>(a, x);
        if constexpr (REF) {
          unpack<DT>(b, z);
        } else {
#pragma unroll
          for (int i = 0; i < kVec; ++i) z[i] = x[i];
        }
      },
      [&](int64_t k, const float(&x)[kVec], const float(&z)[kVec], bool valid) {
        return f(head + k * kVec, x, z, valid);
      },
      slow);
  scalars(head + n_vec * kVec, vocab);
}

// Finds the `count`-th largest of the `size` keys in the buffer (radix selection, every thread
// of the block) and writes the count largest to the scratch, exactly count of them; returns the
// count-th largest. Ends with a barrier.
__device__ __noinline__ uint32_t keep_largest(int count, int cap, uint32_t size) {
  uint32_t* buffer = candidate_buffer();
  uint32_t* scratch = buffer + cap;
  uint32_t* histogram = candidate_histogram();
  uint32_t* counters = candidate_counters();
  const int tid = threadIdx.x, nth = blockDim.x, lane = tid & 31;
  uint32_t prefix = 0, rank = static_cast<uint32_t>(count);
  for (int pass = 0; pass < kDigitPasses; ++pass) {
    for (int d = tid; d < kDigitCount; d += nth) histogram[d] = 0;
    __syncthreads();
    const uint32_t mask = chosen_mask(pass);
    for (uint32_t i = tid; i < size; i += nth) {
      const uint32_t key = buffer[i];
      if ((key & mask) == prefix) atomicAdd(&histogram[key_digit(key, pass)], 1u);
    }
    __syncthreads();
    if (tid < 32) {
      // Lane l scans bins [l * per_lane, (l + 1) * per_lane), knowing the keys in the bins above.
      constexpr int kPerLane = kDigitCount / 32;
      uint32_t own = 0;
#pragma unroll
      for (int d = 0; d < kPerLane; ++d) own += histogram[lane * kPerLane + d];
      uint32_t through = own;  // keys in this lane's bins and above
#pragma unroll
      for (int step = 1; step < 32; step <<= 1) {
        const uint32_t from_above = __shfl_down_sync(kFullMask, through, step);
        if (lane + step < 32) through += from_above;
      }
      const uint32_t above = through - own;
      if (above < rank && rank <= through) {
        const DigitPick pick =
            pick_digit(histogram, lane * kPerLane, (lane + 1) * kPerLane, above, rank);
        counters[kPickedDigit] = static_cast<uint32_t>(pick.digit);
        counters[kPickedRank] = pick.rank;
      }
    }
    if (tid == 0) {
      counters[kAboveOrder] = 0;
      counters[kTieOrder] = 0;
    }
    __syncthreads();
    prefix |= counters[kPickedDigit] << digit_shift(pass);
    rank = counters[kPickedRank];
  }
  for (uint32_t i = tid; i < size; i += nth) {
    const uint32_t key = buffer[i];
    if (key >= prefix) {
      const int64_t order = atomicAdd(&counters[key > prefix ? kAboveOrder : kTieOrder], 1u);
      const int64_t slot = kept_slot(key, prefix, rank, count, order);
      if (slot >= 0) scratch[slot] = key;
    }
  }
  __syncthreads();
  return prefix;
}

// Compacts the full buffer to its count largest; returns the new threshold (the count-th
// largest value).
__device__ __noinline__ float compact_candidates(int count, int cap, uint32_t size) {
  const uint32_t kth = keep_largest(count, cap, size);
  uint32_t* buffer = candidate_buffer();
  for (int i = threadIdx.x; i < count; i += blockDim.x) buffer[i] = buffer[cap + i];
  if (threadIdx.x == 0) candidate_counters()[kBufferSize] = count;
  __syncthreads();
  return key_value(kth);
}

// Sorts the kept keys, descending, and writes the count largest values to out (-inf padded).
__device__ __noinline__ void store_candidates(int count, int cap, float* out) {
  uint32_t* buffer = candidate_buffer();
  uint32_t* scratch = buffer + cap;
  const int width = static_cast<int>(sort_width(count));
  const uint32_t size = candidate_counters()[kBufferSize];
  uint32_t kept = size;
  if (size > static_cast<uint32_t>(count)) {
    keep_largest(count, cap, size);
    kept = count;
  } else {
    for (uint32_t i = threadIdx.x; i < size; i += blockDim.x) scratch[i] = buffer[i];
  }
  for (int i = kept + threadIdx.x; i < width; i += blockDim.x) scratch[i] = 0;  // below every key
  __syncthreads();
  for (int k = 2; k <= width; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const int partner = i ^ j;
        if (partner > i && bitonic_swaps(scratch[i], scratch[partner], i, k)) {
          const uint32_t t = scratch[i];
          scratch[i] = scratch[partner];
          scratch[partner] = t;
        }
      }
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < count; i += blockDim.x)
    out[i] = i < static_cast<int>(kept) ? key_value(scratch[i]) : -kInf;
  __syncthreads();  // the buffers are reused by the block's next row
}

// One block's gathering of the `count` largest policy logits of its rows, one row at a time.
class CandidateGather {
 public:
  // tile: the most values one tile offers (threads times values per chunk).
  __device__ CandidateGather(int count, int tile)
      : count_(count), cap_(static_cast<int>(candidate_capacity(count, tile))), tile_(tile) {}

  // Before each row (the first tile's barrier orders the reset before any append).
  __device__ __forceinline__ void start_row() {
    threshold_ = -kInf;
    if (threadIdx.x == 0) candidate_counters()[kBufferSize] = 0;
  }

  // One chunk of the current tile (every thread of the block, valid or not): whether any chunk
  // of the tile has a value above the threshold (NaN never is), the same in every thread.
  template <int N>
  __device__ __forceinline__ bool tile_enters(const float (&x)[N], bool valid) const {
    return __syncthreads_or(valid && chunk_max(x) > threshold_);
  }

  // The values of the tile above the threshold enter the buffer (warp prefix sums of their
  // counts); then the buffer is compacted where a whole tile no longer fits.
  template <int N>
  __device__ __forceinline__ void append(const float (&x)[N], bool valid) {
    const bool hit = valid && chunk_max(x) > threshold_;
    const int lane = threadIdx.x & 31;
    uint32_t entering = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) entering += hit && x[i] > threshold_;
    uint32_t through = entering;  // inclusive prefix over the warp's lanes
#pragma unroll
    for (int step = 1; step < 32; step <<= 1) {
      const uint32_t from_below = __shfl_up_sync(kFullMask, through, step);
      if (lane >= step) through += from_below;
    }
    uint32_t base = 0;
    if (lane == 31 && through > 0) base = atomicAdd(&candidate_counters()[kBufferSize], through);
    uint32_t slot = __shfl_sync(kFullMask, base, 31) + through - entering;
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (hit && x[i] > threshold_) candidate_buffer()[slot++] = order_key(x[i]);
    __syncthreads();
    const uint32_t size = candidate_counters()[kBufferSize];
    if (needs_compaction(size, count_, tile_)) threshold_ = compact_candidates(count_, cap_, size);
  }

  // After the row's last tile: its count largest, descending, -inf padded.
  __device__ __forceinline__ void finish(float* out) { store_candidates(count_, cap_, out); }

  // A skipped row: all -inf.
  __device__ __forceinline__ void skip(float* out) {
    for (int i = threadIdx.x; i < count_; i += blockDim.x) out[i] = -kInf;
  }

 private:
  template <int N>
  static __device__ __forceinline__ float chunk_max(const float (&x)[N]) {
    float m = x[0];
#pragma unroll
    for (int i = 1; i < N; ++i) m = fmaxf(m, x[i]);
    return m;
  }

  int count_, cap_, tile_;
  float threshold_ = -kInf;
};

}  // namespace cuda
}  // namespace prefopt
