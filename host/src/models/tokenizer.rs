//! CLIP's byte-level BPE tokenizer, from a vocabulary the user points at.
//!
//! Checkpoints hold the text encoders' weights but not their vocabulary, so the
//! user names a directory with the Hugging Face / ComfyUI files `vocab.json` and
//! `merges.txt` (ComfyUI ships them in `comfy/sd1_tokenizer/`; its SDXL tokenizers
//! use the same files for both encoders).
//!
//! Semantics are OpenAI CLIP's (`SimpleTokenizer`) as Hugging Face's
//! `CLIPTokenizer` and ComfyUI reproduce them: NFC, whitespace runs collapsed to
//! one space, lowercase; CLIP's split pattern
//! `'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+` (whitespace is
//! dropped, digits are single tokens); each piece as UTF-8 bytes through GPT-2's
//! byte-to-unicode table; BPE over the piece with `</w>` appended to its last
//! symbol, merges applied by rank. `<|startoftext|>` / `<|endoftext|>` in the
//! text are the special tokens themselves, as in the reference.
//!
//! The `tokenizers` crate does the work (the same pipeline Hugging Face builds for
//! `CLIPTokenizerFast`). On its own it is a heavy dependency (about 50 s of a
//! single-job release build here, 140 s with the 39 crates only it pulls in), but
//! it costs nothing extra: candle-core, our CPU backend, already depends on it with
//! these very features (`default-features = false`, `fancy-regex`).
//!
//! Sequences are 77 tokens, `<|startoftext|>` + at most 75 tokens +
//! `<|endoftext|>`, then padding. [`ClipTokenizer::encode`] truncates longer
//! prompts, as diffusers and OpenCLIP do; [`ClipTokenizer::encode_chunked`] splits
//! them into 75-token chunks of their own 77-token sequences, as ComfyUI does (for
//! text without weights ComfyUI treats the whole prompt as one "word" and breaks it
//! exactly at chunk boundaries). ComfyUI's prompt-weight syntax (`(word:1.2)`) and
//! `embedding:` names are not interpreted: text is text.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Tokens per sequence for every CLIP text encoder of SD1.x / SDXL.
pub const CONTEXT_LENGTH: usize = 77;

pub const START_TOKEN: &str = "<|startoftext|>";
pub const END_TOKEN: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";
/// CLIP's split pattern, without the special tokens (the added-token stage
/// extracts those before it runs).
const SPLIT_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const HINT: &str = "point at a CLIP tokenizer directory with vocab.json and merges.txt, \
                    such as a ComfyUI install's `comfy/sd1_tokenizer/`";

/// What fills a sequence after its end token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// The end token again: CLIP-L in SD1.x and SDXL (ComfyUI's `pad_with_end`, diffusers).
    EndToken,
    /// Token id 0 (`!`): OpenCLIP bigG in SDXL (ComfyUI's SDXL `clip_g` tokenizer, OpenCLIP).
    Zero,
}

/// Token ids of a batch of prompts, `[batch, CONTEXT_LENGTH]` row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBatch {
    pub ids: Vec<u32>,
    /// Position of each row's (first) end token: where the pooled output is read.
    pub end_index: Vec<usize>,
}

impl TokenBatch {
    pub fn batch(&self) -> usize {
        self.end_index.len()
    }

    pub fn row(&self, i: usize) -> &[u32] {
        &self.ids[i * CONTEXT_LENGTH..(i + 1) * CONTEXT_LENGTH]
    }
}

/// CLIP's BPE tokenizer.
pub struct ClipTokenizer {
    inner: Tokenizer,
    start: u32,
    end: u32,
    vocab_size: usize,
}

