// The arguments of the row entry points (forward, backward, fold, sweep) and of the two
// that finish a row state (finalize, finish_sweep), each field
// declared once. The field lists are X-macros: X(type, name). The structs below, the
// bindings' keyword parameters and their conversion from Python integers
// (csrc/bindings.cpp), and the name tuples the module exports (_C.SAVED_STATS, ...) all
// expand these lists, so a field added here reaches every one of them. The statistics and
// row-state lists keep the order of their Python counterparts (SAVED_STATS and SWEEP_STATS
// in prefopt_kernels/backends/__init__.py, the RowState dataclass in
// backends/row_state.py); tests/test_registry.py checks that they agree.
#pragma once

#include <cstdint>

#include "prefopt/common.h"

// The inputs every entry point reads. The logits are a [n_rows / tokens, tokens, vocab]
// view (n_rows = B * T, tokens = T): row n starts at
// row_offset(n, tokens, logits_batch_stride, logits_token_stride) elements (vocab stride 1).
// ref, the reference logits, has the same dtype and view shape (null when absent); labels
// and weight are [n_rows] or null. beta and alpha stay double: make_div_params derives
// 1 - beta, alpha - 1 and the logs from them before rounding anything to fp32.
#define PREFOPT_ROW_INPUTS(X)          \
  X(int64_t, n_rows)                   \
  X(int64_t, tokens)                   \
  X(int64_t, vocab)                    \
  X(const void*, logits)               \
  X(int64_t, logits_batch_stride)      \
  X(int64_t, logits_token_stride)      \
  X(const void*, ref)                  \
  X(int64_t, ref_batch_stride)         \
  X(int64_t, ref_token_stride)         \
  X(int, dtype)                        \
  X(const int64_t*, labels)            \
  X(const float*, weight)              \
  X(double, temperature)               \
  X(int64_t, ignore_index)             \
  X(int, divergence)                   \
  X(double, beta)                      \
  X(double, alpha)

// The per-row statistics a forward saves for its backward (fp32 [n_rows]), in the order of
// SAVED_STATS. S(PTR, name) is also read by the second sweep (SWEEP_STATS), B(PTR, name) by
// the backward alone; PTR is the pointer type (outputs of the forward, inputs after it).
// lse(a / T) = row_max / T + log_norm with row_max the raw max (0 for an all -inf row);
// div_s is S centred at the policy's argmax k (forward KL: -1), NaN where div is not finite
// (its gradient row is then NaN); ref_at_argmax is the raw b_k (-inf allowed), for the
// divergences past forward KL.
#define PREFOPT_SAVED_STATS(S, B, PTR) \
  S(PTR, row_max)                      \
  S(PTR, log_norm)                     \
  S(PTR, ref_row_max)                  \
  S(PTR, ref_log_norm)                 \
  B(PTR, entropy)                      \
  B(PTR, div_s)                        \
  S(PTR, ref_at_argmax)

// The forward's per-token outputs that no later pass reads, fp32 [n_rows].
#define PREFOPT_TOKEN_OUTPUTS(X) \
  X(float*, logp)                \
  X(float*, ref_logp)            \
  X(float*, div)

// The fields of one vocabulary slice's first-pass state, in the order of the RowState
// dataclass (see FoldArgs).
#define PREFOPT_ROW_STATE_FIELDS(X) \
  X(float*, max)                    \
  X(float*, sum_exp)                \
  X(int64_t*, argmax)               \
  X(float*, label_logit)            \
  X(float*, ent_acc)                \
  X(float*, ref_max)                \
  X(float*, ref_sum_exp)            \
  X(float*, ref_label_logit)       \
  X(float*, ref_at_argmax)          \
  X(float*, fkl_acc)                \
  X(float*, rkl_acc)

// Expands to nothing: the B of PREFOPT_SAVED_STATS for the second sweep's subset.
#define PREFOPT_NO_FIELD(type, name)
#define PREFOPT_DECLARE_FIELD(type, name) type name{};

