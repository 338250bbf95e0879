//! [`CudaOps`]: the forward-pass operations on one CUDA device, bf16 activations
//! and weights with f32 accumulation.
//!
//! - GEMMs: cuBLASLt for Linear (bias fused as the epilogue), cuBLAS strided
//!   batched GEMMs for attention and the convolution fallback; bf16 in, f32 compute.
//! - Attention: a fused FlashAttention-2 kernel (`kernels/nn/attention.cu`,
//!   bf16 tensor-core MMAs, online softmax in f32) for head dims up to 128
//!   that are multiples of 8; otherwise `S = QK^T / sqrt(D)` in f32 by cuBLAS,
//!   a softmax kernel writing bf16 probabilities, and `O = PV` written straight
//!   into `[B, Nq, H*D]`, heads and queries in chunks whose score buffers stay
//!   under [`ATTENTION_SCORE_BYTES`].
//! - Convolutions: cuDNN 9 (NCHW bf16, f32 compute), or im2col + cuBLAS when
//!   cuDNN cannot be loaded or refuses a shape (one log line, then the fallback for good).
//! - Everything else: the NVRTC program `kernels/common.cuh` + `kernels/nn/*.cu`,
//!   including the fused DiT ops (`ln_modulate`, `qkv_heads`, `concat_act`).
//!   `narrow` of one contiguous, 256-byte aligned range is a view, not a copy.
//! - `QUANTSMITH_PROFILE_OPS=1`: per-op device time from CUDA events
//!   ([`Ops::profile_report`]).
//!
//! Memory: plain `cuMemAlloc` buffers ([`DeviceBuffer`], counted in
//! [`MemStats`]) kept in a size-bucketed free list, so the thousands of
//! temporaries of a forward pass reuse the same allocations step after step.
//! All work runs on one stream, so a buffer freed on the host can be handed to
//! the next op at once. Host data goes up through a pinned staging buffer, so
//! only [`Ops::to_f32`], [`Ops::observers_read`] and uploads over
//! [`STAGING_HALF`] bytes (large weights, at load time) wait for the device.
//!
//! Nothing here links against CUDA: libcuda, libnvrtc, libcublas(Lt) and
//! libcudnn are opened at run time, and [`CudaOps::new`] returns an error
//! (never panics) when one of the required ones is missing.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail, ensure};
use cudarc::cublas::sys as blas;
use cudarc::cublaslt::sys as lt;
use cudarc::cudnn::sys as dnn;
use cudarc::driver::safe::CudaContext;
use cudarc::driver::sys;

use super::{Act, ActQuant, ChannelAxis, ObserverSpec, ObserverStats, Ops, QkvPart};
use crate::formats::{SourceDtype, WeightView};
use crate::gpu::driver::{self, Arg, DeviceBuffer, Event, Kernel, MemStats, Module, PinnedBuffer, Stream, arg};
use crate::gpu::kernels::{self, Compiled, Target};

/// The forward-pass kernel sources, in program order.
pub const SOURCES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../../kernels/common.cuh")),
    ("nn/ops.cu", include_str!("../../../kernels/nn/ops.cu")),
    ("nn/calib.cu", include_str!("../../../kernels/nn/calib.cu")),
    ("nn/attention.cu", include_str!("../../../kernels/nn/attention.cu")),
    ("nn/dit.cu", include_str!("../../../kernels/nn/dit.cu")),
];

/// Padded head dimensions with a fused-attention instance (`nn_flash_attn_d<DP>`).
pub const FLASH_HEAD_DIMS: [usize; 6] = [32, 48, 64, 80, 96, 128];

/// Every kernel entry point of the program.
pub const KERNEL_NAMES: &[&str] = &[
    "nn_f32_to_bf16",
    "nn_f16_to_bf16",
    "nn_act",
    "nn_add",
    "nn_scale",
    "nn_add_bias",
    "nn_geglu",
    "nn_upsample2x",
    "nn_copy_rows",
    "nn_transpose",
    "nn_gather_rows",
    "nn_im2col",
    "nn_group_norm_stats",
    "nn_group_norm_apply",
    "nn_layer_norm",
    "nn_softmax",
    "nn_observe_last",
    "nn_observe_inner",
    "nn_amax",
    "nn_fq_fp8",
    "nn_fq_int8_rows",
    "nn_fq_nvfp4",
    "nn_fq_mxfp8",
    "nn_flash_attn_d32",
    "nn_flash_attn_d48",
    "nn_flash_attn_d64",
    "nn_flash_attn_d80",
    "nn_flash_attn_d96",
    "nn_flash_attn_d128",
    "nn_flash_attn_d64_b4",
    "nn_flash_attn_d128_b3",
    "nn_flash_attn_wide_d32_k64",
    "nn_flash_attn_wide_d48_k64",
    "nn_flash_attn_wide_d64_k64",
    "nn_flash_attn_wide_d80_k64",
    "nn_flash_attn_wide_d96_k64",
    "nn_flash_attn_wide_d128_k64",
    "nn_flash_attn_wide_d128_k32",
    "nn_rms_norm",
    "nn_mul",
    "nn_permute",
    "nn_narrow",
    "nn_modulate",
    "nn_gated_add",
    "nn_rope",
    "nn_softmax_bias",
    "nn_ln_modulate",
    "nn_qkv_heads",
    "nn_concat_act",
];

/// NVRTC options besides the architecture. FMA contraction stays on (the
/// default): only the fake-quantization kernels must match the CPU bit for
/// bit, and they use the `_rn` intrinsics, which are never contracted.
pub const COMPILE_OPTIONS: &[&str] = &["--std=c++17"];

/// Which fused-attention kernel runs (`QUANTSMITH_FLASH_VARIANT`: `narrow`,
/// `narrow-capped`, `wide` or `wide-k64`; unset: [`FlashVariant::DEFAULT`]).
/// Measured on an H200 (BENCHMARKS.md, "Fused attention"): `Wide` is the fastest
/// at FLUX's head dim 128 and SD3's 64; the others stay for that comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashVariant {
    /// 64 queries per block, one 16-row tile per warp.
    Narrow,
    /// As `Narrow`, registers capped for 4 (head dim 64) or 3 (128) resident blocks.
    NarrowCapped,
    /// 128 queries per block, two 16-row tiles per warp; 32-key tiles at head
    /// dim 128 (fewer registers for the scores), 64-key tiles below.
    Wide,
    /// As `Wide` with 64-key tiles at every head dim.
    WideK64,
}

impl FlashVariant {
    pub const DEFAULT: FlashVariant = FlashVariant::Wide;
    pub const ALL: [FlashVariant; 4] = [FlashVariant::Narrow, FlashVariant::NarrowCapped, FlashVariant::Wide, FlashVariant::WideK64];

    fn from_env() -> FlashVariant {
        match std::env::var("QUANTSMITH_FLASH_VARIANT").as_deref() {
            Ok("narrow") => FlashVariant::Narrow,
            Ok("narrow-capped") => FlashVariant::NarrowCapped,
            Ok("wide-k64") => FlashVariant::WideK64,
            _ => FlashVariant::DEFAULT,
        }
    }
}

/// Dynamic shared memory of a wide fused-attention block: the 128-query tile and
/// one key and one value tile, rows of `dp + 8` bf16.
fn flash_wide_smem(dp: usize, key_tile: usize) -> u32 {
    ((128 + 2 * key_tile) * (dp + 8) * 2) as u32
}

/// Upper bound on one attention chunk's score buffers (f32 scores + bf16 probabilities).
pub const ATTENTION_SCORE_BYTES: usize = 1 << 30;

/// Upper bound on the im2col buffer of one convolution chunk (fallback path).
const IM2COL_BYTES: usize = 1 << 30;

/// cuBLASLt workspace (NVIDIA recommends 32 MiB on Hopper).
const LT_WORKSPACE: usize = 32 << 20;

/// Largest cuDNN workspace an algorithm may ask for.
const CUDNN_WORKSPACE_LIMIT: usize = 512 << 20;

const THREADS: u32 = 256;

/// Each half of the pinned upload buffer. Host data up to this size is staged
/// there, so its copy is asynchronous (from pageable memory the driver would
/// wait for the stream first); larger uploads (big weights) go straight from
/// pageable memory.
pub const STAGING_HALF: usize = 4 << 20;

/// The whole program as NVRTC sees it.
pub fn program_source() -> String {
    kernels::join_sources(SOURCES)
}

/// Compiles the forward-pass kernels for `target` (CI compiles them to PTX without a GPU).
pub fn compile(target: Target) -> Result<Compiled> {
    let options: Vec<String> = COMPILE_OPTIONS.iter().map(|s| s.to_string()).collect();
    kernels::compile_source("quantsmith_nn.cu", &program_source(), target, &options)
}

fn cublas_loadable() -> bool {
    // SAFETY: only tries to dlopen the candidate names.
    crate::error::catching(|| unsafe { blas::is_culib_present() && lt::is_culib_present() }).unwrap_or(false)
}

fn cudnn_loadable() -> bool {
    // SAFETY: only tries to dlopen the candidate names.
    crate::error::catching(|| unsafe { dnn::is_culib_present() }).unwrap_or(false)
}

// ---------------------------------------------------------------------------
// Device memory: size-bucketed free list
// ---------------------------------------------------------------------------

/// Bucket size for a request: the next 2^k or 1.5 * 2^k (at most a third wasted).
fn bucket(bytes: usize) -> usize {
    let b = bytes.max(512);
    let p = b.next_power_of_two();
    if p / 4 * 3 >= b { p / 4 * 3 } else { p }
}

struct Pool {
    ctx: Arc<CudaContext>,
    stats: Arc<MemStats>,
    free: Mutex<HashMap<usize, Vec<DeviceBuffer>>>,
}

impl Pool {
    fn alloc(self: &Arc<Self>, bytes: usize) -> Result<Buf> {
        let size = bucket(bytes);
        if let Some(b) = self.free.lock().unwrap().get_mut(&size).and_then(|v| v.pop()) {
            return Ok(Buf { dev: Some(b), pool: self.clone() });
        }
        let dev = match DeviceBuffer::new(&self.ctx, &self.stats, size) {
            Ok(b) => b,
            Err(_) => {
                // Out of memory with buffers cached for other sizes: give them back and retry.
                self.free.lock().unwrap().clear();
                DeviceBuffer::new(&self.ctx, &self.stats, size)
                    .with_context(|| format!("allocating {} MiB for a tensor", size.div_ceil(1 << 20)))?
            }
        };
        Ok(Buf { dev: Some(dev), pool: self.clone() })
    }
}

/// A pooled device buffer; dropping it returns the memory to the pool.
struct Buf {
    dev: Option<DeviceBuffer>,
    pool: Arc<Pool>,
}

impl Buf {
    fn ptr(&self) -> u64 {
        self.dev.as_ref().expect("live buffer").ptr()
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(d) = self.dev.take() {
            self.pool.free.lock().unwrap().entry(d.len()).or_default().push(d);
        }
    }
}

/// A bf16 tensor on the device (row-major). Cloning shares the buffer. A tensor
/// may be a view of a contiguous range of another's buffer (`off` bytes in; see
/// [`Ops::narrow`]): ops never write their inputs, so sharing is safe.
#[derive(Clone)]
pub struct CudaTensor {
    buf: Arc<Buf>,
    off: usize,
    shape: Vec<usize>,
}

impl CudaTensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn ptr(&self) -> u64 {
        self.buf.ptr() + self.off as u64
    }
}

impl std::fmt::Debug for CudaTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaTensor(bf16 {:?})", self.shape)
    }
}

// ---------------------------------------------------------------------------
// cuBLAS / cuBLASLt
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct LinearKey {
    m: usize,
    n: usize,
    k: usize,
    bias: bool,
}

/// A cuBLASLt matmul for one Linear shape: descriptors and the chosen algorithm.
struct LtPlan {
    desc: lt::cublasLtMatmulDesc_t,
    a: lt::cublasLtMatrixLayout_t,
    b: lt::cublasLtMatrixLayout_t,
    c: lt::cublasLtMatrixLayout_t,
    algo: lt::cublasLtMatmulAlgo_t,
}

impl Drop for LtPlan {
    fn drop(&mut self) {
        // SAFETY: created once by `Blas::linear_plan`, destroyed once.
        unsafe {
            let _ = lt::cublasLtMatrixLayoutDestroy(self.a);
            let _ = lt::cublasLtMatrixLayoutDestroy(self.b);
            let _ = lt::cublasLtMatrixLayoutDestroy(self.c);
            let _ = lt::cublasLtMatmulDescDestroy(self.desc);
        }
    }
}

