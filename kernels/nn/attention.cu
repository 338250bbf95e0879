// Fused attention (FlashAttention-2 forward) on bf16 tensor cores.
//
// q [B, Nq, H*D], k/v [B, Nk, H*D] -> o [B, Nq, H*D]; softmax(QK^T / sqrt(D)) V
// without materialising the scores: each block owns 64 queries of one
// (batch, head), four warps of 16 query rows, and walks the keys in tiles of
// 64 with an online softmax in f32. Products use mma.sync m16n8k16 (bf16 in,
// f32 accumulate); the probabilities enter the PV product as bf16, as they do
// in the unfused path.
//
// Head dims are padded to DP (a multiple of 16, <= 128) with zeros; D must be
// a multiple of 8 so K and V rows move in 16-byte cp.async pieces. K and V
// tiles are double-streamed: V of a tile loads while QK^T runs, K of the next
// while PV runs. The host picks the instance nn_flash_attn_d<DP>.

#define FA_BQ 64
#define FA_BK 64
#define FA_THREADS 128

QS_DEV void fa_mma(float c[4], const u32 a[4], const u32 b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

QS_DEV u32 fa_smem(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// 2^x in one MUFU op (flushes denormal results to zero, which the softmax
// sums cannot tell apart).
QS_DEV float fa_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Four 8x8 b16 matrices; thread i addresses row i % 8 of matrix i / 8.
QS_DEV void fa_ldsm4(u32 r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fa_smem(row)));
}

// As fa_ldsm4, each matrix transposed.
QS_DEV void fa_ldsm4_t(u32 r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fa_smem(row)));
}

// 16 bytes global -> shared without passing through registers; `valid` false
// zero-fills the destination.
QS_DEV void fa_cp16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(fa_smem(dst)), "l"(src), "r"(valid ? 16 : 0));
}
QS_DEV void fa_cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
QS_DEV void fa_cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// Two floats to a bf16 pair in one instruction (round to nearest even, as
// qs_f32_to_bf16 for every non-NaN value; probabilities are never NaN).
QS_DEV u32 fa_pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// A bf16 pair of row `row` at even column `col` (zero outside the matrix).
QS_DEV u32 fa_ld2(const u16* __restrict__ base, i64 row, int col, i64 rows, int d, i64 ld) {
    if (row >= rows || col >= d) return 0u;
    return *reinterpret_cast<const u32*>(base + row * ld + col);
}

// One 64 x DP tile of K or V (rows k0.., head columns) into shared memory,
// zero-filled past the last key and past D. D % 8 == 0 keeps every 16-byte
// piece inside one row and aligned.
// ROWS x DP rows (from row r0, head columns) into shared memory with rows of
// DP + 8, zero-filled past the last row and past D. D % 8 == 0 keeps every
// 16-byte piece inside one row and aligned. When the block's threads tile a
// row evenly, each thread keeps one column and walks rows (no division).
template <int ROWS, int DP>
QS_DEV void fa_load_rows(u16* dst, const u16* __restrict__ src, i64 r0, i64 nrows, int d, i64 ld) {
    constexpr int PIECES = DP / 8;
    if constexpr (FA_THREADS % PIECES == 0) {
        constexpr int STEP = FA_THREADS / PIECES;
        const int col = 8 * (threadIdx.x % PIECES);
        const bool col_ok = col < d;
        const u16* p = src + (r0 + threadIdx.x / PIECES) * ld + col;
#pragma unroll
        for (int row = threadIdx.x / PIECES; row < ROWS; row += STEP, p += STEP * ld) {
            const bool valid = col_ok && r0 + row < nrows;
            fa_cp16(dst + row * (DP + 8) + col, valid ? p : src, valid);
        }
    } else {
        for (int i = threadIdx.x; i < ROWS * PIECES; i += FA_THREADS) {
            const int row = i / PIECES;
            const int col = 8 * (i - row * PIECES);
            const bool valid = r0 + row < nrows && col < d;
            fa_cp16(dst + row * (DP + 8) + col, valid ? src + (r0 + row) * ld + col : src, valid);
        }
    }
}

