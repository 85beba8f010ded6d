//! A communicator: a fixed group of ranks running collectives over one `phalanx-net` node. A
//! thin tokio driver around the sans-IO [`Group`] of `phalanx-collectives` (which sequences the
//! collectives, routes every message, and runs the fault policies): a background task owns the
//! node and the group, moves bytes between them, feeds it the clock and the transport's
//! verdicts (`PeerUnreachable` → lost), and enforces each call's deadline. The task runs
//! between calls too, so a rank coordinates the others even while its trainer computes.
//!
//! Every call has a deadline: it never blocks past it, and the error names the ranks it was
//! still waiting for. Calls with a [`FaultPolicy`] other than `Abort` (or with `verify`) are
//! coordinated; see `phalanx_collectives::group` for how ranks agree on who took part.

use std::time::Duration;

use bytes::Bytes;
pub use phalanx_collectives::alltoall::AllToAllResult;
pub use phalanx_collectives::codec::{Compression, ErrorFeedback};
pub use phalanx_collectives::group::{AllReduceAlgorithm, CallOptions, FaultPolicy, GroupCounters, GroupError, Op};
use phalanx_collectives::group::{Finished, Group};
use phalanx_collectives::reduce::{DType, ReduceOp};
pub use phalanx_collectives::schedule::hierarchical::Topology;
use phalanx_net::{Node, NodeError, NodeHandle};
use phalanx_proto::{ChannelId, Event, RankId};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info_span, warn, Instrument};

/// The transport channel collectives use.
pub const COLLECTIVE_CHANNEL: ChannelId = ChannelId(1000);

/// Why a collective failed.
#[derive(Debug, Error)]
pub enum CommError {
    /// The deadline passed; the collective was abandoned on this rank (its contribution is
    /// counted dropped).
    #[error("collective #{op_seq} missed its deadline of {deadline:?}, still waiting for ranks {waiting:?}")]
    Deadline {
        /// The collective's sequence number.
        op_seq: u64,
        /// The deadline.
        deadline: Duration,
        /// Ranks whose messages the collective was still waiting for.
        waiting: Vec<usize>,
    },
    /// A rank was lost under [`FaultPolicy::Abort`].
    #[error("collective #{op_seq} lost rank {rank} (epoch {epoch}): unreachable")]
    PeerLost {
        /// The collective's sequence number.
        op_seq: u64,
        /// The lost rank.
        rank: usize,
        /// The group's membership epoch.
        epoch: u64,
    },
    /// The collective failed on every participant alike (quorum not met, results differ, …).
    #[error(transparent)]
    Collective(GroupError),
    /// The transport refused a send or shut down.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The buffer does not fit the call.
    #[error("bad buffer: {0}")]
    Buffer(String),
    /// This rank's contribution missed the round (see [`Outcome::Late`]), where the call cannot
    /// return it (the plain, `Abort`-policy methods never see this).
    #[error("collective #{op_seq}: this rank's contribution was late")]
    Late {
        /// The collective's sequence number.
        op_seq: u64,
    },
}

impl From<GroupError> for CommError {
    fn from(e: GroupError) -> Self {
        match e {
            GroupError::PeerLost { op_seq, rank, epoch } => CommError::PeerLost { op_seq, rank, epoch },
            other => CommError::Collective(other),
        }
    }
}

/// What a policy-carrying call returns.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The result, and the ranks whose contributions it holds (for `Avg`, their number is the
    /// divisor).
    Done {
        /// The result.
        data: Vec<u8>,
        /// Who took part, ascending.
        participants: Vec<usize>,
    },
    /// This rank's contribution missed the round (quorum) and is handed back untouched, to be
    /// folded into a later round.
    Late {
        /// The contribution.
        contribution: Vec<u8>,
        /// Who took part, ascending.
        participants: Vec<usize>,
    },
}

enum Start {
    Op { op: Op, dtype: DType, buf: Vec<u8>, options: CallOptions },
    AllToAll { send: Vec<Bytes>, policy: FaultPolicy },
}

enum Command {
    Start { start: Start, deadline: Duration, reply: oneshot::Sender<(u64, Result<Finished, CommError>)> },
    Counters(oneshot::Sender<GroupCounters>),
}

