//! FLUX against a naive f64 implementation written from BFL's definitions
//! (`naive`), on a tiny configuration with random weights; and loading the
//! synthetic dev / schnell layouts.

use std::collections::HashMap;

use anyhow::anyhow;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use super::*;
use crate::checkpoint::Checkpoint;
use crate::formats::{SourceDtype, WeightView};
use crate::models::InputHook;
use crate::nn::cpu::CpuOps;
use crate::synth::{self, Family, Scale, SynthOptions};

/// Tensors by key as f32 values.
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
    /// Norm scales near 1, small biases, matrices scaled by 1/sqrt(fan-in).
    fn random(layout: &[(String, Vec<usize>)], seed: u64) -> MapSource {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut m = MapSource::default();
        for (k, s) in layout {
            let n: usize = s.iter().product();
            let fan_in = s.get(1).copied().unwrap_or(1) as f32;
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    let z: f32 = rng.sample(StandardNormal);
                    if k.ends_with(".scale") {
                        1.0 + 0.2 * z
                    } else if k.ends_with(".bias") {
                        0.1 * z
                    } else {
                        z / fan_in.sqrt()
                    }
                })
                .collect();
            m.0.insert(k.clone(), (s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()));
        }
        m
    }

    fn get(&self, key: &str) -> Vec<f64> {
        let (_, b) = &self.0[key];
        b.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect()
    }
}

fn tiny(guidance: bool) -> FluxConfig {
    FluxConfig {
        in_channels: 4,
        hidden: 64,
        heads: 2,
        head_dim: 32,
        depth: 2,
        depth_single: 2,
        mlp_hidden: 96,
        context_in_dim: 24,
        vec_in_dim: 12,
        guidance_embed: guidance,
        axes_dim: [4, 14, 14],
    }
}

fn randn(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.sample::<f32, _>(StandardNormal)).collect()
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

/// FLUX written out in f64 loops, one batch row at a time, from BFL's
/// `model.py` / `layers.py` / `math.py`.
mod naive {
    use super::MapSource;
    use crate::models::flux::FluxConfig;

