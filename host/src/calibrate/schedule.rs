//! Noise schedules, in k-diffusion's sigma terms, as ComfyUI's
//! `comfy/model_sampling.py` defines them (pinned commit, SPEC section 6):
//!
//! - SD1.x, SD2.x and SDXL share DDPM's `scaled_linear` betas (0.00085 to 0.012,
//!   1000 steps): `sigma_t = sqrt((1 - alphabar_t) / alphabar_t)`; the model
//!   timestep of a sigma is its (fractional) index in that table.
//! - SD3/3.5 and FLUX.1-schnell are rectified flows (`ModelSamplingDiscreteFlow`):
//!   `sigma(t) = shift t / (1 + (shift - 1) t)` at `t = i / 1000`, i = 1..=1000,
//!   and the model timestep is `sigma * multiplier` (SD3: shift 3.0, multiplier
//!   1000; schnell: shift 1.0, multiplier 1.0).
//! - FLUX.1-dev (`ModelSamplingFlux`): `sigma(t) = e^mu / (e^mu + 1/t - 1)` with
//!   `mu` = shift = 1.15 at `t = i / 10000`, i = 1..=10000; model timestep = sigma.

/// How schedule sigmas are spaced (the WIT `spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    /// Evenly spaced training timesteps from the last one down (ComfyUI `simple`).
    Uniform,
    /// Karras et al. 2022, rho = 7.
    Karras,
}

/// How a model takes its noise level.
#[derive(Clone, Copy, Debug, PartialEq)]
enum TimestepMap {
    /// The fractional index of sigma in the table (DDPM UNets).
    TableIndex,
    /// `sigma * multiplier` (flows).
    Scaled(f64),
}

/// A discrete training schedule.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    /// sigma of each training timestep, increasing with t.
    sigmas: Vec<f64>,
    log_sigmas: Vec<f64>,
    timestep: TimestepMap,
}

impl NoiseSchedule {
    pub fn scaled_linear_sd() -> NoiseSchedule {
        Self::scaled_linear(0.00085, 0.012, 1000)
    }

    /// ComfyUI's `ModelSamplingDiscreteFlow(shift, multiplier)`, 1000 steps.
    pub fn discrete_flow(shift: f64, multiplier: f64) -> NoiseSchedule {
        let sigmas: Vec<f64> = (1..=1000).map(|i| time_snr_shift(shift, i as f64 / 1000.0)).collect();
        Self::from_table(sigmas, TimestepMap::Scaled(multiplier))
    }

    /// ComfyUI's `ModelSamplingFlux(shift)`, 10000 steps.
    pub fn flux(shift: f64) -> NoiseSchedule {
        let sigmas: Vec<f64> = (1..=10000).map(|i| flux_time_shift(shift, i as f64 / 10000.0)).collect();
        Self::from_table(sigmas, TimestepMap::Scaled(1.0))
    }

    fn from_table(sigmas: Vec<f64>, timestep: TimestepMap) -> NoiseSchedule {
        let log_sigmas = sigmas.iter().map(|s| s.ln()).collect();
        NoiseSchedule { sigmas, log_sigmas, timestep }
    }

    pub fn scaled_linear(beta_start: f64, beta_end: f64, steps: usize) -> NoiseSchedule {
        let (a, b) = (beta_start.sqrt(), beta_end.sqrt());
        let mut alphabar = 1.0f64;
        let sigmas: Vec<f64> = (0..steps)
            .map(|i| {
                let s = a + (b - a) * i as f64 / (steps - 1) as f64;
                alphabar *= 1.0 - s * s;
                ((1.0 - alphabar) / alphabar).sqrt()
            })
            .collect();
        Self::from_table(sigmas, TimestepMap::TableIndex)
    }

    pub fn sigma_min(&self) -> f64 {
        self.sigmas[0]
    }

    pub fn sigma_max(&self) -> f64 {
        *self.sigmas.last().expect("non-empty")
    }

    /// The timestep the model takes at `sigma`: for DDPM tables the
    /// (fractional) training timestep, by linear interpolation in log-sigma
    /// between neighbouring timesteps, clamped to the table; for flows
    /// `sigma * multiplier`.
    pub fn sigma_to_t(&self, sigma: f32) -> f32 {
        if let TimestepMap::Scaled(m) = self.timestep {
            return (sigma as f64 * m) as f32;
        }
        let ls = (sigma as f64).max(1e-10).ln();
        let n = self.log_sigmas.len();
        if ls <= self.log_sigmas[0] {
            return 0.0;
        }
        if ls >= self.log_sigmas[n - 1] {
            return (n - 1) as f32;
        }
        let hi = self.log_sigmas.partition_point(|&l| l < ls);
        let lo = hi - 1;
        let w = (ls - self.log_sigmas[lo]) / (self.log_sigmas[hi] - self.log_sigmas[lo]);
        (lo as f64 + w) as f32
    }

