//! `nvfp4`: E2M1 codes in blocks of 16 along the input dimension, one E4M3
//! scale per block (cuBLAS swizzled layout) and one F32 global scale.
//!
//! comfy-kitchen (`TensorCoreNVFP4Layout.quantize` + eager `quantize_nvfp4`),
//! for a source of dtype T padded with zeros to `[roundup(rows,16), roundup(cols,16)]`:
//! ```text
//! s2    = T(amax / 2688)                         # 448·6; stored as F32
//! sbs   = min((f32(bmax) / 6) / s2, 448)         # f32, per block
//! code  = e4m3(sbs)                              # the stored block scale
//! total = s2 · f32(code)
//! q     = total == 0 ? 0 : e2m1(clamp(f32(x) / total, -6, 6))
//! ```
//! Codes are packed two per byte, element 2i in the high nibble.
//!
//! Deviation: comfy-kitchen divides by `s2` unguarded, so an all-zero tensor
//! (or an F16 one with amax below about 8e-5, where `s2` rounds to 0 in F16)
//! gives NaN block scales and codes. We use the f32 value `amax / 2688` when
//! T rounds it to 0 (what comfy-kitchen computes for the tensor in f32) and
//! `s2 = 1.0` when that is 0 too (all-zero tensors): every block then follows
//! comfy-kitchen's own zero-block rule (scale code 0, codes 0), no NaN.

use rayon::prelude::*;
use safetensors::Dtype;

use super::numerics::{
    self, BOUND_SLACK, E2M1_MAX, E4M3_MAX, Src, blocked_index, blocked_shape, e2m1_from_f32_fast, e2m1_half_step, e2m1_to_f32,
    e4m3_from_f32, e4m3_from_f32_sat, e4m3_to_f32, finite_amax, fmax, fmin, roundup, with_src,
};
use super::{ErrorStats, Format, QuantError, QuantFormat, StoredSpec, StoredTensor, WeightView};

/// Elements per block scale.
pub const BLOCK: u32 = 16;
const B: usize = BLOCK as usize;

pub struct Nvfp4;

/// `448 · 6`: the global scale maps amax onto the largest block scale times
/// the largest E2M1 value.
const GLOBAL_DIV: f32 = E4M3_MAX * E2M1_MAX;

/// The global scale `s2` for magnitude `amax` (see the module comment for the fallbacks).
pub(crate) fn global_scale<T: Src>(amax: f32) -> f32 {
    let s2 = T::round(amax / GLOBAL_DIV);
    if s2 != 0.0 {
        return s2;
    }
    let s2 = amax / GLOBAL_DIV;
    if s2 != 0.0 { s2 } else { 1.0 }
}

/// Quantizes one row (`x`, zero-padded to whole blocks) into packed codes
/// `out` and E4M3 block scale codes `scales`. Each step runs over the whole
/// row so it vectorizes across blocks, not just within one.
#[inline(always)]
fn encode_row(x: &[f32], s2: f32, totals: &mut [f32], scales: &mut [u8], out: &mut [u8]) {
    for ((code, total), x) in scales.iter_mut().zip(totals.iter_mut()).zip(x.chunks_exact(B)) {
        let bmax = numerics::max_abs(x);
        *code = e4m3_from_f32_sat(fmin(bmax / E2M1_MAX / s2, E4M3_MAX));
        *total = s2 * e4m3_to_f32(*code);
    }
    for ((out, x), &total) in out.chunks_exact_mut(B / 2).zip(x.chunks_exact(B)).zip(totals.iter()) {
        let mut q = [0u8; B];
        for (q, &x) in q.iter_mut().zip(x) {
            *q = e2m1_from_f32_fast((x / total).clamp(-E2M1_MAX, E2M1_MAX));
        }
        // A zero total (zero block, or a scale that rounded to 0) gives zero
        // codes; the division above made NaN or infinities there.
        let keep = if total == 0.0 { 0 } else { 0xFF };
        for (o, pair) in out.iter_mut().zip(q.chunks_exact(2)) {
            *o = ((pair[0] << 4) | pair[1]) & keep;
        }
    }
}

fn e4m3_table() -> [f32; 256] {
    std::array::from_fn(|c| e4m3_to_f32(c as u8))
}

