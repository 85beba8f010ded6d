//! Recursive doubling all-reduce (latency-optimal for small buffers): `⌈log₂ n⌉` exchange
//! rounds of the whole buffer, plus one round before and one after when `n` is not a power of
//! two.
//!
//! With `p` the largest power of two ≤ `n` and `e = n − p` extra ranks: first, each odd rank
//! `r < 2e` hands its buffer to `r − 1` (which reduces it) and sits out; the `p` remaining ranks
//! get virtual ranks `v` (`r / 2` for even `r < 2e`, `r − e` above) and in round `k` exchange
//! whole buffers with virtual rank `v XOR 2^k`, reducing; last, each even `r < 2e` copies the
//! result back to `r + 1`.
//!
//! Cost per rank: `log₂ p` rounds (+2 when `e > 0`) sending the whole buffer `S` each: α–β time
//! `⌈log₂ n⌉(α + S/β)` — fewer rounds than the ring's `2(n − 1)`, more bytes.

use super::{Collective, Combine, Recv, Round, Schedule, Send};

fn real_rank(v: usize, extra: usize) -> usize {
    if v < extra {
        2 * v
    } else {
        v + extra
    }
}

/// The recursive-doubling all-reduce schedule for `rank` of `world` (one block: the whole
/// buffer).
pub fn all_reduce(rank: usize, world: usize) -> Schedule {
    assert!(rank < world, "rank {rank} outside world {world}");
    let p = 1usize << (usize::BITS - 1 - world.leading_zeros());
    let extra = world - p;
    let mut rounds = Vec::new();
    let reduce = |from| Recv::block(from, 0, Combine::Reduce);
    let folded_away = rank < 2 * extra && rank % 2 == 1;
    if extra > 0 {
        rounds.push(match (rank < 2 * extra, folded_away) {
            (true, true) => Round { sends: vec![Send::block(rank - 1, 0)], recvs: vec![] },
            (true, false) => Round { sends: vec![], recvs: vec![reduce(rank + 1)] },
            (false, _) => Round::default(),
        });
    }
    let v = if rank < 2 * extra { rank / 2 } else { rank - extra };
    let mut mask = 1;
    while mask < p {
        rounds.push(if folded_away {
            Round::default()
        } else {
            let peer = real_rank(v ^ mask, extra);
            Round { sends: vec![Send::block(peer, 0)], recvs: vec![reduce(peer)] }
        });
        mask <<= 1;
    }
    if extra > 0 {
        rounds.push(match (rank < 2 * extra, folded_away) {
            (true, true) => Round { sends: vec![], recvs: vec![Recv::block(rank - 1, 0, Combine::Copy)] },
            (true, false) => Round { sends: vec![Send::block(rank + 1, 0)], recvs: vec![] },
            (false, _) => Round::default(),
        });
    }
    Schedule { blocks: 1, rounds }
}

/// Recursive-halving reduce-scatter for a power-of-two `world` (`None` otherwise): `log₂ n`
/// rounds; in the round of distance `d` (from `n/2` down to 1) rank `r` exchanges with
/// `r XOR d` half of the blocks it still holds, keeping the half that contains block `r`.
/// Afterwards it holds block `r` reduced over all ranks. Bytes per rank: `(n − 1)·S/n`, as the
/// ring, in `log₂ n` rounds instead of `n − 1`; each round is one range of blocks, so the
/// schedule has `log₂ n` entries per rank whatever `n`.
pub fn reduce_scatter(rank: usize, world: usize) -> Option<Schedule> {
    assert!(rank < world, "rank {rank} outside world {world}");
    if !world.is_power_of_two() {
        return None;
    }
    let (mut lo, mut hi) = (0, world);
    let mut rounds = Vec::new();
    let mut d = world / 2;
    while d > 0 {
        let peer = rank ^ d;
        let mid = lo + (hi - lo) / 2;
        let (keep, give) = if rank & d == 0 { (lo..mid, mid..hi) } else { (mid..hi, lo..mid) };
        rounds.push(Round {
            sends: vec![Send { to: peer, blocks: give }],
            recvs: vec![Recv { from: peer, blocks: keep.clone(), combine: Combine::Reduce }],
        });
        (lo, hi) = (keep.start, keep.end);
        d /= 2;
    }
    Some(Schedule { blocks: world, rounds })
}

