//! The deterministic executor: one thread, a virtual clock, an event heap ordered by
//! `(time, sequence)`, seeded random streams, and the real `Group` state machine of every
//! rank, driven exactly as the tokio `Communicator` drives it (start, drain sends, hand over
//! arrivals, peer losses and timeouts, take the result) — only the bytes travel through the
//! flow-level [`Fabric`] instead of sockets.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use phalanx_collectives::group::{AllReduceAlgorithm, CallOptions, FaultPolicy, Finished, Group, Op};
use phalanx_collectives::reduce::{DType, ReduceOp};
use phalanx_collectives::schedule::hierarchical::Topology;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::fabric::Fabric;
use crate::fair_share::FlowId;
use crate::report::{Collectives, Contributions, NetworkStats, Recovery, Report, SemisyncReport, StepPoint};
use crate::scenario::{AlgorithmKind, FaultKind, OnFailure, OpKind, PayloadKind, PolicyKind, Scenario, WorkloadKind};
use crate::trace::Trace;

mod frames;
mod layout;
mod membership;
mod semisync;
use frames::{FrameStats, Frames};
use membership::{Membership, Sender};
use phalanx_runtime::semisync::{CrossDcPlan, RoundResult, SyncCall};

const MS: f64 = 1e6;
const SEC: f64 = 1e9;
/// Per-frame header bytes on the wire (the transport's frame header).
const FRAME_OVERHEAD: u64 = phalanx_proto::frame::HEADER_LEN as u64;

/// How to run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Collect spans for a Chrome/Perfetto trace.
    pub trace: bool,
    /// Called now and then with (simulated ns, steps completed) for a progress display.
    pub progress_every: Option<Duration>,
}

/// What a run produced.
pub struct RunOutput {
    /// The report (DESIGN.md's JSON contract).
    pub report: Report,
    /// Spans, when asked for.
    pub trace: Option<Trace>,
}

#[derive(Debug)]
enum Ev {
    FlowDone {
        flow: FlowId,
        version: u64,
    },
    Deliver {
        from: u32,
        to: u32,
        epoch: u64,
        bytes: Bytes,
        phantom: usize,
        /// Which of the receiver's groups it is for (0: all ranks; 1: its data centre's).
        channel: u8,
    },
    /// The receiving rank has processed a delivered message (only with `rank_gbyte_s`).
    Processed {
        from: u32,
        to: u32,
        epoch: u64,
        bytes: Bytes,
        phantom: usize,
        channel: u8,
    },
    GroupTimer {
        rank: u32,
        epoch: u64,
    },
    Deadline {
        rank: u32,
        epoch: u64,
        op_seq: u64,
    },
    ComputeDone {
        rank: u32,
        epoch: u64,
    },
    /// Every live rank learns that `lost` is unreachable.
    LostNotice {
        lost: u32,
        epoch: u64,
    },
    /// Hosts `a` and `b` became unreachable at `since`; if still so, their ranks lose each other.
    HostsCut {
        a: u32,
        b: u32,
        since: u64,
    },
    FaultStart(usize),
    FaultEnd(usize),
    JobResume {
        epoch: u64,
    },
    /// Frame level: a frame reaches `to` on link `link` (`corrupt`: its checksum fails).
    Frame {
        to: u32,
        link: u32,
        epoch: u64,
        frame: Box<phalanx_proto::Frame>,
        corrupt: bool,
    },
    /// Frame level: rank `rank`'s endpoint timer is due.
    EndpointTimer {
        rank: u32,
        epoch: u64,
    },
    /// Membership: a coordinator's tick (of the incarnation that armed it).
    CoordTick {
        coordinator: u32,
        incarnation: u64,
    },
    /// Membership: a Raft message or a rank's request reaches a coordinator.
    ToCoordinator {
        to: u32,
        from: Sender,
        bytes: Bytes,
    },
    /// Membership: a coordinator's reply reaches a rank's process (of that incarnation).
    ToRank {
        slot: u32,
        incarnation: u64,
        bytes: Bytes,
    },
    /// Membership: a rank's request went unanswered (attempt `attempt`), or no leader was known.
    ClientRetry {
        slot: u32,
        incarnation: u64,
        attempt: u64,
        rotate: bool,
    },
    /// A joining rank's pause between two reads of the view is over.
    AdmissionWait {
        slot: u32,
        incarnation: u64,
    },
}

impl Ev {
    fn code(&self) -> (u8, u64, u64) {
        match self {
            Ev::FlowDone { flow, .. } => (1, *flow as u64, 0),
            Ev::Deliver { from, to, phantom, bytes, channel, .. } => {
                (2, (*from as u64) << 32 | *to as u64, (bytes.len() + phantom) as u64 | (*channel as u64) << 62)
            }
            Ev::Processed { from, to, phantom, bytes, channel, .. } => {
                (11, (*from as u64) << 32 | *to as u64, (bytes.len() + phantom) as u64 | (*channel as u64) << 62)
            }
            Ev::GroupTimer { rank, .. } => (3, *rank as u64, 0),
            Ev::Deadline { rank, op_seq, .. } => (4, *rank as u64, *op_seq),
            Ev::ComputeDone { rank, .. } => (5, *rank as u64, 0),
            Ev::LostNotice { lost, .. } => (6, *lost as u64, 0),
            Ev::HostsCut { a, b, .. } => (7, *a as u64, *b as u64),
            Ev::FaultStart(i) => (8, *i as u64, 0),
            Ev::FaultEnd(i) => (9, *i as u64, 0),
            Ev::JobResume { epoch } => (10, *epoch, 0),
            Ev::Frame { to, link, frame, corrupt, .. } => {
                (13, (*to as u64) << 32 | *link as u64, frame.wire_len() as u64 | u64::from(*corrupt) << 63)
            }
            Ev::EndpointTimer { rank, .. } => (14, *rank as u64, 0),
            Ev::CoordTick { coordinator, incarnation } => (15, *coordinator as u64, *incarnation),
            Ev::ToCoordinator { to, from, bytes } => {
                let from = match from {
                    Sender::Coordinator(c) => *c as u64,
                    Sender::Client(id) => *id,
                };
                (16, *to as u64, from ^ (bytes.len() as u64) << 48)
            }
            Ev::ToRank { slot, incarnation, bytes } => (17, *slot as u64, *incarnation ^ (bytes.len() as u64) << 32),
            Ev::ClientRetry { slot, attempt, .. } => (18, *slot as u64, *attempt),
            Ev::AdmissionWait { slot, incarnation } => (19, *slot as u64, *incarnation),
        }
    }
}

struct Entry {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> Ordering {
        // A max-heap: the earliest (time, sequence) first.
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// A message in a pair's stream.
struct Msg {
    bytes: Bytes,
    phantom: usize,
    channel: u8,
}

/// The ordered stream from one rank to another: one message on the wire at a time, in order,
/// delivered in order (as the transport's session does).
#[derive(Default)]
struct Pair {
    queue: VecDeque<Msg>,
    active: Option<(FlowId, u64)>,
    last_delivery: u64,
    /// Extra delay for the message on the wire (frames stuck on a path that died).
    penalty: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Idle,
    Computing,
    InCall {
        op_seq: u64,
    },
    Finished,
    /// Membership: waiting at a step boundary (or the admission barrier).
    Boundary,
    /// Membership: a restarted process waiting to be admitted into an epoch.
    Joining,
    /// Membership: admitted, fetching the training state from the members.
    Recovering,
}

struct RankSim {
    alive: bool,
    /// The group of all ranks; `semisync`: the DCs' leaders (index: the DC), on leaders only.
    group: Option<Group>,
    /// `semisync`: the group of the rank's data centre (index: its place there).
    dc_group: Option<Group>,
    /// `semisync` with membership: the group of all members (the boundary's agreement).
    all_group: Option<Group>,
    /// The group of the running call (0: `group`, 1: `dc_group`).
    call_channel: u8,
    /// `semisync`: the rank's real semi-sync protocol (which collectives, in which order).
    plan: Option<CrossDcPlan>,
    /// `semisync`: the running call, and how it ended (for the plan).
    sync_call: Option<SyncCall>,
    sync_result: Option<RoundResult>,
    /// `semisync`: per fragment, a late outer gradient (real payloads) to fold into the next.
    outer_carry: Vec<Option<Vec<u8>>>,
    /// Membership: a restarted process's admission (the real `AdmissionPlan`) while it runs.
    admission: Option<phalanx_runtime::membership::AdmissionPlan>,
    /// Membership: the rank's step-boundary protocol (the real `BoundaryPlan`) while it runs.
    boundary: Option<phalanx_runtime::membership::BoundaryPlan>,
    /// Membership: the boundary's (or admission's) collective running on the rank.
    member_call: Option<membership::MemberCall>,
    /// Membership: the rank's plan asked to rebuild for this epoch and waits for its groups.
    awaiting_epoch: Option<u64>,
    /// `semisync`, on a DC's leader: its last realignment (call key) and the heal flags it
    /// carried, as they were when it started.
    realign_sent: Option<semisync::RealignSent>,
    stage: Stage,
    /// Steps this rank has finished (with any outcome) in this epoch's run.
    step: u64,
    /// Contributions (units) riding in the running call, and its compute time.
    call_units: u64,
    call_compute_ns: u64,
    call_started: u64,
    /// Per group (0: all ranks, 1: the data centre's): a late contribution to fold into the
    /// group's next call, and the units riding in it.
    carry: [Option<Vec<u8>>; 2],
    carry_units: [u64; 2],
    slowdown: f64,
    timer_at: Option<u64>,
    /// The process's incarnation (a restart makes a new one).
    incarnation: u64,
    /// The step whose boundary this rank has passed.
    boundary_done: Option<u64>,
    /// With a per-rank processing rate: when the rank is done with what arrived so far.
    busy_until: u64,
    /// With `rank_work`: arrived messages waiting to be processed, and the one in progress.
    proc_queue: VecDeque<(u32, Bytes, usize, u8)>,
    proc_active: Option<FlowId>,
}

impl RankSim {
    /// The group of `channel` (0: `group`, 1: `dc_group`, 2: `all_group`).
    fn group_of(&mut self, channel: u8) -> Option<&mut Group> {
        match channel {
            1 => self.dc_group.as_mut(),
            2 => self.all_group.as_mut(),
            _ => self.group.as_mut(),
        }
    }

