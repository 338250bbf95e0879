//! SmoothQuant, folded where ComfyUI's layout can carry it (SPEC §6).
//!
//! SmoothQuant divides a Linear's input by per-channel factors `s` and
//! multiplies the weight's input columns by the same `s`, so the product is
//! unchanged while activation outliers move into the weight. ModelOpt stores
//! `1/s` as a `pre_quant_scale` beside the layer; ComfyUI's mixed-precision
//! layout has no such tensor, so the division must be folded into whatever
//! produces the input, per channel and exactly. In the LDM UNet that is:
//!
//! | producer (carrier) | consumers |
//! |---|---|
//! | `norm1` (LayerNorm affine) | `attn1.to_q`, `attn1.to_k`, `attn1.to_v` |
//! | `norm2` (LayerNorm affine) | `attn2.to_q` |
//! | `norm3` (LayerNorm affine) | `ff.net.0.proj` |
//! | SpatialTransformer `norm` (GroupNorm affine) | linear `proj_in` |
//! | `attn1.to_v` / `attn2.to_v` (output rows) | `attn1.to_out.0` / `attn2.to_out.0` |
//! | `ff.net.0.proj`, hidden half of GEGLU (output rows) | `ff.net.2` |
//!
//! Attention output channels are linear in V's channels and GEGLU's output is
//! linear in its hidden half, so dividing those rows (and biases) divides the
//! consumer's input. Inputs fed by the text encoder (`attn2.to_k/v`) or by the
//! residual stream (`proj_out`) have no carrier and are never smoothed.
//!
//! Consumers sharing a producer share `s`, taken from their common input's
//! per-channel amax and the largest weight column over all of them. The
//! factors travel in the output's header (`quantsmith.smoothquant`), so
//! `run-recipe check` verifies a smoothed file against its source exactly.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::formats::{SourceDtype, numerics};
use crate::modules::{ModuleKind, ModuleTable};

/// Header key of the factors in a smoothed output.
pub const METADATA_KEY: &str = "quantsmith.smoothquant";

/// How a producer carries the division.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Carrier {
    /// A norm's per-channel affine: weight and bias, `[channels]`.
    Affine,
    /// Output rows `start .. start + channels` of a Linear (weight rows and bias).
    Rows { start: usize },
}

/// A producer whose output feeds only the `consumers`' inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// Module path of the producer (prefix stripped).
    pub producer: String,
    pub carrier: Carrier,
    /// Linear module paths reading the producer's output.
    pub consumers: Vec<String>,
    pub channels: usize,
}

fn linear_in(modules: &ModuleTable, path: &str) -> Option<usize> {
    modules.get(path).filter(|m| m.kind == ModuleKind::Linear).map(|m| m.weight_shape[1])
}

fn linear_out(modules: &ModuleTable, path: &str) -> Option<usize> {
    modules.get(path).filter(|m| m.kind == ModuleKind::Linear).map(|m| m.weight_shape[0])
}

/// A norm with a per-channel weight and bias of `channels`.
fn affine(modules: &ModuleTable, path: &str, channels: usize) -> bool {
    modules
        .get(path)
        .is_some_and(|m| m.kind == ModuleKind::Norm && m.weight_shape == [channels] && m.bias_key.is_some())
}

