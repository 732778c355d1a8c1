// The group loop shared by the SIMD activation quantizers (quantize_act_avx2.cpp, quantize_act_avx512vnni.cpp):
// rows m0 .. m0 + n - 1 of one chunk of inputs [k0, k0 + kc), already widened to fp32 in xf, quantized group by group
// with the including file's own group quantizers (Int4, Nvfp4), and each group's acorr written (layout.h,
// "Activations"). A `static` template: every ISA file gets its own copy, compiled with its own flags (kernels.h).
#pragma once

#include <cstdint>

#include "../layout.h"
#include "kernels.h"

namespace svdq_cpu {

template <bool kNvfp4, auto Int4, auto Nvfp4, int kChunk>
static inline void quantize_chunk_groups(const QuantArgs& a, const float (*xf)[kChunk], int64_t m0, int n, int64_t k0,
                                         int kc) {
    const int64_t G = kNvfp4 ? kGroupNvfp4 : kGroupInt4, groups = a.K / G;
    for (int i = 0; i < n; ++i) {
        const int64_t m = m0 + i;
        for (int j = 0; j < kc; j += int(G)) {
            const int64_t k = k0 + j, g = k / G;
            int32_t sum;
            if constexpr (kNvfp4) {
                sum = Nvfp4(&xf[i][j], a.smooth + k, a.act + m * a.K + k, a.codes ? a.codes + m * a.K + k : nullptr,
                            a.ascale + m * groups + g);
            } else {
                sum = Int4(&xf[i][j], a.smooth + k, a.shifted, a.act + m * a.K + k, a.ascale + m * groups + g);
            }
            a.acorr[m * groups + g] = -(kNvfp4 ? kNvfp4Offset : kInt4Offset) * sum;
        }
    }
}

}  // namespace svdq_cpu
