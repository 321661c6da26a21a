//! Reading an image archive: an OCI image layout (a directory or a plain tar of one), or
//! the tar `docker save` writes (Docker 25 and later write an OCI layout with a
//! manifest.json beside it, read as OCI; older ones write manifest.json + repositories
//! with `<id>/layer.tar` files, read through an OCI index and manifests made up here from
//! manifest.json, with each layer hashed once). Nothing here is trusted: callers verify
//! every blob they read against its descriptor. A tar is indexed once (name -> offset,
//! size) and then read by seeking, so it is never unpacked to disk.

use super::oci::{self, Descriptor};
use super::ImageError;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

pub struct Source {
    files: Files,
    /// For an old `docker save` archive: the made-up index and the blobs by digest.
    docker: Option<Docker>,
}

enum Files {
    Dir(PathBuf),
    Tar { path: PathBuf, files: HashMap<PathBuf, (u64, u64)> },
}

struct Docker {
    index: oci::Index,
    blobs: HashMap<String, DockerBlob>,
}

enum DockerBlob {
    /// A manifest made up here.
    Bytes(Vec<u8>),
    /// A file of the archive (config JSON, layer tar).
    File(String),
}

/// One entry of a `docker save` manifest.json.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl Source {
    pub fn open(path: &Path) -> Result<Source, ImageError> {
        let meta = std::fs::metadata(path).map_err(|e| ImageError::io(path, e))?;
        let files = if meta.is_dir() {
            Files::Dir(path.to_path_buf())
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
            Files::Tar { path: path.to_path_buf(), files }
        };
        let mut src = Source { files, docker: None };
        if !src.exists("oci-layout") && src.exists("manifest.json") {
            src.docker = Some(src.docker_index()?);
            return Ok(src);
        }
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
        if let Some(d) = &self.docker {
            return Ok(d.index.clone());
        }
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
        if let Some(d) = &self.docker {
            return match d.blobs.get(&desc.digest) {
                Some(DockerBlob::Bytes(b)) => Ok(Box::new(b.as_slice())),
                Some(DockerBlob::File(rel)) => self.read(rel),
                None => Err(ImageError::Missing(desc.digest.clone())),
            };
        }
        let rel = format!("blobs/sha256/{}", desc.hex()?);
        self.read(&rel).map_err(|e| match e {
            ImageError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                ImageError::Missing(desc.digest.clone())
            }
            e => e,
        })
    }

    fn path(&self) -> &Path {
        match &self.files {
            Files::Dir(p) | Files::Tar { path: p, .. } => p,
        }
    }

    fn exists(&self, rel: &str) -> bool {
        match &self.files {
            Files::Dir(dir) => dir.join(rel).is_file(),
            Files::Tar { files, .. } => files.contains_key(&normal(Path::new(rel))),
        }
    }

    /// Makes up an OCI index and manifests for an old `docker save` archive: one index
    /// entry per name in RepoTags (named by the `io.containerd.image.name` annotation),
    /// or one unnamed entry.
    fn docker_index(&self) -> Result<Docker, ImageError> {
        let what = format!("{}: manifest.json", self.path().display());
        let mut buf = Vec::new();
        self.read("manifest.json")?
            .take(oci::JSON_LIMIT)
            .read_to_end(&mut buf)
            .map_err(|e| ImageError::io(self.path(), e))?;
        let entries: Vec<DockerEntry> =
            serde_json::from_slice(&buf).map_err(|e| ImageError::Json { what: what.clone(), source: e })?;
        let mut blobs = HashMap::new();
        let mut manifests = Vec::new();
        for e in entries {
            let config = self.hash_file(&e.config, oci::CONFIG_OCI, &mut blobs)?;
            if config["size"].as_u64().is_none_or(|s| s > oci::JSON_LIMIT) {
                return Err(ImageError::Unsupported(format!("{what}: config {} is too large", e.config)));
            }
            let layers = e
                .layers
                .iter()
                .map(|l| self.hash_file(l, oci::LAYER_TAR, &mut blobs))
                .collect::<Result<Vec<_>, _>>()?;
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": oci::MANIFEST_OCI,
                "config": config,
                "layers": layers,
            });
            let bytes = serde_json::to_vec(&manifest)
                .map_err(|err| ImageError::Json { what: what.clone(), source: err })?;
            let digest = format!("sha256:{:x}", Sha256::digest(&bytes));
            let desc = |name: Option<&String>| Descriptor {
                media_type: oci::MANIFEST_OCI.to_string(),
                digest: digest.clone(),
                size: bytes.len() as u64,
                platform: None,
                annotations: name
                    .map(|n| BTreeMap::from([(oci::ANN_CONTAINERD_NAME.to_string(), n.clone())]))
                    .unwrap_or_default(),
            };
            match e.repo_tags.as_deref() {
                Some(tags) if !tags.is_empty() => manifests.extend(tags.iter().map(|t| desc(Some(t)))),
                _ => manifests.push(desc(None)),
            }
            blobs.insert(digest, DockerBlob::Bytes(bytes));
        }
        let index = oci::Index { schema_version: 2, media_type: Some(oci::INDEX_OCI.to_string()), manifests };
        Ok(Docker { index, blobs })
    }

    /// A descriptor for an archive file, hashed (gzip layers are told by their magic).
    fn hash_file(
        &self,
        rel: &str,
        media_type: &str,
        blobs: &mut HashMap<String, DockerBlob>,
    ) -> Result<serde_json::Value, ImageError> {
        let mut r = self.read(rel)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut size = 0u64;
        let mut magic = [0u8; 2];
        loop {
            let n = r.read(&mut buf).map_err(|e| ImageError::io(self.path().join(rel), e))?;
            if n == 0 {
                break;
            }
            if size == 0 && n >= 2 {
                magic.copy_from_slice(&buf[..2]);
            }
            hasher.update(&buf[..n]);
            size = size.saturating_add(n as u64);
        }
        let media_type = if media_type == oci::LAYER_TAR && magic == [0x1f, 0x8b] {
            oci::LAYER_TAR_GZIP
        } else {
            media_type
        };
        let digest = format!("sha256:{:x}", hasher.finalize());
        blobs.insert(digest.clone(), DockerBlob::File(rel.to_string()));
        Ok(serde_json::json!({"mediaType": media_type, "digest": digest, "size": size}))
    }

    fn read(&self, rel: &str) -> Result<Box<dyn Read + '_>, ImageError> {
        match &self.files {
            Files::Dir(dir) => {
                let p = dir.join(normal(Path::new(rel)));
                Ok(Box::new(File::open(&p).map_err(|e| ImageError::io(&p, e))?))
            }
            Files::Tar { path, files } => {
                let not_found = || ImageError::io(path.join(rel), io::ErrorKind::NotFound.into());
                let &(offset, len) = files.get(&normal(Path::new(rel))).ok_or_else(not_found)?;
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
        files.insert(normal(&entry.path()?), (entry.raw_file_position(), entry.size()));
    }
    Ok(files)
}

/// `./a/b` -> `a/b`; `..`, `/` and `.` parts dropped (so a name never leaves the archive).
fn normal(p: &Path) -> PathBuf {
    p.components().filter(|c| matches!(c, Component::Normal(_))).collect()
}
