//! From a recipe's rules to per-layer decisions, with every rule checked.
//!
//! Rules use ModelOpt's vocabulary: ordered shell wildcards over quantizer names
//! (`<module>.weight_quantizer`, `<module>.input_quantizer`), later rules win,
//! and they act only on the modules the recipe unwrapped as quantizable.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::formats::{QuantFormat, QuantSpec, SourceDtype};
use crate::modules::{ModuleKind, ModuleTable};
use crate::recipe::wit;

/// Layers ComfyUI reads to detect the model from stored shapes (SPEC section 3):
/// they must keep their logical shape, so packed or padded formats are refused there.
pub const PROBE_LAYERS: &[&str] = &[
    "img_in",
    "txt_in",
    "vector_in.*",
    "context_embedder",
    "y_embedder.*",
    "x_embedder.*",
    "label_emb.0.0",
    "input_blocks.0.0",
    "*.attn2.to_k",
    "*proj_in",
];

/// [`PROBE_LAYERS`] as matchers over module paths.
pub fn probe_patterns() -> Vec<QuantizerPattern> {
    PROBE_LAYERS.iter().map(|p| QuantizerPattern::new(p).expect("probe patterns are well formed")).collect()
}

/// Longest pattern accepted, in bytes. Module paths stay under 200 bytes; longer
/// patterns only serve to make globset's regex compile slow or fail.
pub const MAX_PATTERN_LEN: usize = 1024;

/// A shell wildcard (`*` crosses dots, `?`, `[qkv]`, `[!x]`) over quantizer names.
#[derive(Clone, Debug)]
pub struct QuantizerPattern {
    raw: String,
    /// A set of one glob: unlike `Glob::compile_matcher`, which panics when the
    /// regex grows past its size limit, building a set reports that as an error.
    matcher: GlobSet,
}

impl QuantizerPattern {
    pub fn new(pattern: &str) -> Result<QuantizerPattern, String> {
        if pattern.is_empty() {
            return Err("empty pattern".into());
        }
        if pattern.len() > MAX_PATTERN_LEN {
            return Err(format!(
                "pattern of {} bytes is longer than the {MAX_PATTERN_LEN} allowed: {}",
                pattern.len(),
                crate::text::sanitize(pattern, 60)
            ));
        }
        let shown = || crate::text::sanitize(pattern, 200);
        let glob = GlobBuilder::new(pattern)
            .literal_separator(false)
            .backslash_escape(true)
            .build()
            .map_err(|e| format!("malformed pattern \"{}\": {}", shown(), e.kind()))?;
        let matcher =
            GlobSetBuilder::new().add(glob).build().map_err(|e| format!("pattern \"{}\" is too complex: {}", shown(), e.kind()))?;
        Ok(QuantizerPattern { raw: pattern.to_string(), matcher })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// A pattern with no wildcard names exactly one quantizer.
    pub fn is_literal(&self) -> bool {
        !self.raw.contains(['*', '?', '[', '{'])
    }

    pub fn matches(&self, quantizer: &str) -> bool {
        self.matcher.is_match(quantizer)
    }

    /// Whether it names any quantizer of the module at `path`.
    pub fn matches_module(&self, path: &str) -> bool {
        self.matches(&format!("{path}.weight_quantizer")) || self.matches(&format!("{path}.input_quantizer"))
    }
}

/// What happens to one quantizable layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerDecision {
    /// Module path inside the diffusion model.
    pub path: String,
    /// Stored key of the module (with the checkpoint's prefix), without `.weight`.
    pub key: String,
    /// `[out, in]`.
    pub shape: [usize; 2],
    #[serde(skip)]
    pub dtype: SourceDtype,
    /// `None`: stays in the source dtype.
    pub spec: Option<QuantSpec>,
    /// Index of the rule that decided, if any.
    pub rule: Option<usize>,
}

/// A plan checked against the checkpoint.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ResolvedPlan {
    pub layers: Vec<LayerDecision>,
    pub warnings: Vec<String>,
    pub notes: Vec<String>,
}

