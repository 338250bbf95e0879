//! Quantize and write: the streaming conversion from a resolved plan to a
//! ComfyUI-loadable file.
//!
//! Input tensors are read from the memory map one at a time, quantized on the
//! backend by a few worker threads (so quantization of the next tensors overlaps
//! writing of this one) and written in order; pages already written are dropped
//! from the process, so peak memory does not grow with model size.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use safetensors::Dtype;
use serde::Serialize;

use crate::backend::Backend;
use crate::calibrate::smooth::{self, Smoothing, Transform};
use crate::checkpoint::writer::{PlannedTensor, StreamingWriter};
use crate::checkpoint::{Checkpoint, TensorEntry};
use crate::formats::{ErrorStats, QuantFormat, QuantSpec, SourceDtype, StoredSpec, StoredTensor, WeightView};
use crate::modules::ModuleTable;
use crate::plan::{LayerDecision, ResolvedPlan};

/// On-disk layout of the output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// ComfyUI's mixed-precision layout: per-layer `.comfy_quant` plus `_quantization_metadata`.
    #[default]
    Comfy,
    /// The `scaled_fp8` layout of ComfyUI before December 2025 (FP8 only).
    ComfyLegacy,
}

/// One output item, in write order.
#[derive(Clone, Debug)]
enum Item<'a> {
    Copy(&'a TensorEntry),
    /// Copied through a SmoothQuant fold (norms and producer rows), in its own dtype.
    Smoothed(&'a TensorEntry, Transform),
    Quantize {
        entry: &'a TensorEntry,
        layer: &'a LayerDecision,
        spec: QuantSpec,
        stored: Vec<StoredSpec>,
        transform: Option<Transform>,
    },
    Bytes {
        name: String,
        dtype: Dtype,
        shape: Vec<usize>,
        data: Vec<u8>,
    },
}

/// How ComfyUI should run an FP8 layer that has no static activation scale
/// (`input_scale`). Its FP8 path casts activations to FP8 at scale 1.0 (values
/// clamp at +-448, small ones lose precision: SPEC section 3), which raised the
/// output error of FLUX.1-dev by ~40%; `"full_precision_matrix_mult": true`
/// makes it dequantize the weight instead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UncalibratedFp8 {
    /// `"full_precision_matrix_mult": true`: exact, smaller, not faster.
    #[default]
    Exact,
    /// ComfyUI's FP8 matmul at activation scale 1.0: faster on FP8 GPUs, less accurate.
    Fast,
}

impl UncalibratedFp8 {
    /// The preset parameter that chooses it (declared by every built-in preset
    /// and by recipes through the SDK; the host reads it when a recipe declares it).
    pub const PARAM: &'static str = "uncalibrated-fp8";

    /// From the recipe's validated parameters; `Exact` when it is not declared.
    pub fn from_params(params: &[(String, crate::recipe::wit::ParamValue)]) -> Result<UncalibratedFp8> {
        match params.iter().find(|(k, _)| k == Self::PARAM).map(|(_, v)| v) {
            None => Ok(UncalibratedFp8::Exact),
            Some(crate::recipe::wit::ParamValue::Text(s)) if s == "exact" => Ok(UncalibratedFp8::Exact),
            Some(crate::recipe::wit::ParamValue::Text(s)) if s == "fast" => Ok(UncalibratedFp8::Fast),
            Some(v) => Err(anyhow!("parameter {} must be \"exact\" or \"fast\", not {v:?}", Self::PARAM)),
        }
    }
}

/// The `comfy_quant` object of one layer: its format, and for an FP8 layer
/// that must not take ComfyUI's scale-1.0 activation path, `full_precision_matrix_mult`.
pub fn comfy_quant_value(format: QuantFormat, full_precision: bool) -> serde_json::Value {
    if full_precision {
        serde_json::json!({ "format": format.comfy_name(), "full_precision_matrix_mult": true })
    } else {
        serde_json::json!({ "format": format.comfy_name() })
    }
}

