//! Manifest and index documents (OCI and Docker v2), as far as resolving needs them.

use crate::platform::Platform;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Media types.
pub mod media {
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// What a manifest request accepts, in order of preference.
    pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
        application/vnd.docker.distribution.manifest.list.v2+json, \
        application/vnd.oci.image.manifest.v1+json, \
        application/vnd.docker.distribution.manifest.v2+json";
}

/// A content descriptor: what a manifest says about a config or a layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    /// `sha256:<64 hex>`.
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawDoc {
    #[serde(default)]
    pub schema_version: Option<u32>,
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Option<Vec<IndexEntry>>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
}

#[derive(Deserialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub(crate) struct IndexEntry {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<RawPlatform>,
}

#[derive(Deserialize, Clone, Debug)]
pub(crate) struct RawPlatform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl RawPlatform {
    pub fn to_platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone(),
        }
    }
}

/// What a fetched document is.
#[derive(Debug)]
pub(crate) enum Doc {
    Index(Vec<IndexEntry>),
    Manifest { config: Descriptor, layers: Vec<Descriptor> },
}

/// The kind of document, from its own `mediaType` (or the Content-Type when it has
/// none), and its parts. `Err` says what is wrong.
pub(crate) fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<(String, Doc), String> {
    let raw: RawDoc =
        serde_json::from_slice(bytes).map_err(|e| format!("manifest is not valid JSON: {e}"))?;
    if raw.schema_version != Some(2) {
        return Err(format!("unsupported manifest schema version {:?} (only 2)", raw.schema_version));
    }
    let ct = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_string());
    let media_type = match (raw.media_type, ct) {
        (Some(m), _) => m,
        (None, Some(c)) if c != "application/json" && !c.is_empty() => c,
        (None, _) if raw.manifests.is_some() => media::OCI_INDEX.to_string(),
        (None, _) => media::OCI_MANIFEST.to_string(),
    };
    match media_type.as_str() {
        media::OCI_INDEX | media::DOCKER_LIST => {
            let entries = raw.manifests.ok_or("index has no manifests")?;
            for e in &entries {
                check_digest(&e.digest)?;
            }
            Ok((media_type, Doc::Index(entries)))
        }
        media::OCI_MANIFEST | media::DOCKER_MANIFEST => {
            let config = raw.config.ok_or("manifest has no config")?;
            let layers = raw.layers.ok_or("manifest has no layers")?;
            check_digest(&config.digest)?;
            for l in &layers {
                check_digest(&l.digest)?;
            }
            Ok((media_type, Doc::Manifest { config, layers }))
        }
        other => Err(format!("unsupported manifest media type {other:?}")),
    }
}

/// A digest this client can verify: `sha256:<64 lowercase hex>`.
pub(crate) fn check_digest(d: &str) -> Result<(), String> {
    let ok = d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(format!("unsupported digest {d:?} (only sha256:<64 hex>)"))
    }
}

/// The index entry that runs best on `platform`: the lowest rank, the first of equals.
pub(crate) fn pick<'a>(entries: &'a [IndexEntry], platform: &Platform) -> Option<&'a IndexEntry> {
    entries
        .iter()
        .filter(|e| matches!(e.media_type.as_str(), media::OCI_MANIFEST | media::DOCKER_MANIFEST))
        .filter_map(|e| Some((platform.rank(&e.platform.as_ref()?.to_platform())?, e)))
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, e)| e)
}

pub(crate) fn platforms(entries: &[IndexEntry]) -> String {
    let names: Vec<String> =
        entries.iter().filter_map(|e| e.platform.as_ref()).map(|p| p.to_platform().to_string()).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(platforms: &[&str]) -> Vec<IndexEntry> {
        platforms
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let pl = Platform::parse(p).unwrap();
                IndexEntry {
                    media_type: media::OCI_MANIFEST.into(),
                    digest: format!("sha256:{:064x}", i),
                    size: 1,
                    platform: Some(RawPlatform {
                        os: pl.os,
                        architecture: pl.architecture,
                        variant: pl.variant,
                    }),
                }
            })
            .collect()
    }

    #[test]
    fn picks_the_best_platform() {
        let idx = index(&["linux/amd64", "linux/arm/v6", "linux/arm/v7", "linux/arm64/v8"]);
        let d = |p: &str| pick(&idx, &Platform::parse(p).unwrap()).map(|e| e.digest.clone());
        assert_eq!(d("linux/arm/v7"), Some(format!("sha256:{:064x}", 2)));
        assert_eq!(d("linux/arm/v6"), Some(format!("sha256:{:064x}", 1)));
        assert_eq!(d("linux/arm64"), Some(format!("sha256:{:064x}", 3)));
        assert_eq!(d("linux/amd64"), Some(format!("sha256:{:064x}", 0)));
        assert_eq!(d("linux/riscv64"), None);
        let v6_only = index(&["linux/arm/v6"]);
        assert!(pick(&v6_only, &Platform::parse("linux/arm/v7").unwrap()).is_some());
        assert_eq!(platforms(&v6_only), "linux/arm/v6");
    }

    #[test]
    fn parses_media_types() {
        let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
            "config":{"mediaType":"x","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":3},
            "layers":[]}"#;
        let (mt, doc) = parse(m, None).unwrap();
        assert_eq!(mt, media::DOCKER_MANIFEST);
        assert!(matches!(doc, Doc::Manifest { .. }));
        let i = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            parse(i, Some("application/vnd.docker.distribution.manifest.list.v2+json")),
            Ok((_, Doc::Index(_)))
        ));
        assert!(parse(br#"{"schemaVersion":1}"#, None).is_err());
        let bad =
            br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha512:00","size":3},"layers":[]}"#;
        assert!(parse(bad, None).unwrap_err().contains("sha512"));
    }
}
