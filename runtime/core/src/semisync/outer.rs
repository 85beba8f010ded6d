//! The outer optimizer of DiLoCo (and local SGD as its special case).
//!
//! After H inner steps a rank's *outer gradient* for a parameter range is `anchor − params`
//! (where it started minus where it got). The group averages it, and every rank applies the
//! same update to the same anchor, so anchors stay bit-identical across ranks: SGD with
//! Nesterov momentum, as in the DiLoCo paper (outer lr 0.7, momentum 0.9):
//!
//! ```text
//! v ← μ·v + Δ
//! anchor ← anchor − lr·(Δ + μ·v)      (Nesterov)      or      anchor − lr·v   (plain momentum)
//! ```
//!
//! Local SGD (parameter averaging) is lr 1, μ 0: `anchor − mean(anchor − params)` is the
//! mean of the ranks' parameters.

/// SGD with (Nesterov) momentum over one parameter range.
#[derive(Clone, Debug, PartialEq)]
pub struct OuterOptimizer {
    lr: f32,
    momentum: f32,
    nesterov: bool,
    velocity: Vec<f32>,
}

impl OuterOptimizer {
    /// DiLoCo's outer optimizer: lr 0.7, Nesterov momentum 0.9.
    pub fn diloco() -> OuterOptimizer {
        OuterOptimizer::new(0.7, 0.9, true)
    }

    /// Local SGD: the new anchor is the average of the ranks' parameters.
    pub fn averaging() -> OuterOptimizer {
        OuterOptimizer::new(1.0, 0.0, false)
    }

    /// Outer SGD with learning rate `lr` and momentum `momentum` (Nesterov if `nesterov`).
    pub fn new(lr: f32, momentum: f32, nesterov: bool) -> OuterOptimizer {
        OuterOptimizer { lr, momentum, nesterov, velocity: Vec::new() }
    }

    /// The momentum buffer (empty before the first step).
    pub fn velocity(&self) -> &[f32] {
        &self.velocity
    }

    /// Replaces the momentum buffer (a rank that missed rounds adopting a healthy peer's).
    pub fn set_velocity(&mut self, velocity: &[f32]) {
        self.velocity = velocity.to_vec();
    }

    /// Applies the averaged outer gradient `delta` to `anchor` in place (same length; a new
    /// length restarts the momentum). Deterministic: the same inputs give the same bits on
    /// every rank.
    pub fn step(&mut self, anchor: &mut [f32], delta: &[f32]) {
        assert_eq!(anchor.len(), delta.len(), "an outer gradient per parameter");
        if self.velocity.len() != delta.len() {
            self.velocity = vec![0.0; delta.len()];
        }
        for ((a, d), v) in anchor.iter_mut().zip(delta).zip(self.velocity.iter_mut()) {
            *v = self.momentum * *v + d;
            let update = if self.nesterov { d + self.momentum * *v } else { *v };
            *a -= self.lr * update;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesterov_steps_match_a_hand_computed_reference() {
        // Two steps on one parameter, lr 0.7, μ 0.9, anchor 1.0, deltas 0.5 then 0.25:
        // v1 = 0.5; a1 = 1 − 0.7·(0.5 + 0.9·0.5) = 1 − 0.7·0.95 = 0.335
        // v2 = 0.9·0.5 + 0.25 = 0.7; a2 = 0.335 − 0.7·(0.25 + 0.9·0.7) = 0.335 − 0.7·0.88 = −0.281
        let mut o = OuterOptimizer::diloco();
        let mut a = [1.0f32];
        o.step(&mut a, &[0.5]);
        assert!((a[0] - 0.335).abs() < 1e-6, "{}", a[0]);
        assert!((o.velocity()[0] - 0.5).abs() < 1e-7);
        o.step(&mut a, &[0.25]);
        assert!((a[0] - -0.281).abs() < 1e-6, "{}", a[0]);
        assert!((o.velocity()[0] - 0.7).abs() < 1e-6);
    }

    #[test]
    fn plain_momentum_differs_from_nesterov() {
        // lr 0.5, μ 0.5: v1 = 1 → a = −0.5; v2 = 0.5 + 1 = 1.5 → a = −0.5 − 0.75 = −1.25.
        let mut o = OuterOptimizer::new(0.5, 0.5, false);
        let mut a = [0.0f32];
        o.step(&mut a, &[1.0]);
        o.step(&mut a, &[1.0]);
        assert_eq!(a[0], -1.25);
    }

    #[test]
    fn averaging_makes_the_anchor_the_mean_of_the_ranks() {
        let anchor = [2.0f32, -1.0];
        let ranks = [[1.0f32, 0.0], [3.0, 2.0], [5.0, -6.0]];
        let delta: Vec<f32> = (0..2).map(|i| ranks.iter().map(|p| anchor[i] - p[i]).sum::<f32>() / 3.0).collect();
        let mut a = anchor;
        OuterOptimizer::averaging().step(&mut a, &delta);
        assert_eq!(a, [3.0, -4.0 / 3.0]);
    }
}
