//! skiff: the device agent and its command line.
//!
//! `skiff shim` and `skiff probe-exec` (hidden) run before any tokio runtime
//! exists: they fork containers, which a multi-threaded process must not do.

mod api;
mod cli;
mod daemon;
mod doctor;
mod fsutil;
mod image;
mod link;
mod paths;
mod probe;
mod reconciler;
mod runtime;
mod store;
mod sys;

fn main() {
    std::process::exit(cli::main());
}
