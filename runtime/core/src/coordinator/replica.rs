//! One coordinator: raft-rs's `RawNode` over [`LogStore`], the [`ReplicatedState`] it applies,
//! and the client protocol, as a sans-IO state machine.
//!
//! The driver feeds it ticks (from its clock), peer messages and client requests, calls
//! [`Coordinator::process`], and drains [`Coordinator::poll_peer`] and
//! [`Coordinator::poll_client`]. `process` writes the log through the [`DurableLog`] seam and
//! syncs it *before* releasing any message that acknowledges the write (votes, append
//! responses) and before any client reply, so an acknowledged command survives any crash of a
//! minority.

use std::collections::{BTreeMap, VecDeque};
use std::io;

use bytes::Buf;
use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType, Message};
use raft::{RawNode, StateRole, Storage};
use rand::{Rng, SeedableRng};
use thiserror::Error;
use tracing::{debug, info, warn};

use super::log_store::{DurableLog, LogStore, Recovered};
use super::state::{entry_context, ReplicatedState};
use super::wire::{ClientReply, ClientRequest, ReplyBody, RequestBody};
use crate::membership::{self, ClusterView, Command, DecodeError, RankStatus};

/// How a coordinator runs.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// This coordinator's id (non-zero).
    pub id: u64,
    /// The voting coordinators (1, 3 or 5), this one among them, when the log holds no
    /// snapshot that says otherwise.
    pub voters: Vec<u64>,
    /// Non-voting coordinators: they receive and apply the log (a warm standby, or a replica
    /// near a far data centre) but neither vote nor count toward a majority.
    pub learners: Vec<u64>,
    /// Ticks without a leader before a follower campaigns; each term adds a seeded random
    /// 0..election_ticks/2 on top, so two followers rarely campaign together.
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied entries after which the log is compacted into a snapshot.
    pub snapshot_after: u64,
    /// Seed of the election jitter.
    pub seed: u64,
    /// The leader's failure detector: a rank of the view not heard from (heartbeats) for this
    /// many ticks is declared failed through the log. 0 turns the detector off.
    pub failure_ticks: u64,
}

impl CoordinatorConfig {
    /// Defaults for a coordinator in a group of `voters`: election after 10 ticks (+0..5),
    /// heartbeat every 2, a snapshot every 1,024 entries.
    pub fn new(id: u64, voters: Vec<u64>) -> CoordinatorConfig {
        CoordinatorConfig {
            id,
            voters,
            learners: Vec::new(),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_after: 1024,
            seed: id,
            failure_ticks: 0,
        }
    }
}

/// Why a coordinator stopped. After any of these the process must stop (and may restart from
/// its log): its in-memory state can no longer be trusted to match what is on disk.
#[derive(Debug, Error)]
pub enum CoordinatorError {
    /// The configuration cannot run.
    #[error("coordinator {id}: bad configuration: {reason}")]
    Config {
        /// The coordinator.
        id: u64,
        /// What is wrong.
        reason: String,
    },
    /// Raft refused the recovered state or a step it must take.
    #[error("coordinator {id}: raft: {source}")]
    Raft {
        /// The coordinator.
        id: u64,
        /// raft-rs's error.
        #[source]
        source: raft::Error,
    },
    /// Writing or syncing the log failed.
    #[error("coordinator {id}: stable storage failed: {source}")]
    Durable {
        /// The coordinator.
        id: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A snapshot's state machine bytes do not decode.
    #[error("coordinator {id}: snapshot at index {index} is unreadable: {source}")]
    Snapshot {
        /// The coordinator.
        id: u64,
        /// The snapshot's index.
        index: u64,
        /// Why.
        #[source]
        source: DecodeError,
    },
}

/// A peer message that was refused (the coordinator carries on).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PeerMessageError {
    /// Not a Raft message.
    #[error("message from coordinator {from} is not a raft message: {reason}")]
    Malformed {
        /// The transport peer.
        from: u64,
        /// The parser's complaint.
        reason: String,
    },
    /// The message names another sender or receiver than the link it came on.
    #[error("message on the link from {from} claims to be from {claimed} to {to}")]
    Misaddressed {
        /// The transport peer.
        from: u64,
        /// The sender it names.
        claimed: u64,
        /// The receiver it names.
        to: u64,
    },
}