/// The bytes of a `.comfy_quant` tensor.
pub fn comfy_quant_json(format: QuantFormat, full_precision: bool) -> Vec<u8> {
    serde_json::to_vec(&comfy_quant_value(format, full_precision)).unwrap()
}

/// Whether a quantized layer is written with `full_precision_matrix_mult`:
/// an FP8 layer without a static activation scale, unless the recipe chose
/// ComfyUI's scale-1.0 path.
fn full_precision(format: QuantFormat, has_input_scale: bool, policy: UncalibratedFp8) -> bool {
    format == QuantFormat::Fp8 && !has_input_scale && policy == UncalibratedFp8::Exact
}

/// Per-layer line of the dry run and the report.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub layer: String,
    pub format: Option<String>,
    pub shape: [usize; 2],
    pub bytes_before: u64,
    pub bytes_after: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorStats>,
}

/// What a conversion wrote.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConvertSummary {
    pub tensors_written: usize,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub quantized_layers: usize,
    pub seconds: f64,
    pub layers: Vec<LayerReport>,
}

pub struct ConvertOptions {
    pub output: PathBuf,
    pub layout: Layout,
    /// Extra `__metadata__` entries (provenance).
    pub metadata: HashMap<String, String>,
    /// Dequantize every layer and compare it with the original.
    pub verify: bool,
    pub progress: Option<crate::progress::Progress>,
    /// Static activation scales by layer path (from calibration), stored as
    /// `<layer>.input_scale` (`.scale_input` in the legacy layout).
    pub input_scales: HashMap<String, f32>,
    /// SmoothQuant factors to fold (from calibration); recorded in the header.
    pub smoothing: Smoothing,
    /// How FP8 layers without `input_scale` are marked.
    pub uncalibrated_fp8: UncalibratedFp8,
}

/// Whether `layout` can store every layer of `plan`, checked once the plan is
/// known and before calibration or a weight is read (exit 2: the command line
/// asked for a layout the recipe's formats do not fit).
pub fn check_layout(plan: &ResolvedPlan, layout: Layout) -> Result<(), crate::error::Usage> {
    if layout == Layout::ComfyLegacy
        && let Some(l) = plan.quantized().find(|l| l.spec.is_some_and(|s| s.format != QuantFormat::Fp8))
    {
        return Err(crate::error::Usage(format!(
            "--layout comfy-legacy stores FP8 only, but the plan makes layer {} {}: use --layout comfy, or a plan of FP8 only (--set format=fp8)",
            l.path,
            l.spec.map(|s| s.format.name()).unwrap_or("-")
        )));
    }
    Ok(())
}

/// Whether `layout` can store weights of the format named `format` (as the
/// presets' `format` parameter names them); unknown names are the recipe's to refuse.
pub fn check_layout_format(layout: Layout, format: &str) -> Result<(), crate::error::Usage> {
    let format = format.trim();
    if layout == Layout::ComfyLegacy && QuantFormat::ALL.iter().any(|f| *f != QuantFormat::Fp8 && f.name() == format) {
        return Err(crate::error::Usage(format!(
            "--layout comfy-legacy stores FP8 only, not {format}: use --layout comfy, or --set format=fp8"
        )));
    }
    Ok(())
}