impl ResolvedPlan {
    pub fn quantized(&self) -> impl Iterator<Item = &LayerDecision> {
        self.layers.iter().filter(|l| l.spec.is_some())
    }

    pub fn decision_for_key(&self, weight_key: &str) -> Option<&LayerDecision> {
        let key = weight_key.strip_suffix(".weight")?;
        self.layers.iter().find(|l| l.key == key && l.spec.is_some())
    }
}

fn format_of(f: wit::QuantFormat) -> QuantFormat {
    match f {
        wit::QuantFormat::Fp8 => QuantFormat::Fp8,
        wit::QuantFormat::Int8 => QuantFormat::Int8,
        wit::QuantFormat::Nvfp4 => QuantFormat::Nvfp4,
        wit::QuantFormat::Mxfp8 => QuantFormat::Mxfp8,
    }
}

/// Checks a rule's attributes against what its format allows.
fn check_rule(i: usize, r: &wit::QuantizerRule) -> Result<Option<QuantSpec>, String> {
    let at = format!("rule {i} ({:?})", r.pattern);
    if !r.enable {
        return Ok(None);
    }
    let Some(format) = r.format.map(format_of) else { return Err(format!("{at} enables quantization but names no format")) };
    let per_channel = match (format, r.axis) {
        (QuantFormat::Int8, Some(0)) => true,
        (QuantFormat::Int8, None) => false,
        (_, None) => false,
        (f, Some(a)) => {
            return Err(format!(
                "{at}: axis {a} is not available for {}; {}",
                f.name(),
                if f == QuantFormat::Int8 {
                    "int8 takes axis 0 (per output channel) or none (per tensor)"
                } else {
                    "this format takes no axis"
                }
            ));
        }
    };
    match (format.block_size(), r.block_size) {
        (_, None) => {}
        (Some(b), Some(got)) if b == got => {}
        (Some(b), Some(got)) => return Err(format!("{at}: block size {got} is not allowed for {}; it uses blocks of {b}", format.name())),
        (None, Some(got)) => return Err(format!("{at}: block size {got} is not allowed for {}, which has no blocks", format.name())),
    }
    Ok(Some(QuantSpec { format, per_channel }))
}

/// Most rules a plan may hold: real plans have tens; each rule costs a glob
/// compile and a match against every module.
pub const MAX_RULES: usize = 10_000;
/// Most `quantizable` entries a plan may hold.
pub const MAX_QUANTIZABLE: usize = 100_000;
/// Most notes kept from a plan (each already cut to crate::text::MAX_PRINTED).
pub const MAX_NOTES: usize = 100;

/// Why a plan could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// The plan breaks a rule; the message says which.
    Invalid(String),
    /// Checking it ran past the deadline (the plan call's time budget).
    OutOfTime,
}

/// Resolves and validates a recipe's plan.
pub fn resolve(plan: &wit::QuantPlan, modules: &ModuleTable, ckpt: &Checkpoint) -> Result<ResolvedPlan, String> {
    resolve_by(plan, modules, ckpt, None).map_err(|e| match e {
        PlanError::Invalid(m) => m,
        PlanError::OutOfTime => unreachable!("no deadline was given"),
    })
}

/// [`resolve`], stopping with [`PlanError::OutOfTime`] once `deadline` passes: a
/// plan within the caps can still ask for rules × modules glob matches, and that
/// host work counts against the recipe's time budget like its own.
pub fn resolve_by(
    plan: &wit::QuantPlan,
    modules: &ModuleTable,
    ckpt: &Checkpoint,
    deadline: Option<std::time::Instant>,
) -> Result<ResolvedPlan, PlanError> {
    let in_time = || match deadline {
        Some(d) if std::time::Instant::now() >= d => Err(PlanError::OutOfTime),
        _ => Ok(()),
    };
    resolve_checked(plan, modules, ckpt, &in_time)
}

