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
    ensure!(tokens.is_multiple_of(n), "internal: {tokens} tokens is not a multiple of {n}");
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
            read_config(src, prefix, layout).with_context(|| format!("cannot use the {family:?} text encoder `{prefix}*`"))
        };
        let clip_l = l.map(|p| read(p, Layout::Hf).map(|cfg| Encoder { cfg, layout: Layout::Hf })).transpose()?;
        let clip_g = g.map(|p| read(p, Layout::OpenClip).map(|cfg| Encoder { cfg, layout: Layout::OpenClip })).transpose()?;
        Ok(TextEncoders { src, family, clip_l, clip_g })
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
    pub fn tokenize<S: AsRef<str>>(&self, tokenizer: &ClipTokenizer, prompts: &[S]) -> Result<PromptTokens> {
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
    pub fn encode_tokens<O: Ops>(&self, ops: &O, tokens: &PromptTokens, hooks: &InputHooks) -> Result<Conditioning<O::Tensor>> {
        let batch_of = |e: &Option<Encoder>, t: &Option<TokenBatch>, name: &str| -> Result<Option<usize>> {
            match (e, t) {
                (Some(_), Some(t)) => Ok(Some(t.batch())),
                (Some(e), None) => {
                    bail!("no {name} tokens for the text encoder `{}*`", e.cfg.prefix)
                }
                (None, _) => Ok(None),
            }
        };
        let (bl, bg) = (batch_of(&self.clip_l, &tokens.clip_l, "CLIP-L")?, batch_of(&self.clip_g, &tokens.clip_g, "bigG")?);
        if let (Some(bl), Some(bg)) = (bl, bg) {
            ensure!(bl == bg, "CLIP-L has {bl} prompts but bigG {bg}");
        }
        let mut context = Vec::with_capacity(2);
        let mut pooled = None;
        if let (Some(e), Some(t)) = (&self.clip_l, &tokens.clip_l) {
            let wanted = if self.family == TextFamily::Sd15 { Wanted::FinalNorm } else { Wanted::Penultimate };
            context.push(self.forward(ops, e, t, wanted, hooks)?.0);
        }
        if let (Some(e), Some(t)) = (&self.clip_g, &tokens.clip_g) {
            let wanted = if self.family == TextFamily::Sd2 { Wanted::PenultimateFinalNorm } else { Wanted::PenultimateAndPooled };
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
        let pooled = || cond.pooled.as_ref().context("the conditioning has no pooled output");
        match self.family {
            TextFamily::Sd15 | TextFamily::Sd2 => Ok(None),
            TextFamily::Sdxl => sdxl_adm(ops, pooled()?, size).map(Some),
            TextFamily::SdxlRefiner => {
                let score = if negative { AESTHETIC_NEGATIVE } else { AESTHETIC_POSITIVE };
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
    ensure!(tokens.ids.len() == b * CONTEXT_LENGTH, "token batch has {} ids for {b} prompts", tokens.ids.len());
    if let Some(&id) = tokens.ids.iter().find(|&&id| id as usize >= cfg.vocab) {
        bail!("token id {id} is outside the vocabulary ({} tokens) of the text encoder `{p}*`", cfg.vocab);
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
    let run = if matches!(wanted, Wanted::Penultimate | Wanted::PenultimateFinalNorm) { cfg.layers - 1 } else { cfg.layers };
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
    let penultimate = || penultimate.clone().context("internal: penultimate hidden state not kept");
    match (wanted, layout) {
        (Wanted::FinalNorm, Layout::Hf) => Ok((layer_norm(ops, src, &format!("{p}final_layer_norm"), d, &x)?, None)),
        (Wanted::Penultimate, _) => Ok((penultimate()?, None)),
        (Wanted::PenultimateFinalNorm, Layout::OpenClip) => Ok((layer_norm(ops, src, &format!("{p}ln_final"), d, &penultimate()?)?, None)),
        (Wanted::PenultimateAndPooled, Layout::OpenClip) => {
            // LayerNorm is per token, so selecting the end tokens first is the same and cheaper.
            let last = ops.select_tokens(&x, &tokens.end_index)?;
            let last = layer_norm(ops, src, &format!("{p}ln_final"), d, &last)?;
            let module = format!("{p}text_projection");
            let (shape, view) = src.tensor(&module)?;
            let out = cfg.projection.context("internal: bigG without projection")?;
            ensure!(shape == [d, out], "`{module}` has shape {shape:?}, expected [{d}, {out}]");
            let stored = decode_source(&view).with_context(|| format!("cannot read `{module}`"))?;
            // Stored as [in, out] for `x @ P`; a Linear weight is [out, in].
            let stored = &stored;
            let transposed: Vec<f32> = (0..out).flat_map(|o| (0..d).map(move |i| stored[i * out + o])).collect();
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
    let [vocab, width] = emb[..] else { bail!("`{probe}` has shape {emb:?}, expected [vocab, width]") };
    let (pos, _) = src.tensor(&layout.position_key(prefix))?;
    ensure!(
        pos.len() == 2 && pos[0] >= CONTEXT_LENGTH && pos[1] == width,
        "`{}` has shape {pos:?}, expected [>= {CONTEXT_LENGTH}, {width}]",
        layout.position_key(prefix)
    );
    let layers = (0..).take_while(|&i| src.contains(&format!("{}{}.weight", layout.layer_prefix(prefix, i), layout.mlp_in()))).count();
    ensure!(layers > 0, "no transformer layers under `{}`", layout.layer_prefix(prefix, 0));
    let mlp_key = format!("{}{}.weight", layout.layer_prefix(prefix, 0), layout.mlp_in());
    let (mlp, _) = src.tensor(&mlp_key)?;
    ensure!(mlp.len() == 2 && mlp[1] == width, "`{mlp_key}` has shape {mlp:?}, expected [mlp, {width}]");
    let projection = match layout {
        Layout::Hf => None,
        Layout::OpenClip => {
            let key = format!("{prefix}text_projection");
            let (shape, _) = src.tensor(&key)?;
            ensure!(shape.len() == 2 && shape[0] == width, "`{key}` has shape {shape:?}, expected [{width}, out]");
            Some(shape[1])
        }
    };
    let heads = (width / HEAD_WIDTH).max(1);
    ensure!(width % heads == 0, "width {width} does not split into {heads} heads");
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
    ensure!(stored == shape, "text encoder tensor `{key}` has shape {stored:?}, expected {shape:?}");
    ops.weight(shape, &view).with_context(|| format!("cannot load `{key}`"))
}

fn layer_norm<O: Ops>(ops: &O, src: &dyn WeightSource, module: &str, d: usize, x: &O::Tensor) -> Result<O::Tensor> {
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
fn hf_layer<O: Ops>(ops: &O, src: &dyn WeightSource, hooks: &InputHooks, l: &str, cfg: &EncoderConfig, x: &O::Tensor) -> Result<O::Tensor> {
    let d = cfg.width;
    let h = layer_norm(ops, src, &format!("{l}layer_norm1"), d, x)?;
    let q = linear(ops, src, hooks, &format!("{l}self_attn.q_proj"), &h, d, d)?;
    let k = linear(ops, src, hooks, &format!("{l}self_attn.k_proj"), &h, d, d)?;
    let v = linear(ops, src, hooks, &format!("{l}self_attn.v_proj"), &h, d, d)?;
    let a = ops.attention(&q, &k, &v, cfg.heads, true)?;
    let x = ops.add(x, &linear(ops, src, hooks, &format!("{l}self_attn.out_proj"), &a, d, d)?)?;
    let h = layer_norm(ops, src, &format!("{l}layer_norm2"), d, &x)?;
    let h = ops.act(&linear(ops, src, hooks, &format!("{l}mlp.fc1"), &h, cfg.mlp_width, d)?, cfg.act)?;
    ops.add(&x, &linear(ops, src, hooks, &format!("{l}mlp.fc2"), &h, d, cfg.mlp_width)?)
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
    let (w_key, b_key) = (format!("{l}attn.in_proj_weight"), format!("{l}attn.in_proj_bias"));
    let (w_shape, w_view) = src.tensor(&w_key)?;
    let (b_shape, b_view) = src.tensor(&b_key)?;
    ensure!(w_shape == [3 * d, d], "`{w_key}` has shape {w_shape:?}, expected [{}, {d}]", 3 * d);
    ensure!(b_shape == [3 * d], "`{b_key}` has shape {b_shape:?}, expected [{}]", 3 * d);
    // q, k, v are consecutive row blocks of the packed projection.
    let mut qkv = Vec::with_capacity(3);
    for part in 0..3 {
        let w = ops.weight(&[d, d], &elements(&w_view, part * d * d, d, d)?)?;
        let b = ops.weight(&[d], &elements(&b_view, part * d, 1, d)?)?;
        qkv.push(ops.linear(&h, &w, Some(&b))?);
    }
    let a = ops.attention(&qkv[0], &qkv[1], &qkv[2], cfg.heads, true)?;
    drop(qkv);
    let x = ops.add(x, &linear(ops, src, hooks, &format!("{l}attn.out_proj"), &a, d, d)?)?;
    let h = layer_norm(ops, src, &format!("{l}ln_2"), d, &x)?;
    let h = ops.act(&linear(ops, src, hooks, &format!("{l}mlp.c_fc"), &h, cfg.mlp_width, d)?, Act::Gelu)?;
    ops.add(&x, &linear(ops, src, hooks, &format!("{l}mlp.c_proj"), &h, d, cfg.mlp_width)?)
}

/// `rows x cols` consecutive elements of `view` from element `start`.
fn elements<'a>(view: &WeightView<'a>, start: usize, rows: usize, cols: usize) -> Result<WeightView<'a>> {
    let size = view.dtype.size();
    let range = start * size..(start + rows * cols) * size;
    ensure!(range.end <= view.bytes.len(), "`{}` is shorter than its shape says", view.name);
    Ok(WeightView { name: view.name, dtype: view.dtype, rows, cols, bytes: &view.bytes[range] })
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
        SizeConditioning { width, height, crop_left: 0, crop_top: 0, target_width: width, target_height: height }
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
    if adm_channels == REFINER_ADM_CHANNELS { sdxl_refiner_adm(ops, pooled, size, AESTHETIC_POSITIVE) } else { sdxl_adm(ops, pooled, size) }
}

/// SDXL base `y` `[B, P + 6*256]`: pooled, then the embeddings of height, width,
/// crop top, crop left, target height, target width (sgm's
/// `ConcatTimestepEmbedderND`, ComfyUI's `SDXL.encode_adm`).
pub fn sdxl_adm<O: Ops>(ops: &O, pooled: &O::Tensor, size: &SizeConditioning) -> Result<O::Tensor> {
    let s = size;
    let values = [s.height, s.width, s.crop_top, s.crop_left, s.target_height, s.target_width].map(|v| v as f32);
    append_embeddings(ops, pooled, &values)
}

/// SDXL refiner `y` `[B, P + 5*256]`: pooled, then the embeddings of height,
/// width, crop top, crop left and the aesthetic score (ComfyUI's
/// `SDXLRefiner.encode_adm`; [`AESTHETIC_POSITIVE`] / [`AESTHETIC_NEGATIVE`]).
pub fn sdxl_refiner_adm<O: Ops>(ops: &O, pooled: &O::Tensor, size: &SizeConditioning, aesthetic_score: f32) -> Result<O::Tensor> {
    let s = size;
    let values = [s.height as f32, s.width as f32, s.crop_top as f32, s.crop_left as f32, aesthetic_score];
    append_embeddings(ops, pooled, &values)
}

fn append_embeddings<O: Ops>(ops: &O, pooled: &O::Tensor, values: &[f32]) -> Result<O::Tensor> {
    let shape = ops.shape(pooled);
    let [b, _] = shape[..] else { bail!("pooled output has shape {shape:?}, expected [batch, width]") };
    let row: Vec<f32> = values.iter().flat_map(|&v| timestep_embedding(v, SIZE_EMBEDDING_WIDTH)).collect();
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
    let args: Vec<f32> = (0..half).map(|i| value * (neg_log_period * i as f32 / half as f32).exp()).collect();
    let mut out: Vec<f32> = args.iter().map(|&a| (a as f64).cos() as f32).collect();
    out.extend(args.iter().map(|&a| (a as f64).sin() as f32));
    out.resize(dim, 0.0);
    out
}

#[cfg(test)]
#[path = "clip_tests.rs"]
mod tests;
