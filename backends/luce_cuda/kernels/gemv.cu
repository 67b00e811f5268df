// Decode GEMV straight from quantized weights, and whole-weight dequantization.
//
// y[j, n] = alpha * sum_k x[j, k] * W[n, k]  (+ y[j, n] when add_y) for the m <= MX rows j of x
// (MX = 1 for decode, 8 for a few-row input such as a speculative verify, split by the host into
// chunks of at most 8). With LUCE_GEMV_ROWPAR the kernels also serve several chunks side by side:
// grid row blockIdx.y computes x rows [blockIdx.y * m, (blockIdx.y + 1) * m) exactly as one launch
// of those m rows does, reading the weight again (from L2, for weights that fit there;
// luce_cuda.linear decides). Not in the formats capped at 64 registers: the offsets made their
// kernels spill more. Each
// weight unit is loaded once and used for every x row, and each (x row, weight row) sum takes
// exactly the steps it takes with MX = 1, so a verify row rounds as the decode step does.
// A group of wpr warps (1, 2, 4 or 8; the host picks it so each lane gets about two units)
// computes R rows; its lanes take units l, l+32*wpr, ... (a unit is 32 weights: one 16-byte
// load of packed quants plus its scales). Each step first issues the loads of UN units for all
// R rows (R*UN independent 16-byte loads in flight per lane), then reads the matching x chunk
// once and uses it for the R rows. Every weight byte is read once; x comes from L1/L2.
// Accumulation is FP32; the block scale is applied once per run of 16-32 weights.
//
// glu: W is [gate; up] (2N rows) and y[j, n] = silu(gate_n . x_j) * (up_n . x_j): each row group
// is the pair (n, N + n), so the SwiGLU of a fused gate|up projection is its epilogue and needs
// no launch (or pass over the activations) of its own; the result is bit-identical to the GEMV
// writing gate and up and ops.cu's swiglu reading them.
//
// add_y (residual fusion): y = y + (the product rounded to T), what the unfused GEMV followed by
// ops.cu's residual add gives bit for bit.
// Kernels _norm (NORM, one x row: decode): x is the residual stream and its row is RMS-normalized
// (weight nw, eps; summed as ops.cu's rms_norm kernel of nt threads sums it, rounded to T as it
// rounds) into dynamic shared memory before the dot products read it: bit for bit rms_norm then
// the GEMV, one launch (and one pass over the activations) fewer. A few rows take the rms_norm
// kernel first instead: each block normalizing its rows one after another (a block reduction and
// two barriers per row) cost more than the extra launch (H200, 8 rows: SmolLM2's gate|up 18.2
// against 13.1 us, a 1.2B-shaped Q4_1 gate|up 39.4 against 33.2).
//
// Kernels _q8 (Q4_0, Q4_1, Q8_0 with f16/bf16 activations): each block first quantizes its m rows
// of x (normalized first with _norm) to int8 per run of 32 with ggml's Q8_0 rounding: d = max|x| / 127,
// xq = roundf(x * (1 / d)), kept in dynamic shared memory with (d, d * sum(xq)). The dot products
// are then integer (dp4a: four weights per instruction) and the unit's scales are applied once, so
// the kernel issues a quarter of the float path's instructions; the error is the activations'
// 8-bit rounding, what llama.cpp's quantized matmuls have. luce_core.formats.act_quant is the oracle.
#include "quant.cuh"

#ifndef LUCE_GEMV_PRELOAD
#define LUCE_GEMV_PRELOAD 1  // _q8 kernels: issue the first weight loads before quantizing x
#endif

template <class F, class T>
__device__ __forceinline__ float run_dot(const float* q, const float* s, const float* o, const float* xv) {
    float part = 0.f;
#pragma unroll
    for (int r = 0; r < F::NRUN; ++r) {
        float sq = 0.f, sx = 0.f;
#pragma unroll
        for (int i = 0; i < F::RLEN; ++i) {
            sq = fmaf(q[r * F::RLEN + i], xv[r * F::RLEN + i], sq);
            if (F::HAS_OFFSET) sx += xv[r * F::RLEN + i];
        }
        part = fmaf(s[r], sq, part);
        if (F::HAS_OFFSET) part = fmaf(o[r], sx, part);
    }
    return part;
}

