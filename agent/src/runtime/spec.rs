//! Builds the OCI runtime spec (`config.json`) for an app. Pure: every fact
//! about the host (cgroup version, device numbers, which host files exist) is
//! passed in, so the whole policy is testable without a container.
//!
//! Policy: Docker's default capabilities, changed by the app's `cap_add` and
//! `cap_drop` (less CAP_NET_RAW on the host network, see `capabilities`), Docker's
//! masked and read-only /proc paths, no new privileges unless the app turns
//! it off, the app's `user` and read-only root when it asks, a deny-all device cgroup rule followed by the devices the
//! app lists, its own pid/ipc/uts/mount namespaces (plus network for
//! `network = "none"`, and cgroup on cgroup v2). On cgroup v1 neither a cgroup
//! namespace nor a /sys/fs/cgroup mount is set up: libcontainer 0.7 fails to
//! prepare the rootfs on boards with `cpu,cpuacct` co-mounted otherwise.

use crate::image::ImageConfig;
use serde_json::{json, Value};
use skiff_common::{AppSpec, Capability, NetworkMode, Seccomp};

/// cgroup layout of the host, as far as the spec cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// A host device node, as `stat` found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostDevice {
    pub path: String,
    /// 'c' or 'b'.
    pub kind: char,
    pub major: i64,
    pub minor: i64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Everything the spec needs that is not in the app's own spec.
pub struct SpecInputs<'a> {
    pub app: &'a AppSpec,
    pub image: &'a ImageConfig,
    /// Absolute path of the prepared root filesystem.
    pub rootfs: &'a str,
    /// Absolute cgroup path, e.g. `/skiff/web`.
    pub cgroup_path: &'a str,
    pub cgroups: CgroupVersion,
    /// The app's devices, resolved on the host, in the app's order.
    pub devices: &'a [HostDevice],
    /// Host files bound read-only into host-network containers (resolv.conf, hosts).
    pub host_files: &'a [(String, String)],
    /// Host paths that exist only on some hosts and are masked like `MASKED`
    /// (the per-CPU `thermal_throttle` directories, see `thermal_paths`).
    pub host_masked: &'a [String],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("the image has no entrypoint or command and the app sets no `command`")]
    NoCommand,
    #[error("image user {0:?} is not numeric (uid[:gid]); set a numeric USER in the image")]
    User(String),
}

/// Docker's default capability set (moby `oci/caps/defaults.go`).
pub const DEFAULT_CAPS: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Docker's current default masked paths (moby `oci/defaults.go`).
const MASKED: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// The per-CPU thermal throttle counters Docker masks too (moby #49560: they
/// leak the host's thermal interrupts, a side channel). Their number depends on
/// the host, so the shim lists them: `cpus` are the names under
/// /sys/devices/system/cpu whose `thermal_throttle` directory exists.
pub fn thermal_paths<'a>(cpus: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = cpus
        .into_iter()
        .filter(|c| {
            c.strip_prefix("cpu").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|c| format!("/sys/devices/system/cpu/{c}/thermal_throttle"))
        .collect();
    out.sort();
    out
}

const READONLY: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// The CFS period used for CPU quotas (the kernel default, 100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

fn parse_user(user: Option<&str>) -> Result<(u32, u32), SpecError> {
    let user = match user {
        None | Some("") | Some("root") | Some("0") => return Ok((0, 0)),
        Some(u) => u,
    };
    let bad = || SpecError::User(user.to_string());
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid: u32 = u.parse().map_err(|_| bad())?;
    let gid: u32 = match g {
        Some(g) => g.parse().map_err(|_| bad())?,
        None => uid,
    };
    Ok((uid, gid))
}

