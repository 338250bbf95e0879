// amax kernels: per tensor, per row, per block.
//
// Results are |x| as f32 bit patterns (exact: |x| of a bf16/f16/f32 value is
// representable in f32). A non-finite input shows as bits >= 0x7f800000, which
// is how the host detects NaN and infinity without a second pass.

// max |x| over n elements into *out (atomicMax; *out must start at 0).
// Grid: CudaBackend::flat_grid (a flat walk). The backend runs it on each
// upload piece as it lands, so a per-tensor quantization needs no second
// read of the tensor once it is on the device.
template <int DT>
QS_DEV void qs_amax_tensor(const u8* __restrict__ x, i64 n, u32* __restrict__ out) {
    u32 m = 0;
    qs_flat_walk<DT>(
        x, n, false, [&](i64, const float v[8]) { m = qs_max_abs<8>(v, m); },
        [&](i64 i) {
            const u32 a = qs_abs_bits(qs_load1<DT>(x, i));
            m = a > m ? a : m;
        });
    qs_block_fold_max(m, out);
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
                m = qs_max_abs<8>(v, m);
            }
        } else {
            for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
                const u32 a = qs_abs_bits(qs_load1<DT>(x, base + c));
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
            const u32 a = qs_abs_bits(qs_load1<DT>(x, r * cols + c));
            m = a > m ? a : m;
        }
        out[i] = m;
    }
}

#define QS_AMAX_INST(SUF, DT)                                                                          \
    extern "C" __global__ void __launch_bounds__(QS_THREADS) qs_amax_tensor_##SUF(const u8* x, i64 n, u32* out) { \
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