/// Padded data shape `(rows, cols)` and block columns.
fn dims(rows: usize, cols: usize) -> (usize, usize, usize) {
    let (pr, pc) = (roundup(rows, B), roundup(cols, B));
    (pr, pc, pc / B)
}

fn quantize_t<T: Src>(w: &WeightView<'_>) -> Result<Vec<StoredTensor>, QuantError> {
    let amax = T::to_f32(finite_amax::<T>(w)?);
    let s2 = global_scale::<T>(amax);
    let (rows, cols) = (w.rows, w.cols);
    let (pr, pc, nb) = dims(rows, cols);
    let (sr, sc) = blocked_shape(pr, nb);
    let mut data = vec![0u8; pr * pc / 2];
    let mut scales = vec![0u8; sr * sc];
    numerics::quantize_block_rows::<T>(w, pc, pc / 2, nb, sc, &mut data, &mut scales, |x, totals, codes, drow| {
        encode_row(x, s2, totals, codes, drow)
    });
    let [wspec, sspec, s2spec]: [StoredSpec; 3] = Nvfp4.layout(rows, cols).try_into().unwrap();
    Ok(vec![
        StoredTensor { spec: wspec, data },
        StoredTensor { spec: sspec, data: scales },
        StoredTensor { spec: s2spec, data: s2.to_le_bytes().to_vec() },
    ])
}

/// The code of element `(r, c)` in packed data with `pc` padded columns.
fn nibble(data: &[u8], pc: usize, r: usize, c: usize) -> u8 {
    let byte = data[r * pc / 2 + c / 2];
    if c.is_multiple_of(2) { byte >> 4 } else { byte & 0x0F }
}

