//! The SD3 / SD3.5 MMDiT (SD3-medium, SD3.5-medium, SD3.5-large), with the
//! original (SAI / ComfyUI single-file) weight names and semantics of ComfyUI's
//! `comfy/ldm/modules/diffusionmodules/mmdit.py` (`MMDiT`,
//! `OpenAISignatureMMDITWrapper`), itself SAI's sd3 reference `mmditx.py`;
//! diffusers' `SD3Transformer2DModel` computes the same function under other names.
//!
//! - `x_embedder.proj`: `p`×`p` conv of stride `p` (PatchEmbed), tokens row-major,
//!   plus `pos_embed [1, M², hidden]` cropped to the centre `h`×`w` window
//!   (`cropped_pos_embed`: top `(M - h) / 2`, left `(M - w) / 2`).
//! - `c = t_embedder(t) + y_embedder(y)`: timestep features of the model timestep
//!   (256 frequencies, cos half first, max period 10000) and the pooled vector,
//!   each through Linear → SiLU → Linear; `context_embedder` maps the text tokens.
//! - Joint blocks: a `context_block` and an `x_block` (DismantledBlock) each
//!   compute `adaLN_modulation.1(SiLU(c))` chunks (shift, scale, gate for the
//!   attention, then for the MLP; SD3.5-medium's first x-blocks add shift, scale,
//!   gate of `attn2`), `qkv` of `modulate(LayerNorm(x))` (no affine, eps 1e-6),
//!   optional per-head RMSNorm `ln_q` / `ln_k` (eps 1e-6, SD3.5); one attention
//!   over the concatenated (context, x) tokens, split back; then
//!   `x += gate · proj(attn)`, (`x += gate2 · attn2.proj(self-attention of x)`),
//!   `x += gate · fc2(gelu_tanh(fc1(modulate(LayerNorm(x)))))`. The last
//!   context block is `pre_only`: shift and scale only, `qkv` only.
//! - `final_layer`: `linear(modulate(LayerNorm(x), shift, scale))`, then
//!   unpatchify (`nhwpqc -> nchpwq`).
//!
//! ComfyUI sets `hidden = 64 · depth` and `heads = depth`; here heads are
//! `hidden / 64` and the blocks are counted, so the tiny synthetic models (24
//! blocks of width 64) run too. Every Linear and the patch conv take their input
//! through [`InputHooks::apply`] under their module path.

use std::fmt;

use anyhow::{Context, Result, anyhow, ensure};

use super::unet::timestep_embedding;
use super::{InputHooks, WeightSource};
use crate::nn::{Act, ChannelAxis, ObserverSpec, Ops, QkvPart};

/// ComfyUI's fixed head width (`hidden_size = 64 * depth`, `num_heads = depth`).
pub const HEAD_DIM: usize = 64;
/// LayerNorm (`norm1`, `norm2`, `norm_final`) and RMSNorm (`ln_q`, `ln_k`) eps.
const NORM_EPS: f32 = 1e-6;

/// The MMDiT's architecture, read from a checkpoint's tensor names and shapes
/// (the facts ComfyUI's `detect_unet_config` reads for `image_model: mmdit`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmditConfig {
    /// Latent channels in (`x_embedder.proj` shape[1]).
    pub in_channels: usize,
    pub out_channels: usize,
    pub patch_size: usize,
    /// Token width (`x_embedder.proj` shape[0]).
    pub hidden: usize,
    /// `hidden / 64`.
    pub heads: usize,
    /// Number of joint blocks.
    pub depth: usize,
    /// MLP width (`mlp.fc1` outputs; 4 × hidden).
    pub mlp_hidden: usize,
    /// Side of the square position table (`pos_embed` holds its square).
    pub pos_embed_max_size: usize,
    /// Text token width (`context_embedder` inputs; 4096).
    pub context_dim: usize,
    /// Pooled vector width (`y_embedder.mlp.0` inputs; 2048).
    pub adm_in_channels: usize,
    /// Timestep features (`t_embedder.mlp.0` inputs; 256).
    pub frequency_dim: usize,
    /// Per-head RMSNorm of q and k (`attn.ln_q`, `attn.ln_k`; SD3.5).
    pub qk_norm: bool,
    /// Joint blocks whose x-block has the extra self-attention `attn2` (SD3.5-medium: 0..=12).
    pub x_self_attn_layers: Vec<usize>,
}

