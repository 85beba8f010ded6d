//! Elastic membership in the simulator (`[membership]`): the real coordinator replicas —
//! `phalanx_runtime::coordinator::Coordinator`, raft-rs over a [`MemoryLog`] — run under
//! virtual time on hosts of the fabric; their Raft messages and the ranks' requests and replies
//! travel with the fabric's latency between hosts (dropped where a partition or a dead link
//! leaves no route). A coordinator that crashes loses what its log had not synced and restarts
//! from the rest; the others elect a leader as they would in production.
//!
//! The rank side runs the real protocols of `phalanx_runtime::membership`, as
//! `phalanx_node::elastic::ElasticMember` drives them in production: every member runs
//! [`BoundaryPlan`] every `boundary_every` steps (view reads and proposals through its own
//! client; the agreement, step sync and admission barrier as real collectives on its group), and
//! a restarted process (`crash` with `restart_after_s`, or a fenced or departed rank) sends
//! `Join` and runs [`AdmissionPlan`] (reads the view every 50 ms until it is a member, syncs the
//! step, recovers `state_bytes` from up to four members — flows of the fabric, its own data
//! centre first — and enters through the barrier). Modelled rather than run: the moment of the
//! rebuild — the groups of a new epoch are formed for every member at once, when the last live
//! member asks, and the old epoch's messages are dropped. Requests go to one coordinator at a
//! time: a "not leader" answer redirects, silence for `client_retry_ms` moves on to the next
//! one, and a retried request keeps its (client, request) id so the log applies it once.

use std::collections::VecDeque;

use bytes::Bytes;
use phalanx_collectives::group::{AllReduceAlgorithm, CallOptions, FaultPolicy, Finished, Op};
use phalanx_collectives::reduce::{DType, ReduceOp};
use phalanx_runtime::coordinator::wire::{ClientReply, ClientRequest, ReplyBody, RequestBody};
use phalanx_runtime::coordinator::{
    entry_context, eraftpb, Coordinator, CoordinatorConfig, DurableLog, MemoryLog, Recovered, ReplicatedState,
};
use phalanx_runtime::membership::{
    self, AdmissionAction, AdmissionInput, AdmissionPlan, BoundaryAction, BoundaryInput, BoundaryOutcome, BoundaryPlan,
    ClusterView, Command, Outcome, ViewError,
};
use sha2::{Digest, Sha256};

use super::{Ev, FlowOwner, Sim, Stage, WorkloadKind, MS, SEC};
use crate::report::MembershipReport;
use crate::scenario::MembershipSpec;

/// A collective of the boundary protocol or of a joiner's admission, on the group of all
/// members.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MemberCall {
    /// The plan's agreement (epoch, then step): all-reduce max.
    Agree,
    /// The plan's admission barrier.
    Barrier,
    /// A joiner syncs the step with the group.
    JoinSync,
    /// A joiner, with its state, enters through the admission barrier.
    JoinBarrier,
}

/// Who sent a message to a coordinator.
#[derive(Clone, Copy, Debug)]
pub(super) enum Sender {
    /// Coordinator (index).
    Coordinator(usize),
    /// A rank's client (its id).
    Client(u64),
}

/// The membership state of a run.
pub(super) struct Membership {
    spec: MembershipSpec,
    tick_ns: u64,
    coords: Vec<CoordSlot>,
    clients: Vec<Client>,
    /// Sim slots of the current epoch's members, in the view's order (the groups' indices).
    members: Vec<usize>,
    /// Their rank ids in the view.
    member_ids: Vec<u32>,
    /// Each slot's rank id in the view (its current incarnation's; `None` until it joined).
    ids: Vec<Option<u32>>,
    /// A new epoch's view a member read, whose groups are not formed yet.
    pending_view: Option<ClusterView>,
    /// Joiners of the new epoch still recovering the state: flows left, per slot.
    recovering: Vec<(usize, usize)>,
    /// When each slot's process restarted (for the readmission time).
    restarted_at: Vec<Option<u64>>,
    leader: Option<usize>,
    /// Which coordinator each coordinator-crash fault (by index) took down.
    pub(super) crashed_by_fault: Vec<(usize, usize)>,
    pub(super) report: MembershipReport,
}

impl Membership {
    /// Coordinator `i` stops: only its synced log survives, and what its incarnation armed
    /// (ticks, replies) is void. Whether it was running.
    fn down(&mut self, i: usize) -> bool {
        let c = &mut self.coords[i];
        let Some(node) = c.node.take() else { return false };
        c.disk = node.log().clone();
        c.incarnation += 1;
        true
    }
}

struct CoordSlot {
    node: Option<Coordinator<MemoryLog>>,
    /// What survives a crash.
    disk: MemoryLog,
    host: usize,
    incarnation: u64,
}

