//! Built-in preset: Stable Diffusion 1.x (and inpainting) UNet, ModelOpt's default exclusions.

use quantsmith_recipe_sdk::prelude::*;

struct Sd15;

impl Preset for Sd15 {
    const NAME: &'static str = "sd15";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Stable Diffusion 1.x (and inpainting) UNet: every Linear layer in the chosen format, except the embedders and output layers ModelOpt keeps in high precision";
    const FAMILY: Family = Family::Sd15;
}

quantsmith_recipe_sdk::export_preset!(Sd15);
