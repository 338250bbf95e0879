//! The host side of the `calibration` WIT interface: tensors and conditioning
//! held by the host (recipes see numbered handles), the observed forward pass,
//! and the limits that keep a hostile recipe from exhausting the machine.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use super::schedule::Spacing;
use super::smooth;
use crate::checkpoint::Checkpoint;
use crate::models::arch::{Architecture, Backbone, TextStack};
use crate::models::clip::{self, SizeConditioning, TextEncoders, TextFamily};
use crate::models::denoiser::{Conditioning, Denoiser, Network};
use crate::models::text::conditioning::TextWidths;
use crate::models::text::detect::EncoderKind;
use crate::models::text::stack::{DitText, TextFiles};
use crate::models::text::t5_tokenizer::T5Tokenizer;
use crate::models::text::t5_tokenizer::{FLUX_MIN_TOKENS, SD3_MIN_TOKENS};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::{InputHooks, WeightSource};
use crate::nn::{ObserverSpec, ObserverStats, Ops};

/// The resource behind a WIT `tensor`: an id into the session's tensor table.
pub struct TensorHandle {
    pub id: u32,
}

/// The resource behind a WIT `conditioning`.
pub struct CondHandle {
    pub id: u32,
}

/// Where a recipe's conditioning comes from (the WIT `conditioning-source`).
#[derive(Clone, Debug, PartialEq)]
pub enum CondSource {
    Random { count: usize, seed: u64, spread: f32 },
    File { start: usize, count: usize },
    Prompts(Vec<String>),
}

/// What the session tells a recipe about the run (the WIT `calibration-info`).
#[derive(Clone, Debug, PartialEq)]
pub struct SessionInfo {
    pub family: String,
    pub latent_channels: u32,
    pub native_resolution: u32,
    pub has_text_encoders: bool,
    pub has_tokenizer: bool,
    pub calib_data_rows: u32,
    pub device: String,
}

/// Bounds on what a recipe may make the host do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// Elements of one tensor.
    pub max_tensor_elements: usize,
    /// Elements of all live tensors together.
    pub max_live_elements: usize,
    /// `denoise` calls in the whole run; prompt encodings (text-encoder passes)
    /// and `smooth` calls (a scan of the consumers' weights) count too. These
    /// passes are the host work not charged to the recipe's time budget
    /// (recipe::calibration_impl), so their number is bounded here.
    pub max_forwards: usize,
    /// Batch of one `denoise` call.
    pub max_batch: usize,
    /// Step buckets (`step` < this).
    pub max_steps: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits { max_tensor_elements: 1 << 28, max_live_elements: 1 << 31, max_forwards: 8192, max_batch: 16, max_steps: 1000 }
    }
}

/// The calibration host calls, object-safe so the wasmtime store can hold any backend.
pub trait CalibSession: Send {
    fn info(&self) -> SessionInfo;
    fn randn(&mut self, shape: &[usize], seed: u64) -> Result<u32>;
    fn schedule(&self, steps: usize, spacing: Spacing) -> Result<(Vec<f32>, Vec<f32>)>;
    fn conditioning(&mut self, source: CondSource, width: u32, height: u32) -> Result<u32>;
    fn concat_conditioning(&mut self, parts: &[u32]) -> Result<u32>;
    fn cond_batch(&self, id: u32) -> u32;
    fn add(&mut self, a: u32, b: u32) -> Result<u32>;
    fn scale(&mut self, a: u32, s: f32) -> Result<u32>;
    fn lerp(&mut self, a: u32, b: u32, t: f32) -> Result<u32>;
    fn concat(&mut self, parts: &[u32], dim: usize) -> Result<u32>;
    fn slice_batch(&mut self, a: u32, start: usize, len: usize) -> Result<u32>;
    fn denoise(&mut self, x: u32, sigma: f32, cond: u32, step: usize) -> Result<u32>;
    fn shape(&self, id: u32) -> Vec<usize>;
    fn read(&self, id: u32) -> Result<Vec<f32>>;
    fn drop_tensor(&mut self, id: u32);
    fn drop_cond(&mut self, id: u32);
    /// The detected family as the host runs it (the WIT `sampling-info`).
    fn arch(&self) -> &Architecture;
    /// A copy of conditioning `cond` with distilled guidance `value` on every row.
    fn with_guidance(&mut self, cond: u32, value: f32) -> Result<u32>;
    /// What the observers saw, slot order as given at creation.
    fn observers(&self) -> Result<Vec<ObserverStats>>;
    /// One module's observer and the step buckets used so far.
    fn activation_stats(&self, module: &str) -> Result<(ObserverStats, Vec<usize>)> {
        let slot =
            self.observed_slot(module).ok_or_else(|| anyhow!("module `{module}` is not quantized by the plan, so it is not observed"))?;
        let all = self.observers()?;
        Ok((all[slot].clone(), self.stats().steps))
    }
    fn observed_slot(&self, module: &str) -> Option<usize>;
    /// SmoothQuant groups whose producer can carry the factors and that have
    /// at least one observed (quantized) consumer.
    fn smoothing_groups(&self) -> Vec<smooth::Group>;
    /// Chooses SmoothQuant factors for `producer` from what the observers saw
    /// so far and the consumers' weights; they are folded at write time.
    /// Also returns the input's per-channel amax the factors came from.
    fn smooth(&mut self, producer: &str, alpha: f32) -> Result<(smooth::Smoothed, Vec<f32>)>;
    /// The factors chosen so far.
    fn smoothing(&self) -> smooth::Smoothing;
    /// Forward passes run, steps seen and time spent in them.
    fn stats(&self) -> SessionStats;
    /// For getting the concrete session back after the recipe is done.
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any>;
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SessionStats {
    pub forwards: usize,
    pub samples: usize,
    /// Step buckets that received at least one forward pass.
    pub steps: Vec<usize>,
    /// Host time in `denoise` calls. The device runs behind the host, so this is
    /// the time to queue the passes plus whatever waiting the queue forced.
    pub forward_seconds: f64,
    /// Loading the backbone onto the device and setting up the observers (part
    /// of the calibration's wall time; ModelOpt's figure starts with the model loaded).
    pub load_seconds: f64,
    pub peak_device_bytes: Option<u64>,
}

/// Conditioning on the device: context and, for SDXL and the DiTs, the `y` vector.
pub type Cond<T> = Conditioning<T>;

/// Held-out conditioning for the evaluation, by preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeldOut {
    /// [`HELD_OUT_PROMPTS`] through the checkpoint's encoders.
    Prompts,
    /// `--calib-data` rows, from the last one backwards.
    FileRows,
    /// N(0, 1) contexts and pooled vectors with other seeds.
    Random,
}

