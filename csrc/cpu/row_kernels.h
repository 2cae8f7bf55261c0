// CPU row kernels: OpenMP over rows, `#pragma omp simd` over the vocabulary.
#pragma once

#include <string>
#include <vector>

#include "prefopt/args.h"

namespace prefopt {
namespace cpu {

// One function per entry point (args.h): forward (see ForwardArgs), backward (writes every
// element of args.grad, zeros on skipped rows), fold (the slice's RowState per row, see
// FoldArgs) and sweep (see SweepArgs). Each runs the selected instruction-set variant:
// the widest one compiled in that the CPU supports, unless PREFOPT_CPU_ISA or set_isa
// chose another.
#define PREFOPT_DECLARE_ENTRY(name, Args, params) void name(const Args& args);
PREFOPT_ENTRY_POINTS(PREFOPT_DECLARE_ENTRY)

// The kept tokens of a fused linear call (KeptTokensArgs): one pass on the calling thread,
// the same on every instruction-set variant.
void kept_tokens(const KeptTokensArgs& args);

// Name of the instruction-set variant the entry points run now: generic, avx2 or avx512.
// The first use reads PREFOPT_CPU_ISA and throws std::invalid_argument naming it when its
// value is unknown or cannot run here.
const char* isa_name();

// Names of the variants compiled in that this CPU runs, widest first (generic always).
std::vector<std::string> supported_isas();

// Makes the entry points run the variant `name` from their next call on; throws
// std::invalid_argument, naming the argument `isa`, when it is unknown or cannot run here.
void set_isa(const std::string& name);

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
