//! Calibration end to end on the CPU backend: the real preset recipes (wasm)
//! drive forward passes through the `calibration` WIT interface, observed
//! activations become `input_scale` tensors in the real output file, and
//! hostile recipes cannot abuse the host calls.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use quantsmith::calibrate::session::SessionLimits;
use quantsmith::calibrate::{CalibrateMode, CalibrationReport};
use quantsmith::checkpoint::Checkpoint;
use quantsmith::evaluate::check_output;
use quantsmith::pipeline::{self, RunReport};

fn calibrated(r: &RunReport) -> &CalibrationReport {
    r.calibration.as_ref().unwrap_or_else(|| panic!("no calibration ran; notes: {:?}", r.notes))
}

fn f32_scalar(path: &Path, key: &str) -> Option<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(key).ok().map(|t| f32::from_le_bytes(t.data().try_into().unwrap()))
}

/// A `--calib-data` file: `rows` contexts N(0,1)-like with one planted value.
fn calib_data(dir: &Path, rows: usize, width: usize, planted: f32, pooled: bool) -> PathBuf {
    let n = rows * 77 * width;
    let mut ctx: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 2.0).collect();
    ctx[5 * width + 3] = planted;
    let ctx_bytes: Vec<u8> = ctx.iter().flat_map(|v| v.to_le_bytes()).collect();
    let pooled_vals: Vec<f32> = (0..rows * 1280).map(|i| ((i * 31 % 97) as f32 / 97.0) - 0.5).collect();
    let pooled_bytes: Vec<u8> = pooled_vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut tensors = vec![(
        "context".to_string(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, 77, width], &ctx_bytes).unwrap(),
    )];
    if pooled {
        tensors.push((
            "pooled".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, 1280], &pooled_bytes).unwrap(),
        ));
    }
    let path = dir.join("calib.safetensors");
    safetensors::serialize_to_file(tensors, None, &path).unwrap();
    path
}

#[test]
fn fp8_calibration_writes_static_input_scales_that_comfyui_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("out.safetensors");
    let report = pipeline::run(&common::calib_options(&input, &output, Some("sd15"), &["format=fp8"])).unwrap();
    let c = calibrated(&report);
    // 2 samples x 3 steps, one CFG batch of 2 per step.
    assert_eq!(c.session.forwards, 6);
    assert_eq!(c.session.samples, 12);
    assert_eq!(c.session.steps, vec![0, 1, 2]);
    assert_eq!(c.layers.len(), report.totals.quantized_layers);

    let src = Checkpoint::open(&input).unwrap();
    let check = check_output(&src, &output).unwrap();
    assert_eq!(check.input_scales.len(), report.totals.quantized_layers, "every FP8 layer gets an input_scale");
    for l in &c.layers {
        assert!(l.amax > 0.0 && l.amax.is_finite(), "{}: amax {}", l.path, l.amax);
        assert_eq!(l.amax, l.observed_max, "max calibration keeps the observed max");
        let stored = check.input_scales[&l.path].to_bits();
        assert_eq!(stored, (l.amax / 448.0).to_bits(), "{}: input_scale = amax / 448", l.path);
    }
    let meta = std::fs::read(&output).unwrap();
    let (_, m) = safetensors::SafeTensors::read_metadata(&meta).unwrap();
    let calib: serde_json::Value = serde_json::from_str(&m.metadata().as_ref().unwrap()["quantsmith.calibration"]).unwrap();
    assert_eq!(calib["forward_passes"], 6);
}

