//! The MQTT link to the controller: one self-contained task the daemon talks
//! to through channels.
//!
//! Owns the broker connection (rumqttc, persistent session, QoS 1, manual
//! acks), the reconnect policy, the offline event ring and the checks on every
//! incoming desired state. Never blocks its caller, never touches the
//! reconciler or the disk: a verified state goes to the daemon as
//! `Incoming::Desired`, and its PUBLISH is acknowledged only once the daemon
//! answers `persisted` with `Ok` (so a power cut before the state is on flash
//! makes the broker deliver it again).
//!
//! Contract with the daemon:
//! - `spawn(cfg, generation)` inside a tokio runtime, with the generation of
//!   the state on flash. Read the `Incoming` receiver continuously; answer
//!   every `persisted` (Err = could not persist: the link keeps the message
//!   unacknowledged and hands the state again with backoff until it is
//!   persisted or superseded by a newer one).
//! - `report()` after every change of observed state, `event()` for exits,
//!   probe failures and errors. Both return at once.
//! - Dropping every `LinkHandle` publishes `online` = "0" and ends the task;
//!   the `Incoming` receiver then closes.
//!
//! What the link refuses (bad signature, wrong device, older generation,
//! oversized, malformed) is acknowledged so it is not redelivered forever,
//! published as a `rejected` event and remembered in `reported`; nothing else
//! happens. A flood of refusals stays calm (`calm`): per class of reason at
//! most one log line and one event per `calm::WINDOW`, the others counted in
//! the next one and in `last_rejection`. A backlog (a persistent session
//! after a long time offline) is walked through the gate as fast as the
//! broker delivers it, and only the newest verified state of what has
//! arrived goes to the daemon.

mod backoff;
mod calm;
mod driver;
mod gate;
mod mailbox;
mod outbox;

use skiff_common::protocol::{
    BrokerUrl, DeviceId, EventKind, ProtocolError, Rejection, Reported, VerifyingKey,
};
use skiff_common::{AppName, DesiredState};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

/// Events held while the broker is away; beyond this the oldest are dropped.
pub const RING: usize = outbox::RING;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Broker(#[from] ProtocolError),
    #[error("controller public key is not a valid ed25519 key")]
    PublicKey,
    #[error("{0} needs --mqtt-ca (and, for a device certificate, --mqtt-cert and --mqtt-key)")]
    TlsMissing(String),
    #[error("TLS files are given but {0} is plain MQTT; use mqtts://")]
    TlsUnused(String),
    #[error("a client certificate needs both a certificate and a key file")]
    HalfIdentity,
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("keepalive {0:?} is outside 1 s..=65535 s")]
    Keepalive(Duration),
}

/// How to reach the broker and whom to trust.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `mqtts://host:port` or `mqtt://host:port`.
    pub broker: String,
    pub device: DeviceId,
    /// CA that signed the broker's certificate (PEM). Required for `mqtts://`.
    pub ca: Option<PathBuf>,
    /// The device's certificate and key (PEM); its CN must be the device id.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The controller's ed25519 public key: only states it signed are applied.
    pub controller_public_key: [u8; 32],
    /// MQTT keepalive; a broker that stops answering is noticed within about
    /// twice this and the link reconnects.
    pub keepalive: Duration,
    /// Limit on TCP + TLS + CONNECT/CONNACK of one attempt (whole seconds).
    pub connect_timeout: Duration,
    /// Reconnect backoff, doubling from `reconnect_min` up to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl LinkConfig {
    /// Defaults for a device: keepalive 30 s, connect timeout 10 s, reconnects
    /// from 1 s up to 60 s, no TLS files.
    pub fn new(broker: impl Into<String>, device: DeviceId, controller_public_key: [u8; 32]) -> Self {
        LinkConfig {
            broker: broker.into(),
            device,
            ca: None,
            cert: None,
            key: None,
            controller_public_key,
            keepalive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
        }
    }
}

/// From the link to the daemon.
#[derive(Debug)]
pub enum Incoming {
    /// A verified controller state, newer than anything accepted so far.
    /// Persist it, then answer; the broker is acknowledged only after `Ok`.
    Desired { state: DesiredState, persisted: oneshot::Sender<Result<(), String>> },
}

