//! All-to-all and all-to-all-v by pairwise exchange (MoE token dispatch and combine).
//!
//! Rank `r` holds one buffer per destination (any sizes, including empty: all-to-all-v) and
//! ends with one buffer per source. In round `k = 1 … n − 1` it sends its buffer for
//! `r + k` and receives the one from `r − k` (mod `n`): every round is a permutation, so no rank
//! receives from two peers at once (no incast). Its own buffer is moved locally.
//!
//! Cost: `n − 1` rounds; each rank sends what it has for the others, `(n − 1)·S/n` bytes for a
//! balanced all-to-all of `S` bytes per rank.
//!
//! The executor is sans-IO like [`crate::executor::Executor`]: `poll_send`, `handle_message`,
//! `is_done`. A round's send is posted once the receive two rounds before it is in (MPI's
//! pairwise pacing, one round of look-ahead: see `SEND_WINDOW`); messages for later rounds are
//! kept until their round.
//!
//! Under faults: [`AllToAll::peer_lost`] tells it a peer is gone; the rounds with that peer are
//! skipped, the call still completes, and what this rank had for the lost peer comes back in
//! [`AllToAllResult::undelivered`] (the MoE layer treats those tokens as dropped). Whatever the
//! lost peer had for this rank is missing from the result, and the peer is named in
//! [`AllToAllResult::lost`].

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use phalanx_proto::Payload;

use crate::executor::ExecError;

/// Bytes of an all-to-all message's header: `op_seq u64 | round u32 | sender u32`.
const MESSAGE_HEADER: usize = 16;

/// Rounds a rank's sends may run ahead of its receives: 1 is MPI's pairwise pacing (round
/// `k + 1`'s send waits for round `k`'s receive); 2 posts round `k + 1`'s send while round
/// `k`'s transfer is under way, so the link never idles between rounds, and still no rank
/// receives from more than two peers at once. 64 MiB at world 4: 57 ms against 57-62 ms with 1
/// (docs/performance.md).
const SEND_WINDOW: usize = 2;

/// Buffers up to this size are copied behind the message header (one part, one transport
/// frame); larger ones are sent as a part of their own, uncopied.
const COPY_MAX: usize = 64 << 10;

/// The pairwise schedule of `rank`: for each round, `(send to, receive from)`.
pub fn pairwise(rank: usize, world: usize) -> Vec<(usize, usize)> {
    assert!(rank < world, "rank {rank} outside world {world}");
    (1..world).map(|k| ((rank + k) % world, (rank + world - k) % world)).collect()
}

/// Runs one rank's all-to-all(-v).
pub struct AllToAll {
    rank: usize,
    op_seq: u64,
    rounds: Vec<(usize, usize)>,
    outgoing: Vec<Option<Bytes>>,
    incoming: Vec<Option<Bytes>>,
    /// Rounds whose receive is in.
    round: usize,
    /// Rounds whose send has been posted.
    posted: usize,
    early: BTreeMap<usize, Bytes>,
    outbox: Option<(usize, Payload)>,
    /// What was sent to each peer (reference-counted, not copied): handed back if it is lost.
    sent: Vec<Option<Bytes>>,
    lost: BTreeSet<usize>,
}

/// What an all-to-all produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllToAllResult {
    /// `received[s]`: what rank `s` sent to this rank (empty if it sent nothing or was lost).
    pub received: Vec<Bytes>,
    /// Peers lost during the call, ascending.
    pub lost: Vec<usize>,
    /// `(peer, data)`: what this rank had for each lost peer, handed back undelivered.
    pub undelivered: Vec<(usize, Bytes)>,
}

impl AllToAll {
    /// `send[d]` is what this rank sends to rank `d` (`send.len()` is the world size).
    pub fn new(rank: usize, op_seq: u64, send: Vec<Bytes>) -> AllToAll {
        let world = send.len();
        let rounds = pairwise(rank, world);
        let mut outgoing: Vec<Option<Bytes>> = send.into_iter().map(Some).collect();
        let mut incoming = vec![None; world];
        incoming[rank] = outgoing[rank].take();
        let mut a = AllToAll {
            rank,
            op_seq,
            rounds,
            outgoing,
            incoming,
            round: 0,
            posted: 0,
            early: BTreeMap::new(),
            outbox: None,
            sent: vec![None; world],
            lost: BTreeSet::new(),
        };
        a.advance();
        a
    }

