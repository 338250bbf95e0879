//! `float8_e4m3fn`: an E4M3 weight with one F32 scale per tensor.
//!
//! comfy-kitchen (`TensorCoreFP8Layout.quantize` + eager
//! `quantize_per_tensor_fp8`), for a source of dtype T:
//! ```text
//! scale = T(amax / 448)            # T tensor divided by a Python float
//! inv   = T(1.0 / f32(scale))      # `(1.0 / scale).to(x.dtype)`
//! q     = e4m3(clamp(T(x * inv), -448, 448))
//! ```
//! with the scale stored as F32.
//!
//! Deviation: where comfy-kitchen's reciprocal is not finite it writes NaN
//! and ±448 garbage. That is the all-zero tensor (scale 0), but also any F16
//! tensor with amax below about 0.0068 (1/scale overflows F16's 65504) and
//! tensors whose scale underflows T. There we quantize exactly as
//! comfy-kitchen quantizes the same tensor converted to f32 (scale and
//! product in f32), and if even the f32 reciprocal overflows (amax below
//! about 2^-119, all-zero included) we write zero codes with scale 1.0
//! (ModelOpt's choice for zero blocks), so the output never holds NaN.

use rayon::prelude::*;
use safetensors::Dtype;

use super::numerics::{
    self, BOUND_SLACK, E4M3_MAX, Src, e4m3_from_f32_sat, e4m3_half_step, e4m3_to_f32, finite_amax, fmax, fmin, with_src,
};
use super::{ErrorStats, Format, QuantError, QuantFormat, StoredSpec, StoredTensor, WeightView};

pub struct Fp8;

/// How the codes of one tensor are computed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Plan {
    /// `code = e4m3(clamp(R(x * mul), ±448))`, R rounding to T when `round_t`.
    Scaled { scale: f32, mul: f32, round_t: bool },
    /// Every code 0, scale 1.0.
    Zero,
}

pub(crate) fn plan<T: Src>(amax: f32) -> Plan {
    let scale = T::round(amax / E4M3_MAX);
    let mul = T::round(1.0 / scale);
    if mul.is_finite() {
        return Plan::Scaled { scale, mul, round_t: true };
    }
    let scale = amax / E4M3_MAX;
    let mul = 1.0 / scale;
    if mul.is_finite() { Plan::Scaled { scale, mul, round_t: false } } else { Plan::Zero }
}

#[inline(always)]
fn code<T: Src, const ROUND_T: bool>(x: f32, mul: f32) -> u8 {
    let p = x * mul;
    let p = if ROUND_T { T::round(p) } else { p };
    e4m3_from_f32_sat(p.clamp(-E4M3_MAX, E4M3_MAX))
}

/// Below this many elements the 64K-entry table costs more than it saves.
const LUT_MIN_ELEMENTS: usize = 1 << 17;

fn encode<T: Src, const ROUND_T: bool>(bytes: &[u8], out: &mut [u8], mul: f32) {
    const CHUNK: usize = 1 << 16;
    if T::SIZE == 2 && out.len() >= LUT_MIN_ELEMENTS {
        // A 2-byte source has only 65536 values: tabulate the whole chain once.
        let lut: Box<[u8; 65536]> = (0..65536u32).map(|b| code::<T, ROUND_T>(T::to_f32(b), mul)).collect::<Vec<u8>>().try_into().unwrap();
        out.par_chunks_mut(CHUNK).zip(bytes.par_chunks(CHUNK * 2)).for_each(|(o, b)| {
            for (o, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                *o = lut[u16::from_le_bytes([c[0], c[1]]) as usize];
            }
        });
    } else {
        out.par_chunks_mut(CHUNK).zip(bytes.par_chunks(CHUNK * T::SIZE)).for_each(|(o, b)| {
            for (o, c) in o.iter_mut().zip(b.chunks_exact(T::SIZE)) {
                *o = code::<T, ROUND_T>(T::to_f32(T::bits(c)), mul);
            }
        });
    }
}

fn quantize_t<T: Src>(w: &WeightView<'_>) -> Result<Vec<StoredTensor>, QuantError> {
    let amax = T::to_f32(finite_amax::<T>(w)?);
    let mut q = vec![0u8; w.rows * w.cols];
    let scale = match plan::<T>(amax) {
        Plan::Zero => 1.0,
        Plan::Scaled { scale, mul, round_t } => {
            if round_t {
                encode::<T, true>(w.bytes, &mut q, mul);
            } else {
                encode::<T, false>(w.bytes, &mut q, mul);
            }
            scale
        }
    };
    let [wspec, sspec]: [StoredSpec; 2] = Fp8.layout(w.rows, w.cols).try_into().unwrap();
    Ok(vec![StoredTensor { spec: wspec, data: q }, StoredTensor { spec: sspec, data: scale.to_le_bytes().to_vec() }])
}

