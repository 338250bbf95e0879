//! The SD1.x / SD2.x / SDXL base and refiner UNet, with the original
//! (ldm / sgm `openaimodel.py`, ComfyUI) weight names and semantics:
//!
//! - `time_embed.0/2`: sinusoidal timestep features (cos half first, max period
//!   10000) → Linear → SiLU → Linear; SDXL adds `label_emb.0.0/0.2` of `y` the same way.
//! - `input_blocks.0.0`: 3×3 conv; then per level `num_res_blocks` ResBlocks, each
//!   optionally followed by a SpatialTransformer, and a stride-2 3×3 `op` conv
//!   between levels. `middle_block`: ResBlock, SpatialTransformer, ResBlock.
//!   `output_blocks`: the skip concatenated on channels, ResBlock, optional
//!   SpatialTransformer, and at each level's end a nearest-2× upsample + 3×3 `conv`.
//!   `out.0/out.2`: GroupNorm, SiLU, 3×3 conv.
//! - ResBlock: `in_layers` GroupNorm(32, eps 1e-5) → SiLU → 3×3 conv; plus
//!   `emb_layers.1(SiLU(emb))` per channel; `out_layers` GroupNorm → SiLU → 3×3
//!   conv; plus `x` or its 1×1 `skip_connection` when the width changes.
//! - SpatialTransformer: GroupNorm(32, eps **1e-6**, attention.py's `Normalize`),
//!   `proj_in` (1×1 conv before flattening to tokens, or Linear after it when
//!   `use_linear_in_transformer`), blocks of `x += attn1(norm1 x)`,
//!   `x += attn2(norm2 x, context)`, `x += ff(norm3 x)` (LayerNorm eps 1e-5,
//!   softmax scale 1/√head_dim, GEGLU `hidden * gelu(gate)` with the hidden half
//!   first), `proj_out`, plus the input.
//!
//! Every Linear and Conv input goes through [`InputHooks::apply`] under its
//! module path (weight key without `.weight` and without the prefix).

use std::fmt;

use anyhow::{Context, Result, anyhow, bail, ensure};

use super::{InputHooks, WeightSource};
use crate::nn::{Act, ChannelAxis, ObserverSpec, Ops};

/// GroupNorm groups everywhere in the UNet (`normalization` / `Normalize`).
const GROUPS: usize = 32;
/// `nn.GroupNorm`'s default, used by ResBlocks and `out.0`.
const RES_NORM_EPS: f32 = 1e-5;
/// attention.py's `Normalize` (the SpatialTransformer's `norm`).
const TRANSFORMER_NORM_EPS: f32 = 1e-6;
/// `nn.LayerNorm`'s default (`norm1/2/3`).
const LAYER_NORM_EPS: f32 = 1e-5;
/// `timestep_embedding`'s `max_period`.
const MAX_PERIOD: f64 = 10000.0;
/// SD1.x's fixed head count (ComfyUI's `SD15.unet_extra_config`).
const SD1_HEADS: usize = 8;
/// Head width of SD2.x and SDXL (`num_head_channels`, ComfyUI's default).
const HEAD_CHANNELS: usize = 64;

/// How attention widths split into heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heads {
    /// A fixed number of heads at every width (`num_heads`; SD1.x: 8).
    Count(usize),
    /// Heads of a fixed width (`num_head_channels`; SD2.x, SDXL: 64):
    /// `channels / width` heads, at least one.
    Width(usize),
}

impl Heads {
    /// Heads of a transformer `channels` wide.
    pub fn at(self, channels: usize) -> usize {
        match self {
            Heads::Count(n) => n,
            Heads::Width(w) => (channels / w).max(1),
        }
    }
}

/// The UNet's architecture, read from a checkpoint's tensor names and shapes
/// (the same facts ComfyUI's `detect_unet_config` reads; the transformer
/// depth lists follow its conventions so they compare directly).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnetConfig {
    /// Latent channels in (`input_blocks.0.0` shape[1]; 9 for inpainting).
    pub in_channels: usize,
    pub out_channels: usize,
    pub model_channels: usize,
    /// Width of each level in units of `model_channels`.
    pub channel_mult: Vec<usize>,
    /// ResBlocks per level on the way down (the way up has one more).
    pub num_res_blocks: Vec<usize>,
    /// Transformer blocks after each down ResBlock, in order (0 = none).
    pub transformer_depth: Vec<usize>,
    /// Transformer blocks of each up ResBlock, **last output block first**
    /// (ComfyUI's order: `openaimodel` pops from the end).
    pub transformer_depth_output: Vec<usize>,
    /// Transformer blocks in the middle; `None`: the middle is a single ResBlock.
    pub transformer_depth_middle: Option<usize>,
    /// Cross-attention context width (`None` if the model has no transformer).
    pub context_dim: Option<usize>,
    /// Width of SDXL's `y` vector (`label_emb`), if any.
    pub adm_in_channels: Option<usize>,
    /// Linear `proj_in`/`proj_out` (SD2.x, SDXL) instead of 1×1 convs (SD1.x).
    pub use_linear_in_transformer: bool,
    pub heads: Heads,
    /// Width of the timestep embedding (`time_embed.0` outputs; 4 × model_channels).
    pub time_embed_dim: usize,
}

impl fmt::Display for UnetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "UNet in {} out {}, model_channels {}, channel_mult {:?}, res blocks {:?}, transformer depth {:?} / middle {} / up {:?}, context {}, adm {}, {} proj, ",
            self.in_channels,
            self.out_channels,
            self.model_channels,
            self.channel_mult,
            self.num_res_blocks,
            self.transformer_depth,
            self.transformer_depth_middle.map_or("none".to_string(), |d| d.to_string()),
            self.transformer_depth_output,
            self.context_dim.map_or("none".to_string(), |d| d.to_string()),
            self.adm_in_channels.map_or("none".to_string(), |d| d.to_string()),
            if self.use_linear_in_transformer { "linear" } else { "conv" },
        )?;
        match self.heads {
            Heads::Count(n) => write!(f, "{n} heads"),
            Heads::Width(w) => write!(f, "{w}-wide heads"),
        }
    }
}

impl UnetConfig {
    /// Reads the configuration from the tensors under `prefix`
    /// (`model.diffusion_model.` in a full checkpoint, `""` in a UNet-only file).
    pub fn from_source(src: &dyn WeightSource, prefix: &str) -> Result<UnetConfig> {
        let shape = |key: &str| -> Option<Vec<usize>> {
            let full = format!("{prefix}{key}");
            if src.contains(&full) { src.tensor(&full).ok().map(|(s, _)| s) } else { None }
        };
        UnetConfig::infer(&shape).map_err(|e| {
            if src.contains(&format!("{prefix}input_blocks.0.0.weight")) {
                return e;
            }
            let what = if src.contains(&format!("{prefix}joint_blocks.0.context_block.attn.qkv.weight")) {
                "an SD3 MMDiT".to_string()
            } else if src.contains(&format!("{prefix}double_blocks.0.img_attn.norm.key_norm.scale")) {
                "a FLUX model".to_string()
            } else if src.contains(&format!("{prefix}conv_in.weight")) {
                "a diffusers-format UNet (only the original single-file names are supported)".to_string()
            } else if prefix.is_empty() && src.contains("model.diffusion_model.input_blocks.0.0.weight") {
                "a full checkpoint: pass the prefix `model.diffusion_model.`".to_string()
            } else {
                format!("no UNet under the prefix `{prefix}`")
            };
            anyhow!("not an SD1.x/SD2.x/SDXL UNet: {what} (no `{prefix}input_blocks.0.0.weight`)")
        })
    }

