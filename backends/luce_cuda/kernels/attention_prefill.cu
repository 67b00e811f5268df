// Causal prefill attention (flash-attention style) on tensor cores with mma.sync m16n8k8.
//
// q [T, H, D] at positions start..start+T-1 attends to K/V rows [0, start+T) of a cache laid out
// [capacity, n_kv_heads, D]; key j is visible to query t when j <= start + t. Grid
// (ceil(T/64), H), block 128: each warp owns 16 query rows, keeps Q as A fragments in registers,
// the running max/sum and the output accumulators in registers (the C fragment of S = Q K^T is
// reused as the A fragment of P V, so P never leaves registers). K and V tiles of 64 keys are
// staged in shared memory in the MMA type. Softmax runs in log2 units with FP32 accumulation.
// Operands are FP16 on every arch (SM 7.5+): a bf16 cache is converted tile by tile (exact for
// values in FP16's normal range), because P = softmax rounded to BF16 would cost ~0.4% per
// weight where FP16 costs ~0.05%; accumulation is FP32 either way.
#include "luce_common.cuh"

typedef __half MT;
__device__ __forceinline__ u32 pack2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<u32*>(&h);
}
__device__ __forceinline__ void mma8(float* c, u32 a0, u32 a1, u32 b0) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0));
}

__device__ __forceinline__ float ld_any(const void* p, int dt, i64 i) {
    if (dt == 0) return __half2float(reinterpret_cast<const __half*>(p)[i]);
    if (dt == 1) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p)[i]);
    return reinterpret_cast<const float*>(p)[i];
}
__device__ __forceinline__ void st_any(void* p, int dt, i64 i, float v) {
    if (dt == 0) reinterpret_cast<__half*>(p)[i] = __float2half_rn(v);
    else if (dt == 1) reinterpret_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
    else reinterpret_cast<float*>(p)[i] = v;
}
__device__ __forceinline__ u32 lds32(const MT* p) { return *reinterpret_cast<const u32*>(p); }
__device__ __forceinline__ u32 pair16(const MT* lo, const MT* hi) {
    return (u32)(*reinterpret_cast<const u16*>(lo)) | ((u32)(*reinterpret_cast<const u16*>(hi)) << 16);
}

constexpr int BQ = 64, BKV = 64;

template <class TKV, int D>
__device__ __forceinline__ void flash_prefill_impl(const void* __restrict__ q, void* __restrict__ out, int dt,
                                                   const TKV* __restrict__ k, const TKV* __restrict__ v, int T,
                                                   int start, int H, int Hkv, i64 kvs, float scale_log2) {
    constexpr int LD = D + 8;  // row padding: conflict-free fragment reads
    constexpr int ND = D / 8;
    __shared__ __align__(16) MT ks[BKV][LD];
    __shared__ __align__(16) MT vs[BKV][LD];

    const int h = blockIdx.y, hk = h / (H / Hkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tq = lane & 3;
    const int r0 = blockIdx.x * BQ + warp * 16;
    const int ra = r0 + gid, rb = ra + 8;
    const int pos_a = start + ra, pos_b = start + rb;
    const int kv_end = start + min(T, (int)(blockIdx.x + 1) * BQ);  // last visible key + 1 for this block

    u32 qa[ND][2];
#pragma unroll
    for (int kk = 0; kk < ND; ++kk) {
        const int d = kk * 8 + 2 * tq;
        float a0 = 0.f, a1 = 0.f, b0 = 0.f, b1 = 0.f;
        if (ra < T) {
            a0 = ld_any(q, dt, ((i64)ra * H + h) * D + d);
            a1 = ld_any(q, dt, ((i64)ra * H + h) * D + d + 1);
        }
        if (rb < T) {
            b0 = ld_any(q, dt, ((i64)rb * H + h) * D + d);
            b1 = ld_any(q, dt, ((i64)rb * H + h) * D + d + 1);
        }
        qa[kk][0] = pack2(a0, a1);
        qa[kk][1] = pack2(b0, b1);
    }

    float o[ND][4];
#pragma unroll
    for (int i = 0; i < ND; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_a = -LUCE_INF, m_b = -LUCE_INF, l_a = 0.f, l_b = 0.f;

    const TKV* kh = k + (i64)hk * D;
    const TKV* vh = v + (i64)hk * D;
    for (int j0 = 0; j0 < kv_end; j0 += BKV) {
        __syncthreads();  // the previous tile has been consumed by every warp
        for (int c = threadIdx.x; c < BKV * ND; c += blockDim.x) {
            const int r = c / ND, d = (c % ND) * 8;
            uint4 kw = make_uint4(0, 0, 0, 0), vw = make_uint4(0, 0, 0, 0);
            if (j0 + r < kv_end) {
                float e[8];
                load8(kh + (i64)(j0 + r) * kvs + d, e);
                kw = make_uint4(pack2(e[0], e[1]), pack2(e[2], e[3]), pack2(e[4], e[5]), pack2(e[6], e[7]));
                load8(vh + (i64)(j0 + r) * kvs + d, e);
                vw = make_uint4(pack2(e[0], e[1]), pack2(e[2], e[3]), pack2(e[4], e[5]), pack2(e[6], e[7]));
            }
            *reinterpret_cast<uint4*>(&ks[r][d]) = kw;
            *reinterpret_cast<uint4*>(&vs[r][d]) = vw;
        }
        __syncthreads();
        if (r0 >= T || j0 > start + r0 + 15) continue;  // this warp's rows see nothing here (uniform per warp)

        float s[BKV / 8][4];
#pragma unroll
        for (int nt = 0; nt < BKV / 8; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < ND; ++kk) mma8(s[nt], qa[kk][0], qa[kk][1], lds32(&ks[nt * 8 + gid][kk * 8 + 2 * tq]));
        }
        float mx_a = -LUCE_INF, mx_b = -LUCE_INF;
#pragma unroll
        for (int nt = 0; nt < BKV / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = j0 + nt * 8 + 2 * tq + (e & 1);
                const int pos = e < 2 ? pos_a : pos_b;
                const float val = j <= pos ? s[nt][e] * scale_log2 : -LUCE_INF;
                s[nt][e] = val;
                if (e < 2) mx_a = fmaxf(mx_a, val);
                else mx_b = fmaxf(mx_b, val);
            }
        }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, off));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, off));
        }
        const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
        const float base_a = mn_a == -LUCE_INF ? 0.f : mn_a, base_b = mn_b == -LUCE_INF ? 0.f : mn_b;
        const float corr_a = exp2f(m_a - base_a), corr_b = exp2f(m_b - base_b);
        m_a = mn_a;
        m_b = mn_b;
        float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
        for (int nt = 0; nt < BKV / 8; ++nt) {
            s[nt][0] = exp2f(s[nt][0] - base_a);
            s[nt][1] = exp2f(s[nt][1] - base_a);
            s[nt][2] = exp2f(s[nt][2] - base_b);
            s[nt][3] = exp2f(s[nt][3] - base_b);
            sum_a += s[nt][0] + s[nt][1];
            sum_b += s[nt][2] + s[nt][3];
        }
        l_a = l_a * corr_a + sum_a;
        l_b = l_b * corr_b + sum_b;
