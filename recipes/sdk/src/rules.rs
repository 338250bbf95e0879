//! Builds the ordered, ModelOpt-style quantizer rules of a [`QuantPlan`].
//!
//! ```no_run
//! use quantsmith_recipe_sdk::prelude::*;
//!
//! let plan = RuleSet::new()
//!     .unwrap_linear()                  // every Linear module is a quantizable layer
//!     .deny_all()                       // "*": everything off
//!     .quantize("*", Format::Fp8)       // then FP8 everywhere
//!     .quantize("*.attn1.*", Format::Nvfp4)
//!     .exclude("out.*")                 // exclusions last: later rules win
//!     .build();
//! assert!(!plan.rules.is_empty());
//! ```

use crate::host;
use crate::params::Format;
use crate::types::{ModuleKind, QuantPlan, QuantizerRule};

/// An ordered rule list under construction. Later rules win.
#[derive(Default, Clone, Debug)]
pub struct RuleSet {
    quantizable: Vec<String>,
    rules: Vec<QuantizerRule>,
    notes: Vec<String>,
}

/// The quantizer-name pattern for a module pattern's weight quantizer.
pub fn weight_quantizer(module_pattern: &str) -> String {
    format!("{module_pattern}.weight_quantizer")
}

/// The quantizer-name pattern for every quantizer of the modules a pattern names.
pub fn all_quantizers(module_pattern: &str) -> String {
    format!("{module_pattern}.*_quantizer")
}

impl RuleSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks every module the host classified as Linear as quantizable.
    pub fn unwrap_linear(mut self) -> Self {
        for m in host::modules() {
            if m.kind == ModuleKind::Linear {
                self.quantizable.push(m.path);
            }
        }
        self
    }

    /// Marks the modules matching a module-path wildcard as quantizable.
    pub fn unwrap(mut self, module_pattern: &str) -> Self {
        self.quantizable.push(module_pattern.to_string());
        self
    }

    /// `*` off: the usual first rule.
    pub fn deny_all(mut self) -> Self {
        self.rules.push(QuantizerRule { pattern: "*".into(), enable: false, format: None, axis: None, block_size: None });
        self
    }

    /// Quantizes the weights of the modules matching `module_pattern` with `format`.
    pub fn quantize(mut self, module_pattern: &str, format: Format) -> Self {
        self.rules.push(QuantizerRule {
            pattern: weight_quantizer(module_pattern),
            enable: true,
            format: Some(format.wit()),
            axis: format.axis(),
            block_size: format.block_size(),
        });
        self
    }

    /// Leaves the modules matching `module_pattern` in high precision.
    pub fn exclude(mut self, module_pattern: &str) -> Self {
        self.rules.push(QuantizerRule { pattern: all_quantizers(module_pattern), enable: false, format: None, axis: None, block_size: None });
        self
    }

    /// Like [`RuleSet::exclude`] for each pattern that matches at least one module of
    /// this checkpoint; the rest are dropped (a shared list spans several families).
    pub fn exclude_existing<S: AsRef<str>>(mut self, module_patterns: &[S]) -> Self {
        for p in module_patterns {
            if matches_any(p.as_ref()) {
                self = self.exclude(p.as_ref());
            }
        }
        self
    }

    /// Like [`RuleSet::quantize`] for each pattern that matches at least one module.
    pub fn quantize_existing<S: AsRef<str>>(mut self, module_patterns: &[S], format: Format) -> Self {
        for p in module_patterns {
            if matches_any(p.as_ref()) {
                self = self.quantize(p.as_ref(), format);
            }
        }
        self
    }

    /// Adds a raw rule.
    pub fn rule(mut self, rule: QuantizerRule) -> Self {
        self.rules.push(rule);
        self
    }

    /// A note recorded in the run report.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    pub fn build(self) -> QuantPlan {
        QuantPlan { quantizable: self.quantizable, rules: self.rules, notes: self.notes }
    }
}

/// Whether a module-path pattern names at least one module of this checkpoint.
pub fn matches_any(module_pattern: &str) -> bool {
    host::matching_modules(&all_quantizers(module_pattern)).map(|m| !m.is_empty()).unwrap_or(false)
}
