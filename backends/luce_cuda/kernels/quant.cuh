// Quantized weight formats as the CUDA kernels read them.
//
// A weight [N, K] is uploaded once in a "planar" re-layout of its ggml blocks (lossless, same
// bytes): the packed quants of each row are contiguous and 16-byte aligned (plane p0), and the
// per-block scales live in their own planes (p1..p3), so that a thread reads its quants with
// one 16-byte load. luce_cuda/weights.py builds the planes; the block formats are ggml's.
//
// The work unit of every format is 32 weights of one row, read as NRUN runs of RLEN = 32/NRUN
// contiguous k positions (run r starts at k0(u) + r*RSTRIDE). load() fetches a unit's bytes
// (one 16-byte load of quants plus its scales) into a Raw; unpack() turns a Raw into, per run,
// integer-valued quants q (exact in float), a scale s and an offset o, with
//     w[k] = s[r] * q[i] + o[r]        (o only where HAS_OFFSET)
// so a dot product is s * sum(q*x) + o * sum(x): the scale is applied once per run. Keeping
// load and unpack apart lets a kernel issue the loads of several units before any math.
#pragma once
#include "luce_common.cuh"

struct QW {
    const u8* __restrict__ p0;
    const u8* __restrict__ p1;
    const u8* __restrict__ p2;
    const u8* __restrict__ p3;
    int K;
};

__device__ __forceinline__ float ld_half(const u8* p) {
    return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const u16*>(p))));
}
__device__ __forceinline__ uint4 ld16(const u8* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ u16 ld_u16(const u8* p) { return __ldg(reinterpret_cast<const u16*>(p)); }
__device__ __forceinline__ float half_bits(u32 b) { return __half2float(__ushort_as_half((u16)b)); }
__device__ __forceinline__ u32 byte_of(const uint4& v, int i) {  // a few selects when i is not a constant
    u32 w = i < 4 ? v.x : i < 8 ? v.y : i < 12 ? v.z : v.w;
    return (w >> (8 * (i & 3))) & 0xffu;
}

// Fast dot for formats whose unit is 16 bytes of nibbles (low nibble of byte i -> xv[i], high
// -> xv[16 + i]): a nibble q becomes the float 1 + q/128 with one byte permute (byte 2 of the
// float is 0x80|q, byte 3 is 0x3F), so sum((1 + q/128) x) - sum(x) = sum(q x)/128 costs one
// PRMT and one FFMA per weight instead of an integer-to-float conversion. Exact up to rounding.
__device__ __forceinline__ void nibble_dot(const uint4& v, const float* xv, float& qx_lo, float& qx_hi) {
    const u32 wd[4] = {v.x, v.y, v.z, v.w};
    float a = 0.f, b = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const u32 lo = (wd[j] & 0x0F0F0F0Fu) | 0x80808080u;
        const u32 hi = ((wd[j] >> 4) & 0x0F0F0F0Fu) | 0x80808080u;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const u32 sel = 0x7054u | (k << 8);
            a = fmaf(__uint_as_float(__byte_perm(lo, 0x3F000000u, sel)), xv[4 * j + k], a);
            b = fmaf(__uint_as_float(__byte_perm(hi, 0x3F000000u, sel)), xv[16 + 4 * j + k], b);
        }
    }
    qx_lo = a;  // still sum((1 + q/128) x): the caller subtracts sum(x) and scales by 128
    qx_hi = b;
}

// Integer dot of a 16-byte nibble unit with 32 int8 activations (xa: elements 0..15, xb: 16..31),
// four products per dp4a: low nibbles of word j are weights 4j..4j+3, high nibbles 16+4j...
__device__ __forceinline__ int nibble_dot_q8(const uint4& q, const uint4& xa, const uint4& xb) {
    const u32 wd[4] = {q.x, q.y, q.z, q.w}, lo[4] = {xa.x, xa.y, xa.z, xa.w}, hi[4] = {xb.x, xb.y, xb.z, xb.w};
    int s = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        s = __dp4a((int)(wd[j] & 0x0F0F0F0Fu), (int)lo[j], s);
        s = __dp4a((int)((wd[j] >> 4) & 0x0F0F0F0Fu), (int)hi[j], s);
    }
    return s;
}

