// Forward-pass kernels of the CUDA `nn::Ops` backend (host/src/nn/cuda.rs).
//
// A separate NVRTC program from the quantization kernels: kernels/common.cuh
// first (bf16 bit conversions, E4M3/E2M1 encoders, reductions), then this file,
// then calib.cu. Activations and weights are bf16 (u16 bit patterns); every
// reduction and every norm/softmax runs in f32. Unlike the quantization
// program this one allows FMA contraction: only calib.cu's fake quantization
// has to reproduce the CPU reference, and it uses the _rn intrinsics, which
// are never contracted.
//
// Elementwise kernels use grid-stride loops over 8-element (16-byte) chunks
// plus a scalar tail; device buffers come straight from cuMemAlloc, so every
// tensor starts 256-byte aligned.

#define NN_THREADS 256

#define NN_TID ((i64)blockIdx.x * blockDim.x + threadIdx.x)
#define NN_STRIDE ((i64)gridDim.x * blockDim.x)

QS_DEV float nn_ld(const u16* __restrict__ p, i64 i) { return qs_bf16_to_f32(p[i]); }
QS_DEV u16 nn_bf(float v) { return qs_f32_to_bf16(v); }

QS_DEV void nn_load8(const u16* __restrict__ p, i64 i, float v[8]) {
    qs_load8<QS_BF16>(reinterpret_cast<const u8*>(p), i, v);
}

QS_DEV void nn_store8(u16* __restrict__ p, i64 i, const float v[8]) {
    uint4 o;
    o.x = (u32)nn_bf(v[0]) | ((u32)nn_bf(v[1]) << 16);
    o.y = (u32)nn_bf(v[2]) | ((u32)nn_bf(v[3]) << 16);
    o.z = (u32)nn_bf(v[4]) | ((u32)nn_bf(v[5]) << 16);
    o.w = (u32)nn_bf(v[6]) | ((u32)nn_bf(v[7]) << 16);
    *reinterpret_cast<uint4*>(p + i) = o;
}

QS_DEV float nn_warp_sum(float v) { return qs_warp_reduce(v, QsSumF32{}); }

// Block-wide sum and max (blockDim.x a multiple of 32); every thread gets them. `sh` holds >= 32 floats.
QS_DEV float nn_block_sum(float v, float* sh) { return qs_block_reduce(v, sh, 0.0f, QsSumF32{}); }
QS_DEV float nn_block_maxf(float v, float* sh) { return qs_block_reduce(v, sh, -3.402823466e38f, QsMaxF32{}); }

// ---------------------------------------------------------------------------
// Conversions to bf16 (weights arrive in their stored dtype)
// ---------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_f32_to_bf16(const float* __restrict__ x, u16* __restrict__ y, i64 n) {
    for (i64 i = NN_TID; i < n; i += NN_STRIDE) y[i] = nn_bf(x[i]);
}

extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_f16_to_bf16(const u16* __restrict__ x, u16* __restrict__ y, i64 n) {
    for (i64 i = NN_TID; i < n; i += NN_STRIDE) y[i] = nn_bf(qs_f16_to_f32(x[i]));
}

// ---------------------------------------------------------------------------
// Elementwise
// ---------------------------------------------------------------------------

#define NN_ACT_SILU 0
#define NN_ACT_GELU 1
#define NN_ACT_QUICK_GELU 2
#define NN_ACT_GELU_TANH 3

QS_DEV float nn_gelu(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }

QS_DEV float nn_act1(float v, int kind) {
    if (kind == NN_ACT_SILU) return v / (1.0f + expf(-v));
    if (kind == NN_ACT_GELU) return nn_gelu(v);
    if (kind == NN_ACT_GELU_TANH) return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    return v / (1.0f + expf(-1.702f * v));
}

extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_act(const u16* __restrict__ x, u16* __restrict__ y, i64 n, int kind) {
    const i64 n8 = n >> 3;
    for (i64 c = NN_TID; c < n8; c += NN_STRIDE) {
        float v[8];
        nn_load8(x, c << 3, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = nn_act1(v[k], kind);
        nn_store8(y, c << 3, v);
    }
    for (i64 i = (n8 << 3) + NN_TID; i < n; i += NN_STRIDE) y[i] = nn_bf(nn_act1(nn_ld(x, i), kind));
}

extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_add(const u16* __restrict__ a, const u16* __restrict__ b, u16* __restrict__ y, i64 n) {
    const i64 n8 = n >> 3;
    for (i64 c = NN_TID; c < n8; c += NN_STRIDE) {
        float u[8], v[8];
        nn_load8(a, c << 3, u);
        nn_load8(b, c << 3, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) u[k] += v[k];
        nn_store8(y, c << 3, u);
    }
    for (i64 i = (n8 << 3) + NN_TID; i < n; i += NN_STRIDE) y[i] = nn_bf(nn_ld(a, i) + nn_ld(b, i));
}

extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_scale(const u16* __restrict__ a, u16* __restrict__ y, i64 n, float s) {
    const i64 n8 = n >> 3;
    for (i64 c = NN_TID; c < n8; c += NN_STRIDE) {
        float u[8];
        nn_load8(a, c << 3, u);
#pragma unroll
        for (int k = 0; k < 8; ++k) u[k] *= s;
        nn_store8(y, c << 3, u);
    }
    for (i64 i = (n8 << 3) + NN_TID; i < n; i += NN_STRIDE) y[i] = nn_bf(nn_ld(a, i) * s);
}

// y[i] = x[i] + b[(i / inner) % cmod]: Linear bias (inner 1, cmod = out),
// conv bias (inner = H*W, cmod = C), per-sample channel bias (inner = H*W,
// cmod = N*C). May run in place.
extern "C" __global__ void __launch_bounds__(NN_THREADS)
nn_add_bias(const u16* x, const u16* __restrict__ b, u16* y, i64 n, i64 inner, i64 cmod) {
    if ((inner & 7) == 0) {
        // Eight elements at a time share one bias value (one division per chunk).
        for (i64 c = NN_TID; c < (n >> 3); c += NN_STRIDE) {
            const i64 i = c << 3;
            const float bv = nn_ld(b, (i / inner) % cmod);
            float v[8];
            nn_load8(x, i, v);
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] += bv;
            nn_store8(y, i, v);
        }
        return;
    }
    for (i64 i = NN_TID; i < n; i += NN_STRIDE) y[i] = nn_bf(nn_ld(x, i) + nn_ld(b, (i / inner) % cmod));
}

// [rows, 2F] -> [rows, F]: a * gelu(g), a the first half, g the second.
extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_geglu(const u16* __restrict__ x, u16* __restrict__ y, i64 rows, i64 f) {
    const i64 n = rows * f;
    for (i64 i = NN_TID; i < n; i += NN_STRIDE) {
        const i64 r = i / f;
        const i64 c = i - r * f;
        const float a = nn_ld(x, r * 2 * f + c);
        const float g = nn_ld(x, r * 2 * f + f + c);
        y[i] = nn_bf(a * nn_gelu(g));
    }
}

// ---------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------

// [NC, H, W] -> [NC, 2H, 2W], nearest.
extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_upsample2x(const u16* __restrict__ x, u16* __restrict__ y, i64 nc, i64 h, i64 w) {
    const i64 w2 = 2 * w;
    const i64 n = nc * 4 * h * w;
    for (i64 i = NN_TID; i < n; i += NN_STRIDE) {
        const i64 ox = i % w2;
        const i64 t = i / w2;
        const i64 oy = t % (2 * h);
        const i64 p = t / (2 * h);
        y[i] = x[(p * h + (oy >> 1)) * w + (ox >> 1)];
    }
}

// rows x len elements of `src` (contiguous) into `dst` at row pitch `pitch`, column `off` (concat).
extern "C" __global__ void __launch_bounds__(NN_THREADS)
nn_copy_rows(const u16* __restrict__ src, u16* __restrict__ dst, i64 rows, i64 len, i64 pitch, i64 off) {
    if (((len | pitch | off) & 7) == 0) {
        // 16-byte pieces (tensors start 256-byte aligned).
        const i64 l8 = len >> 3;
        const i64 n8 = rows * l8;
        for (i64 i = NN_TID; i < n8; i += NN_STRIDE) {
            const i64 r = i / l8;
            *reinterpret_cast<uint4*>(dst + r * pitch + off + ((i - r * l8) << 3)) = reinterpret_cast<const uint4*>(src)[i];
        }
        return;
    }
    const i64 n = rows * len;
    for (i64 i = NN_TID; i < n; i += NN_STRIDE) {
        const i64 r = i / len;
        dst[r * pitch + off + (i - r * len)] = src[i];
    }
}

