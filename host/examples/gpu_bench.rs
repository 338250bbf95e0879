//! GPU benchmarks for BENCHMARKS.md ("GPU" section).
//!
//! ```text
//! cargo run --release --example gpu_bench -- [--quick] [--dump DIR]
//! ```
//! Prints, for the first CUDA device:
//! - the conversion self-test;
//! - kernel bandwidth per format and dtype on FLUX.1 weight shapes, beside a
//!   device-to-device copy of the same input bytes (target: >= 70%): the
//!   quantize kernel alone (what follows the upload) and all the device work
//!   for an input already on the device (amax kernel included);
//! - pinned host-to-device bandwidth;
//! - streaming throughput of the GPU backend's `quantize` (pinned staging,
//!   uploads, kernels, downloads, several tensors in flight) against the CPU
//!   reference on the same host tensors.
//!
//! `--dump DIR` writes a bf16 3072x12288 input and the GPU's FP8 result
//! (`fp8_in.bf16`, `fp8_q.bin`, `fp8_scale.f32`) for scripts/gpu-bench.sh to
//! compare with PyTorch's own FP8 quantization of the same tensor.

use std::time::Instant;

use anyhow::{Context, Result};
use quantsmith::backend::{Backend, CpuBackend};
use quantsmith::formats::{QuantFormat, QuantSpec, SourceDtype, WeightView};
use quantsmith::gpu::{self, CudaBackend, bench};

fn spec(format: QuantFormat, per_channel: bool) -> QuantSpec {
    QuantSpec { format, per_channel }
}

