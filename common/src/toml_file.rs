//! The desired-state file people write (`apps.toml`) and its validation.
//!
//! Parsing is two steps: serde reads the text into raw structs that keep the
//! position of every value (`Spanned`) and refuse unknown fields; `validate`
//! turns them into the trusted types of `desired`, checking what serde cannot
//! (names, limits, duplicates, combinations). Every error names the line,
//! column and field, so `skiff validate` can print `apps.toml:7:10: ...`.

use crate::desired::*;
use crate::name::{AppName, ImageRef};
use crate::quantity::{parse_bytes, parse_duration};
use crate::validate::{
    check_app, check_apps_len, check_rollout, cpus_message, port_message, range_message, Field, ProbeField,
    ProbeKind, MAX_APPS, PIDS, THRESHOLD,
};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::time::Duration;
use toml::Spanned;

/// One problem in a desired-state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub line: usize,
    pub column: usize,
    /// The field, e.g. `app[1].resources.memory`; empty for syntax errors.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for FileError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    app: Vec<Spanned<RawApp>>,
    rollout: Option<Spanned<RawRollout>>,
}

/// `[rollout]`: how the device tests the state before it trusts it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    stable: Option<Spanned<String>>,
    deadline: Option<Spanned<String>>,
    rollback: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    name: Spanned<String>,
    image: Spanned<String>,
    pull: Option<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, String>,
    workdir: Option<Spanned<String>>,
    restart: Option<Spanned<String>>,
    network: Option<Spanned<String>>,
    #[serde(default)]
    mounts: Vec<Spanned<RawMount>>,
    #[serde(default)]
    devices: Vec<Spanned<String>>,
    resources: Option<RawResources>,
    liveness: Option<Spanned<RawProbe>>,
    readiness: Option<Spanned<RawProbe>>,
    startup: Option<Spanned<RawProbe>>,
    stop_grace: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    read_only_rootfs: Option<bool>,
    cap_add: Option<Spanned<Vec<Spanned<String>>>>,
    cap_drop: Option<Spanned<Vec<Spanned<String>>>>,
    no_new_privileges: Option<bool>,
    security: Option<RawSecurity>,
}

/// `[app.security]`: the settings Docker has no flat spelling for.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecurity {
    seccomp: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMount {
    source: Spanned<String>,
    target: Spanned<String>,
    #[serde(default)]
    readonly: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    cpus: Option<Spanned<f64>>,
    memory: Option<Spanned<String>>,
    pids: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    http: Option<Spanned<RawHttp>>,
    tcp: Option<Spanned<RawTcp>>,
    exec: Option<Spanned<Vec<String>>>,
    period: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    initial_delay: Option<Spanned<String>>,
    failure_threshold: Option<Spanned<i64>>,
    success_threshold: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    port: Spanned<i64>,
    #[serde(default = "root_path")]
    path: String,
}

fn root_path() -> String {
    "/".to_string()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcp {
    port: Spanned<i64>,
}

/// Turns a byte offset into a 1-based line and column.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, col)
}

struct Ctx<'a> {
    text: &'a str,
    errors: Vec<FileError>,
    /// Fields that already have an error (a value that did not convert): the
    /// shared checks do not report them again.
    reported: BTreeSet<String>,
}

impl Ctx<'_> {
    fn err(&mut self, span: Range<usize>, field: impl Into<String>, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        let field = field.into();
        self.reported.insert(field.clone());
        self.errors.push(FileError { line, column, field, message: message.into() });
    }

    fn duration(&mut self, v: &Option<Spanned<String>>, field: String, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(s.get_ref()) {
                Ok(d) => d,
                Err(e) => {
                    self.err(s.span(), field, e);
                    default
                }
            },
        }
    }
}

