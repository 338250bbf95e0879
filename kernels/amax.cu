// amax kernels: per tensor, per row, per block.
//
// Results are |x| as f32 bit patterns (exact: |x| of a bf16/f16/f32 value is
// representable in f32). A non-finite input shows as bits >= 0x7f800000, which
// is how the host detects NaN and infinity without a second pass.

// Chunks of 8 elements; each block owns QS_TILE_CHUNKS consecutive chunks (no
// grid-stride loop), so the quantize pass that follows can walk the blocks in
// reverse and find the most recently read part of the tensor still in L2.
#define QS_THREADS 256
#define QS_UNROLL 4
#define QS_TILE_CHUNKS (QS_THREADS * QS_UNROLL)

// max |x| over n elements into *out (atomicMax; *out must start at 0).
// Grid: ceil(ceil(n / 8) / QS_TILE_CHUNKS) blocks of QS_THREADS.
template <int DT>
QS_DEV void qs_amax_tensor(const u8* __restrict__ x, i64 n, u32* __restrict__ out) {
    __shared__ u32 sh[32];
    u32 m = 0;
    const i64 full = n >> 3;
    const i64 c0 = (i64)blockIdx.x * QS_TILE_CHUNKS + threadIdx.x;
    if (c0 + (QS_UNROLL - 1) * QS_THREADS < full) {
        QsRaw8<DT> raw[QS_UNROLL];
#pragma unroll
        for (int u = 0; u < QS_UNROLL; ++u) qs_fetch8<DT>(x, (c0 + u * QS_THREADS) << 3, raw[u]);
#pragma unroll
        for (int u = 0; u < QS_UNROLL; ++u) {
            float v[8];
            qs_decode8<DT>(raw[u], v);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                u32 a = qs_abs_bits(v[k]);
                m = a > m ? a : m;
            }
        }
    } else {
        for (int u = 0; u < QS_UNROLL; ++u) {
            const i64 c = c0 + u * QS_THREADS;
            if (c < full) {
                float v[8];
                qs_load8<DT>(x, c << 3, v);
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    u32 a = qs_abs_bits(v[k]);
                    m = a > m ? a : m;
                }
            } else if (c == full) {
                for (i64 i = c << 3; i < n; ++i) {
                    u32 a = qs_abs_bits(qs_load1<DT>(x, i));
                    m = a > m ? a : m;
                }
            }
        }
    }
    m = qs_block_max(m, sh);
    if (threadIdx.x == 0 && m != 0) atomicMax(out, m);
}

// max |x| of each row of a [rows, cols] matrix into out[rows] (one block a row).
template <int DT>
QS_DEV void qs_amax_rows(const u8* __restrict__ x, i64 rows, i64 cols, u32* __restrict__ out) {
    __shared__ u32 sh[32];
    const bool vec = (cols & 7) == 0;
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const i64 base = r * cols;
        u32 m = 0;
        if (vec) {
            for (i64 c = threadIdx.x; c < (cols >> 3); c += blockDim.x) {
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
        if (threadIdx.x == 0) out[r] = m;
    }
}

// max |x| of each run of `block` elements along the rows of a [rows, cols]
// matrix zero-padded to a multiple of `block` columns: out[rows, ceil(cols/block)].
template <int DT>
QS_DEV void qs_amax_blocks(const u8* __restrict__ x, i64 rows, i64 cols, i64 block, u32* __restrict__ out) {
    const i64 nb = (cols + block - 1) / block;
    const i64 total = rows * nb;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / nb;
        const i64 c0 = (i - r * nb) * block;
        const i64 c1 = c0 + block < cols ? c0 + block : cols;
        u32 m = 0;
        for (i64 c = c0; c < c1; ++c) {
            u32 a = qs_abs_bits(qs_load1<DT>(x, r * cols + c));
            m = a > m ? a : m;
        }
        out[i] = m;
    }
}

#define QS_AMAX_INST(SUF, DT)                                                                          \
    extern "C" __global__ void __launch_bounds__(256) qs_amax_tensor_##SUF(const u8* x, i64 n, u32* out) { \
        qs_amax_tensor<DT>(x, n, out);                                                                 \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) qs_amax_rows_##SUF(const u8* x, i64 rows, i64 cols, u32* out) { \
        qs_amax_rows<DT>(x, rows, cols, out);                                                          \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) qs_amax_blocks_##SUF(const u8* x, i64 rows, i64 cols, i64 block, u32* out) { \
        qs_amax_blocks<DT>(x, rows, cols, block, out);                                                 \
    }

QS_AMAX_INST(f32, QS_F32)
QS_AMAX_INST(f16, QS_F16)
QS_AMAX_INST(bf16, QS_BF16)
