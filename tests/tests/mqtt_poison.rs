//! No poison message, with the shipped mosquitto config: whatever the broker
//! accepts, every skiff client can read (and refuse), so no retained or
//! queued message can cut a device or skiffctl off for good; and no device
//! certificate can take another device's client id on any listener.

use anyhow::{ensure, Result};
use rumqttc::QoS;
use skiff_common::codec::HEADER_LEN;
use skiff_common::protocol::{
    decode_event, seal_desired, topic, Channel, DeviceId, EventKind, SigningKey, DESIRED_LIMIT, PACKET_LIMIT,
};
use skiff_tests::agent::skiffctl_bin;
use skiff_tests::mqtt::link::{self, Incoming};
use skiff_tests::mqtt::{controller_state, wait_for, Broker, CONTROLLER};
use std::process::{Command, Output};
use std::time::Duration;

const S5: Duration = Duration::from_secs(5);

/// Bytes of a QoS 1 PUBLISH around its payload: fixed header (1 + up to 4
/// bytes of remaining length), topic length and topic, packet id.
fn publish_overhead(topic: &str) -> usize {
    1 + 4 + 2 + topic.len() + 2
}

/// Runs skiffctl on a blocking thread: the link under test shares this
/// runtime and must keep answering the broker meanwhile.
async fn skiffctl(broker: &Broker, args: &[&str]) -> Output {
    let mut tail: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
    tail.extend([
        "--broker".into(),
        broker.controller_url().into(),
        "--ca".into(),
        broker.ca().into(),
        "--cert".into(),
        broker.cert(CONTROLLER).into(),
        "--tls-key".into(),
        broker.key(CONTROLLER).into(),
    ]);
    // skiffctl_bin() may build it first: also off the runtime.
    let run = move || Command::new(skiffctl_bin()).args(tail).output().expect("skiffctl runs");
    tokio::task::spawn_blocking(run).await.expect("joined")
}

