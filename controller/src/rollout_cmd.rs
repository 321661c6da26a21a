//! `skiffctl rollout`: the I/O around `rollout::Planner`. It subscribes to
//! the group's `desired` and `reported` topics, feeds every message to the
//! planner, and carries out what it returns: sign and publish, print, wait.
//! Every decision is the planner's; this file keeps nothing across runs.

use crate::apply::read_state;
use crate::fleet;
use crate::keys;
use crate::localfile;
use crate::mqtt::{random_client_id, BrokerArgs, Conn};
use crate::resolve::{pin_images, ResolveArgs};
use crate::rollout::{self, Action, Outcome, Planner, Progress, Row, Verdict};
use crate::show::{table, unix_now};
use crate::ConfigError;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use rumqttc::{Event, Packet, Publish, QoS};
use serde_json::json;
use skiff_common::codec::{self, Kind};
use skiff_common::protocol::{
    decode_reported, parse_topic, peek_desired, seal_desired_body, topic, Channel, DesiredBody, DeviceId,
    KeyId, REPORTED_LIMIT, REPORTED_SCHEMA,
};
use skiff_common::quantity::{format_duration, parse_duration};
use skiff_common::validate::check_rollout;
use skiff_common::{DesiredState, Origin};
use std::path::PathBuf;
use std::time::Duration;
use tokio::time::{sleep_until, Instant};

/// Exit code: a device of the wave failed its test, rolled back or refused the state.
pub const EXIT_FAILED: u8 = 4;
/// Exit code: the wave did not commit within `--wave-timeout`.
pub const EXIT_TIMED_OUT: u8 = 5;

/// Added to the state's `rollout.deadline` for the default wave timeout:
/// delivery to devices that were briefly offline, and the report back.
const TIMEOUT_MARGIN: Duration = Duration::from_secs(120);

#[derive(Args)]
pub struct RolloutArgs {
    /// The desired state to roll out (an apps.toml). With --resume it may be
    /// left out: the state the first device of the group was sent is taken.
    #[arg(short = 'f', long = "file", value_name = "APPS_TOML", required_unless_present = "resume")]
    file: Option<PathBuf>,
    /// The group of --fleet to roll out to; its devices sorted by id make the waves.
    #[arg(long, value_name = "NAME")]
    group: String,
    /// The fleet file defining groups.
    #[arg(long, value_name = "FLEET_TOML")]
    fleet: PathBuf,
    /// Cumulative wave sizes: a device count (`1`) or a percentage of the
    /// group rounded up (`10%`); each reaches more devices than the one
    /// before; `100%` is the whole group. Example: 1,10%,100%.
    #[arg(long, value_name = "SIZES")]
    waves: String,
    /// Overrides the state's `[rollout] stable`: how long every app must run
    /// ready, with no restart, before a device commits (e.g. 2m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    stable: Option<Duration>,
    /// How long a wave may take to commit before the rollout stops (default:
    /// the state's `[rollout] deadline` plus 2m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    wave_timeout: Option<Duration>,
    /// When a device of a wave fails, send every device of that wave its
    /// previous desired state again, under a new, higher generation.
    #[arg(long)]
    abort_on_failure: bool,
    /// Continue a rollout an earlier run started: refuses to start a new one
    /// (some device of the group must have the state already).
    #[arg(long)]
    resume: bool,
    /// Print JSON lines: one per event, the last one the summary.
    #[arg(long)]
    json: bool,
    /// The controller's secret key (controller.key from `skiffctl keygen`).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    resolve: ResolveArgs,
}

/// The rollout stopped in a wave; the summary is printed already.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Stopped {
    pub code: u8,
    message: String,
}

