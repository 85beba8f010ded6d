//! The cluster view as a deterministic state machine.

use std::collections::BTreeMap;

use thiserror::Error;

/// Where a rank stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RankStatus {
    /// Admitted; becomes a member at the next epoch.
    Joining,
    /// A member of the current epoch.
    Active,
    /// Asked to leave; stays a member until the next epoch.
    Leaving,
    /// Declared failed (reported, or silent past the failure timeout); out at the next epoch,
    /// and its commands are refused until it joins again.
    Failed,
}

/// One rank of the view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Data centre.
    pub dc: u32,
    /// Host name.
    pub host: String,
    /// Transport addresses.
    pub addrs: Vec<String>,
    /// Process incarnation (a restarted process has a new one).
    pub incarnation: u64,
    /// Status.
    pub status: RankStatus,
    /// The training step it last reported.
    pub step: u64,
}

/// A change to the view, as stored in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// A process asks to join; it gets the lowest free rank id (or its old id back, when the
    /// same host and address rejoin with a new incarnation after being declared failed).
    Join {
        /// Data centre.
        dc: u32,
        /// Host name.
        host: String,
        /// Transport addresses.
        addrs: Vec<String>,
        /// Process incarnation.
        incarnation: u64,
    },
    /// A member leaves at the next epoch boundary.
    Leave {
        /// The rank.
        rank: u32,
        /// The epoch it believes current.
        epoch: u64,
    },
    /// `reporter` saw `rank` unreachable (a transport `PeerUnreachable`), or the coordinators'
    /// failure detector declared it silent (`reporter == rank`).
    ReportFailure {
        /// The failed rank.
        rank: u32,
        /// Who says so.
        reporter: u32,
        /// The epoch the reporter believes current.
        epoch: u64,
    },
    /// A member's progress (the failure detector's heartbeat, folded into the log at step
    /// boundaries).
    Progress {
        /// The rank.
        rank: u32,
        /// The epoch it believes current.
        epoch: u64,
        /// Its training step.
        step: u64,
    },
    /// Starts the next epoch: joiners become members, leavers and failed ranks are dropped.
    /// Refused unless `expected` is the current epoch (two proposers cannot both move it).
    BeginEpoch {
        /// The epoch the proposer saw.
        expected: u64,
    },
}

/// What applying a command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted as `rank`; a member from epoch `from_epoch` on.
    Joined {
        /// Its rank id.
        rank: u32,
        /// The first epoch it will be a member of.
        from_epoch: u64,
    },
    /// Status changed (leave, failure) or progress recorded.
    Updated,
    /// Already so (a repeated report): nothing changed.
    Unchanged,
    /// Epoch `epoch` began with these members (ascending).
    EpochBegan {
        /// The new epoch.
        epoch: u64,
        /// Its members.
        members: Vec<u32>,
    },
}

/// Why a command was refused. A refused command changes nothing.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ViewError {
    /// The sender's epoch is older than the view's: it missed an epoch (a zombie) and must
    /// rejoin.
    #[error("rank {rank} is in epoch {given}, the view is in epoch {current}: rejoin")]
    StaleEpoch {
        /// The sender.
        rank: u32,
        /// Its epoch.
        given: u64,
        /// The view's.
        current: u64,
    },
    /// A `BeginEpoch` proposed from another epoch than the current one.
    #[error("epoch change expected epoch {expected}, the view is in epoch {current}")]
    EpochMoved {
        /// What the proposer saw.
        expected: u64,
        /// The view's.
        current: u64,
    },
    /// No such rank in the view.
    #[error("rank {0} is not in the view")]
    UnknownRank(u32),
    /// The rank was declared failed: its commands are refused until it rejoins.
    #[error("rank {0} was declared failed: rejoin with a new incarnation")]
    Fenced(u32),
    /// A join repeats a live process (same host, addresses and incarnation).
    #[error("a process with incarnation {incarnation} already holds rank {rank}")]
    AlreadyJoined {
        /// Its rank.
        rank: u32,
        /// Its incarnation.
        incarnation: u64,
    },
    /// The view has no free rank id left.
    #[error("no rank id left")]
    Full,
}

/// The replicated cluster view. Apply commands in log order with [`ClusterView::apply`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterView {
    epoch: u64,
    ranks: BTreeMap<u32, Member>,
    /// Members of the current epoch, ascending.
    members: Vec<u32>,
}

impl ClusterView {
    /// An empty view at epoch 0 (no members).
    pub fn new() -> ClusterView {
        ClusterView::default()
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The members of the current epoch, ascending (what communicators are built from).
    pub fn members(&self) -> &[u32] {
        &self.members
    }

    /// Every rank the view knows, with its record.
    pub fn ranks(&self) -> impl Iterator<Item = (u32, &Member)> + '_ {
        self.ranks.iter().map(|(r, m)| (*r, m))
    }

    /// One rank's record.
    pub fn rank(&self, rank: u32) -> Option<&Member> {
        self.ranks.get(&rank)
    }

    /// A view from its parts (the snapshot decoder; it checks that `members` are ascending
    /// and known).
    pub(super) fn from_parts(epoch: u64, ranks: BTreeMap<u32, Member>, members: Vec<u32>) -> ClusterView {
        ClusterView { epoch, ranks, members }
    }

