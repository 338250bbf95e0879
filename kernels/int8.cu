// INT8 symmetric quantization (comfy-kitchen quantize_int8_tensorwise /
// quantize_int8_rowwise):
//   scale   = max(f32(amax) / 127, 1e-30)           stored as f32
//   s_T     = T(scale), or finfo(T).tiny where that is 0
//   q       = clamp(round_half_even(T(x / s_T)), -128, 127)
// Per tensor: amax over the tensor (qs_amax_tensor first), scale F32 [].
// Per channel: amax over each row, scale F32 [rows, 1]; one kernel does both passes.

template <int DT>
QS_DEV float qs_tiny() {
    if constexpr (DT == QS_F16) {
        return 6.103515625e-05f;  // 2^-14
    } else {
        return 1.1754943508222875e-38f;  // 2^-126 (f32 and bf16)
    }
}

QS_DEV float qs_int8_scale(u32 amax_bits) {
    float s = __fdiv_rn(qs_f(amax_bits), 127.0f);
    return s < 1e-30f ? 1e-30f : s;
}

template <int DT>
QS_DEV float qs_int8_math_scale(float scale) {
    float s = qs_round_t<DT>(scale);
    return s == 0.0f ? qs_tiny<DT>() : s;
}

template <int DT>
QS_DEV u8 qs_int8_code(float x, float s_t) {
    float v = rintf(qs_round_t<DT>(__fdiv_rn(x, s_t)));
    v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
    return (u8)(signed char)(int)v;
}

template <int DT>
QS_DEV u64 qs_int8_codes8(const float v[8], float s_t) {
    u64 r = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) r |= (u64)qs_int8_code<DT>(v[k], s_t) << (8 * k);
    return r;
}

// Per tensor; same grid as qs_amax_tensor.
template <int DT>
QS_DEV void qs_int8_tensor_quant(const u8* __restrict__ x, i64 n, const u32* __restrict__ amax_bits,
                                 u8* __restrict__ q, float* __restrict__ scale_out) {
    const float scale = qs_int8_scale(*amax_bits);
    const float s_t = qs_int8_math_scale<DT>(scale);
    if (blockIdx.x == 0 && threadIdx.x == 0) *scale_out = scale;

    const i64 full = n >> 3;
    const i64 c0 = qs_reversed_block() * QS_TILE_CHUNKS + threadIdx.x;
    if (c0 + (QS_UNROLL - 1) * QS_THREADS < full) {
        QsRaw8<DT> raw[QS_UNROLL];
#pragma unroll
        for (int u = 0; u < QS_UNROLL; ++u) qs_fetch8<DT>(x, (c0 + u * QS_THREADS) << 3, raw[u]);
#pragma unroll
        for (int u = 0; u < QS_UNROLL; ++u) {
            float v[8];
            qs_decode8<DT>(raw[u], v);
            reinterpret_cast<u64*>(q)[c0 + u * QS_THREADS] = qs_int8_codes8<DT>(v, s_t);
        }
    } else {
        for (int u = 0; u < QS_UNROLL; ++u) {
            const i64 c = c0 + u * QS_THREADS;
            if (c < full) {
                float v[8];
                qs_load8<DT>(x, c << 3, v);
                reinterpret_cast<u64*>(q)[c] = qs_int8_codes8<DT>(v, s_t);
            } else if (c == full) {
                for (i64 i = c << 3; i < n; ++i) q[i] = qs_int8_code<DT>(qs_load1<DT>(x, i), s_t);
            }
        }
    }
}

// Per output channel: one block a row (grid-stride over rows). A row of up to
// QS_ROW_CHUNKS x blockDim chunks stays in registers between its amax and its
// quantization (one read); longer rows, or rows that are not whole 16-byte
// chunks, are read twice. Also folds each row's amax into *amax_all (for the
// host's non-finite check).
#define QS_ROW_CHUNKS 8

template <int DT>
QS_DEV void qs_int8_rows_quant(const u8* __restrict__ x, i64 rows, i64 cols, u8* __restrict__ q,
                               float* __restrict__ scale_out, u32* __restrict__ amax_all) {
    __shared__ u32 sh[32];
    const bool vec = (cols & 7) == 0;
    const i64 nck = cols >> 3;
    const bool in_regs = vec && nck <= (i64)QS_ROW_CHUNKS * blockDim.x;
    u32 all = 0;
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const i64 base = r * cols;
        u32 m = 0;
        if (in_regs) {
            QsRaw8<DT> raw[QS_ROW_CHUNKS];
#pragma unroll
            for (int u = 0; u < QS_ROW_CHUNKS; ++u) {
                const i64 c = threadIdx.x + (i64)u * blockDim.x;
                if (c < nck) qs_fetch8<DT>(x, base + (c << 3), raw[u]);
            }
#pragma unroll
            for (int u = 0; u < QS_ROW_CHUNKS; ++u) {
                const i64 c = threadIdx.x + (i64)u * blockDim.x;
                if (c < nck) {
                    float v[8];
                    qs_decode8<DT>(raw[u], v);
#pragma unroll
                    for (int k = 0; k < 8; ++k) {
                        u32 a = qs_abs_bits(v[k]);
                        m = a > m ? a : m;
                    }
                }
            }
            m = qs_block_max(m, sh);
            const float scale = qs_int8_scale(m);
            const float s_t = qs_int8_math_scale<DT>(scale);
            if (threadIdx.x == 0) scale_out[r] = scale;
#pragma unroll
            for (int u = 0; u < QS_ROW_CHUNKS; ++u) {
                const i64 c = threadIdx.x + (i64)u * blockDim.x;
                if (c < nck) {
                    float v[8];
                    qs_decode8<DT>(raw[u], v);
                    reinterpret_cast<u64*>(q + base)[c] = qs_int8_codes8<DT>(v, s_t);
                }
            }
        } else {
            if (vec) {
                for (i64 c = threadIdx.x; c < nck; c += blockDim.x) {
                    float v[8];
                    qs_load8<DT>(x, base + (c << 3), v);
#pragma unroll
                    for (int k = 0; k < 8; ++k) {
                        u32 a = qs_abs_bits(v[k]);
                        m = a > m ? a : m;
                    }
                }
            } else {
                for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
                    u32 a = qs_abs_bits(qs_load1<DT>(x, base + c));
                    m = a > m ? a : m;
                }
            }
            m = qs_block_max(m, sh);
            const float scale = qs_int8_scale(m);
            const float s_t = qs_int8_math_scale<DT>(scale);
            if (threadIdx.x == 0) scale_out[r] = scale;
            if (vec) {
                for (i64 c = threadIdx.x; c < nck; c += blockDim.x) {
                    float v[8];
                    qs_load8<DT>(x, base + (c << 3), v);
                    reinterpret_cast<u64*>(q + base)[c] = qs_int8_codes8<DT>(v, s_t);
                }
            } else {
                for (i64 c = threadIdx.x; c < cols; c += blockDim.x) q[base + c] = qs_int8_code<DT>(qs_load1<DT>(x, base + c), s_t);
            }
        }
        all = m > all ? m : all;
    }
    if (threadIdx.x == 0 && all != 0) atomicMax(amax_all, all);
}