impl HeldOut {
    pub fn describe(self) -> &'static str {
        match self {
            HeldOut::Prompts => "other prompts",
            HeldOut::FileRows => "--calib-data rows",
            HeldOut::Random => "random conditioning",
        }
    }
}

/// Prompts the evaluation holds out: none of them is in the SDK's calibration
/// set, and they span other subjects and styles.
pub const HELD_OUT_PROMPTS: &[&str] = &[
    "a lighthouse keeper reading by candlelight, oil painting",
    "close-up of a hummingbird drinking from a red flower, high speed photography",
    "a snowy mountain village at dusk, warm windows, wide angle",
    "cyberpunk street market in the rain, neon signs, night",
    "a ceramic teapot on a linen cloth, soft studio light, product shot",
    "children flying kites on a windy beach, watercolor",
    "an astronaut portrait inside a space station, cinematic lighting",
    "a field of sunflowers under a thunderstorm, dramatic sky",
];

/// What a session needs besides the backend.
pub struct SessionInputs {
    pub checkpoint: Arc<Checkpoint>,
    /// The detected family and variant, as the host runs it.
    pub arch: Architecture,
    /// The diffusion transformers' text encoders and T5 tokenizer, if given.
    pub text: Option<DitTextInputs>,
    pub tokenizer_dir: Option<PathBuf>,
    /// The `--calib-data` file and its row count (checked by [`calib_data_rows`]).
    pub calib_data: Option<(PathBuf, usize)>,
    /// One observer per quantizable module input: (module path, spec).
    pub observed: Vec<(String, ObserverSpec)>,
    pub limits: SessionLimits,
    /// Counts forward passes (`denoise` calls).
    pub progress: crate::progress::Progress,
    /// How many walks the recipe says it takes (its `calib-samples`), if it says:
    /// with the steps of its schedule, the display's expected total.
    pub walks: Option<u64>,
}

/// The user's text-encoder files and T5 tokenizer for an SD3/3.5 or FLUX
/// model, opened and checked against it.
pub struct DitTextInputs {
    pub files: TextFiles,
    pub stack: DitText,
    pub widths: TextWidths,
    pub t5_tokenizer: Option<T5Tokenizer>,
    /// Encoders the model takes that were not given (zeros in their place).
    pub notes: Vec<String>,
}

impl DitTextInputs {
    /// `None` when no file was given. Every error names the file. The widths the
    /// encoders must have are `arch`'s, read from the model's weights
    /// ([`crate::models::denoiser::with_text_widths`]).
    pub fn open(arch: &Architecture, files: &[PathBuf], t5_tokenizer: Option<&std::path::Path>) -> Result<Option<DitTextInputs>> {
        let stack = match arch.text {
            TextStack::Sd3 => DitText::Sd3,
            TextStack::Flux => DitText::Flux,
            _ if files.is_empty() && t5_tokenizer.is_none() => return Ok(None),
            _ => bail!(
                "--text-encoder and --t5-tokenizer are for SD3/3.5 and FLUX; {} keeps its text encoders in the checkpoint (use --clip-vocab)",
                arch.family
            ),
        };
        let pooled = arch.pooled_width.with_context(|| format!("internal: {} has no pooled width", arch.family))?;
        let t5_tokenizer = t5_tokenizer.map(T5Tokenizer::from_file).transpose()?;
        if files.is_empty() && t5_tokenizer.is_none() {
            return Ok(None);
        }
        let files = TextFiles::open(files)?;
        let widths = files.widths(stack, arch.context_width, pooled)?;
        let notes = files.check(stack, widths)?;
        Ok(Some(DitTextInputs { files, stack, widths, t5_tokenizer, notes }))
    }

