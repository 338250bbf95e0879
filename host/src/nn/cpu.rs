//! [`CpuOps`]: the reference backend, candle-core on the CPU in f32.
//!
//! Matrix products, convolutions and elementwise ops run in candle. Norm
//! statistics, observers and fake quantization run on the host data directly:
//! the norms accumulate in f64 (a reference should not inherit f32 summation
//! error over the 40·128·128-element groups of a 1024² SDXL step), and the
//! fake quantizers call the same `formats::numerics` codecs the weight formats
//! are built from, so activation and weight numerics cannot drift apart.

use std::sync::Mutex;

use anyhow::{Context, Result, anyhow, bail, ensure};
use candle_core::{D, Device, Tensor};
use rayon::prelude::*;

use super::{Act, ActQuant, ChannelAxis, ObserverSpec, ObserverStats, Ops};
use crate::formats::fp8::{Plan, plan as fp8_plan};
use crate::formats::numerics::{
    self, E2M1_MAX, E4M3_MAX, F32, e2m1_from_f32_fast, e2m1_to_f32, e4m3_from_f32_sat, e4m3_to_f32, e8m0_ceil_code, e8m0_to_f32,
};
use crate::formats::{WeightView, decode_source, mxfp8, nvfp4};

/// `2^-127`: the smallest MXFP8 block scale (see `formats/mxfp8.rs`).
const MXFP8_MIN_SCALE: f32 = f32::from_bits(1 << 22);

#[derive(Default)]
struct Observers {
    specs: Vec<ObserverSpec>,
    step: usize,
    stats: Vec<ObserverStats>,
}

/// candle-core, CPU, f32.
pub struct CpuOps {
    device: Device,
    observers: Mutex<Observers>,
}

impl Default for CpuOps {
    fn default() -> Self {
        CpuOps::new()
    }
}

impl CpuOps {
    pub fn new() -> CpuOps {
        CpuOps { device: Device::Cpu, observers: Mutex::new(Observers::default()) }
    }

    fn host(&self, t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.flatten_all()?.to_vec1::<f32>()?)
    }

    fn tensor(&self, shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        Ok(Tensor::from_vec(data, shape, &self.device)?)
    }
}

/// max that lets NaN through, so a broken activation shows in the observer
/// instead of vanishing (`f32::max` drops NaN).
#[inline]
fn nan_max(a: f32, b: f32) -> f32 {
    if a >= b || a.is_nan() { a } else { b }
}

/// `perm` must reorder every dimension of `dims` exactly once (at most 6, the contract's limit).
pub(crate) fn check_perm(dims: &[usize], perm: &[usize]) -> Result<()> {
    ensure!(perm.len() == dims.len(), "permute: {} axes for a {}-d tensor", perm.len(), dims.len());
    ensure!(perm.len() <= 6, "permute: {} dimensions (at most 6)", perm.len());
    let mut seen = [false; 6];
    for &p in perm {
        ensure!(p < perm.len() && !seen[p], "permute: {perm:?} is not a permutation of 0..{}", perm.len());
        seen[p] = true;
    }
    Ok(())
}

fn check_finite(x: &[f32], what: &str) -> Result<()> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(i) => bail!("{what}: element {i} is {} (the forward pass already diverged)", x[i]),
        None => Ok(()),
    }
}

/// `x ↦ e4m3(clamp(x·mul, ±448))·scale`, fp8.rs's `Plan` applied elementwise.
fn fp8_fake(x: &mut [f32], p: Plan) {
    match p {
        // ROUND_T only matters for 16-bit sources; activations here are f32.
        Plan::Scaled { scale, mul, .. } => x.par_iter_mut().for_each(|v| {
            *v = e4m3_to_f32(e4m3_from_f32_sat((*v * mul).clamp(-E4M3_MAX, E4M3_MAX))) * scale;
        }),
        Plan::Zero => x.fill(0.0),
    }
}

/// INT8 per row, as `formats/int8.rs` quantizes a per-channel F32 weight row:
/// scale = max(amax/127, 1e-30), code = round-half-even(x/scale) clamped to [-128, 127].
fn int8_rows_fake(x: &mut [f32], cols: usize) {
    x.par_chunks_mut(cols).for_each(|row| {
        let scale = (numerics::max_abs(row) / 127.0).max(1e-30);
        for v in row.iter_mut() {
            *v = (*v / scale).round_ties_even().clamp(-128.0, 127.0) * scale;
        }
    });
}

/// NVFP4 with global scale `s2`, blocks of 16 along each row (a short last
/// block behaves as zero-padded), as `formats/nvfp4.rs` encodes and decodes.
fn nvfp4_fake(x: &mut [f32], cols: usize, s2: f32) {
    let b = nvfp4::BLOCK as usize;
    x.par_chunks_mut(cols).for_each(|row| {
        for block in row.chunks_mut(b) {
            let bmax = numerics::max_abs(block);
            let code = e4m3_from_f32_sat((bmax / E2M1_MAX / s2).min(E4M3_MAX));
            let total = s2 * e4m3_to_f32(code);
            if total == 0.0 {
                block.fill(0.0);
                continue;
            }
            for v in block.iter_mut() {
                *v = e2m1_to_f32(e2m1_from_f32_fast((*v / total).clamp(-E2M1_MAX, E2M1_MAX))) * total;
            }
        }
    });
}

