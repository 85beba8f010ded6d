//! The communicator over real TCP sockets on loopback (one process, one node per rank): every
//! collective gives the right answer on every rank, and a rank that never shows up makes the
//! others fail at the deadline with an error naming it, instead of hanging.

mod support;

use std::time::Duration;

use bytes::Bytes;
use phalanx_collectives::reduce::{element_f64, set_element_f64, DType, ReduceOp};
use phalanx_net::Node;
use phalanx_node::{AllReduceAlgorithm, CommError, Communicator};
use phalanx_proto::TransportConfig;

const SECRET: &[u8] = b"communicator-test";

/// Starts `world` nodes on loopback, each dialing every higher rank once.
async fn nodes(world: usize) -> Vec<Node> {
    support::nodes(world, SECRET, TransportConfig::default()).await
}

fn f32s(vals: impl Iterator<Item = f64>) -> Vec<u8> {
    let vals: Vec<f64> = vals.collect();
    let mut b = vec![0u8; vals.len() * 4];
    for (i, v) in vals.iter().enumerate() {
        set_element_f64(DType::F32, &mut b, i, *v);
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_collective_is_correct_on_every_rank_over_tcp() {
    let world = 4;
    let count = 100_003; // prime: blocks of unequal size
    let mut tasks = Vec::new();
    for (rank, node) in nodes(world).await.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut c = Communicator::new(node, rank, world);
            let d = Duration::from_secs(30);
            let input = f32s((0..count).map(|i| ((rank * 3 + i) % 5) as f64));
            let mut results = Vec::new();
            for algo in [AllReduceAlgorithm::Ring, AllReduceAlgorithm::RecursiveDoubling] {
                results.push(c.all_reduce(input.clone(), DType::F32, ReduceOp::Sum, algo, d).await.unwrap());
            }
            let bcast =
                c.broadcast(if rank == 2 { f32s((0..10).map(|i| i as f64)) } else { vec![0; 40] }, 2, d).await.unwrap();
            let sends = (0..world).map(|to| Bytes::from(vec![(rank * 10 + to) as u8; rank + to])).collect();
            let a2a = c.all_to_all(sends, d).await.unwrap();
            c.barrier(d).await.unwrap();
            c.flush(d).await;
            (results, bcast, a2a)
        }));
    }
    for (rank, t) in tasks.into_iter().enumerate() {
        let (results, bcast, a2a) = t.await.unwrap();
        for r in &results {
            for i in [0usize, 1, 77, count - 1] {
                let want: f64 = (0..world).map(|q| ((q * 3 + i) % 5) as f64).sum();
                assert_eq!(element_f64(DType::F32, r, i), want, "rank {rank} element {i}");
            }
        }
        assert_eq!(results[0], results[1], "ring and recursive doubling agree on small integers");
        assert_eq!(bcast, f32s((0..10).map(|i| i as f64)));
        for (from, b) in a2a.iter().enumerate() {
            assert_eq!(b, &Bytes::from(vec![(from * 10 + rank) as u8; from + rank]), "rank {rank} from {from}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_that_never_joins_makes_the_others_fail_at_the_deadline_naming_it() {
    let world = 3;
    let mut all = nodes(world).await;
    let _absent = all.pop().unwrap(); // rank 2 is up but never calls the collective
    let deadline = Duration::from_millis(500);
    let mut tasks = Vec::new();
    for (rank, node) in all.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut c = Communicator::new(node, rank, world);
            let started = std::time::Instant::now();
            let r = c.all_reduce(vec![0u8; 4096], DType::F32, ReduceOp::Sum, AllReduceAlgorithm::Ring, deadline).await;
            (r, started.elapsed())
        }));
    }
    for (rank, t) in tasks.into_iter().enumerate() {
        let (r, took) = t.await.unwrap();
        match r {
            // Rank 0's ring predecessor is the absent rank 2; rank 1 waits on rank 0, stuck too.
            Err(CommError::Deadline { waiting, .. }) => assert_eq!(waiting, vec![(rank + world - 1) % world]),
            other => panic!("expected a deadline error, got {other:?}"),
        }
        assert!(took < Duration::from_secs(10), "returned promptly, took {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_that_dies_mid_run_makes_the_survivors_fail_within_the_deadline_not_hang() {
    let world = 3;
    let deadline = Duration::from_secs(3);
    let mut tasks = Vec::new();
    for (rank, node) in nodes(world).await.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut c = Communicator::new(node, rank, world);
            let started = std::time::Instant::now();
            for i in 0..1000 {
                // Rank 2 dies (drops its node: sockets close) after a few rounds.
                if rank == 2 && i == 3 {
                    return (rank, i, None, started.elapsed());
                }
                let buf = vec![0u8; 64 << 10];
                if let Err(e) = c.all_reduce(buf, DType::F32, ReduceOp::Sum, AllReduceAlgorithm::Ring, deadline).await {
                    return (rank, i, Some(e), started.elapsed());
                }
            }
            (rank, 1000, None, started.elapsed())
        }));
    }
    for t in tasks {
        let (rank, i, err, took) = t.await.unwrap();
        if rank == 2 {
            continue;
        }
        assert!((3..1000).contains(&i), "rank {rank} stopped at round {i}");
        match err {
            Some(CommError::Deadline { .. }) | Some(CommError::PeerLost { .. }) => {}
            other => panic!("rank {rank}: expected a deadline or lost-peer error, got {other:?}"),
        }
        assert!(took < deadline * 4, "rank {rank} gave up in {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_all_reduce_with_error_feedback_is_identical_everywhere_and_loses_nothing_over_rounds() {
    use phalanx_node::{CallOptions, Compression, ErrorFeedback, Outcome};
    let world = 3;
    let count = 5000;
    let rounds = 6;
    let value = |rank: usize, round: usize, i: usize| ((rank * 13 + round * 7 + i) % 19) as f64 / 7.0 - 1.3;
    let mut tasks = Vec::new();
    for (rank, node) in nodes(world).await.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut c = Communicator::new(node, rank, world);
            let mut fb = ErrorFeedback::new();
            let mut results = Vec::new();
            for round in 0..rounds {
                let x = f32s((0..count).map(|i| value(rank, round, i)));
                let out = c
                    .all_reduce_compressed(
                        x,
                        ReduceOp::Sum,
                        Compression::Int4,
                        &mut fb,
                        CallOptions::default(),
                        Duration::from_secs(30),
                    )
                    .await
                    .unwrap();
                let Outcome::Done { data, .. } = out else { panic!("rank {rank}: {out:?}") };
                results.push(data);
            }
            // Kept alive until every rank is done (a closed node is a lost rank to the others).
            (results, fb.residual().to_vec(), c)
        }));
    }
    let mut all = Vec::new();
    let mut keep = Vec::new();
    for t in tasks {
        let (results, residual, comm) = t.await.unwrap();
        all.push((results, residual));
        keep.push(comm);
    }
    for r in 1..world {
        assert_eq!(all[r].0, all[0].0, "rank {r}: bit-identical results");
    }
    // Sum over rounds of the results + the errors still carried = the sum of everything offered.
    for i in (0..count).step_by(97) {
        let got: f64 = all[0].0.iter().map(|b| element_f64(DType::F32, b, i)).sum();
        let carried: f64 = all.iter().map(|(_, res)| f64::from(res[i])).sum();
        let offered: f64 = (0..world).flat_map(|r| (0..rounds).map(move |k| value(r, k, i) as f32 as f64)).sum();
        assert!((got + carried - offered).abs() < 1e-3, "element {i}: {got} + {carried} vs {offered}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_after_a_large_all_reduce_account_for_it() {
    let world = 4;
    let mut tasks = Vec::new();
    for (rank, node) in nodes(world).await.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut c = Communicator::new(node, rank, world);
            let buf = vec![0u8; 4 << 20];
            c.all_reduce(buf, DType::F32, ReduceOp::Sum, AllReduceAlgorithm::Ring, Duration::from_secs(30))
                .await
                .unwrap();
            let counters =
                tokio::time::timeout(Duration::from_secs(10), c.counters()).await.expect("counters answer").unwrap();
            // Kept alive until every rank is done (a closed node is a lost rank to the others).
            (counters, c)
        }));
    }
    let mut keep = Vec::new();
    for t in tasks {
        let (c, comm) = t.await.unwrap();
        assert_eq!((c.offered, c.applied), (1, 1));
        keep.push(comm);
    }
}

