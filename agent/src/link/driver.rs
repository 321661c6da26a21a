//! The link's I/O: the task that drives rumqttc and the task that walks each
//! desired state through the gate to the daemon and back.
//!
//! rumqttc's `EventLoop::poll` must run continuously (it sends, receives and
//! pings), so the driver task does nothing else and never waits on the daemon.
//! Everything that decides lives in `gate`, `outbox` and `backoff`; this file
//! only moves bytes and calls them. Publishes are queued with `try_publish`
//! while holding the `Shared` lock, so the order the outbox sees is the order
//! rumqttc assigns packet ids in; on a lost connection the driver drains the
//! client's queue under the same lock and the outbox resends what is owed.

use super::backoff::Backoff;
use super::calm::{Calm, Notice, WINDOW};
use super::gate::{Gate, Verdict};
use super::outbox::Outbox;
use super::{lock, unix_now, Incoming, LinkConfig, LinkError, LinkStatus};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Outgoing, Packet,
    Publish, QoS, SubscribeReasonCode, Transport,
};
use skiff_common::protocol::{
    topic, BrokerUrl, Channel, DeviceId, EventKind, Rejection, OFFLINE, PACKET_LIMIT,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::{sleep, sleep_until, timeout, Instant};

/// rumqttc's own in-flight limit: well above what the outbox ever has in
/// flight (online + reported + `EVENT_WINDOW`), so packet ids never collide.
const INFLIGHT: u16 = 32;
/// Requests queued for rumqttc: publishes in flight plus acks of incoming states.
const REQUESTS: usize = 64;
/// Incoming desired states waiting for the gate. The broker stops sending
/// long before (it holds at most its in-flight limit of unacknowledged ones).
const DESIRED_QUEUE: usize = 32;
/// How long the goodbye ("0" on `online`, DISCONNECT) may take at shutdown.
const GOODBYE: Duration = Duration::from_secs(2);

/// State shared by the handle, the driver and the desired worker.
pub(super) struct Shared {
    pub outbox: Outbox,
    pub gate: Gate,
    /// Refusals said at once or counted (see `calm`).
    pub calm: Calm,
    /// Wakes the worker when a refusal from outside it may have set a new
    /// time for `calm` to say a count.
    pub calm_changed: Arc<Notify>,
}

impl Shared {
    /// A refused desired state: a log line, a `rejected` event and
    /// `last_rejection` now, or only a count that goes out with the next one.
    pub fn reject(&mut self, r: Rejection, now: Instant) {
        match self.calm.offer(r, now) {
            Some(n) => self.say(n),
            None => self.calm_changed.notify_one(),
        }
    }

    /// Says the counts whose window ended.
    pub fn say_due(&mut self, now: Instant) {
        for n in self.calm.due(now) {
            self.say(n);
        }
    }

    fn say(&mut self, n: Notice) {
        let r = n.summary();
        tracing::warn!(
            generation = ?r.generation,
            reason = %n.rejection.reason,
            similar_unreported = n.similar,
            "desired state refused"
        );
        let detail = match r.generation {
            Some(g) => format!("generation {g}: {}", r.reason),
            None => r.reason.clone(),
        };
        self.outbox.push_event(EventKind::Rejected, None, detail, unix_now());
        self.outbox.set_rejection(r);
    }
}

/// Hands the client everything the outbox has due. Never blocks: when the
/// client's queue is full the rest waits for the next PUBACK.
pub(super) fn pump(s: &mut Shared, client: &AsyncClient, device: &DeviceId) {
    while let Some(send) = s.outbox.next_send(unix_now()) {
        let t = topic(device, send.channel);
        match client.try_publish(t, QoS::AtLeastOnce, send.retain, send.payload) {
            Ok(()) => s.outbox.handed(send.tag),
            Err(err) => {
                tracing::debug!(%err, "client queue full; sending later");
                break;
            }
        }
    }
}

/// The TLS files, re-read before every connection attempt so renewed
/// certificates are picked up without a restart.
pub(super) struct TlsFiles {
    ca: PathBuf,
    identity: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    /// Checks the combination against the URL and reads the files once, so a
    /// wrong path fails at start-up rather than as an endless reconnect loop.
    pub fn check(cfg: &LinkConfig, url: &BrokerUrl) -> Result<Option<TlsFiles>, LinkError> {
        let identity = match (&cfg.cert, &cfg.key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => return Err(LinkError::HalfIdentity),
        };
        if !url.tls {
            if cfg.ca.is_some() || identity.is_some() {
                return Err(LinkError::TlsUnused(url.to_string()));
            }
            return Ok(None);
        }
        let ca = cfg.ca.clone().ok_or_else(|| LinkError::TlsMissing(url.to_string()))?;
        let files = TlsFiles { ca, identity };
        files.transport()?;
        Ok(Some(files))
    }

    pub fn transport(&self) -> Result<Transport, LinkError> {
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|source| LinkError::Read { path: p.clone(), source });
        let identity = match &self.identity {
            Some((c, k)) => Some((read(c)?, read(k)?)),
            None => None,
        };
        Ok(Transport::tls(read(&self.ca)?, identity, None))
    }
}

