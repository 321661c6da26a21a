//! Floods stay calm, end to end with the real agent, a real mosquitto (the
//! shipped config) and real containers: 500 refused states queued in the
//! device's persistent session while it is offline, then a valid one. After
//! the agent comes back, the valid state runs within seconds, and the 500
//! refusals cost a handful of log lines and `rejected` events whose counts
//! add up to exactly 500.

use rumqttc::QoS;
use serde_json::Value;
use skiff_common::protocol::{decode_event, seal_desired, topic, Channel, DeviceId, EventKind, SigningKey};
use skiff_tests::agent::{skiffctl_bin, wait_for, Sandbox};
use skiff_tests::mqtt::{controller_state, wait_for as watch_for, Broker, CONTROLLER};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const DEV: &str = "pi-1";
const FLOOD: usize = 500;
const SUFFIX: &str = " more like this not reported one by one)";

const APPS: &str = r#"
[[app]]
name = "web"
image = "busybox:1"
command = ["sleep", "3600"]
stop_grace = "1s"
"#;

fn skiffctl(broker: &Broker, args: &[&str]) -> Output {
    let out = Command::new(skiffctl_bin())
        .args(args)
        .arg("--broker")
        .arg(broker.controller_url())
        .arg("--ca")
        .arg(broker.ca())
        .arg("--cert")
        .arg(broker.cert(CONTROLLER))
        .arg("--tls-key")
        .arg(broker.key(CONTROLLER))
        .output()
        .expect("skiffctl runs");
    assert!(out.status.success(), "skiffctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// How many refusals one `rejected` event (or `last_rejection`) stands for:
/// itself plus the count it carries.
fn refusals_in(text: &str) -> u64 {
    match text.strip_suffix(SUFFIX).and_then(|t| t.rsplit_once(" (")) {
        Some((_, n)) => 1 + n.parse::<u64>().expect("count"),
        None => 1,
    }
}

#[test]
fn a_backlog_of_refused_states_stays_calm_and_the_valid_state_runs_promptly() {
    // The MQTT clients run on a runtime driven by a thread of its own, so they
    // keep talking to the broker while this thread waits on the agent.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let rt = runtime.handle().clone();
    std::thread::spawn(move || runtime.block_on(std::future::pending::<()>()));
    let _rt = rt.enter();
    let broker = Broker::start(&[DEV]).expect("mosquitto");
    let dev = DeviceId::try_from(DEV).unwrap();
    let keys = tempfile::tempdir().unwrap();
    let out = Command::new(skiffctl_bin()).arg("keygen").arg("--out").arg(keys.path()).output().unwrap();
    assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));

    let mut sb = Sandbox::new();
    let path = |p: std::path::PathBuf| p.display().to_string();
    sb.agent_args = vec![
        "--mqtt-broker".into(),
        broker.device_url(),
        "--device".into(),
        DEV.into(),
        "--controller-key".into(),
        path(keys.path().join("controller.pub")),
        "--mqtt-ca".into(),
        path(broker.ca()),
        "--mqtt-cert".into(),
        path(broker.cert(DEV)),
        "--mqtt-key".into(),
        path(broker.key(DEV)),
        "--mqtt-keepalive".into(),
        "2s".into(),
    ];
    // The first run makes the persistent session and its subscription.
    sb.start_agent();
    wait_for(Duration::from_secs(10), "the link up", || (sb.ps()["link"]["connected"] == true).then_some(()));
    let mut obs = broker.controller("observer", true).unwrap();
    rt.block_on(async {
        obs.connected(1).await?;
        obs.client.subscribe(topic(&dev, Channel::Events), QoS::AtLeastOnce).await?;
        watch_for(&mut obs.subacks, |v| v.len() == 1, Duration::from_secs(5)).await
    })
    .unwrap();
    sb.kill_agent();

    // Offline: 250 garbage payloads and 250 states signed with a stranger's
    // key, queued for the device; read back so they are all at the broker.
    let stranger = SigningKey::from_bytes(&rand::random());
    let desired = topic(&dev, Channel::Desired);
    let mut flood = broker.controller("flood", true).unwrap();
    rt.block_on(async {
        flood.connected(1).await?;
        flood.client.subscribe(&desired, QoS::AtLeastOnce).await?;
        watch_for(&mut flood.subacks, |v| v.len() == 1, Duration::from_secs(5)).await?;
        for i in 0..FLOOD {
            let payload = if i % 2 == 0 {
                format!("garbage number {i}").into_bytes()
            } else {
                seal_desired(&stranger, &dev, &controller_state(1000 + i as u64))?
            };
            flood.client.publish(&desired, QoS::AtLeastOnce, false, payload).await?;
        }
        for _ in 0..FLOOD {
            flood.next_on("/desired", Duration::from_secs(10)).await?;
        }
        anyhow::Ok(())
    })
    .unwrap();
    // Then the valid state, retained (and queued too).
    let apps = sb.dir.path().join("fleet-apps.toml");
    std::fs::write(&apps, APPS).unwrap();
    let key = keys.path().join("controller.key");
    skiffctl(
        &broker,
        &["apply", "-f", apps.to_str().unwrap(), "--device", DEV, "--key", key.to_str().unwrap()],
    );

    let back = Instant::now();
    sb.start_agent();
    sb.wait_app("web", Duration::from_secs(10), "running", |a| a["phase"] == "running" && a["pid"].is_i64());
    let took = back.elapsed();
    eprintln!("the valid state ran {took:?} after the agent started, behind {FLOOD} refused ones");

    // Every refusal is in an event or counted in one; the counts come within
    // one window (10 s) of the first.
    let mut rejected: Vec<String> = Vec::new();
    let mut accepted = 0;
    let end = Instant::now() + Duration::from_secs(30);
    while rejected.iter().map(|d| refusals_in(d)).sum::<u64>() < FLOOD as u64 {
        assert!(Instant::now() < end, "refusals accounted for: {rejected:#?}\n{}", sb.agent_log());
        let Ok(p) = rt.block_on(obs.next_on("/events", Duration::from_secs(1))) else { continue };
        let e = decode_event(&p.payload).unwrap();
        match e.kind {
            EventKind::Rejected => rejected.push(e.detail),
            EventKind::Accepted => accepted += 1,
            _ => {}
        }
    }
    // Nothing more comes.
    for p in rt.block_on(obs.drain(Duration::from_millis(500))) {
        let e = decode_event(&p.payload).unwrap();
        assert_ne!(e.kind, EventKind::Rejected, "{e:?}");
    }
    assert_eq!(rejected.iter().map(|d| refusals_in(d)).sum::<u64>(), FLOOD as u64, "{rejected:#?}");
    // Two classes (garbage, unknown key), each said once and counted once.
    assert_eq!(rejected.len(), 4, "{rejected:#?}");
    assert!(rejected.iter().filter(|d| d.contains("not a skiff envelope")).count() == 2, "{rejected:#?}");
    assert!(rejected.iter().filter(|d| d.contains("signed with key")).count() == 2, "{rejected:#?}");
    assert_eq!(accepted, 1);
    let log = sb.agent_log();
    let lines = log.lines().filter(|l| l.contains("desired state refused")).count();
    assert_eq!(lines, 4, "log lines for {FLOOD} refusals:\n{log}");

    // last_rejection carries the count too.
    let st = wait_for(Duration::from_secs(10), "status with the last rejection", || {
        let out = skiffctl(&broker, &["status", "--json", "--device", DEV]);
        let all: Value = serde_json::from_slice(&out.stdout).unwrap();
        let d = all.as_array()?.first()?.clone();
        d["last_rejection"]["reason"].as_str()?.ends_with(SUFFIX).then_some(d)
    });
    assert!(st["last_rejection"]["reason"].as_str().is_some_and(|r| refusals_in(r) > 1), "{st}");
    assert_eq!(st["applied_generation"], st["desired_generation"], "{st}");
    assert!(took < Duration::from_secs(10));
}
