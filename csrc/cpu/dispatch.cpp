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

#if defined(PREFOPT_HAVE_AVX512)
#define PREFOPT_CASE_AVX512(name) \
  case Isa::kAvx512:              \
    return avx512::name(args);
#else
#define PREFOPT_CASE_AVX512(name)
#endif
#if defined(PREFOPT_HAVE_AVX2)
#define PREFOPT_CASE_AVX2(name) \
  case Isa::kAvx2:              \
    return avx2::name(args);
#else
#define PREFOPT_CASE_AVX2(name)
#endif

// A variant that was not compiled is never chosen, so the generic one takes what is left.
#define PREFOPT_DEFINE_ENTRY(name, Args, params) \
  void name(const Args& args) {                  \
    switch (chosen()) {                          \
      PREFOPT_CASE_AVX512(name)                  \
      PREFOPT_CASE_AVX2(name)                    \
      default:                                   \
        return generic::name(args);              \
    }                                            \
  }
PREFOPT_ENTRY_POINTS(PREFOPT_DEFINE_ENTRY)
#undef PREFOPT_DEFINE_ENTRY
#undef PREFOPT_CASE_AVX2
#undef PREFOPT_CASE_AVX512

const char* isa_name() {
  switch (chosen()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace cpu
}  // namespace prefopt
