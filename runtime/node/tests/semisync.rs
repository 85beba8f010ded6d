//! Semi-synchronous training over real TCP on loopback: 4 ranks each holding a shard of a
//! least-squares problem whose optimum is known; synchronous DP, local SGD, DiLoCo and
//! streaming DiLoCo (int8 outer gradients) all reach it. Quorum rounds with a straggler and a
//! crashed rank keep the accounting identity `offered = applied + pending + dropped` on every
//! rank after every round, and a heal brings the straggler's anchors back to the group's.

mod support;

use std::time::Duration;

use phalanx_net::Node;
use phalanx_node::semisync::{SemiSync, SemiSyncConfig};
use phalanx_node::{Communicator, Compression, FaultPolicy};
use phalanx_proto::{RankId, TransportConfig};
use phalanx_runtime::semisync::SyncMode;

const SECRET: &[u8] = b"semisync-test";
const DIM: usize = 8;
const ROWS: usize = 16;

async fn nodes(world: usize) -> Vec<Node> {
    // A crashed rank is declared lost after a second (the heal waits for that verdict).
    let transport = TransportConfig {
        heartbeat_interval: Duration::from_millis(25),
        link_timeout: Duration::from_millis(300),
        unreachable_after: Duration::from_secs(1),
        ..TransportConfig::default()
    };
    support::nodes(world, SECRET, transport).await
}

/// A deterministic stream of values in [-1, 1].
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn x_true() -> Vec<f32> {
    (0..DIM).map(|i| (i as f32 - 3.5) / 2.0).collect()
}

/// Rank `r`'s shard: A (ROWS × DIM) and b = A·x_true, so every shard's optimum is x_true.
fn shard(r: usize) -> (Vec<f32>, Vec<f32>) {
    let mut g = Lcg(1000 + r as u64);
    let a: Vec<f32> = (0..ROWS * DIM).map(|_| g.next()).collect();
    let xt = x_true();
    let b = (0..ROWS).map(|i| (0..DIM).map(|j| a[i * DIM + j] * xt[j]).sum()).collect();
    (a, b)
}

/// ∇ of 1/(2·ROWS)·‖A·x − b‖².
fn gradient(a: &[f32], b: &[f32], x: &[f32]) -> Vec<f32> {
    let mut g = vec![0.0f32; DIM];
    for i in 0..ROWS {
        let r: f32 = (0..DIM).map(|j| a[i * DIM + j] * x[j]).sum::<f32>() - b[i];
        for j in 0..DIM {
            g[j] += a[i * DIM + j] * r / ROWS as f32;
        }
    }
    g
}

fn distance(x: &[f32]) -> f32 {
    x.iter().zip(x_true()).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt()
}

