//! Per-app security settings and the network defaults, seen from inside real
//! containers: the user an app runs as, a read-only root, its capabilities
//! (CapEff/CapBnd of /proc/self/status), no raw or packet sockets on the host
//! network unless CAP_NET_RAW is added, loopback up with `network = "none"`,
//! /proc/interrupts masked, and setuid binaries working only with
//! `no_new_privileges = false`; exec probes run as the app's user.

use skiff_tests::agent::Sandbox;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

/// Each app prints what it sees, then `END`, and exits.
fn script(body: &str) -> String {
    format!("command = [\"sh\", \"-c\", '''{body}; echo END''']\nrestart = \"never\"\n")
}

/// The output of `app` once it has printed everything.
fn output(sb: &Sandbox, app: &str) -> String {
    sb.wait_app(app, Duration::from_secs(30), "exited", |a| a["phase"] == "exited");
    let logs = sb.logs(app);
    assert!(logs.contains("END"), "{app} did not finish its checks:\n{logs}\nagent log:\n{}", sb.agent_log());
    logs
}

/// The value after `key` (`CapEff:`, `lo-flags=`) on a line of `logs`.
fn value<'a>(logs: &'a str, key: &str) -> &'a str {
    logs.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in:\n{logs}"))
}

fn caps(logs: &str, key: &str) -> u64 {
    u64::from_str_radix(value(logs, key), 16).unwrap_or_else(|e| panic!("{key}: {e}:\n{logs}"))
}

const CHOWN: u64 = 1 << 0;
const KILL: u64 = 1 << 5;
const NET_ADMIN: u64 = 1 << 12;
const NET_RAW: u64 = 1 << 13;

/// Prints the capability sets, tries a raw ICMP socket (traceroute) and a
/// packet socket (arping), and writing to /.
const PROBE: &str = "grep -E '^Cap(Eff|Bnd):' /proc/self/status; \
    if out=$(traceroute -n -m 1 -q 1 -w 1 127.0.0.1 2>&1); then echo raw=opened; \
    else case \"$out\" in *'not permitted'*) echo raw=eperm;; *) echo \"raw=failed: $out\";; esac; fi; \
    out=$(arping -c 1 -w 1 -I lo 127.0.0.1 2>&1); \
    case \"$out\" in *'not permitted'*) echo packet=eperm;; *) echo packet=opened;; esac; \
    touch /written 2>/dev/null && echo root=writable || echo root=read-only";

