// Quantsmith CUDA kernels: shared numerics.
//
// Every kernel in this directory is compiled at run time by NVRTC from one
// program: common.cuh, then the other files in the order `host/src/gpu/kernels.rs`
// lists them. No CUDA header is included, so NVRTC needs no include path.
//
// Numerics follow comfy-kitchen v0.2.24's eager backend as PyTorch runs it on an
// x86 CPU, byte for byte (the CPU reference in host/src/formats is the oracle):
// - T(v): round-to-nearest-even of an f32 to the input dtype T (bf16, f16, f32);
// - E4M3 (fn): c10's fp8e4m3fn_from_fp32_value (RNE, subnormals, >= 480 -> NaN 0x7F);
// - E2M1: torchao's _f32_to_floatx_unpacked(ebits=2, mbits=1) (RNE, saturating,
//   sign bit kept, so -0 -> 0x8);
// - every division is IEEE (__fdiv_rn), or is replaced by a multiplication
//   whose result is checked to give the same code, with the division where it
//   might not (int8.cu, nvfp4.cu, qs_mx_exponent_bits; all in the self-test);
//   nothing is contracted into an FMA (the program is compiled with
//   --fmad=false and uses the _rn intrinsics), and denormals are kept (no
//   --ftz, no fast math);
// - the degenerate cases where comfy-kitchen would make NaN (zero or underflowing
//   scales) follow the CPU reference's explicit fallbacks, so no kernel depends
//   on how a platform signs or fills a NaN.
//
// Hardware conversions are used where they are bit-identical to the software
// ones for the values that reach them (checked exhaustively by the self-test
// kernel `qs_selftest_conversions`); the software versions stay as reference and
// as the fallback for older architectures.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define QS_DEV static __device__ __forceinline__

// Input element types (host/src/gpu/kernels.rs: DtypeCode).
#define QS_F32 0
#define QS_F16 1
#define QS_BF16 2

QS_DEV float qs_f(u32 b) { return __uint_as_float(b); }
QS_DEV u32 qs_u(float f) { return __float_as_uint(f); }

