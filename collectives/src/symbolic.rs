//! Symbolic execution of schedules: instead of numbers, each block holds the multiset of
//! contributions (which ranks' inputs, how many times) reduced into it. A correct schedule
//! leaves exactly the expected set, each contribution once — the property every algorithm
//! must pass for every world size before it touches a network.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::schedule::{owned_block, Collective, Combine, Schedule};

/// Contributions in a block: rank → how many times its input was reduced in.
pub type Contributions = BTreeMap<usize, u32>;

/// Why a set of schedules is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScheduleError {
    /// Ranks disagree on the number of blocks or rounds, or there is one schedule too few.
    Shape(String),
    /// A send has no receive of the same range in the same round (or the reverse).
    Unmatched {
        /// Round index.
        round: usize,
        /// Sender.
        from: usize,
        /// Receiver.
        to: usize,
        /// Blocks.
        blocks: Range<usize>,
    },
    /// A block ended with the wrong contributions.
    WrongResult {
        /// Rank.
        rank: usize,
        /// Block.
        block: usize,
        /// What it holds.
        found: Contributions,
    },
}

/// Runs all ranks' schedules in lockstep on symbolic data and checks the outcome of
/// `collective`.
pub fn check(collective: Collective, world: usize, schedules: &[Schedule]) -> Result<(), ScheduleError> {
    if schedules.len() != world {
        return Err(ScheduleError::Shape(format!("{} schedules for a world of {world}", schedules.len())));
    }
    let blocks = schedules.first().map_or(1, |s| s.blocks);
    let rounds = schedules.iter().map(|s| s.rounds.len()).max().unwrap_or(0);
    if schedules.iter().any(|s| s.blocks != blocks) {
        return Err(ScheduleError::Shape("ranks disagree on the number of blocks".into()));
    }
    let own = |r: usize| Contributions::from([(r, 1)]);
    // state[rank][block]; all-gather starts with only the owned block.
    let mut state: Vec<Vec<Contributions>> = (0..world)
        .map(|r| {
            (0..blocks)
                .map(|b| match collective {
                    Collective::AllGather if b != owned_block(r, world) => Contributions::new(),
                    Collective::Broadcast { root } if r != root => Contributions::new(),
                    _ => own(r),
                })
                .collect()
        })
        .collect();
    let bad_range = |r: &Range<usize>| r.is_empty() || r.end > blocks;
    for (r, s) in schedules.iter().enumerate() {
        for (round, x) in s.rounds.iter().enumerate() {
            let ranges = x.sends.iter().map(|m| &m.blocks).chain(x.recvs.iter().map(|m| &m.blocks));
            if let Some(b) = ranges.into_iter().find(|b| bad_range(b)) {
                return Err(ScheduleError::Shape(format!("rank {r} round {round}: blocks {b:?} of {blocks}")));
            }
        }
    }
    for round in 0..rounds {
        // Messages in flight this round: (from, to, first block, end) → the blocks' content at
        // the start of the round.
        let mut wire: BTreeMap<(usize, usize, usize, usize), Vec<Vec<Contributions>>> = BTreeMap::new();
        for (r, s) in schedules.iter().enumerate() {
            for send in s.rounds.get(round).map_or(&[][..], |x| &x.sends) {
                let content = state[r][send.blocks.clone()].to_vec();
                wire.entry((r, send.to, send.blocks.start, send.blocks.end)).or_default().push(content);
            }
        }
        for (r, s) in schedules.iter().enumerate() {
            for recv in s.rounds.get(round).map_or(&[][..], |x| &x.recvs) {
                let key = (recv.from, r, recv.blocks.start, recv.blocks.end);
                let Some(content) = wire.get_mut(&key).and_then(|v| v.pop()) else {
                    return Err(ScheduleError::Unmatched {
                        round,
                        from: recv.from,
                        to: r,
                        blocks: recv.blocks.clone(),
                    });
                };
                for (local, content) in state[r][recv.blocks.clone()].iter_mut().zip(content) {
                    match recv.combine {
                        Combine::Copy => *local = content,
                        Combine::Reduce => {
                            for (k, v) in content {
                                *local.entry(k).or_default() += v;
                            }
                        }
                    }
                }
            }
        }
        if let Some(((from, to, start, end), _)) = wire.iter().find(|(_, v)| !v.is_empty()) {
            return Err(ScheduleError::Unmatched { round, from: *from, to: *to, blocks: *start..*end });
        }
    }
    let all: Contributions = (0..world).map(|r| (r, 1)).collect();
    for (r, blocks_of_r) in state.iter().enumerate() {
        for (b, found) in blocks_of_r.iter().enumerate() {
            // What the block must hold at the end (`None`: scratch, anything goes).
            let expected = match collective {
                Collective::AllReduce => Some(all.clone()),
                Collective::ReduceScatter => (b == owned_block(r, world)).then(|| all.clone()),
                Collective::AllGather => Some(own(owned_block(b, world))),
                Collective::Broadcast { root } => Some(own(root)),
                Collective::Reduce { root } => (r == root).then(|| all.clone()),
            };
            let ok = expected.is_none_or(|e| *found == e);
            if !ok {
                return Err(ScheduleError::WrongResult { rank: r, block: b, found: found.clone() });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{halving_doubling, ring, tree, Combine, Recv, Round, Send};

    fn ring_all(c: Collective, world: usize) -> Vec<Schedule> {
        (0..world).map(|r| ring::schedule(c, r, world).expect("ring implements it")).collect()
    }

    #[test]
    fn ring_schedules_are_correct_for_every_world_size_up_to_64() {
        for world in 1..=64 {
            for c in [Collective::AllReduce, Collective::ReduceScatter, Collective::AllGather] {
                check(c, world, &ring_all(c, world)).unwrap_or_else(|e| panic!("{c:?} world {world}: {e:?}"));
            }
        }
    }

    #[test]
    fn recursive_doubling_all_reduce_is_correct_for_powers_of_two_and_every_other_size() {
        for world in 1..=70 {
            let s: Vec<_> = (0..world).map(|r| halving_doubling::all_reduce(r, world)).collect();
            check(Collective::AllReduce, world, &s).unwrap_or_else(|e| panic!("world {world}: {e:?}"));
            let p = world.next_power_of_two();
            let extra_rounds = if p == world { 0 } else { 2 };
            let log = if p == world { p.trailing_zeros() } else { p.trailing_zeros() - 1 };
            assert_eq!(s[0].rounds.len(), log as usize + extra_rounds, "world {world}");
        }
    }

    #[test]
    fn binomial_broadcast_and_reduce_are_correct_from_every_root() {
        for world in 1..=33 {
            for root in 0..world {
                for c in [Collective::Broadcast { root }, Collective::Reduce { root }] {
                    let s: Vec<_> = (0..world).map(|r| tree::schedule(c, r, world).expect("tree")).collect();
                    check(c, world, &s).unwrap_or_else(|e| panic!("{c:?} world {world}: {e:?}"));
                    assert_eq!(s[0].rounds.len(), world.next_power_of_two().trailing_zeros() as usize);
                }
            }
        }
    }

    #[test]
    fn ring_all_reduce_costs_two_n_minus_one_rounds_of_one_block() {
        for world in 1..=9 {
            let s = ring::schedule(Collective::AllReduce, 0, world).unwrap();
            assert_eq!(s.rounds.len(), 2 * (world - 1));
            assert!(s.rounds.iter().all(|r| r.sends.len() == 1 && r.recvs.len() == 1));
        }
    }

    #[test]
    fn the_checker_catches_a_double_counted_contribution() {
        let world = 3;
        let mut s = ring_all(Collective::AllReduce, world);
        // Rank 1 reduces a copy step instead of overwriting: its block gets inputs twice.
        let last = s[1].rounds.len() - 1;
        s[1].rounds[last].recvs[0].combine = Combine::Reduce;
        assert!(matches!(check(Collective::AllReduce, world, &s), Err(ScheduleError::WrongResult { rank: 1, .. })));
    }

    #[test]
    fn the_checker_catches_a_send_nobody_receives() {
        let world = 2;
        let mut s = ring_all(Collective::AllGather, world);
        s[0].rounds.push(Round { sends: vec![Send::block(1, 0)], recvs: vec![] });
        assert_eq!(
            check(Collective::AllGather, world, &s),
            Err(ScheduleError::Unmatched { round: 1, from: 0, to: 1, blocks: 0..1 })
        );
        let mut s = ring_all(Collective::AllGather, world);
        s[1].rounds[0].recvs.push(Recv::block(0, 1, Combine::Copy));
        assert!(matches!(check(Collective::AllGather, world, &s), Err(ScheduleError::Unmatched { .. })));
    }

    #[test]
    fn the_checker_requires_ranges_to_match_exactly_and_lie_within_the_buffer() {
        // Rank 0 sends blocks 0..2 as one range; rank 1 receives them as two: the executor
        // could not match those messages, so neither may the checker.
        let s = vec![
            Schedule { blocks: 2, rounds: vec![Round { sends: vec![Send { to: 1, blocks: 0..2 }], recvs: vec![] }] },
            Schedule {
                blocks: 2,
                rounds: vec![Round {
                    sends: vec![],
                    recvs: vec![Recv::block(0, 0, Combine::Copy), Recv::block(0, 1, Combine::Copy)],
                }],
            },
        ];
        assert_eq!(
            check(Collective::Broadcast { root: 0 }, 2, &s),
            Err(ScheduleError::Unmatched { round: 0, from: 0, to: 1, blocks: 0..1 })
        );
        let mut whole = s.clone();
        whole[1].rounds[0].recvs = vec![Recv { from: 0, blocks: 0..2, combine: Combine::Copy }];
        assert_eq!(check(Collective::Broadcast { root: 0 }, 2, &whole), Ok(()));
        let mut outside = whole.clone();
        outside[0].rounds[0].sends[0].blocks = 1..3;
        assert!(matches!(check(Collective::Broadcast { root: 0 }, 2, &outside), Err(ScheduleError::Shape(_))));
    }
}
