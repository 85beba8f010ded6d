//! The run report: DESIGN.md's `sim` JSON contract, plus the network figures and the step
//! series the plot draws.

use std::collections::BTreeMap;

use serde::Serialize;

/// Collectives, counted once each (not per rank).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Collectives {
    /// At least one rank got a result.
    pub completed: u64,
    /// Every rank that ran it failed, gave it up at its deadline, or was stopped by a restart.
    pub failed: u64,
    /// Still running at the end although past their deadline (a bug: calls never block past
    /// it).
    pub hung: u64,
    /// Rank calls still running at the end, within their deadline (the run's time ran out).
    pub in_flight: u64,
    /// Completed with a result that differs from the reference over the participants it
    /// reports (real payloads; for phantom payloads this stays 0).
    pub wrong_results: u64,
}

/// Contributions (one per rank per step; a late one folded into the next call rides along).
/// `offered = applied + dropped_reported + pending + died_with_rank + lost` (in units, where a
/// folded late contribution counts once).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Contributions {
    /// Contributions made.
    pub offered: u64,
    /// In a result its owner got back.
    pub applied: u64,
    /// Handed back as `Late` (then folded into the owner's next call).
    pub late: u64,
    /// In a call that failed or was given up, reported to the owner as such.
    pub dropped_reported: u64,
    /// Still in a running call or waiting to be folded when the run ended.
    pub pending: u64,
    /// Held by a rank when it crashed.
    pub died_with_rank: u64,
    /// None of the above: silently lost (must be 0).
    pub lost: u64,
}

/// Recovery time from each fault to the next completed step.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Recovery {
    /// Median, s.
    pub p50: Option<f64>,
    /// Largest, s.
    pub max: Option<f64>,
    /// Faults measured.
    pub count: usize,
}

/// What the network carried.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct NetworkStats {
    /// Messages put on the wire (a message re-sent after losing its route counts again).
    pub messages: u64,
    /// Bytes on the wire, framing and retransmissions included.
    pub bytes: u64,
    /// Bytes sent again because a frame was corrupted.
    pub retransmitted_bytes: u64,
    /// Frames whose checksum failed.
    pub corrupted_frames: u64,
    /// Messages relayed through a third data centre.
    pub relayed_messages: u64,
    /// Flow rates computed (a measure of the network model's work).
    pub flows_solved: u64,
}

/// What a frame-level run (`transport.frames`) adds to the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FrameStats {
    /// Links between ranks (one per NIC between hosts, one inside a host).
    pub links: u64,
    /// Frames put on links (data, acknowledgements, heartbeats, relayed).
    pub frames: u64,
    /// Frames dropped: on a dead path (NIC, WAN link, partition, crashed rank) or lost.
    pub dropped: u64,
    /// Frames delivered with a failing checksum.
    pub corrupted: u64,
    /// Frames the endpoints sent again (summed over the live ones at the end, as all of
    /// `failovers` and `relayed_bytes`).
    pub retransmits: u64,
    /// Times an endpoint moved traffic off a dead link.
    pub failovers: u64,
    /// Bytes endpoints relayed for other ranks.
    pub relayed_bytes: u64,
    /// Links the endpoints declared dead.
    pub links_failed: u64,
    /// Peers the endpoints reported unreachable (each report, by each endpoint).
    pub peers_unreachable: u64,
}

/// One completed step.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StepPoint {
    /// When it completed, s.
    pub t_s: f64,
    /// From its first rank's start to its first completion, s.
    pub step_s: f64,
    /// Ranks that took part.
    pub participants: usize,
}