/// A rank's coordinator client: one request in flight at a time, in order.
struct Client {
    id: u64,
    next_request: u64,
    target: usize,
    queue: VecDeque<(u64, RequestBody)>,
    /// Sends of the head request (a retry timer names the attempt it guards).
    attempt: u64,
}

impl Client {
    fn new(slot: usize, incarnation: u64) -> Client {
        Client { id: client_id(slot, incarnation), next_request: 1, target: 0, queue: VecDeque::new(), attempt: 0 }
    }
}

/// Client ids: above every coordinator id, naming the slot and incarnation.
fn client_id(slot: usize, incarnation: u64) -> u64 {
    (1 << 40) | (slot as u64) << 16 | (incarnation & 0xffff)
}

fn slot_of_client(id: u64) -> usize {
    ((id & !(1 << 40)) >> 16) as usize
}

/// The host name a slot's process joins with (the view maps ids to processes by it).
fn host_name(slot: usize) -> String {
    format!("sim-slot-{slot}")
}

impl<'a> Sim<'a> {
    /// Boots the coordinators with every rank joined and epoch 1 begun (as if the job had
    /// started), ticking from time 0.
    pub(super) fn membership_start(&mut self, spec: &MembershipSpec) {
        let world = self.world;
        let per_host = self.sc.topology.ranks_per_host;
        let mut state = ReplicatedState::new();
        let mut index = 0;
        let mut apply = |state: &mut ReplicatedState, c: Command| {
            index += 1;
            state.apply_entry(index, &entry_context(0, index), &membership::encode(&c));
        };
        for r in 0..world {
            let dc = self.fabric.dc_of_host(r / per_host) as u32;
            apply(&mut state, join(r, dc, 1));
        }
        apply(&mut state, Command::BeginEpoch { expected: 0 });
        let n = spec.coordinators;
        let voters: Vec<u64> = (1..=n as u64).collect();
        let mut snapshot = eraftpb::Snapshot::default();
        snapshot.mut_metadata().index = index;
        snapshot.mut_metadata().term = 1;
        snapshot.mut_metadata().mut_conf_state().voters = voters.clone();
        snapshot.data = state.encode().into();
        let hosts = self.fabric.hosts();
        let mut coords = Vec::with_capacity(n);
        for i in 0..n {
            let mut disk = MemoryLog::new();
            let hard_state = eraftpb::HardState { term: 1, commit: index, ..Default::default() };
            let booted = disk.save_snapshot(&snapshot).and_then(|_| disk.save_hard_state(&hard_state));
            let booted = booted.and_then(|_| disk.sync());
            debug_assert!(booted.is_ok(), "a memory log does not fail");
            coords.push(CoordSlot { node: None, disk, host: i * hosts / n, incarnation: 0 });
        }
        let tick_ns = ((spec.tick_ms * MS) as u64).max(1);
        self.membership = Some(Membership {
            spec: spec.clone(),
            tick_ns,
            coords,
            clients: (0..world).map(|s| Client::new(s, 1)).collect(),
            members: (0..world).collect(),
            member_ids: (0..world as u32).collect(),
            ids: (0..world as u32).map(Some).collect(),
            pending_view: None,
            recovering: Vec::new(),
            restarted_at: vec![None; world],
            leader: None,
            crashed_by_fault: Vec::new(),
            report: MembershipReport { coordinators: n, epochs: 1, members_at_end: world, ..Default::default() },
        });
        for i in 0..n {
            self.coordinator_boot(i);
        }
    }

    fn coordinator_config(&self, i: usize, incarnation: u64) -> CoordinatorConfig {
        let Some(m) = self.membership.as_ref() else { unreachable!("membership runs") };
        let n = m.coords.len() as u64;
        let mut c = CoordinatorConfig::new(i as u64 + 1, (1..=n).collect());
        c.election_ticks = m.spec.election_ticks;
        c.heartbeat_ticks = (m.spec.election_ticks / 5).max(1);
        // Seeded from the run's seed, the replica and its incarnation: a restarted replica
        // draws a new election jitter, the same on every run with this seed.
        let h = Sha256::digest(format!("{}/{i}/{incarnation}", self.seed).as_bytes());
        c.seed = u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
        c
    }

