// Flash-decode: one query token per head attends over positions [0, len) of a K/V cache laid out
// [capacity, n_kv_heads, D] (one layer of the torch KV store), split over the sequence.
//
// Grid (n_kv_heads, n_splits, ceil(group/8)); block 128 = 4 warps. A block serves up to 8 query
// heads of one KV head (GQA: each K/V row is read once for the whole group). Each warp takes
// tiles of 32 positions: a lane scores its own position against the group's queries (q in
// shared memory, broadcast), the warp keeps an online softmax, then lanes own D/32 channels of
// the output and accumulate p * V row by row. Partial (m, l, o) per split go to a workspace and
// flash_decode_combine merges them. The length may come from device memory (len_ptr), so a
// captured CUDA graph replays with a growing length; splits past the length exit at once.
// Scores are in log2 units (q is pre-scaled by scale*log2(e)) so exp2f does the softmax.
#include "luce_common.cuh"

constexpr int GMAX = 8, WARPS = 4;

__device__ __forceinline__ float load_q(const void* q, int dt, i64 i) {
    if (dt == 0) return __half2float(reinterpret_cast<const __half*>(q)[i]);
    if (dt == 1) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(q)[i]);
    return reinterpret_cast<const float*>(q)[i];
}

// DPL consecutive channels of one row, as floats.
template <int DPL> __device__ __forceinline__ void load_ch(const __half* p, float* o) {
    if (DPL == 2) {
        float2 f = h2f2(__ldg(reinterpret_cast<const u32*>(p)));
        o[0] = f.x; o[1] = f.y;
    } else {
        uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
        float2 a = h2f2(v.x), b = h2f2(v.y);
        o[0] = a.x; o[1] = a.y; o[2] = b.x; o[3] = b.y;
    }
}
template <int DPL> __device__ __forceinline__ void load_ch(const __nv_bfloat16* p, float* o) {
    if (DPL == 2) {
        u32 v = __ldg(reinterpret_cast<const u32*>(p));
        o[0] = bf16_lo(v); o[1] = bf16_hi(v);
    } else {
        uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
        o[0] = bf16_lo(v.x); o[1] = bf16_hi(v.x); o[2] = bf16_lo(v.y); o[3] = bf16_hi(v.y);
    }
}
template <int DPL> __device__ __forceinline__ void load_ch(const float* p, float* o) {
    if (DPL == 2) {
        float2 v = __ldg(reinterpret_cast<const float2*>(p));
        o[0] = v.x; o[1] = v.y;
    } else {
        float4 v = __ldg(reinterpret_cast<const float4*>(p));
        o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
    }
}

template <class TKV, int D>
__device__ __forceinline__ void flash_decode_impl(const void* __restrict__ q, int q_dt, const TKV* __restrict__ k,
                                                  const TKV* __restrict__ v, float* __restrict__ ws_o,
                                                  float* __restrict__ ws_ml, int H, int Hkv, i64 kvs, int len,
                                                  const int* __restrict__ len_ptr, int split_len, float scale_log2) {
    constexpr int DPL = D / 32;
    __shared__ float qs[GMAX][D];
    __shared__ float ps[WARPS][GMAX][32];
    __shared__ float red_o[WARPS][GMAX][D];
    __shared__ float red_m[WARPS][GMAX], red_l[WARPS][GMAX];

    const int hk = blockIdx.x, split = blockIdx.y;
    const int G = H / Hkv, g0 = blockIdx.z * GMAX, GB = min(GMAX, G - g0);
    const int end = len_ptr ? *len_ptr : len;
    const int pb = split * split_len, pe = min(end, pb + split_len);
    if (pb >= end) return;  // the combine reads only splits below the length
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hq0 = hk * G + g0;

    for (int i = threadIdx.x; i < GMAX * D; i += blockDim.x) {
        const int g = i / D, d = i % D;
        qs[g][d] = g < GB ? load_q(q, q_dt, (i64)(hq0 + g) * D + d) * scale_log2 : 0.f;
    }
    __syncthreads();

    float m[GMAX], lsum[GMAX], acc[GMAX][DPL];
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
        m[g] = -LUCE_INF;
        lsum[g] = 0.f;
#pragma unroll
        for (int e = 0; e < DPL; ++e) acc[g][e] = 0.f;
    }
    const TKV* kh = k + (i64)hk * D;
    const TKV* vh = v + (i64)hk * D;

    for (int tile = pb + warp * 32; tile < pe; tile += WARPS * 32) {
        const int p = tile + lane;
        const bool valid = p < pe;
        float s[GMAX];
#pragma unroll
        for (int g = 0; g < GMAX; ++g) s[g] = 0.f;
        if (valid) {
            const TKV* kr = kh + (i64)p * kvs;
#pragma unroll 2
            for (int c = 0; c < D; c += 8) {
                float kv8[8];
                load8(kr + c, kv8);
#pragma unroll
                for (int g = 0; g < GMAX; ++g)
                    if (g < GB)
#pragma unroll
                        for (int t = 0; t < 8; ++t) s[g] = fmaf(qs[g][c + t], kv8[t], s[g]);
            }
        }
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
            if (g < GB) {
                const float sv = valid ? s[g] : -LUCE_INF;
                const float mn = fmaxf(m[g], warp_max(sv));  // finite: lane 0 of a tile is valid
                const float corr = exp2f(m[g] - mn);
                const float pr = valid ? exp2f(sv - mn) : 0.f;
                lsum[g] = lsum[g] * corr + pr;
#pragma unroll
                for (int e = 0; e < DPL; ++e) acc[g][e] *= corr;
                m[g] = mn;
                ps[warp][g][lane] = pr;
            }
        }
        __syncwarp();
        const int nv = min(32, pe - tile);
        for (int j = 0; j < nv; ++j) {
            float vv[DPL];
            load_ch<DPL>(vh + (i64)(tile + j) * kvs + lane * DPL, vv);
#pragma unroll
            for (int g = 0; g < GMAX; ++g)
                if (g < GB) {
                    const float pj = ps[warp][g][j];
#pragma unroll
                    for (int e = 0; e < DPL; ++e) acc[g][e] = fmaf(pj, vv[e], acc[g][e]);
                }
        }
        __syncwarp();
    }
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
        const float l = warp_sum(lsum[g]);
        if (lane == 0) {
            red_m[warp][g] = m[g];
            red_l[warp][g] = l;
        }
