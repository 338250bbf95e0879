use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::Dtype;

use super::*;
use crate::models::InputHooks;
use crate::models::clip::{HfClip, HfTower, SD15_CLIP_L, TextEncoders, TextFamily};
use crate::models::text::file::write_file;
use crate::models::text::t5::T5Encoder;
use crate::models::text::t5::tests::{Memory, TINY, random_t5};
use crate::models::tokenizer::{CONTEXT_LENGTH, TokenBatch};
use crate::nn::Ops;
use crate::nn::cpu::CpuOps;

type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<f32>)>;

/// A random HF-layout CLIP tower under `prefix` (ending in `text_model.`).
pub(crate) fn hf_clip(seed: u64, prefix: &str, width: usize, layers: usize, projection: bool) -> Tensors {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out: Tensors = Vec::new();
    let mut put = |key: String, shape: Vec<usize>, center: f32, spread: f32| {
        let n = shape.iter().product();
        out.push((key, Dtype::F32, shape, (0..n).map(|_| center + spread * (rng.random::<f32>() * 2.0 - 1.0)).collect()));
    };
    let (w, mlp) = (width, 2 * width);
    put(format!("{prefix}embeddings.token_embedding.weight"), vec![600, w], 0.0, 1.0);
    put(format!("{prefix}embeddings.position_embedding.weight"), vec![CONTEXT_LENGTH, w], 0.0, 0.5);
    for i in 0..layers {
        let l = format!("{prefix}encoder.layers.{i}.");
        for (m, o, inp) in [
            ("self_attn.q_proj", w, w),
            ("self_attn.k_proj", w, w),
            ("self_attn.v_proj", w, w),
            ("self_attn.out_proj", w, w),
            ("mlp.fc1", mlp, w),
            ("mlp.fc2", w, mlp),
        ] {
            put(format!("{l}{m}.weight"), vec![o, inp], 0.0, 1.5 / (inp as f32).sqrt());
            put(format!("{l}{m}.bias"), vec![o], 0.0, 0.1);
        }
        for n in ["layer_norm1", "layer_norm2"] {
            put(format!("{l}{n}.weight"), vec![w], 1.0, 0.2);
            put(format!("{l}{n}.bias"), vec![w], 0.0, 0.2);
        }
    }
    put(format!("{prefix}final_layer_norm.weight"), vec![w], 1.0, 0.2);
    put(format!("{prefix}final_layer_norm.bias"), vec![w], 0.0, 0.2);
    if projection {
        let outer = prefix.strip_suffix("text_model.").unwrap();
        put(format!("{outer}text_projection.weight"), vec![w, w], 0.0, 0.5);
    }
    out
}

pub(crate) fn t5_tensors(prefix: &str) -> Tensors {
    let m = random_t5(11, prefix, TINY);
    m.0.keys().map(|k| (k.clone(), Dtype::F32, m.0[k].0.clone(), m.get(k))).collect()
}

fn file_of(dir: &tempfile::TempDir, name: &str, tensors: &Tensors) -> EncoderFile {
    let path = dir.path().join(name);
    write_file(&path, tensors).unwrap();
    EncoderFile::open(&path).unwrap()
}

fn err(file: &EncoderFile) -> String {
    format!("{:#}", detect(file).err().unwrap())
}

#[test]
fn standalone_and_sd3_prefixed_encoders_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let l = file_of(&dir, "clip_l.safetensors", &hf_clip(1, "text_model.", 8, 2, false));
    let g = file_of(&dir, "clip_g.safetensors", &hf_clip(2, "text_model.", 12, 3, true));
    let t5 = file_of(&dir, "t5xxl_fp16.safetensors", &t5_tensors(""));
    let d = |kind, prefix: &str, width, layers| DetectedEncoder { kind, prefix: prefix.into(), width, layers, fp8: false };
    assert_eq!(detect(&l).unwrap(), vec![d(EncoderKind::ClipL, "text_model.", 8, 2)]);
    assert_eq!(detect(&g).unwrap(), vec![d(EncoderKind::ClipG, "text_model.", 12, 3)]);
    assert_eq!(detect(&t5).unwrap(), vec![d(EncoderKind::T5, "", 8, 2)]);
    // SD3 single-file layout: the prefixes name the kinds.
    let mut all = hf_clip(3, SD3_CLIP_L_PREFIX, 8, 2, true);
    all.extend(hf_clip(4, SD3_CLIP_G_PREFIX, 8, 2, true));
    all.extend(t5_tensors(SD3_T5_PREFIX));
    let sd3 = file_of(&dir, "sd3.safetensors", &all);
    assert_eq!(
        detect(&sd3).unwrap(),
        vec![
            d(EncoderKind::T5, SD3_T5_PREFIX, 8, 2),
            d(EncoderKind::ClipL, SD3_CLIP_L_PREFIX, 8, 2),
            d(EncoderKind::ClipG, SD3_CLIP_G_PREFIX, 8, 2)
        ]
    );
}

/// Only the tensors detection reads, at real sizes (weights it never decodes are tiny stand-ins).
fn real_size_clip(width: usize, layers: usize) -> Tensors {
    let mut t: Tensors = vec![("text_model.embeddings.token_embedding.weight".into(), Dtype::F16, vec![1, width], vec![0.0; width])];
    t[0].2 = vec![1, width];
    for i in 0..layers {
        t.push((format!("text_model.encoder.layers.{i}.mlp.fc1.weight"), Dtype::F16, vec![1], vec![0.0]));
    }
    t
}