fn verify_t<T: Src>(w: &WeightView<'_>, tensors: &[StoredTensor]) -> Result<ErrorStats, String> {
    numerics::check_view(w).map_err(|e| e.to_string())?;
    let (rows, cols) = (w.rows, w.cols);
    let (pr, pc, nb) = dims(rows, cols);
    let (sr, sc) = blocked_shape(pr, nb);
    let layout = Nvfp4.layout(rows, cols);
    let data = &numerics::stored(tensors, &layout, "weight")?.data;
    let blocked = &numerics::stored(tensors, &layout, "weight_scale")?.data;
    let s2 = numerics::f32_at(&numerics::stored(tensors, &layout, "weight_scale_2")?.data, 0);
    let name = w.name;

    // s2 = T(amax / 2688), its f32 value after the fallback, or 1.0 for (near-)zero tensors.
    let amax_bits = numerics::amax_bits::<T>(w.bytes);
    if amax_bits >= T::NONFINITE {
        return Err(format!("{name}: the source holds NaN or infinity"));
    }
    let amax = T::to_f32(amax_bits) as f64;
    let (lo, hi) = numerics::scale_interval::<T>(amax / GLOBAL_DIV as f64, 2f64.powi(-23));
    let tiny = amax < 2f64.powi(-137);
    if !((s2 > 0.0 && s2 as f64 >= lo && s2 as f64 <= hi) || (tiny && s2 == 1.0)) {
        return Err(format!("{name}: weight_scale_2 {s2:e} is not amax/2688 = {:e}", amax / GLOBAL_DIV as f64));
    }

    // Padding: zero codes beyond the weight, zero scales beyond the blocks.
    numerics::check_scale_padding(name, blocked, rows, nb, sr, sc)?;
    if data[rows * pc / 2..].iter().any(|&b| b != 0) {
        return Err(format!("{name}: a padding row holds nonzero codes"));
    }
    for r in 0..rows {
        for c in cols..pc {
            if nibble(data, pc, r, c) != 0 {
                return Err(format!("{name}: padding code [{r}, {c}] is not zero"));
            }
        }
    }

    let values = e4m3_table();
    let (rel_lo, rel_hi) = (1.0 - 2f64.powi(-22), 1.0 + 2f64.powi(-22));
    numerics::verify_rows::<T, _>(w, |r, x, d, bound| {
        let row = &data[r * pc / 2..(r + 1) * pc / 2];
        for (b, ((x, d), bound)) in x.chunks(B).zip(d.chunks_mut(B)).zip(bound.chunks_mut(B)).enumerate() {
            // The block scale must be an E4M3 rounding of min(bmax / 6 / s2, 448):
            // the quantizer's own f32 result, or one within the f32 roundings.
            let code = blocked[blocked_index(r, b, nb)];
            let bs = values[code as usize];
            let bmax = numerics::max_abs(x);
            if code != e4m3_from_f32(fmin(bmax / E2M1_MAX / s2, E4M3_MAX)) {
                let want = (bmax as f64 / E2M1_MAX as f64 / s2 as f64).min(E4M3_MAX as f64);
                let lo = values[e4m3_from_f32((want * rel_lo) as f32) as usize];
                let hi = values[e4m3_from_f32((want * rel_hi).min(448.0) as f32) as usize];
                if !(bs >= lo && bs <= hi) {
                    return Err(format!("block scale [{r}, {b}] = {bs:e}, expected e4m3({want:e})"));
                }
            }
            let t = s2 * bs;
            let packed = &row[b * B / 2..];
            if d.len() == B {
                for j in 0..B / 2 {
                    d[2 * j] = e2m1_to_f32(packed[j] >> 4) * t;
                    d[2 * j + 1] = e2m1_to_f32(packed[j] & 0x0F) * t;
                }
            } else {
                for (i, d) in d.iter_mut().enumerate() {
                    let byte = packed[i / 2];
                    *d = e2m1_to_f32(if i.is_multiple_of(2) { byte >> 4 } else { byte & 0x0F }) * t;
                }
            }
            if t == 0.0 {
                // The block scale rounded to 0 (or s2·scale underflowed): codes 0,
                // and the block max was at most 6·s2·2^-10 (or 6·s2·1.5·scale).
                let z = (6.0 * s2 as f64 * (1.5 * bs as f64).max(2f64.powi(-10)) * (1.0 + 1e-5)) as f32;
                bound.fill(z);
                continue;
            }
            // Dividing by t (the quantizer does) or multiplying by 1/t differs
            // by an ulp or two, far inside BOUND_SLACK.
            let inv_t = 1.0 / t;
            let n = x.len();
            let (d, bound) = (&d[..n], &mut bound[..n]);
            for i in 0..n {
                let ay = x[i].abs() * inv_t;
                let hi = ay * (1.0 + 2.0 * f32::EPSILON);
                let e = t * (e2m1_half_step(fmin(hi, E2M1_MAX)) + fmax(hi - E2M1_MAX, 0.0) + ay * f32::EPSILON) + d[i].abs() * f32::EPSILON;
                bound[i] = e * BOUND_SLACK + 1e-45;
            }
        }
        Ok(())
    })
}

impl Format for Nvfp4 {
    fn id(&self) -> QuantFormat {
        QuantFormat::Nvfp4
    }

    fn layout(&self, rows: usize, cols: usize) -> Vec<StoredSpec> {
        let (pr, pc, nb) = dims(rows, cols);
        let (sr, sc) = blocked_shape(pr, nb);
        vec![
            StoredSpec { suffix: "weight", dtype: Dtype::U8, shape: vec![pr, pc / 2] },
            StoredSpec { suffix: "weight_scale", dtype: Dtype::F8_E4M3, shape: vec![sr, sc] },
            StoredSpec { suffix: "weight_scale_2", dtype: Dtype::F32, shape: vec![] },
        ]
    }

    fn quantize(&self, w: &WeightView<'_>) -> Result<Vec<StoredTensor>, QuantError> {
        with_src!(w.dtype, T => quantize_t::<T>(w))
    }

    fn dequantize(&self, stored: &[StoredTensor], rows: usize, cols: usize) -> Vec<f32> {
        let layout = self.layout(rows, cols);
        let (_, pc, nb) = dims(rows, cols);
        let data = &numerics::expect_stored(stored, &layout, "weight").data;
        let blocked = &numerics::expect_stored(stored, &layout, "weight_scale").data;
        let s2 = numerics::f32_at(&numerics::expect_stored(stored, &layout, "weight_scale_2").data, 0);
        let values = e4m3_table();
        let mut out = vec![0f32; rows * cols];
        out.par_chunks_mut(cols).enumerate().for_each(|(r, o)| {
            for (b, o) in o.chunks_mut(B).enumerate() {
                let total = s2 * values[blocked[blocked_index(r, b, nb)] as usize];
                for (i, o) in o.iter_mut().enumerate() {
                    *o = e2m1_to_f32(nibble(data, pc, r, b * B + i)) * total;
                }
            }
        });
        out
    }

