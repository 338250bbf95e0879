//! Checks the command line makes before any work: paths (`-o`, `--report`,
//! inputs, configs, calibration data), the recipe file and the device. Each
//! failure is a usage error (exit 2) or bad input (exit 3) in well under a second,
//! before a weight is read. Also the process-wide signal handling and whether
//! logs may use colour.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::Result;
use quantsmith::backend::DeviceChoice;
use quantsmith::error::{BadInput, Usage};
use quantsmith::recipe::RecipeSource;

/// Largest `--config` file read, in bytes: parameters fit in a few hundred.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Longest `--set` value, in bytes: values become patterns, which recipes may
/// extend, and a plan's patterns are capped at `plan::MAX_PATTERN_LEN`.
pub const MAX_SET_VALUE: usize = quantsmith::plan::MAX_PATTERN_LEN / 2;

/// An input file the user named: a regular file, or a bad-input error naming what it is.
pub fn input_file(flag: &str, path: &Path) -> Result<()> {
    quantsmith::checkpoint::require_regular_file(path).map_err(|e| BadInput(format!("{flag}: {e}")).into())
}

/// An output path: not a directory, a FIFO or a device, not `input`, in an existing
/// writable folder, and not an existing file unless `replace`.
pub fn output_path(flag: &str, path: &Path, input: Option<&Path>, replace: bool) -> Result<()> {
    quantsmith::pipeline::check_output_path(flag, path, input, replace).map_err(Into::into)
}

/// `--set` values: well formed and of sane size.
pub fn set_values(sets: &[String]) -> Result<()> {
    for s in sets {
        let (key, value) = s.split_once('=').unwrap_or((s, ""));
        if key.len() > 100 || value.len() > MAX_SET_VALUE {
            return Err(Usage(format!(
                "--set {}: {} bytes; keys are at most 100 and values at most {MAX_SET_VALUE}",
                quantsmith::text::sanitize(key, 60),
                s.len()
            ))
            .into());
        }
    }
    Ok(())
}

/// `--layout` against the `format` parameter the presets take (from `--set` or
/// `--config`): a combination the layout cannot store is a usage error before
/// the model is opened. What a recipe plans without that parameter is checked
/// once its plan is known (convert::check_layout), still before any weight is read.
pub fn layout(layout: quantsmith::convert::Layout, params: &quantsmith::recipe::params::RawParams) -> Result<()> {
    match params.text("format") {
        Some(format) => quantsmith::convert::check_layout_format(layout, format).map_err(Into::into),
        None => Ok(()),
    }
}

/// `--config`: a regular file of at most [`MAX_CONFIG_BYTES`], read.
pub fn read_config(path: &Path) -> Result<String> {
    input_file("--config", path)?;
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if len > MAX_CONFIG_BYTES {
        return Err(BadInput(format!("--config {}: {len} bytes; a parameter file is at most {MAX_CONFIG_BYTES}", path.display())).into());
    }
    std::fs::read_to_string(path).map_err(|e| BadInput(format!("cannot read {}: {e}", path.display())).into())
}

/// `--recipe`: when it names a file, that file exists and is regular (exit 3 otherwise).
pub fn recipe_file(recipe: &str) -> Result<()> {
    if recipe == "auto" {
        return Ok(());
    }
    match RecipeSource::parse(recipe) {
        Ok(RecipeSource::File(p)) => input_file("--recipe", &p),
        Ok(_) => Ok(()),
        Err(e) => Err(Usage(e).into()),
    }
}

/// `--device cuda[:N]`: a GPU must be there (exit 3 with why not); auto falls back by itself.
pub fn device(choice: DeviceChoice) -> Result<()> {
    if let DeviceChoice::Cuda(n) = choice {
        match quantsmith::gpu::device_count() {
            Ok(count) if n < count => {}
            Ok(count) => {
                return Err(BadInput(format!(
                    "--device cuda:{n}: this machine has {count} CUDA GPU(s); use --device cpu, or auto to fall back to the CPU"
                ))
                .into());
            }
            Err(e) => {
                return Err(BadInput(format!(
                    "--device cuda:{n}: no usable CUDA GPU ({e:#}); use --device cpu, or auto to fall back to the CPU"
                ))
                .into());
            }
        }
    }
    Ok(())
}

/// Colour only on a terminal, and never when `NO_COLOR` is set (https://no-color.org).
pub fn colour_allowed() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

/// SIGINT, SIGTERM and SIGHUP end the process without leaving a temporary file:
/// the signals are blocked in every thread (threads inherit the mask) and one
/// thread waits for them, removes this run's named temporaries, then ends the
/// process by the same signal (so shells see the usual status).
pub fn install_signal_handlers() {
    // SAFETY: signal-set manipulation on local sets, before any other thread exists.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return;
        }
        let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
            let mut sig: libc::c_int = 0;
            if libc::sigwait(&set, &mut sig) != 0 {
                return;
            }
            quantsmith::checkpoint::writer::remove_temporaries();
            libc::signal(sig, libc::SIG_DFL);
            let mut one: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut one);
            libc::sigaddset(&mut one, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
            libc::raise(sig);
            libc::_exit(128 + sig);
        });
        if spawned.is_err() {
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
}
