// The per-thread part of the CUDA kept-tokens scan (kept_tokens.cu), host-compilable so that a
// host driver can run a block's threads one after another (tests/ops/test_cuda_kept_tokens_host.py):
// a block walks the flat tokens in tiles of kTileTokens; thread t owns the kItems consecutive
// tokens from tile + t * kItems, flags its kept ones, and writes their indices from its
// exclusive offset, the kept tokens of the tiles before and of the threads before it in this one.
#pragma once

#include <cstdint>

#include "prefopt/args.h"
#include "prefopt/common.h"
#include "prefopt/kept_tokens.h"

namespace prefopt {
namespace cuda {

constexpr int kKeptThreads = 1024;
constexpr int kKeptItems = 8;
constexpr int64_t kTileTokens = int64_t{kKeptThreads} * kKeptItems;

// Thread `thread`'s kept flags (bit i: token first + i) in the tile at `tile`, adding their
// labels to `range`; `first` receives its first token.
PREFOPT_HD PREFOPT_INLINE unsigned thread_kept_flags(const KeptTokensArgs& a, int64_t tile, int thread,
                                                     int64_t& first, KeptSummary& range) {
  first = tile + int64_t{thread} * kKeptItems;
  unsigned flags = 0;
#pragma unroll
  for (int i = 0; i < kKeptItems; ++i) {
    const int64_t n = first + i;
    if (n < a.n_tokens && is_kept(a.labels, a.weight, a.ignore_index, n)) {
      flags |= 1u << i;
      if (a.labels != nullptr) range.add_label(a.labels[n]);
    }
  }
  return flags;
}

// The number of kept tokens among a thread's flags.
PREFOPT_HD PREFOPT_INLINE int kept_count(unsigned flags) {
  int count = 0;
#pragma unroll
  for (int i = 0; i < kKeptItems; ++i) count += (flags >> i) & 1u;
  return count;
}

// Writes a thread's kept indices in order from position `at`.
PREFOPT_HD PREFOPT_INLINE void write_kept(const KeptTokensArgs& a, int64_t first, unsigned flags, int64_t at) {
#pragma unroll
  for (int i = 0; i < kKeptItems; ++i)
    if (flags & (1u << i)) a.index[at++] = first + i;
}

}  // namespace cuda
}  // namespace prefopt
