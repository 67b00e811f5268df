// Flash-decode: query tokens attend over a K/V cache laid out [capacity, n_kv_heads, row] (one
// layer of the torch KV store), split over the sequence.
//
// Formats (K and V independently): f16, bf16, f32 rows of D elements, or ggml q8_0 / q4_0 blocks
// of 32 elements ({fp16 d, int8 q[32]}: d*q; {fp16 d, u8 qs[16]}: low nibble of byte j is
// element j, high nibble element j+16, value d*(q-8)), dequantized in registers as they are read.
// The kernel is a template on the K format (the scoring loop dominates and its register budget
// differs per format); V's format is a runtime switch taken once per 32-position tile, outside
// the V loop, so 10 kernels serve all 25 (K, V) pairs at no cost in the inner loops. LUCE_KV_K
// selects one K format per program (luce_cuda.programs.ATTN_DECODE).
//
// Rows: query row r = t * G + g is token t's head hk*G + g (GQA group G = H / Hkv). Grid
// (n_kv_heads, n_splits, ceil(T*G/NG)), block 128 = 4 warps; a block serves up to NG = 8 (or 4,
// kernels _g4) rows of one KV head, so each K/V row is read once for a whole group (and for
// several tokens when G < NG). A row's arithmetic does not depend on NG or on its block-mates.
// Token t sees positions [0, end_t): end_t = positions[t] + 1 (int64 device pointer), else
// len + t (len from device memory, len_ptr, or an argument), so a captured CUDA graph replays
// with new lengths; blocks past every row's length exit at once. Positions a row may not see
// get probability 0 (exact no-ops: x*1, x+0), so a row's result is bit for bit what a one-token
// launch gives (chain verification stays lossless), given finite V below the block's length.
//
// Each warp takes tiles of 32 positions: a lane scores its own position against the rows'
// queries (q in shared memory, broadcast), the warp keeps an online softmax per row, then lanes
// own D/32 channels of the output and accumulate p * V row by row. Partial (m, l, o) per split go
// to a workspace [split][t][h]; the last block to finish merges them. Scores are in log2 units (q
// is pre-scaled by scale*log2(e)) so exp2f does the softmax.
//
// Tree rows (kernels _tree, DDTree verification): each block holds one token's rows; the token's
// positions p >= *tail_start are logical (its ancestors in depth order, itself last) and read the
// physical slot tail[t * tail_w + p - *tail_start]. A node at depth d then runs exactly the
// arithmetic of a one-token decode at position *tail_start + d whose cache holds its ancestors
// there: same tiles, lanes, splits and merge, only the rows' addresses differ. The row map is a
// template flag, so the decode kernels carry none of it.
//
// Rotated K (Hadamard, see luce_core.formats.hadamard): with ``signs`` the query is moved into K's basis
// in shared memory: times the ±1 signs, then a normalized FWHT over aligned groups of rot_group
// channels (the 1/sqrt(group) is folded into the scale by the host).
#include "luce_common.cuh"

constexpr int GMAX = 8, WARPS = 4;
enum { F_F16 = 0, F_BF16 = 1, F_F32 = 2, F_Q8_0 = 3, F_Q4_0 = 4 };

__device__ __forceinline__ float load_q(const void* q, int dt, i64 i) {
    if (dt == 0) return __half2float(reinterpret_cast<const __half*>(q)[i]);
    if (dt == 1) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(q)[i]);
    return reinterpret_cast<const float*>(q)[i];
}
__device__ __forceinline__ float half_bits(u32 b) { return __half2float(__ushort_as_half((u16)b)); }
__device__ __forceinline__ u32 ld_u16(const u8* p) { return __ldg(reinterpret_cast<const u16*>(p)); }

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

// Byte size of one row (one head's D elements) per format.
template <int F, int D> struct RowBytes {
    static constexpr int value = F == F_F16 || F == F_BF16 ? 2 * D : F == F_F32 ? 4 * D : F == F_Q8_0 ? D / 32 * 34
                                                                                                      : D / 32 * 18;
};
template <int F> struct FloatOf { typedef __half T; };
template <> struct FloatOf<F_BF16> { typedef __nv_bfloat16 T; };
template <> struct FloatOf<F_F32> { typedef float T; };

