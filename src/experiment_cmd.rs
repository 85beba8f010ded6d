//! `phalanx experiment semisync [--quick]`: the same model, data and compute budget trained
//! four ways on loopback — synchronous data parallel, DiLoCo across two "data centres",
//! streaming DiLoCo with int8 outer gradients, and the latter with faults (a straggler, a rank
//! crash, a WAN cut) — printing one JSON line per run: `mode, eval_loss, wan_bytes,
//! total_bytes, hangs, lost_contributions, wall_s` (docs/semisync.md).
//!
//! Four ranks in one process, two per data centre, over real TCP on loopback; each rank has
//! its own shard of the task ([`crate::mlp`]). Synchronous DP all-reduces gradients over all
//! four every step; the DiLoCo modes all-reduce gradients inside each DC every step and sync
//! across DCs through the DC leaders every `--every` steps. WAN bytes are the bytes sent on
//! links between the two DCs (transport counters).

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use phalanx_net::{LinkKind, Node, NodeConfig, PathFaults, PathSpec};
use phalanx_node::semisync::{CrossDcSemiSync, SemiSync, SemiSyncConfig};
use phalanx_node::{CommError, Communicator, Compression, FaultPolicy};
use phalanx_proto::{RankId, TransportConfig};
use phalanx_runtime::semisync::{Ledger, SyncMode};
use serde_json::json;

use crate::mlp;
use crate::CliError;

/// Arguments of `phalanx experiment`.
#[derive(Args, Debug)]
pub struct ExperimentArgs {
    /// Which experiment.
    #[command(subcommand)]
    pub which: Experiment,
}

/// The experiments.
#[derive(Subcommand, Debug)]
pub enum Experiment {
    /// Synchronous DP vs DiLoCo vs streaming DiLoCo (with and without faults) on one task.
    Semisync(SemisyncArgs),
}

/// Arguments of `phalanx experiment semisync`.
#[derive(Args, Debug)]
pub struct SemisyncArgs {
    /// A shorter run (CI).
    #[arg(long)]
    pub quick: bool,
    /// Inner steps per rank (default 600; quick 200).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Inner steps between cross-DC syncs (H; default 50; quick 25).
    #[arg(long)]
    pub every: Option<u64>,
    /// Only these modes (comma-separated: sync, diloco, streaming_diloco, streaming_diloco_faults).
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<String>,
}

const SECRET: &[u8] = b"phalanx-experiment";
const WORLD: usize = 4;
const PER_DC: usize = 2;
const BATCH: usize = 32;
const LR: f32 = 0.1;
const TASK: u64 = 42;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Sync,
    Diloco,
    Streaming,
    StreamingFaults,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Diloco => "diloco",
            Mode::Streaming => "streaming_diloco",
            Mode::StreamingFaults => "streaming_diloco_faults",
        }
    }
}

/// Runs `phalanx experiment`.
pub async fn run(a: ExperimentArgs) -> Result<(), CliError> {
    let Experiment::Semisync(a) = a.which;
    let steps = a.steps.unwrap_or(if a.quick { 200 } else { 600 });
    let every = a.every.unwrap_or(if a.quick { 25 } else { 50 });
    if steps == 0 || every == 0 {
        return Err(CliError::Usage("--steps and --every must be at least 1".into()));
    }
    let all = [Mode::Sync, Mode::Diloco, Mode::Streaming, Mode::StreamingFaults];
    let modes: Vec<Mode> = if a.modes.is_empty() {
        all.to_vec()
    } else {
        a.modes
            .iter()
            .map(|m| {
                all.iter()
                    .copied()
                    .find(|x| x.name() == m)
                    .ok_or_else(|| CliError::Usage(format!("unknown mode {m:?}")))
            })
            .collect::<Result<_, _>>()?
    };
    for mode in modes {
        let row = run_mode(mode, steps, every).await.map_err(CliError::Failed)?;
        println!("{row}");
    }
    Ok(())
}

fn transport() -> TransportConfig {
    TransportConfig {
        heartbeat_interval: Duration::from_millis(25),
        link_timeout: Duration::from_millis(300),
        unreachable_after: Duration::from_secs(2),
        ..TransportConfig::default()
    }
}