    /// Whether the rank is in any group.
    fn grouped(&self) -> bool {
        self.group.is_some() || self.dc_group.is_some() || self.all_group.is_some()
    }

    /// Leaves every group (a dead or restarted process).
    fn drop_groups(&mut self) {
        (self.group, self.dc_group, self.all_group) = (None, None, None);
    }

    /// Contribution units riding in late contributions, all groups (`semisync`: the outer
    /// gradients the plan's ledger holds pending).
    fn carried(&self) -> u64 {
        self.carry_units.iter().sum::<u64>() + self.plan.as_ref().map_or(0, |p| p.outer().ledger().pending)
    }
}

#[derive(Default)]
struct OpRecord {
    started: u64,
    completed: bool,
    failed: bool,
    wrong: bool,
    /// Per rank: what it offered (real payloads) and how many units.
    offered: BTreeMap<usize, (Option<Vec<u8>>, u64)>,
    /// Ranks that started it and have not finished it.
    open: usize,
    /// The reference result for a participant set, computed once.
    expected: Option<(Vec<usize>, Option<Vec<u8>>)>,
    /// Useful rank-time its applied contributions carried, and how much of it by its commit.
    useful: f64,
    useful_at_commit: f64,
    /// A broadcast's root (rank): the result every receiver must hold is what it offered.
    root: Option<usize>,
}

/// Runs `scenario` with `seed`.
pub fn run(scenario: &Scenario, seed: u64, options: &RunOptions) -> RunOutput {
    let mut sim = Sim::new(scenario, seed, options);
    sim.run();
    sim.finish()
}

/// One collective with given inputs, for comparing drivers.
struct Given {
    op: Op,
    dtype: DType,
    options: CallOptions,
    inputs: Vec<Option<Vec<u8>>>,
    results: Vec<Option<Finished>>,
}

/// Runs one collective `op` on the simulated network of `topology`, rank `r` contributing
/// `inputs[r]` (whole elements of `dtype`), with no faults: every rank's result (`None` if it
/// did not finish) and the simulated time in seconds. The same `Group` code the tokio
/// `Communicator` drives runs here, so results are bit-identical to a real run's.
pub fn run_collective(
    topology: &crate::scenario::TopologySpec,
    op: Op,
    dtype: DType,
    inputs: Vec<Vec<u8>>,
    options: CallOptions,
) -> (Vec<Option<Finished>>, f64) {
    use crate::scenario::{ByteSize, TransportSpec, WorkloadKind, WorkloadSpec};
    assert_eq!(inputs.len(), topology.ranks(), "one input per rank");
    let scenario = Scenario {
        name: "run_collective".into(),
        description: String::new(),
        seed: 1,
        duration_s: 3600.0,
        topology: topology.clone(),
        transport: TransportSpec::default(),
        workload: WorkloadSpec {
            kind: WorkloadKind::CollectiveLoop,
            op: OpKind::Allreduce,
            bytes: ByteSize(inputs.first().map_or(0, |b| b.len() as u64)),
            steps: 1,
            payload: PayloadKind::Real,
            algorithm: AlgorithmKind::Auto,
            policy: PolicyKind::Abort,
            quorum_min: None,
            quorum_wait_ms: 0.0,
            deadline_ms: 3_600_000.0,
            segment_bytes: None,
            verify: false,
            compute: None,
            on_failure: OnFailure::Continue,
            checkpoint_every: 1,
            restart_s: 0.0,
            fast_forward: false,
            outer_every: None,
            outer_bytes: None,
            outer_fragments: None,
            heal_every: None,
            catch_up_wait_ms: None,
        },
        faults: Vec::new(),
        membership: None,
    };
    let options_run = RunOptions::default();
    let world = inputs.len();
    let mut sim = Sim::new(&scenario, 1, &options_run);
    sim.given = Some(Given {
        op,
        dtype,
        options,
        inputs: inputs.into_iter().map(Some).collect(),
        results: (0..world).map(|_| None).collect(),
    });
    sim.run();
    let t = sim.now as f64 / SEC;
    (sim.given.take().map(|g| g.results).unwrap_or_default(), t)
}

struct Sim<'a> {
    sc: &'a Scenario,
    seed: u64,
    now: u64,
    seq: u64,
    heap: BinaryHeap<Entry>,
    fabric: Fabric,
    ranks: Vec<RankSim>,
    pairs: BTreeMap<(u32, u32), Pair>,
    /// What each flow carries.
    flow_owner: Vec<FlowOwner>,
    rng_compute: ChaCha8Rng,
    rng_net: ChaCha8Rng,
    hasher: Sha256,
    hash_buf: Vec<u8>,
    events: u64,
    epoch: u64,
    world: usize,
    steps_target: u64,
    /// Net progress of the job (committed steps since the start, rolled back on restarts).
    progress: u64,
    checkpoint: u64,
    restarting: bool,
    /// Per `(epoch, op_seq)`.
    ops: BTreeMap<(u64, u64), OpRecord>,
    faults: Vec<Planned>,
    fault_counts: BTreeMap<&'static str, u64>,
    fault_marks: Vec<(String, f64)>,
    /// Fault times still waiting for the next completed step.
    open_faults: Vec<u64>,
    recoveries: Vec<f64>,
    /// Per host pair `a * hosts + b` (`a < b`): since when it has had no route (`u64::MAX`:
    /// it has one).
    cut_since: Vec<u64>,
    // Accounting.
    coll: Collectives,
    contrib: Contributions,
    net: NetworkStats,
    useful_ns: f64,
    /// Useful rank-time since the last checkpoint (lost on a restart).
    useful_since_checkpoint: f64,
    steps: Vec<StepPoint>,
    trace: Option<Trace>,
    started: Instant,
    options: &'a RunOptions,
    last_progress: Instant,
    /// Set by [`run_collective`]: one given collective instead of the workload.
    given: Option<Given>,
    // Fast-forward (`workload.fast_forward`).
    /// Live ranks, and those of them computing.
    alive_count: usize,
    computing: usize,
    /// Every live rank is computing: try to skip ahead once the current instant is handled.
    quiet: bool,
    /// Start and end times of every planned fault, ascending.
    fault_times: Vec<u64>,
    /// The last two steps committed: time, participants, network messages and bytes by then.
    commits: [Option<Commit>; 2],
    /// Useful rank-time of the last collective all of whose ranks are done with it: by its
    /// commit (the checkpoint a commit may take includes only that), and in all.
    last_step_useful: (f64, f64),
    fast_forwarded: u64,
    /// Frame level (`transport.frames`): the endpoints and links.
    frames: Option<Frames>,
    stats_frames: FrameStats,
    /// Elastic membership (`[membership]`).
    membership: Option<Membership>,
    /// `semisync`: what the protocol ran.
    sync_report: SemisyncReport,
    /// `semisync`: who is in the groups (empty otherwise).
    layout: layout::Layout,
}

/// A committed step, as fast-forward measures the period.
#[derive(Clone, Copy, Debug)]
struct Commit {
    at: u64,
    participants: usize,
    step_s: f64,
    messages: u64,
    bytes: u64,
    /// Counters by then (`semisync` fast-forwards by their growth per outer round).
    offered: u64,
    applied: u64,
    completed: u64,
    useful: f64,
    /// `semisync`: the protocol's counts by then.
    sync: SemisyncReport,
}

/// What a flow carries.
#[derive(Clone, Copy, Debug)]
enum FlowOwner {
    /// The head message of the stream `(from, to)`.
    Pair((u32, u32)),
    /// The processing of the head of this rank's queue of arrived messages.
    Processing(u32),
    /// The head frame of a link's direction (frame level).
    Link(u32, u8),
    /// Part of the training state a joining rank recovers (membership).
    Recovery(u32),
}

/// One fault injection, resolved.
#[derive(Clone, Debug)]
struct Planned {
    kind: FaultKind,
    at: u64,
    duration: Option<u64>,
    target: FaultTarget,
    /// Index of its spec in the scenario.
    spec: usize,
}

/// A fault's resolved target.
#[derive(Clone, Debug)]
enum FaultTarget {
    Rank(usize),
    Ranks(Vec<usize>),
    Nic(usize, usize),
    Link(Result<usize, (usize, usize)>),
    Sides(Vec<u32>),
    /// A coordinator (`None`: the leader when it strikes).
    Coordinator(Option<usize>),
}

/// A call's key across the groups of a run: the group's sequence number, tagged with the
/// group (`channel` 1: data centre `dc`'s group).
fn op_key(channel: u8, dc: usize, op_seq: u64) -> u64 {
    if channel == 0 {
        op_seq
    } else {
        op_seq | 1 << 63 | (dc as u64) << 40
    }
}

fn stream(seed: u64, purpose: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(purpose);
    r
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// An exponential draw with mean `mean`.
fn exponential(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    -(1.0 - rng.random::<f64>()).ln() * mean
}

impl<'a> Sim<'a> {
    fn new(sc: &'a Scenario, seed: u64, options: &'a RunOptions) -> Sim<'a> {
        let t = &sc.topology;
        let world = t.ranks();
        let fabric = Fabric::new(t);
        let hosts = fabric.hosts();
        let ranks = (0..world)
            .map(|_| RankSim {
                alive: true,
                group: None,
                dc_group: None,
                all_group: None,
                call_channel: 0,
                plan: None,
                sync_call: None,
                sync_result: None,
                outer_carry: Vec::new(),
                realign_sent: None,
                admission: None,
                boundary: None,
                member_call: None,
                awaiting_epoch: None,
                stage: Stage::Idle,
                step: 0,
                call_units: 0,
                call_compute_ns: 0,
                call_started: 0,
                carry: [None, None],
                carry_units: [0, 0],
                slowdown: 1.0,
                timer_at: None,
                incarnation: 1,
                boundary_done: None,
                busy_until: 0,
                proc_queue: VecDeque::new(),
                proc_active: None,
            })
            .collect();
        let mut sim = Sim {
            sc,
            seed,
            now: 0,
            seq: 0,
            heap: BinaryHeap::new(),
            fabric,
            ranks,
            pairs: BTreeMap::new(),
            flow_owner: Vec::new(),
            rng_compute: stream(seed, 1),
            rng_net: stream(seed, 2),
            hasher: Sha256::new(),
            hash_buf: Vec::with_capacity(1 << 16),
            events: 0,
            epoch: 0,
            world,
            steps_target: sc.workload.steps,
            progress: 0,
            checkpoint: 0,
            restarting: false,
            ops: BTreeMap::new(),
            faults: Vec::new(),
            fault_counts: BTreeMap::new(),
            fault_marks: Vec::new(),
            open_faults: Vec::new(),
            recoveries: Vec::new(),
            cut_since: vec![u64::MAX; hosts * hosts],
            coll: Collectives::default(),
            contrib: Contributions::default(),
            net: NetworkStats::default(),
            useful_ns: 0.0,
            useful_since_checkpoint: 0.0,
            steps: Vec::new(),
            trace: options.trace.then(|| Trace::new(world)),
            started: Instant::now(),
            options,
            last_progress: Instant::now(),
            given: None,
            alive_count: world,
            computing: 0,
            quiet: false,
            fault_times: Vec::new(),
            commits: [None; 2],
            last_step_useful: (0.0, 0.0),
            fast_forwarded: 0,
            frames: None,
            stats_frames: FrameStats::default(),
            membership: None,
            sync_report: SemisyncReport::default(),
            layout: layout::Layout::default(),
        };
        if sc.transport.frames {
            let config = frames::transport_config(&sc.transport);
            sim.frames = Some(Frames::new(world, t.ranks_per_host, t.nics_per_host, &config));
            sim.fabric.set_frame_level();
        }
        if let Some(m) = &sc.membership {
            sim.membership_start(m);
        }
        sim.plan_faults();
        sim
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Entry { at, seq: self.seq, ev });
    }