// Byte k of x (k constant) as the float 2^23 + byte; the callers subtract 2^23 + offset (exact).
__device__ __forceinline__ float byte_f(u32 x, int k) {
    return __uint_as_float(__byte_perm(x, 0x4B000000u, 0x7540u | k));
}

// s[g] += d * sum_i q_g[c0 + i] * e_i over one quantized block at channels c0..c0+31 (g < NG).
// The block's quants start at byte 4*a + sh/8 of the words x (sh 0, 16 or 32: funnel shifts);
// constants after unrolling where the caller knows the offsets.
template <int F, int D, int NG>
__device__ __forceinline__ void block_dot(const u32* x, int a, int sh, float d, int c0, const float (*qs)[D], float* s) {
    float bs[NG];
#pragma unroll
    for (int g = 0; g < NG; ++g) bs[g] = 0.f;
    if constexpr (F == F_Q8_0) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const u32 xq = __funnelshift_rc(x[a + j], x[a + j + 1], sh) ^ 0x80808080u;  // int8 + 128 per byte
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float e = byte_f(xq, k) - (LUCE_MAGIC + 128.0f);
#pragma unroll
                for (int g = 0; g < NG; ++g) bs[g] = fmaf(qs[g][c0 + 4 * j + k], e, bs[g]);
            }
        }
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u32 xq = __funnelshift_rc(x[a + j], x[a + j + 1], sh);
            const u32 lo = xq & 0x0F0F0F0Fu, hi = (xq >> 4) & 0x0F0F0F0Fu;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float el = byte_f(lo, k) - (LUCE_MAGIC + 8.0f);
                const float eh = byte_f(hi, k) - (LUCE_MAGIC + 8.0f);
#pragma unroll
                for (int g = 0; g < NG; ++g) {
                    bs[g] = fmaf(qs[g][c0 + 4 * j + k], el, bs[g]);
                    bs[g] = fmaf(qs[g][c0 + 16 + 4 * j + k], eh, bs[g]);
                }
            }
        }
    }
#pragma unroll
    for (int g = 0; g < NG; ++g) s[g] = fmaf(d, bs[g], s[g]);
}

// s[g] += q_g . k_row (q_g in qs[g], g < NG).
template <int F, int D, int NG>
__device__ __forceinline__ void score_row(const u8* __restrict__ row, const float (*qs)[D], float* s) {
    if constexpr (F == F_F16 || F == F_BF16 || F == F_F32) {
        typedef typename FloatOf<F>::T T;
        const T* kr = reinterpret_cast<const T*>(row);
#pragma unroll 8  // the row's loads all in flight at once
        for (int c = 0; c < D; c += 8) {
            float kv8[8];
            load8(kr + c, kv8);
#pragma unroll
            for (int g = 0; g < NG; ++g)
#pragma unroll
                for (int t = 0; t < 8; ++t) s[g] = fmaf(qs[g][c + t], kv8[t], s[g]);
        }
    } else if constexpr (RowBytes<F, D>::value % 8 == 0) {
        // D=128: rows are 8-byte aligned. The whole row goes into registers with 8-byte loads, all
        // issued at once (a lane reads its own row: wide loads matter), then is read one half
        // (two blocks, 17 or 9 words, the same byte layout in both halves) at a time, so block
        // offsets are constants while the code holds one pair of blocks: a full unroll costs
        // several times the compile time.
        constexpr int BB = F == F_Q8_0 ? 34 : 18, HW = BB / 2, RB = RowBytes<F, D>::value;
        u32 w[RB / 4];
#pragma unroll
        for (int i = 0; i < RB / 8; ++i) {
            const uint2 v = __ldg(reinterpret_cast<const uint2*>(row) + i);
            w[2 * i] = v.x;
            w[2 * i + 1] = v.y;
        }
#pragma unroll 1
        for (int hh = 0; hh < D / 64; ++hh) {
            u32 x[HW + 1];  // + a word block_dot reads (and shifts out) after block 1's last
#pragma unroll
            for (int i = 0; i < HW; ++i) x[i] = hh ? w[HW + i] : w[i];
            x[HW] = 0;
            // block 0 at byte 0 (quants from byte 2), block 1 at byte BB (BB % 4 == 2: quants aligned)
            block_dot<F, D, NG>(x, 0, 16, half_bits(x[0]), 64 * hh, qs, s);
            block_dot<F, D, NG>(x, (BB + 2) / 4, 0, half_bits(x[BB / 4] >> 16), 64 * hh + 32, qs, s);
        }
    } else {
        // D=64: rows only 4-byte aligned. One block at a time from the aligned word below it (9 or
        // 5 words); blocks start 2-byte aligned, so its quants are a funnel shift by 16 or 32.
        constexpr int BB = F == F_Q8_0 ? 34 : 18, NW = F == F_Q8_0 ? 9 : 5;
#pragma unroll 1
        for (int b = 0; b < D / 32; ++b) {
            const int o = b * BB, sh = 8 * (o & 3);
            const u32* wp = reinterpret_cast<const u32*>(row + (o & ~3));
            u32 x[NW];
#pragma unroll
            for (int i = 0; i < NW; ++i) x[i] = __ldg(wp + i);
            block_dot<F, D, NG>(x, 0, 16 + sh, half_bits(x[0] >> sh), 32 * b, qs, s);
        }
    }
}