/// The capabilities the app's process gets (bounding, permitted and
/// effective), in kernel order. Docker's rules: `cap_drop = ["ALL"]` starts
/// from nothing, otherwise from the default set less `cap_drop`; then
/// `cap_add`. One of skiff's own on top: a host-network app has no
/// CAP_NET_RAW unless it adds it (with it, an app could open raw and packet
/// sockets on the host's interfaces and capture the host's traffic).
/// CAP_MKNOD stays, as in Docker, on both cgroup versions: the device rules
/// (v1 `devices.*`, v2 the shim's device program) refuse opening any node
/// that is not listed, wherever it was made. `_cgroups` no longer changes the set.
pub fn capabilities(app: &AppSpec, _cgroups: CgroupVersion) -> Vec<Capability> {
    let sec = &app.security;
    let mut caps: Vec<Capability> = if sec.cap_drop_all {
        Vec::new()
    } else {
        DEFAULT_CAPS
            .iter()
            .copied()
            .filter(|c| !sec.cap_drop.contains(c))
            .filter(|c| !(*c == Capability::NetRaw && app.network == NetworkMode::Host))
            .collect()
    };
    caps.extend(sec.cap_add.iter().copied());
    caps.sort();
    caps.dedup();
    caps
}

/// The process arguments: the app's `command`, else the image's entrypoint + cmd.
pub fn args(app: &AppSpec, image: &ImageConfig) -> Result<Vec<String>, SpecError> {
    let args = match &app.command {
        Some(c) => c.clone(),
        None => image.entrypoint.iter().chain(image.cmd.iter()).cloned().collect(),
    };
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(args)
}

/// The environment: the image's, then the app's (overriding by name).
pub fn env(app: &AppSpec, image: &ImageConfig) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut set = |kv: String| {
        let key = kv.split('=').next().unwrap_or("").to_string();
        out.retain(|e| e.split('=').next() != Some(key.as_str()));
        out.push(kv);
    };
    for e in &image.env {
        set(e.clone());
    }
    for (k, v) in &app.env {
        set(format!("{k}={v}"));
    }
    if !out.iter().any(|e| e.starts_with("PATH=")) {
        out.insert(0, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    out
}

/// Whether the app runs under the default seccomp profile.
pub fn seccomp_confined(app: &AppSpec) -> bool {
    app.security.seccomp == Seccomp::Default
}

/// The capabilities a built spec gives its process (its bounding set, which
/// Docker's profile is resolved against too).
pub fn bounding_caps(spec: &Value) -> Vec<&str> {
    spec["process"]["capabilities"]["bounding"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c.as_str()).collect())
        .unwrap_or_default()
}

/// `app` with `default` as its memory limit when it sets none (the agent's
/// `--default-app-memory`).
pub fn with_default_memory(app: &AppSpec, default: Option<u64>) -> AppSpec {
    let mut app = app.clone();
    if app.resources.memory_bytes.is_none() {
        app.resources.memory_bytes = default;
    }
    app
}

