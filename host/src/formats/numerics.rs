//! Bit-level numerics shared by the CPU reference formats.
//!
//! Everything here reproduces what PyTorch's CPU kernels do inside
//! comfy-kitchen v0.2.24's eager backend, down to the bit:
//! - a bf16/f16 elementwise op is computed in f32 and rounded once to the
//!   input dtype, round to nearest even ([`round_to_bf16`], [`round_to_f16`]);
//! - `x.to(torch.float8_e4m3fn)` is c10's `fp8e4m3fn_from_fp32_value`
//!   ([`e4m3_from_f32`]);
//! - FP4 codes come from torchao's `_f32_to_floatx_unpacked(x, 2, 1)`
//!   ([`e2m1_from_f32`]);
//! - block scales are laid out by `float_utils.to_blocked` ([`blocked_index`]).
//!
//! The CUDA kernels mirror the public functions of this module one for one and
//! are tested byte for byte against them, so keep them free of Rust-only tricks.

use rayon::prelude::*;

use super::{ErrorStats, QuantError, SourceDtype, StoredTensor, WeightView};

/// Largest finite E4M3 (fn) magnitude.
pub const E4M3_MAX: f32 = 448.0;
/// Largest E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;

/// `((x + m - 1) / m) * m`, as `float_utils.roundup`.
pub const fn roundup(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

// ---------------------------------------------------------------------------
// bf16 / f16
// ---------------------------------------------------------------------------

pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 → bf16 bits, round to nearest even (c10's `round_to_nearest_even`;
/// overflow goes to infinity, NaN stays a quiet NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to the nearest bf16, as an f32 (what a bf16 op stores).
#[inline(always)]
pub fn round_to_bf16(x: f32) -> f32 {
    // Same arithmetic as `f32_to_bf16` minus the NaN case, kept branch-free
    // so the quantization loops vectorize. Inputs here are never NaN.
    let b = x.to_bits();
    f32::from_bits(b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000)
}

/// f16 bits → f32 (exact), branch-free so loops over it vectorize; agrees
/// with the `half` crate for all 65536 inputs (tested).
#[inline(always)]
pub fn f16_to_f32(bits: u16) -> f32 {
    let h = bits as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7FFF;
    let normal = (em << 13) + ((127 - 15) << 23);
    let inf_nan = (em << 13) | 0x7F80_0000;
    let sub = (em as f32 * (1.0 / 16_777_216.0)).to_bits();
    let mag = if em >= 0x7C00 {
        inf_nan
    } else if em >= 0x0400 {
        normal
    } else {
        sub
    };
    f32::from_bits(sign | mag)
}

/// f32 → f16 bits, round to nearest even, overflow to infinity.
pub fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// `x` rounded to the nearest f16 (subnormals included, overflow to
/// infinity), as an f32. Branch-free so it vectorizes; agrees with
/// [`f32_to_f16`] for every non-NaN input (tested).
#[inline(always)]
pub fn round_to_f16(x: f32) -> f32 {
    let b = x.to_bits();
    let sign = b & 0x8000_0000;
    let a = b & 0x7FFF_FFFF;
    // Normal f16 range: keep 11 significant bits (drop 13), ties to even.
    let normal = a.wrapping_add(0x0FFF + ((a >> 13) & 1)) & !0x1FFF;
    // 65520 and above round past f16's max (65504) to infinity.
    let normal = if normal >= 0x4780_0000 { 0x7F80_0000 } else { normal };
    // Below 2^-14 the quantum is 2^-24: adding 0.75 (whose f32 ulp is 2^-24
    // and whose mantissa is even in those units) rounds to it, ties to even.
    let sub = ((f32::from_bits(a) + 0.75) - 0.75).to_bits();
    let mag = if a < 0x3880_0000 { sub } else { normal };
    f32::from_bits(sign | mag)
}

// ---------------------------------------------------------------------------
// FP8 E4M3 (fn): bias 7, no infinities, NaN = S.1111.111, subnormals.
// ---------------------------------------------------------------------------

/// f32 → E4M3 (fn) code, round to nearest even: c10's
/// `fp8e4m3fn_from_fp32_value` for |x| ≤ 448 (every caller clamps first, as
/// comfy-kitchen does). Finite |x| > 448 saturates to ±448 (0x7E/0xFE), where
/// c10 would return NaN from 464 up; NaN gives 0x7F with the sign bit of `x`.
pub fn e4m3_from_f32(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    match bits & 0x7FFF_FFFF {
        a if a > 0x7F80_0000 => sign | 0x7F,
        a if a > 0x43E0_0000 => sign | 0x7E,
        _ => e4m3_from_f32_sat(x),
    }
}

/// [`e4m3_from_f32`] for |x| ≤ 448, not NaN; branch-free so loops over it
/// vectorize.
#[inline(always)]
pub fn e4m3_from_f32_sat(x: f32) -> u8 {
    let bits = x.to_bits();
    let a = bits & 0x7FFF_FFFF;
    // Below 2^-6 (E4M3's smallest normal): adding 2^14, whose f32 ulp is
    // 2^-9 (E4M3's subnormal step), rounds to the subnormal grid; the low
    // bits of the sum are then the code.
    let denorm = (f32::from_bits(a) + 16384.0).to_bits().wrapping_sub(141 << 23);
    // Normal: rebias the exponent (127 → 7) and round the 20 dropped
    // mantissa bits to nearest even with the magic adder 0x7FFFF + lsb.
    let odd = (a >> 20) & 1;
    let normal = a.wrapping_add((7u32.wrapping_sub(127) << 23).wrapping_add(0x7FFFF + odd)) >> 20;
    let mag = if a < (121 << 23) { denorm } else { normal };
    (((bits >> 24) & 0x80) | (mag & 0x7F)) as u8
}

/// E4M3 (fn) code → f32 (exact; 0x7F/0xFF are NaN). Branch-free.
#[inline(always)]
pub fn e4m3_to_f32(code: u8) -> f32 {
    let c = code as u32;
    let sign = (c & 0x80) << 24;
    let em = c & 0x7F;
    // Normal: exponent and mantissa move up 20 bits, the bias goes 7 → 127.
    let normal = (em << 20) + (120 << 23);
    let sub = ((em & 7) as f32 * (1.0 / 512.0)).to_bits();
    let mag = if em == 0x7F {
        0x7FC0_0000
    } else if em < 8 {
        sub
    } else {
        normal
    };
    f32::from_bits(sign | mag)
}

// ---------------------------------------------------------------------------
// FP4 E2M1: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6; code = sign<<3 | e<<1 | m.
// ---------------------------------------------------------------------------

/// f32 → E2M1 code, exactly torchao's `_f32_to_floatx_unpacked(x, 2, 1)`:
/// round to nearest even, |x| ≥ 6 saturates to 6, and the sign bit is always
/// kept, so -0.0 and negatives that round to zero give 0x8. NaN is not a
/// valid input (comfy-kitchen never produces one for finite weights).
pub fn e2m1_from_f32(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 28) & 0x8) as u8;
    let a = bits & 0x7FFF_FFFF;
    let ax = f32::from_bits(a);
    let mag = if ax >= 6.0 {
        7
    } else if ax < 1.0 {
        // Denormal path: adding 2^22 (f32 ulp 0.5) rounds to E2M1's
        // subnormal step; subtracting the bits of 2^22 leaves the code.
        ((ax + 4_194_304.0).to_bits().wrapping_sub(149 << 23)) as u8
    } else {
        // Normal path: rebias (127 → 1) and round the 22 dropped mantissa
        // bits with the magic adder 0x1FFFFF + lsb.
        let odd = (a >> 22) & 1;
        (a.wrapping_add((1u32.wrapping_sub(127) << 23).wrapping_add(0x1F_FFFF + odd)) >> 22) as u8
    };
    sign | mag
}