// torch.clamp semantics: NaN propagates.
QS_DEV float qs_clamp(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// ---------------------------------------------------------------------------
// bf16 / f16 <-> f32
// ---------------------------------------------------------------------------

QS_DEV float qs_bf16_to_f32(u16 h) { return qs_f(((u32)h) << 16); }

// c10::detail::round_to_nearest_even.
QS_DEV u16 qs_f32_to_bf16_sw(float f) {
    u32 u = qs_u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

QS_DEV float qs_f16_to_f32_sw(u16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16;
    u32 e = ((u32)h >> 10) & 0x1fu;
    u32 m = (u32)h & 0x3ffu;
    if (e == 0x1fu) return qs_f(sign | 0x7f800000u | (m << 13));
    if (e != 0) return qs_f(sign | ((e + 112u) << 23) | (m << 13));
    if (m == 0) return qs_f(sign);
    // subnormal: m * 2^-24, exact
    return qs_f(sign | qs_u(__fmul_rn((float)m, 5.9604644775390625e-8f)));
}

// f16 -> f32 is exact; the hardware conversion equals qs_f16_to_f32_sw (self-test).
QS_DEV float qs_f16_to_f32(u16 h) {
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    return qs_f16_to_f32_sw(h);
#endif
}

// IEEE binary16 RNE with overflow to infinity (c10's fp16_ieee_from_fp32_value).
QS_DEV u16 qs_f32_to_f16_sw(float f) {
    u32 x = qs_u(f);
    u32 sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return (u16)(sign | 0x7e00u);   // NaN
    if (x >= 0x477ff000u) return (u16)(sign | 0x7c00u);  // >= 65520: infinity
    if (x >= 0x38800000u) {                              // normal (>= 2^-14)
        u32 odd = (x >> 13) & 1u;
        x += 0xc8000fffu + odd;                          // rebias by -112, round
        return (u16)(sign | (x >> 13));
    }
    // subnormal or zero: align the 2^-24 grid with 0.5's last mantissa bit
    float t = __fadd_rn(qs_f(x), 0.5f);
    return (u16)(sign | (qs_u(t) - 0x3f000000u));
}

QS_DEV u16 qs_f32_to_bf16(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if (f != f) return qs_f32_to_bf16_sw(f);
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
#else
    return qs_f32_to_bf16_sw(f);
#endif
}

QS_DEV u16 qs_f32_to_f16(float f) {
#if defined(__CUDA_ARCH__)
    if (f != f) return qs_f32_to_f16_sw(f);
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
#else
    return qs_f32_to_f16_sw(f);
#endif
}

// T(v): v rounded to the input dtype, returned as f32.
template <int DT>
QS_DEV float qs_round_t(float v) {
    if constexpr (DT == QS_BF16) {
        return qs_bf16_to_f32(qs_f32_to_bf16(v));
    } else if constexpr (DT == QS_F16) {
        return qs_f16_to_f32(qs_f32_to_f16(v));
    } else {
        return v;
    }
}

// As qs_round_t for values known to be finite (every quantize path: finite
// inputs, finite non-zero scales): the hardware conversion alone, which the
// self-test checks against the software rounding for every non-NaN f32.
template <int DT>
QS_DEV float qs_round_t_finite(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (DT == QS_BF16) {
        u16 r;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
        return qs_bf16_to_f32(r);
    } else if constexpr (DT == QS_F16) {
        u16 r;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(v));
        return qs_f16_to_f32(r);
    } else {
        return v;
    }
#else
    return qs_round_t<DT>(v);
#endif
}

// ---------------------------------------------------------------------------
// FP8 E4M3 (fn)
// ---------------------------------------------------------------------------

// c10::detail::fp8e4m3fn_from_fp32_value.
QS_DEV u8 qs_f32_to_e4m3_sw(float f) {
    u32 fb = qs_u(f);
    u32 sign = fb & 0x80000000u;
    fb ^= sign;
    u8 r;
    if (fb >= (1087u << 20)) {  // >= 480 or NaN
        r = 0x7f;
    } else if (fb < (121u << 23)) {  // < 2^-6: subnormal grid 2^-9
        float t = __fadd_rn(qs_f(fb), qs_f(141u << 23));
        r = (u8)(qs_u(t) - (141u << 23));
    } else {
        u32 odd = (fb >> 20) & 1u;
        fb += ((u32)(7 - 127) << 23) + 0x7ffffu;
        fb += odd;
        r = (u8)(fb >> 20);
    }
    return (u8)(r | (u8)(sign >> 24));
}

// Two values at once; `lo` goes to the low byte. For |v| <= 448 and NaN this
// equals qs_f32_to_e4m3_sw on both halves (self-test).
QS_DEV u16 qs_f32x2_to_e4m3(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    if (lo != lo || hi != hi) {
        return (u16)qs_f32_to_e4m3_sw(lo) | ((u16)qs_f32_to_e4m3_sw(hi) << 8);
    }
    u16 r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return (u16)qs_f32_to_e4m3_sw(lo) | ((u16)qs_f32_to_e4m3_sw(hi) << 8);
#endif
}

// As qs_f32x2_to_e4m3 for values known not to be NaN (every quantize path:
// finite inputs, finite non-zero scales, clamped products), without the check.
QS_DEV u16 qs_f32x2_to_e4m3_finite(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    u16 r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return (u16)qs_f32_to_e4m3_sw(lo) | ((u16)qs_f32_to_e4m3_sw(hi) << 8);
#endif
}

QS_DEV float qs_e4m3_to_f32(u8 b) {
    u32 sign = ((u32)b & 0x80u) << 24;
    u32 e = ((u32)b >> 3) & 0xfu;
    u32 m = (u32)b & 0x7u;
    if (e == 0xfu && m == 0x7u) return qs_f(sign | 0x7fc00000u);  // NaN
    if (e != 0) return qs_f(sign | ((e + 120u) << 23) | (m << 20));
    // subnormal (or zero): m * 2^-9
    return qs_f(sign | qs_u(__fmul_rn((float)m, 0.001953125f)));
}

// ---------------------------------------------------------------------------
// FP4 E2M1 (torchao _f32_to_floatx_unpacked(x, 2, 1))
// ---------------------------------------------------------------------------

QS_DEV u8 qs_f32_to_e2m1(float f) {
    u32 x = qs_u(f);
    u32 sign = x & 0x80000000u;
    x ^= sign;
    float xa = qs_f(x);
    u8 r;
    if (xa >= 6.0f) {
        r = 0x7;  // saturate
    } else if (xa < 1.0f) {
        // denormal grid 0.5: add 2^22, whose last mantissa bit is 0.5
        float t = __fadd_rn(xa, qs_f(149u << 23));
        r = (u8)(qs_u(t) - (149u << 23));
    } else {
        // normal path; NaN lands here as it does in torchao (comparisons false)
        u32 odd = (x >> 22) & 1u;
        x += ((u32)(1 - 127) << 23) + 0x1fffffu;
        x += odd;
        r = (u8)(x >> 22);
    }
    return (u8)((r | (u8)((sign >> 28) & 0x8u)) & 0xfu);
}

// The same code without branches, for values that are not NaN: rounds |v|
// (clamped to 6) to nearest even on E2M1's grid with one magic addition (step
// 0.5 below 2, 1 below 4, 2 above), then reads the code off the result's bits.
// Equal to qs_f32_to_e2m1 for every non-NaN f32 (self-test).
QS_DEV u8 qs_f32_to_e2m1_fast(float f) {
    const u32 sign = (qs_u(f) >> 28) & 0x8u;
    float a = qs_f(qs_u(f) & 0x7fffffffu);
    a = a > 6.0f ? 6.0f : a;
    const float m = a < 2.0f ? 4194304.0f : (a < 4.0f ? 8388608.0f : 16777216.0f);
    const float r = __fsub_rn(__fadd_rn(a, m), m);
    const u32 b = qs_u(r);
    const u32 mag = r >= 1.0f ? ((((b >> 23) - 126u) << 1) | ((b >> 22) & 1u)) : (r == 0.5f ? 1u : 0u);
    return (u8)(sign | mag);
}

// The E2M1 values by code (sign in bit 3).
QS_DEV float qs_e2m1_to_f32(u32 code) {
    const u32 mag = code & 7u;
    // 0, 0.5, 1, 1.5, 2, 3, 4, 6 as f32 bits
    u32 bits = mag == 0 ? 0u
             : mag == 1 ? 0x3f000000u
             : mag == 2 ? 0x3f800000u
             : mag == 3 ? 0x3fc00000u
             : mag == 4 ? 0x40000000u
             : mag == 5 ? 0x40400000u
             : mag == 6 ? 0x40800000u
                        : 0x40c00000u;
    return qs_f(bits | ((code & 8u) << 28));
}

// ---------------------------------------------------------------------------
// E8M0 (MXFP8 block scales)
// ---------------------------------------------------------------------------

// ceil(log2(y)) for a positive finite f32, exactly.
QS_DEV int qs_ceil_log2(float y) {
    u32 b = qs_u(y);
    int ex = (int)((b >> 23) & 0xffu);
    u32 m = b & 0x7fffffu;
    if (ex == 0) return (32 - __clz((int)(m - 1u))) - 149;  // subnormal m * 2^-149, m >= 1
    return ex - 127 + (m != 0 ? 1 : 0);
}

// E8M0 exponent for a block whose max |x| is bmax (MXFP8).
QS_DEV u32 qs_mx_exponent(float bmax) {
    float y = __fdiv_rn(bmax, 448.0f);
    const float min_scale = 5.877471754111438e-39f;  // 2^-127
    y = y < min_scale ? min_scale : y;
    int e = qs_ceil_log2(y) + 127;
    e = e < 0 ? 0 : (e > 254 ? 254 : e);
    return (u32)e;
}

// The same exponent read off the bits of bmax (positive, finite), with no
// division: ceil(log2(RN(bmax / 448))) <= k exactly when bmax <= 448 * 2^k, as
// 448 * 2^k is an f32 and the next f32 above it already makes the quotient
// round past 2^k. For bmax = m * 2^(E-127), m in [1, 2), that is
// k = E - 135 + (m > 1.75). The exception is k = -127, where the quotient is
// subnormal and its grid twice as coarse relative to 2^k: there the one f32
// between 448 * 2^-127 and 448 * (2^-127 + 2^-150), 0x04600001, still rounds
// to 2^-127 (e = 0). Equal to qs_mx_exponent for every positive finite f32
// (self-test).
QS_DEV u32 qs_mx_exponent_bits(u32 bmax_bits) {
    if (bmax_bits == 0x04600001u) return 0;
    const int e = (int)(bmax_bits >> 23) - 8 + ((bmax_bits & 0x7fffffu) > 0x600000u ? 1 : 0);
    return (u32)(e < 0 ? 0 : (e > 254 ? 254 : e));
}

QS_DEV float qs_e8m0_to_f32(u32 e) { return e == 0 ? 0.0f : qs_f(e << 23); }

// ---------------------------------------------------------------------------
// Maxima of |x| (amax passes, block maxima, the non-finite check)
// ---------------------------------------------------------------------------

// |v| as ordered bits (non-negative floats order like their bit patterns;
// NaN and infinity sort above every finite value).
QS_DEV u32 qs_abs_bits(float v) { return qs_u(v) & 0x7fffffffu; }

// max(m, |v[0]|, ..., |v[N-1]|) as ordered bits.
template <int N>
QS_DEV u32 qs_max_abs(const float* v, u32 m) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
        const u32 a = qs_abs_bits(v[k]);
        m = a > m ? a : m;
    }
    return m;
}

