// CPU row kernels: OpenMP over rows, `#pragma omp simd` over the vocabulary.
#pragma once

#include "prefopt/common.h"

namespace prefopt {
namespace cpu {

// Forward pass over all rows (see ForwardArgs). Picks the widest instruction set the CPU
// supports among the variants compiled in.
void forward(const ForwardArgs& args);

// Backward pass: writes every element of args.grad (zeros on skipped rows).
void backward(const BackwardArgs& args);

// First pass over a vocabulary slice: the slice's RowState per row (see FoldArgs).
void fold(const FoldArgs& args);

// Second sweep over a vocabulary slice (see SweepArgs).
void sweep(const SweepArgs& args);

// Name of the instruction-set variant the dispatcher picks on this CPU.
const char* isa_name();

// One variant per instruction set; each is the same source compiled with different flags.
#define PREFOPT_DECLARE_VARIANT(ns)                 \
  namespace ns {                                    \
  void forward(const ForwardArgs& args);            \
  void backward(const BackwardArgs& args);          \
  void fold(const FoldArgs& args);                  \
  void sweep(const SweepArgs& args);                \
  }
PREFOPT_DECLARE_VARIANT(generic)
PREFOPT_DECLARE_VARIANT(avx2)
PREFOPT_DECLARE_VARIANT(avx512)
#undef PREFOPT_DECLARE_VARIANT

}  // namespace cpu
}  // namespace prefopt
