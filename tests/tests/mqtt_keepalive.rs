//! A broker that freezes (socket open, nothing moving) is noticed through the
//! keepalive, and the link is back as soon as the path moves again.

use anyhow::Result;
use rumqttc::QoS;
use skiff_common::protocol::{decode_event, seal_desired, topic, Channel, DeviceId, EventKind, SigningKey};
use skiff_tests::mqtt::link::{self, Incoming};
use skiff_tests::mqtt::{controller_state, wait_for, Broker, FreezingProxy};
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_frozen_broker_is_detected_and_the_link_comes_back() -> Result<()> {
    let broker = Broker::start(&["pi-1"])?;
    let proxy = FreezingProxy::start(broker.device_port).await?;
    let dev = DeviceId::try_from("pi-1")?;
    let key = SigningKey::from_bytes(&rand::random());
    let mut cfg = broker.link_config("pi-1", key.verifying_key().to_bytes());
    cfg.broker = format!("mqtts://127.0.0.1:{}", proxy.port);
    assert_eq!(cfg.keepalive, Duration::from_secs(1));

    let (h, mut rx) = link::spawn(cfg, 0)?;
    let mut status = h.status();
    wait_for(&mut status, |s| s.connected, Duration::from_secs(5)).await?;

    proxy.freeze(true);
    let frozen_at = Instant::now();
    wait_for(&mut status, |s| !s.connected, Duration::from_secs(6)).await?;
    let detected = frozen_at.elapsed();
    let why = status.borrow().last_error.clone().unwrap_or_default();
    assert!(why.contains("pingreq"), "lost for another reason: {why}");
    // One keepalive to send the ping, one more to find it unanswered.
    assert!(detected < Duration::from_millis(3500), "took {detected:?}");
    // Events meanwhile wait in the ring.
    h.event(EventKind::Error, None, "while frozen");

    // Stays down while frozen: attempts through the proxy time out.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!status.borrow().connected);
    assert_eq!(status.borrow().connects, 1);

    let mut obs = broker.controller("observer", true)?;
    obs.connected(1).await?;
    obs.client.subscribe(topic(&dev, Channel::Events), QoS::AtLeastOnce).await?;
    wait_for(&mut obs.subacks, |v| v.len() == 1, Duration::from_secs(5)).await?;
    proxy.freeze(false);
    let thawed_at = Instant::now();
    wait_for(&mut status, |s| s.connected && s.connects == 2, Duration::from_secs(5)).await?;
    let back = thawed_at.elapsed();
    assert!(back < Duration::from_secs(3), "took {back:?} to reconnect");

    // And it works: the held event arrives, a new state gets through.
    let e = decode_event(&obs.next_on("/events", Duration::from_secs(5)).await?.payload)?;
    assert_eq!(e.detail, "while frozen");
    obs.client
        .publish(
            topic(&dev, Channel::Desired),
            QoS::AtLeastOnce,
            false,
            seal_desired(&key, &dev, &controller_state(3))?,
        )
        .await?;
    let Some(Incoming::Desired { state, persisted }) =
        tokio::time::timeout(Duration::from_secs(5), rx.recv()).await?
    else {
        panic!("link ended");
    };
    assert_eq!(state.generation, 3);
    let _ = persisted.send(Ok(()));
    // The old connection's last will ("0") came before the new "1".
    let mut fresh = broker.controller("fresh", true)?;
    fresh.connected(1).await?;
    fresh.client.subscribe(topic(&dev, Channel::Online), QoS::AtLeastOnce).await?;
    let online = fresh.next_on("/online", Duration::from_secs(5)).await?;
    assert_eq!((online.retain, &online.payload[..]), (true, &b"1"[..]));
    eprintln!("frozen broker detected in {detected:?}, reconnected {back:?} after the thaw");
    Ok(())
}
