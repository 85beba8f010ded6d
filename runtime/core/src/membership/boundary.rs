//! One rank's step-boundary protocol, sans-IO: what `phalanx_node::elastic::ElasticMember` does
//! at every boundary step, as a state machine a driver feeds with what the coordinators and the
//! collectives answered. The tokio driver and the simulator drive this same code.
//!
//! The protocol (every member runs it at the same step):
//! 1. **Read** the view linearizably. If a change is pending in this rank's epoch and it is the
//!    lowest member not declared failed, **propose** `BeginEpoch { expected }` (refused
//!    harmlessly if someone moved the epoch already) and read again.
//! 2. **Agree**: all-reduce (max, `Shrink`) of the newest epoch each member has seen, over the
//!    current group. Survivors get the same target. If the agreement holds a majority of the
//!    members, the members missing from it are **reported** failed (a rank that finished with
//!    half the group or less is more likely cut off itself: it leaves the verdict to others).
//! 3. If the target is newer: read until the view has reached it. A rank not in its member list
//!    has **departed**; the others **rebuild** their group for the new epoch,
//! 4. **sync** the step (all-reduce max over the new group: joiners start at the group's step),
//! 5. and pass the **admission barrier** (the joiners enter it once they have recovered the
//!    training state).
//!
//! Only the lowest live member proposes, and only before the agreement, so a boundary sees at
//! most one epoch change and every member reads the same view.

use super::{ClusterView, Command, RankStatus};

/// What the driver must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoundaryAction {
    /// Read the view linearizably; answer [`BoundaryInput::View`].
    ReadView,
    /// Propose `command`; answer [`BoundaryInput::Proposed`]. `best_effort`: a failure to
    /// deliver it is logged, not an error of the boundary (failure reports); otherwise the
    /// driver fails the boundary if the coordinators cannot be reached (a refusal is fine).
    Propose {
        /// The command.
        command: Command,
        /// Whether an undelivered proposal may be ignored.
        best_effort: bool,
    },
    /// All-reduce (max, `Shrink`) of `value` over the current group; answer
    /// [`BoundaryInput::Agreed`].
    Agree {
        /// This rank's value.
        value: i64,
    },
    /// Drop the current group and build the one of `view`'s epoch; answer
    /// [`BoundaryInput::Rebuilt`].
    Rebuild {
        /// The view to build from.
        view: ClusterView,
    },
    /// The admission barrier over the new group; answer [`BoundaryInput::BarrierPassed`].
    Barrier,
    /// The boundary is over.
    Done(BoundaryOutcome),
}

/// What happened, for the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoundaryInput {
    /// The view read.
    View(ClusterView),
    /// The proposal was answered (whatever the answer).
    Proposed,
    /// The agreement's result and its participants (indices in the current group).
    Agreed {
        /// The maximum over the participants.
        value: i64,
        /// Who took part.
        participants: Vec<usize>,
    },
    /// The group of the new epoch is built.
    Rebuilt,
    /// The admission barrier passed.
    BarrierPassed,
}

/// How a boundary ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoundaryOutcome {
    /// Same epoch, same group.
    Continue,
    /// A new epoch: its members, and the group's step to go on from.
    Rebuilt {
        /// The epoch.
        epoch: u64,
        /// Its members (rank ids, the group's order).
        members: Vec<u32>,
        /// The step every member goes on from.
        step: u64,
    },
    /// This rank is not a member of `epoch` (the driver lets the `members` that stay have its
    /// last messages, then stops).
    Departed {
        /// The epoch it is not in.
        epoch: u64,
        /// That epoch's members.
        members: Vec<u32>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Start,
    /// Waiting for the first read.
    Read,
    /// The proposer's `BeginEpoch` is out.
    Proposing,
    /// Waiting for the read after proposing.
    Reread,
    /// The agreement is out.
    Agreeing,
    /// Failure reports are out; then the target decides.
    Reporting {
        target: u64,
    },
    /// Reading until the view reaches the target.
    Catching {
        target: u64,
    },
    Rebuilding {
        view: ClusterView,
    },
    Syncing {
        epoch: u64,
        members: Vec<u32>,
    },
    Barrier {
        epoch: u64,
        members: Vec<u32>,
        step: u64,
    },
    Over,
}

