//! The presets against synthetic checkpoints of every family, end to end through
//! the real file format and the real wasm components.

mod common;

use common::*;
use quantsmith::checkpoint::Checkpoint;
use quantsmith::evaluate::check_output;
use quantsmith::pipeline::Refused;
use safetensors::{Dtype, SafeTensors};

const FAMILIES: &[&str] = &["sd15", "sdxl", "sd3", "flux"];
const FORMATS: &[&str] = &["fp8", "int8", "nvfp4", "mxfp8"];

/// Layers each family must keep in high precision (ModelOpt's exclusions).
fn excluded(family: &str) -> &'static [&'static str] {
    match family {
        "sd15" => &["time_embed.0", "time_embed.2"],
        "sdxl" => &["time_embed.0", "label_emb.0.0", "label_emb.0.2"],
        "sd3" => &["context_embedder", "t_embedder.mlp.0", "y_embedder.mlp.0", "final_layer.linear"],
        "flux" => &["img_in", "txt_in", "time_in.in_layer", "vector_in.in_layer", "guidance_in.in_layer", "final_layer.linear"],
        _ => unreachable!(),
    }
}

/// Tensors ComfyUI reads to detect the model, with the logical shape they must keep.
fn probes(family: &str) -> &'static [&'static str] {
    match family {
        "sd15" => &["input_blocks.0.0.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"],
        "sdxl" => &[
            "input_blocks.0.0.weight",
            "label_emb.0.0.weight",
            "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
            "input_blocks.4.1.proj_in.weight",
        ],
        "sd3" => &["x_embedder.proj.weight", "context_embedder.weight", "y_embedder.mlp.0.weight"],
        "flux" => &["img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "double_blocks.0.img_attn.norm.key_norm.scale"],
        _ => unreachable!(),
    }
}

#[test]
fn every_preset_and_format_round_trips_through_comfy_layout() {
    let dir = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        let input = synth_tiny(dir.path(), family);
        let source = Checkpoint::open(&input).unwrap();
        for format in FORMATS {
            let output = dir.path().join(format!("{family}.{format}.safetensors"));
            let report = run(&input, &output, None, &[&format!("format={format}")]).unwrap_or_else(|e| panic!("{family} {format}: {e:#}"));
            assert_eq!(report.recipe.name, *family, "auto picks the family's preset");
            assert_eq!(report.detection.family, *family);
            assert!(report.totals.quantized_layers > 10, "{family} {format}: {} layers", report.totals.quantized_layers);
            assert!(report.totals.quantized_bytes_after < report.totals.quantized_bytes_before);

            // Every SPEC rule, pass-through bytes and per-layer error bounds.
            let check = check_output(&source, &output).unwrap_or_else(|e| panic!("{family} {format}: {e:#}"));
            assert_eq!(check.layers.len(), report.totals.quantized_layers);
            let fmt_count = check.layers.values().filter(|(f, _)| f == format).count();
            assert!(fmt_count > 0);
            for (layer, (_, err)) in &check.layers {
                assert!(err.cosine > 0.95, "{family} {format} {layer}: cosine {}", err.cosine);
            }

            let bytes = std::fs::read(&output).unwrap();
            let out = SafeTensors::deserialize(&bytes).unwrap();
            for ex in excluded(family) {
                assert!(out.tensor(&format!("{ex}.comfy_quant")).is_err(), "{family} {format}: {ex} must stay in high precision");
                assert_eq!(out.tensor(&format!("{ex}.weight")).unwrap().dtype(), Dtype::BF16);
            }
            for p in probes(family) {
                let src = source.get(p).unwrap();
                let t = out.tensor(p).unwrap();
                assert_eq!(t.shape(), src.shape.as_slice(), "{family} {format}: probe {p} must keep its logical shape");
                assert!(matches!(t.dtype(), Dtype::BF16 | Dtype::F8_E4M3 | Dtype::I8), "{family} {format}: probe {p} is {:?}", t.dtype());
            }
            let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
            let meta = meta.metadata().clone().unwrap();
            assert_eq!(meta["quantsmith.recipe"], *family);
            assert_eq!(meta["quantsmith.recipe_sha256"].len(), 64);
            assert!(meta["quantsmith.params"].contains(format));
            std::fs::remove_file(&output).unwrap();
        }
    }
}

