//! Checkpoint I/O: memory-mapped safetensors input, component split, streaming output.

pub mod elements;
pub mod writer;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};

/// The prefix of the diffusion model inside a full single-file checkpoint.
pub const DIFFUSION_PREFIX: &str = "model.diffusion_model.";

/// Which part of a checkpoint a tensor belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Component {
    DiffusionModel,
    Vae,
    TextEncoders,
    Other,
}

impl Component {
    pub fn name(self) -> &'static str {
        match self {
            Component::DiffusionModel => "diffusion-model",
            Component::Vae => "vae",
            Component::TextEncoders => "text-encoders",
            Component::Other => "other",
        }
    }

    fn of(key: &str, full_checkpoint: bool) -> Component {
        if !full_checkpoint || key.starts_with(DIFFUSION_PREFIX) {
            Component::DiffusionModel
        } else if key.starts_with("first_stage_model.") || key.starts_with("vae.") {
            Component::Vae
        } else if ["cond_stage_model.", "conditioner.", "text_encoders."].iter().any(|p| key.starts_with(p)) {
            Component::TextEncoders
        } else {
            Component::Other
        }
    }
}

/// One tensor of the file, in file order.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// The key as stored (with any prefix).
    pub key: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub offsets: (usize, usize),
    pub component: Component,
}

impl TensorEntry {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn byte_len(&self) -> usize {
        self.offsets.1 - self.offsets.0
    }
}

/// Why a file cannot be used as input.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid safetensors file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path} is in diffusers format (found `{key}`); only the original single-file layout is supported \
         (ComfyUI drops quantization keys when it converts diffusers names). Use the original \
         .safetensors release of the model, or convert it to the original layout first"
    )]
    Diffusers { path: PathBuf, key: String },
    #[error("{path} is already quantized (found `{key}`); quantize the original bf16/fp16/fp32 checkpoint instead")]
    AlreadyQuantized { path: PathBuf, key: String },
    #[error("{path} holds no diffusion model tensors")]
    NoDiffusionModel { path: PathBuf },
}

/// A memory-mapped safetensors checkpoint.
pub struct Checkpoint {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: Vec<TensorEntry>,
    index: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
    prefix: String,
}

fn corrupt(path: &Path, reason: impl ToString) -> CheckpointError {
    CheckpointError::Corrupt { path: path.to_path_buf(), reason: reason.to_string() }
}

impl Checkpoint {
    /// Maps and validates a checkpoint: header bounds, dtypes, contiguous non-overlapping
    /// offsets covering the file exactly (safetensors' own validation), then the layout.
    pub fn open(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let file = File::open(path).map_err(|source| CheckpointError::Open { path: path.to_path_buf(), source })?;
        // SAFETY: the map is read-only; a file truncated under us by another process
        // can fault, the same contract every safetensors reader accepts.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| CheckpointError::Open { path: path.to_path_buf(), source })?;
        let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| corrupt(path, describe_error(&e)))?;
        let data_start = 8 + header_len;

        let mut raw: Vec<(String, Dtype, Vec<usize>, (usize, usize))> = meta
            .tensors()
            .into_iter()
            .map(|(k, info)| (k, info.dtype, info.shape.clone(), info.data_offsets))
            .collect();
        raw.sort_by_key(|t| t.3);

