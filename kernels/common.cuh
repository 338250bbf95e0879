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
// - every division is IEEE (__fdiv_rn), nothing is contracted into an FMA
//   (the program is compiled with --fmad=false and uses the _rn intrinsics), and
//   denormals are kept (no --ftz, no fast math);
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

QS_DEV float qs_e8m0_to_f32(u32 e) { return e == 0 ? 0.0f : qs_f(e << 23); }

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

// Eight elements starting at element i; i*sizeof(T) must be 16-byte aligned.
template <int DT>
QS_DEV void qs_load8(const u8* __restrict__ p, i64 i, float v[8]) {
    if constexpr (DT == QS_F32) {
        const uint4* q = reinterpret_cast<const uint4*>(p + i * 4);
        uint4 a = q[0];
        uint4 b = q[1];
        v[0] = qs_f(a.x); v[1] = qs_f(a.y); v[2] = qs_f(a.z); v[3] = qs_f(a.w);
        v[4] = qs_f(b.x); v[5] = qs_f(b.y); v[6] = qs_f(b.z); v[7] = qs_f(b.w);
    } else {
        uint4 a = *reinterpret_cast<const uint4*>(p + i * 2);
        u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            u16 lo = (u16)(w[k] & 0xffffu);
            u16 hi = (u16)(w[k] >> 16);
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
        u32 w[4] = {r.a.x, r.a.y, r.a.z, r.a.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            u16 lo = (u16)(w[k] & 0xffffu);
            u16 hi = (u16)(w[k] >> 16);
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

// |v| as ordered bits (non-negative floats order like their bit patterns;
// NaN and infinity sort above every finite value).
QS_DEV u32 qs_abs_bits(float v) { return qs_u(v) & 0x7fffffffu; }

QS_DEV u32 qs_warp_max(u32 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        u32 w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

// Block-wide max; every thread gets the result. `sh` holds >= 32 words.
QS_DEV u32 qs_block_max(u32 v, u32* sh) {
    v = qs_warp_max(v);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    u32 r = lane < nw ? sh[lane] : 0u;
    r = qs_warp_max(r);
    return r;
}
