//! The denoiser boundary: one backbone network of any family, with its
//! [`Architecture`] and noise schedule, evaluated the way a k-diffusion sampler
//! (ComfyUI's `model_sampling`) evaluates it. Calibration, evaluation and
//! SmoothQuant use this and nothing family-specific.
//!
//! Conventions (ComfyUI `comfy/model_sampling.py`): latents `x` at noise level
//! `sigma`; the network sees `calculate_input(sigma, x)` at `timestep(sigma)`;
//! [`Denoiser::derivative`] is the Euler derivative `d = (x - denoised) / sigma`,
//! so `x + (sigma_next - sigma) * d` is one Euler step for every parameterization.
//! For eps models `d` is the noise prediction, for flows the velocity.

use anyhow::{Context, Result, bail, ensure};

use super::arch::{Architecture, Backbone, Parameterization};
use super::flux::{Flux, FluxConfig};
use super::mmdit::{Mmdit, MmditConfig};
use super::unet::{Unet, UnetConfig};
use super::{InputHooks, WeightSource};
use crate::calibrate::schedule::NoiseSchedule;
use crate::nn::{ObserverSpec, Ops};

/// Text-side conditioning of a batch on a backend: cross-attention context
/// `[B, T, W]` and the vector the model takes besides it (`y`: SDXL's
/// pooled-and-size vector, the DiTs' pooled text vector).
pub struct Conditioning<T> {
    pub context: T,
    pub y: Option<T>,
    pub batch: usize,
    /// Distilled guidance per row (FLUX.1-dev's `guidance_in`; ComfyUI keeps it
    /// on the conditioning too, set by `FluxGuidance`); empty for other models.
    pub guidance: Vec<f32>,
}

/// Whether this build has the forward pass of `backbone`.
pub fn backbone_available(backbone: Backbone) -> bool {
    matches!(backbone, Backbone::Unet | Backbone::Mmdit | Backbone::Flux)
}

/// `arch` with the text widths of the diffusion transformer stored under `prefix`
/// (context and pooled widths, read from its weight shapes without loading them).
/// The real models' are the architecture's own (4096, and 2048 for SD3 or 768 for
/// FLUX); tiny test models ([`crate::synth::SynthOptions::tiny_text`]) take
/// narrower ones, and the text encoders, random and file conditioning follow them.
/// UNets keep theirs.
pub fn with_text_widths(mut arch: Architecture, src: &dyn WeightSource, prefix: &str) -> Result<Architecture> {
    match arch.backbone {
        Backbone::Unet => {}
        Backbone::Mmdit => {
            let cfg = MmditConfig::from_source(src, prefix)?;
            (arch.context_width, arch.pooled_width) = (cfg.context_dim, Some(cfg.adm_in_channels));
        }
        Backbone::Flux => {
            let cfg = FluxConfig::from_source(src, prefix)?;
            (arch.context_width, arch.pooled_width) = (cfg.context_in_dim, Some(cfg.vec_in_dim));
        }
    }
    Ok(arch)
}

/// The network behind a denoiser.
pub enum Network<O: Ops> {
    Unet(Unet<O>),
    Mmdit(Mmdit<O>),
    Flux(Flux<O>),
}

/// A backbone ready to denoise.
pub struct Denoiser<O: Ops> {
    arch: Architecture,
    schedule: NoiseSchedule,
    net: Network<O>,
}

impl<O: Ops> Denoiser<O> {
    /// Reads the network's configuration from `src` under `prefix` and uploads its
    /// weights. A diffusion transformer's text widths are its weights' ([`with_text_widths`]).
    pub fn load(ops: &O, src: &dyn WeightSource, prefix: &str, mut arch: Architecture) -> Result<Denoiser<O>> {
        let net = match arch.backbone {
            Backbone::Unet => {
                let cfg = UnetConfig::from_source(src, prefix)?;
                Network::Unet(Unet::load(ops, src, prefix, cfg).context("loading the UNet")?)
            }
            Backbone::Mmdit => {
                let cfg = MmditConfig::from_source(src, prefix)?;
                (arch.context_width, arch.pooled_width) = (cfg.context_dim, Some(cfg.adm_in_channels));
                Network::Mmdit(Mmdit::load(ops, src, prefix, cfg).context("loading the MMDiT")?)
            }
            Backbone::Flux => {
                let cfg = FluxConfig::from_source(src, prefix)?;
                ensure!(
                    cfg.guidance_embed == arch.guidance.is_some(),
                    "the checkpoint {} a guidance embedder but was detected as FLUX.1-{}",
                    if cfg.guidance_embed { "has" } else { "lacks" },
                    arch.variant
                );
                (arch.context_width, arch.pooled_width) = (cfg.context_in_dim, Some(cfg.vec_in_dim));
                Network::Flux(Flux::load(ops, src, prefix, cfg).context("loading FLUX")?)
            }
        };
        Ok(Denoiser { schedule: arch.sampling.schedule(), arch, net })
    }