#[test]
fn wrong_kinds_and_widths_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let l = file_of(&dir, "clip_l.safetensors", &real_size_clip(768, 12));
    assert_eq!(detect(&l).unwrap()[0].kind, EncoderKind::ClipL);
    let g = file_of(&dir, "clip_g.safetensors", &real_size_clip(1280, 32));
    assert_eq!(detect(&g).unwrap()[0].kind, EncoderKind::ClipG);
    // OpenCLIP-H (1024 wide) is neither.
    let h = file_of(&dir, "clip_h.safetensors", &real_size_clip(1024, 24));
    let e = err(&h);
    assert!(e.contains("clip_h.safetensors") && e.contains("1024 wide with 24 layers") && e.contains("neither CLIP-L"), "{e}");
    // 768 wide but 24 layers: not CLIP-L.
    let deep = file_of(&dir, "deep.safetensors", &real_size_clip(768, 24));
    assert!(err(&deep).contains("CLIP-L is 768 wide with 12 layers"), "{}", err(&deep));
    // A diffusion model, an unknown file, an OpenCLIP-layout file, a non-safetensors file.
    let dm = file_of(
        &dir,
        "flux.safetensors",
        &vec![("double_blocks.0.img_attn.norm.key_norm.scale".into(), Dtype::F32, vec![2], vec![1.0, 1.0])],
    );
    assert!(err(&dm).contains("is a diffusion model"), "{}", err(&dm));
    let unknown = file_of(&dir, "vae.safetensors", &vec![("decoder.conv_in.weight".into(), Dtype::F32, vec![1], vec![1.0])]);
    let e = err(&unknown);
    assert!(e.contains("vae.safetensors") && e.contains("holds no text encoder") && e.contains("decoder.conv_in.weight"), "{e}");
    let oc = file_of(&dir, "open_clip.safetensors", &vec![("token_embedding.weight".into(), Dtype::F32, vec![1, 2], vec![1.0, 1.0])]);
    assert!(err(&oc).contains("OpenCLIP layout"), "{}", err(&oc));
    let text = dir.path().join("prompts.txt");
    std::fs::write(&text, "a cat on a mat, not a safetensors file").unwrap();
    let e = format!("{:#}", open(&text).err().unwrap());
    assert!(e.contains("prompts.txt") && e.contains("not a safetensors file"), "{e}");
}

fn tokens(batch: usize) -> TokenBatch {
    let mut ids = Vec::new();
    let mut end_index = Vec::new();
    for b in 0..batch {
        let n = 3 + 2 * b;
        let mut row: Vec<u32> = (0..n as u32).map(|i| 1 + (i * 7 + b as u32) % 40).collect();
        row.push(49);
        end_index.push(n);
        row.resize(CONTEXT_LENGTH, 49);
        ids.extend(row);
    }
    TokenBatch { ids, end_index }
}

#[test]
fn hf_clip_l_pooled_is_the_final_normed_end_token() {
    let ops = CpuOps::new();
    let dir = tempfile::tempdir().unwrap();
    let tensors = hf_clip(5, "text_model.", 8, 2, false);
    let file = file_of(&dir, "clip_l.safetensors", &tensors);
    // The same weights in SD1.5's layout: its context is the last layer through the final norm.
    let mut sd15 = Memory::default();
    for (k, _, s, v) in &tensors {
        sd15.put(format!("{SD15_CLIP_L}{}", k.strip_prefix("text_model.").unwrap()), s, v.clone());
    }
    let toks = tokens(2);
    let (hidden, pooled) = HfClip::load(&file, "text_model.", HfTower::ClipL).unwrap().encode(&ops, &toks, &InputHooks::none()).unwrap();
    assert_eq!(ops.shape(&hidden), vec![2, CONTEXT_LENGTH, 8]);
    let te = TextEncoders::load(&sd15, TextFamily::Sd15).unwrap();
    let prompt_tokens = crate::models::clip::PromptTokens { clip_l: Some(toks.clone()), clip_g: None, chunks: vec![] };
    let context = te.encode_tokens(&ops, &prompt_tokens, &InputHooks::none()).unwrap().context;
    let want = ops.to_f32(&ops.select_tokens(&context, &toks.end_index).unwrap()).unwrap();
    assert_eq!(ops.to_f32(&pooled).unwrap(), want);
}

#[test]
fn hf_clip_g_pools_through_its_projection() {
    let ops = CpuOps::new();
    let dir = tempfile::tempdir().unwrap();
    let file = file_of(&dir, "clip_g.safetensors", &hf_clip(6, "text_model.", 8, 2, true));
    let g = HfClip::load(&file, "text_model.", HfTower::ClipG).unwrap();
    assert_eq!((g.config().projection, g.config().act), (Some(8), crate::nn::Act::Gelu));
    let (hidden, pooled) = g.encode(&ops, &tokens(2), &InputHooks::none()).unwrap();
    assert_eq!((ops.shape(&hidden), ops.shape(&pooled)), (vec![2, CONTEXT_LENGTH, 8], vec![2, 8]));
    // Without its projection it is refused as OpenCLIP-G.
    let bare = file_of(&dir, "bare.safetensors", &hf_clip(6, "text_model.", 8, 2, false));
    let e = format!("{:#}", HfClip::load(&bare, "text_model.", HfTower::ClipG).err().unwrap());
    assert!(e.contains("text_projection.weight"), "{e}");
    // T5 from a detected file runs.
    let t5 = file_of(&dir, "t5.safetensors", &t5_tensors(""));
    let found = detect(&t5).unwrap();
    let enc = T5Encoder::load(&t5, &found[0].prefix).unwrap();
    let out = enc.encode(&ops, &crate::models::text::t5::T5Tokens { ids: vec![3, 4, 1, 0], len: 4 }, &InputHooks::none()).unwrap();
    assert_eq!(ops.shape(&out), vec![1, 4, 8]);
}
