//! Semi-synchronous training over a communicator: synchronous data parallel, local SGD,
//! DiLoCo and streaming DiLoCo (issue #6), with per-round fault policies and an accounting of
//! every outer gradient.
//!
//! The trainer owns its parameters (one flat `f32` vector here) and its inner optimizer; it
//! calls [`SemiSync::after_inner_step`] after every inner step. When a fragment is due, this
//! rank's outer gradient for it (`anchor − params`, plus whatever an earlier round carried) is
//! averaged over the round's participants — compressed to int8/4-bit with error feedback if
//! configured — and the outer optimizer moves the anchor; the parameters restart from it.
//!
//! Under faults: with `Shrink` a lost rank is left out and the survivors' average is used; with
//! `Quorum` a rank whose contribution was late gets it back and **carries** it into its next
//! round for that fragment (counted `pending` in the [`Ledger`], never silently lost); a failed
//! round is counted `dropped` and returned as an error.
//!
//! **Healing.** A late rank did not receive the round's result, so its anchor lags the
//! group's. It re-anchors on its own parameters (its progress so far rides in the carried
//! contribution, its later progress in the next delta: counted once). Every `heal_every`
//! rounds of a fragment, if any round or heal of it since the last complete heal went without
//! some rank, the lowest participant of the round broadcasts the fragment's anchor and
//! momentum: a lagging rank adopts them and shifts its parameters by the same amount (keeping
//! its local progress); the others are unchanged. The choice depends only on the step and on
//! the participant lists every rank of a round receives alike (late ranks too), so every rank
//! runs the same sequence of collectives; when nobody was missing, healing costs nothing.

use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;

use phalanx_collectives::reduce::{DType, ReduceOp};
use phalanx_runtime::semisync::{
    fragment_ranges, CrossDcCall, CrossDcPlan, FragmentFlags, Ledger, OuterOptimizer, PlanConfig, PlannedCall,
    RoundPlan, RoundResult, SyncCall, SyncMode,
};
use tracing::{debug, info_span, Instrument};

use crate::params::ParamSet;
use crate::{
    AllReduceAlgorithm, CallOptions, CommError, Communicator, Compression, ErrorFeedback, FaultPolicy, Op, Outcome,
};

/// How a group syncs.
#[derive(Clone, Copy, Debug)]
pub struct SemiSyncConfig {
    /// The algorithm and its period.
    pub mode: SyncMode,
    /// The outer optimizer (DiLoCo modes; local SGD always averages).
    pub outer_lr: f32,
    /// Outer momentum.
    pub outer_momentum: f32,
    /// Compression of outer gradients (error feedback per fragment).
    pub compression: Compression,
    /// What a round does under faults.
    pub policy: FaultPolicy,
    /// Deadline of one round.
    pub deadline: Duration,
    /// Under `Quorum`: after a round some rank missed, the next round (of the same fragment, or
    /// the next gradient round) waits up to this long — instead of the policy's `wait` — for
    /// everyone, so a rank that fell behind (a straggler's stall, a WAN cut) gets back in step
    /// instead of arriving late to every later round. Lost ranks are not waited for. Every rank
    /// saw the same participants, so they all choose the same wait.
    pub catch_up_wait: Duration,
    /// Every this many rounds of a fragment, if a rank was missing from one of its rounds since
    /// the last complete heal, the round is followed by a broadcast of its anchor and momentum
    /// from the round's lowest participant, bringing ranks that missed rounds back in line (0:
    /// never; then a late rank's anchor stays its own).
    pub heal_every: u64,
}

impl SemiSyncConfig {
    /// `mode` with the DiLoCo paper's outer optimizer (lr 0.7, Nesterov 0.9), no compression,
    /// `Shrink`, 30 s rounds.
    pub fn new(mode: SyncMode) -> SemiSyncConfig {
        SemiSyncConfig {
            mode,
            outer_lr: 0.7,
            outer_momentum: 0.9,
            compression: Compression::None,
            policy: FaultPolicy::Shrink,
            deadline: Duration::from_secs(30),
            catch_up_wait: Duration::from_secs(5),
            heal_every: 4,
        }
    }

    /// The part of the configuration that decides which collectives run (`phalanx_runtime`'s
    /// sans-IO plan).
    pub fn plan(&self) -> PlanConfig {
        PlanConfig {
            mode: self.mode,
            policy: self.policy,
            catch_up_wait: self.catch_up_wait,
            heal_every: self.heal_every,
        }
    }
}

