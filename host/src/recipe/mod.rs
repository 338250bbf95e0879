//! Recipes: sandboxed WebAssembly components speaking `quantsmith:recipe` (see `wit/`).
//!
//! The host embeds the built-in presets, loads third-party `.wasm` files, checks
//! the contract version, and calls a recipe's exports in a fresh, limited store
//! per call (an instance that trapped cannot be re-entered).

mod calibration_impl;
mod clocks;
mod host_impl;
pub mod params;
mod runtime;

pub use runtime::{HostContext, LoadedRecipe, RecipeError, RecipeRuntime, SandboxLimits};

wasmtime::component::bindgen!({
    world: "recipe-v0",
    path: "../wit",
    additional_derives: [PartialEq],
});

pub use self::quantsmith::recipe::types as wit;

/// Bindings of `calibrating-recipe-v0` (contract 0.1.1, `smoothing` since 0.1.2, `sampling` since 0.1.3). The `types` and `host`
/// interfaces are the ones generated above, so one host implementation serves
/// both worlds; the resources map to the calibration session's handles.
pub mod calibrating {
    wasmtime::component::bindgen!({
        world: "calibrating-recipe-v0",
        path: "../wit",
        additional_derives: [PartialEq],
        with: {
            "quantsmith:recipe/types": super::quantsmith::recipe::types,
            "quantsmith:recipe/host": super::quantsmith::recipe::host,
            "quantsmith:recipe/calibration.tensor": crate::calibrate::session::TensorHandle,
            "quantsmith:recipe/calibration.conditioning": crate::calibrate::session::CondHandle,
        },
    });
    pub use self::exports::quantsmith::recipe::calibrate::{Algorithm, CalibrationSettings};
    pub use self::quantsmith::recipe::calibration as api;
    pub use self::quantsmith::recipe::sampling as sampling_api;
    pub use self::quantsmith::recipe::smoothing as smoothing_api;
}

/// The contract version this host implements (the `wit/` package version).
pub const WIT_VERSION: &str = "0.1.3";

/// A built-in preset compiled into the binary.
pub struct Preset {
    pub name: &'static str,
    pub wasm: &'static [u8],
}

/// The presets, compiled from `recipes/` by the build script.
pub const PRESETS: &[Preset] = &[
    Preset { name: "sd15", wasm: include_bytes!(concat!(env!("OUT_DIR"), "/sd15.wasm")) },
    Preset { name: "sdxl", wasm: include_bytes!(concat!(env!("OUT_DIR"), "/sdxl.wasm")) },
    Preset { name: "sd3", wasm: include_bytes!(concat!(env!("OUT_DIR"), "/sd3.wasm")) },
    Preset { name: "flux", wasm: include_bytes!(concat!(env!("OUT_DIR"), "/flux.wasm")) },
];

/// Where a recipe comes from: `--recipe sdxl` or `--recipe ./my.wasm`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecipeSource {
    Builtin(&'static str),
    File(std::path::PathBuf),
}

impl RecipeSource {
    /// A preset name, or a path (anything with a `/` or ending in `.wasm`).
    pub fn parse(s: &str) -> Result<RecipeSource, String> {
        if let Some(p) = PRESETS.iter().find(|p| p.name == s) {
            return Ok(RecipeSource::Builtin(p.name));
        }
        if s.ends_with(".wasm") || s.contains('/') || s.contains(std::path::MAIN_SEPARATOR) {
            return Ok(RecipeSource::File(s.into()));
        }
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        Err(format!("unknown recipe {s:?}: built-in presets are {} (or give a path to a .wasm component)", names.join(", ")))
    }

    pub fn label(&self) -> String {
        match self {
            RecipeSource::Builtin(n) => format!("builtin:{n}"),
            RecipeSource::File(p) => p.display().to_string(),
        }
    }
}