// Per output channel, one warp a row held in registers (rows of whole 16-byte
// chunks, at most 32 x qs_warp_row_chunks<DT>() chunks): no block barrier,
// and every lane has its whole share of the row in flight at once.
template <int DT>
QS_DEV constexpr int qs_warp_row_chunks() { return DT == QS_F32 ? 6 : 12; }

template <int DT>
QS_DEV void qs_int8_warp_rows_quant(const u8* __restrict__ x, i64 rows, i64 cols, u8* __restrict__ q,
                                    float* __restrict__ scale_out, u32* __restrict__ amax_all) {
    constexpr int NC = qs_warp_row_chunks<DT>();
    const int lane = threadIdx.x & 31;
    const i64 nwarps = (i64)gridDim.x * (blockDim.x >> 5);
    const i64 nck = cols >> 3;
    u32 all = 0;
    for (i64 r = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += nwarps) {
        const i64 base = r * cols;
        QsRaw8<DT> raw[NC];
#pragma unroll
        for (int u = 0; u < NC; ++u) {
            const i64 c = lane + 32 * u;
            if (c < nck) qs_fetch8<DT>(x, base + (c << 3), raw[u]);
        }
        u32 m = 0;
#pragma unroll
        for (int u = 0; u < NC; ++u) {
            const i64 c = lane + 32 * u;
            if (c < nck) {
                float v[8];
                qs_decode8<DT>(raw[u], v);
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    u32 a = qs_abs_bits(v[k]);
                    m = a > m ? a : m;
                }
            }
        }
        m = qs_warp_max(m);
        all = m > all ? m : all;
        const float scale = qs_int8_scale(m);
        const float s_t = qs_int8_math_scale<DT>(scale);
        if (lane == 0) scale_out[r] = scale;
#pragma unroll
        for (int u = 0; u < NC; ++u) {
            const i64 c = lane + 32 * u;
            if (c < nck) {
                float v[8];
                qs_decode8<DT>(raw[u], v);
                reinterpret_cast<u64*>(q + base)[c] = qs_int8_codes8<DT>(v, s_t);
            }
        }
    }
    if (lane == 0 && all != 0) atomicMax(amax_all, all);
}

// Dequantization: out[r, c] = f32(q) * scale[r or 0].
QS_DEV void qs_int8_dequant_impl(const u8* __restrict__ q, i64 rows, i64 cols, const float* __restrict__ scale,
                                 int per_row, float* __restrict__ out) {
    const i64 n = rows * cols;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float s = per_row ? scale[i / cols] : scale[0];
        out[i] = __fmul_rn((float)(int)(signed char)q[i], s);
    }
}

#define QS_INT8_INST(SUF, DT)                                                                              \
    extern "C" __global__ void __launch_bounds__(QS_THREADS)                                                \
        qs_int8_tensor_quant_##SUF(const u8* x, i64 n, const u32* amax_bits, u8* q, float* scale_out) {     \
        qs_int8_tensor_quant<DT>(x, n, amax_bits, q, scale_out);                                            \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) qs_int8_rows_quant_##SUF(                             \
        const u8* x, i64 rows, i64 cols, u8* q, float* scale_out, u32* amax_all) {                          \
        qs_int8_rows_quant<DT>(x, rows, cols, q, scale_out, amax_all);                                      \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) qs_int8_warp_rows_quant_##SUF(                        \
        const u8* x, i64 rows, i64 cols, u8* q, float* scale_out, u32* amax_all) {                          \
        qs_int8_warp_rows_quant<DT>(x, rows, cols, q, scale_out, amax_all);                                 \
    }

QS_INT8_INST(f32, QS_F32)
QS_INT8_INST(f16, QS_F16)
QS_INT8_INST(bf16, QS_BF16)

extern "C" __global__ void __launch_bounds__(256)
    qs_int8_dequant(const u8* q, i64 rows, i64 cols, const float* scale, int per_row, float* out) {
    qs_int8_dequant_impl(q, rows, cols, scale, per_row, out);
}
