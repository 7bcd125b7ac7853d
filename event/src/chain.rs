//! The per-agent hash chain rule, in one place: the node applies it at ingest and the
//! offline verifier applies it again to what was stored.
//!
//! ```text
//!  head (seq, blake3 of its payload) ──┐
//!  next payload (seq, prev) ───────────┴─▶ step() ─▶ First | Next | Gap | Broken | Behind
//! ```
//!
//! Every seq computation is checked: a `seq` of `u64::MAX` has no successor, so payloads
//! refuse it ([`crate::Payload::parse`]) and [`step`] never adds past it.

/// The newest accepted event of one agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    /// blake3 of the head's payload bytes.
    pub digest: [u8; 32],
}

/// Where an event with `seq` (and `prev`) lands on an agent's chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The agent's first event, at seq 0.
    First,
    /// The agent's first event, at a later seq: seqs `from..=to` were never seen.
    FirstWithGap { from: u64, to: u64 },
    /// Exactly the head's successor, with `prev` naming the head.
    Next,
    /// Ahead of the head's successor: seqs `from..=to` never arrived.
    Gap { from: u64, to: u64 },
    /// The head's successor by seq, but `prev` is not the head's digest.
    Broken,
    /// At or below the head: a resend (same payload as the one stored at that seq) or a
    /// fork (a different one). Telling which needs the stored digest at `seq`.
    Behind,
}

/// Applies the chain rule. `prev` is the payload's `prev` decoded (none when null or
/// malformed).
pub fn step(head: Option<&Head>, seq: u64, prev: Option<[u8; 32]>) -> Step {
    let Some(head) = head else {
        return match seq.checked_sub(1) {
            None => Step::First,
            Some(to) => Step::FirstWithGap { from: 0, to },
        };
    };
    if seq <= head.seq {
        return Step::Behind;
    }
    // seq > head.seq, so head.seq + 1 cannot overflow and seq - 1 cannot underflow.
    let successor = head.seq + 1;
    if seq == successor {
        return if prev == Some(head.digest) {
            Step::Next
        } else {
            Step::Broken
        };
    }
    Step::Gap {
        from: successor,
        to: seq - 1,
    }
}

impl Step {
    /// The gap an accepted event at this step records (`gap_from`, `gap_to`).
    pub fn gap(self) -> Option<(u64, u64)> {
        match self {
            Step::FirstWithGap { from, to } | Step::Gap { from, to } => Some((from, to)),
            _ => None,
        }
    }

    /// Whether the node appends an event at this step.
    pub fn appends(self) -> bool {
        !matches!(self, Step::Broken | Step::Behind)
    }
}

/// The largest `seq` a payload may carry: one below `u64::MAX`, so every accepted event
/// has a successor.
pub const MAX_SEQ: u64 = u64::MAX - 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_at_its_edges() {
        let head = Head {
            seq: 5,
            digest: [7; 32],
        };
        assert_eq!(step(None, 0, None), Step::First);
        assert_eq!(step(None, 3, Some([1; 32])), Step::FirstWithGap { from: 0, to: 2 });
        assert_eq!(
            step(None, u64::MAX, None),
            Step::FirstWithGap {
                from: 0,
                to: u64::MAX - 1
            }
        );
        assert_eq!(step(Some(&head), 6, Some([7; 32])), Step::Next);
        assert_eq!(step(Some(&head), 6, Some([8; 32])), Step::Broken);
        assert_eq!(step(Some(&head), 6, None), Step::Broken);
        assert_eq!(step(Some(&head), 9, None), Step::Gap { from: 6, to: 8 });
        assert_eq!(step(Some(&head), 5, Some([7; 32])), Step::Behind);
        assert_eq!(step(Some(&head), 0, None), Step::Behind);
        let last = Head {
            seq: u64::MAX,
            digest: [0; 32],
        };
        // A head at u64::MAX (only an old store could hold one) has no successor: every
        // seq is behind it, and nothing overflows.
        assert_eq!(step(Some(&last), u64::MAX, None), Step::Behind);
        assert_eq!(step(Some(&last), 0, None), Step::Behind);
    }
}
