//! Synthetic standalone text-encoder files with the real layouts of ComfyUI's
//! `clip_l.safetensors`, `clip_g.safetensors` and `t5xxl_fp16.safetensors` (or
//! `t5xxl_fp8_e4m3fn_scaled.safetensors`), at full size or tiny (same keys,
//! narrow widths, the real vocabularies so real tokenizers fit). Written streaming,
//! one tensor at a time, so a full-size T5-XXL (9.5 GB in fp16) needs no more
//! memory than its largest tensor.
//!
//! Weights are seeded uniform values scaled by `1/sqrt(fan_in)`, norm weights
//! around 1: the encoders give finite, unit-scale outputs, which is all the
//! calibration of a diffusion model needs from them.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::Dtype;

use crate::checkpoint::writer::{PlannedTensor, StreamingWriter};
use crate::formats::numerics::e4m3_from_f32;
use crate::models::text::file::{SCALED_FP8_MARKER, encode_values};

/// Widths of the tiny encoders (`synth clip-l|clip-g|t5xxl --scale tiny`). T5's
/// is wider than CLIP-L's and OpenCLIP-G's together, as T5-XXL's 4096 is wider
/// than 768 + 1280: SD3 pads the joined CLIP states to T5's width, so tiny
/// diffusion transformers built for these ([`crate::synth::SynthOptions::tiny_text`])
/// run prompts end to end in CI-sized tests.
pub const TINY_CLIP_L_WIDTH: usize = 64;
pub const TINY_CLIP_G_WIDTH: usize = 128;
pub const TINY_T5_WIDTH: usize = 256;

/// Which encoder to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthEncoder {
    ClipL,
    ClipG,
    T5Xxl,
}

/// Dimensions of a synthetic encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncoderDims {
    pub vocab: usize,
    pub width: usize,
    pub layers: usize,
    /// MLP width (CLIP) or `d_ff` (T5).
    pub mlp: usize,
    /// T5's heads (CLIP's heads are `width / 64`).
    pub heads: usize,
    /// CLIP's positions (77); T5's relative-position buckets (32).
    pub positions: usize,
}

impl SynthEncoder {
    /// Real dimensions (`full`) or tiny ones with the same keys.
    pub fn dims(self, full: bool) -> EncoderDims {
        match (self, full) {
            (SynthEncoder::ClipL, true) => EncoderDims { vocab: 49408, width: 768, layers: 12, mlp: 3072, heads: 12, positions: 77 },
            (SynthEncoder::ClipL, false) => {
                EncoderDims { vocab: 49408, width: TINY_CLIP_L_WIDTH, layers: 2, mlp: 128, heads: 1, positions: 77 }
            }
            (SynthEncoder::ClipG, true) => EncoderDims { vocab: 49408, width: 1280, layers: 32, mlp: 5120, heads: 20, positions: 77 },
            (SynthEncoder::ClipG, false) => {
                EncoderDims { vocab: 49408, width: TINY_CLIP_G_WIDTH, layers: 3, mlp: 256, heads: 2, positions: 77 }
            }
            (SynthEncoder::T5Xxl, true) => EncoderDims { vocab: 32128, width: 4096, layers: 24, mlp: 10240, heads: 64, positions: 32 },
            (SynthEncoder::T5Xxl, false) => {
                EncoderDims { vocab: 32128, width: TINY_T5_WIDTH, layers: 2, mlp: 256, heads: 4, positions: 32 }
            }
        }
    }
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy)]
enum Init {
    /// Uniform in `±spread`.
    Spread(f32),
    /// Around 1 (norm weights).
    Norm,
}

