//! Which LSN may be confirmed to the slot.
//!
//! Invariant: the relay confirms a transaction's commit end LSN only after every event of that
//! transaction *and of every earlier transaction* was acknowledged by Kafka (or durably
//! dead-lettered). PostgreSQL then never re-sends a confirmed transaction, and everything not yet
//! confirmed is re-sent after a restart (where the sink's dedup skips what already arrived).
//! Checkpoint after acknowledgement, never before.

use std::collections::VecDeque;

#[derive(Debug)]
struct Txn {
    seq: u64,
    end_lsn: Option<u64>,
    pending: usize,
}

/// Transactions seen and not yet confirmed, oldest first.
#[derive(Debug, Default)]
pub struct Checkpoint {
    txns: VecDeque<Txn>,
    next_seq: u64,
}

impl Checkpoint {
    /// A transaction started; returns its sequence number.
    pub fn begin(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.txns.push_back(Txn {
            seq,
            end_lsn: None,
            pending: 0,
        });
        seq
    }

    /// One more event of transaction `seq` was handed to the sink.
    pub fn sent(&mut self, seq: u64) {
        if let Some(t) = self.find(seq) {
            t.pending += 1;
        }
    }

    /// Transaction `seq` committed at `end_lsn`; returns the LSN that may now be confirmed, if any.
    pub fn commit(&mut self, seq: u64, end_lsn: u64) -> Option<u64> {
        if let Some(t) = self.find(seq) {
            t.end_lsn = Some(end_lsn);
        }
        self.advance()
    }

    /// One event of transaction `seq` was acknowledged; returns the LSN that may now be confirmed.
    pub fn acked(&mut self, seq: u64) -> Option<u64> {
        if let Some(t) = self.find(seq) {
            t.pending = t.pending.saturating_sub(1);
        }
        self.advance()
    }

    /// Nothing received is unconfirmed: a keepalive position may be confirmed as it is.
    pub fn is_idle(&self) -> bool {
        self.txns.is_empty()
    }

    fn find(&mut self, seq: u64) -> Option<&mut Txn> {
        // transactions are few and the one asked for is nearly always at the back or the front
        self.txns.iter_mut().rev().find(|t| t.seq == seq)
    }

    fn advance(&mut self) -> Option<u64> {
        let mut confirmed = None;
        while let Some(front) = self.txns.front() {
            match front.end_lsn {
                Some(lsn) if front.pending == 0 => {
                    confirmed = Some(lsn);
                    self.txns.pop_front();
                }
                _ => break,
            }
        }
        confirmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_only_fully_acknowledged_prefixes() {
        let mut c = Checkpoint::default();
        let a = c.begin();
        c.sent(a);
        c.sent(a);
        assert_eq!(c.commit(a, 100), None, "two events unacknowledged");
        let b = c.begin();
        c.sent(b);
        assert_eq!(c.commit(b, 200), None);
        assert_eq!(c.acked(b), None, "b done, but a is older and not");
        assert_eq!(c.acked(a), None);
        assert_eq!(c.acked(a), Some(200), "a and b both done: confirm b's end");
        assert!(c.is_idle());
    }

    #[test]
    fn empty_transactions_confirm_at_commit() {
        let mut c = Checkpoint::default();
        let a = c.begin();
        assert!(!c.is_idle());
        assert_eq!(c.commit(a, 50), Some(50));
        assert!(c.is_idle());
    }

    #[test]
    fn an_open_transaction_blocks_later_ones() {
        let mut c = Checkpoint::default();
        let a = c.begin();
        c.sent(a);
        assert_eq!(c.acked(a), None, "not committed yet");
        assert_eq!(c.commit(a, 10), Some(10));
    }
}
