// Fused KV-cache append: one launch writes K and V of T tokens into one layer's cache
// [capacity, n_kv_heads, row] (the layout of luce_torch.kv.TorchKVStore).
//
// Block (row, y): row = t * H + h, y = 0 for K, 1 for V. The head vector is loaded into shared
// memory as f32; for K of a rotated store it is multiplied by the ±1 signs and put through the
// grouped Walsh-Hadamard butterflies (luce_core.formats.hadamard.fwht's order, f32, scaled by
// 1/sqrt(group) at the end), then stored as f32/f16/bf16 or packed as ggml Q8_0/Q4_0.
//
// Bit-exactness with the torch reference (and ggml): every rounding step is an explicit IEEE
// round-to-nearest op (__fadd_rn, __fmul_rn, __fdiv_rn, __frcp_rn), because NVRTC contracts
// a*b+c into an FMA by default and fast reciprocals would change the quantized bytes.
#include "luce_common.cuh"

// source dtypes (luce_cuda.ops.DT_CODE)
#define SRC_F16 0
#define SRC_BF16 1
#define SRC_F32 2

__device__ __forceinline__ i64 kv_row_bytes(int fmt, int D) {
    switch (fmt) {
        case KV_F32: return (i64)D * 4;
        case KV_F16:
        case KV_BF16: return (i64)D * 2;
        case KV_Q8_0: return (i64)(D / 32) * 34;
        default: return (i64)(D / 32) * 18;
    }
}

__device__ __forceinline__ float kv_load(const void* p, int dt, i64 i) {
    if (dt == SRC_F16) return __half2float(static_cast<const __half*>(p)[i]);
    if (dt == SRC_BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    return static_cast<const float*>(p)[i];
}

// One warp packs one 32-element block; x is this lane's element.
__device__ __forceinline__ void pack_q8_0(float x, u8* blk, int lane) {
    float amax = fabsf(x);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float d = __fdiv_rn(amax, 127.0f);  // ggml: amax / 127 in f32
    const float id = d != 0.0f ? __frcp_rn(d) : 0.0f;  // from the f32 d, before fp16 rounding
    const int q = (int)roundf(__fmul_rn(x, id));  // roundf: halves away from zero, like ggml
    if (lane == 0) *reinterpret_cast<u16*>(blk) = __half_as_ushort(__float2half_rn(d));
    blk[2 + lane] = (u8)(i8)q;
}

__device__ __forceinline__ void pack_q4_0(float x, u8* blk, int lane) {
    // signed element of largest magnitude, the first one on ties (ggml's loop, torch's argmax)
    float a = fabsf(x);
    int idx = lane;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float oa = __shfl_xor_sync(0xffffffffu, a, o);
        const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (oa > a || (oa == a && oi < idx)) { a = oa; idx = oi; }
    }
    const float m = __shfl_sync(0xffffffffu, x, idx);
    const float d = __fdiv_rn(m, -8.0f);
    const float id = d != 0.0f ? __frcp_rn(d) : 0.0f;
    float qf = truncf(__fadd_rn(__fmul_rn(x, id), 8.5f));
    qf = fminf(fmaxf(qf, 0.0f), 15.0f);
    const int q = (int)qf;
    const int hi = __shfl_down_sync(0xffffffffu, q, 16);  // element lane + 16 -> high nibble
    if (lane == 0) *reinterpret_cast<u16*>(blk) = __half_as_ushort(__float2half_rn(d));
    if (lane < 16) blk[2 + lane] = (u8)(q | (hi << 4));
}

__device__ __forceinline__ float kv_round(float x, int dt) {  // to the source dtype and back
    if (dt == SRC_F16) return __half2float(__float2half_rn(x));
    if (dt == SRC_BF16) return __bfloat162float(__float2bfloat16_rn(x));
    return x;
}
__device__ __forceinline__ void kv_store_src(void* p, int dt, i64 i, float x) {
    if (dt == SRC_F16) static_cast<__half*>(p)[i] = __float2half_rn(x);
    else if (dt == SRC_BF16) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x);
    else static_cast<float*>(p)[i] = x;
}

