//! The T5 v1.1 encoder (T5-XXL in SD3 / SD3.5 / FLUX.1), in the layout of
//! ComfyUI's `t5xxl_fp16.safetensors` (Hugging Face `T5EncoderModel` names):
//!
//! - `shared.weight [vocab, d_model]` (or `encoder.embed_tokens.weight`),
//! - `encoder.block.N.layer.0.layer_norm.weight`, `...layer.0.SelfAttention.{q,k,v,o}.weight`,
//!   block 0 also `...SelfAttention.relative_attention_bias.weight [buckets, heads]`,
//! - `encoder.block.N.layer.1.layer_norm.weight`, `...layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight`,
//! - `encoder.final_layer_norm.weight`;
//!
//! optionally under `text_encoders.t5xxl.transformer.` (SD3 single-file checkpoints).
//! The configuration comes from the shapes: T5-XXL is d_model 4096, 64 heads of 64,
//! d_ff 10240, 24 blocks, vocabulary 32128 (ComfyUI `t5_config_xxl.json`).
//!
//! Semantics (ComfyUI `comfy/text_encoders/t5.py`, Hugging Face `modeling_t5.py`):
//! pre-norm blocks with `T5LayerNorm` = RMSNorm without bias, eps 1e-6; attention
//! without the `1/sqrt(d)` scaling (ComfyUI multiplies k by `sqrt(d)` to undo its
//! attention's scaling) plus a relative position bias computed once from block 0's
//! table and shared by every block; gated-GELU feed-forward
//! `wo(gelu_tanh(wi_0 x) * wi_1 x)` (`dense_act_fn` `gelu_pytorch_tanh`); the final
//! RMSNorm. ComfyUI's SD3 and FLUX T5 run without an attention mask (padding tokens
//! are attended to) and return the last hidden state after the final norm, so this
//! does the same. FP8 files are dequantized on load ([`super::file`]); a table
//! decoded from FP8 has its NaN codes read as 0, as ComfyUI's `nan_to_num` does
//! for FP8 embeddings.
//!
//! Every Linear input passes through [`InputHooks::apply`] under its full key
//! without `.weight` (e.g. `encoder.block.3.layer.1.DenseReluDense.wo`). Weights
//! load block by block while the batch goes through.

use anyhow::{Context, Result, bail, ensure};

use crate::formats::decode_source;
use crate::models::{InputHooks, WeightSource};
use crate::nn::{Act, Ops};

/// Key prefix of T5-XXL inside SD3 single-file checkpoints.
pub const SD3_T5_PREFIX: &str = "text_encoders.t5xxl.transformer.";
/// End-of-sequence token, appended to every prompt.
pub const EOS_ID: u32 = 1;
/// Padding token.
pub const PAD_ID: u32 = 0;
/// `T5LayerNorm`'s epsilon.
pub const NORM_EPS: f32 = 1e-6;
/// Relative distances from this on share the last bucket (`relative_attention_max_distance`).
pub const MAX_DISTANCE: usize = 128;

/// One T5 encoder's dimensions, read from its weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct T5Config {
    /// Key prefix (empty for a standalone file).
    pub prefix: String,
    pub d_model: usize,
    pub heads: usize,
    /// Width of one head (`d_kv`).
    pub d_kv: usize,
    pub d_ff: usize,
    pub layers: usize,
    pub vocab: usize,
    /// Relative-position buckets (32).
    pub buckets: usize,
    /// Key of the token embedding table.
    pub embedding_key: String,
}

impl T5Config {
    /// `heads * d_kv`, the width of q, k and v.
    pub fn inner(&self) -> usize {
        self.heads * self.d_kv
    }

