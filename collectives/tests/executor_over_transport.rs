//! The executor driven over the real sans-IO transport (`phalanx_proto::Endpoint`s joined by
//! the virtual-time harness): every rank of a world runs ring all-reduce while one of the two
//! links of each pair drops and corrupts frames. Results match the single-process run bit for
//! bit — the transport's faults are invisible to the collective.

use std::time::Duration;

use phalanx_collectives::executor::Executor;
use phalanx_collectives::reduce::{set_element_f64, DType, ReduceOp};
use phalanx_collectives::schedule::{ring, Collective};
use phalanx_proto::harness::Harness;
use phalanx_proto::{ChannelId, RankId, TransportConfig};

const CH: ChannelId = ChannelId(100);

fn input(rank: usize, count: usize) -> Vec<u8> {
    let mut b = vec![0u8; count * 4];
    for i in 0..count {
        set_element_f64(DType::F32, &mut b, i, ((rank * 31 + i * 17) % 101) as f64 * 0.37 - 9.0);
    }
    b
}

fn executors(world: usize, count: usize) -> Vec<Executor> {
    (0..world)
        .map(|r| {
            let s = ring::schedule(Collective::AllReduce, r, world).expect("ring all-reduce");
            Executor::new(s, 1, DType::F32, ReduceOp::Sum, world, input(r, count))
        })
        .collect()
}

/// Runs the executors with no transport at all (messages handed over directly, in order).
fn run_direct(mut ex: Vec<Executor>) -> Vec<Vec<u8>> {
    while !ex.iter().all(|e| e.is_done()) {
        let mut sent = Vec::new();
        for (r, e) in ex.iter_mut().enumerate() {
            while let Some((to, m)) = e.poll_send() {
                sent.push((r, to, m));
            }
        }
        assert!(!sent.is_empty(), "no progress");
        for (from, to, m) in sent {
            ex[to].handle_chunks(from, m.chunks()).expect("valid");
        }
    }
    ex.into_iter().map(Executor::into_buffer).collect()
}

/// Runs the executors over endpoints in the harness.
fn run_over_transport(mut ex: Vec<Executor>, h: &mut Harness) -> Vec<Vec<u8>> {
    let world = ex.len();
    let mut consumed = vec![0usize; world];
    for _ in 0..100_000 {
        for (r, e) in ex.iter_mut().enumerate() {
            while let Some((to, m)) = e.poll_send() {
                h.send(RankId(r as u32), RankId(to as u32), CH, m);
            }
        }
        if ex.iter().all(|e| e.is_done()) {
            return ex.into_iter().map(Executor::into_buffer).collect();
        }
        let seen = consumed.clone();
        let until = h.now + Duration::from_secs(10);
        let progressed = h.run_until(until, 1_000_000, |h| {
            (0..world).any(|r| h.delivered.get(&RankId(r as u32)).map_or(0, |d| d.len()) > seen[r])
        });
        assert!(progressed, "the transport stalled at {}", h.now);
        for (r, e) in ex.iter_mut().enumerate() {
            let got = h.delivered.get(&RankId(r as u32)).map_or(&[][..], |d| &d[consumed[r]..]);
            for m in got {
                e.handle_message(m.from.0 as usize, m.payload.to_bytes()).expect("valid message");
            }
            consumed[r] += got.len();
        }
    }
    panic!("collective did not finish");
}

#[test]
fn ring_all_reduce_over_faulty_links_matches_the_direct_run_bit_for_bit() {
    let cfg = TransportConfig {
        chunk_bytes: 1024,
        heartbeat_interval: Duration::from_millis(10),
        link_timeout: Duration::from_millis(100),
        min_rto: Duration::from_millis(20),
        ..TransportConfig::default()
    };
    for world in [1usize, 2, 3, 5, 8] {
        let count = 1000 + world * 7;
        let expected = run_direct(executors(world, count));
        let mut h = Harness::new(world as u32, cfg.clone());
        for a in 0..world as u32 {
            for b in a + 1..world as u32 {
                h.connect(RankId(a), RankId(b), Duration::from_micros(20), 1_000_000_000);
                let bad = h.connect(RankId(a), RankId(b), Duration::from_micros(20), 1_000_000_000);
                h.fault(bad).drop_next_data = 2;
                h.fault(bad).corrupt_next_data = 2;
            }
        }
        let got = run_over_transport(executors(world, count), &mut h);
        assert_eq!(got, expected, "world {world}");
        let retransmits: u64 = h.endpoints.values().map(|e| e.counters().retransmits).sum();
        assert!(world == 1 || retransmits > 0, "world {world}: the faulty links lost frames that were resent");
    }
}
