//! `skiffctl events`: device events, through a persistent broker session.
//!
//! The session (client id `--client-id`, default `skiffctl-events`) keeps
//! the subscription between runs, so the broker queues events while skiffctl
//! is not running and each run prints what came since the last one. The first
//! run only creates the session. `--follow` keeps printing, reconnecting after
//! a lost connection, until interrupted.

use crate::mqtt::{BrokerArgs, Conn};
use crate::show::utc;
use anyhow::Result;
use clap::Args;
use rumqttc::{Event, Packet, Publish};
use skiff_common::protocol::{decode_event, filter_all, parse_topic, topic, Channel, DeviceId};
use std::time::Duration;

#[derive(Args)]
pub struct EventsArgs {
    /// Keep printing events as they arrive, until interrupted.
    #[arg(long)]
    follow: bool,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
    /// Only this device; repeat for several.
    #[arg(long = "device", value_name = "ID")]
    devices: Vec<String>,
    /// Client id of the broker session that remembers what was printed.
    #[arg(long, value_name = "ID", default_value = "skiffctl-events")]
    client_id: String,
    #[command(flatten)]
    broker: BrokerArgs,
}

pub async fn events(args: EventsArgs) -> Result<()> {
    let devices =
        args.devices.iter().map(|d| DeviceId::try_from(d.as_str())).collect::<Result<Vec<_>, _>>()?;
    let filters: Vec<String> = if devices.is_empty() {
        vec![filter_all(Channel::Events)]
    } else {
        devices.iter().map(|d| topic(d, Channel::Events)).collect()
    };
    let mut conn = Conn::connect(&args.broker, args.client_id.clone(), false).await?;
    for p in conn.collect(&filters).await? {
        print_event(&p, args.json);
    }
    if !args.follow {
        conn.close().await;
        return Ok(());
    }
    let mut delay = Duration::from_secs(1);
    loop {
        let polled = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            p = conn.poll() => p,
        };
        match polled {
            Ok(Event::Incoming(Packet::Publish(p))) => print_event(&p, args.json),
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                delay = Duration::from_secs(1);
                eprintln!("skiffctl: reconnected to {}", conn.url);
            }
            Ok(_) => {}
            Err(e) => {
                // The session keeps what arrives meanwhile; rumqttc reconnects on the next poll.
                eprintln!("skiffctl: {e:#}; retrying in {}s", delay.as_secs());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
    conn.close().await;
    Ok(())
}

fn print_event(p: &Publish, json: bool) {
    let Ok((device, Channel::Events)) = parse_topic(&p.topic) else {
        return;
    };
    let e = match decode_event(&p.payload) {
        Ok(e) => e,
        Err(err) => {
            eprintln!("skiffctl: {device}: unreadable event: {err}");
            return;
        }
    };
    if json {
        let v = serde_json::json!({
            "device": device.as_str(),
            "session": format!("{:016x}", e.session),
            "seq": e.seq,
            "dropped_before": e.dropped_before,
            "kind": e.kind.as_str(),
            "app": e.app.as_ref().map(|a| a.as_str()),
            "detail": e.detail,
            "unix": e.unix,
        });
        println!("{v}");
        return;
    }
    let when = if e.unix == 0 { "-".to_string() } else { utc(e.unix) };
    let app = e.app.map(|a| format!(" {a}")).unwrap_or_default();
    let dropped = if e.dropped_before > 0 {
        format!(" ({} earlier event(s) dropped)", e.dropped_before)
    } else {
        String::new()
    };
    println!("{when} {device} #{} {}{app}: {}{dropped}", e.seq, e.kind.as_str(), e.detail);
}