    /// For the report: which encoder of which file encodes the prompts, and which
    /// ones are missing (zeros in their place).
    pub fn describe(&self) -> Vec<String> {
        let found: Vec<String> = [EncoderKind::ClipL, EncoderKind::ClipG, EncoderKind::T5]
            .into_iter()
            .filter_map(|k| self.files.get(k).map(|(f, e)| format!("{} ({} wide) from {}", k.name(), e.width, f.path().display())))
            .collect();
        let mut notes = Vec::new();
        if !found.is_empty() {
            notes.push(format!("prompts are encoded by {}", found.join(", ")));
        }
        notes.extend(self.notes.iter().cloned());
        notes
    }

    fn has_encoders(&self) -> bool {
        [EncoderKind::ClipL, EncoderKind::ClipG, EncoderKind::T5].iter().any(|k| self.files.get(*k).is_some())
    }
}

/// A calibration session on backend `O`.
pub struct Session<O: Ops> {
    ops: O,
    model: Denoiser<O>,
    inputs: SessionInputs,
    hooks: InputHooks,
    tokenizer: Option<ClipTokenizer>,
    calib_rows: usize,
    tensors: HashMap<u32, O::Tensor>,
    conds: HashMap<u32, Cond<O::Tensor>>,
    next_id: u32,
    live_elements: usize,
    forwards: usize,
    /// Prompt conditionings and `smooth` calls, which share `max_forwards`.
    other_passes: usize,
    /// Per-input-channel weight maxima of smoothing consumers, by key: scanned
    /// once, so a recipe searching alphas does not rescan the weights.
    weight_amax: HashMap<String, Vec<f32>>,
    samples: usize,
    steps: BTreeSet<usize>,
    forward_time: Duration,
    load_time: Duration,
    smoothing_groups: Vec<smooth::Group>,
    smoothing: smooth::Smoothing,
    /// Real conditioning sources the recipe used (held-out inputs follow them).
    cond_sources: BTreeSet<HeldOut>,
    /// Observer statistics read after `forwards` passes (reading them syncs the device).
    observers_cache: Option<(usize, Vec<ObserverStats>)>,
}