/// Every foldable producer of an LDM-named UNet, found by module names and checked by shapes.
pub fn groups(modules: &ModuleTable) -> Vec<Group> {
    let mut out = Vec::new();
    for m in modules.iter().filter(|m| m.kind == ModuleKind::Linear) {
        let path = m.path.as_str();
        let norm_group = |base: &str, norm: &str, consumers: &[&str]| -> Option<Group> {
            let consumers: Vec<String> = consumers.iter().map(|c| format!("{base}.{c}")).collect();
            let channels = linear_in(modules, &consumers[0])?;
            if consumers.iter().any(|c| linear_in(modules, c) != Some(channels)) {
                return None;
            }
            let producer = format!("{base}.{norm}");
            affine(modules, &producer, channels).then_some(Group { producer, carrier: Carrier::Affine, consumers, channels })
        };
        let rows_group = |producer: String, consumer: &str, hidden_half: bool| -> Option<Group> {
            let channels = linear_in(modules, consumer)?;
            let rows = linear_out(modules, &producer)?;
            let expected = if hidden_half { 2 * channels } else { channels };
            (rows == expected).then(|| Group { producer, carrier: Carrier::Rows { start: 0 }, consumers: vec![consumer.to_string()], channels })
        };
        let group = if let Some(base) = path.strip_suffix(".attn1.to_q") {
            norm_group(base, "norm1", &["attn1.to_q", "attn1.to_k", "attn1.to_v"])
        } else if let Some(base) = path.strip_suffix(".attn2.to_q") {
            norm_group(base, "norm2", &["attn2.to_q"])
        } else if let Some(base) = path.strip_suffix(".ff.net.0.proj") {
            norm_group(base, "norm3", &["ff.net.0.proj"])
        } else if let Some(base) = path.strip_suffix(".proj_in") {
            norm_group(base, "norm", &["proj_in"])
        } else if let Some(attn) = path.strip_suffix(".to_out.0").filter(|a| a.ends_with(".attn1") || a.ends_with(".attn2")) {
            rows_group(format!("{attn}.to_v"), path, false)
        } else if let Some(base) = path.strip_suffix(".ff.net.2") {
            // GEGLU: `hidden * gelu(gate)`, hidden = the first half of the projection's rows.
            rows_group(format!("{base}.ff.net.0.proj"), path, true)
        } else {
            None
        };
        out.extend(group);
    }
    out
}

/// SmoothQuant's per-input-channel factors `s_j = amax_x[j]^alpha / amax_w[j]^(1-alpha)`,
/// clamped to [2^-10, 2^10] so folded norms and rows stay representable in f16.
pub fn factors(act_amax: &[f32], weight_amax: &[f32], alpha: f32) -> Vec<f32> {
    act_amax
        .iter()
        .zip(weight_amax)
        .map(|(&a, &w)| {
            let s = (a.max(1e-5) as f64).powf(alpha as f64) / (w.max(1e-5) as f64).powf(1.0 - alpha as f64);
            (s as f32).clamp(1.0 / 1024.0, 1024.0)
        })
        .collect()
}

/// max |w| per input column of a stored Linear weight, decoded in row blocks on every core.
pub fn weight_column_amax(ckpt: &Checkpoint, key: &str) -> Result<Vec<f32>> {
    use rayon::prelude::*;
    let entry = ckpt.get(key).with_context(|| format!("checkpoint has no `{key}`"))?;
    let dtype = SourceDtype::from_safetensors(entry.dtype).with_context(|| format!("{key}: only F32, F16 and BF16 weights can be smoothed"))?;
    ensure!(entry.shape.len() == 2, "{key} is not a Linear weight");
    let cols = entry.shape[1];
    let row_bytes = cols * dtype.size();
    let out = ckpt
        .bytes(entry)
        .par_chunks(row_bytes * 64)
        .map(|block| column_amax(&numerics::decode_dtype(dtype, block), cols))
        .reduce(|| vec![0f32; cols], |a, b| a.iter().zip(&b).map(|(x, y)| x.max(*y)).collect());
    Ok(out)
}

/// max |w| per input column of a Linear weight `[rows, cols]`.
pub fn column_amax(values: &[f32], cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; cols];
    for row in values.chunks(cols) {
        for (o, &v) in out.iter_mut().zip(row) {
            *o = o.max(v.abs());
        }
    }
    out
}

/// One smoothed group: its factors and the alpha that made them.
#[derive(Clone, Debug, PartialEq)]
pub struct Smoothed {
    pub group: Group,
    pub alpha: f32,
    pub factors: Vec<f32>,
}

/// What a tensor becomes: some output rows divided, input columns multiplied.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Transform {
    /// `(first row, divisors)`; for 1-D tensors, elements.
    pub row_div: Option<(usize, Vec<f32>)>,
    /// One multiplier per input column (2-D weights only).
    pub col_mul: Option<Vec<f32>>,
}

