//! Per-app security settings and the network defaults, seen from inside real
//! containers: the user an app runs as, a read-only root, its capabilities
//! (CapEff/CapBnd of /proc/self/status), no raw or packet sockets on the host
//! network unless CAP_NET_RAW is added, loopback up with `network = "none"`,
//! /proc/interrupts masked, and setuid binaries working only with
//! `no_new_privileges = false`; exec probes run as the app's user. Device
//! rules: an app may mknod (CAP_MKNOD, as in Docker) but opens only the
//! standard devices and those it lists; the cgroup v2 device program itself,
//! attached to a cgroup of the unified hierarchy, decides the same and is gone
//! once detached.

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

/// Opens `$1` for writing (writes nothing) and prints `$2=opened`, `$2=eperm`
/// or the error.
const OPEN: &str = "try() { if out=$( (: >> \"$1\") 2>&1); then echo \"$2=opened\"; \
    else case \"$out\" in *'not permitted'*) echo \"$2=eperm\";; *) echo \"$2=failed: $out\";; esac; fi; }";

/// The device checks an app runs: mknod of kmsg (1:11, which root may open
/// for writing without any capability, so only the device rules refuse it)
/// and of mem (1:1), opening them, /dev/kmsg itself, and the standard devices.
const DEVICE_PROBE: &str = "mknod /tmp/kmsg c 1 11 && echo mknod=ok || echo mknod=failed; \
    mknod /tmp/mem c 1 1 && echo mknod-mem=ok || echo mknod-mem=failed; \
    try /tmp/kmsg made; try /tmp/mem mem; \
    if [ -e /dev/kmsg ]; then try /dev/kmsg dev-kmsg; else echo dev-kmsg=absent; fi; \
    try /dev/null null; echo zero=$(head -c 4 /dev/zero | wc -c); \
    echo urandom=$(head -c 4 /dev/urandom | wc -c)";

#[test]
fn unlisted_devices_cannot_be_opened_even_after_mknod() {
    let mut sb = Sandbox::new();
    sb.start_agent();
    let probe = script(&format!("{OPEN}; {DEVICE_PROBE}"));
    sb.apply(&format!(
        r#"
[[app]]
name = "unlisted"
image = "busybox:1"
{probe}
[[app]]
name = "listed"
image = "busybox:1"
devices = ["/dev/kmsg"]
{probe}
"#
    ));
    let unlisted = output(&sb, "unlisted");
    assert_eq!(value(&unlisted, "mknod="), "ok", "CAP_MKNOD is kept:\n{unlisted}");
    assert_eq!(value(&unlisted, "mknod-mem="), "ok", "{unlisted}");
    assert_eq!(value(&unlisted, "made="), "eperm", "an unlisted device made with mknod:\n{unlisted}");
    assert_eq!(value(&unlisted, "mem="), "eperm", "{unlisted}");
    assert_eq!(value(&unlisted, "dev-kmsg="), "absent", "{unlisted}");
    assert_eq!(value(&unlisted, "null="), "opened", "{unlisted}");
    assert_eq!(value(&unlisted, "zero="), "4", "{unlisted}");
    assert_eq!(value(&unlisted, "urandom="), "4", "{unlisted}");

    // Listed: the node skiff made and one made with mknod both open.
    let listed = output(&sb, "listed");
    assert_eq!(value(&listed, "dev-kmsg="), "opened", "{listed}");
    assert_eq!(value(&listed, "made="), "opened", "{listed}");
    assert_eq!(value(&listed, "mem="), "eperm", "{listed}");
    assert_eq!(value(&listed, "null="), "opened", "{listed}");
    // Both are gone with their cgroups (and, on cgroup v2, their programs).
    for app in ["unlisted", "listed"] {
        assert!(
            skiff_tests::agent::eventually(Duration::from_secs(10), || sb.app_cgroups(app).is_empty()),
            "{app} left cgroups behind: {:?}",
            sb.app_cgroups(app)
        );
    }
    sb.kill_agent();
}

/// The first cgroup2 mount: the unified hierarchy, also on a hybrid host.
fn cgroup2_mount() -> std::path::PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            (f.get(dash + 1) == Some(&"cgroup2")).then(|| std::path::PathBuf::from(f[4]))
        })
        .expect("a cgroup2 file system is mounted")
}

/// Removes the test's cgroup, whatever happened.
struct CgroupDir(std::path::PathBuf);

impl Drop for CgroupDir {
    fn drop(&mut self) {
        let _ = skiff_agent::runtime::devices::detach_all(&self.0);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The program the shim attaches on cgroup v2, tried on this host's unified
/// hierarchy: a shell moved into the cgroup opens /dev/kmsg only while the
/// program lists it, always /dev/null; detaching leaves no program behind
/// and lifts the rules.
#[test]
fn the_v2_device_program_decides_and_detaches() {
    use skiff_agent::runtime::devices::{self, Program};
    let cg = CgroupDir(cgroup2_mount().join(format!("skiff-devbpf-{:08x}", rand::random::<u32>())));
    std::fs::create_dir(&cg.0).unwrap();
    let opens = |what: &str| -> String {
        let cmd = format!(
            "echo $$ > {}/cgroup.procs || exit 1; {OPEN}; try /dev/kmsg kmsg; try /dev/null null; echo {what}",
            cg.0.display()
        );
        let out = std::process::Command::new("sh").args(["-c", &cmd]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(text.contains(what), "{text}");
        text
    };
    let deny_all = serde_json::json!({"allow": false, "access": "rwm"});
    let spec = |devices: serde_json::Value| serde_json::json!({"linux": {"resources": {"devices": devices}}});
    let listed = spec(
        serde_json::json!([deny_all, {"allow": true, "type": "c", "major": 1, "minor": 11, "access": "rwm"}]),
    );
    let unlisted = spec(serde_json::json!([deny_all]));

    let t0 = std::time::Instant::now();
    let prog = Program::build(&devices::rules_of_spec(&listed).unwrap());
    drop(devices::attach(&cg.0, &prog).unwrap());
    println!(
        "device program: {} instructions, built, loaded and attached in {:?}",
        prog.insns.len(),
        t0.elapsed()
    );
    assert_eq!(devices::attached(&cg.0).unwrap().len(), 1, "attached, and kept after its fd is closed");
    let out = opens("listed");
    assert_eq!(value(&out, "kmsg="), "opened", "{out}");
    assert_eq!(value(&out, "null="), "opened", "{out}");
    assert_eq!(devices::detach_all(&cg.0).unwrap(), 1);
    assert!(devices::attached(&cg.0).unwrap().is_empty());

    let prog = Program::build(&devices::rules_of_spec(&unlisted).unwrap());
    devices::attach(&cg.0, &prog).unwrap();
    let out = opens("unlisted");
    assert_eq!(value(&out, "kmsg="), "eperm", "{out}");
    assert_eq!(value(&out, "null="), "opened", "{out}");
    assert_eq!(devices::detach_all(&cg.0).unwrap(), 1);
    assert!(devices::attached(&cg.0).unwrap().is_empty(), "nothing left after detach");
    let out = opens("detached");
    assert_eq!(value(&out, "kmsg="), "opened", "no rules once detached:\n{out}");
}
