//! A small real model for the semi-synchronous experiments and demo: a two-layer perceptron
//! (ReLU hidden layer, softmax cross-entropy) trained with real gradients on a classification
//! task generated from a fixed random "teacher" network, so nothing is downloaded and every
//! run sees the same data. Parameters are one flat `f32` vector (what the runtime syncs).

/// Input features.
pub const INPUTS: usize = 16;
/// Hidden units.
pub const HIDDEN: usize = 64;
/// Classes.
pub const CLASSES: usize = 4;
/// Parameters: W1, b1, W2, b2.
pub const PARAMS: usize = HIDDEN * INPUTS + HIDDEN + CLASSES * HIDDEN + CLASSES;

/// A deterministic stream of uniform values (splitmix64).
pub struct Rng(u64);

impl Rng {
    /// A stream from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Labelled examples.
pub struct Dataset {
    /// Rows of `INPUTS` features.
    pub x: Vec<[f32; INPUTS]>,
    /// Class of each row.
    pub y: Vec<usize>,
}

/// `n` examples labelled by the teacher network of `task_seed`, features drawn from `seed`.
pub fn dataset(task_seed: u64, seed: u64, n: usize) -> Dataset {
    let teacher = init(task_seed, 3.0);
    let mut r = Rng::new(seed);
    let x: Vec<[f32; INPUTS]> = (0..n).map(|_| std::array::from_fn(|_| r.uniform())).collect();
    let y = x.iter().map(|xi| argmax(&forward(&teacher, xi).1)).collect();
    Dataset { x, y }
}

/// Initial parameters (uniform, scaled by fan-in), the same for a given seed.
pub fn init(seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    let mut p = vec![0.0f32; PARAMS];
    let (w1, rest) = p.split_at_mut(HIDDEN * INPUTS);
    let (_, rest) = rest.split_at_mut(HIDDEN);
    let (w2, _) = rest.split_at_mut(CLASSES * HIDDEN);
    w1.iter_mut().for_each(|w| *w = r.uniform() * scale / (INPUTS as f32).sqrt());
    w2.iter_mut().for_each(|w| *w = r.uniform() * scale / (HIDDEN as f32).sqrt());
    p
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold((0, f32::MIN), |(bi, bv), (i, x)| if *x > bv { (i, *x) } else { (bi, bv) }).0
}

/// Hidden activations and logits.
fn forward(p: &[f32], x: &[f32; INPUTS]) -> ([f32; HIDDEN], [f32; CLASSES]) {
    let (w1, rest) = p.split_at(HIDDEN * INPUTS);
    let (b1, rest) = rest.split_at(HIDDEN);
    let (w2, b2) = rest.split_at(CLASSES * HIDDEN);
    let mut h = [0.0f32; HIDDEN];
    for (j, hj) in h.iter_mut().enumerate() {
        let z: f32 = b1[j] + w1[j * INPUTS..(j + 1) * INPUTS].iter().zip(x).map(|(w, v)| w * v).sum::<f32>();
        *hj = z.max(0.0);
    }
    let mut o = [0.0f32; CLASSES];
    for (k, ok) in o.iter_mut().enumerate() {
        *ok = b2[k] + w2[k * HIDDEN..(k + 1) * HIDDEN].iter().zip(&h).map(|(w, v)| w * v).sum::<f32>();
    }
    (h, o)
}

fn softmax(o: &[f32; CLASSES]) -> [f32; CLASSES] {
    let m = o.iter().copied().fold(f32::MIN, f32::max);
    let e: [f32; CLASSES] = std::array::from_fn(|k| (o[k] - m).exp());
    let s: f32 = e.iter().sum();
    std::array::from_fn(|k| e[k] / s)
}

/// Mean cross-entropy of `p` on `d`.
pub fn loss(p: &[f32], d: &Dataset) -> f32 {
    let total: f32 = d.x.iter().zip(&d.y).map(|(x, y)| -softmax(&forward(p, x).1)[*y].max(1e-12).ln()).sum();
    total / d.x.len().max(1) as f32
}

/// Gradient of the mean cross-entropy over the examples `batch` of `d`.
pub fn gradient(p: &[f32], d: &Dataset, batch: &[usize]) -> Vec<f32> {
    let mut g = vec![0.0f32; PARAMS];
    let (w2_off, b2_off) = (HIDDEN * INPUTS + HIDDEN, HIDDEN * INPUTS + HIDDEN + CLASSES * HIDDEN);
    let w2 = &p[w2_off..b2_off];
    for &i in batch {
        let x = &d.x[i];
        let (h, o) = forward(p, x);
        let mut dout = softmax(&o);
        dout[d.y[i]] -= 1.0;
        let mut dh = [0.0f32; HIDDEN];
        for k in 0..CLASSES {
            g[b2_off + k] += dout[k];
            for j in 0..HIDDEN {
                g[w2_off + k * HIDDEN + j] += dout[k] * h[j];
                dh[j] += dout[k] * w2[k * HIDDEN + j];
            }
        }
        for j in 0..HIDDEN {
            if h[j] <= 0.0 {
                continue;
            }
            g[HIDDEN * INPUTS + j] += dh[j];
            for (f, xf) in x.iter().enumerate() {
                g[j * INPUTS + f] += dh[j] * xf;
            }
        }
    }
    let n = batch.len().max(1) as f32;
    g.iter_mut().for_each(|v| *v /= n);
    g
}

/// The learning rate at `step` (0-based) of a run of `steps` steps: `peak` throughout, or with
/// `cosine` decayed along a half cosine from `peak` to 0 at the end.
pub fn learning_rate(peak: f32, cosine: bool, step: u64, steps: u64) -> f32 {
    if !cosine {
        return peak;
    }
    let progress = step as f32 / steps.max(1) as f32;
    peak * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cosine_schedule_falls_from_the_peak_to_zero_and_a_constant_one_stays() {
        assert_eq!(learning_rate(0.8, false, 150, 200), 0.8);
        assert_eq!(learning_rate(0.8, true, 0, 200), 0.8);
        assert!((learning_rate(0.8, true, 100, 200) - 0.4).abs() < 1e-6);
        assert!(learning_rate(0.8, true, 199, 200) < 1e-3);
        let lrs: Vec<f32> = (0..200).map(|s| learning_rate(0.8, true, s, 200)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "not decreasing");
    }

    #[test]
    fn the_gradient_matches_finite_differences() {
        let d = dataset(1, 2, 16);
        let p = init(3, 1.0);
        let batch: Vec<usize> = (0..16).collect();
        let g = gradient(&p, &d, &batch);
        let sub = Dataset { x: d.x.clone(), y: d.y.clone() };
        for i in [0, 17, HIDDEN * INPUTS + 3, HIDDEN * INPUTS + HIDDEN + 5, PARAMS - 1] {
            let (mut a, mut b) = (p.clone(), p.clone());
            a[i] += 1e-2;
            b[i] -= 1e-2;
            let numeric = (loss(&a, &sub) - loss(&b, &sub)) / 2e-2;
            assert!((numeric - g[i]).abs() < 2e-3 + 0.05 * numeric.abs(), "param {i}: {numeric} vs {}", g[i]);
        }
    }

    #[test]
    fn plain_sgd_learns_the_task() {
        let d = dataset(7, 8, 512);
        let mut p = init(9, 1.0);
        let before = loss(&p, &d);
        let mut r = Rng::new(1);
        for _ in 0..300 {
            let batch: Vec<usize> = (0..32).map(|_| r.below(d.x.len())).collect();
            let g = gradient(&p, &d, &batch);
            p.iter_mut().zip(&g).for_each(|(w, gi)| *w -= 0.2 * gi);
        }
        let after = loss(&p, &d);
        assert!(after < before * 0.6, "loss {before} -> {after}");
    }
}
