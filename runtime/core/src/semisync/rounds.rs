//! Which collectives a semi-synchronous group runs, in which order and under which policy: the
//! protocol half of `phalanx_node::semisync`, as a sans-IO state machine.
//!
//! Every rank of a group must run the **same sequence of collectives** (a collective is matched
//! across ranks by its place in that sequence), although the ranks see different outcomes: a
//! rank late for a round gets its contribution back while the others apply the result. So the
//! sequence is chosen only from what every rank of a round sees alike — the step, and the
//! participant list the round reports to all its ranks (the late ones too). This module holds
//! that choice and the bookkeeping it depends on; the arithmetic on parameters (anchors, outer
//! optimizer, error feedback) stays with the driver, which is the trainer's process in
//! production and a simulated rank in `phalanx-sim` — both drive this same code.
//!
//! Driving a [`RoundPlan`]: after each inner step call [`RoundPlan::after_inner_step`], then
//! until [`RoundPlan::poll_call`] returns `None`: run the call's collective with the call's
//! policy and report how it ended with [`RoundPlan::handle`]. A failed call ends the step's
//! sequence (the driver reports the error to the trainer). The gradient round of synchronous
//! training is [`RoundPlan::begin_gradients`] then [`RoundPlan::handle`].
//!
//! [`CrossDcPlan`] composes two plans for training across data centres: gradient rounds inside
//! each DC, outer rounds among the DCs' leaders, then a realignment broadcast inside each DC.

use std::collections::VecDeque;
use std::time::Duration;

use phalanx_collectives::group::FaultPolicy;

use super::{Ledger, SyncMode};

/// The settings that decide which collectives run (the rest of a configuration — outer
/// learning rate, compression, deadlines — is the driver's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanConfig {
    /// The algorithm and its period.
    pub mode: SyncMode,
    /// What a round does under faults.
    pub policy: FaultPolicy,
    /// Under `Quorum`: after a round some rank missed, the next round of the same kind waits
    /// this long (if longer than the policy's own wait) for everyone, so a rank that fell behind
    /// gets back in step instead of arriving late to every later round.
    pub catch_up_wait: Duration,
    /// Every this many rounds of a fragment, if some rank missed one of its rounds since the
    /// last complete heal, the round is followed by a heal broadcast (0: never).
    pub heal_every: u64,
}

/// A collective of semi-synchronous training.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncCall {
    /// Average the gradients over the group (synchronous data parallel, or inside a DC).
    Gradients,
    /// Average this rank's outer gradient of `fragment` over the group; the result moves the
    /// fragment's anchor by the outer optimizer.
    Outer {
        /// The parameter fragment.
        fragment: usize,
    },
    /// Broadcast `fragment`'s anchor and outer momentum from group index `root`; a rank whose
    /// anchor lags adopts them.
    Heal {
        /// The parameter fragment.
        fragment: usize,
        /// The broadcasting index (the lowest participant of the fragment's last round).
        root: usize,
    },
    /// Across data centres: the DC's leader (index 0 of the DC's group) broadcasts the model
    /// and the outer state of `fragments` (including their [`FragmentFlags`]) inside the DC.
    Realign {
        /// The fragments whose outer state travels.
        fragments: Vec<usize>,
    },
}

/// A collective to run now, and the fault policy to run it with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedCall {
    /// What to run.
    pub call: SyncCall,
    /// Under which policy.
    pub policy: FaultPolicy,
}

/// How a collective ended on this rank, as far as the plan is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoundResult {
    /// This rank has the result; `participants` took part (group indices, ascending).
    Done {
        /// Who took part.
        participants: Vec<usize>,
    },
    /// The round went on without this rank's contribution (quorum), which it got back.
    Late {
        /// Who took part.
        participants: Vec<usize>,
    },
    /// The collective failed on this rank (deadline, lost peers under `Abort`, lost root).
    Failed,
}

impl RoundResult {
    fn participants(&self) -> Option<&[usize]> {
        match self {
            RoundResult::Done { participants } | RoundResult::Late { participants } => Some(participants),
            RoundResult::Failed => None,
        }
    }
}

/// A fragment's heal bookkeeping: what a realignment hands from a DC's leader to its ranks
/// (so a rank promoted to lead holds its predecessor's flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentFlags {
    /// This rank's anchor may lag the group's (it missed a round since the last heal).
    pub lagging: bool,
    /// Some rank may lag: a round or heal since the last complete heal went without someone.
    pub unhealed: bool,
}

