//! `run-recipe synth`: a synthetic checkpoint with the exact tensor layout of a
//! real model (tiny or full size), or a standalone text encoder.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use quantsmith::progress::{Progress, Unit};
use quantsmith::synth::{self, Family, Scale, SynthOptions};

use super::{bad, checks, human_bytes, usage};

#[derive(Args)]
pub struct SynthArgs {
    /// sd15, sdxl, sd3 or flux; or a standalone text encoder as ComfyUI keeps
    /// them: clip-l, clip-g or t5xxl (F16, or --variant fp8-scaled for T5).
    family: String,
    /// tiny (same keys, narrow layers, a few MB) or full (real size).
    #[arg(long, default_value = "tiny")]
    scale: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// flux: schnell; sd15: inpaint; sdxl: refiner; sd3: 3.5-medium, 3.5-large.
    #[arg(long)]
    variant: Option<String>,
    /// A full single-file checkpoint (model.diffusion_model. prefix, VAE and text encoder tensors).
    #[arg(long)]
    full_checkpoint: bool,
    /// default (wide activation ranges, outlier columns) or conditioned (models that
    /// behave like trained ones: bf16 moves their output little; for comparisons).
    #[arg(long, default_value = "default")]
    init: String,
    /// sd3 and flux at tiny scale: text context and pooled widths of the tiny
    /// synthetic text encoders (`synth clip-l|clip-g|t5xxl --scale tiny`) instead
    /// of the real 4096 / 2048 / 768, so prompts run end to end on them.
    #[arg(long)]
    tiny_text: bool,
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(args: SynthArgs) -> Result<()> {
    let SynthArgs { family, scale, seed, variant, full_checkpoint, init, tiny_text, output } = args;
    if let Some(kind) = text_encoder_kind(&family) {
        return synth_text_encoder(kind, &scale, seed, variant.as_deref(), &output);
    }
    let mut opts = synth_options(&family, &scale, seed, variant, full_checkpoint)?;
    checks::output_path("-o", &output, None, true)?;
    opts.init = quantsmith::synth::SynthInit::parse(&init).map_err(|e| bad(format!("{e:#}")))?;
    opts.tiny_text = tiny_text;
    if tiny_text && (opts.scale != Scale::Tiny || !matches!(opts.family, Family::Sd3 | Family::Flux)) {
        return Err(usage("--tiny-text is for sd3 and flux at --scale tiny"));
    }
    // A tiny model is written in a blink; a full-size one takes minutes.
    let pb = if matches!(opts.scale, Scale::Tiny) { Progress::hidden() } else { Progress::start("synthesize", Unit::Bytes, None) };
    let summary = synth::write(&opts, &output, |done, total| {
        if !pb.has_total() {
            pb.set_total(total);
        }
        pb.set_position(done);
    })?;
    pb.finish();
    println!("wrote {} ({} tensors, {} parameters, {})", output.display(), summary.tensors, summary.params, human_bytes(summary.bytes));
    Ok(())
}

/// `synth clip-l|clip-g|t5xxl`.
fn text_encoder_kind(name: &str) -> Option<quantsmith::models::text::synth_text::SynthEncoder> {
    use quantsmith::models::text::synth_text::SynthEncoder;
    match name.trim().to_ascii_lowercase().as_str() {
        "clip-l" | "clip_l" => Some(SynthEncoder::ClipL),
        "clip-g" | "clip_g" => Some(SynthEncoder::ClipG),
        "t5xxl" | "t5" => Some(SynthEncoder::T5Xxl),
        _ => None,
    }
}

fn synth_text_encoder(
    kind: quantsmith::models::text::synth_text::SynthEncoder,
    scale: &str,
    seed: u64,
    variant: Option<&str>,
    output: &Path,
) -> Result<()> {
    let full = matches!(Scale::parse(scale).map_err(|e| bad(format!("{e:#}")))?, Scale::Full);
    let scaled_fp8 = match variant {
        None | Some("fp16") => false,
        Some("fp8-scaled") => true,
        Some(v) => return Err(bad(format!("unknown text-encoder variant {v:?} (fp16, or fp8-scaled for t5xxl)"))),
    };
    let bytes = quantsmith::models::text::synth_text::write(output, kind, full, safetensors::Dtype::F16, scaled_fp8, seed)
        .map_err(|e| bad(format!("{e:#}")))?;
    println!("wrote {} ({})", output.display(), human_bytes(bytes));
    Ok(())
}

/// Options for a synthetic diffusion model (also `demo`'s input).
pub fn synth_options(family: &str, scale: &str, seed: u64, variant: Option<String>, full_checkpoint: bool) -> Result<SynthOptions> {
    let family = Family::parse(family).map_err(|e| bad(format!("{e:#}")))?;
    let scale = Scale::parse(scale).map_err(|e| bad(format!("{e:#}")))?;
    Ok(SynthOptions { scale, seed, variant, full_checkpoint, ..SynthOptions::new(family) })
}
