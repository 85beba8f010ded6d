//! Lossy compression of f32 contributions for slow (WAN) hops: int8 and 4-bit quantisation with
//! one scale per group of [`GROUP`] elements, and error feedback (the quantisation error of a
//! call is added to the next call's contribution, so nothing is lost over time, only delayed).
//!
//! Encoding: `count u32 | per group: scale f32 | values`, little endian. A value is
//! `round(x / scale)` with `scale = max|x| / 127` (int8, one byte, two's complement) or
//! `max|x| / 7` (4-bit, two per byte, low nibble first, stored `q + 8`). Every element is
//! within `scale / 2` of the original (plus f32 rounding). Decoding checks every length and
//! refuses anything malformed with an error; it never panics.

use thiserror::Error;

/// Elements per scale.
pub const GROUP: usize = 256;

/// How a contribution is compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// Sent as is.
    #[default]
    None,
    /// 8-bit integers with a scale per group (about 3.9× smaller than f32).
    Int8,
    /// 4-bit integers with a scale per group (about 7.5× smaller than f32).
    Int4,
}

/// Why an encoding was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    /// The length does not match the element count it declares.
    #[error("encoding of {declared} elements must be {expected} bytes, got {got}")]
    Length {
        /// Elements declared.
        declared: usize,
        /// Bytes that needs.
        expected: usize,
        /// Bytes present.
        got: usize,
    },
    /// A scale is negative, infinite or NaN.
    #[error("group {group} has an invalid scale")]
    Scale {
        /// The group.
        group: usize,
    },
    /// `Compression::None` has no encoding.
    #[error("no encoding for uncompressed data")]
    Uncompressed,
}

fn value_bytes(c: Compression, n: usize) -> usize {
    match c {
        Compression::None => n * 4,
        Compression::Int8 => n,
        Compression::Int4 => n.div_ceil(2),
    }
}

/// Bytes of the encoding of `count` elements.
pub fn encoded_len(c: Compression, count: usize) -> usize {
    if c == Compression::None {
        return count * 4;
    }
    let full = count / GROUP;
    let rest = count % GROUP;
    4 + full * (4 + value_bytes(c, GROUP)) + if rest > 0 { 4 + value_bytes(c, rest) } else { 0 }
}

fn levels(c: Compression) -> f32 {
    match c {
        Compression::Int4 => 7.0,
        _ => 127.0,
    }
}

/// Encodes `src`. Non-finite values are sent as 0 (and their whole error kept by
/// [`ErrorFeedback`]); panics for [`Compression::None`].
pub fn encode(c: Compression, src: &[f32]) -> Vec<u8> {
    assert!(c != Compression::None, "nothing to encode");
    let mut out = Vec::with_capacity(encoded_len(c, src.len()));
    out.extend_from_slice(&(src.len() as u32).to_le_bytes());
    let l = levels(c);
    for g in src.chunks(GROUP) {
        let max = g.iter().filter(|x| x.is_finite()).fold(0.0f32, |m, x| m.max(x.abs()));
        // The scale, rounded up so that `max` maps within `l` steps; at least the smallest
        // subnormal (where `max / l` would underflow). Quotients are taken in f64, so a value is
        // within half a step of its code even where the scale has few significant bits.
        let mut scale = (f64::from(max) / f64::from(l)) as f32;
        if scale > 0.0 && f64::from(scale) * f64::from(l) < f64::from(max) {
            scale = f32::from_bits(scale.to_bits() + 1);
        }
        if scale == 0.0 && max > 0.0 {
            scale = f32::from_bits(1);
        }
        out.extend_from_slice(&scale.to_le_bytes());
        // Normal scales: multiply by the reciprocal in f32 and round with the 1.5·2^23 trick
        // (vectorises); subnormal scales, where the reciprocal loses bits: divide in f64.
        let fast = scale >= f32::MIN_POSITIVE && (1.0 / scale).is_finite();
        let inv = if fast { 1.0 / scale } else { 0.0 };
        let q = |x: f32| -> i8 {
            if scale == 0.0 || !x.is_finite() {
                0
            } else if fast {
                const ROUND: f32 = 12_582_912.0;
                (((x * inv).clamp(-l, l) + ROUND) - ROUND) as i8
            } else {
                (f64::from(x) / f64::from(scale)).round().clamp(-f64::from(l), f64::from(l)) as i8
            }
        };
        match c {
            Compression::Int8 => out.extend(g.iter().map(|x| q(*x) as u8)),
            Compression::Int4 => {
                for pair in g.chunks(2) {
                    let lo = (q(pair[0]) + 8) as u8;
                    let hi = pair.get(1).map_or(8, |x| (q(*x) + 8) as u8);
                    out.push(lo | hi << 4);
                }
            }
            Compression::None => unreachable!("checked above"),
        }
    }
    out
}

