// The CPU kernels compiled for the avx512 instruction-set variant (flags set by CMake).
#define PREFOPT_CPU_VARIANT avx512
#define PREFOPT_ISA_NS isa_avx512
#include "cpu/row_kernels_impl.h"