#pragma unroll
        for (int e = 0; e < DPL; ++e) red_o[warp][g][lane * DPL + e] = acc[g][e];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < GB * D; i += blockDim.x) {
        const int g = i / D, d = i % D;
        float M = -LUCE_INF;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) M = fmaxf(M, red_m[w][g]);
        float o = 0.f, l = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float f = red_m[w][g] == -LUCE_INF ? 0.f : exp2f(red_m[w][g] - M);
            o += f * red_o[w][g][d];
            l += f * red_l[w][g];
        }
        const i64 hq = hq0 + g;
        ws_o[((i64)split * H + hq) * D + d] = o;
        if (d == 0) {
            ws_ml[((i64)split * H + hq) * 2] = M;
            ws_ml[((i64)split * H + hq) * 2 + 1] = l;
        }
    }
}

// out[h, d] = sum_s e^(m_s - M) o_s[h, d] / sum_s e^(m_s - M) l_s over the splits below the length.
template <class T>
__device__ __forceinline__ void combine_impl(const float* __restrict__ ws_o, const float* __restrict__ ws_ml,
                                             T* __restrict__ out, int H, int D, int len,
                                             const int* __restrict__ len_ptr, int split_len) {
    const int h = blockIdx.x;
    const int end = len_ptr ? *len_ptr : len;
    const int ns = (end + split_len - 1) / split_len;
    float M = -LUCE_INF;
    for (int s = 0; s < ns; ++s) M = fmaxf(M, ws_ml[((i64)s * H + h) * 2]);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0.f, l = 0.f;
        for (int s = 0; s < ns; ++s) {
            const float f = exp2f(ws_ml[((i64)s * H + h) * 2] - M);
            o += f * ws_o[((i64)s * H + h) * D + d];
            l += f * ws_ml[((i64)s * H + h) * 2 + 1];
        }
        out[(i64)h * D + d] = from_f<T>(l > 0.f ? o / l : 0.f);
    }
}

#define DEF_DECODE(KN, TKV, D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) flash_decode_##KN##_d##D(                                \
        const void* q, int q_dt, const TKV* k, const TKV* v, float* ws_o, float* ws_ml, int H, int Hkv, i64 kvs, \
        int len, const int* len_ptr, int split_len, float scale_log2) {                                         \
        flash_decode_impl<TKV, D>(q, q_dt, k, v, ws_o, ws_ml, H, Hkv, kvs, len, len_ptr, split_len, scale_log2); \
    }
// f16 and bf16 caches (an f32 cache takes the torch reference path).
DEF_DECODE(f16, __half, 64)
DEF_DECODE(f16, __half, 128)
DEF_DECODE(bf16, __nv_bfloat16, 64)
DEF_DECODE(bf16, __nv_bfloat16, 128)

#define DEF_COMBINE(AN, T)                                                                                   \
    extern "C" __global__ void __launch_bounds__(128) flash_decode_combine_##AN(                            \
        const float* ws_o, const float* ws_ml, T* out, int H, int D, int len, const int* len_ptr, int split_len) { \
        combine_impl<T>(ws_o, ws_ml, out, H, D, len, len_ptr, split_len);                                    \
    }
DEF_COMBINE(f16, __half)
DEF_COMBINE(bf16, __nv_bfloat16)
DEF_COMBINE(f32, float)
