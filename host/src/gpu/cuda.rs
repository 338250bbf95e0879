//! [`CudaBackend`]: quantization on one CUDA device, several tensors in flight.
//!
//! Each in-flight slot owns a stream, a pinned upload ring (2 x 8 MiB), a pinned
//! download buffer and two device buffers (input, output); the last three grow
//! on demand and are reused across tensors. One `quantize` call:
//!
//! 1. copies the memory-mapped source into two pinned 8 MiB staging pieces in
//!    turn, starting the asynchronous upload of each piece as soon as it is
//!    there (the CPU fills one piece while the DMA engine moves the other);
//!    For the formats with a per-tensor scale (FP8, INT8 per tensor, NVFP4)
//!    the amax kernel runs on each piece as soon as it has landed, while the
//!    next piece is still on its way, so the tensor's amax is known when the
//!    last byte arrives (the amax never leaves the device);
//! 2. runs the format's quantize kernel on the slot's stream: one read of the
//!    input on the device after the upload;
//! 3. downloads every stored tensor plus the amax word in one copy, waits for
//!    the stream, and checks the amax for NaN/infinity (then the CPU names
//!    the first bad element, exactly as the CPU reference does).
//!
//! The pipeline calls `quantize` from [`Backend::in_flight`] threads at once,
//! so one tensor's upload overlaps another's kernels and a third's download
//! and file write.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cudarc::driver::safe::CudaContext;
use cudarc::driver::sys;
use rayon::prelude::*;

use super::driver::{self, DeviceBuffer, Event, Kernel, MemStats, Module, PinnedBuffer, Stream, arg};
use super::kernels;
use crate::backend::Backend;
use crate::formats::numerics::{self, with_src};
use crate::formats::{QuantError, QuantFormat, QuantSpec, SourceDtype, StoredSpec, StoredTensor, WeightView};

/// Upload piece size: the CPU fills piece k+1 while the DMA engine moves piece k.
const PIECE: usize = 8 << 20;
/// Alignment of each tensor inside the device output buffer.
const ALIGN: usize = 256;
/// Bytes at the end of the output buffer for the amax word.
const SCRATCH: usize = 256;
/// Threads per block of every kernel (`QS_THREADS`) but the fused ones.
const THREADS: u32 = 256;

/// What the device is.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub multiprocessors: u32,
    pub total_memory: u64,
    /// `cuDriverGetVersion`, e.g. 13000.
    pub driver_version: i32,
    pub nvrtc_version: (i32, i32),
}

/// `NVIDIA H200 (sm_90, 132 SMs, 139.8 GiB), driver 13000, NVRTC 13.0`, for logs and benchmark headers.
impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (sm_{}{}, {} SMs, {:.1} GiB), driver {}, NVRTC {}.{}",
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.multiprocessors,
            self.total_memory as f64 / (1u64 << 30) as f64,
            self.driver_version,
            self.nvrtc_version.0,
            self.nvrtc_version.1
        )
    }
}

/// Which maxima [`CudaBackend::amax`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmaxKind {
    /// One value: max |x| over the tensor.
    Tensor,
    /// One value per row.
    Rows,
    /// One value per run of `n` elements along each row (zero-padded), `[rows, ceil(cols/n)]`.
    Blocks(usize),
}

/// Mismatches found by the conversion self-test (all zero when healthy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelfTest {
    /// bf16 rounding, f16 rounding, E4M3 encoding, f16 decoding, and the
    /// replacements of the reference formulas: the branch-free E2M1 encoder
    /// plus everything in `replacements` (so a check of `mismatches` covers them).
    pub mismatches: [u32; 5],
    /// The smallest f32 (or f16) bit pattern that mismatched, per check.
    pub first: [u32; 5],
    /// Division-free paths against the IEEE division they replace, over every
    /// finite f32 input: INT8 codes from a reciprocal (f32, f16 and bf16
    /// rounding, 16 divisors), NVFP4's E2M1 codes from a reciprocal (32
    /// divisors), MXFP8 exponents from the block maximum's bits.
    pub replacements: [u32; 3],
    /// The smallest input bits that mismatched, per replacement.
    pub replacements_first: [u32; 3],
}

/// Time spent by `quantize` calls, summed over all callers.
#[derive(Clone, Copy, Debug, Default)]
pub struct TimingSummary {
    pub tensors: u64,
    pub input_bytes: u64,
    /// Waiting for a free slot.
    pub slot_wait: Duration,
    /// Copying the source into pinned memory and queueing its upload.
    pub stage: Duration,
    /// Upload, kernels and download, until the stream is idle.
    pub device: Duration,
    /// Copying the results out of pinned memory.
    pub unstage: Duration,
}

impl std::fmt::Display for TimingSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tensors, {:.2} GB in; summed over callers: slot wait {:.2} s, staging {:.2} s, device {:.2} s, unstaging {:.2} s",
            self.tensors,
            self.input_bytes as f64 / 1e9,
            self.slot_wait.as_secs_f64(),
            self.stage.as_secs_f64(),
            self.device.as_secs_f64(),
            self.unstage.as_secs_f64()
        )
    }
}

#[derive(Default)]
struct Timing {
    tensors: AtomicU64,
    bytes: AtomicU64,
    ns: [AtomicU64; 4],
}

impl Timing {
    fn add(&self, bytes: usize, wait: Duration, stage: Duration, device: Duration, unstage: Duration) {
        self.tensors.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        for (a, d) in self.ns.iter().zip([wait, stage, device, unstage]) {
            a.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        }
    }
    fn summary(&self) -> TimingSummary {
        let d = |i: usize| Duration::from_nanos(self.ns[i].load(Ordering::Relaxed));
        TimingSummary {
            tensors: self.tensors.load(Ordering::Relaxed),
            input_bytes: self.bytes.load(Ordering::Relaxed),
            slot_wait: d(0),
            stage: d(1),
            device: d(2),
            unstage: d(3),
        }
    }
}

