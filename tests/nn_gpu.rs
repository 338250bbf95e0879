//! The CUDA forward-pass backend (`nn::cuda::CudaOps`) against host references.
//!
//! - `nn_kernels_compile_with_nvrtc` needs only libnvrtc: the forward-pass
//!   program compiles to PTX for compute_90 and to machine code for sm_90.
//! - The other tests need a CUDA GPU; without one they print why and pass,
//!   unless `QUANTSMITH_REQUIRE_GPU=1` makes that a failure.
//!
//! References are plain f32/f64 loops over the same bf16-rounded inputs the
//! GPU sees; bf16 outputs are compared by relative L2 (<= 1e-2), layout ops and
//! observers exactly, fake quantization against the formats' CPU reference
//! (`formats::Format::quantize` + `dequantize`) bit for bit after rounding to bf16.

mod common;

use std::sync::OnceLock;

use quantsmith::formats::numerics::{e4m3_from_f32_sat, e4m3_to_f32, f32_to_bf16, f32_to_f16};
use quantsmith::formats::{QuantFormat, QuantSpec, SourceDtype, WeightView};
use quantsmith::gpu::kernels::Target;
use quantsmith::nn::cuda::{self as nncuda, CudaOps, FlashVariant};
use quantsmith::nn::{Act, ActQuant, ChannelAxis, ObserverSpec, Ops};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

// ---------------------------------------------------------------------------
// Without a GPU
// ---------------------------------------------------------------------------

#[test]
fn nn_kernels_compile_with_nvrtc() {
    if !common::nvrtc_or_skip("nn_kernels_compile_with_nvrtc") {
        return;
    }
    let ptx = nncuda::compile(Target::Ptx { major: 9, minor: 0 }).unwrap_or_else(|e| panic!("{e:#}"));
    let text = String::from_utf8_lossy(&ptx.image);
    for n in nncuda::KERNEL_NAMES {
        assert!(text.contains(&format!(".entry {n}(")), "compute_90: kernel {n} missing from the PTX");
    }
    assert!(!ptx.log.contains("warning"), "NVRTC warned:\n{}", ptx.log);
    let cubin = nncuda::compile(Target::Cubin { major: 9, minor: 0 }).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(cubin.image.starts_with(b"\x7fELF"), "sm_90 cubin is not an ELF image");
    println!("compiled {} forward-pass kernels for compute_90 and sm_90", nncuda::KERNEL_NAMES.len());
}

#[test]
fn construction_fails_cleanly_without_a_device() {
    if !quantsmith::gpu::driver_available() {
        let e = CudaOps::new(0).err().expect("no driver must be an error");
        assert!(format!("{e:#}").contains("driver"), "unclear error: {e:#}");
    }
    // Past the last device: an error, never a panic, GPU or not.
    let e = CudaOps::new(999).err().expect("GPU 999 must not exist");
    println!("CudaOps::new(999) -> {e:#}");
}

// ---------------------------------------------------------------------------
// With a GPU
// ---------------------------------------------------------------------------

fn ops() -> Option<&'static CudaOps> {
    static OPS: OnceLock<Option<CudaOps>> = OnceLock::new();
    OPS.get_or_init(|| {
        let o = common::gpu_or_skip("CUDA nn backend", CudaOps::new(0))?;
        println!("GPU: {}", o.name());
        Some(o)
    })
    .as_ref()
}

/// The GPU backend, serialised: tests run on several threads, and some switch
/// backend-wide settings (cuDNN, the attention chunk size).
fn gpu() -> Option<(&'static CudaOps, std::sync::MutexGuard<'static, ()>)> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let o = ops()?;
    Some((o, LOCK.lock().unwrap_or_else(|p| p.into_inner())))
}

fn bf(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

/// Random normal values scaled by `s`, already rounded to bf16.
fn randn(rng: &mut StdRng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| bf(rng.sample::<f32, _>(StandardNormal) * s)).collect()
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

#[track_caller]
fn close(what: &str, got: &[f32], want: &[f32]) {
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    let e = rel_l2(got, want);
    println!("{what}: relative L2 {e:.2e}");
    assert!(e <= 1e-2, "{what}: relative L2 {e:.3e} > 1e-2");
}

#[track_caller]
fn exact(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad = got.iter().zip(want).position(|(g, w)| g.to_bits() != w.to_bits() && !(*g == 0.0 && *w == 0.0));
    if let Some(i) = bad {
        panic!("{what}: element {i}: got {} want {}", got[i], want[i]);
    }
}

fn up(o: &CudaOps, shape: &[usize], v: &[f32]) -> <CudaOps as Ops>::Tensor {
    o.from_f32(shape, v).unwrap()
}

fn down(o: &CudaOps, t: &<CudaOps as Ops>::Tensor) -> Vec<f32> {
    o.to_f32(t).unwrap()
}

// --- references --------------------------------------------------------------

fn ref_linear(x: &[f32], w: &[f32], b: Option<&[f32]>, m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = b.map_or(0.0, |b| b[j] as f64);
            for t in 0..k {
                s += x[i * k + t] as f64 * w[j * k + t] as f64;
            }
            y[i * n + j] = s as f32;
        }
    }
    y
}

