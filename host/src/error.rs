//! The error classes the command line maps to exit codes (README, "Exit codes"):
//! 1 internal failure, 2 usage, 3 bad input, 4 the recipe misbehaved.
//! Library code raises these types; `main` finds the first one in an error's chain.

/// The command line asks for something impossible before any work starts: a bad
/// option value, an output path that cannot be written, an existing output
/// without `--force` (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// A file or value the user gave is unusable: not a regular file, missing,
/// corrupt, of the wrong kind (exit 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// The checkpoint is not one the recipe accepts (wrong family, unsupported variant) (exit 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

pub const EXIT_INTERNAL: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_BAD_INPUT: u8 = 3;
pub const EXIT_RECIPE: u8 = 4;

/// The exit code of an error: the class of the first typed cause in its chain.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.is::<crate::recipe::RecipeError>() {
            return EXIT_RECIPE;
        }
        if cause.is::<Usage>() {
            return EXIT_USAGE;
        }
        if cause.is::<crate::checkpoint::CheckpointError>()
            || cause.is::<crate::recipe::params::ParamError>()
            || cause.is::<Refused>()
            || cause.is::<BadInput>()
            || cause.is::<crate::formats::QuantError>()
        {
            return EXIT_BAD_INPUT;
        }
    }
    EXIT_INTERNAL
}

thread_local! {
    static CATCHING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Runs `f` inside `catch_unwind`, marking the thread so the CLI's panic hook stays
/// quiet: the caller turns the panic into an ordinary error (e.g. cudarc panics on
/// a driver too old for its symbols).
pub fn catching<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    CATCHING.with(|c| c.set(c.get() + 1));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get() - 1));
    r
}

/// Whether a panic on this thread is being caught by [`catching`].
pub fn panic_is_caught() -> bool {
    CATCHING.with(|c| c.get() > 0)
}