    /// Whether beginning an epoch now would change the member list.
    pub fn change_pending(&self) -> bool {
        self.ranks.values().any(|m| m.status != RankStatus::Active)
    }

    /// Applies one command. Errors change nothing; the same commands in the same order give
    /// the same view on every coordinator.
    pub fn apply(&mut self, c: &Command) -> Result<Outcome, ViewError> {
        match c {
            Command::Join { dc, host, addrs, incarnation } => {
                let mut same = self.ranks.iter().filter(|(_, m)| m.host == *host && m.addrs == *addrs);
                // The same process again (a retried join): refused, it already has its rank.
                if let Some((r, _)) =
                    same.clone().find(|(_, m)| m.incarnation == *incarnation && m.status != RankStatus::Failed)
                {
                    return Err(ViewError::AlreadyJoined { rank: *r, incarnation: *incarnation });
                }
                // A restarted process rejoining: its old id, once the old one is out.
                let old = same.find(|(r, m)| m.status == RankStatus::Failed && !self.members.contains(r));
                let rank = match old {
                    Some((r, _)) => *r,
                    None => self.free_id()?,
                };
                let member = Member {
                    dc: *dc,
                    host: host.clone(),
                    addrs: addrs.clone(),
                    incarnation: *incarnation,
                    status: RankStatus::Joining,
                    step: 0,
                };
                self.ranks.insert(rank, member);
                Ok(Outcome::Joined { rank, from_epoch: self.epoch + 1 })
            }
            Command::Leave { rank, epoch } => Ok(set_status(self.live(*rank, *epoch)?, RankStatus::Leaving)),
            Command::ReportFailure { rank, reporter, epoch } => {
                if *epoch < self.epoch {
                    return Err(ViewError::StaleEpoch { rank: *reporter, given: *epoch, current: self.epoch });
                }
                if reporter != rank {
                    // The reporter must be a live member itself.
                    self.live(*reporter, *epoch)?;
                }
                let m = self.ranks.get_mut(rank).ok_or(ViewError::UnknownRank(*rank))?;
                Ok(set_status(m, RankStatus::Failed))
            }
            Command::Progress { rank, epoch, step } => {
                let m = self.live(*rank, *epoch)?;
                m.step = m.step.max(*step);
                Ok(Outcome::Updated)
            }
            Command::BeginEpoch { expected } => {
                if *expected != self.epoch {
                    return Err(ViewError::EpochMoved { expected: *expected, current: self.epoch });
                }
                self.epoch += 1;
                self.ranks.retain(|_, m| !matches!(m.status, RankStatus::Leaving | RankStatus::Failed));
                for m in self.ranks.values_mut() {
                    m.status = RankStatus::Active;
                }
                self.members = self.ranks.keys().copied().collect();
                Ok(Outcome::EpochBegan { epoch: self.epoch, members: self.members.clone() })
            }
        }
    }

    /// A rank that may act in `epoch`: known, not failed, and not behind the view.
    fn live(&mut self, rank: u32, epoch: u64) -> Result<&mut Member, ViewError> {
        let current = self.epoch;
        let m = self.ranks.get_mut(&rank).ok_or(ViewError::UnknownRank(rank))?;
        if m.status == RankStatus::Failed {
            return Err(ViewError::Fenced(rank));
        }
        if epoch < current {
            return Err(ViewError::StaleEpoch { rank, given: epoch, current });
        }
        Ok(m)
    }

    /// The lowest rank id no record holds.
    fn free_id(&self) -> Result<u32, ViewError> {
        let mut next = 0u32;
        for r in self.ranks.keys() {
            if *r != next {
                break;
            }
            next = next.checked_add(1).ok_or(ViewError::Full)?;
        }
        Ok(next)
    }
}