// The D/32 channels lane owns in a V row of format F: values into vv, channel of value e: vch().
// Float formats and q8_0: channels lane*DPL + e. q4_0: the channels of the bytes the lane reads
// (D=128: bytes 2k, 2k+1 of block lane/8, k = lane%8 -> elements 2k, 2k+1, 2k+16, 2k+17).
template <int F, int D> __device__ __forceinline__ int vch(int lane, int e) {
    if constexpr (F == F_Q4_0) {
        if constexpr (D == 128) return 32 * (lane >> 3) + 2 * (lane & 7) + (e & 1) + 16 * (e >> 1);
        else return 32 * (lane >> 4) + (lane & 15) + 16 * e;
    } else {
        return lane * (D / 32) + e;
    }
}
template <int F, int D> __device__ __forceinline__ void load_v(const u8* __restrict__ row, int lane, float* vv) {
    constexpr int DPL = D / 32;
    if constexpr (F == F_F16 || F == F_BF16 || F == F_F32) {
        load_ch<DPL>(reinterpret_cast<const typename FloatOf<F>::T*>(row) + lane * DPL, vv);
    } else if constexpr (F == F_Q8_0) {
        const int b = lane / (32 / DPL);            // block of the lane's channels
        const u8* qp = row + 34 * b + 2 + DPL * (lane % (32 / DPL));
        const float d = half_bits(ld_u16(row + 34 * b));
        u32 x = ld_u16(qp);
        if (DPL == 4) x |= ld_u16(qp + 2) << 16;   // 2-byte aligned only: two halves
        x ^= 0x80808080u;
#pragma unroll
        for (int e = 0; e < DPL; ++e) vv[e] = d * (byte_f(x, e) - (LUCE_MAGIC + 128.0f));
    } else {
        const int b = lane / (32 / DPL);
        const int k = lane % (32 / DPL);
        const float d = half_bits(ld_u16(row + 18 * b));
        if constexpr (DPL == 4) {
            const u32 x = ld_u16(row + 18 * b + 2 + 2 * k);
            const u32 lo = x & 0x0F0Fu, hi = (x >> 4) & 0x0F0Fu;
            vv[0] = d * (byte_f(lo, 0) - (LUCE_MAGIC + 8.0f));
            vv[1] = d * (byte_f(lo, 1) - (LUCE_MAGIC + 8.0f));
            vv[2] = d * (byte_f(hi, 0) - (LUCE_MAGIC + 8.0f));
            vv[3] = d * (byte_f(hi, 1) - (LUCE_MAGIC + 8.0f));
        } else {
            const u32 x = __ldg(row + 18 * b + 2 + k);
            vv[0] = d * (u2f_magic(x & 15u) - 8.0f);
            vv[1] = d * (u2f_magic(x >> 4) - 8.0f);
        }
    }
}

// The query rows a block serves: NG consecutive rows, or (per_token, tree rows) NG rows of one token.
struct RowBlock { int r0, GB; };
template <int NG, bool TREE> __device__ __forceinline__ RowBlock row_block(int T, int G) {
    if constexpr (!TREE) {
        const int r0 = blockIdx.z * NG;
        return {r0, min(NG, T * G - r0)};
    }
    const int chunks = (G + NG - 1) / NG, t = blockIdx.z / chunks, c = blockIdx.z - t * chunks;
    return {t * G + c * NG, min(NG, G - c * NG)};
}
// Physical cache slot of logical position p (identity unless TREE).
template <bool TREE> struct SlotMap {
    const int* tail;  // this block's token's row of the table
    int start;
    __device__ __forceinline__ int operator()(int p) const {
        if constexpr (TREE) return p >= start ? __ldg(tail + p - start) : p;
        else return p;
    }
};

