//! Measurements for BENCHMARKS.md: kernel bandwidth per format against a
//! device-to-device copy of the same bytes, and the streaming throughput of
//! [`CudaBackend`] (pinned staging, uploads, kernels, downloads) against the
//! CPU reference on the same host tensors.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Result;
use cudarc::driver::sys;

use super::CudaBackend;
use super::cuda::{OutLayout, time_ms};
use super::driver::{DeviceBuffer, PinnedBuffer, Stream};
use crate::backend::Backend;
use crate::formats::{QuantSpec, SourceDtype, WeightView};

/// Kernel time of one format on one shape, beside a device copy of its input.
///
/// Bandwidth counts the bytes a quantization must move: the input read once
/// plus the stored tensors written once, over the time taken; the copy's counts
/// its input read plus the same bytes written. So `fraction_of_copy` is
/// (in + out) / (2 in) x copy time / kernel time.
#[derive(Clone, Debug)]
pub struct KernelBench {
    pub spec: QuantSpec,
    /// The fused single-launch kernel (else the amax kernel + the quantize kernel).
    pub fused: bool,
    pub dtype: SourceDtype,
    pub rows: usize,
    pub cols: usize,
    /// Source bytes read (once) and stored bytes written.
    pub input_bytes: u64,
    pub output_bytes: u64,
    /// Median time of everything the device does for an input already on it:
    /// zeroing the scratch word, the amax kernel over the whole tensor (formats
    /// with a per-tensor scale) and the quantize kernel, or the fused kernel.
    pub kernel_ms: f64,
    /// (input + output bytes) / kernel_ms.
    pub kernel_gbps: f64,
    /// Median time of the quantize kernel alone, the amax being in place: what
    /// the backend runs once the upload, whose pieces the amax kernel follows
    /// on the way in, has completed. Equal to `kernel_ms` for the fused kernels.
    pub quant_ms: f64,
    /// (input + output bytes) / quant_ms.
    pub quant_gbps: f64,
    /// Median time of `cuMemcpyDtoD` of the input bytes.
    pub copy_ms: f64,
    /// 2 x input bytes / copy time (read + write).
    pub copy_gbps: f64,
}

impl KernelBench {
    /// Bandwidth of all the device work (`kernel_ms`) as a fraction of the copy's.
    pub fn fraction_of_copy(&self) -> f64 {
        self.kernel_gbps / self.copy_gbps
    }

    /// Bandwidth of the quantize kernel alone (`quant_ms`) as a fraction of the copy's.
    pub fn quant_fraction_of_copy(&self) -> f64 {
        self.quant_gbps / self.copy_gbps
    }
}

/// A small xorshift generator for benchmark data (no dependency, reproducible).
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in [-1, 1).
    pub fn next_f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32) * (2.0 / (1u64 << 24) as f32) - 1.0
    }
}

/// Weight-like bytes of `dtype`: roughly N(0, 0.02) with rare outliers
/// (generated in parallel, reproducible for a given seed).
pub fn random_weight(dtype: SourceDtype, n: usize, seed: u64) -> Vec<u8> {
    use crate::formats::numerics::{f32_to_bf16, f32_to_f16};
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 20;
    let size = dtype.size();
    let mut out = vec![0u8; n * size];
    out.par_chunks_mut(CHUNK * size).enumerate().for_each(|(k, part)| {
        let mut rng = XorShift::new(seed ^ ((k as u64 + 1) << 32));
        for (i, e) in part.chunks_exact_mut(size).enumerate() {
            let v = (rng.next_f32() + rng.next_f32() + rng.next_f32()) * 0.02;
            let v = if (k * CHUNK + i) % 100_003 == 7 { v * 40.0 } else { v };
            match dtype {
                SourceDtype::F32 => e.copy_from_slice(&v.to_le_bytes()),
                SourceDtype::F16 => e.copy_from_slice(&f32_to_f16(v).to_le_bytes()),
                SourceDtype::BF16 => e.copy_from_slice(&f32_to_bf16(v).to_le_bytes()),
            }
        }
    });
    out
}

