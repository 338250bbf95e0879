//! The CUDA backend's diffusion-transformer and T5 operations (`rms_norm`,
//! `mul`, `narrow`, `permute`, `modulate`, `gated_add`, `rope`,
//! `attention_biased`, `Act::GeluTanh`, the fused `ln_modulate`, `qkv_heads`,
//! `concat_act`) and its fused attention at FLUX and SD3
//! sizes, against f64 loops over the same bf16-rounded inputs the GPU sees
//! (the pattern of tests/nn_gpu.rs, whose `nn_kernels_compile_with_nvrtc`
//! also compiles these kernels). Without a GPU every test prints why and
//! passes, unless `QUANTSMITH_REQUIRE_GPU=1`.

mod common;

use std::sync::OnceLock;

use quantsmith::nn::cuda::{self as nncuda, CudaOps, FlashVariant};
use quantsmith::nn::{Act, Ops};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn gpu() -> Option<(&'static CudaOps, std::sync::MutexGuard<'static, ()>)> {
    static OPS: OnceLock<Option<CudaOps>> = OnceLock::new();
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let o = OPS.get_or_init(|| common::gpu_or_skip("CUDA nn backend (DiT ops)", CudaOps::new(0))).as_ref()?;
    Some((o, LOCK.lock().unwrap_or_else(|p| p.into_inner())))
}

fn bf(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

fn randn(rng: &mut StdRng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| bf(rng.sample::<f32, _>(StandardNormal) * s)).collect()
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(1e-30)).sqrt()
}

#[track_caller]
fn close(what: &str, got: &[f32], want: &[f64]) {
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    let e = rel_l2(got, want);
    println!("{what}: relative L2 {e:.2e}");
    assert!(e <= 1e-2, "{what}: relative L2 {e:.3e} > 1e-2");
}

fn up(o: &CudaOps, shape: &[usize], v: &[f32]) -> <CudaOps as Ops>::Tensor {
    o.from_f32(shape, v).unwrap()
}

fn down(o: &CudaOps, t: &<CudaOps as Ops>::Tensor) -> Vec<f32> {
    o.to_f32(t).unwrap()
}

