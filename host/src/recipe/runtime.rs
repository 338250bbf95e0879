//! The wasmtime side: engine, compilation cache, sandbox, version check, calls.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable, types::ComponentItem};
use wasmtime::{Cache, CacheConfig, Config, Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::calibrating::{CalibratingRecipeV0Pre, CalibrationSettings};
use super::wit::{Detection, QuantPlan, RecipeInfo};
use super::{PRESETS, RecipeSource, RecipeV0Pre, WIT_VERSION};
use crate::calibrate::session::CalibSession;
use crate::checkpoint::Checkpoint;
use crate::modules::ModuleTable;
use crate::text::untrusted;

/// CPU and memory budget of one recipe call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Linear memory a recipe may grow to.
    pub memory_bytes: usize,
    /// Wall-clock budget of one call (describe, detect, plan or calibrate): the
    /// recipe's own time, the time it asks to sleep, and the host work its
    /// requests cost, except the forward passes of calibration (`denoise`,
    /// prompt encoding), which `SessionLimits::max_forwards` bounds instead.
    pub timeout: Duration,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        SandboxLimits { memory_bytes: 256 << 20, timeout: Duration::from_secs(10) }
    }
}

/// What a recipe can query: the checkpoint and its module table.
pub struct HostContext {
    pub checkpoint: Arc<Checkpoint>,
    pub modules: Arc<ModuleTable>,
}

