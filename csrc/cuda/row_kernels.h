// CUDA row kernels: one thread block per row. The stream is passed as an opaque handle so
// that callers need no CUDA headers.
#pragma once

#include "prefopt/args.h"

namespace prefopt {
namespace cuda {

// One launcher per entry point (args.h), enqueued on `stream` (a cudaStream_t). Each
// returns nullptr on success, otherwise the CUDA error string of the launch.
#define PREFOPT_DECLARE_ENTRY(name, Args, params) const char* name(const Args& args, void* stream);
PREFOPT_ENTRY_POINTS(PREFOPT_DECLARE_ENTRY)
PREFOPT_TOKEN_ENTRY_POINTS(PREFOPT_DECLARE_ENTRY)  // kept_tokens.cu: one thread block
#undef PREFOPT_DECLARE_ENTRY

}  // namespace cuda
}  // namespace prefopt
