//! skiff's OCI distribution client.
//!
//! - [`Client::resolve`] fetches a reference's manifest, verifies it against its
//!   digest, and resolves a multi-arch index to one [`Platform`].
//! - [`Client::fetch_blob`] downloads one blob into a partial file, resuming from the
//!   file's length with `Range`, retrying link cuts and stalls with capped jittered
//!   backoff, and leaves the file complete, verified and fsynced (or deletes it when
//!   its content does not match the digest).
//! - [`RegistriesConfig`] holds per-registry settings and credentials
//!   (`registries.toml`); [`Secret`]s never reach a log, an error or `Debug`.
//! - [`RateLimiter`] caps the download rate of every fetch that shares it.
//!
//! HTTP/1.1 over tokio and rustls (ring), one connection per request: a small client
//! of our own keeps the agent binary small (see `http.rs`).

mod auth;
mod client;
mod config;
mod error;
mod http;
mod manifest;
mod platform;
mod rate;

pub use client::{Client, ClientOptions, Resolved, RetryPolicy};
pub use config::{RegistriesConfig, RegistryConfig, Secret};
pub use error::Error;
pub use manifest::{media, Descriptor};
pub use platform::Platform;
pub use rate::RateLimiter;
pub use skiff_common::ImageRef;
