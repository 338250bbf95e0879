//! Builds the recipe guests (`recipes/`) for `wasm32-wasip2` so the presets can be
//! embedded in the binary, in the manner of wasmtime's own test-programs crate.

use std::{env, fs, path::PathBuf, process::Command};

/// Guest packages compiled into components. Presets are embedded in the binary;
/// fixtures are only handed to the tests (via `QUANTSMITH_FIXTURES_DIR`).
const PRESETS: &[&str] = &["sd15", "sdxl", "sd3", "flux"];
const FIXTURES: &[&str] =
    &["hostile", "many-params", "unknown-format", "mixed-example", "contract-0-1-0", "contract-0-1-1", "contract-0-1-2"];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let recipes = root.join("recipes");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let target_dir = out_dir.join("recipes-target");

    println!("cargo:rerun-if-changed={}", recipes.display());
    println!("cargo:rerun-if-changed={}", root.join("wit").display());

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&recipes).arg("build").arg("--release").arg("--target=wasm32-wasip2").arg("--target-dir").arg(&target_dir);
    for pkg in PRESETS.iter().chain(FIXTURES) {
        cmd.arg("-p").arg(format!("recipe-{pkg}"));
    }
    // The outer build's flags and jobserver target the host, not the guest.
    for (key, _) in env::vars() {
        let keep = ["CARGO_HOME", "CARGO_NET_", "CARGO_HTTP_", "CARGO_REGISTR"].iter().any(|k| key.starts_with(k));
        // `cargo clippy` lints through RUSTC_WORKSPACE_WRAPPER and CLIPPY_ARGS: the
        // guests are another workspace, built here, not linted.
        let outer = ["RUSTFLAGS", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "CLIPPY_ARGS"].contains(&key.as_str());
        if key.starts_with("CARGO_") && !keep || outer {
            cmd.env_remove(&key);
        }
    }
    cmd.env_remove("CARGO_ENCODED_RUSTFLAGS");
    let status = cmd.status().expect("failed to run cargo for the recipe guests");
    if !status.success() {
        panic!(
            "building the recipe guests failed; is the wasm32-wasip2 target installed? \
             (`rustup target add wasm32-wasip2`)"
        );
    }

    let wasm_dir = target_dir.join("wasm32-wasip2").join("release");
    let fixtures_dir = out_dir.join("fixtures");
    fs::create_dir_all(&fixtures_dir).unwrap();
    for pkg in PRESETS {
        let src = wasm_dir.join(format!("recipe_{}.wasm", pkg.replace('-', "_")));
        fs::copy(&src, out_dir.join(format!("{pkg}.wasm"))).unwrap_or_else(|e| panic!("missing guest {}: {e}", src.display()));
    }
    for pkg in FIXTURES {
        let src = wasm_dir.join(format!("recipe_{}.wasm", pkg.replace('-', "_")));
        fs::copy(&src, fixtures_dir.join(format!("{pkg}.wasm"))).unwrap_or_else(|e| panic!("missing guest {}: {e}", src.display()));
    }
    println!("cargo:rustc-env=QUANTSMITH_FIXTURES_DIR={}", fixtures_dir.display());
}
