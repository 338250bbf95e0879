// Calibration kernels of the CUDA `nn::Ops` backend: observers and fake quantization.
//
// Observers keep max |x| as f32 bit patterns in u32 slots (non-negative floats
// order like their bits, NaN and infinity above every finite value), folded in
// with atomicMax, so an observation costs one kernel and no host round trip.
//
// Fake quantization reproduces the CPU reference in host/src/formats/ with the
// source dtype T = f32 applied to the bf16 activation values (the formats'
// T-rounding steps are then identities): the same divisions (IEEE, _rn),
// the same encoders from common.cuh, the dequantized value rounded once to
// bf16. A tensor is quantized as the matrix [numel / last, last]: rows are
// tokens, blocks run along the channels, as for a Linear input.

#define NN_CALIB_THREADS 256

// ---------------------------------------------------------------------------
// Observers
// ---------------------------------------------------------------------------

// x [rows, cols], channels last. Block: 256 consecutive columns (one a
// thread, so a warp reads 64 contiguous bytes of a row) over `rows_per_block`
// rows. Grid: (ceil(cols / 256), ceil(rows / rows_per_block)).
extern "C" __global__ void __launch_bounds__(NN_CALIB_THREADS) nn_observe_last(
    const u16* __restrict__ x, i64 rows, i64 cols, i64 rows_per_block, u32* __restrict__ chan, u32* __restrict__ step) {
    __shared__ u32 sh[32];
    const i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 r0 = (i64)blockIdx.y * rows_per_block;
    const i64 r1 = min(rows, r0 + rows_per_block);
    u32 m = 0;
    if (c < cols) {
        for (i64 r = r0; r < r1; ++r) {
            const u32 a = qs_abs_bits(qs_bf16_to_f32(x[r * cols + c]));
            m = a > m ? a : m;
        }
        if (m != 0) atomicMax(chan + c, m);
    }
    m = qs_block_max(m, sh);
    if (threadIdx.x == 0 && m != 0) atomicMax(step, m);
}

// x [outer, C, inner], channels in the middle (NCHW). Block b reduces chunk
// b % chunks of the contiguous plane (b / chunks) = (n, c).
extern "C" __global__ void __launch_bounds__(NN_CALIB_THREADS) nn_observe_inner(
    const u16* __restrict__ x, i64 channels, i64 inner, i64 chunk, int chunks, u32* __restrict__ chan, u32* __restrict__ step) {
    __shared__ u32 sh[32];
    const i64 plane = blockIdx.x / chunks;
    const i64 k = blockIdx.x - plane * chunks;
    const i64 start = plane * inner + k * chunk;
    const i64 len = min(chunk, inner - k * chunk);
    u32 m = 0;
    for (i64 i = threadIdx.x; i < len; i += blockDim.x) {
        const u32 a = qs_abs_bits(qs_bf16_to_f32(x[start + i]));
        m = a > m ? a : m;
    }
    m = qs_block_max(m, sh);
    if (threadIdx.x == 0 && m != 0) {
        atomicMax(chan + plane % channels, m);
        atomicMax(step, m);
    }
}

// ---------------------------------------------------------------------------
// Fake quantization
// ---------------------------------------------------------------------------

// max |x| of the whole tensor into *out (which must start at 0).
extern "C" __global__ void __launch_bounds__(NN_CALIB_THREADS) nn_amax(const u16* __restrict__ x, i64 n, u32* __restrict__ out) {
    __shared__ u32 sh[32];
    u32 m = 0;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const u32 a = qs_abs_bits(qs_bf16_to_f32(x[i]));
        m = a > m ? a : m;
    }
    m = qs_block_max(m, sh);
    if (threadIdx.x == 0 && m != 0) atomicMax(out, m);
}

// FP8 E4M3 per tensor (formats/fp8.rs with T = f32): mul = 1 / scale,
// code = e4m3(clamp(x * mul, ±448)), y = f32(code) * scale. The scale is
// `scale` (static) or, when `amax` is not null, *amax / 448 (dynamic). A scale
// whose reciprocal is not finite is the reference's zero plan: y = 0.
extern "C" __global__ void __launch_bounds__(NN_CALIB_THREADS)
nn_fq_fp8(const u16* __restrict__ x, u16* __restrict__ y, i64 n, float scale, const u32* __restrict__ amax) {
    if (amax != nullptr) scale = __fdiv_rn(qs_f(*amax), 448.0f);
    const float mul = __fdiv_rn(1.0f, scale);
    const bool zero = !(fabsf(mul) <= 3.402823466e38f);
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float v = 0.0f;
        if (!zero) {
            const float p = qs_clamp(__fmul_rn(qs_bf16_to_f32(x[i]), mul), -448.0f, 448.0f);
            v = __fmul_rn(qs_e4m3_to_f32(qs_f32_to_e4m3_sw(p)), scale);
        }
        y[i] = qs_f32_to_bf16(v);
    }
}

