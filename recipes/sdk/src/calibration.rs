//! Calibration plans, in the manner of ModelOpt's diffusion example: a set of
//! prompts, a denoising walk of 20-30 steps, classifier-free guidance batches
//! (unconditional and conditional together), every step observed by the host.
//!
//! Tensors stay in the host: this module only holds handles and asks the host
//! (`quantsmith:recipe/calibration`) to make latents, conditioning and forward
//! passes. A recipe uses [`CalibrationPlan`] as is (the presets do), or writes
//! its own walk with the same host calls.
//!
//! ```no_run
//! use quantsmith_recipe_sdk::prelude::*;
//! use quantsmith_recipe_sdk::calibration::CalibrationSettings;
//!
//! fn calibrate() -> Result<Option<CalibrationSettings>, String> {
//!     // 8 samples of 25 steps at 1024², whatever the user's parameters say.
//!     let mut plan = CalibrationPlan::from_params(&Params::load(), Family::Sdxl)?;
//!     plan.samples = 8;
//!     plan.steps = 25;
//!     plan.run()
//! }
//! ```

pub use crate::bindings::exports::quantsmith::recipe::calibrate::{Algorithm, CalibrationSettings};
pub use crate::bindings::quantsmith::recipe::calibration as host;
/// SmoothQuant folding (contract 0.1.2).
pub use crate::bindings::quantsmith::recipe::smoothing;
/// How the family samples (contract 0.1.3).
pub use crate::bindings::quantsmith::recipe::sampling;

use crate::detect::Family;
use crate::params::{ParamSpecBuilder, Params};
use crate::types::ParamSpec;
use host::{Conditioning, ConditioningSource, FileRows, RandomConditioning, Spacing, Tensor};

/// Prompts of the default plan: varied subjects, styles and compositions, so
/// the backbone sees the range of activations real use produces.
pub const DEFAULT_PROMPTS: &[&str] = &[
    "a photograph of an astronaut riding a horse on the moon, highly detailed",
    "a watercolor painting of a quiet harbour at dawn with fishing boats",
    "portrait of an elderly woman with freckles, soft window light, 85mm",
    "a futuristic city skyline at night, neon reflections on wet streets",
    "a bowl of ramen on a wooden table, steam rising, food photography",
    "an oil painting of a stormy sea with a lighthouse, dramatic clouds",
    "a cute corgi wearing sunglasses on a beach, bright summer day",
    "isometric pixel art of a small cottage in a forest clearing",
    "macro photo of a dew-covered spider web in the morning sun",
    "a medieval knight in ornate armour standing in a misty forest",
    "minimalist poster of a mountain range with bold geometric shapes",
    "a cozy library interior with tall shelves and a reading chair, warm light",
    "an anime illustration of a girl with blue hair under cherry blossoms",
    "aerial view of a winding river through autumn forests",
    "a vintage sports car parked on a cobblestone street in Rome",
    "a detailed pencil sketch of an old tree with twisted roots",
];

/// Where conditioning comes from (`calib-source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Prompts when the checkpoint has text encoders and the user gave a CLIP
    /// vocabulary, else the user's `--calib-data`, else random embeddings.
    Auto,
    Prompts,
    File,
    Random,
}

/// A calibration walk.
#[derive(Clone, Debug)]
pub struct CalibrationPlan {
    /// Denoising steps per sample (each one forward pass of a CFG batch of 2).
    pub steps: u32,
    /// Trajectories (prompts).
    pub samples: u32,
    /// Square image side in pixels.
    pub resolution: u32,
    pub seed: u64,
    /// Classifier-free guidance scale of the walk.
    pub guidance: f32,
    pub source: Source,
    pub prompts: Vec<String>,
    pub algorithm: Algorithm,
    /// SmoothQuant alpha for every group the host can fold (`None`: off).
    pub smoothquant: Option<f32>,
    /// The plan stores static activation scales (FP8, NVFP4). Without them and
    /// without SmoothQuant there is nothing to calibrate and [`run`](Self::run) returns `None`.
    pub activation_scales: bool,
}

impl CalibrationPlan {
    /// Families the host can run forward passes for.
    pub fn supports(family: Family) -> bool {
        matches!(family, Family::Sd15 | Family::Sd2 | Family::Sdxl | Family::Sd3 | Family::Flux)
    }

