//! OCI and Docker schema2 formats: descriptors, indexes, manifests, configs, media types,
//! digests and platforms. Pure: no file or network I/O. Unknown JSON fields are ignored
//! (the formats allow extensions); every digest is checked to be `sha256:<64 lower hex>`
//! before it is ever used as a file name.

use super::ImageError;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};

pub const INDEX_OCI: &str = "application/vnd.oci.image.index.v1+json";
pub const INDEX_DOCKER: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MANIFEST_OCI: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MANIFEST_DOCKER: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const CONFIG_OCI: &str = "application/vnd.oci.image.config.v1+json";
const CONFIG_TYPES: &[&str] = &[CONFIG_OCI, "application/vnd.docker.container.image.v1+json"];
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const ANN_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd and nerdctl put the full reference here and only the tag in ref.name.
pub const ANN_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Index, manifest and config blobs are read into memory; anything bigger is refused.
pub const JSON_LIMIT: u64 = 4 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// The 64 hex digits, once the digest is known to be a well-formed sha256.
    pub fn hex(&self) -> Result<&str, ImageError> {
        digest_hex(&self.digest)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
pub struct Config {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub config: Option<RunConfig>,
    pub rootfs: RootFs,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<String>,
}

impl Index {
    pub fn check(&self, desc_type: Option<&str>, what: &str) -> Result<(), ImageError> {
        check_header(self.schema_version, self.media_type.as_deref(), desc_type, what)
    }
}

impl Manifest {
    pub fn check(&self, desc_type: &str, what: &str) -> Result<(), ImageError> {
        check_header(self.schema_version, self.media_type.as_deref(), Some(desc_type), what)?;
        if !CONFIG_TYPES.contains(&self.config.media_type.as_str()) {
            return Err(ImageError::Unsupported(format!(
                "config media type {:?} in {what}",
                self.config.media_type
            )));
        }
        for l in &self.layers {
            layer_compression(&l.media_type)?;
        }
        Ok(())
    }
}

/// A blob's own mediaType must agree with the descriptor that led to it, or a manifest
/// could be passed off as an index (a known confusion attack on content-addressed stores).
fn check_header(version: u32, own: Option<&str>, desc: Option<&str>, what: &str) -> Result<(), ImageError> {
    if version != 2 {
        return Err(ImageError::Unsupported(format!("schemaVersion {version} in {what}")));
    }
    if let (Some(own), Some(desc)) = (own, desc) {
        if own != desc {
            return Err(ImageError::Unsupported(format!(
                "{what} says mediaType {own:?} but its descriptor says {desc:?}"
            )));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub fn layer_compression(media_type: &str) -> Result<Compression, ImageError> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Ok(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Ok(Compression::Zstd),
        other => Err(ImageError::Unsupported(format!("layer media type {other:?}"))),
    }
}

pub fn is_index(media_type: &str) -> bool {
    media_type == INDEX_OCI || media_type == INDEX_DOCKER
}

pub fn is_manifest(media_type: &str) -> bool {
    media_type == MANIFEST_OCI || media_type == MANIFEST_DOCKER
}

/// `sha256:<hex>` -> `<hex>`. Other algorithms are refused rather than trusted unchecked.
pub fn digest_hex(digest: &str) -> Result<&str, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| ImageError::Unsupported(format!("digest {digest:?} (only sha256)")))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(ImageError::BadDigest(digest.to_string()));
    }
    Ok(hex)
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this binary runs on, in OCI (GOARCH) spelling.
    pub fn host() -> Platform {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            other => (other, None),
        };
        Platform {
            architecture: arch.to_string(),
            os: "linux".to_string(),
            variant: variant.map(str::to_string),
        }
    }

    /// Parses `os/arch[/variant]` as Docker's `--platform` spells it (`linux/arm64`,
    /// `linux/arm/v7`).
    pub fn parse(text: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = text.split('/').collect();
        let ok = |s: &&str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        match parts.as_slice() {
            [os, arch] | [os, arch, _] if ok(os) && ok(arch) && parts.get(2).is_none_or(ok) => Ok(Platform {
                architecture: arch.to_string(),
                os: os.to_string(),
                variant: parts.get(2).map(|v| v.to_string()),
            }),
            _ => Err(format!("'{text}' is not a platform: expected os/arch[/variant], e.g. linux/arm64")),
        }
    }

    /// Whether an image built for `other` runs here. A missing variant means the
    /// architecture's baseline (arm64 is v8; Docker reads a bare arm as v7).
    pub fn runs(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && self.variant_or_baseline() == other.variant_or_baseline()
    }

    fn variant_or_baseline(&self) -> Option<&str> {
        match (self.variant.as_deref(), self.architecture.as_str()) {
            (Some(v), _) => Some(v),
            (None, "arm64") => Some("v8"),
            (None, "arm") => Some("v7"),
            (None, _) => None,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Counts and hashes what passes through, so a blob is checked in the same pass that
/// copies or unpacks it.
pub struct Verifying<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
}

impl<R: Read> Verifying<R> {
    pub fn new(inner: R) -> Self {
        Verifying { inner, hasher: Sha256::new(), read: 0 }
    }

    /// Reads to the end (trailing bytes count too), then compares with `digest`, and
    /// with `size` when one is given.
    pub fn finish(mut self, digest: &str, size: Option<u64>) -> Result<(), ImageError> {
        let io_err = |e| ImageError::Blob { digest: digest.to_string(), source: e };
        io::copy(&mut self, &mut io::sink()).map_err(io_err)?;
        if let Some(size) = size {
            if self.read != size {
                return Err(ImageError::Mismatch {
                    digest: digest.to_string(),
                    reason: format!("size is {} bytes, descriptor says {size}", self.read),
                });
            }
        }
        let got = format!("sha256:{:x}", self.hasher.finalize());
        if got != digest {
            return Err(ImageError::Mismatch {
                digest: digest.to_string(),
                reason: format!("content hashes to {got}"),
            });
        }
        Ok(())
    }
}

impl<R: Read> Read for Verifying<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Reads a whole JSON blob (at most [`JSON_LIMIT`]), verifies it against `desc`, parses it.
pub fn read_json<T: serde::de::DeserializeOwned>(r: impl Read, desc: &Descriptor) -> Result<T, ImageError> {
    if desc.size > JSON_LIMIT {
        return Err(ImageError::Unsupported(format!(
            "{} is {} bytes, more than the {JSON_LIMIT} allowed for JSON",
            desc.digest, desc.size
        )));
    }
    let mut v = Verifying::new(r.take(desc.size + 1));
    let mut buf = Vec::with_capacity(desc.size as usize);
    v.read_to_end(&mut buf).map_err(|e| ImageError::Blob { digest: desc.digest.clone(), source: e })?;
    v.finish(&desc.digest, Some(desc.size))?;
    serde_json::from_slice(&buf).map_err(|e| ImageError::Json { what: desc.digest.clone(), source: e })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(arch: &str, variant: Option<&str>) -> Platform {
        Platform { architecture: arch.into(), os: "linux".into(), variant: variant.map(Into::into) }
    }

    #[test]
    fn platforms_match_with_baseline_variants() {
        let arm64 = p("arm64", Some("v8"));
        assert!(arm64.runs(&p("arm64", None)));
        assert!(arm64.runs(&p("arm64", Some("v8"))));
        assert!(p("arm64", None).runs(&arm64));
        assert!(!arm64.runs(&p("arm", Some("v7"))));
        let arm = p("arm", Some("v7"));
        assert!(arm.runs(&p("arm", None)));
        assert!(!arm.runs(&p("arm", Some("v6"))));
        assert!(!p("amd64", None).runs(&p("amd64", Some("v3"))));
        assert_eq!(arm.to_string(), "linux/arm/v7");
    }

    #[test]
    fn platforms_parse_as_docker_spells_them() {
        assert_eq!(Platform::parse("linux/arm64"), Ok(p("arm64", None)));
        assert_eq!(Platform::parse("linux/arm/v7"), Ok(p("arm", Some("v7"))));
        assert_eq!(Platform::parse("linux/arm/v7").unwrap().to_string(), "linux/arm/v7");
        for bad in ["", "arm64", "linux/", "/arm64", "linux/arm/v7/x", "linux/arm 64", "linux/arm/"] {
            assert!(Platform::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn digests_are_strict() {
        let ok = format!("sha256:{}", "0a".repeat(32));
        assert_eq!(digest_hex(&ok).unwrap().len(), 64);
        for bad in ["sha256:../../etc/passwd", "sha256:ABC", "md5:00", &format!("sha256:{}", "A".repeat(64))]
        {
            assert!(digest_hex(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn verifying_reader_checks_size_and_hash() {
        let d = format!("sha256:{:x}", Sha256::digest(b"abc"));
        Verifying::new(&b"abc"[..]).finish(&d, Some(3)).unwrap();
        assert!(Verifying::new(&b"abc"[..]).finish(&d, Some(4)).is_err());
        assert!(Verifying::new(&b"abd"[..]).finish(&d, Some(3)).is_err());
    }
}
