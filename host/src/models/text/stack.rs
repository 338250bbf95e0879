//! The text stack of a diffusion transformer from the files the user names
//! (`--text-encoder FILE`, repeatable): each file's encoders are detected
//! ([`super::detect`]), checked against the model's widths, and run on the
//! prompts into ComfyUI's conditioning ([`super::conditioning`]).
//!
//! Each prompt is encoded as ComfyUI encodes one prompt (`sd1_clip.py`'s
//! `ClipTokenWeightEncoder.encode_token_weights`, `sd3_clip.py`, `flux.py`):
//! - CLIP: the prompt's 75-token chunks, each its own 77-token sequence
//!   ([`ClipTokenizer::encode_chunked`], as for the UNets), encoded and joined
//!   along the tokens (`[1, 77 k, width]`); the pooled output is the *first*
//!   chunk's (`pooled[0:1]`). FLUX only takes CLIP-L's pooled output, so only the
//!   first chunk runs there.
//! - T5: one sequence, never cut (`max_length=99999999`), padded to at least
//!   `t5_min_tokens` ([`super::t5_tokenizer::SD3_MIN_TOKENS`],
//!   [`super::t5_tokenizer::FLUX_MIN_TOKENS`]) and no further; prompts of the same
//!   padded length run as one batch.
//!
//! A long SD3 prompt thus has `77 k` CLIP tokens then its T5 tokens. Several
//! prompts are batched as ComfyUI's `cond_cat` batches conditionings: each context
//! repeated along the tokens to the least common multiple of their lengths
//! ([`crate::models::clip::batch_contexts`]); contexts whose lengths do not batch
//! that way (ComfyUI then runs them apart) are refused.

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};

