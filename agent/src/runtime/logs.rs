//! Per-app log files with a size cap: `<dir>/<app>.log` and one rotated
//! generation `<app>.log.1`. When the current file would pass half the cap it
//! becomes `.1` (replacing the older one), so the pair never holds more than
//! the cap. Written by the shim (the only writer), read by `skiff logs`.
//! Files are 0600 (apps print secrets too). A full file system never stops
//! the writer: output that cannot be written is dropped and counted, and the
//! count is written into the log once there is space again.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub fn current(dir: &Path, app: &str) -> PathBuf {
    dir.join(format!("{app}.log"))
}

pub fn rotated(dir: &Path, app: &str) -> PathBuf {
    dir.join(format!("{app}.log.1"))
}

pub struct RotatingLog {
    path: PathBuf,
    old: PathBuf,
    /// `None` while the file cannot be opened (the log dir is full or gone):
    /// every write tries again.
    file: Option<File>,
    size: u64,
    /// Size at which the current file is rotated: half the cap.
    limit: u64,
    /// Bytes of output dropped since the last successful write.
    dropped: u64,
    /// The last byte written was not a newline: a note starts a line of its own.
    mid_line: bool,
}

impl RotatingLog {
    /// Never fails: a log dir that cannot be written now (full, missing) only
    /// means output is dropped, and counted, until it can.
    pub fn open(dir: &Path, app: &str, cap: u64) -> RotatingLog {
        let _ = crate::fsutil::private_dir(dir);
        let path = current(dir, app);
        let mut log = RotatingLog {
            old: rotated(dir, app),
            path,
            file: None,
            size: 0,
            limit: (cap / 2).max(1024),
            dropped: 0,
            mid_line: false,
        };
        log.reopen();
        log
    }

    fn reopen(&mut self) -> Option<&mut File> {
        if self.file.is_none() {
            let f = crate::fsutil::create_private(&self.path, false).ok()?;
            self.size = f.metadata().map(|m| m.len()).unwrap_or(0);
            self.file = Some(f);
        }
        self.file.as_mut()
    }

