//! Quantization formats ComfyUI loads natively.
//!
//! One module per format; each implements [`Format`]: the on-disk layout
//! ([`Format::layout`]), the CPU reference ([`Format::quantize`], bit-exact with
//! comfy-kitchen's eager backend) and the way back ([`Format::dequantize`]). The
//! CUDA kernels for the same formats live in `kernels/` and `crate::gpu`, and are
//! tested byte for byte against these references.

pub mod fp8;
pub mod int8;
pub mod mxfp8;
pub mod numerics;
pub mod nvfp4;

use safetensors::Dtype;
use serde::{Deserialize, Serialize};

/// The formats a plan can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantFormat {
    Fp8,
    Int8,
    Nvfp4,
    Mxfp8,
}

impl QuantFormat {
    pub const ALL: [QuantFormat; 4] = [QuantFormat::Fp8, QuantFormat::Int8, QuantFormat::Nvfp4, QuantFormat::Mxfp8];

    /// The short name used on the command line and in recipes.
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Fp8 => "fp8",
            QuantFormat::Int8 => "int8",
            QuantFormat::Nvfp4 => "nvfp4",
            QuantFormat::Mxfp8 => "mxfp8",
        }
    }

    /// The `format` value of ComfyUI's `comfy_quant` JSON.
    pub fn comfy_name(self) -> &'static str {
        match self {
            QuantFormat::Fp8 => "float8_e4m3fn",
            QuantFormat::Int8 => "int8_tensorwise",
            QuantFormat::Nvfp4 => "nvfp4",
            QuantFormat::Mxfp8 => "mxfp8",
        }
    }

    /// The block size the format fixes along the input dimension, if any.
    pub fn block_size(self) -> Option<u32> {
        match self {
            QuantFormat::Nvfp4 => Some(nvfp4::BLOCK),
            QuantFormat::Mxfp8 => Some(mxfp8::BLOCK),
            QuantFormat::Fp8 | QuantFormat::Int8 => None,
        }
    }

    /// Whether the stored weight shape differs from the logical `[out, in]`
    /// (packing or padding), which ComfyUI's shape-based detection cannot read.
    pub fn changes_shape(self) -> bool {
        matches!(self, QuantFormat::Nvfp4 | QuantFormat::Mxfp8)
    }

    /// Accepts the short name or ComfyUI's name.
    ///
    /// ```
    /// use quantsmith::formats::QuantFormat;
    /// assert_eq!(QuantFormat::parse("fp8"), Some(QuantFormat::Fp8));
    /// assert_eq!(QuantFormat::parse("int8_tensorwise"), Some(QuantFormat::Int8));
    /// assert_eq!(QuantFormat::parse("int4"), None);
    /// ```
    pub fn parse(s: &str) -> Option<QuantFormat> {
        QuantFormat::ALL.into_iter().find(|f| f.name() == s || f.comfy_name() == s)
    }
}

/// A resolved quantizer: format plus the options the format allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuantSpec {
    pub format: QuantFormat,
    /// INT8 only: one scale per output channel (`[out, 1]`) instead of per tensor.
    pub per_channel: bool,
}

impl QuantSpec {
    /// The implementation of this spec.
    pub fn implementation(self) -> Box<dyn Format> {
        match self.format {
            QuantFormat::Fp8 => Box::new(fp8::Fp8),
            QuantFormat::Int8 => Box::new(int8::Int8 { per_channel: self.per_channel }),
            QuantFormat::Nvfp4 => Box::new(nvfp4::Nvfp4),
            QuantFormat::Mxfp8 => Box::new(mxfp8::Mxfp8),
        }
    }
}

/// Element types a source weight can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SourceDtype {
    F32,
    F16,
    BF16,
}

impl SourceDtype {
    pub fn from_safetensors(d: Dtype) -> Option<SourceDtype> {
        match d {
            Dtype::F32 => Some(SourceDtype::F32),
            Dtype::F16 => Some(SourceDtype::F16),
            Dtype::BF16 => Some(SourceDtype::BF16),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            SourceDtype::F32 => 4,
            SourceDtype::F16 | SourceDtype::BF16 => 2,
        }
    }
}

/// A 2-D weight `[rows, cols]` (= `[out, in]`) borrowed from the checkpoint.
/// `bytes` is little-endian and may be unaligned (safetensors does not align).
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'a> {
    pub name: &'a str,
    pub dtype: SourceDtype,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
}

/// The weight as f32 (exact), after checking its byte length.
pub fn decode_source(w: &WeightView<'_>) -> Result<Vec<f32>, QuantError> {
    numerics::check_view(w)?;
    Ok(numerics::decode_dtype(w.dtype, w.bytes))
}

/// Shape and dtype of one stored tensor of a quantized layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSpec {
    /// Appended to `<layer>.`: `weight`, `weight_scale`, `weight_scale_2`.
    pub suffix: &'static str,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl StoredSpec {
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// One stored tensor with its bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredTensor {
    pub spec: StoredSpec,
    pub data: Vec<u8>,
}

/// Why a weight could not be quantized.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("tensor {name}: {count} non-finite value(s) (NaN or infinity), first at element {first}; refusing to quantize")]
    NonFinite { name: String, count: usize, first: usize },
    #[error("tensor {name}: {reason}")]
    Invalid { name: String, reason: String },
}

/// A quantization format: on-disk layout, CPU reference, dequantization.
pub trait Format: Send + Sync {
    fn id(&self) -> QuantFormat;

    /// The stored tensors for a `[rows, cols]` weight, in write order (`weight` first).
    fn layout(&self, rows: usize, cols: usize) -> Vec<StoredSpec>;

    /// Quantizes on the CPU (all cores), bit-exact with comfy-kitchen's eager backend.
    /// Refuses NaN and infinities with the tensor's name.
    fn quantize(&self, w: &WeightView<'_>) -> Result<Vec<StoredTensor>, QuantError>;

    /// Back to f32 `[rows, cols]`, from tensors laid out as [`Format::layout`] says.
    fn dequantize(&self, stored: &[StoredTensor], rows: usize, cols: usize) -> Vec<f32>;

    /// Dequantizes `stored`, compares it with `original` element by element
    /// against the format's worst-case rounding error, and returns the error
    /// statistics; `Err` names the first element outside the bound.
    fn verify(&self, original: &WeightView<'_>, stored: &[StoredTensor]) -> Result<ErrorStats, String>;
}

/// How far a dequantized weight is from the original.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ErrorStats {
    pub elements: usize,
    pub max_abs_error: f64,
    /// ||dequantized - original|| / ||original||.
    pub relative_l2: f64,
    /// Cosine similarity of dequantized and original.
    pub cosine: f64,
}
