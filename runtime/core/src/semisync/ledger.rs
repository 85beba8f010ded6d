//! The accounting of outer gradients: nothing offered is silently lost.
//!
//! Every sync round a rank *offers* one new contribution (its outer gradient for a fragment).
//! A contribution ends up **applied** (it is in a round's result), **pending** (its round went
//! on without it — late under a quorum — and it is carried, added into the rank's next
//! contribution for that fragment), or **dropped** (the round failed on this rank: deadline,
//! lost peers under `Abort`; reported, never silent). At every moment
//! `offered == applied + pending + dropped`.

/// One rank's counts (cumulative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    /// New contributions made.
    pub offered: u64,
    /// Contributions in an applied round's result (a carried one counts when it lands).
    pub applied: u64,
    /// Contributions carried into a later round, not yet applied.
    pub pending: u64,
    /// Contributions given up, with an error reported to the trainer.
    pub dropped: u64,
}

impl Ledger {
    /// Whether `offered == applied + pending + dropped`.
    pub fn balanced(&self) -> bool {
        self.offered == self.applied + self.pending + self.dropped
    }

    /// A round offers one new contribution plus `carried` earlier ones; returns how many ride in it.
    pub fn offer(&mut self, carried: u64) -> u64 {
        self.offered += 1;
        self.pending -= carried;
        carried + 1
    }

    /// The round's contributions were applied.
    pub fn applied(&mut self, riding: u64) {
        self.applied += riding;
    }

    /// The round went on without them: carried to the next round.
    pub fn carried(&mut self, riding: u64) {
        self.pending += riding;
    }

    /// The round failed on this rank: given up and reported.
    pub fn dropped(&mut self, riding: u64) {
        self.dropped += riding;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_carried_contribution_is_counted_once_wherever_it_ends() {
        let mut l = Ledger::default();
        let r = l.offer(0);
        l.carried(r); // late in round 1
        assert!(l.balanced());
        assert_eq!(l.pending, 1);
        let r = l.offer(1); // round 2 carries it
        assert_eq!(r, 2);
        l.applied(r);
        assert_eq!(l, Ledger { offered: 2, applied: 2, pending: 0, dropped: 0 });
        let r = l.offer(0);
        l.dropped(r);
        assert!(l.balanced());
        assert_eq!(l.dropped, 1);
    }
}