    /// `[n, i] @ W[o, i]^T + b`.
    pub fn linear(x: &[f64], src: &MapSource, p: &str) -> Vec<f64> {
        let w = src.get(&format!("{p}.weight"));
        let b = src.get(&format!("{p}.bias"));
        let (o, i) = (b.len(), w.len() / b.len());
        x.chunks(i).flat_map(|row| (0..o).map(|j| b[j] + (0..i).map(|t| row[t] * w[j * i + t]).sum::<f64>()).collect::<Vec<_>>()).collect()
    }
    pub fn silu(v: f64) -> f64 {
        v / (1.0 + (-v).exp())
    }
    pub fn gelu_tanh(v: f64) -> f64 {
        0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
    }
    pub fn layer_norm(x: &[f64], c: usize) -> Vec<f64> {
        x.chunks(c)
            .flat_map(|r| {
                let m = r.iter().sum::<f64>() / c as f64;
                let var = r.iter().map(|v| (v - m).powi(2)).sum::<f64>() / c as f64;
                r.iter().map(move |v| (v - m) / (var + 1e-6).sqrt()).collect::<Vec<_>>()
            })
            .collect()
    }
    pub fn rms_norm(x: &[f64], scale: &[f64]) -> Vec<f64> {
        let d = scale.len();
        x.chunks(d)
            .flat_map(|r| {
                let ms = r.iter().map(|v| v * v).sum::<f64>() / d as f64;
                r.iter().zip(scale).map(move |(v, s)| v / (ms + 1e-6).sqrt() * s).collect::<Vec<_>>()
            })
            .collect()
    }
    /// `timestep_embedding(t, 256, time_factor=1000)`.
    pub fn time_emb(t: f64) -> Vec<f64> {
        let half = 128;
        let t = 1000.0 * t;
        let f = |i: usize| (-(10000f64.ln()) * i as f64 / half as f64).exp();
        (0..half).map(|i| (t * f(i)).cos()).chain((0..half).map(|i| (t * f(i)).sin())).collect()
    }
    pub fn mlp_embed(x: &[f64], src: &MapSource, p: &str) -> Vec<f64> {
        let h: Vec<f64> = linear(x, src, &format!("{p}.in_layer")).into_iter().map(silu).collect();
        linear(&h, src, &format!("{p}.out_layer"))
    }
    /// `(1 + scale) * x + shift` per token row.
    pub fn modulate(x: &[f64], shift: &[f64], scale: &[f64]) -> Vec<f64> {
        let c = shift.len();
        x.iter().enumerate().map(|(i, v)| (1.0 + scale[i % c]) * v + shift[i % c]).collect()
    }
    /// `apply_rope` then SDPA, `[N, H*D]` q/k/v with their position ids.
    pub fn attention(q: &[f64], k: &[f64], v: &[f64], ids: &[[f64; 3]], cfg: &FluxConfig) -> Vec<f64> {
        let (hd, d) = (cfg.hidden, cfg.head_dim);
        let n = ids.len();
        // Each pair (2i, 2i+1) of a head is a complex number rotated by pos * omega.
        let mut freqs = Vec::new();
        for (axis, &dim) in cfg.axes_dim.iter().enumerate() {
            for kk in 0..dim / 2 {
                freqs.push((axis, 10000f64.powf(-(2.0 * kk as f64) / dim as f64)));
            }
        }
        let rot = |x: &[f64]| -> Vec<f64> {
            let mut y = x.to_vec();
            for (t, id) in ids.iter().enumerate().take(n) {
                for h in 0..cfg.heads {
                    for (i, &(axis, om)) in freqs.iter().enumerate() {
                        let a = id[axis] * om;
                        let p = t * hd + h * d + 2 * i;
                        y[p] = a.cos() * x[p] - a.sin() * x[p + 1];
                        y[p + 1] = a.sin() * x[p] + a.cos() * x[p + 1];
                    }
                }
            }
            y
        };
        let (q, k) = (rot(q), rot(k));
        let mut out = vec![0.0; n * hd];
        for h in 0..cfg.heads {
            for i in 0..n {
                let s: Vec<f64> = (0..n)
                    .map(|j| (0..d).map(|e| q[i * hd + h * d + e] * k[j * hd + h * d + e]).sum::<f64>() / (d as f64).sqrt())
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                for e in 0..d {
                    out[i * hd + h * d + e] = (0..n).map(|j| (s[j] - m).exp() / z * v[j * hd + h * d + e]).sum();
                }
            }
        }
        out
    }

