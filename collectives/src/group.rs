//! A communicator's protocol state, sans-IO: the sequence of collectives a group of ranks runs,
//! and the routing of each arriving message to the collective it belongs to. Drivers (the tokio
//! `Communicator`, the simulator) only move bytes and time; the composition is here, so both run
//! the same program.
//!
//! Call order: `start_*` one collective; drain [`Group::poll_send`]; feed arrivals to
//! [`Group::handle_message`]; when [`Group::is_done`], take the result with
//! [`Group::finish`]. A message for a collective this rank has not started yet is kept for it;
//! one for a finished (or abandoned) collective is dropped and counted.

use bytes::Bytes;

use crate::alltoall::AllToAll;
use crate::executor::{ExecError, Executor};
use crate::reduce::{DType, ReduceOp};
use crate::schedule::{halving_doubling, ring, Collective, Schedule};

/// Buffers below this size use recursive doubling (fewer rounds), larger ones the ring (fewer
/// bytes per rank). A first heuristic, to be tuned by `phalanx bench`.
pub const SMALL_ALL_REDUCE_BYTES: usize = 64 << 10;

/// How to run an all-reduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllReduceAlgorithm {
    /// Choose by size.
    Auto,
    /// Ring (bandwidth-optimal).
    Ring,
    /// Recursive doubling (latency-optimal).
    RecursiveDoubling,
}

/// The all-reduce schedule for `rank` of `world` with `algorithm`, for a buffer of `bytes`.
pub fn all_reduce_schedule(algorithm: AllReduceAlgorithm, rank: usize, world: usize, bytes: usize) -> Schedule {
    match algorithm {
        AllReduceAlgorithm::RecursiveDoubling => halving_doubling::all_reduce(rank, world),
        AllReduceAlgorithm::Auto if bytes < SMALL_ALL_REDUCE_BYTES => halving_doubling::all_reduce(rank, world),
        _ => ring::schedule(Collective::AllReduce, rank, world).expect("the ring implements all-reduce"),
    }
}

/// The result of a finished collective.
#[derive(Debug, PartialEq, Eq)]
pub enum Finished {
    /// The buffer of a scheduled collective (all-reduce, all-gather, broadcast, …).
    Buffer(Vec<u8>),
    /// What each rank sent this one (all-to-all): index = source rank.
    Received(Vec<Bytes>),
}

enum Running {
    Schedule(Executor),
    AllToAll(AllToAll),
}

/// The collectives of one group, as one state machine.
pub struct Group {
    rank: usize,
    world: usize,
    next_op: u64,
    running: Option<(u64, Running)>,
    backlog: Vec<(u64, usize, Vec<Bytes>)>,
    stale_dropped: u64,
}