// k_src/v_src [T, H, D] with element strides (st, sh) and contiguous channels; k_dst/v_dst are
// one layer's cache. Slot of token t: pos[t] (int64, read on device) or start + t when pos is
// null; a slot outside [0, capacity) is skipped (never written out of bounds). signs (float [D])
// non-null: rotate K with groups of `group` elements and final factor `scale`.
//
// RoPE fused in (cos_t non-null): K is rotated before it is stored, and the query heads q [T, Hq,
// D] (strides q_st, q_sh; dtype k_dt) in place, by blocks y = 2, at position rpos[t] from the f32
// tables [max_pos, half] ("normal": pairs (2i, 2i+1), neox: (i, i + half)). The rotated K is
// rounded to its source dtype first, so the cache holds what rope_qk followed by this kernel
// stores, bit for bit. One launch instead of two.
extern "C" __global__ void __launch_bounds__(128) kv_append(
    const void* __restrict__ k_src, const void* __restrict__ v_src, int k_dt, int v_dt,
    i64 k_st, i64 k_sh, i64 v_st, i64 v_sh, u8* __restrict__ k_dst, u8* __restrict__ v_dst,
    int k_fmt, int v_fmt, const i64* __restrict__ pos, i64 start, i64 capacity, int T, int H, int D,
    const float* __restrict__ signs, int group, float scale, void* __restrict__ q, i64 q_st, i64 q_sh, int Hq,
    const i64* __restrict__ rpos, const float* __restrict__ cos_t, const float* __restrict__ sin_t, int half,
    int neox) {
    grid_dependency_sync();
    extern __shared__ float s[];  // D floats
    const int nh = max(H, Hq);
    const int row = blockIdx.x;
    const int t = row / nh, h = row - t * nh;
    if (t >= T) return;
    if (blockIdx.y == 2) {  // a query head: RoPE in place
        if (h >= Hq) return;
        const i64 p = rpos[t], base = (i64)t * q_st + (i64)h * q_sh;
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
            float o0, o1;
            rope_pair(kv_load(q, k_dt, base + i0), kv_load(q, k_dt, base + i1), cos_t[p * half + i],
                      sin_t[p * half + i], o0, o1);
            kv_store_src(q, k_dt, base + i0, o0);
            kv_store_src(q, k_dt, base + i1, o1);
        }
        return;
    }
    const bool is_k = blockIdx.y == 0;
    const i64 slot = pos ? pos[t] : start + t;
    if (h >= H || slot < 0 || slot >= capacity) return;  // uniform over the block
    const void* src = is_k ? k_src : v_src;
    const int dt = is_k ? k_dt : v_dt;
    const i64 base = (i64)t * (is_k ? k_st : v_st) + (i64)h * (is_k ? k_sh : v_sh);
    const float* sg = is_k ? signs : nullptr;
    const int fmt = is_k ? k_fmt : v_fmt;

    for (int i = threadIdx.x; i < D; i += blockDim.x) s[i] = kv_load(src, dt, base + i);
    if (is_k && cos_t) {
        __syncthreads();
        const i64 p = rpos[t];
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
            float o0, o1;
            rope_pair(s[i0], s[i1], cos_t[p * half + i], sin_t[p * half + i], o0, o1);
            s[i0] = kv_round(o0, dt);
            s[i1] = kv_round(o1, dt);
        }
    }
    if (sg) {
        __syncthreads();
        for (int i = threadIdx.x; i < D; i += blockDim.x) s[i] = __fmul_rn(s[i], sg[i]);
    }
    __syncthreads();
    float sc = 1.0f;
    if (sg) {
        // butterflies (a, b) -> (a + b, a - b) between elements hh apart; with 2*hh <= group the
        // pairs never cross a group, so one pass over the whole vector is the grouped transform
        for (int hh = 1; hh < group; hh <<= 1) {
            for (int p = threadIdx.x; p < (D >> 1); p += blockDim.x) {
                const int i = (p / hh) * (2 * hh) + (p % hh);
                const float a = s[i], b = s[i + hh];
                s[i] = __fadd_rn(a, b);
                s[i + hh] = __fsub_rn(a, b);
            }
            __syncthreads();
        }
        sc = scale;
    }

    u8* out = (is_k ? k_dst : v_dst) + (slot * H + h) * kv_row_bytes(fmt, D);
    if (fmt == KV_Q8_0 || fmt == KV_Q4_0) {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
        const int bytes = fmt == KV_Q8_0 ? 34 : 18;
        for (int b = warp; b < (D >> 5); b += nw) {
            float x = s[b * 32 + lane];
            if (sg) x = __fmul_rn(x, sc);
            if (fmt == KV_Q8_0) pack_q8_0(x, out + b * bytes, lane);
            else pack_q4_0(x, out + b * bytes, lane);
        }
        return;
    }
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        const float x = sg ? __fmul_rn(s[i], sc) : s[i];
        if (fmt == KV_F32) reinterpret_cast<float*>(out)[i] = x;
        else if (fmt == KV_F16) reinterpret_cast<__half*>(out)[i] = __float2half_rn(x);
        else reinterpret_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(x);
    }
}
