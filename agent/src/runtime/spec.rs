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
//!
//! The spec is an `oci_spec::runtime::Spec` made with its typed builders, the
//! same type libcontainer reads the bundle's `config.json` into: a misspelt
//! field, namespace or capability does not compile. `spec_fixtures/` holds
//! the `config.json` of representative apps; the golden test below compares
//! every build with them.

use crate::image::ImageConfig;
use libcontainer::oci_spec::runtime::{
    Capabilities, Capability as OciCapability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder,
    LinuxDeviceBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxMemoryBuilder, LinuxNamespace,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder,
    PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};
use libcontainer::oci_spec::OciSpecError;
use skiff_common::{AppName, AppSpec, Capability, NetworkMode, Seccomp};

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
    /// Character or block.
    pub kind: LinuxDeviceType,
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

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("the image has no entrypoint or command and the app sets no `command`")]
    NoCommand,
    #[error("image user {0:?} is not numeric (uid[:gid]); set a numeric USER in the image")]
    User(String),
    #[error("app {app}: {field} = {value} does not fit the OCI spec")]
    OutOfRange { app: AppName, field: &'static str, value: u64 },
    #[error("app {app}: the OCI spec's {part}: {source}")]
    Oci { app: AppName, part: &'static str, source: OciSpecError },
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
/// Docker's profile is resolved against too), in kernel order.
pub fn bounding_caps(spec: &Spec) -> Vec<&'static str> {
    let bounding =
        spec.process().as_ref().and_then(|p| p.capabilities().as_ref()).and_then(|c| c.bounding().as_ref());
    let Some(bounding) = bounding else { return Vec::new() };
    Capability::ALL
        .iter()
        .copied()
        .filter(|c| bounding.contains(&oci_capability(*c)))
        .map(Capability::as_str)
        .collect()
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

/// The OCI name of a capability. A match, not a string: a capability skiff
/// learns and the OCI types do not know fails to compile here.
fn oci_capability(c: Capability) -> OciCapability {
    use Capability as C;
    use OciCapability as O;
    match c {
        C::Chown => O::Chown,
        C::DacOverride => O::DacOverride,
        C::DacReadSearch => O::DacReadSearch,
        C::Fowner => O::Fowner,
        C::Fsetid => O::Fsetid,
        C::Kill => O::Kill,
        C::Setgid => O::Setgid,
        C::Setuid => O::Setuid,
        C::Setpcap => O::Setpcap,
        C::LinuxImmutable => O::LinuxImmutable,
        C::NetBindService => O::NetBindService,
        C::NetBroadcast => O::NetBroadcast,
        C::NetAdmin => O::NetAdmin,
        C::NetRaw => O::NetRaw,
        C::IpcLock => O::IpcLock,
        C::IpcOwner => O::IpcOwner,
        C::SysModule => O::SysModule,
        C::SysRawio => O::SysRawio,
        C::SysChroot => O::SysChroot,
        C::SysPtrace => O::SysPtrace,
        C::SysPacct => O::SysPacct,
        C::SysAdmin => O::SysAdmin,
        C::SysBoot => O::SysBoot,
        C::SysNice => O::SysNice,
        C::SysResource => O::SysResource,
        C::SysTime => O::SysTime,
        C::SysTtyConfig => O::SysTtyConfig,
        C::Mknod => O::Mknod,
        C::Lease => O::Lease,
        C::AuditWrite => O::AuditWrite,
        C::AuditControl => O::AuditControl,
        C::Setfcap => O::Setfcap,
        C::MacOverride => O::MacOverride,
        C::MacAdmin => O::MacAdmin,
        C::Syslog => O::Syslog,
        C::WakeAlarm => O::WakeAlarm,
        C::BlockSuspend => O::BlockSuspend,
        C::AuditRead => O::AuditRead,
        C::Perfmon => O::Perfmon,
        C::Bpf => O::Bpf,
        C::CheckpointRestore => O::CheckpointRestore,
    }
}

/// The mounts every container gets, in order: destination, type, source, options.
const BASE_MOUNTS: &[(&str, &str, &str, &[&str])] = &[
    ("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
    ("/dev", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"]),
    (
        "/dev/pts",
        "devpts",
        "devpts",
        &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
    ),
    ("/dev/shm", "tmpfs", "shm", &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
    ("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
    ("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", "ro"]),
];

/// cgroup v2 only: the container's own cgroup, read-only.
const CGROUP_MOUNT: (&str, &str, &str, &[&str]) =
    ("/sys/fs/cgroup", "cgroup", "cgroup", &["nosuid", "noexec", "nodev", "relatime", "ro"]);

/// Options of the host files bound into host-network containers.
const HOST_FILE_OPTIONS: &[&str] = &["rbind", "ro", "nosuid", "nodev", "noexec"];

fn mount(destination: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount, OciSpecError> {
    MountBuilder::default()
        .destination(destination)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
        .build()
}

fn namespace(typ: LinuxNamespaceType) -> Result<LinuxNamespace, OciSpecError> {
    LinuxNamespaceBuilder::default().typ(typ).build()
}

/// The app's spec. The oci-spec builders start every field they are not
/// given from the type's `Default`, which is runc's example container, not
/// nothing (capabilities and annotations among them): what skiff leaves out
/// is cleared explicitly, and the fixtures test pins the result.
pub fn build(i: &SpecInputs) -> Result<Spec, SpecError> {
    let app = i.app;
    let oci = |part: &'static str| move |source| SpecError::Oci { app: app.name.clone(), part, source };
    let (uid, gid) = match app.security.user {
        Some(u) => (u.uid, u.effective_gid()),
        None => parse_user(i.image.user.as_deref())?,
    };
    let cwd = app.workdir.clone().or_else(|| i.image.workdir.clone()).filter(|w| !w.is_empty());

    let mut mounts = Vec::new();
    for &(dst, typ, src, options) in BASE_MOUNTS {
        mounts.push(mount(dst, typ, src, options).map_err(oci("mounts"))?);
    }
    if i.cgroups == CgroupVersion::V2 {
        let (dst, typ, src, options) = CGROUP_MOUNT;
        mounts.push(mount(dst, typ, src, options).map_err(oci("mounts"))?);
    }
    if app.network == NetworkMode::Host {
        for (src, dst) in i.host_files {
            mounts.push(mount(dst, "bind", src, HOST_FILE_OPTIONS).map_err(oci("mounts"))?);
        }
    }
    for m in &app.mounts {
        let options: &[&str] = if m.readonly { &["rbind", "rprivate", "ro"] } else { &["rbind", "rprivate"] };
        mounts.push(mount(&m.target, "bind", &m.source, options).map_err(oci("mounts"))?);
    }

    let mut namespaces = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    if app.network == NetworkMode::None {
        namespaces.push(LinuxNamespaceType::Network);
    }
    if i.cgroups == CgroupVersion::V2 {
        namespaces.push(LinuxNamespaceType::Cgroup);
    }
    let namespaces =
        namespaces.into_iter().map(namespace).collect::<Result<Vec<_>, _>>().map_err(oci("namespaces"))?;

    // The deny-all rule must come first: without it v1 starts from `a *:* rwm`.
    let mut device_rules = vec![LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()
        .map_err(oci("devices"))?];
    let mut device_nodes = Vec::new();
    for d in i.devices {
        device_rules.push(
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(d.kind)
                .major(d.major)
                .minor(d.minor)
                .access("rwm")
                .build()
                .map_err(oci("devices"))?,
        );
        device_nodes.push(
            LinuxDeviceBuilder::default()
                .path(&d.path)
                .typ(d.kind)
                .major(d.major)
                .minor(d.minor)
                .file_mode(d.mode & 0o7777)
                .uid(d.uid)
                .gid(d.gid)
                .build()
                .map_err(oci("devices"))?,
        );
    }

    let out_of_range =
        |field: &'static str, value: u64| SpecError::OutOfRange { app: app.name.clone(), field, value };
    let mut resources = LinuxResourcesBuilder::default().devices(device_rules);
    if let Some(b) = app.resources.memory_bytes {
        let limit = i64::try_from(b).map_err(|_| out_of_range("memory", b))?;
        resources =
            resources.memory(LinuxMemoryBuilder::default().limit(limit).build().map_err(oci("memory"))?);
    }
    if let Some(m) = app.resources.cpu_millis {
        let quota = u64::from(m) * CPU_PERIOD_US / 1000;
        let quota = i64::try_from(quota).map_err(|_| out_of_range("cpus", quota))?;
        resources = resources
            .cpu(LinuxCpuBuilder::default().quota(quota).period(CPU_PERIOD_US).build().map_err(oci("cpu"))?);
    }
    if let Some(p) = app.resources.pids {
        resources =
            resources.pids(LinuxPidsBuilder::default().limit(i64::from(p)).build().map_err(oci("pids"))?);
    }
    let resources = resources.build().map_err(oci("resources"))?;

    let caps: Capabilities = capabilities(app, i.cgroups).into_iter().map(oci_capability).collect();
    let mut capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .build()
        .map_err(oci("capabilities"))?;
    // The builder's default grants inheritable and ambient capabilities.
    capabilities.set_inheritable(None).set_ambient(None);

    let process = ProcessBuilder::default()
        .terminal(false)
        .user(UserBuilder::default().uid(uid).gid(gid).build().map_err(oci("user"))?)
        .args(args(app, i.image)?)
        .env(env(app, i.image))
        .cwd(cwd.unwrap_or_else(|| "/".into()))
        .capabilities(capabilities)
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .hard(4096u64)
            .soft(1024u64)
            .build()
            .map_err(oci("rlimits"))?])
        .no_new_privileges(app.security.no_new_privileges)
        .build()
        .map_err(oci("process"))?;

    let linux = LinuxBuilder::default()
        .cgroups_path(i.cgroup_path)
        .resources(resources)
        .namespaces(namespaces)
        .devices(device_nodes)
        .masked_paths(
            MASKED.iter().map(|p| p.to_string()).chain(i.host_masked.iter().cloned()).collect::<Vec<_>>(),
        )
        .readonly_paths(READONLY.iter().map(|p| p.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(oci("linux"))?;

    let mut spec = SpecBuilder::default()
        .version("1.0.2")
        .process(process)
        .root(
            RootBuilder::default()
                .path(i.rootfs)
                .readonly(app.security.read_only_rootfs)
                .build()
                .map_err(oci("root"))?,
        )
        .hostname(app.name.as_str())
        .mounts(mounts)
        .linux(linux)
        .build()
        .map_err(oci("spec"))?;
    // The builder's default is an empty map; skiff sets no annotations.
    spec.set_annotations(None);
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use libcontainer::oci_spec::runtime::{Linux, LinuxResources, Process};
    use skiff_common::toml_file;
    use std::path::Path;

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

    fn process(s: &Spec) -> &Process {
        s.process().as_ref().unwrap()
    }

    fn linux(s: &Spec) -> &Linux {
        s.linux().as_ref().unwrap()
    }

    fn resources(s: &Spec) -> &LinuxResources {
        linux(s).resources().as_ref().unwrap()
    }

    fn namespaces(s: &Spec) -> Vec<LinuxNamespaceType> {
        linux(s).namespaces().as_ref().unwrap().iter().map(|n| n.typ()).collect()
    }

    fn destinations(s: &Spec) -> Vec<&Path> {
        s.mounts().as_ref().unwrap().iter().map(|m| m.destination().as_path()).collect()
    }

    fn build_for(app: &AppSpec, cg: CgroupVersion, devices: &[HostDevice]) -> Spec {
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
        let limit = |s: &Spec| resources(s).memory().map(|m| m.limit());
        let s = build_for(&with_default_memory(&none, Some(256 << 20)), CgroupVersion::V2, &[]);
        assert_eq!(limit(&s), Some(Some(256 << 20)));
        let s = build_for(&with_default_memory(&own, Some(256 << 20)), CgroupVersion::V2, &[]);
        assert_eq!(limit(&s), Some(Some(32 << 20)));
        let s = build_for(&with_default_memory(&none, None), CgroupVersion::V2, &[]);
        assert_eq!(limit(&s), None);
    }

    #[test]
    fn limits_devices_and_namespaces() {
        let a = app("command = [\"httpd\", \"-f\"]\nenv = { MODE = \"prod\" }\ndevices = [\"/dev/ttyUSB0\"]\n[app.resources]\ncpus = 0.5\nmemory = \"32Mi\"\npids = 64\n");
        let dev = HostDevice {
            path: "/dev/ttyUSB0".into(),
            kind: LinuxDeviceType::C,
            major: 188,
            minor: 0,
            mode: 0o20660,
            uid: 0,
            gid: 20,
        };
        let s = build_for(&a, CgroupVersion::V1, std::slice::from_ref(&dev));
        let r = resources(&s);
        assert_eq!(r.memory().unwrap().limit(), Some(32 << 20));
        assert_eq!(r.cpu().as_ref().unwrap().quota(), Some(50_000));
        assert_eq!(r.cpu().as_ref().unwrap().period(), Some(100_000));
        assert_eq!(r.pids().unwrap().limit(), 64);
        let rules = r.devices().as_ref().unwrap();
        assert_eq!(rules.len(), 2);
        assert!(!rules[0].allow(), "deny-all first");
        assert_eq!(
            (rules[0].typ(), rules[0].major(), rules[0].access().as_deref()),
            (None, None, Some("rwm"))
        );
        assert!(rules[1].allow());
        assert_eq!(
            (rules[1].typ(), rules[1].major(), rules[1].minor()),
            (Some(LinuxDeviceType::C), Some(188), Some(0))
        );
        let node = &linux(&s).devices().as_ref().unwrap()[0];
        assert_eq!(node.file_mode(), Some(0o660));
        assert_eq!((node.path().as_path(), node.gid()), (Path::new("/dev/ttyUSB0"), Some(20)));
        assert_eq!(linux(&s).cgroups_path().as_deref(), Some(Path::new("/skiff/web")));
        assert_eq!(process(&s).args().as_deref(), Some(&["httpd".to_string(), "-f".into()][..]));
        assert_eq!(process(&s).env().as_deref(), Some(&["PATH=/bin".to_string(), "MODE=prod".into()][..]));
        assert_eq!(process(&s).no_new_privileges(), Some(true));
        use LinuxNamespaceType as N;
        assert_eq!(namespaces(&s), [N::Pid, N::Ipc, N::Uts, N::Mount], "host network, no cgroup ns on v1");
        let dests = destinations(&s);
        assert!(!dests.contains(&Path::new("/sys/fs/cgroup")), "no cgroup mount on v1");
        assert!(dests.contains(&Path::new("/etc/resolv.conf")), "host network gets resolv.conf");
        assert!(bounding_caps(&s).contains(&"CAP_MKNOD"));
    }

    #[test]
    fn v2_and_private_network() {
        let a = app("network = \"none\"\n");
        let s = build_for(&a, CgroupVersion::V2, &[]);
        use LinuxNamespaceType as N;
        assert_eq!(namespaces(&s), [N::Pid, N::Ipc, N::Uts, N::Mount, N::Network, N::Cgroup]);
        let caps = bounding_caps(&s);
        assert!(caps.contains(&"CAP_MKNOD"), "mknod kept: the device program guards opening");
        assert!(caps.contains(&"CAP_CHOWN"));
        let dests = destinations(&s);
        assert!(dests.contains(&Path::new("/sys/fs/cgroup")));
        assert!(!dests.contains(&Path::new("/etc/resolv.conf")));
        assert_eq!(process(&s).args().as_deref(), Some(&["sh".to_string()][..]), "image cmd when no command");
        assert!(resources(&s).memory().is_none());
    }

    #[test]
    fn mounts_and_users() {
        let a = app("mounts = [{ source = \"/srv\", target = \"/data\", readonly = true }]\n");
        let s = build_for(&a, CgroupVersion::V1, &[]);
        let m = s.mounts().as_ref().unwrap().last().unwrap();
        let want = MountBuilder::default()
            .destination("/data")
            .typ("bind")
            .source("/srv")
            .options(vec!["rbind".to_string(), "rprivate".into(), "ro".into()])
            .build()
            .unwrap();
        assert_eq!(m, &want);
        assert_eq!(parse_user(Some("1000:100")).unwrap(), (1000, 100));
        assert_eq!(parse_user(Some("65534")).unwrap(), (65534, 65534));
        assert!(matches!(parse_user(Some("nobody")), Err(SpecError::User(u)) if u == "nobody"));
        let mut img = image();
        img.cmd.clear();
        assert!(matches!(args(&app(""), &img), Err(SpecError::NoCommand)));
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
        // In the spec, the same set for bounding, effective and permitted; no
        // inheritable or ambient ones (the oci-spec builder's default has some).
        let a = app("cap_add = [\"NET_ADMIN\"]\n");
        let s = build_for(&a, CgroupVersion::V1, &[]);
        let c = process(&s).capabilities().as_ref().unwrap();
        let want: Capabilities =
            capabilities(&a, CgroupVersion::V1).into_iter().map(oci_capability).collect();
        assert_eq!(c.bounding().as_ref(), Some(&want));
        assert_eq!(c.effective().as_ref(), Some(&want));
        assert_eq!(c.permitted().as_ref(), Some(&want));
        assert_eq!((c.inheritable(), c.ambient()), (&None, &None));
        assert_eq!(bounding_caps(&s), caps_of("cap_add = [\"NET_ADMIN\"]\n", CgroupVersion::V1));
        assert!(bounding_caps(&s).contains(&"CAP_NET_ADMIN"));
    }

    #[test]
    fn every_capability_has_its_own_oci_name() {
        let mapped: Capabilities = Capability::ALL.iter().copied().map(oci_capability).collect();
        assert_eq!(mapped.len(), Capability::ALL.len());
        for &c in Capability::ALL {
            // The OCI name written to config.json is skiff's name for it.
            assert_eq!(serde_json::to_value(oci_capability(c)).unwrap(), c.as_str());
        }
    }

    #[test]
    fn user_root_and_privileges() {
        let s = build_for(&app(""), CgroupVersion::V1, &[]);
        let user = |s: &Spec| (process(s).user().uid(), process(s).user().gid());
        assert_eq!(user(&s), (0, 0));
        assert_eq!(s.root().as_ref().unwrap().readonly(), Some(false));
        assert_eq!(process(&s).no_new_privileges(), Some(true));
        assert_eq!(s.hostname().as_deref(), Some("web"));
        assert_eq!(s.annotations(), &None);
        let masked = linux(&s).masked_paths().as_deref().unwrap();
        assert!(masked.contains(&"/proc/interrupts".to_string()));
        assert!(masked.ends_with(&[
            "/sys/devices/system/cpu/cpu0/thermal_throttle".to_string(),
            "/sys/devices/system/cpu/cpu1/thermal_throttle".to_string()
        ]));
        assert_eq!(masked.len(), MASKED.len() + 2, "cpufreq is not a CPU");
        let a = app("user = \"1000:100\"\nread_only_rootfs = true\nno_new_privileges = false\nsecurity.seccomp = \"unconfined\"\n");
        let s = build_for(&a, CgroupVersion::V1, &[]);
        assert_eq!(user(&s), (1000, 100));
        assert_eq!(s.root().as_ref().unwrap().readonly(), Some(true));
        assert_eq!(process(&s).no_new_privileges(), Some(false));
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
        assert_eq!(user(&s), (1000, 1000));
    }

    #[test]
    fn a_limit_the_spec_cannot_hold_is_an_error_naming_the_app() {
        let mut a = app("command = [\"sh\"]\n");
        a.resources.memory_bytes = Some(u64::MAX);
        let err = build(&SpecInputs {
            app: &a,
            image: &image(),
            rootfs: "/r",
            cgroup_path: "/skiff/web",
            cgroups: CgroupVersion::V2,
            devices: &[],
            host_files: &[],
            host_masked: &[],
        })
        .unwrap_err();
        assert!(
            matches!(&err, SpecError::OutOfRange { app, field: "memory", value: u64::MAX } if app.as_str() == "web"),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("app web: memory"), "{err}");
    }
}

/// The spec of representative apps, compared with the `config.json` skiff
/// wrote for them before the spec went through typed builders
/// (`spec_fixtures/`). A change here is a change in what every container
/// gets: set `SKIFF_BLESS_SPEC=1` to rewrite the fixtures, then review their diff.
#[cfg(test)]
mod golden {
    use super::*;
    use serde_json::Value;
    use skiff_common::toml_file;
    use std::path::PathBuf;

    struct Case {
        name: &'static str,
        toml: &'static str,
        cgroups: CgroupVersion,
        devices: bool,
        image_user: Option<&'static str>,
        default_memory: Option<u64>,
    }

    const BASE: Case = Case {
        name: "",
        toml: "",
        cgroups: CgroupVersion::V2,
        devices: false,
        image_user: None,
        default_memory: None,
    };

    const LIMITS: &str = "command = [\"httpd\", \"-f\", \"-p\", \"8080\"]\n\
        env = { MODE = \"prod\", PATH = \"/usr/bin:/bin\" }\n\
        workdir = \"/srv\"\n\
        devices = [\"/dev/ttyUSB0\", \"/dev/sda\"]\n\
        mounts = [{ source = \"/var/lib/skiff/volumes/web\", target = \"/data\" }, { source = \"/etc/ssl\", target = \"/etc/ssl\", readonly = true }]\n\
        [app.resources]\ncpus = 0.25\nmemory = \"64Mi\"\npids = 100\n\
        [app.liveness]\nhttp = { port = 8080, path = \"/\" }\n\
        [app.readiness]\nexec = [\"cat\", \"/tmp/ok\"]\n";

    const SECURITY: &str = "user = \"1000:100\"\nread_only_rootfs = true\n\
        cap_add = [\"SYS_TIME\", \"NET_RAW\", \"MKNOD\"]\ncap_drop = [\"CHOWN\", \"SETFCAP\"]\n\
        no_new_privileges = false\nsecurity.seccomp = \"unconfined\"\n";

    const CASES: &[Case] = &[
        Case { name: "default_v2", ..BASE },
        Case { name: "default_v1", cgroups: CgroupVersion::V1, ..BASE },
        Case { name: "limits_devices_mounts_probes_v1", toml: LIMITS, cgroups: CgroupVersion::V1, devices: true, ..BASE },
        Case { name: "limits_devices_mounts_probes_v2", toml: LIMITS, devices: true, ..BASE },
        Case { name: "user_readonly_caps_v2", toml: SECURITY, ..BASE },
        Case { name: "user_readonly_caps_v1", toml: SECURITY, cgroups: CgroupVersion::V1, ..BASE },
        Case {
            name: "drop_all_image_user_v1",
            toml: "cap_drop = [\"ALL\"]\ncap_add = [\"KILL\", \"NET_BIND_SERVICE\"]\nenv = { MODE = \"test\" }\n",
            cgroups: CgroupVersion::V1,
            image_user: Some("5:7"),
            ..BASE
        },
        Case { name: "network_none_v2", toml: "network = \"none\"\n", ..BASE },
        Case { name: "network_none_v1", toml: "network = \"none\"\n", cgroups: CgroupVersion::V1, ..BASE },
        Case { name: "default_memory_v2", default_memory: Some(256 << 20), ..BASE },
    ];

    fn devices() -> Vec<HostDevice> {
        vec![
            HostDevice {
                path: "/dev/ttyUSB0".into(),
                kind: LinuxDeviceType::C,
                major: 188,
                minor: 0,
                mode: 0o20660,
                uid: 0,
                gid: 20,
            },
            HostDevice {
                path: "/dev/sda".into(),
                kind: LinuxDeviceType::B,
                major: 8,
                minor: 0,
                mode: 0o60640,
                uid: 0,
                gid: 6,
            },
        ]
    }

    fn built(case: &Case) -> Spec {
        let text = format!("[[app]]\nname = \"web\"\nimage = \"busybox:1\"\n{}", case.toml);
        let app = with_default_memory(&toml_file::parse(&text).unwrap().apps.remove(0), case.default_memory);
        let image = ImageConfig {
            env: vec!["PATH=/usr/local/bin:/bin".into(), "MODE=dev".into(), "LANG=C.UTF-8".into()],
            entrypoint: vec!["/entry.sh".into()],
            cmd: vec!["serve".into(), "--port=80".into()],
            workdir: Some("/app".into()),
            user: case.image_user.map(Into::into),
        };
        let devices = if case.devices { devices() } else { Vec::new() };
        build(&SpecInputs {
            app: &app,
            image: &image,
            rootfs: "/run/skiff/apps/web/3/rootfs",
            cgroup_path: "/skiff/web",
            cgroups: case.cgroups,
            devices: &devices,
            host_files: &[
                ("/run/systemd/resolve/stub-resolv.conf".into(), "/etc/resolv.conf".into()),
                ("/etc/hosts".into(), "/etc/hosts".into()),
            ],
            host_masked: &thermal_paths(["cpu0", "cpu1"]),
        })
        .unwrap()
    }

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("src/runtime/spec_fixtures")
            .join(format!("{name}.json"))
    }

    /// `spec` as JSON, its capability sets in kernel order: the typed spec
    /// holds them in a hash set, so their order in config.json varies (and
    /// means nothing to the runtime).
    fn normalized(spec: &Spec) -> Value {
        let mut v = serde_json::to_value(spec).unwrap();
        if let Some(sets) = v.pointer_mut("/process/capabilities").and_then(Value::as_object_mut) {
            for set in sets.values_mut().filter_map(Value::as_array_mut) {
                set.sort_by_key(|c| Capability::ALL.iter().position(|k| Some(k.as_str()) == c.as_str()));
            }
        }
        v
    }

    #[test]
    fn specs_match_the_fixtures() {
        let bless = std::env::var_os("SKIFF_BLESS_SPEC").is_some();
        for case in CASES {
            let got = built(case);
            let path = fixture(case.name);
            if bless {
                let mut text = serde_json::to_string_pretty(&normalized(&got)).unwrap();
                text.push('\n');
                std::fs::write(&path, text).unwrap();
                continue;
            }
            let want: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            // The same JSON, field for field: nothing missing, nothing added.
            assert_eq!(normalized(&got), want, "{}", case.name);
            // And the spec libcontainer reads from the fixture is the one built.
            let read: Spec = serde_json::from_value(want).unwrap();
            assert_eq!(read, got, "{}", case.name);
        }
    }
}