/// Parses and validates a desired-state file. All problems found are returned,
/// in file order. The result has generation 0: the store assigns generations.
///
/// This converts text to typed values (names, enums, sizes, durations) and
/// reports where each problem is; what a valid state is lives in `validate`,
/// shared with every decoder.
pub fn parse(text: &str) -> Result<DesiredState, Vec<FileError>> {
    let raw: RawFile = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            let message = e.message().trim().to_string();
            return Err(vec![FileError { line, column, field: String::new(), message }]);
        }
    };
    let mut cx = Ctx { text, errors: Vec::new(), reported: BTreeSet::new() };
    if let Err(e) = check_apps_len(raw.app.len()) {
        cx.err(raw.app[MAX_APPS].span(), format!("app[{MAX_APPS}]"), e.to_string());
        return Err(cx.errors);
    }
    let mut apps: Vec<AppSpec> = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, app) in raw.app.iter().enumerate() {
        let name = app.get_ref().name.get_ref();
        let label = format!("app[{i}]");
        if let Some(first) = seen.get(name) {
            cx.err(
                app.get_ref().name.span(),
                format!("{label}.name"),
                format!("duplicate app name {name:?} (first defined as app[{first}])"),
            );
            continue;
        }
        seen.insert(name.clone(), i);
        if let Some(spec) = validate_app(&mut cx, app.get_ref(), &label) {
            apps.push(spec);
        }
    }
    let rollout = convert_rollout(&mut cx, raw.rollout.as_ref());
    if !cx.errors.is_empty() {
        cx.errors.sort_by_key(|e| (e.line, e.column));
        return Err(cx.errors);
    }
    apps.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(DesiredState { generation: 0, origin: Origin::Local, apps, rollout })
}

fn convert_rollout(cx: &mut Ctx, raw: Option<&Spanned<RawRollout>>) -> Rollout {
    let Some(raw) = raw else { return Rollout::default() };
    let r = raw.get_ref();
    let rollout = Rollout {
        stable: cx.duration(&r.stable, "rollout.stable".into(), Rollout::DEFAULT_STABLE),
        deadline: cx.duration(&r.deadline, "rollout.deadline".into(), Rollout::DEFAULT_DEADLINE),
        rollback: r.rollback.unwrap_or(true),
    };
    let mut found = Vec::new();
    check_rollout(&rollout, &mut |field, message| found.push((field, message)));
    for (field, message) in found {
        let span = match field {
            "stable" => r.stable.as_ref().map(|s| s.span()),
            _ => r.deadline.as_ref().map(|s| s.span()),
        }
        .unwrap_or(raw.span());
        cx.err(span, format!("rollout.{field}"), message);
    }
    rollout
}

/// Reads a word of a fixed set (`restart = "on-failure"`).
fn choice<T: Copy>(
    cx: &mut Ctx,
    v: &Option<Spanned<String>>,
    field: String,
    words: &[(&str, T)],
    default: T,
) -> T {
    let Some(s) = v else { return default };
    match words.iter().find(|(w, _)| *w == s.get_ref()) {
        Some((_, t)) => *t,
        None => {
            let names: Vec<&str> = words.iter().map(|(w, _)| *w).collect();
            cx.err(s.span(), field, format!("{:?} is not one of {}", s.get_ref(), names.join(", ")));
            default
        }
    }
}