pub fn build(i: &SpecInputs) -> Result<Value, SpecError> {
    let app = i.app;
    let (uid, gid) = match app.security.user {
        Some(u) => (u.uid, u.effective_gid()),
        None => parse_user(i.image.user.as_deref())?,
    };
    let cwd = app.workdir.clone().or_else(|| i.image.workdir.clone()).filter(|w| !w.is_empty());

    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    if i.cgroups == CgroupVersion::V2 {
        mounts.push(json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}));
    }
    if app.network == NetworkMode::Host {
        for (src, dst) in i.host_files {
            mounts.push(json!({"destination": dst, "type": "bind", "source": src, "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}));
        }
    }
    for m in &app.mounts {
        let mut options = vec!["rbind", "rprivate"];
        if m.readonly {
            options.push("ro");
        }
        mounts.push(json!({"destination": m.target, "type": "bind", "source": m.source, "options": options}));
    }

    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if app.network == NetworkMode::None {
        namespaces.push(json!({"type": "network"}));
    }
    if i.cgroups == CgroupVersion::V2 {
        namespaces.push(json!({"type": "cgroup"}));
    }

    // The deny-all rule must come first: without it v1 starts from `a *:* rwm`.
    let mut device_rules = vec![json!({"allow": false, "access": "rwm"})];
    let mut device_nodes = Vec::new();
    for d in i.devices {
        device_rules.push(json!({"allow": true, "type": d.kind.to_string(), "major": d.major, "minor": d.minor, "access": "rwm"}));
        device_nodes.push(json!({"path": d.path, "type": d.kind.to_string(), "major": d.major, "minor": d.minor, "fileMode": d.mode & 0o7777, "uid": d.uid, "gid": d.gid}));
    }

    let mut resources = json!({"devices": device_rules});
    if let Some(b) = app.resources.memory_bytes {
        resources["memory"] = json!({"limit": b});
    }
    if let Some(m) = app.resources.cpu_millis {
        resources["cpu"] = json!({"quota": u64::from(m) * CPU_PERIOD_US / 1000, "period": CPU_PERIOD_US});
    }
    if let Some(p) = app.resources.pids {
        resources["pids"] = json!({"limit": p});
    }

    let caps: Vec<&str> = capabilities(app, i.cgroups).into_iter().map(Capability::as_str).collect();
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": args(app, i.image)?,
            "env": env(app, i.image),
            "cwd": cwd.unwrap_or_else(|| "/".into()),
            "capabilities": {"bounding": &caps, "effective": &caps, "permitted": &caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 1024}],
            "noNewPrivileges": app.security.no_new_privileges
        },
        "root": {"path": i.rootfs, "readonly": app.security.read_only_rootfs},
        "hostname": app.name.as_str(),
        "mounts": mounts,
        "linux": {
            "cgroupsPath": i.cgroup_path,
            "resources": resources,
            "namespaces": namespaces,
            "devices": device_nodes,
            "maskedPaths": MASKED.iter().copied().chain(i.host_masked.iter().map(String::as_str)).collect::<Vec<_>>(),
            "readonlyPaths": READONLY
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_common::toml_file;

    fn app(extra: &str) -> AppSpec {
        let text = format!("[[app]]\nname = \"web\"\nimage = \"busybox:1\"\n{extra}");
        toml_file::parse(&text).unwrap().apps.remove(0)
    }

    fn image() -> ImageConfig {
        ImageConfig {
            env: vec!["PATH=/bin".into(), "MODE=dev".into()],
            entrypoint: vec![],
            cmd: vec!["sh".into()],
            workdir: None,
            user: None,
        }
    }

    /// `key` of every object in the array `v`.
    fn field_of_each<'a>(v: &'a Value, key: &str) -> Vec<&'a str> {
        v.as_array().unwrap().iter().map(|o| o[key].as_str().unwrap()).collect()
    }

    fn field_of_each_str(v: &Value) -> Vec<&str> {
        v.as_array().unwrap().iter().map(|o| o.as_str().unwrap()).collect()
    }

    fn build_for(app: &AppSpec, cg: CgroupVersion, devices: &[HostDevice]) -> Value {
        build(&SpecInputs {
            app,
            image: &image(),
            rootfs: "/run/skiff/apps/web/1/rootfs",
            cgroup_path: "/skiff/web",
            cgroups: cg,
            devices,
            host_files: &[("/etc/resolv.conf".into(), "/etc/resolv.conf".into())],
            host_masked: &thermal_paths(["cpu1", "cpu0", "cpufreq"]),
        })
        .unwrap()
    }

    #[test]
    fn default_memory_only_for_apps_without_a_limit() {
        let none = app("command = [\"sh\"]\n");
        let own = app("command = [\"sh\"]\n[app.resources]\nmemory = \"32Mi\"\n");
        let s = build_for(&with_default_memory(&none, Some(256 << 20)), CgroupVersion::V2, &[]);
        assert_eq!(s["linux"]["resources"]["memory"]["limit"], 256 << 20);
        let s = build_for(&with_default_memory(&own, Some(256 << 20)), CgroupVersion::V2, &[]);
        assert_eq!(s["linux"]["resources"]["memory"]["limit"], 32 << 20);
        let s = build_for(&with_default_memory(&none, None), CgroupVersion::V2, &[]);
        assert!(s["linux"]["resources"].get("memory").is_none());
    }

    #[test]
    fn limits_devices_and_namespaces() {
        let a = app("command = [\"httpd\", \"-f\"]\nenv = { MODE = \"prod\" }\ndevices = [\"/dev/ttyUSB0\"]\n[app.resources]\ncpus = 0.5\nmemory = \"32Mi\"\npids = 64\n");
        let dev = HostDevice {
            path: "/dev/ttyUSB0".into(),
            kind: 'c',
            major: 188,
            minor: 0,
            mode: 0o20660,
            uid: 0,
            gid: 20,
        };
        let s = build_for(&a, CgroupVersion::V1, std::slice::from_ref(&dev));
        let r = &s["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], 32 << 20);
        assert_eq!(r["cpu"]["quota"], 50_000);
        assert_eq!(r["cpu"]["period"], 100_000);
        assert_eq!(r["pids"]["limit"], 64);
        assert_eq!(r["devices"][0], json!({"allow": false, "access": "rwm"}));
        assert_eq!(r["devices"][1]["major"], 188);
        assert_eq!(s["linux"]["devices"][0]["fileMode"], 0o660);
        assert_eq!(s["linux"]["cgroupsPath"], "/skiff/web");
        assert_eq!(s["process"]["args"], json!(["httpd", "-f"]));
        assert_eq!(s["process"]["env"], json!(["PATH=/bin", "MODE=prod"]));
        assert_eq!(s["process"]["noNewPrivileges"], true);
        let ns = field_of_each(&s["linux"]["namespaces"], "type");
        assert_eq!(ns, ["pid", "ipc", "uts", "mount"], "host network, no cgroup ns on v1");
        let dests = field_of_each(&s["mounts"], "destination");
        assert!(!dests.contains(&"/sys/fs/cgroup"), "no cgroup mount on v1");
        assert!(dests.contains(&"/etc/resolv.conf"), "host network gets resolv.conf");
        assert!(field_of_each_str(&s["process"]["capabilities"]["bounding"]).contains(&"CAP_MKNOD"));
    }

    #[test]
    fn v2_and_private_network() {
        let a = app("network = \"none\"\n");
        let s = build_for(&a, CgroupVersion::V2, &[]);
        let ns = field_of_each(&s["linux"]["namespaces"], "type");
        assert_eq!(ns, ["pid", "ipc", "uts", "mount", "network", "cgroup"]);
        let caps = field_of_each_str(&s["process"]["capabilities"]["bounding"]);
        assert!(caps.contains(&"CAP_MKNOD"), "mknod kept: the device program guards opening");
        assert!(caps.contains(&"CAP_CHOWN"));
        let dests = field_of_each(&s["mounts"], "destination");
        assert!(dests.contains(&"/sys/fs/cgroup"));
        assert!(!dests.contains(&"/etc/resolv.conf"));
        assert_eq!(s["process"]["args"], json!(["sh"]), "image cmd when no command");
        assert!(s["linux"]["resources"].get("memory").is_none());
    }

    #[test]
    fn mounts_and_users() {
        let a = app("mounts = [{ source = \"/srv\", target = \"/data\", readonly = true }]\n");
        let s = build_for(&a, CgroupVersion::V1, &[]);
        let m = s["mounts"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(
            m,
            json!({"destination": "/data", "type": "bind", "source": "/srv", "options": ["rbind", "rprivate", "ro"]})
        );
        assert_eq!(parse_user(Some("1000:100")), Ok((1000, 100)));
        assert_eq!(parse_user(Some("65534")), Ok((65534, 65534)));
        assert!(parse_user(Some("nobody")).is_err());
        let mut img = image();
        img.cmd.clear();
        assert_eq!(args(&app(""), &img), Err(SpecError::NoCommand));
    }

    fn caps_of(extra: &str, cg: CgroupVersion) -> Vec<&'static str> {
        capabilities(&app(extra), cg).into_iter().map(Capability::as_str).collect()
    }

    #[test]
    fn capabilities_follow_docker_with_no_raw_sockets_on_the_host_network() {
        let host = caps_of("", CgroupVersion::V1);
        assert_eq!(host.len(), DEFAULT_CAPS.len() - 1);
        assert!(!host.contains(&"CAP_NET_RAW"), "{host:?}");
        assert!(host.contains(&"CAP_MKNOD") && host.contains(&"CAP_CHOWN"));
        let none = caps_of("network = \"none\"\n", CgroupVersion::V1);
        assert_eq!(none.len(), DEFAULT_CAPS.len(), "a private namespace keeps CAP_NET_RAW");
        let raw = caps_of("cap_add = [\"NET_RAW\"]\n", CgroupVersion::V1);
        assert!(raw.contains(&"CAP_NET_RAW"));
        // As in Docker, CAP_MKNOD on both cgroup versions (v2 enforces the
        // device rules with the shim's program).
        assert_eq!(caps_of("", CgroupVersion::V2), host);
        assert!(!caps_of("cap_drop = [\"MKNOD\"]\n", CgroupVersion::V2).contains(&"CAP_MKNOD"));
        let tweaked =
            caps_of("cap_add = [\"SYS_TIME\", \"KILL\"]\ncap_drop = [\"CHOWN\"]\n", CgroupVersion::V1);
        assert!(tweaked.contains(&"CAP_SYS_TIME") && !tweaked.contains(&"CAP_CHOWN"));
        assert_eq!(tweaked.len(), host.len(), "KILL was there already; no duplicates");
        assert_eq!(caps_of("cap_drop = [\"ALL\"]\ncap_add = [\"KILL\"]\n", CgroupVersion::V1), ["CAP_KILL"]);
        assert!(caps_of("cap_drop = [\"ALL\"]\n", CgroupVersion::V1).is_empty());
        // In the spec, the same set everywhere; kernel order.
        let s = build_for(&app("cap_add = [\"NET_ADMIN\"]\n"), CgroupVersion::V1, &[]);
        let c = &s["process"]["capabilities"];
        assert_eq!(c["bounding"], c["effective"]);
        assert_eq!(c["bounding"], c["permitted"]);
        assert_eq!(c["bounding"][0], "CAP_CHOWN");
        assert!(field_of_each_str(&c["bounding"]).contains(&"CAP_NET_ADMIN"));
    }

    #[test]
    fn user_root_and_privileges() {
        let s = build_for(&app(""), CgroupVersion::V1, &[]);
        assert_eq!(s["process"]["user"], json!({"uid": 0, "gid": 0}));
        assert_eq!(s["root"]["readonly"], false);
        assert_eq!(s["process"]["noNewPrivileges"], true);
        let masked = field_of_each_str(&s["linux"]["maskedPaths"]);
        assert!(masked.contains(&"/proc/interrupts"));
        assert!(masked.ends_with(&[
            "/sys/devices/system/cpu/cpu0/thermal_throttle",
            "/sys/devices/system/cpu/cpu1/thermal_throttle"
        ]));
        assert_eq!(masked.len(), MASKED.len() + 2, "cpufreq is not a CPU");
        let a = app("user = \"1000:100\"\nread_only_rootfs = true\nno_new_privileges = false\nsecurity.seccomp = \"unconfined\"\n");
        let s = build_for(&a, CgroupVersion::V1, &[]);
        assert_eq!(s["process"]["user"], json!({"uid": 1000, "gid": 100}));
        assert_eq!(s["root"]["readonly"], true);
        assert_eq!(s["process"]["noNewPrivileges"], false);
        // The app's user wins over the image's; a uid alone has the group of that number.
        let mut img = image();
        img.user = Some("5:5".into());
        let a = app("user = \"1000\"\n");
        let s = build(&SpecInputs {
            app: &a,
            image: &img,
            rootfs: "/r",
            cgroup_path: "/skiff/web",
            cgroups: CgroupVersion::V1,
            devices: &[],
            host_files: &[],
            host_masked: &[],
        })
        .unwrap();
        assert_eq!(s["process"]["user"], json!({"uid": 1000, "gid": 1000}));
    }
}