impl fmt::Display for MmditConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MMDiT {} joint blocks, hidden {} ({} heads), patch {}, in {} out {}, pos_embed {}², context {}, adm {}, qk norm {}, attn2 in {:?}",
            self.depth,
            self.hidden,
            self.heads,
            self.patch_size,
            self.in_channels,
            self.out_channels,
            self.pos_embed_max_size,
            self.context_dim,
            self.adm_in_channels,
            if self.qk_norm { "rms" } else { "none" },
            self.x_self_attn_layers,
        )
    }
}

impl MmditConfig {
    /// SD3-medium (ComfyUI's detected config of `sd3_medium.safetensors`).
    pub fn sd3_medium() -> MmditConfig {
        MmditConfig {
            in_channels: 16,
            out_channels: 16,
            patch_size: 2,
            hidden: 1536,
            heads: 24,
            depth: 24,
            mlp_hidden: 6144,
            pos_embed_max_size: 192,
            context_dim: 4096,
            adm_in_channels: 2048,
            frequency_dim: 256,
            qk_norm: false,
            x_self_attn_layers: vec![],
        }
    }

    /// SD3.5-medium: qk RMSNorm, `attn2` in the first 13 x-blocks, a 384² position table.
    pub fn sd35_medium() -> MmditConfig {
        MmditConfig { pos_embed_max_size: 384, qk_norm: true, x_self_attn_layers: (0..13).collect(), ..MmditConfig::sd3_medium() }
    }

    /// SD3.5-large: 38 blocks of 2432 (38 heads), qk RMSNorm.
    pub fn sd35_large() -> MmditConfig {
        MmditConfig { hidden: 2432, heads: 38, depth: 38, mlp_hidden: 4 * 2432, qk_norm: true, ..MmditConfig::sd3_medium() }
    }

    /// Reads the configuration from the tensors under `prefix`
    /// (`model.diffusion_model.` in a full checkpoint, `""` in a model-only file).
    pub fn from_source(src: &dyn WeightSource, prefix: &str) -> Result<MmditConfig> {
        let shape = |key: &str| -> Option<Vec<usize>> {
            let full = format!("{prefix}{key}");
            if src.contains(&full) { src.tensor(&full).ok().map(|(s, _)| s) } else { None }
        };
        if shape("joint_blocks.0.x_block.attn.qkv.weight").is_none() {
            let what = if src.contains(&format!("{prefix}input_blocks.0.0.weight")) {
                "a UNet (SD1.x / SD2.x / SDXL)".to_string()
            } else if src.contains(&format!("{prefix}double_blocks.0.img_attn.qkv.weight")) {
                "a FLUX model".to_string()
            } else if src.contains(&format!("{prefix}transformer_blocks.0.attn.to_q.weight")) {
                "a diffusers-format transformer (only the original single-file names are supported)".to_string()
            } else if prefix.is_empty() && src.contains("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight") {
                "a full checkpoint: pass the prefix `model.diffusion_model.`".to_string()
            } else {
                format!("no MMDiT under the prefix `{prefix}`")
            };
            return Err(anyhow!("not an SD3/SD3.5 MMDiT: {what} (no `{prefix}joint_blocks.0.x_block.attn.qkv.weight`)"));
        }
        MmditConfig::infer(&shape).with_context(|| format!("cannot read the MMDiT configuration under `{prefix}`"))
    }

