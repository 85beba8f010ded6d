//! Binomial trees rooted anywhere: broadcast and reduce in `⌈log₂ n⌉` rounds of the whole
//! buffer (latency-optimal for small buffers; the building block of barrier and of the
//! hierarchical schedules).
//!
//! Ranks are renumbered relative to the root, `v = (r − root) mod n`. Broadcast: in round `k`
//! every `v < 2^k` that has the data sends it to `v + 2^k` (when that exists). Reduce is the
//! mirror image: rounds in reverse order, `v + 2^k` sends its partial result to `v`, which
//! reduces it in.
//!
//! Cost: `⌈log₂ n⌉` rounds; the root sends (broadcast) or receives (reduce) `⌈log₂ n⌉·S`
//! bytes, a leaf `S`.

use super::{Collective, Combine, Recv, Round, Schedule, Send};

fn rounds_for(world: usize) -> u32 {
    world.next_power_of_two().trailing_zeros()
}

/// Binomial-tree broadcast from `root`.
pub fn broadcast(root: usize, rank: usize, world: usize) -> Schedule {
    assert!(rank < world && root < world);
    let v = (rank + world - root) % world;
    let real = |v: usize| (v + root) % world;
    let rounds = (0..rounds_for(world))
        .map(|k| {
            let step = 1usize << k;
            if v < step && v + step < world {
                Round { sends: vec![Send::block(real(v + step), 0)], recvs: vec![] }
            } else if (step..2 * step).contains(&v) {
                Round { sends: vec![], recvs: vec![Recv::block(real(v - step), 0, Combine::Copy)] }
            } else {
                Round::default()
            }
        })
        .collect();
    Schedule { blocks: 1, rounds }
}

/// Binomial-tree reduce to `root`.
pub fn reduce(root: usize, rank: usize, world: usize) -> Schedule {
    assert!(rank < world && root < world);
    let v = (rank + world - root) % world;
    let real = |v: usize| (v + root) % world;
    let rounds = (0..rounds_for(world))
        .rev()
        .map(|k| {
            let step = 1usize << k;
            if v < step && v + step < world {
                Round { sends: vec![], recvs: vec![Recv::block(real(v + step), 0, Combine::Reduce)] }
            } else if (step..2 * step).contains(&v) {
                Round { sends: vec![Send::block(real(v - step), 0)], recvs: vec![] }
            } else {
                Round::default()
            }
        })
        .collect();
    Schedule { blocks: 1, rounds }
}

/// The tree schedule of `collective` (`None` for collectives a tree does not implement).
pub fn schedule(collective: Collective, rank: usize, world: usize) -> Option<Schedule> {
    match collective {
        Collective::Broadcast { root } => Some(broadcast(root, rank, world)),
        Collective::Reduce { root } => Some(reduce(root, rank, world)),
        _ => None,
    }
}
