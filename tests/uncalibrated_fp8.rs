//! FP8 layers without a static activation scale are never silently run at
//! ComfyUI's activation scale 1.0: by default their `comfy_quant` carries
//! `"full_precision_matrix_mult": true`; `uncalibrated-fp8=fast` opts out.

mod common;

use common::*;
use quantsmith::checkpoint::Checkpoint;
use quantsmith::convert::UncalibratedFp8;
use quantsmith::evaluate::check_output;
use safetensors::SafeTensors;
use serde_json::Value;

/// Each quantized layer's `comfy_quant` object, and the header's metadata entries.
fn comfy_quant(path: &std::path::Path) -> (Vec<(String, Value)>, serde_json::Map<String, Value>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut layers: Vec<(String, Value)> = st
        .iter()
        .filter_map(|(name, view)| name.strip_suffix(".comfy_quant").map(|l| (l.to_string(), serde_json::from_slice(view.data()).unwrap())))
        .collect();
    layers.sort_by(|a, b| a.0.cmp(&b.0));
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let qm: Value = serde_json::from_str(&meta.metadata().clone().unwrap()["_quantization_metadata"]).unwrap();
    (layers, qm["layers"].as_object().unwrap().clone())
}

#[test]
fn uncalibrated_fp8_layers_are_marked_full_precision_by_default() {
    let dir = tempfile::tempdir().unwrap();
    for family in ["flux", "sd3", "sdxl"] {
        let input = synth_tiny(dir.path(), family);
        let source = Checkpoint::open(&input).unwrap();
        let output = dir.path().join(format!("{family}.exact.safetensors"));
        let report = run(&input, &output, None, &["format=fp8"]).unwrap();
        let u = report.uncalibrated_fp8.as_ref().expect("no calibration ran, so every FP8 layer is uncalibrated");
        assert_eq!(u.policy, UncalibratedFp8::Exact);
        assert_eq!(u.layers, report.totals.quantized_layers, "{family}");
        assert!(u.describe().contains("full_precision_matrix_mult"), "{}", u.describe());

        let (layers, meta) = comfy_quant(&output);
        assert_eq!(layers.len(), report.totals.quantized_layers);
        for (layer, conf) in &layers {
            assert_eq!(conf, &serde_json::json!({"format": "float8_e4m3fn", "full_precision_matrix_mult": true}), "{family} {layer}");
            assert_eq!(meta.get(layer), Some(conf), "{family}: _quantization_metadata must carry the same object for {layer}");
        }
        let check = check_output(&source, &output).unwrap();
        assert_eq!((check.full_precision_layers, check.scale_one_layers), (layers.len(), 0));
    }
}

#[test]
fn fast_opts_into_comfyui_scale_one_path() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "flux");
    let source = Checkpoint::open(&input).unwrap();
    let output = dir.path().join("flux.fast.safetensors");
    let report = run(&input, &output, None, &["format=fp8", "uncalibrated-fp8=fast"]).unwrap();
    let u = report.uncalibrated_fp8.as_ref().unwrap();
    assert_eq!(u.policy, UncalibratedFp8::Fast);
    assert!(u.describe().contains("scale 1.0"), "{}", u.describe());
    let (layers, _) = comfy_quant(&output);
    assert!(!layers.is_empty());
    for (layer, conf) in &layers {
        assert_eq!(conf, &serde_json::json!({"format": "float8_e4m3fn"}), "{layer}");
    }
    let check = check_output(&source, &output).unwrap();
    assert_eq!((check.full_precision_layers, check.scale_one_layers), (0, layers.len()));
}

#[test]
fn only_fp8_layers_are_marked() {
    // NVFP4 plans put the probe layers in FP8: only those carry the mark.
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "flux");
    let output = dir.path().join("flux.nvfp4.safetensors");
    let report = run(&input, &output, None, &["format=nvfp4"]).unwrap();
    let (layers, _) = comfy_quant(&output);
    let marked: Vec<&String> = layers.iter().filter(|(_, c)| c.get("full_precision_matrix_mult").is_some()).map(|(l, _)| l).collect();
    let fp8: Vec<&String> = layers.iter().filter(|(_, c)| c["format"] == "float8_e4m3fn").map(|(l, _)| l).collect();
    assert_eq!(marked, fp8);
    assert_eq!(report.uncalibrated_fp8.map(|u| u.layers).unwrap_or(0), fp8.len());
    for (layer, conf) in &layers {
        if conf["format"] == "nvfp4" {
            assert!(conf.get("full_precision_matrix_mult").is_none(), "{layer}");
        }
    }
}

#[test]
fn a_bad_policy_value_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "flux");
    let err = run(&input, &dir.path().join("x.safetensors"), None, &["uncalibrated-fp8=sometimes"]).unwrap_err();
    assert!(format!("{err:#}").contains("uncalibrated-fp8"), "{err:#}");
    assert!(!dir.path().join("x.safetensors").exists());
}

#[test]
fn check_refuses_a_mark_beside_a_static_scale() {
    // A hand-edited output: the mark and an input_scale together contradict each other.
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "flux");
    let source = Checkpoint::open(&input).unwrap();
    let output = dir.path().join("flux.fp8.safetensors");
    run(&input, &output, None, &["format=fp8"]).unwrap();
    let bytes = std::fs::read(&output).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let (layer, _) = comfy_quant(&output).0.into_iter().next().unwrap();
    let scale = 0.5f32.to_le_bytes();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.iter().map(|(n, v)| (n.to_string(), v)).collect();
    tensors.push((format!("{layer}.input_scale"), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![], &scale).unwrap()));
    let edited = dir.path().join("edited.safetensors");
    safetensors::serialize_to_file(tensors, meta.metadata().clone(), &edited).unwrap();
    let err = check_output(&source, &edited).unwrap_err();
    assert!(format!("{err:#}").contains("full_precision_matrix_mult"), "{err:#}");
}
