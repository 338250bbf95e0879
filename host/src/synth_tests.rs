use super::*;

fn spec_of(opts: &SynthOptions, name: &str) -> Spec {
    build(opts).unwrap().into_iter().find(|s| s.tensor.name == name).unwrap()
}

fn opts(family: Family, scale: Scale) -> SynthOptions {
    SynthOptions { scale, seed: 7, ..SynthOptions::new(family) }
}

fn shapes(opts: &SynthOptions) -> HashMap<String, Vec<usize>> {
    plan(opts).unwrap().into_iter().map(|t| (t.name, t.shape)).collect()
}

fn write_tmp(opts: &SynthOptions) -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("synthetic.safetensors");
    write(opts, &path, |_, _| {}).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (dir, bytes)
}

fn values(st: &safetensors::SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    let v = match t.dtype() {
        Dtype::BF16 => t.data().chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F16 => t.data().chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F32 => t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        d => panic!("unexpected dtype {d:?}"),
    };
    (t.shape().to_vec(), v)
}

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n;
    (m, var.sqrt())
}

#[test]
fn parse_names() {
    for f in Family::ALL {
        assert_eq!(Family::parse(f.name()).unwrap(), f);
        assert_eq!(f.to_string().parse::<Family>().unwrap(), f);
    }
    assert_eq!(Family::parse(" FLUX ").unwrap(), Family::Flux);
    assert!(Family::parse("sd2").is_err());
    assert_eq!(Scale::parse("tiny").unwrap(), Scale::Tiny);
    assert_eq!(Scale::parse("Full").unwrap(), Scale::Full);
    assert!(Scale::parse("small").is_err());
    assert_eq!(SynthDtype::parse("bfloat16").unwrap(), SynthDtype::Bf16);
    assert_eq!(SynthDtype::parse("fp16").unwrap(), SynthDtype::F16);
    assert_eq!(SynthDtype::parse("f32").unwrap(), SynthDtype::F32);
    assert!(SynthDtype::parse("fp8").is_err());
    assert_eq!(SynthDtype::default(), SynthDtype::Bf16);
}

#[test]
fn variants() {
    let mut o = SynthOptions::new(Family::Flux);
    assert_eq!(o.resolved_variant().unwrap(), "dev");
    o.variant = Some("Schnell".into());
    assert_eq!(o.resolved_variant().unwrap(), "schnell");
    o.variant = Some("pro".into());
    assert!(plan(&o).unwrap_err().to_string().contains("dev, schnell"));
    let mut o = SynthOptions::new(Family::Sdxl);
    o.variant = Some("inpaint".into());
    assert!(plan(&o).is_err());
    o.variant = Some("base".into());
    assert!(plan(&o).is_ok());
}

#[test]
fn full_plan_matches_manifest() {
    for f in Family::ALL {
        let m = manifest(f).unwrap();
        let o = opts(f, Scale::Full);
        let p = plan(&o).unwrap();
        assert_eq!(p.len(), m.tensors.len(), "{f}");
        let bytes: u64 = p.iter().map(|t| t.byte_len() as u64).sum();
        assert_eq!(bytes, m.params * 2, "{f}: bf16 bytes");
        for (t, mt) in p.iter().zip(&m.tensors) {
            assert_eq!(t.shape, mt.shape, "{}", t.name);
            assert_eq!(t.dtype, Dtype::BF16);
            if f != Family::Flux {
                assert_eq!(t.name, mt.name);
            }
        }
        let o32 = SynthOptions { dtype: SynthDtype::F32, ..o };
        let bytes32: u64 = plan(&o32).unwrap().iter().map(|t| t.byte_len() as u64).sum();
        assert_eq!(bytes32, m.params * 4, "{f}: f32 bytes");
    }
}

#[test]
fn flux_norm_scales_use_released_names() {
    for scale in [Scale::Tiny, Scale::Full] {
        let s = shapes(&opts(Family::Flux, scale));
        assert_eq!(s["double_blocks.0.img_attn.norm.key_norm.scale"], vec![128]);
        assert_eq!(s["single_blocks.37.norm.query_norm.scale"], vec![128]);
        assert!(!s.keys().any(|k| k.ends_with("_norm.weight")));
        assert_eq!(s.keys().filter(|k| k.ends_with("_norm.scale")).count(), 152);
    }
}