struct Blas {
    handle: blas::cublasHandle_t,
    lt: lt::cublasLtHandle_t,
    workspace: Buf,
    /// `None`: cuBLASLt found no algorithm, use cublasGemmEx + the bias kernel.
    plans: HashMap<LinearKey, Option<LtPlan>>,
}

fn blas_err(what: &str, e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow!("{what}: {e:?}")
}

impl Blas {
    fn new(stream: &Stream, workspace: Buf) -> Result<Blas> {
        let handle = cudarc::cublas::result::create_handle().map_err(|e| blas_err("cublasCreate", e))?;
        let lt_handle = match cudarc::cublaslt::result::create_handle() {
            Ok(h) => h,
            Err(e) => {
                // SAFETY: created above.
                unsafe {
                    let _ = blas::cublasDestroy_v2(handle);
                }
                return Err(blas_err("cublasLtCreate", e));
            }
        };
        let me = Blas { handle, lt: lt_handle, workspace, plans: HashMap::new() };
        // SAFETY: live handle and stream; the workspace outlives the handle (same struct).
        unsafe {
            blas::cublasSetStream_v2(me.handle, stream.raw() as blas::cudaStream_t).result().map_err(|e| blas_err("cublasSetStream", e))?;
            blas::cublasSetWorkspace_v2(me.handle, me.workspace.ptr() as *mut c_void, LT_WORKSPACE)
                .result()
                .map_err(|e| blas_err("cublasSetWorkspace", e))?;
        }
        Ok(me)
    }

    /// The cuBLASLt plan for `out[m, n] = x[m, k] @ w[n, k]^T (+ bias[n])`, row-major.
    /// In cuBLAS's column-major terms: `D (n x m) = op_T(W: k x n) * X (k x m)`.
    fn linear_plan(&mut self, key: LinearKey) -> Option<&LtPlan> {
        if !self.plans.contains_key(&key) {
            let plan = self.make_linear_plan(key).ok();
            self.plans.insert(key, plan);
        }
        self.plans.get(&key).and_then(|p| p.as_ref())
    }

    fn make_linear_plan(&self, key: LinearKey) -> Result<LtPlan> {
        use cudarc::cublaslt::result as r;
        let LinearKey { m, n, k, bias } = key;
        let bf = lt::cudaDataType::CUDA_R_16BF;
        let desc = r::create_matmul_desc(lt::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt::cudaDataType::CUDA_R_32F)
            .map_err(|e| blas_err("cublasLtMatmulDescCreate", e))?;
        let a = r::create_matrix_layout(bf, k as u64, n as u64, k as i64);
        let b = r::create_matrix_layout(bf, k as u64, m as u64, k as i64);
        let c = r::create_matrix_layout(bf, n as u64, m as u64, n as i64);
        let (a, b, c) = match (a, b, c) {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            _ => {
                // SAFETY: created above.
                unsafe {
                    let _ = lt::cublasLtMatmulDescDestroy(desc);
                }
                bail!("cublasLtMatrixLayoutCreate failed");
            }
        };
        // From here `plan` owns the descriptors; its Drop frees them on every error path.
        let mut plan = LtPlan { desc, a, b, c, algo: unsafe { std::mem::zeroed() } };
        let transpose: i32 = 1; // CUBLAS_OP_T
        // SAFETY: live descriptors; attribute buffers of the documented sizes.
        unsafe {
            r::set_matmul_desc_attribute(
                desc,
                lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &transpose as *const i32 as *const c_void,
                4,
            )
            .map_err(|e| blas_err("CUBLASLT_MATMUL_DESC_TRANSA", e))?;
            if bias {
                let epi = lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
                r::set_matmul_desc_attribute(
                    desc,
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &epi as *const _ as *const c_void,
                    std::mem::size_of_val(&epi),
                )
                .map_err(|e| blas_err("CUBLASLT_MATMUL_DESC_EPILOGUE", e))?;
            }
            let pref = r::create_matmul_pref().map_err(|e| blas_err("cublasLtMatmulPreferenceCreate", e))?;
            let ws = LT_WORKSPACE as u64;
            let heur = r::set_matmul_pref_attribute(
                pref,
                lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )
            .and_then(|_| r::get_matmul_algo_heuristic(self.lt, desc, a, b, c, c, pref));
            let _ = r::destroy_matmul_pref(pref);
            plan.algo = heur.map_err(|e| blas_err("cublasLtMatmulAlgoGetHeuristic", e))?.algo;
        }
        Ok(plan)
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: handles created in `new`, destroyed once.
        unsafe {
            let _ = lt::cublasLtDestroy(self.lt);
            let _ = blas::cublasDestroy_v2(self.handle);
        }
    }
}

/// One strided batched GEMM in cuBLAS's column-major terms (see `CudaOps::gemm_batched`).
struct Gemm {
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    a: u64,
    lda: usize,
    stride_a: usize,
    b: u64,
    ldb: usize,
    stride_b: usize,
    c: u64,
    ldc: usize,
    stride_c: usize,
    /// Output in f32 (attention scores) instead of bf16.
    c_f32: bool,
    batch: usize,
    alpha: f32,
}

// ---------------------------------------------------------------------------
// cuDNN
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ConvKey {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    ksize: usize,
    stride: usize,
    pad: usize,
}

struct ConvPlan {
    x: dnn::cudnnTensorDescriptor_t,
    w: dnn::cudnnFilterDescriptor_t,
    conv: dnn::cudnnConvolutionDescriptor_t,
    y: dnn::cudnnTensorDescriptor_t,
    algo: dnn::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
}

impl Drop for ConvPlan {
    fn drop(&mut self) {
        // SAFETY: descriptors created by `Dnn::plan` (null ones are skipped), destroyed once.
        unsafe {
            if !self.x.is_null() {
                let _ = dnn::cudnnDestroyTensorDescriptor(self.x);
            }
            if !self.y.is_null() {
                let _ = dnn::cudnnDestroyTensorDescriptor(self.y);
            }
            if !self.w.is_null() {
                let _ = dnn::cudnnDestroyFilterDescriptor(self.w);
            }
            if !self.conv.is_null() {
                let _ = dnn::cudnnDestroyConvolutionDescriptor(self.conv);
            }
        }
    }
}

struct Dnn {
    handle: dnn::cudnnHandle_t,
    version: usize,
    plans: HashMap<ConvKey, ConvPlan>,
}

fn dnn_err(what: &str, e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow!("{what}: {e:?}")
}

impl Dnn {
    fn new(stream: &Stream) -> Result<Dnn> {
        // SAFETY: plain library calls; the handle is destroyed on failure.
        unsafe {
            let version = dnn::cudnnGetVersion();
            ensure!(version >= 90000, "cuDNN {version} found, 9.x needed");
            let mut handle = std::ptr::null_mut();
            dnn::cudnnCreate(&mut handle).result().map_err(|e| dnn_err("cudnnCreate", e))?;
            if let Err(e) = dnn::cudnnSetStream(handle, stream.raw() as dnn::cudaStream_t).result() {
                let _ = dnn::cudnnDestroy(handle);
                return Err(dnn_err("cudnnSetStream", e));
            }
            Ok(Dnn { handle, version, plans: HashMap::new() })
        }
    }

    fn plan(&mut self, key: ConvKey) -> Result<&ConvPlan> {
        if !self.plans.contains_key(&key) {
            let p = self.make_plan(key)?;
            self.plans.insert(key, p);
        }
        Ok(&self.plans[&key])
    }

    fn make_plan(&self, key: ConvKey) -> Result<ConvPlan> {
        use dnn::cudnnDataType_t::{CUDNN_DATA_BFLOAT16 as BF16, CUDNN_DATA_FLOAT as F32};
        use dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW as NCHW;
        let ConvKey { n, c, h, w, k, ksize, stride, pad } = key;
        let ho = (h + 2 * pad - ksize) / stride + 1;
        let wo = (w + 2 * pad - ksize) / stride + 1;
        let i = |v: usize| v as i32;
        let mut p = ConvPlan {
            x: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            algo: dnn::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            workspace: 0,
        };
        // SAFETY: descriptors created here and owned by `p` (freed by its Drop on error).
        unsafe {
            dnn::cudnnCreateTensorDescriptor(&mut p.x).result().map_err(|e| dnn_err("cudnnCreateTensorDescriptor", e))?;
            dnn::cudnnCreateTensorDescriptor(&mut p.y).result().map_err(|e| dnn_err("cudnnCreateTensorDescriptor", e))?;
            dnn::cudnnCreateFilterDescriptor(&mut p.w).result().map_err(|e| dnn_err("cudnnCreateFilterDescriptor", e))?;
            dnn::cudnnCreateConvolutionDescriptor(&mut p.conv).result().map_err(|e| dnn_err("cudnnCreateConvolutionDescriptor", e))?;
            dnn::cudnnSetTensor4dDescriptor(p.x, NCHW, BF16, i(n), i(c), i(h), i(w))
                .result()
                .map_err(|e| dnn_err("cudnnSetTensor4dDescriptor(x)", e))?;
            dnn::cudnnSetTensor4dDescriptor(p.y, NCHW, BF16, i(n), i(k), i(ho), i(wo))
                .result()
                .map_err(|e| dnn_err("cudnnSetTensor4dDescriptor(y)", e))?;
            dnn::cudnnSetFilter4dDescriptor(p.w, BF16, NCHW, i(k), i(c), i(ksize), i(ksize))
                .result()
                .map_err(|e| dnn_err("cudnnSetFilter4dDescriptor", e))?;
            dnn::cudnnSetConvolution2dDescriptor(
                p.conv,
                i(pad),
                i(pad),
                i(stride),
                i(stride),
                1,
                1,
                dnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                F32,
            )
            .result()
            .map_err(|e| dnn_err("cudnnSetConvolution2dDescriptor", e))?;
            dnn::cudnnSetConvolutionMathType(p.conv, dnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)
                .result()
                .map_err(|e| dnn_err("cudnnSetConvolutionMathType", e))?;
            let mut perf: [dnn::cudnnConvolutionFwdAlgoPerf_t; 8] = std::mem::zeroed();
            let mut count = 0i32;
            dnn::cudnnGetConvolutionForwardAlgorithm_v7(
                self.handle,
                p.x,
                p.w,
                p.conv,
                p.y,
                perf.len() as i32,
                &mut count,
                perf.as_mut_ptr(),
            )
            .result()
            .map_err(|e| dnn_err("cudnnGetConvolutionForwardAlgorithm_v7", e))?;
            let best = perf[..count.max(0) as usize]
                .iter()
                .find(|r| r.status == dnn::cudnnStatus_t::CUDNN_STATUS_SUCCESS && r.memory <= CUDNN_WORKSPACE_LIMIT)
                .ok_or_else(|| anyhow!("cuDNN offers no bf16 NCHW algorithm for this convolution"))?;
            p.algo = best.algo;
            let mut ws = 0usize;
            dnn::cudnnGetConvolutionForwardWorkspaceSize(self.handle, p.x, p.w, p.conv, p.y, p.algo, &mut ws)
                .result()
                .map_err(|e| dnn_err("cudnnGetConvolutionForwardWorkspaceSize", e))?;
            p.workspace = ws;
        }
        Ok(p)
    }
}

impl Drop for Dnn {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created in `new`, destroyed once.
        unsafe {
            let _ = dnn::cudnnDestroy(self.handle);
        }
    }
}

// ---------------------------------------------------------------------------
// Uploads
// ---------------------------------------------------------------------------

/// Two pinned halves used in turn: uploads fill the current half; before a
/// half is refilled, the host waits for the event recorded after its last
/// copy (which has normally long passed).
struct Staging {
    halves: [PinnedBuffer; 2],
    drained: [Event; 2],
    cur: usize,
    pos: usize,
}

// ---------------------------------------------------------------------------
// Observers
// ---------------------------------------------------------------------------

/// Device layout: one u32 array, the channel amax of every slot first (slot s
/// at `chan_off[s]`), then `steps` step amaxes per slot. Values are |x| as f32 bits.
#[derive(Default)]
struct Observers {
    buf: Option<Buf>,
    specs: Vec<ObserverSpec>,
    chan_off: Vec<usize>,
    total_ch: usize,
    steps: usize,
    step: usize,
    calls: Vec<u64>,
}

// ---------------------------------------------------------------------------
// Op profiler
// ---------------------------------------------------------------------------