/// What the semi-synchronous protocol ran (`kind = "semisync"`): collectives completed by kind
/// (counted once each, however many ranks took part), and the leaders' outer gradients that
/// missed a round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SemisyncReport {
    /// Gradient all-reduces inside a DC.
    pub gradient_rounds: u64,
    /// Outer all-reduces among the DCs' leaders.
    pub outer_rounds: u64,
    /// Heal broadcasts among the leaders (the plan's choice after a round someone missed).
    pub heals: u64,
    /// Realignment broadcasts inside a DC.
    pub realignments: u64,
    /// Outer gradients that were late for their round (carried into the next).
    pub outer_late: u64,
    /// Calls that failed, counted per rank (an error or the deadline; e.g. a realignment whose
    /// root, the DC's leader, died).
    pub failed_calls: u64,
}

impl SemisyncReport {
    /// Adds `k` times the growth from `a` to `b` (fast-forward repeats a period `k` times).
    pub fn advance(&mut self, a: &SemisyncReport, b: &SemisyncReport, k: u64) {
        let grow = |x: u64, y: u64| k * y.saturating_sub(x);
        self.gradient_rounds += grow(a.gradient_rounds, b.gradient_rounds);
        self.outer_rounds += grow(a.outer_rounds, b.outer_rounds);
        self.heals += grow(a.heals, b.heals);
        self.realignments += grow(a.realignments, b.realignments);
        self.outer_late += grow(a.outer_late, b.outer_late);
        self.failed_calls += grow(a.failed_calls, b.failed_calls);
    }
}

/// What the coordinators and the elastic ranks did (runs with `[membership]`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct MembershipReport {
    /// Coordinator replicas.
    pub coordinators: usize,
    /// The view's epoch at the end (1: no change since the start).
    pub epochs: u64,
    /// Times a coordinator became leader.
    pub leaders_elected: u64,
    /// Times leadership passed to another coordinator.
    pub leader_changes: u64,
    /// Coordinator crashes injected, and restarts.
    pub coordinator_crashes: u64,
    /// Coordinator restarts.
    pub coordinator_restarts: u64,
    /// Raft messages between coordinators.
    pub coordinator_messages: u64,
    /// Requests ranks sent to coordinators (retries included), and retries.
    pub client_requests: u64,
    /// Requests sent again (silence, or no leader known).
    pub client_retries: u64,
    /// Failures reported into the log (status changed).
    pub failures_reported: u64,
    /// Joins committed (restarted processes).
    pub joins_committed: u64,
    /// Rank processes restarted.
    pub ranks_restarted: u64,
    /// Live processes left out of a new epoch (reported lost while they were not): fenced,
    /// restarted, rejoining.
    pub ranks_fenced: u64,
    /// Restarted processes admitted into an epoch with their state recovered.
    pub ranks_readmitted: u64,
    /// Per readmitted process: restart to state recovered, s.
    pub readmission_s: Vec<f64>,
    /// Members of the last epoch.
    pub members_at_end: usize,
    /// The leader at the end (coordinator index), if any.
    pub leader_at_end: Option<usize>,
    /// Coordinators running at the end.
    pub coordinators_up_at_end: usize,
}

/// The report of one run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Seed.
    pub seed: u64,
    /// Ranks simulated.
    pub ranks: usize,
    /// Simulated time, s.
    pub sim_time_s: f64,
    /// Wall-clock time, s.
    pub wall_time_s: f64,
    /// Events processed.
    pub events: u64,
    /// Events per wall-clock second.
    pub events_per_s: f64,
    /// Fingerprint of the event sequence: equal for the same scenario and seed on any machine.
    pub trace_hash: String,
    /// Net steps done (rolled back to the checkpoint on restarts).
    pub steps_completed: u64,
    /// Steps asked for.
    pub steps_target: u64,
    /// Collective outcomes.
    pub collectives: Collectives,
    /// Contribution accounting.
    pub contributions: Contributions,
    /// Faults injected, by kind.
    pub faults_injected: BTreeMap<String, u64>,
    /// Share of all rank-time that went into contributions that were applied and kept.
    pub goodput: f64,
    /// Recovery times.
    pub recovery_s: Recovery,
    /// Network figures.
    pub network: NetworkStats,
    /// Steps not simulated but repeated at the last measured period (`fast_forward`).
    pub fast_forwarded_steps: u64,
    /// Frame level only: what the transport endpoints did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames: Option<FrameStats>,
    /// Peak resident memory of this process, MiB (Linux; `None` elsewhere).
    pub peak_rss_mb: Option<f64>,
    /// Elastic membership (`[membership]`): coordinators, epochs, rejoined ranks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub membership: Option<MembershipReport>,
    /// The semi-synchronous protocol's collectives (`kind = "semisync"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub semisync: Option<SemisyncReport>,
    /// Every completed step (not in the JSON; the plot draws it).
    #[serde(skip)]
    pub steps: Vec<StepPoint>,
    /// `(kind, start s)` of every fault injected (not in the JSON; the plot marks them).
    #[serde(skip)]
    pub fault_marks: Vec<(String, f64)>,
}

