//! T5's SentencePiece (Unigram) tokenizer, from the `tokenizer.json` the user points
//! at (ComfyUI ships one in `comfy/text_encoders/t5_tokenizer/`), run by the
//! `tokenizers` crate: its Unigram model, `Precompiled` normalizer and `Metaspace`
//! pre-tokenizer need no optional feature.
//!
//! Semantics are ComfyUI's `T5XXLTokenizer` (`comfy/text_encoders/sd3_clip.py`,
//! `flux.py`, through `sd1_clip.SDTokenizer`): newlines read as spaces, the text's
//! pieces without the tokenizer's own special tokens, then the end token `</s>` (id
//! 1), then padding with `<pad>` (id 0) up to a minimum length (77 for SD3 / SD3.5,
//! 256 for FLUX.1; `SPEC.md` section 6), never truncated. A batch pads every row to
//! its longest. ComfyUI's prompt-weight syntax is not interpreted, as for CLIP
//! ([`crate::models::tokenizer`]).

use std::path::Path;

use anyhow::{Context, Result, anyhow, ensure};
use tokenizers::Tokenizer;

use crate::models::text::t5::{EOS_ID, PAD_ID, T5Tokens};

/// ComfyUI's minimum T5 length for SD3 / SD3.5.
pub const SD3_MIN_TOKENS: usize = 77;
/// ComfyUI's minimum T5 length for FLUX.1.
pub const FLUX_MIN_TOKENS: usize = 256;

const HINT: &str = "point at T5's tokenizer.json, such as a ComfyUI install's `comfy/text_encoders/t5_tokenizer/tokenizer.json`";

pub struct T5Tokenizer {
    inner: Tokenizer,
    vocab_size: usize,
}