    /// The image side a family was trained at (SD2's 512 base and 768-v
    /// variants share a preset: 768 covers both).
    pub fn native_resolution(family: Family) -> u32 {
        match family {
            Family::Sdxl | Family::Sd3 | Family::Flux => 1024,
            Family::Sd2 => 768,
            _ => 512,
        }
    }

    /// The guidance a walk uses by default: classifier-free guidance for UNets
    /// (7.5) and SD3/3.5 (4.5, as ComfyUI's SD3.5 workflows), FLUX.1-dev's
    /// distilled guidance 3.5 (schnell takes none).
    pub fn default_guidance(family: Family) -> f64 {
        match family {
            Family::Sd3 => 4.5,
            Family::Flux => 3.5,
            _ => 7.5,
        }
    }

    pub fn params(family: Family) -> Vec<ParamSpec> {
        vec![
            ParamSpecBuilder::integer("calib-steps", if family == Family::Flux { 0 } else { 20 }, "Calibration: denoising steps per sample (ModelOpt uses 20-30); 0 = the model's default (FLUX.1-schnell 4, others 20)"),
            ParamSpecBuilder::integer("calib-samples", 8, "Calibration: trajectories, one prompt each (ModelOpt's full run uses 128)"),
            ParamSpecBuilder::integer("resolution", Self::native_resolution(family) as i64, "Calibration: image side in pixels (multiple of 64)"),
            ParamSpecBuilder::integer("seed", 0, "Calibration: seed of the latents and random conditioning"),
            ParamSpecBuilder::number(
                "guidance",
                Self::default_guidance(family),
                if family == Family::Flux {
                    "Calibration: FLUX.1-dev's distilled guidance fed to the model (schnell ignores it; FLUX samples without classifier-free guidance)"
                } else {
                    "Calibration: classifier-free guidance scale of the walk"
                },
            ),
            ParamSpecBuilder::choice("calib-source", "auto", &["auto", "prompts", "file", "random"], "Calibration conditioning: prompts (text encoders + --clip-vocab), file (--calib-data), random embeddings, or auto (the first available)"),
            ParamSpecBuilder::choice("calib-algorithm", "max", &["max", "percentile"], "How observed activations become static scales: running max, or a percentile of per-step maxima"),
            ParamSpecBuilder::number("calib-percentile", 99.0, "Percentile (0-100] for calib-algorithm=percentile"),
            ParamSpecBuilder::text("smoothquant", "auto", "SmoothQuant, folded into the norms and rows feeding each Linear: an alpha in (0, 1], off, or auto (0.5 for int8 and nvfp4, where it measurably helps; off for fp8 and mxfp8)"),
        ]
    }

    /// The plan the user's parameters describe (defaults where a recipe does not declare them).
    pub fn from_params(p: &Params, family: Family) -> Result<CalibrationPlan, String> {
        let int = |name: &str, default: i64, lo: i64, hi: i64| -> Result<i64, String> {
            let v = p.integer(name).unwrap_or(default);
            if v < lo || v > hi {
                return Err(format!("{name} must be {lo}..={hi}, got {v}"));
            }
            Ok(v)
        };
        let steps = int("calib-steps", if family == Family::Flux { 0 } else { 20 }, 0, 1000)? as u32;
        let samples = int("calib-samples", 8, 1, 4096)? as u32;
        let resolution = int("resolution", Self::native_resolution(family) as i64, 64, 4096)? as u32;
        if resolution % 64 != 0 {
            return Err(format!("resolution must be a multiple of 64, got {resolution}"));
        }
        let seed = p.integer("seed").unwrap_or(0) as u64;
        let guidance = p.number("guidance").unwrap_or(Self::default_guidance(family)) as f32;
        if !guidance.is_finite() || !(0.0..=50.0).contains(&guidance) {
            return Err(format!("guidance must be 0..=50, got {guidance}"));
        }
        let source = match p.text("calib-source").unwrap_or("auto") {
            "prompts" => Source::Prompts,
            "file" => Source::File,
            "random" => Source::Random,
            _ => Source::Auto,
        };
        let algorithm = match p.text("calib-algorithm").unwrap_or("max") {
            "percentile" => {
                let q = p.number("calib-percentile").unwrap_or(99.0) as f32;
                if !(q > 0.0 && q <= 100.0) {
                    return Err(format!("calib-percentile must be in (0, 100], got {q}"));
                }
                Algorithm::Percentile(q)
            }
            _ => Algorithm::Max,
        };
        let format = p.format()?;
        let smoothquant = smoothquant_alpha(p.text("smoothquant").unwrap_or("auto"), format)?;
        let activation_scales = matches!(format, crate::params::Format::Fp8 | crate::params::Format::Nvfp4);
        Ok(CalibrationPlan {
            steps,
            samples,
            resolution,
            seed,
            guidance,
            source,
            prompts: DEFAULT_PROMPTS.iter().map(|s| s.to_string()).collect(),
            algorithm,
            smoothquant,
            activation_scales,
        })
    }

