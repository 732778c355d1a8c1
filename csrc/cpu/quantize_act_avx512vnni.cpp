// Activation quantization + low-rank down-projection, AVX-512. Same fp32 operations in the same order as
// quantize_act_ref.cpp (IEEE division, not a reciprocal; vroundscaleps = round half to even), so the codes and
// scales are bit-identical to nunchaku_core/reference.py, and lora is the same fma chain over k.
//
// Blocks of 16 rows, in chunks of 256 inputs, four rows at a time: the chunk is widened to fp32 once (xf, 4 KiB,
// stays in L1), then quantized and multiplied into the low-rank accumulators, so x is read from memory once and D
// once per 16 rows.
// Output layouts: csrc/layout.h ("Activations").
#include "../layout.h"
#include "common.h"
#include "kernels.h"
#include "quantize_groups.h"
#include "simd_avx512.h"

namespace svdq_cpu {

namespace {

constexpr int kRows = 4;  // rows widened and quantized together
constexpr int kChunk = 256;
constexpr int kBlockRows = kRowsPerQuantBlock;  // rows sharing one pass over D (layout.h)

static inline int32_t quantize_group_int4(const float* xf, const float* smooth, bool shifted, int8_t* act,
                                          float* ascale) {
    __m512 t[4];
    __m512 amax = _mm512_setzero_ps();
    for (int q = 0; q < 4; ++q) {
        __m512 v = _mm512_loadu_ps(xf + 16 * q);
        if (shifted) v = _mm512_add_ps(v, _mm512_set1_ps(kSigma));
        t[q] = _mm512_div_ps(v, _mm512_loadu_ps(smooth + 16 * q));
        amax = _mm512_max_ps(amax, _mm512_abs_ps(t[q]));
    }
    const float qmax = shifted ? 15.0f : 7.0f;
    const float scale = _mm512_reduce_max_ps(amax) / qmax;
    *ascale = scale;
    if (!(scale > 0.0f)) {
        _mm512_storeu_si512(act, _mm512_setzero_si512());
        return 0;
    }
    const __m512 vs = _mm512_set1_ps(scale), hi = _mm512_set1_ps(qmax), lo = _mm512_set1_ps(shifted ? 0.0f : -7.0f);
    __m512i sum = _mm512_setzero_si512();
    for (int q = 0; q < 4; ++q) {
        __m512 r = _mm512_roundscale_ps(_mm512_div_ps(t[q], vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512i c = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
        sum = _mm512_add_epi32(sum, c);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(act + 16 * q), _mm512_cvtepi32_epi8(c));
    }
    return _mm512_reduce_add_epi32(sum);
}

static inline int32_t quantize_group_nvfp4(const float* xf, const float* smooth, int8_t* act, int8_t* codes,
                                           float* ascale) {
    const __m512 t = _mm512_div_ps(_mm512_loadu_ps(xf), _mm512_loadu_ps(smooth));
    const float scale = round_e4m3(min_f32(_mm512_reduce_max_ps(_mm512_abs_ps(t)) / 6.0f, 448.0f));
    *ascale = scale;
    if (!(scale > 0.0f)) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(act), _mm_setzero_si128());
        if (codes) _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm_setzero_si128());
        return 0;
    }
    const __m512 v = _mm512_div_ps(t, _mm512_set1_ps(scale));
    const __m512 m = _mm512_abs_ps(v);
    const __m512i one = _mm512_set1_epi32(1);
    // e2m1_code: count the midpoints passed, `>` above even codes and `>=` above odd ones (ties to even).
    __m512i c = _mm512_setzero_si512();
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.25f), _CMP_GT_OQ), c, one);
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.75f), _CMP_GE_OQ), c, one);
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.25f), _CMP_GT_OQ), c, one);
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.75f), _CMP_GE_OQ), c, one);
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(m, _mm512_set1_ps(2.5f), _CMP_GT_OQ), c, one);
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(m, _mm512_set1_ps(3.5f), _CMP_GE_OQ), c, one);
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(m, _mm512_set1_ps(5.0f), _CMP_GT_OQ), c, one);
    const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512i twice = _mm512_setr_epi32(0, 1, 2, 3, 4, 6, 8, 12, 0, 1, 2, 3, 4, 6, 8, 12);
    __m512i a2 = _mm512_permutexvar_epi32(c, twice);
    a2 = _mm512_mask_sub_epi32(a2, neg, _mm512_setzero_si512(), a2);
    if (codes) {
        const __m512i code = _mm512_mask_or_epi32(c, neg, c, _mm512_set1_epi32(8));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtepi32_epi8(code));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(act), _mm512_cvtepi32_epi8(a2));
    return _mm512_reduce_add_epi32(a2);
}

