//! Store tests on small layouts built here, plus one on the real busybox image that
//! images/build.sh makes.

use super::oci::{self, Platform, ANN_REF_NAME, INDEX_OCI, MANIFEST_OCI};
use super::*;
use flate2::write::GzEncoder;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use skiff_common::ImageRef;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use tempfile::TempDir;

enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a str),
    Mode(&'a str, u32, u64),
    Sym(&'a str, &'a str),
    Hard(&'a str, &'a str),
    /// A regular file whose name is written raw, bypassing the tar crate's checks.
    Raw(&'a [u8]),
}

fn tar_bytes(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        let mut data: &[u8] = b"";
        match *e {
            E::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_path(p).unwrap();
                h.set_mode(0o755);
            }
            E::File(p, c) => {
                h.set_path(p).unwrap();
                data = c.as_bytes();
            }
            E::Mode(p, mode, uid) => {
                h.set_path(p).unwrap();
                h.set_mode(mode);
                h.set_uid(uid);
                h.set_gid(uid);
            }
            E::Sym(p, t) | E::Hard(p, t) => {
                let kind =
                    if matches!(e, E::Sym(..)) { tar::EntryType::Symlink } else { tar::EntryType::Link };
                h.set_entry_type(kind);
                h.set_path(p).unwrap();
                h.set_link_name(t).unwrap();
            }
            E::Raw(name) => {
                h.as_old_mut().name[..name.len()].copy_from_slice(name);
                data = b"evil";
            }
        }
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

/// An OCI layout under construction.
struct Layout {
    dir: std::path::PathBuf,
}

impl Layout {
    fn new(dir: std::path::PathBuf) -> Layout {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout { dir }
    }

    fn blob(&self, media_type: &str, bytes: &[u8]) -> Value {
        let d = sha(bytes);
        fs::write(self.blob_path(&d), bytes).unwrap();
        json!({"mediaType": media_type, "digest": d, "size": bytes.len()})
    }

    fn blob_path(&self, digest: &str) -> std::path::PathBuf {
        self.dir.join("blobs/sha256").join(&digest[7..])
    }

    /// A manifest descriptor (with platform) for an image of `arch` with these layers.
    fn image(&self, arch: &str, layers: &[&[E]]) -> Value {
        let tars: Vec<Vec<u8>> = layers.iter().map(|e| tar_bytes(e)).collect();
        self.image_of(arch, &tars, Packing::Gzip)
    }

    /// The same from layer tars, packed as asked.
    fn image_of(&self, arch: &str, tars: &[Vec<u8>], packing: Packing) -> Value {
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for tar in tars {
            diff_ids.push(sha(tar));
            descs.push(match packing {
                Packing::Gzip => {
                    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    gz.write_all(tar).unwrap();
                    self.blob("application/vnd.oci.image.layer.v1.tar+gzip", &gz.finish().unwrap())
                }
                Packing::ZstdFrames => {
                    // Two frames with a skippable frame between, as zstd:chunked writes them.
                    let (a, b) = tar.split_at(tar.len() / 2);
                    let level = ruzstd::encoding::CompressionLevel::Fastest;
                    let mut z = ruzstd::encoding::compress_to_vec(a, level);
                    z.extend_from_slice(&0x184D2A50u32.to_le_bytes());
                    z.extend_from_slice(&3u32.to_le_bytes());
                    z.extend_from_slice(b"xyz");
                    z.extend(ruzstd::encoding::compress_to_vec(b, level));
                    self.blob("application/vnd.oci.image.layer.v1.tar+zstd", &z)
                }
            });
        }
        let config = json!({
            "architecture": arch, "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/w", "User": ""},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = self.blob("application/vnd.oci.image.config.v1+json", config.to_string().as_bytes());
        let manifest =
            json!({"schemaVersion": 2, "mediaType": MANIFEST_OCI, "config": config, "layers": descs});
        let mut desc = self.blob(MANIFEST_OCI, manifest.to_string().as_bytes());
        desc["platform"] = json!({"architecture": arch, "os": "linux"});
        desc
    }

    fn index(&self, manifests: Vec<Value>) -> Value {
        let index = json!({"schemaVersion": 2, "mediaType": INDEX_OCI, "manifests": manifests});
        self.blob(INDEX_OCI, index.to_string().as_bytes())
    }

    fn finish(&self, top: Vec<Value>) -> &std::path::Path {
        let index = json!({"schemaVersion": 2, "mediaType": INDEX_OCI, "manifests": top});
        fs::write(self.dir.join("index.json"), index.to_string()).unwrap();
        &self.dir
    }
}

#[derive(Clone, Copy)]
enum Packing {
    Gzip,
    ZstdFrames,
}

fn tagged(mut desc: Value, tag: &str) -> Value {
    desc["annotations"] = json!({ ANN_REF_NAME: tag });
    desc
}

fn host() -> String {
    Platform::host().architecture
}

fn foreign() -> &'static str {
    if host() == "amd64" {
        "arm64"
    } else {
        "amd64"
    }
}

fn r(s: &str) -> ImageRef {
    ImageRef::try_from(s).unwrap()
}

/// A store in `t/store` and a layout in `t/<name>`.
fn setup(name: &str) -> (TempDir, ImageStore, Layout) {
    let t = TempDir::new().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let layout = Layout::new(t.path().join(name));
    (t, store, layout)
}

/// Everything under `dir` (files and directories) with its mtime.
fn snapshot(dir: &std::path::Path) -> BTreeMap<std::path::PathBuf, (i64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        out.insert(p.clone(), (m.mtime(), m.mtime_nsec()));
        if m.is_dir() {
            stack.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

fn store_is_empty(t: &TempDir) {
    let s = t.path().join("store");
    for sub in ["blobs/sha256", "rootfs", "tmp"] {
        assert_eq!(fs::read_dir(s.join(sub)).unwrap().count(), 0, "{sub} not empty");
    }
    assert!(!s.join("refs.json").exists());
}

#[test]
fn layers_apply_with_whiteouts_opaque_dirs_and_links() {
    let (_t, store, l) = setup("img");
    let lower: &[E] = &[
        E::Dir("a/"),
        E::File("a/keep", "k"),
        E::File("a/gone", "g"),
        E::Dir("o/"),
        E::File("o/old", "o"),
        E::Dir("o/sub/"),
        E::File("o/sub/deep", "d"),
        E::Sym("a/link", "keep"),
        E::Hard("a/hard", "a/keep"),
        E::Mode("suid", 0o4755, 1234),
        E::File("replaced", "file"),
    ];
    let upper: &[E] = &[
        E::File("a/.wh.gone", ""),
        E::Dir("o/"),
        E::Dir("o/sub/"),
        E::File("o/sub/fresh", "f"),
        E::File("o/.wh..wh..opq", ""),
        E::File("o/new", "n"),
        E::File("same", "same layer"),
        E::File(".wh.same", ""), // whiteouts never hide what their own layer adds
        E::Sym("replaced", "a/keep"),
        E::File("implicit/parent/file", "p"),
    ];
    let m = l.image(&host(), &[lower, upper]);
    let infos = store.load(l.finish(vec![tagged(m, "1")]), None).unwrap();
    assert_eq!(infos[0].reference, "img:1");
    let root = store.resolve(&r("img:1")).unwrap().rootfs;

    assert_eq!(fs::read_to_string(root.join("a/keep")).unwrap(), "k");
    assert!(!root.join("a/gone").exists());
    assert!(!root.join("o/old").exists());
    assert!(!root.join("o/sub/deep").exists());
    assert_eq!(fs::read_to_string(root.join("o/sub/fresh")).unwrap(), "f");
    assert_eq!(fs::read_to_string(root.join("o/new")).unwrap(), "n");
    assert_eq!(fs::read_to_string(root.join("same")).unwrap(), "same layer");
    assert_eq!(fs::read_link(root.join("a/link")).unwrap().to_str(), Some("keep"));
    assert_eq!(fs::read_link(root.join("replaced")).unwrap().to_str(), Some("a/keep"));
    let (keep, hard) =
        (fs::metadata(root.join("a/keep")).unwrap(), fs::metadata(root.join("a/hard")).unwrap());
    assert_eq!(keep.ino(), hard.ino());
    let suid = fs::metadata(root.join("suid")).unwrap();
    assert_eq!(suid.permissions().mode() & 0o7777, 0o4755);
    if nix::unistd::geteuid().is_root() {
        assert_eq!((suid.uid(), suid.gid()), (1234, 1234));
    }
    assert_eq!(fs::read_to_string(root.join("implicit/parent/file")).unwrap(), "p");
    assert!(!root.join("a/.wh.gone").exists() && !root.join("o/.wh..wh..opq").exists());
}

#[test]
fn corrupt_or_missized_blob_is_an_error_and_nothing_is_stored() {
    let (t, store, l) = setup("img");
    let m = l.image(&host(), &[&[E::File("f", "data")]]);
    let top = vec![tagged(m.clone(), "1")];
    let manifest: Value =
        serde_json::from_slice(&fs::read(l.blob_path(m["digest"].as_str().unwrap())).unwrap()).unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    let path = l.blob_path(&layer);
    let good = fs::read(&path).unwrap();

    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    fs::write(&path, &bad).unwrap();
    let err = store.load(l.finish(top.clone()), None).unwrap_err();
    assert!(matches!(&err, ImageError::Mismatch { digest, .. } if *digest == layer), "{err}");
    store_is_empty(&t);

    fs::write(&path, [good.as_slice(), b"extra"].concat()).unwrap();
    let err = store.load(l.finish(top), None).unwrap_err();
    assert!(err.to_string().contains("size"), "{err}");
    store_is_empty(&t);
}

#[test]
fn entries_escaping_the_rootfs_are_refused() {
    for name in [&b"../evil"[..], b"/tmp/skiff-evil-abs", b"a/../../evil"] {
        let (t, store, l) = setup("img");
        let m = l.image(&host(), &[&[E::Dir("a/"), E::Raw(name)]]);
        let err = store.load(l.finish(vec![tagged(m, "1")]), None).unwrap_err();
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
        assert!(!t.path().join("evil").exists() && !t.path().join("store/evil").exists());
        assert!(!std::path::Path::new("/tmp/skiff-evil-abs").exists());
        store_is_empty(&t);
    }
}

#[test]
fn symlinks_are_never_followed_out_of_the_rootfs() {
    let outside = TempDir::new().unwrap();
    let target = outside.path().to_str().unwrap();
    let cases: [&[&[E]]; 3] = [
        &[&[E::Sym("x", target), E::File("x/passwd", "pwned")]],
        &[&[E::Sym("x", target)], &[E::File("x/passwd", "pwned")]],
        &[&[E::Sym("x", target)], &[E::Hard("y", "x/passwd")]],
    ];
    for layers in cases {
        let (t, store, l) = setup("img");
        let m = l.image(&host(), layers);
        let err = store.load(l.finish(vec![tagged(m, "1")]), None).unwrap_err();
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
        store_is_empty(&t);
    }
}

#[test]
fn multi_arch_index_picks_the_host_platform() {
    let (_t, store, l) = setup("multi");
    let other = l.image(foreign(), &[&[E::File("arch", foreign())]]);
    let mine = l.image(&host(), &[&[E::File("arch", &host())]]);
    let index = l.index(vec![other, mine]);
    let infos = store.load(l.finish(vec![tagged(index, "1")]), None).unwrap();
    assert_eq!(infos[0].platform, format!("linux/{}", host()));
    let root = store.resolve(&r("multi:1")).unwrap().rootfs;
    assert_eq!(fs::read_to_string(root.join("arch")).unwrap(), host());
}

#[test]
fn missing_platform_is_an_error_that_lists_what_is_there() {
    let (t, store, l) = setup("multi");
    let a = l.image(foreign(), &[&[E::File("f", "x")]]);
    let b = l.image("riscv64", &[&[E::File("f", "x")]]);
    let index = l.index(vec![a, b]);
    let err = store.load(l.finish(vec![tagged(index, "1")]), None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ImageError::NoPlatform { .. }), "{msg}");
    assert!(msg.contains(&format!("linux/{}", foreign())) && msg.contains("linux/riscv64"), "{msg}");
    store_is_empty(&t);

    // A foreign single-platform manifest is caught by its config.
    let store =
        store.with_platform(Platform { architecture: "riscv64".into(), os: "linux".into(), variant: None });
    let only = l.image(foreign(), &[&[E::File("f", "x")]]);
    let err = store.load(l.finish(vec![tagged(only, "2")]), None).unwrap_err();
    assert!(matches!(err, ImageError::NoPlatform { .. }), "{err}");
}

#[test]
fn loading_twice_writes_nothing_new() {
    let (t, store, l) = setup("img");
    let m = l.image(&host(), &[&[E::File("f", "x")], &[E::File("g", "y")]]);
    let path = l.finish(vec![tagged(m, "1")]).to_path_buf();
    let first = store.load(&path, None).unwrap();
    let before = snapshot(&t.path().join("store"));
    std::thread::sleep(std::time::Duration::from_millis(20));
    let second = store.load(&path, None).unwrap();
    assert_eq!(first, second);
    assert_eq!(before, snapshot(&t.path().join("store")));
}

#[test]
fn resolve_by_tag_and_by_digest() {
    let (_t, store, l) = setup("img");
    let m = l.image(&host(), &[&[E::File("f", "x")]]);
    let digest = m["digest"].as_str().unwrap().to_string();
    store.load(l.finish(vec![tagged(m, "1")]), None).unwrap();
    let by_tag = store.resolve(&r("img:1")).unwrap();
    assert_eq!(by_tag.digest, digest);
    assert_eq!(by_tag.config.env, ["PATH=/bin"]);
    assert_eq!(by_tag.config.cmd, ["sh"]);
    assert!(by_tag.config.entrypoint.is_empty());
    assert_eq!(by_tag.config.workdir.as_deref(), Some("/w"));
    assert_eq!(by_tag.config.user, None);
    assert_eq!(store.resolve(&r(&format!("other@{digest}"))).unwrap(), by_tag);
    assert!(matches!(store.resolve(&r("img:2")), Err(ImageError::NotFound(_))));
    let absent = format!("img@sha256:{}", "0".repeat(64));
    assert!(matches!(store.resolve(&r(&absent)), Err(ImageError::NotFound(_))));
}

#[test]
fn remove_untags_and_frees_what_no_tag_uses() {
    let (t, store, l) = setup("img");
    let shared: &[E] = &[E::File("shared", "s")];
    let a = l.image(&host(), &[shared]);
    let b = l.image(&host(), &[shared, &[E::File("extra", "e")]]);
    store.load(l.finish(vec![tagged(a, "a"), tagged(b, "b")]), None).unwrap();
    let blobs = |t: &TempDir| fs::read_dir(t.path().join("store/blobs/sha256")).unwrap().count();
    assert_eq!(blobs(&t), 2 + 2 + 2); // 2 manifests, 2 configs, 2 layers (one shared)

    store.remove(&r("img:a")).unwrap();
    assert_eq!(blobs(&t), 1 + 1 + 2);
    assert_eq!(fs::read_dir(t.path().join("store/rootfs")).unwrap().count(), 1);
    assert!(matches!(store.resolve(&r("img:a")), Err(ImageError::NotFound(_))));
    assert!(store.resolve(&r("img:b")).unwrap().rootfs.join("shared").exists());
    assert!(matches!(store.remove(&r("img:a")), Err(ImageError::NotFound(_))));

    let b = store.resolve(&r("img:b")).unwrap().digest;
    store.remove(&r(&format!("img@{b}"))).unwrap();
    assert!(store.list().unwrap().is_empty());
    assert_eq!(blobs(&t), 0);
    assert_eq!(fs::read_dir(t.path().join("store/rootfs")).unwrap().count(), 0);
}

#[test]
fn a_moved_tag_leaves_the_old_image_reachable_by_digest() {
    let (_t, store, l) = setup("img");
    let old = l.image(&host(), &[&[E::File("v", "1")]]);
    let old_digest = old["digest"].as_str().unwrap().to_string();
    store.load(l.finish(vec![tagged(old.clone(), "1")]), None).unwrap();
    let new = l.image(&host(), &[&[E::File("v", "2")]]);
    store.load(l.finish(vec![tagged(new, "1")]), None).unwrap();
    let refs: Vec<String> = store.list().unwrap().into_iter().map(|i| i.reference).collect();
    assert_eq!(refs, ["img:1".to_string(), format!("img@{old_digest}")]);
    // Tagging an image kept by digest drops the digest entry.
    store.load(l.finish(vec![tagged(old, "0")]), None).unwrap();
    let refs: Vec<String> = store.list().unwrap().into_iter().map(|i| i.reference).collect();
    assert_eq!(refs, ["img:0", "img:1"]);
}

#[test]
fn tar_layouts_names_and_untagged_images() {
    let (t, store, l) = setup("lay");
    let m = l.image(&host(), &[&[E::File("f", "x")]]);
    let digest = m["digest"].as_str().unwrap().to_string();
    l.finish(vec![m]);
    let tar_path = t.path().join("thing.tar");
    let mut b = tar::Builder::new(fs::File::create(&tar_path).unwrap());
    b.append_dir_all(".", &l.dir).unwrap();
    b.finish().unwrap();
    drop(b);

    let untagged = store.load(&tar_path, None).unwrap();
    assert_eq!(untagged[0].reference, format!("thing@{digest}"));
    let named = store.load(&tar_path, Some(&r("other:7"))).unwrap();
    assert_eq!(named[0].reference, "other:7");
    assert_eq!(named[0].digest, digest);
    // The digest entry went once a tag named the image, and does not come back.
    assert_eq!(store.list().unwrap().len(), 1);
    store.load(&tar_path, None).unwrap();
    assert_eq!(store.list().unwrap().len(), 1);
    let err = store.load(&tar_path, Some(&r(&format!("x@{digest}")))).unwrap_err();
    assert!(matches!(err, ImageError::Name(_)), "{err}");
}

#[test]
fn mount_rootfs_overlays_without_touching_the_image() {
    let t = TempDir::new().unwrap();
    let image = t.path().join("image");
    fs::create_dir_all(image.join("etc")).unwrap();
    fs::write(image.join("etc/hostname"), "img").unwrap();
    let dir = t.path().join("c1");
    let merged = mount_rootfs(&image, &dir).unwrap();
    assert_eq!(merged, dir.join("rootfs"));
    assert_eq!(mount_rootfs(&image, &dir).unwrap(), merged); // idempotent
    let overlay = mount::is_mountpoint(&merged).unwrap();
    println!("rootfs is {}", if overlay { "an overlay" } else { "a copy" });
    assert_eq!(fs::read_to_string(merged.join("etc/hostname")).unwrap(), "img");
    fs::write(merged.join("etc/hostname"), "container").unwrap();
    fs::write(merged.join("new"), "n").unwrap();
    assert_eq!(fs::read_to_string(image.join("etc/hostname")).unwrap(), "img");
    assert!(!image.join("new").exists());
    unmount_rootfs(&dir).unwrap();
    assert!(!dir.exists());
    unmount_rootfs(&dir).unwrap();
    assert_eq!(fs::read_to_string(image.join("etc/hostname")).unwrap(), "img");
}

/// The image the demo and the end-to-end tests use; images/build.sh makes it.
#[test]
fn real_busybox_image_loads_for_the_host() {
    let images = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/out");
    // test.sh builds it before the tests run: a missing image is a failure, not a skip.
    assert!(
        images.join("busybox/index.json").exists(),
        "{} is missing: run images/build.sh (test.sh does)",
        images.join("busybox").display()
    );
    let t = TempDir::new().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let infos = store.load(&images.join("busybox"), None).unwrap();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].reference, "busybox:1");
    assert_eq!(infos[0].platform, format!("linux/{}", host()));
    let img = store.resolve(&r("busybox:1")).unwrap();
    assert_eq!(img.config.cmd, ["sh"]);
    assert_eq!(fs::read_link(img.rootfs.join("bin/sh")).unwrap().to_str(), Some("busybox"));
    let elf = fs::read(img.rootfs.join("bin/busybox")).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    let e_machine = u16::from_le_bytes([elf[18], elf[19]]);
    let want = match std::env::consts::ARCH {
        "x86_64" => 62,
        "aarch64" => 183,
        "arm" => 40,
        other => panic!("no ELF machine known for {other}"),
    };
    assert_eq!(e_machine, want);
    assert_eq!(fs::metadata(img.rootfs.join("tmp")).unwrap().permissions().mode() & 0o7777, 0o1777);

    // The other architecture, picked on purpose (as when preparing images for a board).
    let arm = Platform { architecture: foreign().into(), os: "linux".into(), variant: None };
    let other = ImageStore::open(&t.path().join("other")).unwrap().with_platform(arm);
    other.load(&images.join("busybox.tar"), None).unwrap();
    let elf = fs::read(other.resolve(&r("busybox:1")).unwrap().rootfs.join("bin/busybox")).unwrap();
    let want = if foreign() == "arm64" { 183 } else { 62 };
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), want);

    // The tar of the same layout is the same image: nothing new is written.
    let before = snapshot(&t.path().join("store"));
    let from_tar = store.load(&images.join("busybox.tar"), None).unwrap();
    assert_eq!(from_tar, infos);
    assert_eq!(before, snapshot(&t.path().join("store")));
}

