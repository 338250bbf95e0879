//! Built-in preset: FLUX.1 dev and schnell, ModelOpt's default exclusions.

use quantsmith_recipe_sdk::prelude::*;

struct Flux;

impl Preset for Flux {
    const NAME: &'static str = "flux";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "FLUX.1 dev and schnell: every Linear layer in the chosen format, except the embedders and output layers ModelOpt keeps in high precision";
    const FAMILY: Family = Family::Flux;
}

quantsmith_recipe_sdk::export_preset!(Flux);