// The 32 nibbles of a 16-byte unit as floats minus ``bias`` (exact: magic-number conversion):
// low nibble of byte i -> q[i], high nibble -> q[16 + i] (Q4_0, Q4_1 and Q4_K share this order).
template <int BIAS>
__device__ __forceinline__ void unpack_nibbles(const uint4& v, float* q) {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        const u32 b = byte_of(v, i);
        q[i] = __uint_as_float(0x4B000000u | (b & 15u)) - (LUCE_MAGIC + (float)BIAS);
        q[i + 16] = __uint_as_float(0x4B000000u | (b >> 4)) - (LUCE_MAGIC + (float)BIAS);
    }
}

// ------------------------------------------------------------------ Q4_0: {half d; u8 qs[16]}
// p0: qs [N][K/2]; p2: d [N][K/32] half.   w = d * (nibble - 8)
struct FQ4_0 {
    static constexpr int ROW_DIV[4] = {2, 0, 16, 0};  // plane p holds K / ROW_DIV[p] bytes per row (0: unused)
    static constexpr int NRUN = 1, RLEN = 32, RSTRIDE = 0;
    static constexpr bool HAS_OFFSET = false, NIBBLE = true;
    struct Raw { uint4 q; u32 d; };
    // dot from nibble sums (see nibble_dot): qx = sum(nibble * x) of the low/high halves
    __device__ static float combine(const Raw& r, int u, float qx_lo, float qx_hi, float sx_lo, float sx_hi) {
        return half_bits(r.d) * (qx_lo + qx_hi - 8.0f * (sx_lo + sx_hi));
    }
    __device__ static int k0(int u) { return u * 32; }
    __device__ static Raw load(const QW& w, int row, int u) {
        return Raw{ld16(w.p0 + (size_t)row * (w.K >> 1) + (size_t)u * 16),
                   ld_u16(w.p2 + ((size_t)row * (w.K >> 5) + u) * 2)};
    }
    __device__ static void unpack(const Raw& r, int u, float* q, float* s, float* o) {
        s[0] = half_bits(r.d);
        unpack_nibbles<8>(r.q, q);
    }
    // with int8 activations x = d * xq (ds = d * sum(xq)): d_w * (d * sum(nibble * xq) - 8 ds)
    __device__ static float dot_q8(const Raw& r, const uint4& xa, const uint4& xb, float d, float ds) {
        return __fmul_rn(half_bits(r.d), fmaf(d, (float)nibble_dot_q8(r.q, xa, xb), -8.f * ds));
    }
};

// ------------------------------------------------------------------ Q4_1: {half d; half m; u8 qs[16]}
// p0: qs [N][K/2]; p2: (d, m) [N][K/32] half2.   w = d * nibble + m
struct FQ4_1 {
    static constexpr int ROW_DIV[4] = {2, 0, 8, 0};  // plane p holds K / ROW_DIV[p] bytes per row (0: unused)
    static constexpr int NRUN = 1, RLEN = 32, RSTRIDE = 0;
    static constexpr bool HAS_OFFSET = true, NIBBLE = true;
    struct Raw { uint4 q; u32 dm; };
    __device__ static float combine(const Raw& r, int u, float qx_lo, float qx_hi, float sx_lo, float sx_hi) {
        float2 f = h2f2(r.dm);
        return f.x * (qx_lo + qx_hi) + f.y * (sx_lo + sx_hi);
    }
    __device__ static int k0(int u) { return u * 32; }
    __device__ static Raw load(const QW& w, int row, int u) {
        return Raw{ld16(w.p0 + (size_t)row * (w.K >> 1) + (size_t)u * 16),
                   __ldg(reinterpret_cast<const u32*>(w.p2 + ((size_t)row * (w.K >> 5) + u) * 4))};
    }
    __device__ static void unpack(const Raw& r, int u, float* q, float* s, float* o) {
        float2 f = h2f2(r.dm);
        s[0] = f.x;
        o[0] = f.y;
        unpack_nibbles<0>(r.q, q);
    }
    __device__ static float dot_q8(const Raw& r, const uint4& xa, const uint4& xb, float d, float ds) {
        const float2 f = h2f2(r.dm);  // d_w * d * sum(nibble * xq) + m_w * ds
        return fmaf(f.x, __fmul_rn(d, (float)nibble_dot_q8(r.q, xa, xb)), __fmul_rn(f.y, ds));
    }
};