#[test]
fn cross_attention_key_input_scale_is_the_hand_known_context_max() {
    // attn2.to_k reads the conditioning itself. A value of 1000 planted in the
    // file's context dominates everything else (the negatives are N(0,1)), so
    // the calibrated amax is exactly 1000 and input_scale = 1000 / 448.
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("out.safetensors");
    let data = calib_data(dir.path(), 3, 768, 1000.0, false);
    let mut o = common::calib_options(&input, &output, Some("sd15"), &["format=fp8", "calib-source=file"]);
    o.calibration.calib_data = Some(data);
    let report = pipeline::run(&o).unwrap();
    let c = calibrated(&report);
    let to_k: Vec<_> = c.layers.iter().filter(|l| l.path.ends_with("attn2.to_k")).collect();
    assert!(!to_k.is_empty());
    for l in to_k {
        assert_eq!(l.amax, 1000.0, "{}", l.path);
        assert_eq!(f32_scalar(&output, &format!("{}.input_scale", l.path)), Some(1000.0 / 448.0));
    }
    assert!(c.notes.iter().any(|n| n.contains("--calib-data rows")), "{:?}", c.notes);
    // Evaluated on the file's rows too (the planted 1000 is what the calibration saw).
    assert_eq!(c.eval.as_ref().unwrap().conditioning, Some(quantsmith::calibrate::session::HeldOut::FileRows));
}

#[test]
fn nvfp4_gets_activation_global_scales_and_probe_layers_fp8_scales() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("out.safetensors");
    let report = pipeline::run(&common::calib_options(&input, &output, Some("sd15"), &["format=nvfp4"])).unwrap();
    let c = calibrated(&report);
    let mut nvfp4 = 0;
    for l in &c.layers {
        let want = match l.format.as_str() {
            "nvfp4" => {
                nvfp4 += 1;
                l.amax / 2688.0
            }
            "fp8" => l.amax / 448.0,
            other => panic!("unexpected format {other}"),
        };
        assert_eq!(l.input_scale, Some(want), "{}", l.path);
        assert_eq!(f32_scalar(&output, &format!("{}.input_scale", l.path)), Some(want), "{}", l.path);
    }
    assert!(nvfp4 > 0);
    check_output(&Checkpoint::open(&input).unwrap(), &output).unwrap();
}

#[test]
fn percentile_scales_never_exceed_max_scales() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "sd15");
    let max = pipeline::run(&common::calib_options(&input, &dir.path().join("a.safetensors"), Some("sd15"), &["format=fp8"])).unwrap();
    let pct = pipeline::run(&common::calib_options(
        &input,
        &dir.path().join("b.safetensors"),
        Some("sd15"),
        &["format=fp8", "calib-algorithm=percentile", "calib-percentile=50"],
    ))
    .unwrap();
    let (m, p) = (calibrated(&max), calibrated(&pct));
    assert!(matches!(p.algorithm, quantsmith::calibrate::scales::Algorithm::Percentile(50.0)));
    let mut lower = 0;
    for (a, b) in m.layers.iter().zip(&p.layers) {
        assert_eq!(a.path, b.path);
        // Same seeds, same walk: the same observations, a different reduction.
        assert_eq!(a.observed_max, b.observed_max);
        assert!(b.amax <= a.amax, "{}: {} > {}", a.path, b.amax, a.amax);
        lower += (b.amax < a.amax) as usize;
    }
    assert!(lower > 0, "the median of per-step maxima must be below the max somewhere");
}

#[test]
fn evaluation_reports_output_and_per_layer_agreement() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::conditioned(dir.path(), quantsmith::synth::Family::Sd15);
    let output = dir.path().join("out.safetensors");
    let report = pipeline::run(&common::calib_options(&input, &output, Some("sd15"), &["format=fp8"])).unwrap();
    let e = calibrated(&report).eval.as_ref().expect("evaluation ran");
    assert_eq!(e.inputs, 2);
    let modes: Vec<&str> = e.modes.iter().map(|m| m.mode.as_str()).collect();
    assert_eq!(modes, ["weights-only", "static", "dynamic"]);
    for m in &e.modes {
        // FP8 everywhere on a tiny random UNet stays close to the unquantized output.
        assert!(m.output.relative_l2 > 0.0 && m.output.relative_l2 < 0.25, "{}: {:?}", m.mode, m.output);
        assert!(m.output.cosine > 0.97, "{}: {:?}", m.mode, m.output);
    }
    let w = e.modes[0].output.relative_l2;
    assert!(e.modes[1].output.relative_l2 >= w * 0.5, "activation quantization cannot make the output much closer than weights alone");
    assert!(!e.layers.is_empty());
    assert!(e.layers.iter().all(|l| l.input.cosine > 0.9), "per-layer input drift");
    assert!(e.static_no_worse_than_dynamic.is_some());
}

