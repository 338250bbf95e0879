//! From observed activations to static scales (SPEC §3, §6).
//!
//! - `max`: the running max |x| of a module input over every calibration call.
//! - `percentile(p)`: ModelOpt's diffusion percentile: the p-th percentile of the
//!   per-step amax buckets, so a few extreme timesteps do not set the scale.
//!
//! Static activation scale = calibrated amax / format max: 448 for FP8
//! `input_scale`, 448 * 6 for the NVFP4 activation global scale.

use crate::formats::QuantFormat;
use crate::nn::ObserverStats;

/// How observed activations become an amax (the WIT `algorithm`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "name", content = "value")]
pub enum Algorithm {
    Max,
    Percentile(f32),
}

impl Algorithm {
    pub fn validate(self) -> Result<Algorithm, String> {
        match self {
            Algorithm::Percentile(p) if !(p > 0.0 && p <= 100.0) => Err(format!("percentile must be in (0, 100], got {p}")),
            a => Ok(a),
        }
    }
}

/// The calibrated amax of one observer; `steps` are the buckets that saw forward passes.
pub fn calibrated_amax(stats: &ObserverStats, steps: &[usize], algorithm: Algorithm) -> f32 {
    match algorithm {
        Algorithm::Max => stats.amax(),
        Algorithm::Percentile(p) => {
            let mut v: Vec<f32> = steps.iter().filter_map(|&s| stats.step_amax.get(s).copied()).collect();
            if v.is_empty() {
                return stats.amax();
            }
            v.sort_by(f32::total_cmp);
            percentile_sorted(&v, p)
        }
    }
}

/// Linear-interpolated percentile (numpy's default) of sorted values.
pub fn percentile_sorted(sorted: &[f32], p: f32) -> f32 {
    let pos = (p as f64 / 100.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let w = pos - lo as f64;
    (sorted[lo] as f64 * (1.0 - w) + sorted[hi] as f64 * w) as f32
}

/// The static activation scale a format stores, or `None` when the format has
/// none (INT8 and MXFP8 quantize activations dynamically in ComfyUI).
pub fn activation_scale(format: QuantFormat, amax: f32) -> Option<f32> {
    let max = match format {
        QuantFormat::Fp8 => 448.0,
        QuantFormat::Nvfp4 => 448.0 * 6.0,
        QuantFormat::Int8 | QuantFormat::Mxfp8 => return None,
    };
    // A module whose input was all zeros still gets a usable (tiny) scale.
    Some((amax / max).max(f32::MIN_POSITIVE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(steps: &[f32]) -> ObserverStats {
        ObserverStats { channel_amax: vec![], step_amax: steps.to_vec(), calls: steps.len() as u64 }
    }

    #[test]
    fn max_is_the_largest_bucket() {
        let s = stats(&[1.0, 7.5, 3.0, 0.0]);
        assert_eq!(calibrated_amax(&s, &[0, 1, 2], Algorithm::Max), 7.5);
    }

    #[test]
    fn percentile_interpolates_over_seen_steps_only() {
        // Buckets 0..4 = 1, 2, 3, 4 and an unseen bucket 4 = 0 that must not count.
        let s = stats(&[1.0, 2.0, 3.0, 4.0, 0.0]);
        let seen = [0, 1, 2, 3];
        assert_eq!(calibrated_amax(&s, &seen, Algorithm::Percentile(100.0)), 4.0);
        assert_eq!(calibrated_amax(&s, &seen, Algorithm::Percentile(50.0)), 2.5);
        // numpy.percentile([1,2,3,4], 90) = 3.7
        assert!((calibrated_amax(&s, &seen, Algorithm::Percentile(90.0)) - 3.7).abs() < 1e-6);
    }

    #[test]
    fn activation_scales_per_format() {
        assert_eq!(activation_scale(QuantFormat::Fp8, 448.0), Some(1.0));
        assert_eq!(activation_scale(QuantFormat::Nvfp4, 2688.0), Some(1.0));
        assert_eq!(activation_scale(QuantFormat::Int8, 3.0), None);
        assert!(activation_scale(QuantFormat::Fp8, 0.0).unwrap() > 0.0);
    }

    #[test]
    fn percentile_out_of_range_is_refused() {
        assert!(Algorithm::Percentile(0.0).validate().is_err());
        assert!(Algorithm::Percentile(100.5).validate().is_err());
        assert!(Algorithm::Percentile(99.9).validate().is_ok());
    }
}