#pragma unroll
        for (int i = 0; i < ND; ++i) {
            o[i][0] *= corr_a;
            o[i][1] *= corr_a;
            o[i][2] *= corr_b;
            o[i][3] *= corr_b;
        }
#pragma unroll
        for (int kk = 0; kk < BKV / 8; ++kk) {
            const u32 a0 = pack2(s[kk][0], s[kk][1]), a1 = pack2(s[kk][2], s[kk][3]);
            const int key = kk * 8 + 2 * tq;
#pragma unroll
            for (int dt8 = 0; dt8 < ND; ++dt8) mma8(o[dt8], a0, a1, pair16(&vs[key][dt8 * 8 + gid], &vs[key + 1][dt8 * 8 + gid]));
        }
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l_a += __shfl_xor_sync(0xffffffffu, l_a, off);
        l_b += __shfl_xor_sync(0xffffffffu, l_b, off);
    }
    const float ia = l_a > 0.f ? 1.f / l_a : 0.f, ib = l_b > 0.f ? 1.f / l_b : 0.f;
#pragma unroll
    for (int i = 0; i < ND; ++i) {
        const int d = i * 8 + 2 * tq;
        if (ra < T) {
            st_any(out, dt, ((i64)ra * H + h) * D + d, o[i][0] * ia);
            st_any(out, dt, ((i64)ra * H + h) * D + d + 1, o[i][1] * ia);
        }
        if (rb < T) {
            st_any(out, dt, ((i64)rb * H + h) * D + d, o[i][2] * ib);
            st_any(out, dt, ((i64)rb * H + h) * D + d + 1, o[i][3] * ib);
        }
    }
}

#define DEF_PREFILL(KN, TKV, D)                                                                           \
    extern "C" __global__ void __launch_bounds__(128) flash_prefill_##KN##_d##D(                         \
        const void* q, void* out, int dt, const TKV* k, const TKV* v, int T, int start, int H, int Hkv,  \
        i64 kvs, float scale_log2) {                                                                      \
        grid_dependency_sync();                                                                           \
        flash_prefill_impl<TKV, D>(q, out, dt, k, v, T, start, H, Hkv, kvs, scale_log2);                  \
    }
DEF_PREFILL(f16, __half, 64)
DEF_PREFILL(f16, __half, 128)
DEF_PREFILL(bf16, __nv_bfloat16, 64)
DEF_PREFILL(bf16, __nv_bfloat16, 128)