/// Kernels of one input dtype.
#[derive(Clone, Copy)]
struct DtypeKernels {
    amax_tensor: Kernel,
    amax_rows: Kernel,
    amax_blocks: Kernel,
    fp8: Kernel,
    int8_tensor: Kernel,
    int8_rows: Kernel,
    int8_warp_rows: Kernel,
    nvfp4: Kernel,
    mxfp8: Kernel,
    fused_fp8: Kernel,
    fused_int8: Kernel,
    fused_nvfp4: Kernel,
}

impl DtypeKernels {
    fn fused(&self) -> [Kernel; 3] {
        [self.fused_fp8, self.fused_int8, self.fused_nvfp4]
    }

    /// The kernels that walk a tensor flat over a resident grid.
    fn flat(&self) -> [Kernel; 3] {
        [self.amax_tensor, self.fp8, self.int8_tensor]
    }
}

struct Kernels {
    /// Indexed by [`dtype_index`].
    by_dtype: [DtypeKernels; 3],
    fp8_dequant: Kernel,
    int8_dequant: Kernel,
    nvfp4_dequant: Kernel,
    mxfp8_dequant: Kernel,
    selftest: Kernel,
    /// INT8 codes, NVFP4 codes, MXFP8 exponents (see [`SelfTest::replacements`]).
    selftest_replacements: [Kernel; 3],
}

/// Whether `spec` scales by the whole tensor's amax (FP8, INT8 per tensor,
/// NVFP4's global scale), which the quantize kernel needs before its first code.
pub(crate) fn needs_tensor_amax(spec: QuantSpec) -> bool {
    match spec.format {
        QuantFormat::Fp8 | QuantFormat::Nvfp4 => true,
        QuantFormat::Int8 => !spec.per_channel,
        QuantFormat::Mxfp8 => false,
    }
}

fn dtype_index(d: SourceDtype) -> usize {
    match d {
        SourceDtype::F32 => 0,
        SourceDtype::F16 => 1,
        SourceDtype::BF16 => 2,
    }
}

impl Kernels {
    fn load(m: &Module) -> Result<Kernels> {
        let mut by_dtype = Vec::new();
        for suf in kernels::DTYPE_SUFFIXES {
            let k = |name: &str| m.kernel(&format!("{name}_{suf}"));
            by_dtype.push(DtypeKernels {
                amax_tensor: k("qs_amax_tensor")?,
                amax_rows: k("qs_amax_rows")?,
                amax_blocks: k("qs_amax_blocks")?,
                fp8: k("qs_fp8_quant")?,
                int8_tensor: k("qs_int8_tensor_quant")?,
                int8_rows: k("qs_int8_rows_quant")?,
                int8_warp_rows: k("qs_int8_warp_rows_quant")?,
                nvfp4: k("qs_nvfp4_quant")?,
                mxfp8: k("qs_mxfp8_quant")?,
                fused_fp8: k("qs_fused_fp8")?,
                fused_int8: k("qs_fused_int8")?,
                fused_nvfp4: k("qs_fused_nvfp4")?,
            });
        }
        Ok(Kernels {
            by_dtype: [by_dtype[0], by_dtype[1], by_dtype[2]],
            fp8_dequant: m.kernel("qs_fp8_dequant")?,
            int8_dequant: m.kernel("qs_int8_dequant")?,
            nvfp4_dequant: m.kernel("qs_nvfp4_dequant")?,
            mxfp8_dequant: m.kernel("qs_mxfp8_dequant")?,
            selftest: m.kernel("qs_selftest_conversions")?,
            selftest_replacements: [
                m.kernel("qs_selftest_int8_recip")?,
                m.kernel("qs_selftest_nvfp4_recip")?,
                m.kernel("qs_selftest_mx_exponent")?,
            ],
        })
    }
}

/// When the single-launch (cooperative, amax and quantization fused) kernels
/// are used for FP8, INT8 per tensor and NVFP4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusedMode {
    /// The backend's choice (the default): today the amax kernel on each
    /// upload piece, then the quantize kernel, which measured faster (BENCHMARKS.md).
    Auto,
    Always,
    /// Never the fused kernels.
    Never,
}
/// The kernels' compile-time tuning (NVRTC `-D` definitions), which the
/// launches must agree with.
#[derive(Clone, Copy, Debug)]
struct Tune {
    /// Threads per block of the fused kernels (`QS_FT`).
    ft: u32,
    /// Chunks of 8 elements a thread loads per step of a flat walk (`QS_FLAT_U`).
    flat_u: u32,
    /// 16-blocks a thread of the NVFP4 kernel has in flight (`QS_NV_U`).
    nv_u: u32,
    /// 32-blocks a thread of the MXFP8 kernel has in flight (`QS_MX_U`).
    mx_u: u32,
}

impl Tune {
    fn from_defines(defines: &[(&str, &str)]) -> Result<Tune> {
        let get = |name: &str, default: u32| -> Result<u32> {
            match defines.iter().find(|(k, _)| *k == name) {
                Some((_, v)) => v.parse().with_context(|| format!("{name}={v} is not a number")),
                None => Ok(default),
            }
        };
        let t = Tune { ft: get("QS_FT", 512)?, flat_u: get("QS_FLAT_U", 4)?, nv_u: get("QS_NV_U", 2)?, mx_u: get("QS_MX_U", 2)? };
        for (name, u) in [("QS_NV_U", t.nv_u), ("QS_MX_U", t.mx_u)] {
            // a row group (8 warps x U rows) must divide the 128 rows of a scale tile
            ensure!(matches!(u, 1 | 2 | 4 | 8 | 16), "{name}={u}: must be 1, 2, 4, 8 or 16");
        }
        ensure!(t.flat_u >= 1, "QS_FLAT_U must be at least 1");
        Ok(t)
    }
}

/// Launch geometry of the fused kernels on this device.
#[derive(Clone, Copy, Debug)]
struct Fused {
    /// Dynamic shared memory per block (the raw-input cache).
    dyn_smem: u32,
    /// Blocks: all resident at once.
    grid: u32,
}

