//! The default seccomp profile, seen from inside real containers: what it
//! refuses (namespaces, mount, keys, perf, AF_ALG and AF_VSOCK sockets),
//! clone3 answering ENOSYS, and what keeps working (shell, httpd, threads,
//! fork, ordinary sockets). The calls are made by `tests/probe/sysprobe.c`,
//! built static and bound into the container read-only.

use skiff_tests::agent::{repo, wait_for, Sandbox};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// A directory holding the static `sysprobe`, built once per test process
/// into cargo's scratch dir for tests (under target/, so nothing is left in /tmp).
fn probe_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sysprobe");
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("gcc")
            .args(["-static", "-O2", "-pthread", "-o"])
            .arg(dir.join("sysprobe"))
            .arg(repo().join("tests/probe/sysprobe.c"))
            .output()
            .expect("gcc (scripts/deps.sh test installs it)");
        assert!(out.status.success(), "building sysprobe: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::write(dir.join("index.html"), "hello from httpd\n").unwrap();
        dir
    })
}

/// Runs `script` in app `name` (with `extra` TOML lines) until it exits, and
/// returns its output.
fn run_app(sb: &mut Sandbox, name: &str, extra: &str, script: &str) -> String {
    sb.apply(&format!(
        r#"
[[app]]
name = "{name}"
image = "busybox:1"
command = ["sh", "-c", "{script}"]
restart = "never"
mounts = [{{ source = "{probe}", target = "/probe", readonly = true }}]
{extra}
"#,
        probe = probe_dir().display()
    ));
    let a = sb.wait_app(name, Duration::from_secs(60), "exited", |a| a["phase"] == "exited");
    let logs = wait_for(Duration::from_secs(10), "the probe's last line", || {
        let l = sb.logs(name);
        l.contains("script=done").then_some(l)
    });
    assert_eq!(a["last_exit"]["code"], 0, "{a}\n{logs}");
    logs
}

/// The value of `key=` in the output, which must be there exactly once.
fn value<'a>(logs: &'a str, key: &str) -> &'a str {
    let found: Vec<&str> =
        logs.lines().filter_map(|l| l.trim_end().strip_prefix(&format!("{key}="))).collect();
    assert_eq!(found.len(), 1, "{key} in:\n{logs}");
    found[0]
}

fn seccomp_mode(logs: &str) -> &str {
    let found: Vec<&str> =
        logs.lines().filter_map(|l| l.strip_prefix("Seccomp:")).map(|v| v.trim()).collect();
    assert_eq!(found.len(), 1, "Seccomp line in:\n{logs}");
    found[0]
}

/// Busybox's own view, next to the probe's.
const SCRIPT: &str = "grep Seccomp: /proc/self/status; /probe/sysprobe; \
    unshare -U true 2>/dev/null && echo bb_unshare_user=ok || echo bb_unshare_user=failed; \
    unshare -m true 2>/dev/null && echo bb_unshare_mount=ok || echo bb_unshare_mount=failed; \
    mount -t tmpfs none /mnt 2>/dev/null && echo bb_mount=ok || echo bb_mount=failed; \
    echo script=done";

#[test]
fn default_profile_refuses_what_docker_refuses() {
    let mut sb = Sandbox::new();
    sb.start_agent();
    let logs = run_app(&mut sb, "confined", "", SCRIPT);
    println!("{logs}");
    assert_eq!(seccomp_mode(&logs), "2", "filter mode");
    assert_eq!(value(&logs, "probe"), "done");
    for (key, want) in [
        ("unshare_user", "EPERM"),
        ("unshare_mount", "EPERM"),
        ("mount", "EPERM"),
        ("clone_userns", "EPERM"),
        ("clone3", "ENOSYS"),
        ("keyctl", "EPERM"),
        ("add_key", "EPERM"),
        ("perf_event_open", "EPERM"),
        ("socket_alg", "EPERM"),
        ("socket_vsock", "EPERM"),
        ("personality_exec", "EPERM"),
        ("socket_inet", "ok"),
        ("socket_unix", "ok"),
        ("personality_query", "ok"),
        ("thread", "ok"),
        ("fork", "ok"),
        ("bb_unshare_user", "failed"),
        ("bb_unshare_mount", "failed"),
        ("bb_mount", "failed"),
    ] {
        assert_eq!(value(&logs, key), want, "{key}\n{logs}");
    }
}

#[test]
fn httpd_serves_under_the_default_profile() {
    let mut sb = Sandbox::new();
    sb.start_agent();
    // Host network: a port of its own, so tests running side by side do not clash.
    let port = 20000 + rand::random::<u16>() % 20000;
    let script = format!(
        "httpd -p 127.0.0.1:{port} -h /probe; \
         for i in 1 2 3 4 5 6 7 8 9 10; do wget -q -O- http://127.0.0.1:{port}/index.html && break; sleep 0.2; done; \
         grep Seccomp: /proc/self/status; echo script=done"
    );
    let logs = run_app(&mut sb, "web", "", &script);
    assert_eq!(seccomp_mode(&logs), "2");
    assert!(logs.lines().any(|l| l == "hello from httpd"), "{logs}");
}

#[test]
fn unconfined_apps_run_without_a_filter() {
    let mut sb = Sandbox::new();
    sb.start_agent();
    let logs = run_app(&mut sb, "free", "[app.security]\nseccomp = \"unconfined\"", SCRIPT);
    println!("{logs}");
    assert_eq!(seccomp_mode(&logs), "0", "no filter");
    // The same calls, decided by the kernel alone: what the filter refused
    // in the test above now gets through (or fails for another reason).
    for (key, want) in [
        ("unshare_user", "ok"),
        ("clone_userns", "ok"),
        ("bb_unshare_user", "ok"),
        ("clone3", "EINVAL"),
        ("personality_exec", "ok"),
        ("thread", "ok"),
    ] {
        assert_eq!(value(&logs, key), want, "{key}\n{logs}");
    }
    for key in ["keyctl", "add_key", "socket_alg"] {
        assert_ne!(value(&logs, key), "EPERM", "{key}\n{logs}");
    }
}

#[test]
fn exec_probes_run_under_the_apps_filter() {
    let mut sb = Sandbox::new();
    sb.start_agent();
    // Each readiness probe passes only if the probe command itself sees the
    // filter mode its app runs under.
    sb.apply(
        r#"
[[app]]
name = "confined"
image = "busybox:1"
command = ["sleep", "600"]
[app.readiness]
exec = ["sh", "-c", "grep -q '^Seccomp:.2$' /proc/self/status && ! unshare -U true 2>/dev/null"]
period = "300ms"
failure_threshold = 1

[[app]]
name = "free"
image = "busybox:1"
command = ["sleep", "600"]
[app.security]
seccomp = "unconfined"
[app.readiness]
exec = ["sh", "-c", "grep -q '^Seccomp:.0$' /proc/self/status && unshare -U true"]
period = "300ms"
failure_threshold = 1
"#,
    );
    for app in ["confined", "free"] {
        let a = sb.wait_app(app, Duration::from_secs(30), "ready or not", |a| {
            a["ready"] == "passing" || a["ready"] == "failing"
        });
        assert_eq!(a["ready"], "passing", "{app}: {a}");
    }
}