// acc[g] += sum_j ps[g][j] * V[tile + j] over the nv positions of a tile.
template <int FV, int D, int NG, bool TREE>
__device__ __forceinline__ void accumulate_v(const u8* __restrict__ vb, int vst, int tile, int nv, int lane,
                                             const float (*pw)[32], float (&acc)[NG][D / 32], SlotMap<TREE> row_at) {
    // VB rows' loads are issued before any of their FMAs (a dependent load per row would leave
    // the warp waiting on memory latency 32 times per tile); the FMA order stays row by row.
    constexpr int VB = D == 64 ? 32 : 16;  // 64 registers of V per lane
    for (int j0 = 0; j0 < nv; j0 += VB) {
        float vv[VB][D / 32];
#pragma unroll
        for (int j = 0; j < VB; ++j)
            if (j0 + j < nv) load_v<FV, D>(vb + (i64)row_at(tile + j0 + j) * vst, lane, vv[j]);
#pragma unroll
        for (int j = 0; j < VB; ++j) {
            if (j0 + j >= nv) break;  // warp-uniform
#pragma unroll
            for (int g = 0; g < NG; ++g) {
                const float pj = pw[g][j0 + j];
#pragma unroll
                for (int e = 0; e < D / 32; ++e) acc[g][e] = fmaf(pj, vv[j][e], acc[g][e]);
            }
        }
    }
}
// A warp's first tile in registers (D = 64: f16/bf16 K rows, f16/bf16 V), loaded in the same
// memory round trip as the queries. q, then K rows, then V rows were three round trips one after
// another: most of the kernel at short contexts, where a warp has one tile (6.0 -> 3.7 us at 64
// positions, 32/8 heads, H200; bench/results). At D = 128 the preloaded rows made ptxas spill.
// score_row's arithmetic, from the row's 16-byte words
template <int FK, int D, int NG>
__device__ __forceinline__ void score_regs(const uint4* kw, const float (*qs)[D], float* s) {
#pragma unroll
    for (int c = 0; c < D; c += 8) {
        float kv8[8];
        unpack8(static_cast<const typename FloatOf<FK>::T*>(nullptr), kw[c / 8], kv8);
#pragma unroll
        for (int g = 0; g < NG; ++g)
#pragma unroll
            for (int t = 0; t < 8; ++t) s[g] = fmaf(qs[g][c + t], kv8[t], s[g]);
    }
}
// accumulate_v's arithmetic (rows in order, each row's FMAs as there), from a lane's preloaded
// channel pair of each row (D = 64)
template <int FV, int NG>
__device__ __forceinline__ void accumulate_v_regs(const u32* vr, int nv, const float (*pw)[32], float (&acc)[NG][2]) {
#pragma unroll
    for (int j = 0; j < 32; ++j) {
        if (j >= nv) break;  // warp-uniform
        float vv[2];
        if (FV == F_F16) {
            const float2 f = h2f2(vr[j]);
            vv[0] = f.x; vv[1] = f.y;
        } else {
            vv[0] = bf16_lo(vr[j]); vv[1] = bf16_hi(vr[j]);
        }
#pragma unroll
        for (int g = 0; g < NG; ++g) {
            const float pj = pw[g][j];
#pragma unroll
            for (int e = 0; e < 2; ++e) acc[g][e] = fmaf(pj, vv[e], acc[g][e]);
        }
    }
}
template <int D> __device__ __forceinline__ int vch_rt(int fv, int lane, int e) {
    return fv == F_Q4_0 ? vch<F_Q4_0, D>(lane, e) : vch<F_F16, D>(lane, e);
}

__device__ __forceinline__ void store_out(void* out, int dt, i64 at, float v) {  // in q's dtype
    if (dt == 0) reinterpret_cast<__half*>(out)[at] = __float2half(v);
    else if (dt == 1) reinterpret_cast<__nv_bfloat16*>(out)[at] = __float2bfloat16(v);
    else reinterpret_cast<float*>(out)[at] = v;
}