// What each entry point adds to the row inputs. The forward's candidates (0 = none,
// at most kMaxCandidates): the `candidates` largest policy logits of each row as fp32, in
// descending order and -inf padded, into candidate_values [n_rows, candidates] (all -inf on
// skipped rows), gathered by the same read of the row.
#define PREFOPT_FORWARD_FIELDS(X) \
  X(bool, want_logp)              \
  X(bool, want_ref_logp)          \
  X(bool, want_entropy)           \
  PREFOPT_SAVED_STATS(X, X, float*) PREFOPT_TOKEN_OUTPUTS(X) \
  X(int64_t, candidates)          \
  X(float*, candidate_values)
#define PREFOPT_BACKWARD_FIELDS(X)     \
  X(const float*, grad_logp)           \
  X(const float*, grad_entropy)        \
  X(const float*, grad_div)            \
  X(void*, grad)                       \
  X(int64_t, grad_batch_stride)        \
  X(int64_t, grad_token_stride)        \
  X(int64_t, v0)                       \
  X(int64_t, whole_row)
#define PREFOPT_FOLD_FIELDS(X) \
  X(int64_t, v0)               \
  X(int64_t, first_slice)      \
  PREFOPT_ROW_STATE_FIELDS(X)  \
  X(int64_t, candidates)       \
  X(float*, candidate_values)
#define PREFOPT_SWEEP_FIELDS(X) \
  X(int64_t, first_slice)       \
  X(float*, value_sum)          \
  X(float*, centred_sum)
// The finish of a whole row's state: the state's fields (read; ref_at_argmax rewritten in
// place as the statistic), then the statistics it writes where their pointers are non-null.
#define PREFOPT_FINALIZE_FIELDS(X) \
  X(int64_t, every_row_read)       \
  PREFOPT_ROW_STATE_FIELDS(X)      \
  X(float*, row_max)               \
  X(float*, log_norm)              \
  X(float*, ref_row_max)           \
  X(float*, ref_log_norm)          \
  X(float*, entropy)               \
  X(float*, div_s)                 \
  PREFOPT_TOKEN_OUTPUTS(X)
// The finish of a second sweep: the summed partial sums and the final log-normalisers in,
// div and div_s out.
#define PREFOPT_FINISH_SWEEP_FIELDS(X) \
  X(int64_t, every_row_read)           \
  X(const float*, log_norm)            \
  X(const float*, ref_log_norm)        \
  X(const float*, value_sum)           \
  X(const float*, centred_sum)         \
  X(float*, div)                       \
  X(float*, div_s)

// The row inputs the finishing entry points read: no logits, only the rows' rules.
#define PREFOPT_FINISH_INPUTS(X) \
  X(int64_t, n_rows)             \
  X(const int64_t*, labels)      \
  X(const float*, weight)        \
  X(double, temperature)         \
  X(int64_t, ignore_index)       \
  X(int, divergence)

// The keyword parameters of each entry point, in order: the row inputs, then its own.
#define PREFOPT_FORWARD_PARAMS(X) PREFOPT_ROW_INPUTS(X) PREFOPT_FORWARD_FIELDS(X)
#define PREFOPT_BACKWARD_PARAMS(X) \
  PREFOPT_ROW_INPUTS(X) PREFOPT_SAVED_STATS(X, X, const float*) PREFOPT_BACKWARD_FIELDS(X)
#define PREFOPT_FOLD_PARAMS(X) PREFOPT_ROW_INPUTS(X) PREFOPT_FOLD_FIELDS(X)
#define PREFOPT_FINALIZE_PARAMS(X) PREFOPT_FINISH_INPUTS(X) PREFOPT_FINALIZE_FIELDS(X)
#define PREFOPT_FINISH_SWEEP_PARAMS(X) PREFOPT_FINISH_INPUTS(X) PREFOPT_FINISH_SWEEP_FIELDS(X)
#define PREFOPT_SWEEP_PARAMS(X)                                   \
  PREFOPT_ROW_INPUTS(X)                                           \
  PREFOPT_SAVED_STATS(X, PREFOPT_NO_FIELD, const float*)          \
  PREFOPT_SWEEP_FIELDS(X)

