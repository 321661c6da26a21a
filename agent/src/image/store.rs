//! `ImageStore`: the on-disk layout described in `image/mod.rs`, and the rules for
//! names. Mutations (`load`, `remove`) hold the store's flock and end by collecting
//! whatever no reference needs; reads take no lock.

use super::oci::{self, Config, Descriptor, Manifest, Platform};
use super::source::Source;
use super::unpack::{self, remove};
use super::{ImageConfig, ImageError, ImageInfo, ResolvedImage};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use skiff_common::ImageRef;
use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const REFS: &str = "refs.json";
/// Version 2 adds `indexes`; a store that pinned no index by digest is still written as
/// version 1, so the previous release keeps reading it.
const REFS_VERSION: u32 = 2;
const REFS_VERSION_PLAIN: u32 = 1;
const REFS_LIMIT: u64 = 4 << 20;

#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    platform: Platform,
    /// Bytes the store (blobs, rootfs, partial downloads) may take; None: no limit.
    budget: Option<u64>,
}

/// refs.json. Every key parses as an `ImageRef`; every value is a key of `images`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Refs {
    version: u32,
    refs: BTreeMap<String, String>,
    images: BTreeMap<String, ImageMeta>,
    /// Multi-arch index digest -> the manifest digest picked from it for this platform, so
    /// that `name@<index digest>` (what a controller pins) resolves. Every value is a key
    /// of `images`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    indexes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageMeta {
    platform: String,
    size: u64,
}

impl ImageStore {
    /// Opens (creating if needed) the store rooted at `dir`.
    pub fn open(dir: &Path) -> Result<ImageStore, ImageError> {
        for d in [
            dir.to_path_buf(),
            dir.join("blobs/sha256"),
            dir.join("rootfs"),
            dir.join("tmp"),
            dir.join(PARTIAL),
        ] {
            fs::create_dir_all(&d).map_err(|e| ImageError::io(&d, e))?;
        }
        Ok(ImageStore { dir: dir.to_path_buf(), platform: Platform::host(), budget: None })
    }

    /// Limits what pulls may grow the store to (see [`ImageStore::disk_usage`]).
    pub fn with_budget(mut self, budget: Option<u64>) -> ImageStore {
        self.budget = budget;
        self
    }

    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A store that picks `platform` instead of the host's: tests of foreign images,
    /// and `skiff image load --platform` filling a board's store on another machine.
    pub fn with_platform(mut self, platform: Platform) -> ImageStore {
        self.platform = platform;
        self
    }