#[test]
fn full_single_file_checkpoint_keeps_vae_and_text_encoders() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_with(dir.path(), "sdxl", None, true);
    let output = dir.path().join("out.safetensors");
    let report = run(&input, &output, Some("sdxl"), &["format=nvfp4"]).unwrap();
    assert!(report.totals.quantized_layers > 10);
    let source = Checkpoint::open(&input).unwrap();
    assert_eq!(source.prefix(), "model.diffusion_model.");
    let check = check_output(&source, &output).unwrap();
    assert!(check.layers.keys().all(|k| k.starts_with("model.diffusion_model.")));
    let bytes = std::fs::read(&output).unwrap();
    let out = SafeTensors::deserialize(&bytes).unwrap();
    let vae = source.tensors().iter().filter(|t| t.key.starts_with("first_stage_model.")).count();
    let te = source.tensors().iter().filter(|t| t.key.starts_with("conditioner.")).count();
    assert!(vae > 0 && te > 0);
    for t in source.tensors().iter().filter(|t| !t.key.starts_with("model.diffusion_model.")) {
        assert_eq!(out.tensor(&t.key).unwrap().data(), source.bytes(t), "{} passes through", t.key);
    }
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let qm: serde_json::Value = serde_json::from_str(&meta.metadata().clone().unwrap()["_quantization_metadata"]).unwrap();
    assert!(qm["layers"].as_object().unwrap().keys().all(|k| k.starts_with("model.diffusion_model.")));
}

#[test]
fn legacy_scaled_fp8_layout() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("legacy.safetensors");
    let mut opts = options(&input, &output, Some("sd15"), &[]);
    opts.layout = quantsmith::convert::Layout::ComfyLegacy;
    quantsmith::pipeline::run(&opts).unwrap();
    let source = Checkpoint::open(&input).unwrap();
    let check = check_output(&source, &output).unwrap();
    assert!(check.legacy && !check.layers.is_empty());
    let bytes = std::fs::read(&output).unwrap();
    let out = SafeTensors::deserialize(&bytes).unwrap();
    let marker = out.tensor("scaled_fp8").unwrap();
    assert_eq!((marker.dtype(), marker.shape()), (Dtype::F8_E4M3, &[0usize][..]));
    assert!(out.names().iter().all(|n| !n.ends_with(".comfy_quant")));

    // Legacy stores FP8 only.
    let output2 = dir.path().join("legacy-nvfp4.safetensors");
    let mut opts = options(&input, &output2, Some("sd15"), &["format=nvfp4"]);
    opts.layout = quantsmith::convert::Layout::ComfyLegacy;
    let err = quantsmith::pipeline::run(&opts).unwrap_err();
    assert!(format!("{err:#}").contains("FP8 only"), "{err:#}");
    assert_no_output(dir.path(), &output2);
}

#[test]
fn dry_run_plans_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "flux");
    let output = dir.path().join("never.safetensors");
    let mut opts = options(&input, &output, None, &["format=nvfp4"]);
    opts.dry_run = true;
    let report = quantsmith::pipeline::run(&opts).unwrap();
    assert!(!output.exists());
    assert!(report.layers.iter().any(|l| l.format.as_deref() == Some("nvfp4") && l.bytes_after < l.bytes_before / 3));
    assert!(report.layers.iter().any(|l| l.layer == "img_in" && l.format.is_none()));
    assert!(report.totals.output_bytes < report.totals.input_bytes);
}

#[test]
fn wrong_family_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("out.safetensors");
    let err = run(&input, &output, Some("flux"), &[]).unwrap_err();
    assert!(err.chain().any(|c| c.is::<Refused>()), "{err:#}");
    assert!(format!("{err:#}").contains("this is sd15"), "{err:#}");
    assert_no_output(dir.path(), &output);
}

#[test]
fn variants_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    for (family, variant, expect) in [
        ("flux", Some("schnell"), "schnell"),
        ("flux", None, "dev"),
        ("sd15", Some("inpaint"), "inpaint"),
        ("sdxl", None, "base"),
        ("sd3", None, "3-medium"),
    ] {
        let input = synth_with(dir.path(), family, variant, false);
        let output = dir.path().join("v.safetensors");
        let mut opts = options(&input, &output, None, &[]);
        opts.dry_run = true;
        let report = quantsmith::pipeline::run(&opts).unwrap();
        assert_eq!((report.detection.family.as_str(), report.detection.variant.as_str()), (family, expect));
    }
}

