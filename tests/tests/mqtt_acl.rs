//! The broker's ACL confines a device to its own topics. MQTT 3.1.1 gives no
//! sign when a publish is denied (mosquitto acks it), so what gets through is
//! checked from the other end: each forbidden publish is followed by an
//! allowed one from the same client, and the broker keeps a client's order,
//! so once the allowed one has arrived the forbidden ones never will.

use anyhow::Result;
use rumqttc::QoS;
use skiff_common::protocol::{filter_all, topic, Channel, DeviceId};
use skiff_tests::mqtt::{wait_for, Broker};
use std::time::Duration;

const S5: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_device_can_neither_read_nor_write_another_devices_topics() -> Result<()> {
    let broker = Broker::start(&["dev-a", "dev-b"])?;
    let (a, b) = (DeviceId::try_from("dev-a")?, DeviceId::try_from("dev-b")?);

    let mut ctl = broker.controller("observer", true)?;
    ctl.connected(1).await?;
    ctl.client.subscribe("skiff/v1/#", QoS::AtLeastOnce).await?;
    wait_for(&mut ctl.subacks, |v| v.len() == 1, S5).await?;
    // Retained desired states for both; b's first.
    ctl.client.publish(topic(&b, Channel::Desired), QoS::AtLeastOnce, true, &b"for b"[..]).await?;
    ctl.client.publish(topic(&a, Channel::Desired), QoS::AtLeastOnce, true, &b"for a"[..]).await?;
    for _ in 0..2 {
        ctl.next_on("/desired", S5).await?;
    }

    // Device a, with its own certificate on the device listener, claiming b's
    // client id: the broker replaces it with a's name.
    let mut dev_a = broker.raw_client("dev-a", "dev-b", broker.device_port, true)?;
    dev_a.connected(1).await?;

    // Reading: b's desired state never reaches a, by name or by wildcard.
    for f in [topic(&b, Channel::Desired), filter_all(Channel::Desired), "skiff/v1/#".to_string()] {
        dev_a.client.subscribe(f, QoS::AtLeastOnce).await?;
    }
    wait_for(&mut dev_a.subacks, |v| v.len() == 3, S5).await?;
    // mosquitto grants these subscriptions and filters per message on delivery.
    eprintln!("SUBACK codes for a: {:?}", *dev_a.subacks.borrow());
    let seen = dev_a.drain(Duration::from_millis(500)).await;
    assert!(!seen.is_empty(), "a gets its own retained state");
    for p in &seen {
        assert_eq!(p.topic, topic(&a, Channel::Desired), "a read {}", p.topic);
        assert_eq!(&p.payload[..], b"for a");
    }

    // Writing: nothing a publishes on b's topics, or on its own desired, arrives.
    let forbidden = [
        topic(&b, Channel::Reported),
        topic(&b, Channel::Events),
        topic(&b, Channel::Online),
        topic(&b, Channel::Desired),
        topic(&a, Channel::Desired),
        "skiff/v1/elsewhere".to_string(),
    ];
    for t in &forbidden {
        dev_a.client.publish(t, QoS::AtLeastOnce, true, &b"forged"[..]).await?;
    }
    dev_a.client.publish(topic(&a, Channel::Reported), QoS::AtLeastOnce, false, &b"mine"[..]).await?;
    let mut arrived = Vec::new();
    loop {
        let p = ctl.next(S5).await?;
        let done = p.topic == topic(&a, Channel::Reported);
        arrived.push(p);
        if done {
            break;
        }
    }
    let leaked: Vec<_> = arrived.iter().filter(|p| &p.payload[..] == b"forged").map(|p| &p.topic).collect();
    assert!(leaked.is_empty(), "the ACL let through {leaked:?}");
    assert_eq!(&arrived.last().expect("own publish").payload[..], b"mine");

    // The retained states are untouched.
    let mut fresh = broker.controller("fresh", true)?;
    fresh.connected(1).await?;
    fresh.client.subscribe(filter_all(Channel::Desired), QoS::AtLeastOnce).await?;
    let mut retained: Vec<_> = fresh
        .drain(Duration::from_millis(500))
        .await
        .into_iter()
        .map(|p| (p.topic, p.payload.to_vec()))
        .collect();
    retained.sort();
    assert_eq!(
        retained,
        [(topic(&a, Channel::Desired), b"for a".to_vec()), (topic(&b, Channel::Desired), b"for b".to_vec())]
    );
    Ok(())
}
