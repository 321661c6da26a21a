//! The image store: OCI images sideloaded from a layout (directory or tar), verified
//! blob by blob, unpacked into a content-addressed rootfs, and named by tags.
//!
//! ```text
//! <dir>/                       (the agent uses <state_dir>/images)
//!   refs.json                  {"version":1,"refs":{ref -> manifest digest},"images":{digest -> platform, size}}
//!                              version 2 adds "indexes":{multi-arch index digest -> manifest digest}
//!   blobs/sha256/<hex>         verified manifests, configs and layers of stored images
//!   rootfs/<manifest-hex>/     the flattened rootfs; complete whenever it exists; never written after
//!   tmp/                       work in progress; emptied by the next load, pull or remove
//!   partial/<hex>              downloads in progress, kept across restarts and reboots to
//!                              resume; moved into blobs/ once verified (counted in disk use)
//!   lock                       flock: one load or remove at a time, across processes
//! ```
//! Invariants: a blob or rootfs becomes visible (is renamed into place) only once it is
//! verified or complete and synced; refs.json is replaced atomically and only when its
//! content changes, so loading an image that is already there writes nothing; every blob
//! read is checked against its digest and size. Readers (`list`, `resolve`) take no lock:
//! they see the old or the new refs.json. What the store never does: delete an image a
//! tag still names, or touch anything outside `<dir>`.

mod cli;
mod mount;
mod oci;
mod pull;
mod source;
mod store;
#[cfg(test)]
mod tests;
mod unpack;

pub use cli::{cli_check, cli_load, cli_ls, cli_pull, parse_rate, PullConfig};
pub use mount::{mount_rootfs, unmount_rootfs};
pub use oci::Platform;
pub use pull::{pull, PullError, PullPolicy, PullProgress};
pub use store::{CheckReport, DiskUsage, GcReport, ImageStore};

use serde::Serialize;
use std::io;
use std::path::{Path, PathBuf};

/// One name for one image in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    /// `name:tag`, or `name@sha256:...` for an image no tag names.
    pub reference: String,
    /// `sha256:...` of the manifest.
    pub digest: String,
    /// Bytes of the unpacked rootfs (regular files; a hardlinked file counts once).
    pub size: u64,
    /// `os/arch[/variant]` from the image config, e.g. `linux/arm64`.
    pub platform: String,
}

/// What a container needs from an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    pub digest: String,
    /// The image rootfs. Read-only: mount it as a lower layer (see [`mount_rootfs`]).
    pub rootfs: PathBuf,
    pub config: ImageConfig,
}

/// The run defaults from the image config (empty when the image sets none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{what}: bad JSON: {source}")]
    Json { what: String, source: serde_json::Error },
    #[error("{path}: not a usable OCI image layout: {reason}")]
    Layout { path: PathBuf, reason: String },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("malformed digest {0:?}")]
    BadDigest(String),
    #[error("blob {0} is missing (from the image layout, or not downloaded)")]
    Missing(String),
    #[error("reading blob {digest}: {source}")]
    Blob { digest: String, source: io::Error },
    #[error("blob {digest} fails verification: {reason}")]
    Mismatch { digest: String, reason: String },
    #[error("no image for {want} (found: {})", found.join(", "))]
    NoPlatform { want: String, found: Vec<String> },
    #[error("layer {layer}: refusing entry {path:?}: {reason}")]
    UnsafeEntry { layer: String, path: PathBuf, reason: String },
    #[error("image {0} is not in the store")]
    NotFound(String),
    #[error("image name: {0}")]
    Name(String),
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("mounting {path}: {source}")]
    Mount { path: PathBuf, source: nix::Error },
    #[error(
        "no space left on the device of the image store writing {path}: free space (`skiff image rm`, \
         or let the agent collect unused images) or move --state-dir; nothing half-written was kept"
    )]
    NoSpace { path: PathBuf },
    #[error(
        "{what} needs {more} more bytes but the image store holds {used} of its {budget}-byte budget \
         (--image-budget): remove images with `skiff image rm` or raise the budget"
    )]
    Budget { what: String, used: u64, more: u64, budget: u64 },
}

impl ImageError {
    fn io(path: impl AsRef<Path>, source: io::Error) -> Self {
        if is_no_space(&source) {
            return ImageError::NoSpace { path: path.as_ref().to_path_buf() };
        }
        ImageError::Io { path: path.as_ref().to_path_buf(), source }
    }

    /// Whether this error is the disk running full.
    pub fn is_no_space(&self) -> bool {
        match self {
            ImageError::NoSpace { .. } => true,
            ImageError::Io { source, .. } | ImageError::Blob { source, .. } => is_no_space(source),
            _ => false,
        }
    }
}

/// ENOSPC, or EDQUOT (a quota is the same to the store: no room).
pub(crate) fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(c) if c == nix::errno::Errno::ENOSPC as i32 || c == nix::errno::Errno::EDQUOT as i32)
}