    /// Reads the configuration of the T5 encoder under `prefix`.
    pub fn read(src: &dyn WeightSource, prefix: &str) -> Result<T5Config> {
        let block = |i: usize| format!("{prefix}encoder.block.{i}.");
        let q_key = format!("{}layer.0.SelfAttention.q.weight", block(0));
        ensure!(src.contains(&q_key), "no T5 encoder: `{q_key}` is missing");
        let q = shape_of(src, &q_key)?;
        let [inner, d_model] = q[..] else { bail!("`{q_key}` has shape {q:?}, expected [inner, d_model]") };
        let bias_key = format!("{}layer.0.SelfAttention.relative_attention_bias.weight", block(0));
        ensure!(src.contains(&bias_key), "no relative position bias `{bias_key}` in the T5 encoder");
        let rb = shape_of(src, &bias_key)?;
        let [buckets, heads] = rb[..] else { bail!("`{bias_key}` has shape {rb:?}, expected [buckets, heads]") };
        ensure!(
            buckets >= 4 && buckets % 4 == 0 && heads > 0 && inner % heads == 0,
            "`{bias_key}` has shape {rb:?}: {buckets} buckets and {heads} heads do not fit q's {inner} channels"
        );
        let wi0_key = format!("{}layer.1.DenseReluDense.wi_0.weight", block(0));
        if !src.contains(&wi0_key) {
            if src.contains(&format!("{}layer.1.DenseReluDense.wi.weight", block(0))) {
                bail!("the T5 encoder has a non-gated feed-forward (T5 v1.0); only T5 v1.1 (gated GELU, as in T5-XXL) is supported");
            }
            bail!("`{wi0_key}` is missing from the T5 encoder");
        }
        let wi = shape_of(src, &wi0_key)?;
        let [d_ff, wi_in] = wi[..] else { bail!("`{wi0_key}` has shape {wi:?}, expected [d_ff, d_model]") };
        ensure!(wi_in == d_model, "`{wi0_key}` has shape {wi:?}, expected [d_ff, {d_model}]");
        let layers = (0..).take_while(|&i| src.contains(&format!("{}layer.0.SelfAttention.q.weight", block(i)))).count();
        if let Some(i) = (1..layers).find(|&i| src.contains(&format!("{}layer.0.SelfAttention.relative_attention_bias.weight", block(i)))) {
            bail!("T5 block {i} has its own relative position bias (UMT5); only T5 v1.1, with one table in block 0, is supported");
        }
        let embedding_key = [format!("{prefix}shared.weight"), format!("{prefix}encoder.embed_tokens.weight")]
            .into_iter()
            .find(|k| src.contains(k))
            .with_context(|| format!("the T5 encoder has no token embedding `{prefix}shared.weight`"))?;
        let emb = shape_of(src, &embedding_key)?;
        let [vocab, emb_width] = emb[..] else { bail!("`{embedding_key}` has shape {emb:?}, expected [vocab, d_model]") };
        ensure!(emb_width == d_model, "`{embedding_key}` has shape {emb:?}, expected [vocab, {d_model}]");
        Ok(T5Config { prefix: prefix.to_string(), d_model, heads, d_kv: inner / heads, d_ff, layers, vocab, buckets, embedding_key })
    }
}

/// Token ids of a batch of prompts, `[batch, len]` row-major, every row of the same length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct T5Tokens {
    pub ids: Vec<u32>,
    /// Tokens per row.
    pub len: usize,
}

impl T5Tokens {
    pub fn batch(&self) -> usize {
        self.ids.len().checked_div(self.len).unwrap_or(0)
    }

    pub fn row(&self, i: usize) -> &[u32] {
        &self.ids[i * self.len..(i + 1) * self.len]
    }
}

/// The bidirectional relative-position bucket of `relative` = key position −
/// query position (Mesh TensorFlow's `_relative_position_bucket`): half the
/// buckets for keys after the query; in each half, distances below a quarter of
/// the buckets get their own bucket and larger ones logarithmic bins up to
/// `max_distance`, beyond which they share the last bucket.
pub fn relative_position_bucket(relative: i64, buckets: usize, max_distance: usize) -> usize {
    let half = buckets / 2;
    let offset = if relative > 0 { half } else { 0 };
    let distance = relative.unsigned_abs() as usize;
    let exact = half / 2;
    if distance < exact {
        return offset + distance;
    }
    // The reference computes this in f32 and truncates; the only distances where
    // the real value is an integer are exact powers of two times `exact`, where
    // both precisions give the same integer.
    let log_ratio = ((distance as f64 / exact as f64).ln() / (max_distance as f64 / exact as f64).ln() * (half - exact) as f64) as usize;
    offset + (exact + log_ratio).min(half - 1)
}

