//! Desired states over a real mosquitto: the link hands a verified state to
//! the daemon and acknowledges it only once persisted; everything it refuses
//! is acknowledged, reported as an event and never reaches the daemon.

use anyhow::{bail, Result};
use rumqttc::QoS;
use skiff_common::codec::{self, Kind};
use skiff_common::protocol::{
    decode_event, decode_reported, seal_desired, topic, Channel, DeviceId, EventKind, KeyId, Reported,
    SignedDesired, SigningKey, DESIRED_LIMIT, DESIRED_SCHEMA,
};
use skiff_common::Origin;
use skiff_tests::mqtt::link::{self, Incoming};
use skiff_tests::mqtt::{controller_state, wait_for, Broker, RawClient};
use std::time::Duration;
use tokio::sync::mpsc;

const S5: Duration = Duration::from_secs(5);

async fn next_desired(rx: &mut mpsc::Receiver<Incoming>, within: Duration) -> Result<Incoming> {
    match tokio::time::timeout(within, rx.recv()).await {
        Ok(Some(i)) => Ok(i),
        Ok(None) => bail!("link ended"),
        Err(_) => bail!("no desired state within {within:?}"),
    }
}

async fn connected(h: &link::LinkHandle) -> Result<()> {
    wait_for(&mut h.status(), |s| s.connected, S5).await
}

/// An observer subscribed to `channel` of `dev`, with its SUBACK in.
async fn observe(broker: &Broker, id: &str, dev: &DeviceId, channels: &[Channel]) -> Result<RawClient> {
    let mut c = broker.controller(id, true)?;
    c.connected(1).await?;
    for ch in channels {
        c.client.subscribe(topic(dev, *ch), QoS::AtLeastOnce).await?;
    }
    wait_for(&mut c.subacks, |v| v.len() == channels.len(), S5).await?;
    Ok(c)
}

#[tokio::test]
async fn a_signed_state_is_acknowledged_only_after_it_is_persisted() -> Result<()> {
    let broker = Broker::start(&["pi-1"])?;
    let key = SigningKey::from_bytes(&rand::random());
    let dev = DeviceId::try_from("pi-1")?;
    let cfg = broker.link_config("pi-1", key.verifying_key().to_bytes());
    let mut events = observe(&broker, "observer", &dev, &[Channel::Events]).await?;
    let mut ctl = broker.controller("ctl", true)?;
    ctl.connected(1).await?;

    let (h1, mut rx1) = link::spawn(cfg.clone(), 0)?;
    connected(&h1).await?;
    // Not retained: only the device's persistent session can bring it back.
    let payload = seal_desired(&key, &dev, &controller_state(10))?;
    ctl.client.publish(topic(&dev, Channel::Desired), QoS::AtLeastOnce, false, payload).await?;
    let Incoming::Desired { state, persisted } = next_desired(&mut rx1, S5).await?;
    assert_eq!((state.generation, state.origin), (10, Origin::Controller));
    assert_eq!(state.apps[0].name.as_str(), "web");

    // The daemon dies before the state is on flash: no answer, the agent goes.
    drop((persisted, h1, rx1));

    // The next agent gets it again from the broker, persists it this time.
    let (h2, mut rx2) = link::spawn(cfg.clone(), 0)?;
    let Incoming::Desired { state, persisted } = next_desired(&mut rx2, S5).await?;
    assert_eq!(state.generation, 10);
    persisted.send(Ok(())).expect("link waits for the answer");
    // The first agent may have said it could not persist; then the second accepts.
    let accepted = loop {
        let e = decode_event(&events.next_on("/events", S5).await?.payload)?;
        if e.kind == EventKind::Accepted {
            break e;
        }
        assert!(e.kind == EventKind::Error && e.detail.contains("not persisted"), "{e:?}");
    };
    assert!(accepted.detail.contains("generation 10"), "{accepted:?}");
    drop((h2, rx2));

    // Acknowledged: a third agent gets nothing.
    let (h3, mut rx3) = link::spawn(cfg, 10)?;
    connected(&h3).await?;
    assert!(next_desired(&mut rx3, Duration::from_secs(1)).await.is_err(), "redelivered after ack");
    Ok(())
}