// [B, R, C] -> [B, C, R] through 32x32 shared tiles. Grid: x = tiles of the
// matrix (column tiles fastest), y = B. Block: 256 threads = 32 x 8.
extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_transpose(const u16* __restrict__ x, u16* __restrict__ y, i64 rows, i64 cols) {
    __shared__ u16 tile[32][33];
    const i64 tiles_c = (cols + 31) >> 5;
    const i64 tr = blockIdx.x / tiles_c;
    const i64 tc = blockIdx.x - tr * tiles_c;
    const i64 base = (i64)blockIdx.y * rows * cols;
    const int tx = threadIdx.x & 31;
    const int ty = threadIdx.x >> 5;
    for (int k = ty; k < 32; k += 8) {
        const i64 r = tr * 32 + k;
        const i64 c = tc * 32 + tx;
        if (r < rows && c < cols) tile[k][tx] = x[base + r * cols + c];
    }
    __syncthreads();
    for (int k = ty; k < 32; k += 8) {
        const i64 c = tc * 32 + k;
        const i64 r = tr * 32 + tx;
        if (r < rows && c < cols) y[base + c * rows + r] = tile[tx][k];
    }
}

// dst[r, :] = src[idx[r], :] (embedding lookup, token selection).
extern "C" __global__ void __launch_bounds__(NN_THREADS)
nn_gather_rows(const u16* __restrict__ src, const u32* __restrict__ idx, u16* __restrict__ dst, i64 rows, i64 cols) {
    const i64 n = rows * cols;
    for (i64 i = NN_TID; i < n; i += NN_STRIDE) {
        const i64 r = i / cols;
        dst[i] = src[(i64)idx[r] * cols + (i - r * cols)];
    }
}

// Convolution fallback: x [N, C, H, W] -> col [N, C*k*k, Ho*Wo] (zero padding).
extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_im2col(
    const u16* __restrict__ x, u16* __restrict__ col, i64 n_img, i64 c, i64 h, i64 w, int k, int stride, int pad, i64 ho, i64 wo) {
    const i64 hw = ho * wo;
    const i64 n = n_img * c * k * k * hw;
    for (i64 i = NN_TID; i < n; i += NN_STRIDE) {
        const i64 p = i % hw;
        i64 t = i / hw;
        const int kj = (int)(t % k);
        t /= k;
        const int ki = (int)(t % k);
        t /= k;  // t = img * c + ch
        const i64 oy = p / wo;
        const i64 ox = p - oy * wo;
        const i64 iy = oy * stride - pad + ki;
        const i64 ix = ox * stride - pad + kj;
        u16 v = 0;
        if (iy >= 0 && iy < h && ix >= 0 && ix < w) v = x[(t * h + iy) * w + ix];
        col[i] = v;
    }
}

// ---------------------------------------------------------------------------
// Norms
// ---------------------------------------------------------------------------

// GroupNorm, pass 1: each block reduces one chunk of one group (a group is
// contiguous: cg channels x HW) to (count, mean, M2), two passes over the
// chunk (the second hits L1/L2), so no catastrophic cancellation.
// Grid: groups_total * chunks.
extern "C" __global__ void __launch_bounds__(NN_THREADS)
nn_group_norm_stats(const u16* __restrict__ x, float* __restrict__ part, i64 group_len, i64 chunk, int chunks) {
    __shared__ float sh[32];
    const i64 g = blockIdx.x / chunks;
    const int k = blockIdx.x - g * chunks;
    const i64 start = g * group_len + (i64)k * chunk;
    const i64 len = min(chunk, group_len - (i64)k * chunk);
    const bool vec = ((start | len) & 7) == 0;
    float s = 0.0f;
    if (vec) {
        for (i64 i = threadIdx.x * 8; i < len; i += blockDim.x * 8) {
            float v[8];
            nn_load8(x, start + i, v);
#pragma unroll
            for (int e = 0; e < 8; ++e) s += v[e];
        }
    } else {
        for (i64 i = threadIdx.x; i < len; i += blockDim.x) s += nn_ld(x, start + i);
    }
    s = nn_block_sum(s, sh);
    const float mean = s / (float)len;
    float m2 = 0.0f;
    if (vec) {
        for (i64 i = threadIdx.x * 8; i < len; i += blockDim.x * 8) {
            float v[8];
            nn_load8(x, start + i, v);
#pragma unroll
            for (int e = 0; e < 8; ++e) m2 += (v[e] - mean) * (v[e] - mean);
        }
    } else {
        for (i64 i = threadIdx.x; i < len; i += blockDim.x) {
            const float d = nn_ld(x, start + i) - mean;
            m2 += d * d;
        }
    }
    m2 = nn_block_sum(m2, sh);
    if (threadIdx.x == 0) {
        part[3 * blockIdx.x] = (float)len;
        part[3 * blockIdx.x + 1] = mean;
        part[3 * blockIdx.x + 2] = m2;
    }
}

