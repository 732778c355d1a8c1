// 16-lane load/store helpers for the *_avx512vnni.cpp files only (they are compiled with -mavx512*; see setup.py).
// `static inline`, so no other file can end up calling these copies.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

namespace svdq_cpu {

// 16 consecutive values of a fp32/bf16/fp16 array, widened to fp32 (exact).
static inline __m512 load16(const void* p, DType t, int64_t i) {
    switch (t) {
        case DType::kFloat32: return _mm512_loadu_ps(static_cast<const float*>(p) + i);
        case DType::kBFloat16: {
            const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
            return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        }
        default: {
            const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
            return _mm512_cvtph_ps(h);
        }
    }
}

// fp32 -> bf16 bits, round to nearest even, NaN -> 0x7FC0 (common.h float_to_bf16, 16 lanes).
static inline __m256i bf16_from_ps(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}

// Store the lanes of `mask` to out[i .. i+15] in dtype t, rounding to nearest even (same bits as torch's casts).
static inline void store16(void* out, DType t, int64_t i, __m512 v, __mmask16 mask) {
    switch (t) {
        case DType::kFloat32: _mm512_mask_storeu_ps(static_cast<float*>(out) + i, mask, v); break;
        case DType::kBFloat16:
            _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + i, mask, bf16_from_ps(v));
            break;
        default:
            _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + i, mask,
                                     _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            break;
    }
}

static inline __mmask16 lanes_below(int64_t n) {
    return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n > 0 ? n : 0)) - 1u);
}

}  // namespace svdq_cpu
