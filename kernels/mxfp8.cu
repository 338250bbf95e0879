// MXFP8: E4M3 data in blocks of 32 along the rows with an E8M0 (power of two)
// scale per block, swizzled into cuBLAS's 128x4 tile layout, as the CPU
// reference (host/src/formats/mxfp8.rs) defines it after comfy-kitchen's
// quantize_mxfp8(pad_32x=True):
//   e     = clamp(ceil(log2(max(bmax / 448, 2^-127))) + 127, 0, 254)   (exact, from bits)
//   scale = 2^(e - 127), 0 for e == 0
//   data  = e4m3(clamp(x / scale, -448, 448)); a block with bmax == 0 gets e = 0 and zero data;
//           a nonzero block with e == 0 divides by zero: +-448, and 0xFF (NaN) for its zeros
// over the input zero-padded to [roundup(rows, 32), roundup(cols, 32)].
//
// One thread a 32-block (qs_block_walk), one read of the input. No global
// amax is needed; the block maxima are folded into *amax_all for the host's
// non-finite check.

#ifndef QS_MX_U
#define QS_MX_U 2  // 32-blocks a thread has in flight per step
#endif

// The 32 codes of a block with maximum bits `m` and exponent `e`, 4 to a word.
QS_DEV void qs_mxfp8_codes(const float v[32], u32 m, u32 e, u32 out[8]) {
    if (m == 0) {
#pragma unroll
        for (int w = 0; w < 8; ++w) out[w] = 0;
    } else if (e == 0) {
        // x / 0: +-448 for nonzero x; 0/0 is written 0xFF, as the CPU reference
        // does (x86's default NaN has the sign bit set)
#pragma unroll
        for (int w = 0; w < 8; ++w) {
            u32 word = 0;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float x = v[4 * w + k];
                const u32 c = x == 0.0f ? 0xffu : (x > 0.0f ? 0x7eu : 0xfeu);
                word |= c << (8 * k);
            }
            out[w] = word;
        }
    } else {
        // x / 2^k and x * 2^-k round the same exact value once; 2^-k is an f32
        // (at least 2^-127, a subnormal) for every e in [1, 254].
        const float inv = e == 254 ? qs_f(0x00400000u) : qs_f((254u - e) << 23);
#pragma unroll
        for (int w = 0; w < 8; ++w) {
            u32 word = 0;
#pragma unroll
            for (int k = 0; k < 4; k += 2) {
                const float a = qs_clamp(__fmul_rn(v[4 * w + k], inv), -448.0f, 448.0f);
                const float b = qs_clamp(__fmul_rn(v[4 * w + k + 1], inv), -448.0f, 448.0f);
                word |= (u32)qs_f32x2_to_e4m3_finite(a, b) << (8 * k);
            }
            out[w] = word;
        }
    }
}

template <int DT>
QS_DEV void qs_mxfp8_quant(const u8* __restrict__ x, i64 rows, i64 cols, u8* __restrict__ q, u8* __restrict__ scales,
                           u32* __restrict__ amax_all) {
    const QsBlocks g = qs_blocks<32>(rows, cols);
    u32 all = 0;
    qs_block_walk<DT, 32, QS_MX_U>(x, g, [&](i64 r, i64 cb, bool data, const float v[32]) {
        u32 e = 0;
        if (data) {
            const u32 m = qs_max_abs<32>(v, 0);
            all = m > all ? m : all;
            e = m == 0 ? 0u : qs_mx_exponent_bits(m);
            u32 w[8];
            qs_mxfp8_codes(v, m, e, w);
            uint4* dst = reinterpret_cast<uint4*>(q + r * g.nb * 32 + cb * 32);
            dst[0] = make_uint4(w[0], w[1], w[2], w[3]);
            dst[1] = make_uint4(w[4], w[5], w[6], w[7]);
        }
        scales[qs_swizzle(r, cb, g.nbs >> 2)] = (u8)e;
    });
    qs_warp_fold_max(all, amax_all);
}

// Dequantization to f32 [rows, cols] (the unpadded part): out = f32(code) * 2^(e-127).
QS_DEV void qs_mxfp8_dequant_impl(const u8* __restrict__ q, const u8* __restrict__ scales, i64 rows, i64 cols,
                                  float* __restrict__ out) {
    const i64 cols_p = (cols + 31) & ~(i64)31;
    const i64 ncb = (((cols_p >> 5) + 3) >> 2);
    const i64 n = rows * cols;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / cols;
        const i64 c = i - r * cols;
        const u32 e = scales[qs_swizzle(r, c >> 5, ncb)];
        // a block with code 0 dequantizes to 0 (its data may hold +-448 and NaN codes)
        out[i] = e == 0 ? 0.0f : __fmul_rn(qs_e4m3_to_f32(q[r * cols_p + c]), qs_e8m0_to_f32(e));
    }
}

// Self-test: qs_mx_exponent_bits equals the division-based qs_mx_exponent for
// every positive finite f32. *count: mismatches; *first: the smallest such bits.
extern "C" __global__ void __launch_bounds__(256) qs_selftest_mx_exponent(u32* count, u32* first) {
    const u32 stride = gridDim.x * blockDim.x;
    for (u32 b = 1 + blockIdx.x * blockDim.x + threadIdx.x; b < 0x7f800000u; b += stride) {
        if (qs_mx_exponent(qs_f(b)) != qs_mx_exponent_bits(b)) {
            atomicAdd(count, 1u);
            atomicMin(first, b);
        }
    }
}

#define QS_MXFP8_INST(SUF, DT)                                                                             \
    extern "C" __global__ void __launch_bounds__(QS_THREADS)                                                \
        qs_mxfp8_quant_##SUF(const u8* x, i64 rows, i64 cols, u8* q, u8* scales, u32* amax_all) {          \
        qs_mxfp8_quant<DT>(x, rows, cols, q, scales, amax_all);                                             \
    }

QS_MXFP8_INST(f32, QS_F32)
QS_MXFP8_INST(f16, QS_F16)
QS_MXFP8_INST(bf16, QS_BF16)

extern "C" __global__ void __launch_bounds__(256)
    qs_mxfp8_dequant(const u8* q, const u8* scales, i64 rows, i64 cols, float* out) {
    qs_mxfp8_dequant_impl(q, scales, rows, cols, out);
}