/// What one sync round did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundReport {
    /// The fragment.
    pub fragment: usize,
    /// Who took part (communicator indices).
    pub participants: Vec<usize>,
    /// This rank's contribution missed the round and is carried.
    pub late: bool,
    /// Bytes this rank put into the round's all-reduce.
    pub bytes: usize,
}

/// One rank's semi-synchronous state: which collectives run ([`RoundPlan`], the sans-IO
/// protocol the simulator runs too: heals, catch-up waits, the ledger) and the arithmetic on
/// the parameters (anchors, outer optimizers, error feedback, carried outer gradients).
pub struct SemiSync {
    plan: RoundPlan,
    state: OuterState,
}

/// The arithmetic half of a rank's semi-synchronous state, and the collectives that move it.
struct OuterState {
    config: SemiSyncConfig,
    ranges: Vec<Range<usize>>,
    anchor: Vec<f32>,
    outer: Vec<OuterOptimizer>,
    feedback: Vec<ErrorFeedback>,
    carry: Vec<Vec<f32>>,
    bytes_sent: u64,
}

impl SemiSync {
    /// State for parameters `params` (identical on every rank at the start).
    pub fn new(params: &[f32], config: SemiSyncConfig) -> SemiSync {
        SemiSync { plan: RoundPlan::new(config.plan()), state: OuterState::new(params, config) }
    }

    /// The accounting so far.
    pub fn ledger(&self) -> Ledger {
        self.plan.ledger()
    }

    /// Bytes this rank put into sync rounds so far.
    pub fn bytes_sent(&self) -> u64 {
        self.state.bytes_sent
    }

    /// Inner steps taken.
    pub fn step(&self) -> u64 {
        self.plan.step()
    }

    /// The parameters as of the last sync of each fragment.
    pub fn anchor(&self) -> &[f32] {
        &self.state.anchor
    }

    /// The state a recovering rank needs to take this rank's place in the next round (what
    /// to publish for live recovery): the anchors and the outer momentum, as named buffers.
    pub fn export(&self) -> Vec<(String, Bytes)> {
        self.state.export(&self.plan)
    }

    /// A rank's state rebuilt from what a healthy peer exported at inner step `step` (live
    /// recovery): its anchors and momentum, the schedule at that step, nothing carried. The
    /// trainer's parameters restart from [`SemiSync::anchor`].
    pub fn import(config: SemiSyncConfig, step: u64, buffers: &[(String, Vec<u8>)]) -> Result<SemiSync, String> {
        let get = |name: &str| {
            buffers.iter().find(|(n, _)| n == name).map(|(_, b)| b).ok_or_else(|| format!("no {name:?} buffer"))
        };
        let (anchor_bytes, velocity_bytes) = (get("anchor")?, get("velocity")?);
        if anchor_bytes.len() % 4 != 0 || velocity_bytes.len() != anchor_bytes.len() {
            return Err(format!(
                "anchor of {} bytes and velocity of {} bytes do not make f32 vectors of one length",
                anchor_bytes.len(),
                velocity_bytes.len()
            ));
        }
        let mut anchor = vec![0.0f32; anchor_bytes.len() / 4];
        read_f32(anchor_bytes, &mut anchor);
        let mut velocity = vec![0.0f32; anchor.len()];
        read_f32(velocity_bytes, &mut velocity);
        let mut s = SemiSync::new(&anchor, config);
        for (f, r) in s.state.ranges.clone().into_iter().enumerate() {
            s.state.outer[f].set_velocity(&velocity[r]);
        }
        if let Ok(flags) = get("unhealed") {
            s.plan.set_unhealed(&flags.iter().map(|f| *f != 0).collect::<Vec<bool>>())?;
        }
        s.plan.set_step(step);
        Ok(s)
    }

    /// [`SemiSync::new`] for registered tensors of any floating type (anchors kept in f32).
    pub fn for_params(params: &ParamSet, config: SemiSyncConfig) -> SemiSync {
        SemiSync::new(&params.to_f32(), config)
    }

