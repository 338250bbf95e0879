//! `run-recipe new`: a ready-to-build recipe crate.
//!
//! The crate carries its own copy of the guest SDK and of the WIT contract, so it
//! builds anywhere with crates.io alone: `cargo build --release --target wasm32-wasip2`.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};

const SDK_FILES: &[(&str, &str)] = &[
    ("src/lib.rs", include_str!("../../recipes/sdk/src/lib.rs")),
    ("src/calibration.rs", include_str!("../../recipes/sdk/src/calibration.rs")),
    ("src/detect.rs", include_str!("../../recipes/sdk/src/detect.rs")),
    ("src/exclusions.rs", include_str!("../../recipes/sdk/src/exclusions.rs")),
    ("src/params.rs", include_str!("../../recipes/sdk/src/params.rs")),
    ("src/preset.rs", include_str!("../../recipes/sdk/src/preset.rs")),
    ("src/rules.rs", include_str!("../../recipes/sdk/src/rules.rs")),
];
const WIT: &str = include_str!("../../wit/recipe.wit");
const WIT_BINDGEN: &str = "0.63";

fn family_variant(family: &str) -> Result<&'static str> {
    Ok(match family {
        "sd15" => "Sd15",
        "sdxl" => "Sdxl",
        "sd3" => "Sd3",
        "flux" => "Flux",
        other => bail!("unknown family {other:?}; expected sd15, sdxl, sd3 or flux"),
    })
}

/// Writes a recipe crate into `dir` (which must be empty or absent).
pub fn create(dir: &Path, family: &str) -> Result<()> {
    let variant = family_variant(family)?;
    if dir.exists() && fs::read_dir(dir)?.next().is_some() {
        bail!("{} exists and is not empty", dir.display());
    }
    let raw_name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "my-recipe".into());
    let name: String =
        raw_name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c.to_ascii_lowercase() } else { '-' }).collect();
    let name = if name.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) { name } else { format!("recipe-{name}") };

    let files: Vec<(String, String)> = {
        let mut f = vec![
            ("Cargo.toml".to_string(), cargo_toml(&name)),
            ("src/lib.rs".to_string(), lib_rs(&name, variant, family)),
            ("README.md".to_string(), readme(&name, family)),
            (".gitignore".to_string(), "/target\n".to_string()),
            ("quantsmith-recipe-sdk/Cargo.toml".to_string(), sdk_toml()),
            ("quantsmith-recipe-sdk/wit/recipe.wit".to_string(), WIT.to_string()),
        ];
        for (path, text) in SDK_FILES {
            // The vendored SDK finds the contract beside it rather than in the Quantsmith tree.
            let text = text.replace("path: \"../../wit\"", "path: \"wit\"");
            f.push((format!("quantsmith-recipe-sdk/{path}"), text));
        }
        f
    };
    for (path, text) in files {
        let p = dir.join(&path);
        fs::create_dir_all(p.parent().unwrap()).with_context(|| format!("cannot create {}", p.parent().unwrap().display()))?;
        fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

fn cargo_toml(name: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib"]

[dependencies]
quantsmith-recipe-sdk = {{ path = "quantsmith-recipe-sdk" }}

# A recipe is its own workspace: build it with
#   cargo build --release --target wasm32-wasip2
[workspace]
members = [".", "quantsmith-recipe-sdk"]

[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = true
"#
    )
}

fn sdk_toml() -> String {
    format!(
        r#"[package]
name = "quantsmith-recipe-sdk"
version = "0.1.0"
edition = "2024"
description = "Guest-side SDK for Quantsmith recipes (vendored copy)"

[dependencies]
wit-bindgen = "{WIT_BINDGEN}"
"#
    )
}

fn lib_rs(name: &str, variant: &str, family: &str) -> String {
    format!(
        r#"//! {name}: a Quantsmith recipe for {family}.
//!
//! Start from the built-in behaviour (every Linear layer in `format`, ModelOpt's
//! default exclusions) and change `plan` to taste.

use quantsmith_recipe_sdk::prelude::*;

struct Recipe;

impl Preset for Recipe {{
    const NAME: &'static str = "{name}";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "My {family} recipe";
    const FAMILY: Family = Family::{variant};

    fn params() -> Vec<ParamSpec> {{
        vec![
            ParamSpecBuilder::format(),
            ParamSpecBuilder::exclude(),
            ParamSpecBuilder::boolean("keep-attention", false, "Leave attention projections in high precision"),
        ]
    }}

    fn plan() -> Result<QuantPlan, String> {{
        let params = Params::load();
        let mut plan = standard_plan(&params)?;
        if params.boolean("keep-attention").unwrap_or(false) {{
            // Later rules win: appending an exclusion overrides the format rules.
            plan.rules.extend(RuleSet::new().exclude_existing(&["*attn*"]).build().rules);
            plan.notes.push("attention kept in high precision".into());
        }}
        log(host::LogLevel::Info, format!("{{}} rules", plan.rules.len()));
        Ok(plan)
    }}
}}

quantsmith_recipe_sdk::export_preset!(Recipe);
"#
    )
}

fn readme(name: &str, family: &str) -> String {
    format!(
        r#"# {name}

A [Quantsmith](../README.md) recipe for {family} checkpoints.

## Build

    rustup target add wasm32-wasip2
    cargo build --release --target wasm32-wasip2

The recipe is the single file `target/wasm32-wasip2/release/{wasm}.wasm`.

## Try it

    run-recipe synth {family} -o {family}-tiny.safetensors
    run-recipe recipes --recipe target/wasm32-wasip2/release/{wasm}.wasm
    run-recipe run {family}-tiny.safetensors --recipe target/wasm32-wasip2/release/{wasm}.wasm --dry-run
    run-recipe run {family}-tiny.safetensors --recipe target/wasm32-wasip2/release/{wasm}.wasm --set format=nvfp4 -o out.safetensors
    run-recipe check {family}-tiny.safetensors out.safetensors

`quantsmith-recipe-sdk/` is a vendored copy of the SDK and `quantsmith-recipe-sdk/wit/`
the contract it speaks (`quantsmith:recipe@0.1.3`); see the SDK's rustdoc
(`cargo doc -p quantsmith-recipe-sdk --open`).
"#,
        wasm = name.replace('-', "_")
    )
}
