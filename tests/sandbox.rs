//! Hostile and broken recipes, in the real host: each is stopped or refused with
//! a message naming it, the host survives, and no output is written.

mod common;

use std::time::{Duration, Instant};

use common::*;
use quantsmith::pipeline::Refused;
use quantsmith::recipe::{RecipeError, RecipeRuntime, RecipeSource, SandboxLimits};

fn hostile(mode: &str) -> (tempfile::TempDir, anyhow::Result<quantsmith::pipeline::RunReport>, std::path::PathBuf, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("out.safetensors");
    let recipe = fixture("hostile");
    let mut opts = options(&input, &output, Some(recipe.to_str().unwrap()), &[&format!("mode={mode}")]);
    opts.limits = SandboxLimits { memory_bytes: 64 << 20, timeout: Duration::from_secs(1) };
    let start = Instant::now();
    let result = quantsmith::pipeline::run(&opts);
    let elapsed = start.elapsed();
    (dir, result, output, elapsed)
}

fn recipe_error(result: anyhow::Result<quantsmith::pipeline::RunReport>) -> (RecipeError, String) {
    let err = result.expect_err("the hostile recipe must fail");
    let msg = format!("{err:#}");
    let e = err.chain().find_map(|c| c.downcast_ref::<RecipeError>()).unwrap_or_else(|| panic!("not a RecipeError: {msg}"));
    assert!(msg.contains("hostile"), "the message names the recipe: {msg}");
    (
        match e {
            RecipeError::Timeout { recipe, call, secs } => RecipeError::Timeout { recipe: recipe.clone(), call, secs: *secs },
            RecipeError::Memory { recipe, call, mib } => RecipeError::Memory { recipe: recipe.clone(), call, mib: *mib },
            RecipeError::Trap { recipe, call, reason } => RecipeError::Trap { recipe: recipe.clone(), call, reason: reason.clone() },
            RecipeError::Invalid { recipe, message } => RecipeError::Invalid { recipe: recipe.clone(), message: message.clone() },
            RecipeError::Load { recipe, reason } => RecipeError::Load { recipe: recipe.clone(), reason: reason.clone() },
            RecipeError::Version { recipe, found } => RecipeError::Version { recipe: recipe.clone(), found: found.clone() },
        },
        msg,
    )
}

#[test]
fn infinite_loop_is_stopped_within_a_second_of_the_budget() {
    let (dir, result, output, elapsed) = hostile("loop");
    let (e, msg) = recipe_error(result);
    assert!(matches!(e, RecipeError::Timeout { call: "plan", .. }), "{msg}");
    assert!(msg.contains("CPU budget"), "{msg}");
    assert!(elapsed < Duration::from_secs(2) + Duration::from_millis(500), "took {elapsed:?}");
    assert_no_output(dir.path(), &output);
}

#[test]
fn allocating_gigabytes_hits_the_memory_limit() {
    let (dir, result, output, elapsed) = hostile("alloc");
    let (e, msg) = recipe_error(result);
    assert!(matches!(e, RecipeError::Memory { mib: 64, .. }), "{msg}");
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    assert_no_output(dir.path(), &output);
}

#[test]
fn panics_and_traps_become_errors_with_the_guest_message() {
    let (dir, result, output, _) = hostile("panic");
    let (e, msg) = recipe_error(result);
    assert!(matches!(e, RecipeError::Trap { .. }), "{msg}");
    assert!(msg.contains("panics on purpose"), "the guest's panic message is kept: {msg}");
    assert_no_output(dir.path(), &output);

    let (dir, result, output, _) = hostile("trap");
    let (e, msg) = recipe_error(result);
    assert!(matches!(e, RecipeError::Trap { .. }), "{msg}");
    assert!(msg.contains("unreachable"), "{msg}");
    assert_no_output(dir.path(), &output);
}