/// Times the kernels of `spec` on a `[rows, cols]` tensor of `dtype` already on
/// the device (all of them, and the quantize kernel alone), and a
/// device-to-device copy of the same input bytes. Inputs rotate over enough
/// copies to exceed the L2 cache, so every timed launch reads from memory.
/// `fused` picks the fused single launch where the format has one.
pub fn kernel_bandwidth(
    b: &CudaBackend,
    spec: QuantSpec,
    dtype: SourceDtype,
    rows: usize,
    cols: usize,
    fused: bool,
    iters: usize,
) -> Result<KernelBench> {
    b.set_fused(if fused { super::FusedMode::Always } else { super::FusedMode::Never });
    let r = kernel_bandwidth_inner(b, spec, dtype, rows, cols, iters);
    b.set_fused(super::FusedMode::Auto);
    r.map(|k| KernelBench { fused: fused && b.has_fused() && super::cuda::needs_tensor_amax(spec), ..k })
}

fn kernel_bandwidth_inner(
    b: &CudaBackend,
    spec: QuantSpec,
    dtype: SourceDtype,
    rows: usize,
    cols: usize,
    iters: usize,
) -> Result<KernelBench> {
    let ctx = b.context().clone();
    ctx.bind_to_thread().map_err(|e| super::driver::err("cuCtxSetCurrent", e))?;
    let stats = b.mem_stats().clone();
    let in_bytes = rows * cols * dtype.size();
    let layout = OutLayout::new(spec.implementation().layout(rows, cols));
    let stored: usize = layout.specs.iter().map(|s| s.byte_len()).sum();
    let copies = (256usize << 20).div_ceil(in_bytes).clamp(2, 8);
    let host = random_weight(dtype, rows * cols, 42);
    let stream = Stream::new(&ctx)?;
    let mut inputs = Vec::new();
    let mut outputs = Vec::new();
    let mut copy_dst = Vec::new();
    for _ in 0..copies {
        let d = DeviceBuffer::new(&ctx, &stats, in_bytes)?;
        // SAFETY: `host` has in_bytes bytes; d is that large. Pageable source: the copy completes before return... once synchronised below.
        unsafe { stream.htod(d.ptr(), host.as_ptr(), in_bytes)? };
        stream.synchronize()?;
        inputs.push(d);
        outputs.push(DeviceBuffer::new(&ctx, &stats, layout.total)?);
        copy_dst.push(DeviceBuffer::new(&ctx, &stats, in_bytes)?);
    }
    let kernel_ms = time_ms(&ctx, &stream, 3, iters, |i| {
        let k = i % copies;
        // SAFETY: the buffers are sized for this input and layout and outlive the sync in time_ms.
        unsafe { b.launch_quantize(&stream, spec, dtype, (rows, cols), inputs[k].ptr(), outputs[k].ptr(), &layout) }
    })?;
    let quant_ms = if b.uses_fused(spec) {
        kernel_ms
    } else {
        // Each output's scratch word now holds its input's amax (the one-pass
        // kernels only fold their maxima into it): time the quantize kernel alone.
        time_ms(&ctx, &stream, 3, iters, |i| {
            let k = i % copies;
            // SAFETY: as above.
            unsafe { b.launch_quant(&stream, spec, dtype, (rows, cols), inputs[k].ptr(), outputs[k].ptr(), &layout) }
        })?
    };
    let copy_ms = time_ms(&ctx, &stream, 3, iters, |i| {
        let k = i % copies;
        // SAFETY: both buffers hold in_bytes.
        unsafe { stream.dtod(copy_dst[k].ptr(), inputs[k].ptr(), in_bytes) }
    })?;
    let gb = |bytes: f64, ms: f64| bytes / (ms * 1e-3) / 1e9;
    Ok(KernelBench {
        spec,
        fused: false,
        dtype,
        rows,
        cols,
        input_bytes: in_bytes as u64,
        output_bytes: stored as u64,
        kernel_ms,
        kernel_gbps: gb((in_bytes + stored) as f64, kernel_ms),
        quant_ms,
        quant_gbps: gb((in_bytes + stored) as f64, quant_ms),
        copy_ms,
        copy_gbps: gb(2.0 * in_bytes as f64, copy_ms),
    })
}

