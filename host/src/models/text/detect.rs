//! What kind of text encoder a safetensors file holds, from its keys and shapes.
//!
//! | kind | keys (standalone file / SD3 single-file prefix) | real size |
//! |---|---|---|
//! | CLIP-L | `text_model.*` (HF `CLIPTextModel`) / `text_encoders.clip_l.transformer.text_model.*` | 768 wide, 12 layers |
//! | OpenCLIP-G | `text_model.*` + `text_projection.weight` (HF `CLIPTextModelWithProjection`) / `text_encoders.clip_g.transformer.` | 1280 wide, 32 layers |
//! | T5 encoder | `encoder.block.N.*`, `shared.weight` / `text_encoders.t5xxl.transformer.` | T5-XXL: 4096 wide, 24 blocks |
//!
//! ComfyUI tells its standalone CLIP files apart by depth (`sd3_clip.py`'s
//! `load_sd`: layer 30 means G, layer 1 means L); here real-size towers must be
//! 768 / 12 (CLIP-L) or 1280 / 32 (OpenCLIP-G), any other width from 512 up is
//! refused. Towers narrower than 512 are the tiny synthetic encoders of tests and
//! `synth`: the SD3 prefix names their kind, and a standalone one is OpenCLIP-G
//! when it has `text_projection.weight`, CLIP-L otherwise.

use anyhow::{Context, Result, bail};

use crate::models::WeightSource;
use crate::models::text::file::EncoderFile;
use crate::models::text::t5::{SD3_T5_PREFIX, T5Config};

pub const SD3_CLIP_L_PREFIX: &str = "text_encoders.clip_l.transformer.text_model.";
pub const SD3_CLIP_G_PREFIX: &str = "text_encoders.clip_g.transformer.text_model.";
pub const STANDALONE_CLIP_PREFIX: &str = "text_model.";

/// Real widths and depths.
pub const CLIP_L_WIDTH: usize = 768;
pub const CLIP_L_LAYERS: usize = 12;
pub const CLIP_G_WIDTH: usize = 1280;
pub const CLIP_G_LAYERS: usize = 32;
/// Narrower towers are synthetic test encoders.
const REAL_CLIP_MIN_WIDTH: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncoderKind {
    ClipL,
    ClipG,
    T5,
}

impl EncoderKind {
    pub fn name(self) -> &'static str {
        match self {
            EncoderKind::ClipL => "CLIP-L",
            EncoderKind::ClipG => "OpenCLIP-G",
            EncoderKind::T5 => "T5 encoder",
        }
    }
}

/// One text encoder found in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetectedEncoder {
    pub kind: EncoderKind,
    /// Key prefix to load it with: ends in `text_model.` for CLIP
    /// ([`crate::models::clip::HfClip::load`]), the parent of `encoder.` for T5
    /// ([`crate::models::text::t5::T5Encoder::load`]).
    pub prefix: String,
    pub width: usize,
    pub layers: usize,
    /// Some weights are FP8 (dequantized on load).
    pub fp8: bool,
}

