//! Over-the-air rollout end to end: skiffctl resolves a tag to a digest and signs
//! the pinned reference; the device pulls it from a real registry over a capped
//! link while the old container keeps running, and switches only once the new
//! image is complete; a pull that cannot finish stops nothing and is reported.

use serde_json::Value;
use skiff_tests::agent::{wait_for, Sandbox};
use skiff_tests::fleet::Fleet;
use skiff_tests::registry::{busybox_layout, random_bytes, write_layout, Registry};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

const DEV: &str = "pi-ota";

/// The host's busybox image plus one layer holding `/version` (`text`) and
/// `/ballast` (`ballast` incompressible bytes), as an OCI layout tagged `tag`.
/// Returns the manifest digest.
fn busybox_variant(dir: &Path, tag: &str, text: &str, ballast: usize, seed: u64) -> String {
    let layout = busybox_layout();
    let blob = |d: &str| std::fs::read(layout.join("blobs/sha256").join(&d[7..])).unwrap();
    let json = |b: Vec<u8>| -> Value { serde_json::from_slice(&b).unwrap() };
    let top = json(std::fs::read(layout.join("index.json")).unwrap());
    let index = json(blob(top["manifests"][0]["digest"].as_str().unwrap()));
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no busybox test image for {other}"),
    };
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == arch)
        .expect("host platform in the busybox layout");
    let manifest = json(blob(entry["digest"].as_str().unwrap()));
    let mut layers = Vec::new();
    for l in manifest["layers"].as_array().unwrap() {
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&blob(l["digest"].as_str().unwrap())[..]).read_to_end(&mut tar).unwrap();
        layers.push(tar);
    }
    layers.push(tar_of(&[("version", text.as_bytes().to_vec()), ("ballast", random_bytes(ballast, seed))]));
    let (_, images) = write_layout(dir, tag, &[(&format!("linux/{arch}"), layers)]).unwrap();
    images[0].manifest_digest.clone()
}

/// A tar with regular files at the root.
fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let octal = |buf: &mut [u8], v: u64| {
            let s = format!("{v:0width$o}\0", width = buf.len() - 1);
            buf.copy_from_slice(s.as_bytes());
        };
        octal(&mut h[100..108], 0o644);
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], data.len() as u64);
        octal(&mut h[136..148], 0);
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| b as u64).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn app_toml(image: &str) -> String {
    format!(
        "[[app]]\nname = \"web\"\nimage = \"{image}\"\ncommand = [\"/bin/sh\", \"-c\", \"cat /version; exec sleep 3600\"]\nstop_grace = \"1s\"\n"
    )
}

fn registries_file(dir: &Path, host: &str) -> String {
    let f = dir.join("registries.toml");
    std::fs::write(&f, format!("[[registry]]\nhost = \"{host}\"\ninsecure = true\n")).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    f.display().to_string()
}

fn web(sb: &Sandbox) -> Value {
    sb.app("web")
}

#[test]
fn a_new_tag_is_pinned_pulled_behind_the_running_app_and_a_failed_pull_stops_nothing() {
    let start = std::time::Instant::now();
    let mut registry = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let v1 = busybox_variant(&work.path().join("v1"), "v1", "one", 256 << 10, 1);
    let v2 = busybox_variant(&work.path().join("v2"), "v2", "two", 1536 << 10, 2);
    registry.push(&work.path().join("v1"), "v1", "app:v1", &[]).unwrap();
    registry.push(&work.path().join("v2"), "v2", "app:v2", &[]).unwrap();
    eprintln!("registry with v1 and v2 after {:?}", start.elapsed());
    let host = registry.host();
    let regs = registries_file(work.path(), &host);

    let fleet = Fleet::new(DEV);
    eprintln!("broker after {:?}", start.elapsed());
    let mut sb = fleet.agent();
    let flags = ["--registries", &regs, "--pull-rate", "256KiB/s", "--pull-retry", "3s"];
    sb.agent_args.extend(flags.iter().map(|s| s.to_string()));
    let t0 = std::time::Instant::now();
    sb.start_agent();

    // v1: skiffctl pins the tag's digest into the signed state; the device pulls and runs it.
    let out = fleet.apply(work.path(), &app_toml(&format!("{host}/app:v1")), &["--registries", &regs]);
    assert!(out.status.success(), "apply v1: {}", String::from_utf8_lossy(&out.stderr));
    let first = sb.wait_app("web", Duration::from_secs(60), "running v1", |a| a["phase"] == "running");
    assert_eq!(first["image"], format!("{host}/app@{v1}"), "the signed state names the digest, not the tag");
    assert!(sb.logs("web").contains("one"));
    let old_pid = first["pid"].as_i64().unwrap();
    eprintln!("v1 running after {:?}", t0.elapsed());

    // v2: 1.5 MiB of new layer at 256 KiB/s. While it comes, v1 keeps running
    // (same pid) and the pull's progress is visible.
    let out = fleet.apply(work.path(), &app_toml(&format!("{host}/app:v2")), &["--registries", &regs]);
    assert!(out.status.success(), "apply v2: {}", String::from_utf8_lossy(&out.stderr));
    let during = wait_for(Duration::from_secs(30), "pull progress in ps", || {
        let ps = sb.ps();
        let pulls = ps["pulls"].as_array().cloned().unwrap_or_default();
        pulls
            .iter()
            .any(|p| p["done"].as_u64() > Some(0) && p["total"].as_u64() > p["done"].as_u64())
            .then_some(ps)
    });
    let w = during["apps"].as_array().unwrap().iter().find(|a| a["name"] == "web").unwrap().clone();
    assert_eq!((w["phase"].as_str(), w["pid"].as_i64()), (Some("running"), Some(old_pid)), "{during}");
    assert_eq!(during["pulls"][0]["image"], format!("{host}/app@{v2}"));
    let second = sb.wait_app("web", Duration::from_secs(60), "running v2", |a| {
        a["phase"] == "running" && a["image"] == format!("{host}/app@{v2}").as_str()
    });
    assert_ne!(second["pid"].as_i64(), Some(old_pid));
    assert!(sb.logs("web").contains("two"));
    eprintln!("v2 running after {:?}", t0.elapsed());
    // The shared busybox layer came once: v2 downloaded its own layer only.
    assert!(sb.ps()["pulls"].as_array().is_none_or(|p| p.is_empty()));

    // v3 while the registry is down: the pull fails, v2 runs on, the reason is reported.
    registry.stop();
    let running_pid = second["pid"].as_i64().unwrap();
    let v3 = format!("{host}/app@sha256:{}", "3".repeat(64));
    let out = fleet.apply(work.path(), &app_toml(&v3), &["--registries", &regs]);
    assert!(out.status.success(), "apply v3: {}", String::from_utf8_lossy(&out.stderr));
    let st = wait_for(Duration::from_secs(60), "the failed pull in the reported state", || {
        let s = fleet.status();
        let failed =
            s["pulls"].as_array()?.iter().any(|p| p["image"] == v3.as_str() && p["error"].is_string());
        failed.then_some(s)
    });
    eprintln!("v3 failure reported after {:?}", t0.elapsed());
    let reason = st["pulls"][0]["error"].as_str().unwrap().to_string();
    assert!(reason.contains(&host), "the reason names the registry: {reason}");
    let w = web(&sb);
    assert_eq!((w["phase"].as_str(), w["pid"].as_i64()), (Some("running"), Some(running_pid)));
    assert_eq!(w["image"], format!("{host}/app@{v2}"));
    sb.kill_agent();
    eprintln!("done after {:?}", start.elapsed());
}