    /// [`SemiSync::after_inner_step`] on registered tensors: the synced fragments are written
    /// back rounded to each tensor's type.
    pub async fn after_inner_step_params(
        &mut self,
        comm: &mut Communicator,
        params: &mut ParamSet,
    ) -> Result<Vec<RoundReport>, CommError> {
        let mut flat = params.to_f32();
        let reports = self.after_inner_step(comm, &mut flat).await;
        params.set_from_f32(&flat);
        reports
    }

    /// [`SemiSync::sync_gradients`] on registered gradient tensors.
    pub async fn sync_gradients_params(
        &mut self,
        comm: &mut Communicator,
        grads: &mut ParamSet,
    ) -> Result<RoundReport, CommError> {
        let mut flat = grads.to_f32();
        let report = self.sync_gradients(comm, &mut flat).await;
        grads.set_from_f32(&flat);
        report
    }

    /// The group changed (the communicator of a new epoch: ranks left or joined, or another
    /// rank leads a data centre). Every fragment is marked for healing at its next heal round
    /// and the catch-up wait is forgotten. Every member of the new group calls this at the
    /// same step (the epoch's boundary; a rank that joined, after importing its state), so
    /// they all run the same collectives from there even though they saw different rounds
    /// before: a leader promoted in place of a dead one never saw the rounds its predecessor
    /// missed, and without this the other leaders would heal where it does not, pairing their
    /// later rounds with the wrong collectives.
    pub fn group_changed(&mut self) {
        self.plan.group_changed();
    }

    /// Whether this rank's anchor of any fragment may lag the group's (it missed a round
    /// since the last heal).
    pub fn lagging(&self) -> bool {
        self.plan.lagging()
    }

    /// Heals every fragment now (every rank calls it at the same point, e.g. before
    /// evaluation or a checkpoint): the lowest participant of each fragment's last round
    /// broadcasts its anchor and momentum under `Shrink`.
    pub async fn resync(&mut self, comm: &mut Communicator, params: &mut [f32]) -> Result<(), CommError> {
        self.plan.resync();
        run_plan(&mut self.plan, &mut self.state, comm, params).await.map(|_| ())
    }

    /// Synchronous data parallel: replaces `grads` by their average over the round's
    /// participants (call before the inner optimizer's step). A late rank keeps its own
    /// gradient (stale by the next step: reported dropped, not carried).
    pub async fn sync_gradients(
        &mut self,
        comm: &mut Communicator,
        grads: &mut [f32],
    ) -> Result<RoundReport, CommError> {
        let call = self.plan.begin_gradients(comm.world());
        let s = &mut self.state;
        let (result, report) = gradient_round(comm, grads, call.policy, s.config.deadline, &mut s.bytes_sent).await;
        self.plan.handle(&result, comm.world());
        report
    }

    /// After an inner step: syncs the fragments due at this step (none most steps). On
    /// return the synced fragments of `params` equal their new anchors.
    pub async fn after_inner_step(
        &mut self,
        comm: &mut Communicator,
        params: &mut [f32],
    ) -> Result<Vec<RoundReport>, CommError> {
        self.plan.after_inner_step();
        run_plan(&mut self.plan, &mut self.state, comm, params).await
    }
}

/// Runs the plan's calls of the step on `comm` until it has none left; the first failure
/// ends the step and is returned.
async fn run_plan(
    plan: &mut RoundPlan,
    state: &mut OuterState,
    comm: &mut Communicator,
    params: &mut [f32],
) -> Result<Vec<RoundReport>, CommError> {
    let world = comm.world();
    let mut reports = Vec::new();
    while let Some(PlannedCall { call, policy }) = plan.poll_call(world) {
        let step = plan.step();
        let (result, report) = match call {
            SyncCall::Outer { fragment } => {
                let span = info_span!("outer_sync", fragment, step);
                state.round(comm, params, fragment, policy).instrument(span).await
            }
            SyncCall::Heal { fragment, root } => {
                let span = info_span!("heal", fragment, root, step);
                let (result, healed) = state.heal(comm, params, fragment, root, policy).instrument(span).await;
                (result, healed.map(|()| None))
            }
            // Not in a single group's plan: gradients have their own entry, realignment is
            // cross-DC only.
            SyncCall::Gradients | SyncCall::Realign { .. } => (RoundResult::Failed, Ok(None)),
        };
        plan.handle(&result, world);
        if let Some(report) = report? {
            reports.push(report);
        }
    }
    Ok(reports)
}