fn verify_t<T: Src>(w: &WeightView<'_>, tensors: &[StoredTensor]) -> Result<ErrorStats, String> {
    numerics::check_view(w).map_err(|e| e.to_string())?;
    let cols = w.cols;
    let layout = Fp8.layout(w.rows, cols);
    let q = &numerics::stored(tensors, &layout, "weight")?.data;
    let s = numerics::f32_at(&numerics::stored(tensors, &layout, "weight_scale")?.data, 0);
    let amax_bits = numerics::amax_bits::<T>(w.bytes);
    if amax_bits >= T::NONFINITE {
        return Err(format!("{}: the source holds NaN or infinity", w.name));
    }
    let amax = T::to_f32(amax_bits) as f64;

    // The scale must be T(amax / 448), its f32 value after the fallback, or
    // 1.0 with zero codes for a (near-)zero tensor.
    let zero_plan = s == 1.0 && amax < 2f64.powi(-118) && q.par_iter().all(|&b| b == 0);
    if !zero_plan {
        let (lo, hi) = numerics::scale_interval::<T>(amax / 448.0, 2f64.powi(-23));
        if !(s as f64 >= lo && s as f64 <= hi && s > 0.0) {
            return Err(format!("{}: weight_scale {s:e} is not amax/448 = {:e}", w.name, amax / 448.0));
        }
    }
    // Replay the reciprocal the quantizer used; `u` bounds the rounding of
    // x·mul to f32 and then to T.
    let inv = 1.0 / s;
    let (mul, u, sub) = match T::round(inv) {
        m if m.is_finite() => (m, T::UNIT_ROUNDOFF + f32::EPSILON / 2.0, T::HALF_MIN_SUBNORMAL),
        _ => (inv, f32::EPSILON, f32::from_bits(1)),
    };
    let mismatch = ((mul as f64 * s as f64 - 1.0).abs() * (1.0 + 1e-6)) as f32;
    numerics::verify_rows::<T, _>(w, |r, x, d, b| {
        for (d, &c) in d.iter_mut().zip(&q[r * cols..(r + 1) * cols]) {
            *d = e4m3_to_f32(c) * s;
        }
        let n = x.len();
        let (d, b) = (&d[..n], &mut b[..n]);
        if zero_plan {
            for i in 0..n {
                b[i] = x[i].abs() * BOUND_SLACK;
            }
            return Ok(());
        }
        for i in 0..n {
            // Rounding to E4M3 at the largest magnitude T(x·mul) can have,
            // saturation past 448, the roundings of x·mul, and s·mul ≠ 1.
            let ax = x[i].abs();
            let ay = ax * mul;
            let hi = ay * (1.0 + u) + sub;
            let e = s * (e4m3_half_step(fmin(hi, E4M3_MAX)) + fmax(hi - E4M3_MAX, 0.0) + ay * u + sub)
                + ax * mismatch
                + d[i].abs() * f32::EPSILON;
            b[i] = e * BOUND_SLACK + 1e-45;
        }
        Ok(())
    })
}

impl Format for Fp8 {
    fn id(&self) -> QuantFormat {
        QuantFormat::Fp8
    }

    fn layout(&self, rows: usize, cols: usize) -> Vec<StoredSpec> {
        vec![
            StoredSpec { suffix: "weight", dtype: Dtype::F8_E4M3, shape: vec![rows, cols] },
            StoredSpec { suffix: "weight_scale", dtype: Dtype::F32, shape: vec![] },
        ]
    }

    fn quantize(&self, w: &WeightView<'_>) -> Result<Vec<StoredTensor>, QuantError> {
        with_src!(w.dtype, T => quantize_t::<T>(w))
    }

    fn dequantize(&self, stored: &[StoredTensor], rows: usize, cols: usize) -> Vec<f32> {
        let layout = self.layout(rows, cols);
        let q = &numerics::expect_stored(stored, &layout, "weight").data;
        let s = numerics::f32_at(&numerics::expect_stored(stored, &layout, "weight_scale").data, 0);
        let values: Vec<f32> = (0..=255u8).map(|c| e4m3_to_f32(c) * s).collect();
        q.par_iter().map(|&c| values[c as usize]).collect()
    }

