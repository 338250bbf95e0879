//! SmoothQuant folded into the UNet: the fold must leave the model's function
//! unchanged (forward passes on the CPU backend), the real preset recipes
//! drive it through the `smoothing` WIT interface, and the output file records
//! the factors so `check` verifies it against its source.

mod common;

use std::collections::HashMap;

use quantsmith::calibrate::smooth::{self, Carrier, Smoothed, Smoothing};
use quantsmith::checkpoint::Checkpoint;
use quantsmith::evaluate::check_output;
use quantsmith::formats::SourceDtype;
use quantsmith::formats::numerics::encode_source;
use quantsmith::models::unet::{Unet, UnetConfig};
use quantsmith::models::{InputHooks, ReplacedWeights, WeightSource};
use quantsmith::modules::ModuleTable;
use quantsmith::nn::Ops;
use quantsmith::nn::cpu::CpuOps;
use quantsmith::pipeline;
use quantsmith::synth::Family;

/// Factors spread over [1/4, 4], different per channel and group.
fn spread_factors(groups: &[smooth::Group]) -> Smoothing {
    let mut s = Smoothing::default();
    for (g, group) in groups.iter().enumerate() {
        let factors = (0..group.channels).map(|j| 2f32.powf(((j * 7 + g * 3) % 17) as f32 / 4.0 - 2.0)).collect();
        s.insert(Smoothed { group: group.clone(), alpha: 0.5, factors });
    }
    s
}

/// Output of the UNet with `replaced` tensors against the unchanged one, relative L2.
fn forward_distance(ckpt: &Checkpoint, replaced: HashMap<String, (Vec<usize>, SourceDtype, Vec<u8>)>) -> f64 {
    let ops = CpuOps::new();
    let src: &dyn WeightSource = ckpt;
    let cfg = UnetConfig::from_source(src, ckpt.prefix()).unwrap();
    let reference = Unet::load(&ops, src, ckpt.prefix(), cfg.clone()).unwrap();
    let folded = Unet::load(&ops, &ReplacedWeights { base: src, replaced }, ckpt.prefix(), cfg.clone()).unwrap();
    let side = 8;
    let x: Vec<f32> = quantsmith::calibrate::session::gaussian(cfg.in_channels * side * side, 3, 1.0);
    let x = ops.from_f32(&[1, cfg.in_channels, side, side], &x).unwrap();
    let ctx_dim = cfg.context_dim.unwrap();
    let context = ops.from_f32(&[1, 77, ctx_dim], &quantsmith::calibrate::session::gaussian(77 * ctx_dim, 4, 1.0)).unwrap();
    let y = cfg.adm_in_channels.map(|adm| ops.from_f32(&[1, adm], &quantsmith::calibrate::session::gaussian(adm, 5, 1.0)).unwrap());
    let run = |u: &Unet<CpuOps>| ops.to_f32(&u.forward(&ops, &x, &[500.0], &context, y.as_ref(), &InputHooks::none()).unwrap()).unwrap();
    let (want, got) = (run(&reference), run(&folded));
    let (mut dd, mut rr) = (0f64, 0f64);
    for (w, g) in want.iter().zip(&got) {
        dd += ((g - w) as f64).powi(2);
        rr += (*w as f64).powi(2);
    }
    (dd / rr).sqrt()
}

fn folded_f32(ckpt: &Checkpoint, transforms: &HashMap<String, smooth::Transform>) -> HashMap<String, (Vec<usize>, SourceDtype, Vec<u8>)> {
    transforms
        .iter()
        .map(|(k, t)| {
            let shape = ckpt.get(k).unwrap().shape.clone();
            (k.clone(), (shape, SourceDtype::F32, encode_source(SourceDtype::F32, &smooth::transformed_f32(ckpt, k, t).unwrap())))
        })
        .collect()
}

