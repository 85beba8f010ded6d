//! Arbitrary messages from peers into a communicator's `Group` (data and control: reports,
//! decisions), in every phase of a coordinated call and between calls, as coordinator and as
//! member: never a panic, and the contribution accounting stays balanced.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use phalanx_collectives::group::{AllReduceAlgorithm, CallOptions, FaultPolicy, Group, Op};
use phalanx_collectives::reduce::{DType, ReduceOp};
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let world = 2 + (pick as usize % 4);
    let rank = (pick as usize / 4) % world;
    let mut g = Group::new(rank, world);
    let policy = match pick % 3 {
        0 => FaultPolicy::Shrink,
        1 => FaultPolicy::Quorum { min: 2, wait: Duration::from_millis(5) },
        _ => FaultPolicy::Abort,
    };
    let op = Op::AllReduce { algorithm: AllReduceAlgorithm::Auto, op: ReduceOp::Sum };
    g.start(0, op, DType::F32, vec![0u8; 64], CallOptions { policy, verify: pick & 0x80 != 0 });
    // Messages: a length byte, a sender byte, then the bytes; the top bit of the sender byte
    // marks it as control (sets the tag's top bit).
    let mut at = 0;
    let mut now = 0u64;
    while at + 2 <= rest.len() {
        let len = rest[at] as usize;
        let from = (rest[at + 1] & 0x7f) as usize % world;
        let control = rest[at + 1] & 0x80 != 0;
        at += 2;
        let end = (at + len).min(rest.len());
        let mut m = rest[at..end].to_vec();
        at = end;
        if control && m.len() >= 8 {
            m[7] |= 0x80;
        }
        now += 1_000_000;
        g.handle_message(from, vec![Bytes::from(m)], now);
        if len % 7 == 0 {
            g.handle_peer_lost((len / 7) % world, now);
        }
        g.handle_timeout(now);
        while g.poll_send().is_some() {}
        if g.finish().is_some() {
            g.start(now, op, DType::F32, vec![0u8; 64], CallOptions { policy, verify: false });
        }
    }
    let c = g.counters();
    assert_eq!(c.offered, c.applied + c.late + c.dropped + 1, "{c:?}");
});
