// Activation quantization + low-rank down-projection, portable scalar C++: the readable mirror of
// reference.quantize_act_int4 / quantize_act_nvfp4 / x·D. Every step is the reference's fp32 operation in the
// reference's order (widen, add σ, divide by smooth, absmax, divide, round half to even, clamp), so the codes and
// scales are bit-identical to it. Output layouts: csrc/layout.h ("Activations").
#include <algorithm>

#include "../layout.h"
#include "common.h"
#include "kernels.h"

namespace svdq_cpu {

namespace {

// lora[m, r] = fma chain over k = 0..K-1 of x[m, k]·D[k, r], starting at 0 (the order every variant uses).
void lora_down_row(const QuantArgs& a, int64_t m) {
    if (a.lora == nullptr) return;
    for (int64_t r = 0; r < a.R16; ++r) {
        float acc = 0.0f;
        for (int64_t k = 0; k < a.K; ++k) {
            const float d = load_as_float(a.proj_down, a.down_dtype, k * a.R16 + r);
            acc = std::fma(load_as_float(a.x, a.xdtype, m * a.ldx + k), d, acc);
        }
        a.lora[m * a.R16 + r] = acc;
    }
}

}  // namespace

void quantize_act_int4_ref(const QuantArgs& a, int64_t row_begin, int64_t row_end) {
    const int64_t G = kGroupInt4, groups = a.K / G;
    const float qmax = a.shifted ? 15.0f : 7.0f, qmin = a.shifted ? 0.0f : -7.0f;
    float t[kGroupInt4];
    for (int64_t m = row_begin; m < row_end; ++m) {
        for (int64_t g = 0; g < groups; ++g) {
            float amax = 0.0f;
            for (int64_t j = 0; j < G; ++j) {
                const int64_t k = g * G + j;
                float v = load_as_float(a.x, a.xdtype, m * a.ldx + k);
                if (a.shifted) v = v + kSigma;
                v = v / a.smooth[k];
                t[j] = v;
                amax = std::max(amax, std::fabs(v));
            }
            const float scale = amax / qmax;
            int32_t sum = 0;
            for (int64_t j = 0; j < G; ++j) {
                int32_t q = 0;
                if (scale > 0.0f) q = int32_t(std::min(std::max(std::nearbyint(t[j] / scale), qmin), qmax));
                a.act[m * a.K + g * G + j] = int8_t(q);
                sum += q;
            }
            a.ascale[m * groups + g] = scale;
            a.acorr[m * groups + g] = -kInt4Offset * sum;
        }
        lora_down_row(a, m);
    }
}

void quantize_act_nvfp4_ref(const QuantArgs& a, int64_t row_begin, int64_t row_end) {
    const int64_t G = kGroupNvfp4, groups = a.K / G;
    float t[kGroupNvfp4];
    for (int64_t m = row_begin; m < row_end; ++m) {
        for (int64_t g = 0; g < groups; ++g) {
            float amax = 0.0f;
            for (int64_t j = 0; j < G; ++j) {
                const int64_t k = g * G + j;
                const float v = load_as_float(a.x, a.xdtype, m * a.ldx + k) / a.smooth[k];
                t[j] = v;
                amax = std::max(amax, std::fabs(v));
            }
            const float scale = round_e4m3(std::min(amax / 6.0f, 448.0f));
            int32_t sum = 0;
            for (int64_t j = 0; j < G; ++j) {
                const int code = scale > 0.0f ? e2m1_code(t[j] / scale) : 0;
                const int64_t k = g * G + j;
                a.act[m * a.K + k] = kE2m1Twice[code];
                if (a.codes != nullptr) a.codes[m * a.K + k] = int8_t(code);
                sum += kE2m1Twice[code];
            }
            a.ascale[m * groups + g] = scale;
            a.acorr[m * groups + g] = -kNvfp4Offset * sum;
        }
        lora_down_row(a, m);
    }
}

}  // namespace svdq_cpu
