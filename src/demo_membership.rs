//! The second part of `phalanx demo`: elastic membership. An embedded coordinator (Raft, one
//! voter, durable log in a temporary directory) and four elastic ranks on loopback run
//! all-reduce steps; a fifth rank joins, one leaves, one crashes. Every epoch change happens at
//! a step boundary, every result is checked against its epoch's member list.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phalanx_collectives::reduce::{DType, ReduceOp};
use phalanx_node::coordinator::{run_coordinator, ServerConfig};
use phalanx_node::elastic::{Boundary, ElasticConfig, ElasticMember};
use phalanx_node::AllReduceAlgorithm;
use phalanx_proto::TransportConfig;

const SECRET: &[u8] = b"phalanx-demo-membership";

/// What happens to a rank during the run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    Stays,
    LeavesAt(u64),
    CrashesAt(u64),
}

#[derive(Default)]
struct Tally {
    steps_ok: u64,
    steps_failed: u64,
    wrong: u64,
    epochs: Vec<(u64, Vec<u32>)>,
}

fn free_addr() -> Result<SocketAddr, String> {
    phalanx_net::free_loopback_addr().map_err(|e| format!("no free port: {e}"))
}

/// Runs the membership part; returns an error if a result was wrong or a rank got stuck.
pub async fn run(quick: bool, faults: bool) -> Result<(), String> {
    let steps: u64 = if quick { 12 } else { 24 };
    let dir = std::env::temp_dir().join(format!("phalanx-demo-coordinator-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let coordinators = vec![(1u64, free_addr()?)];
    let mut config = ServerConfig::new(1, coordinators.clone(), dir.clone(), SECRET.to_vec());
    config.tick = Duration::from_millis(20);
    config.failure_timeout = Duration::from_millis(1500);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let coordinator = tokio::spawn(run_coordinator(config, |_| {}, async {
        let _ = stopped.await;
    }));
    println!();
    println!("membership: an embedded coordinator (Raft, durable log) and 4 elastic ranks; all-reduce every step");
    let started = Instant::now();
    let tally: Arc<Mutex<Tally>> = Arc::default();
    let rank_config = |host: String| -> Result<ElasticConfig, String> {
        let mut c = ElasticConfig::new(coordinators.clone(), SECRET, &host, free_addr()?);
        c.start_world = 4;
        c.heartbeat_every = Duration::from_millis(200);
        c.sync_deadline = Duration::from_secs(15);
        c.transport = TransportConfig {
            heartbeat_interval: Duration::from_millis(25),
            link_timeout: Duration::from_millis(300),
            unreachable_after: Duration::from_secs(1),
            ..TransportConfig::default()
        };
        Ok(c)
    };
    let mut joins = Vec::new();
    for i in 0..4 {
        joins.push(tokio::spawn(ElasticMember::join(rank_config(format!("rank-host-{i}"))?)));
    }
    let mut tasks = Vec::new();
    for (i, j) in joins.into_iter().enumerate() {
        let m = j.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        let fate = match (faults, i) {
            (true, 1) => Fate::LeavesAt(steps / 2),
            (true, 2) => Fate::CrashesAt(steps * 3 / 4),
            _ => Fate::Stays,
        };
        tasks.push(tokio::spawn(train(m, steps, fate, tally.clone())));
    }
    if faults {
        // A fifth rank joins while the others train; it is admitted at the next boundary.
        let m = ElasticMember::join(rank_config("rank-host-4".into())?).await.map_err(|e| e.to_string())?;
        tasks.push(tokio::spawn(train(m, steps, Fate::Stays, tally.clone())));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let _ = stop.send(());
    let _ = coordinator.await;
    let _ = std::fs::remove_dir_all(&dir);
    let t = tally.lock().map_err(|_| "tally poisoned")?;
    let changes: Vec<String> = t.epochs.iter().map(|(e, m)| format!("epoch {e}: world {} {:?}", m.len(), m)).collect();
    println!(
        "summary: {} rank-steps with every result correct ({} wrong), {} failed fast with a lost rank until the epoch change dropped it; {} ({:.1} s)",
        t.steps_ok,
        t.wrong,
        t.steps_failed,
        changes.join(" -> "),
        started.elapsed().as_secs_f64()
    );
    if t.wrong > 0 {
        return Err(format!("{} all-reduce results were wrong", t.wrong));
    }
    let worlds: Vec<usize> = t.epochs.iter().map(|(_, m)| m.len()).collect();
    if faults && worlds != [4, 5, 4, 3] {
        return Err(format!("expected the world to go 4 -> 5 -> 4 -> 3 (join, leave, crash), saw {worlds:?}"));
    }
    Ok(())
}

/// One rank's loop: boundary, all-reduce of (its rank id + 1), check against the epoch's
/// members.
async fn train(mut m: ElasticMember, steps: u64, fate: Fate, tally: Arc<Mutex<Tally>>) -> Result<(), String> {
    loop {
        match m.begin_step().await.map_err(|e| format!("rank {}: {e}", m.rank()))? {
            Boundary::Departed { epoch } => {
                println!("  rank {} left; not in epoch {epoch}", m.rank());
                return Ok(());
            }
            Boundary::Rebuilt { epoch, members } => {
                let mut t = tally.lock().map_err(|_| "tally poisoned")?;
                if t.epochs.last().map(|(e, _)| *e) != Some(epoch) {
                    println!("  step {:>3}: epoch {epoch} begins, world {} {:?}", m.step(), members.len(), members);
                    t.epochs.push((epoch, members));
                }
            }
            Boundary::Continue => {}
        }
        if m.step() >= steps {
            return Ok(());
        }
        {
            let mut t = tally.lock().map_err(|_| "tally poisoned")?;
            if t.epochs.is_empty() {
                t.epochs.push((m.epoch(), m.members().to_vec()));
                println!(
                    "  step {:>3}: epoch {} begins, world {} {:?}",
                    m.step(),
                    m.epoch(),
                    m.members().len(),
                    m.members()
                );
            }
        }
        match fate {
            Fate::LeavesAt(s) if s == m.step() => {
                println!("  step {:>3}: rank {} asks to leave", m.step(), m.rank());
                m.request_leave().await.map_err(|e| e.to_string())?;
            }
            Fate::CrashesAt(s) if s == m.step() => {
                println!("  step {:>3}: rank {} crashes (its endpoint vanishes)", m.step(), m.rank());
                // As a killed process's sockets close at once: not when the last task holding
                // the endpoint lets go of it (a background task may hold it a while longer).
                if let Ok(comm) = m.communicator() {
                    comm.handle().shutdown();
                }
                return Ok(());
            }
            _ => {}
        }
        let expected: f64 = m.members().iter().map(|r| f64::from(*r) + 1.0).sum();
        let contribution = (f64::from(m.rank()) + 1.0).to_le_bytes().to_vec();
        let comm = m.communicator().map_err(|e| e.to_string())?;
        let result = comm
            .all_reduce(contribution, DType::F64, ReduceOp::Sum, AllReduceAlgorithm::Auto, Duration::from_secs(15))
            .await;
        {
            let mut t = tally.lock().map_err(|_| "tally poisoned")?;
            match result {
                Ok(data) => {
                    let got = data.get(..8).and_then(|b| b.try_into().ok()).map(f64::from_le_bytes);
                    if got == Some(expected) {
                        t.steps_ok += 1;
                    } else {
                        t.wrong += 1;
                    }
                }
                // A member crashed mid-step: the next boundary reports it and moves on.
                Err(_) => t.steps_failed += 1,
            }
        }
        m.end_step();
    }
}