/// Trains 4 ranks for `steps` inner steps in `config`'s mode; returns each rank's final
/// parameters, its anchors (parameters at each fragment's last sync) and the bytes it sent.
async fn train(config: SemiSyncConfig, steps: u64) -> Vec<(Vec<f32>, Vec<f32>, u64)> {
    let mut tasks = Vec::new();
    for (rank, node) in nodes(4).await.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut comm = Communicator::new(node, rank, 4);
            let (a, b) = shard(rank);
            let mut x = vec![0.0f32; DIM];
            let mut sync = SemiSync::new(&x, config);
            let lr = 0.3;
            for _ in 0..steps {
                let mut g = gradient(&a, &b, &x);
                if config.mode == SyncMode::Synchronous {
                    sync.sync_gradients(&mut comm, &mut g).await.expect("gradient round");
                }
                for (xi, gi) in x.iter_mut().zip(&g) {
                    *xi -= lr * gi;
                }
                if config.mode != SyncMode::Synchronous {
                    sync.after_inner_step(&mut comm, &mut x).await.expect("outer round");
                }
                assert!(sync.ledger().balanced(), "{:?}", sync.ledger());
            }
            comm.flush(Duration::from_secs(5)).await;
            (x, sync.anchor().to_vec(), sync.bytes_sent())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("rank"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_local_sgd_diloco_and_streaming_diloco_reach_the_optimum() {
    let modes = [
        (SemiSyncConfig::new(SyncMode::Synchronous), 200, 1e-3),
        (SemiSyncConfig::new(SyncMode::LocalSgd { every: 4 }), 200, 1e-3),
        (SemiSyncConfig::new(SyncMode::Diloco { every: 5 }), 500, 1e-3),
        (
            SemiSyncConfig {
                compression: Compression::Int8,
                ..SemiSyncConfig::new(SyncMode::StreamingDiloco { every: 6, fragments: 2 })
            },
            240,
            2e-2,
        ),
    ];
    let start = distance(&[0.0; DIM]);
    for (config, steps, tolerance) in modes {
        let ranks = train(config, steps).await;
        for (r, (x, _, _)) in ranks.iter().enumerate() {
            let d = distance(x);
            assert!(d < tolerance, "{:?}: rank {r} ended {d} from the optimum (started {start})", config.mode);
        }
        // Every rank holds the same synced parameters (bit-identical anchors).
        if config.mode != SyncMode::Synchronous {
            for (_, anchor, _) in &ranks[1..] {
                assert_eq!(anchor, &ranks[0].1, "{:?}: ranks agree", config.mode);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diloco_sends_far_fewer_bytes_than_synchronous_training() {
    let sync = train(SemiSyncConfig::new(SyncMode::Synchronous), 60).await;
    let diloco = train(
        SemiSyncConfig {
            compression: Compression::Int8,
            ..SemiSyncConfig::new(SyncMode::StreamingDiloco { every: 20, fragments: 2 })
        },
        60,
    )
    .await;
    let (s, d) = (sync[0].2, diloco[0].2);
    assert!(d * 40 <= s, "streaming DiLoCo with int8 sent {d} bytes, synchronous {s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_rounds_with_a_straggler_and_a_crash_account_for_every_contribution() {
    let config = SemiSyncConfig {
        policy: FaultPolicy::Quorum { min: 2, wait: Duration::from_millis(30) },
        deadline: Duration::from_secs(10),
        ..SemiSyncConfig::new(SyncMode::Diloco { every: 2 })
    };
    let mut tasks = Vec::new();
    for (rank, node) in nodes(4).await.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut comm = Communicator::new(node, rank, 4);
            let (a, b) = shard(rank);
            let mut x = vec![0.0f32; DIM];
            let mut sync = SemiSync::new(&x, config);
            let (mut late, mut applied_rounds) = (0, 0);
            for step in 1..=40u64 {
                // Rank 2 crashes after step 10; rank 3 straggles on every third step.
                if rank == 2 && step > 10 {
                    return (rank, sync.ledger(), late, applied_rounds, Vec::new());
                }
                if rank == 3 && step % 3 == 0 {
                    tokio::time::sleep(Duration::from_millis(120)).await; // a slow inner step
                }
                let g = gradient(&a, &b, &x);
                for (xi, gi) in x.iter_mut().zip(&g) {
                    *xi -= 0.3 * gi;
                }
                for report in sync.after_inner_step(&mut comm, &mut x).await.expect("a quorum round never fails here") {
                    if report.late {
                        late += 1;
                    } else {
                        applied_rounds += 1;
                    }
                }
                assert!(sync.ledger().balanced(), "rank {rank} after step {step}: {:?}", sync.ledger());
            }
            // Every survivor heals now: the straggler adopts the group's anchors.
            sync.resync(&mut comm, &mut x).await.expect("resync over the survivors");
            assert!(!sync.lagging(), "rank {rank} is back in line");
            // Let the other survivors get our last messages before this endpoint goes.
            for peer in [0u32, 1, 3].into_iter().filter(|p| *p as usize != rank) {
                comm.handle().flush(RankId(peer), Duration::from_secs(5)).await;
            }
            (rank, sync.ledger(), late, applied_rounds, sync.anchor().to_vec())
        }));
    }
    let mut late_total = 0;
    let mut anchors = Vec::new();
    for t in tasks {
        let (rank, ledger, late, applied, anchor) = t.await.expect("rank");
        if rank != 2 {
            anchors.push(anchor);
        }
        assert!(ledger.balanced(), "rank {rank}: {ledger:?}");
        assert!(applied > 0, "rank {rank} took part in rounds");
        assert_eq!(ledger.dropped, 0, "rank {rank}: nothing dropped under a quorum");
        late_total += late;
        if rank == 0 || rank == 1 {
            assert_eq!(ledger.pending, 0, "a punctual rank carries nothing");
        }
    }
    assert!(late_total > 0, "the straggler missed some rounds and carried its contribution");
    for a in &anchors[1..] {
        assert_eq!(a, &anchors[0], "after the heal every survivor holds the same anchors");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_tensors_of_several_types_are_averaged_and_written_back_in_their_types() {
    use phalanx_collectives::reduce::DType;
    use phalanx_node::params::ParamSet;
    let mut tasks = Vec::new();
    for (rank, node) in nodes(2).await.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut comm = Communicator::new(node, rank, 2);
            let r = rank as f32;
            let mut p = ParamSet::new();
            p.register("w", DType::F32, [r, 2.0 * r].iter().flat_map(|v| v.to_le_bytes()).collect()).expect("f32");
            let b = half::bf16::from_f32(0.1 * r);
            p.register("b", DType::BF16, b.to_le_bytes().to_vec()).expect("bf16");
            // Every rank starts from the same model (zeros); its "inner step" got it to `p`.
            let mut start = ParamSet::new();
            start.register("w", DType::F32, vec![0; 8]).expect("f32");
            start.register("b", DType::BF16, vec![0; 2]).expect("bf16");
            let mut sync = SemiSync::for_params(&start, SemiSyncConfig::new(SyncMode::LocalSgd { every: 1 }));
            sync.after_inner_step_params(&mut comm, &mut p).await.expect("a round");
            comm.flush(Duration::from_secs(5)).await;
            p
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("rank"));
    }
    assert_eq!(results[0], results[1], "every rank holds the same tensors, bit for bit");
    let flat = results[0].to_f32();
    assert_eq!(&flat[..2], &[0.5, 1.0], "f32 tensor: the mean");
    let want_b = half::bf16::from_f32((half::bf16::from_f32(0.1).to_f32()) / 2.0).to_f32();
    assert_eq!(flat[2], want_b, "bf16 tensor: the mean, rounded to bf16");
}

/// The communicators of one epoch over fresh nodes: ranks labelled with data centres `dcs`
/// (ascending label order), each rank's DC communicator and, on each DC's lowest rank, the
/// leaders' communicator.
async fn epoch(dcs: &[usize]) -> Vec<(Communicator, Option<Communicator>)> {
    use phalanx_node::{Subgroup, Topology};
    let mut labels = dcs.to_vec();
    labels.sort_unstable();
    labels.dedup();
    let mut groups: Vec<Subgroup> =
        labels.iter().map(|l| Subgroup::flat((0..dcs.len()).filter(|i| dcs[*i] == *l).collect())).collect();
    groups.push(Subgroup::flat(groups.iter().map(|g| g.members[0]).collect()));
    let mut out = Vec::new();
    for (rank, node) in nodes(dcs.len()).await.into_iter().enumerate() {
        let (_all, subs) =
            Communicator::with_subgroups(node, rank, Topology::new(dcs.to_vec()), &groups).expect("subgroups fit");
        let mut subs = subs.into_iter();
        let mut dc = None;
        for _ in 0..labels.len() {
            dc = dc.or(subs.next().flatten());
        }
        out.push((dc.expect("a rank is in its DC"), subs.next().flatten()));
    }
    out
}

/// One step of a rank under `CrossDcSemiSync`: its gradient averaged inside its DC (must
/// succeed), an SGD step, then whatever outer round and realignment are due (returned).
async fn cross_dc_step(
    sync: &mut phalanx_node::semisync::CrossDcSemiSync,
    (dc, leaders): (&mut Communicator, Option<&mut Communicator>),
    x: &mut [f32],
    (a, b): (&[f32], &[f32]),
    lr: f32,
) -> Result<Vec<phalanx_node::semisync::RoundReport>, phalanx_node::CommError> {
    let mut g = gradient(a, b, x);
    sync.sync_gradients(dc, &mut g).await.expect("gradient round");
    x.iter_mut().zip(&g).for_each(|(xi, gi)| *xi -= lr * gi);
    sync.after_inner_step(dc, leaders, x).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_dcs_replicas_stay_identical_and_the_next_leader_continues_from_the_same_outer_state() {
    use phalanx_node::semisync::CrossDcSemiSync;
    let outer = SemiSyncConfig {
        compression: Compression::Int8,
        ..SemiSyncConfig::new(SyncMode::StreamingDiloco { every: 8, fragments: 2 })
    };
    let inner = SemiSyncConfig::new(SyncMode::Synchronous);
    let lr = 0.3;
    // Epoch 1: data centres {0, 1} and {2, 3}; leaders 0 and 2.
    let mut tasks = Vec::new();
    for (rank, (mut dc, mut leaders)) in epoch(&[0, 0, 1, 1]).await.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let (a, b) = shard(rank);
            let mut x = vec![0.0f32; DIM];
            let mut sync = CrossDcSemiSync::new(&x, inner, outer);
            for _ in 0..40 {
                cross_dc_step(&mut sync, (&mut dc, leaders.as_mut()), &mut x, (&a, &b), lr).await.expect("outer round");
            }
            dc.flush(Duration::from_secs(5)).await;
            if let Some(l) = &leaders {
                l.flush(Duration::from_secs(5)).await;
            }
            (sync, x, (dc, leaders))
        }));
    }
    let mut ranks = Vec::new();
    for t in tasks {
        ranks.push(t.await.expect("rank"));
    }
    // Replicas inside a DC: bit-identical models; the mirror holds its leader's outer state.
    let state = |r: usize| ranks[r].0.export(&ranks[r].1);
    assert_eq!(ranks[0].1, ranks[1].1, "DC 0's replicas differ");
    assert_eq!(ranks[2].1, ranks[3].1, "DC 1's replicas differ");
    assert_eq!(state(0), state(1), "DC 0's mirror does not hold its leader's outer state");
    assert_eq!(state(2), state(3), "DC 1's mirror does not hold its leader's outer state");
    let (l0, l1) = (ranks[0].0.ledgers(), ranks[2].0.ledgers());
    assert!(l0.1.offered > 0 && l0.1.applied == l0.1.offered && l1.1.applied == l1.1.offered, "{l0:?} {l1:?}");
    drop(ranks.remove(0)); // rank 0 (DC 0's leader) is gone

    // Epoch 2: old ranks 1, 2, 3; rank 1 now leads DC 0 alone, from the outer state it mirrored.
    let mut tasks = Vec::new();
    for ((mut sync, mut x, old), (mut dc, mut leaders)) in ranks.into_iter().zip(epoch(&[0, 1, 1]).await) {
        drop(old);
        tasks.push(tokio::spawn(async move {
            let rank = dc.rank() + if leaders.is_some() && dc.world() == 1 { 1 } else { 2 };
            let (a, b) = shard(rank);
            for _ in 0..300 {
                cross_dc_step(&mut sync, (&mut dc, leaders.as_mut()), &mut x, (&a, &b), lr).await.expect("outer round");
            }
            sync.resync(&mut dc, leaders.as_mut(), &mut x).await.expect("resync");
            dc.flush(Duration::from_secs(5)).await;
            if let Some(l) = &leaders {
                l.flush(Duration::from_secs(5)).await;
            }
            (x, sync.ledgers())
        }));
    }
    let mut finals = Vec::new();
    for t in tasks {
        finals.push(t.await.expect("rank"));
    }
    for (x, (inner, outer)) in &finals {
        assert_eq!(x, &finals[0].0, "after the resync every rank holds the same model");
        assert!(inner.balanced() && outer.balanced(), "{inner:?} {outer:?}");
    }
    assert!(
        distance(&finals[0].0) < 2e-2,
        "not at the optimum: {:?} (distance {})",
        finals[0].0,
        distance(&finals[0].0)
    );
}