/// Attention of query rows `rows` only (f64), with an optional `[heads, nq, nk]` bias.
#[allow(clippy::too_many_arguments)]
fn ref_attention_rows(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&[f32]>,
    (b, nq, nk, heads, d): (usize, usize, usize, usize, usize),
    scale: f64,
    rows: &[usize],
) -> Vec<f64> {
    let w = heads * d;
    let mut out = Vec::with_capacity(b * rows.len() * w);
    for bi in 0..b {
        for &i in rows {
            let mut row = vec![0f64; w];
            for h in 0..heads {
                let s: Vec<f64> = (0..nk)
                    .map(|j| {
                        let dot: f64 =
                            (0..d).map(|e| q[(bi * nq + i) * w + h * d + e] as f64 * k[(bi * nk + j) * w + h * d + e] as f64).sum();
                        scale * dot + bias.map_or(0.0, |bs| bs[(h * nq + i) * nk + j] as f64)
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = p.iter().sum();
                for e in 0..d {
                    row[h * d + e] = (0..nk).map(|j| p[j] / z * v[(bi * nk + j) * w + h * d + e] as f64).sum();
                }
            }
            out.extend(row);
        }
    }
    out
}

/// The rows `rows` of each batch item of `[b, n, w]` data.
fn pick_rows(x: &[f32], b: usize, n: usize, w: usize, rows: &[usize]) -> Vec<f32> {
    (0..b).flat_map(|bi| rows.iter().flat_map(move |&i| x[(bi * n + i) * w..(bi * n + i + 1) * w].to_vec())).collect()
}

#[test]
fn rms_norm_and_elementwise_match_reference() {
    let Some((o, _g)) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(11);
    // T5-XXL width, FLUX head width (q/k norm per head), SD3.5 head width.
    for &(rows, cols) in &[(2 * 77, 4096), (4608 * 3, 128), (33, 64)] {
        let x = randn(&mut rng, rows * cols, 1.5);
        let w = randn(&mut rng, cols, 1.0);
        let y = o.rms_norm(&up(o, &[rows, cols], &x), &up(o, &[cols], &w), 1e-6).unwrap();
        let mut want = vec![0f64; x.len()];
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let rstd = 1.0 / (row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64 + 1e-6).sqrt();
            for c in 0..cols {
                want[r * cols + c] = row[c] as f64 * rstd * w[c] as f64;
            }
        }
        close(&format!("rms_norm {rows}x{cols}"), &down(o, &y), &want);
    }
    let n = 2 * 77 * 33 + 5; // not a multiple of 8: the scalar tail
    let a = randn(&mut rng, n, 2.0);
    let b = randn(&mut rng, n, 2.0);
    let want: Vec<f64> = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).collect();
    close("mul", &down(o, &o.mul(&up(o, &[n], &a), &up(o, &[n], &b)).unwrap()), &want);
    let gelu_tanh = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
    let want: Vec<f64> = a.iter().map(|&x| gelu_tanh(x as f64)).collect();
    close("gelu_tanh", &down(o, &o.act(&up(o, &[n], &a), Act::GeluTanh).unwrap()), &want);

    // adaLN modulation and gated residual, [B, N, C] with [B, C] rows.
    let (bn, nt, c) = (2, 300, 3072);
    let x = randn(&mut rng, bn * nt * c, 1.0);
    let y = randn(&mut rng, bn * nt * c, 1.0);
    let shift = randn(&mut rng, bn * c, 1.0);
    let scale = randn(&mut rng, bn * c, 0.5);
    let bc = |i: usize| (i / (nt * c)) * c + i % c;
    let want: Vec<f64> = (0..x.len()).map(|i| x[i] as f64 * (1.0 + scale[bc(i)] as f64) + shift[bc(i)] as f64).collect();
    let (xt, st, sct) = (up(o, &[bn, nt, c], &x), up(o, &[bn, c], &shift), up(o, &[bn, c], &scale));
    close("modulate", &down(o, &o.modulate(&xt, &st, &sct).unwrap()), &want);
    let want: Vec<f64> = (0..x.len()).map(|i| x[i] as f64 + scale[bc(i)] as f64 * y[i] as f64).collect();
    close("gated_add", &down(o, &o.gated_add(&xt, &sct, &up(o, &[bn, nt, c], &y)).unwrap()), &want);
    assert!(o.modulate(&xt, &up(o, &[1, c], &shift[..c]), &sct).is_err());
}

#[test]
fn narrow_and_permute_are_exact() {
    let Some((o, _g)) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(12);
    let dims = [2usize, 5, 3, 7];
    let x = randn(&mut rng, dims.iter().product(), 1.0);
    let xt = up(o, &dims, &x);
    let strides = |d: &[usize]| {
        let mut s = vec![1usize; d.len()];
        for i in (0..d.len() - 1).rev() {
            s[i] = s[i + 1] * d[i + 1];
        }
        s
    };
    let unravel = |mut i: usize, d: &[usize]| {
        let mut idx = vec![0; d.len()];
        for k in (0..d.len()).rev() {
            idx[k] = i % d[k];
            i /= d[k];
        }
        idx
    };
    let s = strides(&dims);
    for (dim, start, len) in [(0, 1, 1), (1, 2, 3), (2, 0, 3), (3, 3, 4), (3, 6, 1)] {
        let mut od = dims.to_vec();
        od[dim] = len;
        let want: Vec<f32> = (0..od.iter().product::<usize>())
            .map(|i| {
                let mut idx = unravel(i, &od);
                idx[dim] += start;
                x[idx.iter().zip(&s).map(|(a, b)| a * b).sum::<usize>()]
            })
            .collect();
        let y = o.narrow(&xt, dim, start, len).unwrap();
        assert_eq!(o.shape(&y), od);
        assert_eq!(down(o, &y), want, "narrow dim {dim} {start}+{len}");
    }
    assert!(o.narrow(&xt, 1, 4, 2).is_err());
    // FLUX's patchify `b c (h ph) (w pw) -> b h w c ph pw` and its inverse, plus a 6-d reversal.
    let d6 = [2usize, 16, 6, 2, 5, 2];
    let x6 = randn(&mut rng, d6.iter().product(), 1.0);
    let s6 = strides(&d6);
    let x6t = up(o, &d6, &x6);
    for perm in [[0usize, 2, 4, 1, 3, 5], [5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5]] {
        let od: Vec<usize> = perm.iter().map(|&p| d6[p]).collect();
        let want: Vec<f32> =
            (0..x6.len()).map(|i| unravel(i, &od).iter().zip(&perm).map(|(&v, &p)| v * s6[p]).sum::<usize>()).map(|src| x6[src]).collect();
        let y = o.permute(&x6t, &perm).unwrap();
        assert_eq!(o.shape(&y), od);
        assert_eq!(down(o, &y), want, "permute {perm:?}");
    }
    assert!(o.permute(&x6t, &[0, 0, 1, 2, 3, 4]).is_err());
}

