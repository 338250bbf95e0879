//! Progress and logs as a user sees them (issue 11, part 7), through the built
//! binary: plain progress lines with stage names when stderr is not a terminal,
//! no escape codes there, `NO_COLOR` on a terminal, every warning and every
//! missing file's cause printed once.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

const EXE: &str = env!("CARGO_BIN_EXE_run-recipe");

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs the binary with stdout and stderr as pipes: (exit code, stdout, stderr).
fn rr(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(EXE).args(args).env_remove("NO_COLOR").env_remove("RUST_LOG").envs(envs.iter().copied()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    (out.status.code(), stdout, stderr)
}

/// A CPU calibration of a tiny model, stderr a pipe: each stage says it started,
/// how far it got and that it ended, in plain lines without a single escape byte.
#[test]
fn calibration_run_prints_plain_progress_lines() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let out = dir.path().join("o.safetensors");
    #[rustfmt::skip]
    let args = [
        "run", s(&input), "-o", s(&out), "--device", "cpu", "--calibrate", "on", "--eval-inputs", "2", "--eval-resolution", "64",
        "--set", "calib-steps=3", "--set", "calib-samples=2", "--set", "resolution=64",
    ];
    let (code, stdout, stderr) = rr(&args, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains('\x1b') && !stdout.contains('\x1b'), "{stderr:?}");
    assert!(!stderr.contains('\r'), "a bar's carriage returns in a pipe: {stderr:?}");
    // 2 walks x 3 steps: the total is known from the recipe's schedule and parameters.
    assert!(stderr.contains("calibration: started"), "{stderr}");
    assert!(stderr.contains("calibration: done, 6/6 forward passes (100%)"), "{stderr}");
    // Lines between start and end depend on the machine's speed (at most one per
    // tenth and per progress::MIN_INTERVAL); their format is progress.rs's unit test.
    // The evaluation: 2 held-out inputs x (weights only, static, dynamic) for FP8.
    assert!(stderr.contains("evaluation: done, 6/6 passes"), "{stderr}");
    assert!(stderr.lines().any(|l| l.starts_with("write: done, ") && l.contains("(100%)")), "{stderr}");
    // A tenth at most per line: never more than start + 10 + end lines for a stage.
    for stage in ["calibration:", "evaluation:", "write:"] {
        let n = stderr.lines().filter(|l| l.starts_with(stage)).count();
        assert!((2..=12).contains(&n), "{n} lines for {stage}\n{stderr}");
    }

    let (code, _, stderr) = rr(&["check", s(&input), s(&out)], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.lines().any(|l| l.starts_with("check: done, ") && l.contains(" tensors (100%)")), "{stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr:?}");

    // --quiet: no progress at all.
    let (code, _, stderr) = rr(&[&args[..], &["--force", "--quiet"]].concat(), &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("calibration:") && !stderr.contains("write:"), "{stderr}");
}

