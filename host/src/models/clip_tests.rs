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
        let (name, (shape, bytes)) = self.0.get_key_value(key).with_context(|| format!("no tensor `{key}`"))?;
        let cols = *shape.last().unwrap();
        Ok((shape.clone(), WeightView { name, dtype: SourceDtype::F32, rows: bytes.len() / 4 / cols, cols, bytes }))
    }
    fn contains(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }
}

impl Memory {
    fn put(&mut self, key: String, shape: &[usize], values: Vec<f32>) {
        assert_eq!(shape.iter().product::<usize>(), values.len());
        self.0.insert(key, (shape.to_vec(), values.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    fn get(&self, key: &str) -> Vec<f32> {
        self.0[key].1.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }
    fn random(&mut self, rng: &mut StdRng, key: String, shape: &[usize], center: f32, spread: f32) {
        let n = shape.iter().product();
        self.put(key, shape, (0..n).map(|_| center + spread * (rng.random::<f32>() * 2.0 - 1.0)).collect());
    }
    fn linear(&mut self, rng: &mut StdRng, module: &str, out: usize, inp: usize) {
        self.random(rng, format!("{module}.weight"), &[out, inp], 0.0, 1.5 / (inp as f32).sqrt());
        self.random(rng, format!("{module}.bias"), &[out], 0.0, 0.1);
    }
    fn norm(&mut self, rng: &mut StdRng, module: &str, d: usize) {
        self.random(rng, format!("{module}.weight"), &[d], 1.0, 0.2);
        self.random(rng, format!("{module}.bias"), &[d], 0.0, 0.2);
    }
    /// Hugging Face CLIPTextModel names.
    fn hf_clip(&mut self, rng: &mut StdRng, p: &str, Dims { vocab, width: d, mlp, layers }: Dims) {
        self.random(rng, format!("{p}embeddings.token_embedding.weight"), &[vocab, d], 0.0, 1.0);
        self.random(rng, format!("{p}embeddings.position_embedding.weight"), &[CONTEXT_LENGTH, d], 0.0, 0.5);
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
    fn open_clip(&mut self, rng: &mut StdRng, p: &str, Dims { vocab, width: d, mlp, layers }: Dims, proj: usize) {
        self.random(rng, format!("{p}token_embedding.weight"), &[vocab, d], 0.0, 1.0);
        self.random(rng, format!("{p}positional_embedding"), &[CONTEXT_LENGTH, d], 0.0, 0.5);
        for i in 0..layers {
            let r = format!("{p}transformer.resblocks.{i}.");
            self.norm(rng, &format!("{r}ln_1"), d);
            self.random(rng, format!("{r}attn.in_proj_weight"), &[3 * d, d], 0.0, 1.5 / (d as f32).sqrt());
            self.random(rng, format!("{r}attn.in_proj_bias"), &[3 * d], 0.0, 0.1);
            self.linear(rng, &format!("{r}attn.out_proj"), d, d);
            self.norm(rng, &format!("{r}ln_2"), d);
            self.linear(rng, &format!("{r}mlp.c_fc"), mlp, d);
            self.linear(rng, &format!("{r}mlp.c_proj"), d, mlp);
        }
        self.norm(rng, &format!("{p}ln_final"), d);
        self.random(rng, format!("{p}text_projection"), &[d, proj], 0.0, 1.0 / (d as f32).sqrt());
    }
}

// ---- Naive reference, one prompt at a time, straight from the definitions.

fn naive_ln(x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let d = w.len();
    x.chunks(d)
        .flat_map(|row| {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            (0..d).map(move |i| (((row[i] as f64 - mean) / (var + 1e-5).sqrt()) as f32) * w[i] + b[i])
        })
        .collect()
}

/// `x [n, inp] @ w[out, inp]^T + b`.
fn naive_linear(x: &[f32], w: &[f32], b: Option<&[f32]>, out: usize) -> Vec<f32> {
    let inp = w.len() / out;
    x.chunks(inp)
        .flat_map(|row| (0..out).map(move |o| (0..inp).map(|i| row[i] * w[o * inp + i]).sum::<f32>() + b.map_or(0.0, |b| b[o])))
        .collect()
}

fn naive_causal_attention(q: &[f32], k: &[f32], v: &[f32], d: usize, heads: usize) -> Vec<f32> {
    let (n, hd) = (q.len() / d, d / heads);
    let mut out = vec![0.0; q.len()];
    for h in 0..heads {
        for i in 0..n {
            let dot = |j: usize| (0..hd).map(|e| q[i * d + h * hd + e] * k[j * d + h * hd + e]).sum::<f32>() / (hd as f32).sqrt();
            let scores: Vec<f32> = (0..=i).map(dot).collect();
            let max = scores.iter().copied().fold(f32::MIN, f32::max);
            let exp: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            for e in 0..hd {
                out[i * d + h * hd + e] = (0..=i).map(|j| exp[j] / sum * v[j * d + h * hd + e]).sum();
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
                    + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 { 1.0 - erfc } else { erfc - 1.0 }
}

fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// Hidden states after each layer (index 0 = embeddings) of one prompt.
fn naive_hidden(m: &Memory, p: &str, layout: Layout, ids: &[u32], d: usize, heads: usize) -> Vec<Vec<f32>> {
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
                let h = naive_ln(&x, &g(&format!("{l}layer_norm1.weight")), &g(&format!("{l}layer_norm1.bias")));
                let proj = |name: &str, input: &[f32]| {
                    naive_linear(input, &g(&format!("{l}{name}.weight")), Some(&g(&format!("{l}{name}.bias"))), d)
                };
                let a = naive_causal_attention(
                    &proj("self_attn.q_proj", &h),
                    &proj("self_attn.k_proj", &h),
                    &proj("self_attn.v_proj", &h),
                    d,
                    heads,
                );
                let x = add(&x, &proj("self_attn.out_proj", &a));
                let h = naive_ln(&x, &g(&format!("{l}layer_norm2.weight")), &g(&format!("{l}layer_norm2.bias")));
                let mlp = g(&format!("{l}mlp.fc1.bias")).len();
                let h = naive_linear(&h, &g(&format!("{l}mlp.fc1.weight")), Some(&g(&format!("{l}mlp.fc1.bias"))), mlp);
                let h: Vec<f32> = h.iter().map(|&v| v / (1.0 + (-1.702 * v).exp())).collect();
                add(&x, &naive_linear(&h, &g(&format!("{l}mlp.fc2.weight")), Some(&g(&format!("{l}mlp.fc2.bias"))), d))
            }
            Layout::OpenClip => {
                let h = naive_ln(&x, &g(&format!("{l}ln_1.weight")), &g(&format!("{l}ln_1.bias")));
                let qkv = naive_linear(&h, &g(&format!("{l}attn.in_proj_weight")), Some(&g(&format!("{l}attn.in_proj_bias"))), 3 * d);
                let part = |s: usize| -> Vec<f32> { qkv.chunks(3 * d).flat_map(|row| row[s * d..(s + 1) * d].to_vec()).collect() };
                let a = naive_causal_attention(&part(0), &part(1), &part(2), d, heads);
                let x = add(&x, &naive_linear(&a, &g(&format!("{l}attn.out_proj.weight")), Some(&g(&format!("{l}attn.out_proj.bias"))), d));
                let h = naive_ln(&x, &g(&format!("{l}ln_2.weight")), &g(&format!("{l}ln_2.bias")));
                let mlp = g(&format!("{l}mlp.c_fc.bias")).len();
                let h = naive_linear(&h, &g(&format!("{l}mlp.c_fc.weight")), Some(&g(&format!("{l}mlp.c_fc.bias"))), mlp);
                let h: Vec<f32> = h.iter().map(|&v| (0.5 * v as f64 * (1.0 + erf(v as f64 / 2f64.sqrt()))) as f32).collect();
                add(&x, &naive_linear(&h, &g(&format!("{l}mlp.c_proj.weight")), Some(&g(&format!("{l}mlp.c_proj.bias"))), d))
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
        assert!((g - w).abs() <= tol * scale, "{what}: element {i}: {g} vs {w}");
    }
}

const PROMPTS: [&str; 3] = ["a photo of a cat", "the and for, it's 2024!", ""];

#[test]
fn sd15_matches_naive_clip_l() {
    let (_dir, tokenizer) = test_tokenizer();
    let (d, heads, mlp) = (128, 2, 256);
    let mut m = Memory::default();
    m.hf_clip(&mut StdRng::seed_from_u64(1), SD15_CLIP_L, Dims { vocab: tokenizer.vocab_size(), width: d, mlp, layers: 2 });
    assert_eq!(TextFamily::detect(&m), Some(TextFamily::Sd15));
    let te = TextEncoders::detect(&m).unwrap();
    let cfg = te.clip_l().unwrap();
    assert_eq!((cfg.width, cfg.heads, cfg.layers, cfg.mlp_width, cfg.vocab, cfg.projection), (d, heads, 2, mlp, 574, None));
    assert_eq!(te.context_width(), d);

    let ops = ops();
    let cond = te.encode(&ops, &tokenizer, &PROMPTS, &InputHooks::none()).unwrap();
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
        assert_close(&got[b * CONTEXT_LENGTH * d..(b + 1) * CONTEXT_LENGTH * d], &want, 1e-4, &format!("prompt {b}"));
    }
}

/// CLIP-L 64 wide (one head), bigG 128 wide (two heads), two layers each.
fn sdxl_memory(vocab: usize) -> Memory {
    let mut m = Memory::default();
    let rng = &mut StdRng::seed_from_u64(2);
    m.hf_clip(rng, SDXL_CLIP_L, Dims { vocab, width: 64, mlp: 128, layers: 2 });
    m.open_clip(rng, SDXL_CLIP_G, Dims { vocab, width: 128, mlp: 256, layers: 2 }, 96);
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
    let (first, second) = (vec!["a"; 75].join(" "), ["a"; 5].join(" "));
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
    let (l, g) = (tokens.clip_l.as_ref().unwrap(), tokens.clip_g.as_ref().unwrap());
    assert_eq!(l.end_index, g.end_index);
    let end = l.end_index[0];
    assert_eq!((l.row(0)[end], l.row(0)[end + 1], g.row(0)[end], g.row(0)[end + 1]), (573, 573, 573, 0));

    let ops = ops();
    let cond = te.encode_tokens(&ops, &tokens, &InputHooks::none()).unwrap();
    assert_eq!(ops.shape(&cond.context), vec![3, CONTEXT_LENGTH, 192]);
    let pooled = cond.pooled.as_ref().unwrap();
    assert_eq!(ops.shape(pooled), vec![3, 96]);
    let (context, pooled) = (ops.to_f32(&cond.context).unwrap(), ops.to_f32(pooled).unwrap());
    for b in 0..PROMPTS.len() {
        // Penultimate = after layer 0 of 2, no final norm.
        let hl = &naive_hidden(&m, SDXL_CLIP_L, Layout::Hf, l.row(b), 64, 1)[1];
        let hg_all = naive_hidden(&m, SDXL_CLIP_G, Layout::OpenClip, g.row(b), 128, 2);
        let want: Vec<f32> =
            (0..CONTEXT_LENGTH).flat_map(|n| hl[n * 64..(n + 1) * 64].iter().chain(&hg_all[1][n * 128..(n + 1) * 128]).copied()).collect();
        assert_close(&context[b * CONTEXT_LENGTH * 192..(b + 1) * CONTEXT_LENGTH * 192], &want, 1e-4, &format!("context {b}"));

        let e = g.end_index[b];
        let last = naive_ln(
            &hg_all[2][e * 128..(e + 1) * 128],
            &m.get(&format!("{SDXL_CLIP_G}ln_final.weight")),
            &m.get(&format!("{SDXL_CLIP_G}ln_final.bias")),
        );
        let p = m.get(&format!("{SDXL_CLIP_G}text_projection"));
        let want: Vec<f32> = (0..96).map(|o| (0..128).map(|i| last[i] * p[i * 96 + o]).sum()).collect();
        assert_close(&pooled[b * 96..(b + 1) * 96], &want, 1e-4, &format!("pooled {b}"));
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
        TokenBatch { ids: rows.concat(), end_index: vec![4; 3] }
    };
    let tokens = PromptTokens { clip_l: Some(batch(573)), clip_g: Some(batch(0)), chunks: vec![] };
    let ops = ops();
    let cond = te.encode_tokens(&ops, &tokens, &InputHooks::none()).unwrap();
    let (context, pooled) = (ops.to_f32(&cond.context).unwrap(), ops.to_f32(cond.pooled.as_ref().unwrap()).unwrap());
    let c = 192;
    let position = |b: usize, n: usize| &context[(b * CONTEXT_LENGTH + n) * c..(b * CONTEXT_LENGTH + n + 1) * c];
    let differs = |a: &[f32], b: &[f32]| a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-3);
    assert_close(&pooled[96..192], &pooled[..96], 1e-6, "pooled after a change past the end token");
    for n in 0..10 {
        assert_close(position(1, n), position(0, n), 1e-6, &format!("position {n}"));
    }
    assert!(differs(position(1, 10), position(0, 10)), "the changed position itself changes");
    assert!(differs(&pooled[192..], &pooled[..96]), "a change before the end token changes the pooled output");
    assert!(!differs(position(2, 1), position(0, 1)) && differs(position(2, 2), position(0, 2)));
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
    m.open_clip(&mut StdRng::seed_from_u64(3), SDXL_REFINER_CLIP_G, Dims { vocab: 574, width: 64, mlp: 128, layers: 2 }, 48);
    let te = TextEncoders::detect(&m).unwrap();
    assert_eq!(te.family(), TextFamily::SdxlRefiner);
    assert!(te.clip_l().is_none());
    let (_dir, tokenizer) = test_tokenizer();
    let ops = ops();
    let cond = te.encode(&ops, &tokenizer, &PROMPTS[..2], &InputHooks::none()).unwrap();
    assert_eq!(ops.shape(&cond.context), vec![2, CONTEXT_LENGTH, 64]);
    let g = tokenizer.encode(&PROMPTS[..1], Padding::Zero).unwrap();
    let want = &naive_hidden(&m, SDXL_REFINER_CLIP_G, Layout::OpenClip, g.row(0), 64, 1)[1];
    assert_close(&ops.to_f32(&cond.context).unwrap()[..CONTEXT_LENGTH * 64], want, 1e-4, "refiner context");

    let y = te.adm(&ops, &cond, &SizeConditioning::new(1024, 1024), true).unwrap().unwrap();
    assert_eq!(ops.shape(&y), vec![2, 48 + 5 * 256]);
    let y = ops.to_f32(&y).unwrap();
    assert_eq!(&y[48 + 4 * 256..48 + 5 * 256], timestep_embedding(2.5, 256).as_slice());
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
    let specs: Vec<ObserverSpec> = channels.iter().map(|&channels| ObserverSpec { channels, axis: ChannelAxis::Last }).collect();
    ops.observers_reset(&specs, 1).unwrap();
    let mut hooks = InputHooks::none();
    for (slot, module) in modules.iter().enumerate() {
        hooks.by_module.insert(module.clone(), InputHook { observer: Some(slot), quant: None });
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
    assert!((stats[4].amax() - amax).abs() <= 1e-4 * amax, "{} vs {amax}", stats[4].amax());
    drop(cond);
}

fn synth_checkpoint(family: Family, full_checkpoint: bool) -> (tempfile::TempDir, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    synth::write(&SynthOptions { full_checkpoint, ..SynthOptions::new(family) }, &path, |_, _| {}).unwrap();
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
        TokenBatch { ids, end_index: vec![3, 1] }
    };
    for (family, text_family, width, pooled) in
        [(Family::Sd15, TextFamily::Sd15, 768, None), (Family::Sdxl, TextFamily::Sdxl, 2048, Some(1280))]
    {
        let (_dir, ckpt) = synth_checkpoint(family, true);
        let te = TextEncoders::detect(&ckpt).unwrap();
        assert_eq!(te.family(), text_family);
        let l = te.clip_l().unwrap();
        assert_eq!((l.width, l.heads, l.layers, l.mlp_width, l.vocab), (768, 12, 1, 3072, 1024));
        let tokens = PromptTokens { clip_l: Some(batch(127)), clip_g: te.clip_g().map(|_| batch(0)), chunks: vec![] };
        let cond = te.encode_tokens(&ops, &tokens, &InputHooks::none()).unwrap();
        assert_eq!(ops.shape(&cond.context), vec![2, CONTEXT_LENGTH, width]);
        assert!(ops.to_f32(&cond.context).unwrap().iter().all(|v| v.is_finite()));
        assert_eq!(cond.pooled.as_ref().map(|p| ops.shape(p)), pooled.map(|p| vec![2, p]));
        if let Some(p) = &cond.pooled {
            assert!(ops.to_f32(p).unwrap().iter().all(|v| v.is_finite()));
            let y = te.adm(&ops, &cond, &SizeConditioning::new(1024, 768), false).unwrap().unwrap();
            assert_eq!(ops.shape(&y), vec![2, 1280 + 6 * 256]);
        }

        // The test tokenizer's 574 tokens fit the synthetic 1024-token tables:
        // prompts encode into the context the UNet takes.
        let (_tdir, tokenizer) = test_tokenizer();
        let cond = te.encode(&ops, &tokenizer, &["a cat", "the end of a long day"], &InputHooks::none()).unwrap();
        assert_eq!(ops.shape(&cond.context), vec![2, CONTEXT_LENGTH, width]);
    }
}

#[test]
fn missing_encoders_are_named() {
    let (_dir, ckpt) = synth_checkpoint(Family::Sd15, false);
    let msg = format!("{:#}", TextEncoders::detect(&ckpt).err().unwrap());
    assert!(msg.contains(SD15_CLIP_L) && msg.contains(SDXL_CLIP_G) && msg.contains("full checkpoint"), "{msg}");
    let msg = format!("{:#}", TextEncoders::load(&ckpt, TextFamily::Sd15).err().unwrap());
    assert!(msg.contains(SD15_CLIP_L), "{msg}");

    let m = sdxl_memory(574);
    let msg = format!("{:#}", TextEncoders::load(&m, TextFamily::SdxlRefiner).err().unwrap());
    assert!(msg.contains(SDXL_REFINER_CLIP_G), "{msg}");
    let mut partial = sdxl_memory(574);
    partial.0.retain(|k, _| !k.starts_with(SDXL_CLIP_G));
    let msg = format!("{:#}", TextEncoders::load(&partial, TextFamily::Sdxl).err().unwrap());
    assert!(msg.contains(SDXL_CLIP_G), "{msg}");
    // A layer with the wrong width is named.
    let mut bad = sdxl_memory(574);
    bad.put(format!("{SDXL_CLIP_G}transformer.resblocks.1.attn.out_proj.weight"), &[128, 64], vec![0.0; 128 * 64]);
    let tokens = PromptTokens {
        clip_l: Some(TokenBatch { ids: vec![0; 77], end_index: vec![0] }),
        clip_g: Some(TokenBatch { ids: vec![0; 77], end_index: vec![0] }),
        chunks: vec![],
    };
    let msg = format!("{:#}", TextEncoders::detect(&bad).unwrap().encode_tokens(&ops(), &tokens, &InputHooks::none()).err().unwrap());
    assert!(msg.contains("resblocks.1.attn.out_proj.weight") && msg.contains("[128, 64]"), "{msg}");
}

#[test]
fn size_embeddings() {
    // dim 8: f = [1, 10000^-1/4, 10000^-2/4, 10000^-3/4] = [1, 0.1, 0.01, 0.001].
    let e = timestep_embedding(2.0, 8);
    let want = [2f64.cos(), 0.2f64.cos(), 0.02f64.cos(), 0.002f64.cos(), 2f64.sin(), 0.2f64.sin(), 0.02f64.sin(), 0.002f64.sin()];
    for (g, w) in e.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 1e-6, "{e:?}");
    }
    let zero = timestep_embedding(0.0, 256);
    assert!(zero[..128].iter().all(|&v| v == 1.0) && zero[128..].iter().all(|&v| v == 0.0));
    assert_eq!(timestep_embedding(1.0, 5).len(), 5);

    let ops = ops();
    let pooled = ops.from_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let size = SizeConditioning { width: 832, height: 1216, crop_left: 16, crop_top: 8, target_width: 1024, target_height: 1024 };
    let y = sdxl_adm(&ops, &pooled, &size).unwrap();
    assert_eq!(ops.shape(&y), vec![2, 3 + 6 * 256]);
    let y = ops.to_f32(&y).unwrap();
    let row = 3 + 6 * 256;
    assert_eq!(&y[..3], &[1.0, 2.0, 3.0]);
    assert_eq!(&y[row..row + 3], &[4.0, 5.0, 6.0]);
    // Order: height, width, crop top, crop left, target height, target width.
    for (i, v) in [1216.0, 832.0, 8.0, 16.0, 1024.0, 1024.0].into_iter().enumerate() {
        let seg = 3 + i * 256;
        assert_eq!(&y[seg..seg + 256], timestep_embedding(v, 256).as_slice(), "segment {i}");
        assert_eq!(&y[row + seg..row + seg + 256], timestep_embedding(v, 256).as_slice(), "row 1 segment {i}");
    }
    let y = sdxl_refiner_adm(&ops, &pooled, &size, AESTHETIC_POSITIVE).unwrap();
    assert_eq!(ops.shape(&y), vec![2, 3 + 5 * 256]);
    let y = ops.to_f32(&y).unwrap();
    for (i, v) in [1216.0, 832.0, 8.0, 16.0, 6.0].into_iter().enumerate() {
        assert_eq!(&y[3 + i * 256..3 + (i + 1) * 256], timestep_embedding(v, 256).as_slice(), "refiner segment {i}");
    }
}
