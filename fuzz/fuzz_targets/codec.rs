//! Arbitrary bytes as an int8 or 4-bit encoding: an error or exactly the declared number of
//! finite-or-not values, never a panic; and any f32s (from the same bytes) encode to something
//! that decodes to the same count, each value within half a step of the original.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phalanx_collectives::codec::{decode, encode, encoded_len, Compression};

fuzz_target!(|data: &[u8]| {
    for c in [Compression::Int8, Compression::Int4] {
        if let Ok(v) = decode(c, data) {
            assert_eq!(v.len() as u32, u32::from_le_bytes(data[..4].try_into().unwrap()));
        }
        let xs: Vec<f32> = data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let enc = encode(c, &xs);
        assert_eq!(enc.len(), encoded_len(c, xs.len()));
        let back = decode(c, &enc).expect("own encoding decodes");
        assert_eq!(back.len(), xs.len());
        for (g, (xg, bg)) in xs.chunks(256).zip(back.chunks(256)).enumerate() {
            let max = xg.iter().filter(|x| x.is_finite()).fold(0f32, |m, x| m.max(x.abs()));
            // One step is max/levels, at least the smallest subnormal.
            let floor = if max > 0.0 { f32::from_bits(1) } else { 0.0 };
            let step = (max / if c == Compression::Int8 { 127.0 } else { 7.0 }).max(floor);
            for (x, b) in xg.iter().zip(bg) {
                if x.is_finite() {
                    assert!((x - b).abs() <= step * 0.5 + max * 1e-6 + f32::from_bits(2), "group {g}: {x} -> {b}");
                } else {
                    assert_eq!(*b, 0.0);
                }
            }
        }
    }
});
