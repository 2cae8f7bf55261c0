// The rules of the CUDA forward's candidate gathering (the C largest raw logits of a row, in
// the same read as its statistics), compiled for the host too so that
// tests/ops/test_cuda_candidates_host.py checks them against torch.topk. The block-wide loops
// that apply them are in candidates_device.cuh.
//
// Values are kept as order keys: the fp32 bits mapped to uint32 so that unsigned order is the
// float order (-inf lowest, -0 just below +0, +inf highest; NaN never enters). The C-th largest
// key of a buffer is found by radix selection, most significant 8-bit digit first: per pass, a
// histogram of the digit over the keys that share the digits chosen so far, and pick_digit
// chooses the digit where the running count from the top reaches the rank still wanted.
// Compaction keeps every key above that C-th largest and as many copies of it as the rank left
// (they are equal), exactly C keys; the C-th largest becomes the threshold a value must exceed
// to enter (a value equal to it cannot change the multiset of the C largest).
#pragma once

#include <cstdint>
#include <cstring>

#include "prefopt/common.h"

namespace prefopt {
namespace cuda {

constexpr int kDigitBits = 8;
constexpr int kDigitCount = 1 << kDigitBits;
constexpr int kDigitPasses = 32 / kDigitBits;

// The order key of a non-NaN fp32 value: a > b exactly when order_key(a) > order_key(b), but
// -0 < +0.
PREFOPT_HD PREFOPT_INLINE uint32_t order_key(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The value of an order key (inverse of order_key).
PREFOPT_HD PREFOPT_INLINE float key_value(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

// The digit of `key` that radix pass `pass` (0: most significant) histograms, and the mask
// of the digits the passes before it chose.
PREFOPT_HD PREFOPT_INLINE int digit_shift(int pass) { return 32 - kDigitBits * (pass + 1); }
PREFOPT_HD PREFOPT_INLINE uint32_t key_digit(uint32_t key, int pass) {
  return (key >> digit_shift(pass)) & (kDigitCount - 1);
}
PREFOPT_HD PREFOPT_INLINE uint32_t chosen_mask(int pass) {
  return pass == 0 ? 0u : ~0u << (32 - kDigitBits * pass);
}

// One pass's choice: the digit of the rank-th largest key, and its rank among the keys with
// that digit.
struct DigitPick {
  int digit;  // -1: not in the bins scanned
  uint32_t rank;
};

// Scans the bins [begin, end) of a digit histogram from the top, given `above` keys in the
// bins at and past `end`, for the bin holding the rank-th largest key (rank >= 1): the first
// bin where the count from the top reaches rank. The whole histogram (begin 0, end
// kDigitCount, above 0) always holds it when rank <= its total.
PREFOPT_HD PREFOPT_INLINE DigitPick pick_digit(const uint32_t* histogram, int begin, int end,
                                               uint32_t above, uint32_t rank) {
  for (int d = end - 1; d >= begin; --d) {
    const uint32_t through = above + histogram[d];
    if (through >= rank) return DigitPick{d, rank - above};
    above = through;
  }
  return DigitPick{-1, rank};
}

// The compaction's rule for one key of the buffer, given the C-th largest `kth` and the rank
// `ties` it has among the keys equal to it (so count - ties keys are above it): the key's slot
// among the count kept, or -1 when it is dropped. `order` is the key's order of arrival among
// the keys of its kind (above kth, or equal to it).
PREFOPT_HD PREFOPT_INLINE int64_t kept_slot(uint32_t key, uint32_t kth, uint32_t ties, int64_t count,
                                            int64_t order) {
  if (key > kth) return order;
  if (key == kth && order < int64_t(ties)) return count - int64_t(ties) + order;
  return -1;
}

// The slots of the buffer for `count` kept keys gathered in tiles of at most `tile` values:
// the kept keys, a whole tile, and as many again as the larger of the two, so that after the
// first compaction the next one waits for max(count, tile) more values to enter.
PREFOPT_HD constexpr int64_t candidate_capacity(int64_t count, int64_t tile) {
  return count + tile + (count > tile ? count : tile);
}

// Whether the buffer must be compacted before the next tile is offered.
PREFOPT_HD constexpr bool needs_compaction(int64_t size, int64_t count, int64_t tile) {
  return size > candidate_capacity(count, tile) - tile;
}

// The smallest power of two >= n (n >= 1): the bitonic sort's width.
PREFOPT_HD constexpr int64_t sort_width(int64_t n) {
  int64_t w = 1;
  while (w < n) w <<= 1;
  return w;
}

// Counters after the buffers in the shared words of one block.
enum CandidateCounter { kBufferSize, kAboveOrder, kTieOrder, kPickedDigit, kPickedRank, kCounterCount };

// 32-bit words of shared memory a block gathering `count` candidates in tiles of `tile`
// values uses: the buffer, the sort's (and compaction's) scratch, a digit histogram and the
// counters.
PREFOPT_HD constexpr int64_t candidate_shared_words(int64_t count, int64_t tile) {
  return candidate_capacity(count, tile) + sort_width(count) + kDigitCount + kCounterCount;
}

// One compare-exchange of the bitonic sort into descending order: at stage (k, j), slot i
// (with partner i ^ j > i) and its partner swap when this returns true.
PREFOPT_HD PREFOPT_INLINE bool bitonic_swaps(uint32_t at_i, uint32_t at_partner, int64_t i,
                                             int64_t k) {
  const bool descending = (i & k) == 0;
  return descending ? at_i < at_partner : at_i > at_partner;
}

}  // namespace cuda
}  // namespace prefopt
