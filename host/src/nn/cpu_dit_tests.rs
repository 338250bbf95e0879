//! The diffusion-transformer and T5 operations of [`CpuOps`] against slow f64
//! references written from the contract in `nn/mod.rs` (plain loops over flat
//! row-major data), plus hand-checked values.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use super::*;
use crate::nn::QkvPart;

fn t(ops: &CpuOps, shape: &[usize], v: &[f32]) -> Tensor {
    ops.from_f32(shape, v).unwrap()
}

fn randn(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.sample::<f32, _>(StandardNormal)).collect()
}

/// Relative L2 distance of `got` from the f64 reference `want`.
fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(1e-300)).sqrt()
}

#[track_caller]
fn close(what: &str, got: &[f32], want: &[f64]) {
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    let e = rel_l2(got, want);
    assert!(e <= 1e-6, "{what}: relative L2 {e:.3e} > 1e-6");
}

// ---- f64 references ---------------------------------------------------------

fn ref_rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f64> {
    let c = w.len();
    x.chunks(c)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / c as f64;
            let r = 1.0 / (ms + eps as f64).sqrt();
            row.iter().zip(w).map(move |(&v, &w)| v as f64 * r * w as f64).collect::<Vec<_>>()
        })
        .collect()
}

/// Row-major strides of `dims`.
fn strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// Multi-index of flat position `i` in `dims`.
fn unravel(mut i: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for d in (0..dims.len()).rev() {
        idx[d] = i % dims[d];
        i /= dims[d];
    }
    idx
}

fn ref_narrow(x: &[f32], dims: &[usize], dim: usize, start: usize, len: usize) -> Vec<f64> {
    let mut out_dims = dims.to_vec();
    out_dims[dim] = len;
    let s = strides(dims);
    (0..out_dims.iter().product::<usize>())
        .map(|i| {
            let mut idx = unravel(i, &out_dims);
            idx[dim] += start;
            x[idx.iter().zip(&s).map(|(a, b)| a * b).sum::<usize>()] as f64
        })
        .collect()
}

fn ref_permute(x: &[f32], dims: &[usize], perm: &[usize]) -> Vec<f64> {
    let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
    let s = strides(dims);
    (0..x.len())
        .map(|i| {
            let o = unravel(i, &out_dims);
            // output index o[k] runs along input dim perm[k].
            x[o.iter().zip(perm).map(|(&v, &p)| v * s[p]).sum::<usize>()] as f64
        })
        .collect()
}

fn ref_modulate(x: &[f32], shift: &[f32], scale: &[f32], b: usize, n: usize, c: usize) -> Vec<f64> {
    let mut y = vec![0f64; b * n * c];
    for bi in 0..b {
        for ni in 0..n {
            for ci in 0..c {
                let i = (bi * n + ni) * c + ci;
                y[i] = x[i] as f64 * (1.0 + scale[bi * c + ci] as f64) + shift[bi * c + ci] as f64;
            }
        }
    }
    y
}

fn ref_gated_add(x: &[f32], gate: &[f32], y: &[f32], b: usize, n: usize, c: usize) -> Vec<f64> {
    (0..b * n * c).map(|i| x[i] as f64 + gate[(i / (n * c)) * c + i % c] as f64 * y[i] as f64).collect()
}

fn ref_rope(x: &[f32], cos: &[f32], sin: &[f32], b: usize, n: usize, heads: usize, d: usize) -> Vec<f64> {
    let mut y = vec![0f64; x.len()];
    let half = d / 2;
    for bi in 0..b {
        for ni in 0..n {
            for h in 0..heads {
                for i in 0..half {
                    let base = (bi * n + ni) * heads * d + h * d + 2 * i;
                    let (x0, x1) = (x[base] as f64, x[base + 1] as f64);
                    let (c, s) = (cos[ni * half + i] as f64, sin[ni * half + i] as f64);
                    y[base] = c * x0 - s * x1;
                    y[base + 1] = s * x0 + c * x1;
                }
            }
        }
    }
    y
}

