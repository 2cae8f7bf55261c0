// CUDA row kernels: one thread block per row. The stream is passed as an opaque handle so
// that callers need no CUDA headers.
#pragma once

#include "prefopt/common.h"

namespace prefopt {
namespace cuda {

// Launch the forward kernels on `stream` (a cudaStream_t). Returns nullptr on success,
// otherwise the CUDA error string of the launch.
const char* forward(const ForwardArgs& args, void* stream);

// Launch the backward kernel on `stream`. Same error convention as forward.
const char* backward(const BackwardArgs& args, void* stream);

// Launch the first pass over a vocabulary slice (FoldArgs). Same error convention.
const char* fold(const FoldArgs& args, void* stream);

// Launch the second sweep over a vocabulary slice (SweepArgs). Same error convention.
const char* sweep(const SweepArgs& args, void* stream);

}  // namespace cuda
}  // namespace prefopt