/// One rank's sequence of semi-synchronous collectives (see the module documentation).
///
/// Promise: two ranks whose plans were built with the same configuration, stepped alike and
/// fed the same participant lists (whatever else each saw: done or late) hand out the same
/// calls in the same order, with the same policies and roots.
#[derive(Clone, Debug)]
pub struct RoundPlan {
    config: PlanConfig,
    step: u64,
    /// Contributions riding in each fragment's carried outer gradient.
    carried: Vec<u64>,
    /// The last round's participants, per fragment.
    last_participants: Vec<Vec<usize>>,
    /// The last gradient round's participants.
    last_gradient_participants: Vec<usize>,
    flags: Vec<FragmentFlags>,
    ledger: Ledger,
    /// The step's calls still to run (a policy fixed when queued, or chosen when handed out).
    queue: VecDeque<(SyncCall, Option<FaultPolicy>)>,
    /// The call handed out and not yet handled, with the contributions riding in it.
    running: Option<(SyncCall, u64)>,
}

impl RoundPlan {
    /// A plan at step 0, nothing carried, nobody missing.
    pub fn new(config: PlanConfig) -> RoundPlan {
        let k = config.mode.fragments();
        RoundPlan {
            config,
            step: 0,
            carried: vec![0; k],
            last_participants: vec![Vec::new(); k],
            last_gradient_participants: Vec::new(),
            flags: vec![FragmentFlags::default(); k],
            ledger: Ledger::default(),
            queue: VecDeque::new(),
            running: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> PlanConfig {
        self.config
    }

    /// Inner steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Sets the step (a rank that recovered another's state at that step; a DC's follower,
    /// whose outer schedule advances with its leader's).
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// The accounting of this rank's contributions.
    pub fn ledger(&self) -> Ledger {
        self.ledger
    }

    /// Contributions riding in the call handed out (0 when none is).
    pub fn riding(&self) -> u64 {
        self.running.as_ref().map_or(0, |(_, r)| *r)
    }

    /// Whether this rank's anchor of any fragment may lag the group's.
    pub fn lagging(&self) -> bool {
        self.flags.iter().any(|f| f.lagging)
    }

    /// Fragment `f`'s heal bookkeeping.
    pub fn fragment_flags(&self, f: usize) -> FragmentFlags {
        self.flags[f]
    }

    /// Adopts fragment `f`'s heal bookkeeping from the rank that leads this one's DC.
    pub fn set_fragment_flags(&mut self, f: usize, flags: FragmentFlags) {
        self.flags[f] = flags;
    }

    /// Per fragment: whether some rank may lag (what a recovering rank must import to run
    /// the same heals as the rank it recovered from).
    pub fn unhealed(&self) -> Vec<bool> {
        self.flags.iter().map(|f| f.unhealed).collect()
    }

    /// Imports [`RoundPlan::unhealed`]; refuses a list of the wrong length.
    pub fn set_unhealed(&mut self, unhealed: &[bool]) -> Result<(), String> {
        if unhealed.len() != self.flags.len() {
            return Err(format!("{} heal flags for {} fragments", unhealed.len(), self.flags.len()));
        }
        for (f, u) in self.flags.iter_mut().zip(unhealed) {
            f.unhealed = *u;
        }
        Ok(())
    }

    /// The group changed (a new epoch: ranks left or joined, or another rank leads a DC).
    /// Every fragment is marked for healing at its next heal round and the catch-up wait is
    /// forgotten. Every member of the new group calls this at the same step (the epoch's
    /// boundary; a joiner after importing its state), so they all run the same collectives
    /// from there although they saw different rounds before.
    pub fn group_changed(&mut self) {
        self.flags.iter_mut().for_each(|f| f.unhealed = true);
        self.last_participants.iter_mut().for_each(Vec::clear);
        self.last_gradient_participants.clear();
    }

    /// Synchronous training's round after an inner step's backward pass: the gradient
    /// all-reduce (one new contribution; a late one is stale by the next step and is reported
    /// dropped, not carried). Report its end with [`RoundPlan::handle`].
    pub fn begin_gradients(&mut self, world: usize) -> PlannedCall {
        self.step += 1;
        let riding = self.ledger.offer(0);
        let policy = self.policy_after(&self.last_gradient_participants, world);
        self.running = Some((SyncCall::Gradients, riding));
        PlannedCall { call: SyncCall::Gradients, policy }
    }

    /// An inner step was taken: the rounds of the fragments due now are queued (none most steps).
    pub fn after_inner_step(&mut self) {
        self.step += 1;
        self.queue.clear();
        for f in self.config.mode.due(self.step) {
            self.queue.push_back((SyncCall::Outer { fragment: f }, None));
        }
    }

    /// Queues a heal of every fragment under `Shrink` (every rank calls it at the same point,
    /// e.g. before evaluation or a checkpoint): the root is the lowest participant of the
    /// fragment's last round.
    pub fn resync(&mut self) {
        self.queue.clear();
        for f in 0..self.flags.len() {
            let root = self.last_participants[f].first().copied().unwrap_or(0);
            self.queue.push_back((SyncCall::Heal { fragment: f, root }, Some(FaultPolicy::Shrink)));
        }
    }

    /// The next collective of the step, in a group of `world`; `None` when the step's sequence
    /// is done (or a call is handed out and not yet handled).
    pub fn poll_call(&mut self, world: usize) -> Option<PlannedCall> {
        if self.running.is_some() {
            return None;
        }
        let (call, fixed) = self.queue.pop_front()?;
        let (policy, riding) = match &call {
            SyncCall::Outer { fragment } => {
                let f = *fragment;
                let riding = self.ledger.offer(std::mem::take(&mut self.carried[f]));
                (self.policy_after(&self.last_participants[f], world), riding)
            }
            _ => (self.config.policy, 0),
        };
        self.running = Some((call.clone(), riding));
        Some(PlannedCall { call, policy: fixed.unwrap_or(policy) })
    }

    /// How the call handed out ended, in a group of `world`. A failed call ends the step's
    /// sequence; a completed round may queue its fragment's heal.
    pub fn handle(&mut self, result: &RoundResult, world: usize) {
        let Some((call, riding)) = self.running.take() else { return };
        match (&call, result) {
            (SyncCall::Gradients, RoundResult::Done { .. }) => self.ledger.applied(riding),
            (SyncCall::Gradients, _) => self.ledger.dropped(riding),
            (SyncCall::Outer { .. }, RoundResult::Done { .. }) => self.ledger.applied(riding),
            (SyncCall::Outer { fragment }, RoundResult::Late { .. }) => {
                self.carried[*fragment] = riding;
                self.ledger.carried(riding);
                self.flags[*fragment].lagging = true;
            }
            (SyncCall::Outer { fragment }, RoundResult::Failed) => {
                self.flags[*fragment].lagging = true;
                self.ledger.dropped(riding);
            }
            (SyncCall::Heal { fragment, .. }, RoundResult::Done { participants }) => {
                self.flags[*fragment] = FragmentFlags { lagging: false, unhealed: participants.len() < world };
            }
            (SyncCall::Heal { fragment, .. }, RoundResult::Late { participants }) => {
                self.flags[*fragment].unhealed = participants.len() < world;
            }
            (SyncCall::Heal { .. } | SyncCall::Realign { .. }, _) => {}
        }
        let Some(participants) = result.participants() else {
            self.queue.clear();
            return;
        };
        match call {
            SyncCall::Gradients => self.last_gradient_participants = participants.to_vec(),
            SyncCall::Outer { fragment: f } => {
                self.last_participants[f] = participants.to_vec();
                if participants.len() < world {
                    self.flags[f].unhealed = true;
                }
                // A function of the step and of outcomes every rank saw alike, so a rank that
                // rejoined with recovered state (the flags included) runs the same sequence as
                // the others. Nobody missing since the last heal: no broadcast.
                let round = self.config.mode.round_index(self.step, f);
                let every = self.config.heal_every;
                if every > 0 && round.is_multiple_of(every) && self.flags[f].unhealed {
                    let root = participants.first().copied().unwrap_or(0);
                    self.queue.push_front((SyncCall::Heal { fragment: f, root }, Some(self.config.policy)));
                }
            }
            SyncCall::Heal { .. } | SyncCall::Realign { .. } => {}
        }
    }

    /// The policy of a round after one with participants `last` (empty: none yet) in a group
    /// of `world`: the configured one, with the catch-up wait if someone was missing.
    fn policy_after(&self, last: &[usize], world: usize) -> FaultPolicy {
        match self.config.policy {
            FaultPolicy::Quorum { min, wait } if !last.is_empty() && last.len() < world => {
                FaultPolicy::Quorum { min, wait: wait.max(self.config.catch_up_wait) }
            }
            p => p,
        }
    }
}

/// Which group a [`CrossDcPlan`]'s call runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallGroup {
    /// The rank's data centre (index 0 leads it).
    Dc,
    /// The DCs' leaders (only a leader gets such calls).
    Leaders,
}

/// A collective of cross-DC training and the group it runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrossDcCall {
    /// Where it runs.
    pub group: CallGroup,
    /// What it is and its policy.
    pub call: PlannedCall,
}

