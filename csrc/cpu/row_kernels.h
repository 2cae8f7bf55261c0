// CPU row kernels: OpenMP over rows, `#pragma omp simd` over the vocabulary.
#pragma once

#include "prefopt/args.h"

namespace prefopt {
namespace cpu {

// One function per entry point (args.h): forward (see ForwardArgs), backward (writes every
// element of args.grad, zeros on skipped rows), fold (the slice's RowState per row, see
// FoldArgs) and sweep (see SweepArgs). Each picks the widest instruction set the CPU
// supports among the variants compiled in.
#define PREFOPT_DECLARE_ENTRY(name, Args, params) void name(const Args& args);
PREFOPT_ENTRY_POINTS(PREFOPT_DECLARE_ENTRY)

// Name of the instruction-set variant the dispatcher picks on this CPU.
const char* isa_name();

// One variant per instruction set; each is the same source compiled with different flags.
namespace generic {
PREFOPT_ENTRY_POINTS(PREFOPT_DECLARE_ENTRY)
}
namespace avx2 {
PREFOPT_ENTRY_POINTS(PREFOPT_DECLARE_ENTRY)
}
namespace avx512 {
PREFOPT_ENTRY_POINTS(PREFOPT_DECLARE_ENTRY)
}
#undef PREFOPT_DECLARE_ENTRY

}  // namespace cpu
}  // namespace prefopt
