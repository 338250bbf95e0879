//! FLUX.1 (dev and schnell), with the original BFL weight names (as ComfyUI
//! and the released single files store them) and the semantics of BFL's
//! `flux/model.py` and `flux/modules/layers.py` (ComfyUI's `comfy/ldm/flux/`
//! is the same model):
//!
//! - The latent `[B, C, H, W]` is patchified 2x2, `b c (h ph) (w pw) -> b (h w) (c ph pw)`,
//!   and projected by `img_in`; the text tokens by `txt_in`.
//! - `vec = time_in(emb(t)) + guidance_in(emb(g)) + vector_in(y)`: each an MLP
//!   `in_layer -> SiLU -> out_layer` of `timestep_embedding(1000 t, 256)`
//!   (cos half first, max period 10000); `guidance_in` only in dev.
//! - RoPE over the ids `(0, row, col)` of image tokens and zeros for text,
//!   axes `[16, 56, 56]` of the 128-wide head, theta 10000, applied to adjacent pairs.
//! - Double blocks: per stream `Modulation(vec)` = `lin(SiLU(vec))` split into
//!   (shift, scale, gate) x 2; LayerNorm without affine (eps 1e-6) then
//!   `(1 + scale) x + shift`; `qkv` split `(K H D)`; RMSNorm (eps 1e-6) on q and k
//!   per head; joint attention over `concat(txt, img)`; `x += gate * proj(attn)`;
//!   `x += gate2 * mlp.2(gelu_tanh(mlp.0(modulated x)))`.
//! - Single blocks over `concat(txt, img)`: `linear1` gives qkv and the MLP
//!   hidden at once, `linear2` takes `concat(attn, gelu_tanh(mlp))`, one gate.
//! - `final_layer`: `adaLN_modulation.1(SiLU(vec))` = (shift, scale), LayerNorm,
//!   modulation, `linear`; then un-patchify.
//!
//! Every Linear input goes through [`InputHooks::apply`] under its module path
//! (weight key without `.weight` and without the prefix).

use anyhow::{Context, Result, bail, ensure};

use super::unet::timestep_embedding;
use super::{InputHooks, WeightSource};
use crate::nn::{Act, ChannelAxis, ObserverSpec, Ops, QkvPart};

/// `nn.LayerNorm(..., elementwise_affine=False, eps=1e-6)` in every block.
const LN_EPS: f32 = 1e-6;
/// BFL's `RMSNorm` (q/k norms).
const RMS_EPS: f32 = 1e-6;
/// `timestep_embedding`'s `time_factor`: timesteps and guidance arrive as sigma in [0, 1].
const TIME_FACTOR: f32 = 1000.0;
/// Width of the sinusoidal timestep / guidance features (`in_dim=256`).
const TIME_DIM: usize = 256;
/// `EmbedND`'s theta.
const ROPE_THETA: f64 = 10000.0;
const PATCH: usize = 2;

/// The shape of a FLUX model, as read from its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct FluxConfig {
    /// Latent channels (16).
    pub in_channels: usize,
    /// Hidden width (3072).
    pub hidden: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Double (joint) blocks (19).
    pub depth: usize,
    /// Single blocks (38).
    pub depth_single: usize,
    /// MLP hidden width (4 x hidden).
    pub mlp_hidden: usize,
    /// T5 token width (4096).
    pub context_in_dim: usize,
    /// Pooled CLIP-L width (768).
    pub vec_in_dim: usize,
    /// dev has the guidance embedder, schnell not.
    pub guidance_embed: bool,
    /// RoPE frequencies per id axis, summing to `head_dim` ([16, 56, 56]).
    pub axes_dim: [usize; 3],
}

