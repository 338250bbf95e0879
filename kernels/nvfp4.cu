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
// Threads own 8-element chunks of the padded matrix; the two lanes of a block
// exchange their maxima with one shuffle. Launch after qs_amax_tensor_<T>;
// `scales` must be zeroed first (the padding of the tile layout stays 0).

// The block-format kernels run on a 2-D grid: x over chunk columns
// (QS_BT threads, one chunk column each), y over groups of QS_BR rows, so no
// index division is needed and each thread has QS_BR loads in flight.
#ifndef QS_BT
#define QS_BT 128
#endif
#ifndef QS_BR
#define QS_BR 4
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

// Four packed bytes (8 codes) for 8 elements of a block with scale `total`.
QS_DEV u32 qs_nvfp4_pack8(const float v[8], float total) {
    if (total == 0.0f) return 0u;
    u32 r = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        float a = qs_clamp(__fdiv_rn(v[2 * k], total), -6.0f, 6.0f);
        float b = qs_clamp(__fdiv_rn(v[2 * k + 1], total), -6.0f, 6.0f);
        u32 byte = ((u32)qs_f32_to_e2m1_fast(a) << 4) | (u32)qs_f32_to_e2m1_fast(b);
        r |= byte << (8 * k);
    }
    return r;
}

// Loads the 8 elements at padded position (r, c0); zero outside [rows, cols].
template <int DT>
QS_DEV void qs_load_padded8(const u8* __restrict__ x, i64 rows, i64 cols, i64 r, i64 c0, bool vec, float v[8]) {
    if (r < rows && vec && c0 < cols) {
        qs_load8<DT>(x, r * cols + c0, v);
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = (r < rows && c0 + k < cols) ? qs_load1<DT>(x, r * cols + c0 + k) : 0.0f;
    }
}

// (row, first column) of chunk `c` of a matrix with `cpr` chunks per row.
QS_DEV void qs_chunk_pos(i64 c, i64 cpr, bool small, i64& r, i64& c0) {
    if (small) {
        u32 rr = (u32)c / (u32)cpr;
        r = rr;
        c0 = ((i64)((u32)c - rr * (u32)cpr)) << 3;
    } else {
        r = c / cpr;
        c0 = (c - r * cpr) << 3;
    }
}

// The geometry of a padded block-format matrix, in chunks of 8 elements.
struct QsPadded {
    i64 rows, cols;  // logical
    i64 cpr;         // chunks per padded row
    i64 total;       // chunks in the padded matrix
    i64 ncb;         // tile columns of the swizzled scale layout
    bool vec;        // rows start 16-byte aligned: whole chunks load as vectors
    bool small;      // chunk indices fit 32 bits
};

QS_DEV QsPadded qs_padded(i64 rows, i64 cols, int block) {
    QsPadded g;
    g.rows = rows;
    g.cols = cols;
    const i64 rows_p = (rows + block - 1) / block * block;
    const i64 cols_p = (cols + block - 1) / block * block;
    g.cpr = cols_p >> 3;
    g.total = rows_p * g.cpr;
    g.ncb = ((cols_p / block) + 3) >> 2;
    g.vec = (cols & 7) == 0;
    g.small = g.total < 0xffffffffLL;
    return g;
}

// One chunk of a padded matrix: where it is, and its raw bytes when it is a
// whole in-bounds vector (`fast`); other live chunks are read element-wise.
template <int DT>
struct QsChunk {
    QsRaw8<DT> raw;
    i64 r, c0;
    bool live, fast;
};

// Locates chunk `c` and starts its vector load (the value is used later, so
// several loads are in flight before the first use).
template <int DT>
QS_DEV void qs_chunk_locate(const QsPadded& g, i64 c, QsChunk<DT>& k) {
    k.live = c < g.total;
    k.r = 0;
    k.c0 = 0;
    k.fast = false;
    if (k.live) {
        qs_chunk_pos(c, g.cpr, g.small, k.r, k.c0);
        k.fast = k.r < g.rows && g.vec && k.c0 < g.cols;
    }
}

template <int DT>
QS_DEV void qs_chunk_fetch(const u8* __restrict__ x, const QsPadded& g, i64 c, QsChunk<DT>& k) {
    qs_chunk_locate<DT>(g, c, k);
    if (k.fast) qs_fetch8<DT>(x, k.r * g.cols + k.c0, k.raw);
}