    fn infer(shape: &dyn Fn(&str) -> Option<Vec<usize>>) -> Result<MmditConfig> {
        let need = |key: &str, rank: usize| -> Result<Vec<usize>> {
            let s = shape(key).ok_or_else(|| anyhow!("MMDiT tensor `{key}` is missing"))?;
            ensure!(s.len() == rank, "MMDiT tensor `{key}` has shape {s:?}, expected rank {rank}");
            Ok(s)
        };
        let xe = need("x_embedder.proj.weight", 4)?;
        let (hidden, in_channels, patch_size) = (xe[0], xe[1], xe[2]);
        ensure!(patch_size > 0 && xe[3] == patch_size, "`x_embedder.proj.weight` has shape {xe:?}: not a square patch");
        ensure!(
            hidden > 0 && hidden.is_multiple_of(HEAD_DIM),
            "`x_embedder.proj.weight` has shape {xe:?}: width {hidden} is not a multiple of the {HEAD_DIM}-wide heads"
        );
        let fl = need("final_layer.linear.weight", 2)?;
        let pp = patch_size * patch_size;
        ensure!(
            fl[1] == hidden && fl[0] > 0 && fl[0].is_multiple_of(pp),
            "`final_layer.linear.weight` has shape {fl:?}; expected [{pp} × channels, {hidden}]"
        );
        let pos = need("pos_embed", 3)?;
        let side = (pos[1] as f64).sqrt().round() as usize;
        ensure!(
            pos[0] == 1 && pos[2] == hidden && side * side == pos[1] && side > 0,
            "`pos_embed` has shape {pos:?}; expected [1, M², {hidden}]"
        );
        let freq = need("t_embedder.mlp.0.weight", 2)?[1];
        let adm = need("y_embedder.mlp.0.weight", 2)?[1];
        let ctx = need("context_embedder.weight", 2)?[1];
        let depth = (0..).take_while(|i| shape(&format!("joint_blocks.{i}.x_block.attn.qkv.weight")).is_some()).count();
        ensure!(
            shape(&format!("joint_blocks.{depth}.context_block.attn.qkv.weight")).is_none(),
            "`joint_blocks.{depth}` has a context block but no x block"
        );
        for i in 0..depth {
            let proj = shape(&format!("joint_blocks.{i}.context_block.attn.proj.weight")).is_some();
            ensure!(
                proj == (i + 1 < depth),
                "`joint_blocks.{i}.context_block` {}: only the last context block is pre-only (no `attn.proj`)",
                if proj { "has an `attn.proj`" } else { "has no `attn.proj`" }
            );
        }
        let mlp_hidden = need("joint_blocks.0.x_block.mlp.fc1.weight", 2)?[0];
        let qk_norm = shape("joint_blocks.0.x_block.attn.ln_q.weight").is_some();
        let x_self_attn_layers = (0..depth).filter(|i| shape(&format!("joint_blocks.{i}.x_block.attn2.qkv.weight")).is_some()).collect();
        Ok(MmditConfig {
            in_channels,
            out_channels: fl[0] / pp,
            patch_size,
            hidden,
            heads: hidden / HEAD_DIM,
            depth,
            mlp_hidden,
            pos_embed_max_size: side,
            context_dim: ctx,
            adm_in_channels: adm,
            frequency_dim: freq,
            qk_norm,
            x_self_attn_layers,
        })
    }

    fn has_attn2(&self, block: usize) -> bool {
        self.x_self_attn_layers.contains(&block)
    }
}