impl FluxConfig {
    /// The configuration of the FLUX model stored under `prefix` (e.g.
    /// `model.diffusion_model.` or empty), from the shapes of its weights.
    pub fn from_source(src: &dyn WeightSource, prefix: &str) -> Result<FluxConfig> {
        let shape = |key: &str| -> Result<Vec<usize>> {
            let full = format!("{prefix}{key}");
            Ok(src.tensor(&full).with_context(|| format!("not a FLUX model: no `{full}`"))?.0)
        };
        let mat = |key: &str| -> Result<(usize, usize)> {
            let s = shape(key)?;
            ensure!(s.len() == 2, "`{prefix}{key}` has shape {s:?}, not a Linear weight [out, in]");
            Ok((s[0], s[1]))
        };
        let (hidden, patch_in) = mat("img_in.weight")?;
        ensure!(
            patch_in % (PATCH * PATCH) == 0 && patch_in > 0,
            "`{prefix}img_in.weight` takes {patch_in} inputs, not a whole number of 2x2 patches"
        );
        let count = |f: &dyn Fn(usize) -> String| (0..).take_while(|&n| src.contains(&format!("{prefix}{}", f(n)))).count();
        let depth = count(&|n| format!("double_blocks.{n}.img_attn.qkv.weight"));
        let depth_single = count(&|n| format!("single_blocks.{n}.linear1.weight"));
        ensure!(depth + depth_single > 0, "not a FLUX model: no `{prefix}double_blocks.*` nor `single_blocks.*`");
        let norm_base = if depth > 0 { "double_blocks.0.img_attn.norm" } else { "single_blocks.0.norm" };
        let head_dim = {
            let s =
                norm_scale_key(src, prefix, &format!("{norm_base}.query_norm")).and_then(|k| Ok(src.tensor(&format!("{prefix}{k}"))?.0))?;
            ensure!(s.len() == 1, "`{prefix}{norm_base}.query_norm` has shape {s:?}, not [head width]");
            s[0]
        };
        ensure!(
            head_dim > 0 && hidden % head_dim == 0,
            "hidden width {hidden} does not split into heads of {head_dim} (the q/k norm width)"
        );
        ensure!(head_dim % 32 == 0, "head width {head_dim} is not a multiple of 32 (FLUX's RoPE axes need it)");
        let mlp_hidden = if depth > 0 {
            mat("double_blocks.0.img_mlp.0.weight")?.0
        } else {
            let (o, _) = mat("single_blocks.0.linear1.weight")?;
            ensure!(o > 3 * hidden, "`single_blocks.0.linear1` gives {o} outputs, not qkv ({}) plus an MLP", 3 * hidden);
            o - 3 * hidden
        };
        let cfg = FluxConfig {
            in_channels: patch_in / (PATCH * PATCH),
            hidden,
            heads: hidden / head_dim,
            head_dim,
            depth,
            depth_single,
            mlp_hidden,
            context_in_dim: mat("txt_in.weight")?.1,
            vec_in_dim: mat("vector_in.in_layer.weight")?.1,
            guidance_embed: src.contains(&format!("{prefix}guidance_in.in_layer.weight")),
            // BFL's [16, 56, 56] for the 128-wide head, in proportion for others.
            axes_dim: [head_dim / 8, head_dim * 7 / 16, head_dim * 7 / 16],
        };
        // Every other shape is checked as the weights load.
        Ok(cfg)
    }

    /// Tokens of a `h x w` latent.
    pub fn image_tokens(&self, h: usize, w: usize) -> usize {
        (h / PATCH) * (w / PATCH)
    }
}

/// `{path}.scale` (BFL, the released files) or `{path}.weight` (ComfyUI-saved files).
fn norm_scale_key(src: &dyn WeightSource, prefix: &str, path: &str) -> Result<String> {
    for suffix in ["scale", "weight"] {
        let k = format!("{path}.{suffix}");
        if src.contains(&format!("{prefix}{k}")) {
            return Ok(k);
        }
    }
    bail!("no `{prefix}{path}.scale` (nor `.weight`)")
}

