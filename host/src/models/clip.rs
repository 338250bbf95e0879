//! CLIP text encoders as SD1.x, SD2.x and SDXL single-file checkpoints store them, and
//! the conditioning a UNet takes from them (ComfyUI's semantics).
//!
//! | checkpoint | encoders (key prefix) | context | pooled / `y` |
//! |---|---|---|---|
//! | SD1.x | CLIP-L, HF layout (`cond_stage_model.transformer.text_model.`) | last layer + `final_layer_norm`, `[B,77,768]` | – |
//! | SDXL base | CLIP-L, HF layout (`conditioner.embedders.0.transformer.text_model.`) + OpenCLIP bigG (`conditioner.embedders.1.model.`) | both penultimate layers, no final norm, concatenated: `[B,77,768+1280]` | bigG `ln_final(last)[eos] @ text_projection` + size embeddings: 2816 |
//! | SDXL refiner | OpenCLIP bigG (`conditioner.embedders.0.model.`) | its penultimate layer, `[B,77,1280]` | pooled + size and aesthetic-score embeddings: 2560 |
//! | SD2.x | OpenCLIP-H (`cond_stage_model.model.`) | its penultimate layer through `ln_final`, `[B,77,1024]` | – |
//!
//! [`HfClip`] runs one tower from a standalone Hugging Face-layout file (ComfyUI's
//! `clip_l.safetensors`, `clip_g.safetensors`; SD3's `text_encoders.clip_{l,g}.transformer.`):
//! penultimate hidden states and the pooled output (final-normed end token, through
//! `text_projection.weight` for OpenCLIP-G), as SD3 and FLUX take them
//! ([`crate::models::text::conditioning`]).
//!
//! "Penultimate" is the input of the last layer (Hugging Face's `hidden_states[-2]`),
//! so a one-layer test model gives its embeddings. Both towers are pre-norm
//! transformers with causal attention, LayerNorm eps 1e-5, heads of 64 channels;
//! CLIP-L uses quick-GELU, bigG exact GELU. bigG packs q, k, v in one `in_proj`
//! and stores `text_projection` as `[in, out]`, applied as `x @ P`.
//! Token ids come from [`crate::models::tokenizer`]: CLIP-L pads with the end
//! token, bigG with 0, and the pooled output is read at the first end token.
//!
//! Weights are read layer by layer while the batch goes through (a layer's
//! weights are dropped before the next one loads), so encode every prompt in one
//! call rather than many small ones. Every Linear input passes through
//! [`InputHooks::apply`] under its full key without `.weight`; bigG's packed
//! projection is `<prefix>transformer.resblocks.N.attn.in_proj` (one input for
//! q, k and v) and its pooled projection `<prefix>text_projection`.

use anyhow::{Context, Result, bail, ensure};

use crate::formats::{WeightView, decode_source};
use crate::models::tokenizer::{CONTEXT_LENGTH, ClipTokenizer, Padding, TokenBatch};
use crate::models::{InputHooks, WeightSource};
use crate::nn::{Act, Ops};

pub const SD15_CLIP_L: &str = "cond_stage_model.transformer.text_model.";
pub const SDXL_CLIP_L: &str = "conditioner.embedders.0.transformer.text_model.";
pub const SDXL_CLIP_G: &str = "conditioner.embedders.1.model.";
pub const SDXL_REFINER_CLIP_G: &str = "conditioner.embedders.0.model.";
pub const SD2_CLIP_H: &str = "cond_stage_model.model.";

/// Longest token sequence batched conditionings are repeated to (ComfyUI's `cond_cat`
/// repeats shorter contexts to the least common multiple of the lengths).
pub const MAX_BATCHED_TOKENS: usize = MAX_PROMPT_CHUNKS * CONTEXT_LENGTH;

/// ComfyUI's long-prompt conditioning from per-chunk encodings `[rows, 77, C]`:
/// each prompt's chunks side by side along the tokens (`[1, 77 k, C]`), the pooled
/// output of its first chunk, and the prompts batched by repeating each context
/// to the least common multiple of their lengths.
fn join_chunks<O: Ops>(ops: &O, context: &O::Tensor, pooled: Option<&O::Tensor>, chunks: &[usize]) -> Result<Conditioning<O::Tensor>> {
    let shape = ops.shape(context);
    let (rows, width) = (shape[0], shape[2]);
    ensure!(chunks.iter().sum::<usize>() == rows, "internal: {rows} encoded rows for chunks {chunks:?}");
    let values = ops.to_f32(context)?;
    let row = CONTEXT_LENGTH * width;
    // Rows of one prompt are consecutive, so its chunks side by side are one [1, 77 k, C] reshape.
    let mut prompts = Vec::with_capacity(chunks.len());
    let mut first_rows = Vec::with_capacity(chunks.len());
    let mut start = 0;
    for &c in chunks {
        prompts.push(ops.from_f32(&[1, c * CONTEXT_LENGTH, width], &values[start * row..(start + c) * row])?);
        first_rows.push(start);
        start += c;
    }
    let context = batch_contexts(ops, &prompts.iter().collect::<Vec<_>>())?;
    let pooled = match pooled {
        Some(p) => {
            let pw = ops.shape(p)[1];
            let v = ops.to_f32(p)?;
            let first: Vec<f32> = first_rows.iter().flat_map(|&r| v[r * pw..(r + 1) * pw].iter().copied()).collect();
            Some(ops.from_f32(&[chunks.len(), pw], &first)?)
        }
        None => None,
    };
    Ok(Conditioning { context, pooled })
}

/// The token count contexts of `lengths` tokens batch at: their least common
/// multiple, each repeated to it (ComfyUI's `cond_cat`).
pub fn batched_tokens(lengths: &[usize]) -> Result<usize> {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let mut l = 1usize;
    for &n in lengths {
        ensure!(n > 0, "a conditioning has no tokens");
        l = l / gcd(l, n) * n;
        ensure!(
            l <= MAX_BATCHED_TOKENS,
            "contexts of {lengths:?} tokens cannot be batched: their least common multiple exceeds {MAX_BATCHED_TOKENS} tokens"
        );
    }
    Ok(l)
}

/// Contexts `[B_i, n_i, C]` one batch after the other, each repeated along the
/// tokens to the least common multiple of the `n_i` (ComfyUI's `cond_cat`).
pub fn batch_contexts<O: Ops>(ops: &O, parts: &[&O::Tensor]) -> Result<O::Tensor> {
    let lengths: Vec<usize> = parts.iter().map(|t| ops.shape(t)[1]).collect();
    let tokens = batched_tokens(&lengths)?;
    let repeated: Vec<O::Tensor> = parts.iter().map(|t| repeat_tokens(ops, t, tokens)).collect::<Result<_>>()?;
    ops.concat(&repeated.iter().collect::<Vec<_>>(), 0)
}

/// `[B, n, C]` repeated along the tokens to `[B, tokens, C]` (`tokens` a multiple of `n`).
fn repeat_tokens<O: Ops>(ops: &O, t: &O::Tensor, tokens: usize) -> Result<O::Tensor> {
    let n = ops.shape(t)[1];
    ensure!(tokens % n == 0, "internal: {tokens} tokens is not a multiple of {n}");
    if tokens == n {
        return Ok(t.clone());
    }
    let parts: Vec<&O::Tensor> = std::iter::repeat_n(t, tokens / n).collect();
    ops.concat(&parts, 1)
}

/// Width of each size / aesthetic-score embedding in SDXL's `y`.
pub const SIZE_EMBEDDING_WIDTH: usize = 256;
/// The refiner's aesthetic score for positive and negative prompts (ComfyUI's defaults).
pub const AESTHETIC_POSITIVE: f32 = 6.0;
pub const AESTHETIC_NEGATIVE: f32 = 2.5;

const HEAD_WIDTH: usize = 64;
const LAYER_NORM_EPS: f32 = 1e-5;

/// Which text conditioning a checkpoint's encoders produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextFamily {
    Sd15,
    /// OpenCLIP-H (ViT-H-14's text tower, same layout as bigG).
    Sd2,
    Sdxl,
    SdxlRefiner,
}

impl TextFamily {
    /// The family whose text encoders `src` holds, if any. SD2 checkpoints in
    /// sgm layout would keep OpenCLIP-H under the refiner's prefix; where the UNet
    /// has been detected, pass its family to [`TextEncoders::load`] instead.
    pub fn detect(src: &dyn WeightSource) -> Option<TextFamily> {
        let has = |prefix: &str, layout: Layout| src.contains(&layout.probe(prefix));
        if has(SDXL_CLIP_L, Layout::Hf) && has(SDXL_CLIP_G, Layout::OpenClip) {
            Some(TextFamily::Sdxl)
        } else if has(SDXL_REFINER_CLIP_G, Layout::OpenClip) {
            Some(TextFamily::SdxlRefiner)
        } else if has(SD15_CLIP_L, Layout::Hf) {
            Some(TextFamily::Sd15)
        } else if has(SD2_CLIP_H, Layout::OpenClip) {
            Some(TextFamily::Sd2)
        } else {
            None
        }
    }

