//! `skiffctl status`: every device the broker holds retained messages for,
//! from its `desired`, `reported` and `online` topics. Read-only.
//!
//! Per device it shows the rollout columns too: the last good (committed)
//! generation, the one on test, and the last one that failed its test (with
//! the app and the reason below the table). An agent that reports a schema
//! before rollouts has no testing phase: its applied generation counts as
//! committed, and the table says so.

use crate::mqtt::{random_client_id, BrokerArgs, Conn};
use crate::show::{ago, table, unix_now, utc};
use anyhow::Result;
use clap::Args;
use serde::Serialize;
use skiff_common::protocol::{
    decode_reported, filter_all, parse_topic, peek_desired, Channel, DeviceId, Rejection,
};
use skiff_common::{AppStatus, Origin};
use std::collections::BTreeMap;

#[derive(Args)]
pub struct StatusArgs {
    /// Print JSON: an array with one object per device.
    #[arg(long)]
    json: bool,
    /// Only this device; repeat for several.
    #[arg(long = "device", value_name = "ID")]
    devices: Vec<String>,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// One device as the broker's retained messages show it.
#[derive(Debug, Default, Serialize)]
pub struct DeviceView {
    pub device: String,
    /// `None` when the device never said.
    pub online: Option<bool>,
    pub desired_generation: Option<u64>,
    pub desired_key_id: Option<String>,
    pub applied_generation: Option<u64>,
    pub origin: Option<Origin>,
    pub agent_version: Option<String>,
    /// The device's clock when it last reported (0/None: unknown).
    pub last_seen_unix: Option<u64>,
    pub apps: Vec<AppStatus>,
    /// The last good generation (the applied one for an agent before rollouts).
    pub committed_generation: Option<u64>,
    /// The generation on test, not yet committed.
    pub testing_generation: Option<u64>,
    /// The last generation that failed its test, why, and whether it was rolled back.
    pub failed: Option<skiff_common::RolloutFailure>,
    /// The reported payload's schema; below 3 the agent predates rollouts.
    pub reported_schema: Option<u8>,
    pub last_rejection: Option<Rejection>,
    /// Image pulls under way or failed on the device.
    pub pulls: Vec<skiff_common::PullStatus>,
    /// Payloads that did not decode.
    pub problems: Vec<String>,
}

pub async fn status(args: StatusArgs) -> Result<()> {
    let only = args.devices.iter().map(|d| DeviceId::try_from(d.as_str())).collect::<Result<Vec<_>, _>>()?;
    let mut conn = Conn::connect(&args.broker, random_client_id(), true).await?;
    let filters = [Channel::Desired, Channel::Reported, Channel::Online].map(filter_all);
    let messages = conn.collect(&filters).await?;
    conn.close().await;

    let mut devices: BTreeMap<DeviceId, DeviceView> = BTreeMap::new();
    for p in messages {
        let Ok((device, channel)) = parse_topic(&p.topic) else {
            continue;
        };
        if !only.is_empty() && !only.contains(&device) {
            continue;
        }
        let v = devices
            .entry(device.clone())
            .or_insert_with(|| DeviceView { device: device.to_string(), ..Default::default() });
        match channel {
            Channel::Online => match &p.payload[..] {
                b"1" => v.online = Some(true),
                b"0" => v.online = Some(false),
                other => v.problems.push(format!("online: unexpected payload {other:?}")),
            },
            Channel::Desired => match peek_desired(&p.payload) {
                Ok((key, body)) => {
                    v.desired_generation = Some(body.state.generation);
                    v.desired_key_id = Some(key.to_string());
                }
                Err(e) => v.problems.push(format!("desired: {e}")),
            },
            Channel::Reported => match decode_reported(&p.payload) {
                Ok(r) => {
                    // Byte 5 of the envelope header: its schema (decoded fine above).
                    v.reported_schema = p.payload.get(5).copied();
                    v.committed_generation = Some(r.rollout.committed);
                    v.testing_generation = r.rollout.testing;
                    v.failed = r.rollout.failed;
                    v.applied_generation = Some(r.generation_applied);
                    v.origin = Some(r.origin);
                    v.agent_version = Some(r.agent_version);
                    v.last_seen_unix = (r.sent_unix != 0).then_some(r.sent_unix);
                    v.apps = r.apps;
                    v.last_rejection = r.last_rejection;
                    v.pulls = r.pulls;
                }
                Err(e) => v.problems.push(format!("reported: {e}")),
            },
            Channel::Events => {}
        }
    }
    let views: Vec<DeviceView> = devices.into_values().collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&views)?);
    } else if views.is_empty() {
        println!("no devices (nothing retained under skiff/v1/)");
    } else {
        print!("{}", render(&views, unix_now()));
    }
    Ok(())
}

