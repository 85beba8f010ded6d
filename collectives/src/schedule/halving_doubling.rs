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
    let reduce = |from| Recv { from, block: 0, combine: Combine::Reduce };
    let folded_away = rank < 2 * extra && rank % 2 == 1;
    if extra > 0 {
        rounds.push(match (rank < 2 * extra, folded_away) {
            (true, true) => Round { sends: vec![Send { to: rank - 1, block: 0 }], recvs: vec![] },
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
            Round { sends: vec![Send { to: peer, block: 0 }], recvs: vec![reduce(peer)] }
        });
        mask <<= 1;
    }
    if extra > 0 {
        rounds.push(match (rank < 2 * extra, folded_away) {
            (true, true) => {
                Round { sends: vec![], recvs: vec![Recv { from: rank - 1, block: 0, combine: Combine::Copy }] }
            }
            (true, false) => Round { sends: vec![Send { to: rank + 1, block: 0 }], recvs: vec![] },
            (false, _) => Round::default(),
        });
    }
    Schedule { blocks: 1, rounds }
}

/// The schedule of `collective` (only [`Collective::AllReduce`] has a halving-doubling form
/// here; `None` otherwise).
pub fn schedule(collective: Collective, rank: usize, world: usize) -> Option<Schedule> {
    (collective == Collective::AllReduce).then(|| all_reduce(rank, world))
}