/// MXFP8, blocks of 32 along each row, as `formats/mxfp8.rs` encodes and
/// decodes; a nonzero block whose exponent clamps to code 0 dequantizes to 0
/// there, so it does here.
fn mxfp8_fake(x: &mut [f32], cols: usize) {
    let b = mxfp8::BLOCK as usize;
    x.par_chunks_mut(cols).for_each(|row| {
        for block in row.chunks_mut(b) {
            let bmax = numerics::max_abs(block);
            let e = e8m0_ceil_code((bmax / E4M3_MAX).max(MXFP8_MIN_SCALE));
            if bmax == 0.0 || e == 0 {
                block.fill(0.0);
                continue;
            }
            let scale = e8m0_to_f32(e);
            let inv = 1.0 / scale;
            for v in block.iter_mut() {
                *v = e4m3_to_f32(e4m3_from_f32_sat((*v * inv).clamp(-E4M3_MAX, E4M3_MAX))) * scale;
            }
        }
    });
}

/// Normalizes each of `x.len() / len` contiguous runs of `len` elements with
/// f64 statistics (biased variance, as PyTorch's norms), writing
/// `(x - mean) / sqrt(var + eps)`.
fn normalize_runs(x: &mut [f32], len: usize, eps: f32) {
    x.par_chunks_mut(len).for_each(|run| {
        let n = run.len() as f64;
        let mean = run.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = run.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for v in run.iter_mut() {
            *v = ((*v as f64 - mean) * inv) as f32;
        }
    });
}

impl Ops for CpuOps {
    type Tensor = Tensor;

    fn name(&self) -> String {
        "cpu (candle-core, f32)".to_string()
    }

    fn from_f32(&self, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        ensure!(
            shape.iter().product::<usize>() == data.len(),
            "from_f32: shape {shape:?} needs {} values, got {}",
            shape.iter().product::<usize>(),
            data.len()
        );
        Ok(Tensor::from_slice(data, shape, &self.device)?)
    }

    fn weight(&self, shape: &[usize], view: &WeightView<'_>) -> Result<Tensor> {
        ensure!(
            shape.iter().product::<usize>() == view.rows * view.cols,
            "weight `{}`: shape {shape:?} does not hold {}x{} elements",
            view.name,
            view.rows,
            view.cols
        );
        let data = decode_source(view).with_context(|| format!("cannot read weight `{}`", view.name))?;
        self.tensor(shape, data)
    }

