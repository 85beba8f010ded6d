//! A communicator: a fixed group of ranks running collectives over one `phalanx-net` node.
//!
//! Every collective gets the next sequence number; its messages carry it, so messages of a
//! collective that a faster rank already started are kept for it, and stale ones are dropped.
//! Every call has a deadline: it never blocks past it, and the error names the ranks it was
//! still waiting for. (Fault policies — shrink, quorum — come with the rest of issue #3.)

use std::time::Duration;

use bytes::Bytes;
use phalanx_collectives::alltoall::AllToAll;
use phalanx_collectives::executor::{ExecError, Executor};
use phalanx_collectives::reduce::{DType, ReduceOp};
use phalanx_collectives::schedule::{halving_doubling, ring, tree, Collective, Schedule};
use phalanx_net::{Node, NodeError};
use phalanx_proto::{ChannelId, Event, RankId};
use thiserror::Error;
use tracing::{debug, info_span, Instrument};

/// The transport channel collectives use.
pub const COLLECTIVE_CHANNEL: ChannelId = ChannelId(1000);

/// Buffers below this size use recursive doubling (fewer rounds), larger ones the ring (fewer
/// bytes per rank). A first heuristic, to be tuned by `phalanx bench`.
const SMALL_ALL_REDUCE_BYTES: usize = 64 << 10;

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

/// Why a collective failed.
#[derive(Debug, Error)]
pub enum CommError {
    /// The deadline passed; the collective was abandoned on this rank.
    #[error("collective #{op_seq} missed its deadline of {deadline:?}, still waiting for ranks {waiting:?}")]
    Deadline {
        /// The collective's sequence number.
        op_seq: u64,
        /// The deadline.
        deadline: Duration,
        /// Ranks whose messages the collective was still waiting for.
        waiting: Vec<usize>,
    },
    /// A peer became unreachable during the collective.
    #[error("collective #{op_seq} lost rank {rank}: unreachable")]
    PeerLost {
        /// The collective's sequence number.
        op_seq: u64,
        /// The lost rank.
        rank: usize,
    },
    /// The transport refused a send or shut down.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The buffer does not fit the call.
    #[error("bad buffer: {0}")]
    Buffer(String),
}

/// The executors the communicator drives.
enum Running {
    Schedule(Executor),
    AllToAll(AllToAll),
}

impl Running {
    fn poll_send(&mut self) -> Option<(usize, Bytes)> {
        match self {
            Running::Schedule(e) => e.poll_send(),
            Running::AllToAll(a) => a.poll_send(),
        }
    }
    fn handle_chunks(&mut self, from: usize, chunks: Vec<Bytes>) -> Result<(), ExecError> {
        match self {
            Running::Schedule(e) => e.handle_chunks(from, &chunks),
            // All-to-all hands buffers back whole, so it takes one contiguous buffer.
            Running::AllToAll(a) => a.handle_message(from, concat(chunks)),
        }
    }
    fn is_done(&self) -> bool {
        match self {
            Running::Schedule(e) => e.is_done(),
            Running::AllToAll(a) => a.is_done(),
        }
    }
    fn waiting_on(&self) -> Vec<usize> {
        match self {
            Running::Schedule(e) => e.waiting_on(),
            Running::AllToAll(a) => a.waiting_on(),
        }
    }
}

/// A group of `world` ranks (ids `0..world`, this one `rank`) over a started node.
pub struct Communicator {
    node: Node,
    rank: usize,
    world: usize,
    next_op: u64,
    /// Messages that arrived for collectives this rank has not started yet.
    backlog: Vec<(usize, Vec<Bytes>)>,
}