fn fold_preserves_the_function(family: Family, expect_proj_in: bool) {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(&common::conditioned(dir.path(), family)).unwrap();
    let modules = ModuleTable::build(&ckpt);
    let groups = smooth::groups(&modules);
    let suffixes = [".norm1", ".norm2", ".norm3", ".attn1.to_v", ".attn2.to_v", ".ff.net.0.proj"];
    for s in suffixes {
        assert!(groups.iter().any(|g| g.producer.ends_with(s)), "{family:?}: no group with a producer ending in {s}");
    }
    assert_eq!(groups.iter().any(|g| g.producer.ends_with(".norm") && g.consumers[0].ends_with(".proj_in")), expect_proj_in, "{family:?}");
    // GEGLU's hidden half: ff.net.2's input channels are half of ff.net.0.proj's rows.
    let geglu = groups.iter().find(|g| g.consumers[0].ends_with(".ff.net.2")).unwrap();
    assert_eq!(geglu.carrier, Carrier::Rows { start: 0 });
    assert_eq!(modules.get(&geglu.producer).unwrap().weight_shape[0], 2 * geglu.channels);

    let smoothing = spread_factors(&groups);
    let transforms = smoothing.transforms(&modules).unwrap();
    let exact = forward_distance(&ckpt, folded_f32(&ckpt, &transforms));
    assert!(exact < 1e-5, "{family:?}: folding every group changed the output by {exact}");

    // Folds missing their producer side (consumer columns multiplied, to_v rows left alone) are caught.
    let mut broken = transforms.clone();
    for (k, t) in broken.iter_mut() {
        if k.ends_with(".to_v.weight") {
            t.row_div.clear();
        }
    }
    let d = forward_distance(&ckpt, folded_f32(&ckpt, &broken));
    assert!(d > 1e-3 && d > 100.0 * exact, "{family:?}: a broken fold went unnoticed ({d} vs {exact})");
}

#[test]
fn folding_into_sd15_norms_and_rows_leaves_the_unet_unchanged() {
    // SD1.5's proj_in is a 1x1 convolution: not a Linear, not smoothed.
    fold_preserves_the_function(Family::Sd15, false);
}

#[test]
fn folding_into_sdxl_norms_and_rows_leaves_the_unet_unchanged() {
    fold_preserves_the_function(Family::Sdxl, true);
}

#[test]
fn int8_with_smoothquant_writes_a_folded_model_that_check_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::conditioned(dir.path(), Family::Sdxl);
    let output = dir.path().join("out.safetensors");
    let report = pipeline::run(&common::calib_options(&input, &output, Some("sdxl"), &["format=int8", "smoothquant=0.5"])).unwrap();
    let c = report.calibration.as_ref().unwrap_or_else(|| panic!("no calibration: {:?}", report.notes));
    assert!(c.notes.iter().any(|n| n.contains("smoothquant: alpha 0.5")), "{:?}", c.notes);
    let source = Checkpoint::open(&input).unwrap();
    let groups = smooth::groups(&ModuleTable::build(&source));
    assert_eq!(c.smoothing.len(), groups.len(), "every group has an INT8 consumer");
    // Outlier channels are what SmoothQuant shrinks: the input amax never grows
    // past what alpha allows and shrinks for most groups.
    let shrunk = c.smoothing.iter().filter(|g| g.amax_after < g.amax_before).count();
    assert!(shrunk * 2 > c.smoothing.len(), "{shrunk} of {} groups shrank their input amax", c.smoothing.len());

    let check = check_output(&source, &output).unwrap();
    assert!(check.smoothed_tensors > 0);
    let bytes = std::fs::read(&output).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let recorded = smooth::Smoothing::from_metadata(&meta.metadata().as_ref().unwrap()[smooth::METADATA_KEY]).unwrap();
    assert_eq!(recorded.groups.len(), groups.len());
    // A norm in the output is the source's divided by the factors.
    let norm = groups.iter().find(|g| g.producer.ends_with(".norm1")).unwrap();
    let key = format!("{}{}.weight", source.prefix(), norm.producer);
    let out = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_ne!(out.tensor(&key).unwrap().data(), source.bytes(source.get(&key).unwrap()), "{key} was not folded");

    // The evaluation compares the folded, fake-quantized model with the original.
    let e = c.eval.as_ref().unwrap();
    let modes: Vec<&str> = e.modes.iter().map(|m| m.mode.as_str()).collect();
    assert_eq!(modes, ["weights-only", "static", "static-unsmoothed"]);
    assert!(e.modes.iter().all(|m| m.output.cosine > 0.95), "{:?}", e.modes);
    let paired = e.smoothed_minus_unsmoothed.expect("the smoothing's effect, paired");
    assert_eq!(paired.inputs, 2);
    // Smoothing changes the quantized model: the two modes must not coincide.
    assert_ne!(e.modes[1].output.relative_l2, e.modes[2].output.relative_l2);
    assert!(e.layers.iter().all(|l| l.input.cosine > 0.9), "per-layer drift after undoing the smoothing");
}

