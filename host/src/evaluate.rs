//! Evaluate: re-read a converted file and check it against its source and
//! against what ComfyUI expects (SPEC section 3), layer by layer.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail, ensure};
use safetensors::Dtype;
use serde::Serialize;

use crate::calibrate::smooth::{self, Smoothing};
use crate::checkpoint::Checkpoint;
use crate::formats::{ErrorStats, QuantFormat, QuantSpec, SourceDtype, StoredTensor, WeightView};
use crate::modules::{ModuleKind, ModuleTable};
use crate::plan::probe_patterns;
use crate::progress::Progress;

/// Dtypes ComfyUI's loader accepts on disk.
pub const COMFY_DTYPES: &[Dtype] = &[
    Dtype::F64,
    Dtype::F32,
    Dtype::F16,
    Dtype::BF16,
    Dtype::I64,
    Dtype::I32,
    Dtype::I16,
    Dtype::I8,
    Dtype::U64,
    Dtype::U32,
    Dtype::U16,
    Dtype::U8,
    Dtype::BOOL,
    Dtype::F8_E4M3,
    Dtype::F8_E5M2,
];

/// The result of checking one converted file.
#[derive(Clone, Debug, Default, Serialize)]
pub struct OutputCheck {
    /// Quantized layer (stored key) -> format and error against the source.
    pub layers: BTreeMap<String, (String, ErrorStats)>,
    pub passthrough_tensors: usize,
    pub legacy: bool,
    /// Static activation scales (`input_scale`, legacy `scale_input`) by layer.
    pub input_scales: BTreeMap<String, f32>,
    /// Tensors changed by a SmoothQuant fold recorded in the header, each
    /// checked against the source with the recorded factors.
    pub smoothed_tensors: usize,
    /// FP8 layers marked `"full_precision_matrix_mult": true` (ComfyUI dequantizes them).
    pub full_precision_layers: usize,
    /// FP8 layers with neither a static activation scale nor that mark: ComfyUI
    /// runs them at activation scale 1.0.
    pub scale_one_layers: usize,
}

/// Checks `output` against `source`: every rule of SPEC section 3, byte-identical
/// pass-through, and every quantized layer dequantized within its format's bound.
/// A SmoothQuant fold recorded in the header (`quantsmith.smoothquant`) is
/// applied to the source first: folded norms and rows must equal the source's
/// divided by the factors exactly, smoothed layers must quantize `W * s`.
pub fn check_output(source: &Checkpoint, output: &Path) -> Result<OutputCheck> {
    check_output_with(source, output, &Progress::hidden())
}

