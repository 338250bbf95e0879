// NVFP4: E2M1 codes in blocks of 16 along the rows, an E4M3 scale per block
// (swizzled into cuBLAS's 128x4 tile layout) and an f32 global scale, as the
// CPU reference (host/src/formats/nvfp4.rs) defines it after comfy-kitchen's
// quantize_nvfp4(pad_16x=True):
//   s2    = T(amax / 2688)                 `weight_scale_2` (fallbacks: see qs_nvfp4_global_scale)
//   bs    = e4m3(min((bmax / 6) / s2, 448)) per 16-block, `weight_scale` (swizzled)
//   total = s2 * f32(bs)
//   code  = total == 0 ? 0 : e2m1(clamp(x / total, -6, 6)), element 2i in the high nibble
// over the input zero-padded to [roundup(rows, 16), roundup(cols, 16)].
//
// One thread a 16-block (qs_block_walk). Launch after qs_amax_tensor_<T>
// (over the tensor, or over each upload piece) has left its amax in *amax_bits.
//
// The per-element division x / total is replaced by x * y with y = RN(1 / total)
// (one rounded reciprocal a block): |x y - x / total| <= 2^-23 |x / total|, so
// x y lies within 5 f32 steps of the correctly rounded quotient. E2M1 rounds
// that quotient at 0.25, 0.75, 1.25, 1.75, 2.5, 3.5 and 5 (ties to even), which
// qs_e2m1_code_recip reads off the bits of a single value (see there); where
// x y lies within 8 steps of one of them, the block's codes are computed
// again with the IEEE division. Elsewhere both quotients give the same code.
// The self-test compares the two for every finite f32 x over a set of divisors.

#ifndef QS_NV_U
#define QS_NV_U 2  // 16-blocks a thread has in flight per step
#endif


// Global scale from the tensor's amax (shared by every block), with the CPU
// reference's fallbacks: where T rounds amax / 2688 to 0 (all-zero tensors, f16
// tensors with amax below about 8e-5) the f32 quotient, and 1.0 where that is 0.
template <int DT>
QS_DEV float qs_nvfp4_global_scale(float amax) {
    float s2 = qs_round_t<DT>(__fdiv_rn(amax, 2688.0f));
    if (s2 != 0.0f) return s2;
    s2 = __fdiv_rn(amax, 2688.0f);
    return s2 != 0.0f ? s2 : 1.0f;
}

// Block scale code for a block maximum (s2 > 0, so no NaN arises).
QS_DEV u8 qs_nvfp4_block_code(float bmax, float s2) {
    float bs = __fdiv_rn(__fdiv_rn(bmax, 6.0f), s2);
    bs = bs > 448.0f ? 448.0f : bs;
    return (u8)(qs_f32x2_to_e4m3_finite(bs, 0.0f) & 0xff);
}

// E2M1 code of x / total (sign in bit 3) from y = RN(1 / total); sets `near`
// where it may differ from e2m1(clamp(RN(x / total), -6, 6)).
// With a = min(|x| y, 6): for a >= 1, rounding a to one mantissa bit is
// E2M1's rounding, so the code is the rounded exponent and mantissa bit read
// as an integer; its midpoints are the bit patterns b whose low 22 bits are
// 0x200000. For a < 1 E2M1 has the grid 0, 0.5, 1, which is that of a + 1 in
// [1, 2] (midpoints 1.25, 1.75, the same tie directions), so a + 1 takes the
// same path (its own rounding moves it by at most 2^-24).
// t = b + 0x200008 (minus the code's exponent offset) rounds half up, and
// a bit early: its result differs from rounding to even only for low 22 bits
// in [0x1ffff8, 0x200000], inside the window [0x1ffff8, 0x200008) that `near`
// flags (t's low 22 bits below 16), 8 steps below and 7 above each midpoint.
QS_DEV u32 qs_e2m1_code_recip(float x, float y, bool& near) {
    float a = __fmul_rn(fabsf(x), y);
    a = a < 6.0f ? a : 6.0f;
    const bool small = a < 1.0f;
    const u32 t = qs_u(small ? __fadd_rn(a, 1.0f) : a) + (small ? 0x200008u - (254u << 22) : 0x200008u - (252u << 22));
    near |= (t & 0x3ffff0u) == 0;
    return (t >> 22) | ((qs_u(x) >> 28) & 8u);
}

// f32 value of an E4M3 code other than NaN (0x7f, 0xff): the hardware
// conversion to f16 is exact for all of them (self-test), as is f16 -> f32.
QS_DEV float qs_e4m3_to_f32_finite(u8 b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    u32 h2;
    const u16 in = b;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(in));
    return qs_f16_to_f32((u16)(h2 & 0xffffu));
#else
    return qs_e4m3_to_f32(b);
#endif
}

QS_DEV u32 qs_e2m1_code_div(float x, float total) {
    return qs_f32_to_e2m1_fast(qs_clamp(__fdiv_rn(x, total), -6.0f, 6.0f));
}

// N/2 packed bytes (N codes, element 2i in the high nibble of byte i) for N
// elements of a block with scale `total`.
template <int N>
QS_DEV u64 qs_nvfp4_pack(const float* v, float total) {
    if (total == 0.0f) return 0;
    u64 r = 0;
    // y is a normal f32 for every total the formula makes (>= 2^-126 unless amax is tiny)
    if (total >= 1.1754943508222875e-38f && total <= 8.507059173023462e37f) {
        const float y = __frcp_rn(total);
        bool near = false;
#pragma unroll
        for (int k = 0; k < N / 2; ++k) {
            const u32 byte = (qs_e2m1_code_recip(v[2 * k], y, near) << 4) | qs_e2m1_code_recip(v[2 * k + 1], y, near);
            r |= (u64)byte << (8 * k);
        }
        if (!near) return r;
        r = 0;
    }
#pragma unroll
    for (int k = 0; k < N / 2; ++k) {
        const u32 byte = (qs_e2m1_code_div(v[2 * k], total) << 4) | qs_e2m1_code_div(v[2 * k + 1], total);
        r |= (u64)byte << (8 * k);
    }
    return r;
}

