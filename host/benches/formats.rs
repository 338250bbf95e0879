//! CPU reference quantization throughput, in bytes of bf16 input per second,
//! on a FLUX-sized 3072 × 12288 Linear weight (72 MiB of bf16).
//!
//! `cargo bench -p quantsmith --bench formats`; set RAYON_NUM_THREADS=2 to
//! see the two-core figure the conversion has to reach (disk speed).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quantsmith::formats::{QuantFormat, QuantSpec, SourceDtype, WeightView};

const ROWS: usize = 3072;
const COLS: usize = 12288;

/// Weight-like bf16 data: roughly normal, σ ≈ 0.02, with rows of different
/// scale, from a fixed xorshift sequence.
fn weights() -> Vec<u8> {
    let mut s = 0x853C_49E6_748F_EA9Bu64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut out = Vec::with_capacity(ROWS * COLS * 2);
    for r in 0..ROWS {
        let row_scale = 0.01 + 0.03 * ((r % 17) as f32 / 16.0);
        for _ in 0..COLS {
            // Sum of four uniforms: close enough to normal for scale statistics.
            let x = (next() + next() + next() + next() - 2.0) * row_scale * 1.7;
            let bits = x.to_bits();
            let bf16 = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
            out.extend_from_slice(&bf16.to_le_bytes());
        }
    }
    out
}

fn bench_formats(c: &mut Criterion) {
    let bytes = weights();
    let w = WeightView { name: "bench.weight", dtype: SourceDtype::BF16, rows: ROWS, cols: COLS, bytes: &bytes };
    let mut group = c.benchmark_group("quantize_bf16_3072x12288");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.sample_size(10);
    let specs = [
        ("fp8", QuantSpec { format: QuantFormat::Fp8, per_channel: false }),
        ("int8_tensor", QuantSpec { format: QuantFormat::Int8, per_channel: false }),
        ("int8_channel", QuantSpec { format: QuantFormat::Int8, per_channel: true }),
        ("nvfp4", QuantSpec { format: QuantFormat::Nvfp4, per_channel: false }),
        ("mxfp8", QuantSpec { format: QuantFormat::Mxfp8, per_channel: false }),
    ];
    // Baseline in the same run: copying the same bytes into a fresh buffer, the
    // least any format must do (read the input, write an output).
    group.bench_function("baseline_copy", |b| b.iter(|| black_box(&bytes).to_vec()));
    for (name, spec) in specs {
        let format = spec.implementation();
        group.bench_function(name, |b| b.iter(|| format.quantize(black_box(&w)).unwrap()));
    }
    group.finish();

    // Verification reads the source again and dequantizes: it runs on every
    // converted layer too.
    let mut group = c.benchmark_group("verify_bf16_3072x12288");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.sample_size(10);
    for (name, spec) in specs {
        let format = spec.implementation();
        let stored = format.quantize(&w).unwrap();
        group.bench_function(name, |b| b.iter(|| format.verify(black_box(&w), black_box(&stored)).unwrap()));
    }
    group.finish();
}

criterion_group!(benches, bench_formats);
criterion_main!(benches);
