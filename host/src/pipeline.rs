//! The whole job, stage by stage: checkpoint -> module table -> recipe -> plan ->
//! quantize + write -> report. Used by the CLI and the tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::backend::DeviceChoice;
use crate::checkpoint::Checkpoint;
use crate::convert::{self, ConvertOptions, ConvertSummary, LayerReport, Layout, UncalibratedFp8};
use crate::modules::ModuleTable;
use crate::plan::{self, PlanError, ResolvedPlan};
use crate::progress::{Progress, Unit};
use crate::recipe::params::{RawParams, value_to_json};
use crate::recipe::wit::{Detection, ParamValue};
use crate::recipe::{HostContext, LoadedRecipe, PRESETS, RecipeError, RecipeRuntime, RecipeSource, SandboxLimits};

pub use crate::error::Refused;

/// Options of `run-recipe run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub input: PathBuf,
    pub output: Option<PathBuf>,
    /// `None`: ask every built-in preset's `detect`.
    pub recipe: Option<String>,
    pub params: RawParams,
    pub dry_run: bool,
    pub layout: Layout,
    pub device: DeviceChoice,
    pub verify: bool,
    pub limits: SandboxLimits,
    /// Progress of the write, the calibration and its evaluation on stderr (`progress`).
    pub progress: bool,
    pub calibration: crate::calibrate::CalibrationOptions,
    /// Replace an existing output file (`--force`); otherwise it is refused before any work.
    pub replace_output: bool,
}

/// The recipe that ran, for reports and metadata.
#[derive(Clone, Debug, Serialize)]
pub struct RecipeReport {
    pub name: String,
    pub version: String,
    pub source: String,
    pub sha256: String,
    pub params: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DetectionReport {
    pub family: String,
    pub variant: String,
    pub confidence: f32,
    pub reason: String,
}

impl From<&Detection> for DetectionReport {
    fn from(d: &Detection) -> Self {
        DetectionReport { family: d.family.clone(), variant: d.variant.clone(), confidence: d.confidence, reason: d.reason.clone() }
    }
}

/// The JSON run report (`--report`).
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub tool: String,
    pub input: String,
    pub output: Option<String>,
    pub dry_run: bool,
    pub layout: Layout,
    pub backend: Option<String>,
    pub recipe: RecipeReport,
    pub detection: DetectionReport,
    pub warnings: Vec<String>,
    pub notes: Vec<String>,
    pub layers: Vec<LayerReport>,
    pub totals: Totals,
    pub peak_rss_bytes: Option<u64>,
    pub peak_device_bytes: Option<u64>,
    /// Activation calibration and its evaluation, when it ran.
    pub calibration: Option<crate::calibrate::CalibrationReport>,
    /// FP8 layers written without a static activation scale, and how ComfyUI runs them.
    pub uncalibrated_fp8: Option<UncalibratedFp8Report>,
}

/// FP8 layers without `input_scale` and what their `comfy_quant` says.
#[derive(Clone, Debug, Serialize)]
pub struct UncalibratedFp8Report {
    pub layers: usize,
    pub policy: UncalibratedFp8,
    pub why: String,
}

impl UncalibratedFp8Report {
    /// One line for the summary and the report's notes.
    pub fn describe(&self) -> String {
        match self.policy {
            UncalibratedFp8::Exact => format!(
                "{} FP8 layers have no static activation scale ({}): written with \"full_precision_matrix_mult\": true, so ComfyUI dequantizes them (exact, smaller, not faster); --set {}=fast takes ComfyUI's FP8 path at activation scale 1.0 instead",
                self.layers,
                self.why,
                UncalibratedFp8::PARAM
            ),
            UncalibratedFp8::Fast => format!(
                "{} FP8 layers have no static activation scale ({}): {}=fast, so ComfyUI casts their activations to FP8 at scale 1.0 (values clamp at +-448; measured ~40% more output error on FLUX.1-dev)",
                self.layers,
                self.why,
                UncalibratedFp8::PARAM
            ),
        }
    }
}

/// Why FP8 layers lack a scale when calibration did not run: the reason itself
/// is in the report's notes ("no activation calibration: ..."), printed once.
const NOT_CALIBRATED: &str = "no calibration on this run; the note says why";