// Warp-wide reduction with `op(acc, other)` over an xor butterfly; every lane gets the result.
template <typename T, typename Op>
QS_DEV T qs_warp_reduce(T v, Op op) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide reduction (whole warps); every thread gets the result. `sh` holds
// >= 32 values; `identity` fills the lanes past the last warp.
template <typename T, typename Op>
QS_DEV T qs_block_reduce(T v, T* sh, T identity, Op op) {
    v = qs_warp_reduce(v, op);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    return qs_warp_reduce(lane < nw ? sh[lane] : identity, op);
}

struct QsMaxU32 {
    __device__ __forceinline__ u32 operator()(u32 v, u32 w) const { return w > v ? w : v; }
};
struct QsSumF32 {
    __device__ __forceinline__ float operator()(float v, float w) const { return v + w; }
};
struct QsMaxF32 {
    __device__ __forceinline__ float operator()(float v, float w) const { return fmaxf(v, w); }
};

QS_DEV u32 qs_warp_max(u32 v) { return qs_warp_reduce(v, QsMaxU32{}); }

// Block-wide max; every thread gets the result. `sh` holds >= 32 words.
QS_DEV u32 qs_block_max(u32 v, u32* sh) { return qs_block_reduce(v, sh, 0u, QsMaxU32{}); }

