//! `mxfp8`: an E4M3 weight with one E8M0 (power of two) scale per block of 32
//! inputs, scales in cuBLAS's swizzled layout and stored as U8.
//!
//! comfy-kitchen (`TensorCoreMXFP8Layout.quantize` + eager `quantize_mxfp8`),
//! on the source padded with zeros to `[roundup(rows,32), roundup(cols,32)]`:
//! ```text
//! e = clamp(ceil(log2(max(f32(bmax) / 448, 2^-127))) + 127, 0, 254)
//! q = bmax == 0 ? 0 : e4m3(clamp(f32(x) / e8m0_to_f32(e), -448, 448))
//! ```
//! `e8m0_to_f32(0)` is 0.0, so a nonzero block with bmax ≤ 448·2^-127
//! (possible for bf16 and f32 denormals) divides by zero: its nonzero
//! elements become ±inf and clamp to ±448, its zeros become 0/0 = NaN. We
//! replicate that, with the NaN written as 0xFF: x86's default NaN has the
//! sign bit set, and PyTorch on x86 CPUs writes 0xFF there (checked against
//! comfy-kitchen 0.2.24 on torch 2.15). Such a block dequantizes to 0 here;
//! comfy-kitchen's own dequantization turns its NaN codes into NaN weights.
//! See [`e8m0_ceil_code`] for why the exponent is computed exactly.

use rayon::prelude::*;
use safetensors::Dtype;

use super::numerics::{
    self, BOUND_SLACK, E4M3_MAX, Src, blocked_index, blocked_shape, e4m3_from_f32_sat, e4m3_half_step, e4m3_to_f32, e8m0_ceil_code,
    e8m0_to_f32, f64_ceil_log2, finite_amax, fmax, fmin, roundup, with_src,
};
use super::{ErrorStats, Format, QuantError, QuantFormat, StoredSpec, StoredTensor, WeightView};

/// Elements per block scale.
pub const BLOCK: u32 = 32;
const B: usize = BLOCK as usize;

/// `2^-127`, the smallest E8M0 scale comfy-kitchen clamps to.
const MIN_SCALE: f32 = f32::from_bits(1 << 22);

pub struct Mxfp8;

/// The code PyTorch (x86 CPU) writes for 0/0 in a block whose scale is 0.
const ZERO_OVER_ZERO: u8 = 0xFF;

/// Quantizes one row (`x`, zero-padded to whole blocks) into E4M3 codes
/// `out` and E8M0 block codes `scales`, step by step over the whole row so
/// the steps vectorize across blocks.
#[inline(always)]
fn encode_row(x: &[f32], bmax: &mut [f32], scales: &mut [u8], out: &mut [u8]) {
    for ((bmax, code), x) in bmax.iter_mut().zip(scales.iter_mut()).zip(x.chunks_exact(B)) {
        *bmax = numerics::max_abs(x);
        // A zero block gets 2^-127, code 0, as comfy-kitchen's zero-block rule wants.
        *code = e8m0_ceil_code(fmax(*bmax / E4M3_MAX, MIN_SCALE));
    }
    for (((out, x), &bmax), &e) in out.chunks_exact_mut(B).zip(x.chunks_exact(B)).zip(bmax.iter()).zip(scales.iter()) {
        if bmax == 0.0 {
            out.fill(0);
        } else if e == 0 {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = if v == 0.0 {
                    ZERO_OVER_ZERO
                } else if v > 0.0 {
                    0x7E
                } else {
                    0xFE
                };
            }
        } else {
            // x / 2^k and x · 2^-k round the same exact value once, and 2^-k
            // is an f32 (at least 2^-127, a subnormal) for every e in [1, 254].
            let inv = 1.0 / e8m0_to_f32(e);
            for (o, &v) in out.iter_mut().zip(x) {
                *o = e4m3_from_f32_sat((v * inv).clamp(-E4M3_MAX, E4M3_MAX));
            }
        }
    }
}

/// Smallest magnitude whose block dequantizes to infinity: 248·2^120. Such a
/// block gets exponent 247 (scale 2^120, since bmax/448 > 2^119), and x/2^120 ≥ 248
/// rounds to E4M3's 256 (248 is the tie between 240 and 256; ties go to the even
/// code, 256), so code·scale = 2^128, past f32's (and bf16's) largest finite value.
/// No other exponent choice helps: with three mantissa bits any scale rounds
/// such a value to 2^128. Only bf16 and f32 sources reach it (f16 stops at 65504).
pub const OVERFLOW_AMAX: f32 = 248.0 * (1u128 << 120) as f32;