// GroupNorm, pass 2: merges the group's partials (Chan et al.) and normalises
// the block's chunk: y = (x - mean) * rstd * w[c] + b[c].
extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_group_norm_apply(
    const u16* __restrict__ x, const float* __restrict__ part, const u16* __restrict__ wt, const u16* __restrict__ bs,
    u16* __restrict__ y, i64 group_len, i64 chunk, int chunks, int groups, int cg, i64 hw, float eps) {
    const i64 g = blockIdx.x / chunks;
    const int k = blockIdx.x - g * chunks;
    float n = 0.0f, mean = 0.0f, m2 = 0.0f;
    for (int j = 0; j < chunks; ++j) {
        const float nb = part[3 * (g * chunks + j)];
        const float mb = part[3 * (g * chunks + j) + 1];
        const float qb = part[3 * (g * chunks + j) + 2];
        const float nt = n + nb;
        const float d = mb - mean;
        mean += d * (nb / nt);
        m2 += qb + d * d * (n * nb / nt);
        n = nt;
    }
    const float rstd = rsqrtf(m2 / n + eps);
    const i64 start = g * group_len + (i64)k * chunk;
    const i64 len = min(chunk, group_len - (i64)k * chunk);
    const int c0 = (int)(g % groups) * cg;
    // Offsets inside one group fit 32 bits (a group is cg * HW elements).
    const u32 off = (u32)((i64)k * chunk);
    const u32 hw32 = (u32)hw;
    if (((start | len | hw) & 7) == 0) {
        // Eight elements at a time lie in one channel.
        for (u32 i = threadIdx.x * 8; i < (u32)len; i += blockDim.x * 8) {
            const int c = c0 + (int)((off + i) / hw32);
            const float sc = rstd * nn_ld(wt, c);
            const float sf = nn_ld(bs, c) - mean * sc;
            float v[8];
            nn_load8(x, start + i, v);
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] = v[e] * sc + sf;
            nn_store8(y, start + i, v);
        }
    } else {
        for (u32 i = threadIdx.x; i < (u32)len; i += blockDim.x) {
            const int c = c0 + (int)((off + i) / hw32);
            const float v = (nn_ld(x, start + i) - mean) * rstd;
            y[start + i] = nn_bf(v * nn_ld(wt, c) + nn_ld(bs, c));
        }
    }
}

// LayerNorm over the last dimension, one warp a row (two passes in f32).
extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_layer_norm(
    const u16* __restrict__ x, const u16* __restrict__ wt, const u16* __restrict__ bs, u16* __restrict__ y, i64 rows, i64 cols,
    float eps) {
    const i64 r = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const u16* xr = x + r * cols;
    float s = 0.0f;
    for (i64 c = lane; c < cols; c += 32) s += nn_ld(xr, c);
    const float mean = nn_warp_sum(s) / (float)cols;
    float q = 0.0f;
    for (i64 c = lane; c < cols; c += 32) {
        const float d = nn_ld(xr, c) - mean;
        q += d * d;
    }
    const float rstd = rsqrtf(nn_warp_sum(q) / (float)cols + eps);
    u16* yr = y + r * cols;
    for (i64 c = lane; c < cols; c += 32) yr[c] = nn_bf((nn_ld(xr, c) - mean) * rstd * nn_ld(wt, c) + nn_ld(bs, c));
}

// ---------------------------------------------------------------------------
// Attention softmax: f32 scores (already scaled) -> bf16 probabilities
// ---------------------------------------------------------------------------

// One block a row of `cols` keys. Row r is query q0 + r % q_rows of its head;
// with `causal`, keys after the query get probability 0.
extern "C" __global__ void __launch_bounds__(NN_THREADS)
nn_softmax(const float* __restrict__ s, u16* __restrict__ p, i64 cols, i64 q_rows, i64 q0, int causal) {
    __shared__ float sh[32];
    const i64 r = blockIdx.x;
    const float* sr = s + r * cols;
    u16* pr = p + r * cols;
    const i64 valid = causal ? min(cols, q0 + r % q_rows + 1) : cols;
    float m = -3.402823466e38f;
    for (i64 c = threadIdx.x; c < valid; c += blockDim.x) m = fmaxf(m, sr[c]);
    m = nn_block_maxf(m, sh);
    float sum = 0.0f;
    for (i64 c = threadIdx.x; c < valid; c += blockDim.x) sum += __expf(sr[c] - m);
    sum = nn_block_sum(sum, sh);
    const float inv = 1.0f / sum;
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) pr[c] = c < valid ? nn_bf(__expf(sr[c] - m) * inv) : (u16)0;
}
