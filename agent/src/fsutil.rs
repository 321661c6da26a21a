//! Crash-safe file replacement and private modes.
//!
//! A power cut at any instant leaves either the old or the new content at
//! `path`, never a mix: the bytes go to a temp file in the same directory,
//! which is fsynced, renamed over `path`, and then the directory is fsynced so
//! the rename itself is durable.
//!
//! Everything skiff writes may hold secrets (env values carry tokens), so files
//! are created owner-only (0600) and directories 0700, whatever the umask: the
//! mode is set on the open file, not left to `open(2)`'s umask-filtered mode.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of every file skiff creates.
pub const PRIVATE_FILE: u32 = 0o600;
/// Mode of skiff's own directories.
pub const PRIVATE_DIR: u32 = 0o700;

pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| io::Error::other("path has no file name"))?;
    // One fixed temp name per target: a writer killed mid-write leaves one
    // stale temp file that the next write reuses, not one per attempt.
    // Callers serialise writers of the same path (the store holds a lock).
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let result = (|| {
        let mut f = create_private(&tmp, true)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Opens `path` for writing, creating it 0600; an existing file with other
/// mode bits (a stale temp file, an older install) is made 0600 too.
/// `truncate`: start empty; otherwise append.
pub fn create_private(path: &Path, truncate: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.create(true).mode(PRIVATE_FILE);
    if truncate {
        o.write(true).truncate(true);
    } else {
        o.append(true);
    }
    let f = o.open(path)?;
    if f.metadata()?.mode() & 0o7777 != PRIVATE_FILE {
        f.set_permissions(Permissions::from_mode(PRIVATE_FILE))?;
    }
    Ok(f)
}

/// Creates `dir` (and missing parents, which keep the umask's mode) and makes
/// `dir` itself 0700, also when it already existed.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    set_mode(dir, PRIVATE_DIR)
}

/// Sets the permission bits of `path` to `mode` when they differ (a chmod is
/// a metadata write on flash). A missing path is fine; a symlink is left alone
/// (chmod would follow it out of skiff's directories).
pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Ok(()),
        Ok(m) if m.mode() & 0o7777 != mode => fs::set_permissions(path, Permissions::from_mode(mode)),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn replaces_without_leaving_temp_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        atomic_write(&p, b"one").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        atomic_write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1, "no temp file left");
    }

    #[test]
    fn files_are_private_even_over_a_readable_stale_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let stale = d.path().join(".f.tmp");
        fs::write(&stale, b"old").unwrap();
        fs::set_permissions(&stale, Permissions::from_mode(0o666)).unwrap();
        atomic_write(&p, b"secret").unwrap();
        assert_eq!(mode(&p), 0o600);
        let log = d.path().join("app.log");
        fs::write(&log, b"x").unwrap();
        fs::set_permissions(&log, Permissions::from_mode(0o644)).unwrap();
        drop(create_private(&log, false).unwrap());
        assert_eq!(mode(&log), 0o600);
        assert_eq!(fs::read(&log).unwrap(), b"x", "append keeps the content");
    }

    #[test]
    fn private_dir_fixes_an_existing_dir_and_set_mode_skips_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("a/b");
        fs::create_dir_all(&sub).unwrap();
        fs::set_permissions(&sub, Permissions::from_mode(0o755)).unwrap();
        private_dir(&sub).unwrap();
        assert_eq!(mode(&sub), 0o700);
        let target = d.path().join("t");
        fs::write(&target, b"").unwrap();
        fs::set_permissions(&target, Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&target, d.path().join("l")).unwrap();
        set_mode(&d.path().join("l"), 0o600).unwrap();
        assert_eq!(mode(&target), 0o644, "followed a symlink");
        set_mode(&d.path().join("missing"), 0o600).unwrap();
    }
}
