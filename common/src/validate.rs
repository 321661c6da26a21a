//! The invariants of a desired state, in one place.
//!
//! Two doors lead into a `DesiredState`: the TOML file a person writes
//! (`toml_file`, which converts text to typed values and reports positions)
//! and a decoded envelope (flash, MQTT). Both run the checks here, so a state
//! the agent acts on always holds them, whichever door it came through:
//! `toml_file::parse` calls `check_app` and `check_apps_len` on what it
//! converted, and every decoder calls `DesiredState::validate`. A property
//! test (`tests/validate_vs_toml.rs`) renders random states to TOML and checks
//! that both doors accept exactly the same ones.
//!
//! Bounds exist so that nothing downstream can overflow or misbehave on an
//! absurd value (`Instant + stop_grace`, a quota multiplied out, a limit the
//! kernel reads as a signed number). Durations are whole milliseconds, the
//! finest the file can say.

use crate::desired::{AppSpec, Capability, DesiredState, NetworkMode, Probe, ProbeAction, Seccomp, Security};
use crate::name::AppName;
use std::collections::BTreeSet;
use std::fmt;
use std::ops::RangeInclusive;
use std::time::Duration;

/// Apps per desired state. Far above what a board runs; bounds what one state
/// can make the agent start, track and report.
pub const MAX_APPS: usize = 1000;
/// The highest generation: 2^53 - 1, so a generation survives a trip through a
/// JSON number (and a person's spreadsheet) unchanged. Far above any clock in
/// seconds or count of applies, so it is only reached on purpose, and then
/// `skiffctl apply --reset` takes the device back (see the README).
pub const MAX_GENERATION: u64 = (1 << 53) - 1;
/// CPU quota in thousandths of a core: 0.01 to 1024 cores.
pub const CPU_MILLIS: RangeInclusive<u32> = 10..=1_024_000;
/// Below this a container cannot even start its init.
pub const MIN_MEMORY: u64 = 4 << 20;
/// The kernel and the OCI spec read memory limits as signed 64-bit numbers.
pub const MAX_MEMORY: u64 = i64::MAX as u64;
pub const PIDS: RangeInclusive<u32> = 1..=4_194_304;
pub const THRESHOLD: RangeInclusive<u32> = 1..=1000;
pub const MIN_PERIOD: Duration = Duration::from_millis(100);
/// Longest probe period and initial delay.
pub const MAX_PROBE_WAIT: Duration = Duration::from_secs(24 * 3600);
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(600);
/// `rollout.stable`: up to a day (0: committed as soon as every app is ready).
pub const ROLLOUT_STABLE: RangeInclusive<Duration> = Duration::ZERO..=Duration::from_secs(24 * 3600);
/// `rollout.deadline`: 1 s to a week, and never shorter than `stable`.
pub const ROLLOUT_DEADLINE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(7 * 24 * 3600);

/// A probe of an app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

impl ProbeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "liveness",
            ProbeKind::Readiness => "readiness",
            ProbeKind::Startup => "startup",
        }
    }
}

/// A part of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProbeField {
    /// The probe as a whole (its kind of action).
    Action,
    HttpPort,
    HttpPath,
    TcpPort,
    Exec,
    Period,
    Timeout,
    InitialDelay,
    FailureThreshold,
    SuccessThreshold,
}

/// A field of an app, named as in the TOML file (`resources.memory`,
/// `mounts[0].source`, `liveness.http.port`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Field {
    Command,
    Env(String),
    Workdir,
    MountSource(usize),
    MountTarget(usize),
    Device(usize),
    Cpus,
    Memory,
    Pids,
    Probe(ProbeKind, ProbeField),
    StopGrace,
    User,
    CapAdd,
    CapDrop,
    NoNewPrivileges,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Command => f.write_str("command"),
            Field::Env(k) => write!(f, "env.{k}"),
            Field::Workdir => f.write_str("workdir"),
            Field::MountSource(i) => write!(f, "mounts[{i}].source"),
            Field::MountTarget(i) => write!(f, "mounts[{i}].target"),
            Field::Device(i) => write!(f, "devices[{i}]"),
            Field::Cpus => f.write_str("resources.cpus"),
            Field::Memory => f.write_str("resources.memory"),
            Field::Pids => f.write_str("resources.pids"),
            Field::StopGrace => f.write_str("stop_grace"),
            Field::User => f.write_str("user"),
            Field::CapAdd => f.write_str("cap_add"),
            Field::CapDrop => f.write_str("cap_drop"),
            Field::NoNewPrivileges => f.write_str("no_new_privileges"),
            Field::Probe(kind, field) => {
                f.write_str(kind.as_str())?;
                f.write_str(match field {
                    ProbeField::Action => "",
                    ProbeField::HttpPort => ".http.port",
                    ProbeField::HttpPath => ".http.path",
                    ProbeField::TcpPort => ".tcp.port",
                    ProbeField::Exec => ".exec",
                    ProbeField::Period => ".period",
                    ProbeField::Timeout => ".timeout",
                    ProbeField::InitialDelay => ".initial_delay",
                    ProbeField::FailureThreshold => ".failure_threshold",
                    ProbeField::SuccessThreshold => ".success_threshold",
                })
            }
        }
    }
}

