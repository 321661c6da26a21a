//! A container's writable rootfs on top of an image rootfs, in a directory the caller
//! owns: `dir/rootfs` is an overlay (lower = the image rootfs, `dir/upper`, `dir/work`)
//! when the kernel allows it, else a full copy of the image rootfs. Invariants: the image
//! rootfs is never written; a copy appears at `dir/rootfs` only once complete; `dir` is
//! removed only once nothing is mounted under it any more, so a removal never reaches
//! through a live mount into the image.

use super::unpack::remove;
use super::ImageError;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::collections::HashMap;
use std::fs::{self, Permissions};
use std::io;
use std::os::unix::fs::{lchown, symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Returns the merged rootfs path, `dir/rootfs`. Idempotent: an existing mount or a
/// finished copy is returned as it is (an agent restart adopts running containers).
pub fn mount_rootfs(image_rootfs: &Path, dir: &Path) -> Result<PathBuf, ImageError> {
    let merged = dir.join("rootfs");
    let (upper, work) = (dir.join("upper"), dir.join("work"));
    for d in [dir, &merged, &upper, &work] {
        fs::create_dir_all(d).map_err(|e| ImageError::io(d, e))?;
    }
    if is_mountpoint(&merged)? {
        return Ok(merged);
    }
    let not_empty = fs::read_dir(&merged).map_err(|e| ImageError::io(&merged, e))?.next().is_some();
    if not_empty {
        return Ok(merged); // a finished copy: copies are renamed into place whole
    }
    match mount_overlay(image_rootfs, &upper, &work, &merged) {
        Ok(()) => return Ok(merged),
        Err(err) => tracing::warn!(
            dir = %dir.display(),
            %err,
            listed = overlay_listed(),
            "overlayfs mount failed, copying the image rootfs instead"
        ),
    }
    let tmp = dir.join("rootfs.copying");
    remove(&tmp)?;
    copy_tree(image_rootfs, &tmp)?;
    fs::remove_dir(&merged).map_err(|e| ImageError::io(&merged, e))?;
    fs::rename(&tmp, &merged).map_err(|e| ImageError::io(&merged, e))?;
    Ok(merged)
}

/// Unmounts everything mounted at or under `dir` (deepest first, stacked mounts too),
/// then removes `dir`. Idempotent; a mount that will not go away is an error and `dir`
/// stays, so the removal never reaches into a mounted image or volume.
pub fn unmount_rootfs(dir: &Path) -> Result<(), ImageError> {
    loop {
        let mounts = mounts_under(dir)?;
        let Some(deepest) = mounts.iter().max_by_key(|m| m.as_os_str().len()) else {
            break;
        };
        umount2(deepest, MntFlags::empty())
            .map_err(|e| ImageError::Mount { path: deepest.clone(), source: e })?;
    }
    remove(dir)
}

fn mount_overlay(lower: &Path, upper: &Path, work: &Path, merged: &Path) -> Result<(), ImageError> {
    let mut opts = Vec::new();
    for (key, p) in [("lowerdir", lower), ("upperdir", upper), ("workdir", work)] {
        let abs = fs::canonicalize(p).map_err(|e| ImageError::io(p, e))?;
        // The kernel splits options on ',' and lowerdir on ':'.
        let s = abs.to_str().filter(|s| !s.contains([',', ':', '\\'])).ok_or_else(|| {
            let msg = "path unusable in overlay mount options";
            ImageError::io(p, io::Error::new(io::ErrorKind::InvalidInput, msg))
        })?;
        opts.push(format!("{key}={s}"));
    }
    let opts = opts.join(",");
    mount(Some("overlay"), merged, Some("overlay"), MsFlags::empty(), Some(opts.as_str()))
        .map_err(|e| ImageError::Mount { path: merged.to_path_buf(), source: e })
}

fn overlay_listed() -> bool {
    fs::read_to_string("/proc/filesystems")
        .map(|s| s.lines().any(|l| l.split_whitespace().last() == Some("overlay")))
        .unwrap_or(false)
}

/// Whether `p` is a mount point in this mount namespace.
pub(super) fn is_mountpoint(p: &Path) -> Result<bool, ImageError> {
    let abs = match fs::canonicalize(p) {
        Ok(a) => a,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(ImageError::io(p, e)),
    };
    Ok(mount_points()?.contains(&abs))
}

/// Mount points at or under `dir` in this mount namespace.
fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let abs = match fs::canonicalize(dir) {
        Ok(a) => a,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ImageError::io(dir, e)),
    };
    Ok(mount_points()?.into_iter().filter(|m| m.starts_with(&abs)).collect())
}

