//! When each part of the parameters is synchronised.
//!
//! The parameters (one flat vector of elements) are split into `fragments` contiguous ranges.
//! Plain DiLoCo and local SGD use one fragment and sync it every `every` inner steps. Streaming
//! DiLoCo (Douillard et al., 2025) uses several and staggers them: fragment `p` syncs at the
//! steps `s` with `(s + p·every/fragments) % every == 0`, so one fragment's communication
//! overlaps the next fragments' compute and peak bandwidth drops by the fragment count, while
//! each fragment still syncs once per `every` steps.

use std::ops::Range;

/// How a group trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// All-reduce of gradients every step (the baseline).
    Synchronous,
    /// Average parameters every `every` steps.
    LocalSgd {
        /// Inner steps between syncs.
        every: u64,
    },
    /// DiLoCo: outer gradients all-reduced every `every` steps, outer Nesterov step.
    Diloco {
        /// Inner steps between syncs (H).
        every: u64,
    },
    /// Streaming DiLoCo: `fragments` parameter ranges, each synced every `every` steps on a
    /// staggered schedule.
    StreamingDiloco {
        /// Inner steps between syncs of one fragment.
        every: u64,
        /// Parameter fragments.
        fragments: usize,
    },
}

impl SyncMode {
    /// How many fragments the parameters are split into.
    pub fn fragments(self) -> usize {
        match self {
            SyncMode::StreamingDiloco { fragments, .. } => fragments.max(1),
            _ => 1,
        }
    }

    /// Inner steps between syncs of one fragment (1 for synchronous training).
    pub fn every(self) -> u64 {
        match self {
            SyncMode::Synchronous => 1,
            SyncMode::LocalSgd { every } | SyncMode::Diloco { every } | SyncMode::StreamingDiloco { every, .. } => {
                every.max(1)
            }
        }
    }

    /// Which round of `fragment` a sync due at `step` is (counting from 1): a function of the
    /// step alone, so every rank agrees on it — a rank that rejoined with recovered state too.
    pub fn round_index(self, step: u64, fragment: usize) -> u64 {
        let (every, k) = (self.every(), self.fragments() as u64);
        (step + fragment as u64 * every / k) / every
    }

    /// The fragments whose sync is due after inner step `step` (counting from 1), ascending.
    pub fn due(self, step: u64) -> Vec<usize> {
        let (every, k) = (self.every(), self.fragments() as u64);
        (0..k).filter(|p| (step + p * every / k).is_multiple_of(every)).map(|p| p as usize).collect()
    }
}

/// `count` elements split into `k` contiguous ranges whose sizes differ by at most one (the
/// first `count % k` one longer).
pub fn fragment_ranges(count: usize, k: usize) -> Vec<Range<usize>> {
    let k = k.max(1);
    let (base, extra) = (count / k, count % k);
    let mut start = 0;
    (0..k)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn diloco_syncs_everything_every_h_steps() {
        let m = SyncMode::Diloco { every: 4 };
        let due: Vec<u64> = (1..=12).filter(|s| !m.due(*s).is_empty()).collect();
        assert_eq!(due, vec![4, 8, 12]);
        assert_eq!(m.due(8), vec![0]);
        assert_eq!(SyncMode::Synchronous.due(3), vec![0]);
    }

    #[test]
    fn streaming_fragments_are_staggered() {
        let m = SyncMode::StreamingDiloco { every: 6, fragments: 3 };
        let mut at = Vec::new();
        for s in 1..=12 {
            for p in m.due(s) {
                at.push((s, p));
            }
        }
        // Fragment 0 at 6 and 12, fragment 1 two steps earlier, fragment 2 four steps earlier.
        assert_eq!(at, vec![(2, 2), (4, 1), (6, 0), (8, 2), (10, 1), (12, 0)]);
    }

    #[test]
    fn round_indices_count_each_fragments_syncs() {
        let m = SyncMode::StreamingDiloco { every: 6, fragments: 3 };
        // Fragment 2 syncs at 2, 8, 14: its rounds 1, 2, 3.
        assert_eq!([2, 8, 14].map(|s| m.round_index(s, 2)), [1, 2, 3]);
        assert_eq!([6, 12].map(|s| m.round_index(s, 0)), [1, 2]);
    }

    proptest! {
        #[test]
        fn every_fragment_syncs_once_per_period(every in 1u64..20, k in 1usize..8, start in 0u64..100) {
            let m = SyncMode::StreamingDiloco { every, fragments: k };
            let mut count = vec![0; k];
            for s in start + 1..=start + every {
                for p in m.due(s) {
                    count[p] += 1;
                }
            }
            prop_assert!(count.iter().all(|c| *c == 1), "{:?}", count);
        }

        #[test]
        fn fragments_cover_every_element_once(count in 0usize..10_000, k in 1usize..17) {
            let r = fragment_ranges(count, k);
            prop_assert_eq!(r.len(), k);
            prop_assert_eq!(r[0].start, 0);
            prop_assert_eq!(r[k - 1].end, count);
            for w in r.windows(2) {
                prop_assert_eq!(w[0].end, w[1].start);
                prop_assert!(w[0].len() >= w[1].len() && w[0].len() - w[1].len() <= 1);
            }
        }
    }
}