/// A gradient round: `grads` become their average over the participants (unchanged when late
/// or failed); the bytes put into it are added to `bytes_sent`.
async fn gradient_round(
    comm: &mut Communicator,
    grads: &mut [f32],
    policy: FaultPolicy,
    deadline: Duration,
    bytes_sent: &mut u64,
) -> (RoundResult, Result<RoundReport, CommError>) {
    let bytes = f32_bytes(grads);
    let n = bytes.len();
    let options = CallOptions { policy, verify: false };
    let op = Op::AllReduce { algorithm: AllReduceAlgorithm::Auto, op: ReduceOp::Avg };
    *bytes_sent += n as u64;
    let outcome = comm.collective(op, DType::F32, bytes, options, deadline).await;
    let result = result_of(&outcome);
    let report = outcome.map(|o| match o {
        Outcome::Done { data, participants } => {
            read_f32(&data, grads);
            RoundReport { fragment: 0, participants, late: false, bytes: n }
        }
        Outcome::Late { participants, .. } => RoundReport { fragment: 0, participants, late: true, bytes: n },
    });
    (result, report)
}

impl From<&Outcome> for RoundResult {
    fn from(o: &Outcome) -> RoundResult {
        match o {
            Outcome::Done { participants, .. } => RoundResult::Done { participants: participants.clone() },
            Outcome::Late { participants, .. } => RoundResult::Late { participants: participants.clone() },
        }
    }
}

fn result_of(outcome: &Result<Outcome, CommError>) -> RoundResult {
    outcome.as_ref().map_or(RoundResult::Failed, RoundResult::from)
}

impl OuterState {
    fn new(params: &[f32], config: SemiSyncConfig) -> OuterState {
        let ranges = fragment_ranges(params.len(), config.mode.fragments());
        let outer = ranges
            .iter()
            .map(|_| match config.mode {
                SyncMode::LocalSgd { .. } | SyncMode::Synchronous => OuterOptimizer::averaging(),
                _ => OuterOptimizer::new(config.outer_lr, config.outer_momentum, true),
            })
            .collect();
        OuterState {
            feedback: vec![ErrorFeedback::new(); ranges.len()],
            carry: ranges.iter().map(|r| vec![0.0; r.len()]).collect(),
            anchor: params.to_vec(),
            outer,
            ranges,
            config,
            bytes_sent: 0,
        }
    }

    /// Fragment `f`'s outer round: this rank's outer gradient (`anchor − params`, plus what
    /// an earlier round carried) averaged over the participants moves the anchor by the outer
    /// optimizer, and the fragment's parameters restart from it. Late: the gradient is
    /// carried and the rank re-anchors on its own parameters (its progress rides in the
    /// carried gradient, counted once). Failed: dropped (reported), re-anchored likewise.
    async fn round(
        &mut self,
        comm: &mut Communicator,
        params: &mut [f32],
        f: usize,
        policy: FaultPolicy,
    ) -> (RoundResult, Result<Option<RoundReport>, CommError>) {
        let r = self.ranges[f].clone();
        let delta: Vec<f32> =
            r.clone().map(|i| self.anchor[i] - params[i]).zip(&self.carry[f]).map(|(d, c)| d + c).collect();
        let options = CallOptions { policy, verify: false };
        let bytes = f32_bytes(&delta);
        let outcome = if self.config.compression == Compression::None {
            self.bytes_sent += bytes.len() as u64;
            let op = Op::AllReduce { algorithm: AllReduceAlgorithm::Auto, op: ReduceOp::Avg };
            comm.collective(op, DType::F32, bytes, options, self.config.deadline).await
        } else {
            // What goes on the wire: the quantised encoding (about 1 or ½ byte an element).
            let per_element = if self.config.compression == Compression::Int4 { 0.5 } else { 1.0 };
            self.bytes_sent += (delta.len() as f64 * per_element) as u64;
            comm.all_reduce_compressed(
                bytes,
                ReduceOp::Avg,
                self.config.compression,
                &mut self.feedback[f],
                options,
                self.config.deadline,
            )
            .await
        };
        let result = result_of(&outcome);
        let sent = delta.len() * 4;
        let report = match outcome {
            Ok(Outcome::Done { data, participants }) => {
                let mut avg = vec![0.0f32; delta.len()];
                read_f32(&data, &mut avg);
                self.outer[f].step(&mut self.anchor[r.clone()], &avg);
                params[r.clone()].copy_from_slice(&self.anchor[r]);
                self.carry[f].iter_mut().for_each(|c| *c = 0.0);
                debug!(fragment = f, participants = participants.len(), "outer step applied");
                Ok(Some(RoundReport { fragment: f, participants, late: false, bytes: sent }))
            }
            Ok(Outcome::Late { participants, .. }) => {
                self.carry[f] = delta;
                self.anchor[r.clone()].copy_from_slice(&params[r]);
                Ok(Some(RoundReport { fragment: f, participants, late: true, bytes: sent }))
            }
            Err(e) => {
                self.carry[f].iter_mut().for_each(|c| *c = 0.0);
                self.anchor[r.clone()].copy_from_slice(&params[r]);
                Err(e)
            }
        };
        (result, report)
    }

