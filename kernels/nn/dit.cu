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
