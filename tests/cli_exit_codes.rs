//! Every row of the README's exit-code table, through the built binary: the
//! example the README gives for each code, and the other cases issue 11 names.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const EXE: &str = env!("CARGO_BIN_EXE_run-recipe");

fn rr(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(EXE).args(args).envs(envs.iter().copied()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    (out.status.code(), stderr)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// 0: success.
#[test]
fn exit_0_success() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let out = dir.path().join("o.safetensors");
    let (code, stderr) = rr(&["run", s(&input), "-o", s(&out), "--device", "cpu", "--quiet"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    // Running again needs --force; with it the file is replaced.
    let (code, stderr) = rr(&["run", s(&input), "-o", s(&out), "--device", "cpu", "--quiet", "--force"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
}

/// 1: an internal failure (a bug): a panic becomes a message and exit 1, never 101.
#[test]
fn exit_1_internal_failure() {
    let (code, stderr) = Command::new(EXE)
        .args(["recipes"])
        .env("QUANTSMITH_TEST_PANIC", "1")
        .output()
        .map(|o| (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned()))
        .unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("internal error") && stderr.contains("bug"), "{stderr}");
    assert!(!stderr.contains("panicked at"), "{stderr}");
}

/// 2: usage: each refused before any work (the input is never opened: it is garbage here).
#[test]
fn exit_2_usage() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = synth_tiny(d, "sd15");
    let existing = d.join("existing.safetensors");
    std::fs::write(&existing, b"keep me").unwrap();
    let sub = d.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let locked = d.join("locked");
    std::fs::create_dir(&locked).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o500)).unwrap();
    let root = unsafe { libc::geteuid() } == 0;
    let missing = d.join("no/such/dir/o.safetensors");
    let in_locked = locked.join("o.safetensors");
    let ok_out = d.join("o.safetensors");
    let mut cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run"], "Usage"),
        (vec!["run", s(&input), "--no-such-flag"], "unexpected argument"),
        (vec!["run", s(&input), "-o", s(&existing)], "already exists; pass --force"),
        (vec!["run", s(&input), "-o", s(&sub)], "is a directory"),
        (vec!["run", s(&input), "-o", s(&missing)], "does not exist"),
        (vec!["run", s(&input), "-o", s(&input), "--force"], "is the input"),
        (vec!["run", s(&input), "-o", s(&ok_out), "--report", s(&existing)], "already exists"),
        (vec!["run", s(&input), "-o", s(&ok_out), "--report", s(&missing)], "does not exist"),
        (vec!["run", s(&input), "-o", s(&ok_out), "--recipe-timeout", "1e20"], "--recipe-timeout"),
        (vec!["run", s(&input), "-o", s(&ok_out), "--device", "tpu"], "tpu"),
    ];
    if !root {
        cases.push((vec!["run", s(&input), "-o", s(&in_locked)], "cannot write into"));
    }
    for (args, expect) in &cases {
        let (code, stderr) = rr(args, &[]);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
    assert!(!ok_out.exists());
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).unwrap();
}

/// 3: bad input: the files or values given cannot be used.
#[test]
fn exit_3_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = synth_tiny(d, "sd15");
    let out = d.join("o.safetensors");
    let garbage = d.join("garbage.safetensors");
    std::fs::write(&garbage, b"not a checkpoint at all").unwrap();

    // NaN in a weight.
    let ckpt = quantsmith::checkpoint::Checkpoint::open(&input).unwrap();
    let key = "output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight";
    let victim = ckpt.get(key).unwrap().clone();
    drop(ckpt);
    let mut bytes = std::fs::read(&input).unwrap();
    let start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize + victim.offsets.0;
    bytes[start + 10] = 0xc0;
    bytes[start + 11] = 0x7f;
    let nan = d.join("nan.safetensors");
    std::fs::write(&nan, &bytes).unwrap();

    // An empty Linear weight.
    let src = std::fs::read(&input).unwrap();
    let st = safetensors::SafeTensors::deserialize(&src).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors().into_iter().filter(|(n, _)| n != key).collect();
    tensors.push((key.to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![0, 64], &[]).unwrap()));
    let empty = d.join("empty.safetensors");
    safetensors::serialize_to_file(tensors, None, &empty).unwrap();

    let no_wasm = d.join("absent.wasm");
    let absent = d.join("absent.safetensors");
    let absent_toml = d.join("absent.toml");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", s(&garbage), "-o", s(&out)], "not a valid safetensors file"),
        (vec!["run", s(&absent), "-o", s(&out)], "cannot open"),
        (vec!["run", s(&nan), "-o", s(&out), "--device", "cpu", "--calibrate", "off"], "non-finite"),
        (vec!["run", s(&empty), "-o", s(&out), "--device", "cpu"], "is empty"),
        (vec!["run", s(&input), "-o", s(&out), "--recipe", s(&no_wasm)], "absent.wasm"),
        (vec!["run", s(&input), "-o", s(&out), "--set", "format=int4"], "int4"),
        (vec!["run", s(&input), "-o", s(&out), "--recipe", "sdxl"], "does not accept"),
        (vec!["run", s(&input), "-o", s(&out), "--config", s(&absent_toml)], "absent.toml"),
        // Found by tests/fuzz.rs: exit 1 before.
        (vec!["synth", "sd3", "--variant", "inpaint", "-o", s(&out)], "unknown variant `inpaint` for sd3"),
    ];
    for (args, expect) in &cases {
        let (code, stderr) = rr(args, &[]);
        assert_eq!(code, Some(3), "{args:?}: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert_no_output(d, &out);
    }
    // No GPU here: --device cuda says so, before any work.
    if quantsmith::gpu::device_count().map_or(true, |n| n == 0) {
        let (code, stderr) = rr(&["run", s(&input), "-o", s(&out), "--device", "cuda"], &[]);
        assert_eq!(code, Some(3), "{stderr}");
        assert!(stderr.contains("--device cuda:0") && stderr.contains("--device cpu"), "{stderr}");
    } else {
        println!("SKIPPED the --device cuda row: this machine has a GPU");
    }
}

