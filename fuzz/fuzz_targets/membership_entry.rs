//! Arbitrary bytes as a membership log entry: a command or a decode error, never a panic; a
//! decoded command re-encodes to the same bytes, and applying it to a small view either changes
//! it or leaves it exactly as it was.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phalanx_runtime::membership::{decode, encode, ClusterView, Command};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = decode(data) {
        assert_eq!(&encode(&c)[..], data, "one encoding per command");
        let mut v = ClusterView::new();
        let join = |h: &str| Command::Join { dc: 0, host: h.into(), addrs: vec![], incarnation: 1 };
        for h in ["a", "b"] {
            v.apply(&join(h)).expect("fresh hosts join");
        }
        v.apply(&Command::BeginEpoch { expected: 0 }).expect("epoch 0 is current");
        let before = v.clone();
        if v.apply(&c).is_err() {
            assert_eq!(v, before, "a refused command changes nothing");
        }
    }
});
