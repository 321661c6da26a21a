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
}

impl Ctx<'_> {
    fn err(&mut self, span: Range<usize>, field: impl Into<String>, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.errors.push(FileError { line, column, field: field.into(), message: message.into() });
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
pub fn parse(text: &str) -> Result<DesiredState, Vec<FileError>> {
    let raw: RawFile = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            let message = e.message().trim().to_string();
            return Err(vec![FileError { line, column, field: String::new(), message }]);
        }
    };
    let mut cx = Ctx { text, errors: Vec::new() };
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
    if !cx.errors.is_empty() {
        cx.errors.sort_by_key(|e| (e.line, e.column));
        return Err(cx.errors);
    }
    apps.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(DesiredState { generation: 0, origin: Origin::Local, apps })
}

fn abs_path_ok(p: &str) -> bool {
    p.starts_with('/') && !p.contains('\0') && !p.split('/').any(|c| c == ".." || c == ".")
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
    let command = raw.command.as_ref().map(|c| {
        if c.get_ref().is_empty() || c.get_ref()[0].is_empty() {
            cx.err(
                c.span(),
                format!("{label}: command"),
                "must name a program (leave it out to use the image's)",
            );
        }
        if c.get_ref().iter().any(|a| a.contains('\0')) {
            cx.err(c.span(), format!("{label}: command"), "contains a NUL byte");
        }
        c.get_ref().clone()
    });
    let mut env = BTreeMap::new();
    for (k, v) in &raw.env {
        let key = k.get_ref();
        if key.is_empty() || key.contains('=') || key.contains('\0') || v.contains('\0') {
            cx.err(
                k.span(),
                format!("{label}: env.{key}"),
                "variable names must be non-empty, without '=' or NUL",
            );
        }
        env.insert(key.clone(), v.clone());
    }
    let workdir = raw.workdir.as_ref().map(|w| {
        if !abs_path_ok(w.get_ref()) {
            cx.err(w.span(), format!("{label}: workdir"), "must be an absolute path without '.' or '..'");
        }
        w.get_ref().clone()
    });
    let restart = match raw.restart.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
        None | Some(("always", _)) => RestartPolicy::Always,
        Some(("on-failure", _)) => RestartPolicy::OnFailure,
        Some(("never", _)) => RestartPolicy::Never,
        Some((other, span)) => {
            cx.err(
                span,
                format!("{label}: restart"),
                format!("{other:?} is not one of always, on-failure, never"),
            );
            RestartPolicy::Always
        }
    };
    let pull = match raw.pull.as_ref() {
        None => PullPolicy::default(),
        Some(s) => match PullPolicy::ALL.into_iter().find(|p| p.as_str() == s.get_ref()) {
            Some(p) => p,
            None => {
                cx.err(
                    s.span(),
                    format!("{label}: pull"),
                    format!("{:?} is not one of if-not-present, always, never", s.get_ref()),
                );
                PullPolicy::default()
            }
        },
    };
    let network = match raw.network.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
        None | Some(("host", _)) => NetworkMode::Host,
        Some(("none", _)) => NetworkMode::None,
        Some((other, span)) => {
            cx.err(span, format!("{label}: network"), format!("{other:?} is not one of host, none"));
            NetworkMode::Host
        }
    };
    let mut mounts = Vec::new();
    let mut targets = BTreeSet::new();
    for (i, m) in raw.mounts.iter().enumerate() {
        let m = m.get_ref();
        let field = format!("{label}: mounts[{i}]");
        if !abs_path_ok(m.source.get_ref()) {
            cx.err(
                m.source.span(),
                format!("{field}.source"),
                "must be an absolute host path without '.' or '..'",
            );
        }
        let target = m.target.get_ref();
        if !abs_path_ok(target) || target == "/" {
            cx.err(
                m.target.span(),
                format!("{field}.target"),
                "must be an absolute path other than / without '.' or '..'",
            );
        } else if !targets.insert(target.trim_end_matches('/').to_string()) {
            cx.err(m.target.span(), format!("{field}.target"), format!("{target:?} is mounted twice"));
        }
        mounts.push(Mount {
            source: m.source.get_ref().clone(),
            target: target.clone(),
            readonly: m.readonly,
        });
    }
    let mut devices = Vec::new();
    for (i, d) in raw.devices.iter().enumerate() {
        let path = d.get_ref();
        if !path.starts_with("/dev/") || !abs_path_ok(path) {
            cx.err(d.span(), format!("{label}: devices[{i}]"), format!("{path:?} is not a path under /dev/"));
        } else if devices.contains(path) {
            cx.err(d.span(), format!("{label}: devices[{i}]"), format!("{path:?} is listed twice"));
        }
        devices.push(path.clone());
    }
    let resources = raw.resources.as_ref().map(|r| validate_resources(cx, r, &label)).unwrap_or_default();
    let mut probe = |p: &Option<Spanned<RawProbe>>, kind: &str| {
        p.as_ref().and_then(|p| validate_probe(cx, p, &format!("{label}: {kind}"), network))
    };
    let liveness = probe(&raw.liveness, "liveness");
    let readiness = probe(&raw.readiness, "readiness");
    let startup = probe(&raw.startup, "startup");
    let stop_grace =
        cx.duration(&raw.stop_grace, format!("{label}: stop_grace"), AppSpec::DEFAULT_STOP_GRACE);
    if stop_grace > Duration::from_secs(600) {
        let span = raw.stop_grace.as_ref().map(|s| s.span()).unwrap_or(0..0);
        cx.err(span, format!("{label}: stop_grace"), "must be at most 10m");
    }
    if cx.errors.len() > before {
        return None;
    }
    Some(AppSpec {
        name: name?,
        image: image?,
        pull,
        command,
        env,
        workdir,
        restart,
        network,
        mounts,
        devices,
        resources,
        liveness,
        readiness,
        startup,
        stop_grace,
    })
}