// ------------------------------------------------------------------ Q8_0: {half d; i8 qs[32]}
// p0: qs [N][K]; p2: d [N][K/32] half.   w = d * q
struct FQ8_0 {
    static constexpr int ROW_DIV[4] = {1, 0, 16, 0};  // plane p holds K / ROW_DIV[p] bytes per row (0: unused)
    static constexpr int NRUN = 1, RLEN = 32, RSTRIDE = 0;
    static constexpr bool HAS_OFFSET = false, NIBBLE = false;
    struct Raw { uint4 a, b; u32 d; };
    __device__ static int k0(int u) { return u * 32; }
    __device__ static Raw load(const QW& w, int row, int u) {
        const u8* p = w.p0 + (size_t)row * w.K + (size_t)u * 32;
        return Raw{ld16(p), ld16(p + 16), ld_u16(w.p2 + ((size_t)row * (w.K >> 5) + u) * 2)};
    }
    __device__ static void unpack(const Raw& r, int u, float* q, float* s, float* o) {
        s[0] = half_bits(r.d);
#pragma unroll
        for (int i = 0; i < 16; ++i) {  // int8 -> float exactly: (q ^ 0x80) is q + 128 as unsigned
            q[i] = __uint_as_float(0x4B000000u | (byte_of(r.a, i) ^ 0x80u)) - (LUCE_MAGIC + 128.0f);
            q[i + 16] = __uint_as_float(0x4B000000u | (byte_of(r.b, i) ^ 0x80u)) - (LUCE_MAGIC + 128.0f);
        }
    }
    __device__ static float dot_q8(const Raw& r, const uint4& xa, const uint4& xb, float d, float ds) {
        int s = 0;
        s = __dp4a((int)r.a.x, (int)xa.x, s); s = __dp4a((int)r.a.y, (int)xa.y, s);
        s = __dp4a((int)r.a.z, (int)xa.z, s); s = __dp4a((int)r.a.w, (int)xa.w, s);
        s = __dp4a((int)r.b.x, (int)xb.x, s); s = __dp4a((int)r.b.y, (int)xb.y, s);
        s = __dp4a((int)r.b.z, (int)xb.z, s); s = __dp4a((int)r.b.w, (int)xb.w, s);
        return __fmul_rn(half_bits(r.d), __fmul_rn(d, (float)s));
    }
};

// ------------------------------------------------------------------ Q4_K: {half d, dmin; u8 scales[12]; u8 qs[128]} per 256
// p0: qs [N][K/2]; p2: header [N][K/256][16] = d, dmin, scales[12].
// Unit u = 16 qs bytes of chunk c (32 bytes, sub-blocks 2c low / 2c+1 high nibbles), half j:
// run 0 = sub-block 2c elements 16j..16j+15, run 1 = sub-block 2c+1 (32 positions later).
__device__ __forceinline__ void q4k_scale_min(const uint4& h, int sb, float& s, float& m) {
    // scales[i] is header byte 4 + i
    u32 a, b;
    if (sb < 4) {
        a = byte_of(h, 4 + sb) & 63u;
        b = byte_of(h, 8 + sb) & 63u;
    } else {
        a = (byte_of(h, 8 + sb) & 0xFu) | ((byte_of(h, sb) >> 6) << 4);
        b = (byte_of(h, 8 + sb) >> 4) | ((byte_of(h, 4 + sb) >> 6) << 4);
    }
    s = (float)a;
    m = (float)b;
}

