// Diffusion-transformer and T5 kernels of the CUDA `nn::Ops` backend
// (host/src/nn/cuda.rs): RMSNorm, products, narrow/permute copies, adaLN
// modulation and gated residuals, rotary embeddings, and the biased softmax
// of T5's attention. Semantics: the `Ops` contract in host/src/nn/mod.rs
// (FLUX's from BFL flux/modules/layers.py and flux/math.py, T5's from
// transformers' modeling_t5.py). Appended after ops.cu, whose helpers
// (nn_ld, nn_bf, nn_load8, nn_store8, reductions) it uses; bf16 in and out,
// f32 inside.

// RMSNorm over the last dimension, one warp a row: x / sqrt(mean(x^2) + eps) * w.
extern "C" __global__ void __launch_bounds__(NN_THREADS)
nn_rms_norm(const u16* __restrict__ x, const u16* __restrict__ wt, u16* __restrict__ y, i64 rows, i64 cols, float eps) {
    const i64 r = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const u16* xr = x + r * cols;
    float q = 0.0f;
    for (i64 c = lane; c < cols; c += 32) {
        const float v = nn_ld(xr, c);
        q += v * v;
    }
    const float rstd = rsqrtf(nn_warp_sum(q) / (float)cols + eps);
    u16* yr = y + r * cols;
    for (i64 c = lane; c < cols; c += 32) yr[c] = nn_bf(nn_ld(xr, c) * rstd * nn_ld(wt, c));
}

extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_mul(const u16* __restrict__ a, const u16* __restrict__ b, u16* __restrict__ y, i64 n) {
    const i64 n8 = n >> 3;
    for (i64 c = NN_TID; c < n8; c += NN_STRIDE) {
        float u[8], v[8];
        nn_load8(a, c << 3, u);
        nn_load8(b, c << 3, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) u[k] *= v[k];
        nn_store8(y, c << 3, u);
    }
    for (i64 i = (n8 << 3) + NN_TID; i < n; i += NN_STRIDE) y[i] = nn_bf(nn_ld(a, i) * nn_ld(b, i));
}

// Up to six dimensions of a permuted copy: for output element i (row-major
// over `dims`), the input offset is sum(index_k * strides_k).
struct NnPermute {
    i64 dims[6];
    i64 strides[6];
    int rank;
};

extern "C" __global__ void __launch_bounds__(NN_THREADS)
nn_permute(const u16* __restrict__ x, u16* __restrict__ y, i64 n, NnPermute p) {
    for (i64 i = NN_TID; i < n; i += NN_STRIDE) {
        i64 rest = i;
        i64 src = 0;
        for (int k = p.rank - 1; k >= 0; --k) {
            const i64 q = rest / p.dims[k];
            src += (rest - q * p.dims[k]) * p.strides[k];
            rest = q;
        }
        y[i] = x[src];
    }
}

// x viewed as [outer, dim * inner]: y[o, :] = x[o, start * inner .. (start + len) * inner] (narrow).
extern "C" __global__ void __launch_bounds__(NN_THREADS)
nn_narrow(const u16* __restrict__ x, u16* __restrict__ y, i64 outer, i64 src_row, i64 len, i64 off) {
    if (((src_row | len | off) & 7) == 0) {
        // 16-byte pieces (tensors start 256-byte aligned).
        const i64 l8 = len >> 3;
        const i64 n8 = outer * l8;
        for (i64 i = NN_TID; i < n8; i += NN_STRIDE) {
            const i64 r = i / l8;
            reinterpret_cast<uint4*>(y)[i] = *reinterpret_cast<const uint4*>(x + r * src_row + off + ((i - r * l8) << 3));
        }
        return;
    }
    const i64 n = outer * len;
    for (i64 i = NN_TID; i < n; i += NN_STRIDE) {
        const i64 r = i / len;
        y[i] = x[r * src_row + off + (i - r * len)];
    }
}

// adaLN: y[b, n, c] = x[b, n, c] * (1 + scale[b, c]) + shift[b, c].
extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_modulate(
    const u16* __restrict__ x, const u16* __restrict__ shift, const u16* __restrict__ scale, u16* __restrict__ y, i64 total,
    i64 tokens, i64 cols) {
    if ((cols & 7) == 0) {
        for (i64 ch = NN_TID; ch < (total >> 3); ch += NN_STRIDE) {
            const i64 i = ch << 3;
            const i64 bc = (i / (tokens * cols)) * cols + i % cols;
            float v[8], sc[8], sh[8];
            nn_load8(x, i, v);
            nn_load8(scale, bc, sc);
            nn_load8(shift, bc, sh);
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] = v[k] * (1.0f + sc[k]) + sh[k];
            nn_store8(y, i, v);
        }
        return;
    }
    for (i64 i = NN_TID; i < total; i += NN_STRIDE) {
        const i64 c = i % cols;
        const i64 bc = (i / (tokens * cols)) * cols + c;
        y[i] = nn_bf(nn_ld(x, i) * (1.0f + nn_ld(scale, bc)) + nn_ld(shift, bc));
    }
}

