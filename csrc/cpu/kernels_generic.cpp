// The CPU kernels compiled for the generic instruction-set variant (flags set by CMake).
#define PREFOPT_CPU_VARIANT generic
#define PREFOPT_ISA_NS isa_generic
#include "cpu/row_kernels_impl.h"