#[test]
fn files_environment_and_network_are_out_of_reach() {
    for (mode, denied) in [("fs", "fs denied"), ("env", "env denied"), ("net", "net denied")] {
        let (dir, result, output, _) = hostile(mode);
        let err = result.expect_err(mode);
        let msg = format!("{err:#}");
        assert!(err.chain().any(|c| c.is::<Refused>()), "{mode}: {msg}");
        assert!(msg.contains(denied) && !msg.contains("LEAK"), "{mode}: {msg}");
        assert_no_output(dir.path(), &output);
    }
}

#[test]
fn invalid_plans_are_refused_naming_the_problem() {
    let cases = [
        ("missing-module", "does not exist"),
        ("bad-block-size", "block size 64 is not allowed for nvfp4"),
        ("bad-axis", "axis 1 is not available for fp8"),
        ("no-format", "names no format"),
        ("conv", "only Linear layers"),
        ("probe-packed", "must keep its logical shape"),
        ("bad-pattern", "malformed pattern"),
    ];
    for (mode, expect) in cases {
        let (dir, result, output, _) = hostile(mode);
        let (e, msg) = recipe_error(result);
        assert!(matches!(e, RecipeError::Invalid { .. }), "{mode}: {msg}");
        assert!(msg.contains(expect), "{mode}: {msg}");
        assert_no_output(dir.path(), &output);
    }
}

#[test]
fn the_host_survives_hostile_recipes() {
    for mode in ["loop", "panic", "alloc"] {
        let _ = hostile(mode);
    }
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("ok.safetensors");
    run(&input, &output, Some("sd15"), &[]).unwrap();
    assert!(output.exists());
}

#[test]
fn incompatible_contract_versions_are_refused() {
    let wasm = std::fs::read(fixture("hostile")).unwrap();
    // Same-length rewrite of every `quantsmith:recipe/...@0.1.x` name: a valid
    // component that speaks contract 0.9.x.
    let needle = format!("@{}", quantsmith::recipe::WIT_VERSION);
    let needle = needle.as_bytes();
    let mut patched = wasm.clone();
    let mut hits = 0;
    for i in 0..patched.len().saturating_sub(needle.len()) {
        if &patched[i..i + needle.len()] == needle {
            patched[i + 3] = b'9';
            hits += 1;
        }
    }
    assert!(hits > 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("future.wasm");
    std::fs::write(&path, patched).unwrap();
    let runtime = RecipeRuntime::new(SandboxLimits::default()).unwrap();
    let future = format!("0.9.{}", quantsmith::recipe::WIT_VERSION.rsplit('.').next().unwrap());
    let err = runtime.load(&RecipeSource::File(path)).err().expect("a 0.9.x recipe is refused");
    assert!(matches!(err, RecipeError::Version { ref found, .. } if *found == future), "{err}");
    assert!(err.to_string().contains("future.wasm"), "{err}");
}

#[test]
fn files_that_are_not_recipes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = RecipeRuntime::new(SandboxLimits::default()).unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm garbage").unwrap();
    let err = runtime.load(&RecipeSource::File(junk)).err().unwrap();
    assert!(matches!(err, RecipeError::Load { .. }) && err.to_string().contains("junk.wasm"), "{err}");
    // A core module (not a component).
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]).unwrap();
    let err = runtime.load(&RecipeSource::File(core)).err().unwrap();
    assert!(matches!(err, RecipeError::Load { .. }), "{err}");
    let missing = runtime.load(&RecipeSource::File(dir.path().join("absent.wasm"))).err().unwrap();
    assert!(missing.to_string().contains("cannot read"), "{missing}");
}

