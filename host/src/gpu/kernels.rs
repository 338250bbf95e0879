//! The CUDA sources in `kernels/` and their run-time compilation with NVRTC.
//!
//! All files form one NVRTC program (common.cuh first, each file behind a
//! `#line` directive so compiler messages name it). No CUDA header is included,
//! so NVRTC needs no include path: the `libnvrtc.so.13` of the
//! `nvidia-cuda-nvrtc` wheel is enough, which is how CI compiles them without a GPU.
//!
//! Options: `--fmad=false` (no contraction into FMAs, which would change
//! roundings), no `--use_fast_math`, no `--ftz`: the kernels must equal the CPU
//! reference bit for bit.

use std::ffi::{CStr, CString};

use anyhow::{Context, Result, anyhow, bail};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

/// The source files, in program order.
pub const SOURCES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../../kernels/common.cuh")),
    ("amax.cu", include_str!("../../../kernels/amax.cu")),
    ("fp8.cu", include_str!("../../../kernels/fp8.cu")),
    ("int8.cu", include_str!("../../../kernels/int8.cu")),
    ("nvfp4.cu", include_str!("../../../kernels/nvfp4.cu")),
    ("mxfp8.cu", include_str!("../../../kernels/mxfp8.cu")),
    ("fused.cu", include_str!("../../../kernels/fused.cu")),
    ("selftest.cu", include_str!("../../../kernels/selftest.cu")),
];

/// Input dtype suffixes of the templated kernels.
pub const DTYPE_SUFFIXES: [&str; 3] = ["f32", "f16", "bf16"];

/// Kernels instantiated once per input dtype (`<name>_<f32|f16|bf16>`).
pub const PER_DTYPE_KERNELS: &[&str] = &[
    "qs_amax_tensor",
    "qs_amax_rows",
    "qs_amax_blocks",
    "qs_fp8_quant",
    "qs_int8_tensor_quant",
    "qs_int8_rows_quant",
    "qs_int8_warp_rows_quant",
    "qs_nvfp4_quant",
    "qs_mxfp8_quant",
    "qs_fused_fp8",
    "qs_fused_int8",
    "qs_fused_nvfp4",
];

/// Kernels with one instance.
pub const SINGLE_KERNELS: &[&str] = &[
    "qs_fp8_dequant",
    "qs_int8_dequant",
    "qs_nvfp4_dequant",
    "qs_mxfp8_dequant",
    "qs_selftest_conversions",
    "qs_selftest_int8_recip",
    "qs_selftest_nvfp4_recip",
    "qs_selftest_mx_exponent",
];

/// Every kernel entry point the host looks up.
pub fn kernel_names() -> Vec<String> {
    let mut v: Vec<String> = PER_DTYPE_KERNELS.iter().flat_map(|k| DTYPE_SUFFIXES.iter().map(move |s| format!("{k}_{s}"))).collect();
    v.extend(SINGLE_KERNELS.iter().map(|s| s.to_string()));
    v
}

/// The whole program as NVRTC sees it.
pub fn program_source() -> String {
    join_sources(SOURCES)
}

/// One NVRTC program from `(file name, text)` pairs, each behind a `#line`
/// directive so compiler messages name the file.
pub fn join_sources(sources: &[(&str, &str)]) -> String {
    let mut src = String::new();
    for (name, text) in sources {
        src.push_str(&format!("#line 1 \"{name}\"\n"));
        src.push_str(text);
        src.push('\n');
    }
    src
}

/// Whether an NVRTC library can be loaded (without loading it for good; cudarc
/// panics on first use when it is absent, so ask this first).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the candidate names.
    crate::error::catching(|| unsafe { nvrtc_sys::is_culib_present() }).unwrap_or(false)
}

/// NVRTC's version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_available() {
        bail!("libnvrtc not found (install CUDA 13's NVRTC or the nvidia-cuda-nvrtc wheel and add its lib/ to LD_LIBRARY_PATH)");
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live integers.
    let r = crate::error::catching(move || unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }.result().map(|_| (major, minor)));
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow!("nvrtcVersion: {e:?}")),
        Err(_) => Err(anyhow!("libnvrtc lacks nvrtcVersion")),
    }
}

/// What to compile for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Machine code (cubin) for `sm_<major><minor>`: what the backend loads.
    Cubin { major: i32, minor: i32 },
    /// PTX for the virtual architecture `compute_<major><minor>`.
    Ptx { major: i32, minor: i32 },
}