pub async fn rollout(args: RolloutArgs) -> Result<()> {
    let spec = rollout::parse_waves(&args.waves).map_err(ConfigError::from)?;
    let fleet_text = localfile::read_to_string(&args.fleet, localfile::FLEET_LIMIT)?;
    let devices = fleet::group_devices(&fleet_text, &args.group)
        .map_err(|e| ConfigError(format!("{}: {e}", args.fleet.display())))?;
    let waves = spec.resolve(devices.len()).map_err(ConfigError::from)?;
    let key = keys::read_secret(&args.key)?;
    let key_id = KeyId::of(&key.verifying_key());
    let mut target = match &args.file {
        Some(f) => {
            let mut s = read_state(f)?;
            if let Some(stable) = args.stable {
                s.rollout.stable = stable;
                let mut bad = None;
                check_rollout(&s.rollout, &mut |field, m| {
                    bad.get_or_insert(format!("--stable {}: rollout.{field} {m}", format_duration(stable)));
                });
                if let Some(b) = bad {
                    return Err(ConfigError(b).into());
                }
            }
            for p in pin_images(&args.resolve, &mut s).await? {
                say(
                    args.json,
                    &format!("app {}: {} pinned as {}", p.app, p.from, p.to),
                    json!({
                        "event": "pinned", "app": p.app.to_string(), "from": p.from.to_string(), "to": p.to.to_string()
                    }),
                );
            }
            Some(s)
        }
        None => None,
    };

    let mut conn = Conn::connect(&args.broker, random_client_id(), true).await?;
    let filters: Vec<String> =
        devices.iter().flat_map(|d| [topic(d, Channel::Desired), topic(d, Channel::Reported)]).collect();
    let retained = conn.collect(&filters).await?;
    let mut desired_seen: Vec<(DeviceId, KeyId, DesiredBody)> = Vec::new();
    for p in &retained {
        if let Ok((d, Channel::Desired)) = parse_topic(&p.topic) {
            if let Ok((k, b)) = peek_desired(&p.payload) {
                desired_seen.push((d, k, b));
            }
        }
    }
    if args.resume {
        target = Some(resume_target(target, &devices[0], &desired_seen, &key_id, &args.group)?);
    }
    let mut target = target.expect("a file or --resume");
    target.generation = 0;
    target.origin = Origin::Controller;
    let timeout = args.wave_timeout.unwrap_or(target.rollout.deadline + TIMEOUT_MARGIN);
    let mut planner = Planner::new(devices.clone(), waves.clone(), target, timeout, args.abort_on_failure);
    for p in &retained {
        feed(&mut planner, p);
    }
    if !args.json {
        println!(
            "rolling out to group {} ({} device(s)) in {} wave(s), wave timeout {}",
            args.group,
            devices.len(),
            waves.len(),
            format_duration(timeout)
        );
    }

    let mut echoes: Vec<(String, Vec<u8>)> = Vec::new();
    let mut echo_deadline: Option<Instant> = None;
    let mut wait = None;
    loop {
        for action in planner.step(Instant::now(), unix_now())? {
            match action {
                Action::Wait { until } => wait = Some(until),
                Action::Send { device, state, rollback } => {
                    let generation = state.generation;
                    let body = DesiredBody { device: device.clone(), state, replaces: None };
                    let payload = seal_desired_body(&key, &body)
                        .with_context(|| format!("cannot sign for {device}"))?;
                    let t = topic(&device, Channel::Desired);
                    conn.client.publish(t.clone(), QoS::AtLeastOnce, true, payload.clone()).await?;
                    echoes.push((t, payload));
                    echo_deadline.get_or_insert(Instant::now() + conn.timeout);
                    let text = if rollback {
                        format!("{device}: previous state sent again as generation {generation} (rollback)")
                    } else {
                        format!("{device}: generation {generation} sent (signed by key {key_id})")
                    };
                    say(
                        args.json,
                        &text,
                        json!({
                            "event": "sent", "device": device.to_string(), "generation": generation, "rollback": rollback
                        }),
                    );
                }
                Action::WaveStarted { wave, devices } => {
                    let names: Vec<_> = devices.iter().map(|d| d.as_str()).collect();
                    say(
                        args.json,
                        &format!(
                            "wave {wave}/{}: {} ({} device(s))",
                            waves.len(),
                            names.join(", "),
                            names.len()
                        ),
                        json!({"event": "wave-started", "wave": wave, "waves": waves.len(), "devices": names}),
                    );
                }
                Action::Progress { device, progress } => {
                    let mut j = row_json(&Row {
                        device: device.clone(),
                        wave: 0,
                        progress: progress.clone(),
                        legacy: false,
                    });
                    j["event"] = json!("progress");
                    j.as_object_mut().expect("object").remove("wave");
                    // A person saw "sent" already; machines get every step.
                    if args.json || !matches!(progress, Progress::Pending { .. }) {
                        say(args.json, &progress_line(&device, &progress), j);
                    }
                }
                Action::WaveDone { wave } => say(
                    args.json,
                    &format!("wave {wave}/{} committed", waves.len()),
                    json!({"event": "wave-done", "wave": wave, "waves": waves.len()}),
                ),
                Action::Done(outcome) => {
                    // Rollback states must be on the broker before we go.
                    wait_for_echoes(&mut conn, &mut echoes).await?;
                    conn.close().await;
                    return finish(&outcome, args.json);
                }
            }
        }
        let until = match (wait, echo_deadline.filter(|_| !echoes.is_empty())) {
            (Some(w), Some(e)) => w.min(e),
            (w, e) => w.or(e).ok_or_else(|| anyhow!("rollout planner neither waits nor ends"))?,
        };
        tokio::select! {
            event = conn.poll() => {
                if let Event::Incoming(Packet::Publish(p)) = event? {
                    echoes.retain(|(t, b)| !(p.topic == *t && p.payload[..] == b[..]));
                    if echoes.is_empty() {
                        echo_deadline = None;
                    }
                    feed(&mut planner, &p);
                }
            }
            _ = sleep_until(until) => {
                if !echoes.is_empty() && echo_deadline.is_some_and(|e| Instant::now() >= e) {
                    bail!(no_echo(&conn, &echoes));
                }
            }
        }
    }
}

