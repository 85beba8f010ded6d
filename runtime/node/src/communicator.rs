//! A communicator: a fixed group of ranks running collectives over one `phalanx-net` node. A
//! thin tokio driver around the sans-IO [`Group`] of `phalanx-collectives` (which sequences the
//! collectives and routes every message to the one it belongs to): it moves bytes between the
//! group and the node, and enforces each call's deadline.
//!
//! Every call has a deadline: it never blocks past it, and the error names the ranks it was
//! still waiting for. (Fault policies — shrink, quorum — come with the rest of issue #3.)

use std::time::Duration;

use bytes::Bytes;
pub use phalanx_collectives::group::AllReduceAlgorithm;
use phalanx_collectives::group::{all_reduce_schedule, Finished, Group};
use phalanx_collectives::reduce::{DType, ReduceOp};
use phalanx_collectives::schedule::{halving_doubling, ring, tree, Collective, Schedule};
use phalanx_net::{Node, NodeError};
use phalanx_proto::{ChannelId, Event, RankId};
use thiserror::Error;
use tracing::{info_span, Instrument};

/// The transport channel collectives use.
pub const COLLECTIVE_CHANNEL: ChannelId = ChannelId(1000);

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

/// A group of `world` ranks (ids `0..world`, this one `rank`) over a started node.
pub struct Communicator {
    node: Node,
    group: Group,
}

impl Communicator {
    /// A communicator over `node` (whose paths reach every other rank).
    pub fn new(node: Node, rank: usize, world: usize) -> Communicator {
        Communicator { node, group: Group::new(rank, world) }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.group.world()
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
        let schedule = all_reduce_schedule(algorithm, self.rank(), self.world(), buf.len());
        self.run_schedule(schedule, dtype, op, buf, deadline, "all_reduce").await
    }

    /// All-gather: `buf` is the whole gathered buffer (`world` blocks as
    /// `phalanx_collectives::schedule::block_range` splits it); this rank's block must be
    /// filled; every rank ends with every block.
    pub async fn all_gather(&mut self, buf: Vec<u8>, dtype: DType, deadline: Duration) -> Result<Vec<u8>, CommError> {
        check_elements(&buf, dtype)?;
        let schedule = ring_schedule(Collective::AllGather, self.rank(), self.world());
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
        let schedule = ring_schedule(Collective::ReduceScatter, self.rank(), self.world());
        self.run_schedule(schedule, dtype, op, buf, deadline, "reduce_scatter").await
    }

    /// Broadcast of `root`'s `buf` to every rank (others' `buf` gives the size).
    pub async fn broadcast(&mut self, buf: Vec<u8>, root: usize, deadline: Duration) -> Result<Vec<u8>, CommError> {
        let schedule = tree::broadcast(root, self.rank(), self.world());
        self.run_schedule(schedule, DType::I32, ReduceOp::Sum, buf, deadline, "broadcast").await
    }

    /// Waits until every rank has entered the barrier (an all-reduce of nothing).
    pub async fn barrier(&mut self, deadline: Duration) -> Result<(), CommError> {
        let schedule = halving_doubling::all_reduce(self.rank(), self.world());
        self.run_schedule(schedule, DType::I32, ReduceOp::Sum, Vec::new(), deadline, "barrier").await.map(|_| ())
    }

    /// All-to-all(-v): `send[d]` goes to rank `d`; returns `recv[s]`, what rank `s` sent here.
    pub async fn all_to_all(&mut self, send: Vec<Bytes>, deadline: Duration) -> Result<Vec<Bytes>, CommError> {
        if send.len() != self.world() {
            return Err(CommError::Buffer(format!("{} send buffers for a world of {}", send.len(), self.world())));
        }
        let op_seq = self.group.start_all_to_all(send);
        let span = info_span!("collective", op = "all_to_all", op_seq, rank = self.rank(), world = self.world());
        match self.drive(op_seq, deadline).instrument(span).await? {
            Finished::Received(r) => Ok(r),
            Finished::Buffer(_) => unreachable!("started as all-to-all"),
        }
    }

    /// Waits until everything this rank sent has been acknowledged by its peers, or `timeout`
    /// passes (call before a process exits, so its last messages are not lost with it).
    /// Returns whether every peer acknowledged everything.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let handle = self.node.handle();
        let mut all = true;
        for peer in (0..self.world()).filter(|p| *p != self.rank()) {
            all &= handle.flush(RankId(peer as u32), timeout).await;
        }
        all
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
        let op_seq = self.group.start_schedule(schedule, dtype, op, buf);
        let span = info_span!("collective", op = name, op_seq, rank = self.rank(), world = self.world());
        match self.drive(op_seq, deadline).instrument(span).await? {
            Finished::Buffer(b) => Ok(b),
            Finished::Received(_) => unreachable!("started as a schedule"),
        }
    }

    /// Moves messages between the group and the node until the collective finishes or the
    /// deadline passes (then it is abandoned).
    async fn drive(&mut self, op_seq: u64, deadline: Duration) -> Result<Finished, CommError> {
        let until = tokio::time::Instant::now() + deadline;
        let handle = self.node.handle();
        let result = loop {
            while let Some((to, m)) = self.group.poll_send() {
                handle.send(RankId(to as u32), COLLECTIVE_CHANNEL, m).await?;
            }
            if let Some(done) = self.group.finish() {
                return Ok(done);
            }
            match tokio::time::timeout_at(until, self.node.next_event()).await {
                Ok(Some(Event::Message(m))) if m.channel == COLLECTIVE_CHANNEL => {
                    self.group.handle_message(m.from.0 as usize, m.payload.chunks().to_vec());
                }
                Ok(Some(Event::PeerUnreachable { peer, .. })) => {
                    break CommError::PeerLost { op_seq, rank: peer.0 as usize };
                }
                Ok(Some(_)) => {}
                Ok(None) => break CommError::Node(NodeError::Closed),
                Err(_) => break CommError::Deadline { op_seq, deadline, waiting: self.group.waiting_on() },
            }
        };
        self.group.abandon();
        Err(result)
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