    /// The configuration from tensor shapes by (prefix-less) key.
    fn infer(shape: &dyn Fn(&str) -> Option<Vec<usize>>) -> Result<UnetConfig> {
        let need = |key: &str, rank: usize| -> Result<Vec<usize>> {
            let s = shape(key).ok_or_else(|| anyhow!("UNet tensor `{key}` is missing"))?;
            ensure!(s.len() == rank, "UNet tensor `{key}` has shape {s:?}, expected rank {rank}");
            Ok(s)
        };
        let conv_in = need("input_blocks.0.0.weight", 4)?;
        let (model_channels, in_channels) = (conv_in[0], conv_in[1]);
        ensure!(model_channels > 0, "`input_blocks.0.0.weight` has no output channels");
        let out_channels = need("out.2.weight", 4)?[0];
        let time_embed_dim = need("time_embed.0.weight", 2)?[0];

        let adm_in_channels = match shape("label_emb.0.0.weight") {
            Some(s) => Some(need("label_emb.0.0.weight", 2).map(|_| s[1])?),
            None if shape("label_emb.weight").is_some() => {
                bail!("class-conditional UNets (`label_emb.weight`) are not supported, only SDXL's `label_emb.0.0` vector")
            }
            None => None,
        };

        // Transformer facts shared by every SpatialTransformer.
        let mut context_dim = None;
        let mut use_linear = None;
        let mut depth_at = |block: &str| -> Result<usize> {
            let depth = (0..).take_while(|k| shape(&format!("{block}transformer_blocks.{k}.attn1.to_q.weight")).is_some()).count();
            if depth > 0 {
                let ctx = need(&format!("{block}transformer_blocks.0.attn2.to_k.weight"), 2)?[1];
                let proj_in =
                    shape(&format!("{block}proj_in.weight")).ok_or_else(|| anyhow!("UNet tensor `{block}proj_in.weight` is missing"))?;
                let linear = proj_in.len() == 2;
                ensure!(
                    context_dim.is_none_or(|c| c == ctx) && use_linear.is_none_or(|l| l == linear),
                    "`{block}` differs from the other transformers (context {ctx}, linear proj_in {linear})"
                );
                context_dim = Some(ctx);
                use_linear = Some(linear);
            }
            Ok(depth)
        };

        let (mut channel_mult, mut num_res_blocks, mut transformer_depth) = (vec![], vec![], vec![]);
        let mut res_in_level = 0;
        let mut mult = 0;
        for n in 1.. {
            let block = format!("input_blocks.{n}.");
            if shape(&format!("{block}0.op.weight")).is_some() {
                ensure!(res_in_level > 0, "`{block}0.op` downsamples a level without ResBlocks");
                channel_mult.push(mult);
                num_res_blocks.push(res_in_level);
                res_in_level = 0;
            } else if let Some(s) = shape(&format!("{block}0.out_layers.3.weight")) {
                ensure!(
                    s.len() == 4 && s[0].is_multiple_of(model_channels),
                    "`{block}0.out_layers.3.weight` has shape {s:?}, not a multiple of {model_channels} channels"
                );
                mult = s[0] / model_channels;
                res_in_level += 1;
                transformer_depth.push(depth_at(&format!("{block}1."))?);
            } else {
                break;
            }
        }
        ensure!(res_in_level > 0, "the last UNet level has no ResBlocks");
        channel_mult.push(mult);
        num_res_blocks.push(res_in_level);

        let outputs: usize = num_res_blocks.iter().map(|r| r + 1).sum();
        let mut depth_output = Vec::with_capacity(outputs);
        for n in 0..outputs {
            need(&format!("output_blocks.{n}.0.out_layers.3.weight"), 4)?;
            depth_output.push(depth_at(&format!("output_blocks.{n}.1."))?);
        }
        ensure!(
            shape(&format!("output_blocks.{outputs}.0.out_layers.3.weight")).is_none(),
            "more output blocks than the {outputs} the input blocks imply"
        );
        depth_output.reverse();

        let transformer_depth_middle = if shape("middle_block.1.proj_in.weight").is_some() {
            Some(depth_at("middle_block.1.")?)
        } else if shape("middle_block.0.in_layers.0.weight").is_some() {
            None
        } else {
            bail!("UNet has no `middle_block`");
        };

        let use_linear_in_transformer = use_linear.unwrap_or(false);
        // ComfyUI gives SD1.x (768-wide context, conv proj, no adm) 8 heads and
        // everything else 64-wide heads.
        let heads = if context_dim == Some(768) && !use_linear_in_transformer && adm_in_channels.is_none() {
            Heads::Count(SD1_HEADS)
        } else {
            Heads::Width(HEAD_CHANNELS)
        };
        Ok(UnetConfig {
            in_channels,
            out_channels,
            model_channels,
            channel_mult,
            num_res_blocks,
            transformer_depth,
            transformer_depth_output: depth_output,
            transformer_depth_middle,
            context_dim,
            adm_in_channels,
            use_linear_in_transformer,
            heads,
            time_embed_dim,
        })
    }

    /// Spatial downsampling factor from input to the deepest level.
    pub fn downsampling(&self) -> usize {
        1 << (self.channel_mult.len() - 1)
    }
}

// ---------------------------------------------------------------------------
// Modules

struct Linear<T> {
    path: String,
    w: T,
    b: Option<T>,
    inp: usize,
}

struct Conv<T> {
    path: String,
    w: T,
    b: Option<T>,
    inp: usize,
    stride: usize,
    padding: usize,
}

struct Norm<T> {
    w: T,
    b: T,
}

struct ResBlock<T> {
    in_norm: Norm<T>,
    in_conv: Conv<T>,
    emb: Linear<T>,
    out_norm: Norm<T>,
    out_conv: Conv<T>,
    skip: Option<Conv<T>>,
}

struct Attention<T> {
    to_q: Linear<T>,
    to_k: Linear<T>,
    to_v: Linear<T>,
    to_out: Linear<T>,
}

struct TransformerBlock<T> {
    norm1: Norm<T>,
    attn1: Attention<T>,
    norm2: Norm<T>,
    attn2: Attention<T>,
    norm3: Norm<T>,
    ff_in: Linear<T>,
    ff_out: Linear<T>,
}

enum Proj<T> {
    Linear(Linear<T>),
    Conv(Conv<T>),
}

struct SpatialTransformer<T> {
    norm: Norm<T>,
    proj_in: Proj<T>,
    blocks: Vec<TransformerBlock<T>>,
    proj_out: Proj<T>,
    heads: usize,
}

enum Layer<T> {
    /// `input_blocks.0.0`.
    Conv(Conv<T>),
    Res(ResBlock<T>),
    Transformer(SpatialTransformer<T>),
    /// Stride-2 `op` conv.
    Down(Conv<T>),
    /// Nearest 2× then `conv`.
    Up(Conv<T>),
}

/// Reads weights from a source, checking every shape against the configuration.
struct Loader<'a, O: Ops> {
    ops: &'a O,
    src: &'a dyn WeightSource,
    prefix: &'a str,
}

