//! `run-recipe forward`: one denoiser forward pass on given inputs, for
//! comparisons with other implementations (scripts/dit_reference.py).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use quantsmith::backend::DeviceChoice;

use super::{checks, usage};

#[derive(Args)]
pub struct ForwardArgs {
    model: PathBuf,
    /// safetensors with `x` [B, C, H, W], `timesteps` [B], `context` [B, T, D], for SDXL, FLUX
    /// and SD3 `y` [B, adm], for FLUX-dev `guidance` [B] (FLUX timesteps are sigma in [0, 1],
    /// SD3's sigma x 1000).
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write `out` (f32).
    #[arg(long)]
    out: PathBuf,
    /// cpu, cuda or cuda:N (auto = cuda when usable).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Timed repetitions after the first pass (prints median seconds; at most 10000).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    repeat: u32,
    /// Observe every Linear input, as calibration does (measures the observers' cost).
    #[arg(long)]
    observe: bool,
}

pub fn run(args: ForwardArgs) -> Result<()> {
    let ForwardArgs { model, inputs, out, device, repeat, observe } = args;
    let device: DeviceChoice = device.parse().map_err(usage)?;
    checks::output_path("--out", &out, Some(&model), true)?;
    checks::input_file("the model", &model)?;
    checks::input_file("--inputs", &inputs)?;
    checks::device(device)?;
    let r = quantsmith::calibrate::forward_file(&model, &inputs, &out, device, repeat as usize, observe)?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