    fn to_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        self.host(t)
    }

    fn shape(&self, t: &Tensor) -> Vec<usize> {
        t.dims().to_vec()
    }

    fn reshape(&self, t: &Tensor, shape: &[usize]) -> Result<Tensor> {
        Ok(t.reshape(shape)?)
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (out, inp) = w.dims2().context("linear: weight must be [out, in]")?;
        ensure!(dims.last() == Some(&inp), "linear: input {dims:?} does not end in the weight's {inp} inputs");
        let rows = dims[..dims.len() - 1].iter().product::<usize>();
        let mut y = x.reshape((rows, inp))?.matmul(&w.t()?)?;
        if let Some(b) = b {
            y = y.broadcast_add(b)?;
        }
        let mut shape = dims;
        *shape.last_mut().expect("rank checked above") = out;
        Ok(y.reshape(shape)?)
    }

    fn conv2d(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
        let y = x.contiguous()?.conv2d(w, padding, stride, 1, 1)?;
        match b {
            Some(b) => Ok(y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?),
            None => Ok(y),
        }
    }

    fn group_norm(&self, x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        ensure!(dims.len() >= 2, "group_norm: input {dims:?} has no channel axis");
        let c = dims[1];
        ensure!(groups > 0 && c.is_multiple_of(groups), "group_norm: {c} channels do not split into {groups} groups");
        let mut data = self.host(x)?;
        if data.is_empty() {
            return Ok(x.clone());
        }
        let run = data.len() / (dims[0] * groups);
        normalize_runs(&mut data, run, eps);
        let y = self.tensor(&dims, data)?;
        let mut affine = vec![1usize; dims.len()];
        affine[1] = c;
        Ok(y.broadcast_mul(&w.reshape(affine.as_slice())?)?.broadcast_add(&b.reshape(affine.as_slice())?)?)
    }

    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let c = *dims.last().ok_or_else(|| anyhow!("layer_norm: scalar input"))?;
        let mut data = self.host(x)?;
        if data.is_empty() {
            return Ok(x.clone());
        }
        normalize_runs(&mut data, c, eps);
        Ok(self.tensor(&dims, data)?.broadcast_mul(w)?.broadcast_add(b)?)
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
        let (b, nq, width) = q.dims3().context("attention: q must be [B, N, H*D]")?;
        let (bk, nk, kw) = k.dims3().context("attention: k must be [B, N, H*D]")?;
        ensure!(v.dims() == k.dims(), "attention: v {:?} differs from k {:?}", v.dims(), k.dims());
        ensure!(bk == b && kw == width, "attention: q {:?} and k {:?} do not match", q.dims(), k.dims());
        ensure!(heads > 0 && width.is_multiple_of(heads), "attention: width {width} does not split into {heads} heads");
        ensure!(nk > 0, "attention: no keys");
        let d = width / heads;
        let split = |t: &Tensor, n: usize| -> Result<Tensor> { Ok(t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()?) };
        let (qh, kh, vh) = (split(q, nq)?, split(k, nk)?, split(v, nk)?);
        let mut scores = qh.matmul(&kh.t()?)?.affine(1.0 / (d as f64).sqrt(), 0.0)?;
        if causal {
            let mask: Vec<f32> = (0..nq).flat_map(|i| (0..nk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
            scores = scores.broadcast_add(&Tensor::from_vec(mask, (nq, nk), &self.device)?)?;
        }
        let scores = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?.exp()?;
        let probs = scores.broadcast_div(&scores.sum_keepdim(D::Minus1)?)?;
        let out = probs.matmul(&vh)?;
        Ok(out.transpose(1, 2)?.reshape((b, nq, width))?)
    }

    fn act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        Ok(match act {
            Act::Silu => x.silu()?,
            Act::Gelu => x.gelu_erf()?,
            // x·sigmoid(1.702x), written out: candle-core has no sigmoid.
            Act::QuickGelu => (x / (x.affine(-1.702, 0.0)?.exp()? + 1.0)?)?,
            // candle's `gelu` is the tanh approximation.
            Act::GeluTanh => x.gelu()?,
        })
    }

    fn geglu(&self, x: &Tensor) -> Result<Tensor> {
        let last = *x.dims().last().ok_or_else(|| anyhow!("geglu: scalar input"))?;
        ensure!(last.is_multiple_of(2), "geglu: last dimension {last} is odd");
        let f = last / 2;
        let hidden = x.narrow(D::Minus1, 0, f)?;
        let gate = x.narrow(D::Minus1, f, f)?;
        Ok((hidden * gate.gelu_erf()?)?)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        ensure!(a.dims() == b.dims(), "add: shapes {:?} and {:?} differ", a.dims(), b.dims());
        Ok((a + b)?)
    }

    fn scale(&self, a: &Tensor, s: f32) -> Result<Tensor> {
        Ok(a.affine(s as f64, 0.0)?)
    }

    fn add_channel_bias(&self, x: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (n, c, _, _) = x.dims4().context("add_channel_bias: x must be [N, C, H, W]")?;
        ensure!(b.dims() == [n, c], "add_channel_bias: bias {:?} is not [{n}, {c}]", b.dims());
        Ok(x.broadcast_add(&b.reshape((n, c, 1, 1))?)?)
    }

    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4().context("upsample_nearest2x: x must be [N, C, H, W]")?;
        Ok(x.upsample_nearest2d(2 * h, 2 * w)?)
    }

    fn concat(&self, xs: &[&Tensor], dim: usize) -> Result<Tensor> {
        Ok(Tensor::cat(xs, dim)?)
    }

    fn to_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4().context("to_tokens: x must be [N, C, H, W]")?;
        Ok(x.reshape((n, c, h * w))?.transpose(1, 2)?.contiguous()?)
    }

    fn from_tokens(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (n, t, c) = x.dims3().context("from_tokens: x must be [N, H*W, C]")?;
        ensure!(t == h * w, "from_tokens: {t} tokens are not {h}x{w}");
        Ok(x.transpose(1, 2)?.contiguous()?.reshape((n, c, h, w))?)
    }

    fn embedding(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
        let (v, _) = table.dims2().context("embedding: table must be [V, C]")?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
            bail!("embedding: id {bad} is outside the {v}-row table");
        }
        let ids = Tensor::from_slice(ids, ids.len(), &self.device)?;
        Ok(table.index_select(&ids, 0)?)
    }

    fn select_tokens(&self, x: &Tensor, index: &[usize]) -> Result<Tensor> {
        let (b, n, c) = x.dims3().context("select_tokens: x must be [B, N, C]")?;
        ensure!(index.len() == b, "select_tokens: {} indices for batch {b}", index.len());
        let rows = index
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                ensure!(t < n, "select_tokens: token {t} is outside {n} tokens");
                Ok((i * n + t) as u32)
            })
            .collect::<Result<Vec<u32>>>()?;
        let rows = Tensor::from_vec(rows, b, &self.device)?;
        Ok(x.reshape((b * n, c))?.index_select(&rows, 0)?)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let c = *dims.last().ok_or_else(|| anyhow!("rms_norm: scalar input"))?;
        ensure!(w.dims() == [c], "rms_norm: weight {:?} is not [{c}]", w.dims());
        let mut data = self.host(x)?;
        if data.is_empty() {
            return Ok(x.clone());
        }
        // f64 statistics, as `normalize_runs`.
        data.par_chunks_mut(c).for_each(|run| {
            let ms = run.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / c as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for v in run.iter_mut() {
                *v = (*v as f64 * inv) as f32;
            }
        });
        Ok(self.tensor(&dims, data)?.broadcast_mul(w)?)
    }

    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        ensure!(a.dims() == b.dims(), "mul: shapes {:?} and {:?} differ", a.dims(), b.dims());
        Ok((a * b)?)
    }

    fn narrow(&self, x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        let dims = x.dims();
        ensure!(dim < dims.len(), "narrow: dimension {dim} of a {}-d tensor", dims.len());
        ensure!(
            start.checked_add(len).is_some_and(|e| e <= dims[dim]),
            "narrow: {start}..{start}+{len} is outside dimension {dim} of {dims:?}"
        );
        Ok(x.narrow(dim, start, len)?.contiguous()?)
    }

    fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
        check_perm(x.dims(), perm)?;
        Ok(x.permute(perm)?.contiguous()?)
    }

    fn modulate(&self, x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
        let (b, _, c) = x.dims3().context("modulate: x must be [B, N, C]")?;
        ensure!(shift.dims() == [b, c], "modulate: shift {:?} is not [{b}, {c}]", shift.dims());
        ensure!(scale.dims() == [b, c], "modulate: scale {:?} is not [{b}, {c}]", scale.dims());
        let scale = (scale.reshape((b, 1, c))? + 1.0)?;
        Ok(x.broadcast_mul(&scale)?.broadcast_add(&shift.reshape((b, 1, c))?)?)
    }

    fn gated_add(&self, x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
        let (b, _, c) = x.dims3().context("gated_add: x must be [B, N, C]")?;
        ensure!(y.dims() == x.dims(), "gated_add: y {:?} differs from x {:?}", y.dims(), x.dims());
        ensure!(gate.dims() == [b, c], "gated_add: gate {:?} is not [{b}, {c}]", gate.dims());
        Ok((x + y.broadcast_mul(&gate.reshape((b, 1, c))?)?)?)
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, n, width) = x.dims3().context("rope: x must be [B, N, heads*D]")?;
        ensure!(heads > 0 && width.is_multiple_of(heads), "rope: width {width} does not split into {heads} heads");
        let d = width / heads;
        ensure!(d.is_multiple_of(2), "rope: head dimension {d} is odd");
        let half = d / 2;
        ensure!(cos.dims() == [n, half], "rope: cos {:?} is not [{n}, {half}]", cos.dims());
        ensure!(sin.dims() == [n, half], "rope: sin {:?} is not [{n}, {half}]", sin.dims());
        let xs = x.reshape((b, n, heads, half, 2))?;
        let x0 = xs.narrow(4, 0, 1)?;
        let x1 = xs.narrow(4, 1, 1)?;
        let cos = cos.reshape((1, n, 1, half, 1))?;
        let sin = sin.reshape((1, n, 1, half, 1))?;
        let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
        let y1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
        Ok(Tensor::cat(&[&y0, &y1], 4)?.reshape((b, n, width))?)
    }

    fn attention_biased(&self, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, bias: &Tensor, scale: f32) -> Result<Tensor> {
        let (b, nq, width) = q.dims3().context("attention_biased: q must be [B, N, H*D]")?;
        let (bk, nk, kw) = k.dims3().context("attention_biased: k must be [B, N, H*D]")?;
        ensure!(v.dims() == k.dims(), "attention_biased: v {:?} differs from k {:?}", v.dims(), k.dims());
        ensure!(bk == b && kw == width, "attention_biased: q {:?} and k {:?} do not match", q.dims(), k.dims());
        ensure!(heads > 0 && width.is_multiple_of(heads), "attention_biased: width {width} does not split into {heads} heads");
        ensure!(nk > 0, "attention_biased: no keys");
        ensure!(bias.dims() == [heads, nq, nk], "attention_biased: bias {:?} is not [{heads}, {nq}, {nk}]", bias.dims());
        let d = width / heads;
        let split = |t: &Tensor, n: usize| -> Result<Tensor> { Ok(t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()?) };
        let (qh, kh, vh) = (split(q, nq)?, split(k, nk)?, split(v, nk)?);
        let scores = qh.matmul(&kh.t()?)?.affine(scale as f64, 0.0)?.broadcast_add(&bias.unsqueeze(0)?)?;
        let scores = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?.exp()?;
        let probs = scores.broadcast_div(&scores.sum_keepdim(D::Minus1)?)?;
        let out = probs.matmul(&vh)?;
        Ok(out.transpose(1, 2)?.reshape((b, nq, width))?)
    }

    fn observers_reset(&self, specs: &[ObserverSpec], steps: usize) -> Result<()> {
        ensure!(steps > 0, "observers need at least one step bucket");
        let mut o = self.observers.lock().map_err(|_| anyhow!("observer state poisoned"))?;
        o.specs = specs.to_vec();
        o.step = 0;
        o.stats =
            specs.iter().map(|s| ObserverStats { channel_amax: vec![0.0; s.channels], step_amax: vec![0.0; steps], calls: 0 }).collect();
        Ok(())
    }

    fn observers_set_step(&self, step: usize) -> Result<()> {
        let mut o = self.observers.lock().map_err(|_| anyhow!("observer state poisoned"))?;
        let steps = o.stats.first().map_or(0, |s| s.step_amax.len());
        ensure!(o.stats.is_empty() || step < steps, "observer step {step} is outside the {steps} buckets");
        o.step = step;
        Ok(())
    }

    fn observe(&self, x: &Tensor, slot: usize) -> Result<()> {
        let dims = x.dims().to_vec();
        let data = self.host(x)?;
        let mut o = self.observers.lock().map_err(|_| anyhow!("observer state poisoned"))?;
        let step = o.step;
        let spec = o.specs.get(slot).cloned().ok_or_else(|| anyhow!("observer slot {slot} was never set up"))?;
        let (channels, inner) = match spec.axis {
            ChannelAxis::Last => (dims.last().copied().unwrap_or(1), 1),
            ChannelAxis::Dim1 => {
                ensure!(dims.len() >= 2, "observer slot {slot}: input {dims:?} has no channel axis");
                (dims[1], dims[2..].iter().product())
            }
        };
        ensure!(channels == spec.channels, "observer slot {slot}: input {dims:?} has {channels} channels, the slot {}", spec.channels);
        let stats = &mut o.stats[slot];
        if data.is_empty() {
            // Nothing to fold; the call still counts.
        } else if inner == 1 {
            for row in data.chunks(channels) {
                for (m, &v) in stats.channel_amax.iter_mut().zip(row) {
                    *m = nan_max(*m, v.abs());
                }
            }
        } else {
            // One contiguous run of H·W values per (sample, channel).
            for (i, run) in data.chunks(inner).enumerate() {
                let m = &mut stats.channel_amax[i % channels];
                *m = run.iter().fold(*m, |m, &v| nan_max(m, v.abs()));
            }
        }
        let this_call = data.iter().fold(0.0f32, |m, &v| nan_max(m, v.abs()));
        stats.step_amax[step] = nan_max(stats.step_amax[step], this_call);
        stats.calls += 1;
        Ok(())
    }

    fn observers_read(&self) -> Result<Vec<ObserverStats>> {
        let o = self.observers.lock().map_err(|_| anyhow!("observer state poisoned"))?;
        Ok(o.stats.clone())
    }

    fn fake_quant(&self, x: &Tensor, q: ActQuant) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let mut data = self.host(x)?;
        check_finite(&data, "fake_quant input")?;
        let cols = dims.last().copied().unwrap_or(1).max(1);
        match q {
            ActQuant::Fp8Static { scale } => {
                ensure!(scale.is_finite() && scale >= 0.0, "fp8 static activation scale {scale} is not a finite scale ≥ 0");
                // A zero scale (an input never seen nonzero in calibration)
                // quantizes everything to 0, as fp8.rs's zero plan does.
                let mul = 1.0 / scale;
                let p = if mul.is_finite() { Plan::Scaled { scale, mul, round_t: false } } else { Plan::Zero };
                fp8_fake(&mut data, p);
            }
            ActQuant::Fp8Dynamic => {
                let p = fp8_plan::<F32>(numerics::max_abs(&data));
                fp8_fake(&mut data, p);
            }
            ActQuant::Int8DynamicRows => int8_rows_fake(&mut data, cols),
            ActQuant::Nvfp4 { global_scale } => {
                ensure!(
                    global_scale.is_finite() && global_scale > 0.0,
                    "nvfp4 global activation scale {global_scale} is not a finite scale > 0"
                );
                nvfp4_fake(&mut data, cols, global_scale);
            }
            ActQuant::Mxfp8 => mxfp8_fake(&mut data, cols),
        }
        self.tensor(&dims, data)
    }
}