    /// (CLIP-L, bigG) prefixes.
    fn prefixes(self) -> (Option<&'static str>, Option<&'static str>) {
        match self {
            TextFamily::Sd15 => (Some(SD15_CLIP_L), None),
            TextFamily::Sd2 => (None, Some(SD2_CLIP_H)),
            TextFamily::Sdxl => (Some(SDXL_CLIP_L), Some(SDXL_CLIP_G)),
            TextFamily::SdxlRefiner => (None, Some(SDXL_REFINER_CLIP_G)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// Hugging Face `CLIPTextModel` names (CLIP-L).
    Hf,
    /// OpenCLIP names (bigG).
    OpenClip,
}

impl Layout {
    fn probe(self, prefix: &str) -> String {
        match self {
            Layout::Hf => format!("{prefix}embeddings.token_embedding.weight"),
            Layout::OpenClip => format!("{prefix}token_embedding.weight"),
        }
    }
    fn position_key(self, prefix: &str) -> String {
        match self {
            Layout::Hf => format!("{prefix}embeddings.position_embedding.weight"),
            Layout::OpenClip => format!("{prefix}positional_embedding"),
        }
    }
    fn layer_prefix(self, prefix: &str, i: usize) -> String {
        match self {
            Layout::Hf => format!("{prefix}encoder.layers.{i}."),
            Layout::OpenClip => format!("{prefix}transformer.resblocks.{i}."),
        }
    }
    fn mlp_in(self) -> &'static str {
        match self {
            Layout::Hf => "mlp.fc1",
            Layout::OpenClip => "mlp.c_fc",
        }
    }
}

/// One text encoder's dimensions, read from its weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncoderConfig {
    /// Key prefix, e.g. `conditioner.embedders.1.model.`.
    pub prefix: String,
    pub width: usize,
    /// `width / 64`, at least 1.
    pub heads: usize,
    pub layers: usize,
    pub mlp_width: usize,
    pub vocab: usize,
    /// Width of the pooled projection (bigG; an HF-layout OpenCLIP-G's `text_projection.weight`).
    pub projection: Option<usize>,
    /// The MLP's activation: quick-GELU for OpenAI's CLIP-L, exact GELU for OpenCLIP towers.
    pub act: Act,
}

struct Encoder {
    cfg: EncoderConfig,
    layout: Layout,
}

/// Which hidden states a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wanted {
    /// Last layer through the final norm (SD1.x).
    FinalNorm,
    /// Input of the last layer, without norm (SDXL CLIP-L).
    Penultimate,
    /// Both the penultimate states and the projected pooled output (bigG).
    PenultimateAndPooled,
    /// The input of the last layer through the final norm (SD2's OpenCLIP-H,
    /// as its `FrozenOpenCLIPEmbedder` and ComfyUI's `SD2ClipHModel` do).
    PenultimateFinalNorm,
}

/// Token ids for each encoder a checkpoint holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptTokens {
    /// End-token padded.
    pub clip_l: Option<TokenBatch>,
    /// Zero padded.
    pub clip_g: Option<TokenBatch>,
    /// 77-token rows of each prompt, in order; empty: one row per prompt.
    pub chunks: Vec<usize>,
}

/// Chunks of 75 tokens a prompt may have (1125 tokens).
pub const MAX_PROMPT_CHUNKS: usize = 15;

/// What the UNet is conditioned on.
#[derive(Clone, Debug)]
pub struct Conditioning<T> {
    /// Cross-attention context `[B, 77, C]`.
    pub context: T,
    /// bigG's projected pooled output `[B, P]` (SDXL base and refiner).
    pub pooled: Option<T>,
}

/// The text encoders of one checkpoint.
pub struct TextEncoders<'s> {
    src: &'s dyn WeightSource,
    family: TextFamily,
    clip_l: Option<Encoder>,
    clip_g: Option<Encoder>,
}

