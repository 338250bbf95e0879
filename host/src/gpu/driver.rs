//! Thin owned wrappers over the CUDA driver API (through cudarc's `result`
//! layer): device buffers, pinned host buffers, streams, events, the kernel
//! module and launches. Plain `cuMemAlloc` allocations only (no managed memory,
//! no stream-ordered pool), counted in [`MemStats`] for the peak report.

use std::ffi::{CString, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, anyhow};
use cudarc::driver::safe::CudaContext;
use cudarc::driver::{result as cu, sys};

/// A driver error as a readable `anyhow` error.
pub fn err(what: &str, e: cu::DriverError) -> anyhow::Error {
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    anyhow!("CUDA {what}: {name} ({text})")
}

/// Device bytes allocated now and at the peak.
#[derive(Default, Debug)]
pub struct MemStats {
    current: AtomicU64,
    peak: AtomicU64,
}

impl MemStats {
    fn add(&self, n: u64) {
        let now = self.current.fetch_add(n, Ordering::SeqCst) + n;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }
    fn sub(&self, n: u64) {
        self.current.fetch_sub(n, Ordering::SeqCst);
    }
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }
}

/// Device memory from `cuMemAlloc`.
pub struct DeviceBuffer {
    ptr: sys::CUdeviceptr,
    len: usize,
    ctx: Arc<CudaContext>,
    stats: Arc<MemStats>,
}

// SAFETY: a device pointer is a plain address; the driver API is thread-safe.
unsafe impl Send for DeviceBuffer {}
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    pub fn new(ctx: &Arc<CudaContext>, stats: &Arc<MemStats>, len: usize) -> Result<Self> {
        ctx.bind_to_thread().map_err(|e| err("cuCtxSetCurrent", e))?;
        // SAFETY: plain allocation of `len` (> 0) bytes.
        let ptr = unsafe { cu::malloc_sync(len.max(1)) }.map_err(|e| err(&format!("cuMemAlloc of {} MiB", len.div_ceil(1 << 20)), e))?;
        stats.add(len.max(1) as u64);
        Ok(DeviceBuffer { ptr, len: len.max(1), ctx: ctx.clone(), stats: stats.clone() })
    }
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by cuMemAlloc, freed once.
        let _ = unsafe { cu::free_sync(self.ptr) };
        self.stats.sub(self.len as u64);
    }
}

/// Page-locked host memory from `cuMemHostAlloc`.
pub struct PinnedBuffer {
    ptr: *mut u8,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: owned host memory; access is serialised by whoever owns the buffer.
unsafe impl Send for PinnedBuffer {}
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    /// `write_combined` suits buffers the CPU only writes (staging for uploads).
    pub fn new(ctx: &Arc<CudaContext>, len: usize, write_combined: bool) -> Result<Self> {
        ctx.bind_to_thread().map_err(|e| err("cuCtxSetCurrent", e))?;
        let flags = if write_combined { sys::CU_MEMHOSTALLOC_WRITECOMBINED } else { 0 };
        // SAFETY: allocation of `len` (> 0) bytes.
        let ptr = unsafe { cu::malloc_host(len.max(1), flags) }
            .map_err(|e| err(&format!("cuMemHostAlloc of {} MiB", len.div_ceil(1 << 20)), e))?;
        Ok(PinnedBuffer { ptr: ptr as *mut u8, len: len.max(1), ctx: ctx.clone() })
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
    /// # Safety
    /// No copy into or out of this buffer may be in flight.
    pub unsafe fn slice(&self, range: std::ops::Range<usize>) -> &[u8] {
        assert!(range.end <= self.len);
        // SAFETY: in bounds; caller guarantees no concurrent DMA.
        unsafe { std::slice::from_raw_parts(self.ptr.add(range.start), range.len()) }
    }
    /// # Safety
    /// No copy into or out of this buffer may be in flight.
    pub unsafe fn slice_mut(&mut self, range: std::ops::Range<usize>) -> &mut [u8] {
        assert!(range.end <= self.len);
        // SAFETY: in bounds; caller guarantees no concurrent DMA.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by cuMemHostAlloc, freed once.
        let _ = unsafe { cu::free_host(self.ptr as *mut c_void) };
    }
}

/// A non-blocking stream.
pub struct Stream {
    raw: sys::CUstream,
    ctx: Arc<CudaContext>,
}

// SAFETY: stream handles may be used from any thread with the context current.
unsafe impl Send for Stream {}
unsafe impl Sync for Stream {}

impl Stream {
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        ctx.bind_to_thread().map_err(|e| err("cuCtxSetCurrent", e))?;
        let raw = cu::stream::create(cu::stream::StreamKind::NonBlocking).map_err(|e| err("cuStreamCreate", e))?;
        Ok(Stream { raw, ctx: ctx.clone() })
    }
    pub fn raw(&self) -> sys::CUstream {
        self.raw
    }
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: live stream.
        unsafe { cu::stream::synchronize(self.raw) }.map_err(|e| err("cuStreamSynchronize", e))
    }

    /// Host → device copy of `len` bytes. `src` must stay valid and unchanged
    /// until the stream reaches the copy (pinned memory for it to be async).
    ///
    /// # Safety
    /// `dst..dst+len` must lie in a live device allocation and `src` in live host memory.
    pub unsafe fn htod(&self, dst: sys::CUdeviceptr, src: *const u8, len: usize) -> Result<()> {
        // SAFETY: caller's contract.
        unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src as *const c_void, len, self.raw) }.result().map_err(|e| err("cuMemcpyHtoDAsync", e))
    }

    /// Device → host copy of `len` bytes.
    ///
    /// # Safety
    /// As [`Stream::htod`], the other way.
    pub unsafe fn dtoh(&self, dst: *mut u8, src: sys::CUdeviceptr, len: usize) -> Result<()> {
        // SAFETY: caller's contract.
        unsafe { sys::cuMemcpyDtoHAsync_v2(dst as *mut c_void, src, len, self.raw) }.result().map_err(|e| err("cuMemcpyDtoHAsync", e))
    }

    /// Device → device copy of `len` bytes.
    ///
    /// # Safety
    /// Both ranges must lie in live device allocations.
    pub unsafe fn dtod(&self, dst: sys::CUdeviceptr, src: sys::CUdeviceptr, len: usize) -> Result<()> {
        // SAFETY: caller's contract.
        unsafe { cu::memcpy_dtod_async(dst, src, len, self.raw) }.map_err(|e| err("cuMemcpyDtoDAsync", e))
    }

    /// Sets `len` bytes at `dst` to `value`.
    ///
    /// # Safety
    /// The range must lie in a live device allocation.
    pub unsafe fn memset(&self, dst: sys::CUdeviceptr, value: u8, len: usize) -> Result<()> {
        // SAFETY: caller's contract.
        unsafe { sys::cuMemsetD8Async(dst, value, len, self.raw) }.result().map_err(|e| err("cuMemsetD8Async", e))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: live stream, destroyed once.
        unsafe {
            let _ = cu::stream::synchronize(self.raw);
            let _ = cu::stream::destroy(self.raw);
        }
    }
}

