// 8-lane load/store helpers for the *_avx2.cpp files only (they are compiled with -mavx2 -mfma -mf16c; see
// setup.py). `static inline`, so no other file can end up calling these copies.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "common.h"
#include "kernels.h"

namespace svdq_cpu {

static inline int32_t load_i32(const int8_t* p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return v;
}

// 8 consecutive values of a fp32/bf16/fp16 array, widened to fp32 (exact).
static inline __m256 load8(const void* p, DType t, int64_t i) {
    switch (t) {
        case DType::kFloat32: return _mm256_loadu_ps(static_cast<const float*>(p) + i);
        case DType::kBFloat16: {
            const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
            return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        }
        default: {
            const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
            return _mm256_cvtph_ps(h);
        }
    }
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

static inline int32_t hsum8_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

static inline __m256 abs8(__m256 v) { return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }

// Low byte of each of 8 int32 lanes -> p[0..7].
static inline void store8_i8(int8_t* p, __m256i v) {
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i b = _mm256_shuffle_epi8(v, pick);
    const int32_t lo = _mm256_extract_epi32(b, 0), hi = _mm256_extract_epi32(b, 4);
    __builtin_memcpy(p, &lo, 4);
    __builtin_memcpy(p + 4, &hi, 4);
}

// Store the first `count` (<= 8) lanes to out[i ..] in dtype t, rounding to nearest even (torch's cast bits).
static inline void store8(void* out, DType t, int64_t i, __m256 v, int64_t count) {
    if (count <= 0) return;
    alignas(32) uint16_t h[8];
    switch (t) {
        case DType::kFloat32:
            if (count >= 8) {
                _mm256_storeu_ps(static_cast<float*>(out) + i, v);
            } else {
                alignas(32) float f[8];
                _mm256_store_ps(f, v);
                for (int64_t j = 0; j < count; ++j) static_cast<float*>(out)[i + j] = f[j];
            }
            return;
        case DType::kBFloat16: {
            const __m256i u = _mm256_castps_si256(v);
            const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
            __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
            const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
            r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // 8 x u16 in the low 128 bits
            _mm_store_si128(reinterpret_cast<__m128i*>(h), _mm256_castsi256_si128(r));
            break;
        }
        default:
            _mm_store_si128(reinterpret_cast<__m128i*>(h), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            break;
    }
    uint16_t* o = static_cast<uint16_t*>(out) + i;
    if (count >= 8) {
        __builtin_memcpy(o, h, 16);
    } else {
        for (int64_t j = 0; j < count; ++j) o[j] = h[j];
    }
}

}  // namespace svdq_cpu
