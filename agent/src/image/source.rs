//! Reading an OCI image layout, from a directory or from a plain tar of one. Nothing here
//! is trusted: callers verify every blob they read against its descriptor. A tar is
//! indexed once (name -> offset, size) and then read by seeking, so it is never unpacked
//! to disk.

use super::oci::{self, Descriptor};
use super::ImageError;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

pub enum Source {
    Dir(PathBuf),
    Tar { path: PathBuf, files: HashMap<PathBuf, (u64, u64)> },
}

impl Source {
    pub fn open(path: &Path) -> Result<Source, ImageError> {
        let meta = std::fs::metadata(path).map_err(|e| ImageError::io(path, e))?;
        let src = if meta.is_dir() {
            Source::Dir(path.to_path_buf())
        } else {
            let mut magic = [0u8; 2];
            let mut f = File::open(path).map_err(|e| ImageError::io(path, e))?;
            f.read_exact(&mut magic).map_err(|e| ImageError::io(path, e))?;
            if magic == [0x1f, 0x8b] {
                return Err(ImageError::Layout {
                    path: path.to_path_buf(),
                    reason: "a compressed tar; decompress it first".into(),
                });
            }
            let files = index_tar(path).map_err(|e| ImageError::io(path, e))?;
            Source::Tar { path: path.to_path_buf(), files }
        };
        let layout: serde_json::Value = {
            let r = src.read("oci-layout")?;
            serde_json::from_reader(r.take(4096)).map_err(|e| ImageError::Json {
                what: format!("{}: oci-layout", path.display()),
                source: e,
            })?
        };
        if layout["imageLayoutVersion"] != "1.0.0" {
            return Err(ImageError::Layout {
                path: path.to_path_buf(),
                reason: format!("unsupported oci-layout {layout}"),
            });
        }
        Ok(src)
    }

    /// The layout's top-level index. It has no descriptor, so only its size is bounded.
    pub fn index(&self) -> Result<oci::Index, ImageError> {
        let r = self.read("index.json")?;
        let what = format!("{}: index.json", self.path().display());
        let mut buf = Vec::new();
        r.take(oci::JSON_LIMIT).read_to_end(&mut buf).map_err(|e| ImageError::io(self.path(), e))?;
        let index: oci::Index =
            serde_json::from_slice(&buf).map_err(|e| ImageError::Json { what: what.clone(), source: e })?;
        index.check(None, &what)?;
        Ok(index)
    }

    /// The blob a descriptor names, unverified.
    pub fn blob(&self, desc: &Descriptor) -> Result<Box<dyn Read + '_>, ImageError> {
        let rel = format!("blobs/sha256/{}", desc.hex()?);
        self.read(&rel).map_err(|e| match e {
            ImageError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                ImageError::Missing(desc.digest.clone())
            }
            e => e,
        })
    }

    fn path(&self) -> &Path {
        match self {
            Source::Dir(p) | Source::Tar { path: p, .. } => p,
        }
    }

    fn read(&self, rel: &str) -> Result<Box<dyn Read + '_>, ImageError> {
        match self {
            Source::Dir(dir) => {
                let p = dir.join(rel);
                Ok(Box::new(File::open(&p).map_err(|e| ImageError::io(&p, e))?))
            }
            Source::Tar { path, files } => {
                let not_found = || ImageError::io(path.join(rel), io::ErrorKind::NotFound.into());
                let &(offset, len) = files.get(Path::new(rel)).ok_or_else(not_found)?;
                let mut f = File::open(path).map_err(|e| ImageError::io(path, e))?;
                f.seek(SeekFrom::Start(offset)).map_err(|e| ImageError::io(path, e))?;
                Ok(Box::new(f.take(len)))
            }
        }
    }
}

/// Regular files of a tar, by normalised name (`./blobs/x` and `blobs/x` are the same).
fn index_tar(path: &Path) -> io::Result<HashMap<PathBuf, (u64, u64)>> {
    let mut archive = tar::Archive::new(File::open(path)?);
    let mut files = HashMap::new();
    for entry in archive.entries_with_seek()? {
        let entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name: PathBuf =
            entry.path()?.components().filter(|c| matches!(c, Component::Normal(_))).collect();
        files.insert(name, (entry.raw_file_position(), entry.size()));
    }
    Ok(files)
}