fn blob_count(t: &TempDir, sub: &str) -> usize {
    fs::read_dir(t.path().join("store").join(sub)).unwrap().count()
}

/// What a registry pull leaves before the import: the manifest in memory, the config and
/// layers downloaded into partial/.
fn as_pulled(store: &ImageStore, l: &Layout, mdesc: &Value) -> (oci::Descriptor, Vec<u8>) {
    let desc: oci::Descriptor = serde_json::from_value(mdesc.clone()).unwrap();
    let bytes = fs::read(l.blob_path(&desc.digest)).unwrap();
    let manifest: Value = serde_json::from_slice(&bytes).unwrap();
    let mut blobs = vec![manifest["config"]["digest"].as_str().unwrap().to_string()];
    blobs.extend(
        manifest["layers"].as_array().unwrap().iter().map(|d| d["digest"].as_str().unwrap().to_string()),
    );
    for d in blobs {
        fs::copy(l.blob_path(&d), store.partial_path(&d).unwrap()).unwrap();
    }
    (desc, bytes)
}

#[test]
fn zstd_layers_with_several_frames_unpack() {
    let (_t, store, l) = setup("z");
    let big = "z".repeat(100_000);
    let tars = vec![tar_bytes(&[E::Dir("d/"), E::File("d/big", &big), E::File("d/small", "s")])];
    let m = l.image_of(&host(), &tars, Packing::ZstdFrames);
    store.load(l.finish(vec![tagged(m, "1")]), None).unwrap();
    let root = store.resolve(&r("z:1")).unwrap().rootfs;
    assert_eq!(fs::read_to_string(root.join("d/big")).unwrap(), big);
    assert_eq!(fs::read_to_string(root.join("d/small")).unwrap(), "s");
}

