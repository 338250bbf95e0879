//! Calibration of the diffusion transformers (SD3/3.5, FLUX.1) end to end on the
//! CPU backend: the real preset recipes walk rectified-flow trajectories (CFG
//! pairs for SD3, distilled guidance for FLUX.1-dev, none for schnell) through
//! the WIT 0.1.3 `sampling` interface, observed activations become static
//! scales in the real output file, SmoothQuant folds into the adaLN modulation
//! rows and V rows, bad text-encoder inputs are refused before any work, and
//! prompts run end to end (`run-recipe synth`, `run`, `check`) through
//! `--text-encoder` files on tiny models whose text widths are the tiny
//! encoders' (`synth --tiny-text`).

mod common;

use std::collections::HashMap;

use quantsmith::calibrate::CalibrationReport;
use quantsmith::calibrate::smooth::{self, Carrier, Smoothed, Smoothing};
use quantsmith::checkpoint::Checkpoint;
use quantsmith::evaluate::check_output;
use quantsmith::formats::SourceDtype;
use quantsmith::formats::numerics::encode_source;
use quantsmith::models::arch::Architecture;
use quantsmith::models::denoiser::{Conditioning, Denoiser};
use quantsmith::models::{InputHooks, ReplacedWeights, WeightSource};
use quantsmith::modules::ModuleTable;
use quantsmith::nn::Ops;
use quantsmith::nn::cpu::CpuOps;
use quantsmith::pipeline::{self, Refused, RunReport};

fn calibrated(r: &RunReport) -> &CalibrationReport {
    r.calibration.as_ref().unwrap_or_else(|| panic!("no calibration ran; notes: {:?}", r.notes))
}

#[test]
fn flux_dev_calibrates_fp8_with_distilled_guidance() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "flux");
    let output = dir.path().join("out.safetensors");
    let report = pipeline::run(&common::calib_options(&input, &output, Some("flux"), &["format=fp8"])).unwrap();
    let c = calibrated(&report);
    // 2 samples x 3 steps, one conditioning each: no CFG pairs.
    assert_eq!((c.session.forwards, c.session.samples), (6, 6));
    assert!(c.notes.iter().any(|n| n.contains("distilled guidance 3.5")), "{:?}", c.notes);
    assert!(report.uncalibrated_fp8.is_none(), "every FP8 layer got a static scale");
    let check = check_output(&Checkpoint::open(&input).unwrap(), &output).unwrap();
    assert_eq!(check.input_scales.len(), report.totals.quantized_layers);
    assert_eq!(check.full_precision_layers, 0);
    assert!(check.input_scales.values().all(|s| s.is_finite() && *s > 0.0));
    // The paired evaluation ran on DiT walks: weights-only, static and dynamic.
    let e = c.eval.as_ref().unwrap();
    let modes: Vec<&str> = e.modes.iter().map(|m| m.mode.as_str()).collect();
    assert_eq!(modes, ["weights-only", "static", "dynamic"]);
    assert!(e.modes.iter().all(|m| m.output.relative_l2.is_finite()));
    assert!(e.static_minus_dynamic.is_some());
}

#[test]
fn flux_schnell_walks_its_four_steps_without_guidance() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_with(dir.path(), "flux", Some("schnell"), false);
    let output = dir.path().join("out.safetensors");
    let mut o = common::calib_options(&input, &output, Some("flux"), &["format=fp8", "calib-steps=0"]);
    o.calibration.eval_inputs = 0;
    let report = pipeline::run(&o).unwrap();
    assert_eq!(report.detection.variant, "schnell");
    let c = calibrated(&report);
    assert_eq!(c.session.forwards, 2 * 4, "calib-steps=0 takes schnell's 4 steps");
    assert!(c.notes.iter().any(|n| n.contains("no guidance")), "{:?}", c.notes);
    let check = check_output(&Checkpoint::open(&input).unwrap(), &output).unwrap();
    assert_eq!(check.input_scales.len(), report.totals.quantized_layers);
}