impl<'s> TextEncoders<'s> {
    /// Reads the dimensions of `family`'s encoders from `src` (weights load at encode time).
    pub fn load(src: &'s dyn WeightSource, family: TextFamily) -> Result<TextEncoders<'s>> {
        let (l, g) = family.prefixes();
        let read = |prefix: &str, layout| {
            read_config(src, prefix, layout)
                .with_context(|| format!("cannot use the {family:?} text encoder `{prefix}*`"))
        };
        let clip_l = l
            .map(|p| {
                read(p, Layout::Hf).map(|cfg| Encoder {
                    cfg,
                    layout: Layout::Hf,
                })
            })
            .transpose()?;
        let clip_g = g
            .map(|p| {
                read(p, Layout::OpenClip).map(|cfg| Encoder {
                    cfg,
                    layout: Layout::OpenClip,
                })
            })
            .transpose()?;
        Ok(TextEncoders {
            src,
            family,
            clip_l,
            clip_g,
        })
    }

    /// [`TextEncoders::load`] with the family [`TextFamily::detect`] finds.
    pub fn detect(src: &'s dyn WeightSource) -> Result<TextEncoders<'s>> {
        match TextFamily::detect(src) {
            Some(family) => TextEncoders::load(src, family),
            None => bail!(
                "the checkpoint holds no text encoder this tool can run: expected CLIP-L under `{SD15_CLIP_L}` (SD1.x), \
                 CLIP-L under `{SDXL_CLIP_L}` with OpenCLIP bigG under `{SDXL_CLIP_G}` (SDXL), or bigG under \
                 `{SDXL_REFINER_CLIP_G}` (SDXL refiner), or OpenCLIP-H under `{SD2_CLIP_H}` (SD2.x); a diffusion-model-only \
                 file needs its full checkpoint for prompts"
            ),
        }
    }

    pub fn family(&self) -> TextFamily {
        self.family
    }

    pub fn clip_l(&self) -> Option<&EncoderConfig> {
        self.clip_l.as_ref().map(|e| &e.cfg)
    }

    pub fn clip_g(&self) -> Option<&EncoderConfig> {
        self.clip_g.as_ref().map(|e| &e.cfg)
    }

    /// Channels of [`Conditioning::context`] (768 SD1.x, 2048 SDXL, 1280 refiner).
    pub fn context_width(&self) -> usize {
        self.clip_l().map_or(0, |c| c.width) + self.clip_g().map_or(0, |c| c.width)
    }

    /// Token ids for every encoder, padded as each expects.
    pub fn tokenize<S: AsRef<str>>(
        &self,
        tokenizer: &ClipTokenizer,
        prompts: &[S],
    ) -> Result<PromptTokens> {
        let for_encoder = |encoder: &Option<Encoder>, padding| -> Result<Option<(TokenBatch, Vec<usize>)>> {
            let Some(e) = encoder else { return Ok(None) };
            ensure!(
                tokenizer.vocab_size() <= e.cfg.vocab,
                "the tokenizer has {} tokens but the text encoder `{}*` only {}: the vocabulary does not belong to this checkpoint",
                tokenizer.vocab_size(),
                e.cfg.prefix,
                e.cfg.vocab
            );
            tokenizer.encode_chunked(prompts, padding, MAX_PROMPT_CHUNKS).map(Some)
        };
        let (l, g) = (for_encoder(&self.clip_l, Padding::EndToken)?, for_encoder(&self.clip_g, Padding::Zero)?);
        let chunks = l.as_ref().or(g.as_ref()).map(|(_, c)| c.clone()).unwrap_or_default();
        Ok(PromptTokens { clip_l: l.map(|(b, _)| b), clip_g: g.map(|(b, _)| b), chunks })
    }

    /// Tokenizes and encodes `prompts` (one batch).
    pub fn encode<O: Ops, S: AsRef<str>>(
        &self,
        ops: &O,
        tokenizer: &ClipTokenizer,
        prompts: &[S],
        hooks: &InputHooks,
    ) -> Result<Conditioning<O::Tensor>> {
        let tokens = self.tokenize(tokenizer, prompts)?;
        self.encode_tokens(ops, &tokens, hooks)
    }

    /// Encodes token ids made by [`TextEncoders::tokenize`] (or by hand).
    pub fn encode_tokens<O: Ops>(
        &self,
        ops: &O,
        tokens: &PromptTokens,
        hooks: &InputHooks,
    ) -> Result<Conditioning<O::Tensor>> {
        let batch_of =
            |e: &Option<Encoder>, t: &Option<TokenBatch>, name: &str| -> Result<Option<usize>> {
                match (e, t) {
                    (Some(_), Some(t)) => Ok(Some(t.batch())),
                    (Some(e), None) => {
                        bail!("no {name} tokens for the text encoder `{}*`", e.cfg.prefix)
                    }
                    (None, _) => Ok(None),
                }
            };
        let (bl, bg) = (
            batch_of(&self.clip_l, &tokens.clip_l, "CLIP-L")?,
            batch_of(&self.clip_g, &tokens.clip_g, "bigG")?,
        );
        if let (Some(bl), Some(bg)) = (bl, bg) {
            ensure!(bl == bg, "CLIP-L has {bl} prompts but bigG {bg}");
        }
        let mut context = Vec::with_capacity(2);
        let mut pooled = None;
        if let (Some(e), Some(t)) = (&self.clip_l, &tokens.clip_l) {
            let wanted = if self.family == TextFamily::Sd15 {
                Wanted::FinalNorm
            } else {
                Wanted::Penultimate
            };
            context.push(self.forward(ops, e, t, wanted, hooks)?.0);
        }
        if let (Some(e), Some(t)) = (&self.clip_g, &tokens.clip_g) {
            let wanted = if self.family == TextFamily::Sd2 {
                Wanted::PenultimateFinalNorm
            } else {
                Wanted::PenultimateAndPooled
            };
            let (hidden, p) = self.forward(ops, e, t, wanted, hooks)?;
            context.push(hidden);
            pooled = p;
        }
        let context = match context.as_slice() {
            [one] => one.clone(),
            [l, g] => ops.concat(&[l, g], 2)?,
            _ => bail!("internal: {:?} has no text encoder", self.family),
        };
        if tokens.chunks.iter().all(|&c| c == 1) {
            return Ok(Conditioning { context, pooled });
        }
        join_chunks(ops, &context, pooled.as_ref(), &tokens.chunks)
    }

    /// The UNet's `y` for this family: `None` for SD1.x, [`sdxl_adm`] for SDXL base,
    /// [`sdxl_refiner_adm`] for the refiner (aesthetic score by `negative`).
    pub fn adm<O: Ops>(
        &self,
        ops: &O,
        cond: &Conditioning<O::Tensor>,
        size: &SizeConditioning,
        negative: bool,
    ) -> Result<Option<O::Tensor>> {
        let pooled = || {
            cond.pooled
                .as_ref()
                .context("the conditioning has no pooled output")
        };
        match self.family {
            TextFamily::Sd15 | TextFamily::Sd2 => Ok(None),
            TextFamily::Sdxl => sdxl_adm(ops, pooled()?, size).map(Some),
            TextFamily::SdxlRefiner => {
                let score = if negative {
                    AESTHETIC_NEGATIVE
                } else {
                    AESTHETIC_POSITIVE
                };
                sdxl_refiner_adm(ops, pooled()?, size, score).map(Some)
            }
        }
    }

    /// (context hidden states, pooled output).
    fn forward<O: Ops>(
        &self,
        ops: &O,
        encoder: &Encoder,
        tokens: &TokenBatch,
        wanted: Wanted,
        hooks: &InputHooks,
    ) -> Result<(O::Tensor, Option<O::Tensor>)> {
        run(ops, self.src, encoder, tokens, wanted, hooks)
    }
}

/// (context hidden states, pooled output) of one encoder.
fn run<O: Ops>(
    ops: &O,
    src: &dyn WeightSource,
    encoder: &Encoder,
    tokens: &TokenBatch,
    wanted: Wanted,
    hooks: &InputHooks,
) -> Result<(O::Tensor, Option<O::Tensor>)> {
    let (cfg, layout) = (&encoder.cfg, encoder.layout);
    let p = cfg.prefix.as_str();
    let (b, d) = (tokens.batch(), cfg.width);
    ensure!(b > 0, "no prompts to encode");
    ensure!(
        tokens.ids.len() == b * CONTEXT_LENGTH,
        "token batch has {} ids for {b} prompts",
        tokens.ids.len()
    );
    if let Some(&id) = tokens.ids.iter().find(|&&id| id as usize >= cfg.vocab) {
        bail!(
            "token id {id} is outside the vocabulary ({} tokens) of the text encoder `{p}*`",
            cfg.vocab
        );
    }
    if let Some(&i) = tokens.end_index.iter().find(|&&i| i >= CONTEXT_LENGTH) {
        bail!("end-token position {i} is outside the {CONTEXT_LENGTH}-token sequence");
    }

    let mut x = {
        let table = load(ops, src, &layout.probe(p), &[cfg.vocab, d])?;
        let tokens_emb = ops.embedding(&table, &tokens.ids)?;
        let (pos_shape, _) = src.tensor(&layout.position_key(p))?;
        let positions = load(ops, src, &layout.position_key(p), &pos_shape)?;
        let pos_ids: Vec<u32> = (0..b).flat_map(|_| 0..CONTEXT_LENGTH as u32).collect();
        let pos_emb = ops.embedding(&positions, &pos_ids)?;
        ops.reshape(&ops.add(&tokens_emb, &pos_emb)?, &[b, CONTEXT_LENGTH, d])?
    };

    // Penultimate-only encoders never need their last layer.
    let run = if matches!(wanted, Wanted::Penultimate | Wanted::PenultimateFinalNorm) {
        cfg.layers - 1
    } else {
        cfg.layers
    };
    let mut penultimate = (cfg.layers == 1).then(|| x.clone());
    for i in 0..run {
        let l = layout.layer_prefix(p, i);
        x = match layout {
            Layout::Hf => hf_layer(ops, src, hooks, &l, cfg, &x)?,
            Layout::OpenClip => open_clip_layer(ops, src, hooks, &l, cfg, &x)?,
        };
        if i + 2 == cfg.layers {
            penultimate = Some(x.clone());
        }
    }
    let penultimate = || {
        penultimate
            .clone()
            .context("internal: penultimate hidden state not kept")
    };
    match (wanted, layout) {
        (Wanted::FinalNorm, Layout::Hf) => Ok((
            layer_norm(ops, src, &format!("{p}final_layer_norm"), d, &x)?,
            None,
        )),
        (Wanted::Penultimate, _) => Ok((penultimate()?, None)),
        (Wanted::PenultimateFinalNorm, Layout::OpenClip) => Ok((
            layer_norm(ops, src, &format!("{p}ln_final"), d, &penultimate()?)?,
            None,
        )),
        (Wanted::PenultimateAndPooled, Layout::OpenClip) => {
            // LayerNorm is per token, so selecting the end tokens first is the same and cheaper.
            let last = ops.select_tokens(&x, &tokens.end_index)?;
            let last = layer_norm(ops, src, &format!("{p}ln_final"), d, &last)?;
            let module = format!("{p}text_projection");
            let (shape, view) = src.tensor(&module)?;
            let out = cfg
                .projection
                .context("internal: bigG without projection")?;
            ensure!(
                shape == [d, out],
                "`{module}` has shape {shape:?}, expected [{d}, {out}]"
            );
            let stored =
                decode_source(&view).with_context(|| format!("cannot read `{module}`"))?;
            // Stored as [in, out] for `x @ P`; a Linear weight is [out, in].
            let stored = &stored;
            let transposed: Vec<f32> = (0..out)
                .flat_map(|o| (0..d).map(move |i| stored[i * out + o]))
                .collect();
            let w = ops.from_f32(&[out, d], &transposed)?;
            let last = hooks.apply(ops, &module, &last)?;
            Ok((penultimate()?, Some(ops.linear(&last, &w, None)?)))
        }
        (Wanted::PenultimateAndPooled, Layout::Hf) => {
            // Hugging Face's pooler output: the final-normed end token, then
            // `text_projection` (a Linear) where the tower has one.
            let last = ops.select_tokens(&x, &tokens.end_index)?;
            let last = layer_norm(ops, src, &format!("{p}final_layer_norm"), d, &last)?;
            let pooled = match cfg.projection {
                None => last,
                Some(out) => {
                    let module = hf_projection(p);
                    let w = load(ops, src, &format!("{module}.weight"), &[out, d])?;
                    let last = hooks.apply(ops, &module, &last)?;
                    ops.linear(&last, &w, None)?
                }
            };
            Ok((penultimate()?, Some(pooled)))
        }
        _ => bail!("internal: {wanted:?} does not fit the {layout:?} layout"),
    }
}

/// The pooled projection of an HF-layout tower under `prefix` (`...text_model.`):
/// `text_projection` sits beside `text_model`, as in `CLIPTextModelWithProjection`.
fn hf_projection(prefix: &str) -> String {
    format!("{}text_projection", prefix.strip_suffix("text_model.").unwrap_or(prefix))
}

/// Which tower a standalone Hugging Face-layout file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfTower {
    /// OpenAI CLIP-L: quick-GELU; its pooled output is not projected (ComfyUI's
    /// SD3 and FLUX take `return_projected_pooled=False`).
    ClipL,
    /// OpenCLIP bigG: exact GELU; pooled output through `text_projection.weight`.
    ClipG,
}

/// One CLIP tower in Hugging Face layout (`<prefix>text_model.*`), as ComfyUI's
/// standalone `clip_l.safetensors` / `clip_g.safetensors` and SD3 single-file
/// checkpoints (`text_encoders.clip_{l,g}.transformer.`) store it.
pub struct HfClip<'s> {
    src: &'s dyn WeightSource,
    encoder: Encoder,
    tower: HfTower,
}