/// Same result as [`e2m1_from_f32`] for every non-NaN input, by comparing
/// against the rounding boundaries (ties go to the even code: 0.25 → 0,
/// 0.75 → 1, 1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4). Vectorizes.
#[inline(always)]
pub fn e2m1_from_f32_fast(x: f32) -> u8 {
    let a = x.abs();
    let mag =
        (a > 0.25) as u8 + (a >= 0.75) as u8 + (a > 1.25) as u8 + (a >= 1.75) as u8 + (a > 2.5) as u8 + (a >= 3.5) as u8 + (a > 5.0) as u8;
    (((x.to_bits() >> 28) & 0x8) as u8) | mag
}

/// E2M1 code (low nibble) → f32. Branch-free.
#[inline(always)]
pub fn e2m1_to_f32(code: u8) -> f32 {
    let c = code as u32;
    let m = c & 7;
    // 2^((m>>1)-1)·(1 + (m&1)/2) for m ≥ 2; 0 and 0.5 below.
    let normal = (((m >> 1) + 126) << 23) | ((m & 1) << 22);
    let sub = (m as f32 * 0.5).to_bits();
    f32::from_bits(((c & 8) << 28) | if m < 2 { sub } else { normal })
}

// ---------------------------------------------------------------------------
// E8M0: an 8-bit biased exponent, value 2^(code-127); comfy-kitchen decodes 0 as 0.
// ---------------------------------------------------------------------------

/// E8M0 code of the smallest power of two ≥ `s`: `ceil(log2(s)) + 127`
/// clamped to [0, 254], computed exactly from the bits of `s` (f32 subnormals
/// included; `s` ≤ 0 gives 0).
///
/// comfy-kitchen's eager backend computes `torch.ceil(torch.log2(s))` in f32,
/// and the f32 logarithm is rounded: for `s` = 2^k·(1 + n·2^-23) it returns
/// exactly k while 1.4427·n·2^-23 is below half an ulp of k, and the
/// exponent comes out one lower than exact (the block then saturates at
/// 448). Against torch 2.15 that is n ≤ 1 for |k| in [4, 8), n ≤ 2 for
/// [8, 16), n ≤ 5 for [16, 32), doubling per binade; never for |k| < 4.
/// Only F32 sources can get there: `s` is `bmax / 448`, and a bf16/f16
/// `bmax` is either exactly 1.75·2^j (then `s` is a power of two) or at
/// least 2^-10 relatively away from one. We follow the exact definition, as
/// comfy-kitchen's CUDA kernel does (`__nv_cvt_float_to_e8m0(..,
/// cudaRoundPosInf)`).
#[inline(always)]
pub fn e8m0_ceil_code(s: f32) -> u8 {
    // A subnormal `s` is scaled by 2^64 first (exact), so one exponent and
    // mantissa test covers both ranges; branch-free for vector loops.
    let sub = s < f32::MIN_POSITIVE;
    let t = if sub { s * 18_446_744_073_709_551_616.0 } else { s };
    let b = t.to_bits();
    let ceil_log2 = ((b >> 23) & 0xFF) as i32 - 127 + ((b & 0x7F_FFFF) != 0) as i32 - if sub { 64 } else { 0 };
    let code = (ceil_log2 + 127).clamp(0, 254);
    if s > 0.0 { code as u8 } else { 0 }
}

/// E8M0 code → f32: 2^(code-127), and 0.0 for code 0 (`float_utils.e8m0_to_f32`
/// shifts the code into the f32 exponent field, so 0 becomes +0.0).
pub fn e8m0_to_f32(code: u8) -> f32 {
    f32::from_bits((code as u32) << 23)
}

// ---------------------------------------------------------------------------
// cuBLAS block-scale layout (`float_utils.to_blocked`)
// ---------------------------------------------------------------------------

/// Shape of the blocked (swizzled) scale matrix for `rows × cols` scales:
/// `[roundup(rows, 128), roundup(cols, 4)]`.
pub fn blocked_shape(rows: usize, cols: usize) -> (usize, usize) {
    (roundup(rows, 128), roundup(cols, 4))
}

/// Flat position of scale `(row, col)` of a `? × cols` scale matrix in the
/// blocked layout: 128×4 tiles in row-major tile order, each tile stored as
/// 32 lines of 16 bytes where line `r % 32` holds rows r, r+32, r+64, r+96.
#[inline(always)]
pub fn blocked_index(row: usize, col: usize, cols: usize) -> usize {
    let col_tiles = cols.div_ceil(4);
    let (tile_row, r) = (row / 128, row % 128);
    let (tile_col, c) = (col / 4, col % 4);
    (tile_row * col_tiles + tile_col) * 512 + (r % 32) * 16 + (r / 32) * 4 + c
}

/// `to_blocked`: `src` is `rows × cols` row-major; the result is
/// `blocked_shape(rows, cols)`, zero where padded.
pub fn to_blocked(src: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    assert_eq!(src.len(), rows * cols);
    let (pr, pc) = blocked_shape(rows, cols);
    let mut out = vec![0u8; pr * pc];
    for r in 0..rows {
        for c in 0..cols {
            out[blocked_index(r, c, cols)] = src[r * cols + c];
        }
    }
    out
}

/// `from_blocked`: the `rows × cols` scales back out of a blocked matrix.
pub fn from_blocked(blocked: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let (pr, pc) = blocked_shape(rows, cols);
    assert_eq!(blocked.len(), pr * pc);
    let mut out = vec![0u8; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[r * cols + c] = blocked[blocked_index(r, c, cols)];
        }
    }
    out
}