/// `n` nodes on loopback, every pair linked (higher ranks dial lower ones); returns them and
/// the fault handle of each dialled path, by (dialer, listener).
async fn group(n: usize) -> Result<(Vec<Node>, Vec<((usize, usize), PathFaults)>), String> {
    let mut out: Vec<Node> = Vec::new();
    let mut addrs = Vec::new();
    let mut faults = Vec::new();
    for r in 0..n {
        let mut c = NodeConfig::new(RankId(r as u32), SECRET);
        c.transport = transport();
        c.tcp_listen = vec!["127.0.0.1:0".parse().map_err(|e| format!("{e}"))?];
        c.redial_max = Duration::from_millis(100);
        for (peer, addr) in &addrs {
            let f = PathFaults::new();
            faults.push(((r, *peer as usize), f.clone()));
            c.paths.push(PathSpec { peer: RankId(*peer), kind: LinkKind::Tcp, remote: *addr, bind: None, faults: f });
        }
        let node = Node::start(c).await.map_err(|e| e.to_string())?;
        addrs.push((r as u32, node.tcp_addrs()[0]));
        out.push(node);
    }
    Ok((out, faults))
}

/// Bytes sent by `comm`'s node on links to peers `wan(peer)` says are across the WAN, and in all.
async fn bytes_sent(comm: &Communicator, wan: impl Fn(usize) -> bool) -> Result<(u64, u64), String> {
    let (_, links) = comm.handle().counters().await.map_err(|e| e.to_string())?;
    let total = links.iter().map(|(_, _, c)| c.bytes_sent).sum();
    let across = links.iter().filter(|(_, p, _)| wan(p.0 as usize)).map(|(_, _, c)| c.bytes_sent).sum();
    Ok((across, total))
}

struct RankOutcome {
    params: Vec<f32>,
    wan: u64,
    total: u64,
    deadlines: u64,
    ledgers: Vec<Ledger>,
}

async fn run_mode(mode: Mode, steps: u64, every: u64) -> Result<serde_json::Value, String> {
    let started = Instant::now();
    let init = mlp::init(7, 1.0);
    let mut tasks = Vec::new();
    if mode == Mode::Sync {
        let (nodes, _) = group(WORLD).await?;
        for (rank, node) in nodes.into_iter().enumerate() {
            let comm = Communicator::new(node, rank, WORLD);
            let init = init.clone();
            tasks.push(tokio::spawn(async move { train_sync(rank, comm, init, steps).await }));
        }
    } else {
        let mut dcs = Vec::new();
        for _ in 0..WORLD / PER_DC {
            dcs.push(group(PER_DC).await?.0);
        }
        let (leaders, wan_paths) = group(WORLD / PER_DC).await?;
        let mut leaders: Vec<Option<Node>> = leaders.into_iter().map(Some).collect();
        let wan_cut = wan_paths.first().map(|(_, f)| f.clone());
        let outer = SemiSyncConfig {
            compression: if mode == Mode::Diloco { Compression::None } else { Compression::Int8 },
            policy: if mode == Mode::StreamingFaults {
                FaultPolicy::Quorum { min: 1, wait: Duration::from_millis(150) }
            } else {
                FaultPolicy::Shrink
            },
            deadline: Duration::from_secs(20),
            ..SemiSyncConfig::new(if mode == Mode::Diloco {
                SyncMode::Diloco { every }
            } else {
                SyncMode::StreamingDiloco { every, fragments: 4 }
            })
        };
        let inner = SemiSyncConfig { deadline: Duration::from_secs(20), ..SemiSyncConfig::new(SyncMode::Synchronous) };
        for (d, dc_nodes) in dcs.into_iter().enumerate() {
            for (i, node) in dc_nodes.into_iter().enumerate() {
                let rank = d * PER_DC + i;
                let dc = Communicator::new(node, i, PER_DC);
                let lead =
                    if i == 0 { leaders[d].take().map(|n| Communicator::new(n, d, WORLD / PER_DC)) } else { None };
                let sync = CrossDcSemiSync::new(dc, lead, &init, inner, outer);
                let faults = (mode == Mode::StreamingFaults).then(|| wan_cut.clone()).flatten();
                let init = init.clone();
                tasks.push(tokio::spawn(async move { train_cross_dc(rank, sync, init, steps, every, faults).await }));
            }
        }
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.map_err(|e| e.to_string())??);
    }
    let eval = mlp::dataset(TASK, 999, 2048);
    let survivors: Vec<&RankOutcome> = outcomes.iter().filter(|o| !o.params.is_empty()).collect();
    let eval_loss = mlp::loss(&survivors.first().ok_or("no rank survived")?.params, &eval);
    let same = survivors.iter().all(|o| o.params == survivors[0].params);
    let (mut offered, mut applied, mut dropped, mut pending) = (0, 0, 0, 0);
    for l in outcomes.iter().flat_map(|o| &o.ledgers) {
        offered += l.offered;
        applied += l.applied;
        dropped += l.dropped;
        pending += l.pending;
    }
    Ok(json!({
        "mode": mode.name(),
        "eval_loss": (eval_loss * 1e4).round() / 1e4,
        "wan_bytes": outcomes.iter().map(|o| o.wan).sum::<u64>(),
        "total_bytes": outcomes.iter().map(|o| o.total).sum::<u64>(),
        "hangs": outcomes.iter().map(|o| o.deadlines).sum::<u64>(),
        "lost_contributions": offered - applied - dropped - pending,
        "dropped_contributions": dropped,
        "pending_contributions": pending,
        "ranks_agree": same,
        "steps": steps,
        "every": every,
        "wall_s": (started.elapsed().as_secs_f64() * 100.0).round() / 100.0,
    }))
}

