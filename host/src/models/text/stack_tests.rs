use super::*;
use crate::models::text::detect::tests::{hf_clip, t5_tensors};
use crate::models::text::file::write_file;
use crate::models::text::t5::T5Tokens;
use crate::models::tokenizer::tests::test_tokenizer;
use crate::nn::cpu::CpuOps;

fn t5_fixture() -> T5Tokenizer {
    T5Tokenizer::from_file(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/t5_tokenizer_tiny.json")).unwrap()
}

#[test]
fn sd3_stack_from_three_files_is_conditioning_of_each_encoder() {
    let ops = CpuOps::new();
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<(&str, Vec<_>)> = vec![
        ("clip_l.safetensors", hf_clip(1, "text_model.", 2, 2, false)),
        ("clip_g.safetensors", hf_clip(2, "text_model.", 4, 2, true)),
        ("t5.safetensors", t5_tensors("")),
    ];
    let paths: Vec<PathBuf> = files
        .iter()
        .map(|(name, t)| {
            let p = dir.path().join(name);
            write_file(&p, t).unwrap();
            p
        })
        .collect();
    let files = TextFiles::open(&paths).unwrap();
    // Tiny widths: CLIP-L 2, OpenCLIP-G 4, T5 (the context) 8.
    let widths = TextWidths { clip_l: 2, clip_g: 4, context: 8, empty_tokens: 77 };
    assert!(files.check(DitText::Sd3, widths).unwrap().is_empty());
    let e = format!("{:#}", files.check(DitText::Sd3, TextWidths { clip_l: 3, ..widths }).err().unwrap());
    assert!(e.contains("clip_l.safetensors") && e.contains("2 wide, but this model takes 3"), "{e}");
    let e = format!("{:#}", files.check(DitText::Flux, TextWidths { clip_g: 0, ..widths }).err().unwrap());
    assert!(e.contains("clip_g.safetensors") && e.contains("does not take"), "{e}");

    let (_vocab_dir, clip_tok) = test_tokenizer();
    let t5_tok = t5_fixture();
    let prompts = ["a cat", "cats on the mat"];
    // Both pad to 6 T5 tokens ("cats on the mat" is 5 and its end token), so they batch row by row.
    let c = files.encode(&ops, DitText::Sd3, widths, Some(&clip_tok), Some(&t5_tok), 6, &prompts, &InputHooks::none()).unwrap();
    // The parts, run by hand and joined by `conditioning::sd3`.
    let part = |kind, tower, padding| {
        let (f, e) = files.get(kind).unwrap();
        let (hidden, pooled) = HfClip::load(f, &e.prefix, tower)
            .unwrap()
            .encode(&ops, &clip_tok.encode(&prompts, padding).unwrap(), &InputHooks::none())
            .unwrap();
        ClipOutput { hidden, pooled }
    };
    let l = part(EncoderKind::ClipL, HfTower::ClipL, Padding::EndToken);
    let g = part(EncoderKind::ClipG, HfTower::ClipG, Padding::Zero);
    let (tf, _) = files.get(EncoderKind::T5).unwrap();
    let t5 = T5Encoder::load(tf, "").unwrap().encode(&ops, &t5_tok.encode(&prompts, 6).unwrap(), &InputHooks::none()).unwrap();
    let want = conditioning::sd3(&ops, 2, widths, Some(&l), Some(&g), Some(&t5)).unwrap();
    assert_eq!(ops.shape(&c.context), vec![2, 77 + 6, 8]);
    assert_eq!(ops.to_f32(&c.context).unwrap(), ops.to_f32(&want.context).unwrap());
    assert_eq!(ops.shape(&c.pooled), vec![2, 6]);
    assert_eq!(ops.to_f32(&c.pooled).unwrap(), ops.to_f32(&want.pooled).unwrap());
    // Past the minimum of 5, never cut: 6 T5 tokens.
    let c = files.encode(&ops, DitText::Sd3, widths, Some(&clip_tok), Some(&t5_tok), 5, &prompts[1..], &InputHooks::none()).unwrap();
    assert_eq!(ops.shape(&c.context), vec![1, 77 + 6, 8]);
    // Each prompt pads T5 to its own length, as ComfyUI encodes one prompt: 82 and 83
    // tokens do not batch (ComfyUI's `cond_cat` would repeat them to 6806).
    let e = format!(
        "{:#}",
        files.encode(&ops, DitText::Sd3, widths, Some(&clip_tok), Some(&t5_tok), 5, &prompts, &InputHooks::none()).err().unwrap()
    );
    assert!(e.contains("cannot be batched"), "{e}");
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn long_prompts_are_chunked_as_comfyui_encodes_them() {
    let ops = CpuOps::new();
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = [
        ("clip_l.safetensors", hf_clip(1, "text_model.", 2, 2, false)),
        ("clip_g.safetensors", hf_clip(2, "text_model.", 4, 2, true)),
        ("t5.safetensors", t5_tensors("")),
    ]
    .iter()
    .map(|(name, t)| {
        let p = dir.path().join(name);
        write_file(&p, t).unwrap();
        p
    })
    .collect();
    let files = TextFiles::open(&paths).unwrap();
    let widths = files.widths(DitText::Sd3, 8, 6).unwrap();
    assert_eq!(widths, TextWidths { clip_l: 2, clip_g: 4, context: 8, empty_tokens: 77 });
    let (_vocab_dir, clip_tok) = test_tokenizer();
    let t5_tok = t5_fixture();
    // "a" is one CLIP token: 80 of them are a chunk of 75 and one of 5. T5: 80 tokens and its end.
    let long = vec!["a"; 80].join(" ");
    let chunk_texts = [vec!["a"; 75].join(" "), ["a"; 5].join(" ")];
    let c = files.encode(&ops, DitText::Sd3, widths, Some(&clip_tok), Some(&t5_tok), 77, &[long.as_str()], &InputHooks::none()).unwrap();
    // By hand: each chunk encoded on its own, as a prompt of its own.
    let encode = |kind, tower, padding, text: &str| {
        let (f, e) = files.get(kind).unwrap();
        let (hidden, pooled) = HfClip::load(f, &e.prefix, tower)
            .unwrap()
            .encode(&ops, &clip_tok.encode(&[text], padding).unwrap(), &InputHooks::none())
            .unwrap();
        ClipOutput { hidden, pooled }
    };
    let chunks: Vec<(ClipOutput<_>, ClipOutput<_>)> = chunk_texts
        .iter()
        .map(|t| {
            (encode(EncoderKind::ClipL, HfTower::ClipL, Padding::EndToken, t), encode(EncoderKind::ClipG, HfTower::ClipG, Padding::Zero, t))
        })
        .collect();
    let (tf, _) = files.get(EncoderKind::T5).unwrap();
    let t5_tokens = t5_tok.encode(&[long.as_str()], 77).unwrap();
    assert_eq!(t5_tokens.len, 81, "T5 is never cut");
    let t5 = T5Encoder::load(tf, "").unwrap().encode(&ops, &t5_tokens, &InputHooks::none()).unwrap();
    // Chunk 0's CLIP tokens, chunk 1's, then T5's: 77 + 77 + 81.
    let parts: Vec<_> = chunks.iter().map(|(l, g)| conditioning::sd3(&ops, 1, widths, Some(l), Some(g), None).unwrap().context).collect();
    let want = ops.concat(&[&parts[0], &parts[1], &t5], 1).unwrap();
    assert_eq!(ops.shape(&c.context), vec![1, 2 * 77 + 81, 8]);
    let d = max_abs_diff(&ops.to_f32(&c.context).unwrap(), &ops.to_f32(&want).unwrap());
    assert!(d < 1e-5, "context differs from the chunks encoded apart by {d}");
    // The pooled output is the first chunk's (the second one's differs).
    let first = ops.concat(&[&chunks[0].0.pooled, &chunks[0].1.pooled], 1).unwrap();
    let second = ops.concat(&[&chunks[1].0.pooled, &chunks[1].1.pooled], 1).unwrap();
    let got = ops.to_f32(&c.pooled).unwrap();
    assert!(max_abs_diff(&got, &ops.to_f32(&first).unwrap()) < 1e-6);
    assert!(max_abs_diff(&got, &ops.to_f32(&second).unwrap()) > 1e-3);

    // FLUX: T5's whole prompt, CLIP-L's first-chunk pooled output.
    let flux = TextFiles::open(&[paths[0].clone(), paths[2].clone()]).unwrap();
    let w = flux.widths(DitText::Flux, 8, 2).unwrap();
    let c = flux.encode(&ops, DitText::Flux, w, Some(&clip_tok), Some(&t5_tok), 6, &[long.as_str()], &InputHooks::none()).unwrap();
    assert_eq!(ops.to_f32(&c.context).unwrap(), ops.to_f32(&t5).unwrap());
    assert!(max_abs_diff(&ops.to_f32(&c.pooled).unwrap(), &ops.to_f32(&chunks[0].0.pooled).unwrap()) < 1e-6);
}

#[test]
fn widths_follow_the_model_and_the_clip_files() {
    let dir = tempfile::tempdir().unwrap();
    let l_path = dir.path().join("clip_l.safetensors");
    write_file(&l_path, &hf_clip(1, "text_model.", 2, 2, false)).unwrap();
    let g_path = dir.path().join("clip_g.safetensors");
    write_file(&g_path, &hf_clip(2, "text_model.", 4, 2, true)).unwrap();
    let none = TextFiles::open(&[]).unwrap();
    // The real widths: SD3's pooled 2048 is 768 ‖ 1280 whatever is given.
    assert_eq!(none.widths(DitText::Sd3, 4096, 2048).unwrap(), conditioning::SD3_WIDTHS);
    assert_eq!(none.widths(DitText::Flux, 4096, 768).unwrap(), conditioning::FLUX_WIDTHS);
    let only_l = TextFiles::open(std::slice::from_ref(&l_path)).unwrap();
    assert_eq!(only_l.widths(DitText::Sd3, 4096, 2048).unwrap(), conditioning::SD3_WIDTHS);
    // A narrow model: the split follows the CLIP files.
    assert_eq!((only_l.widths(DitText::Sd3, 8, 6).unwrap().clip_l, only_l.widths(DitText::Sd3, 8, 6).unwrap().clip_g), (2, 4));
    let only_g = TextFiles::open(std::slice::from_ref(&g_path)).unwrap();
    assert_eq!((only_g.widths(DitText::Sd3, 8, 6).unwrap().clip_l, only_g.widths(DitText::Sd3, 8, 6).unwrap().clip_g), (2, 4));
    let both = TextFiles::open(&[l_path.clone(), g_path.clone()]).unwrap();
    let e = format!("{:#}", both.widths(DitText::Sd3, 8, 7).err().unwrap());
    assert!(e.contains("clip_l.safetensors") && e.contains("pooled vector is 7 wide"), "{e}");
    let e = format!("{:#}", both.widths(DitText::Sd3, 5, 6).err().unwrap());
    assert!(e.contains("text context is 5 wide"), "{e}");
}

#[test]
fn flux_stack_matches_its_parts_and_notes_missing_encoders() {
    let ops = CpuOps::new();
    let dir = tempfile::tempdir().unwrap();
    let (l_path, t5_path) = (dir.path().join("clip_l.safetensors"), dir.path().join("t5xxl_fp16.safetensors"));
    write_file(&l_path, &hf_clip(3, "text_model.", 8, 2, false)).unwrap();
    write_file(&t5_path, &t5_tensors("")).unwrap();
    let widths = TextWidths { clip_l: 8, clip_g: 0, context: 8, empty_tokens: 6 };
    let (_vocab_dir, clip_tok) = test_tokenizer();
    let t5_tok = t5_fixture();
    let prompts = ["a cat", "a cat on the mat"];

    let only_t5 = TextFiles::open(std::slice::from_ref(&t5_path)).unwrap();
    let notes = only_t5.check(DitText::Flux, widths).unwrap();
    assert_eq!(notes.len(), 1);
    assert!(notes[0].contains("no CLIP-L given"), "{notes:?}");

    let files = TextFiles::open(&[l_path.clone(), t5_path.clone()]).unwrap();
    let c = files.encode(&ops, DitText::Flux, widths, Some(&clip_tok), Some(&t5_tok), 6, &prompts, &InputHooks::none()).unwrap();
    // The parts, run by hand.
    let (lf, le) = files.get(EncoderKind::ClipL).unwrap();
    let (_, pooled) = HfClip::load(lf, &le.prefix, HfTower::ClipL)
        .unwrap()
        .encode(&ops, &clip_tok.encode(&prompts, Padding::EndToken).unwrap(), &InputHooks::none())
        .unwrap();
    let (tf, _) = files.get(EncoderKind::T5).unwrap();
    let tokens = t5_tok.encode(&prompts, 6).unwrap();
    assert_eq!(tokens, T5Tokens { ids: vec![3, 4, 1, 0, 0, 0, 3, 4, 6, 7, 8, 1], len: 6 });
    let t5 = T5Encoder::load(tf, "").unwrap().encode(&ops, &tokens, &InputHooks::none()).unwrap();
    assert_eq!(ops.to_f32(&c.context).unwrap(), ops.to_f32(&t5).unwrap());
    assert_eq!(ops.to_f32(&c.pooled).unwrap(), ops.to_f32(&pooled).unwrap());
    assert_eq!(ops.shape(&c.context), vec![2, 6, 8]);

    // Missing tokenizers are named; a second T5 is refused.
    let e =
        format!("{:#}", files.encode(&ops, DitText::Flux, widths, Some(&clip_tok), None, 6, &prompts, &InputHooks::none()).err().unwrap());
    assert!(e.contains("t5xxl_fp16.safetensors") && e.contains("tokenizer.json"), "{e}");
    let e = format!("{:#}", TextFiles::open(&[t5_path.clone(), t5_path.clone()]).err().unwrap());
    assert!(e.contains("second T5 encoder"), "{e}");
}