    /// Columns `a..a+len` of every `width`-wide row.
    pub fn cols(x: &[f64], width: usize, a: usize, len: usize) -> Vec<f64> {
        x.chunks(width).flat_map(|r| r[a..a + len].to_vec()).collect()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        src: &MapSource,
        cfg: &FluxConfig,
        x: &[f64],
        (c, hh, ww): (usize, usize, usize),
        t: f64,
        ctx: &[f64],
        y: &[f64],
        g: Option<f64>,
    ) -> Vec<f64> {
        let (h, w, hd) = (hh / 2, ww / 2, cfg.hidden);
        // b c (h ph) (w pw) -> b (h w) (c ph pw)
        let mut img_tokens = Vec::new();
        for r in 0..h {
            for col in 0..w {
                for ch in 0..c {
                    for ph in 0..2 {
                        for pw in 0..2 {
                            img_tokens.push(x[(ch * hh + 2 * r + ph) * ww + 2 * col + pw]);
                        }
                    }
                }
            }
        }
        let mut img = linear(&img_tokens, src, "img_in");
        let mut vec = mlp_embed(&time_emb(t), src, "time_in");
        if let Some(g) = g {
            vec.iter_mut().zip(mlp_embed(&time_emb(g), src, "guidance_in")).for_each(|(a, b)| *a += b);
        }
        vec.iter_mut().zip(mlp_embed(y, src, "vector_in")).for_each(|(a, b)| *a += b);
        let mut txt = linear(ctx, src, "txt_in");
        let t_len = txt.len() / hd;
        let mut ids: Vec<[f64; 3]> = vec![[0.0; 3]; t_len];
        for r in 0..h {
            for col in 0..w {
                ids.push([0.0, r as f64, col as f64]);
            }
        }
        let svec: Vec<f64> = vec.iter().copied().map(silu).collect();
        let qk_norm = |x: &[f64], p: &str| rms_norm(x, &src.get(&format!("{p}.scale")));
        for n in 0..cfg.depth {
            let b = format!("double_blocks.{n}");
            let prep = |x: &[f64], s: &str| {
                let m = linear(&svec, src, &format!("{b}.{s}_mod.lin"));
                let xm = modulate(&layer_norm(x, hd), &m[0..hd], &m[hd..2 * hd]);
                let qkv = linear(&xm, src, &format!("{b}.{s}_attn.qkv"));
                let q = qk_norm(&cols(&qkv, 3 * hd, 0, hd), &format!("{b}.{s}_attn.norm.query_norm"));
                let k = qk_norm(&cols(&qkv, 3 * hd, hd, hd), &format!("{b}.{s}_attn.norm.key_norm"));
                (m, q, k, cols(&qkv, 3 * hd, 2 * hd, hd))
            };
            let (im, iq, ik, iv) = prep(&img, "img");
            let (tm, tq, tk, tv) = prep(&txt, "txt");
            let cat = |a: &[f64], b: &[f64]| [a, b].concat();
            let attn = attention(&cat(&tq, &iq), &cat(&tk, &ik), &cat(&tv, &iv), &ids, cfg);
            let post = |x: &[f64], a: &[f64], m: &[f64], s: &str| -> Vec<f64> {
                let p = linear(a, src, &format!("{b}.{s}_attn.proj"));
                let x: Vec<f64> = x.iter().zip(&p).enumerate().map(|(i, (x, p))| x + m[2 * hd + i % hd] * p).collect();
                let xm = modulate(&layer_norm(&x, hd), &m[3 * hd..4 * hd], &m[4 * hd..5 * hd]);
                let hmid: Vec<f64> = linear(&xm, src, &format!("{b}.{s}_mlp.0")).into_iter().map(gelu_tanh).collect();
                let o = linear(&hmid, src, &format!("{b}.{s}_mlp.2"));
                x.iter().zip(&o).enumerate().map(|(i, (x, o))| x + m[5 * hd + i % hd] * o).collect()
            };
            let img_new = post(&img, &attn[t_len * hd..], &im, "img");
            let txt_new = post(&txt, &attn[..t_len * hd], &tm, "txt");
            img = img_new;
            txt = txt_new;
        }
        let mut x = [txt, img].concat();
        let mlp = cfg.mlp_hidden;
        for n in 0..cfg.depth_single {
            let b = format!("single_blocks.{n}");
            let m = linear(&svec, src, &format!("{b}.modulation.lin"));
            let xm = modulate(&layer_norm(&x, hd), &m[0..hd], &m[hd..2 * hd]);
            let l1 = linear(&xm, src, &format!("{b}.linear1"));
            let wd = 3 * hd + mlp;
            let q = qk_norm(&cols(&l1, wd, 0, hd), &format!("{b}.norm.query_norm"));
            let k = qk_norm(&cols(&l1, wd, hd, hd), &format!("{b}.norm.key_norm"));
            let attn = attention(&q, &k, &cols(&l1, wd, 2 * hd, hd), &ids, cfg);
            let act: Vec<f64> = cols(&l1, wd, 3 * hd, mlp).into_iter().map(gelu_tanh).collect();
            let cat: Vec<f64> = attn.chunks(hd).zip(act.chunks(mlp)).flat_map(|(a, b)| [a, b].concat()).collect();
            let o = linear(&cat, src, &format!("{b}.linear2"));
            x = x.iter().zip(&o).enumerate().map(|(i, (x, o))| x + m[2 * hd + i % hd] * o).collect();
        }
        let img = &x[t_len * hd..];
        let m = linear(&svec, src, "final_layer.adaLN_modulation.1");
        let xm = modulate(&layer_norm(img, hd), &m[0..hd], &m[hd..2 * hd]);
        let o = linear(&xm, src, "final_layer.linear");
        // b (h w) (c ph pw) -> b c (h ph) (w pw)
        let mut out = vec![0.0; c * hh * ww];
        for r in 0..h {
            for col in 0..w {
                for ch in 0..c {
                    for ph in 0..2 {
                        for pw in 0..2 {
                            out[(ch * hh + 2 * r + ph) * ww + 2 * col + pw] = o[(r * w + col) * c * 4 + ch * 4 + ph * 2 + pw];
                        }
                    }
                }
            }
        }
        out
    }
}