/// The state to continue with: the one in the file (which some device must
/// have already), or the one the first device of the group was sent.
fn resume_target(
    file: Option<DesiredState>,
    first: &DeviceId,
    seen: &[(DeviceId, KeyId, DesiredBody)],
    key_id: &KeyId,
    group: &str,
) -> Result<DesiredState> {
    match file {
        Some(s) => {
            if !seen.iter().any(|(_, _, b)| rollout::same_content(&b.state, &s)) {
                return Err(ConfigError(format!(
                    "--resume: no device of group {group} has this state yet; nothing to resume (leave out --resume to start the rollout)"
                ))
                .into());
            }
            Ok(s)
        }
        None => {
            let Some((_, k, b)) = seen.iter().find(|(d, _, _)| d == first) else {
                return Err(ConfigError(format!(
                    "--resume: {first}, the first device of group {group}, has no desired state on the broker; nothing to resume"
                ))
                .into());
            };
            if k != key_id {
                return Err(ConfigError(format!(
                    "--resume: the state of {first} is signed by key {k}, not by this key ({key_id}); give the state with -f"
                ))
                .into());
            }
            Ok(b.state.clone())
        }
    }
}

fn feed(planner: &mut Planner, p: &Publish) {
    let Ok((device, channel)) = parse_topic(&p.topic) else { return };
    match channel {
        Channel::Desired => {
            let body = peek_desired(&p.payload).ok().map(|(_, b)| b).filter(|b| b.device == device);
            planner.desired(&device, body);
        }
        Channel::Reported => {
            let schema =
                codec::open(&p.payload, Kind::Reported, 1..=REPORTED_SCHEMA, REPORTED_LIMIT).map(|(s, _)| s);
            if let (Ok(r), Ok(schema)) = (decode_reported(&p.payload), schema) {
                if r.device == device {
                    planner.reported(&device, r, schema);
                }
            }
        }
        _ => {}
    }
}

async fn wait_for_echoes(conn: &mut Conn, echoes: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
    let deadline = Instant::now() + conn.timeout;
    while !echoes.is_empty() {
        let event = tokio::time::timeout_at(deadline, conn.poll())
            .await
            .map_err(|_| anyhow!(no_echo(conn, echoes)))??;
        if let Event::Incoming(Packet::Publish(p)) = event {
            echoes.retain(|(t, b)| !(p.topic == *t && p.payload[..] == b[..]));
        }
    }
    Ok(())
}