/// FP8 layers of `plan` without a scale in `input_scales`, if any (comfy layout only).
fn uncalibrated_fp8(
    plan: &ResolvedPlan,
    layout: Layout,
    input_scales: &HashMap<String, f32>,
    policy: UncalibratedFp8,
    why: &str,
) -> Option<UncalibratedFp8Report> {
    if layout != Layout::Comfy {
        return None;
    }
    let layers = plan
        .quantized()
        .filter(|l| l.spec.is_some_and(|s| s.format == crate::formats::QuantFormat::Fp8) && !input_scales.contains_key(&l.path))
        .count();
    (layers > 0).then(|| UncalibratedFp8Report { layers, policy, why: why.to_string() })
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub layers: usize,
    pub quantized_layers: usize,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub quantized_bytes_before: u64,
    pub quantized_bytes_after: u64,
    pub seconds: f64,
    pub input_gb_per_s: f64,
}

pub fn tool_version() -> String {
    format!("quantsmith {}", env!("CARGO_PKG_VERSION"))
}

/// Peak resident set of this process (Linux), for the report.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Opens the input and builds what recipes may see.
pub fn open_context(input: &Path) -> Result<Arc<HostContext>> {
    let checkpoint = Checkpoint::open(input)?;
    let modules = ModuleTable::build(&checkpoint);
    Ok(Arc::new(HostContext { checkpoint: Arc::new(checkpoint), modules: Arc::new(modules) }))
}

/// Every preset's verdict on the checkpoint, best first.
pub fn detect_all(runtime: &RecipeRuntime, ctx: &Arc<HostContext>) -> Result<Vec<(LoadedRecipe, Result<Detection, String>)>> {
    let mut out = Vec::new();
    for p in PRESETS {
        let recipe = runtime.load(&RecipeSource::Builtin(p.name))?;
        let params = RawParams::default().validate(recipe.name(), &recipe.info.params)?;
        let verdict = recipe.detect(ctx, params)?;
        out.push((recipe, verdict));
    }
    out.sort_by(|a, b| {
        let score = |v: &Result<Detection, String>| v.as_ref().map(|d| d.confidence).unwrap_or(-1.0);
        score(&b.1).total_cmp(&score(&a.1))
    });
    Ok(out)
}

/// Loads the recipe to use: the named one, or the best-matching preset.
pub fn choose_recipe(runtime: &RecipeRuntime, ctx: &Arc<HostContext>, name: Option<&str>) -> Result<LoadedRecipe> {
    match name {
        Some(name) if name != "auto" => {
            let source = RecipeSource::parse(name).map_err(Refused)?;
            Ok(runtime.load(&source)?)
        }
        _ => {
            let verdicts = detect_all(runtime, ctx)?;
            let reasons: Vec<String> =
                verdicts.iter().map(|(r, v)| format!("  {}: {}", r.name(), v.as_ref().err().cloned().unwrap_or_default())).collect();
            match verdicts.into_iter().next() {
                Some((recipe, Ok(_))) => Ok(recipe),
                _ => {
                    Err(Refused(format!("no built-in preset recognises {}:\n{}", ctx.checkpoint.path().display(), reasons.join("\n")))
                        .into())
                }
            }
        }
    }
}

/// Default output path: `<stem>.<format>.safetensors` beside the input.
pub fn default_output(input: &Path, params: &[(String, ParamValue)]) -> PathBuf {
    let tag = params
        .iter()
        .find(|(k, _)| k == "format")
        .and_then(|(_, v)| if let ParamValue::Text(s) = v { Some(s.clone()) } else { None })
        .unwrap_or_else(|| "quantized".into());
    let stem = input.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
    input.with_file_name(format!("{stem}.{tag}.safetensors"))
}