struct FQ4_K {
    static constexpr int ROW_DIV[4] = {2, 0, 16, 0};  // plane p holds K / ROW_DIV[p] bytes per row (0: unused)
    static constexpr int NRUN = 2, RLEN = 16, RSTRIDE = 32;
    static constexpr bool HAS_OFFSET = true, NIBBLE = true;
    struct Raw { uint4 q, h; };
    __device__ static float combine(const Raw& r, int u, float qx_lo, float qx_hi, float sx_lo, float sx_hi) {
        const int c = (u & 7) >> 1;
        const float d = half_bits(r.h.x & 0xffffu), dmin = half_bits(r.h.x >> 16);
        float sc0, mn0, sc1, mn1;
        q4k_scale_min(r.h, 2 * c, sc0, mn0);
        q4k_scale_min(r.h, 2 * c + 1, sc1, mn1);
        return d * (sc0 * qx_lo + sc1 * qx_hi) - dmin * (mn0 * sx_lo + mn1 * sx_hi);
    }
    __device__ static int k0(int u) { return (u >> 3) * 256 + ((u & 7) >> 1) * 64 + (u & 1) * 16; }
    __device__ static Raw load(const QW& w, int row, int u) {
        return Raw{ld16(w.p0 + (size_t)row * (w.K >> 1) + (size_t)u * 16),
                   ld16(w.p2 + ((size_t)row * (w.K >> 8) + (u >> 3)) * 16)};
    }
    __device__ static void unpack(const Raw& r, int u, float* q, float* s, float* o) {
        const int c = (u & 7) >> 1;
        const float d = half_bits(r.h.x & 0xffffu), dmin = half_bits(r.h.x >> 16);
        float sc, mn;
        q4k_scale_min(r.h, 2 * c, sc, mn);
        s[0] = d * sc;
        o[0] = -dmin * mn;
        q4k_scale_min(r.h, 2 * c + 1, sc, mn);
        s[1] = d * sc;
        o[1] = -dmin * mn;
        unpack_nibbles<0>(r.q, q);
    }
};

// ------------------------------------------------------------------ Q6_K: {u8 ql[128]; u8 qh[64]; i8 scales[16]; half d} per 256
// p0: ql [N][K/2]; p1: qh [N][K/4]; p2: scales [N][K/16] int8; p3: d [N][K/256] half.
// Unit u = (block b, half h, part p, j): ql bytes 16u..16u+15 hold quarter p (low nibbles) and
// quarter p+2 (high nibbles) of half h, elements 16j.. of each quarter (quarters are 32 apart).
struct FQ6_K {
    static constexpr int ROW_DIV[4] = {2, 4, 16, 128};  // plane p holds K / ROW_DIV[p] bytes per row (0: unused)
    static constexpr int NRUN = 2, RLEN = 16, RSTRIDE = 64;
    static constexpr bool HAS_OFFSET = false, NIBBLE = false;
    struct Raw { uint4 l, h; u32 sc; u32 d; };
    __device__ static int k0(int u) {
        return (u >> 3) * 256 + ((u >> 2) & 1) * 128 + ((u >> 1) & 1) * 32 + (u & 1) * 16;
    }
    __device__ static Raw load(const QW& w, int row, int u) {
        const int b = u >> 3, h = (u >> 2) & 1, p = (u >> 1) & 1, j = u & 1;
        const u8* sc = w.p2 + (size_t)row * (w.K >> 4) + b * 16 + h * 8 + j + 2 * p;
        return Raw{ld16(w.p0 + (size_t)row * (w.K >> 1) + (size_t)u * 16),
                   ld16(w.p1 + (size_t)row * (w.K >> 2) + (size_t)b * 64 + h * 32 + j * 16),
                   (u32)__ldg(sc) | ((u32)__ldg(sc + 4) << 8),
                   ld_u16(w.p3 + ((size_t)row * (w.K >> 8) + b) * 2)};
    }
    __device__ static void unpack(const Raw& r, int u, float* q, float* s, float* o) {
        const int p = (u >> 1) & 1;
        const float d = half_bits(r.d);
        s[0] = d * (float)(int)(signed char)(r.sc & 0xffu);
        s[1] = d * (float)(int)(signed char)(r.sc >> 8);
        const int sh0 = 2 * p, sh1 = 2 * p + 4;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            u32 x = byte_of(r.l, i), y = byte_of(r.h, i);
            q[i] = __uint_as_float(0x4B000000u | ((x & 15u) | (((y >> sh0) & 3u) << 4))) - (LUCE_MAGIC + 32.0f);
            q[i + 16] = __uint_as_float(0x4B000000u | ((x >> 4) | (((y >> sh1) & 3u) << 4))) - (LUCE_MAGIC + 32.0f);
        }
    }
};

