//! Fuzzing in the repository (issue 11, part 8), on stable Rust and with no
//! dependency beyond the crate's own: three targets driven by a seeded
//! generator, each case a pure function of its seed, so a failure is replayed by
//! its number.
//!
//! - `safetensors_reader`: tiny checkpoints with mutated headers and bytes
//!   through `Checkpoint::open`, the module table, statistics and decoding:
//!   never a panic; an error is always a classified one (exit 3).
//! - `plan_boundary`: random plans (rules, patterns, quantizable entries, notes)
//!   and parameter schemas through the host's validation of recipe output
//!   (`plan::resolve`, `params::check_schema`, `RawParams::validate`): never a panic.
//! - `cli_arguments`: random argv through the built binary's parsing and
//!   pre-work checks: never a panic (exit 101 or "internal error"), never exit 1,
//!   never a hang.
//!
//! A failing case is written to `tests/fuzz-corpus/<target>/` (commit it) and
//! fails the test; every file there is replayed on each run before the random
//! cases. `QUANTSMITH_FUZZ_CASES` multiplies the case counts and
//! `QUANTSMITH_FUZZ_SEED` moves the seeds, for longer runs by hand
//! (`QUANTSMITH_FUZZ_VERBOSE=1` prints each argv's exit code). The default
//! counts keep the three targets well under a minute on two cores.
//! docs/fuzzing.md lists what the fuzzer found and how each was fixed.

mod common;

use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quantsmith::checkpoint::Checkpoint;
use quantsmith::modules::ModuleTable;
use quantsmith::recipe::params::{RawParams, check_schema};
use quantsmith::recipe::wit::{ParamKind, ParamSpec, ParamValue, QuantFormat, QuantPlan, QuantizerRule};

/// SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number
/// generators", OOPSLA 2014): small, fast and good enough to pick mutations.
struct Gen(u64);

