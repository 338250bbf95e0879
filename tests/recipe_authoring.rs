//! Third-party authoring: the scaffold builds and runs unchanged, and the SDK's
//! rustdoc examples compile. Both build real crates with cargo (a minute on 2 cores).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use quantsmith::checkpoint::Checkpoint;
use quantsmith::evaluate::check_output;

fn target_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target").join(name)
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // The outer test's cargo settings target the host, not the guest.
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_")
            && !["CARGO_HOME", "CARGO_NET_OFFLINE"].contains(&k.as_str())
            && !k.starts_with("CARGO_REGISTR")
            && !k.starts_with("CARGO_HTTP")
        {
            c.env_remove(&k);
        }
    }
    c.env_remove("RUSTFLAGS");
    c
}

#[test]
fn scaffolded_recipe_builds_and_runs_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let crate_dir = dir.path().join("my-flux-recipe");
    let out =
        Command::new(env!("CARGO_BIN_EXE_run-recipe")).args(["new", crate_dir.to_str().unwrap(), "--family", "flux"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["Cargo.toml", "src/lib.rs", "README.md", "quantsmith-recipe-sdk/wit/recipe.wit"] {
        assert!(crate_dir.join(f).exists(), "{f}");
    }
    assert!(std::fs::read_to_string(crate_dir.join("README.md")).unwrap().contains("cargo build --release --target wasm32-wasip2"));

    let target = target_dir("scaffold-test");
    let status = cargo()
        .current_dir(&crate_dir)
        .args(["build", "--release", "--target", "wasm32-wasip2", "--target-dir"])
        .arg(&target)
        .status()
        .unwrap();
    assert!(status.success(), "the scaffold must build unchanged");
    let wasm = target.join("wasm32-wasip2/release/my_flux_recipe.wasm");
    assert!(wasm.exists());

    let input = synth_tiny(dir.path(), "flux");
    let output = dir.path().join("out.safetensors");
    let report = run(&input, &output, Some(wasm.to_str().unwrap()), &["format=int8", "keep-attention=true"]).unwrap();
    assert_eq!(report.recipe.name, "my-flux-recipe");
    assert_eq!(report.recipe.sha256.len(), 64);
    assert!(report.notes.iter().any(|n| n.contains("attention kept")));
    let check = check_output(&Checkpoint::open(&input).unwrap(), &output).unwrap();
    assert!(check.layers.values().all(|(f, _)| f == "int8"));
    assert!(!check.layers.contains_key("double_blocks.1.img_attn.qkv"), "attention stays bf16 with keep-attention");
    assert!(check.layers.contains_key("double_blocks.1.img_mlp.0"));

    // The scaffold refuses to overwrite a non-empty folder.
    let again = Command::new(env!("CARGO_BIN_EXE_run-recipe")).args(["new", crate_dir.to_str().unwrap()]).output().unwrap();
    assert_eq!(again.status.code(), Some(3));
}

#[test]
fn sdk_rustdoc_examples_compile() {
    let recipes = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../recipes");
    let status = cargo()
        .current_dir(&recipes)
        .args(["test", "--release", "-p", "quantsmith-recipe-sdk", "--doc", "--target-dir"])
        .arg(target_dir("sdk-doc"))
        .status()
        .unwrap();
    assert!(status.success(), "the SDK's documentation examples must compile");
}
