//! The GPU backend against the CPU reference, byte for byte.
//!
//! - `kernels_compile_with_nvrtc` needs only libnvrtc (CI installs the
//!   `nvidia-cuda-nvrtc` wheel): every kernel compiles to PTX for sm_89 and
//!   sm_100 and to machine code for sm_90 (the GPU machine's H100/H200).
//! - The other tests need a CUDA GPU; without one they print why and pass,
//!   unless `QUANTSMITH_REQUIRE_GPU=1` (set on the GPU machine) makes that a failure.

mod common;

use std::sync::OnceLock;

use quantsmith::backend::{Backend, CpuBackend, DeviceChoice};
use quantsmith::formats::numerics::{f32_to_bf16, f32_to_f16};
use quantsmith::formats::{QuantFormat, QuantSpec, SourceDtype, StoredTensor, WeightView};
use quantsmith::gpu::bench::XorShift;
use quantsmith::gpu::kernels::{self, Target};
use quantsmith::gpu::{self, AmaxKind, CudaBackend, FusedMode};

// ---------------------------------------------------------------------------
// Without a GPU
// ---------------------------------------------------------------------------

#[test]
fn kernels_compile_with_nvrtc() {
    if !common::nvrtc_or_skip("kernels_compile_with_nvrtc") {
        return;
    }
    let (major, minor) = kernels::nvrtc_version().expect("nvrtcVersion");
    println!("NVRTC {major}.{minor}");
    let names = kernels::kernel_names();
    for (ma, mi) in [(8, 9), (10, 0)] {
        let ptx = kernels::compile(Target::Ptx { major: ma, minor: mi }).unwrap_or_else(|e| panic!("{e:#}"));
        let text = String::from_utf8_lossy(&ptx.image);
        for n in &names {
            assert!(text.contains(&format!(".entry {n}(")), "compute_{ma}{mi}: kernel {n} missing from the PTX");
        }
        assert!(!ptx.log.contains("warning"), "compute_{ma}{mi}: NVRTC warned:\n{}", ptx.log);
    }
    // Machine code for the GPU machine's Hopper cards, the one the backend loads.
    let cubin = kernels::compile(Target::Cubin { major: 9, minor: 0 }).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(cubin.image.starts_with(b"\x7fELF"), "sm_90 cubin is not an ELF image");
    println!("compiled {} kernels for compute_89, compute_100 and sm_90", names.len());
}

#[test]
fn device_selection_never_panics() {
    // `auto` always yields a backend (the GPU or the CPU).
    let b = gpu::open(DeviceChoice::Auto).expect("auto must fall back to the CPU");
    println!("auto -> {}", b.name());
    let cpu = gpu::open(DeviceChoice::Cpu).unwrap();
    assert!(cpu.name().starts_with("cpu"));
    if !gpu::driver_available() {
        let e = gpu::open(DeviceChoice::Cuda(0)).err().expect("cuda without a driver must fail");
        let msg = format!("{e:#}");
        assert!(msg.contains("cuda:0") && msg.contains("driver"), "unclear error: {msg}");
        println!("cuda -> error: {msg}");
    }
    // An ordinal past the last device is an error, never a panic.
    let e = gpu::open(DeviceChoice::Cuda(999)).err().expect("cuda:999 must fail");
    println!("cuda:999 -> error: {e:#}");
}

// ---------------------------------------------------------------------------
// With a GPU
// ---------------------------------------------------------------------------

fn backend() -> Option<&'static CudaBackend> {
    static B: OnceLock<Option<CudaBackend>> = OnceLock::new();
    B.get_or_init(|| {
        let b = common::gpu_or_skip("GPU backend", CudaBackend::new(0, 4))?;
        println!("GPU: {}", b.info());
        Some(b)
    })
    .as_ref()
}

const DTYPES: [SourceDtype; 3] = [SourceDtype::BF16, SourceDtype::F16, SourceDtype::F32];

fn specs() -> Vec<QuantSpec> {
    vec![
        QuantSpec { format: QuantFormat::Fp8, per_channel: false },
        QuantSpec { format: QuantFormat::Int8, per_channel: false },
        QuantSpec { format: QuantFormat::Int8, per_channel: true },
        QuantSpec { format: QuantFormat::Nvfp4, per_channel: false },
        QuantSpec { format: QuantFormat::Mxfp8, per_channel: false },
    ]
}

