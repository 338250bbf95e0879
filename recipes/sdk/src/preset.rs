//! Declarative presets: a few constants become a complete recipe.

use crate::calibration::{CalibrationPlan, CalibrationSettings};
use crate::detect::{Family, identify};
use crate::exclusions::{MODELOPT_EXCLUSIONS, PROBE_LAYERS};
use crate::params::{Format, ParamSpecBuilder, Params};
use crate::rules::RuleSet;
use crate::types::{Detection, ParamSpec, QuantPlan, RecipeInfo};

/// A recipe for one family, with ModelOpt's default exclusions.
pub trait Preset {
    const NAME: &'static str;
    const VERSION: &'static str;
    const DESCRIPTION: &'static str;
    const FAMILY: Family;

    /// Parameters; by default `format`, `exclude` and `uncalibrated-fp8`, plus the calibration
    /// parameters for families the host can run (SD1.x, SD2.x, SDXL).
    fn params() -> Vec<ParamSpec> {
        let mut p = vec![ParamSpecBuilder::format(), ParamSpecBuilder::exclude(), ParamSpecBuilder::uncalibrated_fp8()];
        if CalibrationPlan::supports(Self::FAMILY) {
            p.extend(CalibrationPlan::params(Self::FAMILY));
        }
        p
    }

    /// Calibration: ModelOpt's practice (prompts, a denoising walk with
    /// classifier-free guidance) sized by the `calib-*` parameters; none for
    /// families the host has no forward pass for.
    fn calibrate() -> Result<Option<CalibrationSettings>, String> {
        if !CalibrationPlan::supports(Self::FAMILY) {
            return Ok(None);
        }
        CalibrationPlan::from_params(&Params::load(), Self::FAMILY)?.run()
    }

    /// Accepts checkpoints of [`Preset::FAMILY`]; refuses others with the reason.
    fn detect() -> Result<Detection, String> {
        let found = identify()?;
        if found.family != Self::FAMILY {
            return Err(format!(
                "this is {} ({}), not {}: {}",
                found.family.name(),
                found.variant,
                Self::FAMILY.name(),
                found.reason
            ));
        }
        Ok(Detection { family: found.family.name().into(), variant: found.variant, confidence: found.confidence, reason: found.reason })
    }

    fn plan() -> Result<QuantPlan, String> {
        standard_plan(&Params::load())
    }
}

/// `describe` for a [`Preset`].
pub fn describe<P: Preset>() -> RecipeInfo {
    RecipeInfo {
        name: P::NAME.into(),
        version: P::VERSION.into(),
        description: P::DESCRIPTION.into(),
        families: vec![P::FAMILY.name().into()],
        formats: Format::ALL.iter().map(|f| f.name().to_string()).collect(),
        params: P::params(),
    }
}

/// Every Linear layer in `format`, except ModelOpt's default exclusions and the
/// user's `exclude` list; with a shape-changing format, the layers ComfyUI probes
/// for detection fall back to FP8 so they keep their logical shape.
pub fn standard_plan(params: &Params) -> Result<QuantPlan, String> {
    let format = params.format()?;
    let mut rules = RuleSet::new().unwrap_linear().deny_all().quantize("*", format);
    if format.changes_shape() {
        rules = rules
            .quantize_existing(PROBE_LAYERS, Format::Fp8)
            .note(format!("layers ComfyUI probes for detection use fp8 instead of {}", format.name()));
    }
    let user = params.list("exclude");
    for p in &user {
        rules = rules.exclude(p);
    }
    Ok(rules.exclude_existing(MODELOPT_EXCLUSIONS).note(format!("format {}", format.name())).build())
}

/// Exports a [`Preset`] as the component's `recipe` and `calibrate` interfaces.
#[macro_export]
macro_rules! export_preset {
    ($preset:ty) => {
        struct QuantsmithPresetExport;
        impl $crate::Guest for QuantsmithPresetExport {
            fn describe() -> $crate::types::RecipeInfo {
                $crate::preset::describe::<$preset>()
            }
            fn detect() -> ::core::result::Result<$crate::types::Detection, ::std::string::String> {
                <$preset as $crate::preset::Preset>::detect()
            }
            fn plan() -> ::core::result::Result<$crate::types::QuantPlan, ::std::string::String> {
                <$preset as $crate::preset::Preset>::plan()
            }
        }
        impl $crate::CalibrateGuest for QuantsmithPresetExport {
            fn run() -> ::core::result::Result<::core::option::Option<$crate::calibration::CalibrationSettings>, ::std::string::String> {
                <$preset as $crate::preset::Preset>::calibrate()
            }
        }
        $crate::export_recipe!(QuantsmithPresetExport with_types_in $crate::bindings);
    };
}
