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
// Meant to spare the second pass most device-memory reads; on H200 it measured
// slower than the amax kernel followed by the quantize kernel (BENCHMARKS.md,
// GPU), so the backend uses it only when asked (FusedMode::Always). The
// numerics are the same functions as the two-kernel path: both give the same bytes.

#ifndef QS_FT
#define QS_FT 512  // threads per block = chunks per tile
#endif
#ifndef QS_FU
#define QS_FU 4    // tiles in flight per thread
#endif

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
    __shared__ u32 sh[32];
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
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    u32 a = qs_abs_bits(v[k]);
                    m = a > m ? a : m;
                }
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
    m = qs_block_max(m, sh);
    if (tid == 0 && m != 0) atomicMax(&scratch[0], m);

    // 2. every block's maximum is in
    qs_grid_barrier(&scratch[1]);
    const u32 amax_bits = *(volatile u32*)&scratch[0];

    // 3. quantize, last-read tiles first
    float scale, mul, s_t;
    int mode = 1;
    if constexpr (FMT == 0) {
        mode = qs_fp8_plan<DT>(qs_f(amax_bits), scale, mul);
        s_t = 0.0f;
    } else {
        scale = qs_int8_scale(amax_bits);
        s_t = qs_int8_math_scale<DT>(scale);
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
                    reinterpret_cast<u64*>(q)[c] = qs_int8_codes8<DT>(v, s_t);
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
    __shared__ u32 sh[32];
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
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                u32 a = qs_abs_bits(v[i]);
                m = a > m ? a : m;
            }
            const i64 lt = t + u - t0;
            if (k[u].fast && lt < cap) qs_cache_put<DT>(qs_cache, cap_chunks, lt * QS_FT + tid, k[u].raw);
        }
    }
    m = qs_block_max(m, sh);
    if (tid == 0 && m != 0) atomicMax(&scratch[0], m);

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