/// One coordinator of the group.
pub struct Coordinator<L: DurableLog> {
    id: u64,
    raw: RawNode<LogStore>,
    log: L,
    state: ReplicatedState,
    applied: u64,
    snapshot_after: u64,
    election_ticks: usize,
    rng: rand_chacha::ChaCha8Rng,
    held_ticks: usize,
    seen_term: u64,
    leader: u64,
    /// Proposals this coordinator accepted, by (client, request), with the peer to answer.
    waiting: BTreeMap<(u64, u64), u64>,
    /// ReadIndex requests in flight, by sequence number: (peer, request).
    reads: BTreeMap<u64, (u64, u64)>,
    next_read: u64,
    /// Reads whose index is known, waiting for the apply point to reach it.
    ready_reads: Vec<(u64, u64, u64)>,
    out_peer: VecDeque<(u64, Bytes)>,
    out_client: VecDeque<(u64, Bytes)>,
    detector: FailureDetector,
    /// Take a snapshot at the next chance (the group's configuration changed).
    snapshot_now: bool,
}

/// The leader's failure detector (soft state: a new leader starts it afresh, giving every rank
/// a full timeout from its election).
#[derive(Debug, Default)]
struct FailureDetector {
    timeout: u64,
    ticks: u64,
    /// When the detector (re)started: ranks never heard from count from here.
    since: u64,
    last_heard: BTreeMap<u32, u64>,
    /// Ranks whose failure was proposed and not yet seen applied.
    reported: BTreeMap<u32, u64>,
}