/// Semi-synchronous training across data centres, the protocol half of
/// `phalanx_node::semisync::CrossDcSemiSync`: inside a DC, a gradient all-reduce every step
/// (the DC's ranks are replicas); across DCs, the leaders (index 0 of each DC's group) run
/// the outer rounds of a [`RoundPlan`] among themselves; after every step with outer rounds
/// due, the leader broadcasts the model and those fragments' outer state inside its DC
/// ([`SyncCall::Realign`], under the inner policy). The realignment runs even when the
/// leaders' rounds failed, so every rank of a DC runs the same collectives.
#[derive(Clone, Debug)]
pub struct CrossDcPlan {
    inner: RoundPlan,
    outer: RoundPlan,
    step: u64,
    leader: bool,
    realign: Option<Vec<usize>>,
    realigning: bool,
}

impl CrossDcPlan {
    /// Plans for the in-DC rounds (`inner`, run synchronously whatever its mode) and the
    /// cross-DC rounds (`outer`).
    pub fn new(inner: PlanConfig, outer: PlanConfig) -> CrossDcPlan {
        CrossDcPlan {
            inner: RoundPlan::new(PlanConfig { mode: SyncMode::Synchronous, ..inner }),
            outer: RoundPlan::new(outer),
            step: 0,
            leader: false,
            realign: None,
            realigning: false,
        }
    }

