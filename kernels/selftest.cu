// Self-test: the hardware conversions used on the hot paths against the
// software reference versions, over every f32 bit pattern (and every f16).
// counts[0..5]: mismatches of bf16, f16, e4m3 (clamped input), f16 decode,
// branch-free e2m1 against torchao's (every non-NaN f32);
// first[0..5]: the smallest mismatching input bits of each (init 0xffffffff).

extern "C" __global__ void __launch_bounds__(256) qs_selftest_conversions(u32* counts, u32* first) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (1ull << 32); i += stride) {
        const u32 b = (u32)i;
        const float f = qs_f(b);
        if (f == f) {
            if (qs_f32_to_bf16(f) != qs_f32_to_bf16_sw(f)) {
                atomicAdd(&counts[0], 1u);
                atomicMin(&first[0], b);
            }
            if (qs_f32_to_f16(f) != qs_f32_to_f16_sw(f)) {
                atomicAdd(&counts[1], 1u);
                atomicMin(&first[1], b);
            }
        }
        // e4m3 sees clamped values (and NaN, handled in software)
        const float c = qs_clamp(f, -448.0f, 448.0f);
        const float c2 = (c == c) ? -c : c;  // the high half gets the negation
        const u16 hw = qs_f32x2_to_e4m3(c, c2);
        const u8 lo = qs_f32_to_e4m3_sw(c);
        const u8 hi = qs_f32_to_e4m3_sw(c2);
        if ((hw & 0xff) != lo || (hw >> 8) != hi) {
            atomicAdd(&counts[2], 1u);
            atomicMin(&first[2], b);
        }
        if (f == f && qs_f32_to_e2m1_fast(f) != qs_f32_to_e2m1(qs_clamp(f, -6.0f, 6.0f))) {
            atomicAdd(&counts[4], 1u);
            atomicMin(&first[4], b);
        }
        if (b < 65536u) {
            const u16 h = (u16)b;
            const float hw16 = qs_f16_to_f32(h);
            const float sw16 = qs_f16_to_f32_sw(h);
            const bool same = (hw16 != hw16 && sw16 != sw16) || qs_u(hw16) == qs_u(sw16);
            if (!same) {
                atomicAdd(&counts[3], 1u);
                atomicMin(&first[3], b);
            }
        }
    }
}
