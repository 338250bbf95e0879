//! One description per model family: everything the host needs to run,
//! calibrate and evaluate a backbone, as data, so that no other module matches
//! family names. Facts from ComfyUI (pinned commit, SPEC sections 2 and 6):
//! `comfy/supported_models.py` (`sampling_settings`, `latent_format`),
//! `comfy/model_sampling.py` (the parameterizations), `comfy/text_encoders/`
//! (`sd3_clip.py`, `flux.py`: the text stacks).

use anyhow::{Result, bail};
use serde::Serialize;

use crate::calibrate::schedule::NoiseSchedule;

/// What the model predicts, and so how a sampler turns its output into the
/// Euler derivative `d = (x - denoised) / sigma` (k-diffusion's convention).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Parameterization {
    /// Noise (`EPS`): input `x / sqrt(sigma^2 + 1)`, `d` = the output.
    Epsilon,
    /// Velocity of the variance-preserving diffusion (`V_PREDICTION`, SD2-768).
    V,
    /// Rectified flow (`CONST`): input `x`, `d` = the output
    /// (`denoised = x - sigma * output`). Latents are `(1 - sigma) x0 + sigma noise`.
    Flow,
}

/// How sigmas map to model timesteps (`model_sampling`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Sampling {
    /// DDPM `scaled_linear` betas, 1000 steps.
    Ddpm,
    /// `ModelSamplingDiscreteFlow`.
    DiscreteFlow { shift: f32, multiplier: f32 },
    /// `ModelSamplingFlux` (exponential shift `mu`).
    Flux { shift: f32 },
}

impl Sampling {
    pub fn schedule(self) -> NoiseSchedule {
        match self {
            Sampling::Ddpm => NoiseSchedule::scaled_linear_sd(),
            Sampling::DiscreteFlow { shift, multiplier } => NoiseSchedule::discrete_flow(shift as f64, multiplier as f64),
            Sampling::Flux { shift } => NoiseSchedule::flux(shift as f64),
        }
    }
}

/// Which text encoders produce the conditioning, and how it is assembled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TextStack {
    /// SD1.x: CLIP-L's last hidden state.
    ClipL,
    /// SD2.x: OpenCLIP-H's penultimate state.
    OpenClipH,
    /// SDXL base: CLIP-L and OpenCLIP-G penultimate states side by side; `y` =
    /// pooled G and size conditioning.
    ClipLG,
    /// SDXL refiner: OpenCLIP-G only; `y` = pooled G, sizes and aesthetic score.
    ClipG,
    /// SD3/3.5: CLIP-L ‖ CLIP-G penultimate states padded to 4096, then T5-XXL's
    /// tokens; pooled = CLIP-L pooled ‖ CLIP-G pooled.
    Sd3,
    /// FLUX.1: T5-XXL tokens; pooled = CLIP-L pooled.
    Flux,
}

/// The backbone's kind of network (which forward pass runs it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backbone {
    Unet,
    Mmdit,
    Flux,
}

/// One model family and variant, as the host runs it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Architecture {
    /// The family name recipes report (`sd15`, `sd2`, `sdxl`, `sd3`, `flux`).
    pub family: &'static str,
    pub variant: String,
    pub backbone: Backbone,
    /// Latent channels the sampler walks (4 or 16; inpainting UNets take more
    /// inputs, which the host fills).
    pub latent_channels: usize,
    /// Pixels per latent element side.
    pub latent_downscale: usize,
    /// Latent side must be a multiple of this (the DiTs' 2x2 patches).
    pub latent_multiple: usize,
    pub native_resolution: u32,
    pub parameterization: Parameterization,
    pub sampling: Sampling,
    pub text: TextStack,
    /// Width of the cross-attention context tokens.
    pub context_width: usize,
    /// Context tokens of one random or empty conditioning (CLIP 77; SD3 77 CLIP +
    /// 77 T5; FLUX 256 T5 tokens, schnell's and ComfyUI's minimum).
    pub context_tokens: usize,
    /// Width of the pooled text vector (`y`) the model takes, `None` when it
    /// takes none (SD1.x, SD2.x; SDXL's `y` is built from a pooled vector).
    pub pooled_width: Option<usize>,
    /// FLUX-dev's distilled guidance, fed through `guidance_in` (ComfyUI's default 3.5).
    pub guidance: Option<f32>,
    /// The sampler runs classifier-free guidance pairs (all but FLUX).
    pub cfg: bool,
    /// Steps a walk takes by default (schnell is distilled to 4).
    pub default_steps: u32,
}

/// Families with a host forward pass.
pub const FAMILIES: &[&str] = &["sd15", "sd2", "sdxl", "sd3", "flux"];