// max |x| bits over `len` consecutive bf16 values (0 for none).
QS_DEV u32 qs_bf16_amax_bits(const u16* __restrict__ x, int len) {
    u32 m = 0;
    for (int i = 0; i < len; ++i) m = QsMaxU32{}(m, qs_abs_bits(qs_bf16_to_f32(x[i])));
    return m;
}

// Folds every thread's maximum into *out (atomicMax; *out starts at 0): one
// atomic per block. All threads of the block must call it.
QS_DEV void qs_block_fold_max(u32 m, u32* __restrict__ out) {
    __shared__ u32 sh[32];
    m = qs_block_max(m, sh);
    if (threadIdx.x == 0 && m != 0) atomicMax(out, m);
}

// As qs_block_fold_max, one atomic per warp, no barrier (all 32 lanes call it).
QS_DEV void qs_warp_fold_max(u32 m, u32* __restrict__ out) {
    m = qs_warp_max(m);
    if ((threadIdx.x & 31) == 0 && m != 0) atomicMax(out, m);
}

// ---------------------------------------------------------------------------
// Layout helpers
// ---------------------------------------------------------------------------

// Offset of scale (r, c) in comfy-kitchen's to_blocked layout (cuBLAS 128x4 tiles
// of 32x16 bytes): tile (r/128, c/4), then r%32 selects a 16-byte row, (r%128)/32
// a 4-byte group in it and c%4 the byte. `ncb` = padded scale columns / 4.
QS_DEV i64 qs_swizzle(i64 r, i64 c, i64 ncb) {
    return ((r >> 7) * ncb + (c >> 2)) * 512 + (r & 31) * 16 + ((r >> 5) & 3) * 4 + (c & 3);
}

