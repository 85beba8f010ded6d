//! Scenario files: what to simulate, in TOML. Every field is documented in
//! `docs/scenarios.md`; examples live in `examples/scenarios/`.
//!
//! Parsing never panics. A file that is not TOML, has an unknown or mistyped field, or a value
//! out of range gets a [`ScenarioError`] naming the file, the line and the field.

use std::path::Path;

use serde::{Deserialize, Deserializer};
use thiserror::Error;

/// Why a scenario could not be loaded.
#[derive(Debug, Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not TOML, or a field of the wrong type or name (the message names it).
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the parser says.
        message: String,
    },
    /// A field with a value the simulator cannot use.
    #[error("{file}:{line}: field `{field}`: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// 1-based line of the field (or of its table, if the field is missing).
        line: usize,
        /// Dotted path of the field, e.g. `faults[2].at_s`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

/// A byte count, written as an integer or a string with a binary unit (`"64MiB"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => parse_size(&s).map(ByteSize).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses a byte size: `4096`, `64KiB`, `64MiB`, `1GiB` (binary units; `K`, `M`, `G` too).
/// Errors name the bad input.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}: expected e.g. 4096, 64KiB, 64MiB, 1GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("invalid size unit {other:?} in {s:?}: use B, KiB, MiB or GiB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

/// A whole scenario.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name (in the report).
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Seed used when the command line gives none.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Simulated time after which the run stops even if the workload is not done.
    #[serde(default = "default_duration")]
    pub duration_s: f64,
    /// Data centres, hosts, ranks, links.
    pub topology: TopologySpec,
    /// Transport timers.
    #[serde(default)]
    pub transport: TransportSpec,
    /// What the ranks run.
    pub workload: WorkloadSpec,
    /// Faults, scheduled or drawn from rates.
    #[serde(default)]
    pub faults: Vec<FaultSpec>,
    /// Elastic membership: coordinators (the real Raft replicas) that ranks report failures
    /// to and rejoin through, and epochs that change at step boundaries. Absent: the group is
    /// fixed (a crashed rank stays out).
    #[serde(default)]
    pub membership: Option<MembershipSpec>,
}

/// Elastic membership in a run.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembershipSpec {
    /// Coordinator replicas (1, 3 or 5), on hosts spread over the data centres.
    #[serde(default = "default_coordinators")]
    pub coordinators: usize,
    /// A coordinator's tick, ms (Raft heartbeats every 2 ticks).
    #[serde(default = "default_tick_ms")]
    pub tick_ms: f64,
    /// Ticks without a leader before a coordinator campaigns.
    #[serde(default = "default_election_ticks")]
    pub election_ticks: usize,
    /// Steps between epoch boundaries (where failures and joins take effect).
    #[serde(default = "default_boundary_every")]
    pub boundary_every: u64,
    /// Training state a rejoining rank recovers from its peers before it takes part again.
    #[serde(default = "default_state_bytes")]
    pub state_bytes: ByteSize,
    /// A rank waits this long for a coordinator's answer before asking the next one, ms.
    #[serde(default = "default_client_retry_ms")]
    pub client_retry_ms: f64,
}

fn default_coordinators() -> usize {
    3
}
fn default_tick_ms() -> f64 {
    50.0
}
fn default_election_ticks() -> usize {
    10
}
fn default_boundary_every() -> u64 {
    10
}
fn default_state_bytes() -> ByteSize {
    ByteSize(0)
}
fn default_client_retry_ms() -> f64 {
    500.0
}

fn default_seed() -> u64 {
    1
}
fn default_duration() -> f64 {
    3600.0
}