impl<'s> HfClip<'s> {
    /// `prefix` ends in `text_model.` (e.g. `text_model.` for a standalone file).
    pub fn load(src: &'s dyn WeightSource, prefix: &str, tower: HfTower) -> Result<HfClip<'s>> {
        let mut cfg = read_config(src, prefix, Layout::Hf).with_context(|| format!("cannot use the {tower:?} text encoder `{prefix}*`"))?;
        if tower == HfTower::ClipG {
            cfg.act = Act::Gelu;
            let key = format!("{}.weight", hf_projection(prefix));
            ensure!(src.contains(&key), "the OpenCLIP-G text encoder `{prefix}*` has no pooled projection `{key}`");
            let (shape, _) = src.tensor(&key)?;
            ensure!(shape.len() == 2 && shape[1] == cfg.width, "`{key}` has shape {shape:?}, expected [out, {}]", cfg.width);
            cfg.projection = Some(shape[0]);
        }
        Ok(HfClip { src, encoder: Encoder { cfg, layout: Layout::Hf }, tower })
    }

    pub fn config(&self) -> &EncoderConfig {
        &self.encoder.cfg
    }

    pub fn tower(&self) -> HfTower {
        self.tower
    }

    /// (penultimate hidden states `[B, 77, width]` without final norm, pooled
    /// output `[B, width]` for CLIP-L or `[B, projection]` for OpenCLIP-G).
    pub fn encode<O: Ops>(&self, ops: &O, tokens: &TokenBatch, hooks: &InputHooks) -> Result<(O::Tensor, O::Tensor)> {
        let (hidden, pooled) = run(ops, self.src, &self.encoder, tokens, Wanted::PenultimateAndPooled, hooks)?;
        Ok((hidden, pooled.context("internal: no pooled output")?))
    }
}

fn read_config(src: &dyn WeightSource, prefix: &str, layout: Layout) -> Result<EncoderConfig> {
    let probe = layout.probe(prefix);
    if !src.contains(&probe) {
        bail!("the checkpoint has no `{probe}` (no text encoder under `{prefix}`)");
    }
    let (emb, _) = src.tensor(&probe)?;
    let [vocab, width] = emb[..] else {
        bail!("`{probe}` has shape {emb:?}, expected [vocab, width]")
    };
    let (pos, _) = src.tensor(&layout.position_key(prefix))?;
    ensure!(
        pos.len() == 2 && pos[0] >= CONTEXT_LENGTH && pos[1] == width,
        "`{}` has shape {pos:?}, expected [>= {CONTEXT_LENGTH}, {width}]",
        layout.position_key(prefix)
    );
    let layers = (0..)
        .take_while(|&i| {
            src.contains(&format!(
                "{}{}.weight",
                layout.layer_prefix(prefix, i),
                layout.mlp_in()
            ))
        })
        .count();
    ensure!(
        layers > 0,
        "no transformer layers under `{}`",
        layout.layer_prefix(prefix, 0)
    );
    let mlp_key = format!(
        "{}{}.weight",
        layout.layer_prefix(prefix, 0),
        layout.mlp_in()
    );
    let (mlp, _) = src.tensor(&mlp_key)?;
    ensure!(
        mlp.len() == 2 && mlp[1] == width,
        "`{mlp_key}` has shape {mlp:?}, expected [mlp, {width}]"
    );
    let projection = match layout {
        Layout::Hf => None,
        Layout::OpenClip => {
            let key = format!("{prefix}text_projection");
            let (shape, _) = src.tensor(&key)?;
            ensure!(
                shape.len() == 2 && shape[0] == width,
                "`{key}` has shape {shape:?}, expected [{width}, out]"
            );
            Some(shape[1])
        }
    };
    let heads = (width / HEAD_WIDTH).max(1);
    ensure!(
        width % heads == 0,
        "width {width} does not split into {heads} heads"
    );
    Ok(EncoderConfig {
        prefix: prefix.to_string(),
        width,
        heads,
        layers,
        mlp_width: mlp[0],
        vocab,
        projection,
        act: match layout {
            Layout::Hf => Act::QuickGelu,
            Layout::OpenClip => Act::Gelu,
        },
    })
}

/// A checkpoint tensor with the shape the model expects.
fn load<O: Ops>(ops: &O, src: &dyn WeightSource, key: &str, shape: &[usize]) -> Result<O::Tensor> {
    let (stored, view) = src.tensor(key)?;
    ensure!(
        stored == shape,
        "text encoder tensor `{key}` has shape {stored:?}, expected {shape:?}"
    );
    ops.weight(shape, &view)
        .with_context(|| format!("cannot load `{key}`"))
}

fn layer_norm<O: Ops>(
    ops: &O,
    src: &dyn WeightSource,
    module: &str,
    d: usize,
    x: &O::Tensor,
) -> Result<O::Tensor> {
    let w = load(ops, src, &format!("{module}.weight"), &[d])?;
    let b = load(ops, src, &format!("{module}.bias"), &[d])?;
    ops.layer_norm(x, &w, &b, LAYER_NORM_EPS)
}

/// `module(x)` for a Linear with bias, `x` passing through the module's input hook.
fn linear<O: Ops>(
    ops: &O,
    src: &dyn WeightSource,
    hooks: &InputHooks,
    module: &str,
    x: &O::Tensor,
    out: usize,
    inp: usize,
) -> Result<O::Tensor> {
    let w = load(ops, src, &format!("{module}.weight"), &[out, inp])?;
    let b = load(ops, src, &format!("{module}.bias"), &[out])?;
    let x = hooks.apply(ops, module, x)?;
    ops.linear(&x, &w, Some(&b))
}

/// Hugging Face `CLIPEncoderLayer` (pre-norm, causal, quick-GELU).
fn hf_layer<O: Ops>(
    ops: &O,
    src: &dyn WeightSource,
    hooks: &InputHooks,
    l: &str,
    cfg: &EncoderConfig,
    x: &O::Tensor,
) -> Result<O::Tensor> {
    let d = cfg.width;
    let h = layer_norm(ops, src, &format!("{l}layer_norm1"), d, x)?;
    let q = linear(ops, src, hooks, &format!("{l}self_attn.q_proj"), &h, d, d)?;
    let k = linear(ops, src, hooks, &format!("{l}self_attn.k_proj"), &h, d, d)?;
    let v = linear(ops, src, hooks, &format!("{l}self_attn.v_proj"), &h, d, d)?;
    let a = ops.attention(&q, &k, &v, cfg.heads, true)?;
    let x = ops.add(
        x,
        &linear(ops, src, hooks, &format!("{l}self_attn.out_proj"), &a, d, d)?,
    )?;
    let h = layer_norm(ops, src, &format!("{l}layer_norm2"), d, &x)?;
    let h = ops.act(
        &linear(
            ops,
            src,
            hooks,
            &format!("{l}mlp.fc1"),
            &h,
            cfg.mlp_width,
            d,
        )?,
        cfg.act,
    )?;
    ops.add(
        &x,
        &linear(
            ops,
            src,
            hooks,
            &format!("{l}mlp.fc2"),
            &h,
            d,
            cfg.mlp_width,
        )?,
    )
}

/// OpenCLIP `ResidualAttentionBlock` (pre-norm, causal, GELU, packed q/k/v).
fn open_clip_layer<O: Ops>(
    ops: &O,
    src: &dyn WeightSource,
    hooks: &InputHooks,
    l: &str,
    cfg: &EncoderConfig,
    x: &O::Tensor,
) -> Result<O::Tensor> {
    let d = cfg.width;
    let h = layer_norm(ops, src, &format!("{l}ln_1"), d, x)?;
    let h = hooks.apply(ops, &format!("{l}attn.in_proj"), &h)?;
    let (w_key, b_key) = (
        format!("{l}attn.in_proj_weight"),
        format!("{l}attn.in_proj_bias"),
    );
    let (w_shape, w_view) = src.tensor(&w_key)?;
    let (b_shape, b_view) = src.tensor(&b_key)?;
    ensure!(
        w_shape == [3 * d, d],
        "`{w_key}` has shape {w_shape:?}, expected [{}, {d}]",
        3 * d
    );
    ensure!(
        b_shape == [3 * d],
        "`{b_key}` has shape {b_shape:?}, expected [{}]",
        3 * d
    );
    // q, k, v are consecutive row blocks of the packed projection.
    let mut qkv = Vec::with_capacity(3);
    for part in 0..3 {
        let w = ops.weight(&[d, d], &elements(&w_view, part * d * d, d, d)?)?;
        let b = ops.weight(&[d], &elements(&b_view, part * d, 1, d)?)?;
        qkv.push(ops.linear(&h, &w, Some(&b))?);
    }
    let a = ops.attention(&qkv[0], &qkv[1], &qkv[2], cfg.heads, true)?;
    drop(qkv);
    let x = ops.add(
        x,
        &linear(ops, src, hooks, &format!("{l}attn.out_proj"), &a, d, d)?,
    )?;
    let h = layer_norm(ops, src, &format!("{l}ln_2"), d, &x)?;
    let h = ops.act(
        &linear(
            ops,
            src,
            hooks,
            &format!("{l}mlp.c_fc"),
            &h,
            cfg.mlp_width,
            d,
        )?,
        Act::Gelu,
    )?;
    ops.add(
        &x,
        &linear(
            ops,
            src,
            hooks,
            &format!("{l}mlp.c_proj"),
            &h,
            d,
            cfg.mlp_width,
        )?,
    )
}

/// `rows x cols` consecutive elements of `view` from element `start`.
fn elements<'a>(
    view: &WeightView<'a>,
    start: usize,
    rows: usize,
    cols: usize,
) -> Result<WeightView<'a>> {
    let size = view.dtype.size();
    let range = start * size..(start + rows * cols) * size;
    ensure!(
        range.end <= view.bytes.len(),
        "`{}` is shorter than its shape says",
        view.name
    );
    Ok(WeightView {
        name: view.name,
        dtype: view.dtype,
        rows,
        cols,
        bytes: &view.bytes[range],
    })
}

/// SDXL's image-size conditioning, in pixels (ComfyUI's `width`, `height`,
/// `crop_w`, `crop_h`, `target_width`, `target_height`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeConditioning {
    pub width: u32,
    pub height: u32,
    pub crop_left: u32,
    pub crop_top: u32,
    pub target_width: u32,
    pub target_height: u32,
}

impl SizeConditioning {
    /// An uncropped image of `width x height`, generated at that size (ComfyUI's defaults).
    pub fn new(width: u32, height: u32) -> SizeConditioning {
        SizeConditioning {
            width,
            height,
            crop_left: 0,
            crop_top: 0,
            target_width: width,
            target_height: height,
        }
    }
}

/// `y` width of the SDXL refiner UNet (pooled + 5 size/score embeddings); the
/// base takes 6 embeddings (2816).
pub const REFINER_ADM_CHANNELS: usize = 1280 + 5 * SIZE_EMBEDDING_WIDTH;

/// Width of the pooled text vector that starts a UNet's `y` of `adm_channels`.
pub fn pooled_width(adm_channels: usize) -> usize {
    if adm_channels == REFINER_ADM_CHANNELS {
        adm_channels - 5 * SIZE_EMBEDDING_WIDTH
    } else {
        adm_channels.saturating_sub(6 * SIZE_EMBEDDING_WIDTH)
    }
}

/// `y` for a UNet that takes `adm_channels`, from pooled text vectors: the
/// refiner's layout (positive aesthetic score) or the base's.
pub fn unet_adm<O: Ops>(ops: &O, pooled: &O::Tensor, adm_channels: usize, size: &SizeConditioning) -> Result<O::Tensor> {
    if adm_channels == REFINER_ADM_CHANNELS {
        sdxl_refiner_adm(ops, pooled, size, AESTHETIC_POSITIVE)
    } else {
        sdxl_adm(ops, pooled, size)
    }
}