#[test]
fn cli_exits_with_the_recipe_code() {
    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("out.safetensors");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_run-recipe"))
        .args([
            "run",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
            "--recipe",
            fixture("hostile").to_str().unwrap(),
            "--set",
            "mode=loop",
            "--recipe-timeout",
            "0.5",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CPU budget"));
    assert!(!output.exists());
}

#[test]
fn formats_the_host_does_not_know_are_refused_at_load() {
    let runtime = RecipeRuntime::new(SandboxLimits::default()).unwrap();
    let err = runtime.load(&RecipeSource::File(fixture("unknown-format"))).err().expect("an int4 recipe is refused");
    let msg = err.to_string();
    assert!(matches!(err, RecipeError::Load { .. }), "{msg}");
    assert!(msg.contains("unknown-format.wasm") && msg.contains("contract"), "{msg}");
}

/// The host's check of a plan is host work the recipe asked for: a plan that
/// spends most of its 1 s budget and then hands over 99,999 distinct wildcards
/// (each a glob compile and a match against every module) is stopped as a
/// timeout of `plan`, not checked for as long as that takes.
#[test]
fn checking_a_huge_plan_counts_against_the_budget() {
    let (dir, result, output, elapsed) = hostile("many-quantizable");
    let (e, msg) = recipe_error(result);
    assert!(matches!(e, RecipeError::Timeout { call: "plan", .. }), "{msg}");
    // Generous: the point is that it ends, near its budget, not after every pattern.
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
    assert_no_output(dir.path(), &output);
}

/// 160,000 declared parameters (a minute of quadratic checking before): refused
/// at load by the parameter cap, as a recipe error (exit 4 from the CLI).
#[test]
fn a_recipe_declaring_too_many_parameters_is_refused() {
    let runtime = RecipeRuntime::new(SandboxLimits::default()).unwrap();
    let err = runtime.load(&RecipeSource::File(fixture("many-params"))).err().expect("160,000 parameters are refused");
    let msg = err.to_string();
    assert!(matches!(err, RecipeError::Invalid { .. }), "{msg}");
    assert!(msg.contains("160000 parameters") && msg.contains("at most 256"), "{msg}");

    let dir = tempfile::tempdir().unwrap();
    let input = synth_tiny(dir.path(), "sd15");
    let output = dir.path().join("out.safetensors");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_run-recipe"))
        .args(["run", input.to_str().unwrap(), "-o", output.to_str().unwrap(), "--recipe", fixture("many-params").to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("at most 256"), "{stderr}");
    assert!(!output.exists());
}

/// The caps on what a plan may hold, at the host's check of recipe output: more
/// rules or quantizable entries than allowed are refused before any is compiled.
#[test]
fn plan_caps_are_refusals() {
    use quantsmith::plan::{MAX_QUANTIZABLE, MAX_RULES, resolve};
    use quantsmith::recipe::wit::{QuantFormat, QuantPlan, QuantizerRule};
    let dir = tempfile::tempdir().unwrap();
    let ckpt = quantsmith::checkpoint::Checkpoint::open(&synth_tiny(dir.path(), "sd15")).unwrap();
    let modules = quantsmith::modules::ModuleTable::build(&ckpt);
    let rule = QuantizerRule { pattern: "*".into(), enable: true, format: Some(QuantFormat::Fp8), axis: None, block_size: None };
    let plan = QuantPlan { quantizable: vec!["*".into(); MAX_QUANTIZABLE + 1], rules: vec![rule.clone()], notes: vec![] };
    assert!(resolve(&plan, &modules, &ckpt).unwrap_err().contains("at most 100000"));
    let plan = QuantPlan { quantizable: vec!["*".into()], rules: vec![rule; MAX_RULES + 1], notes: vec![] };
    assert!(resolve(&plan, &modules, &ckpt).unwrap_err().contains("at most 10000"));
    // Notes are kept, escaped and cut, up to a count; the rest are counted.
    let plan = QuantPlan { quantizable: vec!["*".into()], rules: vec![], notes: vec!["\u{1b}[2J".into(); 1000] };
    let r = resolve(&plan, &modules, &ckpt).unwrap();
    assert_eq!(r.notes.len(), quantsmith::plan::MAX_NOTES + 1);
    assert!(r.notes.iter().all(|n| !n.contains('\u{1b}')));
}
