//! Applying layer tars, in order, to one directory that becomes an image's flattened
//! rootfs. Invariants: nothing is ever written outside `root` — entry names with a root or
//! a `..` are refused, and an entry whose parent path crosses a symlink is refused rather
//! than followed (so `x -> /etc` then `x/passwd` cannot reach the host); an entry replaces
//! what is at its path instead of writing through it. Whiteouts hide only what lower
//! layers put there, never what the same layer adds (OCI image spec, "Whiteouts").
//! Modes, owners (when running as root), symlinks and hardlinks are kept; device nodes and
//! fifos are skipped (the runtime provides /dev); mtimes are not kept.

use super::oci::{self, Compression, Descriptor, Verifying};
use super::ImageError;
use flate2::read::MultiGzDecoder;
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{lchown, symlink, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use tar::EntryType;

/// Applies the layer stored at `blob` to `root`, checking the compressed bytes against
/// `desc` and the uncompressed tar against `diff_id`.
pub fn apply_layer(root: &Path, blob: &Path, desc: &Descriptor, diff_id: &str) -> Result<(), ImageError> {
    let file = File::open(blob).map_err(|e| ImageError::io(blob, e))?;
    let mut packed = Verifying::new(file);
    let applied = (|| {
        let tar: Box<dyn Read + '_> = match oci::layer_compression(&desc.media_type)? {
            Compression::None => Box::new(&mut packed),
            Compression::Gzip => Box::new(MultiGzDecoder::new(&mut packed)),
            Compression::Zstd => Box::new(ZstdFrames::new(io::BufReader::new(&mut packed))),
        };
        let mut tar = Verifying::new(tar);
        Layer {
            root,
            digest: &desc.digest,
            created: HashSet::new(),
            root_user: nix::unistd::geteuid().is_root(),
        }
        .apply(&mut tar)?;
        tar.finish(diff_id, None).map_err(|e| match e {
            ImageError::Mismatch { reason, .. } => ImageError::Mismatch {
                digest: desc.digest.clone(),
                reason: format!("uncompressed, does not match diff_id {diff_id}: {reason}"),
            },
            e => e,
        })
    })();
    // Bytes that do not decompress are most likely not the blob's bytes: say so.
    let verified = packed.finish(&desc.digest, Some(desc.size));
    match (applied, verified) {
        (Err(e), Err(ImageError::NoSpace { .. }) | Ok(())) => Err(e),
        (_, Err(m @ ImageError::Mismatch { .. })) => Err(m),
        (Err(e), _) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
    }
}

/// A zstd stream of any number of frames (skippable ones skipped), read as one: ruzstd's
/// `StreamingDecoder` stops after the first frame, and zstd:chunked layers have many. The
/// window is bounded by ruzstd's default limit, so a crafted frame header cannot make it
/// allocate without bound.
pub struct ZstdFrames<R> {
    src: R,
    dec: ruzstd::decoding::FrameDecoder,
    in_frame: bool,
}

impl<R: io::BufRead> ZstdFrames<R> {
    pub fn new(src: R) -> Self {
        ZstdFrames { src, dec: ruzstd::decoding::FrameDecoder::new(), in_frame: false }
    }
}

impl<R: io::BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        use ruzstd::decoding::BlockDecodingStrategy;
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_frame {
                if self.dec.can_collect() > 0 {
                    return self.dec.read(buf);
                }
                if self.dec.is_finished() {
                    self.in_frame = false;
                    continue;
                }
                self.dec
                    .decode_blocks(&mut self.src, BlockDecodingStrategy::UptoBlocks(1))
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}")))?;
                continue;
            }
            if self.src.fill_buf()?.is_empty() {
                return Ok(0);
            }
            match self.dec.init(&mut self.src) {
                Ok(()) => self.in_frame = true,
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped = io::copy(&mut (&mut self.src).take(u64::from(length)), &mut io::sink())?;
                    if skipped != u64::from(length) {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "zstd: truncated skippable frame",
                        ));
                    }
                }
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}"))),
            }
        }
    }
}