#[test]
fn forward_matches_naive_reference() {
    let ops = CpuOps::new();
    for guidance in [true, false] {
        let cfg = tiny(guidance);
        let layout = bfl_layout(&cfg);
        let src = MapSource::random(&layout, 7);
        assert_eq!(FluxConfig::from_source(&src, "").unwrap(), cfg);
        let flux = Flux::load(&ops, &src, "", cfg.clone()).unwrap();
        let (b, c, hh, ww, t_len) = (2, 4, 6, 4, 5);
        let mut rng = StdRng::seed_from_u64(8);
        let x = randn(&mut rng, b * c * hh * ww);
        let ctx = randn(&mut rng, b * t_len * cfg.context_in_dim);
        let y = randn(&mut rng, b * cfg.vec_in_dim);
        let ts = [0.8f32, 0.25];
        let gs = [3.5f32, 1.0];
        let out = flux
            .forward(
                &ops,
                &ops.from_f32(&[b, c, hh, ww], &x).unwrap(),
                &ts,
                &ops.from_f32(&[b, t_len, cfg.context_in_dim], &ctx).unwrap(),
                &ops.from_f32(&[b, cfg.vec_in_dim], &y).unwrap(),
                guidance.then_some(&gs[..]),
                &InputHooks::none(),
            )
            .unwrap();
        assert_eq!(ops.shape(&out), vec![b, c, hh, ww]);
        let got = ops.to_f32(&out).unwrap();
        let f = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let per = |v: &[f32], i: usize, n: usize| f(&v[i * n..(i + 1) * n]);
        let mut want = Vec::new();
        for i in 0..b {
            want.extend(naive::forward(
                &src,
                &cfg,
                &per(&x, i, c * hh * ww),
                (c, hh, ww),
                ts[i] as f64,
                &per(&ctx, i, t_len * cfg.context_in_dim),
                &per(&y, i, cfg.vec_in_dim),
                guidance.then(|| gs[i] as f64),
            ));
        }
        let e = rel_l2(&got, &want);
        println!("guidance={guidance}: relative L2 vs naive f64 {e:.2e}");
        assert!(e < 1e-5, "FLUX (guidance={guidance}) differs from the naive reference: relative L2 {e:.3e}");
        // The output depends on the timestep and the guidance: a wrong time factor or ignored guidance shows.
        let again = |ts: &[f32], g: Option<&[f32]>| {
            ops.to_f32(
                &flux
                    .forward(
                        &ops,
                        &ops.from_f32(&[b, c, hh, ww], &x).unwrap(),
                        ts,
                        &ops.from_f32(&[b, t_len, cfg.context_in_dim], &ctx).unwrap(),
                        &ops.from_f32(&[b, cfg.vec_in_dim], &y).unwrap(),
                        g,
                        &InputHooks::none(),
                    )
                    .unwrap(),
            )
            .unwrap()
        };
        assert!(rel_l2(&again(&[0.8, 0.26], guidance.then_some(&gs[..])), &want) > 1e-4);
        if guidance {
            assert!(rel_l2(&again(&ts, Some(&[3.5, 1.1])), &want) > 1e-4);
        }
    }
}