template <int DP>
QS_DEV void fa_forward(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, u16* __restrict__ o,
                       i64 nq, i64 nk, int heads, int d, float scale_log2, int causal) {
    __shared__ __align__(16) u16 ks[FA_BK][DP + 8];
    __shared__ __align__(16) u16 vs[FA_BK][DP + 8];
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int b = blockIdx.y / heads;
    const int h = blockIdx.y - b * heads;
    const i64 hd = (i64)heads * d;
    const u16* qb = q + (i64)b * nq * hd + (i64)h * d;
    const u16* kb = k + (i64)b * nk * hd + (i64)h * d;
    const u16* vb = v + (i64)b * nk * hd + (i64)h * d;
    const i64 q0 = (i64)blockIdx.x * FA_BQ;
    const i64 wq0 = q0 + warp * 16;
    const i64 r0 = wq0 + g;
    const i64 r1 = r0 + 8;

    const i64 kend = causal ? min(nk, q0 + FA_BQ) : nk;
    fa_load_rows<FA_BK, DP>(&ks[0][0], kb, 0, nk, d, hd);
    fa_cp_commit();

    u32 qf[DP / 16][4];
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
        qf[kk][0] = fa_ld2(qb, r0, kk * 16 + 2 * t, nq, d, hd);
        qf[kk][1] = fa_ld2(qb, r1, kk * 16 + 2 * t, nq, d, hd);
        qf[kk][2] = fa_ld2(qb, r0, kk * 16 + 2 * t + 8, nq, d, hd);
        qf[kk][3] = fa_ld2(qb, r1, kk * 16 + 2 * t + 8, nq, d, hd);
    }

    float acc[DP / 8][4];
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    float mrow[2] = {-3.402823466e38f, -3.402823466e38f};
    float lrow[2] = {0.0f, 0.0f};
    // Shared-memory rows this lane addresses in ldmatrix (see fa_ldsm4).
    const int mi = lane >> 3;
    const int mr = lane & 7;

    for (i64 k0 = 0; k0 < kend; k0 += FA_BK) {
        // V of this tile streams in while S is computed; K of the next while PV is.
        fa_load_rows<FA_BK, DP>(&vs[0][0], vb, k0, nk, d, hd);
        fa_cp_commit();
        fa_cp_wait<1>();
        __syncthreads();

        // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
        float s[FA_BK / 8][4];
#pragma unroll
        for (int j = 0; j < FA_BK / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) {
#pragma unroll
            for (int j = 0; j < FA_BK / 8; j += 2) {
                u32 r[4];
                fa_ldsm4(r, &ks[(j + (mi >> 1)) * 8 + mr][kk * 16 + (mi & 1) * 8]);
                const u32 b0[2] = {r[0], r[1]};
                const u32 b1[2] = {r[2], r[3]};
                fa_mma(s[j], qf[kk], b0);
                fa_mma(s[j + 1], qf[kk], b1);
            }
        }
        __syncthreads();  // every warp is done with ks
        if (k0 + FA_BK < kend) fa_load_rows<FA_BK, DP>(&ks[0][0], kb, k0 + FA_BK, nk, d, hd);
        fa_cp_commit();

        // Mask keys past the end (and, causal, after the query) only in the
        // tiles that have such keys for this warp; the scale into log2 units is
        // folded into the exponent's FMA (the row max scales with it, scale > 0).
        const bool masked = k0 + FA_BK > nk || (causal && k0 + FA_BK - 1 > wq0);
        float mx[2] = {-3.402823466e38f, -3.402823466e38f};
#pragma unroll
        for (int j = 0; j < FA_BK / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float val = s[j][e];
                if (masked) {
                    const i64 key = k0 + j * 8 + 2 * t + (e & 1);
                    const i64 row = e < 2 ? r0 : r1;
                    if (key >= nk || (causal && key > row)) val = -3.402823466e38f;
                }
                s[j][e] = val;
                mx[e >> 1] = fmaxf(mx[e >> 1], val);
            }
        }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float mnew = fmaxf(mrow[r], mx[r] * scale_log2);
            alpha[r] = fa_ex2(mrow[r] - mnew);
            mrow[r] = mnew;
        }
        // Key 0 is never masked, so every row's max is finite from the first
        // tile on and a masked score (-FLT_MAX) gives exp2 -> 0.
        float ls[2] = {0.0f, 0.0f};