/// A timing event.
pub struct Event {
    raw: sys::CUevent,
    ctx: Arc<CudaContext>,
}

// SAFETY: event handles may be used from any thread with the context current.
unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        ctx.bind_to_thread().map_err(|e| err("cuCtxSetCurrent", e))?;
        let raw = cu::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| err("cuEventCreate", e))?;
        Ok(Event { raw, ctx: ctx.clone() })
    }
    /// An event for ordering only (no timing), whose waiters sleep instead of spinning.
    pub fn new_blocking(ctx: &Arc<CudaContext>) -> Result<Self> {
        ctx.bind_to_thread().map_err(|e| err("cuCtxSetCurrent", e))?;
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32 | sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32;
        let mut raw = std::mem::MaybeUninit::uninit();
        // SAFETY: out-pointer to a live handle slot.
        unsafe { sys::cuEventCreate(raw.as_mut_ptr(), flags) }.result().map_err(|e| err("cuEventCreate", e))?;
        // SAFETY: initialised by the successful call above.
        Ok(Event { raw: unsafe { raw.assume_init() }, ctx: ctx.clone() })
    }

    pub fn record(&self, stream: &Stream) -> Result<()> {
        // SAFETY: live event and stream.
        unsafe { cu::event::record(self.raw, stream.raw()) }.map_err(|e| err("cuEventRecord", e))
    }
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: live event.
        unsafe { cu::event::synchronize(self.raw) }.map_err(|e| err("cuEventSynchronize", e))
    }
    /// Milliseconds from `self` to `end` (both recorded and complete).
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32> {
        // SAFETY: live events.
        unsafe { cu::event::elapsed(self.raw, end.raw) }.map_err(|e| err("cuEventElapsedTime", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: live event, destroyed once.
        let _ = unsafe { cu::event::destroy(self.raw) };
    }
}

/// A loaded module.
pub struct Module {
    raw: sys::CUmodule,
    ctx: Arc<CudaContext>,
}

// SAFETY: module handles are context-wide and the driver is thread-safe.
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

/// A kernel entry point of a [`Module`]. Valid while the module lives.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    raw: sys::CUfunction,
}

// SAFETY: function handles are immutable and usable from any thread.
unsafe impl Send for Kernel {}
unsafe impl Sync for Kernel {}