fn validate_app(cx: &mut Ctx, raw: &RawApp, label: &str) -> Option<AppSpec> {
    let before = cx.errors.len();
    let name = match AppName::try_from(raw.name.get_ref().as_str()) {
        Ok(n) => Some(n),
        Err(e) => {
            cx.err(raw.name.span(), format!("{label}.name"), e.to_string());
            None
        }
    };
    let label = match &name {
        Some(n) => format!("app {n:?}"),
        None => label.to_string(),
    };
    let image = match ImageRef::try_from(raw.image.get_ref().as_str()) {
        Ok(i) => Some(i),
        Err(e) => {
            cx.err(raw.image.span(), format!("{label}: image"), e.to_string());
            None
        }
    };
    let pull = choice(
        cx,
        &raw.pull,
        format!("{label}: pull"),
        &PullPolicy::ALL.map(|p| (p.as_str(), p)),
        PullPolicy::default(),
    );
    let restart = choice(
        cx,
        &raw.restart,
        format!("{label}: restart"),
        &[
            ("always", RestartPolicy::Always),
            ("on-failure", RestartPolicy::OnFailure),
            ("never", RestartPolicy::Never),
        ],
        RestartPolicy::Always,
    );
    let network = choice(
        cx,
        &raw.network,
        format!("{label}: network"),
        &[("host", NetworkMode::Host), ("none", NetworkMode::None)],
        NetworkMode::Host,
    );
    let env = raw.env.iter().map(|(k, v)| (k.get_ref().clone(), v.clone())).collect();
    let mounts = raw
        .mounts
        .iter()
        .map(|m| {
            let m = m.get_ref();
            Mount {
                source: m.source.get_ref().clone(),
                target: m.target.get_ref().clone(),
                readonly: m.readonly,
            }
        })
        .collect();
    let resources = raw.resources.as_ref().map(|r| convert_resources(cx, r, &label)).unwrap_or_default();
    let mut probe = |p: &Option<Spanned<RawProbe>>, kind: ProbeKind| {
        p.as_ref().and_then(|p| convert_probe(cx, p, &format!("{label}: {}", kind.as_str())))
    };
    let liveness = probe(&raw.liveness, ProbeKind::Liveness);
    let readiness = probe(&raw.readiness, ProbeKind::Readiness);
    let startup = probe(&raw.startup, ProbeKind::Startup);
    let stop_grace =
        cx.duration(&raw.stop_grace, format!("{label}: stop_grace"), AppSpec::DEFAULT_STOP_GRACE);
    let security = convert_security(cx, raw, &label);
    let spec = AppSpec {
        // Stand-ins when the name or image did not convert (already reported):
        // the checks below look at everything else.
        name: name.unwrap_or_else(|| AppName::try_from("invalid").expect("a valid name")),
        image: image.unwrap_or_else(|| ImageRef::try_from("invalid").expect("a valid image reference")),
        pull,
        command: raw.command.as_ref().map(|c| c.get_ref().clone()),
        env,
        workdir: raw.workdir.as_ref().map(|w| w.get_ref().clone()),
        restart,
        network,
        mounts,
        devices: raw.devices.iter().map(|d| d.get_ref().clone()).collect(),
        resources,
        liveness,
        readiness,
        startup,
        stop_grace,
        security,
    };
    check_app(&spec, &mut |field, message| {
        let f = format!("{label}: {field}");
        if !cx.reported.contains(&f) {
            cx.err(span_of(raw, &field), f, message);
        }
    });
    if cx.errors.len() > before {
        return None;
    }
    Some(spec)
}

/// Where in the file a field the shared checks named is; the app's name when
/// the field was left out (a default broke a rule).
fn span_of(raw: &RawApp, field: &Field) -> Range<usize> {
    let span = |s: &Option<Spanned<String>>| s.as_ref().map(|s| s.span());
    let res = raw.resources.as_ref();
    let found = match field {
        Field::Command => raw.command.as_ref().map(|c| c.span()),
        Field::Env(k) => raw.env.keys().find(|s| s.get_ref() == k).map(|s| s.span()),
        Field::Workdir => span(&raw.workdir),
        Field::MountSource(i) => raw.mounts.get(*i).map(|m| m.get_ref().source.span()),
        Field::MountTarget(i) => raw.mounts.get(*i).map(|m| m.get_ref().target.span()),
        Field::Device(i) => raw.devices.get(*i).map(|d| d.span()),
        Field::Cpus => res.and_then(|r| r.cpus.as_ref()).map(|c| c.span()),
        Field::Memory => res.and_then(|r| span(&r.memory)),
        Field::Pids => res.and_then(|r| r.pids.as_ref()).map(|p| p.span()),
        Field::StopGrace => span(&raw.stop_grace),
        Field::User => span(&raw.user),
        Field::CapAdd => raw.cap_add.as_ref().map(|c| c.span()),
        Field::CapDrop => raw.cap_drop.as_ref().map(|c| c.span()),
        // A plain bool carries no span: the error points at the app.
        Field::NoNewPrivileges => None,
        Field::Probe(kind, f) => {
            let p = match kind {
                ProbeKind::Liveness => &raw.liveness,
                ProbeKind::Readiness => &raw.readiness,
                ProbeKind::Startup => &raw.startup,
            };
            p.as_ref().map(|p| {
                let r = p.get_ref();
                let int = |v: &Option<Spanned<i64>>| v.as_ref().map(|v| v.span());
                let action = r
                    .http
                    .as_ref()
                    .map(|h| h.span())
                    .or_else(|| r.tcp.as_ref().map(|t| t.span()))
                    .or_else(|| r.exec.as_ref().map(|e| e.span()));
                let s = match f {
                    ProbeField::Action => action,
                    ProbeField::HttpPort => r.http.as_ref().map(|h| h.get_ref().port.span()),
                    ProbeField::HttpPath => r.http.as_ref().map(|h| h.span()),
                    ProbeField::TcpPort => r.tcp.as_ref().map(|t| t.get_ref().port.span()),
                    ProbeField::Exec => r.exec.as_ref().map(|e| e.span()),
                    ProbeField::Period => span(&r.period),
                    ProbeField::Timeout => span(&r.timeout),
                    ProbeField::InitialDelay => span(&r.initial_delay),
                    ProbeField::FailureThreshold => int(&r.failure_threshold),
                    ProbeField::SuccessThreshold => int(&r.success_threshold),
                };
                s.unwrap_or(p.span())
            })
        }
    };
    found.unwrap_or(raw.name.span())
}

