//! Text encoders of the diffusion transformers, from the standalone files users
//! keep for ComfyUI (`models/text_encoders/`), and the conditioning ComfyUI builds
//! from them:
//!
//! - [`file`]: a text-encoder safetensors file (no diffusion model in it), with
//!   FP8 weights dequantized on load.
//! - [`detect`]: which encoder (CLIP-L, OpenCLIP-G, T5) a file holds.
//! - [`conditioning`]: SD3 and FLUX conditioning from the encoders' outputs.
//! - [`stack`]: the files of `--text-encoder`, checked and run on prompts.
//! - [`synth_text`]: synthetic standalone encoder files (tiny and full) for `synth`.
//! - [`t5`]: the T5 v1.1 encoder (T5-XXL in SD3 / SD3.5 / FLUX.1).
//! - [`t5_tokenizer`]: T5's Unigram tokenizer from a user's `tokenizer.json`.

pub mod conditioning;
pub mod detect;
pub mod file;
pub mod stack;
pub mod synth_text;
pub mod t5;
pub mod t5_tokenizer;