// Gated residual: out[b, n, c] = x[b, n, c] + gate[b, c] * y[b, n, c].
extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_gated_add(
    const u16* __restrict__ x, const u16* __restrict__ gate, const u16* __restrict__ y, u16* __restrict__ out, i64 total,
    i64 tokens, i64 cols) {
    if ((cols & 7) == 0) {
        for (i64 ch = NN_TID; ch < (total >> 3); ch += NN_STRIDE) {
            const i64 i = ch << 3;
            const i64 bc = (i / (tokens * cols)) * cols + i % cols;
            float u[8], g[8], v[8];
            nn_load8(x, i, u);
            nn_load8(gate, bc, g);
            nn_load8(y, i, v);
#pragma unroll
            for (int k = 0; k < 8; ++k) u[k] = u[k] + g[k] * v[k];
            nn_store8(out, i, u);
        }
        return;
    }
    for (i64 i = NN_TID; i < total; i += NN_STRIDE) {
        const i64 c = i % cols;
        const i64 bc = (i / (tokens * cols)) * cols + c;
        out[i] = nn_bf(nn_ld(x, i) + nn_ld(gate, bc) * nn_ld(y, i));
    }
}

// Rotary embedding on adjacent pairs, x [B, N, heads * 2 * half], cos/sin [N, half]:
// (x0, x1) -> (cos x0 - sin x1, sin x0 + cos x1), each head alike.
extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_rope(
    const u16* __restrict__ x, const u16* __restrict__ cs, const u16* __restrict__ sn, u16* __restrict__ y, i64 pairs,
    i64 tokens, int heads, int half) {
    for (i64 i = NN_TID; i < pairs; i += NN_STRIDE) {
        const i64 row = i / ((i64)heads * half);  // b * N + n
        const int j = (int)(i % half);
        const i64 n = row % tokens;
        const float c = nn_ld(cs, n * half + j);
        const float s = nn_ld(sn, n * half + j);
        const float x0 = nn_ld(x, 2 * i);
        const float x1 = nn_ld(x, 2 * i + 1);
        y[2 * i] = nn_bf(c * x0 - s * x1);
        y[2 * i + 1] = nn_bf(s * x0 + c * x1);
    }
}

// Softmax of f32 scores (already scaled) plus a bf16 bias, to bf16
// probabilities; one block a row. Row r is query r % q_rows of head
// r / q_rows of the chunk; `bias` points at the chunk's first head and query,
// `head_pitch` = Nq * Nk elements apart, rows `cols` apart.
extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_softmax_bias(
    const float* __restrict__ s, const u16* __restrict__ bias, u16* __restrict__ p, i64 cols, i64 q_rows, i64 head_pitch) {
    __shared__ float sh[32];
    const i64 r = blockIdx.x;
    const float* sr = s + r * cols;
    const u16* br = bias + (r / q_rows) * head_pitch + (r % q_rows) * cols;
    u16* pr = p + r * cols;
    float m = -3.402823466e38f;
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, sr[c] + nn_ld(br, c));
    m = nn_block_maxf(m, sh);
    float sum = 0.0f;
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) sum += __expf(sr[c] + nn_ld(br, c) - m);
    sum = nn_block_sum(sum, sh);
    const float inv = 1.0f / sum;
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) pr[c] = nn_bf(__expf(sr[c] + nn_ld(br, c) - m) * inv);
}

// ---------------------------------------------------------------------------
// Fused diffusion-transformer ops (Ops::ln_modulate, qkv_heads, concat_act).
// Each rounds to bf16 where the unfused kernels they replace stored bf16
// (after the LayerNorm, after the RMSNorm), so results match the unfused CUDA
// path up to reduction order.
// ---------------------------------------------------------------------------

// LayerNorm without affine, then adaLN modulation, one warp a row of x [B, N, C]
// (C % 8 == 0): y = bf16(LN(x)) * (1 + scale[b]) + shift[b].
extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_ln_modulate(
    const u16* __restrict__ x, const u16* __restrict__ shift, const u16* __restrict__ scale, u16* __restrict__ y, i64 rows,
    i64 tokens, i64 cols, float eps) {
    const i64 r = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const u16* xr = x + r * cols;
    float s = 0.0f;
    for (i64 c = lane * 8; c < cols; c += 256) {
        float v[8];
        nn_load8(xr, c, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) s += v[k];
    }
    const float mean = nn_warp_sum(s) / (float)cols;
    float q = 0.0f;
    for (i64 c = lane * 8; c < cols; c += 256) {
        float v[8];
        nn_load8(xr, c, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) q += (v[k] - mean) * (v[k] - mean);
    }
    const float rstd = rsqrtf(nn_warp_sum(q) / (float)cols + eps);
    const i64 bo = (r / tokens) * cols;
    u16* yr = y + r * cols;
    for (i64 c = lane * 8; c < cols; c += 256) {
        float v[8], sc[8], sh[8];
        nn_load8(xr, c, v);
        nn_load8(scale, bo + c, sc);
        nn_load8(shift, bo + c, sh);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = qs_bf16_to_f32(nn_bf((v[k] - mean) * rstd)) * (1.0f + sc[k]) + sh[k];
        nn_store8(yr, c, v);
    }
}

