//! Synthetic diffusion checkpoints with real layouts, for tests and demos.
//!
//! Tensor names, order and shapes come from the manifests in `host/manifests/`
//! (SD1.5, SDXL base, SD3-medium, FLUX.1-dev as ComfyUI's model classes define
//! them), or for the variants without a manifest from the model code's own
//! layout (SDXL refiner: `models::unet::ldm_layout`; SD3.5-medium and -large:
//! `models::mmdit::layout`, ComfyUI's `mmdit.py` with its detected configs); values are random but shaped like a trained model's: per-layer gains,
//! a few outlier input channels in every Linear weight, norm weights around 1,
//! small biases. Nothing here can produce images; it exercises every code path
//! that reads, detects, quantizes and writes checkpoints.
//!
//! Two scales:
//! - [`Scale::Full`]: the real shapes (FLUX.1-dev is 11.9 B parameters, 23.8 GB in bf16).
//! - [`Scale::Tiny`]: the same key structure (names, ranks, number of blocks) with
//!   internal widths divided by a per-family factor `k`. A dimension `d` is divided
//!   iff `d >= 256`, `d % k == 0` and `d` is not one of the family's *interface*
//!   dimensions, which stay as they are because ComfyUI and our detection read them
//!   (text context widths, pooled-vector widths, timestep-frequency widths, the
//!   SD3 position-table length). See [`Family::shrink_dim`].
//!
//! Output is written one tensor at a time through the streaming writer, so memory
//! stays flat whatever the model size (two tensor buffers: generating one tensor
//! overlaps writing the previous one; ~140 MB peak RSS for the 23.8 GB FLUX.1-dev).
//! Each tensor is generated in parallel over fixed-size chunks, each chunk seeded
//! from (seed, tensor name, chunk index): the bytes depend on the options only,
//! never on the thread count.
//!
//! FLUX's RMS-norm scales are written as `...norm.query_norm.scale` /
//! `...norm.key_norm.scale`, as in the released checkpoints and as ComfyUI's
//! detection probes them (the manifest lists them under the in-memory `.weight`).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, Result, anyhow, bail};
use half::{bf16, f16};
use rand::RngCore;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use safetensors::Dtype;
use serde::Deserialize;

use crate::checkpoint::DIFFUSION_PREFIX;
use crate::checkpoint::writer::{PlannedTensor, StreamingWriter};
use crate::models::text::synth_text::{TINY_CLIP_G_WIDTH, TINY_CLIP_L_WIDTH, TINY_T5_WIDTH};

/// The metadata key that marks a synthetic checkpoint; its value is
/// `family/variant/scale/seed[/init]`, e.g. `flux/dev/tiny/42` or
/// `sdxl/base/full/0/conditioned` (the init only when not the default).
pub const METADATA_KEY: &str = "quantsmith.synthetic";

/// Model families with a manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// Stable Diffusion 1.5 UNet (`manifests/sd15.json`).
    Sd15,
    /// SDXL base UNet (`manifests/sdxl.json`).
    Sdxl,
    /// SD3-medium MMDiT (`manifests/sd3_medium.json`); SD3.5-medium and -large as variants.
    Sd3,
    /// FLUX.1-dev (`manifests/flux_dev.json`).
    Flux,
}

/// Per-family layout facts.
struct Layout {
    manifest: &'static str,
    /// Tiny scale divides internal widths by this.
    divisor: usize,
    /// Interface widths that tiny scale keeps.
    keep: &'static [usize],
    /// Variants; the first is the default.
    variants: &'static [&'static str],
}

// Tiny-scale choices, checked against the manifests:
// - sd15, sdxl: k = 10 turns model_channels 320 into 32, the smallest width
//   GroupNorm(32 groups) accepts, so tiny UNets still instantiate; every UNet width
//   (320..10240, skip concatenations 960/1920/2560 included) divides by 10 into
//   multiples of 32. Kept: context 768 (sd15), context 2048 and adm 2816 (sdxl).
// - sd3: k = 24: hidden 1536 -> 64 (one head of the real head width 64), qkv 4608 ->
//   192, mlp 6144 -> 256, adaLN 9216 -> 384 / 3072 -> 128. Kept: context 4096, pooled
//   2048, timestep frequencies 256, position table 36864 (its width follows hidden).
//   ComfyUI derives depth from hidden / 64, so tiny SD3 only suits our own
//   detection, which counts joint blocks (k = 12 also works: 39 MB instead of 13 MB).
// - flux: k = 24: hidden 3072 -> 128 (one head of the real head width 128: the q/k
//   norm scales [128] are head widths and stay), qkv 9216 -> 384, mlp 12288 -> 512,
//   linear1 21504 -> 896 = 3*128 + 512, linear2 in 15360 -> 640 = 128 + 512, mod
//   18432 -> 768 / 9216 -> 384, final adaLN 6144 -> 256. Kept: txt 4096, vector 768,
//   timestep/guidance frequencies 256 (img_in's 64 is below the threshold).
const SD15: Layout = Layout { manifest: include_str!("../manifests/sd15.json"), divisor: 10, keep: &[768], variants: &["base", "inpaint"] };
const SDXL: Layout =
    Layout { manifest: include_str!("../manifests/sdxl.json"), divisor: 10, keep: &[2048, 2816], variants: &["base", "refiner"] };
