//! The module table: raw tensors grouped into modules and classified.
//!
//! This is the host's side of "unwrapping": it says what each module *is*
//! (Linear, Conv, ...); the recipe decides which modules are quantizable layers.

use std::collections::HashMap;

use safetensors::Dtype;
use serde::Serialize;

use crate::checkpoint::Checkpoint;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleKind {
    Linear,
    Conv,
    Norm,
    Embedding,
    Other,
}

impl ModuleKind {
    pub fn name(self) -> &'static str {
        match self {
            ModuleKind::Linear => "linear",
            ModuleKind::Conv => "conv",
            ModuleKind::Norm => "norm",
            ModuleKind::Embedding => "embedding",
            ModuleKind::Other => "other",
        }
    }
}

/// One module of the diffusion model.
#[derive(Clone, Debug, Serialize)]
pub struct Module {
    /// Path inside the diffusion model (prefix stripped), without `.weight`.
    pub path: String,
    pub kind: ModuleKind,
    /// Stored key of the weight (or norm `.scale`), if any.
    pub weight_key: Option<String>,
    pub weight_shape: Vec<usize>,
    #[serde(skip)]
    pub weight_dtype: Option<Dtype>,
    pub bias_key: Option<String>,
    /// Stored keys of every tensor of the module.
    pub keys: Vec<String>,
    pub parameters: u64,
}

/// Parameter names that belong to a module rather than naming one.
const PARAM_SUFFIXES: &[&str] = &["weight", "bias", "scale"];

/// Splits `a.b.weight` into (`a.b`, `weight`); a free parameter is its own module.
fn split_param(name: &str) -> (&str, &str) {
    match name.rsplit_once('.') {
        Some((module, param)) if PARAM_SUFFIXES.contains(&param) => (module, param),
        _ => (name, ""),
    }
}

fn classify(path: &str, shape: Option<&[usize]>) -> ModuleKind {
    let last = path.rsplit('.').next().unwrap_or(path);
    match shape.map(|s| s.len()) {
        Some(2) if last.contains("embedding") => ModuleKind::Embedding,
        Some(2) => ModuleKind::Linear,
        Some(3..=5) => ModuleKind::Conv,
        Some(1) => ModuleKind::Norm,
        _ => ModuleKind::Other,
    }
}

/// The diffusion model's modules in file order.
#[derive(Clone, Debug, Default)]
pub struct ModuleTable {
    pub modules: Vec<Module>,
    by_path: HashMap<String, usize>,
}

impl ModuleTable {
    pub fn build(ckpt: &Checkpoint) -> ModuleTable {
        let mut table = ModuleTable::default();
        for t in ckpt.diffusion_tensors() {
            let local = ckpt.local_name(t);
            let (path, param) = split_param(local);
            let idx = *table.by_path.entry(path.to_string()).or_insert_with(|| {
                table.modules.push(Module {
                    path: path.to_string(),
                    kind: ModuleKind::Other,
                    weight_key: None,
                    weight_shape: vec![],
                    weight_dtype: None,
                    bias_key: None,
                    keys: vec![],
                    parameters: 0,
                });
                table.modules.len() - 1
            });
            let m = &mut table.modules[idx];
            m.keys.push(t.key.clone());
            m.parameters += t.elements() as u64;
            match param {
                "weight" | "scale" if m.weight_key.is_none() => {
                    m.weight_key = Some(t.key.clone());
                    m.weight_shape = t.shape.clone();
                    m.weight_dtype = Some(t.dtype);
                }
                "bias" => m.bias_key = Some(t.key.clone()),
                _ => {}
            }
        }
        for m in &mut table.modules {
            m.kind = if m.weight_key.is_some() { classify(&m.path, Some(&m.weight_shape)) } else { ModuleKind::Other };
        }
        table
    }

    pub fn get(&self, path: &str) -> Option<&Module> {
        self.by_path.get(path).map(|&i| &self.modules[i])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Module> {
        self.modules.iter()
    }

    pub fn len(&self) -> usize {
        self.modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// Count and parameters per kind, for `inspect`.
    pub fn summary(&self) -> Vec<(ModuleKind, usize, u64)> {
        let kinds = [ModuleKind::Linear, ModuleKind::Conv, ModuleKind::Norm, ModuleKind::Embedding, ModuleKind::Other];
        kinds
            .iter()
            .map(|&k| {
                let ms = self.modules.iter().filter(|m| m.kind == k);
                let (n, p) = ms.fold((0, 0), |(n, p), m| (n + 1, p + m.parameters));
                (k, n, p)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_module_params() {
        assert_eq!(split_param("input_blocks.1.1.proj_in.weight"), ("input_blocks.1.1.proj_in", "weight"));
        assert_eq!(split_param("double_blocks.0.img_attn.norm.key_norm.scale"), ("double_blocks.0.img_attn.norm.key_norm", "scale"));
        assert_eq!(split_param("pos_embed"), ("pos_embed", ""));
        assert_eq!(split_param("x.weight_scale"), ("x.weight_scale", ""));
    }

    #[test]
    fn classifies_by_rank_and_name() {
        assert_eq!(classify("a.to_q", Some(&[320, 320])), ModuleKind::Linear);
        assert_eq!(classify("input_blocks.0.0", Some(&[320, 4, 3, 3])), ModuleKind::Conv);
        assert_eq!(classify("norm1", Some(&[320])), ModuleKind::Norm);
        assert_eq!(classify("token_embedding", Some(&[49408, 768])), ModuleKind::Embedding);
        assert_eq!(classify("pos_embed", None), ModuleKind::Other);
    }
}
