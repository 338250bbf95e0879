//! The `quantsmith:recipe/calibration` host functions (contract 0.1.1): WIT
//! resources map to the session's numbered handles; every error reaches the
//! recipe as `err(message)` and is logged. Time spent here counts against the
//! recipe's time budget, except passes over the model (`denoise`, prompts
//! through the text encoders, `smooth`'s weight scan), whose number the
//! session's `max_forwards` bounds instead; once the
//! budget is used up every call is refused (State::check_deadline), and each
//! call's work is capped by the session's limits (elements per tensor, steps,
//! batch), so no single call runs unbounded.

use std::time::Instant;

use wasmtime::component::Resource;

use super::calibrating::api::{
    CalibrationInfo, ConditioningSource, Host, HostConditioning, HostTensor, NoiseSchedule as WitSchedule, ObservedStats,
    Spacing as WitSpacing,
};
use super::runtime::State;
use crate::calibrate::schedule::Spacing;
use crate::calibrate::session::{CalibSession, CondHandle, CondSource, TensorHandle};

impl State {
    /// Runs `f` on the session, unless the budget is used up; its time counts
    /// against the budget (see [`State::forward`] for forward passes).
    fn session<R>(&mut self, what: &str, f: impl FnOnce(&mut dyn CalibSession) -> anyhow::Result<R>) -> Result<R, String> {
        self.check_deadline(what)?;
        self.run_session(what, f)
    }

    /// A pass over the model (forward, text encoding, smoothing's weight scan):
    /// refused once the budget is used up, like any call, but its own time is
    /// not charged (a real calibration runs minutes of them; their number is
    /// capped by `SessionLimits::max_forwards`).
    fn forward<R>(&mut self, what: &str, f: impl FnOnce(&mut dyn CalibSession) -> anyhow::Result<R>) -> Result<R, String> {
        self.check_deadline(what)?;
        let started = Instant::now();
        let result = self.run_session(what, f);
        self.model_time += started.elapsed();
        result
    }

    fn run_session<R>(&mut self, what: &str, f: impl FnOnce(&mut dyn CalibSession) -> anyhow::Result<R>) -> Result<R, String> {
        let result = match self.calib.as_deref_mut() {
            Some(s) => f(s).map_err(|e| format!("{what}: {e:#}")),
            None => Err(format!("{what}: calibration host calls are only available inside `calibrate`")),
        };
        if let Err(e) = &result {
            tracing::debug!("{}: {e}", self.recipe);
        }
        result
    }

    fn tensor_id(&self, r: &Resource<TensorHandle>) -> Result<u32, String> {
        self.table.get(r).map(|h| h.id).map_err(|e| format!("invalid tensor handle: {e}"))
    }

    fn cond_id(&self, r: &Resource<CondHandle>) -> Result<u32, String> {
        self.table.get(r).map(|h| h.id).map_err(|e| format!("invalid conditioning handle: {e}"))
    }

    fn new_tensor(&mut self, id: u32) -> Result<Resource<TensorHandle>, String> {
        self.table.push(TensorHandle { id }).map_err(|e| format!("too many live tensors: {e}"))
    }

    fn new_cond(&mut self, id: u32) -> Result<Resource<CondHandle>, String> {
        self.table.push(CondHandle { id }).map_err(|e| format!("too many live conditionings: {e}"))
    }

    fn tensor_op(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut dyn CalibSession) -> anyhow::Result<u32>,
    ) -> Result<Resource<TensorHandle>, String> {
        let id = self.session(what, f)?;
        self.new_tensor(id)
    }
}

impl HostTensor for State {
    fn shape(&mut self, r: Resource<TensorHandle>) -> Vec<u64> {
        let Ok(id) = self.tensor_id(&r) else { return vec![] };
        self.calib.as_deref().map(|s| s.shape(id).into_iter().map(|d| d as u64).collect()).unwrap_or_default()
    }

    fn read(&mut self, r: Resource<TensorHandle>) -> Result<Vec<f32>, String> {
        let id = self.tensor_id(&r)?;
        self.session("read", |s| s.read(id))
    }

    fn drop(&mut self, r: Resource<TensorHandle>) -> wasmtime::Result<()> {
        let h = self.table.delete(r)?;
        if let Some(s) = self.calib.as_deref_mut() {
            s.drop_tensor(h.id);
        }
        Ok(())
    }
}