#[allow(clippy::too_many_arguments)]
fn ref_attention_biased(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: &[f32],
    b: usize,
    nq: usize,
    nk: usize,
    heads: usize,
    d: usize,
    scale: f32,
) -> Vec<f64> {
    let w = heads * d;
    let mut out = vec![0f64; b * nq * w];
    for bi in 0..b {
        for h in 0..heads {
            for i in 0..nq {
                let s: Vec<f64> = (0..nk)
                    .map(|j| {
                        let dot: f64 =
                            (0..d).map(|e| q[(bi * nq + i) * w + h * d + e] as f64 * k[(bi * nk + j) * w + h * d + e] as f64).sum();
                        scale as f64 * dot + bias[(h * nq + i) * nk + j] as f64
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = p.iter().sum();
                for e in 0..d {
                    out[(bi * nq + i) * w + h * d + e] = (0..nk).map(|j| p[j] / z * v[(bi * nk + j) * w + h * d + e] as f64).sum();
                }
            }
        }
    }
    out
}

fn ref_gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

// ---- tests --------------------------------------------------------------------

#[test]
fn rms_norm_matches_reference() {
    let ops = CpuOps::new();
    // Hand-checked: [3, 4] has mean square 12.5, so it becomes [3, 4]/sqrt(12.5) * w.
    let got = ops.to_f32(&ops.rms_norm(&t(&ops, &[1, 2], &[3.0, 4.0]), &t(&ops, &[2], &[1.0, 2.0]), 0.0).unwrap()).unwrap();
    close("rms hand", &got, &[3.0 / 12.5f64.sqrt(), 8.0 / 12.5f64.sqrt()]);
    let mut rng = StdRng::seed_from_u64(1);
    let x = randn(&mut rng, 2 * 5 * 24);
    let w = randn(&mut rng, 24);
    for eps in [1e-6f32, 0.5] {
        let got = ops.to_f32(&ops.rms_norm(&t(&ops, &[2, 5, 24], &x), &t(&ops, &[24], &w), eps).unwrap()).unwrap();
        close("rms_norm", &got, &ref_rms_norm(&x, &w, eps));
    }
    // eps enters under the root: a zero row stays zero, never NaN.
    let got = ops.to_f32(&ops.rms_norm(&t(&ops, &[1, 3], &[0.0; 3]), &t(&ops, &[3], &[1.0; 3]), 1e-6).unwrap()).unwrap();
    assert_eq!(got, vec![0.0; 3]);
    assert!(ops.rms_norm(&t(&ops, &[1, 3], &[0.0; 3]), &t(&ops, &[2], &[1.0; 2]), 1e-6).is_err());
}

#[test]
fn mul_narrow_and_permute_match_reference() {
    let ops = CpuOps::new();
    let mut rng = StdRng::seed_from_u64(2);
    let a = randn(&mut rng, 60);
    let b = randn(&mut rng, 60);
    let got = ops.to_f32(&ops.mul(&t(&ops, &[3, 4, 5], &a), &t(&ops, &[3, 4, 5], &b)).unwrap()).unwrap();
    let want: Vec<f64> = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).collect();
    close("mul", &got, &want);
    assert!(ops.mul(&t(&ops, &[3, 20], &a), &t(&ops, &[3, 4, 5], &b)).is_err());

    let dims = [2, 3, 4, 5];
    let x = randn(&mut rng, 120);
    let xt = t(&ops, &dims, &x);
    for (dim, start, len) in [(0, 1, 1), (1, 1, 2), (2, 0, 4), (3, 2, 3), (3, 4, 1)] {
        let y = ops.narrow(&xt, dim, start, len).unwrap();
        let mut want_dims = dims.to_vec();
        want_dims[dim] = len;
        assert_eq!(ops.shape(&y), want_dims);
        let got = ops.to_f32(&y).unwrap();
        let want = ref_narrow(&x, &dims, dim, start, len);
        assert_eq!(got, want.iter().map(|&v| v as f32).collect::<Vec<_>>(), "narrow {dim} {start} {len}");
    }
    assert!(ops.narrow(&xt, 3, 3, 3).is_err());
    assert!(ops.narrow(&xt, 4, 0, 1).is_err());

    // Up to 6 dimensions: the FLUX patchify permutation among them.
    let dims6 = [2, 3, 2, 2, 3, 2];
    let x6 = randn(&mut rng, dims6.iter().product());
    let x6t = t(&ops, &dims6, &x6);
    for perm in [[0usize, 2, 4, 1, 3, 5], [5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5]] {
        let y = ops.permute(&x6t, &perm).unwrap();
        assert_eq!(ops.shape(&y), perm.iter().map(|&p| dims6[p]).collect::<Vec<_>>());
        let want: Vec<f32> = ref_permute(&x6, &dims6, &perm).iter().map(|&v| v as f32).collect();
        assert_eq!(ops.to_f32(&y).unwrap(), want, "permute {perm:?}");
    }
    // Hand-checked 2-D transpose.
    let y = ops.permute(&t(&ops, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), &[1, 0]).unwrap();
    assert_eq!(ops.to_f32(&y).unwrap(), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    assert!(ops.permute(&xt, &[0, 1, 1, 2]).is_err());
    assert!(ops.permute(&xt, &[0, 1, 2]).is_err());
}

#[test]
fn modulate_and_gated_add_match_reference() {
    let ops = CpuOps::new();
    // Hand-checked: x=2, scale=0.5, shift=1 -> 2*1.5+1 = 4; x + gate*y = 1 + 3*2 = 7.
    let one = |v: f32, shape: &[usize]| t(&ops, shape, &[v]);
    let got = ops.modulate(&one(2.0, &[1, 1, 1]), &one(1.0, &[1, 1]), &one(0.5, &[1, 1])).unwrap();
    assert_eq!(ops.to_f32(&got).unwrap(), vec![4.0]);
    let got = ops.gated_add(&one(1.0, &[1, 1, 1]), &one(3.0, &[1, 1]), &one(2.0, &[1, 1, 1])).unwrap();
    assert_eq!(ops.to_f32(&got).unwrap(), vec![7.0]);

    let (b, n, c) = (2, 5, 12);
    let mut rng = StdRng::seed_from_u64(3);
    let x = randn(&mut rng, b * n * c);
    let y = randn(&mut rng, b * n * c);
    let shift = randn(&mut rng, b * c);
    let scale = randn(&mut rng, b * c);
    let xt = t(&ops, &[b, n, c], &x);
    let got = ops.modulate(&xt, &t(&ops, &[b, c], &shift), &t(&ops, &[b, c], &scale)).unwrap();
    close("modulate", &ops.to_f32(&got).unwrap(), &ref_modulate(&x, &shift, &scale, b, n, c));
    let got = ops.gated_add(&xt, &t(&ops, &[b, c], &scale), &t(&ops, &[b, n, c], &y)).unwrap();
    close("gated_add", &ops.to_f32(&got).unwrap(), &ref_gated_add(&x, &scale, &y, b, n, c));
    assert!(ops.modulate(&xt, &t(&ops, &[1, c], &shift[..c]), &t(&ops, &[b, c], &scale)).is_err());
    assert!(ops.gated_add(&xt, &t(&ops, &[b, c], &scale), &t(&ops, &[b, n - 1, c], &y[..b * (n - 1) * c])).is_err());
}

#[test]
fn rope_matches_reference() {
    let ops = CpuOps::new();
    // Hand-checked: a quarter turn maps the pair (1, 2) to (-2, 1).
    let got = ops.rope(&t(&ops, &[1, 1, 2], &[1.0, 2.0]), &t(&ops, &[1, 1], &[0.0]), &t(&ops, &[1, 1], &[1.0]), 1).unwrap();
    assert_eq!(ops.to_f32(&got).unwrap(), vec![-2.0, 1.0]);

    let (b, n, heads, d) = (2, 7, 3, 8);
    let mut rng = StdRng::seed_from_u64(4);
    let x = randn(&mut rng, b * n * heads * d);
    let angles: Vec<f32> = randn(&mut rng, n * d / 2);
    let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    let got = ops.rope(&t(&ops, &[b, n, heads * d], &x), &t(&ops, &[n, d / 2], &cos), &t(&ops, &[n, d / 2], &sin), heads).unwrap();
    close("rope", &ops.to_f32(&got).unwrap(), &ref_rope(&x, &cos, &sin, b, n, heads, d));
    assert!(ops.rope(&t(&ops, &[b, n, heads * d], &x), &t(&ops, &[n, d / 2], &cos), &t(&ops, &[n, d / 2], &sin), 5).is_err());
}

#[test]
fn attention_biased_matches_reference() {
    let ops = CpuOps::new();
    // Hand-checked: one query, two equal-score keys, bias [0, ln 3] -> weights [1/4, 3/4].
    let got = ops
        .attention_biased(
            &t(&ops, &[1, 1, 1], &[0.0]),
            &t(&ops, &[1, 2, 1], &[1.0, 1.0]),
            &t(&ops, &[1, 2, 1], &[4.0, 8.0]),
            1,
            &t(&ops, &[1, 1, 2], &[0.0, 3f32.ln()]),
            1.0,
        )
        .unwrap();
    close("attention_biased hand", &ops.to_f32(&got).unwrap(), &[7.0]);

    let mut rng = StdRng::seed_from_u64(5);
    for (b, nq, nk, heads, d, scale) in [(2, 5, 7, 3, 4, 1.0f32), (1, 9, 9, 2, 8, 0.35)] {
        let w = heads * d;
        let q = randn(&mut rng, b * nq * w);
        let k = randn(&mut rng, b * nk * w);
        let v = randn(&mut rng, b * nk * w);
        let bias = randn(&mut rng, heads * nq * nk);
        let got = ops
            .attention_biased(
                &t(&ops, &[b, nq, w], &q),
                &t(&ops, &[b, nk, w], &k),
                &t(&ops, &[b, nk, w], &v),
                heads,
                &t(&ops, &[heads, nq, nk], &bias),
                scale,
            )
            .unwrap();
        let want = ref_attention_biased(&q, &k, &v, &bias, b, nq, nk, heads, d, scale);
        close("attention_biased", &ops.to_f32(&got).unwrap(), &want);
    }
    // A zero bias with scale 1/sqrt(D) is plain attention.
    let (b, n, heads, d) = (1, 6, 2, 4);
    let q = randn(&mut rng, b * n * heads * d);
    let (qt, zero) = (t(&ops, &[b, n, heads * d], &q), t(&ops, &[heads, n, n], &vec![0.0; heads * n * n]));
    let biased = ops.attention_biased(&qt, &qt, &qt, heads, &zero, 0.5).unwrap();
    let plain = ops.attention(&qt, &qt, &qt, heads, false).unwrap();
    let plain64: Vec<f64> = ops.to_f32(&plain).unwrap().iter().map(|&v| v as f64).collect();
    close("attention_biased = attention", &ops.to_f32(&biased).unwrap(), &plain64);
    assert!(ops.attention_biased(&qt, &qt, &qt, heads, &t(&ops, &[1, n, n], &vec![0.0; n * n]), 1.0).is_err());
}

#[test]
fn gelu_tanh_matches_reference() {
    let ops = CpuOps::new();
    let x: Vec<f32> = (-40..=40).map(|i| i as f32 * 0.2).collect();
    let got = ops.to_f32(&ops.act(&t(&ops, &[x.len()], &x), Act::GeluTanh).unwrap()).unwrap();
    let want: Vec<f64> = x.iter().map(|&v| ref_gelu_tanh(v as f64)).collect();
    for (g, w) in got.iter().zip(&want) {
        assert!((*g as f64 - w).abs() <= 2e-6 * w.abs().max(1.0), "{g} vs {w}");
    }
    // It is not the erf GELU: at -3 they are -0.0040497 and -0.0036374.
    let erf = ops.to_f32(&ops.act(&t(&ops, &[1], &[-3.0]), Act::Gelu).unwrap()).unwrap();
    let tanh = ops.to_f32(&ops.act(&t(&ops, &[1], &[-3.0]), Act::GeluTanh).unwrap()).unwrap();
    assert!((erf[0] - tanh[0]).abs() > 3e-4, "{erf:?} vs {tanh:?}");
}

// ---- fused DiT ops (defaults composed of primitives) ---------------------------

fn ref_ln_modulate(x: &[f32], shift: &[f32], scale: &[f32], b: usize, n: usize, c: usize, eps: f32) -> Vec<f64> {
    let mut y = vec![0f64; b * n * c];
    for bi in 0..b {
        for ni in 0..n {
            let row = &x[(bi * n + ni) * c..(bi * n + ni + 1) * c];
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
            let r = 1.0 / (var + eps as f64).sqrt();
            for ci in 0..c {
                let norm = (row[ci] as f64 - mean) * r;
                y[(bi * n + ni) * c + ci] = norm * (1.0 + scale[bi * c + ci] as f64) + shift[bi * c + ci] as f64;
            }
        }
    }
    y
}

#[test]
fn ln_modulate_matches_reference() {
    let ops = CpuOps::new();
    let mut rng = StdRng::seed_from_u64(21);
    let (b, n, c) = (2, 5, 24);
    let x: Vec<f32> = randn(&mut rng, b * n * c).iter().map(|v| v * 3.0 + 1.5).collect();
    let (shift, scale) = (randn(&mut rng, b * c), randn(&mut rng, b * c));
    let y = ops.ln_modulate(&t(&ops, &[b, n, c], &x), &t(&ops, &[b, c], &shift), &t(&ops, &[b, c], &scale), 1e-6).unwrap();
    close("ln_modulate", &ops.to_f32(&y).unwrap(), &ref_ln_modulate(&x, &shift, &scale, b, n, c, 1e-6));
}

/// q, k, v of `parts` (each `(x [b, n_p, cols], q/k norm scales)`) joined along
/// the tokens, normed per head and rotated, from the `Ops::qkv_heads` contract.
#[allow(clippy::type_complexity)]
fn ref_qkv_heads(
    parts: &[(&[f32], usize, usize, Option<(&[f32], &[f32])>)],
    b: usize,
    heads: usize,
    d: usize,
    eps: f32,
    rope: Option<(&[f32], &[f32])>,
) -> [Vec<f64>; 3] {
    let w = heads * d;
    let total: usize = parts.iter().map(|p| p.1).sum();
    let mut out = [vec![0f64; b * total * w], vec![0f64; b * total * w], vec![0f64; b * total * w]];
    for bi in 0..b {
        let mut tok = 0;
        for &(x, n, cols, norms) in parts {
            for ni in 0..n {
                for (j, o) in out.iter_mut().enumerate() {
                    for h in 0..heads {
                        let src = &x[(bi * n + ni) * cols + j * w + h * d..][..d];
                        let mut v: Vec<f64> = src.iter().map(|&e| e as f64).collect();
                        if let (Some((qn, kn)), true) = (norms, j < 2) {
                            let s = if j == 0 { qn } else { kn };
                            let ms = v.iter().map(|e| e * e).sum::<f64>() / d as f64;
                            let r = 1.0 / (ms + eps as f64).sqrt();
                            v.iter_mut().zip(s).for_each(|(e, &s)| *e *= r * s as f64);
                        }
                        if let (Some((cos, sin)), true) = (rope, j < 2) {
                            for i in 0..d / 2 {
                                let (c, s) = (cos[(tok + ni) * d / 2 + i] as f64, sin[(tok + ni) * d / 2 + i] as f64);
                                let (x0, x1) = (v[2 * i], v[2 * i + 1]);
                                v[2 * i] = c * x0 - s * x1;
                                v[2 * i + 1] = s * x0 + c * x1;
                            }
                        }
                        o[(bi * total + tok + ni) * w + h * d..][..d].copy_from_slice(&v);
                    }
                }
            }
            tok += n;
        }
    }
    out
}

#[test]
fn qkv_heads_matches_reference() {
    let ops = CpuOps::new();
    let mut rng = StdRng::seed_from_u64(22);
    let (b, heads, d) = (2, 3, 8);
    let w = heads * d;
    // Part 1: 4 tokens of a plain qkv projection with norms; part 2: 6 tokens whose
    // projection carries 16 more columns (FLUX's linear1), without norms.
    let (n1, c1, n2, c2) = (4, 3 * w, 6, 3 * w + 16);
    let x1 = randn(&mut rng, b * n1 * c1);
    let x2 = randn(&mut rng, b * n2 * c2);
    let (qn, kn) = (randn(&mut rng, d), randn(&mut rng, d));
    let (cos, sin) = (randn(&mut rng, (n1 + n2) * d / 2), randn(&mut rng, (n1 + n2) * d / 2));
    let (t1, t2) = (t(&ops, &[b, n1, c1], &x1), t(&ops, &[b, n2, c2], &x2));
    let (tq, tk) = (t(&ops, &[d], &qn), t(&ops, &[d], &kn));
    let (tc, ts) = (t(&ops, &[n1 + n2, d / 2], &cos), t(&ops, &[n1 + n2, d / 2], &sin));
    let parts = [QkvPart { qkv: &t1, q_norm: Some(&tq), k_norm: Some(&tk) }, QkvPart { qkv: &t2, q_norm: None, k_norm: None }];
    for rope in [false, true] {
        let r = rope.then_some((&tc, &ts));
        let got = ops.qkv_heads(&parts, w, heads, 1e-6, r).unwrap();
        let refs = [(&x1[..], n1, c1, Some((&qn[..], &kn[..]))), (&x2[..], n2, c2, None)];
        let want = ref_qkv_heads(&refs, b, heads, d, 1e-6, rope.then_some((&cos[..], &sin[..])));
        for (name, (g, w)) in ["q", "k", "v"].iter().zip(got.iter().zip(&want)) {
            assert_eq!(ops.shape(g), [b, n1 + n2, heads * d]);
            close(&format!("qkv_heads {name} (rope {rope})"), &ops.to_f32(g).unwrap(), w);
        }
    }
    // One part, as FLUX single blocks and SD3's attn2 use it.
    let got = ops.qkv_heads(&parts[..1], w, heads, 1e-6, None).unwrap();
    let want = ref_qkv_heads(&[(&x1[..], n1, c1, Some((&qn[..], &kn[..])))], b, heads, d, 1e-6, None);
    close("qkv_heads single part q", &ops.to_f32(&got[0]).unwrap(), &want[0]);
    // A part narrower than q|k|v is refused.
    let small = t(&ops, &[b, 2, 2 * w], &randn(&mut rng, b * 2 * 2 * w));
    assert!(ops.qkv_heads(&[QkvPart { qkv: &small, q_norm: None, k_norm: None }], w, heads, 1e-6, None).is_err());
}

#[test]
fn concat_act_matches_reference() {
    let ops = CpuOps::new();
    let mut rng = StdRng::seed_from_u64(23);
    let (b, n, ac, xc, start, len) = (2, 3, 8, 40, 24, 16);
    let a = randn(&mut rng, b * n * ac);
    let x = randn(&mut rng, b * n * xc);
    let y = ops.concat_act(&t(&ops, &[b, n, ac], &a), &t(&ops, &[b, n, xc], &x), start, len, Act::GeluTanh).unwrap();
    assert_eq!(ops.shape(&y), [b, n, ac + len]);
    let want: Vec<f64> = (0..b * n)
        .flat_map(|r| {
            let left = a[r * ac..(r + 1) * ac].iter().map(|&v| v as f64);
            let right = x[r * xc + start..r * xc + start + len].iter().map(|&v| ref_gelu_tanh(v as f64));
            left.chain(right).collect::<Vec<_>>()
        })
        .collect();
    close("concat_act", &ops.to_f32(&y).unwrap(), &want);
}
