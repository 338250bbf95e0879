//! Built-in preset: SDXL base and refiner UNet, ModelOpt's default exclusions.

use quantsmith_recipe_sdk::prelude::*;

struct Sdxl;

impl Preset for Sdxl {
    const NAME: &'static str = "sdxl";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "SDXL base and refiner UNet: every Linear layer in the chosen format, except the embedders and output layers ModelOpt keeps in high precision";
    const FAMILY: Family = Family::Sdxl;
}

quantsmith_recipe_sdk::export_preset!(Sdxl);