// SAFETY-free note: sessions move into the wasmtime store's thread and stay
// there; backends are `Send` (their handles are reference-counted device or
// host buffers owned by the session).
impl<O: Ops + Send> Session<O>
where
    O::Tensor: Send,
{
    /// Loads the backbone on `ops` and sets up the observers.
    pub fn new(ops: O, inputs: SessionInputs) -> Result<Session<O>> {
        let started = Instant::now();
        let src: &dyn WeightSource = inputs.checkpoint.as_ref();
        let prefix = inputs.checkpoint.prefix().to_string();
        let model = Denoiser::load(&ops, src, &prefix, inputs.arch.clone()).context("loading the model for calibration")?;
        let specs: Vec<ObserverSpec> = inputs.observed.iter().map(|(_, s)| s.clone()).collect();
        ops.observers_reset(&specs, inputs.limits.max_steps)?;
        let mut hooks = InputHooks::none();
        for (slot, (path, _)) in inputs.observed.iter().enumerate() {
            hooks.by_module.insert(path.clone(), crate::models::InputHook { observer: Some(slot), quant: None });
        }
        let tokenizer = match &inputs.tokenizer_dir {
            Some(dir) => Some(ClipTokenizer::from_dir(dir)?),
            None => None,
        };
        let calib_rows = inputs.calib_data.as_ref().map_or(0, |(_, rows)| *rows);
        let modules = crate::modules::ModuleTable::build(&inputs.checkpoint);
        let smoothing_groups = smooth::groups(&modules)
            .into_iter()
            .filter(|g| g.consumers.iter().any(|c| inputs.observed.iter().any(|(p, _)| p == c)))
            .collect();
        Ok(Session {
            ops,
            model,
            inputs,
            hooks,
            tokenizer,
            calib_rows,
            tensors: HashMap::new(),
            conds: HashMap::new(),
            next_id: 1,
            live_elements: 0,
            forwards: 0,
            other_passes: 0,
            weight_amax: HashMap::new(),
            samples: 0,
            steps: BTreeSet::new(),
            forward_time: Duration::ZERO,
            load_time: started.elapsed(),
            smoothing_groups,
            smoothing: smooth::Smoothing::default(),
            cond_sources: BTreeSet::new(),
            observers_cache: None,
        })
    }

    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// Where held-out conditioning comes from: the most real source the
    /// calibration used (prompts, then `--calib-data` rows, then random).
    pub fn held_out_source(&self) -> HeldOut {
        self.cond_sources.iter().next().copied().unwrap_or(HeldOut::Random)
    }

    /// Held-out conditioning `i` (batch 1) like the calibration's but not
    /// from it: other prompts through the same encoders, or `--calib-data` rows
    /// taken from the end; `None` for random conditioning (the evaluation draws
    /// its own with other seeds).
    pub fn held_out_conditioning(&self, i: usize, resolution: u32) -> Result<Option<(O::Tensor, Option<O::Tensor>)>> {
        let c = match self.held_out_source() {
            HeldOut::Prompts => self.prompt_cond(vec![HELD_OUT_PROMPTS[i % HELD_OUT_PROMPTS.len()].to_string()], resolution, resolution)?,
            HeldOut::FileRows => self.file_cond(self.calib_rows - 1 - i % self.calib_rows, 1, resolution, resolution)?,
            HeldOut::Random => return Ok(None),
        };
        Ok(Some((c.context, c.y)))
    }

    pub fn model(&self) -> &Denoiser<O> {
        &self.model
    }

    fn tensor(&self, id: u32) -> Result<&O::Tensor> {
        self.tensors.get(&id).ok_or_else(|| anyhow!("tensor handle {id} is not live"))
    }

    fn cond(&self, id: u32) -> Result<&Cond<O::Tensor>> {
        self.conds.get(&id).ok_or_else(|| anyhow!("conditioning handle {id} is not live"))
    }

    fn elements(&self, t: &O::Tensor) -> usize {
        self.ops.shape(t).iter().product()
    }

    fn check_alloc(&self, elements: usize) -> Result<()> {
        let l = &self.inputs.limits;
        ensure!(
            elements <= l.max_tensor_elements,
            "a tensor of {elements} elements exceeds the limit of {} per tensor",
            l.max_tensor_elements
        );
        ensure!(
            self.live_elements + elements <= l.max_live_elements,
            "live tensors would hold {} elements, over the limit of {} (drop tensors you no longer need)",
            self.live_elements + elements,
            l.max_live_elements
        );
        Ok(())
    }

    fn keep(&mut self, t: O::Tensor) -> Result<u32> {
        let n = self.elements(&t);
        self.check_alloc(n)?;
        self.live_elements += n;
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).context("too many tensor handles")?;
        self.tensors.insert(id, t);
        Ok(id)
    }

    fn keep_cond(&mut self, c: Cond<O::Tensor>) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.conds.insert(id, c);
        id
    }

    /// The checkpoint's text encoders, for prompts.
    fn text_family(&self) -> Result<TextFamily> {
        match self.model.arch().text {
            TextStack::ClipL => Ok(TextFamily::Sd15),
            TextStack::OpenClipH => Ok(TextFamily::Sd2),
            TextStack::ClipG => Ok(TextFamily::SdxlRefiner),
            TextStack::ClipLG => Ok(TextFamily::Sdxl),
            TextStack::Sd3 | TextStack::Flux => bail!(
                "prompt encoding for {} needs its text encoders (CLIP-L, CLIP-G, T5-XXL), which this build cannot load yet; use --calib-data or calib-source=random",
                self.model.arch().family
            ),
        }
    }

    /// The UNet's ADM width (SDXL's `y`), if the backbone is such a UNet.
    fn unet_adm_channels(&self) -> Option<usize> {
        match self.model.network() {
            Network::Unet(u) => u.config().adm_in_channels,
            _ => None,
        }
    }

    /// The model's `y` from pooled text vectors `[B, P]`: SDXL's pooled and
    /// size vector, the DiTs' pooled vector as it is, nothing for SD1/SD2.
    fn adm(&self, pooled: &O::Tensor, width: u32, height: u32) -> Result<Option<O::Tensor>> {
        if self.model.arch().backbone != Backbone::Unet {
            return Ok(Some(pooled.clone()));
        }
        let size = SizeConditioning::new(width, height);
        self.unet_adm_channels().map(|adm| clip::unet_adm(&self.ops, pooled, adm, &size)).transpose()
    }

    /// The family's distilled guidance for `rows` rows (empty when it has none).
    fn default_guidance(&self, rows: usize) -> Vec<f32> {
        self.model.arch().guidance.map(|g| vec![g; rows]).unwrap_or_default()
    }

    /// Width of the pooled text vector this model's `y` is built from (0: none).
    fn pooled_width(&self) -> usize {
        match self.model.arch().backbone {
            Backbone::Unet => self.unet_adm_channels().map(clip::pooled_width).unwrap_or(0),
            _ => self.model.arch().pooled_width.unwrap_or(0),
        }
    }

    /// Counts a prompt encoding or a `smooth` against `max_forwards`.
    fn count_pass(&mut self) -> Result<()> {
        let max = self.inputs.limits.max_forwards;
        ensure!(
            self.forwards + self.other_passes < max,
            "the run's budget of {max} forward passes is used up (prompt encodings and smooth calls count as passes)"
        );
        self.other_passes += 1;
        Ok(())
    }

    fn random_cond(&self, count: usize, seed: u64, spread: f32, width: u32, height: u32) -> Result<Cond<O::Tensor>> {
        ensure!(count >= 1 && count <= self.inputs.limits.max_batch * 64, "random conditioning count {count} is out of range");
        ensure!(spread.is_finite() && spread > 0.0, "spread must be a positive number, got {spread}");
        let ctx_dim = self.model.context_width();
        let tokens = self.model.arch().context_tokens;
        let n = count * tokens * ctx_dim;
        self.check_alloc(n)?;
        let context = self.ops.from_f32(&[count, tokens, ctx_dim], &gaussian(n, seed, spread))?;
        let y = match self.pooled_width() {
            0 => None,
            p => {
                let pooled = self.ops.from_f32(&[count, p], &gaussian(count * p, seed ^ 0x9e37_79b9_7f4a_7c15, spread))?;
                self.adm(&pooled, width, height)?
            }
        };
        Ok(Conditioning { context, y, batch: count, guidance: self.default_guidance(count) })
    }

    fn file_cond(&self, start: usize, count: usize, width: u32, height: u32) -> Result<Cond<O::Tensor>> {
        let path = self.inputs.calib_data.as_ref().map(|(p, _)| p.clone()).ok_or_else(|| anyhow!("no --calib-data file was given"))?;
        ensure!(count >= 1, "file conditioning needs count >= 1");
        ensure!(
            start + count <= self.calib_rows,
            "rows {start}..{} are beyond the {} rows of {}",
            start + count,
            self.calib_rows,
            path.display()
        );
        let data = CalibData::open(&path)?;
        let ctx_dim = self.model.context_width();
        let (ctx_shape, ctx_rows) = data.rows("context", start, count)?;
        ensure!(
            ctx_shape.len() == 3 && ctx_shape[2] == ctx_dim,
            "{}: `context` has shape {ctx_shape:?}; this model needs [N, tokens, {ctx_dim}]",
            path.display()
        );
        let context = self.ops.from_f32(&[count, ctx_shape[1], ctx_dim], &ctx_rows)?;
        let y = match self.pooled_width() {
            0 => None,
            p => {
                let (p_shape, p_rows) = data.rows("pooled", start, count).with_context(|| {
                    format!("{}: {} models also need `pooled` [N, {p}] text vectors", path.display(), self.model.arch().family)
                })?;
                ensure!(p_shape.len() == 2 && p_shape[1] == p, "{}: `pooled` has shape {p_shape:?}; expected [N, {p}]", path.display());
                let pooled = self.ops.from_f32(&[count, p], &p_rows)?;
                self.adm(&pooled, width, height)?
            }
        };
        Ok(Conditioning { context, y, batch: count, guidance: self.default_guidance(count) })
    }

    fn prompt_cond(&self, prompts: Vec<String>, width: u32, height: u32) -> Result<Cond<O::Tensor>> {
        ensure!(!prompts.is_empty(), "no prompts given");
        ensure!(prompts.len() <= self.inputs.limits.max_batch * 64, "too many prompts in one call ({})", prompts.len());
        if self.model.arch().backbone != Backbone::Unet {
            let text = self.inputs.text.as_ref().filter(|t| t.has_encoders()).with_context(|| {
                format!(
                    "prompts for {} need its text encoders: pass --text-encoder FILE for each (clip_l, clip_g, t5xxl)",
                    self.model.arch().family
                )
            })?;
            // T5 pads to ComfyUI's minimum: 77 tokens for SD3, 256 for FLUX.
            let t5_min = match text.stack {
                DitText::Sd3 => SD3_MIN_TOKENS,
                DitText::Flux => FLUX_MIN_TOKENS,
            };
            let c = text.files.encode(
                &self.ops,
                text.stack,
                text.widths,
                self.tokenizer.as_ref(),
                text.t5_tokenizer.as_ref(),
                t5_min,
                &prompts,
                &InputHooks::none(),
            )?;
            return Ok(Conditioning {
                context: c.context,
                y: Some(c.pooled),
                batch: prompts.len(),
                guidance: self.default_guidance(prompts.len()),
            });
        }
        let tokenizer = self.tokenizer.as_ref().ok_or_else(|| {
            anyhow!("prompts need the CLIP vocabulary: pass --clip-vocab DIR (a folder with vocab.json and merges.txt, e.g. ComfyUI's comfy/sd1_tokenizer)")
        })?;
        let result = (|| {
            let family = self.text_family()?;
            let src: &dyn WeightSource = self.inputs.checkpoint.as_ref();
            let enc = TextEncoders::load(src, family)?;
            enc.encode(&self.ops, tokenizer, &prompts, &InputHooks::none())
        })();
        let c = result?;
        let y = match &c.pooled {
            Some(p) => self.adm(p, width, height)?,
            None => None,
        };
        Ok(Conditioning { context: c.context, y, batch: prompts.len(), guidance: self.default_guidance(prompts.len()) })
    }
}

