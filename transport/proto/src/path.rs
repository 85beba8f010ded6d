//! One path to a peer: health, round-trip time and the frames in flight on it.

use std::collections::VecDeque;
use std::time::Duration;

use crate::counters::LinkCounters;
use crate::ids::{LinkId, RankId};
use crate::time::Instant;

/// One transmission of a data frame on a path, awaiting acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct InFlight {
    /// Final destination of the frame (the path's peer, or a rank behind it when relayed).
    pub dst: RankId,
    /// Session sequence number.
    pub seq: u64,
    /// Transmission id; only the latest transmission of a sequence number triggers loss.
    pub tx: u64,
    /// Wire bytes.
    pub bytes: u64,
    /// When it was handed to the link.
    pub sent_at: Instant,
}

/// State of one live link.
///
/// Invariant: `inflight_bytes` is the sum of `inflight[..].bytes`. Links carry frames in FIFO
/// order (a TCP connection, a QUIC stream, a pipe), which is what makes "a later frame on this
/// path was acknowledged and an earlier one was not" proof that the earlier one was lost.
#[derive(Debug)]
pub(crate) struct PathState {
    pub peer: RankId,
    pub counters: LinkCounters,
    pub last_recv: Instant,
    pub next_heartbeat: Instant,
    pub srtt: Option<Duration>,
    pub rttvar: Duration,
    pub rto_backoff: u32,
    pub inflight: VecDeque<InFlight>,
    pub inflight_bytes: u64,
    /// Ranks the peer says it reaches directly (sorted), from its last heartbeat.
    pub advertised: Vec<RankId>,
    pub stale_epoch_reported: bool,
}

impl PathState {
    pub fn new(peer: RankId, now: Instant) -> PathState {
        PathState {
            peer,
            counters: LinkCounters::default(),
            last_recv: now,
            next_heartbeat: now,
            srtt: None,
            rttvar: Duration::ZERO,
            rto_backoff: 0,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            advertised: Vec::new(),
            stale_epoch_reported: false,
        }
    }

    /// Folds an RTT sample in (RFC 6298 smoothing).
    pub fn on_rtt_sample(&mut self, sample: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(sample);
                self.rttvar = sample / 2;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(sample);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((srtt * 7 + sample) / 8);
            }
        }
    }

    /// Current retransmission timeout, with exponential backoff after timeouts.
    pub fn rto(&self, min_rto: Duration) -> Duration {
        let base = match self.srtt {
            Some(srtt) => (srtt + self.rttvar * 4).max(min_rto),
            None => min_rto,
        };
        base * (1u32 << self.rto_backoff.min(6))
    }

    pub fn push_inflight(&mut self, entry: InFlight) {
        self.inflight_bytes += entry.bytes;
        self.inflight.push_back(entry);
    }

    /// Removes every entry for `dst` that `is_acked` says was acknowledged, and returns the
    /// entries for `dst` that were overtaken by a later acknowledged entry (lost on this path).
    /// Only sequence numbers below `known_below` are judged lost: the ack said nothing about
    /// the others (its range list was truncated).
    pub fn settle_acks(
        &mut self,
        dst: RankId,
        known_below: u64,
        mut is_acked: impl FnMut(u64) -> bool,
    ) -> (Vec<InFlight>, bool) {
        let last_acked = self.inflight.iter().rposition(|e| e.dst == dst && is_acked(e.seq));
        let Some(last_acked) = last_acked else {
            return (Vec::new(), false);
        };
        let mut lost = Vec::new();
        let mut i = 0usize;
        let mut removed_bytes = 0u64;
        self.inflight.retain(|e| {
            let idx = i;
            i += 1;
            if e.dst != dst {
                return true;
            }
            if is_acked(e.seq) {
                removed_bytes += e.bytes;
                return false;
            }
            if idx < last_acked && e.seq < known_below {
                lost.push(*e);
                removed_bytes += e.bytes;
                return false;
            }
            true
        });
        self.inflight_bytes -= removed_bytes;
        (lost, true)
    }

    /// Drops every entry for `dst` (its session was reset or abandoned).
    pub fn forget_dst(&mut self, dst: RankId) {
        let mut removed = 0u64;
        self.inflight.retain(|e| {
            if e.dst == dst {
                removed += e.bytes;
                false
            } else {
                true
            }
        });
        self.inflight_bytes -= removed;
    }

    pub fn reaches(&self, dst: RankId) -> bool {
        self.advertised.binary_search(&dst).is_ok()
    }

    pub fn check_invariants(&self, _id: LinkId) {
        debug_assert_eq!(
            self.inflight_bytes,
            self.inflight.iter().map(|e| e.bytes).sum::<u64>(),
            "inflight_bytes drifted from its entries"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dst: u32, seq: u64) -> InFlight {
        InFlight { dst: RankId(dst), seq, tx: seq, bytes: 10, sent_at: Instant(0) }
    }

    #[test]
    fn later_ack_on_a_fifo_path_marks_earlier_unacked_frames_lost() {
        let mut p = PathState::new(RankId(1), Instant(0));
        for (d, s) in [(1, 0), (2, 7), (1, 1), (1, 2), (1, 3)] {
            p.push_inflight(entry(d, s));
        }
        let (lost, any) = p.settle_acks(RankId(1), u64::MAX, |s| s == 2);
        assert!(any);
        assert_eq!(lost.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![0, 1]);
        // The frame for another destination and the one after the ack stay in flight.
        assert_eq!(p.inflight.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![7, 3]);
        assert_eq!(p.inflight_bytes, 20);
    }

    #[test]
    fn frames_an_ack_says_nothing_about_are_not_judged_lost() {
        let mut p = PathState::new(RankId(1), Instant(0));
        for s in [5, 9, 3] {
            p.push_inflight(entry(1, s));
        }
        // Seq 3 (a retransmission) was acknowledged; the ack's ranges stopped at 4, so 5 and
        // 9 are unknown, not lost.
        let (lost, _) = p.settle_acks(RankId(1), 4, |s| s == 3);
        assert!(lost.is_empty());
        assert_eq!(p.inflight.len(), 2);
    }

    #[test]
    fn rto_backs_off_exponentially_and_respects_the_floor() {
        let mut p = PathState::new(RankId(1), Instant(0));
        let floor = Duration::from_millis(100);
        assert_eq!(p.rto(floor), floor);
        p.on_rtt_sample(Duration::from_millis(1));
        assert_eq!(p.rto(floor), floor);
        p.rto_backoff = 2;
        assert_eq!(p.rto(floor), floor * 4);
    }
}
