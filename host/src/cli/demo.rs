//! `run-recipe demo`: the whole job on a built-in synthetic checkpoint
//! (synthesize, quantize, check), in a folder it owns.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use quantsmith::backend::DeviceChoice;
use quantsmith::calibrate::{CalibrateMode, CalibrationOptions};
use quantsmith::convert::Layout;
use quantsmith::pipeline::{self, RunOptions};
use quantsmith::recipe::SandboxLimits;
use quantsmith::recipe::params::RawParams;
use quantsmith::synth;

use super::check::print_check;
use super::run::print_report;
use super::synth::synth_options;
use super::{bad, human_bytes, usage, write_replacing};

#[derive(Args)]
pub struct DemoArgs {
    /// sd15, sdxl, sd3 or flux.
    #[arg(long, default_value = "sdxl")]
    family: String,
    #[arg(long, default_value = "fp8")]
    format: String,
    /// Folder for the two files.
    #[arg(long, default_value = "demo-out")]
    dir: PathBuf,
}

pub fn run(args: DemoArgs) -> Result<()> {
    demo(&args.family, &args.format, &args.dir)
}

fn demo(family: &str, format: &str, dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(usage(format!("--dir {} is not a folder", dir.display())));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let input = dir.join(format!("{family}-tiny.safetensors"));
    let output = dir.join(format!("{family}-tiny.{format}.safetensors"));
    let mut opts = synth_options(family, "tiny", 0, None, false)?;
    // A UNet that behaves like a trained one, so the calibration's evaluation means something.
    opts.init = quantsmith::synth::SynthInit::Conditioned;
    let s = synth::write(&opts, &input, |_, _| {})?;
    println!("1. synthesized {} ({} tensors, {})", input.display(), s.tensors, human_bytes(s.bytes));
    let mut params = RawParams::default();
    params.set(&format!("format={format}")).map_err(bad)?;
    // UNet families in formats with static activation scales also show
    // calibration, sized so that it takes seconds on a CPU.
    let calibrate = quantsmith::calibrate::family_supported(family) && matches!(format, "fp8" | "nvfp4");
    if calibrate {
        for p in ["calib-steps=4", "calib-samples=2", "resolution=256"] {
            params.set(p).map_err(bad)?;
        }
    }
    let opts = RunOptions {
        input: input.clone(),
        output: Some(output.clone()),
        recipe: None,
        params,
        dry_run: false,
        layout: Layout::Comfy,
        device: DeviceChoice::Auto,
        verify: true,
        limits: SandboxLimits::default(),
        // Calibration on the CPU takes seconds: say how far it is.
        progress: true,
        // `demo` owns its folder: running it again replaces its own outputs.
        replace_output: true,
        calibration: CalibrationOptions {
            mode: if calibrate { CalibrateMode::On } else { CalibrateMode::Off },
            eval_inputs: 2,
            eval_resolution: 256,
            ..Default::default()
        },
    };
    let report = pipeline::run(&opts)?;
    write_replacing(&dir.join("report.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    println!("2. quantized with the built-in {} preset:", report.recipe.name);
    print_report(&report);
    let src = quantsmith::checkpoint::Checkpoint::open(&input)?;
    let check = quantsmith::evaluate::check_output(&src, &output)?;
    print!("3. checked {}: ", output.display());
    print_check(&check);
    println!("   run report: {}", dir.join("report.json").display());
    Ok(())
}