impl<O: Ops + Send + 'static> CalibSession for Session<O>
where
    O::Tensor: Send,
{
    fn info(&self) -> SessionInfo {
        let text_prefixes = ["cond_stage_model.", "conditioner.embedders."];
        let arch = self.model.arch();
        SessionInfo {
            family: arch.family.to_string(),
            latent_channels: arch.latent_channels as u32,
            native_resolution: arch.native_resolution,
            has_text_encoders: match (&self.inputs.text, arch.backbone) {
                (_, Backbone::Unet) => self.inputs.checkpoint.tensors().iter().any(|t| text_prefixes.iter().any(|p| t.key.starts_with(p))),
                (Some(t), _) => t.has_encoders(),
                (None, _) => false,
            },
            // Every encoder present has its tokenizer (CLIP's vocabulary, T5's tokenizer.json).
            has_tokenizer: match (&self.inputs.text, arch.backbone) {
                (_, Backbone::Unet) => self.tokenizer.is_some(),
                (Some(t), _) => {
                    let clip = t.files.get(EncoderKind::ClipL).is_some() || t.files.get(EncoderKind::ClipG).is_some();
                    let t5 = t.files.get(EncoderKind::T5).is_some();
                    (!clip || self.tokenizer.is_some()) && (!t5 || t.t5_tokenizer.is_some())
                }
                (None, _) => false,
            },
            calib_data_rows: self.calib_rows as u32,
            device: self.ops.name(),
        }
    }

    fn randn(&mut self, shape: &[usize], seed: u64) -> Result<u32> {
        ensure!(!shape.is_empty() && shape.len() <= 4, "randn takes 1 to 4 dimensions, got {shape:?}");
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).context("shape overflows")?;
        ensure!(n > 0, "randn shape {shape:?} is empty");
        self.check_alloc(n)?;
        let t = self.ops.from_f32(shape, &gaussian(n, seed, 1.0))?;
        self.keep(t)
    }

    fn schedule(&self, steps: usize, spacing: Spacing) -> Result<(Vec<f32>, Vec<f32>)> {
        ensure!((1..=self.inputs.limits.max_steps).contains(&steps), "steps must be 1..={}, got {steps}", self.inputs.limits.max_steps);
        // The SDK's walk asks for one schedule and walks it `calib-samples` times
        // (one `denoise` per step, CFG pairs batched); another recipe may walk
        // otherwise, and the display then corrects its total as passes come.
        if let (Some(walks), false) = (self.inputs.walks, self.inputs.progress.has_total()) {
            self.inputs.progress.set_total(walks.saturating_mul(steps as u64));
        }
        Ok(self.model.schedule().sample(steps, spacing))
    }

    fn conditioning(&mut self, source: CondSource, width: u32, height: u32) -> Result<u32> {
        ensure!((64..=4096).contains(&width) && (64..=4096).contains(&height), "width and height must be 64..=4096 pixels");
        let c = match source {
            CondSource::Random { count, seed, spread } => self.random_cond(count, seed, spread, width, height)?,
            CondSource::File { start, count } => {
                self.cond_sources.insert(HeldOut::FileRows);
                self.file_cond(start, count, width, height)?
            }
            CondSource::Prompts(p) => {
                self.count_pass()?;
                self.cond_sources.insert(HeldOut::Prompts);
                self.prompt_cond(p, width, height)?
            }
        };
        Ok(self.keep_cond(c))
    }

    fn concat_conditioning(&mut self, parts: &[u32]) -> Result<u32> {
        ensure!(!parts.is_empty(), "nothing to concatenate");
        let conds: Vec<&Cond<O::Tensor>> = parts.iter().map(|&id| self.cond(id)).collect::<Result<_>>()?;
        // Long prompts give longer contexts: repeated to a common length, as ComfyUI batches them.
        let context = clip::batch_contexts(&self.ops, &conds.iter().map(|c| &c.context).collect::<Vec<_>>())?;
        let y = if conds.iter().all(|c| c.y.is_some()) {
            let ys: Vec<&O::Tensor> = conds.iter().map(|c| c.y.as_ref().expect("checked")).collect();
            Some(self.ops.concat(&ys, 0)?)
        } else {
            None
        };
        let batch = conds.iter().map(|c| c.batch).sum();
        let guidance = conds.iter().flat_map(|c| c.guidance.iter().copied()).collect();
        Ok(self.keep_cond(Conditioning { context, y, batch, guidance }))
    }

    fn cond_batch(&self, id: u32) -> u32 {
        self.conds.get(&id).map(|c| c.batch as u32).unwrap_or(0)
    }

    fn add(&mut self, a: u32, b: u32) -> Result<u32> {
        let (ta, tb) = (self.tensor(a)?, self.tensor(b)?);
        ensure!(self.ops.shape(ta) == self.ops.shape(tb), "add: shapes {:?} and {:?} differ", self.ops.shape(ta), self.ops.shape(tb));
        let t = self.ops.add(ta, tb)?;
        self.keep(t)
    }

    fn scale(&mut self, a: u32, s: f32) -> Result<u32> {
        ensure!(s.is_finite(), "scale: factor {s} is not finite");
        let t = self.ops.scale(self.tensor(a)?, s)?;
        self.keep(t)
    }

    fn lerp(&mut self, a: u32, b: u32, t: f32) -> Result<u32> {
        ensure!(t.is_finite(), "lerp: t = {t} is not finite");
        let (ta, tb) = (self.tensor(a)?, self.tensor(b)?);
        ensure!(self.ops.shape(ta) == self.ops.shape(tb), "lerp: shapes {:?} and {:?} differ", self.ops.shape(ta), self.ops.shape(tb));
        // a + t (b - a) = (1 - t) a + t b
        let out = self.ops.add(&self.ops.scale(ta, 1.0 - t)?, &self.ops.scale(tb, t)?)?;
        self.keep(out)
    }

    fn concat(&mut self, parts: &[u32], dim: usize) -> Result<u32> {
        ensure!(!parts.is_empty(), "concat: nothing to concatenate");
        let ts: Vec<&O::Tensor> = parts.iter().map(|&id| self.tensor(id)).collect::<Result<_>>()?;
        let first = self.ops.shape(ts[0]);
        ensure!(dim < first.len(), "concat: dim {dim} is out of range for shape {first:?}");
        for t in &ts[1..] {
            let s = self.ops.shape(t);
            ensure!(
                s.len() == first.len() && s.iter().zip(&first).enumerate().all(|(i, (a, b))| i == dim || a == b),
                "concat: shape {s:?} does not fit {first:?} along dim {dim}"
            );
        }
        let t = self.ops.concat(&ts, dim)?;
        self.keep(t)
    }

    fn slice_batch(&mut self, a: u32, start: usize, len: usize) -> Result<u32> {
        let t = self.tensor(a)?;
        let shape = self.ops.shape(t);
        ensure!(len >= 1 && start + len <= shape[0], "slice-batch: rows {start}..{} of {}", start + len, shape[0]);
        // A batch row is contiguous: slice on the host side of the trait via reshape + concat-free copy.
        let row: usize = shape[1..].iter().product();
        let all = self.ops.to_f32(t)?;
        let mut s = shape.clone();
        s[0] = len;
        let out = self.ops.from_f32(&s, &all[start * row..(start + len) * row])?;
        self.keep(out)
    }

    fn denoise(&mut self, x: u32, sigma: f32, cond: u32, step: usize) -> Result<u32> {
        let l = self.inputs.limits;
        ensure!(self.forwards + self.other_passes < l.max_forwards, "the run's budget of {} forward passes is used up", l.max_forwards);
        ensure!(step < l.max_steps, "step {step} is beyond the {} step buckets", l.max_steps);
        ensure!(sigma.is_finite() && sigma > 0.0, "sigma must be positive, got {sigma}");
        let started = Instant::now();
        let tx = self.tensor(x)?.clone();
        let shape = self.ops.shape(&tx);
        self.model.check_latents(&shape).context("denoise")?;
        ensure!(shape[0] <= l.max_batch, "denoise: batch {} is over the limit of {}", shape[0], l.max_batch);
        let c = self.cond(cond)?;
        ensure!(c.batch == shape[0], "denoise: latents have batch {} but the conditioning has {}", shape[0], c.batch);
        self.ops.observers_set_step(step)?;
        let eps = self.model.derivative(&self.ops, &tx, sigma, c, &self.hooks)?;
        self.forwards += 1;
        self.inputs.progress.inc(1);
        self.samples += shape[0];
        self.steps.insert(step);
        self.forward_time += started.elapsed();
        self.keep(eps)
    }

    fn shape(&self, id: u32) -> Vec<usize> {
        self.tensors.get(&id).map(|t| self.ops.shape(t)).unwrap_or_default()
    }

    fn read(&self, id: u32) -> Result<Vec<f32>> {
        let t = self.tensor(id)?;
        let n = self.elements(t);
        ensure!(n <= 65536, "read: the tensor has {n} elements; at most 65536 can be read");
        self.ops.to_f32(t)
    }

    fn drop_tensor(&mut self, id: u32) {
        if let Some(t) = self.tensors.remove(&id) {
            self.live_elements -= self.elements(&t);
        }
    }

    fn drop_cond(&mut self, id: u32) {
        self.conds.remove(&id);
    }

    fn arch(&self) -> &Architecture {
        self.model.arch()
    }

    fn with_guidance(&mut self, cond: u32, value: f32) -> Result<u32> {
        ensure!(
            self.model.arch().guidance.is_some(),
            "{} {} takes no distilled guidance (it samples with classifier-free guidance)",
            self.model.arch().family,
            self.model.arch().variant
        );
        ensure!(value.is_finite() && (0.0..=100.0).contains(&value), "guidance must be 0..=100, got {value}");
        let c = self.cond(cond)?;
        let copy = Conditioning { context: c.context.clone(), y: c.y.clone(), batch: c.batch, guidance: vec![value; c.batch] };
        Ok(self.keep_cond(copy))
    }

    fn observers(&self) -> Result<Vec<ObserverStats>> {
        self.ops.observers_read()
    }

    fn observed_slot(&self, module: &str) -> Option<usize> {
        self.inputs.observed.iter().position(|(p, _)| p == module)
    }

    fn smoothing_groups(&self) -> Vec<smooth::Group> {
        self.smoothing_groups.clone()
    }

    fn smooth(&mut self, producer: &str, alpha: f32) -> Result<(smooth::Smoothed, Vec<f32>)> {
        ensure!(alpha.is_finite() && (0.0..=1.0).contains(&alpha), "alpha must be in [0, 1], got {alpha}");
        let group = self
            .smoothing_groups
            .iter()
            .find(|g| g.producer == producer)
            .cloned()
            .ok_or_else(|| anyhow!("`{producer}` is not a smoothing producer of this plan (see smoothing-groups)"))?;
        if self.observers_cache.as_ref().is_none_or(|(n, _)| *n != self.forwards) {
            self.observers_cache = Some((self.forwards, self.ops.observers_read()?));
        }
        let observers = &self.observers_cache.as_ref().expect("just read").1;
        // Consumers share one input; any observed one has its statistics.
        let mut act = vec![0f32; group.channels];
        let mut seen = false;
        for c in &group.consumers {
            let Some(slot) = self.observed_slot(c) else { continue };
            let o = &observers[slot];
            if o.calls == 0 || o.channel_amax.len() != group.channels {
                continue;
            }
            seen = true;
            for (a, &v) in act.iter_mut().zip(&o.channel_amax) {
                *a = a.max(v);
            }
        }
        ensure!(seen, "the inputs of {} have not been observed yet: run denoise first", group.consumers.join(", "));
        self.count_pass()?;
        let ckpt = &self.inputs.checkpoint;
        let mut weight = vec![0f32; group.channels];
        for c in &group.consumers {
            let key = format!("{}{c}.weight", ckpt.prefix());
            if !self.weight_amax.contains_key(&key) {
                let amax = smooth::weight_column_amax(ckpt, &key)?;
                self.weight_amax.insert(key.clone(), amax);
            }
            for (w, v) in weight.iter_mut().zip(&self.weight_amax[&key]) {
                *w = w.max(*v);
            }
        }
        let smoothed = smooth::Smoothed { factors: smooth::factors(&act, &weight, alpha), group, alpha };
        self.smoothing.insert(smoothed.clone());
        Ok((smoothed, act))
    }

    fn smoothing(&self) -> smooth::Smoothing {
        self.smoothing.clone()
    }

    fn stats(&self) -> SessionStats {
        SessionStats {
            forwards: self.forwards,
            samples: self.samples,
            steps: self.steps.iter().copied().collect(),
            forward_seconds: self.forward_time.as_secs_f64(),
            load_seconds: self.load_time.as_secs_f64(),
            peak_device_bytes: self.ops.peak_device_bytes(),
        }
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// `n` values N(0, spread^2) from `seed` (the host's one source of randomness).
pub fn gaussian(n: usize, seed: u64, spread: f32) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| StandardNormal.sample(&mut rng)).map(|v: f32| v * spread).collect()
}