/// A group of `world` ranks (ids `0..world`, this one `rank`) over a started node.
pub struct Communicator {
    rank: usize,
    world: usize,
    handle: NodeHandle,
    commands: mpsc::UnboundedSender<Command>,
}

impl Communicator {
    /// A communicator over `node` (whose paths reach every other rank). Spawns its driver task
    /// on the current tokio runtime; it ends when the communicator is dropped.
    pub fn new(node: Node, rank: usize, world: usize) -> Communicator {
        Communicator::with_topology(node, rank, Topology::flat(world))
    }

    /// A communicator whose ranks sit in the data centres `topology` describes (every rank
    /// must pass the same): large all-reduces with [`AllReduceAlgorithm::Auto`] then run
    /// hierarchically.
    pub fn with_topology(node: Node, rank: usize, topology: Topology) -> Communicator {
        let world = topology.world();
        let handle = node.handle();
        let (commands, rx) = mpsc::unbounded_channel();
        let mut group = Group::new(rank, world);
        group.set_topology(topology);
        tokio::spawn(drive(node, group, rx));
        Communicator { rank, world, handle, commands }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The underlying node's handle (counters, fault hooks).
    pub fn handle(&self) -> &NodeHandle {
        &self.handle
    }

    /// What happened to this rank's contributions so far (`offered = applied + late +
    /// dropped` between calls).
    pub async fn counters(&self) -> Result<GroupCounters, CommError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Counters(tx)).map_err(|_| NodeError::Closed)?;
        rx.await.map_err(|_| CommError::Node(NodeError::Closed))
    }

    /// Runs `op` on `buf` (whole elements of `dtype`) under `options`. Every rank must make the
    /// same sequence of calls with the same options.
    pub async fn collective(
        &mut self,
        op: Op,
        dtype: DType,
        buf: Vec<u8>,
        options: CallOptions,
        deadline: Duration,
    ) -> Result<Outcome, CommError> {
        check_elements(&buf, dtype)?;
        let name = op_name(op);
        let span = info_span!("collective", op = name, rank = self.rank, world = self.world, policy = ?options.policy);
        let (op_seq, finished) = self.call(Start::Op { op, dtype, buf, options }, deadline).instrument(span).await?;
        match finished {
            Finished::Buffer { data, participants } => Ok(Outcome::Done { data, participants }),
            Finished::Late { contribution, participants } => {
                debug!(op_seq, ?participants, "contribution late");
                Ok(Outcome::Late { contribution, participants })
            }
            Finished::Failed(e) => Err(e.into()),
            Finished::AllToAll(_) => unreachable!("started as {name}, #{op_seq}"),
        }
    }

    /// A call under [`FaultPolicy::Abort`]: the whole result, or an error.
    async fn abort_call(
        &mut self,
        op: Op,
        dtype: DType,
        buf: Vec<u8>,
        deadline: Duration,
    ) -> Result<Vec<u8>, CommError> {
        match self.collective(op, dtype, buf, CallOptions::default(), deadline).await? {
            Outcome::Done { data, .. } => Ok(data),
            Outcome::Late { .. } => Err(CommError::Late { op_seq: 0 }),
        }
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
        self.abort_call(Op::AllReduce { algorithm, op }, dtype, buf, deadline).await
    }

    /// All-gather: `buf` is the whole gathered buffer (`world` blocks as
    /// `phalanx_collectives::schedule::block_range` splits it); this rank's block must be
    /// filled; every rank ends with every block.
    pub async fn all_gather(&mut self, buf: Vec<u8>, dtype: DType, deadline: Duration) -> Result<Vec<u8>, CommError> {
        self.abort_call(Op::AllGather, dtype, buf, deadline).await
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
        self.abort_call(Op::ReduceScatter { op }, dtype, buf, deadline).await
    }

    /// Broadcast of `root`'s `buf` to every rank (others' `buf` gives the size).
    pub async fn broadcast(&mut self, buf: Vec<u8>, root: usize, deadline: Duration) -> Result<Vec<u8>, CommError> {
        if root >= self.world {
            return Err(CommError::Buffer(format!("root {root} outside a world of {}", self.world)));
        }
        self.abort_call(Op::Broadcast { root }, DType::U8, buf, deadline).await
    }

    /// Reduce to `root` (the others' results are scratch).
    pub async fn reduce(
        &mut self,
        buf: Vec<u8>,
        dtype: DType,
        op: ReduceOp,
        root: usize,
        deadline: Duration,
    ) -> Result<Vec<u8>, CommError> {
        if root >= self.world {
            return Err(CommError::Buffer(format!("root {root} outside a world of {}", self.world)));
        }
        self.abort_call(Op::Reduce { root, op }, dtype, buf, deadline).await
    }

    /// All-reduce (`Sum` or `Avg`) of f32 `values` sent compressed (for WAN hops), with error
    /// feedback: `feedback` carries this call's quantisation error into the next call on the
    /// same tensor. Results are bit-identical on every participant. If the contribution comes
    /// back [`Outcome::Late`] (or the call fails), `feedback` is left as it was and the
    /// contribution returned is `values` itself.
    #[allow(clippy::too_many_arguments)]
    pub async fn all_reduce_compressed(
        &mut self,
        values: Vec<u8>,
        op: ReduceOp,
        compression: Compression,
        feedback: &mut ErrorFeedback,
        options: CallOptions,
        deadline: Duration,
    ) -> Result<Outcome, CommError> {
        check_elements(&values, DType::F32)?;
        if !matches!(op, ReduceOp::Sum | ReduceOp::Avg) || compression == Compression::None {
            return Err(CommError::Buffer(format!(
                "compressed all-reduce does Sum or Avg with Int8 or Int4, not {op:?} {compression:?}"
            )));
        }
        let x: Vec<f32> = values.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let before = feedback.clone();
        let encoded = feedback.encode(compression, &x);
        match self.collective(Op::CompressedAllReduce { op, compression }, DType::U8, encoded, options, deadline).await
        {
            Ok(Outcome::Done { data, participants }) => Ok(Outcome::Done { data, participants }),
            Ok(Outcome::Late { participants, .. }) => {
                *feedback = before;
                Ok(Outcome::Late { contribution: values, participants })
            }
            Err(e) => {
                *feedback = before;
                Err(e)
            }
        }
    }

    /// Waits until every rank has entered the barrier (an all-reduce of nothing).
    pub async fn barrier(&mut self, deadline: Duration) -> Result<(), CommError> {
        self.abort_call(Op::Barrier, DType::U8, Vec::new(), deadline).await.map(|_| ())
    }

    /// All-to-all(-v): `send[d]` goes to rank `d`; returns `recv[s]`, what rank `s` sent here.
    pub async fn all_to_all(&mut self, send: Vec<Bytes>, deadline: Duration) -> Result<Vec<Bytes>, CommError> {
        self.all_to_all_with(send, FaultPolicy::Abort, deadline).await.map(|r| r.received)
    }

    /// All-to-all(-v) under `policy`: with `Shrink` or `Quorum` a lost peer does not fail the
    /// call; what this rank had for it comes back in [`AllToAllResult::undelivered`].
    pub async fn all_to_all_with(
        &mut self,
        send: Vec<Bytes>,
        policy: FaultPolicy,
        deadline: Duration,
    ) -> Result<AllToAllResult, CommError> {
        if send.len() != self.world {
            return Err(CommError::Buffer(format!("{} send buffers for a world of {}", send.len(), self.world)));
        }
        let span = info_span!("collective", op = "all_to_all", rank = self.rank, world = self.world);
        let (op_seq, finished) = self.call(Start::AllToAll { send, policy }, deadline).instrument(span).await?;
        match finished {
            Finished::AllToAll(r) => {
                if !r.lost.is_empty() {
                    warn!(op_seq, lost = ?r.lost, undelivered = r.undelivered.len(), "all-to-all lost peers");
                }
                Ok(r)
            }
            Finished::Failed(e) => Err(e.into()),
            _ => unreachable!("started as all-to-all, #{op_seq}"),
        }
    }

    /// Waits until everything this rank sent has been acknowledged by its peers, or `timeout`
    /// passes (call before a process exits, so its last messages are not lost with it).
    /// Returns whether every peer acknowledged everything.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let mut all = true;
        for peer in (0..self.world).filter(|p| *p != self.rank) {
            all &= self.handle.flush(RankId(peer as u32), timeout).await;
        }
        all
    }

    async fn call(&mut self, start: Start, deadline: Duration) -> Result<(u64, Finished), CommError> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Start { start, deadline, reply }).map_err(|_| NodeError::Closed)?;
        let (op_seq, r) = rx.await.map_err(|_| CommError::Node(NodeError::Closed))?;
        r.map(|f| (op_seq, f))
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::AllReduce { .. } => "all_reduce",
        Op::ReduceScatter { .. } => "reduce_scatter",
        Op::AllGather => "all_gather",
        Op::Broadcast { .. } => "broadcast",
        Op::Reduce { .. } => "reduce",
        Op::Barrier => "barrier",
        Op::CompressedAllReduce { .. } => "compressed_all_reduce",
    }
}

