//! The vocabulary of schedules.
//!
//! A rank's buffer is split into `blocks` contiguous blocks ([`block_range`] says which
//! elements each covers, for any element count, including 0 and counts not divisible by the
//! number of blocks). A schedule is a list of [`Round`]s. In a round a rank posts its sends
//! (each carries the block's content as it was at the start of the round) and its receives
//! (each combines the arriving block into its own: [`Combine::Reduce`] or [`Combine::Copy`]),
//! then waits for all of them. A send or receive names a contiguous *range* of blocks (one
//! message stream; the executor cuts it into segments), so a schedule that moves half of the
//! buffer in a round is one entry, not `n/2`: recursive halving is `O(log n)` entries per rank.
//! Sends and receives of one round must match across ranks one-to-one, range for range:
//! `(from, to, blocks)`.

pub mod halving_doubling;
pub mod hierarchical;
pub mod ring;
pub mod tree;

use std::ops::Range;

/// Which collective a schedule implements (what the symbolic checker expects at the end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collective {
    /// Every rank ends with every block reduced over all ranks.
    AllReduce,
    /// Rank `r` ends with block [`owned_block`]`(r)` reduced over all ranks.
    ReduceScatter,
    /// Every rank starts with only its own block and ends with everyone's.
    AllGather,
    /// Every rank ends with the root's buffer.
    Broadcast {
        /// The rank whose buffer is sent.
        root: usize,
    },
    /// The root ends with the buffer reduced over all ranks.
    Reduce {
        /// The rank that receives the result.
        root: usize,
    },
}

/// How a received block is combined with the local one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combine {
    /// Apply the reduction (sum, max, …) elementwise.
    Reduce,
    /// Overwrite the local block.
    Copy,
}

/// Blocks sent to a peer: a non-empty range of consecutive block indices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Send {
    /// Destination rank.
    pub to: usize,
    /// Block indices.
    pub blocks: Range<usize>,
}

impl Send {
    /// Block `block` alone to `to`.
    pub fn block(to: usize, block: usize) -> Send {
        Send { to, blocks: block..block + 1 }
    }
}

/// Blocks received from a peer: a non-empty range of consecutive block indices, matching the
/// peer's [`Send`] of the same round exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recv {
    /// Source rank.
    pub from: usize,
    /// Block indices.
    pub blocks: Range<usize>,
    /// How they are combined into the local blocks.
    pub combine: Combine,
}

impl Recv {
    /// Block `block` alone from `from`.
    pub fn block(from: usize, block: usize, combine: Combine) -> Recv {
        Recv { from, blocks: block..block + 1, combine }
    }
}

/// One round of a rank's schedule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Sends posted this round.
    pub sends: Vec<Send>,
    /// Receives posted this round.
    pub recvs: Vec<Recv>,
}

/// A rank's whole schedule for one collective.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Number of blocks the buffer is split into.
    pub blocks: usize,
    /// The rounds, in order.
    pub rounds: Vec<Round>,
}

/// The element range `[start, end)` of block `b` of `blocks` over `count` elements: the first
/// `count % blocks` blocks get one element more than the rest.
pub fn block_range(count: usize, blocks: usize, b: usize) -> Range<usize> {
    assert!(b < blocks, "block {b} of {blocks}");
    let base = count / blocks;
    let extra = count % blocks;
    let start = b * base + b.min(extra);
    let len = base + usize::from(b < extra);
    start..start + len
}

/// The block rank `rank` holds fully reduced after a reduce-scatter over `world` ranks (and the
/// block it contributes to an all-gather).
pub fn owned_block(rank: usize, world: usize) -> usize {
    assert!(rank < world);
    rank
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn blocks_tile_the_buffer_exactly_and_differ_in_size_by_at_most_one(count in 0usize..10_000, blocks in 1usize..64) {
            let mut next = 0;
            let mut sizes = Vec::new();
            for b in 0..blocks {
                let r = block_range(count, blocks, b);
                prop_assert_eq!(r.start, next);
                next = r.end;
                sizes.push(r.len());
            }
            prop_assert_eq!(next, count);
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            prop_assert!(max - min <= 1);
        }
    }
}