pub(super) fn mqtt_options(
    cfg: &LinkConfig,
    url: &BrokerUrl,
    tls: Option<&TlsFiles>,
) -> Result<MqttOptions, LinkError> {
    let mut o = MqttOptions::new(cfg.device.as_str(), url.host.clone(), url.port);
    o.set_clean_session(false)
        .set_keep_alive(cfg.keepalive)
        .set_manual_acks(true)
        .set_max_packet_size(PACKET_LIMIT, PACKET_LIMIT)
        .set_inflight(INFLIGHT)
        .set_last_will(LastWill::new(topic(&cfg.device, Channel::Online), OFFLINE, QoS::AtLeastOnce, true));
    if let Some(t) = tls {
        o.set_transport(t.transport()?);
    }
    Ok(o)
}

/// Everything `spawn` builds, then hands to the two tasks.
pub(super) struct Parts {
    pub shared: Arc<Mutex<Shared>>,
    pub client: AsyncClient,
    pub status: watch::Receiver<LinkStatus>,
    pub alive: oneshot::Sender<()>,
    pub incoming: mpsc::Receiver<Incoming>,
}

pub(super) fn start(
    cfg: &LinkConfig,
    url: &BrokerUrl,
    tls: Option<TlsFiles>,
    gate: Gate,
    session: u64,
) -> Result<Parts, LinkError> {
    let options = mqtt_options(cfg, url, tls.as_ref())?;
    let (client, mut eventloop) = AsyncClient::new(options, REQUESTS);
    let mut net = NetworkOptions::new();
    net.set_connection_timeout(cfg.connect_timeout.as_secs().max(1));
    eventloop.set_network_options(net);

    let calm_changed = Arc::new(Notify::new());
    let shared = Arc::new(Mutex::new(Shared {
        outbox: Outbox::new(session),
        gate,
        calm: Calm::new(WINDOW),
        calm_changed: calm_changed.clone(),
    }));
    let (status_tx, status) = watch::channel(LinkStatus::default());
    let (alive, alive_rx) = oneshot::channel();
    let (incoming_tx, incoming) = mpsc::channel(1);
    let (desired_tx, desired_rx) = mpsc::channel(DESIRED_QUEUE);
    let epoch = Arc::new(AtomicU64::new(0));

    let driver = Driver {
        eventloop,
        client: client.clone(),
        shared: shared.clone(),
        device: cfg.device.clone(),
        tls,
        backoff: Backoff::new(cfg.reconnect_min, cfg.reconnect_max),
        status: status_tx,
        epoch: epoch.clone(),
        desired: desired_tx,
    };
    tokio::spawn(driver.run(alive_rx));
    let worker = Worker {
        queue: desired_rx,
        shared: shared.clone(),
        client: client.clone(),
        device: cfg.device.clone(),
        epoch,
        daemon: incoming_tx,
        retry: Backoff::new(cfg.reconnect_min, cfg.reconnect_max),
        calm_changed,
    };
    tokio::spawn(worker.run());
    Ok(Parts { shared, client, status, alive, incoming })
}

struct Driver {
    eventloop: EventLoop,
    client: AsyncClient,
    shared: Arc<Mutex<Shared>>,
    device: DeviceId,
    tls: Option<TlsFiles>,
    backoff: Backoff,
    status: watch::Sender<LinkStatus>,
    /// Bumped on every connect and every loss: an incoming message is only
    /// acknowledged on the connection that delivered it.
    epoch: Arc<AtomicU64>,
    desired: mpsc::Sender<(u64, Publish)>,
}