fn sample(r: &mut mlp::Rng, n: usize) -> Vec<usize> {
    (0..BATCH).map(|_| r.below(n)).collect()
}

async fn train_sync(
    rank: usize,
    mut comm: Communicator,
    mut params: Vec<f32>,
    steps: u64,
) -> Result<RankOutcome, String> {
    let shard = mlp::dataset(TASK, 100 + rank as u64, 1024);
    let mut r = mlp::Rng::new(rank as u64);
    let mut sync = SemiSync::new(
        &params,
        SemiSyncConfig { deadline: Duration::from_secs(20), ..SemiSyncConfig::new(SyncMode::Synchronous) },
    );
    let mut deadlines = 0;
    for _ in 0..steps {
        let mut g = mlp::gradient(&params, &shard, &sample(&mut r, shard.x.len()));
        match sync.sync_gradients(&mut comm, &mut g).await {
            Ok(_) => {}
            Err(CommError::Deadline { .. }) => deadlines += 1,
            Err(e) => return Err(format!("rank {rank}: {e}")),
        }
        params.iter_mut().zip(&g).for_each(|(p, gi)| *p -= LR * gi);
    }
    comm.flush(Duration::from_secs(5)).await;
    let dc = |p: usize| p / PER_DC;
    let (wan, total) = bytes_sent(&comm, |p| dc(p) != dc(rank)).await?;
    Ok(RankOutcome { params, wan, total, deadlines, ledgers: vec![sync.ledger()] })
}

async fn train_cross_dc(
    rank: usize,
    mut sync: CrossDcSemiSync,
    mut params: Vec<f32>,
    steps: u64,
    every: u64,
    faults: Option<PathFaults>,
) -> Result<RankOutcome, String> {
    let shard = mlp::dataset(TASK, 100 + rank as u64, 1024);
    let mut r = mlp::Rng::new(rank as u64);
    let mut deadlines = 0;
    let faulty = faults.is_some();
    for step in 1..=steps {
        if faulty {
            // Rank 3 straggles; rank 1 crashes half-way; the WAN is cut around a sync.
            if rank == 3 && step % 5 == 0 {
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            if rank == 1 && step == steps / 2 {
                let (inner, outer) = sync.ledgers();
                return Ok(RankOutcome {
                    params: Vec::new(),
                    wan: 0,
                    total: 0,
                    deadlines,
                    ledgers: vec![inner, outer],
                });
            }
            if rank == 0 && step == 2 * every - 2 {
                if let Some(f) = &faults {
                    f.cut();
                    let f = f.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(600)).await;
                        f.restore();
                    });
                }
            }
        }
        let mut g = mlp::gradient(&params, &shard, &sample(&mut r, shard.x.len()));
        match sync.sync_gradients(&mut g).await {
            Ok(_) => {}
            Err(CommError::Deadline { .. }) => deadlines += 1,
            Err(e) => return Err(format!("rank {rank}: {e}")),
        }
        params.iter_mut().zip(&g).for_each(|(p, gi)| *p -= LR * gi);
        match sync.after_inner_step(&mut params).await {
            Ok(_) => {}
            Err(CommError::Deadline { .. }) => deadlines += 1,
            Err(e) => return Err(format!("rank {rank}: {e}")),
        }
    }
    sync.resync(&mut params).await.map_err(|e| format!("rank {rank}: resync: {e}"))?;
    let dc_index = rank % PER_DC;
    let (mut wan, mut total) = (0, 0);
    for p in (0..PER_DC).filter(|p| *p != dc_index) {
        sync.dc().handle().flush(RankId(p as u32), Duration::from_secs(5)).await;
    }
    let (_, dc_total) = bytes_sent(sync.dc(), |_| false).await?;
    total += dc_total;
    if let Some(l) = sync.leaders() {
        for p in 0..WORLD / PER_DC {
            l.handle().flush(RankId(p as u32), Duration::from_secs(5)).await;
        }
        let (w, t) = bytes_sent(l, |_| true).await?;
        wan += w;
        total += t;
    }
    let (inner, outer) = sync.ledgers();
    Ok(RankOutcome { params, wan, total, deadlines, ledgers: vec![inner, outer] })
}