impl<L: DurableLog> Coordinator<L> {
    /// A coordinator resuming from `recovered` (empty for a new one), writing to `log`.
    pub fn new(config: CoordinatorConfig, recovered: Recovered, log: L) -> Result<Coordinator<L>, CoordinatorError> {
        let id = config.id;
        let member = config.voters.contains(&id) || config.learners.contains(&id);
        let overlap = config.learners.iter().any(|l| config.voters.contains(l));
        if id == 0 || !member || overlap || config.election_ticks <= config.heartbeat_ticks {
            return Err(CoordinatorError::Config {
                id,
                reason: format!(
                    "id must be non-zero and among the voters {:?} or learners {:?} (not both); election ticks ({}) must exceed heartbeat ticks ({})",
                    config.voters, config.learners, config.election_ticks, config.heartbeat_ticks
                ),
            });
        }
        let (state, applied) = match &recovered.snapshot {
            Some(s) => {
                let index = s.get_metadata().index;
                let state = ReplicatedState::decode(&s.data).map_err(|source| CoordinatorError::Snapshot {
                    id,
                    index,
                    source,
                })?;
                (state, index)
            }
            None => (ReplicatedState::new(), 0),
        };
        let store = LogStore::new(&recovered, &config.voters, &config.learners);
        let raft_config = raft::Config {
            id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            // raft-rs draws its own jitter from an unseeded RNG: pin it, ours is seeded.
            min_election_tick: config.election_ticks,
            max_election_tick: config.election_ticks + 1,
            applied,
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&raft_config, store, &logger).map_err(|source| CoordinatorError::Raft { id, source })?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.seed);
        let held_ticks = rng.random_range(0..=config.election_ticks / 2);
        info!(id, applied, term = raw.raft.term, "coordinator started");
        Ok(Coordinator {
            id,
            seen_term: raw.raft.term,
            raw,
            log,
            state,
            applied,
            snapshot_after: config.snapshot_after.max(1),
            election_ticks: config.election_ticks,
            rng,
            held_ticks,
            leader: 0,
            waiting: BTreeMap::new(),
            reads: BTreeMap::new(),
            next_read: 0,
            ready_reads: Vec::new(),
            out_peer: VecDeque::new(),
            out_client: VecDeque::new(),
            detector: FailureDetector { timeout: config.failure_ticks, ..Default::default() },
            snapshot_now: false,
        })
    }

    /// This coordinator's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The leader this coordinator knows of.
    pub fn leader(&self) -> Option<u64> {
        (self.leader != 0).then_some(self.leader)
    }

    /// Whether this coordinator leads.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The current Raft term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The last applied log index.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The view as applied here (not linearizable on its own: a follower may lag; clients
    /// read through [`RequestBody::Read`]).
    pub fn view(&self) -> &ClusterView {
        self.state.view()
    }

    /// The durable log.
    pub fn log(&self) -> &L {
        &self.log
    }

    /// The entry at `index` still in the in-memory log (tests compare logs across replicas).
    pub fn entry(&self, index: u64) -> Option<Entry> {
        self.raw.store().entries(index, index + 1, None, raft::GetEntriesContext::empty(false)).ok()?.pop()
    }

    /// One tick of the driver's clock. A follower holds back a seeded random number of ticks
    /// per term before they count toward its election timeout.
    pub fn tick(&mut self) {
        self.detector.ticks += 1;
        if self.raw.raft.state != StateRole::Leader {
            if self.held_ticks > 0 {
                self.held_ticks -= 1;
                return;
            }
        } else {
            self.detect_failures();
        }
        self.raw.tick();
    }

    /// Ranks silent past the timeout are proposed failed (`reporter == rank`: the detector's
    /// verdict); a proposal lost with a leader change is made again by the next leader.
    fn detect_failures(&mut self) {
        let d = &mut self.detector;
        if d.timeout == 0 {
            return;
        }
        let view = self.state.view();
        let epoch = view.epoch();
        let mut silent = Vec::new();
        for (rank, m) in view.ranks() {
            if m.status == RankStatus::Failed {
                d.reported.remove(&rank);
                continue;
            }
            let last = d.last_heard.get(&rank).copied().unwrap_or(d.since).max(d.since);
            let retry = d.reported.get(&rank).is_none_or(|at| d.ticks >= at + d.timeout);
            if d.ticks.saturating_sub(last) > d.timeout && retry {
                silent.push(rank);
            }
        }
        for rank in silent {
            warn!(id = self.id, rank, epoch, silent_ticks = self.detector.timeout, "rank silent: proposing it failed");
            let data = membership::encode(&Command::ReportFailure { rank, reporter: rank, epoch }).to_vec();
            if self.raw.propose(Vec::new(), data).is_ok() {
                self.detector.reported.insert(rank, self.detector.ticks);
            }
        }
    }

    /// A Raft message from coordinator `from` (already authenticated by the transport).
    pub fn handle_peer(&mut self, from: u64, bytes: &[u8]) -> Result<(), PeerMessageError> {
        let m = Message::parse_from_bytes(bytes)
            .map_err(|e| PeerMessageError::Malformed { from, reason: e.to_string() })?;
        if m.from != from || m.to != self.id {
            return Err(PeerMessageError::Misaddressed { from, claimed: m.from, to: m.to });
        }
        if let Err(e) = self.raw.step(m) {
            debug!(id = self.id, from, error = %e, "raft ignored a message");
        }
        Ok(())
    }

    /// The transport has no route to coordinator `id`: Raft stops streaming entries to it and
    /// probes until it answers again.
    pub fn report_unreachable(&mut self, id: u64) {
        self.raw.report_unreachable(id);
    }

    /// A client request arriving from transport peer `peer`; the answer goes back to `peer`
    /// through [`Coordinator::poll_client`].
    pub fn handle_client(&mut self, peer: u64, bytes: &[u8]) {
        let req = match ClientRequest::decode(bytes) {
            Ok(r) => r,
            Err(e) => {
                warn!(id = self.id, peer, error = %e, "malformed client request refused");
                self.reply(peer, 0, ReplyBody::Refused { reason: format!("malformed request: {e}") });
                return;
            }
        };
        if !self.is_leader() {
            self.reply(peer, req.request, ReplyBody::NotLeader { leader: self.leader() });
            return;
        }
        match req.body {
            RequestBody::Propose(command) => {
                let data = membership::encode(&command).to_vec();
                match self.raw.propose(entry_context(req.client, req.request), data) {
                    Ok(()) => {
                        self.waiting.insert((req.client, req.request), peer);
                    }
                    Err(e) => {
                        debug!(id = self.id, error = %e, "proposal dropped");
                        self.reply(peer, req.request, ReplyBody::NotLeader { leader: self.leader() });
                    }
                }
            }
            RequestBody::Heartbeat { rank, incarnation, epoch: _ } => {
                let view = self.state.view();
                let fenced =
                    view.rank(rank).is_none_or(|m| m.status == RankStatus::Failed || m.incarnation != incarnation);
                if !fenced {
                    self.detector.last_heard.insert(rank, self.detector.ticks);
                }
                let body = ReplyBody::Status { epoch: view.epoch(), fenced, change_pending: view.change_pending() };
                self.reply(peer, req.request, body);
            }
            RequestBody::AddLearner { id } => {
                let cc = ConfChange { change_type: ConfChangeType::AddLearnerNode, node_id: id, ..Default::default() };
                match self.raw.propose_conf_change(entry_context(req.client, req.request), cc) {
                    Ok(()) => {
                        self.waiting.insert((req.client, req.request), peer);
                    }
                    Err(e) => {
                        let reason = format!("configuration change refused: {e}");
                        self.reply(peer, req.request, ReplyBody::Refused { reason });
                    }
                }
            }
            RequestBody::Read => {
                self.next_read += 1;
                self.reads.insert(self.next_read, (peer, req.request));
                self.raw.read_index(self.next_read.to_le_bytes().to_vec());
            }
        }
    }

    /// Runs raft's Ready loop until nothing is left: persists and syncs, releases messages,
    /// applies committed entries, answers clients, compacts the log.
    pub fn process(&mut self) -> Result<(), CoordinatorError> {
        let id = self.id;
        let durable = |source| CoordinatorError::Durable { id, source };
        while self.raw.has_ready() {
            let mut rd = self.raw.ready();
            if let Some(ss) = rd.ss() {
                self.on_role(ss.leader_id, ss.raft_state);
            }
            for m in rd.take_messages() {
                self.send_peer(m);
            }
            let mut wrote = false;
            if !rd.snapshot().is_empty() {
                let snap = rd.snapshot().clone();
                let index = snap.get_metadata().index;
                let state = ReplicatedState::decode(&snap.data).map_err(|source| CoordinatorError::Snapshot {
                    id,
                    index,
                    source,
                })?;
                self.log.save_snapshot(&snap).map_err(durable)?;
                self.raw.mut_store().install(&snap);
                self.state = state;
                self.applied = index;
                info!(id, index, "installed a snapshot from the leader");
                wrote = true;
            }
            let committed = rd.take_committed_entries();
            self.apply(committed);
            let entries = rd.take_entries();
            if !entries.is_empty() {
                self.log.append(&entries).map_err(durable)?;
                self.raw.mut_store().append(&entries);
                wrote = true;
            }
            if let Some(hs) = rd.hs() {
                self.log.save_hard_state(hs).map_err(durable)?;
                self.raw.mut_store().set_hard_state(hs.clone());
                wrote = true;
            }
            if wrote {
                self.log.sync().map_err(durable)?;
            }
            for m in rd.take_persisted_messages() {
                self.send_peer(m);
            }
            for rs in rd.take_read_states() {
                let seq = rs.request_ctx.as_slice().try_into().map(u64::from_le_bytes).unwrap_or(0);
                if let Some((peer, request)) = self.reads.remove(&seq) {
                    self.ready_reads.push((rs.index, peer, request));
                }
            }
            let mut light = self.raw.advance(rd);
            if let Some(commit) = light.commit_index() {
                self.raw.mut_store().set_commit(commit);
            }
            for m in light.take_messages() {
                self.send_peer(m);
            }
            let committed = light.take_committed_entries();
            self.apply(committed);
            self.raw.advance_apply();
            self.serve_reads();
            self.compact()?;
        }
        if self.raw.raft.term != self.seen_term {
            self.seen_term = self.raw.raft.term;
            self.held_ticks = self.rng.random_range(0..=self.election_ticks / 2);
        }
        Ok(())
    }

    /// The next Raft message to send: (coordinator id, bytes).
    pub fn poll_peer(&mut self) -> Option<(u64, Bytes)> {
        self.out_peer.pop_front()
    }

    /// The next client reply to send: (transport peer, bytes).
    pub fn poll_client(&mut self) -> Option<(u64, Bytes)> {
        self.out_client.pop_front()
    }

    fn on_role(&mut self, leader: u64, role: StateRole) {
        if leader != self.leader {
            info!(id = self.id, term = self.raw.raft.term, leader, ?role, "leader changed");
        }
        self.leader = leader;
        if role == StateRole::Leader {
            // A new leader gives every rank a full timeout before judging it.
            self.detector.since = self.detector.ticks;
            self.detector.last_heard.clear();
            self.detector.reported.clear();
        } else {
            // Proposals and reads accepted as leader may never complete here: send the clients
            // to the new leader (a retried command is applied once, by its session).
            let hint = self.leader();
            for ((_, request), peer) in std::mem::take(&mut self.waiting) {
                self.reply(peer, request, ReplyBody::NotLeader { leader: hint });
            }
            for (_, (peer, request)) in std::mem::take(&mut self.reads) {
                self.reply(peer, request, ReplyBody::NotLeader { leader: hint });
            }
            for (_, peer, request) in std::mem::take(&mut self.ready_reads) {
                self.reply(peer, request, ReplyBody::NotLeader { leader: hint });
            }
        }
    }

    fn send_peer(&mut self, m: Message) {
        match m.write_to_bytes() {
            Ok(b) => self.out_peer.push_back((m.to, Bytes::from(b))),
            Err(e) => warn!(id = self.id, error = %e, "raft message did not encode"),
        }
    }

    fn reply(&mut self, peer: u64, request: u64, body: ReplyBody) {
        self.out_client.push_back((peer, ClientReply { request, body }.encode()));
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            self.applied = e.index;
            if e.get_entry_type() == EntryType::EntryConfChange {
                self.apply_conf_change(&e);
                continue;
            }
            if e.get_entry_type() != EntryType::EntryNormal {
                continue;
            }
            if let Some(a) = self.state.apply_entry(e.index, &e.context, &e.data) {
                // A rank that just joined has not had the time to heartbeat: its silence
                // counts from its join, not from when this detector started.
                if let Ok(membership::Outcome::Joined { rank, .. }) = &a.result {
                    self.detector.last_heard.insert(*rank, self.detector.ticks);
                    self.detector.reported.remove(rank);
                }
                if let Some(peer) = self.waiting.remove(&(a.client, a.request)) {
                    self.reply(peer, a.request, ReplyBody::Applied { index: e.index, result: a.result });
                }
            }
        }
    }

    /// A committed configuration change (a learner added): the group's membership changes
    /// here, in log order, on every coordinator alike.
    fn apply_conf_change(&mut self, e: &Entry) {
        let cc = match ConfChange::parse_from_bytes(&e.data) {
            Ok(cc) => cc,
            Err(err) => {
                warn!(id = self.id, index = e.index, error = %err, "undecodable configuration change: skipped");
                return;
            }
        };
        match self.raw.apply_conf_change(&cc) {
            Ok(cs) => {
                info!(id = self.id, index = e.index, voters = ?cs.voters, learners = ?cs.learners, "group configuration changed");
                self.raw.mut_store().set_conf_state(cs.clone());
                // A snapshot sent to a new member must name it: take one now.
                self.snapshot_now = true;
                let mut c = &e.context[..];
                if c.len() == 16 {
                    let (client, request) = (c.get_u64_le(), c.get_u64_le());
                    if let Some(peer) = self.waiting.remove(&(client, request)) {
                        let body = ReplyBody::Configured { index: e.index, voters: cs.voters, learners: cs.learners };
                        self.reply(peer, request, body);
                    }
                }
            }
            Err(err) => warn!(id = self.id, index = e.index, error = %err, "configuration change not applied"),
        }
    }

    fn serve_reads(&mut self) {
        if self.ready_reads.is_empty() {
            return;
        }
        let applied = self.applied;
        let (due, later): (Vec<_>, Vec<_>) = self.ready_reads.drain(..).partition(|(i, _, _)| *i <= applied);
        self.ready_reads = later;
        for (_, peer, request) in due {
            self.reply(peer, request, ReplyBody::View { index: applied, view: self.state.view().clone() });
        }
    }

    fn compact(&mut self) -> Result<(), CoordinatorError> {
        let id = self.id;
        let base = self.raw.store().snapshot_ref().get_metadata().index;
        if self.applied <= base || (self.applied < base + self.snapshot_after && !self.snapshot_now) {
            return Ok(());
        }
        self.snapshot_now = false;
        let Some(snap) = self.raw.store().snapshot_at(self.applied, self.state.encode()) else {
            return Ok(());
        };
        self.log.save_snapshot(&snap).map_err(|source| CoordinatorError::Durable { id, source })?;
        self.log.sync().map_err(|source| CoordinatorError::Durable { id, source })?;
        self.raw.mut_store().install(&snap);
        debug!(id, index = self.applied, "log compacted into a snapshot");
        Ok(())
    }
}
