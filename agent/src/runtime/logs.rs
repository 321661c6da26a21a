//! Per-app log files with a size cap: `<dir>/<app>.log` and one rotated
//! generation `<app>.log.1`. When the current file would pass half the cap it
//! becomes `.1` (replacing the older one), so the pair never holds more than
//! the cap. Written by the shim (the only writer), read by `skiff logs`.

use std::fs::{File, OpenOptions};
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
    file: File,
    size: u64,
    /// Size at which the current file is rotated: half the cap.
    limit: u64,
}

impl RotatingLog {
    pub fn open(dir: &Path, app: &str, cap: u64) -> io::Result<RotatingLog> {
        std::fs::create_dir_all(dir)?;
        let path = current(dir, app);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog { path, old: rotated(dir, app), file, size, limit: (cap / 2).max(1024) })
    }

    pub fn write(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if self.size >= self.limit {
                self.rotate()?;
            }
            let room = (self.limit - self.size) as usize;
            let n = buf.len().min(room);
            self.file.write_all(&buf[..n])?;
            self.size += n as u64;
            buf = &buf[n..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(&self.path, &self.old)?;
        self.file = OpenOptions::new().create(true).append(true).truncate(false).open(&self.path)?;
        self.size = 0;
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
        let mut log = RotatingLog::open(dir.path(), "web", 4096).unwrap();
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
        let mut log = RotatingLog::open(dir.path(), "a", 2048).unwrap();
        log.write(b"before\n").unwrap();
        let mut f = Follower::new(dir.path(), "a");
        log.write(b"one\n").unwrap();
        assert_eq!(f.poll().unwrap(), b"one\n");
        log.write(&[b'x'; 1100]).unwrap(); // forces a rotation
        let got = f.poll().unwrap();
        assert!(!got.is_empty() && got.iter().all(|&c| c == b'x'), "{}", got.len());
    }
}