#[test]
fn tiny_keeps_key_structure() {
    for f in Family::ALL {
        for &variant in f.variants() {
            for full_checkpoint in [false, true] {
                let base = SynthOptions { variant: Some(variant.into()), full_checkpoint, ..opts(f, Scale::Full) };
                let tiny = SynthOptions { scale: Scale::Tiny, ..base.clone() };
                let (pf, pt) = (plan(&base).unwrap(), plan(&tiny).unwrap());
                assert_eq!(pf.len(), pt.len());
                for (a, b) in pf.iter().zip(&pt) {
                    assert_eq!(a.name, b.name);
                    assert_eq!(a.shape.len(), b.shape.len(), "{}", a.name);
                    assert_eq!(a.dtype, b.dtype);
                }
            }
        }
    }
}

/// Every tiny dimension is the full one, or the full one divided by the family's
/// k; a divided width keeps being a multiple of 32 where it was; widths >= 256
/// stay only where they are interfaces, and interface widths appear only where
/// expected (so no internal width is kept by coincidence).
#[test]
fn tiny_shapes_are_consistent() {
    let interfaces: &[(Family, usize, &[&str])] = &[
        (Family::Sd15, 768, &["attn2.to_k.weight", "attn2.to_v.weight"]),
        (Family::Sdxl, 2048, &["attn2.to_k.weight", "attn2.to_v.weight"]),
        (Family::Sdxl, 2816, &["label_emb.0.0.weight"]),
        (Family::Sd3, 4096, &["context_embedder.weight"]),
        (Family::Sd3, 2048, &["y_embedder.mlp.0.weight"]),
        (Family::Sd3, 256, &["t_embedder.mlp.0.weight"]),
        (Family::Sd3, 36864, &["pos_embed"]),
        (Family::Flux, 4096, &["txt_in.weight"]),
        (Family::Flux, 768, &["vector_in.in_layer.weight"]),
        (Family::Flux, 256, &["time_in.in_layer.weight", "guidance_in.in_layer.weight"]),
    ];
    for f in Family::ALL {
        let k = f.layout().divisor;
        let full = plan(&opts(f, Scale::Full)).unwrap();
        let tiny = shapes(&opts(f, Scale::Tiny));
        for t in &full {
            let ts = &tiny[&t.name];
            for (axis, (&d, &e)) in t.shape.iter().zip(ts).enumerate() {
                if e != d {
                    assert_eq!(e * k, d, "{f} {} axis {axis}", t.name);
                    if d % 32 == 0 {
                        assert_eq!(e % 32, 0, "{f} {} axis {axis}: {d} -> {e}", t.name);
                    }
                } else if d >= 256 {
                    let ok = interfaces
                        .iter()
                        .any(|(ff, w, names)| *ff == f && *w == d && axis == 1 && names.iter().any(|n| t.name.ends_with(n)));
                    assert!(ok, "{f} {} axis {axis}: width {d} kept", t.name);
                }
            }
        }
    }
}