    /// Starts coordinator `i` from what its disk holds, as a new incarnation.
    fn coordinator_boot(&mut self, i: usize) {
        let incarnation = {
            let Some(m) = self.membership.as_mut() else { return };
            m.coords[i].incarnation += 1;
            m.coords[i].incarnation
        };
        let config = self.coordinator_config(i, incarnation);
        let Some(m) = self.membership.as_mut() else { return };
        let disk = m.coords[i].disk.clone();
        let recovered: Recovered = disk.recover();
        match Coordinator::new(config, recovered, disk) {
            Ok(node) => m.coords[i].node = Some(node),
            Err(e) => {
                tracing::warn!(coordinator = i, error = %e, "coordinator cannot start");
                return;
            }
        }
        let at = self.now + m.tick_ns;
        self.push(at, Ev::CoordTick { coordinator: i as u32, incarnation });
    }

    /// Fault: coordinator `which` (the leader of the moment if `None`) dies; its synced log
    /// survives.
    pub(super) fn coordinator_crash(&mut self, which: Option<usize>) -> Option<usize> {
        let m = self.membership.as_mut()?;
        let i = which.or(m.leader).unwrap_or(0);
        if !m.down(i) {
            return None;
        }
        m.report.coordinator_crashes += 1;
        tracing::debug!(t = self.now as f64 / SEC, coordinator = i, "coordinator crashed");
        if m.leader == Some(i) {
            m.leader = None;
        }
        Some(i)
    }

    /// Fault end: coordinator `i` restarts from its disk.
    pub(super) fn coordinator_restart(&mut self, i: usize) {
        let Some(m) = self.membership.as_mut() else { return };
        if m.coords[i].node.is_some() {
            return;
        }
        m.report.coordinator_restarts += 1;
        self.coordinator_boot(i);
    }

    pub(super) fn coordinator_tick(&mut self, i: usize, incarnation: u64) {
        let Some(m) = self.membership.as_mut() else { return };
        let c = &mut m.coords[i];
        if c.incarnation != incarnation {
            return;
        }
        let Some(node) = c.node.as_mut() else { return };
        node.tick();
        let at = self.now + m.tick_ns;
        self.push(at, Ev::CoordTick { coordinator: i as u32, incarnation });
        self.coordinator_process(i);
    }

    pub(super) fn coordinator_receive(&mut self, i: usize, from: Sender, bytes: Bytes) {
        let Some(m) = self.membership.as_mut() else { return };
        let Some(node) = m.coords[i].node.as_mut() else { return };
        match from {
            Sender::Coordinator(f) => {
                if let Err(e) = node.handle_peer(f as u64 + 1, &bytes) {
                    tracing::warn!(coordinator = i, error = %e, "peer message refused");
                }
            }
            Sender::Client(id) => node.handle_client(id, &bytes),
        }
        self.coordinator_process(i);
    }

    /// Runs coordinator `i`'s Ready loop and sends what it produced.
    fn coordinator_process(&mut self, i: usize) {
        let Some(m) = self.membership.as_mut() else { return };
        let Some(node) = m.coords[i].node.as_mut() else { return };
        if let Err(e) = node.process() {
            // The process would exit: a crash.
            tracing::warn!(coordinator = i, error = %e, "coordinator stopped");
            m.down(i);
            return;
        }
        let mut peers = Vec::new();
        while let Some((to, bytes)) = node.poll_peer() {
            peers.push((to, bytes));
        }
        let mut clients = Vec::new();
        while let Some((to, bytes)) = node.poll_client() {
            clients.push((to, bytes));
        }
        if node.is_leader() && m.leader != Some(i) {
            if m.report.leaders_elected > 0 || m.leader.is_some() {
                m.report.leader_changes += 1;
            }
            m.report.leaders_elected += 1;
            m.leader = Some(i);
            tracing::debug!(t = self.now as f64 / SEC, coordinator = i, "coordinator leads");
        } else if !node.is_leader() && m.leader == Some(i) {
            m.leader = None;
        }
        let from_host = m.coords[i].host;
        let hosts: Vec<usize> = m.coords.iter().map(|c| c.host).collect();
        m.report.coordinator_messages += peers.len() as u64;
        for (to, bytes) in peers {
            let Some(j) = (to as usize).checked_sub(1).filter(|j| *j < hosts.len()) else { continue };
            if let Some(at) = self.latency(from_host, hosts[j]) {
                self.push(self.now + at, Ev::ToCoordinator { to: j as u32, from: Sender::Coordinator(i), bytes });
            }
        }
        for (to, bytes) in clients {
            let slot = slot_of_client(to);
            if slot >= self.world {
                continue;
            }
            let host = self.fabric.host_of(slot);
            if let Some(at) = self.latency(from_host, host) {
                let incarnation = to & 0xffff;
                self.push(self.now + at, Ev::ToRank { slot: slot as u32, incarnation, bytes });
            }
        }
    }

    /// One-way latency between two hosts (`None`: no route now, the message is lost).
    fn latency(&self, a: usize, b: usize) -> Option<u64> {
        self.fabric.route(a, b).map(|r| r.latency_ns.max(1))
    }