/// Peak resident set size of this process (`VmHWM`), MiB.
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

impl Report {
    /// Whether the run kept every promise: nothing hung, no wrong result, nothing lost.
    pub fn clean(&self) -> bool {
        self.collectives.hung == 0 && self.collectives.wrong_results == 0 && self.contributions.lost == 0
    }

    /// A short human summary table.
    pub fn summary(&self) -> String {
        let c = &self.collectives;
        let k = &self.contributions;
        let faults: Vec<String> = self.faults_injected.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.3}"));
        let rows = [
            ("scenario", format!("{} (seed {}, {} ranks)", self.scenario, self.seed, self.ranks)),
            ("simulated", format!("{:.3} s in {:.2} s wall, {} events ({:.0}/s)", self.sim_time_s, self.wall_time_s, self.events, self.events_per_s)),
            ("steps", format!("{} of {} ({} fast-forwarded)", self.steps_completed, self.steps_target, self.fast_forwarded_steps)),
            ("collectives", format!("{} completed, {} failed, {} hung, {} wrong, {} in flight", c.completed, c.failed, c.hung, c.wrong_results, c.in_flight)),
            ("contributions", format!("{} offered: {} applied, {} late, {} dropped (reported), {} pending, {} died with their rank, {} lost", k.offered, k.applied, k.late, k.dropped_reported, k.pending, k.died_with_rank, k.lost)),
            ("faults", if faults.is_empty() { "none".into() } else { faults.join(", ") }),
            ("goodput", format!("{:.4}", self.goodput)),
            ("recovery", format!("p50 {} s, max {} s ({} faults)", opt(self.recovery_s.p50), opt(self.recovery_s.max), self.recovery_s.count)),
            ("network", format!("{} messages, {:.3} GB, {} corrupted frames, {} relayed", self.network.messages, self.network.bytes as f64 / 1e9, self.network.corrupted_frames, self.network.relayed_messages)),
            ("memory", self.peak_rss_mb.map_or("-".into(), |m| format!("{m:.0} MiB peak"))),
            ("trace_hash", self.trace_hash.clone()),
        ];
        let mut rows = rows.to_vec();
        if let Some(m) = &self.membership {
            let readmission: Vec<String> = m.readmission_s.iter().map(|t| format!("{t:.2} s")).collect();
            rows.insert(
                rows.len() - 2,
                (
                    "membership",
                    format!(
                        "epoch {}, {} members; coordinators {}/{} up, {} leader changes, {} crashes; {} failures \
                         reported; {} of {} restarted ranks readmitted ({})",
                        m.epochs,
                        m.members_at_end,
                        m.coordinators_up_at_end,
                        m.coordinators,
                        m.leader_changes,
                        m.coordinator_crashes,
                        m.failures_reported,
                        m.ranks_readmitted,
                        m.ranks_restarted,
                        readmission.join(", ")
                    ),
                ),
            );
        }
        let mut out = String::new();
        for (k, v) in rows {
            out.push_str(&format!("  {k:<14} {v}\n"));
        }
        out
    }
}
