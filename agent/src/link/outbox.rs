//! What the device owes the broker, and what the broker has confirmed.
//!
//! Pure bookkeeping, no I/O: the driver asks `next_send` what to hand to the
//! MQTT client, tells `handed` when the client took it, `published` when
//! rumqttc gave it a packet id, `acked` on PUBACK, and `connected` /
//! `disconnected` on link changes.
//!
//! Invariants:
//! - Events sit in a bounded ring (`RING` slots, heapless) from `push_event`
//!   until their PUBACK: delivery is at least once, in `seq` order. When the
//!   ring is full the oldest event goes, and the count of the events lost is
//!   carried by the oldest one that remains (`dropped_before`).
//! - At most `EVENT_WINDOW` events are in flight, so rumqttc's packet ids never
//!   wrap onto an unacknowledged one.
//! - `reported` is level-triggered: only the newest is kept, one is in flight
//!   at a time, and it is sent again after every (re)connect.
//! - `online` ("1", retained) goes first after every (re)connect.
//! - Packet ids are matched to what was sent through the order in which the
//!   client hands them out (FIFO): the driver must call `handed` in the order it
//!   queued publishes and drain the client's queue on disconnect.

use skiff_common::protocol::{
    clip, encode_event, encode_reported, Channel, Event, EventKind, Rejection, Reported, EVENT_DETAIL_MAX,
    ONLINE,
};
use skiff_common::AppName;
use std::collections::{BTreeMap, VecDeque};

/// Events held while the broker is away.
pub const RING: usize = 1024;
/// Events handed to the client and not yet acknowledged.
pub const EVENT_WINDOW: usize = 8;

/// What a publish was, so its PUBACK can be credited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    Online,
    Reported,
    Event(u64),
}

/// One publish to hand to the client (QoS 1).
#[derive(Debug, PartialEq, Eq)]
pub struct Send {
    pub tag: Tag,
    pub channel: Channel,
    pub retain: bool,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
struct Slot {
    event: Event,
    /// Handed to the client on the current connection.
    handed: bool,
    acked: bool,
}

#[derive(Debug)]
pub struct Outbox {
    session: u64,
    next_seq: u64,
    /// Events lost with no slot left to carry the count (the ring was emptied).
    carry: u64,
    ring: heapless::Deque<Slot, RING>,
    reported: Option<Reported>,
    reported_dirty: bool,
    reported_in_flight: bool,
    last_rejection: Option<Rejection>,
    online_due: bool,
    connected: bool,
    /// Handed to the client, waiting for their packet id, in order.
    handed: VecDeque<Tag>,
    in_flight: BTreeMap<u16, Tag>,
}

impl Outbox {
    pub fn new(session: u64) -> Outbox {
        Outbox {
            session,
            next_seq: 1,
            carry: 0,
            ring: heapless::Deque::new(),
            reported: None,
            reported_dirty: false,
            reported_in_flight: false,
            last_rejection: None,
            online_due: false,
            connected: false,
            handed: VecDeque::new(),
            in_flight: BTreeMap::new(),
        }
    }

    /// Queues an event and returns its sequence number. Never blocks: a full
    /// ring drops its oldest event.
    pub fn push_event(&mut self, kind: EventKind, app: Option<AppName>, detail: String, unix: u64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.ring.is_full() {
            if let Some(old) = self.ring.pop_front() {
                self.carry += 1 + old.event.dropped_before;
            }
        }
        let event = Event {
            session: self.session,
            seq,
            dropped_before: 0,
            kind,
            app,
            detail: clip(detail, EVENT_DETAIL_MAX),
            unix,
        };
        // Cannot fail: a slot was freed above when the ring was full.
        let _ = self.ring.push_back(Slot { event, handed: false, acked: false });
        if self.carry > 0 {
            if let Some(front) = self.ring.front_mut() {
                front.event.dropped_before += self.carry;
                self.carry = 0;
            }
        }
        seq
    }

    /// Replaces the reported state to send (the newest wins).
    pub fn set_reported(&mut self, r: Reported) {
        self.reported = Some(r);
        self.reported_dirty = true;
    }

    /// Remembers a refused desired state (sent inside every later `reported`).
    pub fn set_rejection(&mut self, r: Rejection) {
        self.last_rejection = Some(r);
        self.reported_dirty = self.reported.is_some();
    }

    pub fn connected(&mut self) {
        self.reset_flight();
        self.connected = true;
        self.online_due = true;
        self.reported_dirty = self.reported.is_some();
    }

    pub fn disconnected(&mut self) {
        self.reset_flight();
        self.connected = false;
    }