#[test]
fn check_refuses_a_folded_file_whose_factors_were_stripped() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::conditioned(dir.path(), Family::Sd15);
    let output = dir.path().join("out.safetensors");
    pipeline::run(&common::calib_options(&input, &output, Some("sd15"), &["format=fp8", "smoothquant=0.8"])).unwrap();
    let source = Checkpoint::open(&input).unwrap();
    check_output(&source, &output).unwrap();
    // Rewrite the file without the factors: the folded norms no longer match the source.
    let bytes = std::fs::read(&output).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut metadata = meta.metadata().clone().unwrap();
    assert!(metadata.remove(smooth::METADATA_KEY).is_some());
    let stripped = dir.path().join("stripped.safetensors");
    safetensors::serialize_to_file(st.tensors(), Some(metadata), &stripped).unwrap();
    // Either a folded norm or a smoothed layer's scale gives it away, both in a transformer block.
    let err = check_output(&source, &stripped).unwrap_err();
    assert!(format!("{err:#}").contains("transformer_blocks"), "{err:#}");
}

#[test]
fn fp8_input_scales_follow_the_smoothed_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::conditioned(dir.path(), Family::Sd15);
    let plain =
        pipeline::run(&common::calib_options(&input, &dir.path().join("plain.safetensors"), Some("sd15"), &["format=fp8"])).unwrap();
    let smoothed = pipeline::run(&common::calib_options(
        &input,
        &dir.path().join("smooth.safetensors"),
        Some("sd15"),
        &["format=fp8", "smoothquant=0.5"],
    ))
    .unwrap();
    let (p, s) = (plain.calibration.unwrap(), smoothed.calibration.unwrap());
    let by_path: HashMap<&str, f32> = p.layers.iter().map(|l| (l.path.as_str(), l.amax)).collect();
    for l in &s.layers {
        let before = by_path[l.path.as_str()];
        if !l.smoothed {
            assert_eq!(l.amax, before, "{}: not smoothed, same observations, same amax", l.path);
            continue;
        }
        let g = s.smoothing.iter().find(|g| g.consumers.contains(&l.path)).unwrap();
        // Same seeds, same walk: the smoothed amax is exactly max_j amax_j / s_j.
        assert_eq!(l.amax, g.amax_after, "{}", l.path);
        assert_eq!(before, g.amax_before, "{}", l.path);
        assert_eq!(l.input_scale, Some(l.amax / 448.0));
    }
    assert!(s.layers.iter().any(|l| l.smoothed) && s.layers.iter().any(|l| !l.smoothed));
}

#[test]
fn smoothquant_alpha_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("out.safetensors");
    let err = pipeline::run(&common::calib_options(&input, &output, Some("sd15"), &["format=int8", "smoothquant=1.5"])).unwrap_err();
    assert!(format!("{err:#}").contains("smoothquant must be"), "{err:#}");
    std::fs::remove_file(&output).ok();
    let err = pipeline::run(&common::calib_options(&input, &output, Some("sd15"), &["format=int8", "smoothquant=strong"])).unwrap_err();
    assert!(format!("{err:#}").contains("smoothquant must be"), "{err:#}");
    common::assert_no_output(dir.path(), &output);
    common::assert_no_output(dir.path(), &output);
}