/// Every tensor of a configuration, in ComfyUI's state-dict order (module
/// definition order), as `(key, shape)`: synth writes the SD3.5 variants from it.
pub fn layout(cfg: &MmditConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden;
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    let lin = |v: &mut Vec<(String, Vec<usize>)>, p: &str, o: usize, i: usize| {
        v.push((format!("{p}.weight"), vec![o, i]));
        v.push((format!("{p}.bias"), vec![o]));
    };
    let attn = |v: &mut Vec<(String, Vec<usize>)>, p: &str, pre_only: bool| {
        lin(v, &format!("{p}.qkv"), 3 * h, h);
        if !pre_only {
            lin(v, &format!("{p}.proj"), h, h);
        }
        if cfg.qk_norm {
            v.push((format!("{p}.ln_q.weight"), vec![HEAD_DIM]));
            v.push((format!("{p}.ln_k.weight"), vec![HEAD_DIM]));
        }
    };
    let p = cfg.patch_size;
    v.push(("pos_embed".into(), vec![1, cfg.pos_embed_max_size * cfg.pos_embed_max_size, h]));
    v.push(("x_embedder.proj.weight".into(), vec![h, cfg.in_channels, p, p]));
    v.push(("x_embedder.proj.bias".into(), vec![h]));
    lin(&mut v, "t_embedder.mlp.0", h, cfg.frequency_dim);
    lin(&mut v, "t_embedder.mlp.2", h, h);
    lin(&mut v, "y_embedder.mlp.0", h, cfg.adm_in_channels);
    lin(&mut v, "y_embedder.mlp.2", h, h);
    lin(&mut v, "context_embedder", h, cfg.context_dim);
    for i in 0..cfg.depth {
        for side in ["context_block", "x_block"] {
            let b = format!("joint_blocks.{i}.{side}");
            let pre_only = side == "context_block" && i + 1 == cfg.depth;
            let attn2 = side == "x_block" && cfg.has_attn2(i);
            attn(&mut v, &format!("{b}.attn"), pre_only);
            if attn2 {
                attn(&mut v, &format!("{b}.attn2"), false);
            }
            if !pre_only {
                lin(&mut v, &format!("{b}.mlp.fc1"), cfg.mlp_hidden, h);
                lin(&mut v, &format!("{b}.mlp.fc2"), h, cfg.mlp_hidden);
            }
            let mods = if pre_only {
                2
            } else if attn2 {
                9
            } else {
                6
            };
            lin(&mut v, &format!("{b}.adaLN_modulation.1"), mods * h, h);
        }
    }
    lin(&mut v, "final_layer.linear", p * p * cfg.out_channels, h);
    lin(&mut v, "final_layer.adaLN_modulation.1", 2 * h, h);
    v
}

// ---------------------------------------------------------------------------
// Modules

struct Linear<T> {
    path: String,
    w: T,
    b: T,
    inp: usize,
}

struct Attention<T> {
    qkv: Linear<T>,
    /// `None` in the pre-only context block.
    proj: Option<Linear<T>>,
    /// Per-head RMSNorm scales `[64]` of q and k (SD3.5).
    ln_qk: Option<(T, T)>,
}

impl<T> Attention<T> {
    fn qkv_part<'a>(&'a self, qkv: &'a T) -> QkvPart<'a, T> {
        QkvPart { qkv, q_norm: self.ln_qk.as_ref().map(|n| &n.0), k_norm: self.ln_qk.as_ref().map(|n| &n.1) }
    }
}

struct Block<T> {
    ada_ln: Linear<T>,
    attn: Attention<T>,
    /// SD3.5-medium's extra x self-attention.
    attn2: Option<Attention<T>>,
    /// `fc1`, `fc2`; `None` in the pre-only context block.
    mlp: Option<(Linear<T>, Linear<T>)>,
}

struct JointBlock<T> {
    context: Block<T>,
    x: Block<T>,
}

/// Reads weights from a source, checking every shape against the configuration.
struct Loader<'a, O: Ops> {
    ops: &'a O,
    src: &'a dyn WeightSource,
    prefix: &'a str,
}