const SD3: Layout = Layout {
    manifest: include_str!("../manifests/sd3_medium.json"),
    divisor: 24,
    keep: &[4096, 2048, 36864, 256],
    variants: &["medium", "3.5-medium", "3.5-large"],
};
const FLUX: Layout =
    Layout { manifest: include_str!("../manifests/flux_dev.json"), divisor: 24, keep: &[4096, 768, 256], variants: &["dev", "schnell"] };

impl Family {
    /// Every family, in a fixed order.
    pub const ALL: [Family; 4] = [Family::Sd15, Family::Sdxl, Family::Sd3, Family::Flux];

    /// Parses `sd15`, `sdxl`, `sd3` or `flux` (case-insensitive).
    pub fn parse(s: &str) -> Result<Family> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sd15" => Ok(Family::Sd15),
            "sdxl" => Ok(Family::Sdxl),
            "sd3" => Ok(Family::Sd3),
            "flux" => Ok(Family::Flux),
            _ => bail!("unknown model family `{s}` (expected one of: sd15, sdxl, sd3, flux)"),
        }
    }

    /// The name [`Family::parse`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd15 => "sd15",
            Family::Sdxl => "sdxl",
            Family::Sd3 => "sd3",
            Family::Flux => "flux",
        }
    }

    /// Variants [`SynthOptions::variant`] accepts; the first is the default.
    pub fn variants(self) -> &'static [&'static str] {
        self.layout().variants
    }

    /// The width a full-size dimension `d` has at [`Scale::Tiny`].
    pub fn shrink_dim(self, d: usize) -> usize {
        let l = self.layout();
        if d >= 256 && d.is_multiple_of(l.divisor) && !l.keep.contains(&d) { d / l.divisor } else { d }
    }

    fn layout(self) -> &'static Layout {
        match self {
            Family::Sd15 => &SD15,
            Family::Sdxl => &SDXL,
            Family::Sd3 => &SD3,
            Family::Flux => &FLUX,
        }
    }
}

impl FromStr for Family {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Family> {
        Family::parse(s)
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Size of the synthetic model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scale {
    /// Same key structure, internal widths shrunk (a few MB to ~115 MB).
    Tiny,
    /// The real shapes.
    Full,
}

impl Scale {
    /// Parses `tiny` or `full` (case-insensitive).
    pub fn parse(s: &str) -> Result<Scale> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tiny" => Ok(Scale::Tiny),
            "full" => Ok(Scale::Full),
            _ => bail!("unknown scale `{s}` (expected tiny or full)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scale::Tiny => "tiny",
            Scale::Full => "full",
        }
    }
}

impl FromStr for Scale {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Scale> {
        Scale::parse(s)
    }
}

impl fmt::Display for Scale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// On-disk element type of every tensor of the synthetic checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SynthDtype {
    #[default]
    Bf16,
    F16,
    F32,
}

impl SynthDtype {
    /// Parses `bf16`/`bfloat16`, `f16`/`fp16`/`float16`, `f32`/`fp32`/`float32`.
    pub fn parse(s: &str) -> Result<SynthDtype> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Ok(SynthDtype::Bf16),
            "f16" | "fp16" | "float16" => Ok(SynthDtype::F16),
            "f32" | "fp32" | "float32" => Ok(SynthDtype::F32),
            _ => bail!("unknown dtype `{s}` (expected bf16, f16 or f32)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SynthDtype::Bf16 => "bf16",
            SynthDtype::F16 => "f16",
            SynthDtype::F32 => "f32",
        }
    }

    /// The safetensors dtype.
    pub fn dtype(self) -> Dtype {
        match self {
            SynthDtype::Bf16 => Dtype::BF16,
            SynthDtype::F16 => Dtype::F16,
            SynthDtype::F32 => Dtype::F32,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            SynthDtype::Bf16 | SynthDtype::F16 => 2,
            SynthDtype::F32 => 4,
        }
    }
}

impl FromStr for SynthDtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<SynthDtype> {
        SynthDtype::parse(s)
    }
}

impl fmt::Display for SynthDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the values of the diffusion model are scaled (text encoders and VAE
/// always keep the default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SynthInit {
    /// Every weight matrix at 0.5..1.5 / sqrt(fan-in) with outlier input columns:
    /// wide activation ranges for the quantizers, but peaky attention and a
    /// residual stream that grows block after block.
    #[default]
    Default,
    /// Default values, except that the model runs like a trained one: attention
    /// logits of std ~1 and residual branches small next to the stream they add
    /// to (UNets: [`condition_unet`]; SD3 and FLUX: [`condition_dit`]).
    Conditioned,
}

