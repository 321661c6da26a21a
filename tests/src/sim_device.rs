//! Simulated devices for controller tests: each is a small MQTT client with
//! the device's own certificate on the broker's device listener (so the
//! shipped ACL applies), playing the device side of the rollout protocol
//! without an agent or containers.
//!
//! A device subscribes to its `desired` topic, verifies every state with the
//! controller's public key (`open_desired_body`), and answers with a
//! retained schema-3 `Reported`, as an agent does: a generation at or below
//! the applied one is ignored (a re-delivery is not retried); a new one is
//! reported `testing`, then, as its `Judge` says, `committed` after the
//! state's `[rollout] stable`, `failed` (rolled back, or not when the state
//! says `rollback = false`), or held in testing until `release`. A device
//! with no committed generation commits its first state at once. A state it
//! cannot verify is reported as `last_rejection`.
//!
//! Everything a device verified is kept in `received`, so a test can say
//! exactly what was sent to whom.
//!
//! `start_legacy` plays an agent of the release before rollouts: it reports
//! schema 2 (no rollout fields) and runs every state as it comes.

use crate::mqtt::{Broker, RawClient};
use anyhow::{bail, Result};
use rumqttc::QoS;
use skiff_common::codec::{self, Kind};
use skiff_common::protocol::{
    encode_reported, open_desired_body, topic, Channel, DeviceId, Rejection, Reported, VerifyingKey,
};
use skiff_common::{AppName, DesiredState, Origin, RolloutFailure, RolloutStatus};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// What a device makes of a state on test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Passes its test: committed after the state's `stable`.
    Commit,
    /// Fails its test: `app` (if any) failed for `reason`.
    Fail { app: Option<String>, reason: String },
    /// Stays in testing until `SimDevice::release`, then commits.
    Hold,
}

/// Decides the verdict of each state a device tests.
pub type Judge = Arc<dyn Fn(&DesiredState) -> Verdict + Send + Sync>;

/// Every state passes.
pub fn always_commit() -> Judge {
    Arc::new(|_| Verdict::Commit)
}

/// What the device has done so far.
#[derive(Clone, Debug, Default)]
pub struct DeviceLog {
    /// Every verified state taken, in order (re-deliveries are not listed).
    pub received: Vec<DesiredState>,
    /// When each of `received` arrived.
    pub received_at: Vec<Instant>,
    /// When the device last reported a commit.
    pub committed_at: Option<Instant>,
    /// The rollout status last reported.
    pub rollout: RolloutStatus,
    pub applied: u64,
    /// Payloads the device could not verify, and why.
    pub refused: Vec<String>,
}