#[test]
fn a_calibrating_recipe_built_against_contract_0_1_1_still_calibrates() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("out.safetensors");
    let recipe = common::fixture("contract-0-1-1");
    let mut o = common::calib_options(&input, &output, Some(recipe.to_str().unwrap()), &[]);
    o.params = Default::default();
    let report = pipeline::run(&o).unwrap();
    let c = report.calibration.as_ref().unwrap_or_else(|| panic!("no calibration: {:?}", report.notes));
    assert_eq!(c.session.forwards, 1);
    assert!(c.notes.iter().any(|n| n.contains("0.1.1 recipe")));
    let check = check_output(&Checkpoint::open(&input).unwrap(), &output).unwrap();
    assert_eq!(check.input_scales.len(), report.totals.quantized_layers);
}

#[test]
fn auto_smooths_int8_and_nvfp4_but_not_fp8() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "sd15");
    for (format, smoothed) in [("int8", true), ("nvfp4", true), ("fp8", false)] {
        let output = dir.path().join(format!("{format}.safetensors"));
        let mut o = common::calib_options(&input, &output, Some("sd15"), &[&format!("format={format}")]);
        o.calibration.eval_inputs = 0;
        let report = pipeline::run(&o).unwrap();
        let c = report.calibration.unwrap_or_else(|| panic!("{format}: no calibration: {:?}", report.notes));
        assert_eq!(!c.smoothing.is_empty(), smoothed, "{format}");
        assert_eq!(check_output(&Checkpoint::open(&input).unwrap(), &output).unwrap().smoothed_tensors > 0, smoothed, "{format}");
    }
}

#[test]
fn sdxl_refiner_runs_calibrates_and_smooths() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_with(dir.path(), "sdxl", Some("refiner"), false);
    let output = dir.path().join("out.safetensors");
    let report = pipeline::run(&common::calib_options(&input, &output, Some("sdxl"), &["format=int8"])).unwrap();
    assert_eq!((report.detection.family.as_str(), report.detection.variant.as_str()), ("sdxl", "refiner"));
    let c = report.calibration.unwrap();
    // Refiner blocks: context 1280, no transformer at the first and last levels.
    assert!(!c.smoothing.is_empty());
    assert!(c.smoothing.iter().all(|g| !g.producer.starts_with("input_blocks.1.")));
    let source = Checkpoint::open(&input).unwrap();
    let cfg = UnetConfig::from_source(&source as &dyn WeightSource, source.prefix()).unwrap();
    assert_eq!((cfg.context_dim, cfg.adm_in_channels, cfg.time_embed_dim), (Some(1280), Some(2560), 128));
    assert!(check_output(&source, &output).unwrap().smoothed_tensors > 0);
}

#[test]
fn a_recipe_built_against_contract_0_1_2_still_calibrates_and_smooths() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("out.safetensors");
    let recipe = common::fixture("contract-0-1-2");
    let mut o = common::calib_options(&input, &output, Some(recipe.to_str().unwrap()), &[]);
    o.params = Default::default();
    let report = pipeline::run(&o).unwrap();
    let c = report.calibration.as_ref().unwrap_or_else(|| panic!("no calibration: {:?}", report.notes));
    assert_eq!(c.session.forwards, 1);
    assert!(!c.smoothing.is_empty(), "the 0.1.2 recipe smooths every group");
    assert!(c.notes.iter().any(|n| n.contains("0.1.2 recipe")), "{:?}", c.notes);
    assert!(check_output(&Checkpoint::open(&input).unwrap(), &output).unwrap().smoothed_tensors > 0);
}

