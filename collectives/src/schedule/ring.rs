//! Ring algorithms (bandwidth-optimal for large buffers; NCCL's and Gloo's default).
//!
//! Ranks form the ring `r → r+1 (mod n)`; the buffer is split into `n` blocks.
//! - Reduce-scatter: `n − 1` rounds; in round `k` rank `r` sends block `r − k − 1` to `r + 1`
//!   and reduces block `r − k − 2` arriving from `r − 1` (all mod `n`). Afterwards rank `r`
//!   holds block `r` reduced over all ranks.
//! - All-gather: `n − 1` rounds; in round `k` rank `r` sends block `r − k` to `r + 1` and
//!   copies block `r − k − 1` arriving from `r − 1`.
//! - All-reduce: reduce-scatter then all-gather, `2(n − 1)` rounds.
//!
//! Cost per rank for a buffer of `S` bytes: reduce-scatter and all-gather send
//! `(n − 1)·S/n` bytes in `n − 1` rounds; all-reduce `2(n − 1)·S/n` bytes in `2(n − 1)` rounds
//! (the α–β time `2(n − 1)(α + S/(n·β))`).

use super::{Collective, Combine, Recv, Round, Schedule, Send};

/// Block index `i` reduced mod `n` (for possibly negative offsets).
fn wrap(i: isize, n: usize) -> usize {
    i.rem_euclid(n as isize) as usize
}

fn reduce_scatter_rounds(rank: usize, world: usize) -> Vec<Round> {
    let (r, n) = (rank as isize, world);
    (0..world.saturating_sub(1) as isize)
        .map(|k| Round {
            sends: vec![Send::block(wrap(r + 1, n), wrap(r - k - 1, n))],
            recvs: vec![Recv::block(wrap(r - 1, n), wrap(r - k - 2, n), Combine::Reduce)],
        })
        .collect()
}

fn all_gather_rounds(rank: usize, world: usize) -> Vec<Round> {
    let (r, n) = (rank as isize, world);
    (0..world.saturating_sub(1) as isize)
        .map(|k| Round {
            sends: vec![Send::block(wrap(r + 1, n), wrap(r - k, n))],
            recvs: vec![Recv::block(wrap(r - 1, n), wrap(r - k - 1, n), Combine::Copy)],
        })
        .collect()
}

/// The ring schedule of `collective` for `rank` of `world` (`world ≥ 1`; a world of one has no
/// rounds). `None` for collectives the ring does not implement (broadcast, reduce).
pub fn schedule(collective: Collective, rank: usize, world: usize) -> Option<Schedule> {
    assert!(rank < world, "rank {rank} outside world {world}");
    let rounds = match collective {
        Collective::ReduceScatter => reduce_scatter_rounds(rank, world),
        Collective::AllGather => all_gather_rounds(rank, world),
        Collective::AllReduce => {
            let mut r = reduce_scatter_rounds(rank, world);
            r.extend(all_gather_rounds(rank, world));
            r
        }
        Collective::Broadcast { .. } | Collective::Reduce { .. } => return None,
    };
    Some(Schedule { blocks: world, rounds })
}
