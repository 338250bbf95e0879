//! Progress of the long stages (write, calibration, evaluation, check, synthesize).
//!
//! On a terminal a stage is an indicatif bar with its name and an ETA. When
//! stderr is not a terminal (a log file, a pipe, CI) a bar would either vanish
//! or fill the log with cursor escapes, so the stage prints plain lines
//! instead: one when it starts, one when it ends, and between them one each
//! time another tenth of the work is done, at most one per [`MIN_INTERVAL`] (a
//! fast stage prints only its start and end), or after [`QUIET_INTERVAL`] of
//! silence when the total is unknown or a tenth takes long. Each line has the
//! stage, done/total, elapsed time and ETA, and never an escape sequence.
//!
//! A [`Progress`] is a cheap handle (clones share one display); the default one
//! is hidden, which is what library callers and `--quiet` get.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Shortest time between two plain progress lines of a stage.
pub const MIN_INTERVAL: Duration = Duration::from_secs(2);
/// Longest silence of a plain-lines display while work is going on.
pub const QUIET_INTERVAL: Duration = Duration::from_secs(30);

/// What a stage counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    /// Items, named in the plural ("forward passes", "tensors").
    Items(&'static str),
}

/// A stage's progress display (see the module header); `Progress::default()` shows nothing.
#[derive(Clone, Default)]
pub struct Progress(Option<Arc<Stage>>);

struct Stage {
    name: &'static str,
    unit: Unit,
    started: Instant,
    display: Display,
}

enum Display {
    Bar(indicatif::ProgressBar),
    Lines(Mutex<Lines>),
}

struct Lines {
    done: u64,
    total: Option<u64>,
    /// Tenths of the total already reported.
    tenths: u64,
    last: Instant,
    finished: bool,
}

/// Every bar of the process draws through this one, so that log lines can be
/// written between redraws ([`StderrBesideBars`]) instead of through a bar.
fn bars() -> &'static indicatif::MultiProgress {
    static BARS: OnceLock<indicatif::MultiProgress> = OnceLock::new();
    BARS.get_or_init(|| indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr()))
}

/// stderr for log lines: while a bar is drawn, it is cleared for the write and
/// drawn again below the line (the logger's writer in `main.rs`).
pub struct StderrBesideBars;