impl<O: Ops> Loader<'_, O> {
    fn get(&self, key: &str, expect: &[usize]) -> Result<O::Tensor> {
        let full = format!("{}{key}", self.prefix);
        let (shape, view) = self.src.tensor(&full)?;
        ensure!(shape == expect, "`{full}` has shape {shape:?}; the MMDiT configuration expects {expect:?}");
        self.ops.weight(&shape, &view).with_context(|| format!("cannot upload `{full}`"))
    }

    fn linear(&self, path: &str, out: usize, inp: usize) -> Result<Linear<O::Tensor>> {
        Ok(Linear {
            path: path.to_string(),
            w: self.get(&format!("{path}.weight"), &[out, inp])?,
            b: self.get(&format!("{path}.bias"), &[out])?,
            inp,
        })
    }

    fn attention(&self, path: &str, cfg: &MmditConfig, pre_only: bool) -> Result<Attention<O::Tensor>> {
        let h = cfg.hidden;
        Ok(Attention {
            qkv: self.linear(&format!("{path}.qkv"), 3 * h, h)?,
            proj: if pre_only { None } else { Some(self.linear(&format!("{path}.proj"), h, h)?) },
            ln_qk: if cfg.qk_norm {
                Some((self.get(&format!("{path}.ln_q.weight"), &[HEAD_DIM])?, self.get(&format!("{path}.ln_k.weight"), &[HEAD_DIM])?))
            } else {
                None
            },
        })
    }

    fn block(&self, path: &str, cfg: &MmditConfig, pre_only: bool, attn2: bool) -> Result<Block<O::Tensor>> {
        let h = cfg.hidden;
        let mods = if pre_only {
            2
        } else if attn2 {
            9
        } else {
            6
        };
        Ok(Block {
            ada_ln: self.linear(&format!("{path}.adaLN_modulation.1"), mods * h, h)?,
            attn: self.attention(&format!("{path}.attn"), cfg, pre_only)?,
            attn2: if attn2 { Some(self.attention(&format!("{path}.attn2"), cfg, false)?) } else { None },
            mlp: if pre_only {
                None
            } else {
                Some((
                    self.linear(&format!("{path}.mlp.fc1"), cfg.mlp_hidden, h)?,
                    self.linear(&format!("{path}.mlp.fc2"), h, cfg.mlp_hidden)?,
                ))
            },
        })
    }
}

/// The MMDiT's weights on a backend, ready to run.
pub struct Mmdit<O: Ops> {
    cfg: MmditConfig,
    /// `x_embedder.proj` (conv weight and bias).
    patch: Linear<O::Tensor>,
    pos_embed: O::Tensor,
    t_embedder: [Linear<O::Tensor>; 2],
    y_embedder: [Linear<O::Tensor>; 2],
    context_embedder: Linear<O::Tensor>,
    blocks: Vec<JointBlock<O::Tensor>>,
    final_ada_ln: Linear<O::Tensor>,
    final_linear: Linear<O::Tensor>,
}

