//! The subcommands of `run-recipe`, one file each: its arguments and its body.
//! This module holds the command table, the dispatch, and what several commands
//! share (recipe sandbox flags, error constructors, printing helpers).

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use quantsmith::error::{BadInput, Usage};
use quantsmith::recipe::SandboxLimits;
pub use quantsmith::text::human_bytes;
use quantsmith::text::sanitize;

mod check;
pub mod checks;
mod demo;
mod forward;
mod inspect;
mod new;
mod recipes;
mod run;
mod synth;

#[derive(Parser)]
#[command(name = "run-recipe", version, about = "Quantize diffusion checkpoints (SD1.5, SDXL, SD3, FLUX.1) into files ComfyUI loads as they are", long_about = None)]
pub struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Show what a checkpoint is: family, variant, prefix, components, modules, matching preset.
    Inspect(inspect::InspectArgs),
    /// List the built-in presets (or describe one recipe, with its parameters).
    Recipes(recipes::RecipesArgs),
    /// Quantize a checkpoint with a recipe.
    Run(run::RunArgs),
    /// Write a synthetic checkpoint with the exact tensor layout of a real model.
    Synth(synth::SynthArgs),
    /// The whole job on a built-in synthetic checkpoint: synthesize, quantize, check.
    Demo(demo::DemoArgs),
    /// Check a converted file against its source: ComfyUI's layout rules, pass-through bytes, error bounds.
    Check(check::CheckArgs),
    /// One denoiser forward pass (UNet, FLUX or SD3) on given inputs (for comparisons with other implementations).
    Forward(forward::ForwardArgs),
    /// Scaffold a new recipe crate.
    New(new::NewArgs),
}

/// Runs one subcommand; its error carries the exit class (`quantsmith::error::exit_code`).
pub fn dispatch(command: Command) -> Result<()> {
    // Test hook for the panic guard (tests/cli_exit_codes.rs): a bug, simulated.
    if std::env::var_os("QUANTSMITH_TEST_PANIC").is_some() {
        panic!("QUANTSMITH_TEST_PANIC is set");
    }
    match command {
        Command::Inspect(args) => inspect::run(args),
        Command::Recipes(args) => recipes::run(args),
        Command::Run(args) => run::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Check(args) => check::run(args),
        Command::Forward(args) => forward::run(args),
        Command::New(args) => new::run(args),
    }
}

#[derive(Args, Clone)]
pub struct SandboxArgs {
    /// Wall-clock budget of one recipe call, in seconds (0.01 to 86400): its own work and the host work it asks for.
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

impl SandboxArgs {
    pub fn limits(&self) -> Result<SandboxLimits> {
        Ok(SandboxLimits { memory_bytes: (self.recipe_memory as usize) << 20, timeout: Duration::from_secs_f64(self.recipe_timeout) })
    }
}

/// Recipe and checkpoint strings for the terminal; sources already cut them to
/// text::MAX_PRINTED, so this bound only catches what they missed.
pub fn untrusted(s: &str) -> String {
    sanitize(s, 2 * quantsmith::text::MAX_PRINTED)
}

/// Bad input (exit 3).
pub fn bad(msg: impl Into<String>) -> anyhow::Error {
    BadInput(msg.into()).into()
}

/// A usage error (exit 2).
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    Usage(msg.into()).into()
}

/// Writes a small file through a temporary renamed into place, so an interrupted
/// write never leaves half a report.
pub fn write_replacing(path: &Path, bytes: &[u8]) -> Result<()> {
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