    /// Imports every image of the layout at `path` (a directory or a tar). Names come from
    /// each entry's annotations (`io.containerd.image.name`, or `ref.name` as a tag of the
    /// layout's file name: `busybox/` + `1` is `busybox:1`), or from `name` when given
    /// (then the layout must hold one image). An image with no name is kept as
    /// `<file name>@<digest>`. On error nothing new stays in the store.
    pub fn load(&self, path: &Path, name: Option<&ImageRef>) -> Result<Vec<ImageInfo>, ImageError> {
        let _lock = self.lock()?;
        self.collect(&self.read_refs()?)?; // leftovers of a crash
        let loaded = self.load_locked(path, name);
        if loaded.is_err() {
            if let Err(err) = self.read_refs().and_then(|refs| self.collect(&refs)) {
                tracing::warn!(%err, "cleaning up after a failed image load");
            }
        }
        loaded
    }

    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        let refs = self.read_refs()?;
        refs.refs.iter().map(|(r, d)| info(&refs, r, d)).collect()
    }

    /// By tag, or by digest (`name@sha256:...`: the content is what counts, so any image
    /// in the store with that manifest digest answers, whatever it was loaded as).
    pub fn resolve(&self, r: &ImageRef) -> Result<ResolvedImage, ImageError> {
        let refs = self.read_refs()?;
        let digest = stored_digest(&refs, r).ok_or_else(|| ImageError::NotFound(r.to_string()))?;
        let rootfs = self.rootfs_path(digest)?;
        if !rootfs.is_dir() {
            return Err(ImageError::Corrupt {
                path: rootfs,
                reason: format!("rootfs of {digest} is missing"),
            });
        }
        let manifest: Manifest = self.read_blob(&self.stored_desc(digest)?)?;
        let config: Config = self.read_blob(&manifest.config)?;
        let c = config.config.unwrap_or_default();
        let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
        Ok(ResolvedImage {
            digest: digest.clone(),
            rootfs,
            config: ImageConfig {
                env: c.env.unwrap_or_default(),
                entrypoint: c.entrypoint.unwrap_or_default(),
                cmd: c.cmd.unwrap_or_default(),
                workdir: nonempty(c.working_dir),
                user: nonempty(c.user),
            },
        })
    }

    /// Drops a tag (or, for `name@digest`, every reference of `name` to that digest), then
    /// deletes the rootfs and blobs no remaining reference needs.
    pub fn remove(&self, r: &ImageRef) -> Result<(), ImageError> {
        let _lock = self.lock()?;
        let old = self.read_refs()?;
        let mut refs = old.clone();
        match r.digest() {
            Some(d) => {
                let d = refs.indexes.get(d).cloned().unwrap_or_else(|| d.to_string());
                refs.refs.retain(|k, v| !(*v == d && ref_name(k) == r.name()));
            }
            None => {
                refs.refs.remove(&key(r));
            }
        }
        if refs == old {
            return Err(ImageError::NotFound(r.to_string()));
        }
        prune_images(&mut refs);
        self.write_refs(&refs, &old)?;
        self.collect(&refs)
    }

    /// Removes every image that no reference in `keep` names (by tag, or by manifest or
    /// index digest), then every blob, rootfs and finished partial download that no
    /// remaining image needs. The daemon passes the images of the current and previous
    /// desired-state generations. Partial downloads of blobs not yet stored are kept:
    /// they may belong to a pull in progress, and resuming them is the point.
    pub fn gc(&self, keep: &[ImageRef]) -> Result<GcReport, ImageError> {
        let _lock = self.lock()?;
        let before = self.disk_usage()?;
        let old = self.read_refs()?;
        let kept: HashSet<&String> = keep.iter().filter_map(|r| stored_digest(&old, r)).collect();
        let mut refs = old.clone();
        let mut removed: Vec<String> = Vec::new();
        refs.refs.retain(|k, d| {
            let keep = kept.contains(d);
            if !keep {
                removed.push(k.clone());
            }
            keep
        });
        prune_images(&mut refs);
        self.write_refs(&refs, &old)?;
        self.collect(&refs)?;
        for e in read_dir(&self.dir.join(PARTIAL))? {
            if self.dir.join("blobs/sha256").join(file_name(&e)).is_file() {
                remove(&e)?;
            }
        }
        let after = self.disk_usage()?;
        for r in &removed {
            tracing::info!(image = %r, "image collected");
        }
        Ok(GcReport {
            removed,
            kept: refs.refs.keys().cloned().collect(),
            freed: before.total.saturating_sub(after.total),
            usage: after,
        })
    }

    /// Deletes every partial download except those of `keep` (blob digests), and returns
    /// the bytes freed. For the daemon when no pull is in flight: downloads of images no
    /// desired state wants any more would otherwise hold disk (and budget) for good.
    pub fn drop_partials(&self, keep: &[&str]) -> Result<u64, ImageError> {
        let _lock = self.lock()?;
        let mut freed = 0u64;
        for e in read_dir(&self.dir.join(PARTIAL))? {
            if keep.iter().any(|d| d.strip_prefix("sha256:") == Some(file_name(&e).as_str())) {
                continue;
            }
            let len = fs::symlink_metadata(&e).map(|m| m.len()).unwrap_or(0);
            remove(&e)?;
            freed = freed.saturating_add(len);
        }
        Ok(freed)
    }

    /// What the store takes on disk: stored blobs, unpacked rootfs (as recorded when each
    /// was unpacked) and partial downloads. Cheap: no tree walk.
    pub fn disk_usage(&self) -> Result<DiskUsage, ImageError> {
        let refs = self.read_refs()?;
        let rootfs = refs.images.values().fold(0u64, |a, m| a.saturating_add(m.size));
        let blobs = dir_bytes(&self.dir.join("blobs/sha256"))?;
        let partial = dir_bytes(&self.dir.join(PARTIAL))?;
        let total = blobs.saturating_add(rootfs).saturating_add(partial);
        Ok(DiskUsage { blobs, rootfs, partial, total, budget: self.budget })
    }

    /// Fails when `more` bytes on top of what the store holds would exceed the budget.
    pub fn check_budget(&self, what: &str, more: u64) -> Result<(), ImageError> {
        let Some(budget) = self.budget else { return Ok(()) };
        let used = self.disk_usage()?.total;
        if used.saturating_add(more) > budget {
            return Err(ImageError::Budget { what: what.to_string(), used, more, budget });
        }
        Ok(())
    }

    /// Checks the whole store without changing it: refs.json parses and is consistent,
    /// every image's manifest, config and layers are stored and hash to their digests, and
    /// every image has its rootfs. Garbage (unreferenced blobs, leftovers in tmp/) is
    /// counted, not a problem: the next collection removes it.
    pub fn check(&self) -> Result<CheckReport, ImageError> {
        let _lock = self.lock()?;
        let mut report = CheckReport::default();
        let refs = match self.read_refs() {
            Ok(r) => r,
            Err(e) => {
                report.problems.push(e.to_string());
                return Ok(report.done());
            }
        };
        report.references = refs.refs.len();
        report.images = refs.images.len();
        let mut needed: HashSet<String> = HashSet::new();
        for d in refs.images.keys() {
            let mut problem = |p: String| report.problems.push(format!("image {d}: {p}"));
            match self.rootfs_path(d) {
                Ok(p) if p.is_dir() => {}
                Ok(p) => problem(format!("rootfs {} is missing", p.display())),
                Err(e) => problem(e.to_string()),
            }
            let manifest: Manifest = match self.stored_desc(d).and_then(|desc| self.read_blob(&desc)) {
                Ok(m) => m,
                Err(e) => {
                    problem(format!("manifest: {e}"));
                    continue;
                }
            };
            needed.insert(d.clone());
            for desc in std::iter::once(&manifest.config).chain(&manifest.layers) {
                if !needed.insert(desc.digest.clone()) {
                    continue;
                }
                let verified = self.blob_path(desc).and_then(|p| {
                    let f = File::open(&p).map_err(|e| ImageError::io(&p, e))?;
                    oci::Verifying::new(f).finish(&desc.digest, Some(desc.size))
                });
                if let Err(e) = verified {
                    problem(format!("blob {}: {e}", desc.digest));
                }
            }
        }
        for e in read_dir(&self.dir.join("blobs/sha256"))? {
            report.blobs += 1;
            if !needed.contains(&format!("sha256:{}", file_name(&e))) {
                report.unreferenced_blobs += 1;
            }
        }
        for e in read_dir(&self.dir.join(PARTIAL))? {
            report.partial_downloads += 1;
            if oci::digest_hex(&format!("sha256:{}", file_name(&e))).is_err() {
                report.problems.push(format!("{}: not a download of a sha256 blob", e.display()));
            }
        }
        report.leftovers = read_dir(&self.dir.join("tmp"))?.len();
        report.usage = Some(self.disk_usage()?);
        Ok(report.done())
    }

    /// Where the download of `digest` goes (and stays across restarts until it is stored).
    pub fn partial_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.dir.join(PARTIAL).join(oci::digest_hex(digest)?))
    }

    /// Whether a blob is stored (with the right size; its content is verified on read).
    pub(super) fn has_blob(&self, desc: &Descriptor) -> bool {
        self.blob_path(desc).is_ok_and(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() == desc.size))
    }

    /// What the store holds under `r` (by tag, or by manifest or index digest), if it
    /// holds it unpacked.
    pub fn info(&self, r: &ImageRef) -> Result<Option<ImageInfo>, ImageError> {
        let refs = self.read_refs()?;
        let Some(digest) = stored_digest(&refs, r) else { return Ok(None) };
        if !self.rootfs_path(digest)?.is_dir() {
            return Ok(None);
        }
        let k = key(r);
        let reference = match refs.refs.get(&k) {
            Some(d) if d == digest => k,
            _ => refs.refs.iter().find(|(_, d)| *d == digest).map(|(k, _)| k.clone()).unwrap_or(k),
        };
        info(&refs, &reference, digest).map(Some)
    }

    /// Whether `r` names a stored, unpacked image.
    pub fn contains(&self, r: &ImageRef) -> bool {
        self.resolve(r).is_ok()
    }

    /// Stores a pulled image: `manifest` is the manifest's bytes (whose digest this
    /// checks), and its config and layers are either stored blobs or complete downloads
    /// in `partial/`. Unpacks like `load`; a partial download becomes a blob only once
    /// unpacking verified it (or, when the rootfs exists already, after hashing it), is
    /// fsynced and renamed. Records `reference` (and `index`, the multi-arch index digest
    /// the manifest was picked from) in refs.json. On error nothing new is named, and the
    /// partial downloads stay for the next attempt.
    pub(super) fn import_pulled(
        &self,
        reference: &ImageRef,
        index: Option<&str>,
        mdesc: &Descriptor,
        manifest: &[u8],
    ) -> Result<ImageInfo, ImageError> {
        let _lock = self.lock()?;
        let res = self.import_pulled_locked(reference, index, mdesc, manifest);
        for e in read_dir(&self.dir.join("tmp")).unwrap_or_default() {
            if let Err(err) = remove(&e) {
                tracing::warn!(%err, "cleaning up after a pull");
            }
        }
        res
    }

    fn import_pulled_locked(
        &self,
        reference: &ImageRef,
        index: Option<&str>,
        mdesc: &Descriptor,
        manifest: &[u8],
    ) -> Result<ImageInfo, ImageError> {
        if let Some(i) = index {
            oci::digest_hex(i)?;
        }
        self.put_blob(mdesc, manifest)?;
        let old = self.read_refs()?;
        let mut refs = old.clone();
        let stored = refs
            .images
            .get(&mdesc.digest)
            .filter(|_| self.rootfs_path(&mdesc.digest).is_ok_and(|p| p.is_dir()));
        let meta = match stored {
            Some(m) => m.clone(),
            None => self.import(None, mdesc)?,
        };
        let digest = mdesc.digest.clone();
        refs.images.insert(digest.clone(), meta);
        if let Some(i) = index {
            refs.indexes.insert(i.to_string(), digest.clone());
        }
        let name = key(reference);
        match reference.digest() {
            // A pin is kept as written (`name@<index or manifest digest>`), so `ls` shows
            // it even when a tag names the same image.
            Some(_) => {
                refs.refs.insert(name.clone(), digest.clone());
            }
            None => set_ref(&mut refs, &name, &digest),
        }
        self.write_refs(&refs, &old)?;
        let info = info(&refs, &name, &digest)?;
        tracing::info!(image = %info.reference, digest = %info.digest, platform = %info.platform, "image pulled");
        Ok(info)
    }

    /// Writes a blob held in memory (a pulled manifest): verified, fsynced, renamed.
    fn put_blob(&self, desc: &Descriptor, bytes: &[u8]) -> Result<(), ImageError> {
        oci::Verifying::new(bytes).finish(&desc.digest, Some(desc.size))?;
        if self.has_blob(desc) {
            return Ok(());
        }
        let dst = self.blob_path(desc)?;
        let tmp = self.dir.join("tmp").join(format!("blob-{}", desc.hex()?));
        let written = File::create(&tmp).and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
        if let Err(e) = written {
            remove(&tmp)?;
            return Err(ImageError::io(&tmp, e));
        }
        fs::rename(&tmp, &dst).map_err(|e| ImageError::io(&dst, e))?;
        sync_dir(dst.parent().unwrap_or(&self.dir))
    }

    /// Moves a complete download from partial/ into blobs/ (hashing it first unless the
    /// caller just verified it), fsynced, then the directory. A download that fails
    /// verification is deleted: resuming it could only fail again.
    fn commit_partial(&self, desc: &Descriptor, verified: bool) -> Result<(), ImageError> {
        let src = self.partial_path(&desc.digest)?;
        let f = File::open(&src).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImageError::Missing(desc.digest.clone()),
            _ => ImageError::io(&src, e),
        })?;
        if !verified {
            if let Err(e) = oci::Verifying::new(&f).finish(&desc.digest, Some(desc.size)) {
                if matches!(e, ImageError::Mismatch { .. }) {
                    remove(&src)?;
                }
                return Err(e);
            }
        }
        f.sync_all().map_err(|e| ImageError::io(&src, e))?;
        let dst = self.blob_path(desc)?;
        fs::rename(&src, &dst).map_err(|e| ImageError::io(&dst, e))?;
        sync_dir(dst.parent().unwrap_or(&self.dir))
    }

    fn load_locked(&self, path: &Path, name: Option<&ImageRef>) -> Result<Vec<ImageInfo>, ImageError> {
        let src = Source::open(path)?;
        let mut index = src.index()?;
        if name.is_some() {
            // One image under several names (a docker save with two RepoTags) is one image.
            let mut seen = HashSet::new();
            index.manifests.retain(|d| seen.insert(d.digest.clone()));
        }
        let layout_err = |reason: String| ImageError::Layout { path: path.to_path_buf(), reason };
        if index.manifests.is_empty() {
            return Err(layout_err("index.json lists no images".into()));
        }
        if let Some(n) = name {
            if n.digest().is_some() {
                return Err(ImageError::Name(format!("{n}: a name to load as cannot pin a digest")));
            }
            if index.manifests.len() > 1 {
                return Err(layout_err(format!(
                    "{} images, so a single name is ambiguous",
                    index.manifests.len()
                )));
            }
        }
        let old = self.read_refs()?;
        let mut refs = old.clone();
        let mut loaded = Vec::new();
        for top in &index.manifests {
            let reference = match name {
                Some(n) => Some(key(n)),
                None => annotated_ref(top, path)?,
            };
            let mdesc = self.pick(&src, top, 0)?;
            // Already stored: nothing to read or write. (import is idempotent too, but
            // would walk the rootfs again to size it.)
            let stored = refs
                .images
                .get(&mdesc.digest)
                .filter(|_| self.rootfs_path(&mdesc.digest).is_ok_and(|p| p.is_dir()));
            let meta = match stored {
                Some(meta) => meta.clone(),
                None => self.import(Some(&src), &mdesc)?,
            };
            let digest = mdesc.digest.clone();
            refs.images.insert(digest.clone(), meta);
            let reference = match reference {
                Some(r) => r,
                None => format!("{}@{digest}", file_stem_name(path)?),
            };
            set_ref(&mut refs, &reference, &digest);
            loaded.push(info(&refs, &reference, &digest)?);
        }
        self.write_refs(&refs, &old)?;
        for i in &loaded {
            tracing::info!(image = %i.reference, digest = %i.digest, platform = %i.platform, "image loaded");
        }
        Ok(loaded)
    }

    /// Follows indexes down to the one manifest for this store's platform.
    fn pick(&self, src: &Source, desc: &Descriptor, depth: u32) -> Result<Descriptor, ImageError> {
        if oci::is_manifest(&desc.media_type) {
            return Ok(desc.clone());
        }
        if !oci::is_index(&desc.media_type) || depth > 2 {
            return Err(ImageError::Unsupported(format!("{} of type {:?}", desc.digest, desc.media_type)));
        }
        let index: oci::Index = oci::read_json(src.blob(desc)?, desc)?;
        index.check(Some(&desc.media_type), &desc.digest)?;
        let runs = |d: &&Descriptor| d.platform.as_ref().is_some_and(|p| self.platform.runs(p));
        // An exact variant beats a bare architecture.
        let exact = index.manifests.iter().filter(runs).find(|d| d.platform.as_ref() == Some(&self.platform));
        match exact.or_else(|| index.manifests.iter().find(runs)) {
            Some(d) => self.pick(src, d, depth + 1),
            None => Err(ImageError::NoPlatform {
                want: self.platform.to_string(),
                found: index
                    .manifests
                    .iter()
                    .map(|d| d.platform.as_ref().map_or("unknown".into(), |p| p.to_string()))
                    .collect(),
            }),
        }
    }

    /// Stores the manifest's blobs and unpacks its rootfs (unless already there). Blobs
    /// come from the layout `src`, or, without one (a pull), from blobs/ or partial/.
    fn import(&self, src: Option<&Source>, mdesc: &Descriptor) -> Result<ImageMeta, ImageError> {
        if let Some(src) = src {
            self.fetch(src, mdesc)?;
        }
        let manifest: Manifest = self.read_blob(mdesc)?;
        manifest.check(&mdesc.media_type, &mdesc.digest)?;
        match src {
            Some(src) => self.fetch(src, &manifest.config)?,
            None if self.has_blob(&manifest.config) => {}
            None => self.commit_partial(&manifest.config, false)?,
        }
        let config: Config = self.read_blob(&manifest.config)?;
        let platform = Platform { architecture: config.architecture, os: config.os, variant: config.variant };
        if !self.platform.runs(&platform) {
            return Err(ImageError::NoPlatform {
                want: self.platform.to_string(),
                found: vec![platform.to_string()],
            });
        }
        if config.rootfs.kind != "layers" || config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::Unsupported(format!(
                "config {}: rootfs must be \"layers\" with one diff_id per layer",
                manifest.config.digest
            )));
        }
        // Layers still in partial/ (a pull): committed once verified.
        let mut pending: Vec<&Descriptor> = Vec::new();
        for layer in &manifest.layers {
            match src {
                Some(src) => self.fetch(src, layer)?,
                None if self.has_blob(layer) => {}
                None if self.partial_path(&layer.digest)?.is_file() => pending.push(layer),
                None => return Err(ImageError::Missing(layer.digest.clone())),
            }
        }
        let rootfs = self.rootfs_path(&mdesc.digest)?;
        let unpacked = !rootfs.is_dir();
        if unpacked {
            if let Err(e) = self.unpack(&manifest, &config.rootfs.diff_ids, &rootfs) {
                // A download that does not match its digest cannot be resumed into one.
                if let ImageError::Mismatch { digest, .. } = &e {
                    if pending.iter().any(|l| l.digest == *digest) {
                        remove(&self.partial_path(digest)?)?;
                    }
                }
                return Err(e);
            }
        }
        for layer in pending {
            // apply_layer checked digest and size of the very bytes it unpacked.
            self.commit_partial(layer, unpacked)?;
        }
        Ok(ImageMeta { platform: platform.to_string(), size: unpack::tree_size(&rootfs)? })
    }

    /// Builds the rootfs in tmp/, syncs it, and renames it into place: it exists only whole.
    fn unpack(&self, manifest: &Manifest, diff_ids: &[String], rootfs: &Path) -> Result<(), ImageError> {
        let tmp = self.dir.join("tmp").join(format!("rootfs-{}", file_name(rootfs)));
        remove(&tmp)?;
        fs::create_dir(&tmp).map_err(|e| ImageError::io(&tmp, e))?;
        fs::set_permissions(&tmp, Permissions::from_mode(0o755)).map_err(|e| ImageError::io(&tmp, e))?;
        let built = manifest.layers.iter().zip(diff_ids).try_for_each(|(layer, diff_id)| {
            let path =
                if self.has_blob(layer) { self.blob_path(layer)? } else { self.partial_path(&layer.digest)? };
            unpack::apply_layer(&tmp, &path, layer, diff_id)
        });
        if let Err(e) = built {
            remove(&tmp)?;
            return Err(e);
        }
        let f = File::open(&tmp).map_err(|e| ImageError::io(&tmp, e))?;
        nix::unistd::syncfs(f.as_raw_fd()).map_err(|e| ImageError::io(&tmp, e.into()))?;
        fs::rename(&tmp, rootfs).map_err(|e| ImageError::io(rootfs, e))?;
        sync_dir(&self.dir.join("rootfs"))
    }

    /// Copies a blob from the layout into blobs/, verified on the way; a blob already
    /// there with the right size is kept (it was verified when written, and is verified
    /// again whenever it is read).
    fn fetch(&self, src: &Source, desc: &Descriptor) -> Result<(), ImageError> {
        let dst = self.blob_path(desc)?;
        if fs::metadata(&dst).is_ok_and(|m| m.is_file() && m.len() == desc.size) {
            return Ok(());
        }
        let tmp = self.dir.join("tmp").join(format!("blob-{}", desc.hex()?));
        let copied = (|| {
            let mut r = oci::Verifying::new(src.blob(desc)?.take(desc.size + 1));
            let mut f = File::create(&tmp).map_err(|e| ImageError::io(&tmp, e))?;
            io::copy(&mut r, &mut f)
                .map_err(|e| ImageError::Blob { digest: desc.digest.clone(), source: e })?;
            r.finish(&desc.digest, Some(desc.size))?;
            f.sync_all().map_err(|e| ImageError::io(&tmp, e))
        })();
        if let Err(e) = copied {
            remove(&tmp)?;
            return Err(e);
        }
        fs::rename(&tmp, &dst).map_err(|e| ImageError::io(&dst, e))?;
        sync_dir(dst.parent().unwrap_or(&self.dir))
    }

    fn rootfs_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.dir.join("rootfs").join(oci::digest_hex(digest)?))
    }

    fn blob_path(&self, desc: &Descriptor) -> Result<PathBuf, ImageError> {
        Ok(self.dir.join("blobs/sha256").join(desc.hex()?))
    }

    fn read_blob<T: serde::de::DeserializeOwned>(&self, desc: &Descriptor) -> Result<T, ImageError> {
        let p = self.blob_path(desc)?;
        oci::read_json(File::open(&p).map_err(|e| ImageError::io(&p, e))?, desc)
    }

    /// A descriptor for a stored manifest: its size is the file's, its digest is checked.
    fn stored_desc(&self, digest: &str) -> Result<Descriptor, ImageError> {
        let p = self.dir.join("blobs/sha256").join(oci::digest_hex(digest)?);
        let size = fs::metadata(&p).map_err(|e| ImageError::io(&p, e))?.len();
        Ok(Descriptor {
            media_type: String::new(),
            digest: digest.to_string(),
            size,
            platform: None,
            annotations: BTreeMap::new(),
        })
    }

    /// Deletes tmp/, and every rootfs and blob that no image in `refs` needs. A rootfs is
    /// first renamed into tmp/, so a half-deleted one never looks complete.
    fn collect(&self, refs: &Refs) -> Result<(), ImageError> {
        let tmp = self.dir.join("tmp");
        for e in read_dir(&tmp)? {
            remove(&e)?;
        }
        let images: HashSet<&str> = refs.images.keys().filter_map(|d| oci::digest_hex(d).ok()).collect();
        for e in read_dir(&self.dir.join("rootfs"))? {
            let name = file_name(&e);
            if !images.contains(name.as_str()) {
                let doomed = tmp.join(format!("gc-{name}"));
                fs::rename(&e, &doomed).map_err(|err| ImageError::io(&e, err))?;
                remove(&doomed)?;
            }
        }
        let mut keep: HashSet<String> = HashSet::new();
        for d in refs.images.keys() {
            let m: Manifest = match self.stored_desc(d).and_then(|desc| self.read_blob(&desc)) {
                Ok(m) => m,
                Err(err) => {
                    // Without the manifest the blobs it needs are unknown: keep them all.
                    tracing::warn!(digest = %d, %err, "unreadable manifest, keeping all blobs");
                    return Ok(());
                }
            };
            keep.insert(d.clone());
            keep.insert(m.config.digest);
            keep.extend(m.layers.into_iter().map(|l| l.digest));
        }
        for e in read_dir(&self.dir.join("blobs/sha256"))? {
            if !keep.contains(&format!("sha256:{}", file_name(&e))) {
                remove(&e)?;
            }
        }
        Ok(())
    }

    fn read_refs(&self) -> Result<Refs, ImageError> {
        let p = self.dir.join(REFS);
        let f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Refs {
                    version: REFS_VERSION,
                    refs: BTreeMap::new(),
                    images: BTreeMap::new(),
                    indexes: BTreeMap::new(),
                })
            }
            Err(e) => return Err(ImageError::io(&p, e)),
        };
        let mut buf = Vec::new();
        f.take(REFS_LIMIT + 1).read_to_end(&mut buf).map_err(|e| ImageError::io(&p, e))?;
        let corrupt = |reason: String| ImageError::Corrupt { path: p.clone(), reason };
        if buf.len() as u64 > REFS_LIMIT {
            return Err(corrupt(format!("over {REFS_LIMIT} bytes")));
        }
        let refs: Refs = serde_json::from_slice(&buf).map_err(|e| corrupt(e.to_string()))?;
        if refs.version != REFS_VERSION && refs.version != REFS_VERSION_PLAIN {
            return Err(corrupt(format!(
                "version {} (this build reads {REFS_VERSION_PLAIN} and {REFS_VERSION})",
                refs.version
            )));
        }
        if let Some((r, d)) = refs.refs.iter().find(|(_, d)| !refs.images.contains_key(*d)) {
            return Err(corrupt(format!("{r} points at unknown image {d}")));
        }
        if let Some((i, d)) = refs.indexes.iter().find(|(_, d)| !refs.images.contains_key(*d)) {
            return Err(corrupt(format!("index {i} points at unknown image {d}")));
        }
        Ok(refs)
    }

    /// Atomic replace, and only when something changed (flash is precious).
    fn write_refs(&self, refs: &Refs, old: &Refs) -> Result<(), ImageError> {
        if refs == old {
            return Ok(());
        }
        let p = self.dir.join(REFS);
        let tmp = self.dir.join("tmp").join(REFS);
        let mut out = refs.clone();
        out.version = if out.indexes.is_empty() { REFS_VERSION_PLAIN } else { REFS_VERSION };
        let mut bytes =
            serde_json::to_vec_pretty(&out).map_err(|e| ImageError::Json { what: REFS.into(), source: e })?;
        bytes.push(b'\n');
        let written = File::create(&tmp).and_then(|mut f| {
            f.write_all(&bytes)?;
            f.sync_all()
        });
        if let Err(e) = written {
            remove(&tmp)?;
            return Err(ImageError::io(&tmp, e));
        }
        fs::rename(&tmp, &p).map_err(|e| ImageError::io(&p, e))?;
        sync_dir(&self.dir)
    }

    fn lock(&self) -> Result<Flock<File>, ImageError> {
        let p = self.dir.join("lock");
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&p);
        let f = f.map_err(|e| ImageError::io(&p, e))?;
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| ImageError::io(&p, e.into()))
    }
}

