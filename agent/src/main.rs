//! skiff: the device agent and its command line.
//!
//! `skiff shim` and `skiff probe-exec` (hidden) run before any tokio runtime
//! exists: they fork containers, which a multi-threaded process must not do.

fn main() {
    std::process::exit(skiff_agent::cli::main());
}
