// gemm_w4a4_nvfp4: NVFP4 W4A4 GEMM on sm_120a tensor cores (mma.sync ... kind::mxf4nvf4.block_scale.scale_vec::4X
// .m16n8k64 e2m1 x e2m1, ue4m3 group-16 scales applied inside the instruction) with the SVDQuant epilogue:
//   out[m, n] = out_scale[n] · Σ_g (Σ_{k∈g} qa·qw) · sa[m,g] · sw[n,g]  +  lora_act·Uᵀ  +  bias[n],
// out_scale = wtscale·wcscales (reference.output_scale, precomputed by the packer). Difference from the reference
// and the CPU kernels: the hardware forms and accumulates the scaled group products in fp32 in an unspecified
// order ("at least single precision", PTX ISA); the epilogue after it is the CPU's sequence (gemm_w4a4.cuh).
// Each group product is exact in fp32 (e2m1·e2m1 sums are multiples of 1/4 below 2^11, e4m3·e4m3 has 8 significant
// bits), so only the accumulation rounds. On other targets the kernel compiles to a trap and the host wrapper
// returns cudaErrorNotSupported before launching.
// Reads: layout.cuh "Weight codes" (e2m1 nibbles), "Weight scales" NVFP4, "Activation codes/scales" NVFP4.
#include "gemm_w4a4.cuh"

namespace nunchaku_cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kGemmThreads, 1)
gemm_w4a4_nvfp4_kernel(const uint4* __restrict__ act_codes, const uint32_t* __restrict__ act_scales, int M, int N,
                       int K, const uint32_t* __restrict__ wcodes, const uint32_t* __restrict__ wscales,
                       const float* __restrict__ out_scale, const float* __restrict__ lora_act,
                       const float* __restrict__ U, int R, const float* __restrict__ bias, T* __restrict__ out) {
#if NUNCHAKU_HAS_BLOCK_SCALE_MMA
    __shared__ GemmSmem sm;
    const int tn = blockIdx.x, bm = blockIdx.y;
    const int warp = threadIdx.x / kWarpLanes, lane = threadIdx.x % kWarpLanes;
    const int g = lane >> 2;
    const int KT = K / kTileK, M_pad = round_up(M, kMmaM), N_pad = round_up(N, kTileN);
    const int tm = bm * kGemmWarps + warp;
    const bool active = tm < M_pad / kMmaM;
    // SF_A: lanes t == 0 pass row g, lanes t == 1 row g + 8 (thread-id-a = 0); the others' words are ignored.
    const int scale_row = kMmaM * tm + g + 8 * (lane & 1);

    float acc[kNTiles][4];
#pragma unroll
    for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[j][c] = 0.0f;

    auto load_act = [&](int tk, uint4& a, uint32_t& sfa) {
        if (!active) { a = make_uint4(0, 0, 0, 0); sfa = 0; return; }
        a = __ldg(act_codes + (static_cast<size_t>(tm) * KT + tk) * kWarpLanes + lane);
        sfa = __ldg(act_scales + static_cast<size_t>(tk) * M_pad + scale_row);
    };

    uint4 a_next;
    uint32_t sfa_next;
    load_act(0, a_next, sfa_next);
    load_weight_stage(sm, 0, wcodes, wscales, tn, 0, KT, N_pad);

    for (int tk = 0; tk < KT; ++tk) {
        const int s = tk & 1;
        const uint4 a = a_next;
        const uint32_t sfa = sfa_next;
        if (tk + 1 < KT) {
            load_weight_stage(sm, s ^ 1, wcodes, wscales, tn, tk + 1, KT, N_pad);
            load_act(tk + 1, a_next, sfa_next);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (active) {
#pragma unroll
            for (int p = 0; p < kNTiles / 2; ++p) {
                const uint4 b = sm.w[s][p * kWarpLanes + lane];   // words (ns, ks): x (0,0) y (0,1) z (1,0) w (1,1)
#pragma unroll
                for (int ns = 0; ns < 2; ++ns) {
                    const int j = 2 * p + ns;
                    // SF_B: lanes t == 0 pass the 4 scales of column g of n8 tile j (thread-id-b = 0).
                    mma_nvfp4_16x8x64(acc[j], a, ns ? b.z : b.x, ns ? b.w : b.y, sfa, sm.ws[s][8 * j + g]);
                }
            }
        }
        __syncthreads();
    }

    epilogue<T>(sm, acc, out_scale, lora_act, U, R, bias, out, M, N, bm * kBlockM, tn * kTileN);
#else
    __trap();   // built for a target without block-scaled MMA; the host wrapper never launches this
#endif
}

// Compute capability of the current device is 12.0, the only one an sm_120a cubin runs on.
bool device_is_sm120() {
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return false;
    return major == 12 && minor == 0;
}

}  // namespace

cudaError_t gemm_w4a4_nvfp4(const uint32_t* act_codes, const uint32_t* act_scales, int M, int N, int K,
                            const uint32_t* wcodes, const uint32_t* wscales, const float* out_scale,
                            const float* lora_act, const float* proj_up, int R, const float* bias, void* out,
                            DType dtype, cudaStream_t stream) {
    if (!gemm_args_ok(act_codes, act_scales, M, N, K, wcodes, wscales, lora_act, proj_up, R, out))
        return cudaErrorInvalidValue;
    if (!device_is_sm120()) return cudaErrorNotSupported;
    if (M == 0) return cudaSuccess;
    const dim3 grid(round_up(N, kTileN) / kTileN, round_up(M, kBlockM) / kBlockM);
    dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        gemm_w4a4_nvfp4_kernel<T><<<grid, kGemmThreads, 0, stream>>>(
            reinterpret_cast<const uint4*>(act_codes), act_scales, M, N, K, wcodes, wscales, out_scale, lora_act, proj_up, R, bias, static_cast<T*>(out));
    });
    return cudaGetLastError();
}

}  // namespace nunchaku_cuda