/// Decodes an encoding made by [`encode`] with the same `c`.
pub fn decode(c: Compression, bytes: &[u8]) -> Result<Vec<f32>, CodecError> {
    // The declared count, but never more than two values per byte that arrived.
    let declared = bytes.get(..4).map_or(0, |h| u32::from_le_bytes(h.try_into().expect("4 bytes")) as usize);
    let mut out = Vec::with_capacity(declared.min(bytes.len().saturating_mul(2)));
    decode_with(c, bytes, |_| Ok(()), |_, group| out.extend_from_slice(group))?;
    Ok(out)
}

/// Decodes an encoding made by [`encode`] and adds it to `acc` elementwise (no intermediate
/// buffer). `acc` must hold exactly the declared number of elements; on an error `acc` may
/// be partly updated.
pub fn decode_add(c: Compression, bytes: &[u8], acc: &mut [f32]) -> Result<(), CodecError> {
    let len = acc.len();
    let mut checked = |n: usize| {
        if n == len {
            Ok(())
        } else {
            Err(CodecError::Length { declared: n, expected: encoded_len(c, len), got: bytes.len() })
        }
    };
    decode_with(c, bytes, &mut checked, |start, group| {
        for (a, v) in acc[start..start + group.len()].iter_mut().zip(group) {
            *a += v;
        }
    })
}

/// Validates `bytes`, tells `count_ok` the declared element count, then hands every group's
/// values to `each(index of its first element, values)` in order.
fn decode_with(
    c: Compression,
    bytes: &[u8],
    mut count_ok: impl FnMut(usize) -> Result<(), CodecError>,
    mut each: impl FnMut(usize, &[f32]),
) -> Result<(), CodecError> {
    if c == Compression::None {
        return Err(CodecError::Uncompressed);
    }
    let Some(head) = bytes.get(..4) else {
        return Err(CodecError::Length { declared: 0, expected: 4, got: bytes.len() });
    };
    let count = u32::from_le_bytes(head.try_into().expect("4 bytes")) as usize;
    let expected = encoded_len(c, count);
    if bytes.len() != expected {
        return Err(CodecError::Length { declared: count, expected, got: bytes.len() });
    }
    count_ok(count)?;
    let mut at = 4;
    for (group, start) in (0..count).step_by(GROUP).enumerate() {
        let n = GROUP.min(count - start);
        let scale = f32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(CodecError::Scale { group });
        }
        at += 4;
        let vb = value_bytes(c, n);
        let v = &bytes[at..at + vb];
        at += vb;
        let mut group_values = [0f32; GROUP];
        match c {
            Compression::Int8 => {
                for (d, b) in group_values.iter_mut().zip(v) {
                    *d = dequantise(*b as i8, scale);
                }
            }
            Compression::Int4 => {
                for (pair, b) in group_values.chunks_mut(2).zip(v) {
                    pair[0] = dequantise((b & 0xF) as i8 - 8, scale);
                    if let Some(hi) = pair.get_mut(1) {
                        *hi = dequantise((b >> 4) as i8 - 8, scale);
                    }
                }
            }
            Compression::None => unreachable!("checked above"),
        }
        each(start, &group_values[..n]);
    }
    Ok(())
}

/// `q · scale`, kept finite (the scale is rounded up, so `127 · scale` may exceed `f32::MAX`
/// by a hair when the group holds `±f32::MAX`).
fn dequantise(q: i8, scale: f32) -> f32 {
    (f32::from(q) * scale).clamp(-f32::MAX, f32::MAX)
}

