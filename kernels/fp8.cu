// FP8 E4M3 per-tensor quantization, as the CPU reference (host/src/formats/fp8.rs)
// defines it after comfy-kitchen's quantize_per_tensor_fp8, for a source dtype T:
//   scale = T(amax / 448)                  stored as f32 `weight_scale`
//   mul   = T(1 / scale)
//   q     = e4m3(clamp(T(x * mul), -448, 448))
// Where mul is not finite (all-zero tensors, f16 tensors with amax below about
// 0.0068, scales that underflow T) the CPU reference's fallback applies: the same
// in f32 (scale = amax / 448, mul = 1 / scale, no rounding to T), and where even
// that reciprocal overflows, zero codes with scale 1.0.
//
// Launch after qs_amax_tensor_<T> on the same stream, same grid.

// Logical block of this CTA: reversed, so the first tiles quantized are the last
// ones the amax pass read (still in L2).
QS_DEV i64 qs_reversed_block() { return (i64)gridDim.x - 1 - (i64)blockIdx.x; }

QS_DEV bool qs_isfinite(float v) { return (qs_u(v) & 0x7fffffffu) < 0x7f800000u; }

// The per-tensor plan: mode 0 = zero codes, 1 = products rounded to T, 2 = f32.
template <int DT>
QS_DEV int qs_fp8_plan(float amax, float& scale, float& mul) {
    scale = qs_round_t<DT>(__fdiv_rn(amax, 448.0f));
    mul = qs_round_t<DT>(__fdiv_rn(1.0f, scale));
    if (qs_isfinite(mul)) return 1;
    scale = __fdiv_rn(amax, 448.0f);
    mul = __fdiv_rn(1.0f, scale);
    if (qs_isfinite(mul)) return 2;
    scale = 1.0f;
    mul = 0.0f;
    return 0;
}

template <int DT>
QS_DEV float qs_fp8_scaled(float x, float mul, int mode) {
    float p = __fmul_rn(x, mul);
    if (mode == 1) p = qs_round_t<DT>(p);
    return qs_clamp(p, -448.0f, 448.0f);
}

template <int DT>
QS_DEV void qs_fp8_codes8(const float v[8], float mul, int mode, u8 out[8]) {
#pragma unroll
    for (int k = 0; k < 8; k += 2) {
        u16 p = qs_f32x2_to_e4m3_finite(qs_fp8_scaled<DT>(v[k], mul, mode), qs_fp8_scaled<DT>(v[k + 1], mul, mode));
        out[k] = mode == 0 ? 0 : (u8)(p & 0xff);
        out[k + 1] = mode == 0 ? 0 : (u8)(p >> 8);
    }
}

QS_DEV u64 qs_pack8(const u8 b[8]) {
    u64 r = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) r |= (u64)b[k] << (8 * k);
    return r;
}

template <int DT>
QS_DEV void qs_fp8_quant(const u8* __restrict__ x, i64 n, const u32* __restrict__ amax_bits,
                         u8* __restrict__ q, float* __restrict__ scale_out) {
    float scale, mul;
    const int mode = qs_fp8_plan<DT>(qs_f(*amax_bits), scale, mul);
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
            u8 o[8];
            qs_decode8<DT>(raw[u], v);
            qs_fp8_codes8<DT>(v, mul, mode, o);
            reinterpret_cast<u64*>(q)[c0 + u * QS_THREADS] = qs_pack8(o);
        }
    } else {
        for (int u = 0; u < QS_UNROLL; ++u) {
            const i64 c = c0 + u * QS_THREADS;
            if (c < full) {
                float v[8];
                u8 o[8];
                qs_load8<DT>(x, c << 3, v);
                qs_fp8_codes8<DT>(v, mul, mode, o);
                reinterpret_cast<u64*>(q)[c] = qs_pack8(o);
            } else if (c == full) {
                for (i64 i = c << 3; i < n; ++i) {
                    float a = qs_fp8_scaled<DT>(qs_load1<DT>(x, i), mul, mode);
                    q[i] = mode == 0 ? 0 : (u8)(qs_f32x2_to_e4m3(a, 0.0f) & 0xff);
                }
            }
        }
    }
}

// Dequantization: out = f32(q) * scale (f32 [n]).
QS_DEV void qs_fp8_dequant_impl(const u8* __restrict__ q, i64 n, const float* __restrict__ scale, float* __restrict__ out) {
    const float s = *scale;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        out[i] = __fmul_rn(qs_e4m3_to_f32(q[i]), s);
    }
}

#define QS_FP8_INST(SUF, DT)                                                                                \
    extern "C" __global__ void __launch_bounds__(QS_THREADS)                                                 \
        qs_fp8_quant_##SUF(const u8* x, i64 n, const u32* amax_bits, u8* q, float* scale_out) {              \
        qs_fp8_quant<DT>(x, n, amax_bits, q, scale_out);                                                     \
    }

QS_FP8_INST(f32, QS_F32)
QS_FP8_INST(f16, QS_F16)
QS_FP8_INST(bf16, QS_BF16)

extern "C" __global__ void __launch_bounds__(256) qs_fp8_dequant(const u8* q, i64 n, const float* scale, float* out) {
    qs_fp8_dequant_impl(q, n, scale, out);
}