/// The refs.json key for a reference: `name:tag`, or `name@digest` when it pins one.
fn key(r: &ImageRef) -> String {
    match (r.digest(), r.tag()) {
        (Some(d), _) => format!("{}@{d}", r.name()),
        (None, t) => format!("{}:{}", r.name(), t.unwrap_or("latest")),
    }
}

fn ref_name(key: &str) -> String {
    ImageRef::try_from(key).map(|r| r.name().to_string()).unwrap_or_default()
}

/// Points `reference` at `digest`. `name@digest` entries exist only for images no tag
/// names: an image a moved tag leaves nameless stays reachable that way (a running
/// container may still use it; `remove` frees it), and a new tag drops them.
fn set_ref(refs: &mut Refs, reference: &str, digest: &str) {
    if reference.contains('@') {
        if !refs.refs.iter().any(|(k, d)| d == digest && !k.contains('@')) {
            refs.refs.insert(reference.to_string(), digest.to_string());
        }
        return;
    }
    if let Some(prev) = refs.refs.insert(reference.to_string(), digest.to_string()) {
        if prev != digest && !refs.refs.values().any(|d| *d == prev) {
            refs.refs.insert(format!("{}@{prev}", ref_name(reference)), prev);
        }
    }
    refs.refs.retain(|k, d| !(d == digest && k.contains('@')));
}

