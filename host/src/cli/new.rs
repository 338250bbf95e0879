//! `run-recipe new`: scaffold a recipe crate (host/src/scaffold.rs writes it).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::bad;

#[derive(Args)]
pub struct NewArgs {
    dir: PathBuf,
    /// Family the recipe targets: sd15, sdxl, sd3 or flux.
    #[arg(long, default_value = "sdxl")]
    family: String,
}

pub fn run(args: NewArgs) -> Result<()> {
    let NewArgs { dir, family } = args;
    quantsmith::scaffold::create(&dir, &family).map_err(|e| bad(format!("{e:#}")))?;
    println!(
        "created recipe crate in {}; build it with:\n  cargo build --release --target wasm32-wasip2 --manifest-path {}/Cargo.toml",
        dir.display(),
        dir.display()
    );
    Ok(())
}
