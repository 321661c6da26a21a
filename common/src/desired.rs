//! The desired state: what should run on a device. These types are trusted:
//! they are only built by the validator in `toml_file` (from a person's file)
//! or decoded from a checked envelope (`codec`). Apps are kept sorted by name.

use crate::name::{AppName, ImageRef};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Where a desired state came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// `skiff apply` on the device.
    Local,
    /// Signed by the controller and received over MQTT.
    Controller,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Grows with every change; a state is never replaced by one with a lower number.
    pub generation: u64,
    pub origin: Origin,
    /// Sorted by name, names unique.
    pub apps: Vec<AppSpec>,
    /// How the device tests this generation before it trusts it.
    pub rollout: Rollout,
}

impl DesiredState {
    pub fn empty() -> Self {
        DesiredState { generation: 0, origin: Origin::Local, apps: Vec::new(), rollout: Rollout::default() }
    }

    pub fn app(&self, name: &AppName) -> Option<&AppSpec> {
        self.apps.iter().find(|a| &a.name == name)
    }
}

/// `[rollout]`: a new generation runs in a testing phase and is committed as
/// the last good one only when every app of it has been running and ready,
/// with no restart, for `stable`; otherwise the device goes back to the last
/// good generation by itself (unless `rollback` is off).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// How long every app must stay running and ready, with no restart.
    pub stable: Duration,
    /// How long the apps have, from the moment the generation is applied, to
    /// be running and ready (and stay so for `stable`) before it has failed.
    pub deadline: Duration,
    /// Go back to the last good generation when this one fails. Off for
    /// stateful apps where running an older version is worse than a broken one.
    pub rollback: bool,
}

impl Rollout {
    pub const DEFAULT_STABLE: Duration = Duration::from_secs(60);
    pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(300);
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout { stable: Rollout::DEFAULT_STABLE, deadline: Rollout::DEFAULT_DEADLINE, rollback: true }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    pub name: AppName,
    pub image: ImageRef,
    /// When the image is fetched from its registry.
    pub pull: PullPolicy,
    /// Replaces the image's entrypoint and command when set.
    pub command: Option<Vec<String>>,
    /// Added to (and overriding) the image's environment.
    pub env: BTreeMap<String, String>,
    /// Working directory; the image's when unset.
    pub workdir: Option<String>,
    pub restart: RestartPolicy,
    pub network: NetworkMode,
    pub mounts: Vec<Mount>,
    /// Host device paths passed through and allowed in the device cgroup.
    pub devices: Vec<String>,
    pub resources: Resources,
    pub liveness: Option<Probe>,
    pub readiness: Option<Probe>,
    pub startup: Option<Probe>,
    /// Time between SIGTERM and SIGKILL when the app is stopped.
    pub stop_grace: Duration,
    /// Who the app runs as and what it may do (user, capabilities, ...).
    /// `default` only matters to serde_json (shim.json written by an older
    /// agent); postcard always carries the field.
    #[serde(default)]
    pub security: Security,
}

/// The per-app security settings. In the TOML file `user`, `read_only_rootfs`,
/// `cap_add`, `cap_drop` and `no_new_privileges` sit directly in `[[app]]`
/// (as Docker spells them) and `seccomp` in `[app.security]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Security {
    /// Runs the process as this user; the image's `USER` when unset.
    pub user: Option<User>,
    /// Mounts the container's root filesystem read-only.
    pub read_only_rootfs: bool,
    /// Added to the default capability set. Unique, none also in `cap_drop`.
    pub cap_add: Vec<Capability>,
    /// Removed from the default capability set. Unique.
    pub cap_drop: Vec<Capability>,
    /// `cap_drop = ["ALL"]`: starts from no capability at all, then adds
    /// `cap_add`. When set, `cap_drop` is empty.
    pub cap_drop_all: bool,
    /// Setuid and file capabilities grant nothing (on by default; turn it off
    /// for apps that need setuid tools such as `su` or `ping` as a user).
    pub no_new_privileges: bool,
    /// The syscall filter.
    pub seccomp: Seccomp,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            user: None,
            read_only_rootfs: false,
            cap_add: Vec::new(),
            cap_drop: Vec::new(),
            cap_drop_all: false,
            no_new_privileges: true,
            seccomp: Seccomp::Default,
        }
    }
}

/// A numeric user: `user = "1000"` or `user = "1000:100"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub uid: u32,
    /// The group; the uid's number when unset (as for an image's `USER`).
    pub gid: Option<u32>,
}

impl User {
    /// The group the process runs with.
    pub fn effective_gid(self) -> u32 {
        self.gid.unwrap_or(self.uid)
    }
}

impl std::fmt::Display for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.gid {
            Some(g) => write!(f, "{}:{g}", self.uid),
            None => write!(f, "{}", self.uid),
        }
    }
}

/// The syscall filter of an app. Append only: postcard numbers the variants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Seccomp {
    /// skiff's default profile (Docker's default, `default`).
    #[default]
    Default,
    /// No filter at all (`unconfined`).
    Unconfined,
}

impl Seccomp {
    pub const ALL: [Seccomp; 2] = [Seccomp::Default, Seccomp::Unconfined];

    /// The word the TOML file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Seccomp::Default => "default",
            Seccomp::Unconfined => "unconfined",
        }
    }
}

