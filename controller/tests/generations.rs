//! Generations cannot lock the controller out. Real mosquitto, the real
//! skiffctl binary and the agent's link (the daemon's part, persisting and
//! reporting, is played by the test): a device driven to the highest
//! generation refuses what a wrapping controller would send, is taken back
//! with `skiffctl apply --reset`, and a replay of that reset is refused once
//! the device has moved on.

use anyhow::{ensure, Context, Result};
use rumqttc::QoS;
use skiff_common::protocol::{
    decode_event, decode_reported, parse_public_key, peek_desired, topic, Channel, DeviceId, EventKind,
    Reported,
};
use skiff_common::validate::MAX_GENERATION;
use skiff_common::Origin;
use skiff_tests::mqtt::link::{self, Incoming};
use skiff_tests::mqtt::{wait_for, Broker, RawClient, CONTROLLER};
use std::path::Path;
use std::time::Duration;

const S5: Duration = Duration::from_secs(5);

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn skiffctl(args: &[String]) -> Result<Out> {
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

/// The state the device's link hands over: persisted, applied, reported
/// (retained, as the agent does), and seen on the broker before returning.
async fn take(
    rx: &mut tokio::sync::mpsc::Receiver<Incoming>,
    h: &link::LinkHandle,
    obs: &mut RawClient,
) -> Result<u64> {
    let Some(Incoming::Desired { state, persisted }) = tokio::time::timeout(S5, rx.recv()).await? else {
        anyhow::bail!("link ended")
    };
    persisted.send(Ok(())).expect("link waits");
    let g = state.generation;
    h.report(Reported {
        device: DeviceId::try_from("pi-1")?,
        generation_applied: g,
        origin: Origin::Controller,
        apps: vec![],
        agent_version: "test".into(),
        last_rejection: None,
        sent_unix: 0,
        pulls: Vec::new(),
        rollout: Default::default(),
    });
    loop {
        let r = decode_reported(&obs.next_on("/reported", S5).await?.payload)?;
        if r.generation_applied == g {
            return Ok(g);
        }
    }
}

#[tokio::test]
async fn a_device_at_the_highest_generation_is_taken_back_and_the_reset_cannot_be_replayed() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let keys = tmp.path().join("keys");
    let out = skiffctl(&["keygen".into(), "--out".into(), s(&keys)]).await?;
    ensure!(out.ok, "keygen: {}", out.stderr);
    let public = parse_public_key(&std::fs::read_to_string(keys.join("controller.pub"))?)?;
    let apps = tmp.path().join("apps.toml");
    std::fs::write(&apps, "[[app]]\nname = \"web\"\nimage = \"busybox:1\"\ncommand = [\"httpd\", \"-f\"]\n")?;

    let broker = Broker::start(&["pi-1"])?;
    let dev = DeviceId::try_from("pi-1")?;
    let mut obs = broker.controller("observer", true)?;
    obs.connected(1).await?;
    for ch in [Channel::Reported, Channel::Events] {
        obs.client.subscribe(topic(&dev, ch), QoS::AtLeastOnce).await?;
    }
    wait_for(&mut obs.subacks, |v| v.len() == 2, S5).await?;
    let (h, mut rx) = link::spawn(broker.link_config("pi-1", public.to_bytes()), 0)?;
    wait_for(&mut h.status(), |s| s.connected, S5).await?;

    let apply = |extra: &[&str]| {
        let mut a: Vec<String> =
            ["apply", "-f", &s(&apps), "--key", &s(&keys.join("controller.key"))].map(String::from).to_vec();
        a.extend([
            "--device".into(),
            "pi-1".into(),
            "--broker".into(),
            broker.controller_url(),
            "--ca".into(),
            s(&broker.ca()),
            "--cert".into(),
            s(&broker.cert(CONTROLLER)),
            "--tls-key".into(),
            s(&broker.key(CONTROLLER)),
        ]);
        a.extend(extra.iter().map(|e| e.to_string()));
        a
    };

    // Above the bound: refused by skiffctl, nothing published.
    let out = skiffctl(&apply(&["--generation", &(MAX_GENERATION + 1).to_string()])).await?;
    assert!(!out.ok, "{}", out.stdout);
    assert!(
        out.stderr.contains(&format!(
            "--generation {} is above the highest allowed, {MAX_GENERATION}",
            MAX_GENERATION + 1
        )),
        "{}",
        out.stderr
    );
    // Driven to the bound.
    let out = skiffctl(&apply(&["--generation", &MAX_GENERATION.to_string()])).await?;
    ensure!(out.ok, "apply: {}", out.stderr);
    assert_eq!(take(&mut rx, &h, &mut obs).await?, MAX_GENERATION);

    // The next ordinary apply cannot go above it, and does not wrap: it says how to get out.
    let out = skiffctl(&apply(&[])).await?;
    assert!(!out.ok, "{}", out.stdout);
    assert!(
        out.stderr.contains(&format!(
            "device pi-1 has generation {MAX_GENERATION}, at or above the highest allowed ({MAX_GENERATION}); take it back with `skiffctl apply --reset`"
        )),
        "{}",
        out.stderr
    );

    // The reset: the device goes back to about the current time.
    let out = skiffctl(&apply(&["--reset"])).await?;
    ensure!(out.ok, "apply --reset: {}", out.stderr);
    assert!(out.stdout.contains(&format!("a reset of generation {MAX_GENERATION}")), "{}", out.stdout);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let g_reset = take(&mut rx, &h, &mut obs).await?;
    assert!(g_reset >= now - 5 && g_reset <= now + 1, "reset to {g_reset}, now is {now}");
    // The reset as the broker keeps it (retained), for the replay below.
    let mut reader = broker.controller("reader", true)?;
    reader.connected(1).await?;
    reader.client.subscribe(topic(&dev, Channel::Desired), QoS::AtLeastOnce).await?;
    let reset_payload = reader.next_on("/desired", S5).await?.payload;
    let (_, body) = peek_desired(&reset_payload)?;
    assert_eq!((body.state.generation, body.replaces), (g_reset, Some(MAX_GENERATION)));
    drop(reader);

    // Ordinary applies work again.
    let out = skiffctl(&apply(&[])).await?;
    ensure!(out.ok, "apply: {}", out.stderr);
    let g_next = take(&mut rx, &h, &mut obs).await?;
    assert!(g_next > g_reset, "{g_next} after {g_reset}");

    // The recorded reset, replayed: refused, nothing reaches the daemon.
    let mut attacker = broker.controller("replayer", true)?;
    attacker.connected(1).await?;
    attacker.client.publish(topic(&dev, Channel::Desired), QoS::AtLeastOnce, false, reset_payload).await?;
    let rejected = loop {
        let e = decode_event(&obs.next_on("/events", S5).await?.payload)?;
        if e.kind == EventKind::Rejected {
            break e;
        }
    };
    assert_eq!(
        rejected.detail,
        format!(
            "generation {g_reset}: refused: a reset of generation {MAX_GENERATION} to {g_reset}, but this device has generation {g_next} (a replayed or out-of-date reset)"
        )
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv()).await.is_err(),
        "the replay got through"
    );
    Ok(())
}
