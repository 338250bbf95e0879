//! How far bf16 activations move the synthetic DiTs' output, default and
//! `--init conditioned`, measured on the CPU: [`Bf16Storage`] runs [`CpuOps`]
//! with every op output rounded to bf16, as a bf16 GPU run stores its
//! activations (its GEMMs accumulate in f32, as candle's do).

use anyhow::Result;
use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use super::{Mmdit, MmditConfig};
use crate::checkpoint::Checkpoint;
use crate::formats::WeightView;
use crate::models::InputHooks;
use crate::models::flux::{Flux, FluxConfig};
use crate::nn::cpu::CpuOps;
use crate::nn::{Act, ActQuant, ObserverSpec, ObserverStats, Ops};
use crate::synth::{self, Family, SynthInit, SynthOptions};

struct Bf16Storage(CpuOps);

fn r(t: Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?)
}

impl Ops for Bf16Storage {
    type Tensor = Tensor;
    fn name(&self) -> String {
        "cpu with bf16 activations".into()
    }
    fn from_f32(&self, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        r(self.0.from_f32(shape, data)?)
    }
    fn weight(&self, shape: &[usize], view: &WeightView<'_>) -> Result<Tensor> {
        r(self.0.weight(shape, view)?)
    }
    fn to_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        self.0.to_f32(t)
    }
    fn shape(&self, t: &Tensor) -> Vec<usize> {
        self.0.shape(t)
    }
    fn reshape(&self, t: &Tensor, shape: &[usize]) -> Result<Tensor> {
        self.0.reshape(t, shape)
    }
    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        r(self.0.linear(x, w, b)?)
    }
    fn conv2d(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
        r(self.0.conv2d(x, w, b, stride, padding)?)
    }
    fn group_norm(&self, x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
        r(self.0.group_norm(x, groups, w, b, eps)?)
    }
    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
        r(self.0.layer_norm(x, w, b, eps)?)
    }
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
        r(self.0.attention(q, k, v, heads, causal)?)
    }
    fn act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        r(self.0.act(x, act)?)
    }
    fn geglu(&self, x: &Tensor) -> Result<Tensor> {
        r(self.0.geglu(x)?)
    }
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        r(self.0.add(a, b)?)
    }
    fn scale(&self, a: &Tensor, s: f32) -> Result<Tensor> {
        r(self.0.scale(a, s)?)
    }
    fn add_channel_bias(&self, x: &Tensor, b: &Tensor) -> Result<Tensor> {
        r(self.0.add_channel_bias(x, b)?)
    }
    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        self.0.upsample_nearest2x(x)
    }
    fn concat(&self, xs: &[&Tensor], dim: usize) -> Result<Tensor> {
        self.0.concat(xs, dim)
    }
    fn to_tokens(&self, x: &Tensor) -> Result<Tensor> {
        self.0.to_tokens(x)
    }
    fn from_tokens(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        self.0.from_tokens(x, h, w)
    }
    fn embedding(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
        self.0.embedding(table, ids)
    }
    fn select_tokens(&self, x: &Tensor, index: &[usize]) -> Result<Tensor> {
        self.0.select_tokens(x, index)
    }
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        r(self.0.rms_norm(x, w, eps)?)
    }
    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        r(self.0.mul(a, b)?)
    }
    fn narrow(&self, x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        self.0.narrow(x, dim, start, len)
    }
    fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
        self.0.permute(x, perm)
    }
    fn modulate(&self, x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
        r(self.0.modulate(x, shift, scale)?)
    }
    fn gated_add(&self, x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
        r(self.0.gated_add(x, gate, y)?)
    }
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
        r(self.0.rope(x, cos, sin, heads)?)
    }
    fn attention_biased(&self, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, bias: &Tensor, scale: f32) -> Result<Tensor> {
        r(self.0.attention_biased(q, k, v, heads, bias, scale)?)
    }
    fn observers_reset(&self, specs: &[ObserverSpec], steps: usize) -> Result<()> {
        self.0.observers_reset(specs, steps)
    }
    fn observers_set_step(&self, step: usize) -> Result<()> {
        self.0.observers_set_step(step)
    }
    fn observe(&self, x: &Tensor, slot: usize) -> Result<()> {
        self.0.observe(x, slot)
    }
    fn observers_read(&self) -> Result<Vec<ObserverStats>> {
        self.0.observers_read()
    }
    fn fake_quant(&self, x: &Tensor, q: ActQuant) -> Result<Tensor> {
        self.0.fake_quant(x, q)
    }
}