/// Why a decoded desired state is refused. Names the app and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("generation {0} is above the highest allowed, {MAX_GENERATION}")]
    Generation(u64),
    #[error("{0} apps; at most {MAX_APPS} are allowed in one desired state")]
    TooManyApps(usize),
    #[error("app {0:?} is listed twice")]
    Duplicate(AppName),
    #[error("apps are not sorted by name ({first:?} before {then:?})")]
    Unsorted { first: AppName, then: AppName },
    #[error("app {app:?}: {field}: {message}")]
    App { app: AppName, field: Field, message: String },
    #[error("rollout.{field}: {message}")]
    Rollout { field: &'static str, message: String },
}

impl DesiredState {
    /// Checks every invariant the TOML validator checks (plus the ones only a
    /// decoded state can break: generation, order). Returns the first problem.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.generation > MAX_GENERATION {
            return Err(ValidationError::Generation(self.generation));
        }
        check_apps_len(self.apps.len())?;
        let mut rollout = None;
        check_rollout(&self.rollout, &mut |field, message| {
            rollout.get_or_insert(ValidationError::Rollout { field, message });
        });
        if let Some(e) = rollout {
            return Err(e);
        }
        for pair in self.apps.windows(2) {
            let (a, b) = (&pair[0].name, &pair[1].name);
            if a == b {
                return Err(ValidationError::Duplicate(a.clone()));
            }
            if a > b {
                return Err(ValidationError::Unsorted { first: a.clone(), then: b.clone() });
            }
        }
        for app in &self.apps {
            let mut first = None;
            check_app(app, &mut |field, message| {
                first.get_or_insert((field, message));
            });
            if let Some((field, message)) = first {
                return Err(ValidationError::App { app: app.name.clone(), field, message });
            }
        }
        Ok(())
    }
}

