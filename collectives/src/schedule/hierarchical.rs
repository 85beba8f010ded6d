//! Hierarchical all-reduce for ranks spread over several data centres: the WAN carries each
//! byte of the buffer once per direction per data centre, instead of once per rank.
//!
//! With `D` data centres of `L` ranks each (the usual layout), the buffer is split into
//! `L·D` blocks and:
//! 1. each data centre runs a reduce-scatter over its `L` ranks (local rank `i` ends with
//!    the `i`-th `D`-block group reduced over its data centre): recursive halving when `L` is a
//!    power of two (`log₂ L` rounds of one message each), else the ring;
//! 2. the `D` ranks with local index `i` (one per data centre) run a ring all-reduce of that
//!    group over the WAN;
//! 3. each data centre runs an all-gather (recursive doubling or the ring, as in 1).
//!
//! Per rank that is `2(L−1)·S/L` bytes on the LAN, and `2(D−1)·S/(L·D)` bytes on the WAN —
//! `1/L` of what a flat ring would put on the WAN links.
//!
//! When data centres differ in size the schedule falls back to leaders: a binomial-tree reduce
//! to each data centre's lowest rank, a ring all-reduce among the leaders (`D` blocks), and a
//! tree broadcast back. Every phase is padded to the same number of rounds on every rank, so
//! rounds stay globally numbered (what the executor and the symbolic checker require).

use super::{halving_doubling, ring, tree, Collective, Recv, Round, Schedule, Send};

/// Which data centre each rank is in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    dc_of: Vec<usize>,
}

impl Topology {
    /// One data centre of `world` ranks.
    pub fn flat(world: usize) -> Topology {
        Topology { dc_of: vec![0; world] }
    }

    /// `dc_of[r]` labels rank `r`'s data centre (any numbers; equal labels, same DC).
    pub fn new(dc_of: Vec<usize>) -> Topology {
        Topology { dc_of }
    }

    /// `dcs` data centres of `per_dc` consecutive ranks each.
    pub fn uniform(dcs: usize, per_dc: usize) -> Topology {
        Topology { dc_of: (0..dcs * per_dc).map(|r| r / per_dc.max(1)).collect() }
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.dc_of.len()
    }

    /// The data centres, each its ranks ascending, ordered by their lowest rank.
    pub fn dcs(&self) -> Vec<Vec<usize>> {
        let mut out: Vec<(usize, Vec<usize>)> = Vec::new();
        for (r, dc) in self.dc_of.iter().enumerate() {
            match out.iter_mut().find(|(d, _)| d == dc) {
                Some((_, v)) => v.push(r),
                None => out.push((*dc, vec![r])),
            }
        }
        out.into_iter().map(|(_, v)| v).collect()
    }

    /// Whether the ranks span more than one data centre.
    pub fn is_multi_dc(&self) -> bool {
        self.dc_of.windows(2).any(|w| w[0] != w[1])
    }

    /// The topology of `ranks` (ascending) alone, renumbered `0..ranks.len()`.
    pub fn restrict(&self, ranks: &[usize]) -> Topology {
        Topology { dc_of: ranks.iter().map(|r| self.dc_of[*r]).collect() }
    }
}

/// Rounds of `s` with its ranks renamed by `ranks` and each of its blocks replaced by `blocks`.
fn embed(s: &Schedule, ranks: &[usize], blocks: &dyn Fn(usize) -> Vec<usize>) -> Vec<Round> {
    s.rounds
        .iter()
        .map(|r| Round {
            sends: r
                .sends
                .iter()
                .flat_map(|x| blocks(x.block).into_iter().map(move |block| Send { to: ranks[x.to], block }))
                .collect(),
            recvs: r
                .recvs
                .iter()
                .flat_map(|x| {
                    blocks(x.block).into_iter().map(move |block| Recv {
                        from: ranks[x.from],
                        block,
                        combine: x.combine,
                    })
                })
                .collect(),
        })
        .collect()
}

/// Appends `phase` padded with empty rounds to `len`.
fn push_phase(rounds: &mut Vec<Round>, mut phase: Vec<Round>, len: usize) {
    debug_assert!(phase.len() <= len);
    phase.resize(len, Round::default());
    rounds.extend(phase);
}

/// Rounds of a binomial tree over `n` ranks.
fn tree_rounds(n: usize) -> usize {
    n.next_power_of_two().trailing_zeros() as usize
}

