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
// Four lanes own a block (8 elements each) and exchange maxima with two
// shuffles. No global amax is needed; the block maxima are folded into
// *amax_all for the host's non-finite check. `scales` must be zeroed first.


// Quantizes one chunk; the four lanes of a 32-block exchange their maxima, so
// all 32 lanes of the warp call this together (chunk index % 4 == lane % 4).
// Returns the block maximum's bits (for the non-finite check).
QS_DEV u32 qs_mxfp8_chunk(const QsPadded& g, i64 c, bool live, i64 r, i64 c0, const float v[8], u8* __restrict__ q,
                          u8* __restrict__ scales) {
    u32 m = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        u32 a = qs_abs_bits(v[i]);
        m = a > m ? a : m;
    }
    u32 o = __shfl_xor_sync(0xffffffffu, m, 1);
    m = o > m ? o : m;
    o = __shfl_xor_sync(0xffffffffu, m, 2);
    m = o > m ? o : m;
    const float bmax = qs_f(m);
    const u32 e = bmax == 0.0f ? 0u : qs_mx_exponent(bmax);
    u8 out[8];
    if (bmax == 0.0f) {
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = 0;
    } else if (e == 0) {
        // x / 0: +-448 for nonzero x; 0/0 is written 0xFF, as the CPU reference
        // does (x86's default NaN has the sign bit set)
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = v[i] == 0.0f ? 0xff : (v[i] > 0.0f ? 0x7e : 0xfe);
    } else {
        // x / 2^k and x * 2^-k round the same exact value once; 2^-k is an f32
        // (at least 2^-127, a subnormal) for every e in [1, 254].
        const float inv = e == 254 ? qs_f(0x00400000u) : qs_f((254u - e) << 23);
#pragma unroll
        for (int i = 0; i < 8; i += 2) {
            float a = qs_clamp(__fmul_rn(v[i], inv), -448.0f, 448.0f);
            float b = qs_clamp(__fmul_rn(v[i + 1], inv), -448.0f, 448.0f);
            u16 p = qs_f32x2_to_e4m3_finite(a, b);
            out[i] = (u8)(p & 0xff);
            out[i + 1] = (u8)(p >> 8);
        }
    }
    if (live) {
        reinterpret_cast<u64*>(q)[c] = qs_pack8(out);
        if ((threadIdx.x & 3) == 0) scales[qs_swizzle(r, c0 >> 5, g.ncb)] = (u8)e;
    }
    return m;
}

template <int DT>
QS_DEV void qs_mxfp8_quant(const u8* __restrict__ x, i64 rows, i64 cols, u8* __restrict__ q, u8* __restrict__ scales,
                           u32* __restrict__ amax_all) {
    const QsPadded g = qs_padded(rows, cols, 32);
    u32 all = 0;
    qs_walk_2d<DT>(x, g, [&](i64 c, bool live, i64 r, i64 c0, const float v[8]) {
        const u32 m = qs_mxfp8_chunk(g, c, live, r, c0, v, q, scales);
        all = m > all ? m : all;
    });
    all = qs_warp_max(all);
    if ((threadIdx.x & 31) == 0 && all != 0) atomicMax(amax_all, all);
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

#define QS_MXFP8_INST(SUF, DT)                                                                             \
    extern "C" __global__ void __launch_bounds__(QS_BT)                                                     \
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