// Element i of an input array of dtype DT, as f32 (exact).
template <int DT>
QS_DEV float qs_load1(const u8* __restrict__ p, i64 i) {
    if constexpr (DT == QS_F32) {
        return reinterpret_cast<const float*>(p)[i];
    } else if constexpr (DT == QS_BF16) {
        return qs_bf16_to_f32(reinterpret_cast<const u16*>(p)[i]);
    } else {
        return qs_f16_to_f32(reinterpret_cast<const u16*>(p)[i]);
    }
}

// Eight raw 16-byte-aligned words, to be decoded later (lets a thread issue
// several loads before using any).
template <int DT>
struct QsRaw8 {
    uint4 a;
    uint4 b;  // used by f32 only
};

template <int DT>
QS_DEV void qs_fetch8(const u8* __restrict__ p, i64 i, QsRaw8<DT>& r) {
    if constexpr (DT == QS_F32) {
        const uint4* q = reinterpret_cast<const uint4*>(p + i * 4);
        r.a = q[0];
        r.b = q[1];
    } else {
        r.a = *reinterpret_cast<const uint4*>(p + i * 2);
    }
}

template <int DT>
QS_DEV void qs_decode8(const QsRaw8<DT>& r, float v[8]) {
    if constexpr (DT == QS_F32) {
        v[0] = qs_f(r.a.x); v[1] = qs_f(r.a.y); v[2] = qs_f(r.a.z); v[3] = qs_f(r.a.w);
        v[4] = qs_f(r.b.x); v[5] = qs_f(r.b.y); v[6] = qs_f(r.b.z); v[7] = qs_f(r.b.w);
    } else {
        const u32 w[4] = {r.a.x, r.a.y, r.a.z, r.a.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const u16 lo = (u16)(w[k] & 0xffffu);
            const u16 hi = (u16)(w[k] >> 16);
            if constexpr (DT == QS_BF16) {
                v[2 * k] = qs_bf16_to_f32(lo);
                v[2 * k + 1] = qs_bf16_to_f32(hi);
            } else {
                v[2 * k] = qs_f16_to_f32(lo);
                v[2 * k + 1] = qs_f16_to_f32(hi);
            }
        }
    }
}

// Eight elements starting at element i; i*sizeof(T) must be 16-byte aligned.
template <int DT>
QS_DEV void qs_load8(const u8* __restrict__ p, i64 i, float v[8]) {
    QsRaw8<DT> r;
    qs_fetch8<DT>(p, i, r);
    qs_decode8<DT>(r, v);
}

QS_DEV u64 qs_pack8(const u8 b[8]) {
    u64 r = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) r |= (u64)b[k] << (8 * k);
    return r;
}

// ---------------------------------------------------------------------------
// Flat streaming (per-tensor amax, FP8, INT8 per tensor)
// ---------------------------------------------------------------------------

// Threads per block of every 1-D launch and of the block-format kernels.
#define QS_THREADS 256
// Chunks of 8 elements each thread has in flight per step of a flat walk.
#ifndef QS_FLAT_U
#define QS_FLAT_U 4
#endif

