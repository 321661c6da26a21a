//! `pull`: the glue between the registry client (which knows nothing of the store) and
//! the store (which knows nothing of the network). Used by `skiff image pull` and by the
//! daemon, always from a task: the network part is async; file work (hashing, unpacking,
//! renames, fsyncs) runs on tokio's blocking pool. Pulls in one process run one at a
//! time (a process-wide lock), so a slow link is not shared by several half-done pulls
//! and the disk budget check is not raced.
//!
//! Resume: every blob downloads into `partial/<hex>` of the store, which survives agent
//! restarts and reboots; the client continues it with an HTTP Range request and hashes
//! the whole file. Nothing becomes visible in the store before the import verified it.

use super::oci;
use super::{ImageError, ImageInfo, ImageStore};
use skiff_common::ImageRef;
use skiff_registry::{Client, Descriptor, Platform};

pub use skiff_common::PullPolicy;

/// Progress of one pull: bytes of the blobs it downloads (those the store already holds
/// are not counted), on disk so far and in total. `done` includes bytes a previous,
/// interrupted attempt left in `partial/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullProgress {
    pub done: u64,
    pub total: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Registry(#[from] skiff_registry::Error),
    #[error(transparent)]
    Store(#[from] ImageError),
    #[error("image {0} is not in the image store and its pull policy is \"never\" (load it with `skiff image load`)")]
    NeverPull(String),
    #[error("pulling {image}: the worker thread failed: {msg}")]
    Worker { image: String, msg: String },
}

impl PullError {
    /// Whether trying again later may succeed (a link problem, or a full disk that
    /// garbage collection may free), as opposed to a wrong reference or credentials.
    pub fn is_transient(&self) -> bool {
        match self {
            PullError::Registry(e) => e.is_transient(),
            PullError::Store(e) => e.is_no_space() || matches!(e, ImageError::Budget { .. }),
            PullError::NeverPull(_) => false,
            PullError::Worker { .. } => true,
        }
    }
}

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Makes `r` present in `store` according to `policy`, pulling it from its registry
/// when needed, and returns what the store now holds under that name. `progress` is
/// called as bytes arrive (from the download task; keep it cheap).
pub async fn pull(
    store: &ImageStore,
    client: &Client,
    r: &ImageRef,
    policy: PullPolicy,
    progress: &(dyn Fn(PullProgress) + Send + Sync),
) -> Result<ImageInfo, PullError> {
    let present = || {
        let (store, r) = (store.clone(), r.clone());
        blocking(r.to_string(), move || store.info(&r))
    };
    match policy {
        PullPolicy::Never => {
            return present().await?.ok_or_else(|| PullError::NeverPull(r.to_string()));
        }
        PullPolicy::IfNotPresent => {
            if let Some(info) = present().await? {
                return Ok(info);
            }
        }
        PullPolicy::Always => {}
    }
    let _turn = ONE_AT_A_TIME.lock().await;
    let resolved = client.resolve(r, &Platform::host()).await?;
    let blobs: Vec<&Descriptor> = std::iter::once(&resolved.config).chain(&resolved.layers).collect();

    // What is left to download, and whether it fits the budget.
    let (missing, on_disk) = {
        let store = store.clone();
        let descs: Vec<oci::Descriptor> = blobs.iter().map(|d| to_oci(d)).collect();
        blocking(r.to_string(), move || {
            let mut missing = Vec::new();
            let mut on_disk = 0u64;
            for d in descs {
                if store.has_blob(&d) {
                    continue;
                }
                let have = std::fs::metadata(store.partial_path(&d.digest)?).map(|m| m.len()).unwrap_or(0);
                on_disk = on_disk.saturating_add(have.min(d.size));
                missing.push(d.digest);
            }
            Ok((missing, on_disk))
        })
        .await?
    };
    let todo: Vec<&Descriptor> = blobs.into_iter().filter(|d| missing.contains(&d.digest)).collect();
    let total = todo.iter().fold(0u64, |a, d| a.saturating_add(d.size));
    {
        let store = store.clone();
        let what = format!("pull of {r}");
        blocking(r.to_string(), move || store.check_budget(&what, total.saturating_sub(on_disk))).await?;
    }
    if !todo.is_empty() {
        tracing::info!(image = %r, blobs = todo.len(), bytes = total, resumed = on_disk, "pulling");
    }

    let mut finished = 0u64;
    progress(PullProgress { done: on_disk, total });
    for desc in todo {
        let partial = store.partial_path(&desc.digest)?;
        let base = finished;
        let cb = move |n: u64| progress(PullProgress { done: base.saturating_add(n), total });
        match client.fetch_blob(r, desc, &partial, &cb).await {
            Ok(()) => {}
            // The download keeps what it wrote (it resumes once there is room again).
            Err(skiff_registry::Error::Io { path, source }) if super::is_no_space(&source) => {
                return Err(ImageError::NoSpace { path }.into());
            }
            Err(e) => return Err(e.into()),
        }
        finished = finished.saturating_add(desc.size);
    }

    let index = (resolved.top_digest != resolved.digest).then(|| resolved.top_digest.clone());
    let mdesc = oci::Descriptor {
        media_type: resolved.media_type.clone(),
        digest: resolved.digest.clone(),
        size: resolved.manifest.len() as u64,
        platform: None,
        annotations: Default::default(),
    };
    let (store, r2, manifest) = (store.clone(), r.clone(), resolved.manifest);
    blocking(r.to_string(), move || store.import_pulled(&r2, index.as_deref(), &mdesc, &manifest)).await
}

fn to_oci(d: &Descriptor) -> oci::Descriptor {
    oci::Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        platform: None,
        annotations: Default::default(),
    }
}

async fn blocking<T: Send + 'static>(
    image: String,
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, PullError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => Ok(r?),
        Err(e) => Err(PullError::Worker { image, msg: e.to_string() }),
    }
}