/// One rank's boundary (see the module documentation).
///
/// Promise: the actions depend only on the inputs and on what the plan was built with, so two
/// drivers that answer alike run the same protocol.
#[derive(Clone, Debug)]
pub struct BoundaryPlan {
    rank: u32,
    epoch: u64,
    members: Vec<u32>,
    step: u64,
    phase: Phase,
    view: Option<ClusterView>,
    reports: Vec<Command>,
    input: Option<BoundaryInput>,
    outcome: BoundaryOutcome,
}

impl BoundaryPlan {
    /// The boundary of rank `rank` at step `step`, in `epoch` with `members` (rank ids, the
    /// current group's order).
    pub fn new(rank: u32, epoch: u64, members: Vec<u32>, step: u64) -> BoundaryPlan {
        BoundaryPlan {
            rank,
            epoch,
            members,
            step,
            phase: Phase::Start,
            view: None,
            reports: Vec::new(),
            input: None,
            outcome: BoundaryOutcome::Continue,
        }
    }

    /// Hands the answer to the last action in.
    pub fn handle(&mut self, input: BoundaryInput) {
        self.input = Some(input);
    }

    /// The next action. Call again after handing in the answer an action asks for; an action
    /// that is still unanswered is returned again.
    pub fn poll(&mut self) -> BoundaryAction {
        let input = self.input.take();
        let phase = std::mem::replace(&mut self.phase, Phase::Over);
        let (phase, action) = self.step_from(phase, input);
        self.phase = phase;
        action
    }

    fn step_from(&mut self, phase: Phase, input: Option<BoundaryInput>) -> (Phase, BoundaryAction) {
        match (phase, input) {
            (Phase::Start, _) => (Phase::Read, BoundaryAction::ReadView),
            (Phase::Read, Some(BoundaryInput::View(view))) => {
                if view.change_pending() && view.epoch() == self.epoch && self.is_proposer(&view) {
                    let command = Command::BeginEpoch { expected: self.epoch };
                    (Phase::Proposing, BoundaryAction::Propose { command, best_effort: false })
                } else {
                    self.agree_on(view)
                }
            }
            (Phase::Proposing, Some(BoundaryInput::Proposed)) => (Phase::Reread, BoundaryAction::ReadView),
            (Phase::Reread, Some(BoundaryInput::View(view))) => self.agree_on(view),
            (Phase::Agreeing, Some(BoundaryInput::Agreed { value, participants })) => {
                self.reports = self.missing(&participants);
                self.after_reports(u64::try_from(value).unwrap_or(0))
            }
            (Phase::Reporting { target }, Some(BoundaryInput::Proposed)) => {
                if !self.reports.is_empty() {
                    self.reports.remove(0);
                }
                self.after_reports(target)
            }
            (Phase::Catching { target }, Some(BoundaryInput::View(view))) => {
                if view.epoch() < target {
                    return (Phase::Catching { target }, BoundaryAction::ReadView);
                }
                if !view.members().contains(&self.rank) {
                    let (epoch, members) = (view.epoch(), view.members().to_vec());
                    return self.finish(BoundaryOutcome::Departed { epoch, members });
                }
                (Phase::Rebuilding { view: view.clone() }, BoundaryAction::Rebuild { view })
            }
            (Phase::Rebuilding { view }, Some(BoundaryInput::Rebuilt)) => {
                let (epoch, members) = (view.epoch(), view.members().to_vec());
                let value = i64::try_from(self.step).unwrap_or(i64::MAX);
                (Phase::Syncing { epoch, members }, BoundaryAction::Agree { value })
            }
            (Phase::Syncing { epoch, members }, Some(BoundaryInput::Agreed { value, .. })) => {
                let step = u64::try_from(value).unwrap_or(self.step).max(self.step);
                (Phase::Barrier { epoch, members, step }, BoundaryAction::Barrier)
            }
            (Phase::Barrier { epoch, members, step }, Some(BoundaryInput::BarrierPassed)) => {
                self.finish(BoundaryOutcome::Rebuilt { epoch, members, step })
            }
            // Nothing (or not the answer this phase waits for): ask again.
            (phase, _) => {
                let action = self.pending_action(&phase);
                (phase, action)
            }
        }
    }

