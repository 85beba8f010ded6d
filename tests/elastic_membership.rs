//! Elastic membership end to end: a coordinator (Raft, durable log), ranks that join, build a
//! communicator per epoch from the committed view, and run all-reduces; the world grows
//! 4 → 6 and shrinks 6 → 3 during the run without a restart, and every result is checked
//! against its epoch's member list. A zombie (a rank declared failed while it was paused)
//! cannot get a frame accepted in the new epoch.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use phalanx_collectives::reduce::{DType, ReduceOp};
use phalanx_net::{LinkKind, Node, NodeConfig, PathFaults, PathSpec};
use phalanx_node::coordinator::{run_coordinator, CoordinatorClient, ServerConfig};
use phalanx_node::elastic::{Boundary, ElasticConfig, ElasticError, ElasticMember};
use phalanx_node::AllReduceAlgorithm;
use phalanx_proto::{ChannelId, Epoch, Event, RankId};
use phalanx_runtime::membership::RankStatus;
use tokio::sync::watch;

const SECRET: &[u8] = b"elastic-test-secret";

fn free_addr() -> SocketAddr {
    phalanx_net::free_loopback_addr().expect("a free port")
}

/// One coordinator in this process; returns its (id, address).
async fn coordinator(name: &str) -> (Vec<(u64, SocketAddr)>, tokio::sync::oneshot::Sender<()>) {
    let dir = std::env::temp_dir().join(format!("phalanx-elastic-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let peers = vec![(1u64, free_addr())];
    let mut config = ServerConfig::new(1, peers.clone(), dir, SECRET.to_vec());
    config.tick = Duration::from_millis(20);
    config.failure_timeout = Duration::from_millis(1500);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let r = run_coordinator(config, |_| {}, async {
            let _ = stopped.await;
        })
        .await;
        if let Err(e) = r {
            panic!("coordinator failed: {e}");
        }
    });
    (peers, stop)
}

fn member_config(coordinators: &[(u64, SocketAddr)], host: &str, start_world: usize) -> ElasticConfig {
    let mut c = ElasticConfig::new(coordinators.to_vec(), SECRET, host, free_addr());
    c.transport = support::fast_transport();
    c.start_world = start_world;
    c.heartbeat_every = Duration::from_millis(200);
    c
}

#[derive(Clone, Debug)]
struct Record {
    rank: u32,
    epoch: u64,
    step: u64,
    members: Vec<u32>,
    result: [f64; 2],
}