    /// The anchors, the outer momentum (zeros where there is none yet) and `plan`'s heal
    /// flags, as named buffers (what a recovering rank imports).
    fn export(&self, plan: &RoundPlan) -> Vec<(String, Bytes)> {
        let mut velocity = Vec::with_capacity(self.anchor.len());
        for (f, r) in self.ranges.iter().enumerate() {
            let v = self.outer[f].velocity();
            if v.len() == r.len() {
                velocity.extend_from_slice(v);
            } else {
                velocity.extend(std::iter::repeat_n(0.0, r.len()));
            }
        }
        let unhealed: Vec<u8> = plan.unhealed().into_iter().map(u8::from).collect();
        vec![
            ("anchor".into(), Bytes::from(f32_bytes(&self.anchor))),
            ("velocity".into(), Bytes::from(f32_bytes(&velocity))),
            ("unhealed".into(), Bytes::from(unhealed)),
        ]
    }

    /// Fragment `f`'s outer state as one vector: anchor, momentum, carried outer gradient,
    /// error-feedback residual (each the fragment's length; zeros where there is none yet),
    /// then the plan's flags (lagging, heal due).
    fn fragment_state(&self, f: usize, flags: FragmentFlags) -> Vec<f32> {
        let r = self.ranges[f].clone();
        let n = r.len();
        let or_zeros = |v: &[f32]| if v.len() == n { v.to_vec() } else { vec![0.0; n] };
        let mut v = Vec::with_capacity(FRAGMENT_STATE * n + FRAGMENT_FLAGS);
        v.extend_from_slice(&self.anchor[r]);
        v.extend(or_zeros(self.outer[f].velocity()));
        v.extend_from_slice(&self.carry[f]);
        v.extend(or_zeros(self.feedback[f].residual()));
        v.push(if flags.lagging { 1.0 } else { 0.0 });
        v.push(if flags.unhealed { 1.0 } else { 0.0 });
        v
    }

    /// Adopts another rank's [`OuterState::fragment_state`] of fragment `f`; returns its flags
    /// for the plan.
    fn set_fragment_state(&mut self, f: usize, v: &[f32]) -> FragmentFlags {
        let r = self.ranges[f].clone();
        let n = r.len();
        self.anchor[r].copy_from_slice(&v[..n]);
        self.outer[f].set_velocity(&v[n..2 * n]);
        self.carry[f].copy_from_slice(&v[2 * n..3 * n]);
        self.feedback[f] = ErrorFeedback::with_residual(v[3 * n..4 * n].to_vec());
        FragmentFlags { lagging: v[4 * n] != 0.0, unhealed: v[4 * n + 1] != 0.0 }
    }

