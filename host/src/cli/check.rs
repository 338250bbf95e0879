//! `run-recipe check`: a converted file against its source: ComfyUI's layout
//! rules, pass-through bytes, each quantized layer within its format's error bound.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use quantsmith::progress::{Progress, Unit};

use super::{bad, checks};

#[derive(Args)]
pub struct CheckArgs {
    source: PathBuf,
    output: PathBuf,
}

pub fn run(args: CheckArgs) -> Result<()> {
    let CheckArgs { source, output } = args;
    checks::input_file("the source", &source)?;
    checks::input_file("the output", &output)?;
    let src = quantsmith::checkpoint::Checkpoint::open(&source)?;
    let progress = Progress::start("check", Unit::Items("tensors"), None);
    let check = quantsmith::evaluate::check_output_with(&src, &output, &progress)
        .map_err(|e| bad(format!("{} fails the check: {e:#}", output.display())))?;
    print_check(&check);
    Ok(())
}

pub fn print_check(check: &quantsmith::evaluate::OutputCheck) {
    let smoothed = if check.smoothed_tensors > 0 {
        format!("; {} tensors match the recorded SmoothQuant fold", check.smoothed_tensors)
    } else {
        String::new()
    };
    println!(
        "ok: {} quantized layers within their format's error bound, {} tensors passed through{smoothed}{}",
        check.layers.len(),
        check.passthrough_tensors,
        if check.legacy { " (legacy scaled_fp8 layout)" } else { "" }
    );
    if check.full_precision_layers + check.scale_one_layers > 0 {
        println!(
            "fp8 without input_scale: {} marked full_precision_matrix_mult (ComfyUI dequantizes), {} at ComfyUI's activation scale 1.0",
            check.full_precision_layers, check.scale_one_layers
        );
    }
    if let Some((name, (fmt, e))) = check.layers.iter().max_by(|a, b| a.1.1.relative_l2.total_cmp(&b.1.1.relative_l2)) {
        println!(
            "worst layer {name} ({fmt}): relative L2 {:.4}, cosine {:.6}, max abs error {:.3e}",
            e.relative_l2, e.cosine, e.max_abs_error
        );
    }
}