/// Data centres → hosts → ranks, and the links between them. Bandwidths are per direction.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologySpec {
    /// Data centres.
    #[serde(default = "one")]
    pub dcs: usize,
    /// Hosts in each data centre.
    pub hosts_per_dc: usize,
    /// Ranks (GPUs) on each host.
    #[serde(default = "one")]
    pub ranks_per_host: usize,
    /// NICs per host; traffic is spread over the NICs that are up.
    #[serde(default = "one")]
    pub nics_per_host: usize,
    /// Bandwidth of one NIC, Gbit/s.
    pub nic_gbit_s: f64,
    /// Bandwidth between ranks on the same host (NVLink-like), Gbit/s.
    #[serde(default = "default_host_gbit")]
    pub host_gbit_s: f64,
    /// One-way latency between ranks on the same host, µs.
    #[serde(default = "default_host_latency")]
    pub host_latency_us: f64,
    /// One-way latency between hosts of one data centre, µs.
    #[serde(default = "default_dc_latency")]
    pub dc_latency_us: f64,
    /// Bandwidth of the WAN link between each pair of data centres, Gbit/s.
    #[serde(default = "default_wan_gbit")]
    pub wan_gbit_s: f64,
    /// One-way latency of each WAN link, ms.
    #[serde(default = "default_wan_latency")]
    pub wan_latency_ms: f64,
    /// How fast a rank processes what arrives (copies, checksums, reduction), GB/s; each
    /// message occupies its rank for `bytes / rate` after it arrives, one at a time. Absent:
    /// processing is free (the network alone sets the pace).
    #[serde(default)]
    pub rank_gbyte_s: Option<f64>,
    /// Instead of a fixed rate: each received byte costs this many bytes of the host's
    /// internal link (`host_gbit_s`) to process, so processing competes with the transfers
    /// on that link (loopback, where both are work of the same cores). One message at a time
    /// per rank.
    #[serde(default)]
    pub rank_work: Option<f64>,
}

fn one() -> usize {
    1
}
fn default_host_gbit() -> f64 {
    2400.0
}
fn default_host_latency() -> f64 {
    2.0
}
fn default_dc_latency() -> f64 {
    5.0
}
fn default_wan_gbit() -> f64 {
    100.0
}
fn default_wan_latency() -> f64 {
    10.0
}

impl TopologySpec {
    /// Total ranks.
    pub fn ranks(&self) -> usize {
        self.dcs * self.hosts_per_dc * self.ranks_per_host
    }

    /// Total hosts.
    pub fn hosts(&self) -> usize {
        self.dcs * self.hosts_per_dc
    }
}

/// Transport timers (defaults: `phalanx_proto::TransportConfig`'s).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportSpec {
    /// A path silent this long is declared dead (traffic moves to other paths).
    pub link_timeout_ms: f64,
    /// A peer with no route for this long is reported lost to the collectives.
    pub unreachable_after_ms: f64,
    /// Frame payload size: the unit of framing overhead and of retransmission.
    pub chunk_bytes: ByteSize,
    /// Run every rank's real transport endpoint (`phalanx_proto::Endpoint`): frames cross
    /// the network model per path, and loss, corruption, link, NIC and rank failures reach the
    /// transport's own acknowledgements, retransmission, failover, relaying and unreachability
    /// verdicts. Small scale: real payloads, at most [`MAX_FRAME_RANKS`] ranks, `on_failure =
    /// "continue"`, no fast-forward.
    pub frames: bool,
}

/// Most ranks a frame-level run may have (every pair of ranks has a link per NIC).
pub const MAX_FRAME_RANKS: usize = 64;

impl Default for TransportSpec {
    fn default() -> Self {
        let c = phalanx_proto::TransportConfig::default();
        TransportSpec {
            link_timeout_ms: c.link_timeout.as_secs_f64() * 1e3,
            unreachable_after_ms: c.unreachable_after.as_secs_f64() * 1e3,
            chunk_bytes: ByteSize(c.chunk_bytes as u64),
            frames: false,
        }
    }
}

/// Which workload runs.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    /// Collectives back to back (plus `compute` before each, if given).
    CollectiveLoop,
    /// Synchronous data parallel: compute, then all-reduce the gradient, `steps` times.
    DataParallel,
    /// Semi-synchronous across data centres (DiLoCo, streaming DiLoCo), run by the real
    /// protocol (`CrossDcPlan`): every step, compute and all-reduce the gradient inside the
    /// rank's data centre (its own group: the DCs do not wait for each other); every
    /// `outer_every` steps (per fragment), the DCs' leaders all-reduce the outer gradient
    /// (`outer_bytes`) among themselves — healing when the plan says so — and each leader then
    /// realigns its DC with a broadcast.
    Semisync,
}

/// The collective a workload runs.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// All-reduce (sum).
    #[default]
    Allreduce,
    /// All-to-all (equal shares).
    Alltoall,
}

/// Real bytes (checked against a reference) or phantom lengths (for scale).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PayloadKind {
    /// Bytes move; every result is checked.
    #[default]
    Real,
    /// Only lengths move.
    Phantom,
}

/// All-reduce algorithm.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AlgorithmKind {
    /// By size and topology.
    #[default]
    Auto,
    /// Ring.
    Ring,
    /// Recursive doubling.
    RecursiveDoubling,
    /// Recursive halving then doubling (the ring when the world is not a power of two).
    HalvingDoubling,
    /// Hierarchical across data centres.
    Hierarchical,
}