#[tokio::test]
async fn refused_states_are_acknowledged_reported_and_never_applied() -> Result<()> {
    let broker = Broker::start(&["pi-1"])?;
    let key = SigningKey::from_bytes(&rand::random());
    let dev = DeviceId::try_from("pi-1")?;
    let cfg = broker.link_config("pi-1", key.verifying_key().to_bytes());
    let mut obs = observe(&broker, "observer", &dev, &[Channel::Events, Channel::Reported]).await?;
    let mut ctl = broker.controller("ctl", true)?;
    ctl.connected(1).await?;
    let (h, mut rx) = link::spawn(cfg.clone(), 0)?;
    connected(&h).await?;

    let forged = seal_desired(&SigningKey::from_bytes(&rand::random()), &dev, &controller_state(20))?;
    // The right key id, but a signature over something else.
    let sealed = seal_desired(&key, &dev, &controller_state(21))?;
    let mut tampered: SignedDesired =
        codec::decode(&sealed, Kind::SignedDesired, DESIRED_SCHEMA, DESIRED_LIMIT)?;
    let last = tampered.body.len() - 1;
    tampered.body[last] ^= 1;
    let tampered = codec::encode(Kind::SignedDesired, DESIRED_SCHEMA, &tampered)?;
    let oversized = codec::encode(
        Kind::SignedDesired,
        1,
        &SignedDesired {
            key_id: KeyId::of(&key.verifying_key()),
            body: vec![0; DESIRED_LIMIT + 1000],
            signature: vec![0; 64],
        },
    )?;
    let for_other = seal_desired(&key, &DeviceId::try_from("pi-2")?, &controller_state(22))?;
    let good = seal_desired(&key, &dev, &controller_state(5))?;
    let replay = seal_desired(&key, &dev, &controller_state(3))?;

    let desired = topic(&dev, Channel::Desired);
    let bad: [(&str, Vec<u8>); 5] = [
        ("forged", forged),
        ("tampered", tampered),
        ("garbage", b"definitely not an envelope".to_vec()),
        ("oversized", oversized),
        ("other device", for_other),
    ];
    for (_, payload) in &bad {
        ctl.client.publish(&desired, QoS::AtLeastOnce, false, payload.clone()).await?;
    }
    ctl.client.publish(&desired, QoS::AtLeastOnce, false, good).await?;
    let Incoming::Desired { state, persisted } = next_desired(&mut rx, S5).await?;
    assert_eq!(state.generation, 5, "only the good state reaches the daemon");
    persisted.send(Ok(())).expect("link waits");
    ctl.client.publish(&desired, QoS::AtLeastOnce, false, replay).await?;

    let mut kinds = Vec::new();
    while kinds.len() < 7 {
        let p = obs.next(S5).await?;
        if p.topic.ends_with("/events") {
            let e = decode_event(&p.payload)?;
            kinds.push((e.kind, e.detail));
        }
    }
    let expect = [
        "key",
        "signature does not verify",
        "not a skiff envelope",
        "over the limit",
        "addressed to device \"pi-2\"",
    ];
    for (i, (what, needle)) in bad.iter().map(|b| b.0).zip(expect).enumerate() {
        assert_eq!(kinds[i].0, EventKind::Rejected, "{what}: {kinds:?}");
        assert!(kinds[i].1.contains(needle), "{what}: {:?} lacks {needle:?}", kinds[i].1);
    }
    assert_eq!(kinds[5].0, EventKind::Accepted);
    assert_eq!(kinds[6].0, EventKind::Rejected);
    assert!(kinds[6].1.starts_with("generation 3: ") && kinds[6].1.contains("below 5"), "{:?}", kinds[6]);
    assert!(next_desired(&mut rx, Duration::from_millis(300)).await.is_err());

    // The last refusal travels in every reported state.
    h.report(Reported {
        device: dev.clone(),
        generation_applied: 5,
        origin: Origin::Controller,
        apps: vec![],
        agent_version: "test".into(),
        last_rejection: None,
        sent_unix: 0,
        pulls: Vec::new(),
        rollout: Default::default(),
    });
    let reported = decode_reported(&obs.next_on("/reported", S5).await?.payload)?;
    assert_eq!(reported.generation_applied, 5);
    assert_eq!(reported.last_rejection.expect("rejection").generation, Some(3));

    // All were acknowledged: a new agent on the same session gets nothing.
    drop((h, rx));
    let (h, mut rx) = link::spawn(cfg, 5)?;
    connected(&h).await?;
    assert!(next_desired(&mut rx, Duration::from_secs(1)).await.is_err());
    let late: Vec<_> = obs
        .drain(Duration::from_millis(300))
        .await
        .into_iter()
        .filter_map(|p| decode_event(&p.payload).ok())
        .filter(|e| e.kind == EventKind::Rejected)
        .collect();
    assert!(late.is_empty(), "redelivered and refused again: {late:?}");
    Ok(())
}

