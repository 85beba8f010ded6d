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
//! When data centres differ in size (a rank lost), each one's extra ranks fold into a partner
//! first and get the result back last, around the same grid over `p` ranks per data centre
//! (`p` the largest power of two not above the smallest; see `folded_grid`). Only when some
//! data centre has more than `2p` ranks does the schedule fall back to leaders: a binomial-tree
//! reduce to each data centre's lowest rank, a ring all-reduce among the leaders (`D` blocks),
//! and a tree broadcast back. Every phase is padded to the same number of rounds on every rank, so
//! rounds stay globally numbered (what the executor and the symbolic checker require).

use std::ops::Range;
use std::sync::Arc;

use super::{halving_doubling, ring, tree, Collective, Combine, Recv, Round, Schedule, Send};

/// Which data centre each rank is in. Cheap to clone (shared), so every rank of a large group
/// can hold the same one; what the schedules ask of it (the data centres, where a rank sits in
/// its own) is computed once, when it is made.
#[derive(Clone, Debug)]
pub struct Topology {
    inner: Arc<Layout>,
}

#[derive(Debug)]
struct Layout {
    dc_of: Vec<usize>,
    /// The data centres, each its ranks ascending, ordered by their lowest rank.
    dcs: Vec<Vec<usize>>,
    /// Per rank: `(index of its data centre in dcs, its index there)`.
    place: Vec<(usize, usize)>,
}

impl PartialEq for Topology {
    fn eq(&self, other: &Topology) -> bool {
        self.inner.dc_of == other.inner.dc_of
    }
}

impl Eq for Topology {}

impl Topology {
    /// One data centre of `world` ranks.
    pub fn flat(world: usize) -> Topology {
        Topology::new(vec![0; world])
    }

    /// `dc_of[r]` labels rank `r`'s data centre (any numbers; equal labels, same DC).
    pub fn new(dc_of: Vec<usize>) -> Topology {
        // Labels seen, in order of first appearance (a handful), and the last one looked up
        // (ranks of a data centre are usually consecutive).
        let mut labels: Vec<usize> = Vec::new();
        let mut last: Option<(usize, usize)> = None;
        let mut dcs: Vec<Vec<usize>> = Vec::new();
        let mut place = Vec::with_capacity(dc_of.len());
        for (r, dc) in dc_of.iter().enumerate() {
            let d = match last {
                Some((label, d)) if label == *dc => d,
                _ => match labels.iter().position(|l| l == dc) {
                    Some(d) => d,
                    None => {
                        labels.push(*dc);
                        dcs.push(Vec::new());
                        dcs.len() - 1
                    }
                },
            };
            last = Some((*dc, d));
            place.push((d, dcs[d].len()));
            dcs[d].push(r);
        }
        Topology { inner: Arc::new(Layout { dc_of, dcs, place }) }
    }

    /// `dcs` data centres of `per_dc` consecutive ranks each.
    pub fn uniform(dcs: usize, per_dc: usize) -> Topology {
        Topology::new((0..dcs * per_dc).map(|r| r / per_dc.max(1)).collect())
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.inner.dc_of.len()
    }

    /// The data centres, each its ranks ascending, ordered by their lowest rank.
    pub fn dcs(&self) -> &[Vec<usize>] {
        &self.inner.dcs
    }

    /// Whether the ranks span more than one data centre.
    pub fn is_multi_dc(&self) -> bool {
        self.inner.dcs.len() > 1
    }

    /// The topology of `ranks` (ascending, each below [`Topology::world`]) alone, renumbered
    /// `0..ranks.len()`; all the ranks: this one, shared.
    pub fn restrict(&self, ranks: &[usize]) -> Topology {
        if ranks.len() == self.world() {
            return self.clone();
        }
        Topology::new(ranks.iter().map(|r| self.inner.dc_of[*r]).collect())
    }
}

/// Largest data centre (not a power of two) whose reduce-scatter and all-gather run as rings;
/// larger ones fold to a power of two instead (see `folded_grid`): a ring's `2(L − 1)` steps of
/// latency outgrow the one extra buffer each folded pair moves.
pub const RING_WITHIN_DC_MAX: usize = 64;