// The chunk's 8 values (zero in the padding).
template <int DT>
QS_DEV void qs_chunk_values(const u8* __restrict__ x, const QsPadded& g, const QsChunk<DT>& k, float v[8]) {
    if (k.fast) {
        qs_decode8<DT>(k.raw, v);
    } else if (k.live) {
        qs_load_padded8<DT>(x, g.rows, g.cols, k.r, k.c0, false, v);
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.0f;
    }
}

// Quantizes one chunk (8 values `v` at padded position (r, c0), output chunk
// index `c`); the two lanes of a 16-block exchange their maxima, so all 32
// lanes of the warp call this together (chunk index parity == lane parity).
QS_DEV void qs_nvfp4_chunk(const QsPadded& g, i64 c, bool live, i64 r, i64 c0, const float v[8], float s2,
                           u8* __restrict__ q, u8* __restrict__ scales) {
    u32 m = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        u32 a = qs_abs_bits(v[i]);
        m = a > m ? a : m;
    }
    u32 o = __shfl_xor_sync(0xffffffffu, m, 1);
    m = o > m ? o : m;
    const u8 code = qs_nvfp4_block_code(qs_f(m), s2);
    const float tot = __fmul_rn(s2, qs_e4m3_to_f32(code));
    const u32 packed = qs_nvfp4_pack8(v, tot);
    if (live) {
        reinterpret_cast<u32*>(q)[c] = packed;
        if ((threadIdx.x & 1) == 0) scales[qs_swizzle(r, c0 >> 4, g.ncb)] = code;
    }
}

// The 2-D walk shared by NVFP4 and MXFP8: calls f(c, live, r, c0, v) for the
// QS_BR chunks of each row group this thread owns, all loads of a group first.
// Blocks run in reverse order (after an amax pass, the last-read data first).
template <int DT, typename F>
QS_DEV void qs_walk_2d(const u8* __restrict__ x, const QsPadded& g, F f) {
    const i64 nblk = (i64)gridDim.x * gridDim.y;
    const i64 lin = nblk - 1 - ((i64)blockIdx.y * gridDim.x + blockIdx.x);
    const i64 bx = lin % gridDim.x;
    const i64 by = lin / gridDim.x;
    const i64 cc = bx * QS_BT + threadIdx.x;  // chunk column
    const bool col_live = cc < g.cpr;
    const i64 c0 = cc << 3;
    const i64 rows_p = g.total / g.cpr;
    const bool col_fast = col_live && g.vec && c0 < g.cols;
    for (i64 r0 = by * QS_BR; r0 < rows_p; r0 += (i64)gridDim.y * QS_BR) {
        QsRaw8<DT> raw[QS_BR];
#pragma unroll
        for (int j = 0; j < QS_BR; ++j) {
            const i64 r = r0 + j;
            if (col_fast && r < g.rows) qs_fetch8<DT>(x, r * g.cols + c0, raw[j]);
        }
#pragma unroll
        for (int j = 0; j < QS_BR; ++j) {
            const i64 r = r0 + j;
            const bool live = col_live && r < rows_p;
            float v[8];
            if (col_fast && r < g.rows) {
                qs_decode8<DT>(raw[j], v);
            } else if (live) {
                qs_load_padded8<DT>(x, g.rows, g.cols, r, c0, false, v);
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) v[i] = 0.0f;
            }
            f(r * g.cpr + cc, live, r, c0, v);
        }
    }
}

template <int DT>
QS_DEV void qs_nvfp4_quant(const u8* __restrict__ x, i64 rows, i64 cols, const u32* __restrict__ amax_bits,
                           u8* __restrict__ q, u8* __restrict__ scales, float* __restrict__ s2_out) {
    const float s2 = qs_nvfp4_global_scale<DT>(qs_f(*amax_bits));
    if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *s2_out = s2;
    const QsPadded g = qs_padded(rows, cols, 16);
    qs_walk_2d<DT>(x, g, [&](i64 c, bool live, i64 r, i64 c0, const float v[8]) {
        qs_nvfp4_chunk(g, c, live, r, c0, v, s2, q, scales);
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

#define QS_NVFP4_INST(SUF, DT)                                                                            \
    extern "C" __global__ void __launch_bounds__(QS_BT) qs_nvfp4_quant_##SUF(                   \
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