// Walks n elements in chunks of 8 over a grid sized to what the device keeps
// resident (host: CudaBackend::flat_grid): a step of a block covers a tile of
// QS_FLAT_U x QS_THREADS chunks (thread t: chunks t, t + QS_THREADS, ...), all
// loads of a step issued before the first use; tiles are dealt to blocks in
// turn. `reverse` walks the tiles from the end: after an amax pass (or the
// upload) the last tiles read are the ones still in L2.
// full(c, v) gets each whole chunk c (elements 8c..8c+7); tail(i) each element
// of the partial chunk at the end.
template <int DT, typename Full, typename Tail>
QS_DEV void qs_flat_walk(const u8* __restrict__ x, i64 n, bool reverse, Full full, Tail tail) {
    const i64 nfull = n >> 3;
    const i64 tile = (i64)QS_FLAT_U * QS_THREADS;
    const i64 ntiles = (((n + 7) >> 3) + tile - 1) / tile;
    for (i64 k = blockIdx.x; k < ntiles; k += gridDim.x) {
        const i64 t = reverse ? ntiles - 1 - k : k;
        const i64 c0 = t * tile + threadIdx.x;
        if ((t + 1) * tile <= nfull) {
            QsRaw8<DT> raw[QS_FLAT_U];
#pragma unroll
            for (int u = 0; u < QS_FLAT_U; ++u) qs_fetch8<DT>(x, (c0 + u * QS_THREADS) << 3, raw[u]);
#pragma unroll
            for (int u = 0; u < QS_FLAT_U; ++u) {
                float v[8];
                qs_decode8<DT>(raw[u], v);
                full(c0 + u * QS_THREADS, v);
            }
        } else {
            for (int u = 0; u < QS_FLAT_U; ++u) {
                const i64 c = c0 + u * QS_THREADS;
                if (c < nfull) {
                    float v[8];
                    qs_load8<DT>(x, c << 3, v);
                    full(c, v);
                } else if (c == nfull) {
                    for (i64 i = c << 3; i < n; ++i) tail(i);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Block formats (NVFP4: 16 elements a scale, MXFP8: 32)
// ---------------------------------------------------------------------------

// The geometry of a block-format tensor: data zero-padded to
// [rows_p, nb * BLK] (rows_p = roundup(rows, BLK)), scales in the swizzled
// layout of [rows_s, nbs] (rows_s = roundup(rows_p, 128), nbs = roundup(nb, 4)).
struct QsBlocks {
    i64 rows, cols;
    i64 rows_p, rows_s;
    i64 nb, nbs;
    bool vec;  // rows start 16-byte aligned: whole blocks load as vectors
};

template <int BLK>
QS_DEV QsBlocks qs_blocks(i64 rows, i64 cols) {
    QsBlocks g;
    g.rows = rows;
    g.cols = cols;
    g.rows_p = (rows + BLK - 1) / BLK * BLK;
    g.rows_s = (g.rows_p + 127) & ~(i64)127;
    g.nb = (cols + BLK - 1) / BLK;
    g.nbs = (g.nb + 3) & ~(i64)3;
    g.vec = (cols & 7) == 0;
    return g;
}

// Rows of one block-format step per warp (the grid's y covers rows_s / (8 U)
// row groups, x covers nbs / 32 block columns).
// Thread (lane, warp) of block (bx, by) owns scale entry (r, cb) with
// cb = 32 bx + lane and r = RG g + warp + 8 u (u < U, RG = 8 U rows a row
// group g), i.e. the whole swizzled scale matrix, padding included, so no
// memset is needed; entries inside the data ([rows_p, nb]) also own the
// BLK elements x[r, cb BLK ..] (zero where padded).
// f(r, cb, data, v) gets each entry; v holds the BLK values where `data`.
// All loads of a step are issued before the first use. Row groups run from
// the end (after the upload's amax passes, the last rows are in L2).
template <int DT, int BLK, int U, typename F>
QS_DEV void qs_block_walk(const u8* __restrict__ x, const QsBlocks& g, F f) {
    constexpr int CH = BLK / 8;  // chunks of 8 per block
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const i64 cb = (i64)blockIdx.x * 32 + lane;
    const i64 ngroups = g.rows_s / (8 * U);
    const bool col_live = cb < g.nbs;
    const bool col_data = cb < g.nb;
    const i64 c0 = cb * BLK;
    const bool col_fast = col_data && g.vec && c0 + BLK <= g.cols;
    for (i64 k = blockIdx.y; k < ngroups; k += gridDim.y) {
        const i64 r0 = (ngroups - 1 - k) * (8 * U) + warp;
        QsRaw8<DT> raw[U][CH];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const i64 r = r0 + 8 * u;
            if (col_fast && r < g.rows) {
#pragma unroll
                for (int j = 0; j < CH; ++j) qs_fetch8<DT>(x, r * g.cols + c0 + 8 * j, raw[u][j]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const i64 r = r0 + 8 * u;
            if (!col_live) continue;
            const bool data = col_data && r < g.rows_p;
            float v[BLK];
            if (col_fast && r < g.rows) {
#pragma unroll
                for (int j = 0; j < CH; ++j) qs_decode8<DT>(raw[u][j], v + 8 * j);
            } else {
#pragma unroll
                for (int i = 0; i < BLK; ++i) {
                    v[i] = (data && r < g.rows && c0 + i < g.cols) ? qs_load1<DT>(x, r * g.cols + c0 + i) : 0.0f;
                }
            }
            f(r, cb, data, v);
        }
    }
}
