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
//! In the diffusion transformers (FLUX.1, SD3/3.5) the norms have no affine;
//! the adaLN modulation carries it instead: a consumer reads
//! `norm(x) * (1 + scale) + shift` with `shift` and `scale` rows of a
//! modulation Linear, so dividing those rows by `s` and mapping the scale
//! rows' bias `b` to `(b + 1) / s - 1` divides the input exactly
//! ([`Carrier::Modulation`]). Producers are labelled `<module>:<consumer>`
//! there, since one modulation Linear feeds several groups:
//!
//! | producer (carrier) | consumers |
//! |---|---|
//! | FLUX `double_blocks.N.{img,txt}_mod.lin` chunks 0-1 (modulation) | `{img,txt}_attn.qkv` |
//! | same, chunks 3-4 | `{img,txt}_mlp.0` |
//! | FLUX `single_blocks.N.modulation.lin` chunks 0-1 | `linear1` |
//! | FLUX `double_blocks.N.img_attn.qkv` V rows, with `txt_attn.qkv` V rows (joint attention mixes both) | `img_attn.proj`, `txt_attn.proj` |
//! | SD3 `joint_blocks.N.{x,context}_block.adaLN_modulation.1` chunks 0-1 | `attn.qkv` |
//! | same, chunks 3-4 | `mlp.fc1` |
//! | SD3.5-medium `x_block.adaLN_modulation.1` chunks 6-7 | `attn2.qkv` |
//! | SD3 `x_block.attn.qkv` V rows, with `context_block.attn.qkv` V rows | `x_block.attn.proj` (and `context_block.attn.proj`) |
//! | SD3.5-medium `x_block.attn2.qkv` V rows | `attn2.proj` |
//!
//! Never smoothed there: MLP outputs (`img_mlp.2`, `mlp.fc2`: fed through a
//! GELU), FLUX's `linear2` (attention and GELU outputs side by side), the
//! embedders and the modulation Linears' own inputs (SiLU of the vector).
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
    /// adaLN modulation rows of a Linear: `shift` rows at `shift_start` and
    /// `scale` rows (applied as `1 + scale`) at `scale_start`, `channels` each.
    Modulation { shift_start: usize, scale_start: usize },
}

/// A producer whose output feeds only the `consumers`' inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// Module path of the producer (prefix stripped), or a label
    /// `<module>:<consumer>` when [`Group::module`] names the module.
    pub producer: String,
    pub carrier: Carrier,
    /// Linear module paths reading the producer's output.
    pub consumers: Vec<String>,
    pub channels: usize,
    /// The producing module when `producer` is a label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Further producers divided by the same factors (joint attention: the
    /// other stream's V rows).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<(String, Carrier)>,
}

impl Group {
    /// Every (module, carrier) this group divides.
    pub fn producers(&self) -> Vec<(&str, Carrier)> {
        let first = self.module.as_deref().unwrap_or(&self.producer);
        std::iter::once((first, self.carrier)).chain(self.also.iter().map(|(m, c)| (m.as_str(), *c))).collect()
    }
}

fn linear_in(modules: &ModuleTable, path: &str) -> Option<usize> {
    modules.get(path).filter(|m| m.kind == ModuleKind::Linear).map(|m| m.weight_shape[1])
}

fn linear_out(modules: &ModuleTable, path: &str) -> Option<usize> {
    modules.get(path).filter(|m| m.kind == ModuleKind::Linear).map(|m| m.weight_shape[0])
}

/// A norm with a per-channel weight and bias of `channels`.
fn affine(modules: &ModuleTable, path: &str, channels: usize) -> bool {
    modules.get(path).is_some_and(|m| m.kind == ModuleKind::Norm && m.weight_shape == [channels] && m.bias_key.is_some())
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
            affine(modules, &producer, channels).then_some(Group {
                producer,
                carrier: Carrier::Affine,
                consumers,
                channels,
                module: None,
                also: vec![],
            })
        };
        let rows_group = |producer: String, consumer: &str, hidden_half: bool| -> Option<Group> {
            let channels = linear_in(modules, consumer)?;
            let rows = linear_out(modules, &producer)?;
            let expected = if hidden_half { 2 * channels } else { channels };
            (rows == expected).then(|| Group {
                producer,
                carrier: Carrier::Rows { start: 0 },
                consumers: vec![consumer.to_string()],
                channels,
                module: None,
                also: vec![],
            })
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
    out.extend(dit_groups(modules));
    out
}