    /// The source `Auto` resolves to on this run.
    pub fn resolved_source(&self, info: &host::CalibrationInfo) -> Result<Source, String> {
        let prompts_ok = info.has_text_encoders && info.has_tokenizer;
        match self.source {
            Source::Auto if prompts_ok => Ok(Source::Prompts),
            Source::Auto if info.calib_data_rows > 0 => Ok(Source::File),
            Source::Auto => Ok(Source::Random),
            Source::Prompts if !info.has_text_encoders && info.latent_channels == 16 => Err(
                "calib-source=prompts: SD3/3.5 and FLUX need their text encoders: pass --text-encoder FILE for each (clip_l, clip_g, t5xxl), or use --calib-data or calib-source=random".into(),
            ),
            Source::Prompts if !info.has_text_encoders => {
                Err("calib-source=prompts: the checkpoint holds no text encoders (use a full single-file checkpoint, --calib-data or calib-source=random)".into())
            }
            Source::Prompts if !info.has_tokenizer && info.latent_channels == 16 => Err(
                "calib-source=prompts needs a tokenizer for each --text-encoder: --clip-vocab DIR for CLIP (e.g. ComfyUI's comfy/sd1_tokenizer) and --t5-tokenizer FILE for T5 (comfy/text_encoders/t5_tokenizer/tokenizer.json)".into(),
            ),
            Source::Prompts if !info.has_tokenizer => Err("calib-source=prompts needs --clip-vocab DIR (vocab.json and merges.txt, e.g. ComfyUI's comfy/sd1_tokenizer)".into()),
            Source::File if info.calib_data_rows == 0 => Err("calib-source=file needs --calib-data FILE".into()),
            s => Ok(s),
        }
    }

    /// Negative and positive conditioning of sample `i`.
    /// Sample `i`'s negative (only when `cfg`: FLUX samples without one) and positive conditioning.
    fn conditioning(&self, source: Source, info: &host::CalibrationInfo, i: u32, cfg: bool) -> Result<(Option<Conditioning>, Conditioning), String> {
        let (w, h) = (self.resolution, self.resolution);
        let random = |seed: u64| ConditioningSource::Random(RandomConditioning { count: 1, seed, spread: 1.0 });
        let neg_seed = self.seed.wrapping_mul(0x9E37_79B9).wrapping_add(2 * i as u64 + 1);
        let pos_seed = self.seed.wrapping_mul(0x9E37_79B9).wrapping_add(2 * i as u64);
        let (neg, pos) = match source {
            Source::Prompts => {
                let prompt = self.prompts[i as usize % self.prompts.len()].clone();
                (ConditioningSource::Prompts(vec![String::new()]), ConditioningSource::Prompts(vec![prompt]))
            }
            Source::File => {
                let rows = info.calib_data_rows;
                (random(neg_seed), ConditioningSource::File(FileRows { start: i % rows, count: 1 }))
            }
            _ => (random(neg_seed), random(pos_seed)),
        };
        let neg = if cfg { Some(host::new_conditioning(&neg, w, h)?) } else { None };
        Ok((neg, host::new_conditioning(&pos, w, h)?))
    }

