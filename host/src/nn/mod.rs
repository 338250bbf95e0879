//! The operations a diffusion backbone needs, behind one trait, so each model
//! (`crate::models`) is written once and runs on every backend:
//!
//! - [`cpu::CpuOps`]: candle-core, f32. The reference, and what tests use on tiny configurations.
//! - `cuda::CudaOps` (in [`cuda`]): cudarc (cuBLAS GEMMs, cuDNN or own convolutions,
//!   kernels in `kernels/nn/`), bf16 activations with f32 accumulation.
//!
//! Layouts: images are NCHW, token sequences `[batch, tokens, channels]`,
//! Linear weights `[out, in]`, conv weights `[out, in, kh, kw]` (the checkpoint's own).
//!
//! Observers live in the backend ([`ObserverTable`] semantics): `observe` folds a
//! module input into its slot on the device, with no host round trip; the host
//! reads all slots once, after calibration.

pub mod cpu;
pub mod cuda;

use anyhow::Result;

use crate::formats::WeightView;

/// Elementwise activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Silu,
    /// Exact GELU (erf), as diffusers' `GELU` and OpenCLIP use.
    Gelu,
    /// `x * sigmoid(1.702 x)`, CLIP-L's activation.
    QuickGelu,
    /// GELU's tanh approximation, `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`:
    /// PyTorch's `gelu(approximate="tanh")`, as the FLUX and SD3 MLPs and T5 v1.1's
    /// gated-gelu use it.
    GeluTanh,
}

/// How a module input is quantized-dequantized in the fake-quantized forward,
/// with the numerics of the matching weight format (see `formats/`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ActQuant {
    /// Static per-tensor FP8 E4M3 with `scale` (= calibrated amax / 448).
    Fp8Static { scale: f32 },
    /// FP8 E4M3 with the scale computed from this very tensor (amax / 448).
    Fp8Dynamic,
    /// INT8 per row (token) at run time, scale = row amax / 127.
    Int8DynamicRows,
    /// NVFP4 with a static global scale (= calibrated amax / 2688) and dynamic 16-wide block scales.
    Nvfp4 { global_scale: f32 },
    /// MXFP8 with dynamic 32-wide E8M0 block scales.
    Mxfp8,
}

/// Which axis of an observed input holds its channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelAxis {
    /// `[.., C]`: Linear inputs (tokens, or `[batch, C]` embeddings).
    Last,
    /// `[N, C, H, W]`: convolution inputs.
    Dim1,
}

/// One observer slot: a quantizable module's input.
#[derive(Clone, Debug, PartialEq)]
pub struct ObserverSpec {
    pub channels: usize,
    pub axis: ChannelAxis,
}

/// What one observer saw, read back after calibration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObserverStats {
    /// max |x| per input channel, over every call.
    pub channel_amax: Vec<f32>,
    /// max |x| over the whole input, per calibration step bucket (index = step set by `set_step`).
    pub step_amax: Vec<f32>,
    /// Number of `observe` calls that reached this slot.
    pub calls: u64,
}

impl ObserverStats {
    /// max |x| over everything observed.
    pub fn amax(&self) -> f32 {
        self.step_amax.iter().copied().fold(0.0, f32::max)
    }
}

/// The operations a UNet / text encoder forward pass needs.
///
/// `Tensor` is a cheap handle (clone = reference count). Every op allocates its
/// output; backends reuse freed memory internally.
pub trait Ops {
    type Tensor: Clone + Send + 'static;

    /// Human-readable description for logs and reports.
    fn name(&self) -> String;

