use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{Result, anyhow};
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

/// Tensors by key as little-endian f32 (no bytes: shapes only).
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

    /// Norm scales near 1, small biases, matrices and the patch conv at
    /// 1/sqrt(fan-in), a position table of std 0.5 (so that it matters).
    fn random(tensors: impl IntoIterator<Item = (String, Vec<usize>)>, seed: u64) -> MapSource {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut m = MapSource::default();
        for (k, s) in tensors {
            let n: usize = s.iter().product();
            let fan_in: usize = s[1..].iter().product::<usize>().max(1);
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    let z: f32 = StandardNormal.sample(&mut rng);
                    if k == "pos_embed" {
                        0.5 * z
                    } else if s.len() == 1 && k.ends_with(".weight") {
                        1.0 + 0.1 * z
                    } else if k.ends_with(".bias") {
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

    fn f64s(&self, key: &str) -> Vec<f64> {
        let (_, bytes) = self.0.get(key).unwrap_or_else(|| panic!("no tensor `{key}`"));
        bytes.chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64).collect()
    }
}

fn randn(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut d, mut n) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        d += (*g as f64 - w).powi(2);
        n += w.powi(2);
    }
    (d / n).sqrt()
}

/// Small configurations with the structure of each released model.
fn small(kind: &str) -> MmditConfig {
    let base = MmditConfig {
        hidden: 128,
        heads: 2,
        depth: 3,
        mlp_hidden: 512,
        pos_embed_max_size: 6,
        context_dim: 40,
        adm_in_channels: 24,
        ..MmditConfig::sd3_medium()
    };
    match kind {
        "sd3-medium" => base,
        "3.5-medium" => MmditConfig { pos_embed_max_size: 8, qk_norm: true, x_self_attn_layers: vec![0, 1], ..base },
        "3.5-large" => MmditConfig { hidden: 192, heads: 3, depth: 2, mlp_hidden: 768, qk_norm: true, ..base },
        _ => unreachable!(),
    }
}

// ---------------------------------------------------------------------------
// The whole forward pass written literally from mmdit.py, in f64, one batch
// row at a time.

mod naive {
    use super::{MapSource, MmditConfig};

