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

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
pub use phalanx_collectives::alltoall::AllToAllResult;
pub use phalanx_collectives::codec::{Compression, ErrorFeedback};
pub use phalanx_collectives::group::{AllReduceAlgorithm, CallOptions, FaultPolicy, GroupCounters, GroupError, Op};
use phalanx_collectives::group::{Finished, Group};
use phalanx_collectives::reduce::{DType, ReduceOp};
pub use phalanx_collectives::schedule::hierarchical::Topology;
use phalanx_net::{Node, NodeError, NodeHandle};
use phalanx_proto::{ChannelId, Event, PostingTable, RankId};
use std::sync::Arc;
use thiserror::Error;
use tokio::sync::{oneshot, Mutex, Notify};
use tracing::{debug, info, info_span, warn, Instrument};

/// How long a call polls for the next message before it sleeps, on a current-thread runtime
/// whose process may run on more than one CPU (see [`Communicator`]).
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// How long a call polls for the next message before it sleeps, on a current-thread runtime
/// whose process is bound to one CPU (as `mpirun --bind-to core` and one-rank-per-GPU
/// launchers bind ranks): the rank owns that CPU, so polling takes it from no one, and it
/// spares the rank a wake-up that on a VM can cost hundreds of microseconds.
pub const BOUND_SPIN: Duration = Duration::from_millis(2);

/// The polling time of a new communicator: [`BOUND_SPIN`] where the rank has the runtime's one
/// thread and one CPU to itself, [`DEFAULT_SPIN`] where it has the thread but may share CPUs
/// (oversubscribed ranks that poll long take turns from each other, as Open MPI yields when
/// oversubscribed), none on a multi-threaded runtime, which often carries several ranks
/// (tests, the demo) or a trainer's own work, where polling workers would take the CPU from
/// them.
fn default_spin() -> Duration {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread if bound_to_one_cpu() => BOUND_SPIN,
        tokio::runtime::RuntimeFlavor::CurrentThread => DEFAULT_SPIN,
        _ => Duration::ZERO,
    }
}