impl Gen {
    fn new(seed: u64) -> Gen {
        Gen(seed ^ 0x5851_f42d_4c95_7f2d)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn cases(default: u64) -> u64 {
    let m: u64 = std::env::var("QUANTSMITH_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    default * m.max(1)
}

fn base_seed() -> u64 {
    std::env::var("QUANTSMITH_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fuzz-corpus").join(target)
}

/// Every file of a target's corpus, sorted (replayed before the random cases).
fn corpus_files(target: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(corpus(target)).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    files.retain(|p| p.is_file() && p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.')));
    files.sort();
    files
}

/// Keeps a failing case in the corpus and returns the message to fail with.
fn keep(target: &str, name: &str, bytes: &[u8], why: &str) -> String {
    let dir = corpus(target);
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(name);
    let _ = std::fs::write(&path, bytes);
    format!("{target}: {why}\n  kept as {} (commit it: it is replayed on every run)", path.display())
}

// ---- (a) the safetensors reader ----------------------------------------

/// A tiny checkpoint in memory: a few Linear, conv and norm tensors of an SD1.5
/// UNet under its usual prefix, in bf16, f16 and f32, with metadata.
fn tiny_checkpoint() -> Vec<u8> {
    use safetensors::Dtype;
    let p = "model.diffusion_model.";
    let specs: Vec<(String, Dtype, Vec<usize>)> = vec![
        (format!("{p}input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"), Dtype::BF16, vec![8, 8]),
        (format!("{p}input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"), Dtype::F16, vec![8, 8]),
        (format!("{p}input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias"), Dtype::F16, vec![8]),
        (format!("{p}input_blocks.0.0.weight"), Dtype::F32, vec![4, 4, 3, 3]),
        (format!("{p}out.0.weight"), Dtype::F32, vec![4]),
        (format!("{p}time_embed.0.weight"), Dtype::BF16, vec![16, 4]),
    ];
    let data: Vec<Vec<u8>> = specs
        .iter()
        .enumerate()
        .map(|(i, (_, d, s))| {
            let n: usize = s.iter().product::<usize>() * d.bitsize() / 8;
            (0..n).map(|j| ((i * 131 + j * 7) % 61) as u8).collect()
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = specs
        .iter()
        .zip(&data)
        .map(|((n, d, s), b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta: std::collections::HashMap<String, String> =
        [("format".to_string(), "pt".to_string()), ("modelspec.architecture".to_string(), "stable-diffusion-v1".to_string())].into();
    safetensors::serialize(views, Some(meta)).unwrap()
}

/// Header tokens worth splicing in: numbers at the edges of the integer types,
/// dtypes, JSON punctuation, and what other formats start with.
const HEADER_TOKENS: &[&str] = &[
    "0",
    "-1",
    "18446744073709551615",
    "18446744073709551616",
    "4294967296",
    "1e309",
    "9007199254740993",
    "\"F8_E8M0\"",
    "\"U8\"",
    "\"BOOL\"",
    "\"F64\"",
    "\"I64\"",
    "[]",
    "[0]",
    "[1,2,3,4,5,6,7,8,9]",
    "{}",
    "null",
    "\"__metadata__\"",
    ",",
    ":",
    "\"",
    "\\u0000",
    "\u{202e}",
    "\"shape\"",
    "\"data_offsets\"",
    "\"dtype\"",
];

fn mutate_checkpoint(g: &mut Gen, base: &[u8]) -> Vec<u8> {
    let mut b = base.to_vec();
    let header_end = (8 + u64::from_le_bytes(base[..8].try_into().unwrap()) as usize).min(b.len());
    for _ in 0..1 + g.below(4) {
        // Earlier mutations may have cut the file short.
        let header_end = header_end.min(b.len());
        if header_end <= 8 {
            break;
        }
        match g.below(9) {
            // A byte of the header (most parsing lives there).
            0 | 1 => {
                let i = 8 + g.below(header_end - 8);
                b[i] = g.next() as u8;
            }
            // The header length.
            2 => {
                let len: u64 = match g.below(5) {
                    0 => g.next(),
                    1 => (header_end - 8) as u64 + 1 + g.below(16) as u64,
                    2 => (header_end as u64 - 8).saturating_sub(1 + g.below(16) as u64),
                    3 => 0,
                    _ => (100 << 20) + g.below(4) as u64,
                };
                b[..8].copy_from_slice(&len.to_le_bytes());
            }
            // A token spliced over a stretch of the header.
            3 | 4 => {
                let tok = g.pick(HEADER_TOKENS).as_bytes().to_vec();
                let at = 8 + g.below(header_end - 8);
                let cut = g.below(12).min(b.len() - at);
                b.splice(at..at + cut, tok);
            }
            // A digit run of the header replaced by a huge or tiny number.
            5 => {
                let digits: Vec<usize> = (8..header_end).filter(|&i| b[i].is_ascii_digit()).collect();
                if let Some(&at) = digits.get(g.below(digits.len())) {
                    let end = (at..b.len()).find(|&i| !b[i].is_ascii_digit()).unwrap_or(b.len());
                    let num = g
                        .pick(&["0", "1", "99999999999", "18446744073709551615", "340282366920938463463374607431768211456"])
                        .as_bytes()
                        .to_vec();
                    b.splice(at..end, num);
                }
            }
            // Truncated or extended data.
            6 => {
                let keep = g.below(b.len() + 1);
                b.truncate(keep);
            }
            7 => {
                let extra = g.below(64);
                b.extend((0..extra).map(|_| g.next() as u8));
            }
            // A data byte (NaN/Inf patterns included).
            _ => {
                if b.len() > header_end {
                    let i = header_end + g.below(b.len() - header_end);
                    b[i] = *g.pick(&[0x7f, 0x80, 0xff, 0x7c, 0xc0, 0x00]);
                }
            }
        }
    }
    b
}

/// Opens `bytes` as a checkpoint and walks what a run reads first. `Err` only
/// for a panic or an unclassified error.
fn read_checkpoint(dir: &Path, bytes: &[u8]) -> Result<(), String> {
    let path = dir.join("case.safetensors");
    std::fs::write(&path, bytes).map_err(|e| format!("cannot write the case: {e}"))?;
    let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
        let ckpt = match Checkpoint::open(&path) {
            Ok(c) => c,
            Err(e) => {
                let e = anyhow::Error::from(e);
                return match quantsmith::error::exit_code(&e) {
                    quantsmith::error::EXIT_BAD_INPUT => Ok(()),
                    code => Err(format!("exit {code} for a bad file: {e:#}")),
                };
            }
        };
        let modules = ModuleTable::build(&ckpt);
        let _ = modules.len();
        for t in ckpt.tensors() {
            let bytes = ckpt.bytes(t);
            let _ = quantsmith::checkpoint::elements::stats(t.dtype, bytes);
            if t.elements() <= 4096 {
                let _ = quantsmith::checkpoint::elements::decode_f64(t.dtype, bytes);
            }
        }
        Ok(())
    }));
    match outcome {
        Ok(r) => r,
        Err(p) => Err(format!("panic: {}", panic_text(&p))),
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "(no message)".into())
}

#[test]
fn safetensors_reader() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for path in corpus_files("safetensors") {
        let bytes = std::fs::read(&path).unwrap();
        if let Err(why) = read_checkpoint(dir.path(), &bytes) {
            failures.push(format!("corpus {}: {why}", path.display()));
        }
    }
    let base = tiny_checkpoint();
    read_checkpoint(dir.path(), &base).expect("the unmutated checkpoint reads");
    for i in 0..cases(1500) {
        let seed = base_seed().wrapping_add(i);
        let bytes = mutate_checkpoint(&mut Gen::new(seed), &base);
        if let Err(why) = read_checkpoint(dir.path(), &bytes) {
            failures.push(keep("safetensors", &format!("seed-{seed}.safetensors"), &bytes, &why));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `check` on a mutated converted file: the output side of the reader (a
/// converted file is as untrusted as any download). Never a panic.
fn check_converted(dir: &Path, source: &Checkpoint, bytes: &[u8]) -> Result<(), String> {
    let path = dir.join("converted-case.safetensors");
    std::fs::write(&path, bytes).map_err(|e| format!("cannot write the case: {e}"))?;
    catch_unwind(AssertUnwindSafe(|| {
        let _ = quantsmith::evaluate::check_output(source, &path);
    }))
    .map_err(|p| format!("panic in check: {}", panic_text(&p)))
}

#[test]
fn checked_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "sd15");
    let source = Checkpoint::open(&input).unwrap();
    let mut failures = Vec::new();
    for format in ["fp8", "nvfp4"] {
        let output = dir.path().join(format!("{format}.safetensors"));
        common::run(&input, &output, Some("sd15"), &[&format!("format={format}")]).unwrap();
        let base = std::fs::read(&output).unwrap();
        check_converted(dir.path(), &source, &base).expect("the converted file checks");
        for path in corpus_files("checked") {
            let bytes = std::fs::read(&path).unwrap();
            if let Err(why) = check_converted(dir.path(), &source, &bytes) {
                failures.push(format!("corpus {}: {why}", path.display()));
            }
        }
        for i in 0..cases(150) {
            let seed = base_seed().wrapping_add(i);
            let bytes = mutate_checkpoint(&mut Gen::new(seed), &base);
            if let Err(why) = check_converted(dir.path(), &source, &bytes) {
                failures.push(keep("checked", &format!("{format}-seed-{seed}.safetensors"), &bytes, &why));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---- (b) the plan / WIT boundary ----------------------------------------

/// Pieces of patterns: real module names, glob syntax (balanced or not), and
/// characters that have broken glob compilers.
const PATTERN_PIECES: &[&str] = &[
    "*",
    "?",
    "[",
    "]",
    "[!",
    "{",
    "}",
    ",",
    "\\",
    ".",
    "input_blocks",
    "1",
    "transformer_blocks.0",
    "attn1",
    "to_q",
    "to_out.0",
    "weight_quantizer",
    "input_quantizer",
    "time_embed.0",
    "out",
    "[qkv]",
    "{a,b}",
    "**",
    "[\\u{0}-\\u{10ffff}]",
    "\u{0}",
    "\u{1b}[2J",
    "é",
    "[z-a]",
    "{,}",
    "[]]",
];

fn random_pattern(g: &mut Gen) -> String {
    if g.chance(40) {
        // Around the length cap.
        let n = quantsmith::plan::MAX_PATTERN_LEN - 2 + g.below(5);
        return "a*".repeat(n / 2 + 1)[..n].to_string();
    }
    (0..1 + g.below(6)).map(|_| *g.pick(PATTERN_PIECES)).collect()
}

fn random_plan(g: &mut Gen) -> QuantPlan {
    let formats = [None, Some(QuantFormat::Fp8), Some(QuantFormat::Int8), Some(QuantFormat::Nvfp4), Some(QuantFormat::Mxfp8)];
    let rules = (0..g.below(12))
        .map(|_| QuantizerRule {
            pattern: random_pattern(g),
            enable: !g.chance(4),
            format: *g.pick(&formats),
            axis: *g.pick(&[None, None, Some(0), Some(1), Some(-1), Some(i32::MAX)]),
            block_size: *g.pick(&[None, None, Some(16), Some(32), Some(0), Some(u32::MAX)]),
        })
        .collect();
    let quantizable = (0..g.below(5)).map(|_| if g.chance(2) { "*".to_string() } else { random_pattern(g) }).collect();
    let notes = (0..g.below(3)).map(|_| random_pattern(g)).collect();
    QuantPlan { quantizable, rules, notes }
}

fn random_text(g: &mut Gen) -> String {
    match g.below(6) {
        0 => String::new(),
        1 => "x".repeat(g.below(5000)),
        2 => "\u{1b}[31m\u{202e}\0\n".into(),
        _ => random_pattern(g),
    }
}

fn random_value(g: &mut Gen) -> ParamValue {
    match g.below(4) {
        0 => ParamValue::Boolean(g.chance(2)),
        1 => ParamValue::Integer(g.next() as i64),
        2 => ParamValue::Number(*g.pick(&[0.0, -1.5, f64::NAN, f64::INFINITY, 1e308])),
        _ => ParamValue::Text(random_text(g)),
    }
}

fn random_schema(g: &mut Gen) -> Vec<ParamSpec> {
    let kinds = [ParamKind::Boolean, ParamKind::Integer, ParamKind::Number, ParamKind::Text, ParamKind::Choice];
    let n = if g.chance(30) { quantsmith::recipe::params::MAX_PARAMS + g.below(3) } else { g.below(6) };
    (0..n)
        .map(|i| ParamSpec {
            name: if g.chance(8) { random_text(g) } else { format!("p{}", i % (1 + g.below(8))) },
            kind: *g.pick(&kinds),
            default: random_value(g),
            allowed: (0..g.below(4)).map(|_| random_text(g)).collect(),
            help: random_text(g),
        })
        .collect()
}

fn random_sets(g: &mut Gen, schema: &[ParamSpec]) -> RawParams {
    let mut raw = RawParams::default();
    for _ in 0..g.below(4) {
        let key = match schema.get(g.below(schema.len() + 1)) {
            Some(p) if !g.chance(5) => p.name.clone(),
            _ => random_text(g),
        };
        let value = *g.pick(&["true", "0", "-3", "1e3", "nan", "inf", "fp8", "", "x y"]);
        let _ = raw.set(&format!("{key}={value}"));
    }
    if g.chance(3) {
        let toml: &&str = g.pick(&["a = 1", "[params]\nb = \"x\"", "c = [1]", "= broken", "d = 1e400"]);
        let _ = raw.load_toml(toml, "fuzz.toml");
    }
    raw
}

/// Serialised plan cases in the corpus: one line per item, fields split by tabs.
fn plan_to_text(p: &QuantPlan) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('\t', "\\t").replace('\n', "\\n");
    let mut out = String::new();
    for q in &p.quantizable {
        out.push_str(&format!("quantizable\t{}\n", esc(q)));
    }
    for r in &p.rules {
        let f = r.format.map(|f| format!("{f:?}")).unwrap_or_default();
        let a = r.axis.map(|a| a.to_string()).unwrap_or_default();
        let b = r.block_size.map(|b| b.to_string()).unwrap_or_default();
        out.push_str(&format!("rule\t{}\t{}\t{f}\t{a}\t{b}\n", esc(&r.pattern), r.enable));
    }
    for n in &p.notes {
        out.push_str(&format!("note\t{}\n", esc(n)));
    }
    out
}

fn plan_from_text(text: &str) -> QuantPlan {
    let unesc = |s: &str| {
        let mut out = String::new();
        let mut it = s.chars();
        while let Some(c) = it.next() {
            if c == '\\' {
                match it.next() {
                    Some('t') => out.push('\t'),
                    Some('n') => out.push('\n'),
                    Some(o) => out.push(o),
                    None => {}
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    let mut p = QuantPlan { quantizable: vec![], rules: vec![], notes: vec![] };
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        match f[0] {
            "quantizable" => p.quantizable.push(unesc(f.get(1).copied().unwrap_or(""))),
            "note" => p.notes.push(unesc(f.get(1).copied().unwrap_or(""))),
            "rule" => {
                let format = match f.get(3).copied().unwrap_or("") {
                    "Fp8" => Some(QuantFormat::Fp8),
                    "Int8" => Some(QuantFormat::Int8),
                    "Nvfp4" => Some(QuantFormat::Nvfp4),
                    "Mxfp8" => Some(QuantFormat::Mxfp8),
                    _ => None,
                };
                p.rules.push(QuantizerRule {
                    pattern: unesc(f.get(1).copied().unwrap_or("")),
                    enable: f.get(2) == Some(&"true"),
                    format,
                    axis: f.get(4).and_then(|a| a.parse().ok()),
                    block_size: f.get(5).and_then(|b| b.parse().ok()),
                });
            }
            other => panic!("unknown corpus line kind {other:?}"),
        }
    }
    p
}

fn check_plan(ckpt: &Checkpoint, modules: &ModuleTable, plan: &QuantPlan) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| {
        if let Ok(r) = quantsmith::plan::resolve(plan, modules, ckpt) {
            // What reaches the terminal is escaped.
            for s in r.notes.iter().chain(&r.warnings) {
                let shown = quantsmith::text::untrusted(s);
                assert!(!shown.contains('\u{1b}'), "a raw escape reaches the terminal: {shown:?}");
            }
        }
    }))
    .map_err(|p| format!("panic: {}", panic_text(&p)))
}

#[test]
fn plan_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::synth_tiny(dir.path(), "sd15");
    let ckpt = Checkpoint::open(&input).unwrap();
    let modules = ModuleTable::build(&ckpt);
    let mut failures = Vec::new();
    for path in corpus_files("plan") {
        let plan = plan_from_text(&std::fs::read_to_string(&path).unwrap());
        if let Err(why) = check_plan(&ckpt, &modules, &plan) {
            failures.push(format!("corpus {}: {why}", path.display()));
        }
    }
    for i in 0..cases(1500) {
        let seed = base_seed().wrapping_add(i);
        let mut g = Gen::new(seed);
        let plan = random_plan(&mut g);
        if let Err(why) = check_plan(&ckpt, &modules, &plan) {
            failures.push(keep("plan", &format!("seed-{seed}.plan"), plan_to_text(&plan).as_bytes(), &why));
        }
        let schema = random_schema(&mut g);
        let raw = random_sets(&mut g, &schema);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            if check_schema(&schema).is_ok() {
                let _ = raw.validate("fuzz", &schema);
            }
        }));
        if let Err(p) = outcome {
            // Schemas are not kept as files: the seed replays them.
            failures.push(format!("plan: schema of seed {seed} panics: {}", panic_text(&p)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---- (c) command-line arguments -----------------------------------------

const EXE: &str = env!("CARGO_BIN_EXE_run-recipe");

/// The files an argv may name, as placeholders in corpus files.
struct Files {
    tiny: PathBuf,
    garbage: PathBuf,
    missing: PathBuf,
    dir: PathBuf,
    fifo: PathBuf,
    out: PathBuf,
    toml: PathBuf,
}

impl Files {
    fn new(root: &Path) -> Files {
        let tiny = common::synth_tiny(root, "sd15");
        let garbage = root.join("garbage.safetensors");
        std::fs::write(&garbage, b"\x10\0\0\0\0\0\0\0{\"a\":1}").unwrap();
        let dir = root.join("folder");
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = root.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a plain mkfifo on a path we own.
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        let toml = root.join("p.toml");
        std::fs::write(&toml, "format = \"int8\"\n[params]\nx = 1\n").unwrap();
        Files { tiny, garbage, missing: root.join("missing.safetensors"), dir, fifo, out: root.join("out.safetensors"), toml }
    }

    fn expand(&self, arg: &str) -> String {
        let s = |p: &PathBuf| p.to_str().unwrap().to_string();
        match arg {
            "{TINY}" => s(&self.tiny),
            "{GARBAGE}" => s(&self.garbage),
            "{MISSING}" => s(&self.missing),
            "{DIR}" => s(&self.dir),
            "{FIFO}" => s(&self.fifo),
            "{OUT}" => s(&self.out),
            "{MISSING}/x" => format!("{}/x", s(&self.missing)),
            "{TOML}" => s(&self.toml),
            other => other.to_string(),
        }
    }
}

const COMMANDS: &[&str] = &["run", "run", "run", "inspect", "recipes", "check", "synth", "forward", "--help", "-V", "bogus"];
const FLAGS: &[&str] = &[
    "-o",
    "--output",
    "--recipe",
    "--set",
    "--config",
    "--dry-run",
    "--layout",
    "--device",
    "--verify",
    "--report",
    "--force",
    "--quiet",
    "-v",
    "--calibrate",
    "--clip-vocab",
    "--text-encoder",
    "--t5-tokenizer",
    "--calib-data",
    "--eval-inputs",
    "--eval-resolution",
    "--calib-max-forwards",
    "--recipe-timeout",
    "--recipe-memory",
    "--scale",
    "--seed",
    "--variant",
    "--inputs",
    "--out",
    "--repeat",
    "--",
    "-",
];
const VALUES: &[&str] = &[
    "{TINY}",
    "{GARBAGE}",
    "{MISSING}",
    "{DIR}",
    "{FIFO}",
    "{OUT}",
    "{TOML}",
    "sd15",
    "sdxl",
    "flux",
    "auto",
    "cpu",
    "cuda",
    "cuda:99",
    "tpu",
    "comfy",
    "comfy-legacy",
    "on",
    "off",
    "format=nvfp4",
    "format=mxfp8",
    "format=int4",
    "format=",
    "=x",
    "exclude=*",
    "mode=loop",
    "0",
    "-1",
    "1e20",
    "nan",
    "inf",
    "0.001",
    "4096",
    "4097",
    "18446744073709551616",
    "",
    " ",
    "\u{1b}[2J",
    "\u{202e}",
    "tiny",
    "clip-l",
];

/// Values that fit each flag, so that most argv get past clap into the checks
/// (a random value from VALUES is used the rest of the time).
fn fitting_value(g: &mut Gen, flag: &str) -> Option<&'static str> {
    Some(match flag {
        "-o" | "--output" | "--out" | "--report" => *g.pick(&["{OUT}", "{DIR}", "{MISSING}/x", "{TINY}", "{FIFO}"]),
        "--recipe" => *g.pick(&["sd15", "sdxl", "auto", "{GARBAGE}", "{FIFO}", "x.wasm"]),
        "--set" => *g.pick(&[
            "format=nvfp4",
            "format=mxfp8",
            "format=int8",
            "format=fp8",
            "uncalibrated-fp8=fast",
            "exclude=*attn*",
            "calib-steps=2",
        ]),
        "--config" | "--inputs" | "--calib-data" | "--text-encoder" | "--t5-tokenizer" => {
            *g.pick(&["{TOML}", "{TINY}", "{GARBAGE}", "{FIFO}", "{DIR}"])
        }
        "--clip-vocab" => *g.pick(&["{DIR}", "{TINY}", "{MISSING}"]),
        "--layout" => *g.pick(&["comfy", "comfy-legacy"]),
        "--device" => *g.pick(&["cpu", "auto", "cuda", "cuda:1"]),
        "--calibrate" => *g.pick(&["off", "auto", "on"]),
        "--eval-inputs" | "--eval-resolution" | "--calib-max-forwards" | "--repeat" | "--seed" => {
            *g.pick(&["0", "1", "64", "4096", "1000000"])
        }
        "--recipe-timeout" => *g.pick(&["0.01", "0.5", "10", "86400"]),
        "--recipe-memory" => *g.pick(&["1", "64", "4096"]),
        "--scale" => "tiny",
        "--variant" => *g.pick(&["schnell", "inpaint", "refiner", "3.5-large"]),
        _ => return None,
    })
}

/// The flags each subcommand takes (picked most of the time, so that argv get
/// past clap), its positionals, and where they may point.
fn command_flags(command: &str) -> (&'static [&'static str], usize) {
    const SANDBOX: &[&str] = &["--recipe-timeout", "--recipe-memory"];
    match command {
        "run" => (
            &[
                "-o",
                "--recipe",
                "--set",
                "--set",
                "--config",
                "--layout",
                "--device",
                "--verify",
                "--report",
                "--force",
                "--quiet",
                "--calibrate",
                "--clip-vocab",
                "--text-encoder",
                "--t5-tokenizer",
                "--calib-data",
                "--eval-inputs",
                "--eval-resolution",
                "--calib-max-forwards",
                "--recipe-timeout",
                "--recipe-memory",
            ],
            1,
        ),
        "inspect" => (SANDBOX, 1),
        "recipes" => (&["--recipe", "--recipe-timeout", "--recipe-memory"], 0),
        "check" => (&[], 2),
        "synth" => (&["-o", "--scale", "--seed", "--variant", "--full-checkpoint"], 1),
        "forward" => (&["--inputs", "--out", "--device", "--repeat"], 1),
        _ => (&[], 1),
    }
}

fn random_argv(g: &mut Gen) -> Vec<String> {
    let command = *g.pick(COMMANDS);
    let mut argv = vec![command.to_string()];
    if g.chance(6) {
        argv.insert(0, "-v".into());
    }
    let (flags, positionals) = command_flags(command);
    // Its positionals, most of the time.
    for _ in 0..positionals {
        if !g.chance(6) {
            let pool: &[&str] = if command == "synth" {
                &["sd15", "sdxl", "flux", "sd3", "clip-l", "t5xxl", "bogus"]
            } else {
                &["{TINY}", "{TINY}", "{GARBAGE}", "{MISSING}", "{DIR}", "{FIFO}"]
            };
            argv.push(g.pick(pool).to_string());
        }
    }
    for _ in 0..g.below(6) {
        match g.below(8) {
            0 => argv.push(g.pick(VALUES).to_string()),
            1 if g.chance(4) => argv.push(format!("--set=exclude={}", "a*".repeat(g.below(400)))),
            _ => {
                let flag = if flags.is_empty() || g.chance(8) { *g.pick(FLAGS) } else { *g.pick(flags) };
                argv.push(flag.to_string());
                if matches!(flag, "--dry-run" | "--verify" | "--force" | "--quiet" | "--full-checkpoint" | "--" | "-") {
                    continue;
                }
                match fitting_value(g, flag) {
                    Some(v) if !g.chance(6) => argv.push(v.to_string()),
                    _ if !g.chance(4) => argv.push(g.pick(VALUES).to_string()),
                    _ => {}
                }
            }
        }
    }
    // A run that gets past every check converts the tiny model: keep it to a dry run.
    if command == "run" && argv.iter().any(|a| a == "{TINY}") {
        argv.push("--dry-run".into());
    }
    // `synth` writes only tiny files, and only into the case's folder.
    if command == "synth" {
        let mut kept = Vec::new();
        let mut skip = false;
        for a in argv.drain(..) {
            if std::mem::take(&mut skip) {
                continue;
            }
            skip = a == "--scale";
            if a != "--scale" && a != "--full-checkpoint" {
                kept.push(a);
            }
        }
        argv = kept;
        if !argv.iter().any(|a| a == "-o") && !g.chance(4) {
            argv.extend(["-o".into(), "{OUT}".into()]);
        }
        argv.extend(["--scale".into(), "tiny".into()]);
    }
    argv
}

/// Runs one argv; `Err` for a panic, an internal error (exit 1), a signal or a hang.
fn run_argv(files: &Files, cwd: &Path, argv: &[String]) -> Result<(), String> {
    let args: Vec<String> = argv.iter().map(|a| files.expand(a)).collect();
    let mut child = Command::new(EXE)
        .args(&args)
        .current_dir(cwd)
        .env("QUANTSMITH_CACHE_DIR", cwd.join("cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut s);
        s
    });
    // Generous: a hang is what this catches, not slowness.
    let limit = Duration::from_secs(120);
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {limit:?} (a hang)"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stderr = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    let _ = std::fs::remove_file(&files.out);
    let tail: String = stderr.chars().rev().take(600).collect::<Vec<_>>().into_iter().rev().collect();
    if std::env::var_os("QUANTSMITH_FUZZ_VERBOSE").is_some() {
        println!("exit {:?} {argv:?}", status.code());
    }
    match status.code() {
        _ if stderr.contains("panicked") || stderr.contains("internal error") => Err(format!("a panic: {tail}")),
        Some(0 | 2 | 3 | 4) => Ok(()),
        Some(code) => Err(format!("exit {code}: {tail}")),
        None => Err(format!("killed by a signal ({status}): {tail}")),
    }
}

#[test]
fn cli_arguments() {
    let root = tempfile::tempdir().unwrap();
    let files = Files::new(root.path());
    let cwd = root.path().join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let mut failures = Vec::new();
    for path in corpus_files("cli") {
        let argv: Vec<String> = std::fs::read_to_string(&path).unwrap().lines().map(str::to_string).collect();
        if let Err(why) = run_argv(&files, &cwd, &argv) {
            failures.push(format!("corpus {}: {argv:?}: {why}", path.display()));
        }
    }
    for i in 0..cases(100) {
        let seed = base_seed().wrapping_add(i);
        let argv = random_argv(&mut Gen::new(seed));
        if let Err(why) = run_argv(&files, &cwd, &argv) {
            let text = argv.join("\n");
            failures.push(keep("cli", &format!("seed-{seed}.argv"), text.as_bytes(), &format!("{argv:?}: {why}")));
        }
    }
    let _ = std::io::stdout().flush();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