impl SynthInit {
    /// Parses `default` or `conditioned` (case-insensitive).
    pub fn parse(s: &str) -> Result<SynthInit> {
        match s.trim().to_ascii_lowercase().as_str() {
            "default" => Ok(SynthInit::Default),
            "conditioned" => Ok(SynthInit::Conditioned),
            _ => bail!("unknown init `{s}` (expected default or conditioned)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SynthInit::Default => "default",
            SynthInit::Conditioned => "conditioned",
        }
    }
}

impl FromStr for SynthInit {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<SynthInit> {
        SynthInit::parse(s)
    }
}

impl fmt::Display for SynthInit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to generate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthOptions {
    pub family: Family,
    pub scale: Scale,
    /// Same options and seed give byte-identical files.
    pub seed: u64,
    /// `None` is the family's default (sd15 `base`, sdxl `base`, sd3 `medium`,
    /// flux `dev`). `flux` `schnell` drops `guidance_in.*`; `sd15` `inpaint` makes
    /// `input_blocks.0.0.weight` take 9 input channels; `sdxl` `refiner`; `sd3`
    /// `3.5-medium` and `3.5-large`.
    pub variant: Option<String>,
    /// A full single-file checkpoint: every diffusion-model key under
    /// `model.diffusion_model.`, plus small fake VAE (`first_stage_model.*`) and text
    /// encoder tensors (`cond_stage_model.*` for sd15, `conditioner.embedders.*` for
    /// sdxl, `text_encoders.*` for sd3 and flux) with real names and shrunk widths.
    pub full_checkpoint: bool,
    pub dtype: SynthDtype,
    pub init: SynthInit,
    /// SD3 and FLUX at [`Scale::Tiny`] only: the text interface (SD3's context 4096
    /// and pooled 2048, FLUX's `txt_in` 4096 and `vector_in` 768) takes the widths
    /// of the tiny synthetic text encoders instead (T5 [`TINY_T5_WIDTH`], CLIP-L
    /// [`TINY_CLIP_L_WIDTH`] ‖ OpenCLIP-G [`TINY_CLIP_G_WIDTH`]), so prompts run end
    /// to end through `synth clip-l|clip-g|t5xxl --scale tiny` files in CI-sized
    /// tests. Such a model is ours only: ComfyUI reads the real widths.
    pub tiny_text: bool,
}

impl SynthOptions {
    /// Tiny, seed 0, default variant, diffusion model only, bf16, default init.
    pub fn new(family: Family) -> SynthOptions {
        SynthOptions {
            family,
            scale: Scale::Tiny,
            seed: 0,
            variant: None,
            full_checkpoint: false,
            dtype: SynthDtype::Bf16,
            init: SynthInit::Default,
            tiny_text: false,
        }
    }

    /// The variant in effect (the family's default when none is set).
    pub fn resolved_variant(&self) -> Result<&'static str> {
        let variants = self.family.variants();
        match &self.variant {
            None => Ok(variants[0]),
            Some(v) => {
                let v = v.trim().to_ascii_lowercase();
                // The user's value: bad input (exit 3), as an unknown family or scale is.
                variants.iter().copied().find(|x| *x == v).ok_or_else(|| {
                    anyhow::Error::new(crate::error::BadInput(format!(
                        "unknown variant `{v}` for {} (expected one of: {})",
                        self.family,
                        variants.join(", ")
                    )))
                })
            }
        }
    }

    /// The `__metadata__` the file carries: `{"quantsmith.synthetic": "family/variant/scale/seed"}`,
    /// with `/conditioned` appended for [`SynthInit::Conditioned`].
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let v = self.resolved_variant()?;
        let mut value = format!("{}/{v}/{}/{}", self.family, self.scale, self.seed);
        if self.init != SynthInit::Default {
            value = format!("{value}/{}", self.init);
        }
        if self.tiny_text {
            value = format!("{value}/tiny-text");
        }
        Ok(HashMap::from([(METADATA_KEY.to_string(), value)]))
    }
}

/// What [`write`] produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynthSummary {
    /// Number of tensors.
    pub tensors: usize,
    /// Bytes of tensor data (the file adds the header).
    pub bytes: u64,
    /// Number of elements over all tensors.
    pub params: u64,
}

/// Names, shapes and dtypes of the checkpoint `opts` describes, in file order.
pub fn plan(opts: &SynthOptions) -> Result<Vec<PlannedTensor>> {
    Ok(build(opts)?.into_iter().map(|s| s.tensor).collect())
}

/// Generates the checkpoint and writes it to `dest` (atomically: a temporary file
/// renamed into place at the end; an error leaves nothing behind). `progress` is
/// called with (bytes of tensor data done, total) before the first tensor and after
/// each one.
pub fn write(opts: &SynthOptions, dest: &Path, progress: impl Fn(u64, u64)) -> Result<SynthSummary> {
    let specs = build(opts)?;
    let planned: Vec<PlannedTensor> = specs.iter().map(|s| s.tensor.clone()).collect();
    let total: u64 = planned.iter().map(|t| t.byte_len() as u64).sum();
    let params: u64 = planned.iter().map(|t| t.shape.iter().product::<usize>() as u64).sum();
    let mut writer = StreamingWriter::create(dest, planned, opts.metadata()?)?;
    progress(0, total);

    // Generating tensor i+1 overlaps writing tensor i: two buffers circulate between
    // this thread (generation, progress) and a writer thread, so memory stays at two
    // tensors at most. A buffer coming back reports its tensor written.
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>)>(1);
    let (free_tx, free_rx) = std::sync::mpsc::channel::<(u64, Vec<u8>)>();
    for _ in 0..2 {
        free_tx.send((0, Vec::new())).expect("channel open");
    }
    let result = std::thread::scope(|scope| -> Result<()> {
        let specs = &specs;
        let writer_thread = scope.spawn(move || -> Result<StreamingWriter> {
            for (i, buf) in full_rx {
                writer.write(&specs[i].tensor.name, &buf)?;
                // The generating side may have stopped; nothing to do then.
                let _ = free_tx.send((buf.len() as u64, buf));
            }
            Ok(writer)
        });
        let mut done = 0u64;
        let mut report = |written: u64| {
            if written > 0 {
                done += written;
                progress(done, total);
            }
        };
        for (i, spec) in specs.iter().enumerate() {
            // An error here means the writer failed; its error is reported below.
            let Ok((written, mut buf)) = free_rx.recv() else {
                break;
            };
            report(written);
            buf.resize(spec.tensor.byte_len(), 0);
            generate(spec, opts, &mut buf);
            if full_tx.send((i, buf)).is_err() {
                break;
            }
        }
        drop(full_tx);
        for (written, _) in free_rx {
            report(written);
        }
        let writer = writer_thread.join().map_err(|_| anyhow!("the checkpoint writer thread panicked"))??;
        writer.finish()
    });
    result.with_context(|| format!("cannot write the synthetic checkpoint {}", dest.display()))?;
    Ok(SynthSummary { tensors: specs.len(), bytes: total, params })
}