/// Everything that can go wrong with a recipe, each naming it.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("recipe {recipe}: cannot load: {reason}")]
    Load { recipe: String, reason: String },
    #[error(
        "recipe {recipe} was built against quantsmith:recipe@{found}; this host speaks quantsmith:recipe@{WIT_VERSION} (0.1.x). Rebuild it with a matching quantsmith-recipe-sdk"
    )]
    Version { recipe: String, found: String },
    #[error(
        "recipe {recipe}: {call} exceeded its CPU budget of {secs:.1} s (its own time and the host work it asked for) and was stopped (raise it with --recipe-timeout)"
    )]
    Timeout { recipe: String, call: &'static str, secs: f64 },
    #[error("recipe {recipe}: {call} exceeded its memory limit of {mib} MiB and was stopped (raise it with --recipe-memory)")]
    Memory { recipe: String, call: &'static str, mib: usize },
    #[error("recipe {recipe}: {call} crashed: {reason}")]
    Trap { recipe: String, call: &'static str, reason: String },
    #[error("recipe {recipe}: {message}")]
    Invalid { recipe: String, message: String },
}

/// Caps the *sum* of a recipe's linear memories (a component may hold several),
/// and turns a refused growth into a trap so the failure is reported, not hidden.
struct TotalMemoryLimiter {
    limit: usize,
    used: usize,
}

const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl ResourceLimiter for TotalMemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.used - current.min(self.used) + desired;
        if total > self.limit || maximum.is_some_and(|m| desired > m) {
            wasmtime::bail!("forcing trap when growing memory to {total} bytes in total");
        }
        self.used = total;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS || maximum.is_some_and(|m| desired > m) {
            wasmtime::bail!("forcing trap when growing a table to {desired} elements");
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        32
    }

    fn tables(&self) -> usize {
        32
    }

    fn memories(&self) -> usize {
        8
    }
}

/// Per-call store data.
pub(super) struct State {
    wasi: WasiCtx,
    pub(super) table: ResourceTable,
    /// The calibration session, during a `calibrate` call only.
    pub(super) calib: Option<Box<dyn CalibSession>>,
    /// When the call started.
    pub(super) started: Instant,
    /// Time spent in forward passes (recipe::calibration_impl), which the
    /// budget does not count; every other host call counts.
    pub(super) model_time: Duration,
    /// A host call was refused because the budget was used up: the call ends
    /// as a timeout whatever the recipe makes of the refusal.
    pub(super) out_of_time: bool,
    /// Time the recipe asked to sleep (recipe::clocks): charged, never waited.
    pub(super) slept: Duration,
    /// The call's time budget (SandboxLimits::timeout).
    pub(super) budget: Duration,
    limits: TotalMemoryLimiter,
    pub(super) ctx: Option<Arc<HostContext>>,
    pub(super) params: Vec<(String, super::wit::ParamValue)>,
    pub(super) recipe: String,
}

impl State {
    /// The budget the call has used: wall-clock time less forward passes, plus sleeps.
    pub(super) fn used(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.model_time).saturating_add(self.slept)
    }

    /// Refuses host work once the budget is used up (and marks the call as out of
    /// time), so a recipe cannot keep the host busy past `--recipe-timeout` by
    /// asking it for work in a loop.
    pub(super) fn check_deadline(&mut self, what: &str) -> Result<(), String> {
        if self.used() < self.budget {
            return Ok(());
        }
        self.out_of_time = true;
        Err(format!("{what}: refused: the recipe's time budget of {:.1} s is used up", self.budget.as_secs_f64()))
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// The engine and linker shared by every recipe.
pub struct RecipeRuntime {
    engine: Engine,
    linker: Arc<Linker<State>>,
    limits: SandboxLimits,
}

const TICK: Duration = Duration::from_millis(10);

/// Most families or formats a recipe may list in `describe`.
const MAX_LISTED: usize = 64;

/// Largest recipe file read: the presets are under a megabyte.
const MAX_RECIPE_BYTES: u64 = 256 << 20;

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("QUANTSMITH_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    directories::ProjectDirs::from("", "", "quantsmith").map(|d| d.cache_dir().join("wasm"))
}

impl RecipeRuntime {
    pub fn new(limits: SandboxLimits) -> anyhow::Result<RecipeRuntime> {
        static ENGINE: OnceLock<Engine> = OnceLock::new();
        let engine = match ENGINE.get() {
            Some(e) => e.clone(),
            None => {
                let mut config = Config::new();
                config.wasm_component_model(true).epoch_interruption(true);
                // A second run reuses the machine code compiled by the first.
                if let Some(dir) = cache_dir() {
                    let mut cc = CacheConfig::new();
                    cc.with_directory(dir);
                    match Cache::new(cc) {
                        Ok(cache) => {
                            config.cache(Some(cache));
                        }
                        Err(e) => tracing::debug!("compilation cache disabled: {e:#}"),
                    }
                }
                let engine = Engine::new(&config)?;
                let weak = engine.weak();
                std::thread::Builder::new().name("recipe-epoch".into()).spawn(move || {
                    while let Some(engine) = weak.upgrade() {
                        engine.increment_epoch();
                        drop(engine);
                        std::thread::sleep(TICK);
                    }
                })?;
                ENGINE.get_or_init(|| engine).clone()
            }
        };
        let mut linker = Linker::<State>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        super::clocks::add_to_linker(&mut linker)?;
        super::RecipeV0::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)?;
        super::calibrating::quantsmith::recipe::calibration::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)?;
        super::calibrating::quantsmith::recipe::smoothing::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)?;
        super::calibrating::quantsmith::recipe::sampling::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)?;
        Ok(RecipeRuntime { engine, linker: Arc::new(linker), limits })
    }

    pub fn limits(&self) -> SandboxLimits {
        self.limits
    }

    /// Loads, checks and describes a recipe.
    pub fn load(&self, source: &RecipeSource) -> Result<LoadedRecipe, RecipeError> {
        let label = source.label();
        let load_err = |reason: String| RecipeError::Load { recipe: label.clone(), reason };
        let bytes: Vec<u8> = match source {
            RecipeSource::Builtin(name) => PRESETS.iter().find(|p| p.name == *name).expect("preset").wasm.to_vec(),
            RecipeSource::File(path) => {
                // Never block on a FIFO or read a device without end, whichever command names it.
                crate::checkpoint::require_regular_file(path).map_err(|e| load_err(format!("cannot read {}: {e}", path.display())))?;
                let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                if len > MAX_RECIPE_BYTES {
                    return Err(load_err(format!("{} is {len} bytes; a recipe component is at most {MAX_RECIPE_BYTES}", path.display())));
                }
                std::fs::read(path).map_err(|e| load_err(format!("cannot read {}: {e}", path.display())))?
            }
        };
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let component = Component::new(&self.engine, &bytes).map_err(|e| load_err(format!("not a valid WebAssembly component: {e:#}")))?;
        check_contract(&self.engine, &component, &label)?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            load_err(format!(
                "its imports do not match what the sandbox provides (the quantsmith:recipe@{WIT_VERSION} contract and WASI 0.2): {e:#}"
            ))
        })?;
        let exports_calibrate =
            component.component_type().exports(&self.engine).any(|(n, _)| n.starts_with("quantsmith:recipe/calibrate@"));
        let mismatch = |e: wasmtime::Error| {
            load_err(format!(
                "its exports do not match the quantsmith:recipe@{WIT_VERSION} contract this host speaks (built against a modified or newer WIT?): {e:#}"
            ))
        };
        let calibrating = if exports_calibrate { Some(CalibratingRecipeV0Pre::new(pre.clone()).map_err(mismatch)?) } else { None };
        let pre = RecipeV0Pre::new(pre).map_err(mismatch)?;
        let mut loaded = LoadedRecipe {
            label: label.clone(),
            source: source.clone(),
            sha256,
            pre,
            calibrating,
            engine: self.engine.clone(),
            limits: self.limits,
            info: RecipeInfo {
                name: label.clone(),
                version: String::new(),
                description: String::new(),
                families: vec![],
                formats: vec![],
                params: vec![],
            },
        };
        let pre = loaded.pre.clone();
        let info = loaded.call("describe", None, vec![], |s| pre.instantiate(&mut *s)?.quantsmith_recipe_recipe().call_describe(s))?;
        super::params::check_schema(&info.params).map_err(|m| RecipeError::Invalid {
            recipe: label.clone(),
            message: format!("describe returned an invalid parameter schema: {m}"),
        })?;
        if info.families.len() > MAX_LISTED || info.formats.len() > MAX_LISTED {
            return Err(RecipeError::Invalid {
                recipe: label,
                message: format!(
                    "describe lists {} families and {} formats; at most {MAX_LISTED} each",
                    info.families.len(),
                    info.formats.len()
                ),
            });
        }
        if info.name.trim().is_empty() {
            return Err(RecipeError::Invalid { recipe: label, message: "describe returned an empty name".into() });
        }
        // Shown to the user as they are: escaped and cut (crate::text).
        let info = RecipeInfo {
            name: untrusted(&info.name),
            version: untrusted(&info.version),
            description: untrusted(&info.description),
            families: info.families.iter().map(|f| untrusted(f)).collect(),
            formats: info.formats.iter().map(|f| untrusted(f)).collect(),
            ..info
        };
        loaded.info = info;
        Ok(loaded)
    }
}

