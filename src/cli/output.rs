//! What the commands print on stdout. `println!` panics when the reader has gone
//! (`nnflow status p.toml | head -1`); here a closed pipe only ends the output: the reader has what
//! it wanted, and the command finishes with its usual exit code. SIGPIPE stays ignored, so writing
//! to a child process's closed pipe never kills nnflow either.

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set when writing to stdout failed for another reason than a closed pipe (e.g. a full disk).
static FAILED: AtomicBool = AtomicBool::new(false);

/// Writes `text` to stdout and flushes it.
pub fn write_stdout(text: &str) {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::BrokenPipe => {}
        Err(e) => {
            if !FAILED.swap(true, Ordering::Relaxed) {
                let _ = writeln!(std::io::stderr(), "error: cannot write to stdout: {e}");
            }
        }
    }
}

/// Whether some output was lost to an error other than a closed pipe.
pub fn failed() -> bool {
    FAILED.load(Ordering::Relaxed)
}

/// `print!` that survives a closed stdout.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::output::write_stdout(&format!($($arg)*))
    };
}

/// `println!` that survives a closed stdout.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::output::write_stdout(&format!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {out, outln};
