use super::*;
use crate::nn::cpu::CpuOps;

const W: TextWidths = TextWidths { clip_l: 2, clip_g: 3, context: 8, empty_tokens: 4 };

/// `[b, n, c]` with element value `base + 100 b + 10 n + c` (each one identifiable).
fn t(ops: &CpuOps, b: usize, n: usize, c: usize, base: f32) -> <CpuOps as Ops>::Tensor {
    let v: Vec<f32> = (0..b * n * c).map(|i| base + (100 * (i / (n * c)) + 10 * (i / c % n) + i % c) as f32).collect();
    ops.from_f32(&[b, n, c], &v).unwrap()
}

fn p(ops: &CpuOps, b: usize, c: usize, base: f32) -> <CpuOps as Ops>::Tensor {
    let v: Vec<f32> = (0..b * c).map(|i| base + i as f32).collect();
    ops.from_f32(&[b, c], &v).unwrap()
}

fn get(ops: &CpuOps, x: &<CpuOps as Ops>::Tensor) -> (Vec<usize>, Vec<f32>) {
    (ops.shape(x), ops.to_f32(x).unwrap())
}

#[test]
fn sd3_joins_clips_on_features_pads_to_context_then_appends_t5() {
    let ops = CpuOps::new();
    // CLIP-L has 3 tokens, CLIP-G 2: both cut to 2.
    let l = ClipOutput { hidden: t(&ops, 1, 3, 2, 1000.0), pooled: p(&ops, 1, 2, 1.0) };
    let g = ClipOutput { hidden: t(&ops, 1, 2, 3, 2000.0), pooled: p(&ops, 1, 3, 5.0) };
    let t5 = t(&ops, 1, 2, 8, 3000.0);
    let c = sd3(&ops, 1, W, Some(&l), Some(&g), Some(&t5)).unwrap();
    let (shape, v) = get(&ops, &c.context);
    assert_eq!(shape, vec![1, 4, 8]);
    let want: Vec<f32> = vec![
        1000.0, 1001.0, 2000.0, 2001.0, 2002.0, 0.0, 0.0, 0.0, // token 0: L ‖ G ‖ zeros
        1010.0, 1011.0, 2010.0, 2011.0, 2012.0, 0.0, 0.0, 0.0, // token 1
        3000.0, 3001.0, 3002.0, 3003.0, 3004.0, 3005.0, 3006.0, 3007.0, // T5 tokens after
        3010.0, 3011.0, 3012.0, 3013.0, 3014.0, 3015.0, 3016.0, 3017.0,
    ];
    assert_eq!(v, want);
    assert_eq!(get(&ops, &c.pooled), (vec![1, 5], vec![1.0, 2.0, 5.0, 6.0, 7.0]));
}

#[test]
fn sd3_missing_encoders_are_zeros_of_their_shape() {
    let ops = CpuOps::new();
    let g = ClipOutput { hidden: t(&ops, 2, 1, 3, 2000.0), pooled: p(&ops, 2, 3, 5.0) };
    // No CLIP-L: G after CLIP-L's zero features; no T5: the CLIP part alone.
    let c = sd3(&ops, 2, W, None, Some(&g), None).unwrap();
    assert_eq!(
        get(&ops, &c.context),
        (vec![2, 1, 8], vec![0.0, 0.0, 2000.0, 2001.0, 2002.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2100.0, 2101.0, 2102.0, 0.0, 0.0, 0.0])
    );
    assert_eq!(get(&ops, &c.pooled), (vec![2, 5], vec![0.0, 0.0, 5.0, 6.0, 7.0, 0.0, 0.0, 8.0, 9.0, 10.0]));
    // T5 alone: its tokens, pooled all zeros.
    let t5 = t(&ops, 1, 3, 8, 3000.0);
    let c = sd3(&ops, 1, W, None, None, Some(&t5)).unwrap();
    assert_eq!(get(&ops, &c.context), get(&ops, &t5));
    assert_eq!(get(&ops, &c.pooled), (vec![1, 5], vec![0.0; 5]));
    // Nothing: zeros [B, 77-like, context].
    let c = sd3(&ops, 1, W, None, None, None).unwrap();
    assert_eq!(get(&ops, &c.context), (vec![1, 4, 8], vec![0.0; 32]));
    // Wrong widths are refused.
    let bad = ClipOutput { hidden: t(&ops, 1, 2, 4, 0.0), pooled: p(&ops, 1, 2, 0.0) };
    assert!(sd3(&ops, 1, W, Some(&bad), None, None).is_err());
}

#[test]
fn flux_is_t5_tokens_and_clip_l_pooled() {
    let ops = CpuOps::new();
    let w = TextWidths { clip_g: 0, ..W };
    let t5 = t(&ops, 1, 3, 8, 3000.0);
    let l = p(&ops, 1, 2, 1.0);
    let c = flux(&ops, 1, w, Some(&l), Some(&t5)).unwrap();
    assert_eq!(get(&ops, &c.context), get(&ops, &t5));
    assert_eq!(get(&ops, &c.pooled), (vec![1, 2], vec![1.0, 2.0]));
    let c = flux(&ops, 2, w, None, None).unwrap();
    assert_eq!(get(&ops, &c.context), (vec![2, 4, 8], vec![0.0; 64]));
    assert_eq!(get(&ops, &c.pooled), (vec![2, 2], vec![0.0; 4]));
    assert_eq!((SD3_WIDTHS.clip_l + SD3_WIDTHS.clip_g, FLUX_WIDTHS.empty_tokens), (2048, 256));
}