    /// The in-DC plan (gradient rounds).
    pub fn inner(&self) -> &RoundPlan {
        &self.inner
    }

    /// The cross-DC plan (outer rounds; its ledger counts on leaders only).
    pub fn outer(&self) -> &RoundPlan {
        &self.outer
    }

    /// The cross-DC plan, to adopt flags from a realignment or import a recovered state.
    pub fn outer_mut(&mut self) -> &mut RoundPlan {
        &mut self.outer
    }

    /// Inner steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Sets every step counter (a rank recovering another's state at `step`).
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
        self.inner.set_step(step);
        self.outer.set_step(step);
    }

    /// The in-DC gradient round (report it with [`CrossDcPlan::handle_gradients`]).
    pub fn begin_gradients(&mut self, dc_world: usize) -> PlannedCall {
        self.inner.begin_gradients(dc_world)
    }

    /// How the gradient round ended.
    pub fn handle_gradients(&mut self, result: &RoundResult, dc_world: usize) {
        self.inner.handle(result, dc_world);
    }

    /// An inner step was taken; `leader`: this rank is index 0 of its DC's group (and has the
    /// leaders' group). A follower's outer schedule advances with its leader's.
    pub fn after_inner_step(&mut self, leader: bool) {
        self.step += 1;
        self.leader = leader;
        let due = self.outer.config().mode.due(self.step);
        if leader {
            self.outer.after_inner_step();
        } else {
            self.outer.set_step(self.step);
        }
        self.realign = (!due.is_empty()).then_some(due);
    }

    /// Heals every fragment among the leaders, then realigns every DC on its leader with all
    /// fragments (before evaluation or a checkpoint; every rank calls it at the same point).
    pub fn resync(&mut self, leader: bool) {
        self.leader = leader;
        if leader {
            self.outer.resync();
        }
        self.realign = Some((0..self.outer.config().mode.fragments()).collect());
    }

    /// The groups changed (a new epoch); every rank calls it at the epoch's boundary.
    pub fn group_changed(&mut self) {
        self.inner.group_changed();
        self.outer.group_changed();
    }

    /// The next collective: the leaders' rounds first (on a leader), then the realignment;
    /// `None` when the step is done. `leaders_world` is the leaders' group size (leaders only).
    pub fn poll_call(&mut self, leaders_world: Option<usize>) -> Option<CrossDcCall> {
        if self.realigning {
            return None;
        }
        if let (true, Some(world)) = (self.leader, leaders_world) {
            if let Some(call) = self.outer.poll_call(world) {
                return Some(CrossDcCall { group: CallGroup::Leaders, call });
            }
            if self.outer.running.is_some() {
                return None;
            }
        }
        let fragments = self.realign.take()?;
        self.realigning = true;
        let policy = self.inner.config().policy;
        Some(CrossDcCall { group: CallGroup::Dc, call: PlannedCall { call: SyncCall::Realign { fragments }, policy } })
    }

    /// How the call handed out ended (`world`: the size of the group it ran on). A follower
    /// that received a realignment adopts the flags it carried with
    /// [`RoundPlan::set_fragment_flags`] on [`CrossDcPlan::outer_mut`].
    pub fn handle(&mut self, result: &RoundResult, world: usize) {
        if std::mem::take(&mut self.realigning) {
            return;
        }
        self.outer.handle(result, world);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mode: SyncMode, policy: FaultPolicy) -> PlanConfig {
        PlanConfig { mode, policy, catch_up_wait: Duration::from_secs(5), heal_every: 2 }
    }

    fn quorum() -> FaultPolicy {
        FaultPolicy::Quorum { min: 2, wait: Duration::from_millis(100) }
    }

    /// Runs the step's calls, answering each with `answer(call)`; returns them.
    fn drain(plan: &mut RoundPlan, world: usize, answer: impl Fn(&SyncCall) -> RoundResult) -> Vec<PlannedCall> {
        let mut calls = Vec::new();
        while let Some(c) = plan.poll_call(world) {
            plan.handle(&answer(&c.call), world);
            calls.push(c);
        }
        calls
    }

    #[test]
    fn fragments_sync_on_their_schedule_and_nothing_heals_when_nobody_was_missing() {
        let mut p = RoundPlan::new(config(SyncMode::StreamingDiloco { every: 4, fragments: 2 }, FaultPolicy::Shrink));
        let mut seen = Vec::new();
        for _ in 0..8 {
            p.after_inner_step();
            for c in drain(&mut p, 3, |_| RoundResult::Done { participants: vec![0, 1, 2] }) {
                seen.push((p.step(), c.call));
            }
        }
        let outer = |s, f| (s, SyncCall::Outer { fragment: f });
        assert_eq!(seen, vec![outer(2, 1), outer(4, 0), outer(6, 1), outer(8, 0)]);
        assert_eq!(p.ledger(), Ledger { offered: 4, applied: 4, pending: 0, dropped: 0 });
    }

    #[test]
    fn a_late_rank_carries_and_every_rank_heals_at_the_same_round() {
        let c = config(SyncMode::Diloco { every: 1 }, quorum());
        let (mut on_time, mut late) = (RoundPlan::new(c), RoundPlan::new(c));
        let all = vec![0, 1, 2];
        let two = vec![0, 1];
        // Round 1: rank 2 is late (the others report the same two participants).
        on_time.after_inner_step();
        late.after_inner_step();
        let a = drain(&mut on_time, 3, |_| RoundResult::Done { participants: two.clone() });
        let b = drain(&mut late, 3, |_| RoundResult::Late { participants: two.clone() });
        assert_eq!(a, b);
        assert_eq!(a.len(), 1, "round 1 is odd: no heal yet");
        assert_eq!(late.ledger().pending, 1);
        assert!(late.lagging() && !on_time.lagging());
        // Round 2: everyone in; the catch-up wait applies; the heal follows (round 2 of every 2).
        on_time.after_inner_step();
        late.after_inner_step();
        let a = drain(&mut on_time, 3, |_| RoundResult::Done { participants: all.clone() });
        let b = drain(&mut late, 3, |_| RoundResult::Done { participants: all.clone() });
        assert_eq!(a, b);
        assert_eq!(a[0].policy, FaultPolicy::Quorum { min: 2, wait: Duration::from_secs(5) });
        assert_eq!(a[1].call, SyncCall::Heal { fragment: 0, root: 0 });
        assert_eq!(late.ledger(), Ledger { offered: 2, applied: 2, pending: 0, dropped: 0 });
        assert!(!late.lagging());
        // Round 4: nobody missing since the complete heal: no broadcast.
        for _ in 0..2 {
            on_time.after_inner_step();
            assert_eq!(drain(&mut on_time, 3, |_| RoundResult::Done { participants: all.clone() }).len(), 1);
        }
    }

    #[test]
    fn a_failed_round_drops_its_contribution_and_ends_the_step() {
        let mut p = RoundPlan::new(config(SyncMode::StreamingDiloco { every: 1, fragments: 2 }, FaultPolicy::Abort));
        p.after_inner_step();
        let calls = drain(&mut p, 2, |_| RoundResult::Failed);
        assert_eq!(calls.len(), 1, "the second fragment's round is not run after a failure");
        assert_eq!(p.ledger(), Ledger { offered: 1, applied: 0, pending: 0, dropped: 1 });
        assert!(p.lagging());
    }

    #[test]
    fn a_changed_group_heals_every_fragment_at_its_next_heal_round() {
        let mut p = RoundPlan::new(config(SyncMode::Diloco { every: 1 }, FaultPolicy::Shrink));
        let all = vec![0, 1];
        p.after_inner_step();
        drain(&mut p, 2, |_| RoundResult::Done { participants: all.clone() });
        p.group_changed();
        p.after_inner_step();
        let calls = drain(&mut p, 2, |_| RoundResult::Done { participants: all.clone() });
        assert_eq!(calls[1].call, SyncCall::Heal { fragment: 0, root: 0 });
        assert_eq!(p.unhealed(), vec![false]);
        assert!(p.set_unhealed(&[true, true]).is_err());
    }

    #[test]
    fn resync_heals_every_fragment_from_its_last_rounds_lowest_participant_under_shrink() {
        let mut p = RoundPlan::new(config(SyncMode::StreamingDiloco { every: 2, fragments: 2 }, quorum()));
        for _ in 0..2 {
            p.after_inner_step();
            drain(&mut p, 3, |_| RoundResult::Done { participants: vec![1, 2] });
        }
        p.resync();
        let calls = drain(&mut p, 3, |_| RoundResult::Done { participants: vec![0, 1, 2] });
        let heal = |f| PlannedCall { call: SyncCall::Heal { fragment: f, root: 1 }, policy: FaultPolicy::Shrink };
        assert_eq!(calls, vec![heal(0), heal(1)]);
    }

    #[test]
    fn across_dcs_leaders_run_the_outer_rounds_then_every_dc_realigns_even_after_a_failure() {
        let inner = config(SyncMode::Synchronous, FaultPolicy::Shrink);
        let outer = config(SyncMode::Diloco { every: 2 }, FaultPolicy::Abort);
        let (mut leader, mut follower) = (CrossDcPlan::new(inner, outer), CrossDcPlan::new(inner, outer));
        let run = |p: &mut CrossDcPlan, is_leader: bool, outer_result: RoundResult| {
            p.after_inner_step(is_leader);
            let mut calls = Vec::new();
            while let Some(c) = p.poll_call(is_leader.then_some(2)) {
                let r = match c.group {
                    CallGroup::Leaders => outer_result.clone(),
                    CallGroup::Dc => RoundResult::Done { participants: vec![0, 1] },
                };
                p.handle(&r, 2);
                calls.push(c);
            }
            calls
        };
        assert!(run(&mut leader, true, RoundResult::Failed).is_empty(), "step 1: nothing due");
        assert!(run(&mut follower, false, RoundResult::Failed).is_empty());
        let l = run(&mut leader, true, RoundResult::Failed);
        let f = run(&mut follower, false, RoundResult::Failed);
        assert_eq!(l.iter().map(|c| c.group).collect::<Vec<_>>(), vec![CallGroup::Leaders, CallGroup::Dc]);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0], l[1]);
        assert_eq!(f[0].call.call, SyncCall::Realign { fragments: vec![0] });
        assert_eq!(leader.outer().ledger().dropped, 1);
        assert_eq!(follower.outer().ledger().offered, 0, "the outer ledger counts on leaders only");
        assert_eq!(follower.outer().step(), 2);
    }
}