/// The user's `--calib-data` file: `context` `[N, tokens, width]`, optional `pooled` `[N, 1280]`.
struct CalibData {
    mmap: memmap2::Mmap,
    path: PathBuf,
}

impl CalibData {
    fn open(path: &std::path::Path) -> Result<CalibData> {
        let f = std::fs::File::open(path).with_context(|| format!("cannot open --calib-data {}", path.display()))?;
        // SAFETY: read-only mapping of a file we only read.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))?;
        Ok(CalibData { mmap, path: path.to_path_buf() })
    }

    /// Rows `start..start+count` of tensor `name` as f32, with the tensor's full shape.
    fn rows(&self, name: &str, start: usize, count: usize) -> Result<(Vec<usize>, Vec<f32>)> {
        let st = safetensors::SafeTensors::deserialize(&self.mmap)
            .map_err(|e| anyhow!("--calib-data {} is not a valid safetensors file: {e}", self.path.display()))?;
        let t = st.tensor(name).map_err(|_| anyhow!("--calib-data {} has no tensor `{name}`", self.path.display()))?;
        let shape = t.shape().to_vec();
        ensure!(
            !shape.is_empty() && start + count <= shape[0],
            "{}: `{name}` has {} rows",
            self.path.display(),
            shape.first().unwrap_or(&0)
        );
        let dtype = crate::formats::SourceDtype::from_safetensors(t.dtype())
            .ok_or_else(|| anyhow!("{}: `{name}` has dtype {:?}; use F32, F16 or BF16", self.path.display(), t.dtype()))?;
        let row: usize = shape[1..].iter().product();
        let size = dtype.size();
        let bytes = &t.data()[start * row * size..(start + count) * row * size];
        let values = crate::formats::numerics::decode_dtype(dtype, bytes);
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            bail!("{}: `{name}` has a non-finite value at element {}", self.path.display(), start * row + i);
        }
        Ok((shape, values))
    }
}

/// Rows of a `--calib-data` file (checked up front, so a bad file fails before any work).
pub fn calib_data_rows(path: &std::path::Path) -> Result<usize> {
    let data = CalibData::open(path)?;
    let st = safetensors::SafeTensors::deserialize(&data.mmap)
        .map_err(|e| anyhow!("--calib-data {} is not a valid safetensors file: {e}", path.display()))?;
    let t = st.tensor("context").map_err(|_| {
        anyhow!(
            "--calib-data {} has no `context` tensor (expected `context` [N, tokens, width], and `pooled` [N, 1280] for SDXL)",
            path.display()
        )
    })?;
    ensure!(t.shape().len() == 3, "--calib-data {}: `context` must be [N, tokens, width], got {:?}", path.display(), t.shape());
    Ok(t.shape()[0])
}
