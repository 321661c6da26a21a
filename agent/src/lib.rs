//! skiff: the device agent. The binary (`main.rs`) is only `cli::main`; the
//! modules are a library so tests and benchmarks can drive them directly.

pub mod api;
pub mod cli;
pub mod daemon;
pub mod doctor;
pub mod fsutil;
pub mod headroom;
pub mod image;
pub mod intake;
pub mod link;
pub mod localfile;
pub mod paths;
pub mod probe;
pub mod reconciler;
pub mod rollout;
pub mod runtime;
pub mod sdnotify;
pub mod seccomp;
pub mod store;
mod sys;
