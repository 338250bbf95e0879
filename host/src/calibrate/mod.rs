//! Calibration: the stage between the plan and the write, for formats whose
//! ComfyUI layout carries static activation scales (FP8 `input_scale`, NVFP4's
//! activation global scale; SPEC §3, §6).
//!
//! The host loads the UNet on the chosen backend with an observer on the input
//! of every quantized module, hands the recipe a [`session::CalibSession`]
//! through the `calibration` WIT interface, and the recipe walks denoising
//! trajectories with it. Observed amax values become scales ([`scales`]); a
//! fake-quantized forward on held-out inputs measures what they are worth ([`eval`]).
//!
//! - [`schedule`]: the families' noise schedules.
//! - [`session`]: the host calls, tensor handles and limits.
//! - [`smooth`]: SmoothQuant factors and where they are folded.

pub mod eval;
pub mod scales;
pub mod schedule;
pub mod session;
pub mod smooth;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::backend::DeviceChoice;
use crate::formats::QuantFormat;
use crate::modules::ModuleKind;
use crate::nn::{ChannelAxis, ObserverSpec, Ops};
use crate::plan::{LayerDecision, ResolvedPlan};
use crate::progress::{Progress, Unit};
use crate::recipe::calibrating::{Algorithm as WitAlgorithm, CalibrationSettings};
use crate::recipe::wit::ParamValue;
use crate::recipe::{HostContext, LoadedRecipe, RecipeError};
use scales::Algorithm;
use session::{CalibSession, Session, SessionInputs, SessionLimits, SessionStats};

/// `--calibrate`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CalibrateMode {
    /// When the plan has FP8 or NVFP4 layers, the family has a forward pass
    /// (SD1.x, SDXL, SD3, FLUX.1) and the recipe exports `calibrate`.
    #[default]
    Auto,
    /// As `auto`, but a run that cannot calibrate fails instead of writing weight-only scales.
    On,
    Off,
}

/// What calibration needs from the command line.
#[derive(Clone, Debug, Default)]
pub struct CalibrationOptions {
    pub mode: CalibrateMode,
    pub device: DeviceChoice,
    /// Folder with CLIP's `vocab.json` and `merges.txt`.
    pub clip_vocab: Option<PathBuf>,
    /// Text-encoder files for the diffusion transformers (`--text-encoder`).
    pub text_encoders: Vec<PathBuf>,
    /// T5's `tokenizer.json`.
    pub t5_tokenizer: Option<PathBuf>,
    /// safetensors with `context` (and `pooled`) rows.
    pub calib_data: Option<PathBuf>,
    /// Held-out inputs for the fake-quantized evaluation (0 = none).
    pub eval_inputs: usize,
    /// Resolution of the evaluation (pixels); 0 = the family's native one.
    pub eval_resolution: u32,
    pub limits: SessionLimits,
}

/// One quantized layer's calibration result.
#[derive(Clone, Debug, Serialize)]
pub struct LayerCalibration {
    pub path: String,
    pub format: String,
    /// Calibrated amax of the input (after the algorithm).
    pub amax: f32,
    /// max |x| over everything seen.
    pub observed_max: f32,
    /// The stored static activation scale, when the format has one.
    pub input_scale: Option<f32>,
    /// The input is divided by SmoothQuant factors (folded into its producer).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub smoothed: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct CalibrationReport {
    pub algorithm: Algorithm,
    pub device: String,
    pub seconds: f64,
    #[serde(flatten)]
    pub session: SessionStats,
    pub notes: Vec<String>,
    pub layers: Vec<LayerCalibration>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub smoothing: Vec<smooth::SmoothingReport>,
    pub eval: Option<eval::EvalReport>,
}

/// Static activation scales by layer path, the SmoothQuant factors to fold, and the report.
pub struct Calibration {
    pub input_scales: HashMap<String, f32>,
    pub smoothing: smooth::Smoothing,
    pub report: CalibrationReport,
}

/// What calibration did.
pub enum Outcome {
    Calibrated(Box<Calibration>),
    /// Why it did not run (recorded in the report's notes).
    Skipped(String),
}