    /// Broadcasts fragment `f`'s anchor and momentum from `root`; a rank that receives them
    /// adopts them and shifts its parameters by the same amount (keeping its local progress).
    async fn heal(
        &mut self,
        comm: &mut Communicator,
        params: &mut [f32],
        f: usize,
        root: usize,
        policy: FaultPolicy,
    ) -> (RoundResult, Result<(), CommError>) {
        let r = self.ranges[f].clone();
        let n = r.len();
        let payload = if comm.rank() == root {
            let mut v = self.anchor[r.clone()].to_vec();
            let vel = self.outer[f].velocity();
            v.extend(if vel.len() == n { vel.to_vec() } else { vec![0.0; n] });
            f32_bytes(&v)
        } else {
            vec![0u8; n * 8]
        };
        let options = CallOptions { policy, verify: false };
        if comm.rank() == root {
            self.bytes_sent += payload.len() as u64;
        }
        let outcome = comm.collective(Op::Broadcast { root }, DType::U8, payload, options, self.config.deadline).await;
        let result = result_of(&outcome);
        (
            result,
            outcome.map(|o| {
                if let Outcome::Done { data, .. } = o {
                    let mut v = vec![0.0f32; 2 * n];
                    read_f32(&data, &mut v);
                    for (k, i) in r.clone().enumerate() {
                        params[i] += v[k] - self.anchor[i];
                        self.anchor[i] = v[k];
                    }
                    self.outer[f].set_velocity(&v[n..]);
                }
            }),
        )
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read_f32(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

/// Semi-synchronous across data centres (issue #6): inside a data centre, synchronous data
/// parallel every step (an all-reduce of gradients over the DC's communicator, so the DC's
/// ranks are replicas of one model); across data centres, the DC's leader (index 0 of its DC
/// communicator) runs the outer rounds (DiLoCo, streaming DiLoCo, local SGD) with the other
/// DCs' leaders. Only the leaders' rounds cross the WAN: one contribution per DC, however many
/// ranks it has. The sequence of collectives is `phalanx_runtime`'s [`CrossDcPlan`].
///
/// **Realignment.** After every outer round the leader broadcasts inside its DC the whole
/// model and, for the fragments just synced, its outer state (anchor, momentum, carried outer
/// gradient, error-feedback residual, heal flags). So every rank of a DC holds the leader's
/// outer state — when the leader is lost, the next lowest rank of the DC leads from the same
/// state (the next epoch's communicators make it index 0) — and a rank whose gradient missed an
/// in-DC round (late under `Quorum`: it stepped on its own gradient and drifted) is a replica
/// again. This costs one model-sized broadcast inside the DC per outer round (every
/// `H / fragments` steps), against the model-sized all-reduce inside the DC every step.
///
/// Under faults: the leaders' rounds have the outer policy (a DC late under `Quorum` carries its
/// outer gradient and is healed); the DC's rounds have the inner policy (a lost rank inside a DC
/// is left out under `Shrink`, a straggler under `Quorum`). The outer ledger counts on the
/// leader only (a mirror's copy of a carried gradient is the same contribution, sent once, by
/// whoever leads).
pub struct CrossDcSemiSync {
    inner: SemiSyncConfig,
    plan: CrossDcPlan,
    outer: OuterState,
    /// Bytes of the in-DC gradient rounds.
    inner_bytes: u64,
}

impl CrossDcSemiSync {
    /// State for parameters `params` (identical on every rank at the start). `inner` is the
    /// policy and deadline of the in-DC rounds (gradients and realignment); `outer` the cross-DC
    /// configuration.
    pub fn new(params: &[f32], inner: SemiSyncConfig, outer: SemiSyncConfig) -> CrossDcSemiSync {
        let inner = SemiSyncConfig { mode: SyncMode::Synchronous, ..inner };
        CrossDcSemiSync {
            plan: CrossDcPlan::new(inner.plan(), outer.plan()),
            outer: OuterState::new(params, outer),
            inner,
            inner_bytes: 0,
        }
    }

    /// The accounting of the in-DC gradient rounds and of the cross-DC outer rounds (the
    /// latter only counts on leaders).
    pub fn ledgers(&self) -> (Ledger, Ledger) {
        (self.plan.inner().ledger(), self.plan.outer().ledger())
    }

    /// Inner steps taken.
    pub fn step(&self) -> u64 {
        self.plan.step()
    }

    /// The outer parameters: each fragment as of its last cross-DC sync.
    pub fn anchor(&self) -> &[f32] {
        &self.outer.anchor
    }

    /// Bytes this rank put into in-DC rounds and into cross-DC rounds so far.
    pub fn bytes_sent(&self) -> (u64, u64) {
        (self.inner_bytes, self.outer.bytes_sent)
    }

    /// Averages `grads` over the DC (call before the inner optimizer's step). A rank late for
    /// the round keeps its own gradient (counted dropped) and is realigned at the next outer
    /// round.
    pub async fn sync_gradients(&mut self, dc: &mut Communicator, grads: &mut [f32]) -> Result<RoundReport, CommError> {
        let call = self.plan.begin_gradients(dc.world());
        let deadline = self.inner.deadline;
        let (result, report) = gradient_round(dc, grads, call.policy, deadline, &mut self.inner_bytes).await;
        self.plan.handle_gradients(&result, dc.world());
        report
    }

    /// After an inner step: the leaders (`leaders` is `Some` exactly on index 0 of each DC
    /// communicator) sync the due fragments across DCs, then every DC is realigned on its
    /// leader. The first error (the outer round's, else the realignment's) is returned after
    /// both ran, so every rank of a DC runs the same collectives.
    pub async fn after_inner_step(
        &mut self,
        dc: &mut Communicator,
        leaders: Option<&mut Communicator>,
        params: &mut [f32],
    ) -> Result<Vec<RoundReport>, CommError> {
        self.plan.after_inner_step(leaders.is_some());
        self.run(dc, leaders, params, false).await
    }

    /// The groups changed (a new epoch): see [`SemiSync::group_changed`]; every rank calls it
    /// at the epoch's boundary.
    pub fn group_changed(&mut self) {
        self.plan.group_changed();
    }

    /// Heals the leaders' anchors and gives every rank the synced model, the leaders' common
    /// anchors (before evaluation or a checkpoint; every rank calls it at the same point).
    pub async fn resync(
        &mut self,
        dc: &mut Communicator,
        leaders: Option<&mut Communicator>,
        params: &mut [f32],
    ) -> Result<(), CommError> {
        self.plan.resync(leaders.is_some());
        self.run(dc, leaders, params, true).await.map(|_| ())
    }

    /// Runs the plan's calls of the step; `evaluate`: a leader's model becomes its anchors
    /// before the realignment (as DiLoCo evaluates its outer parameters).
    async fn run(
        &mut self,
        dc: &mut Communicator,
        mut leaders: Option<&mut Communicator>,
        params: &mut [f32],
        evaluate: bool,
    ) -> Result<Vec<RoundReport>, CommError> {
        let mut reports = Vec::new();
        let mut first_error = None;
        let leaders_world = leaders.as_ref().map(|l| l.world());
        while let Some(CrossDcCall { call: PlannedCall { call, policy }, .. }) = self.plan.poll_call(leaders_world) {
            let step = self.plan.step();
            let (result, world, outcome) = match (call, leaders.as_deref_mut()) {
                (SyncCall::Outer { fragment }, Some(l)) => {
                    let span = info_span!("outer_sync", fragment, step);
                    let (result, report) = self.outer.round(l, params, fragment, policy).instrument(span).await;
                    (result, l.world(), report)
                }
                (SyncCall::Heal { fragment, root }, Some(l)) => {
                    let span = info_span!("heal", fragment, root, step);
                    let (result, healed) = self.outer.heal(l, params, fragment, root, policy).instrument(span).await;
                    (result, l.world(), healed.map(|()| None))
                }
                (SyncCall::Realign { fragments }, _) => {
                    if evaluate && leaders.is_some() {
                        params.copy_from_slice(&self.outer.anchor);
                    }
                    let (result, realigned) = self.realign(dc, params, &fragments, policy).await;
                    (result, dc.world(), realigned.map(|()| None))
                }
                // The plan hands leaders' calls to leaders only, and no gradient round here.
                _ => (RoundResult::Failed, dc.world(), Ok(None)),
            };
            self.plan.handle(&result, world);
            match outcome {
                Ok(Some(report)) => reports.push(report),
                Ok(None) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(reports),
        }
    }

    /// What a recovering rank needs to take this rank's place: the model and the outer state.
    pub fn export(&self, params: &[f32]) -> Vec<(String, Bytes)> {
        let mut out = self.outer.export(self.plan.outer());
        out.push(("params".into(), Bytes::from(f32_bytes(params))));
        out
    }

    /// A rank's state rebuilt from what a healthy rank of its DC exported at inner step `step`
    /// (live recovery); returns it and the model to continue from.
    pub fn import(
        inner: SemiSyncConfig,
        outer: SemiSyncConfig,
        step: u64,
        buffers: &[(String, Vec<u8>)],
    ) -> Result<(CrossDcSemiSync, Vec<f32>), String> {
        let single = SemiSync::import(outer, step, buffers)?;
        let bytes = buffers.iter().find(|(n, _)| n == "params").map(|(_, b)| b).ok_or("no \"params\" buffer")?;
        if bytes.len() != single.anchor().len() * 4 {
            return Err(format!("params of {} bytes for {} parameters", bytes.len(), single.anchor().len()));
        }
        let mut params = vec![0.0f32; single.anchor().len()];
        read_f32(bytes, &mut params);
        let inner = SemiSyncConfig { mode: SyncMode::Synchronous, ..inner };
        let mut plan = CrossDcPlan::new(inner.plan(), outer.plan());
        plan.set_step(step);
        plan.outer_mut().set_unhealed(&single.plan.unhealed())?;
        Ok((CrossDcSemiSync { inner, plan, outer: single.state, inner_bytes: 0 }, params))
    }

    /// The leader (index 0) broadcasts the model and the outer state of `fragments` inside the
    /// DC (under the in-DC policy; the leader always takes part); the others adopt them. A rank
    /// late for it stays as it is until the next one.
    async fn realign(
        &mut self,
        dc: &mut Communicator,
        params: &mut [f32],
        fragments: &[usize],
        policy: FaultPolicy,
    ) -> (RoundResult, Result<(), CommError>) {
        let ranges = &self.outer.ranges;
        let n =
            params.len() + fragments.iter().map(|f| FRAGMENT_STATE * ranges[*f].len() + FRAGMENT_FLAGS).sum::<usize>();
        let payload = if dc.rank() == 0 {
            let mut v = Vec::with_capacity(n);
            v.extend_from_slice(params);
            for f in fragments {
                v.extend(self.outer.fragment_state(*f, self.plan.outer().fragment_flags(*f)));
            }
            f32_bytes(&v)
        } else {
            vec![0u8; n * 4]
        };
        // The in-DC policy: under `Quorum` the round waits for its root, the leader (it comes
        // from the cross-DC round, after the others), and leaves out only a straggler, which
        // stays as it is until the next realignment.
        let options = CallOptions { policy, verify: false };
        let span = info_span!("realign", step = self.plan.step(), fragments = fragments.len());
        let outcome = dc
            .collective(Op::Broadcast { root: 0 }, DType::U8, payload, options, self.inner.deadline)
            .instrument(span)
            .await;
        let result = result_of(&outcome);
        let adopted = outcome.map(|o| {
            if let (Outcome::Done { data, .. }, false) = (o, dc.rank() == 0) {
                let mut v = vec![0.0f32; n];
                read_f32(&data, &mut v);
                params.copy_from_slice(&v[..params.len()]);
                let mut at = params.len();
                for f in fragments {
                    let len = FRAGMENT_STATE * self.outer.ranges[*f].len() + FRAGMENT_FLAGS;
                    let flags = self.outer.set_fragment_state(*f, &v[at..at + len]);
                    self.plan.outer_mut().set_fragment_flags(*f, flags);
                    at += len;
                }
            }
        });
        (result, adopted)
    }
}

/// Vectors of a fragment's length in [`OuterState::fragment_state`] (plus [`FRAGMENT_FLAGS`]).
const FRAGMENT_STATE: usize = 4;
/// Flags at the end of [`OuterState::fragment_state`].
const FRAGMENT_FLAGS: usize = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_state_imports_to_the_same_anchors_momentum_and_schedule() {
        let config = SemiSyncConfig::new(SyncMode::StreamingDiloco { every: 4, fragments: 3 });
        let mut s = SemiSync::new(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], config);
        let o = &mut s.state;
        for (f, r) in o.ranges.clone().into_iter().enumerate() {
            let delta: Vec<f32> = r.clone().map(|i| i as f32 * 0.1).collect();
            o.outer[f].step(&mut o.anchor[r], &delta);
        }
        s.plan.set_step(9);
        let exported: Vec<(String, Vec<u8>)> = s.export().into_iter().map(|(n, b)| (n, b.to_vec())).collect();
        let t = SemiSync::import(config, 9, &exported).expect("imports");
        assert_eq!(t.anchor(), s.anchor());
        for f in 0..3 {
            assert_eq!(t.state.outer[f].velocity(), s.state.outer[f].velocity());
        }
        assert_eq!(t.step(), 9);
        let bad = vec![("anchor".to_string(), vec![0u8; 8]), ("velocity".to_string(), vec![0u8; 4])];
        assert!(SemiSync::import(config, 0, &bad).is_err());
        assert!(SemiSync::import(config, 0, &[]).is_err());
    }
}
