//! Over-the-air rollout end to end: skiffctl resolves a tag to a digest and signs
//! the pinned reference; the device pulls it from a real registry over a capped
//! link while the old container keeps running, and switches only once the new
//! image is complete; a pull that cannot finish stops nothing and is reported.

use serde_json::Value;
use skiff_tests::agent::{wait_for, Sandbox};
use skiff_tests::fleet::Fleet;
use skiff_tests::registry::{busybox_variant, Proxy, ProxyAuth, Registry};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

const DEV: &str = "pi-ota";

/// A short rollout window: each generation is committed (the last good one)
/// a second after it runs.
fn app_toml(image: &str) -> String {
    format!(
        "[rollout]\nstable = \"1s\"\n\n[[app]]\nname = \"web\"\nimage = \"{image}\"\ncommand = [\"/bin/sh\", \"-c\", \"cat /version; exec sleep 3600\"]\nstop_grace = \"1s\"\n"
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
    let (v1, v1_layer) = busybox_variant(&work.path().join("v1"), "v1", "one", 256 << 10, 1);
    let (v2, v2_layer) = busybox_variant(&work.path().join("v2"), "v2", "two", 1536 << 10, 2);
    let (v3, v3_layer) = busybox_variant(&work.path().join("v3"), "v3", "three", 64 << 10, 3);
    for v in ["v1", "v2", "v3"] {
        registry.push(&work.path().join(v), v, &format!("app:{v}"), &[]).unwrap();
    }
    eprintln!("registry with v1 and v2 after {:?}", start.elapsed());
    // The device reaches the registry through a proxy that counts blob bytes.
    let proxy = Proxy::start(registry.port).unwrap();
    let host = proxy.host();
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
    let v2_size = 1536u64 << 10;
    let served_before = proxy.blob_bytes();
    let out = fleet.apply(work.path(), &app_toml(&format!("{host}/app:v2")), &["--registries", &regs]);
    assert!(out.status.success(), "apply v2: {}", String::from_utf8_lossy(&out.stderr));
    let during = wait_for(Duration::from_secs(30), "pull progress in ps", || {
        let ps = sb.ps();
        let pulls = ps["pulls"].as_array().cloned().unwrap_or_default();
        pulls
            .iter()
            .any(|p| p["done"].as_u64() > Some(256 << 10) && p["total"].as_u64() > p["done"].as_u64())
            .then_some(ps)
    });
    let w = during["apps"].as_array().unwrap().iter().find(|a| a["name"] == "web").unwrap().clone();
    assert_eq!((w["phase"].as_str(), w["pid"].as_i64()), (Some("running"), Some(old_pid)), "{during}");
    assert_eq!(during["pulls"][0]["image"], format!("{host}/app@{v2}"));
    // The agent dies mid-pull (SIGKILL); the next one adopts v1 and resumes the
    // layer from the bytes on disk.
    let done_at_kill = during["pulls"][0]["done"].as_u64().unwrap();
    sb.kill_agent();
    sb.start_agent();
    assert_eq!(web(&sb)["pid"].as_i64(), Some(old_pid), "v1 adopted, not restarted");
    let second = sb.wait_app("web", Duration::from_secs(60), "running v2", |a| {
        a["phase"] == "running" && a["image"] == format!("{host}/app@{v2}").as_str()
    });
    assert_ne!(second["pid"].as_i64(), Some(old_pid));
    assert!(sb.logs("web").contains("two"));
    // Bytes that reached the disk before the kill were not fetched again (what
    // was in flight in socket buffers may have been): at most the layer plus what
    // was missing at the kill, plus the config and some slack.
    let served = proxy.blob_bytes() - served_before;
    let bound = v2_size + (v2_size - done_at_kill) + (64 << 10);
    assert!(
        served <= bound,
        "served {served} bytes for v2, {done_at_kill} were on disk at the kill; bound {bound}"
    );
    eprintln!("v2 running after {:?}", t0.elapsed());
    // The shared busybox layer came once: v2 downloaded its own layer only.
    assert!(sb.ps()["pulls"].as_array().is_none_or(|p| p.is_empty()));

    // v3: once it runs, garbage collection keeps the images of this generation
    // and the one before (v3, v2) and frees what only v1 used. (v2 is first
    // committed: while a generation is on test, the last good one's images stay.)
    wait_for(Duration::from_secs(30), "v2 committed", || {
        let r = sb.ps()["rollout"].clone();
        (r["testing"].is_null() && r["committed"] == sb.ps()["generation"]).then_some(())
    });
    let out = fleet.apply(work.path(), &app_toml(&format!("{host}/app:v3")), &["--registries", &regs]);
    assert!(out.status.success(), "apply v3: {}", String::from_utf8_lossy(&out.stderr));
    let third = sb.wait_app("web", Duration::from_secs(60), "running v3", |a| {
        a["phase"] == "running" && a["image"] == format!("{host}/app@{v3}").as_str()
    });
    let blob = |d: &str| sb.state_dir().join("images/blobs/sha256").join(&d[7..]);
    wait_for(Duration::from_secs(20), "v1's own layer collected", || {
        (!blob(&v1_layer).exists()).then_some(())
    });
    for (what, d) in [("v2 (previous generation)", &v2_layer), ("v3 (current)", &v3_layer)] {
        assert!(blob(d).is_file(), "the layer of {what} was kept");
    }
    let ls = sb.skiff(&["image", "ls", "--json"]);
    let ls: Value = serde_json::from_slice(&ls.stdout).unwrap();
    let mut refs: Vec<&str> =
        ls.as_array().unwrap().iter().map(|i| i["reference"].as_str().unwrap()).collect();
    refs.sort();
    assert_eq!(refs, [format!("{host}/app@{v2}"), format!("{host}/app@{v3}")]);
    let check = sb.skiff(&["image", "check", "--json"]);
    assert!(check.status.success(), "store check: {}", String::from_utf8_lossy(&check.stdout));

    // v4 while the registry is down: the pull fails, v3 runs on, the reason is reported.
    registry.stop();
    let running_pid = third["pid"].as_i64().unwrap();
    let v4 = format!("{host}/app@sha256:{}", "4".repeat(64));
    let out = fleet.apply(work.path(), &app_toml(&v4), &["--registries", &regs]);
    assert!(out.status.success(), "apply v4: {}", String::from_utf8_lossy(&out.stderr));
    let st = wait_for(Duration::from_secs(60), "the failed pull in the reported state", || {
        let s = fleet.status();
        let failed =
            s["pulls"].as_array()?.iter().any(|p| p["image"] == v4.as_str() && p["error"].is_string());
        failed.then_some(s)
    });
    eprintln!("v4 failure reported after {:?}", t0.elapsed());
    let reason = st["pulls"][0]["error"].as_str().unwrap().to_string();
    assert!(reason.contains(&host), "the reason names the registry: {reason}");
    let w = web(&sb);
    assert_eq!((w["phase"].as_str(), w["pid"].as_i64()), (Some("running"), Some(running_pid)));
    assert_eq!(w["image"], format!("{host}/app@{v3}"));
    sb.kill_agent();
    eprintln!("done after {:?}", start.elapsed());
}

fn credentials_file(dir: &Path, name: &str, host: &str, pass: &str) -> String {
    let f = dir.join(name);
    let text = format!(
        "[[registry]]\nhost = \"{host}\"\ninsecure = true\nusername = \"fleet\"\npassword = \"{pass}\"\n"
    );
    std::fs::write(&f, text).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    f.display().to_string()
}

/// Every regular file under `dir` (symlinks not followed) that holds `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return hits };
    for e in entries.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            hits.extend(files_holding(&e.path(), needle));
        } else if ft.is_file() {
            if let Ok(bytes) = std::fs::read(e.path()) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(e.path().display().to_string());
                }
            }
        }
    }
    hits
}

