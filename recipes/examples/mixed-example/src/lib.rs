//! The worked example of `recipes/README.md`: a mixed-precision FLUX.1 recipe.
//! NVFP4 for the middle third of the transformer blocks, FP8 for the rest,
//! BF16 for the first double block and the last single block.

use quantsmith_recipe_sdk::detect::count_blocks;
use quantsmith_recipe_sdk::prelude::*;

struct MixedFlux;

impl Preset for MixedFlux {
    const NAME: &'static str = "mixed-flux";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str = "FLUX.1: NVFP4 middle blocks, FP8 elsewhere, BF16 first and last blocks";
    const FAMILY: Family = Family::Flux;

    fn params() -> Vec<ParamSpec> {
        vec![ParamSpecBuilder::number("middle-fraction", 0.34, "Fraction of the single blocks, centred, that get NVFP4")]
    }

    fn plan() -> Result<QuantPlan, String> {
        let params = Params::load();
        let fraction = params.number("middle-fraction").unwrap_or(0.34).clamp(0.0, 1.0);
        let double = count_blocks("double_blocks.");
        let single = count_blocks("single_blocks.");
        if double == 0 || single == 0 {
            return Err("no double or single blocks found".into());
        }
        let middle = ((single as f64) * fraction).round() as usize;
        let start = (single - middle) / 2;
        let mut rules = RuleSet::new().unwrap_linear().deny_all().quantize("*", Format::Fp8);
        for i in start..start + middle {
            rules = rules.quantize(&format!("single_blocks.{i}.*"), Format::Nvfp4);
        }
        rules = rules
            .exclude("double_blocks.0.*")
            .exclude(&format!("single_blocks.{}.*", single - 1))
            .exclude_existing(MODELOPT_EXCLUSIONS)
            .note(format!("nvfp4 for single blocks {start}..{}", start + middle));
        Ok(rules.build())
    }
}

quantsmith_recipe_sdk::export_preset!(MixedFlux);