/// One in-flight slot: a stream and its reusable buffers.
struct Slot {
    stream: Stream,
    /// Upload staging: two pinned pieces of [`PIECE`] bytes used in turn, each
    /// reused once the event recorded after its upload has passed.
    ring: PinnedBuffer,
    ring_done: [Event; 2],
    h_out: Option<PinnedBuffer>,
    d_in: Option<DeviceBuffer>,
    d_out: Option<DeviceBuffer>,
}

/// Capacity for a buffer that must hold `need` bytes and held `old` before:
/// at least half again the old size, in whole MiB, so a run of growing
/// tensors reallocates only a few times.
fn grown(need: usize, old: usize) -> usize {
    let want = need.max(old + old / 2);
    want.div_ceil(1 << 20) * (1 << 20)
}

impl Slot {
    fn ensure(&mut self, ctx: &Arc<CudaContext>, stats: &Arc<MemStats>, in_len: usize, out_len: usize) -> Result<()> {
        if self.d_in.as_ref().map_or(0, |b| b.len()) < in_len {
            let old = self.d_in.take().map_or(0, |b| b.len());
            self.d_in = Some(DeviceBuffer::new(ctx, stats, grown(in_len, old))?);
        }
        if self.d_out.as_ref().map_or(0, |b| b.len()) < out_len {
            let old = self.d_out.take().map_or(0, |b| b.len());
            self.d_out = Some(DeviceBuffer::new(ctx, stats, grown(out_len, old))?);
        }
        if self.h_out.as_ref().map_or(0, |b| b.len()) < out_len {
            let old = self.h_out.take().map_or(0, |b| b.len());
            self.h_out = Some(PinnedBuffer::new(ctx, grown(out_len, old), false)?);
        }
        Ok(())
    }
}

/// Where each stored tensor lives in the output buffer.
pub(crate) struct OutLayout {
    pub(crate) specs: Vec<StoredSpec>,
    pub(crate) ranges: Vec<Range<usize>>,
    /// Offset of the amax word.
    pub(crate) scratch: usize,
    /// Bytes to download (through the scratch area).
    pub(crate) total: usize,
}

impl OutLayout {
    pub(crate) fn new(specs: Vec<StoredSpec>) -> OutLayout {
        let mut off = 0usize;
        let mut ranges = Vec::with_capacity(specs.len());
        for s in &specs {
            let n = s.byte_len();
            ranges.push(off..off + n);
            off = (off + n).div_ceil(ALIGN) * ALIGN;
        }
        OutLayout { specs, ranges, scratch: off, total: off + SCRATCH }
    }

    fn range(&self, suffix: &str) -> Range<usize> {
        let i = self.specs.iter().position(|s| s.suffix == suffix).unwrap_or_else(|| panic!("layout has no `{suffix}`"));
        self.ranges[i].clone()
    }
}

/// Quantization on one CUDA device. `Send + Sync`: share it between the
/// pipeline's worker threads; each call takes a free slot (waiting if none).
pub struct CudaBackend {
    // Field order is drop order: slots and module go before the context.
    slots: Vec<Mutex<Slot>>,
    free: Mutex<Vec<usize>>,
    freed: Condvar,
    kernels: Kernels,
    tune: Tune,
    /// Blocks of the flat kernels resident on one multiprocessor at once.
    flat_occupancy: u32,
    fused: Option<Fused>,
    fused_mode: std::sync::atomic::AtomicU8,
    timing: Timing,
    _module: Module,
    stats: Arc<MemStats>,
    info: DeviceInfo,
    ctx: Arc<CudaContext>,
}

/// Returns a slot to the free list when dropped.
struct SlotLease<'a> {
    backend: &'a CudaBackend,
    index: usize,
}

impl Drop for SlotLease<'_> {
    fn drop(&mut self) {
        self.backend.free.lock().unwrap_or_else(|e| e.into_inner()).push(self.index);
        self.backend.freed.notify_one();
    }
}

impl CudaBackend {
    /// Opens device `ordinal` with `slots` tensors in flight: loads the driver,
    /// compiles the kernels for the device's compute capability with NVRTC and
    /// loads them.
    pub fn new(ordinal: usize, slots: usize) -> Result<CudaBackend> {
        Self::with_defines(ordinal, slots, &[])
    }

    /// As [`CudaBackend::new`], compiling the kernels with preprocessor
    /// definitions for their tuning knobs (`QS_FT`, `QS_FU`, `QS_BT`, `QS_BR`;
    /// benchmarks compare variants with it).
    pub fn with_defines(ordinal: usize, slots: usize, defines: &[(&str, &str)]) -> Result<CudaBackend> {
        ensure!(slots >= 1, "at least one slot is needed");
        if !super::driver_available() {
            bail!("no CUDA driver found (libcuda.so is not loadable)");
        }
        let count = super::device_count()?;
        if count == 0 {
            bail!("the CUDA driver reports no GPU");
        }
        if ordinal >= count {
            bail!("GPU {ordinal} requested but the driver reports {count} device(s) (cuda:0..cuda:{})", count - 1);
        }
        if !kernels::nvrtc_available() {
            bail!(
                "libnvrtc (CUDA 13 NVRTC) is not loadable, so the kernels cannot be compiled; install the CUDA toolkit's NVRTC \
                 or `pip install nvidia-cuda-nvrtc==13.0.88` and add its nvidia/cu13/lib to LD_LIBRARY_PATH"
            );
        }
        let tune = Tune::from_defines(defines)?;
        super::no_panic("CUDA initialisation", || Self::init(ordinal, slots, defines, tune))
    }

