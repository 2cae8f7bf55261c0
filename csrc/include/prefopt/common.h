// Shared definitions for the CPU and CUDA kernels: portability macros, dtype and
// divergence codes (kept equal to the Python side) with their dispatch, and the row rules.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define PREFOPT_HD __host__ __device__
#define PREFOPT_INLINE __forceinline__
#else
#define PREFOPT_HD
#define PREFOPT_INLINE inline __attribute__((always_inline))
#endif

// The math below is compiled into several translation units with different instruction-set
// flags (CPU variants, CUDA). Each gets its own inline namespace so that the linker never
// merges an out-of-line copy built for one instruction set into another variant.
#if !defined(PREFOPT_ISA_NS)
#if defined(__CUDACC__)
#define PREFOPT_ISA_NS isa_cuda
#else
#define PREFOPT_ISA_NS isa_generic
#endif
#endif
#define PREFOPT_MATH_BEGIN inline namespace PREFOPT_ISA_NS {
#define PREFOPT_MATH_END }

namespace prefopt {

// Element type of the logits / gradient buffers. Mirrors DTYPE_CODES in backends/native.py.
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Mirrors the Divergence registry of prefopt_kernels/divergences.py (tests/test_registry.py
// checks it). 0 means "no divergence".
enum Divergence : int {
  kNoDivergence = 0,
  kForwardKL = 1,
  kReverseKL = 2,
  kJS = 3,
  kTV = 4,
  kHellinger = 5,
  kChi2 = 6,
  kAlpha = 7,
};

// Host-side dispatch on a runtime code, FlashInfer style: the statements after the name run
// with that name bound to the code as a compile-time constant; an unknown code throws, so no
// branch ever computes something for a value it does not know.
#define PREFOPT_DISPATCH_CASE(VALUE, NAME, ...) \
  case VALUE: {                                 \
    constexpr int NAME = VALUE;                 \
    __VA_ARGS__;                                \
    break;                                      \
  }

#define PREFOPT_DISPATCH_DTYPE(code, DT, ...)                                              \
  switch (code) {                                                                          \
    PREFOPT_DISPATCH_CASE(::prefopt::kFloat32, DT, __VA_ARGS__)                            \
    PREFOPT_DISPATCH_CASE(::prefopt::kBFloat16, DT, __VA_ARGS__)                           \
    PREFOPT_DISPATCH_CASE(::prefopt::kFloat16, DT, __VA_ARGS__)                            \
    default:                                                                               \
      throw std::invalid_argument("prefopt: unknown dtype code " + std::to_string(code));  \
  }

#define PREFOPT_DISPATCH_DIVERGENCE(code, DIV, ...)                                             \
  switch (code) {                                                                               \
    PREFOPT_DISPATCH_CASE(::prefopt::kNoDivergence, DIV, __VA_ARGS__)                           \
    PREFOPT_DISPATCH_CASE(::prefopt::kForwardKL, DIV, __VA_ARGS__)                              \
    PREFOPT_DISPATCH_CASE(::prefopt::kReverseKL, DIV, __VA_ARGS__)                              \
    PREFOPT_DISPATCH_CASE(::prefopt::kJS, DIV, __VA_ARGS__)                                     \
    PREFOPT_DISPATCH_CASE(::prefopt::kTV, DIV, __VA_ARGS__)                                     \
    PREFOPT_DISPATCH_CASE(::prefopt::kHellinger, DIV, __VA_ARGS__)                              \
    PREFOPT_DISPATCH_CASE(::prefopt::kChi2, DIV, __VA_ARGS__)                                   \
    PREFOPT_DISPATCH_CASE(::prefopt::kAlpha, DIV, __VA_ARGS__)                                  \
    default:                                                                                    \
      throw std::invalid_argument("prefopt: unknown divergence code " + std::to_string(code));  \
  }

// The registry's rules, one trait each, so that no kernel compares codes by their order;
// each is false for kNoDivergence and for unknown codes. _C.divergence_traits exposes them
// and tests/test_registry.py checks them against the Python registry.

// Divergence.centred: the forward saves S centred at the policy's argmax, with the
// reference logit there (ref_at_argmax); every divergence but forward KL (S = -1 exactly).
PREFOPT_HD constexpr bool is_centred(int divergence) {
  switch (divergence) {
    case kReverseKL:
    case kJS:
    case kTV:
    case kHellinger:
    case kChi2:
    case kAlpha:
      return true;
    default:
      return false;
  }
}

// Divergence.second_sweep: non-linear in the normalised probabilities, so its sums need
// both log-sum-exps first, and a second sweep over the row.
PREFOPT_HD constexpr bool needs_second_sweep(int divergence) {
  switch (divergence) {
    case kJS:
    case kTV:
    case kHellinger:
    case kChi2:
    case kAlpha:
      return true;
    default:
      return false;
  }
}

// The divergence whose accumulator the first pass keeps (Divergence.accumulator): forward
// and reverse KL have one, the others none (their sums need a second sweep).
PREFOPT_HD constexpr int first_pass_divergence(int divergence) {
  return divergence == kForwardKL || divergence == kReverseKL ? divergence : kNoDivergence;
}

// Element offset of row n of a [B, T, V] view with strides (batch_stride, token_stride, 1):
// rows are numbered n = b * T + t. All in int64 so that offsets beyond 2^31 are exact.
PREFOPT_HD PREFOPT_INLINE int64_t row_offset(int64_t n, int64_t tokens, int64_t batch_stride,
                                             int64_t token_stride) {
  return (n / tokens) * batch_stride + (n % tokens) * token_stride;
}

PREFOPT_MATH_BEGIN

// What a row does: skipped entirely, or computed with or without its divergence term.
struct RowPlan {
  bool skip;
  bool use_div;
  int64_t label;  // -1 when the op has no labels
};

// Row skipping rules of the backend interface: an ignored label skips the row; a zero
// weight drops the divergence, and skips the row when the op has no labels.
PREFOPT_HD PREFOPT_INLINE RowPlan plan_row(const int64_t* labels, const float* weight,
                                           int64_t ignore_index, int divergence, int64_t row) {
  RowPlan plan{false, divergence != kNoDivergence, -1};
  const bool zero_weight = weight != nullptr && weight[row] == 0.f;
  if (labels != nullptr) {
    plan.label = labels[row];
    if (plan.label == ignore_index) plan.skip = true;
  } else if (zero_weight) {
    plan.skip = true;
  }
  if (zero_weight) plan.use_div = false;
  return plan;
}

// Index of the label within the vocabulary slice [v0, v0 + vocab) of its row (v0 >= 0), -1
// where the slice does not hold it or the op has no labels (label -1).
PREFOPT_HD PREFOPT_INLINE int64_t slice_label(int64_t label, int64_t v0, int64_t vocab) {
  const int64_t j = label - v0;
  return label >= 0 && j >= 0 && j < vocab ? j : -1;
}

// The gradient of any function of softmax(a / T) sums to 0 over a whole row. Where the policy
// is peaked (log_norm < 0.69: p_k > 0.5016; tied maxima each add exactly 1 to the sum of
// exponentials, so they give log_norm >= fl(ln 2) and k is unique below the bound), g_k is a
// difference of two numbers near p_k / T, each carrying p_k times log_norm's few eps, while
// the other entries carry 1 - p_k times it in all: the backward writes
// g_k = -sum_{j != k} g_j for an fp32 gradient of a whole row (the Triton kernel uses the same
// bound, PEAKED_LOG_NORM). The kernels find k as a float sum of k + 1, exact below 2^24 columns.
constexpr float kPeakedLogNorm = 0.69f;

PREFOPT_HD PREFOPT_INLINE bool zero_sum_row(bool whole_row_fp32, int64_t vocab, float log_norm) {
  return whole_row_fp32 && vocab < (int64_t(1) << 24) && log_norm < kPeakedLogNorm;
}

PREFOPT_MATH_END

}  // namespace prefopt