    /// Walks `samples` Euler trajectories of `steps` steps with CFG and returns
    /// the settings the host turns observations into scales with.
    pub fn run(&self) -> Result<Option<CalibrationSettings>, String> {
        if !self.activation_scales && self.smoothquant.is_none() {
            return Ok(None);
        }
        let info = host::info();
        let sampling = sampling::info();
        let source = self.resolved_source(&info)?;
        let side = (self.resolution / info.latent_downscale.max(1)) as u64;
        let steps = if self.steps == 0 { sampling.default_steps.max(1) } else { self.steps };
        let sched = host::schedule(steps, Spacing::Uniform)?;
        let sigmas = &sched.sigmas;
        let channels = info.latent_channels as u64;
        for i in 0..self.samples {
            let (neg, pos) = self.conditioning(source, &info, i, sampling.classifier_free_guidance)?;
            // FLUX samples one conditioning, its guidance an input of the model;
            // every other family batches negative and positive for CFG.
            let cond = if let Some(neg) = &neg {
                host::concat_conditioning(&[neg, &pos])?
            } else if sampling.distilled_guidance.is_some() {
                sampling::with_guidance(&pos, self.guidance)?
            } else {
                pos
            };
            let noise = host::randn(&[1, channels, side, side], self.seed.wrapping_add(i as u64))?;
            let mut x: Tensor = host::scale(&noise, sigmas[0])?;
            for step in 0..steps as usize {
                let d = if sampling.classifier_free_guidance {
                    let batch = host::concat(&[&x, &x], 0)?;
                    let both = host::denoise(&batch, sigmas[step], &cond, step as u32)?;
                    let uncond = host::slice_batch(&both, 0, 1)?;
                    let positive = host::slice_batch(&both, 1, 1)?;
                    host::lerp(&uncond, &positive, self.guidance)?
                } else {
                    host::denoise(&x, sigmas[step], &cond, step as u32)?
                };
                let delta = host::scale(&d, sigmas[step + 1] - sigmas[step])?;
                x = host::add(&x, &delta)?;
            }
        }
        let source_name = match source {
            Source::Prompts => "prompts",
            Source::File => "--calib-data rows",
            _ => "random embeddings",
        };
        let guidance = if sampling.classifier_free_guidance {
            format!("CFG {}", self.guidance)
        } else if sampling.distilled_guidance.is_some() {
            format!("distilled guidance {}", self.guidance)
        } else {
            "no guidance".to_string()
        };
        let mut notes = vec![format!(
            "calibration: {} samples x {steps} steps at {}x{}, {guidance} with {source_name}",
            self.samples, self.resolution, self.resolution
        )];
        if let Some(alpha) = self.smoothquant {
            notes.push(smooth_all(alpha)?);
        }
        Ok(Some(CalibrationSettings { algorithm: self.algorithm.clone(), notes }))
    }
}

/// SmoothQuant with `alpha` on every group the host can fold; returns a note.
pub fn smooth_all(alpha: f32) -> Result<String, String> {
    let groups = smoothing::groups();
    let (mut lo, mut hi) = (f32::INFINITY, 0f32);
    for g in &groups {
        let s = smoothing::smooth(&g.producer, alpha)?;
        lo = lo.min(s.min_factor);
        hi = hi.max(s.max_factor);
    }
    Ok(if groups.is_empty() {
        "smoothquant: no foldable group in this plan".to_string()
    } else {
        format!("smoothquant: alpha {alpha} on {} groups (factors {lo:.3}..{hi:.3}), folded into norms and producer rows", groups.len())
    })
}

/// The `smoothquant` parameter: `auto`, `off` (or 0) or an alpha in (0, 1].
/// `auto` smooths the formats where it was measured to help (SDXL, 24 held-out
/// inputs, BENCHMARKS.md): INT8 (-6% output error) and NVFP4 (-2%); FP8 is unchanged by it.
pub fn smoothquant_alpha(text: &str, format: crate::params::Format) -> Result<Option<f32>, String> {
    use crate::params::Format;
    match text.trim() {
        "auto" => Ok(matches!(format, Format::Int8 | Format::Nvfp4).then_some(0.5)),
        "off" | "none" | "0" => Ok(None),
        t => match t.parse::<f32>() {
            Ok(a) if a.is_finite() && a > 0.0 && a <= 1.0 => Ok(Some(a)),
            _ => Err(format!("smoothquant must be auto, off or an alpha in (0, 1], got {t:?}")),
        },
    }
}
