//! Files named on a command line (`-f apps.toml`, key files, fleet files):
//! read with a size limit, and only when they are regular files.
//!
//! A FIFO is opened with `O_NONBLOCK` (so the open never waits for a writer)
//! and refused after `fstat`; a device such as `/dev/zero` is refused before
//! one byte is read; a regular file is read to at most `limit` bytes, so one
//! that grows while it is read is refused too. Never reads more than
//! `limit + 1` bytes whatever the file is.
//!
//! Shared by `skiff` and `skiffctl`: the controller includes this file with
//! `#[path]` (it does not depend on the agent crate), so it uses only std,
//! libc and thiserror.

use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Largest desired-state file (TOML) either binary reads.
pub const STATE_TOML_LIMIT: u64 = 4 << 20;
/// Largest key file (PEM-like text of a few lines).
pub const KEY_LIMIT: u64 = 64 << 10;
/// Largest fleet file.
pub const FLEET_LIMIT: u64 = 4 << 20;
/// Largest TLS file (a CA bundle, a certificate, its key).
pub const CERT_LIMIT: u64 = 1 << 20;

/// Why a file named on the command line was not read. The message names the
/// file and says everything; there is no separate `source` (so a printed
/// error chain does not repeat it).
#[derive(Debug, thiserror::Error)]
pub enum LocalFileError {
    #[error("{path}: {err}")]
    Io { path: String, err: io::Error },
    #[error("{path}: not a regular file (it is {kind})")]
    NotRegular { path: String, kind: &'static str },
    #[error("{path}: {size} bytes, more than the {limit} bytes allowed")]
    TooLarge { path: String, size: u64, limit: u64 },
    #[error("{path}: not UTF-8 text")]
    NotText { path: String },
}

fn kind(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// The bytes of the regular file `path`, at most `limit` of them.
pub fn read(path: &Path, limit: u64) -> Result<Vec<u8>, LocalFileError> {
    let shown = || path.display().to_string();
    let io = |err| LocalFileError::Io { path: shown(), err };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(LocalFileError::NotRegular { path: shown(), kind: kind(meta.file_type()) });
    }
    if meta.len() > limit {
        return Err(LocalFileError::TooLarge { path: shown(), size: meta.len(), limit });
    }
    let mut out = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limit.saturating_add(1)).read_to_end(&mut out).map_err(io)?;
    let got = out.len() as u64;
    if got > limit {
        // It grew while we read it.
        return Err(LocalFileError::TooLarge { path: shown(), size: got, limit });
    }
    Ok(out)
}

/// [`read`], as UTF-8 text.
pub fn read_to_string(path: &Path, limit: u64) -> Result<String, LocalFileError> {
    String::from_utf8(read(path, limit)?)
        .map_err(|_| LocalFileError::NotText { path: path.display().to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_within_the_limit_are_read_others_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.toml");
        std::fs::write(&f, "x".repeat(100)).unwrap();
        assert_eq!(read(&f, 100).unwrap().len(), 100);
        let e = read(&f, 99).unwrap_err();
        assert!(matches!(e, LocalFileError::TooLarge { size: 100, limit: 99, .. }), "{e}");
        assert_eq!(e.to_string(), format!("{}: 100 bytes, more than the 99 bytes allowed", f.display()));
        let e = read(d.path(), 100).unwrap_err();
        assert!(matches!(e, LocalFileError::NotRegular { kind: "a directory", .. }), "{e}");
        let e = read(Path::new("/dev/zero"), 100).unwrap_err();
        assert!(matches!(e, LocalFileError::NotRegular { kind: "a character device", .. }), "{e}");
        let e = read(&d.path().join("missing"), 100).unwrap_err();
        assert!(matches!(e, LocalFileError::Io { .. }), "{e}");
        std::fs::write(&f, [0xff, 0xfe]).unwrap();
        assert!(matches!(read_to_string(&f, 100), Err(LocalFileError::NotText { .. })));
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&p).status().unwrap().success());
        let e = read(&p, 100).unwrap_err();
        assert!(matches!(e, LocalFileError::NotRegular { kind: "a FIFO", .. }), "{e}");
    }
}
