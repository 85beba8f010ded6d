//! A communicator's protocol state, sans-IO: the sequence of collectives a group of ranks runs,
//! the routing of each arriving message to the collective it belongs to, and the fault policy
//! of each call (who takes part, what happens when a rank is lost or late). Drivers (the tokio
//! `Communicator`, the simulator) only move bytes and time; the composition is here, so both run
//! the same program.
//!
//! Call order: `start_*` one collective; drain [`Group::poll_send`]; feed arrivals to
//! [`Group::handle_message`], transport verdicts to [`Group::handle_peer_lost`], and the clock to
//! [`Group::handle_timeout`] when [`Group::poll_timeout`] says; take the result with
//! [`Group::finish`]. Keep driving the group between calls too: a rank may coordinate a
//! collective it has not reached yet. Every call of every rank must use the same sequence of
//! operations and the same [`CallOptions`].
//!
//! # Fault policies and how ranks agree on the participants
//!
//! [`FaultPolicy::Abort`] without `verify` runs the schedule over the whole group straight away
//! (no extra messages): if a rank is lost the call fails with [`GroupError::PeerLost`].
//!
//! Every other call is *coordinated*. The coordinator is the lowest rank this rank does not
//! know to be lost; when it is lost, the next one takes over. Each rank reports to it (Ready
//! with its contribution; Done with a hash of its result); it answers with decisions that every
//! live rank receives:
//!
//! - **Plan** `(attempt, participants)`: who runs this attempt. Under `Shrink` the coordinator
//!   plans once every live rank is ready; under `Quorum { min, wait }` also when `wait` has
//!   passed since the first report and at least `min` are ready — and, for a broadcast or a
//!   reduce, its root (a plan without a live root could only fail). A rank not in the plan gets
//!   its contribution back as [`Finished::Late`].
//! - **Commit** `(attempt)`: every live participant finished the attempt; results are returned
//!   only now, so no rank returns a result that another rank replaces. (Finishing implies every
//!   participant's contribution is in the result, so a participant lost after it sent
//!   everything is still counted: the result names it.)
//! - A participant lost before the commit makes the coordinator plan `attempt + 1` over the
//!   survivors (each restarts from its saved contribution), or fail if fewer than `min` remain.
//! - **Fail**: the quorum cannot be met, or (`verify`) the result hashes differ.
//!
//! A coordinator that takes over a collective it did not plan waits for a report from every
//! live rank first; reports carry each rank's last few outcomes, so a commit the old
//! coordinator announced to some ranks only is completed, not redone.
//!
//! Costs: a coordinated call adds two round trips through the coordinator and, for retries, a
//! copy of the contribution.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use phalanx_proto::{Payload, Posting};

use crate::alltoall::{AllToAll, AllToAllResult};
use crate::codec::{self, Compression};
use crate::executor::{ExecError, Executor, Layout};
use crate::lending::Returned;
use crate::reduce::{DType, ReduceOp};
use crate::schedule::hierarchical::{self, Topology};
use crate::schedule::{block_range, halving_doubling, ring, tree, Collective, Schedule};

/// At world 2, buffers below this size use recursive doubling (fewer rounds), larger ones the
/// ring (fewer bytes per rank); larger worlds use twice it (see [`small_all_reduce_limit`]).
pub const SMALL_ALL_REDUCE_BYTES: usize = 64 << 10;

/// The size below which [`AllReduceAlgorithm::Auto`] picks recursive doubling for `world`
/// ranks: [`SMALL_ALL_REDUCE_BYTES`] at world 2, where the ring has two steps against one,
/// twice it from world 3 up, where the ring takes `2 (world - 1)` steps against about
/// `log2 world`. Measured (docs/performance.md, 2026-12-02): at world 4 a 64 KiB all-reduce
/// took 455–778 µs by recursive doubling against 690–1028 µs by the ring, 128 KiB was even; at
/// world 2 the ring was faster at 64 KiB.
pub fn small_all_reduce_limit(world: usize) -> usize {
    if world > 2 {
        2 * SMALL_ALL_REDUCE_BYTES
    } else {
        SMALL_ALL_REDUCE_BYTES
    }
}

/// All-gathers of fewer bytes (the gathered buffer) over a power-of-two group of more than two
/// ranks run by recursive doubling (`log₂ n` rounds) instead of the ring (`n − 1` rounds; the
/// same bytes). Measured (docs/performance.md, 2026-12-02, world 4): 4 KiB 150–222 µs against
/// 186–350 by the ring, 16 KiB 144–151 against 185–283, 32 KiB 175–383 against 247–399; at
/// 64 KiB the ring was faster in four runs of five.
pub const SMALL_ALL_GATHER_BYTES: usize = 64 << 10;

/// How soon a received segment that waits for a loan to come back is looked at again
/// (nanoseconds; see [`Group::poll_timeout`]).
const LOAN_RETRY_NS: u64 = 200_000;
/// Tag bit of control messages (reports and decisions); data messages carry
/// `op_seq << ATTEMPT_BITS | attempt`.
const CONTROL: u64 = 1 << 63;
const ATTEMPT_BITS: u32 = 16;
/// Retries of one collective before it fails.
const MAX_ATTEMPT: u32 = (1 << ATTEMPT_BITS) - 1;
/// Outcomes a rank reports (for a coordinator taking over).
const RECENT_OUTCOMES: usize = 4;
/// Collectives a coordinator remembers its decisions for (late ranks ask about them).
const COORDINATOR_HISTORY: usize = 256;

/// How to run an all-reduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllReduceAlgorithm {
    /// Choose by size and topology: below [`small_all_reduce_limit`] recursive doubling (fewest
    /// rounds, and with data centres of consecutive ranks only its last rounds cross the WAN);
    /// above it hierarchical when the ranks span data centres, else the ring.
    Auto,
    /// Ring (bandwidth-optimal in one data centre).
    Ring,
    /// Recursive doubling (latency-optimal).
    RecursiveDoubling,
    /// Recursive halving then doubling (Rabenseifner: bandwidth-optimal in `2·log₂ n` rounds);
    /// the ring when the world is not a power of two.
    HalvingDoubling,
    /// Hierarchical: reduce-scatter in each data centre, all-reduce across them, all-gather
    /// (see [`hierarchical`]); the ring when there is one data centre.
    Hierarchical,
}

/// What [`AllReduceAlgorithm::Auto`] picks for `bytes` on `topology` (never `Auto`).
pub fn choose_all_reduce(algorithm: AllReduceAlgorithm, topology: &Topology, bytes: usize) -> AllReduceAlgorithm {
    match algorithm {
        AllReduceAlgorithm::Auto if bytes < small_all_reduce_limit(topology.world()) => {
            AllReduceAlgorithm::RecursiveDoubling
        }
        AllReduceAlgorithm::Auto | AllReduceAlgorithm::Hierarchical if topology.is_multi_dc() => {
            AllReduceAlgorithm::Hierarchical
        }
        AllReduceAlgorithm::Auto | AllReduceAlgorithm::Hierarchical => AllReduceAlgorithm::Ring,
        other => other,
    }
}

/// The all-reduce schedule for `rank` of `world` (one data centre) with `algorithm`, for a
/// buffer of `bytes`.
pub fn all_reduce_schedule(algorithm: AllReduceAlgorithm, rank: usize, world: usize, bytes: usize) -> Schedule {
    all_reduce_schedule_on(algorithm, rank, &Topology::flat(world), bytes)
}

/// The all-reduce schedule for `rank` of `topology` with `algorithm`, for a buffer of `bytes`.
pub fn all_reduce_schedule_on(
    algorithm: AllReduceAlgorithm,
    rank: usize,
    topology: &Topology,
    bytes: usize,
) -> Schedule {
    let world = topology.world();
    match choose_all_reduce(algorithm, topology, bytes) {
        AllReduceAlgorithm::RecursiveDoubling => halving_doubling::all_reduce(rank, world),
        AllReduceAlgorithm::HalvingDoubling if world.is_power_of_two() => {
            halving_doubling::reduce_scatter_all_gather(rank, world).expect("a power of two")
        }
        AllReduceAlgorithm::Hierarchical => hierarchical::all_reduce(rank, topology),
        _ => ring::schedule(Collective::AllReduce, rank, world).expect("the ring implements all-reduce"),
    }
}

/// What a call does when ranks are lost or late.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPolicy {
    /// Fail with [`GroupError::PeerLost`] naming the lost rank.
    Abort,
    /// Finish over the ranks still alive; the result names them.
    Shrink,
    /// Semi-synchronous: proceed with the ranks that have contributed once `wait` has passed
    /// (measured by the coordinator from the first report), if at least `min` did; the others
    /// get their contribution back as [`Finished::Late`].
    Quorum {
        /// Fewest contributions a round may complete with.
        min: usize,
        /// How long to wait for the rest.
        wait: Duration,
    },
}