fn build_items<'a>(
    ckpt: &'a Checkpoint,
    plan: &'a ResolvedPlan,
    layout: Layout,
    input_scales: &HashMap<String, f32>,
    smoothing: &Smoothing,
    policy: UncalibratedFp8,
) -> Result<Vec<Item<'a>>> {
    let mut transforms = if smoothing.is_empty() { HashMap::new() } else { smoothing.transforms(&ModuleTable::build(ckpt))? };
    let mut items = Vec::with_capacity(ckpt.tensors().len() + plan.layers.len());
    check_layout(plan, layout)?;
    if layout == Layout::ComfyLegacy {
        items.push(Item::Bytes { name: format!("{}scaled_fp8", ckpt.prefix()), dtype: Dtype::F8_E4M3, shape: vec![0], data: vec![] });
    }
    for entry in ckpt.tensors() {
        let transform = transforms.remove(&entry.key);
        let Some(layer) = plan.decision_for_key(&entry.key) else {
            items.push(match transform {
                Some(t) => Item::Smoothed(entry, t),
                None => Item::Copy(entry),
            });
            continue;
        };
        let spec = layer.spec.expect("decision_for_key returns quantized layers");
        let stored = spec.implementation().layout(layer.shape[0], layer.shape[1]);
        items.push(Item::Quantize { entry, layer, spec, stored, transform });
        if let Some(&scale) = input_scales.get(&layer.path) {
            // A static activation scale (calibration): F32 scalar beside the weight.
            let name = match layout {
                Layout::Comfy => format!("{}.input_scale", layer.key),
                Layout::ComfyLegacy => format!("{}.scale_input", layer.key),
            };
            items.push(Item::Bytes { name, dtype: Dtype::F32, shape: vec![], data: scale.to_le_bytes().to_vec() });
        }
        if layout == Layout::Comfy {
            let data = comfy_quant_json(spec.format, full_precision(spec.format, input_scales.contains_key(&layer.path), policy));
            items.push(Item::Bytes { name: format!("{}.comfy_quant", layer.key), dtype: Dtype::U8, shape: vec![data.len()], data });
        }
    }
    if let Some(key) = transforms.keys().next() {
        return Err(anyhow!("smoothing names {key}, which the checkpoint does not hold"));
    }
    Ok(items)
}

/// Output name of a stored tensor in the chosen layout.
fn stored_name(layer: &LayerDecision, suffix: &str, layout: Layout) -> String {
    match (layout, suffix) {
        (Layout::ComfyLegacy, "weight_scale") => format!("{}.scale_weight", layer.key),
        _ => format!("{}.{suffix}", layer.key),
    }
}

fn planned(items: &[Item<'_>], layout: Layout) -> Vec<PlannedTensor> {
    let mut out = Vec::new();
    for item in items {
        match item {
            Item::Copy(e) | Item::Smoothed(e, _) => out.push(PlannedTensor { name: e.key.clone(), dtype: e.dtype, shape: e.shape.clone() }),
            Item::Quantize { layer, stored, .. } => {
                for s in stored {
                    out.push(PlannedTensor { name: stored_name(layer, s.suffix, layout), dtype: s.dtype, shape: s.shape.clone() });
                }
            }
            Item::Bytes { name, dtype, shape, .. } => out.push(PlannedTensor { name: name.clone(), dtype: *dtype, shape: shape.clone() }),
        }
    }
    out
}

/// The per-layer table of a plan, without converting anything (`--dry-run`).
/// Uncalibrated: FP8 layers are counted as written without `input_scale`.
pub fn dry_run(ckpt: &Checkpoint, plan: &ResolvedPlan, layout: Layout, policy: UncalibratedFp8) -> Result<(Vec<LayerReport>, u64)> {
    let items = build_items(ckpt, plan, layout, &HashMap::new(), &Smoothing::default(), policy)?;
    let total: u64 = planned(&items, layout).iter().map(|t| t.byte_len() as u64).sum();
    let mut layers = Vec::new();
    for l in &plan.layers {
        let before = ckpt.get(&format!("{}.weight", l.key)).map(|e| e.byte_len() as u64).unwrap_or(0);
        let after = match l.spec {
            Some(spec) => {
                spec.implementation().layout(l.shape[0], l.shape[1]).iter().map(|s| s.byte_len() as u64).sum::<u64>()
                    + if layout == Layout::Comfy {
                        comfy_quant_json(spec.format, full_precision(spec.format, false, policy)).len() as u64
                    } else {
                        0
                    }
            }
            None => before,
        };
        layers.push(LayerReport {
            layer: l.path.clone(),
            format: l.spec.map(|s| s.format.name().to_string()),
            shape: l.shape,
            bytes_before: before,
            bytes_after: after,
            error: None,
        });
    }
    Ok((layers, total))
}

/// `_quantization_metadata` for the comfy layout: full stored keys, as ComfyUI's
/// `convert_old_quants` turns each into `<key>.comfy_quant` (so each entry is
/// the same object as the layer's `comfy_quant`).
pub fn quantization_metadata(plan: &ResolvedPlan, input_scales: &HashMap<String, f32>, policy: UncalibratedFp8) -> String {
    let mut layers = serde_json::Map::new();
    for l in plan.quantized() {
        let format = l.spec.unwrap().format;
        layers.insert(l.key.clone(), comfy_quant_value(format, full_precision(format, input_scales.contains_key(&l.path), policy)));
    }
    serde_json::json!({ "format_version": "1.0", "layers": layers }).to_string()
}

type JobResult = Result<(Vec<StoredTensor>, Option<ErrorStats>)>;

struct Job<'a> {
    entry: &'a TensorEntry,
    dtype: SourceDtype,
    rows: usize,
    cols: usize,
    /// A SmoothQuant fold, applied by the worker.
    transform: Option<&'a Transform>,
    spec: QuantSpec,
    verify: bool,
    reply: mpsc::SyncSender<JobResult>,
}