    fn record_hash(&mut self, ev: &Ev) {
        let (k, a, b) = ev.code();
        self.hash_buf.extend_from_slice(&self.now.to_le_bytes());
        self.hash_buf.push(k);
        self.hash_buf.extend_from_slice(&a.to_le_bytes());
        self.hash_buf.extend_from_slice(&b.to_le_bytes());
        if self.hash_buf.len() >= 1 << 16 {
            self.hasher.update(&self.hash_buf);
            self.hash_buf.clear();
        }
    }

    // ---- faults ----

    /// Resolves every fault spec into concrete injections (random ones drawn now, from their
    /// own stream, so the workload's draws do not shift them).
    fn plan_faults(&mut self) {
        let sc = self.sc;
        let t = &sc.topology;
        let end = (sc.duration_s * SEC) as u64;
        let mut rng = stream(self.seed, 3);
        let mut planned: Vec<Planned> = Vec::new();
        for (spec, f) in sc.faults.iter().enumerate() {
            let duration = f.duration_s.map(|d| (d * SEC) as u64);
            // Components a random fault picks from.
            let target = |rng: &mut ChaCha8Rng| -> FaultTarget {
                match f.kind {
                    FaultKind::Crash => FaultTarget::Rank(f.rank.unwrap_or_else(|| rng.random_range(0..t.ranks()))),
                    FaultKind::CoordinatorCrash => FaultTarget::Coordinator(match (f.coordinator, f.mtbf_s) {
                        (Some(c), _) => Some(c),
                        (None, Some(_)) => {
                            Some(rng.random_range(0..sc.membership.as_ref().map_or(1, |m| m.coordinators)))
                        }
                        (None, None) => None,
                    }),
                    FaultKind::NicDown => FaultTarget::Nic(
                        f.host.unwrap_or_else(|| rng.random_range(0..t.hosts())),
                        f.nic
                            .unwrap_or_else(|| if f.host.is_some() { 0 } else { rng.random_range(0..t.nics_per_host) }),
                    ),
                    FaultKind::LinkDown | FaultKind::Loss | FaultKind::LatencySpike | FaultKind::Corruption => {
                        match (&f.dcs, f.host) {
                            (Some(d), _) => FaultTarget::Link(Err((d[0], d[1]))),
                            (None, Some(h)) => FaultTarget::Link(Ok(h)),
                            (None, None) if f.kind == FaultKind::LinkDown || t.dcs > 1 && rng.random_bool(0.5) => {
                                let a = rng.random_range(0..t.dcs);
                                let b = (a + 1 + rng.random_range(0..t.dcs - 1)) % t.dcs;
                                FaultTarget::Link(Err((a, b)))
                            }
                            (None, None) => FaultTarget::Link(Ok(rng.random_range(0..t.hosts()))),
                        }
                    }
                    FaultKind::Partition => FaultTarget::Sides(match (&f.sides, &f.hosts) {
                        (Some(s), _) => self.fabric.sides_by_dc(s),
                        (None, Some(h)) => (0..t.hosts()).map(|x| u32::from(h.contains(&x))).collect(),
                        (None, None) => vec![0; t.hosts()],
                    }),
                    FaultKind::Straggler => FaultTarget::Ranks(match (&f.ranks, f.fraction) {
                        (Some(r), _) => r.clone(),
                        (None, Some(frac)) => {
                            let n = ((t.ranks() as f64) * frac).round() as usize;
                            let mut all: Vec<usize> = (0..t.ranks()).collect();
                            for i in 0..n.min(all.len()) {
                                let j = rng.random_range(i..all.len());
                                all.swap(i, j);
                            }
                            let mut v = all[..n.min(t.ranks())].to_vec();
                            v.sort_unstable();
                            v
                        }
                        (None, None) => Vec::new(),
                    }),
                }
            };
            match (f.at_s, f.mtbf_s) {
                (Some(at), _) => {
                    let target = target(&mut rng);
                    planned.push(Planned { kind: f.kind, at: (at * SEC) as u64, duration, target, spec });
                }
                (None, Some(mtbf)) => {
                    // Components failing independently: the fleet fails `components / mtbf`
                    // times per second.
                    let components = match f.kind {
                        FaultKind::Crash | FaultKind::Straggler => t.ranks(),
                        FaultKind::CoordinatorCrash => sc.membership.as_ref().map_or(1, |m| m.coordinators),
                        FaultKind::NicDown => t.hosts() * t.nics_per_host,
                        FaultKind::LinkDown => (t.dcs * (t.dcs - 1) / 2).max(1),
                        _ => t.hosts() + t.dcs * (t.dcs - 1) / 2,
                    } as f64;
                    let mut at = 0.0;
                    loop {
                        at += exponential(&mut rng, mtbf / components);
                        if at * SEC >= end as f64 {
                            break;
                        }
                        let target = target(&mut rng);
                        planned.push(Planned { kind: f.kind, at: (at * SEC) as u64, duration, target, spec });
                    }
                }
                (None, None) => {
                    let target = target(&mut rng);
                    planned.push(Planned { kind: f.kind, at: 0, duration, target, spec });
                }
            }
        }
        for (i, p) in planned.iter().enumerate() {
            self.push(p.at, Ev::FaultStart(i));
            self.fault_times.push(p.at);
            // A crash ends only in a restart (membership); the others after their duration.
            let end = match p.kind {
                FaultKind::Crash => sc.faults[p.spec].restart_after_s.map(|r| (r * SEC) as u64),
                _ => p.duration,
            };
            if let Some(d) = end {
                self.push(p.at + d, Ev::FaultEnd(i));
                self.fault_times.push(p.at + d);
            }
        }
        self.fault_times.sort_unstable();
        self.faults = planned;
    }

    fn fault(&mut self, i: usize, start: bool) {
        let Planned { kind, target, spec, .. } = self.faults[i].clone();
        let spec = &self.sc.faults[spec];
        if start {
            *self.fault_counts.entry(kind.name()).or_default() += 1;
            self.fault_marks.push((kind.name().to_string(), self.now as f64 / SEC));
            if kind != FaultKind::Straggler {
                self.open_faults.push(self.now);
            }
        }
        if let Some(tr) = self.trace.as_mut() {
            tr.fault(kind.name(), self.now, start);
        }
        tracing::debug!(fault = kind.name(), start, now = self.now, "fault");
        let sign = if start { 1.0 } else { -1.0 };
        match (kind, target) {
            (FaultKind::Crash, FaultTarget::Rank(r)) => {
                if start {
                    self.crash(r);
                } else {
                    self.restart_rank(r);
                }
            }
            (FaultKind::CoordinatorCrash, FaultTarget::Coordinator(which)) => {
                if start {
                    if let Some(c) = self.coordinator_crash(which) {
                        if let Some(m) = self.membership.as_mut() {
                            m.crashed_by_fault.push((i, c));
                        }
                    }
                } else {
                    let c = self.membership.as_ref().and_then(|m| m.crashed_by_fault.iter().find(|(f, _)| *f == i));
                    if let Some((_, c)) = c.copied() {
                        self.coordinator_restart(c);
                    }
                }
            }
            (FaultKind::Straggler, FaultTarget::Ranks(rs)) => {
                let s = spec.slowdown.unwrap_or(1.0);
                for r in rs {
                    if r < self.world {
                        if start {
                            self.ranks[r].slowdown *= s;
                        } else {
                            self.ranks[r].slowdown /= s;
                        }
                    }
                }
            }
            (FaultKind::NicDown, FaultTarget::Nic(h, n)) => {
                self.fabric.set_nic(h, n, !start);
                if start {
                    self.penalise_host(h);
                }
                self.topology_changed();
            }
            (FaultKind::LinkDown, FaultTarget::Link(Err((a, b)))) => {
                self.fabric.set_wan(a, b, !start);
                self.topology_changed();
            }
            (FaultKind::Partition, FaultTarget::Sides(sides)) => {
                if start {
                    self.fabric.partition(i as u64, sides);
                } else {
                    self.fabric.heal(i as u64);
                }
                self.topology_changed();
            }
            (FaultKind::Loss | FaultKind::LatencySpike | FaultKind::Corruption, FaultTarget::Link(link)) => {
                let f = spec.rate.or(spec.extra_ms).unwrap_or(0.0);
                self.fabric.update_link(link, |loss, extra, corruption| match kind {
                    FaultKind::Loss => *loss = (*loss + sign * f).clamp(0.0, 0.99),
                    FaultKind::Corruption => *corruption = (*corruption + sign * f).clamp(0.0, 1.0),
                    _ => {
                        let e = (f * MS) as u64;
                        *extra = if start { *extra + e } else { extra.saturating_sub(e) };
                    }
                });
                self.topology_changed();
            }
            (kind, target) => tracing::warn!(?kind, ?target, "fault target does not fit its kind"),
        }
    }

