// Branch-free fp32 exp/log and dtype conversions written with plain arithmetic and bit
// operations, so that loops calling them vectorise (`#pragma omp simd`) on the CPU and the
// same code runs on the GPU. Accuracy: exp, log, expm1 and log1p within about 1-2 ulp over
// the normal range (expm1 and log1p relative to their own, possibly tiny, results); exp
// results below FLT_MIN are flushed to 0 (they never matter against the 1e-5 contract and
// denormal arithmetic is slow on x86).
#pragma once

#include <cstdint>
#include <cstring>

#include "prefopt/common.h"

namespace prefopt {
PREFOPT_MATH_BEGIN

PREFOPT_HD PREFOPT_INLINE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

PREFOPT_HD PREFOPT_INLINE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// a * b + c. Fused where the target has FMA (faster and one rounding); the build turns off
// implicit contraction (-ffp-contract=off, --fmad=false) so that every other expression, in
// particular the scaled logit x = a / T, rounds the same way in the forward and the backward.
PREFOPT_HD PREFOPT_INLINE float fmadd(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#elif defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

constexpr float kInf = __builtin_huge_valf();
constexpr float kFltMin = 1.17549435e-38f;
constexpr float kLn2Hi = 0.693145751953125f;  // 16 significant bits: k * kLn2Hi is exact
constexpr float kLn2Lo = 1.42860682030941723212e-6f;

// The range reduction every exponential shares: x = k ln2 + r, k = round(x / ln 2),
// |r| <= ln2/2 (x finite, |x| < 2^22 ln2), and expm1(r) by its Taylor series to degree 7
// (truncation error < 0.1 ulp on that interval) with the leading r exact.
struct Ln2Split {
  int32_t k;
  float r;
};

PREFOPT_HD PREFOPT_INLINE Ln2Split split_ln2(float x) {
  // Adding 1.5 * 2^23 rounds to an integer and leaves it in the low mantissa bits, so k
  // comes out of the bit pattern without a float -> int conversion.
  const float shifter = 12582912.0f;
  const float t = fmadd(x, 1.44269504088896341f, shifter);
  const float kf = t - shifter;
  const int32_t k = static_cast<int32_t>(float_to_bits(t) - float_to_bits(shifter));
  return Ln2Split{k, fmadd(-kf, kLn2Lo, fmadd(-kf, kLn2Hi, x))};
}

// 2^k for -126 <= k <= 127, from bits.
PREFOPT_HD PREFOPT_INLINE float exp2_int(int32_t k) {
  return bits_to_float(static_cast<uint32_t>(k + 127) << 23);
}

PREFOPT_HD PREFOPT_INLINE float expm1_reduced(float r) {
  float poly = 1.f / 5040.f;
  poly = fmadd(poly, r, 1.f / 720.f);
  poly = fmadd(poly, r, 1.f / 120.f);
  poly = fmadd(poly, r, 1.f / 24.f);
  poly = fmadd(poly, r, 1.f / 6.f);
  poly = fmadd(poly, r, 0.5f);
  return fmadd(r * r, poly, r);
}

// The reduction of fast_exp and fast_expm1 (x already clamped to the finite range): 2^k
// comes as two factors 2^k1 2^k2 built from bits, so that k up to 128 neither overflows the
// exponent field nor needs a branch.
struct ExpReduction {
  int32_t k;
  float em1;  // expm1(r)
  float s1, s2;  // 2^k1, 2^k2 with k1 + k2 = k
};

PREFOPT_HD PREFOPT_INLINE ExpReduction exp_reduce(float xc) {
  const Ln2Split s = split_ln2(xc);
  const int32_t k1 = s.k >> 1;
  const int32_t k2 = s.k - k1;
  return ExpReduction{s.k, expm1_reduced(s.r), exp2_int(k1), exp2_int(k2)};
}

// exp(x) = 2^k (1 + expm1(r)). On the GPU: 2^h (1 + l ln 2) with h + l = x log2(e) split
// exactly by FMAs (|l| <= 2^-17), 2^h from the MUFU unit (ex2.approx, about 2 ulp), so about
// 3 ulp; same flushes, overflow and NaN as the CPU's.
PREFOPT_HD PREFOPT_INLINE float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  const float xc = x > 88.8f ? 88.8f : x;
  const float h = xc * 1.44269504088896341f;
  const float l = fmadd(xc, 1.92596299112661746e-8f, fmadd(xc, 1.44269504088896341f, -h));
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(h));
  y = fmadd(y, l * 0.693147180559945309f, y);
  return x < -87.3f ? 0.f : y;
#else
  float xc = x < -87.5f ? -87.5f : x;
  xc = xc > 88.8f ? 88.8f : xc;
  const ExpReduction e = exp_reduce(xc);
  const float y = (1.f + e.em1) * e.s1 * e.s2;
  return x < -87.3f ? 0.f : y;  // NaN falls through both comparisons and stays NaN
#endif
}

// fast_exp for x <= 0 (and NaN), the argument of every softmax term (a logit less the max,
// a log-probability): bit-identical to fast_exp there in fewer operations. No clamp: every
// x < -87.3 (-inf included) is selected to 0 whatever its reduction gave, and above that
// k >= -126, so 2^k is one normal factor. Also right for 0 < x < 88 (k <= 127).
PREFOPT_HD PREFOPT_INLINE float fast_exp_nonpositive(float x) {
  const Ln2Split s = split_ln2(x);
  const float y = (1.f + expm1_reduced(s.r)) * exp2_int(s.k);
  return x < -87.3f ? 0.f : y;  // NaN fails the comparison and stays NaN through y
}

