// Fused single-launch quantization for the formats that need the tensor's
// amax before any output (FP8, INT8 per tensor, NVFP4).
//
// A persistent, cooperatively launched grid (every block resident at once):
//  1. each block reads its contiguous range of tiles once, folds max |x| into
//     scratch[0] and keeps the first `cap_tiles` tiles of raw input in shared
//     memory;
//  2. a grid-wide barrier (scratch[1], zeroed by the host before the launch);
//  3. each block quantizes its range in reverse: first the tiles it read last
//     (most likely still in L2), then the tiles in shared memory.
// Meant to spare the second pass most device-memory reads; on H200 and H100 it
// measured slower than the amax kernel followed by the quantize kernel, and
// the backend now takes the amax during the upload instead (BENCHMARKS.md,
// GPU), so it uses the fused kernels only when asked (FusedMode::Always). The
// numerics are the same functions as the other paths: all give the same bytes.

#ifndef QS_FT
#define QS_FT 512  // threads per block = chunks per tile
#endif
#ifndef QS_FU
#define QS_FU 4    // tiles in flight per thread
#endif

// The NVFP4 fused kernel walks the padded matrix in chunks of 8 elements
// (two lanes a 16-block), not in whole blocks as qs_nvfp4_quant does.

// Loads the 8 elements at padded position (r, c0); zero outside [rows, cols].
template <int DT>
QS_DEV void qs_load_padded8(const u8* __restrict__ x, i64 rows, i64 cols, i64 r, i64 c0, float v[8]) {
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = (r < rows && c0 + k < cols) ? qs_load1<DT>(x, r * cols + c0 + k) : 0.0f;
}

// The geometry of a padded block-format matrix, in chunks of 8 elements.
struct QsPadded {
    i64 rows, cols;  // logical
    i64 cpr;         // chunks per padded row
    i64 total;       // chunks in the padded matrix
    i64 ncb;         // tile columns of the swizzled scale layout
    bool vec;        // rows start 16-byte aligned: whole chunks load as vectors
};

QS_DEV QsPadded qs_padded(i64 rows, i64 cols, int block) {
    QsPadded g;
    g.rows = rows;
    g.cols = cols;
    const i64 rows_p = (rows + block - 1) / block * block;
    const i64 cols_p = (cols + block - 1) / block * block;
    g.cpr = cols_p >> 3;
    g.total = rows_p * g.cpr;
    g.ncb = ((cols_p / block) + 3) >> 2;
    g.vec = (cols & 7) == 0;
    return g;
}

// One chunk of a padded matrix: where it is, and its raw bytes when it is a
// whole in-bounds vector (`fast`); other live chunks are read element-wise.
template <int DT>
struct QsChunk {
    QsRaw8<DT> raw;
    i64 r, c0;
    bool live, fast;
};

// Locates chunk `c`.
template <int DT>
QS_DEV void qs_chunk_locate(const QsPadded& g, i64 c, QsChunk<DT>& k) {
    k.live = c < g.total;
    k.r = 0;
    k.c0 = 0;
    k.fast = false;
    if (k.live) {
        k.r = c / g.cpr;
        k.c0 = (c - k.r * g.cpr) << 3;
        k.fast = k.r < g.rows && g.vec && k.c0 < g.cols;
    }
}

// Locates chunk `c` and starts its vector load (the value is used later, so
// several loads are in flight before the first use).
template <int DT>
QS_DEV void qs_chunk_fetch(const u8* __restrict__ x, const QsPadded& g, i64 c, QsChunk<DT>& k) {
    qs_chunk_locate<DT>(g, c, k);
    if (k.fast) qs_fetch8<DT>(x, k.r * g.cols + k.c0, k.raw);
}

// The chunk's 8 values (zero in the padding).
template <int DT>
QS_DEV void qs_chunk_values(const u8* __restrict__ x, const QsPadded& g, const QsChunk<DT>& k, float v[8]) {
    if (k.fast) {
        qs_decode8<DT>(k.raw, v);
    } else if (k.live) {
        qs_load_padded8<DT>(x, g.rows, g.cols, k.r, k.c0, v);
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.0f;
    }
}

// Quantizes one chunk (8 values `v` at padded position (r, c0), output chunk
// index `c`) with qs_nvfp4_quant's numerics; the two lanes of a 16-block
// exchange their maxima, so all 32 lanes of the warp call this together
// (chunk index parity == lane parity).
QS_DEV void qs_nvfp4_chunk(const QsPadded& g, i64 c, bool live, i64 r, i64 c0, const float v[8], float s2,
                           u8* __restrict__ q, u8* __restrict__ scales) {
    u32 m = qs_max_abs<8>(v, 0);
    const u32 o = __shfl_xor_sync(0xffffffffu, m, 1);
    m = o > m ? o : m;
    const u8 code = qs_nvfp4_block_code(qs_f(m), s2);
    const float tot = __fmul_rn(s2, qs_e4m3_to_f32(code));
    const u32 packed = (u32)qs_nvfp4_pack<8>(v, tot);
    if (live) {
        reinterpret_cast<u32*>(q)[c] = packed;
        if ((threadIdx.x & 1) == 0) scales[qs_swizzle(r, c0 >> 4, g.ncb)] = code;
    }
}