/// Runs the whole job.
pub fn run(opts: &RunOptions) -> Result<RunReport> {
    if let (Some(output), false) = (&opts.output, opts.dry_run) {
        check_output_path("output", output, Some(&opts.input), opts.replace_output)?;
    }
    let ctx = open_context(&opts.input)?;
    let runtime = RecipeRuntime::new(opts.limits)?;
    let recipe = choose_recipe(&runtime, &ctx, opts.recipe.as_deref())?;
    let params = opts.params.validate(recipe.name(), &recipe.info.params)?;
    let fp8_policy = UncalibratedFp8::from_params(&params).map_err(|e| Refused(format!("{e:#}")))?;

    let detection = match recipe.detect(&ctx, params.clone())? {
        Ok(d) => d,
        Err(reason) => bail!(Refused(format!("recipe {} does not accept {}: {reason}", recipe.name(), opts.input.display()))),
    };
    tracing::info!(
        "{}: {} {} (confidence {:.2}): {}",
        recipe.name(),
        detection.family,
        detection.variant,
        detection.confidence,
        detection.reason
    );
    // The plan call and the host's check of what it returned share one budget.
    let plan_deadline = Instant::now() + opts.limits.timeout;
    let wit_plan = match recipe.plan(&ctx, params.clone())? {
        Ok(p) => p,
        Err(reason) => bail!(Refused(format!("recipe {} refused to plan {}: {reason}", recipe.name(), opts.input.display()))),
    };
    let resolved: ResolvedPlan = plan::resolve_by(&wit_plan, &ctx.modules, &ctx.checkpoint, Some(plan_deadline)).map_err(|e| match e {
        PlanError::Invalid(message) => {
            RecipeError::Invalid { recipe: recipe.name().to_string(), message: format!("invalid plan: {message}") }
        }
        PlanError::OutOfTime => {
            RecipeError::Timeout { recipe: recipe.name().to_string(), call: "plan", secs: opts.limits.timeout.as_secs_f64() }
        }
    })?;
    convert::check_layout(&resolved, opts.layout)?;
    // The plan's warnings are printed once, as they arise: the run summary and
    // the report keep them too, but the summary does not repeat them.
    for w in &resolved.warnings {
        tracing::warn!(
            "{}: {}",
            crate::text::sanitize(recipe.name(), crate::text::MAX_PRINTED),
            crate::text::sanitize(w, crate::text::MAX_PRINTED)
        );
    }

    let recipe_report = RecipeReport {
        name: recipe.info.name.clone(),
        version: recipe.info.version.clone(),
        source: recipe.source.label(),
        sha256: recipe.sha256.clone(),
        params: params.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect(),
    };
    let mut report = RunReport {
        tool: tool_version(),
        input: opts.input.display().to_string(),
        output: None,
        dry_run: opts.dry_run,
        layout: opts.layout,
        backend: None,
        recipe: recipe_report,
        detection: DetectionReport::from(&detection),
        warnings: resolved.warnings.clone(),
        notes: resolved.notes.clone(),
        layers: vec![],
        totals: Totals {
            layers: resolved.layers.len(),
            quantized_layers: resolved.quantized().count(),
            input_bytes: ctx.checkpoint.file_len() as u64,
            ..Default::default()
        },
        peak_rss_bytes: None,
        peak_device_bytes: None,
        calibration: None,
        uncalibrated_fp8: None,
    };

    if opts.dry_run {
        if let Some(reason) = crate::calibrate::skip_reason(&opts.calibration, &resolved, &detection.family, &recipe) {
            report.notes.push(format!("no activation calibration: {reason}"));
            report.uncalibrated_fp8 = uncalibrated_fp8(&resolved, opts.layout, &HashMap::new(), fp8_policy, NOT_CALIBRATED);
        } else {
            report.notes.push("a real run calibrates activation scales (FP8 input_scale / NVFP4 activation global scale)".into());
        }
        let (layers, total) = convert::dry_run(&ctx.checkpoint, &resolved, opts.layout, fp8_policy)?;
        report.totals.output_bytes = total;
        fill_layer_totals(&mut report, layers);
        report.peak_rss_bytes = peak_rss_bytes();
        return Ok(report);
    }

    let output = opts.output.clone().unwrap_or_else(|| default_output(&opts.input, &params));
    check_output_path("output", &output, Some(&opts.input), opts.replace_output)?;
    let (calibration, uncalibrated_why) = match crate::calibrate::run(
        &ctx,
        &recipe,
        &params,
        &detection.family,
        &detection.variant,
        &resolved,
        &opts.calibration,
        opts.progress,
    )? {
        crate::calibrate::Outcome::Calibrated(c) => (Some(c), "the calibration walk did not reach them".to_string()),
        crate::calibrate::Outcome::Skipped(reason) => {
            report.notes.push(format!("no activation calibration: {reason}"));
            (None, NOT_CALIBRATED.to_string())
        }
    };
    let input_scales = calibration.as_ref().map(|c| c.input_scales.clone()).unwrap_or_default();
    report.uncalibrated_fp8 = uncalibrated_fp8(&resolved, opts.layout, &input_scales, fp8_policy, &uncalibrated_why);
    if let Some(u) = &report.uncalibrated_fp8 {
        tracing::info!("{}", u.describe());
    }
    let backend = crate::gpu::open(opts.device)?;
    report.backend = Some(backend.name());
    tracing::info!("quantizing on {}", backend.name());

    let mut metadata = HashMap::new();
    metadata.insert("quantsmith.version".into(), env!("CARGO_PKG_VERSION").into());
    metadata.insert("quantsmith.recipe".into(), report.recipe.name.clone());
    metadata.insert("quantsmith.recipe_version".into(), report.recipe.version.clone());
    metadata.insert("quantsmith.recipe_sha256".into(), report.recipe.sha256.clone());
    metadata.insert("quantsmith.recipe_source".into(), report.recipe.source.clone());
    metadata.insert("quantsmith.params".into(), serde_json::Value::Object(report.recipe.params.clone()).to_string());
    metadata.insert("quantsmith.detected".into(), format!("{} {}", detection.family, detection.variant));
    if let Some(name) = opts.input.file_name() {
        metadata.insert("quantsmith.source_file".into(), name.to_string_lossy().into());
    }
    if let Some(c) = &calibration {
        let summary = serde_json::json!({
            "algorithm": c.report.algorithm,
            "forward_passes": c.report.session.forwards,
            "samples": c.report.session.samples,
            "steps": c.report.session.steps.len(),
            "input_scales": c.input_scales.len(),
            "smoothquant_groups": c.smoothing.groups.len(),
        });
        metadata.insert("quantsmith.calibration".into(), summary.to_string());
    }

    // Counted in source tensor bytes, as the conversion reports them.
    let tensor_bytes = ctx.checkpoint.tensors().iter().map(|t| t.byte_len() as u64).sum();
    let progress = opts.progress.then(|| Progress::start("write", Unit::Bytes, Some(tensor_bytes)));
    let summary: ConvertSummary = convert::convert(
        &ctx.checkpoint,
        &resolved,
        backend.as_ref(),
        &ConvertOptions {
            output: output.clone(),
            layout: opts.layout,
            metadata,
            verify: opts.verify,
            progress: progress.clone(),
            input_scales,
            smoothing: calibration.as_ref().map(|c| c.smoothing.clone()).unwrap_or_default(),
            uncalibrated_fp8: fp8_policy,
        },
    )
    .with_context(|| format!("converting {}", opts.input.display()))?;
    if let Some(pb) = progress {
        pb.finish();
    }
    report.output = Some(output.display().to_string());
    report.totals.output_bytes = summary.output_bytes;
    report.totals.seconds = summary.seconds;
    report.totals.input_gb_per_s = summary.input_bytes as f64 / summary.seconds.max(1e-9) / 1e9;
    fill_layer_totals(&mut report, summary.layers);
    report.peak_rss_bytes = peak_rss_bytes();
    report.peak_device_bytes = backend.peak_device_bytes();
    report.calibration = calibration.map(|c| c.report);
    Ok(report)
}