/// The foldable producers of FLUX.1 and SD3/3.5 (BFL / SAI names), checked by shapes.
fn dit_groups(modules: &ModuleTable) -> Vec<Group> {
    let mut out = Vec::new();
    // `label`: consumers read chunks `shift` and `shift + 1` of `module`'s `chunks` equal row blocks.
    let modulation = |module: String, label: &str, chunk: usize, consumers: Vec<String>| -> Option<Group> {
        let channels = linear_in(modules, &consumers[0])?;
        if consumers.iter().any(|c| linear_in(modules, c) != Some(channels)) {
            return None;
        }
        let rows = linear_out(modules, &module)?;
        if rows % channels != 0 || (chunk + 2) * channels > rows || modules.get(&module)?.bias_key.is_none() {
            return None;
        }
        let carrier = Carrier::Modulation { shift_start: chunk * channels, scale_start: (chunk + 1) * channels };
        Some(Group { producer: format!("{module}:{label}"), carrier, consumers, channels, module: Some(module), also: vec![] })
    };
    // V rows (the last third of a fused qkv) of `producers`, read through attention by `consumers`.
    let v_rows = |producers: &[String], consumers: Vec<String>| -> Option<Group> {
        let channels = linear_in(modules, &consumers[0])?;
        if consumers.iter().any(|c| linear_in(modules, c) != Some(channels))
            || producers.iter().any(|p| linear_out(modules, p) != Some(3 * channels))
        {
            return None;
        }
        let carrier = Carrier::Rows { start: 2 * channels };
        let also = producers[1..].iter().map(|p| (p.clone(), carrier)).collect();
        Some(Group { producer: producers[0].clone(), carrier, consumers, channels, module: None, also })
    };
    let exists = |p: &str| modules.get(p).is_some();
    for m in modules.iter().filter(|m| m.kind == ModuleKind::Linear) {
        let path = m.path.as_str();
        if let Some(block) = path.strip_suffix(".img_attn.qkv").filter(|b| b.starts_with("double_blocks.")) {
            for stream in ["img", "txt"] {
                out.extend(modulation(format!("{block}.{stream}_mod.lin"), "attn", 0, vec![format!("{block}.{stream}_attn.qkv")]));
                out.extend(modulation(format!("{block}.{stream}_mod.lin"), "mlp", 3, vec![format!("{block}.{stream}_mlp.0")]));
            }
            let consumers: Vec<String> = ["img", "txt"].iter().map(|s| format!("{block}.{s}_attn.proj")).filter(|c| exists(c)).collect();
            if !consumers.is_empty() {
                out.extend(v_rows(&[format!("{block}.img_attn.qkv"), format!("{block}.txt_attn.qkv")], consumers));
            }
        } else if let Some(block) = path.strip_suffix(".linear1").filter(|b| b.starts_with("single_blocks.")) {
            out.extend(modulation(format!("{block}.modulation.lin"), "linear1", 0, vec![path.to_string()]));
        } else if let Some(block) = path.strip_suffix(".x_block.attn.qkv").filter(|b| b.starts_with("joint_blocks.")) {
            for side in ["x_block", "context_block"] {
                let ada = format!("{block}.{side}.adaLN_modulation.1");
                out.extend(modulation(ada.clone(), "attn", 0, vec![format!("{block}.{side}.attn.qkv")]));
                if exists(&format!("{block}.{side}.mlp.fc1")) {
                    out.extend(modulation(ada, "mlp", 3, vec![format!("{block}.{side}.mlp.fc1")]));
                }
            }
            let consumers: Vec<String> =
                ["x_block", "context_block"].iter().map(|s| format!("{block}.{s}.attn.proj")).filter(|c| exists(c)).collect();
            if !consumers.is_empty() {
                out.extend(v_rows(&[format!("{block}.x_block.attn.qkv"), format!("{block}.context_block.attn.qkv")], consumers));
            }
            if exists(&format!("{block}.x_block.attn2.qkv")) {
                out.extend(modulation(
                    format!("{block}.x_block.adaLN_modulation.1"),
                    "attn2",
                    6,
                    vec![format!("{block}.x_block.attn2.qkv")],
                ));
                out.extend(v_rows(&[format!("{block}.x_block.attn2.qkv")], vec![format!("{block}.x_block.attn2.proj")]));
            }
        }
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
    let dtype =
        SourceDtype::from_safetensors(entry.dtype).with_context(|| format!("{key}: only F32, F16 and BF16 weights can be smoothed"))?;
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

/// Output rows `start .. start + divisors.len()` divided.
#[derive(Clone, Debug, PartialEq)]
pub struct RowDiv {
    pub start: usize,
    pub divisors: Vec<f32>,
    /// The rows are the bias of a `1 + scale` modulation: `(v + 1) / d - 1`.
    pub one_plus: bool,
}

/// What a tensor becomes: some output rows divided, input columns multiplied.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Transform {
    /// Disjoint row ranges; for 1-D tensors, elements.
    pub row_div: Vec<RowDiv>,
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
        for d in &self.row_div {
            let end = d.start + d.divisors.len();
            ensure!(end <= rows, "smoothing rows {}..{end} outside a tensor of {rows} rows", d.start);
        }
        self.disjoint()?;
        if let Some(mul) = &self.col_mul {
            ensure!(shape.len() == 2 && mul.len() == cols, "smoothing {} columns of a tensor of shape {shape:?}", mul.len());
        }
        Ok(cols)
    }

    /// Row ranges never overlap: a row divided twice means two groups claim one producer.
    fn disjoint(&self) -> Result<()> {
        for (i, d) in self.row_div.iter().enumerate() {
            let end = d.start + d.divisors.len();
            if let Some(o) = self.row_div[..i].iter().find(|o| o.start < end && d.start < o.start + o.divisors.len()) {
                bail!("smoothing rows {}..{end} overlap rows {}..{}", d.start, o.start, o.start + o.divisors.len());
            }
        }
        Ok(())
    }

    /// The transform on whole rows `first_row ..` of a checked tensor (rows divided, then columns multiplied).
    fn apply_rows(&self, first_row: usize, cols: usize, block: &mut [f32]) {
        for (i, row) in block.chunks_mut(cols).enumerate() {
            let r = first_row + i;
            if let Some(rd) = self.row_div.iter().find(|d| r >= d.start && r < d.start + d.divisors.len()) {
                let d = rd.divisors[r - rd.start];
                if rd.one_plus {
                    row.iter_mut().for_each(|v| *v = (*v + 1.0) / d - 1.0);
                } else {
                    row.iter_mut().for_each(|v| *v /= d);
                }
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
            for (path, carrier) in g.group.producers() {
                let producer = modules.get(path).with_context(|| format!("smoothing producer {path} is not a module"))?;
                let divide = |key: &String, start: usize, one_plus: bool, out: &mut HashMap<String, Transform>| {
                    out.entry(key.clone()).or_default().row_div.push(RowDiv { start, divisors: g.factors.clone(), one_plus });
                };
                let weight = producer.weight_key.as_ref();
                let bias = producer.bias_key.as_ref();
                match carrier {
                    Carrier::Affine | Carrier::Rows { .. } => {
                        let start = if let Carrier::Rows { start } = carrier { start } else { 0 };
                        for key in [weight, bias].into_iter().flatten() {
                            divide(key, start, false, &mut out);
                        }
                    }
                    Carrier::Modulation { shift_start, scale_start } => {
                        let bias = bias.with_context(|| format!("modulation producer {path} has no bias"))?;
                        for key in [weight, Some(bias)].into_iter().flatten() {
                            divide(key, shift_start, false, &mut out);
                            divide(key, scale_start, key == bias, &mut out);
                        }
                    }
                }
            }
            for c in &g.group.consumers {
                let m = modules.get(c).with_context(|| format!("smoothing consumer {c} is not a module"))?;
                let key = m.weight_key.clone().with_context(|| format!("{c} has no weight"))?;
                let t = out.entry(key.clone()).or_default();
                ensure!(t.col_mul.is_none(), "{key} is smoothed twice");
                t.col_mul = Some(g.factors.clone());
            }
        }
        for (key, t) in &out {
            t.disjoint().with_context(|| format!("{key} is smoothed twice"))?;
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
            ensure!(
                bytes.len() == 4 * g.group.channels,
                "{METADATA_KEY}: {} has {} bytes of factors for {} channels",
                g.group.producer,
                bytes.len(),
                g.group.channels
            );
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
    let dtype =
        SourceDtype::from_safetensors(entry.dtype).with_context(|| format!("{key}: only F32, F16 and BF16 tensors can be smoothed"))?;
    let cols = t.check(&entry.shape)?.max(1);
    let bytes = ckpt.bytes(entry);
    // Blocks of whole rows, decoded and transformed on every core (large weights are 10-100 MB).
    let rows_per_block = (16384 / cols).max(1);
    values.resize(entry.elements(), 0.0);
    values.par_chunks_mut(rows_per_block * cols).zip(bytes.par_chunks(rows_per_block * cols * dtype.size())).enumerate().for_each(
        |(b, (out, src))| {
            out.copy_from_slice(&numerics::decode_dtype(dtype, src));
            t.apply_rows(b * rows_per_block, cols, out);
        },
    );
    if let Some(i) = values.par_iter().position_first(|v| !v.is_finite()) {
        bail!("smoothing {key} made element {i} non-finite");
    }
    Ok(())
}

/// A tensor's transformed bytes in its stored dtype, as written to the output.
pub fn transformed_bytes(ckpt: &Checkpoint, key: &str, t: &Transform) -> Result<Vec<u8>> {
    let entry = ckpt.get(key).with_context(|| format!("checkpoint has no `{key}`"))?;
    let dtype =
        SourceDtype::from_safetensors(entry.dtype).with_context(|| format!("{key}: only F32, F16 and BF16 tensors can be smoothed"))?;
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
    smoothing.groups.iter().map(|g| g.report(g.group.consumers.iter().find_map(|c| channel_amax.get(c)).map_or(&[][..], |a| a))).collect()
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
        let rows = |start: usize, divisors: Vec<f32>| vec![RowDiv { start, divisors, one_plus: false }];
        let t = Transform { row_div: rows(1, vec![2.0, 4.0]), col_mul: Some(vec![10.0, 100.0]) };
        let mut v = vec![1.0, 1.0, 2.0, 2.0, 8.0, 8.0];
        t.apply(&[3, 2], &mut v).unwrap();
        assert_eq!(v, vec![10.0, 100.0, 10.0, 100.0, 20.0, 200.0]);
        // Block by block from a later first row gives the same rows.
        let mut tail = vec![2.0, 2.0, 8.0, 8.0];
        t.apply_rows(1, 2, &mut tail);
        assert_eq!(tail, v[2..]);
        let mut bias = vec![1.0, 2.0, 8.0];
        Transform { row_div: rows(1, vec![2.0, 4.0]), col_mul: None }.apply(&[3], &mut bias).unwrap();
        assert_eq!(bias, vec![1.0, 1.0, 2.0]);
        assert!(Transform { row_div: rows(2, vec![2.0, 4.0]), col_mul: None }.apply(&[3], &mut bias).is_err());
    }

    #[test]
    fn modulation_scale_bias_keeps_one_plus_scale_divided() {
        // Bias [shift 3, scale 1]: divided by 2 -> shift 1.5, (1 + 1) / 2 - 1 = 0.
        let t = Transform {
            row_div: vec![
                RowDiv { start: 0, divisors: vec![2.0], one_plus: false },
                RowDiv { start: 1, divisors: vec![2.0], one_plus: true },
            ],
            col_mul: None,
        };
        let mut bias = vec![3.0, 1.0];
        t.apply(&[2], &mut bias).unwrap();
        assert_eq!(bias, vec![1.5, 0.0]);
        let overlapping = Transform {
            row_div: vec![
                RowDiv { start: 0, divisors: vec![2.0, 2.0], one_plus: false },
                RowDiv { start: 1, divisors: vec![2.0], one_plus: true },
            ],
            col_mul: None,
        };
        assert!(format!("{:#}", overlapping.apply(&[2], &mut bias).unwrap_err()).contains("overlap"));
    }

    #[test]
    fn smoothed_amax_is_the_largest_scaled_channel() {
        assert_eq!(smoothed_amax(&[8.0, 3.0], &[4.0, 1.0]), 3.0);
    }

    #[test]
    fn metadata_round_trip_is_exact() {
        let s = Smoothing {
            groups: vec![Smoothed {
                group: Group {
                    producer: "a.norm1".into(),
                    carrier: Carrier::Affine,
                    consumers: vec!["a.attn1.to_q".into()],
                    channels: 3,
                    module: None,
                    also: vec![],
                },
                alpha: 0.5,
                factors: vec![0.1, 1.0 / 3.0, 1024.0],
            }],
        };
        assert_eq!(Smoothing::from_metadata(&s.to_metadata()).unwrap(), s);
        let broken = s.to_metadata().replace("\"channels\":3", "\"channels\":4");
        assert!(Smoothing::from_metadata(&broken).is_err());
    }
}
