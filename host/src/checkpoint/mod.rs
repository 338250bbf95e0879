//! Checkpoint I/O: memory-mapped safetensors input, component split, streaming output.

pub mod elements;
pub mod writer;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};

/// Longest tensor name accepted: real checkpoints stay under 200 bytes; names are
/// echoed into plans, patterns and messages, so a megabyte one is refused here.
pub const MAX_TENSOR_NAME: usize = 1024;

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
    // `error` is not marked as the source: the message already says it, and an
    // `{:#}` chain would print it a second time.
    #[error("cannot open {path}: {error}")]
    Open { path: PathBuf, error: std::io::Error },
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
    /// Not a safetensors checkpoint at all, recognised: what it is and what to do.
    #[error("{path} is {what}. {advice}")]
    Recognised { path: PathBuf, what: String, advice: String },
}

const SINGLE_FILE_ADVICE: &str = "Quantsmith reads one single-file .safetensors checkpoint in the original layout \
    (the file ComfyUI loads from models/checkpoints or models/diffusion_models)";

fn recognised(path: &Path, what: impl Into<String>, advice: impl Into<String>) -> CheckpointError {
    CheckpointError::Recognised { path: path.to_path_buf(), what: what.into(), advice: advice.into() }
}

/// Refuses anything but a regular file (directories are named for what they
/// hold; a FIFO or a device would hang or never end), before it is opened.
pub fn require_regular_file(path: &Path) -> Result<(), CheckpointError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|error| CheckpointError::Open { path: path.to_path_buf(), error })?;
    let t = meta.file_type();
    if t.is_file() {
        return Ok(());
    }
    if t.is_dir() {
        return Err(describe_folder(path));
    }
    let what = if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(recognised(path, what, "Give the path of a regular file"))
}

/// What a folder given as a checkpoint is: a diffusers pipeline or model folder, or just a folder.
fn describe_folder(path: &Path) -> CheckpointError {
    let has = |name: &str| path.join(name).is_file();
    let names: Vec<String> = std::fs::read_dir(path)
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str().map(String::from)).take(10_000).collect())
        .unwrap_or_default();
    let diffusers_weights = names.iter().any(|n| n.starts_with("diffusion_pytorch_model") && n.ends_with(".safetensors"));
    let convert = "convert it to the original single-file layout first (diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py \
        and its SDXL/SD3/FLUX counterparts), or download the single-file release of the model";
    if has("model_index.json") {
        return recognised(path, "a diffusers pipeline folder (it has model_index.json)", format!("{SINGLE_FILE_ADVICE}; {convert}"));
    }
    if has("config.json") && diffusers_weights {
        return recognised(
            path,
            "a diffusers model folder (config.json and diffusion_pytorch_model*.safetensors)",
            format!("{SINGLE_FILE_ADVICE}; {convert}"),
        );
    }
    let single: Vec<&String> = names.iter().filter(|n| n.ends_with(".safetensors")).collect();
    let hint = match single.as_slice() {
        [one] => format!("; it holds {}: pass that file", crate::text::sanitize(one, 200)),
        _ => String::new(),
    };
    recognised(path, "a folder", format!("{SINGLE_FILE_ADVICE}{hint}"))
}

/// Names a file that is not safetensors from its first bytes, if it is a kind users meet.
fn sniff(path: &Path, head: &[u8]) -> Option<CheckpointError> {
    if head.starts_with(b"GGUF") {
        return Some(recognised(
            path,
            "a GGUF file (a model already quantized for llama.cpp / ComfyUI-GGUF)",
            format!("{SINGLE_FILE_ADVICE}: quantize the original bf16/fp16 .safetensors release instead"),
        ));
    }
    let pickle_advice = format!(
        "Pickle files can run code when loaded, so Quantsmith never opens them. {SINGLE_FILE_ADVICE}: download the .safetensors release \
         of the model, or convert this file to safetensors on a machine you trust"
    );
    if head.starts_with(b"PK\x03\x04") {
        return Some(recognised(path, "a PyTorch checkpoint (.ckpt/.pt/.pth: a zip holding a pickle)", pickle_advice));
    }
    if head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
        return Some(recognised(path, "a Python pickle (a legacy PyTorch .ckpt/.pt/.bin)", pickle_advice));
    }
    None
}