/// Converts `ckpt` according to `plan`, streaming into `opts.output`.
pub fn convert(ckpt: &Checkpoint, plan: &ResolvedPlan, backend: &dyn Backend, opts: &ConvertOptions) -> Result<ConvertSummary> {
    let started = Instant::now();
    let items = build_items(ckpt, plan, opts.layout, &opts.input_scales, &opts.smoothing, opts.uncalibrated_fp8)?;
    let planned_tensors = planned(&items, opts.layout);
    // A tensor passed through in a dtype ComfyUI cannot load would make the whole
    // output unloadable: refused before anything is written.
    if let Some(t) = planned_tensors.iter().find(|t| !crate::evaluate::COMFY_DTYPES.contains(&t.dtype)) {
        return Err(crate::error::Refused(format!(
            "tensor {} is stored as {:?}, which ComfyUI does not load; this tool passes it through unchanged, so the output would not load either",
            t.name, t.dtype
        ))
        .into());
    }
    let mut metadata: HashMap<String, String> = ckpt.metadata().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    metadata.extend(opts.metadata.clone());
    if opts.layout == Layout::Comfy && plan.quantized().next().is_some() {
        metadata.insert("_quantization_metadata".into(), quantization_metadata(plan, &opts.input_scales, opts.uncalibrated_fp8));
    }
    if !opts.smoothing.is_empty() {
        metadata.insert(smooth::METADATA_KEY.into(), opts.smoothing.to_metadata());
    }
    let mut writer = StreamingWriter::create(&opts.output, planned_tensors, metadata)?;
    let mut summary = ConvertSummary { input_bytes: ckpt.file_len() as u64, ..Default::default() };

    let workers = backend.in_flight().max(1);
    let window = workers + 1;
    let (job_tx, job_rx) = mpsc::channel::<Job<'_>>();
    let job_rx = Arc::new(Mutex::new(job_rx));

    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..workers {
            let rx = job_rx.clone();
            scope.spawn(move || {
                let mut folded: Vec<f32> = Vec::new();
                loop {
                    let job = match rx.lock().unwrap().recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    let name = job.entry.key.as_str();
                    // A smoothed weight is quantized from its exact f32 product W * s, never re-rounded to the source dtype.
                    let source = match job.transform {
                        // f32 as bytes in place: safetensors data is little-endian, as are the hosts this builds for.
                        Some(t) => smooth::transform_into(ckpt, name, t, &mut folded)
                            .map(|()| (SourceDtype::F32, Cow::Borrowed(bytemuck::cast_slice::<f32, u8>(&folded)))),
                        None => Ok((job.dtype, Cow::Borrowed(ckpt.bytes(job.entry)))),
                    };
                    let result = source.and_then(|(dtype, bytes)| {
                        let view = WeightView { name, dtype, rows: job.rows, cols: job.cols, bytes: &bytes };
                        let stored = backend.quantize(job.spec, &view)?;
                        let err = if job.verify {
                            Some(
                                job.spec
                                    .implementation()
                                    .verify(&view, &stored)
                                    .map_err(|e| anyhow!("verification failed for {name}: {e}"))?,
                            )
                        } else {
                            None
                        };
                        Ok((stored, err))
                    });
                    let _ = job.reply.send(result);
                }
            });
        }
        let quant_items: Vec<usize> =
            items.iter().enumerate().filter(|(_, it)| matches!(it, Item::Quantize { .. })).map(|(i, _)| i).collect();
        let mut pending: VecDeque<mpsc::Receiver<JobResult>> = VecDeque::new();
        let mut next_submit = 0usize;
        let result = {
            let submit = |idx: usize| -> Result<mpsc::Receiver<JobResult>> {
                let Item::Quantize { entry, layer, spec, transform, .. } = &items[idx] else { unreachable!() };
                let (tx, rx) = mpsc::sync_channel(1);
                let job = Job {
                    entry,
                    dtype: layer.dtype,
                    rows: layer.shape[0],
                    cols: layer.shape[1],
                    transform: transform.as_ref(),
                    spec: *spec,
                    verify: opts.verify,
                    reply: tx,
                };
                job_tx.send(job).map_err(|_| anyhow!("internal: quantization workers stopped"))?;
                Ok(rx)
            };
            (|| -> Result<()> {
                for item in &items {
                    while pending.len() < window && next_submit < quant_items.len() {
                        pending.push_back(submit(quant_items[next_submit])?);
                        next_submit += 1;
                    }
                    match item {
                        Item::Copy(entry) => {
                            writer.write(&entry.key, ckpt.bytes(entry))?;
                            ckpt.release(entry);
                            summary.tensors_written += 1;
                            if let Some(pb) = &opts.progress {
                                pb.inc(entry.byte_len() as u64);
                            }
                        }
                        Item::Smoothed(entry, t) => {
                            writer.write(&entry.key, &smooth::transformed_bytes(ckpt, &entry.key, t)?)?;
                            ckpt.release(entry);
                            summary.tensors_written += 1;
                            if let Some(pb) = &opts.progress {
                                pb.inc(entry.byte_len() as u64);
                            }
                        }
                        Item::Quantize { entry, layer, stored: specs, spec, .. } => {
                            let rx = pending.pop_front().expect("a job per quantized item");
                            let (stored, err) = rx.recv().map_err(|_| anyhow!("internal: a quantization worker died"))??;
                            let mut after = 0u64;
                            for (s, want) in stored.iter().zip(specs) {
                                debug_assert_eq!(&s.spec, want);
                                writer.write(&stored_name(layer, s.spec.suffix, opts.layout), &s.data)?;
                                after += s.data.len() as u64;
                                summary.tensors_written += 1;
                            }
                            ckpt.release(entry);
                            summary.quantized_layers += 1;
                            summary.layers.push(LayerReport {
                                layer: layer.path.clone(),
                                format: Some(spec.format.name().to_string()),
                                shape: layer.shape,
                                bytes_before: entry.byte_len() as u64,
                                bytes_after: after,
                                error: err,
                            });
                            if let Some(pb) = &opts.progress {
                                pb.inc(entry.byte_len() as u64);
                            }
                        }
                        Item::Bytes { name, data, .. } => {
                            writer.write(name, data)?;
                            summary.tensors_written += 1;
                        }
                    }
                }
                Ok(())
            })()
        };
        drop(job_tx);
        // Unblock workers waiting on replies nobody reads.
        drop(pending);
        result
    })?;
    summary.output_bytes = writer.bytes_written();
    writer.finish().with_context(|| format!("cannot finish {}", opts.output.display()))?;
    summary.output_bytes = std::fs::metadata(&opts.output).map(|m| m.len()).unwrap_or(summary.output_bytes);
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}