    // ---- a rank's client ----

    fn submit(&mut self, slot: usize, body: RequestBody) {
        let Some(m) = self.membership.as_mut() else { return };
        let c = &mut m.clients[slot];
        let request = c.next_request;
        c.next_request += 1;
        c.queue.push_back((request, body));
        if c.queue.len() == 1 {
            self.client_send(slot);
        }
    }

    /// Sends the head request of `slot`'s client to its target and arms the retry timer.
    fn client_send(&mut self, slot: usize) {
        let Some(m) = self.membership.as_mut() else { return };
        let c = &mut m.clients[slot];
        let Some((request, body)) = c.queue.front().cloned() else { return };
        c.attempt += 1;
        let (id, target, attempt) = (c.id, c.target, c.attempt);
        m.report.client_requests += 1;
        let bytes = ClientRequest { client: id, request, body }.encode();
        let retry = (m.spec.client_retry_ms * MS) as u64;
        let host = m.coords[target].host;
        let incarnation = id & 0xffff;
        if let Some(at) = self.latency(self.fabric.host_of(slot), host) {
            self.push(self.now + at, Ev::ToCoordinator { to: target as u32, from: Sender::Client(id), bytes });
        }
        self.push(self.now + retry, Ev::ClientRetry { slot: slot as u32, incarnation, attempt, rotate: true });
    }

    /// No answer in time (or no leader known): ask again, the next coordinator if `rotate`.
    pub(super) fn client_retry(&mut self, slot: usize, incarnation: u64, attempt: u64, rotate: bool) {
        let Some(m) = self.membership.as_mut() else { return };
        if !self.ranks[slot].alive || self.ranks[slot].incarnation != incarnation {
            return;
        }
        let c = &mut m.clients[slot];
        if c.attempt != attempt || c.queue.is_empty() {
            return;
        }
        if rotate {
            c.target = (c.target + 1) % m.coords.len();
        }
        m.report.client_retries += 1;
        self.client_send(slot);
    }

    /// A coordinator's reply reaches rank `slot`.
    pub(super) fn client_reply(&mut self, slot: usize, incarnation: u64, bytes: Bytes) {
        if !self.ranks[slot].alive || self.ranks[slot].incarnation != incarnation {
            return;
        }
        let Some(m) = self.membership.as_mut() else { return };
        let Ok(reply) = ClientReply::decode(&bytes) else { return };
        let c = &mut m.clients[slot];
        let Some((request, body)) = c.queue.front().cloned() else { return };
        if reply.request != request {
            return; // an answer to an earlier send of an answered request
        }
        match reply.body {
            ReplyBody::NotLeader { leader } => {
                match leader.and_then(|l| (l as usize).checked_sub(1)).filter(|l| *l < m.coords.len()) {
                    Some(l) => {
                        c.target = l;
                        self.client_send(slot);
                    }
                    None => {
                        // No leader known: try the next one a tick later.
                        c.attempt += 1;
                        let (attempt, at) = (c.attempt, self.now + m.tick_ns);
                        self.push(at, Ev::ClientRetry { slot: slot as u32, incarnation, attempt, rotate: true });
                    }
                }
            }
            answer => {
                c.queue.pop_front();
                c.attempt += 1;
                let more = !c.queue.is_empty();
                self.answered(slot, body, answer);
                if more {
                    self.client_send(slot);
                }
            }
        }
    }

    /// What rank `slot` does with the answer to `asked`.
    fn answered(&mut self, slot: usize, asked: RequestBody, answer: ReplyBody) {
        let in_boundary = self.ranks[slot].boundary.is_some();
        if self.ranks[slot].admission.is_some() {
            return match (asked, answer) {
                (RequestBody::Read, ReplyBody::View { view, .. }) => {
                    self.admission_input(slot, AdmissionInput::View(view))
                }
                (RequestBody::Read, _) => self.submit(slot, RequestBody::Read),
                (RequestBody::Propose(_), _) => self.admission_input(slot, AdmissionInput::Proposed),
                _ => {}
            };
        }
        match (asked, answer) {
            (RequestBody::Read, ReplyBody::View { view, .. }) if in_boundary => {
                self.boundary_input(slot, BoundaryInput::View(view));
            }
            (RequestBody::Read, _) if in_boundary => {
                // Refused: read again.
                self.submit(slot, RequestBody::Read);
            }
            (
                RequestBody::Propose(Command::Join { .. }),
                ReplyBody::Applied {
                    result: Ok(Outcome::Joined { rank, .. }) | Err(ViewError::AlreadyJoined { rank, .. }),
                    ..
                },
            ) => {
                if let Some(m) = self.membership.as_mut() {
                    m.report.joins_committed += 1;
                    m.ids[slot] = Some(rank);
                }
                // `ElasticMember::join`: it waits to be admitted (the real `AdmissionPlan`; the
                // job is running, so `start_world` never matters here).
                if self.ranks[slot].stage == Stage::Joining && self.ranks[slot].admission.is_none() {
                    self.ranks[slot].admission = Some(AdmissionPlan::new(rank, 1));
                    self.admission_drive(slot);
                }
            }
            (RequestBody::Propose(command), answer) if in_boundary => {
                if let (Command::ReportFailure { .. }, ReplyBody::Applied { result: Ok(Outcome::Updated), .. }) =
                    (&command, &answer)
                {
                    if let Some(m) = self.membership.as_mut() {
                        m.report.failures_reported += 1;
                    }
                }
                self.boundary_input(slot, BoundaryInput::Proposed);
            }
            _ => {}
        }
    }

