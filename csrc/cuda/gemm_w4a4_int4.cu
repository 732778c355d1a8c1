// gemm_w4a4_int4: INT4 W4A4 GEMM on tensor cores (mma m16n8k64 s4·s4 / u4·s4 on sm_80+, 4 x m8n8k32 on sm_75)
// with the SVDQuant epilogue. Contract: reference.gemm_w4a4 + lowrank_branch + bias,
//   out[m, n] = Σ_g (Σ_{k∈g} qa[m,k]·qw[n,k]) · sa[m,g] · sw[n,g]  +  Σ_r lora_act[m,r]·U[n,r]  +  bias[n],
// computed with the fp32 operations of the CPU kernels (csrc/cpu/kernels.h, W4A4Args), in the same order:
//   acc = fma(float(dot_g) · sa[m,g], sw[n,g], acc) for g = 0, 1, ...;  then the epilogue of gemm_w4a4.cuh.
// One k64 tile is one INT4 group, so the MMA's s32 result is exactly dot_g (|dot_g| <= 64·15·8 < 2^24, exact in
// fp32); everything after it is the CPU's sequence, so the two backends should agree bit for bit (unverified:
// no GPU here).
// Reads: layout.cuh "Weight codes" (= Nunchaku qweight), "Weight scales" INT4, "Activation codes/scales" INT4.
#include "gemm_w4a4.cuh"

namespace nunchaku_cuda {
namespace {

template <typename T, bool kUnsignedA>
__global__ void __launch_bounds__(kGemmThreads, 1)
gemm_w4a4_int4_kernel(const uint4* __restrict__ act_codes, const float* __restrict__ act_scales, int M, int N, int K,
                      const uint32_t* __restrict__ wcodes, const float* __restrict__ wscales,
                      const float* __restrict__ lora_act, const float* __restrict__ U, int R,
                      const float* __restrict__ bias, T* __restrict__ out) {
    __shared__ GemmSmem sm;
    const int tn = blockIdx.x, bm = blockIdx.y;
    const int warp = threadIdx.x / kWarpLanes, lane = threadIdx.x % kWarpLanes;
    const int g = lane >> 2, t = lane & 3;
    const int KT = K / kTileK, M_pad = round_up(M, kMmaM), N_pad = round_up(N, kTileN);
    const int tm = bm * kGemmWarps + warp;                  // this warp's packed activation tile
    const bool active = tm < M_pad / kMmaM;                 // warp-uniform: the last block may be partial

    float acc[kNTiles][4];
#pragma unroll
    for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[j][c] = 0.0f;

    // Activation fragment and row scales of tile tk, fetched one tile ahead into registers.
    auto load_act = [&](int tk, uint4& a, float& sa0, float& sa1) {
        if (!active) { a = make_uint4(0, 0, 0, 0); sa0 = sa1 = 0.0f; return; }
        a = __ldg(act_codes + (static_cast<size_t>(tm) * KT + tk) * kWarpLanes + lane);
        sa0 = __ldg(act_scales + static_cast<size_t>(tk) * M_pad + kMmaM * tm + g);
        sa1 = __ldg(act_scales + static_cast<size_t>(tk) * M_pad + kMmaM * tm + g + 8);
    };
    const uint32_t* wscale_words = reinterpret_cast<const uint32_t*>(wscales);

    uint4 a_next;
    float sa0_next, sa1_next;
    load_act(0, a_next, sa0_next, sa1_next);
    load_weight_stage(sm, 0, wcodes, wscale_words, tn, 0, KT, N_pad);

    for (int tk = 0; tk < KT; ++tk) {
        const int s = tk & 1;
        const uint4 a = a_next;
        const float sa0 = sa0_next, sa1 = sa1_next;
        if (tk + 1 < KT) {
            load_weight_stage(sm, s ^ 1, wcodes, wscale_words, tn, tk + 1, KT, N_pad);
            load_act(tk + 1, a_next, sa0_next, sa1_next);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (active) {
            const float* sw = reinterpret_cast<const float*>(sm.ws[s]);
#pragma unroll
            for (int p = 0; p < kNTiles / 2; ++p) {
                const uint4 b = sm.w[s][p * kWarpLanes + lane];   // words (ns, ks): x (0,0) y (0,1) z (1,0) w (1,1)
#pragma unroll
                for (int ns = 0; ns < 2; ++ns) {
                    const int j = 2 * p + ns;
                    int d[4] = {0, 0, 0, 0};
                    mma_int4_16x8x64<kUnsignedA>(d, a, ns ? b.z : b.x, ns ? b.w : b.y);
                    const float sw0 = sw[8 * j + 2 * t], sw1 = sw[8 * j + 2 * t + 1];
                    acc[j][0] = fmaf(__fmul_rn(static_cast<float>(d[0]), sa0), sw0, acc[j][0]);
                    acc[j][1] = fmaf(__fmul_rn(static_cast<float>(d[1]), sa0), sw1, acc[j][1]);
                    acc[j][2] = fmaf(__fmul_rn(static_cast<float>(d[2]), sa1), sw0, acc[j][2]);
                    acc[j][3] = fmaf(__fmul_rn(static_cast<float>(d[3]), sa1), sw1, acc[j][3]);
                }
            }
        }
        __syncthreads();   // stage s is overwritten by the copies issued in the next iteration
    }

    epilogue<T>(sm, acc, nullptr, lora_act, U, R, bias, out, M, N, bm * kBlockM, tn * kTileN);
}

}  // namespace

cudaError_t gemm_w4a4_int4(const uint32_t* act_codes, const float* act_scales, bool act_unsigned, int M, int N,
                           int K, const uint32_t* wcodes, const float* wscales, const float* lora_act,
                           const float* proj_up, int R, const float* bias, void* out, DType dtype,
                           cudaStream_t stream) {
    if (!gemm_args_ok(act_codes, act_scales, M, N, K, wcodes, wscales, lora_act, proj_up, R, out))
        return cudaErrorInvalidValue;
    if (M == 0) return cudaSuccess;
    const dim3 grid(round_up(N, kTileN) / kTileN, round_up(M, kBlockM) / kBlockM);
    const auto* a = reinterpret_cast<const uint4*>(act_codes);
    dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        if (act_unsigned)
            gemm_w4a4_int4_kernel<T, true><<<grid, kGemmThreads, 0, stream>>>(
                a, act_scales, M, N, K, wcodes, wscales, lora_act, proj_up, R, bias, static_cast<T*>(out));
        else
            gemm_w4a4_int4_kernel<T, false><<<grid, kGemmThreads, 0, stream>>>(
                a, act_scales, M, N, K, wcodes, wscales, lora_act, proj_up, R, bias, static_cast<T*>(out));
    });
    return cudaGetLastError();
}

}  // namespace nunchaku_cuda