// What a block can do before the previous kernel's writes are visible (see luce_common.cuh): read
// the lengths and positions (set by the host or by kernels at least two launches back, never by
// the KV append right before), bound each row's visible positions, and prefetch its split's K
// and V rows into L2 (the cache rows of earlier steps; the newest rows are being written now,
// which a prefetch does not mind).
struct DecodeRange {
    int base, pb, pe, n_split;
    bool run;  // false: a split past every row's length, nothing to do
    const int* lim;  // row g sees positions p < lim[g] of this split (shared memory)
};
__device__ __forceinline__ void prefetch_row(const u8* p, int n) {
    for (int o = 0; o < n; o += 128) prefetch_l2(p + o);
    prefetch_l2(p + n - 1);
}
template <int FK, int D, int NG, bool TREE>
__device__ __forceinline__ DecodeRange before_wait_flash_decode(const u8* __restrict__ k, const u8* __restrict__ v,
                                                                int v_fmt, int H, int Hkv, int T, int kst, int vst,
                                                                int len, const int* __restrict__ len_ptr,
                                                                const i64* __restrict__ pos_ptr, int n_max,
                                                                int split_len) {
    __shared__ int lim[GMAX];
    const int hk = blockIdx.x, split = blockIdx.y;
    const int G = H / Hkv;
    const RowBlock rb = row_block<NG, TREE>(T, G);
    const int r0 = rb.r0, GB = rb.GB;
    DecodeRange r;
    r.base = len_ptr ? *len_ptr : len;
    int end = 0;
    for (int g = 0; g < GB; ++g) {
        const int t = (r0 + g) / G;
        end = max(end, min(pos_ptr ? (int)pos_ptr[t] + 1 : r.base + t, n_max));
    }
    r.pb = split * split_len;
    r.pe = min(end, r.pb + split_len);
    r.n_split = max(1, (end + split_len - 1) / split_len);  // splits that run for these rows
    // the merge reads only splits below each row's length; split 0 always runs, so a row with no
    // visible position still gets its output (zeros)
    r.run = !(r.pb >= end && split > 0);
    r.lim = lim;
    if (!r.run) return r;
    if (threadIdx.x < GMAX) {
        const int g = threadIdx.x, t = (r0 + g) / G;
        lim[g] = g < GB ? min(r.pe, min(pos_ptr ? (int)pos_ptr[t] + 1 : r.base + t, n_max)) : 0;
    }
#if LUCE_PREFETCH
    const int vrb = v_fmt == F_F16 || v_fmt == F_BF16 ? 2 * D : v_fmt == F_F32 ? 4 * D : v_fmt == F_Q8_0 ? D / 32 * 34
                                                                                                     : D / 32 * 18;
    for (int p = r.pb + threadIdx.x; p < r.pe; p += blockDim.x) {
        prefetch_row(k + (i64)p * kst + (i64)hk * RowBytes<FK, D>::value, RowBytes<FK, D>::value);
        prefetch_row(v + (i64)p * vst + (i64)hk * vrb, vrb);
    }
#endif
    return r;
}