/// Per-call options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallOptions {
    /// What happens under faults.
    pub policy: FaultPolicy,
    /// Compare a hash of every participant's result before returning it; on disagreement the
    /// call fails with [`GroupError::ResultMismatch`] naming the ranks outside the majority.
    pub verify: bool,
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions { policy: FaultPolicy::Abort, verify: false }
    }
}

impl CallOptions {
    /// `policy`, without verification.
    pub fn policy(policy: FaultPolicy) -> CallOptions {
        CallOptions { policy, verify: false }
    }

    fn coordinated(self) -> bool {
        self.verify || self.policy != FaultPolicy::Abort
    }
}

/// A collective over a buffer, run by a schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Every participant ends with the reduction over all participants.
    AllReduce {
        /// Algorithm.
        algorithm: AllReduceAlgorithm,
        /// Reduction.
        op: ReduceOp,
    },
    /// Participant `r` ends with its block (`block_range(count, world, r)`) reduced over the
    /// participants; the rest of the buffer is scratch.
    ReduceScatter {
        /// Reduction.
        op: ReduceOp,
    },
    /// Every participant ends with every participant's block (blocks of ranks that did not
    /// take part are left as the caller passed them).
    AllGather,
    /// Every participant ends with `root`'s buffer.
    Broadcast {
        /// The sender.
        root: usize,
    },
    /// `root` ends with the reduction over the participants.
    Reduce {
        /// The receiver.
        root: usize,
        /// Reduction.
        op: ReduceOp,
    },
    /// Returns once every participant has entered (an all-reduce of nothing).
    Barrier,
    /// All-reduce of f32 contributions sent compressed (for slow, WAN hops): the buffer is this
    /// rank's encoding (`codec::encode`, or `codec::ErrorFeedback::encode` to carry the error
    /// into the next call); every participant's encoding reaches every participant, which
    /// decodes and sums them in rank order, so results are bit-identical. The result is the
    /// f32 sum (or average, for `op = Avg`). Every rank's encoding must have the same length.
    CompressedAllReduce {
        /// `Sum` or `Avg`.
        op: ReduceOp,
        /// How the contributions are encoded.
        compression: Compression,
    },
}

impl Op {
    fn reduce_op(self) -> ReduceOp {
        match self {
            Op::AllReduce { op, .. } | Op::ReduceScatter { op } | Op::Reduce { op, .. } => op,
            _ => ReduceOp::Sum,
        }
    }

    /// Whether every participant ends with the same bytes (what `verify` compares).
    fn same_result_everywhere(self) -> bool {
        matches!(
            self,
            Op::AllReduce { .. } | Op::AllGather | Op::Broadcast { .. } | Op::Barrier | Op::CompressedAllReduce { .. }
        )
    }

    /// The schedule of `rank` among `participants` (ascending) of a group of `world`, for a
    /// buffer of `bytes`, with its block map; `Err(root)` if the root is not a participant.
    #[allow(clippy::type_complexity)]
    fn schedule(
        self,
        rank: usize,
        participants: &[usize],
        topology: &Topology,
        bytes: usize,
    ) -> Result<(Schedule, Option<(usize, Vec<usize>)>), usize> {
        let world = topology.world();
        let k = participants.len();
        let index = |r: usize| participants.iter().position(|p| *p == r);
        let v = index(rank).expect("a participant");
        // Over the participants' own blocks of the caller's buffer.
        let mapped = |s: Schedule| (s, Some((world, participants.to_vec())));
        let ring = |c| ring::schedule(c, v, k).expect("the ring implements reduce-scatter and all-gather");
        Ok(match self {
            Op::AllReduce { algorithm, .. } => {
                (all_reduce_schedule_on(algorithm, v, &topology.restrict(participants), bytes), None)
            }
            Op::ReduceScatter { .. } => mapped(ring(Collective::ReduceScatter)),
            Op::AllGather if k > 2 && k.is_power_of_two() && bytes < SMALL_ALL_GATHER_BYTES => {
                mapped(halving_doubling::all_gather(v, k).expect("a power of two"))
            }
            Op::AllGather | Op::CompressedAllReduce { .. } => mapped(ring(Collective::AllGather)),
            Op::Broadcast { root } => (tree::broadcast(index(root).ok_or(root)?, v, k), None),
            Op::Reduce { root, .. } => (tree::reduce(index(root).ok_or(root)?, v, k), None),
            Op::Barrier => (halving_doubling::all_reduce(v, k), None),
        })
    }
}

/// Why a collective failed (all ranks of a coordinated call get the same error).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum GroupError {
    /// A rank was lost under [`FaultPolicy::Abort`].
    #[error("collective #{op_seq} lost rank {rank} (epoch {epoch})")]
    PeerLost {
        /// The collective.
        op_seq: u64,
        /// The lost rank.
        rank: usize,
        /// The group's membership epoch.
        epoch: u64,
    },
    /// Fewer than `min` ranks contributed (or survived).
    #[error("collective #{op_seq}: {contributed} ranks could take part, the quorum needs {min}")]
    QuorumNotMet {
        /// The collective.
        op_seq: u64,
        /// How many could.
        contributed: usize,
        /// The quorum.
        min: usize,
    },
    /// The root of a broadcast or reduce is not among the participants.
    #[error("collective #{op_seq}: root rank {root} is not among the participants")]
    RootLost {
        /// The collective.
        op_seq: u64,
        /// The root.
        root: usize,
    },
    /// `verify`: these ranks' results differ from the majority's.
    #[error("collective #{op_seq}: results of ranks {ranks:?} differ from the majority")]
    ResultMismatch {
        /// The collective.
        op_seq: u64,
        /// The ranks outside the majority.
        ranks: Vec<usize>,
    },
    /// A participant's compressed contribution could not be decoded.
    #[error("collective #{op_seq}: the contribution of rank {rank} is malformed")]
    Malformed {
        /// The collective.
        op_seq: u64,
        /// Whose contribution.
        rank: usize,
    },
    /// Retried more often than attempts can be numbered.
    #[error("collective #{op_seq} gave up after {attempts} attempts")]
    TooManyAttempts {
        /// The collective.
        op_seq: u64,
        /// Attempts made.
        attempts: u32,
    },
}

/// The result of a finished collective.
#[derive(Debug, PartialEq, Eq)]
pub enum Finished {
    /// The buffer of a scheduled collective, and the ranks whose contributions it holds
    /// (ascending; for `Avg` the divisor is their number).
    Buffer {
        /// The result.
        data: Vec<u8>,
        /// Who took part.
        participants: Vec<usize>,
    },
    /// The result of an all-to-all.
    AllToAll(AllToAllResult),
    /// This rank's contribution missed the round (quorum) or it was counted out (suspected
    /// lost): here it is back, untouched, to fold into a later round.
    Late {
        /// The contribution as it was passed in.
        contribution: Vec<u8>,
        /// Who took part in the round.
        participants: Vec<usize>,
    },
    /// The collective failed; the contribution is dropped (and counted as such).
    Failed(GroupError),
}

