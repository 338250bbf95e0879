//! Layers that stay in high precision by default, and layers ComfyUI probes.
//!
//! Patterns are shell wildcards over *module paths* in the original (LDM / BFL /
//! SAI) names; [`crate::rules::RuleSet`] turns them into quantizer-name rules.

/// What ModelOpt leaves in high precision for diffusion models (SPEC section 5),
/// translated to the original names: timestep, class and guidance embedders, the
/// patch and context embedders, the first convolution and the output layers.
pub const MODELOPT_EXCLUSIONS: &[&str] = &[
    // UNet (SD1.x, SD2.x, SDXL)
    "time_embed.*",
    "label_emb.*",
    "input_blocks.0.0",
    "out.2",
    // MMDiT (SD3 / 3.5)
    "t_embedder.*",
    "y_embedder.*",
    "x_embedder.*",
    "context_embedder",
    "pos_embed",
    "final_layer.*",
    // FLUX.1
    "img_in",
    "txt_in",
    "time_in.*",
    "vector_in.*",
    "guidance_in.*",
];

/// Layers ComfyUI reads to detect the model from stored shapes (SPEC section 3).
/// They must keep their logical shape: high precision, FP8 or INT8, never the
/// packed or padded NVFP4 / MXFP8 layouts.
pub const PROBE_LAYERS: &[&str] = &[
    "img_in",
    "txt_in",
    "vector_in.*",
    "context_embedder",
    "y_embedder.*",
    "x_embedder.*",
    "label_emb.0.0",
    "input_blocks.0.0",
    "*.attn2.to_k",
    "*proj_in",
];