#[test]
fn sd3_calibrates_with_cfg_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "sd3");
    let output = dir.path().join("out.safetensors");
    let mut o = common::calib_options(&input, &output, Some("sd3"), &["format=fp8"]);
    o.calibration.eval_inputs = 2;
    let report = pipeline::run(&o).unwrap();
    let c = calibrated(&report);
    // 2 samples x 3 steps, each a negative + positive batch of 2.
    assert_eq!((c.session.forwards, c.session.samples), (6, 12));
    assert!(c.notes.iter().any(|n| n.contains("CFG 4.5")), "{:?}", c.notes);
    let check = check_output(&Checkpoint::open(&input).unwrap(), &output).unwrap();
    assert_eq!(check.input_scales.len(), report.totals.quantized_layers);
}

#[test]
fn flux_int8_smoothquant_folds_into_modulation_rows_and_check_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "flux");
    let output = dir.path().join("out.safetensors");
    let mut o = common::calib_options(&input, &output, Some("flux"), &["format=int8"]);
    o.calibration.eval_inputs = 2;
    let report = pipeline::run(&o).unwrap();
    let c = calibrated(&report);
    assert!(
        c.smoothing.iter().any(|g| g.producer.ends_with("img_mod.lin:attn")),
        "{:?}",
        c.smoothing.iter().map(|g| &g.producer).collect::<Vec<_>>()
    );
    assert!(c.smoothing.iter().any(|g| g.producer.ends_with(".img_attn.qkv")), "V rows of joint attention");
    let check = check_output(&Checkpoint::open(&input).unwrap(), &output).unwrap();
    assert!(check.smoothed_tensors > 0);
    assert!(c.eval.as_ref().unwrap().smoothed_minus_unsmoothed.is_some());
}

/// The model output with `replaced` tensors against the unchanged one, relative L2.
fn forward_distance(ckpt: &Checkpoint, arch: &Architecture, replaced: HashMap<String, (Vec<usize>, SourceDtype, Vec<u8>)>) -> f64 {
    let ops = CpuOps::new();
    let src: &dyn WeightSource = ckpt;
    let reference = Denoiser::load(&ops, src, ckpt.prefix(), arch.clone()).unwrap();
    let folded = reference.load_like(&ops, &ReplacedWeights { base: src, replaced }, ckpt.prefix()).unwrap();
    let shape = arch.latent_shape(1, 64, 64).unwrap();
    let x = ops.from_f32(&shape, &quantsmith::calibrate::session::gaussian(shape.iter().product(), 3, 1.0)).unwrap();
    let tokens = 16;
    let width = reference.context_width();
    let context = ops.from_f32(&[1, tokens, width], &quantsmith::calibrate::session::gaussian(tokens * width, 4, 1.0)).unwrap();
    let p = arch.pooled_width.unwrap();
    let y = ops.from_f32(&[1, p], &quantsmith::calibrate::session::gaussian(p, 5, 1.0)).unwrap();
    let cond = Conditioning { context, y: Some(y), batch: 1, guidance: arch.guidance.into_iter().collect() };
    let run = |d: &Denoiser<CpuOps>| ops.to_f32(&d.model_output(&ops, &x, 0.7, &cond, &InputHooks::none()).unwrap()).unwrap();
    let (want, got) = (run(&reference), run(&folded));
    let (mut dd, mut rr) = (0f64, 0f64);
    for (w, g) in want.iter().zip(&got) {
        dd += ((g - w) as f64).powi(2);
        rr += (*w as f64).powi(2);
    }
    (dd / rr).sqrt()
}