fn convert_security(cx: &mut Ctx, raw: &RawApp, label: &str) -> Security {
    let default = Security::default();
    let user = raw.user.as_ref().and_then(|u| {
        let user = parse_user(u.get_ref());
        if user.is_none() {
            cx.err(
                u.span(),
                format!("{label}: user"),
                format!("{:?} is not a numeric uid or uid:gid (user names are not looked up)", u.get_ref()),
            );
        }
        user
    });
    let mut caps = |list: &Option<Spanned<Vec<Spanned<String>>>>, field: &str, all_allowed: bool| {
        let mut out = Vec::new();
        let mut all = false;
        for name in list.iter().flat_map(|l| l.get_ref()) {
            if name.get_ref().eq_ignore_ascii_case("ALL") {
                if !all_allowed {
                    cx.err(name.span(), format!("{label}: {field}"), "ALL is only allowed in cap_drop");
                } else if all {
                    cx.err(name.span(), format!("{label}: {field}"), "ALL is listed twice");
                }
                all = true;
            } else if let Some(c) = Capability::parse(name.get_ref()) {
                out.push(c);
            } else {
                cx.err(
                    name.span(),
                    format!("{label}: {field}"),
                    format!(
                        "{:?} is not a capability (NET_RAW or CAP_NET_RAW, see capabilities(7))",
                        name.get_ref()
                    ),
                );
            }
        }
        (out, all)
    };
    let (cap_add, _) = caps(&raw.cap_add, "cap_add", false);
    let (cap_drop, cap_drop_all) = caps(&raw.cap_drop, "cap_drop", true);
    let seccomp = choice(
        cx,
        &raw.security.as_ref().and_then(|s| s.seccomp.clone()),
        format!("{label}: security.seccomp"),
        &Seccomp::ALL.map(|s| (s.as_str(), s)),
        Seccomp::default(),
    );
    Security {
        user,
        read_only_rootfs: raw.read_only_rootfs.unwrap_or(default.read_only_rootfs),
        cap_add,
        cap_drop,
        cap_drop_all,
        no_new_privileges: raw.no_new_privileges.unwrap_or(default.no_new_privileges),
        seccomp,
    }
}

/// `uid` or `uid:gid`, both decimal numbers.
fn parse_user(s: &str) -> Option<User> {
    let number = |n: &str| if n.bytes().all(|b| b.is_ascii_digit()) { n.parse::<u32>().ok() } else { None };
    match s.split_once(':') {
        Some((u, g)) => Some(User { uid: number(u)?, gid: Some(number(g)?) }),
        None => Some(User { uid: number(s)?, gid: None }),
    }
}

fn convert_resources(cx: &mut Ctx, r: &RawResources, label: &str) -> Resources {
    let mut out = Resources::default();
    if let Some(c) = &r.cpus {
        let v = *c.get_ref();
        let millis = (v * 1000.0).round();
        if v.is_finite() && (0.0..=f64::from(u32::MAX)).contains(&millis) {
            out.cpu_millis = Some(millis as u32);
        } else {
            cx.err(c.span(), format!("{label}: resources.cpus"), cpus_message(v));
        }
    }
    if let Some(m) = &r.memory {
        match parse_bytes(m.get_ref()) {
            Ok(b) => out.memory_bytes = Some(b),
            Err(e) => cx.err(m.span(), format!("{label}: resources.memory"), e),
        }
    }
    if let Some(p) = &r.pids {
        match u32::try_from(*p.get_ref()) {
            Ok(v) => out.pids = Some(v),
            Err(_) => cx.err(p.span(), format!("{label}: resources.pids"), range_message(p.get_ref(), &PIDS)),
        }
    }
    out
}

