//! Built-in preset: SD3 / SD3.5 MMDiT (medium, large), ModelOpt's default exclusions.

use quantsmith_recipe_sdk::prelude::*;

struct Sd3;

impl Preset for Sd3 {
    const NAME: &'static str = "sd3";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "SD3 / SD3.5 MMDiT (medium, large): every Linear layer in the chosen format, except the embedders and output layers ModelOpt keeps in high precision";
    const FAMILY: Family = Family::Sd3;
}

quantsmith_recipe_sdk::export_preset!(Sd3);