// lacc[i][r0 .. r0+16·RV) += fma chain over the chunk's k of xf[i][k]·D[k][r] (continuing each output's chain).
// D: the chunk's rows of proj_down, in dtype DT (widened exactly; a template argument, out of the inner loop).
template <int RV, DType DT>
static inline void lora_chunk(const float (*xf)[kChunk], int kc, const void* D, int64_t R16, float (*lacc)[kMaxRank16],
                              int64_t r0) {
    __m512 acc[kRows][RV];
    for (int i = 0; i < kRows; ++i)
        for (int v = 0; v < RV; ++v) acc[i][v] = _mm512_loadu_ps(&lacc[i][r0 + 16 * v]);
    for (int k = 0; k < kc; ++k) {
        for (int v = 0; v < RV; ++v) {
            const __m512 d = load16(D, DT, k * R16 + r0 + 16 * v);
            for (int i = 0; i < kRows; ++i) acc[i][v] = _mm512_fmadd_ps(_mm512_set1_ps(xf[i][k]), d, acc[i][v]);
        }
    }
    for (int i = 0; i < kRows; ++i)
        for (int v = 0; v < RV; ++v) _mm512_storeu_ps(&lacc[i][r0 + 16 * v], acc[i][v]);
}

template <int RV>
static inline void lora_chunk_any(const float (*xf)[kChunk], int kc, const void* D, DType dt, int64_t R16,
                                  float (*lacc)[kMaxRank16], int64_t r0) {
    with_dtype(dt, [&](auto d) { lora_chunk<RV, decltype(d)::value>(xf, kc, D, R16, lacc, r0); });
}

// Rows [m0, m0 + rows), rows <= kBlockRows, in chunks of kChunk inputs. Each chunk is handled four rows at a time
// (widened to fp32 in xf, quantized, multiplied into the low-rank accumulators), so the chunk of D (kChunk x R16
// fp32, 32 KiB at rank 32) is read from L2/L3 once per kBlockRows rows and from L1 for the other row quads: at
// K = 12288, D (1.5 MiB) does not fit L2 and was the quantizer's main cost.
template <bool kNvfp4>
void quantize_rows(const QuantArgs& a, int64_t m0, int rows) {
    alignas(64) float xf[kRows][kChunk];
    alignas(64) float lacc[kBlockRows][kMaxRank16];
    for (int i = 0; i < kBlockRows; ++i)
        for (int64_t r = 0; r < a.R16; ++r) lacc[i][r] = 0.0f;
    for (int64_t k0 = 0; k0 < a.K; k0 += kChunk) {
        const int kc = int(min_i64(kChunk, a.K - k0));  // a multiple of G, so of 16
        for (int q = 0; q < rows; q += kRows) {
            const int n = int(min_i64(kRows, rows - q));
            for (int i = 0; i < kRows; ++i) {
                for (int j = 0; j < kc; j += 16) {
                    const __m512 v = i < n ? load16(a.x, a.xdtype, (m0 + q + i) * a.ldx + k0 + j) : _mm512_setzero_ps();
                    _mm512_store_ps(&xf[i][j], v);
                }
            }
            quantize_chunk_groups<kNvfp4, quantize_group_int4, quantize_group_nvfp4, kChunk>(a, xf, m0 + q, n, k0, kc);
            if (a.lora == nullptr) continue;
            const void* D = static_cast<const char*>(a.proj_down) + k0 * a.R16 * dtype_bytes(a.down_dtype);
            float(*la)[kMaxRank16] = lacc + q;  // rows q+n.. (zero x) are never stored
            for (int64_t r0 = 0; r0 < a.R16; r0 += 64) {
                switch (min_i64(4, (a.R16 - r0) / 16)) {
                    case 1: lora_chunk_any<1>(xf, kc, D, a.down_dtype, a.R16, la, r0); break;
                    case 2: lora_chunk_any<2>(xf, kc, D, a.down_dtype, a.R16, la, r0); break;
                    case 3: lora_chunk_any<3>(xf, kc, D, a.down_dtype, a.R16, la, r0); break;
                    default: lora_chunk_any<4>(xf, kc, D, a.down_dtype, a.R16, la, r0); break;
                }
            }
        }
    }
    if (a.lora != nullptr) {
        for (int i = 0; i < rows; ++i)
            for (int64_t r = 0; r < a.R16; ++r) a.lora[(m0 + i) * a.R16 + r] = lacc[i][r];
    }
}

template <bool kNvfp4>
void quantize_range(const QuantArgs& a, int64_t row_begin, int64_t row_end) {
    for (int64_t m = row_begin; m < row_end; m += kBlockRows) {
        quantize_rows<kNvfp4>(a, m, int(min_i64(kBlockRows, row_end - m)));
    }
}

}  // namespace

void quantize_act_int4_avx512vnni(const QuantArgs& a, int64_t row_begin, int64_t row_end) {
    quantize_range<false>(a, row_begin, row_end);
}

void quantize_act_nvfp4_avx512vnni(const QuantArgs& a, int64_t row_begin, int64_t row_end) {
    quantize_range<true>(a, row_begin, row_end);
}

}  // namespace svdq_cpu