/// Fault policy of every collective.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// Fail on a lost rank.
    #[default]
    Abort,
    /// Finish over the survivors.
    Shrink,
    /// Proceed with a quorum at a deadline.
    Quorum,
}

/// What the job does when a collective fails.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Go on with the next step (semi-synchronous training).
    #[default]
    Continue,
    /// Stop every rank, wait `restart_s`, and resume from the last checkpoint with a fresh
    /// group (crashed ranks replaced by spares): synchronous training as most jobs run today.
    Restart,
}

/// Compute time per step and rank.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ComputeSpec {
    /// Median compute time, ms.
    pub median_ms: f64,
    /// Log-normal shape: 0 gives a fixed time; 0.5 a heavy tail.
    #[serde(default)]
    pub sigma: f64,
}

/// What the ranks run.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Loop kind.
    pub kind: WorkloadKind,
    /// The collective.
    #[serde(default)]
    pub op: OpKind,
    /// Bytes per rank per collective (the gradient, for `data_parallel`).
    pub bytes: ByteSize,
    /// Steps (collectives) to run.
    pub steps: u64,
    /// Real or phantom bytes.
    #[serde(default)]
    pub payload: PayloadKind,
    /// All-reduce algorithm.
    #[serde(default)]
    pub algorithm: AlgorithmKind,
    /// Fault policy.
    #[serde(default)]
    pub policy: PolicyKind,
    /// `quorum`: fewest contributions a round may complete with (default: half the ranks,
    /// rounded up).
    pub quorum_min: Option<usize>,
    /// `quorum`: how long the coordinator waits for the rest after the first report, ms.
    #[serde(default = "default_quorum_wait")]
    pub quorum_wait_ms: f64,
    /// Deadline of each collective, ms: a rank gives the call up then.
    #[serde(default = "default_deadline")]
    pub deadline_ms: f64,
    /// Segment size of the executor (the unit of pipelining; larger is cheaper to simulate).
    pub segment_bytes: Option<ByteSize>,
    /// Compare result hashes across participants.
    #[serde(default)]
    pub verify: bool,
    /// Compute before each collective.
    pub compute: Option<ComputeSpec>,
    /// What happens when a collective fails.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// `restart`: steps between checkpoints.
    #[serde(default = "default_checkpoint")]
    pub checkpoint_every: u64,
    /// `restart`: time from the failure to the job running again, s.
    #[serde(default = "default_restart")]
    pub restart_s: f64,
    /// Skip through quiet stretches: when every live rank is computing, nothing is on the
    /// network and no fault is due for a while, the last step is repeated at its measured
    /// period instead of simulated again (for long runs; see `docs/simulator.md`).
    #[serde(default)]
    pub fast_forward: bool,
    /// `semisync`: inner steps between outer all-reduces (H).
    pub outer_every: Option<u64>,
    /// `semisync`: bytes per rank of the outer all-reduce (default: `bytes`; e.g. the int8
    /// outer gradient, a quarter of an fp32 gradient).
    pub outer_bytes: Option<ByteSize>,
    /// `semisync`: parameter fragments (streaming DiLoCo; default 1, plain DiLoCo). Each syncs
    /// every `outer_every` steps, staggered; `outer_every` must be a multiple.
    pub outer_fragments: Option<usize>,
    /// `semisync`: every this many rounds of a fragment, heal it if a leader missed one of its
    /// rounds since the last heal (default 4; 0: never).
    pub heal_every: Option<u64>,
    /// `semisync` under `quorum`: after a round someone missed, the next waits this long for
    /// everyone (default 5000 ms).
    pub catch_up_wait_ms: Option<f64>,
}

fn default_quorum_wait() -> f64 {
    100.0
}
fn default_deadline() -> f64 {
    60_000.0
}
fn default_checkpoint() -> u64 {
    100
}
fn default_restart() -> f64 {
    600.0
}

/// Kinds of fault.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// A WAN link (`dcs = [a, b]`) goes down, both directions.
    LinkDown,
    /// One NIC of a host (`host`, `nic`) goes down.
    NicDown,
    /// No traffic between the `sides` (sets of data centres) or between `hosts` and the rest.
    Partition,
    /// A fraction `rate` of packets is lost on a link (`dcs` or `host`).
    Loss,
    /// `extra_ms` more latency on a link (`dcs` or `host`).
    LatencySpike,
    /// A rank process dies (`rank`, or a random one with `mtbf_s`).
    Crash,
    /// Ranks compute `slowdown` times slower (`ranks`, or a random `fraction` of them).
    Straggler,
    /// A fraction `rate` of frames is corrupted on a link (`dcs` or `host`); the transport's
    /// checksum catches each one and the frame is sent again.
    Corruption,
    /// A membership coordinator dies (`coordinator`, or the leader of the moment) and restarts
    /// after `duration_s` from what its log had synced (needs `[membership]`).
    CoordinatorCrash,
}

