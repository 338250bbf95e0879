// INT8 symmetric quantization (comfy-kitchen quantize_int8_tensorwise /
// quantize_int8_rowwise):
//   scale   = max(f32(amax) / 127, 1e-30)           stored as f32
//   s_t     = T(scale), or finfo(T).tiny where that is 0
//   q       = clamp(round_half_even(T(x / s_t)), -128, 127)
// Per tensor: amax over the tensor (qs_amax_tensor first), scale F32 [].
// Per channel: amax over each row, scale F32 [rows, 1]; one kernel does both passes.
//
// The division x / s_t is replaced by x * y with y = RN(1 / s_t) (one rounded
// reciprocal per tensor or row): |x y - x / s_t| <= 2^-23 |x / s_t|, so x y and
// the correctly rounded quotient RN(x / s_t) are at most 5 f32 steps apart
// (bit patterns, counting across a binade edge). The code depends on the
// quotient only through T's rounding (bf16: the low 16 bits against 0x8000;
// f16: the low 13 against 0x1000; f32: no rounding) and then the integer
// rounding (half-integers); wherever x y lies within 8 steps of such a
// boundary, the 8 codes of its chunk are computed again with the IEEE
// division. Away from them both quotients give the same code. f16 results
// below 2^-14 round differently, but both sides are far below 0.5 there (code
// 0). The self-test compares the two over every f32 x for a set of divisors.

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

// y = RN(1 / s_t) where it is a normal f32 (s_t in [2^-126, 2^126]; every
// scale the formula makes is), else 0: every code then takes the division.
QS_DEV float qs_int8_recip(float s_t) {
    return (s_t >= 1.1754943508222875e-38f && s_t <= 8.507059173023462e37f) ? __frcp_rn(s_t) : 0.0f;
}

template <int DT>
QS_DEV u8 qs_int8_code(float x, float s_t) {
    float v = rintf(qs_round_t<DT>(__fdiv_rn(x, s_t)));
    v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
    return (u8)(signed char)(int)v;
}

// The code from x * y; sets `near` where it may differ from qs_int8_code.
// The integer rounding is the conversion's own (round to nearest even,
// saturating: everything beyond the int range clamps the same).
template <int DT>
QS_DEV u32 qs_int8_code_recip(float x, float y, bool& near) {
    const float q = __fmul_rn(x, y);
    int i;
    if constexpr (DT == QS_F32) {
        const float t = rintf(q);
        near |= fabsf(fabsf(__fsub_rn(q, t)) - 0.5f) <= 2.44140625e-4f;  // 2^-12: 8 steps below 512
        i = __float2int_rn(t);
    } else {
        const u32 b = qs_u(q);
        if constexpr (DT == QS_BF16) {
            near |= ((b - 0x7ff8u) & 0xffffu) <= 16u;
        } else {
            near |= ((b - 0x0ff8u) & 0x1fffu) <= 16u;
        }
        i = __float2int_rn(qs_round_t_finite<DT>(q));
    }
    i = i < -128 ? -128 : (i > 127 ? 127 : i);
    return (u32)i & 0xffu;
}

template <int DT>
QS_DEV u64 qs_int8_codes8(const float v[8], float s_t) {
    u64 r = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) r |= (u64)qs_int8_code<DT>(v[k], s_t) << (8 * k);
    return r;
}

// Eight codes through the reciprocal `y` (0: the division throughout).
template <int DT>
QS_DEV u64 qs_int8_codes8_fast(const float v[8], float s_t, float y) {
    bool near = y == 0.0f;
    u64 r = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) r |= (u64)qs_int8_code_recip<DT>(v[k], y, near) << (8 * k);
    return near ? qs_int8_codes8<DT>(v, s_t) : r;
}

// Per tensor; grid: CudaBackend::flat_grid.
template <int DT>
QS_DEV void qs_int8_tensor_quant(const u8* __restrict__ x, i64 n, const u32* __restrict__ amax_bits,
                                 u8* __restrict__ q, float* __restrict__ scale_out) {
    // The scale is worked out at the first chunk, once its loads are in flight
    // (not before them, behind the read of the amax word); every thread has one.
    float s_t = 0.0f, y = 0.0f;
    const auto plan = [&] {
        if (s_t != 0.0f) return;
        const float scale = qs_int8_scale(*amax_bits);
        s_t = qs_int8_math_scale<DT>(scale);
        y = qs_int8_recip(s_t);
        if (blockIdx.x == 0 && threadIdx.x == 0) *scale_out = scale;
    };
    qs_flat_walk<DT>(
        x, n, true,
        [&](i64 c, const float v[8]) {
            plan();
            reinterpret_cast<u64*>(q)[c] = qs_int8_codes8_fast<DT>(v, s_t, y);
        },
        [&](i64 i) {
            plan();
            q[i] = qs_int8_code<DT>(qs_load1<DT>(x, i), s_t);
        });
}