    fn verify(&self, original: &WeightView<'_>, stored: &[StoredTensor]) -> Result<ErrorStats, String> {
        with_src!(original.dtype, T => verify_t::<T>(original, stored))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::SourceDtype;
    use crate::formats::numerics::{e2m1_from_f32, f16_to_f32, f32_to_f16, from_blocked, to_blocked};

    use crate::formats::numerics::encode_source as bytes_of;

    fn quantize(dtype: SourceDtype, rows: usize, cols: usize, v: &[f32]) -> Vec<StoredTensor> {
        let bytes = bytes_of(dtype, v);
        let w = WeightView { name: "t", dtype, rows, cols, bytes: &bytes };
        let out = Nvfp4.quantize(&w).unwrap();
        for (t, spec) in out.iter().zip(Nvfp4.layout(rows, cols)) {
            assert_eq!(t.spec, spec);
            assert_eq!(t.data.len(), spec.byte_len());
        }
        Nvfp4.verify(&w, &out).unwrap();
        out
    }

    #[test]
    fn hand_checked_bf16_with_padding() {
        // 2 × 40 bf16 → padded 16 × 48, 3 blocks per row; scales [128, 4].
        // amax 6 → s2 = bf16(6/2688 = 1.142857·2^-9) = 146/128·2^-9 = 0.002227783203125.
        //
        // Row 0, block 0: bmax 6 → 1.0 / s2 = 448.9 → clamp 448 = 0x7E; total = s2·448 = 0.998046875,
        // so x/total = x·1.00196: values just above a tie round up, and 6 saturates.
        //   6 → 6.01 → 6 (7)      -6 → 0xF           0.25 → 0.2505 → 0.5 (1)   0 → 0
        //  -0 → 0x8 (sign kept)    1 → 1.002 → 1 (2)  1.25 → 1.2524 → 1.5 (3)   2.5 → 2.505 → 3 (5)
        //   5 → 5.01 → 6 (7)      bf16 4.97 = 4.96875 → 4.978 → 4 (6)
        //  bf16 0.74 = 0.73828125 → 0.7397 → 0.5 (1)   bf16 -1.74 = -1.7421875 → -1.7456 → -1.5 (0xB)
        //  bf16 3.4 = 3.40625 → 3.413 → 3 (5)          bf16 ±0.1 → ±0.1003 → 0 / 0x8
        //   2 → 2.004 → 2 (4)
        // Row 0, block 1: zeros → scale 0, codes 0.
        // Row 0, block 2 (8 values + 8 padding): bmax 0.5 → 0.083333336 / s2 = 37.41 → e4m3 36 =
        //   0 1100 001 = 0x61; total = s2·36 = 0.0802001953125:
        //   0.5 → 6.23 → 6 (7)   -0.25 → -3.117 → -3 (0xD)   0.125 → 1.559 → 1.5 (3)
        //   0.375 → 4.676 → 4 (6)   0, 0, 0 → 0   -0.5 → 0xF
        // Row 1, block 0: bmax bf16 0.01 = 0.010009765625 → 0.0016682943 / s2 = 0.74886 →
        //   e4m3 0.75 = 0 0110 100 = 0x34; total = 0.00167083740234375:
        //   0.01 → 5.991 → 6 (7)   bf16 -0.0001 → -0.0599 → -0 (0x8); rest 0.
        let mut v = vec![0f32; 80];
        v[..16].copy_from_slice(&[6.0, -6.0, 0.25, 0.0, -0.0, 1.0, 1.25, 2.5, 5.0, 4.97, 0.74, -1.74, 3.4, 0.1, -0.1, 2.0]);
        v[32..40].copy_from_slice(&[0.5, -0.25, 0.125, 0.375, 0.0, 0.0, 0.0, -0.5]);
        v[40] = 0.01;
        v[41] = -0.0001;
        let out = quantize(SourceDtype::BF16, 2, 40, &v);
        let mut want = vec![0u8; 16 * 24];
        want[..8].copy_from_slice(&[0x7F, 0x10, 0x82, 0x35, 0x76, 0x1B, 0x50, 0x84]);
        want[16..20].copy_from_slice(&[0x7D, 0x36, 0x00, 0x0F]);
        want[24] = 0x78;
        assert_eq!(out[0].data, want);
        let mut scales = vec![0u8; 128 * 4];
        scales[0] = 0x7E; // (0, 0)
        scales[2] = 0x61; // (0, 2)
        scales[16] = 0x34; // (1, 0): row 1 is line 1 of the tile
        assert_eq!(out[1].data, scales);
        assert_eq!(out[2].data, (146.0f32 / 65536.0).to_le_bytes());
    }

    #[test]
    fn all_zero_tensor_and_tiny_blocks() {
        let out = quantize(SourceDtype::BF16, 3, 20, &[0.0; 60]);
        assert_eq!(numerics::f32_at(&out[2].data, 0), 1.0);
        assert!(out[0].data.iter().chain(&out[1].data).all(|&b| b == 0));
        // A block far below amax: its scale rounds to 0 in E4M3, so its codes are 0.
        let mut v = vec![0f32; 32];
        v[0] = 6.0;
        v[16] = 1e-4;
        v[17] = 1e-6;
        let out = quantize(SourceDtype::F32, 1, 32, &v);
        // Block 1: bmax 1e-4 → 1e-4/6/(6/2688) = 0.00747 → subnormal e4m3 4·2^-9 (0x04).
        assert_eq!(out[1].data[1], 0x04);
        let mut v = vec![0f32; 32];
        v[0] = 6.0;
        v[16] = 1e-6; // 1e-6/6/(6/2688) = 7.5e-5 < 2^-10 → scale 0
        let out = quantize(SourceDtype::F32, 1, 32, &v);
        assert_eq!(out[1].data[1], 0x00);
        assert_eq!(out[0].data[8..16], [0; 8]);
    }

    #[test]
    fn f16_global_scale_underflow_falls_back_to_f32() {
        // amax 5e-5: 5e-5/2688 = 1.9e-8 is below half F16's smallest subnormal → 0.
        let v: Vec<f32> = (0..64).map(|i| ((i as f32) - 30.0) * 1.6e-6).collect();
        let v16: Vec<f32> = v.iter().map(|&x| f16_to_f32(f32_to_f16(x))).collect();
        let a = quantize(SourceDtype::F16, 2, 32, &v);
        let b = quantize(SourceDtype::F32, 2, 32, &v16);
        assert_eq!(a, b);
        assert!(numerics::f32_at(&a[2].data, 0) > 0.0);
        assert!(a[1].data.iter().any(|&c| c != 0));
    }

    /// The comfy-kitchen chain, written out plainly: torchao's e2m1 bit path,
    /// the literal `to_blocked`, `half` conversions.
    fn reference(dtype: SourceDtype, rows: usize, cols: usize, v: &[f32]) -> (Vec<u8>, Vec<u8>, f32) {
        let t = |x: f32| match dtype {
            SourceDtype::BF16 => half::bf16::from_f32(x).to_f32(),
            SourceDtype::F16 => half::f16::from_f32(x).to_f32(),
            SourceDtype::F32 => x,
        };
        let (pr, pc) = (rows.div_ceil(16) * 16, cols.div_ceil(16) * 16);
        let mut x = vec![0f32; pr * pc];
        for r in 0..rows {
            for c in 0..cols {
                x[r * pc + c] = t(v[r * cols + c]);
            }
        }
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s2 = t(amax / 2688.0);
        let mut codes = vec![0u8; pr * pc];
        let mut scales = vec![0u8; pr * pc / 16];
        for (bi, blk) in x.chunks(16).enumerate() {
            let bmax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let sbs = (bmax / 6.0 / s2).min(448.0);
            scales[bi] = e4m3_from_f32(sbs);
            let total = s2 * e4m3_to_f32(scales[bi]);
            for (i, &xv) in blk.iter().enumerate() {
                codes[bi * 16 + i] = if total == 0.0 { 0 } else { e2m1_from_f32((xv / total).clamp(-6.0, 6.0)) };
            }
        }
        let packed = codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
        (packed, to_blocked(&scales, pr, pc / 16), s2)
    }

    #[test]
    fn matches_plain_reference_random_padded() {
        let mut seed = 0x9E3779B97F4A7C15u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        for (rows, cols) in [(1, 1), (37, 50), (130, 64), (16, 16), (200, 33)] {
            let v: Vec<f32> = (0..rows * cols).map(|_| ((rnd() - 0.5) * 0.1 * (rnd() * 8.0).exp()) as f32).collect();
            for dtype in [SourceDtype::BF16, SourceDtype::F16, SourceDtype::F32] {
                let out = quantize(dtype, rows, cols, &v);
                let (data, scales, s2) = reference(dtype, rows, cols, &v);
                assert_eq!(out[0].data, data, "{dtype:?} {rows}x{cols}");
                assert_eq!(out[1].data, scales, "{dtype:?} {rows}x{cols}");
                assert_eq!(numerics::f32_at(&out[2].data, 0), s2);
                // Round trip: dequantize crops the padding and stays close.
                let dq = Nvfp4.dequantize(&out, rows, cols);
                assert_eq!(dq.len(), rows * cols);
                let decoded = numerics::decode_dtype(dtype, &bytes_of(dtype, &v));
                let rel = dq.iter().zip(&decoded).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt()
                    / decoded.iter().map(|b| b * b).sum::<f32>().sqrt().max(1e-30);
                assert!(rel < 0.25, "{rel}");
                // from_blocked undoes the layout.
                let (pr, pc) = (rows.div_ceil(16) * 16, cols.div_ceil(16) * 16);
                assert_eq!(to_blocked(&from_blocked(&out[1].data, pr, pc / 16), pr, pc / 16), out[1].data);
            }
        }
    }

    #[test]
    fn verify_catches_nibble_order_and_swizzle_bugs() {
        let (rows, cols) = (130, 64);
        let v: Vec<f32> = (0..rows * cols).map(|i| (((i * 7919) % 997) as f32 / 997.0 - 0.5) * (1.0 + (i % 5) as f32)).collect();
        let bytes = bytes_of(SourceDtype::BF16, &v);
        let w = WeightView { name: "t", dtype: SourceDtype::BF16, rows, cols, bytes: &bytes };
        let good = Nvfp4.quantize(&w).unwrap();
        let stats = Nvfp4.verify(&w, &good).unwrap();
        assert!(stats.cosine > 0.99 && stats.relative_l2 < 0.15, "{stats:?}");

        // Low nibble first in one byte.
        let mut bad = good.clone();
        let i = bad[0].data.iter().position(|&b| (b >> 4) != (b & 0xF) && (b >> 4) & 7 != 0 && b & 7 != 0).unwrap();
        bad[0].data[i] = bad[0].data[i].rotate_left(4);
        assert!(Nvfp4.verify(&w, &bad).is_err());
        // Scales in plain row-major order instead of the tile layout.
        let mut bad = good.clone();
        let (pr, nb) = (144, 4);
        let plain = from_blocked(&good[1].data, pr, nb);
        bad[1].data[..plain.len()].copy_from_slice(&plain);
        bad[1].data[plain.len()..].fill(0);
        assert!(Nvfp4.verify(&w, &bad).is_err());
        // Global scale off by a factor of two.
        let mut bad = good.clone();
        bad[2].data = (numerics::f32_at(&good[2].data, 0) * 2.0).to_le_bytes().to_vec();
        assert!(Nvfp4.verify(&w, &bad).is_err());
        // A nonzero code in the padding rows.
        let mut bad = good;
        bad[0].data[131 * 32] = 0x10;
        assert!(Nvfp4.verify(&w, &bad).unwrap_err().contains("padding"));
    }

    #[test]
    fn nonfinite_refused() {
        let bytes = bytes_of(SourceDtype::BF16, &[0.0, 1.0, f32::NAN, 0.5]);
        let w = WeightView { name: "single_blocks.9.linear1.weight", dtype: SourceDtype::BF16, rows: 2, cols: 2, bytes: &bytes };
        let e = Nvfp4.quantize(&w).unwrap_err();
        assert!(matches!(e, QuantError::NonFinite { ref name, count: 1, first: 2 } if name == "single_blocks.9.linear1.weight"));
    }
}