#[test]
fn rope_matches_reference() {
    let Some((o, _g)) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(13);
    for &(b, n, heads, d) in &[(1, 4608, 3, 128), (2, 333, 4, 64)] {
        let half = d / 2;
        let x = randn(&mut rng, b * n * heads * d, 1.0);
        // Angles as FLUX's positions give them; bf16 cos/sin as the GPU holds them.
        let ang: Vec<f32> = (0..n * half).map(|i| (i / half) as f32 * 0.37f32.powi((i % half) as i32 % 12)).collect();
        let cos: Vec<f32> = ang.iter().map(|a| bf(a.cos())).collect();
        let sin: Vec<f32> = ang.iter().map(|a| bf(a.sin())).collect();
        let mut want = vec![0f64; x.len()];
        for row in 0..b * n {
            let t = row % n;
            for h in 0..heads {
                for i in 0..half {
                    let p = row * heads * d + h * d + 2 * i;
                    let (c, s) = (cos[t * half + i] as f64, sin[t * half + i] as f64);
                    want[p] = c * x[p] as f64 - s * x[p + 1] as f64;
                    want[p + 1] = s * x[p] as f64 + c * x[p + 1] as f64;
                }
            }
        }
        let y = o.rope(&up(o, &[b, n, heads * d], &x), &up(o, &[n, half], &cos), &up(o, &[n, half], &sin), heads).unwrap();
        close(&format!("rope b{b} n{n} h{heads} d{d}"), &down(o, &y), &want);
    }
}

#[test]
fn attention_biased_matches_reference() {
    let Some((o, _g)) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(14);
    // (batch, queries, keys, heads, head dim, scale, chunk bytes)
    let cases = [
        (2, 77, 77, 4, 64, 1.0f32, None),       // T5 at ComfyUI's FLUX prompt length
        (1, 512, 512, 2, 64, 1.0, None),        // T5 at 512 tokens
        (1, 512, 512, 2, 128, 0.125, None),     // head dim 128
        (2, 100, 60, 3, 40, 0.3, Some(50_000)), // head and query chunks
    ];
    for &(b, nq, nk, heads, d, scale, chunk) in &cases {
        let w = heads * d;
        let q = randn(&mut rng, b * nq * w, 0.5);
        let k = randn(&mut rng, b * nk * w, 0.5);
        let v = randn(&mut rng, b * nk * w, 1.0);
        let bias = randn(&mut rng, heads * nq * nk, 2.0);
        o.set_attention_chunk_bytes(chunk.unwrap_or(nncuda::ATTENTION_SCORE_BYTES));
        let y = o
            .attention_biased(
                &up(o, &[b, nq, w], &q),
                &up(o, &[b, nk, w], &k),
                &up(o, &[b, nk, w], &v),
                heads,
                &up(o, &[heads, nq, nk], &bias),
                scale,
            )
            .unwrap();
        o.set_attention_chunk_bytes(nncuda::ATTENTION_SCORE_BYTES);
        let rows: Vec<usize> = (0..nq).collect();
        let want = ref_attention_rows(&q, &k, &v, Some(&bias), (b, nq, nk, heads, d), scale as f64, &rows);
        close(&format!("attention_biased b{b} q{nq} k{nk} h{heads} d{d} chunk={chunk:?}"), &down(o, &y), &want);
    }
}

