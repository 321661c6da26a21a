//! `DesiredState::validate` and the TOML validator accept exactly the same
//! states. Random states, built mostly from values at the edges of each rule
//! (valid and not), are rendered to TOML; `toml_file::parse` must accept the
//! text exactly when `validate` accepts the state, give back that very state,
//! and, when both refuse, name the same app and field. A deterministic
//! generator (xorshift, fixed seeds) so a failure reproduces.

use skiff_common::quantity::format_duration;
use skiff_common::validate::{ValidationError, MAX_APPS};
use skiff_common::{
    toml_file, AppName, AppSpec, Capability, DesiredState, ImageRef, Mount, NetworkMode, Origin, Probe,
    ProbeAction, PullPolicy, Resources, RestartPolicy, Rollout, Seccomp, Security, User,
};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }
    /// Mostly the first (valid) item, sometimes any: keeps about half the states valid.
    fn edge<T: Clone>(&mut self, items: &[T]) -> T {
        if self.chance(90) {
            items[0].clone()
        } else {
            self.pick(items)
        }
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const H24: u64 = 24 * 3600 * 1000;

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn probe(rng: &mut Rng) -> Probe {
    let action = match rng.below(3) {
        0 => ProbeAction::Http {
            port: rng.edge(&[8080, 1, 65535, 0]),
            path: rng.edge(&strings(&[
                "/",
                "/health?x=1",
                "/é",
                "",
                "rel",
                "/a b",
                "/a\tb",
                "/\u{7f}",
                "/a\nb",
            ])),
        },
        1 => ProbeAction::Tcp { port: rng.edge(&[80, 1, 0]) },
        _ => ProbeAction::Exec(rng.edge(&[
            strings(&["cat", "/tmp/ok"]),
            vec![],
            strings(&[""]),
            strings(&["true", ""]),
            strings(&["a\0b"]),
        ])),
    };
    let period = rng.edge(&[ms(5000), ms(100), ms(H24), ms(99), ms(0), ms(H24 + 1), ms(1)]);
    let timeout = rng.edge(&[ms(1000).min(period), period, ms(1), ms(0), period + ms(1)]);
    Probe {
        action,
        initial_delay: rng.edge(&[ms(0), ms(2500), ms(H24), ms(H24 + 1)]),
        period,
        timeout,
        failure_threshold: rng.edge(&[3, 1, 1000, 0, 1001, u32::MAX]),
        success_threshold: rng.edge(&[1, 1000, 0, 1001]),
    }
}

fn app(rng: &mut Rng, name: &str) -> AppSpec {
    let mut env = BTreeMap::new();
    for _ in 0..rng.below(3) {
        env.insert(
            rng.edge(&strings(&["MODE", "PATH", "é", "", "A=B", "N\0"])),
            rng.edge(&strings(&["x", "", "=", "line\nbreak", "\"q\"", "a\0b"])),
        );
    }
    let paths = ["/data", "/var/lib/x", "/data/", "/", "rel", "/a/../b", "/a/./b", "/a\0b", ""];
    let mounts = (0..rng.below(3))
        .map(|_| Mount {
            source: rng.edge(&strings(&paths)),
            target: rng.edge(&strings(&paths)),
            readonly: rng.chance(50),
        })
        .collect();
    let devices = (0..rng.below(3))
        .map(|_| {
            rng.edge(&strings(&[
                "/dev/ttyUSB0",
                "/dev/i2c-1",
                "/dev/",
                "/etc/passwd",
                "/dev/../etc",
                "dev/x",
            ]))
        })
        .collect();
    let network = if rng.chance(20) { NetworkMode::None } else { NetworkMode::Host };
    let mut p = || if rng.chance(30) { Some(probe(rng)) } else { None };
    let (liveness, readiness, startup) = (p(), p(), p());
    AppSpec {
        name: AppName::try_from(name).unwrap(),
        image: rng.pick(&["busybox:1.36", "127.0.0.1:5000/acme/app", "alpine"]).try_into().unwrap(),
        pull: rng.pick(&PullPolicy::ALL),
        command: rng.edge(&[
            None,
            Some(strings(&["sleep", "1"])),
            Some(vec![]),
            Some(strings(&[""])),
            Some(strings(&["a\0"])),
        ]),
        env,
        workdir: rng.edge(&[None, Some("/srv".into()), Some("rel".into()), Some("/a/..".into())]),
        restart: rng.pick(&[RestartPolicy::Always, RestartPolicy::OnFailure, RestartPolicy::Never]),
        network,
        mounts,
        devices,
        resources: Resources {
            cpu_millis: rng.edge(&[
                None,
                Some(500),
                Some(10),
                Some(1_024_000),
                Some(9),
                Some(1_024_001),
                Some(0),
            ]),
            memory_bytes: rng.edge(&[
                None,
                Some(32 << 20),
                Some(4 << 20),
                Some(i64::MAX as u64),
                Some((4 << 20) - 1),
                Some(i64::MAX as u64 + 1),
                Some(u64::MAX),
            ]),
            pids: rng.edge(&[None, Some(64), Some(1), Some(4_194_304), Some(0), Some(4_194_305)]),
        },
        liveness,
        readiness,
        startup,
        stop_grace: rng.edge(&[ms(10_000), ms(0), ms(600_000), ms(600_001), ms(1)]),
        security: security(rng),
    }
}

fn security(rng: &mut Rng) -> Security {
    let caps = [Capability::NetRaw, Capability::Chown, Capability::CheckpointRestore, Capability::NetAdmin];
    let list = |rng: &mut Rng| -> Vec<Capability> {
        let n = if rng.chance(70) { 0 } else { 1 + rng.below(2) };
        // Mostly distinct, sometimes a repeat.
        (0..n)
            .map(|i| if rng.chance(95) { caps[(i + rng.below(2) * 2) % caps.len()] } else { caps[0] })
            .collect()
    };
    let cap_add = list(rng);
    let cap_drop = list(rng);
    Security {
        user: rng.edge(&[
            None,
            Some(User { uid: 1000, gid: Some(1000) }),
            Some(User { uid: 0, gid: None }),
            Some(User { uid: 65534, gid: Some(0) }),
            Some(User { uid: u32::MAX - 1, gid: Some(u32::MAX - 1) }),
            Some(User { uid: u32::MAX, gid: None }),
            Some(User { uid: 1, gid: Some(u32::MAX) }),
        ]),
        read_only_rootfs: rng.chance(30),
        cap_add,
        cap_drop,
        cap_drop_all: rng.chance(10),
        no_new_privileges: rng.chance(80),
        seccomp: rng.pick(&Seccomp::ALL),
    }
}

/// A TOML basic string: every control character escaped.
fn q(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => write!(out, "\\u{:04X}", c as u32).unwrap(),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn list(items: &[String]) -> String {
    format!("[{}]", items.iter().map(|s| q(s)).collect::<Vec<_>>().join(", "))
}

fn render_probe(out: &mut String, kind: &str, p: &Probe) {
    writeln!(out, "[app.{kind}]").unwrap();
    match &p.action {
        ProbeAction::Http { port, path } => writeln!(out, "http = {{ port = {port}, path = {} }}", q(path)),
        ProbeAction::Tcp { port } => writeln!(out, "tcp = {{ port = {port} }}"),
        ProbeAction::Exec(args) => writeln!(out, "exec = {}", list(args)),
    }
    .unwrap();
    writeln!(out, "period = {}", q(&format_duration(p.period))).unwrap();
    writeln!(out, "timeout = {}", q(&format_duration(p.timeout))).unwrap();
    writeln!(out, "initial_delay = {}", q(&format_duration(p.initial_delay))).unwrap();
    writeln!(out, "failure_threshold = {}", p.failure_threshold).unwrap();
    writeln!(out, "success_threshold = {}", p.success_threshold).unwrap();
}

fn render(state: &DesiredState) -> String {
    let mut out = String::new();
    if state.rollout != Rollout::default() {
        let r = &state.rollout;
        writeln!(out, "[rollout]\nstable = {}", q(&format_duration(r.stable))).unwrap();
        writeln!(out, "deadline = {}\nrollback = {}", q(&format_duration(r.deadline)), r.rollback).unwrap();
    }
    for a in &state.apps {
        writeln!(out, "[[app]]\nname = {}\nimage = {}", q(a.name.as_str()), q(&a.image.to_string())).unwrap();
        writeln!(out, "pull = {}", q(a.pull.as_str())).unwrap();
        if let Some(c) = &a.command {
            writeln!(out, "command = {}", list(c)).unwrap();
        }
        let env: Vec<String> = a.env.iter().map(|(k, v)| format!("{} = {}", q(k), q(v))).collect();
        writeln!(out, "env = {{ {} }}", env.join(", ")).unwrap();
        if let Some(w) = &a.workdir {
            writeln!(out, "workdir = {}", q(w)).unwrap();
        }
        let restart = match a.restart {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        };
        let network = if a.network == NetworkMode::None { "none" } else { "host" };
        writeln!(out, "restart = {}\nnetwork = {}", q(restart), q(network)).unwrap();
        let mounts: Vec<String> = a
            .mounts
            .iter()
            .map(|m| {
                format!(
                    "{{ source = {}, target = {}, readonly = {} }}",
                    q(&m.source),
                    q(&m.target),
                    m.readonly
                )
            })
            .collect();
        writeln!(out, "mounts = [{}]", mounts.join(", ")).unwrap();
        writeln!(out, "devices = {}", list(&a.devices)).unwrap();
        writeln!(out, "stop_grace = {}", q(&format_duration(a.stop_grace))).unwrap();
        let sec = &a.security;
        if let Some(u) = sec.user {
            writeln!(out, "user = {}", q(&u.to_string())).unwrap();
        }
        // Both spellings of a capability name.
        let name = |c: &Capability, i: usize| {
            if i.is_multiple_of(2) {
                c.as_str().to_string()
            } else {
                c.as_str().trim_start_matches("CAP_").to_lowercase()
            }
        };
        let add: Vec<String> = sec.cap_add.iter().enumerate().map(|(i, c)| name(c, i)).collect();
        let mut drop: Vec<String> = sec.cap_drop.iter().enumerate().map(|(i, c)| name(c, i + 1)).collect();
        if sec.cap_drop_all {
            drop.insert(0, "ALL".into());
        }
        writeln!(out, "cap_add = {}\ncap_drop = {}", list(&add), list(&drop)).unwrap();
        writeln!(out, "read_only_rootfs = {}", sec.read_only_rootfs).unwrap();
        if !sec.no_new_privileges {
            writeln!(out, "no_new_privileges = false").unwrap();
        }
        if sec.seccomp != Seccomp::Default {
            writeln!(out, "security.seccomp = {}", q(sec.seccomp.as_str())).unwrap();
        }
        let r = &a.resources;
        if *r != Resources::default() {
            out.push_str("[app.resources]\n");
            if let Some(m) = r.cpu_millis {
                writeln!(out, "cpus = {:?}", f64::from(m) / 1000.0).unwrap();
            }
            if let Some(b) = r.memory_bytes {
                writeln!(out, "memory = {}", q(&b.to_string())).unwrap();
            }
            if let Some(p) = r.pids {
                writeln!(out, "pids = {p}").unwrap();
            }
        }
        for (kind, p) in [("liveness", &a.liveness), ("readiness", &a.readiness), ("startup", &a.startup)] {
            if let Some(p) = p {
                render_probe(&mut out, kind, p);
            }
        }
    }
    out
}

fn state(rng: &mut Rng) -> DesiredState {
    let names = ["alpha", "beta", "db", "web", "x-1"];
    let n = rng.below(4);
    let mut chosen: Vec<&str> = Vec::new();
    while chosen.len() < n {
        let name = rng.pick(&names);
        if !chosen.contains(&name) {
            chosen.push(name);
        }
    }
    chosen.sort();
    let mut apps: Vec<AppSpec> = chosen.iter().map(|n| app(rng, n)).collect();
    if !apps.is_empty() && rng.chance(3) {
        // A duplicate, kept in order.
        let dup = apps[0].clone();
        apps.insert(0, dup);
    }
    let rollout = if rng.chance(30) {
        Rollout {
            stable: rng.edge(&[ms(60_000), ms(0), ms(H24), ms(H24 + 1), ms(90_000)]),
            deadline: rng.edge(&[ms(300_000), ms(1000), ms(7 * H24), ms(999), ms(7 * H24 + 1), ms(30_000)]),
            rollback: rng.chance(50),
        }
    } else {
        Rollout::default()
    };
    DesiredState { generation: 0, origin: Origin::Local, apps, rollout }
}

fn compare(state: &DesiredState, counts: &mut [usize; 2]) {
    let text = render(state);
    let decoded = state.validate();
    let parsed = toml_file::parse(&text);
    match (&decoded, &parsed) {
        (Ok(()), Ok(p)) => assert_eq!(p, state, "the file gives back another state:\n{text}"),
        (Err(ValidationError::App { app, field, message }), Err(errors)) => {
            let want = format!("app {app:?}: {field}");
            assert!(
                errors.iter().any(|e| e.field == want),
                "validate: {want}: {message}; the TOML validator names other fields: {errors:?}\n{text}"
            );
        }
        (Err(ValidationError::Rollout { field, message }), Err(errors)) => {
            let want = format!("rollout.{field}");
            assert!(
                errors.iter().any(|e| e.field == want),
                "validate: {want}: {message}; the TOML validator names other fields: {errors:?}\n{text}"
            );
        }
        (Err(_), Err(_)) => {}
        (Ok(()), Err(errors)) => panic!("validate accepts, the TOML validator refuses: {errors:?}\n{text}"),
        (Err(e), Ok(_)) => panic!("the TOML validator accepts, validate refuses: {e}\n{text}"),
    }
    counts[usize::from(decoded.is_ok())] += 1;
}

#[test]
fn validate_and_the_toml_validator_accept_the_same_states() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut counts = [0usize; 2];
    for _ in 0..2500 {
        compare(&state(&mut rng), &mut counts);
    }
    // Both outcomes are well covered, or the comparison proves little.
    eprintln!("refused, accepted: {counts:?}");
    assert!(counts[0] > 600 && counts[1] > 600, "refused, accepted: {counts:?}");
}

#[test]
fn the_app_cap_is_the_same_in_both() {
    let mut rng = Rng(7);
    for n in [MAX_APPS, MAX_APPS + 1] {
        let mut apps: Vec<AppSpec> = (0..n).map(|i| app(&mut rng, &format!("app-{i:05}"))).collect();
        for a in &mut apps {
            *a = AppSpec {
                name: a.name.clone(),
                image: ImageRef::try_from("busybox").unwrap(),
                pull: PullPolicy::IfNotPresent,
                command: None,
                env: BTreeMap::new(),
                workdir: None,
                restart: RestartPolicy::Always,
                network: NetworkMode::Host,
                mounts: vec![],
                devices: vec![],
                resources: Resources::default(),
                liveness: None,
                readiness: None,
                startup: None,
                stop_grace: AppSpec::DEFAULT_STOP_GRACE,
                security: Security::default(),
            };
        }
        let s = DesiredState { apps, ..DesiredState::empty() };
        let mut counts = [0; 2];
        compare(&s, &mut counts);
        assert_eq!(counts[1], usize::from(n == MAX_APPS));
    }
}
