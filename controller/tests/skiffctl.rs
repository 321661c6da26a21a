//! skiffctl, the real binary, against a real mosquitto and the agent's link:
//! keygen -> apply -> the device gets the signed state -> status -> events.

use anyhow::{ensure, Context, Result};
use rumqttc::QoS;
use skiff_common::protocol::{parse_public_key, topic, Channel, DeviceId, EventKind, Reported};
use skiff_common::{AppName, AppStatus, Health, Origin, Phase};
use skiff_tests::mqtt::link::{self, Incoming};
use skiff_tests::mqtt::{wait_for, Broker, CONTROLLER};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

const S5: Duration = Duration::from_secs(5);

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn skiffctl(args: &[&str]) -> Result<Out> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_skiffctl"))
        .args(args)
        .output()
        .await
        .context("run skiffctl")?;
    Ok(Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    })
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `--broker ... --ca ... --cert ... --tls-key ...` for the controller listener.
fn tls_args(b: &Broker) -> Vec<String> {
    vec![
        "--broker".into(),
        b.controller_url(),
        "--ca".into(),
        s(&b.ca()),
        "--cert".into(),
        s(&b.cert(CONTROLLER)),
        "--tls-key".into(),
        s(&b.key(CONTROLLER)),
    ]
}

async fn run(args: Vec<String>) -> Result<Out> {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    skiffctl(&refs).await
}

fn generation_of(stdout: &str) -> Result<u64> {
    let g = stdout
        .split_whitespace()
        .skip_while(|w| *w != "generation")
        .nth(1)
        .context("no generation in output")?;
    Ok(g.parse()?)
}