#[test]
fn dit_groups_follow_the_carrier_table() {
    let dir = tempfile::tempdir().unwrap();
    // FLUX: modulation rows feed qkv and the MLP of both streams and single blocks' linear1;
    // both streams' V rows feed both output projections (joint attention).
    let flux = Checkpoint::open(&common::synth_tiny(dir.path(), "flux")).unwrap();
    let modules = ModuleTable::build(&flux);
    let groups = smooth::groups(&modules);
    let h = modules.get("double_blocks.0.img_attn.proj").unwrap().weight_shape[1];
    let find = |p: &str| {
        groups
            .iter()
            .find(|g| g.producer == p)
            .unwrap_or_else(|| panic!("no group {p}: {:?}", groups.iter().map(|g| &g.producer).collect::<Vec<_>>()))
    };
    let g = find("double_blocks.0.img_mod.lin:attn");
    assert_eq!(
        (g.carrier, g.module.as_deref(), g.consumers.clone()),
        (
            Carrier::Modulation { shift_start: 0, scale_start: h },
            Some("double_blocks.0.img_mod.lin"),
            vec!["double_blocks.0.img_attn.qkv".to_string()]
        )
    );
    assert_eq!(find("double_blocks.0.txt_mod.lin:mlp").carrier, Carrier::Modulation { shift_start: 3 * h, scale_start: 4 * h });
    let v = find("double_blocks.0.img_attn.qkv");
    assert_eq!(v.carrier, Carrier::Rows { start: 2 * h });
    assert_eq!(v.also, vec![("double_blocks.0.txt_attn.qkv".to_string(), Carrier::Rows { start: 2 * h })]);
    assert_eq!(v.consumers, vec!["double_blocks.0.img_attn.proj".to_string(), "double_blocks.0.txt_attn.proj".to_string()]);
    assert_eq!(find("single_blocks.37.modulation.lin:linear1").consumers, vec!["single_blocks.37.linear1".to_string()]);
    assert!(
        groups.iter().all(|g| !g.consumers.iter().any(|c| c.ends_with("linear2") || c.ends_with("_mlp.2"))),
        "GELU-fed inputs have no carrier"
    );
    // Two groups on one modulation Linear divide disjoint rows; the scale rows' bias is `(b + 1) / s - 1`.
    let s = spread_factors(&groups);
    let t = s.transforms(&modules).unwrap();
    let bias = &t["double_blocks.0.img_mod.lin.bias"];
    assert_eq!(bias.row_div.len(), 4);
    assert_eq!(bias.row_div.iter().filter(|d| d.one_plus).map(|d| d.start).collect::<Vec<_>>(), vec![h, 4 * h]);
    assert!(t["double_blocks.0.img_mod.lin.weight"].row_div.iter().all(|d| !d.one_plus));

    // SD3: adaLN modulation of both sides; the last context block is pre-only (no MLP, no proj).
    let sd3 = Checkpoint::open(&common::synth_tiny(dir.path(), "sd3")).unwrap();
    let modules = ModuleTable::build(&sd3);
    let groups = smooth::groups(&modules);
    let last = (0..).take_while(|i| modules.get(&format!("joint_blocks.{i}.x_block.attn.qkv")).is_some()).count() - 1;
    let names: Vec<&str> = groups.iter().map(|g| g.producer.as_str()).collect();
    for p in [
        "joint_blocks.0.x_block.adaLN_modulation.1:attn",
        "joint_blocks.0.x_block.adaLN_modulation.1:mlp",
        "joint_blocks.0.context_block.adaLN_modulation.1:mlp",
        "joint_blocks.0.x_block.attn.qkv",
    ] {
        assert!(names.contains(&p), "no {p} in {names:?}");
    }
    assert!(names.contains(&format!("joint_blocks.{last}.context_block.adaLN_modulation.1:attn").as_str()));
    assert!(!names.contains(&format!("joint_blocks.{last}.context_block.adaLN_modulation.1:mlp").as_str()));
    let v = groups.iter().find(|g| g.producer == format!("joint_blocks.{last}.x_block.attn.qkv")).unwrap();
    assert_eq!(v.consumers, vec![format!("joint_blocks.{last}.x_block.attn.proj")], "the pre-only context block has no proj");
    assert_eq!(v.also.len(), 1, "its V rows still join the attention");
}