/// The quantisation error carried from one call to the next, for one tensor.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// No error carried yet.
    pub fn new() -> ErrorFeedback {
        ErrorFeedback::default()
    }

    /// Encodes `x` plus the carried error, and carries this encoding's error instead. (A
    /// tensor of another length starts afresh.)
    pub fn encode(&mut self, c: Compression, x: &[f32]) -> Vec<u8> {
        if self.residual.len() != x.len() {
            self.residual = vec![0.0; x.len()];
        }
        let y: Vec<f32> = x.iter().zip(&self.residual).map(|(a, e)| a + e).collect();
        let enc = encode(c, &y);
        let back = decode(c, &enc).expect("an encoding just made decodes");
        for ((e, y), b) in self.residual.iter_mut().zip(&y).zip(back) {
            *e = if y.is_finite() { y - b } else { 0.0 };
        }
        enc
    }

    /// The error carried into the next call.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Error feedback carrying `residual` into the next call (as another rank's
    /// [`ErrorFeedback::residual`], when that rank's role passes to this one).
    pub fn with_residual(residual: Vec<f32>) -> ErrorFeedback {
        ErrorFeedback { residual }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_element_comes_back_within_half_a_step(
            xs in proptest::collection::vec(-1e6f32..1e6, 0..1000),
            four in any::<bool>(),
        ) {
            let c = if four { Compression::Int4 } else { Compression::Int8 };
            let enc = encode(c, &xs);
            prop_assert_eq!(enc.len(), encoded_len(c, xs.len()));
            let back = decode(c, &enc).unwrap();
            prop_assert_eq!(back.len(), xs.len());
            for (g, (xg, bg)) in xs.chunks(GROUP).zip(back.chunks(GROUP)).enumerate() {
                let max = xg.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                let step = max / levels(c);
                for (x, b) in xg.iter().zip(bg) {
                    prop_assert!((x - b).abs() <= step * 0.5 + max * 1e-6 + f32::from_bits(2), "group {}: {} came back as {}", g, x, b);
                }
            }
        }

        #[test]
        fn arbitrary_bytes_decode_to_an_error_or_the_declared_count(bytes in proptest::collection::vec(any::<u8>(), 0..600), four in any::<bool>()) {
            let c = if four { Compression::Int4 } else { Compression::Int8 };
            if let Ok(v) = decode(c, &bytes) {
                prop_assert_eq!(v.len() as u32, u32::from_le_bytes(bytes[..4].try_into().unwrap()));
            }
        }

        #[test]
        fn error_feedback_loses_nothing_over_time(rounds in proptest::collection::vec(proptest::collection::vec(-10f32..10.0, 300), 1..20)) {
            // The sum of what was sent plus the error still carried equals the sum offered.
            let mut fb = ErrorFeedback::new();
            let mut sent = vec![0.0f64; 300];
            let mut offered = vec![0.0f64; 300];
            for x in &rounds {
                let enc = fb.encode(Compression::Int4, x);
                for (i, v) in decode(Compression::Int4, &enc).unwrap().iter().enumerate() {
                    sent[i] += f64::from(*v);
                    offered[i] += f64::from(x[i]);
                }
            }
            for i in 0..300 {
                let carried = f64::from(fb.residual()[i]);
                prop_assert!((sent[i] + carried - offered[i]).abs() < 1e-3, "element {}: {} + {} vs {}", i, sent[i], carried, offered[i]);
            }
        }
    }

    #[test]
    fn compression_ratios_are_as_documented() {
        let n = 1 << 20;
        let ratio = |c| (n * 4) as f64 / encoded_len(c, n) as f64;
        assert!((3.9..4.0).contains(&ratio(Compression::Int8)), "{}", ratio(Compression::Int8));
        assert!((7.5..8.0).contains(&ratio(Compression::Int4)), "{}", ratio(Compression::Int4));
    }

    #[test]
    fn subnormal_groups_keep_within_half_a_step() {
        // Found by the `codec` fuzz target: max/127 underflowed to a zero scale.
        // And the second: a subnormal scale has few bits, so x / scale landed a step off.
        // And the third: ±f32::MAX times a rounded-up scale overflowed to infinity.
        for x in [[f32::from_bits(1), -f32::from_bits(3)], [f32::from_bits(5120), 0.0], [-f32::MAX, 1.0]] {
            for c in [Compression::Int8, Compression::Int4] {
                let back = decode(c, &encode(c, &x)).unwrap();
                let step = (x[0].abs().max(x[1].abs()) / levels(c)).max(f32::from_bits(1));
                for (a, b) in x.iter().zip(&back) {
                    assert!(b.is_finite() && (a - b).abs() <= step / 2.0 + f32::from_bits(2), "{c:?}: {a} -> {b}");
                }
            }
        }
    }

    #[test]
    fn a_bad_scale_or_length_is_refused() {
        let mut enc = encode(Compression::Int8, &[1.0, 2.0, 3.0]);
        assert!(matches!(decode(Compression::Int8, &enc[..5]), Err(CodecError::Length { .. })));
        enc[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(decode(Compression::Int8, &enc), Err(CodecError::Scale { group: 0 }));
    }
}