/// Refuses a tensor whose largest magnitude `amax` would dequantize to infinity
/// ([`OVERFLOW_AMAX`]): such a file loads as inf weights, so it is bad input (exit
/// 3), refused before anything is written. The CPU reference and the GPU backend
/// (from the block maxima its kernel folds into the amax word) both call this.
pub(crate) fn check_range(name: &str, amax: f32) -> Result<(), QuantError> {
    if amax >= OVERFLOW_AMAX {
        return Err(QuantError::Invalid {
            name: name.to_string(),
            reason: format!(
                "holds {amax:e}, at or beyond {OVERFLOW_AMAX:e}, which MXFP8 rounds to 2^128 (infinity when dequantized); refusing to quantize it to mxfp8 (use fp8 or leave this layer unquantized)"
            ),
        });
    }
    Ok(())
}

/// Padded data shape `(rows, cols)` and block columns.
fn dims(rows: usize, cols: usize) -> (usize, usize, usize) {
    let (pr, pc) = (roundup(rows, B), roundup(cols, B));
    (pr, pc, pc / B)
}

fn quantize_t<T: Src>(w: &WeightView<'_>) -> Result<Vec<StoredTensor>, QuantError> {
    check_range(w.name, T::to_f32(finite_amax::<T>(w)?))?;
    let (rows, cols) = (w.rows, w.cols);
    let (pr, pc, nb) = dims(rows, cols);
    let (sr, sc) = blocked_shape(pr, nb);
    let mut data = vec![0u8; pr * pc];
    let mut scales = vec![0u8; sr * sc];
    numerics::quantize_block_rows::<T>(w, pc, pc, nb, sc, &mut data, &mut scales, encode_row);
    let [wspec, sspec]: [StoredSpec; 2] = Mxfp8.layout(rows, cols).try_into().unwrap();
    Ok(vec![StoredTensor { spec: wspec, data }, StoredTensor { spec: sspec, data: scales }])
}

fn verify_t<T: Src>(w: &WeightView<'_>, tensors: &[StoredTensor]) -> Result<ErrorStats, String> {
    numerics::check_view(w).map_err(|e| e.to_string())?;
    let (rows, cols) = (w.rows, w.cols);
    let (pr, pc, nb) = dims(rows, cols);
    let (sr, sc) = blocked_shape(pr, nb);
    let layout = Mxfp8.layout(rows, cols);
    let data = &numerics::stored(tensors, &layout, "weight")?.data;
    let blocked = &numerics::stored(tensors, &layout, "weight_scale")?.data;
    let name = w.name;

    numerics::check_scale_padding(name, blocked, rows, nb, sr, sc)?;
    if data[rows * pc..].iter().any(|&b| b != 0) {
        return Err(format!("{name}: a padding row holds nonzero codes"));
    }
    for r in 0..rows {
        if data[r * pc + cols..(r + 1) * pc].iter().any(|&b| b != 0) {
            return Err(format!("{name}: padding columns of row {r} hold nonzero codes"));
        }
    }

    // Each exponent must be the smallest power of two with bmax/2^(e-127) ≤ 448,
    // allowing for the f32 rounding of bmax/448 (checked in f64, apart from
    // the bit-level e8m0_ceil_code).
    let exp_of = |s: f64| (f64_ceil_log2(s.max(MIN_SCALE as f64)) + 127).clamp(0, 254);
    // A block whose exponent is 0 dequantizes to 0: its max was at most 448·2^-127.
    let tiny_block = (448.0 * MIN_SCALE as f64 * (1.0 + 2f64.powi(-20))) as f32;
    numerics::verify_rows::<T, _>(w, |r, x, d, bound| {
        let row = &data[r * pc..r * pc + cols];
        for (b, (((x, d), bound), q)) in x.chunks(B).zip(d.chunks_mut(B)).zip(bound.chunks_mut(B)).zip(row.chunks(B)).enumerate() {
            // The quantizer's own exponent, or one within the f32 rounding of bmax/448.
            let e = blocked[blocked_index(r, b, nb)];
            let bmax = numerics::max_abs(x);
            let exact = if bmax == 0.0 { 0 } else { e8m0_ceil_code(fmax(bmax / E4M3_MAX, MIN_SCALE)) };
            if e != exact {
                let m = bmax as f64 / E4M3_MAX as f64;
                let (lo, hi) = if m == 0.0 { (0, 0) } else { (exp_of(m * (1.0 - 2f64.powi(-23))), exp_of(m * (1.0 + 2f64.powi(-23)))) };
                if !(lo..=hi).contains(&(e as i32)) {
                    return Err(format!("block scale [{r}, {b}] is 2^({e}-127), expected 2^({lo}-127) for block max {bmax:e}"));
                }
            }
            if e == 0 {
                d.fill(0.0);
                bound.fill(tiny_block);
                continue;
            }
            let scale = e8m0_to_f32(e);
            let inv = 1.0 / scale;
            let n = x.len();
            let (d, bound, q) = (&mut d[..n], &mut bound[..n], &q[..n]);
            for i in 0..n {
                d[i] = e4m3_to_f32(q[i]) * scale;
                let ay = x[i].abs() * inv;
                bound[i] = scale * (e4m3_half_step(fmin(ay, E4M3_MAX)) + fmax(ay - E4M3_MAX, 0.0)) * BOUND_SLACK + 1e-45;
            }
        }
        Ok(())
    })
}