/// What happened to the contributions of this rank (checkable: `offered = applied + late +
/// dropped`, plus one while a call runs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupCounters {
    /// Collectives started.
    pub offered: u64,
    /// Collectives that returned a result holding this rank's contribution.
    pub applied: u64,
    /// Contributions handed back as [`Finished::Late`].
    pub late: u64,
    /// Contributions dropped: the call failed or was abandoned (each reported to the caller).
    pub dropped: u64,
    /// Attempts restarted because a participant was lost.
    pub retries: u64,
    /// Messages dropped: for a finished or abandoned collective, or malformed.
    pub stale_messages: u64,
    /// Decisions this rank made as coordinator.
    pub decisions: u64,
    /// Results handed back as a copy because the transport still held parts of the buffer
    /// lent to it ([`Group::take_back`]); zero when every loan came back in time.
    pub lent_copies: u64,
    /// Received segments the transport read straight into the caller's buffer (posted:
    /// [`Group::set_post_receives`]), so no copy was made of them.
    pub received_in_place: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Committed(u32),
    Late,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum MemberState {
    Ready,
    Running { attempt: u32, participants: Vec<usize> },
    Done { attempt: u32, participants: Vec<usize>, hash: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Report {
    /// The collective the rank is in: its sequence number, options, state, and (broadcast,
    /// reduce) its root.
    current: Option<(u64, CallOptions, MemberState, Option<usize>)>,
    recent: Vec<(u64, Outcome)>,
}

/// The root of a rooted operation (broadcast, reduce).
fn root_of(op: Option<Op>) -> Option<usize> {
    match op {
        Some(Op::Broadcast { root }) | Some(Op::Reduce { root, .. }) => Some(root),
        _ => None,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Decision {
    Plan { attempt: u32, participants: Vec<usize> },
    Commit { attempt: u32 },
    Fail(GroupError),
}

enum Phase {
    /// Coordinated: reported Ready, waiting for a plan.
    Ready,
    Running {
        attempt: u32,
        participants: Vec<usize>,
        exec: Box<Executor>,
    },
    AllToAll(AllToAll),
    /// Coordinated: finished the attempt, waiting for the commit.
    Done {
        attempt: u32,
        participants: Vec<usize>,
        result: Vec<u8>,
    },
    Finished(Finished),
}

struct Call {
    op_seq: u64,
    options: CallOptions,
    /// The operation (`None`: all-to-all).
    op: Option<Op>,
    dtype: DType,
    /// The caller's buffer, until an attempt takes it.
    spare: Option<Vec<u8>>,
    /// A copy of the contribution, for retries and `Late` (coordinated calls only).
    original: Option<Vec<u8>>,
    /// A phantom buffer's length (the simulator at scale): `spare` and `original` are empty.
    phantom: Option<usize>,
    phase: Phase,
    /// A commit that arrived while this rank was still running that attempt.
    commit: Option<u32>,
}

struct CoordOp {
    options: CallOptions,
    /// A broadcast's or reduce's root: a quorum plan waits for it (a plan without it could
    /// only fail).
    root: Option<usize>,
    since: u64,
    ready: BTreeSet<usize>,
    /// Ranks heard from (any report) since this rank coordinates the collective.
    heard: BTreeSet<usize>,
    /// Ranks whose latest report was about this collective.
    at_op: BTreeSet<usize>,
    /// Ranks that gave the collective up (deadline) or were counted out.
    departed: BTreeSet<usize>,
    attempt: u32,
    plan: Option<Vec<usize>>,
    planned_by_me: bool,
    done: BTreeMap<usize, u64>,
    decision: Option<Decision>,
}

impl CoordOp {
    fn terminal(&self) -> bool {
        matches!(self.decision, Some(Decision::Commit { .. } | Decision::Fail(_)))
    }
}

/// The collectives of one group, as one state machine.
pub struct Group {
    rank: usize,
    world: usize,
    topology: Topology,
    epoch: u64,
    now: u64,
    next_op: u64,
    lost: BTreeSet<usize>,
    running: Option<Call>,
    /// Data messages for later collectives or attempts: `(op_seq, attempt, from, message,
    /// phantom bytes)`.
    backlog: Vec<(u64, u32, usize, Payload, usize)>,
    /// Decisions for collectives this rank has not started yet, in arrival order.
    early_decisions: BTreeMap<u64, Vec<Decision>>,
    /// The latest report of each rank (what a coordinator decides from, also after it takes
    /// over).
    reports: BTreeMap<usize, Report>,
    recent: VecDeque<(u64, Outcome)>,
    coord: BTreeMap<u64, CoordOp>,
    outbox: VecDeque<(usize, Bytes)>,
    counters: GroupCounters,
    corrupt_next: bool,
    /// Largest message of a scheduled collective (the executor's segment).
    segment_bytes: usize,
    /// Lend unwritten send segments to the transport ([`Group::set_lend_sends`]).
    lend_sends: bool,
    /// Post receive segments for the transport to fill ([`Group::set_post_receives`]).
    post_receives: bool,
}

impl Group {
    /// A group of `world` ranks; this is `rank`.
    pub fn new(rank: usize, world: usize) -> Group {
        assert!(rank < world, "rank {rank} outside world {world}");
        Group {
            rank,
            world,
            topology: Topology::flat(world),
            epoch: 0,
            now: 0,
            next_op: 1,
            lost: BTreeSet::new(),
            running: None,
            backlog: Vec::new(),
            early_decisions: BTreeMap::new(),
            reports: BTreeMap::new(),
            recent: VecDeque::new(),
            coord: BTreeMap::new(),
            outbox: VecDeque::new(),
            counters: GroupCounters::default(),
            corrupt_next: false,
            segment_bytes: crate::executor::SEGMENT_BYTES,
            lend_sends: false,
            post_receives: false,
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the group.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Which data centre each rank is in (for [`AllReduceAlgorithm::Auto`] and
    /// [`AllReduceAlgorithm::Hierarchical`]); every rank must set the same. Panics if it does
    /// not describe this group's ranks.
    pub fn set_topology(&mut self, topology: Topology) {
        assert_eq!(topology.world(), self.world, "a topology of the group's ranks");
        self.topology = topology;
    }

    /// The membership epoch errors name (set by the runtime's membership).
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// Ranks this rank knows to be lost, ascending.
    pub fn lost(&self) -> Vec<usize> {
        self.lost.iter().copied().collect()
    }

    /// Messages dropped because their collective was already finished or abandoned, or
    /// because they were malformed.
    pub fn stale_dropped(&self) -> u64 {
        self.counters.stale_messages
    }

    /// What happened to this rank's contributions so far.
    pub fn counters(&self) -> GroupCounters {
        self.counters
    }

    /// Sets the largest data message (the executor's unit of pipelining, default
    /// [`crate::executor::SEGMENT_BYTES`]) for collectives started from now on. Every rank of
    /// the group must use the same value. The simulator raises it at scale, where one message
    /// per block is enough and far cheaper to simulate.
    pub fn set_segment_bytes(&mut self, bytes: usize) {
        self.segment_bytes = bytes.max(1);
    }

    /// Sends segments that nothing writes afterwards (an all-gather's own block), or only a
    /// later copying receive (a ring reduce-scatter's partial sums), as the caller's buffer
    /// itself, lent to the transport, not a copy ([`Layout::lend`]; large buffers only; such a
    /// receive waits for the loan to end, looked at on every event and on a short timer:
    /// [`Group::poll_timeout`]). A finished collective then waits, before it hands the buffer back, until
    /// the transport has returned them — a driver wakes the group with [`Group::lent`]'s handle
    /// and calls [`Group::poll`] — or it copies the buffer if the call ends first. Off by default
    /// (the simulator's transport keeps no such handles; the communicator turns it on).
    pub fn set_lend_sends(&mut self, lend: bool) {
        self.lend_sends = lend;
    }

    /// Posts receive segments that nothing writes afterwards (the blocks an all-gather receives,
    /// the gathering half of a ring all-reduce) for the transport to read their data straight
    /// into the caller's buffer ([`Layout::post`]; large buffers only): the driver files each
    /// posting [`Group::poll_posting`] gives with its transport (see `phalanx_proto::posting`).
    /// Off by default (the simulator's transport has no such place; the communicator turns it
    /// on).
    pub fn set_post_receives(&mut self, post: bool) {
        self.post_receives = post;
    }

    /// The next receive posted by the running collective: `(sending rank, the message's first
    /// part, the posting)`, for the driver to file with its transport.
    pub fn poll_posting(&mut self) -> Option<(usize, [u8; crate::executor::MESSAGE_HEADER], Arc<Posting>)> {
        match &mut self.running.as_mut()?.phase {
            Phase::Running { exec, participants, .. } => {
                exec.poll_posting().map(|p| (participants[p.from], p.head, p.posting))
            }
            _ => None,
        }
    }

    /// While the running collective is finished but parts of its buffer are still lent to the
    /// transport (sent, not yet acknowledged): a handle that says when they are back; then
    /// call [`Group::poll`].
    pub fn lent(&self) -> Option<Returned> {
        match self.running.as_ref().map(|c| &c.phase) {
            Some(Phase::Running { exec, .. }) if exec.is_done() && !exec.has_outgoing() => exec.lent(),
            _ => None,
        }
    }

    /// Moves a collective on whose buffer has come back from the transport ([`Group::lent`]).
    pub fn poll(&mut self) {
        self.pump();
    }

    /// Moves a finished collective on even though parts of its buffer are still lent: its
    /// result is then a copy (the transport keeps the lent bytes until it is done with them).
    /// For a driver that will not wait longer for the transport's acknowledgements.
    pub fn take_back(&mut self) {
        if self.lent().is_some() {
            self.counters.lent_copies += 1;
        }
        self.pump_with(true);
    }

    /// Fault injection (tests, chaos runs): flip one bit of this rank's next result before it
    /// is hashed and returned, as a bad reduction kernel or bad memory would.
    pub fn corrupt_next_result(&mut self) {
        self.corrupt_next = true;
    }

    /// The coordinator in this rank's view: the lowest rank not known to be lost.
    pub fn coordinator(&self) -> usize {
        (0..self.world).find(|r| !self.lost.contains(r)).unwrap_or(self.rank)
    }

    fn begin(&mut self, now: u64, options: CallOptions, op: Option<Op>, dtype: DType, buf: Vec<u8>) -> u64 {
        assert!(self.running.is_none(), "one collective at a time per group");
        self.now = now;
        let op_seq = self.next_op;
        self.next_op += 1;
        self.counters.offered += 1;
        let original = options.coordinated().then(|| buf.clone());
        self.running = Some(Call {
            op_seq,
            options,
            op,
            dtype,
            spare: Some(buf),
            original,
            phantom: None,
            phase: Phase::Ready,
            commit: None,
        });
        // Data for earlier collectives can no longer be used.
        let before = self.backlog.len();
        self.backlog.retain(|(s, ..)| *s >= op_seq);
        self.counters.stale_messages += (before - self.backlog.len()) as u64;
        op_seq
    }

    /// Starts `op` on `buf` (whole elements of `dtype`) under `options`; returns its sequence
    /// number. `now` is the driver's clock in nanoseconds.
    pub fn start(&mut self, now: u64, op: Op, dtype: DType, buf: Vec<u8>, options: CallOptions) -> u64 {
        self.start_payload(now, op, dtype, buf, None, options)
    }

    /// Like [`Group::start`] on a *phantom* buffer of `bytes` (a length, no data: the
    /// simulator at scale). Everything runs as for a real buffer (schedules, dataflow,
    /// coordination, faults); messages carry phantom lengths (drive the group with
    /// [`Group::poll_send_sized`] and [`Group::handle_message_sized`]) and results are empty
    /// buffers. Panics for [`Op::CompressedAllReduce`], whose result depends on the data.
    pub fn start_phantom(&mut self, now: u64, op: Op, dtype: DType, bytes: usize, options: CallOptions) -> u64 {
        assert!(!matches!(op, Op::CompressedAllReduce { .. }), "compressed all-reduce needs real data");
        self.start_payload(now, op, dtype, Vec::new(), Some(bytes), options)
    }

    fn start_payload(
        &mut self,
        now: u64,
        op: Op,
        dtype: DType,
        buf: Vec<u8>,
        phantom: Option<usize>,
        options: CallOptions,
    ) -> u64 {
        assert_eq!(phantom.unwrap_or(buf.len()) % dtype.size(), 0, "buffer is not whole elements");
        let buf = match op {
            // The all-gather of encodings: this rank's block of a buffer of one per rank.
            Op::CompressedAllReduce { .. } => {
                let mut all = vec![0u8; buf.len() * self.world];
                all[self.rank * buf.len()..(self.rank + 1) * buf.len()].copy_from_slice(&buf);
                all
            }
            _ => buf,
        };
        let dtype = if matches!(op, Op::CompressedAllReduce { .. }) { DType::U8 } else { dtype };
        let op_seq = self.begin(now, options, Some(op), dtype, buf);
        if let Some(call) = self.running.as_mut() {
            call.phantom = phantom;
        }
        if options.coordinated() {
            if options.policy == FaultPolicy::Abort {
                // Abort + verify: the plan is the whole group; only the commit is coordinated.
                self.apply_decision(Decision::Plan { attempt: 0, participants: (0..self.world).collect() });
            }
            for d in self.early_decisions.remove(&op_seq).unwrap_or_default() {
                self.apply_decision(d);
            }
            if matches!(self.running.as_ref().map(|c| &c.phase), Some(Phase::Ready)) {
                self.report();
            }
        } else {
            match self.lost.iter().next() {
                Some(&rank) => self.fail(GroupError::PeerLost { op_seq, rank, epoch: self.epoch }),
                None => self.apply_decision(Decision::Plan { attempt: 0, participants: (0..self.world).collect() }),
            }
        }
        self.pump();
        op_seq
    }

    /// Starts a scheduled collective on `buf` over the whole group under [`FaultPolicy::Abort`]
    /// (the schedule is used as given); returns its sequence number.
    pub fn start_schedule(&mut self, schedule: Schedule, dtype: DType, op: ReduceOp, buf: Vec<u8>) -> u64 {
        let op_seq = self.begin(self.now, CallOptions::default(), None, dtype, Vec::new());
        let tag = data_tag(op_seq, 0);
        let exec = Executor::new(schedule, tag, dtype, op, self.world, buf);
        self.set_running(0, (0..self.world).collect(), exec);
        self.pump();
        op_seq
    }

    /// Starts an all-to-all(-v): `send[d]` goes to rank `d`. Peers are independent here, so it
    /// is never coordinated: under `Shrink` or `Quorum` a lost peer's share comes back in
    /// [`AllToAllResult::undelivered`]; under `Abort` the call fails.
    pub fn start_all_to_all(&mut self, now: u64, send: Vec<Bytes>, policy: FaultPolicy) -> u64 {
        assert_eq!(send.len(), self.world, "one send buffer per rank");
        let op_seq = self.begin(now, CallOptions::policy(policy), None, DType::I32, Vec::new());
        if let Some(call) = self.running.as_mut() {
            call.original = None;
        }
        let mut a = AllToAll::new(self.rank, data_tag(op_seq, 0), send);
        let lost: Vec<usize> = self.lost.iter().copied().collect();
        if policy == FaultPolicy::Abort && !lost.is_empty() {
            self.fail(GroupError::PeerLost { op_seq, rank: lost[0], epoch: self.epoch });
            return op_seq;
        }
        for r in lost {
            a.peer_lost(r);
        }
        if let Some(call) = self.running.as_mut() {
            call.phase = Phase::AllToAll(a);
        }
        self.flush_backlog(op_seq, 0);
        self.pump();
        op_seq
    }

    fn set_running(&mut self, attempt: u32, participants: Vec<usize>, exec: Executor) {
        debug_assert!(participants.windows(2).all(|w| w[0] < w[1]), "participants ascending");
        let Some(call) = self.running.as_mut() else { return };
        call.phase = Phase::Running { attempt, participants, exec: Box::new(exec) };
        let op_seq = call.op_seq;
        self.flush_backlog(op_seq, attempt);
    }

    /// Hands the kept messages of `(op_seq, attempt)` to it; drops those of earlier attempts.
    fn flush_backlog(&mut self, op_seq: u64, attempt: u32) {
        let (mine, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.backlog).into_iter().partition(|(s, a, ..)| *s == op_seq && *a == attempt);
        self.backlog = rest;
        let before = self.backlog.len();
        self.backlog.retain(|(s, a, ..)| *s > op_seq || *a > attempt);
        self.counters.stale_messages += (before - self.backlog.len()) as u64;
        for (_, _, from, payload, phantom) in mine {
            self.deliver(from, payload, phantom);
        }
    }

    /// The next message to send: `(destination rank, its bytes)`, in one part or several
    /// (an all-to-all sends its header and the caller's buffer as two, so the buffer is not
    /// copied; a transport sends the parts as one message). (With phantom buffers use
    /// [`Group::poll_send_sized`]: this drops the phantom length.)
    pub fn poll_send(&mut self) -> Option<(usize, Payload)> {
        self.poll_send_sized().map(|(to, m, _)| (to, m))
    }

    /// The next message to send: `(destination rank, its bytes, phantom bytes)`; the phantom
    /// length (the bytes the message stands for beyond those it holds) is 0 unless the
    /// collective was started with [`Group::start_phantom`].
    pub fn poll_send_sized(&mut self) -> Option<(usize, Payload, usize)> {
        if let Some((to, m)) = self.outbox.pop_front() {
            return Some((to, m.into(), 0));
        }
        let call = self.running.as_mut()?;
        let out = match &mut call.phase {
            Phase::Running { exec, participants, .. } => {
                exec.poll_send_sized().map(|(v, m, phantom)| (participants[v], m, phantom))
            }
            Phase::AllToAll(a) => a.poll_send().map(|(to, m)| (to, m, 0)),
            _ => None,
        };
        // The last send may be what the attempt still waited for.
        self.pump();
        out
    }

    /// When [`Group::handle_timeout`] is next due (nanoseconds), if ever: a quorum wait's end,
    /// or shortly, while a received segment waits for a loan to come back (the transport lets
    /// go of a range lent until back when the peer acknowledges it, which is no event of the
    /// group's; see [`Layout::lend`]). Always later than the latest time the group was given: a
    /// quorum wait that has passed while too few ranks are ready needs no timer (the next
    /// report decides), so a driver never spins on it.
    pub fn poll_timeout(&self) -> Option<u64> {
        // A received segment that waits for part of its range to come back from the transport
        // (lent until it comes back: see `Layout::lend`) is looked at again shortly; the loan
        // ends with an acknowledgement, which is no event of the group's.
        let loans = match self.running.as_ref().map(|c| &c.phase) {
            Some(Phase::Running { exec, .. }) if exec.waits_for_loans() => Some(self.now + LOAN_RETRY_NS),
            _ => None,
        };
        self.coord
            .values()
            .filter(|c| c.plan.is_none() && c.decision.is_none())
            .filter_map(|c| match c.options.policy {
                FaultPolicy::Quorum { wait, .. } => Some(c.since.saturating_add(wait.as_nanos() as u64)),
                _ => None,
            })
            .filter(|due| *due > self.now)
            .chain(loans)
            .min()
    }

    /// The clock reached `now` (nanoseconds).
    pub fn handle_timeout(&mut self, now: u64) {
        self.now = now.max(self.now);
        self.coordinate_all();
        self.pump();
    }

    /// The transport declared `rank` unreachable: it is lost for the rest of this group's life.
    pub fn handle_peer_lost(&mut self, rank: usize, now: u64) {
        self.now = now.max(self.now);
        if rank >= self.world || rank == self.rank {
            return;
        }
        let before = self.coordinator();
        if !self.lost.insert(rank) {
            return;
        }
        if let Some(call) = self.running.as_mut() {
            let op_seq = call.op_seq;
            let abort = call.options.policy == FaultPolicy::Abort;
            match &mut call.phase {
                Phase::AllToAll(a) if !abort => a.peer_lost(rank),
                Phase::AllToAll(_) => self.fail(GroupError::PeerLost { op_seq, rank, epoch: self.epoch }),
                Phase::Running { participants, .. } if abort && participants.contains(&rank) => {
                    self.fail(GroupError::PeerLost { op_seq, rank, epoch: self.epoch })
                }
                _ => {}
            }
        }
        if self.coordinator() != before {
            if self.coordinator() == self.rank {
                // Taking over: decide from what the others have told this rank so far.
                for (from, r) in self.stored_reports() {
                    self.apply_report(from, &r);
                }
            }
            // A new coordinator: tell it where this rank stands.
            self.report();
        }
        self.coordinate_all();
        self.pump();
    }

    /// A message from `from` arrived (as the transport's chunks). `now` is the driver's clock.
    pub fn handle_message(&mut self, from: usize, chunks: Vec<Bytes>, now: u64) {
        self.handle_message_sized(from, chunks, 0, now)
    }

    /// Like [`Group::handle_message`], for a message standing for `phantom` more bytes than it
    /// holds (what [`Group::poll_send_sized`] said at the sender).
    pub fn handle_message_sized(&mut self, from: usize, chunks: Vec<Bytes>, phantom: usize, now: u64) {
        let mut payload = Payload::new();
        for c in chunks {
            payload.push(c);
        }
        self.receive(from, payload, phantom, now)
    }

    /// Like [`Group::handle_message`], for a message as the transport delivered it, with the
    /// checksums it verified ([`Payload::chunk_crc`]; a segment forwarded unchanged is sent on
    /// with its checksum, not read again).
    pub fn handle_payload(&mut self, from: usize, payload: Payload, now: u64) {
        self.receive(from, payload, 0, now)
    }

    fn receive(&mut self, from: usize, payload: Payload, phantom: usize, now: u64) {
        self.now = now.max(self.now);
        let mut head = [0u8; 8];
        let mut have = 0;
        for c in payload.chunks() {
            let n = (8 - have).min(c.len());
            head[have..have + n].copy_from_slice(&c[..n]);
            have += n;
        }
        if have < 8 || from >= self.world {
            self.counters.stale_messages += 1;
            return;
        }
        let tag = u64::from_le_bytes(head);
        if tag & CONTROL != 0 {
            let mut body = payload.to_bytes();
            body.advance(8);
            match decode_control(body, self.world) {
                Some(Control::Report(r)) => self.handle_report(from, r),
                Some(Control::Decision(op_seq, d)) => self.handle_decision(op_seq, d),
                None => self.counters.stale_messages += 1,
            }
        } else {
            let (op_seq, attempt) = (tag >> ATTEMPT_BITS, (tag & u64::from(MAX_ATTEMPT)) as u32);
            let (deliver, keep) = match &self.running {
                None => (false, op_seq >= self.next_op),
                Some(c) if op_seq != c.op_seq => (false, op_seq > c.op_seq),
                Some(c) => match &c.phase {
                    Phase::Ready => (false, true),
                    Phase::Running { attempt: a, .. } => (attempt == *a, attempt > *a),
                    Phase::Done { attempt: a, .. } => (false, attempt > *a),
                    Phase::AllToAll(_) => (attempt == 0, false),
                    Phase::Finished(_) => (false, false),
                },
            };
            if deliver {
                self.deliver(from, payload, phantom);
            } else if keep {
                self.backlog.push((op_seq, attempt, from, payload, phantom));
            } else {
                self.counters.stale_messages += 1;
            }
        }
        self.pump();
    }

    fn is_finished(&self) -> bool {
        matches!(self.running.as_ref().map(|c| &c.phase), Some(Phase::Finished(_)))
    }

    fn deliver(&mut self, from: usize, payload: Payload, phantom: usize) {
        let Some(call) = self.running.as_mut() else { return };
        let result: Result<(), ExecError> = match &mut call.phase {
            // Participant lists are ascending (plans are built so, and decoded ones checked).
            Phase::Running { exec, participants, .. } => match participants.binary_search(&from) {
                Ok(v) => exec.handle_payload_sized(v, &payload, phantom),
                Err(_) => Err(ExecError::Unexpected { from, round: 0, block: 0 }),
            },
            Phase::AllToAll(_) if phantom != 0 => Err(ExecError::Unexpected { from, round: 0, block: 0 }),
            Phase::AllToAll(a) => a.handle_message(from, payload.to_bytes()),
            _ => Ok(()),
        };
        if result.is_err() {
            self.counters.stale_messages += 1;
        }
    }

    /// Moves a finished attempt on: to `Done` (coordinated) or `Finished`.
    fn pump(&mut self) {
        self.pump_with(false)
    }

    /// [`Group::pump`]; with `take_back`, a finished collective whose buffer is still lent to
    /// the transport finishes anyway, with a copy of it.
    fn pump_with(&mut self, take_back: bool) {
        let Some(call) = self.running.as_mut() else { return };
        if let Phase::Running { exec, .. } = &mut call.phase {
            // A loan may have come back since the last event.
            exec.poll_loans();
        }
        match &mut call.phase {
            Phase::Running { exec, .. } if exec.is_done() && !exec.has_outgoing() && (take_back || !exec.is_lent()) => {
            }
            Phase::AllToAll(a) if a.is_done() => {
                let Phase::AllToAll(a) = std::mem::replace(&mut call.phase, Phase::Ready) else { unreachable!() };
                call.phase = Phase::Finished(Finished::AllToAll(a.into_result()));
                return;
            }
            _ => return,
        }
        let Phase::Running { attempt, participants, exec } = std::mem::replace(&mut call.phase, Phase::Ready) else {
            unreachable!("matched above")
        };
        self.counters.received_in_place += exec.received_in_place();
        let mut result = exec.into_buffer();
        if let Some(Op::CompressedAllReduce { op, compression }) = call.op {
            match decode_and_sum(&result, op, compression, &participants, self.world) {
                Ok(sum) => result = sum,
                Err(rank) => {
                    let op_seq = call.op_seq;
                    return self.fail(GroupError::Malformed { op_seq, rank });
                }
            }
        }
        if std::mem::take(&mut self.corrupt_next) && !result.is_empty() {
            result[0] ^= 1;
        }
        if !call.options.coordinated() {
            call.phase = Phase::Finished(Finished::Buffer { data: result, participants });
            return;
        }
        let op = call.op.unwrap_or(Op::Barrier);
        let hash = if call.options.verify && op.same_result_everywhere() {
            result_hash(&result, op, call.dtype, &participants, self.world)
        } else {
            0
        };
        let committed = call.commit == Some(attempt);
        call.phase = Phase::Done { attempt, participants: participants.clone(), result };
        if committed {
            self.apply_decision(Decision::Commit { attempt });
        } else {
            self.report_state(MemberState::Done { attempt, participants, hash });
        }
    }

    /// Reports this rank's state to the coordinator.
    fn report(&mut self) {
        let state = match self.running.as_ref().map(|c| (&c.phase, c.options.coordinated())) {
            Some((Phase::Ready, true)) => Some(MemberState::Ready),
            Some((Phase::Running { attempt, participants, .. }, true)) => {
                Some(MemberState::Running { attempt: *attempt, participants: participants.clone() })
            }
            // The hash is resent as 0 ("unknown"): a new coordinator then does not compare it.
            Some((Phase::Done { attempt, participants, .. }, true)) => {
                Some(MemberState::Done { attempt: *attempt, participants: participants.clone(), hash: 0 })
            }
            _ => None,
        };
        match state {
            Some(s) => self.report_state(s),
            None => {
                let r = Report { current: None, recent: self.recent.iter().copied().collect() };
                self.send_report(r);
            }
        }
    }

    fn report_state(&mut self, state: MemberState) {
        let Some(call) = self.running.as_ref() else { return };
        let r = Report {
            current: Some((call.op_seq, call.options, state, root_of(call.op))),
            recent: self.recent.iter().copied().collect(),
        };
        self.send_report(r);
    }

    fn send_report(&mut self, r: Report) {
        let c = self.coordinator();
        if c == self.rank {
            self.handle_report(self.rank, r);
        } else {
            self.outbox.push_back((c, encode_report(&r)));
        }
    }

    fn handle_decision(&mut self, op_seq: u64, d: Decision) {
        match &self.running {
            Some(c) if c.op_seq == op_seq => self.apply_decision(d),
            _ if op_seq >= self.next_op => {
                // Kept for when this rank gets there (a handful: older plans make way).
                let list = self.early_decisions.entry(op_seq).or_default();
                if list.len() == 8 {
                    list.remove(0);
                }
                list.push(d);
            }
            _ => {}
        }
    }

    fn apply_decision(&mut self, d: Decision) {
        let rank = self.rank;
        let world = self.world;
        let topology = self.topology.clone();
        let Some(call) = self.running.as_mut() else { return };
        let op_seq = call.op_seq;
        match d {
            Decision::Plan { attempt, participants } => {
                let current = match &call.phase {
                    Phase::Ready => None,
                    Phase::Running { attempt, .. } | Phase::Done { attempt, .. } => Some(*attempt),
                    Phase::AllToAll(_) | Phase::Finished(_) => return,
                };
                if current.is_some_and(|a| a >= attempt) {
                    return;
                }
                if current.is_some() {
                    self.counters.retries += 1;
                }
                if !participants.contains(&rank) {
                    let mut contribution = call.spare.take().or_else(|| call.original.take()).unwrap_or_default();
                    if let Some(Op::CompressedAllReduce { .. }) = call.op {
                        // Hand back this rank's encoding, not the gather buffer around it.
                        let len = contribution.len() / world;
                        contribution = contribution[rank * len..(rank + 1) * len].to_vec();
                    }
                    call.phase = Phase::Finished(Finished::Late { contribution, participants });
                    self.record(op_seq, Outcome::Late);
                    return;
                }
                let buf = match call.spare.take() {
                    Some(b) => b,
                    None => call.original.clone().unwrap_or_default(),
                };
                let op = call.op.unwrap_or(Op::Barrier);
                let bytes = call.phantom.unwrap_or(buf.len());
                let (schedule, map) = match op.schedule(rank, &participants, &topology, bytes) {
                    Ok(s) => s,
                    Err(root) => return self.fail(GroupError::RootLost { op_seq, root }),
                };
                let tag = data_tag(op_seq, attempt);
                let (dtype, rop, k) = (call.dtype, op.reduce_op(), participants.len());
                let layout = Layout {
                    block_map: map,
                    segment_bytes: self.segment_bytes,
                    lend: self.lend_sends,
                    post: self.post_receives,
                };
                let exec = match call.phantom {
                    Some(len) => Executor::phantom(schedule, tag, dtype, rop, k, len, layout),
                    None => Executor::with_layout(schedule, tag, dtype, rop, k, buf, layout),
                };
                self.set_running(attempt, participants, exec);
            }
            Decision::Commit { attempt } => match &call.phase {
                Phase::Done { attempt: a, .. } if *a == attempt => {
                    let Phase::Done { participants, result, .. } = std::mem::replace(&mut call.phase, Phase::Ready)
                    else {
                        unreachable!("matched above")
                    };
                    call.phase = Phase::Finished(Finished::Buffer { data: result, participants });
                    self.record(op_seq, Outcome::Committed(attempt));
                }
                Phase::Running { attempt: a, .. } if *a == attempt => call.commit = Some(attempt),
                _ => {}
            },
            Decision::Fail(e) => self.fail(e),
        }
    }

    fn fail(&mut self, e: GroupError) {
        let Some(call) = self.running.as_mut() else { return };
        if matches!(call.phase, Phase::Finished(_)) {
            return;
        }
        call.phase = Phase::Finished(Finished::Failed(e));
        let op_seq = call.op_seq;
        self.record(op_seq, Outcome::Failed);
    }

    fn record(&mut self, op_seq: u64, outcome: Outcome) {
        if self.recent.len() == RECENT_OUTCOMES {
            self.recent.pop_front();
        }
        self.recent.push_back((op_seq, outcome));
    }

    /// Whether the running collective (if any) has finished.
    pub fn is_done(&self) -> bool {
        self.is_finished()
    }

    /// Ranks the running collective still waits for (the coordinator, while waiting for its
    /// decision).
    pub fn waiting_on(&self) -> Vec<usize> {
        let Some(call) = &self.running else { return Vec::new() };
        match &call.phase {
            Phase::Running { exec, participants, .. } => {
                exec.waiting_on().into_iter().map(|v| participants[v]).collect()
            }
            Phase::AllToAll(a) => a.waiting_on(),
            Phase::Ready | Phase::Done { .. } => vec![self.coordinator()],
            Phase::Finished(_) => Vec::new(),
        }
    }

    /// Takes the result of a finished collective (`None` while it runs or if none was started).
    pub fn finish(&mut self) -> Option<Finished> {
        if !self.is_finished() {
            return None;
        }
        let call = self.running.take()?;
        let Phase::Finished(f) = call.phase else { unreachable!("checked above") };
        match &f {
            Finished::Buffer { .. } | Finished::AllToAll(_) => self.counters.applied += 1,
            Finished::Late { .. } => self.counters.late += 1,
            Finished::Failed(_) => self.counters.dropped += 1,
        }
        Some(f)
    }

    /// Gives up the running collective (its deadline passed): its contribution is dropped
    /// (counted), later messages for it are dropped, and the coordinator is told, so that the
    /// other ranks can go on without this one.
    pub fn abandon(&mut self, now: u64) {
        self.now = now.max(self.now);
        let Some(call) = self.running.take() else { return };
        self.counters.dropped += 1;
        let coordinated = call.options.coordinated();
        self.record(call.op_seq, Outcome::Failed);
        if coordinated {
            self.report();
        }
        self.pump();
    }

    // ---- coordinator ----

    fn handle_report(&mut self, from: usize, r: Report) {
        self.reports.insert(from, r.clone());
        // A rank that is not (yet) the coordinator in its own view keeps the report for when it
        // takes over.
        if self.coordinator() == self.rank {
            self.apply_report(from, &r);
        }
    }

    /// The latest report of every rank (a copy: applying them changes `self`).
    fn stored_reports(&self) -> Vec<(usize, Report)> {
        self.reports.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    /// Applies `from`'s report to every collective this rank coordinates.
    fn apply_report(&mut self, from: usize, r: &Report) {
        let open: Vec<u64> = self.coord.keys().copied().collect();
        for op_seq in open {
            self.note(op_seq, from, r);
        }
        if let Some((op_seq, options, _, root)) = &r.current {
            if !self.coord.contains_key(op_seq) {
                if self.coord.len() >= COORDINATOR_HISTORY {
                    let oldest = *self.coord.keys().next().expect("not empty");
                    if *op_seq < oldest {
                        return;
                    }
                    self.coord.remove(&oldest);
                }
                let c = CoordOp {
                    options: *options,
                    root: *root,
                    since: self.now,
                    ready: BTreeSet::new(),
                    heard: BTreeSet::new(),
                    at_op: BTreeSet::new(),
                    departed: BTreeSet::new(),
                    attempt: 0,
                    plan: None,
                    planned_by_me: false,
                    done: BTreeMap::new(),
                    decision: None,
                };
                self.coord.insert(*op_seq, c);
                // Everything known so far about the other ranks counts for it too.
                for (m, rep) in self.stored_reports() {
                    self.note(*op_seq, m, &rep);
                }
            }
        }
        self.coordinate_all();
    }

    /// Applies one report of rank `m` to collective `op_seq`.
    fn note(&mut self, op_seq: u64, m: usize, rep: &Report) {
        let mut send: Vec<Decision> = Vec::new();
        let mut settle: Option<Decision> = None;
        {
            let Some(c) = self.coord.get_mut(&op_seq) else { return };
            c.heard.insert(m);
            for (o, outcome) in &rep.recent {
                if *o != op_seq {
                    continue;
                }
                c.at_op.remove(&m);
                if !c.terminal() {
                    match outcome {
                        Outcome::Committed(attempt) => settle = Some(Decision::Commit { attempt: *attempt }),
                        Outcome::Failed | Outcome::Late => {
                            c.departed.insert(m);
                        }
                    }
                }
            }
            match &rep.current {
                Some((o, _, state, _)) if *o == op_seq => {
                    c.at_op.insert(m);
                    if c.terminal() {
                        // A rank late to a settled collective: the plan (which may leave it
                        // out), then the outcome.
                        if let Some(plan) = &c.plan {
                            send.push(Decision::Plan { attempt: c.attempt, participants: plan.clone() });
                        }
                        send.extend(c.decision.clone());
                    } else {
                        match state {
                            MemberState::Ready => {
                                c.ready.insert(m);
                                if let Some(plan) = &c.plan {
                                    send.push(Decision::Plan { attempt: c.attempt, participants: plan.clone() });
                                }
                            }
                            MemberState::Running { attempt, participants }
                            | MemberState::Done { attempt, participants, .. }
                                if c.plan.is_none() || *attempt > c.attempt =>
                            {
                                // A plan this rank did not make (it took over): adopt it.
                                c.attempt = *attempt;
                                c.plan = Some(participants.clone());
                                c.planned_by_me = false;
                                c.done.clear();
                                if let MemberState::Done { hash, .. } = state {
                                    if participants.binary_search(&m).is_ok() {
                                        c.done.insert(m, *hash);
                                    }
                                }
                            }
                            // Only members of the plan count as done (`coordinate` relies on it).
                            MemberState::Done { attempt, hash, .. }
                                if *attempt == c.attempt
                                    && c.plan.as_ref().is_some_and(|p| p.binary_search(&m).is_ok()) =>
                            {
                                c.done.insert(m, *hash);
                            }
                            MemberState::Running { attempt, .. } | MemberState::Done { attempt, .. }
                                if *attempt < c.attempt =>
                            {
                                send.extend(c.decision.clone());
                            }
                            _ => {}
                        }
                    }
                }
                _ => {
                    c.at_op.remove(&m);
                }
            }
            if let Some(d) = &settle {
                c.decision = Some(d.clone());
            }
        }
        for d in send {
            self.send_decision(m, op_seq, d);
        }
        if let Some(d) = settle {
            self.broadcast(op_seq, d);
        }
    }

    fn coordinate_all(&mut self) {
        if self.coordinator() != self.rank {
            return;
        }
        let open: Vec<u64> = self.coord.iter().filter(|(_, c)| !c.terminal()).map(|(k, _)| *k).collect();
        for op_seq in open {
            self.coordinate(op_seq);
        }
    }

    /// Decides what collective `op_seq` does next, if anything can be decided now. The
    /// coordinator runs this on every report, so it counts through the (few) lost and departed
    /// ranks instead of walking the world; lists of ranks are built only for a decision.
    fn coordinate(&mut self, op_seq: u64) {
        let now = self.now;
        let Some(c) = self.coord.get(&op_seq) else { return };
        if c.terminal() {
            return;
        }
        let lost = &self.lost;
        let gone = |r: &usize| lost.contains(r) || c.departed.contains(r);
        // Every gone rank once: the lost, then the departed that are not lost.
        let gone_ranks = || lost.iter().chain(c.departed.iter().filter(|r| !lost.contains(r)));
        let live = self.world - lost.len();
        let decision = match &c.plan {
            None => {
                let ready = c.ready.len() - gone_ranks().filter(|r| c.ready.contains(r)).count();
                let present = live - c.departed.iter().filter(|r| !lost.contains(r)).count();
                let all_in = ready == present;
                let ready_list = || c.ready.iter().copied().filter(|r| !gone(r)).collect::<Vec<usize>>();
                match c.options.policy {
                    FaultPolicy::Quorum { min, .. } if present < min => {
                        Some(Decision::Fail(GroupError::QuorumNotMet { op_seq, contributed: ready, min }))
                    }
                    FaultPolicy::Quorum { min, wait } => {
                        let due = now >= c.since.saturating_add(wait.as_nanos() as u64);
                        let root_in = c.root.is_none_or(|x| gone(&x) || c.ready.contains(&x));
                        ((all_in || due) && ready >= min && ready > 0 && root_in)
                            .then(|| Decision::Plan { attempt: c.attempt, participants: ready_list() })
                    }
                    _ => {
                        (all_in && ready > 0).then(|| Decision::Plan { attempt: c.attempt, participants: ready_list() })
                    }
                }
            }
            Some(plan) => {
                // `done` holds members of the plan only (see `note`).
                let in_plan = |r: &&usize| plan.binary_search(r).is_ok();
                let alive = plan.len() - gone_ranks().filter(in_plan).count();
                let done_alive = c.done.len() - gone_ranks().filter(|r| c.done.contains_key(r)).count();
                let all_done = alive > 0 && done_alive == alive;
                let lost_one = gone_ranks().filter(in_plan).min().copied();
                let alive_list = || plan.iter().copied().filter(|r| !gone(r)).collect::<Vec<usize>>();
                if all_done {
                    Some(match mismatch(&c.done, &alive_list()) {
                        Some(ranks) => Decision::Fail(GroupError::ResultMismatch { op_seq, ranks }),
                        None => Decision::Commit { attempt: c.attempt },
                    })
                } else if let Some(rank) = lost_one {
                    // Heard from every live rank (`heard` holds ranks of the world only).
                    let heard_live = c.heard.len() - lost.iter().filter(|r| c.heard.contains(r)).count();
                    let informed = c.planned_by_me || heard_live == live;
                    let survivors = || -> Vec<usize> {
                        if c.planned_by_me {
                            alive_list()
                        } else {
                            alive_list().into_iter().filter(|r| c.at_op.contains(r)).collect()
                        }
                    };
                    match c.options.policy {
                        FaultPolicy::Abort => {
                            Some(Decision::Fail(GroupError::PeerLost { op_seq, rank, epoch: self.epoch }))
                        }
                        _ if !informed => None,
                        policy => {
                            let survivors = survivors();
                            match policy {
                                FaultPolicy::Quorum { min, .. } if survivors.len() < min => {
                                    Some(Decision::Fail(GroupError::QuorumNotMet {
                                        op_seq,
                                        contributed: survivors.len(),
                                        min,
                                    }))
                                }
                                _ if survivors.is_empty() => None,
                                _ if c.attempt >= MAX_ATTEMPT => Some(Decision::Fail(GroupError::TooManyAttempts {
                                    op_seq,
                                    attempts: c.attempt + 1,
                                })),
                                _ => Some(Decision::Plan { attempt: c.attempt + 1, participants: survivors }),
                            }
                        }
                    }
                } else {
                    None
                }
            }
        };
        let Some(d) = decision else { return };
        self.counters.decisions += 1;
        let c = self.coord.get_mut(&op_seq).expect("looked up above");
        if let Decision::Plan { attempt, participants } = &d {
            c.attempt = *attempt;
            c.plan = Some(participants.clone());
            c.planned_by_me = true;
            c.done.clear();
        }
        c.decision = Some(d.clone());
        self.broadcast(op_seq, d);
    }

    /// Sends `d` to every live rank (encoded once).
    fn broadcast(&mut self, op_seq: u64, d: Decision) {
        let message = encode_decision(op_seq, &d);
        let lost = self.lost.clone();
        for r in 0..self.world {
            if lost.contains(&r) {
                continue;
            }
            if r == self.rank {
                self.handle_decision(op_seq, d.clone());
                self.pump();
            } else {
                self.outbox.push_back((r, message.clone()));
            }
        }
    }

    fn send_decision(&mut self, to: usize, op_seq: u64, d: Decision) {
        if to == self.rank {
            self.handle_decision(op_seq, d);
            self.pump();
        } else {
            self.outbox.push_back((to, encode_decision(op_seq, &d)));
        }
    }
}

fn data_tag(op_seq: u64, attempt: u32) -> u64 {
    debug_assert!(op_seq < 1 << (63 - ATTEMPT_BITS));
    op_seq << ATTEMPT_BITS | u64::from(attempt)
}

/// The f32 sum (or average) of the participants' encodings in `gathered` (one block per rank),
/// added in rank order; `Err(rank)` names a contribution that does not decode.
fn decode_and_sum(
    gathered: &[u8],
    op: ReduceOp,
    compression: Compression,
    participants: &[usize],
    world: usize,
) -> Result<Vec<u8>, usize> {
    let mut acc: Vec<f32> = Vec::new();
    for (i, &p) in participants.iter().enumerate() {
        let r = block_range(gathered.len(), world, p);
        let bytes = &gathered[r];
        if i == 0 {
            acc = codec::decode(compression, bytes).map_err(|_| p)?;
        } else {
            codec::decode_add(compression, bytes, &mut acc).map_err(|_| p)?;
        }
    }
    if op == ReduceOp::Avg {
        let k = participants.len().max(1) as f32;
        acc.iter_mut().for_each(|a| *a /= k);
    }
    let mut out = Vec::with_capacity(acc.len() * 4);
    for x in &acc {
        out.extend_from_slice(&x.to_le_bytes());
    }
    Ok(out)
}

/// The ranks whose (known, nonzero) hash differs from the most common one; `None` if all agree.
fn mismatch(done: &BTreeMap<usize, u64>, alive: &[usize]) -> Option<Vec<usize>> {
    let hashes: Vec<(usize, u64)> =
        alive.iter().filter_map(|r| done.get(r).map(|h| (*r, *h))).filter(|(_, h)| *h != 0).collect();
    let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
    for (_, h) in &hashes {
        *votes.entry(*h).or_default() += 1;
    }
    // The majority hash; ties go to the hash of the lowest rank.
    let best = votes.values().copied().max()?;
    let majority = hashes.iter().find(|(_, h)| votes[h] == best).map(|(_, h)| *h)?;
    let odd: Vec<usize> = hashes.iter().filter(|(_, h)| *h != majority).map(|(r, _)| *r).collect();
    (!odd.is_empty()).then_some(odd)
}

/// A hash of the part of a result every participant holds alike (never 0).
fn result_hash(result: &[u8], op: Op, dtype: DType, participants: &[usize], world: usize) -> u64 {
    let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme);
    if op == Op::AllGather {
        let count = result.len() / dtype.size();
        for &p in participants {
            let r = block_range(count, world, p);
            d.update(&result[r.start * dtype.size()..r.end * dtype.size()]);
        }
    } else {
        d.update(result);
    }
    d.finalize().max(1)
}

// ---- control messages ----
//
// `tag u64 (CONTROL) | kind u8 | body`, little endian. Report (kind 1):
// `has_current u8 [op u64 | policy u8 | min u32 | wait_ns u64 | verify u8 | state u8 |
// attempt u32 | hash u64 | ranks] | m u8 | m × (op u64 | outcome u8 | attempt u32)`.
// Decision (kind 2): `op u64 | what u8 | attempt u32 | ranks | error`, the error
// (what = 2): `code u8 | op u64 | a u64 | b u64`. `ranks`: a list of ranks as runs of
// consecutive ranks, `runs u32 | runs × (first u32 | len u32)` (see `put_ranks`).

enum Control {
    Report(Report),
    Decision(u64, Decision),
}

/// A list of ranks (ascending) as runs of consecutive ranks: `runs u32 | runs × (first u32 |
/// len u32)`. A plan over a large group with a few ranks missing is a few runs, not a rank
/// per member (the coordinator sends one to every member).
fn put_ranks(m: &mut BytesMut, ranks: &[usize]) {
    debug_assert!(ranks.windows(2).all(|w| w[0] < w[1]), "rank lists are ascending");
    // One pass: the run count is written in front once the runs are known.
    let count_at = m.len();
    m.put_u32_le(0);
    let mut runs = 0u32;
    let mut rest = ranks;
    while let Some(&first) = rest.first() {
        let len = rest.iter().enumerate().take_while(|(i, r)| **r == first + i).count();
        m.put_u32_le(first as u32);
        m.put_u32_le(len as u32);
        runs += 1;
        rest = &rest[len..];
    }
    m[count_at..count_at + 4].copy_from_slice(&runs.to_le_bytes());
}

fn encode_report(r: &Report) -> Bytes {
    let mut m = BytesMut::with_capacity(64);
    m.put_u64_le(CONTROL);
    m.put_u8(1);
    match &r.current {
        None => m.put_u8(0),
        Some((op_seq, options, state, root)) => {
            m.put_u8(1);
            m.put_u64_le(*op_seq);
            m.put_u32_le(root.map_or(u32::MAX, |x| x as u32));
            let (p, min, wait) = match options.policy {
                FaultPolicy::Abort => (0, 0, 0),
                FaultPolicy::Shrink => (1, 0, 0),
                FaultPolicy::Quorum { min, wait } => (2, min as u32, wait.as_nanos() as u64),
            };
            m.put_u8(p);
            m.put_u32_le(min);
            m.put_u64_le(wait);
            m.put_u8(u8::from(options.verify));
            let (s, attempt, hash, ranks): (u8, u32, u64, &[usize]) = match state {
                MemberState::Ready => (0, 0, 0, &[]),
                MemberState::Running { attempt, participants } => (1, *attempt, 0, participants),
                MemberState::Done { attempt, participants, hash } => (2, *attempt, *hash, participants),
            };
            m.put_u8(s);
            m.put_u32_le(attempt);
            m.put_u64_le(hash);
            put_ranks(&mut m, ranks);
        }
    }
    m.put_u8(r.recent.len() as u8);
    for (op_seq, outcome) in &r.recent {
        m.put_u64_le(*op_seq);
        let (o, a) = match outcome {
            Outcome::Committed(a) => (0, *a),
            Outcome::Late => (1, 0),
            Outcome::Failed => (2, 0),
        };
        m.put_u8(o);
        m.put_u32_le(a);
    }
    m.freeze()
}

fn encode_decision(op_seq: u64, d: &Decision) -> Bytes {
    let mut m = BytesMut::with_capacity(64);
    m.put_u64_le(CONTROL);
    m.put_u8(2);
    m.put_u64_le(op_seq);
    match d {
        Decision::Plan { attempt, participants } => {
            m.put_u8(0);
            m.put_u32_le(*attempt);
            put_ranks(&mut m, participants);
        }
        Decision::Commit { attempt } => {
            m.put_u8(1);
            m.put_u32_le(*attempt);
            put_ranks(&mut m, &[]);
        }
        Decision::Fail(e) => {
            m.put_u8(2);
            m.put_u32_le(0);
            let (code, op, a, b, ranks): (u8, u64, u64, u64, &[usize]) = match e {
                GroupError::PeerLost { op_seq, rank, epoch } => (0, *op_seq, *rank as u64, *epoch, &[]),
                GroupError::QuorumNotMet { op_seq, contributed, min } => {
                    (1, *op_seq, *contributed as u64, *min as u64, &[])
                }
                GroupError::RootLost { op_seq, root } => (2, *op_seq, *root as u64, 0, &[]),
                GroupError::ResultMismatch { op_seq, ranks } => (3, *op_seq, 0, 0, ranks),
                GroupError::TooManyAttempts { op_seq, attempts } => (4, *op_seq, u64::from(*attempts), 0, &[]),
                GroupError::Malformed { op_seq, rank } => (5, *op_seq, *rank as u64, 0, &[]),
            };
            put_ranks(&mut m, ranks);
            m.put_u8(code);
            m.put_u64_le(op);
            m.put_u64_le(a);
            m.put_u64_le(b);
        }
    }
    m.freeze()
}

/// A bounds-checked reader: `None` on any short or malformed input.
struct Reader(Bytes);

impl Reader {
    fn u8(&mut self) -> Option<u8> {
        (self.0.remaining() >= 1).then(|| self.0.get_u8())
    }
    fn u32(&mut self) -> Option<u32> {
        (self.0.remaining() >= 4).then(|| self.0.get_u32_le())
    }
    fn u64(&mut self) -> Option<u64> {
        (self.0.remaining() >= 8).then(|| self.0.get_u64_le())
    }
    /// Ranks as [`put_ranks`] writes them: runs ascending and apart, non-empty, every rank
    /// below `world` (so a message can never make the reader hold more than `world` ranks).
    fn ranks(&mut self, world: usize) -> Option<Vec<usize>> {
        let runs = self.u32()? as usize;
        if runs > self.0.remaining() / 8 {
            return None;
        }
        let mut v: Vec<usize> = Vec::new();
        for _ in 0..runs {
            let (first, len) = (self.0.get_u32_le() as usize, self.0.get_u32_le() as usize);
            let apart = v.last().is_none_or(|last| first > last + 1);
            if len == 0 || !apart || first.checked_add(len)? > world {
                return None;
            }
            v.extend(first..first + len);
        }
        Some(v)
    }
}

fn decode_control(body: Bytes, world: usize) -> Option<Control> {
    let mut r = Reader(body);
    let c = match r.u8()? {
        1 => {
            let current = match r.u8()? {
                0 => None,
                1 => {
                    let op_seq = r.u64()?;
                    let root = match r.u32()? {
                        u32::MAX => None,
                        x if (x as usize) < world => Some(x as usize),
                        _ => return None,
                    };
                    let (p, min, wait) = (r.u8()?, r.u32()?, r.u64()?);
                    let policy = match p {
                        0 => FaultPolicy::Abort,
                        1 => FaultPolicy::Shrink,
                        2 => FaultPolicy::Quorum { min: min as usize, wait: Duration::from_nanos(wait) },
                        _ => return None,
                    };
                    let verify = r.u8()? != 0;
                    let (s, attempt, hash, participants) = (r.u8()?, r.u32()?, r.u64()?, r.ranks(world)?);
                    let state = match s {
                        0 => MemberState::Ready,
                        1 => MemberState::Running { attempt, participants },
                        2 => MemberState::Done { attempt, participants, hash },
                        _ => return None,
                    };
                    Some((op_seq, CallOptions { policy, verify }, state, root))
                }
                _ => return None,
            };
            let n = r.u8()? as usize;
            let mut recent = Vec::with_capacity(n.min(RECENT_OUTCOMES));
            for _ in 0..n {
                let (op_seq, o, a) = (r.u64()?, r.u8()?, r.u32()?);
                recent.push((
                    op_seq,
                    match o {
                        0 => Outcome::Committed(a),
                        1 => Outcome::Late,
                        2 => Outcome::Failed,
                        _ => return None,
                    },
                ));
            }
            Control::Report(Report { current, recent })
        }
        2 => {
            let op_seq = r.u64()?;
            let (what, attempt, ranks) = (r.u8()?, r.u32()?, r.ranks(world)?);
            let d = match what {
                0 if attempt <= MAX_ATTEMPT => Decision::Plan { attempt, participants: ranks },
                1 => Decision::Commit { attempt },
                2 => {
                    let (code, op, a, b) = (r.u8()?, r.u64()?, r.u64()?, r.u64()?);
                    Decision::Fail(match code {
                        0 => GroupError::PeerLost { op_seq: op, rank: a as usize, epoch: b },
                        1 => GroupError::QuorumNotMet { op_seq: op, contributed: a as usize, min: b as usize },
                        2 => GroupError::RootLost { op_seq: op, root: a as usize },
                        3 => GroupError::ResultMismatch { op_seq: op, ranks },
                        4 => GroupError::TooManyAttempts { op_seq: op, attempts: a as u32 },
                        5 => GroupError::Malformed { op_seq: op, rank: a as usize },
                        _ => return None,
                    })
                }
                _ => return None,
            };
            Control::Decision(op_seq, d)
        }
        _ => return None,
    };
    Some(c)
}

#[cfg(test)]
mod tests;
