//! `skiff image pull` (the real binary) against Debian's docker-registry on 127.0.0.1,
//! through the fault proxy where bytes are counted: the store side of pulls. Multi-arch
//! picks the host, digest pins show in `image ls`, a SIGKILLed pull resumes from its
//! partial file, a tampered blob leaves nothing, and a full disk (tmpfs) leaves the store
//! consistent. (The protocol itself is tested in registry_pull.rs.)

use serde_json::Value;
use skiff_registry::Platform;
use skiff_tests::agent::skiff_bin;
use skiff_tests::registry::{random_bytes, write_layout, Faults, Proxy, Registry};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A layer tar holding `path` with `data`.
fn layer(path: &str, data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    b.append_data(&mut h, path, data).unwrap();
    b.into_inner().unwrap()
}

fn foreign() -> &'static str {
    if Platform::host().architecture == "amd64" {
        "linux/arm64"
    } else {
        "linux/amd64"
    }
}

struct Store {
    _dir: tempfile::TempDir,
    state: PathBuf,
}

impl Store {
    fn new() -> Store {
        let dir = tempfile::Builder::new().prefix("skiff-pull-").tempdir().unwrap();
        let state = dir.path().join("state");
        Store { _dir: dir, state }
    }

    fn at(state: PathBuf) -> Store {
        Store { _dir: tempfile::tempdir().unwrap(), state }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(skiff_bin());
        c.arg("--state-dir")
            .arg(&self.state)
            .args(args)
            .env("SKIFF_REGISTRIES", "/nonexistent/registries.toml");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).stdin(Stdio::null()).output().unwrap()
    }

    fn ok_json(&self, args: &[&str]) -> Value {
        let out = self.run(args);
        assert!(out.status.success(), "skiff {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("skiff {args:?}: {e}"))
    }

    fn images(&self) -> PathBuf {
        self.state.join("images")
    }

    fn count(&self, sub: &str) -> usize {
        std::fs::read_dir(self.images().join(sub)).map(|d| d.count()).unwrap_or(0)
    }

    fn check_ok(&self) -> Value {
        let report = self.ok_json(&["image", "check", "--json"]);
        assert_eq!(report["ok"], true, "{report}");
        report
    }
}

#[test]
fn pull_picks_the_host_platform_and_pins_show_in_ls() {
    let reg = Registry::start().unwrap();
    let src = tempfile::tempdir().unwrap();
    let host = Platform::host().to_string();
    let (top, images) = write_layout(
        src.path(),
        "1",
        &[
            (foreign(), vec![layer("arch", b"foreign")]),
            (&host, vec![layer("arch", host.as_bytes()), layer("etc/two", b"2")]),
        ],
    )
    .unwrap();
    reg.push(src.path(), "1", "app:1", &[]).unwrap();
    let s = Store::new();
    let name = format!("{}/app:1", reg.host());
    let info = s.ok_json(&["image", "pull", &name, "--insecure", "--json"]);
    assert_eq!(info["platform"], host.as_str());
    assert_eq!(info["reference"], name.as_str());
    let mine = images.iter().find(|i| i.platform == host).unwrap();
    assert_eq!(info["digest"], mine.manifest_digest.as_str());
    let rootfs = s.images().join("rootfs").join(&mine.manifest_digest[7..]);
    assert_eq!(std::fs::read_to_string(rootfs.join("arch")).unwrap(), host);
    assert_eq!(std::fs::read_to_string(rootfs.join("etc/two")).unwrap(), "2");
    assert_eq!(s.count("partial"), 0);
    assert_eq!(s.count("blobs/sha256"), 4, "manifest, config, 2 layers; nothing of the other platform");

    // Pinned by the index digest (what the controller signs): a second name, no download.
    let pinned = format!("{}/app@{top}", reg.host());
    let info = s.ok_json(&["image", "pull", &pinned, "--insecure", "--json"]);
    assert_eq!(info["reference"], pinned.as_str());
    assert_eq!(info["digest"], mine.manifest_digest.as_str());
    let ls = s.ok_json(&["image", "ls", "--json"]);
    let refs: Vec<&str> = ls.as_array().unwrap().iter().map(|i| i["reference"].as_str().unwrap()).collect();
    assert_eq!(refs, [name.as_str(), pinned.as_str()]);
    let report = s.check_ok();
    assert_eq!((report["images"].as_u64(), report["references"].as_u64()), (Some(1), Some(2)));
}

