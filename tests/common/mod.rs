//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use quantsmith::backend::DeviceChoice;
use quantsmith::calibrate::{CalibrateMode, CalibrationOptions};
use quantsmith::convert::Layout;
use quantsmith::pipeline::{RunOptions, RunReport};
use quantsmith::recipe::SandboxLimits;
use quantsmith::recipe::params::RawParams;
use quantsmith::synth::{self, Family, SynthOptions};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("QUANTSMITH_FIXTURES_DIR")).join(format!("{name}.wasm"))
}

/// Writes a tiny synthetic checkpoint of `family` into `dir`.
pub fn synth_tiny(dir: &Path, family: &str) -> PathBuf {
    synth_with(dir, family, None, false)
}

pub fn synth_with(dir: &Path, family: &str, variant: Option<&str>, full_checkpoint: bool) -> PathBuf {
    let fam = Family::parse(family).unwrap();
    let path = dir.join(format!("{family}-{}-{}.safetensors", variant.unwrap_or("default"), if full_checkpoint { "full" } else { "dm" }));
    let opts = SynthOptions { variant: variant.map(String::from), full_checkpoint, ..SynthOptions::new(fam) };
    synth::write(&opts, &path, |_, _| {}).unwrap();
    path
}

pub fn options(input: &Path, output: &Path, recipe: Option<&str>, sets: &[&str]) -> RunOptions {
    let mut params = RawParams::default();
    for s in sets {
        params.set(s).unwrap();
    }
    RunOptions {
        input: input.to_path_buf(),
        output: Some(output.to_path_buf()),
        recipe: recipe.map(String::from),
        params,
        dry_run: false,
        layout: Layout::Comfy,
        device: DeviceChoice::Cpu,
        verify: false,
        limits: SandboxLimits { memory_bytes: 64 << 20, timeout: Duration::from_secs(2) },
        progress: false,
        // Calibration has its own tests (tests/calibration.rs); elsewhere it would only cost time.
        calibration: CalibrationOptions { mode: CalibrateMode::Off, ..Default::default() },
        replace_output: true,
    }
}

/// Calibration on the CPU with small walks: 2 samples x 3 steps at 64x64 pixels
/// (8x8 latents), evaluated on 2 held-out inputs at the same size.
pub fn calib_options(input: &Path, output: &Path, recipe: Option<&str>, sets: &[&str]) -> RunOptions {
    let mut all = vec!["calib-steps=3", "calib-samples=2", "resolution=64"];
    all.extend_from_slice(sets);
    let mut o = options(input, output, recipe, &all);
    o.calibration = CalibrationOptions {
        mode: CalibrateMode::On,
        device: DeviceChoice::Cpu,
        eval_inputs: 2,
        eval_resolution: 64,
        ..Default::default()
    };
    o.limits = SandboxLimits { memory_bytes: 64 << 20, timeout: Duration::from_secs(5) };
    o
}

/// A tiny checkpoint of `family` whose UNet behaves like a trained one (the
/// default synthetic init is chaotic: any perturbation, quantization included,
/// moves its output a lot).
pub fn conditioned(dir: &Path, family: Family) -> PathBuf {
    let path = dir.join(format!("{}-conditioned.safetensors", family.name()));
    let opts = SynthOptions { init: synth::SynthInit::Conditioned, ..SynthOptions::new(family) };
    synth::write(&opts, &path, |_, _| {}).unwrap();
    path
}

pub fn run(input: &Path, output: &Path, recipe: Option<&str>, sets: &[&str]) -> anyhow::Result<RunReport> {
    quantsmith::pipeline::run(&options(input, output, recipe, sets))
}

/// No output and no temporary file left in `dir` besides the inputs.
pub fn assert_no_output(dir: &Path, output: &Path) {
    assert!(!output.exists(), "{} must not exist", output.display());
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(!name.ends_with(".partial"), "temporary file {name} left behind");
    }
}

/// Whether NVRTC can be loaded; prints why `test` is skipped when not, and
/// fails instead when `QUANTSMITH_REQUIRE_NVRTC` is set (CI sets it).
pub fn nvrtc_or_skip(test: &str) -> bool {
    if quantsmith::gpu::kernels::nvrtc_available() {
        return true;
    }
    println!(
        "SKIPPED {test}: libnvrtc.so is not loadable \
         (pip install nvidia-cuda-nvrtc==13.0.88; LD_LIBRARY_PATH=<site-packages>/nvidia/cu13/lib)"
    );
    if std::env::var_os("QUANTSMITH_REQUIRE_NVRTC").is_some() {
        panic!("QUANTSMITH_REQUIRE_NVRTC is set but libnvrtc is not loadable");
    }
    false
}

/// A GPU backend, or `None` with the reason printed; a failure instead when
/// `QUANTSMITH_REQUIRE_GPU` is set (the GPU machine sets it).
pub fn gpu_or_skip<T>(what: &str, started: anyhow::Result<T>) -> Option<T> {
    match started {
        Ok(b) => Some(b),
        Err(e) => {
            if std::env::var_os("QUANTSMITH_REQUIRE_GPU").is_some() {
                panic!("QUANTSMITH_REQUIRE_GPU is set but the {what} cannot start: {e:#}");
            }
            println!("SKIPPED: no usable CUDA GPU ({e:#})");
            None
        }
    }
}
