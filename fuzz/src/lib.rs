//! Harness shared by the fuzz targets that drive the agent's file readers
//! through their public entry points (no fuzz-only code in the agent).
//!
//! An OCI layout is only interesting once its digests match: the fuzzer cannot
//! find SHA-256 preimages, so the harness computes them. The fuzzed text may
//! say `@M@`, `@C@`, `@L@` (digest of the manifest, config, layer) and
//! `@MS@`, `@CS@`, `@LS@` (their sizes); the harness substitutes the real
//! values and writes every blob under its real digest. So the fuzzer reaches
//! the index, manifest and config parsers and the layer unpacker.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// A scratch directory for one input, emptied before and after use.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("skiff-fuzz-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(b)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn substitute(text: &[u8], pairs: &[(&str, String)]) -> Vec<u8> {
    let mut out = text.to_vec();
    for (from, to) in pairs {
        let mut next = Vec::with_capacity(out.len());
        let mut i = 0;
        while i < out.len() {
            if out[i..].starts_with(from.as_bytes()) {
                next.extend_from_slice(to.as_bytes());
                i += from.len();
            } else {
                next.push(out[i]);
                i += 1;
            }
        }
        out = next;
    }
    out
}

/// This host's architecture as OCI names it.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        other => other,
    }
}

pub const INDEX: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"@M@","size":@MS@,"annotations":{"org.opencontainers.image.ref.name":"fuzz:1"}}]}"#;
pub const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"@C@","size":@CS@},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"@L@","size":@LS@}]}"#;

pub fn config() -> String {
    format!(
        r#"{{"architecture":"{}","os":"linux","config":{{"Cmd":["sh"]}},"rootfs":{{"type":"layers","diff_ids":["@L@"]}}}}"#,
        host_arch()
    )
}

/// Writes an OCI layout (a directory, or a tar of one when `as_tar`) from
/// the four texts, digests and sizes substituted. Returns its path.
pub fn write_layout(dir: &Path, index: &[u8], manifest: &[u8], config: &[u8], layer: &[u8], as_tar: bool) -> PathBuf {
    let l = (digest(layer), layer.len().to_string());
    let config = substitute(config, &[("@LS@", l.1.clone()), ("@L@", l.0.clone())]);
    let c = (digest(&config), config.len().to_string());
    let manifest = substitute(
        manifest,
        &[("@CS@", c.1.clone()), ("@C@", c.0.clone()), ("@LS@", l.1.clone()), ("@L@", l.0.clone())],
    );
    let m = (digest(&manifest), manifest.len().to_string());
    let index = substitute(index, &[("@MS@", m.1.clone()), ("@M@", m.0.clone())]);
    let files: Vec<(String, &[u8])> = vec![
        ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#),
        ("index.json".into(), &index),
        (format!("blobs/sha256/{}", &m.0[7..]), &manifest),
        (format!("blobs/sha256/{}", &c.0[7..]), &config),
        (format!("blobs/sha256/{}", &l.0[7..]), layer),
    ];
    if as_tar {
        let path = dir.join("layout.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&path).expect("layout.tar"));
        for (name, bytes) in &files {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *bytes).expect("tar entry");
        }
        b.finish().expect("tar");
        path
    } else {
        let path = dir.join("layout");
        for (name, bytes) in &files {
            let p = path.join(name);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("layout dir");
            std::fs::write(p, bytes).expect("layout file");
        }
        path
    }
}

/// Loads the layout into a fresh store under `dir` and checks what a load
/// promises: whatever it reports is listed and resolves; nothing is written
/// outside the store (the scratch dir holds only the layout and the store).
pub fn load_and_check(dir: &Path, layout: &Path) {
    let store_dir = dir.join("store");
    let store = skiff_agent::image::ImageStore::open(&store_dir).expect("store");
    if let Ok(loaded) = store.load(layout, None) {
        let listed = store.list().expect("list after a load");
        for i in &loaded {
            assert!(listed.contains(i), "{i:?} loaded but not listed");
            let r = skiff_common::ImageRef::try_from(i.reference.as_str()).expect("listed reference parses");
            let resolved = store.resolve(&r).expect("loaded image resolves");
            assert!(resolved.rootfs.starts_with(&store_dir), "rootfs outside the store");
        }
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("scratch")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let layout_name = layout.file_name().expect("name").to_string_lossy().into_owned();
    let mut expected = vec![layout_name, "store".to_string()];
    expected.sort();
    assert_eq!(names, expected, "something was written beside the store");
}