#pragma unroll
        for (int j = 0; j < FA_BK / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = fa_ex2(fmaf(s[j][e], scale_log2, -mrow[e >> 1]));
                s[j][e] = p;
                ls[e >> 1] += p;
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) lrow[r] = lrow[r] * alpha[r] + ls[r];
#pragma unroll
        for (int n = 0; n < DP / 8; ++n) {
            acc[n][0] *= alpha[0];
            acc[n][1] *= alpha[0];
            acc[n][2] *= alpha[1];
            acc[n][3] *= alpha[1];
        }

        fa_cp_wait<1>();
        __syncthreads();
        // O += P V: the score fragments of key tiles (2kk, 2kk+1) are the A fragment of k-step kk.
#pragma unroll
        for (int kk = 0; kk < FA_BK / 16; ++kk) {
            u32 pa[4];
            pa[0] = fa_pack(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = fa_pack(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = fa_pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = fa_pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int n = 0; n < DP / 8; n += 2) {
                u32 r[4];
                fa_ldsm4_t(r, &vs[kk * 16 + (mi & 1) * 8 + mr][(n + (mi >> 1)) * 8]);
                const u32 b0[2] = {r[0], r[1]};
                const u32 b1[2] = {r[2], r[3]};
                fa_mma(acc[n], pa, b0);
                fa_mma(acc[n + 1], pa, b1);
            }
        }
        __syncthreads();  // every warp is done with vs
    }
    fa_cp_wait<0>();

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 1);
        lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 2);
    }
    const float inv0 = lrow[0] > 0.0f ? 1.0f / lrow[0] : 0.0f;
    const float inv1 = lrow[1] > 0.0f ? 1.0f / lrow[1] : 0.0f;
    u16* ob = o + (i64)b * nq * hd + (i64)h * d;
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) {
        const int col = n * 8 + 2 * t;
        if (col < d) {
            if (r0 < nq) *reinterpret_cast<u32*>(ob + r0 * hd + col) = fa_pack(acc[n][0] * inv0, acc[n][1] * inv0);
            if (r1 < nq) *reinterpret_cast<u32*>(ob + r1 * hd + col) = fa_pack(acc[n][2] * inv1, acc[n][3] * inv1);
        }
    }
}

// The wide variant: 128 queries per block, each of the four warps owning two
// 16-row m-tiles (32 queries), as FlashAttention-2 tiles its forward pass
// (kBlockM 128 over 4 warps). Every K and V fragment read from shared memory
// feeds two MMAs instead of one, and each K/V tile loaded from global memory
// serves twice the queries. Q lives in shared memory (dynamic, > 48 KB at
// DP 128) and is read as A fragments per k-step when DP > 64, kept in
// registers otherwise. BK is the key tile (32 or 64 rows).
#define FW_BQ 128