fn no_echo(conn: &Conn, echoes: &[(String, Vec<u8>)]) -> String {
    let topics: Vec<_> = echoes.iter().map(|e| e.0.as_str()).collect();
    format!(
        "{} did not deliver {} back within {}s: is publishing there allowed for this client (ACL)?",
        conn.url,
        topics.join(", "),
        conn.timeout.as_secs()
    )
}

fn say(json: bool, text: &str, value: serde_json::Value) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

fn progress_line(device: &DeviceId, p: &Progress) -> String {
    match p {
        Progress::NotSent => format!("{device}: not sent"),
        Progress::Pending { generation } => format!("{device}: generation {generation} not taken yet"),
        Progress::Testing { generation } => format!("{device}: testing generation {generation}"),
        Progress::Committed { generation, legacy: false } => format!("{device}: committed generation {generation}"),
        Progress::Committed { generation, legacy: true } => format!(
            "{device}: applied generation {generation} (an agent before rollouts: committed at once, not tested)"
        ),
        Progress::Failed { .. } | Progress::Refused { .. } => format!("{device}: {}", detail(p)),
    }
}

/// What went wrong, for a person; empty when nothing did.
fn detail(p: &Progress) -> String {
    match p {
        Progress::Failed { generation, failure } => {
            let app = failure.app.as_ref().map_or(String::new(), |a| format!(" (app {a})"));
            let what = if failure.rolled_back { "rolled back" } else { "failed, still running it" };
            format!("generation {generation} {what}{app}: {}", failure.reason)
        }
        Progress::Refused { generation, reason } => format!("refused generation {generation}: {reason}"),
        _ => String::new(),
    }
}

fn row_json(r: &Row) -> serde_json::Value {
    let (app, reason, rolled_back) = match &r.progress {
        Progress::Failed { failure, .. } => (
            failure.app.as_ref().map(|a| a.to_string()),
            Some(failure.reason.clone()),
            Some(failure.rolled_back),
        ),
        Progress::Refused { reason, .. } => (None, Some(reason.clone()), None),
        _ => (None, None, None),
    };
    json!({
        "device": r.device.to_string(),
        "wave": r.wave,
        "state": r.progress.word(),
        "generation": r.progress.generation(),
        "legacy": r.legacy || matches!(r.progress, Progress::Committed { legacy: true, .. }),
        "app": app,
        "reason": reason,
        "rolled_back": rolled_back,
    })
}

/// Prints the summary; a stopped rollout becomes a `Stopped` error.
fn finish(o: &Outcome, json_out: bool) -> Result<()> {
    let verdict = match o.verdict {
        Verdict::Committed => "committed",
        Verdict::Failed => "failed",
        Verdict::TimedOut => "timed-out",
    };
    if json_out {
        let abort = o.abort.as_ref().map(|a| {
            json!({
                "generation": a.generation,
                "resent": a.resent.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
                "unknown": a.unknown.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            })
        });
        println!(
            "{}",
            json!({
                "event": "done", "result": verdict, "wave": o.wave, "waves": o.waves,
                "generation": o.generation, "devices": o.rows.iter().map(row_json).collect::<Vec<_>>(),
                "abort": abort,
            })
        );
    } else {
        print!("{}", render_summary(o));
    }
    // Failed: the devices that failed; timed out: every one not committed.
    let bad: Vec<String> = o
        .rows
        .iter()
        .filter(|r| r.wave == o.wave)
        .filter(|r| match o.verdict {
            Verdict::Failed => matches!(r.progress, Progress::Failed { .. } | Progress::Refused { .. }),
            _ => !matches!(r.progress, Progress::Committed { .. }),
        })
        .map(|r| match &r.progress {
            Progress::Failed { .. } | Progress::Refused { .. } => {
                format!("{} {}", r.device, detail(&r.progress))
            }
            p => format!("{} {}", r.device, p.word()),
        })
        .collect();
    match o.verdict {
        Verdict::Committed => Ok(()),
        Verdict::Failed => Err(Stopped {
            code: EXIT_FAILED,
            message: format!("rollout stopped in wave {}/{}: {}", o.wave, o.waves, bad.join("; ")),
        }
        .into()),
        Verdict::TimedOut => Err(Stopped {
            code: EXIT_TIMED_OUT,
            message: format!("rollout timed out in wave {}/{}: {}", o.wave, o.waves, bad.join("; ")),
        }
        .into()),
    }
}