fn spec_name(s: QuantSpec) -> String {
    format!("{}{}", s.format.name(), if s.per_channel { "/channel" } else { "" })
}

/// f32 values → bytes of `dtype` (round to nearest even).
fn encode(dtype: SourceDtype, v: &[f32]) -> Vec<u8> {
    match dtype {
        SourceDtype::BF16 => v.iter().flat_map(|&x| f32_to_bf16(x).to_le_bytes()).collect(),
        SourceDtype::F16 => v.iter().flat_map(|&x| f32_to_f16(x).to_le_bytes()).collect(),
        SourceDtype::F32 => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

/// Smallest positive subnormal and smallest normal of `dtype`.
fn subnormal_range(dtype: SourceDtype) -> (f32, f32) {
    match dtype {
        SourceDtype::F16 => (2f32.powi(-24), 2f32.powi(-14)),
        SourceDtype::BF16 => (2f32.powi(-133), 2f32.powi(-126)),
        SourceDtype::F32 => (f32::from_bits(1), f32::MIN_POSITIVE),
    }
}

/// One test input.
struct Case {
    what: String,
    rows: usize,
    cols: usize,
    bytes: Vec<u8>,
}

fn normal(rng: &mut XorShift) -> f32 {
    (rng.next_f32() + rng.next_f32() + rng.next_f32() + rng.next_f32()) * 0.5
}

/// Random and adversarial inputs for `dtype`.
fn cases(dtype: SourceDtype, seed: u64) -> Vec<Case> {
    let mut rng = XorShift::new(seed);
    let mut out = Vec::new();
    let mut push = |what: &str, rows: usize, cols: usize, v: Vec<f32>| {
        assert_eq!(v.len(), rows * cols);
        out.push(Case { what: what.to_string(), rows, cols, bytes: encode(dtype, &v) });
    };
    // Shapes: vector path (cols % 8 == 0) and scalar path, padding to 16/32/128,
    // several 128-row scale tiles, grids of many blocks.
    let shapes = [
        (1, 1),
        (1, 7),
        (3, 17),
        (2, 64),
        (16, 16),
        (31, 33),
        (129, 48),
        (130, 100),
        (257, 96),
        (64, 1000),
        (17, 4095),
        (300, 640),
        (512, 3000),
        (1, 40000),
        (40, 8192),
        (70, 24),
    ];
    for (i, &(r, c)) in shapes.iter().enumerate() {
        let scale = [0.02f32, 1.0, 300.0, 3e-3][i % 4];
        let v: Vec<f32> = (0..r * c).map(|_| normal(&mut rng) * scale).collect();
        push(&format!("random x{scale}"), r, c, v);
    }
    // A large, realistic tensor.
    {
        let (r, c) = (1024, 3072);
        let v: Vec<f32> = (0..r * c).map(|_| normal(&mut rng) * 0.02).collect();
        push("random 1024x3072", r, c, v);
    }
    // All zeros, signed zeros.
    push("all zero", 40, 48, vec![0.0; 40 * 48]);
    push("signed zeros", 33, 40, (0..33 * 40).map(|i| if i % 3 == 0 { -0.0 } else { 0.0 }).collect());
    // Zero blocks and zero rows inside a random tensor, plus isolated -0.0.
    {
        let (r, c) = (150, 160);
        let mut v: Vec<f32> = (0..r * c).map(|_| normal(&mut rng)).collect();
        for row in 0..r {
            for col in 0..c {
                let blk16 = (row * 7 + col / 16) % 5 == 0;
                let blk32 = (row * 3 + col / 32) % 7 == 0;
                if blk16 || blk32 || row % 11 == 0 {
                    v[row * c + col] = if (row + col) % 2 == 0 { 0.0 } else { -0.0 };
                }
            }
        }
        push("zero blocks and rows", r, c, v);
    }
    // Subnormals of the dtype mixed with normals, and tensors made only of them.
    {
        let (min_sub, min_norm) = subnormal_range(dtype);
        let (r, c) = (64, 96);
        let v: Vec<f32> = (0..r * c)
            .map(|i| match i % 4 {
                0 => min_sub * (1 + (rng.next_u64() % 1000) as u32) as f32,
                1 => -min_sub * (1 + (rng.next_u64() % 7) as u32) as f32,
                2 => min_norm * rng.next_f32(),
                _ => normal(&mut rng),
            })
            .collect();
        push("subnormals with normals", r, c, v);
        let v: Vec<f32> = (0..r * c).map(|_| min_norm * rng.next_f32()).collect();
        push("only subnormals", r, c, v);
        let v: Vec<f32> = (0..r * c).map(|i| if i % 5 == 0 { min_sub } else { 0.0 }).collect();
        push("smallest subnormal", r, c, v);
    }
    // Ties: scales that are exact powers of two put values on rounding midpoints.
    {
        // FP8/MXFP8: amax 448 -> scale 1 (or 2^k), e4m3 midpoints 17, 19, 0.75*2^-9, ...
        let ties = [
            17.0f32,
            19.0,
            -17.0,
            232.0,
            464.0 / 2.0,
            3.0 * 2f32.powi(-10),
            5.0 * 2f32.powi(-10),
            7.5 * 2f32.powi(-9),
            0.5 * 2f32.powi(-9),
        ];
        let (r, c) = (32, 64);
        let v: Vec<f32> =
            (0..r * c).map(|i| if i % 64 == 0 { 448.0 } else { ties[i % ties.len()] * if i % 2 == 0 { 1.0 } else { -1.0 } }).collect();
        push("e4m3 ties", r, c, v);
        // NVFP4: amax 2688 -> s2 = 1; block max 6*2^k -> block scale 2^k; E2M1 midpoints.
        let e2 = [0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, -5.0, 0.0, -0.0, 4.0, 1.0, 3.0];
        let (r, c) = (16, 64);
        let v: Vec<f32> = (0..r * c)
            .map(|i| {
                let blk = (i % c) / 16;
                let k = [1.0f32, 2.0, 0.5, 448.0][blk];
                if i == 0 {
                    2688.0
                } else if i % 16 == 1 {
                    6.0 * k
                } else {
                    e2[i % e2.len()] * k
                }
            })
            .collect();
        push("e2m1 ties", r, c, v);
        // INT8: amax 127 -> scale 1: x.5 ties round half to even.
        let (r, c) = (8, 40);
        let v: Vec<f32> = (0..r * c).map(|i| if i % c == 0 { 127.0 } else { ((i % 40) as f32 - 20.0) + 0.5 }).collect();
        push("int8 ties", r, c, v);
    }
    // Saturation and huge outliers: one value far above the rest.
    {
        let big = match dtype {
            SourceDtype::F16 => 65504.0,
            SourceDtype::BF16 => 3.0e38,
            SourceDtype::F32 => 3.0e38,
        };
        let (r, c) = (48, 80);
        let mut v: Vec<f32> = (0..r * c).map(|_| normal(&mut rng) * 0.01).collect();
        v[5] = big;
        v[r * c - 3] = -big;
        push("huge outliers", r, c, v);
        let v: Vec<f32> = (0..r * c).map(|i| if i % 2 == 0 { big } else { -big * rng.next_f32() }).collect();
        push("saturating", r, c, v);
    }
    // Tiny tensors that take the CPU reference's fallbacks (f16: fp8 reciprocal
    // overflow below amax 0.0068, nvfp4 s2 underflow below 8e-5; bf16/f32: f32 underflow).
    for amax in [0.005f32, 1e-4, 5e-5, 1e-6, 1e-20, 1e-37, 1e-39, 1e-44] {
        let (r, c) = (20, 48);
        let v: Vec<f32> = (0..r * c).map(|i| if i == 7 { amax } else { amax * rng.next_f32() }).collect();
        push(&format!("tiny amax {amax:e}"), r, c, v);
    }
    out
}

fn same_result(
    gpu: &Result<Vec<StoredTensor>, quantsmith::formats::QuantError>,
    cpu: &Result<Vec<StoredTensor>, quantsmith::formats::QuantError>,
) -> Result<(), String> {
    match (gpu, cpu) {
        (Ok(g), Ok(c)) => {
            if g.len() != c.len() {
                return Err(format!("{} tensors vs {}", g.len(), c.len()));
            }
            for (g, c) in g.iter().zip(c) {
                if g.spec != c.spec {
                    return Err(format!("spec {:?} vs {:?}", g.spec, c.spec));
                }
                if g.data != c.data {
                    let i = g.data.iter().zip(&c.data).position(|(a, b)| a != b).unwrap();
                    let n = g.data.iter().zip(&c.data).filter(|(a, b)| a != b).count();
                    return Err(format!(
                        "`{}`: {n} byte(s) differ, first at byte {i}: gpu {:#04x}, cpu {:#04x}",
                        g.spec.suffix, g.data[i], c.data[i]
                    ));
                }
            }
            Ok(())
        }
        (Err(g), Err(c)) if g.to_string() == c.to_string() => Ok(()),
        (g, c) => Err(format!("gpu {:?} vs cpu {:?}", g.as_ref().err(), c.as_ref().err())),
    }
}

fn bits_equal(a: &[f32], b: &[f32]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| !(x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())))
}