    pub fn silu(x: f64) -> f64 {
        x / (1.0 + (-x).exp())
    }
    /// `nn.GELU(approximate="tanh")`.
    pub fn gelu_tanh(x: f64) -> f64 {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
    }
    /// `x [rows, i]` @ `w [o, i]`^T + `b`.
    pub fn linear(x: &[f64], i: usize, w: &[f64], b: &[f64]) -> Vec<f64> {
        let o = w.len() / i;
        let mut out = Vec::with_capacity(x.len() / i * o);
        for row in x.chunks(i) {
            for r in 0..o {
                out.push(row.iter().zip(&w[r * i..(r + 1) * i]).map(|(a, b)| a * b).sum::<f64>() + b[r]);
            }
        }
        out
    }
    /// LayerNorm without affine parameters, eps 1e-6.
    pub fn layer_norm(x: &[f64], c: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(c) {
            let mean = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
            out.extend(row.iter().map(|v| (v - mean) / (var + 1e-6).sqrt()));
        }
        out
    }
    /// `x * (1 + scale) + shift`, per token.
    pub fn modulate(x: &[f64], shift: &[f64], scale: &[f64]) -> Vec<f64> {
        let c = shift.len();
        x.iter().enumerate().map(|(k, v)| v * (1.0 + scale[k % c]) + shift[k % c]).collect()
    }
    /// `x += gate * y`, per token.
    pub fn gated_add(x: &mut [f64], gate: &[f64], y: &[f64]) {
        let c = gate.len();
        for (k, (a, b)) in x.iter_mut().zip(y).enumerate() {
            *a += gate[k % c] * b;
        }
    }
    /// Softmax attention of `q [nq, c]` over `k`, `v [nk, c]`, heads of 64.
    pub fn attention(q: &[f64], k: &[f64], v: &[f64], c: usize) -> Vec<f64> {
        let d = 64;
        let (nq, nk) = (q.len() / c, k.len() / c);
        let mut out = vec![0.0; nq * c];
        for h in 0..c / d {
            for i in 0..nq {
                let s: Vec<f64> =
                    (0..nk).map(|j| (0..d).map(|e| q[i * c + h * d + e] * k[j * c + h * d + e]).sum::<f64>() / (d as f64).sqrt()).collect();
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

    struct W<'a>(&'a MapSource);
    impl W<'_> {
        fn g(&self, k: &str) -> Vec<f64> {
            self.0.f64s(k)
        }
        fn lin(&self, m: &str, x: &[f64], i: usize) -> Vec<f64> {
            linear(x, i, &self.g(&format!("{m}.weight")), &self.g(&format!("{m}.bias")))
        }
        /// `SelfAttention.pre_attention`: qkv, split, per-head RMSNorm of q and k.
        fn qkv(&self, a: &str, x: &[f64], hid: usize, qk_norm: bool) -> [Vec<f64>; 3] {
            let t = self.lin(&format!("{a}.qkv"), x, hid);
            let mut out = [vec![], vec![], vec![]];
            for row in t.chunks(3 * hid) {
                for (j, o) in out.iter_mut().enumerate() {
                    o.extend_from_slice(&row[j * hid..(j + 1) * hid]);
                }
            }
            if qk_norm {
                for (j, ln) in [(0, "ln_q"), (1, "ln_k")] {
                    let w = self.g(&format!("{a}.{ln}.weight"));
                    for head in out[j].chunks_mut(64) {
                        let ms = head.iter().map(|v| v * v).sum::<f64>() / 64.0;
                        let r = 1.0 / (ms + 1e-6).sqrt();
                        for (e, v) in head.iter_mut().enumerate() {
                            *v = *v * r * w[e];
                        }
                    }
                }
            }
            out
        }
    }

    /// One batch row: `x [in, H, W]`, model timestep `t`, `ctx [T, context_dim]`,
    /// `y [adm]` -> `[out, H, W]`.
    pub fn forward(src: &MapSource, cfg: &MmditConfig, x: &[f64], hw: (usize, usize), t: f32, ctx: &[f64], y: &[f64]) -> Vec<f64> {
        let wt = W(src);
        let (hid, p, m, ci) = (cfg.hidden, cfg.patch_size, cfg.pos_embed_max_size, cfg.in_channels);
        let (hh, ww) = (hw.0 / p, hw.1 / p);
        // PatchEmbed + cropped_pos_embed.
        let (pw, pb, pos) = (wt.g("x_embedder.proj.weight"), wt.g("x_embedder.proj.bias"), wt.g("pos_embed"));
        let (top, left) = ((m - hh) / 2, (m - ww) / 2);
        let mut img = vec![0.0; hh * ww * hid];
        for r in 0..hh {
            for s in 0..ww {
                for o in 0..hid {
                    let mut acc = pb[o];
                    for c in 0..ci {
                        for ky in 0..p {
                            for kx in 0..p {
                                acc += x[(c * hw.0 + r * p + ky) * hw.1 + s * p + kx] * pw[((o * ci + c) * p + ky) * p + kx];
                            }
                        }
                    }
                    img[(r * ww + s) * hid + o] = acc + pos[((top + r) * m + left + s) * hid + o];
                }
            }
        }
        // TimestepEmbedder: frequencies and arguments in f32 as PyTorch computes them.
        let half = cfg.frequency_dim / 2;
        let mut tf = vec![0.0; cfg.frequency_dim];
        for j in 0..half {
            let f = (-(10000f64.ln()) as f32 * j as f32 / half as f32).exp();
            let arg = (t * f) as f64;
            tf[j] = arg.cos();
            tf[half + j] = arg.sin();
        }
        let mlp = |pre: &str, v: &[f64], i: usize| -> Vec<f64> {
            let a: Vec<f64> = wt.lin(&format!("{pre}.mlp.0"), v, i).into_iter().map(silu).collect();
            wt.lin(&format!("{pre}.mlp.2"), &a, hid)
        };
        let te = mlp("t_embedder", &tf, cfg.frequency_dim);
        let ye = mlp("y_embedder", y, cfg.adm_in_channels);
        let c: Vec<f64> = te.iter().zip(&ye).map(|(a, b)| silu(a + b)).collect();
        let mut txt = wt.lin("context_embedder", ctx, cfg.context_dim);

        for i in 0..cfg.depth {
            let cb = format!("joint_blocks.{i}.context_block");
            let xb = format!("joint_blocks.{i}.x_block");
            let c_pre_only = i + 1 == cfg.depth;
            let x_attn2 = cfg.x_self_attn_layers.contains(&i);
            let chunks = |b: &str| -> Vec<Vec<f64>> {
                wt.lin(&format!("{b}.adaLN_modulation.1"), &c, hid).chunks(hid).map(|v| v.to_vec()).collect()
            };
            // pre_attention of the context, pre_attention(_x) of the image.
            let cm = chunks(&cb);
            let cqkv = wt.qkv(&format!("{cb}.attn"), &modulate(&layer_norm(&txt, hid), &cm[0], &cm[1]), hid, cfg.qk_norm);
            let xm = chunks(&xb);
            let xn = layer_norm(&img, hid);
            let xqkv = wt.qkv(&format!("{xb}.attn"), &modulate(&xn, &xm[0], &xm[1]), hid, cfg.qk_norm);
            // Joint attention over (context, image).
            let cat = |j: usize| [cqkv[j].clone(), xqkv[j].clone()].concat();
            let att = attention(&cat(0), &cat(1), &cat(2), hid);
            let (c_att, x_att) = att.split_at(txt.len());
            if !c_pre_only {
                let proj = wt.lin(&format!("{cb}.attn.proj"), c_att, hid);
                gated_add(&mut txt, &cm[2], &proj);
                let h = modulate(&layer_norm(&txt, hid), &cm[3], &cm[4]);
                let h: Vec<f64> = wt.lin(&format!("{cb}.mlp.fc1"), &h, hid).into_iter().map(gelu_tanh).collect();
                let h = wt.lin(&format!("{cb}.mlp.fc2"), &h, cfg.mlp_hidden);
                gated_add(&mut txt, &cm[5], &h);
            }
            let proj = wt.lin(&format!("{xb}.attn.proj"), x_att, hid);
            gated_add(&mut img, &xm[2], &proj);
            if x_attn2 {
                let q2 = wt.qkv(&format!("{xb}.attn2"), &modulate(&xn, &xm[6], &xm[7]), hid, cfg.qk_norm);
                let a2 = attention(&q2[0], &q2[1], &q2[2], hid);
                let proj2 = wt.lin(&format!("{xb}.attn2.proj"), &a2, hid);
                gated_add(&mut img, &xm[8], &proj2);
            }
            let h = modulate(&layer_norm(&img, hid), &xm[3], &xm[4]);
            let h: Vec<f64> = wt.lin(&format!("{xb}.mlp.fc1"), &h, hid).into_iter().map(gelu_tanh).collect();
            let h = wt.lin(&format!("{xb}.mlp.fc2"), &h, cfg.mlp_hidden);
            gated_add(&mut img, &xm[5], &h);
        }
        let fm = wt.lin("final_layer.adaLN_modulation.1", &c, hid);
        let (shift, scale) = fm.split_at(hid);
        let out = wt.lin("final_layer.linear", &modulate(&layer_norm(&img, hid), shift, scale), hid);
        // unpatchify: [h, w, p, q, c] -> [c, h·p, w·q].
        let co = cfg.out_channels;
        let mut o = vec![0.0; co * hw.0 * hw.1];
        for r in 0..hh {
            for s in 0..ww {
                for py in 0..p {
                    for px in 0..p {
                        for ch in 0..co {
                            o[(ch * hw.0 + r * p + py) * hw.1 + s * p + px] = out[(r * ww + s) * p * p * co + (py * p + px) * co + ch];
                        }
                    }
                }
            }
        }
        o
    }
}

struct Inputs {
    x: Vec<f32>,
    ts: Vec<f32>,
    ctx: Vec<f32>,
    y: Vec<f32>,
    b: usize,
    hw: (usize, usize),
    t: usize,
}

fn inputs(cfg: &MmditConfig, hw: (usize, usize), seed: u64) -> Inputs {
    let mut rng = StdRng::seed_from_u64(seed);
    let (b, t) = (2, 5);
    Inputs {
        x: randn(&mut rng, b * cfg.in_channels * hw.0 * hw.1),
        ts: vec![1000.0 * 0.83, 1000.0 * 0.11],
        ctx: randn(&mut rng, b * t * cfg.context_dim),
        y: randn(&mut rng, b * cfg.adm_in_channels),
        b,
        hw,
        t,
    }
}

fn run(model: &Mmdit<CpuOps>, ops: &CpuOps, cfg: &MmditConfig, inp: &Inputs, hooks: &InputHooks) -> Result<Vec<f32>> {
    let x = ops.from_f32(&[inp.b, cfg.in_channels, inp.hw.0, inp.hw.1], &inp.x)?;
    let c = ops.from_f32(&[inp.b, inp.t, cfg.context_dim], &inp.ctx)?;
    let y = ops.from_f32(&[inp.b, cfg.adm_in_channels], &inp.y)?;
    let out = model.forward(ops, &x, &inp.ts, &c, &y, hooks)?;
    assert_eq!(ops.shape(&out), vec![inp.b, cfg.out_channels, inp.hw.0, inp.hw.1]);
    ops.to_f32(&out)
}

#[test]
fn forward_matches_naive_mmdit() {
    // Non-square latents: the position crop's top and left offsets differ.
    for (kind, hw) in [("sd3-medium", (6, 8)), ("3.5-medium", (8, 12)), ("3.5-large", (4, 10))] {
        let cfg = small(kind);
        let src = MapSource::random(layout(&cfg), 21);
        assert_eq!(MmditConfig::from_source(&src, "").unwrap(), cfg, "{kind}");
        let ops = CpuOps::new();
        let model = Mmdit::load(&ops, &src, "", cfg.clone()).unwrap();
        let inp = inputs(&cfg, hw, 4);
        let got = run(&model, &ops, &cfg, &inp, &InputHooks::none()).unwrap();

        let mut want = Vec::new();
        let (xn, cn) = (cfg.in_channels * hw.0 * hw.1, inp.t * cfg.context_dim);
        let f = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        for i in 0..inp.b {
            want.extend(naive::forward(
                &src,
                &cfg,
                &f(&inp.x[i * xn..(i + 1) * xn]),
                hw,
                inp.ts[i],
                &f(&inp.ctx[i * cn..(i + 1) * cn]),
                &f(&inp.y[i * cfg.adm_in_channels..(i + 1) * cfg.adm_in_channels]),
            ));
        }
        let err = rel_l2(&got, &want);
        eprintln!("{kind}: relative L2 error {err:e}");
        assert!(err < 1e-5, "{kind}: relative L2 error {err:e}");
        // The two batch rows differ (timestep, text, latents all reach the output).
        let half = got.len() / 2;
        assert!(rel_l2(&got[..half], &want[half..]) > 0.1, "{kind}");
    }
}

#[test]
fn layout_matches_the_sd3_manifest_and_configs_round_trip() {
    let plan = synth::plan(&SynthOptions { scale: Scale::Full, ..SynthOptions::new(Family::Sd3) }).unwrap();
    let want: Vec<(String, Vec<usize>)> = plan.into_iter().map(|t| (t.name, t.shape)).collect();
    assert_eq!(layout(&MmditConfig::sd3_medium()), want);
    let src = MapSource::shapes(want);
    assert_eq!(MmditConfig::from_source(&src, "").unwrap(), MmditConfig::sd3_medium());
    for cfg in [MmditConfig::sd35_medium(), MmditConfig::sd35_large()] {
        let src = MapSource::shapes(layout(&cfg));
        assert_eq!(MmditConfig::from_source(&src, "").unwrap(), cfg);
    }
    let params = |cfg: &MmditConfig| layout(cfg).iter().map(|(_, s)| s.iter().product::<usize>()).sum::<usize>();
    // Released sizes: 2.08 B (SD3-medium manifest), SD3.5-medium 2.47 B, SD3.5-large 8.06 B.
    assert_eq!(params(&MmditConfig::sd3_medium()), 2_084_951_104);
    let (m, l) = (params(&MmditConfig::sd35_medium()), params(&MmditConfig::sd35_large()));
    assert!((2_400_000_000..2_550_000_000).contains(&m), "{m}");
    assert!((8_000_000_000..8_150_000_000).contains(&l), "{l}");
    // SD3.5-medium's attn2 blocks modulate with 9 chunks, the last context block with 2.
    let s: BTreeMap<String, Vec<usize>> = layout(&MmditConfig::sd35_medium()).into_iter().collect();
    assert_eq!(s["joint_blocks.12.x_block.adaLN_modulation.1.weight"], vec![9 * 1536, 1536]);
    assert_eq!(s["joint_blocks.13.x_block.adaLN_modulation.1.weight"], vec![6 * 1536, 1536]);
    assert_eq!(s["joint_blocks.23.context_block.adaLN_modulation.1.weight"], vec![2 * 1536, 1536]);
    assert_eq!(s["joint_blocks.12.x_block.attn2.ln_k.weight"], vec![64]);
    assert!(!s.contains_key("joint_blocks.13.x_block.attn2.qkv.weight"));
    assert!(s.contains_key("joint_blocks.23.context_block.attn.ln_q.weight"));
    assert!(!s.contains_key("joint_blocks.23.context_block.attn.proj.weight"));
    assert_eq!(s["pos_embed"], vec![1, 384 * 384, 1536]);
}

#[test]
fn inconsistent_or_foreign_shapes_are_refused_clearly() {
    let err = |src: &MapSource, prefix: &str| format!("{:#}", MmditConfig::from_source(src, prefix).unwrap_err());
    let flux = MapSource::shapes(synth::plan(&SynthOptions::new(Family::Flux)).unwrap().into_iter().map(|t| (t.name, t.shape)));
    assert!(err(&flux, "").contains("FLUX"), "{}", err(&flux, ""));
    let unet = MapSource::shapes(synth::plan(&SynthOptions::new(Family::Sd15)).unwrap().into_iter().map(|t| (t.name, t.shape)));
    assert!(err(&unet, "").contains("UNet"));
    let full = SynthOptions { full_checkpoint: true, ..SynthOptions::new(Family::Sd3) };
    let full = MapSource::shapes(synth::plan(&full).unwrap().into_iter().map(|t| (t.name, t.shape)));
    assert!(err(&full, "").contains("model.diffusion_model."));
    assert!(MmditConfig::from_source(&full, "model.diffusion_model.").is_ok());

    let cfg = small("3.5-medium");
    let edit = |f: &dyn Fn(&mut HashMap<String, (Vec<usize>, Vec<u8>)>)| {
        let mut src = MapSource::shapes(layout(&cfg));
        f(&mut src.0);
        err(&src, "")
    };
    let e = edit(&|m| {
        m.remove("final_layer.linear.weight");
    });
    assert!(e.contains("`final_layer.linear.weight` is missing"), "{e}");
    let e = edit(&|m| {
        m.get_mut("x_embedder.proj.weight").unwrap().0 = vec![100, 16, 2, 2];
    });
    assert!(e.contains("not a multiple of the 64-wide heads"), "{e}");
    let e = edit(&|m| {
        m.get_mut("pos_embed").unwrap().0 = vec![1, 50, 128];
    });
    assert!(e.contains("`pos_embed`"), "{e}");
    let e = edit(&|m| {
        m.insert("joint_blocks.2.context_block.attn.proj.weight".into(), (vec![128, 128], vec![]));
    });
    assert!(e.contains("pre-only"), "{e}");
    let e = edit(&|m| {
        m.remove("joint_blocks.0.context_block.attn.proj.weight");
    });
    assert!(e.contains("joint_blocks.0.context_block"), "{e}");

    // A shape that disagrees with the configuration names the tensor at load.
    let mut src = MapSource::random(layout(&cfg), 1);
    src.0.get_mut("joint_blocks.1.x_block.attn2.ln_q.weight").unwrap().0 = vec![32];
    let e = Mmdit::load(&CpuOps::new(), &src, "", cfg.clone()).err().unwrap().to_string();
    assert!(e.contains("joint_blocks.1.x_block.attn2.ln_q.weight"), "{e}");
}

#[test]
fn bad_inputs_are_errors() {
    let cfg = small("sd3-medium");
    let src = MapSource::random(layout(&cfg), 2);
    let ops = CpuOps::new();
    let model = Mmdit::load(&ops, &src, "", cfg.clone()).unwrap();
    let go = |hw: (usize, usize), ts: Vec<f32>, ctx_dim: usize, adm: usize| -> String {
        let x = ops.from_f32(&[1, 16, hw.0, hw.1], &vec![0.0; 16 * hw.0 * hw.1]).unwrap();
        let c = ops.from_f32(&[1, 3, ctx_dim], &vec![0.0; 3 * ctx_dim]).unwrap();
        let y = ops.from_f32(&[1, adm], &vec![0.0; adm]).unwrap();
        model.forward(&ops, &x, &ts, &c, &y, &InputHooks::none()).err().map(|e| e.to_string()).unwrap_or_default()
    };
    assert!(go((5, 4), vec![1.0], 40, 24).contains("patch size"));
    assert!(go((14, 4), vec![1.0], 40, 24).contains("position table"));
    assert!(go((4, 4), vec![1.0, 2.0], 40, 24).contains("timesteps"));
    assert!(go((4, 4), vec![1.0], 41, 24).contains("context"));
    assert!(go((4, 4), vec![1.0], 40, 23).contains("y"));
    assert_eq!(go((12, 12), vec![1.0], 40, 24), "");
}

// ---------------------------------------------------------------------------
// Tiny synthetic checkpoints of every variant.

#[test]
fn tiny_synthetic_variants_run_and_hook_every_module_once() {
    for variant in ["medium", "3.5-medium", "3.5-large"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.safetensors");
        let o = SynthOptions { variant: Some(variant.into()), full_checkpoint: true, ..SynthOptions::new(Family::Sd3) };
        synth::write(&o, &path, |_, _| {}).unwrap();
        let ckpt = Checkpoint::open(&path).unwrap();
        let prefix = "model.diffusion_model.";
        let cfg = MmditConfig::from_source(&ckpt, prefix).unwrap();
        let (qk, attn2) = match variant {
            "medium" => (false, vec![]),
            "3.5-medium" => (true, (0..13).collect()),
            _ => (true, vec![]),
        };
        assert_eq!((cfg.qk_norm, &cfg.x_self_attn_layers), (qk, &attn2), "{variant}");
        assert_eq!(cfg.depth, if variant == "3.5-large" { 38 } else { 24 });
        let ops = CpuOps::new();
        let model = Mmdit::load(&ops, &ckpt, prefix, cfg.clone()).unwrap();

        let table = ModuleTable::build(&ckpt);
        let quantizable: Vec<_> = table.iter().filter(|m| matches!(m.kind, ModuleKind::Linear | ModuleKind::Conv)).collect();
        let mut hooks = InputHooks::none();
        let mut specs = Vec::new();
        for (slot, m) in quantizable.iter().enumerate() {
            hooks.by_module.insert(m.path.clone(), InputHook { observer: Some(slot), quant: None });
            specs.push(ObserverSpec {
                channels: m.weight_shape[1],
                axis: if m.kind == ModuleKind::Linear { ChannelAxis::Last } else { ChannelAxis::Dim1 },
            });
        }
        ops.observers_reset(&specs, 1).unwrap();
        let inp = inputs(&cfg, (16, 12), 3);
        let out = run(&model, &ops, &cfg, &inp, &hooks).unwrap();
        assert!(out.iter().all(|v| v.is_finite()), "{variant}");
        assert!(out.iter().any(|&v| v != 0.0), "{variant}");
        let stats = ops.observers_read().unwrap();
        for (m, s) in quantizable.iter().zip(&stats) {
            assert_eq!(s.calls, 1, "{variant}: `{}` observed {} times", m.path, s.calls);
            assert!(s.amax() > 0.0, "{variant}: `{}` saw only zeros", m.path);
        }
        let ours: Vec<String> = model.module_inputs().into_iter().map(|(p, _)| p).collect();
        let set: HashSet<&String> = ours.iter().collect();
        assert_eq!(set.len(), ours.len(), "{variant}: a module listed twice");
        let theirs: HashSet<&String> = quantizable.iter().map(|m| &m.path).collect();
        assert_eq!(set, theirs, "{variant}");
        assert_eq!(ours[0], "x_embedder.proj");
        assert_eq!(ours.last().unwrap(), "final_layer.linear");
        assert_eq!(model.module_inputs()[0].1, ObserverSpec { channels: 16, axis: ChannelAxis::Dim1 });
    }
}