    fn reset_flight(&mut self) {
        self.handed.clear();
        self.in_flight.clear();
        self.reported_in_flight = false;
        for slot in self.ring.iter_mut() {
            slot.handed = false;
        }
    }

    /// The next publish to hand to the client, if any is due and allowed.
    /// `now_unix` stamps `reported`. Does not mark anything sent: call `handed`.
    pub fn next_send(&mut self, now_unix: u64) -> Option<Send> {
        if !self.connected {
            return None;
        }
        if self.online_due {
            return Some(Send {
                tag: Tag::Online,
                channel: Channel::Online,
                retain: true,
                payload: ONLINE.to_vec(),
            });
        }
        if self.reported_dirty && !self.reported_in_flight {
            if let Some(r) = &mut self.reported {
                r.last_rejection.clone_from(&self.last_rejection);
                r.sent_unix = now_unix;
                match encode_reported(r) {
                    Ok(payload) => {
                        return Some(Send {
                            tag: Tag::Reported,
                            channel: Channel::Reported,
                            retain: true,
                            payload,
                        })
                    }
                    Err(err) => {
                        // Nothing to retry: the same state encodes the same way.
                        tracing::error!(%err, "reported state cannot be sent; dropped");
                        self.reported_dirty = false;
                    }
                }
            }
        }
        let in_flight = self.ring.iter().filter(|s| s.handed && !s.acked).count();
        if in_flight < EVENT_WINDOW {
            let slot = self.ring.iter().find(|s| !s.handed && !s.acked)?;
            // Cannot fail for an event built by `push_event` (detail clipped).
            let payload = encode_event(&slot.event).unwrap_or_default();
            return Some(Send {
                tag: Tag::Event(slot.event.seq),
                channel: Channel::Events,
                retain: false,
                payload,
            });
        }
        None
    }

    /// The client accepted the publish `next_send` returned.
    pub fn handed(&mut self, tag: Tag) {
        match tag {
            Tag::Online => self.online_due = false,
            Tag::Reported => {
                self.reported_dirty = false;
                self.reported_in_flight = true;
            }
            Tag::Event(seq) => {
                if let Some(s) = self.ring.iter_mut().find(|s| s.event.seq == seq) {
                    s.handed = true;
                }
            }
        }
        self.handed.push_back(tag);
    }

    /// rumqttc put the oldest handed publish on the wire with packet id `pkid`.
    pub fn published(&mut self, pkid: u16) {
        if let Some(tag) = self.handed.pop_front() {
            self.in_flight.insert(pkid, tag);
        }
    }

    /// The broker acknowledged packet id `pkid`.
    pub fn acked(&mut self, pkid: u16) {
        match self.in_flight.remove(&pkid) {
            Some(Tag::Reported) => self.reported_in_flight = false,
            Some(Tag::Event(seq)) => {
                // The slot may be gone already (dropped from a full ring).
                if let Some(s) = self.ring.iter_mut().find(|s| s.event.seq == seq) {
                    s.acked = true;
                }
                while self.ring.front().is_some_and(|s| s.acked) {
                    self.ring.pop_front();
                }
            }
            Some(Tag::Online) | None => {}
        }
    }

