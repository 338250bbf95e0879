//! The text stack of a diffusion transformer from the files the user names
//! (`--text-encoder FILE`, repeatable): each file's encoders are detected
//! ([`super::detect`]), checked against the model's widths, and run on the
//! prompts into ComfyUI's conditioning ([`super::conditioning`]).
//!
//! CLIP prompts are cut to 75 tokens (ComfyUI chunks longer ones and joins the
//! chunks along the tokens; the pooled outputs, from the first chunk, agree). T5
//! prompts are never cut and padded to at least `t5_min_tokens`
//! ([`super::t5_tokenizer::SD3_MIN_TOKENS`], [`super::t5_tokenizer::FLUX_MIN_TOKENS`]).

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};

use crate::models::InputHooks;
use crate::models::clip::{HfClip, HfTower};
use crate::models::text::conditioning::{self, ClipOutput, DitConditioning, TextWidths};
use crate::models::text::detect::{self, DetectedEncoder, EncoderKind};
use crate::models::text::file::EncoderFile;
use crate::models::text::t5::T5Encoder;
use crate::models::text::t5_tokenizer::T5Tokenizer;
use crate::models::tokenizer::{ClipTokenizer, Padding};
use crate::nn::Ops;

/// Which conditioning the text stack builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DitText {
    /// CLIP-L + OpenCLIP-G + T5-XXL.
    Sd3,
    /// CLIP-L (pooled) + T5-XXL.
    Flux,
}

/// The encoders found in the user's files.
pub struct TextFiles {
    files: Vec<EncoderFile>,
    /// (file index, encoder) per encoder found.
    found: Vec<(usize, DetectedEncoder)>,
}

impl TextFiles {
    /// Opens and detects every file; one encoder of each kind at most.
    pub fn open(paths: &[PathBuf]) -> Result<TextFiles> {
        let mut files = Vec::new();
        let mut found: Vec<(usize, DetectedEncoder)> = Vec::new();
        for path in paths {
            let (file, encoders) = detect::open(path)?;
            for e in encoders {
                if let Some((i, _)) = found.iter().find(|(_, f)| f.kind == e.kind) {
                    let first: &EncoderFile = &files[*i];
                    bail!("{} holds a second {} (the first is in {})", path.display(), e.kind.name(), first.path().display());
                }
                found.push((files.len(), e));
            }
            files.push(file);
        }
        Ok(TextFiles { files, found })
    }

    /// The encoder of `kind`, with its file.
    pub fn get(&self, kind: EncoderKind) -> Option<(&EncoderFile, &DetectedEncoder)> {
        self.found.iter().find(|(_, e)| e.kind == kind).map(|(i, e)| (&self.files[*i], e))
    }

    /// Refuses an encoder the model cannot take (naming its file), and says which
    /// ones are missing (each replaced by zeros of its shape).
    pub fn check(&self, text: DitText, widths: TextWidths) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        let wanted: &[(EncoderKind, usize)] = match text {
            DitText::Sd3 => &[(EncoderKind::ClipL, widths.clip_l), (EncoderKind::ClipG, widths.clip_g), (EncoderKind::T5, widths.context)],
            DitText::Flux => &[(EncoderKind::ClipL, widths.clip_l), (EncoderKind::T5, widths.context)],
        };
        for (file, e) in self.found.iter().map(|(i, e)| (&self.files[*i], e)) {
            let Some(&(_, width)) = wanted.iter().find(|(k, _)| *k == e.kind) else {
                bail!("{} holds an {}, which {text:?} does not take", file.path().display(), e.kind.name());
            };
            ensure!(
                e.width == width,
                "{} holds a {} {} wide, but this model takes {width}",
                file.path().display(),
                e.kind.name(),
                e.width
            );
        }
        for &(kind, _) in wanted {
            if self.get(kind).is_none() {
                notes.push(format!("no {} given (--text-encoder): its part of the conditioning is zeros, as ComfyUI does without it", kind.name()));
            }
        }
        Ok(notes)
    }

    /// The conditioning of `prompts` (one batch). Tokenizers are needed for the
    /// encoders present.
    #[allow(clippy::too_many_arguments)]
    pub fn encode<O: Ops, S: AsRef<str>>(
        &self,
        ops: &O,
        text: DitText,
        widths: TextWidths,
        clip_tokenizer: Option<&ClipTokenizer>,
        t5_tokenizer: Option<&T5Tokenizer>,
        t5_min_tokens: usize,
        prompts: &[S],
        hooks: &InputHooks,
    ) -> Result<DitConditioning<O::Tensor>> {
        self.check(text, widths)?;
        let batch = prompts.len();
        ensure!(batch > 0, "no prompts to encode");
        let clip = |kind: EncoderKind, tower: HfTower, padding: Padding| -> Result<Option<ClipOutput<O::Tensor>>> {
            let Some((file, e)) = self.get(kind) else { return Ok(None) };
            let tokenizer = clip_tokenizer.with_context(|| format!("{} holds a {}: its prompts need a CLIP tokenizer", file.path().display(), kind.name()))?;
            let model = HfClip::load(file, &e.prefix, tower).with_context(|| format!("cannot use {}", file.path().display()))?;
            ensure!(
                tokenizer.vocab_size() <= model.config().vocab,
                "the CLIP tokenizer has {} tokens but the {} in {} only {}",
                tokenizer.vocab_size(),
                kind.name(),
                file.path().display(),
                model.config().vocab
            );
            let tokens = tokenizer.encode(prompts, padding)?;
            let (hidden, pooled) = model.encode(ops, &tokens, hooks)?;
            Ok(Some(ClipOutput { hidden, pooled }))
        };
        // CLIP-L pads with its end token, OpenCLIP-G with 0 (ComfyUI's SD1 and SDXL-G tokenizers).
        let l = clip(EncoderKind::ClipL, HfTower::ClipL, Padding::EndToken)?;
        let g = match text {
            DitText::Sd3 => clip(EncoderKind::ClipG, HfTower::ClipG, Padding::Zero)?,
            DitText::Flux => None,
        };
        let t5 = match self.get(EncoderKind::T5) {
            Some((file, e)) => {
                let tokenizer = t5_tokenizer.with_context(|| format!("{} holds a T5 encoder: its prompts need T5's tokenizer.json", file.path().display()))?;
                let model = T5Encoder::load(file, &e.prefix).with_context(|| format!("cannot use {}", file.path().display()))?;
                ensure!(
                    tokenizer.vocab_size() <= model.config().vocab,
                    "the T5 tokenizer has {} tokens but the encoder in {} only {}",
                    tokenizer.vocab_size(),
                    file.path().display(),
                    model.config().vocab
                );
                let tokens = tokenizer.encode(prompts, t5_min_tokens)?;
                Some(model.encode(ops, &tokens, hooks)?)
            }
            None => None,
        };
        match text {
            DitText::Sd3 => conditioning::sd3(ops, batch, widths, l.as_ref(), g.as_ref(), t5.as_ref()),
            DitText::Flux => conditioning::flux(ops, batch, widths, l.as_ref().map(|c| &c.pooled), t5.as_ref()),
        }
    }
}

#[cfg(test)]
#[path = "stack_tests.rs"]
mod tests;