template <int DP, int BK>
QS_DEV void fw_forward(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, u16* __restrict__ o,
                       i64 nq, i64 nk, int heads, int d, float scale_log2, int causal) {
    constexpr int LD = DP + 8;
    constexpr bool QREGS = DP <= 64;
    extern __shared__ __align__(16) u16 fw_smem[];
    u16* qs = fw_smem;
    u16* ks = qs + FW_BQ * LD;
    u16* vs = ks + BK * LD;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int mi = lane >> 3;
    const int mr = lane & 7;
    const int b = blockIdx.y / heads;
    const int h = blockIdx.y - b * heads;
    const i64 hd = (i64)heads * d;
    const u16* qb = q + (i64)b * nq * hd + (i64)h * d;
    const u16* kb = k + (i64)b * nk * hd + (i64)h * d;
    const u16* vb = v + (i64)b * nk * hd + (i64)h * d;
    const i64 q0 = (i64)blockIdx.x * FW_BQ;
    const i64 wq0 = q0 + warp * 32;
    const i64 kend = causal ? min(nk, q0 + FW_BQ) : nk;

    fa_load_rows<FW_BQ, DP>(qs, qb, q0, nq, d, hd);
    fa_load_rows<BK, DP>(ks, kb, 0, nk, d, hd);
    fa_cp_commit();

    // A fragments of this warp's two m-tiles: matrix mi covers rows (mi & 1) * 8
    // and columns (mi >> 1) * 8 of a 16 x 16 piece.
    const u16* qrow = qs + (warp * 32 + (mi & 1) * 8 + mr) * LD + (mi >> 1) * 8;
    u32 qf[QREGS ? 2 : 1][QREGS ? DP / 16 : 1][4];

    float acc[2][DP / 8][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int n = 0; n < DP / 8; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.0f;
    float mrow[2][2], lrow[2][2];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
        mrow[m][0] = mrow[m][1] = -3.402823466e38f;
        lrow[m][0] = lrow[m][1] = 0.0f;
    }

    for (i64 k0 = 0; k0 < kend; k0 += BK) {
        fa_load_rows<BK, DP>(vs, vb, k0, nk, d, hd);
        fa_cp_commit();
        fa_cp_wait<1>();
        __syncthreads();
        if (QREGS && k0 == 0) {
#pragma unroll
            for (int m = 0; m < (QREGS ? 2 : 1); ++m)
#pragma unroll
                for (int kk = 0; kk < (QREGS ? DP / 16 : 1); ++kk) fa_ldsm4(qf[m][kk], qrow + m * 16 * LD + kk * 16);
        }

        float s[2][BK / 8][4];
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int j = 0; j < BK / 8; ++j) s[m][j][0] = s[m][j][1] = s[m][j][2] = s[m][j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) {
            u32 qa[2][4];
#pragma unroll
            for (int m = 0; m < 2; ++m) {
                if (QREGS) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) qa[m][e] = qf[QREGS ? m : 0][QREGS ? kk : 0][e];
                } else {
                    fa_ldsm4(qa[m], qrow + m * 16 * LD + kk * 16);
                }
            }
#pragma unroll
            for (int j = 0; j < BK / 8; j += 2) {
                u32 r[4];
                fa_ldsm4(r, ks + ((j + (mi >> 1)) * 8 + mr) * LD + kk * 16 + (mi & 1) * 8);
                const u32 b0[2] = {r[0], r[1]};
                const u32 b1[2] = {r[2], r[3]};
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    fa_mma(s[m][j], qa[m], b0);
                    fa_mma(s[m][j + 1], qa[m], b1);
                }
            }
        }
        __syncthreads();  // every warp is done with ks
        if (k0 + BK < kend) fa_load_rows<BK, DP>(ks, kb, k0 + BK, nk, d, hd);
        fa_cp_commit();

#pragma unroll
        for (int m = 0; m < 2; ++m) {
            const i64 r0 = wq0 + m * 16 + g;
            const bool masked = k0 + BK > nk || (causal && k0 + BK - 1 > wq0 + m * 16);
            float mx[2] = {-3.402823466e38f, -3.402823466e38f};
#pragma unroll
            for (int j = 0; j < BK / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float val = s[m][j][e];
                    if (masked) {
                        const i64 key = k0 + j * 8 + 2 * t + (e & 1);
                        const i64 row = e < 2 ? r0 : r0 + 8;
                        if (key >= nk || (causal && key > row)) val = -3.402823466e38f;
                    }
                    s[m][j][e] = val;
                    mx[e >> 1] = fmaxf(mx[e >> 1], val);
                }
            }
            float alpha[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                const float mnew = fmaxf(mrow[m][r], mx[r] * scale_log2);
                alpha[r] = fa_ex2(mrow[m][r] - mnew);
                mrow[m][r] = mnew;
            }
            // Key 0 is never masked (see fa_forward), so exp2 of a masked score is 0.
            float ls[2] = {0.0f, 0.0f};
#pragma unroll
            for (int j = 0; j < BK / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float p = fa_ex2(fmaf(s[m][j][e], scale_log2, -mrow[m][e >> 1]));
                    s[m][j][e] = p;
                    ls[e >> 1] += p;
                }
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) lrow[m][r] = lrow[m][r] * alpha[r] + ls[r];
#pragma unroll
            for (int n = 0; n < DP / 8; ++n) {
                acc[m][n][0] *= alpha[0];
                acc[m][n][1] *= alpha[0];
                acc[m][n][2] *= alpha[1];
                acc[m][n][3] *= alpha[1];
            }
        }

        fa_cp_wait<1>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            u32 pa[2][4];