fn render(views: &[DeviceView], now: u64) -> String {
    let opt = |g: Option<u64>| g.map_or("-".to_string(), |g| g.to_string());
    let mut rows =
        vec![["DEVICE", "ONLINE", "DESIRED", "APPLIED", "COMMITTED", "TESTING", "FAILED", "SEEN", "APPS"]
            .map(String::from)
            .to_vec()];
    for v in views {
        let online = match v.online {
            Some(true) => "yes",
            Some(false) => "no",
            None => "?",
        };
        let pending = match (v.desired_generation, v.applied_generation) {
            (Some(d), a) if a.is_none_or(|a| d > a) => " (pending)",
            _ => "",
        };
        rows.push(vec![
            v.device.clone(),
            online.into(),
            format!("{}{pending}", opt(v.desired_generation)),
            opt(v.applied_generation),
            match (v.committed_generation, legacy(v)) {
                (Some(0), false) => "none".into(),
                (Some(c), true) => format!("{c} (untested)"),
                (c, _) => opt(c),
            },
            opt(v.testing_generation),
            v.failed.as_ref().map_or("-".into(), |f| {
                format!("{} ({})", f.generation, if f.rolled_back { "rolled back" } else { "running" })
            }),
            v.last_seen_unix.map_or("-".into(), |t| ago(t, now)),
            v.apps.len().to_string(),
        ]);
    }
    let mut out = table(&rows);
    for v in views {
        let mut lines = Vec::new();
        for a in &v.apps {
            let mut row = vec![
                format!("  {}/{}", v.device, a.name),
                serde_plain(&a.phase),
                format!("live={}", serde_plain(&a.live)),
                format!("ready={}", serde_plain(&a.ready)),
                format!("restarts={}", a.restarts),
                a.image.clone(),
            ];
            if let Some(e) = &a.error {
                row.push(format!("error: {e}"));
            }
            lines.push(row);
        }
        if !lines.is_empty() {
            out.push('\n');
            out.push_str(&table(&lines));
        }
        if let Some(f) = &v.failed {
            let app = f.app.as_ref().map_or(String::new(), |a| format!(" (app {a})"));
            let then = if f.rolled_back {
                format!("rolled back to generation {}", opt(v.committed_generation))
            } else {
                "not rolled back, it runs on".into()
            };
            out.push_str(&format!(
                "  {}: generation {} failed{app}: {}; {then}\n",
                v.device, f.generation, f.reason
            ));
        }
        if legacy(v) {
            out.push_str(&format!(
                "  {}: agent before rollouts (report schema {}): generations are not tested, each counts as committed once applied; it refuses schema-3 states (upgrade it)\n",
                v.device,
                v.reported_schema.unwrap_or(0)
            ));
        }
        if let Some(r) = &v.last_rejection {
            let g = r.generation.map_or(String::new(), |g| format!(" generation {g}"));
            out.push_str(&format!("  {}: last refused{g}: {}\n", v.device, r.reason));
        }
        for p in &v.pulls {
            let state = p.error.as_ref().map_or("pulling".to_string(), |e| format!("failed, retrying: {e}"));
            out.push_str(&format!(
                "  {}: pull {} {}/{} bytes, {state}\n",
                v.device, p.image, p.done, p.total
            ));
        }
        if let (Some(t), true) = (v.last_seen_unix, v.online == Some(false)) {
            out.push_str(&format!("  {}: offline, last report {}\n", v.device, utc(t)));
        }
        for p in &v.problems {
            out.push_str(&format!("  {}: unreadable {p}\n", v.device));
        }
    }
    out
}

/// An agent that reports a schema before rollouts (no testing phase).
fn legacy(v: &DeviceView) -> bool {
    v.reported_schema.is_some_and(|s| s < 3)
}

/// The kebab-case name serde gives a unit enum variant.
fn serde_plain<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_common::{AppName, Health, Phase};

    #[test]
    fn renders_devices_apps_and_refusals() {
        let app = AppStatus {
            name: AppName::try_from("web").unwrap(),
            phase: Phase::Running,
            pid: Some(7),
            restarts: 2,
            last_exit: None,
            live: Health::Passing,
            ready: Health::None,
            image: "busybox:1".into(),
            image_digest: None,
            error: None,
        };
        let views = [
            DeviceView {
                device: "pi-1".into(),
                online: Some(true),
                desired_generation: Some(9),
                applied_generation: Some(8),
                last_seen_unix: Some(1000),
                apps: vec![app],
                last_rejection: Some(Rejection::new(Some(7), "refused: bad")),
                ..Default::default()
            },
            DeviceView { device: "pi-2".into(), ..Default::default() },
            DeviceView {
                device: "pi-3".into(),
                desired_generation: Some(12),
                applied_generation: Some(12),
                committed_generation: Some(10),
                testing_generation: Some(12),
                failed: Some(skiff_common::RolloutFailure {
                    generation: 11,
                    app: Some(AppName::try_from("db").unwrap()),
                    reason: "exited with code 1 three times".into(),
                    rolled_back: true,
                }),
                reported_schema: Some(3),
                ..Default::default()
            },
            DeviceView {
                device: "pi-4".into(),
                applied_generation: Some(7),
                committed_generation: Some(7),
                reported_schema: Some(2),
                ..Default::default()
            },
        ];
        let out = render(&views, 1010);
        let header = out.lines().next().unwrap();
        assert_eq!(
            header,
            "DEVICE  ONLINE  DESIRED      APPLIED  COMMITTED     TESTING  FAILED            SEEN     APPS"
        );
        assert!(
            out.contains(
                "pi-1    yes     9 (pending)  8        -             -        -                 10s ago  1"
            ),
            "{out}"
        );
        assert!(out.contains("pi-2    ?       -"), "{out}");
        assert!(
            out.contains(
                "pi-3    ?       12           12       10            12       11 (rolled back)  -        0"
            ),
            "{out}"
        );
        assert!(out.contains("pi-4    ?       -            7        7 (untested)  -        -"), "{out}");
        assert!(
            out.contains("pi-3: generation 11 failed (app db): exited with code 1 three times; rolled back to generation 10"),
            "{out}"
        );
        assert!(out.contains("pi-4: agent before rollouts (report schema 2)"), "{out}");
        assert!(out.contains("pi-1/web  running  live=passing  ready=none  restarts=2  busybox:1"), "{out}");
        assert!(out.contains("pi-1: last refused generation 7: refused: bad"), "{out}");
    }
}