template <int FK, int D, int NG, bool TREE>
__device__ __forceinline__ void flash_decode_impl(const void* __restrict__ q, int q_dt, i64 qst,
                                                  const u8* __restrict__ k, const u8* __restrict__ v, int v_fmt,
                                                  float* __restrict__ ws_o, float* __restrict__ ws_ml,
                                                  int* __restrict__ done, void* __restrict__ out, int H, int Hkv,
                                                  int T, int kst, int vst,
                                                  int len, const int* __restrict__ len_ptr,
                                                  const i64* __restrict__ pos_ptr, int n_max, int split_len,
                                                  float scale_log2, const float* __restrict__ signs, int rot_group,
                                                  const int* __restrict__ tail, const int* __restrict__ tail_start,
                                                  int tail_w,
                                                  const DecodeRange& dr) {
    constexpr int DPL = D / 32;
    __shared__ __align__(16) float qs[NG][D];
    __shared__ __align__(16) float ps[WARPS][NG][32];
    __shared__ float red_o[WARPS][NG][D];
    __shared__ float red_m[WARPS][NG], red_l[WARPS][NG];

    if (!dr.run) return;
    const int hk = blockIdx.x, split = blockIdx.y;
    const int G = H / Hkv;
    const RowBlock rb = row_block<NG, TREE>(T, G);
    const int r0 = rb.r0, GB = rb.GB;
    SlotMap<TREE> row_at{tail, 0};
    if constexpr (TREE) row_at = {tail + (i64)(r0 / G) * tail_w, *tail_start};
    const int base = dr.base, pb = dr.pb, pe = dr.pe, n_split = dr.n_split;
    const int* lim = dr.lim;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    const u8* kb = k + (i64)hk * RowBytes<FK, D>::value;
    const u8* vb = v;
    switch (v_fmt) {
        case F_F16: vb += (i64)hk * RowBytes<F_F16, D>::value; break;
        case F_BF16: vb += (i64)hk * RowBytes<F_BF16, D>::value; break;
        case F_F32: vb += (i64)hk * RowBytes<F_F32, D>::value; break;
        case F_Q8_0: vb += (i64)hk * RowBytes<F_Q8_0, D>::value; break;
        default: vb += (i64)hk * RowBytes<F_Q4_0, D>::value; break;
    }
    // this warp's first tile, in flight while the queries load (see score_regs)
    constexpr bool PK = (FK == F_F16 || FK == F_BF16) && D == 64;
    const int tile0 = pb + warp * 32;
    const bool pre = PK && tile0 < pe;  // warp-uniform
    const bool pre_v = pre && (v_fmt == F_F16 || v_fmt == F_BF16);
    uint4 kpre[PK ? D / 8 : 1];
    u32 vpre[PK ? 32 : 1];
    if constexpr (PK) {
        if (pre && tile0 + lane < pe)
#pragma unroll
            for (int i = 0; i < D / 8; ++i) kpre[i] = __ldg(reinterpret_cast<const uint4*>(kb + (i64)row_at(tile0 + lane) * kst) + i);
        if (pre_v)
#pragma unroll
            for (int j = 0; j < 32; ++j)  // the lane's two channels (accumulate_v's load_v)
                if (tile0 + j < pe) vpre[j] = __ldg(reinterpret_cast<const u32*>(vb + (i64)row_at(tile0 + j) * vst) + lane);
    }
    for (int i = threadIdx.x; i < NG * D; i += blockDim.x) {  // rows g >= GB: q = 0, never stored
        const int g = i / D, d = i % D;
        float x = 0.f;
        if (g < GB) {
            const int r = r0 + g, t = r / G;
            x = load_q(q, q_dt, (i64)t * qst + (i64)(hk * G + r - t * G) * D + d) * scale_log2;
            if (signs) x *= signs[d];
        }
        qs[g][d] = x;
    }
    // grouped FWHT: butterflies h apart for h < group stay inside aligned groups of rot_group
    for (int h = 1; h < rot_group; h <<= 1) {
        __syncthreads();
        for (int i = threadIdx.x; i < GB * (D / 2); i += blockDim.x) {
            const int g = i / (D / 2), j = i % (D / 2);
            const int i0 = ((j & ~(h - 1)) << 1) | (j & (h - 1));
            const float a = qs[g][i0], b = qs[g][i0 + h];
            qs[g][i0] = a + b;
            qs[g][i0 + h] = a - b;
        }
    }
    __syncthreads();

    // Every loop over the rows below runs all NG of them (a compile-time count: straight-line code
    // whose NG independent chains the scheduler interleaves; with a runtime bound each row was a
    // branch and the rows ran one after another, on a GPU where this kernel has a warp or two
    // per SM to hide latency with). A row past GB has q = 0 and no visible position (lim 0).
    float m[NG], lsum[NG], acc[NG][DPL];
    int lm[NG];
#pragma unroll
    for (int g = 0; g < NG; ++g) {
        lm[g] = lim[g];
        m[g] = -LUCE_INF;
        lsum[g] = 0.f;
#pragma unroll
        for (int e = 0; e < DPL; ++e) acc[g][e] = 0.f;
    }

    // one tile's online-softmax step: running max and sum per row, probabilities to ps[warp]
    auto softmax_step = [&](const float (&s)[NG], int p) {
#pragma unroll
        for (int g = 0; g < NG; ++g) {
            const bool ok = p < lm[g];
            const float sv = ok ? s[g] : -LUCE_INF;
            const float mn = fmaxf(m[g], warp_max(sv));
            const float mr = mn == -LUCE_INF ? 0.f : mn;  // no visible key for this row yet
            const float corr = exp2f(m[g] - mr);
            const float pr = ok ? exp2f(sv - mr) : 0.f;
            lsum[g] = lsum[g] * corr + pr;
#pragma unroll
            for (int e = 0; e < DPL; ++e) acc[g][e] *= corr;
            m[g] = mn;
            ps[warp][g][lane] = pr;
        }
        __syncwarp();
    };
    auto accumulate_tile = [&](int tile, int nv) {  // p * V over one tile's rows, V from memory
        switch (v_fmt) {  // warp-uniform, once per tile
            case F_F16: accumulate_v<F_F16, D, NG, TREE>(vb, vst, tile, nv, lane, ps[warp], acc, row_at); break;
            case F_BF16: accumulate_v<F_BF16, D, NG, TREE>(vb, vst, tile, nv, lane, ps[warp], acc, row_at); break;
            case F_F32: accumulate_v<F_F32, D, NG, TREE>(vb, vst, tile, nv, lane, ps[warp], acc, row_at); break;
            case F_Q8_0: accumulate_v<F_Q8_0, D, NG, TREE>(vb, vst, tile, nv, lane, ps[warp], acc, row_at); break;
            default: accumulate_v<F_Q4_0, D, NG, TREE>(vb, vst, tile, nv, lane, ps[warp], acc, row_at); break;
        }
        __syncwarp();
    };
    if constexpr (PK) {
        if (pre) {  // the first tile, from registers (the loop below does the same arithmetic)
            const int p = tile0 + lane;
            float s[NG];
#pragma unroll
            for (int g = 0; g < NG; ++g) s[g] = 0.f;
            if (p < pe) score_regs<FK, D, NG>(kpre, qs, s);
            softmax_step(s, p);
            const int nv = min(32, pe - tile0);
            if (!pre_v) {
                accumulate_tile(tile0, nv);
            } else {
                if (v_fmt == F_F16) accumulate_v_regs<F_F16, NG>(vpre, nv, ps[warp], acc);
                else accumulate_v_regs<F_BF16, NG>(vpre, nv, ps[warp], acc);
                __syncwarp();
            }
        }
    }
    for (int tile = pre ? tile0 + WARPS * 32 : tile0; tile < pe; tile += WARPS * 32) {
        const int p = tile + lane;
        float s[NG];
#pragma unroll
        for (int g = 0; g < NG; ++g) s[g] = 0.f;
        if (p < pe) score_row<FK, D, NG>(kb + (i64)row_at(p) * kst, qs, s);
        softmax_step(s, p);
        accumulate_tile(tile, min(32, pe - tile));
    }
#pragma unroll
    for (int g = 0; g < NG; ++g) {
        const float l = warp_sum(lsum[g]);
        if (lane == 0) {
            red_m[warp][g] = m[g];
            red_l[warp][g] = l;
        }
#pragma unroll
        for (int e = 0; e < DPL; ++e) red_o[warp][g][vch_rt<D>(v_fmt, lane, e)] = acc[g][e];
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
        const int r = r0 + g, t = r / G;
        if (n_split == 1) {  // one split: this is the answer (the merge would compute o * 1 / (l * 1))
            store_out(out, q_dt, ((i64)t * H + hk * G + (r - t * G)) * D + d, l > 0.f ? o / l : 0.f);
            continue;
        }
        const i64 slot = ((i64)split * T + t) * H + hk * G + (r - t * G);
        ws_o[slot * D + d] = o;
        if (d == 0) {
            ws_ml[slot * 2] = M;
            ws_ml[slot * 2 + 1] = l;
        }
    }
    // The last split block of this (head, row group) to finish merges all splits (no second
    // launch): its counter reaches the number of splits that ran, and it re-arms the counter for
    // the next launch or graph replay. The merge order is fixed, so results do not depend on
    // which block comes last.
    if (n_split == 1) return;
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* c = done + hk * gridDim.z + blockIdx.z;
        last = atomicAdd(c, 1) == n_split - 1;
        if (last) *c = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int i = threadIdx.x; i < GB * D; i += blockDim.x) {
        const int g = i / D, d = i % D, r = r0 + g, t = r / G, h = hk * G + (r - t * G);
        const int ns = max(1, (min(pos_ptr ? (int)pos_ptr[t] + 1 : base + t, n_max) + split_len - 1) / split_len);
        float M = -LUCE_INF;
        for (int sp = 0; sp < ns; ++sp) M = fmaxf(M, __ldcg(ws_ml + (((i64)sp * T + t) * H + h) * 2));
        float o = 0.f, l = 0.f;
        for (int sp = 0; sp < ns; ++sp) {
            const i64 slot = ((i64)sp * T + t) * H + h;
            const float m = __ldcg(ws_ml + slot * 2);
            const float f = m == -LUCE_INF ? 0.f : exp2f(m - M);
            o += f * __ldcg(ws_o + slot * D + d);
            l += f * __ldcg(ws_ml + slot * 2 + 1);
        }
        store_out(out, q_dt, ((i64)t * H + h) * D + d, l > 0.f ? o / l : 0.f);
    }
}