impl Target {
    fn arch_option(self) -> String {
        match self {
            Target::Cubin { major, minor } => format!("--gpu-architecture=sm_{major}{minor}"),
            Target::Ptx { major, minor } => format!("--gpu-architecture=compute_{major}{minor}"),
        }
    }
}

/// A compiled program: the image (cubin bytes, or PTX text with its NUL) and
/// NVRTC's log.
pub struct Compiled {
    pub target: Target,
    pub image: Vec<u8>,
    pub log: String,
}

/// The options every compilation uses, besides the architecture.
pub const COMPILE_OPTIONS: &[&str] = &["--fmad=false", "--std=c++17"];

/// Compiles every kernel for `target`. Errors carry NVRTC's log.
pub fn compile(target: Target) -> Result<Compiled> {
    compile_with(target, &[])
}

/// As [`compile`], with preprocessor definitions (`-D NAME=VALUE`) for the
/// tuning knobs (`QS_FLAT_U`, `QS_NV_U`, `QS_MX_U`; `QS_FT`, `QS_FU` of the fused kernels).
pub fn compile_with(target: Target, defines: &[(&str, &str)]) -> Result<Compiled> {
    let mut options: Vec<String> = COMPILE_OPTIONS.iter().map(|s| s.to_string()).collect();
    options.extend(defines.iter().map(|(k, v)| format!("-D{k}={v}")));
    compile_source("quantsmith_kernels.cu", &program_source(), target, &options)
}

/// Compiles one NVRTC program (`source`, named `program` in messages) for
/// `target` with `options` besides the architecture. Errors carry NVRTC's log.
/// Other kernel programs (the forward-pass kernels of `nn::cuda`) use it with
/// their own sources and options.
pub fn compile_source(program: &str, source: &str, target: Target, options: &[String]) -> Result<Compiled> {
    if !nvrtc_available() {
        bail!("libnvrtc not found (install CUDA 13's NVRTC or the nvidia-cuda-nvrtc wheel and add its lib/ to LD_LIBRARY_PATH)");
    }
    let src = CString::new(source).context("kernel sources hold a NUL")?;
    let name = CString::new(program).context("program name holds a NUL")?;
    let prog = nvrtc::create_program(&src, Some(&name)).map_err(|e| anyhow!("nvrtcCreateProgram: {e:?}"))?;
    struct Guard(nvrtc_sys::nvrtcProgram);
    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: created above, destroyed once.
            let _ = unsafe { nvrtc::destroy_program(self.0) };
        }
    }
    let guard = Guard(prog);
    let mut options = options.to_vec();
    options.push(target.arch_option());
    // SAFETY: `prog` is live; options are valid strings.
    let compiled = unsafe { nvrtc::compile_program(guard.0, &options) };
    // SAFETY: as above.
    let log = unsafe { nvrtc::get_program_log(guard.0) }
        .map(|raw| unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Err(e) = compiled {
        bail!("NVRTC failed to compile {program} for {:?} ({e:?}):\n{log}", target);
    }
    let image = match target {
        Target::Ptx { .. } => {
            // SAFETY: compiled program.
            let ptx = unsafe { nvrtc::get_ptx(guard.0) }.map_err(|e| anyhow!("nvrtcGetPTX: {e:?}"))?;
            ptx.into_iter().map(|c| c as u8).collect()
        }
        Target::Cubin { .. } => {
            let mut size = 0usize;
            // SAFETY: compiled program, out-pointer to a live usize.
            unsafe { nvrtc_sys::nvrtcGetCUBINSize(guard.0, &mut size) }.result().map_err(|e| anyhow!("nvrtcGetCUBINSize: {e:?}"))?;
            let mut cubin = vec![0u8; size];
            // SAFETY: buffer of the size NVRTC asked for.
            unsafe { nvrtc_sys::nvrtcGetCUBIN(guard.0, cubin.as_mut_ptr() as *mut _) }
                .result()
                .map_err(|e| anyhow!("nvrtcGetCUBIN: {e:?}"))?;
            cubin
        }
    };
    Ok(Compiled { target, image, log })
}

/// Compiles for the device's compute capability, as cubin.
pub fn compile_for_device(major: i32, minor: i32, defines: &[(&str, &str)]) -> Result<Compiled> {
    compile_with(Target::Cubin { major, minor }, defines).with_context(|| format!("compiling the CUDA kernels for sm_{major}{minor}"))
}