    // ---- the step boundary: every member runs phalanx_runtime's BoundaryPlan ----

    /// Whether rank `r`, about to start `step`, stops at a boundary first: it starts the real
    /// boundary protocol (`BoundaryPlan`, which `ElasticMember` drives in production).
    pub(super) fn at_boundary(&mut self, r: usize, step: u64) -> bool {
        let Some(m) = self.membership.as_ref() else { return false };
        if step == 0 || !step.is_multiple_of(m.spec.boundary_every) || self.ranks[r].boundary_done == Some(step) {
            return false;
        }
        let Some(id) = m.ids[r] else { return false };
        let plan = BoundaryPlan::new(id, m.report.epochs, m.member_ids.clone(), step);
        let rk = &mut self.ranks[r];
        rk.boundary_done = Some(step);
        rk.stage = Stage::Boundary;
        rk.boundary = Some(plan);
        self.boundary_drive(r);
        true
    }

    /// Hands rank `r`'s boundary plan an answer and drives it on.
    fn boundary_input(&mut self, r: usize, input: BoundaryInput) {
        if let Some(plan) = self.ranks[r].boundary.as_mut() {
            plan.handle(input);
            self.boundary_drive(r);
        }
    }

    /// Does what rank `r`'s boundary plan asks next.
    fn boundary_drive(&mut self, r: usize) {
        let Some(plan) = self.ranks[r].boundary.as_mut() else { return };
        let action = plan.poll();
        if tracing::enabled!(tracing::Level::DEBUG) {
            let what = match &action {
                BoundaryAction::Rebuild { view } => format!("rebuild for epoch {}", view.epoch()),
                a => format!("{a:?}"),
            };
            tracing::debug!(t = self.now as f64 / SEC, rank = r, action = %what, "boundary");
        }
        match action {
            BoundaryAction::ReadView => self.submit(r, RequestBody::Read),
            BoundaryAction::Propose { command, .. } => self.submit(r, RequestBody::Propose(command)),
            BoundaryAction::Agree { value } => self.member_call(r, MemberCall::Agree, value),
            BoundaryAction::Barrier => self.member_call(r, MemberCall::Barrier, 0),
            BoundaryAction::Rebuild { view } => {
                self.ranks[r].awaiting_epoch = Some(view.epoch());
                if let Some(m) = self.membership.as_mut() {
                    if view.epoch() > m.report.epochs {
                        m.pending_view = Some(view);
                    }
                }
                self.rebuild_check();
            }
            BoundaryAction::Done(outcome) => {
                let rk = &mut self.ranks[r];
                rk.boundary = None;
                rk.awaiting_epoch = None;
                match outcome {
                    BoundaryOutcome::Continue => {}
                    BoundaryOutcome::Rebuilt { step, .. } => {
                        rk.step = step;
                        rk.boundary_done = Some(step);
                    }
                    // Not a member of the new epoch: its process stops, its supervisor restarts
                    // it and it joins again.
                    BoundaryOutcome::Departed { .. } => return self.fence(r),
                }
                rk.stage = Stage::Idle;
                self.begin_step(r);
            }
        }
    }

    /// Rank `r` starts a collective of the boundary (or of its admission): an all-reduce
    /// (max, `Shrink`) of `value` over the group of all members, or the barrier.
    fn member_call(&mut self, r: usize, kind: MemberCall, value: i64) {
        let channel = if self.sc.workload.kind == WorkloadKind::Semisync { 2 } else { 0 };
        let now = self.now;
        let rk = &mut self.ranks[r];
        let Some(g) = rk.group_of(channel) else { return self.fence(r) };
        let options = CallOptions { policy: FaultPolicy::Shrink, verify: false };
        match kind {
            MemberCall::Barrier | MemberCall::JoinBarrier => g.start(now, Op::Barrier, DType::U8, Vec::new(), options),
            MemberCall::Agree | MemberCall::JoinSync => {
                let op = Op::AllReduce { algorithm: AllReduceAlgorithm::Auto, op: ReduceOp::Max };
                g.start(now, op, DType::I64, value.to_le_bytes().to_vec(), options)
            }
        };
        rk.call_channel = channel;
        rk.member_call = Some(kind);
        self.pump(r);
    }