/// With `QUANTSMITH_PROFILE_OPS=1`: a pair of CUDA events around every top-level
/// [`Ops`] call, read back by [`Ops::profile_report`]. Device time between the
/// events includes any gap the host leaves before the op's first launch, so ops
/// that wait on the host (uploads, `to_f32`) show that wait too. Unset, the
/// backend holds `None` and each op pays one branch.
#[derive(Default)]
struct OpProfiler {
    /// Nesting of profiled calls (an op built from other ops is timed once, as itself).
    depth: usize,
    spare: Vec<Event>,
    pending: Vec<(&'static str, Event, Event)>,
    /// By op: calls and milliseconds, in first-seen order.
    totals: Vec<(&'static str, u64, f64)>,
}

/// Closes one profiled call when dropped.
struct ProfScope<'a> {
    ops: &'a CudaOps,
    name: &'static str,
    start: Option<Event>,
}

impl Drop for ProfScope<'_> {
    fn drop(&mut self) {
        let Some(p) = &self.ops.profiler else { return };
        let mut p = p.lock().unwrap();
        p.depth -= 1;
        if let Some(start) = self.start.take() {
            let end = match p.spare.pop() {
                Some(e) => e,
                None => match Event::new(&self.ops.ctx) {
                    Ok(e) => e,
                    Err(_) => return,
                },
            };
            if end.record(&self.ops.stream).is_ok() {
                p.pending.push((self.name, start, end));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The backend
// ---------------------------------------------------------------------------

struct Kernels {
    f32_to_bf16: Kernel,
    f16_to_bf16: Kernel,
    act: Kernel,
    add: Kernel,
    scale: Kernel,
    add_bias: Kernel,
    geglu: Kernel,
    upsample2x: Kernel,
    copy_rows: Kernel,
    transpose: Kernel,
    gather_rows: Kernel,
    im2col: Kernel,
    group_norm_stats: Kernel,
    group_norm_apply: Kernel,
    layer_norm: Kernel,
    softmax: Kernel,
    observe_last: Kernel,
    observe_inner: Kernel,
    amax: Kernel,
    fq_fp8: Kernel,
    fq_int8_rows: Kernel,
    fq_nvfp4: Kernel,
    fq_mxfp8: Kernel,
    /// By [`FLASH_HEAD_DIMS`].
    flash: [Kernel; 6],
    /// The 64-query kernel with registers capped for more resident blocks (head dims 64, 128).
    flash_capped: [Kernel; 2],
    /// The 128-query variant, by [`FLASH_HEAD_DIMS`], 64-key tiles.
    flash_wide: [Kernel; 6],
    /// The 128-query variant with 32-key tiles at head dim 128.
    flash_wide_d128_k32: Kernel,
    rms_norm: Kernel,
    mul: Kernel,
    permute: Kernel,
    narrow: Kernel,
    modulate: Kernel,
    gated_add: Kernel,
    rope: Kernel,
    softmax_bias: Kernel,
    ln_modulate: Kernel,
    qkv_heads: Kernel,
    concat_act: Kernel,
}

impl Kernels {
    fn load(m: &Module) -> Result<Kernels> {
        Ok(Kernels {
            f32_to_bf16: m.kernel("nn_f32_to_bf16")?,
            f16_to_bf16: m.kernel("nn_f16_to_bf16")?,
            act: m.kernel("nn_act")?,
            add: m.kernel("nn_add")?,
            scale: m.kernel("nn_scale")?,
            add_bias: m.kernel("nn_add_bias")?,
            geglu: m.kernel("nn_geglu")?,
            upsample2x: m.kernel("nn_upsample2x")?,
            copy_rows: m.kernel("nn_copy_rows")?,
            transpose: m.kernel("nn_transpose")?,
            gather_rows: m.kernel("nn_gather_rows")?,
            im2col: m.kernel("nn_im2col")?,
            group_norm_stats: m.kernel("nn_group_norm_stats")?,
            group_norm_apply: m.kernel("nn_group_norm_apply")?,
            layer_norm: m.kernel("nn_layer_norm")?,
            softmax: m.kernel("nn_softmax")?,
            observe_last: m.kernel("nn_observe_last")?,
            observe_inner: m.kernel("nn_observe_inner")?,
            amax: m.kernel("nn_amax")?,
            fq_fp8: m.kernel("nn_fq_fp8")?,
            fq_int8_rows: m.kernel("nn_fq_int8_rows")?,
            fq_nvfp4: m.kernel("nn_fq_nvfp4")?,
            fq_mxfp8: m.kernel("nn_fq_mxfp8")?,
            flash: [
                m.kernel("nn_flash_attn_d32")?,
                m.kernel("nn_flash_attn_d48")?,
                m.kernel("nn_flash_attn_d64")?,
                m.kernel("nn_flash_attn_d80")?,
                m.kernel("nn_flash_attn_d96")?,
                m.kernel("nn_flash_attn_d128")?,
            ],
            flash_capped: [m.kernel("nn_flash_attn_d64_b4")?, m.kernel("nn_flash_attn_d128_b3")?],
            flash_wide: [
                m.kernel("nn_flash_attn_wide_d32_k64")?,
                m.kernel("nn_flash_attn_wide_d48_k64")?,
                m.kernel("nn_flash_attn_wide_d64_k64")?,
                m.kernel("nn_flash_attn_wide_d80_k64")?,
                m.kernel("nn_flash_attn_wide_d96_k64")?,
                m.kernel("nn_flash_attn_wide_d128_k64")?,
            ],
            flash_wide_d128_k32: m.kernel("nn_flash_attn_wide_d128_k32")?,
            rms_norm: m.kernel("nn_rms_norm")?,
            mul: m.kernel("nn_mul")?,
            permute: m.kernel("nn_permute")?,
            narrow: m.kernel("nn_narrow")?,
            modulate: m.kernel("nn_modulate")?,
            gated_add: m.kernel("nn_gated_add")?,
            rope: m.kernel("nn_rope")?,
            softmax_bias: m.kernel("nn_softmax_bias")?,
            ln_modulate: m.kernel("nn_ln_modulate")?,
            qkv_heads: m.kernel("nn_qkv_heads")?,
            concat_act: m.kernel("nn_concat_act")?,
        })
    }
}

/// `nn_act`'s and `nn_concat_act`'s activation code (kernels/nn/ops.cu `NN_ACT_*`).
fn act_kind(act: Act) -> i32 {
    match act {
        Act::Silu => 0,
        Act::Gelu => 1,
        Act::QuickGelu => 2,
        Act::GeluTanh => 3,
    }
}

/// `nn_permute`'s argument (kernels/nn/dit.cu `NnPermute`): output dims and, per
/// output dim, the input stride it walks.
#[repr(C)]
struct NnPermute {
    dims: [i64; 6],
    strides: [i64; 6],
    rank: i32,
}

/// [`Ops`] on one CUDA device, bf16 tensors ([`CudaTensor`]).
pub struct CudaOps {
    name: String,
    /// Grid-stride kernels launch at most this many blocks.
    max_blocks: u32,
    k: Kernels,
    blas: Mutex<Blas>,
    dnn: Mutex<Option<Dnn>>,
    use_cudnn: AtomicBool,
    attention_bytes: AtomicUsize,
    use_flash: AtomicBool,
    /// A [`FlashVariant`] as its index in `FlashVariant::ALL`.
    flash_variant: AtomicUsize,
    obs: Mutex<Observers>,
    profiler: Option<Mutex<OpProfiler>>,
    staging: Mutex<Staging>,
    /// One u32 for the dynamic FP8 amax.
    amax_word: Buf,
    pool: Arc<Pool>,
    stats: Arc<MemStats>,
    stream: Stream,
    _module: Module,
    ctx: Arc<CudaContext>,
}

// SAFETY: the raw cuBLAS/cuDNN handles are only used under their mutexes, with
// the context bound to the calling thread; kernels and buffers are plain
// driver objects, and all work is ordered on the one stream.
unsafe impl Send for CudaOps {}
unsafe impl Sync for CudaOps {}

impl CudaOps {
    /// Opens GPU `ordinal`: loads the driver, cuBLAS(Lt) and (if present)
    /// cuDNN, compiles the kernels with NVRTC. An error, never a panic, when
    /// any required library or the GPU is missing.
    pub fn new(ordinal: usize) -> Result<CudaOps> {
        if !crate::gpu::driver_available() {
            bail!("no CUDA driver found (libcuda.so is not loadable)");
        }
        let count = crate::gpu::device_count()?;
        if ordinal >= count {
            bail!("GPU {ordinal} requested but the driver reports {count} device(s)");
        }
        if !kernels::nvrtc_available() {
            bail!(
                "libnvrtc (CUDA 13 NVRTC) is not loadable, so the kernels cannot be compiled; install the CUDA \
                 toolkit's NVRTC or `pip install nvidia-cuda-nvrtc==13.0.88` and add its nvidia/cu13/lib to LD_LIBRARY_PATH"
            );
        }
        if !cublas_loadable() {
            bail!("libcublas.so.13 / libcublasLt.so.13 are not loadable (add the CUDA 13 lib64 directory to LD_LIBRARY_PATH)");
        }
        crate::gpu::no_panic("CUDA forward-pass backend initialisation", || Self::init(ordinal))
    }

    fn init(ordinal: usize) -> Result<CudaOps> {
        let ctx = CudaContext::new(ordinal).map_err(|e| driver::err("context creation", e))?;
        let cc = ctx.compute_capability().map_err(|e| driver::err("compute capability", e))?;
        ensure!(cc.0 >= 8, "bf16 kernels need compute capability 8.0 or newer, the GPU has {}.{}", cc.0, cc.1);
        let gpu = ctx.name().map_err(|e| driver::err("device name", e))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver::err("multiprocessor count", e))?
            .max(1) as u32;
        let compiled = compile(Target::Cubin { major: cc.0, minor: cc.1 })
            .with_context(|| format!("compiling the forward-pass kernels for sm_{}{}", cc.0, cc.1))?;
        let module = Module::load(&ctx, &compiled.image).context("loading the forward-pass kernels")?;
        let k = Kernels::load(&module)?;
        for (kernel, &dp) in k.flash_wide.iter().zip(&FLASH_HEAD_DIMS) {
            kernel.set_max_dynamic_shared(flash_wide_smem(dp, 64))?;
        }
        k.flash_wide_d128_k32.set_max_dynamic_shared(flash_wide_smem(128, 32))?;
        let stats = Arc::new(MemStats::default());
        let pool = Arc::new(Pool { ctx: ctx.clone(), stats: stats.clone(), free: Mutex::new(HashMap::new()) });
        let stream = Stream::new(&ctx)?;
        let blas = Blas::new(&stream, pool.alloc(LT_WORKSPACE)?)?;
        let dnn = if std::env::var_os("QUANTSMITH_NO_CUDNN").is_some() {
            tracing::info!("QUANTSMITH_NO_CUDNN is set: convolutions use im2col + cuBLAS");
            None
        } else if !cudnn_loadable() {
            tracing::warn!("libcudnn.so.9 is not loadable: convolutions use im2col + cuBLAS (slower, more memory)");
            None
        } else {
            match crate::gpu::no_panic("cuDNN", || Dnn::new(&stream)) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::warn!("cuDNN unusable ({e:#}): convolutions use im2col + cuBLAS");
                    None
                }
            }
        };
        let conv_name = match &dnn {
            Some(d) => format!("cuDNN {}.{}.{}", d.version / 10000, d.version % 10000 / 100, d.version % 100),
            None => "im2col convolutions".into(),
        };
        let name = format!("cuda:{ordinal} {gpu} (sm_{}{}, bf16, cuBLASLt, {conv_name})", cc.0, cc.1);
        let amax_word = pool.alloc(4)?;
        let staging = Staging {
            halves: [PinnedBuffer::new(&ctx, STAGING_HALF, true)?, PinnedBuffer::new(&ctx, STAGING_HALF, true)?],
            drained: [Event::new_blocking(&ctx)?, Event::new_blocking(&ctx)?],
            cur: 0,
            pos: 0,
        };
        let use_cudnn = AtomicBool::new(dnn.is_some());
        Ok(CudaOps {
            name,
            max_blocks: sms * 16,
            k,
            blas: Mutex::new(blas),
            dnn: Mutex::new(dnn),
            use_cudnn,
            attention_bytes: AtomicUsize::new(ATTENTION_SCORE_BYTES),
            use_flash: AtomicBool::new(std::env::var_os("QUANTSMITH_NO_FLASH_ATTENTION").is_none()),
            flash_variant: AtomicUsize::new(FlashVariant::ALL.iter().position(|&v| v == FlashVariant::from_env()).unwrap_or(0)),
            obs: Mutex::new(Observers::default()),
            profiler: std::env::var_os("QUANTSMITH_PROFILE_OPS")
                .is_some_and(|v| !v.is_empty() && v != "0")
                .then(|| Mutex::new(OpProfiler::default())),
            staging: Mutex::new(staging),
            amax_word,
            pool,
            stats,
            stream,
            _module: module,
            ctx,
        })
    }

    /// Device memory counters (current and peak bytes of this backend's buffers).
    pub fn mem_stats(&self) -> &Arc<MemStats> {
        &self.stats
    }

    /// Whether convolutions run on cuDNN (else im2col + cuBLAS).
    pub fn uses_cudnn(&self) -> bool {
        self.use_cudnn.load(Ordering::Relaxed)
    }

    /// Switches convolutions to cuDNN (when it was loaded) or to the im2col fallback.
    pub fn set_cudnn(&self, on: bool) {
        let have = self.dnn.lock().unwrap().is_some();
        self.use_cudnn.store(on && have, Ordering::Relaxed);
    }

    /// Caps one attention chunk's score buffers (default [`ATTENTION_SCORE_BYTES`];
    /// tests lower it to exercise the chunking).
    pub fn set_attention_chunk_bytes(&self, bytes: usize) {
        self.attention_bytes.store(bytes.max(1), Ordering::Relaxed);
    }

    /// Switches attention between the fused kernel (head dims up to 128, multiples
    /// of 8) and cuBLAS GEMMs around a softmax kernel (any head dim).
    pub fn set_flash_attention(&self, on: bool) {
        self.use_flash.store(on, Ordering::Relaxed);
    }

    /// Picks the fused-attention kernel (tests run each against the reference).
    pub fn set_flash_variant(&self, variant: FlashVariant) {
        let i = FlashVariant::ALL.iter().position(|&v| v == variant).unwrap_or(0);
        self.flash_variant.store(i, Ordering::Relaxed);
    }

    /// The fused-attention kernel in use.
    pub fn flash_variant(&self) -> FlashVariant {
        FlashVariant::ALL[self.flash_variant.load(Ordering::Relaxed)]
    }

    /// Waits for every queued operation (for timing).
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.stream.synchronize()
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver::err("cuCtxSetCurrent", e))
    }

    fn alloc(&self, shape: &[usize]) -> Result<CudaTensor> {
        let n: usize = shape.iter().product();
        Ok(CudaTensor { buf: Arc::new(self.pool.alloc(n * 2)?), off: 0, shape: shape.to_vec() })
    }

    fn blocks(&self, work_items: usize) -> u32 {
        (work_items.div_ceil(THREADS as usize) as u64).clamp(1, self.max_blocks as u64) as u32
    }

    /// Grid-stride launch over `work_items` items.
    fn run(&self, k: Kernel, work_items: usize, args: &mut [Arg]) -> Result<()> {
        if work_items == 0 {
            return Ok(());
        }
        // SAFETY: every caller passes arguments matching the kernel's signature,
        // pointing into live buffers of the sizes the kernel reads and writes.
        unsafe { k.launch(&self.stream, self.blocks(work_items), THREADS, args) }
    }

    fn upload(&self, dst: u64, bytes: &[u8]) -> Result<()> {
        let len = bytes.len();
        if len == 0 {
            return Ok(());
        }
        if len > STAGING_HALF {
            // SAFETY: `dst` holds at least `len` bytes. From pageable memory the
            // call returns once the source has been staged, so `bytes` may go after it.
            return unsafe { self.stream.htod(dst, bytes.as_ptr(), len) };
        }
        let mut st = self.staging.lock().unwrap();
        if st.pos + len > STAGING_HALF {
            let cur = st.cur;
            st.drained[cur].record(&self.stream)?;
            st.cur ^= 1;
            let next = st.cur;
            st.drained[next].synchronize()?;
            st.pos = 0;
        }
        let (cur, pos) = (st.cur, st.pos);
        // SAFETY: no copy from this half is in flight: the stream passed its
        // `drained` event (or it was never recorded) before the half was reused.
        unsafe { st.halves[cur].slice_mut(pos..pos + len) }.copy_from_slice(bytes);
        // SAFETY: pinned source that stays untouched until the half's event has passed; `dst` holds `len` bytes.
        unsafe { self.stream.htod(dst, st.halves[cur].as_ptr().add(pos), len)? };
        st.pos = (pos + len).next_multiple_of(256);
        Ok(())
    }

    fn upload_u32(&self, v: &[u32]) -> Result<Buf> {
        let b = self.pool.alloc(v.len() * 4)?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.upload(b.ptr(), &bytes)?;
        Ok(b)
    }

    /// A strided batched GEMM, column-major: `C_i = alpha * op(A_i) op(B_i)`.
    fn gemm_batched(&self, g: &Gemm) -> Result<()> {
        let bf = blas::cudaDataType::CUDA_R_16BF;
        let op = |t: bool| if t { blas::cublasOperation_t::CUBLAS_OP_T } else { blas::cublasOperation_t::CUBLAS_OP_N };
        let beta = 0.0f32;
        let blas = self.blas.lock().unwrap();
        // SAFETY: the pointers, leading dimensions and strides describe live buffers (checked by the callers).
        unsafe {
            blas::cublasGemmStridedBatchedEx(
                blas.handle,
                op(g.trans_a),
                op(g.trans_b),
                g.m as i32,
                g.n as i32,
                g.k as i32,
                &g.alpha as *const f32 as *const c_void,
                g.a as *const c_void,
                bf,
                g.lda as i32,
                g.stride_a as i64,
                g.b as *const c_void,
                bf,
                g.ldb as i32,
                g.stride_b as i64,
                &beta as *const f32 as *const c_void,
                g.c as *mut c_void,
                if g.c_f32 { blas::cudaDataType::CUDA_R_32F } else { bf },
                g.ldc as i32,
                g.stride_c as i64,
                g.batch as i32,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .result()
        .map_err(|e| blas_err("cublasGemmStridedBatchedEx", e))
    }

    /// `y = x + b[(i / inner) % cmod]`, in place allowed.
    fn add_bias(&self, x: u64, b: u64, y: u64, n: usize, inner: usize, cmod: usize) -> Result<()> {
        let (n, inner, cmod) = (n as i64, inner as i64, cmod as i64);
        self.run(self.k.add_bias, n as usize, &mut [arg(&x), arg(&b), arg(&y), arg(&n), arg(&inner), arg(&cmod)])
    }

    fn conv_cudnn(&self, x: &CudaTensor, w: &CudaTensor, key: ConvKey, y: &CudaTensor) -> Result<()> {
        let mut guard = self.dnn.lock().unwrap();
        let d = guard.as_mut().ok_or_else(|| anyhow!("cuDNN not loaded"))?;
        let handle = d.handle;
        let plan = d.plan(key)?;
        let ws = if plan.workspace > 0 { Some(self.pool.alloc(plan.workspace)?) } else { None };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: descriptors match the buffers' shapes (the plan was made for this key).
        unsafe {
            dnn::cudnnConvolutionForward(
                handle,
                &alpha as *const f32 as *const c_void,
                plan.x,
                x.ptr() as *const c_void,
                plan.w,
                w.ptr() as *const c_void,
                plan.conv,
                plan.algo,
                ws.as_ref().map_or(std::ptr::null_mut(), |b| b.ptr() as *mut c_void),
                plan.workspace,
                &beta as *const f32 as *const c_void,
                plan.y,
                y.ptr() as *mut c_void,
            )
        }
        .result()
        .map_err(|e| dnn_err("cudnnConvolutionForward", e))
    }

    /// im2col + one batched GEMM per chunk of images.
    fn conv_im2col(&self, x: &CudaTensor, w: &CudaTensor, key: ConvKey, y: &CudaTensor) -> Result<()> {
        let ConvKey { n, c, h, w: wd, k, ksize, stride, pad } = key;
        let ho = (h + 2 * pad - ksize) / stride + 1;
        let wo = (wd + 2 * pad - ksize) / stride + 1;
        let hw = ho * wo;
        let kk = c * ksize * ksize;
        let direct = ksize == 1 && stride == 1 && pad == 0;
        let per_image = kk * hw * 2;
        let chunk = (IM2COL_BYTES / per_image.max(1)).clamp(1, n);
        let col = if direct { None } else { Some(self.pool.alloc(chunk * per_image)?) };
        let mut i0 = 0;
        while i0 < n {
            let cn = chunk.min(n - i0);
            let src = x.ptr() + (i0 * c * h * wd * 2) as u64;
            let a = match &col {
                None => src,
                Some(col) => {
                    let (ni, ci, hi, wi, ki, si, pi, hoi, woi) =
                        (cn as i64, c as i64, h as i64, wd as i64, ksize as i32, stride as i32, pad as i32, ho as i64, wo as i64);
                    let colp = col.ptr();
                    self.run(
                        self.k.im2col,
                        cn * kk * hw,
                        &mut [
                            arg(&src),
                            arg(&colp),
                            arg(&ni),
                            arg(&ci),
                            arg(&hi),
                            arg(&wi),
                            arg(&ki),
                            arg(&si),
                            arg(&pi),
                            arg(&hoi),
                            arg(&woi),
                        ],
                    )?;
                    colp
                }
            };
            // out[img] (K x HW, row-major) = W (K x kk) * col[img] (kk x HW); column-major:
            // out^T (HW x K) = col^T (HW x kk) * W^T (kk x K).
            self.gemm_batched(&Gemm {
                trans_a: false,
                trans_b: false,
                m: hw,
                n: k,
                k: kk,
                a,
                lda: hw,
                stride_a: kk * hw,
                b: w.ptr(),
                ldb: kk,
                stride_b: 0,
                c: y.ptr() + (i0 * k * hw * 2) as u64,
                ldc: hw,
                stride_c: k * hw,
                c_f32: false,
                batch: cn,
                alpha: 1.0,
            })?;
            i0 += cn;
        }
        Ok(())
    }

    fn elementwise(&self, k: Kernel, x: &CudaTensor, extra: Option<&CudaTensor>, s: Option<f32>, kind: Option<i32>) -> Result<CudaTensor> {
        self.bind()?;
        let y = self.alloc(&x.shape)?;
        let n = x.numel() as i64;
        let (xp, yp) = (x.ptr(), y.ptr());
        let work = (x.numel() / 8).max(1);
        match (extra, s, kind) {
            (Some(b), _, _) => {
                let bp = b.ptr();
                self.run(k, work, &mut [arg(&xp), arg(&bp), arg(&yp), arg(&n)])?
            }
            (None, Some(s), _) => self.run(k, work, &mut [arg(&xp), arg(&yp), arg(&n), arg(&s)])?,
            (None, None, Some(kind)) => self.run(k, work, &mut [arg(&xp), arg(&yp), arg(&n), arg(&kind)])?,
            (None, None, None) => unreachable!("every elementwise kernel takes an operand"),
        }
        Ok(y)
    }

    /// `x` as `[rows, cols]` with `cols` its last dimension.
    fn rows_cols(x: &CudaTensor) -> Result<(usize, usize)> {
        let cols = *x.shape.last().ok_or_else(|| anyhow!("a 0-d tensor has no channels"))?;
        ensure!(cols > 0, "empty last dimension in {:?}", x.shape);
        Ok((x.numel() / cols, cols))
    }
}

impl Ops for CudaOps {
    type Tensor = CudaTensor;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn from_f32(&self, shape: &[usize], data: &[f32]) -> Result<CudaTensor> {
        let _p = self.prof("from_f32");
        let n: usize = shape.iter().product();
        ensure!(n == data.len(), "from_f32: shape {shape:?} holds {n} values, {} given", data.len());
        self.bind()?;
        let t = self.alloc(shape)?;
        let bytes: Vec<u8> = data.iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes()).collect();
        self.upload(t.ptr(), &bytes)?;
        Ok(t)
    }

    fn weight(&self, shape: &[usize], view: &WeightView<'_>) -> Result<CudaTensor> {
        let _p = self.prof("weight");
        let n: usize = shape.iter().product();
        ensure!(
            n == view.rows * view.cols,
            "weight {}: shape {shape:?} does not hold its {} x {} elements",
            view.name,
            view.rows,
            view.cols
        );
        ensure!(
            view.bytes.len() == n * view.dtype.size(),
            "weight {}: {} bytes for {n} {:?} elements",
            view.name,
            view.bytes.len(),
            view.dtype
        );
        self.bind()?;
        let t = self.alloc(shape)?;
        match view.dtype {
            SourceDtype::BF16 => self.upload(t.ptr(), view.bytes)?,
            SourceDtype::F16 | SourceDtype::F32 => {
                let raw = self.pool.alloc(view.bytes.len())?;
                self.upload(raw.ptr(), view.bytes)?;
                let k = if view.dtype == SourceDtype::F32 { self.k.f32_to_bf16 } else { self.k.f16_to_bf16 };
                let (src, dst, n) = (raw.ptr(), t.ptr(), n as i64);
                self.run(k, n as usize, &mut [arg(&src), arg(&dst), arg(&n)])?;
            }
        }
        Ok(t)
    }

    fn to_f32(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        let _p = self.prof("to_f32");
        self.bind()?;
        let n = t.numel();
        let mut bits = vec![0u16; n];
        if n > 0 {
            // SAFETY: the tensor's buffer holds n bf16 values; `bits` has room for them.
            unsafe { self.stream.dtoh(bits.as_mut_ptr() as *mut u8, t.ptr(), n * 2)? };
        }
        self.stream.synchronize()?;
        Ok(bits.into_iter().map(|b| half::bf16::from_bits(b).to_f32()).collect())
    }

    fn shape(&self, t: &CudaTensor) -> Vec<usize> {
        t.shape.clone()
    }

    fn reshape(&self, t: &CudaTensor, shape: &[usize]) -> Result<CudaTensor> {
        let n: usize = shape.iter().product();
        ensure!(n == t.numel(), "reshape {:?} -> {shape:?}: element counts differ", t.shape);
        Ok(CudaTensor { buf: t.buf.clone(), off: t.off, shape: shape.to_vec() })
    }

    fn linear(&self, x: &CudaTensor, w: &CudaTensor, b: Option<&CudaTensor>) -> Result<CudaTensor> {
        let _p = self.prof("linear");
        ensure!(w.shape.len() == 2, "linear: weight shape {:?} is not [out, in]", w.shape);
        let (nout, kin) = (w.shape[0], w.shape[1]);
        let (m, k) = Self::rows_cols(x)?;
        ensure!(k == kin, "linear: input {:?} against weight {:?}", x.shape, w.shape);
        if let Some(b) = b {
            ensure!(b.numel() == nout, "linear: bias {:?} for {nout} outputs", b.shape);
        }
        self.bind()?;
        let mut shape = x.shape.clone();
        *shape.last_mut().unwrap() = nout;
        let y = self.alloc(&shape)?;
        if m == 0 || nout == 0 {
            return Ok(y);
        }
        let key = LinearKey { m, n: nout, k, bias: b.is_some() };
        let mut blas = self.blas.lock().unwrap();
        let (lt_handle, ws) = (blas.lt, blas.workspace.ptr());
        if let Some(plan) = blas.linear_plan(key) {
            let (alpha, beta) = (1.0f32, 0.0f32);
            // SAFETY: live plan; the shapes were checked above; the bias pointer
            // attribute is read at launch time, under the same lock.
            unsafe {
                if let Some(b) = b {
                    let bp = b.ptr();
                    cudarc::cublaslt::result::set_matmul_desc_attribute(
                        plan.desc,
                        lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                        &bp as *const u64 as *const c_void,
                        8,
                    )
                    .map_err(|e| blas_err("CUBLASLT_MATMUL_DESC_BIAS_POINTER", e))?;
                }
                cudarc::cublaslt::result::matmul(
                    lt_handle,
                    plan.desc,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    w.ptr() as *const c_void,
                    plan.a,
                    x.ptr() as *const c_void,
                    plan.b,
                    y.ptr() as *const c_void,
                    plan.c,
                    y.ptr() as *mut c_void,
                    plan.c,
                    &plan.algo,
                    ws as *mut c_void,
                    LT_WORKSPACE,
                    self.stream.raw() as lt::cudaStream_t,
                )
                .map_err(|e| blas_err("cublasLtMatmul", e))?;
            }
            return Ok(y);
        }
        drop(blas);
        // No cuBLASLt algorithm for this shape: plain cuBLAS, then the bias kernel.
        self.gemm_batched(&Gemm {
            trans_a: true,
            trans_b: false,
            m: nout,
            n: m,
            k,
            a: w.ptr(),
            lda: k,
            stride_a: 0,
            b: x.ptr(),
            ldb: k,
            stride_b: 0,
            c: y.ptr(),
            ldc: nout,
            stride_c: 0,
            c_f32: false,
            batch: 1,
            alpha: 1.0,
        })?;
        if let Some(b) = b {
            self.add_bias(y.ptr(), b.ptr(), y.ptr(), y.numel(), 1, nout)?;
        }
        Ok(y)
    }

    fn conv2d(&self, x: &CudaTensor, w: &CudaTensor, b: Option<&CudaTensor>, stride: usize, padding: usize) -> Result<CudaTensor> {
        let _p = self.prof("conv2d");
        ensure!(x.shape.len() == 4 && w.shape.len() == 4, "conv2d: input {:?}, weight {:?} must be 4-D", x.shape, w.shape);
        let (n, c, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
        let (k, ksize) = (w.shape[0], w.shape[2]);
        ensure!(w.shape[1] == c && w.shape[3] == ksize, "conv2d: weight {:?} for input {:?}", w.shape, x.shape);
        ensure!(stride >= 1 && h + 2 * padding >= ksize && wd + 2 * padding >= ksize, "conv2d: bad geometry");
        if let Some(b) = b {
            ensure!(b.numel() == k, "conv2d: bias {:?} for {k} channels", b.shape);
        }
        self.bind()?;
        let ho = (h + 2 * padding - ksize) / stride + 1;
        let wo = (wd + 2 * padding - ksize) / stride + 1;
        let y = self.alloc(&[n, k, ho, wo])?;
        if y.numel() == 0 {
            return Ok(y);
        }
        let key = ConvKey { n, c, h, w: wd, k, ksize, stride, pad: padding };
        let mut done = false;
        if self.use_cudnn.load(Ordering::Relaxed) {
            match crate::gpu::no_panic("cuDNN convolution", || self.conv_cudnn(x, w, key, &y)) {
                Ok(()) => done = true,
                Err(e) => {
                    tracing::warn!("cuDNN convolution failed ({e:#}); convolutions use im2col + cuBLAS from now on");
                    self.use_cudnn.store(false, Ordering::Relaxed);
                }
            }
        }
        if !done {
            self.conv_im2col(x, w, key, &y)?;
        }
        if let Some(b) = b {
            self.add_bias(y.ptr(), b.ptr(), y.ptr(), y.numel(), ho * wo, k)?;
        }
        Ok(y)
    }

    fn group_norm(&self, x: &CudaTensor, groups: usize, w: &CudaTensor, b: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        let _p = self.prof("group_norm");
        ensure!(x.shape.len() >= 2, "group_norm: input {:?} has no channel axis", x.shape);
        let (n, c) = (x.shape[0], x.shape[1]);
        ensure!(groups > 0 && c % groups == 0, "group_norm: {c} channels in {groups} groups");
        ensure!(w.numel() == c && b.numel() == c, "group_norm: affine sizes for {c} channels");
        self.bind()?;
        let y = self.alloc(&x.shape)?;
        let hw: usize = x.shape[2..].iter().product();
        let cg = c / groups;
        let group_len = cg * hw;
        if y.numel() == 0 {
            return Ok(y);
        }
        // Enough blocks to fill the GPU even for batch 1 at 32 groups.
        const CHUNK: usize = 8192;
        let chunks = group_len.div_ceil(CHUNK);
        let nblocks = n * groups * chunks;
        let part = self.pool.alloc(nblocks * 12)?;
        let (xp, pp, yp, wp, bp) = (x.ptr(), part.ptr(), y.ptr(), w.ptr(), b.ptr());
        let (gl, ch, chs, gi, cgi, hwi) = (group_len as i64, CHUNK as i64, chunks as i32, groups as i32, cg as i32, hw as i64);
        // SAFETY: one block per chunk; arguments match the kernels' signatures.
        unsafe {
            self.k.group_norm_stats.launch(
                &self.stream,
                nblocks as u32,
                THREADS,
                &mut [arg(&xp), arg(&pp), arg(&gl), arg(&ch), arg(&chs)],
            )?;
            self.k.group_norm_apply.launch(
                &self.stream,
                nblocks as u32,
                THREADS,
                &mut [
                    arg(&xp),
                    arg(&pp),
                    arg(&wp),
                    arg(&bp),
                    arg(&yp),
                    arg(&gl),
                    arg(&ch),
                    arg(&chs),
                    arg(&gi),
                    arg(&cgi),
                    arg(&hwi),
                    arg(&eps),
                ],
            )?;
        }
        Ok(y)
    }

    fn layer_norm(&self, x: &CudaTensor, w: &CudaTensor, b: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        let _p = self.prof("layer_norm");
        let (rows, cols) = Self::rows_cols(x)?;
        ensure!(w.numel() == cols && b.numel() == cols, "layer_norm: affine sizes for {cols} channels");
        self.bind()?;
        let y = self.alloc(&x.shape)?;
        let (xp, wp, bp, yp, r, c) = (x.ptr(), w.ptr(), b.ptr(), y.ptr(), rows as i64, cols as i64);
        let blocks = (rows * 32).div_ceil(THREADS as usize) as u32;
        // SAFETY: one warp a row; arguments match the kernel.
        unsafe {
            self.k.layer_norm.launch(
                &self.stream,
                blocks,
                THREADS,
                &mut [arg(&xp), arg(&wp), arg(&bp), arg(&yp), arg(&r), arg(&c), arg(&eps)],
            )?;
        }
        Ok(y)
    }

    fn attention(&self, q: &CudaTensor, k: &CudaTensor, v: &CudaTensor, heads: usize, causal: bool) -> Result<CudaTensor> {
        let _p = self.prof("attention");
        ensure!(q.shape.len() == 3 && k.shape.len() == 3, "attention: q {:?}, k {:?} must be [B, N, H*D]", q.shape, k.shape);
        ensure!(k.shape == v.shape, "attention: k {:?} and v {:?} differ", k.shape, v.shape);
        let (b, nq, hd) = (q.shape[0], q.shape[1], q.shape[2]);
        let nk = k.shape[1];
        ensure!(k.shape[0] == b && k.shape[2] == hd, "attention: q {:?} against k {:?}", q.shape, k.shape);
        ensure!(heads > 0 && hd % heads == 0, "attention: {hd} channels in {heads} heads");
        self.bind()?;
        let d = hd / heads;
        let out = self.alloc(&q.shape)?;
        if out.numel() == 0 || nk == 0 {
            return Ok(out);
        }
        let flash = FLASH_HEAD_DIMS.iter().position(|&dp| d <= dp).filter(|_| d.is_multiple_of(8));
        if let (true, Some(i)) = (self.use_flash.load(Ordering::Relaxed), flash) {
            ensure!(b * heads <= 65535, "attention: {b} x {heads} (batch x heads) exceed the grid");
            let (qp, kp, vp, op) = (q.ptr(), k.ptr(), v.ptr(), out.ptr());
            let (nqi, nki, hi, di) = (nq as i64, nk as i64, heads as i32, d as i32);
            let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
            let causal_i = causal as i32;
            let dp = FLASH_HEAD_DIMS[i];
            let (kernel, queries, smem) = match self.flash_variant() {
                FlashVariant::NarrowCapped if dp == 64 || dp == 128 => (&self.k.flash_capped[usize::from(dp == 128)], 64, 0),
                FlashVariant::Narrow | FlashVariant::NarrowCapped => (&self.k.flash[i], 64, 0),
                FlashVariant::Wide if dp == 128 => (&self.k.flash_wide_d128_k32, 128, flash_wide_smem(dp, 32)),
                FlashVariant::Wide | FlashVariant::WideK64 => (&self.k.flash_wide[i], 128, flash_wide_smem(dp, 64)),
            };
            let grid = (nq.div_ceil(queries) as u32, (b * heads) as u32);
            // SAFETY: one block of 128 threads per `queries` queries of a (batch, head),
            // with the dynamic shared memory its variant declares; arguments match the kernel.
            unsafe {
                kernel.launch_2d_shared(
                    &self.stream,
                    grid,
                    128,
                    smem,
                    &mut [
                        arg(&qp),
                        arg(&kp),
                        arg(&vp),
                        arg(&op),
                        arg(&nqi),
                        arg(&nki),
                        arg(&hi),
                        arg(&di),
                        arg(&scale_log2),
                        arg(&causal_i),
                    ],
                )?;
            }
            return Ok(out);
        }
        self.attention_unfused(q, k, v, heads, causal, 1.0 / (d as f32).sqrt(), None, &out)?;
        Ok(out)
    }

    fn act(&self, x: &CudaTensor, act: Act) -> Result<CudaTensor> {
        let _p = self.prof("act");
        self.elementwise(self.k.act, x, None, None, Some(act_kind(act)))
    }

    fn geglu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let _p = self.prof("geglu");
        let (rows, cols) = Self::rows_cols(x)?;
        ensure!(cols % 2 == 0, "geglu: odd last dimension in {:?}", x.shape);
        self.bind()?;
        let mut shape = x.shape.clone();
        *shape.last_mut().unwrap() = cols / 2;
        let y = self.alloc(&shape)?;
        let (xp, yp, r, f) = (x.ptr(), y.ptr(), rows as i64, (cols / 2) as i64);
        self.run(self.k.geglu, y.numel(), &mut [arg(&xp), arg(&yp), arg(&r), arg(&f)])?;
        Ok(y)
    }

    fn add(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        let _p = self.prof("add");
        ensure!(a.shape == b.shape, "add: shapes {:?} and {:?} differ", a.shape, b.shape);
        self.elementwise(self.k.add, a, Some(b), None, None)
    }

    fn scale(&self, a: &CudaTensor, s: f32) -> Result<CudaTensor> {
        let _p = self.prof("scale");
        self.elementwise(self.k.scale, a, None, Some(s), None)
    }

    fn add_channel_bias(&self, x: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        let _p = self.prof("add_channel_bias");
        ensure!(x.shape.len() >= 2, "add_channel_bias: input {:?} has no channel axis", x.shape);
        let (n, c) = (x.shape[0], x.shape[1]);
        ensure!(b.numel() == n * c, "add_channel_bias: bias {:?} for input {:?}", b.shape, x.shape);
        self.bind()?;
        let y = self.alloc(&x.shape)?;
        let hw: usize = x.shape[2..].iter().product();
        self.add_bias(x.ptr(), b.ptr(), y.ptr(), y.numel(), hw.max(1), n * c)?;
        Ok(y)
    }

    fn upsample_nearest2x(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let _p = self.prof("upsample_nearest2x");
        ensure!(x.shape.len() == 4, "upsample_nearest2x: input {:?} is not NCHW", x.shape);
        self.bind()?;
        let (n, c, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
        let y = self.alloc(&[n, c, 2 * h, 2 * w])?;
        let (xp, yp, nc, hi, wi) = (x.ptr(), y.ptr(), (n * c) as i64, h as i64, w as i64);
        self.run(self.k.upsample2x, y.numel(), &mut [arg(&xp), arg(&yp), arg(&nc), arg(&hi), arg(&wi)])?;
        Ok(y)
    }

    fn concat(&self, xs: &[&CudaTensor], dim: usize) -> Result<CudaTensor> {
        let _p = self.prof("concat");
        let first = xs.first().ok_or_else(|| anyhow!("concat of nothing"))?;
        let rank = first.shape.len();
        ensure!(dim < rank, "concat: dim {dim} of a rank-{rank} tensor");
        let mut total = 0;
        for x in xs {
            ensure!(
                x.shape.len() == rank && x.shape.iter().enumerate().all(|(i, &s)| i == dim || s == first.shape[i]),
                "concat along {dim}: shapes {:?} and {:?}",
                first.shape,
                x.shape
            );
            total += x.shape[dim];
        }
        self.bind()?;
        let mut shape = first.shape.clone();
        shape[dim] = total;
        let y = self.alloc(&shape)?;
        let outer: usize = shape[..dim].iter().product();
        let inner: usize = shape[dim + 1..].iter().product();
        let mut off = 0;
        for x in xs {
            let len = x.shape[dim] * inner;
            let (sp, yp, rows, l, pitch, o) = (x.ptr(), y.ptr(), outer as i64, len as i64, (total * inner) as i64, off as i64);
            self.run(self.k.copy_rows, outer * len, &mut [arg(&sp), arg(&yp), arg(&rows), arg(&l), arg(&pitch), arg(&o)])?;
            off += len;
        }
        Ok(y)
    }

    fn to_tokens(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let _p = self.prof("to_tokens");
        ensure!(x.shape.len() == 4, "to_tokens: input {:?} is not NCHW", x.shape);
        let (n, c, hw) = (x.shape[0], x.shape[1], x.shape[2] * x.shape[3]);
        self.transpose(x, n, c, hw, &[n, hw, c])
    }

    fn from_tokens(&self, x: &CudaTensor, h: usize, w: usize) -> Result<CudaTensor> {
        let _p = self.prof("from_tokens");
        ensure!(x.shape.len() == 3 && x.shape[1] == h * w, "from_tokens: input {:?} is not [N, {h}*{w}, C]", x.shape);
        let (n, c) = (x.shape[0], x.shape[2]);
        self.transpose(x, n, h * w, c, &[n, c, h, w])
    }

    fn embedding(&self, table: &CudaTensor, ids: &[u32]) -> Result<CudaTensor> {
        let _p = self.prof("embedding");
        ensure!(table.shape.len() == 2, "embedding: table {:?} is not [V, C]", table.shape);
        let (v, c) = (table.shape[0], table.shape[1]);
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
            bail!("embedding: id {bad} outside the table of {v} rows");
        }
        self.gather(table, ids, c)
    }

    fn select_tokens(&self, x: &CudaTensor, index: &[usize]) -> Result<CudaTensor> {
        let _p = self.prof("select_tokens");
        ensure!(x.shape.len() == 3, "select_tokens: input {:?} is not [B, N, C]", x.shape);
        let (b, n, c) = (x.shape[0], x.shape[1], x.shape[2]);
        ensure!(index.len() == b, "select_tokens: {} indices for batch {b}", index.len());
        let rows: Vec<u32> = index
            .iter()
            .enumerate()
            .map(|(bi, &i)| {
                ensure!(i < n, "select_tokens: token {i} of {n}");
                Ok((bi * n + i) as u32)
            })
            .collect::<Result<_>>()?;
        self.gather(x, &rows, c)
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        let _p = self.prof("rms_norm");
        let (rows, cols) = Self::rows_cols(x)?;
        ensure!(w.shape == [cols], "rms_norm: weight {:?} is not [{cols}]", w.shape);
        self.bind()?;
        let y = self.alloc(&x.shape)?;
        if rows == 0 {
            return Ok(y);
        }
        let (xp, wp, yp, r, c) = (x.ptr(), w.ptr(), y.ptr(), rows as i64, cols as i64);
        let blocks = (rows * 32).div_ceil(THREADS as usize) as u32;
        // SAFETY: one warp a row; arguments match the kernel.
        unsafe {
            self.k.rms_norm.launch(&self.stream, blocks, THREADS, &mut [arg(&xp), arg(&wp), arg(&yp), arg(&r), arg(&c), arg(&eps)])?;
        }
        Ok(y)
    }

    fn mul(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        let _p = self.prof("mul");
        ensure!(a.shape == b.shape, "mul: shapes {:?} and {:?} differ", a.shape, b.shape);
        self.elementwise(self.k.mul, a, Some(b), None, None)
    }

    fn narrow(&self, x: &CudaTensor, dim: usize, start: usize, len: usize) -> Result<CudaTensor> {
        let _p = self.prof("narrow");
        ensure!(dim < x.shape.len(), "narrow: dimension {dim} of a {}-d tensor", x.shape.len());
        ensure!(
            start.checked_add(len).is_some_and(|e| e <= x.shape[dim]),
            "narrow: {start}..{start}+{len} is outside dimension {dim} of {:?}",
            x.shape
        );
        let mut shape = x.shape.clone();
        shape[dim] = len;
        let outer: usize = x.shape[..dim].iter().product();
        let inner: usize = x.shape[dim + 1..].iter().product();
        // One contiguous range (e.g. tokens of batch 1, adaLN chunks): a view, no copy,
        // when it starts 256-byte aligned (what cuBLASLt's algorithms and the
        // 16-byte vector loads of every kernel assume of a tensor).
        let off_bytes = x.off + start * inner * 2;
        if outer == 1 && off_bytes.is_multiple_of(256) {
            return Ok(CudaTensor { buf: x.buf.clone(), off: off_bytes, shape });
        }
        self.bind()?;
        let y = self.alloc(&shape)?;
        let (xp, yp) = (x.ptr(), y.ptr());
        let (o, row, l, off) = (outer as i64, (x.shape[dim] * inner) as i64, (len * inner) as i64, (start * inner) as i64);
        self.run(self.k.narrow, y.numel(), &mut [arg(&xp), arg(&yp), arg(&o), arg(&row), arg(&l), arg(&off)])?;
        Ok(y)
    }

    fn permute(&self, x: &CudaTensor, perm: &[usize]) -> Result<CudaTensor> {
        let _p = self.prof("permute");
        super::cpu::check_perm(&x.shape, perm)?;
        self.bind()?;
        let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
        let y = self.alloc(&shape)?;
        let mut in_strides = vec![1usize; x.shape.len()];
        for i in (0..x.shape.len().saturating_sub(1)).rev() {
            in_strides[i] = in_strides[i + 1] * x.shape[i + 1];
        }
        let mut p = NnPermute { dims: [1; 6], strides: [0; 6], rank: perm.len() as i32 };
        for (k, &src) in perm.iter().enumerate() {
            p.dims[k] = shape[k] as i64;
            p.strides[k] = in_strides[src] as i64;
        }
        let (xp, yp, n) = (x.ptr(), y.ptr(), y.numel() as i64);
        self.run(self.k.permute, y.numel(), &mut [arg(&xp), arg(&yp), arg(&n), arg(&p)])?;
        Ok(y)
    }

    fn modulate(&self, x: &CudaTensor, shift: &CudaTensor, scale: &CudaTensor) -> Result<CudaTensor> {
        let _p = self.prof("modulate");
        ensure!(x.shape.len() == 3, "modulate: x {:?} is not [B, N, C]", x.shape);
        let (b, n, c) = (x.shape[0], x.shape[1], x.shape[2]);
        ensure!(shift.shape == [b, c], "modulate: shift {:?} is not [{b}, {c}]", shift.shape);
        ensure!(scale.shape == [b, c], "modulate: scale {:?} is not [{b}, {c}]", scale.shape);
        self.bind()?;
        let y = self.alloc(&x.shape)?;
        let (xp, sh, sc, yp) = (x.ptr(), shift.ptr(), scale.ptr(), y.ptr());
        let (total, tokens, cols) = (y.numel() as i64, n as i64, c as i64);
        self.run(self.k.modulate, y.numel(), &mut [arg(&xp), arg(&sh), arg(&sc), arg(&yp), arg(&total), arg(&tokens), arg(&cols)])?;
        Ok(y)
    }

    fn gated_add(&self, x: &CudaTensor, gate: &CudaTensor, y: &CudaTensor) -> Result<CudaTensor> {
        let _p = self.prof("gated_add");
        ensure!(x.shape.len() == 3, "gated_add: x {:?} is not [B, N, C]", x.shape);
        ensure!(y.shape == x.shape, "gated_add: y {:?} differs from x {:?}", y.shape, x.shape);
        let (b, n, c) = (x.shape[0], x.shape[1], x.shape[2]);
        ensure!(gate.shape == [b, c], "gated_add: gate {:?} is not [{b}, {c}]", gate.shape);
        self.bind()?;
        let out = self.alloc(&x.shape)?;
        let (xp, gp, yp, op) = (x.ptr(), gate.ptr(), y.ptr(), out.ptr());
        let (total, tokens, cols) = (out.numel() as i64, n as i64, c as i64);
        self.run(self.k.gated_add, out.numel(), &mut [arg(&xp), arg(&gp), arg(&yp), arg(&op), arg(&total), arg(&tokens), arg(&cols)])?;
        Ok(out)
    }

    fn rope(&self, x: &CudaTensor, cos: &CudaTensor, sin: &CudaTensor, heads: usize) -> Result<CudaTensor> {
        let _p = self.prof("rope");
        ensure!(x.shape.len() == 3, "rope: x {:?} is not [B, N, heads*D]", x.shape);
        let (n, width) = (x.shape[1], x.shape[2]);
        ensure!(heads > 0 && width % heads == 0, "rope: width {width} does not split into {heads} heads");
        let d = width / heads;
        ensure!(d.is_multiple_of(2), "rope: head dimension {d} is odd");
        let half = d / 2;
        ensure!(cos.shape == [n, half], "rope: cos {:?} is not [{n}, {half}]", cos.shape);
        ensure!(sin.shape == [n, half], "rope: sin {:?} is not [{n}, {half}]", sin.shape);
        self.bind()?;
        let y = self.alloc(&x.shape)?;
        let pairs = y.numel() / 2;
        let (xp, cp, sp, yp) = (x.ptr(), cos.ptr(), sin.ptr(), y.ptr());
        let (pi, ti, hi, hf) = (pairs as i64, n as i64, heads as i32, half as i32);
        self.run(self.k.rope, pairs, &mut [arg(&xp), arg(&cp), arg(&sp), arg(&yp), arg(&pi), arg(&ti), arg(&hi), arg(&hf)])?;
        Ok(y)
    }

    fn attention_biased(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        heads: usize,
        bias: &CudaTensor,
        scale: f32,
    ) -> Result<CudaTensor> {
        let _p = self.prof("attention_biased");
        ensure!(q.shape.len() == 3 && k.shape.len() == 3, "attention_biased: q {:?}, k {:?} must be [B, N, H*D]", q.shape, k.shape);
        ensure!(k.shape == v.shape, "attention_biased: k {:?} and v {:?} differ", k.shape, v.shape);
        let (b, nq, hd) = (q.shape[0], q.shape[1], q.shape[2]);
        let nk = k.shape[1];
        ensure!(k.shape[0] == b && k.shape[2] == hd, "attention_biased: q {:?} against k {:?}", q.shape, k.shape);
        ensure!(heads > 0 && hd % heads == 0, "attention_biased: {hd} channels in {heads} heads");
        ensure!(nk > 0, "attention_biased: no keys");
        ensure!(bias.shape == [heads, nq, nk], "attention_biased: bias {:?} is not [{heads}, {nq}, {nk}]", bias.shape);
        self.bind()?;
        let out = self.alloc(&q.shape)?;
        if out.numel() == 0 {
            return Ok(out);
        }
        self.attention_unfused(q, k, v, heads, false, scale, Some(bias), &out)?;
        Ok(out)
    }

    fn ln_modulate(&self, x: &CudaTensor, shift: &CudaTensor, scale: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        let _p = self.prof("ln_modulate");
        ensure!(x.shape.len() == 3, "ln_modulate: x {:?} is not [B, N, C]", x.shape);
        let (b, n, c) = (x.shape[0], x.shape[1], x.shape[2]);
        ensure!(shift.shape == [b, c], "ln_modulate: shift {:?} is not [{b}, {c}]", shift.shape);
        ensure!(scale.shape == [b, c], "ln_modulate: scale {:?} is not [{b}, {c}]", scale.shape);
        if c % 8 != 0 {
            return super::composed::ln_modulate(self, x, shift, scale, eps);
        }
        self.bind()?;
        let y = self.alloc(&x.shape)?;
        let rows = b * n;
        if rows == 0 {
            return Ok(y);
        }
        let (xp, sh, sc, yp) = (x.ptr(), shift.ptr(), scale.ptr(), y.ptr());
        let (r, t, ci) = (rows as i64, n as i64, c as i64);
        let blocks = (rows * 32).div_ceil(THREADS as usize) as u32;
        // SAFETY: one warp a row; arguments match the kernel; C % 8 == 0 and
        // every tensor starts 256-byte aligned, so the 16-byte accesses are aligned.
        unsafe {
            self.k.ln_modulate.launch(
                &self.stream,
                blocks,
                THREADS,
                &mut [arg(&xp), arg(&sh), arg(&sc), arg(&yp), arg(&r), arg(&t), arg(&ci), arg(&eps)],
            )?;
        }
        Ok(y)
    }

    fn qkv_heads(
        &self,
        parts: &[QkvPart<'_, CudaTensor>],
        width: usize,
        heads: usize,
        eps: f32,
        rope: Option<(&CudaTensor, &CudaTensor)>,
    ) -> Result<[CudaTensor; 3]> {
        let _p = self.prof("qkv_heads");
        ensure!(!parts.is_empty(), "qkv_heads: no parts");
        ensure!(heads > 0 && width.is_multiple_of(heads), "qkv_heads: width {width} does not split into {heads} heads");
        let d = width / heads;
        if !d.is_multiple_of(2) || d > 256 {
            return super::composed::qkv_heads(self, parts, width, heads, eps, rope);
        }
        let b = parts[0].qkv.shape.first().copied().unwrap_or(0);
        let mut total = 0;
        for p in parts {
            let s = &p.qkv.shape;
            ensure!(s.len() == 3 && s[0] == b && s[2] >= 3 * width, "qkv_heads: part {s:?} is not [{b}, N, >= 3 x {width}]");
            for w in [p.q_norm, p.k_norm].into_iter().flatten() {
                ensure!(w.shape == [d], "qkv_heads: norm {:?} is not [{d}]", w.shape);
            }
            total += s[1];
        }
        if let Some((cos, sin)) = rope {
            ensure!(cos.shape == [total, d / 2], "qkv_heads: cos {:?} is not [{total}, {}]", cos.shape, d / 2);
            ensure!(sin.shape == [total, d / 2], "qkv_heads: sin {:?} is not [{total}, {}]", sin.shape, d / 2);
        }
        self.bind()?;
        let out = [self.alloc(&[b, total, width])?, self.alloc(&[b, total, width])?, self.alloc(&[b, total, width])?];
        let (qp, kp, vp) = (out[0].ptr(), out[1].ptr(), out[2].ptr());
        let (cp, sp) = rope.map_or((0u64, 0u64), |(c, s)| (c.ptr(), s.ptr()));
        let (nt, hi, di) = (total as i64, heads as i32, d as i32);
        let mut off = 0usize;
        for p in parts {
            let (n, ld) = (p.qkv.shape[1], p.qkv.shape[2]);
            let rows = b * n;
            if rows > 0 {
                let (src, ldi, ri, ni, oi) = (p.qkv.ptr(), ld as i64, rows as i64, n as i64, off as i64);
                let (qw, kw) = (p.q_norm.map_or(0u64, |w| w.ptr()), p.k_norm.map_or(0u64, |w| w.ptr()));
                let blocks = (3 * rows * heads * 32).div_ceil(THREADS as usize);
                ensure!(blocks <= i32::MAX as usize, "qkv_heads: {rows} rows x {heads} heads exceed the grid");
                // SAFETY: one warp a (q/k/v, row, head); arguments match the kernel; the
                // pair (u32) accesses are aligned: d, ld and every offset are even.
                unsafe {
                    self.k.qkv_heads.launch(
                        &self.stream,
                        blocks as u32,
                        THREADS,
                        &mut [
                            arg(&src),
                            arg(&ldi),
                            arg(&ri),
                            arg(&ni),
                            arg(&nt),
                            arg(&oi),
                            arg(&hi),
                            arg(&di),
                            arg(&qw),
                            arg(&kw),
                            arg(&cp),
                            arg(&sp),
                            arg(&eps),
                            arg(&qp),
                            arg(&kp),
                            arg(&vp),
                        ],
                    )?;
                }
            }
            off += n;
        }
        Ok(out)
    }

    fn concat_act(&self, a: &CudaTensor, x: &CudaTensor, start: usize, len: usize, act: Act) -> Result<CudaTensor> {
        let _p = self.prof("concat_act");
        let (rows, xc) = Self::rows_cols(x)?;
        let (arows, ac) = Self::rows_cols(a)?;
        ensure!(
            a.shape.len() == x.shape.len() && a.shape[..a.shape.len() - 1] == x.shape[..x.shape.len() - 1],
            "concat_act: {:?} and {:?} differ before the last dimension",
            a.shape,
            x.shape
        );
        ensure!(
            start.checked_add(len).is_some_and(|e| e <= xc),
            "concat_act: {start}..{start}+{len} is outside the last dimension of {:?}",
            x.shape
        );
        if !(ac | xc | start | len).is_multiple_of(8) {
            return super::composed::concat_act(self, a, x, start, len, act);
        }
        debug_assert_eq!(rows, arows);
        self.bind()?;
        let mut shape = a.shape.clone();
        *shape.last_mut().unwrap() = ac + len;
        let y = self.alloc(&shape)?;
        let kind = act_kind(act);
        let (ap, xp, yp) = (a.ptr(), x.ptr(), y.ptr());
        let (r, aci, xci, st, l) = (rows as i64, ac as i64, xc as i64, start as i64, len as i64);
        self.run(
            self.k.concat_act,
            y.numel() / 8,
            &mut [arg(&ap), arg(&xp), arg(&yp), arg(&r), arg(&aci), arg(&xci), arg(&st), arg(&l), arg(&kind)],
        )?;
        Ok(y)
    }

    fn observers_reset(&self, specs: &[ObserverSpec], steps: usize) -> Result<()> {
        let _p = self.prof("observers_reset");
        ensure!(steps >= 1, "observers need at least one step bucket");
        self.bind()?;
        let mut chan_off = Vec::with_capacity(specs.len());
        let mut total = 0;
        for s in specs {
            chan_off.push(total);
            total += s.channels;
        }
        let words = total + specs.len() * steps;
        let buf = self.pool.alloc(words * 4)?;
        // SAFETY: the buffer holds `words` u32s.
        unsafe { self.stream.memset(buf.ptr(), 0, words * 4)? };
        *self.obs.lock().unwrap() =
            Observers { buf: Some(buf), specs: specs.to_vec(), chan_off, total_ch: total, steps, step: 0, calls: vec![0; specs.len()] };
        Ok(())
    }

    fn observers_set_step(&self, step: usize) -> Result<()> {
        let _p = self.prof("observers_set_step");
        let mut o = self.obs.lock().unwrap();
        ensure!(step < o.steps, "observer step {step} outside the {} buckets", o.steps);
        o.step = step;
        Ok(())
    }

    fn observe(&self, x: &CudaTensor, slot: usize) -> Result<()> {
        let _p = self.prof("observe");
        let mut o = self.obs.lock().unwrap();
        let spec = o.specs.get(slot).cloned().ok_or_else(|| anyhow!("observer slot {slot} of {}", o.specs.len()))?;
        let base = o.buf.as_ref().expect("slots exist, so the buffer does").ptr();
        let chan = base + (o.chan_off[slot] * 4) as u64;
        let step = base + ((o.total_ch + slot * o.steps + o.step) * 4) as u64;
        let (outer, inner) = match spec.axis {
            ChannelAxis::Last => {
                let (rows, cols) = Self::rows_cols(x)?;
                ensure!(cols == spec.channels, "observer {slot}: {cols} channels in {:?}, {} expected", x.shape, spec.channels);
                (rows, 1)
            }
            ChannelAxis::Dim1 => {
                ensure!(
                    x.shape.len() >= 2 && x.shape[1] == spec.channels,
                    "observer {slot}: input {:?} lacks {} channels on dim 1",
                    x.shape,
                    spec.channels
                );
                (x.shape[0], x.shape[2..].iter().product())
            }
        };
        o.calls[slot] += 1;
        drop(o);
        if x.numel() == 0 {
            return Ok(());
        }
        self.bind()?;
        let xp = x.ptr();
        if inner == 1 {
            const ROWS: usize = 64;
            let (r, c, rpb) = (outer as i64, spec.channels as i64, ROWS as i64);
            let grid = (spec.channels.div_ceil(THREADS as usize) as u32, outer.div_ceil(ROWS) as u32);
            ensure!(grid.1 <= 65535, "observe: {outer} rows exceed the grid");
            // SAFETY: grid covers [rows, cols]; arguments match the kernel.
            unsafe {
                self.k.observe_last.launch_2d(
                    &self.stream,
                    grid,
                    THREADS,
                    &mut [arg(&xp), arg(&r), arg(&c), arg(&rpb), arg(&chan), arg(&step)],
                )?;
            }
        } else {
            const CHUNK: usize = 4096;
            let chunks = inner.div_ceil(CHUNK);
            let (ch, inn, chk, chs) = (spec.channels as i64, inner as i64, CHUNK as i64, chunks as i32);
            let blocks = outer * spec.channels * chunks;
            // SAFETY: one block a chunk of a plane; arguments match the kernel.
            unsafe {
                self.k.observe_inner.launch(
                    &self.stream,
                    blocks as u32,
                    THREADS,
                    &mut [arg(&xp), arg(&ch), arg(&inn), arg(&chk), arg(&chs), arg(&chan), arg(&step)],
                )?;
            }
        }
        Ok(())
    }

    fn observers_read(&self) -> Result<Vec<ObserverStats>> {
        let _p = self.prof("observers_read");
        let o = self.obs.lock().unwrap();
        let Some(buf) = o.buf.as_ref() else { return Ok(Vec::new()) };
        self.bind()?;
        let words = o.total_ch + o.specs.len() * o.steps;
        let mut raw = vec![0u32; words];
        // SAFETY: the buffer holds `words` u32s; `raw` has room for them.
        unsafe { self.stream.dtoh(raw.as_mut_ptr() as *mut u8, buf.ptr(), words * 4)? };
        self.stream.synchronize()?;
        Ok(o.specs
            .iter()
            .enumerate()
            .map(|(s, spec)| {
                let ch = &raw[o.chan_off[s]..o.chan_off[s] + spec.channels];
                let st = &raw[o.total_ch + s * o.steps..o.total_ch + (s + 1) * o.steps];
                ObserverStats {
                    channel_amax: ch.iter().map(|&b| f32::from_bits(b)).collect(),
                    step_amax: st.iter().map(|&b| f32::from_bits(b)).collect(),
                    calls: o.calls[s],
                }
            })
            .collect())
    }

    fn fake_quant(&self, x: &CudaTensor, q: ActQuant) -> Result<CudaTensor> {
        let _p = self.prof("fake_quant");
        let (rows, cols) = Self::rows_cols(x)?;
        self.bind()?;
        let y = self.alloc(&x.shape)?;
        let (xp, yp, n, r, c) = (x.ptr(), y.ptr(), x.numel() as i64, rows as i64, cols as i64);
        match q {
            ActQuant::Fp8Static { scale } => {
                ensure!(scale >= 0.0 && scale.is_finite(), "fp8 static activation scale {scale} is not a finite scale ≥ 0");
                let none = 0u64;
                self.run(self.k.fq_fp8, x.numel(), &mut [arg(&xp), arg(&yp), arg(&n), arg(&scale), arg(&none)])?;
            }
            ActQuant::Fp8Dynamic => {
                let word = self.amax_word.ptr();
                // SAFETY: a 4-byte buffer.
                unsafe { self.stream.memset(word, 0, 4)? };
                self.run(self.k.amax, x.numel(), &mut [arg(&xp), arg(&n), arg(&word)])?;
                let unused = 0.0f32;
                self.run(self.k.fq_fp8, x.numel(), &mut [arg(&xp), arg(&yp), arg(&n), arg(&unused), arg(&word)])?;
            }
            ActQuant::Int8DynamicRows => {
                let grid = rows.clamp(1, self.max_blocks as usize * 4) as u32;
                // SAFETY: blocks loop over rows; arguments match the kernel.
                unsafe { self.k.fq_int8_rows.launch(&self.stream, grid, THREADS, &mut [arg(&xp), arg(&yp), arg(&r), arg(&c)])? };
            }
            ActQuant::Nvfp4 { global_scale } => {
                // As CpuOps: a static scale must be usable (an input never seen nonzero has no NVFP4 scale).
                ensure!(
                    global_scale > 0.0 && global_scale.is_finite(),
                    "nvfp4 global activation scale {global_scale} is not a finite scale > 0"
                );
                let s2 = global_scale;
                self.run(self.k.fq_nvfp4, rows * cols.div_ceil(16), &mut [arg(&xp), arg(&yp), arg(&r), arg(&c), arg(&s2)])?;
            }
            ActQuant::Mxfp8 => {
                self.run(self.k.fq_mxfp8, rows * cols.div_ceil(32), &mut [arg(&xp), arg(&yp), arg(&r), arg(&c)])?;
            }
        }
        Ok(y)
    }

    fn peak_device_bytes(&self) -> Option<u64> {
        Some(self.stats.peak())
    }

    fn profile_reset(&self) -> Result<()> {
        let Some(p) = &self.profiler else { return Ok(()) };
        let mut p = p.lock().unwrap();
        self.profile_harvest(&mut p)?;
        p.totals.clear();
        Ok(())
    }

    fn profile_report(&self) -> Result<Option<String>> {
        let Some(p) = &self.profiler else { return Ok(None) };
        let mut p = p.lock().unwrap();
        self.profile_harvest(&mut p)?;
        Ok(Some(profile_table(&p.totals)))
    }
}

/// The op profile as a text table, largest total first: op, calls, total ms, share.
fn profile_table(totals: &[(&'static str, u64, f64)]) -> String {
    let mut rows = totals.to_vec();
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    let all: f64 = rows.iter().map(|r| r.2).sum();
    let mut out = format!("{:<16} {:>8} {:>12} {:>7}\n", "op", "calls", "total ms", "share");
    for (name, calls, ms) in &rows {
        let share = if all > 0.0 { 100.0 * ms / all } else { 0.0 };
        out += &format!("{name:<16} {calls:>8} {ms:>12.3} {share:>6.1}%\n");
    }
    out += &format!("{:<16} {:>8} {all:>12.3} {:>7}\n", "all", rows.iter().map(|r| r.1).sum::<u64>(), "100.0%");
    out
}

impl Drop for CudaOps {
    fn drop(&mut self) {
        // Pinned staging memory and pooled buffers must outlive the copies and kernels queued on them.
        let _ = self.bind();
        let _ = self.stream.synchronize();
    }
}

impl CudaOps {
    /// Opens a profiled call of op `name` (nothing without the op profiler).
    fn prof(&self, name: &'static str) -> Option<ProfScope<'_>> {
        let mut p = self.profiler.as_ref()?.lock().unwrap();
        p.depth += 1;
        let start = if p.depth == 1 {
            let e = match p.spare.pop() {
                Some(e) => Some(e),
                None => Event::new(&self.ctx).ok(),
            };
            e.filter(|e| e.record(&self.stream).is_ok())
        } else {
            None
        };
        Some(ProfScope { ops: self, name, start })
    }

    /// Waits for the device and folds the recorded event pairs into the totals.
    fn profile_harvest(&self, p: &mut OpProfiler) -> Result<()> {
        self.bind()?;
        self.stream.synchronize()?;
        for (name, start, end) in std::mem::take(&mut p.pending) {
            let ms = start.elapsed_ms(&end)? as f64;
            match p.totals.iter_mut().find(|t| t.0 == name) {
                Some(t) => {
                    t.1 += 1;
                    t.2 += ms;
                }
                None => p.totals.push((name, 1, ms)),
            }
            p.spare.push(start);
            p.spare.push(end);
        }
        Ok(())
    }

    /// `[B, R, C]` -> `[B, C, R]`, reshaped to `shape`.
    fn transpose(&self, x: &CudaTensor, b: usize, r: usize, c: usize, shape: &[usize]) -> Result<CudaTensor> {
        self.bind()?;
        let y = self.alloc(shape)?;
        if y.numel() == 0 {
            return Ok(y);
        }
        let tiles = r.div_ceil(32) * c.div_ceil(32);
        ensure!(b <= 65535, "transpose: batch {b} exceeds the grid");
        let (xp, yp, ri, ci) = (x.ptr(), y.ptr(), r as i64, c as i64);
        // SAFETY: one block a 32x32 tile; arguments match the kernel.
        unsafe {
            self.k.transpose.launch_2d(&self.stream, (tiles as u32, b as u32), THREADS, &mut [arg(&xp), arg(&yp), arg(&ri), arg(&ci)])?
        };
        Ok(y)
    }

    /// Attention through materialised scores (cuBLAS GEMMs, f32 scores, bf16
    /// probabilities), in chunks of at most `attention_bytes` of score buffers:
    /// `softmax(alpha * q k^T [+ bias[h]]) v` into `out`. Shapes checked by the callers.
    #[allow(clippy::too_many_arguments)]
    fn attention_unfused(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        heads: usize,
        causal: bool,
        alpha: f32,
        bias: Option<&CudaTensor>,
        out: &CudaTensor,
    ) -> Result<()> {
        let (b, nq, hd) = (q.shape[0], q.shape[1], q.shape[2]);
        let nk = k.shape[1];
        let d = hd / heads;
        let row_bytes = nk * 6;
        let max_rows = (self.attention_bytes.load(Ordering::Relaxed) / row_bytes).max(1);
        let (hc, qc) = if nq <= max_rows { ((max_rows / nq).clamp(1, heads), nq) } else { (1, max_rows) };
        let scores = self.pool.alloc(hc * qc * nk * 4)?;
        let probs = self.pool.alloc(hc * qc * nk * 2)?;
        let threads = nk.div_ceil(8).next_power_of_two().clamp(32, 256) as u32;
        let (sp, pp) = (scores.ptr(), probs.ptr());
        for bi in 0..b {
            for h0 in (0..heads).step_by(hc) {
                let hn = hc.min(heads - h0);
                for q0 in (0..nq).step_by(qc) {
                    let qn = qc.min(nq - q0);
                    // Scores, column-major: S^T (nk x qn) = K_h (as D x nk)^T * Q_h (D x qn).
                    self.gemm_batched(&Gemm {
                        trans_a: true,
                        trans_b: false,
                        m: nk,
                        n: qn,
                        k: d,
                        a: k.ptr() + ((bi * nk * hd + h0 * d) * 2) as u64,
                        lda: hd,
                        stride_a: d,
                        b: q.ptr() + (((bi * nq + q0) * hd + h0 * d) * 2) as u64,
                        ldb: hd,
                        stride_b: d,
                        c: sp,
                        ldc: nk,
                        stride_c: qn * nk,
                        c_f32: true,
                        batch: hn,
                        alpha,
                    })?;
                    let (cols, qrows, q0i, causal_i) = (nk as i64, qn as i64, q0 as i64, causal as i32);
                    if let Some(bias) = bias {
                        let bp = bias.ptr() + (((h0 * nq + q0) * nk) * 2) as u64;
                        let pitch = (nq * nk) as i64;
                        // SAFETY: one block a row of the hn * qn rows just written; the bias
                        // holds [heads, nq, nk] (checked by the caller).
                        unsafe {
                            self.k.softmax_bias.launch(
                                &self.stream,
                                (hn * qn) as u32,
                                threads,
                                &mut [arg(&sp), arg(&bp), arg(&pp), arg(&cols), arg(&qrows), arg(&pitch)],
                            )?;
                        }
                    } else {
                        // SAFETY: one block a row of the hn * qn rows just written.
                        unsafe {
                            self.k.softmax.launch(
                                &self.stream,
                                (hn * qn) as u32,
                                threads,
                                &mut [arg(&sp), arg(&pp), arg(&cols), arg(&qrows), arg(&q0i), arg(&causal_i)],
                            )?;
                        }
                    }
                    // Output, column-major: O_h^T (D x qn, ld H*D) = V_h^T (D x nk) * P^T (nk x qn).
                    self.gemm_batched(&Gemm {
                        trans_a: false,
                        trans_b: false,
                        m: d,
                        n: qn,
                        k: nk,
                        a: v.ptr() + ((bi * nk * hd + h0 * d) * 2) as u64,
                        lda: hd,
                        stride_a: d,
                        b: pp,
                        ldb: nk,
                        stride_b: qn * nk,
                        c: out.ptr() + (((bi * nq + q0) * hd + h0 * d) * 2) as u64,
                        ldc: hd,
                        stride_c: d,
                        c_f32: false,
                        batch: hn,
                        alpha: 1.0,
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Rows `idx` of `src` viewed as `[*, cols]` -> `[idx.len(), cols]`.
    fn gather(&self, src: &CudaTensor, idx: &[u32], cols: usize) -> Result<CudaTensor> {
        self.bind()?;
        let y = self.alloc(&[idx.len(), cols])?;
        if y.numel() == 0 {
            return Ok(y);
        }
        let ids = self.upload_u32(idx)?;
        let (sp, ip, yp, rows, c) = (src.ptr(), ids.ptr(), y.ptr(), idx.len() as i64, cols as i64);
        self.run(self.k.gather_rows, y.numel(), &mut [arg(&sp), arg(&ip), arg(&yp), arg(&rows), arg(&c)])?;
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_waste_at_most_a_third() {
        assert_eq!(bucket(1), 512);
        assert_eq!(bucket(512), 512);
        assert_eq!(bucket(513), 768);
        assert_eq!(bucket(769), 1024);
        assert_eq!(bucket(3 << 20), 3 << 20);
        for n in [1000usize, 4097, 123_457, 10_000_000] {
            let b = bucket(n);
            assert!(b >= n && (b as f64) < n as f64 * 1.5 + 512.0, "{n} -> {b}");
        }
    }
}