// INT8 per row (formats/int8.rs per channel, T = f32): scale = max(amax / 127,
// 1e-30), q = clamp(rne(x / scale), -128, 127), y = q * scale. One block a row.
extern "C" __global__ void __launch_bounds__(NN_CALIB_THREADS)
nn_fq_int8_rows(const u16* __restrict__ x, u16* __restrict__ y, i64 rows, i64 cols) {
    __shared__ u32 sh[32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const u16* xr = x + r * cols;
        u32 m = 0;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const u32 a = qs_abs_bits(qs_bf16_to_f32(xr[c]));
            m = a > m ? a : m;
        }
        m = qs_block_max(m, sh);
        const float scale = fmaxf(__fdiv_rn(qs_f(m), 127.0f), 1e-30f);
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
            const float v = qs_clamp(__fdiv_rn(qs_bf16_to_f32(xr[c]), scale), -129.0f, 128.0f);
            int q = __float2int_rn(v);
            q = q < -128 ? -128 : (q > 127 ? 127 : q);
            y[r * cols + c] = qs_f32_to_bf16(__fmul_rn((float)q, scale));
        }
    }
}

// NVFP4 (formats/nvfp4.rs, T = f32) with global scale s2 (> 0), one thread a
// 16-element block along the row (a partial last block is zero-padded, as the
// reference pads): sbs = e4m3(min(bmax / 6 / s2, 448)), total = s2 * f32(sbs),
// y = total == 0 ? 0 : e2m1(clamp(x / total, ±6)) * total.
extern "C" __global__ void __launch_bounds__(NN_CALIB_THREADS)
nn_fq_nvfp4(const u16* __restrict__ x, u16* __restrict__ y, i64 rows, i64 cols, float s2) {
    const i64 nb = (cols + 15) >> 4;
    const i64 n = rows * nb;
    for (i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x; b < n; b += (i64)gridDim.x * blockDim.x) {
        const i64 r = b / nb;
        const i64 c0 = (b - r * nb) << 4;
        const int len = (int)min((i64)16, cols - c0);
        const u16* xb = x + r * cols + c0;
        u16* yb = y + r * cols + c0;
        const u32 m = qs_bf16_amax_bits(xb, len);
        const float sbs = fminf(__fdiv_rn(__fdiv_rn(qs_f(m), 6.0f), s2), 448.0f);
        const float total = __fmul_rn(s2, qs_e4m3_to_f32(qs_f32_to_e4m3_sw(sbs)));
        for (int i = 0; i < len; ++i) {
            float v = 0.0f;
            if (total != 0.0f) {
                const float q = qs_clamp(__fdiv_rn(qs_bf16_to_f32(xb[i]), total), -6.0f, 6.0f);
                v = __fmul_rn(qs_e2m1_to_f32(qs_f32_to_e2m1_fast(q)), total);
            }
            yb[i] = qs_f32_to_bf16(v);
        }
    }
}

// MXFP8 (formats/mxfp8.rs), one thread a 32-element block along the row:
// e = E8M0 code of bmax / 448, y = e4m3(clamp(x / 2^(e-127), ±448)) * 2^(e-127);
// zero blocks and blocks whose code is 0 (the reference dequantizes those to 0) give 0.
extern "C" __global__ void __launch_bounds__(NN_CALIB_THREADS)
nn_fq_mxfp8(const u16* __restrict__ x, u16* __restrict__ y, i64 rows, i64 cols) {
    const i64 nb = (cols + 31) >> 5;
    const i64 n = rows * nb;
    for (i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x; b < n; b += (i64)gridDim.x * blockDim.x) {
        const i64 r = b / nb;
        const i64 c0 = (b - r * nb) << 5;
        const int len = (int)min((i64)32, cols - c0);
        const u16* xb = x + r * cols + c0;
        u16* yb = y + r * cols + c0;
        const u32 m = qs_bf16_amax_bits(xb, len);
        const u32 e = m == 0 ? 0u : qs_mx_exponent(qs_f(m));
        const float scale = qs_e8m0_to_f32(e);
        const float inv = e == 0 ? 0.0f : __fdiv_rn(1.0f, scale);
        for (int i = 0; i < len; ++i) {
            float v = 0.0f;
            if (e != 0) {
                const float p = qs_clamp(__fmul_rn(qs_bf16_to_f32(xb[i]), inv), -448.0f, 448.0f);
                v = __fmul_rn(qs_e4m3_to_f32(qs_f32_to_e4m3_sw(p)), scale);
            }
            yb[i] = qs_f32_to_bf16(v);
        }
    }
}