#[test]
fn tiny_keeps_detection_facts() {
    // SD1.5: context 768, 4-D proj_in, no label_emb, model_channels 32.
    let s = shapes(&opts(Family::Sd15, Scale::Tiny));
    assert_eq!(s["input_blocks.0.0.weight"], vec![32, 4, 3, 3]);
    assert_eq!(s["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"][1], 768);
    assert_eq!(s["input_blocks.1.1.proj_in.weight"].len(), 4);
    assert!(!s.contains_key("label_emb.0.0.weight"));
    let mut inpaint = opts(Family::Sd15, Scale::Tiny);
    inpaint.variant = Some("inpaint".into());
    assert_eq!(shapes(&inpaint)["input_blocks.0.0.weight"], vec![32, 9, 3, 3]);
    assert_eq!(shapes(&SynthOptions { scale: Scale::Full, ..inpaint })["input_blocks.0.0.weight"], vec![320, 9, 3, 3]);

    // SDXL: adm 2816, context 2048 in every cross-attention, 2-D proj_in.
    let s = shapes(&opts(Family::Sdxl, Scale::Tiny));
    assert_eq!(s["label_emb.0.0.weight"][1], 2816);
    assert_eq!(s["input_blocks.0.0.weight"], vec![32, 4, 3, 3]);
    let to_k: Vec<_> = s.iter().filter(|(k, _)| k.ends_with("attn2.to_k.weight")).collect();
    assert_eq!(to_k.len(), 70);
    assert!(to_k.iter().all(|(_, sh)| sh[1] == 2048));
    assert_eq!(s["input_blocks.4.1.proj_in.weight"].len(), 2);

    // UNets: every GroupNorm/LayerNorm width divides into 32 groups.
    for f in [Family::Sd15, Family::Sdxl] {
        for (n, sh) in shapes(&opts(f, Scale::Tiny)) {
            if sh.len() == 1 && n.ends_with(".weight") {
                assert_eq!(sh[0] % 32, 0, "{f} {n}");
            }
        }
    }

    // SD3: 24 joint blocks, 16 latent channels, context 4096, pooled 2048.
    let s = shapes(&opts(Family::Sd3, Scale::Tiny));
    let h = s["x_embedder.proj.weight"][0];
    assert_eq!(s["x_embedder.proj.weight"], vec![h, 16, 2, 2]);
    assert_eq!(s["context_embedder.weight"], vec![h, 4096]);
    assert_eq!(s["y_embedder.mlp.0.weight"], vec![h, 2048]);
    assert_eq!(s["t_embedder.mlp.0.weight"], vec![h, 256]);
    assert_eq!(s["pos_embed"], vec![1, 36864, h]);
    assert_eq!(s["final_layer.linear.weight"], vec![64, h]);
    assert!(s.contains_key("joint_blocks.23.x_block.attn.qkv.weight"));
    assert!(!s.contains_key("joint_blocks.24.x_block.attn.qkv.weight"));
    for (n, sh) in &s {
        if n.ends_with("attn.qkv.weight") {
            assert_eq!(sh, &vec![3 * h, h], "{n}");
        }
        if n.ends_with("mlp.fc1.weight") {
            assert_eq!(sh, &vec![4 * h, h], "{n}");
        }
        if n.ends_with("mlp.fc2.weight") {
            assert_eq!(sh, &vec![h, 4 * h], "{n}");
        }
        if n.ends_with("adaLN_modulation.1.weight") {
            let expected =
                if n == "joint_blocks.23.context_block.adaLN_modulation.1.weight" || n.starts_with("final_layer") { 2 } else { 6 };
            assert_eq!(sh, &vec![expected * h, h], "{n}");
        }
    }

    // FLUX: img_in 64, vector_in 768, txt_in 4096, head width 128, 19 + 38 blocks.
    let s = shapes(&opts(Family::Flux, Scale::Tiny));
    let h = s["img_in.weight"][0];
    assert_eq!(s["img_in.weight"], vec![h, 64]);
    assert_eq!(s["vector_in.in_layer.weight"], vec![h, 768]);
    assert_eq!(s["txt_in.weight"], vec![h, 4096]);
    assert_eq!(s["time_in.in_layer.weight"], vec![h, 256]);
    assert_eq!(s["guidance_in.in_layer.weight"], vec![h, 256]);
    assert_eq!(h % 128, 0);
    let mlp = s["double_blocks.0.img_mlp.0.weight"][0];
    assert_eq!(mlp, 4 * h);
    assert!(s.contains_key("double_blocks.18.img_attn.qkv.weight") && !s.contains_key("double_blocks.19.img_attn.qkv.weight"));
    assert!(s.contains_key("single_blocks.37.linear1.weight") && !s.contains_key("single_blocks.38.linear1.weight"));
    for (n, sh) in &s {
        if n.ends_with("attn.qkv.weight") {
            assert_eq!(sh, &vec![3 * h, h], "{n}");
        }
        if n.ends_with("linear1.weight") {
            assert_eq!(sh, &vec![3 * h + mlp, h], "{n}");
        }
        if n.ends_with("linear2.weight") {
            assert_eq!(sh, &vec![h, h + mlp], "{n}");
        }
        if n.ends_with("_mod.lin.weight") {
            assert_eq!(sh, &vec![6 * h, h], "{n}");
        }
        if n.ends_with("modulation.lin.weight") && n.starts_with("single_blocks.") {
            assert_eq!(sh, &vec![3 * h, h], "{n}");
        }
        if n.ends_with("_norm.scale") {
            assert_eq!(sh, &vec![128], "{n}");
        }
    }
    assert_eq!(s["final_layer.adaLN_modulation.1.weight"], vec![2 * h, h]);
}

#[test]
fn tiny_sizes() {
    for f in Family::ALL {
        let bytes: usize = plan(&opts(f, Scale::Tiny)).unwrap().iter().map(|t| t.byte_len()).sum();
        // SDXL's floor: model_channels 32 (GroupNorm) and 140 cross-attention
        // projections that keep their 2048-wide context input.
        let limit = if f == Family::Sdxl { 120_000_000 } else { 45_000_000 };
        assert!(bytes < limit, "{f}: {bytes} bytes");
    }
}

#[test]
fn flux_schnell_has_no_guidance() {
    let mut o = opts(Family::Flux, Scale::Tiny);
    o.variant = Some("schnell".into());
    let s = shapes(&o);
    assert!(!s.keys().any(|k| k.starts_with("guidance_in.")));
    assert_eq!(s.len(), shapes(&opts(Family::Flux, Scale::Tiny)).len() - 4);
    assert!(s.contains_key("time_in.in_layer.weight"));
}