    /// `steps + 1` sigmas (decreasing, last 0) and the `steps` timesteps.
    pub fn sample(&self, steps: usize, spacing: Spacing) -> (Vec<f32>, Vec<f32>) {
        let mut sigmas: Vec<f32> = match spacing {
            Spacing::Uniform => {
                let stride = self.sigmas.len() as f64 / steps as f64;
                (0..steps).map(|i| self.sigmas[self.sigmas.len() - 1 - (i as f64 * stride) as usize] as f32).collect()
            }
            Spacing::Karras => {
                let rho = 7.0f64;
                let (lo, hi) = (self.sigma_min().powf(1.0 / rho), self.sigma_max().powf(1.0 / rho));
                (0..steps)
                    .map(|i| {
                        let r = if steps == 1 { 0.0 } else { i as f64 / (steps - 1) as f64 };
                        (hi + r * (lo - hi)).powf(rho) as f32
                    })
                    .collect()
            }
        };
        let timesteps = sigmas.iter().map(|&s| self.sigma_to_t(s)).collect();
        sigmas.push(0.0);
        (sigmas, timesteps)
    }
}

/// ComfyUI's `time_snr_shift(alpha, t)`.
fn time_snr_shift(alpha: f64, t: f64) -> f64 {
    if alpha == 1.0 {
        return t;
    }
    alpha * t / (1.0 + (alpha - 1.0) * t)
}

/// ComfyUI's `flux_time_shift(mu, 1.0, t)`.
fn flux_time_shift(mu: f64, t: f64) -> f64 {
    mu.exp() / (mu.exp() + (1.0 / t - 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd3_flow_schedule() {
        // shift 3: sigma(0.5) = 1.5 / 2 = 0.75; sigma(0.001) = 0.003 / 1.002; timestep = 1000 sigma.
        let s = NoiseSchedule::discrete_flow(3.0, 1000.0);
        assert_eq!(s.sigmas.len(), 1000);
        assert!((s.sigmas[499] - 0.75).abs() < 1e-12);
        assert!((s.sigma_min() - 0.003 / 1.002).abs() < 1e-12);
        assert_eq!(s.sigma_max(), 1.0);
        assert_eq!(s.sigma_to_t(0.75), 750.0);
        // `simple` with 4 steps: indices 999, 749, 499, 249 -> t = 1, .75, .5, .25 shifted.
        let (sig, ts) = s.sample(4, Spacing::Uniform);
        let want = [1.0, 2.25 / 2.5, 0.75, 0.75 / 1.5];
        for (a, b) in sig.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{sig:?}");
        }
        assert_eq!(sig[4], 0.0);
        assert!((ts[2] - 750.0).abs() < 1e-3, "{ts:?}");
    }

    #[test]
    fn schnell_flow_is_the_identity() {
        let s = NoiseSchedule::discrete_flow(1.0, 1.0);
        let (sig, ts) = s.sample(4, Spacing::Uniform);
        assert_eq!(sig, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
        assert_eq!(ts, vec![1.0, 0.75, 0.5, 0.25]);
    }

    #[test]
    fn flux_dev_schedule() {
        // mu = 1.15: sigma(0.5) = e^1.15 / (e^1.15 + 1); timestep = sigma.
        let s = NoiseSchedule::flux(1.15);
        assert_eq!(s.sigmas.len(), 10000);
        let e = 1.15f64.exp();
        assert!((s.sigmas[4999] - e / (e + 1.0)).abs() < 1e-12);
        assert_eq!(s.sigma_max(), 1.0);
        assert_eq!(s.sigma_to_t(0.6), 0.6);
        let (sig, _) = s.sample(2, Spacing::Uniform);
        assert!((sig[1] as f64 - e / (e + 1.0)).abs() < 1e-6, "{sig:?}");
    }

    #[test]
    fn sd_schedule_endpoints() {
        // Known values of SD's schedule (k-diffusion / ComfyUI print these):
        // sigma_min 0.0292, sigma_max 14.6146.
        let s = NoiseSchedule::scaled_linear_sd();
        assert!((s.sigma_min() - 0.029168).abs() < 1e-5, "{}", s.sigma_min());
        assert!((s.sigma_max() - 14.614642).abs() < 1e-4, "{}", s.sigma_max());
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let s = NoiseSchedule::scaled_linear_sd();
        for t in [0usize, 1, 250, 500, 999] {
            assert!((s.sigma_to_t(s.sigmas[t] as f32) - t as f32).abs() < 1e-3, "t {t}");
        }
        // Halfway in log space between two neighbours is t + 0.5.
        let mid = ((s.log_sigmas[10] + s.log_sigmas[11]) / 2.0).exp() as f32;
        assert!((s.sigma_to_t(mid) - 10.5).abs() < 1e-3);
    }

    #[test]
    fn uniform_spacing_matches_simple_scheduler() {
        // ComfyUI `simple` with 4 steps on 1000 sigmas: indices 999, 749, 499, 249.
        let s = NoiseSchedule::scaled_linear_sd();
        let (sig, ts) = s.sample(4, Spacing::Uniform);
        assert_eq!(sig.len(), 5);
        assert_eq!(*sig.last().unwrap(), 0.0);
        let want = [999.0, 749.0, 499.0, 249.0];
        for (t, w) in ts.iter().zip(want) {
            assert!((t - w).abs() < 1e-3, "{ts:?}");
        }
    }

    #[test]
    fn karras_spans_min_to_max() {
        let s = NoiseSchedule::scaled_linear_sd();
        let (sig, _) = s.sample(10, Spacing::Karras);
        assert!((sig[0] as f64 - s.sigma_max()).abs() < 1e-3);
        assert!((sig[9] as f64 - s.sigma_min()).abs() < 1e-5);
        assert!(sig.windows(2).all(|w| w[0] > w[1]));
    }
}