    /// Posts sends and consumes receives as far as the rounds allow. Round `k`'s send is posted
    /// once the sends before it have been handed out and the receives of rounds before
    /// `k + 1 - SEND_WINDOW` are in.
    fn advance(&mut self) {
        loop {
            while self.round < self.rounds.len() {
                let from = self.rounds[self.round].1;
                continue_receive(self, from);
                if self.incoming[from].is_none() && !self.lost.contains(&from) {
                    break;
                }
                self.round += 1;
            }
            if self.outbox.is_some() || self.posted >= self.rounds.len() || self.posted >= self.round + SEND_WINDOW {
                return;
            }
            let to = self.rounds[self.posted].0;
            let data = self.outgoing[to].take().unwrap_or_default();
            self.sent[to] = Some(data.clone());
            if !self.lost.contains(&to) {
                // A large buffer goes out as the second part of the message, not copied; a
                // small one is copied behind the header, so that the message is one frame.
                let small = data.len() <= COPY_MAX;
                let mut h = BytesMut::with_capacity(MESSAGE_HEADER + if small { data.len() } else { 0 });
                h.put_u64_le(self.op_seq);
                h.put_u32_le(self.posted as u32);
                h.put_u32_le(self.rank as u32);
                let mut m = Payload::new();
                if small {
                    h.put_slice(&data);
                    m.push(h.freeze());
                } else {
                    m.push(h.freeze());
                    m.push(data);
                }
                self.outbox = Some((to, m));
            }
            self.posted += 1;
        }
    }

    /// Peer `rank` is gone (the transport declared it unreachable): rounds with it are skipped,
    /// and a message to it not yet handed out is withdrawn.
    pub fn peer_lost(&mut self, rank: usize) {
        if rank == self.rank || rank >= self.sent.len() || !self.lost.insert(rank) {
            return;
        }
        if matches!(self.outbox, Some((to, _)) if to == rank) {
            self.outbox = None;
        }
        self.advance();
    }

    /// The next message: `(destination rank, its parts)` — the header, then the buffer itself.
    pub fn poll_send(&mut self) -> Option<(usize, Payload)> {
        let out = self.outbox.take();
        if out.is_some() {
            self.advance();
        }
        out
    }

    /// A message from `from` arrived. Errors leave the state unchanged.
    pub fn handle_message(&mut self, from: usize, mut msg: Bytes) -> Result<(), ExecError> {
        if msg.len() < MESSAGE_HEADER {
            return Err(ExecError::Truncated { from, len: msg.len(), need: MESSAGE_HEADER });
        }
        let op_seq = msg.get_u64_le();
        let round = msg.get_u32_le();
        let claimed = msg.get_u32_le();
        if op_seq != self.op_seq {
            return Err(ExecError::OtherCollective { from, found: op_seq, expected: self.op_seq });
        }
        let r = round as usize;
        let expected_from = self.rounds.get(r).map(|x| x.1);
        // Refused: the wrong peer for that round, a round already done, or a second copy.
        if expected_from != Some(from) || claimed as usize != from || r < self.round || self.early.contains_key(&r) {
            return Err(ExecError::Unexpected { from, round, block: claimed });
        }
        self.early.insert(r, msg);
        self.advance();
        Ok(())
    }

    /// The rank whose message the current round waits for.
    pub fn waiting_on(&self) -> Vec<usize> {
        self.rounds.get(self.round).map(|r| vec![r.1]).unwrap_or_default()
    }

    /// Whether every buffer has arrived.
    pub fn is_done(&self) -> bool {
        self.round == self.rounds.len() && self.posted == self.rounds.len() && self.outbox.is_none()
    }

    /// `recv[s]` is what rank `s` sent to this rank (empty if it sent nothing). Call when done.
    pub fn into_received(self) -> Vec<Bytes> {
        self.into_result().received
    }

    /// The whole result: what arrived, who was lost, and what is handed back. Call when done.
    pub fn into_result(mut self) -> AllToAllResult {
        let lost: Vec<usize> = self.lost.iter().copied().collect();
        let undelivered = lost
            .iter()
            .map(|&p| (p, self.sent[p].take().or_else(|| self.outgoing[p].take()).unwrap_or_default()))
            .collect();
        let received = self
            .incoming
            .into_iter()
            .enumerate()
            .map(|(s, b)| if self.lost.contains(&s) { Bytes::new() } else { b.unwrap_or_default() })
            .collect();
        AllToAllResult { received, lost, undelivered }
    }
}