/// The name a layout entry's annotations give, if any (see `ImageStore::load`).
fn annotated_ref(desc: &Descriptor, layout: &Path) -> Result<Option<String>, ImageError> {
    let full = match (desc.annotations.get(oci::ANN_CONTAINERD_NAME), desc.annotations.get(oci::ANN_REF_NAME))
    {
        (Some(full), _) => full.clone(),
        (None, Some(r)) if r.contains([':', '/', '@']) => r.clone(),
        (None, Some(tag)) => format!("{}:{tag}", file_stem_name(layout)?),
        (None, None) => return Ok(None),
    };
    let r = ImageRef::try_from(full.as_str()).map_err(|e| ImageError::Name(e.to_string()))?;
    if r.digest().is_some() {
        return Err(ImageError::Name(format!("{full}: annotation pins a digest")));
    }
    Ok(Some(key(&r)))
}

/// `.../busybox.tar` or `.../busybox/` -> `busybox`, if that is a valid image name.
fn file_stem_name(layout: &Path) -> Result<String, ImageError> {
    let stem = layout.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let stem = stem.strip_suffix(".tar").unwrap_or(stem);
    match ImageRef::try_from(stem) {
        Ok(r) if r.name() == stem => Ok(stem.to_string()),
        _ => Err(ImageError::Name(format!(
            "cannot name images after {}: give a name to load them as",
            layout.display()
        ))),
    }
}

