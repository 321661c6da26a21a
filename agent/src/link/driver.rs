//! The link's I/O: the task that drives rumqttc and the task that walks each
//! verified desired state to the daemon and back.
//!
//! rumqttc's `EventLoop::poll` must run continuously (it sends, receives and
//! pings), so the driver task never waits on the daemon. It passes every
//! incoming desired state through the gate itself (pure, and quick next to a
//! network round trip): refusals and duplicates are acknowledged at once, and
//! a verified state goes to a one-slot mailbox where a newer one replaces
//! (and acknowledges) an older one. So a backlog of any length, delivered as
//! fast as the broker likes, costs one slot of memory, and only the newest
//! verified state reaches the daemon.
//! Everything that decides lives in `gate`, `calm`, `outbox` and `backoff`;
//! this file only moves bytes and calls them. Publishes are queued with `try_publish`
//! while holding the `Shared` lock, so the order the outbox sees is the order
//! rumqttc assigns packet ids in; on a lost connection the driver drains the
//! client's queue under the same lock and the outbox resends what is owed.

use super::backoff::Backoff;
use super::calm::{Calm, Notice, WINDOW};
use super::gate::{Gate, Verdict};
use super::mailbox::{Letter, Mailbox};
use super::outbox::Outbox;
use super::{lock, unix_now, Incoming, LinkConfig, LinkError, LinkStatus};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Outgoing, Packet,
    Publish, QoS, SubscribeReasonCode, Transport,
};
use skiff_common::protocol::{
    topic, BrokerUrl, Channel, DeviceId, EventKind, Rejection, OFFLINE, PACKET_LIMIT,
};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::{sleep, sleep_until, timeout, Instant};

/// rumqttc's own in-flight limit: well above what the outbox ever has in
/// flight (online + reported + `EVENT_WINDOW`), so packet ids never collide.
const INFLIGHT: u16 = 32;
/// Requests queued for rumqttc: publishes in flight plus acks of incoming
/// states (acks that do not fit wait in the driver).
const REQUESTS: usize = 64;
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
    /// The newest verified state the worker has not taken yet.
    pub mailbox: Mailbox<Held>,
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
        mailbox: Mailbox::default(),
    }));
    let mail = Arc::new(Notify::new());
    let (status_tx, status) = watch::channel(LinkStatus::default());
    let (alive, alive_rx) = oneshot::channel();
    let (incoming_tx, incoming) = mpsc::channel(1);
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
        mail: mail.clone(),
        acks: VecDeque::new(),
    };
    tokio::spawn(driver.run(alive_rx));
    let worker = Worker {
        mail,
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
    /// Rings when a state is put in the mailbox.
    mail: Arc<Notify>,
    /// Packet ids to acknowledge on this connection that did not fit in the
    /// client's queue yet.
    acks: VecDeque<u16>,
}

impl Driver {
    async fn run(mut self, mut alive: oneshot::Receiver<()>) {
        let desired_topic = topic(&self.device, Channel::Desired);
        let mut up_since: Option<Instant> = None;
        loop {
            self.flush_acks();
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
                        self.desired(p);
                    } else {
                        // Not subscribed to; acknowledged so the broker drops it.
                        tracing::warn!(topic = %p.topic, "unexpected message ignored");
                        self.acks.push_back(p.pkid);
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

    /// An incoming desired state: through the gate, then acknowledged or
    /// put in the mailbox.
    fn desired(&mut self, p: Publish) {
        let mut s = lock(&self.shared);
        let verdict = s.gate.check(&p.payload);
        match verdict {
            Verdict::Reject(r) => {
                s.reject(r, Instant::now());
                pump(&mut s, &self.client, &self.device);
                self.acks.push_back(p.pkid);
            }
            Verdict::Duplicate => self.acks.push_back(p.pkid),
            Verdict::Accept(state) => {
                let epoch = self.epoch.load(Ordering::SeqCst);
                let letter =
                    Letter { generation: state.generation, epoch, item: Held { epoch, publish: p, state } };
                if let Some(back) = s.mailbox.offer(letter) {
                    if back.epoch == epoch {
                        self.acks.push_back(back.item.publish.pkid);
                    }
                }
                drop(s);
                self.mail.notify_one();
            }
        }
    }

    /// Hands the client the acks it has room for.
    fn flush_acks(&mut self) {
        while let Some(&pkid) = self.acks.front() {
            let mut stub = Publish::new("", QoS::AtLeastOnce, Vec::new());
            stub.pkid = pkid;
            if self.client.try_ack(&stub).is_err() {
                break;
            }
            self.acks.pop_front();
        }
    }

    fn lost(&mut self, err: &ConnectionError) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        // Unacknowledged messages come again on the next connection.
        self.acks.clear();
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
        // Acks first (what does not fit is redelivered and judged again).
        self.flush_acks();
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

/// Walks verified desired states from the mailbox to the daemon.
struct Worker {
    mail: Arc<Notify>,
    shared: Arc<Mutex<Shared>>,
    client: AsyncClient,
    device: DeviceId,
    epoch: Arc<AtomicU64>,
    daemon: mpsc::Sender<Incoming>,
    retry: Backoff,
    calm_changed: Arc<Notify>,
}

/// A verified state the daemon has not persisted yet.
pub(super) struct Held {
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
            tokio::select! {
                _ = self.mail.notified() => {}
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
            }
            let letter = lock(&self.shared).mailbox.take();
            let Some(Letter { item: offer, .. }) = letter else { continue };
            if self.take(offer, &mut held).await {
                self.retry.reset();
                if !self.hand_over(&mut held, &mut retry_at).await {
                    return;
                }
            }
        }
    }

    /// A verified state from the mailbox against the held one. Returns true
    /// when it is the new held state and must be handed to the daemon.
    async fn take(&mut self, offer: Held, held: &mut Option<Held>) -> bool {
        // The gate again: a state persisted since the driver checked this one
        // may have made it a duplicate or old.
        let verdict = lock(&self.shared).gate.check(&offer.publish.payload);
        if !matches!(verdict, Verdict::Accept(_)) {
            self.ack(offer.epoch, &offer.publish).await;
            return false;
        }
        if let Some(h) = held.as_mut() {
            if h.state.generation == offer.state.generation {
                // Redelivered while still not persisted: this copy is the one
                // to ack later; the other is acked now if this connection
                // brought it (after a reconnect it cannot be, nor needs to be).
                let other = std::mem::replace(h, offer);
                self.ack(other.epoch, &other.publish).await;
                return false;
            }
            if h.state.generation > offer.state.generation {
                // Older than the state waiting to be persisted.
                self.ack(offer.epoch, &offer.publish).await;
                return false;
            }
        }
        if let Some(old) = held.take() {
            // Superseded before it was persisted: nothing to redeliver.
            self.ack(old.epoch, &old.publish).await;
        }
        *held = Some(offer);
        true
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