#[test]
fn conversions_selftest() {
    let Some(b) = backend() else { return };
    let st = b.selftest_conversions().expect("self-test");
    println!("self-test: {st:?}");
    assert_eq!(st.mismatches, [0; 5], "fast conversions differ from the software reference: {st:?}");
}

#[test]
fn gpu_matches_cpu_bit_for_bit() {
    let Some(b) = backend() else { return };
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut failures = Vec::new();
    let mut compared = 0;
    for s in [1u64, seed] {
        println!("seed {s}");
        for dtype in DTYPES {
            for case in cases(dtype, s) {
                let w = WeightView { name: "t.weight", dtype, rows: case.rows, cols: case.cols, bytes: &case.bytes };
                for spec in specs() {
                    let label = format!("{} {:?} {} [{}, {}]", spec_name(spec), dtype, case.what, case.rows, case.cols);
                    let c = CpuBackend.quantize(spec, &w);
                    // Both GPU paths: the amax kernel + quantize kernel, and the fused single launch.
                    let mut bad = false;
                    for mode in [FusedMode::Never, FusedMode::Always] {
                        if mode == FusedMode::Always && !b.has_fused() {
                            continue;
                        }
                        b.set_fused(mode);
                        let g = b.quantize(spec, &w);
                        compared += 1;
                        if let Err(e) = same_result(&g, &c) {
                            failures.push(format!("{label} ({mode:?}): {e}"));
                            bad = true;
                        }
                    }
                    b.set_fused(FusedMode::Auto);
                    if bad {
                        continue;
                    }
                    // Dequantization on the GPU equals the CPU's, bit for bit.
                    if let Ok(stored) = &c {
                        let dg = b.dequantize(spec, stored, case.rows, case.cols).expect("gpu dequantize");
                        let dc = spec.implementation().dequantize(stored, case.rows, case.cols);
                        if let Some(i) = bits_equal(&dg, &dc) {
                            failures.push(format!("{label}: dequantized element {i}: gpu {:e} vs cpu {:e}", dg[i], dc[i]));
                        }
                    }
                }
            }
        }
    }
    println!("compared {compared} quantizations, {} failed", failures.len());
    for f in failures.iter().take(40) {
        println!("FAIL {f}");
    }
    assert!(failures.is_empty(), "{} GPU results differ from the CPU reference", failures.len());
}