impl FaultKind {
    /// The name used in scenarios and reports.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::LinkDown => "link_down",
            FaultKind::NicDown => "nic_down",
            FaultKind::Partition => "partition",
            FaultKind::Loss => "loss",
            FaultKind::LatencySpike => "latency_spike",
            FaultKind::Crash => "crash",
            FaultKind::Straggler => "straggler",
            FaultKind::Corruption => "corruption",
            FaultKind::CoordinatorCrash => "coordinator_crash",
        }
    }
}

/// One fault: scheduled (`at_s`) or recurring at random (`mtbf_s`, per component).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// What fails.
    pub kind: FaultKind,
    /// When, s of simulated time.
    pub at_s: Option<f64>,
    /// Instead of `at_s`: mean time between failures of each component, s (exponential).
    pub mtbf_s: Option<f64>,
    /// How long it lasts, s (absent: for the rest of the run; a crash is permanent unless
    /// the job restarts).
    pub duration_s: Option<f64>,
    /// Crash: the rank.
    pub rank: Option<usize>,
    /// Crash: the process is restarted this long after it died, as a new incarnation that
    /// rejoins through the coordinators (needs `[membership]`).
    pub restart_after_s: Option<f64>,
    /// Coordinator crash: which coordinator (0-based; absent: the leader at that moment).
    pub coordinator: Option<usize>,
    /// Straggler: the ranks.
    pub ranks: Option<Vec<usize>>,
    /// Straggler: a random fraction of the ranks instead.
    pub fraction: Option<f64>,
    /// NIC, loss, latency spike, corruption: the host.
    pub host: Option<usize>,
    /// NIC down: which NIC of the host (default 0).
    pub nic: Option<usize>,
    /// Link faults: the WAN link between these two data centres.
    pub dcs: Option<Vec<usize>>,
    /// Partition: sets of data centres that cannot reach each other.
    pub sides: Option<Vec<Vec<usize>>>,
    /// Partition: hosts cut off from all others.
    pub hosts: Option<Vec<usize>>,
    /// Loss and corruption: fraction of packets or frames.
    pub rate: Option<f64>,
    /// Latency spike: added one-way latency, ms.
    pub extra_ms: Option<f64>,
    /// Straggler: compute-time factor.
    pub slowdown: Option<f64>,
}

impl FaultSpec {
    /// A fault of `kind` with every other field absent (to fill in with struct update syntax).
    pub fn new(kind: FaultKind) -> FaultSpec {
        FaultSpec {
            kind,
            at_s: None,
            mtbf_s: None,
            duration_s: None,
            rank: None,
            restart_after_s: None,
            coordinator: None,
            ranks: None,
            fraction: None,
            host: None,
            nic: None,
            dcs: None,
            sides: None,
            hosts: None,
            rate: None,
            extra_ms: None,
            slowdown: None,
        }
    }
}