/// Takes the early message of the current round from `from`, if it is in.
fn continue_receive(a: &mut AllToAll, from: usize) {
    if let Some(data) = a.early.remove(&a.round) {
        a.incoming[from] = Some(data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[test]
    fn every_round_of_the_pairwise_schedule_is_a_permutation() {
        for world in 1..=33 {
            let all: Vec<_> = (0..world).map(|r| pairwise(r, world)).collect();
            for k in 0..world.saturating_sub(1) {
                let mut receivers: Vec<usize> = all.iter().map(|s| s[k].0).collect();
                receivers.sort_unstable();
                assert_eq!(receivers, (0..world).collect::<Vec<_>>(), "round {k} of world {world}");
                for (r, s) in all.iter().enumerate() {
                    assert_eq!(all[s[k].0][k].1, r, "send and receive match");
                }
            }
        }
    }

    fn payload(src: usize, dst: usize, len: usize) -> Bytes {
        Bytes::from((0..len).map(|i| (src * 31 + dst * 7 + i) as u8).collect::<Vec<u8>>())
    }

    proptest! {
        #[test]
        fn all_to_all_v_delivers_every_buffer_exactly_once_to_its_destination(
            world in 1usize..=12,
            sizes in proptest::collection::vec(0usize..200, 144),
            picks in proptest::collection::vec(any::<usize>(), 0..300),
        ) {
            let len = |s: usize, d: usize| sizes[s * 12 + d];
            let mut ex: Vec<AllToAll> = (0..world)
                .map(|s| AllToAll::new(s, 3, (0..world).map(|d| payload(s, d, len(s, d))).collect()))
                .collect();
            let mut queues: BTreeMap<(usize, usize), VecDeque<Bytes>> = BTreeMap::new();
            for i in 0..100_000 {
                for (r, e) in ex.iter_mut().enumerate() {
                    while let Some((to, m)) = e.poll_send() {
                        queues.entry((r, to)).or_default().push_back(m.to_bytes());
                    }
                }
                let live: Vec<_> = queues.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
                if live.is_empty() {
                    break;
                }
                let (from, to) = live[picks.get(i).copied().unwrap_or(0) % live.len()];
                let m = queues.get_mut(&(from, to)).unwrap().pop_front().unwrap();
                ex[to].handle_message(from, m).unwrap();
            }
            for (d, e) in ex.into_iter().enumerate() {
                prop_assert!(e.is_done());
                let got = e.into_received();
                for (s, b) in got.iter().enumerate() {
                    prop_assert_eq!(b, &payload(s, d, len(s, d)));
                }
            }
        }
    }

    #[test]
    fn a_large_buffer_goes_out_uncopied_behind_its_header_and_a_small_one_in_one_part() {
        let big = payload(0, 1, COPY_MAX + 1);
        let small = payload(0, 2, COPY_MAX);
        let mut a = AllToAll::new(0, 1, vec![payload(0, 0, 3), big.clone(), small.clone()]);
        let mut sent = Vec::new();
        while let Some((to, m)) = a.poll_send() {
            sent.push((to, m));
            // Round 0 receives from rank 2; round 1 from rank 1: let both rounds post.
            let round = sent.len() - 1;
            let from = pairwise(0, 3)[round].1;
            let mut msg = 1u64.to_le_bytes().to_vec();
            msg.extend_from_slice(&(round as u32).to_le_bytes());
            msg.extend_from_slice(&(from as u32).to_le_bytes());
            a.handle_message(from, Bytes::from(msg)).unwrap();
        }
        assert_eq!(sent.len(), 2);
        let (to_big, m_big) = &sent[0];
        assert_eq!(*to_big, 1);
        assert_eq!(m_big.chunks().len(), 2, "header, then the buffer");
        assert_eq!(m_big.chunks()[1].as_ptr(), big.as_ptr(), "the caller's buffer itself");
        let (to_small, m_small) = &sent[1];
        assert_eq!(*to_small, 2);
        assert_eq!(m_small.chunks().len(), 1, "one part");
        assert_eq!(&m_small.to_bytes()[MESSAGE_HEADER..], &small[..]);
        assert!(a.is_done());
    }

    #[test]
    fn a_second_copy_or_a_message_from_the_wrong_peer_is_refused() {
        let world = 3;
        let mut a = AllToAll::new(0, 1, (0..world).map(|d| payload(0, d, 4)).collect());
        let msg = |round: u32, from: u32| {
            let mut v = 1u64.to_le_bytes().to_vec();
            v.extend_from_slice(&round.to_le_bytes());
            v.extend_from_slice(&from.to_le_bytes());
            Bytes::from(v)
        };
        // Round 0 of rank 0 receives from rank 2.
        assert!(a.handle_message(1, msg(0, 1)).is_err());
        assert!(a.handle_message(2, msg(0, 2)).is_ok());
        assert!(a.handle_message(2, msg(0, 2)).is_err(), "duplicate");
    }
}