// The m rows of x RMS-normalized into xn (rows of K).
template <class T>
__device__ __forceinline__ void norm_rows(const T* __restrict__ x, i64 xs, int m, int K, const float* __restrict__ nw,
                                          float eps, int nt, T* xn) {
    __shared__ float red[32];
    for (int j = 0; j < m; ++j) {
        const T* xr = x + j * xs;
        const float inv = rms_inv_block(xr, K, eps, nt, red);
        for (int i = threadIdx.x; i < K; i += blockDim.x) xn[j * K + i] = from_f<T>(to_f(xr[i]) * inv * nw[i]);
    }
    __syncthreads();
}

// The m rows of x (RMS-normalized as norm_rows does, with NORM) quantized to int8 per 32: bytes
// [m][K], then (d, d * sum(xq)) per run as float2 [m][K/32]. Four lanes per run of 32, eight
// values (one 16-byte load) each, two loads in flight per lane: the prologue stays short.
template <class T, bool NORM>
__device__ __forceinline__ void quantize_rows(const T* __restrict__ x, i64 xs, int m, int K,
                                              const float* __restrict__ nw, float eps, int nt, unsigned char* sm) {
    __shared__ float red[32], inv[8];
    if constexpr (NORM) {
        for (int j = 0; j < m; ++j) {
            const float v = rms_inv_block(x + j * xs, K, eps, nt, red);
            if (threadIdx.x == 0) inv[j] = v;
        }
        __syncthreads();
    }
    const int lane = threadIdx.x & 31, per_row = K >> 3, total = m * per_row;  // eighths of rows
    float2* sc = reinterpret_cast<float2*>(sm + (size_t)m * K);
    constexpr int C = 2;  // chunks per thread per pass: their loads are issued before any math
    for (int t0 = threadIdx.x - lane; t0 < total; t0 += C * blockDim.x) {  // warp-uniform
        float v[C][8];
#pragma unroll
        for (int c = 0; c < C; ++c) {
            const int t = t0 + lane + c * blockDim.x, j = t / per_row, k0 = (t - j * per_row) * 8;
            if (t < total) load8(x + j * xs + k0, v[c]);
        }
#pragma unroll
        for (int c = 0; c < C; ++c) {
            const int t = t0 + lane + c * blockDim.x, j = t / per_row, k0 = (t - j * per_row) * 8;
            if (t0 + c * blockDim.x >= total) break;  // warp-uniform
            const bool ok = t < total;  // the four lanes of a run agree (per_row is a multiple of 4)
            if (!ok)
#pragma unroll
                for (int i = 0; i < 8; ++i) v[c][i] = 0.f;
            else if constexpr (NORM)
#pragma unroll
                for (int i = 0; i < 8; ++i) v[c][i] = to_f(from_f<T>(v[c][i] * inv[j] * __ldg(nw + k0 + i)));
            float amax = 0.f;
#pragma unroll
            for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[c][i]));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
            const float d = __fdiv_rn(amax, 127.f), id = d == 0.f ? 0.f : __frcp_rn(d);  // ggml's Q8_0 rounding
            int sum = 0;
            u32 w[2] = {0u, 0u};
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int q = (int)roundf(__fmul_rn(v[c][i], id));  // half away from zero
                sum += q;
                w[i >> 2] |= (u32)(q & 0xff) << (8 * (i & 3));
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            if (ok) {
                *reinterpret_cast<uint2*>(sm + (size_t)j * K + k0) = make_uint2(w[0], w[1]);
                if ((t & 3) == 0) sc[t >> 2] = make_float2(d, __fmul_rn(d, (float)sum));
            }
        }
    }
    __syncthreads();
}

// The epilogue of a QKV GEMV with RoPE and the KV append fused in (pos non-null): the weight is
// [Q; K; V] (nq, nk, nk rows; heads of d channels, RoPE over the first 2 * half of them in pairs
// (2i, 2i + 1), which a row group's R = 2 rows are), x row j is the token at RoPE position pos[j]
// stored in cache slot slot[j] (or start + j). q is rotated in y; k (rotated) and v go to this
// layer's f32/f16/bf16 caches [cap, nk / d, d] (kfmt, vfmt: KV_F32/F16/BF16) and
// stay unrotated in y. Every value rounds as GEMV -> kv_append with RoPE rounds it: bit for bit
// the two launches, in one.
struct RopeStore {
    const i64* pos;
    const i64* slot;
    i64 start;
    const float* cs;
    const float* sn;
    u8* kc;
    u8* vc;
    i64 cap;
    int nq, nk, d, half, kfmt, vfmt;
};