impl Transform {
    /// Applies the transform to a tensor's values of `shape` (1-D or 2-D).
    pub fn apply(&self, shape: &[usize], values: &mut [f32]) -> Result<()> {
        let cols = self.check(shape)?;
        self.apply_rows(0, cols, values);
        Ok(())
    }

    /// Columns per row of a tensor of `shape`, after checking the transform fits it.
    fn check(&self, shape: &[usize]) -> Result<usize> {
        let cols = if shape.len() == 2 { shape[1] } else { 1 };
        let rows = shape.first().copied().unwrap_or(1);
        if let Some((start, div)) = &self.row_div {
            ensure!(start + div.len() <= rows, "smoothing rows {start}..{} outside a tensor of {rows} rows", start + div.len());
        }
        if let Some(mul) = &self.col_mul {
            ensure!(shape.len() == 2 && mul.len() == cols, "smoothing {} columns of a tensor of shape {shape:?}", mul.len());
        }
        Ok(cols)
    }

    /// The transform on whole rows `first_row ..` of a checked tensor (rows divided, then columns multiplied).
    fn apply_rows(&self, first_row: usize, cols: usize, block: &mut [f32]) {
        for (i, row) in block.chunks_mut(cols).enumerate() {
            let r = first_row + i;
            if let Some((start, div)) = &self.row_div
                && r >= *start
                && r < start + div.len()
            {
                let d = div[r - start];
                row.iter_mut().for_each(|v| *v /= d);
            }
            if let Some(mul) = &self.col_mul {
                row.iter_mut().zip(mul).for_each(|(v, m)| *v *= m);
            }
        }
    }
}

/// The smoothing a calibration chose, by producer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Smoothing {
    pub groups: Vec<Smoothed>,
}

#[derive(Serialize, Deserialize)]
struct StoredGroup {
    #[serde(flatten)]
    group: Group,
    alpha: f32,
    /// Little-endian f32 factors, base64.
    factors: String,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    version: u32,
    groups: Vec<StoredGroup>,
}

impl Smoothing {
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Records `s` for a group, replacing an earlier choice for the same producer.
    pub fn insert(&mut self, smoothed: Smoothed) {
        self.groups.retain(|g| g.group.producer != smoothed.group.producer);
        self.groups.push(smoothed);
    }

    /// The factors dividing a consumer's input, if it is smoothed.
    pub fn consumer_factors(&self, module: &str) -> Option<&[f32]> {
        self.groups.iter().find(|g| g.group.consumers.iter().any(|c| c == module)).map(|g| g.factors.as_slice())
    }

    /// Transforms by stored tensor key (with `prefix`), composed where a tensor
    /// is both a consumer and a producer (`ff.net.0.proj`, `to_v`).
    pub fn transforms(&self, modules: &ModuleTable) -> Result<HashMap<String, Transform>> {
        let mut out: HashMap<String, Transform> = HashMap::new();
        for g in &self.groups {
            let producer = modules.get(&g.group.producer).with_context(|| format!("smoothing producer {} is not a module", g.group.producer))?;
            let start = match g.group.carrier {
                Carrier::Affine => 0,
                Carrier::Rows { start } => start,
            };
            for key in [producer.weight_key.as_ref(), producer.bias_key.as_ref()].into_iter().flatten() {
                let t = out.entry(key.clone()).or_default();
                ensure!(t.row_div.is_none(), "{key} is smoothed twice");
                t.row_div = Some((start, g.factors.clone()));
            }
            for c in &g.group.consumers {
                let m = modules.get(c).with_context(|| format!("smoothing consumer {c} is not a module"))?;
                let key = m.weight_key.clone().with_context(|| format!("{c} has no weight"))?;
                let t = out.entry(key.clone()).or_default();
                ensure!(t.col_mul.is_none(), "{key} is smoothed twice");
                t.col_mul = Some(g.factors.clone());
            }
        }
        Ok(out)
    }