/// The fused (flash) attention at the sizes the DiTs run: FLUX 1024² (4096
/// image + 512 text tokens, head dim 128) and SD3 (4096 + 154 tokens, head
/// dim 64); a sample of query rows is checked against f64.
#[test]
fn fused_attention_at_dit_sizes() {
    let Some((o, _g)) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(15);
    o.set_flash_attention(true);
    for (variant, &(n, heads, d)) in FlashVariant::ALL.into_iter().flat_map(|v| [(v, &(4608, 2, 128)), (v, &(4250, 2, 64))]) {
        o.set_flash_variant(variant);
        let w = heads * d;
        let q = randn(&mut rng, n * w, 1.0);
        let k = randn(&mut rng, n * w, 1.0);
        let v = randn(&mut rng, n * w, 1.0);
        let y = o.attention(&up(o, &[1, n, w], &q), &up(o, &[1, n, w], &k), &up(o, &[1, n, w], &v), heads, false).unwrap();
        let rows: Vec<usize> = vec![0, 1, 63, 64, 511, 512, 2047, 4095, n - 65, n - 1];
        let want = ref_attention_rows(&q, &k, &v, None, (1, n, n, heads, d), 1.0 / (d as f64).sqrt(), &rows);
        close(&format!("fused attention {variant:?} n{n} h{heads} d{d}"), &pick_rows(&down(o, &y), 1, n, w, &rows), &want);
    }
    o.set_flash_variant(FlashVariant::DEFAULT);
}