/// Whether this process may run on one CPU only (its affinity mask or CPU quota; the standard
/// library reads both on Linux).
fn bound_to_one_cpu() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() == 1)
}

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
    /// A subgroup given to [`Communicator::with_subgroups`] does not fit the world.
    #[error("subgroup {index}: {reason}")]
    Subgroup {
        /// Its position in the list.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A device buffer could not be staged (feature `cuda`).
    #[error("GPU: {0}")]
    Gpu(String),
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

/// One group over the node: its channel, the transport id of each of its ranks, and the
/// sans-IO group.
struct Slot {
    channel: ChannelId,
    /// Transport id of each group index.
    ids: Vec<u32>,
    /// Group index of each transport id.
    index: HashMap<u32, usize>,
    group: Group,
}

/// What the caller and the background task share: one drives at a time.
struct Driver {
    node: Node,
    /// The communicator's groups: the whole world first, then its subgroups.
    slots: Vec<Slot>,
    /// The clock's zero (the group reads nanoseconds since it).
    epoch: tokio::time::Instant,
    /// The transport shut down.
    closed: bool,
    /// The background task's waker, from when it last waited for the node.
    background: Option<std::task::Waker>,
    /// The group timer the background task waits for.
    armed: Option<tokio::time::Instant>,
    /// How long a call polls for its next event before it sleeps.
    spin: Duration,
    /// The receives the groups posted, which the node's links read into (see
    /// `phalanx_proto::posting`).
    postings: Arc<PostingTable>,
}

impl Driver {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Files every receive the groups posted, and hands every queued message to the transport.
    async fn flush(&mut self) -> Result<(), NodeError> {
        let handle = self.node.handle();
        for slot in &mut self.slots {
            while let Some((from, head, posting)) = slot.group.poll_posting() {
                self.postings.file(RankId(slot.ids[from]), slot.channel, head.to_vec(), &posting);
            }
            while let Some((to, m)) = slot.group.poll_send() {
                handle.send(RankId(slot.ids[to]), slot.channel, m).await?;
            }
        }
        Ok(())
    }

    /// Applies one transport event; returns false once the node has closed.
    fn apply(&mut self, ev: Option<Event>) -> bool {
        let now = self.now();
        match ev {
            Some(Event::Message(m)) => {
                // A message on no group's channel, or from a rank outside the group, is not
                // for a collective: ignored.
                if let Some(slot) = self.slots.iter_mut().find(|s| s.channel == m.channel) {
                    if let Some(from) = slot.index.get(&m.from.0) {
                        slot.group.handle_payload(*from, m.payload, now);
                    }
                }
            }
            Some(Event::PeerUnreachable { peer, .. }) => {
                warn!(peer = peer.0, "peer unreachable: lost to the group");
                for slot in &mut self.slots {
                    if let Some(lost) = slot.index.get(&peer.0) {
                        slot.group.handle_peer_lost(*lost, now);
                    }
                }
            }
            Some(_) => {}
            None => {
                self.closed = true;
                return false;
            }
        }
        true
    }

    /// Before a call lets go of the driver: re-registers the background task's waker with the
    /// node (the call's polls replaced it) without waking that task, applying whatever has
    /// arrived meanwhile. Returns whether the background task must re-arm its timer.
    async fn hand_back(&mut self) -> bool {
        let Some(w) = self.background.clone() else { return true };
        loop {
            let polled = self.node.poll_event(&mut std::task::Context::from_waker(&w));
            match polled {
                std::task::Poll::Ready(ev) => {
                    if !self.apply(ev) || self.flush().await.is_err() {
                        return true;
                    }
                }
                std::task::Poll::Pending => return self.timer() != self.armed,
            }
        }
    }

    /// The groups' next timer as an instant.
    fn timer(&self) -> Option<tokio::time::Instant> {
        self.slots.iter().filter_map(|s| s.group.poll_timeout()).min().map(|ns| self.epoch + Duration::from_nanos(ns))
    }

    /// The clock reached a timer: every group looks at its deadlines.
    fn timeout(&mut self) {
        let now = self.now();
        for slot in &mut self.slots {
            slot.group.handle_timeout(now);
        }
    }

    /// Polls for an event for up to `self.spin`, yielding to the runtime (whose I/O driver then
    /// polls the sockets without sleeping) and to the OS scheduler between polls. Returns
    /// `Some(open)` once one was applied, `None` if none came.
    async fn spin(&mut self) -> Option<bool> {
        if self.spin.is_zero() {
            return None;
        }
        let start = tokio::time::Instant::now();
        loop {
            let polled = std::future::poll_fn(|cx| std::task::Poll::Ready(self.node.poll_event(cx))).await;
            if let std::task::Poll::Ready(ev) = polled {
                return Some(self.apply(ev));
            }
            if start.elapsed() >= self.spin {
                return None;
            }
            tokio::task::yield_now().await;
            std::thread::yield_now();
        }
    }

    /// Waits for one event (a message, a lost peer, or the group's timer) and applies it.
    /// Returns false once the node has closed.
    async fn step(&mut self, until: Option<tokio::time::Instant>) -> bool {
        let wake = match (until, self.timer()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            ev = self.node.next_event() => return self.apply(ev),
            _ = sleep_until(wake), if wake.is_some() => self.timeout(),
        }
        true
    }
}

/// A group of `world` ranks (ids `0..world`, this one `rank`) over a started node.
///
/// A call drives the group itself (no hand-off to another task on the hot path); between
/// calls a background task does, so this rank keeps answering and coordinating. The
/// background task holds the group only while it applies events, never while it waits, so a
/// call takes it without waking anyone.
///
/// While a call waits for a message it first polls for it — for [`BOUND_SPIN`] on a
/// current-thread runtime in a process bound to one CPU, [`DEFAULT_SPIN`] on one that is not,
/// not at all by default on a multi-threaded runtime (see [`Communicator::set_spin_wait`]) —
/// then sleeps until the node wakes it: small collectives take about one network round trip
/// per step instead of one process wake-up per message.
/// Run a rank's node and calls on one thread (a current-thread runtime) where the trainer
/// allows it: on a multi-threaded runtime every hand-off between the call, the endpoint task
/// and the link tasks may cross threads.
///
/// [`Communicator::with_subgroups`] makes, over the same node, communicators of subsets of the
/// ranks (e.g. the ranks of one data centre): each has its own channel, its own sequence of
/// collectives and its own coordinator, so a subgroup's rounds go on while another subgroup —
/// or the link to it — is slow or cut.
pub struct Communicator {
    rank: usize,
    world: usize,
    /// Which of the driver's groups this communicator calls.
    slot: usize,
    /// Transport id of each rank of the group.
    ids: Vec<u32>,
    handle: NodeHandle,
    driver: Arc<Mutex<Driver>>,
    /// Tells the background task to re-arm its timer after a call changed the group's.
    call_ended: Arc<Notify>,
    /// Dropped with the last communicator over the node: the background task ends.
    _stop: Arc<oneshot::Sender<()>>,
}

/// A subset of a communicator's ranks that gets a communicator of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subgroup {
    /// The members, as indices of the whole communicator; the subgroup's index of a member is
    /// its position here.
    pub members: Vec<usize>,
    /// Which data centre each member is in (flat if `None`).
    pub topology: Option<Topology>,
}

