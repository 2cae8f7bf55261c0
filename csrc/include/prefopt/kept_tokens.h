// The kept tokens of a fused linear call, shared by the CPU and CUDA kernels: which tokens a
// call computes, and the count and label range of a run of them.
#pragma once

#include <cstdint>

#include "prefopt/common.h"

namespace prefopt {
PREFOPT_MATH_BEGIN

// Whether token n is computed (the rule of kept_rows in backends/__init__.py): its label is
// not ignore_index; without labels, its weight is non-zero (a NaN weight is kept, -0 is not);
// without either, every token.
PREFOPT_HD PREFOPT_INLINE bool is_kept(const int64_t* labels, const float* weight, int64_t ignore_index,
                                       int64_t n) {
  if (labels != nullptr) return labels[n] != ignore_index;
  return weight == nullptr || weight[n] != 0.0f;
}

// The count of some kept tokens and the least and greatest of their labels. The empty
// summary (no token, or no labels) has low = INT64_MAX and high = INT64_MIN, the identities
// of min and max, so that merging it changes nothing and no range check fails on it.
struct KeptSummary {
  int64_t count = 0;
  int64_t low = INT64_MAX;
  int64_t high = INT64_MIN;

  PREFOPT_HD PREFOPT_INLINE void add_label(int64_t label) {
    low = label < low ? label : low;
    high = label > high ? label : high;
  }
  PREFOPT_HD PREFOPT_INLINE void merge_range(const KeptSummary& other) {
    low = other.low < low ? other.low : low;
    high = other.high > high ? other.high : high;
  }
};

PREFOPT_MATH_END
}  // namespace prefopt