impl Group {
    /// A group of `world` ranks; this is `rank`.
    pub fn new(rank: usize, world: usize) -> Group {
        assert!(rank < world, "rank {rank} outside world {world}");
        Group { rank, world, next_op: 1, running: None, backlog: Vec::new(), stale_dropped: 0 }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the group.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Messages dropped because their collective was already finished or abandoned.
    pub fn stale_dropped(&self) -> u64 {
        self.stale_dropped
    }

    fn start(&mut self, make: impl FnOnce(u64) -> Running) -> u64 {
        assert!(self.running.is_none(), "one collective at a time per group");
        let op = self.next_op;
        self.next_op += 1;
        self.running = Some((op, make(op)));
        // Messages that arrived before this rank started the collective.
        let (mine, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.backlog).into_iter().partition(|(s, ..)| *s == op);
        self.backlog = later;
        for (_, from, m) in mine {
            self.deliver(from, m);
        }
        op
    }

    /// Starts a scheduled collective on `buf`; returns its sequence number.
    pub fn start_schedule(&mut self, schedule: Schedule, dtype: DType, op: ReduceOp, buf: Vec<u8>) -> u64 {
        let world = self.world;
        self.start(|seq| Running::Schedule(Executor::new(schedule, seq, dtype, op, world, buf)))
    }

    /// Starts an all-to-all(-v): `send[d]` goes to rank `d`.
    pub fn start_all_to_all(&mut self, send: Vec<Bytes>) -> u64 {
        assert_eq!(send.len(), self.world, "one send buffer per rank");
        let rank = self.rank;
        self.start(|seq| Running::AllToAll(AllToAll::new(rank, seq, send)))
    }

    /// The next message to send: `(destination rank, bytes)`.
    pub fn poll_send(&mut self) -> Option<(usize, Bytes)> {
        match &mut self.running {
            Some((_, Running::Schedule(e))) => e.poll_send(),
            Some((_, Running::AllToAll(a))) => a.poll_send(),
            None => None,
        }
    }

    fn deliver(&mut self, from: usize, chunks: Vec<Bytes>) {
        let result: Result<(), ExecError> = match &mut self.running {
            Some((_, Running::Schedule(e))) => e.handle_chunks(from, &chunks),
            Some((_, Running::AllToAll(a))) => a.handle_message(from, concat(chunks)),
            None => Ok(()),
        };
        if result.is_err() {
            self.stale_dropped += 1;
        }
    }

    /// A message from `from` arrived (as the transport's chunks).
    pub fn handle_message(&mut self, from: usize, chunks: Vec<Bytes>) {
        let mut head = [0u8; 8];
        let mut have = 0;
        for c in &chunks {
            let n = (8 - have).min(c.len());
            head[have..have + n].copy_from_slice(&c[..n]);
            have += n;
        }
        if have < 8 {
            self.stale_dropped += 1;
            return;
        }
        let seq = u64::from_le_bytes(head);
        match &self.running {
            Some((op, _)) if seq == *op => self.deliver(from, chunks),
            _ if seq >= self.next_op => self.backlog.push((seq, from, chunks)),
            _ => self.stale_dropped += 1,
        }
    }

    /// Whether the running collective (if any) has finished.
    pub fn is_done(&self) -> bool {
        match &self.running {
            Some((_, Running::Schedule(e))) => e.is_done(),
            Some((_, Running::AllToAll(a))) => a.is_done(),
            None => false,
        }
    }

    /// Ranks the running collective still waits for.
    pub fn waiting_on(&self) -> Vec<usize> {
        match &self.running {
            Some((_, Running::Schedule(e))) => e.waiting_on(),
            Some((_, Running::AllToAll(a))) => a.waiting_on(),
            None => Vec::new(),
        }
    }

    /// Takes the result of a finished collective (`None` while it runs or if none was started).
    pub fn finish(&mut self) -> Option<Finished> {
        if !self.is_done() {
            return None;
        }
        match self.running.take() {
            Some((_, Running::Schedule(e))) => Some(Finished::Buffer(e.into_buffer())),
            Some((_, Running::AllToAll(a))) => Some(Finished::Received(a.into_received())),
            None => None,
        }
    }

    /// Gives up the running collective (its deadline passed): later messages for it are dropped.
    pub fn abandon(&mut self) {
        self.running = None;
    }
}

/// One contiguous buffer from chunks (no copy for a single chunk).
fn concat(chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.into_iter().next().expect("one chunk"),
        _ => chunks.concat().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reduce::{element_f64, set_element_f64};

    fn buf(vals: &[f64]) -> Vec<u8> {
        let mut b = vec![0u8; vals.len() * 4];
        for (i, v) in vals.iter().enumerate() {
            set_element_f64(DType::F32, &mut b, i, *v);
        }
        b
    }

    #[test]
    fn messages_for_a_collective_not_yet_started_wait_for_it_and_stale_ones_are_dropped() {
        let world = 2;
        let mut g: Vec<Group> = (0..world).map(|r| Group::new(r, world)).collect();
        let sched = |r| all_reduce_schedule(AllReduceAlgorithm::Ring, r, world, 1 << 20);
        // Rank 0 runs two all-reduces in a row before rank 1 starts the first.
        g[0].start_schedule(sched(0), DType::F32, ReduceOp::Sum, buf(&[1.0, 2.0]));
        let first: Vec<_> = std::iter::from_fn(|| g[0].poll_send()).collect();
        g[1].start_schedule(sched(1), DType::F32, ReduceOp::Sum, buf(&[10.0, 20.0]));
        for (_, m) in first {
            g[1].handle_message(0, vec![m]);
        }
        let back: Vec<_> = std::iter::from_fn(|| g[1].poll_send()).collect();
        for (_, m) in back {
            g[0].handle_message(1, vec![m]);
        }
        // Drive to completion.
        for _ in 0..10 {
            for r in 0..world {
                while let Some((to, m)) = g[r].poll_send() {
                    g[to].handle_message(r, vec![m]);
                }
            }
        }
        for (r, gr) in g.iter_mut().enumerate() {
            let Some(Finished::Buffer(b)) = gr.finish() else { panic!("rank {r} finished") };
            assert_eq!((element_f64(DType::F32, &b, 0), element_f64(DType::F32, &b, 1)), (11.0, 22.0));
        }
        // Rank 0 starts the second; its message reaches rank 1 before rank 1 starts it.
        g[0].start_schedule(sched(0), DType::F32, ReduceOp::Sum, buf(&[3.0, 3.0]));
        let early: Vec<_> = std::iter::from_fn(|| g[0].poll_send()).collect();
        for (_, m) in early {
            g[1].handle_message(0, vec![m.clone()]);
        }
        g[1].start_schedule(sched(1), DType::F32, ReduceOp::Sum, buf(&[4.0, 4.0]));
        for _ in 0..10 {
            for r in 0..world {
                while let Some((to, m)) = g[r].poll_send() {
                    g[to].handle_message(r, vec![m]);
                }
            }
        }
        let Some(Finished::Buffer(b)) = g[1].finish() else { panic!("rank 1 finished the second") };
        assert_eq!(element_f64(DType::F32, &b, 0), 7.0);
        // A message of the first collective arriving now is stale.
        let mut stale = 1u64.to_le_bytes().to_vec();
        stale.extend_from_slice(&[0u8; 12]);
        g[1].handle_message(0, vec![Bytes::from(stale)]);
        assert_eq!(g[1].stale_dropped(), 1);
    }
}