    fn verify(&self, original: &WeightView<'_>, stored: &[StoredTensor]) -> Result<ErrorStats, String> {
        with_src!(original.dtype, T => verify_t::<T>(original, stored))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::SourceDtype;
    use crate::formats::numerics::{Bf16, F16, e4m3_from_f32, f32_to_f16};

    use crate::formats::numerics::encode_source as bytes_of;

    fn quantize(dtype: SourceDtype, rows: usize, cols: usize, v: &[f32]) -> (Vec<u8>, f32) {
        let bytes = bytes_of(dtype, v);
        let w = WeightView { name: "t", dtype, rows, cols, bytes: &bytes };
        let out = Fp8.quantize(&w).unwrap();
        assert_eq!(out[0].spec, StoredSpec { suffix: "weight", dtype: Dtype::F8_E4M3, shape: vec![rows, cols] });
        assert_eq!(out[1].spec, StoredSpec { suffix: "weight_scale", dtype: Dtype::F32, shape: vec![] });
        Fp8.verify(&w, &out).unwrap();
        (out[0].data.clone(), numerics::f32_at(&out[1].data, 0))
    }

    #[test]
    fn hand_checked_bf16() {
        // amax 3 → scale = bf16(3/448 = 1.7142857·2^-8) = 219/128·2^-8 = 0.006683349609375;
        // 1/scale = 149.6256 → bf16 150.
        //  1.0   → 150     → e4m3 144 (step 16 in [128,256))      = 0 1110 001 = 0x71
        // -0.5   → -75     → -72  (step 8 in [64,128))            = 1 1101 001 = 0xE9
        //  3.0   → 450     → clamp 448                            = 0x7E
        //  bf16(0.1) = 0.10009765625 → 15.0146 → bf16 15.0 → 15   = 0 1010 111 = 0x57
        //  0     → 0x00
        // -2.0   → -300    → -288 (step 32 in [256,448])          = 1 1111 001 = 0xF9
        let (q, s) = quantize(SourceDtype::BF16, 2, 3, &[1.0, -0.5, 3.0, 0.1, 0.0, -2.0]);
        assert_eq!(s, 219.0 / 32768.0);
        assert_eq!(q, [0x71, 0xE9, 0x7E, 0x57, 0x00, 0xF9]);
    }

    #[test]
    fn hand_checked_f32_and_f16() {
        // f32: scale = 3/448, 1/scale ≈ 149.333: 1 → 149.3 → 144; -0.5 → -74.7 → -72;
        // 3 → 448; 0.1 → 14.93 → 15; -2 → -298.7 → -288.
        let (q, s) = quantize(SourceDtype::F32, 2, 3, &[1.0, -0.5, 3.0, 0.1, 0.0, -2.0]);
        assert_eq!(s, 3.0f32 / 448.0);
        assert_eq!(q, [0x71, 0xE9, 0x7E, 0x57, 0x00, 0xF9]);
        // f16: amax 0.75 → scale = f16(0.0016741) = 1.7139·2^-10 → 0.0016736984 (1755/1024·2^-10);
        // 1/scale = 597.48 → f16 597.5. 0.75·597.5 = 448.1 → f16 448 → 0x7E;
        // 0.3 (f16 0.300048828125) → 179.28 → f16 179.25 → e4m3 176 (step 16) = 0 1110 011 = 0x73.
        let (q, s) = quantize(SourceDtype::F16, 1, 2, &[0.75, 0.3]);
        assert_eq!(s, 1755.0 / 1024.0 / 1024.0);
        assert_eq!(q, [0x7E, 0x73]);
    }

    #[test]
    fn all_zero_tensor_gets_scale_one() {
        for dtype in [SourceDtype::BF16, SourceDtype::F16, SourceDtype::F32] {
            let (q, s) = quantize(dtype, 3, 5, &[0.0; 15]);
            assert_eq!(s, 1.0);
            assert!(q.iter().all(|&b| b == 0));
        }
        // A tensor so small that even the f32 reciprocal overflows.
        let (q, s) = quantize(SourceDtype::BF16, 1, 2, &[1e-37, -2e-38]);
        assert_eq!((q, s), (vec![0, 0], 1.0));
    }

    #[test]
    fn f16_reciprocal_overflow_falls_back_to_f32() {
        // amax 0.005: f16(0.005/448) is subnormal and 1/scale ≈ 89600 > 65504, where
        // comfy-kitchen would write ±448 and NaN. We give the f32 tensor's result.
        let v = [0.005, -0.0025, 0.0, 0.001];
        let as_f16: Vec<f32> = v.iter().map(|&x| numerics::f16_to_f32(f32_to_f16(x))).collect();
        let (q16, s16) = quantize(SourceDtype::F16, 2, 2, &v);
        let (q32, s32) = quantize(SourceDtype::F32, 2, 2, &as_f16);
        assert_eq!((q16.clone(), s16), (q32, s32));
        assert_eq!(q16, [0x7E, 0xF6, 0x00, 0x6B]); // 448, -224 = 1 1110 110, 0, 89.6 → 88 = 0 1101 011
        assert!(matches!(plan::<F16>(as_f16[0]), Plan::Scaled { round_t: false, .. }));
    }

    #[test]
    fn lut_and_direct_paths_agree() {
        let n = LUT_MIN_ELEMENTS + 3;
        let v: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.7548).sin() * 2.5 * (1.0 + (i % 7) as f32)).collect();
        for dtype in [SourceDtype::BF16, SourceDtype::F16] {
            let bytes = bytes_of(dtype, &v);
            let w = WeightView { name: "t", dtype, rows: 1, cols: n, bytes: &bytes };
            let lut = Fp8.quantize(&w).unwrap();
            let Plan::Scaled { mul, .. } = (match dtype {
                SourceDtype::BF16 => plan::<Bf16>(T_amax::<Bf16>(&bytes)),
                _ => plan::<F16>(T_amax::<F16>(&bytes)),
            }) else {
                panic!()
            };
            let mut direct = vec![0u8; n];
            match dtype {
                SourceDtype::BF16 => encode::<Bf16, true>(&bytes[..2 * (LUT_MIN_ELEMENTS - 1)], &mut direct[..LUT_MIN_ELEMENTS - 1], mul),
                _ => encode::<F16, true>(&bytes[..2 * (LUT_MIN_ELEMENTS - 1)], &mut direct[..LUT_MIN_ELEMENTS - 1], mul),
            }
            assert_eq!(lut[0].data[..LUT_MIN_ELEMENTS - 1], direct[..LUT_MIN_ELEMENTS - 1]);
        }
    }

    #[allow(non_snake_case)]
    fn T_amax<T: Src>(bytes: &[u8]) -> f32 {
        T::to_f32(T::max_mag(bytes))
    }

    #[test]
    fn matches_a_plain_reference_on_random_data() {
        // The comfy-kitchen chain written with the `half` crate's own conversions.
        let mut seed = 0x2545F4914F6CDD1Du64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let v: Vec<f32> = (0..40_000).map(|_| ((rnd() - 0.5) * 0.2 * (rnd() * 6.0).exp()) as f32).collect();
        for dtype in [SourceDtype::BF16, SourceDtype::F16, SourceDtype::F32] {
            let t = |x: f32| match dtype {
                SourceDtype::BF16 => half::bf16::from_f32(x).to_f32(),
                SourceDtype::F16 => half::f16::from_f32(x).to_f32(),
                SourceDtype::F32 => x,
            };
            let xs: Vec<f32> = v.iter().map(|&x| t(x)).collect();
            let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
            let scale = t(amax / 448.0);
            let inv = t(1.0 / scale);
            let want: Vec<u8> = xs.iter().map(|&x| e4m3_from_f32(t(x * inv).clamp(-448.0, 448.0))).collect();
            let (q, s) = quantize(dtype, 200, 200, &v);
            assert_eq!(s, scale, "{dtype:?}");
            assert_eq!(q, want, "{dtype:?}");
        }
    }

    #[test]
    fn roundtrip_all_dtypes_and_verify_catches_corruption() {
        let v: Vec<f32> = (0..64 * 96).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.3).collect();
        for dtype in [SourceDtype::BF16, SourceDtype::F16, SourceDtype::F32] {
            let bytes = bytes_of(dtype, &v);
            let w = WeightView { name: "t", dtype, rows: 64, cols: 96, bytes: &bytes };
            let mut out = Fp8.quantize(&w).unwrap();
            let stats = Fp8.verify(&w, &out).unwrap();
            assert_eq!(stats.elements, 64 * 96);
            assert!(stats.cosine > 0.999 && stats.relative_l2 < 0.05, "{stats:?}");
            let dq = Fp8.dequantize(&out, 64, 96);
            assert_eq!(dq.len(), 64 * 96);
            assert!(dq.iter().zip(&v).all(|(a, b)| (a - b).abs() < 0.01));
            // One code one step off fails; so does a scale off by 2%.
            let i = out[0].data.iter().position(|&b| b & 0x7F > 0x20 && b & 0x7F < 0x70).unwrap();
            out[0].data[i] += 1;
            assert!(Fp8.verify(&w, &out).unwrap_err().contains(&format!("[{}, {}]", i / 96, i % 96)));
            out[0].data[i] -= 1;
            let s = numerics::f32_at(&out[1].data, 0) * 1.02;
            out[1].data = s.to_le_bytes().to_vec();
            assert!(Fp8.verify(&w, &out).is_err());
        }
    }

    #[test]
    fn nonfinite_refused() {
        let bytes = bytes_of(SourceDtype::F16, &[1.0, f32::NAN, 2.0, f32::INFINITY]);
        let w = WeightView { name: "double_blocks.3.img_mlp.0.weight", dtype: SourceDtype::F16, rows: 2, cols: 2, bytes: &bytes };
        let e = Fp8.quantize(&w).unwrap_err();
        assert!(matches!(&e, QuantError::NonFinite { name, count: 2, first: 1 } if name == "double_blocks.3.img_mlp.0.weight"));
        assert!(e.to_string().contains("double_blocks.3.img_mlp.0.weight"));
    }
}
