//! Proof that calibration helps: fake-quantized forward passes (weights and
//! activations quantized-dequantized with the chosen scales) against the
//! unquantized forward on held-out inputs (other seeds, timesteps spread over
//! the schedule), per layer and at the output.

use std::collections::HashMap;

use anyhow::{Context, Result};
use serde::Serialize;

use super::schedule::Spacing;
use super::session::gaussian;
use super::smooth::{self, Smoothing};
use crate::checkpoint::Checkpoint;
use crate::formats::{QuantFormat, SourceDtype, WeightView, numerics};
use crate::models::arch::Backbone;
use crate::models::clip::{self, SizeConditioning};
use crate::models::denoiser::{Conditioning, Denoiser, Network};
use crate::models::{InputHook, InputHooks, ReplacedWeights, WeightSource};
use crate::modules::ModuleTable;
use crate::nn::{ActQuant, Ops};
use crate::plan::LayerDecision;
use crate::progress::Progress;

/// Distance of a fake-quantized result from the reference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Agreement {
    /// ||q - ref|| / ||ref||.
    pub relative_l2: f64,
    pub cosine: f64,
}

impl Agreement {
    pub fn between(reference: &[f32], other: &[f32]) -> Agreement {
        let (mut dd, mut rr, mut oo, mut ro) = (0f64, 0f64, 0f64, 0f64);
        for (&r, &o) in reference.iter().zip(other) {
            let (r, o) = (r as f64, o as f64);
            dd += (o - r) * (o - r);
            rr += r * r;
            oo += o * o;
            ro += r * o;
        }
        Agreement {
            relative_l2: if rr > 0.0 { (dd / rr).sqrt() } else { dd.sqrt() },
            cosine: if rr > 0.0 && oo > 0.0 { ro / (rr.sqrt() * oo.sqrt()) } else { 1.0 },
        }
    }
}

/// One quantized layer in the evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct LayerAgreement {
    pub path: String,
    pub format: String,
    /// How far this layer's input has drifted from the reference forward by the
    /// time it arrives, in the static fake-quantized forward (first held-out input).
    pub input: Agreement,
}

/// Output agreement of one activation-quantization mode, averaged over held-out inputs.
#[derive(Clone, Debug, Serialize)]
pub struct ModeAgreement {
    /// `weights-only`, `static` (calibrated scales), `dynamic` (per-tensor scale from each
    /// input), `static-unsmoothed` (with SmoothQuant: the same plan without it).
    pub mode: String,
    pub output: Agreement,
    /// Worst held-out input.
    pub worst_relative_l2: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub inputs: usize,
    /// Where the held-out conditioning came from (it follows the calibration's source).
    pub conditioning: Option<super::session::HeldOut>,
    pub resolution: u32,
    pub sigmas: Vec<f32>,
    pub modes: Vec<ModeAgreement>,
    pub layers: Vec<LayerAgreement>,
    /// Per held-out input, `static` minus `dynamic` output relative L2 (FP8 layers present only).
    pub static_minus_dynamic: Option<PairedDifference>,
    /// `static` is not worse than `dynamic`: its mean paired excess is at most
    /// zero or within two standard errors of zero (with one input: at most zero).
    pub static_no_worse_than_dynamic: Option<bool>,
    /// With SmoothQuant: per held-out input, `static` minus `static-unsmoothed`
    /// output relative L2 (negative: the smoothing helped).
    pub smoothed_minus_unsmoothed: Option<PairedDifference>,
}

/// Mean and standard error of paired per-input differences.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PairedDifference {
    pub mean: f64,
    pub standard_error: f64,
    pub inputs: usize,
}