__device__ __forceinline__ void store_cache(u8* c, int fmt, i64 e, float a, float b) {
    if (fmt == KV_F32) {
        reinterpret_cast<float*>(c)[e] = a;
        reinterpret_cast<float*>(c)[e + 1] = b;
    } else if (fmt == KV_F16) {
        reinterpret_cast<__half*>(c)[e] = __float2half_rn(a);
        reinterpret_cast<__half*>(c)[e + 1] = __float2half_rn(b);
    } else {
        reinterpret_cast<__nv_bfloat16*>(c)[e] = __float2bfloat16_rn(a);
        reinterpret_cast<__nv_bfloat16*>(c)[e + 1] = __float2bfloat16_rn(b);
    }
}

// Output rows (n, n + 1) of x row j (v0, v1: the sums times alpha) into y row yr and the caches.
template <class T>
__device__ __forceinline__ void rope_store_pair(const RopeStore& rs, int j, int n, float v0, float v1, T* yr) {
    const float a = to_f(from_f<T>(v0)), b = to_f(from_f<T>(v1));  // the GEMV's output
    const bool is_q = n < rs.nq, is_v = n >= rs.nq + rs.nk;
    const int r = is_q ? n : n - rs.nq - (is_v ? rs.nk : 0), c = r % rs.d;  // row within its part, channel
    float ra = a, rb = b;
    if (!is_v && c < 2 * rs.half) {
        const i64 p = rs.pos[j];
        const int i = c >> 1;
        float o0, o1;
        rope_pair(a, b, rs.cs[p * rs.half + i], rs.sn[p * rs.half + i], o0, o1);
        ra = to_f(from_f<T>(o0));  // q as kv_append stores it; k rounded to its source dtype first
        rb = to_f(from_f<T>(o1));
    }
    yr[n] = from_f<T>(is_q ? ra : a);
    yr[n + 1] = from_f<T>(is_q ? rb : b);
    if (is_q) return;
    const i64 slot = rs.slot ? rs.slot[j] : rs.start + j;
    if (slot < 0 || slot >= rs.cap) return;  // never out of bounds, as kv_append
    const i64 e = (slot * (rs.nk / rs.d) + r / rs.d) * rs.d + c;
    store_cache(is_v ? rs.vc : rs.kc, is_v ? rs.vfmt : rs.kfmt, e, ra, rb);
}