/// Every weight of a FLUX model of configuration `cfg` with its shape (BFL
/// names, norm scales as `.scale`), in forward order.
pub fn bfl_layout(cfg: &FluxConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden;
    let mut v = Vec::new();
    let mut lin = |p: &str, o: usize, i: usize| {
        v.push((format!("{p}.weight"), vec![o, i]));
        v.push((format!("{p}.bias"), vec![o]));
    };
    lin("img_in", h, cfg.in_channels * PATCH * PATCH);
    lin("time_in.in_layer", h, TIME_DIM);
    lin("time_in.out_layer", h, h);
    if cfg.guidance_embed {
        lin("guidance_in.in_layer", h, TIME_DIM);
        lin("guidance_in.out_layer", h, h);
    }
    lin("vector_in.in_layer", h, cfg.vec_in_dim);
    lin("vector_in.out_layer", h, h);
    lin("txt_in", h, cfg.context_in_dim);
    let mut out = v;
    let norms = |out: &mut Vec<(String, Vec<usize>)>, p: &str| {
        out.push((format!("{p}.query_norm.scale"), vec![cfg.head_dim]));
        out.push((format!("{p}.key_norm.scale"), vec![cfg.head_dim]));
    };
    let lin2 = |out: &mut Vec<(String, Vec<usize>)>, p: &str, o: usize, i: usize| {
        out.push((format!("{p}.weight"), vec![o, i]));
        out.push((format!("{p}.bias"), vec![o]));
    };
    for n in 0..cfg.depth {
        for s in ["img", "txt"] {
            let b = format!("double_blocks.{n}.{s}");
            lin2(&mut out, &format!("{b}_mod.lin"), 6 * h, h);
            lin2(&mut out, &format!("{b}_attn.qkv"), 3 * h, h);
            norms(&mut out, &format!("{b}_attn.norm"));
            lin2(&mut out, &format!("{b}_attn.proj"), h, h);
            lin2(&mut out, &format!("{b}_mlp.0"), cfg.mlp_hidden, h);
            lin2(&mut out, &format!("{b}_mlp.2"), h, cfg.mlp_hidden);
        }
    }
    for n in 0..cfg.depth_single {
        let b = format!("single_blocks.{n}");
        lin2(&mut out, &format!("{b}.linear1"), 3 * h + cfg.mlp_hidden, h);
        lin2(&mut out, &format!("{b}.linear2"), h, h + cfg.mlp_hidden);
        norms(&mut out, &format!("{b}.norm"));
        lin2(&mut out, &format!("{b}.modulation.lin"), 3 * h, h);
    }
    lin2(&mut out, "final_layer.linear", cfg.in_channels * PATCH * PATCH, h);
    lin2(&mut out, "final_layer.adaLN_modulation.1", 2 * h, h);
    out
}

// ---------------------------------------------------------------------------
// Modules

struct Linear<T> {
    path: String,
    w: T,
    b: Option<T>,
    inp: usize,
}

/// One stream (img or txt) of a double block.
struct Stream<T> {
    modulation: Linear<T>,
    qkv: Linear<T>,
    q_norm: T,
    k_norm: T,
    proj: Linear<T>,
    mlp0: Linear<T>,
    mlp2: Linear<T>,
}

struct DoubleBlock<T> {
    img: Stream<T>,
    txt: Stream<T>,
}

struct SingleBlock<T> {
    linear1: Linear<T>,
    linear2: Linear<T>,
    q_norm: T,
    k_norm: T,
    modulation: Linear<T>,
}

struct Loader<'a, O: Ops> {
    ops: &'a O,
    src: &'a dyn WeightSource,
    prefix: &'a str,
}