#[test]
fn a_sigkilled_pull_resumes_from_its_partial_file() {
    let reg = Registry::start().unwrap();
    let proxy = Proxy::start(reg.port).unwrap();
    let src = tempfile::tempdir().unwrap();
    let host = Platform::host().to_string();
    let big = random_bytes(6 << 20, 7);
    let (_, images) = write_layout(src.path(), "1", &[(&host, vec![layer("big", &big)])]).unwrap();
    reg.push(src.path(), "1", "big:1", &[]).unwrap();
    let layer_digest = &images[0].layers[0].0;
    let layer_size = images[0].layers[0].1.len() as u64;

    let s = Store::new();
    let name = format!("{}/big:1", proxy.host());
    let partial = s.images().join("partial").join(&layer_digest[7..]);
    let mut child = s
        .cmd(&["image", "pull", &name, "--insecure", "--pull-rate", "2MiB/s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) < (2 << 20) {
        assert!(Instant::now() < deadline, "the pull did not get 2 MiB into {}", partial.display());
        assert!(child.try_wait().unwrap().is_none(), "the pull ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(kept >= 2 << 20 && kept < layer_size, "partial file has {kept} of {layer_size} bytes");
    assert_eq!(s.count("rootfs"), 0);
    assert!(!s.images().join("blobs/sha256").join(&layer_digest[7..]).exists());
    let served_before = proxy.blob_bytes();

    let info = s.ok_json(&["image", "pull", &name, "--insecure", "--json"]);
    assert_eq!(info["digest"], images[0].manifest_digest.as_str());
    let served = proxy.blob_bytes() - served_before;
    // The rest of the layer (and the small config, if the kill came before it was stored).
    let rest = layer_size - kept;
    assert!(
        served >= rest && served <= rest + 4096,
        "second pull fetched {served} bytes; {rest} were missing"
    );
    assert_eq!(s.count("partial"), 0);
    let rootfs = s.images().join("rootfs").join(&images[0].manifest_digest[7..]);
    assert!(std::fs::read(rootfs.join("big")).unwrap() == big, "unpacked content differs");
    s.check_ok();
}

#[test]
fn a_tampered_blob_leaves_nothing_in_the_store() {
    let reg = Registry::start().unwrap();
    let proxy = Proxy::start(reg.port).unwrap();
    let src = tempfile::tempdir().unwrap();
    let host = Platform::host().to_string();
    let (_, images) =
        write_layout(src.path(), "1", &[(&host, vec![layer("f", &random_bytes(200_000, 3))])]).unwrap();
    reg.push(src.path(), "1", "t:1", &[]).unwrap();
    proxy.set_faults(Faults { flip_at: Some(100_000), ..Faults::default() });
    let s = Store::new();
    let out = s.run(&["image", "pull", &format!("{}/t:1", proxy.host()), "--insecure"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has digest sha256:") && err.contains("expected sha256:"), "{err}");
    for sub in ["rootfs", "tmp", "blobs/sha256"] {
        assert_eq!(s.count(sub), 0, "{sub}");
    }
    // The tampered download is gone (the verified config may wait in partial/).
    let layer = &images[0].layers[0].0;
    assert!(!s.images().join("partial").join(&layer[7..]).exists());
    assert_eq!(s.ok_json(&["image", "ls", "--json"]), Value::Array(vec![]));
    s.check_ok();
}

/// The store on a 1 MiB tmpfs: the download runs out of space. Clear error, no blob
/// visible, the store checks clean, and a pull into the same store with room works.
#[test]
fn a_full_disk_during_a_pull_is_clear_and_leaves_the_store_consistent() {
    assert!(nix::unistd::geteuid().is_root(), "this test mounts a tmpfs: run it as root");
    let reg = Registry::start().unwrap();
    let src = tempfile::tempdir().unwrap();
    let host = Platform::host().to_string();
    write_layout(src.path(), "1", &[(&host, vec![layer("big", &random_bytes(3 << 20, 5))])]).unwrap();
    reg.push(src.path(), "1", "big:1", &[]).unwrap();
    write_layout(src.path(), "small", &[(&host, vec![layer("small", b"s")])]).unwrap();
    reg.push(src.path(), "small", "small:1", &[]).unwrap();

    let mnt = tempfile::tempdir().unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "skiff-enospc"])
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(status.success());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _umount = Unmount(mnt.path().to_path_buf());
    let s = Store::at(mnt.path().join("state"));
    s.ok_json(&["image", "pull", &format!("{}/small:1", reg.host()), "--insecure", "--json"]);

    let out = s.run(&["image", "pull", &format!("{}/big:1", reg.host()), "--insecure"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no space left on the device of the image store"), "{err}");
    assert_eq!(s.count("rootfs"), 1);
    assert_eq!(s.count("tmp"), 0);
    let ls = s.ok_json(&["image", "ls", "--json"]);
    assert_eq!(ls.as_array().map(Vec::len), Some(1), "{ls}");
    let report = s.check_ok();
    assert_eq!(report["unreferenced_blobs"], 0, "{report}");
    assert!(Path::new(&mnt.path().join("state/images/refs.json")).is_file());
}