/// [`check_output`], counting the tensors checked on `progress`.
pub fn check_output_with(source: &Checkpoint, output: &Path, progress: &Progress) -> Result<OutputCheck> {
    crate::checkpoint::require_regular_file(output)?;
    let file = std::fs::File::open(output).with_context(|| format!("cannot read {}", output.display()))?;
    // SAFETY: a read-only map, as for inputs (checkpoint::Checkpoint::open): pages
    // stream from the file and can be dropped, so checking a file larger than memory works.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot read {}", output.display()))?;
    let out = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("output is not valid safetensors: {e}"))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| anyhow!("{e}"))?;
    let header_meta = meta.metadata().clone().unwrap_or_default();
    let mut check = OutputCheck::default();

    for (name, view) in out.iter() {
        ensure!(COMFY_DTYPES.contains(&view.dtype()), "tensor {name} has dtype {:?}, which ComfyUI does not load", view.dtype());
    }
    let prefix = source.prefix();
    check.legacy = out.tensor(&format!("{prefix}scaled_fp8")).is_ok();
    let modules = ModuleTable::build(source);
    let probes = probe_patterns();
    let transforms = match header_meta.get(smooth::METADATA_KEY) {
        Some(text) => Smoothing::from_metadata(text)?.transforms(&modules)?,
        None => Default::default(),
    };
    check.smoothed_tensors = transforms.len();

    // Quantized layers: from per-layer markers (comfy) or scale_weight (legacy).
    let mut quantized: BTreeMap<String, QuantSpec> = BTreeMap::new();
    let mut comfy_quant: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for (name, view) in out.iter() {
        if let Some(layer) = name.strip_suffix(".comfy_quant") {
            ensure!(view.dtype() == Dtype::U8 && view.shape().len() == 1, "{name} must be a 1-D U8 tensor");
            let conf: serde_json::Value = serde_json::from_slice(view.data()).with_context(|| format!("{name} is not JSON"))?;
            let fmt = conf["format"].as_str().ok_or_else(|| anyhow!("{name} has no format"))?;
            let format = QuantFormat::parse(fmt).ok_or_else(|| anyhow!("{name}: unknown format {fmt}"))?;
            match conf.get("full_precision_matrix_mult") {
                None => {}
                Some(serde_json::Value::Bool(_)) => {
                    ensure!(format == QuantFormat::Fp8, "{name}: full_precision_matrix_mult is written for FP8 layers only");
                    ensure!(
                        out.tensor(&format!("{layer}.input_scale")).is_err(),
                        "{name}: full_precision_matrix_mult on a layer with a static activation scale (ComfyUI would ignore the scale)"
                    );
                }
                Some(other) => bail!("{name}: full_precision_matrix_mult must be a boolean, not {other}"),
            }
            comfy_quant.insert(layer.to_string(), conf);
            let per_channel = format == QuantFormat::Int8 && out.tensor(&format!("{layer}.weight_scale"))?.shape().len() == 2;
            quantized.insert(layer.to_string(), QuantSpec { format, per_channel });
        } else if let Some(layer) = name.strip_suffix(".scale_weight") {
            ensure!(check.legacy, "{name} found without the scaled_fp8 marker");
            quantized.insert(layer.to_string(), QuantSpec { format: QuantFormat::Fp8, per_channel: false });
        }
    }
    if !check.legacy && !quantized.is_empty() {
        let qm = header_meta.get("_quantization_metadata").ok_or_else(|| anyhow!("header lacks _quantization_metadata"))?;
        let qm: serde_json::Value = serde_json::from_str(qm)?;
        ensure!(qm["format_version"] == "1.0", "_quantization_metadata.format_version must be \"1.0\"");
        let layers = qm["layers"].as_object().ok_or_else(|| anyhow!("_quantization_metadata.layers missing"))?;
        ensure!(
            layers.len() == quantized.len(),
            "_quantization_metadata lists {} layers, the file marks {}",
            layers.len(),
            quantized.len()
        );
        for (k, spec) in &quantized {
            ensure!(
                layers.get(k).and_then(|v| v["format"].as_str()) == Some(spec.format.comfy_name()),
                "_quantization_metadata disagrees on {k}"
            );
            ensure!(layers.get(k) == comfy_quant.get(k), "_quantization_metadata's entry for {k} differs from {k}.comfy_quant");
        }
    }
    if check.legacy {
        ensure!(!header_meta.contains_key("_quantization_metadata"), "legacy layout must not carry _quantization_metadata");
    }

    // Each quantized layer is dequantized and compared, each other source tensor compared byte for byte.
    let passthrough = source.tensors().iter().filter(|t| !t.key.strip_suffix(".weight").is_some_and(|l| quantized.contains_key(l))).count();
    progress.set_total((quantized.len() + passthrough) as u64);
    for (layer, spec) in &quantized {
        let local = layer.strip_prefix(prefix).unwrap_or(layer);
        let module = modules.get(local).ok_or_else(|| anyhow!("quantized layer {layer} is not a module of the source"))?;
        ensure!(module.kind == ModuleKind::Linear, "layer {layer} is a {} layer; only Linear layers may be quantized", module.kind.name());
        if spec.format.changes_shape() {
            ensure!(!probes.iter().any(|p| p.matches(local)), "layer {layer} is probed by ComfyUI and must keep its logical shape");
        }
        // The module table may know the layer's weight under another key than `<layer>.weight`.
        let src = source
            .get(&format!("{layer}.weight"))
            .ok_or_else(|| anyhow!("quantized layer {layer}: the source has no tensor {layer}.weight to compare it with"))?;
        let dtype = SourceDtype::from_safetensors(src.dtype)
            .ok_or_else(|| anyhow!("{layer}: the source weight has dtype {:?}, not a float one", src.dtype))?;
        ensure!(src.shape.len() == 2, "{layer}: the source weight has shape {:?}, not [out, in]", src.shape);
        let (rows, cols) = (src.shape[0], src.shape[1]);
        let imp = spec.implementation();
        let mut stored = Vec::new();
        for s in imp.layout(rows, cols) {
            let key =
                if check.legacy && s.suffix == "weight_scale" { format!("{layer}.scale_weight") } else { format!("{layer}.{}", s.suffix) };
            let v = out.tensor(&key).with_context(|| format!("missing {key}"))?;
            ensure!(
                v.dtype() == s.dtype && v.shape() == s.shape.as_slice(),
                "{key}: expected {:?} {:?}, found {:?} {:?}",
                s.dtype,
                s.shape,
                v.dtype(),
                v.shape()
            );
            stored.push(StoredTensor { spec: s, data: v.data().to_vec() });
        }
        let scale_key = if check.legacy { format!("{layer}.scale_input") } else { format!("{layer}.input_scale") };
        if let Ok(v) = out.tensor(&scale_key) {
            ensure!(
                matches!(spec.format, QuantFormat::Fp8 | QuantFormat::Nvfp4),
                "{scale_key}: {} layers carry no static activation scale in ComfyUI's layout",
                spec.format.name()
            );
            ensure!(
                v.dtype() == Dtype::F32 && v.shape().is_empty(),
                "{scale_key}: expected an F32 scalar, found {:?} {:?}",
                v.dtype(),
                v.shape()
            );
            let value = f32::from_le_bytes(v.data().try_into().expect("4 bytes"));
            ensure!(value.is_finite() && value > 0.0, "{scale_key} = {value}; a static activation scale must be finite and positive");
            check.input_scales.insert(layer.clone(), value);
        }
        if spec.format == QuantFormat::Fp8 && !check.legacy && !check.input_scales.contains_key(layer) {
            if comfy_quant.get(layer).and_then(|c| c.get("full_precision_matrix_mult")) == Some(&serde_json::Value::Bool(true)) {
                check.full_precision_layers += 1;
            } else {
                check.scale_one_layers += 1;
            }
        }
        let smoothed = match transforms.get(&src.key) {
            Some(t) => Some(smooth::transformed_f32(source, &src.key, t)?),
            None => None,
        };
        let view = match &smoothed {
            Some(values) => WeightView { name: &src.key, dtype: SourceDtype::F32, rows, cols, bytes: bytemuck::cast_slice(values) },
            None => WeightView { name: &src.key, dtype, rows, cols, bytes: source.bytes(src) },
        };
        let err = imp.verify(&view, &stored).map_err(|e| anyhow!("layer {layer}: {e}"))?;
        check.layers.insert(layer.clone(), (spec.format.name().to_string(), err));
        progress.inc(1);
    }

    // Everything else must be byte-identical to the source.
    for t in source.tensors() {
        let layer = t.key.strip_suffix(".weight");
        if layer.is_some_and(|l| quantized.contains_key(l)) {
            continue;
        }
        let v = out.tensor(&t.key).with_context(|| format!("source tensor {} is missing from the output", t.key))?;
        ensure!(
            v.dtype() == t.dtype && v.shape() == t.shape.as_slice(),
            "tensor {} changed dtype or shape although it is not quantized",
            t.key
        );
        match transforms.get(&t.key) {
            Some(tr) => ensure!(
                v.data() == smooth::transformed_bytes(source, &t.key, tr)?.as_slice(),
                "tensor {} is not the source folded with the recorded SmoothQuant factors",
                t.key
            ),
            None => ensure!(v.data() == source.bytes(t), "tensor {} changed although it is not quantized", t.key),
        }
        check.passthrough_tensors += 1;
        progress.inc(1);
    }
    for (name, _) in out.iter() {
        let known = source.get(name).is_some()
            || quantized.keys().any(|l| name.starts_with(l.as_str()) && name[l.len()..].starts_with('.'))
            || (check.legacy && name == format!("{prefix}scaled_fp8"));
        if !known {
            bail!("output has an unexpected tensor {name}");
        }
    }
    progress.finish();
    Ok(check)
}