/// Refuses components that are not recipes or speak another contract version.
fn check_contract(engine: &Engine, component: &Component, label: &str) -> Result<(), RecipeError> {
    let ty = component.component_type();
    let names: Vec<String> = ty.imports(engine).map(|(n, _)| n.to_string()).chain(ty.exports(engine).map(|(n, _)| n.to_string())).collect();
    let ours: Vec<&String> = names.iter().filter(|n| n.starts_with("quantsmith:recipe/")).collect();
    for name in &ours {
        let version = name.rsplit_once('@').map(|(_, v)| v).unwrap_or("unversioned");
        if !compatible(version) {
            return Err(RecipeError::Version { recipe: label.to_string(), found: version.to_string() });
        }
    }
    let exports_recipe = ty
        .exports(engine)
        .any(|(n, item)| n.starts_with("quantsmith:recipe/recipe@") && matches!(item.ty, ComponentItem::ComponentInstance(_)));
    if !exports_recipe {
        let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
        return Err(RecipeError::Load {
            recipe: label.to_string(),
            reason: format!(
                "not a Quantsmith recipe: it does not export quantsmith:recipe/recipe@{WIT_VERSION} (exports: {})",
                if exports.is_empty() { "nothing".into() } else { exports.join(", ") }
            ),
        });
    }
    Ok(())
}

