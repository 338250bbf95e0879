//! Issue 11: untrusted files and recipes, interrupted runs, byte-identical output,
//! inputs recognised with advice, and recipe strings kept off the raw terminal.
//! Most tests run the built binary, as a user would.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use quantsmith::recipe::RecipeError;

const EXE: &str = env!("CARGO_BIN_EXE_run-recipe");

fn rr(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out: Output = Command::new(EXE).args(args).envs(envs.iter().copied()).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn assert_no_panic(stderr: &str) {
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Rewrites a safetensors file: tensors renamed by `rename`, extra zero-size
/// tensors and metadata added.
fn rewrite(input: &Path, output: &Path, rename: impl Fn(&str) -> String, zero_size: &[&str], metadata: &[(&str, &str)]) {
    let bytes = std::fs::read(input).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut md: std::collections::HashMap<String, String> = meta.metadata().clone().unwrap_or_default();
    md.extend(metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors().into_iter().map(|(n, v)| (rename(&n), v)).collect();
    for z in zero_size {
        tensors.push((z.to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![0], &[]).unwrap()));
    }
    safetensors::serialize_to_file(tensors, Some(md), output).unwrap();
}

// ---- 1. no panics --------------------------------------------------------

/// A long `--set exclude=` pattern is the user's mistake: exit 2 before any work, not globset's panic.
#[test]
fn long_set_pattern_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let out = dir.path().join("o.safetensors");
    let pattern = format!("exclude={}", "a*".repeat(50_000));
    let (code, _, stderr) = rr(&["run", s(&input), "-o", s(&out), "--device", "cpu", "--set", &pattern], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--set exclude") && stderr.contains("at most"), "{stderr}");
    assert_no_panic(&stderr);
    assert!(!out.exists());
}

/// A recipe's oversized pattern or flood of rules: a clear refusal naming the recipe (exit 4).
#[test]
fn recipe_pattern_and_rule_caps() {
    for (mode, expect) in [("huge-pattern", "longer than the 1024 allowed"), ("many-rules", "at most 10000")] {
        let dir = tempfile::tempdir().unwrap();
        let input = synth_tiny(dir.path(), "sd15");
        let output = dir.path().join("out.safetensors");
        let mut opts = options(&input, &output, Some(fixture("hostile").to_str().unwrap()), &[&format!("mode={mode}")]);
        opts.limits.timeout = Duration::from_secs(10);
        let start = Instant::now();
        let err = quantsmith::pipeline::run(&opts).expect_err(mode);
        let msg = format!("{err:#}");
        assert!(err.chain().any(|c| matches!(c.downcast_ref::<RecipeError>(), Some(RecipeError::Invalid { .. }))), "{mode}: {msg}");
        assert!(msg.contains(expect) && msg.len() < 2000, "{mode}: {}", &msg[..msg.len().min(2000)]);
        assert!(start.elapsed() < Duration::from_secs(30), "{mode}: took {:?}", start.elapsed());
        assert_no_output(dir.path(), &output);
    }
}

/// A megabyte tensor name in the input is refused as bad input (exit 3), never reaching a glob compile.
#[test]
fn huge_tensor_name_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let evil = dir.path().join("evil.safetensors");
    let long = format!("input_blocks.1.1.transformer_blocks.0.{}.weight", "x".repeat(1 << 20));
    rewrite(
        &input,
        &evil,
        |n| if n == "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" { long.clone() } else { n.to_string() },
        &[],
        &[],
    );
    let out = dir.path().join("o.safetensors");
    let (code, _, stderr) = rr(&["run", s(&evil), "-o", s(&out), "--device", "cpu"], &[]);
    assert_eq!(code, Some(3), "{}", &stderr[..stderr.len().min(3000)]);
    assert!(stderr.contains("tensor name is") && stderr.len() < 5000, "{}", &stderr[..stderr.len().min(3000)]);
    assert_no_panic(&stderr);
}

/// `check` against a source storing a quantized layer's weight under another suffix: an error, not a panic.
#[test]
fn check_survives_a_source_with_another_weight_suffix() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let out = dir.path().join("o.safetensors");
    let (code, _, stderr) = rr(&["run", s(&input), "-o", s(&out), "--device", "cpu", "--quiet", "--calibrate", "off"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let layer = "output_blocks.3.1.transformer_blocks.0.attn1.to_q";
    let odd = dir.path().join("odd.safetensors");
    rewrite(&input, &odd, |n| if n == format!("{layer}.weight") { format!("{layer}.scale") } else { n.to_string() }, &[], &[]);
    let (code, _, stderr) = rr(&["check", s(&odd), s(&out)], &[]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains(layer), "{stderr}");
    assert_no_panic(&stderr);
}

/// Every numeric limit flag is range-checked by the parser: exit 2, never a panic or a wrapped-around limit.
#[test]
fn numeric_limit_flags_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let out = dir.path().join("o.safetensors");
    let cases: &[(&str, &str)] = &[
        ("--recipe-timeout", "1e20"),
        ("--recipe-timeout", "0"),
        ("--recipe-timeout", "NaN"),
        ("--recipe-timeout", "-1"),
        ("--recipe-memory", "0"),
        ("--recipe-memory", "17592186044416"),
        ("--recipe-memory", "4097"),
        ("--eval-resolution", "4000000000"),
        ("--eval-resolution", "100"),
        ("--eval-inputs", "100000000"),
        ("--calib-max-forwards", "0"),
    ];
    for (flag, value) in cases {
        let arg = format!("{flag}={value}");
        let (code, _, stderr) = rr(&["run", s(&input), "-o", s(&out), "--device", "cpu", &arg], &[]);
        assert_eq!(code, Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
        assert_no_panic(&stderr);
    }
    let (code, _, stderr) = rr(&["recipes", "--recipe-timeout", "1e20"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(!out.exists());
}

// ---- 2. deterministic output ----------------------------------------------

/// The same job gives the same bytes: across processes (HashMap seeds differ), thread
/// counts, with metadata and zero-size tensors in the input.
#[test]
fn runs_give_byte_identical_files() {
    let dir = tempfile::tempdir().unwrap();
    let base = synth_tiny(dir.path(), "sdxl");
    let input = dir.path().join("input.safetensors");
    let zeros: Vec<String> = (0..8).map(|i| format!("marker_{i}.empty")).collect();
    let zeros: Vec<&str> = zeros.iter().map(String::as_str).collect();
    let meta: Vec<(String, String)> = (0..10).map(|i| (format!("meta.key{i}"), format!("value {i}"))).collect();
    let meta: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    rewrite(&base, &input, |n| n.to_string(), &zeros, &meta);
    let mut files = Vec::new();
    for (i, threads) in ["1", "3", "1", "2"].iter().enumerate() {
        let out = dir.path().join(format!("out{i}.safetensors"));
        let (code, _, stderr) =
            rr(&["run", s(&input), "-o", s(&out), "--device", "cpu", "--quiet", "--calibrate", "off"], &[("RAYON_NUM_THREADS", threads)]);
        assert_eq!(code, Some(0), "{stderr}");
        files.push(std::fs::read(&out).unwrap());
    }
    for (i, f) in files.iter().enumerate().skip(1) {
        assert!(f == &files[0], "run {i} differs from run 0");
    }
    // The header lists metadata keys in order and the zero-size tensors by name.
    let header_len = u64::from_le_bytes(files[0][..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&files[0][8..8 + header_len]).unwrap();
    let positions: Vec<usize> = (0..8).map(|i| header.find(&format!("\"marker_{i}.empty\"")).unwrap()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
}

/// The same job on the CPU and on the GPU gives the same bytes, for every format
/// (no calibration: the weights' path; the GPU kernels are bit-exact to the CPU
/// references and the writer orders everything). Skips without a GPU, with a
/// printed reason, unless `QUANTSMITH_REQUIRE_GPU=1` makes that a failure.
#[test]
fn cpu_and_gpu_runs_give_byte_identical_files() {
    if quantsmith::gpu::device_count().map_or(true, |n| n == 0) {
        assert!(std::env::var_os("QUANTSMITH_REQUIRE_GPU").is_none(), "QUANTSMITH_REQUIRE_GPU is set but no GPU is usable");
        println!("SKIPPED cpu_and_gpu_runs_give_byte_identical_files: no CUDA device on this machine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sdxl");
    for format in ["fp8", "int8", "nvfp4", "mxfp8"] {
        let mut files = Vec::new();
        for device in ["cpu", "cuda"] {
            let out = dir.path().join(format!("{format}-{device}.safetensors"));
            let set = format!("format={format}");
            let args = ["run", s(&input), "-o", s(&out), "--device", device, "--quiet", "--calibrate", "off", "--set", set.as_str()];
            let (code, _, stderr) = rr(&args, &[]);
            assert_eq!(code, Some(0), "{format} on {device}: {stderr}");
            files.push(std::fs::read(&out).unwrap());
        }
        assert!(files[0] == files[1], "{format}: the CPU and GPU files differ");
    }
}

// ---- 3. interrupted runs leave nothing -------------------------------------

fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect()
}

/// Starts `synth` paused mid-write (test hook), waits until it is paused, sends `signal`.
fn interrupt_synth(dir: &Path, signal: i32, named: bool) -> (PathBuf, std::process::ExitStatus) {
    let out = dir.join("synth.safetensors");
    let marker = dir.join("paused.marker");
    let mut cmd = Command::new(EXE);
    cmd.args(["synth", "sdxl", "--scale", "tiny", "-o", s(&out)]).env("QUANTSMITH_TEST_PAUSE_WRITER", &marker);
    if named {
        cmd.env("QUANTSMITH_NO_TMPFILE", "1");
    }
    let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    while !marker.exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "the writer never paused");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("synth ended before pausing: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::remove_file(&marker).unwrap();
    // SAFETY: signalling our own child by its id.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let status = child.wait().unwrap();
    (out, status)
}

#[test]
fn sigint_sigterm_sighup_mid_write_leave_nothing() {
    use std::os::unix::process::ExitStatusExt;
    for named in [false, true] {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let dir = tempfile::tempdir().unwrap();
            let (out, status) = interrupt_synth(dir.path(), sig, named);
            assert_eq!(status.signal(), Some(sig), "ends by the signal it got (named={named})");
            assert!(!out.exists());
            assert!(partials(dir.path()).is_empty(), "signal {sig}, named={named}: {:?}", partials(dir.path()));
        }
    }
}

/// SIGKILL cannot be handled: with O_TMPFILE nothing is ever visible; a named
/// temporary (fallback) is removed by the next run writing into that folder.
#[test]
fn sigkill_mid_write_leaves_nothing_visible_and_the_next_run_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = interrupt_synth(dir.path(), libc::SIGKILL, false);
    assert!(!out.exists());
    assert!(partials(dir.path()).is_empty(), "{:?}", partials(dir.path()));

    let (out, _) = interrupt_synth(dir.path(), libc::SIGKILL, true);
    assert!(!out.exists());
    assert_eq!(partials(dir.path()).len(), 1, "the named fallback leaves its temporary on SIGKILL");
    let (code, _, stderr) = rr(&["synth", "sd15", "--scale", "tiny", "-o", s(&dir.path().join("next.safetensors"))], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(partials(dir.path()).is_empty(), "the next run removes the orphan: {:?}", partials(dir.path()));
}

/// Kill and rerun: `run` killed (SIGKILL) while writing its output, then the very
/// same command again (no `--force`: nothing was left to replace) gives exit 0
/// and the same bytes as an uninterrupted run, with O_TMPFILE and with the
/// named-temporary fallback (whose orphan the rerun removes).
#[test]
fn sigkill_mid_run_then_the_same_command_gives_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let reference = dir.path().join("reference.safetensors");
    let args = |out: &Path| -> Vec<String> {
        ["run", s(&input), "-o", s(out), "--device", "cpu", "--quiet"].iter().map(|a| a.to_string()).collect()
    };
    let out = Command::new(EXE).args(args(&reference)).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let want = std::fs::read(&reference).unwrap();
    for named in [false, true] {
        let work = tempfile::tempdir().unwrap();
        let target = work.path().join("out.safetensors");
        let marker = work.path().join("paused.marker");
        let mut cmd = Command::new(EXE);
        cmd.args(args(&target)).env("QUANTSMITH_TEST_PAUSE_WRITER", &marker);
        if named {
            cmd.env("QUANTSMITH_NO_TMPFILE", "1");
        }
        let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        let start = Instant::now();
        while !marker.exists() {
            assert!(start.elapsed() < Duration::from_secs(300), "the writer never paused");
            if let Some(status) = child.try_wait().unwrap() {
                panic!("run ended before pausing: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: signalling our own child by its id.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
        child.wait().unwrap();
        assert!(!target.exists(), "named={named}");
        assert_eq!(partials(work.path()).len(), usize::from(named), "named={named}: {:?}", partials(work.path()));

        let out = Command::new(EXE).args(args(&target)).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "rerun, named={named}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(std::fs::read(&target).unwrap() == want, "the rerun's bytes differ from an uninterrupted run's (named={named})");
        assert!(partials(work.path()).is_empty(), "named={named}: {:?}", partials(work.path()));
    }
}

// ---- 5. inputs recognised with advice ---------------------------------------

fn run_input(path: &Path, out_dir: &Path) -> (Option<i32>, String) {
    let (code, _, stderr) = rr(&["run", s(path), "-o", s(&out_dir.join("o.safetensors")), "--device", "cpu"], &[]);
    assert_no_panic(&stderr);
    (code, stderr)
}

#[test]
fn inputs_that_are_not_checkpoints_are_named_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A diffusers pipeline folder, a diffusers model folder, a plain folder.
    let pipe = d.join("pipe");
    std::fs::create_dir_all(pipe.join("unet")).unwrap();
    std::fs::write(pipe.join("model_index.json"), "{}").unwrap();
    let unet = pipe.join("unet");
    std::fs::write(unet.join("config.json"), "{}").unwrap();
    std::fs::write(unet.join("diffusion_pytorch_model.safetensors"), "").unwrap();
    let plain = d.join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    // A zip (torch.save), a legacy pickle, GGUF.
    let zip = d.join("model.ckpt");
    std::fs::write(&zip, b"PK\x03\x04\x14\x00\x00\x00\x08\x00archive/data.pkl").unwrap();
    let pickle = d.join("model.pt");
    std::fs::write(&pickle, b"\x80\x02}q\x00(X\x05\x00\x00\x00statex").unwrap();
    let gguf = d.join("model.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00").unwrap();
    // A language model in safetensors.
    let llm = d.join("llm.safetensors");
    let w: &'static [u8] = &[0u8; 32];
    let v = |b: &'static [u8]| safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![4, 4], b).unwrap();
    safetensors::serialize_to_file(
        vec![
            ("model.embed_tokens.weight", v(w)),
            ("model.layers.0.self_attn.q_proj.weight", v(w)),
            ("model.layers.0.mlp.up_proj.weight", v(w)),
        ],
        None,
        &llm,
    )
    .unwrap();
    let out_dir = d.join("outs");
    std::fs::create_dir_all(&out_dir).unwrap();
    for (path, expect) in [
        (&pipe, "diffusers pipeline folder"),
        (&unet, "diffusers model folder"),
        (&plain, "is a folder"),
        (&zip, "PyTorch checkpoint"),
        (&pickle, "pickle"),
        (&gguf, "GGUF"),
        (&llm, "language model"),
    ] {
        let (code, stderr) = run_input(path, &out_dir);
        assert_eq!(code, Some(3), "{}: {stderr}", path.display());
        assert!(stderr.contains(expect) && stderr.contains("safetensors"), "{}: {stderr}", path.display());
    }
}

/// Already quantized inputs: comfy_quant, scaled_fp8 and plain fp8 weights.
#[test]
fn already_quantized_and_plain_fp8_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let q = dir.path().join("q.safetensors");
    let (code, _, stderr) = rr(&["run", s(&input), "-o", s(&q), "--device", "cpu", "--quiet", "--calibrate", "off"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = run_input(&q, dir.path());
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("already quantized"), "{stderr}");

    // Plain fp8: a 2-D weight cast to F8_E4M3 with no scale.
    let bytes = std::fs::read(&input).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let key = "output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight";
    let src = st.tensor(key).unwrap();
    let fp8 = vec![0x38u8; src.shape().iter().product()];
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors().into_iter().filter(|(n, _)| n != key).collect();
    tensors.push((key.to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F8_E4M3, src.shape().to_vec(), &fp8).unwrap()));
    let plain = dir.path().join("plain-fp8.safetensors");
    safetensors::serialize_to_file(tensors, None, &plain).unwrap();
    let (code, stderr) = run_input(&plain, dir.path());
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("already quantized") && stderr.contains("F8_E4M3"), "{stderr}");
}

/// A FIFO as the model, `--config` or `--calib-data` is refused at once (it used to hang).
#[test]
fn fifos_are_refused_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let fifo = dir.path().join("pipe");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let out = dir.path().join("o.safetensors");
    for args in [
        vec!["run", s(&fifo), "-o", s(&out)],
        vec!["run", s(&input), "-o", s(&out), "--config", s(&fifo)],
        vec!["run", s(&input), "-o", s(&out), "--calib-data", s(&fifo)],
        vec!["inspect", s(&fifo)],
        vec!["check", s(&input), s(&fifo)],
    ] {
        let (code, _, stderr) = rr(&args, &[]);
        assert_eq!(code, Some(3), "{args:?}: {stderr}");
        assert!(stderr.contains("FIFO"), "{args:?}: {stderr}");
    }
    // And as the output: refused, the FIFO left in place.
    let (code, _, stderr) = rr(&["run", s(&input), "-o", s(&fifo), "--device", "cpu"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("FIFO"), "{stderr}");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
}

// ---- 6. terminal injection ---------------------------------------------------

fn hostile_cli(mode: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let out = dir.path().join("o.safetensors");
    let mut args = vec!["run", s(&input), "-o", s(&out), "--device", "cpu", "--calibrate", "off", "--quiet", "--recipe-memory", "256"];
    let recipe = fixture("hostile");
    args.extend(["--recipe", s(&recipe)]);
    let m = format!("mode={mode}");
    args.extend(["--set", &m]);
    args.extend(extra);
    rr(&args, &[])
}

#[test]
fn recipe_strings_reach_the_terminal_escaped_and_cut() {
    let (code, stdout, stderr) = hostile_cli("ansi-notes", &["--dry-run"]);
    assert_eq!(code, Some(0), "{stderr}");
    for text in [&stdout, &stderr] {
        assert!(!text.contains('\x1b') && !text.contains('\u{202e}') && !text.contains('\x07'), "raw control characters: {text:?}");
        assert!(text.lines().all(|l| l.len() < 1000), "a line longer than 1000 bytes");
        assert!(!text.lines().any(|l| l.starts_with("recipe   sdxl")), "a spoofed line: {text}");
    }
    assert!(stdout.contains("\\u{1b}[2J"), "{stdout}");
    assert!(stdout.len() < 200_000, "{} bytes of output", stdout.len());

    let (code, stdout, stderr) = hostile_cli("ansi-refusal", &[]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(!stderr.contains('\x1b') && !stdout.contains('\x1b'), "{stderr:?}");
    assert!(stderr.contains("\\u{1b}[2J") && stderr.contains("more bytes"), "{}", &stderr[..stderr.len().min(2000)]);
    assert!(stderr.len() < 5000, "{} bytes of error", stderr.len());
}

/// Logs carry no ANSI escapes when stderr is not a terminal (here a pipe).
#[test]
fn logs_are_plain_when_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let out = dir.path().join("o.safetensors");
    let (code, _, stderr) = rr(&["-v", "run", s(&input), "-o", s(&out), "--device", "cpu", "--calibrate", "off", "--quiet"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("INFO"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
}

// ---- 7. recipe deadlines -----------------------------------------------------

/// A recipe sleeping through WASI clocks (30 s) is stopped at its 1 s budget, not after its nap.
#[test]
fn a_sleeping_recipe_is_stopped_at_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("out.safetensors");
    let mut opts = options(&input, &output, Some(fixture("hostile").to_str().unwrap()), &["mode=sleep"]);
    opts.limits.timeout = Duration::from_secs(1);
    let start = Instant::now();
    let err = quantsmith::pipeline::run(&opts).expect_err("the sleeping recipe must be stopped");
    let elapsed = start.elapsed();
    let msg = format!("{err:#}");
    assert!(err.chain().any(|c| matches!(c.downcast_ref::<RecipeError>(), Some(RecipeError::Timeout { call: "plan", .. }))), "{msg}");
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}: the sleep was waited out");
    assert_no_output(dir.path(), &output);
}
