//! Corrupt and unsupported inputs: a clear error, the right kind, and no output file.

mod common;

use common::*;
use quantsmith::checkpoint::CheckpointError;

fn expect_checkpoint_error(bytes: &[u8], expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    std::fs::write(&input, bytes).unwrap();
    let output = dir.path().join("out.safetensors");
    let err = run(&input, &output, None, &[]).unwrap_err();
    let msg = format!("{err:#}");
    assert!(err.chain().any(|c| c.is::<CheckpointError>()), "{msg}");
    assert!(msg.contains(expect), "expected {expect:?} in: {msg}");
    assert!(msg.contains("in.safetensors"), "the message names the file: {msg}");
    assert_no_output(dir.path(), &output);
}

fn file_with_header(header: &str, data_len: usize) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend(std::iter::repeat_n(0u8, data_len));
    b
}

#[test]
fn truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(synth_tiny(dir.path(), "sd15")).unwrap();
    expect_checkpoint_error(&good[..good.len() - 1000], "truncated");
    expect_checkpoint_error(&good[..5], "too short");
    expect_checkpoint_error(b"", "too short");
}

#[test]
fn header_length_beyond_the_file() {
    let mut b = (1u64 << 20).to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    expect_checkpoint_error(&b, "beyond the end");
}

#[test]
fn overlapping_offsets() {
    let h = r#"{"a.weight":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},"b.weight":{"dtype":"BF16","shape":[2,2],"data_offsets":[4,12]}}"#;
    expect_checkpoint_error(&file_with_header(h, 12), "overlap");
}

#[test]
fn unknown_dtype() {
    let h = r#"{"a.weight":{"dtype":"Q4_K","shape":[2,2],"data_offsets":[0,8]}}"#;
    expect_checkpoint_error(&file_with_header(h, 8), "unknown dtype");
}

#[test]
fn shape_and_byte_range_disagree() {
    let h = r#"{"a.weight":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]}}"#;
    expect_checkpoint_error(&file_with_header(h, 8), "does not match its shape");
}

#[test]
fn diffusers_layout_is_named() {
    let h = r#"{"conv_in.weight":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},"down_blocks.0.resnets.0.conv1.weight":{"dtype":"BF16","shape":[2,2],"data_offsets":[8,16]}}"#;
    expect_checkpoint_error(&file_with_header(h, 16), "diffusers format");
}

#[test]
fn already_quantized_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("q.safetensors");
    run(&input, &output, None, &[]).unwrap();
    let again = dir.path().join("qq.safetensors");
    let err = run(&output, &again, None, &[]).unwrap_err();
    assert!(format!("{err:#}").contains("already quantized"), "{err:#}");
    assert_no_output(dir.path(), &again);
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = run(&dir.path().join("absent.safetensors"), &dir.path().join("o.safetensors"), None, &[]).unwrap_err();
    assert!(err.chain().any(|c| c.is::<CheckpointError>()) && format!("{err:#}").contains("cannot open"), "{err:#}");
}

/// A NaN in one weight stops the run with the tensor's name, and nothing is written.
#[test]
fn non_finite_weights_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let ckpt = quantsmith::checkpoint::Checkpoint::open(&input).unwrap();
    let victim = ckpt.get("output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight").unwrap().clone();
    let start = 8 + u64::from_le_bytes(std::fs::read(&input).unwrap()[..8].try_into().unwrap()) as usize + victim.offsets.0;
    drop(ckpt);
    let mut bytes = std::fs::read(&input).unwrap();
    // bf16 NaN at element 5.
    bytes[start + 10] = 0xc0;
    bytes[start + 11] = 0x7f;
    std::fs::write(&input, &bytes).unwrap();
    let output = dir.path().join("out.safetensors");
    let err = run(&input, &output, Some("sd15"), &[]).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight") && msg.contains("non-finite"), "{msg}");
    assert_no_output(dir.path(), &output);
}

#[test]
fn unwritable_output_directory_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("no/such/dir/out.safetensors");
    let err = run(&input, &output, None, &[]).unwrap_err();
    assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
}

/// A write that fails half way (the file-size limit stands in for a full disk):
/// a clear error, a non-zero exit and no partial file.
#[test]
fn failing_write_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sdxl");
    let output = dir.path().join("out.safetensors");
    let script = format!(
        "ulimit -f 64; trap '' XFSZ; exec '{}' run '{}' -o '{}' --quiet --device cpu",
        env!("CARGO_BIN_EXE_run-recipe"),
        input.display(),
        output.display()
    );
    let out = std::process::Command::new("bash").args(["-c", &script]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("cannot write") || stderr.contains("File too large"), "{stderr}");
    assert_no_output(dir.path(), &output);
}

/// `forward` with a broken inputs file: bad input (exit 3), and no output.
#[test]
fn forward_refuses_malformed_inputs_with_exit_code_3() {
    let dir = tempfile::tempdir().unwrap();
    let model = synth_tiny(dir.path(), "sd15");
    let inputs = dir.path().join("inputs.safetensors");
    let out = dir.path().join("out.safetensors");
    let forward = || {
        let r = std::process::Command::new(env!("CARGO_BIN_EXE_run-recipe"))
            .args([
                "forward",
                model.to_str().unwrap(),
                "--inputs",
                inputs.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--device",
                "cpu",
            ])
            .output()
            .unwrap();
        (r.status.code(), String::from_utf8_lossy(&r.stderr).into_owned())
    };
    for content in [&b"junk"[..], &b""[..]] {
        std::fs::write(&inputs, content).unwrap();
        let (code, stderr) = forward();
        assert_eq!(code, Some(3), "{stderr}");
        assert!(stderr.contains("not a valid safetensors file"), "{stderr}");
        assert!(!out.exists());
    }
    // Valid safetensors without the tensors `forward` needs.
    safetensors::serialize_to_file(Vec::<(&str, safetensors::tensor::TensorView)>::new(), None, &inputs).unwrap();
    let (code, stderr) = forward();
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("has no `x` tensor"), "{stderr}");
}

#[test]
fn a_tensor_comfyui_cannot_load_is_refused_not_passed_through() {
    // An F8_E8M0 tensor beside the model would pass through byte for byte and make
    // the output unloadable in ComfyUI: refused (exit 3) before anything is written.
    let dir = tempfile::tempdir().unwrap();
    let good = synth_tiny(dir.path(), "sd15");
    let bytes = std::fs::read(&good).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let scales = [127u8, 128, 126, 127];
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.iter().map(|(n, v)| (n.to_string(), v)).collect();
    tensors
        .push(("extra.block_scales".into(), safetensors::tensor::TensorView::new(safetensors::Dtype::F8_E8M0, vec![4], &scales).unwrap()));
    let input = dir.path().join("with-e8m0.safetensors");
    safetensors::serialize_to_file(tensors, meta.metadata().clone(), &input).unwrap();
    let output = dir.path().join("out.safetensors");
    let err = run(&input, &output, None, &["format=fp8"]).unwrap_err();
    let msg = format!("{err:#}");
    assert!(err.chain().any(|c| c.is::<quantsmith::error::Refused>()), "bad input (exit 3): {msg}");
    assert!(msg.contains("extra.block_scales") && msg.contains("F8_E8M0"), "{msg}");
    assert_no_output(dir.path(), &output);
}
