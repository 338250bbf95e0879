//! `int8_tensorwise`: an I8 weight with an F32 scale per tensor (`[]`) or per
//! output channel (`[out, 1]`).
//!
//! comfy-kitchen (`quantize_int8_tensorwise` / `quantize_int8_rowwise`, the
//! latter used for `per_channel` weights), for a source of dtype T:
//! ```text
//! scale = max(f32(amax) / 127, 1e-30)                  # f32, over the tensor or the row
//! div   = T(scale), or T's smallest normal if that is 0  # `_int8_scale_for_math`
//! q     = clamp(round_half_even(T(x / div)), -128, 127)
//! ```
//! Note the clamp is [-128, 127], not the symmetric [-127, 127]: -128 occurs
//! when T-rounding the scale shrinks it enough that -amax/div ≤ -127.5.
//! The quotient is rounded to T before the integer rounding, so e.g. a bf16
//! 101.46 becomes 101.5 and then 102.

use rayon::prelude::*;
use safetensors::Dtype;

use super::numerics::{self, BOUND_SLACK, Src, finite_amax, fmax, with_src};
use super::{ErrorStats, Format, QuantError, QuantFormat, StoredSpec, StoredTensor, WeightView};

pub struct Int8 {
    pub per_channel: bool,
}

/// The stored scale for magnitude `amax`.
fn scale_of(amax: f32) -> f32 {
    (amax / 127.0).max(1e-30)
}

/// The divisor comfy-kitchen actually uses for `scale`.
fn divisor<T: Src>(scale: f32) -> f32 {
    let d = T::round(scale);
    if d == 0.0 { T::TINY } else { d }
}

#[inline(always)]
fn code<T: Src>(x: f32, div: f32) -> i8 {
    // Pre-clamping to [-129, 128] changes no result and keeps the magic
    // constant exact: adding 1.5·2^23 rounds to an integer, half to even,
    // and leaves it in the low mantissa bits.
    let v = T::round(x / div).clamp(-129.0, 128.0);
    let n = (v + 12_582_912.0).to_bits() as i32 - 0x4B40_0000;
    n.clamp(-128, 127) as i8
}

fn encode_row<T: Src>(bytes: &[u8], out: &mut [u8], div: f32) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(T::SIZE)) {
        *o = code::<T>(T::to_f32(T::bits(c)), div) as u8;
    }
}

const LUT_MIN_ELEMENTS: usize = 1 << 17;

fn quantize_t<T: Src>(w: &WeightView<'_>, per_channel: bool) -> Result<Vec<StoredTensor>, QuantError> {
    let amax = T::to_f32(finite_amax::<T>(w)?);
    let (rows, cols) = (w.rows, w.cols);
    let mut q = vec![0u8; rows * cols];
    let row_bytes = cols * T::SIZE;
    let scales: Vec<f32> = if per_channel {
        q.par_chunks_mut(cols)
            .zip(w.bytes.par_chunks(row_bytes))
            .map(|(o, b)| {
                let scale = scale_of(T::to_f32(T::max_mag(b)));
                encode_row::<T>(b, o, divisor::<T>(scale));
                scale
            })
            .collect()
    } else {
        let scale = scale_of(amax);
        let div = divisor::<T>(scale);
        const CHUNK: usize = 1 << 16;
        if T::SIZE == 2 && q.len() >= LUT_MIN_ELEMENTS {
            let lut: Box<[u8; 65536]> = (0..65536u32).map(|b| code::<T>(T::to_f32(b), div) as u8).collect::<Vec<u8>>().try_into().unwrap();
            q.par_chunks_mut(CHUNK).zip(w.bytes.par_chunks(CHUNK * 2)).for_each(|(o, b)| {
                for (o, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                    *o = lut[u16::from_le_bytes([c[0], c[1]]) as usize];
                }
            });
        } else {
            q.par_chunks_mut(CHUNK).zip(w.bytes.par_chunks(CHUNK * T::SIZE)).for_each(|(o, b)| encode_row::<T>(b, o, div));
        }
        vec![scale]
    };
    let [wspec, sspec]: [StoredSpec; 2] = Int8 { per_channel }.layout(rows, cols).try_into().unwrap();
    Ok(vec![StoredTensor { spec: wspec, data: q }, StoredTensor { spec: sspec, data: numerics::f32_bytes(&scales) }])
}