template <int DT>
QS_DEV void qs_nvfp4_quant(const u8* __restrict__ x, i64 rows, i64 cols, const u32* __restrict__ amax_bits,
                           u8* __restrict__ q, u8* __restrict__ scales, float* __restrict__ s2_out) {
    const QsBlocks g = qs_blocks<16>(rows, cols);
    // s2 is worked out at the first block, once its loads are in flight (not
    // before them, behind the read of the amax word); every thread has one.
    float s2 = 0.0f;
    qs_block_walk<DT, 16, QS_NV_U>(x, g, [&](i64 r, i64 cb, bool data, const float v[16]) {
        if (s2 == 0.0f) {
            s2 = qs_nvfp4_global_scale<DT>(qs_f(*amax_bits));
            if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *s2_out = s2;
        }
        u8 code = 0;
        if (data) {
            // finite inputs: the float max of |x| is the max of their bits
            // (a non-finite input only makes bytes the host discards)
            float bmax = 0.0f;
#pragma unroll
            for (int i = 0; i < 16; ++i) bmax = fmaxf(bmax, fabsf(v[i]));
            code = qs_nvfp4_block_code(bmax, s2);
            const float total = __fmul_rn(s2, qs_e4m3_to_f32_finite(code));
            reinterpret_cast<u64*>(q + r * g.nb * 8)[cb] = qs_nvfp4_pack<16>(v, total);
        }
        scales[qs_swizzle(r, cb, g.nbs >> 2)] = code;
    });
}

// Dequantization to f32 [rows, cols] (the unpadded part):
// out = e2m1(code) * (s2 * f32(bs)).
QS_DEV void qs_nvfp4_dequant_impl(const u8* __restrict__ q, const u8* __restrict__ scales, const float* __restrict__ s2p,
                                  i64 rows, i64 cols, float* __restrict__ out) {
    const float s2 = *s2p;
    const i64 cols_p = (cols + 15) & ~(i64)15;
    const i64 ncb = (((cols_p >> 4) + 3) >> 2);
    const i64 n = rows * cols;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / cols;
        const i64 c = i - r * cols;
        const u8 byte = q[r * (cols_p >> 1) + (c >> 1)];
        const u32 code = (c & 1) ? (byte & 0xfu) : (byte >> 4);
        const float bs = qs_e4m3_to_f32(scales[qs_swizzle(r, c >> 4, ncb)]);
        out[i] = __fmul_rn(qs_e2m1_to_f32(code), __fmul_rn(s2, bs));
    }
}

// Self-test: for every finite f32 x and each divisor below, the reciprocal
// path's code equals the division's wherever it does not ask for the division
// itself; and qs_e4m3_to_f32_finite equals qs_e4m3_to_f32 for every non-NaN
// code (x = the code). *count: mismatching x; *first: the smallest such x bits.
__constant__ float qs_nvfp4_test_divisors[32] = {
    1.0f,           0.5f,          0.001953125f,   448.0f,         0.75f,          1.25f,          3.0f,
    6.0f,           1.9999999f,    1.0000001f,     1.3333334f,     0.1f,           7.4505806e-09f, 1.1754943508222875e-38f,
    1.7632415e-38f, 8.5e37f,       1.6212463e-06f, 2.1e-05f,       123.456f,       3.7252903e-04f, 5.9604645e-08f,
    4.1656494e-03f, 33000.0f,      1e10f,          1e-10f,         17.0f,          8.7890625e-03f, 2.9802322e-08f,
    2.7939677e-09f, 0.33333334f,   0.6666667f,     0.99999994f,
};

extern "C" __global__ void __launch_bounds__(256) qs_selftest_nvfp4_recip(u32* count, u32* first) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (1ull << 32); i += stride) {
        const float x = qs_f((u32)i);
        if (!qs_isfinite(x)) continue;
        bool bad = false;
#pragma unroll 1
        for (int k = 0; k < 32; ++k) {
            const float t = qs_nvfp4_test_divisors[k];
            bool near = false;
            const u32 fast = qs_e2m1_code_recip(x, __frcp_rn(t), near);
            bad |= !near && fast != qs_e2m1_code_div(x, t);
        }
        if (i < 256 && (i & 0x7f) != 0x7f) bad |= qs_u(qs_e4m3_to_f32_finite((u8)i)) != qs_u(qs_e4m3_to_f32((u8)i));
        if (bad) {
            atomicAdd(count, 1u);
            atomicMin(first, (u32)i);
        }
    }
}

#define QS_NVFP4_INST(SUF, DT)                                                                            \
    extern "C" __global__ void __launch_bounds__(QS_THREADS) qs_nvfp4_quant_##SUF(                       \
        const u8* x, i64 rows, i64 cols, const u32* amax_bits, u8* q, u8* scales, float* s2_out) {         \
        qs_nvfp4_quant<DT>(x, rows, cols, amax_bits, q, scales, s2_out);                                   \
    }

QS_NVFP4_INST(f32, QS_F32)
QS_NVFP4_INST(f16, QS_F16)
QS_NVFP4_INST(bf16, QS_BF16)

extern "C" __global__ void __launch_bounds__(256)
    qs_nvfp4_dequant(const u8* q, const u8* scales, const float* s2, i64 rows, i64 cols, float* out) {
    qs_nvfp4_dequant_impl(q, scales, s2, rows, cols, out);
}