    /// Rank `r`'s boundary (or admission) collective ended.
    pub(super) fn member_call_finished(&mut self, r: usize, f: Finished) {
        let Some(kind) = self.ranks[r].member_call.take() else { return };
        let (value, participants) = match f {
            Finished::Buffer { data, participants } => {
                let v = data.get(..8).and_then(|b| b.try_into().ok()).map(i64::from_le_bytes).unwrap_or(0);
                (v, participants)
            }
            // The boundary failed on this rank (`ElasticMember` returns the error): the process
            // stops, and its supervisor restarts it to join again.
            _ => return self.fence(r),
        };
        match kind {
            MemberCall::Agree => self.boundary_input(r, BoundaryInput::Agreed { value, participants }),
            MemberCall::Barrier => self.boundary_input(r, BoundaryInput::BarrierPassed),
            MemberCall::JoinSync => self.admission_input(r, AdmissionInput::Agreed { value }),
            MemberCall::JoinBarrier => {
                let rk = &mut self.ranks[r];
                rk.boundary_done = Some(rk.step);
                rk.stage = Stage::Idle;
                self.begin_step(r);
            }
        }
    }

    /// Hands rank `r`'s admission plan an answer and drives it on.
    fn admission_input(&mut self, r: usize, input: AdmissionInput) {
        if let Some(plan) = self.ranks[r].admission.as_mut() {
            plan.handle(input);
            self.admission_drive(r);
        }
    }

    /// A joiner's pause between two reads is over.
    pub(super) fn admission_waited(&mut self, r: usize, incarnation: u64) {
        if self.ranks[r].alive && self.ranks[r].incarnation == incarnation {
            self.admission_input(r, AdmissionInput::Waited);
        }
    }

    /// Does what joiner `r`'s admission plan asks next.
    fn admission_drive(&mut self, r: usize) {
        let Some(plan) = self.ranks[r].admission.as_mut() else { return };
        match plan.poll() {
            AdmissionAction::ReadView => self.submit(r, RequestBody::Read),
            AdmissionAction::Propose(command) => self.submit(r, RequestBody::Propose(command)),
            AdmissionAction::Wait => {
                // `ElasticMember`'s poll interval.
                let incarnation = self.ranks[r].incarnation;
                self.push(self.now + (50.0 * MS) as u64, Ev::AdmissionWait { slot: r as u32, incarnation });
            }
            AdmissionAction::Rebuild { view } => {
                let built = self.membership.as_ref().is_some_and(|m| m.report.epochs >= view.epoch());
                if built && self.ranks[r].grouped() {
                    return self.admission_input(r, AdmissionInput::Rebuilt);
                }
                self.ranks[r].awaiting_epoch = Some(view.epoch());
                if let Some(m) = self.membership.as_mut() {
                    if view.epoch() > m.report.epochs {
                        m.pending_view = Some(view);
                    }
                }
                self.rebuild_check();
            }
            AdmissionAction::Agree { value } => {
                self.ranks[r].stage = Stage::Recovering;
                self.member_call(r, MemberCall::JoinSync, value);
            }
            AdmissionAction::Admitted { step, .. } => {
                // It has the group's step: it recovers the state of that step, then enters.
                self.ranks[r].admission = None;
                self.ranks[r].step = step;
                let (members, state) = match self.membership.as_ref() {
                    Some(m) => (m.members.clone(), m.spec.state_bytes.0),
                    None => return,
                };
                self.start_recovery(r, &members, state);
            }
        }
    }

    /// The transport reported `lost` unreachable: a rebuild that waited for it may go on.
    pub(super) fn membership_lost(&mut self, _lost: usize) {
        self.rebuild_check();
    }

    /// A new epoch's view is known (`pending_view`): once every live member of it that was a
    /// member before waits to rebuild, the epoch's groups are formed. (Each real rank builds its
    /// endpoint when it gets there; the simulator forms every member's groups at once, when the
    /// last of them gets there, and drops the old epoch's traffic.)
    fn rebuild_check(&mut self) {
        let Some(m) = self.membership.as_ref() else { return };
        let Some(view) = m.pending_view.as_ref() else { return };
        let epoch = view.epoch();
        let members = self.slots_of(view);
        let ready = members.iter().all(|s| {
            let rk = &self.ranks[*s];
            // (A joiner — a new process, even in a member's slot — is admitted by the rebuild.)
            !rk.alive
                || rk.stage == Stage::Joining
                || !m.members.contains(s)
                || rk.awaiting_epoch.is_some_and(|e| e >= epoch)
        });
        if ready {
            let view = view.clone();
            self.rebuild(&view);
        }
    }