fn fold_preserves_the_function(family: &str, variant: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(&common::synth_with(dir.path(), family, Some(variant), false)).unwrap();
    let arch = Architecture::of(family, variant).unwrap();
    let modules = ModuleTable::build(&ckpt);
    let groups = smooth::groups(&modules);
    assert!(groups.iter().any(|g| matches!(g.carrier, Carrier::Modulation { .. })), "{family}: no modulation group");
    let mut s = Smoothing::default();
    for (g, group) in groups.iter().enumerate() {
        let factors = (0..group.channels).map(|j| 2f32.powf(((j * 7 + g * 3) % 17) as f32 / 4.0 - 2.0)).collect();
        s.insert(Smoothed { group: group.clone(), alpha: 0.5, factors });
    }
    let transforms = s.transforms(&modules).unwrap();
    let folded = |t: &HashMap<String, smooth::Transform>| -> HashMap<String, (Vec<usize>, SourceDtype, Vec<u8>)> {
        t.iter()
            .map(|(k, t)| {
                let shape = ckpt.get(k).unwrap().shape.clone();
                (k.clone(), (shape, SourceDtype::F32, encode_source(SourceDtype::F32, &smooth::transformed_f32(&ckpt, k, t).unwrap())))
            })
            .collect()
    };
    let exact = forward_distance(&ckpt, &arch, folded(&transforms));
    assert!(exact < 1e-4, "{family} {variant}: folding every group changed the output by {exact}");
    // A fold missing the `(b + 1) / s - 1` of the scale rows' bias is caught.
    let mut broken = transforms.clone();
    for t in broken.values_mut() {
        t.row_div.iter_mut().for_each(|d| d.one_plus = false);
    }
    let d = forward_distance(&ckpt, &arch, folded(&broken));
    assert!(d > 1e-3 && d > 10.0 * exact, "{family} {variant}: a broken fold went unnoticed ({d} vs {exact})");
}

#[test]
fn folding_into_flux_modulation_and_v_rows_leaves_the_model_unchanged() {
    fold_preserves_the_function("flux", "dev");
}

#[test]
fn folding_into_sd3_modulation_and_v_rows_leaves_the_model_unchanged() {
    fold_preserves_the_function("sd3", "medium");
}

fn refused(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.downcast_ref::<Refused>().is_some())
}

#[test]
fn a_text_encoder_of_the_wrong_kind_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "flux");
    // A diffusion model is no text encoder.
    let not_an_encoder = common::synth_tiny(dir.path(), "sdxl");
    let output = dir.path().join("out.safetensors");
    let mut o = common::calib_options(&input, &output, Some("flux"), &["format=fp8"]);
    o.calibration.text_encoders = vec![not_an_encoder.clone()];
    let err = pipeline::run(&o).unwrap_err();
    assert!(refused(&err), "bad input (exit 3): {err:#}");
    assert!(format!("{err:#}").contains(&not_an_encoder.display().to_string()), "{err:#}");
    common::assert_no_output(dir.path(), &output);
}

#[test]
fn a_tokenizer_that_does_not_parse_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "sd3");
    let bad = dir.path().join("tokenizer.json");
    std::fs::write(&bad, b"{ not json").unwrap();
    let output = dir.path().join("out.safetensors");
    let mut o = common::calib_options(&input, &output, Some("sd3"), &["format=fp8"]);
    o.calibration.t5_tokenizer = Some(bad.clone());
    let err = pipeline::run(&o).unwrap_err();
    assert!(refused(&err), "bad input (exit 3): {err:#}");
    assert!(format!("{err:#}").contains("tokenizer.json"), "{err:#}");
    common::assert_no_output(dir.path(), &output);
}

#[test]
fn prompts_without_text_encoders_fail_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "flux");
    let output = dir.path().join("out.safetensors");
    let err = pipeline::run(&common::calib_options(&input, &output, Some("flux"), &["format=fp8", "calib-source=prompts"])).unwrap_err();
    assert!(format!("{err:#}").contains("--text-encoder"), "{err:#}");
    common::assert_no_output(dir.path(), &output);
}

const EXE: &str = env!("CARGO_BIN_EXE_run-recipe");

/// Runs the CLI; panics with its output unless it exits 0. Returns stdout.
fn cli(args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(EXE).args(args).env("NO_COLOR", "1").output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    assert!(out.status.success(), "run-recipe {args:?} exited {:?}\nstdout: {stdout}\nstderr: {stderr}", out.status.code());
    stdout
}

