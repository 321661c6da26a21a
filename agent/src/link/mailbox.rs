//! The one slot between the driver and the worker: the newest verified
//! desired state the worker has not taken yet. Pure.
//!
//! A backlog (hundreds of states queued in a persistent session) must never
//! pile up in memory nor reach the daemon one by one: a newer state replaces
//! the waiting one, an older one is turned away. Whatever leaves the slot
//! without reaching the worker is given back to the caller to acknowledge
//! (if it came on the current connection: the caller checks `epoch`), since a
//! newer state stands in for it.

/// A verified state with the connection (`epoch`) that delivered it.
#[derive(Debug, PartialEq, Eq)]
pub struct Letter<T> {
    pub generation: u64,
    pub epoch: u64,
    pub item: T,
}

#[derive(Debug)]
pub struct Mailbox<T> {
    slot: Option<Letter<T>>,
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Mailbox { slot: None }
    }
}

impl<T> Mailbox<T> {
    /// Puts `letter` in the slot or turns it away; returns the letter that is
    /// not kept (the offered one or the one it displaced), to acknowledge.
    pub fn offer(&mut self, letter: Letter<T>) -> Option<Letter<T>> {
        let keep_waiting = match &self.slot {
            None => false,
            Some(w) if w.generation > letter.generation => true,
            // The same state twice (the queued and the retained copy): keep
            // the copy the current connection can acknowledge.
            Some(w) if w.generation == letter.generation => w.epoch == letter.epoch,
            Some(_) => false,
        };
        if keep_waiting {
            return Some(letter);
        }
        self.slot.replace(letter)
    }

    pub fn take(&mut self) -> Option<Letter<T>> {
        self.slot.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(generation: u64, epoch: u64, item: &'static str) -> Letter<&'static str> {
        Letter { generation, epoch, item }
    }

    #[test]
    fn newest_wins_and_the_rest_is_given_back() {
        let mut m = Mailbox::default();
        assert_eq!(m.offer(l(5, 1, "a")), None);
        assert_eq!(m.offer(l(7, 1, "b")), Some(l(5, 1, "a")), "superseded");
        assert_eq!(m.offer(l(6, 1, "c")), Some(l(6, 1, "c")), "older than the waiting one");
        assert_eq!(m.take(), Some(l(7, 1, "b")));
        assert_eq!(m.take(), None);
    }

    #[test]
    fn of_two_copies_the_one_this_connection_can_ack_stays() {
        let mut m = Mailbox::default();
        assert_eq!(m.offer(l(5, 1, "queued")), None);
        assert_eq!(m.offer(l(5, 1, "retained")), Some(l(5, 1, "retained")));
        // After a reconnect (epoch 2) the new copy replaces the stale one.
        assert_eq!(m.offer(l(5, 2, "again")), Some(l(5, 1, "queued")));
        assert_eq!(m.take(), Some(l(5, 2, "again")));
    }

    #[test]
    fn a_backlog_leaves_one_letter() {
        let mut m = Mailbox::default();
        let mut given_back = 0;
        for g in 1..=500 {
            given_back += usize::from(m.offer(l(g, 1, "x")).is_some());
        }
        assert_eq!(given_back, 499);
        assert_eq!(m.take().map(|x| x.generation), Some(500));
    }
}