#[test]
fn a_pulled_image_moves_from_partial_into_blobs_and_is_named() {
    let (t, store, l) = setup("reg");
    let shared: &[E] = &[E::File("shared", "s")];
    let m = l.image(&host(), &[shared, &[E::File("own", "o")]]);
    let (desc, bytes) = as_pulled(&store, &l, &m);
    assert_eq!(blob_count(&t, "partial"), 3);
    let usage = store.disk_usage().unwrap();
    assert!(usage.partial > 0 && usage.blobs == 0, "{usage:?}");

    let info = store.import_pulled(&r("127.0.0.1:5000/reg:1"), None, &desc, &bytes).unwrap();
    assert_eq!(info.reference, "127.0.0.1:5000/reg:1");
    assert_eq!(info.digest, desc.digest);
    assert_eq!(blob_count(&t, "partial"), 0);
    assert_eq!(blob_count(&t, "blobs/sha256"), 4);
    let root = store.resolve(&r("127.0.0.1:5000/reg:1")).unwrap().rootfs;
    assert_eq!(fs::read_to_string(root.join("own")).unwrap(), "o");
    let check = store.check().unwrap();
    assert!(check.ok && check.unreferenced_blobs == 0 && check.images == 1, "{check:?}");

    // Pinned by the digest of a multi-arch index: that digest resolves, under any name.
    let index = format!("sha256:{}", "1".repeat(64));
    let pinned = r(&format!("127.0.0.1:5000/reg@{index}"));
    let again = store.import_pulled(&pinned, Some(&index), &desc, &bytes).unwrap();
    assert_eq!(again.digest, desc.digest);
    assert_eq!(store.resolve(&r(&format!("other@{index}"))).unwrap().digest, desc.digest);
    let refs: Value = serde_json::from_slice(&fs::read(t.path().join("store/refs.json")).unwrap()).unwrap();
    assert_eq!(refs["version"], 2);
    assert_eq!(refs["indexes"][&index], json!(desc.digest));
}

