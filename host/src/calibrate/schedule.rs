//! Noise schedules of the UNet families, in k-diffusion's sigma terms.
//!
//! SD1.x, SD2.x and SDXL share DDPM's `scaled_linear` betas (0.00085 to 0.012,
//! 1000 steps): `sigma_t = sqrt((1 - alphabar_t) / alphabar_t)`.

/// How schedule sigmas are spaced (the WIT `spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    /// Evenly spaced training timesteps from the last one down (ComfyUI `simple`).
    Uniform,
    /// Karras et al. 2022, rho = 7.
    Karras,
}

/// A discrete training schedule.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    /// sigma of each training timestep, increasing with t.
    sigmas: Vec<f64>,
    log_sigmas: Vec<f64>,
}

impl NoiseSchedule {
    pub fn scaled_linear_sd() -> NoiseSchedule {
        Self::scaled_linear(0.00085, 0.012, 1000)
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
        let log_sigmas = sigmas.iter().map(|s| s.ln()).collect();
        NoiseSchedule { sigmas, log_sigmas }
    }

    pub fn sigma_min(&self) -> f64 {
        self.sigmas[0]
    }

    pub fn sigma_max(&self) -> f64 {
        *self.sigmas.last().expect("non-empty")
    }

    /// The (fractional) training timestep of `sigma`: linear interpolation in
    /// log-sigma between neighbouring timesteps, clamped to the table.
    pub fn sigma_to_t(&self, sigma: f32) -> f32 {
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

#[cfg(test)]
mod tests {
    use super::*;

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