macro_rules! capabilities {
    ($($variant:ident = $name:literal,)*) => {
        /// A Linux capability, in the kernel's order (the variant index is the
        /// capability number). Append only: postcard numbers the variants.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub enum Capability {
            $($variant,)*
        }

        impl Capability {
            pub const ALL: &'static [Capability] = &[$(Capability::$variant,)*];

            /// The name as the OCI spec and `capabilities(7)` write it (`CAP_NET_RAW`).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Capability::$variant => $name,)*
                }
            }
        }
    };
}

capabilities! {
    Chown = "CAP_CHOWN",
    DacOverride = "CAP_DAC_OVERRIDE",
    DacReadSearch = "CAP_DAC_READ_SEARCH",
    Fowner = "CAP_FOWNER",
    Fsetid = "CAP_FSETID",
    Kill = "CAP_KILL",
    Setgid = "CAP_SETGID",
    Setuid = "CAP_SETUID",
    Setpcap = "CAP_SETPCAP",
    LinuxImmutable = "CAP_LINUX_IMMUTABLE",
    NetBindService = "CAP_NET_BIND_SERVICE",
    NetBroadcast = "CAP_NET_BROADCAST",
    NetAdmin = "CAP_NET_ADMIN",
    NetRaw = "CAP_NET_RAW",
    IpcLock = "CAP_IPC_LOCK",
    IpcOwner = "CAP_IPC_OWNER",
    SysModule = "CAP_SYS_MODULE",
    SysRawio = "CAP_SYS_RAWIO",
    SysChroot = "CAP_SYS_CHROOT",
    SysPtrace = "CAP_SYS_PTRACE",
    SysPacct = "CAP_SYS_PACCT",
    SysAdmin = "CAP_SYS_ADMIN",
    SysBoot = "CAP_SYS_BOOT",
    SysNice = "CAP_SYS_NICE",
    SysResource = "CAP_SYS_RESOURCE",
    SysTime = "CAP_SYS_TIME",
    SysTtyConfig = "CAP_SYS_TTY_CONFIG",
    Mknod = "CAP_MKNOD",
    Lease = "CAP_LEASE",
    AuditWrite = "CAP_AUDIT_WRITE",
    AuditControl = "CAP_AUDIT_CONTROL",
    Setfcap = "CAP_SETFCAP",
    MacOverride = "CAP_MAC_OVERRIDE",
    MacAdmin = "CAP_MAC_ADMIN",
    Syslog = "CAP_SYSLOG",
    WakeAlarm = "CAP_WAKE_ALARM",
    BlockSuspend = "CAP_BLOCK_SUSPEND",
    AuditRead = "CAP_AUDIT_READ",
    Perfmon = "CAP_PERFMON",
    Bpf = "CAP_BPF",
    CheckpointRestore = "CAP_CHECKPOINT_RESTORE",
}

impl Capability {
    /// The capability number the kernel uses (`CAP_NET_RAW` is 13).
    pub fn number(self) -> u32 {
        self as u32
    }

    /// Reads a name as Docker does: any case, with or without `CAP_`
    /// (`NET_RAW`, `net_raw`, `CAP_NET_RAW`). `ALL` is not a capability.
    pub fn parse(name: &str) -> Option<Capability> {
        let upper = name.to_ascii_uppercase();
        let full = if upper.starts_with("CAP_") { upper } else { format!("CAP_{upper}") };
        Capability::ALL.iter().copied().find(|c| c.as_str() == full)
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When an app's image is pulled from its registry. Append only: postcard
/// numbers the variants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    /// Pulled when the store does not hold the reference (`if-not-present`).
    #[default]
    IfNotPresent,
    /// Pulled again (the tag re-resolved) on every apply of a new generation (`always`).
    Always,
    /// Never pulled: the image must be loaded on the device (`never`).
    Never,
}

impl PullPolicy {
    pub const ALL: [PullPolicy; 3] = [PullPolicy::IfNotPresent, PullPolicy::Always, PullPolicy::Never];

    /// The word the TOML file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::IfNotPresent => "if-not-present",
            PullPolicy::Always => "always",
            PullPolicy::Never => "never",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// Whether an exit with this outcome leads to a restart. `success` is an
    /// exit with code 0 (not a signal, not an OOM kill).
    pub fn restarts_after(self, success: bool) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkMode {
    /// Shares the host's network namespace.
    Host,
    /// A private network namespace with no interfaces but loopback.
    None,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Absolute host path.
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    pub readonly: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU quota in thousandths of a core (`cpus = 0.5` is 500).
    pub cpu_millis: Option<u32>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// Maximum number of processes and threads.
    pub pids: Option<u32>,
}

/// A probe with Kubernetes semantics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub action: ProbeAction,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    /// Consecutive failures that make the probe failed.
    pub failure_threshold: u32,
    /// Consecutive successes that make the probe passed again.
    pub success_threshold: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeAction {
    /// GET http://127.0.0.1:port/path; 200-399 passes.
    Http { port: u16, path: String },
    /// A TCP connect to 127.0.0.1:port passes.
    Tcp { port: u16 },
    /// The command, run inside the container, exits 0.
    Exec(Vec<String>),
}

impl Probe {
    pub const DEFAULT_PERIOD: Duration = Duration::from_secs(10);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
    pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
}

impl AppSpec {
    pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
}