#[allow(clippy::too_many_arguments)]
fn ref_conv(x: &[f32], w: &[f32], b: &[f32], n: usize, c: usize, h: usize, wd: usize, k: usize, ks: usize, s: usize, p: usize) -> Vec<f32> {
    let ho = (h + 2 * p - ks) / s + 1;
    let wo = (wd + 2 * p - ks) / s + 1;
    let mut y = vec![0f32; n * k * ho * wo];
    for ni in 0..n {
        for ko in 0..k {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = b[ko] as f64;
                    for ci in 0..c {
                        for ky in 0..ks {
                            let iy = (oy * s + ky) as isize - p as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..ks {
                                let ix = (ox * s + kx) as isize - p as isize;
                                if ix < 0 || ix >= wd as isize {
                                    continue;
                                }
                                acc += x[((ni * c + ci) * h + iy as usize) * wd + ix as usize] as f64
                                    * w[((ko * c + ci) * ks + ky) * ks + kx] as f64;
                            }
                        }
                    }
                    y[((ni * k + ko) * ho + oy) * wo + ox] = acc as f32;
                }
            }
        }
    }
    y
}

fn ref_norm(v: &[f32], eps: f32) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

#[allow(clippy::too_many_arguments)]
fn ref_attention(q: &[f32], k: &[f32], v: &[f32], b: usize, nq: usize, nk: usize, heads: usize, d: usize, causal: bool) -> Vec<f32> {
    let hd = heads * d;
    let mut out = vec![0f32; b * nq * hd];
    let scale = 1.0 / (d as f64).sqrt();
    for bi in 0..b {
        for h in 0..heads {
            for i in 0..nq {
                let valid = if causal { (i + 1).min(nk) } else { nk };
                let s: Vec<f64> = (0..valid)
                    .map(|j| {
                        (0..d).map(|t| q[(bi * nq + i) * hd + h * d + t] as f64 * k[(bi * nk + j) * hd + h * d + t] as f64).sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for t in 0..d {
                    let acc: f64 = (0..valid).map(|j| e[j] / z * v[(bi * nk + j) * hd + h * d + t] as f64).sum();
                    out[(bi * nq + i) * hd + h * d + t] = acc as f32;
                }
            }
        }
    }
    out
}

fn erf(x: f64) -> f64 {
    // std has no erf: Numerical Recipes' erfc fit (relative error below 1.2e-7).
    let t = 1.0 / (1.0 + 0.5 * x.abs());
    let y = 1.0
        - t * (-x * x - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    if x >= 0.0 { y } else { -y }
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

// --- tests ---------------------------------------------------------------------

#[test]
fn weights_convert_from_every_stored_dtype() {
    let Some((o, _g)) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(1);
    let vals: Vec<f32> = (0..999).map(|_| rng.sample::<f32, _>(StandardNormal) * 3.0).collect();
    let want: Vec<f32> = vals.iter().map(|&v| bf(v)).collect();
    for dtype in [SourceDtype::F32, SourceDtype::F16, SourceDtype::BF16] {
        let bytes: Vec<u8> = match dtype {
            SourceDtype::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            SourceDtype::F16 => vals.iter().flat_map(|&v| f32_to_f16(v).to_le_bytes()).collect(),
            SourceDtype::BF16 => vals.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect(),
        };
        // Unaligned, as safetensors data may be.
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        let view = WeightView { name: "w", dtype, rows: 27, cols: 37, bytes: &shifted[1..] };
        let t = o.weight(&[27, 37], &view).unwrap();
        assert_eq!(o.shape(&t), vec![27, 37]);
        let got = down(o, &t);
        let want: Vec<f32> = match dtype {
            // f16 -> bf16 rounds the f16 value (exact in f32) once.
            SourceDtype::F16 => vals.iter().map(|&v| bf(half::f16::from_f32(v).to_f32())).collect(),
            _ => want.clone(),
        };
        exact(&format!("weight {dtype:?}"), &got, &want);
    }
    let bad = WeightView { name: "w", dtype: SourceDtype::F32, rows: 2, cols: 2, bytes: &[0u8; 12] };
    assert!(o.weight(&[2, 2], &bad).is_err(), "short weight bytes must be refused");
}

#[test]
fn uploads_through_the_staging_ring_keep_their_data() {
    let Some((o, _g)) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(13);
    // 30 uploads of 600 KB each wrap the two 4 MiB pinned halves several
    // times, with kernels queued on earlier uploads in between.
    let mut kept = Vec::new();
    for i in 0..30 {
        let v = randn(&mut rng, 300_000, 1.0);
        let t = up(o, &[300_000], &v);
        let doubled = o.add(&t, &t).unwrap();
        kept.push((i, v, t, doubled));
    }
    for (i, v, t, doubled) in &kept {
        exact(&format!("upload {i}"), &down(o, t), v);
        let twice: Vec<f32> = v.iter().map(|x| x * 2.0).collect();
        exact(&format!("upload {i} doubled"), &down(o, doubled), &twice);
    }
}

#[test]
fn linear_matches_reference() {
    let Some((o, _g)) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(2);
    for &(m, k, n, bias) in &[(2 * 77, 768, 320, true), (300, 320, 1280, true), (2, 1280, 1280, false), (64, 77, 33, true)] {
        let x = randn(&mut rng, m * k, 1.0);
        let w = randn(&mut rng, n * k, 1.0 / (k as f32).sqrt());
        let b = randn(&mut rng, n, 0.5);
        let xt = up(o, &[m, k], &x);
        let wt = up(o, &[n, k], &w);
        let bt = up(o, &[n], &b);
        let y = o.linear(&xt, &wt, if bias { Some(&bt) } else { None }).unwrap();
        assert_eq!(o.shape(&y), vec![m, n]);
        close(&format!("linear {m}x{k}x{n} bias={bias}"), &down(o, &y), &ref_linear(&x, &w, bias.then_some(&b[..]), m, k, n));
    }
    // Leading dimensions are kept: [B, N, C] -> [B, N, out].
    let x = randn(&mut rng, 2 * 5 * 64, 1.0);
    let w = randn(&mut rng, 32 * 64, 0.1);
    let y = o.linear(&up(o, &[2, 5, 64], &x), &up(o, &[32, 64], &w), None).unwrap();
    assert_eq!(o.shape(&y), vec![2, 5, 32]);
    assert!(o.linear(&up(o, &[2, 5, 64], &x), &up(o, &[64, 32], &w), None).is_err(), "mismatched K must be refused");
}

#[test]
fn conv2d_matches_reference_on_both_paths() {
    let Some((o, _g)) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(3);
    let cases = [(2, 64, 24, 24, 96, 3, 1, 1), (2, 64, 24, 24, 64, 3, 2, 1), (2, 96, 16, 16, 48, 1, 1, 0), (1, 4, 32, 32, 320, 3, 1, 1)];
    let had_cudnn = o.uses_cudnn();
    for cudnn in [true, false] {
        o.set_cudnn(cudnn);
        if cudnn && !o.uses_cudnn() {
            println!("cuDNN not in use: only the im2col path is checked");
            continue;
        }
        for &(n, c, h, w, k, ks, s, p) in &cases {
            let x = randn(&mut rng, n * c * h * w, 1.0);
            let wt = randn(&mut rng, k * c * ks * ks, 1.0 / ((c * ks * ks) as f32).sqrt());
            let b = randn(&mut rng, k, 0.5);
            let y = o.conv2d(&up(o, &[n, c, h, w], &x), &up(o, &[k, c, ks, ks], &wt), Some(&up(o, &[k], &b)), s, p).unwrap();
            let ho = (h + 2 * p - ks) / s + 1;
            assert_eq!(o.shape(&y), vec![n, k, ho, ho]);
            let path = if o.uses_cudnn() { "cuDNN" } else { "im2col" };
            close(
                &format!("conv2d {path} {n}x{c}x{h}x{w} -> {k} k{ks} s{s} p{p}"),
                &down(o, &y),
                &ref_conv(&x, &wt, &b, n, c, h, w, k, ks, s, p),
            );
        }
    }
    o.set_cudnn(had_cudnn);
}

#[test]
fn norms_match_reference() {
    let Some((o, _g)) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(4);
    // GroupNorm: a small case and one whose groups span several chunks.
    for &(n, c, h, groups) in &[(2, 320, 16, 32), (1, 64, 128, 32), (2, 96, 7, 3)] {
        let hw = h * h;
        let x: Vec<f32> = randn(&mut rng, n * c * hw, 2.0).into_iter().map(|v| bf(v + 3.0)).collect();
        let w = randn(&mut rng, c, 1.0);
        let b = randn(&mut rng, c, 1.0);
        let y = o.group_norm(&up(o, &[n, c, h, h], &x), groups, &up(o, &[c], &w), &up(o, &[c], &b), 1e-5).unwrap();
        let cg = c / groups;
        let mut want = vec![0f32; x.len()];
        for ni in 0..n {
            for g in 0..groups {
                let s = (ni * c + g * cg) * hw;
                let (mean, rstd) = ref_norm(&x[s..s + cg * hw], 1e-5);
                for i in 0..cg * hw {
                    let ch = g * cg + i / hw;
                    want[s + i] = ((x[s + i] as f64 - mean) * rstd * w[ch] as f64 + b[ch] as f64) as f32;
                }
            }
        }
        close(&format!("group_norm {n}x{c}x{h}x{h} g{groups}"), &down(o, &y), &want);
    }
    for &(rows, cols) in &[(2 * 77, 768), (2 * 1024, 640), (3, 2048)] {
        let x: Vec<f32> = randn(&mut rng, rows * cols, 1.5).into_iter().map(|v| bf(v - 1.0)).collect();
        let w = randn(&mut rng, cols, 1.0);
        let b = randn(&mut rng, cols, 1.0);
        let y = o.layer_norm(&up(o, &[rows, cols], &x), &up(o, &[cols], &w), &up(o, &[cols], &b), 1e-5).unwrap();
        let mut want = vec![0f32; x.len()];
        for r in 0..rows {
            let (mean, rstd) = ref_norm(&x[r * cols..(r + 1) * cols], 1e-5);
            for c in 0..cols {
                want[r * cols + c] = ((x[r * cols + c] as f64 - mean) * rstd * w[c] as f64 + b[c] as f64) as f32;
            }
        }
        close(&format!("layer_norm {rows}x{cols}"), &down(o, &y), &want);
    }
}

#[test]
fn attention_matches_reference() {
    let Some((o, _g)) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(5);
    // (batch, queries, keys, heads, head dim, causal, chunk bytes)
    let cases = [
        (2, 256, 256, 8, 40, false, None),         // SD1.5 self-attention head size
        (2, 512, 77, 10, 64, false, None),         // SDXL cross-attention
        (2, 77, 77, 12, 64, true, None),           // CLIP-L causal
        (2, 300, 200, 4, 64, false, Some(40_000)), // forces head and query chunks
        (1, 77, 77, 4, 32, true, Some(20_000)),    // causal across query chunks
        (1, 130, 70, 2, 128, true, None),          // FLUX head size, ragged tiles
        (1, 64, 64, 3, 80, false, None),
        (2, 33, 17, 2, 160, false, None), // past the fused kernel's head dims
        (1, 200, 200, 2, 64, true, None), // causal over several key tiles
        (2, 70, 90, 3, 36, false, None),  // head dim not a multiple of 8
    ];
    let paths = FlashVariant::ALL.map(Some).into_iter().chain([None]);
    for variant in paths {
        let flash = variant.is_some();
        o.set_flash_attention(flash);
        o.set_flash_variant(variant.unwrap_or(FlashVariant::DEFAULT));
        for &(b, nq, nk, heads, d, causal, chunk) in &cases {
            let hd = heads * d;
            let q = randn(&mut rng, b * nq * hd, 1.0);
            let k = randn(&mut rng, b * nk * hd, 1.0);
            let v = randn(&mut rng, b * nk * hd, 1.0);
            o.set_attention_chunk_bytes(chunk.unwrap_or(nncuda::ATTENTION_SCORE_BYTES));
            let y = o.attention(&up(o, &[b, nq, hd], &q), &up(o, &[b, nk, hd], &k), &up(o, &[b, nk, hd], &v), heads, causal).unwrap();
            o.set_attention_chunk_bytes(nncuda::ATTENTION_SCORE_BYTES);
            assert_eq!(o.shape(&y), vec![b, nq, hd]);
            let path = if flash && d % 8 == 0 && d <= 128 { format!("fused {variant:?}") } else { "cuBLAS".to_string() };
            close(
                &format!("attention {path} b{b} q{nq} k{nk} h{heads} d{d} causal={causal} chunk={chunk:?}"),
                &down(o, &y),
                &ref_attention(&q, &k, &v, b, nq, nk, heads, d, causal),
            );
        }
    }
    o.set_flash_attention(true);
    o.set_flash_variant(FlashVariant::DEFAULT);
}

#[test]
fn elementwise_ops_match_reference() {
    let Some((o, _g)) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(6);
    let n = 2 * 77 * 33 + 5; // not a multiple of 8: exercises the scalar tail
    let x = randn(&mut rng, n, 2.0);
    let y = randn(&mut rng, n, 2.0);
    let xt = up(o, &[n], &x);
    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
    for (act, f) in [
        (Act::Silu, Box::new(move |v: f64| v * sig(v)) as Box<dyn Fn(f64) -> f64>),
        (Act::Gelu, Box::new(gelu)),
        (Act::QuickGelu, Box::new(move |v: f64| v * sig(1.702 * v))),
    ] {
        let want: Vec<f32> = x.iter().map(|&v| f(v as f64) as f32).collect();
        close(&format!("{act:?}"), &down(o, &o.act(&xt, act).unwrap()), &want);
    }
    let sum: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
    close("add", &down(o, &o.add(&xt, &up(o, &[n], &y)).unwrap()), &sum);
    let scaled: Vec<f32> = x.iter().map(|a| a * 0.18215).collect();
    close("scale", &down(o, &o.scale(&xt, 0.18215).unwrap()), &scaled);
    // GEGLU on [2, 10, 2F].
    let f = 96;
    let g = randn(&mut rng, 20 * 2 * f, 1.5);
    let mut want = vec![0f32; 20 * f];
    for r in 0..20 {
        for c in 0..f {
            want[r * f + c] = (g[r * 2 * f + c] as f64 * gelu(g[r * 2 * f + f + c] as f64)) as f32;
        }
    }
    let gy = o.geglu(&up(o, &[2, 10, 2 * f], &g)).unwrap();
    assert_eq!(o.shape(&gy), vec![2, 10, f]);
    close("geglu", &down(o, &gy), &want);
    // Per-sample channel bias [N, C] over H, W.
    let (nn, c, hw) = (2, 48, 9 * 9);
    let xs = randn(&mut rng, nn * c * hw, 1.0);
    let bs = randn(&mut rng, nn * c, 1.0);
    let want: Vec<f32> = (0..xs.len()).map(|i| xs[i] + bs[i / hw]).collect();
    close("add_channel_bias", &down(o, &o.add_channel_bias(&up(o, &[nn, c, 9, 9], &xs), &up(o, &[nn, c], &bs)).unwrap()), &want);
}

#[test]
fn layout_ops_are_exact() {
    let Some((o, _g)) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(7);
    let (n, c, h, w) = (2, 40, 12, 10);
    let x = randn(&mut rng, n * c * h * w, 1.0);
    let xt = up(o, &[n, c, h, w], &x);
    // upsample
    let u = down(o, &o.upsample_nearest2x(&xt).unwrap());
    let mut want = vec![0f32; n * c * 4 * h * w];
    for p in 0..n * c {
        for y in 0..2 * h {
            for xx in 0..2 * w {
                want[(p * 2 * h + y) * 2 * w + xx] = x[(p * h + y / 2) * w + xx / 2];
            }
        }
    }
    exact("upsample_nearest2x", &u, &want);
    // tokens and back
    let t = o.to_tokens(&xt).unwrap();
    assert_eq!(o.shape(&t), vec![n, h * w, c]);
    let tv = down(o, &t);
    for ni in 0..n {
        for ci in 0..c {
            for p in 0..h * w {
                assert_eq!(tv[(ni * h * w + p) * c + ci], x[(ni * c + ci) * h * w + p]);
            }
        }
    }
    exact("from_tokens(to_tokens(x))", &down(o, &o.from_tokens(&t, h, w).unwrap()), &x);
    // concat along channels (NCHW) and along tokens
    let x2 = randn(&mut rng, n * 24 * h * w, 1.0);
    let cat = down(o, &o.concat(&[&xt, &up(o, &[n, 24, h, w], &x2)], 1).unwrap());
    let mut want = Vec::new();
    for ni in 0..n {
        want.extend_from_slice(&x[ni * c * h * w..(ni + 1) * c * h * w]);
        want.extend_from_slice(&x2[ni * 24 * h * w..(ni + 1) * 24 * h * w]);
    }
    exact("concat dim 1", &cat, &want);
    let a = randn(&mut rng, 2 * 3 * 8, 1.0);
    let b = randn(&mut rng, 2 * 5 * 8, 1.0);
    let cat = down(o, &o.concat(&[&up(o, &[2, 3, 8], &a), &up(o, &[2, 5, 8], &b)], 1).unwrap());
    let mut want = Vec::new();
    for bi in 0..2 {
        want.extend_from_slice(&a[bi * 24..(bi + 1) * 24]);
        want.extend_from_slice(&b[bi * 40..(bi + 1) * 40]);
    }
    exact("concat tokens", &cat, &want);
    let cat = down(o, &o.concat(&[&up(o, &[2, 3, 8], &a), &up(o, &[2, 3, 8], &a)], 2).unwrap());
    let want: Vec<f32> =
        (0..6).flat_map(|r| a[r * 8..(r + 1) * 8].iter().chain(&a[r * 8..(r + 1) * 8]).copied().collect::<Vec<_>>()).collect();
    exact("concat last", &cat, &want);
    // embedding and token selection
    let table = randn(&mut rng, 50 * 16, 1.0);
    let ids = [3u32, 49, 0, 3, 17];
    let e = o.embedding(&up(o, &[50, 16], &table), &ids).unwrap();
    assert_eq!(o.shape(&e), vec![5, 16]);
    let want: Vec<f32> = ids.iter().flat_map(|&i| table[i as usize * 16..(i as usize + 1) * 16].to_vec()).collect();
    exact("embedding", &down(o, &e), &want);
    assert!(o.embedding(&up(o, &[50, 16], &table), &[50]).is_err(), "an id past the table must be refused");
    let seq = randn(&mut rng, 2 * 7 * 16, 1.0);
    let s = o.select_tokens(&up(o, &[2, 7, 16], &seq), &[6, 2]).unwrap();
    let want: Vec<f32> = seq[6 * 16..7 * 16].iter().chain(&seq[(7 + 2) * 16..(7 + 3) * 16]).copied().collect();
    exact("select_tokens", &down(o, &s), &want);
    // reshape shares the data
    let r = o.reshape(&xt, &[n, c * h * w]).unwrap();
    exact("reshape", &down(o, &r), &x);
    assert!(o.reshape(&xt, &[3]).is_err());
}

#[test]
fn observers_fold_channel_and_step_amax_on_device() {
    let Some((o, _g)) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(8);
    let specs = [
        ObserverSpec { channels: 320, axis: ChannelAxis::Last },
        ObserverSpec { channels: 64, axis: ChannelAxis::Dim1 },
        ObserverSpec { channels: 8, axis: ChannelAxis::Last },
    ];
    let steps = 3;
    o.observers_reset(&specs, steps).unwrap();
    let mut chan = [vec![0f32; 320], vec![0f32; 64], vec![0f32; 8]];
    let mut step = vec![vec![0f32; steps]; 3];
    let mut calls = [0u64; 3];
    for (st, scale) in [(0, 1.0), (2, 4.0), (0, 2.0), (1, 0.5)] {
        o.observers_set_step(st).unwrap();
        // Slot 0: tokens [2, 300, 320].
        let x = randn(&mut rng, 2 * 300 * 320, scale);
        o.observe(&up(o, &[2, 300, 320], &x), 0).unwrap();
        for (i, v) in x.iter().enumerate() {
            chan[0][i % 320] = chan[0][i % 320].max(v.abs());
            step[0][st] = step[0][st].max(v.abs());
        }
        calls[0] += 1;
        // Slot 1: NCHW [2, 64, 70, 70] (planes larger than one chunk).
        let x = randn(&mut rng, 2 * 64 * 4900, scale);
        o.observe(&up(o, &[2, 64, 70, 70], &x), 1).unwrap();
        for (i, v) in x.iter().enumerate() {
            let c = (i / 4900) % 64;
            chan[1][c] = chan[1][c].max(v.abs());
            step[1][st] = step[1][st].max(v.abs());
        }
        calls[1] += 1;
    }
    // Slot 2: a [2, 8] embedding input at step 1.
    o.observers_set_step(1).unwrap();
    let x = [0.5f32, -7.0, 0.0, 1.0, 2.0, 3.0, -4.0, 0.25, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.125];
    o.observe(&up(o, &[2, 8], &x), 2).unwrap();
    chan[2] = vec![6.0, 7.0, 0.0, 1.0, 2.0, 3.0, 4.0, 0.25];
    step[2][1] = 7.0;
    calls[2] = 1;
    assert!(o.observers_set_step(steps).is_err(), "a step past the buckets must be refused");
    assert!(o.observe(&up(o, &[2, 300, 321], &vec![0.0; 2 * 300 * 321]), 0).is_err(), "wrong channel count must be refused");
    let stats = o.observers_read().unwrap();
    assert_eq!(stats.len(), 3);
    for s in 0..3 {
        exact(&format!("observer {s} channel amax"), &stats[s].channel_amax, &chan[s]);
        exact(&format!("observer {s} step amax"), &stats[s].step_amax, &step[s]);
        assert_eq!(stats[s].calls, calls[s], "observer {s} calls");
    }
    assert_eq!(stats[2].amax(), 7.0);
    // A reset zeroes everything.
    o.observers_reset(&specs[..1], 1).unwrap();
    let stats = o.observers_read().unwrap();
    assert!(stats[0].channel_amax.iter().all(|&v| v == 0.0) && stats[0].calls == 0);
}

/// The formats' CPU reference: quantize the f32 matrix as a weight, dequantize, round to bf16.
fn format_reference(format: QuantFormat, per_channel: bool, x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = WeightView { name: "act", dtype: SourceDtype::F32, rows, cols, bytes: &bytes };
    let f = QuantSpec { format, per_channel }.implementation();
    let stored = f.quantize(&view).unwrap();
    f.dequantize(&stored, rows, cols).into_iter().map(bf).collect()
}

#[test]
fn fake_quant_matches_the_formats_reference() {
    let Some((o, _g)) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(9);
    for &(rows, cols) in &[(2 * 77, 320), (37, 100), (4, 2048)] {
        // Heavy-tailed rows with different ranges, some all-zero blocks.
        let mut x: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let r = i / cols;
                let v: f32 = rng.sample(StandardNormal);
                bf(v * (1.0 + r as f32 % 7.0) * if rng.random::<f32>() < 0.01 { 30.0 } else { 1.0 })
            })
            .collect();
        x[..40].iter_mut().for_each(|v| *v = 0.0);
        let xt = up(o, &[rows, cols], &x);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let cases: [(ActQuant, Vec<f32>); 5] = [
            (ActQuant::Fp8Dynamic, format_reference(QuantFormat::Fp8, false, &x, rows, cols)),
            (ActQuant::Fp8Static { scale: amax / 448.0 }, format_reference(QuantFormat::Fp8, false, &x, rows, cols)),
            (ActQuant::Int8DynamicRows, format_reference(QuantFormat::Int8, true, &x, rows, cols)),
            (ActQuant::Nvfp4 { global_scale: amax / 2688.0 }, format_reference(QuantFormat::Nvfp4, false, &x, rows, cols)),
            (ActQuant::Mxfp8, format_reference(QuantFormat::Mxfp8, false, &x, rows, cols)),
        ];
        for (q, want) in cases {
            let got = down(o, &o.fake_quant(&xt, q).unwrap());
            exact(&format!("fake_quant {q:?} {rows}x{cols}"), &got, &want);
            let e = rel_l2(&got, &x);
            println!("fake_quant {q:?} {rows}x{cols}: bit-exact, error vs input {e:.3e}");
            assert!(e > 0.0 && e < 0.2, "{q:?}: implausible quantization error {e}");
        }
        // A static scale below amax / 448 saturates at ±448 * scale.
        let scale = amax / 448.0 / 4.0;
        let mul = 1.0 / scale;
        let want: Vec<f32> = x.iter().map(|&v| bf(e4m3_to_f32(e4m3_from_f32_sat((v * mul).clamp(-448.0, 448.0))) * scale)).collect();
        exact("fake_quant Fp8Static saturating", &down(o, &o.fake_quant(&xt, ActQuant::Fp8Static { scale }).unwrap()), &want);
    }
    // All-zero input: every format gives zeros, never NaN.
    let z = up(o, &[3, 64], &[0.0; 192]);
    for q in [
        ActQuant::Fp8Dynamic,
        ActQuant::Int8DynamicRows,
        ActQuant::Nvfp4 { global_scale: 1.0 },
        ActQuant::Mxfp8,
        ActQuant::Fp8Static { scale: 0.0 },
    ] {
        assert!(down(o, &o.fake_quant(&z, q).unwrap()).iter().all(|&v| v == 0.0), "{q:?} on zeros");
    }
    assert!(o.fake_quant(&z, ActQuant::Nvfp4 { global_scale: 0.0 }).is_err(), "NVFP4 needs a scale > 0, as on the CPU");
}

/// Every op of a small UNet/text-encoder vocabulary, on any backend; returns
/// the named outputs (and observer readings) as host f32.
fn run_vocabulary<O: Ops>(o: &O, seed: u64) -> Vec<(String, Vec<f32>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let t = |shape: &[usize], v: &[f32]| o.from_f32(shape, v).unwrap();
    let mut push = |name: &str, x: &O::Tensor| out.push((name.to_string(), o.to_f32(x).unwrap()));
    let wbytes: Vec<u8> = randn(&mut rng, 640 * 640, 0.04).iter().flat_map(|&v| f32_to_f16(v).to_le_bytes()).collect();
    let w =
        o.weight(&[640, 640], &WeightView { name: "to_q.weight", dtype: SourceDtype::F16, rows: 640, cols: 640, bytes: &wbytes }).unwrap();
    let bias = t(&[640], &randn(&mut rng, 640, 0.1));
    let tokens = t(&[2, 1024, 640], &randn(&mut rng, 2 * 1024 * 640, 1.0));
    push("linear", &o.linear(&tokens, &w, Some(&bias)).unwrap());
    let img = t(&[2, 320, 32, 32], &randn(&mut rng, 2 * 320 * 1024, 1.0));
    let cw = t(&[320, 320, 3, 3], &randn(&mut rng, 320 * 2880, 0.02));
    let cb = t(&[320], &randn(&mut rng, 320, 0.1));
    push("conv3x3", &o.conv2d(&img, &cw, Some(&cb), 1, 1).unwrap());
    push("conv3x3 stride 2", &o.conv2d(&img, &cw, None, 2, 1).unwrap());
    let c1 = t(&[640, 320, 1, 1], &randn(&mut rng, 640 * 320, 0.05));
    push("conv1x1", &o.conv2d(&img, &c1, None, 1, 0).unwrap());
    let gw = t(&[320], &randn(&mut rng, 320, 1.0));
    let gb = t(&[320], &randn(&mut rng, 320, 1.0));
    push("group_norm", &o.group_norm(&img, 32, &gw, &gb, 1e-6).unwrap());
    let lw = t(&[640], &randn(&mut rng, 640, 1.0));
    push("layer_norm", &o.layer_norm(&tokens, &lw, &bias, 1e-5).unwrap());
    let ctx = t(&[2, 77, 640], &randn(&mut rng, 2 * 77 * 640, 1.0));
    push("self-attention", &o.attention(&tokens, &tokens, &tokens, 10, false).unwrap());
    push("cross-attention", &o.attention(&tokens, &ctx, &ctx, 10, false).unwrap());
    let clip = t(&[2, 77, 768], &randn(&mut rng, 2 * 77 * 768, 1.0));
    push("causal attention", &o.attention(&clip, &clip, &clip, 12, true).unwrap());
    for act in [Act::Silu, Act::Gelu, Act::QuickGelu] {
        push(&format!("{act:?}"), &o.act(&tokens, act).unwrap());
    }
    push("geglu", &o.geglu(&t(&[2, 64, 2560], &randn(&mut rng, 2 * 64 * 2560, 1.0))).unwrap());
    push("add", &o.add(&tokens, &tokens).unwrap());
    push("scale", &o.scale(&tokens, 0.125).unwrap());
    push("add_channel_bias", &o.add_channel_bias(&img, &t(&[2, 320], &randn(&mut rng, 640, 1.0))).unwrap());
    push("upsample", &o.upsample_nearest2x(&img).unwrap());
    push("concat", &o.concat(&[&img, &img], 1).unwrap());
    let tok = o.to_tokens(&img).unwrap();
    push("to_tokens", &tok);
    push("from_tokens", &o.from_tokens(&tok, 32, 32).unwrap());
    let table = t(&[100, 64], &randn(&mut rng, 6400, 1.0));
    push("embedding", &o.embedding(&table, &[5, 99, 0, 5]).unwrap());
    push("select_tokens", &o.select_tokens(&clip, &[76, 3]).unwrap());
    for q in [
        ActQuant::Fp8Static { scale: 0.01 },
        ActQuant::Fp8Dynamic,
        ActQuant::Int8DynamicRows,
        ActQuant::Nvfp4 { global_scale: 0.002 },
        ActQuant::Mxfp8,
    ] {
        push(&format!("fake_quant {q:?}"), &o.fake_quant(&tokens, q).unwrap());
    }
    o.observers_reset(
        &[ObserverSpec { channels: 640, axis: ChannelAxis::Last }, ObserverSpec { channels: 320, axis: ChannelAxis::Dim1 }],
        2,
    )
    .unwrap();
    o.observe(&tokens, 0).unwrap();
    o.observers_set_step(1).unwrap();
    o.observe(&img, 1).unwrap();
    o.observe(&ctx, 0).unwrap();
    for (i, s) in o.observers_read().unwrap().into_iter().enumerate() {
        out.push((format!("observer {i} channels"), s.channel_amax));
        out.push((format!("observer {i} steps + calls"), s.step_amax.into_iter().chain([s.calls as f32]).collect()));
    }
    out
}

#[test]
fn matches_cpu_ops_on_unet_shapes() {
    let Some((o, _g)) = gpu() else { return };
    let cpu = quantsmith::nn::cpu::CpuOps::new();
    let want = run_vocabulary(&cpu, 12);
    let got = run_vocabulary(o, 12);
    assert_eq!(got.len(), want.len());
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        assert_eq!(g.len(), w.len(), "{name}: length");
        // Quantization, layout and observers see the same bf16 inputs on both
        // sides: the GPU result is the CPU's rounded to bf16.
        let exact_op = name.starts_with("fake_quant")
            || name.starts_with("observer")
            || ["upsample", "concat", "to_tokens", "from_tokens", "embedding", "select_tokens"].contains(&name.as_str());
        if exact_op {
            let wb: Vec<f32> = w.iter().map(|&v| bf(v)).collect();
            exact(&format!("{name} (CpuOps)"), g, &wb);
        } else {
            close(&format!("{name} (CpuOps)"), g, w);
        }
    }
}

#[test]
fn buffers_are_reused_across_steps() {
    let Some((o, _g)) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(10);
    let x = up(o, &[2, 64, 32, 32], &randn(&mut rng, 2 * 64 * 1024, 1.0));
    let w = up(o, &[64, 64, 3, 3], &randn(&mut rng, 64 * 576, 0.05));
    let g = up(o, &[64], &vec![1.0; 64]);
    let step = |x: &<CudaOps as Ops>::Tensor| {
        let h = o.group_norm(x, 32, &g, &g, 1e-5).unwrap();
        let h = o.act(&h, Act::Silu).unwrap();
        let h = o.conv2d(&h, &w, None, 1, 1).unwrap();
        let t = o.to_tokens(&h).unwrap();
        let a = o.attention(&t, &t, &t, 2, false).unwrap();
        o.add(x, &o.from_tokens(&a, 32, 32).unwrap()).unwrap()
    };
    let _ = step(&x);
    o.synchronize().unwrap();
    let peak = o.peak_device_bytes().unwrap();
    let current = o.mem_stats().current();
    for _ in 0..5 {
        let _ = step(&x);
    }
    o.synchronize().unwrap();
    assert!(peak > 0);
    assert_eq!(o.peak_device_bytes().unwrap(), peak, "repeated steps must reuse their buffers");
    assert_eq!(o.mem_stats().current(), current, "no new allocations on repeated steps");
    println!("one step: peak {:.1} MiB", peak as f64 / (1 << 20) as f64);
}

/// Timings for BENCHMARKS-style figures; run with `--ignored` on the GPU machine.
#[test]
#[ignore]
fn timing_linear_conv_attention() {
    let Some((o, _g)) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(11);
    let time = |what: &str, flop: f64, f: &dyn Fn()| -> f64 {
        for _ in 0..3 {
            f();
        }
        o.synchronize().unwrap();
        let iters = 20;
        let t0 = std::time::Instant::now();
        for _ in 0..iters {
            f();
        }
        o.synchronize().unwrap();
        let s = t0.elapsed().as_secs_f64() / iters as f64;
        if flop > 0.0 {
            println!("{what}: {:.3} ms, {:.0} TFLOP/s", s * 1e3, flop / s / 1e12);
        }
        s
    };
    let x = up(o, &[2048, 1280], &randn(&mut rng, 2048 * 1280, 1.0));
    let w = up(o, &[1280, 1280], &randn(&mut rng, 1280 * 1280, 0.03));
    let b = up(o, &[1280], &randn(&mut rng, 1280, 0.1));
    time("linear 2048x1280x1280 bf16 +bias", 2.0 * 2048.0 * 1280.0 * 1280.0, &|| {
        let _ = o.linear(&x, &w, Some(&b)).unwrap();
    });
    let xc = up(o, &[2, 320, 128, 128], &randn(&mut rng, 2 * 320 * 128 * 128, 1.0));
    let wc = up(o, &[320, 320, 3, 3], &randn(&mut rng, 320 * 2880, 0.02));
    let bc = up(o, &[320], &randn(&mut rng, 320, 0.1));
    let flop = 2.0 * 2.0 * 320.0 * 128.0 * 128.0 * 2880.0;
    let had = o.uses_cudnn();
    for cudnn in [true, false] {
        o.set_cudnn(cudnn);
        if cudnn && !o.uses_cudnn() {
            continue;
        }
        let label = if cudnn { "cuDNN" } else { "im2col" };
        time(&format!("conv3x3 2x320x128x128 -> 320 ({label})"), flop, &|| {
            let _ = o.conv2d(&xc, &wc, Some(&bc), 1, 1).unwrap();
        });
    }
    o.set_cudnn(had);
    let q = up(o, &[2, 4096, 640], &randn(&mut rng, 2 * 4096 * 640, 1.0));
    for flash in [true, false] {
        o.set_flash_attention(flash);
        let label = if flash { "fused" } else { "cuBLAS + softmax" };
        time(&format!("attention SDXL 2x4096x4096, 10 heads x 64 ({label})"), 4.0 * 2.0 * 10.0 * 4096.0 * 4096.0 * 64.0, &|| {
            let _ = o.attention(&q, &q, &q, 10, false).unwrap();
        });
    }
    o.set_flash_attention(true);
    let qf = up(o, &[1, 4608, 3072], &randn(&mut rng, 4608 * 3072, 1.0));
    let qs = up(o, &[1, 4250, 38 * 64], &randn(&mut rng, 4250 * 38 * 64, 1.0));
    for variant in FlashVariant::ALL {
        o.set_flash_variant(variant);
        time(&format!("attention FLUX 1x4608x4608, 24 heads x 128 (fused {variant:?})"), 4.0 * 24.0 * 4608.0 * 4608.0 * 128.0, &|| {
            let _ = o.attention(&qf, &qf, &qf, 24, false).unwrap();
        });
        time(
            &format!("attention SD3.5-large 1x4250x4250, 38 heads x 64 (fused {variant:?})"),
            4.0 * 38.0 * 4250.0 * 4250.0 * 64.0,
            &|| {
                let _ = o.attention(&qs, &qs, &qs, 38, false).unwrap();
            },
        );
    }
    o.set_flash_variant(FlashVariant::DEFAULT);
    let gn_x = up(o, &[2, 320, 128, 128], &randn(&mut rng, 2 * 320 * 128 * 128, 1.0));
    let g = up(o, &[320], &vec![1.0; 320]);
    let s = time("group_norm", 0.0, &|| {
        let _ = o.group_norm(&gn_x, 32, &g, &g, 1e-5).unwrap();
    });
    let bytes = 2.0 * 2.0 * 320.0 * 16384.0 * 2.0; // one read, one write
    println!("group_norm 2x320x128x128: {:.3} ms, {:.0} GB/s (read + write)", s * 1e3, bytes / s / 1e9);
    println!("peak device memory {:.1} MiB", o.peak_device_bytes().unwrap() as f64 / (1 << 20) as f64);
}