#[test]
fn refs_without_indexes_stay_version_1_and_version_1_files_read() {
    let (t, store, l) = setup("img");
    let m = l.image(&host(), &[&[E::File("f", "x")]]);
    store.load(l.finish(vec![tagged(m, "1")]), None).unwrap();
    let refs: Value = serde_json::from_slice(&fs::read(t.path().join("store/refs.json")).unwrap()).unwrap();
    assert_eq!(refs["version"], 1);
    assert!(refs.get("indexes").is_none());
    // A file from the previous release (fixture in its exact shape) reads.
    let digest = store.list().unwrap()[0].digest.clone();
    let old = format!(
        r#"{{"version":1,"refs":{{"img:1":"{digest}"}},"images":{{"{digest}":{{"platform":"linux/{}","size":1}}}}}}"#,
        host()
    );
    fs::write(t.path().join("store/refs.json"), old).unwrap();
    assert_eq!(store.list().unwrap()[0].reference, "img:1");
    fs::write(t.path().join("store/refs.json"), r#"{"version":3,"refs":{},"images":{}}"#).unwrap();
    let err = store.list().unwrap_err().to_string();
    assert!(err.contains("version 3 (this build reads 1 and 2)"), "{err}");
}

#[test]
fn a_corrupt_download_is_deleted_and_nothing_becomes_visible() {
    let (t, store, l) = setup("reg");
    let m = l.image(&host(), &[&[E::File("f", "data")]]);
    let (desc, bytes) = as_pulled(&store, &l, &m);
    let manifest: Value = serde_json::from_slice(&bytes).unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    let partial = store.partial_path(&layer).unwrap();
    let mut bad = fs::read(&partial).unwrap();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    fs::write(&partial, &bad).unwrap();
    let err = store.import_pulled(&r("reg:1"), None, &desc, &bytes).unwrap_err();
    assert!(matches!(&err, ImageError::Mismatch { digest, .. } if *digest == layer), "{err}");
    assert!(!partial.exists(), "a corrupt download is not resumed");
    assert!(!t.path().join("store/blobs/sha256").join(&layer[7..]).exists());
    assert!(store.list().unwrap().is_empty());
    assert_eq!(blob_count(&t, "rootfs"), 0);
    assert_eq!(blob_count(&t, "tmp"), 0);
    assert!(store.check().unwrap().ok);
    // A missing download is named.
    fs::remove_file(store.partial_path(manifest["config"]["digest"].as_str().unwrap()).unwrap()).ok();
    let err = store.import_pulled(&r("reg:1"), None, &desc, &bytes).unwrap_err();
    assert!(matches!(err, ImageError::Missing(_)), "{err}");
    // A manifest whose bytes do not match its digest is refused before anything is written.
    let err = store.import_pulled(&r("reg:1"), None, &desc, b"{}").unwrap_err();
    assert!(matches!(err, ImageError::Mismatch { .. }), "{err}");
}

#[test]
fn gc_keeps_named_images_and_shared_blobs_and_frees_the_rest() {
    let (t, store, l) = setup("img");
    let shared: &[E] = &[E::File("shared", &"s".repeat(5000))];
    let a = l.image(&host(), &[shared]);
    let b = l.image(&host(), &[shared, &[E::File("b", "b")]]);
    let c = l.image(&host(), &[&[E::File("c", &"c".repeat(9000))]]);
    store.load(l.finish(vec![tagged(a, "a"), tagged(b, "b"), tagged(c, "c")]), None).unwrap();
    let b_digest = store.resolve(&r("img:b")).unwrap().digest;
    // A download in progress for an image not yet stored stays; a finished one goes.
    let pending = format!("sha256:{}", "2".repeat(64));
    fs::write(store.partial_path(&pending).unwrap(), b"half").unwrap();
    let before = store.disk_usage().unwrap();

    let report = store.gc(&[r("img:a"), r(&format!("any@{b_digest}")), r("absent:1")]).unwrap();
    assert_eq!(report.removed, ["img:c"]);
    assert_eq!(report.kept, ["img:a", "img:b"]);
    assert!(report.freed >= 9000, "{report:?}");
    assert_eq!(report.usage.total, before.total - report.freed);
    assert!(store.resolve(&r("img:a")).unwrap().rootfs.join("shared").exists());
    assert!(store.resolve(&r("img:b")).is_ok());
    assert!(matches!(store.resolve(&r("img:c")), Err(ImageError::NotFound(_))));
    assert_eq!(blob_count(&t, "blobs/sha256"), 2 + 2 + 2);
    assert_eq!(blob_count(&t, "rootfs"), 2);
    assert!(store.partial_path(&pending).unwrap().exists());
    assert!(store.check().unwrap().ok);
    // Nothing to collect: refs.json is not rewritten.
    let before = snapshot(&t.path().join("store"));
    std::thread::sleep(std::time::Duration::from_millis(20));
    let again = store.gc(&[r("img:a"), r("img:b")]).unwrap();
    assert!(again.removed.is_empty() && again.freed == 0);
    assert_eq!(before, snapshot(&t.path().join("store")));
}

#[test]
fn abandoned_partial_downloads_can_be_dropped() {
    let (_t, store, _l) = setup("img");
    let (a, b) = (format!("sha256:{}", "4".repeat(64)), format!("sha256:{}", "5".repeat(64)));
    fs::write(store.partial_path(&a).unwrap(), vec![0u8; 100]).unwrap();
    fs::write(store.partial_path(&b).unwrap(), vec![0u8; 30]).unwrap();
    assert_eq!(store.drop_partials(&[b.as_str()]).unwrap(), 100);
    assert!(!store.partial_path(&a).unwrap().exists() && store.partial_path(&b).unwrap().exists());
    assert_eq!(store.disk_usage().unwrap().partial, 30);
}

#[test]
fn budget_counts_partial_downloads() {
    let (_t, store, _l) = setup("img");
    let store = store.with_budget(Some(1000));
    fs::write(store.partial_path(&format!("sha256:{}", "3".repeat(64))).unwrap(), vec![0u8; 600]).unwrap();
    store.check_budget("pull of x", 400).unwrap();
    let err = store.check_budget("pull of x", 401).unwrap_err();
    assert!(matches!(err, ImageError::Budget { used: 600, more: 401, budget: 1000, .. }), "{err}");
}

#[test]
fn check_reports_a_damaged_store() {
    let (t, store, l) = setup("img");
    let m = l.image(&host(), &[&[E::File("f", "x")]]);
    store.load(l.finish(vec![tagged(m, "1")]), None).unwrap();
    assert!(store.check().unwrap().ok);
    let blobs = t.path().join("store/blobs/sha256");
    let manifest: Value =
        serde_json::from_slice(&fs::read(blobs.join(&store.list().unwrap()[0].digest[7..])).unwrap())
            .unwrap();
    let layer = blobs.join(&manifest["layers"][0]["digest"].as_str().unwrap()[7..]);
    let mut bytes = fs::read(&layer).unwrap();
    bytes[0] ^= 1;
    fs::write(&layer, bytes).unwrap();
    let rep = store.check().unwrap();
    assert!(!rep.ok);
    assert_eq!(rep.problems.len(), 1, "{rep:?}");
    assert!(rep.problems[0].contains("fails verification"), "{rep:?}");
}

/// The store on a tiny tmpfs: unpacking runs out of space. The error says so, nothing
/// half-written is visible, and the store checks clean. Needs root (mount).
#[test]
fn enospc_during_unpack_is_clear_and_leaves_the_store_consistent() {
    assert!(nix::unistd::geteuid().is_root(), "this test mounts a tmpfs: run it as root (test.sh does)");
    let t = TempDir::new().unwrap();
    let mnt = t.path().join("small");
    fs::create_dir(&mnt).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k", "skiff-test", mnt.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let store = ImageStore::open(&mnt.join("store")).unwrap();
    let l = Layout::new(t.path().join("reg"));
    let zeros = "\0".repeat(2 << 20); // 2 MiB unpacked, a few KiB packed
    let small = l.image(&host(), &[&[E::File("f", "ok")]]);
    store.load(l.finish(vec![tagged(small, "small")]), None).unwrap();
    let m = l.image(&host(), &[&[E::File("zeros", &zeros)]]);
    let (desc, bytes) = as_pulled(&store, &l, &m);
    let err = store.import_pulled(&r("reg:big"), None, &desc, &bytes).unwrap_err();
    assert!(matches!(err, ImageError::NoSpace { .. }), "{err}");
    assert!(err.to_string().contains("no space left"), "{err}");
    let check = store.check().unwrap();
    assert!(check.ok, "{check:?}");
    assert_eq!(check.leftovers, 0);
    let refs: Vec<String> = store.list().unwrap().into_iter().map(|i| i.reference).collect();
    assert_eq!(refs, ["reg:small"]);
    assert_eq!(fs::read_dir(mnt.join("store/rootfs")).unwrap().count(), 1);
    // The layer's download stays for the retry once space is freed.
    let manifest: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(store.partial_path(manifest["layers"][0]["digest"].as_str().unwrap()).unwrap().is_file());
}

/// `docker save` before Docker 25: manifest.json + repositories, `<id>/layer.tar` files
/// (uncompressed), `<id>.json` configs; the names come from RepoTags.
#[test]
fn docker_save_archives_load_with_their_names() {
    let t = TempDir::new().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let tars = [tar_bytes(&[E::Dir("etc/"), E::File("etc/v", "1")]), tar_bytes(&[E::File("etc/v", "2")])];
    let config = json!({
        "architecture": host(), "os": "linux",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": tars.iter().map(|t| sha(t)).collect::<Vec<_>>()},
    })
    .to_string();
    let config_name = format!("{}.json", &sha(config.as_bytes())[7..]);
    let manifest = json!([{
        "Config": config_name,
        "RepoTags": ["docker.io/library/saved:1", "saved:latest"],
        "Layers": ["aaa/layer.tar", "bbb/layer.tar"],
    }])
    .to_string();
    let archive = t.path().join("saved.tar");
    let mut b = tar::Builder::new(fs::File::create(&archive).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    };
    add("aaa/layer.tar", &tars[0]);
    add("bbb/layer.tar", &tars[1]);
    add(&config_name, config.as_bytes());
    add("manifest.json", manifest.as_bytes());
    add("repositories", br#"{"saved":{"1":"aaa"}}"#);
    b.into_inner().unwrap();

    let loaded = store.load(&archive, None).unwrap();
    let refs: Vec<&str> = loaded.iter().map(|i| i.reference.as_str()).collect();
    assert_eq!(refs, ["saved:1", "saved:latest"]);
    assert_eq!(loaded[0].digest, loaded[1].digest);
    let img = store.resolve(&r("saved:1")).unwrap();
    assert_eq!(fs::read_to_string(img.rootfs.join("etc/v")).unwrap(), "2");
    assert_eq!(img.config.cmd, ["sh"]);
    assert!(store.check().unwrap().ok);
    // --name names the one image, whatever names the archive gives it.
    let named = store.load(&archive, Some(&r("other:1"))).unwrap();
    assert_eq!(named.len(), 1);
    assert_eq!((named[0].reference.as_str(), &named[0].digest), ("other:1", &loaded[0].digest));
}

/// Policies that need no registry never touch one: the client points at a closed port.
#[test]
fn pull_policies_use_the_store_first() {
    let (_t, store, l) = setup("img");
    let m = l.image(&host(), &[&[E::File("f", "x")]]);
    let digest = m["digest"].as_str().unwrap().to_string();
    store.load(l.finish(vec![m]), Some(&r("127.0.0.1:1/img:1"))).unwrap();
    let mut opts = skiff_registry::ClientOptions::default();
    opts.registries.set_insecure("127.0.0.1:1");
    opts.connect_timeout = std::time::Duration::from_millis(200);
    opts.retry.budget = std::time::Duration::ZERO;
    let client = skiff_registry::Client::new(opts);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let run = |reference: &str, policy| rt.block_on(pull(&store, &client, &r(reference), policy, &|_| {}));

    for policy in [PullPolicy::IfNotPresent, PullPolicy::Never] {
        let info = run("127.0.0.1:1/img:1", policy).unwrap();
        assert_eq!((info.reference.as_str(), info.digest.as_str()), ("127.0.0.1:1/img:1", digest.as_str()));
    }
    // By digest, under any name: the content is there.
    let info = run(&format!("127.0.0.1:1/other@{digest}"), PullPolicy::IfNotPresent).unwrap();
    assert_eq!(info.digest, digest);
    let err = run("127.0.0.1:1/img:2", PullPolicy::Never).unwrap_err();
    assert!(matches!(err, PullError::NeverPull(_)), "{err}");
    assert!(!err.is_transient());
    // Always asks the registry, which is not there: a transient error, the store untouched.
    let err = run("127.0.0.1:1/img:1", PullPolicy::Always).unwrap_err();
    assert!(matches!(err, PullError::Registry(_)) && err.is_transient(), "{err}");
    assert_eq!(store.list().unwrap().len(), 1);
}

/// The daemon runs pulls as tokio tasks: the future must be `Send`.
#[allow(dead_code)]
fn pull_future_is_send(store: &ImageStore, client: &skiff_registry::Client, r: &ImageRef) {
    fn send<T: Send>(_: T) {}
    send(pull(store, client, r, PullPolicy::Always, &|_| {}));
}

/// `docker save` from Docker 25 on: an OCI layout with manifest.json beside it, named by
/// the containerd annotation (full Docker Hub form, stored in the familiar one).
#[test]
fn docker_25_save_archives_load_as_oci_layouts() {
    let (_t, store, l) = setup("d25");
    let mut m = l.image(&host(), &[&[E::File("f", "x")]]);
    m["annotations"] = json!({
        oci::ANN_CONTAINERD_NAME: "docker.io/library/new:2",
        ANN_REF_NAME: "2",
    });
    fs::write(
        l.dir.join("manifest.json"),
        r#"[{"Config":"blobs/sha256/00","RepoTags":["new:2"],"Layers":[]}]"#,
    )
    .unwrap();
    let loaded = store.load(l.finish(vec![m]), None).unwrap();
    assert_eq!(loaded[0].reference, "new:2");
    assert!(store.resolve(&r("docker.io/library/new:2")).is_ok());
}