#[tokio::test]
async fn keygen_apply_status_events() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let keys = tmp.path().join("keys");
    let out = skiffctl(&["keygen", "--out", &s(&keys)]).await?;
    ensure!(out.ok, "keygen: {}", out.stderr);
    let secret = keys.join("controller.key");
    let mode = std::fs::metadata(&secret)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let public = parse_public_key(&std::fs::read_to_string(keys.join("controller.pub"))?)?;
    let again = skiffctl(&["keygen", "--out", &s(&keys)]).await?;
    assert!(!again.ok && again.stderr.contains("exists; use --force"), "{}", again.stderr);

    // An invalid file: every error with file:line:col, nothing published.
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[app]]\nname = \"Web\"\nimage = \"busybox\"\n\n[[app]]\nname = \"-db\"\nimage = \"busybox\"\n",
    )?;
    let out = skiffctl(&[
        "apply",
        "-f",
        &s(&bad),
        "--device",
        "pi-1",
        "--key",
        &s(&secret),
        "--broker",
        "mqtt://127.0.0.1:9",
    ])
    .await?;
    assert!(!out.ok);
    assert!(out.stderr.contains(&format!("{}:2:8: app[0].name:", bad.display())), "{}", out.stderr);
    assert!(out.stderr.contains(&format!("{}:6:8: app[1].name:", bad.display())), "{}", out.stderr);
    assert!(out.stderr.contains("2 error(s); nothing was published"), "{}", out.stderr);

    let broker = Broker::start(&["pi-1", "pi-2"])?;
    let (h, mut rx) = link::spawn(broker.link_config("pi-1", public.to_bytes()), 0)?;
    wait_for(&mut h.status(), |s| s.connected, S5).await?;

    let apps = tmp.path().join("apps.toml");
    std::fs::write(&apps, "[[app]]\nname = \"web\"\nimage = \"busybox:1\"\ncommand = [\"httpd\", \"-f\"]\n")?;
    let fleet = tmp.path().join("fleet.toml");
    std::fs::write(&fleet, "[group.line-1]\ndevices = [\"pi-1\", \"pi-2\"]\n")?;
    let mut apply = vec!["apply", "-f", &s(&apps), "--key", &s(&secret)]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    apply.extend(tls_args(&broker));
    let mut by_group = apply.clone();
    by_group.extend(["--group", "line-1", "--fleet"].map(String::from));
    by_group.push(s(&fleet));
    let out = run(by_group).await?;
    ensure!(out.ok, "apply: {}", out.stderr);
    assert!(
        out.stdout.contains("pi-1: generation") && out.stdout.contains("pi-2: generation"),
        "{}",
        out.stdout
    );
    let g1 = generation_of(&out.stdout)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    assert!(g1 >= now - 5 && g1 <= now + 1, "generation {g1} is not about the time {now}");

    // The device verifies and gets it.
    let Some(Incoming::Desired { state, persisted }) = tokio::time::timeout(S5, rx.recv()).await? else {
        panic!("link ended")
    };
    assert_eq!((state.generation, state.origin, state.apps.len()), (g1, Origin::Controller, 1));
    persisted.send(Ok(())).expect("link waits");
    h.report(Reported {
        device: DeviceId::try_from("pi-1")?,
        generation_applied: g1,
        origin: Origin::Controller,
        apps: vec![AppStatus {
            name: AppName::try_from("web")?,
            phase: Phase::Running,
            pid: Some(1234),
            restarts: 0,
            last_exit: None,
            live: Health::Passing,
            ready: Health::None,
            image: "busybox:1".into(),
            image_digest: None,
            error: None,
        }],
        agent_version: "test".into(),
        last_rejection: None,
        sent_unix: 0,
        pulls: Vec::new(),
        rollout: Default::default(),
    });

    // Status: retained messages only, read until the report is in.
    let mut status_json = tls_args(&broker);
    status_json.insert(0, "--json".into());
    status_json.insert(0, "status".into());
    let deadline = tokio::time::Instant::now() + S5;
    let devices = loop {
        let out = run(status_json.clone()).await?;
        ensure!(out.ok, "status: {}", out.stderr);
        let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
        if v[0]["applied_generation"].as_u64() == Some(g1) || tokio::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let pi1 = &devices[0];
    assert_eq!(pi1["device"], "pi-1");
    assert_eq!(pi1["online"], true);
    assert_eq!(
        (pi1["desired_generation"].as_u64(), pi1["applied_generation"].as_u64()),
        (Some(g1), Some(g1))
    );
    assert_eq!(pi1["apps"][0]["name"], "web");
    assert_eq!(pi1["apps"][0]["live"], "passing");
    assert!(pi1["last_seen_unix"].as_u64().is_some());
    let pi2 = &devices[1];
    assert_eq!((pi2["device"].as_str(), pi2["online"].is_null()), (Some("pi-2"), true));
    assert_eq!((pi2["desired_generation"].as_u64(), pi2["applied_generation"].as_u64()), (Some(g1), None));
    let mut human = tls_args(&broker);
    human.insert(0, "status".into());
    let out = run(human).await?;
    ensure!(out.ok, "status: {}", out.stderr);
    assert!(out.stdout.starts_with("DEVICE"), "{}", out.stdout);
    assert!(out.stdout.contains("pi-1/web  running  live=passing"), "{}", out.stdout);
    assert!(out.stdout.lines().any(|l| l.starts_with("pi-2") && l.contains("(pending)")), "{}", out.stdout);

    // A generation the devices already have is refused; the default grows.
    let mut same = apply.clone();
    same.extend(["--device", "pi-1", "--generation"].map(String::from));
    same.push(g1.to_string());
    let out = run(same).await?;
    assert!(!out.ok && out.stderr.contains(&format!("is not above {g1}")), "{}", out.stderr);
    let mut next = apply.clone();
    next.extend(["--device", "pi-1"].map(String::from));
    let out = run(next).await?;
    ensure!(out.ok, "apply: {}", out.stderr);
    let g2 = generation_of(&out.stdout)?;
    assert!(g2 > g1, "{g2} after {g1}");
    let Some(Incoming::Desired { state, persisted }) = tokio::time::timeout(S5, rx.recv()).await? else {
        panic!("link ended")
    };
    assert_eq!(state.generation, g2);
    persisted.send(Ok(())).expect("link waits");

    // Events: the first run makes the session; later runs print what came since.
    let mut events = tls_args(&broker);
    events.splice(0..0, ["events", "--client-id", "test-events"].map(String::from));
    let out = run(events.clone()).await?;
    ensure!(out.ok, "events: {}", out.stderr);
    let mut obs = broker.controller("observer", true)?;
    obs.connected(1).await?;
    obs.client.subscribe(topic(&DeviceId::try_from("pi-1")?, Channel::Events), QoS::AtLeastOnce).await?;
    wait_for(&mut obs.subacks, |v| v.len() == 1, S5).await?;
    h.event(EventKind::Exited, Some(AppName::try_from("web")?), "exit code 3");
    h.event(EventKind::OomKilled, Some(AppName::try_from("web")?), "memory limit 32 MiB");
    for _ in 0..2 {
        obs.next_on("/events", S5).await?;
    }
    let out = run(events.clone()).await?;
    ensure!(out.ok, "events: {}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    assert!(lines[0].contains("pi-1 #") && lines[0].contains("exited web: exit code 3"), "{}", lines[0]);
    assert!(lines[1].contains("oom-killed web: memory limit 32 MiB"), "{}", lines[1]);
    let out = run(events).await?;
    assert!(out.ok && out.stdout.is_empty(), "printed twice: {}", out.stdout);

    // Usage errors name the problem.
    let out = skiffctl(&["status", "--broker", "mqtts://127.0.0.1:1"]).await?;
    assert!(!out.ok && out.stderr.contains("--ca is needed"), "{}", out.stderr);
    let out = skiffctl(&["status", "--broker", "tcp://x"]).await?;
    assert!(!out.ok && out.stderr.contains("must start with mqtts://"), "{}", out.stderr);
    Ok(())
}