/// `bias [heads, n, n]` with `bias[h, i, j] = table[bucket(j - i), h]`, from block
/// 0's `relative_attention_bias` `table [buckets, heads]`.
pub fn relative_position_bias(table: &[f32], buckets: usize, heads: usize, n: usize) -> Vec<f32> {
    let bucket_of: Vec<usize> =
        (0..2 * n.max(1) - 1).map(|d| relative_position_bucket(d as i64 - (n as i64 - 1), buckets, MAX_DISTANCE)).collect();
    let mut bias = vec![0.0; heads * n * n];
    for h in 0..heads {
        for i in 0..n {
            for j in 0..n {
                bias[(h * n + i) * n + j] = table[bucket_of[j + n - 1 - i] * heads + h];
            }
        }
    }
    bias
}

/// A T5 encoder over `src` (weights load at encode time).
pub struct T5Encoder<'s> {
    src: &'s dyn WeightSource,
    cfg: T5Config,
}

impl<'s> T5Encoder<'s> {
    pub fn load(src: &'s dyn WeightSource, prefix: &str) -> Result<T5Encoder<'s>> {
        let cfg = T5Config::read(src, prefix).with_context(|| format!("cannot use the T5 encoder `{prefix}*`"))?;
        Ok(T5Encoder { src, cfg })
    }

    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// The last hidden state after the final norm, `[batch, len, d_model]`.
    pub fn encode<O: Ops>(&self, ops: &O, tokens: &T5Tokens, hooks: &InputHooks) -> Result<O::Tensor> {
        let (cfg, src) = (&self.cfg, self.src);
        let (b, n, d) = (tokens.batch(), tokens.len, cfg.d_model);
        ensure!(b > 0 && n > 0 && tokens.ids.len() == b * n, "T5 token batch has {} ids in rows of {n}", tokens.ids.len());
        if let Some(&id) = tokens.ids.iter().find(|&&id| id as usize >= cfg.vocab) {
            bail!("token id {id} is outside the T5 encoder's vocabulary ({} tokens)", cfg.vocab);
        }
        let mut x = {
            let rows = embedding_rows(src, &cfg.embedding_key, cfg.vocab, d, &tokens.ids)?;
            ops.from_f32(&[b, n, d], &rows)?
        };
        let bias = {
            let key = format!("{}encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", cfg.prefix);
            let table = host_values(src, &key, &[cfg.buckets, cfg.heads])?;
            ops.from_f32(&[cfg.heads, n, n], &relative_position_bias(&table, cfg.buckets, cfg.heads, n))?
        };
        for i in 0..cfg.layers {
            x = self.block(ops, hooks, &format!("{}encoder.block.{i}.", cfg.prefix), &x, &bias)?;
        }
        rms_norm(ops, src, &format!("{}encoder.final_layer_norm.weight", cfg.prefix), d, &x)
    }

    fn block<O: Ops>(&self, ops: &O, hooks: &InputHooks, l: &str, x: &O::Tensor, bias: &O::Tensor) -> Result<O::Tensor> {
        let (cfg, src) = (&self.cfg, self.src);
        let (d, inner, ff) = (cfg.d_model, cfg.inner(), cfg.d_ff);
        let attn = format!("{l}layer.0.SelfAttention.");
        let h = rms_norm(ops, src, &format!("{l}layer.0.layer_norm.weight"), d, x)?;
        let q = linear(ops, src, hooks, &format!("{attn}q"), &h, inner, d)?;
        let k = linear(ops, src, hooks, &format!("{attn}k"), &h, inner, d)?;
        let v = linear(ops, src, hooks, &format!("{attn}v"), &h, inner, d)?;
        let a = ops.attention_biased(&q, &k, &v, cfg.heads, bias, 1.0)?;
        drop((q, k, v));
        let x = ops.add(x, &linear(ops, src, hooks, &format!("{attn}o"), &a, d, inner)?)?;
        let dense = format!("{l}layer.1.DenseReluDense.");
        let h = rms_norm(ops, src, &format!("{l}layer.1.layer_norm.weight"), d, &x)?;
        let gate = ops.act(&linear(ops, src, hooks, &format!("{dense}wi_0"), &h, ff, d)?, Act::GeluTanh)?;
        let h = ops.mul(&gate, &linear(ops, src, hooks, &format!("{dense}wi_1"), &h, ff, d)?)?;
        drop(gate);
        ops.add(&x, &linear(ops, src, hooks, &format!("{dense}wo"), &h, d, ff)?)
    }
}

fn shape_of(src: &dyn WeightSource, key: &str) -> Result<Vec<usize>> {
    if let Some((shape, _)) = src.dequantized(key)? {
        return Ok(shape);
    }
    Ok(src.tensor(key)?.0)
}

/// A weight of the expected shape on the backend, dequantized when stored as FP8.
fn load<O: Ops>(ops: &O, src: &dyn WeightSource, key: &str, shape: &[usize]) -> Result<O::Tensor> {
    if let Some((stored, values)) = src.dequantized(key)? {
        ensure!(stored == shape, "T5 tensor `{key}` has shape {stored:?}, expected {shape:?}");
        return ops.from_f32(shape, &values).with_context(|| format!("cannot load `{key}`"));
    }
    let (stored, view) = src.tensor(key)?;
    ensure!(stored == shape, "T5 tensor `{key}` has shape {stored:?}, expected {shape:?}");
    ops.weight(shape, &view).with_context(|| format!("cannot load `{key}`"))
}

/// A tensor of the expected shape as host f32 (FP8 NaN codes read as 0).
fn host_values(src: &dyn WeightSource, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
    if let Some((stored, mut values)) = src.dequantized(key)? {
        ensure!(stored == shape, "T5 tensor `{key}` has shape {stored:?}, expected {shape:?}");
        values.iter_mut().filter(|v| v.is_nan()).for_each(|v| *v = 0.0);
        return Ok(values);
    }
    let (stored, view) = src.tensor(key)?;
    ensure!(stored == shape, "T5 tensor `{key}` has shape {stored:?}, expected {shape:?}");
    decode_source(&view).with_context(|| format!("cannot read `{key}`"))
}

/// The rows of the embedding table for `ids`, gathered on the host (the table
/// is 32128 x 4096 and a prompt batch uses a few hundred of its rows).
fn embedding_rows(src: &dyn WeightSource, key: &str, vocab: usize, d: usize, ids: &[u32]) -> Result<Vec<f32>> {
    if src.dequantized(key)?.is_some() {
        let table = host_values(src, key, &[vocab, d])?;
        return Ok(ids.iter().flat_map(|&id| table[id as usize * d..(id as usize + 1) * d].iter().copied()).collect());
    }
    let (stored, view) = src.tensor(key)?;
    ensure!(stored == [vocab, d], "T5 tensor `{key}` has shape {stored:?}, expected [{vocab}, {d}]");
    let size = view.dtype.size();
    let mut out = Vec::with_capacity(ids.len() * d);
    for &id in ids {
        let start = id as usize * d * size;
        let bytes = view.bytes.get(start..start + d * size).with_context(|| format!("`{key}` is shorter than its shape says"))?;
        let row = crate::formats::WeightView { name: view.name, dtype: view.dtype, rows: 1, cols: d, bytes };
        out.extend(decode_source(&row).with_context(|| format!("cannot read `{key}`"))?);
    }
    Ok(out)
}

fn rms_norm<O: Ops>(ops: &O, src: &dyn WeightSource, key: &str, d: usize, x: &O::Tensor) -> Result<O::Tensor> {
    let w = load(ops, src, key, &[d])?;
    ops.rms_norm(x, &w, NORM_EPS)
}

/// `module(x)` for a Linear without bias, `x` passing through the module's input hook.
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
    let x = hooks.apply(ops, module, x)?;
    ops.linear(&x, &w, None)
}

#[cfg(test)]
#[path = "t5_tests.rs"]
pub(crate) mod tests;