impl Write for StderrBesideBars {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        bars().suspend(|| std::io::stderr().write(buf))
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        bars().suspend(|| std::io::stderr().write_all(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Whether stderr gets bars (a terminal that draws them) or plain lines.
fn stderr_draws_bars() -> bool {
    std::io::stderr().is_terminal() && std::env::var("TERM").ok().is_none_or(|t| t != "dumb")
}

impl Progress {
    /// A hidden display: every call is a no-op.
    pub fn hidden() -> Progress {
        Progress(None)
    }

    /// A visible display for stage `name` on stderr; `total` may come later ([`Progress::set_total`]).
    pub fn start(name: &'static str, unit: Unit, total: Option<u64>) -> Progress {
        let display = if stderr_draws_bars() {
            let pb = bars().add(indicatif::ProgressBar::with_draw_target(total, indicatif::ProgressDrawTarget::hidden()));
            pb.set_prefix(name);
            pb.set_style(bar_style(unit, total.is_some()));
            // Elapsed time and the spinner move while one step (a model load, a forward pass) takes long.
            pb.enable_steady_tick(Duration::from_millis(250));
            Display::Bar(pb)
        } else {
            Display::Lines(Mutex::new(Lines { done: 0, total, tenths: 0, last: Instant::now(), finished: false }))
        };
        let stage = Stage { name, unit, started: Instant::now(), display };
        if let Display::Lines(lines) = &stage.display {
            let l = lines.lock().unwrap_or_else(|e| e.into_inner());
            stage.print(&l, "started");
        }
        Progress(Some(Arc::new(stage)))
    }

    /// Whether anything is shown.
    pub fn is_visible(&self) -> bool {
        self.0.is_some()
    }

    /// Sets the total (an estimate may be corrected later; the count never exceeds it).
    pub fn set_total(&self, total: u64) {
        let Some(s) = &self.0 else { return };
        match &s.display {
            Display::Bar(pb) => {
                if pb.length().is_none() {
                    pb.set_style(bar_style(s.unit, true));
                }
                pb.set_length(total.max(pb.position()));
            }
            Display::Lines(lines) => {
                let mut l = lines.lock().unwrap_or_else(|e| e.into_inner());
                l.total = Some(total.max(l.done));
                l.tenths = tenths(l.done, l.total);
            }
        }
    }

    /// Whether a total is known.
    pub fn has_total(&self) -> bool {
        match self.0.as_deref().map(|s| &s.display) {
            Some(Display::Bar(pb)) => pb.length().is_some(),
            Some(Display::Lines(lines)) => lines.lock().unwrap_or_else(|e| e.into_inner()).total.is_some(),
            None => false,
        }
    }

    /// `n` more units done.
    pub fn inc(&self, n: u64) {
        let Some(s) = &self.0 else { return };
        match &s.display {
            Display::Bar(pb) => {
                if pb.length().is_some_and(|len| pb.position() + n > len) {
                    pb.set_length(pb.position() + n);
                }
                pb.inc(n);
            }
            Display::Lines(lines) => {
                let mut l = lines.lock().unwrap_or_else(|e| e.into_inner());
                l.done += n;
                s.advance(&mut l);
            }
        }
    }

    /// `done` units done in all.
    pub fn set_position(&self, done: u64) {
        let Some(s) = &self.0 else { return };
        match &s.display {
            Display::Bar(pb) => {
                if pb.length().is_some_and(|len| done > len) {
                    pb.set_length(done);
                }
                pb.set_position(done);
            }
            Display::Lines(lines) => {
                let mut l = lines.lock().unwrap_or_else(|e| e.into_inner());
                l.done = done;
                s.advance(&mut l);
            }
        }
    }

    /// The stage is over: the bar is cleared, plain lines say how long it took.
    pub fn finish(&self) {
        let Some(s) = &self.0 else { return };
        match &s.display {
            Display::Bar(pb) => {
                pb.finish_and_clear();
                bars().remove(pb);
            }
            Display::Lines(lines) => {
                let mut l = lines.lock().unwrap_or_else(|e| e.into_inner());
                if !l.finished {
                    l.finished = true;
                    s.print(&l, "done");
                }
            }
        }
    }
}

/// Tenths of `total` that `done` has reached (0 without a total).
fn tenths(done: u64, total: Option<u64>) -> u64 {
    match total {
        Some(t) if t > 0 => (done.min(t) * 10 / t).min(10),
        _ => 0,
    }
}

fn bar_style(unit: Unit, known_total: bool) -> indicatif::ProgressStyle {
    // No colour in any template: a terminal with NO_COLOR set gets the same bar.
    let template = match (unit, known_total) {
        (Unit::Bytes, true) => {
            "{prefix}: [{elapsed_precise}] {bar:40} {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, eta {eta})"
        }
        (Unit::Bytes, false) => "{prefix}: {spinner} [{elapsed_precise}] {binary_bytes} ({binary_bytes_per_sec})",
        (Unit::Items(_), true) => "{prefix}: [{elapsed_precise}] {bar:40} {pos}/{len} {unit} (eta {eta})",
        (Unit::Items(_), false) => "{prefix}: {spinner} [{elapsed_precise}] {pos} {unit}",
    };
    let style = indicatif::ProgressStyle::with_template(template).expect("the templates above are valid");
    match unit {
        Unit::Items(what) => style.with_key("unit", move |_: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(what);
        }),
        Unit::Bytes => style,
    }
}

impl Lines {
    /// Whether a line is due at `now`: another tenth is done and [`MIN_INTERVAL`]
    /// passed since the last line, or [`QUIET_INTERVAL`] passed in silence. The
    /// last tenth is left to the closing line ([`Progress::finish`]).
    fn due(&mut self, now: Instant) -> bool {
        if let Some(t) = self.total
            && self.done > t
        {
            self.total = Some(self.done);
        }
        let reached = tenths(self.done, self.total);
        let since = now.saturating_duration_since(self.last);
        let new_tenth = reached > self.tenths && reached < 10 && since >= MIN_INTERVAL;
        if new_tenth || since >= QUIET_INTERVAL {
            self.tenths = reached;
            self.last = now;
            return true;
        }
        false
    }
}

impl Stage {
    fn advance(&self, l: &mut Lines) {
        if l.due(Instant::now()) {
            self.print(l, "");
        }
    }

    fn print(&self, l: &Lines, what: &str) {
        let line = format_line(self.name, self.unit, l.done, l.total, self.started.elapsed(), what);
        // A failed write to stderr has nowhere to be reported.
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }
}

/// One plain progress line, e.g. `calibration: 8/16 forward passes (50%), 6.1 s elapsed, eta 6.1 s`.
pub fn format_line(stage: &str, unit: Unit, done: u64, total: Option<u64>, elapsed: Duration, what: &str) -> String {
    let amount = |n: u64| match unit {
        Unit::Bytes => crate::text::human_bytes(n),
        Unit::Items(_) => n.to_string(),
    };
    let noun = match unit {
        Unit::Bytes => String::new(),
        Unit::Items(what) => format!(" {what}"),
    };
    let secs = elapsed.as_secs_f64();
    let mut s = format!("{stage}: ");
    if !what.is_empty() {
        s.push_str(what);
        s.push_str(", ");
    }
    match total {
        Some(t) => {
            let pct = (done.min(t) * 100).checked_div(t).unwrap_or(100);
            s.push_str(&format!("{}/{}{noun} ({pct}%)", amount(done), amount(t)));
        }
        None => s.push_str(&format!("{}{noun}", amount(done))),
    }
    s.push_str(&format!(", {secs:.1} s elapsed"));
    if what != "done"
        && let Some(t) = total.filter(|&t| done > 0 && done < t)
    {
        let eta = secs * (t - done) as f64 / done as f64;
        s.push_str(&format!(", eta {eta:.1} s"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_stage_count_elapsed_and_eta() {
        let l = format_line("calibration", Unit::Items("forward passes"), 8, Some(16), Duration::from_secs(6), "");
        assert_eq!(l, "calibration: 8/16 forward passes (50%), 6.0 s elapsed, eta 6.0 s");
        let l = format_line("write", Unit::Bytes, 1536, Some(3072), Duration::from_secs(1), "");
        assert_eq!(l, "write: 1.50 KiB/3.00 KiB (50%), 1.0 s elapsed, eta 1.0 s");
        let l = format_line("calibration", Unit::Items("forward passes"), 3, None, Duration::from_millis(2500), "");
        assert_eq!(l, "calibration: 3 forward passes, 2.5 s elapsed");
        let l = format_line("check", Unit::Items("tensors"), 10, Some(10), Duration::from_secs(2), "done");
        assert_eq!(l, "check: done, 10/10 tensors (100%), 2.0 s elapsed");
    }

    #[test]
    fn a_line_per_tenth_at_most() {
        let t0 = Instant::now();
        let lines = |total| Lines { done: 0, total, tenths: 0, last: t0, finished: false };
        // A slow stage (a unit every second): a line at each tenth but the last, which the closing line reports.
        let mut l = lines(Some(100));
        let due: Vec<u64> = (1..=100u64)
            .filter(|&i| {
                l.done = i;
                l.due(t0 + Duration::from_secs(i))
            })
            .collect();
        assert_eq!(due, [10, 20, 30, 40, 50, 60, 70, 80, 90]);
        // A fast stage (all of it within MIN_INTERVAL): no line between start and end.
        let mut l = lines(Some(100));
        assert!((1..=100).all(|i| {
            l.done = i;
            !l.due(t0 + Duration::from_millis(i * 10))
        }));
        // Tenths reached too fast are reported together once MIN_INTERVAL has passed.
        let mut l = lines(Some(10));
        l.done = 3;
        assert!(!l.due(t0 + Duration::from_secs(1)));
        assert!(l.due(t0 + MIN_INTERVAL));
        assert_eq!(l.tenths, 3);
        // Without a total, a line only after a long silence.
        let mut l = lines(None);
        l.done = 5;
        assert!(!l.due(t0 + MIN_INTERVAL));
        assert!(l.due(t0 + QUIET_INTERVAL));
        assert!(!l.due(t0 + QUIET_INTERVAL + MIN_INTERVAL));
        // A total below the count grows to it: never past 100%.
        let mut l = Lines { done: 150, total: Some(100), tenths: 9, last: t0, finished: false };
        assert!(!l.due(t0 + MIN_INTERVAL));
        assert_eq!(l.total, Some(150));
    }
}