/// (key, shape, init, is a Linear weight) in file order.
fn layout(kind: SynthEncoder, d: EncoderDims) -> Vec<(String, Vec<usize>, Init, bool)> {
    let mut t = Vec::new();
    let lin = |fan_in: usize| Init::Spread(1.5 / (fan_in as f32).sqrt());
    match kind {
        SynthEncoder::ClipL | SynthEncoder::ClipG => {
            let (w, m) = (d.width, d.mlp);
            let p = "text_model.";
            t.push((format!("{p}embeddings.token_embedding.weight"), vec![d.vocab, w], Init::Spread(1.0), false));
            t.push((format!("{p}embeddings.position_embedding.weight"), vec![d.positions, w], Init::Spread(0.5), false));
            for i in 0..d.layers {
                let l = format!("{p}encoder.layers.{i}.");
                for (name, out, inp) in [
                    ("self_attn.q_proj", w, w),
                    ("self_attn.k_proj", w, w),
                    ("self_attn.v_proj", w, w),
                    ("self_attn.out_proj", w, w),
                    ("mlp.fc1", m, w),
                    ("mlp.fc2", w, m),
                ] {
                    t.push((format!("{l}{name}.weight"), vec![out, inp], lin(inp), true));
                    t.push((format!("{l}{name}.bias"), vec![out], Init::Spread(0.05), false));
                }
                for n in ["layer_norm1", "layer_norm2"] {
                    t.push((format!("{l}{n}.weight"), vec![w], Init::Norm, false));
                    t.push((format!("{l}{n}.bias"), vec![w], Init::Spread(0.05), false));
                }
            }
            t.push((format!("{p}final_layer_norm.weight"), vec![w], Init::Norm, false));
            t.push((format!("{p}final_layer_norm.bias"), vec![w], Init::Spread(0.05), false));
            if kind == SynthEncoder::ClipG {
                t.push(("text_projection.weight".into(), vec![w, w], lin(w), true));
            }
        }
        SynthEncoder::T5Xxl => {
            let (w, ff, inner) = (d.width, d.mlp, d.width);
            t.push(("shared.weight".into(), vec![d.vocab, w], Init::Spread(1.0), false));
            for i in 0..d.layers {
                let l = format!("encoder.block.{i}.");
                for n in ["q", "k", "v"] {
                    t.push((format!("{l}layer.0.SelfAttention.{n}.weight"), vec![inner, w], lin(w), true));
                }
                t.push((format!("{l}layer.0.SelfAttention.o.weight"), vec![w, inner], lin(inner), true));
                if i == 0 {
                    t.push((
                        format!("{l}layer.0.SelfAttention.relative_attention_bias.weight"),
                        vec![d.positions, d.heads],
                        Init::Spread(1.0),
                        false,
                    ));
                }
                t.push((format!("{l}layer.0.layer_norm.weight"), vec![w], Init::Norm, false));
                t.push((format!("{l}layer.1.DenseReluDense.wi_0.weight"), vec![ff, w], lin(w), true));
                t.push((format!("{l}layer.1.DenseReluDense.wi_1.weight"), vec![ff, w], lin(w), true));
                t.push((format!("{l}layer.1.DenseReluDense.wo.weight"), vec![w, ff], lin(ff), true));
                t.push((format!("{l}layer.1.layer_norm.weight"), vec![w], Init::Norm, false));
            }
            t.push(("encoder.final_layer_norm.weight".into(), vec![w], Init::Norm, false));
        }
    }
    t
}