/// 0.x versions are compatible within a minor version, as semver says.
fn compatible(version: &str) -> bool {
    let ours: Vec<&str> = WIT_VERSION.split('.').collect();
    let theirs: Vec<&str> = version.split('.').collect();
    theirs.len() == 3 && theirs[0] == ours[0] && theirs[1] == ours[1]
}

/// A recipe ready to be called.
pub struct LoadedRecipe {
    label: String,
    pub source: RecipeSource,
    /// SHA-256 of the component bytes.
    pub sha256: String,
    pub info: RecipeInfo,
    pre: RecipeV0Pre<State>,
    /// Present when the recipe exports `calibrate` (contract 0.1.1 and later).
    calibrating: Option<CalibratingRecipeV0Pre<State>>,
    engine: Engine,
    limits: SandboxLimits,
}

impl LoadedRecipe {
    /// The recipe's own name (from `describe`).
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The recipe's verdict on a checkpoint: `Ok(Err(reason))` when it declines.
    /// Its strings come back escaped and cut (crate::text), ready to print.
    pub fn detect(
        &self,
        ctx: &Arc<HostContext>,
        params: Vec<(String, super::wit::ParamValue)>,
    ) -> Result<Result<Detection, String>, RecipeError> {
        let r =
            self.call("detect", Some(ctx.clone()), params, |s| self.pre.instantiate(&mut *s)?.quantsmith_recipe_recipe().call_detect(s))?;
        Ok(match r {
            Ok(d) => Ok(Detection { family: untrusted(&d.family), variant: untrusted(&d.variant), reason: untrusted(&d.reason), ..d }),
            Err(reason) => Err(untrusted(&reason)),
        })
    }

    /// The recipe's plan: `Ok(Err(reason))` when it refuses.
    /// A refusal comes back escaped and cut (crate::text), ready to print; the
    /// plan's notes are, by plan::resolve.
    pub fn plan(
        &self,
        ctx: &Arc<HostContext>,
        params: Vec<(String, super::wit::ParamValue)>,
    ) -> Result<Result<QuantPlan, String>, RecipeError> {
        let r = self.call("plan", Some(ctx.clone()), params, |s| self.pre.instantiate(&mut *s)?.quantsmith_recipe_recipe().call_plan(s))?;
        Ok(r.map_err(|reason| untrusted(&reason)))
    }

    /// Whether the recipe exports `calibrate` (contract 0.1.1 and later).
    pub fn can_calibrate(&self) -> bool {
        self.calibrating.is_some()
    }

    /// Runs the recipe's calibration with `session` serving its host calls, and
    /// hands the session back (its observers hold what the forward passes saw).
    /// `Ok((Ok(None), _))`: the recipe chose not to calibrate.
    #[allow(clippy::type_complexity)]
    pub fn calibrate(
        &self,
        ctx: &Arc<HostContext>,
        params: Vec<(String, super::wit::ParamValue)>,
        session: Box<dyn CalibSession>,
    ) -> Result<(Result<Option<CalibrationSettings>, String>, Box<dyn CalibSession>), RecipeError> {
        let Some(pre) = &self.calibrating else {
            return Ok((Ok(None), session));
        };
        let (result, state) = self.call_in_store("calibrate", Some(ctx.clone()), params, Some(session), |s| {
            pre.instantiate(&mut *s)?.quantsmith_recipe_calibrate().call_run(s)
        });
        let session = state.and_then(|s| s.calib).expect("the session stays in the store");
        result.map(|r| (r, session))
    }

    /// Runs one export in a fresh store: an instance that trapped is never re-entered.
    fn call<R>(
        &self,
        call: &'static str,
        ctx: Option<Arc<HostContext>>,
        params: Vec<(String, super::wit::ParamValue)>,
        f: impl FnOnce(&mut Store<State>) -> wasmtime::Result<R>,
    ) -> Result<R, RecipeError> {
        self.call_in_store(call, ctx, params, None, f).0
    }