impl<O: Ops> Loader<'_, O> {
    fn get(&self, key: &str, expect: &[usize]) -> Result<O::Tensor> {
        let full = format!("{}{key}", self.prefix);
        let (shape, view) = self.src.tensor(&full)?;
        ensure!(shape == expect, "`{full}` has shape {shape:?}; the FLUX configuration expects {expect:?}");
        self.ops.weight(&shape, &view).with_context(|| format!("cannot upload `{full}`"))
    }

    fn linear(&self, path: &str, out: usize, inp: usize) -> Result<Linear<O::Tensor>> {
        Ok(Linear {
            path: path.to_string(),
            w: self.get(&format!("{path}.weight"), &[out, inp])?,
            b: Some(self.get(&format!("{path}.bias"), &[out])?),
            inp,
        })
    }

    fn norm_scale(&self, path: &str, d: usize) -> Result<O::Tensor> {
        self.get(&norm_scale_key(self.src, self.prefix, path)?, &[d])
    }

    fn mlp(&self, path: &str, inp: usize, h: usize) -> Result<[Linear<O::Tensor>; 2]> {
        Ok([self.linear(&format!("{path}.in_layer"), h, inp)?, self.linear(&format!("{path}.out_layer"), h, h)?])
    }

    fn stream(&self, b: &str, cfg: &FluxConfig) -> Result<Stream<O::Tensor>> {
        let (h, d) = (cfg.hidden, cfg.head_dim);
        Ok(Stream {
            modulation: self.linear(&format!("{b}_mod.lin"), 6 * h, h)?,
            qkv: self.linear(&format!("{b}_attn.qkv"), 3 * h, h)?,
            q_norm: self.norm_scale(&format!("{b}_attn.norm.query_norm"), d)?,
            k_norm: self.norm_scale(&format!("{b}_attn.norm.key_norm"), d)?,
            proj: self.linear(&format!("{b}_attn.proj"), h, h)?,
            mlp0: self.linear(&format!("{b}_mlp.0"), cfg.mlp_hidden, h)?,
            mlp2: self.linear(&format!("{b}_mlp.2"), h, cfg.mlp_hidden)?,
        })
    }
}

/// FLUX's weights on a backend, ready to run.
pub struct Flux<O: Ops> {
    cfg: FluxConfig,
    img_in: Linear<O::Tensor>,
    time_in: [Linear<O::Tensor>; 2],
    guidance_in: Option<[Linear<O::Tensor>; 2]>,
    vector_in: [Linear<O::Tensor>; 2],
    txt_in: Linear<O::Tensor>,
    double: Vec<DoubleBlock<O::Tensor>>,
    single: Vec<SingleBlock<O::Tensor>>,
    final_linear: Linear<O::Tensor>,
    final_modulation: Linear<O::Tensor>,
}