    /// The header value written beside a smoothed output.
    pub fn to_metadata(&self) -> String {
        let groups = self
            .groups
            .iter()
            .map(|g| {
                let bytes: Vec<u8> = g.factors.iter().flat_map(|v| v.to_le_bytes()).collect();
                StoredGroup { group: g.group.clone(), alpha: g.alpha, factors: base64::engine::general_purpose::STANDARD.encode(bytes) }
            })
            .collect();
        serde_json::to_string(&Stored { version: 1, groups }).expect("serializable")
    }

    pub fn from_metadata(text: &str) -> Result<Smoothing> {
        let stored: Stored = serde_json::from_str(text).with_context(|| format!("{METADATA_KEY} is not valid JSON"))?;
        ensure!(stored.version == 1, "{METADATA_KEY} version {} is not supported (this build reads 1)", stored.version);
        let mut out = Smoothing::default();
        for g in stored.groups {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&g.factors)
                .with_context(|| format!("{METADATA_KEY}: factors of {} are not base64", g.group.producer))?;
            ensure!(bytes.len() == 4 * g.group.channels, "{METADATA_KEY}: {} has {} bytes of factors for {} channels", g.group.producer, bytes.len(), g.group.channels);
            let factors: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
                bail!("{METADATA_KEY}: {} has a factor of {bad}", g.group.producer);
            }
            out.groups.push(Smoothed { group: g.group, alpha: g.alpha, factors });
        }
        Ok(out)
    }
}

/// A tensor's values after its transform, as f32.
pub fn transformed_f32(ckpt: &Checkpoint, key: &str, t: &Transform) -> Result<Vec<f32>> {
    let mut values = Vec::new();
    transform_into(ckpt, key, t, &mut values)?;
    Ok(values)
}

/// [`transformed_f32`] into a reused buffer: a worker folding tensor after
/// tensor keeps its pages instead of faulting in gigabytes of fresh memory.
pub fn transform_into(ckpt: &Checkpoint, key: &str, t: &Transform, values: &mut Vec<f32>) -> Result<()> {
    use rayon::prelude::*;
    let entry = ckpt.get(key).with_context(|| format!("checkpoint has no `{key}`"))?;
    let dtype = SourceDtype::from_safetensors(entry.dtype).with_context(|| format!("{key}: only F32, F16 and BF16 tensors can be smoothed"))?;
    let cols = t.check(&entry.shape)?.max(1);
    let bytes = ckpt.bytes(entry);
    // Blocks of whole rows, decoded and transformed on every core (large weights are 10-100 MB).
    let rows_per_block = (16384 / cols).max(1);
    values.resize(entry.elements(), 0.0);
    values
        .par_chunks_mut(rows_per_block * cols)
        .zip(bytes.par_chunks(rows_per_block * cols * dtype.size()))
        .enumerate()
        .for_each(|(b, (out, src))| {
            out.copy_from_slice(&numerics::decode_dtype(dtype, src));
            t.apply_rows(b * rows_per_block, cols, out);
        });
    if let Some(i) = values.par_iter().position_first(|v| !v.is_finite()) {
        bail!("smoothing {key} made element {i} non-finite");
    }
    Ok(())
}

/// A tensor's transformed bytes in its stored dtype, as written to the output.
pub fn transformed_bytes(ckpt: &Checkpoint, key: &str, t: &Transform) -> Result<Vec<u8>> {
    let entry = ckpt.get(key).with_context(|| format!("checkpoint has no `{key}`"))?;
    let dtype = SourceDtype::from_safetensors(entry.dtype).with_context(|| format!("{key}: only F32, F16 and BF16 tensors can be smoothed"))?;
    let values = transformed_f32(ckpt, key, t)?;
    let bytes = numerics::encode_source(dtype, &values);
    if dtype == SourceDtype::F16 {
        let back = numerics::decode_dtype(dtype, &bytes);
        if let Some(i) = back.iter().position(|v| !v.is_finite()) {
            bail!("smoothing {key} overflows f16 at element {i}");
        }
    }
    Ok(bytes)
}

/// The amax a smoothed consumer's input has: `max_j amax_x[j] / s_j` (exact,
/// since the per-tensor amax is the largest channel amax).
pub fn smoothed_amax(channel_amax: &[f32], factors: &[f32]) -> f32 {
    channel_amax.iter().zip(factors).map(|(a, s)| a / s).fold(0.0, f32::max)
}