#[test]
fn hooks_see_every_linear_in_forward_order() {
    let ops = CpuOps::new();
    let cfg = tiny(true);
    let src = MapSource::random(&bfl_layout(&cfg), 9);
    let flux = Flux::load(&ops, &src, "", cfg.clone()).unwrap();
    let modules = flux.module_inputs();
    // Every Linear weight of the layout is a module, once.
    let linears: Vec<String> = bfl_layout(&cfg)
        .into_iter()
        .filter(|(k, s)| s.len() == 2 && k.ends_with(".weight"))
        .map(|(k, _)| k.trim_end_matches(".weight").to_string())
        .collect();
    let mut names: Vec<String> = modules.iter().map(|(n, _)| n.clone()).collect();
    let mut sorted = linears.clone();
    sorted.sort();
    names.sort();
    assert_eq!(names, sorted);
    ops.observers_reset(&modules.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>(), 1).unwrap();
    let mut hooks = InputHooks::none();
    for (i, (n, _)) in modules.iter().enumerate() {
        hooks.by_module.insert(n.clone(), InputHook { observer: Some(i), quant: None });
    }
    hooks.recorded = Some(Default::default());
    let mut rng = StdRng::seed_from_u64(10);
    let (b, t_len) = (1, 3);
    let x = ops.from_f32(&[b, 4, 4, 4], &randn(&mut rng, 64)).unwrap();
    let ctx = ops.from_f32(&[b, t_len, 24], &randn(&mut rng, t_len * 24)).unwrap();
    let y = ops.from_f32(&[b, 12], &randn(&mut rng, 12)).unwrap();
    flux.forward(&ops, &x, &[0.5], &ctx, &y, Some(&[3.5]), &hooks).unwrap();
    let stats = ops.observers_read().unwrap();
    for ((n, spec), s) in modules.iter().zip(&stats) {
        assert_eq!(s.calls, 1, "{n} observed {} times", s.calls);
        assert_eq!(s.channel_amax.len(), spec.channels);
        assert!(s.amax() > 0.0, "{n} saw only zeros");
    }
    assert_eq!(hooks.recorded.unwrap().into_inner().len(), modules.len());
    // Module paths are the weight keys without `.weight`: the qkv input is the modulated hidden state.
    assert!(modules.iter().any(|(n, s)| n == "double_blocks.0.img_attn.qkv" && s.channels == 64));
    assert!(modules.iter().any(|(n, s)| n == "single_blocks.1.linear2" && s.channels == 64 + 96));
}

#[test]
fn bad_shapes_and_inputs_are_clear_errors() {
    let ops = CpuOps::new();
    let cfg = tiny(false);
    let mut layout = bfl_layout(&cfg);
    // ComfyUI-saved norm names (`.weight`) load as well.
    for (k, _) in layout.iter_mut() {
        if k.ends_with("_norm.scale") {
            *k = k.replace("_norm.scale", "_norm.weight");
        }
    }
    let src = MapSource::random(&layout, 11);
    assert_eq!(FluxConfig::from_source(&src, "").unwrap(), cfg);
    let flux = Flux::load(&ops, &src, "", cfg.clone()).unwrap();
    let x = ops.from_f32(&[1, 4, 4, 4], &[0.1; 64]).unwrap();
    let ctx = ops.from_f32(&[1, 2, 24], &[0.1; 48]).unwrap();
    let y = ops.from_f32(&[1, 12], &[0.1; 12]).unwrap();
    let none = InputHooks::none();
    fn err<T>(r: Result<T>) -> String {
        format!("{:#}", r.err().expect("must fail"))
    }
    assert!(err(flux.forward(&ops, &x, &[0.5], &ctx, &y, Some(&[3.5]), &none)).contains("no guidance embedder"));
    let odd = ops.from_f32(&[1, 4, 3, 4], &[0.1; 48]).unwrap();
    assert!(err(flux.forward(&ops, &odd, &[0.5], &ctx, &y, None, &none)).contains("patch"));
    let bad_y = ops.from_f32(&[1, 11], &[0.1; 11]).unwrap();
    assert!(err(flux.forward(&ops, &x, &[0.5], &ctx, &bad_y, None, &none)).contains("y [1, 11]"));
    assert!(err(flux.forward(&ops, &x, &[0.5, 0.5], &ctx, &y, None, &none)).contains("timesteps"));
    // A wrong-shaped weight names the tensor.
    let mut bad = MapSource::random(&layout, 12);
    bad.0.insert("single_blocks.1.linear2.weight".into(), (vec![64, 100], vec![0; 64 * 100 * 4]));
    let e = err(Flux::load(&ops, &bad, "", cfg.clone()));
    assert!(e.contains("single_blocks.1.linear2.weight"), "{e}");
    // Not FLUX at all.
    assert!(err(FluxConfig::from_source(&MapSource::default(), "")).contains("not a FLUX model"));
    let dev = tiny(true);
    let src = MapSource::random(&bfl_layout(&dev), 13);
    let flux = Flux::load(&ops, &src, "", dev).unwrap();
    assert!(err(flux.forward(&ops, &x, &[0.5], &ctx, &y, None, &none)).contains("embeds guidance"));
}