/// Probe-only files for variants we have no manifest for.
#[test]
fn refiner_and_sd35_are_told_apart_from_shapes() {
    use safetensors::tensor::TensorView;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, tensors: &[(&str, Vec<usize>)]| {
        let data: Vec<Vec<u8>> = tensors.iter().map(|(_, s)| vec![0u8; s.iter().product::<usize>() * 2]).collect();
        let views: Vec<(String, TensorView)> =
            tensors.iter().zip(&data).map(|((n, s), d)| (n.to_string(), TensorView::new(Dtype::BF16, s.clone(), d).unwrap())).collect();
        let path = dir.path().join(name);
        safetensors::serialize_to_file(views, None, &path).unwrap();
        path
    };
    let refiner = write(
        "refiner.safetensors",
        &[
            ("input_blocks.0.0.weight", vec![384, 4, 3, 3]),
            ("label_emb.0.0.weight", vec![1536, 2560]),
            ("input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", vec![768, 1280]),
        ],
    );
    let sd35 = write(
        "sd35m.safetensors",
        &[
            ("joint_blocks.0.context_block.attn.qkv.weight", vec![4608, 1536]),
            ("joint_blocks.0.x_block.attn.ln_q.weight", vec![64]),
            ("joint_blocks.0.x_block.attn2.qkv.weight", vec![4608, 1536]),
            ("x_embedder.proj.weight", vec![1536, 16, 2, 2]),
        ],
    );
    let runtime = quantsmith::recipe::RecipeRuntime::new(Default::default()).unwrap();
    for (path, family, variant) in [(refiner, "sdxl", "refiner"), (sd35, "sd3", "3.5-medium")] {
        let ctx = quantsmith::pipeline::open_context(&path).unwrap();
        let verdicts = quantsmith::pipeline::detect_all(&runtime, &ctx).unwrap();
        let best = verdicts[0].1.as_ref().unwrap();
        assert_eq!((best.family.as_str(), best.variant.as_str()), (family, variant));
        assert_eq!(verdicts.iter().filter(|v| v.1.is_ok()).count(), 1, "only one preset accepts");
    }
}

#[test]
fn mixed_precision_example_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "flux");
    let output = dir.path().join("mixed.safetensors");
    let recipe = fixture("mixed-example");
    let report = run(&input, &output, Some(recipe.to_str().unwrap()), &["middle-fraction=0.5"]).unwrap();
    assert_eq!(report.recipe.name, "mixed-flux");
    let source = Checkpoint::open(&input).unwrap();
    let check = check_output(&source, &output).unwrap();
    let fmt = |k: &str| check.layers.get(k).map(|(f, _)| f.as_str());
    assert_eq!(fmt("single_blocks.18.linear1"), Some("nvfp4"));
    assert_eq!(fmt("single_blocks.1.linear1"), Some("fp8"));
    assert_eq!(fmt("double_blocks.1.img_attn.qkv"), Some("fp8"));
    assert_eq!(fmt("double_blocks.0.img_attn.qkv"), None, "first block stays bf16");
    assert_eq!(fmt("single_blocks.37.linear2"), None, "last block stays bf16");
}

#[test]
fn parameters_are_validated_before_running() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sdxl");
    let output = dir.path().join("out.safetensors");
    let err = run(&input, &output, Some("sdxl"), &["format=int4"]).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("int4") && msg.contains("fp8, int8, nvfp4, mxfp8") && msg.contains("Weight format"), "{msg}");
    let err = run(&input, &output, Some("sdxl"), &["colour=blue"]).unwrap_err();
    assert!(format!("{err:#}").contains("unknown parameter \"colour\""), "{err:#}");
    assert_no_output(dir.path(), &output);

    // A TOML config, with --set winning.
    let mut opts = options(&input, &output, Some("sdxl"), &["format=int8"]);
    opts.params.load_toml("[params]\nformat = \"mxfp8\"\nexclude = \"output_blocks.*\"\n", "p.toml").unwrap();
    let report = quantsmith::pipeline::run(&opts).unwrap();
    assert_eq!(report.recipe.params["format"], "int8");
    assert!(report.layers.iter().all(|l| !l.layer.starts_with("output_blocks.")));
    assert!(report.layers.iter().all(|l| l.format.as_deref() == Some("int8")));
}

