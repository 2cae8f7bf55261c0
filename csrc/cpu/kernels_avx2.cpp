// The CPU kernels compiled for the avx2 instruction-set variant (flags set by CMake).
#define PREFOPT_CPU_VARIANT avx2
#define PREFOPT_ISA_NS isa_avx2
#include "cpu/row_kernels_impl.h"
