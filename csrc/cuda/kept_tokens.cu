// The kept tokens on CUDA: one thread block scans the flat tokens in tiles of kTileTokens, so
// the indices come out in order from one launch with no workspace and no second kernel. Per
// tile each thread flags the kept tokens among its kKeptItems consecutive ones
// (kept_tokens_tile.h), the block scans the counts (warp shuffles, then one warp over the warp
// totals), and each thread writes its indices from the tile's running offset plus its
// exclusive count. A token costs 16 bytes of traffic (its label read, its index written)
// through one SM: the call trades bandwidth for the launches and the host sync of a
// multi-kernel compaction. The count and the kept labels' range go to the summary at the end.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kept_tokens_tile.h"
#include "cuda/row_kernels.h"
#include "prefopt/common.h"
#include "prefopt/kept_tokens.h"

namespace prefopt {
namespace cuda {
namespace {

constexpr int kWarps = kKeptThreads / 32;
constexpr unsigned kAllLanes = 0xffffffffu;
static_assert(kWarps == 32, "the first warp scans one warp total per lane");

__device__ __forceinline__ int warp_inclusive_sum(int value, int lane) {
#pragma unroll
  for (int shift = 1; shift < 32; shift <<= 1) {
    const int below = __shfl_up_sync(kAllLanes, value, shift);
    if (lane >= shift) value += below;
  }
  return value;
}

__device__ __forceinline__ void warp_merge_range(KeptSummary& kept) {
#pragma unroll
  for (int shift = 16; shift > 0; shift >>= 1) {
    KeptSummary other;
    other.low = __shfl_xor_sync(kAllLanes, kept.low, shift);
    other.high = __shfl_xor_sync(kAllLanes, kept.high, shift);
    kept.merge_range(other);
  }
}

__global__ void __launch_bounds__(kKeptThreads) kept_tokens_kernel(KeptTokensArgs a) {
  __shared__ int warp_totals[kWarps];
  __shared__ int64_t warp_low[kWarps], warp_high[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  KeptSummary mine;  // this thread's kept labels' range over every tile
  int64_t offset = 0;  // kept tokens in the tiles before this one
  for (int64_t tile = 0; tile < a.n_tokens; tile += kTileTokens) {
    int64_t first;
    const unsigned flags = thread_kept_flags(a, tile, threadIdx.x, first, mine);
    const int count = kept_count(flags);
    const int inclusive = warp_inclusive_sum(count, lane);
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) warp_totals[lane] = warp_inclusive_sum(warp_totals[lane], lane);
    __syncthreads();
    write_kept(a, first, flags, offset + (warp > 0 ? warp_totals[warp - 1] : 0) + inclusive - count);
    offset += warp_totals[kWarps - 1];
    __syncthreads();  // every thread has read warp_totals before the next tile writes it
  }
  for (int64_t n = offset + threadIdx.x; n < a.n_tokens; n += kKeptThreads) a.index[n] = -1;
  warp_merge_range(mine);
  if (lane == 0) {
    warp_low[warp] = mine.low;
    warp_high[warp] = mine.high;
  }
  __syncthreads();
  if (warp == 0) {
    mine.low = warp_low[lane];
    mine.high = warp_high[lane];
    warp_merge_range(mine);
    if (lane == 0) {
      a.summary[0] = offset;
      a.summary[1] = mine.low;
      a.summary[2] = mine.high;
    }
  }
}

}  // namespace

const char* kept_tokens(const KeptTokensArgs& args, void* stream) {
  kept_tokens_kernel<<<1, kKeptThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace prefopt