use crate::models::InputHooks;
use crate::models::clip::{self, HfClip, HfTower, MAX_PROMPT_CHUNKS};
use crate::models::text::conditioning::{self, ClipOutput, DitConditioning, TextWidths};
use crate::models::text::detect::{self, DetectedEncoder, EncoderKind};
use crate::models::text::file::EncoderFile;
use crate::models::text::t5::{T5Encoder, T5Tokens};
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

    /// The encoder widths a model takes whose text context is `context` wide and
    /// whose pooled vector is `pooled` wide (both read from its weights). FLUX's
    /// pooled vector is CLIP-L's; SD3's is CLIP-L's ‖ OpenCLIP-G's, at the real
    /// 2048 that is 768 ‖ 1280 ([`conditioning::SD3_WIDTHS`]); a narrower one (tiny
    /// test models) is split as the CLIP files given are wide.
    pub fn widths(&self, text: DitText, context: usize, pooled: usize) -> Result<TextWidths> {
        let width = |kind| self.get(kind).map(|(f, e)| (f.path().display().to_string(), e.width));
        let w = match text {
            DitText::Flux => TextWidths { clip_l: pooled, clip_g: 0, context, ..conditioning::FLUX_WIDTHS },
            DitText::Sd3 if pooled == conditioning::SD3_WIDTHS.clip_l + conditioning::SD3_WIDTHS.clip_g => {
                TextWidths { context, ..conditioning::SD3_WIDTHS }
            }
            DitText::Sd3 => {
                let (clip_l, clip_g) = match (width(EncoderKind::ClipL), width(EncoderKind::ClipG)) {
                    (Some((lf, l)), Some((gf, g))) => {
                        ensure!(
                            l + g == pooled,
                            "{lf} holds a CLIP-L {l} wide and {gf} an OpenCLIP-G {g} wide, but this model's pooled vector is {pooled} wide, not {}",
                            l + g
                        );
                        (l, g)
                    }
                    (Some((lf, l)), None) => {
                        ensure!(l <= pooled, "{lf} holds a CLIP-L {l} wide, wider than this model's pooled vector ({pooled})");
                        (l, pooled - l)
                    }
                    (None, Some((gf, g))) => {
                        ensure!(g <= pooled, "{gf} holds an OpenCLIP-G {g} wide, wider than this model's pooled vector ({pooled})");
                        (pooled - g, g)
                    }
                    // Both are zeros: any split of the pooled vector is the same.
                    (None, None) => (pooled, 0),
                };
                TextWidths { clip_l, clip_g, context, ..conditioning::SD3_WIDTHS }
            }
        };
        ensure!(
            w.clip_l + w.clip_g <= w.context || text == DitText::Flux,
            "this model's text context is {context} wide, narrower than its CLIP-L and OpenCLIP-G states together ({} + {})",
            w.clip_l,
            w.clip_g
        );
        Ok(w)
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
            ensure!(e.width == width, "{} holds a {} {} wide, but this model takes {width}", file.path().display(), e.kind.name(), e.width);
        }
        for &(kind, _) in wanted {
            if self.get(kind).is_none() {
                notes.push(format!(
                    "no {} given (--text-encoder): its part of the conditioning is zeros, as ComfyUI does without it",
                    kind.name()
                ));
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
        // Each prompt's CLIP output, its chunks joined (`first_only`: the first chunk alone).
        let clip = |kind: EncoderKind, tower: HfTower, padding: Padding, first_only: bool| -> Result<Option<Vec<ClipOutput<O::Tensor>>>> {
            let Some((file, e)) = self.get(kind) else { return Ok(None) };
            let tokenizer = clip_tokenizer
                .with_context(|| format!("{} holds a {}: its prompts need a CLIP tokenizer", file.path().display(), kind.name()))?;
            let model = HfClip::load(file, &e.prefix, tower).with_context(|| format!("cannot use {}", file.path().display()))?;
            ensure!(
                tokenizer.vocab_size() <= model.config().vocab,
                "the CLIP tokenizer has {} tokens but the {} in {} only {}",
                tokenizer.vocab_size(),
                kind.name(),
                file.path().display(),
                model.config().vocab
            );
            let (tokens, chunks) = if first_only {
                (tokenizer.encode(prompts, padding)?, vec![1; batch])
            } else {
                tokenizer.encode_chunked(prompts, padding, MAX_PROMPT_CHUNKS)?
            };
            let (hidden, pooled) = model.encode(ops, &tokens, hooks)?;
            join_chunks(ops, &hidden, &pooled, &chunks).map(Some)
        };
        // CLIP-L pads with its end token, OpenCLIP-G with 0 (ComfyUI's SD1 and SDXL-G tokenizers).
        let l = clip(EncoderKind::ClipL, HfTower::ClipL, Padding::EndToken, text == DitText::Flux)?;
        let g = match text {
            DitText::Sd3 => clip(EncoderKind::ClipG, HfTower::ClipG, Padding::Zero, false)?,
            DitText::Flux => None,
        };
        let t5 = match self.get(EncoderKind::T5) {
            Some((file, e)) => {
                let tokenizer = t5_tokenizer
                    .with_context(|| format!("{} holds a T5 encoder: its prompts need T5's tokenizer.json", file.path().display()))?;
                let model = T5Encoder::load(file, &e.prefix).with_context(|| format!("cannot use {}", file.path().display()))?;
                ensure!(
                    tokenizer.vocab_size() <= model.config().vocab,
                    "the T5 tokenizer has {} tokens but the encoder in {} only {}",
                    tokenizer.vocab_size(),
                    file.path().display(),
                    model.config().vocab
                );
                let rows: Vec<T5Tokens> = prompts.iter().map(|p| tokenizer.encode(&[p.as_ref()], t5_min_tokens)).collect::<Result<_>>()?;
                let mut lens: Vec<usize> = rows.iter().map(|r| r.len).collect();
                lens.sort_unstable();
                lens.dedup();
                let mut out: Vec<Option<O::Tensor>> = (0..batch).map(|_| None).collect();
                for len in lens {
                    let members: Vec<usize> = (0..batch).filter(|&i| rows[i].len == len).collect();
                    let tokens = T5Tokens { ids: members.iter().flat_map(|&i| rows[i].ids.iter().copied()).collect(), len };
                    let hidden = model.encode(ops, &tokens, hooks)?;
                    for (k, &i) in members.iter().enumerate() {
                        out[i] = Some(ops.narrow(&hidden, 0, k, 1)?);
                    }
                }
                Some(out.into_iter().map(|t| t.expect("every prompt has a length")).collect::<Vec<_>>())
            }
            None => None,
        };
        let mut contexts = Vec::with_capacity(batch);
        let mut pooled = Vec::with_capacity(batch);
        for i in 0..batch {
            let c = match text {
                DitText::Sd3 => {
                    conditioning::sd3(ops, 1, widths, l.as_ref().map(|v| &v[i]), g.as_ref().map(|v| &v[i]), t5.as_ref().map(|v| &v[i]))?
                }
                DitText::Flux => conditioning::flux(ops, 1, widths, l.as_ref().map(|v| &v[i].pooled), t5.as_ref().map(|v| &v[i]))?,
            };
            contexts.push(c.context);
            pooled.push(c.pooled);
        }
        let context =
            clip::batch_contexts(ops, &contexts.iter().collect::<Vec<_>>()).context("prompts of these lengths cannot be batched")?;
        let pooled = ops.concat(&pooled.iter().collect::<Vec<_>>(), 0)?;
        Ok(DitConditioning { context, pooled })
    }
}

/// Per prompt, its CLIP chunks (rows of `hidden [rows, 77, width]`, `chunks[i]`
/// consecutive rows for prompt `i`) side by side along the tokens, and the pooled
/// output of its first chunk (ComfyUI's `pooled[0:1]`).
fn join_chunks<O: Ops>(ops: &O, hidden: &O::Tensor, pooled: &O::Tensor, chunks: &[usize]) -> Result<Vec<ClipOutput<O::Tensor>>> {
    let s = ops.shape(hidden);
    ensure!(s.len() == 3 && chunks.iter().sum::<usize>() == s[0], "internal: CLIP states {s:?} for chunks {chunks:?}");
    let mut out = Vec::with_capacity(chunks.len());
    let mut start = 0;
    for &k in chunks {
        let h = ops.narrow(hidden, 0, start, k)?;
        let h = if k == 1 { h } else { ops.reshape(&h, &[1, k * s[1], s[2]])? };
        out.push(ClipOutput { hidden: h, pooled: ops.narrow(pooled, 0, start, 1)? });
        start += k;
    }
    Ok(out)
}

#[cfg(test)]
#[path = "stack_tests.rs"]
mod tests;