/// The per-tensor amax kernel alone on a `[rows, cols]` input: (ms, read GB/s).
pub fn amax_bandwidth(b: &CudaBackend, dtype: SourceDtype, rows: usize, cols: usize, iters: usize) -> Result<(f64, f64)> {
    let ctx = b.context().clone();
    ctx.bind_to_thread().map_err(|e| super::driver::err("cuCtxSetCurrent", e))?;
    let stats = b.mem_stats().clone();
    let in_bytes = rows * cols * dtype.size();
    let copies = (256usize << 20).div_ceil(in_bytes).clamp(2, 8);
    let host = random_weight(dtype, rows * cols, 43);
    let stream = Stream::new(&ctx)?;
    let out = DeviceBuffer::new(&ctx, &stats, 256)?;
    let mut inputs = Vec::new();
    for _ in 0..copies {
        let d = DeviceBuffer::new(&ctx, &stats, in_bytes)?;
        // SAFETY: host holds in_bytes; synchronised right after.
        unsafe { stream.htod(d.ptr(), host.as_ptr(), in_bytes)? };
        stream.synchronize()?;
        inputs.push(d);
    }
    let ms = time_ms(&ctx, &stream, 3, iters, |i| {
        // SAFETY: buffers sized above.
        unsafe {
            stream.memset(out.ptr(), 0, 4)?;
            b.launch_amax(&stream, dtype, rows * cols, inputs[i % copies].ptr(), out.ptr())
        }
    })?;
    Ok((ms, in_bytes as f64 / (ms * 1e-3) / 1e9))
}

/// Host-to-device bandwidth from pinned memory (GB/s), for reference.
pub fn upload_bandwidth(b: &CudaBackend, bytes: usize) -> Result<f64> {
    let ctx = b.context().clone();
    let stats = b.mem_stats().clone();
    let stream = Stream::new(&ctx)?;
    let d = DeviceBuffer::new(&ctx, &stats, bytes)?;
    let h = PinnedBuffer::new(&ctx, bytes, true)?;
    let ms = time_ms(&ctx, &stream, 1, 5, |_| {
        // SAFETY: both buffers hold `bytes`.
        unsafe { stream.htod(d.ptr() as sys::CUdeviceptr, h.as_ptr(), bytes) }
    })?;
    Ok(bytes as f64 / (ms * 1e-3) / 1e9)
}

/// Throughput of a backend's `quantize` over host tensors, with `threads`
/// callers at once (as the conversion pipeline drives it).
#[derive(Clone, Debug)]
pub struct StreamBench {
    pub backend: String,
    pub tensors: usize,
    pub input_bytes: u64,
    pub seconds: f64,
    pub gbps: f64,
}

pub fn streaming(
    backend: &dyn Backend,
    spec: QuantSpec,
    dtype: SourceDtype,
    tensors: &[(usize, usize, Vec<u8>)],
    threads: usize,
) -> Result<StreamBench> {
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> Option<String> {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let (rows, cols, bytes) = tensors.get(i)?;
                        let w = WeightView { name: "bench", dtype, rows: *rows, cols: *cols, bytes };
                        if let Err(e) = backend.quantize(spec, &w) {
                            return Some(e.to_string());
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok().flatten()).collect()
    });
    if let Some(e) = errors.first() {
        anyhow::bail!("{e}");
    }
    let seconds = start.elapsed().as_secs_f64();
    let input_bytes: u64 = tensors.iter().map(|t| t.2.len() as u64).sum();
    Ok(StreamBench { backend: backend.name(), tensors: tensors.len(), input_bytes, seconds, gbps: input_bytes as f64 / seconds / 1e9 })
}