fn info(refs: &Refs, reference: &str, digest: &str) -> Result<ImageInfo, ImageError> {
    let meta = refs.images.get(digest).ok_or_else(|| ImageError::Corrupt {
        path: PathBuf::from(REFS),
        reason: format!("{reference} points at unknown image {digest}"),
    })?;
    Ok(ImageInfo {
        reference: reference.to_string(),
        digest: digest.to_string(),
        size: meta.size,
        platform: meta.platform.clone(),
    })
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let entries = fs::read_dir(dir).map_err(|e| ImageError::io(dir, e))?;
    entries.map(|e| e.map(|e| e.path()).map_err(|e| ImageError::io(dir, e))).collect()
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| ImageError::io(dir, e))
}

const PARTIAL: &str = "partial";

/// What `ImageStore::gc` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// References dropped (their images went unless another kept reference names them).
    pub removed: Vec<String>,
    /// References still in the store.
    pub kept: Vec<String>,
    /// Bytes freed on disk (blobs, rootfs, finished partial downloads).
    pub freed: u64,
    pub usage: DiskUsage,
}

/// Bytes the store takes, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DiskUsage {
    pub blobs: u64,
    pub rootfs: u64,
    /// Downloads in progress (kept across restarts to resume).
    pub partial: u64,
    pub total: u64,
    pub budget: Option<u64>,
}