fn render_summary(o: &Outcome) -> String {
    let mut rows = vec![["DEVICE", "WAVE", "GENERATION", "STATE", "DETAIL"].map(String::from).to_vec()];
    for r in &o.rows {
        rows.push(vec![
            r.device.to_string(),
            if r.wave == 0 { "-".into() } else { r.wave.to_string() },
            r.progress.generation().map_or("-".into(), |g| g.to_string()),
            r.progress.word().to_string(),
            match &r.progress {
                Progress::Pending { .. } if r.legacy => {
                    "its agent predates rollouts (report schema 2) and refuses schema-3 states: upgrade it"
                        .into()
                }
                p => detail(p),
            },
        ]);
    }
    let mut out = table(&rows);
    if let Some(a) = &o.abort {
        if !a.resent.is_empty() {
            let names: Vec<_> = a.resent.iter().map(|d| d.as_str()).collect();
            out.push_str(&format!(
                "aborted: {} sent their previous state again as generation {}\n",
                names.join(", "),
                a.generation
            ));
        }
        if !a.unknown.is_empty() {
            let names: Vec<_> = a.unknown.iter().map(|d| d.as_str()).collect();
            out.push_str(&format!(
                "not rolled back: {} (sent the new state by an earlier run, whose previous state this run does not know; apply it with `skiffctl apply`)\n",
                names.join(", ")
            ));
        }
    }
    if o.verdict == Verdict::Committed {
        let g = o.generation.map_or(String::new(), |g| format!(" (generation {g} sent by this run)"));
        out.push_str(&format!(
            "rollout committed: {} device(s) in {} wave(s){g}\n",
            o.rows.iter().filter(|r| r.wave > 0).count(),
            o.waves
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::Abort;
    use skiff_common::{AppName, RolloutFailure};

    #[test]
    fn the_summary_names_each_device_state_and_why() {
        let dev = |s: &str| DeviceId::try_from(s).unwrap();
        let failure = RolloutFailure {
            generation: 9,
            app: Some(AppName::try_from("web").unwrap()),
            reason: "exited with code 1".into(),
            rolled_back: true,
        };
        let o = Outcome {
            verdict: Verdict::Failed,
            wave: 1,
            waves: 2,
            generation: Some(9),
            rows: vec![
                Row {
                    device: dev("pi-1"),
                    wave: 1,
                    progress: Progress::Failed { generation: 9, failure },
                    legacy: false,
                },
                Row {
                    device: dev("pi-2"),
                    wave: 1,
                    progress: Progress::Pending { generation: 9 },
                    legacy: true,
                },
                Row { device: dev("pi-3"), wave: 2, progress: Progress::NotSent, legacy: false },
            ],
            abort: Some(Abort { resent: vec![dev("pi-1")], generation: 10, unknown: vec![dev("pi-2")] }),
        };
        let out = render_summary(&o);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "DEVICE  WAVE  GENERATION  STATE        DETAIL");
        assert_eq!(
            lines[1],
            "pi-1    1     9           rolled-back  generation 9 rolled back (app web): exited with code 1"
        );
        assert_eq!(
            lines[2],
            "pi-2    1     9           pending      its agent predates rollouts (report schema 2) and refuses schema-3 states: upgrade it"
        );
        assert_eq!(lines[3], "pi-3    2     -           not-sent");
        assert_eq!(lines[4], "aborted: pi-1 sent their previous state again as generation 10");
        assert!(lines[5].starts_with("not rolled back: pi-2 (sent the new state by an earlier run"), "{out}");
        let err = finish(&o, false).unwrap_err();
        assert_eq!(err.downcast_ref::<Stopped>().unwrap().code, EXIT_FAILED);
        assert_eq!(
            err.to_string(),
            "rollout stopped in wave 1/2: pi-1 generation 9 rolled back (app web): exited with code 1"
        );
    }
}
