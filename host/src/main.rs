//! `run-recipe`: the Quantsmith command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use quantsmith::backend::DeviceChoice;
use quantsmith::calibrate::session::SessionLimits;
use quantsmith::calibrate::{CalibrateMode, CalibrationOptions};
use quantsmith::convert::Layout;
use quantsmith::error::{BadInput, EXIT_INTERNAL, Usage};
use quantsmith::pipeline::{self, RunOptions, RunReport};
use quantsmith::recipe::params::{RawParams, kind_name, value_to_json};
use quantsmith::recipe::{PRESETS, RecipeRuntime, RecipeSource, SandboxLimits};
use quantsmith::text::sanitize;

/// Recipe and checkpoint strings for the terminal; sources already cut them to
/// text::MAX_PRINTED, so this bound only catches what they missed.
fn untrusted(s: &str) -> String {
    sanitize(s, 2 * quantsmith::text::MAX_PRINTED)
}
use quantsmith::synth::{self, Family, Scale, SynthOptions};

#[path = "cli/checks.rs"]
mod checks;

#[derive(Parser)]
#[command(name = "run-recipe", version, about = "Quantize diffusion checkpoints (SD1.5, SDXL, SD3, FLUX.1) into files ComfyUI loads as they are", long_about = None)]
struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what a checkpoint is: family, variant, prefix, components, modules, matching preset.
    Inspect {
        model: PathBuf,
        #[command(flatten)]
        sandbox: SandboxArgs,
    },
    /// List the built-in presets (or describe one recipe, with its parameters).
    Recipes {
        /// A preset name or a path to a .wasm recipe.
        #[arg(long)]
        recipe: Option<String>,
        #[command(flatten)]
        sandbox: SandboxArgs,
    },
    /// Quantize a checkpoint with a recipe.
    Run(RunArgs),
    /// Write a synthetic checkpoint with the exact tensor layout of a real model.
    Synth {
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
    },
    /// The whole job on a built-in synthetic checkpoint: synthesize, quantize, check.
    Demo {
        /// sd15, sdxl, sd3 or flux.
        #[arg(long, default_value = "sdxl")]
        family: String,
        #[arg(long, default_value = "fp8")]
        format: String,
        /// Folder for the two files.
        #[arg(long, default_value = "demo-out")]
        dir: PathBuf,
    },
    /// Check a converted file against its source: ComfyUI's layout rules, pass-through bytes, error bounds.
    Check { source: PathBuf, output: PathBuf },
    /// One denoiser forward pass (UNet, FLUX or SD3) on given inputs (for comparisons with other implementations).
    Forward {
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
    },
    /// Scaffold a new recipe crate.
    New {
        dir: PathBuf,
        /// Family the recipe targets: sd15, sdxl, sd3 or flux.
        #[arg(long, default_value = "sdxl")]
        family: String,
    },
}

#[derive(Args, Clone)]
struct SandboxArgs {
    /// CPU budget of one recipe call, in seconds (0.01 to 86400).
    #[arg(long, default_value_t = 10.0, value_parser = parse_timeout)]
    recipe_timeout: f64,
    /// Memory limit of a recipe, in MiB (1 to 4096: a recipe's memory is 32-bit).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=MAX_RECIPE_MEMORY_MIB))]
    recipe_memory: u32,
}

/// Largest `--recipe-timeout`: a day; anything longer is a typo, and
/// `Duration::from_secs_f64` panics on values past `u64::MAX` seconds.
const MAX_RECIPE_TIMEOUT_S: f64 = 86_400.0;
/// Largest `--recipe-memory` in MiB: a wasm32 memory cannot grow past 4 GiB.
const MAX_RECIPE_MEMORY_MIB: i64 = 4096;

/// `--recipe-timeout`: a finite number of seconds in range (clap turns an `Err` into exit 2).
fn parse_timeout(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v.is_finite() && (0.01..=MAX_RECIPE_TIMEOUT_S).contains(&v)) {
        return Err(format!("must be between 0.01 and {MAX_RECIPE_TIMEOUT_S} seconds, got {s}"));
    }
    Ok(v)
}