// The entry points: X(name, argument struct, keyword parameters).
#define PREFOPT_ENTRY_POINTS(X)                                  \
  X(forward, ForwardArgs, PREFOPT_FORWARD_PARAMS)                \
  X(backward, BackwardArgs, PREFOPT_BACKWARD_PARAMS)             \
  X(fold, FoldArgs, PREFOPT_FOLD_PARAMS)                         \
  X(sweep, SweepArgs, PREFOPT_SWEEP_PARAMS)                      \
  X(finalize, FinalizeArgs, PREFOPT_FINALIZE_PARAMS)             \
  X(finish_sweep, FinishSweepArgs, PREFOPT_FINISH_SWEEP_PARAMS)

// The kept tokens of a fused linear call (prefopt/kept_tokens.h), one pass over the flat
// tokens: labels (int64) and weight (fp32) are [n_tokens] or null; index, int64 [n_tokens],
// receives the kept tokens' indices in increasing order, then -1 to the end; summary, int64
// [3], receives their count and the least and greatest kept label (INT64_MAX and INT64_MIN
// when there are none, or no labels). Not a row entry point: no logits, no instruction-set
// variants.
#define PREFOPT_KEPT_TOKENS_PARAMS(X) \
  X(int64_t, n_tokens)                \
  X(const int64_t*, labels)           \
  X(const float*, weight)             \
  X(int64_t, ignore_index)            \
  X(int64_t*, index)                  \
  X(int64_t*, summary)
#define PREFOPT_TOKEN_ENTRY_POINTS(X) X(kept_tokens, KeptTokensArgs, PREFOPT_KEPT_TOKENS_PARAMS)

namespace prefopt {

// The most candidates per row a forward gathers (the CPU's buffer, 2 per candidate, is on the
// stack; a CUDA block's buffers are static shared memory sized for it).
constexpr int64_t kMaxCandidates = 2048;

struct RowInputs {
  PREFOPT_ROW_INPUTS(PREFOPT_DECLARE_FIELD)
  int num_threads = 0;  // CPU only; 0 = OpenMP default

  // The first element of row n of the logits / of the reference logits, T the dtype's element.
  template <typename T>
  PREFOPT_HD PREFOPT_INLINE const T* logits_row(int64_t n) const {
    return static_cast<const T*>(logits) + row_offset(n, tokens, logits_batch_stride, logits_token_stride);
  }
  template <typename T>
  PREFOPT_HD PREFOPT_INLINE const T* ref_row(int64_t n) const {
    return static_cast<const T*>(ref) + row_offset(n, tokens, ref_batch_stride, ref_token_stride);
  }
};

// Everything one forward call needs. Null output pointers are outputs not asked for;
// row_max and log_norm are always written.
struct ForwardArgs : RowInputs {
  PREFOPT_FORWARD_FIELDS(PREFOPT_DECLARE_FIELD)
};

// The saved statistics of the whole row, as the passes after the forward read them (null
// where not saved).
struct SavedStatsArgs : RowInputs {
  PREFOPT_SAVED_STATS(PREFOPT_DECLARE_FIELD, PREFOPT_DECLARE_FIELD, const float*)
};

// Everything one backward call needs. `grad` may alias `logits` (in-place backward). With
// v0 > 0 the logits (and grad) are the slice [v0, v0 + vocab) of each row, the statistics
// those of the whole row, and labels global ids: the label's term lands on local index
// label - v0 when the slice holds it. grad_* are the upstream per-token gradients, fp32
// [n_rows], null meaning zero; grad is a [B, T, vocab] view in `dtype` with the strides
// given, vocab stride 1. whole_row != 0 (v0 = 0 and the whole vocabulary): an fp32 gradient
// row sums to 0, and a peaked row's argmax entry is written from the others (zero_sum_row).
struct BackwardArgs : SavedStatsArgs {
  PREFOPT_BACKWARD_FIELDS(PREFOPT_DECLARE_FIELD)

