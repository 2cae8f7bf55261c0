// Runtime choice of the CPU kernel variant. The x86 variants exist only when CMake
// compiled them (PREFOPT_HAVE_AVX2 / PREFOPT_HAVE_AVX512).
#include "cpu/row_kernels.h"

namespace prefopt {
namespace cpu {

namespace {

enum class Isa { kGeneric, kAvx2, kAvx512 };

Isa detect() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
#if defined(PREFOPT_HAVE_AVX512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma"))
    return Isa::kAvx512;
#endif
#if defined(PREFOPT_HAVE_AVX2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
#endif
  return Isa::kGeneric;
}

Isa chosen() {
  static const Isa isa = detect();
  return isa;
}

}  // namespace

void forward(const ForwardArgs& args) {
  switch (chosen()) {
#if defined(PREFOPT_HAVE_AVX512)
    case Isa::kAvx512: return avx512::forward(args);
#endif
#if defined(PREFOPT_HAVE_AVX2)
    case Isa::kAvx2: return avx2::forward(args);
#endif
    default: return generic::forward(args);
  }
}

void backward(const BackwardArgs& args) {
  switch (chosen()) {
#if defined(PREFOPT_HAVE_AVX512)
    case Isa::kAvx512: return avx512::backward(args);
#endif
#if defined(PREFOPT_HAVE_AVX2)
    case Isa::kAvx2: return avx2::backward(args);
#endif
    default: return generic::backward(args);
  }
}

void fold(const FoldArgs& args) {
  switch (chosen()) {
#if defined(PREFOPT_HAVE_AVX512)
    case Isa::kAvx512: return avx512::fold(args);
#endif
#if defined(PREFOPT_HAVE_AVX2)
    case Isa::kAvx2: return avx2::fold(args);
#endif
    default: return generic::fold(args);
  }
}

void sweep(const SweepArgs& args) {
  switch (chosen()) {
#if defined(PREFOPT_HAVE_AVX512)
    case Isa::kAvx512: return avx512::sweep(args);
#endif
#if defined(PREFOPT_HAVE_AVX2)
    case Isa::kAvx2: return avx2::sweep(args);
#endif
    default: return generic::sweep(args);
  }
}

const char* isa_name() {
  switch (chosen()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace cpu
}  // namespace prefopt
