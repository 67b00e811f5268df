// Small fused element-wise kernels for the model graph: RMSNorm (optionally adding into the
// residual stream first), RoPE (GGUF "normal" adjacent pairs, or NeoX halves), SwiGLU.
// All math is FP32; inputs/outputs are f16, bf16 or f32 (one kernel per type).
#include "luce_common.cuh"

// h = x (+ res, written back into res); out = h * rsqrt(mean(h^2) + eps) * w.  One block per row;
// a thread keeps its RMS_VPT values of h in registers (H <= RMS_VPT * blockDim, checked by the
// host), so all its loads are in flight at once and nothing is re-read after the reduction.
// luce_common.cuh's rms_inv_block reproduces this summation order (the GEMV's fused RMSNorm).
template <class T>
__device__ __forceinline__ void rms_norm_impl(const T* __restrict__ x, T* __restrict__ res, const float* __restrict__ w,
                                              T* __restrict__ out, int H, float eps, i64 xs, i64 rs, i64 os) {
    __shared__ float red[32];
    const i64 row = blockIdx.x;
    const T* xr = x + row * xs;
    T* rr = res ? res + row * rs : nullptr;
    // every load first (x, the residual and w: no store in between, so they are all in flight
    // together), then the math
    float hv[RMS_VPT], rv[RMS_VPT], wv[RMS_VPT], ss = 0.f;
#pragma unroll
    for (int j = 0; j < RMS_VPT; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        const bool in = i < H;
        hv[j] = in ? to_f(xr[i]) : 0.f;
        rv[j] = in && rr ? to_f(rr[i]) : 0.f;
        wv[j] = in ? w[i] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < RMS_VPT; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (rr && i < H) {
            const T hq = from_f<T>(hv[j] + rv[j]);
            rr[i] = hq;
            hv[j] = to_f(hq);  // normalize exactly what the residual stream now holds
        }
        ss = fmaf(hv[j], hv[j], ss);
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.f;
        v = warp_sum(v);
        if (threadIdx.x == 0) red[0] = v;
    }
    __syncthreads();
    const float inv = rsqrtf(red[0] / (float)H + eps);
    T* orow = out + row * os;
#pragma unroll
    for (int j = 0; j < RMS_VPT; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < H) orow[i] = from_f<T>(hv[j] * inv * wv[j]);
    }
}

// In place on x [T, n_heads, D] (strides st, sh in elements). Position of row t: pos[t], or
// start + t when pos is null. Channels >= rope_dim are left alone.
template <class T, bool NEOX>
__device__ __forceinline__ void rope_impl(T* __restrict__ x, const int* __restrict__ pos, int start,
                                          const float* __restrict__ inv_freq, int T_, int nh, int rope_dim,
                                          i64 st, i64 sh) {
    const int half = rope_dim >> 1;
    const i64 total = (i64)T_ * nh * half;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        const i64 th = idx / half;
        const int hh = (int)(th % nh), t = (int)(th / nh);
        const float p = (float)(pos ? pos[t] : start + t);
        float sn, cs;
        sincosf(p * inv_freq[i], &sn, &cs);
        T* xr = x + (i64)t * st + (i64)hh * sh;
        const int i0 = NEOX ? i : 2 * i, i1 = NEOX ? i + half : 2 * i + 1;
        const float a = to_f(xr[i0]), b = to_f(xr[i1]);
        xr[i0] = from_f<T>(a * cs - b * sn);
        xr[i1] = from_f<T>(a * sn + b * cs);
    }
}