    fn crash(&mut self, r: usize) {
        if !self.ranks[r].alive {
            return;
        }
        let rk = &mut self.ranks[r];
        rk.alive = false;
        self.alive_count -= 1;
        if rk.stage == Stage::Computing {
            self.computing -= 1;
        }
        let open = match rk.stage {
            Stage::InCall { op_seq } => Some(op_seq),
            _ => None,
        };
        if open.is_some() {
            // A dead process returns nothing: its contribution dies with it (counted apart
            // from `lost`, which is what a live rank never got back).
            self.contrib.died_with_rank += rk.call_units;
        }
        self.contrib.died_with_rank += rk.carried();
        rk.carry_units = [0, 0];
        rk.carry = [None, None];
        rk.drop_groups();
        rk.stage = Stage::Finished;
        rk.proc_queue.clear();
        if let Some(flow) = rk.proc_active.take() {
            self.fabric.share.remove(self.now, flow);
        }
        if let Some(op_seq) = open {
            self.op_closed((self.epoch, op_seq));
            if let Some(tr) = self.trace.as_mut() {
                tr.end(r, self.now, "crashed");
            }
        }
        self.membership_crashed(r);
        if self.frames.is_some() {
            // Its peers' endpoints notice the silence and report it unreachable themselves.
            return self.frames_crash(r);
        }
        // Its streams stop; bytes in flight to or from it are gone.
        let keys: Vec<(u32, u32)> =
            self.pairs.keys().copied().filter(|(a, b)| *a as usize == r || *b as usize == r).collect();
        for k in keys {
            if let Some(p) = self.pairs.remove(&k) {
                if let Some((flow, _)) = p.active {
                    self.fabric.share.remove(self.now, flow);
                }
            }
        }
        let after = (self.sc.transport.unreachable_after_ms * MS) as u64;
        let epoch = self.epoch;
        self.push(self.now + after, Ev::LostNotice { lost: r as u32, epoch });
    }

    /// Messages on the wire through `host` wait for the link timeout (their frames were on
    /// the path that died).
    fn penalise_host(&mut self, host: usize) {
        let timeout = (self.sc.transport.link_timeout_ms * MS) as u64;
        let fabric = &self.fabric;
        for ((a, b), p) in self.pairs.iter_mut() {
            let (ha, hb) = (fabric.host_of(*a as usize), fabric.host_of(*b as usize));
            if p.active.is_some() && (ha == host || hb == host) && ha != hb {
                p.penalty += timeout;
            }
        }
    }

    /// Links changed: re-route every stream, and watch host pairs that lost their route.
    fn topology_changed(&mut self) {
        if self.frames.is_some() {
            // The endpoints find out for themselves.
            return self.frames_topology_changed();
        }
        let keys: Vec<(u32, u32)> = self.pairs.keys().copied().collect();
        for k in keys {
            let (ha, hb) = (self.fabric.host_of(k.0 as usize), self.fabric.host_of(k.1 as usize));
            let route = self.fabric.route(ha, hb);
            let Some(p) = self.pairs.get_mut(&k) else { continue };
            match (p.active, route) {
                (Some((flow, _)), Some(r)) => self.fabric.share.reroute(self.now, flow, r.resources),
                (Some((flow, _)), None) => {
                    // Nothing carries it now: the message waits at the head of its stream for
                    // a route and is then sent again whole (what was in flight is lost).
                    self.fabric.share.remove(self.now, flow);
                    p.active = None;
                }
                (None, Some(_)) if !p.queue.is_empty() => self.start_flow(k),
                _ => {}
            }
        }
        let hosts = self.fabric.hosts();
        let after = (self.sc.transport.unreachable_after_ms * MS) as u64;
        for a in 0..hosts {
            for b in a + 1..hosts {
                let ok = self.fabric.route(a, b).is_some() && self.fabric.route(b, a).is_some();
                let cut = &mut self.cut_since[a * hosts + b];
                if ok {
                    *cut = u64::MAX;
                } else if *cut == u64::MAX {
                    *cut = self.now;
                    self.push(self.now + after, Ev::HostsCut { a: a as u32, b: b as u32, since: self.now });
                }
            }
        }
    }

    // ---- network ----

    fn send(&mut self, from: usize, to: usize, bytes: Bytes, phantom: usize, channel: u8) {
        if self.frames.is_some() {
            self.net.messages += 1;
            return self.frames_send(from, to, bytes);
        }
        let key = (from as u32, to as u32);
        let p = self.pairs.entry(key).or_default();
        p.queue.push_back(Msg { bytes, phantom, channel });
        if p.active.is_none() && p.queue.len() == 1 {
            self.start_flow(key);
        }
    }

    fn start_flow(&mut self, key: (u32, u32)) {
        let (ha, hb) = (self.fabric.host_of(key.0 as usize), self.fabric.host_of(key.1 as usize));
        let Some(route) = self.fabric.route(ha, hb) else { return };
        let chunk = self.sc.transport.chunk_bytes.0.max(1);
        let Some(p) = self.pairs.get_mut(&key) else { return };
        let Some(m) = p.queue.front() else { return };
        let len = (m.bytes.len() + m.phantom) as u64;
        let frames = len.div_ceil(chunk).max(1);
        let mut wire = len + frames * FRAME_OVERHEAD;
        if route.corruption > 0.0 {
            // Each corrupted frame is caught by its checksum and sent again.
            let mut bad = 0u64;
            for _ in 0..frames.min(1 << 16) {
                if self.rng_net.random_bool(route.corruption.min(1.0)) {
                    bad += 1;
                }
            }
            self.net.corrupted_frames += bad;
            self.net.retransmitted_bytes += bad * chunk.min(len.max(1));
            wire += bad * (chunk.min(len.max(1)) + FRAME_OVERHEAD);
        }
        if route.relayed {
            self.net.relayed_messages += 1;
        }
        self.net.messages += 1;
        self.net.bytes += wire;
        let flow = self.fabric.share.start(self.now, route.resources, wire as f64);
        self.set_owner(flow, FlowOwner::Pair(key));
        let p = self.pairs.get_mut(&key).expect("just used");
        p.active = Some((flow, route.latency_ns));
    }

    fn set_owner(&mut self, flow: FlowId, owner: FlowOwner) {
        if self.flow_owner.len() <= flow {
            self.flow_owner.resize(flow + 1, FlowOwner::Pair((0, 0)));
        }
        self.flow_owner[flow] = owner;
    }

    /// Rank `r` starts processing the first message of its queue: a flow over its host's
    /// internal link, competing with the transfers there (`rank_work`).
    fn start_processing(&mut self, r: usize) {
        let Some(work) = self.sc.topology.rank_work else { return };
        let Some((_, bytes, phantom, _)) = self.ranks[r].proc_queue.front() else { return };
        let len = (bytes.len() + phantom) as f64 * work;
        let bus = self.fabric.host_bus(self.fabric.host_of(r));
        let flow = self.fabric.share.start(self.now, vec![bus], len);
        self.set_owner(flow, FlowOwner::Processing(r as u32));
        self.ranks[r].proc_active = Some(flow);
    }

    fn flow_done(&mut self, flow: FlowId, version: u64) -> bool {
        if self.fabric.share.version(flow) != Some(version) {
            return false;
        }
        self.fabric.share.remove(self.now, flow);
        let key = match self.flow_owner[flow] {
            FlowOwner::Pair(key) => key,
            FlowOwner::Link(link, dir) => {
                self.frame_sent((link, dir));
                return true;
            }
            FlowOwner::Recovery(j) => {
                self.recovery_flow_done(j as usize);
                return true;
            }
            FlowOwner::Processing(r) => {
                let r = r as usize;
                self.ranks[r].proc_active = None;
                if let Some((from, bytes, phantom, channel)) = self.ranks[r].proc_queue.pop_front() {
                    self.receive(from as usize, r, bytes, phantom, channel);
                }
                self.start_processing(r);
                return true;
            }
        };
        let Some(p) = self.pairs.get_mut(&key) else { return true };
        let Some((_, latency)) = p.active.take() else { return true };
        let Some(m) = p.queue.pop_front() else { return true };
        let at = (self.now + latency + std::mem::take(&mut p.penalty)).max(p.last_delivery);
        p.last_delivery = at;
        let more = !p.queue.is_empty();
        let epoch = self.epoch;
        let (bytes, phantom, channel) = (m.bytes, m.phantom, m.channel);
        self.push(at, Ev::Deliver { from: key.0, to: key.1, epoch, bytes, phantom, channel });
        if more {
            self.start_flow(key);
        }
        true
    }

    fn settle_network(&mut self) {
        for f in self.fabric.share.settle(self.now) {
            if let Some(at) = f.at {
                self.push(at, Ev::FlowDone { flow: f.flow, version: f.version });
            }
        }
    }

    // ---- ranks and the workload ----

    fn algorithm(&self) -> AllReduceAlgorithm {
        match self.sc.workload.algorithm {
            AlgorithmKind::Auto => AllReduceAlgorithm::Auto,
            AlgorithmKind::Ring => AllReduceAlgorithm::Ring,
            AlgorithmKind::RecursiveDoubling => AllReduceAlgorithm::RecursiveDoubling,
            AlgorithmKind::HalvingDoubling => AllReduceAlgorithm::HalvingDoubling,
            AlgorithmKind::Hierarchical => AllReduceAlgorithm::Hierarchical,
        }
    }

    fn call_options(&self) -> CallOptions {
        let w = &self.sc.workload;
        let policy = match w.policy {
            PolicyKind::Abort => FaultPolicy::Abort,
            PolicyKind::Shrink => FaultPolicy::Shrink,
            PolicyKind::Quorum => FaultPolicy::Quorum {
                min: w.quorum_min.unwrap_or(self.world.div_ceil(2)),
                wait: Duration::from_nanos((w.quorum_wait_ms * MS) as u64),
            },
        };
        CallOptions { policy, verify: w.verify }
    }