/// Below this a container cannot even start its init.
const MIN_MEMORY: u64 = 4 << 20;

fn validate_resources(cx: &mut Ctx, r: &RawResources, label: &str) -> Resources {
    let mut out = Resources::default();
    if let Some(c) = &r.cpus {
        let v = *c.get_ref();
        if !(v.is_finite() && (0.01..=1024.0).contains(&v)) {
            cx.err(
                c.span(),
                format!("{label}: resources.cpus"),
                format!("{v} is not a number of cores between 0.01 and 1024"),
            );
        } else {
            out.cpu_millis = Some((v * 1000.0).round() as u32);
        }
    }
    if let Some(m) = &r.memory {
        match parse_bytes(m.get_ref()) {
            Ok(b) if b < MIN_MEMORY => cx.err(
                m.span(),
                format!("{label}: resources.memory"),
                format!("{:?} is below the minimum of 4Mi", m.get_ref()),
            ),
            Ok(b) => out.memory_bytes = Some(b),
            Err(e) => cx.err(m.span(), format!("{label}: resources.memory"), e),
        }
    }
    if let Some(p) = &r.pids {
        let v = *p.get_ref();
        if !(1..=4_194_304).contains(&v) {
            cx.err(p.span(), format!("{label}: resources.pids"), format!("{v} is not between 1 and 4194304"));
        } else {
            out.pids = Some(v as u32);
        }
    }
    out
}

fn validate_probe(cx: &mut Ctx, p: &Spanned<RawProbe>, label: &str, network: NetworkMode) -> Option<Probe> {
    let raw = p.get_ref();
    let before = cx.errors.len();
    let port = |cx: &mut Ctx, port: &Spanned<i64>, field: &str| -> u16 {
        match u16::try_from(*port.get_ref()) {
            Ok(v) if v > 0 => v,
            _ => {
                cx.err(
                    port.span(),
                    format!("{label}.{field}.port"),
                    format!("{} is not a port (1-65535)", port.get_ref()),
                );
                0
            }
        }
    };
    let mut actions = Vec::new();
    if let Some(h) = &raw.http {
        let port = port(cx, &h.get_ref().port, "http");
        let path = h.get_ref().path.clone();
        if !path.starts_with('/') || path.chars().any(|c| c.is_ascii_control() || c == ' ') {
            cx.err(
                h.span(),
                format!("{label}.http.path"),
                "must start with / and hold no spaces or control characters",
            );
        }
        actions.push((h.span(), ProbeAction::Http { port, path }));
    }
    if let Some(t) = &raw.tcp {
        let port = port(cx, &t.get_ref().port, "tcp");
        actions.push((t.span(), ProbeAction::Tcp { port }));
    }
    if let Some(e) = &raw.exec {
        if e.get_ref().is_empty() || e.get_ref()[0].is_empty() {
            cx.err(e.span(), format!("{label}.exec"), "must name a program");
        }
        actions.push((e.span(), ProbeAction::Exec(e.get_ref().clone())));
    }
    if actions.len() != 1 {
        cx.err(p.span(), label.to_string(), "needs exactly one of http, tcp or exec");
        return None;
    }
    let (span, action) = actions.pop()?;
    if network == NetworkMode::None && !matches!(action, ProbeAction::Exec(_)) {
        cx.err(
            span,
            label.to_string(),
            "http and tcp probes cannot reach an app with network = \"none\"; use exec",
        );
    }
    let period = cx.duration(&raw.period, format!("{label}.period"), Probe::DEFAULT_PERIOD);
    // Unset, the timeout is 1s or the period when that is shorter.
    let timeout = cx.duration(&raw.timeout, format!("{label}.timeout"), Probe::DEFAULT_TIMEOUT.min(period));
    let initial_delay = cx.duration(&raw.initial_delay, format!("{label}.initial_delay"), Duration::ZERO);
    if period < Duration::from_millis(100) {
        let span = raw.period.as_ref().map(|s| s.span()).unwrap_or(p.span());
        cx.err(span, format!("{label}.period"), "must be at least 100ms");
    }
    if timeout.is_zero() || timeout > period {
        let span = raw.timeout.as_ref().map(|s| s.span()).unwrap_or(p.span());
        cx.err(span, format!("{label}.timeout"), "must be above zero and at most the period");
    }
    let threshold = |cx: &mut Ctx, v: &Option<Spanned<i64>>, field: &str, default: u32| match v {
        None => default,
        Some(s) => match u32::try_from(*s.get_ref()) {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => {
                cx.err(
                    s.span(),
                    format!("{label}.{field}"),
                    format!("{} is not between 1 and 1000", s.get_ref()),
                );
                default
            }
        },
    };
    let failure_threshold =
        threshold(cx, &raw.failure_threshold, "failure_threshold", Probe::DEFAULT_FAILURE_THRESHOLD);
    let success_threshold = threshold(cx, &raw.success_threshold, "success_threshold", 1);
    if cx.errors.len() > before {
        return None;
    }
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
    fn empty_file_is_an_empty_state() {
        assert_eq!(parse("").unwrap().apps.len(), 0);
    }
}
