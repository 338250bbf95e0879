//! Forward passes, written once against [`crate::nn::Ops`], with the original
//! (LDM / single-file) weight names:
//!
//! - [`arch`]: one description per family (latents, parameterization, schedule, text stack).
//! - [`denoiser`]: any backbone behind one sampler-facing boundary.
//! - [`unet`]: the SD1.5 / SD2 / SDXL base and refiner UNet (`openaimodel.py` layout).
//! - [`clip`]: CLIP-L and OpenCLIP-bigG text encoders, as stored in SD1.5 / SDXL checkpoints.
//! - [`flux`]: FLUX.1 dev and schnell (BFL `flux/model.py` layout).
//! - [`mmdit`]: the SD3 / SD3.5 MMDiT (`mmdit.py` layout).
//! - [`tokenizer`]: CLIP's byte-level BPE, from a vocabulary the user points at.
//! - [`text`]: T5 and standalone text-encoder files (SD3 / FLUX conditioning).
//!
//! Every quantizable module input goes through [`InputHooks::apply`] so that
//! calibration can observe it and evaluation can fake-quantize it.

pub mod arch;
pub mod clip;
pub mod denoiser;
pub mod flux;
pub mod mmdit;
pub mod text;
pub mod tokenizer;
pub mod unet;

use std::collections::HashMap;

use anyhow::{Context, Result, anyhow};

use crate::checkpoint::Checkpoint;
use crate::formats::{SourceDtype, WeightView};
use crate::nn::{ActQuant, Ops};

/// Where a model's weights come from, by full stored key.
pub trait WeightSource {
    /// Shape and bytes of `key`.
    fn tensor(&self, key: &str) -> Result<(Vec<usize>, WeightView<'_>)>;
    fn contains(&self, key: &str) -> bool;
    /// `key` as f32 when it is stored in a dtype [`WeightSource::tensor`] cannot
    /// view (FP8, with its scale applied); `None` for every other tensor.
    fn dequantized(&self, key: &str) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        let _ = key;
        Ok(None)
    }
}

impl WeightSource for Checkpoint {
    fn tensor(&self, key: &str) -> Result<(Vec<usize>, WeightView<'_>)> {
        let t = self.get(key).ok_or_else(|| anyhow!("checkpoint has no tensor `{key}`"))?;
        let dtype = SourceDtype::from_safetensors(t.dtype)
            .with_context(|| format!("tensor `{key}` has dtype {:?}, not a float the model can run", t.dtype))?;
        let cols = t.shape.last().copied().unwrap_or(1).max(1);
        let rows = t.elements() / cols;
        Ok((t.shape.clone(), WeightView { name: &t.key, dtype, rows, cols, bytes: self.bytes(t) }))
    }
    fn contains(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

/// Weights replaced by host-side f32 copies (quantized-dequantized weights for
/// the fake-quantized forward), falling back to `base` for everything else.
pub struct ReplacedWeights<'a> {
    pub base: &'a dyn WeightSource,
    /// Full key -> (shape, dtype, little-endian bytes).
    pub replaced: HashMap<String, (Vec<usize>, SourceDtype, Vec<u8>)>,
}

impl WeightSource for ReplacedWeights<'_> {
    fn tensor(&self, key: &str) -> Result<(Vec<usize>, WeightView<'_>)> {
        match self.replaced.get_key_value(key) {
            Some((stored_key, (shape, dtype, bytes))) => {
                let cols = shape.last().copied().unwrap_or(1).max(1);
                let rows = shape.iter().product::<usize>() / cols;
                Ok((shape.clone(), WeightView { name: stored_key, dtype: *dtype, rows, cols, bytes }))
            }
            None => self.base.tensor(key),
        }
    }
    fn contains(&self, key: &str) -> bool {
        self.replaced.contains_key(key) || self.base.contains(key)
    }
    fn dequantized(&self, key: &str) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        if self.replaced.contains_key(key) { Ok(None) } else { self.base.dequantized(key) }
    }
}

/// What happens to one module's input.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct InputHook {
    /// Observer slot that sees the input (calibration).
    pub observer: Option<usize>,
    /// Fake quantization applied to the input (evaluation).
    pub quant: Option<ActQuant>,
}

/// Input hooks by module path (LDM name without `.weight` and without the
/// checkpoint prefix, e.g. `input_blocks.4.1.transformer_blocks.0.attn1.to_q`).
#[derive(Default)]
pub struct InputHooks {
    pub by_module: HashMap<String, InputHook>,
    /// When set, every hooked module's input (before fake quantization) is kept
    /// here by module path: evaluation compares them between two forward passes.
    pub recorded: Option<std::cell::RefCell<HashMap<String, Box<dyn std::any::Any + Send>>>>,
}

impl InputHooks {
    pub fn none() -> InputHooks {
        InputHooks::default()
    }

    /// Observes and/or fake-quantizes `x`, the input of `module`.
    pub fn apply<O: Ops>(&self, ops: &O, module: &str, x: &O::Tensor) -> Result<O::Tensor> {
        let Some(hook) = self.by_module.get(module) else { return Ok(x.clone()) };
        if let Some(rec) = &self.recorded {
            rec.borrow_mut().insert(module.to_string(), Box::new(x.clone()));
        }
        if let Some(slot) = hook.observer {
            ops.observe(x, slot)?;
        }
        match hook.quant {
            Some(q) => ops.fake_quant(x, q),
            None => Ok(x.clone()),
        }
    }
}