    /// The slots of `view`'s members, in the view's order (which process each is: its host
    /// name and the incarnation that joined).
    fn slots_of(&self, view: &ClusterView) -> Vec<usize> {
        self.members_of(view).into_iter().map(|(slot, _)| slot).collect()
    }

    /// `view`'s members that are live processes here, in the view's order: (slot, rank id).
    fn members_of(&self, view: &ClusterView) -> Vec<(usize, u32)> {
        let mut members: Vec<(usize, u32)> = Vec::new();
        for id in view.members() {
            let Some(rec) = view.rank(*id) else { continue };
            let Some(slot) = rec.host.strip_prefix("sim-slot-").and_then(|s| s.parse::<usize>().ok()) else { continue };
            if slot < self.world
                && self.ranks[slot].incarnation == rec.incarnation
                && !members.iter().any(|m| m.0 == slot)
            {
                members.push((slot, *id));
            }
        }
        members
    }

    /// Epoch `view.epoch()` began: drop the old epoch's traffic, form the groups of its members;
    /// the members' plans go on (step sync, admission barrier), the joiners sync the step,
    /// recover the state and pass the barrier.
    fn rebuild(&mut self, view: &ClusterView) {
        let world = self.world;
        let (members, ids): (Vec<usize>, Vec<u32>) = self.members_of(view).into_iter().unzip();
        tracing::debug!(t = self.now as f64 / SEC, epoch = view.epoch(), members = members.len(), "epoch began");
        let step =
            members.iter().filter(|s| self.ranks[**s].awaiting_epoch.is_some()).map(|s| self.ranks[*s].step).max();
        let step = step.unwrap_or(0);
        // The old epoch's messages are gone with its endpoints.
        for (_, p) in std::mem::take(&mut self.pairs) {
            if let Some((flow, _)) = p.active {
                self.fabric.share.remove(self.now, flow);
            }
        }
        self.epoch += 1;
        let epoch = self.epoch;
        self.form_member_groups(&members);
        let after = (self.sc.transport.unreachable_after_ms * MS) as u64;
        let Some(m) = self.membership.as_mut() else { return };
        m.pending_view = None;
        m.report.epochs = view.epoch();
        m.members = members.clone();
        // The group's order: ids aligned with the slots, index by index.
        m.member_ids = ids;
        m.report.members_at_end = members.len();
        let mut joiners = Vec::new();
        let mut rebuilt = Vec::new();
        for s in &members {
            let rk = &mut self.ranks[*s];
            if !rk.alive {
                // Died after reading the view: the transport will report it again.
                self.push(self.now + after, Ev::LostNotice { lost: *s as u32, epoch });
                continue;
            }
            match rk.stage {
                Stage::Joining => joiners.push(*s),
                _ if rk.awaiting_epoch.is_some() => rebuilt.push(*s),
                _ => {}
            }
        }
        if self.sc.workload.kind == crate::scenario::WorkloadKind::Semisync {
            self.semisync_epoch(&members, step);
        }
        // A live process the new epoch left out (reported lost while it was not) is fenced: its
        // supervisor restarts it and it rejoins as a new incarnation.
        let fenced: Vec<usize> = (0..world)
            .filter(|s| self.ranks[*s].alive && !members.contains(s) && self.ranks[*s].stage != Stage::Joining)
            .collect();
        for s in fenced {
            self.fence(s);
        }
        if let Some(tr) = self.trace.as_mut() {
            tr.fault("epoch", self.now, true);
            tr.fault("epoch", self.now, false);
        }
        self.fault_marks.push((format!("epoch {}", view.epoch()), self.now as f64 / SEC));
        for s in rebuilt {
            self.ranks[s].awaiting_epoch = None;
            self.boundary_input(s, BoundaryInput::Rebuilt);
        }
        for j in joiners {
            // A joiner that read this epoch's view and waits for its group goes on (the others
            // find it built when they read it).
            if self.ranks[j].awaiting_epoch.take().is_some() {
                self.admission_input(j, AdmissionInput::Rebuilt);
            }
        }
    }