#define DEF_DECODE_NG(KN, FK, D, NG, TREE, SUF)                                                              \
    extern "C" __global__ void __launch_bounds__(128) flash_decode_##KN##_d##D##SUF(                         \
        const void* q, int q_dt, i64 qst, const u8* k, const u8* v, int v_fmt, float* ws_o, float* ws_ml,        \
        int* done, void* out, int H, int Hkv, int T, int kst, int vst, int len, const int* len_ptr,            \
        const i64* pos_ptr, int n_max, int split_len, float scale_log2, const float* signs, int rot_group,     \
        const int* tail, const int* tail_start, int tail_w) {                                                 \
        const DecodeRange dr = before_wait_flash_decode<FK, D, NG, TREE>(k, v, v_fmt, H, Hkv, T, kst, vst, len, \
                                                                          len_ptr, pos_ptr, n_max, split_len); \
        grid_dependency_sync();                                                                               \
        flash_decode_impl<FK, D, NG, TREE>(q, q_dt, qst, k, v, v_fmt, ws_o, ws_ml, done, out, H, Hkv, T, kst, vst,    \
                                     len, len_ptr, pos_ptr, n_max, split_len, scale_log2, signs, rot_group,    \
                                     tail, tail_start, tail_w, dr);                                           \
    }
// Blocks of 8 query rows, and of 4 (suffix _g4: a decode step of a model with GQA groups of up to
// 4, where 8 would double the scoring work for nothing). LUCE_TREE=1 programs hold the tree-row
// kernels (_tree) instead: they double the compile time, and only tree verification needs them.
#if defined(LUCE_TREE) && LUCE_TREE
#define DEF_DECODE(KN, FK, D)                   \
    DEF_DECODE_NG(KN, FK, D, GMAX, true, _tree) \
    DEF_DECODE_NG(KN, FK, D, 4, true, _g4_tree)