    /// A fresh group of `world` with this rank at `index`, stamped with the run's epoch.
    fn new_group(&self, index: usize, world: usize, topology: Option<Topology>) -> Group {
        let mut g = Group::new(index, world);
        if let Some(t) = topology {
            g.set_topology(t);
        }
        g.set_epoch(self.epoch);
        if let Some(seg) = self.sc.workload.segment_bytes {
            g.set_segment_bytes(seg.0.min(usize::MAX as u64) as usize);
        }
        g
    }

    /// Fresh groups for every rank (start of the run, or a job restart with spares).
    fn form_groups(&mut self) {
        self.alive_count = self.world;
        self.computing = 0;
        let t = &self.sc.topology;
        let (dcs, per_dc) = (t.dcs, t.hosts_per_dc * t.ranks_per_host);
        let semisync = self.sc.workload.kind == WorkloadKind::Semisync;
        self.layout = layout::Layout::everyone(self.world, per_dc, semisync);
        let elastic = self.sc.membership.is_some();
        // One topology, shared by every rank's group (it is reference-counted).
        let topology = Topology::uniform(dcs, per_dc);
        for r in 0..self.world {
            // `semisync`: the group of all ranks is the DCs' leaders' (index 0 of each DC), and
            // with membership the boundary agrees over a third group of everyone.
            let g = match semisync {
                false => Some(self.new_group(r, self.world, Some(topology.clone()))),
                true => (r % per_dc == 0).then(|| self.new_group(r / per_dc, dcs, None)),
            };
            let dc_group = semisync.then(|| self.new_group(r % per_dc, per_dc, None));
            let all_group = (semisync && elastic).then(|| self.new_group(r, self.world, None));
            let plan = semisync.then(|| self.semisync_plan());
            let fragments = self.semisync_fragments();
            let rk = &mut self.ranks[r];
            rk.alive = true;
            rk.group = g;
            rk.dc_group = dc_group;
            rk.all_group = all_group;
            rk.call_channel = 0;
            rk.plan = plan;
            rk.sync_call = None;
            rk.outer_carry = vec![None; fragments];
            rk.stage = Stage::Idle;
            rk.step = self.progress;
            rk.carry = [None, None];
            rk.carry_units = [0, 0];
            rk.timer_at = None;
        }
    }

    /// Groups for the members of a new epoch (membership), `members` in the view's order:
    /// a rank's index is its place in that list (`semisync`: in its DC's, and the leaders').
    fn form_member_groups(&mut self, members: &[usize]) {
        let semisync = self.sc.workload.kind == WorkloadKind::Semisync;
        let per_dc = self.per_dc();
        self.layout = layout::Layout::of(members, self.world, per_dc, semisync);
        let topology = Topology::new(members.iter().map(|m| m / per_dc).collect());
        self.computing = 0;
        for r in 0..self.world {
            let rk = &mut self.ranks[r];
            rk.timer_at = None;
            rk.proc_queue.clear();
            if let Some(flow) = rk.proc_active.take() {
                self.fabric.share.remove(self.now, flow);
            }
            let index = self.layout.index(r, 0, r, per_dc).filter(|_| !semisync);
            let alive = rk.alive;
            if !alive || !members.contains(&r) {
                if rk.stage != Stage::Joining {
                    rk.drop_groups();
                }
                continue;
            }
            if let Some(i) = index {
                let g = self.new_group(i, members.len(), Some(topology.clone()));
                self.ranks[r].group = Some(g);
            }
        }
        if semisync {
            self.semisync_member_groups(members);
        }
    }

    fn begin_step(&mut self, r: usize) {
        let rk = &self.ranks[r];
        if !rk.alive || self.restarting {
            return;
        }
        if rk.step >= self.steps_target {
            self.ranks[r].stage = Stage::Finished;
            return;
        }
        let step = rk.step;
        if self.at_boundary(r, step) {
            return;
        }
        let compute = match self.sc.workload.compute {
            Some(c) if c.median_ms > 0.0 => {
                let z = if c.sigma > 0.0 { normal(&mut self.rng_compute) } else { 0.0 };
                ((c.median_ms * MS) * (c.sigma * z).exp() * self.ranks[r].slowdown).round() as u64
            }
            _ => 0,
        };
        let rk = &mut self.ranks[r];
        rk.call_compute_ns = compute;
        if compute == 0 {
            self.start_call(r);
        } else {
            rk.stage = Stage::Computing;
            let epoch = self.epoch;
            self.push(self.now + compute, Ev::ComputeDone { rank: r as u32, epoch });
            self.computing += 1;
            self.quiet = self.computing == self.alive_count && self.sc.workload.fast_forward;
        }
    }

    fn start_call(&mut self, r: usize) {
        if let Some(given) = self.given.as_mut() {
            let buf = given.inputs[r].take().unwrap_or_default();
            let (op, dtype, options) = (given.op, given.dtype, given.options);
            let g = self.ranks[r].group.as_mut().expect("a live rank has a group");
            let op_seq = g.start(self.now, op, dtype, buf, options);
            self.ranks[r].stage = Stage::InCall { op_seq };
            self.pump(r);
            return;
        }
        let w = &self.sc.workload;
        if w.kind == WorkloadKind::Semisync {
            return self.semisync_gradients(r);
        }
        let step = self.ranks[r].step;
        let options = self.call_options();
        let real = w.payload == PayloadKind::Real;
        // A late contribution rides in the next call.
        let channel = 0;
        let units = 1 + self.ranks[r].carry_units[channel as usize];
        self.contrib.offered += 1;
        let bytes = w.bytes.0 as usize;
        self.ranks[r].call_channel = channel;
        let (offered, op_seq) = match w.op {
            OpKind::Allreduce => {
                let op = Op::AllReduce { algorithm: self.algorithm(), op: ReduceOp::Sum };
                let buf = real.then(|| {
                    let mut buf = contribution(r, step, bytes);
                    if let Some(c) = self.ranks[r].carry[channel as usize].take() {
                        add_i64(&mut buf, &c);
                    }
                    buf
                });
                let rk = &mut self.ranks[r];
                let g = if channel == 1 { rk.dc_group.as_mut() } else { rk.group.as_mut() };
                let g = g.expect("a live rank has its groups");
                let op_seq = match &buf {
                    Some(b) => g.start(self.now, op, DType::I64, b.clone(), options),
                    None => g.start_phantom(self.now, op, DType::I64, bytes, options),
                };
                (buf, op_seq)
            }
            OpKind::Alltoall => {
                let share = (w.bytes.0 as usize / self.world.max(1)).max(1);
                let send: Vec<Bytes> =
                    (0..self.world).map(|d| Bytes::from(alltoall_share(r, d, step, share))).collect();
                let g = self.ranks[r].group.as_mut().expect("a live rank has a group");
                (None, g.start_all_to_all(self.now, send, options.policy))
            }
        };
        self.ranks[r].carry_units[channel as usize] = 0;
        self.call_started(r, channel, op_seq, (offered, units), None);
    }

    /// Rank `r` started its group's (`channel`'s) call `op_seq`, offering a buffer (real
    /// payloads) with a number of contributions riding (a broadcast: from rank `root`): the
    /// record, the trace, the deadline, and the first messages out.
    fn call_started(
        &mut self,
        r: usize,
        channel: u8,
        op_seq: u64,
        (offered, units): (Option<Vec<u8>>, u64),
        root: Option<usize>,
    ) {
        let epoch = self.epoch;
        let op_seq = op_key(channel, r / self.per_dc(), op_seq);
        let rk = &mut self.ranks[r];
        rk.call_channel = channel;
        rk.call_units = units;
        rk.call_started = self.now;
        rk.stage = Stage::InCall { op_seq };
        let rec =
            self.ops.entry((epoch, op_seq)).or_insert_with(|| OpRecord { started: self.now, ..OpRecord::default() });
        rec.offered.insert(r, (offered, units));
        rec.open += 1;
        rec.root = root;
        if let Some(tr) = self.trace.as_mut() {
            tr.begin(r, self.now, op_seq);
        }
        let deadline = self.now + (self.sc.workload.deadline_ms * MS) as u64;
        self.push(deadline, Ev::Deadline { rank: r as u32, epoch, op_seq });
        self.pump(r);
    }

    /// Drains rank `r`'s group: messages to the network, a finished call to the workload, and
    /// its next timeout to the heap.
    fn pump(&mut self, r: usize) {
        loop {
            let rk = &mut self.ranks[r];
            if !rk.grouped() {
                return;
            }
            let mut out = Vec::new();
            let (mut finished, mut timeout) = (None, None);
            for (channel, g) in [(0u8, rk.group.as_mut()), (1, rk.dc_group.as_mut()), (2, rk.all_group.as_mut())] {
                let Some(g) = g else { continue };
                while let Some((to, bytes, phantom)) = g.poll_send_sized() {
                    // One buffer per message here (a copy only for an all-to-all's two parts).
                    out.push((to, bytes.to_bytes(), phantom, channel));
                }
                if channel == rk.call_channel {
                    finished = g.finish();
                }
                timeout = match (timeout, g.poll_timeout()) {
                    (Some(a), Some(b)) => Some(std::cmp::min(a, b)),
                    (a, b) => a.or(b),
                };
            }
            for (to, bytes, phantom, channel) in out {
                let to = self.group_rank(r, channel, to);
                if to != r && to < self.world {
                    self.send(r, to, bytes, phantom, channel);
                }
            }
            if self.frames.is_some() {
                self.frames_drain(r);
            }
            if let Some(t) = timeout {
                let rk = &mut self.ranks[r];
                if rk.timer_at.is_none_or(|at| t < at || at < self.now) {
                    rk.timer_at = Some(t);
                    let epoch = self.epoch;
                    self.push(t.max(self.now), Ev::GroupTimer { rank: r as u32, epoch });
                }
            }
            match finished {
                Some(f) if self.ranks[r].member_call.is_some() => self.member_call_finished(r, f),
                Some(f) => self.call_finished(r, f),
                None => return,
            }
        }
    }

