// Scalar helpers shared by every CPU variant: dtype conversions and the float8 / e2m1 roundings of
// nunchaku_core/reference.py. All `static inline` (internal linkage): each ISA file gets its own copy, compiled
// with its own flags (see kernels.h). No -ffast-math anywhere: these must be exact IEEE operations.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels.h"

namespace svdq_cpu {

constexpr float kSigma = 0.171875f;  // FORMAT.md §1 shift of post-GELU layers (nunchaku_core.layer.SIGMA)

// std::min/std::fill and friends are templates with vague linkage: an out-of-line copy compiled in an AVX-512 file
// could be the one the linker keeps for every file. The ISA files use these instead.
static inline int64_t min_i64(int64_t a, int64_t b) { return b < a ? b : a; }
static inline float min_f32(float a, float b) { return b < a ? b : a; }  // as std::min: NaN in `a` passes

static inline float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t float_to_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

static inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Round to nearest even; NaN -> 0x7FC0. The same bits as torch's float -> bfloat16 conversion.
static inline uint16_t float_to_bf16(float f) {
    if (std::isnan(f)) return 0x7FC0;
    uint32_t u = float_to_bits(f);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
        const float v = std::ldexp(float(mant), -24);
        return sign ? -v : v;
    }
    if (exp == 31) return bits_to_float(sign | 0x7F800000u | (mant << 13));
    return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round to nearest even, overflow to inf, NaN -> 0x7E00: the same bits as torch's float -> half conversion.
static inline uint16_t float_to_half(float f) {
    const uint32_t u = float_to_bits(f);
    const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return sign | 0x7E00u;
    if (a >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to inf
    if (a < 0x38800000u) {                         // below 2^-14: multiples of 2^-24 (exact scaling, then rint)
        return sign | uint16_t(std::nearbyint(bits_to_float(a) * 16777216.0f));
    }
    const uint32_t r = a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u);  // rebias 127 -> 15, round 23 -> 10 bits
    return sign | uint16_t(r >> 13);
}

static inline int64_t dtype_bytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Calls f(std::integral_constant<DType, t>{}) for a run-time t: kernels take an array's dtype as a template argument
// (decltype(d)::value), so their inner loops carry no switch.
template <typename F>
static inline void with_dtype(DType t, F&& f) {
    switch (t) {
        case DType::kFloat32: f(std::integral_constant<DType, DType::kFloat32>{}); break;
        case DType::kBFloat16: f(std::integral_constant<DType, DType::kBFloat16>{}); break;
        default: f(std::integral_constant<DType, DType::kFloat16>{}); break;
    }
}

static inline float load_as_float(const void* p, DType t, int64_t i) {
    switch (t) {
        case DType::kFloat32: return static_cast<const float*>(p)[i];
        case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
        default: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    }
}

static inline void store_from_float(void* p, DType t, int64_t i, float v) {
    switch (t) {
        case DType::kFloat32: static_cast<float*>(p)[i] = v; break;
        case DType::kBFloat16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
        default: static_cast<uint16_t*>(p)[i] = float_to_half(v); break;
    }
}

// Nearest float8_e4m3fn value (ties to even) as fp32, for 0 <= f <= 448 (the reference clamps to 448 first, so
// there is no overflow); NaN passes through. Same value as torch's `.to(torch.float8_e4m3fn).float()`.
static inline float round_e4m3(float f) {
    if (!(f >= 0.0f)) return f;
    if (f < 0.015625f) return std::nearbyint(f * 512.0f) / 512.0f;  // below 2^-6: subnormal grid of step 2^-9
    uint32_t u = float_to_bits(f);
    u += 0x7FFFFu + ((u >> 20) & 1u);  // keep 3 mantissa bits, ties to even
    return bits_to_float(u & 0xFFF00000u);
}

// e2m1 code of v (reference.e2m1_round): magnitude index by midpoints, `>` where the lower code is even and `>=`
// where it is odd (ties to even); sign bit for every v < 0, also when the magnitude rounds to 0.
static inline int e2m1_code(float v) {
    const float m = std::fabs(v);
    const int c = (m > 0.25f) + (m >= 0.75f) + (m > 1.25f) + (m >= 1.75f) + (m > 2.5f) + (m >= 3.5f) + (m > 5.0f);
    return c | (v < 0.0f ? 8 : 0);
}

// 2 * e2m1 value by code (codes 8..15 negative): the integer operand of the NVFP4 dot products.
static constexpr int8_t kE2m1Twice[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

}  // namespace svdq_cpu