impl Subgroup {
    /// A subgroup of `members` (indices of the whole communicator) in one data centre.
    pub fn flat(members: Vec<usize>) -> Subgroup {
        Subgroup { members, topology: None }
    }
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
        match Communicator::with_subgroups(node, rank, topology, &[]) {
            Ok((c, _)) => c,
            Err(e) => unreachable!("no subgroups to refuse: {e}"),
        }
    }

    /// The communicator of all ranks (as [`Communicator::with_topology`]) and, over the same
    /// node, one communicator per subgroup this rank is a member of (`None` for the others).
    /// Every rank must pass the same subgroups in the same order (subgroup `k` runs on channel
    /// `COLLECTIVE_CHANNEL + 1 + k`). The driver task ends when the last of them is dropped.
    /// Refuses a subgroup with a member outside the world, a repeated member, no members, or a
    /// topology of another size.
    pub fn with_subgroups(
        node: Node,
        rank: usize,
        topology: Topology,
        subgroups: &[Subgroup],
    ) -> Result<(Communicator, Vec<Option<Communicator>>), CommError> {
        let world = topology.world();
        let mut slots = Vec::with_capacity(1 + subgroups.len());
        let slot = |channel: ChannelId, ids: Vec<u32>, me: usize, topology: Topology| {
            let mut group = Group::new(me, ids.len());
            group.set_topology(topology);
            // Segments nothing rewrites go out as the caller's buffer itself; a finished call
            // waits for the transport to hand them back (`drive_call`).
            group.set_lend_sends(true);
            // Segments nothing rewrites afterwards are received straight into the caller's
            // buffer: the node's links read them into the places the group posts.
            group.set_post_receives(true);
            let index = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
            Slot { channel, ids, index, group }
        };
        slots.push(slot(COLLECTIVE_CHANNEL, (0..world as u32).collect(), rank, topology));
        let mut mine = Vec::with_capacity(subgroups.len());
        for (k, sub) in subgroups.iter().enumerate() {
            let bad = |reason: String| CommError::Subgroup { index: k, reason };
            if sub.members.is_empty() {
                return Err(bad("no members".into()));
            }
            let mut seen = std::collections::BTreeSet::new();
            for m in &sub.members {
                if *m >= world {
                    return Err(bad(format!("member {m} outside a world of {world}")));
                }
                if !seen.insert(*m) {
                    return Err(bad(format!("member {m} named twice")));
                }
            }
            let topology = sub.topology.clone().unwrap_or_else(|| Topology::flat(sub.members.len()));
            if topology.world() != sub.members.len() {
                return Err(bad(format!("a topology of {} ranks for {} members", topology.world(), sub.members.len())));
            }
            let channel = ChannelId(COLLECTIVE_CHANNEL.0 + 1 + k as u32);
            let ids: Vec<u32> = sub.members.iter().map(|m| *m as u32).collect();
            match sub.members.iter().position(|m| *m == rank) {
                Some(me) => {
                    mine.push(Some((slots.len(), me, ids.clone())));
                    slots.push(slot(channel, ids, me, topology));
                }
                None => mine.push(None),
            }
        }
        let handle = node.handle();
        let postings = Arc::new(PostingTable::new());
        handle.set_placer(Some(postings.clone()));
        let driver = Arc::new(Mutex::new(Driver {
            node,
            slots,
            epoch: tokio::time::Instant::now(),
            closed: false,
            background: None,
            armed: None,
            spin: default_spin(),
            postings,
        }));
        let call_ended = Arc::new(Notify::new());
        let (stop, stopped) = oneshot::channel();
        let stop = Arc::new(stop);
        tokio::spawn(background(driver.clone(), call_ended.clone(), stopped));
        let make = |slot: usize, rank: usize, ids: Vec<u32>| Communicator {
            rank,
            world: ids.len(),
            slot,
            ids,
            handle: handle.clone(),
            driver: driver.clone(),
            call_ended: call_ended.clone(),
            _stop: stop.clone(),
        };
        let subs = mine.into_iter().map(|m| m.map(|(slot, me, ids)| make(slot, me, ids))).collect();
        Ok((make(0, rank, (0..world as u32).collect()), subs))
    }

    /// Sets how long a call of this communicator (and of the others over the same node) polls
    /// for its next message before it sleeps; default [`BOUND_SPIN`] on a current-thread
    /// runtime in a process bound to one CPU, [`DEFAULT_SPIN`] on a current-thread runtime
    /// otherwise, and zero (sleep at once) on a multi-threaded one.
    /// Polling trades CPU for latency: a sleeping process pays a wake-up per message (tens to
    /// hundreds of microseconds on a VM), which dominates small collectives. Between polls the call yields
    /// to the runtime and to the OS scheduler, so ranks sharing a core still make progress.
    pub async fn set_spin_wait(&self, spin: Duration) {
        self.take_driver().await.spin = spin;
    }

    /// Sets the largest data message of this communicator's collectives started from now on
    /// (the executor's unit of pipelining; default `SEGMENT_BYTES`, just under 1 MiB). Every
    /// rank of the group must set the same value before the same call, or their messages will
    /// not match (the call then fails at its deadline, naming the rank it waited for).
    pub async fn set_segment_bytes(&self, bytes: usize) {
        self.take_driver().await.slots[self.slot].group.set_segment_bytes(bytes);
    }

    /// Takes the driver (the background task only holds it for a moment).
    async fn take_driver(&self) -> tokio::sync::MutexGuard<'_, Driver> {
        self.driver.lock().await
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
        Ok(self.take_driver().await.slots[self.slot].group.counters())
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
            Finished::Buffer { data, participants } => {
                if participants.len() < self.world {
                    info!(op_seq, ?participants, "finished without every rank");
                }
                Ok(Outcome::Done { data, participants })
            }
            Finished::Late { contribution, participants } => {
                info!(op_seq, ?participants, "this rank's contribution was late: handed back");
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
        for (i, id) in self.ids.iter().enumerate() {
            if i != self.rank {
                all &= self.handle.flush(RankId(*id), timeout).await;
            }
        }
        all
    }

    /// Starts a collective and drives it until it finishes or `deadline` passes (then it is
    /// abandoned: its contribution counted dropped, the coordinator told).
    async fn call(&mut self, start: Start, deadline: Duration) -> Result<(u64, Finished), CommError> {
        let mut d = self.take_driver().await;
        let r = Self::drive_call(&mut d, self.slot, start, deadline).await;
        if d.hand_back().await {
            self.call_ended.notify_one();
        }
        r
    }

    async fn drive_call(
        d: &mut Driver,
        slot: usize,
        start: Start,
        deadline: Duration,
    ) -> Result<(u64, Finished), CommError> {
        let until = tokio::time::Instant::now() + deadline;
        if d.closed {
            return Err(NodeError::Closed.into());
        }
        let now = d.now();
        let op_seq = match start {
            Start::Op { op, dtype, buf, options } => d.slots[slot].group.start(now, op, dtype, buf, options),
            Start::AllToAll { send, policy } => d.slots[slot].group.start_all_to_all(now, send, policy),
        };
        loop {
            if let Err(e) = d.flush().await {
                let now = d.now();
                d.slots[slot].group.abandon(now);
                return Err(e.into());
            }
            if let Some(f) = d.slots[slot].group.finish() {
                return Ok((op_seq, f));
            }
            if let Some(returned) = d.slots[slot].group.lent() {
                // Finished, but parts of the buffer went out as the buffer itself and the
                // transport still holds them (queued, or sent and not yet acknowledged). The call
                // ends when its sends are done with the caller's buffer, as an MPI call does;
                // the peer acknowledges a large message as soon as it has it, and a peer that
                // is lost has its frames dropped. Should the deadline come first, the result
                // is a copy (never wrong, only slower).
                let since = tokio::time::Instant::now();
                match tokio::time::timeout_at(until, std::future::poll_fn(|cx| returned.poll(cx))).await {
                    Ok(()) => {
                        debug!(op_seq, waited_us = since.elapsed().as_micros() as u64, "lent segments back");
                        d.slots[slot].group.poll();
                    }
                    Err(_) => {
                        debug!(op_seq, "lent segments not back by the deadline: the result is a copy");
                        d.slots[slot].group.take_back();
                    }
                }
                continue;
            }
            if tokio::time::Instant::now() >= until {
                let waiting = d.slots[slot].group.waiting_on();
                let now = d.now();
                d.slots[slot].group.abandon(now);
                // Tell the coordinator now, not at the next call.
                let _ = d.flush().await;
                return Err(CommError::Deadline { op_seq, deadline, waiting });
            }
            let open = match d.spin().await {
                Some(open) => open,
                None => d.step(Some(until)).await,
            };
            if !open {
                let now = d.now();
                d.slots[slot].group.abandon(now);
                return Err(NodeError::Closed.into());
            }
        }
    }
}

