// Prefill GEMM on tensor cores, weights dequantized tile by tile into shared memory.
//
// y[m, n] = alpha * sum_k x[m, k] * W[n, k]  (with add_y: y[m, n] + that product rounded to the
// output type, bit for bit the GEMM followed by a residual add).
// Block tile 64 (rows of x) x 64 (rows of W) x 128 (k); 4 warps in 2x2, each 32x32 as 2x2 WMMA
// 16x16x16 fragments, FP32 accumulators. The W tile is decoded from the quantized planes (one
// 32-weight unit per thread and step) into the MMA type; x must already be in the MMA type.
// LUCE_MMA_BF16=1 builds BF16 operands (SM 8.0+), 0 builds FP16 (SM 7.0+; the SM 7.5 path).
#include <mma.h>
#include "quant.cuh"

#if LUCE_MMA_BF16
typedef __nv_bfloat16 MT;
__device__ __forceinline__ u32 pack2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<u32*>(&h);
}
#define ACT_NAME bf16
#else
typedef __half MT;
__device__ __forceinline__ u32 pack2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<u32*>(&h);
}
#define ACT_NAME f16
#endif

namespace wmma = nvcuda::wmma;

constexpr int BM = 64, BN = 64, BK = 128, LDS = BK + 8, LDC = BN + 4;

struct GemmSmem {
    union {
        struct {
            MT a[BM][LDS];
            MT b[BN][LDS];
        } ab;
        float c[BM][LDC];
    };
};

template <class F>
__device__ __forceinline__ void gemm_impl(const QW w, const MT* __restrict__ x, MT* __restrict__ y, int M, int N,
                                          i64 xs, i64 ys, float alpha, int add_y) {
    __shared__ __align__(128) GemmSmem sm;  // WMMA pointers must be 32-byte aligned
    const int tid = threadIdx.x, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int K = w.K, U = K >> 5;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    // Register double buffering: the global loads of tile kt+BK (x chunks and raw W units) are
    // issued before the MMAs of tile kt, so their latency hides behind tensor-core work.
    constexpr int XCH = (BM * BK / 8) / 128;  // 16-byte x chunks per thread and tile
    uint4 xa[XCH];
    typename F::Raw wr[2];
    auto load_tile = [&](int kt) {
#pragma unroll
        for (int i = 0; i < XCH; ++i) {
            const int idx = tid + i * 128, r = idx >> 4, c = (idx & 15) * 8;
            xa[i] = make_uint4(0, 0, 0, 0);
            if (m0 + r < M && kt + c < K) xa[i] = __ldg(reinterpret_cast<const uint4*>(x + (i64)(m0 + r) * xs + kt + c));
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int idx = tid + i * 128, r = idx >> 2, u = (kt >> 5) + (idx & 3);
            if (n0 + r < N && u < U) wr[i] = F::load(w, n0 + r, u);
        }
    };
    load_tile(0);
    for (int kt = 0; kt < K; kt += BK) {
        // x tile: 64 rows x 128 k (out of range -> 0), stored as loaded.
#pragma unroll
        for (int i = 0; i < XCH; ++i) {
            const int idx = tid + i * 128, r = idx >> 4, c = (idx & 15) * 8;
            *reinterpret_cast<uint4*>(&sm.ab.a[r][c]) = xa[i];
        }
        // W tile: 64 rows x 4 units of 32 weights (units whose first k lies in this tile).
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int idx = tid + i * 128, r = idx >> 2, u = (kt >> 5) + (idx & 3);
            const bool live = n0 + r < N && u < U;
            float q[32], s[F::NRUN], o[F::NRUN];
            if (live) F::unpack(wr[i], u, q, s, o);
            const int kb = F::k0(u) - kt;
#pragma unroll
            for (int rr = 0; rr < F::NRUN; ++rr)
#pragma unroll
                for (int c = 0; c < F::RLEN; c += 8) {
                    uint4 v = make_uint4(0, 0, 0, 0);
                    if (live) {
                        float e[8];
#pragma unroll
                        for (int t = 0; t < 8; ++t) {
                            e[t] = s[rr] * q[rr * F::RLEN + c + t];
                            if (F::HAS_OFFSET) e[t] += o[rr];
                        }
                        v = make_uint4(pack2(e[0], e[1]), pack2(e[2], e[3]), pack2(e[4], e[5]), pack2(e[6], e[7]));
                    }
                    *reinterpret_cast<uint4*>(&sm.ab.b[r][kb + rr * F::RSTRIDE + c]) = v;
                }
        }
        __syncthreads();
        if (kt + BK < K) load_tile(kt + BK);
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, MT, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, MT, wmma::col_major> fb[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sm.ab.a[wm * 32 + i * 16][kk], LDS);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &sm.ab.b[wn * 32 + j * 16][kk], LDS);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(&sm.c[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], LDC, wmma::mem_row_major);
    __syncthreads();
    for (int idx = tid; idx < BM * BN; idx += 128) {
        const int r = idx >> 6, c = idx & 63;
        if (m0 + r < M && n0 + c < N) {
            MT* dst = y + (i64)(m0 + r) * ys + n0 + c;
            float v = sm.c[r][c] * alpha;
            if (add_y) v = to_f(from_f<MT>(v)) + to_f(*dst);  // as the GEMM, then the residual add
            *dst = from_f<MT>(v);
        }
    }
}

#define DEF_GEMM(QN, F, AN)                                                                               \
    extern "C" __global__ void __launch_bounds__(128) gemm_##QN##_##AN(                                  \
        const u8* p0, const u8* p1, const u8* p2, const u8* p3, const MT* x, MT* y, int M, int N, int K, \
        i64 xs, i64 ys, float alpha, int add_y) {                                                         \
        grid_dependency_sync();                                                                           \
        gemm_impl<F>(QW{p0, p1, p2, p3, K}, x, y, M, N, xs, ys, alpha, add_y);                            \
    }
#define EXPAND(M, ...) M(__VA_ARGS__)
EXPAND(DEF_GEMM, LUCE_QNAME, LUCE_QFMT, ACT_NAME)