    /// Joiner `j` fetches `bytes` of state, striped over up to four live, settled members
    /// (its own data centre first).
    fn start_recovery(&mut self, j: usize, members: &[usize], bytes: u64) {
        let dc = self.fabric.dc_of_host(self.fabric.host_of(j));
        let mut sources: Vec<usize> = members
            .iter()
            .copied()
            .filter(|s| *s != j && self.ranks[*s].alive && self.ranks[*s].stage == Stage::Boundary)
            .collect();
        sources.sort_by_key(|s| (self.fabric.dc_of_host(self.fabric.host_of(*s)) != dc, *s));
        sources.truncate(4);
        self.ranks[j].stage = Stage::Recovering;
        if bytes == 0 || sources.is_empty() {
            return self.recovered(j);
        }
        let share = bytes.div_ceil(sources.len() as u64);
        let mut started = 0;
        for s in sources {
            let Some(route) = self.fabric.route(self.fabric.host_of(s), self.fabric.host_of(j)) else { continue };
            let flow = self.fabric.share.start(self.now, route.resources, share as f64);
            self.set_owner(flow, FlowOwner::Recovery(j as u32));
            self.net.bytes += share;
            started += 1;
        }
        if started == 0 {
            return self.recovered(j);
        }
        if let Some(m) = self.membership.as_mut() {
            m.recovering.push((j, started));
        }
    }

    /// One of joiner `j`'s recovery flows finished.
    pub(super) fn recovery_flow_done(&mut self, j: usize) {
        let Some(m) = self.membership.as_mut() else { return };
        let Some(k) = m.recovering.iter().position(|(r, _)| *r == j) else { return };
        m.recovering[k].1 -= 1;
        if m.recovering[k].1 == 0 {
            m.recovering.remove(k);
            self.recovered(j);
        }
    }

    /// Joiner `j` has the state: it enters through the admission barrier.
    fn recovered(&mut self, j: usize) {
        let Some(m) = self.membership.as_mut() else { return };
        m.report.ranks_readmitted += 1;
        tracing::debug!(t = self.now as f64 / SEC, rank = j, "readmitted with its state");
        if let Some(t) = m.restarted_at[j].take() {
            m.report.readmission_s.push((self.now - t) as f64 / SEC);
        }
        self.member_call(j, MemberCall::JoinBarrier, 0);
    }

    /// Live rank `r` is not a member of the new epoch (or its boundary failed): its process
    /// stops — what it carried and what it was doing die with it — and its supervisor restarts
    /// it to rejoin.
    fn fence(&mut self, r: usize) {
        if !self.ranks[r].alive {
            return;
        }
        if let Some(m) = self.membership.as_mut() {
            m.report.ranks_fenced += 1;
        }
        self.crash(r);
        self.restart_rank(r);
    }

    /// A crashed rank's process starts again (a new incarnation) and asks to join.
    pub(super) fn restart_rank(&mut self, r: usize) {
        if self.ranks[r].alive || self.membership.is_none() {
            return;
        }
        let dc = self.fabric.dc_of_host(self.fabric.host_of(r)) as u32;
        let rk = &mut self.ranks[r];
        rk.alive = true;
        rk.incarnation += 1;
        rk.stage = Stage::Joining;
        rk.drop_groups();
        // A new process: its semi-sync state comes with its admission.
        rk.plan = None;
        rk.sync_call = None;
        rk.realign_sent = None;
        rk.boundary = None;
        rk.admission = None;
        rk.member_call = None;
        rk.awaiting_epoch = None;
        rk.carry = [None, None];
        rk.carry_units = [0, 0];
        rk.timer_at = None;
        let incarnation = rk.incarnation;
        self.alive_count += 1;
        let Some(m) = self.membership.as_mut() else { return };
        m.ids[r] = None;
        m.clients[r] = Client::new(r, incarnation);
        m.report.ranks_restarted += 1;
        m.restarted_at[r] = Some(self.now);
        self.submit(r, RequestBody::Propose(join(r, dc, incarnation)));
    }

    /// Rank `r` crashed: a joiner no longer recovers, a rebuild that waited for it may go on.
    pub(super) fn membership_crashed(&mut self, r: usize) {
        let Some(m) = self.membership.as_mut() else { return };
        m.recovering.retain(|(j, _)| *j != r);
        let rk = &mut self.ranks[r];
        rk.boundary = None;
        rk.member_call = None;
        rk.awaiting_epoch = None;
        self.rebuild_check();
    }

    pub(super) fn membership_report(&mut self) -> Option<MembershipReport> {
        let m = self.membership.as_mut()?;
        m.report.leader_at_end = m.leader;
        m.report.coordinators_up_at_end = m.coords.iter().filter(|c| c.node.is_some()).count();
        Some(m.report.clone())
    }
}

fn join(slot: usize, dc: u32, incarnation: u64) -> Command {
    Command::Join { dc, host: host_name(slot), addrs: vec![format!("sim:{slot}")], incarnation }
}
