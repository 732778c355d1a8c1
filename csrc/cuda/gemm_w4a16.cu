// gemm_w4a16: weight-only uint4 GEMM/GEMV, y = x · (q·scale + zero)ᵀ + bias (contract: reference.w4a16_linear).
// Same fp32 operations, in the same order, as the CPU kernels (csrc/cpu/gemm_w4a16_ref.cpp): the dequantization is
// factored out of each group's dot product,
//     accq = fma chain of x[m,k]·q[n,k] over k in the group (increasing k),  xs = x[m,k] summed likewise,
//     y = fma(scale[n,g], accq, y);  y = fma(zero[n,g], xs, y)   for g = 0, 1, ...;  y = y + bias[n],
// one fma per weight on CUDA cores, fp32 throughout (a tensor-core path would round x and w to 16 bits first).
// Two kernels: a warp per output channel for M <= 8 (adaLN modulation runs at M = batch), its lanes taking one
// group each and then running the group chain in order; and a 64 x 64 shared-memory tiled kernel above that
// (T5 runs at M = tokens), one thread per 4 x 4 outputs walking k in order.
// Reads: layout.cuh "W4A16 codes" (uint32 [N, ceil(K/8)], nibble j = k 8w + j), scales/zeros fp32 [N, ceil(K/G)].
#include "common.cuh"