/// /proc/self/mountinfo, field 5 of each line.
fn mount_points() -> Result<Vec<PathBuf>, ImageError> {
    let p = "/proc/self/mountinfo";
    let info = fs::read_to_string(p).map_err(|e| ImageError::io(p, e))?;
    Ok(info.lines().filter_map(|l| l.split(' ').nth(4)).map(|m| PathBuf::from(unescape(m))).collect())
}

/// mountinfo writes space, tab, newline and backslash as octal escapes (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct =
            b.get(i + 1..i + 4).filter(|o| b[i] == b'\\' && o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(o) => {
                out.push((o[0] - b'0') * 64 + (o[1] - b'0') * 8 + (o[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Copies a tree keeping modes, owners, symlinks and hardlinks; skips anything else
/// (sockets, fifos, devices: an image rootfs from the store has none).
fn copy_tree(src: &Path, dst: &Path) -> Result<(), ImageError> {
    fn walk(src: &Path, dst: &Path, links: &mut HashMap<(u64, u64), PathBuf>) -> Result<(), ImageError> {
        let m = fs::symlink_metadata(src).map_err(|e| ImageError::io(src, e))?;
        let ft = m.file_type();
        if ft.is_dir() {
            fs::create_dir(dst).map_err(|e| ImageError::io(dst, e))?;
            for e in fs::read_dir(src).map_err(|e| ImageError::io(src, e))? {
                let e = e.map_err(|e| ImageError::io(src, e))?;
                walk(&e.path(), &dst.join(e.file_name()), links)?;
            }
        } else if ft.is_symlink() {
            let target = fs::read_link(src).map_err(|e| ImageError::io(src, e))?;
            symlink(target, dst).map_err(|e| ImageError::io(dst, e))?;
        } else if ft.is_file() {
            if let Some(first) = links.get(&(m.dev(), m.ino())) {
                return fs::hard_link(first, dst).map_err(|e| ImageError::io(dst, e));
            }
            fs::copy(src, dst).map_err(|e| ImageError::io(dst, e))?;
            if m.nlink() > 1 {
                links.insert((m.dev(), m.ino()), dst.to_path_buf());
            }
        } else {
            return Ok(());
        }
        if nix::unistd::geteuid().is_root() {
            lchown(dst, Some(m.uid()), Some(m.gid())).map_err(|e| ImageError::io(dst, e))?;
        }
        if !ft.is_symlink() {
            // After chown, which clears setuid bits.
            fs::set_permissions(dst, Permissions::from_mode(m.mode() & 0o7777))
                .map_err(|e| ImageError::io(dst, e))?;
        }
        Ok(())
    }
    walk(src, dst, &mut HashMap::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_keeps_modes_symlinks_and_hardlinks() {
        let t = tempfile::TempDir::new().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("ro")).unwrap();
        fs::write(src.join("ro/f"), "x").unwrap();
        fs::hard_link(src.join("ro/f"), src.join("h")).unwrap();
        symlink("/etc/passwd", src.join("abs")).unwrap();
        fs::set_permissions(src.join("ro/f"), Permissions::from_mode(0o4711)).unwrap();
        fs::set_permissions(src.join("ro"), Permissions::from_mode(0o555)).unwrap();
        let dst = t.path().join("dst");
        copy_tree(&src, &dst).unwrap();
        let mode = |p: &str| fs::symlink_metadata(dst.join(p)).unwrap().mode() & 0o7777;
        assert_eq!((mode("ro"), mode("ro/f")), (0o555, 0o4711));
        let ino = |p: &str| fs::metadata(dst.join(p)).unwrap().ino();
        assert_eq!(ino("ro/f"), ino("h"));
        assert_eq!(fs::read_link(dst.join("abs")).unwrap(), Path::new("/etc/passwd"));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b\\c"), r"/a b\\c");
        assert_eq!(unescape(r"/a\134b"), r"/a\b");
    }
}