impl Communicator {
    /// A communicator over `node` (whose paths reach every other rank).
    pub fn new(node: Node, rank: usize, world: usize) -> Communicator {
        assert!(rank < world, "rank {rank} outside world {world}");
        Communicator { node, rank, world, next_op: 1, backlog: Vec::new() }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The underlying node (counters, fault hooks).
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// All-reduce of `buf` (whole elements of `dtype`); every rank gets the same bits.
    pub async fn all_reduce(
        &mut self,
        buf: Vec<u8>,
        dtype: DType,
        op: ReduceOp,
        algorithm: AllReduceAlgorithm,
        deadline: Duration,
    ) -> Result<Vec<u8>, CommError> {
        check_elements(&buf, dtype)?;
        let small = buf.len() < SMALL_ALL_REDUCE_BYTES;
        let schedule = match algorithm {
            AllReduceAlgorithm::RecursiveDoubling => halving_doubling::all_reduce(self.rank, self.world),
            AllReduceAlgorithm::Auto if small => halving_doubling::all_reduce(self.rank, self.world),
            _ => ring_schedule(Collective::AllReduce, self.rank, self.world),
        };
        self.run_schedule(schedule, dtype, op, buf, deadline, "all_reduce").await
    }

    /// All-gather: `buf` is the whole gathered buffer (`world` blocks as
    /// `phalanx_collectives::schedule::block_range` splits it); this rank's block must be
    /// filled; every rank ends with every block.
    pub async fn all_gather(&mut self, buf: Vec<u8>, dtype: DType, deadline: Duration) -> Result<Vec<u8>, CommError> {
        check_elements(&buf, dtype)?;
        let schedule = ring_schedule(Collective::AllGather, self.rank, self.world);
        self.run_schedule(schedule, dtype, ReduceOp::Sum, buf, deadline, "all_gather").await
    }

    /// Reduce-scatter: afterwards this rank's block (`block_range(count, world, rank)`) holds
    /// the reduction over all ranks; the rest of `buf` is scratch.
    pub async fn reduce_scatter(
        &mut self,
        buf: Vec<u8>,
        dtype: DType,
        op: ReduceOp,
        deadline: Duration,
    ) -> Result<Vec<u8>, CommError> {
        check_elements(&buf, dtype)?;
        let schedule = ring_schedule(Collective::ReduceScatter, self.rank, self.world);
        self.run_schedule(schedule, dtype, op, buf, deadline, "reduce_scatter").await
    }

    /// Broadcast of `root`'s `buf` to every rank (others' `buf` gives the size).
    pub async fn broadcast(&mut self, buf: Vec<u8>, root: usize, deadline: Duration) -> Result<Vec<u8>, CommError> {
        let schedule = tree::broadcast(root, self.rank, self.world);
        self.run_schedule(schedule, DType::I32, ReduceOp::Sum, buf, deadline, "broadcast").await
    }

    /// Waits until every rank has entered the barrier (an all-reduce of nothing).
    pub async fn barrier(&mut self, deadline: Duration) -> Result<(), CommError> {
        let schedule = halving_doubling::all_reduce(self.rank, self.world);
        self.run_schedule(schedule, DType::I32, ReduceOp::Sum, Vec::new(), deadline, "barrier").await.map(|_| ())
    }

    /// All-to-all(-v): `send[d]` goes to rank `d`; returns `recv[s]`, what rank `s` sent here.
    pub async fn all_to_all(&mut self, send: Vec<Bytes>, deadline: Duration) -> Result<Vec<Bytes>, CommError> {
        if send.len() != self.world {
            return Err(CommError::Buffer(format!("{} send buffers for a world of {}", send.len(), self.world)));
        }
        let op_seq = self.take_op();
        let mut run = Running::AllToAll(AllToAll::new(self.rank, op_seq, send));
        let span = info_span!("collective", op = "all_to_all", op_seq, rank = self.rank, world = self.world);
        self.drive(&mut run, op_seq, deadline).instrument(span).await?;
        match run {
            Running::AllToAll(a) => Ok(a.into_received()),
            Running::Schedule(_) => unreachable!("started as all-to-all"),
        }
    }

    /// Waits until everything this rank sent has been acknowledged by its peers, or `timeout`
    /// passes (call before a process exits, so its last messages are not lost with it).
    /// Returns whether every peer acknowledged everything.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let handle = self.node.handle();
        let mut all = true;
        for peer in (0..self.world).filter(|p| *p != self.rank) {
            all &= handle.flush(RankId(peer as u32), timeout).await;
        }
        all
    }