impl Module {
    /// Loads a cubin or NUL-terminated PTX image.
    pub fn load(ctx: &Arc<CudaContext>, image: &[u8]) -> Result<Self> {
        ctx.bind_to_thread().map_err(|e| err("cuCtxSetCurrent", e))?;
        // SAFETY: the image is a complete cubin/PTX that outlives the call.
        let raw = unsafe { cu::module::load_data(image.as_ptr() as *const c_void) }.map_err(|e| err("cuModuleLoadData", e))?;
        Ok(Module { raw, ctx: ctx.clone() })
    }

    pub fn kernel(&self, name: &str) -> Result<Kernel> {
        let cname = CString::new(name).expect("kernel names hold no NUL");
        // SAFETY: live module.
        let raw = unsafe { cu::module::get_function(self.raw, cname) }.map_err(|e| err(&format!("cuModuleGetFunction({name})"), e))?;
        Ok(Kernel { raw })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: live module, unloaded once.
        let _ = unsafe { cu::module::unload(self.raw) };
    }
}

/// One kernel argument: a pointer to its value, as `cuLaunchKernel` takes it.
pub type Arg = *mut c_void;

/// The argument pointer of a value (which must outlive the launch call).
pub fn arg<T>(v: &T) -> Arg {
    v as *const T as *mut c_void
}

impl Kernel {
    /// Allows up to `bytes` of dynamic shared memory per block.
    pub fn set_max_dynamic_shared(&self, bytes: u32) -> Result<()> {
        // SAFETY: live function handle.
        unsafe {
            cu::function::set_function_attribute(
                self.raw,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }
        .map_err(|e| err("cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)", e))
    }

    /// Blocks of `block` threads with `dynamic_shared` bytes that fit on one multiprocessor at once.
    pub fn max_active_blocks(&self, block: u32, dynamic_shared: u32) -> Result<u32> {
        // SAFETY: live function handle.
        let n = unsafe { cu::occupancy::max_active_block_per_multiprocessor(self.raw, block as i32, dynamic_shared as usize) }
            .map_err(|e| err("cuOccupancyMaxActiveBlocksPerMultiprocessor", e))?;
        Ok(n.max(0) as u32)
    }

    /// Cooperative launch: all `grid` blocks resident at once (the driver
    /// refuses the launch otherwise), so the kernel may synchronise the grid.
    ///
    /// # Safety
    /// As [`Kernel::launch`].
    pub unsafe fn launch_cooperative(&self, stream: &Stream, grid: u32, block: u32, dynamic_shared: u32, args: &mut [Arg]) -> Result<()> {
        // SAFETY: caller's contract.
        unsafe { cu::launch_cooperative_kernel(self.raw, (grid, 1, 1), (block, 1, 1), dynamic_shared, stream.raw(), args) }
            .map_err(|e| err("cuLaunchCooperativeKernel", e))
    }

    /// Launches a 2-D grid on `stream`.
    ///
    /// # Safety
    /// As [`Kernel::launch`].
    pub unsafe fn launch_2d(&self, stream: &Stream, grid: (u32, u32), block: u32, args: &mut [Arg]) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 {
            return Ok(());
        }
        // SAFETY: caller's contract.
        unsafe { cu::launch_kernel(self.raw, (grid.0, grid.1, 1), (block, 1, 1), 0, stream.raw(), args) }
            .map_err(|e| err("cuLaunchKernel", e))
    }

    /// Launches a 2-D grid on `stream` with `dynamic_shared` bytes of dynamic
    /// shared memory per block (beyond 48 KB after [`Kernel::set_max_dynamic_shared`]).
    ///
    /// # Safety
    /// As [`Kernel::launch`].
    pub unsafe fn launch_2d_shared(
        &self,
        stream: &Stream,
        grid: (u32, u32),
        block: u32,
        dynamic_shared: u32,
        args: &mut [Arg],
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 {
            return Ok(());
        }
        // SAFETY: caller's contract.
        unsafe { cu::launch_kernel(self.raw, (grid.0, grid.1, 1), (block, 1, 1), dynamic_shared, stream.raw(), args) }
            .map_err(|e| err("cuLaunchKernel", e))
    }

    /// Launches on `stream`; `args` point at values matching the kernel's
    /// parameters in order and type.
    ///
    /// # Safety
    /// The arguments must match the kernel's signature, and every pointer
    /// passed must be valid for what the kernel does with it.
    pub unsafe fn launch(&self, stream: &Stream, grid: u32, block: u32, args: &mut [Arg]) -> Result<()> {
        if grid == 0 {
            return Ok(());
        }
        // SAFETY: caller's contract.
        unsafe { cu::launch_kernel(self.raw, (grid, 1, 1), (block, 1, 1), 0, stream.raw(), args) }.map_err(|e| err("cuLaunchKernel", e))
    }
}