        let full = raw.iter().any(|t| t.0.starts_with(DIFFUSION_PREFIX));
        let prefix = if full { DIFFUSION_PREFIX.to_string() } else { String::new() };
        let tensors: Vec<TensorEntry> = raw
            .into_iter()
            .map(|(key, dtype, shape, offsets)| {
                let component = Component::of(&key, full);
                TensorEntry { key, dtype, shape, offsets, component }
            })
            .collect();
        let index = tensors.iter().enumerate().map(|(i, t)| (t.key.clone(), i)).collect();
        let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
        let ckpt = Checkpoint { path: path.to_path_buf(), mmap, data_start, tensors, index, metadata, prefix };
        ckpt.check_layout()?;
        Ok(ckpt)
    }

    fn check_layout(&self) -> Result<(), CheckpointError> {
        let path = &self.path;
        let dm: Vec<&str> = self.diffusion_tensors().map(|t| self.local_name(t)).collect();
        if dm.is_empty() {
            return Err(CheckpointError::NoDiffusionModel { path: path.clone() });
        }
        let original = ["input_blocks.0.0.weight", "joint_blocks.0.context_block.attn.qkv.weight", "double_blocks.0.img_attn.norm.key_norm.scale"];
        let has_original = original.iter().any(|k| dm.contains(k));
        if !has_original {
            let diffusers_probe = ["conv_in.weight", "time_text_embed.timestep_embedder.linear_1.weight", "x_embedder.weight", "pos_embed.proj.weight"];
            if let Some(key) = diffusers_probe.iter().find(|k| dm.contains(k)).or_else(|| {
                ["down_blocks.0.", "transformer_blocks.0.", "single_transformer_blocks.0."]
                    .iter()
                    .find(|p| dm.iter().any(|k| k.starts_with(**p)))
            }) {
                return Err(CheckpointError::Diffusers { path: path.clone(), key: key.to_string() });
            }
        }
        if let Some(t) = self.tensors.iter().find(|t| t.key.ends_with(".comfy_quant") || t.key.ends_with("scaled_fp8") || t.key.ends_with(".scale_weight")) {
            return Err(CheckpointError::AlreadyQuantized { path: path.clone(), key: t.key.clone() });
        }
        if self.metadata.contains_key("_quantization_metadata") {
            return Err(CheckpointError::AlreadyQuantized { path: path.clone(), key: "__metadata__._quantization_metadata".into() });
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `model.diffusion_model.` for a full checkpoint, empty for a diffusion-model-only file.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn is_full_checkpoint(&self) -> bool {
        !self.prefix.is_empty()
    }

    pub fn file_len(&self) -> usize {
        self.mmap.len()
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    pub fn diffusion_tensors(&self) -> impl Iterator<Item = &TensorEntry> {
        self.tensors.iter().filter(|t| t.component == Component::DiffusionModel)
    }

    /// The file's `__metadata__`.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Components present, in a fixed order.
    pub fn components(&self) -> Vec<Component> {
        let mut c: Vec<Component> = self.tensors.iter().map(|t| t.component).collect();
        c.sort();
        c.dedup();
        c
    }

    /// A tensor's name inside the diffusion model (prefix stripped).
    pub fn local_name<'a>(&self, t: &'a TensorEntry) -> &'a str {
        t.key.strip_prefix(self.prefix.as_str()).unwrap_or(&t.key)
    }

    /// Looks up a stored key.
    pub fn get(&self, key: &str) -> Option<&TensorEntry> {
        self.index.get(key).map(|&i| &self.tensors[i])
    }

    /// Looks up a diffusion-model tensor by its local name.
    pub fn get_local(&self, name: &str) -> Option<&TensorEntry> {
        if self.prefix.is_empty() {
            self.get(name)
        } else {
            self.get(&format!("{}{name}", self.prefix))
        }
    }

    /// The tensor's bytes (little-endian, possibly unaligned).
    pub fn bytes(&self, t: &TensorEntry) -> &[u8] {
        &self.mmap[self.data_start + t.offsets.0..self.data_start + t.offsets.1]
    }

    /// Drops the tensor's pages from this process, so streaming a file larger
    /// than memory keeps the resident set flat.
    pub fn release(&self, t: &TensorEntry) {
        let start = self.data_start + t.offsets.0;
        let page = 4096;
        let aligned = start / page * page;
        let len = self.data_start + t.offsets.1 - aligned;
        // SAFETY: read-only file mapping: dropped pages are read back from the
        // file on the next access, so no data can be lost or observed changed.
        let _ = unsafe { self.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, aligned, len) };
    }
}

/// safetensors' errors, in words a user can act on.
fn describe_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "file too short for a safetensors header (truncated?)".into(),
        E::HeaderTooLarge => "header length is larger than safetensors allows".into(),
        E::InvalidHeaderLength => "header length points beyond the end of the file (truncated?)".into(),
        E::InvalidHeader(_) => "header is not valid UTF-8".into(),
        E::InvalidHeaderDeserialization(err) => format!("header JSON is invalid or names an unknown dtype: {err}"),
        E::InvalidOffset(name) => format!("tensor `{name}` has data offsets that overlap or leave gaps"),
        E::TensorInvalidInfo => "a tensor's byte range does not match its shape and dtype".into(),
        E::MetadataIncompleteBuffer => "tensor data does not cover the file exactly (truncated or trailing bytes)".into(),
        E::ValidationOverflow => "a tensor shape overflows".into(),
        other => other.to_string(),
    }
}