/// `--eval-resolution`: 0 (the family's native size) or 64..=4096 in steps of 64, as the recipes' `resolution`.
fn parse_eval_resolution(s: &str) -> Result<u32, String> {
    let v: u32 = s.trim().parse().map_err(|_| format!("{s:?} is not a whole number of pixels"))?;
    if v != 0 && !((64..=4096).contains(&v) && v % 64 == 0) {
        return Err(format!("must be 0 (native) or a multiple of 64 from 64 to 4096, got {v}"));
    }
    Ok(v)
}

impl SandboxArgs {
    fn limits(&self) -> Result<SandboxLimits> {
        Ok(SandboxLimits {
            memory_bytes: (self.recipe_memory as usize) << 20,
            timeout: Duration::from_secs_f64(self.recipe_timeout),
        })
    }
}

#[derive(Args, Clone)]
struct CalibrationArgs {
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
            limits: SessionLimits {
                max_forwards: self.calib_max_forwards as usize,
                ..SessionLimits::default()
            },
        }
    }
}

#[derive(Args)]
struct RunArgs {
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
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
    #[command(flatten)]
    calibration: CalibrationArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

fn main() -> ExitCode {
    // `run-recipe ... | head` should end quietly, as other command-line tools do.
    // SAFETY: restoring the default disposition of a signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    checks::install_signal_handlers();
    install_panic_hook();
    let cli = Cli::parse();
    let default = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(checks::colour_allowed())
        .with_target(false)
        .init();

    // A panic is a bug: the hook has said where; leave nothing behind and exit 1, never 101.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dispatch(cli.command))) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            quantsmith::checkpoint::writer::remove_temporaries();
            // Errors quote recipes and file headers: never raw control characters.
            eprintln!("error: {}", quantsmith::text::sanitize_lines(&format!("{e:#}"), 4000, 200));
            ExitCode::from(quantsmith::error::exit_code(&e))
        }
        Err(_) => {
            quantsmith::checkpoint::writer::remove_temporaries();
            ExitCode::from(EXIT_INTERNAL)
        }
    }
}

/// One message for a panic, naming it a bug; silent for a closed pipe.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        if msg.contains("Broken pipe") || quantsmith::error::panic_is_caught() {
            return;
        }
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "error: internal error: {}{at}\nThis is a bug in Quantsmith; please report it with the command that caused it.",
            quantsmith::text::sanitize(&msg, 2000)
        );
    }));
}

fn bad(msg: impl Into<String>) -> anyhow::Error {
    BadInput(msg.into()).into()
}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    Usage(msg.into()).into()
}