/// Every text encoder in `file`; an error naming the file when there is none or
/// one is of a kind or size this tool cannot run.
pub fn detect(file: &EncoderFile) -> Result<Vec<DetectedEncoder>> {
    let path = file.path().display().to_string();
    let mut found = Vec::new();
    for prefix in ["", SD3_T5_PREFIX] {
        if file.contains(&format!("{prefix}encoder.block.0.layer.0.SelfAttention.q.weight")) {
            let cfg = T5Config::read(file, prefix).with_context(|| format!("{path}: a T5 encoder this tool cannot run"))?;
            found.push(DetectedEncoder {
                kind: EncoderKind::T5,
                prefix: prefix.into(),
                width: cfg.d_model,
                layers: cfg.layers,
                fp8: file.has_fp8(),
            });
        }
    }
    for (prefix, named) in
        [(STANDALONE_CLIP_PREFIX, None), (SD3_CLIP_L_PREFIX, Some(EncoderKind::ClipL)), (SD3_CLIP_G_PREFIX, Some(EncoderKind::ClipG))]
    {
        let probe = format!("{prefix}embeddings.token_embedding.weight");
        if !file.contains(&probe) {
            continue;
        }
        let shape = file.shape(&probe).unwrap_or_default().to_vec();
        let [_, width] = shape[..] else { bail!("{path}: `{probe}` has shape {shape:?}, expected [vocab, width]") };
        let layers = (0..).take_while(|i| file.contains(&format!("{prefix}encoder.layers.{i}.mlp.fc1.weight"))).count();
        let outer = prefix.strip_suffix(STANDALONE_CLIP_PREFIX).unwrap_or("");
        let projected = file.contains(&format!("{outer}text_projection.weight"));
        let kind = clip_kind(width, layers, named, projected)
            .with_context(|| format!("{path} holds a CLIP text encoder under `{prefix}*` that this tool cannot use"))?;
        found.push(DetectedEncoder { kind, prefix: prefix.into(), width, layers, fp8: file.has_fp8() });
    }
    if !found.is_empty() {
        return Ok(found);
    }
    let keys = file.keys();
    if keys.iter().any(|k| k.starts_with("token_embedding.") || k.starts_with("transformer.resblocks.")) {
        bail!(
            "{path} holds a text encoder in OpenCLIP layout; use ComfyUI's Hugging Face-layout file (`clip_g.safetensors`, keys `text_model.*`)"
        );
    }
    let diffusion = ["model.diffusion_model.", "double_blocks.", "joint_blocks.", "input_blocks."];
    if keys.iter().any(|k| diffusion.iter().any(|d| k.starts_with(d))) {
        bail!("{path} is a diffusion model, not a text encoder: expected CLIP-L, OpenCLIP-G or T5-XXL weights");
    }
    let sample: Vec<&str> = keys.iter().take(4).copied().collect();
    bail!(
        "{path} holds no text encoder this tool can run (CLIP-L or OpenCLIP-G with keys `text_model.*`, T5 with keys \
         `encoder.block.N.*`, or either under `text_encoders.*.transformer.`); its {} keys start with {sample:?}",
        keys.len()
    )
}

fn clip_kind(width: usize, layers: usize, named: Option<EncoderKind>, projected: bool) -> Result<EncoderKind> {
    let real = |kind: EncoderKind| match kind {
        EncoderKind::ClipL => (CLIP_L_WIDTH, CLIP_L_LAYERS),
        _ => (CLIP_G_WIDTH, CLIP_G_LAYERS),
    };
    let kind = match (named, width) {
        (Some(k), _) => k,
        (None, CLIP_L_WIDTH) => EncoderKind::ClipL,
        (None, CLIP_G_WIDTH) => EncoderKind::ClipG,
        (None, w) if w < REAL_CLIP_MIN_WIDTH => {
            if projected {
                EncoderKind::ClipG
            } else {
                EncoderKind::ClipL
            }
        }
        (None, w) => bail!(
            "it is {w} wide with {layers} layers: neither CLIP-L ({CLIP_L_WIDTH} wide, {CLIP_L_LAYERS} layers) nor OpenCLIP-G ({CLIP_G_WIDTH}, {CLIP_G_LAYERS})"
        ),
    };
    let (w, l) = real(kind);
    if width >= REAL_CLIP_MIN_WIDTH && (width, layers) != (w, l) {
        bail!("it is {width} wide with {layers} layers, but {} is {w} wide with {l} layers", kind.name());
    }
    if layers == 0 {
        bail!("it has no transformer layers");
    }
    Ok(kind)
}

/// Opens `path` and detects its encoders (the error names the file).
pub fn open(path: &std::path::Path) -> Result<(EncoderFile, Vec<DetectedEncoder>)> {
    let file = EncoderFile::open(path)?;
    let found = detect(&file)?;
    Ok((file, found))
}

#[cfg(test)]
#[path = "detect_tests.rs"]
pub(crate) mod tests;