#[test]
fn full_checkpoint_layout() {
    let te_prefix = |f: Family| match f {
        Family::Sd15 => "cond_stage_model.",
        Family::Sdxl => "conditioner.embedders.",
        Family::Sd3 | Family::Flux => "text_encoders.",
    };
    for f in Family::ALL {
        let dm = plan(&opts(f, Scale::Tiny)).unwrap();
        let full = plan(&SynthOptions { full_checkpoint: true, ..opts(f, Scale::Tiny) }).unwrap();
        for (a, b) in dm.iter().zip(&full) {
            assert_eq!(format!("{DIFFUSION_PREFIX}{}", a.name), b.name);
            assert_eq!(a.shape, b.shape);
        }
        let rest = &full[dm.len()..];
        assert!(rest.iter().all(|t| !t.name.starts_with(DIFFUSION_PREFIX)));
        let names: HashSet<&str> = full.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names.len(), full.len(), "{f}: duplicate names");
        let size = |p: &str| rest.iter().filter(|t| t.name.starts_with(p)).map(|t| t.byte_len()).sum::<usize>();
        let (vae, te) = (size("first_stage_model."), size(te_prefix(f)));
        assert!((10_000..200_000).contains(&vae), "{f}: VAE {vae} bytes");
        // SD1.5 / SDXL encoders keep their real widths (calibration encodes prompts with them).
        let te_bytes = if matches!(f, Family::Sd15 | Family::Sdxl) { 1_000_000..100_000_000 } else { 10_000..200_000 };
        assert!(te_bytes.contains(&te), "{f}: text encoders {te} bytes");
        assert_eq!(vae + te, rest.iter().map(|t| t.byte_len()).sum::<usize>(), "{f}: stray component tensors");
        assert!(names.contains("first_stage_model.decoder.conv_out.weight"));
        // Components are the same at both scales.
        let full_size = plan(&SynthOptions { full_checkpoint: true, ..opts(f, Scale::Full) }).unwrap();
        assert_eq!(&full_size[full_size.len() - rest.len()..], rest);
    }
    let sd3 = shapes(&SynthOptions { full_checkpoint: true, ..opts(Family::Sd3, Scale::Tiny) });
    for k in [
        "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight",
        "text_encoders.clip_g.transformer.text_projection.weight",
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
        "text_encoders.t5xxl.transformer.shared.weight",
    ] {
        assert!(sd3.contains_key(k), "{k}");
    }
    let sdxl = shapes(&SynthOptions { full_checkpoint: true, ..opts(Family::Sdxl, Scale::Tiny) });
    assert!(sdxl.contains_key("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"));
    assert!(sdxl.contains_key("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"));
    assert!(sdxl.contains_key("first_stage_model.quant_conv.weight"));
    let flux = shapes(&SynthOptions { full_checkpoint: true, ..opts(Family::Flux, Scale::Tiny) });
    assert_eq!(flux["first_stage_model.encoder.conv_out.weight"], vec![32, 32, 3, 3]);
    assert!(!flux.contains_key("first_stage_model.quant_conv.weight"));
}

#[test]
fn opens_as_a_checkpoint() {
    for full_checkpoint in [false, true] {
        let o = SynthOptions { full_checkpoint, ..opts(Family::Sd3, Scale::Tiny) };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        write(&o, &path, |_, _| {}).unwrap();
        let c = crate::checkpoint::Checkpoint::open(&path).unwrap();
        assert_eq!(c.is_full_checkpoint(), full_checkpoint);
        assert_eq!(c.diffusion_tensors().count(), 491);
        assert!(!c.components().contains(&crate::checkpoint::Component::Other));
        assert_eq!(c.components().len(), if full_checkpoint { 3 } else { 1 });
        assert_eq!(c.metadata()[METADATA_KEY], "sd3/medium/tiny/7");
    }
}