fn dispatch(command: Command) -> Result<()> {
    // Test hook for the panic guard (tests/cli_exit_codes.rs): a bug, simulated.
    if std::env::var_os("QUANTSMITH_TEST_PANIC").is_some() {
        panic!("QUANTSMITH_TEST_PANIC is set");
    }
    match command {
        Command::Inspect { model, sandbox } => {
            checks::input_file("the model", &model)?;
            inspect(&model, sandbox.limits()?)
        }
        Command::Recipes { recipe, sandbox } => {
            if let Some(r) = &recipe {
                checks::recipe_file(r)?;
            }
            recipes(recipe.as_deref(), sandbox.limits()?)
        }
        Command::Run(args) => run(args),
        Command::Synth {
            family,
            scale,
            seed,
            variant,
            full_checkpoint,
            init,
            tiny_text,
            output,
        } => {
            if let Some(kind) = text_encoder_kind(&family) {
                return synth_text_encoder(kind, &scale, seed, variant.as_deref(), &output);
            }
            let mut opts = synth_options(&family, &scale, seed, variant, full_checkpoint)?;
            checks::output_path("-o", &output, None, true)?;
            opts.init =
                quantsmith::synth::SynthInit::parse(&init).map_err(|e| bad(format!("{e:#}")))?;
            opts.tiny_text = tiny_text;
            if tiny_text && (opts.scale != Scale::Tiny || !matches!(opts.family, Family::Sd3 | Family::Flux)) {
                return Err(usage("--tiny-text is for sd3 and flux at --scale tiny"));
            }
            let pb = progress_bar(!matches!(opts.scale, Scale::Tiny));
            let summary = synth::write(&opts, &output, |done, total| {
                pb.set_length(total);
                pb.set_position(done);
            })?;
            pb.finish_and_clear();
            println!(
                "wrote {} ({} tensors, {} parameters, {})",
                output.display(),
                summary.tensors,
                summary.params,
                human_bytes(summary.bytes)
            );
            Ok(())
        }
        Command::Demo {
            family,
            format,
            dir,
        } => demo(&family, &format, &dir),
        Command::Forward {
            model,
            inputs,
            out,
            device,
            repeat,
            observe,
        } => {
            let device: DeviceChoice = device.parse().map_err(usage)?;
            checks::output_path("--out", &out, Some(&model), true)?;
            checks::input_file("the model", &model)?;
            checks::input_file("--inputs", &inputs)?;
            checks::device(device)?;
            let r = quantsmith::calibrate::forward_file(
                &model, &inputs, &out, device, repeat as usize, observe,
            )?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Command::Check { source, output } => {
            checks::input_file("the source", &source)?;
            checks::input_file("the output", &output)?;
            let src = quantsmith::checkpoint::Checkpoint::open(&source)?;
            let check = quantsmith::evaluate::check_output(&src, &output)
                .map_err(|e| bad(format!("{} fails the check: {e:#}", output.display())))?;
            print_check(&check);
            Ok(())
        }
        Command::New { dir, family } => {
            quantsmith::scaffold::create(&dir, &family).map_err(|e| bad(format!("{e:#}")))?;
            println!(
                "created recipe crate in {}; build it with:\n  cargo build --release --target wasm32-wasip2 --manifest-path {}/Cargo.toml",
                dir.display(),
                dir.display()
            );
            Ok(())
        }
    }
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
    let full = match Scale::parse(scale).map_err(|e| bad(format!("{e:#}")))? {
        Scale::Full => true,
        _ => false,
    };
    let scaled_fp8 = match variant {
        None | Some("fp16") => false,
        Some("fp8-scaled") => true,
        Some(v) => return Err(bad(format!("unknown text-encoder variant {v:?} (fp16, or fp8-scaled for t5xxl)"))),
    };
    let bytes = quantsmith::models::text::synth_text::write(output, kind, full, safetensors::Dtype::F16, scaled_fp8, seed).map_err(|e| bad(format!("{e:#}")))?;
    println!("wrote {} ({})", output.display(), human_bytes(bytes));
    Ok(())
}

fn synth_options(
    family: &str,
    scale: &str,
    seed: u64,
    variant: Option<String>,
    full_checkpoint: bool,
) -> Result<SynthOptions> {
    let family = Family::parse(family).map_err(|e| bad(format!("{e:#}")))?;
    let scale = Scale::parse(scale).map_err(|e| bad(format!("{e:#}")))?;
    Ok(SynthOptions {
        scale,
        seed,
        variant,
        full_checkpoint,
        ..SynthOptions::new(family)
    })
}

fn progress_bar(visible: bool) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, eta {eta})").unwrap());
    pb
}

fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