    /// The action a phase waits on (asked again when polled without its answer).
    fn pending_action(&self, phase: &Phase) -> BoundaryAction {
        match phase {
            Phase::Start | Phase::Read | Phase::Reread | Phase::Catching { .. } => BoundaryAction::ReadView,
            Phase::Proposing => {
                BoundaryAction::Propose { command: Command::BeginEpoch { expected: self.epoch }, best_effort: false }
            }
            Phase::Agreeing => BoundaryAction::Agree { value: self.view.as_ref().map_or(0, |v| v.epoch() as i64) },
            Phase::Reporting { .. } => match self.reports.first() {
                Some(command) => BoundaryAction::Propose { command: command.clone(), best_effort: true },
                None => BoundaryAction::ReadView,
            },
            Phase::Rebuilding { view } => BoundaryAction::Rebuild { view: view.clone() },
            Phase::Syncing { .. } => BoundaryAction::Agree { value: i64::try_from(self.step).unwrap_or(i64::MAX) },
            Phase::Barrier { .. } => BoundaryAction::Barrier,
            Phase::Over => BoundaryAction::Done(self.outcome.clone()),
        }
    }

    fn finish(&mut self, outcome: BoundaryOutcome) -> (Phase, BoundaryAction) {
        self.outcome = outcome.clone();
        (Phase::Over, BoundaryAction::Done(outcome))
    }

    fn agree_on(&mut self, view: ClusterView) -> (Phase, BoundaryAction) {
        let value = i64::try_from(view.epoch()).unwrap_or(i64::MAX);
        self.view = Some(view);
        (Phase::Agreeing, BoundaryAction::Agree { value })
    }

    /// The next failure report, or what the agreed `target` decides.
    fn after_reports(&mut self, target: u64) -> (Phase, BoundaryAction) {
        if let Some(command) = self.reports.first().cloned() {
            return (Phase::Reporting { target }, BoundaryAction::Propose { command, best_effort: true });
        }
        if target <= self.epoch {
            return self.finish(BoundaryOutcome::Continue);
        }
        match self.view.take() {
            Some(view) => self.step_from(Phase::Catching { target }, Some(BoundaryInput::View(view))),
            None => (Phase::Catching { target }, BoundaryAction::ReadView),
        }
    }

    /// The members missing from an agreement with `participants` (group indices), as failure
    /// reports — none unless the agreement holds a majority of the members.
    fn missing(&self, participants: &[usize]) -> Vec<Command> {
        if participants.len() * 2 <= self.members.len() {
            return Vec::new();
        }
        (0..self.members.len())
            .filter(|i| !participants.contains(i))
            .map(|i| Command::ReportFailure { rank: self.members[i], reporter: self.rank, epoch: self.epoch })
            .collect()
    }

    /// The lowest member of the current epoch not declared failed proposes epoch changes.
    fn is_proposer(&self, view: &ClusterView) -> bool {
        self.members
            .iter()
            .find(|r| view.rank(**r).is_some_and(|m| m.status != RankStatus::Failed))
            .is_some_and(|r| *r == self.rank)
    }
}

/// What a joining rank's driver must do next ([`AdmissionPlan`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdmissionAction {
    /// Read the view; answer [`AdmissionInput::View`].
    ReadView,
    /// Propose `BeginEpoch` (the lowest joiner of a job that has not started, once enough
    /// ranks joined); answer [`AdmissionInput::Proposed`].
    Propose(Command),
    /// Not admitted yet: pause (the driver's poll interval), then answer
    /// [`AdmissionInput::Waited`]. The driver gives up after its admission timeout.
    Wait,
    /// Build the group of `view`'s epoch; answer [`AdmissionInput::Rebuilt`].
    Rebuild {
        /// The view of the epoch this rank was admitted into.
        view: ClusterView,
    },
    /// All-reduce (max, `Shrink`) of this rank's step over the new group; answer
    /// [`AdmissionInput::Agreed`].
    Agree {
        /// This rank's step.
        value: i64,
    },
    /// Admitted into `epoch` at the group's `step`. The rank then recovers the state of that
    /// step (or not) and enters through the admission barrier.
    Admitted {
        /// The epoch.
        epoch: u64,
        /// The step to go on from.
        step: u64,
    },
}

