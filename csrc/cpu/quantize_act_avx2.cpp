// Activation quantization + low-rank down-projection, AVX2 (8 lanes). Same structure and the same fp32 operations
// in the same order as quantize_act_avx512vnni.cpp (read that file's header); bit-identical to the reference.
#include "../layout.h"
#include "common.h"
#include "kernels.h"
#include "quantize_groups.h"
#include "simd_avx2.h"

namespace svdq_cpu {

namespace {

constexpr int kRows = 4;  // rows widened and quantized together
constexpr int kChunk = 256;

static inline int32_t quantize_group_int4(const float* xf, const float* smooth, bool shifted, int8_t* act,
                                          float* ascale) {
    __m256 t[8];
    __m256 amax = _mm256_setzero_ps();
    for (int q = 0; q < 8; ++q) {
        __m256 v = _mm256_loadu_ps(xf + 8 * q);
        if (shifted) v = _mm256_add_ps(v, _mm256_set1_ps(kSigma));
        t[q] = _mm256_div_ps(v, _mm256_loadu_ps(smooth + 8 * q));
        amax = _mm256_max_ps(amax, abs8(t[q]));
    }
    const float qmax = shifted ? 15.0f : 7.0f;
    const float scale = hmax8(amax) / qmax;
    *ascale = scale;
    if (!(scale > 0.0f)) {
        for (int j = 0; j < kGroupInt4; ++j) act[j] = 0;
        return 0;
    }
    const __m256 vs = _mm256_set1_ps(scale), hi = _mm256_set1_ps(qmax), lo = _mm256_set1_ps(shifted ? 0.0f : -7.0f);
    __m256i sum = _mm256_setzero_si256();
    for (int q = 0; q < 8; ++q) {
        const __m256 r = _mm256_round_ps(_mm256_div_ps(t[q], vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256i c = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        sum = _mm256_add_epi32(sum, c);
        store8_i8(act + 8 * q, c);
    }
    return hsum8_i32(sum);
}

static inline int32_t quantize_group_nvfp4(const float* xf, const float* smooth, int8_t* act, int8_t* codes,
                                           float* ascale) {
    const __m256 t0 = _mm256_div_ps(_mm256_loadu_ps(xf), _mm256_loadu_ps(smooth));
    const __m256 t1 = _mm256_div_ps(_mm256_loadu_ps(xf + 8), _mm256_loadu_ps(smooth + 8));
    const float scale = round_e4m3(min_f32(hmax8(_mm256_max_ps(abs8(t0), abs8(t1))) / 6.0f, 448.0f));
    *ascale = scale;
    if (!(scale > 0.0f)) {
        for (int j = 0; j < kGroupNvfp4; ++j) act[j] = 0;
        if (codes)
            for (int j = 0; j < kGroupNvfp4; ++j) codes[j] = 0;
        return 0;
    }
    const __m256i twice = _mm256_setr_epi32(0, 1, 2, 3, 4, 6, 8, 12);
    __m256i sum = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
        const __m256 v = _mm256_div_ps(h ? t1 : t0, _mm256_set1_ps(scale));
        const __m256 m = abs8(v);
        // e2m1_code: count the midpoints passed (a true compare is -1, so subtract), ties to even.
        __m256i c = _mm256_setzero_si256();
        c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(m, _mm256_set1_ps(0.25f), _CMP_GT_OQ)));
        c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(m, _mm256_set1_ps(0.75f), _CMP_GE_OQ)));
        c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(m, _mm256_set1_ps(1.25f), _CMP_GT_OQ)));
        c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(m, _mm256_set1_ps(1.75f), _CMP_GE_OQ)));
        c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(m, _mm256_set1_ps(2.5f), _CMP_GT_OQ)));
        c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(m, _mm256_set1_ps(3.5f), _CMP_GE_OQ)));
        c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(m, _mm256_set1_ps(5.0f), _CMP_GT_OQ)));
        const __m256i neg = _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ));
        __m256i a2 = _mm256_permutevar8x32_epi32(twice, c);
        a2 = _mm256_sub_epi32(_mm256_xor_si256(a2, neg), neg);  // negate where neg (neg = -1)
        if (codes) store8_i8(codes + 8 * h, _mm256_or_si256(c, _mm256_and_si256(neg, _mm256_set1_epi32(8))));
        store8_i8(act + 8 * h, a2);
        sum = _mm256_add_epi32(sum, a2);
    }
    return hsum8_i32(sum);
}