/// A key of a language model (transformers' names), if the tensors look like one.
fn language_model_key<'a>(keys: &[&'a str]) -> Option<&'a str> {
    keys.iter().copied().find(|k| {
        let parts: Vec<&str> = k.split('.').collect();
        let numbered_layer = parts.windows(3).any(|w| {
            matches!(w[0], "layers" | "h" | "layer")
                && w[1].parse::<u32>().is_ok()
                && matches!(w[2], "self_attn" | "attn" | "mlp" | "attention" | "feed_forward")
        });
        numbered_layer || k.ends_with("embed_tokens.weight") || *k == "lm_head.weight"
    })
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
        require_regular_file(path)?;
        let file = File::open(path).map_err(|error| CheckpointError::Open { path: path.to_path_buf(), error })?;
        // SAFETY: the map is read-only; a file truncated under us by another process
        // can fault, the same contract every safetensors reader accepts.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|error| CheckpointError::Open { path: path.to_path_buf(), error })?;
        let (header_len, meta) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| sniff(path, &mmap[..mmap.len().min(16)]).unwrap_or_else(|| corrupt(path, describe_error(&e))))?;
        let data_start = 8 + header_len;

        let mut raw: Vec<(String, Dtype, Vec<usize>, (usize, usize))> =
            meta.tensors().into_iter().map(|(k, info)| (k, info.dtype, info.shape.clone(), info.data_offsets)).collect();
        // File order; zero-size tensors share an offset, so the name breaks ties
        // (safetensors hands the header over as a HashMap, in random order).
        raw.sort_by(|a, b| a.3.cmp(&b.3).then_with(|| a.0.cmp(&b.0)));
        if let Some(t) = raw.iter().find(|t| t.0.len() > MAX_TENSOR_NAME) {
            return Err(corrupt(
                path,
                format!("a tensor name is {} bytes long (at most {MAX_TENSOR_NAME}): {}...", t.0.len(), crate::text::sanitize(&t.0, 80)),
            ));
        }

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
        let original =
            ["input_blocks.0.0.weight", "joint_blocks.0.context_block.attn.qkv.weight", "double_blocks.0.img_attn.norm.key_norm.scale"];
        let has_original = original.iter().any(|k| dm.contains(k));
        if !has_original {
            if let Some(key) = language_model_key(&dm) {
                return Err(recognised(
                    path,
                    format!("a language model or text encoder, not a diffusion model (found `{}`)", crate::text::sanitize(key, 200)),
                    "Quantsmith quantizes diffusion models (SD1.5, SDXL, SD3/3.5, FLUX.1); for language models use an LLM quantizer",
                ));
            }
            let diffusers_probe =
                ["conv_in.weight", "time_text_embed.timestep_embedder.linear_1.weight", "x_embedder.weight", "pos_embed.proj.weight"];
            if let Some(key) = diffusers_probe.iter().find(|k| dm.contains(k)).or_else(|| {
                ["down_blocks.0.", "transformer_blocks.0.", "single_transformer_blocks.0."]
                    .iter()
                    .find(|p| dm.iter().any(|k| k.starts_with(**p)))
            }) {
                return Err(CheckpointError::Diffusers { path: path.clone(), key: key.to_string() });
            }
        }
        if let Some(t) = self
            .tensors
            .iter()
            .find(|t| t.key.ends_with(".comfy_quant") || t.key.ends_with("scaled_fp8") || t.key.ends_with(".scale_weight"))
        {
            return Err(CheckpointError::AlreadyQuantized { path: path.clone(), key: t.key.clone() });
        }
        if self.metadata.contains_key("_quantization_metadata") {
            return Err(CheckpointError::AlreadyQuantized { path: path.clone(), key: "__metadata__._quantization_metadata".into() });
        }
        // Plain FP8 checkpoints: weights cast to fp8 with no scales.
        if let Some(t) = self
            .diffusion_tensors()
            .find(|t| t.key.ends_with(".weight") && t.shape.len() == 2 && matches!(t.dtype, Dtype::F8_E4M3 | Dtype::F8_E5M2))
        {
            return Err(CheckpointError::AlreadyQuantized { path: path.clone(), key: format!("{} stored as {:?}", t.key, t.dtype) });
        }
        if let Some(t) = self.diffusion_tensors().find(|t| t.key.ends_with(".weight") && t.elements() == 0) {
            return Err(corrupt(path, format!("weight {} is empty (shape {:?})", t.key, t.shape)));
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
        if self.prefix.is_empty() { self.get(name) } else { self.get(&format!("{}{name}", self.prefix)) }
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