#[test]
fn round_trip_and_value_spread() {
    let o = opts(Family::Flux, Scale::Tiny);
    let (_dir, bytes) = write_tmp(&o);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()[METADATA_KEY], "flux/dev/tiny/7");
    let p = plan(&o).unwrap();
    assert_eq!(st.len(), p.len());
    for t in &p {
        let v = st.tensor(&t.name).unwrap();
        assert_eq!(v.shape(), t.shape.as_slice());
        assert_eq!(v.dtype(), Dtype::BF16);
        let (_, vals) = values(&st, &t.name);
        assert!(vals.iter().all(|x| x.is_finite()), "{}", t.name);
    }
    // Data offsets follow the plan's order.
    let offsets: Vec<usize> = p.iter().map(|t| meta.info(&t.name).unwrap().data_offsets.0).collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]));

    let (_, norm) = values(&st, "double_blocks.3.img_attn.norm.key_norm.scale");
    let (m, s) = mean_std(&norm);
    assert!((m - 1.0).abs() < 0.03 && s > 0.02 && s < 0.1, "norm scale {m} {s}");
    let (_, bias) = values(&st, "double_blocks.3.img_attn.qkv.bias");
    let (m, s) = mean_std(&bias);
    assert!(m.abs() < 0.01 && (0.01..0.03).contains(&s), "bias {m} {s}");
    let (shape, w) = values(&st, "double_blocks.3.img_attn.proj.weight");
    let (m, s) = mean_std(&w);
    let fan_in = shape[1] as f64;
    assert!(m.abs() < 0.01, "{m}");
    assert!(s * fan_in.sqrt() > 0.5 && s * fan_in.sqrt() < 1.5 * 2.0, "weight std {s}");

    // Gains differ between layers.
    let gains: Vec<f64> = ["double_blocks.0.img_mlp.2.weight", "double_blocks.1.img_mlp.2.weight", "double_blocks.2.img_mlp.2.weight"]
        .iter()
        .map(|n| mean_std(&values(&st, n).1).1)
        .collect();
    assert!(gains.iter().any(|&g| (g - gains[0]).abs() > 0.05 * gains[0]), "{gains:?}");
}

fn column_norm_ratio(shape: &[usize], w: &[f32]) -> f64 {
    let (rows, cols) = (shape[0], shape[1]);
    let mut norms: Vec<f64> = (0..cols).map(|c| (0..rows).map(|r| (w[r * cols + c] as f64).powi(2)).sum::<f64>().sqrt()).collect();
    let max = norms.iter().cloned().fold(0.0, f64::max);
    norms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    max / norms[cols / 2]
}

#[test]
fn linear_weights_have_outlier_columns() {
    let o = opts(Family::Sd15, Scale::Tiny);
    let (_dir, bytes) = write_tmp(&o);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for name in [
        "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight",
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "time_embed.0.weight",
    ] {
        let (shape, w) = values(&st, name);
        let ratio = column_norm_ratio(&shape, &w);
        assert!(ratio > 4.0, "{name}: max/median column norm {ratio}");
    }
    // Convolutions and norms have none.
    let (shape, w) = values(&st, "input_blocks.1.0.in_layers.2.weight");
    let flat = [shape[0], shape[1..].iter().product()];
    assert!(column_norm_ratio(&flat, &w) < 2.0);
    // ~0.5% of the columns (at least one).
    let cols = outlier_columns(123, 2048);
    assert_eq!(cols.iter().filter(|&&c| c != 1.0).count(), 10);
    assert!(cols.iter().all(|&c| c == 1.0 || (8.0..=20.0).contains(&c)));
    assert_eq!(outlier_columns(5, 64).iter().filter(|&&c| c != 1.0).count(), 1);
}

#[test]
fn conditioned_init() {
    let base = opts(Family::Sd15, Scale::Tiny);
    let cond = SynthOptions { init: SynthInit::Conditioned, full_checkpoint: true, ..base.clone() };
    let (_d1, a) = write_tmp(&SynthOptions { full_checkpoint: true, ..base });
    let (_d2, b) = write_tmp(&cond);
    let (sa, sb) = (safetensors::SafeTensors::deserialize(&a).unwrap(), safetensors::SafeTensors::deserialize(&b).unwrap());
    let (_, meta) = safetensors::SafeTensors::read_metadata(&b).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()[METADATA_KEY], "sd15/base/tiny/7/conditioned");
    let (mut qk, mut scaled, mut same) = (0, 0, 0);
    for (name, _) in sa.tensors() {
        let local = name.strip_prefix(DIFFUSION_PREFIX).unwrap_or(&name);
        let ((shape, x), (_, y)) = (values(&sa, &name), values(&sb, &name));
        let in_unet = name.starts_with(DIFFUSION_PREFIX);
        if in_unet && (local.ends_with(".to_q.weight") || local.ends_with(".to_k.weight")) {
            // Plain 1/sqrt(fan-in) rows: logits q.k/sqrt(d) of std ~1 on RMS-1 inputs.
            assert!(column_norm_ratio(&shape, &x) > 4.0, "{name}: default has outlier columns");
            assert!(column_norm_ratio(&shape, &y) < 2.0, "{name}: outlier columns left");
            let s = mean_std(&y).1 * (shape[1] as f64).sqrt();
            assert!((0.95..1.05).contains(&s), "{name}: std * sqrt(fan-in) = {s}");
            qk += 1;
            continue;
        }
        let expected = match local {
            _ if !in_unet => 1.0,
            n if n.ends_with(".proj_out.weight") => 0.05,
            n if [".out_layers.3.weight", ".to_out.0.weight", ".ff.net.2.weight"].iter().any(|s| n.ends_with(s)) => 0.1,
            _ => 1.0,
        };
        if expected == 1.0 {
            assert!(sa.tensor(&name).unwrap().data() == sb.tensor(&name).unwrap().data(), "{name} changed");
            same += 1;
        } else {
            // The same draws, scaled (each side rounded to bf16 once).
            for (u, v) in x.iter().zip(&y) {
                assert!((v - u * expected).abs() <= (u * expected).abs() / 128.0 + 1e-30, "{name}: {u} -> {v}");
            }
            scaled += 1;
        }
    }
    // 16 transformers: 2 attentions of q and k each; 22 ResBlocks + 16 * (2 to_out + ff + proj_out).
    assert_eq!((qk, scaled), (64, 22 + 16 * 4));
    assert!(same > 500, "{same}");
    // The VAE's `proj_out` and the other families keep the default values.
    assert!(
        sa.tensor("first_stage_model.encoder.mid.attn_1.proj_out.weight").unwrap().data()
            == sb.tensor("first_stage_model.encoder.mid.attn_1.proj_out.weight").unwrap().data()
    );
    // The VAE and text encoders of a DiT checkpoint keep their values too (below).
    assert_eq!(SynthInit::parse(" Conditioned ").unwrap(), SynthInit::Conditioned);
    assert_eq!(SynthInit::Default.to_string().parse::<SynthInit>().unwrap(), SynthInit::Default);
    assert!(SynthInit::parse("trained").is_err());
}