impl ClipTokenizer {
    /// Loads `vocab.json` and `merges.txt` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<ClipTokenizer> {
        if !dir.is_dir() {
            bail!("CLIP tokenizer directory {} does not exist; {HINT}", dir.display());
        }
        ClipTokenizer::from_files(&dir.join("vocab.json"), &dir.join("merges.txt"))
    }

    pub fn from_files(vocab_path: &Path, merges_path: &Path) -> Result<ClipTokenizer> {
        let vocab_text = std::fs::read_to_string(vocab_path)
            .with_context(|| format!("cannot read the CLIP vocabulary {}; {HINT}", vocab_path.display()))?;
        let vocab: HashMap<String, u32> = serde_json::from_str(&vocab_text)
            .with_context(|| format!("{} is not a CLIP vocab.json (a JSON object of token -> id); {HINT}", vocab_path.display()))?;
        let merges_text = std::fs::read_to_string(merges_path)
            .with_context(|| format!("cannot read the CLIP merges {}; {HINT}", merges_path.display()))?;
        let merges = parse_merges(&merges_text).with_context(|| format!("{} is not a CLIP merges.txt; {HINT}", merges_path.display()))?;

        let special = |name: &str| {
            vocab.get(name).copied().ok_or_else(|| anyhow!("the CLIP vocabulary {} has no `{name}` token; {HINT}", vocab_path.display()))
        };
        let (start, end) = (special(START_TOKEN)?, special(END_TOKEN)?);
        let vocab_size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);

        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
            .end_of_word_suffix(END_OF_WORD.to_string())
            .unk_token(END_TOKEN.to_string())
            .build()
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("{} and {} do not belong together; {HINT}", vocab_path.display(), merges_path.display()))?;
        let mut inner = Tokenizer::new(bpe);
        let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(|e| anyhow!("{e}"))?;
        inner
            .with_normalizer(Some(NormalizerSequence::new(vec![NFC.into(), whitespace.into(), Lowercase.into()])))
            .map_err(|e| anyhow!("{e}"))?;
        let split =
            Split::new(SplitPattern::Regex(SPLIT_PATTERN.into()), SplitDelimiterBehavior::Removed, true).map_err(|e| anyhow!("{e}"))?;
        // The split pattern has already cut the words; ByteLevel only maps bytes.
        let bytes = ByteLevel::new(false, false, false);
        inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![split.into(), bytes.into()])));
        inner.add_special_tokens([AddedToken::from(START_TOKEN, true), AddedToken::from(END_TOKEN, true)]).map_err(|e| anyhow!("{e}"))?;
        Ok(ClipTokenizer { inner, start, end, vocab_size })
    }

    /// Id of `<|startoftext|>` (49406 in CLIP's vocabulary).
    pub fn start_token(&self) -> u32 {
        self.start
    }

    /// Id of `<|endoftext|>` (49407 in CLIP's vocabulary).
    pub fn end_token(&self) -> u32 {
        self.end
    }

    /// One more than the largest id (49408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The BPE token ids of `text`, without start, end, truncation or padding.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| anyhow!("cannot tokenize {text:?}: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// One 77-token row per 75-token chunk of each prompt (at least one, at most
    /// `max_chunks`), and the number of rows of each prompt.
    pub fn encode_chunked<S: AsRef<str>>(&self, prompts: &[S], padding: Padding, max_chunks: usize) -> Result<(TokenBatch, Vec<usize>)> {
        let pad = self.pad_id(padding);
        let mut ids = Vec::with_capacity(prompts.len() * CONTEXT_LENGTH);
        let mut end_index = Vec::with_capacity(prompts.len());
        let mut chunks = Vec::with_capacity(prompts.len());
        for (i, prompt) in prompts.iter().enumerate() {
            let tokens = self.tokenize(prompt.as_ref())?;
            let n = tokens.len().div_ceil(CONTEXT_LENGTH - 2).max(1);
            if n > max_chunks {
                bail!(
                    "prompt {i} has {} tokens; at most {} ({max_chunks} chunks of 75) are encoded",
                    tokens.len(),
                    max_chunks * (CONTEXT_LENGTH - 2)
                );
            }
            for c in 0..n {
                let part = &tokens[(c * (CONTEXT_LENGTH - 2)).min(tokens.len())..((c + 1) * (CONTEXT_LENGTH - 2)).min(tokens.len())];
                self.push_sequence(&mut ids, &mut end_index, part, pad);
            }
            chunks.push(n);
        }
        Ok((TokenBatch { ids, end_index }, chunks))
    }

    /// `[start] + tokens[..75] + [end] + padding` for each prompt.
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S], padding: Padding) -> Result<TokenBatch> {
        let pad = self.pad_id(padding);
        let mut ids = Vec::with_capacity(prompts.len() * CONTEXT_LENGTH);
        let mut end_index = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let tokens = self.tokenize(prompt.as_ref())?;
            self.push_sequence(&mut ids, &mut end_index, &tokens[..tokens.len().min(CONTEXT_LENGTH - 2)], pad);
        }
        Ok(TokenBatch { ids, end_index })
    }

    fn pad_id(&self, padding: Padding) -> u32 {
        match padding {
            Padding::EndToken => self.end,
            Padding::Zero => 0,
        }
    }

    /// `[start] + tokens (at most 75) + [end] + padding`: one 77-token row.
    fn push_sequence(&self, ids: &mut Vec<u32>, end_index: &mut Vec<usize>, tokens: &[u32], pad: u32) {
        ids.push(self.start);
        ids.extend_from_slice(tokens);
        end_index.push(ids.len() % CONTEXT_LENGTH);
        ids.push(self.end);
        ids.resize(ids.len().next_multiple_of(CONTEXT_LENGTH), pad);
    }
}