/// Summary of the smoothing for the run report.
#[derive(Clone, Debug, Serialize)]
pub struct SmoothingReport {
    pub producer: String,
    pub consumers: Vec<String>,
    pub alpha: f32,
    pub min_factor: f32,
    pub max_factor: f32,
    /// Input amax before and after smoothing (the quantity the activation scale follows).
    pub amax_before: f32,
    pub amax_after: f32,
}

impl Smoothed {
    /// What the factors do to an input of per-channel amax `channel_amax`.
    pub fn report(&self, channel_amax: &[f32]) -> SmoothingReport {
        SmoothingReport {
            producer: self.group.producer.clone(),
            consumers: self.group.consumers.clone(),
            alpha: self.alpha,
            min_factor: self.factors.iter().copied().fold(f32::INFINITY, f32::min),
            max_factor: self.factors.iter().copied().fold(0.0, f32::max),
            amax_before: channel_amax.iter().copied().fold(0.0, f32::max),
            amax_after: smoothed_amax(channel_amax, &self.factors),
        }
    }
}

/// Every group's report, with the channel amax observed at any of its consumers.
pub fn report(smoothing: &Smoothing, channel_amax: &BTreeMap<String, Vec<f32>>) -> Vec<SmoothingReport> {
    smoothing
        .groups
        .iter()
        .map(|g| g.report(g.group.consumers.iter().find_map(|c| channel_amax.get(c)).map_or(&[][..], |a| a)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factor_formula_and_clamp() {
        // alpha 0.5: sqrt(a) / sqrt(w): a 16, w 4 -> 4 / 2 = 2.
        let f = factors(&[16.0, 1.0, 1e9], &[4.0, 1.0, 1e-9], 0.5);
        assert!((f[0] - 2.0).abs() < 1e-6 && (f[1] - 1.0).abs() < 1e-6);
        assert_eq!(f[2], 1024.0);
    }

    #[test]
    fn transform_divides_rows_and_multiplies_columns() {
        // [3, 2]: rows 1..3 divided by (2, 4), columns multiplied by (10, 100).
        let t = Transform { row_div: Some((1, vec![2.0, 4.0])), col_mul: Some(vec![10.0, 100.0]) };
        let mut v = vec![1.0, 1.0, 2.0, 2.0, 8.0, 8.0];
        t.apply(&[3, 2], &mut v).unwrap();
        assert_eq!(v, vec![10.0, 100.0, 10.0, 100.0, 20.0, 200.0]);
        // Block by block from a later first row gives the same rows.
        let mut tail = vec![2.0, 2.0, 8.0, 8.0];
        t.apply_rows(1, 2, &mut tail);
        assert_eq!(tail, v[2..]);
        let mut bias = vec![1.0, 2.0, 8.0];
        Transform { row_div: Some((1, vec![2.0, 4.0])), col_mul: None }.apply(&[3], &mut bias).unwrap();
        assert_eq!(bias, vec![1.0, 1.0, 2.0]);
        assert!(Transform { row_div: Some((2, vec![2.0, 4.0])), col_mul: None }.apply(&[3], &mut bias).is_err());
    }

    #[test]
    fn smoothed_amax_is_the_largest_scaled_channel() {
        assert_eq!(smoothed_amax(&[8.0, 3.0], &[4.0, 1.0]), 3.0);
    }

    #[test]
    fn metadata_round_trip_is_exact() {
        let s = Smoothing {
            groups: vec![Smoothed {
                group: Group { producer: "a.norm1".into(), carrier: Carrier::Affine, consumers: vec!["a.attn1.to_q".into()], channels: 3 },
                alpha: 0.5,
                factors: vec![0.1, 1.0 / 3.0, 1024.0],
            }],
        };
        assert_eq!(Smoothing::from_metadata(&s.to_metadata()).unwrap(), s);
        let broken = s.to_metadata().replace("\"channels\":3", "\"channels\":4");
        assert!(Smoothing::from_metadata(&broken).is_err());
    }
}