#[test]
fn security_settings_and_network_defaults_hold_inside_containers() {
    let mut sb = Sandbox::new();
    // A setuid-root busybox for the apps that run as a user.
    let suid = sb.dir.path().join("suid");
    std::fs::create_dir(&suid).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o755)).unwrap();
    let image_busybox = std::fs::read(which_busybox()).unwrap();
    std::fs::write(suid.join("busybox"), image_busybox).unwrap();
    std::fs::set_permissions(suid.join("busybox"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    let suid_mount =
        format!("mounts = [{{ source = \"{}\", target = \"/suid\", readonly = true }}]\n", suid.display());
    // Run as user 1000 in a fresh network namespace (ping_group_range "1 0"
    // there: only a raw socket, so CAP_NET_RAW, lets ping work).
    let ping_as_user = script(
        "id; grep -E '^Cap(Eff|Bnd):' /proc/self/status; /suid/busybox ping -c 1 -W 2 127.0.0.1 >/dev/null 2>&1 && echo suid-ping=ok || echo suid-ping=failed",
    );
    sb.start_agent();
    sb.apply(&format!(
        r#"
[[app]]
name = "plain"
image = "busybox:1"
{plain}
[[app]]
name = "raw"
image = "busybox:1"
cap_add = ["NET_RAW"]
{probe}
[[app]]
name = "tweaked"
image = "busybox:1"
cap_add = ["net_admin"]
cap_drop = ["CAP_CHOWN"]
read_only_rootfs = true
{probe}
[[app]]
name = "minimal"
image = "busybox:1"
cap_drop = ["ALL"]
cap_add = ["KILL"]
{probe}
[[app]]
name = "isolated"
image = "busybox:1"
network = "none"
{isolated}
[[app]]
name = "user"
image = "busybox:1"
user = "1000:1000"
network = "none"
no_new_privileges = false
security.seccomp = "unconfined"
{suid_mount}{ping_as_user}
[[app]]
name = "user-probed"
image = "busybox:1"
user = "1000:1000"
command = ["sleep", "3600"]
[app.readiness]
exec = ["sh", "-c", "test $(id -u):$(id -g) = 1000:1000"]
period = "200ms"
[[app]]
name = "user-nnp"
image = "busybox:1"
user = "1000"
network = "none"
{suid_mount}{ping_as_user}
"#,
        plain = script(&format!("id; wc -c < /proc/interrupts | sed 's/^/interrupts-bytes=/'; {PROBE}")),
        probe = script(PROBE),
        isolated = script(
            "grep -E '^Cap(Eff|Bnd):' /proc/self/status; echo lo-flags=$(cat /sys/class/net/lo/flags); \
             ping -c 1 -W 2 127.0.0.1 >/dev/null 2>&1 && echo ping=ok || echo ping=failed"
        ),
    ));

    // The defaults on the host network: root, Docker's set less CAP_NET_RAW,
    // so neither a raw nor a packet socket; /proc/interrupts masked.
    let plain = output(&sb, "plain");
    assert!(plain.contains("uid=0(root) gid=0(root)"), "{plain}");
    let bnd = caps(&plain, "CapBnd:");
    assert_eq!(bnd & NET_RAW, 0, "a host-network app has no CAP_NET_RAW:\n{plain}");
    assert_ne!(bnd & CHOWN, 0, "{plain}");
    assert_eq!(caps(&plain, "CapEff:"), bnd, "{plain}");
    assert_eq!(value(&plain, "raw="), "eperm", "{plain}");
    assert_eq!(value(&plain, "packet="), "eperm", "{plain}");
    assert_eq!(value(&plain, "root="), "writable", "{plain}");
    let host_interrupts = std::fs::read("/proc/interrupts").unwrap();
    assert!(!host_interrupts.is_empty(), "the host's /proc/interrupts has content");
    assert_eq!(value(&plain, "interrupts-bytes="), "0", "/proc/interrupts is masked:\n{plain}");

    // cap_add = NET_RAW gives it back: the same probes open both sockets.
    let raw = output(&sb, "raw");
    assert_eq!(caps(&raw, "CapBnd:"), bnd | NET_RAW, "{raw}");
    assert_eq!(value(&raw, "raw="), "opened", "{raw}");
    assert_eq!(value(&raw, "packet="), "opened", "{raw}");

    // cap_add and cap_drop change exactly the named bits; the root is read-only.
    let tweaked = output(&sb, "tweaked");
    assert_eq!(caps(&tweaked, "CapBnd:"), (bnd | NET_ADMIN) & !CHOWN, "{tweaked}");
    assert_eq!(caps(&tweaked, "CapEff:"), (bnd | NET_ADMIN) & !CHOWN, "{tweaked}");
    assert_eq!(value(&tweaked, "root="), "read-only", "{tweaked}");
    assert_eq!(value(&tweaked, "raw="), "eperm", "{tweaked}");

    // cap_drop = ALL: only what is added.
    let minimal = output(&sb, "minimal");
    assert_eq!(caps(&minimal, "CapBnd:"), KILL, "{minimal}");
    assert_eq!(caps(&minimal, "CapEff:"), KILL, "{minimal}");

    // network = "none": loopback is up and answers ping (CAP_NET_RAW kept:
    // the namespace has nothing but loopback).
    let isolated = output(&sb, "isolated");
    let flags = u32::from_str_radix(value(&isolated, "lo-flags=").trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 1, 1, "lo is up (IFF_UP):\n{isolated}");
    assert_eq!(value(&isolated, "ping="), "ok", "{isolated}");
    assert_ne!(caps(&isolated, "CapBnd:") & NET_RAW, 0, "{isolated}");

    // user: the ids; a setuid binary works only with no_new_privileges off.
    let user = output(&sb, "user");
    assert!(user.contains("uid=1000 gid=1000"), "{user}");
    assert_eq!(caps(&user, "CapEff:"), 0, "a user starts with no effective capabilities:\n{user}");
    assert_eq!(caps(&user, "CapBnd:"), caps(&isolated, "CapBnd:"), "{user}");
    assert_eq!(value(&user, "suid-ping="), "ok", "setuid works with no_new_privileges = false:\n{user}");
    let nnp = output(&sb, "user-nnp");
    assert!(nnp.contains("uid=1000 gid=1000"), "a uid alone runs with the group of that number:\n{nnp}");
    assert_eq!(value(&nnp, "suid-ping="), "failed", "setuid grants nothing by default:\n{nnp}");
    // Exec probes run as the app's user too (libcontainer's default is root).
    sb.wait_app("user-probed", Duration::from_secs(20), "ready", |a| a["ready"] == "passing");
    sb.kill_agent();
}

/// A static busybox for this host (the test image's is the same package).
fn which_busybox() -> std::path::PathBuf {
    ["/usr/bin/busybox", "/bin/busybox"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
        .expect("busybox-static is installed (scripts/deps.sh test)")
}