/// floor(log2(m)) for a positive normal f64, from its exponent bits.
fn f64_floor_log2(m: f64) -> i32 {
    ((m.to_bits() >> 52) & 0x7FF) as i32 - 1023
}

/// ceil(log2(m)) for a positive normal f64, from its bits.
pub(crate) fn f64_ceil_log2(m: f64) -> i32 {
    let b = m.to_bits();
    f64_floor_log2(m) + ((b & ((1u64 << 52) - 1)) != 0) as i32
}

// ---------------------------------------------------------------------------
// Source element types (crate-internal plumbing for the format loops)
// ---------------------------------------------------------------------------

/// One source element type `T`: decoding, and rounding an f32 result to `T`
/// the way a PyTorch op on a `T` tensor stores it.
pub(crate) trait Src: Copy + Send + Sync + 'static {
    const SIZE: usize;
    /// Magnitude bits (sign cleared) at or above this are infinity or NaN.
    const NONFINITE: u32;
    /// Relative rounding error bound of `round` for normal results (2^-p).
    const UNIT_ROUNDOFF: f32;
    /// Absolute rounding error bound of `round` in the subnormal range (at
    /// least f32's smallest subnormal, so it is never 0 in f32).
    const HALF_MIN_SUBNORMAL: f32;
    /// `torch.finfo(T).tiny`, the smallest positive normal.
    const TINY: f32;
    /// Raw bits of the element in `c` (`SIZE` little-endian bytes).
    fn bits(c: &[u8]) -> u32;
    /// `bits` with the sign cleared; orders like |x|.
    fn mag(bits: u32) -> u32;
    fn to_f32(bits: u32) -> f32;
    /// f32 → `T` (round to nearest even) → f32.
    fn round(x: f32) -> f32;
    /// The largest magnitude bits of a run of elements.
    fn max_mag(bytes: &[u8]) -> u32;
}

#[derive(Clone, Copy)]
pub(crate) struct Bf16;
#[derive(Clone, Copy)]
pub(crate) struct F16;
#[derive(Clone, Copy)]
pub(crate) struct F32;

impl Src for Bf16 {
    const SIZE: usize = 2;
    const NONFINITE: u32 = 0x7F80;
    const UNIT_ROUNDOFF: f32 = 1.0 / 256.0;
    const HALF_MIN_SUBNORMAL: f32 = f32::from_bits(1 << 15); // 2^-134
    const TINY: f32 = f32::MIN_POSITIVE;
    #[inline(always)]
    fn bits(c: &[u8]) -> u32 {
        u16::from_le_bytes([c[0], c[1]]) as u32
    }
    #[inline(always)]
    fn mag(bits: u32) -> u32 {
        bits & 0x7FFF
    }
    #[inline(always)]
    fn to_f32(bits: u32) -> f32 {
        f32::from_bits(bits << 16)
    }
    #[inline(always)]
    fn round(x: f32) -> f32 {
        round_to_bf16(x)
    }
    fn max_mag(bytes: &[u8]) -> u32 {
        max_mag16(bytes)
    }
}

impl Src for F16 {
    const SIZE: usize = 2;
    const NONFINITE: u32 = 0x7C00;
    const UNIT_ROUNDOFF: f32 = 1.0 / 2048.0;
    const HALF_MIN_SUBNORMAL: f32 = f32::from_bits(102 << 23); // 2^-25
    const TINY: f32 = f32::from_bits(113 << 23); // 2^-14
    #[inline(always)]
    fn bits(c: &[u8]) -> u32 {
        u16::from_le_bytes([c[0], c[1]]) as u32
    }
    #[inline(always)]
    fn mag(bits: u32) -> u32 {
        bits & 0x7FFF
    }
    #[inline(always)]
    fn to_f32(bits: u32) -> f32 {
        f16_to_f32(bits as u16)
    }
    #[inline(always)]
    fn round(x: f32) -> f32 {
        round_to_f16(x)
    }
    fn max_mag(bytes: &[u8]) -> u32 {
        max_mag16(bytes)
    }
}

impl Src for F32 {
    const SIZE: usize = 4;
    const NONFINITE: u32 = 0x7F80_0000;
    const UNIT_ROUNDOFF: f32 = 1.0 / 16_777_216.0;
    const HALF_MIN_SUBNORMAL: f32 = f32::from_bits(1); // 2^-149 (2^-150 is not an f32)
    const TINY: f32 = f32::MIN_POSITIVE;
    #[inline(always)]
    fn bits(c: &[u8]) -> u32 {
        u32::from_le_bytes([c[0], c[1], c[2], c[3]])
    }
    #[inline(always)]
    fn mag(bits: u32) -> u32 {
        bits & 0x7FFF_FFFF
    }
    #[inline(always)]
    fn to_f32(bits: u32) -> f32 {
        f32::from_bits(bits)
    }
    #[inline(always)]
    fn round(x: f32) -> f32 {
        x
    }
    fn max_mag(bytes: &[u8]) -> u32 {
        // Eight independent lanes so the reduction vectorizes.
        let mut lanes = [0u32; 8];
        let mut it = bytes.chunks_exact(32);
        for group in &mut it {
            for (l, c) in lanes.iter_mut().zip(group.chunks_exact(4)) {
                *l = (*l).max(Self::mag(Self::bits(c)));
            }
        }
        let tail = it.remainder().chunks_exact(4).map(|c| Self::mag(Self::bits(c))).max().unwrap_or(0);
        lanes.into_iter().max().unwrap_or(0).max(tail)
    }
}

/// Largest magnitude bits of 16-bit elements: sign-cleared bits fit an i16,
/// and SSE2 has a 16-bit signed max.
fn max_mag16(bytes: &[u8]) -> u32 {
    let mut lanes = [0i16; 16];
    let mut it = bytes.chunks_exact(32);
    for group in &mut it {
        for (l, c) in lanes.iter_mut().zip(group.chunks_exact(2)) {
            *l = (*l).max((u16::from_le_bytes([c[0], c[1]]) & 0x7FFF) as i16);
        }
    }
    let tail = it.remainder().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7FFF).max().unwrap_or(0);
    (lanes.into_iter().max().unwrap_or(0) as u16).max(tail) as u32
}

/// Runs `$body` with `$T` bound to the [`Src`] type of `$dtype`.
macro_rules! with_src {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::formats::SourceDtype::BF16 => {
                type $T = $crate::formats::numerics::Bf16;
                $body
            }
            $crate::formats::SourceDtype::F16 => {
                type $T = $crate::formats::numerics::F16;
                $body
            }
            $crate::formats::SourceDtype::F32 => {
                type $T = $crate::formats::numerics::F32;
                $body
            }
        }
    };
}
pub(crate) use with_src;