/// The hierarchical all-reduce schedule of `rank` in `topology`.
pub fn all_reduce(rank: usize, topology: &Topology) -> Schedule {
    let world = topology.world();
    assert!(rank < world, "rank {rank} outside world {world}");
    let dcs = topology.dcs();
    let d = dcs.len();
    let my_dc = dcs.iter().position(|m| m.contains(&rank)).expect("every rank is in a data centre");
    let members = &dcs[my_dc];
    let li = members.iter().position(|r| *r == rank).expect("a member");
    let ring_sched = |c, r, n| ring::schedule(c, r, n).expect("the ring implements all-reduce family");
    let mut rounds = Vec::new();
    let l = members.len();
    if dcs.iter().all(|m| m.len() == l) {
        let group = |b: usize| (b * d..b * d + d).collect::<Vec<_>>();
        // Inside a data centre: recursive halving and doubling when its size is a power of two
        // (log₂ L rounds, each one message per rank), else the ring (L − 1 rounds).
        let (rs, ag) = match (halving_doubling::reduce_scatter(li, l), halving_doubling::all_gather(li, l)) {
            (Some(rs), Some(ag)) => (rs, ag),
            _ => (ring_sched(Collective::ReduceScatter, li, l), ring_sched(Collective::AllGather, li, l)),
        };
        let local_rounds = rs.rounds.len();
        push_phase(&mut rounds, embed(&rs, members, &group), local_rounds);
        let peers: Vec<usize> = dcs.iter().map(|m| m[li]).collect();
        let wan = embed(&ring_sched(Collective::AllReduce, my_dc, d), &peers, &|b| vec![li * d + b]);
        push_phase(&mut rounds, wan, 2 * (d - 1));
        push_phase(&mut rounds, embed(&ag, members, &group), local_rounds);
        return Schedule { blocks: l * d, rounds };
    }
    let all = |_: usize| (0..d).collect::<Vec<_>>();
    let depth = dcs.iter().map(|m| tree_rounds(m.len())).max().unwrap_or(0);
    push_phase(&mut rounds, embed(&tree::reduce(0, li, l), members, &all), depth);
    let leaders: Vec<usize> = dcs.iter().map(|m| m[0]).collect();
    let wan =
        if li == 0 { embed(&ring_sched(Collective::AllReduce, my_dc, d), &leaders, &|b| vec![b]) } else { vec![] };
    push_phase(&mut rounds, wan, 2 * (d - 1));
    push_phase(&mut rounds, embed(&tree::broadcast(0, li, l), members, &all), depth);
    Schedule { blocks: d, rounds }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::symbolic;
    use proptest::prelude::*;

    #[test]
    fn two_uniform_data_centres_put_one_ring_step_per_block_group_on_the_wan() {
        let t = Topology::uniform(2, 4);
        let s: Vec<Schedule> = (0..8).map(|r| all_reduce(r, &t)).collect();
        symbolic::check(Collective::AllReduce, 8, &s).unwrap();
        // WAN sends: between ranks of different data centres.
        let wan_blocks: usize = s
            .iter()
            .enumerate()
            .flat_map(|(r, x)| x.rounds.iter().flat_map(move |rd| rd.sends.iter().map(move |m| (r, m))))
            .filter(|(r, m)| r / 4 != m.to / 4)
            .count();
        // Each of the 8 ranks sends 2(D−1) = 2 blocks of S/8 over the WAN.
        assert_eq!(wan_blocks, 16);
    }

    proptest! {
        #[test]
        fn any_topology_gives_a_correct_all_reduce(labels in proptest::collection::vec(0usize..4, 1..=16)) {
            let t = Topology::new(labels);
            let world = t.world();
            let s: Vec<Schedule> = (0..world).map(|r| all_reduce(r, &t)).collect();
            prop_assert!(symbolic::check(Collective::AllReduce, world, &s).is_ok(), "{:?}", t);
        }

        #[test]
        fn uniform_topologies_use_the_two_dimensional_schedule(dcs in 1usize..5, per in 1usize..5) {
            let t = Topology::uniform(dcs, per);
            let s: Vec<Schedule> = (0..t.world()).map(|r| all_reduce(r, &t)).collect();
            prop_assert!(symbolic::check(Collective::AllReduce, t.world(), &s).is_ok());
            prop_assert!(s.iter().all(|x| x.blocks == dcs * per));
        }
    }
}