/// Bytes of regular files under `root`, each hardlinked file once. Symlinks not followed.
pub fn tree_size(root: &Path) -> Result<u64, ImageError> {
    fn walk(dir: &Path, seen: &mut HashSet<(u64, u64)>) -> Result<u64, ImageError> {
        let mut total = 0;
        for e in fs::read_dir(dir).map_err(|e| ImageError::io(dir, e))? {
            let e = e.map_err(|e| ImageError::io(dir, e))?;
            let m = fs::symlink_metadata(e.path()).map_err(|err| ImageError::io(e.path(), err))?;
            if m.is_dir() {
                total += walk(&e.path(), seen)?;
            } else if m.is_file() && seen.insert((m.dev(), m.ino())) {
                total += m.len();
            }
        }
        Ok(total)
    }
    walk(root, &mut HashSet::new())
}

struct Layer<'a> {
    root: &'a Path,
    digest: &'a str,
    /// Paths this layer has put in place; whiteouts in the same layer leave them alone.
    created: HashSet<PathBuf>,
    root_user: bool,
}

impl Layer<'_> {
    fn apply(&mut self, r: impl Read) -> Result<(), ImageError> {
        let mut archive = tar::Archive::new(r);
        for entry in archive.entries().map_err(|e| self.tar_err(e))? {
            let mut entry = entry.map_err(|e| self.tar_err(e))?;
            let raw = entry.path().map_err(|e| self.tar_err(e))?.into_owned();
            let rel = clean(&raw).ok_or_else(|| self.refuse(&raw, "absolute or has '..'"))?;
            let Some(name) = rel.file_name().map(OsStr::to_owned) else {
                continue; // "./": the root itself, which the store owns
            };
            let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
            self.make_parents(&parent)?;

            if let Some(hidden) = name.as_bytes().strip_prefix(b".wh.") {
                match hidden {
                    b".wh..opq" => self.prune(&parent)?,
                    h if h.starts_with(b".wh.") => {} // other aufs metadata: not content
                    b"" | b"." | b".." => return Err(self.refuse(&raw, "bad whiteout")),
                    h => self.whiteout(&parent.join(OsStr::from_bytes(h)))?,
                }
                continue;
            }

            let dst = self.root.join(&rel);
            let h = entry.header();
            let mode = h.mode().map_err(|e| self.tar_err(e))? & 0o7777;
            let uid = h.uid().map_err(|e| self.tar_err(e))?;
            let gid = h.gid().map_err(|e| self.tar_err(e))?;
            let (uid, gid) = match (u32::try_from(uid), u32::try_from(gid)) {
                (Ok(u), Ok(g)) => (u, g),
                _ => return Err(self.refuse(&raw, "uid or gid out of range")),
            };
            match h.entry_type() {
                EntryType::Directory => {
                    let is_dir = fs::symlink_metadata(&dst).map(|m| m.is_dir()).unwrap_or(false);
                    if !is_dir {
                        remove(&dst)?;
                        fs::create_dir(&dst).map_err(|e| ImageError::io(&dst, e))?;
                    }
                    self.own(&dst, uid, gid, Some(mode))?;
                }
                EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                    remove(&dst)?;
                    // create_new: O_EXCL never follows a symlink at the final component.
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&dst)
                        .map_err(|e| ImageError::io(&dst, e))?;
                    io::copy(&mut entry, &mut f).map_err(|e| self.tar_err(e))?;
                    self.own(&dst, uid, gid, Some(mode))?;
                }
                EntryType::Symlink => {
                    let target = entry
                        .link_name()
                        .map_err(|e| self.tar_err(e))?
                        .ok_or_else(|| self.refuse(&raw, "symlink without target"))?;
                    remove(&dst)?;
                    symlink(&target, &dst).map_err(|e| ImageError::io(&dst, e))?;
                    self.own(&dst, uid, gid, None)?;
                }
                EntryType::Link => {
                    let target = entry
                        .link_name()
                        .map_err(|e| self.tar_err(e))?
                        .ok_or_else(|| self.refuse(&raw, "hardlink without target"))?;
                    let trel = clean(&target)
                        .filter(|t| t.file_name().is_some())
                        .ok_or_else(|| self.refuse(&raw, "hardlink target absolute or has '..'"))?;
                    self.check_parents(&trel)?;
                    let src = self.root.join(&trel);
                    match fs::symlink_metadata(&src) {
                        Ok(m) if !m.is_dir() => {}
                        _ => return Err(self.refuse(&raw, "hardlink target missing or a directory")),
                    }
                    if trel != rel {
                        remove(&dst)?;
                        // link(2) without AT_SYMLINK_FOLLOW: links a symlink itself, never its target.
                        fs::hard_link(&src, &dst).map_err(|e| ImageError::io(&dst, e))?;
                    }
                }
                EntryType::Char | EntryType::Block | EntryType::Fifo => {
                    tracing::debug!(layer = self.digest, path = %rel.display(), "skipping device node or fifo");
                    continue;
                }
                other => return Err(self.refuse(&raw, &format!("unsupported entry type {other:?}"))),
            }
            self.created.insert(rel);
        }
        Ok(())
    }

    /// Creates missing parents (they belong to this layer), refuses symlinks and files.
    fn make_parents(&mut self, parent: &Path) -> Result<(), ImageError> {
        let mut cur = PathBuf::new();
        for c in parent.components() {
            cur.push(c);
            let p = self.root.join(&cur);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => return Err(self.refuse(&cur, "parent is a symlink")),
                Ok(_) => return Err(self.refuse(&cur, "parent is not a directory")),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&p).map_err(|e| ImageError::io(&p, e))?;
                    fs::set_permissions(&p, Permissions::from_mode(0o755))
                        .map_err(|e| ImageError::io(&p, e))?;
                    self.created.insert(cur.clone());
                }
                Err(e) => return Err(ImageError::io(&p, e)),
            }
        }
        Ok(())
    }

    /// Every parent of `rel` exists and is a real directory.
    fn check_parents(&self, rel: &Path) -> Result<(), ImageError> {
        let mut cur = PathBuf::new();
        for c in rel.parent().unwrap_or(Path::new("")).components() {
            cur.push(c);
            match fs::symlink_metadata(self.root.join(&cur)) {
                Ok(m) if m.is_dir() => {}
                _ => return Err(self.refuse(rel, "hardlink target's parent is not a directory")),
            }
        }
        Ok(())
    }

    /// `.wh.<name>`: drop what lower layers had at `rel`.
    fn whiteout(&self, rel: &Path) -> Result<(), ImageError> {
        if !self.created.contains(rel) {
            return remove(&self.root.join(rel));
        }
        let is_dir = fs::symlink_metadata(self.root.join(rel)).map(|m| m.is_dir()).unwrap_or(false);
        if is_dir {
            self.prune(rel)?;
        }
        Ok(())
    }

    /// Opaque directory: keep only what this layer put under `dir`.
    fn prune(&self, dir: &Path) -> Result<(), ImageError> {
        let abs = self.root.join(dir);
        for e in fs::read_dir(&abs).map_err(|e| ImageError::io(&abs, e))? {
            let e = e.map_err(|e| ImageError::io(&abs, e))?;
            let rel = dir.join(e.file_name());
            if !self.created.contains(&rel) {
                remove(&e.path())?;
            } else if e.file_type().map_err(|err| ImageError::io(e.path(), err))?.is_dir() {
                self.prune(&rel)?;
            }
        }
        Ok(())
    }

    fn own(&self, p: &Path, uid: u32, gid: u32, mode: Option<u32>) -> Result<(), ImageError> {
        // Unprivileged runs (developer tests) cannot give files away; the agent runs as root.
        if self.root_user {
            lchown(p, Some(uid), Some(gid)).map_err(|e| ImageError::io(p, e))?;
        }
        // After chown, which clears setuid bits.
        if let Some(mode) = mode {
            fs::set_permissions(p, Permissions::from_mode(mode)).map_err(|e| ImageError::io(p, e))?;
        }
        Ok(())
    }

    fn tar_err(&self, e: io::Error) -> ImageError {
        if super::is_no_space(&e) {
            return ImageError::NoSpace { path: self.root.to_path_buf() };
        }
        ImageError::Blob { digest: self.digest.to_string(), source: e }
    }

    fn refuse(&self, path: &Path, reason: &str) -> ImageError {
        ImageError::UnsafeEntry {
            layer: self.digest.to_string(),
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

/// The relative path an entry names, without `.` parts; None if it is absolute or has `..`.
fn clean(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Removes whatever is at `p` (a directory with its contents); absent is fine.
/// Never follows a symlink: `remove_dir_all` does not, and `remove_file` unlinks the link.
pub fn remove(p: &Path) -> Result<(), ImageError> {
    let r = match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    r.map_err(|e| ImageError::io(p, e))
}
