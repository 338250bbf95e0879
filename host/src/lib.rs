//! Quantsmith: diffusion checkpoints in, ComfyUI-loadable quantized checkpoints out.
//!
//! The crate reads as the pipeline:
//! [`checkpoint`] (memory-mapped input, streaming output) -> [`modules`] (the
//! module table) -> [`recipe`] (sandboxed WebAssembly recipes speaking the WIT
//! contract in `wit/`) -> [`plan`] (rules resolved and checked per layer) ->
//! [`formats`] / [`backend`] / [`gpu`] (quantization on CPU or CUDA) ->
//! [`convert`] (the streaming write) -> [`evaluate`] (re-reading and checking an
//! output). [`pipeline`] strings the stages together; [`synth`] makes synthetic
//! checkpoints with real layouts.

pub mod backend;
pub mod calibrate;
pub mod checkpoint;
pub mod convert;
pub mod error;
pub mod evaluate;
pub mod formats;
pub mod gpu;
pub mod models;
pub mod modules;
pub mod nn;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod recipe;
pub mod scaffold;
pub mod synth;
pub mod text;