/// The probe's values as types; `None` when it has not exactly one action.
fn convert_probe(cx: &mut Ctx, p: &Spanned<RawProbe>, label: &str) -> Option<Probe> {
    let raw = p.get_ref();
    let port = |cx: &mut Ctx, port: &Spanned<i64>, field: &str| -> u16 {
        u16::try_from(*port.get_ref()).unwrap_or_else(|_| {
            cx.err(port.span(), format!("{label}.{field}.port"), port_message(port.get_ref()));
            1
        })
    };
    let mut actions = Vec::new();
    if let Some(h) = &raw.http {
        let port = port(cx, &h.get_ref().port, "http");
        actions.push(ProbeAction::Http { port, path: h.get_ref().path.clone() });
    }
    if let Some(t) = &raw.tcp {
        let port = port(cx, &t.get_ref().port, "tcp");
        actions.push(ProbeAction::Tcp { port });
    }
    if let Some(e) = &raw.exec {
        actions.push(ProbeAction::Exec(e.get_ref().clone()));
    }
    if actions.len() != 1 {
        cx.err(p.span(), label.to_string(), "needs exactly one of http, tcp or exec");
        return None;
    }
    let action = actions.pop()?;
    let period = cx.duration(&raw.period, format!("{label}.period"), Probe::DEFAULT_PERIOD);
    // Unset, the timeout is 1s or the period when that is shorter.
    let timeout = cx.duration(&raw.timeout, format!("{label}.timeout"), Probe::DEFAULT_TIMEOUT.min(period));
    let initial_delay = cx.duration(&raw.initial_delay, format!("{label}.initial_delay"), Duration::ZERO);
    let threshold = |cx: &mut Ctx, v: &Option<Spanned<i64>>, field: &str, default: u32| match v {
        None => default,
        Some(s) => u32::try_from(*s.get_ref()).unwrap_or_else(|_| {
            cx.err(s.span(), format!("{label}.{field}"), range_message(s.get_ref(), &THRESHOLD));
            default
        }),
    };
    let failure_threshold =
        threshold(cx, &raw.failure_threshold, "failure_threshold", Probe::DEFAULT_FAILURE_THRESHOLD);
    let success_threshold = threshold(cx, &raw.success_threshold, "success_threshold", 1);
    Some(Probe { action, initial_delay, period, timeout, failure_threshold, success_threshold })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
[[app]]
name = "web"
image = "busybox:1"
command = ["httpd", "-f", "-p", "8080"]
env = { MODE = "prod" }
restart = "always"
network = "host"
mounts = [{ source = "/var/lib/skiff/volumes/web", target = "/data", readonly = false }]
devices = ["/dev/ttyUSB0"]
[app.resources]
cpus = 0.5
memory = "32Mi"
pids = 64
[app.liveness]
http = { port = 8080, path = "/" }
period = "5s"
timeout = "1s"
failure_threshold = 3
initial_delay = "0s"

[[app]]
name = "sensor"
image = "busybox:1"
restart = "on-failure"
network = "none"
[app.readiness]
exec = ["cat", "/tmp/ok"]
"#;

    #[test]
    fn full_example_parses() {
        let s = parse(FULL).unwrap();
        assert_eq!(s.apps.len(), 2);
        let web = &s.apps[1];
        assert_eq!(web.name.as_str(), "web");
        assert_eq!(
            web.resources,
            Resources { cpu_millis: Some(500), memory_bytes: Some(32 << 20), pids: Some(64) }
        );
        let live = web.liveness.as_ref().unwrap();
        assert_eq!(live.action, ProbeAction::Http { port: 8080, path: "/".into() });
        assert_eq!(live.period, Duration::from_secs(5));
        assert_eq!(s.apps[0].restart, RestartPolicy::OnFailure);
        assert_eq!(s.apps[0].network, NetworkMode::None);
        assert_eq!(web.stop_grace, AppSpec::DEFAULT_STOP_GRACE);
    }

    fn one_error(text: &str) -> FileError {
        let errs = parse(text).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        errs.into_iter().next().unwrap()
    }

    #[test]
    fn errors_name_line_column_and_field() {
        let e = one_error("[[app]]\nname = \"web\"\nimage = \"busybox\"\ncolor = \"red\"\n");
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("unknown field `color`"), "{e}");

        let e = one_error("[[app]]\nname = \"Web_1\"\nimage = \"busybox\"\n");
        assert_eq!((e.line, e.column), (2, 8), "{e}");
        assert_eq!(e.field, "app[0].name");

        let e = one_error("[[app]]\nname = \"a\"\nimage = \"b\"\n[[app]]\nname = \"a\"\nimage = \"b\"\n");
        assert_eq!(e.line, 5);
        assert!(e.message.contains("duplicate"), "{e}");

        let e = one_error("[[app]]\nname = \"a\"\nimage = \"b\"\n[app.resources]\nmemory = \"1Mi\"\n");
        assert_eq!((e.line, e.field.as_str()), (5, "app \"a\": resources.memory"));

        let e = one_error("[[app]]\nname = \"a\"\nimage = \"b\"\n[app.resources]\ncpus = -1.0\n");
        assert_eq!(e.field, "app \"a\": resources.cpus");

        let e = one_error("[[app]]\nname = \"a\"\nimage = \"b\"\n[app.resources]\npids = 0\n");
        assert_eq!(e.field, "app \"a\": resources.pids");

        let e = one_error(
            "[[app]]\nname = \"a\"\nimage = \"b\"\nnetwork = \"none\"\n[app.liveness]\ntcp = { port = 80 }\n",
        );
        assert!(e.message.contains("network"), "{e}");

        let e = one_error(
            "[[app]]\nname = \"a\"\nimage = \"b\"\n[app.liveness]\ntcp = { port = 80 }\nexec = [\"true\"]\n",
        );
        assert!(e.message.contains("exactly one"), "{e}");

        let e = one_error("[[app]]\nname = \"a\"\nimage = \"b\"\n[app.liveness]\ntcp = { port = 80 }\nperiod = \"1s\"\ntimeout = \"2s\"\n");
        assert_eq!((e.line, e.field.as_str()), (7, "app \"a\": liveness.timeout"));

        let e = one_error("[[app]]\nname = \"a\"\nimage = \"b\"\nrestart = \"sometimes\"\n");
        assert_eq!((e.line, e.column), (4, 11));

        let e = one_error("[[app]]\nname = \"a\"\n");
        assert!(e.message.contains("missing field `image`"), "{e}");

        let e = one_error("[[app]\n");
        assert_eq!(e.line, 1);

        let e = one_error(
            "[[app]]\nname = \"a\"\nimage = \"b\"\nmounts = [{ source = \"rel\", target = \"/d\" }]\n",
        );
        assert_eq!(e.field, "app \"a\": mounts[0].source");
    }

    #[test]
    fn short_period_shortens_the_default_timeout() {
        let s = parse(
            "[[app]]\nname = \"a\"\nimage = \"b\"\n[app.liveness]\ntcp = { port = 80 }\nperiod = \"300ms\"\n",
        )
        .unwrap();
        assert_eq!(s.apps[0].liveness.as_ref().unwrap().timeout, Duration::from_millis(300));
    }

    #[test]
    fn pull_policy_defaults_to_if_not_present() {
        let base = "[[app]]\nname = \"a\"\nimage = \"b\"\n";
        assert_eq!(parse(base).unwrap().apps[0].pull, PullPolicy::IfNotPresent);
        for p in PullPolicy::ALL {
            let s = parse(&format!("{base}pull = \"{}\"\n", p.as_str())).unwrap();
            assert_eq!(s.apps[0].pull, p);
        }
        let e = one_error(&format!("{base}pull = \"sometimes\"\n"));
        assert_eq!((e.line, e.column, e.field.as_str()), (4, 8, "app \"a\": pull"));
        assert_eq!(e.message, "\"sometimes\" is not one of if-not-present, always, never");
    }

    #[test]
    fn security_settings_as_docker_spells_them() {
        let base = "[[app]]\nname = \"a\"\nimage = \"b\"\n";
        let s = parse(base).unwrap();
        assert_eq!(s.apps[0].security, Security::default());
        assert!(s.apps[0].security.no_new_privileges, "on unless turned off");
        let s = parse(&format!(
            "{base}user = \"1000:100\"\nread_only_rootfs = true\ncap_add = [\"net_admin\", \"CAP_SYS_TIME\"]\n\
             cap_drop = [\"ALL\"]\nno_new_privileges = false\nsecurity.seccomp = \"unconfined\"\n"
        ))
        .unwrap();
        let sec = &s.apps[0].security;
        assert_eq!(sec.user, Some(User { uid: 1000, gid: Some(100) }));
        assert!(sec.read_only_rootfs && sec.cap_drop_all && !sec.no_new_privileges);
        assert_eq!(sec.cap_add, [Capability::NetAdmin, Capability::SysTime]);
        assert!(sec.cap_drop.is_empty());
        assert_eq!(sec.seccomp, Seccomp::Unconfined);
        let s = parse(&format!("{base}user = \"65534\"\n[app.security]\nseccomp = \"default\"\n")).unwrap();
        assert_eq!(s.apps[0].security.user, Some(User { uid: 65534, gid: None }));

        for (extra, line, column, field, message) in [
            (
                "user = \"bob\"",
                4,
                8,
                "user",
                "\"bob\" is not a numeric uid or uid:gid (user names are not looked up)",
            ),
            (
                "user = \"1:+2\"",
                4,
                8,
                "user",
                "\"1:+2\" is not a numeric uid or uid:gid (user names are not looked up)",
            ),
            ("user = \"4294967295\"", 4, 8, "user", "4294967295 is not a usable uid or gid"),
            (
                "cap_add = [\"NET_RAW\", \"FLY\"]",
                4,
                23,
                "cap_add",
                "\"FLY\" is not a capability (NET_RAW or CAP_NET_RAW, see capabilities(7))",
            ),
            ("cap_add = [\"ALL\"]", 4, 12, "cap_add", "ALL is only allowed in cap_drop"),
            ("cap_add = [\"NET_RAW\", \"cap_net_raw\"]", 4, 11, "cap_add", "CAP_NET_RAW is listed twice"),
            (
                "cap_add = [\"CHOWN\"]\ncap_drop = [\"chown\"]",
                4,
                11,
                "cap_add",
                "CAP_CHOWN is also in cap_drop",
            ),
            (
                "cap_drop = [\"ALL\", \"NET_RAW\"]",
                4,
                12,
                "cap_drop",
                "ALL already drops every capability; list nothing else",
            ),
            (
                "security.seccomp = \"off\"",
                4,
                20,
                "security.seccomp",
                "\"off\" is not one of default, unconfined",
            ),
        ] {
            let e = one_error(&format!("{base}{extra}\n"));
            assert_eq!(
                (e.line, e.column, e.field.as_str(), e.message.as_str()),
                (line, column, format!("app \"a\": {field}").as_str(), message),
                "{extra}"
            );
        }
        let e = one_error(&format!("{base}[app.security]\nuser = \"1\"\n"));
        assert!(e.message.contains("unknown field `user`"), "{e}");
    }

    #[test]
    fn capability_numbers_are_the_kernels() {
        assert_eq!(Capability::ALL.len(), 41);
        for (i, c) in Capability::ALL.iter().enumerate() {
            assert_eq!(c.number() as usize, i);
            assert_eq!(Capability::parse(c.as_str()), Some(*c));
        }
        for (c, n) in [
            (Capability::NetRaw, 13),
            (Capability::SysAdmin, 21),
            (Capability::Mknod, 27),
            (Capability::AuditWrite, 29),
            (Capability::Setfcap, 31),
            (Capability::Bpf, 39),
            (Capability::CheckpointRestore, 40),
        ] {
            assert_eq!(c.number(), n, "{c}");
        }
        assert_eq!(Capability::parse("all"), None);
        assert_eq!(Capability::parse("CAP_"), None);
    }

    #[test]
    fn empty_file_is_an_empty_state() {
        assert_eq!(parse("").unwrap().apps.len(), 0);
    }
}