#pragma unroll
            for (int m = 0; m < 2; ++m) {
                pa[m][0] = fa_pack(s[m][2 * kk][0], s[m][2 * kk][1]);
                pa[m][1] = fa_pack(s[m][2 * kk][2], s[m][2 * kk][3]);
                pa[m][2] = fa_pack(s[m][2 * kk + 1][0], s[m][2 * kk + 1][1]);
                pa[m][3] = fa_pack(s[m][2 * kk + 1][2], s[m][2 * kk + 1][3]);
            }
#pragma unroll
            for (int n = 0; n < DP / 8; n += 2) {
                u32 r[4];
                fa_ldsm4_t(r, vs + (kk * 16 + (mi & 1) * 8 + mr) * LD + (n + (mi >> 1)) * 8);
                const u32 b0[2] = {r[0], r[1]};
                const u32 b1[2] = {r[2], r[3]};
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    fa_mma(acc[m][n], pa[m], b0);
                    fa_mma(acc[m][n + 1], pa[m], b1);
                }
            }
        }
        __syncthreads();  // every warp is done with vs
    }
    fa_cp_wait<0>();

    u16* ob = o + (i64)b * nq * hd + (i64)h * d;
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            lrow[m][r] += __shfl_xor_sync(0xffffffffu, lrow[m][r], 1);
            lrow[m][r] += __shfl_xor_sync(0xffffffffu, lrow[m][r], 2);
        }
        const float inv0 = lrow[m][0] > 0.0f ? 1.0f / lrow[m][0] : 0.0f;
        const float inv1 = lrow[m][1] > 0.0f ? 1.0f / lrow[m][1] : 0.0f;
        const i64 r0 = wq0 + m * 16 + g;
        const i64 r1 = r0 + 8;
#pragma unroll
        for (int n = 0; n < DP / 8; ++n) {
            const int col = n * 8 + 2 * t;
            if (col < d) {
                if (r0 < nq) *reinterpret_cast<u32*>(ob + r0 * hd + col) = fa_pack(acc[m][n][0] * inv0, acc[m][n][1] * inv0);
                if (r1 < nq) *reinterpret_cast<u32*>(ob + r1 * hd + col) = fa_pack(acc[m][n][2] * inv1, acc[m][n][3] * inv1);
            }
        }
    }
}

#define FA_INSTANCE(DP)                                                                                                \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) nn_flash_attn_d##DP(                                     \
        const u16* q, const u16* k, const u16* v, u16* o, i64 nq, i64 nk, int heads, int d, float scale_log2, int causal) { \
        fa_forward<DP>(q, k, v, o, nq, nk, heads, d, scale_log2, causal);                                              \
    }

// The same with a register cap for MB resident blocks per multiprocessor.
#define FA_INSTANCE_MB(DP, MB)                                                                                         \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, MB) nn_flash_attn_d##DP##_b##MB(                         \
        const u16* q, const u16* k, const u16* v, u16* o, i64 nq, i64 nk, int heads, int d, float scale_log2, int causal) { \
        fa_forward<DP>(q, k, v, o, nq, nk, heads, d, scale_log2, causal);                                              \
    }

FA_INSTANCE(32)
FA_INSTANCE(48)
FA_INSTANCE(64)
FA_INSTANCE(80)
FA_INSTANCE(96)
FA_INSTANCE(128)
FA_INSTANCE_MB(64, 4)
FA_INSTANCE_MB(128, 3)

// Dynamic shared memory: (128 + 2 * BK) rows of DP + 8 bf16 (fw_smem_bytes on the host).
#define FW_INSTANCE(DP, BK)                                                                                            \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) nn_flash_attn_wide_d##DP##_k##BK(                        \
        const u16* q, const u16* k, const u16* v, u16* o, i64 nq, i64 nk, int heads, int d, float scale_log2, int causal) { \
        fw_forward<DP, BK>(q, k, v, o, nq, nk, heads, d, scale_log2, causal);                                          \
    }

FW_INSTANCE(32, 64)
FW_INSTANCE(48, 64)
FW_INSTANCE(64, 64)
FW_INSTANCE(80, 64)
FW_INSTANCE(96, 64)
FW_INSTANCE(128, 64)
FW_INSTANCE(128, 32)