impl Scenario {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let file = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| ScenarioError::Read { file: file.clone(), source })?;
        Scenario::parse(&file, &text)
    }

    /// Parses and checks `text` (`file` names it in errors).
    pub fn parse(file: &str, text: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|r| line_col(text, r.start)).unwrap_or((1, 1));
            ScenarioError::Syntax { file: file.into(), line, column, message: e.message().trim().to_string() }
        })?;
        s.validate().map_err(|(path, message)| ScenarioError::Invalid {
            file: file.into(),
            line: locate(text, &path),
            field: path.join(""),
            message,
        })?;
        Ok(s)
    }

    /// The first out-of-range field: `(path segments, message)`.
    fn validate(&self) -> Result<(), (Vec<String>, String)> {
        let f = |table: &str, key: &str| vec![table.to_string(), format!(".{key}")];
        let t = &self.topology;
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;
        if !positive(self.duration_s) {
            return Err((vec!["duration_s".into()], "must be a positive number of seconds".into()));
        }
        for (key, v) in [("dcs", t.dcs), ("hosts_per_dc", t.hosts_per_dc), ("ranks_per_host", t.ranks_per_host)] {
            if v == 0 {
                return Err((f("topology", key), "must be at least 1".into()));
            }
        }
        if t.nics_per_host == 0 || t.nics_per_host > 64 {
            return Err((f("topology", "nics_per_host"), "must be 1..=64".into()));
        }
        if t.ranks() > 1 << 20 {
            return Err((f("topology", "hosts_per_dc"), format!("{} ranks: at most 1048576", t.ranks())));
        }
        for (key, v) in [("nic_gbit_s", t.nic_gbit_s), ("host_gbit_s", t.host_gbit_s), ("wan_gbit_s", t.wan_gbit_s)] {
            if !positive(v) {
                return Err((f("topology", key), "must be a positive bandwidth".into()));
            }
        }
        if t.rank_work.is_some_and(|r| !positive(r)) {
            return Err((f("topology", "rank_work"), "must be positive".into()));
        }
        if t.rank_work.is_some() && t.rank_gbyte_s.is_some() {
            return Err((f("topology", "rank_work"), "give rank_work or rank_gbyte_s, not both".into()));
        }
        if t.rank_gbyte_s.is_some_and(|r| !positive(r)) {
            return Err((f("topology", "rank_gbyte_s"), "must be a positive rate".into()));
        }
        for (key, v) in [
            ("host_latency_us", t.host_latency_us),
            ("dc_latency_us", t.dc_latency_us),
            ("wan_latency_ms", t.wan_latency_ms),
        ] {
            if !non_negative(v) {
                return Err((f("topology", key), "must be a latency ≥ 0".into()));
            }
        }
        let tr = &self.transport;
        if !positive(tr.link_timeout_ms) {
            return Err((f("transport", "link_timeout_ms"), "must be positive".into()));
        }
        if !positive(tr.unreachable_after_ms) {
            return Err((f("transport", "unreachable_after_ms"), "must be positive".into()));
        }
        if tr.chunk_bytes.0 < 1024 {
            return Err((f("transport", "chunk_bytes"), "must be at least 1024".into()));
        }
        let w = &self.workload;
        if tr.frames {
            let why = if t.ranks() > MAX_FRAME_RANKS {
                Some(format!("a frame-level run takes at most {MAX_FRAME_RANKS} ranks"))
            } else if w.payload != PayloadKind::Real {
                Some("a frame-level run needs payload = \"real\" (the transport carries bytes)".into())
            } else if w.on_failure == OnFailure::Restart || w.fast_forward {
                Some("a frame-level run takes neither on_failure = \"restart\" nor fast_forward".into())
            } else if tr.link_timeout_ms <= 100.0 {
                Some("a frame-level run needs link_timeout_ms above the 100 ms heartbeat interval".into())
            } else {
                None
            };
            if let Some(why) = why {
                return Err((f("transport", "frames"), why));
            }
        }
        if w.steps == 0 {
            return Err((f("workload", "steps"), "must be at least 1".into()));
        }
        if w.bytes.0 > 1 << 40 {
            return Err((f("workload", "bytes"), "at most 1 TiB".into()));
        }
        if w.payload == PayloadKind::Real && w.bytes.0 * t.ranks() as u64 > 4 << 30 {
            return Err((
                f("workload", "bytes"),
                "real payloads are held in memory: bytes × ranks must stay under 4 GiB (use payload = \"phantom\")"
                    .into(),
            ));
        }
        if !w.bytes.0.is_multiple_of(8) {
            return Err((f("workload", "bytes"), "must be a multiple of 8 (64-bit elements)".into()));
        }
        if !positive(w.deadline_ms) {
            return Err((f("workload", "deadline_ms"), "must be positive".into()));
        }
        if !non_negative(w.quorum_wait_ms) {
            return Err((f("workload", "quorum_wait_ms"), "must be ≥ 0".into()));
        }
        if let Some(m) = w.quorum_min {
            if m == 0 || m > t.ranks() {
                return Err((f("workload", "quorum_min"), format!("must be 1..={}", t.ranks())));
            }
        }
        if let Some(s) = w.segment_bytes {
            if s.0 < 8 {
                return Err((f("workload", "segment_bytes"), "must be at least 8".into()));
            }
        }
        if let Some(c) = w.compute {
            if !non_negative(c.median_ms) || !non_negative(c.sigma) || c.sigma > 5.0 {
                return Err((f("workload", "compute"), "median_ms must be ≥ 0 and sigma in 0..=5".into()));
            }
        }
        if w.op == OpKind::Alltoall && w.payload == PayloadKind::Phantom {
            return Err((f("workload", "payload"), "all-to-all runs with real payloads only (for now)".into()));
        }
        if w.kind == WorkloadKind::Semisync {
            let why = match w.outer_every {
                None | Some(0) => Some(("outer_every", "semisync needs outer_every ≥ 1 (inner steps per outer round)")),
                Some(_) if w.op != OpKind::Allreduce => Some(("op", "semisync runs all-reduces")),
                Some(_) if w.on_failure == OnFailure::Restart || tr.frames => {
                    Some(("kind", "semisync runs with on_failure = \"continue\" and frames = false (for now)"))
                }
                Some(_) => None,
            };
            if let Some((key, why)) = why {
                return Err((f("workload", key), why.into()));
            }
            if w.outer_bytes.is_some_and(|b| !b.0.is_multiple_of(8) || b.0 > 1 << 40) {
                return Err((f("workload", "outer_bytes"), "must be a multiple of 8, at most 1 TiB".into()));
            }
            let (every, k) = (w.outer_every.unwrap_or(1), w.outer_fragments.unwrap_or(1));
            if k == 0 || k > 1024 || !every.is_multiple_of(k as u64) {
                return Err((f("workload", "outer_fragments"), "must be 1 to 1024 and divide outer_every".into()));
            }
            if w.catch_up_wait_ms.is_some_and(|ms| !(0.0..=1e9).contains(&ms)) {
                return Err((f("workload", "catch_up_wait_ms"), "must be between 0 and 1e9".into()));
            }
        } else if w.outer_every.is_some()
            || w.outer_bytes.is_some()
            || w.outer_fragments.is_some()
            || w.heal_every.is_some()
            || w.catch_up_wait_ms.is_some()
        {
            return Err((f("workload", "outer_every"), "only for kind = \"semisync\"".into()));
        }
        if w.checkpoint_every == 0 {
            return Err((f("workload", "checkpoint_every"), "must be at least 1".into()));
        }
        if !non_negative(w.restart_s) {
            return Err((f("workload", "restart_s"), "must be ≥ 0".into()));
        }
        if let Some(m) = &self.membership {
            let why = if ![1, 3, 5].contains(&m.coordinators) {
                Some(("coordinators", "must be 1, 3 or 5".to_string()))
            } else if !positive(m.tick_ms) {
                Some(("tick_ms", "must be positive".into()))
            } else if !(3..=1000).contains(&m.election_ticks) {
                Some(("election_ticks", "must be 3..=1000".into()))
            } else if m.boundary_every == 0 {
                Some(("boundary_every", "must be at least 1".into()))
            } else if !positive(m.client_retry_ms) {
                Some(("client_retry_ms", "must be positive".into()))
            } else if tr.frames || w.on_failure == OnFailure::Restart || w.fast_forward {
                Some((
                    "coordinators",
                    "membership runs with frames = false, on_failure = \"continue\" and fast_forward = false".into(),
                ))
            } else if w.policy == PolicyKind::Abort {
                Some(("coordinators", "membership needs policy = \"shrink\" or \"quorum\"".into()))
            } else {
                None
            };
            if let Some((key, why)) = why {
                return Err((f("membership", key), why));
            }
        }
        for (i, fs) in self.faults.iter().enumerate() {
            let at = |key: &str| vec!["faults".to_string(), format!("[{i}]"), format!(".{key}")];
            self.validate_fault(fs).map_err(|(key, m)| (at(key), m))?;
        }
        Ok(())
    }

    fn validate_fault(&self, fs: &FaultSpec) -> Result<(), (&'static str, String)> {
        let t = &self.topology;
        match (fs.at_s, fs.mtbf_s) {
            (Some(a), None) if a.is_finite() && a >= 0.0 => {}
            (Some(_), None) => return Err(("at_s", "must be a time ≥ 0".into())),
            (None, Some(m)) if m.is_finite() && m > 0.0 => {}
            (None, Some(_)) => return Err(("mtbf_s", "must be positive".into())),
            (Some(_), Some(_)) => return Err(("mtbf_s", "give either at_s or mtbf_s, not both".into())),
            (None, None) if fs.kind == FaultKind::Straggler => {}
            (None, None) => return Err(("at_s", "missing: give at_s (a time) or mtbf_s (a rate)".into())),
        }
        if let Some(d) = fs.duration_s {
            if !(d.is_finite() && d > 0.0) {
                return Err(("duration_s", "must be positive".into()));
            }
        }
        let link_target = |fs: &FaultSpec| -> Result<(), (&'static str, String)> {
            match (&fs.dcs, fs.host) {
                (Some(d), None) => check_dc_pair(d, t.dcs),
                (None, Some(h)) if h < t.hosts() => Ok(()),
                (None, Some(h)) => Err(("host", format!("host {h} does not exist ({} hosts)", t.hosts()))),
                (Some(_), Some(_)) => Err(("host", "give either dcs (a WAN link) or host, not both".into())),
                (None, None) if fs.mtbf_s.is_some() => Ok(()),
                (None, None) => Err(("dcs", "missing: the WAN link (dcs = [a, b]) or the host".into())),
            }
        };
        let fraction = |key: &'static str, v: Option<f64>| match v {
            Some(r) if r.is_finite() && (0.0..=1.0).contains(&r) => Ok(()),
            Some(_) => Err((key, "must be within 0..=1".to_string())),
            None => Err((key, "missing".to_string())),
        };
        match fs.kind {
            FaultKind::LinkDown => match &fs.dcs {
                Some(d) => check_dc_pair(d, t.dcs)?,
                None if fs.mtbf_s.is_some() && t.dcs > 1 => {}
                None => return Err(("dcs", "missing: the WAN link, dcs = [a, b]".into())),
            },
            FaultKind::NicDown => {
                match fs.host {
                    Some(h) if h >= t.hosts() => {
                        return Err(("host", format!("host {h} does not exist ({} hosts)", t.hosts())))
                    }
                    None if fs.mtbf_s.is_none() => return Err(("host", "missing".into())),
                    _ => {}
                }
                if fs.nic.is_some_and(|n| n >= t.nics_per_host) {
                    return Err(("nic", format!("hosts have {} NICs", t.nics_per_host)));
                }
            }
            FaultKind::Partition => match (&fs.sides, &fs.hosts) {
                (Some(sides), None) => {
                    if sides.len() < 2 || sides.iter().any(|s| s.is_empty()) {
                        return Err(("sides", "needs at least two non-empty sets of data centres".into()));
                    }
                    let mut seen = vec![false; t.dcs];
                    for dc in sides.iter().flatten() {
                        if *dc >= t.dcs || std::mem::replace(&mut seen[*dc], true) {
                            return Err(("sides", format!("data centre {dc} is unknown or listed twice")));
                        }
                    }
                }
                (None, Some(hosts)) => {
                    if hosts.is_empty() || hosts.iter().any(|h| *h >= t.hosts()) {
                        return Err(("hosts", format!("must list existing hosts (0..{})", t.hosts())));
                    }
                }
                _ => return Err(("sides", "give exactly one of sides (data centres) or hosts".into())),
            },
            FaultKind::Loss => {
                link_target(fs)?;
                match fs.rate {
                    Some(r) if r.is_finite() && (0.0..1.0).contains(&r) => {}
                    _ => return Err(("rate", "missing or not within 0..1".into())),
                }
            }
            FaultKind::Corruption => {
                link_target(fs)?;
                fraction("rate", fs.rate)?;
            }
            FaultKind::LatencySpike => {
                link_target(fs)?;
                match fs.extra_ms {
                    Some(e) if e.is_finite() && e >= 0.0 => {}
                    _ => return Err(("extra_ms", "missing or negative".into())),
                }
            }
            FaultKind::Crash => {
                match fs.rank {
                    Some(r) if r >= t.ranks() => {
                        return Err(("rank", format!("rank {r} does not exist ({} ranks)", t.ranks())))
                    }
                    None if fs.mtbf_s.is_none() => return Err(("rank", "missing".into())),
                    _ => {}
                }
                match fs.restart_after_s {
                    Some(r) if !(r.is_finite() && r > 0.0) => {
                        return Err(("restart_after_s", "must be positive".into()))
                    }
                    Some(_) if self.membership.is_none() => {
                        return Err(("restart_after_s", "a rank rejoins through [membership]: add that section".into()))
                    }
                    _ => {}
                }
            }
            FaultKind::CoordinatorCrash => {
                let Some(m) = &self.membership else {
                    return Err(("kind", "a coordinator crash needs a [membership] section".into()));
                };
                if fs.coordinator.is_some_and(|c| c >= m.coordinators) {
                    return Err(("coordinator", format!("there are {} coordinators (0-based)", m.coordinators)));
                }
            }
            FaultKind::Straggler => {
                match (&fs.ranks, fs.fraction) {
                    (Some(rs), None) if rs.iter().all(|r| *r < t.ranks()) => {}
                    (Some(_), None) => return Err(("ranks", format!("ranks must be below {}", t.ranks()))),
                    (None, Some(_)) => fraction("fraction", fs.fraction)?,
                    _ => return Err(("ranks", "give exactly one of ranks or fraction".into())),
                }
                match fs.slowdown {
                    Some(s) if s.is_finite() && s >= 1.0 => {}
                    _ => return Err(("slowdown", "missing or below 1".into())),
                }
            }
        }
        Ok(())
    }
}