    fn init(ordinal: usize, nslots: usize, defines: &[(&str, &str)], tune: Tune) -> Result<CudaBackend> {
        let ctx = CudaContext::new(ordinal).map_err(|e| driver::err("context creation", e))?;
        let cc = ctx.compute_capability().map_err(|e| driver::err("compute capability", e))?;
        let name = ctx.name().map_err(|e| driver::err("device name", e))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver::err("multiprocessor count", e))?;
        let total = ctx.total_mem().map_err(|e| driver::err("memory size", e))?;
        let mut drv = 0i32;
        // SAFETY: out-pointer to a live integer.
        unsafe { sys::cuDriverGetVersion(&mut drv) }.result().map_err(|e| driver::err("cuDriverGetVersion", e))?;
        let nvrtc_version = kernels::nvrtc_version()?;
        let compiled = kernels::compile_for_device(cc.0, cc.1, defines)?;
        let module = Module::load(&ctx, &compiled.image).context("loading the compiled kernels")?;
        let kernels = Kernels::load(&module)?;
        let fused = Self::fused_config(&ctx, &kernels, sms.max(1) as u32, tune.ft)?;
        let mut flat_occupancy = u32::MAX;
        for k in kernels.by_dtype.iter().flat_map(|d| d.flat()) {
            flat_occupancy = flat_occupancy.min(k.max_active_blocks(THREADS, 0)?);
        }
        let mut slots = Vec::with_capacity(nslots);
        for _ in 0..nslots {
            slots.push(Mutex::new(Slot {
                stream: Stream::new(&ctx)?,
                ring: PinnedBuffer::new(&ctx, 2 * PIECE, true)?,
                ring_done: [Event::new_blocking(&ctx)?, Event::new_blocking(&ctx)?],
                h_out: None,
                d_in: None,
                d_out: None,
            }));
        }
        let info = DeviceInfo {
            ordinal,
            name,
            compute_capability: cc,
            multiprocessors: sms.max(1) as u32,
            total_memory: total as u64,
            driver_version: drv,
            nvrtc_version,
        };
        Ok(CudaBackend {
            slots,
            free: Mutex::new((0..nslots).rev().collect()),
            freed: Condvar::new(),
            kernels,
            tune,
            flat_occupancy: flat_occupancy.max(1),
            fused,
            fused_mode: std::sync::atomic::AtomicU8::new(0),
            timing: Timing::default(),
            _module: module,
            stats: Arc::new(MemStats::default()),
            info,
            ctx,
        })
    }

    /// The fused kernels' geometry, or None where the device cannot launch
    /// them (no cooperative launch, too little shared memory).
    fn fused_config(ctx: &Arc<CudaContext>, kernels: &Kernels, sms: u32, threads: u32) -> Result<Option<Fused>> {
        use sys::CUdevice_attribute as A;
        let coop = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH).map_err(|e| driver::err("attribute", e))?;
        let optin =
            ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN).map_err(|e| driver::err("attribute", e))?.max(0) as u32;
        // Whole tiles of f32 chunks (512 x 32 bytes), leaving room for static shared memory.
        let tile = threads * 32;
        let dyn_smem = optin.saturating_sub(2048) / tile * tile;
        if coop == 0 || dyn_smem == 0 {
            return Ok(None);
        }
        let mut occupancy = u32::MAX;
        for k in kernels.by_dtype.iter().flat_map(|d| d.fused()) {
            k.set_max_dynamic_shared(dyn_smem)?;
            occupancy = occupancy.min(k.max_active_blocks(threads, dyn_smem)?);
        }
        if occupancy == 0 {
            return Ok(None);
        }
        Ok(Some(Fused { dyn_smem, grid: sms * occupancy }))
    }

    /// Chooses between the fused kernels and the two-kernel path (tests and
    /// benchmarks compare them; both give the same bytes).
    pub fn set_fused(&self, mode: FusedMode) {
        let v = match mode {
            FusedMode::Auto => 0,
            FusedMode::Always => 1,
            FusedMode::Never => 2,
        };
        self.fused_mode.store(v, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether a quantization of `spec` takes the fused kernel now.
    pub(crate) fn uses_fused(&self, spec: QuantSpec) -> bool {
        self.use_fused(spec).is_some()
    }

    /// Whether the device runs the fused kernels at all.
    pub fn has_fused(&self) -> bool {
        self.fused.is_some()
    }

    /// The fused kernels' (blocks, dynamic shared bytes per block), if any.
    pub fn fused_geometry(&self) -> Option<(u32, u32)> {
        self.fused.map(|f| (f.grid, f.dyn_smem))
    }

    /// The fused kernel to use for `spec`, if any (only when asked for:
    /// Auto takes the amax during the upload and one quantize pass, which
    /// reads the tensor once on the device; the fused kernels read it once
    /// too but measured slower, BENCHMARKS.md, GPU).
    fn use_fused(&self, spec: QuantSpec) -> Option<Fused> {
        let f = self.fused?;
        if !needs_tensor_amax(spec) {
            return None;
        }
        match self.fused_mode.load(std::sync::atomic::Ordering::SeqCst) {
            1 => Some(f),
            _ => None,
        }
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Blocks of a flat walk over `n` elements: every tile of
    /// `QS_FLAT_U x THREADS` chunks gets a block, up to what is resident at once.
    fn flat_grid(&self, n: usize) -> u32 {
        let tiles = n.div_ceil(8).div_ceil(self.tune.flat_u as usize * THREADS as usize);
        tiles.min((self.info.multiprocessors * self.flat_occupancy) as usize) as u32
    }

    /// Grid of the block-format kernels (qs_block_walk) for a `[rows, cols]`
    /// input with scale blocks of `block` elements and `u` rows a warp per step:
    /// x over the padded scale columns (32 a block of threads), y over row
    /// groups of 8 warps x `u` rows.
    fn block_grid(rows: usize, cols: usize, block: usize, u: u32) -> (u32, u32) {
        let rows_s = numerics::roundup(numerics::roundup(rows, block), 128);
        let nbs = numerics::roundup(cols.div_ceil(block), 4);
        (nbs.div_ceil(32) as u32, (rows_s / (8 * u as usize)).min(65535) as u32)
    }

    /// Launches the per-tensor amax kernel over `n` elements of `dtype` at
    /// `x`, folding into the u32 at `out` (zeroed before the first such launch).
    ///
    /// # Safety
    /// `x` must hold `n` elements of `dtype`, `out` one u32.
    pub(crate) unsafe fn launch_amax(
        &self,
        s: &Stream,
        dtype: SourceDtype,
        n: usize,
        x: sys::CUdeviceptr,
        out: sys::CUdeviceptr,
    ) -> Result<()> {
        let k = &self.kernels.by_dtype[dtype_index(dtype)];
        let grid = self.flat_grid(n);
        let n = n as i64;
        // SAFETY: caller's contract; (const u8*, i64, u32*).
        unsafe { k.amax_tensor.launch(s, grid, THREADS, &mut [arg(&x), arg(&n), arg(&out)]) }
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn mem_stats(&self) -> &Arc<MemStats> {
        &self.stats
    }

    fn lease(&self) -> SlotLease<'_> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(index) = free.pop() {
                return SlotLease { backend: self, index };
            }
            free = self.freed.wait(free).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Runs `f` on a free slot with the context current on this thread.
    fn with_slot<T>(&self, f: impl FnOnce(&mut Slot) -> Result<T>) -> Result<T> {
        let lease = self.lease();
        let mut slot = self.slots[lease.index].lock().unwrap_or_else(|e| e.into_inner());
        self.ctx.bind_to_thread().map_err(|e| driver::err("cuCtxSetCurrent", e))?;
        f(&mut slot)
    }

    /// Uploads `src` to the slot's device input buffer through the two pinned
    /// staging pieces: the CPU fills one piece while the DMA engine moves the
    /// other, so pinned memory stays at 2 x [`PIECE`] a slot whatever the tensor size.
    /// With `amax = Some((dtype, word))` the amax kernel follows each piece's
    /// upload on the stream (pieces hold whole elements: [`PIECE`] is a
    /// multiple of 16), folding the piece's max |x| into the zeroed `word`.
    fn upload(&self, slot: &mut Slot, src: &[u8], amax: Option<(SourceDtype, sys::CUdeviceptr)>) -> Result<()> {
        let d_in = slot.d_in.as_ref().expect("ensured").ptr();
        let mut in_use = [false; 2];
        for (k, off) in (0..src.len()).step_by(PIECE).enumerate() {
            let end = (off + PIECE).min(src.len());
            let half = k % 2;
            if in_use[half] {
                slot.ring_done[half].synchronize()?;
            }
            let at = half * PIECE;
            // SAFETY: the upload that last read this piece has completed (event
            // above, or the previous call's stream synchronisation).
            let dst = unsafe { slot.ring.slice_mut(at..at + (end - off)) };
            let part = &src[off..end];
            if part.len() >= (4 << 20) {
                dst.par_chunks_mut(1 << 20).zip(part.par_chunks(1 << 20)).for_each(|(d, s)| d.copy_from_slice(s));
            } else {
                dst.copy_from_slice(part);
            }
            // SAFETY: the device range lies in d_in (sized by `ensure`), the host
            // range in the ring, which stays untouched until the event passes.
            unsafe { slot.stream.htod(d_in + off as u64, slot.ring.as_ptr().add(at), end - off)? };
            slot.ring_done[half].record(&slot.stream)?;
            in_use[half] = true;
            if let Some((dtype, word)) = amax {
                // SAFETY: the piece [off, end) of d_in holds (end - off) / size
                // whole elements (src is whole elements, PIECE a multiple of 4).
                unsafe { self.launch_amax(&slot.stream, dtype, (end - off) / dtype.size(), d_in + off as u64, word)? };
            }
        }
        Ok(())
    }

    /// The quantize kernel of one quantization on `s` alone: the `[rows, cols]`
    /// input of `dtype` at device address `x`, the output laid out as `out`
    /// from `base`. For the formats with a per-tensor scale the amax must
    /// already be in `out`'s scratch word (amax kernels over the tensor, e.g.
    /// during the upload); for the others that word must be zero (their
    /// kernels fold their block or row maxima into it for the non-finite check).
    ///
    /// # Safety
    /// `x` must hold the input and `base` at least `out.total` bytes, both live
    /// until the stream has run the launch.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn launch_quant(
        &self,
        s: &Stream,
        spec: QuantSpec,
        dtype: SourceDtype,
        (rows, cols): (usize, usize),
        x: sys::CUdeviceptr,
        base: sys::CUdeviceptr,
        out: &OutLayout,
    ) -> Result<()> {
        let k = &self.kernels.by_dtype[dtype_index(dtype)];
        let at = |r: Range<usize>| base + r.start as u64;
        let amax = base + out.scratch as u64;
        let (r64, c64) = (rows as i64, cols as i64);
        let n = r64 * c64;
        let flat_grid = self.flat_grid(rows * cols);
        // SAFETY: caller's contract: every pointer below lies in live buffers
        // sized for this input and `out`; argument types match the kernels'
        // parameters (const u8*, i64, u32*, ...).
        unsafe {
            match spec.format {
                QuantFormat::Fp8 => {
                    let (q, sc) = (at(out.range("weight")), at(out.range("weight_scale")));
                    k.fp8.launch(s, flat_grid, THREADS, &mut [arg(&x), arg(&n), arg(&amax), arg(&q), arg(&sc)])
                }
                QuantFormat::Int8 if spec.per_channel => {
                    let (q, sc) = (at(out.range("weight")), at(out.range("weight_scale")));
                    let args = &mut [arg(&x), arg(&r64), arg(&c64), arg(&q), arg(&sc), arg(&amax)];
                    let per_lane = if dtype == SourceDtype::F32 { 6 } else { 12 };
                    if cols % 8 == 0 && cols / 8 <= 32 * per_lane {
                        // a warp a row, the row in registers
                        let grid = rows.div_ceil(THREADS as usize / 32).min(1 << 20) as u32;
                        k.int8_warp_rows.launch(s, grid, THREADS, args)
                    } else {
                        // a block a row
                        k.int8_rows.launch(s, rows.min(i32::MAX as usize) as u32, THREADS, args)
                    }
                }
                QuantFormat::Int8 => {
                    let (q, sc) = (at(out.range("weight")), at(out.range("weight_scale")));
                    k.int8_tensor.launch(s, flat_grid, THREADS, &mut [arg(&x), arg(&n), arg(&amax), arg(&q), arg(&sc)])
                }
                QuantFormat::Nvfp4 => {
                    let (q, sc, s2) = (at(out.range("weight")), at(out.range("weight_scale")), at(out.range("weight_scale_2")));
                    let grid = Self::block_grid(rows, cols, 16, self.tune.nv_u);
                    k.nvfp4.launch_2d(s, grid, THREADS, &mut [arg(&x), arg(&r64), arg(&c64), arg(&amax), arg(&q), arg(&sc), arg(&s2)])
                }
                QuantFormat::Mxfp8 => {
                    let (q, sc) = (at(out.range("weight")), at(out.range("weight_scale")));
                    let grid = Self::block_grid(rows, cols, 32, self.tune.mx_u);
                    k.mxfp8.launch_2d(s, grid, THREADS, &mut [arg(&x), arg(&r64), arg(&c64), arg(&q), arg(&sc), arg(&amax)])
                }
            }
        }
    }

    /// Everything the device does for one quantization of an input already on
    /// it: zeroing the scratch words, the amax kernel over the whole tensor
    /// (formats with a per-tensor scale), the quantize kernel; or the fused
    /// kernel where [`FusedMode::Always`] asks for it.
    ///
    /// # Safety
    /// As [`CudaBackend::launch_quant`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn launch_quantize(
        &self,
        s: &Stream,
        spec: QuantSpec,
        dtype: SourceDtype,
        (rows, cols): (usize, usize),
        x: sys::CUdeviceptr,
        base: sys::CUdeviceptr,
        out: &OutLayout,
    ) -> Result<()> {
        let amax = base + out.scratch as u64;
        // SAFETY: caller's contract.
        unsafe {
            s.memset(amax, 0, SCRATCH)?;
            if let Some(f) = self.use_fused(spec) {
                return self.launch_fused(s, f, spec, dtype, (rows, cols), x, base, out);
            }
            if needs_tensor_amax(spec) {
                self.launch_amax(s, dtype, rows * cols, x, amax)?;
            }
            self.launch_quant(s, spec, dtype, (rows, cols), x, base, out)
        }
    }

    /// The fused single launch (amax, grid barrier, quantization) for FP8,
    /// INT8 per tensor and NVFP4; the scratch words must be zero.
    ///
    /// # Safety
    /// As [`CudaBackend::launch_quant`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch_fused(
        &self,
        s: &Stream,
        f: Fused,
        spec: QuantSpec,
        dtype: SourceDtype,
        (rows, cols): (usize, usize),
        x: sys::CUdeviceptr,
        base: sys::CUdeviceptr,
        out: &OutLayout,
    ) -> Result<()> {
        let k = &self.kernels.by_dtype[dtype_index(dtype)];
        let at = |r: Range<usize>| base + r.start as u64;
        let amax = base + out.scratch as u64;
        let (r64, c64) = (rows as i64, cols as i64);
        let n = r64 * c64;
        // Tiles of raw input the fused kernels keep in shared memory.
        let ft = self.tune.ft;
        let cap_tiles: i32 = (f.dyn_smem / (ft * 16 * (dtype.size() as u32).div_ceil(2))) as i32;
        let (g, b, d) = (f.grid, ft, f.dyn_smem);
        // SAFETY: caller's contract; argument types match the kernels' parameters.
        unsafe {
            match spec.format {
                QuantFormat::Fp8 | QuantFormat::Int8 => {
                    let kern = if spec.format == QuantFormat::Fp8 { k.fused_fp8 } else { k.fused_int8 };
                    let (q, sc) = (at(out.range("weight")), at(out.range("weight_scale")));
                    kern.launch_cooperative(s, g, b, d, &mut [arg(&x), arg(&n), arg(&amax), arg(&q), arg(&sc), arg(&cap_tiles)])
                }
                QuantFormat::Nvfp4 => {
                    let (q, scr, s2) = (out.range("weight"), out.range("weight_scale"), out.range("weight_scale_2"));
                    // the fused kernel writes the scales of the data blocks only
                    s.memset(at(scr.clone()), 0, scr.len())?;
                    let (q, sc, s2) = (at(q), at(scr), at(s2));
                    k.fused_nvfp4.launch_cooperative(
                        s,
                        g,
                        b,
                        d,
                        &mut [arg(&x), arg(&r64), arg(&c64), arg(&amax), arg(&q), arg(&sc), arg(&s2), arg(&cap_tiles)],
                    )
                }
                QuantFormat::Mxfp8 => unreachable!("MXFP8 needs no global amax"),
            }
        }
    }

    fn quantize_impl(&self, spec: QuantSpec, w: &WeightView<'_>) -> Result<std::result::Result<Vec<StoredTensor>, QuantError>> {
        let out = OutLayout::new(spec.implementation().layout(w.rows, w.cols));
        let t_wait = Instant::now();
        self.with_slot(|slot| {
            let t0 = Instant::now();
            slot.ensure(&self.ctx, &self.stats, w.bytes.len(), out.total)?;
            let (x, base) = (slot.d_in.as_ref().expect("ensured").ptr(), slot.d_out.as_ref().expect("ensured").ptr());
            let amax = base + out.scratch as u64;
            let fused = self.use_fused(spec);
            // SAFETY: `ensure` sized d_out for `out`; the scratch area lies in it.
            unsafe { slot.stream.memset(amax, 0, SCRATCH)? };
            let piece_amax = (fused.is_none() && needs_tensor_amax(spec)).then_some((w.dtype, amax));
            self.upload(slot, w.bytes, piece_amax)?;
            let t1 = Instant::now();
            // SAFETY: `ensure` sized both buffers for this input and `out`; the
            // stream is synchronised before they are reused.
            unsafe {
                match fused {
                    Some(f) => self.launch_fused(&slot.stream, f, spec, w.dtype, (w.rows, w.cols), x, base, &out)?,
                    None => self.launch_quant(&slot.stream, spec, w.dtype, (w.rows, w.cols), x, base, &out)?,
                }
            }
            let h_out = slot.h_out.as_mut().expect("ensured");
            let d_out = slot.d_out.as_ref().expect("ensured").ptr();
            // SAFETY: both buffers hold at least out.total bytes.
            unsafe { slot.stream.dtoh(h_out.as_ptr() as *mut u8, d_out, out.total)? };
            slot.stream.synchronize().with_context(|| format!("quantizing {} on the GPU", w.name))?;
            let t2 = Instant::now();
            // SAFETY: the stream is idle.
            let host = unsafe { h_out.slice(0..out.total) };
            let amax = u32::from_le_bytes(host[out.scratch..out.scratch + 4].try_into().unwrap());
            if amax >= 0x7F80_0000 {
                // Non-finite input: let the CPU find and name it, as the reference does.
                let e = with_src!(w.dtype, T => numerics::finite_amax::<T>(w));
                return Ok(Err(e.err().unwrap_or_else(|| QuantError::Invalid {
                    name: w.name.to_string(),
                    reason: "the GPU saw a non-finite value the CPU does not".into(),
                })));
            }
            // The kernel's amax word is the f32 bits of the largest |x|.
            if spec.format == QuantFormat::Mxfp8
                && let Err(e) = crate::formats::mxfp8::check_range(w.name, f32::from_bits(amax))
            {
                return Ok(Err(e));
            }
            let tensors = out
                .specs
                .iter()
                .zip(&out.ranges)
                .map(|(spec, r)| {
                    let src = &host[r.clone()];
                    let mut data = vec![0u8; src.len()];
                    if src.len() >= (4 << 20) {
                        data.par_chunks_mut(1 << 20).zip(src.par_chunks(1 << 20)).for_each(|(d, s)| d.copy_from_slice(s));
                    } else {
                        data.copy_from_slice(src);
                    }
                    StoredTensor { spec: spec.clone(), data }
                })
                .collect();
            let t3 = Instant::now();
            self.timing.add(w.bytes.len(), t0 - t_wait, t1 - t0, t2 - t1, t3 - t2);
            Ok(Ok(tensors))
        })
    }

    /// Where `quantize` calls spent their time so far (summed over callers).
    pub fn timing(&self) -> TimingSummary {
        self.timing.summary()
    }

    /// Dequantizes tensors laid out as the format's `layout(rows, cols)` says
    /// back to f32 `[rows, cols]` on the GPU (for checks).
    pub fn dequantize(&self, spec: QuantSpec, stored: &[StoredTensor], rows: usize, cols: usize) -> Result<Vec<f32>> {
        let layout = spec.implementation().layout(rows, cols);
        ensure!(stored.len() == layout.len(), "expected {} stored tensors, got {}", layout.len(), stored.len());
        for (t, l) in stored.iter().zip(&layout) {
            ensure!(t.spec == *l && t.data.len() == l.byte_len(), "stored tensor `{}` does not match the layout", l.suffix);
        }
        let packed = OutLayout::new(layout);
        let mut input = vec![0u8; packed.total];
        for (t, r) in stored.iter().zip(&packed.ranges) {
            input[r.clone()].copy_from_slice(&t.data);
        }
        let out_len = rows * cols * 4;
        self.with_slot(|slot| {
            slot.ensure(&self.ctx, &self.stats, input.len(), out_len + SCRATCH)?;
            self.upload(slot, &input, None)?;
            let s = &slot.stream;
            let base = slot.d_in.as_ref().expect("ensured").ptr();
            let at = |suffix: &str| base + packed.range(suffix).start as u64;
            let o = slot.d_out.as_ref().expect("ensured").ptr();
            let (r, c) = (rows as i64, cols as i64);
            let n = r * c;
            let grid = ((rows * cols).div_ceil(THREADS as usize)).min(1 << 20) as u32;
            let k = &self.kernels;
            // SAFETY: pointers lie in the slot's buffers sized above; argument types match.
            unsafe {
                match spec.format {
                    QuantFormat::Fp8 => {
                        let (q, sc) = (at("weight"), at("weight_scale"));
                        k.fp8_dequant.launch(s, grid, THREADS, &mut [arg(&q), arg(&n), arg(&sc), arg(&o)])?;
                    }
                    QuantFormat::Int8 => {
                        let (q, sc) = (at("weight"), at("weight_scale"));
                        let per_row: i32 = spec.per_channel as i32;
                        k.int8_dequant.launch(s, grid, THREADS, &mut [arg(&q), arg(&r), arg(&c), arg(&sc), arg(&per_row), arg(&o)])?;
                    }
                    QuantFormat::Nvfp4 => {
                        let (q, sc, s2) = (at("weight"), at("weight_scale"), at("weight_scale_2"));
                        k.nvfp4_dequant.launch(s, grid, THREADS, &mut [arg(&q), arg(&sc), arg(&s2), arg(&r), arg(&c), arg(&o)])?;
                    }
                    QuantFormat::Mxfp8 => {
                        let (q, sc) = (at("weight"), at("weight_scale"));
                        k.mxfp8_dequant.launch(s, grid, THREADS, &mut [arg(&q), arg(&sc), arg(&r), arg(&c), arg(&o)])?;
                    }
                }
                let h = slot.h_out.as_mut().expect("ensured");
                s.dtoh(h.as_ptr() as *mut u8, o, out_len)?;
            }
            s.synchronize()?;
            // SAFETY: the stream is idle.
            let bytes = unsafe { slot.h_out.as_ref().unwrap().slice(0..out_len) };
            Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
        })
    }

    /// max |x| of `w` on the GPU: per tensor, per row or per block (for checks).
    /// Non-finite values come back as infinity/NaN.
    pub fn amax(&self, w: &WeightView<'_>, kind: AmaxKind) -> Result<Vec<f32>> {
        numerics::check_view(w)?;
        let (rows, cols) = (w.rows as i64, w.cols as i64);
        let count = match kind {
            AmaxKind::Tensor => 1,
            AmaxKind::Rows => w.rows,
            AmaxKind::Blocks(b) => {
                ensure!(b > 0, "block size must be positive");
                w.rows * w.cols.div_ceil(b)
            }
        };
        self.with_slot(|slot| {
            slot.ensure(&self.ctx, &self.stats, w.bytes.len(), count * 4 + SCRATCH)?;
            self.upload(slot, w.bytes, None)?;
            let s = &slot.stream;
            let k = &self.kernels.by_dtype[dtype_index(w.dtype)];
            let x = slot.d_in.as_ref().expect("ensured").ptr();
            let o = slot.d_out.as_ref().expect("ensured").ptr();
            // SAFETY: pointers lie in the slot's buffers sized above; argument types match.
            unsafe {
                s.memset(o, 0, count * 4)?;
                match kind {
                    AmaxKind::Tensor => self.launch_amax(s, w.dtype, w.rows * w.cols, x, o)?,
                    AmaxKind::Rows => {
                        let grid = w.rows.min(self.info.multiprocessors as usize * 16) as u32;
                        k.amax_rows.launch(s, grid, THREADS, &mut [arg(&x), arg(&rows), arg(&cols), arg(&o)])?;
                    }
                    AmaxKind::Blocks(b) => {
                        let b = b as i64;
                        let grid = count.div_ceil(THREADS as usize).min(1 << 20) as u32;
                        k.amax_blocks.launch(s, grid, THREADS, &mut [arg(&x), arg(&rows), arg(&cols), arg(&b), arg(&o)])?;
                    }
                }
                let h = slot.h_out.as_mut().expect("ensured");
                s.dtoh(h.as_ptr() as *mut u8, o, count * 4)?;
            }
            s.synchronize()?;
            // SAFETY: the stream is idle.
            let bytes = unsafe { slot.h_out.as_ref().unwrap().slice(0..count * 4) };
            Ok(bytes.chunks_exact(4).map(|b| f32::from_bits(u32::from_le_bytes(b.try_into().unwrap()))).collect())
        })
    }

    /// Checks the hardware conversions the kernels use against their software
    /// definitions over every f32 bit pattern, and the division-free paths
    /// against the divisions they replace (see [`SelfTest`]).
    pub fn selftest_conversions(&self) -> Result<SelfTest> {
        self.with_slot(|slot| {
            // 16 mismatch counters, then 16 first-mismatch words
            slot.ensure(&self.ctx, &self.stats, 128, 128)?;
            let s = &slot.stream;
            let o = slot.d_out.as_ref().expect("ensured").ptr();
            let (counts, first) = (o, o + 64);
            let grid = self.info.multiprocessors * 16;
            // SAFETY: 128 bytes inside d_out; each kernel takes (u32*, u32*) and
            // writes 5 words (the conversions) or one (a replacement) at each.
            unsafe {
                s.memset(counts, 0, 64)?;
                s.memset(first, 0xFF, 64)?;
                self.kernels.selftest.launch(s, grid, THREADS, &mut [arg(&counts), arg(&first)])?;
                for (i, k) in self.kernels.selftest_replacements.iter().enumerate() {
                    let (c, f) = (counts + 4 * (5 + i as u64), first + 4 * (5 + i as u64));
                    k.launch(s, grid, THREADS, &mut [arg(&c), arg(&f)])?;
                }
                let h = slot.h_out.as_mut().expect("ensured");
                s.dtoh(h.as_ptr() as *mut u8, o, 128)?;
            }
            s.synchronize()?;
            // SAFETY: the stream is idle.
            let b = unsafe { slot.h_out.as_ref().unwrap().slice(0..128) };
            let word = |i: usize| u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap());
            let mut t = SelfTest {
                mismatches: std::array::from_fn(word),
                first: std::array::from_fn(|i| word(16 + i)),
                replacements: std::array::from_fn(|i| word(5 + i)),
                replacements_first: std::array::from_fn(|i| word(21 + i)),
            };
            for (n, f) in t.replacements.iter().zip(t.replacements_first) {
                t.mismatches[4] = t.mismatches[4].saturating_add(*n);
                t.first[4] = t.first[4].min(f);
            }
            Ok(t)
        })
    }

    /// Bytes of the output buffer (stored tensors, padding and scratch) for a layout.
    pub fn output_bytes(spec: QuantSpec, rows: usize, cols: usize) -> usize {
        OutLayout::new(spec.implementation().layout(rows, cols)).total
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let t = self.timing.summary();
        if t.tensors > 0 {
            tracing::info!("{}: {t}; peak device memory {:.0} MiB", self.name(), self.stats.peak() as f64 / (1u64 << 20) as f64);
        }
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        let (ma, mi) = self.info.compute_capability;
        format!("cuda:{} ({}, sm_{ma}{mi}, {} streams)", self.info.ordinal, self.info.name, self.slots.len())
    }

    fn quantize(&self, spec: QuantSpec, w: &WeightView<'_>) -> std::result::Result<Vec<StoredTensor>, QuantError> {
        numerics::check_view(w)?;
        match self.quantize_impl(spec, w) {
            Ok(r) => r,
            Err(e) => Err(QuantError::Invalid { name: w.name.to_string(), reason: format!("GPU quantization failed: {e:#}") }),
        }
    }

    fn peak_device_bytes(&self) -> Option<u64> {
        Some(self.stats.peak())
    }

    fn in_flight(&self) -> usize {
        self.slots.len()
    }
}

/// A timing helper for benchmarks: median milliseconds of `iters` runs of `f`
/// on `stream`, after `warmup` runs, each bracketed by events.
pub(crate) fn time_ms(
    ctx: &Arc<CudaContext>,
    stream: &Stream,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    for i in 0..warmup {
        f(i)?;
    }
    stream.synchronize()?;
    let mut times = Vec::with_capacity(iters);
    let (a, b) = (Event::new(ctx)?, Event::new(ctx)?);
    for i in 0..iters {
        a.record(stream)?;
        f(warmup + i)?;
        b.record(stream)?;
        b.synchronize()?;
        times.push(a.elapsed_ms(&b)? as f64);
    }
    times.sort_by(|x, y| x.partial_cmp(y).unwrap());
    Ok(times[times.len() / 2])
}