/// Work items are about this many source bytes.
const CHUNK_BYTES: usize = 1 << 18;

/// Rows per parallel work item for rows of `row_bytes` bytes.
pub(crate) fn rows_per_chunk(row_bytes: usize) -> usize {
    (CHUNK_BYTES / row_bytes.max(1)).max(1)
}

/// Checks that `w` is a non-empty `[rows, cols]` weight with the right byte length.
pub(crate) fn check_view(w: &WeightView<'_>) -> Result<(), QuantError> {
    let invalid = |reason: String| QuantError::Invalid { name: w.name.to_string(), reason };
    if w.rows == 0 || w.cols == 0 {
        return Err(invalid(format!("empty weight [{}, {}]", w.rows, w.cols)));
    }
    let want = w.rows.checked_mul(w.cols).and_then(|n| n.checked_mul(w.dtype.size())).ok_or_else(|| invalid("shape overflows".into()))?;
    if w.bytes.len() != want {
        return Err(invalid(format!("{} bytes for [{}, {}] {:?}, expected {want}", w.bytes.len(), w.rows, w.cols, w.dtype)));
    }
    Ok(())
}

/// Max |x| of the whole source, as magnitude bits (parallel).
pub(crate) fn amax_bits<T: Src>(bytes: &[u8]) -> u32 {
    bytes.par_chunks(CHUNK_BYTES / T::SIZE * T::SIZE).map(T::max_mag).max().unwrap_or(0)
}

/// Validates `w`, refuses non-finite values (naming the tensor) and returns
/// the magnitude bits of max|x|.
pub(crate) fn finite_amax<T: Src>(w: &WeightView<'_>) -> Result<u32, QuantError> {
    check_view(w)?;
    let amax = amax_bits::<T>(w.bytes);
    if amax < T::NONFINITE { Ok(amax) } else { Err(nonfinite::<T>(w)) }
}

/// The error for a source known to hold a non-finite value.
pub(crate) fn nonfinite<T: Src>(w: &WeightView<'_>) -> QuantError {
    let bad = |c: &[u8]| T::mag(T::bits(c)) >= T::NONFINITE;
    let count = w.bytes.par_chunks_exact(T::SIZE).filter(|c| bad(c)).count();
    let first = w.bytes.chunks_exact(T::SIZE).position(bad).unwrap_or(0);
    QuantError::NonFinite { name: w.name.to_string(), count, first }
}

/// Decodes `out.len()` elements from `bytes` (exact).
#[inline(always)]
pub(crate) fn decode_into<T: Src>(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(T::SIZE)) {
        *o = T::to_f32(T::bits(c));
    }
}

/// The whole source as f32 (exact).
/// The row driver of the block-scaled formats (NVFP4, MXFP8). A group of 128
/// rows owns one contiguous row of 128×4 scale tiles, so groups run in parallel
/// with disjoint outputs. Each real row is decoded to f32 (zero beyond `cols`, up
/// to `padded_cols`) and given to `encode_row(x, scratch, codes, data_row)`, which
/// writes the row's `row_len` data bytes and one scale code per block (`scratch`
/// holds one f32 per block); the codes land at their swizzled places. Padding
/// rows stay zero: their blocks get scale 0 and codes 0.
#[allow(clippy::too_many_arguments)]
pub(crate) fn quantize_block_rows<T: Src>(
    w: &WeightView<'_>,
    padded_cols: usize,
    row_len: usize,
    blocks: usize,
    scale_cols: usize,
    data: &mut [u8],
    scales: &mut [u8],
    encode_row: impl Fn(&[f32], &mut [f32], &mut [u8], &mut [u8]) + Sync,
) {
    let row_bytes = w.cols * T::SIZE;
    data.par_chunks_mut(128 * row_len).zip(scales.par_chunks_mut(128 * scale_cols)).enumerate().for_each(|(g, (data, scales))| {
        let (mut x, mut scratch, mut codes) = (vec![0f32; padded_cols], vec![0f32; blocks], vec![0u8; blocks]);
        for (lr, drow) in data.chunks_exact_mut(row_len).enumerate() {
            let r = g * 128 + lr;
            if r >= w.rows {
                break;
            }
            decode_into::<T>(&w.bytes[r * row_bytes..(r + 1) * row_bytes], &mut x[..w.cols]);
            encode_row(&x, &mut scratch, &mut codes, drow);
            for (b, &code) in codes.iter().enumerate() {
                scales[blocked_index(lr, b, blocks)] = code;
            }
        }
    });
}

/// Checks that swizzled block scales are zero wherever no real block is: beyond
/// `blocks` in real rows, everywhere in padding rows.
pub(crate) fn check_scale_padding(
    name: &str,
    blocked: &[u8],
    rows: usize,
    blocks: usize,
    scale_rows: usize,
    scale_cols: usize,
) -> Result<(), String> {
    for r in 0..scale_rows {
        for c in if r < rows { blocks } else { 0 }..scale_cols {
            if blocked[blocked_index(r, c, blocks)] != 0 {
                return Err(format!("{name}: padding block scale [{r}, {c}] is not zero"));
            }
        }
    }
    Ok(())
}

pub(crate) fn decode<T: Src>(bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / T::SIZE];
    out.par_chunks_mut(CHUNK_BYTES).zip(bytes.par_chunks(CHUNK_BYTES * T::SIZE)).for_each(|(o, b)| decode_into::<T>(b, o));
    out
}

/// [`decode`] for a runtime dtype.
pub(crate) fn decode_dtype(dtype: SourceDtype, bytes: &[u8]) -> Vec<f32> {
    with_src!(dtype, T => decode::<T>(bytes))
}

/// Largest |x| of a decoded run (0 for an empty one).
#[inline(always)]
pub(crate) fn max_abs(x: &[f32]) -> f32 {
    // On magnitude bits: an integer max reduces in vector lanes, a float max
    // (with its NaN rules) does not.
    f32::from_bits(x.iter().map(|v| v.to_bits() & 0x7FFF_FFFF).max().unwrap_or(0))
}

// ---------------------------------------------------------------------------
// Stored-tensor access and verification plumbing
// ---------------------------------------------------------------------------

