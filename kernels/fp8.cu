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
// Launch after qs_amax_tensor_<T> (over the whole tensor, or over each upload
// piece) has left the tensor's amax in *amax_bits, on the same stream.

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
    if (mode == 1) p = qs_round_t_finite<DT>(p);
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

template <int DT>
QS_DEV void qs_fp8_quant(const u8* __restrict__ x, i64 n, const u32* __restrict__ amax_bits,
                         u8* __restrict__ q, float* __restrict__ scale_out) {
    // The plan is worked out at the first chunk, once its loads are in flight
    // (not before them, behind the read of the amax word); every thread has one.
    float scale = 0.0f, mul = 0.0f;
    int mode = -1;
    const auto plan = [&] {
        if (mode >= 0) return;
        mode = qs_fp8_plan<DT>(qs_f(*amax_bits), scale, mul);
        if (blockIdx.x == 0 && threadIdx.x == 0) *scale_out = scale;
    };
    qs_flat_walk<DT>(
        x, n, true,
        [&](i64 c, const float v[8]) {
            plan();
            u8 o[8];
            qs_fp8_codes8<DT>(v, mul, mode, o);
            reinterpret_cast<u64*>(q)[c] = qs_pack8(o);
        },
        [&](i64 i) {
            plan();
            const float a = qs_fp8_scaled<DT>(qs_load1<DT>(x, i), mul, mode);
            q[i] = mode == 0 ? 0 : (u8)(qs_f32x2_to_e4m3(a, 0.0f) & 0xff);
        });
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