/// `count` little-endian i32s, element `i` being `f(i)`.
fn i32s(count: usize, f: impl Fn(usize) -> i32) -> Vec<u8> {
    (0..count).flat_map(|i| f(i).to_le_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_collectives_received_into_the_callers_buffer_are_right_to_the_last_byte() {
    use phalanx_collectives::schedule::block_range;
    // Three ranks (a ring that forwards), 12 MiB and some: blocks of unequal size, segments of
    // the executor's 1 MiB, each large enough to be posted (see `phalanx_proto::posting`).
    let (world, count) = (3, 3_000_017);
    let mut tasks = Vec::new();
    for (rank, node) in nodes(world).await.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut c = Communicator::new(node, rank, world);
            let d = Duration::from_secs(60);
            let own = block_range(count, world, rank);
            // Another rank's blocks hold garbage: the all-gather must overwrite all of them.
            let gathered = c
                .all_gather(i32s(count, |i| if own.contains(&i) { i as i32 * 7 + 13 } else { -1 }), DType::I32, d)
                .await
                .unwrap();
            let summed = c
                .all_reduce(
                    i32s(count, |i| i as i32 + rank as i32),
                    DType::I32,
                    ReduceOp::Sum,
                    AllReduceAlgorithm::Ring,
                    d,
                )
                .await
                .unwrap();
            let input = if rank == 1 { i32s(count, |i| i as i32 ^ 0x5a5a) } else { vec![0; count * 4] };
            let broadcast = c.broadcast(input, 1, d).await.unwrap();
            let counters = c.counters().await.unwrap();
            c.flush(d).await;
            (gathered, summed, broadcast, counters, c)
        }));
    }
    let mut keep = Vec::new();
    for (rank, t) in tasks.into_iter().enumerate() {
        let (gathered, summed, broadcast, counters, c) = t.await.unwrap();
        assert!(gathered == i32s(count, |i| i as i32 * 7 + 13), "rank {rank}: all-gather");
        assert!(summed == i32s(count, |i| 3 * i as i32 + 3), "rank {rank}: all-reduce");
        assert!(broadcast == i32s(count, |i| i as i32 ^ 0x5a5a), "rank {rank}: broadcast");
        // Each rank receives two of three blocks in the all-gather (four 1 MiB segments each)
        // and in the all-reduce's gathering half: most of them land in place on a quiet loopback;
        // none would without posted receives.
        assert!(counters.received_in_place > 0, "rank {rank}: nothing received in place: {counters:?}");
        keep.push(c);
    }
}