/// What happened, for an [`AdmissionPlan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdmissionInput {
    /// The view read.
    View(ClusterView),
    /// The proposal was answered.
    Proposed,
    /// The pause is over.
    Waited,
    /// The group is built.
    Rebuilt,
    /// The step agreement's result.
    Agreed {
        /// The group's step.
        value: i64,
    },
}

/// A joining rank's admission, sans-IO (`ElasticMember::join` after its `Join` committed): read
/// the view until this rank is a member of an epoch — the lowest joiner of a job with no members
/// yet begins the first epoch once `start_world` ranks have joined — then build that epoch's
/// group and take the group's step.
#[derive(Clone, Debug)]
pub struct AdmissionPlan {
    rank: u32,
    start_world: usize,
    /// The epoch admitted into (once known).
    epoch: u64,
    last: AdmissionAction,
    input: Option<AdmissionInput>,
}

impl AdmissionPlan {
    /// Rank `rank` (its id from `Join`) waiting to be admitted; `start_world`: members the
    /// first epoch waits for.
    pub fn new(rank: u32, start_world: usize) -> AdmissionPlan {
        AdmissionPlan { rank, start_world, epoch: 0, last: AdmissionAction::ReadView, input: None }
    }

    /// Hands the answer to the last action in.
    pub fn handle(&mut self, input: AdmissionInput) {
        self.input = Some(input);
    }