/// What the link is doing, for `skiff status` and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStatus {
    pub connected: bool,
    /// Successful connections so far (CONNACKs).
    pub connects: u64,
    /// Why the last connection ended or an attempt failed.
    pub last_error: Option<String>,
}

/// The daemon's side of the link. Cheap to clone; the link ends when the last
/// clone is dropped.
#[derive(Clone)]
pub struct LinkHandle {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Mutex<driver::Shared>>,
    client: rumqttc::AsyncClient,
    device: DeviceId,
    status: watch::Receiver<LinkStatus>,
    /// Dropped with the last handle: tells the driver to say goodbye and stop.
    _alive: oneshot::Sender<()>,
}

impl LinkHandle {
    /// Publishes the observed state (retained), now or on the next connect;
    /// only the newest one is kept. Also raises the generation below which
    /// incoming states are refused to `r.generation_applied`.
    pub fn report(&self, r: Reported) {
        let mut s = self.lock();
        s.gate.raise(r.generation_applied);
        s.outbox.set_reported(r);
        driver::pump(&mut s, &self.inner.client, &self.inner.device);
    }

    /// Queues an event. While offline it waits in a ring of `RING` events;
    /// beyond that the oldest are dropped and counted.
    pub fn event(&self, kind: EventKind, app: Option<AppName>, detail: impl Into<String>) {
        let mut s = self.lock();
        s.outbox.push_event(kind, app, detail.into(), unix_now());
        driver::pump(&mut s, &self.inner.client, &self.inner.device);
    }

    /// Records that a desired state was refused: a `rejected` event, and the
    /// reason in every later `reported` (rate-limited like the link's own).
    pub fn rejected(&self, generation: Option<u64>, reason: impl Into<String>) {
        let mut s = self.lock();
        s.reject(Rejection::new(generation, reason), tokio::time::Instant::now());
        driver::pump(&mut s, &self.inner.client, &self.inner.device);
    }

    /// This device's id.
    pub fn device(&self) -> &DeviceId {
        &self.inner.device
    }

    pub fn status(&self) -> watch::Receiver<LinkStatus> {
        self.inner.status.clone()
    }

    fn lock(&self) -> MutexGuard<'_, driver::Shared> {
        lock(&self.inner.shared)
    }
}

/// Starts the link. `initial_generation` is the generation of the desired
/// state the device already holds: only newer controller states are accepted.
/// Fails at once on a configuration error (bad URL, key, unreadable TLS file);
/// everything after that (broker down, TLS handshake refused) is retried.
pub fn spawn(
    cfg: LinkConfig,
    initial_generation: u64,
) -> Result<(LinkHandle, mpsc::Receiver<Incoming>), LinkError> {
    let url = BrokerUrl::try_from(cfg.broker.as_str())?;
    let key = VerifyingKey::from_bytes(&cfg.controller_public_key).map_err(|_| LinkError::PublicKey)?;
    if cfg.keepalive < Duration::from_secs(1) || cfg.keepalive > Duration::from_secs(65535) {
        return Err(LinkError::Keepalive(cfg.keepalive));
    }
    let tls = driver::TlsFiles::check(&cfg, &url)?;
    let gate = gate::Gate::new(cfg.device.clone(), key, initial_generation);
    let parts = driver::start(&cfg, &url, tls, gate, rand::random())?;
    let inner = Inner {
        shared: parts.shared,
        client: parts.client,
        device: cfg.device,
        status: parts.status,
        _alive: parts.alive,
    };
    Ok((LinkHandle { inner: Arc::new(inner) }, parts.incoming))
}

fn lock(m: &Mutex<driver::Shared>) -> MutexGuard<'_, driver::Shared> {
    // The state stays consistent across a panic in another holder (every
    // method leaves it valid), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Wall-clock seconds for stamps, 0 when the clock is obviously unset (a board
/// without RTC boots in 1970). Never used to measure time.
fn unix_now() -> u64 {
    const NOT_BEFORE: u64 = 1_577_836_800; // 2020-01-01
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if secs < NOT_BEFORE {
        0
    } else {
        secs
    }
}
