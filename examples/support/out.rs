//! Lines on stdout that survive a closed pipe (`demo | head`, `catalog info C | head`).
//!
//! Rust ignores SIGPIPE, so a write to a pipe whose reader is gone fails with
//! `BrokenPipe`, and `println!` panics on it. [`outln!`] writes the line instead;
//! once the reader is gone, that line and every later one are dropped: the
//! program goes on to its end and its exit status (a file it writes, a verdict), or
//! stops early where printing was all it was for ([`closed`]).

use std::fmt;
use std::io::{self, ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether a write to stdout found its reader gone.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `args` and a newline to stdout, or nothing once stdout is closed (see the
/// module). Any error but a closed pipe is returned.
pub(crate) fn line(args: fmt::Arguments<'_>) -> io::Result<()> {
    if CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    match writeln!(io::stdout().lock(), "{args}") {
        Err(e) if e.kind() == ErrorKind::BrokenPipe => {
            CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        done => done,
    }
}

/// Whether stdout's reader is gone: nothing printed from now on is read.
#[allow(
    dead_code,
    reason = "for the examples that stop when nobody reads them"
)]
pub(crate) fn closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

/// `println!` through [`line`]: an `io::Result<()>`, and nothing printed once stdout
/// is closed.
macro_rules! outln {
    () => {
        $crate::out::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))
    };
}

pub(crate) use outln;