    /// A tensor from host f32 values (row-major). The backend makes it, hence `&self`.
    #[allow(clippy::wrong_self_convention)]
    fn from_f32(&self, shape: &[usize], data: &[f32]) -> Result<Self::Tensor>;
    /// A checkpoint tensor of any shape, converted from its stored dtype to the
    /// compute dtype. `view.rows * view.cols` elements; `shape` gives the real shape.
    fn weight(&self, shape: &[usize], view: &WeightView<'_>) -> Result<Self::Tensor>;
    /// Back to host f32 (synchronises).
    fn to_f32(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    fn shape(&self, t: &Self::Tensor) -> Vec<usize>;
    /// Same elements, new shape (no copy when possible).
    fn reshape(&self, t: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;

    /// `x [.., in] @ w[out, in]^T + b[out]`.
    fn linear(&self, x: &Self::Tensor, w: &Self::Tensor, b: Option<&Self::Tensor>) -> Result<Self::Tensor>;
    /// 2-D convolution, NCHW, square kernel from `w [out, in, k, k]`, groups = 1.
    fn conv2d(&self, x: &Self::Tensor, w: &Self::Tensor, b: Option<&Self::Tensor>, stride: usize, padding: usize) -> Result<Self::Tensor>;
    /// GroupNorm over `[N, C, ...]` with affine `w[C]`, `b[C]`.
    fn group_norm(&self, x: &Self::Tensor, groups: usize, w: &Self::Tensor, b: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;
    /// LayerNorm over the last dimension with affine `w`, `b`.
    fn layer_norm(&self, x: &Self::Tensor, w: &Self::Tensor, b: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;
    /// Multi-head scaled-dot-product attention: `q [B, Nq, H*D]`, `k`, `v [B, Nk, H*D]`
    /// -> `[B, Nq, H*D]`, softmax scale `1/sqrt(D)`; `causal` masks keys after the query.
    fn attention(&self, q: &Self::Tensor, k: &Self::Tensor, v: &Self::Tensor, heads: usize, causal: bool) -> Result<Self::Tensor>;
    fn act(&self, x: &Self::Tensor, act: Act) -> Result<Self::Tensor>;
    /// `[.., 2F]` -> `[.., F]`: `a * gelu(g)` with `a, g` the two halves (diffusers' GEGLU).
    fn geglu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// `a + b`, same shapes.
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// `a * s`.
    fn scale(&self, a: &Self::Tensor, s: f32) -> Result<Self::Tensor>;
    /// `x [N, C, H, W] + b [N, C]` broadcast over H, W (ResBlock time embedding).
    fn add_channel_bias(&self, x: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// Nearest-neighbour 2x upsampling of `[N, C, H, W]`.
    fn upsample_nearest2x(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// Concatenation along `dim`.
    fn concat(&self, xs: &[&Self::Tensor], dim: usize) -> Result<Self::Tensor>;
    /// `[N, C, H, W]` -> `[N, H*W, C]`.
    fn to_tokens(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// `[N, H*W, C]` -> `[N, C, H, W]`.
    #[allow(clippy::wrong_self_convention)]
    fn from_tokens(&self, x: &Self::Tensor, h: usize, w: usize) -> Result<Self::Tensor>;
    /// Rows of `table [V, C]` for `ids` -> `[ids.len(), C]` (token embeddings).
    fn embedding(&self, table: &Self::Tensor, ids: &[u32]) -> Result<Self::Tensor>;
    /// `x [B, N, C]`, one token index per batch row -> `[B, C]` (pooled text output).
    fn select_tokens(&self, x: &Self::Tensor, index: &[usize]) -> Result<Self::Tensor>;

    // ---- Diffusion-transformer and T5 operations. ----

    /// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * w` (`w` has the
    /// last dimension's length). FLUX's and SD3.5's q/k norms, T5's `T5LayerNorm`.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;
    /// `a * b`, same shapes.
    fn mul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// Elements `start .. start + len` of dimension `dim` (a copy).
    fn narrow(&self, x: &Self::Tensor, dim: usize, start: usize, len: usize) -> Result<Self::Tensor>;
    /// Dimensions reordered (a copy): output dim `i` is input dim `perm[i]`; up to 6 dimensions.
    fn permute(&self, x: &Self::Tensor, perm: &[usize]) -> Result<Self::Tensor>;
    /// adaLN modulation: `x [B, N, C] * (1 + scale [B, C]) + shift [B, C]`, broadcast over N.
    fn modulate(&self, x: &Self::Tensor, shift: &Self::Tensor, scale: &Self::Tensor) -> Result<Self::Tensor>;
    /// Gated residual: `x [B, N, C] + gate [B, C] * y [B, N, C]`, broadcast over N.
    fn gated_add(&self, x: &Self::Tensor, gate: &Self::Tensor, y: &Self::Tensor) -> Result<Self::Tensor>;
    /// Rotary position embedding of `x [B, N, heads*D]`, each head rotated the same
    /// way: adjacent pairs `(x[2i], x[2i+1])` of a head become
    /// `(cos[n,i]*x0 - sin[n,i]*x1, sin[n,i]*x0 + cos[n,i]*x1)` with `cos`, `sin`
    /// `[N, D/2]` (BFL FLUX's `apply_rope`).
    fn rope(&self, x: &Self::Tensor, cos: &Self::Tensor, sin: &Self::Tensor, heads: usize) -> Result<Self::Tensor>;
    /// Attention with an additive score bias and an explicit softmax scale:
    /// `softmax(scale * q k^T + bias[h]) v` per head, `bias [heads, Nq, Nk]` shared
    /// by every batch row (T5's relative position bias; T5 uses `scale` = 1).
    fn attention_biased(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        heads: usize,
        bias: &Self::Tensor,
        scale: f32,
    ) -> Result<Self::Tensor>;

    // ---- Fused diffusion-transformer operations. Each default is the composition
    // of the primitives above that the models used before the fused op existed,
    // so a backend without an override (the CPU reference) computes exactly that. ----

    /// LayerNorm without affine over the last dimension, then adaLN modulation:
    /// `LN(x) * (1 + scale [B, C]) + shift [B, C]` for `x [B, N, C]` (the pre-attention
    /// and pre-MLP norm of FLUX and SD3 blocks).
    fn ln_modulate(&self, x: &Self::Tensor, shift: &Self::Tensor, scale: &Self::Tensor, eps: f32) -> Result<Self::Tensor> {
        composed::ln_modulate(self, x, shift, scale, eps)
    }

    /// The q, k, v of one attention from fused projections: each part's `qkv
    /// [B, N_p, >= 3 * width]` holds q, k and v in its first `3 * width` columns
    /// (`width = heads * D`); q and k are RMS-normed per head (eps `eps`) where the
    /// part has norms; the parts are joined along the tokens (in order); then, with
    /// `rope = (cos, sin)` (`[sum N_p, D/2]`), q and k are rotated as [`Ops::rope`]
    /// does. Returns `[q, k, v]`, each `[B, sum N_p, width]`.
    fn qkv_heads(
        &self,
        parts: &[QkvPart<'_, Self::Tensor>],
        width: usize,
        heads: usize,
        eps: f32,
        rope: Option<(&Self::Tensor, &Self::Tensor)>,
    ) -> Result<[Self::Tensor; 3]> {
        composed::qkv_heads(self, parts, width, heads, eps, rope)
    }

    /// `concat([a, act(x[.., start .. start + len])], last dim)`: FLUX single
    /// blocks' `linear2` input (attention output beside the MLP activation).
    fn concat_act(&self, a: &Self::Tensor, x: &Self::Tensor, start: usize, len: usize, act: Act) -> Result<Self::Tensor> {
        composed::concat_act(self, a, x, start, len, act)
    }

    /// Sets up `specs.len()` observer slots with `steps` step buckets each, zeroed.
    fn observers_reset(&self, specs: &[ObserverSpec], steps: usize) -> Result<()>;
    /// Step bucket for the following `observe` calls (`< steps`).
    fn observers_set_step(&self, step: usize) -> Result<()>;
    /// Folds |x| into slot `slot`: channel amax and the current step's amax.
    fn observe(&self, x: &Self::Tensor, slot: usize) -> Result<()>;
    /// Reads every slot back (synchronises once).
    fn observers_read(&self) -> Result<Vec<ObserverStats>>;
    /// Quantize-dequantize `x` as `q` says (fake quantization of a module input).
    fn fake_quant(&self, x: &Self::Tensor, q: ActQuant) -> Result<Self::Tensor>;
    /// Peak device bytes, for backends with a device.
    fn peak_device_bytes(&self) -> Option<u64> {
        None
    }

    /// Forgets the per-op timings gathered so far (backends with an op profiler).
    fn profile_reset(&self) -> Result<()> {
        Ok(())
    }

    /// Per-op device time since the last [`Ops::profile_reset`], as a table, when
    /// this backend profiles ops (CUDA with `QUANTSMITH_PROFILE_OPS=1`).
    fn profile_report(&self) -> Result<Option<String>> {
        Ok(None)
    }
}

/// One input of [`Ops::qkv_heads`]: a fused q|k|v projection and its per-head norms.
pub struct QkvPart<'a, T> {
    pub qkv: &'a T,
    pub q_norm: Option<&'a T>,
    pub k_norm: Option<&'a T>,
}

/// The fused DiT ops of [`Ops`] composed of primitives: their default
/// implementations, and the fallback of backends whose fused kernels do not
/// cover a shape.
pub mod composed {
    use anyhow::{Result, anyhow, ensure};

    use super::{Act, Ops, QkvPart};

    pub fn ln_modulate<O: Ops + ?Sized>(ops: &O, x: &O::Tensor, shift: &O::Tensor, scale: &O::Tensor, eps: f32) -> Result<O::Tensor> {
        let c = *ops.shape(x).last().ok_or_else(|| anyhow!("ln_modulate: scalar input"))?;
        let ones = ops.from_f32(&[c], &vec![1.0; c])?;
        let zeros = ops.from_f32(&[c], &vec![0.0; c])?;
        ops.modulate(&ops.layer_norm(x, &ones, &zeros, eps)?, shift, scale)
    }

    pub fn qkv_heads<O: Ops + ?Sized>(
        ops: &O,
        parts: &[QkvPart<'_, O::Tensor>],
        width: usize,
        heads: usize,
        eps: f32,
        rope: Option<(&O::Tensor, &O::Tensor)>,
    ) -> Result<[O::Tensor; 3]> {
        ensure!(!parts.is_empty(), "qkv_heads: no parts");
        ensure!(heads > 0 && width.is_multiple_of(heads), "qkv_heads: width {width} does not split into {heads} heads");
        let per_head = |t: &O::Tensor, w: &O::Tensor| -> Result<O::Tensor> {
            let s = ops.shape(t);
            let y = ops.rms_norm(&ops.reshape(t, &[s[0], s[1], heads, width / heads])?, w, eps)?;
            ops.reshape(&y, &s)
        };
        let mut out: [Vec<O::Tensor>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        for p in parts {
            let s = ops.shape(p.qkv);
            ensure!(s.len() == 3 && s[2] >= 3 * width, "qkv_heads: part {s:?} is not [B, N, >= 3 x {width}]");
            for (j, norm) in [p.q_norm, p.k_norm, None].into_iter().enumerate() {
                let t = ops.narrow(p.qkv, 2, j * width, width)?;
                out[j].push(match norm {
                    Some(w) => per_head(&t, w)?,
                    None => t,
                });
            }
        }
        let [q, k, v] = out.map(|ts| if ts.len() == 1 { Ok(ts[0].clone()) } else { ops.concat(&ts.iter().collect::<Vec<_>>(), 1) });
        let (mut q, mut k, v) = (q?, k?, v?);
        if let Some((cos, sin)) = rope {
            q = ops.rope(&q, cos, sin, heads)?;
            k = ops.rope(&k, cos, sin, heads)?;
        }
        Ok([q, k, v])
    }

    pub fn concat_act<O: Ops + ?Sized>(ops: &O, a: &O::Tensor, x: &O::Tensor, start: usize, len: usize, act: Act) -> Result<O::Tensor> {
        let dim = ops.shape(x).len().checked_sub(1).ok_or_else(|| anyhow!("concat_act: scalar input"))?;
        let h = ops.act(&ops.narrow(x, dim, start, len)?, act)?;
        ops.concat(&[a, &h], dim)
    }
}