impl<O: Ops> Mmdit<O> {
    /// Uploads every weight the configuration names (each once) from `src`
    /// under `prefix`, checking its shape.
    pub fn load(ops: &O, src: &dyn WeightSource, prefix: &str, cfg: MmditConfig) -> Result<Mmdit<O>> {
        ensure!(
            cfg.depth > 0 && cfg.heads > 0 && cfg.hidden == cfg.heads * HEAD_DIM,
            "MMDiT configuration: {} blocks, hidden {} is not {} heads of {HEAD_DIM}",
            cfg.depth,
            cfg.hidden,
            cfg.heads
        );
        ensure!(
            cfg.x_self_attn_layers.iter().all(|&i| i < cfg.depth),
            "MMDiT configuration: attn2 layers {:?} beyond {} blocks",
            cfg.x_self_attn_layers,
            cfg.depth
        );
        let l = Loader { ops, src, prefix };
        let (h, p) = (cfg.hidden, cfg.patch_size);
        let patch = Linear {
            path: "x_embedder.proj".into(),
            w: l.get("x_embedder.proj.weight", &[h, cfg.in_channels, p, p])?,
            b: l.get("x_embedder.proj.bias", &[h])?,
            inp: cfg.in_channels,
        };
        let m = cfg.pos_embed_max_size;
        let pos_embed = l.get("pos_embed", &[1, m * m, h])?;
        let t_embedder = [l.linear("t_embedder.mlp.0", h, cfg.frequency_dim)?, l.linear("t_embedder.mlp.2", h, h)?];
        let y_embedder = [l.linear("y_embedder.mlp.0", h, cfg.adm_in_channels)?, l.linear("y_embedder.mlp.2", h, h)?];
        let context_embedder = l.linear("context_embedder", h, cfg.context_dim)?;
        let blocks = (0..cfg.depth)
            .map(|i| {
                Ok(JointBlock {
                    context: l.block(&format!("joint_blocks.{i}.context_block"), &cfg, i + 1 == cfg.depth, false)?,
                    x: l.block(&format!("joint_blocks.{i}.x_block"), &cfg, false, cfg.has_attn2(i))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_ada_ln = l.linear("final_layer.adaLN_modulation.1", 2 * h, h)?;
        let final_linear = l.linear("final_layer.linear", p * p * cfg.out_channels, h)?;
        Ok(Mmdit { cfg, patch, pos_embed, t_embedder, y_embedder, context_embedder, blocks, final_ada_ln, final_linear })
    }

    pub fn config(&self) -> &MmditConfig {
        &self.cfg
    }

    /// Every Linear module and the patch conv in forward order, with the
    /// observer slot shape of its input (Linear: `Last`; the conv: `Dim1`).
    pub fn module_inputs(&self) -> Vec<(String, ObserverSpec)> {
        let mut out = vec![(self.patch.path.clone(), ObserverSpec { channels: self.patch.inp, axis: ChannelAxis::Dim1 })];
        let lin = |out: &mut Vec<(String, ObserverSpec)>, m: &Linear<O::Tensor>| {
            out.push((m.path.clone(), ObserverSpec { channels: m.inp, axis: ChannelAxis::Last }));
        };
        for m in self.t_embedder.iter().chain(&self.y_embedder).chain([&self.context_embedder]) {
            lin(&mut out, m);
        }
        for jb in &self.blocks {
            // pre-attention of both sides, then post-attention (`_block_mixing`).
            for b in [&jb.context, &jb.x] {
                lin(&mut out, &b.ada_ln);
                lin(&mut out, &b.attn.qkv);
                if let Some(a2) = &b.attn2 {
                    lin(&mut out, &a2.qkv);
                }
            }
            for b in [&jb.context, &jb.x] {
                for a in std::iter::once(&b.attn).chain(&b.attn2) {
                    if let Some(p) = &a.proj {
                        lin(&mut out, p);
                    }
                }
                if let Some((fc1, fc2)) = &b.mlp {
                    lin(&mut out, fc1);
                    lin(&mut out, fc2);
                }
            }
        }
        lin(&mut out, &self.final_ada_ln);
        lin(&mut out, &self.final_linear);
        out
    }

    /// One denoiser evaluation: latents `x [B, in, H, W]` (H, W multiples of the
    /// patch size) at model `timesteps` (sigma × 1000, one per batch row, as
    /// ComfyUI's `ModelSamplingDiscreteFlow` passes them), text tokens
    /// `context [B, T, context_dim]`, pooled `y [B, adm]`. Returns the flow
    /// velocity `[B, out, H, W]`.
    pub fn forward(
        &self,
        ops: &O,
        x: &O::Tensor,
        timesteps: &[f32],
        context: &O::Tensor,
        y: &O::Tensor,
        hooks: &InputHooks,
    ) -> Result<O::Tensor> {
        let cfg = &self.cfg;
        let xs = ops.shape(x);
        ensure!(xs.len() == 4 && xs[1] == cfg.in_channels, "MMDiT input {xs:?} is not [B, {}, H, W]", cfg.in_channels);
        let (b, p, m) = (xs[0], cfg.patch_size, cfg.pos_embed_max_size);
        ensure!(
            xs[2] > 0 && xs[3] > 0 && xs[2].is_multiple_of(p) && xs[3].is_multiple_of(p),
            "MMDiT input {}x{} is not a multiple of the patch size {p}",
            xs[2],
            xs[3]
        );
        let (h, w) = (xs[2] / p, xs[3] / p);
        ensure!(h <= m && w <= m, "MMDiT input {}x{} has {h}x{w} patches, more than the {m}x{m} position table", xs[2], xs[3]);
        ensure!(timesteps.len() == b, "{} timesteps for a batch of {b}", timesteps.len());
        let cs = ops.shape(context);
        ensure!(cs.len() == 3 && cs[0] == b && cs[2] == cfg.context_dim, "context {cs:?} is not [{b}, T, {}]", cfg.context_dim);
        let ys = ops.shape(y);
        ensure!(ys == [b, cfg.adm_in_channels], "y {ys:?} is not [{b}, {}]", cfg.adm_in_channels);

        // Patches plus the centre crop of the position table.
        let patches = hooks.apply(ops, &self.patch.path, x)?;
        let patches = ops.conv2d(&patches, &self.patch.w, Some(&self.patch.b), p, 0).context("in `x_embedder.proj`")?;
        let hid = cfg.hidden;
        let table = ops.reshape(&self.pos_embed, &[m, m, hid])?;
        let pos = ops.narrow(&ops.narrow(&table, 0, (m - h) / 2, h)?, 1, (m - w) / 2, w)?;
        let pos = ops.reshape(&pos, &[1, h * w, hid])?;
        let pos = if b == 1 { pos } else { ops.concat(&vec![&pos; b], 0)? };
        let mut img = ops.add(&ops.to_tokens(&patches)?, &pos)?;

        let t = ops.from_f32(&[b, cfg.frequency_dim], &timestep_embedding(timesteps, cfg.frequency_dim))?;
        let c = ops.add(&mlp_embed(ops, hooks, &self.t_embedder, &t)?, &mlp_embed(ops, hooks, &self.y_embedder, y)?)?;
        // Every adaLN_modulation starts with the same SiLU.
        let c = ops.act(&c, Act::Silu)?;
        let mut txt = Some(linear(ops, hooks, &self.context_embedder, context)?);

        for (i, jb) in self.blocks.iter().enumerate() {
            let ctx = txt.take().ok_or_else(|| anyhow!("internal: joint block {i} after the pre-only context block"))?;
            (txt, img) = self.joint_block(ops, hooks, jb, ctx, img, &c).with_context(|| format!("in `joint_blocks.{i}`"))?;
        }

        let mods = linear(ops, hooks, &self.final_ada_ln, &c)?;
        let (shift, scale) = (ops.narrow(&mods, 1, 0, hid)?, ops.narrow(&mods, 1, hid, hid)?);
        let out = ops.ln_modulate(&img, &shift, &scale, NORM_EPS)?;
        let out = linear(ops, hooks, &self.final_linear, &out)?;
        // [B, h·w, p·p·c] as n h w p q c -> n c h p w q.
        let co = cfg.out_channels;
        let out = ops.reshape(&out, &[b, h, w, p, p, co])?;
        let out = ops.permute(&out, &[0, 5, 1, 3, 2, 4])?;
        ops.reshape(&out, &[b, co, h * p, w * p])
    }

    /// `_block_mixing`: returns the new context (`None` after the pre-only
    /// context block) and image tokens.
    fn joint_block(
        &self,
        ops: &O,
        hooks: &InputHooks,
        jb: &JointBlock<O::Tensor>,
        txt: O::Tensor,
        img: O::Tensor,
        c: &O::Tensor,
    ) -> Result<(Option<O::Tensor>, O::Tensor)> {
        let (cq, c_mods) = self.pre_attention(ops, hooks, &jb.context, &txt, c)?;
        let (xq, x_mods) = self.pre_attention(ops, hooks, &jb.x, &img, c)?;
        let n_txt = ops.shape(&txt)[1];
        let n_img = ops.shape(&img)[1];
        let (hid, heads) = (self.cfg.hidden, self.cfg.heads);
        // Joint sequence: context tokens first.
        let parts = [jb.context.attn.qkv_part(&cq[0]), jb.x.attn.qkv_part(&xq[0])];
        let [q, k, v] = ops.qkv_heads(&parts, hid, heads, NORM_EPS, None)?;
        let att = ops.attention(&q, &k, &v, heads, false)?;
        let (c_att, x_att) = (ops.narrow(&att, 1, 0, n_txt)?, ops.narrow(&att, 1, n_txt, n_img)?);
        let txt = match &jb.context.mlp {
            Some(_) => Some(self.post_attention(ops, hooks, &jb.context, txt, &c_att, None, &c_mods)?),
            None => None,
        };
        let att2 = match (xq.get(1), &jb.x.attn2) {
            (Some(qkv2), Some(a2)) => {
                let [q, k, v] = ops.qkv_heads(&[a2.qkv_part(qkv2)], hid, heads, NORM_EPS, None)?;
                Some(ops.attention(&q, &k, &v, heads, false)?)
            }
            _ => None,
        };
        let img = self.post_attention(ops, hooks, &jb.x, img, &x_att, att2.as_ref(), &x_mods)?;
        Ok((txt, img))
    }

    /// adaLN chunks and the fused q|k|v projection of `attn` (and of `attn2` when present).
    fn pre_attention(
        &self,
        ops: &O,
        hooks: &InputHooks,
        b: &Block<O::Tensor>,
        x: &O::Tensor,
        c: &O::Tensor,
    ) -> Result<(Vec<O::Tensor>, Vec<O::Tensor>)> {
        let hid = self.cfg.hidden;
        let mods = linear(ops, hooks, &b.ada_ln, c)?;
        let n = ops.shape(&mods)[1] / hid;
        let chunks = (0..n).map(|i| ops.narrow(&mods, 1, i * hid, hid)).collect::<Result<Vec<_>>>()?;
        let xm = ops.ln_modulate(x, &chunks[0], &chunks[1], NORM_EPS)?;
        let mut qkv = vec![linear(ops, hooks, &b.attn.qkv, &xm)?];
        if let Some(a2) = &b.attn2 {
            let xm2 = ops.ln_modulate(x, &chunks[6], &chunks[7], NORM_EPS)?;
            qkv.push(linear(ops, hooks, &a2.qkv, &xm2)?);
        }
        Ok((qkv, chunks))
    }

    /// Gated residual updates of one side; `att2` is the x-block's `attn2` output.
    #[allow(clippy::too_many_arguments)]
    fn post_attention(
        &self,
        ops: &O,
        hooks: &InputHooks,
        b: &Block<O::Tensor>,
        x: O::Tensor,
        att: &O::Tensor,
        att2: Option<&O::Tensor>,
        mods: &[O::Tensor],
    ) -> Result<O::Tensor> {
        let proj = b.attn.proj.as_ref().ok_or_else(|| anyhow!("internal: post-attention of a pre-only block"))?;
        let mut x = ops.gated_add(&x, &mods[2], &linear(ops, hooks, proj, att)?)?;
        if let (Some(a2), Some(att2)) = (&b.attn2, att2) {
            let proj2 = a2.proj.as_ref().ok_or_else(|| anyhow!("internal: attn2 without proj"))?;
            x = ops.gated_add(&x, &mods[8], &linear(ops, hooks, proj2, att2)?)?;
        }
        let (fc1, fc2) = b.mlp.as_ref().ok_or_else(|| anyhow!("internal: post-attention of a pre-only block"))?;
        let h = ops.ln_modulate(&x, &mods[3], &mods[4], NORM_EPS)?;
        let h = ops.act(&linear(ops, hooks, fc1, &h)?, Act::GeluTanh)?;
        ops.gated_add(&x, &mods[5], &linear(ops, hooks, fc2, &h)?)
    }
}

fn linear<O: Ops>(ops: &O, hooks: &InputHooks, m: &Linear<O::Tensor>, x: &O::Tensor) -> Result<O::Tensor> {
    let x = hooks.apply(ops, &m.path, x)?;
    ops.linear(&x, &m.w, Some(&m.b)).with_context(|| format!("in `{}`", m.path))
}

/// Linear → SiLU → Linear (`TimestepEmbedder`, `VectorEmbedder`).
fn mlp_embed<O: Ops>(ops: &O, hooks: &InputHooks, m: &[Linear<O::Tensor>; 2], x: &O::Tensor) -> Result<O::Tensor> {
    linear(ops, hooks, &m[1], &ops.act(&linear(ops, hooks, &m[0], x)?, Act::Silu)?)
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;

#[cfg(test)]
#[path = "conditioned_tests.rs"]
mod conditioned_tests;