fn inspect(model: &Path, limits: SandboxLimits) -> Result<()> {
    let ctx = pipeline::open_context(model)?;
    let c = &ctx.checkpoint;
    println!(
        "file        {} ({})",
        model.display(),
        human_bytes(c.file_len() as u64)
    );
    println!(
        "layout      {}",
        if c.is_full_checkpoint() {
            format!("full checkpoint, diffusion model under {:?}", c.prefix())
        } else {
            "diffusion model only".into()
        }
    );
    let comps: Vec<String> = c
        .components()
        .iter()
        .map(|comp| {
            let n = c.tensors().iter().filter(|t| t.component == *comp).count();
            format!("{} ({n} tensors)", comp.name())
        })
        .collect();
    println!("components  {}", comps.join(", "));
    println!("modules     {} in the diffusion model:", ctx.modules.len());
    for (kind, n, params) in ctx.modules.summary() {
        if n > 0 {
            println!(
                "  {:<10} {n:>5} modules {:>15} parameters",
                kind.name(),
                params
            );
        }
    }
    let runtime = RecipeRuntime::new(limits)?;
    let verdicts = pipeline::detect_all(&runtime, &ctx)?;
    if let Some((recipe, Ok(d))) = verdicts.first() {
        println!(
            "family      {} {} (confidence {:.2})",
            d.family, d.variant, d.confidence
        );
        println!("evidence    {}", d.reason);
        println!(
            "preset      {} {} (run-recipe run {} picks it automatically)",
            recipe.name(),
            recipe.info.version,
            model.display()
        );
    } else {
        println!("family      not recognised by any built-in preset");
    }
    for (recipe, v) in &verdicts {
        match v {
            Ok(d) => println!("  {:<6} accepts ({:.2})", recipe.name(), d.confidence),
            Err(reason) => println!("  {:<6} declines: {reason}", recipe.name()),
        }
    }
    Ok(())
}

fn recipes(which: Option<&str>, limits: SandboxLimits) -> Result<()> {
    let runtime = RecipeRuntime::new(limits)?;
    let sources: Vec<RecipeSource> = match which {
        Some(w) => vec![RecipeSource::parse(w).map_err(bad)?],
        None => PRESETS
            .iter()
            .map(|p| RecipeSource::Builtin(p.name))
            .collect(),
    };
    for source in sources {
        let r = runtime.load(&source)?;
        let i = &r.info;
        println!("{} {}  [{}]", i.name, i.version, untrusted(&source.label()));
        println!("  {}", i.description);
        println!(
            "  families: {}   formats: {}",
            i.families.join(", "),
            i.formats.join(", ")
        );
        println!("  sha256:   {}", r.sha256);
        println!("  parameters:");
        for p in &i.params {
            let allowed = if p.allowed.is_empty() {
                String::new()
            } else {
                format!(" [{}]", untrusted(&p.allowed.join("|")))
            };
            println!(
                "    {:<16} {}{} (default {})  {}",
                untrusted(&p.name),
                kind_name(p.kind),
                allowed,
                untrusted(&value_to_json(&p.default).to_string()),
                untrusted(&p.help)
            );
        }
        println!();
    }
    Ok(())
}