/// The plan's warning (an `exclude` pattern that matches nothing) is printed
/// once, not logged and then repeated in the summary; the report keeps it.
#[test]
fn a_warning_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let out = dir.path().join("o.safetensors");
    let report = dir.path().join("r.json");
    #[rustfmt::skip]
    let args = ["run", s(&input), "-o", s(&out), "--report", s(&report), "--device", "cpu", "--calibrate", "off", "--set", "exclude=no.such.module*"];
    let (code, stdout, stderr) = rr(&args, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let all = format!("{stdout}{stderr}");
    assert_eq!(all.matches("matches no quantizer").count(), 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let report = std::fs::read_to_string(&report).unwrap();
    assert!(report.contains("matches no quantizer"), "{report}");
}

/// Calibration that does not run shows no progress and says why once (in the
/// note; the FP8 line refers to it rather than repeating it).
#[test]
fn a_skipped_calibration_says_why_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    // Auto mode on the CPU: skipped (a real model would take hours there).
    let out = dir.path().join("o.safetensors");
    let (code, stdout, stderr) = rr(&["run", s(&input), "-o", s(&out), "--device", "cpu", "--set", "format=fp8"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("calibration:"), "{stderr}");
    assert_eq!(stdout.matches("calibrating on the CPU is slow").count(), 1, "{stdout}");
    assert!(stdout.contains("note     no activation calibration: --device cpu"), "{stdout}");
    assert!(stdout.contains("FP8 layers have no static activation scale (no calibration on this run"), "{stdout}");
    // The plan of a dry run says the same once.
    let (code, stdout, stderr) = rr(&["run", s(&input), "--dry-run", "--calibrate", "off", "--set", "format=fp8"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.matches("--calibrate off").count(), 1, "{stdout}");
    assert!(stdout.contains("FP8 layers have no static activation scale (no calibration on this run"), "{stdout}");
    // A dry run on the CPU says what the real run on the CPU does: no calibration.
    let (code, stdout, stderr) = rr(&["run", s(&input), "--dry-run", "--device", "cpu", "--set", "format=fp8"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("no activation calibration: --device cpu"), "{stdout}");
    assert!(!stdout.contains("a real run calibrates"), "{stdout}");
}

/// A missing file says why once: not "No such file ...: No such file ...".
#[test]
fn a_missing_files_cause_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = synth_tiny(d, "sd15");
    let flux = synth_tiny(d, "flux");
    let missing = d.join("missing.safetensors");
    let out = d.join("o.safetensors");
    // Through the library, whose errors the binary prints with their causes (`{:#}`).
    let e = run(&missing, &out, None, &[]).unwrap_err();
    assert_eq!(format!("{e:#}").matches("No such file or directory").count(), 1, "{e:#}");
    #[rustfmt::skip]
    let cases: Vec<Vec<&str>> = vec![
        vec!["run", s(&missing), "-o", s(&out)],
        vec!["inspect", s(&missing)],
        vec!["check", s(&input), s(&missing)],
        vec!["check", s(&missing), s(&input)],
        vec!["run", s(&input), "-o", s(&out), "--config", s(&missing)],
        vec!["run", s(&input), "-o", s(&out), "--recipe", s(&missing)],
        vec!["run", s(&input), "-o", s(&out), "--calib-data", s(&missing)],
        vec!["run", s(&flux), "-o", s(&out), "--device", "cpu", "--calibrate", "on", "--text-encoder", s(&missing)],
        vec!["forward", s(&input), "--inputs", s(&missing), "--out", s(&out), "--device", "cpu"],
    ];
    for args in cases {
        let (code, _, stderr) = rr(&args, &[]);
        assert_eq!(code, Some(3), "{args:?}: {stderr}");
        assert!(stderr.contains("missing.safetensors"), "{args:?}: {stderr}");
        assert_eq!(stderr.matches("No such file or directory").count(), 1, "{args:?}: {stderr}");
    }
}

/// A pseudo-terminal for stderr, so the binary sees a terminal: (master, slave path).
fn open_pty() -> (std::fs::File, std::path::PathBuf) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain libc calls on a descriptor this function owns; ptsname_r writes
    // at most `buf.len()` bytes.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(master >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        assert_eq!(libc::grantpt(master), 0);
        assert_eq!(libc::unlockpt(master), 0);
        let mut buf = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(master, buf.as_mut_ptr(), buf.len()), 0);
        let name = std::ffi::CStr::from_ptr(buf.as_ptr()).to_str().unwrap().to_string();
        (std::fs::File::from_raw_fd(master), name.into())
    }
}

/// Runs the binary with stderr on a terminal; returns everything the terminal got.
fn on_terminal(args: &[&str], no_color: bool) -> (Option<i32>, String) {
    let (mut master, slave_path) = open_pty();
    let slave = std::fs::OpenOptions::new().read(true).write(true).open(&slave_path).unwrap();
    let mut cmd = Command::new(EXE);
    cmd.args(args).env_remove("NO_COLOR").env_remove("RUST_LOG").env("TERM", "xterm").stdout(Stdio::null()).stderr(slave);
    if no_color {
        cmd.env("NO_COLOR", "1");
    }
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    // Read until the last writer (the child) closes the terminal: EIO on Linux.
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });
    let status = child.wait().unwrap();
    let got = reader.join().unwrap();
    (status.code(), String::from_utf8_lossy(&got).into_owned())
}

/// On a terminal, logs are coloured unless `NO_COLOR` is set; with it, no colour
/// escape (SGR, `ESC [ ... m`) reaches the terminal at all.
#[test]
fn no_color_is_honoured_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    // Colour is SGR: ESC [ digits and semicolons, then `m` (cursor moves of a bar are not colour).
    let sgr =
        |t: &str| t.split("\x1b[").skip(1).any(|rest| rest.trim_start_matches(|c: char| c.is_ascii_digit() || c == ';').starts_with('m'));
    for no_color in [false, true] {
        let out = dir.path().join(format!("o-{no_color}.safetensors"));
        let (code, text) = on_terminal(
            &["-v", "run", s(&input), "-o", s(&out), "--device", "cpu", "--calibrate", "off", "--set", "exclude=no.such.module*"],
            no_color,
        );
        assert_eq!(code, Some(0), "{text}");
        assert!(text.contains("INFO") && text.contains("matches no quantizer"), "{text:?}");
        // Without NO_COLOR the same logs are coloured: the terminal is a real one.
        assert_eq!(sgr(&text), !no_color, "NO_COLOR={no_color}: {text:?}");
    }
}