// ---------------------------------------------------------------------------
// Layout

#[derive(Deserialize)]
struct Manifest {
    /// Parameter count of the default variant (checked by the tests).
    #[cfg_attr(not(test), allow(dead_code))]
    params: u64,
    tensors: Vec<ManifestTensor>,
}

#[derive(Deserialize)]
struct ManifestTensor {
    name: String,
    shape: Vec<usize>,
}

fn manifest(family: Family) -> Result<Manifest> {
    serde_json::from_str(family.layout().manifest).with_context(|| format!("internal: the {family} manifest is invalid"))
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Init {
    /// N(mean, std^2).
    Normal { mean: f32, std: f32 },
    /// Linear weight `[out, in]`: N(0, std^2), with a few outlier input columns if `outliers`.
    Linear { std: f32, outliers: bool },
}

struct Spec {
    tensor: PlannedTensor,
    /// Seeds the values: the diffusion-model name without prefix, so a tensor has
    /// the same values in a full checkpoint, a diffusion-only file and either variant.
    seed_name: String,
    init: Init,
}

/// The input width [`SynthOptions::tiny_text`] gives the text-interface Linear
/// `name` (diffusion-model name), if it is one.
fn tiny_text_width(family: Family, name: &str) -> Option<usize> {
    match (family, name) {
        (Family::Sd3, "context_embedder.weight") | (Family::Flux, "txt_in.weight") => Some(TINY_T5_WIDTH),
        (Family::Sd3, "y_embedder.mlp.0.weight") => Some(TINY_CLIP_L_WIDTH + TINY_CLIP_G_WIDTH),
        (Family::Flux, "vector_in.in_layer.weight") => Some(TINY_CLIP_L_WIDTH),
        _ => None,
    }
}

fn build(opts: &SynthOptions) -> Result<Vec<Spec>> {
    let family = opts.family;
    let variant = opts.resolved_variant()?;
    if opts.tiny_text && (opts.scale != Scale::Tiny || !matches!(family, Family::Sd3 | Family::Flux)) {
        bail!("tiny text widths are for tiny SD3 and FLUX models, not {} at {} scale", family, opts.scale);
    }
    let mut m = manifest(family)?;
    // Layouts from the model code are already at the requested scale.
    let from_code = match (family, variant) {
        (Family::Sdxl, "refiner") => Some(refiner_tensors(opts.scale)),
        (Family::Sd3, "3.5-medium" | "3.5-large") => Some(sd35_tensors(variant, opts.scale)),
        _ => None,
    };
    let shrink = opts.scale == Scale::Tiny && from_code.is_none();
    if let Some(tensors) = from_code {
        m.tensors = tensors;
    }
    // (key, seed name, shape, part of the diffusion model)
    let mut raw: Vec<(String, String, Vec<usize>, bool)> = Vec::with_capacity(m.tensors.len() + 64);
    for t in m.tensors {
        if family == Family::Flux && variant == "schnell" && t.name.starts_with("guidance_in.") {
            continue;
        }
        let mut shape = t.shape;
        if family == Family::Sd15 && variant == "inpaint" && t.name == "input_blocks.0.0.weight" {
            shape[1] = 9;
        }
        if shrink {
            shape = shape.into_iter().map(|d| family.shrink_dim(d)).collect();
        }
        if let Some(w) = tiny_text_width(family, &t.name).filter(|_| opts.tiny_text)
            && let Some(last) = shape.last_mut()
        {
            *last = w;
        }
        let mut name = t.name;
        if family == Family::Flux {
            for norm in [".norm.query_norm.weight", ".norm.key_norm.weight"] {
                if let Some(stem) = name.strip_suffix(norm) {
                    name = format!("{stem}{}.scale", norm.strip_suffix(".weight").unwrap_or(norm));
                    break;
                }
            }
        }
        let key = if opts.full_checkpoint { format!("{DIFFUSION_PREFIX}{name}") } else { name.clone() };
        raw.push((key, name, shape, true));
    }
    // The refiner's checkpoint holds only OpenCLIP-bigG, under another prefix: none here.
    if opts.full_checkpoint && variant != "refiner" {
        for (key, shape) in components(family) {
            raw.push((key.clone(), key, shape, false));
        }
    }

    // Modules whose weight is 1-D are norms (LayerNorm, GroupNorm, RMSNorm).
    let norm_modules: HashSet<&str> = raw
        .iter()
        .filter(|(_, n, s, _)| s.len() == 1 && (n.ends_with(".weight") || n.ends_with(".scale")))
        .filter_map(|(_, n, _, _)| n.rsplit_once('.').map(|(m, _)| m))
        .collect();
    let conditioned = opts.init == SynthInit::Conditioned;
    let specs = raw
        .iter()
        .map(|(key, seed_name, shape, diffusion)| {
            let gain = 0.5 + unit(mix(tensor_key(opts.seed, seed_name), TAG_GAIN)) as f32;
            let mut init = classify(seed_name, shape, &norm_modules, gain);
            if conditioned && *diffusion {
                init = match family {
                    Family::Sd15 | Family::Sdxl => condition_unet(seed_name, shape, init),
                    Family::Sd3 | Family::Flux => condition_dit(seed_name, shape, init),
                };
            }
            Spec {
                tensor: PlannedTensor { name: key.clone(), dtype: opts.dtype.dtype(), shape: shape.clone() },
                seed_name: seed_name.clone(),
                init,
            }
        })
        .collect();
    Ok(specs)
}

/// The SDXL refiner has no manifest: its layout comes from ComfyUI's config
/// (`SDXLRefiner`); tiny keeps its structure and interfaces (context 1280, adm
/// 2560) with 32 model channels instead of 384.
fn refiner_tensors(scale: Scale) -> Vec<ManifestTensor> {
    use crate::models::unet::{UnetConfig, ldm_layout};
    let full = UnetConfig::sdxl_refiner();
    let cfg = match scale {
        Scale::Full => full,
        Scale::Tiny => UnetConfig { model_channels: 32, time_embed_dim: 128, ..full },
    };
    ldm_layout(&cfg).into_iter().map(|(name, shape)| ManifestTensor { name, shape }).collect()
}

/// SD3.5-medium and -large (no manifest): the layout of ComfyUI's detected
/// configs. Tiny keeps the structure and interfaces (blocks, attn2 layers, qk
/// norms, position table, context 4096, pooled 2048, 256 frequencies) with one
/// 64-wide head, as tiny SD3-medium has.
fn sd35_tensors(variant: &str, scale: Scale) -> Vec<ManifestTensor> {
    use crate::models::mmdit::{HEAD_DIM, MmditConfig, layout};
    let full = if variant == "3.5-large" { MmditConfig::sd35_large() } else { MmditConfig::sd35_medium() };
    let cfg = match scale {
        Scale::Full => full,
        Scale::Tiny => MmditConfig { hidden: HEAD_DIM, heads: 1, mlp_hidden: 4 * HEAD_DIM, ..full },
    };
    layout(&cfg).into_iter().map(|(name, shape)| ManifestTensor { name, shape }).collect()
}

fn classify(name: &str, shape: &[usize], norm_modules: &HashSet<&str>, gain: f32) -> Init {
    let (module, leaf) = name.rsplit_once('.').unwrap_or(("", name));
    let embedding = name.contains("pos_embed")
        || name.contains("embedding")
        || name.contains("relative_attention_bias")
        || name.ends_with("shared.weight");
    if embedding {
        return Init::Normal { mean: 0.0, std: 0.02 };
    }
    let bias = leaf == "bias" || leaf.ends_with("_bias");
    match shape.len() {
        0 | 1 if bias => Init::Normal { mean: 0.0, std: if norm_modules.contains(module) { 0.05 } else { 0.02 } },
        0 | 1 => Init::Normal { mean: 1.0, std: 0.05 },
        2 => Init::Linear { std: gain / (shape[1] as f32).sqrt(), outliers: true },
        _ => Init::Normal { mean: 0.0, std: gain / (shape[1..].iter().product::<usize>() as f32).sqrt() },
    }
}

/// [`SynthInit::Conditioned`]'s change to a UNet tensor's default init (LDM names).
///
/// Measured with diffusers on the default init (scripts/unet_reference.py, CPU,
/// tiny models): attention logits of std 2.6 (median) up to 11, from q and k whose
/// outlier columns dominate their variance at small widths; and a residual stream
/// of RMS 10 to 60, grown by feed-forward and transformer branches up to 10 and 27
/// times the stream they add to. bf16 then moves the output by 3 to 10% (full
/// size) and up to 100% (tiny): bf16 runs cannot be compared at 1e-2.
/// Here q and k have plain 1/sqrt(fan-in) rows, so on their RMS-1 inputs (LayerNorm
/// output, the text context) logits have std ~1 (0.7 to 1.3); the last layer of
/// every residual branch is scaled down, leaving branches at a median 0.02 to 0.5
/// of the stream. bf16 then moves the output by 0.6 to 0.8%, next to the 0.6% that
/// rounding the stream after every add and convolution costs on its own (measured
/// with every branch zeroed). `out.2` stays: it scales the output, not its error.
fn condition_unet(name: &str, shape: &[usize], init: Init) -> Init {
    // The last layer of each branch: ResBlock, attention, feed-forward. A
    // SpatialTransformer's `proj_out` carries the whole transformer (up to ten
    // blocks, its own O(1) token stream whatever the outer stream's scale), so
    // half as much again.
    const BRANCH_OUTPUTS: [(&str, f32); 4] =
        [(".out_layers.3.weight", 0.1), (".to_out.0.weight", 0.1), (".ff.net.2.weight", 0.1), (".proj_out.weight", 0.05)];
    if name.ends_with(".to_q.weight") || name.ends_with(".to_k.weight") {
        return Init::Linear { std: 1.0 / (shape[1] as f32).sqrt(), outliers: false };
    }
    let scale = BRANCH_OUTPUTS.iter().find(|(suffix, _)| name.ends_with(suffix)).map_or(1.0, |&(_, s)| s);
    match init {
        Init::Normal { mean, std } => Init::Normal { mean, std: std * scale },
        Init::Linear { std, outliers } => Init::Linear { std: std * scale, outliers },
    }
}

/// [`SynthInit::Conditioned`]'s change to an SD3 / FLUX tensor's default init
/// (original names).
///
/// Measured on the tiny models with bf16 activations emulated on the CPU
/// (`models::mmdit::conditioned_tests`): the default init moves SD3-medium's
/// output by 70% in bf16 (SD3.5 and FLUX: ~1%, their qk norms bound the
/// logits that the outlier columns would blow up). Its adaLN modulations have std ~0.5 to 1, so `1 + scale` spans
/// 0..2 and every gate passes its branch at full size, and the outlier columns
/// (8 to 20 times, 1 of 64 input columns at tiny width) make every Linear
/// amplify: the random network is chaotic and bf16 rounding compounds. Trained
/// DiTs start from zero modulations (adaLN-Zero, DiT section 3.2) and stay near
/// them. Here:
/// - modulation Linears (`adaLN_modulation.1`, `*_mod.lin`, `modulation.lin`):
///   the same draws times 0.1, so `1 + scale` ~ 1 and gates ~ 0.05 to 0.1;
/// - the last Linear of each residual branch (`attn.proj`, `attn2.proj`,
///   `mlp.fc2`; FLUX's `*_attn.proj`, `*_mlp.2`, `linear2`): the same draws
///   (outlier columns kept) times 0.3;
/// - every other Linear weight: plain rows at the default std, without outlier
///   columns, and the producers of q and k (`qkv`, FLUX's `linear1`) at
///   1/sqrt(fan-in), so logits have std ~1 on the RMS-1 modulated LayerNorm
///   output where there is no qk norm (SD3-medium).
///
/// bf16 then moves the tiny models' output by about 1% (0.6% with every branch
/// and modulation near zero: the floor of rounding the embeddings, the stream and
/// the final layer).
fn condition_dit(name: &str, shape: &[usize], init: Init) -> Init {
    const MODULATION: [&str; 3] = [".adaLN_modulation.1.weight", "_mod.lin.weight", ".modulation.lin.weight"];
    const BRANCH_OUTPUTS: [&str; 6] =
        [".attn.proj.weight", ".attn2.proj.weight", ".mlp.fc2.weight", "_attn.proj.weight", "_mlp.2.weight", ".linear2.weight"];
    const QK_PRODUCERS: [&str; 2] = [".qkv.weight", ".linear1.weight"];
    let Init::Linear { std, outliers } = init else { return init };
    if QK_PRODUCERS.iter().any(|s| name.ends_with(s)) {
        Init::Linear { std: 1.0 / (shape[1] as f32).sqrt(), outliers: false }
    } else if MODULATION.iter().any(|s| name.ends_with(s)) {
        Init::Linear { std: std * 0.1, outliers }
    } else if BRANCH_OUTPUTS.iter().any(|s| name.ends_with(s)) {
        Init::Linear { std: std * 0.3, outliers }
    } else {
        Init::Linear { std, outliers: false }
    }
}

/// Small fake VAE and text encoders with real key names (one block each).
fn components(family: Family) -> Vec<(String, Vec<usize>)> {
    let mut a = Acc::default();
    // VAE (LDM AutoencoderKL names). SD1.5/SDXL latents have 4 channels and
    // quant convs; SD3/FLUX latents have 16 and none.
    let z = if matches!(family, Family::Sd15 | Family::Sdxl) { 4 } else { 16 };
    let c = 32;
    let enc = "first_stage_model.encoder.";
    a.conv(&format!("{enc}conv_in"), c, 3, 3);
    a.resnet(&format!("{enc}down.0.block.0"), c);
    a.norm(&format!("{enc}mid.attn_1.norm"), c);
    for p in ["q", "k", "v", "proj_out"] {
        a.conv(&format!("{enc}mid.attn_1.{p}"), c, c, 1);
    }
    a.norm(&format!("{enc}norm_out"), c);
    a.conv(&format!("{enc}conv_out"), 2 * z, c, 3);
    if z == 4 {
        a.conv("first_stage_model.quant_conv", 2 * z, 2 * z, 1);
        a.conv("first_stage_model.post_quant_conv", z, z, 1);
    }
    let dec = "first_stage_model.decoder.";
    a.conv(&format!("{dec}conv_in"), c, z, 3);
    a.resnet(&format!("{dec}mid.block_1"), c);
    a.norm(&format!("{dec}norm_out"), c);
    a.conv(&format!("{dec}conv_out"), 3, c, 3);

    // SD1.5/SDXL encoders keep their real widths (768, 1280: heads of 64) so
    // that calibration can encode prompts into the context the UNet expects;
    // one layer each and a 1024-token vocabulary keep them small.
    match family {
        Family::Sd15 => a.clip_hf("cond_stage_model.transformer.", false, CLIP_L_DIM, CLIP_VOCAB),
        Family::Sdxl => {
            a.clip_hf("conditioner.embedders.0.transformer.", false, CLIP_L_DIM, CLIP_VOCAB);
            a.open_clip("conditioner.embedders.1.model.", CLIP_G_DIM, CLIP_VOCAB);
        }
        Family::Sd3 => {
            a.clip_hf("text_encoders.clip_l.transformer.", false, TE_DIM, TE_VOCAB);
            a.clip_hf("text_encoders.clip_g.transformer.", true, TE_DIM, TE_VOCAB);
            a.t5("text_encoders.t5xxl.transformer.");
        }
        Family::Flux => {
            a.clip_hf("text_encoders.clip_l.transformer.", false, TE_DIM, TE_VOCAB);
            a.t5("text_encoders.t5xxl.transformer.");
        }
    }
    a.0
}

#[derive(Default)]
struct Acc(Vec<(String, Vec<usize>)>);

/// Fake text-encoder width, vocabulary and sequence length.
const TE_DIM: usize = 32;
const TE_VOCAB: usize = 128;
const TE_POSITIONS: usize = 77;
/// Real CLIP-L and OpenCLIP-bigG widths, and a vocabulary large enough for the
/// test vocabulary in tests/data/clip-vocab (574 tokens).
const CLIP_L_DIM: usize = 768;
const CLIP_G_DIM: usize = 1280;
const CLIP_VOCAB: usize = 1024;

impl Acc {
    fn add(&mut self, name: String, shape: &[usize]) {
        self.0.push((name, shape.to_vec()));
    }
    fn conv(&mut self, m: &str, out: usize, inp: usize, k: usize) {
        self.add(format!("{m}.weight"), &[out, inp, k, k]);
        self.add(format!("{m}.bias"), &[out]);
    }
    fn linear(&mut self, m: &str, out: usize, inp: usize, bias: bool) {
        self.add(format!("{m}.weight"), &[out, inp]);
        if bias {
            self.add(format!("{m}.bias"), &[out]);
        }
    }
    fn norm(&mut self, m: &str, c: usize) {
        self.add(format!("{m}.weight"), &[c]);
        self.add(format!("{m}.bias"), &[c]);
    }
    fn resnet(&mut self, m: &str, c: usize) {
        self.norm(&format!("{m}.norm1"), c);
        self.conv(&format!("{m}.conv1"), c, c, 3);
        self.norm(&format!("{m}.norm2"), c);
        self.conv(&format!("{m}.conv2"), c, c, 3);
    }
    /// Hugging Face CLIPTextModel names (CLIP-L, and CLIP-G as ComfyUI stores it).
    fn clip_hf(&mut self, p: &str, projection: bool, d: usize, vocab: usize) {
        let t = format!("{p}text_model.");
        self.add(format!("{t}embeddings.token_embedding.weight"), &[vocab, d]);
        self.add(format!("{t}embeddings.position_embedding.weight"), &[TE_POSITIONS, d]);
        let l = format!("{t}encoder.layers.0.");
        for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            self.linear(&format!("{l}self_attn.{proj}"), d, d, true);
        }
        self.norm(&format!("{l}layer_norm1"), d);
        self.linear(&format!("{l}mlp.fc1"), 4 * d, d, true);
        self.linear(&format!("{l}mlp.fc2"), d, 4 * d, true);
        self.norm(&format!("{l}layer_norm2"), d);
        self.norm(&format!("{t}final_layer_norm"), d);
        if projection {
            self.linear(&format!("{p}text_projection"), d, d, false);
        }
    }
    /// OpenCLIP names (SDXL's ViT-bigG text tower).
    fn open_clip(&mut self, p: &str, d: usize, vocab: usize) {
        self.add(format!("{p}positional_embedding"), &[TE_POSITIONS, d]);
        self.add(format!("{p}text_projection"), &[d, d]);
        self.add(format!("{p}token_embedding.weight"), &[vocab, d]);
        let r = format!("{p}transformer.resblocks.0.");
        self.add(format!("{r}attn.in_proj_weight"), &[3 * d, d]);
        self.add(format!("{r}attn.in_proj_bias"), &[3 * d]);
        self.linear(&format!("{r}attn.out_proj"), d, d, true);
        self.norm(&format!("{r}ln_1"), d);
        self.norm(&format!("{r}ln_2"), d);
        self.linear(&format!("{r}mlp.c_fc"), 4 * d, d, true);
        self.linear(&format!("{r}mlp.c_proj"), d, 4 * d, true);
        self.norm(&format!("{p}ln_final"), d);
    }
    /// T5 v1.1 encoder names (no biases, gated feed-forward, RMS norms without bias).
    fn t5(&mut self, p: &str) {
        let d = TE_DIM;
        let ff = 80; // d_ff / d_model = 2.5 as in T5-XXL
        let heads = 4;
        let b = format!("{p}encoder.block.0.layer.");
        for w in ["q", "k", "v", "o"] {
            self.linear(&format!("{b}0.SelfAttention.{w}"), d, d, false);
        }
        self.add(format!("{b}0.SelfAttention.relative_attention_bias.weight"), &[32, heads]);
        self.add(format!("{b}0.layer_norm.weight"), &[d]);
        self.linear(&format!("{b}1.DenseReluDense.wi_0"), ff, d, false);
        self.linear(&format!("{b}1.DenseReluDense.wi_1"), ff, d, false);
        self.linear(&format!("{b}1.DenseReluDense.wo"), d, ff, false);
        self.add(format!("{b}1.layer_norm.weight"), &[d]);
        self.add(format!("{p}encoder.final_layer_norm.weight"), &[d]);
        self.add(format!("{p}shared.weight"), &[TE_VOCAB, d]);
    }
}