/// Families whose forward pass this build can run.
pub fn family_supported(family: &str) -> bool {
    crate::models::arch::Architecture::of(family, "").is_ok_and(|a| crate::models::denoiser::backbone_available(a.backbone))
}

/// FP8 and NVFP4 store static activation scales; INT8 gains from SmoothQuant
/// (the recipe decides, and may decline).
fn wants_calibration(plan: &ResolvedPlan) -> bool {
    plan.quantized().any(|l| l.spec.is_some_and(|s| matches!(s.format, QuantFormat::Fp8 | QuantFormat::Nvfp4 | QuantFormat::Int8)))
}

/// Why calibration will not run, or `None` when it will.
pub fn skip_reason(opts: &CalibrationOptions, plan: &ResolvedPlan, family: &str, recipe: &LoadedRecipe) -> Option<String> {
    if opts.mode == CalibrateMode::Off {
        return Some("--calibrate off".into());
    }
    if !wants_calibration(plan) {
        return Some("no FP8, NVFP4 or INT8 layer in the plan (MXFP8 quantizes activations at run time and takes no SmoothQuant)".into());
    }
    if !family_supported(family) {
        return Some(format!("no host forward pass for {family} yet (SD1.x, SDXL, SD3 and FLUX.1 have one)"));
    }
    if !recipe.can_calibrate() {
        return Some(format!("recipe {} does not export `calibrate` (built against contract 0.1.0)", recipe.name()));
    }
    if opts.device == DeviceChoice::Cpu && opts.mode == CalibrateMode::Auto {
        return Some(format!("--device cpu; {CPU_IS_SLOW}"));
    }
    None
}

/// Why `auto` never starts an hours-long CPU calibration of a real model.
const CPU_IS_SLOW: &str = "calibrating on the CPU is slow, pass --calibrate on to do it anyway";

/// Runs calibration (and the evaluation) or says why not; an error only for real failures.
#[allow(clippy::too_many_arguments)]
pub fn run(
    ctx: &Arc<HostContext>,
    recipe: &LoadedRecipe,
    params: &[(String, ParamValue)],
    family: &str,
    variant: &str,
    plan: &ResolvedPlan,
    opts: &CalibrationOptions,
    progress: bool,
) -> Result<Outcome> {
    if let Some(reason) = skip_reason(opts, plan, family, recipe) {
        if opts.mode == CalibrateMode::On {
            bail!(crate::error::Refused(format!("--calibrate on: cannot calibrate: {reason}")));
        }
        tracing::info!("no activation calibration: {reason}");
        return Ok(Outcome::Skipped(reason));
    }
    let arch = crate::models::arch::Architecture::of(family, variant)?;
    let arch = crate::models::denoiser::with_text_widths(arch, ctx.checkpoint.as_ref(), ctx.checkpoint.prefix())?;
    let layers: Vec<&LayerDecision> = plan.quantized().collect();
    let observed: Vec<(String, ObserverSpec)> = layers
        .iter()
        .map(|l| {
            let axis = match ctx.modules.get(&l.path).map(|m| m.kind) {
                Some(ModuleKind::Conv) => ChannelAxis::Dim1,
                _ => ChannelAxis::Last,
            };
            (l.path.clone(), ObserverSpec { channels: l.shape[1], axis })
        })
        .collect();
    // A bad --calib-data file is bad input, refused before any model is loaded.
    let calib_data = match &opts.calib_data {
        Some(p) => Some((p.clone(), session::calib_data_rows(p).map_err(|e| crate::error::Refused(format!("{e:#}")))?)),
        None => None,
    };
    // Text encoders and tokenizers of the wrong kind or that do not parse are bad
    // input too, refused before the model is loaded.
    let text = session::DitTextInputs::open(&arch, &opts.text_encoders, opts.t5_tokenizer.as_deref())
        .map_err(|e| crate::error::Refused(format!("{e:#}")))?;
    for note in text.iter().flat_map(|t| &t.notes) {
        tracing::warn!("{note}");
    }
    let inputs = SessionInputs {
        checkpoint: ctx.checkpoint.clone(),
        arch,
        text,
        tokenizer_dir: opts.clip_vocab.clone(),
        calib_data,
        observed,
        limits: opts.limits,
        // Started by `with_backend` when calibration does run.
        progress: Progress::hidden(),
        walks: params.iter().find(|(k, _)| k == "calib-samples").and_then(|(_, v)| match v {
            ParamValue::Integer(n) => u64::try_from(*n).ok(),
            _ => None,
        }),
    };
    match opts.device {
        // `--device cpu` with `auto` was skipped above (skip_reason).
        DeviceChoice::Cpu => with_backend(crate::nn::cpu::CpuOps::new(), ctx, recipe, params, &layers, inputs, opts, progress),
        DeviceChoice::Cuda(n) => {
            let ops = crate::nn::cuda::CudaOps::new(n).with_context(|| format!("--device cuda:{n} cannot be used for calibration"))?;
            with_backend(ops, ctx, recipe, params, &layers, inputs, opts, progress)
        }
        DeviceChoice::Auto => match crate::nn::cuda::CudaOps::new(0) {
            Ok(ops) => with_backend(ops, ctx, recipe, params, &layers, inputs, opts, progress),
            Err(e) if opts.mode == CalibrateMode::Auto => {
                let reason = format!("no usable CUDA GPU ({e:#}); {CPU_IS_SLOW}");
                tracing::info!("no activation calibration: {reason}");
                Ok(Outcome::Skipped(reason))
            }
            Err(e) => {
                tracing::warn!("calibrating on the CPU (no usable CUDA GPU: {e:#}); full-size models take a long time there");
                with_backend(crate::nn::cpu::CpuOps::new(), ctx, recipe, params, &layers, inputs, opts, progress)
            }
        },
    }
}