fn randn(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        d += ((x - y) as f64).powi(2);
        n += (*y as f64).powi(2);
    }
    (d / n).sqrt()
}

/// The output of one tiny synthetic checkpoint on `ops`, at 32x32 latents
/// (256 image tokens), 16 text tokens, sigma 0.75.
fn output<O: Ops>(ops: &O, ckpt: &Checkpoint, family: Family) -> Result<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(5);
    let (b, hw, t) = (1, 32, 16);
    let x = ops.from_f32(&[b, 16, hw, hw], &randn(&mut rng, b * 16 * hw * hw))?;
    let out = match family {
        Family::Sd3 => {
            let cfg = MmditConfig::from_source(ckpt, "")?;
            let m = Mmdit::load(ops, ckpt, "", cfg.clone())?;
            let c = ops.from_f32(&[b, t, cfg.context_dim], &randn(&mut rng, b * t * cfg.context_dim))?;
            let y = ops.from_f32(&[b, cfg.adm_in_channels], &randn(&mut rng, b * cfg.adm_in_channels))?;
            m.forward(ops, &x, &[750.0], &c, &y, &InputHooks::none())?
        }
        _ => {
            let cfg = FluxConfig::from_source(ckpt, "")?;
            let m = Flux::load(ops, ckpt, "", cfg.clone())?;
            let c = ops.from_f32(&[b, t, 4096], &randn(&mut rng, b * t * 4096))?;
            let y = ops.from_f32(&[b, 768], &randn(&mut rng, b * 768))?;
            let g = [3.5f32];
            let guidance = if ckpt.get("guidance_in.in_layer.weight").is_some() { Some(&g[..]) } else { None };
            m.forward(ops, &x, &[0.75], &c, &y, guidance, &InputHooks::none())?
        }
    };
    ops.to_f32(&out)
}

/// Prints the gaps (`--nocapture`); conditioned DiTs stay within 1.5e-2 with
/// bf16 activations (SD3-medium's default init: 70%).
#[test]
fn conditioned_dits_keep_bf16_close_to_f32() {
    for (family, variant) in [(Family::Sd3, "medium"), (Family::Sd3, "3.5-medium"), (Family::Sd3, "3.5-large"), (Family::Flux, "dev")] {
        let mut gaps = Vec::new();
        for init in [SynthInit::Default, SynthInit::Conditioned] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.safetensors");
            let o = SynthOptions { variant: Some(variant.into()), init, ..SynthOptions::new(family) };
            synth::write(&o, &path, |_, _| {}).unwrap();
            let ckpt = Checkpoint::open(&path).unwrap();
            let f32_out = output(&CpuOps::new(), &ckpt, family).unwrap();
            let bf16_out = output(&Bf16Storage(CpuOps::new()), &ckpt, family).unwrap();
            let gap = rel_l2(&bf16_out, &f32_out);
            let rms = (f32_out.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / f32_out.len() as f64).sqrt();
            eprintln!("{family} {variant} {init}: bf16 vs f32 relative L2 {gap:.4e}, output RMS {rms:.3}");
            gaps.push(gap);
        }
        // Tiny models' floor is ~0.6% (see `synth::condition_dit`).
        assert!(gaps[1] < 1.5e-2, "{family} {variant}: conditioned bf16 gap {:e}", gaps[1]);
        // Where q and k have no norm (SD3-medium) the default init is chaotic
        // (70%); qk norms keep the default SD3.5 and FLUX near the floor already.
        if variant == "medium" {
            assert!(gaps[1] * 10.0 < gaps[0], "{family} {variant}: {gaps:?}");
        }
    }
}