template <class F, class T, int R, int UN, int MX, bool NORM, bool Q8>
__device__ __forceinline__ void gemv_impl(const u8* p0, const u8* p1, const u8* p2, const u8* p3,
                                          const T* __restrict__ x, T* __restrict__ y, int N, int K,
                                          int m, i64 xs, i64 ys, float alpha, int add_y, int wpr, int glu,
                                          const float* __restrict__ nw, float eps, int nt, int yf32,
                                          const RopeStore& rs) {
    static_assert(!NORM || MX == 1, "the fused RMSNorm serves one row (decode); the host normalizes rows first");
    // wpr warps share each group of R rows (split over k) so short grids still fill the GPU;
    // their partial sums meet in shared memory.
    __shared__ float red[8][MX * R];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = warp / wpr, wig = warp % wpr, groups = (blockDim.x >> 5) / wpr;
    const QW w{p0, p1, p2, p3, K};
    const int U = K >> 5, stride = 32 * wpr;
    // Persistent grid: the host launches about as many blocks as fit at once, and each block
    // walks row groups, so no half-empty last wave. The loop bound is block-uniform.
    // a group computes R consecutive output rows, or with glu one output from the R = 2 weight
    // rows (n, N + n)
    const int outs = glu ? 1 : R;
    extern __shared__ __align__(16) unsigned char gemv_xn[];
    T* xn = reinterpret_cast<T*>(gemv_xn);
    int rows[R];
    typename F::Raw raw[UN][R];
    auto row_group = [&](int base) {  // this warp's rows of row group base; returns its first output
        const int row0 = (base * groups + group) * outs;
#pragma unroll
        for (int r = 0; r < R; ++r)  // a missing row re-reads the last one
            rows[r] = glu ? min(row0, N - 1) + r * N : min(row0 + r, N - 1);
        return row0;
    };
    auto load_units = [&](int u0) {
#pragma unroll
        for (int i = 0; i < UN; ++i)
#pragma unroll
            for (int r = 0; r < R; ++r)
                if (u0 + stride * i < U) raw[i][r] = F::load(w, rows[r], u0 + stride * i);
    };
    bool loaded = false;  // raw already holds the first iteration's units
    if constexpr (Q8) {
        // the first row group's weights are on their way from memory while x is quantized (for
        // 20-byte units: Q8_0's 36 would spill under the 64-register cap)
#if LUCE_GEMV_PRELOAD
        if (sizeof(typename F::Raw) <= 20 && blockIdx.x * groups * outs < N && row_group(blockIdx.x) < N &&
            wig * 32 + lane < U) {
            load_units(wig * 32 + lane);
            loaded = true;
        }
#endif
        quantize_rows<T, NORM>(x, xs, m, K, nw, eps, nt, gemv_xn);
    } else if constexpr (NORM) {
        norm_rows(x, xs, m, K, nw, eps, nt, xn);
    }
    for (int base = blockIdx.x; base * groups * outs < N; base += gridDim.x) {
        const int row0 = row_group(base);
        const bool active = row0 < N;
        float acc[MX][R];
#pragma unroll
        for (int j = 0; j < MX; ++j)
#pragma unroll
            for (int r = 0; r < R; ++r) acc[j][r] = 0.f;

        for (int u0 = wig * 32 + lane; active && u0 < U; u0 += stride * UN) {
            if (!loaded) load_units(u0);
            loaded = false;
#pragma unroll
            for (int i = 0; i < UN; ++i) {
                const int u = u0 + stride * i;
                if constexpr (Q8) {
                    if (u < U) {
#pragma unroll
                        for (int j = 0; j < MX; ++j) {
                            if (j >= m) break;
                            const uint4* xq = reinterpret_cast<const uint4*>(gemv_xn + (size_t)j * K) + 2 * u;
                            const uint4 xa = xq[0], xb = xq[1];
                            const float2 ds = reinterpret_cast<const float2*>(gemv_xn + (size_t)m * K)[j * U + u];
#pragma unroll
                            for (int r = 0; r < R; ++r)  // explicit rounding: x1 and x8 kernels sum alike
                                acc[j][r] = __fadd_rn(acc[j][r], F::dot_q8(raw[i][r], xa, xb, ds.x, ds.y));
                        }
                    }
                } else if (u < U) {
#pragma unroll
                    for (int j = 0; j < MX; ++j) {
                        if (j >= m) break;  // uniform: m is a kernel argument
                        float xv[32];
                        const T* xr = (NORM ? xn + j * K : x + j * xs) + F::k0(u);
#pragma unroll
                        for (int r = 0; r < F::NRUN; ++r)
#pragma unroll
                            for (int c = 0; c < F::RLEN; c += 8) {
                                if constexpr (NORM) load8s(xr + r * F::RSTRIDE + c, xv + r * F::RLEN + c);
                                else load8(xr + r * F::RSTRIDE + c, xv + r * F::RLEN + c);
                            }
                        if constexpr (F::NIBBLE) {
                            float sx_lo = 0.f, sx_hi = 0.f;
#pragma unroll
                            for (int t = 0; t < 16; ++t) {
                                sx_lo += xv[t];
                                sx_hi += xv[16 + t];
                            }
#pragma unroll
                            for (int r = 0; r < R; ++r) {
                                float a, b;
                                nibble_dot(raw[i][r].q, xv, a, b);
                                acc[j][r] += F::combine(raw[i][r], u, 128.f * (a - sx_lo), 128.f * (b - sx_hi),
                                                        sx_lo, sx_hi);
                            }
                        } else {
#pragma unroll
                            for (int r = 0; r < R; ++r) {
                                float q[32], sc[F::NRUN], of[F::NRUN];
                                F::unpack(raw[i][r], u, q, sc, of);
                                acc[j][r] += run_dot<F, T>(q, sc, of, xv);
                            }
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int j = 0; j < MX; ++j)
#pragma unroll
            for (int r = 0; r < R; ++r) acc[j][r] = warp_sum(acc[j][r]);
        if (wpr > 1) {  // block-uniform
            if (lane == 0)
#pragma unroll
                for (int j = 0; j < MX; ++j)
#pragma unroll
                    for (int r = 0; r < R; ++r) red[warp][j * R + r] = acc[j][r];
            __syncthreads();
            if (wig == 0 && lane == 0)
#pragma unroll
                for (int j = 0; j < MX; ++j)
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        float v = 0.f;
                        for (int t = 0; t < wpr; ++t) v += red[warp + t][j * R + r];
                        acc[j][r] = v;
                    }
            __syncthreads();  // red is reused by the next row group
        }
        if (active && wig == 0 && lane == 0 && glu) {
#pragma unroll
            for (int j = 0; j < MX; ++j)
                if (j < m) {
                    // gate and up rounded to T first and the SwiGLU kernel's expression: the
                    // fused epilogue gives bit for bit the unfused GEMV + swiglu output
                    const float g = to_f(from_f<T>(acc[j][0] * alpha)), u = to_f(from_f<T>(acc[j][R - 1] * alpha));
                    y[j * ys + row0] = from_f<T>(g / (1.f + expf(-g)) * u);
                }
        } else if (active && wig == 0 && lane == 0 && rs.pos) {
            static_assert(R == 2, "a RoPE pair is a row group");
#pragma unroll
            for (int j = 0; j < MX; ++j)
                if (j < m) rope_store_pair<T>(rs, j, row0, acc[j][0] * alpha, acc[j][1] * alpha, y + j * ys);
        } else if (active && wig == 0 && lane == 0) {
#pragma unroll
            for (int j = 0; j < MX; ++j)
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    if (j < m && row0 + r < N) {
                        float v = acc[j][r] * alpha;
                        T* dst = y + j * ys + row0 + r;
                        // an explicit add: never contracted with the product into one rounding
                        if (add_y) v = __fadd_rn(to_f(from_f<T>(v)), to_f(*dst));
                        if (yf32)  // f32 out (logits): the T-rounded value, as T out then a cast
                            reinterpret_cast<float*>(y)[j * ys + row0 + r] = to_f(from_f<T>(v));
                        else
                            *dst = from_f<T>(v);
                    }
                }
        }
    }
}

// The rows of this block, prefetched into L2 while the previous kernel finishes, when the grid
// covers the weight in one pass. A GEMV of several passes (a large gate|up, the LM head) streams
// at full bandwidth from its start anyway, and its prefetch only doubled the requests: on an H200
// a 16384x2048 Q8_0 GEMV took 16.1 us with it and 14.7 without, while one-pass shapes gained
// 3-12 % (bench/results/README.md).
// The fused RMSNorm's weight (NORM kernels) likewise, whatever the grid.
template <class F, int R>
__device__ __forceinline__ void before_wait_gemv(const u8* p0, const u8* p1, const u8* p2, const u8* p3, int N,
                                                 int K, int wpr, int glu, const float* nw) {
#if LUCE_PREFETCH
    if (nw) prefetch_l2_range(nw, (size_t)K * 4, threadIdx.x, blockDim.x);
    const int per_block = ((blockDim.x >> 5) / wpr) * (glu ? 1 : R), n0 = blockIdx.x * per_block;
    if (n0 >= N || (long long)gridDim.x * per_block < N) return;
    const int n1 = min(N, n0 + per_block);
    const QW w{p0, p1, p2, p3, K};
    prefetch_rows<F>(w, n0, n1, threadIdx.x, blockDim.x);
    if (glu) prefetch_rows<F>(w, N + n0, N + n1, threadIdx.x, blockDim.x);  // the up rows
#endif
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
        decode<F>(w, row, u, q, s, o);
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

// One program per weight format: the host passes -DLUCE_QNAME=q4_0 -DLUCE_QFMT=FQ4_0 (see
// programs.py), so a model compiles only the formats it has. Activations f16/bf16/f32; one x row
// (decode) or up to 8 (suffix _x8), the one-row kernel also with the fused RMSNorm (suffix _norm:
// K * sizeof(T) bytes of dynamic shared memory) and, for LUCE_GEMV_Q8 formats and f16/bf16, each
// with int8 activations (suffix _q8: m * K * 5/4 bytes); dequantization writes f32.
#define DEF_GEMV_MX(QN, F, AN, T, MX, NORM, Q8, SUF)                                                     \
    extern "C" __global__ void __launch_bounds__(256, MX == 1 ? LUCE_GEMV_MINB : 1)                     \
        gemv_##QN##_##AN##SUF(                                                                            \
        const u8* p0, const u8* p1, const u8* p2, const u8* p3, const T* x, T* y, int N, int K, int m,   \
        i64 xs, i64 ys, float alpha, int add_y, int wpr, int glu, const float* nw, float eps, int nt,     \
        int yf32, const i64* rs_pos, const i64* rs_slot, i64 rs_start, const float* rs_cos,               \
        const float* rs_sin, u8* rs_k, u8* rs_v, i64 rs_cap, int rs_nq, int rs_nk, int rs_d, int rs_half, \
        int rs_kfmt, int rs_vfmt) {                                                                       \
        before_wait_gemv<F, LUCE_GEMV_ROWS>(p0, p1, p2, p3, N, K, wpr, glu, NORM ? nw : nullptr);         \
        grid_dependency_sync();                                                                           \
        /* first x row of this grid row */                                                              \
        const i64 ry = LUCE_GEMV_ROWPAR ? (MX == 1 ? (i64)blockIdx.y : (i64)blockIdx.y * m) : 0;          \
        const RopeStore rs{rs_pos ? rs_pos + ry : nullptr, rs_slot ? rs_slot + ry : nullptr, rs_start + ry, \
                           rs_cos, rs_sin, rs_k, rs_v, rs_cap, rs_nq, rs_nk, rs_d, rs_half, rs_kfmt, rs_vfmt}; \
        T* yr = yf32 ? reinterpret_cast<T*>(reinterpret_cast<float*>(y) + ry * ys) : y + ry * ys;         \
        gemv_impl<F, T, LUCE_GEMV_ROWS, 2, MX, NORM, Q8>(p0, p1, p2, p3, x + ry * xs, yr, N, K, m,        \
                                                         xs, ys, alpha, add_y, wpr, glu, nw, eps, nt,     \
                                                         yf32, rs);                                       \
    }
#define DEF_GEMV(QN, F, AN, T)                        \
    DEF_GEMV_MX(QN, F, AN, T, 1, false, false, )      \
    DEF_GEMV_MX(QN, F, AN, T, 8, false, false, _x8)   \
    DEF_GEMV_MX(QN, F, AN, T, 1, true, false, _norm)
#define DEF_GEMV_Q8(QN, F, AN, T)                        \
    DEF_GEMV_MX(QN, F, AN, T, 1, false, true, _q8)       \
    DEF_GEMV_MX(QN, F, AN, T, 8, false, true, _x8_q8)    \
    DEF_GEMV_MX(QN, F, AN, T, 1, true, true, _norm_q8)
#define DEF_DEQUANT(QN, F)                                                                               \
    extern "C" __global__ void __launch_bounds__(256) dequant_##QN(                                     \
        const u8* p0, const u8* p1, const u8* p2, const u8* p3, float* out, int N, int K, float alpha) { \
        grid_dependency_sync();                                                                          \
        dequant_impl<F, float>(p0, p1, p2, p3, out, N, K, alpha);                                        \
    }
#ifndef LUCE_GEMV_ROWPAR
#define LUCE_GEMV_ROWPAR 0  // one-row kernels take grid row y = x row y (programs.py: formats without the cap)
#endif
#ifndef LUCE_GEMV_MINB
#define LUCE_GEMV_MINB 1  // blocks per SM the decode kernel's register budget must allow (programs.py)
#endif
#define LUCE_GEMV_ROWS 2  // rows per warp (glu needs 2); the host sizes the grid with the same number
#define EXPAND(M, ...) M(__VA_ARGS__)  // expands LUCE_QNAME before ## pastes it
EXPAND(DEF_GEMV, LUCE_QNAME, LUCE_QFMT, f16, __half)
EXPAND(DEF_GEMV, LUCE_QNAME, LUCE_QFMT, bf16, __nv_bfloat16)
EXPAND(DEF_GEMV, LUCE_QNAME, LUCE_QFMT, f32, float)
EXPAND(DEF_DEQUANT, LUCE_QNAME, LUCE_QFMT)
#if LUCE_GEMV_Q8  // formats with dot_q8 (programs.py)
EXPAND(DEF_GEMV_Q8, LUCE_QNAME, LUCE_QFMT, f16, __half)
EXPAND(DEF_GEMV_Q8, LUCE_QNAME, LUCE_QFMT, bf16, __nv_bfloat16)
#endif