fn label(s: QuantSpec) -> String {
    format!("{}{}", s.format.name(), if s.per_channel { "/ch" } else { "" })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let dump = args.iter().position(|a| a == "--dump").and_then(|i| args.get(i + 1)).cloned();

    let started = Instant::now();
    let b = CudaBackend::new(0, gpu::configured_slots()).context("opening cuda:0")?;
    println!("device: {}; backend ready in {:.2} s (NVRTC compile + load)", b.info(), started.elapsed().as_secs_f64());
    let t = Instant::now();
    let st = b.selftest_conversions()?;
    println!(
        "conversion self-test (all 2^32 f32 inputs, {:.2} s): mismatches {:?}; division-free paths (INT8, NVFP4, MXFP8 exponent): {:?}",
        t.elapsed().as_secs_f64(),
        st.mismatches,
        st.replacements
    );

    if let Some((grid, smem)) = b.fused_geometry() {
        println!("fused kernels: {grid} resident blocks of 512 threads, {} KiB of shared memory each", smem / 1024);
    }

    // Kernel bandwidth.
    let iters = if quick { 10 } else { 30 };
    let shapes: &[(usize, usize, &str)] = &[(3072, 12288, "FLUX mlp.2"), (9216, 3072, "FLUX attn.qkv"), (3072, 3072, "FLUX attn.proj")];
    let mut rows_out = Vec::new();
    for &(r, c, what) in shapes {
        let mut jobs: Vec<(QuantSpec, SourceDtype, bool)> = vec![
            (spec(QuantFormat::Fp8, false), SourceDtype::BF16, false),
            (spec(QuantFormat::Int8, false), SourceDtype::BF16, false),
            (spec(QuantFormat::Int8, true), SourceDtype::BF16, false),
            (spec(QuantFormat::Nvfp4, false), SourceDtype::BF16, false),
            (spec(QuantFormat::Mxfp8, false), SourceDtype::BF16, false),
        ];
        if r == 3072 && c == 12288 {
            for d in [SourceDtype::F16, SourceDtype::F32] {
                for f in [QuantFormat::Fp8, QuantFormat::Int8, QuantFormat::Nvfp4, QuantFormat::Mxfp8] {
                    jobs.push((spec(f, false), d, false));
                }
            }
            jobs.push((spec(QuantFormat::Fp8, false), SourceDtype::BF16, true));
            jobs.push((spec(QuantFormat::Nvfp4, false), SourceDtype::BF16, true));
        }
        for (s, d, fused) in jobs {
            let kb = bench::kernel_bandwidth(&b, s, d, r, c, fused, iters)?;
            rows_out.push((what, kb));
        }
    }
    println!();
    println!("kernel bandwidth: (input + stored bytes) / time, against cuMemcpyDtoD of the input (2 x input / time);");
    println!("quantize = the quantize kernel alone (the backend runs the amax kernel on each upload piece as it lands);");
    println!("all = everything the device does for an input already on it (scratch memset + amax kernel + quantize kernel)");
    println!();
    println!(
        "| format | path | dtype | shape | in+out MB | copy ms | copy GB/s | quantize ms | quantize GB/s | quantize/copy | all ms | all GB/s | all/copy |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (what, kb) in &rows_out {
        let path = if kb.fused {
            "fused"
        } else if matches!(kb.spec.format, QuantFormat::Mxfp8) || kb.spec.per_channel {
            "one pass"
        } else {
            "amax + quantize"
        };
        println!(
            "| {} | {path} | {:?} | {}x{} ({what}) | {:.1} | {:.4} | {:.0} | {:.4} | {:.0} | {:.0}% | {:.4} | {:.0} | {:.0}% |",
            label(kb.spec),
            kb.dtype,
            kb.rows,
            kb.cols,
            (kb.input_bytes + kb.output_bytes) as f64 / 1e6,
            kb.copy_ms,
            kb.copy_gbps,
            kb.quant_ms,
            kb.quant_gbps,
            100.0 * kb.quant_fraction_of_copy(),
            kb.kernel_ms,
            kb.kernel_gbps,
            100.0 * kb.fraction_of_copy()
        );
    }

    let (ams, agb) = bench::amax_bandwidth(&b, SourceDtype::BF16, 3072, 12288, iters)?;
    println!("\namax kernel alone, bf16 3072x12288: {ams:.4} ms, {agb:.0} GB/s read");

    // Variants of the tuning knobs (defaults: QS_FLAT_U=4 QS_NV_U=2 QS_MX_U=2),
    // bf16; each compiles its own module.
    println!("\n| variant | format | quantize ms | quantize/copy | all ms | all/copy |");
    println!("|---|---|---|---|---|---|");
    type Variant<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [QuantFormat]);
    let variants: &[Variant] = &[
        ("QS_FLAT_U=2", &[("QS_FLAT_U", "2")], &[QuantFormat::Fp8, QuantFormat::Int8]),
        ("QS_NV_U=1", &[("QS_NV_U", "1")], &[QuantFormat::Nvfp4]),
        ("QS_MX_U=1", &[("QS_MX_U", "1")], &[QuantFormat::Mxfp8]),
        ("QS_MX_U=4", &[("QS_MX_U", "4")], &[QuantFormat::Mxfp8]),
    ];
    for (name, defines, formats) in variants {
        let vb = match CudaBackend::with_defines(0, 1, defines) {
            Ok(v) => v,
            Err(e) => {
                println!("| {name} | compile/load failed: {e:#} | | | | |");
                continue;
            }
        };
        for &f in *formats {
            for (r, c) in [(3072, 12288), (3072, 3072)] {
                let kb = bench::kernel_bandwidth(&vb, spec(f, false), SourceDtype::BF16, r, c, false, iters)?;
                println!(
                    "| {name} | {} {r}x{c} | {:.4} | {:.0}% | {:.4} | {:.0}% |",
                    label(kb.spec),
                    kb.quant_ms,
                    100.0 * kb.quant_fraction_of_copy(),
                    kb.kernel_ms,
                    100.0 * kb.fraction_of_copy()
                );
            }
        }
    }

    let up = bench::upload_bandwidth(&b, 1 << 30)?;
    println!("\npinned host->device copy: {up:.1} GB/s");

    // Streaming: the backend as the pipeline drives it, on FLUX.1 double-block shapes.
    let reps = if quick { 1 } else { 3 };
    let mut tensors = Vec::new();
    for k in 0..reps {
        for (j, &(r, c)) in [(9216usize, 3072usize), (3072, 3072), (12288, 3072), (3072, 12288)].iter().enumerate() {
            for _ in 0..2 {
                tensors.push((r, c, bench::random_weight(SourceDtype::BF16, r * c, (k * 10 + j) as u64)));
            }
        }
    }
    let total: usize = tensors.iter().map(|t| t.2.len()).sum();
    println!("\nstreaming {} bf16 tensors, {:.2} GB, from pageable host memory:", tensors.len(), total as f64 / 1e9);
    println!("| format | backend | threads | seconds | input GB/s |");
    println!("|---|---|---|---|---|");
    for s in [spec(QuantFormat::Fp8, false), spec(QuantFormat::Nvfp4, false)] {
        // one pass first: the slots grow their buffers to the largest tensor
        let _ = bench::streaming(&b, s, SourceDtype::BF16, &tensors, b.in_flight())?;
        let g = bench::streaming(&b, s, SourceDtype::BF16, &tensors, b.in_flight())?;
        println!("| {} | {} | {} | {:.3} | {:.1} |", label(s), g.backend, b.in_flight(), g.seconds, g.gbps);
        let c = bench::streaming(&CpuBackend, s, SourceDtype::BF16, &tensors, 1)?;
        println!("| {} | {} | 1 | {:.3} | {:.1} |", label(s), c.backend, c.seconds, c.gbps);
    }
    println!("peak device memory: {:.0} MiB", b.peak_device_bytes().unwrap_or(0) as f64 / (1 << 20) as f64);
    println!("backend timing (all streaming passes): {}", b.timing());

    if let Some(dir) = dump {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir)?;
        let (r, c) = (3072, 12288);
        let x = bench::random_weight(SourceDtype::BF16, r * c, 4242);
        let w = WeightView { name: "dump", dtype: SourceDtype::BF16, rows: r, cols: c, bytes: &x };
        let out = b.quantize(spec(QuantFormat::Fp8, false), &w)?;
        std::fs::write(dir.join("fp8_in.bf16"), &x)?;
        std::fs::write(dir.join("fp8_q.bin"), &out[0].data)?;
        std::fs::write(dir.join("fp8_scale.f32"), &out[1].data)?;
        println!("\nwrote {}/fp8_in.bf16, fp8_q.bin, fp8_scale.f32 ({r}x{c})", dir.display());
    }
    Ok(())
}