/// The manifest digest `r` names in `refs`: by tag, or by manifest or index digest
/// (content counts, so the name of a digest reference does not matter).
fn stored_digest<'a>(refs: &'a Refs, r: &ImageRef) -> Option<&'a String> {
    match r.digest() {
        Some(d) => refs.images.get_key_value(d).map(|(k, _)| k).or_else(|| refs.indexes.get(d)),
        None => refs.refs.get(&key(r)),
    }
}

/// Drops images no reference names, and index entries that lead to them.
fn prune_images(refs: &mut Refs) {
    let used: HashSet<String> = refs.refs.values().cloned().collect();
    refs.images.retain(|d, _| used.contains(d));
    refs.indexes.retain(|_, d| used.contains(d));
}

/// Bytes of the regular files directly in `dir`.
fn dir_bytes(dir: &Path) -> Result<u64, ImageError> {
    let mut total = 0u64;
    for e in read_dir(dir)? {
        let m = fs::symlink_metadata(&e).map_err(|err| ImageError::io(&e, err))?;
        if m.is_file() {
            total = total.saturating_add(m.len());
        }
    }
    Ok(total)
}

/// What `ImageStore::check` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    pub ok: bool,
    /// Each inconsistency, naming the image, blob or file.
    pub problems: Vec<String>,
    pub references: usize,
    pub images: usize,
    pub blobs: usize,
    /// Blobs no image needs (collected by the next `rm`, `load` or garbage collection).
    pub unreferenced_blobs: usize,
    pub partial_downloads: usize,
    /// Entries left in tmp/ by an interrupted load or pull (removed by the next one).
    pub leftovers: usize,
    pub usage: Option<DiskUsage>,
}

impl CheckReport {
    fn done(mut self) -> CheckReport {
        self.ok = self.problems.is_empty();
        self
    }
}