/// SDXL base `y` `[B, P + 6*256]`: pooled, then the embeddings of height, width,
/// crop top, crop left, target height, target width (sgm's
/// `ConcatTimestepEmbedderND`, ComfyUI's `SDXL.encode_adm`).
pub fn sdxl_adm<O: Ops>(ops: &O, pooled: &O::Tensor, size: &SizeConditioning) -> Result<O::Tensor> {
    let s = size;
    let values = [
        s.height,
        s.width,
        s.crop_top,
        s.crop_left,
        s.target_height,
        s.target_width,
    ]
    .map(|v| v as f32);
    append_embeddings(ops, pooled, &values)
}

/// SDXL refiner `y` `[B, P + 5*256]`: pooled, then the embeddings of height,
/// width, crop top, crop left and the aesthetic score (ComfyUI's
/// `SDXLRefiner.encode_adm`; [`AESTHETIC_POSITIVE`] / [`AESTHETIC_NEGATIVE`]).
pub fn sdxl_refiner_adm<O: Ops>(
    ops: &O,
    pooled: &O::Tensor,
    size: &SizeConditioning,
    aesthetic_score: f32,
) -> Result<O::Tensor> {
    let s = size;
    let values = [
        s.height as f32,
        s.width as f32,
        s.crop_top as f32,
        s.crop_left as f32,
        aesthetic_score,
    ];
    append_embeddings(ops, pooled, &values)
}

fn append_embeddings<O: Ops>(ops: &O, pooled: &O::Tensor, values: &[f32]) -> Result<O::Tensor> {
    let shape = ops.shape(pooled);
    let [b, _] = shape[..] else {
        bail!("pooled output has shape {shape:?}, expected [batch, width]")
    };
    let row: Vec<f32> = values
        .iter()
        .flat_map(|&v| timestep_embedding(v, SIZE_EMBEDDING_WIDTH))
        .collect();
    let rows: Vec<f32> = (0..b).flat_map(|_| row.iter().copied()).collect();
    let embedded = ops.from_f32(&[b, row.len()], &rows)?;
    ops.concat(&[pooled, &embedded], 1)
}