impl<O: Ops> Flux<O> {
    /// Uploads the model stored under `prefix`, checking every shape against `cfg`.
    pub fn load(ops: &O, src: &dyn WeightSource, prefix: &str, cfg: FluxConfig) -> Result<Flux<O>> {
        let l = Loader { ops, src, prefix };
        let h = cfg.hidden;
        ensure!(
            cfg.heads * cfg.head_dim == h && cfg.axes_dim.iter().sum::<usize>() == cfg.head_dim,
            "inconsistent FLUX configuration {cfg:?}"
        );
        ensure!(cfg.axes_dim.iter().all(|a| a % 2 == 0), "RoPE axes {:?} must be even (pairs of head channels)", cfg.axes_dim);
        let img_in = l.linear("img_in", h, cfg.in_channels * PATCH * PATCH)?;
        let time_in = l.mlp("time_in", TIME_DIM, h)?;
        let guidance_in = if cfg.guidance_embed { Some(l.mlp("guidance_in", TIME_DIM, h)?) } else { None };
        let vector_in = l.mlp("vector_in", cfg.vec_in_dim, h)?;
        let txt_in = l.linear("txt_in", h, cfg.context_in_dim)?;
        let double = (0..cfg.depth)
            .map(|n| {
                Ok(DoubleBlock {
                    img: l.stream(&format!("double_blocks.{n}.img"), &cfg)?,
                    txt: l.stream(&format!("double_blocks.{n}.txt"), &cfg)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let single = (0..cfg.depth_single)
            .map(|n| {
                let b = format!("single_blocks.{n}");
                Ok(SingleBlock {
                    linear1: l.linear(&format!("{b}.linear1"), 3 * h + cfg.mlp_hidden, h)?,
                    linear2: l.linear(&format!("{b}.linear2"), h, h + cfg.mlp_hidden)?,
                    q_norm: l.norm_scale(&format!("{b}.norm.query_norm"), cfg.head_dim)?,
                    k_norm: l.norm_scale(&format!("{b}.norm.key_norm"), cfg.head_dim)?,
                    modulation: l.linear(&format!("{b}.modulation.lin"), 3 * h, h)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_linear = l.linear("final_layer.linear", cfg.in_channels * PATCH * PATCH, h)?;
        let final_modulation = l.linear("final_layer.adaLN_modulation.1", 2 * h, h)?;
        Ok(Flux { cfg, img_in, time_in, guidance_in, vector_in, txt_in, double, single, final_linear, final_modulation })
    }

    pub fn config(&self) -> &FluxConfig {
        &self.cfg
    }

    /// Every Linear in forward order, with the observer slot shape of its input.
    pub fn module_inputs(&self) -> Vec<(String, ObserverSpec)> {
        let mut out = Vec::new();
        let mut lin = |m: &Linear<O::Tensor>| {
            out.push((m.path.clone(), ObserverSpec { channels: m.inp, axis: ChannelAxis::Last }));
        };
        lin(&self.img_in);
        self.time_in.iter().for_each(&mut lin);
        self.guidance_in.iter().flatten().for_each(&mut lin);
        self.vector_in.iter().for_each(&mut lin);
        lin(&self.txt_in);
        for b in &self.double {
            for m in [&b.img.modulation, &b.txt.modulation, &b.img.qkv, &b.txt.qkv] {
                lin(m);
            }
            for s in [&b.img, &b.txt] {
                for m in [&s.proj, &s.mlp0, &s.mlp2] {
                    lin(m);
                }
            }
        }
        for b in &self.single {
            for m in [&b.modulation, &b.linear1, &b.linear2] {
                lin(m);
            }
        }
        lin(&self.final_modulation);
        lin(&self.final_linear);
        out
    }

    /// One denoiser evaluation: latents `x [B, C, H, W]` (H, W even) at
    /// `timesteps` = sigma in [0, 1] (one per batch row, as ComfyUI passes
    /// them), T5 tokens `context [B, T, context_in_dim]`, pooled CLIP-L
    /// `y [B, vec_in_dim]`, and for dev the guidance (one per row). Returns the
    /// flow velocity `[B, C, H, W]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        ops: &O,
        x: &O::Tensor,
        timesteps: &[f32],
        context: &O::Tensor,
        y: &O::Tensor,
        guidance: Option<&[f32]>,
        hooks: &InputHooks,
    ) -> Result<O::Tensor> {
        let cfg = &self.cfg;
        let xs = ops.shape(x);
        ensure!(xs.len() == 4 && xs[1] == cfg.in_channels, "FLUX input {xs:?} is not [B, {}, H, W]", cfg.in_channels);
        let (b, c, hh, ww) = (xs[0], xs[1], xs[2], xs[3]);
        ensure!(
            hh > 0 && ww > 0 && hh % PATCH == 0 && ww % PATCH == 0,
            "FLUX latent {hh}x{ww} is not a positive multiple of the 2x2 patch"
        );
        ensure!(timesteps.len() == b, "{} timesteps for a batch of {b}", timesteps.len());
        let cs = ops.shape(context);
        ensure!(cs.len() == 3 && cs[0] == b && cs[2] == cfg.context_in_dim, "context {cs:?} is not [{b}, T, {}]", cfg.context_in_dim);
        let ys = ops.shape(y);
        ensure!(ys == [b, cfg.vec_in_dim], "y {ys:?} is not [{b}, {}]", cfg.vec_in_dim);
        let guidance = match (&self.guidance_in, guidance) {
            (Some(_), Some(g)) => {
                ensure!(g.len() == b, "{} guidance values for a batch of {b}", g.len());
                Some(g)
            }
            (Some(_), None) => bail!("this FLUX model (dev) embeds guidance; none was given"),
            (None, Some(_)) => bail!("this FLUX model (schnell) has no guidance embedder; guidance was given"),
            (None, None) => None,
        };
        let (h, w) = (hh / PATCH, ww / PATCH);
        let (t_len, i_len) = (cs[1], h * w);

        // b c (h ph) (w pw) -> b (h w) (c ph pw)
        let img = ops.reshape(x, &[b, c, h, PATCH, w, PATCH])?;
        let img = ops.permute(&img, &[0, 2, 4, 1, 3, 5])?;
        let img = ops.reshape(&img, &[b, i_len, c * PATCH * PATCH])?;
        let mut img = linear(ops, hooks, &self.img_in, &img)?;

        let emb = |values: &[f32]| -> Result<O::Tensor> {
            let scaled: Vec<f32> = values.iter().map(|v| v * TIME_FACTOR).collect();
            ops.from_f32(&[b, TIME_DIM], &timestep_embedding(&scaled, TIME_DIM))
        };
        let mut vec = mlp(ops, hooks, &self.time_in, &emb(timesteps)?)?;
        if let (Some(g_in), Some(g)) = (&self.guidance_in, guidance) {
            vec = ops.add(&vec, &mlp(ops, hooks, g_in, &emb(g)?)?)?;
        }
        vec = ops.add(&vec, &mlp(ops, hooks, &self.vector_in, y)?)?;
        let mut txt = linear(ops, hooks, &self.txt_in, context)?;

        let (cos, sin) = rope_tables(cfg, t_len, h, w);
        let half = cfg.head_dim / 2;
        let cos = ops.from_f32(&[t_len + i_len, half], &cos)?;
        let sin = ops.from_f32(&[t_len + i_len, half], &sin)?;
        // Every modulation Linear starts with the same SiLU.
        let svec = ops.act(&vec, Act::Silu)?;
        let rope = Some((&cos, &sin));
        let (hd, heads) = (cfg.hidden, cfg.heads);

        for blk in &self.double {
            let img_mod = linear(ops, hooks, &blk.img.modulation, &svec)?;
            let txt_mod = linear(ops, hooks, &blk.txt.modulation, &svec)?;
            let iqkv = self.stream_qkv(ops, hooks, &blk.img, &img, &img_mod)?;
            let tqkv = self.stream_qkv(ops, hooks, &blk.txt, &txt, &txt_mod)?;
            // Joint sequence: text tokens first.
            let parts = [blk.txt.qkv_part(&tqkv), blk.img.qkv_part(&iqkv)];
            let [q, k, v] = ops.qkv_heads(&parts, hd, heads, RMS_EPS, rope)?;
            let attn = ops.attention(&q, &k, &v, heads, false)?;
            let txt_attn = ops.narrow(&attn, 1, 0, t_len)?;
            let img_attn = ops.narrow(&attn, 1, t_len, i_len)?;
            img = self.stream_out(ops, hooks, &blk.img, &img, &img_attn, &img_mod)?;
            txt = self.stream_out(ops, hooks, &blk.txt, &txt, &txt_attn, &txt_mod)?;
        }

        let mut x = ops.concat(&[&txt, &img], 1)?;
        for blk in &self.single {
            let m = linear(ops, hooks, &blk.modulation, &svec)?;
            let xm = ops.ln_modulate(&x, &chunk(ops, &m, 0, hd)?, &chunk(ops, &m, 1, hd)?, LN_EPS)?;
            let l1 = linear(ops, hooks, &blk.linear1, &xm)?;
            let part = QkvPart { qkv: &l1, q_norm: Some(&blk.q_norm), k_norm: Some(&blk.k_norm) };
            let [q, k, v] = ops.qkv_heads(&[part], hd, heads, RMS_EPS, rope)?;
            let attn = ops.attention(&q, &k, &v, heads, false)?;
            // linear2 takes concat(attn, gelu_tanh(mlp part of linear1)).
            let l2_in = ops.concat_act(&attn, &l1, 3 * hd, cfg.mlp_hidden, Act::GeluTanh)?;
            let out = linear(ops, hooks, &blk.linear2, &l2_in)?;
            x = ops.gated_add(&x, &chunk(ops, &m, 2, hd)?, &out)?;
        }
        let img = ops.narrow(&x, 1, t_len, i_len)?;

        let m = linear(ops, hooks, &self.final_modulation, &svec)?;
        let img = ops.ln_modulate(&img, &chunk(ops, &m, 0, hd)?, &chunk(ops, &m, 1, hd)?, LN_EPS)?;
        let out = linear(ops, hooks, &self.final_linear, &img)?;
        // b (h w) (c ph pw) -> b c (h ph) (w pw)
        let out = ops.reshape(&out, &[b, h, w, c, PATCH, PATCH])?;
        let out = ops.permute(&out, &[0, 3, 1, 4, 2, 5])?;
        ops.reshape(&out, &[b, c, hh, ww])
    }

    /// The fused q|k|v projection of one stream of a double block.
    fn stream_qkv(&self, ops: &O, hooks: &InputHooks, s: &Stream<O::Tensor>, x: &O::Tensor, m: &O::Tensor) -> Result<O::Tensor> {
        let hd = self.cfg.hidden;
        let xm = ops.ln_modulate(x, &chunk(ops, m, 0, hd)?, &chunk(ops, m, 1, hd)?, LN_EPS)?;
        linear(ops, hooks, &s.qkv, &xm)
    }

    /// The attention residual and the MLP residual of one stream of a double block.
    #[allow(clippy::too_many_arguments)]
    fn stream_out(
        &self,
        ops: &O,
        hooks: &InputHooks,
        s: &Stream<O::Tensor>,
        x: &O::Tensor,
        attn: &O::Tensor,
        m: &O::Tensor,
    ) -> Result<O::Tensor> {
        let hd = self.cfg.hidden;
        let x = ops.gated_add(x, &chunk(ops, m, 2, hd)?, &linear(ops, hooks, &s.proj, attn)?)?;
        let xm = ops.ln_modulate(&x, &chunk(ops, m, 3, hd)?, &chunk(ops, m, 4, hd)?, LN_EPS)?;
        let hmid = ops.act(&linear(ops, hooks, &s.mlp0, &xm)?, Act::GeluTanh)?;
        ops.gated_add(&x, &chunk(ops, m, 5, hd)?, &linear(ops, hooks, &s.mlp2, &hmid)?)
    }
}

impl<T> Stream<T> {
    fn qkv_part<'a>(&'a self, qkv: &'a T) -> QkvPart<'a, T> {
        QkvPart { qkv, q_norm: Some(&self.q_norm), k_norm: Some(&self.k_norm) }
    }
}

/// Part `i` of `m [B, k*width]` split into `width`-wide parts (`Modulation`'s chunk).
fn chunk<O: Ops>(ops: &O, m: &O::Tensor, i: usize, width: usize) -> Result<O::Tensor> {
    ops.narrow(m, 1, i * width, width)
}

fn linear<O: Ops>(ops: &O, hooks: &InputHooks, m: &Linear<O::Tensor>, x: &O::Tensor) -> Result<O::Tensor> {
    let x = hooks.apply(ops, &m.path, x)?;
    ops.linear(&x, &m.w, m.b.as_ref()).with_context(|| format!("in `{}`", m.path))
}

/// `MLPEmbedder`: `out_layer(SiLU(in_layer(x)))`.
fn mlp<O: Ops>(ops: &O, hooks: &InputHooks, m: &[Linear<O::Tensor>; 2], x: &O::Tensor) -> Result<O::Tensor> {
    linear(ops, hooks, &m[1], &ops.act(&linear(ops, hooks, &m[0], x)?, Act::Silu)?)
}

/// `EmbedND` over the ids of `t_len` text tokens (all zero) then the `h x w`
/// image tokens `(0, row, col)`: `[t_len + h*w, D/2]` cos and sin, each axis'
/// `dim/2` frequencies `theta^(-2k/dim)` in turn, computed in f64 as BFL's `rope`.
pub fn rope_tables(cfg: &FluxConfig, t_len: usize, h: usize, w: usize) -> (Vec<f32>, Vec<f32>) {
    let omegas: Vec<(usize, f64)> = cfg
        .axes_dim
        .iter()
        .enumerate()
        .flat_map(|(axis, &dim)| (0..dim / 2).map(move |k| (axis, 1.0 / ROPE_THETA.powf(2.0 * k as f64 / dim as f64))))
        .collect();
    let n = t_len + h * w;
    let (mut cos, mut sin) = (Vec::with_capacity(n * omegas.len()), Vec::with_capacity(n * omegas.len()));
    for tok in 0..n {
        let ids = if tok < t_len {
            [0.0; 3]
        } else {
            let i = tok - t_len;
            [0.0, (i / w) as f64, (i % w) as f64]
        };
        for &(axis, om) in &omegas {
            let a = ids[axis] * om;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