#[test]
fn sdxl_calibrates_from_prompts_with_a_user_vocabulary() {
    let vocab = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/clip-vocab");
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_with(dir.path(), "sdxl", None, true);
    let output = dir.path().join("out.safetensors");
    let mut o =
        common::calib_options(&input, &output, Some("sdxl"), &["format=fp8", "calib-source=prompts", "calib-samples=1", "calib-steps=2"]);
    o.calibration.clip_vocab = Some(vocab);
    o.calibration.eval_inputs = 1;
    let report = pipeline::run(&o).unwrap();
    let c = calibrated(&report);
    assert_eq!(c.session.forwards, 2);
    assert!(c.notes.iter().any(|n| n.contains("prompts")), "{:?}", c.notes);
    // Calibrated on prompts, evaluated on other prompts through the same encoders.
    assert_eq!(c.eval.as_ref().unwrap().conditioning, Some(quantsmith::calibrate::session::HeldOut::Prompts));
    let check = check_output(&Checkpoint::open(&input).unwrap(), &output).unwrap();
    assert_eq!(check.input_scales.len(), report.totals.quantized_layers);
}

#[test]
fn prompts_without_a_vocabulary_fail_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_with(dir.path(), "sd15", None, true);
    let output = dir.path().join("out.safetensors");
    let err = pipeline::run(&common::calib_options(&input, &output, Some("sd15"), &["format=fp8", "calib-source=prompts"])).unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("--clip-vocab"), "{text}");
    common::assert_no_output(dir.path(), &output);
}

#[test]
fn legacy_layout_stores_scale_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("out.safetensors");
    let mut o = common::calib_options(&input, &output, Some("sd15"), &["format=fp8"]);
    o.layout = quantsmith::convert::Layout::ComfyLegacy;
    let report = pipeline::run(&o).unwrap();
    let check = check_output(&Checkpoint::open(&input).unwrap(), &output).unwrap();
    assert!(check.legacy);
    assert_eq!(check.input_scales.len(), report.totals.quantized_layers);
    let l = &calibrated(&report).layers[0];
    assert_eq!(f32_scalar(&output, &format!("{}.scale_input", l.path)), Some(l.amax / 448.0));
}

#[test]
fn auto_mode_skips_calibration_on_the_cpu_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("out.safetensors");
    let mut o = common::calib_options(&input, &output, Some("sd15"), &["format=fp8"]);
    o.calibration.mode = CalibrateMode::Auto;
    let report = pipeline::run(&o).unwrap();
    assert!(report.calibration.is_none());
    assert!(report.notes.iter().any(|n| n.contains("--calibrate on")), "{:?}", report.notes);
    assert!(check_output(&Checkpoint::open(&input).unwrap(), &output).unwrap().input_scales.is_empty());
}

#[test]
fn int8_plans_calibrate_only_for_smoothquant() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("out.safetensors");
    // INT8 without smoothquant: the preset has nothing to calibrate and says so;
    // `on` turns that into a refusal, with no output left behind.
    let o = common::calib_options(&input, &output, Some("sd15"), &["format=int8", "smoothquant=off"]);
    let err = pipeline::run(&o).unwrap_err();
    assert!(err.downcast_ref::<quantsmith::pipeline::Refused>().is_some_and(|r| r.0.contains("chose not to calibrate")), "{err:#}");
    common::assert_no_output(dir.path(), &output);
}

#[test]
fn a_recipe_built_against_contract_0_1_0_still_runs_without_calibrating() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("out.safetensors");
    let recipe = common::fixture("contract-0-1-0");
    let mut o = common::calib_options(&input, &output, Some(recipe.to_str().unwrap()), &[]);
    o.params = Default::default();
    o.calibration.mode = CalibrateMode::Auto;
    let report = pipeline::run(&o).unwrap();
    assert!(report.totals.quantized_layers > 0);
    assert!(report.notes.iter().any(|n| n.contains("contract 0.1.0")), "{:?}", report.notes);
    check_output(&Checkpoint::open(&input).unwrap(), &output).unwrap();
}