#[test]
fn deterministic_and_seeded() {
    let o = opts(Family::Sd15, Scale::Tiny);
    let (_d1, a) = write_tmp(&o);
    let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let (_d2, b) = one_thread.install(|| write_tmp(&o));
    assert!(a == b, "same seed, different bytes");
    let (_d3, c) = write_tmp(&SynthOptions { seed: 8, ..o.clone() });
    assert_eq!(a.len(), c.len());
    assert!(a != c, "different seeds, same bytes");
    // Tensors keep their values whether or not the file is a full checkpoint.
    let (_d4, full) = write_tmp(&SynthOptions { full_checkpoint: true, ..o.clone() });
    let (sa, sf) = (safetensors::SafeTensors::deserialize(&a).unwrap(), safetensors::SafeTensors::deserialize(&full).unwrap());
    let name = "output_blocks.5.1.transformer_blocks.0.ff.net.0.proj.weight";
    assert!(sa.tensor(name).unwrap().data() == sf.tensor(&format!("{DIFFUSION_PREFIX}{name}")).unwrap().data());
}

#[test]
fn other_dtypes() {
    for dtype in [SynthDtype::F16, SynthDtype::F32] {
        let o = SynthOptions { dtype, full_checkpoint: true, ..opts(Family::Sd3, Scale::Tiny) };
        let (_dir, bytes) = write_tmp(&o);
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            assert_eq!(view.dtype(), dtype.dtype());
            assert!(values(&st, &name).1.iter().all(|x| x.is_finite()), "{name}");
        }
        // Rounding from the same f32 values: bf16 and f16 agree to their precision.
        let bf = write_tmp(&SynthOptions { dtype: SynthDtype::Bf16, ..o.clone() }).1;
        let stb = safetensors::SafeTensors::deserialize(&bf).unwrap();
        let name = format!("{DIFFUSION_PREFIX}joint_blocks.5.x_block.mlp.fc1.weight");
        let (x, y) = (values(&st, &name).1, values(&stb, &name).1);
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() <= a.abs() / 128.0 + 1e-6));
    }
}