#[tokio::test]
async fn whatever_the_broker_accepts_the_device_and_skiffctl_can_read() -> Result<()> {
    let broker = Broker::start(&["pi-1"])?;
    let dev = DeviceId::try_from("pi-1")?;
    let desired = topic(&dev, Channel::Desired);
    let events_topic = topic(&dev, Channel::Events);

    // The shipped limit sits between the largest packet the protocol needs
    // and the largest one the clients read.
    let limit: usize = broker.config_value("max_packet_size").expect("max_packet_size is set").parse()?;
    let largest_needed = HEADER_LEN + DESIRED_LIMIT + publish_overhead("skiff/v1/") + 63 + "/reported".len();
    assert!(
        limit >= largest_needed,
        "max_packet_size {limit} refuses legitimate packets of {largest_needed}"
    );
    assert!(limit <= PACKET_LIMIT, "max_packet_size {limit} admits packets the clients cannot read");

    let key = SigningKey::from_bytes(&rand::random());
    let (h, mut rx) = link::spawn(broker.link_config("pi-1", key.verifying_key().to_bytes()), 0)?;
    let mut status = h.status();
    wait_for(&mut status, |s| s.connected, S5).await?;
    // skiffctl's events session exists before anything is published.
    let first = skiffctl(&broker, &["events", "--json", "--client-id", "ops"]).await;
    assert!(first.status.success(), "events: {}", String::from_utf8_lossy(&first.stderr));
    let mut obs = broker.controller("observer", true)?;
    obs.connected(1).await?;
    obs.client.subscribe(&events_topic, QoS::AtLeastOnce).await?;
    wait_for(&mut obs.subacks, |v| v.len() == 1, S5).await?;

    // Over the broker's limit: refused, its sender disconnected, nothing retained.
    let mut big = broker.controller("big", true)?;
    big.connected(1).await?;
    big.client.publish(&desired, QoS::AtLeastOnce, true, vec![0x5a; limit]).await?;
    big.connected(2).await?;
    let mut fresh = broker.controller("fresh", true)?;
    fresh.connected(1).await?;
    fresh.client.subscribe(&desired, QoS::AtLeastOnce).await?;
    let retained = fresh.drain(Duration::from_millis(500)).await;
    assert!(retained.is_empty(), "the broker kept a packet over its limit");

    // Just under it: stored and delivered; the device reads it, refuses it,
    // acknowledges it and stays connected.
    let poison = vec![0x5a; limit - publish_overhead(&desired)];
    big.client.publish(&desired, QoS::AtLeastOnce, true, poison.clone()).await?;
    let rejected = decode_event(&obs.next_on("/events", S5).await?.payload)?;
    assert_eq!(rejected.kind, EventKind::Rejected, "{rejected:?}");
    assert!(rejected.detail.contains("not a skiff envelope"), "{rejected:?}");

    // skiffctl reads the same retained message: a problem, not a failure.
    let out = skiffctl(&broker, &["status", "--json"]).await;
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let pi = all.as_array().and_then(|a| a.iter().find(|d| d["device"] == "pi-1")).expect("pi-1 listed");
    let problems = pi["problems"].as_array().expect("problems");
    assert!(problems.iter().any(|p| p.as_str().is_some_and(|p| p.starts_with("desired: "))), "{pi}");
    // And a near-limit event in its persistent session.
    big.client.publish(&events_topic, QoS::AtLeastOnce, false, poison).await?;
    obs.next_on("/events", S5).await?;
    let out = skiffctl(&broker, &["events", "--json", "--client-id", "ops"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "events: {stderr}");
    assert!(stderr.contains("pi-1: unreadable event"), "{stderr}");

    // The next valid state is applied, on the same connection.
    let good = seal_desired(&key, &dev, &controller_state(5))?;
    big.client.publish(&desired, QoS::AtLeastOnce, true, good).await?;
    let Incoming::Desired { state, persisted } =
        tokio::time::timeout(S5, rx.recv()).await?.expect("link runs");
    assert_eq!(state.generation, 5);
    persisted.send(Ok(())).expect("link waits");
    let accepted = decode_event(&obs.next_on("/events", S5).await?.payload)?;
    assert_eq!(accepted.kind, EventKind::Accepted, "{accepted:?}");
    let st = status.borrow().clone();
    ensure!(st.connected && st.connects == 1, "the device lost its connection: {st:?}\n{}", broker.log());
    Ok(())
}

#[tokio::test]
async fn a_device_certificate_cannot_take_another_devices_client_id() -> Result<()> {
    let broker = Broker::start(&["dev-a", "dev-b"])?;
    let mut b = broker.raw_client("dev-b", "dev-b", broker.device_port, false)?;
    b.connected(1).await?;

    // Device a's certificate on the controller listener: not admitted at all.
    let on_ctl = broker.raw_client("dev-a", "dev-b", broker.controller_port, true)?;
    // On the device listener: admitted, but its client id becomes "dev-a".
    let mut on_dev = broker.raw_client("dev-a", "dev-b", broker.device_port, true)?;
    on_dev.connected(1).await?;
    // Each retries every 50 ms: time enough for many takeovers.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(*on_ctl.connects.borrow(), 0, "a device certificate connected to the controller listener");
    assert_eq!(*b.connects.borrow(), 1, "dev-b was kicked off: {}", broker.log());
    assert_eq!(*on_dev.connects.borrow(), 1, "dev-a's connection was not stable");
    // dev-b still talks: its own publish comes back to it.
    let own = topic(&DeviceId::try_from("dev-b")?, Channel::Reported);
    let mut ctl = broker.controller("observer", true)?;
    ctl.connected(1).await?;
    ctl.client.subscribe(&own, QoS::AtLeastOnce).await?;
    wait_for(&mut ctl.subacks, |v| v.len() == 1, S5).await?;
    b.client.publish(&own, QoS::AtLeastOnce, false, &b"alive"[..]).await?;
    assert_eq!(&ctl.next_on("/reported", S5).await?.payload[..], b"alive");
    Ok(())
}
