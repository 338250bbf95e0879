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