/// Sets `m`'s status: `Unchanged` if it already had it.
fn set_status(m: &mut Member, status: RankStatus) -> Outcome {
    if m.status == status {
        return Outcome::Unchanged;
    }
    m.status = status;
    Outcome::Updated
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn join(host: &str, incarnation: u64) -> Command {
        Command::Join { dc: 0, host: host.into(), addrs: vec![format!("{host}:7000")], incarnation }
    }

    #[test]
    fn joins_take_effect_at_the_next_epoch_and_failures_leave_at_the_one_after() {
        let mut v = ClusterView::new();
        for (i, h) in ["a", "b", "c"].iter().enumerate() {
            assert_eq!(v.apply(&join(h, 1)), Ok(Outcome::Joined { rank: i as u32, from_epoch: 1 }));
        }
        assert!(v.members().is_empty(), "nobody is a member before the epoch begins");
        assert_eq!(
            v.apply(&Command::BeginEpoch { expected: 0 }),
            Ok(Outcome::EpochBegan { epoch: 1, members: vec![0, 1, 2] })
        );
        assert_eq!(v.apply(&Command::ReportFailure { rank: 1, reporter: 0, epoch: 1 }), Ok(Outcome::Updated));
        assert_eq!(v.apply(&Command::ReportFailure { rank: 1, reporter: 2, epoch: 1 }), Ok(Outcome::Unchanged));
        assert_eq!(v.members(), &[0, 1, 2], "still a member until the epoch changes");
        assert_eq!(
            v.apply(&Command::BeginEpoch { expected: 1 }),
            Ok(Outcome::EpochBegan { epoch: 2, members: vec![0, 2] })
        );
        // A second proposer that saw epoch 1 cannot move it again.
        assert_eq!(
            v.apply(&Command::BeginEpoch { expected: 1 }),
            Err(ViewError::EpochMoved { expected: 1, current: 2 })
        );
    }

    #[test]
    fn a_zombie_is_fenced_until_it_rejoins_with_a_new_incarnation() {
        let mut v = ClusterView::new();
        v.apply(&join("a", 1)).unwrap();
        v.apply(&join("b", 1)).unwrap();
        v.apply(&Command::BeginEpoch { expected: 0 }).unwrap();
        v.apply(&Command::ReportFailure { rank: 1, reporter: 1, epoch: 1 }).unwrap();
        // Declared failed: its own commands are refused even in the current epoch.
        assert_eq!(v.apply(&Command::Progress { rank: 1, epoch: 1, step: 9 }), Err(ViewError::Fenced(1)));
        v.apply(&Command::BeginEpoch { expected: 1 }).unwrap();
        assert_eq!(
            v.apply(&Command::Progress { rank: 0, epoch: 1, step: 3 }),
            Err(ViewError::StaleEpoch { rank: 0, given: 1, current: 2 })
        );
        // The restarted process rejoins: its old id, a member from the next epoch.
        assert_eq!(v.apply(&join("b", 2)), Ok(Outcome::Joined { rank: 1, from_epoch: 3 }));
        assert_eq!(v.apply(&join("b", 2)), Err(ViewError::AlreadyJoined { rank: 1, incarnation: 2 }));
        assert_eq!(
            v.apply(&Command::BeginEpoch { expected: 2 }),
            Ok(Outcome::EpochBegan { epoch: 3, members: vec![0, 1] })
        );
        assert_eq!(v.rank(1).map(|m| m.incarnation), Some(2));
        // Failed and rejoining within one epoch (its old record still a member): a new id, and
        // a retried join is refused instead of making another record.
        v.apply(&Command::ReportFailure { rank: 0, reporter: 1, epoch: 3 }).unwrap();
        assert_eq!(v.apply(&join("a", 2)), Ok(Outcome::Joined { rank: 2, from_epoch: 4 }));
        assert_eq!(v.apply(&join("a", 2)), Err(ViewError::AlreadyJoined { rank: 2, incarnation: 2 }));
        assert_eq!(
            v.apply(&Command::BeginEpoch { expected: 3 }),
            Ok(Outcome::EpochBegan { epoch: 4, members: vec![1, 2] })
        );
    }

    fn command() -> impl Strategy<Value = Command> {
        prop_oneof![
            (0u32..3, 0usize..6, 1u64..4).prop_map(|(dc, h, incarnation)| Command::Join {
                dc,
                host: format!("h{h}"),
                addrs: vec![format!("h{h}:1")],
                incarnation
            }),
            (0u32..8, 0u64..6).prop_map(|(rank, epoch)| Command::Leave { rank, epoch }),
            (0u32..8, 0u32..8, 0u64..6).prop_map(|(rank, reporter, epoch)| Command::ReportFailure {
                rank,
                reporter,
                epoch
            }),
            (0u32..8, 0u64..6, 0u64..100).prop_map(|(rank, epoch, step)| Command::Progress { rank, epoch, step }),
            (0u64..6).prop_map(|expected| Command::BeginEpoch { expected }),
        ]
    }

    proptest! {
        #[test]
        fn any_log_keeps_the_invariants_and_replays_to_the_same_view(log in proptest::collection::vec(command(), 0..80)) {
            let mut v = ClusterView::new();
            let mut outcomes = Vec::new();
            for c in &log {
                let (epoch, members) = (v.epoch(), v.members().to_vec());
                let before = v.clone();
                let r = v.apply(c);
                if r.is_err() {
                    prop_assert_eq!(&v, &before, "a refused command changes nothing");
                }
                // The epoch only grows, by one, and only a BeginEpoch moves it or the members.
                match (c, &r) {
                    (Command::BeginEpoch { .. }, Ok(_)) => prop_assert_eq!(v.epoch(), epoch + 1),
                    _ => {
                        prop_assert_eq!(v.epoch(), epoch);
                        prop_assert_eq!(v.members(), &members[..]);
                    }
                }
                // Members are ascending, distinct, and all known.
                prop_assert!(v.members().windows(2).all(|w| w[0] < w[1]));
                prop_assert!(v.members().iter().all(|r| v.rank(*r).is_some()));
                outcomes.push(r);
            }
            // Determinism: the same log gives the same view and the same answers.
            let mut w = ClusterView::new();
            let again: Vec<_> = log.iter().map(|c| w.apply(c)).collect();
            prop_assert_eq!(&w, &v);
            prop_assert_eq!(again, outcomes);
        }
    }
}