fn resolve_checked(
    plan: &wit::QuantPlan,
    modules: &ModuleTable,
    ckpt: &Checkpoint,
    in_time: &dyn Fn() -> Result<(), PlanError>,
) -> Result<ResolvedPlan, PlanError> {
    use PlanError::Invalid;
    let mut warnings = Vec::new();
    if plan.rules.len() > MAX_RULES {
        return Err(Invalid(format!("{} rules; a plan may hold at most {MAX_RULES}", plan.rules.len())));
    }
    if plan.quantizable.len() > MAX_QUANTIZABLE {
        return Err(Invalid(format!("{} quantizable entries; a plan may hold at most {MAX_QUANTIZABLE}", plan.quantizable.len())));
    }
    let mut notes: Vec<String> = plan.notes.iter().take(MAX_NOTES).map(|n| crate::text::untrusted(n)).collect();
    if plan.notes.len() > MAX_NOTES {
        notes.push(format!("({} more notes not shown)", plan.notes.len() - MAX_NOTES));
    }

    // 1. Which modules are quantizable layers.
    let mut quantizable = vec![false; modules.len()];
    for p in &plan.quantizable {
        in_time()?;
        let pat = QuantizerPattern::new(p).map_err(|e| Invalid(format!("quantizable: {e}")))?;
        let mut hit = false;
        for (i, m) in modules.iter().enumerate() {
            let matched = if pat.is_literal() { m.path == *p } else { pat.matches(&m.path) };
            if !matched {
                continue;
            }
            hit = true;
            if m.kind != ModuleKind::Linear {
                if pat.is_literal() {
                    return Err(Invalid(format!(
                        "module {} is a {} layer; ComfyUI's mixed-precision loader quantizes only Linear layers",
                        m.path,
                        m.kind.name()
                    )));
                }
                continue;
            }
            quantizable[i] = true;
        }
        if !hit {
            return Err(Invalid(format!("quantizable {p:?} names no module of this checkpoint")));
        }
    }

    // 2. Rules: well-formed, allowed attributes, and naming something real.
    let mut rules = Vec::with_capacity(plan.rules.len());
    for (i, r) in plan.rules.iter().enumerate() {
        in_time()?;
        let pat = QuantizerPattern::new(&r.pattern).map_err(|e| Invalid(format!("rule {i}: {e}")))?;
        let spec = check_rule(i, r).map_err(Invalid)?;
        let any = modules.iter().any(|m| pat.matches_module(&m.path));
        if !any {
            if pat.is_literal() {
                return Err(Invalid(format!("rule {i} names {:?}, which does not exist in this checkpoint", r.pattern)));
            }
            warnings.push(format!("rule {i} ({:?}) matches no quantizer", r.pattern));
        }
        rules.push((pat, r.enable, spec));
    }

    let probes = probe_patterns();

    // 3. Decide each quantizable layer: the last matching rule wins.
    let mut layers = Vec::new();
    let mut input_rules_warned = false;
    for (i, m) in modules.iter().enumerate() {
        if !quantizable[i] {
            continue;
        }
        in_time()?;
        let weight_q = format!("{}.weight_quantizer", m.path);
        let input_q = format!("{}.input_quantizer", m.path);
        let mut decision: (Option<QuantSpec>, Option<usize>) = (None, None);
        for (ri, (pat, enable, spec)) in rules.iter().enumerate() {
            if pat.matches(&weight_q) {
                decision = (*spec, Some(ri));
            }
            if *enable && pat.matches(&input_q) && !pat.matches(&weight_q) && !input_rules_warned {
                warnings.push(format!("rule {ri} ({:?}) enables input quantizers: static input scales need calibration, which this version does not run; ignored", pat.as_str()));
                input_rules_warned = true;
            }
        }
        let Some(weight_key) = m.weight_key.as_deref() else { continue };
        let Some(entry) = ckpt.get(weight_key) else { continue };
        if decision.0.is_some() && !weight_key.ends_with(".weight") {
            // ComfyUI looks for `<layer>.weight`; a layer stored under another suffix stays as it is.
            warnings.push(format!("layer {} stores its weight as {weight_key}, not .weight; left unquantized", m.path));
            decision = (None, None);
        }
        let dtype = SourceDtype::from_safetensors(entry.dtype);
        if let Some(spec) = decision.0 {
            if dtype.is_none() {
                return Err(Invalid(format!(
                    "layer {} has dtype {:?}; only F32, F16 and BF16 weights can be quantized",
                    m.path, entry.dtype
                )));
            }
            if spec.format.changes_shape() && probes.iter().any(|p| p.matches(&m.path)) {
                return Err(Invalid(format!(
                    "layer {} is one ComfyUI reads to detect the model; it must keep its logical shape, so {} (packed/padded) is not allowed there: use fp8, int8 or leave it unquantized",
                    m.path,
                    spec.format.name()
                )));
            }
        }
        let key = weight_key.strip_suffix(".weight").unwrap_or(weight_key).to_string();
        layers.push(LayerDecision {
            path: m.path.clone(),
            key,
            shape: [m.weight_shape[0], m.weight_shape[1]],
            dtype: dtype.unwrap_or(SourceDtype::BF16),
            spec: decision.0,
            rule: decision.1,
        });
    }
    Ok(ResolvedPlan { layers, warnings, notes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_follow_fnmatch() {
        let p = QuantizerPattern::new("*.attn[12].to_[qkv].weight_quantizer").unwrap();
        assert!(p.matches("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight_quantizer"));
        assert!(!p.matches("input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight_quantizer"));
        assert!(QuantizerPattern::new("*").unwrap().matches("a.b.c.input_quantizer"));
        assert!(QuantizerPattern::new("time_embed.*").unwrap().matches_module("time_embed.0"));
        assert!(!QuantizerPattern::new("time_embed.*").unwrap().matches_module("label_emb.0.0"));
        assert!(QuantizerPattern::new("[unclosed").is_err());
        assert!(QuantizerPattern::new("out.2.weight_quantizer").unwrap().is_literal());
        assert!(!QuantizerPattern::new("out.*").unwrap().is_literal());
    }

    /// Long or regex-heavy patterns are errors, never globset's panic.
    #[test]
    fn oversized_patterns_are_errors() {
        let long = "a*".repeat(MAX_PATTERN_LEN);
        assert!(QuantizerPattern::new(&long).unwrap_err().contains("longer than the 1024 allowed"));
        assert!(QuantizerPattern::new(&"x".repeat(1 << 20)).is_err());
        // Within the length cap, but past globset's regex size limit.
        let heavy = "[\\u{0}-\\u{10ffff}]?".repeat(MAX_PATTERN_LEN / 20);
        let _ = QuantizerPattern::new(&heavy);
        let classes = "{a,b,c,d,e,f,g,h}".repeat(MAX_PATTERN_LEN / 17);
        let _ = QuantizerPattern::new(&classes);
    }

    fn rule(enable: bool, format: Option<wit::QuantFormat>, axis: Option<i32>, block: Option<u32>) -> wit::QuantizerRule {
        wit::QuantizerRule { pattern: "*".into(), enable, format, axis, block_size: block }
    }

    #[test]
    fn rule_attributes_are_checked() {
        use wit::QuantFormat as F;
        assert_eq!(check_rule(0, &rule(false, None, None, None)).unwrap(), None);
        assert!(check_rule(0, &rule(true, None, None, None)).unwrap_err().contains("names no format"));
        assert_eq!(
            check_rule(0, &rule(true, Some(F::Int8), Some(0), None)).unwrap(),
            Some(QuantSpec { format: QuantFormat::Int8, per_channel: true })
        );
        assert_eq!(
            check_rule(0, &rule(true, Some(F::Int8), None, None)).unwrap(),
            Some(QuantSpec { format: QuantFormat::Int8, per_channel: false })
        );
        assert!(check_rule(0, &rule(true, Some(F::Fp8), Some(0), None)).unwrap_err().contains("takes no axis"));
        assert!(check_rule(0, &rule(true, Some(F::Nvfp4), None, Some(32))).unwrap_err().contains("blocks of 16"));
        assert!(check_rule(0, &rule(true, Some(F::Nvfp4), None, Some(16))).is_ok());
        assert!(check_rule(0, &rule(true, Some(F::Mxfp8), None, Some(32))).is_ok());
        assert!(check_rule(0, &rule(true, Some(F::Fp8), None, Some(16))).unwrap_err().contains("no blocks"));
    }
}
