//! Family and variant detection from tensor names and shapes (SPEC section 2).
//!
//! Probes use names *without* the `model.diffusion_model.` prefix; the host
//! strips it. Counting blocks (rather than dividing widths) keeps detection
//! right for scaled-down synthetic checkpoints, which keep the key structure.

use crate::host;

/// Model families Quantsmith knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Sd15,
    Sd2,
    Sdxl,
    Sd3,
    Flux,
}

impl Family {
    /// The name used in recipe descriptions, reports and `--recipe`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd15 => "sd15",
            Family::Sd2 => "sd2",
            Family::Sdxl => "sdxl",
            Family::Sd3 => "sd3",
            Family::Flux => "flux",
        }
    }
}

/// What [`identify`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct Identified {
    pub family: Family,
    pub variant: String,
    pub confidence: f32,
    /// Evidence, for humans.
    pub reason: String,
}

fn dim(name: &str, axis: usize) -> Option<u64> {
    host::shape(name).and_then(|s| s.get(axis).copied())
}

/// Number of distinct `<prefix><N>.` blocks among the diffusion model's tensors.
///
/// ```no_run
/// // FLUX.1-dev: 19 double and 38 single blocks.
/// let single = quantsmith_recipe_sdk::detect::count_blocks("single_blocks.");
/// ```
pub fn count_blocks(prefix: &str) -> usize {
    let mut max: Option<usize> = None;
    for t in host::tensors() {
        if let Some(rest) = t.name.strip_prefix(prefix) {
            if let Some(n) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) {
                max = Some(max.map_or(n, |m: usize| m.max(n)));
            }
        }
    }
    max.map_or(0, |m| m + 1)
}

/// Identifies the checkpoint's family and variant, or says why it cannot.
///
/// ```no_run
/// use quantsmith_recipe_sdk::detect::{Family, identify};
///
/// match identify() {
///     Ok(found) if found.family == Family::Sdxl && found.variant == "refiner" => { /* ... */ }
///     Ok(found) => println!("{} {}: {}", found.family.name(), found.variant, found.reason),
///     Err(why) => println!("not a diffusion model I know: {why}"),
/// }
/// ```
pub fn identify() -> Result<Identified, String> {
    if host::has_tensor("input_blocks.0.0.weight") {
        return identify_unet();
    }
    if host::has_tensor("joint_blocks.0.context_block.attn.qkv.weight") {
        return Ok(identify_mmdit());
    }
    if host::has_tensor("double_blocks.0.img_attn.norm.key_norm.scale") && host::has_tensor("img_in.weight") {
        return Ok(identify_flux());
    }
    Err("no known diffusion-model probe (input_blocks.0.0.weight, joint_blocks.0.context_block.attn.qkv.weight, \
         double_blocks.0.img_attn.norm.key_norm.scale + img_in.weight)"
        .into())
}

/// The first cross-attention key projection's input width: the text context dimension.
fn context_dim() -> Option<u64> {
    let mut best: Option<(usize, u64)> = None;
    for t in host::tensors() {
        let Some(rest) = t.name.strip_prefix("input_blocks.") else { continue };
        if !rest.ends_with(".1.transformer_blocks.0.attn2.to_k.weight") {
            continue;
        }
        let Some(n) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) else { continue };
        if best.is_none_or(|(b, _)| n < b) {
            best = t.shape.get(1).map(|&c| (n, c));
        }
    }
    best.map(|(_, c)| c)
}

fn identify_unet() -> Result<Identified, String> {
    let model_channels = dim("input_blocks.0.0.weight", 0).unwrap_or(0);
    let in_channels = dim("input_blocks.0.0.weight", 1).unwrap_or(0);
    let context = context_dim();
    let adm = dim("label_emb.0.0.weight", 1);
    let proj_in_conv = host::tensors()
        .iter()
        .find(|t| t.name.ends_with(".proj_in.weight"))
        .map(|t| t.shape.len() == 4);
    let facts = format!(
        "UNet: model_channels {model_channels}, in_channels {in_channels}, context_dim {}, adm {}",
        context.map_or("none".into(), |c| c.to_string()),
        adm.map_or("none".into(), |a| a.to_string())
    );
    let inpaint = in_channels == 9;
    match (context, adm) {
        (Some(2048), Some(2816)) => Ok(Identified {
            family: Family::Sdxl,
            variant: if inpaint { "inpaint".into() } else { "base".into() },
            confidence: if model_channels == 320 { 1.0 } else { 0.9 },
            reason: facts,
        }),
        (Some(1280), Some(2560)) => Ok(Identified {
            family: Family::Sdxl,
            variant: "refiner".into(),
            confidence: if model_channels == 384 { 1.0 } else { 0.9 },
            reason: facts,
        }),
        (Some(768), None) => Ok(Identified {
            family: Family::Sd15,
            variant: if inpaint { "inpaint".into() } else { "base".into() },
            confidence: if proj_in_conv == Some(true) { 1.0 } else { 0.8 },
            reason: facts,
        }),
        (Some(1024), None) => {
            // ComfyUI's own heuristic: v-prediction SD2 models have a wide spread
            // in the last output block's first norm bias.
            let v_pred = !inpaint
                && host::stats("output_blocks.11.1.transformer_blocks.0.norm1.bias")
                    .map(|s| s.std > 0.09)
                    .unwrap_or(false);
            Ok(Identified {
                family: Family::Sd2,
                variant: if inpaint { "inpaint".into() } else if v_pred { "v-prediction".into() } else { "eps".into() },
                confidence: if proj_in_conv == Some(false) { 1.0 } else { 0.8 },
                reason: facts,
            })
        }
        _ => Err(format!("unrecognised UNet ({facts})")),
    }
}

fn identify_mmdit() -> Identified {
    let depth = count_blocks("joint_blocks.");
    let hidden = dim("x_embedder.proj.weight", 0).unwrap_or(0);
    let qk_norm = host::has_tensor("joint_blocks.0.x_block.attn.ln_q.weight");
    let attn2 = host::has_tensor("joint_blocks.0.x_block.attn2.qkv.weight");
    let variant = match (qk_norm, attn2, depth) {
        (true, true, _) => "3.5-medium",
        (true, false, 38) => "3.5-large",
        (true, false, _) => "3.5",
        (false, _, 24) => "3-medium",
        (false, _, _) => "3",
    };
    // Full-size models have hidden = 64 * depth; scaled-down synthetic ones do not.
    let full_size = hidden == 64 * depth as u64;
    Identified {
        family: Family::Sd3,
        variant: variant.into(),
        confidence: if full_size { 1.0 } else { 0.9 },
        reason: format!(
            "MMDiT: depth {depth} (joint blocks), hidden {hidden}{}, qk-norm {qk_norm}, x_block.attn2 {attn2}",
            if full_size { "" } else { " (not 64 x depth: scaled-down)" }
        ),
    }
}

fn identify_flux() -> Identified {
    let hidden = dim("img_in.weight", 0).unwrap_or(0);
    let guidance = host::has_tensor("guidance_in.in_layer.weight");
    let double = count_blocks("double_blocks.");
    let single = count_blocks("single_blocks.");
    Identified {
        family: Family::Flux,
        variant: if guidance { "dev".into() } else { "schnell".into() },
        confidence: if hidden == 3072 { 1.0 } else { 0.9 },
        reason: format!(
            "FLUX: hidden {hidden}, {double} double + {single} single blocks, guidance_in {}",
            if guidance { "present (dev)" } else { "absent (schnell)" }
        ),
    }
}