impl<O: Ops> Loader<'_, O> {
    fn has(&self, key: &str) -> bool {
        self.src.contains(&format!("{}{key}", self.prefix))
    }

    fn get(&self, key: &str, expect: &[usize]) -> Result<O::Tensor> {
        let full = format!("{}{key}", self.prefix);
        let (shape, view) = self.src.tensor(&full)?;
        ensure!(shape == expect, "`{full}` has shape {shape:?}; the UNet configuration expects {expect:?}");
        self.ops.weight(&shape, &view).with_context(|| format!("cannot upload `{full}`"))
    }

    /// `bias`: whether ldm gives the module a bias; one present anyway is used.
    fn linear(&self, path: &str, out: usize, inp: usize, bias: bool) -> Result<Linear<O::Tensor>> {
        let b = format!("{path}.bias");
        Ok(Linear {
            path: path.to_string(),
            w: self.get(&format!("{path}.weight"), &[out, inp])?,
            b: if bias || self.has(&b) { Some(self.get(&b, &[out])?) } else { None },
            inp,
        })
    }

    fn conv(&self, path: &str, out: usize, inp: usize, k: usize, stride: usize) -> Result<Conv<O::Tensor>> {
        Ok(Conv {
            path: path.to_string(),
            w: self.get(&format!("{path}.weight"), &[out, inp, k, k])?,
            b: Some(self.get(&format!("{path}.bias"), &[out])?),
            inp,
            stride,
            padding: k / 2,
        })
    }

    fn norm(&self, path: &str, c: usize) -> Result<Norm<O::Tensor>> {
        Ok(Norm { w: self.get(&format!("{path}.weight"), &[c])?, b: self.get(&format!("{path}.bias"), &[c])? })
    }

    fn group_norm(&self, path: &str, c: usize) -> Result<Norm<O::Tensor>> {
        ensure!(c.is_multiple_of(GROUPS), "`{path}` normalizes {c} channels, not a multiple of {GROUPS} groups");
        self.norm(path, c)
    }

    fn res_block(&self, path: &str, inp: usize, out: usize, emb: usize) -> Result<ResBlock<O::Tensor>> {
        Ok(ResBlock {
            in_norm: self.group_norm(&format!("{path}.in_layers.0"), inp)?,
            in_conv: self.conv(&format!("{path}.in_layers.2"), out, inp, 3, 1)?,
            emb: self.linear(&format!("{path}.emb_layers.1"), out, emb, true)?,
            out_norm: self.group_norm(&format!("{path}.out_layers.0"), out)?,
            out_conv: self.conv(&format!("{path}.out_layers.3"), out, out, 3, 1)?,
            skip: if inp == out { None } else { Some(self.conv(&format!("{path}.skip_connection"), out, inp, 1, 1)?) },
        })
    }

    fn attention(&self, path: &str, ch: usize, ctx: usize) -> Result<Attention<O::Tensor>> {
        Ok(Attention {
            to_q: self.linear(&format!("{path}.to_q"), ch, ch, false)?,
            to_k: self.linear(&format!("{path}.to_k"), ch, ctx, false)?,
            to_v: self.linear(&format!("{path}.to_v"), ch, ctx, false)?,
            to_out: self.linear(&format!("{path}.to_out.0"), ch, ch, true)?,
        })
    }

    fn transformer(&self, path: &str, ch: usize, depth: usize, cfg: &UnetConfig) -> Result<SpatialTransformer<O::Tensor>> {
        let ctx = cfg.context_dim.ok_or_else(|| anyhow!("`{path}` is a transformer but the UNet has no context width"))?;
        let heads = cfg.heads.at(ch);
        ensure!(ch.is_multiple_of(heads), "`{path}`: {ch} channels do not split into {heads} heads");
        let proj = |name: &str| -> Result<Proj<O::Tensor>> {
            let p = format!("{path}.{name}");
            Ok(if cfg.use_linear_in_transformer {
                Proj::Linear(self.linear(&p, ch, ch, true)?)
            } else {
                Proj::Conv(self.conv(&p, ch, ch, 1, 1)?)
            })
        };
        let blocks = (0..depth)
            .map(|k| {
                let b = format!("{path}.transformer_blocks.{k}");
                Ok(TransformerBlock {
                    norm1: self.norm(&format!("{b}.norm1"), ch)?,
                    attn1: self.attention(&format!("{b}.attn1"), ch, ch)?,
                    norm2: self.norm(&format!("{b}.norm2"), ch)?,
                    attn2: self.attention(&format!("{b}.attn2"), ch, ctx)?,
                    norm3: self.norm(&format!("{b}.norm3"), ch)?,
                    ff_in: self.linear(&format!("{b}.ff.net.0.proj"), 8 * ch, ch, true)?,
                    ff_out: self.linear(&format!("{b}.ff.net.2"), ch, 4 * ch, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SpatialTransformer {
            norm: self.group_norm(&format!("{path}.norm"), ch)?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
            heads,
        })
    }
}

/// The UNet's weights on a backend, ready to run.
pub struct Unet<O: Ops> {
    cfg: UnetConfig,
    time_embed: [Linear<O::Tensor>; 2],
    label_emb: Option<[Linear<O::Tensor>; 2]>,
    input_blocks: Vec<Vec<Layer<O::Tensor>>>,
    middle_block: Vec<Layer<O::Tensor>>,
    output_blocks: Vec<Vec<Layer<O::Tensor>>>,
    out_norm: Norm<O::Tensor>,
    out_conv: Conv<O::Tensor>,
}

impl<O: Ops> Unet<O> {
    /// Uploads every weight the configuration names (each once) from `src`
    /// under `prefix`, checking its shape.
    pub fn load(ops: &O, src: &dyn WeightSource, prefix: &str, cfg: UnetConfig) -> Result<Unet<O>> {
        let l = Loader { ops, src, prefix };
        let (mc, ted) = (cfg.model_channels, cfg.time_embed_dim);
        let levels = cfg.channel_mult.len();
        ensure!(
            levels > 0 && cfg.num_res_blocks.len() == levels,
            "UNet configuration: {} channel multipliers but {} res block counts",
            levels,
            cfg.num_res_blocks.len()
        );
        let downs: usize = cfg.num_res_blocks.iter().sum();
        ensure!(
            cfg.transformer_depth.len() == downs && cfg.transformer_depth_output.len() == downs + levels,
            "UNet configuration: transformer depths {:?} / {:?} do not match res blocks {:?}",
            cfg.transformer_depth,
            cfg.transformer_depth_output,
            cfg.num_res_blocks
        );

        let time_embed = [l.linear("time_embed.0", ted, mc, true)?, l.linear("time_embed.2", ted, ted, true)?];
        let label_emb = match cfg.adm_in_channels {
            Some(adm) => Some([l.linear("label_emb.0.0", ted, adm, true)?, l.linear("label_emb.0.2", ted, ted, true)?]),
            None => None,
        };

        let mut input_blocks = vec![vec![Layer::Conv(l.conv("input_blocks.0.0", mc, cfg.in_channels, 3, 1)?)]];
        let mut skip_channels = vec![mc];
        let mut ch = mc;
        let mut depths = cfg.transformer_depth.iter();
        for (level, (&mult, &res)) in cfg.channel_mult.iter().zip(&cfg.num_res_blocks).enumerate() {
            for _ in 0..res {
                let n = input_blocks.len();
                let out = mult * mc;
                let mut layers = vec![Layer::Res(l.res_block(&format!("input_blocks.{n}.0"), ch, out, ted)?)];
                ch = out;
                let depth = *depths.next().expect("length checked above");
                if depth > 0 {
                    layers.push(Layer::Transformer(l.transformer(&format!("input_blocks.{n}.1"), ch, depth, &cfg)?));
                }
                input_blocks.push(layers);
                skip_channels.push(ch);
            }
            if level + 1 < levels {
                let n = input_blocks.len();
                input_blocks.push(vec![Layer::Down(l.conv(&format!("input_blocks.{n}.0.op"), ch, ch, 3, 2)?)]);
                skip_channels.push(ch);
            }
        }

        let mut middle_block = vec![Layer::Res(l.res_block("middle_block.0", ch, ch, ted)?)];
        if let Some(depth) = cfg.transformer_depth_middle {
            middle_block.push(Layer::Transformer(l.transformer("middle_block.1", ch, depth, &cfg)?));
            middle_block.push(Layer::Res(l.res_block("middle_block.2", ch, ch, ted)?));
        }

        let mut output_blocks = Vec::new();
        let mut depths = cfg.transformer_depth_output.iter().rev();
        for (level, (&mult, &res)) in cfg.channel_mult.iter().zip(&cfg.num_res_blocks).enumerate().rev() {
            for i in 0..=res {
                let n = output_blocks.len();
                let skip = skip_channels.pop().expect("one skip per input block");
                let out = mult * mc;
                let mut layers = vec![Layer::Res(l.res_block(&format!("output_blocks.{n}.0"), ch + skip, out, ted)?)];
                ch = out;
                let depth = *depths.next().expect("length checked above");
                if depth > 0 {
                    layers.push(Layer::Transformer(l.transformer(&format!("output_blocks.{n}.1"), ch, depth, &cfg)?));
                }
                if level > 0 && i == res {
                    let m = layers.len();
                    layers.push(Layer::Up(l.conv(&format!("output_blocks.{n}.{m}.conv"), ch, ch, 3, 1)?));
                }
                output_blocks.push(layers);
            }
        }

        let out_norm = l.group_norm("out.0", ch)?;
        let out_conv = l.conv("out.2", cfg.out_channels, mc, 3, 1)?;
        Ok(Unet { cfg, time_embed, label_emb, input_blocks, middle_block, output_blocks, out_norm, out_conv })
    }

    pub fn config(&self) -> &UnetConfig {
        &self.cfg
    }

    /// Every Linear and Conv module in forward order, with the observer slot
    /// shape of its input (Linear: `Last` over its input features; Conv: `Dim1`
    /// over its input channels).
    pub fn module_inputs(&self) -> Vec<(String, ObserverSpec)> {
        let mut out = Vec::new();
        let lin = |out: &mut Vec<(String, ObserverSpec)>, m: &Linear<O::Tensor>| {
            out.push((m.path.clone(), ObserverSpec { channels: m.inp, axis: ChannelAxis::Last }));
        };
        let conv = |out: &mut Vec<(String, ObserverSpec)>, m: &Conv<O::Tensor>| {
            out.push((m.path.clone(), ObserverSpec { channels: m.inp, axis: ChannelAxis::Dim1 }));
        };
        let proj = |out: &mut Vec<(String, ObserverSpec)>, p: &Proj<O::Tensor>| match p {
            Proj::Linear(m) => lin(out, m),
            Proj::Conv(m) => conv(out, m),
        };
        self.time_embed.iter().for_each(|m| lin(&mut out, m));
        self.label_emb.iter().flatten().for_each(|m| lin(&mut out, m));
        let blocks = self.input_blocks.iter().chain(std::iter::once(&self.middle_block)).chain(&self.output_blocks);
        for layer in blocks.flatten() {
            match layer {
                Layer::Conv(m) | Layer::Down(m) | Layer::Up(m) => conv(&mut out, m),
                Layer::Res(r) => {
                    conv(&mut out, &r.in_conv);
                    lin(&mut out, &r.emb);
                    conv(&mut out, &r.out_conv);
                    if let Some(s) = &r.skip {
                        conv(&mut out, s);
                    }
                }
                Layer::Transformer(t) => {
                    proj(&mut out, &t.proj_in);
                    for b in &t.blocks {
                        for a in [&b.attn1, &b.attn2] {
                            for m in [&a.to_q, &a.to_k, &a.to_v, &a.to_out] {
                                lin(&mut out, m);
                            }
                        }
                        lin(&mut out, &b.ff_in);
                        lin(&mut out, &b.ff_out);
                    }
                    proj(&mut out, &t.proj_out);
                }
            }
        }
        conv(&mut out, &self.out_conv);
        out
    }

    /// One denoiser evaluation: `x [B, in, H, W]` at `timesteps` (one per
    /// batch row), cross-attending to `context [B, T, context_dim]`, with
    /// SDXL's `y [B, adm]`. Returns the model output (eps or v) `[B, out, H, W]`.
    /// H and W must be multiples of [`UnetConfig::downsampling`].
    pub fn forward(
        &self,
        ops: &O,
        x: &O::Tensor,
        timesteps: &[f32],
        context: &O::Tensor,
        y: Option<&O::Tensor>,
        hooks: &InputHooks,
    ) -> Result<O::Tensor> {
        let cfg = &self.cfg;
        let xs = ops.shape(x);
        ensure!(xs.len() == 4 && xs[1] == cfg.in_channels, "UNet input {xs:?} is not [B, {}, H, W]", cfg.in_channels);
        let (b, h, w) = (xs[0], xs[2], xs[3]);
        let f = cfg.downsampling();
        ensure!(
            h.is_multiple_of(f) && w.is_multiple_of(f) && h > 0 && w > 0,
            "UNet input {h}x{w} is not a multiple of {f} (it halves {} times)",
            cfg.channel_mult.len() - 1
        );
        ensure!(timesteps.len() == b, "{} timesteps for a batch of {b}", timesteps.len());
        if let Some(ctx) = cfg.context_dim {
            let cs = ops.shape(context);
            ensure!(cs.len() == 3 && cs[0] == b && cs[2] == ctx, "context {cs:?} is not [{b}, T, {ctx}]");
        }
        match (cfg.adm_in_channels, y) {
            (Some(adm), Some(y)) => {
                let ys = ops.shape(y);
                ensure!(ys == [b, adm], "y {ys:?} is not [{b}, {adm}]");
            }
            (Some(adm), None) => bail!("this UNet needs the {adm}-wide `y` vector (SDXL size/pooled conditioning)"),
            (None, Some(_)) => bail!("this UNet takes no `y` vector"),
            (None, None) => {}
        }

        let t = ops.from_f32(&[b, cfg.model_channels], &timestep_embedding(timesteps, cfg.model_channels))?;
        let [t0, t2] = &self.time_embed;
        let mut emb = linear(ops, hooks, t2, &ops.act(&linear(ops, hooks, t0, &t)?, Act::Silu)?)?;
        if let (Some([l0, l2]), Some(y)) = (&self.label_emb, y) {
            let e = linear(ops, hooks, l2, &ops.act(&linear(ops, hooks, l0, y)?, Act::Silu)?)?;
            emb = ops.add(&emb, &e)?;
        }
        // Every ResBlock's emb_layers start with the same SiLU.
        let emb = ops.act(&emb, Act::Silu)?;

        let mut skips = Vec::with_capacity(self.input_blocks.len());
        let mut h = x.clone();
        for block in &self.input_blocks {
            h = run_block(ops, hooks, block, h, &emb, context)?;
            skips.push(h.clone());
        }
        h = run_block(ops, hooks, &self.middle_block, h, &emb, context)?;
        for block in &self.output_blocks {
            let skip = skips.pop().expect("one skip per output block");
            h = ops.concat(&[&h, &skip], 1)?;
            h = run_block(ops, hooks, block, h, &emb, context)?;
        }
        let h = ops.group_norm(&h, GROUPS, &self.out_norm.w, &self.out_norm.b, RES_NORM_EPS)?;
        conv(ops, hooks, &self.out_conv, &ops.act(&h, Act::Silu)?)
    }
}

/// ldm's `timestep_embedding(t, dim)`, `[B, dim]` row-major: `cos(t·f_i)` for
/// the first half, `sin(t·f_i)` for the second, `f_i = exp(-ln(10000)·i/half)`,
/// a zero column when `dim` is odd. The frequencies and products are rounded
/// to f32 where PyTorch computes them in f32; cos/sin are then exact.
pub fn timestep_embedding(timesteps: &[f32], dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let log_period = -(MAX_PERIOD.ln()) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((log_period * i as f32 / half as f32) as f64).exp() as f32).collect();
    let mut out = vec![0.0f32; timesteps.len() * dim];
    for (row, &t) in out.chunks_mut(dim).zip(timesteps) {
        for (i, &f) in freqs.iter().enumerate() {
            let arg = (t * f) as f64;
            row[i] = arg.cos() as f32;
            row[half + i] = arg.sin() as f32;
        }
    }
    out
}

fn linear<O: Ops>(ops: &O, hooks: &InputHooks, m: &Linear<O::Tensor>, x: &O::Tensor) -> Result<O::Tensor> {
    let x = hooks.apply(ops, &m.path, x)?;
    ops.linear(&x, &m.w, m.b.as_ref()).with_context(|| format!("in `{}`", m.path))
}

fn conv<O: Ops>(ops: &O, hooks: &InputHooks, m: &Conv<O::Tensor>, x: &O::Tensor) -> Result<O::Tensor> {
    let x = hooks.apply(ops, &m.path, x)?;
    ops.conv2d(&x, &m.w, m.b.as_ref(), m.stride, m.padding).with_context(|| format!("in `{}`", m.path))
}

fn run_block<O: Ops>(
    ops: &O,
    hooks: &InputHooks,
    layers: &[Layer<O::Tensor>],
    mut h: O::Tensor,
    emb: &O::Tensor,
    context: &O::Tensor,
) -> Result<O::Tensor> {
    for layer in layers {
        h = match layer {
            Layer::Conv(m) | Layer::Down(m) => conv(ops, hooks, m, &h)?,
            Layer::Up(m) => conv(ops, hooks, m, &ops.upsample_nearest2x(&h)?)?,
            Layer::Res(r) => res_block(ops, hooks, r, &h, emb)?,
            Layer::Transformer(t) => spatial_transformer(ops, hooks, t, &h, context)?,
        };
    }
    Ok(h)
}

/// `emb` is SiLU(time embedding), shared by every ResBlock.
fn res_block<O: Ops>(ops: &O, hooks: &InputHooks, r: &ResBlock<O::Tensor>, x: &O::Tensor, emb: &O::Tensor) -> Result<O::Tensor> {
    let h = ops.group_norm(x, GROUPS, &r.in_norm.w, &r.in_norm.b, RES_NORM_EPS)?;
    let h = conv(ops, hooks, &r.in_conv, &ops.act(&h, Act::Silu)?)?;
    let h = ops.add_channel_bias(&h, &linear(ops, hooks, &r.emb, emb)?)?;
    let h = ops.group_norm(&h, GROUPS, &r.out_norm.w, &r.out_norm.b, RES_NORM_EPS)?;
    let h = conv(ops, hooks, &r.out_conv, &ops.act(&h, Act::Silu)?)?;
    let skip = match &r.skip {
        Some(s) => conv(ops, hooks, s, x)?,
        None => x.clone(),
    };
    ops.add(&skip, &h)
}

fn attention<O: Ops>(
    ops: &O,
    hooks: &InputHooks,
    a: &Attention<O::Tensor>,
    x: &O::Tensor,
    context: &O::Tensor,
    heads: usize,
) -> Result<O::Tensor> {
    let q = linear(ops, hooks, &a.to_q, x)?;
    let k = linear(ops, hooks, &a.to_k, context)?;
    let v = linear(ops, hooks, &a.to_v, context)?;
    linear(ops, hooks, &a.to_out, &ops.attention(&q, &k, &v, heads, false)?)
}

fn spatial_transformer<O: Ops>(
    ops: &O,
    hooks: &InputHooks,
    t: &SpatialTransformer<O::Tensor>,
    x: &O::Tensor,
    context: &O::Tensor,
) -> Result<O::Tensor> {
    let s = ops.shape(x);
    let (h, w) = (s[2], s[3]);
    let n = ops.group_norm(x, GROUPS, &t.norm.w, &t.norm.b, TRANSFORMER_NORM_EPS)?;
    let mut tokens = match &t.proj_in {
        Proj::Conv(m) => ops.to_tokens(&conv(ops, hooks, m, &n)?)?,
        Proj::Linear(m) => linear(ops, hooks, m, &ops.to_tokens(&n)?)?,
    };
    for b in &t.blocks {
        let n = ops.layer_norm(&tokens, &b.norm1.w, &b.norm1.b, LAYER_NORM_EPS)?;
        tokens = ops.add(&tokens, &attention(ops, hooks, &b.attn1, &n, &n, t.heads)?)?;
        let n = ops.layer_norm(&tokens, &b.norm2.w, &b.norm2.b, LAYER_NORM_EPS)?;
        tokens = ops.add(&tokens, &attention(ops, hooks, &b.attn2, &n, context, t.heads)?)?;
        let n = ops.layer_norm(&tokens, &b.norm3.w, &b.norm3.b, LAYER_NORM_EPS)?;
        let ff = ops.geglu(&linear(ops, hooks, &b.ff_in, &n)?)?;
        tokens = ops.add(&tokens, &linear(ops, hooks, &b.ff_out, &ff)?)?;
    }
    let out = match &t.proj_out {
        Proj::Conv(m) => conv(ops, hooks, m, &ops.from_tokens(&tokens, h, w)?)?,
        Proj::Linear(m) => ops.from_tokens(&linear(ops, hooks, m, &tokens)?, h, w)?,
    };
    ops.add(&out, x)
}

/// Full-size configurations of the families (ComfyUI's detected configs).
impl UnetConfig {
    /// ComfyUI's detected config of the manifests (`comfyui_detected_config`).
    pub fn sd15() -> UnetConfig {
        UnetConfig {
            in_channels: 4,
            out_channels: 4,
            model_channels: 320,
            channel_mult: vec![1, 2, 4, 4],
            num_res_blocks: vec![2, 2, 2, 2],
            transformer_depth: vec![1, 1, 1, 1, 1, 1, 0, 0],
            transformer_depth_output: vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            transformer_depth_middle: Some(1),
            context_dim: Some(768),
            adm_in_channels: None,
            use_linear_in_transformer: false,
            heads: Heads::Count(8),
            time_embed_dim: 1280,
        }
    }

    pub fn sdxl() -> UnetConfig {
        UnetConfig {
            in_channels: 4,
            out_channels: 4,
            model_channels: 320,
            channel_mult: vec![1, 2, 4],
            num_res_blocks: vec![2, 2, 2],
            transformer_depth: vec![0, 0, 2, 2, 10, 10],
            transformer_depth_output: vec![0, 0, 0, 2, 2, 2, 10, 10, 10],
            transformer_depth_middle: Some(10),
            context_dim: Some(2048),
            adm_in_channels: Some(2816),
            use_linear_in_transformer: true,
            heads: Heads::Width(64),
            time_embed_dim: 1280,
        }
    }

    /// SDXL refiner (ComfyUI's `SDXLRefiner`: 384 channels, 4 levels, depth 4, context 1280, adm 2560).
    pub fn sdxl_refiner() -> UnetConfig {
        UnetConfig {
            in_channels: 4,
            out_channels: 4,
            model_channels: 384,
            channel_mult: vec![1, 2, 4, 4],
            num_res_blocks: vec![2, 2, 2, 2],
            transformer_depth: vec![0, 0, 4, 4, 4, 4, 0, 0],
            transformer_depth_output: vec![0, 0, 0, 4, 4, 4, 4, 4, 4, 0, 0, 0],
            transformer_depth_middle: Some(4),
            context_dim: Some(1280),
            adm_in_channels: Some(2560),
            use_linear_in_transformer: true,
            heads: Heads::Width(64),
            time_embed_dim: 1536,
        }
    }

    /// SD2.x: SD1.5's layout with linear projections, 1024-wide context, 64-wide heads.
    pub fn sd2() -> UnetConfig {
        UnetConfig { context_dim: Some(1024), use_linear_in_transformer: true, heads: Heads::Width(64), ..Self::sd15() }
    }
}

/// The LDM key/shape layout of a configuration (checked against the manifests in
/// the tests), for checkpoints of configurations synth has no manifest for (SDXL refiner).
pub fn ldm_layout(cfg: &UnetConfig) -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    let (mc, ted) = (cfg.model_channels, cfg.time_embed_dim);
    fn lin(v: &mut Vec<(String, Vec<usize>)>, p: &str, o: usize, i: usize, bias: bool) {
        v.push((format!("{p}.weight"), vec![o, i]));
        if bias {
            v.push((format!("{p}.bias"), vec![o]));
        }
    }
    fn conv(v: &mut Vec<(String, Vec<usize>)>, p: &str, o: usize, i: usize, k: usize) {
        v.push((format!("{p}.weight"), vec![o, i, k, k]));
        v.push((format!("{p}.bias"), vec![o]));
    }
    fn norm(v: &mut Vec<(String, Vec<usize>)>, p: &str, c: usize) {
        v.push((format!("{p}.weight"), vec![c]));
        v.push((format!("{p}.bias"), vec![c]));
    }
    let res = |v: &mut Vec<(String, Vec<usize>)>, p: &str, i: usize, o: usize| {
        norm(v, &format!("{p}.in_layers.0"), i);
        conv(v, &format!("{p}.in_layers.2"), o, i, 3);
        lin(v, &format!("{p}.emb_layers.1"), o, ted, true);
        norm(v, &format!("{p}.out_layers.0"), o);
        conv(v, &format!("{p}.out_layers.3"), o, o, 3);
        if i != o {
            conv(v, &format!("{p}.skip_connection"), o, i, 1);
        }
    };
    let st = |v: &mut Vec<(String, Vec<usize>)>, p: &str, c: usize, depth: usize| {
        let ctx = cfg.context_dim.unwrap();
        norm(v, &format!("{p}.norm"), c);
        for proj in ["proj_in", "proj_out"] {
            if cfg.use_linear_in_transformer {
                lin(v, &format!("{p}.{proj}"), c, c, true);
            } else {
                conv(v, &format!("{p}.{proj}"), c, c, 1);
            }
        }
        for k in 0..depth {
            let b = format!("{p}.transformer_blocks.{k}");
            for (a, kv) in [("attn1", c), ("attn2", ctx)] {
                lin(v, &format!("{b}.{a}.to_q"), c, c, false);
                lin(v, &format!("{b}.{a}.to_k"), c, kv, false);
                lin(v, &format!("{b}.{a}.to_v"), c, kv, false);
                lin(v, &format!("{b}.{a}.to_out.0"), c, c, true);
            }
            for n in ["norm1", "norm2", "norm3"] {
                norm(v, &format!("{b}.{n}"), c);
            }
            lin(v, &format!("{b}.ff.net.0.proj"), 8 * c, c, true);
            lin(v, &format!("{b}.ff.net.2"), c, 4 * c, true);
        }
    };
    lin(&mut v, "time_embed.0", ted, mc, true);
    lin(&mut v, "time_embed.2", ted, ted, true);
    if let Some(adm) = cfg.adm_in_channels {
        lin(&mut v, "label_emb.0.0", ted, adm, true);
        lin(&mut v, "label_emb.0.2", ted, ted, true);
    }
    conv(&mut v, "input_blocks.0.0", mc, cfg.in_channels, 3);
    let (mut n, mut ch, mut chans, mut d) = (1, mc, vec![mc], cfg.transformer_depth.iter());
    for (level, (&m, &r)) in cfg.channel_mult.iter().zip(&cfg.num_res_blocks).enumerate() {
        for _ in 0..r {
            res(&mut v, &format!("input_blocks.{n}.0"), ch, m * mc);
            ch = m * mc;
            let depth = *d.next().unwrap();
            if depth > 0 {
                st(&mut v, &format!("input_blocks.{n}.1"), ch, depth);
            }
            chans.push(ch);
            n += 1;
        }
        if level + 1 < cfg.channel_mult.len() {
            conv(&mut v, &format!("input_blocks.{n}.0.op"), ch, ch, 3);
            chans.push(ch);
            n += 1;
        }
    }
    res(&mut v, "middle_block.0", ch, ch);
    if let Some(depth) = cfg.transformer_depth_middle {
        st(&mut v, "middle_block.1", ch, depth);
        res(&mut v, "middle_block.2", ch, ch);
    }
    let mut n = 0;
    let mut d = cfg.transformer_depth_output.iter().rev();
    for (level, (&m, &r)) in cfg.channel_mult.iter().zip(&cfg.num_res_blocks).enumerate().rev() {
        for i in 0..=r {
            res(&mut v, &format!("output_blocks.{n}.0"), ch + chans.pop().unwrap(), m * mc);
            ch = m * mc;
            let depth = *d.next().unwrap();
            if depth > 0 {
                st(&mut v, &format!("output_blocks.{n}.1"), ch, depth);
            }
            if level > 0 && i == r {
                let idx = if depth > 0 { 2 } else { 1 };
                conv(&mut v, &format!("output_blocks.{n}.{idx}.conv"), ch, ch, 3);
            }
            n += 1;
        }
    }
    norm(&mut v, "out.0", ch);
    conv(&mut v, "out.2", cfg.out_channels, mc, 3);
    v
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap, HashSet};

    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use rand_distr::{Distribution, StandardNormal};

    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::formats::{SourceDtype, WeightView};
    use crate::models::InputHook;
    use crate::modules::{ModuleKind, ModuleTable};
    use crate::nn::cpu::CpuOps;
    use crate::synth::{self, Family, Scale, SynthOptions};

    /// Tensors by key as little-endian f32 (or shapes only, with no bytes,
    /// for configuration inference).
    #[derive(Default)]
    struct MapSource(HashMap<String, (Vec<usize>, Vec<u8>)>);

    impl WeightSource for MapSource {
        fn tensor(&self, key: &str) -> Result<(Vec<usize>, WeightView<'_>)> {
            let (k, (shape, bytes)) = self.0.get_key_value(key).ok_or_else(|| anyhow!("no tensor `{key}`"))?;
            let cols = shape.last().copied().unwrap_or(1).max(1);
            let rows = shape.iter().product::<usize>() / cols;
            Ok((shape.clone(), WeightView { name: k, dtype: SourceDtype::F32, rows, cols, bytes }))
        }
        fn contains(&self, key: &str) -> bool {
            self.0.contains_key(key)
        }
    }

    impl MapSource {
        fn shapes(tensors: impl IntoIterator<Item = (String, Vec<usize>)>) -> MapSource {
            MapSource(tensors.into_iter().map(|(k, s)| (k, (s, vec![]))).collect())
        }

        /// Random values shaped like trained weights: norm scales near 1,
        /// small biases, matrices scaled by 1/sqrt(fan-in).
        fn random(tensors: impl IntoIterator<Item = (String, Vec<usize>)>, seed: u64) -> MapSource {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut m = MapSource::default();
            for (k, s) in tensors {
                let n: usize = s.iter().product();
                let fan_in: usize = s[1..].iter().product::<usize>().max(1);
                let is_norm_scale = s.len() == 1 && k.ends_with(".weight");
                let is_bias = k.ends_with(".bias");
                let v: Vec<f32> = (0..n)
                    .map(|_| {
                        let z: f32 = StandardNormal.sample(&mut rng);
                        if is_norm_scale {
                            1.0 + 0.1 * z
                        } else if is_bias {
                            0.1 * z
                        } else {
                            z / (fan_in as f32).sqrt()
                        }
                    })
                    .collect();
                m.0.insert(k, (s, v.iter().flat_map(|x| x.to_le_bytes()).collect()));
            }
            m
        }
    }

    fn randn(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| StandardNormal.sample(rng)).collect()
    }

    fn plan_source(opts: &SynthOptions) -> MapSource {
        MapSource::shapes(synth::plan(opts).unwrap().into_iter().map(|t| (t.name, t.shape)))
    }

    fn opts(family: Family, scale: Scale) -> SynthOptions {
        SynthOptions { scale, ..SynthOptions::new(family) }
    }

    #[test]
    fn layout_matches_the_manifests() {
        for (family, cfg) in [(Family::Sd15, UnetConfig::sd15()), (Family::Sdxl, UnetConfig::sdxl())] {
            let want: BTreeMap<String, Vec<usize>> =
                synth::plan(&opts(family, Scale::Full)).unwrap().into_iter().map(|t| (t.name, t.shape)).collect();
            let got: BTreeMap<String, Vec<usize>> = ldm_layout(&cfg).into_iter().collect();
            assert_eq!(got, want, "{family}");
        }
    }

    #[test]
    fn config_from_full_size_shapes() {
        // Full single-file checkpoints (prefix), as ComfyUI detects them.
        let mut o = opts(Family::Sd15, Scale::Full);
        o.full_checkpoint = true;
        let src = plan_source(&o);
        assert_eq!(UnetConfig::from_source(&src, "model.diffusion_model.").unwrap(), UnetConfig::sd15());
        o.variant = Some("inpaint".into());
        let cfg = UnetConfig::from_source(&plan_source(&o), "model.diffusion_model.").unwrap();
        assert_eq!(cfg, UnetConfig { in_channels: 9, ..UnetConfig::sd15() });
        let src = plan_source(&opts(Family::Sdxl, Scale::Full));
        assert_eq!(UnetConfig::from_source(&src, "").unwrap(), UnetConfig::sdxl());
        // Configurations without a manifest, from the layout checked above.
        for cfg in [UnetConfig::sdxl_refiner(), UnetConfig::sd2()] {
            assert_eq!(UnetConfig::from_source(&MapSource::shapes(ldm_layout(&cfg)), "").unwrap(), cfg);
        }
    }

    #[test]
    fn config_from_tiny_shapes() {
        // Tiny synth divides internal widths by 10 and keeps the context and adm widths.
        let cfg = UnetConfig::from_source(&plan_source(&opts(Family::Sd15, Scale::Tiny)), "").unwrap();
        assert_eq!(cfg, UnetConfig { model_channels: 32, time_embed_dim: 128, ..UnetConfig::sd15() });
        let cfg = UnetConfig::from_source(&plan_source(&opts(Family::Sdxl, Scale::Tiny)), "").unwrap();
        assert_eq!(cfg, UnetConfig { model_channels: 32, time_embed_dim: 128, ..UnetConfig::sdxl() });
        assert_eq!(cfg.heads.at(64), 1);
        assert_eq!(cfg.heads.at(128), 2);
        assert_eq!(UnetConfig::sdxl().heads.at(1280), 20);
        assert_eq!(UnetConfig::sd15().heads.at(1280), 8);
    }

    #[test]
    fn non_unet_input_is_refused_clearly() {
        let err = |src: &MapSource, prefix: &str| UnetConfig::from_source(src, prefix).unwrap_err().to_string();
        assert!(err(&plan_source(&opts(Family::Flux, Scale::Tiny)), "").contains("FLUX"));
        assert!(err(&plan_source(&opts(Family::Sd3, Scale::Tiny)), "").contains("SD3"));
        let mut full = opts(Family::Sd15, Scale::Tiny);
        full.full_checkpoint = true;
        assert!(err(&plan_source(&full), "").contains("model.diffusion_model."));
        let diffusers = MapSource::shapes([("conv_in.weight".to_string(), vec![320, 4, 3, 3])]);
        assert!(err(&diffusers, "").contains("diffusers"));
        // A UNet missing a tensor names it.
        let mut src = plan_source(&opts(Family::Sd15, Scale::Tiny));
        src.0.remove("out.2.weight");
        assert!(err(&src, "").contains("`out.2.weight` is missing"));
    }

    #[test]
    fn timestep_embedding_is_cos_then_sin() {
        // dim 4: frequencies [1, 10000^-1/2 = 0.01].
        let e = timestep_embedding(&[2.0, 0.0], 4);
        let want = [2f64.cos(), 0.02f64.cos(), 2f64.sin(), 0.02f64.sin(), 1.0, 1.0, 0.0, 0.0];
        for (g, w) in e.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{e:?}");
        }
        // Odd widths get a zero last column.
        let e = timestep_embedding(&[3.0], 5);
        assert_eq!(e[4], 0.0);
        assert!((e[0] as f64 - 3f64.cos()).abs() < 1e-6);
    }

    // -----------------------------------------------------------------------
    // Whole-model runs on tiny synthetic checkpoints.

    struct Run {
        out_shape: Vec<usize>,
        out: Vec<f32>,
        /// Output with FP8 inputs at `out.2` only, and everywhere.
        quantized: [Vec<f32>; 2],
        stats: Vec<crate::nn::ObserverStats>,
        table_paths: Vec<String>,
        module_inputs: Vec<(String, ObserverSpec)>,
    }

    fn run_tiny(family: Family, full_checkpoint: bool) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.safetensors");
        let o = SynthOptions { full_checkpoint, ..SynthOptions::new(family) };
        synth::write(&o, &path, |_, _| {}).unwrap();
        let ckpt = Checkpoint::open(&path).unwrap();
        let prefix = if full_checkpoint { "model.diffusion_model." } else { "" };
        let cfg = UnetConfig::from_source(&ckpt, prefix).unwrap();
        let ops = CpuOps::new();
        let unet = Unet::load(&ops, &ckpt, prefix, cfg.clone()).unwrap();

        // One observer slot per Linear/Conv module of the module table.
        let table = ModuleTable::build(&ckpt);
        let quantizable: Vec<_> = table.iter().filter(|m| matches!(m.kind, ModuleKind::Linear | ModuleKind::Conv)).collect();
        let specs: Vec<ObserverSpec> = quantizable
            .iter()
            .map(|m| ObserverSpec {
                channels: m.weight_shape[1],
                axis: if m.kind == ModuleKind::Linear { ChannelAxis::Last } else { ChannelAxis::Dim1 },
            })
            .collect();
        let mut hooks = InputHooks::none();
        for (slot, m) in quantizable.iter().enumerate() {
            hooks.by_module.insert(m.path.clone(), InputHook { observer: Some(slot), quant: None });
        }
        ops.observers_reset(&specs, 1).unwrap();

        let mut rng = StdRng::seed_from_u64(7);
        let (b, h, w) = (2, 8, 8);
        let x = ops.from_f32(&[b, cfg.in_channels, h, w], &randn(&mut rng, b * cfg.in_channels * h * w)).unwrap();
        let ctx_dim = cfg.context_dim.unwrap();
        let context = ops.from_f32(&[b, 5, ctx_dim], &randn(&mut rng, b * 5 * ctx_dim)).unwrap();
        let y = cfg.adm_in_channels.map(|adm| ops.from_f32(&[b, adm], &randn(&mut rng, b * adm)).unwrap());
        let ts = [999.0, 10.5];
        let out = unet.forward(&ops, &x, &ts, &context, y.as_ref(), &hooks).unwrap();
        let stats = ops.observers_read().unwrap();

        // Fake quantization (FP8, dynamic) of the last conv's input alone, and of
        // every input. Random synthetic UNets are chaotic (a 1e-3 input change
        // moves the tiny SD1.5's output by ~15%), so only the last layer's
        // effect has a predictable size.
        let fp8 = |only: Option<&str>| {
            let mut fq = InputHooks::none();
            for m in quantizable.iter().filter(|m| only.is_none_or(|o| o == m.path)) {
                fq.by_module.insert(m.path.clone(), InputHook { observer: None, quant: Some(crate::nn::ActQuant::Fp8Dynamic) });
            }
            ops.to_f32(&unet.forward(&ops, &x, &ts, &context, y.as_ref(), &fq).unwrap()).unwrap()
        };
        let quantized = [fp8(Some("out.2")), fp8(None)];

        // Sizes the UNet cannot halve cleanly are refused.
        let odd = ops.from_f32(&[1, cfg.in_channels, 6, 6], &vec![0.0; cfg.in_channels * 36]).unwrap();
        let ctx1 = ops.from_f32(&[1, 5, ctx_dim], &vec![0.0; 5 * ctx_dim]).unwrap();
        let y1 = cfg.adm_in_channels.map(|adm| ops.from_f32(&[1, adm], &vec![0.0; adm]).unwrap());
        let e = unet.forward(&ops, &odd, &[1.0], &ctx1, y1.as_ref(), &InputHooks::none());
        assert!(e.unwrap_err().to_string().contains("not a multiple"));

        Run {
            out_shape: ops.shape(&out),
            out: ops.to_f32(&out).unwrap(),
            quantized,
            stats,
            table_paths: quantizable.iter().map(|m| m.path.clone()).collect(),
            module_inputs: unet.module_inputs(),
        }
    }

    fn check_run(r: &Run) {
        assert_eq!(r.out_shape, vec![2, 4, 8, 8]);
        assert!(r.out.iter().all(|v| v.is_finite()));
        assert!(r.out.iter().any(|&v| v != 0.0));
        // Every Linear/Conv input was observed exactly once, by the module's own path.
        for (path, s) in r.table_paths.iter().zip(&r.stats) {
            assert_eq!(s.calls, 1, "`{path}` observed {} times", s.calls);
            assert!(s.amax() > 0.0, "`{path}` saw only zeros");
        }
        let ours: HashSet<&str> = r.module_inputs.iter().map(|(p, _)| p.as_str()).collect();
        let theirs: HashSet<&str> = r.table_paths.iter().map(|p| p.as_str()).collect();
        assert_eq!(ours.len(), r.module_inputs.len(), "a module listed twice");
        assert_eq!(ours, theirs);
        let rel = |q: &[f32]| {
            let (mut d, mut n) = (0f64, 0f64);
            for (a, b) in r.out.iter().zip(q) {
                d += ((a - b) as f64).powi(2);
                n += (*a as f64).powi(2);
            }
            (d / n).sqrt()
        };
        // E4M3 keeps 3 mantissa bits: a few percent on the last layer.
        let last = rel(&r.quantized[0]);
        assert!(last > 3e-3 && last < 0.1, "fp8 at out.2 changed the output by {last}");
        assert!(r.quantized[1].iter().all(|v| v.is_finite()));
        assert!(rel(&r.quantized[1]) > 3e-3);
    }

    #[test]
    fn tiny_sd15_runs_and_hooks_every_module_once() {
        let r = run_tiny(Family::Sd15, true);
        check_run(&r);
        // SD1.5: 1×1 conv projections are Conv inputs (channel axis 1).
        let proj = r.module_inputs.iter().find(|(p, _)| p == "input_blocks.1.1.proj_in").unwrap();
        assert_eq!(proj.1, ObserverSpec { channels: 32, axis: ChannelAxis::Dim1 });
    }

    #[test]
    fn tiny_sdxl_runs_and_hooks_every_module_once() {
        let r = run_tiny(Family::Sdxl, false);
        check_run(&r);
        let k = r.module_inputs.iter().find(|(p, _)| p == "input_blocks.4.1.transformer_blocks.0.attn2.to_k").unwrap();
        assert_eq!(k.1, ObserverSpec { channels: 2048, axis: ChannelAxis::Last });
        assert_eq!(r.module_inputs[2].0, "label_emb.0.0");
    }

    #[test]
    fn shrunk_refiner_and_sd2_layouts_run() {
        // The refiner's and SD2's structures at tiny widths, from random weights.
        let tiny_refiner = UnetConfig {
            model_channels: 32,
            time_embed_dim: 128,
            context_dim: Some(40),
            adm_in_channels: Some(24),
            transformer_depth: vec![0, 0, 1, 1, 1, 1, 0, 0],
            transformer_depth_output: vec![0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            transformer_depth_middle: Some(1),
            ..UnetConfig::sdxl_refiner()
        };
        let tiny_sd2 = UnetConfig { model_channels: 64, time_embed_dim: 256, context_dim: Some(16), ..UnetConfig::sd2() };
        for cfg in [tiny_refiner, tiny_sd2] {
            let src = MapSource::random(ldm_layout(&cfg), 3);
            assert_eq!(UnetConfig::from_source(&src, "").unwrap(), cfg);
            let ops = CpuOps::new();
            let unet = Unet::load(&ops, &src, "", cfg.clone()).unwrap();
            let mut rng = StdRng::seed_from_u64(1);
            let x = ops.from_f32(&[1, 4, 8, 8], &randn(&mut rng, 256)).unwrap();
            let ctx = cfg.context_dim.unwrap();
            let c = ops.from_f32(&[1, 3, ctx], &randn(&mut rng, 3 * ctx)).unwrap();
            let y = cfg.adm_in_channels.map(|a| ops.from_f32(&[1, a], &randn(&mut rng, a)).unwrap());
            let out = unet.forward(&ops, &x, &[500.0], &c, y.as_ref(), &InputHooks::none()).unwrap();
            assert_eq!(ops.shape(&out), vec![1, 4, 8, 8]);
            assert!(ops.to_f32(&out).unwrap().iter().all(|v| v.is_finite()));
            // A y where none belongs, or none where one does, is an error.
            let bad_y = if y.is_some() { None } else { Some(ops.from_f32(&[1, 2], &[0.0, 0.0]).unwrap()) };
            assert!(unet.forward(&ops, &x, &[500.0], &c, bad_y.as_ref(), &InputHooks::none()).is_err());
        }
        // A shape that disagrees with the configuration names the tensor.
        let cfg = UnetConfig { model_channels: 32, time_embed_dim: 128, context_dim: Some(16), ..UnetConfig::sd2() };
        let mut src = MapSource::random(ldm_layout(&cfg), 3);
        src.0.get_mut("middle_block.1.proj_in.weight").unwrap().0 = vec![128, 64];
        let err = Unet::load(&CpuOps::new(), &src, "", cfg).err().unwrap().to_string();
        assert!(err.contains("middle_block.1.proj_in.weight"), "{err}");
    }

    // -----------------------------------------------------------------------
    // Numeric anchors: a ResBlock and a SpatialTransformer against naive f64
    // loops written from the ldm definitions.

    mod naive {
        /// erf by Abramowitz–Stegun 7.1.26 (|error| < 1.5e-7).
        fn erf(x: f64) -> f64 {
            let t = 1.0 / (1.0 + 0.3275911 * x.abs());
            let p = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
            (1.0 - p * (-x * x).exp()).copysign(x)
        }
        pub fn gelu(x: f64) -> f64 {
            0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
        }
        pub fn silu(x: f64) -> f64 {
            x / (1.0 + (-x).exp())
        }
        /// `x [n, c, hw]`.
        #[allow(clippy::too_many_arguments)]
        pub fn group_norm(x: &[f64], n: usize, c: usize, hw: usize, g: usize, w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
            let mut out = x.to_vec();
            let cg = c / g;
            for i in 0..n {
                for gi in 0..g {
                    let idx: Vec<usize> = (gi * cg..(gi + 1) * cg).flat_map(|ch| (0..hw).map(move |p| (i * c + ch) * hw + p)).collect();
                    let mean = idx.iter().map(|&k| x[k]).sum::<f64>() / idx.len() as f64;
                    let var = idx.iter().map(|&k| (x[k] - mean).powi(2)).sum::<f64>() / idx.len() as f64;
                    for &k in &idx {
                        let ch = (k / hw) % c;
                        out[k] = (x[k] - mean) / (var + eps).sqrt() * w[ch] + b[ch];
                    }
                }
            }
            out
        }
        /// `x [n, ci, h, w]`, `wt [co, ci, k, k]`, padding k/2.
        #[allow(clippy::too_many_arguments)]
        pub fn conv(x: &[f64], n: usize, ci: usize, h: usize, w: usize, wt: &[f64], bias: &[f64], k: usize) -> Vec<f64> {
            let co = bias.len();
            let p = (k / 2) as isize;
            let mut out = vec![0.0; n * co * h * w];
            for i in 0..n {
                for o in 0..co {
                    for y in 0..h {
                        for xx in 0..w {
                            let mut s = bias[o];
                            for c in 0..ci {
                                for ky in 0..k {
                                    for kx in 0..k {
                                        let (sy, sx) = (y as isize + ky as isize - p, xx as isize + kx as isize - p);
                                        if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                                            s += x[((i * ci + c) * h + sy as usize) * w + sx as usize]
                                                * wt[((o * ci + c) * k + ky) * k + kx];
                                        }
                                    }
                                }
                            }
                            out[((i * co + o) * h + y) * w + xx] = s;
                        }
                    }
                }
            }
            out
        }
        /// `x [rows, i]`, `wt [o, i]`.
        pub fn linear(x: &[f64], i: usize, wt: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
            let o = wt.len() / i;
            x.chunks(i)
                .flat_map(|row| {
                    (0..o)
                        .map(move |r| row.iter().zip(&wt[r * i..(r + 1) * i]).map(|(a, b)| a * b).sum::<f64>() + bias.map_or(0.0, |b| b[r]))
                })
                .collect()
        }
        pub fn layer_norm(x: &[f64], c: usize, w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
            x.chunks(c)
                .flat_map(|row| {
                    let mean = row.iter().sum::<f64>() / c as f64;
                    let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
                    row.iter().enumerate().map(move |(j, v)| (v - mean) / (var + eps).sqrt() * w[j] + b[j]).collect::<Vec<_>>()
                })
                .collect()
        }
        /// One batch row: `q [nq, c]`, `k`, `v [nk, c]`, `heads` heads of `c / heads`.
        pub fn attention(q: &[f64], k: &[f64], v: &[f64], c: usize, heads: usize) -> Vec<f64> {
            let d = c / heads;
            let (nq, nk) = (q.len() / c, k.len() / c);
            let mut out = vec![0.0; nq * c];
            for h in 0..heads {
                for i in 0..nq {
                    let s: Vec<f64> = (0..nk)
                        .map(|j| (0..d).map(|e| q[i * c + h * d + e] * k[j * c + h * d + e]).sum::<f64>() / (d as f64).sqrt())
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                    for j in 0..nk {
                        let p = (s[j] - m).exp() / z;
                        for e in 0..d {
                            out[i * c + h * d + e] += p * v[j * c + h * d + e];
                        }
                    }
                }
            }
            out
        }
    }

    fn f64s(src: &MapSource, key: &str) -> Vec<f64> {
        src.0[key].1.chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64).collect()
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs()).fold(0f64, f64::max);
        assert!(worst <= 2e-5 * scale, "{what}: max error {worst:e} against max |value| {scale}");
    }

    #[test]
    fn res_block_matches_naive_ldm() {
        let (n, ci, co, h, w, e) = (2, 32, 64, 3, 4, 16);
        let cfg = UnetConfig { time_embed_dim: e, model_channels: ci, ..UnetConfig::sd15() };
        let keys: Vec<_> = ldm_layout(&cfg).into_iter().filter(|(k, _)| k.starts_with("input_blocks.4.0.")).collect();
        // input_blocks.4.0 of SD1.5 is the 32 → 64 ResBlock with a skip conv.
        assert!(keys.iter().any(|(k, _)| k.ends_with("skip_connection.weight")));
        let src = MapSource::random(keys, 11);
        let ops = CpuOps::new();
        let l = Loader { ops: &ops, src: &src, prefix: "" };
        let block = l.res_block("input_blocks.4.0", ci, co, e).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        // Variance ~1e-5, so GroupNorm's eps (1e-5) visibly matters.
        let x: Vec<f32> = randn(&mut rng, n * ci * h * w).iter().map(|v| v * 0.003).collect();
        let emb = randn(&mut rng, n * e);
        let xt = ops.from_f32(&[n, ci, h, w], &x).unwrap();
        let et = ops.act(&ops.from_f32(&[n, e], &emb).unwrap(), Act::Silu).unwrap();
        let got = ops.to_f32(&res_block(&ops, &InputHooks::none(), &block, &xt, &et).unwrap()).unwrap();

        let g = |k: &str| f64s(&src, &format!("input_blocks.4.0.{k}"));
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let hw = h * w;
        let hh = naive::group_norm(&x64, n, ci, hw, 32, &g("in_layers.0.weight"), &g("in_layers.0.bias"), 1e-5);
        let hh: Vec<f64> = hh.into_iter().map(naive::silu).collect();
        let mut hh = naive::conv(&hh, n, ci, h, w, &g("in_layers.2.weight"), &g("in_layers.2.bias"), 3);
        let emb_act: Vec<f64> = emb.iter().map(|&v| naive::silu(v as f64)).collect();
        let eo = naive::linear(&emb_act, e, &g("emb_layers.1.weight"), Some(&g("emb_layers.1.bias")));
        for (k, v) in hh.iter_mut().enumerate() {
            *v += eo[(k / hw / co) * co + (k / hw) % co];
        }
        let hh = naive::group_norm(&hh, n, co, hw, 32, &g("out_layers.0.weight"), &g("out_layers.0.bias"), 1e-5);
        let hh: Vec<f64> = hh.into_iter().map(naive::silu).collect();
        let hh = naive::conv(&hh, n, co, h, w, &g("out_layers.3.weight"), &g("out_layers.3.bias"), 3);
        let skip = naive::conv(&x64, n, ci, h, w, &g("skip_connection.weight"), &g("skip_connection.bias"), 1);
        let want: Vec<f64> = hh.iter().zip(&skip).map(|(a, b)| a + b).collect();
        assert_close(&got, &want, "ResBlock");
    }

    #[test]
    fn spatial_transformer_matches_naive_ldm() {
        let (n, c, h, w, t, ctx, depth) = (2, 64, 2, 3, 5, 24, 2);
        for linear in [false, true] {
            // Width-32 heads: two heads of 32 at 64 channels.
            let cfg =
                UnetConfig { context_dim: Some(ctx), use_linear_in_transformer: linear, heads: Heads::Width(32), ..UnetConfig::sd15() };
            let p = "middle_block.1";
            let mut keys = Vec::new();
            let full = UnetConfig { model_channels: c / 4, time_embed_dim: 8, transformer_depth_middle: Some(depth), ..cfg.clone() };
            for (k, s) in ldm_layout(&full) {
                if k.starts_with(&format!("{p}.")) {
                    keys.push((k, s));
                }
            }
            let src = MapSource::random(keys, 13);
            let ops = CpuOps::new();
            let l = Loader { ops: &ops, src: &src, prefix: "" };
            let st = l.transformer(p, c, depth, &cfg).unwrap();
            assert_eq!(st.heads, 2);
            let mut rng = StdRng::seed_from_u64(9);
            // Variance ~1e-5: the transformer norm's eps (1e-6, not 1e-5) shows.
            let x: Vec<f32> = randn(&mut rng, n * c * h * w).iter().map(|v| v * 0.003).collect();
            let cx = randn(&mut rng, n * t * ctx);
            let xt = ops.from_f32(&[n, c, h, w], &x).unwrap();
            let ct = ops.from_f32(&[n, t, ctx], &cx).unwrap();
            let got = ops.to_f32(&spatial_transformer(&ops, &InputHooks::none(), &st, &xt, &ct).unwrap()).unwrap();

            let g = |k: &str| f64s(&src, &format!("{p}.{k}"));
            let hw = h * w;
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let normed = naive::group_norm(&x64, n, c, hw, 32, &g("norm.weight"), &g("norm.bias"), 1e-6);
            let to_tokens =
                |img: &[f64]| -> Vec<f64> { (0..n * hw * c).map(|k| img[((k / (hw * c)) * c + k % c) * hw + (k / c) % hw]).collect() };
            let from_tokens =
                |tok: &[f64]| -> Vec<f64> { (0..n * c * hw).map(|k| tok[((k / (hw * c)) * hw + k % hw) * c + (k / hw) % c]).collect() };
            let mut tok = if linear {
                naive::linear(&to_tokens(&normed), c, &g("proj_in.weight"), Some(&g("proj_in.bias")))
            } else {
                to_tokens(&naive::conv(&normed, n, c, h, w, &g("proj_in.weight"), &g("proj_in.bias"), 1))
            };
            let cx64: Vec<f64> = cx.iter().map(|&v| v as f64).collect();
            for k in 0..depth {
                let bk = |s: &str| g(&format!("transformer_blocks.{k}.{s}"));
                let attn = |a: &str, xs: &[f64], kv: &[f64], kv_w: usize, tok: &mut Vec<f64>| {
                    let mut out = Vec::new();
                    for i in 0..n {
                        let xr = &xs[i * hw * c..(i + 1) * hw * c];
                        let kr = &kv[i * (kv.len() / n)..(i + 1) * (kv.len() / n)];
                        let q = naive::linear(xr, c, &bk(&format!("{a}.to_q.weight")), None);
                        let kk = naive::linear(kr, kv_w, &bk(&format!("{a}.to_k.weight")), None);
                        let vv = naive::linear(kr, kv_w, &bk(&format!("{a}.to_v.weight")), None);
                        let o = naive::attention(&q, &kk, &vv, c, 2);
                        out.extend(naive::linear(&o, c, &bk(&format!("{a}.to_out.0.weight")), Some(&bk(&format!("{a}.to_out.0.bias")))));
                    }
                    for (t, o) in tok.iter_mut().zip(out) {
                        *t += o;
                    }
                };
                let nrm = naive::layer_norm(&tok, c, &bk("norm1.weight"), &bk("norm1.bias"), 1e-5);
                attn("attn1", &nrm, &nrm, c, &mut tok);
                let nrm = naive::layer_norm(&tok, c, &bk("norm2.weight"), &bk("norm2.bias"), 1e-5);
                attn("attn2", &nrm, &cx64, ctx, &mut tok);
                let nrm = naive::layer_norm(&tok, c, &bk("norm3.weight"), &bk("norm3.bias"), 1e-5);
                let proj = naive::linear(&nrm, c, &bk("ff.net.0.proj.weight"), Some(&bk("ff.net.0.proj.bias")));
                let inner = 4 * c;
                let gated: Vec<f64> =
                    proj.chunks(2 * inner).flat_map(|r| (0..inner).map(move |j| r[j] * naive::gelu(r[inner + j]))).collect();
                let ff = naive::linear(&gated, inner, &bk("ff.net.2.weight"), Some(&bk("ff.net.2.bias")));
                for (t, f) in tok.iter_mut().zip(ff) {
                    *t += f;
                }
            }
            let out = if linear {
                from_tokens(&naive::linear(&tok, c, &g("proj_out.weight"), Some(&g("proj_out.bias"))))
            } else {
                naive::conv(&from_tokens(&tok), n, c, h, w, &g("proj_out.weight"), &g("proj_out.bias"), 1)
            };
            let want: Vec<f64> = out.iter().zip(&x64).map(|(a, b)| a + b).collect();
            assert_close(&got, &want, if linear { "SpatialTransformer (linear)" } else { "SpatialTransformer (conv)" });
        }
    }
}