    /// One call in a fresh store; also returns the store's data when the call
    /// did not fail to set up.
    fn call_in_store<R>(
        &self,
        call: &'static str,
        ctx: Option<Arc<HostContext>>,
        params: Vec<(String, super::wit::ParamValue)>,
        calib: Option<Box<dyn CalibSession>>,
        f: impl FnOnce(&mut Store<State>) -> wasmtime::Result<R>,
    ) -> (Result<R, RecipeError>, Option<State>) {
        let recipe = if self.info.name.is_empty() || self.info.name == self.label {
            self.label.clone()
        } else {
            format!("{} ({})", self.info.name, self.label)
        };
        let stderr = MemoryOutputPipe::new(64 << 10);
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .stdout(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }))
            .build();
        let limits = TotalMemoryLimiter { limit: self.limits.memory_bytes, used: 0 };
        let state = State {
            wasi,
            table: ResourceTable::new(),
            calib,
            started: Instant::now(),
            model_time: Duration::ZERO,
            out_of_time: false,
            slept: Duration::ZERO,
            budget: self.limits.timeout,
            limits,
            ctx,
            params,
            recipe: recipe.clone(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        // The budget covers the recipe's own time and the host work it asks for
        // (State::used); forward passes are bounded by their count instead.
        let budget = self.limits.timeout;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |ctx| {
            if ctx.data().used() < budget { Ok(wasmtime::UpdateDeadline::Continue(1)) } else { Err(wasmtime::Error::new(Trap::Interrupt)) }
        });
        let result = f(&mut store);
        let elapsed = store.data().used().min(Duration::from_secs(u32::MAX as u64));
        // A refused host call, or host work (lifting a huge result included) that
        // ran past the budget, ends the call as a timeout even when the recipe
        // handled the refusal and returned normally.
        let result = match result {
            Ok(_) if store.data().out_of_time || elapsed > budget => Err(wasmtime::Error::new(Trap::Interrupt)),
            r => r,
        };
        let result = result.map_err(|e| {
            let output = String::from_utf8_lossy(&stderr.contents()).trim().to_string();
            classify_failure(e, recipe, call, self.limits, elapsed, output)
        });
        (result, Some(store.into_data()))
    }
}

fn classify_failure(
    e: wasmtime::Error,
    recipe: String,
    call: &'static str,
    limits: SandboxLimits,
    elapsed: Duration,
    output: String,
) -> RecipeError {
    let text = format!("{e:#}");
    if text.contains("failed to convert function to given type") || text.contains("type mismatch") {
        return RecipeError::Load {
            recipe,
            reason: format!(
                "its exports do not match the quantsmith:recipe@{WIT_VERSION} contract this host speaks (built against a modified or newer WIT?): {text}"
            ),
        };
    }
    if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
        return RecipeError::Timeout { recipe, call, secs: elapsed.as_secs_f64().max(limits.timeout.as_secs_f64()) };
    }
    if text.contains("forcing trap when growing memory") || output.contains("memory allocation of") {
        return RecipeError::Memory { recipe, call, mib: limits.memory_bytes >> 20 };
    }
    let mut reason = match e.downcast_ref::<Trap>() {
        Some(Trap::UnreachableCodeReached) if !output.is_empty() => "it aborted".to_string(),
        Some(trap) => format!("wasm trap: {trap}"),
        None => text,
    };
    if !output.is_empty() {
        let tail: Vec<&str> = output.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
        reason.push_str(&format!("; its output: {}", tail.join(" | ")));
    }
    RecipeError::Trap { recipe, call, reason: untrusted(&reason) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn semver_for_zero_versions() {
        assert!(super::compatible("0.1.0"));
        assert!(super::compatible("0.1.7"));
        assert!(!super::compatible("0.2.0"));
        assert!(!super::compatible("1.1.0"));
        assert!(!super::compatible("unversioned"));
    }
}