// x = 2^e (1 + f), 1 + f in [sqrt(1/2), sqrt(2)) and f exact; a denormal x is scaled into
// the normal range first.
struct LogSplit {
  int32_t e;
  float f;
};

PREFOPT_HD PREFOPT_INLINE LogSplit split_log(float x) {
  const bool tiny = x < kFltMin;
  const float xs = x * (tiny ? 8388608.0f : 1.f);
  const uint32_t u = float_to_bits(xs);
  const uint32_t sqrt_half = 0x3f3504f3u;
  const int32_t e = static_cast<int32_t>(u - sqrt_half) >> 23;
  const float m = bits_to_float(((u - sqrt_half) & 0x7fffffu) + sqrt_half);
  return LogSplit{e - (tiny ? 23 : 0), m - 1.f};
}

// log(1 + f) for f of split_log (or within an ulp of it) as 2 atanh(s), s = f / (2 + f);
// f - s (f - R(s^2)) keeps the leading term exact.
PREFOPT_HD PREFOPT_INLINE float log1p_reduced(float f) {
  const float s = f / (2.f + f);
  const float s2 = s * s;
  float poly = 2.f / 9.f;
  poly = fmadd(poly, s2, 2.f / 7.f);
  poly = fmadd(poly, s2, 2.f / 5.f);
  poly = fmadd(poly, s2, 2.f / 3.f);
  return fmadd(-s, fmadd(-s2, poly, f), f);
}

// e ln2 + log_m, with log's values at x = inf, 0, negative and NaN.
PREFOPT_HD PREFOPT_INLINE float log_assemble(float x, int32_t e, float log_m) {
  const float ef = static_cast<float>(e);
  float y = fmadd(ef, kLn2Hi, fmadd(ef, kLn2Lo, log_m));
  y = x == kInf ? kInf : y;
  y = x == 0.f ? -kInf : y;
  y = x < 0.f ? __builtin_nanf("") : y;
  return x != x ? x : y;
}

// log(x) = e ln2 + log(1 + f) with split_log's e and f.
PREFOPT_HD PREFOPT_INLINE float fast_log(float x) {
  const LogSplit s = split_log(x);
  return log_assemble(x, s.e, log1p_reduced(s.f));
}

// expm1(x) = 2^k expm1(r) + (2^k - 1) with the reduction of fast_exp: the leading r of
// expm1(r) is exact, so small |x| keep full relative accuracy (exp(x) - 1 would cancel).
// About 1 ulp. Past k = 64 the -1 no longer matters and 2^k is applied in its two factors as
// in fast_exp, so x up to the overflow threshold stays finite.
PREFOPT_HD PREFOPT_INLINE float fast_expm1(float x) {
  float xc = x < -88.f ? -88.f : x;  // the result is -1 in fp32 long before that
  xc = xc > 88.8f ? 88.8f : xc;
  const ExpReduction e = exp_reduce(xc);
  const float s = e.s1 * e.s2;
  const float near = fmadd(s, e.em1, s - 1.f);
  const float far = ((1.f + e.em1) * e.s1) * e.s2;
  return e.k > 64 ? far : near;  // NaN propagates through em1 on both sides
}

// log1p(x) = e ln2 + log(1 + f + c 2^-e) for u = 1 + x rounded = 2^e (1 + f) and
// c = x - (u - 1) the rounding error of that sum (exact for |x| < 1): for e = 0, f + c is x
// itself, so tiny |x| give x, and elsewhere |log1p(x)| > 0.34 absorbs the rounding of
// f + c 2^-e. One division (fast_log's), none for the correction. u = 0, inf, NaN and
// negative u take fast_log's values (whatever c became there).
PREFOPT_HD PREFOPT_INLINE float fast_log1p(float x) {
  const float u = 1.f + x;
  const LogSplit s = split_log(u);
  const float c = x - (u - 1.f);
  const float f = fmadd(c, exp2_int(-s.e), s.f);
  return log_assemble(u, s.e, log1p_reduced(f));
}

PREFOPT_HD PREFOPT_INLINE float bf16_to_float(uint16_t h) {
  return bits_to_float(static_cast<uint32_t>(h) << 16);
}

// IEEE half -> float. The 15 magnitude bits placed at fp32 bit 13 read as the value times
// 2^-112 for normals and subnormals alike; inf/NaN keep their payload with a full exponent.
PREFOPT_HD PREFOPT_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t mag = static_cast<uint32_t>(h) & 0x7fffu;
  const uint32_t finite = float_to_bits(bits_to_float(mag << 13) * 0x1p112f);
  const uint32_t special = (mag << 13) | 0x7f800000u;
  return bits_to_float((mag >= 0x7c00u ? special : finite) | sign);
}

// float -> bf16, round to nearest even; NaN stays a quiet NaN.
PREFOPT_HD PREFOPT_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

// float -> IEEE half, round to nearest even, overflow to inf, NaN to a quiet NaN.
PREFOPT_HD PREFOPT_INLINE uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Normal range: round the mantissa to 10 bits and rebias the exponent (127 -> 15); a
  // rounding carry moves into the exponent and at the top of the range into inf.
  const uint32_t normal = (a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
  // Below 2^-14: adding 0.5 rounds the value to a multiple of 2^-24 (ties to even), which is
  // exactly the half subnormal grid; the bit difference counts the units.
  const uint32_t sub = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
  uint32_t h = a < 0x38800000u ? sub : normal;
  h = a >= 0x47800000u ? 0x7c00u : h;
  h = a > 0x7f800000u ? 0x7e00u : h;
  return static_cast<uint16_t>(h | sign);
}

PREFOPT_MATH_END
}  // namespace prefopt