/// Rounds of `s` with its ranks renamed by `ranks` and each of its block ranges replaced by
/// `blocks(range)` (a contiguous range of this schedule's blocks).
fn embed(s: &Schedule, ranks: &[usize], blocks: &dyn Fn(Range<usize>) -> Range<usize>) -> Vec<Round> {
    s.rounds
        .iter()
        .map(|r| Round {
            sends: r.sends.iter().map(|x| Send { to: ranks[x.to], blocks: blocks(x.blocks.clone()) }).collect(),
            recvs: r
                .recvs
                .iter()
                .map(|x| Recv { from: ranks[x.from], blocks: blocks(x.blocks.clone()), combine: x.combine })
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
    let (my_dc, li) = topology.inner.place[rank];
    let members = &dcs[my_dc];
    let ring_sched = |c, r, n| ring::schedule(c, r, n).expect("the ring implements all-reduce family");
    let mut rounds = Vec::new();
    let l = members.len();
    let uniform = dcs.iter().all(|m| m.len() == l);
    if uniform && !l.is_power_of_two() && l > RING_WITHIN_DC_MAX {
        return folded_grid(dcs, my_dc, li, 1 << (usize::BITS - 1 - l.leading_zeros()));
    }
    if uniform {
        let group = |b: Range<usize>| b.start * d..b.end * d;
        // Inside a data centre: recursive halving and doubling when its size is a power of two
        // (log₂ L rounds, each one message per rank), else the ring (L − 1 rounds).
        let (rs, ag) = match (halving_doubling::reduce_scatter(li, l), halving_doubling::all_gather(li, l)) {
            (Some(rs), Some(ag)) => (rs, ag),
            _ => (ring_sched(Collective::ReduceScatter, li, l), ring_sched(Collective::AllGather, li, l)),
        };
        let local_rounds = rs.rounds.len();
        push_phase(&mut rounds, embed(&rs, members, &group), local_rounds);
        let peers: Vec<usize> = dcs.iter().map(|m| m[li]).collect();
        let wan = embed(&ring_sched(Collective::AllReduce, my_dc, d), &peers, &|b| li * d + b.start..li * d + b.end);
        push_phase(&mut rounds, wan, 2 * (d - 1));
        push_phase(&mut rounds, embed(&ag, members, &group), local_rounds);
        return Schedule { blocks: l * d, rounds };
    }
    // Unequal data centres (a rank lost): fold the extra ranks of each into a partner, run the
    // grid over `p` ranks per data centre, unfold — when one fold per rank is enough.
    let smallest = dcs.iter().map(|m| m.len()).min().unwrap_or(0);
    let p = 1usize << (usize::BITS - 1 - smallest.max(1).leading_zeros());
    if dcs.iter().all(|m| m.len() <= 2 * p) {
        return folded_grid(dcs, my_dc, li, p);
    }
    let all = |_: Range<usize>| 0..d;
    let depth = dcs.iter().map(|m| tree_rounds(m.len())).max().unwrap_or(0);
    push_phase(&mut rounds, embed(&tree::reduce(0, li, l), members, &all), depth);
    let leaders: Vec<usize> = dcs.iter().map(|m| m[0]).collect();
    let wan = if li == 0 { embed(&ring_sched(Collective::AllReduce, my_dc, d), &leaders, &|b| b) } else { vec![] };
    push_phase(&mut rounds, wan, 2 * (d - 1));
    push_phase(&mut rounds, embed(&tree::broadcast(0, li, l), members, &all), depth);
    Schedule { blocks: d, rounds }
}

/// The hierarchical all-reduce over data centres of unequal sizes, each at most `2p` ranks
/// (`p` a power of two no larger than the smallest): in each data centre of `L` ranks the first
/// `2(L − p)` pair up and the odd one of each pair hands its whole buffer to the even one
/// (one round), leaving `p` *core* ranks per data centre (as recursive doubling does for a
/// world that is not a power of two); the cores run the uniform grid (recursive halving, WAN
/// ring, recursive doubling over `p·D` blocks); then each pair's even rank copies the result
/// back. Per core rank that is the uniform schedule's bytes plus, for paired ones, the whole
/// buffer in and out once — instead of the leaders' binomial trees of the whole buffer.
fn folded_grid(dcs: &[Vec<usize>], my_dc: usize, li: usize, p: usize) -> Schedule {
    let d = dcs.len();
    let extra = |m: &Vec<usize>| m.len() - p;
    // The rank of core index `v` of data centre `m`.
    let core = |m: &Vec<usize>, v: usize| if v < extra(m) { m[2 * v] } else { m[v + extra(m)] };
    let members = &dcs[my_dc];
    let e = extra(members);
    let folds = dcs.iter().any(|m| extra(m) > 0);
    let whole = 0..p * d;
    let folded_away = li < 2 * e && li % 2 == 1;
    let mut rounds = Vec::new();
    if folds {
        rounds.push(match (li < 2 * e, folded_away) {
            (true, true) => Round { sends: vec![Send { to: members[li - 1], blocks: whole.clone() }], recvs: vec![] },
            (true, false) => Round {
                sends: vec![],
                recvs: vec![Recv { from: members[li + 1], blocks: whole.clone(), combine: Combine::Reduce }],
            },
            (false, _) => Round::default(),
        });
    }
    let local_rounds = p.trailing_zeros() as usize;
    if folded_away {
        rounds.resize(rounds.len() + 2 * local_rounds + 2 * (d - 1), Round::default());
    } else {
        let v = if li < 2 * e { li / 2 } else { li - e };
        let cores: Vec<usize> = (0..p).map(|i| core(members, i)).collect();
        let group = |b: Range<usize>| b.start * d..b.end * d;
        let rs = halving_doubling::reduce_scatter(v, p).expect("p is a power of two");
        let ag = halving_doubling::all_gather(v, p).expect("p is a power of two");
        push_phase(&mut rounds, embed(&rs, &cores, &group), local_rounds);
        let peers: Vec<usize> = dcs.iter().map(|m| core(m, v)).collect();
        let ring = ring::schedule(Collective::AllReduce, my_dc, d).expect("the ring implements all-reduce");
        push_phase(&mut rounds, embed(&ring, &peers, &|b| v * d + b.start..v * d + b.end), 2 * (d - 1));
        push_phase(&mut rounds, embed(&ag, &cores, &group), local_rounds);
    }
    if folds {
        rounds.push(match (li < 2 * e, folded_away) {
            (true, true) => Round {
                sends: vec![],
                recvs: vec![Recv { from: members[li - 1], blocks: whole.clone(), combine: Combine::Copy }],
            },
            (true, false) => Round { sends: vec![Send { to: members[li + 1], blocks: whole }], recvs: vec![] },
            (false, _) => Round::default(),
        });
    }
    Schedule { blocks: p * d, rounds }
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
            .map(|(_, m)| m.blocks.len())
            .sum();
        // Each of the 8 ranks sends 2(D−1) = 2 blocks of S/8 over the WAN.
        assert_eq!(wan_blocks, 16);
    }

    #[test]
    fn a_data_centre_one_rank_short_folds_instead_of_falling_back_to_trees() {
        // 2 × 16 with rank 5 gone: 15 and 16 ranks, p = 8, one fold round before and after.
        let mut labels = vec![0; 15];
        labels.extend(vec![1; 16]);
        let t = Topology::new(labels);
        let s: Vec<Schedule> = (0..t.world()).map(|r| all_reduce(r, &t)).collect();
        symbolic::check(Collective::AllReduce, t.world(), &s).unwrap();
        assert_eq!(s[0].blocks, 16, "p · D blocks");
        assert_eq!(s[0].rounds.len(), 1 + 3 + 2 + 3 + 1, "fold, halving, WAN ring, doubling, unfold");
        // The most any rank sends is about twice the uniform schedule's, not log₂ L buffers.
        let most =
            s.iter().map(|x| x.rounds.iter().flat_map(|r| &r.sends).map(|m| m.blocks.len()).sum::<usize>()).max();
        // Halving and doubling: 7 groups of D = 2 blocks each; the WAN ring 2(D − 1) blocks.
        assert_eq!(most, Some(16 + 7 * 2 + 2 + 7 * 2), "unfold + halving + WAN + doubling (blocks of S/16)");
    }

    #[test]
    fn large_data_centres_that_are_not_a_power_of_two_fold_instead_of_running_rings() {
        let per = RING_WITHIN_DC_MAX + 3;
        let t = Topology::uniform(2, per);
        let s: Vec<Schedule> = (0..t.world()).map(|r| all_reduce(r, &t)).collect();
        symbolic::check(Collective::AllReduce, t.world(), &s).unwrap();
        let p = 64;
        assert_eq!(s[0].rounds.len(), 1 + 6 + 2 + 6 + 1, "fold, log₂ p, WAN ring, log₂ p, unfold");
        assert_eq!(s[0].blocks, p * 2);
        let small = Topology::uniform(2, RING_WITHIN_DC_MAX - 1);
        assert_eq!(all_reduce(0, &small).rounds.len(), 2 * (RING_WITHIN_DC_MAX - 2) + 2, "rings below the bound");
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