pub struct SimDevice {
    pub id: DeviceId,
    log: watch::Receiver<DeviceLog>,
    release: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl SimDevice {
    /// Connects as `name` (which must have a certificate from `Broker::start`)
    /// and waits until it is subscribed.
    pub async fn start(
        broker: &Broker,
        name: &str,
        controller: VerifyingKey,
        judge: Judge,
    ) -> Result<SimDevice> {
        SimDevice::spawn(broker, name, controller, judge, false).await
    }

    /// A device whose agent predates rollouts (reports of schema 2).
    pub async fn start_legacy(broker: &Broker, name: &str, controller: VerifyingKey) -> Result<SimDevice> {
        SimDevice::spawn(broker, name, controller, always_commit(), true).await
    }

    async fn spawn(
        broker: &Broker,
        name: &str,
        controller: VerifyingKey,
        judge: Judge,
        legacy: bool,
    ) -> Result<SimDevice> {
        let id = DeviceId::try_from(name)?;
        let mut client = broker.raw_client(name, name, broker.device_port, true)?;
        client.connected(1).await?;
        client.client.subscribe(topic(&id, Channel::Desired), QoS::AtLeastOnce).await?;
        crate::mqtt::wait_for(&mut client.subacks, |v| !v.is_empty(), Duration::from_secs(10)).await?;
        if client.subacks.borrow().first() == Some(&0x80) {
            bail!("the broker refused {name} its desired topic");
        }
        let (log_tx, log) = watch::channel(DeviceLog::default());
        let (release, release_rx) = watch::channel(false);
        let link = Link { client, id: id.clone(), legacy };
        let task = tokio::spawn(run(link, controller, judge, log_tx, release_rx));
        Ok(SimDevice { id, log, release, task })
    }

    pub fn log(&self) -> DeviceLog {
        self.log.borrow().clone()
    }

    /// Lets every held state (now and later) commit.
    pub fn release(&self) {
        self.release.send_replace(true);
    }

    /// Waits until `f` holds for the log.
    pub async fn wait(
        &self,
        what: &str,
        within: Duration,
        f: impl FnMut(&DeviceLog) -> bool,
    ) -> Result<DeviceLog> {
        let mut rx = self.log.clone();
        let got = match tokio::time::timeout(within, rx.wait_for(f)).await {
            Ok(Ok(l)) => Some(l.clone()),
            Ok(Err(_)) => None,
            Err(_) => bail!("{}: not {what} within {within:?}: {:?}", self.id, self.log()),
        };
        got.ok_or_else(|| anyhow::anyhow!("{}: device task ended", self.id))
    }

    /// Waits until the device has committed `generation` (or a later one).
    pub async fn committed(&self, generation: u64, within: Duration) -> Result<DeviceLog> {
        self.wait(&format!("committed {generation}"), within, |l| l.rollout.committed >= generation).await
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The device's connection, and the schema it reports in.
struct Link {
    client: RawClient,
    id: DeviceId,
    legacy: bool,
}

async fn run(
    mut client: Link,
    key: VerifyingKey,
    judge: Judge,
    log: watch::Sender<DeviceLog>,
    mut release: watch::Receiver<bool>,
) {
    let id = client.id.clone();
    let mut rejection: Option<Rejection> = None;
    while let Some(p) = client.client.rx.recv().await {
        if p.payload.is_empty() {
            continue;
        }
        let body = match open_desired_body(&p.payload, &id, &key) {
            Ok(b) => b,
            Err(e) => {
                rejection = Some(Rejection::new(None, format!("refused: {e}")));
                log.send_modify(|l| l.refused.push(e.to_string()));
                let (applied, rollout) = { (log.borrow().applied, log.borrow().rollout.clone()) };
                let _ = report(&client, &id, applied, rollout, rejection.clone()).await;
                continue;
            }
        };
        let state = body.state;
        let g = state.generation;
        let (applied, before) = { (log.borrow().applied, log.borrow().rollout.clone()) };
        if g <= applied && body.replaces != Some(applied) {
            continue;
        }
        log.send_modify(|l| {
            l.received.push(state.clone());
            l.received_at.push(Instant::now());
            l.applied = g;
        });
        if before.committed == 0 || client.legacy {
            let now = RolloutStatus { committed: g, testing: None, failed: before.failed.clone() };
            if publish(&client, &id, g, now, &rejection, &log).await.is_err() {
                return;
            }
            continue;
        }
        let testing =
            RolloutStatus { committed: before.committed, testing: Some(g), failed: before.failed.clone() };
        if publish(&client, &id, g, testing, &rejection, &log).await.is_err() {
            return;
        }
        let verdict = judge(&state);
        let after = match verdict {
            Verdict::Commit => {
                tokio::time::sleep(state.rollout.stable).await;
                RolloutStatus { committed: g, testing: None, failed: before.failed }
            }
            Verdict::Hold => {
                if release.wait_for(|r| *r).await.is_err() {
                    return;
                }
                RolloutStatus { committed: g, testing: None, failed: before.failed }
            }
            Verdict::Fail { app, reason } => RolloutStatus {
                committed: before.committed,
                testing: None,
                failed: Some(RolloutFailure {
                    generation: g,
                    app: app.map(|a| AppName::try_from(a.as_str()).expect("app name")),
                    reason,
                    rolled_back: state.rollout.rollback,
                }),
            },
        };
        if publish(&client, &id, g, after, &rejection, &log).await.is_err() {
            return;
        }
    }
}

async fn publish(
    client: &Link,
    id: &DeviceId,
    applied: u64,
    rollout: RolloutStatus,
    rejection: &Option<Rejection>,
    log: &watch::Sender<DeviceLog>,
) -> Result<()> {
    report(client, id, applied, rollout.clone(), rejection.clone()).await?;
    log.send_modify(|l| {
        if l.rollout.committed != rollout.committed {
            l.committed_at = Some(Instant::now());
        }
        l.rollout = rollout;
    });
    Ok(())
}

/// Publishes the retained report (schema 3, or 2 for a legacy device).
async fn report(
    link: &Link,
    id: &DeviceId,
    applied: u64,
    rollout: RolloutStatus,
    last_rejection: Option<Rejection>,
) -> Result<()> {
    let r = Reported {
        device: id.clone(),
        generation_applied: applied,
        origin: Origin::Controller,
        apps: Vec::new(),
        agent_version: "simulated".into(),
        last_rejection,
        sent_unix: 0,
        pulls: Vec::new(),
        rollout,
    };
    let payload = if link.legacy {
        let old = skiff_common::v2::Reported {
            device: r.device,
            generation_applied: r.generation_applied,
            origin: r.origin,
            apps: r.apps,
            agent_version: r.agent_version,
            last_rejection: r.last_rejection,
            sent_unix: r.sent_unix,
            pulls: r.pulls,
        };
        codec::encode(Kind::Reported, 2, &old)?
    } else {
        encode_reported(&r)?
    };
    link.client.client.publish(topic(id, Channel::Reported), QoS::AtLeastOnce, true, payload).await?;
    Ok(())
}