#[test]
fn progress_and_failure() {
    let o = opts(Family::Sd3, Scale::Tiny);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.safetensors");
    let calls = std::cell::RefCell::new(Vec::new());
    let summary = write(&o, &path, |d, t| calls.borrow_mut().push((d, t))).unwrap();
    let calls = calls.into_inner();
    assert_eq!(calls.first(), Some(&(0, summary.bytes)));
    assert_eq!(calls.last(), Some(&(summary.bytes, summary.bytes)));
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(summary.tensors, 491);
    assert_eq!(summary.params * 2, summary.bytes);
    let file_len = std::fs::metadata(&path).unwrap().len();
    assert!(file_len > summary.bytes && file_len < summary.bytes + 100_000);
    // A destination in a missing directory fails and leaves nothing.
    let bad = dir.path().join("missing").join("x.safetensors");
    assert!(write(&o, &bad, |_, _| {}).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// Generation speed of one large tensor, without I/O:
/// `cargo test --release synth::tests::bench_generate -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_generate() {
    let mut opts = SynthOptions::new(Family::Flux);
    opts.scale = Scale::Full;
    let spec = spec_of(&opts, "single_blocks.0.linear1.weight");
    let mut buf = vec![0u8; spec.tensor.byte_len()];
    for round in 0..3 {
        let t = std::time::Instant::now();
        generate(&spec, &opts, &mut buf);
        let s = t.elapsed().as_secs_f64();
        println!(
            "round {round}: {:?} {} MB in {:.3} s: {:.0} MB/s, {:.0} M elements/s, {} threads",
            spec.tensor.shape,
            buf.len() / 1_000_000,
            s,
            buf.len() as f64 / 1e6 / s,
            buf.len() as f64 / 2e6 / s,
            rayon::current_num_threads()
        );
    }
}

/// Conditioned SD3 / SD3.5 / FLUX: the q/k producers lose their outlier columns
/// at 1/sqrt(fan-in), the modulation Linears are the same draws times 0.1, the
/// branch outputs the same draws times 0.3, other Linears lose their outlier
/// columns only; everything else (text encoders and VAE included) keeps its bytes.
#[test]
fn conditioned_dit_init() {
    const MODULATION: [&str; 3] = [".adaLN_modulation.1.weight", "_mod.lin.weight", ".modulation.lin.weight"];
    const BRANCH: [&str; 6] =
        [".attn.proj.weight", ".attn2.proj.weight", ".mlp.fc2.weight", "_attn.proj.weight", "_mlp.2.weight", ".linear2.weight"];
    for (family, variant, qk, mods, branch) in [
        (Family::Sd3, "medium", 48, 49, 23 * 2 + 2 * 24),
        (Family::Sd3, "3.5-medium", 48 + 13, 49, 23 * 2 + 2 * 24 + 13),
        (Family::Flux, "dev", 19 * 2 + 38, 19 * 2 + 38 + 1, 19 * 4 + 38),
        (Family::Flux, "schnell", 19 * 2 + 38, 19 * 2 + 38 + 1, 19 * 4 + 38),
    ] {
        let base = SynthOptions { variant: Some(variant.into()), full_checkpoint: true, ..opts(family, Scale::Tiny) };
        let (_d1, a) = write_tmp(&base);
        let (_d2, b) = write_tmp(&SynthOptions { init: SynthInit::Conditioned, ..base });
        let (sa, sb) = (safetensors::SafeTensors::deserialize(&a).unwrap(), safetensors::SafeTensors::deserialize(&b).unwrap());
        let (_, meta) = safetensors::SafeTensors::read_metadata(&b).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()[METADATA_KEY], format!("{family}/{variant}/tiny/7/conditioned"));
        let (mut n_qk, mut n_mods, mut n_branch, mut n_plain, mut same) = (0, 0, 0, 0, 0);
        for (name, _) in sa.tensors() {
            let ((shape, x), (_, y)) = (values(&sa, &name), values(&sb, &name));
            let linear = name.starts_with(DIFFUSION_PREFIX) && shape.len() == 2;
            let scaled = |k: f32| {
                for (u, v) in x.iter().zip(&y) {
                    assert!((v - u * k).abs() <= (u * k).abs() / 128.0 + 1e-30, "{name}: {u} -> {v}");
                }
            };
            if linear && (name.ends_with(".qkv.weight") || name.ends_with(".linear1.weight")) {
                assert!(column_norm_ratio(&shape, &x) > 4.0, "{name}: default has outlier columns");
                assert!(column_norm_ratio(&shape, &y) < 2.0, "{name}: outlier columns left");
                let s = mean_std(&y).1 * (shape[1] as f64).sqrt();
                assert!((0.95..1.05).contains(&s), "{name}: std * sqrt(fan-in) = {s}");
                n_qk += 1;
            } else if linear && MODULATION.iter().any(|s| name.ends_with(s)) {
                scaled(0.1);
                n_mods += 1;
            } else if linear && BRANCH.iter().any(|s| name.ends_with(s)) {
                scaled(0.3);
                n_branch += 1;
            } else if linear {
                // The same draws without the outlier columns' multipliers.
                assert!(column_norm_ratio(&shape, &x) > 4.0, "{name}: default has outlier columns");
                assert!(column_norm_ratio(&shape, &y) < 2.0, "{name}: outlier columns left");
                let equal = x.iter().zip(&y).filter(|(u, v)| u == v).count();
                assert!(equal * 100 >= x.len() * 95, "{name}: {equal} of {} values kept", x.len());
                n_plain += 1;
            } else {
                assert!(sa.tensor(&name).unwrap().data() == sb.tensor(&name).unwrap().data(), "{name} changed");
                same += 1;
            }
        }
        assert_eq!((n_qk, n_mods, n_branch), (qk, mods, branch), "{family} {variant}");
        assert!(n_plain > 0 && same > 100, "{n_plain} {same}");
    }
}

