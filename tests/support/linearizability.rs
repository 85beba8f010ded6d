//! A linearizability checker for small histories (Wing & Gong's search with the memoisation
//! of Lowe / porcupine): is there one order of the calls, consistent with real time, in which
//! a single copy of the model produces every observed result?
//!
//! A call whose outcome is unknown (the client gave up) may take effect at any point after its
//! invocation, or never.

use std::collections::HashSet;

/// A sequential model of the system.
pub trait Model: Clone {
    /// An operation.
    type Op;
    /// Its result.
    type Out: PartialEq + std::fmt::Debug;
    /// Applies `op`: the next model and the result a correct system returns.
    fn step(&self, op: &Self::Op) -> (Self, Self::Out);
    /// A fingerprint of the state (equal states, equal keys).
    fn key(&self) -> Vec<u8>;
}

/// One call: invoked at `invoke`, completed at `complete` with `out` (`None`: unknown).
#[derive(Clone, Debug)]
pub struct Call<Op, Out> {
    pub invoke: u64,
    pub complete: Option<u64>,
    pub op: Op,
    pub out: Option<Out>,
}

/// `Ok(order)` (indices into `history`) if linearizable, else `Err` with the longest prefix
/// the search could explain. Iterative depth-first search (histories of thousands of calls).
pub fn check<M: Model>(init: M, h: &[Call<M::Op, M::Out>]) -> Result<Vec<usize>, String> {
    let n = h.len();
    let mut done = vec![false; n];
    // Placed calls with the model before each.
    let mut stack: Vec<(usize, M)> = Vec::new();
    let mut model = init;
    let mut best = 0;
    let mut seen: HashSet<(Vec<bool>, Vec<u8>)> = HashSet::new();
    let mut cursor = 0;
    let mut fresh = true;
    loop {
        if fresh {
            best = best.max(stack.len());
            // Finished when every completed call is placed (unknown ones may never have run).
            if (0..n).all(|i| done[i] || h[i].complete.is_none()) {
                return Ok(stack.into_iter().map(|(i, _)| i).collect());
            }
            if !seen.insert((done.clone(), model.key())) {
                cursor = n; // explored before: backtrack
            }
        }
        // A call may go next only if no pending call completed before it was invoked.
        let horizon = (0..n).filter(|i| !done[*i]).filter_map(|i| h[i].complete).min().unwrap_or(u64::MAX);
        let mut placed = false;
        for i in cursor..n {
            if done[i] || h[i].invoke > horizon {
                continue;
            }
            let (next, out) = model.step(&h[i].op);
            if h[i].out.as_ref().is_some_and(|seen_out| *seen_out != out) {
                continue;
            }
            done[i] = true;
            stack.push((i, std::mem::replace(&mut model, next)));
            placed = true;
            break;
        }
        if placed {
            cursor = 0;
            fresh = true;
            continue;
        }
        match stack.pop() {
            Some((i, before)) => {
                done[i] = false;
                model = before;
                cursor = i + 1;
                fresh = false;
            }
            None => return Err(format!("not linearizable: at most {best} of {n} calls could be ordered")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A register: write(v) → (), read → v.
    #[derive(Clone)]
    struct Register(u32);

    impl Model for Register {
        type Op = Option<u32>;
        type Out = Option<u32>;
        fn step(&self, op: &Option<u32>) -> (Register, Option<u32>) {
            match op {
                Some(v) => (Register(*v), None),
                None => (self.clone(), Some(self.0)),
            }
        }
        fn key(&self) -> Vec<u8> {
            self.0.to_le_bytes().to_vec()
        }
    }

    fn call(invoke: u64, complete: u64, op: Option<u32>, out: Option<u32>) -> Call<Option<u32>, Option<u32>> {
        Call { invoke, complete: Some(complete), op, out: Some(out) }
    }

    #[test]
    fn overlapping_calls_may_take_either_order() {
        let h = [call(0, 10, Some(1), None), call(5, 15, None, Some(0))];
        assert!(check(Register(0), &h).is_ok());
        let h = [call(0, 10, Some(1), None), call(5, 15, None, Some(1))];
        assert!(check(Register(0), &h).is_ok());
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_caught() {
        let h = [call(0, 10, Some(1), None), call(11, 15, None, Some(0))];
        assert!(check(Register(0), &h).is_err());
    }

    #[test]
    fn a_call_of_unknown_outcome_may_or_may_not_have_happened() {
        let lost = Call { invoke: 0, complete: None, op: Some(7), out: None };
        assert!(check(Register(0), &[lost.clone(), call(20, 30, None, Some(7))]).is_ok());
        assert!(check(Register(0), &[lost.clone(), call(20, 30, None, Some(0))]).is_ok());
        assert!(check(Register(0), &[lost, call(20, 30, None, Some(5))]).is_err());
    }
}