fn check_dc_pair(d: &[usize], dcs: usize) -> Result<(), (&'static str, String)> {
    if d.len() != 2 || d[0] == d[1] || d.iter().any(|x| *x >= dcs) {
        return Err(("dcs", format!("must be two different data centres below {dcs}")));
    }
    Ok(())
}

/// 1-based line and column of byte `offset`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

/// The line of the field at `path` (`["workload", ".bytes"]`, `["faults", "[2]", ".at_s"]`,
/// `["duration_s"]`): the line of its key, else of its table, else 1.
fn locate(text: &str, path: &[String]) -> usize {
    let (table, index, key) = match path {
        [k] => ("", None, k.trim_start_matches('.')),
        [t, k] => (t.as_str(), None, k.trim_start_matches('.')),
        [t, i, k] => {
            (t.as_str(), i.trim_matches(|c| c == '[' || c == ']').parse::<usize>().ok(), k.trim_start_matches('.'))
        }
        _ => return 1,
    };
    let mut current = String::new();
    let mut seen: usize = 0;
    let mut table_line = 1;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
            current = name.trim().to_string();
            if current == table {
                seen += 1;
                if index == Some(seen - 1) {
                    table_line = n + 1;
                }
            }
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            current = name.trim().to_string();
            if current == table && index.is_none() {
                table_line = n + 1;
            }
            continue;
        }
        let in_place = current == table && index.is_none_or(|i| seen == i + 1);
        if in_place && line.split('=').next().is_some_and(|k| k.trim() == key) {
            return n + 1;
        }
    }
    table_line
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
[topology]
hosts_per_dc = 2
nic_gbit_s = 100
[workload]
kind = "collective_loop"
bytes = "1MiB"
steps = 3

