//! Which source position may be made durable: the one place where the checkpoint rule lives, for
//! every source.
//!
//! **Rule: confirm only a fully acknowledged prefix.** A source hands events over in units (a WAL
//! transaction, a poll batch), each closed by an acknowledgement token `A` (the transaction's end
//! LSN, the batch's last (xid, seq)). A unit's token may be confirmed to the source only after every
//! event of that unit *and of every earlier unit* was acknowledged by Kafka (or durably
//! dead-lettered, or found already in Kafka). The source then never re-sends what was confirmed,
//! and everything not confirmed is re-sent after a restart, where the sink's dedup skips what
//! already arrived. Checkpoint after acknowledgement, never before.

use std::collections::VecDeque;

/// Identifies the unit an event was counted in; handed back with its acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitId(u64);

#[derive(Debug)]
struct Unit<A> {
    id: u64,
    end: Option<A>,
    pending: usize,
}

/// Units handed over and not yet confirmed, oldest first; the newest may still be open.
#[derive(Debug)]
pub struct Checkpoint<A> {
    units: VecDeque<Unit<A>>,
    next_id: u64,
    /// Ready to be confirmed, not yet taken by [`Checkpoint::take`].
    confirmable: Option<A>,
}

impl<A> Default for Checkpoint<A> {
    fn default() -> Self {
        Checkpoint {
            units: VecDeque::new(),
            next_id: 0,
            confirmable: None,
        }
    }
}

impl<A: Copy> Checkpoint<A> {
    /// One more event of the open unit (opened now if none is) was handed to the sink.
    pub fn sent(&mut self) -> UnitId {
        if self.units.back().is_none_or(|u| u.end.is_some()) {
            self.units.push_back(Unit {
                id: self.next_id,
                end: None,
                pending: 0,
            });
            self.next_id += 1;
        }
        let unit = self.units.back_mut().expect("pushed above");
        unit.pending += 1;
        UnitId(unit.id)
    }

    /// The open unit (an empty one if none is open) ends; `end` is confirmed once it and every
    /// earlier unit are fully acknowledged.
    pub fn close(&mut self, end: A) {
        match self.units.back_mut() {
            Some(unit) if unit.end.is_none() => unit.end = Some(end),
            _ => {
                self.units.push_back(Unit {
                    id: self.next_id,
                    end: Some(end),
                    pending: 0,
                });
                self.next_id += 1;
            }
        }
        self.advance();
    }

    /// One event of `unit` was acknowledged (in any order).
    pub fn acked(&mut self, unit: UnitId) {
        // units are few and the one asked for is nearly always at the front
        if let Some(u) = self.units.iter_mut().find(|u| u.id == unit.0) {
            debug_assert!(u.pending > 0, "more acknowledgements than events");
            u.pending = u.pending.saturating_sub(1);
        }
        self.advance();
    }

    /// The source has nothing buffered before `position` and no unit open: with nothing pending,
    /// `position` may be confirmed as it is (an idle database never retains WAL without bound).
    pub fn idle(&mut self, position: A) {
        if self.units.is_empty() {
            self.confirmable = Some(position);
        }
    }

    /// Nothing handed over is unconfirmed.
    pub fn is_settled(&self) -> bool {
        self.units.is_empty()
    }

    /// The newest token that may be confirmed now, once.
    pub fn take(&mut self) -> Option<A> {
        self.confirmable.take()
    }

    fn advance(&mut self) {
        while let Some(front) = self.units.front() {
            match front.end {
                Some(end) if front.pending == 0 => {
                    self.confirmable = Some(end);
                    self.units.pop_front();
                }
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_only_fully_acknowledged_prefixes() {
        let mut c = Checkpoint::default();
        let a1 = c.sent();
        let a2 = c.sent();
        c.close(100);
        assert_eq!(c.take(), None, "two events unacknowledged");
        let b = c.sent();
        c.close(200);
        c.acked(b);
        assert_eq!(c.take(), None, "b done, but a is older and not");
        c.acked(a1);
        assert_eq!(c.take(), None);
        c.acked(a2);
        assert_eq!(c.take(), Some(200), "a and b both done: confirm b's end");
        assert_eq!(c.take(), None, "taken once");
        assert!(c.is_settled());
    }

    #[test]
    fn empty_units_confirm_at_close() {
        let mut c = Checkpoint::default();
        c.close(50);
        assert_eq!(c.take(), Some(50));
        assert!(c.is_settled());
    }

    #[test]
    fn an_open_unit_blocks_its_confirmation() {
        let mut c = Checkpoint::default();
        let a = c.sent();
        c.acked(a);
        assert_eq!(c.take(), None, "not closed yet");
        c.idle(5);
        assert_eq!(c.take(), None, "idle never confirms past an open unit");
        c.close(10);
        assert_eq!(c.take(), Some(10));
        c.idle(15);
        assert_eq!(c.take(), Some(15));
    }
}