/// The rules of `[rollout]`; `report` gets the field (`stable`, `deadline`) and why.
pub fn check_rollout(r: &crate::desired::Rollout, report: &mut dyn FnMut(&'static str, String)) {
    let secs = |d: Duration| format!("{}s", d.as_secs());
    if !ROLLOUT_STABLE.contains(&r.stable) || !whole_ms(r.stable) {
        report("stable", format!("must be whole milliseconds from 0s to {}", secs(*ROLLOUT_STABLE.end())));
    }
    if !ROLLOUT_DEADLINE.contains(&r.deadline) || !whole_ms(r.deadline) {
        report(
            "deadline",
            format!(
                "must be whole milliseconds from {} to {}",
                secs(*ROLLOUT_DEADLINE.start()),
                secs(*ROLLOUT_DEADLINE.end())
            ),
        );
    } else if r.deadline < r.stable {
        report("deadline", "must not be shorter than rollout.stable (the apps could never pass)".into());
    }
}

/// The app count rule.
pub fn check_apps_len(n: usize) -> Result<(), ValidationError> {
    if n > MAX_APPS {
        return Err(ValidationError::TooManyApps(n));
    }
    Ok(())
}

/// An absolute path without `.`, `..` or NUL.
pub fn abs_path_ok(p: &str) -> bool {
    p.starts_with('/') && !p.contains('\0') && !p.split('/').any(|c| c == ".." || c == ".")
}

/// The message for a CPU quota outside `CPU_MILLIS`, given in cores.
pub fn cpus_message(cores: impl fmt::Display) -> String {
    format!("{cores} is not a number of cores between 0.01 and 1024")
}

/// The message for a port outside 1-65535.
pub fn port_message(port: impl fmt::Display) -> String {
    format!("{port} is not a port (1-65535)")
}

/// The message for a count outside `range`.
pub fn range_message<T: fmt::Display>(v: impl fmt::Display, range: &RangeInclusive<T>) -> String {
    format!("{v} is not between {} and {}", range.start(), range.end())
}

fn whole_ms(d: Duration) -> bool {
    d.subsec_nanos().is_multiple_of(1_000_000)
}

/// Reports every broken invariant of one app, in field order. The name and
/// image are valid by type.
pub fn check_app(app: &AppSpec, report: &mut dyn FnMut(Field, String)) {
    if let Some(c) = &app.command {
        if c.first().is_none_or(|p| p.is_empty()) {
            report(Field::Command, "must name a program (leave it out to use the image's)".into());
        }
        if c.iter().any(|a| a.contains('\0')) {
            report(Field::Command, "contains a NUL byte".into());
        }
    }
    for (k, v) in &app.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            report(Field::Env(k.clone()), "variable names must be non-empty, without '=' or NUL".into());
        }
    }
    if let Some(w) = &app.workdir {
        if !abs_path_ok(w) {
            report(Field::Workdir, "must be an absolute path without '.' or '..'".into());
        }
    }
    let mut targets = BTreeSet::new();
    for (i, m) in app.mounts.iter().enumerate() {
        if !abs_path_ok(&m.source) {
            report(Field::MountSource(i), "must be an absolute host path without '.' or '..'".into());
        }
        if !abs_path_ok(&m.target) || m.target == "/" {
            report(Field::MountTarget(i), "must be an absolute path other than / without '.' or '..'".into());
        } else if !targets.insert(m.target.trim_end_matches('/')) {
            report(Field::MountTarget(i), format!("{:?} is mounted twice", m.target));
        }
    }
    for (i, path) in app.devices.iter().enumerate() {
        if !path.starts_with("/dev/") || !abs_path_ok(path) {
            report(Field::Device(i), format!("{path:?} is not a path under /dev/"));
        } else if app.devices[..i].contains(path) {
            report(Field::Device(i), format!("{path:?} is listed twice"));
        }
    }
    let r = &app.resources;
    if let Some(m) = r.cpu_millis {
        if !CPU_MILLIS.contains(&m) {
            report(Field::Cpus, cpus_message(f64::from(m) / 1000.0));
        }
    }
    if let Some(b) = r.memory_bytes {
        if b < MIN_MEMORY {
            report(Field::Memory, format!("{b} bytes is below the minimum of 4Mi"));
        } else if b > MAX_MEMORY {
            report(Field::Memory, format!("{b} bytes is above the maximum of {MAX_MEMORY}"));
        }
    }
    if let Some(p) = r.pids {
        if !PIDS.contains(&p) {
            report(Field::Pids, range_message(p, &PIDS));
        }
    }
    for (kind, probe) in [
        (ProbeKind::Liveness, &app.liveness),
        (ProbeKind::Readiness, &app.readiness),
        (ProbeKind::Startup, &app.startup),
    ] {
        if let Some(p) = probe {
            check_probe(p, app.network, &mut |f, m| report(Field::Probe(kind, f), m));
        }
    }
    if app.stop_grace > MAX_STOP_GRACE {
        report(Field::StopGrace, "must be at most 10m".into());
    } else if !whole_ms(app.stop_grace) {
        report(Field::StopGrace, "must be a whole number of milliseconds".into());
    }
    check_security(&app.security, report);
}

/// `(uid_t)-1` means "no change" to setresuid(2): never a user to run as.
pub const NO_ID: u32 = u32::MAX;

fn check_security(s: &Security, report: &mut dyn FnMut(Field, String)) {
    if let Some(u) = s.user {
        if u.uid == NO_ID || u.gid == Some(NO_ID) {
            report(Field::User, format!("{NO_ID} is not a usable uid or gid"));
        }
    }
    for (field, list) in [(Field::CapAdd, &s.cap_add), (Field::CapDrop, &s.cap_drop)] {
        for (i, cap) in list.iter().enumerate() {
            if list[..i].contains(cap) {
                report(field.clone(), format!("{cap} is listed twice"));
            }
        }
    }
    if let Some(cap) = s.cap_add.iter().find(|c| s.cap_drop.contains(c)) {
        report(Field::CapAdd, format!("{cap} is also in cap_drop"));
    }
    if s.cap_drop_all && !s.cap_drop.is_empty() {
        report(Field::CapDrop, "ALL already drops every capability; list nothing else".into());
    }
    // The kernel loads a seccomp filter only under no-new-privileges or with
    // CAP_SYS_ADMIN, and the filter goes in after the capabilities are set.
    if !s.no_new_privileges && s.seccomp == Seccomp::Default && !s.cap_add.contains(&Capability::SysAdmin) {
        report(
            Field::NoNewPrivileges,
            "false needs security.seccomp = \"unconfined\" (the default seccomp filter can only be loaded with no-new-privileges)".into(),
        );
    }
}