impl HostConditioning for State {
    fn batch(&mut self, r: Resource<CondHandle>) -> u32 {
        let Ok(id) = self.cond_id(&r) else { return 0 };
        self.calib.as_deref().map(|s| s.cond_batch(id)).unwrap_or(0)
    }

    fn drop(&mut self, r: Resource<CondHandle>) -> wasmtime::Result<()> {
        let h = self.table.delete(r)?;
        if let Some(s) = self.calib.as_deref_mut() {
            s.drop_cond(h.id);
        }
        Ok(())
    }
}

fn dims(shape: &[u64]) -> Result<Vec<usize>, String> {
    shape.iter().map(|&d| usize::try_from(d).map_err(|_| format!("dimension {d} is too large"))).collect()
}

impl Host for State {
    fn info(&mut self) -> CalibrationInfo {
        match self.calib.as_deref() {
            Some(s) => {
                let i = s.info();
                CalibrationInfo {
                    family: i.family,
                    latent_channels: i.latent_channels,
                    latent_downscale: 8,
                    native_resolution: i.native_resolution,
                    has_text_encoders: i.has_text_encoders,
                    has_tokenizer: i.has_tokenizer,
                    calib_data_rows: i.calib_data_rows,
                    device: i.device,
                }
            }
            None => CalibrationInfo {
                family: String::new(),
                latent_channels: 0,
                latent_downscale: 8,
                native_resolution: 0,
                has_text_encoders: false,
                has_tokenizer: false,
                calib_data_rows: 0,
                device: String::new(),
            },
        }
    }

    fn randn(&mut self, shape: Vec<u64>, seed: u64) -> Result<Resource<TensorHandle>, String> {
        let shape = dims(&shape)?;
        self.tensor_op("randn", |s| s.randn(&shape, seed))
    }

    fn schedule(&mut self, steps: u32, spacing: WitSpacing) -> Result<WitSchedule, String> {
        let spacing = match spacing {
            WitSpacing::Uniform => Spacing::Uniform,
            WitSpacing::Karras => Spacing::Karras,
        };
        let (sigmas, timesteps) = self.session("schedule", |s| s.schedule(steps as usize, spacing))?;
        Ok(WitSchedule { sigmas, timesteps })
    }

    fn new_conditioning(&mut self, source: ConditioningSource, width: u32, height: u32) -> Result<Resource<CondHandle>, String> {
        let source = match source {
            ConditioningSource::Random(r) => CondSource::Random { count: r.count as usize, seed: r.seed, spread: r.spread },
            ConditioningSource::File(f) => CondSource::File { start: f.start as usize, count: f.count as usize },
            ConditioningSource::Prompts(p) => CondSource::Prompts(p),
        };
        // Prompts run the text encoders: a forward pass, counted as one.
        let id = match source {
            CondSource::Prompts(_) => self.forward("conditioning", |s| s.conditioning(source, width, height))?,
            _ => self.session("conditioning", |s| s.conditioning(source, width, height))?,
        };
        self.new_cond(id)
    }

    fn concat_conditioning(&mut self, parts: Vec<Resource<CondHandle>>) -> Result<Resource<CondHandle>, String> {
        let ids: Vec<u32> = parts.iter().map(|p| self.cond_id(p)).collect::<Result<_, _>>()?;
        let id = self.session("concat-conditioning", |s| s.concat_conditioning(&ids))?;
        self.new_cond(id)
    }

    fn add(&mut self, a: Resource<TensorHandle>, b: Resource<TensorHandle>) -> Result<Resource<TensorHandle>, String> {
        let (a, b) = (self.tensor_id(&a)?, self.tensor_id(&b)?);
        self.tensor_op("add", |s| s.add(a, b))
    }

    fn scale(&mut self, a: Resource<TensorHandle>, f: f32) -> Result<Resource<TensorHandle>, String> {
        let a = self.tensor_id(&a)?;
        self.tensor_op("scale", |s| s.scale(a, f))
    }

    fn lerp(&mut self, a: Resource<TensorHandle>, b: Resource<TensorHandle>, t: f32) -> Result<Resource<TensorHandle>, String> {
        let (a, b) = (self.tensor_id(&a)?, self.tensor_id(&b)?);
        self.tensor_op("lerp", |s| s.lerp(a, b, t))
    }

    fn concat(&mut self, parts: Vec<Resource<TensorHandle>>, dim: u32) -> Result<Resource<TensorHandle>, String> {
        let ids: Vec<u32> = parts.iter().map(|p| self.tensor_id(p)).collect::<Result<_, _>>()?;
        self.tensor_op("concat", |s| s.concat(&ids, dim as usize))
    }

