//! `run-recipe inspect`: what a checkpoint is (layout, components, modules) and
//! which built-in preset accepts it.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use quantsmith::pipeline;
use quantsmith::recipe::{RecipeRuntime, SandboxLimits};

use super::{SandboxArgs, checks, human_bytes};

#[derive(Args)]
pub struct InspectArgs {
    model: PathBuf,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

pub fn run(args: InspectArgs) -> Result<()> {
    checks::input_file("the model", &args.model)?;
    inspect(&args.model, args.sandbox.limits()?)
}

fn inspect(model: &Path, limits: SandboxLimits) -> Result<()> {
    let ctx = pipeline::open_context(model)?;
    let c = &ctx.checkpoint;
    println!("file        {} ({})", model.display(), human_bytes(c.file_len() as u64));
    println!(
        "layout      {}",
        if c.is_full_checkpoint() {
            format!("full checkpoint, diffusion model under {:?}", c.prefix())
        } else {
            "diffusion model only".into()
        }
    );
    let comps: Vec<String> = c
        .components()
        .iter()
        .map(|comp| {
            let n = c.tensors().iter().filter(|t| t.component == *comp).count();
            format!("{} ({n} tensors)", comp.name())
        })
        .collect();
    println!("components  {}", comps.join(", "));
    println!("modules     {} in the diffusion model:", ctx.modules.len());
    for (kind, n, params) in ctx.modules.summary() {
        if n > 0 {
            println!("  {:<10} {n:>5} modules {:>15} parameters", kind.name(), params);
        }
    }
    let runtime = RecipeRuntime::new(limits)?;
    let verdicts = pipeline::detect_all(&runtime, &ctx)?;
    if let Some((recipe, Ok(d))) = verdicts.first() {
        println!("family      {} {} (confidence {:.2})", d.family, d.variant, d.confidence);
        println!("evidence    {}", d.reason);
        println!("preset      {} {} (run-recipe run {} picks it automatically)", recipe.name(), recipe.info.version, model.display());
    } else {
        println!("family      not recognised by any built-in preset");
    }
    for (recipe, v) in &verdicts {
        match v {
            Ok(d) => println!("  {:<6} accepts ({:.2})", recipe.name(), d.confidence),
            Err(reason) => println!("  {:<6} declines: {reason}", recipe.name()),
        }
    }
    Ok(())
}