#[tokio::test]
async fn the_retained_state_is_applied_once_and_survives_reconnects() -> Result<()> {
    let broker = Broker::start(&["pi-1"])?;
    let key = SigningKey::from_bytes(&rand::random());
    let dev = DeviceId::try_from("pi-1")?;
    let cfg = broker.link_config("pi-1", key.verifying_key().to_bytes());
    let mut events = observe(&broker, "observer", &dev, &[Channel::Events, Channel::Online]).await?;
    let mut ctl = broker.controller("ctl", true)?;
    ctl.connected(1).await?;
    // Published before the device ever connected: retained.
    let payload = seal_desired(&key, &dev, &controller_state(7))?;
    ctl.client.publish(topic(&dev, Channel::Desired), QoS::AtLeastOnce, true, payload).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (h, mut rx) = link::spawn(cfg.clone(), 0)?;
    let Incoming::Desired { state, persisted } = next_desired(&mut rx, S5).await?;
    assert_eq!(state.generation, 7);
    persisted.send(Ok(())).expect("link waits");
    // Online went out retained.
    let online = events.next_on("/online", S5).await?;
    assert_eq!(&online.payload[..], b"1");
    // A restarted agent that kept generation 7 gets the retained copy again and
    // takes it silently as a duplicate (no event, nothing for the daemon).
    drop((h, rx));
    let offline = events.next_on("/online", S5).await?;
    assert_eq!(&offline.payload[..], b"0", "goodbye says offline");
    let (h, mut rx) = link::spawn(cfg, 7)?;
    connected(&h).await?;
    assert!(next_desired(&mut rx, Duration::from_secs(1)).await.is_err());
    let extra: Vec<_> = events
        .drain(Duration::from_millis(200))
        .await
        .into_iter()
        .filter(|p| p.topic.ends_with("/events"))
        .collect();
    assert!(extra
        .iter()
        .all(|p| decode_event(&p.payload).map(|e| e.kind != EventKind::Rejected).unwrap_or(true)));
    Ok(())
}

#[tokio::test]
async fn a_state_that_could_not_be_persisted_is_handed_over_again() -> Result<()> {
    let broker = Broker::start(&["pi-1"])?;
    let key = SigningKey::from_bytes(&rand::random());
    let dev = DeviceId::try_from("pi-1")?;
    let cfg = broker.link_config("pi-1", key.verifying_key().to_bytes());
    let mut events = observe(&broker, "observer", &dev, &[Channel::Events]).await?;
    let mut ctl = broker.controller("ctl", true)?;
    ctl.connected(1).await?;
    let (h, mut rx) = link::spawn(cfg.clone(), 0)?;
    connected(&h).await?;
    let payload = seal_desired(&key, &dev, &controller_state(4))?;
    ctl.client.publish(topic(&dev, Channel::Desired), QoS::AtLeastOnce, false, payload).await?;

    for attempt in 0..2 {
        let Incoming::Desired { state, persisted } = next_desired(&mut rx, S5).await?;
        assert_eq!(state.generation, 4, "attempt {attempt}");
        persisted.send(Err("No space left on device".into())).expect("link waits");
        let e = decode_event(&events.next_on("/events", S5).await?.payload)?;
        assert_eq!(e.kind, EventKind::Error);
        assert!(e.detail.contains("generation 4 not persisted: No space left on device"), "{e:?}");
    }
    let Incoming::Desired { state, persisted } = next_desired(&mut rx, S5).await?;
    assert_eq!(state.generation, 4);
    persisted.send(Ok(())).expect("link waits");
    let e = decode_event(&events.next_on("/events", S5).await?.payload)?;
    assert_eq!(e.kind, EventKind::Accepted);

    // Persisted once, acknowledged once: nothing comes back.
    drop((h, rx));
    let (h, mut rx) = link::spawn(cfg, 4)?;
    connected(&h).await?;
    assert!(next_desired(&mut rx, Duration::from_secs(1)).await.is_err());
    Ok(())
}