// ---------------------------------------------------------------------------
// Values

/// Elements per independently seeded chunk. Fixed: the output must not depend on
/// the thread count.
const CHUNK: usize = 1 << 16;
/// Share of a Linear weight's input columns that are outliers (at least one).
const OUTLIER_SHARE: f64 = 0.005;
const TAG_GAIN: u64 = 0xA5A5_0000_0000_0001;
const TAG_OUTLIERS: u64 = 0xA5A5_0000_0000_0002;
const TAG_CHUNK: u64 = 0x5A5A_0000_0000_0000;

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn mix(a: u64, b: u64) -> u64 {
    splitmix64(a ^ splitmix64(b))
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3))
}

fn tensor_key(seed: u64, name: &str) -> u64 {
    mix(splitmix64(seed), fnv1a(name))
}

/// A uniform in [0, 1) from 53 bits.
fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// xoshiro256++, written out so the stream never changes with a dependency update.
struct Xoshiro256pp([u64; 4]);

impl Xoshiro256pp {
    fn new(seed: u64) -> Xoshiro256pp {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            splitmix64(z)
        };
        Xoshiro256pp([next(), next(), next(), next()])
    }
}

impl RngCore for Xoshiro256pp {
    #[inline]
    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    #[inline]
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        rand::rand_core::impls::fill_bytes_via_next(self, dst)
    }
}