/// The stored tensor with `suffix`, checked against the expected layout.
pub(crate) fn stored<'a>(stored: &'a [StoredTensor], layout: &[super::StoredSpec], suffix: &str) -> Result<&'a StoredTensor, String> {
    let t = stored.iter().find(|t| t.spec.suffix == suffix).ok_or_else(|| format!("missing `{suffix}`"))?;
    let spec = layout.iter().find(|s| s.suffix == suffix).ok_or_else(|| format!("unexpected `{suffix}`"))?;
    if &t.spec != spec {
        return Err(format!("`{suffix}` is {:?} {:?}, expected {:?} {:?}", t.spec.dtype, t.spec.shape, spec.dtype, spec.shape));
    }
    if t.data.len() != spec.byte_len() {
        return Err(format!("`{suffix}` holds {} bytes, expected {}", t.data.len(), spec.byte_len()));
    }
    Ok(t)
}

/// Like [`stored`], panicking: `dequantize` is only given what `layout` describes.
pub(crate) fn expect_stored<'a>(tensors: &'a [StoredTensor], layout: &[super::StoredSpec], suffix: &str) -> &'a StoredTensor {
    stored(tensors, layout, suffix).unwrap_or_else(|e| panic!("dequantize: {e}"))
}

/// A little-endian f32 at element `i` of `data`.
pub(crate) fn f32_at(data: &[u8], i: usize) -> f32 {
    f32::from_le_bytes(data[4 * i..4 * i + 4].try_into().unwrap())
}

pub(crate) fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// `a > b ? a : b`: one vector instruction, unlike `f32::max` and its NaN rules.
#[inline(always)]
pub(crate) fn fmax<F: PartialOrd>(a: F, b: F) -> F {
    if a > b { a } else { b }
}

/// `a < b ? a : b`.
#[inline(always)]
pub(crate) fn fmin<F: PartialOrd>(a: F, b: F) -> F {
    if a < b { a } else { b }
}

/// Half the distance between neighbouring E4M3 values around magnitude `m`
/// (the worst rounding error of [`e4m3_from_f32`] up to 448): 2^(⌊log2 m⌋-4),
/// and 2^-10 in the subnormal range.
#[inline(always)]
pub fn e4m3_half_step(m: f32) -> f32 {
    fmax(f32::from_bits(m.to_bits() & 0x7F80_0000) * 0.0625, 1.0 / 1024.0)
}

/// Half the distance between neighbouring E2M1 values around magnitude `m`.
/// (0.25 below 2, 0.5 below 4, then 1.)
#[inline(always)]
pub fn e2m1_half_step(m: f32) -> f32 {
    f32::from_bits(fmax(m, 1.0).to_bits() & 0x7F80_0000) * 0.25
}

/// Bounds are computed in f32; this covers their own rounding (a few ulps)
/// without loosening them measurably.
pub(crate) const BOUND_SLACK: f32 = 1.0 + 1.0 / 4096.0;

/// Running sums for [`ErrorStats`].
#[derive(Clone, Copy, Default)]
pub(crate) struct StatAcc {
    n: usize,
    max_abs: f64,
    err2: f64,
    x2: f64,
    d2: f64,
}

impl StatAcc {
    /// Adds a row; returns the column of the first element with
    /// |d - x| > bound (or a non-finite d or bound), if any.
    #[allow(clippy::neg_cmp_op_on_partial_ord, reason = "NaN must fail the bound")]
    fn add_row(&mut self, x: &[f32], d: &[f32], bound: &[f32]) -> Option<usize> {
        // f32 sums in 8 lanes per row (a lane sees at most a few thousand
        // terms), f64 across rows. The cosine is derived from the error sum
        // (see `finish`), so these roundings do not blur it.
        const L: usize = 8;
        let (mut e2, mut x2, mut d2, mut mx) = ([0f32; L], [0f32; L], [0f32; L], [0f32; L]);
        let mut bad = [0u32; L];
        let n = x.len();
        let (d, bound) = (&d[..n], &bound[..n]);
        let mut lane = |l: usize, x: f32, d: f32, b: f32| {
            let e = d - x;
            e2[l] += e * e;
            x2[l] += x * x;
            d2[l] += d * d;
            mx[l] = fmax(mx[l], e.abs());
            bad[l] |= !(e.abs() <= b) as u32;
        };
        let full = n - n % L;
        for j in (0..full).step_by(L) {
            let (x, d, b) = (&x[j..j + L], &d[j..j + L], &bound[j..j + L]);
            for l in 0..L {
                lane(l, x[l], d[l], b[l]);
            }
        }
        for i in full..n {
            lane(0, x[i], d[i], bound[i]);
        }
        if bad.iter().any(|&b| b != 0) {
            return Some((0..n).find(|&i| !((d[i] - x[i]).abs() <= bound[i])).unwrap_or(0));
        }
        let sum = |v: [f32; L]| v.iter().map(|&v| v as f64).sum::<f64>();
        self.n += n;
        self.max_abs = mx.iter().fold(self.max_abs, |m, &v| m.max(v as f64));
        self.err2 += sum(e2);
        self.x2 += sum(x2);
        self.d2 += sum(d2);
        None
    }

    fn merge(mut self, o: StatAcc) -> StatAcc {
        self.n += o.n;
        self.max_abs = self.max_abs.max(o.max_abs);
        self.err2 += o.err2;
        self.x2 += o.x2;
        self.d2 += o.d2;
        self
    }

    fn finish(self) -> ErrorStats {
        let relative_l2 = if self.x2 > 0.0 {
            (self.err2 / self.x2).sqrt()
        } else if self.err2 > 0.0 {
            f64::INFINITY
        } else {
            0.0
        };
        // cos = x·d / (|x||d|) with 2·x·d = |x|² + |d|² - |d - x|², written
        // so that the small quantity (1 - cos) comes from the error sum and
        // not from the difference of two large sums.
        let (sx, sd) = (self.x2.sqrt(), self.d2.sqrt());
        let cosine = if sx > 0.0 && sd > 0.0 {
            (1.0 - (self.err2 - (sx - sd) * (sx - sd)) / (2.0 * sx * sd)).clamp(-1.0, 1.0)
        } else if sx == 0.0 && sd == 0.0 {
            1.0
        } else {
            0.0
        };
        ErrorStats { elements: self.n, max_abs_error: self.max_abs, relative_l2, cosine }
    }
}