fn verify_t<T: Src>(w: &WeightView<'_>, tensors: &[StoredTensor], per_channel: bool) -> Result<ErrorStats, String> {
    numerics::check_view(w).map_err(|e| e.to_string())?;
    let cols = w.cols;
    let layout = Int8 { per_channel }.layout(w.rows, cols);
    let q = &numerics::stored(tensors, &layout, "weight")?.data;
    let sdata = &numerics::stored(tensors, &layout, "weight_scale")?.data;
    // A scale must be max(amax/127, 1e-30) over its row or the tensor.
    let check = |i: usize, amax: f32| {
        let s = numerics::f32_at(sdata, i);
        let want = (amax as f64 / 127.0).max(1e-30f32 as f64);
        if (s as f64 - want).abs() <= want * 2f64.powi(-23) {
            Ok(s)
        } else {
            Err(format!("weight_scale[{i}] = {s:e}, expected amax/127 = {want:e}"))
        }
    };
    let tensor_scale = if per_channel {
        None
    } else {
        let amax = T::to_f32(numerics::amax_bits::<T>(w.bytes));
        Some(check(0, amax).map_err(|e| format!("{}: {e}", w.name))?)
    };
    let (u, sub) = (T::UNIT_ROUNDOFF + f32::EPSILON / 2.0, T::HALF_MIN_SUBNORMAL);
    numerics::verify_rows::<T, _>(w, |r, x, d, b| {
        let s = match tensor_scale {
            Some(s) => s,
            None => check(r, numerics::max_abs(x))?,
        };
        let div = divisor::<T>(s);
        // The quantizer divided by `div` but the stored scale is `s`.
        let mismatch = ((s as f64 / div as f64 - 1.0).abs() * (1.0 + 1e-6)) as f32;
        for (d, &c) in d.iter_mut().zip(&q[r * cols..(r + 1) * cols]) {
            *d = c as i8 as f32 * s;
        }
        let n = x.len();
        let (d, b) = (&d[..n], &mut b[..n]);
        for i in 0..n {
            let ax = x[i].abs();
            let ay = ax / div;
            let hi = ay * (1.0 + u) + sub;
            let e = s * (0.5 + fmax(hi - 127.0, 0.0) + ay * u + sub) + ax * mismatch + d[i].abs() * f32::EPSILON;
            b[i] = e * BOUND_SLACK + 1e-45;
        }
        Ok(())
    })
}

impl Format for Int8 {
    fn id(&self) -> QuantFormat {
        QuantFormat::Int8
    }

    fn layout(&self, rows: usize, cols: usize) -> Vec<StoredSpec> {
        let scale_shape = if self.per_channel { vec![rows, 1] } else { vec![] };
        vec![
            StoredSpec { suffix: "weight", dtype: Dtype::I8, shape: vec![rows, cols] },
            StoredSpec { suffix: "weight_scale", dtype: Dtype::F32, shape: scale_shape },
        ]
    }

    fn quantize(&self, w: &WeightView<'_>) -> Result<Vec<StoredTensor>, QuantError> {
        with_src!(w.dtype, T => quantize_t::<T>(w, self.per_channel))
    }

    fn dequantize(&self, stored: &[StoredTensor], rows: usize, cols: usize) -> Vec<f32> {
        let layout = self.layout(rows, cols);
        let q = &numerics::expect_stored(stored, &layout, "weight").data;
        let sdata = &numerics::expect_stored(stored, &layout, "weight_scale").data;
        let mut out = vec![0f32; rows * cols];
        out.par_chunks_mut(cols).zip(q.par_chunks(cols)).enumerate().for_each(|(r, (o, q))| {
            let s = numerics::f32_at(sdata, if self.per_channel { r } else { 0 });
            for (o, &c) in o.iter_mut().zip(q) {
                *o = c as i8 as f32 * s;
            }
        });
        out
    }