// lacc[i][r0 .. r0+16) continues each output's fma chain over the chunk's k. D: the chunk's rows of proj_down in
// dtype DT (widened exactly; a template argument, out of the inner loop).
template <DType DT>
static inline void lora_chunk(const float (*xf)[kChunk], int kc, const void* D, int64_t R16, float (*lacc)[kMaxRank16],
                              int64_t r0) {
    __m256 acc[kRows][2];
    for (int i = 0; i < kRows; ++i)
        for (int v = 0; v < 2; ++v) acc[i][v] = _mm256_loadu_ps(&lacc[i][r0 + 8 * v]);
    for (int k = 0; k < kc; ++k) {
        for (int v = 0; v < 2; ++v) {
            const __m256 d = load8(D, DT, k * R16 + r0 + 8 * v);
            for (int i = 0; i < kRows; ++i) acc[i][v] = _mm256_fmadd_ps(_mm256_set1_ps(xf[i][k]), d, acc[i][v]);
        }
    }
    for (int i = 0; i < kRows; ++i)
        for (int v = 0; v < 2; ++v) _mm256_storeu_ps(&lacc[i][r0 + 8 * v], acc[i][v]);
}

template <bool kNvfp4>
void quantize_rows(const QuantArgs& a, int64_t m0, int rows) {
    alignas(32) float xf[kRows][kChunk];
    alignas(32) float lacc[kRows][kMaxRank16];
    for (int i = 0; i < kRows; ++i)
        for (int64_t r = 0; r < a.R16; ++r) lacc[i][r] = 0.0f;
    for (int64_t k0 = 0; k0 < a.K; k0 += kChunk) {
        const int kc = int(min_i64(kChunk, a.K - k0));
        for (int i = 0; i < kRows; ++i) {
            for (int j = 0; j < kc; j += 8) {
                const __m256 v = i < rows ? load8(a.x, a.xdtype, (m0 + i) * a.ldx + k0 + j) : _mm256_setzero_ps();
                _mm256_store_ps(&xf[i][j], v);
            }
        }
        quantize_chunk_groups<kNvfp4, quantize_group_int4, quantize_group_nvfp4, kChunk>(a, xf, m0, rows, k0, kc);
        if (a.lora == nullptr) continue;
        const void* D = static_cast<const char*>(a.proj_down) + k0 * a.R16 * dtype_bytes(a.down_dtype);
        with_dtype(a.down_dtype, [&](auto d) {
            for (int64_t r0 = 0; r0 < a.R16; r0 += 16) lora_chunk<decltype(d)::value>(xf, kc, D, a.R16, lacc, r0);
        });
    }
    if (a.lora != nullptr) {
        for (int i = 0; i < rows; ++i)
            for (int64_t r = 0; r < a.R16; ++r) a.lora[(m0 + i) * a.R16 + r] = lacc[i][r];
    }
}

template <bool kNvfp4>
void quantize_range(const QuantArgs& a, int64_t row_begin, int64_t row_end) {
    for (int64_t m = row_begin; m < row_end; m += kRows) quantize_rows<kNvfp4>(a, m, int(min_i64(kRows, row_end - m)));
}

}  // namespace

void quantize_act_int4_avx2(const QuantArgs& a, int64_t row_begin, int64_t row_end) {
    quantize_range<false>(a, row_begin, row_end);
}

void quantize_act_nvfp4_avx2(const QuantArgs& a, int64_t row_begin, int64_t row_end) {
    quantize_range<true>(a, row_begin, row_end);
}

}  // namespace svdq_cpu