#[test]
fn registry_credentials_work_and_appear_in_no_log_event_report_or_file() {
    let registry = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let (v1, _) = busybox_variant(&work.path().join("v1"), "v1", "one", 16 << 10, 4);
    registry.push(&work.path().join("v1"), "v1", "app:v1", &[]).unwrap();
    // The registry sits behind a bearer-token realm; its password buys the token.
    let (secret, token) = ("pa55-Zq8xR2", "tok-Vn4pK7");
    let proxy = Proxy::start(registry.port).unwrap();
    proxy.set_auth(ProxyAuth::Bearer { user: "fleet".into(), pass: secret.into(), token: token.into() });
    let host = proxy.host();
    let good = credentials_file(work.path(), "good.toml", &host, secret);
    // The device's first file has a wrong password (holding the right one, so a
    // leak of either is caught below).
    let bad = credentials_file(work.path(), "bad.toml", &host, &format!("x{secret}x"));

    let fleet = Fleet::new("pi-creds");
    assert!(fleet.events("ops").is_empty());
    let mut sb = fleet.agent();
    let base = sb.agent_args.clone();
    let flags = |regs: &str| -> Vec<String> {
        let mut a = base.clone();
        a.extend(["--registries", regs, "--pull-retry", "1s"].iter().map(|s| s.to_string()));
        a
    };
    sb.agent_args = flags(&bad);
    // Debug logging: what the agent writes at its most verbose must not hold secrets either.
    sb.agent_env.push(("SKIFF_LOG".into(), "debug".into()));
    sb.start_agent();
    let out = fleet.apply(work.path(), &app_toml(&format!("{host}/app:v1")), &["--registries", &good]);
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    let pinned = format!("{host}/app@{v1}");

    // Wrong password: the pull fails with a reason that names the registry.
    let st = wait_for(Duration::from_secs(60), "the refused pull in the reported state", || {
        let s = fleet.status();
        let p = s["pulls"].as_array()?.iter().find(|p| p["image"] == pinned.as_str())?.clone();
        p["error"].as_str().map(str::to_string)
    });
    assert!(st.contains(&host), "the reason names the registry: {st}");
    let ps = sb.ps();
    assert!(ps["pulls"][0]["error"].as_str().is_some_and(|e| e.contains(&host)), "{ps}");

    // The right password (the operator fixed the file, the agent restarted): it runs.
    sb.kill_agent();
    sb.agent_args = flags(&good);
    sb.start_agent();
    let app = sb.wait_app("web", Duration::from_secs(60), "running v1", |a| a["phase"] == "running");
    assert_eq!(app["image"], pinned.as_str());
    assert!(sb.logs("web").contains("one"));
    let reported = wait_for(Duration::from_secs(30), "the running app reported", || {
        let s = fleet.status();
        (s["apps"][0]["phase"] == "running").then_some(s)
    });

    // Nowhere: not in the agent's log, `ps`, the reported state, the events, nor
    // any file the agent wrote (state, run dir, logs, image store).
    let texts = [
        ("agent log", sb.agent_log()),
        ("ps", sb.ps().to_string()),
        ("reported state", reported.to_string()),
        ("events", serde_json::to_string(&fleet.events("ops")).unwrap()),
    ];
    assert!(texts[0].1.contains(&host), "the refused pull is in the log");
    for needle in [secret, token] {
        for (what, text) in &texts {
            assert!(!text.contains(needle), "{what} holds a secret: {text}");
        }
        assert_eq!(files_holding(sb.dir.path(), needle.as_bytes()), Vec::<String>::new());
    }
    sb.kill_agent();
}