impl Format for Mxfp8 {
    fn id(&self) -> QuantFormat {
        QuantFormat::Mxfp8
    }

    fn layout(&self, rows: usize, cols: usize) -> Vec<StoredSpec> {
        let (pr, pc, nb) = dims(rows, cols);
        let (sr, sc) = blocked_shape(pr, nb);
        vec![
            StoredSpec { suffix: "weight", dtype: Dtype::F8_E4M3, shape: vec![pr, pc] },
            StoredSpec { suffix: "weight_scale", dtype: Dtype::U8, shape: vec![sr, sc] },
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
        let mut out = vec![0f32; rows * cols];
        out.par_chunks_mut(cols).enumerate().for_each(|(r, o)| {
            for (b, o) in o.chunks_mut(B).enumerate() {
                let e = blocked[blocked_index(r, b, nb)];
                if e == 0 {
                    o.fill(0.0);
                    continue;
                }
                let scale = e8m0_to_f32(e);
                for (i, o) in o.iter_mut().enumerate() {
                    *o = e4m3_to_f32(data[r * pc + b * B + i]) * scale;
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
    use crate::formats::numerics::{e4m3_from_f32, from_blocked, to_blocked};

    use crate::formats::numerics::encode_source as bytes_of;

    fn quantize(dtype: SourceDtype, rows: usize, cols: usize, v: &[f32]) -> Vec<StoredTensor> {
        let bytes = bytes_of(dtype, v);
        let w = WeightView { name: "t", dtype, rows, cols, bytes: &bytes };
        let out = Mxfp8.quantize(&w).unwrap();
        for (t, spec) in out.iter().zip(Mxfp8.layout(rows, cols)) {
            assert_eq!(t.spec, spec);
            assert_eq!(t.data.len(), spec.byte_len());
        }
        Mxfp8.verify(&w, &out).unwrap();
        out
    }

    #[test]
    fn hand_checked_with_padding() {
        // 2 × 40 bf16 → padded 32 × 64, 2 blocks per row; scales [128, 4].
        // Row 0, block 0: bmax 1.0 → 1/448 = 2^-8.8 → ceil −8 → e = 119 (scale 2^-8 = 1/256):
        //   1.0 → 256 = 0 1111 000 = 0x78; -0.5 → -128 = 1 1110 000 = 0xF0;
        //   bf16 0.3 = 0.30078125 → 77.0 → e4m3 step 8 in [64,128): 80 = 0 1101 010 = 0x6A;
        //   0.0703125 → 18.0 → step 2 in [16,32): 18 = 0 1011 001 = 0x59;
        //   0.06640625 → 17.0 → tie 16/18 → 16 = 0x58.
        // Row 0, block 1 (cols 32..40 + padding): bmax 1.75 → 1.75/448 = 2^-8 exactly → e = 119:
        //   1.75 → 448 = 0x7E; -1.75 → 0xFE.
        // Row 1, block 0: bmax 3.5 → 3.5/448 = 2^-7 exactly → e = 120: 3.5 → 448 = 0x7E.
        // Row 1, block 1: bmax bf16 3.6 = 3.59375 → /448 = 2^-6.96 → e = 121 (scale 2^-6):
        //   3.59375 → 230 → step 16 in [128,256): 224 = 0 1110 110 = 0x76.
        let mut v = vec![0f32; 80];
        v[..5].copy_from_slice(&[1.0, -0.5, 0.3, 0.0703125, 0.06640625]);
        v[32] = 1.75;
        v[39] = -1.75;
        v[40] = 3.5;
        v[72] = 3.6;
        let out = quantize(SourceDtype::BF16, 2, 40, &v);
        let mut want = vec![0u8; 32 * 64];
        want[..5].copy_from_slice(&[0x78, 0xF0, 0x6A, 0x59, 0x58]);
        want[32] = 0x7E;
        want[39] = 0xFE;
        want[64] = 0x7E;
        want[64 + 32] = 0x76;
        assert_eq!(out[0].data, want);
        let mut scales = vec![0u8; 128 * 4];
        scales[0] = 119; // (0, 0)
        scales[1] = 119; // (0, 1)
        scales[16] = 120; // (1, 0)
        scales[17] = 121; // (1, 1)
        assert_eq!(out[1].data, scales);
    }

    #[test]
    fn zero_and_denormal_blocks() {
        // Block 0 zero; block 1 a bf16 denormal with bmax/448 < 2^-127: scale code 0,
        // codes ±448 for nonzero and NaN (0xFF) for zero elements, dequantized to 0.
        let mut v = vec![0f32; 64];
        v[32] = 1e-39;
        v[33] = -1e-39;
        let out = quantize(SourceDtype::BF16, 1, 64, &v);
        assert_eq!(out[1].data[..2], [0, 0]);
        assert!(out[0].data[..32].iter().all(|&b| b == 0));
        assert_eq!(out[0].data[32..35], [0x7E, 0xFE, 0xFF]);
        assert!(Mxfp8.dequantize(&out, 1, 64).iter().all(|&x| x == 0.0));
        // All-zero tensor: zero codes and scales.
        let out = quantize(SourceDtype::F16, 5, 7, &[0.0; 35]);
        assert!(out.iter().all(|t| t.data.iter().all(|&b| b == 0)));
    }

    fn reference(dtype: SourceDtype, rows: usize, cols: usize, v: &[f32]) -> (Vec<u8>, Vec<u8>) {
        let t = |x: f32| match dtype {
            SourceDtype::BF16 => half::bf16::from_f32(x).to_f32(),
            SourceDtype::F16 => half::f16::from_f32(x).to_f32(),
            SourceDtype::F32 => x,
        };
        let (pr, pc) = (rows.div_ceil(32) * 32, cols.div_ceil(32) * 32);
        let mut x = vec![0f32; pr * pc];
        for r in 0..rows {
            for c in 0..cols {
                x[r * pc + c] = t(v[r * cols + c]);
            }
        }
        let mut codes = vec![0u8; pr * pc];
        let mut scales = vec![0u8; pr * pc / 32];
        for (bi, blk) in x.chunks(32).enumerate() {
            let bmax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            // log2 in f64 is exact enough to take the ceiling for these data.
            let e = ((bmax / 448.0).max(MIN_SCALE) as f64).log2().ceil() as i32 + 127;
            let e = e.clamp(0, 254) as u8;
            if bmax == 0.0 {
                continue;
            }
            scales[bi] = e;
            let scale = f32::from_bits((e as u32) << 23);
            for (i, &xv) in blk.iter().enumerate() {
                codes[bi * 32 + i] = e4m3_from_f32((xv / scale).clamp(-448.0, 448.0));
            }
        }
        (codes, to_blocked(&scales, pr, pc / 32))
    }

    #[test]
    fn matches_plain_reference_random_padded() {
        let mut seed = 0xD1B54A32D192ED03u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        for (rows, cols) in [(1, 1), (37, 50), (130, 96), (32, 32), (200, 33)] {
            let v: Vec<f32> = (0..rows * cols).map(|_| ((rnd() - 0.5) * 0.1 * (rnd() * 8.0).exp()) as f32).collect();
            for dtype in [SourceDtype::BF16, SourceDtype::F16, SourceDtype::F32] {
                let out = quantize(dtype, rows, cols, &v);
                let (data, scales) = reference(dtype, rows, cols, &v);
                assert_eq!(out[0].data, data, "{dtype:?} {rows}x{cols}");
                assert_eq!(out[1].data, scales, "{dtype:?} {rows}x{cols}");
                let dq = Mxfp8.dequantize(&out, rows, cols);
                let decoded = numerics::decode_dtype(dtype, &bytes_of(dtype, &v));
                // Half a step relative to the value, or E4M3's subnormal step of the block scale.
                let amax = decoded.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(dq.iter().zip(&decoded).all(|(a, b)| (a - b).abs() <= b.abs() / 16.0 + amax / 448.0 / 512.0));
                let (pr, pc) = (rows.div_ceil(32) * 32, cols.div_ceil(32) * 32);
                assert_eq!(to_blocked(&from_blocked(&out[1].data, pr, pc / 32), pr, pc / 32), out[1].data);
            }
        }
    }

    #[test]
    fn verify_catches_swizzle_and_exponent_bugs() {
        let (rows, cols) = (130, 128);
        let v: Vec<f32> = (0..rows * cols).map(|i| (((i * 7919) % 997) as f32 / 997.0 - 0.5) * (1.0 + (i / cols) as f32)).collect();
        let bytes = bytes_of(SourceDtype::F32, &v);
        let w = WeightView { name: "t", dtype: SourceDtype::F32, rows, cols, bytes: &bytes };
        let good = Mxfp8.quantize(&w).unwrap();
        let stats = Mxfp8.verify(&w, &good).unwrap();
        assert!(stats.cosine > 0.999, "{stats:?}");
        // One exponent one too low (data saturates) or too high.
        for delta in [-1i8, 1] {
            let mut bad = good.clone();
            bad[1].data[blocked_index(7, 2, 4)] = (bad[1].data[blocked_index(7, 2, 4)] as i8 + delta) as u8;
            assert!(Mxfp8.verify(&w, &bad).unwrap_err().contains("[7, 2]"));
        }
        // Two rows of the same tile swapped (r and r+32 share a 16-byte line).
        let mut bad = good.clone();
        for c in 0..4 {
            bad[1].data.swap(blocked_index(3, c, 4), blocked_index(35, c, 4));
        }
        assert!(Mxfp8.verify(&w, &bad).is_err());
    }

    /// Hand-checked: bf16 0x7F77 is 1.9296875·2^127 = 247·2^120. Its block max
    /// over 448 is 2^119.14, so e = 120 + 127 = 247 (0xF7); 247 lies 7 above E4M3's
    /// 240 and 9 below 256, so the code is 240 = 1.875·2^7: exponent field 7 + 7 =
    /// 0b1110, mantissa 0b111, code 0x77. 240·2^120 = 3.1901e38 is finite. One bf16
    /// step up, 0x7F78 = 248·2^120 is the tie that rounds to 256: 2^128 = inf, so
    /// it is refused, as is bf16's largest finite value 0x7F7F.
    #[test]
    fn values_near_the_bf16_maximum_never_dequantize_to_infinity() {
        let bf16 = |bits: u16| f32::from_bits((bits as u32) << 16);
        assert_eq!(bf16(0x7F77), 247.0 * 2f32.powi(120));
        assert_eq!(bf16(0x7F78), OVERFLOW_AMAX);
        let v = [bf16(0x7F77), -bf16(0x7F77), 0.0];
        let out = quantize(SourceDtype::BF16, 1, 3, &v);
        assert_eq!(&out[0].data[..3], &[0x77, 0xF7, 0x00], "codes: 240, -240 (sign bit | 0x77), 0");
        assert_eq!(out[1].data[blocked_index(0, 0, 1)], 0xF7);
        let dq = Mxfp8.dequantize(&out, 1, 3);
        assert_eq!(dq[0], 240.0 * 2f32.powi(120));
        assert!(dq.iter().all(|x| x.is_finite()));
        for bits in [0x7F78u16, 0x7F7F, 0xFF7F] {
            let bytes = bytes_of(SourceDtype::BF16, &[1.0, bf16(bits)]);
            let w = WeightView { name: "double_blocks.0.img_mlp.0.weight", dtype: SourceDtype::BF16, rows: 1, cols: 2, bytes: &bytes };
            let e = Mxfp8.quantize(&w).unwrap_err();
            assert!(
                matches!(&e, QuantError::Invalid { name, reason } if name == "double_blocks.0.img_mlp.0.weight" && reason.contains("infinity")),
                "{e}"
            );
        }
        // f32 just below the limit still quantizes (to code 240), finite.
        let below = f32::from_bits(OVERFLOW_AMAX.to_bits() - 1);
        let out = quantize(SourceDtype::F32, 1, 1, &[below]);
        assert_eq!(out[0].data[0], 0x77);
        assert!(Mxfp8.dequantize(&out, 1, 1)[0].is_finite());
    }

    #[test]
    fn nonfinite_refused() {
        let bytes = bytes_of(SourceDtype::F32, &[0.0, f32::INFINITY]);
        let w = WeightView { name: "final_layer.linear.weight", dtype: SourceDtype::F32, rows: 1, cols: 2, bytes: &bytes };
        let e = Mxfp8.quantize(&w).unwrap_err();
        assert!(matches!(e, QuantError::NonFinite { ref name, count: 1, first: 1 } if name == "final_layer.linear.weight"));
    }
}