    fn take_op(&mut self) -> u64 {
        let op = self.next_op;
        self.next_op += 1;
        op
    }

    async fn run_schedule(
        &mut self,
        schedule: Schedule,
        dtype: DType,
        op: ReduceOp,
        buf: Vec<u8>,
        deadline: Duration,
        name: &'static str,
    ) -> Result<Vec<u8>, CommError> {
        let op_seq = self.take_op();
        let mut run = Running::Schedule(Executor::new(schedule, op_seq, dtype, op, self.world, buf));
        let span = info_span!("collective", op = name, op_seq, rank = self.rank, world = self.world);
        self.drive(&mut run, op_seq, deadline).instrument(span).await?;
        match run {
            Running::Schedule(e) => Ok(e.into_buffer()),
            Running::AllToAll(_) => unreachable!("started as a schedule"),
        }
    }

    /// Moves messages between the executor and the node until it is done or the deadline.
    async fn drive(&mut self, run: &mut Running, op_seq: u64, deadline: Duration) -> Result<(), CommError> {
        let until = tokio::time::Instant::now() + deadline;
        let handle = self.node.handle();
        // Messages that arrived early for this collective.
        let backlog = std::mem::take(&mut self.backlog);
        for (from, m) in backlog {
            self.offer(run, op_seq, from, m);
        }
        loop {
            while let Some((to, m)) = run.poll_send() {
                handle.send(RankId(to as u32), COLLECTIVE_CHANNEL, m).await?;
            }
            if run.is_done() {
                return Ok(());
            }
            let event = match tokio::time::timeout_at(until, self.node.next_event()).await {
                Ok(Some(e)) => e,
                Ok(None) => return Err(CommError::Node(NodeError::Closed)),
                Err(_) => return Err(CommError::Deadline { op_seq, deadline, waiting: run.waiting_on() }),
            };
            match event {
                Event::Message(m) if m.channel == COLLECTIVE_CHANNEL => {
                    self.offer(run, op_seq, m.from.0 as usize, m.payload.chunks().to_vec());
                }
                Event::PeerUnreachable { peer, .. } => {
                    return Err(CommError::PeerLost { op_seq, rank: peer.0 as usize });
                }
                _ => {}
            }
        }
    }

    /// Hands a message to the running executor, or keeps it for a later collective.
    fn offer(&mut self, run: &mut Running, op_seq: u64, from: usize, m: Vec<Bytes>) {
        let mut head = [0u8; 8];
        let mut have = 0;
        for c in &m {
            let n = (8 - have).min(c.len());
            head[have..have + n].copy_from_slice(&c[..n]);
            have += n;
        }
        let seq = (have == 8).then(|| u64::from_le_bytes(head));
        match seq {
            Some(s) if s > op_seq => self.backlog.push((from, m)),
            Some(s) if s == op_seq => {
                if let Err(e) = run.handle_chunks(from, m) {
                    debug!(%e, "message refused");
                }
            }
            _ => debug!(from, "stale or malformed collective message dropped"),
        }
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

fn ring_schedule(c: Collective, rank: usize, world: usize) -> Schedule {
    ring::schedule(c, rank, world).expect("the ring implements reduce-scatter, all-gather and all-reduce")
}

fn check_elements(buf: &[u8], dtype: DType) -> Result<(), CommError> {
    if !buf.len().is_multiple_of(dtype.size()) {
        return Err(CommError::Buffer(format!("{} bytes is not a whole number of {dtype:?} elements", buf.len())));
    }
    Ok(())
}