    /// Bytes dropped and not yet reported in the log.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Appends `buf`. What does not fit (the file system is full, the file
    /// cannot be opened) is dropped and counted; the first write that succeeds
    /// afterwards is preceded by a line saying how much was lost. The error is
    /// returned for the caller to note; the log stays usable.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.dropped > 0 {
            let note = format!(
                "{}[skiff: {} bytes of output dropped: the log could not be written]\n",
                if self.mid_line { "\n" } else { "" },
                self.dropped
            );
            if let Err((_, e)) = self.append(note.as_bytes()) {
                self.dropped = self.dropped.saturating_add(buf.len() as u64);
                return Err(e);
            }
            self.dropped = 0;
        }
        self.append(buf).map_err(|(written, e)| {
            self.dropped = self.dropped.saturating_add((buf.len() - written) as u64);
            e
        })
    }

    /// Writes as much of `buf` as it can, rotating at the limit. On error:
    /// how many bytes went in, and why the rest did not.
    fn append(&mut self, buf: &[u8]) -> Result<(), (usize, io::Error)> {
        let mut done = 0;
        while done < buf.len() {
            if self.size >= self.limit {
                self.rotate().map_err(|e| (done, e))?;
            }
            let room = usize::try_from(self.limit - self.size).unwrap_or(usize::MAX);
            let end = done + (buf.len() - done).min(room);
            let Some(f) = self.reopen() else {
                return Err((done, io::Error::other(format!("cannot open {}", self.path.display()))));
            };
            match f.write(&buf[done..end]) {
                Ok(0) => return Err((done, io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.mid_line = buf[done + n - 1] != b'\n';
                    done += n;
                    self.size += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err((done, e)),
            }
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        std::fs::rename(&self.path, &self.old)?;
        self.size = 0;
        // The new file is opened by the next write (and retried until it can be).
        Ok(())
    }
}

/// The last `n` lines of the app's log (across the rotation), or all of it.
pub fn tail(dir: &Path, app: &str, n: Option<usize>) -> io::Result<Vec<u8>> {
    let mut all = Vec::new();
    for p in [rotated(dir, app), current(dir, app)] {
        match File::open(&p) {
            Ok(mut f) => {
                f.read_to_end(&mut all)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let Some(n) = n else { return Ok(all) };
    // Skip a trailing newline so "last n lines" means lines, not separators.
    let body = all.strip_suffix(b"\n").unwrap_or(&all);
    let mut count = 0;
    let start = body
        .iter()
        .rposition(|&b| {
            if b == b'\n' {
                count += 1;
            }
            count == n
        })
        .map(|i| i + 1)
        .unwrap_or(0);
    Ok(if n == 0 { Vec::new() } else { all[start..].to_vec() })
}

/// Follows the current log file: returns what was appended after `pos`,
/// starting over when the file was rotated (it got shorter, or was replaced).
pub struct Follower {
    path: PathBuf,
    pos: u64,
    ino: Option<u64>,
}

impl Follower {
    pub fn new(dir: &Path, app: &str) -> Follower {
        let path = current(dir, app);
        let meta = std::fs::metadata(&path).ok();
        Follower {
            pos: meta.as_ref().map(|m| m.len()).unwrap_or(0),
            ino: meta.map(|m| std::os::unix::fs::MetadataExt::ino(&m)),
            path,
        }
    }

    pub fn poll(&mut self) -> io::Result<Vec<u8>> {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let meta = f.metadata()?;
        let ino = std::os::unix::fs::MetadataExt::ino(&meta);
        if self.ino != Some(ino) || meta.len() < self.pos {
            self.ino = Some(ino);
            self.pos = 0;
        }
        f.seek(SeekFrom::Start(self.pos))?;
        let mut out = Vec::new();
        f.read_to_end(&mut out)?;
        self.pos += out.len() as u64;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_total_under_cap_and_newest_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RotatingLog::open(dir.path(), "web", 4096);
        for i in 0..2000 {
            log.write(format!("line {i}\n").as_bytes()).unwrap();
        }
        let a = std::fs::metadata(current(dir.path(), "web")).unwrap().len();
        let b = std::fs::metadata(rotated(dir.path(), "web")).unwrap().len();
        assert!(a + b <= 4096, "{a} + {b}");
        let last = tail(dir.path(), "web", Some(2)).unwrap();
        assert_eq!(String::from_utf8(last).unwrap(), "line 1998\nline 1999\n");
        assert!(tail(dir.path(), "web", Some(0)).unwrap().is_empty());
        let all = String::from_utf8(tail(dir.path(), "web", None).unwrap()).unwrap();
        assert!(all.ends_with("line 1999\n"));
    }

    #[test]
    fn follower_sees_appends_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RotatingLog::open(dir.path(), "a", 2048);
        log.write(b"before\n").unwrap();
        let mut f = Follower::new(dir.path(), "a");
        log.write(b"one\n").unwrap();
        assert_eq!(f.poll().unwrap(), b"one\n");
        log.write(&[b'x'; 1100]).unwrap(); // forces a rotation
        let got = f.poll().unwrap();
        assert!(!got.is_empty() && got.iter().all(|&c| c == b'x'), "{}", got.len());
    }

    #[test]
    fn output_that_cannot_be_written_is_counted_and_reported_later() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        let mut log = RotatingLog::open(&logs, "a", 1 << 20);
        log.write(b"one\n").unwrap();
        // The log dir disappears (as good as full): writes fail, nothing panics.
        std::fs::remove_dir_all(&logs).unwrap();
        log.file = None;
        assert!(log.write(b"lost-1\n").is_err());
        assert!(log.write(b"lost-2\n").is_err());
        assert_eq!(log.dropped(), 14);
        std::fs::create_dir_all(&logs).unwrap();
        log.write(b"back\n").unwrap();
        assert_eq!(log.dropped(), 0);
        let text = String::from_utf8(tail(&logs, "a", None).unwrap()).unwrap();
        assert_eq!(text, "[skiff: 14 bytes of output dropped: the log could not be written]\nback\n");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(current(&logs, "a")).unwrap().mode() & 0o777, 0o600);
    }
}
