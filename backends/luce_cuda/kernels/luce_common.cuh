// Shared device helpers for luce kernels (compiled by NVRTC; no host code).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define LUCE_INF __int_as_float(0x7f800000)

// ---------------------------------------------------------------- programmatic dependent launch
// On SM 9.0+ the host launches every luce kernel with programmatic stream serialization
// (luce_cuda.launch), so the blocks of a kernel can be dispatched while the previous kernel in
// the stream is still running, hiding most of the launch gap between two small kernels. Every
// kernel therefore calls this first, before it touches global memory: the wait returns once the
// previous grid has completed and its writes are visible; the trigger then lets the next kernel's
// blocks be dispatched. Compiles to nothing below SM 9.0; a no-op for a launch without the attribute.
__device__ __forceinline__ void grid_dependency_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Work before the wait overlaps the previous kernel. It lives in functions named before_wait_*
// (the only statement a kernel may run ahead of grid_dependency_sync(); a test checks this) and
// may read only what the previous kernel does not write: weights, and KV rows of earlier steps.
// An L2 prefetch is always safe: L2 is the point of coherence, a prefetch changes no loaded value.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
#ifndef LUCE_PREFETCH
#define LUCE_PREFETCH 1  // 0: no prefetch before the wait (LUCE_PREFETCH=0 in the environment, for A/B runs)
#endif
// every 128-byte line of [p, p + bytes), spread over nth threads
__device__ __forceinline__ void prefetch_l2_range(const void* p, size_t bytes, int tid, int nth) {
    if (bytes == 0) return;
    const size_t a = reinterpret_cast<size_t>(p), a0 = a & ~(size_t)127, a1 = a + bytes;
    for (size_t o = a0 + (size_t)tid * 128; o < a1; o += (size_t)nth * 128) prefetch_l2(reinterpret_cast<const void*>(o));
}

// ---------------------------------------------------------------- scalar conversions
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// bf16 -> f32 is a shift; done with integer ops so it also runs where bf16 math is emulated.
__device__ __forceinline__ float bf16_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ float2 h2f2(u32 w) {
    __half2 h = *reinterpret_cast<__half2*>(&w);
    return __half22float2(h);
}

// destination formats (luce_cuda.kv.FMT): written by kv_append.cu, and by a QKV GEMV
// storing its K/V itself (gemv.cu RopeStore: the float ones)
#define KV_F32 0
#define KV_F16 1
#define KV_BF16 2
#define KV_Q8_0 3
#define KV_Q4_0 4

// ---------------------------------------------------------------- RoPE
// One rotated pair (a, b) by the angle with cosine cs and sine sn. Explicit IEEE ops (no FMA
// contraction), so ops.cu's rope_qk and kv_append.cu's fused RoPE round alike.
__device__ __forceinline__ void rope_pair(float a, float b, float cs, float sn, float& o0, float& o1) {
    o0 = __fsub_rn(__fmul_rn(a, cs), __fmul_rn(b, sn));
    o1 = __fadd_rn(__fmul_rn(a, sn), __fmul_rn(b, cs));
}

// ---------------------------------------------------------------- vector loads of 8 elements
// 8 elements as floats from the 16 bytes (halves, bf16) or two float4 that hold them; the first
// argument only picks the element type.
__device__ __forceinline__ void unpack8(const float*, float4 a, float4 b, float* o) {
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
__device__ __forceinline__ void unpack8(const __half*, uint4 v, float* o) {
    float2 f;
    f = h2f2(v.x); o[0] = f.x; o[1] = f.y;
    f = h2f2(v.y); o[2] = f.x; o[3] = f.y;
    f = h2f2(v.z); o[4] = f.x; o[5] = f.y;
    f = h2f2(v.w); o[6] = f.x; o[7] = f.y;
}
__device__ __forceinline__ void unpack8(const __nv_bfloat16*, uint4 v, float* o) {
    o[0] = bf16_lo(v.x); o[1] = bf16_hi(v.x); o[2] = bf16_lo(v.y); o[3] = bf16_hi(v.y);
    o[4] = bf16_lo(v.z); o[5] = bf16_hi(v.z); o[6] = bf16_lo(v.w); o[7] = bf16_hi(v.w);
}

// From global memory through the read-only path (load8) or from shared memory (load8s).
// p must be 16-byte aligned (8 halves / bf16) or 32-byte aligned data of 8 floats (two float4).
__device__ __forceinline__ void load8(const float* __restrict__ p, float* o) {
    unpack8(p, __ldg(reinterpret_cast<const float4*>(p)), __ldg(reinterpret_cast<const float4*>(p) + 1), o);
}
__device__ __forceinline__ void load8(const __half* __restrict__ p, float* o) {
    unpack8(p, __ldg(reinterpret_cast<const uint4*>(p)), o);
}
__device__ __forceinline__ void load8(const __nv_bfloat16* __restrict__ p, float* o) {
    unpack8(p, __ldg(reinterpret_cast<const uint4*>(p)), o);
}
template <class T> __device__ __forceinline__ void load8s(const T* p, float* o) {
    unpack8(p, reinterpret_cast<const uint4*>(p)[0], o);
}
template <> __device__ __forceinline__ void load8s(const float* p, float* o) {
    unpack8(p, reinterpret_cast<const float4*>(p)[0], reinterpret_cast<const float4*>(p)[1], o);
}

// ---------------------------------------------------------------- warp reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---------------------------------------------------------------- RMSNorm statistics
constexpr int RMS_VPT = 16;  // values per thread of ops.cu's rms_norm kernel (H <= RMS_VPT * threads)

// rsqrt(mean(x^2) + eps) of row x[0..H), summed exactly as ops.cu's rms_norm kernel launched with
// nt threads sums it (thread t: fmaf over x[t + j*nt] for j < RMS_VPT; one warp_sum per warp; the
// warp totals summed by one warp_sum), so a block of any size normalizes bit for bit as that
// kernel does: its warps play the kernel's warps in turn. red: 32 floats of shared memory; every
// thread gets the result. Ends with a barrier, so red can be reused at once.
template <class T>
__device__ __forceinline__ float rms_inv_block(const T* __restrict__ x, int H, float eps, int nt, float* red) {
    const int lane = threadIdx.x & 31;
    for (int v0 = threadIdx.x - lane; v0 < nt; v0 += blockDim.x) {  // warp-uniform
        const int v = v0 + lane;
        float ss = 0.f;
#pragma unroll
        for (int j = 0; j < RMS_VPT; ++j) {
            const int i = v + j * nt;
            const float h = i < H ? to_f(x[i]) : 0.f;
            ss = fmaf(h, h, ss);
        }
        ss = warp_sum(ss);
        if (lane == 0) red[v0 >> 5] = ss;
    }
    __syncthreads();
    const float tot = warp_sum(lane < (nt >> 5) ? red[lane] : 0.f);
    __syncthreads();
    return rsqrtf(tot / (float)H + eps);
}

// Small unsigned integers (< 2^23) to float exactly without I2F: OR into the mantissa of 2^23.
#define LUCE_MAGIC 8388608.0f
__device__ __forceinline__ float u2f_magic(u32 q) { return __uint_as_float(0x4B000000u | q) - LUCE_MAGIC; }
