//! Parameter declaration (for `describe`) and typed access (for `detect` / `plan`).

use crate::host;
use crate::types::{ParamKind, ParamSpec, ParamValue, QuantFormat};

/// The formats a preset can emit, as spelled in `--set format=...`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Fp8,
    Int8,
    Nvfp4,
    Mxfp8,
}

impl Format {
    pub const ALL: [Format; 4] = [Format::Fp8, Format::Int8, Format::Nvfp4, Format::Mxfp8];

    pub fn name(self) -> &'static str {
        match self {
            Format::Fp8 => "fp8",
            Format::Int8 => "int8",
            Format::Nvfp4 => "nvfp4",
            Format::Mxfp8 => "mxfp8",
        }
    }

    pub fn parse(s: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.name() == s)
    }

    /// The contract's enum value.
    pub fn wit(self) -> QuantFormat {
        match self {
            Format::Fp8 => QuantFormat::Fp8,
            Format::Int8 => QuantFormat::Int8,
            Format::Nvfp4 => QuantFormat::Nvfp4,
            Format::Mxfp8 => QuantFormat::Mxfp8,
        }
    }

    /// Block size ModelOpt's `block_sizes[-1]` names for this format.
    pub fn block_size(self) -> Option<u32> {
        match self {
            Format::Nvfp4 => Some(16),
            Format::Mxfp8 => Some(32),
            Format::Fp8 | Format::Int8 => None,
        }
    }

    /// ModelOpt's `axis`: INT8 is per output channel, FP8 per tensor.
    pub fn axis(self) -> Option<i32> {
        match self {
            Format::Int8 => Some(0),
            _ => None,
        }
    }

    /// Packed or padded layouts change the stored shape of a weight.
    pub fn changes_shape(self) -> bool {
        matches!(self, Format::Nvfp4 | Format::Mxfp8)
    }
}

/// Builds [`ParamSpec`]s for `describe`.
///
/// ```
/// use quantsmith_recipe_sdk::params::ParamSpecBuilder;
///
/// let specs = vec![
///     ParamSpecBuilder::format(),
///     ParamSpecBuilder::integer("keep-blocks", 1, "Leading blocks left in bf16"),
///     ParamSpecBuilder::choice("mode", "fast", &["fast", "careful"], "How hard to try"),
/// ];
/// assert_eq!(specs[2].allowed.len(), 2);
/// ```
pub struct ParamSpecBuilder;

impl ParamSpecBuilder {
    pub fn choice(name: &str, default: &str, allowed: &[&str], help: &str) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            kind: ParamKind::Choice,
            default: ParamValue::Text(default.into()),
            allowed: allowed.iter().map(|s| s.to_string()).collect(),
            help: help.into(),
        }
    }

    pub fn text(name: &str, default: &str, help: &str) -> ParamSpec {
        ParamSpec { name: name.into(), kind: ParamKind::Text, default: ParamValue::Text(default.into()), allowed: vec![], help: help.into() }
    }

    pub fn boolean(name: &str, default: bool, help: &str) -> ParamSpec {
        ParamSpec { name: name.into(), kind: ParamKind::Boolean, default: ParamValue::Boolean(default), allowed: vec![], help: help.into() }
    }

    pub fn integer(name: &str, default: i64, help: &str) -> ParamSpec {
        ParamSpec { name: name.into(), kind: ParamKind::Integer, default: ParamValue::Integer(default), allowed: vec![], help: help.into() }
    }

    pub fn number(name: &str, default: f64, help: &str) -> ParamSpec {
        ParamSpec { name: name.into(), kind: ParamKind::Number, default: ParamValue::Number(default), allowed: vec![], help: help.into() }
    }

    /// The `format` parameter every preset takes.
    pub fn format() -> ParamSpec {
        Self::choice("format", "fp8", &["fp8", "int8", "nvfp4", "mxfp8"], "Weight format: fp8 (float8_e4m3fn, per tensor), int8 (int8_tensorwise, per output channel), nvfp4 (E2M1, blocks of 16), mxfp8 (E4M3, E8M0 blocks of 32)")
    }

    /// The `uncalibrated-fp8` parameter every preset takes: how ComfyUI runs an
    /// FP8 layer that got no static activation scale (no calibration on this run,
    /// or a layer the walk never reached). The host reads it from any recipe that
    /// declares it. `exact` (default) marks the layer
    /// `"full_precision_matrix_mult": true` (ComfyUI dequantizes: exact, smaller,
    /// not faster); `fast` takes ComfyUI's FP8 matmul at activation scale 1.0
    /// (faster on FP8 GPUs; values clamp at +-448 and small ones lose precision).
    pub fn uncalibrated_fp8() -> ParamSpec {
        Self::choice(
            "uncalibrated-fp8",
            "exact",
            &["exact", "fast"],
            "FP8 layers without a calibrated input_scale: exact (ComfyUI dequantizes them; smaller, exact, not faster) or fast (ComfyUI's FP8 matmul at activation scale 1.0; less accurate)",
        )
    }

    /// The `exclude` parameter every preset takes.
    pub fn exclude() -> ParamSpec {
        Self::text("exclude", "", "Extra module patterns to keep in high precision, comma-separated shell wildcards (e.g. \"*.attn1.*,out.*\")")
    }
}

/// The recipe's parameters as the host validated them (defaults filled in).
///
/// ```no_run
/// use quantsmith_recipe_sdk::params::{Format, Params};
///
/// let params = Params::load();
/// let format = params.format().unwrap_or(Format::Fp8);
/// let extra: Vec<String> = params.list("exclude");
/// let strength = params.number("alpha").unwrap_or(0.5);
/// ```
pub struct Params(Vec<(String, ParamValue)>);

impl Params {
    /// Fetches the parameters from the host.
    pub fn load() -> Params {
        Params(host::params())
    }

    pub fn get(&self, name: &str) -> Option<&ParamValue> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    pub fn text(&self, name: &str) -> Option<&str> {
        match self.get(name) {
            Some(ParamValue::Text(s)) => Some(s),
            _ => None,
        }
    }

    pub fn boolean(&self, name: &str) -> Option<bool> {
        match self.get(name) {
            Some(ParamValue::Boolean(b)) => Some(*b),
            _ => None,
        }
    }

    pub fn integer(&self, name: &str) -> Option<i64> {
        match self.get(name) {
            Some(ParamValue::Integer(i)) => Some(*i),
            _ => None,
        }
    }

    pub fn number(&self, name: &str) -> Option<f64> {
        match self.get(name) {
            Some(ParamValue::Number(n)) => Some(*n),
            Some(ParamValue::Integer(i)) => Some(*i as f64),
            _ => None,
        }
    }

    /// The `format` parameter; an unknown value is an error naming the choices.
    pub fn format(&self) -> Result<Format, String> {
        let s = self.text("format").unwrap_or("fp8");
        Format::parse(s).ok_or_else(|| format!("unknown format {s:?}; expected one of fp8, int8, nvfp4, mxfp8"))
    }

    /// A comma-separated list parameter, trimmed, empty entries dropped.
    pub fn list(&self, name: &str) -> Vec<String> {
        self.text(name)
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }
}
