// Run-time choice of the CPU kernel variant. The x86 variants exist only when CMake
// compiled them (PREFOPT_HAVE_AVX2 / PREFOPT_HAVE_AVX512). The widest variant this CPU runs
// is the default; PREFOPT_CPU_ISA (read on first use) or set_isa picks another, so that
// every variant can be tested on one machine.
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/row_kernels.h"

namespace prefopt {
namespace cpu {

namespace {

enum class Isa { kGeneric, kAvx2, kAvx512 };

// Every variant, widest first: the order of the default choice and of supported_isas().
constexpr Isa kWidestFirst[] = {Isa::kAvx512, Isa::kAvx2, Isa::kGeneric};

const char* name_of(Isa isa) {
  switch (isa) {
    case Isa::kGeneric: return "generic";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  throw std::logic_error("prefopt: unknown CPU variant code");
}

// Whether the variant was compiled in and this CPU has its instructions.
bool runnable(Isa isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
#endif
  switch (isa) {
    case Isa::kGeneric: return true;
    case Isa::kAvx2:
#if defined(PREFOPT_HAVE_AVX2)
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
      return false;
#endif
    case Isa::kAvx512:
#if defined(PREFOPT_HAVE_AVX512)
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
#else
      return false;
#endif
  }
  throw std::logic_error("prefopt: unknown CPU variant code");
}

// The variants this CPU and build run, widest first (generic always, last).
std::vector<Isa> runnable_isas() {
  std::vector<Isa> out;
  for (Isa isa : kWidestFirst)
    if (runnable(isa)) out.push_back(isa);
  return out;
}

// The variant called `name`; `source` (the variable or argument it came from) names the
// culprit when it is unknown or cannot run here. Never falls back to another variant.
Isa parse(const std::string& name, const char* source) {
  for (Isa isa : kWidestFirst) {
    if (name != name_of(isa)) continue;
    if (runnable(isa)) return isa;
    std::string runs;
    for (Isa other : runnable_isas())
      runs += (runs.empty() ? "" : ", ") + std::string(name_of(other));
    throw std::invalid_argument(std::string(source) + "='" + name +
                                "': this CPU or build cannot run that variant (it runs: " +
                                runs + ")");
  }
  throw std::invalid_argument(std::string(source) +
                              " must be one of generic, avx2, avx512; got '" + name + "'");
}

Isa initial() {
  const char* env = std::getenv("PREFOPT_CPU_ISA");
  if (env == nullptr || *env == '\0') return runnable_isas().front();
  return parse(env, "PREFOPT_CPU_ISA");
}

// The variant the entry points run. Atomic because set_isa may run on one thread while
// kernels start on another; each call reads it once. A bad PREFOPT_CPU_ISA throws here
// and, the static staying uninitialised, again on every later use.
std::atomic<Isa>& selected() {
  static std::atomic<Isa> isa{initial()};
  return isa;
}

}  // namespace

#if defined(PREFOPT_HAVE_AVX512)
#define PREFOPT_RUN_AVX512(name) return avx512::name(args)
#else
#define PREFOPT_RUN_AVX512(name) break
#endif
#if defined(PREFOPT_HAVE_AVX2)
#define PREFOPT_RUN_AVX2(name) return avx2::name(args)
#else
#define PREFOPT_RUN_AVX2(name) break
#endif

// parse() never selects a variant that was not compiled, so the throw is unreachable; it
// stands where a silent default would otherwise run the wrong code.
#define PREFOPT_DEFINE_ENTRY(name, Args, params)                                  \
  void name(const Args& args) {                                                   \
    switch (selected().load()) {                                                  \
      case Isa::kGeneric: return generic::name(args);                             \
      case Isa::kAvx2: PREFOPT_RUN_AVX2(name);                                    \
      case Isa::kAvx512: PREFOPT_RUN_AVX512(name);                                \
    }                                                                             \
    throw std::logic_error("prefopt: the selected CPU variant was not compiled"); \
  }
PREFOPT_ENTRY_POINTS(PREFOPT_DEFINE_ENTRY)
#undef PREFOPT_DEFINE_ENTRY
#undef PREFOPT_RUN_AVX2
#undef PREFOPT_RUN_AVX512

const char* isa_name() { return name_of(selected().load()); }

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (Isa isa : runnable_isas()) out.emplace_back(name_of(isa));
  return out;
}

void set_isa(const std::string& name) { selected().store(parse(name, "isa")); }

}  // namespace cpu
}  // namespace prefopt