#[test]
fn rope_tables_follow_bfl_ids() {
    let cfg = tiny(true);
    let (cos, sin) = rope_tables(&cfg, 2, 2, 3);
    let half = cfg.head_dim / 2;
    assert_eq!(cos.len(), 8 * half);
    // Text tokens: angle 0 everywhere.
    assert!(cos[..2 * half].iter().all(|&c| c == 1.0) && sin[..2 * half].iter().all(|&s| s == 0.0));
    // Image token 4 = (row 1, col 1): axis 0 (first 2 freqs) is 0, axis 1's first freq is 1 rad,
    // axis 2's first freq is 1 rad, axis 1's second freq is 10000^(-2/14).
    let t = 2 + 4;
    assert_eq!(cos[t * half], 1.0);
    assert!((sin[t * half + 2] - 1f32.sin()).abs() < 1e-7);
    assert!((sin[t * half + 2 + 7] - 1f32.sin()).abs() < 1e-7);
    assert!((sin[t * half + 3] - (10000f64.powf(-2.0 / 14.0)).sin() as f32).abs() < 1e-7);
    // Image token 5 = (row 1, col 2): axis 2's first angle is 2 rad.
    assert!((sin[(t + 1) * half + 2 + 7] - 2f32.sin()).abs() < 1e-7);
}

#[test]
fn synthetic_dev_and_schnell_load_and_run() {
    let ops = CpuOps::new();
    let dir = tempfile::tempdir().unwrap();
    for variant in ["dev", "schnell"] {
        let path = dir.path().join(format!("flux-{variant}.safetensors"));
        let opts = SynthOptions { variant: Some(variant.into()), ..SynthOptions::new(Family::Flux) };
        assert_eq!(opts.scale, Scale::Tiny);
        synth::write(&opts, &path, |_, _| {}).unwrap();
        let ckpt = Checkpoint::open(&path).unwrap();
        let cfg = FluxConfig::from_source(&ckpt, "").unwrap();
        assert_eq!((cfg.depth, cfg.depth_single, cfg.head_dim), (19, 38, 128));
        assert_eq!((cfg.in_channels, cfg.context_in_dim, cfg.vec_in_dim), (16, 4096, 768));
        assert_eq!(cfg.axes_dim, [16, 56, 56]);
        assert_eq!(cfg.guidance_embed, variant == "dev");
        let flux = Flux::load(&ops, &ckpt, "", cfg.clone()).unwrap();
        let mut rng = StdRng::seed_from_u64(14);
        let x = ops.from_f32(&[1, 16, 4, 4], &randn(&mut rng, 256)).unwrap();
        let ctx = ops.from_f32(&[1, 3, 4096], &randn(&mut rng, 3 * 4096)).unwrap();
        let y = ops.from_f32(&[1, 768], &randn(&mut rng, 768)).unwrap();
        let g = [3.5f32];
        let out = flux.forward(&ops, &x, &[0.7], &ctx, &y, cfg.guidance_embed.then_some(&g[..]), &InputHooks::none()).unwrap();
        assert_eq!(ops.shape(&out), vec![1, 16, 4, 4]);
        let v = ops.to_f32(&out).unwrap();
        assert!(v.iter().all(|a| a.is_finite()) && v.iter().any(|&a| a != 0.0), "{variant}: {v:?}");
    }
}