impl Driver {
    async fn run(mut self, mut alive: oneshot::Receiver<()>) {
        let desired_topic = topic(&self.device, Channel::Desired);
        let mut up_since: Option<Instant> = None;
        loop {
            let polled = tokio::select! {
                biased;
                _ = &mut alive => break,
                p = self.eventloop.poll() => p,
            };
            match polled {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    up_since = Some(Instant::now());
                    self.epoch.fetch_add(1, Ordering::SeqCst);
                    {
                        let mut s = lock(&self.shared);
                        // Every time, not only without a session: the broker may
                        // have lost it, and the retained state arrives again
                        // (the gate takes it as a duplicate).
                        if let Err(err) = self.client.try_subscribe(&desired_topic, QoS::AtLeastOnce) {
                            tracing::error!(%err, "cannot queue the subscription");
                        }
                        s.outbox.connected();
                        pump(&mut s, &self.client, &self.device);
                    }
                    self.status.send_modify(|st| {
                        st.connected = true;
                        st.connects += 1;
                    });
                    tracing::info!(session_present = ack.session_present, "connected to the broker");
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic == desired_topic {
                        let epoch = self.epoch.load(Ordering::SeqCst);
                        if self.desired.try_send((epoch, p)).is_err() {
                            tracing::warn!("desired states arrive faster than they are handled; the broker will redeliver");
                        }
                    } else {
                        // Not subscribed to; acknowledged so the broker drops it.
                        tracing::warn!(topic = %p.topic, "unexpected message ignored");
                        let _ = self.client.try_ack(&p);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    let mut s = lock(&self.shared);
                    s.outbox.acked(a.pkid);
                    pump(&mut s, &self.client, &self.device);
                }
                Ok(Event::Incoming(Packet::SubAck(a))) => {
                    if a.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                        let msg = format!("the broker refused the subscription to {desired_topic}: check its ACL for this device");
                        tracing::error!("{msg}");
                        let mut s = lock(&self.shared);
                        s.outbox.push_event(EventKind::Error, None, msg, unix_now());
                        pump(&mut s, &self.client, &self.device);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid) | Outgoing::AwaitAck(pkid))) => {
                    lock(&self.shared).outbox.published(pkid);
                }
                Ok(_) => {}
                Err(err) => {
                    self.lost(&err);
                    let held = up_since.take().map(|t| t.elapsed());
                    let delay = self.backoff.next_delay(held, rand::random::<f64>());
                    tracing::warn!(error = %err, retry_in = ?delay, "no connection to the broker");
                    tokio::select! {
                        biased;
                        _ = &mut alive => break,
                        _ = sleep(delay) => {}
                    }
                    self.reload_tls();
                }
            }
        }
        self.goodbye().await;
    }

    fn lost(&mut self, err: &ConnectionError) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let mut s = lock(&self.shared);
            // Drop what rumqttc would replay on its own: the outbox resends
            // everything unacknowledged, with fresh packet ids it can track.
            self.eventloop.clean();
            self.eventloop.pending.clear();
            s.outbox.disconnected();
        }
        let was_connected = self.status.borrow().connected;
        self.status.send_modify(|st| {
            st.connected = false;
            st.last_error = Some(err.to_string());
        });
        if was_connected {
            tracing::info!(pending_events = lock(&self.shared).outbox.pending_events(), "disconnected");
        }
    }

    fn reload_tls(&mut self) {
        if let Some(t) = &self.tls {
            match t.transport() {
                Ok(tr) => {
                    self.eventloop.mqtt_options.set_transport(tr);
                }
                Err(err) => {
                    tracing::warn!(%err, "TLS files unreadable; retrying with the previous ones")
                }
            }
        }
    }

    /// `online` = "0" (a clean DISCONNECT suppresses the last will), then DISCONNECT.
    async fn goodbye(mut self) {
        if !self.status.borrow().connected {
            return;
        }
        let online = topic(&self.device, Channel::Online);
        let _ = self.client.try_publish(online, QoS::AtLeastOnce, true, OFFLINE);
        let _ = self.client.try_disconnect();
        let _ = timeout(GOODBYE, async {
            loop {
                match self.eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        self.status.send_modify(|st| st.connected = false);
    }
}

/// Walks incoming desired states through the gate and the daemon, in order.
struct Worker {
    queue: mpsc::Receiver<(u64, Publish)>,
    shared: Arc<Mutex<Shared>>,
    client: AsyncClient,
    device: DeviceId,
    epoch: Arc<AtomicU64>,
    daemon: mpsc::Sender<Incoming>,
    retry: Backoff,
    calm_changed: Arc<Notify>,
}

/// A verified state the daemon has not persisted yet.
struct Held {
    epoch: u64,
    publish: Publish,
    state: skiff_common::DesiredState,
}

impl Worker {
    async fn run(mut self) {
        let mut held: Option<Held> = None;
        // When to hand a state the daemon failed to persist over again; a
        // deadline, so a stream of duplicates cannot keep pushing it back.
        let mut retry_at = Instant::now();
        loop {
            let calm_due = lock(&self.shared).calm.next_due();
            let next = tokio::select! {
                m = self.queue.recv() => m,
                _ = sleep_until(retry_at), if held.is_some() => {
                    if !self.hand_over(&mut held, &mut retry_at).await {
                        return;
                    }
                    continue;
                }
                _ = sleep_until(calm_due.unwrap_or(retry_at)), if calm_due.is_some() => {
                    let mut s = lock(&self.shared);
                    s.say_due(Instant::now());
                    pump(&mut s, &self.client, &self.device);
                    continue;
                }
                // A refusal from the daemon: `calm_due` may have moved.
                _ = self.calm_changed.notified() => continue,
            };
            let Some((epoch, publish)) = next else { return };
            let mut fresh = self.take(epoch, publish, &mut held).await;
            // A backlog (a persistent session after a long time offline):
            // walk everything already here first, so only the newest valid
            // state goes to the daemon, once.
            while let Ok((epoch, publish)) = self.queue.try_recv() {
                fresh |= self.take(epoch, publish, &mut held).await;
            }
            if fresh {
                self.retry.reset();
                if !self.hand_over(&mut held, &mut retry_at).await {
                    return;
                }
            }
        }
    }

    /// Passes one incoming state through the gate. Refusals, duplicates and
    /// states older than the held one are acknowledged; a newer verified
    /// state becomes the held one (the one it supersedes is acknowledged, as
    /// nothing needs it redelivered). Returns true when a new state is held
    /// and must be handed to the daemon.
    async fn take(&mut self, epoch: u64, publish: Publish, held: &mut Option<Held>) -> bool {
        let verdict = lock(&self.shared).gate.check(&publish.payload);
        match verdict {
            Verdict::Reject(r) => {
                {
                    let mut s = lock(&self.shared);
                    s.reject(r, Instant::now());
                    pump(&mut s, &self.client, &self.device);
                }
                self.ack(epoch, &publish).await;
                false
            }
            Verdict::Duplicate => {
                self.ack(epoch, &publish).await;
                false
            }
            Verdict::Accept(state) => {
                if let Some(h) = held.as_mut() {
                    if h.state.generation == state.generation {
                        // Redelivered (after a reconnect) while still not
                        // persisted: this copy is the one to ack later.
                        h.epoch = epoch;
                        h.publish = publish;
                        return false;
                    }
                    if h.state.generation > state.generation {
                        // Older than the state waiting to be persisted.
                        self.ack(epoch, &publish).await;
                        return false;
                    }
                }
                if let Some(old) = held.take() {
                    // Superseded before it was persisted: nothing to redeliver.
                    self.ack(old.epoch, &old.publish).await;
                }
                *held = Some(Held { epoch, publish, state });
                true
            }
        }
    }

    /// Gives the held state to the daemon and waits for `persisted`. Returns
    /// false when the daemon is gone.
    async fn hand_over(&mut self, held: &mut Option<Held>, retry_at: &mut Instant) -> bool {
        let Some(h) = held.as_ref() else { return true };
        let generation = h.state.generation;
        let (tx, rx) = oneshot::channel();
        let msg = Incoming::Desired { state: h.state.clone(), persisted: tx };
        if self.daemon.send(msg).await.is_err() {
            return false;
        }
        let outcome = rx.await.unwrap_or_else(|_| Err("the daemon dropped the request".into()));
        match outcome {
            Ok(()) => {
                let Some(h) = held.take() else { return true };
                // The ack is queued before the event, so whoever sees the
                // event knows the broker has the ack.
                self.ack(h.epoch, &h.publish).await;
                {
                    let mut s = lock(&self.shared);
                    s.gate.raise(generation);
                    s.outbox.push_event(
                        EventKind::Accepted,
                        None,
                        format!("generation {generation} persisted"),
                        unix_now(),
                    );
                    pump(&mut s, &self.client, &self.device);
                }
                tracing::info!(generation, "desired state persisted");
                self.retry.reset();
            }
            Err(reason) => {
                let delay = self.retry.next_delay(None, rand::random::<f64>());
                *retry_at = Instant::now() + delay;
                tracing::error!(generation, %reason, retry_in = ?delay, "desired state not persisted");
                let mut s = lock(&self.shared);
                s.outbox.push_event(
                    EventKind::Error,
                    None,
                    format!("generation {generation} not persisted: {reason}; retrying"),
                    unix_now(),
                );
                pump(&mut s, &self.client, &self.device);
            }
        }
        true
    }

    /// Acknowledges on the connection that delivered it; after a reconnect the
    /// broker redelivers instead (and the gate sees a duplicate).
    async fn ack(&self, epoch: u64, publish: &Publish) {
        if self.epoch.load(Ordering::SeqCst) == epoch {
            if let Err(err) = self.client.ack(publish).await {
                tracing::debug!(%err, "ack not queued");
            }
        }
    }
}