/// `merges.txt`: an optional `#version` header, then one `left right` pair per
/// line in rank order. Empty lines (a trailing newline) are skipped.
fn parse_merges(text: &str) -> Result<Merges> {
    let mut merges = Merges::new();
    for (n, line) in text.lines().enumerate() {
        if line.is_empty() || (n == 0 && line.starts_with("#version")) {
            continue;
        }
        match line.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => merges.push((a.to_string(), b.to_string())),
            _ => bail!("line {}: expected two tokens separated by one space, found {line:?}", n + 1),
        }
    }
    if merges.is_empty() {
        bail!("it has no merges");
    }
    Ok(merges)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The first 60 merges of OpenAI CLIP's `bpe_simple_vocab_16e6.txt`, in rank
    /// order. A vocabulary built from them the CLIP way gives every token below
    /// id 572 the id it has in the real 49408-token vocabulary.
    const MERGES: &str = "i n\nt h\na n\nr e\na r\ne r\nth e</w>\nin g</w>\no u\no n\ns t\no r\ne n\no n</w>\na l\n\
a t\ne r</w>\ni t\ni n</w>\nt o</w>\nr o\ni s</w>\nl e\ni c\na t</w>\nan d</w>\ne d</w>\no f</w>\nc h\no r</w>\n\
e s</w>\ni l\ne l\ns t</w>\na c\no m\na m\nl o\na n</w>\na y</w>\ns h\nr i\nl i\nt i\nf or</w>\nn e\nð Ł\nr a\n\
h a\nd e\no l\nv e</w>\ns i\nu r\na l</w>\ns e\n' s</w>\nu n\nd i\nb e\n";

    /// GPT-2 / CLIP byte-to-unicode table: printable Latin-1 bytes stand for
    /// themselves, the other 68 bytes map to U+0100 onwards, in byte order.
    fn byte_chars() -> Vec<char> {
        let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let mut chars: Vec<char> = (0..256u32).filter(|&b| printable(b)).map(|b| char::from_u32(b).unwrap()).collect();
        chars.extend((0..256u32).filter(|&b| !printable(b)).enumerate().map(|(n, _)| char::from_u32(256 + n as u32).unwrap()));
        chars
    }

    /// CLIP's vocabulary order: 256 byte symbols, the same with `</w>`, one token
    /// per merge in rank order, then the start and end tokens.
    pub(crate) fn write_test_vocab(dir: &Path) {
        let bytes = byte_chars();
        let mut vocab: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
        vocab.extend(bytes.iter().map(|c| format!("{c}{END_OF_WORD}")));
        vocab.extend(MERGES.lines().map(|l| l.replace(' ', "")));
        vocab.extend([START_TOKEN.to_string(), END_TOKEN.to_string()]);
        let map: serde_json::Map<String, serde_json::Value> =
            vocab.into_iter().enumerate().map(|(i, t)| (t, serde_json::Value::from(i))).collect();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("vocab.json"), serde_json::to_string(&map).unwrap()).unwrap();
        std::fs::write(dir.join("merges.txt"), format!("#version: 0.2\n{MERGES}")).unwrap();
    }

    pub(crate) fn test_tokenizer() -> (tempfile::TempDir, ClipTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        write_test_vocab(dir.path());
        let t = ClipTokenizer::from_dir(dir.path()).unwrap();
        (dir, t)
    }

    #[test]
    fn test_vocabulary_has_clip_layout() {
        let (_dir, t) = test_tokenizer();
        assert_eq!((t.start_token(), t.end_token(), t.vocab_size()), (572, 573, 574));
        let vocab = t.inner.get_vocab(false);
        // Spot checks that also hold in the real vocabulary.
        for (token, id) in [("!", 0), ("a", 64), ("!</w>", 256), ("a</w>", 320), ("in", 512), ("the</w>", 518), ("of</w>", 539)] {
            assert_eq!(vocab[token], id, "{token}");
        }
    }

    /// The files in tests/data/clip-vocab (for integration tests) are this vocabulary.
    #[test]
    fn shipped_vocabulary_matches_generator() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/clip-vocab");
        let dir = tempfile::tempdir().unwrap();
        write_test_vocab(dir.path());
        let read_json = |p: &Path| serde_json::from_str::<HashMap<String, u32>>(&std::fs::read_to_string(p).unwrap()).unwrap();
        assert_eq!(read_json(&shipped.join("vocab.json")), read_json(&dir.path().join("vocab.json")));
        assert_eq!(
            std::fs::read_to_string(shipped.join("merges.txt")).unwrap(),
            std::fs::read_to_string(dir.path().join("merges.txt")).unwrap()
        );
    }

    /// Ids derived by hand from the 60 merges (ranks in brackets; byte symbols:
    /// printable ASCII `c` is id `c - 33`, its `</w>` form `c - 33 + 256`).
    #[test]
    fn hand_derived_ids() {
        let (_dir, t) = test_tokenizer();
        let cases: &[(&str, &[u32])] = &[
            // a</w> 320; p h o, t o</w> [19] = 531; of</w> [27] = 539; c, a t</w> [24] = 536.
            // Real CLIP has later merges for "photo" (1125) and "cat" (2368); 320 and 539 are real ids.
            ("a photo of a cat", &[320, 79, 71, 78, 531, 539, 320, 66, 536]),
            // t h [1] then th e</w> [6]; a n [2] then an d</w> [25]; o r</w> [29] then f or</w> [44].
            // 518, 537, 556 are the real ids of "the", "and", "for".
            ("the and for", &[518, 537, 556]),
            // `i n` [0] needs a bare n: a final n is `n</w>`, which takes `i n</w>` [18].
            ("in", &[530]),
            ("ing", &[519]),
            // Lowest rank first: i n [0], in g</w> [7], s t [10]; `r i` [41] never gets its chance.
            ("string", &[522, 81, 519]),
            // `'s` is its own piece: ' s</w> [56] = 568; "it" is i + t</w> (`i t` [17] wants a bare t).
            ("it's", &[72, 339, 568]),
            // h el(e l [32]) l o</w>; ,</w>; w or(o r [11]) l d</w>; a punctuation run is one piece.
            ("hello, world!!", &[71, 544, 75, 334, 267, 86, 523, 75, 323, 0, 256]),
            // Every digit is a piece of its own.
            ("2024", &[273, 271, 273, 275]),
            // Whitespace runs collapse, case folds.
            ("  The\tAND\n\nfor  ", &[518, 537, 556]),
            // U+1F600 = F0 9F 98 80 -> ð Ł ĺ Ģ</w>; `ð Ł` [46] = 558; ĺ = 188 + 58, Ģ</w> = 256 + 188 + 34.
            ("\u{1F600}", &[558, 246, 478]),
            // é = C3 A9 -> Ã (127) ©</w> (256 + 102); a decomposed é is composed first (NFC).
            ("café", &[66, 64, 69, 127, 358]),
            ("cafe\u{301}", &[66, 64, 69, 127, 358]),
            // The special tokens in text are the special tokens.
            ("a<|endoftext|>b", &[320, 573, 321]),
            ("The cat'S toy", &[518, 66, 536, 568, 83, 78, 344]),
        ];
        for (text, ids) in cases {
            assert_eq!(t.tokenize(text).unwrap(), *ids, "{text:?}");
        }
    }

    #[test]
    fn start_end_and_padding() {
        let (_dir, t) = test_tokenizer();
        let prompts = ["the and for", ""];
        let with_end = t.encode(&prompts, Padding::EndToken).unwrap();
        let with_zero = t.encode(&prompts, Padding::Zero).unwrap();
        assert_eq!(with_end.batch(), 2);
        assert_eq!(with_end.ids.len(), 2 * CONTEXT_LENGTH);
        assert_eq!(with_end.end_index, vec![4, 1]);
        assert_eq!(with_zero.end_index, vec![4, 1]);
        assert_eq!(&with_end.row(0)[..5], &[572, 518, 537, 556, 573]);
        assert!(with_end.row(0)[5..].iter().all(|&id| id == 573));
        assert_eq!(&with_zero.row(0)[..5], &[572, 518, 537, 556, 573]);
        assert!(with_zero.row(0)[5..].iter().all(|&id| id == 0));
        assert_eq!(&with_zero.row(1)[..3], &[572, 573, 0]);
    }

    #[test]
    fn long_prompts_are_chunked_at_75_tokens() {
        let (_dir, t) = test_tokenizer();
        // "a" is one token: 80 of them make a chunk of 75 and one of 5; "" is one empty chunk.
        let long = vec!["a"; 80].join(" ");
        let (b, chunks) = t.encode_chunked(&[long.as_str(), ""], Padding::Zero, 4).unwrap();
        assert_eq!(chunks, vec![2, 1]);
        assert_eq!(b.batch(), 3);
        let a = t.tokenize("a").unwrap()[0];
        for (row, n) in [(0, 75), (1, 5), (2, 0)] {
            let r = b.row(row);
            assert_eq!(r[0], t.start_token());
            assert!(r[1..=n].iter().all(|&id| id == a), "row {row}");
            assert_eq!(r[n + 1], t.end_token());
            assert!(r[n + 2..].iter().all(|&id| id == 0));
            assert_eq!(b.end_index[row], n + 1);
        }
        // The truncating form keeps exactly the first chunk.
        assert_eq!(t.encode(&[long.as_str()], Padding::Zero).unwrap().row(0), b.row(0));
        let err = t.encode_chunked(&[vec!["a"; 400].join(" ")], Padding::Zero, 4).unwrap_err();
        assert!(err.to_string().contains("at most 300"), "{err}");
    }

    #[test]
    fn truncation_keeps_75_tokens() {
        let (_dir, t) = test_tokenizer();
        let exact = vec!["a"; 75].join(" ");
        let long = vec!["a"; 100].join(" ");
        let batch = t.encode(&[exact, long], Padding::Zero).unwrap();
        for row in 0..2 {
            let ids = batch.row(row);
            assert_eq!(ids[0], 572);
            assert!(ids[1..76].iter().all(|&id| id == 320));
            assert_eq!(ids[76], 573);
            assert_eq!(batch.end_index[row], 76);
        }
        // A multi-token word is cut mid-word, as CLIP does.
        let cut = t.encode(&[format!("{} string", vec!["a"; 74].join(" "))], Padding::EndToken).unwrap();
        assert_eq!(&cut.row(0)[74..], &[320, 522, 573]);
    }

    #[test]
    fn errors_name_the_files() {
        let missing = ClipTokenizer::from_dir(Path::new("/nonexistent/tokenizer")).err().unwrap();
        let msg = format!("{missing:#}");
        assert!(msg.contains("/nonexistent/tokenizer") && msg.contains("comfy/sd1_tokenizer"), "{msg}");

        let dir = tempfile::tempdir().unwrap();
        write_test_vocab(dir.path());
        std::fs::remove_file(dir.path().join("merges.txt")).unwrap();
        let msg = format!("{:#}", ClipTokenizer::from_dir(dir.path()).err().unwrap());
        assert!(msg.contains("merges.txt") && msg.contains("comfy/sd1_tokenizer"), "{msg}");

        std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\ni n\nt h x\n").unwrap();
        let msg = format!("{:#}", ClipTokenizer::from_dir(dir.path()).err().unwrap());
        assert!(msg.contains("merges.txt") && msg.contains("line 3"), "{msg}");

        // A merge whose result the vocabulary lacks: the files do not belong together.
        std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\nq z\n").unwrap();
        let msg = format!("{:#}", ClipTokenizer::from_dir(dir.path()).err().unwrap());
        assert!(msg.contains("do not belong together") && msg.contains("qz"), "{msg}");

        write_test_vocab(dir.path());
        std::fs::write(dir.path().join("vocab.json"), "[1, 2]").unwrap();
        let msg = format!("{:#}", ClipTokenizer::from_dir(dir.path()).err().unwrap());
        assert!(msg.contains("vocab.json") && msg.contains("not a CLIP vocab.json"), "{msg}");

        std::fs::write(dir.path().join("vocab.json"), r#"{"a": 0, "<|startoftext|>": 1}"#).unwrap();
        let msg = format!("{:#}", ClipTokenizer::from_dir(dir.path()).err().unwrap());
        assert!(msg.contains("<|endoftext|>"), "{msg}");
    }
}