  // The first element of row n of the gradient.
  template <typename T>
  PREFOPT_HD PREFOPT_INLINE T* grad_row(int64_t n) const {
    return static_cast<T*>(grad) + row_offset(n, tokens, grad_batch_stride, grad_token_stride);
  }
};

// The first pass over one vocabulary slice [v0, v0 + vocab) of every row, merged into the
// row's running RowState (softmax_state.h), whose fields are read and written in place
// (fold_state.h has the merge). The logits are the slice's [B, T, vocab] view; labels hold
// global ids. Fields, [n_rows]: fp32, but argmax int64 (global index of the first policy max,
// -1 while that max is -inf). Skipped rows fold the empty state (maxima -inf, sums 0, labels
// 0): their running state is left as it is. The slice adds its raw logits at the label to
// label_logit / ref_label_logit where it holds the label; ref_at_argmax is the raw reference
// logit at argmax (0 at -1); fkl_acc / rkl_acc are accumulated only on rows with the
// divergence term. Null fields are not kept. first_slice != 0: the running state is not read
// but taken to be the empty one, so every row's fields are written (a skipped row's with the
// empty state): the rows' first slice needs no state filled before. With candidates > 0 (CPU only, at most
// kMaxCandidates) the slice's own `candidates` largest policy logits, as the forward's, go to
// candidate_values [n_rows, candidates] from the same read (all -inf on skipped rows); they
// are not merged with any earlier slice's.
struct FoldArgs : RowInputs {
  PREFOPT_FOLD_FIELDS(PREFOPT_DECLARE_FIELD)
};

// The second sweep of js/tv/hellinger/chi2/alpha over one vocabulary slice, given the final
// statistics of the whole row (entropy and div_s are not read): the slice's sums
// sum q f(t) and sum p (f'(t) - f'(t_k)) (0 on rows without the divergence term) are added
// into the running fp32 [n_rows] accumulators value_sum and centred_sum in place, every row.
// first_slice != 0: the accumulators are not read but taken as 0, so they need no fill.
struct SweepArgs : SavedStatsArgs {
  PREFOPT_SWEEP_FIELDS(PREFOPT_DECLARE_FIELD)

  // acc = (first_slice ? 0 : acc) + slice sum, in fp32: the bits of adding each slice's sums
  // into zero-filled accumulators (a -0.0 sum of a first slice becomes +0.0 there too).
  PREFOPT_HD PREFOPT_INLINE void accumulate(int64_t row, float value, float centred) const {
    value_sum[row] = (first_slice != 0 ? 0.0f : value_sum[row]) + value;
    centred_sum[row] = (first_slice != 0 ? 0.0f : centred_sum[row]) + centred;
  }
};

// Everything one kept_tokens call needs (PREFOPT_KEPT_TOKENS_PARAMS).
struct KeptTokensArgs {
  PREFOPT_KEPT_TOKENS_PARAMS(PREFOPT_DECLARE_FIELD)
  int num_threads = 0;  // CPU only; the scan runs on one thread
};

// The forward's statistics from the state of the whole vocabulary (finalize_state.h has the
// per-row math): of the row inputs only n_rows, labels, weight, temperature, ignore_index and
// divergence (0 without a reference) are read, no logits; vocab stays 0. The state's fields
// as FoldArgs (ref_max null without a reference). Written where non-null: row_max,
// log_norm, ref_row_max, ref_log_norm, entropy, logp, ref_logp, and div / div_s for forward
// and reverse KL (a second-sweep divergence leaves them to finish_sweep); a centred
// divergence's ref_at_argmax statistic is the state's field itself, masked in place.
// every_row_read != 0: the caller knows that no row is skipped.
struct FinalizeArgs : RowInputs {
  PREFOPT_FINALIZE_FIELDS(PREFOPT_DECLARE_FIELD)
};

// A second-sweep divergence's div and div_s from the summed sweeps (value_sum, centred_sum)
// and the final log_norm / ref_log_norm, fp32 [n_rows]; row inputs as FinalizeArgs.
struct FinishSweepArgs : RowInputs {
  PREFOPT_FINISH_SWEEP_FIELDS(PREFOPT_DECLARE_FIELD)
};

}  // namespace prefopt