// ------------------------------------------------------------------ NVFP4 (ggml): {u8 d[4] (UE4M3); u8 qs[32]} per 64
// p0: qs [N][K/2]; p2: scales [N][K/16] u8. Sub-block s (16 weights) = qs[8s..8s+7]: low nibble
// -> element i, high -> i+8. q uses ggml's doubled E2M1 values {0,1,2,3,4,6,8,12} (integers),
// so the scale is UE4M3/2. The per-tensor FP32 scale is the kernels' alpha.
__device__ __forceinline__ float ue4m3_half(u32 x) {
    if (x == 0u || x == 0x7Fu) return 0.0f;
    u32 e = (x >> 3) & 15u, m = x & 7u;
    float v = e == 0u ? (float)m * (1.0f / 512.0f) : __uint_as_float(((e + 120u) << 23) | (m << 20));
    return 0.5f * v;
}
__device__ __forceinline__ float e2m1x2(u32 n) {  // doubled E2M1 value of nibble n, exact
    u32 mag = __byte_perm(0x03020100u, 0x0C080604u, n & 7u) & 0xffu;
    float f = u2f_magic(mag);
    return (n & 8u) ? -f : f;
}

struct FNVFP4 {
    static constexpr int ROW_DIV[4] = {2, 0, 16, 0};  // plane p holds K / ROW_DIV[p] bytes per row (0: unused)
    static constexpr int NRUN = 2, RLEN = 16, RSTRIDE = 16;
    static constexpr bool HAS_OFFSET = false, NIBBLE = false;
    struct Raw { uint4 q; u32 sc; };
    __device__ static int k0(int u) { return u * 32; }
    __device__ static Raw load(const QW& w, int row, int u) {
        return Raw{ld16(w.p0 + (size_t)row * (w.K >> 1) + (size_t)u * 16),
                   ld_u16(w.p2 + (size_t)row * (w.K >> 4) + (size_t)u * 2)};
    }
    __device__ static void unpack(const Raw& r, int u, float* q, float* s, float* o) {
        s[0] = ue4m3_half(r.sc & 0xffu);
        s[1] = ue4m3_half(r.sc >> 8);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                u32 x = byte_of(r.q, 8 * h + i);
                q[16 * h + i] = e2m1x2(x & 15u);
                q[16 * h + 8 + i] = e2m1x2(x >> 4);
            }
        }
    }
};

// Before the previous kernel's grid is waited for (see luce_common.cuh): L2 prefetch of the bytes
// of weight rows [n0, n1) in every plane. Weights are written once at load, so reading them early
// is safe, and the GEMV's first loads then hit L2 instead of DRAM.
template <class F>
__device__ __forceinline__ void prefetch_rows(const QW& w, int n0, int n1, int tid, int nth) {
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        if (F::ROW_DIV[p] == 0) continue;
        const size_t rb = (size_t)(w.K / F::ROW_DIV[p]);
        const u8* base = p == 0 ? w.p0 : p == 1 ? w.p1 : p == 2 ? w.p2 : w.p3;
        prefetch_l2_range(base + n0 * rb, (n1 - n0) * rb, tid, nth);
    }
}

// load + unpack in one go (dequantization and the GEMM tile loader).
template <class F>
__device__ __forceinline__ void decode(const QW& w, int row, int u, float* q, float* s, float* o) {
    F::unpack(F::load(w, row, u), u, q, s, o);
}