    /// Events not yet acknowledged.
    pub fn pending_events(&self) -> usize {
        self.ring.iter().filter(|s| !s.acked).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_common::protocol::{decode_event, decode_reported, DeviceId};
    use skiff_common::Origin;

    fn ev(o: &mut Outbox, n: u64) {
        for i in 0..n {
            o.push_event(EventKind::Error, None, format!("e{i}"), 0);
        }
    }

    /// Hands out everything due, giving packet ids from `pkid` on.
    fn drain(o: &mut Outbox, pkid: &mut u16) -> Vec<(u16, Send)> {
        let mut out = Vec::new();
        while let Some(s) = o.next_send(5) {
            o.handed(s.tag);
            *pkid += 1;
            o.published(*pkid);
            out.push((*pkid, s));
        }
        out
    }

    fn reported(gen: u64) -> Reported {
        Reported {
            pulls: Vec::new(),
            rollout: Default::default(),
            device: DeviceId::try_from("pi").unwrap(),
            generation_applied: gen,
            origin: Origin::Controller,
            apps: vec![],
            agent_version: "t".into(),
            last_rejection: None,
            sent_unix: 0,
        }
    }

    #[test]
    fn nothing_goes_out_while_offline_and_online_goes_first() {
        let mut o = Outbox::new(1);
        ev(&mut o, 3);
        o.set_reported(reported(4));
        assert_eq!(o.next_send(0), None);
        o.connected();
        let mut pkid = 0;
        let sent = drain(&mut o, &mut pkid);
        let tags: Vec<_> = sent.iter().map(|(_, s)| s.tag).collect();
        assert_eq!(tags, [Tag::Online, Tag::Reported, Tag::Event(1), Tag::Event(2), Tag::Event(3)]);
        assert!(sent[0].1.retain && sent[1].1.retain && !sent[2].1.retain);
        let r = decode_reported(&sent[1].1.payload).unwrap();
        assert_eq!((r.generation_applied, r.sent_unix), (4, 5));
    }

    #[test]
    fn events_stay_until_acked_and_are_resent_after_a_reconnect() {
        let mut o = Outbox::new(1);
        o.connected();
        ev(&mut o, 3);
        let mut pkid = 0;
        let sent = drain(&mut o, &mut pkid);
        assert_eq!(sent.len(), 4);
        o.acked(sent[1].0); // event 1
        assert_eq!(o.pending_events(), 2);
        o.disconnected();
        o.connected();
        let again: Vec<_> = drain(&mut o, &mut pkid).into_iter().map(|(_, s)| s.tag).collect();
        assert_eq!(again, [Tag::Online, Tag::Event(2), Tag::Event(3)]);
    }

    #[test]
    fn window_bounds_events_in_flight() {
        let mut o = Outbox::new(1);
        o.connected();
        ev(&mut o, 20);
        let mut pkid = 0;
        let first = drain(&mut o, &mut pkid);
        assert_eq!(first.len(), 1 + EVENT_WINDOW);
        // Acks out of order still free the window; the ring keeps order.
        o.acked(first[3].0);
        let next = drain(&mut o, &mut pkid);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].1.tag, Tag::Event(EVENT_WINDOW as u64 + 1));
        assert_eq!(o.pending_events(), 19);
    }

    #[test]
    fn overflow_drops_the_oldest_and_counts_them_on_the_next() {
        let mut o = Outbox::new(7);
        ev(&mut o, RING as u64 + 10);
        assert_eq!(o.pending_events(), RING);
        o.connected();
        let mut pkid = 0;
        let sent = drain(&mut o, &mut pkid);
        let first = decode_event(&sent[1].1.payload).unwrap();
        assert_eq!((first.session, first.seq, first.dropped_before), (7, 11, 10));
        let second = decode_event(&sent[2].1.payload).unwrap();
        assert_eq!((second.seq, second.dropped_before), (12, 0));
        // Dropping the event that carried a count passes the whole count on.
        o.disconnected();
        ev(&mut o, 1);
        o.connected();
        let sent = drain(&mut o, &mut pkid);
        let first = decode_event(&sent[1].1.payload).unwrap();
        assert_eq!((first.seq, first.dropped_before), (12, 11));
    }

    #[test]
    fn reported_is_level_triggered() {
        let mut o = Outbox::new(1);
        o.connected();
        let mut pkid = 0;
        drain(&mut o, &mut pkid);
        o.set_reported(reported(1));
        let s = drain(&mut o, &mut pkid);
        assert_eq!(s.len(), 1);
        // A newer one waits for the ack of the one in flight, and only the newest goes.
        o.set_reported(reported(2));
        o.set_reported(reported(3));
        assert!(drain(&mut o, &mut pkid).is_empty());
        o.set_rejection(Rejection::new(Some(9), "bad signature"));
        o.acked(s[0].0);
        let s = drain(&mut o, &mut pkid);
        assert_eq!(s.len(), 1);
        let r = decode_reported(&s[0].1.payload).unwrap();
        assert_eq!(r.generation_applied, 3);
        assert_eq!(r.last_rejection.unwrap().generation, Some(9));
        // Every reconnect sends it again.
        o.disconnected();
        o.connected();
        let tags: Vec<_> = drain(&mut o, &mut pkid).into_iter().map(|(_, s)| s.tag).collect();
        assert_eq!(tags, [Tag::Online, Tag::Reported]);
    }

    #[test]
    fn acked_events_leave_room() {
        let mut o = Outbox::new(7);
        o.connected();
        ev(&mut o, 3);
        let mut pkid = 0;
        let sent = drain(&mut o, &mut pkid);
        for (p, _) in &sent {
            o.acked(*p);
        }
        assert_eq!(o.pending_events(), 0);
        o.disconnected();
        ev(&mut o, RING as u64 + 20);
        o.connected();
        let sent = drain(&mut o, &mut pkid);
        let first = decode_event(&sent[1].1.payload).unwrap();
        assert_eq!((first.seq, first.dropped_before), (24, 20));
    }

    #[test]
    fn stray_acks_change_nothing() {
        let mut o = Outbox::new(1);
        o.connected();
        ev(&mut o, 1);
        o.acked(99);
        o.published(42); // nothing handed: ignored
        assert_eq!(o.pending_events(), 1);
    }
}