namespace nunchaku_cuda {
namespace {

constexpr int kGemvMaxM = 8;
constexpr int kGemvWarps = 4;
constexpr int kTile = 64;          // tiled GEMM: 64 x 64 outputs per block, 256 threads, 4 x 4 per thread
constexpr int kTileKStep = 32;     // inputs per shared-memory step (4 words per weight row)
constexpr int kTiledThreads = 256;

__device__ __forceinline__ float nibble(uint32_t word, int j) { return static_cast<float>((word >> (4 * j)) & 0xFu); }

template <typename T>
__global__ void __launch_bounds__(kGemvWarps * kWarpLanes)
gemv_w4a16_kernel(const T* __restrict__ x, int M, int N, int K, const uint32_t* __restrict__ qweight,
                  const float* __restrict__ scales, const float* __restrict__ zeros, int G,
                  const float* __restrict__ bias, T* __restrict__ out) {
    const int lane = threadIdx.x % kWarpLanes;
    const int n = blockIdx.x * kGemvWarps + threadIdx.x / kWarpLanes;
    if (n >= N) return;                                      // warp-uniform
    const int K8 = (K + 7) / 8, NG = (K + G - 1) / G;
    float y[kGemvMaxM];
#pragma unroll
    for (int m = 0; m < kGemvMaxM; ++m) y[m] = 0.0f;

    for (int g0 = 0; g0 < NG; g0 += kWarpLanes) {
        // Lane i: accq and xs of group g0 + i.
        const int grp = g0 + lane;
        float accq[kGemvMaxM], xs[kGemvMaxM], sc = 0.0f, ze = 0.0f;
#pragma unroll
        for (int m = 0; m < kGemvMaxM; ++m) accq[m] = xs[m] = 0.0f;
        if (grp < NG) {
            sc = __ldg(scales + static_cast<size_t>(n) * NG + grp);
            ze = __ldg(zeros + static_cast<size_t>(n) * NG + grp);
            const int k_end = min(K, (grp + 1) * G);
            for (int k = grp * G; k < k_end; k += 8) {       // G % 8 == 0: words never straddle groups
                const uint32_t word = __ldg(qweight + static_cast<size_t>(n) * K8 + k / 8);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if (k + j >= k_end) break;
                    const float q = nibble(word, j);
#pragma unroll
                    for (int m = 0; m < kGemvMaxM; ++m) {
                        if (m >= M) break;
                        const float xv = to_float(x[static_cast<size_t>(m) * K + k + j]);
                        accq[m] = fmaf(xv, q, accq[m]);
                        xs[m] = __fadd_rn(xs[m], xv);
                    }
                }
            }
        }
        // The chain over groups, in group order; every lane computes it (lane 0's result is stored).
        const int gn = min(kWarpLanes, NG - g0);
        for (int i = 0; i < gn; ++i) {
            const float s_i = __shfl_sync(0xffffffffu, sc, i), z_i = __shfl_sync(0xffffffffu, ze, i);
#pragma unroll
            for (int m = 0; m < kGemvMaxM; ++m) {
                const float a = __shfl_sync(0xffffffffu, accq[m], i), b = __shfl_sync(0xffffffffu, xs[m], i);
                y[m] = fmaf(z_i, b, fmaf(s_i, a, y[m]));
            }
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int m = 0; m < kGemvMaxM; ++m) {
            if (m >= M) break;
            const float v = bias ? __fadd_rn(y[m], bias[n]) : y[m];
            out[static_cast<size_t>(m) * N + n] = from_float<T>(v);
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(kTiledThreads)
gemm_w4a16_kernel(const T* __restrict__ x, int M, int N, int K, const uint32_t* __restrict__ qweight,
                  const float* __restrict__ scales, const float* __restrict__ zeros, int G,
                  const float* __restrict__ bias, T* __restrict__ out) {
    __shared__ float s_x[kTile][kTileKStep + 1];      // [m][k]  x widened to fp32
    __shared__ float s_q[kTile][kTileKStep + 1];      // [n][k]  codes as fp32
    const int m0 = blockIdx.y * kTile, n0 = blockIdx.x * kTile;
    const int K8 = (K + 7) / 8, NG = (K + G - 1) / G;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;   // rows m0 + 4*ty + u, columns n0 + 4*tx + v
    float y[4][4] = {}, accq[4][4] = {}, xs[4] = {};

    // y = fma(zero, xs, fma(scale, accq, y)) for group `grp`, then restart the group sums.
    auto flush = [&](int grp) {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
            const int n = n0 + 4 * tx + v;
            const float sc = n < N ? __ldg(scales + static_cast<size_t>(n) * NG + grp) : 0.0f;
            const float ze = n < N ? __ldg(zeros + static_cast<size_t>(n) * NG + grp) : 0.0f;
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                y[u][v] = fmaf(ze, xs[u], fmaf(sc, accq[u][v], y[u][v]));
                accq[u][v] = 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) xs[u] = 0.0f;
    };

    int grp = 0, grp_end = min(G, K);
    for (int k0 = 0; k0 < K; k0 += kTileKStep) {
        for (int e = threadIdx.x; e < kTile * kTileKStep; e += kTiledThreads) {
            const int i = e / kTileKStep, kk = e % kTileKStep, m = m0 + i, k = k0 + kk;
            s_x[i][kk] = (m < M && k < K) ? to_float(x[static_cast<size_t>(m) * K + k]) : 0.0f;
        }
        {   // 64 weight rows x 4 words: one word per thread
            const int i = threadIdx.x / 4, wq = threadIdx.x % 4, n = n0 + i, wi = k0 / 8 + wq;
            const uint32_t word = (n < N && wi < K8) ? __ldg(qweight + static_cast<size_t>(n) * K8 + wi) : 0u;
#pragma unroll
            for (int j = 0; j < 8; ++j) s_q[i][8 * wq + j] = nibble(word, j);
        }
        __syncthreads();
        const int kn = min(kTileKStep, K - k0);
        for (int kk = 0; kk < kn; ++kk) {
            if (k0 + kk == grp_end) {                          // block-uniform
                flush(grp);
                ++grp;
                grp_end = min(grp_end + G, K);
            }
            float a[4], b[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                a[u] = s_x[4 * ty + u][kk];
                b[u] = s_q[4 * tx + u][kk];
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                xs[u] = __fadd_rn(xs[u], a[u]);
#pragma unroll
                for (int v = 0; v < 4; ++v) accq[u][v] = fmaf(a[u], b[v], accq[u][v]);
            }
        }
        __syncthreads();
    }
    flush(grp);
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) {
            const int m = m0 + 4 * ty + u, n = n0 + 4 * tx + v;
            if (m >= M || n >= N) continue;
            const float v_out = bias ? __fadd_rn(y[u][v], bias[n]) : y[u][v];
            out[static_cast<size_t>(m) * N + n] = from_float<T>(v_out);
        }
}

static_assert(kTiledThreads == kTile * (kTileKStep / 8), "one weight word per thread per k step");

}  // namespace

cudaError_t gemm_w4a16(const void* x, DType dtype, int M, int N, int K, const uint32_t* qweight,
                       const float* scales, const float* zeros, int group_size, const float* bias, void* out,
                       cudaStream_t stream) {
    if (M < 0 || N <= 0 || K <= 0 || group_size <= 0 || group_size % 8 != 0) return cudaErrorInvalidValue;
    if (!x || !qweight || !scales || !zeros || !out) return cudaErrorInvalidValue;
    if (M == 0) return cudaSuccess;
    dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        const T* xt = static_cast<const T*>(x);
        T* ot = static_cast<T*>(out);
        if (M <= kGemvMaxM) {
            const dim3 grid((N + kGemvWarps - 1) / kGemvWarps);
            gemv_w4a16_kernel<T><<<grid, kGemvWarps * kWarpLanes, 0, stream>>>(xt, M, N, K, qweight, scales, zeros,
                                                                               group_size, bias, ot);
        } else {
            const dim3 grid((N + kTile - 1) / kTile, (M + kTile - 1) / kTile);
            gemm_w4a16_kernel<T><<<grid, kTiledThreads, 0, stream>>>(xt, M, N, K, qweight, scales, zeros,
                                                                     group_size, bias, ot);
        }
    });
    return cudaGetLastError();
}

}  // namespace nunchaku_cuda
