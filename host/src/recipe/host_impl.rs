//! The host functions a recipe may call (`quantsmith:recipe/host`). Their time
//! counts against the call's budget; the ones that scan data (`matching-modules`,
//! `read-small`, `stats`) are refused once it is used up (State::check_deadline),
//! the rest answer from the header in time bounded by the checkpoint's size.

use safetensors::Dtype;

use super::quantsmith::recipe::host::{Host, LogLevel};
use super::quantsmith::recipe::types::Host as TypesHost;
use super::runtime::State;
use super::wit::{self, CheckpointInfo, ModuleInfo, ParamValue, TensorInfo, TensorStats};
use crate::checkpoint::elements;
use crate::modules::ModuleKind;
use crate::plan::QuantizerPattern;

/// Most elements `read-small` returns.
const SMALL_TENSOR_LIMIT: usize = 65536;

fn wit_dtype(d: Dtype) -> wit::Dtype {
    use wit::Dtype as W;
    match d {
        Dtype::F64 => W::Float64,
        Dtype::F32 => W::Float32,
        Dtype::F16 => W::Float16,
        Dtype::BF16 => W::Bfloat16,
        Dtype::I64 => W::Int64,
        Dtype::I32 => W::Int32,
        Dtype::I16 => W::Int16,
        Dtype::I8 => W::Int8,
        Dtype::U64 => W::Uint64,
        Dtype::U32 => W::Uint32,
        Dtype::U16 => W::Uint16,
        Dtype::U8 => W::Uint8,
        Dtype::BOOL => W::Boolean,
        Dtype::F8_E4M3 => W::Float8E4m3,
        Dtype::F8_E5M2 => W::Float8E5m2,
        _ => W::Other,
    }
}

fn wit_kind(k: ModuleKind) -> wit::ModuleKind {
    match k {
        ModuleKind::Linear => wit::ModuleKind::Linear,
        ModuleKind::Conv => wit::ModuleKind::Conv,
        ModuleKind::Norm => wit::ModuleKind::Norm,
        ModuleKind::Embedding => wit::ModuleKind::Embedding,
        ModuleKind::Other => wit::ModuleKind::Other,
    }
}

fn dims(shape: &[usize]) -> Vec<u64> {
    shape.iter().map(|&d| d as u64).collect()
}

impl TypesHost for State {}

impl Host for State {
    fn checkpoint(&mut self) -> CheckpointInfo {
        let Some(ctx) = &self.ctx else {
            return CheckpointInfo { prefix: String::new(), components: vec![], tensor_count: 0, file_bytes: 0, metadata: vec![] };
        };
        let c = &ctx.checkpoint;
        CheckpointInfo {
            prefix: c.prefix().to_string(),
            components: c.components().iter().map(|c| c.name().to_string()).collect(),
            tensor_count: c.tensors().len() as u64,
            file_bytes: c.file_len() as u64,
            metadata: c.metadata().iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }

    fn tensors(&mut self) -> Vec<TensorInfo> {
        let Some(ctx) = &self.ctx else { return vec![] };
        let c = &ctx.checkpoint;
        c.diffusion_tensors()
            .map(|t| TensorInfo { name: c.local_name(t).to_string(), shape: dims(&t.shape), dtype: wit_dtype(t.dtype) })
            .collect()
    }

    fn modules(&mut self) -> Vec<ModuleInfo> {
        let Some(ctx) = &self.ctx else { return vec![] };
        ctx.modules
            .iter()
            .map(|m| ModuleInfo {
                path: m.path.clone(),
                kind: wit_kind(m.kind),
                weight_shape: dims(&m.weight_shape),
                weight_dtype: m.weight_dtype.map(wit_dtype).unwrap_or(wit::Dtype::Other),
                has_bias: m.bias_key.is_some(),
                parameters: m.parameters,
            })
            .collect()
    }

    fn has_tensor(&mut self, name: String) -> bool {
        self.ctx.as_ref().is_some_and(|c| c.checkpoint.get_local(&name).is_some())
    }

    fn shape(&mut self, name: String) -> Option<Vec<u64>> {
        self.ctx.as_ref().and_then(|c| c.checkpoint.get_local(&name)).map(|t| dims(&t.shape))
    }

    fn matching_modules(&mut self, pattern: String) -> Result<Vec<String>, String> {
        self.check_deadline("matching-modules")?;
        let p = QuantizerPattern::new(&pattern)?;
        let Some(ctx) = &self.ctx else { return Ok(vec![]) };
        Ok(ctx.modules.iter().filter(|m| p.matches_module(&m.path)).map(|m| m.path.clone()).collect())
    }

    fn read_small(&mut self, name: String) -> Result<Vec<f32>, String> {
        self.check_deadline("read-small")?;
        let ctx = self.ctx.as_ref().ok_or("no checkpoint during describe")?;
        let t = ctx.checkpoint.get_local(&name).ok_or_else(|| format!("no tensor {name:?}"))?;
        if t.elements() > SMALL_TENSOR_LIMIT {
            return Err(format!(
                "tensor {name} has {} elements; read-small returns at most {SMALL_TENSOR_LIMIT} (use stats)",
                t.elements()
            ));
        }
        let values = elements::decode_f64(t.dtype, ctx.checkpoint.bytes(t))
            .ok_or_else(|| format!("tensor {name}: dtype {:?} cannot be read as numbers", t.dtype))?;
        Ok(values.into_iter().map(|v| v as f32).collect())
    }

    fn stats(&mut self, name: String) -> Result<TensorStats, String> {
        self.check_deadline("stats")?;
        let ctx = self.ctx.as_ref().ok_or("no checkpoint during describe")?;
        let t = ctx.checkpoint.get_local(&name).ok_or_else(|| format!("no tensor {name:?}"))?;
        let s = elements::stats(t.dtype, ctx.checkpoint.bytes(t))
            .ok_or_else(|| format!("tensor {name}: dtype {:?} has no statistics", t.dtype))?;
        Ok(TensorStats { amax: s.amax, mean: s.mean, std: s.std, elements: s.elements, non_finite: s.non_finite })
    }

    fn params(&mut self) -> Vec<(String, ParamValue)> {
        self.params.clone()
    }

    fn log(&mut self, level: LogLevel, message: String) {
        // Bounded: a recipe cannot flood the terminal with one call.
        let message = crate::text::untrusted(&message);
        let recipe = &self.recipe;
        match level {
            LogLevel::Trace => tracing::trace!(target: "recipe", recipe = %recipe, "{message}"),
            LogLevel::Debug => tracing::debug!(target: "recipe", recipe = %recipe, "{message}"),
            LogLevel::Info => tracing::info!(target: "recipe", recipe = %recipe, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "recipe", recipe = %recipe, "{message}"),
            LogLevel::Error => tracing::error!(target: "recipe", recipe = %recipe, "{message}"),
        }
    }
}
