//! A standalone text-encoder safetensors file, as ComfyUI keeps them in
//! `models/text_encoders/` (`clip_l.safetensors`, `clip_g.safetensors`,
//! `t5xxl_fp16.safetensors`, `t5xxl_fp8_e4m3fn_scaled.safetensors`, ...).
//!
//! Unlike [`crate::checkpoint::Checkpoint`] it holds no diffusion model, and it
//! may be FP8: ComfyUI's "scaled FP8" files (a `scaled_fp8` marker tensor) store
//! each Linear weight as F8_E4M3 with an f32 `<module>.scale_weight`, applied as
//! `weight.to(dtype) * scale_weight` (ComfyUI `comfy/ops.py`, `scaled_fp8_ops`);
//! plain FP8 files store F8_E4M3 weights without a scale (scale 1). Such tensors
//! are read through [`WeightSource::dequantized`], decoded to f32 on load.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::formats::numerics::e4m3_to_f32;
use crate::formats::{SourceDtype, WeightView, decode_source};
use crate::models::WeightSource;

/// The marker tensor of ComfyUI's scaled-FP8 files.
pub const SCALED_FP8_MARKER: &str = "scaled_fp8";

#[derive(Clone, Debug)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    offsets: (usize, usize),
}

/// A memory-mapped text-encoder file.
pub struct EncoderFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

impl EncoderFile {
    /// Maps `path` and reads its header; the error names the file.
    pub fn open(path: &Path) -> Result<EncoderFile> {
        let file = File::open(path).with_context(|| format!("cannot open the text encoder file {}", path.display()))?;
        let len = file.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
        ensure!(len >= 8, "{} is not a safetensors file ({len} bytes)", path.display());
        // SAFETY: read-only map; a file truncated under us can fault, the contract
        // every safetensors reader accepts.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let (header_len, meta) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| anyhow!("{e:?}"))
            .with_context(|| format!("{} is not a safetensors file", path.display()))?;
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(k, info)| (k, Entry { dtype: info.dtype, shape: info.shape.clone(), offsets: info.data_offsets }))
            .collect();
        let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok(EncoderFile { path: path.to_path_buf(), mmap, data_start: 8 + header_len, tensors, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every stored key, sorted.
    pub fn keys(&self) -> Vec<&str> {
        let mut k: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        k.sort_unstable();
        k
    }

    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.tensors.get(key).map(|e| e.shape.as_slice())
    }

    pub fn dtype(&self, key: &str) -> Option<Dtype> {
        self.tensors.get(key).map(|e| e.dtype)
    }

    /// The file's `__metadata__`.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Whether any weight is stored as FP8 (scaled or not).
    pub fn has_fp8(&self) -> bool {
        self.tensors.iter().any(|(k, e)| e.dtype == Dtype::F8_E4M3 && k != SCALED_FP8_MARKER)
    }

    /// Whether the file carries ComfyUI's scaled-FP8 marker (any prefix).
    pub fn is_scaled_fp8(&self) -> bool {
        self.tensors.keys().any(|k| k == SCALED_FP8_MARKER || k.ends_with(".scaled_fp8"))
    }

    fn bytes(&self, e: &Entry) -> &[u8] {
        &self.mmap[self.data_start + e.offsets.0..self.data_start + e.offsets.1]
    }

    fn entry(&self, key: &str) -> Result<&Entry> {
        self.tensors.get(key).ok_or_else(|| anyhow!("{} has no tensor `{key}`", self.path.display()))
    }

    /// A scalar scale tensor as f32.
    fn scalar(&self, key: &str) -> Result<f32> {
        let (shape, view) = self.tensor(key)?;
        ensure!(shape.iter().product::<usize>() == 1, "{}: `{key}` has shape {shape:?}, expected one value", self.path.display());
        let v = decode_source(&view).with_context(|| format!("{}: cannot read `{key}`", self.path.display()))?;
        Ok(v[0])
    }
}

impl WeightSource for EncoderFile {
    fn tensor(&self, key: &str) -> Result<(Vec<usize>, WeightView<'_>)> {
        let (stored_key, e) = self.tensors.get_key_value(key).ok_or_else(|| anyhow!("{} has no tensor `{key}`", self.path.display()))?;
        let Some(dtype) = SourceDtype::from_safetensors(e.dtype) else {
            bail!("{}: tensor `{key}` has dtype {:?}, not a float the model can run", self.path.display(), e.dtype)
        };
        let elements = e.shape.iter().product::<usize>();
        let cols = e.shape.last().copied().unwrap_or(1).max(1);
        Ok((e.shape.clone(), WeightView { name: stored_key, dtype, rows: elements / cols, cols, bytes: self.bytes(e) }))
    }

    fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    fn dequantized(&self, key: &str) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        let e = self.entry(key)?;
        if e.dtype != Dtype::F8_E4M3 {
            return Ok(None);
        }
        let bytes = self.bytes(e);
        let elements = e.shape.iter().product::<usize>();
        ensure!(bytes.len() == elements, "{}: `{key}` holds {} bytes for {elements} FP8 values", self.path.display(), bytes.len());
        let scale_key = format!("{}.scale_weight", key.strip_suffix(".weight").unwrap_or(key));
        let scale = if self.contains(&scale_key) { self.scalar(&scale_key)? } else { 1.0 };
        Ok(Some((e.shape.clone(), bytes.iter().map(|&b| e4m3_to_f32(b) * scale).collect())))
    }
}

/// Writes f32 values of `shape` as safetensors bytes of `dtype` (F32, F16, BF16
/// or F8_E4M3, the last saturating at ±448): the tiny encoder files of the tests
/// and of `synth`.
pub fn encode_values(dtype: Dtype, values: &[f32]) -> Result<Vec<u8>> {
    use crate::formats::numerics::{e4m3_from_f32, encode_source};
    Ok(match dtype {
        Dtype::F32 => encode_source(SourceDtype::F32, values),
        Dtype::F16 => encode_source(SourceDtype::F16, values),
        Dtype::BF16 => encode_source(SourceDtype::BF16, values),
        Dtype::F8_E4M3 => values.iter().map(|&v| e4m3_from_f32(v)).collect(),
        other => bail!("cannot write {other:?} tensors"),
    })
}

/// Writes `tensors` (key, dtype, shape, f32 values) to a safetensors file at `path`.
pub fn write_file(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<f32>)]) -> Result<()> {
    use safetensors::tensor::TensorView;
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, d, s, v)| {
            ensure!(s.iter().product::<usize>() == v.len(), "`{k}`: {} values for shape {s:?}", v.len());
            Ok((k.clone(), *d, s.clone(), encode_values(*d, v)?))
        })
        .collect::<Result<_>>()?;
    let views: Vec<(String, TensorView<'_>)> = encoded
        .iter()
        .map(|(k, d, s, b)| Ok((k.clone(), TensorView::new(*d, s.clone(), b).map_err(|e| anyhow!("`{k}`: {e:?}"))?)))
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| anyhow!("cannot write {}: {e:?}", path.display()))
}