/// 4: the recipe misbehaved (here: ran past its time budget).
#[test]
fn exit_4_recipe_misbehaved() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let out = dir.path().join("o.safetensors");
    let hostile = fixture("hostile");
    let (code, stderr) =
        rr(&["run", s(&input), "-o", s(&out), "--recipe", s(&hostile), "--set", "mode=loop", "--recipe-timeout", "0.5"], &[]);
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("CPU budget"), "{stderr}");
    assert!(!out.exists());
}

/// `demo` owns its folder: a second run replaces its own outputs (the README's command works every time).
#[test]
fn demo_runs_twice() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo-out");
    for _ in 0..2 {
        let (code, stderr) = rr(&["demo", "--family", "sd15", "--format", "int8", "--dir", s(&demo)], &[]);
        assert_eq!(code, Some(0), "{stderr}");
    }
}

/// 2: a `--layout` that cannot store the formats asked for, one case per refused
/// combination, each before the model is read: with `--set`/`--config` the input
/// is garbage (reading it would be exit 3), and a recipe whose plan mixes formats
/// is refused once its plan is known, before calibration or conversion.
#[test]
fn exit_2_layout_and_format_that_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let garbage = d.join("garbage.safetensors");
    std::fs::write(&garbage, b"not a checkpoint at all").unwrap();
    let out = d.join("o.safetensors");
    let config = d.join("nvfp4.toml");
    std::fs::write(&config, "format = \"nvfp4\"\n").unwrap();
    let legacy = ["--layout", "comfy-legacy"];
    for format in ["int8", "nvfp4", "mxfp8"] {
        let set = format!("format={format}");
        let mut args = vec!["run", s(&garbage), "-o", s(&out), "--set", &set];
        args.extend(legacy);
        let (code, stderr) = rr(&args, &[]);
        assert_eq!(code, Some(2), "{format}: {stderr}");
        assert!(stderr.contains("comfy-legacy stores FP8 only") && stderr.contains(format), "{format}: {stderr}");
        assert!(!out.exists());
    }
    let mut args = vec!["run", s(&garbage), "-o", s(&out), "--config", s(&config)];
    args.extend(legacy);
    let (code, stderr) = rr(&args, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("FP8 only, not nvfp4"), "{stderr}");
    // FP8 with the legacy layout is what it is for: not refused by this check.
    let mut args = vec!["run", s(&garbage), "-o", s(&out), "--set", "format=fp8"];
    args.extend(legacy);
    assert_eq!(rr(&args, &[]).0, Some(3), "the garbage input is what fails");

    // A recipe without a `format` parameter whose plan puts NVFP4 in some blocks.
    let flux = synth_tiny(d, "flux");
    let mixed = fixture("mixed-example");
    let mut args = vec!["run", s(&flux), "-o", s(&out), "--recipe", s(&mixed), "--set", "middle-fraction=1", "--device", "cpu"];
    args.extend(legacy);
    let (code, stderr) = rr(&args, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("comfy-legacy stores FP8 only") && stderr.contains("nvfp4"), "{stderr}");
    assert_no_output(d, &out);
}

/// 3: MXFP8 of a bf16 value at 248·2^120 (bf16 0x7F78) rounds to 2^128: the file
/// would load as infinity, so the run refuses it and writes nothing (it used to
/// exit 0 with a file `check` rejects). formats::mxfp8 has the hand-checked vector.
#[test]
fn exit_3_mxfp8_value_that_would_dequantize_to_infinity() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = synth_tiny(d, "sd15");
    let key = "output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight";
    let ckpt = quantsmith::checkpoint::Checkpoint::open(&input).unwrap();
    let victim = ckpt.get(key).unwrap().clone();
    drop(ckpt);
    assert_eq!(victim.dtype, safetensors::Dtype::BF16);
    let mut bytes = std::fs::read(&input).unwrap();
    let start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize + victim.offsets.0;
    bytes[start + 10..start + 12].copy_from_slice(&0x7F78u16.to_le_bytes());
    let huge = d.join("huge.safetensors");
    std::fs::write(&huge, &bytes).unwrap();
    let out = d.join("o.safetensors");
    let (code, stderr) =
        rr(&["run", s(&huge), "-o", s(&out), "--set", "format=mxfp8", "--device", "cpu", "--calibrate", "off", "--quiet"], &[]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains(key) && stderr.contains("infinity"), "{stderr}");
    assert_no_output(d, &out);
    // The same file in FP8 (per-tensor scale) is fine.
    let (code, stderr) =
        rr(&["run", s(&huge), "-o", s(&out), "--set", "format=fp8", "--device", "cpu", "--calibrate", "off", "--quiet"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
}