    /// The next action (the last one again while it is unanswered).
    pub fn poll(&mut self) -> AdmissionAction {
        let next = match (&self.last, self.input.take()) {
            (AdmissionAction::ReadView, Some(AdmissionInput::View(view))) => {
                if view.members().contains(&self.rank) {
                    AdmissionAction::Rebuild { view }
                } else {
                    let joining: Vec<u32> =
                        view.ranks().filter(|(_, m)| m.status == RankStatus::Joining).map(|(r, _)| r).collect();
                    if view.members().is_empty()
                        && joining.len() >= self.start_world
                        && joining.first() == Some(&self.rank)
                    {
                        AdmissionAction::Propose(Command::BeginEpoch { expected: view.epoch() })
                    } else {
                        AdmissionAction::Wait
                    }
                }
            }
            (AdmissionAction::Propose(_), Some(AdmissionInput::Proposed))
            | (AdmissionAction::Wait, Some(AdmissionInput::Waited)) => AdmissionAction::ReadView,
            (AdmissionAction::Rebuild { view }, Some(AdmissionInput::Rebuilt)) => {
                self.epoch = view.epoch();
                AdmissionAction::Agree { value: 0 }
            }
            (AdmissionAction::Agree { .. }, Some(AdmissionInput::Agreed { value })) => {
                AdmissionAction::Admitted { epoch: self.epoch, step: u64::try_from(value).unwrap_or(0) }
            }
            (last, _) => last.clone(),
        };
        self.last = next.clone();
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(host: &str) -> Command {
        Command::Join { dc: 0, host: host.into(), addrs: vec![format!("{host}:7000")], incarnation: 1 }
    }

    /// Three ranks in epoch 1.
    fn view() -> ClusterView {
        let mut v = ClusterView::new();
        for h in ["a", "b", "c"] {
            v.apply(&join(h)).expect("joins");
        }
        v.apply(&Command::BeginEpoch { expected: 0 }).expect("epoch 1");
        v
    }

    /// Drives `plan`, answering with `answer`, until it is done; returns the actions.
    fn drive(plan: &mut BoundaryPlan, mut answer: impl FnMut(&BoundaryAction) -> BoundaryInput) -> Vec<BoundaryAction> {
        let mut actions = Vec::new();
        loop {
            let a = plan.poll();
            actions.push(a.clone());
            if let BoundaryAction::Done(_) = a {
                return actions;
            }
            plan.handle(answer(&a));
        }
    }

    #[test]
    fn without_a_change_the_boundary_reads_agrees_and_goes_on() {
        let v = view();
        let mut p = BoundaryPlan::new(1, 1, vec![0, 1, 2], 10);
        let actions = drive(&mut p, |a| match a {
            BoundaryAction::ReadView => BoundaryInput::View(v.clone()),
            BoundaryAction::Agree { value } => BoundaryInput::Agreed { value: *value, participants: vec![0, 1, 2] },
            other => panic!("unexpected {other:?}"),
        });
        assert_eq!(
            actions,
            vec![
                BoundaryAction::ReadView,
                BoundaryAction::Agree { value: 1 },
                BoundaryAction::Done(BoundaryOutcome::Continue)
            ]
        );
        assert_eq!(p.poll(), BoundaryAction::Done(BoundaryOutcome::Continue), "done stays done");
    }

    #[test]
    fn a_lost_member_is_reported_by_a_majority_and_the_next_boundary_moves_on_without_it() {
        let mut v = view();
        // Rank 2 missed the agreement: ranks 0 and 1 (a majority of 3) report it.
        let mut p = BoundaryPlan::new(1, 1, vec![0, 1, 2], 10);
        let actions = drive(&mut p, |a| match a {
            BoundaryAction::ReadView => BoundaryInput::View(v.clone()),
            BoundaryAction::Agree { .. } => BoundaryInput::Agreed { value: 1, participants: vec![0, 1] },
            BoundaryAction::Propose { .. } => BoundaryInput::Proposed,
            other => panic!("unexpected {other:?}"),
        });
        let report = Command::ReportFailure { rank: 2, reporter: 1, epoch: 1 };
        assert!(
            actions.contains(&BoundaryAction::Propose { command: report.clone(), best_effort: true }),
            "{actions:?}"
        );
        assert_eq!(actions.last(), Some(&BoundaryAction::Done(BoundaryOutcome::Continue)));
        // A rank alone (1 of 3) reports nobody: it is more likely the one cut off.
        let mut alone = BoundaryPlan::new(2, 1, vec![0, 1, 2], 10);
        let actions = drive(&mut alone, |a| match a {
            BoundaryAction::ReadView => BoundaryInput::View(v.clone()),
            BoundaryAction::Agree { .. } => BoundaryInput::Agreed { value: 1, participants: vec![2] },
            other => panic!("unexpected {other:?}"),
        });
        assert!(!actions.iter().any(|a| matches!(a, BoundaryAction::Propose { .. })), "{actions:?}");
        // Next boundary: the change is pending; rank 0 (the lowest not failed) proposes it, everyone
        // agrees on epoch 2, rebuilds, syncs the step and passes the barrier; rank 2 departs.
        v.apply(&report).expect("reported");
        let mut after = v.clone();
        after.apply(&Command::BeginEpoch { expected: 1 }).expect("epoch 2");
        let mut proposer = BoundaryPlan::new(0, 1, vec![0, 1, 2], 15);
        let mut proposed = false;
        let actions = drive(&mut proposer, |a| match a {
            BoundaryAction::ReadView if proposed => BoundaryInput::View(after.clone()),
            BoundaryAction::ReadView => BoundaryInput::View(v.clone()),
            BoundaryAction::Propose { command: Command::BeginEpoch { expected: 1 }, best_effort: false } => {
                proposed = true;
                BoundaryInput::Proposed
            }
            // Rank 2 is missing from this agreement too: reported again (the log dedups).
            BoundaryAction::Propose { command: Command::ReportFailure { rank: 2, .. }, best_effort: true } => {
                BoundaryInput::Proposed
            }
            // The epoch agreement, then the step sync (rank 1 was at step 17).
            BoundaryAction::Agree { value } if *value < 10 => {
                BoundaryInput::Agreed { value: *value, participants: vec![0, 1] }
            }
            BoundaryAction::Agree { value } => {
                BoundaryInput::Agreed { value: (*value).max(17), participants: vec![0, 1] }
            }
            BoundaryAction::Rebuild { view } => {
                assert_eq!(view.epoch(), 2);
                BoundaryInput::Rebuilt
            }
            BoundaryAction::Barrier => BoundaryInput::BarrierPassed,
            other => panic!("unexpected {other:?}"),
        });
        assert!(proposed);
        let done = BoundaryOutcome::Rebuilt { epoch: 2, members: vec![0, 1], step: 17 };
        assert_eq!(actions.last(), Some(&BoundaryAction::Done(done)), "{actions:?}");
        // Rank 1 read the view before rank 0 proposed: it learns the target from the agreement
        // and reads until the view has it.
        let mut reads = 0;
        let mut follower = BoundaryPlan::new(1, 1, vec![0, 1, 2], 15);
        let actions = drive(&mut follower, |a| match a {
            BoundaryAction::ReadView => {
                reads += 1;
                BoundaryInput::View(if reads < 3 { v.clone() } else { after.clone() })
            }
            BoundaryAction::Agree { value } => {
                BoundaryInput::Agreed { value: (*value).max(2), participants: vec![0, 1] }
            }
            BoundaryAction::Propose { best_effort: true, .. } => BoundaryInput::Proposed,
            BoundaryAction::Rebuild { .. } => BoundaryInput::Rebuilt,
            BoundaryAction::Barrier => BoundaryInput::BarrierPassed,
            other => panic!("unexpected {other:?}"),
        });
        // The first read (epoch 1, no proposal: rank 1 is not the proposer), then until epoch 2.
        assert_eq!(reads, 3);
        assert!(matches!(actions.last(), Some(BoundaryAction::Done(BoundaryOutcome::Rebuilt { epoch: 2, .. }))));
        let mut gone = BoundaryPlan::new(2, 1, vec![0, 1, 2], 15);
        let actions = drive(&mut gone, |a| match a {
            BoundaryAction::ReadView => BoundaryInput::View(after.clone()),
            BoundaryAction::Agree { .. } => BoundaryInput::Agreed { value: 2, participants: vec![2] },
            other => panic!("unexpected {other:?}"),
        });
        let departed = BoundaryOutcome::Departed { epoch: 2, members: vec![0, 1] };
        assert_eq!(actions.last(), Some(&BoundaryAction::Done(departed)));
    }

    #[test]
    fn a_joiner_waits_until_it_is_a_member_then_builds_the_group_and_takes_its_step() {
        let mut v = view();
        v.apply(&join("d")).expect("rank 3 joins");
        let mut p = AdmissionPlan::new(3, 1);
        assert_eq!(p.poll(), AdmissionAction::ReadView);
        p.handle(AdmissionInput::View(v.clone()));
        assert_eq!(p.poll(), AdmissionAction::Wait, "pending, not a member yet");
        assert_eq!(p.poll(), AdmissionAction::Wait, "asked again until answered");
        p.handle(AdmissionInput::Waited);
        assert_eq!(p.poll(), AdmissionAction::ReadView);
        v.apply(&Command::BeginEpoch { expected: 1 }).expect("epoch 2 with rank 3");
        p.handle(AdmissionInput::View(v.clone()));
        assert_eq!(p.poll(), AdmissionAction::Rebuild { view: v.clone() });
        p.handle(AdmissionInput::Rebuilt);
        assert_eq!(p.poll(), AdmissionAction::Agree { value: 0 });
        p.handle(AdmissionInput::Agreed { value: 40 });
        assert_eq!(p.poll(), AdmissionAction::Admitted { epoch: 2, step: 40 });
    }

    #[test]
    fn the_lowest_joiner_begins_the_first_epoch_once_enough_have_joined() {
        let mut v = ClusterView::new();
        v.apply(&join("a")).expect("joins");
        let (mut first, mut second) = (AdmissionPlan::new(0, 2), AdmissionPlan::new(1, 2));
        first.poll();
        first.handle(AdmissionInput::View(v.clone()));
        assert_eq!(first.poll(), AdmissionAction::Wait, "one of two");
        v.apply(&join("b")).expect("joins");
        second.poll();
        second.handle(AdmissionInput::View(v.clone()));
        assert_eq!(second.poll(), AdmissionAction::Wait, "not the lowest");
        first.handle(AdmissionInput::Waited);
        first.poll();
        first.handle(AdmissionInput::View(v.clone()));
        assert_eq!(first.poll(), AdmissionAction::Propose(Command::BeginEpoch { expected: 0 }));
    }

    #[test]
    fn an_unanswered_action_is_asked_again() {
        let mut p = BoundaryPlan::new(0, 1, vec![0, 1], 3);
        assert_eq!(p.poll(), BoundaryAction::ReadView);
        assert_eq!(p.poll(), BoundaryAction::ReadView);
        p.handle(BoundaryInput::Rebuilt); // not what it waits for
        assert_eq!(p.poll(), BoundaryAction::ReadView);
    }
}