#[test]
fn sd35_variants() {
    use crate::models::mmdit::{MmditConfig, layout};
    for (variant, cfg) in [("3.5-medium", MmditConfig::sd35_medium()), ("3.5-large", MmditConfig::sd35_large())] {
        let o = SynthOptions { variant: Some(variant.into()), ..opts(Family::Sd3, Scale::Full) };
        let full: Vec<(String, Vec<usize>)> = plan(&o).unwrap().into_iter().map(|t| (t.name, t.shape)).collect();
        assert_eq!(full, layout(&cfg), "{variant}");
        let tiny = shapes(&SynthOptions { scale: Scale::Tiny, ..o.clone() });
        assert_eq!(tiny.len(), full.len());
        // Interfaces stay, the width is one 64-wide head.
        assert_eq!(tiny["x_embedder.proj.weight"], vec![64, 16, 2, 2]);
        assert_eq!(tiny["context_embedder.weight"], vec![64, 4096]);
        assert_eq!(tiny["y_embedder.mlp.0.weight"], vec![64, 2048]);
        assert_eq!(tiny["t_embedder.mlp.0.weight"], vec![64, 256]);
        let m = cfg.pos_embed_max_size;
        assert_eq!(tiny["pos_embed"], vec![1, m * m, 64]);
        assert_eq!(tiny["joint_blocks.0.x_block.attn.ln_q.weight"], vec![64]);
        let bytes: usize = plan(&SynthOptions { scale: Scale::Tiny, ..o.clone() }).unwrap().iter().map(|t| t.byte_len()).sum();
        assert!(bytes < 45_000_000, "{variant}: {bytes} bytes");
        let (_d, b) = write_tmp(&SynthOptions { scale: Scale::Tiny, ..o });
        let (_, meta) = safetensors::SafeTensors::read_metadata(&b).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()[METADATA_KEY], format!("sd3/{variant}/tiny/7"));
    }
    let mut o = SynthOptions::new(Family::Sd3);
    o.variant = Some("3.5-Large".into());
    assert_eq!(o.resolved_variant().unwrap(), "3.5-large");
    o.variant = Some("3.5".into());
    assert!(plan(&o).unwrap_err().to_string().contains("medium, 3.5-medium, 3.5-large"));
}

#[test]
fn tiny_text_narrows_only_the_text_interface() {
    use crate::models::text::synth_text::{TINY_CLIP_G_WIDTH, TINY_CLIP_L_WIDTH, TINY_T5_WIDTH};
    for (family, variant, inputs) in [
        (
            Family::Sd3,
            "medium",
            [("context_embedder.weight", TINY_T5_WIDTH), ("y_embedder.mlp.0.weight", TINY_CLIP_L_WIDTH + TINY_CLIP_G_WIDTH)],
        ),
        (
            Family::Sd3,
            "3.5-large",
            [("context_embedder.weight", TINY_T5_WIDTH), ("y_embedder.mlp.0.weight", TINY_CLIP_L_WIDTH + TINY_CLIP_G_WIDTH)],
        ),
        (Family::Flux, "dev", [("txt_in.weight", TINY_T5_WIDTH), ("vector_in.in_layer.weight", TINY_CLIP_L_WIDTH)]),
    ] {
        let o = SynthOptions { variant: Some(variant.into()), ..opts(family, Scale::Tiny) };
        let (plain, narrow) = (shapes(&o), shapes(&SynthOptions { tiny_text: true, ..o.clone() }));
        assert_eq!(plain.len(), narrow.len());
        for (name, shape) in &plain {
            match inputs.iter().find(|(n, _)| n == name) {
                Some(&(_, w)) => assert_eq!(narrow[name], vec![shape[0], w], "{family} {variant} {name}"),
                None => assert_eq!(&narrow[name], shape, "{family} {variant} {name}"),
            }
        }
        let metadata = SynthOptions { tiny_text: true, ..o }.metadata().unwrap();
        assert!(metadata[METADATA_KEY].ends_with("/tiny-text"), "{metadata:?}");
    }
    for o in [
        SynthOptions { tiny_text: true, ..opts(Family::Sdxl, Scale::Tiny) },
        SynthOptions { tiny_text: true, ..opts(Family::Flux, Scale::Full) },
    ] {
        assert!(plan(&o).unwrap_err().to_string().contains("tiny text widths are for tiny SD3 and FLUX"));
    }
}