impl Architecture {
    /// The description of a family and variant as a recipe detected them
    /// (`Detection.family`, `.variant`).
    pub fn of(family: &str, variant: &str) -> Result<Architecture> {
        let unet = |family: &'static str, text: TextStack, context_width: usize, native: u32, param: Parameterization| Architecture {
            family,
            variant: variant.to_string(),
            backbone: Backbone::Unet,
            latent_channels: 4,
            latent_downscale: 8,
            latent_multiple: 1,
            native_resolution: native,
            parameterization: param,
            sampling: Sampling::Ddpm,
            text,
            context_width,
            context_tokens: 77,
            pooled_width: None,
            guidance: None,
            cfg: true,
            default_steps: 20,
        };
        Ok(match family {
            "sd15" => unet("sd15", TextStack::ClipL, 768, 512, Parameterization::Epsilon),
            "sd2" if variant == "v-prediction" => unet("sd2", TextStack::OpenClipH, 1024, 768, Parameterization::V),
            "sd2" => unet("sd2", TextStack::OpenClipH, 1024, 512, Parameterization::Epsilon),
            "sdxl" if variant == "refiner" => {
                Architecture { pooled_width: Some(1280), ..unet("sdxl", TextStack::ClipG, 1280, 1024, Parameterization::Epsilon) }
            }
            "sdxl" => Architecture { pooled_width: Some(1280), ..unet("sdxl", TextStack::ClipLG, 2048, 1024, Parameterization::Epsilon) },
            "sd3" => Architecture {
                family: "sd3",
                variant: variant.to_string(),
                backbone: Backbone::Mmdit,
                latent_channels: 16,
                latent_downscale: 8,
                latent_multiple: 2,
                native_resolution: 1024,
                parameterization: Parameterization::Flow,
                sampling: Sampling::DiscreteFlow { shift: 3.0, multiplier: 1000.0 },
                text: TextStack::Sd3,
                context_width: 4096,
                context_tokens: 154,
                pooled_width: Some(2048),
                guidance: None,
                cfg: true,
                default_steps: 20,
            },
            "flux" => {
                let schnell = variant == "schnell";
                Architecture {
                    family: "flux",
                    variant: variant.to_string(),
                    backbone: Backbone::Flux,
                    latent_channels: 16,
                    latent_downscale: 8,
                    latent_multiple: 2,
                    native_resolution: 1024,
                    parameterization: Parameterization::Flow,
                    sampling: if schnell { Sampling::DiscreteFlow { shift: 1.0, multiplier: 1.0 } } else { Sampling::Flux { shift: 1.15 } },
                    text: TextStack::Flux,
                    context_width: 4096,
                    context_tokens: 256,
                    pooled_width: Some(768),
                    guidance: (!schnell).then_some(3.5),
                    cfg: false,
                    default_steps: if schnell { 4 } else { 20 },
                }
            }
            other => bail!("no host forward pass for the {other} family (there is one for {})", FAMILIES.join(", ")),
        })
    }

    /// Latent shape `[batch, channels, h, w]` of a `width` x `height` image, or why not.
    pub fn latent_shape(&self, batch: usize, width: u32, height: u32) -> Result<[usize; 4]> {
        let step = self.latent_downscale * self.latent_multiple;
        if !(width as usize).is_multiple_of(step) || !(height as usize).is_multiple_of(step) || width == 0 || height == 0 {
            bail!("{}: image sides must be positive multiples of {step} pixels, got {width}x{height}", self.family);
        }
        Ok([batch, self.latent_channels, height as usize / self.latent_downscale, width as usize / self.latent_downscale])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_as_comfyui_sets_them() {
        let sd3 = Architecture::of("sd3", "3.5-large").unwrap();
        assert_eq!((sd3.latent_channels, sd3.parameterization, sd3.cfg), (16, Parameterization::Flow, true));
        assert_eq!(sd3.sampling, Sampling::DiscreteFlow { shift: 3.0, multiplier: 1000.0 });
        let dev = Architecture::of("flux", "dev").unwrap();
        assert_eq!((dev.guidance, dev.cfg, dev.default_steps), (Some(3.5), false, 20));
        assert_eq!(dev.sampling, Sampling::Flux { shift: 1.15 });
        let schnell = Architecture::of("flux", "schnell").unwrap();
        assert_eq!((schnell.guidance, schnell.default_steps), (None, 4));
        assert_eq!(schnell.sampling, Sampling::DiscreteFlow { shift: 1.0, multiplier: 1.0 });
        assert_eq!(Architecture::of("sd2", "v-prediction").unwrap().parameterization, Parameterization::V);
        assert_eq!(Architecture::of("sdxl", "base").unwrap().latent_channels, 4);
        assert!(Architecture::of("sdxl", "refiner").unwrap().text == TextStack::ClipG);
        assert!(format!("{:#}", Architecture::of("wan", "x").unwrap_err()).contains("no host forward pass for the wan family"));
    }

    #[test]
    fn latent_shapes() {
        let flux = Architecture::of("flux", "dev").unwrap();
        assert_eq!(flux.latent_shape(2, 1024, 768).unwrap(), [2, 16, 96, 128]);
        assert!(flux.latent_shape(1, 1024, 1000).is_err(), "1000 / 8 = 125 latents cannot be cut into 2x2 patches");
        assert_eq!(Architecture::of("sd15", "base").unwrap().latent_shape(1, 512, 520).unwrap(), [1, 4, 65, 64]);
    }
}