#[allow(clippy::too_many_arguments)]
fn with_backend<O: Ops + Send + 'static>(
    ops: O,
    ctx: &Arc<HostContext>,
    recipe: &LoadedRecipe,
    params: &[(String, ParamValue)],
    layers: &[&LayerDecision],
    mut inputs: SessionInputs,
    opts: &CalibrationOptions,
    progress: bool,
) -> Result<Outcome>
where
    O::Tensor: Send,
{
    let started = Instant::now();
    let device = ops.name();
    tracing::info!("calibrating on {device}: {} observed module inputs", inputs.observed.len());
    let text_notes = inputs.text.as_ref().map(|t| t.describe()).unwrap_or_default();
    // The display starts as the model starts loading; its total comes from the
    // recipe's walk (`schedule` x `calib-samples`), see `Session::schedule`.
    if progress {
        inputs.progress = Progress::start("calibration", Unit::Items("forward passes"), None);
    }
    let progress = inputs.progress.clone();
    let session = Session::new(ops, inputs)?;
    let (result, session) = recipe.calibrate(ctx, params.to_vec(), Box::new(session))?;
    progress.finish();
    let settings: CalibrationSettings = match result {
        Ok(Some(s)) => s,
        Ok(None) => {
            if opts.mode == CalibrateMode::On {
                bail!(crate::error::Refused(format!("--calibrate on: recipe {} chose not to calibrate", recipe.name())));
            }
            tracing::info!("recipe {} chose not to calibrate", recipe.name());
            return Ok(Outcome::Skipped(format!("recipe {} chose not to calibrate", recipe.name())));
        }
        Err(reason) => {
            return Err(RecipeError::Invalid { recipe: recipe.name().to_string(), message: format!("calibration failed: {reason}") }.into());
        }
    };
    let algorithm = match settings.algorithm {
        WitAlgorithm::Max => Algorithm::Max,
        WitAlgorithm::Percentile(p) => Algorithm::Percentile(p),
    }
    .validate()
    .map_err(|m| RecipeError::Invalid { recipe: recipe.name().to_string(), message: m })?;
    let stats = session.stats();
    if stats.forwards == 0 {
        return Err(RecipeError::Invalid {
            recipe: recipe.name().to_string(),
            message: "calibrate returned settings but ran no forward pass (denoise)".into(),
        }
        .into());
    }
    let observers = session.observers()?;
    let smoothing = session.smoothing();
    let mut input_scales = HashMap::new();
    let mut unsmoothed_scales = HashMap::new();
    let mut report_layers = Vec::new();
    let mut channel_amax = std::collections::BTreeMap::new();
    for (l, o) in layers.iter().zip(&observers) {
        let Some(spec) = l.spec else { continue };
        if o.calls == 0 {
            bail!("internal: quantized layer {} was never reached by the forward pass", l.path);
        }
        let mut amax = scales::calibrated_amax(o, &stats.steps, algorithm);
        if let Some(s) = scales::activation_scale(spec.format, amax) {
            unsmoothed_scales.insert(l.path.clone(), s);
        }
        let factors = smoothing.consumer_factors(&l.path);
        if let Some(s) = factors {
            // Exact for `max`; per-step buckets (percentile) shrink in proportion.
            let smoothed = smooth::smoothed_amax(&o.channel_amax, s);
            let observed = o.amax();
            amax = match algorithm {
                Algorithm::Max => smoothed,
                _ if observed > 0.0 => amax * (smoothed / observed),
                _ => amax,
            };
            channel_amax.insert(l.path.clone(), o.channel_amax.clone());
        }
        let input_scale = scales::activation_scale(spec.format, amax);
        if let Some(s) = input_scale {
            input_scales.insert(l.path.clone(), s);
        }
        report_layers.push(LayerCalibration {
            path: l.path.clone(),
            format: spec.format.name().into(),
            amax,
            observed_max: o.amax(),
            input_scale,
            smoothed: factors.is_some(),
        });
    }
    let smoothing_report = smooth::report(&smoothing, &channel_amax);
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        "calibration: {} forward passes over {} steps in {:.1} s ({:.1} s loading the model, {:.3} s per pass)",
        stats.forwards,
        stats.steps.len(),
        seconds,
        stats.load_seconds,
        stats.forward_seconds / stats.forwards as f64
    );
    // The evaluation runs on the same backend, after the recipe is done.
    let eval = if opts.eval_inputs > 0 {
        let any = session.into_any();
        let session = *any.downcast::<Session<O>>().map_err(|_| anyhow::anyhow!("internal: session type"))?;
        let resolution = if opts.eval_resolution > 0 { opts.eval_resolution } else { session.info().native_resolution };
        let held_out = |i: usize| session.held_out_conditioning(i, resolution);
        let progress = if progress.is_visible() {
            Progress::start("evaluation", Unit::Items("passes over held-out inputs"), None)
        } else {
            Progress::hidden()
        };
        let mut r = eval::evaluate(
            session.ops(),
            session.model(),
            &ctx.checkpoint,
            layers,
            &input_scales,
            &smoothing,
            &unsmoothed_scales,
            &held_out,
            opts.eval_inputs,
            resolution,
            0x5eed_e7a1,
            &progress,
        )
        .context("evaluating the fake-quantized model")?;
        r.conditioning = Some(session.held_out_source());
        Some(r)
    } else {
        None
    };
    Ok(Outcome::Calibrated(Box::new(Calibration {
        input_scales,
        smoothing,
        report: CalibrationReport {
            algorithm,
            device,
            seconds,
            session: stats,
            notes: settings.notes.into_iter().chain(text_notes).collect(),
            layers: report_layers,
            smoothing: smoothing_report,
            eval,
        },
    })))
}

