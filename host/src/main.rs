//! `run-recipe`: the Quantsmith command line. This file parses, sets up logging,
//! dispatches to `cli/<command>.rs`, maps errors to exit codes and guards against
//! panics; each subcommand's arguments and body live in its own file.

use std::process::ExitCode;

use clap::Parser;
use quantsmith::error::EXIT_INTERNAL;

mod cli;

use cli::checks;

fn main() -> ExitCode {
    // `run-recipe ... | head` should end quietly, as other command-line tools do.
    // SAFETY: restoring the default disposition of a signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    checks::install_signal_handlers();
    install_panic_hook();
    let cli = cli::Cli::parse();
    let default = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| quantsmith::progress::StderrBesideBars)
        .with_ansi(checks::colour_allowed())
        .with_target(false)
        .init();

    // A panic is a bug: the hook has said where; leave nothing behind and exit 1, never 101.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cli::dispatch(cli.command))) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            quantsmith::checkpoint::writer::remove_temporaries();
            // Errors quote recipes and file headers: never raw control characters.
            eprintln!("error: {}", quantsmith::text::sanitize_lines(&format!("{e:#}"), 4000, 200));
            ExitCode::from(quantsmith::error::exit_code(&e))
        }
        Err(_) => {
            quantsmith::checkpoint::writer::remove_temporaries();
            ExitCode::from(EXIT_INTERNAL)
        }
    }
}

/// One message for a panic, naming it a bug; silent for a closed pipe.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        if msg.contains("Broken pipe") || quantsmith::error::panic_is_caught() {
            return;
        }
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!(
            "error: internal error: {}{at}\nThis is a bug in Quantsmith; please report it with the command that caused it.",
            quantsmith::text::sanitize(&msg, 2000)
        );
    }));
}