/// A data centre's leader dies just before an outer round. The other leader's round (and its
/// heal) goes on without it, so that leader owes a heal; the rank promoted in the dead one's
/// place never saw that round. In the next epoch both must still run the same collectives:
/// every rank marks its groups changed at the epoch's boundary, so both heal at the same
/// round. (Without that, one leader's heal broadcast pairs with the other's next all-reduce and
/// every later round goes wrong: found by `phalanx experiment semisync`, where the demo's
/// SIGKILL hit a leader.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_promoted_after_its_predecessor_died_runs_the_same_rounds_as_the_other_leader() {
    use phalanx_node::semisync::CrossDcSemiSync;
    let quorum = FaultPolicy::Quorum { min: 1, wait: Duration::from_millis(200) };
    let deadline = Duration::from_secs(5);
    let outer = SemiSyncConfig {
        policy: quorum,
        deadline,
        heal_every: 1,
        catch_up_wait: Duration::from_millis(200),
        ..SemiSyncConfig::new(SyncMode::Diloco { every: 4 })
    };
    let inner = SemiSyncConfig { policy: quorum, deadline, ..SemiSyncConfig::new(SyncMode::Synchronous) };
    let lr = 0.3;
    // Epoch 1: data centres {0, 1} and {2, 3}; rank 2 (DC 1's leader) dies after 7 steps, just
    // before the round of step 8, which rank 0 then runs (and heals) alone.
    let mut tasks = Vec::new();
    for (rank, (mut dc, mut leaders)) in epoch(&[0, 0, 1, 1]).await.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let (a, b) = shard(rank);
            let mut x = vec![0.0f32; DIM];
            let mut sync = CrossDcSemiSync::new(&x, inner, outer);
            for step in 1..=8 {
                if rank == 2 && step == 8 {
                    return None;
                }
                let outcome = cross_dc_step(&mut sync, (&mut dc, leaders.as_mut()), &mut x, (&a, &b), lr).await;
                // Rank 3's realignment at step 8 has no root (its leader is dead).
                if !(rank == 3 && step == 8) {
                    outcome.expect("outer round");
                }
            }
            Some((sync, x))
        }));
    }
    let mut survivors = Vec::new();
    for t in tasks {
        survivors.extend(t.await.expect("rank"));
    }
    assert_eq!(survivors.len(), 3);

    // Epoch 2: old ranks 0, 1 (DC 0, led by 0) and 3 (DC 1, now its leader).
    let mut tasks = Vec::new();
    for ((mut sync, mut x), (mut dc, mut leaders)) in survivors.into_iter().zip(epoch(&[0, 0, 1]).await) {
        tasks.push(tokio::spawn(async move {
            sync.group_changed();
            let rank = if dc.world() == 1 { 3 } else { dc.rank() };
            let (a, b) = shard(rank);
            let mut incomplete = Vec::new();
            for _ in 0..24 {
                let reports = cross_dc_step(&mut sync, (&mut dc, leaders.as_mut()), &mut x, (&a, &b), lr)
                    .await
                    .expect("outer round");
                incomplete.extend(reports.into_iter().filter(|r| r.late || r.participants.len() < 2));
            }
            sync.resync(&mut dc, leaders.as_mut(), &mut x).await.expect("resync");
            dc.flush(Duration::from_secs(5)).await;
            if let Some(l) = &leaders {
                l.flush(Duration::from_secs(5)).await;
            }
            (x, sync.ledgers(), incomplete)
        }));
    }
    let mut finals = Vec::new();
    for t in tasks {
        finals.push(t.await.expect("rank"));
    }
    for (x, (inner, outer), incomplete) in &finals {
        assert!(incomplete.is_empty(), "outer rounds of epoch 2 without both leaders: {incomplete:?}");
        assert_eq!(x, &finals[0].0, "after the resync every rank holds the same model");
        assert!(inner.balanced() && outer.balanced(), "{inner:?} {outer:?}");
    }
}