/// `run-recipe run` on a tiny DiT whose text widths are the tiny encoders'
/// (`synth --tiny-text`), calibrating FP8 on the CPU once with prompts through
/// `--text-encoder` files and once with random conditioning: the report names the
/// encoders, the scales differ, and both outputs pass `run-recipe check`.
fn prompts_run_through_text_encoder_files(family: &str, encoders: &[&str]) {
    use std::ffi::OsStr;
    let dir = tempfile::tempdir().unwrap();
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data");
    let model = dir.path().join(format!("{family}.safetensors"));
    cli(&[
        "synth".as_ref(),
        family.as_ref(),
        "--scale".as_ref(),
        "tiny".as_ref(),
        "--tiny-text".as_ref(),
        "-o".as_ref(),
        model.as_os_str(),
    ]);
    let mut text_args: Vec<std::ffi::OsString> = Vec::new();
    for e in encoders {
        let path = dir.path().join(format!("{e}.safetensors"));
        cli(&["synth".as_ref(), e.as_ref(), "--scale".as_ref(), "tiny".as_ref(), "-o".as_ref(), path.as_os_str()]);
        text_args.extend(["--text-encoder".into(), path.into_os_string()]);
    }
    text_args.extend(["--clip-vocab".into(), data.join("clip-vocab").into_os_string()]);
    text_args.extend(["--t5-tokenizer".into(), data.join("t5_tokenizer_tiny.json").into_os_string()]);
    text_args.extend(["--set".into(), "calib-source=prompts".into()]);
    let run = |name: &str, extra: &[std::ffi::OsString]| -> (std::path::PathBuf, serde_json::Value) {
        let out = dir.path().join(format!("{name}.safetensors"));
        let report = dir.path().join(format!("{name}.json"));
        let mut args: Vec<&OsStr> =
            vec!["run".as_ref(), model.as_os_str(), "-o".as_ref(), out.as_os_str(), "--report".as_ref(), report.as_os_str()];
        for a in ["--recipe", family, "--device", "cpu", "--calibrate", "on", "--eval-inputs", "1", "--eval-resolution", "64", "-q"] {
            args.push(a.as_ref());
        }
        for s in ["format=fp8", "calib-steps=2", "calib-samples=2", "resolution=64"] {
            args.extend([OsStr::new("--set"), s.as_ref()]);
        }
        args.extend(extra.iter().map(|a| a.as_os_str()));
        cli(&args);
        let checked = cli(&["check".as_ref(), model.as_os_str(), out.as_os_str()]);
        assert!(checked.starts_with("ok: "), "{checked}");
        (out, serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap())
    };
    let (with_text, report) = run("prompts", &text_args);
    let (random, random_report) = run("random", &["--set".into(), "calib-source=random".into()]);
    let notes: Vec<&str> = report["calibration"]["notes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert!(notes.iter().any(|n| n.ends_with("with prompts")), "{notes:?}");
    let encoded_by = notes.iter().find(|n| n.starts_with("prompts are encoded by")).unwrap_or_else(|| panic!("{notes:?}"));
    for e in encoders {
        assert!(encoded_by.contains(&format!("{e}.safetensors")), "{encoded_by}");
    }
    assert_eq!(report["calibration"]["eval"]["conditioning"], "prompts");
    assert_eq!(random_report["calibration"]["eval"]["conditioning"], "random");
    // Both calibrated every FP8 layer; the scales came from different conditioning.
    let src = Checkpoint::open(&model).unwrap();
    let (a, b) = (check_output(&src, &with_text).unwrap().input_scales, check_output(&src, &random).unwrap().input_scales);
    assert!(!a.is_empty() && a.keys().eq(b.keys()));
    assert!(a.values().chain(b.values()).all(|s| s.is_finite() && *s > 0.0));
    let differing = a.iter().filter(|(k, s)| ((*s - b[*k]) / b[*k]).abs() > 1e-3).count();
    assert!(differing * 2 > a.len(), "only {differing} of {} input scales moved with the conditioning", a.len());
}

#[test]
fn sd3_prompts_run_through_clip_l_clip_g_and_t5_files() {
    prompts_run_through_text_encoder_files("sd3", &["clip-l", "clip-g", "t5xxl"]);
}

#[test]
fn flux_prompts_run_through_clip_l_and_t5_files() {
    prompts_run_through_text_encoder_files("flux", &["clip-l", "t5xxl"]);
}