/// Per-input-column multipliers of a Linear weight: 1, except ~0.5% of the columns
/// (at least one) scaled by 8..20, like the activation-outlier channels trained
/// models show.
fn outlier_columns(key: u64, cols: usize) -> Vec<f32> {
    let mut scale = vec![1.0f32; cols];
    let n = ((cols as f64 * OUTLIER_SHARE).round() as usize).clamp(1, cols);
    let mut rng = Xoshiro256pp::new(mix(key, TAG_OUTLIERS));
    let mut placed = 0;
    while placed < n {
        let c = (rng.next_u64() % cols as u64) as usize;
        if scale[c] == 1.0 {
            scale[c] = 8.0 + 12.0 * unit(rng.next_u64()) as f32;
            placed += 1;
        }
    }
    scale
}

/// Fills `out` (exactly the tensor's bytes) with the tensor's values.
fn generate(spec: &Spec, opts: &SynthOptions, out: &mut [u8]) {
    let key = tensor_key(opts.seed, &spec.seed_name);
    let (mean, std, cols) = match spec.init {
        Init::Normal { mean, std } => (mean, std, None),
        Init::Linear { std, outliers: true } => (0.0, std, Some(outlier_columns(key, spec.tensor.shape[1]))),
        Init::Linear { std, outliers: false } => (0.0, std, None),
    };
    let width = opts.dtype.size();
    let dtype = opts.dtype;
    out.par_chunks_mut(CHUNK * width).enumerate().for_each(|(ci, buf)| {
        let mut rng = Xoshiro256pp::new(mix(key, TAG_CHUNK ^ ci as u64));
        let cols = cols.as_deref().map(|c| (c, (ci * CHUNK) % c.len()));
        match dtype {
            SynthDtype::Bf16 => fill(buf, &mut rng, mean, std, cols, |v| bf16::from_f32(v).to_le_bytes()),
            SynthDtype::F16 => fill(buf, &mut rng, mean, std, cols, |v| f16::from_f32(v).to_le_bytes()),
            SynthDtype::F32 => fill(buf, &mut rng, mean, std, cols, |v: f32| v.to_le_bytes()),
        }
    });
}

/// Fills one chunk: `mean + std * z` per element, `z` standard normal, times the
/// column's multiplier for a Linear weight (`cols` = multipliers and the chunk's
/// first column), encoded little-endian by `enc`.
#[inline(always)]
fn fill<const W: usize>(
    buf: &mut [u8],
    rng: &mut Xoshiro256pp,
    mean: f32,
    std: f32,
    cols: Option<(&[f32], usize)>,
    enc: impl Fn(f32) -> [u8; W],
) {
    let mut out = buf.chunks_exact_mut(W);
    match cols {
        None => {
            for b in out {
                let z: f32 = StandardNormal.sample(rng);
                b.copy_from_slice(&enc(mean + std * z));
            }
        }
        Some((scale, mut col)) => loop {
            // One run of columns up to the end of a row; `run` first in the zip so
            // no output element is consumed when the row ends.
            let run = &scale[col..];
            let mut n = 0;
            for (&s, b) in run.iter().zip(&mut out) {
                let z: f32 = StandardNormal.sample(rng);
                b.copy_from_slice(&enc(mean + std * s * z));
                n += 1;
            }
            if n < run.len() {
                break;
            }
            col = 0;
        },
    }
}

#[cfg(test)]
#[path = "synth_tests.rs"]
mod tests;