    /// The same network with other weights (the evaluation's fake-quantized copies).
    pub fn load_like(&self, ops: &O, src: &dyn WeightSource, prefix: &str) -> Result<Denoiser<O>> {
        let net = match &self.net {
            Network::Unet(u) => Network::Unet(Unet::load(ops, src, prefix, u.config().clone())?),
            Network::Mmdit(m) => Network::Mmdit(Mmdit::load(ops, src, prefix, m.config().clone())?),
            Network::Flux(f) => Network::Flux(Flux::load(ops, src, prefix, f.config().clone())?),
        };
        Ok(Denoiser { arch: self.arch.clone(), schedule: self.schedule.clone(), net })
    }

    pub fn arch(&self) -> &Architecture {
        &self.arch
    }

    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    pub fn network(&self) -> &Network<O> {
        &self.net
    }

    /// Every quantizable module input in forward order, with its observer shape.
    pub fn module_inputs(&self) -> Vec<(String, ObserverSpec)> {
        match &self.net {
            Network::Unet(u) => u.module_inputs(),
            Network::Mmdit(m) => m.module_inputs(),
            Network::Flux(f) => f.module_inputs(),
        }
    }

    /// Width of the cross-attention context.
    pub fn context_width(&self) -> usize {
        match &self.net {
            Network::Unet(u) => u.config().context_dim.unwrap_or(self.arch.context_width),
            Network::Mmdit(m) => m.config().context_dim,
            Network::Flux(f) => f.config().context_in_dim,
        }
    }

    /// Checks latents `[B, C, h, w]` against the architecture.
    pub fn check_latents(&self, shape: &[usize]) -> Result<()> {
        let (c, m) = (self.arch.latent_channels, self.arch.latent_multiple);
        // UNets halve the latents up to three times; 8 keeps every level whole.
        let m = match &self.net {
            Network::Unet(_) => 8,
            Network::Mmdit(_) | Network::Flux(_) => 1,
        }
        .max(m);
        ensure!(shape.len() == 4 && shape[1] == c, "latents must be [batch, {c}, h, w], got {shape:?}");
        ensure!(
            shape[2] >= m && shape[3] >= m && shape[2].is_multiple_of(m) && shape[3].is_multiple_of(m),
            "latent height and width must be multiples of {m}, got {shape:?}"
        );
        Ok(())
    }

    /// The network's raw output (eps, v or flow velocity) for latents `x` at `sigma`.
    pub fn model_output(
        &self,
        ops: &O,
        x: &O::Tensor,
        sigma: f32,
        cond: &Conditioning<O::Tensor>,
        hooks: &InputHooks,
    ) -> Result<O::Tensor> {
        let batch = ops.shape(x)[0];
        ensure!(cond.batch == batch, "latents have batch {batch} but the conditioning has {}", cond.batch);
        let t = vec![self.schedule.sigma_to_t(sigma); batch];
        match &self.net {
            Network::Unet(u) => {
                let x_in = unet_input(ops, x, sigma, u.config().in_channels)?;
                u.forward(ops, &x_in, &t, &cond.context, cond.y.as_ref(), hooks)
            }
            // Flows take the latents as they are (`CONST.calculate_input`).
            Network::Mmdit(m) => {
                let y = cond.y.as_ref().context("SD3 needs the pooled text vector `y`")?;
                m.forward(ops, x, &t, &cond.context, y, hooks)
            }
            Network::Flux(f) => {
                let y = cond.y.as_ref().context("FLUX needs the pooled CLIP-L vector `y`")?;
                let guidance = match (f.config().guidance_embed, cond.guidance.is_empty()) {
                    (true, true) => bail!("FLUX.1-dev needs a guidance value per row"),
                    (true, false) => Some(cond.guidance.as_slice()),
                    (false, _) => None,
                };
                f.forward(ops, x, &t, &cond.context, y, guidance, hooks)
            }
        }
    }

    /// The Euler derivative `d = (x - denoised) / sigma` at `sigma`.
    pub fn derivative(&self, ops: &O, x: &O::Tensor, sigma: f32, cond: &Conditioning<O::Tensor>, hooks: &InputHooks) -> Result<O::Tensor> {
        let out = self.model_output(ops, x, sigma, cond, hooks)?;
        match self.arch.parameterization {
            Parameterization::Epsilon | Parameterization::Flow => Ok(out),
            // denoised = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1), so
            // d = x sigma / (sigma^2 + 1) + v / sqrt(sigma^2 + 1).
            Parameterization::V => {
                let s2 = sigma * sigma + 1.0;
                ops.add(&ops.scale(x, sigma / s2)?, &ops.scale(&out, 1.0 / s2.sqrt())?)
            }
        }
    }
}

/// What a UNet takes for latents `x` `[B, 4, h, w]` at noise level `sigma`
/// (`EPS.calculate_input`): `x / sqrt(sigma^2 + 1)`, and for inpainting models
/// (`in_channels` 9) a zero mask and zero masked image, as for plain generation.
pub fn unet_input<O: Ops>(ops: &O, x: &O::Tensor, sigma: f32, in_channels: usize) -> Result<O::Tensor> {
    let x_in = ops.scale(x, 1.0 / (sigma * sigma + 1.0).sqrt())?;
    if in_channels <= 4 {
        return Ok(x_in);
    }
    let s = ops.shape(x);
    let zeros = vec![0.0f32; s[0] * (in_channels - 4) * s[2] * s[3]];
    let z = ops.from_f32(&[s[0], in_channels - 4, s[2], s[3]], &zeros)?;
    ops.concat(&[&x_in, &z], 1)
}