/// Runs steps until `last_step` (or until departed): a gate before `gate_step`, a leave
/// request at `leave_step` for the ranks in `leavers`.
async fn train(
    mut m: ElasticMember,
    last_step: u64,
    gate: (u64, watch::Receiver<bool>, tokio::sync::mpsc::UnboundedSender<u32>),
    leave: (u64, BTreeSet<u32>),
    records: Arc<Mutex<Vec<Record>>>,
) -> Result<u32, ElasticError> {
    let (gate_step, mut gate_open, arrived) = gate;
    loop {
        if m.step() == gate_step {
            let _ = arrived.send(m.rank());
            while !*gate_open.borrow() {
                gate_open.changed().await.expect("the test keeps the gate");
            }
        }
        if let Boundary::Departed { .. } = m.begin_step().await? {
            return Ok(m.rank());
        }
        if m.step() >= last_step {
            return Ok(m.rank());
        }
        if m.step() == leave.0 && leave.1.contains(&m.rank()) {
            m.request_leave().await?;
        }
        let (rank, step, epoch, members) = (m.rank(), m.step(), m.epoch(), m.members().to_vec());
        let mut buf = Vec::new();
        buf.extend_from_slice(&(f64::from(rank) + 1.0).to_le_bytes());
        buf.extend_from_slice(&(step as f64).to_le_bytes());
        let data = m
            .communicator()?
            .all_reduce(buf, DType::F64, ReduceOp::Sum, AllReduceAlgorithm::Auto, Duration::from_secs(10))
            .await
            .map_err(|source| ElasticError::Collective { rank, epoch, source })?;
        let f = |i: usize| f64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        records.lock().expect("lock").push(Record { rank, epoch, step, members, result: [f(0), f(1)] });
        m.end_step();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_world_grows_4_to_6_and_shrinks_to_3_during_a_run_of_all_reduces_and_every_result_is_right() {
    support::init_log();
    let (coordinators, _stop) = coordinator("grow-shrink").await;
    let records: Arc<Mutex<Vec<Record>>> = Arc::default();
    let (open_gate, gate) = watch::channel(false);
    let (arrived, mut at_gate) = tokio::sync::mpsc::unbounded_channel();
    let leavers: BTreeSet<u32> = [1, 3, 4].into();
    let (gate_step, leave_step, last_step) = (5, 10, 15);
    let mut tasks = Vec::new();
    let mut first = Vec::new();
    for i in 0..4 {
        let config = member_config(&coordinators, &format!("host-{i}"), 4);
        first.push(tokio::spawn(ElasticMember::join(config)));
    }
    for j in first {
        let m = j.await.expect("join task").expect("admitted into the first epoch");
        assert_eq!(m.epoch(), 1);
        assert_eq!(m.members().len(), 4);
        tasks.push(tokio::spawn(train(
            m,
            last_step,
            (gate_step, gate.clone(), arrived.clone()),
            (leave_step, leavers.clone()),
            records.clone(),
        )));
    }
    // Two more ranks join while the four wait at the gate; the gate opens once both joins are
    // committed, so the next boundary admits both at once.
    for _ in 0..4 {
        at_gate.recv().await.expect("a member reaches the gate");
    }
    let mut joiners = Vec::new();
    for i in 4..6 {
        let config = member_config(&coordinators, &format!("host-{i}"), 4);
        joiners.push(tokio::spawn(ElasticMember::join(config)));
    }
    let mut probe = CoordinatorClient::connect(&coordinators, SECRET).await.expect("client");
    loop {
        let (_, view) = probe.read_view().await.expect("view");
        if view.ranks().filter(|(_, m)| m.status == RankStatus::Joining).count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    open_gate.send(true).expect("members listen");
    for j in joiners {
        let m = j.await.expect("join task").expect("admitted into the second epoch");
        assert_eq!(m.members().len(), 6);
        assert_eq!(m.step(), gate_step, "a joiner starts at the group's step");
        tasks.push(tokio::spawn(train(
            m,
            last_step,
            (gate_step, gate.clone(), arrived.clone()),
            (leave_step, leavers.clone()),
            records.clone(),
        )));
    }
    let mut finished = BTreeSet::new();
    for t in tasks {
        finished.insert(t.await.expect("member task").expect("member ran to its end"));
    }
    assert_eq!(finished.len(), 6);

    // Every result is the sum over its epoch's members, and all members agree per step.
    let records = records.lock().expect("lock").clone();
    let mut per_step: BTreeMap<(u64, u64), Vec<&Record>> = BTreeMap::new();
    for r in &records {
        let expect0: f64 = r.members.iter().map(|m| f64::from(*m) + 1.0).sum();
        assert_eq!(r.result, [expect0, r.step as f64 * r.members.len() as f64], "{r:?}");
        per_step.entry((r.epoch, r.step)).or_default().push(r);
    }
    for ((epoch, step), rs) in &per_step {
        let ranks: BTreeSet<u32> = rs.iter().map(|r| r.rank).collect();
        let members: BTreeSet<u32> = rs[0].members.iter().copied().collect();
        assert_eq!(ranks, members, "every member of epoch {epoch} recorded step {step}");
    }
    let worlds: Vec<usize> = {
        let mut by_epoch: BTreeMap<u64, usize> = BTreeMap::new();
        for r in &records {
            by_epoch.insert(r.epoch, r.members.len());
        }
        by_epoch.into_values().collect()
    };
    assert_eq!(worlds, vec![4, 6, 3], "world sizes per epoch");
    let steps: BTreeSet<u64> = records.iter().map(|r| r.step).collect();
    assert_eq!(steps, (0..last_step).collect(), "no step skipped or repeated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_declared_failed_cannot_get_a_message_accepted_in_the_new_epoch() {
    support::init_log();
    let (coordinators, _stop) = coordinator("zombie").await;
    let mut members = Vec::new();
    let mut pending = Vec::new();
    for i in 0..3 {
        let config = member_config(&coordinators, &format!("z-{i}"), 3);
        pending.push(tokio::spawn(ElasticMember::join(config)));
    }
    for p in pending {
        members.push(p.await.expect("join task").expect("admitted"));
    }
    members.sort_by_key(|m| m.rank());
    // The highest rank "pauses": it stops heartbeating and stepping (its process is alive, its
    // endpoint stays up) — we keep only the old epoch's address to act as the zombie later.
    let zombie = members.pop().expect("three members");
    let (zombie_rank, old_epoch) = (zombie.rank(), zombie.epoch());
    let zombie_index = zombie.members().iter().position(|r| *r == zombie_rank).expect("member");
    drop(zombie);
    // The others run boundaries until the coordinators declared it failed and a new epoch
    // without it began.
    let mut new_epoch = old_epoch;
    while new_epoch == old_epoch {
        let mut handles = Vec::new();
        for mut m in members.drain(..) {
            handles.push(tokio::spawn(async move {
                let b = m.begin_step().await;
                m.end_step();
                (m, b)
            }));
        }
        for h in handles {
            let (m, b) = h.await.expect("member");
            match b.expect("boundary") {
                Boundary::Rebuilt { epoch, members: ms } => {
                    assert!(!ms.contains(&zombie_rank));
                    new_epoch = epoch;
                }
                Boundary::Continue => {}
                Boundary::Departed { .. } => panic!("a live member departed"),
            }
            members.push(m);
        }
    }
    let mut probe = CoordinatorClient::connect(&coordinators, SECRET).await.expect("client");
    let (_, view) = probe.read_view().await.expect("view");
    assert_eq!(view.rank(zombie_rank).map(|m| m.status), None, "dropped from the view at the epoch change");
    // The zombie resumes with its old-epoch identity and tries to talk to member 0 of the new
    // epoch at its address: the new endpoint refuses the stale epoch.
    let target = view.rank(members[0].rank()).expect("member").addrs[0].parse().expect("address");
    let mut zc = NodeConfig::new(RankId(zombie_index as u32), SECRET.to_vec());
    zc.epoch = Epoch(old_epoch);
    zc.transport = support::fast_transport();
    zc.paths.push(PathSpec {
        peer: RankId(0),
        kind: LinkKind::Tcp,
        remote: target,
        bind: None,
        faults: PathFaults::new(),
    });
    let mut z = Node::start(zc).await.expect("zombie endpoint");
    z.handle().send(RankId(0), ChannelId(1000), Bytes::from_static(b"stale gradient")).await.expect("queued");
    // Its heartbeat is answered "fenced".
    let status = probe.heartbeat(zombie_rank, 1, old_epoch).await.expect("status");
    assert!(status.fenced, "the coordinators tell the zombie to rejoin");
    // Meanwhile the new epoch carries on: one all-reduce among the survivors succeeds.
    let mut handles = Vec::new();
    for mut m in members.drain(..) {
        handles.push(tokio::spawn(async move {
            let buf = 1.0f64.to_le_bytes().to_vec();
            let r = m
                .communicator()
                .expect("member")
                .all_reduce(buf, DType::F64, ReduceOp::Sum, AllReduceAlgorithm::Auto, Duration::from_secs(10))
                .await;
            (m, r)
        }));
    }
    for h in handles {
        let (m, r) = h.await.expect("member");
        let data = r.expect("the new epoch's all-reduce");
        assert_eq!(f64::from_le_bytes(data[..8].try_into().expect("8 bytes")), m.members().len() as f64);
        members.push(m);
    }
    // The new epoch's endpoint refused the zombie's frames (counted), and nothing it sent was
    // ever acknowledged.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (totals, _) = members[0].communicator().expect("member").handle().counters().await.expect("counters");
        if totals.stale_epoch_refused > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no stale-epoch refusal counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(z.handle().undelivered(RankId(0)).await.expect("zombie endpoint"), 1, "never acknowledged");
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(1), z.next_event()).await {
        assert!(!matches!(ev, Event::Message(_)), "the zombie got a message: {ev:?}");
    }
}

/// The state every member holds at `step` (what a trainer would register: here a function of
/// the step, identical on every member).
fn state_at(step: u64) -> Vec<u8> {
    // 12 MB: three 4 MiB pieces, striped over the sources.
    let mut v = Vec::with_capacity(12 << 20);
    for i in 0..(3u32 << 20) {
        v.extend_from_slice(&(step as f32 * 0.5 + i as f32).to_le_bytes());
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_rank_recovers_the_training_state_from_its_peers_before_its_first_step() {
    support::init_log();
    let (coordinators, _stop) = coordinator("recover").await;
    let last_step = 10u64;
    let config = |host: &str| {
        let mut c = member_config(&coordinators, host, 3);
        c.state_listen = Some(free_addr());
        c
    };
    // Each member all-reduces every step and publishes the state of the next step before its
    // boundary (what a recovering rank entering at that boundary fetches).
    async fn run(
        mut m: ElasticMember,
        last_step: u64,
        at: Option<(u64, tokio::sync::mpsc::UnboundedSender<()>)>,
    ) -> u32 {
        m.publish_state(m.step(), vec![("params".into(), Bytes::from(state_at(m.step())))]);
        loop {
            if let Boundary::Departed { .. } = m.begin_step().await.expect("boundary") {
                panic!("nobody leaves here");
            }
            if m.step() >= last_step {
                return m.rank();
            }
            if let Some((s, tx)) = &at {
                if m.step() == *s {
                    let _ = tx.send(());
                }
            }
            let buf = 1.0f64.to_le_bytes().to_vec();
            m.communicator()
                .expect("member")
                .all_reduce(buf, DType::F64, ReduceOp::Sum, AllReduceAlgorithm::Auto, Duration::from_secs(10))
                .await
                .expect("all-reduce");
            m.end_step();
            m.publish_state(m.step(), vec![("params".into(), Bytes::from(state_at(m.step())))]);
        }
    }
    let mut joins = Vec::new();
    for i in 0..3 {
        // Two data centres: the communicators are built with that topology from the view.
        let mut c = config(&format!("s-{i}"));
        c.dc = i % 2;
        joins.push(tokio::spawn(ElasticMember::join(c)));
    }
    let (tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (i, j) in joins.into_iter().enumerate() {
        let m = j.await.expect("join task").expect("admitted");
        let at = (i == 0).then(|| (3, tx.clone()));
        tasks.push(tokio::spawn(run(m, last_step, at)));
    }
    started.recv().await.expect("the group reaches step 3");
    let mut joiner = ElasticMember::join(config("late")).await.expect("the joiner is admitted");
    let step = joiner.step();
    assert!(step >= 3 && step < last_step, "admitted at step {step}");
    let state = joiner.recover_state(Duration::from_secs(20)).await.expect("the state arrives from the peers");
    assert_eq!(state.step, step);
    assert_eq!(state.buffers.len(), 1);
    assert!(state.buffers[0].1 == state_at(step), "the peers' state at the joiner's first step, intact");
    assert!(
        state.bytes_per_source.iter().filter(|(_, b)| *b > 0).count() >= 2,
        "striped: {:?}",
        state.bytes_per_source
    );
    tasks.push(tokio::spawn(run(joiner, last_step, None)));
    for t in tasks {
        t.await.expect("member");
    }
}