/// Recursive-doubling all-gather for a power-of-two `world` (`None` otherwise), the mirror of
/// [`reduce_scatter`]: in the round of distance `d` (from 1 up to `n/2`) rank `r` sends every
/// block it holds to `r XOR d` and copies the peer's.
pub fn all_gather(rank: usize, world: usize) -> Option<Schedule> {
    assert!(rank < world, "rank {rank} outside world {world}");
    if !world.is_power_of_two() {
        return None;
    }
    let mut rounds = Vec::new();
    let mut d = 1;
    while d < world {
        let peer = rank ^ d;
        let mine = rank & !(d - 1)..(rank & !(d - 1)) + d;
        let theirs = peer & !(d - 1)..(peer & !(d - 1)) + d;
        rounds.push(Round {
            sends: vec![Send { to: peer, blocks: mine }],
            recvs: vec![Recv { from: peer, blocks: theirs, combine: Combine::Copy }],
        });
        d *= 2;
    }
    Some(Schedule { blocks: world, rounds })
}

/// Recursive-halving reduce-scatter followed by recursive-doubling all-gather (Rabenseifner's
/// all-reduce) for a power-of-two `world` (`None` otherwise): bandwidth-optimal like the ring,
/// `(n − 1)·S/n` bytes each way per rank, in `2·log₂ n` rounds instead of `2(n − 1)`, with
/// larger messages per round (half the buffer in the first and last).
pub fn reduce_scatter_all_gather(rank: usize, world: usize) -> Option<Schedule> {
    let mut s = reduce_scatter(rank, world)?;
    s.rounds.extend(all_gather(rank, world)?.rounds);
    Some(s)
}

/// The schedule of `collective`: all-reduce by recursive doubling (any world), reduce-scatter
/// by recursive halving and all-gather by recursive doubling (power-of-two worlds); `None`
/// otherwise.
pub fn schedule(collective: Collective, rank: usize, world: usize) -> Option<Schedule> {
    match collective {
        Collective::AllReduce => Some(all_reduce(rank, world)),
        Collective::ReduceScatter => reduce_scatter(rank, world),
        Collective::AllGather => all_gather(rank, world),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::symbolic;

    #[test]
    fn halving_and_doubling_are_correct_for_every_power_of_two_up_to_64() {
        for world in [1usize, 2, 4, 8, 16, 32, 64] {
            let rabenseifner: Vec<Schedule> =
                (0..world).map(|r| reduce_scatter_all_gather(r, world).expect("power of two")).collect();
            symbolic::check(Collective::AllReduce, world, &rabenseifner)
                .unwrap_or_else(|e| panic!("halving-doubling all-reduce over {world}: {e:?}"));
            assert_eq!(rabenseifner[0].rounds.len(), 2 * world.trailing_zeros() as usize, "2·log₂ n rounds");
            for c in [Collective::ReduceScatter, Collective::AllGather, Collective::AllReduce] {
                let s: Vec<Schedule> = (0..world).map(|r| schedule(c, r, world).expect("power of two")).collect();
                symbolic::check(c, world, &s).unwrap_or_else(|e| panic!("{c:?} over {world}: {e:?}"));
                if c != Collective::AllReduce {
                    assert_eq!(s[0].rounds.len(), world.trailing_zeros() as usize, "log₂ n rounds");
                    let sent: usize = s[0].rounds.iter().flat_map(|r| &r.sends).map(|x| x.blocks.len()).sum();
                    assert!(s[0].rounds.iter().all(|r| r.sends.len() == 1), "one range per round");
                    assert_eq!(sent, world - 1, "(n − 1)/n of the buffer, as the ring");
                }
            }
        }
        assert!(reduce_scatter(0, 6).is_none() && all_gather(0, 12).is_none());
        assert!(reduce_scatter_all_gather(2, 3).is_none());
    }
}