/// FLUX (a 2 + 2 block model of FLUX's head width 128, random weights written
/// in the BFL layout) on the GPU in bf16 against the CPU backend in f32 (itself
/// checked against a naive f64 FLUX in `models::flux`), weights rounded to
/// bf16 on both sides.
#[test]
fn flux_matches_cpu_ops() {
    use quantsmith::checkpoint::Checkpoint;
    use quantsmith::models::InputHooks;
    use quantsmith::models::flux::{Flux, FluxConfig, bfl_layout};
    use quantsmith::nn::cpu::CpuOps;

    let Some((o, _g)) = gpu() else { return };
    let cfg = FluxConfig {
        in_channels: 16,
        hidden: 256,
        heads: 2,
        head_dim: 128,
        depth: 2,
        depth_single: 2,
        mlp_hidden: 1024,
        context_in_dim: 64,
        vec_in_dim: 32,
        guidance_embed: true,
        axes_dim: [16, 56, 56],
    };
    let mut rng = StdRng::seed_from_u64(16);
    let layout = bfl_layout(&cfg);
    let data: Vec<Vec<u8>> = layout
        .iter()
        .map(|(k, s)| {
            let n: usize = s.iter().product();
            let fan_in = s.get(1).copied().unwrap_or(1) as f32;
            randn(&mut rng, n, 1.0)
                .into_iter()
                .map(|z| {
                    if k.ends_with(".scale") {
                        bf(1.0 + 0.2 * z)
                    } else if k.ends_with(".bias") {
                        bf(0.1 * z)
                    } else {
                        bf(z / fan_in.sqrt())
                    }
                })
                .flat_map(|v| v.to_le_bytes())
                .collect()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flux-small.safetensors");
    let views: Vec<(String, safetensors::tensor::TensorView)> = layout
        .iter()
        .zip(&data)
        .map(|((k, s), d)| (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(FluxConfig::from_source(&ckpt, "").unwrap(), cfg);

    // Batch 2, and batch 1, where narrow of tokens and adaLN chunks are views.
    for (b, t_len, hh, ww) in [(2, 40, 16, 24), (1, 40, 16, 24)] {
        let x = randn(&mut rng, b * 16 * hh * ww, 1.0);
        let ctx = randn(&mut rng, b * t_len * 64, 1.0);
        let y = randn(&mut rng, b * 32, 1.0);
        fn run<O: Ops>(
            o: &O,
            ckpt: &Checkpoint,
            cfg: &FluxConfig,
            x: &[f32],
            ctx: &[f32],
            y: &[f32],
            dims: (usize, usize, usize, usize),
        ) -> Vec<f32> {
            let (b, t_len, hh, ww) = dims;
            let flux = Flux::load(o, ckpt, "", cfg.clone()).unwrap();
            let out = flux
                .forward(
                    o,
                    &o.from_f32(&[b, 16, hh, ww], x).unwrap(),
                    &[0.5, 0.25][..b],
                    &o.from_f32(&[b, t_len, 64], ctx).unwrap(),
                    &o.from_f32(&[b, 32], y).unwrap(),
                    Some(&[4.0, 2.0][..b]),
                    &InputHooks::none(),
                )
                .unwrap();
            o.to_f32(&out).unwrap()
        }
        let want = run(&CpuOps::new(), &ckpt, &cfg, &x, &ctx, &y, (b, t_len, hh, ww));
        let got = run(o, &ckpt, &cfg, &x, &ctx, &y, (b, t_len, hh, ww));
        let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        close(&format!("flux 2+2 blocks, batch {b}, 96 image + 40 text tokens (CpuOps)"), &got, &want);
    }
}

/// The fused DiT ops (`ln_modulate`, `qkv_heads`, `concat_act`) and narrow's
/// views on the GPU against the CPU backend (f32, its own f64 tests in
/// `nn::cpu_dit_tests`) on the same bf16-rounded inputs, at FLUX widths.
#[test]
fn fused_dit_ops_match_cpu_ops() {
    use quantsmith::nn::QkvPart;
    use quantsmith::nn::cpu::CpuOps;

    let Some((o, _g)) = gpu() else { return };
    let cpu = CpuOps::new();
    let mut rng = StdRng::seed_from_u64(17);
    let c_up = |shape: &[usize], v: &[f32]| cpu.from_f32(shape, v).unwrap();
    let vs = |v: Vec<f32>| -> Vec<f64> { v.into_iter().map(|x| x as f64).collect() };

    // ln_modulate: batch 2 (copied chunks) at 3072, and an odd width (fallback path).
    for &(b, n, c) in &[(2usize, 77usize, 3072usize), (1, 33, 20)] {
        let x: Vec<f32> = randn(&mut rng, b * n * c, 2.0).iter().map(|v| bf(v + 0.5)).collect();
        let shift = randn(&mut rng, b * c, 1.0);
        let scale = randn(&mut rng, b * c, 0.5);
        let got = o.ln_modulate(&up(o, &[b, n, c], &x), &up(o, &[b, c], &shift), &up(o, &[b, c], &scale), 1e-6).unwrap();
        let want = cpu.ln_modulate(&c_up(&[b, n, c], &x), &c_up(&[b, c], &shift), &c_up(&[b, c], &scale), 1e-6).unwrap();
        close(&format!("ln_modulate {b}x{n}x{c}"), &down(o, &got), &vs(cpu.to_f32(&want).unwrap()));
    }

    // qkv_heads: a txt part (norms) and an img part with extra MLP columns (norms),
    // joint RoPE, FLUX's head width; then SD3-like parts of head width 64 without norms.
    for &(heads, d, rope, norms) in &[(3usize, 128usize, true, true), (4, 64, false, false)] {
        let (b, n1, n2, extra) = (1, 24, 40, 64);
        let w = heads * d;
        let x1 = randn(&mut rng, b * n1 * 3 * w, 1.0);
        let x2 = randn(&mut rng, b * n2 * (3 * w + extra), 1.0);
        let (qn, kn) = (randn(&mut rng, d, 1.0), randn(&mut rng, d, 1.0));
        let ang: Vec<f32> = (0..(n1 + n2) * d / 2).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let cos: Vec<f32> = ang.iter().map(|a| bf(a.cos())).collect();
        let sin: Vec<f32> = ang.iter().map(|a| bf(a.sin())).collect();
        let (g1, g2) = (up(o, &[b, n1, 3 * w], &x1), up(o, &[b, n2, 3 * w + extra], &x2));
        let (gq, gk) = (up(o, &[d], &qn), up(o, &[d], &kn));
        let (gc, gs) = (up(o, &[n1 + n2, d / 2], &cos), up(o, &[n1 + n2, d / 2], &sin));
        let gparts = [
            QkvPart { qkv: &g1, q_norm: norms.then_some(&gq), k_norm: norms.then_some(&gk) },
            QkvPart { qkv: &g2, q_norm: norms.then_some(&gq), k_norm: norms.then_some(&gk) },
        ];
        let got = o.qkv_heads(&gparts, w, heads, 1e-6, rope.then_some((&gc, &gs))).unwrap();
        let (c1, c2) = (c_up(&[b, n1, 3 * w], &x1), c_up(&[b, n2, 3 * w + extra], &x2));
        let (cq, ck) = (c_up(&[d], &qn), c_up(&[d], &kn));
        let (cc, cs) = (c_up(&[n1 + n2, d / 2], &cos), c_up(&[n1 + n2, d / 2], &sin));
        let cparts = [
            QkvPart { qkv: &c1, q_norm: norms.then_some(&cq), k_norm: norms.then_some(&ck) },
            QkvPart { qkv: &c2, q_norm: norms.then_some(&cq), k_norm: norms.then_some(&ck) },
        ];
        let want = cpu.qkv_heads(&cparts, w, heads, 1e-6, rope.then_some((&cc, &cs))).unwrap();
        for (name, (g, c)) in ["q", "k", "v"].iter().zip(got.iter().zip(&want)) {
            assert_eq!(o.shape(g), cpu.shape(c));
            close(&format!("qkv_heads {name} d{d}"), &down(o, g), &vs(cpu.to_f32(c).unwrap()));
        }
        // v is a copy: exact.
        assert_eq!(down(o, &got[2]), cpu.to_f32(&want[2]).unwrap(), "qkv_heads v d{d} is not an exact copy");
    }

    // concat_act: FLUX single block's linear2 input (scaled down), and a width
    // that is not a multiple of 8 (fallback path).
    for &(rows, ac, xc, start, len) in &[(100usize, 256usize, 1792usize, 768usize, 1024usize), (7, 12, 40, 4, 20)] {
        let a = randn(&mut rng, rows * ac, 1.0);
        let x = randn(&mut rng, rows * xc, 2.0);
        let got = o.concat_act(&up(o, &[1, rows, ac], &a), &up(o, &[1, rows, xc], &x), start, len, Act::GeluTanh).unwrap();
        let want = cpu.concat_act(&c_up(&[1, rows, ac], &a), &c_up(&[1, rows, xc], &x), start, len, Act::GeluTanh).unwrap();
        close(&format!("concat_act {rows}x({ac}+{len})"), &down(o, &got), &vs(cpu.to_f32(&want).unwrap()));
    }

    // narrow as a view (batch 1, 256-byte aligned start) feeding a Linear, a
    // modulation (chunks of one [1, 3C] row) and a gated residual.
    let (n, c) = (50, 256);
    let x = randn(&mut rng, n * c, 1.0);
    let m = randn(&mut rng, 3 * c, 0.5);
    let wt = randn(&mut rng, c * c, 0.05);
    let (gx, gm, gw) = (up(o, &[1, n, c], &x), up(o, &[1, 3 * c], &m), up(o, &[c, c], &wt));
    let (cx, cm, cw) = (c_up(&[1, n, c], &x), c_up(&[1, 3 * c], &m), c_up(&[c, c], &wt));
    let (g_tok, c_tok) = (o.narrow(&gx, 1, 8, 30).unwrap(), cpu.narrow(&cx, 1, 8, 30).unwrap());
    assert_eq!(down(o, &g_tok), cpu.to_f32(&c_tok).unwrap(), "token view");
    let chunk = |i: usize| (o.narrow(&gm, 1, i * c, c).unwrap(), cpu.narrow(&cm, 1, i * c, c).unwrap());
    let ((g0, c0), (g1, c1), (g2, c2)) = (chunk(0), chunk(1), chunk(2));
    // A view as a Linear input and as its bias, then modulation and gated residual with view chunks.
    let g_lin = o.linear(&g_tok, &gw, Some(&g1)).unwrap();
    let c_lin = cpu.linear(&c_tok, &cw, Some(&c1)).unwrap();
    let g_out = o.gated_add(&o.ln_modulate(&g_lin, &g0, &g1, 1e-6).unwrap(), &g2, &g_tok).unwrap();
    let c_out = cpu.gated_add(&cpu.ln_modulate(&c_lin, &c0, &c1, 1e-6).unwrap(), &c2, &c_tok).unwrap();
    close("linear, ln_modulate, gated_add on views", &down(o, &g_out), &vs(cpu.to_f32(&c_out).unwrap()));
}
