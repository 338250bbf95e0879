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
    let c = files.encode(&ops, DitText::Sd3, widths, Some(&clip_tok), Some(&t5_tok), 5, &prompts, &InputHooks::none()).unwrap();
    // The parts, run by hand and joined by `conditioning::sd3`.
    let part = |kind, tower, padding| {
        let (f, e) = files.get(kind).unwrap();
        let (hidden, pooled) = HfClip::load(f, &e.prefix, tower).unwrap().encode(&ops, &clip_tok.encode(&prompts, padding).unwrap(), &InputHooks::none()).unwrap();
        ClipOutput { hidden, pooled }
    };
    let l = part(EncoderKind::ClipL, HfTower::ClipL, Padding::EndToken);
    let g = part(EncoderKind::ClipG, HfTower::ClipG, Padding::Zero);
    let (tf, _) = files.get(EncoderKind::T5).unwrap();
    let t5 = T5Encoder::load(tf, "").unwrap().encode(&ops, &t5_tok.encode(&prompts, 5).unwrap(), &InputHooks::none()).unwrap();
    let want = conditioning::sd3(&ops, 2, widths, Some(&l), Some(&g), Some(&t5)).unwrap();
    // "cats on the mat" is 5 T5 tokens and its end token: past the minimum of 5, never cut.
    assert_eq!(ops.shape(&c.context), vec![2, 77 + 6, 8]);
    assert_eq!(ops.to_f32(&c.context).unwrap(), ops.to_f32(&want.context).unwrap());
    assert_eq!(ops.shape(&c.pooled), vec![2, 6]);
    assert_eq!(ops.to_f32(&c.pooled).unwrap(), ops.to_f32(&want.pooled).unwrap());
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
    let (_, pooled) = HfClip::load(lf, &le.prefix, HfTower::ClipL).unwrap().encode(&ops, &clip_tok.encode(&prompts, Padding::EndToken).unwrap(), &InputHooks::none()).unwrap();
    let (tf, _) = files.get(EncoderKind::T5).unwrap();
    let tokens = t5_tok.encode(&prompts, 6).unwrap();
    assert_eq!(tokens, T5Tokens { ids: vec![3, 4, 1, 0, 0, 0, 3, 4, 6, 7, 8, 1], len: 6 });
    let t5 = T5Encoder::load(tf, "").unwrap().encode(&ops, &tokens, &InputHooks::none()).unwrap();
    assert_eq!(ops.to_f32(&c.context).unwrap(), ops.to_f32(&t5).unwrap());
    assert_eq!(ops.to_f32(&c.pooled).unwrap(), ops.to_f32(&pooled).unwrap());
    assert_eq!(ops.shape(&c.context), vec![2, 6, 8]);

    // Missing tokenizers are named; a second T5 is refused.
    let e = format!("{:#}", files.encode(&ops, DitText::Flux, widths, Some(&clip_tok), None, 6, &prompts, &InputHooks::none()).err().unwrap());
    assert!(e.contains("t5xxl_fp16.safetensors") && e.contains("tokenizer.json"), "{e}");
    let e = format!("{:#}", TextFiles::open(&[t5_path.clone(), t5_path.clone()]).err().unwrap());
    assert!(e.contains("second T5 encoder"), "{e}");
}
