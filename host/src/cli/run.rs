//! `run-recipe run`: quantize a checkpoint with a recipe. Every path and value the
//! command line names is checked before a weight is read (see `checks`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use quantsmith::backend::DeviceChoice;
use quantsmith::calibrate::session::SessionLimits;
use quantsmith::calibrate::{CalibrateMode, CalibrationOptions};
use quantsmith::convert::Layout;
use quantsmith::pipeline::{self, RunOptions, RunReport};
use quantsmith::recipe::params::RawParams;

use super::{SandboxArgs, bad, checks, human_bytes, untrusted, usage, write_replacing};

/// `--eval-resolution`: 0 (the family's native size) or 64..=4096 in steps of 64, as the recipes' `resolution`.
fn parse_eval_resolution(s: &str) -> Result<u32, String> {
    let v: u32 = s.trim().parse().map_err(|_| format!("{s:?} is not a whole number of pixels"))?;
    if v != 0 && !((64..=4096).contains(&v) && v.is_multiple_of(64)) {
        return Err(format!("must be 0 (native) or a multiple of 64 from 64 to 4096, got {v}"));
    }
    Ok(v)
}

#[derive(Args, Clone)]
pub struct CalibrationArgs {
    /// Static activation scales from forward passes (FP8 input_scale, NVFP4
    /// activation global scale): auto = when the plan, family and recipe allow
    /// it (and, on the CPU, only for small models); on = fail if it cannot run.
    #[arg(long, value_enum, default_value_t = CalibrateMode::Auto)]
    calibrate: CalibrateMode,
    /// Folder with CLIP's vocab.json and merges.txt (e.g. ComfyUI's comfy/sd1_tokenizer),
    /// so calibration can encode real prompts with the checkpoint's text encoders.
    #[arg(long)]
    clip_vocab: Option<PathBuf>,
    /// A text-encoder file as ComfyUI keeps them (clip_l, clip_g, t5xxl_fp16 or
    /// its FP8 variants; the kind is read from its keys and shapes), so SD3/3.5
    /// and FLUX calibration can encode real prompts. Repeat for each encoder.
    #[arg(long = "text-encoder", value_name = "FILE")]
    text_encoders: Vec<PathBuf>,
    /// T5's tokenizer.json (ComfyUI ships one in comfy/text_encoders/t5_tokenizer/),
    /// for prompts through a T5-XXL --text-encoder.
    #[arg(long, value_name = "FILE")]
    t5_tokenizer: Option<PathBuf>,
    /// safetensors of conditioning rows for calibration: `context` [N, tokens, width]
    /// (and `pooled` [N, P] for SDXL (1280), SD3 (2048) and FLUX (768)).
    #[arg(long)]
    calib_data: Option<PathBuf>,
    /// Held-out inputs for the fake-quantized evaluation in the report (0 = skip it; at most 1024).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=1024))]
    eval_inputs: u32,
    /// Resolution of the evaluation in pixels (default 0: the family's native one; else 64..4096, a multiple of 64).
    #[arg(long, default_value_t = 0, value_parser = parse_eval_resolution)]
    eval_resolution: u32,
    /// Most forward passes a recipe may ask for (1 to 1000000).
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    calib_max_forwards: u32,
}

impl CalibrationArgs {
    fn options(&self, device: DeviceChoice) -> CalibrationOptions {
        CalibrationOptions {
            mode: self.calibrate,
            device,
            clip_vocab: self.clip_vocab.clone(),
            text_encoders: self.text_encoders.clone(),
            t5_tokenizer: self.t5_tokenizer.clone(),
            calib_data: self.calib_data.clone(),
            eval_inputs: self.eval_inputs as usize,
            eval_resolution: self.eval_resolution,
            limits: SessionLimits { max_forwards: self.calib_max_forwards as usize, ..SessionLimits::default() },
        }
    }
}