fn check_probe(p: &Probe, network: NetworkMode, report: &mut dyn FnMut(ProbeField, String)) {
    match &p.action {
        ProbeAction::Http { port, path } => {
            if *port == 0 {
                report(ProbeField::HttpPort, port_message(port));
            }
            if !path.starts_with('/') || path.chars().any(|c| c.is_ascii_control() || c == ' ') {
                report(
                    ProbeField::HttpPath,
                    "must start with / and hold no spaces or control characters".into(),
                );
            }
        }
        ProbeAction::Tcp { port } => {
            if *port == 0 {
                report(ProbeField::TcpPort, port_message(port));
            }
        }
        ProbeAction::Exec(args) => {
            if args.first().is_none_or(|p| p.is_empty()) {
                report(ProbeField::Exec, "must name a program".into());
            }
            if args.iter().any(|a| a.contains('\0')) {
                report(ProbeField::Exec, "contains a NUL byte".into());
            }
        }
    }
    if network == NetworkMode::None && !matches!(p.action, ProbeAction::Exec(_)) {
        report(
            ProbeField::Action,
            "http and tcp probes cannot reach an app with network = \"none\"; use exec".into(),
        );
    }
    if p.period < MIN_PERIOD {
        report(ProbeField::Period, "must be at least 100ms".into());
    } else if p.period > MAX_PROBE_WAIT {
        report(ProbeField::Period, "must be at most 24h".into());
    } else if !whole_ms(p.period) {
        report(ProbeField::Period, "must be a whole number of milliseconds".into());
    }
    if p.timeout.is_zero() || p.timeout > p.period {
        report(ProbeField::Timeout, "must be above zero and at most the period".into());
    } else if !whole_ms(p.timeout) {
        report(ProbeField::Timeout, "must be a whole number of milliseconds".into());
    }
    if p.initial_delay > MAX_PROBE_WAIT {
        report(ProbeField::InitialDelay, "must be at most 24h".into());
    } else if !whole_ms(p.initial_delay) {
        report(ProbeField::InitialDelay, "must be a whole number of milliseconds".into());
    }
    if !THRESHOLD.contains(&p.failure_threshold) {
        report(ProbeField::FailureThreshold, range_message(p.failure_threshold, &THRESHOLD));
    }
    if !THRESHOLD.contains(&p.success_threshold) {
        report(ProbeField::SuccessThreshold, range_message(p.success_threshold, &THRESHOLD));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{toml_file, Capability, Origin};

    fn state() -> DesiredState {
        let mut s = toml_file::parse(
            "[[app]]\nname = \"db\"\nimage = \"b\"\n[[app]]\nname = \"web\"\nimage = \"b\"\n[app.liveness]\ntcp = { port = 80 }\n",
        )
        .unwrap();
        s.generation = 5;
        s.origin = Origin::Controller;
        s
    }

    #[test]
    fn what_only_a_decoded_state_can_break() {
        assert_eq!(state().validate(), Ok(()));
        let mut s = state();
        s.generation = MAX_GENERATION;
        assert_eq!(s.validate(), Ok(()));
        s.generation = MAX_GENERATION + 1;
        assert_eq!(s.validate(), Err(ValidationError::Generation(MAX_GENERATION + 1)));
        let mut s = state();
        s.apps.swap(0, 1);
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "apps are not sorted by name (\"web\" before \"db\")"
        );
        let mut s = state();
        s.apps[0] = s.apps[1].clone();
        assert_eq!(s.validate(), Err(ValidationError::Duplicate(s.apps[0].name.clone())));
        let mut s = state();
        s.apps = (0..=MAX_APPS)
            .map(|i| {
                let mut a = s.apps[0].clone();
                a.name = AppName::try_from(format!("a{i:05}").as_str()).unwrap();
                a
            })
            .collect();
        assert_eq!(s.validate(), Err(ValidationError::TooManyApps(MAX_APPS + 1)));
    }

    #[test]
    fn absurd_durations_are_refused_naming_the_app_and_field() {
        let mut s = state();
        s.apps[0].stop_grace = Duration::MAX;
        assert_eq!(s.validate().unwrap_err().to_string(), "app \"db\": stop_grace: must be at most 10m");
        let mut s = state();
        s.apps[1].liveness.as_mut().unwrap().period = Duration::MAX;
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "app \"web\": liveness.period: must be at most 24h"
        );
        let mut s = state();
        s.apps[1].liveness.as_mut().unwrap().initial_delay = Duration::MAX;
        assert!(matches!(
            s.validate(),
            Err(ValidationError::App {
                field: Field::Probe(ProbeKind::Liveness, ProbeField::InitialDelay),
                ..
            })
        ));
        // Finer than the file can say.
        let mut s = state();
        s.apps[0].stop_grace = Duration::from_nanos(1_500_000);
        assert!(matches!(s.validate(), Err(ValidationError::App { field: Field::StopGrace, .. })));
        let mut s = state();
        s.apps[1].liveness.as_mut().unwrap().timeout = Duration::from_nanos(999_999);
        assert!(matches!(
            s.validate(),
            Err(ValidationError::App { field: Field::Probe(ProbeKind::Liveness, ProbeField::Timeout), .. })
        ));
    }

    #[test]
    fn limits_and_strings_are_refused_naming_the_field() {
        type Case = (fn(&mut AppSpec), &'static str);
        let cases: Vec<Case> = vec![
            (|a| a.resources.memory_bytes = Some(u64::MAX), "resources.memory"),
            (|a| a.resources.cpu_millis = Some(u32::MAX), "resources.cpus"),
            (|a| a.resources.pids = Some(0), "resources.pids"),
            (|a| a.command = Some(vec![]), "command"),
            (|a| _ = a.env.insert("A=B".into(), "x".into()), "env.A=B"),
            (
                |a| a.mounts.push(crate::Mount { source: "rel".into(), target: "/d".into(), readonly: true }),
                "mounts[0].source",
            ),
            (|a| a.devices.push("/etc/shadow".into()), "devices[0]"),
            (|a| a.liveness.as_mut().unwrap().action = ProbeAction::Tcp { port: 0 }, "liveness.tcp.port"),
            (
                |a| a.liveness.as_mut().unwrap().action = ProbeAction::Http { port: 1, path: "/\r\n".into() },
                "liveness.http.path",
            ),
            (|a| a.liveness.as_mut().unwrap().action = ProbeAction::Exec(vec![]), "liveness.exec"),
            (|a| a.liveness.as_mut().unwrap().failure_threshold = 0, "liveness.failure_threshold"),
            (|a| a.security.user = Some(crate::User { uid: NO_ID, gid: None }), "user"),
            (|a| a.security.user = Some(crate::User { uid: 1, gid: Some(NO_ID) }), "user"),
            (|a| a.security.cap_add = vec![Capability::NetRaw, Capability::NetRaw], "cap_add"),
            (|a| a.security.cap_drop = vec![Capability::Chown, Capability::Chown], "cap_drop"),
            (
                |a| {
                    a.security.cap_add = vec![Capability::NetRaw];
                    a.security.cap_drop = vec![Capability::NetRaw];
                },
                "cap_add",
            ),
            (
                |a| {
                    a.security.cap_drop_all = true;
                    a.security.cap_drop = vec![Capability::NetRaw];
                },
                "cap_drop",
            ),
            (|a| a.security.no_new_privileges = false, "no_new_privileges"),
        ];
        // Without no-new-privileges the filter needs CAP_SYS_ADMIN, or no filter.
        for fix in
            [(|a: &mut AppSpec| a.security.seccomp = crate::Seccomp::Unconfined) as fn(&mut AppSpec), |a| {
                a.security.cap_add = vec![Capability::SysAdmin]
            }]
        {
            let mut s = state();
            s.apps[1].security.no_new_privileges = false;
            fix(&mut s.apps[1]);
            s.validate().unwrap();
        }
        for (break_it, field) in cases {
            let mut s = state();
            break_it(&mut s.apps[1]);
            let e = s.validate().unwrap_err();
            let ValidationError::App { app, field: f, .. } = &e else { panic!("{e}") };
            assert_eq!((app.as_str(), f.to_string().as_str()), ("web", field), "{e}");
        }
    }
}
