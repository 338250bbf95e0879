//! `run-recipe recipes`: the built-in presets, or one recipe with its parameters.

use anyhow::Result;
use clap::Args;
use quantsmith::recipe::params::{kind_name, value_to_json};
use quantsmith::recipe::{PRESETS, RecipeRuntime, RecipeSource, SandboxLimits};

use super::{SandboxArgs, bad, checks, untrusted};

#[derive(Args)]
pub struct RecipesArgs {
    /// A preset name or a path to a .wasm recipe.
    #[arg(long)]
    recipe: Option<String>,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

pub fn run(args: RecipesArgs) -> Result<()> {
    if let Some(r) = &args.recipe {
        checks::recipe_file(r)?;
    }
    recipes(args.recipe.as_deref(), args.sandbox.limits()?)
}

fn recipes(which: Option<&str>, limits: SandboxLimits) -> Result<()> {
    let runtime = RecipeRuntime::new(limits)?;
    let sources: Vec<RecipeSource> = match which {
        Some(w) => vec![RecipeSource::parse(w).map_err(bad)?],
        None => PRESETS.iter().map(|p| RecipeSource::Builtin(p.name)).collect(),
    };
    for source in sources {
        let r = runtime.load(&source)?;
        let i = &r.info;
        println!("{} {}  [{}]", i.name, i.version, untrusted(&source.label()));
        println!("  {}", i.description);
        println!("  families: {}   formats: {}", i.families.join(", "), i.formats.join(", "));
        println!("  sha256:   {}", r.sha256);
        println!("  parameters:");
        for p in &i.params {
            let allowed = if p.allowed.is_empty() { String::new() } else { format!(" [{}]", untrusted(&p.allowed.join("|"))) };
            println!(
                "    {:<16} {}{} (default {})  {}",
                untrusted(&p.name),
                kind_name(p.kind),
                allowed,
                untrusted(&value_to_json(&p.default).to_string()),
                untrusted(&p.help)
            );
        }
        println!();
    }
    Ok(())
}
