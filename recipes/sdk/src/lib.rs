//! Guest-side SDK for [Quantsmith](https://example.invalid/quantsmith) recipes.
//!
//! A recipe is a WebAssembly component (`wasm32-wasip2`) that tells the host
//! *what* to quantize and *how*. This crate gives it:
//!
//! - typed access to the host ([`host`]): tensor list, module table, statistics,
//!   parameters, logging;
//! - [`detect`]: family and variant detection from tensor names and shapes
//!   (SD1.x, SD2.x, SDXL base/refiner, SD3/3.5, FLUX.1 dev/schnell);
//! - [`rules`]: a builder for ModelOpt-style ordered quantizer rules;
//! - [`exclusions`]: the layers ModelOpt leaves in high precision, and the layers
//!   ComfyUI probes to detect a model (which must keep their logical shape);
//! - [`params`]: typed parameter declaration and parsing;
//! - [`preset`]: a declarative [`preset::Preset`] trait that turns a few constants
//!   into a complete recipe, with [`export_preset!`].
//!
//! A complete recipe:
//!
//! ```no_run
//! use quantsmith_recipe_sdk::prelude::*;
//!
//! struct MySdxl;
//!
//! impl Preset for MySdxl {
//!     const NAME: &'static str = "my-sdxl";
//!     const VERSION: &'static str = "0.1.0";
//!     const DESCRIPTION: &'static str = "SDXL with the default exclusions";
//!     const FAMILY: Family = Family::Sdxl;
//! }
//!
//! quantsmith_recipe_sdk::export_preset!(MySdxl);
//! ```

pub mod bindings {
    //! Raw bindings generated from `wit/recipe.wit` by `wit-bindgen`.
    wit_bindgen::generate!({
        world: "calibrating-recipe-v0",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_recipe",
        default_bindings_module: "quantsmith_recipe_sdk::bindings",
    });
}

pub mod calibration;
pub mod detect;
pub mod exclusions;
pub mod params;
pub mod preset;
pub mod rules;

/// The plain data types of the contract (`quantsmith:recipe/types`).
pub use bindings::quantsmith::recipe::types;
/// Functions the host offers (`quantsmith:recipe/host`).
pub use bindings::quantsmith::recipe::host;
/// The trait a hand-written recipe implements (see [`export_recipe!`]).
pub use bindings::exports::quantsmith::recipe::recipe::Guest;
/// The calibration export a hand-written recipe also implements; return
/// `Ok(None)` to skip calibration, or delegate to [`calibration::CalibrationPlan`].
pub use bindings::exports::quantsmith::recipe::calibrate::Guest as CalibrateGuest;

/// Exports a type implementing [`Guest`] as the component's `recipe` interface:
/// `quantsmith_recipe_sdk::export_recipe!(MyRecipe with_types_in quantsmith_recipe_sdk::bindings);`
pub use bindings::export_recipe;

/// The WIT contract version this SDK was built against.
pub const WIT_VERSION: &str = "0.1.3";

/// Logs through the host (shown with `RUST_LOG=info` or `-v`).
pub fn log(level: host::LogLevel, message: impl AsRef<str>) {
    host::log(level, message.as_ref());
}

/// Everything a recipe usually needs.
pub mod prelude {
    pub use crate::detect::{Family, Identified, identify};
    pub use crate::exclusions::{MODELOPT_EXCLUSIONS, PROBE_LAYERS};
    pub use crate::params::{Format, ParamSpecBuilder, Params};
    pub use crate::preset::{Preset, standard_plan};
    pub use crate::rules::RuleSet;
    pub use crate::types::{
        Detection, ModuleInfo, ModuleKind, ParamKind, ParamSpec, ParamValue, QuantPlan, QuantFormat,
        QuantizerRule, RecipeInfo, TensorInfo,
    };
    pub use crate::calibration::CalibrationPlan;
    pub use crate::{CalibrateGuest, Guest, host, log};
}