fn run(args: RunArgs) -> Result<()> {
    // Everything the command line names is checked before a weight is read.
    checks::set_values(&args.set)?;
    let device: DeviceChoice = args.device.parse().map_err(usage)?;
    if let Some(out) = &args.output {
        if !args.dry_run {
            checks::output_path("-o", out, Some(&args.model), args.force)?;
        }
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
    if let Some(p) = &args.calibration.clip_vocab {
        if !p.is_dir() {
            return Err(bad(format!("--clip-vocab {} is not a folder (it should hold vocab.json and merges.txt)", p.display())));
        }
    }
    let mut params = RawParams::default();
    for pair in &args.set {
        params.set(pair).map_err(usage)?;
    }
    if let Some(path) = &args.config {
        let text = checks::read_config(path)?;
        params
            .load_toml(&text, &path.display().to_string())
            .map_err(bad)?;
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

/// Writes a small file through a temporary renamed into place, so an interrupted
/// write never leaves half a report.
fn write_replacing(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new().prefix(".quantsmith-").suffix(".partial").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644));
    }
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn print_report(r: &RunReport) {
    println!(
        "recipe   {} {} ({})",
        r.recipe.name, r.recipe.version, r.recipe.source
    );
    println!(
        "model    {} {} (confidence {:.2})",
        r.detection.family, r.detection.variant, r.detection.confidence
    );
    for w in &r.warnings {
        println!("warning  {}", untrusted(w));
    }
    if r.dry_run {
        println!(
            "\n{:<60} {:<8} {:>14} {:>12} {:>12}",
            "layer", "format", "shape", "before", "after"
        );
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
        if r.dry_run {
            " (planned; nothing written)"
        } else {
            ""
        }
    );
    if let Some(out) = &r.output {
        println!(
            "wrote    {out} in {:.2} s ({:.2} GB/s of input) on {}",
            t.seconds,
            t.input_gb_per_s,
            r.backend.as_deref().unwrap_or("?")
        );
    }
    let worst = r
        .layers
        .iter()
        .filter_map(|l| l.error.map(|e| (l, e)))
        .max_by(|a, b| a.1.relative_l2.total_cmp(&b.1.relative_l2));
    if let Some((l, e)) = worst {
        println!(
            "error    worst layer {}: relative L2 {:.4}, cosine {:.6}",
            untrusted(&l.layer), e.relative_l2, e.cosine
        );
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
                    if ok {
                        "are no worse than"
                    } else {
                        "are WORSE than"
                    },
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

fn print_check(check: &quantsmith::evaluate::OutputCheck) {
    let smoothed = if check.smoothed_tensors > 0 {
        format!("; {} tensors match the recorded SmoothQuant fold", check.smoothed_tensors)
    } else {
        String::new()
    };
    println!(
        "ok: {} quantized layers within their format's error bound, {} tensors passed through{smoothed}{}",
        check.layers.len(),
        check.passthrough_tensors,
        if check.legacy {
            " (legacy scaled_fp8 layout)"
        } else {
            ""
        }
    );
    if check.full_precision_layers + check.scale_one_layers > 0 {
        println!(
            "fp8 without input_scale: {} marked full_precision_matrix_mult (ComfyUI dequantizes), {} at ComfyUI's activation scale 1.0",
            check.full_precision_layers, check.scale_one_layers
        );
    }
    if let Some((name, (fmt, e))) = check
        .layers
        .iter()
        .max_by(|a, b| a.1.1.relative_l2.total_cmp(&b.1.1.relative_l2))
    {
        println!(
            "worst layer {name} ({fmt}): relative L2 {:.4}, cosine {:.6}, max abs error {:.3e}",
            e.relative_l2, e.cosine, e.max_abs_error
        );
    }
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
    println!(
        "1. synthesized {} ({} tensors, {})",
        input.display(),
        s.tensors,
        human_bytes(s.bytes)
    );
    let mut params = RawParams::default();
    params.set(&format!("format={format}")).map_err(bad)?;
    // UNet families in formats with static activation scales also show
    // calibration, sized so that it takes seconds on a CPU.
    let calibrate =
        quantsmith::calibrate::family_supported(family) && matches!(format, "fp8" | "nvfp4");
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
        progress: false,
        // `demo` owns its folder: running it again replaces its own outputs.
        replace_output: true,
        calibration: CalibrationOptions {
            mode: if calibrate {
                CalibrateMode::On
            } else {
                CalibrateMode::Off
            },
            eval_inputs: 2,
            eval_resolution: 256,
            ..Default::default()
        },
    };
    let report = pipeline::run(&opts)?;
    write_replacing(
        &dir.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    println!(
        "2. quantized with the built-in {} preset:",
        report.recipe.name
    );
    print_report(&report);
    let src = quantsmith::checkpoint::Checkpoint::open(&input)?;
    let check = quantsmith::evaluate::check_output(&src, &output)?;
    print!("3. checked {}: ", output.display());
    print_check(&check);
    println!("   run report: {}", dir.join("report.json").display());
    Ok(())
}