    fn call_finished(&mut self, r: usize, f: Finished) {
        let Stage::InCall { op_seq } = self.ranks[r].stage else { return };
        if let Some(given) = self.given.as_mut() {
            given.results[r] = Some(f);
            self.ranks[r].stage = Stage::Finished;
            return;
        }
        let key = (self.epoch, op_seq);
        let units = self.ranks[r].call_units;
        let took = self.now - self.ranks[r].call_started;
        let semisync = self.sc.workload.kind == WorkloadKind::Semisync;
        let channel = self.ranks[r].call_channel;
        let sync_call = self.ranks[r].sync_call.clone();
        // Useful rank-time of an applied contribution: its compute (or, without compute, the
        // call itself); `semisync`'s outer rounds, heals and realignments add none (the inner
        // steps' gradient rounds did).
        let compute = self.ranks[r].call_compute_ns;
        let useful = match (semisync, &sync_call) {
            (true, Some(c)) if *c != SyncCall::Gradients => 0.0,
            _ => (if compute > 0 { compute } else { took }) as f64,
        };

        let outcome: &'static str;
        match f {
            Finished::Buffer { data, participants } => {
                // A group's indices, as ranks (a DC's group: its members; the leaders': one a DC).
                let participants = match self.layout.maps(channel) {
                    true => {
                        let ranks = participants.iter().map(|p| self.group_rank(r, channel, *p)).collect();
                        if semisync {
                            // For the plan (only a semi-sync rank keeps it: a list per rank adds up).
                            self.ranks[r].sync_result = Some(RoundResult::Done { participants });
                        }
                        ranks
                    }
                    false => participants,
                };
                outcome = "done";
                self.contrib.applied += units;
                self.useful_since_checkpoint += useful;
                let rec = self.ops.get_mut(&key).expect("started");
                rec.useful += useful;
                if self.sc.workload.payload == PayloadKind::Real && !rec.wrong {
                    if rec.expected.as_ref().is_none_or(|(p, _)| *p != participants) {
                        // A broadcast's result is its root's buffer (the root's contribution at this
                        // step, whether or not its record is still here), an all-reduce's the sum.
                        let step = self.ranks[r].step;
                        let expected = match rec.root {
                            Some(root) => Some(contribution(root, step, data.len())),
                            None => sum_of(&rec.offered, &participants),
                        };
                        rec.expected = Some((participants.clone(), expected));
                    }
                    let ok = matches!(&rec.expected, Some((_, Some(e))) if *e == data);
                    if !ok {
                        rec.wrong = true;
                        self.coll.wrong_results += 1;
                        let head = |b: &[u8]| b.get(..8).map(|h| i64::from_le_bytes(h.try_into().unwrap_or([0; 8])));
                        let want = rec.expected.as_ref().and_then(|(_, e)| e.as_deref().map(head));
                        let offered: Vec<usize> = rec.offered.keys().copied().collect();
                        tracing::warn!(rank = r, op_seq, ?participants, ?offered, got = ?head(&data), ?want, len = data.len(), "wrong result");
                    }
                }
                if !rec.completed {
                    rec.completed = true;
                    rec.useful_at_commit = rec.useful;
                    self.coll.completed += 1;
                    let counts = &mut self.sync_report;
                    match &sync_call {
                        Some(SyncCall::Gradients) => counts.gradient_rounds += 1,
                        Some(SyncCall::Outer { .. }) => counts.outer_rounds += 1,
                        Some(SyncCall::Heal { .. }) => counts.heals += 1,
                        Some(SyncCall::Realign { .. }) => counts.realignments += 1,
                        None => {}
                    }
                    // `semisync` counts its progress by outer rounds (`outer_every / fragments`
                    // steps each), with the ranks of the DCs whose leaders took part.
                    match (semisync, &sync_call) {
                        (false, _) => self.step_committed(rec_started(&self.ops, key), participants.len(), 1),
                        (true, Some(SyncCall::Outer { .. })) => {
                            let per_dc = self.per_dc();
                            let dc_members = &self.layout.dc_members;
                            let ranks = participants
                                .iter()
                                .map(|l| dc_members[l / per_dc].iter().filter(|m| self.ranks[**m].alive).count())
                                .sum();
                            self.step_committed(rec_started(&self.ops, key), ranks, self.semisync_round_steps())
                        }
                        (true, _) => {}
                    }
                }
            }
            Finished::AllToAll(res) => {
                outcome = "done";
                self.contrib.applied += units;
                self.useful_since_checkpoint += useful;
                let step = self.ranks[r].step;
                let share = (self.sc.workload.bytes.0 as usize / self.world.max(1)).max(1);
                let wrong = res.received.iter().enumerate().any(|(s, got)| {
                    s != r && !res.lost.contains(&s) && got[..] != alltoall_share(s, r, step, share)[..]
                });
                let rec = self.ops.get_mut(&key).expect("started");
                if wrong && !rec.wrong {
                    rec.wrong = true;
                    self.coll.wrong_results += 1;
                }
                if !rec.completed {
                    rec.completed = true;
                    self.coll.completed += 1;
                    let n = self.world - res.lost.len();
                    self.step_committed(rec_started(&self.ops, key), n, 1);
                }
            }
            Finished::Late { contribution, participants } => {
                outcome = "late";
                self.contrib.late += 1;
                let real = self.sc.workload.payload == PayloadKind::Real;
                let rk = &mut self.ranks[r];
                if semisync {
                    rk.sync_result = Some(RoundResult::Late { participants });
                }
                match sync_call {
                    // A late gradient is stale by the next step: reported dropped (the plan's
                    // ledger too); a late outer gradient is carried (the ledger holds it pending).
                    Some(SyncCall::Gradients) => self.contrib.dropped_reported += units,
                    Some(SyncCall::Outer { fragment }) => {
                        self.sync_report.outer_late += 1;
                        if real {
                            rk.outer_carry[fragment] = Some(contribution);
                        }
                    }
                    Some(_) => {}
                    None => {
                        let ch = rk.call_channel as usize;
                        rk.carry_units[ch] += units;
                        if real {
                            rk.carry[ch] = Some(contribution);
                        }
                    }
                }
            }
            Finished::Failed(e) => {
                self.ranks[r].sync_result = Some(RoundResult::Failed);
                if sync_call.is_some() {
                    self.sync_report.failed_calls += 1;
                }
                outcome = "failed";
                tracing::debug!(rank = r, op_seq, error = %e, "collective failed");
                self.contrib.dropped_reported += units;
                let rec = self.ops.get_mut(&key).expect("started");
                rec.failed = true;
            }
        }
        if let (Some(SyncCall::Realign { .. }), "done") = (&sync_call, outcome) {
            self.semisync_realigned(r, key);
        }
        self.close_call(r, key, outcome);
    }

    /// Rank `r` is done with the call `key` (any outcome): the workload moves on.
    fn close_call(&mut self, r: usize, key: (u64, u64), outcome: &'static str) {
        if let Some(tr) = self.trace.as_mut() {
            tr.end(r, self.now, outcome);
        }
        self.op_closed(key);
        let rk = &mut self.ranks[r];
        rk.stage = Stage::Idle;
        if rk.plan.is_some() {
            let result = rk.sync_result.take().unwrap_or(RoundResult::Failed);
            return self.semisync_closed(r, result);
        }
        rk.step += 1;
        if outcome == "failed" && self.sc.workload.on_failure == OnFailure::Restart {
            self.restart_job();
            return;
        }
        self.begin_step(r);
    }

    /// One rank that started collective `key` is done with it (any outcome, or dead). When
    /// the last one is, its data is freed and a collective no rank completed counts as failed.
    fn op_closed(&mut self, key: (u64, u64)) {
        let Some(rec) = self.ops.get_mut(&key) else { return };
        rec.open = rec.open.saturating_sub(1);
        if rec.open == 0 {
            if !rec.completed && rec.failed {
                self.coll.failed += 1;
            }
            if rec.completed {
                self.last_step_useful = (rec.useful_at_commit, rec.useful);
            }
            self.ops.remove(&key);
        }
    }

    /// A step (collective) committed somewhere: progress, recovery times, the step series.
    fn step_committed(&mut self, started: u64, participants: usize, steps: u64) {
        let every = self.sc.workload.checkpoint_every;
        let before = self.progress / every;
        self.progress += steps;
        if self.progress / every > before {
            self.checkpoint = self.progress - self.progress % every;
            self.useful_ns += std::mem::take(&mut self.useful_since_checkpoint);
        }
        for t in self.open_faults.drain(..) {
            self.recoveries.push((self.now - t) as f64 / SEC);
        }
        let step_s = (self.now - started) as f64 / SEC;
        self.steps.push(StepPoint { t_s: self.now as f64 / SEC, step_s, participants });
        let (messages, bytes) = (self.net.messages, self.net.bytes);
        let (offered, applied, completed) = (self.contrib.offered, self.contrib.applied, self.coll.completed);
        let useful = self.useful_ns + self.useful_since_checkpoint;
        let sync = self.sync_report;
        let commit =
            Commit { at: self.now, participants, step_s, messages, bytes, offered, applied, completed, useful, sync };
        self.commits = [self.commits[1], Some(commit)];
    }