/// The LDM sinusoidal embedding of one value: `[cos(v f_0) .. cos(v f_{h-1}),
/// sin(v f_0) .. sin(v f_{h-1})]`, `f_i = 10000^(-i/h)`, `h = dim/2`, in f32 as
/// PyTorch computes it (odd `dim` ends with a 0).
pub fn timestep_embedding(value: f32, dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let neg_log_period = -(10000f64.ln()) as f32;
    let args: Vec<f32> = (0..half)
        .map(|i| value * (neg_log_period * i as f32 / half as f32).exp())
        .collect();
    let mut out: Vec<f32> = args.iter().map(|&a| (a as f64).cos() as f32).collect();
    out.extend(args.iter().map(|&a| (a as f64).sin() as f32));
    out.resize(dim, 0.0);
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::formats::SourceDtype;
    use crate::models::InputHook;
    use crate::models::tokenizer::tests::test_tokenizer;
    use crate::nn::cpu::CpuOps;
    use crate::nn::{ChannelAxis, ObserverSpec};
    use crate::synth::{self, Family, SynthOptions};

    fn ops() -> CpuOps {
        CpuOps::new()
    }

    #[derive(Clone, Copy)]
    struct Dims {
        vocab: usize,
        width: usize,
        mlp: usize,
        layers: usize,
    }

    /// f32 weights in memory.
    #[derive(Default)]
    struct Memory(HashMap<String, (Vec<usize>, Vec<u8>)>);

    impl WeightSource for Memory {
        fn tensor(&self, key: &str) -> Result<(Vec<usize>, WeightView<'_>)> {
            let (name, (shape, bytes)) = self
                .0
                .get_key_value(key)
                .with_context(|| format!("no tensor `{key}`"))?;
            let cols = *shape.last().unwrap();
            Ok((
                shape.clone(),
                WeightView {
                    name,
                    dtype: SourceDtype::F32,
                    rows: bytes.len() / 4 / cols,
                    cols,
                    bytes,
                },
            ))
        }
        fn contains(&self, key: &str) -> bool {
            self.0.contains_key(key)
        }
    }

    impl Memory {
        fn put(&mut self, key: String, shape: &[usize], values: Vec<f32>) {
            assert_eq!(shape.iter().product::<usize>(), values.len());
            self.0.insert(
                key,
                (
                    shape.to_vec(),
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ),
            );
        }
        fn get(&self, key: &str) -> Vec<f32> {
            self.0[key]
                .1
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        }
        fn random(
            &mut self,
            rng: &mut StdRng,
            key: String,
            shape: &[usize],
            center: f32,
            spread: f32,
        ) {
            let n = shape.iter().product();
            self.put(
                key,
                shape,
                (0..n)
                    .map(|_| center + spread * (rng.random::<f32>() * 2.0 - 1.0))
                    .collect(),
            );
        }
        fn linear(&mut self, rng: &mut StdRng, module: &str, out: usize, inp: usize) {
            self.random(
                rng,
                format!("{module}.weight"),
                &[out, inp],
                0.0,
                1.5 / (inp as f32).sqrt(),
            );
            self.random(rng, format!("{module}.bias"), &[out], 0.0, 0.1);
        }
        fn norm(&mut self, rng: &mut StdRng, module: &str, d: usize) {
            self.random(rng, format!("{module}.weight"), &[d], 1.0, 0.2);
            self.random(rng, format!("{module}.bias"), &[d], 0.0, 0.2);
        }
        /// Hugging Face CLIPTextModel names.
        fn hf_clip(
            &mut self,
            rng: &mut StdRng,
            p: &str,
            Dims {
                vocab,
                width: d,
                mlp,
                layers,
            }: Dims,
        ) {
            self.random(
                rng,
                format!("{p}embeddings.token_embedding.weight"),
                &[vocab, d],
                0.0,
                1.0,
            );
            self.random(
                rng,
                format!("{p}embeddings.position_embedding.weight"),
                &[CONTEXT_LENGTH, d],
                0.0,
                0.5,
            );
            for i in 0..layers {
                let l = format!("{p}encoder.layers.{i}.");
                self.norm(rng, &format!("{l}layer_norm1"), d);
                for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    self.linear(rng, &format!("{l}self_attn.{proj}"), d, d);
                }
                self.norm(rng, &format!("{l}layer_norm2"), d);
                self.linear(rng, &format!("{l}mlp.fc1"), mlp, d);
                self.linear(rng, &format!("{l}mlp.fc2"), d, mlp);
            }
            self.norm(rng, &format!("{p}final_layer_norm"), d);
        }
        /// OpenCLIP text tower names.
        fn open_clip(
            &mut self,
            rng: &mut StdRng,
            p: &str,
            Dims {
                vocab,
                width: d,
                mlp,
                layers,
            }: Dims,
            proj: usize,
        ) {
            self.random(
                rng,
                format!("{p}token_embedding.weight"),
                &[vocab, d],
                0.0,
                1.0,
            );
            self.random(
                rng,
                format!("{p}positional_embedding"),
                &[CONTEXT_LENGTH, d],
                0.0,
                0.5,
            );
            for i in 0..layers {
                let r = format!("{p}transformer.resblocks.{i}.");
                self.norm(rng, &format!("{r}ln_1"), d);
                self.random(
                    rng,
                    format!("{r}attn.in_proj_weight"),
                    &[3 * d, d],
                    0.0,
                    1.5 / (d as f32).sqrt(),
                );
                self.random(rng, format!("{r}attn.in_proj_bias"), &[3 * d], 0.0, 0.1);
                self.linear(rng, &format!("{r}attn.out_proj"), d, d);
                self.norm(rng, &format!("{r}ln_2"), d);
                self.linear(rng, &format!("{r}mlp.c_fc"), mlp, d);
                self.linear(rng, &format!("{r}mlp.c_proj"), d, mlp);
            }
            self.norm(rng, &format!("{p}ln_final"), d);
            self.random(
                rng,
                format!("{p}text_projection"),
                &[d, proj],
                0.0,
                1.0 / (d as f32).sqrt(),
            );
        }
    }

    // ---- Naive reference, one prompt at a time, straight from the definitions.

    fn naive_ln(x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
        let d = w.len();
        x.chunks(d)
            .flat_map(|row| {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                (0..d).map(move |i| {
                    (((row[i] as f64 - mean) / (var + 1e-5).sqrt()) as f32) * w[i] + b[i]
                })
            })
            .collect()
    }

    /// `x [n, inp] @ w[out, inp]^T + b`.
    fn naive_linear(x: &[f32], w: &[f32], b: Option<&[f32]>, out: usize) -> Vec<f32> {
        let inp = w.len() / out;
        x.chunks(inp)
            .flat_map(|row| {
                (0..out).map(move |o| {
                    (0..inp).map(|i| row[i] * w[o * inp + i]).sum::<f32>() + b.map_or(0.0, |b| b[o])
                })
            })
            .collect()
    }

    fn naive_causal_attention(q: &[f32], k: &[f32], v: &[f32], d: usize, heads: usize) -> Vec<f32> {
        let (n, hd) = (q.len() / d, d / heads);
        let mut out = vec![0.0; q.len()];
        for h in 0..heads {
            for i in 0..n {
                let dot = |j: usize| {
                    (0..hd)
                        .map(|e| q[i * d + h * hd + e] * k[j * d + h * hd + e])
                        .sum::<f32>()
                        / (hd as f32).sqrt()
                };
                let scores: Vec<f32> = (0..=i).map(dot).collect();
                let max = scores.iter().copied().fold(f32::MIN, f32::max);
                let exp: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = exp.iter().sum();
                for e in 0..hd {
                    out[i * d + h * hd + e] =
                        (0..=i).map(|j| exp[j] / sum * v[j * d + h * hd + e]).sum();
                }
            }
        }
        out
    }

    /// erf to ~1e-7 (Numerical Recipes' erfc Chebyshev fit).
    fn erf(x: f64) -> f64 {
        let z = x.abs();
        let t = 1.0 / (1.0 + 0.5 * z);
        let poly = -z * z - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807
                                + t * (-1.13520398
                                    + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
        let erfc = t * poly.exp();
        if x >= 0.0 { 1.0 - erfc } else { erfc - 1.0 }
    }

    fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
        a.iter().zip(b).map(|(x, y)| x + y).collect()
    }

    /// Hidden states after each layer (index 0 = embeddings) of one prompt.
    fn naive_hidden(
        m: &Memory,
        p: &str,
        layout: Layout,
        ids: &[u32],
        d: usize,
        heads: usize,
    ) -> Vec<Vec<f32>> {
        let table = m.get(&layout.probe(p));
        let pos = m.get(&layout.position_key(p));
        let mut x: Vec<f32> = ids
            .iter()
            .enumerate()
            .flat_map(|(n, &id)| (0..d).map(move |c| (n, id as usize, c)))
            .map(|(n, id, c)| table[id * d + c] + pos[n * d + c])
            .collect();
        let mut states = vec![x.clone()];
        let g = |k: &str| m.get(k);
        for i in 0.. {
            let l = layout.layer_prefix(p, i);
            if !m.contains(&format!("{l}{}.weight", layout.mlp_in())) {
                break;
            }
            x = match layout {
                Layout::Hf => {
                    let h = naive_ln(
                        &x,
                        &g(&format!("{l}layer_norm1.weight")),
                        &g(&format!("{l}layer_norm1.bias")),
                    );
                    let proj = |name: &str, input: &[f32]| {
                        naive_linear(
                            input,
                            &g(&format!("{l}{name}.weight")),
                            Some(&g(&format!("{l}{name}.bias"))),
                            d,
                        )
                    };
                    let a = naive_causal_attention(
                        &proj("self_attn.q_proj", &h),
                        &proj("self_attn.k_proj", &h),
                        &proj("self_attn.v_proj", &h),
                        d,
                        heads,
                    );
                    let x = add(&x, &proj("self_attn.out_proj", &a));
                    let h = naive_ln(
                        &x,
                        &g(&format!("{l}layer_norm2.weight")),
                        &g(&format!("{l}layer_norm2.bias")),
                    );
                    let mlp = g(&format!("{l}mlp.fc1.bias")).len();
                    let h = naive_linear(
                        &h,
                        &g(&format!("{l}mlp.fc1.weight")),
                        Some(&g(&format!("{l}mlp.fc1.bias"))),
                        mlp,
                    );
                    let h: Vec<f32> = h.iter().map(|&v| v / (1.0 + (-1.702 * v).exp())).collect();
                    add(
                        &x,
                        &naive_linear(
                            &h,
                            &g(&format!("{l}mlp.fc2.weight")),
                            Some(&g(&format!("{l}mlp.fc2.bias"))),
                            d,
                        ),
                    )
                }
                Layout::OpenClip => {
                    let h = naive_ln(
                        &x,
                        &g(&format!("{l}ln_1.weight")),
                        &g(&format!("{l}ln_1.bias")),
                    );
                    let qkv = naive_linear(
                        &h,
                        &g(&format!("{l}attn.in_proj_weight")),
                        Some(&g(&format!("{l}attn.in_proj_bias"))),
                        3 * d,
                    );
                    let part = |s: usize| -> Vec<f32> {
                        qkv.chunks(3 * d)
                            .flat_map(|row| row[s * d..(s + 1) * d].to_vec())
                            .collect()
                    };
                    let a = naive_causal_attention(&part(0), &part(1), &part(2), d, heads);
                    let x = add(
                        &x,
                        &naive_linear(
                            &a,
                            &g(&format!("{l}attn.out_proj.weight")),
                            Some(&g(&format!("{l}attn.out_proj.bias"))),
                            d,
                        ),
                    );
                    let h = naive_ln(
                        &x,
                        &g(&format!("{l}ln_2.weight")),
                        &g(&format!("{l}ln_2.bias")),
                    );
                    let mlp = g(&format!("{l}mlp.c_fc.bias")).len();
                    let h = naive_linear(
                        &h,
                        &g(&format!("{l}mlp.c_fc.weight")),
                        Some(&g(&format!("{l}mlp.c_fc.bias"))),
                        mlp,
                    );
                    let h: Vec<f32> = h
                        .iter()
                        .map(|&v| (0.5 * v as f64 * (1.0 + erf(v as f64 / 2f64.sqrt()))) as f32)
                        .collect();
                    add(
                        &x,
                        &naive_linear(
                            &h,
                            &g(&format!("{l}mlp.c_proj.weight")),
                            Some(&g(&format!("{l}mlp.c_proj.bias"))),
                            d,
                        ),
                    )
                }
            };
            states.push(x.clone());
        }
        states
    }

    fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * scale,
                "{what}: element {i}: {g} vs {w}"
            );
        }
    }

    const PROMPTS: [&str; 3] = ["a photo of a cat", "the and for, it's 2024!", ""];

    #[test]
    fn sd15_matches_naive_clip_l() {
        let (_dir, tokenizer) = test_tokenizer();
        let (d, heads, mlp) = (128, 2, 256);
        let mut m = Memory::default();
        m.hf_clip(
            &mut StdRng::seed_from_u64(1),
            SD15_CLIP_L,
            Dims {
                vocab: tokenizer.vocab_size(),
                width: d,
                mlp,
                layers: 2,
            },
        );
        assert_eq!(TextFamily::detect(&m), Some(TextFamily::Sd15));
        let te = TextEncoders::detect(&m).unwrap();
        let cfg = te.clip_l().unwrap();
        assert_eq!(
            (
                cfg.width,
                cfg.heads,
                cfg.layers,
                cfg.mlp_width,
                cfg.vocab,
                cfg.projection
            ),
            (d, heads, 2, mlp, 574, None)
        );
        assert_eq!(te.context_width(), d);

        let ops = ops();
        let cond = te
            .encode(&ops, &tokenizer, &PROMPTS, &InputHooks::none())
            .unwrap();
        assert!(cond.pooled.is_none());
        assert_eq!(ops.shape(&cond.context), vec![3, CONTEXT_LENGTH, d]);
        let got = ops.to_f32(&cond.context).unwrap();
        let tokens = tokenizer.encode(&PROMPTS, Padding::EndToken).unwrap();
        for b in 0..PROMPTS.len() {
            let hidden = naive_hidden(&m, SD15_CLIP_L, Layout::Hf, tokens.row(b), d, heads);
            let want = naive_ln(
                &hidden[2],
                &m.get(&format!("{SD15_CLIP_L}final_layer_norm.weight")),
                &m.get(&format!("{SD15_CLIP_L}final_layer_norm.bias")),
            );
            assert_close(
                &got[b * CONTEXT_LENGTH * d..(b + 1) * CONTEXT_LENGTH * d],
                &want,
                1e-4,
                &format!("prompt {b}"),
            );
        }
    }

    /// CLIP-L 64 wide (one head), bigG 128 wide (two heads), two layers each.
    fn sdxl_memory(vocab: usize) -> Memory {
        let mut m = Memory::default();
        let rng = &mut StdRng::seed_from_u64(2);
        m.hf_clip(
            rng,
            SDXL_CLIP_L,
            Dims {
                vocab,
                width: 64,
                mlp: 128,
                layers: 2,
            },
        );
        m.open_clip(
            rng,
            SDXL_CLIP_G,
            Dims {
                vocab,
                width: 128,
                mlp: 256,
                layers: 2,
            },
            96,
        );
        m
    }

    #[test]
    fn long_prompts_are_chunked_and_batched_as_comfyui_does() {
        let (_dir, tokenizer) = test_tokenizer();
        let m = sdxl_memory(tokenizer.vocab_size());
        let te = TextEncoders::detect(&m).unwrap();
        let ops = ops();
        let enc = |prompts: &[&str]| te.encode(&ops, &tokenizer, prompts, &InputHooks::none()).unwrap();
        let values = |t: &<CpuOps as Ops>::Tensor| ops.to_f32(t).unwrap();
        // 80 one-token words: a chunk of 75 and a chunk of 5, each its own 77-token sequence.
        let long = vec!["a"; 80].join(" ");
        let (first, second) = (vec!["a"; 75].join(" "), vec!["a"; 5].join(" "));
        let both = enc(&[long.as_str(), "a"]);
        assert_eq!(ops.shape(&both.context), vec![2, 2 * CONTEXT_LENGTH, 192]);
        let (c, row) = (values(&both.context), CONTEXT_LENGTH * 192);
        let (a, b, short) = (enc(&[first.as_str()]), enc(&[second.as_str()]), enc(&["a"]));
        assert_close(&c[..row], &values(&a.context), 1e-6, "first chunk");
        assert_close(&c[row..2 * row], &values(&b.context), 1e-6, "second chunk");
        // The short prompt is repeated to the long one's length (ComfyUI's cond_cat).
        assert_close(&c[2 * row..3 * row], &values(&short.context), 1e-6, "short prompt");
        assert_close(&c[3 * row..], &values(&short.context), 1e-6, "short prompt, repeated");
        // Pooled: the first chunk's.
        let p = values(both.pooled.as_ref().unwrap());
        assert_close(&p[..96], &values(a.pooled.as_ref().unwrap()), 1e-6, "pooled of the first chunk");
        assert_close(&p[96..], &values(short.pooled.as_ref().unwrap()), 1e-6, "pooled of the short prompt");
        assert_eq!(batched_tokens(&[77, 154, 231]).unwrap(), 462);
        assert!(batched_tokens(&[77 * 14, 77 * 15]).is_err());
    }

    #[test]
    fn sdxl_matches_naive_clip_l_and_big_g() {
        let (_dir, tokenizer) = test_tokenizer();
        let m = sdxl_memory(tokenizer.vocab_size());
        let te = TextEncoders::detect(&m).unwrap();
        assert_eq!(te.family(), TextFamily::Sdxl);
        assert_eq!(te.clip_g().unwrap().heads, 2);
        assert_eq!(te.clip_g().unwrap().projection, Some(96));
        assert_eq!(te.context_width(), 192);

        let tokens = te.tokenize(&tokenizer, &PROMPTS).unwrap();
        let (l, g) = (
            tokens.clip_l.as_ref().unwrap(),
            tokens.clip_g.as_ref().unwrap(),
        );
        assert_eq!(l.end_index, g.end_index);
        let end = l.end_index[0];
        assert_eq!(
            (
                l.row(0)[end],
                l.row(0)[end + 1],
                g.row(0)[end],
                g.row(0)[end + 1]
            ),
            (573, 573, 573, 0)
        );

        let ops = ops();
        let cond = te
            .encode_tokens(&ops, &tokens, &InputHooks::none())
            .unwrap();
        assert_eq!(ops.shape(&cond.context), vec![3, CONTEXT_LENGTH, 192]);
        let pooled = cond.pooled.as_ref().unwrap();
        assert_eq!(ops.shape(pooled), vec![3, 96]);
        let (context, pooled) = (
            ops.to_f32(&cond.context).unwrap(),
            ops.to_f32(pooled).unwrap(),
        );
        for b in 0..PROMPTS.len() {
            // Penultimate = after layer 0 of 2, no final norm.
            let hl = &naive_hidden(&m, SDXL_CLIP_L, Layout::Hf, l.row(b), 64, 1)[1];
            let hg_all = naive_hidden(&m, SDXL_CLIP_G, Layout::OpenClip, g.row(b), 128, 2);
            let want: Vec<f32> = (0..CONTEXT_LENGTH)
                .flat_map(|n| {
                    hl[n * 64..(n + 1) * 64]
                        .iter()
                        .chain(&hg_all[1][n * 128..(n + 1) * 128])
                        .copied()
                })
                .collect();
            assert_close(
                &context[b * CONTEXT_LENGTH * 192..(b + 1) * CONTEXT_LENGTH * 192],
                &want,
                1e-4,
                &format!("context {b}"),
            );

            let e = g.end_index[b];
            let last = naive_ln(
                &hg_all[2][e * 128..(e + 1) * 128],
                &m.get(&format!("{SDXL_CLIP_G}ln_final.weight")),
                &m.get(&format!("{SDXL_CLIP_G}ln_final.bias")),
            );
            let p = m.get(&format!("{SDXL_CLIP_G}text_projection"));
            let want: Vec<f32> = (0..96)
                .map(|o| (0..128).map(|i| last[i] * p[i * 96 + o]).sum())
                .collect();
            assert_close(
                &pooled[b * 96..(b + 1) * 96],
                &want,
                1e-4,
                &format!("pooled {b}"),
            );
        }
    }

    /// Tokens after the end token change neither the pooled output nor any
    /// earlier position; tokens before it change both.
    #[test]
    fn causal_and_padding_invariance() {
        let m = sdxl_memory(574);
        let te = TextEncoders::load(&m, TextFamily::Sdxl).unwrap();
        let row = |changes: &[(usize, u32)], pad: u32| {
            let mut ids = vec![pad; CONTEXT_LENGTH];
            ids[..5].copy_from_slice(&[572, 320, 539, 518, 573]);
            for &(i, id) in changes {
                ids[i] = id;
            }
            ids
        };
        let batch = |pad: u32| {
            let rows = [row(&[], pad), row(&[(10, 77)], pad), row(&[(2, 77)], pad)];
            TokenBatch {
                ids: rows.concat(),
                end_index: vec![4; 3],
            }
        };
        let tokens = PromptTokens {
            clip_l: Some(batch(573)),
            clip_g: Some(batch(0)),
            chunks: vec![],
        };
        let ops = ops();
        let cond = te
            .encode_tokens(&ops, &tokens, &InputHooks::none())
            .unwrap();
        let (context, pooled) = (
            ops.to_f32(&cond.context).unwrap(),
            ops.to_f32(cond.pooled.as_ref().unwrap()).unwrap(),
        );
        let c = 192;
        let position = |b: usize, n: usize| {
            &context[(b * CONTEXT_LENGTH + n) * c..(b * CONTEXT_LENGTH + n + 1) * c]
        };
        let differs = |a: &[f32], b: &[f32]| a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-3);
        assert_close(
            &pooled[96..192],
            &pooled[..96],
            1e-6,
            "pooled after a change past the end token",
        );
        for n in 0..10 {
            assert_close(
                position(1, n),
                position(0, n),
                1e-6,
                &format!("position {n}"),
            );
        }
        assert!(
            differs(position(1, 10), position(0, 10)),
            "the changed position itself changes"
        );
        assert!(
            differs(&pooled[192..], &pooled[..96]),
            "a change before the end token changes the pooled output"
        );
        assert!(
            !differs(position(2, 1), position(0, 1)) && differs(position(2, 2), position(0, 2))
        );
    }

    #[test]
    fn sd2_uses_open_clip_h_penultimate_through_ln_final() {
        let mut m = Memory::default();
        let dims = Dims { vocab: 574, width: 64, mlp: 128, layers: 2 };
        m.open_clip(&mut StdRng::seed_from_u64(5), SD2_CLIP_H, dims, 48);
        let te = TextEncoders::detect(&m).unwrap();
        assert_eq!(te.family(), TextFamily::Sd2);
        assert_eq!(te.context_width(), 64);
        let (_dir, tokenizer) = test_tokenizer();
        let ops = ops();
        let cond = te.encode(&ops, &tokenizer, &PROMPTS[..2], &InputHooks::none()).unwrap();
        assert!(cond.pooled.is_none());
        assert!(te.adm(&ops, &cond, &SizeConditioning::new(768, 768), false).unwrap().is_none());
        let ids = tokenizer.encode(&PROMPTS[..1], Padding::Zero).unwrap();
        let hidden = &naive_hidden(&m, SD2_CLIP_H, Layout::OpenClip, ids.row(0), 64, 1)[1];
        let want = naive_ln(hidden, &m.get(&format!("{SD2_CLIP_H}ln_final.weight")), &m.get(&format!("{SD2_CLIP_H}ln_final.bias")));
        assert_close(&ops.to_f32(&cond.context).unwrap()[..CONTEXT_LENGTH * 64], &want, 1e-4, "SD2 context");
        // Without ln_final it would be the refiner's penultimate states: the norm matters.
        assert!(want.iter().zip(hidden).any(|(a, b)| (a - b).abs() > 1e-2));
    }

    #[test]
    fn refiner_uses_big_g_alone() {
        let mut m = Memory::default();
        m.open_clip(
            &mut StdRng::seed_from_u64(3),
            SDXL_REFINER_CLIP_G,
            Dims {
                vocab: 574,
                width: 64,
                mlp: 128,
                layers: 2,
            },
            48,
        );
        let te = TextEncoders::detect(&m).unwrap();
        assert_eq!(te.family(), TextFamily::SdxlRefiner);
        assert!(te.clip_l().is_none());
        let (_dir, tokenizer) = test_tokenizer();
        let ops = ops();
        let cond = te
            .encode(&ops, &tokenizer, &PROMPTS[..2], &InputHooks::none())
            .unwrap();
        assert_eq!(ops.shape(&cond.context), vec![2, CONTEXT_LENGTH, 64]);
        let g = tokenizer.encode(&PROMPTS[..1], Padding::Zero).unwrap();
        let want = &naive_hidden(&m, SDXL_REFINER_CLIP_G, Layout::OpenClip, g.row(0), 64, 1)[1];
        assert_close(
            &ops.to_f32(&cond.context).unwrap()[..CONTEXT_LENGTH * 64],
            want,
            1e-4,
            "refiner context",
        );

        let y = te
            .adm(&ops, &cond, &SizeConditioning::new(1024, 1024), true)
            .unwrap()
            .unwrap();
        assert_eq!(ops.shape(&y), vec![2, 48 + 5 * 256]);
        let y = ops.to_f32(&y).unwrap();
        assert_eq!(
            &y[48 + 4 * 256..48 + 5 * 256],
            timestep_embedding(2.5, 256).as_slice()
        );
    }

    #[test]
    fn hooks_see_linear_inputs_by_full_key() {
        let m = sdxl_memory(574);
        let te = TextEncoders::detect(&m).unwrap();
        let modules = [
            format!("{SDXL_CLIP_L}encoder.layers.0.self_attn.q_proj"),
            format!("{SDXL_CLIP_L}encoder.layers.0.mlp.fc2"),
            // SDXL stops CLIP-L before its last layer.
            format!("{SDXL_CLIP_L}encoder.layers.1.self_attn.q_proj"),
            format!("{SDXL_CLIP_G}transformer.resblocks.1.attn.in_proj"),
            format!("{SDXL_CLIP_G}text_projection"),
        ];
        let channels = [64, 128, 64, 128, 128];
        let ops = ops();
        let specs: Vec<ObserverSpec> = channels
            .iter()
            .map(|&channels| ObserverSpec {
                channels,
                axis: ChannelAxis::Last,
            })
            .collect();
        ops.observers_reset(&specs, 1).unwrap();
        let mut hooks = InputHooks::none();
        for (slot, module) in modules.iter().enumerate() {
            hooks.by_module.insert(
                module.clone(),
                InputHook {
                    observer: Some(slot),
                    quant: None,
                },
            );
        }
        let (_dir, tokenizer) = test_tokenizer();
        let cond = te.encode(&ops, &tokenizer, &PROMPTS, &hooks).unwrap();
        let stats = ops.observers_read().unwrap();
        let calls: Vec<u64> = stats.iter().map(|s| s.calls).collect();
        assert_eq!(calls, vec![1, 1, 0, 1, 1]);
        assert!(stats[0].amax() > 0.0 && stats[1].amax() > 0.0);
        // The projection's input is the normed end-token state: its amax is what the naive model gives.
        let g = te.tokenize(&tokenizer, &PROMPTS).unwrap().clip_g.unwrap();
        let mut amax = 0f32;
        for b in 0..PROMPTS.len() {
            let e = g.end_index[b];
            let hidden = &naive_hidden(&m, SDXL_CLIP_G, Layout::OpenClip, g.row(b), 128, 2)[2];
            let last = naive_ln(
                &hidden[e * 128..(e + 1) * 128],
                &m.get(&format!("{SDXL_CLIP_G}ln_final.weight")),
                &m.get(&format!("{SDXL_CLIP_G}ln_final.bias")),
            );
            amax = last.iter().fold(amax, |a, v| a.max(v.abs()));
        }
        assert!(
            (stats[4].amax() - amax).abs() <= 1e-4 * amax,
            "{} vs {amax}",
            stats[4].amax()
        );
        drop(cond);
    }

    fn synth_checkpoint(family: Family, full_checkpoint: bool) -> (tempfile::TempDir, Checkpoint) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        synth::write(
            &SynthOptions {
                full_checkpoint,
                ..SynthOptions::new(family)
            },
            &path,
            |_, _| {},
        )
        .unwrap();
        let ckpt = Checkpoint::open(&path).unwrap();
        (dir, ckpt)
    }

    /// The synthetic full checkpoints' encoders (width 32, one layer, 128 tokens) run.
    #[test]
    fn synthetic_checkpoints_encode() {
        let ops = ops();
        let batch = |pad: u32| {
            let mut ids = vec![pad; 2 * CONTEXT_LENGTH];
            ids[..4].copy_from_slice(&[126, 5, 6, 127]);
            ids[CONTEXT_LENGTH..CONTEXT_LENGTH + 2].copy_from_slice(&[126, 127]);
            TokenBatch {
                ids,
                end_index: vec![3, 1],
            }
        };
        for (family, text_family, width, pooled) in [
            (Family::Sd15, TextFamily::Sd15, 768, None),
            (Family::Sdxl, TextFamily::Sdxl, 2048, Some(1280)),
        ] {
            let (_dir, ckpt) = synth_checkpoint(family, true);
            let te = TextEncoders::detect(&ckpt).unwrap();
            assert_eq!(te.family(), text_family);
            let l = te.clip_l().unwrap();
            assert_eq!(
                (l.width, l.heads, l.layers, l.mlp_width, l.vocab),
                (768, 12, 1, 3072, 1024)
            );
            let tokens = PromptTokens {
                clip_l: Some(batch(127)),
                clip_g: te.clip_g().map(|_| batch(0)),
                chunks: vec![],
            };
            let cond = te
                .encode_tokens(&ops, &tokens, &InputHooks::none())
                .unwrap();
            assert_eq!(ops.shape(&cond.context), vec![2, CONTEXT_LENGTH, width]);
            assert!(
                ops.to_f32(&cond.context)
                    .unwrap()
                    .iter()
                    .all(|v| v.is_finite())
            );
            assert_eq!(
                cond.pooled.as_ref().map(|p| ops.shape(p)),
                pooled.map(|p| vec![2, p])
            );
            if let Some(p) = &cond.pooled {
                assert!(ops.to_f32(p).unwrap().iter().all(|v| v.is_finite()));
                let y = te
                    .adm(&ops, &cond, &SizeConditioning::new(1024, 768), false)
                    .unwrap()
                    .unwrap();
                assert_eq!(ops.shape(&y), vec![2, 1280 + 6 * 256]);
            }

            // The test tokenizer's 574 tokens fit the synthetic 1024-token tables:
            // prompts encode into the context the UNet takes.
            let (_tdir, tokenizer) = test_tokenizer();
            let cond = te
                .encode(
                    &ops,
                    &tokenizer,
                    &["a cat", "the end of a long day"],
                    &InputHooks::none(),
                )
                .unwrap();
            assert_eq!(ops.shape(&cond.context), vec![2, CONTEXT_LENGTH, width]);
        }
    }

    #[test]
    fn missing_encoders_are_named() {
        let (_dir, ckpt) = synth_checkpoint(Family::Sd15, false);
        let msg = format!("{:#}", TextEncoders::detect(&ckpt).err().unwrap());
        assert!(
            msg.contains(SD15_CLIP_L)
                && msg.contains(SDXL_CLIP_G)
                && msg.contains("full checkpoint"),
            "{msg}"
        );
        let msg = format!(
            "{:#}",
            TextEncoders::load(&ckpt, TextFamily::Sd15).err().unwrap()
        );
        assert!(msg.contains(SD15_CLIP_L), "{msg}");

        let m = sdxl_memory(574);
        let msg = format!(
            "{:#}",
            TextEncoders::load(&m, TextFamily::SdxlRefiner)
                .err()
                .unwrap()
        );
        assert!(msg.contains(SDXL_REFINER_CLIP_G), "{msg}");
        let mut partial = sdxl_memory(574);
        partial.0.retain(|k, _| !k.starts_with(SDXL_CLIP_G));
        let msg = format!(
            "{:#}",
            TextEncoders::load(&partial, TextFamily::Sdxl)
                .err()
                .unwrap()
        );
        assert!(msg.contains(SDXL_CLIP_G), "{msg}");
        // A layer with the wrong width is named.
        let mut bad = sdxl_memory(574);
        bad.put(
            format!("{SDXL_CLIP_G}transformer.resblocks.1.attn.out_proj.weight"),
            &[128, 64],
            vec![0.0; 128 * 64],
        );
        let tokens = PromptTokens {
            clip_l: Some(TokenBatch {
                ids: vec![0; 77],
                end_index: vec![0],
            }),
            clip_g: Some(TokenBatch {
                ids: vec![0; 77],
                end_index: vec![0],
            }),
            chunks: vec![],
        };
        let msg = format!(
            "{:#}",
            TextEncoders::detect(&bad)
                .unwrap()
                .encode_tokens(&ops(), &tokens, &InputHooks::none())
                .err()
                .unwrap()
        );
        assert!(
            msg.contains("resblocks.1.attn.out_proj.weight") && msg.contains("[128, 64]"),
            "{msg}"
        );
    }

    #[test]
    fn size_embeddings() {
        // dim 8: f = [1, 10000^-1/4, 10000^-2/4, 10000^-3/4] = [1, 0.1, 0.01, 0.001].
        let e = timestep_embedding(2.0, 8);
        let want = [
            2f64.cos(),
            0.2f64.cos(),
            0.02f64.cos(),
            0.002f64.cos(),
            2f64.sin(),
            0.2f64.sin(),
            0.02f64.sin(),
            0.002f64.sin(),
        ];
        for (g, w) in e.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{e:?}");
        }
        let zero = timestep_embedding(0.0, 256);
        assert!(zero[..128].iter().all(|&v| v == 1.0) && zero[128..].iter().all(|&v| v == 0.0));
        assert_eq!(timestep_embedding(1.0, 5).len(), 5);

        let ops = ops();
        let pooled = ops
            .from_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
            .unwrap();
        let size = SizeConditioning {
            width: 832,
            height: 1216,
            crop_left: 16,
            crop_top: 8,
            target_width: 1024,
            target_height: 1024,
        };
        let y = sdxl_adm(&ops, &pooled, &size).unwrap();
        assert_eq!(ops.shape(&y), vec![2, 3 + 6 * 256]);
        let y = ops.to_f32(&y).unwrap();
        let row = 3 + 6 * 256;
        assert_eq!(&y[..3], &[1.0, 2.0, 3.0]);
        assert_eq!(&y[row..row + 3], &[4.0, 5.0, 6.0]);
        // Order: height, width, crop top, crop left, target height, target width.
        for (i, v) in [1216.0, 832.0, 8.0, 16.0, 1024.0, 1024.0]
            .into_iter()
            .enumerate()
        {
            let seg = 3 + i * 256;
            assert_eq!(
                &y[seg..seg + 256],
                timestep_embedding(v, 256).as_slice(),
                "segment {i}"
            );
            assert_eq!(
                &y[row + seg..row + seg + 256],
                timestep_embedding(v, 256).as_slice(),
                "row 1 segment {i}"
            );
        }
        let y = sdxl_refiner_adm(&ops, &pooled, &size, AESTHETIC_POSITIVE).unwrap();
        assert_eq!(ops.shape(&y), vec![2, 3 + 5 * 256]);
        let y = ops.to_f32(&y).unwrap();
        for (i, v) in [1216.0, 832.0, 8.0, 16.0, 6.0].into_iter().enumerate() {
            assert_eq!(
                &y[3 + i * 256..3 + (i + 1) * 256],
                timestep_embedding(v, 256).as_slice(),
                "refiner segment {i}"
            );
        }
    }
}