struct Pending {
    op_seq: u64,
    until: tokio::time::Instant,
    deadline: Duration,
    reply: oneshot::Sender<(u64, Result<Finished, CommError>)>,
}

/// The driver task: owns the node and the group until the communicator is dropped or the node
/// closes.
async fn drive(mut node: Node, mut group: Group, mut commands: mpsc::UnboundedReceiver<Command>) {
    let epoch = tokio::time::Instant::now();
    let now = move || epoch.elapsed().as_nanos() as u64;
    let handle = node.handle();
    let mut pending: Option<Pending> = None;
    loop {
        while let Some((to, m)) = group.poll_send() {
            if let Err(e) = handle.send(RankId(to as u32), COLLECTIVE_CHANNEL, m).await {
                if let Some(p) = pending.take() {
                    group.abandon(now());
                    let _ = p.reply.send((p.op_seq, Err(e.into())));
                }
                return;
            }
        }
        if pending.is_some() {
            if let Some(f) = group.finish() {
                let p = pending.take().expect("checked");
                let _ = p.reply.send((p.op_seq, Ok(f)));
            }
        }
        let timer = group.poll_timeout().map(|ns| epoch + Duration::from_nanos(ns));
        let wake = match (&pending, timer) {
            (Some(p), Some(t)) => Some(p.until.min(t)),
            (Some(p), None) => Some(p.until),
            (None, t) => t,
        };
        tokio::select! {
            cmd = commands.recv() => match cmd {
                None => return,
                Some(Command::Counters(tx)) => {
                    let _ = tx.send(group.counters());
                }
                Some(Command::Start { start, deadline, reply }) => {
                    if pending.is_some() {
                        let _ = reply.send((0, Err(CommError::Buffer("a collective is already running".into()))));
                        continue;
                    }
                    let t = now();
                    let op_seq = match start {
                        Start::Op { op, dtype, buf, options } => group.start(t, op, dtype, buf, options),
                        Start::AllToAll { send, policy } => group.start_all_to_all(t, send, policy),
                    };
                    pending = Some(Pending { op_seq, until: tokio::time::Instant::now() + deadline, deadline, reply });
                }
            },
            ev = node.next_event() => match ev {
                Some(Event::Message(m)) if m.channel == COLLECTIVE_CHANNEL => {
                    group.handle_message(m.from.0 as usize, m.payload.chunks().to_vec(), now());
                }
                Some(Event::PeerUnreachable { peer, .. }) => {
                    warn!(rank = group.rank(), peer = peer.0, "peer unreachable: lost to the group");
                    group.handle_peer_lost(peer.0 as usize, now());
                }
                Some(_) => {}
                None => {
                    if let Some(p) = pending.take() {
                        let _ = p.reply.send((p.op_seq, Err(CommError::Node(NodeError::Closed))));
                    }
                    return;
                }
            },
            _ = sleep_until(wake), if wake.is_some() => {
                if let Some(p) = pending.take_if(|p| tokio::time::Instant::now() >= p.until) {
                    let waiting = group.waiting_on();
                    group.abandon(now());
                    let e = CommError::Deadline { op_seq: p.op_seq, deadline: p.deadline, waiting };
                    let _ = p.reply.send((p.op_seq, Err(e)));
                }
                group.handle_timeout(now());
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

fn check_elements(buf: &[u8], dtype: DType) -> Result<(), CommError> {
    if !buf.len().is_multiple_of(dtype.size()) {
        return Err(CommError::Buffer(format!("{} bytes is not a whole number of {dtype:?} elements", buf.len())));
    }
    Ok(())
}