[[faults]]
kind = "crash"
at_s = 1.0
rank = 1

[[faults]]
kind = "crash"
at_s = 2.0
rank = 7
"#;

    #[test]
    fn a_good_file_parses_with_defaults() {
        let s = Scenario::parse("t.toml", &GOOD.replace("rank = 7", "rank = 0")).expect("valid");
        assert_eq!(s.topology.ranks(), 2);
        assert_eq!(s.workload.bytes, ByteSize(1 << 20));
        assert_eq!(s.transport.unreachable_after_ms, 5000.0);
        assert_eq!(s.faults.len(), 2);
    }

    #[test]
    fn errors_name_the_file_line_and_field() {
        let e = Scenario::parse("t.toml", GOOD).unwrap_err().to_string();
        assert!(e.starts_with("t.toml:19: field `faults[1].rank`"), "{e}");
        let e = Scenario::parse("t.toml", &GOOD.replace("steps = 3", "steps = 0")).unwrap_err().to_string();
        assert!(e.starts_with("t.toml:9: field `workload.steps`"), "{e}");
        let e = Scenario::parse("t.toml", &GOOD.replace("steps = 3", "stepz = 3")).unwrap_err().to_string();
        assert!(e.starts_with("t.toml:9:") && e.contains("stepz"), "{e}");
        let e = Scenario::parse("t.toml", &GOOD.replace("\"1MiB\"", "\"1XB\"")).unwrap_err().to_string();
        assert!(e.starts_with("t.toml:8:") && e.contains("unit"), "{e}");
        let e = Scenario::parse("t.toml", "name = ").unwrap_err().to_string();
        assert!(e.starts_with("t.toml:1:"), "{e}");
        let e =
            Scenario::parse("t.toml", &GOOD.replace("kind = \"crash\"\nat_s = 2.0", "kind = \"meteor\"\nat_s = 2.0"))
                .unwrap_err()
                .to_string();
        assert!(e.starts_with("t.toml:17:") && e.contains("meteor"), "{e}");
    }

    #[test]
    fn sizes_parse_with_binary_units_and_reject_garbage() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("12XB").unwrap_err().contains("unit"));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn no_input_panics_the_parser() {
        for text in
            ["", "[[faults]]", "name = 1", "[topology]\nhosts_per_dc = -1", "\u{0}", "[workload]\nbytes = 1e400"]
        {
            assert!(Scenario::parse("x", text).is_err());
        }
    }
}