/// What `run-recipe forward` measured.
#[derive(Clone, Debug, Serialize)]
pub struct ForwardReport {
    pub device: String,
    pub output_shape: Vec<usize>,
    /// Load of the model's weights onto the device.
    pub load_seconds: f64,
    /// First pass (includes one-time setup such as kernel compilation).
    pub first_seconds: f64,
    /// Median of the repetitions, if any.
    pub median_seconds: Option<f64>,
    pub observed_modules: usize,
    pub peak_device_bytes: Option<u64>,
}

/// One denoiser forward pass (UNet, FLUX or SD3 MMDiT, by the checkpoint's keys)
/// on the tensors of `inputs` (`x`, `timesteps`, `context`, `y` for SDXL, FLUX
/// and SD3, `guidance` for FLUX-dev), written as `out` (f32) to `out_path`.
/// Timesteps are what ComfyUI passes each model: FLUX sigma in [0, 1] (and
/// guidance e.g. 3.5), SD3 sigma x 1000, UNets the DDPM timestep.
pub fn forward_file(
    model: &std::path::Path,
    inputs: &std::path::Path,
    out_path: &std::path::Path,
    device: DeviceChoice,
    repeat: usize,
    observe: bool,
) -> Result<ForwardReport> {
    let ckpt = crate::checkpoint::Checkpoint::open(model)?;
    match device {
        DeviceChoice::Cpu => forward_with(crate::nn::cpu::CpuOps::new(), &ckpt, inputs, out_path, repeat, observe),
        DeviceChoice::Cuda(n) => forward_with(crate::nn::cuda::CudaOps::new(n)?, &ckpt, inputs, out_path, repeat, observe),
        DeviceChoice::Auto => match crate::nn::cuda::CudaOps::new(0) {
            Ok(ops) => forward_with(ops, &ckpt, inputs, out_path, repeat, observe),
            Err(e) => {
                tracing::warn!("running on the CPU: {e:#}");
                forward_with(crate::nn::cpu::CpuOps::new(), &ckpt, inputs, out_path, repeat, observe)
            }
        },
    }
}