fn fill_layer_totals(report: &mut RunReport, layers: Vec<LayerReport>) {
    for l in layers.iter().filter(|l| l.format.is_some()) {
        report.totals.quantized_bytes_before += l.bytes_before;
        report.totals.quantized_bytes_after += l.bytes_after;
    }
    report.layers = layers;
}

/// Checks an output path before any work: not a directory, FIFO or device, not
/// `input`, in an existing folder this process can write, and not an existing
/// file unless `replace`.
pub fn check_output_path(flag: &str, path: &Path, input: Option<&Path>, replace: bool) -> Result<(), crate::error::Usage> {
    use std::os::unix::fs::FileTypeExt;
    let u = |m: String| crate::error::Usage(m);
    let shown = path.display();
    if let Ok(meta) = std::fs::metadata(path) {
        let t = meta.file_type();
        if t.is_dir() {
            return Err(u(format!("{flag} {shown} is a directory; name a file inside it")));
        }
        if !t.is_file() {
            let what = if t.is_fifo() {
                "a FIFO"
            } else if t.is_char_device() || t.is_block_device() {
                "a device"
            } else {
                "not a regular file"
            };
            return Err(u(format!("{flag} {shown} is {what}; refusing to replace it")));
        }
        if input.is_some_and(|i| same_file(path, i)) {
            return Err(u(format!("the output {shown} is the input file; choose another path with -o")));
        }
        if !replace {
            return Err(u(format!("{flag} {shown} already exists; pass --force to replace it")));
        }
    }
    if path.file_name().is_none() {
        return Err(u(format!("{flag} {shown} names no file")));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(u(format!("{flag} {shown}: {} is not a folder", dir.display()))),
        Err(_) => return Err(u(format!("{flag} {shown}: the folder {} does not exist", dir.display()))),
    }
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| u(format!("{flag} {shown}: the path holds a NUL byte")))?;
    // SAFETY: a NUL-terminated path living across the call.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(u(format!("{flag} {shown}: cannot write into the folder {}", dir.display())));
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
