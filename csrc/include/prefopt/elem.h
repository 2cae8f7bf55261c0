// Elements of the logits and gradient buffers by dtype code: the storage type T, load (to
// fp32) and store (from fp32, rounded to nearest even), shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "prefopt/common.h"
#include "prefopt/fastmath.h"

namespace prefopt {
PREFOPT_MATH_BEGIN

template <int DT>
struct Elem;

template <>
struct Elem<kFloat32> {
  using T = float;
  static PREFOPT_HD PREFOPT_INLINE float load(float v) { return v; }
  static PREFOPT_HD PREFOPT_INLINE float store(float v) { return v; }
};

template <>
struct Elem<kBFloat16> {
  using T = uint16_t;
  static PREFOPT_HD PREFOPT_INLINE float load(uint16_t v) { return bf16_to_float(v); }
  static PREFOPT_HD PREFOPT_INLINE uint16_t store(float v) { return float_to_bf16(v); }
};

template <>
struct Elem<kFloat16> {
  using T = uint16_t;
  static PREFOPT_HD PREFOPT_INLINE float load(uint16_t v) { return half_to_float(v); }
  static PREFOPT_HD PREFOPT_INLINE uint16_t store(float v) { return float_to_half(v); }
};

PREFOPT_MATH_END
}  // namespace prefopt