    fn slice_batch(&mut self, a: Resource<TensorHandle>, start: u32, len: u32) -> Result<Resource<TensorHandle>, String> {
        let a = self.tensor_id(&a)?;
        self.tensor_op("slice-batch", |s| s.slice_batch(a, start as usize, len as usize))
    }

    fn activation_stats(&mut self, module: String) -> Result<ObservedStats, String> {
        let (o, steps) = self.session("activation-stats", |s| s.activation_stats(&module))?;
        Ok(ObservedStats {
            amax: o.amax(),
            step_amax: steps.iter().filter_map(|&s| o.step_amax.get(s).map(|&v| (s as u32, v))).collect(),
            channel_amax: o.channel_amax,
            calls: o.calls,
        })
    }

    fn denoise(
        &mut self,
        x: Resource<TensorHandle>,
        sigma: f32,
        cond: Resource<CondHandle>,
        step: u32,
    ) -> Result<Resource<TensorHandle>, String> {
        let (x, cond) = (self.tensor_id(&x)?, self.cond_id(&cond)?);
        let id = self.forward("denoise", |s| s.denoise(x, sigma, cond, step as usize))?;
        self.new_tensor(id)
    }
}

impl super::calibrating::smoothing_api::Host for State {
    fn groups(&mut self) -> Vec<super::calibrating::smoothing_api::SmoothingGroup> {
        use super::calibrating::smoothing_api::{Carrier, SmoothingGroup};
        use crate::calibrate::smooth;
        let groups = self.calib.as_deref().map(|s| s.smoothing_groups()).unwrap_or_default();
        groups
            .into_iter()
            .map(|g| SmoothingGroup {
                producer: g.producer,
                carrier: match g.carrier {
                    smooth::Carrier::Affine => Carrier::NormAffine,
                    // adaLN modulation rows are output rows of the modulation Linear.
                    smooth::Carrier::Rows { .. } | smooth::Carrier::Modulation { .. } => Carrier::OutputRows,
                },
                consumers: g.consumers,
                channels: g.channels as u32,
            })
            .collect()
    }

    fn smooth(&mut self, producer: String, alpha: f32) -> Result<super::calibrating::smoothing_api::Smoothed, String> {
        // A scan of the consumers' weights: a pass like a forward (counted, not timed).
        let (s, act) = self.forward("smooth", |s| s.smooth(&producer, alpha))?;
        let r = s.report(&act);
        Ok(super::calibrating::smoothing_api::Smoothed {
            min_factor: r.min_factor,
            max_factor: r.max_factor,
            amax_before: r.amax_before,
            amax_after: r.amax_after,
        })
    }
}

impl super::calibrating::sampling_api::Host for State {
    fn info(&mut self) -> super::calibrating::sampling_api::SamplingInfo {
        use super::calibrating::sampling_api::{Parameterization as P, SamplingInfo};
        use crate::models::arch::{Parameterization, Sampling};
        let Some(arch) = self.calib.as_deref().map(|s| s.arch().clone()) else {
            return SamplingInfo {
                parameterization: P::Epsilon,
                shift: 0.0,
                classifier_free_guidance: false,
                distilled_guidance: None,
                default_steps: 0,
                context_tokens: 0,
                context_width: 0,
                pooled_width: 0,
            };
        };
        SamplingInfo {
            parameterization: match arch.parameterization {
                Parameterization::Epsilon => P::Epsilon,
                Parameterization::V => P::V,
                Parameterization::Flow => P::Flow,
            },
            shift: match arch.sampling {
                Sampling::Ddpm => 0.0,
                Sampling::DiscreteFlow { shift, .. } | Sampling::Flux { shift } => shift,
            },
            classifier_free_guidance: arch.cfg,
            distilled_guidance: arch.guidance,
            default_steps: arch.default_steps,
            context_tokens: arch.context_tokens as u32,
            context_width: arch.context_width as u32,
            pooled_width: arch.pooled_width.unwrap_or(0) as u32,
        }
    }

    fn with_guidance(&mut self, cond: Resource<CondHandle>, value: f32) -> Result<Resource<CondHandle>, String> {
        let id = self.cond_id(&cond)?;
        let new = self.session("with-guidance", |s| s.with_guidance(id, value))?;
        self.new_cond(new)
    }
}