    /// Fast-forward: every live rank is computing the next step. If the network is idle,
    /// nothing but their compute is pending, and the last two steps were alike with no fault
    /// between them, the steps up to one period before the next fault (or the end) are taken
    /// as repeats of the last one: progress, checkpoints, useful time, contributions and
    /// network totals advance by them, and every pending event moves later by their time.
    fn fast_forward(&mut self) {
        let [Some(a), Some(b)] = self.commits else { return };
        let period = b.at - a.at;
        let fault_between =
            self.fault_times.partition_point(|t| *t <= a.at) != self.fault_times.partition_point(|t| *t <= self.now);
        if self.restarting
            || period == 0
            || a.participants != b.participants
            || fault_between
            || !self.open_faults.is_empty()
        {
            return;
        }
        let busy_pair = self.pairs.values().any(|p| p.active.is_some() || !p.queue.is_empty());
        let carrying = self.ranks.iter().any(|r| r.alive && r.carried() > 0);
        // `semisync`: a heal may be due (some rank missed a round), so the rounds ahead are not
        // repeats of the last ones.
        let unsettled = self.ranks.iter().any(|r| {
            r.alive && r.plan.as_ref().is_some_and(|p| p.outer().lagging() || p.outer().unhealed().contains(&true))
        });
        // Only compute (and stale or idle-group events) may be pending.
        let pending_work = self.heap.iter().any(|e| match &e.ev {
            Ev::ComputeDone { .. } | Ev::GroupTimer { .. } | Ev::Deadline { .. } => false,
            Ev::FaultStart(_) | Ev::FaultEnd(_) => false,
            Ev::FlowDone { flow, version } => self.fabric.share.version(*flow) == Some(*version),
            Ev::Deliver { epoch, .. }
            | Ev::Processed { epoch, .. }
            | Ev::LostNotice { epoch, .. }
            | Ev::JobResume { epoch } => *epoch == self.epoch,
            Ev::HostsCut { .. } | Ev::Frame { .. } | Ev::EndpointTimer { .. } => true,
            Ev::CoordTick { .. } => false,
            Ev::ToCoordinator { .. } | Ev::ToRank { .. } | Ev::ClientRetry { .. } | Ev::AdmissionWait { .. } => true,
        });
        if busy_pair || carrying || unsettled || pending_work {
            return;
        }
        let end = (self.sc.duration_s * SEC) as u64;
        let next_fault = self.fault_times.get(self.fault_times.partition_point(|t| *t <= self.now)).copied();
        let horizon = next_fault.unwrap_or(end).min(end);
        let step = self.ranks.iter().filter(|r| r.alive).map(|r| r.step).max().unwrap_or(0);
        // A period is one step, or for `semisync` one outer round (`outer_every / fragments`
        // steps).
        let semisync = self.sc.workload.kind == WorkloadKind::Semisync;
        let unit = if semisync { self.semisync_round_steps() } else { 1 };
        // Keep a period of margin before the horizon, and simulate the last period for real.
        let k = (horizon.saturating_sub(self.now) / period)
            .saturating_sub(1)
            .min((self.steps_target.saturating_sub(step) / unit).saturating_sub(1));
        if k < 2 {
            return;
        }
        let shift = k * period;
        let entries: Vec<Entry> = std::mem::take(&mut self.heap).into_vec();
        for mut e in entries {
            match e.ev {
                Ev::FaultStart(_) | Ev::FaultEnd(_) => {}
                // Deadlines of collectives every rank is done with, and events that are stale
                // already, would only pile up as they move on with every skip.
                Ev::Deadline { .. } => continue,
                Ev::FlowDone { flow, version } if self.fabric.share.version(flow) != Some(version) => continue,
                Ev::ComputeDone { epoch, .. } | Ev::GroupTimer { epoch, .. } if epoch != self.epoch => continue,
                _ => e.at += shift,
            }
            self.heap.push(e);
        }
        for rk in self.ranks.iter_mut().filter(|r| r.alive) {
            rk.step += k * unit;
            if let Some(p) = rk.plan.as_mut() {
                p.set_step(p.step() + k * unit);
            }
        }
        self.net.messages += k * (b.messages - a.messages);
        self.net.bytes += k * (b.bytes - a.bytes);
        if semisync {
            // `semisync`: each outer round repeats the last one's counts (its in-DC rounds, its
            // outer round, their useful compute).
            self.contrib.offered += k * (b.offered - a.offered);
            self.contrib.applied += k * (b.applied - a.applied);
            self.coll.completed += k * (b.completed - a.completed);
            self.sync_report.advance(&a.sync, &b.sync, k);
            self.useful_ns += k as f64 * (b.useful - a.useful);
            self.progress += k * unit;
            self.checkpoint = self.progress;
            for i in 1..=k {
                let t_s = (b.at + i * period) as f64 / SEC;
                self.steps.push(StepPoint { t_s, step_s: b.step_s, participants: b.participants });
            }
        }
        let live = self.alive_count as u64;
        if !semisync {
            self.contrib.offered += k * live;
            self.contrib.applied += k * live;
            self.coll.completed += k;
        }
        for i in (1..=k).filter(|_| !semisync) {
            // As a simulated step: the commit (and a checkpoint) comes with the first rank's
            // result; the others' useful time counts after it.
            let (by_commit, all) = self.last_step_useful;
            self.progress += 1;
            self.useful_since_checkpoint += by_commit;
            if self.progress.is_multiple_of(self.sc.workload.checkpoint_every) {
                self.checkpoint = self.progress;
                self.useful_ns += std::mem::take(&mut self.useful_since_checkpoint);
            }
            self.useful_since_checkpoint += all - by_commit;
            let t_s = (b.at + i * period) as f64 / SEC;
            self.steps.push(StepPoint { t_s, step_s: b.step_s, participants: b.participants });
        }
        let at = b.at + k * period;
        // The last two periods as if simulated: their counters advanced by the skip.
        let (offered, applied, completed) = (self.contrib.offered, self.contrib.applied, self.coll.completed);
        let (messages, bytes, useful) =
            (self.net.messages, self.net.bytes, self.useful_ns + self.useful_since_checkpoint);
        let sync = self.sync_report;
        let last = Commit { at, messages, bytes, offered, applied, completed, useful, sync, ..b };
        let before = Commit {
            at: at - period,
            messages: messages - (b.messages - a.messages),
            bytes: bytes - (b.bytes - a.bytes),
            offered: offered - (b.offered - a.offered),
            applied: applied - (b.applied - a.applied),
            completed: completed - (b.completed - a.completed),
            useful: useful - (b.useful - a.useful),
            sync: {
                let mut s = a.sync;
                s.advance(&a.sync, &b.sync, k);
                s
            },
            ..b
        };
        self.commits = [Some(before), Some(last)];
        self.fast_forwarded += k * unit;
        self.hash_buf.push(12);
        self.hash_buf.extend_from_slice(&k.to_le_bytes());
        self.hash_buf.extend_from_slice(&period.to_le_bytes());
    }

    /// Synchronous training's answer to a failure: stop everyone, lose the work since the last
    /// checkpoint, come back after `restart_s` with a fresh group (spares replace dead ranks).
    fn restart_job(&mut self) {
        if self.restarting {
            return;
        }
        self.restarting = true;
        self.useful_since_checkpoint = 0.0;
        self.progress = self.checkpoint;
        let epoch = self.epoch;
        for r in 0..self.world {
            let rk = &mut self.ranks[r];
            if let Stage::InCall { op_seq } = rk.stage {
                // The job drops the call (reported: the job knows it restarts).
                self.contrib.dropped_reported += rk.call_units;
                if let Some(rec) = self.ops.get_mut(&(epoch, op_seq)) {
                    rec.failed = true;
                }
                self.op_closed((epoch, op_seq));
                if let Some(tr) = self.trace.as_mut() {
                    tr.end(r, self.now, "restart");
                }
            }
            let rk = &mut self.ranks[r];
            self.contrib.dropped_reported += rk.carried();
            rk.carry_units = [0, 0];
            rk.drop_groups();
            rk.stage = Stage::Idle;
            rk.proc_queue.clear();
            self.computing = 0;
            if let Some(flow) = rk.proc_active.take() {
                self.fabric.share.remove(self.now, flow);
            }
        }
        for (_, p) in std::mem::take(&mut self.pairs) {
            if let Some((flow, _)) = p.active {
                self.fabric.share.remove(self.now, flow);
            }
        }
        self.epoch += 1;
        let at = self.now + (self.sc.workload.restart_s * SEC) as u64;
        let epoch = self.epoch;
        self.push(at, Ev::JobResume { epoch });
    }

    fn deadline(&mut self, r: usize, op_seq: u64) {
        if self.ranks[r].stage != (Stage::InCall { op_seq }) {
            return;
        }
        let rk = &mut self.ranks[r];
        let channel = rk.call_channel;
        if let Some(g) = rk.group_of(channel) {
            g.abandon(self.now);
        }
        self.contrib.dropped_reported += self.ranks[r].call_units;
        if self.ranks[r].sync_call.is_some() {
            self.sync_report.failed_calls += 1;
        }
        let key = (self.epoch, op_seq);
        if let Some(rec) = self.ops.get_mut(&key) {
            rec.failed = true;
        }
        self.close_call(r, key, "failed");
        self.pump(r);
    }

    // ---- the loop ----

    fn run(&mut self) {
        self.form_groups();
        if self.frames.is_some() {
            self.frames_start();
        }
        for r in 0..self.world {
            self.begin_step(r);
        }
        self.settle_network();
        let end = (self.sc.duration_s * SEC) as u64;
        while let Some(e) = self.heap.pop() {
            if e.at > end {
                self.now = end;
                break;
            }
            self.now = e.at;
            let mut batch = vec![e.ev];
            while self.heap.peek().is_some_and(|n| n.at == self.now) {
                batch.push(self.heap.pop().expect("peeked").ev);
            }
            for ev in batch {
                self.handle(ev);
            }
            self.settle_network();
            if std::mem::take(&mut self.quiet) && self.computing == self.alive_count {
                self.fast_forward();
            }
            if self.all_done() {
                break;
            }
            if let Some(every) = self.options.progress_every {
                if self.last_progress.elapsed() >= every {
                    self.last_progress = Instant::now();
                    eprint!(
                        "\r  sim {:>9.3} s  step {:>6}/{}  events {:>10}  wall {:>6.1} s",
                        self.now as f64 / SEC,
                        self.progress,
                        self.steps_target,
                        self.events,
                        self.started.elapsed().as_secs_f64()
                    );
                }
            }
        }
        if self.options.progress_every.is_some() {
            eprintln!();
        }
    }

    fn all_done(&self) -> bool {
        // (A process still waiting to be admitted when everyone else is done never will be.)
        !self.restarting && self.ranks.iter().all(|r| !r.alive || matches!(r.stage, Stage::Finished | Stage::Joining))
    }