#[test]
fn report_records_per_layer_error_when_verifying() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd3");
    let output = dir.path().join("out.safetensors");
    let mut opts = options(&input, &output, None, &["format=fp8"]);
    opts.verify = true;
    let report = quantsmith::pipeline::run(&opts).unwrap();
    assert!(report.layers.iter().all(|l| l.error.is_some_and(|e| e.relative_l2 < 0.1 && e.cosine > 0.99)));
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["layers"][0]["error"]["relative_l2"].is_number());
    assert!(json["peak_rss_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn output_never_replaces_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let before = std::fs::read(&input).unwrap();
    let err = run(&input, &input, None, &[]).unwrap_err();
    assert!(format!("{err:#}").contains("is the input"), "{err:#}");
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

#[test]
fn cli_exit_codes_distinguish_bad_input_from_success() {
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_run-recipe");
    let input = synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("cli.safetensors");
    let ok = std::process::Command::new(exe)
        .args(["run", input.to_str().unwrap(), "-o", output.to_str().unwrap(), "--quiet", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("sd15"));
    let check = std::process::Command::new(exe).args(["check", input.to_str().unwrap(), output.to_str().unwrap()]).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a checkpoint at all").unwrap();
    let bad = std::process::Command::new(exe)
        .args(["run", garbage.to_str().unwrap(), "-o", dir.path().join("x.safetensors").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(3), "{}", String::from_utf8_lossy(&bad.stderr));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a valid safetensors file"));

    let usage = std::process::Command::new(exe).args(["run"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
}

/// `run-recipe forward` on synthetic FLUX dev and schnell: the CLI writes what
/// `models::flux::Flux::forward` computes from the same inputs (bit for bit on
/// the CPU); inputs that do not fit the model (guidance for schnell, none for
/// dev) are bad input, exit 3, with no output.
#[test]
fn forward_runs_flux_like_the_library() {
    use quantsmith::checkpoint::Checkpoint;
    use quantsmith::models::InputHooks;
    use quantsmith::models::flux::{Flux, FluxConfig};
    use quantsmith::nn::Ops;
    use quantsmith::nn::cpu::CpuOps;
    use safetensors::tensor::TensorView;

    let dir = tempfile::tempdir().unwrap();
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let x: Vec<f32> = (0..16 * 4 * 6).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let ctx: Vec<f32> = (0..3 * 4096).map(|i| ((i * 13 % 97) as f32 / 48.0) - 1.0).collect();
    let y: Vec<f32> = (0..768).map(|i| ((i * 7 % 89) as f32 / 44.0) - 1.0).collect();
    for variant in ["dev", "schnell"] {
        let model = synth_with(dir.path(), "flux", Some(variant), variant == "schnell");
        let dev = variant == "dev";
        let write_inputs = |path: &std::path::Path, guidance: bool| {
            let (xb, tb, cb, yb, gb) = (f32s(&x), f32s(&[0.6]), f32s(&ctx), f32s(&y), f32s(&[3.5]));
            let mut t = vec![
                ("x", TensorView::new(safetensors::Dtype::F32, vec![1, 16, 4, 6], &xb).unwrap()),
                ("timesteps", TensorView::new(safetensors::Dtype::F32, vec![1], &tb).unwrap()),
                ("context", TensorView::new(safetensors::Dtype::F32, vec![1, 3, 4096], &cb).unwrap()),
                ("y", TensorView::new(safetensors::Dtype::F32, vec![1, 768], &yb).unwrap()),
            ];
            if guidance {
                t.push(("guidance", TensorView::new(safetensors::Dtype::F32, vec![1], &gb).unwrap()));
            }
            safetensors::serialize_to_file(t, None, path).unwrap();
        };
        let forward = |inputs: &std::path::Path, out: &std::path::Path| {
            std::process::Command::new(env!("CARGO_BIN_EXE_run-recipe"))
                .args(["forward", model.to_str().unwrap(), "--inputs", inputs.to_str().unwrap()])
                .args(["--out", out.to_str().unwrap(), "--device", "cpu"])
                .output()
                .unwrap()
        };
        let (inputs, out) = (dir.path().join(format!("in-{variant}.st")), dir.path().join(format!("out-{variant}.st")));
        write_inputs(&inputs, dev);
        let r = forward(&inputs, &out);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let bytes = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let got = st.tensor("out").unwrap();
        assert_eq!(got.shape(), [1, 16, 4, 6]);
        let got: Vec<f32> = got.data().chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();

        let ckpt = Checkpoint::open(&model).unwrap();
        let ops = CpuOps::new();
        let flux = Flux::load(&ops, &ckpt, ckpt.prefix(), FluxConfig::from_source(&ckpt, ckpt.prefix()).unwrap()).unwrap();
        let want = flux
            .forward(
                &ops,
                &ops.from_f32(&[1, 16, 4, 6], &x).unwrap(),
                &[0.6],
                &ops.from_f32(&[1, 3, 4096], &ctx).unwrap(),
                &ops.from_f32(&[1, 768], &y).unwrap(),
                dev.then_some(&[3.5f32][..]),
                &InputHooks::none(),
            )
            .unwrap();
        assert_eq!(got, ops.to_f32(&want).unwrap(), "{variant}");
        assert!(got.iter().all(|v| v.is_finite()) && got.iter().any(|&v| v != 0.0));

        // The other variant's inputs: exit 3, no output.
        let (bad, bad_out) = (dir.path().join(format!("bad-{variant}.st")), dir.path().join(format!("bad-out-{variant}.st")));
        write_inputs(&bad, !dev);
        let r = forward(&bad, &bad_out);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(3), "{stderr}");
        assert!(stderr.contains("guidance"), "{stderr}");
        assert!(!bad_out.exists());
    }
}