// One-shot grid barrier: all blocks are resident (cooperative launch).
QS_DEV void qs_grid_barrier(u32* counter) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(counter, 1u);
        while (*(volatile u32*)counter < gridDim.x) {
            asm volatile("nanosleep.u32 64;");
        }
        __threadfence();
    }
    __syncthreads();
}

// Shared-memory cache of raw chunks: word a at [slot], word b (f32) at [cap + slot].
template <int DT>
QS_DEV void qs_cache_put(uint4* cache, i64 cap_chunks, i64 slot, const QsRaw8<DT>& r) {
    cache[slot] = r.a;
    if constexpr (DT == QS_F32) cache[cap_chunks + slot] = r.b;
}

template <int DT>
QS_DEV void qs_cache_get(const uint4* cache, i64 cap_chunks, i64 slot, QsRaw8<DT>& r) {
    r.a = cache[slot];
    if constexpr (DT == QS_F32) r.b = cache[cap_chunks + slot];
}

// This block's tiles: [t0, t1).
QS_DEV void qs_block_tiles(i64 ntiles, i64& t0, i64& t1) {
    t0 = ntiles * (i64)blockIdx.x / gridDim.x;
    t1 = ntiles * ((i64)blockIdx.x + 1) / gridDim.x;
}

// FMT 0: FP8 per tensor; FMT 1: INT8 per tensor.
template <int DT, int FMT>
QS_DEV void qs_fused_flat(const u8* __restrict__ x, i64 n, u32* scratch, u8* __restrict__ q,
                          float* __restrict__ scale_out, int cap_tiles) {
    extern __shared__ uint4 qs_cache[];
    const i64 full = n >> 3;
    const i64 ntiles = (((n + 7) >> 3) + QS_FT - 1) / QS_FT;
    i64 t0, t1;
    qs_block_tiles(ntiles, t0, t1);
    const int tid = threadIdx.x;
    const i64 cap = cap_tiles;
    const i64 cap_chunks = cap * QS_FT;

    // 1. amax, caching the first tiles
    u32 m = 0;
    for (i64 t = t0; t < t1; t += QS_FU) {
        QsRaw8<DT> raw[QS_FU];
#pragma unroll
        for (int u = 0; u < QS_FU; ++u) {
            const i64 c = (t + u) * QS_FT + tid;
            if (t + u < t1 && c < full) qs_fetch8<DT>(x, c << 3, raw[u]);
        }
#pragma unroll
        for (int u = 0; u < QS_FU; ++u) {
            const i64 c = (t + u) * QS_FT + tid;
            if (t + u < t1 && c < full) {
                float v[8];
                qs_decode8<DT>(raw[u], v);
                m = qs_max_abs<8>(v, m);
                const i64 lt = t + u - t0;
                if (lt < cap) qs_cache_put<DT>(qs_cache, cap_chunks, lt * QS_FT + tid, raw[u]);
            } else if (t + u < t1 && c == full) {
                for (i64 i = c << 3; i < n; ++i) {
                    u32 a = qs_abs_bits(qs_load1<DT>(x, i));
                    m = a > m ? a : m;
                }
            }
        }
    }
    qs_block_fold_max(m, &scratch[0]);

    // 2. every block's maximum is in
    qs_grid_barrier(&scratch[1]);
    const u32 amax_bits = *(volatile u32*)&scratch[0];

    // 3. quantize, last-read tiles first
    float scale, mul, s_t, y;
    int mode = 1;
    if constexpr (FMT == 0) {
        mode = qs_fp8_plan<DT>(qs_f(amax_bits), scale, mul);
        s_t = 0.0f;
        y = 0.0f;
    } else {
        scale = qs_int8_scale(amax_bits);
        s_t = qs_int8_math_scale<DT>(scale);
        y = qs_int8_recip(s_t);
        mul = 0.0f;
    }
    if (blockIdx.x == 0 && tid == 0) *scale_out = scale;
    for (i64 t = t1 - 1; t >= t0; t -= QS_FU) {
        QsRaw8<DT> raw[QS_FU];
#pragma unroll
        for (int u = 0; u < QS_FU; ++u) {
            const i64 tt = t - u;
            const i64 c = tt * QS_FT + tid;
            if (tt >= t0 && c < full) {
                const i64 lt = tt - t0;
                if (lt < cap) {
                    qs_cache_get<DT>(qs_cache, cap_chunks, lt * QS_FT + tid, raw[u]);
                } else {
                    qs_fetch8<DT>(x, c << 3, raw[u]);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < QS_FU; ++u) {
            const i64 tt = t - u;
            const i64 c = tt * QS_FT + tid;
            if (tt >= t0 && c < full) {
                float v[8];
                qs_decode8<DT>(raw[u], v);
                if constexpr (FMT == 0) {
                    u8 o[8];
                    qs_fp8_codes8<DT>(v, mul, mode, o);
                    reinterpret_cast<u64*>(q)[c] = qs_pack8(o);
                } else {
                    reinterpret_cast<u64*>(q)[c] = qs_int8_codes8_fast<DT>(v, s_t, y);
                }
            } else if (tt >= t0 && c == full) {
                for (i64 i = c << 3; i < n; ++i) {
                    const float xi = qs_load1<DT>(x, i);
                    if constexpr (FMT == 0) {
                        q[i] = mode == 0 ? 0 : (u8)(qs_f32x2_to_e4m3(qs_fp8_scaled<DT>(xi, mul, mode), 0.0f) & 0xff);
                    } else {
                        q[i] = qs_int8_code<DT>(xi, s_t);
                    }
                }
            }
        }
    }
}

// NVFP4 over the padded matrix; chunk c of tile t is t * QS_FT + threadIdx.x,
// so lane parity is chunk parity, as qs_nvfp4_chunk needs.
template <int DT>
QS_DEV void qs_fused_nvfp4(const u8* __restrict__ x, i64 rows, i64 cols, u32* scratch, u8* __restrict__ q,
                           u8* __restrict__ scales, float* __restrict__ s2_out, int cap_tiles) {
    extern __shared__ uint4 qs_cache[];
    const QsPadded g = qs_padded(rows, cols, 16);
    const i64 ntiles = (g.total + QS_FT - 1) / QS_FT;
    i64 t0, t1;
    qs_block_tiles(ntiles, t0, t1);
    const int tid = threadIdx.x;
    const i64 cap = cap_tiles;
    const i64 cap_chunks = cap * QS_FT;

    u32 m = 0;
    for (i64 t = t0; t < t1; t += QS_FU) {
        QsChunk<DT> k[QS_FU];
#pragma unroll
        for (int u = 0; u < QS_FU; ++u) {
            if (t + u < t1) {
                qs_chunk_fetch<DT>(x, g, (t + u) * QS_FT + tid, k[u]);
            } else {
                k[u].live = false;
                k[u].fast = false;
            }
        }
#pragma unroll
        for (int u = 0; u < QS_FU; ++u) {
            if (!k[u].live) continue;
            float v[8];
            qs_chunk_values<DT>(x, g, k[u], v);
            m = qs_max_abs<8>(v, m);
            const i64 lt = t + u - t0;
            if (k[u].fast && lt < cap) qs_cache_put<DT>(qs_cache, cap_chunks, lt * QS_FT + tid, k[u].raw);
        }
    }
    qs_block_fold_max(m, &scratch[0]);

    qs_grid_barrier(&scratch[1]);
    const u32 amax_bits = *(volatile u32*)&scratch[0];
    const float s2 = qs_nvfp4_global_scale<DT>(qs_f(amax_bits));
    if (blockIdx.x == 0 && tid == 0) *s2_out = s2;

    // uniform trip counts across the block (shuffles inside)
    for (i64 t = t1 - 1; t >= t0; t -= QS_FU) {
        QsChunk<DT> k[QS_FU];
#pragma unroll
        for (int u = 0; u < QS_FU; ++u) {
            const i64 tt = t - u;
            if (tt >= t0) {
                qs_chunk_locate<DT>(g, tt * QS_FT + tid, k[u]);
                const i64 lt = tt - t0;
                if (k[u].fast) {
                    if (lt < cap) {
                        qs_cache_get<DT>(qs_cache, cap_chunks, lt * QS_FT + tid, k[u].raw);
                    } else {
                        qs_fetch8<DT>(x, k[u].r * g.cols + k[u].c0, k[u].raw);
                    }
                }
            } else {
                k[u].live = false;
                k[u].fast = false;
            }
        }
#pragma unroll
        for (int u = 0; u < QS_FU; ++u) {
            const i64 tt = t - u;
            if (tt < t0) continue;  // uniform across the block
            float v[8];
            qs_chunk_values<DT>(x, g, k[u], v);
            qs_nvfp4_chunk(g, tt * QS_FT + tid, k[u].live, k[u].r, k[u].c0, v, s2, q, scales);
        }
    }
}

#define QS_FUSED_INST(SUF, DT)                                                                              \
    extern "C" __global__ void __launch_bounds__(QS_FT, 1)                                                   \
        qs_fused_fp8_##SUF(const u8* x, i64 n, u32* scratch, u8* q, float* scale_out, int cap_tiles) {       \
        qs_fused_flat<DT, 0>(x, n, scratch, q, scale_out, cap_tiles);                                        \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(QS_FT, 1)                                                   \
        qs_fused_int8_##SUF(const u8* x, i64 n, u32* scratch, u8* q, float* scale_out, int cap_tiles) {      \
        qs_fused_flat<DT, 1>(x, n, scratch, q, scale_out, cap_tiles);                                        \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(QS_FT, 1) qs_fused_nvfp4_##SUF(                             \
        const u8* x, i64 rows, i64 cols, u32* scratch, u8* q, u8* scales, float* s2_out, int cap_tiles) {    \
        qs_fused_nvfp4<DT>(x, rows, cols, scratch, q, scales, s2_out, cap_tiles);                            \
    }

QS_FUSED_INST(f32, QS_F32)
QS_FUSED_INST(f16, QS_F16)
QS_FUSED_INST(bf16, QS_BF16)