impl T5Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`; the error names the file.
    pub fn from_file(path: &Path) -> Result<T5Tokenizer> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the T5 tokenizer {}; {HINT}", path.display()))?;
        let inner: Tokenizer = text
            .parse()
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("{} is not a tokenizer.json the `tokenizers` library can load; {HINT}", path.display()))?;
        let id = |t: &str| inner.token_to_id(t);
        ensure!(
            id("</s>") == Some(EOS_ID) && id("<pad>") == Some(PAD_ID),
            "{} is not T5's tokenizer: it should map `</s>` to {EOS_ID} and `<pad>` to {PAD_ID} (found {:?} and {:?}); {HINT}",
            path.display(),
            id("</s>"),
            id("<pad>")
        );
        let vocab_size = inner.get_vocab_size(true);
        Ok(T5Tokenizer { inner, vocab_size })
    }

    /// Ids the tokenizer can produce (with its added tokens).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The prompt's token ids, without the end token.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let text = text.replace('\n', " ");
        let enc = self.inner.encode(text.as_str(), false).map_err(|e| anyhow!("cannot tokenize {text:?}: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Every prompt's ids, the end token, then padding to at least `min_len` tokens
    /// (and to the batch's longest row).
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S], min_len: usize) -> Result<T5Tokens> {
        ensure!(!prompts.is_empty(), "no prompts to tokenize");
        let rows: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let mut ids = self.tokenize(p.as_ref())?;
                ids.push(EOS_ID);
                Ok(ids)
            })
            .collect::<Result<_>>()?;
        let len = rows.iter().map(Vec::len).max().unwrap_or(0).max(min_len);
        let mut ids = Vec::with_capacity(len * rows.len());
        for row in rows {
            ids.extend_from_slice(&row);
            ids.resize(ids.len() + len - row.len(), PAD_ID);
        }
        Ok(T5Tokens { ids, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/t5_tokenizer_tiny.json")
    }

    #[test]
    fn tiny_unigram_hand_checked_ids() {
        let t = T5Tokenizer::from_file(&fixture()).unwrap();
        assert_eq!(t.vocab_size(), 12);
        // "▁a" (3), "▁cat" (4); "cats" = "▁cat" + "s" (5): the Unigram lattice prefers it
        // to the unknown piece; newline is a space.
        assert_eq!(t.tokenize("a cat").unwrap(), vec![3, 4]);
        assert_eq!(t.tokenize("a\ncats").unwrap(), vec![3, 4, 5]);
        // "▁on" (6) "▁the" (7) "▁mat" (8); "dog" has no piece: `<unk>` (2).
        assert_eq!(t.tokenize("on the mat").unwrap(), vec![6, 7, 8]);
        assert_eq!(t.tokenize("dog").unwrap(), vec![2]);
        let b = t.encode(&["a cat", "cats on the mat"], 6).unwrap();
        assert_eq!(b.len, 6);
        assert_eq!(b.ids, vec![3, 4, 1, 0, 0, 0, 4, 5, 6, 7, 8, 1]);
        // Longer than the minimum: never truncated, the batch pads to the longest row.
        let b = t.encode(&["a cat", "cats on the mat"], 2).unwrap();
        assert_eq!((b.len, b.ids.len()), (6, 12));
        assert_eq!(b.row(0), &[3, 4, 1, 0, 0, 0]);
    }

    /// Prompts of [`real_tokenizer_matches_python_tokenizers`]; `scripts/t5_tokenizer_ids.py`
    /// holds the same list.
    const REAL_TOKENIZER_PROMPTS: [&str; 12] = [
        "a photo of a cat",
        "A majestic lion resting on a rock, golden hour, 85mm lens, bokeh",
        "cyberpunk street market in the rain, neon signs, night",
        "Portrait of an old fisherman; weathered face -- dramatic lighting!",
        "two  spaces and a trailing space ",
        "a line\nbreak",
        "café, naïve, Übermensch, crème brûlée",
        "“curly quotes” and ‘single’ — em dash",
        "1024x1024, 3.5 guidance, 50% off, #hashtag @user",
        "emoji 🐱 and 猫 are unknown",
        "UPPERCASE lowercase MiXeD",
        "don't can't won't it's",
    ];

    /// Their ids from python `tokenizers` 0.23.3 (`scripts/t5_tokenizer_ids.py`, which
    /// also checks them against ComfyUI's word-by-word tokenization) on T5's
    /// tokenizer.json as ComfyUI ships it: its vocabulary (32100 pieces, the scores
    /// of T5 v1.1), `Precompiled` + right `Strip` + `Replace(" {2,}", "▁")`
    /// normalizer and `Metaspace` (prepend "first") pre-tokenizer.
    const REAL_TOKENIZER_IDS: [&[u32]; 12] = [
        &[3, 9, 1202, 13, 3, 9, 1712], // 'a photo of a cat'
        &[71, 25941, 3, 7325, 880, 53, 30, 3, 9, 2480, 6, 7069, 1781, 6, 11989, 635, 6888, 6, 3, 22483, 15, 107], // 'A majestic lion resting on a rock, golden hour, 85mm lens, bokeh'
        &[9738, 102, 6513, 2815, 512, 16, 8, 3412, 6, 22432, 3957, 6, 706], // 'cyberpunk street market in the rain, neon signs, night'
        &[25634, 13, 46, 625, 2495, 49, 348, 117, 1969, 15, 26, 522, 1636, 8417, 3598, 55], // 'Portrait of an old fisherman; weathered face -- dramatic lighting!'
        &[192, 4856, 11, 3, 9, 5032, 53, 628],                                              // 'two  spaces and a trailing space '
        &[3, 9, 689, 1733],                                                                 // 'a line\nbreak'
        &[11949, 6, 3, 29, 9, 2, 162, 6, 3333, 904, 860, 6, 20435, 29925, 721],             // 'café, naïve, Übermensch, crème brûlée'
        &[105, 3663, 120, 7599, 153, 11, 458, 7, 53, 109, 22, 3, 318, 3, 15, 51, 211, 107], // '“curly quotes” and ‘single’ — em dash'
        &[335, 2266, 226, 14388, 8525, 3, 9285, 4864, 6, 5743, 326, 6, 1713, 107, 3198, 2408, 3320, 10041], // '1024x1024, 3.5 guidance, 50% off, #hashtag @user'
        &[3, 15, 51, 21892, 3, 2, 11, 3, 2, 33, 7752],                                                      // 'emoji 🐱 and 猫 are unknown'
        &[3, 6880, 8742, 254, 17892, 1364, 6701, 2133, 4, 15, 308],                                         // 'UPPERCASE lowercase MiXeD'
        &[278, 31, 17, 54, 31, 17, 751, 31, 17, 34, 31, 7],                                                 // "don't can't won't it's"
    ];

    /// T5's real tokenizer.json, where `QUANTSMITH_T5_TOKENIZER` names it (ComfyUI's
    /// `comfy/text_encoders/t5_tokenizer/tokenizer.json`, not shipped here: it is
    /// ComfyUI's file), gives the ids python `tokenizers` gives.
    #[test]
    fn real_tokenizer_matches_python_tokenizers() {
        let Some(path) = std::env::var_os("QUANTSMITH_T5_TOKENIZER") else {
            println!(
                "SKIPPED real_tokenizer_matches_python_tokenizers: set QUANTSMITH_T5_TOKENIZER to T5's tokenizer.json \
                 (ComfyUI's comfy/text_encoders/t5_tokenizer/tokenizer.json)"
            );
            return;
        };
        let t = T5Tokenizer::from_file(Path::new(&path)).unwrap();
        assert_eq!(t.vocab_size(), 32100, "T5's 32000 pieces and 100 sentinels");
        for (prompt, want) in REAL_TOKENIZER_PROMPTS.iter().zip(REAL_TOKENIZER_IDS) {
            assert_eq!(t.tokenize(prompt).unwrap(), want, "{prompt:?}");
        }
        // The end token, then padding to SD3's minimum.
        let b = t.encode(&[REAL_TOKENIZER_PROMPTS[0]], SD3_MIN_TOKENS).unwrap();
        let mut want = REAL_TOKENIZER_IDS[0].to_vec();
        want.push(EOS_ID);
        want.resize(SD3_MIN_TOKENS, PAD_ID);
        assert_eq!(b.row(0), &want[..]);
    }

    #[test]
    fn bad_tokenizer_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let broken = dir.path().join("tokenizer.json");
        std::fs::write(&broken, "{\"model\": 3}").unwrap();
        let e = format!("{:#}", T5Tokenizer::from_file(&broken).err().unwrap());
        assert!(e.contains(&broken.display().to_string()) && e.contains("not a tokenizer.json"), "{e}");
        let missing = dir.path().join("none.json");
        let e = format!("{:#}", T5Tokenizer::from_file(&missing).err().unwrap());
        assert!(e.contains("none.json"), "{e}");
        // A valid tokenizer that is not T5's (`</s>` elsewhere).
        let text = std::fs::read_to_string(fixture()).unwrap().replace("</s>", "</z>");
        let other = dir.path().join("other.json");
        std::fs::write(&other, text).unwrap();
        let e = format!("{:#}", T5Tokenizer::from_file(&other).err().unwrap());
        assert!(e.contains("is not T5's tokenizer"), "{e}");
    }
}