// q, k, v of one part of a joint attention from its fused projection
// src [B, n_part, ld] (q | k | v in the first 3 * heads * d columns). One warp a
// (which, row, head), which 0 = q, 1 = k, 2 = v; the head goes to token
// tok_off + t of the [B, n_total, heads * d] outputs. q and k: RMSNorm per head
// with qw / kw (skipped when null), stored to bf16 as the rms_norm kernel does,
// then RoPE on adjacent pairs with cos/sin [n_total, d / 2] (skipped when null).
// d even and <= 256 (at most 4 pairs a lane).
extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_qkv_heads(
    const u16* __restrict__ src, i64 ld, i64 rows, i64 n_part, i64 n_total, i64 tok_off, int heads, int d,
    const u16* __restrict__ qw, const u16* __restrict__ kw, const u16* __restrict__ cs, const u16* __restrict__ sn,
    float eps, u16* __restrict__ q, u16* __restrict__ k, u16* __restrict__ v) {
    const i64 wid = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 per = rows * heads;
    if (wid >= 3 * per) return;
    const int which = (int)(wid / per);
    const i64 rem = wid - which * per;
    const i64 row = rem / heads;
    const int h = (int)(rem - row * heads);
    const i64 b = row / n_part;
    const i64 n = tok_off + (row - b * n_part);
    const i64 width = (i64)heads * d;
    const int half = d >> 1;
    const u32* xs = reinterpret_cast<const u32*>(src + row * ld + which * width + (i64)h * d);
    u32* dst = reinterpret_cast<u32*>((which == 0 ? q : which == 1 ? k : v) + (b * n_total + n) * width + (i64)h * d);
    if (which == 2) {
        for (int p = lane; p < half; p += 32) dst[p] = xs[p];
        return;
    }
    float x0[4], x1[4];
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int p = lane + 32 * i;
        const u32 pair = p < half ? xs[p] : 0u;
        x0[i] = qs_bf16_to_f32((u16)(pair & 0xffffu));
        x1[i] = qs_bf16_to_f32((u16)(pair >> 16));
        ss += x0[i] * x0[i] + x1[i] * x1[i];
    }
    const u16* w = which == 0 ? qw : kw;
    if (w != nullptr) {
        const float rstd = rsqrtf(nn_warp_sum(ss) / (float)d + eps);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int p = lane + 32 * i;
            if (p < half) {
                x0[i] = qs_bf16_to_f32(nn_bf(x0[i] * rstd * nn_ld(w, 2 * p)));
                x1[i] = qs_bf16_to_f32(nn_bf(x1[i] * rstd * nn_ld(w, 2 * p + 1)));
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int p = lane + 32 * i;
        if (p >= half) continue;
        float y0 = x0[i], y1 = x1[i];
        if (cs != nullptr) {
            const float c = nn_ld(cs, n * half + p);
            const float s = nn_ld(sn, n * half + p);
            y0 = c * x0[i] - s * x1[i];
            y1 = s * x0[i] + c * x1[i];
        }
        dst[p] = (u32)nn_bf(y0) | ((u32)nn_bf(y1) << 16);
    }
}

// y [rows, a_cols + len] = [a[row, :], act(x[row, start .. start + len])], x
// [rows, x_cols]; a_cols, x_cols, start and len multiples of 8.
extern "C" __global__ void __launch_bounds__(NN_THREADS) nn_concat_act(
    const u16* __restrict__ a, const u16* __restrict__ x, u16* __restrict__ y, i64 rows, i64 a_cols, i64 x_cols, i64 start,
    i64 len, int kind) {
    const i64 cols = a_cols + len;
    const i64 c8 = cols >> 3;
    const i64 n8 = rows * c8;
    for (i64 i = NN_TID; i < n8; i += NN_STRIDE) {
        const i64 r = i / c8;
        const i64 c = (i - r * c8) << 3;
        if (c < a_cols) {
            reinterpret_cast<uint4*>(y)[i] = *reinterpret_cast<const uint4*>(a + r * a_cols + c);
        } else {
            float v[8];
            nn_load8(x, r * x_cols + start + (c - a_cols), v);
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] = nn_act1(v[k], kind);
            nn_store8(y, r * cols + c, v);
        }
    }
}
