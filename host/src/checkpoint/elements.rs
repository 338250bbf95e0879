//! Element decoding for statistics and small reads (not the quantization hot path).

use rayon::prelude::*;
use safetensors::Dtype;

/// Decodes little-endian elements of `dtype` to f64; `None` for dtypes with no
/// numeric meaning here (packed FP4/FP6, complex).
pub fn decode_f64(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f64>> {
    fn chunks<const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<f64> {
        b.chunks_exact(N).map(|c| f(c.try_into().unwrap())).collect()
    }
    Some(match dtype {
        Dtype::F64 => chunks::<8>(bytes, f64::from_le_bytes),
        Dtype::F32 => chunks::<4>(bytes, |c| f32::from_le_bytes(c) as f64),
        Dtype::F16 => chunks::<2>(bytes, |c| half::f16::from_le_bytes(c).to_f64()),
        Dtype::BF16 => chunks::<2>(bytes, |c| half::bf16::from_le_bytes(c).to_f64()),
        Dtype::I64 => chunks::<8>(bytes, |c| i64::from_le_bytes(c) as f64),
        Dtype::I32 => chunks::<4>(bytes, |c| i32::from_le_bytes(c) as f64),
        Dtype::I16 => chunks::<2>(bytes, |c| i16::from_le_bytes(c) as f64),
        Dtype::I8 => bytes.iter().map(|&b| b as i8 as f64).collect(),
        Dtype::U64 => chunks::<8>(bytes, |c| u64::from_le_bytes(c) as f64),
        Dtype::U32 => chunks::<4>(bytes, |c| u32::from_le_bytes(c) as f64),
        Dtype::U16 => chunks::<2>(bytes, |c| u16::from_le_bytes(c) as f64),
        Dtype::U8 | Dtype::BOOL => bytes.iter().map(|&b| b as f64).collect(),
        _ => return None,
    })
}

/// Whole-tensor statistics (population std, like ComfyUI's `unbiased=False`).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Stats {
    pub amax: f64,
    pub mean: f64,
    pub std: f64,
    pub elements: u64,
    pub non_finite: u64,
}

#[derive(Clone, Copy, Default)]
struct Acc {
    n: u64,
    sum: f64,
    sumsq: f64,
    amax: f64,
    bad: u64,
}

impl Acc {
    fn push(mut self, v: f64) -> Acc {
        if v.is_finite() {
            self.n += 1;
            self.sum += v;
            self.sumsq += v * v;
            self.amax = self.amax.max(v.abs());
        } else {
            self.bad += 1;
        }
        self
    }
    fn merge(self, o: Acc) -> Acc {
        Acc { n: self.n + o.n, sum: self.sum + o.sum, sumsq: self.sumsq + o.sumsq, amax: self.amax.max(o.amax), bad: self.bad + o.bad }
    }
}

/// Statistics over finite elements; non-finite ones are counted apart.
pub fn stats(dtype: Dtype, bytes: &[u8]) -> Option<Stats> {
    let size = dtype.bitsize() / 8;
    if size == 0 || decode_f64(dtype, &[]).is_none() {
        return None;
    }
    let chunk = size * 65536;
    let acc = bytes
        .par_chunks(chunk)
        .map(|c| decode_f64(dtype, c).unwrap().into_iter().fold(Acc::default(), Acc::push))
        .reduce(Acc::default, Acc::merge);
    let n = acc.n.max(1) as f64;
    let mean = acc.sum / n;
    let var = (acc.sumsq / n - mean * mean).max(0.0);
    Some(Stats { amax: acc.amax, mean, std: var.sqrt(), elements: acc.n + acc.bad, non_finite: acc.bad })
}