// -- hostile recipes -------------------------------------------------------

fn hostile(mode: &str, limits: SessionLimits) -> anyhow::Error {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("out.safetensors");
    let recipe = common::fixture("hostile");
    let mut o = common::calib_options(&input, &output, Some(recipe.to_str().unwrap()), &[]);
    o.params = Default::default();
    o.params.set(&format!("mode={mode}")).unwrap();
    o.calibration.limits = limits;
    o.limits.timeout = Duration::from_secs(2);
    let err = pipeline::run(&o).expect_err(mode);
    common::assert_no_output(dir.path(), &output);
    err
}

#[test]
fn a_looping_calibration_is_stopped_by_the_cpu_budget() {
    let err = hostile("calib-loop", SessionLimits::default());
    assert!(format!("{err:#}").contains("exceeded its CPU budget"), "{err:#}");
}

/// Host work a calibration asks for counts against the recipe's budget: a loop
/// of cheap requests (randn, schedule, read-back) that keeps the host busy is
/// refused once the 2 s budget is used up and ends as a timeout of `calibrate`,
/// however the recipe handles the refusal. Only forward passes are not charged.
#[test]
fn host_work_a_calibration_asks_for_counts_against_its_budget() {
    let started = std::time::Instant::now();
    let err = hostile("calib-host-loop", SessionLimits::default());
    let elapsed = started.elapsed();
    let msg = format!("{err:#}");
    let e = err
        .chain()
        .find_map(|c| c.downcast_ref::<quantsmith::recipe::RecipeError>())
        .unwrap_or_else(|| panic!("not a recipe error: {msg}"));
    assert!(matches!(e, quantsmith::recipe::RecipeError::Timeout { call: "calibrate", .. }), "{msg}");
    assert!(msg.contains("CPU budget") && msg.contains("host work"), "{msg}");
    assert_eq!(quantsmith::error::exit_code(&err), quantsmith::error::EXIT_RECIPE);
    // Generous: it ends near its budget instead of after 200,000 rounds.
    assert!(elapsed < std::time::Duration::from_secs(60), "took {elapsed:?}");
}

#[test]
fn tensor_size_and_live_memory_are_bounded() {
    let err = hostile("calib-huge-tensor", SessionLimits::default());
    assert!(format!("{err:#}").contains("exceeds the limit"), "{err:#}");
    let err = hostile("calib-hoard", SessionLimits { max_live_elements: 1 << 24, ..SessionLimits::default() });
    assert!(format!("{err:#}").contains("drop tensors you no longer need"), "{err:#}");
}

#[test]
fn forward_pass_budget_and_shape_checks_hold() {
    let err = hostile("calib-forwards", SessionLimits { max_forwards: 3, ..SessionLimits::default() });
    assert!(format!("{err:#}").contains("budget of 3 forward passes"), "{err:#}");
    let err = hostile("calib-bad-handle-shape", SessionLimits::default());
    assert!(format!("{err:#}").contains("batch 1 but the conditioning has 2"), "{err:#}");
    let err = hostile("calib-no-forward", SessionLimits::default());
    assert!(format!("{err:#}").contains("ran no forward pass"), "{err:#}");
}

#[test]
fn smoothing_misuse_gets_errors_not_folds() {
    let err = format!("{:#}", hostile("calib-smooth-abuse", SessionLimits::default()));
    for want in [
        "early: Err(\"smooth: the inputs of",
        "have not been observed yet",
        "unknown: Err(\"smooth: `input_blocks.0.0` is not a smoothing producer",
        "nan: Err(\"smooth: alpha must be in [0, 1], got NaN",
        "big: Err(\"smooth: alpha must be in [0, 1], got 1.5",
        "valid: true",
    ] {
        assert!(err.contains(want), "{want} not in {err}");
    }
}
