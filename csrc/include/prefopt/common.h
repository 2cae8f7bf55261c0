// Shared definitions for the CPU and CUDA kernels: portability macros, dtype and
// divergence codes (kept equal to the Python side), and the argument structs.
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

// Element offset of row n of a [B, T, V] view with strides (batch_stride, token_stride, 1):
// rows are numbered n = b * T + t. All in int64 so that offsets beyond 2^31 are exact.
PREFOPT_HD PREFOPT_INLINE int64_t row_offset(int64_t n, int64_t tokens, int64_t batch_stride,
                                             int64_t token_stride) {
  return (n / tokens) * batch_stride + (n % tokens) * token_stride;
}

// The inputs every row kernel reads, forward and backward alike. The logits are a
// [n_rows / tokens, tokens, vocab] view: row n starts at
// row_offset(n, tokens, logits_batch_stride, logits_token_stride) elements (vocab stride 1).
struct RowInputs {
  int64_t n_rows = 0;
  int64_t tokens = 1;  // T of the [B, T, V] view; n_rows = B * T
  int64_t vocab = 0;
  const void* logits = nullptr;
  int64_t logits_batch_stride = 0;
  int64_t logits_token_stride = 0;
  const void* ref = nullptr;  // reference logits, same dtype and view shape; null when absent
  int64_t ref_batch_stride = 0;
  int64_t ref_token_stride = 0;
  int dtype = kFloat32;
  const int64_t* labels = nullptr;  // [n_rows] or null
  const float* weight = nullptr;    // [n_rows] or null
  double temperature = 1.0;
  int64_t ignore_index = -100;
  int divergence = kNoDivergence;
  // Divergence parameters as the caller gave them (double): make_div_params derives 1 - beta,
  // alpha - 1 and the logs from these before rounding anything to fp32.
  double beta = 0.5;
  double alpha = 0.5;
  int num_threads = 0;  // CPU only; 0 = OpenMP default
};

// Everything one forward call needs. Null output pointers are outputs not asked for.
struct ForwardArgs : RowInputs {
  bool want_logp = false;
  bool want_ref_logp = false;
  bool want_entropy = false;
  // Outputs, fp32 [n_rows]. lse(a / T) = row_max / T + log_norm with row_max the raw max
  // (0 for an all -inf row); row_max and log_norm are always written.
  float* row_max = nullptr;
  float* log_norm = nullptr;
  float* logp = nullptr;
  float* ref_logp = nullptr;
  float* entropy = nullptr;
  float* div = nullptr;
  float* ref_row_max = nullptr;
  float* ref_log_norm = nullptr;
  float* div_s = nullptr;  // S centred at the policy's argmax k (forward KL: -1); NaN
                           // where div is not finite (its gradient row is then NaN)
  float* ref_at_argmax = nullptr;  // raw b_k (-inf allowed); divergences past forward KL
};

// The first pass over one vocabulary slice [v0, v0 + vocab) of every row: the slice's own
// RowState (softmax_state.h) per row, to be merged with the other slices' states. The logits
// are the slice's [B, T, vocab] view; labels hold global ids. Outputs, [n_rows]: fp32, but
// argmax int64 (global index of the slice's first policy max, -1 when that max is -inf or
// the row is skipped). Skipped rows get the empty state (maxima -inf, sums 0, labels 0).
// label_logit / ref_label_logit are the raw logits at the label where the slice holds it,
// else 0; ref_at_argmax the raw reference logit at argmax (0 at -1); fkl_acc / rkl_acc are
// accumulated only on rows with the divergence term. Null outputs are not computed.
struct FoldArgs : RowInputs {
  int64_t v0 = 0;
  float* max = nullptr;
  float* sum_exp = nullptr;
  float* ent_acc = nullptr;
  int64_t* argmax = nullptr;
  float* label_logit = nullptr;
  float* ref_max = nullptr;
  float* ref_sum_exp = nullptr;
  float* ref_label_logit = nullptr;
  float* ref_at_argmax = nullptr;
  float* fkl_acc = nullptr;
  float* rkl_acc = nullptr;
};

// The second sweep of js/tv/hellinger/chi2/alpha over one vocabulary slice, given the final
// statistics of the whole row: value_sum = sum q f(t), centred_sum = sum p (f'(t) - f'(t_k))
// over the slice, fp32 [n_rows], 0 on rows without the divergence term.
struct SweepArgs : RowInputs {
  const float* row_max = nullptr;
  const float* log_norm = nullptr;
  const float* ref_row_max = nullptr;
  const float* ref_log_norm = nullptr;
  const float* ref_at_argmax = nullptr;
  float* value_sum = nullptr;
  float* centred_sum = nullptr;
};

// Everything one backward call needs. `grad` may alias `logits` (in-place backward). With
// v0 > 0 the logits (and grad) are the slice [v0, v0 + vocab) of each row, the statistics
// those of the whole row, and labels global ids: the label's term lands on local index
// label - v0 when the slice holds it.
struct BackwardArgs : RowInputs {
  int64_t v0 = 0;
  // Saved per-row statistics of the forward pass (null when not saved).
  const float* row_max = nullptr;
  const float* log_norm = nullptr;
  const float* ref_row_max = nullptr;
  const float* ref_log_norm = nullptr;
  const float* entropy = nullptr;
  const float* div_s = nullptr;
  const float* ref_at_argmax = nullptr;
  // Upstream per-token gradients, fp32 [n_rows]; null means zero.
  const float* grad_logp = nullptr;
  const float* grad_entropy = nullptr;
  const float* grad_div = nullptr;
  // Output gradient, a [B, T, vocab] view in `dtype` with the strides below, vocab stride 1.
  void* grad = nullptr;
  int64_t grad_batch_stride = 0;
  int64_t grad_token_stride = 0;
};

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

PREFOPT_MATH_END

}  // namespace prefopt
