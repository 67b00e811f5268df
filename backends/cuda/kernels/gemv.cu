// Decode GEMV straight from quantized weights, and whole-weight dequantization.
//
// y[m, n] = alpha * sum_k x[m, k] * W[n, k]  (+ y[m, n] when add_y), for M <= MAXM rows of x.
// One warp per output row; lane l takes units l, l+32, ... (32 weights = one 16- or 32-byte load
// of packed quants), two units in flight per lane. Every weight byte is read once; the rows of
// x are re-read from L1/L2. Accumulation is FP32; the block scale is applied once per run.
#include "quant.cuh"

template <class F, class T, int MAXM>
__device__ __forceinline__ void unit_dot(const QW& w, int row, int u, const T* __restrict__ x, int M,
                                         i64 xs, float* acc) {
    float q[32], s[F::NRUN], o[F::NRUN];
    F::decode(w, row, u, q, s, o);
    const int k0 = F::k0(u);
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
        if (m < M) {
            const T* xr = x + m * xs + k0;
            float part = 0.f;
#pragma unroll
            for (int r = 0; r < F::NRUN; ++r) {
                float xv[F::RLEN];
#pragma unroll
                for (int c = 0; c < F::RLEN; c += 8) load8(xr + r * F::RSTRIDE + c, xv + c);
                float sq = 0.f, sx = 0.f;
#pragma unroll
                for (int i = 0; i < F::RLEN; ++i) {
                    sq = fmaf(q[r * F::RLEN + i], xv[i], sq);
                    if (F::HAS_OFFSET) sx += xv[i];
                }
                part = fmaf(s[r], sq, part);
                if (F::HAS_OFFSET) part = fmaf(o[r], sx, part);
            }
            acc[m] += part;
        }
    }
}

template <class F, class T, int MAXM>
__device__ __forceinline__ void gemv_impl(const u8* p0, const u8* p1, const u8* p2, const u8* p3,
                                          const T* __restrict__ x, T* __restrict__ y, int M, int N, int K,
                                          i64 xs, i64 ys, float alpha, int add_y) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= N) return;  // whole warps leave together
    QW w{p0, p1, p2, p3, K};
    const int U = K >> 5;
    float acc[MAXM];
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[m] = 0.f;
    int u = lane;
    for (; u + 32 < U; u += 64) {  // two independent units per lane keep two loads in flight
        unit_dot<F, T, MAXM>(w, row, u, x, M, xs, acc);
        unit_dot<F, T, MAXM>(w, row, u + 32, x, M, xs, acc);
    }
    if (u < U) unit_dot<F, T, MAXM>(w, row, u, x, M, xs, acc);
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
        if (m < M) {
            float v = warp_sum(acc[m]) * alpha;
            if (lane == 0) {
                T* dst = y + m * ys + row;
                if (add_y) v += to_f(*dst);
                *dst = from_f<T>(v);
            }
        }
    }
}

// Whole weight to a dense [N, K] matrix of T (embeddings, and the documented fallback path).
template <class F, class T>
__device__ __forceinline__ void dequant_impl(const u8* p0, const u8* p1, const u8* p2, const u8* p3,
                                             T* __restrict__ out, int N, int K, float alpha) {
    QW w{p0, p1, p2, p3, K};
    const int U = K >> 5;
    const i64 total = (i64)N * U;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)gridDim.x * blockDim.x) {
        const int row = (int)(t / U), u = (int)(t % U);
        float q[32], s[F::NRUN], o[F::NRUN];
        F::decode(w, row, u, q, s, o);
        T* dst = out + (i64)row * K + F::k0(u);
#pragma unroll
        for (int r = 0; r < F::NRUN; ++r)
#pragma unroll
            for (int i = 0; i < F::RLEN; ++i) {
                float v = s[r] * q[r * F::RLEN + i];
                if (F::HAS_OFFSET) v += o[r];
                dst[r * F::RSTRIDE + i] = from_f<T>(v * alpha);
            }
    }
}

#define GEMV_ARGS p0, p1, p2, p3, x, y, M, N, K, xs, ys, alpha, add_y

// One program per weight format: the host passes -DLUCE_QNAME=q4_0 -DLUCE_QFMT=FQ4_0 (see
// programs.py), so a model compiles only the formats it has. Activations f16/bf16/f32;
// dequantization writes f32.
#define DEF_GEMV(QN, F, AN, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(256) gemv_##QN##_##AN(                               \
        const u8* p0, const u8* p1, const u8* p2, const u8* p3, const T* x, T* y, int M, int N, int K, \
        i64 xs, i64 ys, float alpha, int add_y) {                                                      \
        gemv_impl<F, T, 1>(p0, p1, p2, p3, x, y, M, N, K, xs, ys, alpha, add_y);                       \
    }
#define DEF_DEQUANT(QN, F)                                                                               \
    extern "C" __global__ void __launch_bounds__(256) dequant_##QN(                                     \
        const u8* p0, const u8* p1, const u8* p2, const u8* p3, float* out, int N, int K, float alpha) { \
        dequant_impl<F, float>(p0, p1, p2, p3, out, N, K, alpha);                                        \
    }
#define EXPAND(M, ...) M(__VA_ARGS__)  // expands LUCE_QNAME before ## pastes it
EXPAND(DEF_GEMV, LUCE_QNAME, LUCE_QFMT, f16, __half)
EXPAND(DEF_GEMV, LUCE_QNAME, LUCE_QFMT, bf16, __nv_bfloat16)
EXPAND(DEF_GEMV, LUCE_QNAME, LUCE_QFMT, f32, float)
EXPAND(DEF_DEQUANT, LUCE_QNAME, LUCE_QFMT)