    fn verify(&self, original: &WeightView<'_>, stored: &[StoredTensor]) -> Result<ErrorStats, String> {
        with_src!(original.dtype, T => verify_t::<T>(original, stored, self.per_channel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::SourceDtype;
    use crate::formats::numerics::{Bf16, bf16_to_f32};

    use crate::formats::numerics::encode_source as bytes_of;

    fn run(per_channel: bool, dtype: SourceDtype, rows: usize, cols: usize, v: &[f32]) -> (Vec<i8>, Vec<f32>) {
        let bytes = bytes_of(dtype, v);
        let w = WeightView { name: "t", dtype, rows, cols, bytes: &bytes };
        let f = Int8 { per_channel };
        let out = f.quantize(&w).unwrap();
        assert_eq!(out[0].spec.dtype, Dtype::I8);
        assert_eq!(out[1].spec.shape, if per_channel { vec![rows, 1] } else { vec![] });
        f.verify(&w, &out).unwrap();
        let q = out[0].data.iter().map(|&b| b as i8).collect();
        let s = out[1].data.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        (q, s)
    }

    #[test]
    fn hand_checked_tensorwise_bf16() {
        // amax = bf16(2.54) = 2.546875; scale = 2.546875/127 = 0.0200541 (f32);
        // div = bf16(scale) = 164/128·2^-6 = 0.02001953125.
        //  1.0        / div =  49.95 → bf16  50.0    → 50
        // -0.5        / div = -24.98 → bf16 -25.0    → -25
        //  0.30078125 / div =  15.02 → bf16  15.0    → 15
        //  2.546875   / div = 127.22 → bf16 127.0    → 127
        //  2.03125    / div = 101.46 → bf16 101.5    → 102 (half to even; plain rounding gives 101)
        // -2.546875   / div → -127
        let (q, s) = run(false, SourceDtype::BF16, 2, 3, &[1.0, -0.5, 0.3, 2.54, 2.03125, -2.54]);
        assert_eq!(s, [2.546875f32 / 127.0]);
        assert_eq!(q, [50, -25, 15, 127, 102, -127]);
    }

    #[test]
    fn hand_checked_per_channel_bf16_with_zero_row() {
        // Row 0: amax 1 → scale 1/127 = 0.007874016; div = bf16 = 129/128·2^-7 = 0.0078735352.
        //  1.0 / div = 127.008 → bf16 127.0 → 127;  -0.5 → -63.504 → bf16 -63.5 → -64 (tie to even);
        //  0.30078125 → 38.20 → bf16 38.25 → 38.
        // Row 1: all zero → scale 1e-30, codes 0.
        let (q, s) = run(true, SourceDtype::BF16, 2, 3, &[1.0, -0.5, 0.3, 0.0, 0.0, 0.0]);
        assert_eq!(s, [1.0f32 / 127.0, 1e-30]);
        assert_eq!(q, [127, -64, 38, 0, 0, 0]);
        // F16: the zero row's scale 1e-30 is 0 in f16 → divisor 2^-14; still all zero.
        let (q, s) = run(true, SourceDtype::F16, 2, 3, &[1.0, -0.5, 0.3, 0.0, 0.0, 0.0]);
        assert_eq!(s[1], 1e-30);
        assert_eq!(&q[3..], [0, 0, 0]);
    }

    #[test]
    fn negative_saturation_reaches_minus_128() {
        // Find a bf16 amax whose bf16 scale rounds down enough that -amax/div ≤ -127.5.
        let found = (0x3F80u16..0x4000).map(bf16_to_f32).find(|&a| {
            let div = divisor::<Bf16>(scale_of(a));
            Bf16::round(-a / div) <= -127.5
        });
        let a = found.expect("some bf16 amax saturates");
        let (q, _) = run(false, SourceDtype::BF16, 1, 2, &[a, -a]);
        assert_eq!(q, [127, -128]);
    }

    #[test]
    fn per_tensor_lut_matches_direct() {
        let n = LUT_MIN_ELEMENTS + 17;
        let v: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.377).sin() * (1.0 + (i % 13) as f32)).collect();
        for dtype in [SourceDtype::BF16, SourceDtype::F16] {
            let bytes = bytes_of(dtype, &v);
            let (q, s) = run(false, dtype, 1, n, &v);
            let mut direct = vec![0u8; n];
            with_src!(dtype, T => encode_row::<T>(&bytes, &mut direct, divisor::<T>(s[0])));
            assert!(q.iter().zip(&direct).all(|(&a, &b)| a as u8 == b));
        }
    }

    #[test]
    fn roundtrip_random_all_dtypes() {
        let (rows, cols) = (37, 300);
        let v: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 4001) as f32 / 4001.0 - 0.5) * (1.0 + (i / cols) as f32)).collect();
        for dtype in [SourceDtype::BF16, SourceDtype::F16, SourceDtype::F32] {
            for per_channel in [false, true] {
                let bytes = bytes_of(dtype, &v);
                let w = WeightView { name: "t", dtype, rows, cols, bytes: &bytes };
                let f = Int8 { per_channel };
                let mut out = f.quantize(&w).unwrap();
                let stats = f.verify(&w, &out).unwrap();
                assert!(stats.cosine > 0.9999, "{stats:?}");
                let dq = f.dequantize(&out, rows, cols);
                let decoded = crate::formats::decode_source(&w).unwrap();
                let max_err = dq.iter().zip(&decoded).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                // Half a step, a quarter step from the bf16 rounding of x/div, and up to
                // half a step at ±127 because x is divided by bf16(scale) but the
                // stored scale is the f32 one.
                assert!(max_err < 1.3 * 18.5 / 127.0, "{max_err}");
                // Off-by-one code fails verification.
                out[0].data[1000] = (out[0].data[1000] as i8).wrapping_add(if out[0].data[1000] as i8 > 0 { -1 } else { 1 }) as u8;
                assert!(f.verify(&w, &out).unwrap_err().contains("[3, 100]"));
            }
        }
    }

    #[test]
    fn nonfinite_refused() {
        let bytes = bytes_of(SourceDtype::F32, &[1.0, 2.0, f32::NEG_INFINITY]);
        let w = WeightView { name: "proj.weight", dtype: SourceDtype::F32, rows: 1, cols: 3, bytes: &bytes };
        let e = Int8 { per_channel: true }.quantize(&w).unwrap_err();
        assert!(matches!(e, QuantError::NonFinite { ref name, count: 1, first: 2 } if name == "proj.weight"));
    }
}