/// A denoiser `run-recipe forward` can run, by what the checkpoint holds.
enum ForwardModel<O: Ops> {
    Unet(crate::models::unet::Unet<O>),
    Flux(crate::models::flux::Flux<O>),
    Mmdit(crate::models::mmdit::Mmdit<O>),
}

/// The tensors of a `run-recipe forward` inputs file, as (shape, f32 values).
struct ForwardInputs {
    x: (Vec<usize>, Vec<f32>),
    timesteps: Vec<f32>,
    context: (Vec<usize>, Vec<f32>),
    y: Option<(Vec<usize>, Vec<f32>)>,
    guidance: Option<Vec<f32>>,
}

fn read_forward_inputs(inputs: &std::path::Path) -> Result<ForwardInputs> {
    type Tensor = (Vec<usize>, Vec<f32>);
    let bytes = std::fs::read(inputs).with_context(|| format!("cannot read {}", inputs.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", inputs.display()))?;
    let get = |name: &str| -> Result<Option<Tensor>> {
        let Ok(t) = st.tensor(name) else { return Ok(None) };
        let dtype =
            crate::formats::SourceDtype::from_safetensors(t.dtype()).with_context(|| format!("`{name}` must be F32, F16 or BF16"))?;
        Ok(Some((t.shape().to_vec(), crate::formats::numerics::decode_dtype(dtype, t.data()))))
    };
    let need = |name: &str| get(name)?.with_context(|| format!("{} has no `{name}` tensor", inputs.display()));
    Ok(ForwardInputs {
        x: need("x")?,
        timesteps: need("timesteps")?.1,
        context: need("context")?,
        y: get("y")?,
        guidance: get("guidance")?.map(|g| g.1),
    })
}

fn forward_with<O: Ops>(
    ops: O,
    ckpt: &crate::checkpoint::Checkpoint,
    inputs: &std::path::Path,
    out_path: &std::path::Path,
    repeat: usize,
    observe: bool,
) -> Result<ForwardReport> {
    use crate::models::flux::{Flux, FluxConfig};
    use crate::models::mmdit::{Mmdit, MmditConfig};
    use crate::models::unet::{Unet, UnetConfig};
    use crate::models::{InputHook, InputHooks, WeightSource};
    // A missing or malformed inputs file is bad input (exit 3), not a failure.
    let inp = read_forward_inputs(inputs).map_err(|e| crate::error::Refused(format!("{e:#}")))?;

    let src: &dyn WeightSource = ckpt;
    let prefix = ckpt.prefix();
    let is_flux = src.contains(&format!("{prefix}double_blocks.0.img_attn.qkv.weight"))
        || src.contains(&format!("{prefix}single_blocks.0.linear1.weight"));
    let is_mmdit = src.contains(&format!("{prefix}joint_blocks.0.x_block.attn.qkv.weight"));
    let started = Instant::now();
    let model = if is_flux {
        ForwardModel::Flux(Flux::load(&ops, src, prefix, FluxConfig::from_source(src, prefix)?)?)
    } else if is_mmdit {
        ForwardModel::Mmdit(Mmdit::load(&ops, src, prefix, MmditConfig::from_source(src, prefix)?)?)
    } else {
        ForwardModel::Unet(Unet::load(&ops, src, prefix, UnetConfig::from_source(src, prefix)?)?)
    };
    let x = ops.from_f32(&inp.x.0, &inp.x.1)?;
    let context = ops.from_f32(&inp.context.0, &inp.context.1)?;
    let y = match &inp.y {
        Some((s, v)) => Some(ops.from_f32(s, v)?),
        None => None,
    };
    let _ = ops.to_f32(&ops.from_f32(&[1], &[0.0])?)?;
    let load_seconds = started.elapsed().as_secs_f64();
    let tv = &inp.timesteps;
    let run = |hooks: &InputHooks| -> Result<O::Tensor> {
        match &model {
            ForwardModel::Unet(m) => m.forward(&ops, &x, tv, &context, y.as_ref(), hooks),
            ForwardModel::Flux(m) => {
                let y = y.as_ref().ok_or_else(|| {
                    crate::error::Refused(format!("{} has no `y` tensor (FLUX's pooled CLIP-L vector)", inputs.display()))
                })?;
                if m.config().guidance_embed != inp.guidance.is_some() {
                    let need = if m.config().guidance_embed {
                        "needs a `guidance` tensor (FLUX-dev)"
                    } else {
                        "takes no `guidance` tensor (FLUX-schnell)"
                    };
                    return Err(crate::error::Refused(format!("{}: this model {need}", inputs.display())).into());
                }
                m.forward(&ops, &x, tv, &context, y, inp.guidance.as_deref(), hooks)
            }
            ForwardModel::Mmdit(m) => {
                let y = y.as_ref().ok_or_else(|| {
                    crate::error::Refused(format!("{} has no `y` tensor (SD3's pooled CLIP-L ‖ CLIP-G vector)", inputs.display()))
                })?;
                if inp.guidance.is_some() {
                    return Err(crate::error::Refused(format!("{}: SD3 takes no `guidance` tensor", inputs.display())).into());
                }
                m.forward(&ops, &x, tv, &context, y, hooks)
            }
        }
    };

    let mut hooks = InputHooks::none();
    if observe {
        let observed: Vec<(String, ObserverSpec)> = match &model {
            ForwardModel::Unet(_) => crate::modules::ModuleTable::build(ckpt)
                .iter()
                .filter(|m| m.kind == ModuleKind::Linear)
                .map(|m| (m.path.clone(), ObserverSpec { channels: *m.weight_shape.last().unwrap_or(&1), axis: ChannelAxis::Last }))
                .collect(),
            ForwardModel::Flux(m) => m.module_inputs(),
            ForwardModel::Mmdit(m) => m.module_inputs(),
        };
        ops.observers_reset(&observed.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>(), 64)?;
        for (slot, (p, _)) in observed.iter().enumerate() {
            hooks.by_module.insert(p.clone(), InputHook { observer: Some(slot), quant: None });
        }
    }
    let started = Instant::now();
    let out = run(&hooks)?;
    let values = ops.to_f32(&out)?;
    let first_seconds = started.elapsed().as_secs_f64();
    // The op profile (QUANTSMITH_PROFILE_OPS=1 on CUDA) covers the timed passes only.
    ops.profile_reset()?;
    let mut times = Vec::new();
    for _ in 0..repeat {
        let t0 = Instant::now();
        let o = run(&hooks)?;
        // Reading the (small) output synchronises with the device.
        ops.to_f32(&o)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    if let Some(table) = ops.profile_report()? {
        eprintln!("op profile, {repeat} timed passes (device time between CUDA events around each op):\n{table}");
    }
    let shape = ops.shape(&out);
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), &bytes)?;
    safetensors::serialize_to_file([("out", view)], None, out_path).with_context(|| format!("cannot write {}", out_path.display()))?;
    Ok(ForwardReport {
        device: ops.name(),
        output_shape: shape,
        load_seconds,
        first_seconds,
        median_seconds: times.get(times.len() / 2).copied(),
        observed_modules: hooks.by_module.len(),
        peak_device_bytes: ops.peak_device_bytes(),
    })
}