/// Compares every row of `w` with its dequantized value. `row(r, x, d,
/// bound)` gets the decoded source row `x`, fills the dequantized row `d`
/// and the per-element error bound `bound`, and may reject the row (its
/// scales, say) with a message. An element fails when |d - x| > bound or
/// either is not finite. Rows run in parallel; the error names the first
/// failing row in order.
pub(crate) fn verify_rows<T: Src, F>(w: &WeightView<'_>, row: F) -> Result<ErrorStats, String>
where
    F: Fn(usize, &[f32], &mut [f32], &mut [f32]) -> Result<(), String> + Sync,
{
    check_view(w).map_err(|e| e.to_string())?;
    let cols = w.cols;
    let row_bytes = cols * T::SIZE;
    let per = rows_per_chunk(row_bytes);
    let parts: Vec<Result<StatAcc, String>> = w
        .bytes
        .par_chunks(per * row_bytes)
        .enumerate()
        .map(|(ci, chunk)| {
            let (mut x, mut d, mut b) = (vec![0f32; cols], vec![0f32; cols], vec![0f32; cols]);
            let mut acc = StatAcc::default();
            for (ri, src) in chunk.chunks_exact(row_bytes).enumerate() {
                let r = ci * per + ri;
                decode_into::<T>(src, &mut x);
                row(r, &x, &mut d, &mut b).map_err(|e| format!("{}: {e}", w.name))?;
                if let Some(c) = acc.add_row(&x, &d, &b) {
                    let err = (d[c] - x[c]).abs();
                    return Err(format!(
                        "{}: element [{r}, {c}] = {:e} dequantizes to {:e}, error {err:e} exceeds the bound {:e}",
                        w.name, x[c], d[c], b[c]
                    ));
                }
            }
            Ok(acc)
        })
        .collect();
    let mut total = StatAcc::default();
    for p in parts {
        total = total.merge(p?);
    }
    Ok(total.finish())
}

/// The interval a scale computed as `T(value)` (or, after a fallback, as the
/// f32 `value` itself) may take, given `value` known to relative `rel`.
pub(crate) fn scale_interval<T: Src>(value: f64, rel: f64) -> (f64, f64) {
    let lo = value * (1.0 - rel);
    let hi = value * (1.0 + rel);
    let lo_t = T::round(lo as f32) as f64;
    let hi_t = T::round(hi as f32) as f64;
    (lo.min(lo_t) * (1.0 - 1e-7), hi.max(hi_t) * (1.0 + 1e-7))
}

/// Little-endian bytes of `values` rounded to `dtype` (nearest even), as a
/// checkpoint would store them: for tests and benchmarks.
pub fn encode_source(dtype: crate::formats::SourceDtype, values: &[f32]) -> Vec<u8> {
    use crate::formats::SourceDtype;
    match dtype {
        SourceDtype::BF16 => values.iter().flat_map(|&x| f32_to_bf16(x).to_le_bytes()).collect(),
        SourceDtype::F16 => values.iter().flat_map(|&x| f32_to_f16(x).to_le_bytes()).collect(),
        SourceDtype::F32 => values.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_hand_vectors() {
        // (value, code): code = s eeee mmm, bias 7.
        let cases: &[(f32, u8)] = &[
            (0.0, 0x00),
            (-0.0, 0x80),
            (1.0, 0x38),   // e=7, m=0
            (-2.0, 0xC0),  // s=1, e=8
            (448.0, 0x7E), // e=15, m=6: the max (m=7 is NaN)
            (-448.0, 0xFE),
            (464.0, 0x7E), // halfway to 480: ties to even 448 (and saturates anyway)
            (470.0, 0x7E), // saturates
            (1.0e6, 0x7E),
            (f32::INFINITY, 0x7E),
            (2f32.powi(-9), 0x01),        // smallest subnormal
            (2f32.powi(-10), 0x00),       // half of it: tie to even 0
            (1.5 * 2f32.powi(-10), 0x01), // above the tie: rounds up
            (3.0 * 2f32.powi(-10), 0x02), // 1.5 steps: tie to even 2
            (5.0 * 2f32.powi(-10), 0x02), // 2.5 steps: tie to even 2
            (7.0 * 2f32.powi(-9), 0x07),  // largest subnormal
            (7.5 * 2f32.powi(-9), 0x08),  // tie between 7·2^-9 and 2^-6: even (0x08)
            (2f32.powi(-7), 0x04),        // subnormal 4·2^-9
            (2f32.powi(-6), 0x08),        // smallest normal
            (16.0, 0x58),                 // 2^4: biased exponent 11 = 0b1011
            (17.0, 0x58),                 // between 16 (0x58) and 18 (0x59): tie to even 16
            (19.0, 0x5A),                 // between 18 (0x59) and 20 (0x5A): tie to even 20
            (17.5, 0x59),                 // above the tie: 18
            (0.1, 0x1D),                  // 0.1 = 1.6·2^-4 → m = 4.8 → 5: 1.625·2^-4
            (240.0, 0x77),                // 1.875·2^7
            (2f32.powi(-12), 0x00),
        ];
        for &(v, code) in cases {
            assert_eq!(e4m3_from_f32(v), code, "encode {v:e}");
        }
        assert_eq!(e4m3_from_f32(f32::NAN), 0x7F);
        assert_eq!(e4m3_from_f32(-f32::NAN), 0xFF);
    }

    #[test]
    fn e4m3_roundtrip_and_nearest() {
        for code in 0..=255u8 {
            let v = e4m3_to_f32(code);
            if code & 0x7F == 0x7F {
                assert!(v.is_nan());
                continue;
            }
            assert_eq!(e4m3_from_f32(v), code, "code {code:#x} value {v}");
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        // Every f32 in a sweep encodes to a nearest E4M3 value.
        let finite: Vec<f32> = (0..=0x7Eu8).map(e4m3_to_f32).collect();
        let mut b = 0u32;
        while b < 0x43E0_0001 {
            let x = f32::from_bits(b);
            let q = e4m3_to_f32(e4m3_from_f32(x));
            let best = finite.iter().map(|v| (v - x).abs()).fold(f32::INFINITY, f32::min);
            assert_eq!((q - x).abs(), best, "{x:e} -> {q:e}");
            b += 4099;
        }
    }

    #[test]
    fn e2m1_every_tie_and_sign() {
        let cases: &[(f32, u8)] = &[
            (0.0, 0x0),
            (-0.0, 0x8), // sign kept
            (-0.1, 0x8), // negative rounding to zero keeps the sign
            (0.25, 0x0), // tie 0 / 0.5 → even 0
            (0.2500001, 0x1),
            (0.75, 0x2), // tie 0.5 / 1 → 1 (code 2, even)
            (1.25, 0x2), // tie 1 / 1.5 → 1
            (1.75, 0x4), // tie 1.5 / 2 → 2
            (2.5, 0x4),  // tie 2 / 3 → 2
            (3.5, 0x6),  // tie 3 / 4 → 4
            (5.0, 0x6),  // tie 4 / 6 → 4
            (5.0000005, 0x7),
            (6.0, 0x7),
            (7.0, 0x7), // saturates
            (-5.0, 0xE),
            (-6.0, 0xF),
            (-0.75, 0xA),
            (0.5, 0x1),
            (1.5, 0x3),
            (3.0, 0x5),
        ];
        for &(v, code) in cases {
            assert_eq!(e2m1_from_f32(v), code, "torchao path {v}");
            assert_eq!(e2m1_from_f32_fast(v), code, "fast path {v}");
        }
        for code in 0..16u8 {
            assert_eq!(e2m1_from_f32(e2m1_to_f32(code)), code);
        }
    }

    #[test]
    fn e2m1_fast_matches_torchao_path() {
        // A strided sweep of every positive f32 up to 6.5, plus ±2000 ulps
        // around each rounding boundary, both signs.
        let check = |b: u32| {
            for x in [f32::from_bits(b), -f32::from_bits(b)] {
                assert_eq!(e2m1_from_f32(x), e2m1_from_f32_fast(x), "{x:e}");
            }
        };
        let top = 6.5f32.to_bits();
        let mut b = 0;
        while b <= top {
            check(b);
            b += 1009;
        }
        for edge in [0.25f32, 0.75, 1.0, 1.25, 1.75, 2.0, 2.5, 3.5, 4.0, 5.0, 6.0] {
            let e = edge.to_bits();
            for b in e - 2000..=e + 2000 {
                check(b);
            }
        }
    }

    #[test]
    fn bf16_and_f16_rounding() {
        // bf16 keeps 8 significant bits: 1 + 2^-8 is a tie → 1.0; 1 + 3·2^-8 → 1 + 2^-6.
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3F80);
        assert_eq!(f32_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3F82);
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 0x3F81);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7F80); // overflow → inf
        assert_eq!(round_to_bf16(-3.0e-39), bf16_to_f32(f32_to_bf16(-3.0e-39)));
        // f16: 2049 is a tie between 2048 and 2050 → 2048; 65520 overflows.
        assert_eq!(round_to_f16(2049.0), 2048.0);
        assert_eq!(round_to_f16(2051.0), 2052.0);
        assert_eq!(round_to_f16(65519.0), 65504.0);
        assert_eq!(round_to_f16(65520.0), f32::INFINITY);
        assert_eq!(round_to_f16(-1.5 * 2f32.powi(-24)), -2.0 * 2f32.powi(-24));
        assert_eq!(round_to_f16(2f32.powi(-25)), 0.0);
        assert!(round_to_f16(-(2f32.powi(-26))).is_sign_negative());
        // The branch-free versions agree with the reference conversions.
        let mut b = 0u32;
        while b < 0x7F80_0000 {
            for x in [f32::from_bits(b), -f32::from_bits(b)] {
                let h = f16_to_f32(f32_to_f16(x));
                assert_eq!(round_to_f16(x).to_bits(), h.to_bits(), "f16 {x:e}");
                assert_eq!(round_to_bf16(x).to_bits(), bf16_to_f32(f32_to_bf16(x)).to_bits(), "bf16 {x:e}");
            }
            b += 977;
        }
        for edge in [65504.0f32, 65520.0, 2f32.powi(-14), 2f32.powi(-24), 1.0] {
            let e = edge.to_bits();
            for b in e - 5000..=e + 5000 {
                let x = f32::from_bits(b);
                assert_eq!(round_to_f16(x).to_bits(), f16_to_f32(f32_to_f16(x)).to_bits(), "f16 {x:e}");
            }
        }
    }

    #[test]
    fn fast_decoders_match_references() {
        for b in 0..=u16::MAX {
            let h = f16_to_f32(b);
            let want = half::f16::from_bits(b).to_f32();
            assert!(h.to_bits() == want.to_bits() || (h.is_nan() && want.is_nan()), "f16 {b:#06x}");
        }
        // E2M1 decode: every code by hand.
        let want = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for (code, &v) in want.iter().enumerate() {
            assert_eq!(e2m1_to_f32(code as u8), v);
            assert_eq!(e2m1_to_f32(code as u8 | 8).to_bits(), (-v).to_bits());
        }
        // The saturating E4M3 encoder is the general one on [-448, 448].
        let mut b = 0u32;
        while b <= 0x43E0_0000 {
            for x in [f32::from_bits(b), -f32::from_bits(b)] {
                assert_eq!(e4m3_from_f32_sat(x), e4m3_from_f32(x), "{x:e}");
            }
            b += 997;
        }
    }

    #[test]
    fn half_steps() {
        assert_eq!(e4m3_half_step(0.0), 1.0 / 1024.0);
        assert_eq!(e4m3_half_step(0.015), 1.0 / 1024.0); // subnormal E4M3 range
        assert_eq!(e4m3_half_step(1.0 / 64.0), 1.0 / 1024.0); // 2^-6: step 2^-9
        assert_eq!(e4m3_half_step(1.0), 1.0 / 16.0); // step 1/8 in [1, 2)
        assert_eq!(e4m3_half_step(300.0), 16.0); // step 32 in [256, 448]
        assert_eq!(e2m1_half_step(0.3), 0.25);
        assert_eq!(e2m1_half_step(1.99), 0.25);
        assert_eq!(e2m1_half_step(2.0), 0.5);
        assert_eq!(e2m1_half_step(5.5), 1.0);
    }

    #[test]
    fn error_stats_are_accurate() {
        // 3 rows of 1000: d = x·(1 + 1e-4·sign) so 1 - cos is about 1e-8.
        let x: Vec<f32> = (0..3000).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let d: Vec<f32> = x.iter().enumerate().map(|(i, &v)| v * if i % 2 == 0 { 1.0001 } else { 0.9999 }).collect();
        let b = vec![1.0f32; 1000];
        let mut acc = StatAcc::default();
        for r in 0..3 {
            assert_eq!(acc.add_row(&x[r * 1000..(r + 1) * 1000], &d[r * 1000..(r + 1) * 1000], &b), None);
        }
        let s = acc.finish();
        let (mut xd, mut xx, mut dd, mut ee) = (0f64, 0f64, 0f64, 0f64);
        for (&a, &b) in x.iter().zip(&d) {
            let (a, b) = (a as f64, b as f64);
            xd += a * b;
            xx += a * a;
            dd += b * b;
            ee += (b - a) * (b - a);
        }
        let cos = xd / (xx.sqrt() * dd.sqrt());
        assert_eq!(s.elements, 3000);
        assert!(((1.0 - s.cosine) - (1.0 - cos)).abs() < 1e-3 * (1.0 - cos), "{} vs {cos}", s.cosine);
        assert!((s.relative_l2 - (ee / xx).sqrt()).abs() < 1e-5 * (ee / xx).sqrt());
        // An element over its bound is reported by column.
        let mut tight = b.clone();
        tight[7] = 0.0;
        let mut acc = StatAcc::default();
        assert_eq!(acc.add_row(&x[..1000], &d[..1000], &tight), Some(7));
    }

    #[test]
    fn e8m0_codes() {
        assert_eq!(e8m0_ceil_code(1.0), 127);
        assert_eq!(e8m0_ceil_code(1.0000001), 128); // just above 2^0 → 2^1
        assert_eq!(e8m0_ceil_code(0.75), 127); // ceil(log2 0.75) = 0
        assert_eq!(e8m0_ceil_code(0.5), 126);
        assert_eq!(e8m0_ceil_code(3.0), 129);
        assert_eq!(e8m0_ceil_code(2f32.powi(-127)), 0); // subnormal power of two
        assert_eq!(e8m0_ceil_code(2f32.powi(-127) * 1.5), 1); // subnormal, above 2^-127
        assert_eq!(e8m0_ceil_code(2f32.powi(-126)), 1);
        assert_eq!(e8m0_ceil_code(f32::from_bits(1)), 0); // 2^-149 clamps to 0
        assert_eq!(e8m0_ceil_code(f32::from_bits(3)), 0); // 3·2^-149 → 2^-147 → clamps
        assert_eq!(e8m0_ceil_code(2f32.powi(127)), 254);
        assert_eq!(e8m0_ceil_code(f32::MAX), 254); // 2^128 clamps to 254
        assert_eq!(e8m0_ceil_code(0.0), 0);
        assert_eq!(e8m0_to_f32(0), 0.0);
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(1), 2f32.powi(-126));
        assert_eq!(e8m0_to_f32(254), 2f32.powi(127));
        // Exhaustive consistency with the definition for powers of two ± 1 ulp.
        for k in -126..=126 {
            let p = 2f32.powi(k);
            assert_eq!(e8m0_ceil_code(p) as i32, k + 127);
            assert_eq!(e8m0_ceil_code(f32::from_bits(p.to_bits() + 1)) as i32, (k + 128).min(254));
            assert_eq!(e8m0_ceil_code(f32::from_bits(p.to_bits() - 1)) as i32, (k + 127).max(0));
        }
    }

    #[test]
    fn blocked_layout_matches_to_blocked() {
        // 130 × 6 scales → padded to 256 × 8: two row tiles, two column tiles.
        let (rows, cols) = (130, 6);
        assert_eq!(blocked_shape(rows, cols), (256, 8));
        // to_blocked: view(2, 128, 2, 4).permute(0, 2, 1, 3) → tile (rb, cb),
        // then reshape(-1, 4, 32, 4).transpose(1, 2): (tile, r/32, r%32, c) →
        // (tile, r%32, r/32, c), flattened with strides (512, 16, 4, 1).
        assert_eq!(blocked_index(0, 0, cols), 0);
        assert_eq!(blocked_index(0, 3, cols), 3);
        assert_eq!(blocked_index(32, 0, cols), 4);
        assert_eq!(blocked_index(96, 2, cols), 14);
        assert_eq!(blocked_index(1, 0, cols), 16);
        assert_eq!(blocked_index(33, 1, cols), 21);
        assert_eq!(blocked_index(127, 3, cols), 31 * 16 + 3 * 4 + 3);
        assert_eq!(blocked_index(0, 4, cols), 512); // second column tile
        assert_eq!(blocked_index(5, 5, cols), 512 + 5 * 16 + 1);
        assert_eq!(blocked_index(128, 0, cols), 1024); // second row tile
        assert_eq!(blocked_index(129, 5, cols), 1536 + 16 + 1);
        // The whole map is a bijection onto the padded matrix.
        let src: Vec<u8> = (0..rows * cols).map(|i| (i % 251 + 1) as u8).collect();
        let b = to_blocked(&src, rows, cols);
        assert_eq!(b.len(), 256 * 8);
        assert_eq!(b.iter().filter(|&&v| v != 0).count(), rows * cols);
        assert_eq!(b[21], src[33 * cols + 1]);
        assert_eq!(from_blocked(&b, rows, cols), src);
    }

    #[test]
    fn blocked_index_is_the_permutation_formula() {
        // Recompute to_blocked literally as the chain of reshapes (index
        // arithmetic of the views) for a few shapes and compare.
        for (rows, cols) in [(1, 1), (17, 3), (128, 4), (200, 9), (384, 12)] {
            let (pr, pc) = blocked_shape(rows, cols);
            let (nrb, ncb) = (pr / 128, pc / 4);
            // blocks[rb][cb][r][c] = padded[rb*128 + r][cb*4 + c]; flattened
            // (rb, cb) → n, then [n][i][j][c] with r = i*32 + j, transposed to
            // [n][j][i][c].
            let mut out = vec![usize::MAX; pr * pc];
            for rb in 0..nrb {
                for cb in 0..ncb {
                    let n = rb * ncb + cb;
                    for i in 0..4 {
                        for j in 0..32 {
                            for c in 0..4 {
                                let (r, col) = (rb * 128 + i * 32 + j, cb * 4 + c);
                                out[((n * 32 + j) * 4 + i) * 4 + c] = r * pc + col;
                            }
                        }
                    }
                }
            }
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(out[blocked_index(r, c, cols)], r * pc + c, "{rows}x{cols} ({r},{c})");
                }
            }
        }
    }

    #[test]
    fn nonfinite_is_refused_with_the_name() {
        let mut bytes = vec![0u8; 2 * 10];
        bytes[6..8].copy_from_slice(&0x7FC0u16.to_le_bytes()); // element 3: NaN
        bytes[14..16].copy_from_slice(&0xFF80u16.to_le_bytes()); // element 7: -inf
        let w = WeightView { name: "blocks.0.attn.qkv.weight", dtype: SourceDtype::BF16, rows: 2, cols: 5, bytes: &bytes };
        match finite_amax::<Bf16>(&w) {
            Err(QuantError::NonFinite { name, count, first }) => {
                assert_eq!(name, "blocks.0.attn.qkv.weight");
                assert_eq!((count, first), (2, 3));
            }
            other => panic!("{other:?}"),
        }
        let f = 65504.0f32; // fine in F32
        let w32: Vec<u8> = [f, -f, f32::INFINITY].iter().flat_map(|v| v.to_le_bytes()).collect();
        let w = WeightView { name: "x", dtype: SourceDtype::F32, rows: 1, cols: 3, bytes: &w32 };
        assert!(matches!(finite_amax::<F32>(&w), Err(QuantError::NonFinite { first: 2, count: 1, .. })));
        let wrong = WeightView { name: "y", dtype: SourceDtype::F16, rows: 2, cols: 2, bytes: &bytes[..6] };
        assert!(matches!(finite_amax::<F16>(&wrong), Err(QuantError::Invalid { .. })));
    }
}