/// Drives the group between calls: applies what has arrived, under the lock, then waits —
/// without it — for the node to wake this task (its waker is registered by the last poll), for
/// the group's timer, or for a call to end. Ends with the communicator or the node.
async fn background(driver: Arc<Mutex<Driver>>, call_ended: Arc<Notify>, mut stopped: oneshot::Receiver<()>) {
    loop {
        let timer = {
            let mut d = tokio::select! {
                d = driver.lock() => d,
                _ = &mut stopped => return,
            };
            loop {
                if d.flush().await.is_err() || d.closed {
                    return;
                }
                let polled = std::future::poll_fn(|cx| {
                    d.background = Some(cx.waker().clone());
                    std::task::Poll::Ready(d.node.poll_event(cx))
                })
                .await;
                match polled {
                    std::task::Poll::Ready(ev) => {
                        if !d.apply(ev) {
                            return;
                        }
                    }
                    std::task::Poll::Pending => match d.timer() {
                        Some(t) if t <= tokio::time::Instant::now() => d.timeout(),
                        t => {
                            d.armed = t;
                            break t;
                        }
                    },
                }
            }
        };
        tokio::select! {
            _ = woken() => {}
            _ = call_ended.notified() => {}
            _ = sleep_until(timer), if timer.is_some() => {}
            _ = &mut stopped => return,
        }
    }
}

/// Pending on the first poll, ready on the next: completes when something else this task
/// registered for (here, the node's event channel) wakes it.
async fn woken() {
    let mut first = true;
    std::future::poll_fn(
        |_| {
            if std::mem::take(&mut first) {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        },
    )
    .await
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