/// Writes a synthetic encoder to `path` with every tensor in `dtype` (F32, F16 or
/// BF16); `scaled_fp8` (T5 only) stores the Linear weights as ComfyUI's scaled
/// FP8 instead. Returns the bytes of tensor data written.
pub fn write(path: &Path, kind: SynthEncoder, full: bool, dtype: Dtype, scaled_fp8: bool, seed: u64) -> Result<u64> {
    if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        bail!("synthetic text encoders are written in F32, F16 or BF16, not {dtype:?}");
    }
    if scaled_fp8 && kind != SynthEncoder::T5Xxl {
        bail!("only T5-XXL has a scaled-FP8 release in ComfyUI");
    }
    let tensors = layout(kind, kind.dims(full));
    let mut planned = Vec::new();
    if scaled_fp8 {
        planned.push(PlannedTensor { name: SCALED_FP8_MARKER.into(), dtype: Dtype::F8_E4M3, shape: vec![0] });
    }
    for (key, shape, _, linear) in &tensors {
        if scaled_fp8 && *linear {
            planned.push(PlannedTensor { name: key.clone(), dtype: Dtype::F8_E4M3, shape: shape.clone() });
            let module = key.strip_suffix(".weight").unwrap_or(key);
            planned.push(PlannedTensor { name: format!("{module}.scale_weight"), dtype: Dtype::F32, shape: vec![] });
        } else {
            planned.push(PlannedTensor { name: key.clone(), dtype, shape: shape.clone() });
        }
    }
    let mut writer = StreamingWriter::create(path, planned, HashMap::new())?;
    if scaled_fp8 {
        writer.write(SCALED_FP8_MARKER, &[])?;
    }
    for (i, (key, shape, init, linear)) in tensors.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
        let n: usize = shape.iter().product();
        let values: Vec<f32> = match *init {
            Init::Spread(s) => (0..n).map(|_| s * (rng.random::<f32>() * 2.0 - 1.0)).collect(),
            Init::Norm => (0..n).map(|_| 1.0 + 0.2 * (rng.random::<f32>() * 2.0 - 1.0)).collect(),
        };
        if scaled_fp8 && *linear {
            let amax = values.iter().fold(0.0f32, |a, v| a.max(v.abs())).max(f32::MIN_POSITIVE);
            let scale = amax / 448.0;
            let codes: Vec<u8> = values.iter().map(|v| e4m3_from_f32(v / scale)).collect();
            writer.write(key, &codes)?;
            let module = key.strip_suffix(".weight").unwrap_or(key);
            writer.write(&format!("{module}.scale_weight"), &scale.to_le_bytes())?;
        } else {
            writer.write(key, &encode_values(dtype, &values)?)?;
        }
    }
    let written = writer.bytes_written();
    writer.finish()?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::InputHooks;
    use crate::models::WeightSource;
    use crate::models::clip::{HfClip, HfTower};
    use crate::models::text::detect::{self, EncoderKind};
    use crate::models::text::t5::{T5Encoder, T5Tokens};
    use crate::models::tokenizer::{CONTEXT_LENGTH, TokenBatch};
    use crate::nn::Ops;
    use crate::nn::cpu::CpuOps;

    #[test]
    fn tiny_synthetic_encoders_are_detected_and_run() {
        let ops = CpuOps::new();
        let dir = tempfile::tempdir().unwrap();
        let mut ids = vec![49406, 320, 2368, 49407];
        ids.resize(CONTEXT_LENGTH, 49407);
        let clip_tokens = TokenBatch { ids, end_index: vec![3] };
        for (kind, tower, name, width) in [
            (SynthEncoder::ClipL, HfTower::ClipL, "clip_l.safetensors", 64),
            (SynthEncoder::ClipG, HfTower::ClipG, "clip_g.safetensors", 128),
        ] {
            let path = dir.path().join(name);
            write(&path, kind, false, Dtype::BF16, false, 1).unwrap();
            let (file, found) = detect::open(&path).unwrap();
            let want = if tower == HfTower::ClipL { EncoderKind::ClipL } else { EncoderKind::ClipG };
            assert_eq!((found.len(), found[0].kind, found[0].width, found[0].prefix.as_str()), (1, want, width, "text_model."));
            let (hidden, pooled) =
                HfClip::load(&file, "text_model.", tower).unwrap().encode(&ops, &clip_tokens, &InputHooks::none()).unwrap();
            assert_eq!((ops.shape(&hidden), ops.shape(&pooled)), (vec![1, CONTEXT_LENGTH, width], vec![1, width]));
            assert!(ops.to_f32(&pooled).unwrap().iter().all(|v| v.is_finite()));
        }
        for scaled in [false, true] {
            let path = dir.path().join(format!("t5_{scaled}.safetensors"));
            write(&path, SynthEncoder::T5Xxl, false, Dtype::F16, scaled, 2).unwrap();
            let (file, found) = detect::open(&path).unwrap();
            assert_eq!((found[0].kind, found[0].width, found[0].layers, found[0].fp8), (EncoderKind::T5, TINY_T5_WIDTH, 2, scaled));
            assert_eq!(file.is_scaled_fp8(), scaled);
            assert_eq!(file.dequantized("encoder.block.1.layer.1.DenseReluDense.wo.weight").unwrap().is_some(), scaled);
            let enc = T5Encoder::load(&file, "").unwrap();
            assert_eq!((enc.config().heads, enc.config().d_kv, enc.config().vocab), (4, 64, 32128));
            let out = enc.encode(&ops, &T5Tokens { ids: vec![71, 1712, 1, 0], len: 4 }, &InputHooks::none()).unwrap();
            assert!(ops.to_f32(&out).unwrap().iter().all(|v| v.is_finite()));
        }
        assert!(write(&dir.path().join("x"), SynthEncoder::ClipL, false, Dtype::F16, true, 0).is_err());
    }

    #[test]
    fn full_dims_are_the_real_ones() {
        let t5 = layout(SynthEncoder::T5Xxl, SynthEncoder::T5Xxl.dims(true));
        let params: usize = t5.iter().map(|(_, s, _, _)| s.iter().product::<usize>()).sum();
        // T5-XXL's encoder with its embedding: 4.76e9 parameters (9.5 GB in fp16).
        assert_eq!(params, 32128 * 4096 + 24 * (4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096) + 32 * 64 + 4096);
        let g = layout(SynthEncoder::ClipG, SynthEncoder::ClipG.dims(true));
        assert!(g.iter().any(|(k, s, _, _)| k == "text_model.encoder.layers.31.mlp.fc1.weight" && s == &vec![5120, 1280]));
        assert!(g.iter().any(|(k, s, _, _)| k == "text_projection.weight" && s == &vec![1280, 1280]));
    }
}