#else
#define DEF_DECODE(KN, FK, D)              \
    DEF_DECODE_NG(KN, FK, D, GMAX, false, ) \
    DEF_DECODE_NG(KN, FK, D, 4, false, _g4)
#endif
// Named by the K format; V's format is the v_fmt argument (F_* codes above). One program per K
// format (LUCE_KV_K = its F_* code), so a model compiles only the kernels its cache needs.
#if !defined(LUCE_KV_K) || LUCE_KV_K == 0
DEF_DECODE(f16, F_F16, 64)
DEF_DECODE(f16, F_F16, 128)
#endif
#if !defined(LUCE_KV_K) || LUCE_KV_K == 1
DEF_DECODE(bf16, F_BF16, 64)
DEF_DECODE(bf16, F_BF16, 128)
#endif
#if !defined(LUCE_KV_K) || LUCE_KV_K == 2
DEF_DECODE(f32, F_F32, 64)
DEF_DECODE(f32, F_F32, 128)
#endif
#if !defined(LUCE_KV_K) || LUCE_KV_K == 3
DEF_DECODE(q8_0, F_Q8_0, 64)
DEF_DECODE(q8_0, F_Q8_0, 128)
#endif
#if !defined(LUCE_KV_K) || LUCE_KV_K == 4
DEF_DECODE(q4_0, F_Q4_0, 64)
DEF_DECODE(q4_0, F_Q4_0, 128)
#endif
