//! The CUDA backend: NVRTC-compiled kernels (`kernels/`), driven through
//! cudarc's dynamically loaded driver API, bit-exact with the CPU reference.
//!
//! Nothing here links against CUDA: `libcuda` and `libnvrtc` are opened at run
//! time, so the binary starts (and [`open`] falls back to the CPU with one log
//! line under `--device auto`) on machines with no driver or no GPU.
//!
//! - [`kernels`]: the CUDA sources and their NVRTC compilation (also used by CI,
//!   which compiles them to PTX without a GPU).
//! - [`driver`]: owned device/pinned buffers, streams, events, module, launches.
//! - [`CudaBackend`]: the streaming [`Backend`](crate::backend::Backend): one
//!   stream, pinned staging buffers and reusable device buffers per in-flight slot.
//! - [`bench`]: kernel-bandwidth and streaming measurements for BENCHMARKS.md.

pub mod bench;
mod cuda;
pub mod driver;
pub mod kernels;

pub use cuda::{AmaxKind, CudaBackend, DeviceInfo, FusedMode, SelfTest, TimingSummary};

use anyhow::{Context, Result, bail};

use crate::backend::{Backend, CpuBackend, DeviceChoice};

/// In-flight slots (streams) per GPU unless `QUANTSMITH_GPU_SLOTS` says otherwise.
pub const DEFAULT_SLOTS: usize = 4;

/// Whether the CUDA driver library (`libcuda.so`) can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the candidate names.
    crate::error::catching(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

/// Whether NVRTC (`libnvrtc.so`) can be loaded.
pub fn nvrtc_available() -> bool {
    kernels::nvrtc_available()
}

/// Runs `f`, turning a panic inside cudarc (a library or symbol missing, e.g.
/// from an old driver) into an error. Both CUDA backends start through it.
pub(crate) fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match crate::error::catching(f) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(anyhow::anyhow!("{what}: {msg}"))
        }
    }
}

/// Number of CUDA devices, or why there are none usable.
pub fn device_count() -> Result<usize> {
    if !driver_available() {
        bail!("no CUDA driver found (libcuda.so is not loadable)");
    }
    let r = crate::error::catching(|| -> Result<usize> {
        cudarc::driver::result::init().map_err(|e| driver::err("cuInit", e))?;
        let n = cudarc::driver::result::device::get_count().map_err(|e| driver::err("cuDeviceGetCount", e))?;
        Ok(n.max(0) as usize)
    });
    match r {
        Ok(r) => r,
        Err(_) => bail!("the CUDA driver library is too old for this build (CUDA 13 API)"),
    }
}

/// Slots from `QUANTSMITH_GPU_SLOTS` (1..=64), else [`DEFAULT_SLOTS`].
pub fn configured_slots() -> usize {
    std::env::var("QUANTSMITH_GPU_SLOTS").ok().and_then(|s| s.parse().ok()).filter(|&n| (1..=64).contains(&n)).unwrap_or(DEFAULT_SLOTS)
}

/// The backend for `--device auto|cpu|cuda[:N]`.
///
/// - `cpu`: the CPU reference.
/// - `cuda[:N]`: GPU N, or an error saying why it cannot be used.
/// - `auto`: GPU 0 when it can be used, else the CPU, with one warning saying why.
pub fn open(choice: DeviceChoice) -> Result<Box<dyn Backend>> {
    match choice {
        DeviceChoice::Cpu => Ok(Box::new(CpuBackend)),
        DeviceChoice::Cuda(n) => {
            let b = CudaBackend::new(n, configured_slots()).with_context(|| format!("--device cuda:{n} cannot be used"))?;
            tracing::info!("quantizing on {}", b.name());
            Ok(Box::new(b))
        }
        DeviceChoice::Auto => {
            if !driver_available() {
                tracing::warn!(
                    "--device auto: no CUDA driver found (libcuda.so); quantizing on the CPU (pass --device cpu to skip this check)"
                );
                return Ok(Box::new(CpuBackend));
            }
            match CudaBackend::new(0, configured_slots()) {
                Ok(b) => {
                    tracing::info!("--device auto: quantizing on {}", b.name());
                    Ok(Box::new(b))
                }
                Err(e) => {
                    tracing::warn!(
                        "--device auto: no usable CUDA GPU ({e:#}); quantizing on the CPU (pass --device cpu to skip this check)"
                    );
                    Ok(Box::new(CpuBackend))
                }
            }
        }
    }
}