// Per output channel: one block a row. A row of up to QS_ROW_CHUNKS x
// blockDim chunks stays in registers between its amax and its quantization
// (one read); longer rows, or rows that are not whole 16-byte chunks, are read
// twice. Also folds each row's amax into *amax_all (for the host's non-finite check).
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
                    m = qs_max_abs<8>(v, m);
                }
            }
            m = qs_block_max(m, sh);
            const float scale = qs_int8_scale(m);
            const float s_t = qs_int8_math_scale<DT>(scale);
            const float y = qs_int8_recip(s_t);
            if (threadIdx.x == 0) scale_out[r] = scale;
#pragma unroll
            for (int u = 0; u < QS_ROW_CHUNKS; ++u) {
                const i64 c = threadIdx.x + (i64)u * blockDim.x;
                if (c < nck) {
                    float v[8];
                    qs_decode8<DT>(raw[u], v);
                    reinterpret_cast<u64*>(q + base)[c] = qs_int8_codes8_fast<DT>(v, s_t, y);
                }
            }
        } else {
            if (vec) {
                for (i64 c = threadIdx.x; c < nck; c += blockDim.x) {
                    float v[8];
                    qs_load8<DT>(x, base + (c << 3), v);
                    m = qs_max_abs<8>(v, m);
                }
            } else {
                for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
                    const u32 a = qs_abs_bits(qs_load1<DT>(x, base + c));
                    m = a > m ? a : m;
                }
            }
            m = qs_block_max(m, sh);
            const float scale = qs_int8_scale(m);
            const float s_t = qs_int8_math_scale<DT>(scale);
            const float y = qs_int8_recip(s_t);
            if (threadIdx.x == 0) scale_out[r] = scale;
            if (vec) {
                for (i64 c = threadIdx.x; c < nck; c += blockDim.x) {
                    float v[8];
                    qs_load8<DT>(x, base + (c << 3), v);
                    reinterpret_cast<u64*>(q + base)[c] = qs_int8_codes8_fast<DT>(v, s_t, y);
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
                m = qs_max_abs<8>(v, m);
            }
        }
        m = qs_warp_max(m);
        all = m > all ? m : all;
        const float scale = qs_int8_scale(m);
        const float s_t = qs_int8_math_scale<DT>(scale);
        const float y = qs_int8_recip(s_t);
        if (lane == 0) scale_out[r] = scale;
#pragma unroll
        for (int u = 0; u < NC; ++u) {
            const i64 c = lane + 32 * u;
            if (c < nck) {
                float v[8];
                qs_decode8<DT>(raw[u], v);
                reinterpret_cast<u64*>(q + base)[c] = qs_int8_codes8_fast<DT>(v, s_t, y);
            }
        }
    }
    // `all` is already the same in every lane
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

// Self-test: for every finite f32 x and each divisor below (as T rounds it),
// the reciprocal path's code equals the division's wherever it does not ask
// for the division itself. *count: mismatches; *first: the smallest x bits.
__constant__ float qs_int8_test_divisors[16] = {
    1.0f,           0.5f,          7.874015718698502e-3f, 2.9296875e-3f,  1.2345678e-3f,    1.9999999f,
    1.0000001f,     1.3333334f,    1e-30f,                2.6e36f,        6.103515625e-05f, 1.1754943508222875e-38f,
    0.0123456789f,  3.0517578e-5f, 157.48031f,            2.0254e-20f,
};

template <int DT>
QS_DEV bool qs_int8_recip_mismatch(float x) {
    bool bad = false;
#pragma unroll 1
    for (int k = 0; k < 16; ++k) {
        const float s_t = qs_int8_math_scale<DT>(qs_int8_test_divisors[k]);
        const float y = qs_int8_recip(s_t);
        if (y == 0.0f) continue;
        bool near = false;
        const u32 fast = qs_int8_code_recip<DT>(x, y, near);
        bad |= !near && fast != (u32)qs_int8_code<DT>(x, s_t);
    }
    return bad;
}

extern "C" __global__ void __launch_bounds__(256) qs_selftest_int8_recip(u32* count, u32* first) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (1ull << 32); i += stride) {
        const float x = qs_f((u32)i);
        if (!qs_isfinite(x)) continue;
        if (qs_int8_recip_mismatch<QS_F32>(x) || qs_int8_recip_mismatch<QS_F16>(x) || qs_int8_recip_mismatch<QS_BF16>(x)) {
            atomicAdd(count, 1u);
            atomicMin(first, (u32)i);
        }
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