#[cfg(test)]
#[path = "cpu_dit_tests.rs"]
mod dit_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ops: &CpuOps, shape: &[usize], v: &[f32]) -> Tensor {
        ops.from_f32(shape, v).unwrap()
    }

    fn close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * w.abs().max(1.0), "element {i}: {g} vs {w} (all: {got:?})");
        }
    }

    fn fq(ops: &CpuOps, shape: &[usize], v: &[f32], q: ActQuant) -> Vec<f32> {
        ops.to_f32(&ops.fake_quant(&t(ops, shape, v), q).unwrap()).unwrap()
    }

    #[test]
    fn fp8_static_rounds_to_e4m3_times_scale() {
        let ops = CpuOps::new();
        // x/0.5 = [2, -6.6, 600, 0.02]: E4M3 gives 2, -6.5 (step 0.5 in [4, 8)),
        // 448 (clamped), 0.01953125 (10 steps of 2^-9 in [2^-6, 2^-5)).
        let got = fq(&ops, &[4], &[1.0, -3.3, 300.0, 0.01], ActQuant::Fp8Static { scale: 0.5 });
        assert_eq!(got, vec![1.0, -3.25, 224.0, 0.009765625]);
        // A zero scale (input never seen nonzero) gives zeros, not NaN.
        assert_eq!(fq(&ops, &[2], &[1.0, -1.0], ActQuant::Fp8Static { scale: 0.0 }), vec![0.0, 0.0]);
        assert!(ops.fake_quant(&t(&ops, &[1], &[1.0]), ActQuant::Fp8Static { scale: -1.0 }).is_err());
        assert!(ops.fake_quant(&t(&ops, &[2], &[1.0, f32::NAN]), ActQuant::Fp8Dynamic).is_err());
    }

    #[test]
    fn fp8_dynamic_scales_by_the_tensor_amax() {
        let ops = CpuOps::new();
        // amax 4 → scale 4/448, x·112 = [112, -224, 448, 33.6]; 33.6 rounds to
        // 32 (step 4 in [32, 64)), the others are E4M3 values.
        let got = fq(&ops, &[2, 2], &[1.0, -2.0, 4.0, 0.3], ActQuant::Fp8Dynamic);
        close(&got, &[1.0, -2.0, 4.0, 32.0 / 112.0], 1e-6);
        assert_eq!(fq(&ops, &[3], &[0.0; 3], ActQuant::Fp8Dynamic), vec![0.0; 3]);
    }

    #[test]
    fn int8_rows_round_half_even_per_row() {
        let ops = CpuOps::new();
        // Row 0: scale 1, -63.5 → -64, 2.5 → 2, 0.5 → 0 (ties to even).
        // Row 1: scale 31.75/127 = 0.25; 1.5 → 2, -2.5 → -2, 0.4 → 0.
        let got = fq(&ops, &[2, 4], &[127.0, -63.5, 2.5, 0.5, 31.75, 0.375, -0.625, 0.1], ActQuant::Int8DynamicRows);
        assert_eq!(got, vec![127.0, -64.0, 2.0, 0.0, 31.75, 0.5, -0.5, 0.0]);
    }

    #[test]
    fn nvfp4_blocks_of_16_with_e4m3_block_scales() {
        let ops = CpuOps::new();
        // 20 columns: a full block and a short one.
        let mut x = vec![0.0f32; 20];
        x[..6].copy_from_slice(&[12.0, 1.0, 2.5, 5.0, -7.0, 0.4]);
        x[16..].copy_from_slice(&[0.3, -0.1, 0.0, 0.05]);
        let got = fq(&ops, &[1, 20], &x, ActQuant::Nvfp4 { global_scale: 1.0 });
        // Block 0: scale e4m3(12/6) = 2; x/2 = [6, .5, 1.25, 2.5, -3.5, .2] →
        // E2M1 [6, .5, 1, 2, -4, 0] (ties to even).
        let mut want = vec![0.0f32; 20];
        want[..6].copy_from_slice(&[12.0, 1.0, 2.0, 4.0, -8.0, 0.0]);
        // Block 1: scale e4m3(0.3/6 = 0.05) = 13·2^-8 = 0.05078125; x/scale =
        // [5.91, -1.97, 0, 0.98] → [6, -2, 0, 1].
        let s = 0.05078125f32;
        want[16..].copy_from_slice(&[6.0 * s, -2.0 * s, 0.0, s]);
        assert_eq!(got, want);
        // Global scale 0.5: block scale e4m3(3.3/6/0.5 = 1.1) = 1.125, total
        // 0.5625; 3.3/0.5625 = 5.87 → 6. An all-zero block stays zero.
        let mut x = vec![0.0f32; 32];
        x[0] = 3.3;
        let got = fq(&ops, &[2, 16], &x, ActQuant::Nvfp4 { global_scale: 0.5 });
        let mut want = vec![0.0f32; 32];
        want[0] = 3.375;
        assert_eq!(got, want);
        assert!(ops.fake_quant(&t(&ops, &[1], &[1.0]), ActQuant::Nvfp4 { global_scale: 0.0 }).is_err());
    }

    #[test]
    fn mxfp8_blocks_of_32_with_power_of_two_scales() {
        let ops = CpuOps::new();
        let mut x = vec![0.0f32; 64];
        x[..4].copy_from_slice(&[448.0, 3.3, 100.0, -0.7]);
        x[32..35].copy_from_slice(&[1000.0, 0.001, -250.0]);
        let got = fq(&ops, &[64], &x, ActQuant::Mxfp8);
        let mut want = vec![0.0f32; 64];
        // Block 0: 448/448 = 1 → 2^0; 3.3 → 3.25, 100 → 96 (tie to even), -0.7 → -0.6875.
        want[..4].copy_from_slice(&[448.0, 3.25, 96.0, -0.6875]);
        // Block 1: 1000/448 = 2.23 → 2^2; 250 → 256, 0.00025 → 0, -62.5 → -64.
        want[32..35].copy_from_slice(&[1024.0, 0.0, -256.0]);
        assert_eq!(got, want);
    }

    #[test]
    fn group_and_layer_norm() {
        let ops = CpuOps::new();
        // [1, 4, 1, 2], 2 groups: group 0 = [1, 3, 5, 7] (mean 4, var 5),
        // group 1 = [1, 2, 3, 4] (mean 2.5, var 1.25); both normalize to ±1.3416, ±0.4472.
        let x = t(&ops, &[1, 4, 1, 2], &[1.0, 3.0, 5.0, 7.0, 1.0, 2.0, 3.0, 4.0]);
        let w = t(&ops, &[4], &[1.0, 2.0, 1.0, 1.0]);
        let b = t(&ops, &[4], &[0.0, 0.0, 1.0, 0.0]);
        let (a, c) = (1.3416407f32, 0.4472136f32);
        let got = ops.to_f32(&ops.group_norm(&x, 2, &w, &b, 0.0).unwrap()).unwrap();
        close(&got, &[-a, -c, 2.0 * c, 2.0 * a, 1.0 - a, 1.0 - c, c, a], 1e-6);
        // eps enters as var + eps: group 1 with eps 0.75 has 1/sqrt(2).
        let got = ops.to_f32(&ops.group_norm(&x, 2, &w, &b, 0.75).unwrap()).unwrap();
        let r = std::f32::consts::FRAC_1_SQRT_2;
        close(&got[4..], &[1.0 - 1.5 * r, 1.0 - 0.5 * r, 0.5 * r, 1.5 * r], 1e-6);

        let x = t(&ops, &[1, 2, 4], &[1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0]);
        let w = t(&ops, &[4], &[1.0, 1.0, 2.0, 1.0]);
        let b = t(&ops, &[4], &[0.0, 1.0, 0.0, 0.0]);
        let got = ops.to_f32(&ops.layer_norm(&x, &w, &b, 0.0).unwrap()).unwrap();
        close(&got[..4], &[-a, 1.0 - c, 2.0 * c, a], 1e-6);
        // The constant row is 0/0 without eps; with eps it normalizes to 0.
        let got = ops.to_f32(&ops.layer_norm(&x, &w, &b, 1e-5).unwrap()).unwrap();
        close(&got[4..], &[0.0, 1.0, 0.0, 0.0], 1e-6);
    }

    #[test]
    fn attention_with_and_without_causal_mask() {
        let ops = CpuOps::new();
        // One head of width 2: q = [[1,0],[0,1]], k = [[1,0],[1,1]], v = [[1,2],[3,4]].
        let q = t(&ops, &[1, 2, 2], &[1.0, 0.0, 0.0, 1.0]);
        let k = t(&ops, &[1, 2, 2], &[1.0, 0.0, 1.0, 1.0]);
        let v = t(&ops, &[1, 2, 2], &[1.0, 2.0, 3.0, 4.0]);
        // Causal: query 0 sees key 0 only; query 1 has scores [0, 1/√2] →
        // softmax [0.33024, 0.66976].
        let got = ops.to_f32(&ops.attention(&q, &k, &v, 1, true).unwrap()).unwrap();
        close(&got, &[1.0, 2.0, 2.339523, 3.339523], 1e-6);
        // Unmasked: query 0 has equal scores → the mean of v.
        let got = ops.to_f32(&ops.attention(&q, &k, &v, 1, false).unwrap()).unwrap();
        close(&got, &[2.0, 3.0, 2.339523, 3.339523], 1e-6);

        // Two heads of width 1 (scale 1), 3 queries and 2 keys: head 0 sees
        // q [1,0,1], k [1,2], v [1,3]; head 1 sees q [0,2,1], k [1,-1], v [10,20].
        let q = t(&ops, &[1, 3, 2], &[1.0, 0.0, 0.0, 2.0, 1.0, 1.0]);
        let k = t(&ops, &[1, 2, 2], &[1.0, 1.0, 2.0, -1.0]);
        let v = t(&ops, &[1, 2, 2], &[1.0, 10.0, 3.0, 20.0]);
        let got = ops.to_f32(&ops.attention(&q, &k, &v, 2, false).unwrap()).unwrap();
        close(&got, &[2.4621172, 15.0, 2.0, 10.179862, 2.4621172, 11.192029], 1e-6);
        // Batches are independent: the same inputs twice give the same rows.
        let q2 = ops.concat(&[&q, &q], 0).unwrap();
        let (k2, v2) = (ops.concat(&[&k, &k], 0).unwrap(), ops.concat(&[&v, &v], 0).unwrap());
        let got2 = ops.to_f32(&ops.attention(&q2, &k2, &v2, 2, false).unwrap()).unwrap();
        assert_eq!(&got2[..6], &got[..]);
        assert_eq!(&got2[6..], &got[..]);
    }

    #[test]
    fn activations_and_geglu() {
        let ops = CpuOps::new();
        let x = t(&ops, &[2], &[1.0, -2.0]);
        let got = ops.to_f32(&ops.act(&x, Act::QuickGelu).unwrap()).unwrap();
        close(&got, &[0.84579577, -0.06434138], 1e-6);
        let got = ops.to_f32(&ops.act(&x, Act::Gelu).unwrap()).unwrap();
        close(&got, &[0.8413447, -0.04550026], 1e-6);
        let got = ops.to_f32(&ops.act(&x, Act::Silu).unwrap()).unwrap();
        close(&got, &[0.7310586, -0.23840584], 1e-6);
        // [hidden | gate] = [1, 2 | 0.5, -1] → [1·gelu(0.5), 2·gelu(-1)].
        let x = t(&ops, &[1, 4], &[1.0, 2.0, 0.5, -1.0]);
        let got = ops.to_f32(&ops.geglu(&x).unwrap()).unwrap();
        close(&got, &[0.34573123, -0.3173105], 1e-6);
    }

    #[test]
    fn linear_conv_and_layout_ops() {
        let ops = CpuOps::new();
        let x = t(&ops, &[2, 3], &[1.0, 2.0, 3.0, 0.0, -1.0, 1.0]);
        let w = t(&ops, &[2, 3], &[1.0, 0.0, 2.0, -1.0, 1.0, 0.0]);
        let b = t(&ops, &[2], &[0.5, 0.0]);
        let got = ops.to_f32(&ops.linear(&x, &w, Some(&b)).unwrap()).unwrap();
        assert_eq!(got, vec![7.5, 1.0, 2.5, -1.0]);

        // 3×3 image 1..9, 3×3 kernel of ones, padding 1, stride 2: the four
        // corners' 2×2 neighbourhoods, plus bias 1.
        let img: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let x = t(&ops, &[1, 1, 3, 3], &img);
        let w = t(&ops, &[1, 1, 3, 3], &[1.0; 9]);
        let b = t(&ops, &[1], &[1.0]);
        let y = ops.conv2d(&x, &w, Some(&b), 2, 1).unwrap();
        assert_eq!(ops.shape(&y), vec![1, 1, 2, 2]);
        assert_eq!(ops.to_f32(&y).unwrap(), vec![13.0, 17.0, 25.0, 29.0]);

        let x = t(&ops, &[1, 2, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
        let tokens = ops.to_tokens(&x).unwrap();
        assert_eq!(ops.shape(&tokens), vec![1, 2, 2]);
        assert_eq!(ops.to_f32(&tokens).unwrap(), vec![1.0, 3.0, 2.0, 4.0]);
        assert_eq!(ops.to_f32(&ops.from_tokens(&tokens, 1, 2).unwrap()).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        let up = ops.upsample_nearest2x(&t(&ops, &[1, 1, 1, 2], &[1.0, 2.0])).unwrap();
        assert_eq!(ops.shape(&up), vec![1, 1, 2, 4]);
        assert_eq!(ops.to_f32(&up).unwrap(), vec![1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0]);
        let biased = ops.add_channel_bias(&x, &t(&ops, &[1, 2], &[10.0, 20.0])).unwrap();
        assert_eq!(ops.to_f32(&biased).unwrap(), vec![11.0, 12.0, 23.0, 24.0]);

        let table = t(&ops, &[3, 2], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(ops.to_f32(&ops.embedding(&table, &[2, 0, 2]).unwrap()).unwrap(), vec![4.0, 5.0, 0.0, 1.0, 4.0, 5.0]);
        assert!(ops.embedding(&table, &[3]).is_err());
        let x = t(&ops, &[2, 3, 2], &(0..12).map(|v| v as f32).collect::<Vec<_>>());
        assert_eq!(ops.to_f32(&ops.select_tokens(&x, &[2, 0]).unwrap()).unwrap(), vec![4.0, 5.0, 6.0, 7.0]);
    }

    #[test]
    fn observers_fold_channels_and_steps() {
        let ops = CpuOps::new();
        let specs = [ObserverSpec { channels: 3, axis: ChannelAxis::Last }, ObserverSpec { channels: 2, axis: ChannelAxis::Dim1 }];
        ops.observers_reset(&specs, 2).unwrap();
        ops.observe(&t(&ops, &[2, 3], &[1.0, -5.0, 2.0, -3.0, 0.5, 4.0]), 0).unwrap();
        ops.observers_set_step(1).unwrap();
        // [N=1, C=2, H=1, W=2]: channel 0 = [1, -7], channel 1 = [2, 0.5].
        ops.observe(&t(&ops, &[1, 2, 1, 2], &[1.0, -7.0, 2.0, 0.5]), 1).unwrap();
        ops.observe(&t(&ops, &[1, 3], &[0.1, 6.0, 0.0]), 0).unwrap();
        let s = ops.observers_read().unwrap();
        assert_eq!(s[0], ObserverStats { channel_amax: vec![3.0, 6.0, 4.0], step_amax: vec![5.0, 6.0], calls: 2 });
        assert_eq!(s[1], ObserverStats { channel_amax: vec![7.0, 2.0], step_amax: vec![0.0, 7.0], calls: 1 });
        assert_eq!(s[0].amax(), 6.0);
        // Wrong width, unknown slot, step out of range: errors, not silent folds.
        assert!(ops.observe(&t(&ops, &[1, 2], &[1.0, 1.0]), 0).is_err());
        assert!(ops.observe(&t(&ops, &[1, 3], &[1.0, 1.0, 1.0]), 2).is_err());
        assert!(ops.observers_set_step(2).is_err());
        // NaN shows up instead of being dropped.
        ops.observe(&t(&ops, &[1, 3], &[f32::NAN, 0.0, 0.0]), 0).unwrap();
        let s = ops.observers_read().unwrap();
        assert!(s[0].channel_amax[0].is_nan() && s[0].step_amax[1].is_nan());
        // Reset zeroes everything.
        ops.observers_reset(&specs[..1], 1).unwrap();
        assert_eq!(ops.observers_read().unwrap(), vec![ObserverStats { channel_amax: vec![0.0; 3], step_amax: vec![0.0], calls: 0 }]);
    }
}