#[test]
fn amax_kernels_match_cpu() {
    let Some(b) = backend() else { return };
    for dtype in DTYPES {
        for case in cases(dtype, 7).into_iter().take(18) {
            let w = WeightView { name: "t", dtype, rows: case.rows, cols: case.cols, bytes: &case.bytes };
            let vals: Vec<f32> = case
                .bytes
                .chunks_exact(dtype.size())
                .map(|c| match dtype {
                    SourceDtype::F32 => f32::from_le_bytes(c.try_into().unwrap()),
                    SourceDtype::F16 => half::f16::from_le_bytes(c.try_into().unwrap()).to_f32(),
                    SourceDtype::BF16 => half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32(),
                })
                .collect();
            let (r, c) = (case.rows, case.cols);
            let row_max: Vec<f32> = (0..r).map(|i| vals[i * c..(i + 1) * c].iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
            let t = b.amax(&w, AmaxKind::Tensor).unwrap();
            assert_eq!(t[0], row_max.iter().fold(0f32, |m, v| m.max(*v)), "tensor amax {:?} {}", dtype, case.what);
            assert_eq!(b.amax(&w, AmaxKind::Rows).unwrap(), row_max, "row amax {:?} {}", dtype, case.what);
            for blk in [16, 32] {
                let nb = c.div_ceil(blk);
                let want: Vec<f32> = (0..r * nb)
                    .map(|i| {
                        let (row, j) = (i / nb, i % nb);
                        vals[row * c + j * blk..row * c + ((j + 1) * blk).min(c)].iter().fold(0f32, |m, v| m.max(v.abs()))
                    })
                    .collect();
                assert_eq!(b.amax(&w, AmaxKind::Blocks(blk)).unwrap(), want, "block{blk} amax {:?} {}", dtype, case.what);
            }
        }
    }
}

#[test]
fn non_finite_inputs_are_refused_like_the_cpu() {
    let Some(b) = backend() else { return };
    for dtype in DTYPES {
        let (r, c) = (37, 70);
        let mut v: Vec<f32> = (0..r * c).map(|i| (i as f32 * 0.37).sin()).collect();
        for (pos, bad) in [(5usize, f32::NAN), (900, f32::INFINITY), (2000, f32::NEG_INFINITY)] {
            v[pos] = bad;
            let bytes = encode(dtype, &v);
            let w = WeightView { name: "blocks.3.mlp.weight", dtype, rows: r, cols: c, bytes: &bytes };
            for spec in specs() {
                let g = b.quantize(spec, &w);
                let cpu = CpuBackend.quantize(spec, &w);
                assert!(g.is_err(), "{} {dtype:?}: non-finite input accepted", spec_name(spec));
                same_result(&g, &cpu).unwrap_or_else(|e| panic!("{} {dtype:?}: {e}", spec_name(spec)));
                assert!(g.unwrap_err().to_string().contains("blocks.3.mlp.weight"));
            }
        }
    }
}

/// MXFP8 near the bf16 maximum (formats::mxfp8::OVERFLOW_AMAX): 247·2^120 is
/// quantized the same bytes on both sides (code 240, scale 2^120); 248·2^120,
/// which would dequantize to infinity, is refused by both with the same message.
#[test]
fn mxfp8_overflow_is_refused_like_the_cpu() {
    let Some(b) = backend() else { return };
    let spec = QuantSpec { format: QuantFormat::Mxfp8, per_channel: false };
    let (r, c) = (33, 70);
    for dtype in [SourceDtype::BF16, SourceDtype::F32] {
        for (big, refused) in [(247.0 * 2f32.powi(120), false), (248.0 * 2f32.powi(120), true), (f32::from_bits(0x7F7F_0000), true)] {
            let mut v: Vec<f32> = (0..r * c).map(|i| (i as f32 * 0.37).sin()).collect();
            v[40] = big;
            v[1000] = -big;
            let bytes = encode(dtype, &v);
            let w = WeightView { name: "blocks.1.mlp.weight", dtype, rows: r, cols: c, bytes: &bytes };
            let g = b.quantize(spec, &w);
            let cpu = CpuBackend.quantize(spec, &w);
            assert_eq!(g.is_err(), refused, "{dtype:?} {big:e}");
            same_result(&g, &cpu).unwrap_or_else(|e| panic!("{dtype:?} {big:e}: {e}"));
        }
    }
}

#[test]
fn concurrent_callers_get_their_own_results() {
    let Some(b) = backend() else { return };
    let spec_list = specs();
    let inputs: Vec<(usize, usize, Vec<u8>)> = (0..24)
        .map(|i| {
            let (r, c) = [(300, 512), (64, 3000), (1000, 96), (128, 4096)][i % 4];
            let mut rng = XorShift::new(100 + i as u64);
            let v: Vec<f32> = (0..r * c).map(|_| normal(&mut rng) * (1.0 + i as f32)).collect();
            (r, c, encode(SourceDtype::BF16, &v))
        })
        .collect();
    std::thread::scope(|s| {
        for t in 0..6 {
            let (inputs, spec_list) = (&inputs, &spec_list);
            s.spawn(move || {
                for (i, (r, c, bytes)) in inputs.iter().enumerate().filter(|(i, _)| i % 6 == t) {
                    let spec = spec_list[i % spec_list.len()];
                    let w = WeightView { name: "c", dtype: SourceDtype::BF16, rows: *r, cols: *c, bytes };
                    same_result(&b.quantize(spec, &w), &CpuBackend.quantize(spec, &w))
                        .unwrap_or_else(|e| panic!("thread {t} tensor {i} {}: {e}", spec_name(spec)));
                }
            });
        }
    });
    assert_eq!(b.in_flight(), 4);
    let peak = b.peak_device_bytes().unwrap();
    assert!(peak > 0, "peak device memory must be reported");
    println!("peak device memory {:.1} MiB", peak as f64 / (1 << 20) as f64);
}