    fn handle(&mut self, ev: Ev) {
        // Stale events (an earlier epoch, an outdated flow estimate) are not part of the story.
        let current = match &ev {
            Ev::FlowDone { flow, version } => self.fabric.share.version(*flow) == Some(*version),
            Ev::Deliver { epoch, .. }
            | Ev::Processed { epoch, .. }
            | Ev::GroupTimer { epoch, .. }
            | Ev::Deadline { epoch, .. }
            | Ev::ComputeDone { epoch, .. }
            | Ev::LostNotice { epoch, .. }
            | Ev::Frame { epoch, .. }
            | Ev::EndpointTimer { epoch, .. }
            | Ev::JobResume { epoch } => *epoch == self.epoch,
            _ => true,
        };
        if !current {
            return;
        }
        self.events += 1;
        self.record_hash(&ev);
        match ev {
            Ev::FlowDone { flow, version } => {
                self.flow_done(flow, version);
            }
            Ev::Deliver { from, to, bytes, phantom, epoch, channel } => {
                let t = to as usize;
                if !self.ranks[t].alive {
                    return;
                }
                if self.sc.topology.rank_work.is_some() {
                    self.ranks[t].proc_queue.push_back((from, bytes, phantom, channel));
                    if self.ranks[t].proc_active.is_none() {
                        self.start_processing(t);
                    }
                    return;
                }
                if let Some(rate) = self.sc.topology.rank_gbyte_s {
                    // The rank handles what arrives one message at a time at its rate (copies,
                    // checksums, reduction): the message is done when the rank gets to it.
                    let cost = ((bytes.len() + phantom) as f64 / (rate * 1e9) * SEC).round() as u64;
                    let done = self.now.max(self.ranks[t].busy_until) + cost;
                    self.ranks[t].busy_until = done;
                    self.push(done, Ev::Processed { from, to, epoch, bytes, phantom, channel });
                    return;
                }
                self.receive(from as usize, t, bytes, phantom, channel);
            }
            Ev::Processed { from, to, bytes, phantom, channel, .. } => {
                self.receive(from as usize, to as usize, bytes, phantom, channel)
            }
            Ev::GroupTimer { rank, .. } => {
                let r = rank as usize;
                self.ranks[r].timer_at = None;
                let rk = &mut self.ranks[r];
                if rk.grouped() {
                    for g in rk.group.iter_mut().chain(rk.dc_group.iter_mut()).chain(rk.all_group.iter_mut()) {
                        g.handle_timeout(self.now);
                    }
                    self.pump(r);
                }
            }
            Ev::Deadline { rank, op_seq, .. } => self.deadline(rank as usize, op_seq),
            Ev::ComputeDone { rank, .. } => {
                let r = rank as usize;
                if self.ranks[r].alive && self.ranks[r].stage == Stage::Computing {
                    self.computing -= 1;
                    self.start_call(r);
                }
            }
            Ev::LostNotice { lost, .. } => {
                for r in 0..self.world {
                    if r != lost as usize && self.ranks[r].alive {
                        self.peer_lost(r, lost as usize);
                    }
                }
                self.membership_lost(lost as usize);
            }
            Ev::HostsCut { a, b, since } => {
                let hosts = self.fabric.hosts();
                let (a, b) = (a as usize, b as usize);
                if self.cut_since[a * hosts + b] == since {
                    for x in self.fabric.ranks_of_host(a) {
                        for y in self.fabric.ranks_of_host(b) {
                            for (me, peer) in [(x, y), (y, x)] {
                                if self.ranks[me].alive {
                                    self.peer_lost(me, peer);
                                }
                            }
                        }
                    }
                }
            }
            Ev::FaultStart(i) => self.fault(i, true),
            Ev::FaultEnd(i) => self.fault(i, false),
            Ev::Frame { to, link, frame, corrupt, .. } => {
                if self.ranks[to as usize].alive {
                    self.frame_arrived(to as usize, link, *frame, corrupt);
                }
            }
            Ev::EndpointTimer { rank, .. } => {
                if self.ranks[rank as usize].alive {
                    self.frames_timer(rank as usize);
                }
            }
            Ev::CoordTick { coordinator, incarnation } => self.coordinator_tick(coordinator as usize, incarnation),
            Ev::ToCoordinator { to, from, bytes } => self.coordinator_receive(to as usize, from, bytes),
            Ev::ToRank { slot, incarnation, bytes } => self.client_reply(slot as usize, incarnation, bytes),
            Ev::ClientRetry { slot, incarnation, attempt, rotate } => {
                self.client_retry(slot as usize, incarnation, attempt, rotate)
            }
            Ev::AdmissionWait { slot, incarnation } => self.admission_waited(slot as usize, incarnation),
            Ev::JobResume { .. } => {
                self.restarting = false;
                self.form_groups();
                for r in 0..self.world {
                    self.begin_step(r);
                }
            }
        }
    }

    /// Rank `to` takes in a message from `from` for its group `channel`.
    fn receive(&mut self, from: usize, to: usize, bytes: Bytes, phantom: usize, channel: u8) {
        if !self.ranks[to].alive {
            return;
        }
        let Some(from) = self.group_index(to, channel, from) else { return };
        let rk = &mut self.ranks[to];
        if let Some(g) = rk.group_of(channel) {
            g.handle_message_sized(from, vec![bytes], phantom, self.now);
            self.pump(to);
        }
    }

    /// Ranks per data centre (the topology is uniform).
    fn per_dc(&self) -> usize {
        let t = &self.sc.topology;
        t.hosts_per_dc * t.ranks_per_host
    }

    /// Rank `r` learns that `peer` is lost (in its data centre's group too, if they share one).
    fn peer_lost(&mut self, r: usize, peer: usize) {
        if !self.ranks[r].grouped() {
            return;
        }
        for channel in 0..3 {
            let Some(i) = self.group_index(r, channel, peer) else { continue };
            if let Some(g) = self.ranks[r].group_of(channel) {
                g.handle_peer_lost(i, self.now);
            }
        }
        self.pump(r);
    }

    /// The rank at `index` of rank `r`'s group `channel` (see [`layout::Layout`]).
    fn group_rank(&self, r: usize, channel: u8, index: usize) -> usize {
        self.layout.rank(r, channel, index, self.per_dc())
    }

    /// Where `rank` is in rank `r`'s group `channel` (`None`: not in it).
    fn group_index(&self, r: usize, channel: u8, rank: usize) -> Option<usize> {
        self.layout.index(r, channel, rank, self.per_dc())
    }

    fn finish(mut self) -> RunOutput {
        if self.frames.is_some() {
            self.frames_finish();
        }
        self.hasher.update(&self.hash_buf);
        let hash = self.hasher.clone().finalize();
        let trace_hash: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
        // Calls still open at the end: past their deadline they hung (a bug); before it they
        // were cut off by the end of the run.
        let deadline = (self.sc.workload.deadline_ms * MS) as u64;
        for r in 0..self.world {
            let rk = &self.ranks[r];
            if !rk.alive {
                continue;
            }
            if let Stage::InCall { .. } = rk.stage {
                if self.now >= rk.call_started + deadline {
                    self.coll.hung += 1;
                } else {
                    self.coll.in_flight += 1;
                }
                self.contrib.pending += rk.call_units;
            }
            self.contrib.pending += rk.carried();
        }
        let sim_s = self.now as f64 / SEC;
        self.useful_ns += self.useful_since_checkpoint;
        let c = &mut self.contrib;
        let accounted = c.applied + c.dropped_reported + c.pending + c.died_with_rank;
        // `offered` counts fresh contributions; units also count carried ones once each.
        c.lost = c.offered.saturating_sub(accounted) + accounted.saturating_sub(c.offered);
        let goodput = if sim_s > 0.0 { self.useful_ns / (self.world as f64 * self.now as f64) } else { 0.0 };
        let mut rec = self.recoveries.clone();
        rec.sort_by(|a, b| a.total_cmp(b));
        let wall = self.started.elapsed().as_secs_f64();
        self.net.flows_solved = self.fabric.share.solved;
        let report = Report {
            scenario: self.sc.name.clone(),
            seed: self.seed,
            ranks: self.world,
            sim_time_s: sim_s,
            wall_time_s: wall,
            events: self.events,
            events_per_s: self.events as f64 / wall.max(1e-9),
            trace_hash,
            steps_completed: self.progress,
            steps_target: self.steps_target,
            collectives: self.coll.clone(),
            contributions: self.contrib.clone(),
            faults_injected: self.fault_counts.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            goodput,
            recovery_s: Recovery { p50: rec.get(rec.len() / 2).copied(), max: rec.last().copied(), count: rec.len() },
            network: self.net.clone(),
            fast_forwarded_steps: self.fast_forwarded,
            frames: self.frames.is_some().then_some(self.stats_frames),
            peak_rss_mb: crate::report::peak_rss_mb(),
            membership: self.membership_report(),
            semisync: (self.sc.workload.kind == WorkloadKind::Semisync).then_some(self.sync_report),
            steps: self.steps,
            fault_marks: self.fault_marks,
        };
        RunOutput { report, trace: self.trace }
    }
}

/// Rank `r`'s contribution at `step`: element 0 counts contributions (1 each, so a folded late
/// one adds its count), the rest are small deterministic values.
fn contribution(r: usize, step: u64, bytes: usize) -> Vec<u8> {
    let count = bytes / 8;
    let mut v = Vec::with_capacity(count * 8);
    for i in 0..count {
        let x: i64 = if i == 0 { 1 } else { ((r as i64 * 31 + step as i64 * 7 + i as i64 * 3) % 13) - 6 };
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

fn rec_started(ops: &BTreeMap<(u64, u64), OpRecord>, key: (u64, u64)) -> u64 {
    ops.get(&key).map_or(0, |r| r.started)
}

/// Elementwise i64 sum of `b` into `a` (wrapping, as the kernel does).
fn add_i64(a: &mut [u8], b: &[u8]) {
    for (x, y) in a.chunks_exact_mut(8).zip(b.chunks_exact(8)) {
        let s = i64::from_le_bytes(x.try_into().expect("8 bytes"))
            .wrapping_add(i64::from_le_bytes(y.try_into().expect("8 bytes")));
        x.copy_from_slice(&s.to_le_bytes());
    }
}

/// The reference: the sum of what `participants` offered (`None` if one of them is unknown).
fn sum_of(offered: &BTreeMap<usize, (Option<Vec<u8>>, u64)>, participants: &[usize]) -> Option<Vec<u8>> {
    let mut acc: Option<Vec<u8>> = None;
    for p in participants {
        let (Some(buf), _) = offered.get(p)? else { return None };
        match acc.as_mut() {
            None => acc = Some(buf.clone()),
            Some(a) => add_i64(a, buf),
        }
    }
    acc
}

/// What rank `s` sends rank `d` in an all-to-all at `step`.
fn alltoall_share(s: usize, d: usize, step: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (s * 131 + d * 31 + step as usize * 7 + i) as u8).collect()
}
