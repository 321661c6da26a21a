//! The only place skiff uses `unsafe`: process-wide signal dispositions that
//! nix exposes as unsafe because they affect every thread.
#![allow(unsafe_code)]

use nix::sys::signal::{signal, SigHandler, Signal};

/// Restores SIGPIPE to the default. Rust ignores SIGPIPE at start-up and an
/// ignored disposition survives exec, so a container forked while it is
/// ignored would never die of a broken pipe (`yes | head` would spin).
pub fn default_sigpipe() {
    // SAFETY: SIG_DFL installs no handler code; called from the single-threaded shim.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

/// Ignores SIGPIPE again (Rust's own default), so the shim gets EPIPE, not death.
pub fn ignore_sigpipe() {
    // SAFETY: SIG_IGN installs no handler code; called from the single-threaded shim.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) };
}
