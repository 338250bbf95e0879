//! Where quantization runs: the CPU reference or a CUDA device.

use std::str::FromStr;

use crate::formats::{QuantError, QuantSpec, StoredTensor, WeightView};

/// A place that quantizes weights. Implementations are shared by the
/// conversion pipeline's worker threads, so several tensors can be in flight.
pub trait Backend: Send + Sync {
    /// Human-readable name for logs and the run report, e.g. `cpu (2 threads)`.
    fn name(&self) -> String;

    /// Quantizes one weight; the result must equal the CPU reference byte for byte.
    fn quantize(&self, spec: QuantSpec, w: &WeightView<'_>) -> Result<Vec<StoredTensor>, QuantError>;

    /// Peak device memory used so far, for backends that have a device.
    fn peak_device_bytes(&self) -> Option<u64> {
        None
    }

    /// How many tensors the pipeline should keep in flight on this backend.
    fn in_flight(&self) -> usize {
        1
    }
}

/// The CPU reference implementation, using every core through rayon.
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn quantize(&self, spec: QuantSpec, w: &WeightView<'_>) -> Result<Vec<StoredTensor>, QuantError> {
        spec.implementation().quantize(w)
    }
}

/// `--device auto|cpu|cuda[:N]`.
///
/// ```
/// use quantsmith::backend::DeviceChoice;
/// assert_eq!("cuda:1".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(1)));
/// assert_eq!("cuda".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(0)));
/// assert!("gpu".parse::<DeviceChoice>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The GPU when one is usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}; expected auto, cpu, cuda or cuda:N")),
        }
    }
}