fn sum_of(bytes: &[u8]) -> Vec<f64> {
    (0..bytes.len() / 4).map(|i| element_f64(DType::F32, bytes, i)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subgroups_over_one_node_run_their_own_collectives_and_do_not_wait_for_each_other() {
    use phalanx_node::Subgroup;
    let world = 4;
    // Two "data centres" {0, 1} and {2, 3}, and their leaders {0, 2}.
    let subgroups = [Subgroup::flat(vec![0, 1]), Subgroup::flat(vec![2, 3]), Subgroup::flat(vec![0, 2])];
    // Data centre 1 starts only once data centre 0 has finished 20 rounds of its own: the
    // rounds of a subgroup need nobody outside it.
    let (dc0_done, dc0_done_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for (rank, node) in nodes(world).await.into_iter().enumerate() {
        let (done, mut done_rx) = (dc0_done.clone(), dc0_done_rx.clone());
        let subgroups = subgroups.clone();
        tasks.push(tokio::spawn(async move {
            let (mut all, subs) =
                Communicator::with_subgroups(node, rank, phalanx_node::Topology::flat(world), &subgroups).unwrap();
            let mut subs = subs.into_iter();
            let (a, b, leaders) = (subs.next().unwrap(), subs.next().unwrap(), subs.next().unwrap());
            let mut dc = a.or(b).expect("every rank is in one data centre");
            assert_eq!((dc.rank(), dc.world()), (rank % 2, 2));
            let d = Duration::from_secs(30);
            let mut dc_sums = Vec::new();
            if rank >= 2 {
                while !*done_rx.borrow_and_update() {
                    done_rx.changed().await.unwrap();
                }
            }
            for round in 0..20 {
                let x = f32s(std::iter::once((rank * 100 + round) as f64));
                let r = dc.all_reduce(x, DType::F32, ReduceOp::Sum, AllReduceAlgorithm::Auto, d).await.unwrap();
                dc_sums.push(sum_of(&r)[0]);
            }
            if rank == 1 {
                done.send(true).unwrap();
            }
            let lead = match leaders {
                Some(mut l) => {
                    assert_eq!(l.rank(), rank / 2);
                    let r = l
                        .all_reduce(
                            f32s(std::iter::once(rank as f64 + 1.0)),
                            DType::F32,
                            ReduceOp::Sum,
                            AllReduceAlgorithm::Auto,
                            d,
                        )
                        .await
                        .unwrap();
                    Some(sum_of(&r)[0])
                }
                None => None,
            };
            let whole =
                all.all_reduce(f32s(std::iter::once(1.0)), DType::F32, ReduceOp::Sum, AllReduceAlgorithm::Auto, d);
            let whole = sum_of(&whole.await.unwrap())[0];
            let from_leader = dc.broadcast(f32s(std::iter::once(rank as f64)), 0, d).await.unwrap();
            // Kept alive until every rank is done: a broadcast's root is done once it has sent,
            // and closing its node then would lose the message to the others (a lost rank).
            (rank, dc_sums, lead, whole, sum_of(&from_leader)[0], (all, dc))
        }));
    }
    let mut keep = Vec::new();
    for t in tasks {
        let (rank, dc_sums, lead, whole, from_leader, comms) = t.await.unwrap();
        keep.push(comms);
        let first = rank - rank % 2;
        for (round, s) in dc_sums.iter().enumerate() {
            assert_eq!(*s, ((first * 100 + round) + ((first + 1) * 100 + round)) as f64, "rank {rank} round {round}");
        }
        assert_eq!(lead, (rank % 2 == 0).then_some(1.0 + 3.0), "rank {rank}: leaders 0 and 2 add 1 and 3");
        assert_eq!(whole, 4.0);
        assert_eq!(from_leader, first as f64, "rank {rank} got its data centre's leader's buffer");
    }
}

#[tokio::test]
async fn a_subgroup_that_does_not_fit_the_world_is_refused_naming_it() {
    use phalanx_node::Subgroup;
    let node = nodes(1).await.remove(0);
    let bad = [Subgroup::flat(vec![0]), Subgroup::flat(vec![0, 3])];
    match Communicator::with_subgroups(node, 0, phalanx_node::Topology::flat(2), &bad) {
        Err(CommError::Subgroup { index: 1, reason }) => assert!(reason.contains("member 3"), "{reason}"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("a member outside the world was accepted"),
    }
}