#[derive(Args)]
pub struct RunArgs {
    model: PathBuf,
    /// Output file (default: <model>.<format>.safetensors beside the input).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// A built-in preset (sd15, sdxl, sd3, flux), a path to a .wasm recipe, or auto.
    #[arg(long, default_value = "auto")]
    recipe: String,
    /// Recipe parameter, key=value (repeatable); overrides --config.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// TOML file of recipe parameters (top-level keys or a [params] table).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the plan (each layer, its format, bytes before -> after) and write nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long, value_enum, default_value_t = Layout::Comfy)]
    layout: Layout,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Dequantize every layer and record its error in the report.
    #[arg(long)]
    verify: bool,
    /// Write a JSON run report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Replace an existing output file (and report).
    #[arg(long)]
    force: bool,
    /// No progress display (no bars on a terminal, no progress lines elsewhere).
    #[arg(short, long)]
    quiet: bool,
    #[command(flatten)]
    calibration: CalibrationArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

pub fn run(args: RunArgs) -> Result<()> {
    // Everything the command line names is checked before a weight is read.
    checks::set_values(&args.set)?;
    let device: DeviceChoice = args.device.parse().map_err(usage)?;
    if let Some(out) = &args.output
        && !args.dry_run
    {
        checks::output_path("-o", out, Some(&args.model), args.force)?;
    }
    if let Some(report) = &args.report {
        checks::output_path("--report", report, Some(&args.model), args.force)?;
        if args.output.as_deref().is_some_and(|o| o == report.as_path()) {
            return Err(usage("--report and -o name the same file"));
        }
    }
    checks::input_file("the model", &args.model)?;
    checks::recipe_file(&args.recipe)?;
    if let Some(p) = &args.calibration.calib_data {
        checks::input_file("--calib-data", p)?;
    }
    if let Some(p) = &args.calibration.clip_vocab
        && !p.is_dir()
    {
        return Err(bad(format!("--clip-vocab {} is not a folder (it should hold vocab.json and merges.txt)", p.display())));
    }
    let mut params = RawParams::default();
    for pair in &args.set {
        params.set(pair).map_err(usage)?;
    }
    if let Some(path) = &args.config {
        let text = checks::read_config(path)?;
        params.load_toml(&text, &path.display().to_string()).map_err(bad)?;
    }
    checks::layout(args.layout, &params)?;
    checks::device(device)?;
    let opts = RunOptions {
        input: args.model.clone(),
        output: args.output.clone(),
        recipe: Some(args.recipe.clone()),
        params,
        dry_run: args.dry_run,
        layout: args.layout,
        device,
        verify: args.verify,
        limits: args.sandbox.limits()?,
        progress: !args.quiet,
        calibration: args.calibration.options(device),
        replace_output: args.force,
    };
    let report = pipeline::run(&opts)?;
    if let Some(path) = &args.report {
        write_replacing(path, serde_json::to_string_pretty(&report)?.as_bytes())
            .with_context(|| format!("cannot write the report {}", path.display()))?;
    }
    print_report(&report);
    Ok(())
}

pub fn print_report(r: &RunReport) {
    println!("recipe   {} {} ({})", r.recipe.name, r.recipe.version, r.recipe.source);
    println!("model    {} {} (confidence {:.2})", r.detection.family, r.detection.variant, r.detection.confidence);
    // The plan's warnings were printed on stderr when they arose (pipeline::run);
    // the report keeps them, the summary does not repeat them.
    if r.dry_run {
        println!("\n{:<60} {:<8} {:>14} {:>12} {:>12}", "layer", "format", "shape", "before", "after");
        for l in &r.layers {
            println!(
                "{:<60} {:<8} {:>14} {:>12} {:>12}",
                untrusted(&l.layer),
                l.format.as_deref().unwrap_or("-"),
                format!("{}x{}", l.shape[0], l.shape[1]),
                human_bytes(l.bytes_before),
                human_bytes(l.bytes_after)
            );
        }
        println!();
    }
    let t = &r.totals;
    println!(
        "layers   {} of {} Linear layers quantized: {} -> {}",
        t.quantized_layers,
        t.layers,
        human_bytes(t.quantized_bytes_before),
        human_bytes(t.quantized_bytes_after)
    );
    println!(
        "file     {} -> {}{}",
        human_bytes(t.input_bytes),
        human_bytes(t.output_bytes),
        if r.dry_run { " (planned; nothing written)" } else { "" }
    );
    if let Some(out) = &r.output {
        println!("wrote    {out} in {:.2} s ({:.2} GB/s of input) on {}", t.seconds, t.input_gb_per_s, r.backend.as_deref().unwrap_or("?"));
    }
    let worst = r.layers.iter().filter_map(|l| l.error.map(|e| (l, e))).max_by(|a, b| a.1.relative_l2.total_cmp(&b.1.relative_l2));
    if let Some((l, e)) = worst {
        println!("error    worst layer {}: relative L2 {:.4}, cosine {:.6}", untrusted(&l.layer), e.relative_l2, e.cosine);
    }
    for n in &r.notes {
        println!("note     {}", untrusted(n));
    }
    if let Some(u) = &r.uncalibrated_fp8 {
        println!("fp8      {}", u.describe());
    }
    if let Some(c) = &r.calibration {
        let scales = c.layers.iter().filter(|l| l.input_scale.is_some()).count();
        println!(
            "calib    {:?}: {} forward passes ({} samples, {} step buckets) on {} in {:.1} s; {} static activation scales written",
            c.algorithm,
            c.session.forwards,
            c.session.samples,
            c.session.steps.len(),
            c.device,
            c.seconds,
            scales
        );
        if let Some(e) = &c.eval {
            for m in &e.modes {
                println!(
                    "eval     {:<17} output vs unquantized over {} held-out inputs ({}): relative L2 {:.4} (worst {:.4}), cosine {:.6}",
                    m.mode,
                    e.inputs,
                    e.conditioning.unwrap_or(quantsmith::calibrate::session::HeldOut::Random).describe(),
                    m.output.relative_l2,
                    m.worst_relative_l2,
                    m.output.cosine
                );
            }
            if let (Some(ok), Some(d)) = (e.static_no_worse_than_dynamic, e.static_minus_dynamic) {
                println!(
                    "eval     static calibrated scales {} dynamic per-tensor ones (paired difference {:+.5} +- {:.5} over {} inputs)",
                    if ok { "are no worse than" } else { "are WORSE than" },
                    d.mean,
                    d.standard_error,
                    d.inputs
                );
            }
            if let Some(d) = e.smoothed_minus_unsmoothed {
                println!(
                    "eval     SmoothQuant changed the static output relative L2 by {:+.5} +- {:.5} (paired, {} inputs; negative = better)",
                    d.mean, d.standard_error, d.inputs
                );
            }
        }
        if !c.smoothing.is_empty() {
            let shrunk = c.smoothing.iter().filter(|g| g.amax_after < g.amax_before).count();
            println!(
                "smooth   {} SmoothQuant groups folded into norms and producer rows; {} of them shrank their input amax",
                c.smoothing.len(),
                shrunk
            );
        }
    }
}