impl PairedDifference {
    pub fn of(a: &[f64], b: &[f64]) -> PairedDifference {
        let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
        let n = d.len().max(1) as f64;
        let mean = d.iter().sum::<f64>() / n;
        let var = if d.len() > 1 { d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
        PairedDifference { mean, standard_error: (var / n).sqrt(), inputs: d.len() }
    }

    /// Not significantly positive (about 95% one-sided).
    pub fn not_worse(&self) -> bool {
        self.mean <= 0.0 || (self.inputs > 1 && self.mean <= 2.0 * self.standard_error)
    }
}

/// The activation quantization of a quantized layer in each mode.
fn act_quant(format: QuantFormat, static_scale: Option<f32>, dynamic: bool) -> Option<ActQuant> {
    match format {
        QuantFormat::Fp8 if dynamic => Some(ActQuant::Fp8Dynamic),
        QuantFormat::Fp8 => Some(static_scale.map(|scale| ActQuant::Fp8Static { scale }).unwrap_or(ActQuant::Fp8Dynamic)),
        QuantFormat::Nvfp4 => static_scale.map(|s| ActQuant::Nvfp4 { global_scale: s }),
        QuantFormat::Int8 => Some(ActQuant::Int8DynamicRows),
        QuantFormat::Mxfp8 => Some(ActQuant::Mxfp8),
    }
}

/// The model as it will be written: quantized-dequantized weights of every
/// quantized layer as bf16 (what the GPU computes with anyway) and, with
/// SmoothQuant, the folded norms and rows in their stored dtype; keyed by
/// full checkpoint key.
pub fn dequantized_weights(
    ckpt: &Checkpoint,
    layers: &[&LayerDecision],
    smoothing: &Smoothing,
) -> Result<HashMap<String, (Vec<usize>, SourceDtype, Vec<u8>)>> {
    let mut out = HashMap::new();
    let transforms = smoothing.transforms(&ModuleTable::build(ckpt))?;
    let quantized: std::collections::HashSet<String> =
        layers.iter().filter(|l| l.spec.is_some()).map(|l| format!("{}.weight", l.key)).collect();
    // Folded tensors that stay in their dtype; quantized weights are folded below.
    for (key, t) in transforms.iter().filter(|(k, _)| !quantized.contains(*k)) {
        let entry = ckpt.get(key).with_context(|| format!("checkpoint has no `{key}`"))?;
        let dtype = SourceDtype::from_safetensors(entry.dtype).with_context(|| format!("{key}: not a float tensor"))?;
        out.insert(key.clone(), (entry.shape.clone(), dtype, smooth::transformed_bytes(ckpt, key, t)?));
    }
    for l in layers {
        let Some(spec) = l.spec else { continue };
        let key = format!("{}.weight", l.key);
        let t = ckpt.get(&key).with_context(|| format!("checkpoint has no `{key}`"))?;
        let smoothed = match transforms.get(&key) {
            Some(tr) => Some(smooth::transformed_f32(ckpt, &key, tr)?),
            None => None,
        };
        let view = WeightView {
            name: &t.key,
            dtype: if smoothed.is_some() { SourceDtype::F32 } else { l.dtype },
            rows: l.shape[0],
            cols: l.shape[1],
            bytes: smoothed.as_deref().map(bytemuck::cast_slice).unwrap_or(ckpt.bytes(t)),
        };
        let f = spec.implementation();
        let stored = f.quantize(&view)?;
        let deq = f.dequantize(&stored, l.shape[0], l.shape[1]);
        let mut bytes = Vec::with_capacity(deq.len() * 2);
        for v in deq {
            bytes.extend_from_slice(&numerics::f32_to_bf16(v).to_le_bytes());
        }
        out.insert(key, (t.shape.clone(), SourceDtype::BF16, bytes));
    }
    Ok(out)
}

/// Runs the evaluation. `scales`: static activation scale per layer path.
/// With SmoothQuant, `unsmoothed_scales` are the scales the same calibration
/// gives without it: the `static-unsmoothed` mode then measures, on the same
/// held-out inputs, what the smoothing bought.
#[allow(clippy::too_many_arguments)]
pub fn evaluate<O: Ops>(
    ops: &O,
    reference: &Denoiser<O>,
    ckpt: &Checkpoint,
    layers: &[&LayerDecision],
    scales: &HashMap<String, f32>,
    smoothing: &Smoothing,
    unsmoothed_scales: &HashMap<String, f32>,
    held_out: &dyn Fn(usize) -> Result<Option<(O::Tensor, Option<O::Tensor>)>>,
    inputs: usize,
    resolution: u32,
    seed: u64,
    progress: &Progress,
) -> Result<EvalReport> {
    let prefix = ckpt.prefix().to_string();
    let replaced = ReplacedWeights { base: ckpt as &dyn WeightSource, replaced: dequantized_weights(ckpt, layers, smoothing)? };
    let quantized = reference.load_like(ops, &replaced, &prefix).context("loading the fake-quantized model")?;
    drop(replaced);
    let unsmoothed = if smoothing.is_empty() {
        None
    } else {
        let replaced =
            ReplacedWeights { base: ckpt as &dyn WeightSource, replaced: dequantized_weights(ckpt, layers, &Smoothing::default())? };
        Some(reference.load_like(ops, &replaced, &prefix).context("loading the fake-quantized model without SmoothQuant")?)
    };
    let arch = reference.arch().clone();
    let adm = match reference.network() {
        Network::Unet(u) => u.config().adm_in_channels,
        _ => None,
    };

    let mode_hooks = |mode: &str| -> InputHooks {
        let mut h = InputHooks::none();
        if mode == "weights-only" {
            return h;
        }
        let scales = if mode == "static-unsmoothed" { unsmoothed_scales } else { scales };
        for l in layers {
            let Some(spec) = l.spec else { continue };
            let q = act_quant(spec.format, scales.get(&l.path).copied(), mode == "dynamic");
            h.by_module.insert(l.path.clone(), InputHook { observer: None, quant: q });
        }
        h
    };
    let has_fp8 = layers.iter().any(|l| l.spec.is_some_and(|s| s.format == QuantFormat::Fp8));
    let mut modes: Vec<&str> = if has_fp8 { vec!["weights-only", "static", "dynamic"] } else { vec!["weights-only", "static"] };
    if unsmoothed.is_some() {
        modes.push("static-unsmoothed");
    }
    progress.set_total((inputs * modes.len()) as u64);

    // Held-out inputs come from the process calibration samples: a denoising
    // walk (other seeds), driven by the unquantized model, evaluated at a step
    // spread over the schedule (first, middle, late).
    let (walk_sigmas, _) = reference.schedule().sample(10, Spacing::Uniform);
    let eval_steps = [0usize, 4, 8];
    let [_, channels, side, _] = arch.latent_shape(1, resolution, resolution)?;
    let mut sums: Vec<(f64, f64, f64)> = vec![(0.0, 0.0, 0.0); modes.len()];
    let mut per_input: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut layer_report = Vec::new();
    let mut used_sigmas = Vec::new();
    let mut n = 0usize;
    for i in 0..inputs {
        let s = seed.wrapping_add(1_000_003 * i as u64);
        let ctx_dim = reference.context_width();
        let (context, y) = match held_out(i)? {
            Some(cond) => cond,
            None => {
                // Held-out conditioning drawn like the calibration's random conditioning
                // (context and pooled text N(0, 1), real size conditioning), other seeds.
                let tokens = arch.context_tokens;
                let context = ops.from_f32(&[1, tokens, ctx_dim], &gaussian(tokens * ctx_dim, s ^ 0xc0ffee, 1.0))?;
                let y = match (arch.backbone, adm, arch.pooled_width) {
                    (Backbone::Unet, Some(adm), _) => {
                        let p = clip::pooled_width(adm);
                        let pooled = ops.from_f32(&[1, p], &gaussian(p, s ^ 0xbeef, 1.0))?;
                        Some(clip::unet_adm(ops, &pooled, adm, &SizeConditioning::new(resolution, resolution))?)
                    }
                    (Backbone::Unet, None, _) | (_, _, None) => None,
                    (_, _, Some(p)) => Some(ops.from_f32(&[1, p], &gaussian(p, s ^ 0xbeef, 1.0))?),
                };
                (context, y)
            }
        };
        let cond = Conditioning { context, y, batch: 1, guidance: arch.guidance.into_iter().collect() };
        let latents = |lat: &[f32]| ops.from_f32(&[1, channels, side, side], lat);
        let target = eval_steps[i % eval_steps.len()];
        let mut lat: Vec<f32> = gaussian(channels * side * side, s, walk_sigmas[0]);
        for step in 0..target {
            let eps = ops.to_f32(&reference.model_output(ops, &latents(&lat)?, walk_sigmas[step], &cond, &InputHooks::none())?)?;
            let d = walk_sigmas[step + 1] - walk_sigmas[step];
            // v-prediction models return v; the walk only needs a plausible trajectory, so
            // eps-style stepping is kept for both (the evaluation compares like with like).
            for (x, e) in lat.iter_mut().zip(&eps) {
                *x += d * e;
            }
        }
        let sigma = walk_sigmas[target];
        used_sigmas.push(sigma);
        let x = latents(&lat)?;
        let mut ref_hooks = InputHooks::none();
        let first = i == 0;
        if first {
            for l in layers {
                ref_hooks.by_module.insert(l.path.clone(), InputHook::default());
            }
            ref_hooks.recorded = Some(Default::default());
        }
        let want = ops.to_f32(&reference.model_output(ops, &x, sigma, &cond, &ref_hooks)?)?;
        for (m, mode) in modes.iter().enumerate() {
            let mut hooks = mode_hooks(mode);
            if first && *mode == "static" {
                hooks.recorded = Some(Default::default());
            }
            let model = match (&unsmoothed, *mode) {
                (Some(u), "static-unsmoothed") => u,
                _ => &quantized,
            };
            let got = ops.to_f32(&model.model_output(ops, &x, sigma, &cond, &hooks)?)?;
            let a = Agreement::between(&want, &got);
            sums[m].0 += a.relative_l2;
            sums[m].1 += a.cosine;
            sums[m].2 = sums[m].2.max(a.relative_l2);
            per_input[m].push(a.relative_l2);
            if let (Some(rr), Some(qr)) = (&ref_hooks.recorded, &hooks.recorded) {
                let (rr, qr) = (rr.borrow(), qr.borrow());
                for l in layers {
                    let (Some(r), Some(q)) = (rr.get(&l.path), qr.get(&l.path)) else {
                        continue;
                    };
                    let (Some(r), Some(q)) = (r.downcast_ref::<O::Tensor>(), q.downcast_ref::<O::Tensor>()) else {
                        continue;
                    };
                    let mut q = ops.to_f32(q)?;
                    // A smoothed layer sees x / s: undo it to compare with the reference input.
                    if let Some(f) = smoothing.consumer_factors(&l.path) {
                        for row in q.chunks_mut(f.len()) {
                            for (v, s) in row.iter_mut().zip(f) {
                                *v *= s;
                            }
                        }
                    }
                    layer_report.push(LayerAgreement {
                        path: l.path.clone(),
                        format: l.spec.map(|s| s.format.name().to_string()).unwrap_or_default(),
                        input: Agreement::between(&ops.to_f32(r)?, &q),
                    });
                }
            }
            progress.inc(1);
        }
        n += 1;
    }
    progress.finish();
    let modes: Vec<ModeAgreement> = modes
        .iter()
        .zip(&sums)
        .map(|(m, s)| ModeAgreement {
            mode: m.to_string(),
            output: Agreement { relative_l2: s.0 / n.max(1) as f64, cosine: s.1 / n.max(1) as f64 },
            worst_relative_l2: s.2,
        })
        .collect();
    let series = |name: &str| modes.iter().position(|m| m.mode == name).map(|i| per_input[i].clone());
    let static_minus_dynamic = match (series("static"), series("dynamic")) {
        (Some(s), Some(d)) => Some(PairedDifference::of(&s, &d)),
        _ => None,
    };
    let smoothed_minus_unsmoothed = match (series("static"), series("static-unsmoothed")) {
        (Some(s), Some(u)) => Some(PairedDifference::of(&s, &u)),
        _ => None,
    };
    Ok(EvalReport {
        inputs: n,
        conditioning: None,
        resolution,
        sigmas: used_sigmas,
        modes,
        layers: layer_report,
        static_no_worse_than_dynamic: static_minus_dynamic.map(|p| p.not_worse()),
        static_minus_dynamic,
        smoothed_minus_unsmoothed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_of_hand_vectors() {
        let a = Agreement::between(&[3.0, 4.0], &[3.0, 4.0]);
        assert_eq!(a.relative_l2, 0.0);
        assert!((a.cosine - 1.0).abs() < 1e-12);
        // diff (0, 1): ||d|| = 1, ||ref|| = 5 -> 0.2; cos = (9 + 20) / (5 * sqrt(34)).
        let b = Agreement::between(&[3.0, 4.0], &[3.0, 5.0]);
        assert!((b.relative_l2 - 0.2).abs() < 1e-12);
        assert!((b.cosine - 29.0 / (5.0 * 34f64.sqrt())).abs() < 1e-12);
    }

    #[test]
    fn paired_difference_of_hand_vectors() {
        // Differences 0.1, 0.5: mean 0.3, sample sd sqrt(0.08), se 0.2.
        let p = PairedDifference::of(&[1.1, 2.5], &[1.0, 2.0]);
        assert!((p.mean - 0.3).abs() < 1e-12 && (p.standard_error - 0.2).abs() < 1e-12);
        assert!(p.not_worse(), "0.3 is within two standard errors (0.4) of zero");
        // Consistently worse by 0.2 +- 0.01: significant.
        let q = PairedDifference::of(&[1.19, 1.21, 1.2], &[1.0, 1.0, 1.0]);
        assert!(!q.not_worse());
        // One input: only an actual improvement or tie counts.
        assert!(!PairedDifference::of(&[1.01], &[1.0]).not_worse());
        assert!(PairedDifference::of(&[1.0], &[1.0]).not_worse());
    }

    #[test]
    fn activation_modes_per_format() {
        assert_eq!(act_quant(QuantFormat::Fp8, Some(0.5), false), Some(ActQuant::Fp8Static { scale: 0.5 }));
        assert_eq!(act_quant(QuantFormat::Fp8, Some(0.5), true), Some(ActQuant::Fp8Dynamic));
        assert_eq!(act_quant(QuantFormat::Nvfp4, Some(0.25), false), Some(ActQuant::Nvfp4 { global_scale: 0.25 }));
        assert_eq!(act_quant(QuantFormat::Int8, None, false), Some(ActQuant::Int8DynamicRows));
    }
}