// q [T, nhq, D] and k [T, nhk, D] rotated in place in one launch from the model's f32 cos/sin
// tables [max_pos, half] (the same tables the torch path uses, so both agree exactly). Position of
// row t: pos[t] (int64, read on the device: graph replays see new positions) or start + t.
template <class T, bool NEOX>
__device__ __forceinline__ void rope_qk_impl(T* __restrict__ q, T* __restrict__ k, const i64* __restrict__ pos,
                                             int start, const float* __restrict__ cos_t,
                                             const float* __restrict__ sin_t, int T_, int nhq, int nhk, int half,
                                             i64 qst, i64 qsh, i64 kst, i64 ksh) {
    const int nh = nhq + nhk;
    const i64 total = (i64)T_ * nh * half;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        const i64 th = idx / half;
        const int hh = (int)(th % nh), t = (int)(th / nh);
        const i64 p = pos ? pos[t] : (i64)(start + t);
        const float cs = cos_t[p * half + i], sn = sin_t[p * half + i];
        T* xr = hh < nhq ? q + (i64)t * qst + (i64)hh * qsh : k + (i64)t * kst + (i64)(hh - nhq) * ksh;
        const int i0 = NEOX ? i : 2 * i, i1 = NEOX ? i + half : 2 * i + 1;
        float o0, o1;
        rope_pair(to_f(xr[i0]), to_f(xr[i1]), cs, sn, o0, o1);
        xr[i0] = from_f<T>(o0);
        xr[i1] = from_f<T>(o1);
    }
}

// out[r, j] = silu(g[r, j]) * u[r, j] for j < F.
template <class T>
__device__ __forceinline__ void swiglu_impl(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ out,
                                            int R, int F, i64 gs, i64 us, i64 os) {
    const i64 total = (i64)R * F;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        const i64 r = idx / F;
        const int j = (int)(idx % F);
        const float a = to_f(g[r * gs + j]), b = to_f(u[r * us + j]);
        out[r * os + j] = from_f<T>(a / (1.f + expf(-a)) * b);
    }
}

#define DEF_OPS(AN, T)                                                                                         \
    extern "C" __global__ void __launch_bounds__(1024) rms_norm_##AN(const T* x, T* res, const float* w, T* out, \
                                                                   int H, float eps, i64 xs, i64 rs, i64 os) { \
        grid_dependency_sync();                                                                                \
        rms_norm_impl<T>(x, res, w, out, H, eps, xs, rs, os);                                                  \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) rope_normal_##AN(                                        \
        T* x, const int* pos, int start, const float* inv_freq, int T_, int nh, int rope_dim, i64 st, i64 sh) { \
        grid_dependency_sync();                                                                                 \
        rope_impl<T, false>(x, pos, start, inv_freq, T_, nh, rope_dim, st, sh);                                \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) rope_neox_##AN(                                          \
        T* x, const int* pos, int start, const float* inv_freq, int T_, int nh, int rope_dim, i64 st, i64 sh) { \
        grid_dependency_sync();                                                                                 \
        rope_impl<T, true>(x, pos, start, inv_freq, T_, nh, rope_dim, st, sh);                                 \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) rope_qk_normal_##AN(                                     \
        T* q, T* k, const i64* pos, int start, const float* cs, const float* sn, int T_, int nhq, int nhk,    \
        int half, i64 qst, i64 qsh, i64 kst, i64 ksh) {                                                        \
        grid_dependency_sync();                                                                                \
        rope_qk_impl<T, false>(q, k, pos, start, cs, sn, T_, nhq, nhk, half, qst, qsh, kst, ksh);              \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) rope_qk_neox_##AN(                                       \
        T* q, T* k, const i64* pos, int start, const float* cs, const float* sn, int T_, int nhq, int nhk,    \
        int half, i64 qst, i64 qsh, i64 kst, i64 ksh) {                                                        \
        grid_dependency_sync();                                                                                \
        rope_qk_impl<T, true>(q, k, pos, start, cs, sn, T_, nhq, nhk, half, qst, qsh, kst, ksh);               \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) swiglu_##AN(const T* g, const T* u, T* out, int R, int F, \
                                                                 i64 gs, i64 us, i64 os) {                     \
        grid_dependency_sync();                                                                                \
        swiglu_impl<T>(g, u, out, R, F, gs, us, os);                                                           \
    }
DEF_OPS(f16, __half)
DEF_OPS(bf16, __nv_bfloat16)
DEF_OPS(f32, float)
