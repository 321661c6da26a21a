//! Events while the broker is away: held in the link's ring, delivered in
//! order once it is back, the oldest dropped and counted when the ring is full.

use anyhow::Result;
use rumqttc::QoS;
use skiff_common::protocol::{decode_event, topic, Channel, DeviceId, EventKind, SigningKey};
use skiff_common::AppName;
use skiff_tests::mqtt::link::{self, RING};
use skiff_tests::mqtt::{wait_for, Broker};
use std::time::Duration;

#[tokio::test]
async fn events_queued_offline_arrive_in_order_with_the_drop_count() -> Result<()> {
    let mut broker = Broker::start(&["pi-1"])?;
    let dev = DeviceId::try_from("pi-1")?;
    let key = SigningKey::from_bytes(&rand::random());
    // A persistent observer: its session and subscription survive the restart.
    let mut obs = broker.controller("observer", false)?;
    obs.connected(1).await?;
    obs.client.subscribe(topic(&dev, Channel::Events), QoS::AtLeastOnce).await?;
    wait_for(&mut obs.subacks, |v| v.len() == 1, Duration::from_secs(5)).await?;

    let (h, _rx) = link::spawn(broker.link_config("pi-1", key.verifying_key().to_bytes()), 0)?;
    let mut status = h.status();
    wait_for(&mut status, |s| s.connected, Duration::from_secs(5)).await?;
    let app = AppName::try_from("web")?;
    for i in 0..3 {
        h.event(EventKind::Exited, Some(app.clone()), format!("online {i}"));
    }
    for seq in 1..=3 {
        let e = decode_event(&obs.next_on("/events", Duration::from_secs(5)).await?.payload)?;
        assert_eq!((e.seq, e.dropped_before, e.kind), (seq, 0, EventKind::Exited));
    }

    // Let the link read the PUBACKs: a broker that dies with unread bytes
    // resets the connection, and acks still in the socket are lost (the link
    // would then count those events among the dropped, which is the safe side).
    tokio::time::sleep(Duration::from_millis(200)).await;
    broker.stop();
    wait_for(&mut status, |s| !s.connected, Duration::from_secs(5)).await?;
    let extra = 20;
    for i in 0..RING + extra {
        h.event(EventKind::ProbeFailed, Some(app.clone()), format!("offline {i}"));
    }
    broker.restart()?;

    let first_kept = 3 + extra as u64 + 1;
    let last = 3 + (RING + extra) as u64;
    let mut got = Vec::new();
    while got.last().map(|e: &skiff_common::protocol::Event| e.seq) != Some(last) {
        let p = obs.next_on("/events", Duration::from_secs(10)).await?;
        got.push(decode_event(&p.payload)?);
    }
    // At least once: a resend after a reconnect may repeat, never reorder.
    got.dedup_by_key(|e| e.seq);
    let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (first_kept..=last).collect::<Vec<_>>());
    assert_eq!(got[0].dropped_before, extra as u64, "the oldest {extra} were dropped");
    assert_eq!(got[0].detail, format!("offline {extra}"));
    assert!(got[1..].iter().all(|e| e.dropped_before == 0));
    assert!(got.iter().all(|e| e.session == got[0].session && e.app.as_ref() == Some(&app)));
    Ok(())
}
