//! `phalanx experiment semisync [--quick]`: the same model, data and compute budget trained
//! five ways on loopback — synchronous data parallel, DiLoCo across two "data centres",
//! streaming DiLoCo with int8 outer gradients, and the latter run the demo's way (rank
//! processes joined through a coordinator) without and with the demo's faults (a straggler, a
//! rank SIGKILLed and restarted with live recovery, a WAN cut) — printing one JSON line per
//! run: `mode, eval_loss, wan_bytes, total_bytes, hangs, lost_contributions, wall_s`
//! (docs/semisync.md). Every run is repeated over `--seeds` (initialisation, shards, batch
//! order) and the modes are compared on the mean; the in-process modes run at each learning
//! rate of a sweep (`--lrs`), the process modes at in-process streaming DiLoCo's best; each
//! mode is then reported once more at its best (`best_of_sweep`), with its eval loss and WAN
//! bytes as ratios to synchronous DP's best.
//!
//! In-process modes: four ranks in one process, two per data centre, over real TCP on
//! loopback; each rank has its own shard of the task ([`crate::mlp`]). Synchronous DP
//! all-reduces gradients over all four every step (hierarchically: inside each DC, then
//! across); the DiLoCo modes all-reduce gradients inside each DC every step and sync across
//! DCs through the DC leaders every `--every` steps. WAN bytes are the bytes sent on links
//! between the two DCs (transport counters, read before any rank closes its links). Process
//! modes: [`crate::demo_training`] with this experiment's budget (four `phalanx train-worker`
//! processes); their WAN bytes also count the membership's traffic between DCs (heartbeats,
//! boundary agreement). `PHALANX_LOUD=1` prints the demo's progress and events for them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use phalanx_collectives::reduce::DType;
use phalanx_net::{LinkKind, Node, NodeConfig, PathFaults, PathSpec};
use phalanx_node::semisync::{CrossDcSemiSync, SemiSync, SemiSyncConfig};
use phalanx_node::{CallOptions, CommError, Communicator, Compression, FaultPolicy, Op, Topology};
use phalanx_proto::{RankId, TransportConfig};
use phalanx_runtime::semisync::{Ledger, SyncMode};
use serde_json::json;

use crate::bench::BenchCompression;
use crate::demo_training::{self, Learning, TrainingDemo};
use crate::mlp;
use crate::train_worker::OuterAlgorithm;
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
    /// A shorter run (CI): 300 steps, H 50, one learning rate.
    #[arg(long)]
    pub quick: bool,
    /// Inner steps per rank (default 2000; quick 300).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Inner steps between cross-DC syncs (H; default 100; quick 50).
    #[arg(long)]
    pub every: Option<u64>,
    /// Only these modes (comma-separated: sync, diloco, streaming_diloco,
    /// streaming_diloco_processes, streaming_diloco_faults).
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Peak learning rates of the inner optimizer (SGD) to sweep, every in-process mode (the
    /// process modes run at in-process streaming DiLoCo's best); each mode is also reported at
    /// its best (default 0.8,1.2,1.6,2.0; quick 0.8).
    #[arg(long, value_delimiter = ',')]
    pub lrs: Vec<f32>,
    /// Outer learning rate of the DiLoCo modes (tuned on this task over 5 seeds; the paper's
    /// is 0.7).
    #[arg(long, default_value_t = 1.2)]
    pub outer_lr: f32,
    /// Outer Nesterov momentum of the DiLoCo modes (tuned on this task over 5 seeds; the
    /// paper's is 0.9).
    #[arg(long, default_value_t = 0.3)]
    pub outer_momentum: f32,
    /// Keep the inner learning rate constant (default: cosine decay to 0 over the run).
    #[arg(long)]
    pub constant_lr: bool,
    /// Training examples per rank.
    #[arg(long, default_value_t = 8192)]
    pub shard: usize,
    /// How the streaming modes send outer gradients across the WAN (DiLoCo's are fp32).
    #[arg(long, value_enum, default_value = "int8")]
    pub streaming_compression: BenchCompression,
    /// Parameter fragments of the streaming modes, synced on staggered schedules.
    #[arg(long, default_value_t = 4)]
    pub fragments: usize,
    /// Runs per mode and learning rate, each with its own initialisation, data shards and
    /// batch order (seed 0 is the single run of earlier versions); modes are compared on the
    /// mean eval loss over the seeds (default 5; quick 1).
    #[arg(long)]
    pub seeds: Option<u64>,
}

const SECRET: &[u8] = b"phalanx-experiment";
const WORLD: usize = 4;
const PER_DC: usize = 2;
const BATCH: usize = 32;
const TASK: u64 = 42;
/// Seed `s` shifts every seed of a run by `s` times this (the task's teacher stays the same).
const SEED_STRIDE: u64 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Sync,
    Diloco,
    Streaming,
    /// Streaming DiLoCo run the demo's way (rank processes, coordinator), no faults: the
    /// control for `StreamingFaults`.
    StreamingProcesses,
    /// The same with the demo's faults.
    StreamingFaults,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Diloco => "diloco",
            Mode::Streaming => "streaming_diloco",
            Mode::StreamingProcesses => "streaming_diloco_processes",
            Mode::StreamingFaults => "streaming_diloco_faults",
        }
    }
}

/// Runs `phalanx experiment`.
pub async fn run(a: ExperimentArgs) -> Result<(), CliError> {
    let Experiment::Semisync(a) = a.which;
    let steps = a.steps.unwrap_or(if a.quick { 300 } else { 2000 });
    let every = a.every.unwrap_or(if a.quick { 50 } else { 100 });
    let seeds = a.seeds.unwrap_or(if a.quick { 1 } else { 5 });
    if steps == 0 || every == 0 || a.fragments == 0 || seeds == 0 {
        return Err(CliError::Usage("--steps, --every, --fragments and --seeds must be at least 1".into()));
    }
    let lrs = if !a.lrs.is_empty() {
        a.lrs.clone()
    } else if a.quick {
        vec![0.8]
    } else {
        vec![0.8, 1.2, 1.6, 2.0]
    };
    if lrs.iter().any(|lr| !(*lr > 0.0 && lr.is_finite())) {
        return Err(CliError::Usage("--lrs must be positive".into()));
    }
    let all = [Mode::Sync, Mode::Diloco, Mode::Streaming, Mode::StreamingProcesses, Mode::StreamingFaults];
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
    let mut best: Vec<serde_json::Value> = Vec::new();
    for mode in modes {
        // The process modes are streaming DiLoCo as run in-process, the demo's way: at the
        // learning rate where in-process streaming DiLoCo did best (when it ran).
        let streaming_best = best.iter().find(|b| b["mode"] == Mode::Streaming.name()).and_then(|b| b["lr"].as_f64());
        let lrs = match (mode, streaming_best) {
            (Mode::StreamingProcesses | Mode::StreamingFaults, Some(lr)) => vec![lr as f32],
            _ => lrs.clone(),
        };
        let mut runs = Vec::new();
        for lr in &lrs {
            let mut budget = Budget {
                steps,
                every,
                lr: *lr,
                cosine: !a.constant_lr,
                outer_lr: a.outer_lr,
                outer_momentum: a.outer_momentum,
                shard: a.shard.max(1),
                streaming_compression: a.streaming_compression,
                fragments: a.fragments,
                seed: 0,
            };
            let mut rows = Vec::new();
            for seed in 0..seeds {
                budget.seed = seed;
                let row = run_mode(mode, budget).await.map_err(CliError::Failed)?;
                println!("{row}");
                rows.push(row);
            }
            let mean = mean_over_seeds(&rows);
            if seeds > 1 {
                println!("{mean}");
            }
            runs.push(mean);
        }
        let loss = |v: &serde_json::Value| v["eval_loss"].as_f64().unwrap_or(f64::INFINITY);
        if let Some(b) = runs.into_iter().min_by(|x, y| loss(x).total_cmp(&loss(y))) {
            best.push(b);
        }
    }
    // Each mode at its best learning rate, and its ratios to synchronous DP's best.
    let sync = best.iter().find(|b| b["mode"] == "sync").cloned();
    for mut b in best {
        b["best_of_sweep"] = json!(true);
        if let Some(s) = &sync {
            let (l, sl) = (b["eval_loss"].as_f64().unwrap_or(f64::NAN), s["eval_loss"].as_f64().unwrap_or(f64::NAN));
            let (w, sw) = (b["wan_bytes"].as_f64().unwrap_or(f64::NAN), s["wan_bytes"].as_f64().unwrap_or(f64::NAN));
            b["eval_loss_vs_sync"] = json!((l / sl * 1e4).round() / 1e4);
            b["wan_bytes_fewer_than_sync"] = json!((sw / w * 10.0).round() / 10.0);
        }
        println!("{b}");
    }
    Ok(())
}

/// One line for the runs of a mode at one learning rate, one per seed: the first run's settings,
/// with the mean eval loss and bytes, the summed fault counters, and each seed's eval loss.
fn mean_over_seeds(rows: &[serde_json::Value]) -> serde_json::Value {
    let Some(first) = rows.first() else { return json!({}) };
    if rows.len() == 1 {
        return first.clone();
    }
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let mean = |k: &str| rows.iter().map(|r| f(r, k)).sum::<f64>() / rows.len() as f64;
    let sum = |k: &str| rows.iter().map(|r| r[k].as_u64().unwrap_or(0)).sum::<u64>();
    let mut m = first.clone();
    m["eval_loss"] = json!((mean("eval_loss") * 1e4).round() / 1e4);
    m["eval_loss_per_seed"] = json!(rows.iter().map(|r| f(r, "eval_loss")).collect::<Vec<_>>());
    for k in ["wan_bytes", "total_bytes"] {
        m[k] = json!(mean(k).round() as u64);
    }
    for k in ["hangs", "failed_rounds", "lost_contributions", "dropped_contributions", "pending_contributions"] {
        m[k] = json!(sum(k));
    }
    m["ranks_agree"] = json!(rows.iter().all(|r| r["ranks_agree"] == json!(true)));
    m["wall_s"] = json!((rows.iter().map(|r| f(r, "wall_s")).sum::<f64>() * 100.0).round() / 100.0);
    m["seeds"] = json!(rows.len());
    if let Some(o) = m.as_object_mut() {
        o.remove("seed");
    }
    m
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

/// Waits until every live rank of `comm` has read its counters (they count live links only:
/// a rank that dropped its node early would take its links' bytes with it).
async fn counted(comm: &mut Communicator) {
    let options = CallOptions { policy: FaultPolicy::Shrink, verify: false };
    let _ = comm.collective(Op::Barrier, DType::U8, Vec::new(), options, Duration::from_secs(10)).await;
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

/// What every mode gets: inner steps, the cross-DC period, the inner learning rate.
#[derive(Clone, Copy, Debug)]
struct Budget {
    steps: u64,
    every: u64,
    lr: f32,
    cosine: bool,
    outer_lr: f32,
    outer_momentum: f32,
    shard: usize,
    streaming_compression: BenchCompression,
    fragments: usize,
    /// Varies the initialisation, the shards and the batch order (0: the original run).
    seed: u64,
}

impl Budget {
    /// The inner learning rate at step `step` (0-based).
    fn lr_at(&self, step: u64) -> f32 {
        mlp::learning_rate(self.lr, self.cosine, step, self.steps)
    }
}

async fn run_mode(mode: Mode, budget: Budget) -> Result<serde_json::Value, String> {
    if matches!(mode, Mode::StreamingProcesses | Mode::StreamingFaults) {
        return run_processes(mode, budget).await;
    }
    let every = budget.every;
    let started = Instant::now();
    let init = mlp::init(7 + SEED_STRIDE * budget.seed, 1.0);
    let mut tasks = Vec::new();
    if mode == Mode::Sync {
        let (nodes, _) = group(WORLD).await?;
        for (rank, node) in nodes.into_iter().enumerate() {
            // Topology-aware: the all-reduce runs hierarchically (inside each DC, then across).
            let comm = Communicator::with_topology(node, rank, Topology::new((0..WORLD).map(|r| r / PER_DC).collect()));
            let init = init.clone();
            tasks.push(tokio::spawn(async move { train_sync(rank, comm, init, budget).await }));
        }
    } else {
        let mut dcs = Vec::new();
        for _ in 0..WORLD / PER_DC {
            dcs.push(group(PER_DC).await?.0);
        }
        let (leaders, _) = group(WORLD / PER_DC).await?;
        let mut leaders: Vec<Option<Node>> = leaders.into_iter().map(Some).collect();
        // No faults: every round waits for everyone.
        let outer = SemiSyncConfig {
            compression: if mode == Mode::Diloco { Compression::None } else { budget.streaming_compression.codec() },
            policy: FaultPolicy::Shrink,
            deadline: Duration::from_secs(20),
            outer_lr: budget.outer_lr,
            outer_momentum: budget.outer_momentum,
            ..SemiSyncConfig::new(if mode == Mode::Diloco {
                SyncMode::Diloco { every }
            } else {
                SyncMode::StreamingDiloco { every, fragments: budget.fragments }
            })
        };
        let inner = SemiSyncConfig {
            policy: FaultPolicy::Shrink,
            deadline: Duration::from_secs(20),
            ..SemiSyncConfig::new(SyncMode::Synchronous)
        };
        for (d, dc_nodes) in dcs.into_iter().enumerate() {
            for (i, node) in dc_nodes.into_iter().enumerate() {
                let rank = d * PER_DC + i;
                let dc = Communicator::new(node, i, PER_DC);
                let lead =
                    if i == 0 { leaders[d].take().map(|n| Communicator::new(n, d, WORLD / PER_DC)) } else { None };
                let sync = CrossDcSemiSync::new(&init, inner, outer);
                let init = init.clone();
                tasks.push(tokio::spawn(async move { train_cross_dc(rank, sync, (dc, lead), init, budget).await }));
            }
        }
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.map_err(|e| e.to_string())??);
    }
    let eval = mlp::dataset(TASK, 999, 2048);
    let eval_loss = mlp::loss(&outcomes.first().ok_or("no rank")?.params, &eval);
    let same = outcomes.iter().all(|o| o.params == outcomes[0].params);
    let (mut offered, mut applied, mut dropped, mut pending) = (0, 0, 0, 0);
    for l in outcomes.iter().flat_map(|o| &o.ledgers) {
        offered += l.offered;
        applied += l.applied;
        dropped += l.dropped;
        pending += l.pending;
    }
    Ok(row(
        mode,
        budget,
        RunFigures {
            eval_loss: f64::from(eval_loss),
            wan_bytes: outcomes.iter().map(|o| o.wan).sum(),
            total_bytes: outcomes.iter().map(|o| o.total).sum(),
            hangs: outcomes.iter().map(|o| o.deadlines).sum(),
            failed_rounds: outcomes.iter().map(|o| o.deadlines).sum(),
            contributions: [offered, applied, pending, dropped],
            ranks_agree: same,
            wall_s: started.elapsed().as_secs_f64(),
        },
    ))
}

/// The streaming modes run the demo's way: `WORLD` rank processes (`phalanx train-worker`)
/// that join through an embedded coordinator, build their communicators per epoch and publish
/// their state for live recovery — with the demo's faults (`StreamingFaults`: a straggler, a
/// rank SIGKILLed and restarted, which rejoins and recovers its state from its DC peer, and a
/// WAN cut) or without (`StreamingProcesses`, the control). Same model, data, seeds and
/// optimizer settings as the in-process modes.
async fn run_processes(mode: Mode, budget: Budget) -> Result<serde_json::Value, String> {
    let demo = TrainingDemo {
        ranks: WORLD,
        steps: budget.steps,
        every: budget.every,
        fragments: budget.fragments,
        algorithm: OuterAlgorithm::StreamingDiloco,
        lr: budget.lr,
        faults: mode == Mode::StreamingFaults,
        plot: PathBuf::new(),
        learning: Learning {
            shard: budget.shard,
            seed: budget.seed,
            seed_stride: SEED_STRIDE,
            cosine: budget.cosine,
            outer_lr: Some(budget.outer_lr),
            outer_momentum: Some(budget.outer_momentum),
            compression: budget.streaming_compression,
            ..Learning::default()
        },
        // PHALANX_LOUD=1 shows the demo's progress lines and events (for a run that goes wrong).
        quiet: std::env::var_os("PHALANX_LOUD").is_none(),
    };
    let o = demo_training::run(demo).await?;
    let [offered, applied, pending, dropped] = o.contributions;
    Ok(row(
        mode,
        budget,
        RunFigures {
            eval_loss: o.eval_loss,
            wan_bytes: o.wan_bytes,
            total_bytes: o.bytes,
            hangs: o.deadline_rounds,
            failed_rounds: o.failed_rounds,
            contributions: [offered, applied, pending, dropped],
            // `run` fails unless every rank ended on the same model.
            ranks_agree: true,
            wall_s: o.wall_s,
        },
    ))
}

/// What one run measured.
struct RunFigures {
    eval_loss: f64,
    wan_bytes: u64,
    total_bytes: u64,
    /// Rounds that hit their deadline.
    hangs: u64,
    /// Rounds that failed, for any reason (a deadline, a lost root).
    failed_rounds: u64,
    /// Contributions offered, applied, still carried at the end, dropped (reported).
    contributions: [u64; 4],
    ranks_agree: bool,
    wall_s: f64,
}

/// One run's JSON line.
fn row(mode: Mode, budget: Budget, f: RunFigures) -> serde_json::Value {
    let [offered, applied, pending, dropped] = f.contributions;
    json!({
        "mode": mode.name(),
        "eval_loss": (f.eval_loss * 1e4).round() / 1e4,
        "wan_bytes": f.wan_bytes,
        "total_bytes": f.total_bytes,
        "hangs": f.hangs,
        "failed_rounds": f.failed_rounds,
        "lost_contributions": offered.saturating_sub(applied + dropped + pending),
        "dropped_contributions": dropped,
        "pending_contributions": pending,
        "ranks_agree": f.ranks_agree,
        "steps": budget.steps,
        "every": budget.every,
        "lr": budget.lr,
        "cosine": budget.cosine,
        "outer_lr": budget.outer_lr,
        "outer_momentum": budget.outer_momentum,
        "shard": budget.shard,
        "seed": budget.seed,
        "wall_s": (f.wall_s * 100.0).round() / 100.0,
    })
}

fn sample(r: &mut mlp::Rng, n: usize) -> Vec<usize> {
    (0..BATCH).map(|_| r.below(n)).collect()
}

async fn train_sync(
    rank: usize,
    mut comm: Communicator,
    mut params: Vec<f32>,
    budget: Budget,
) -> Result<RankOutcome, String> {
    let steps = budget.steps;
    let shard = mlp::dataset(TASK, 100 + rank as u64 + SEED_STRIDE * budget.seed, budget.shard);
    let mut r = mlp::Rng::new(rank as u64 + SEED_STRIDE * budget.seed);
    let mut sync = SemiSync::new(
        &params,
        SemiSyncConfig { deadline: Duration::from_secs(20), ..SemiSyncConfig::new(SyncMode::Synchronous) },
    );
    let mut deadlines = 0;
    for step in 0..steps {
        let lr = budget.lr_at(step);
        let mut g = mlp::gradient(&params, &shard, &sample(&mut r, shard.x.len()));
        match sync.sync_gradients(&mut comm, &mut g).await {
            Ok(_) => {}
            Err(CommError::Deadline { .. }) => deadlines += 1,
            Err(e) => return Err(format!("rank {rank}: {e}")),
        }
        params.iter_mut().zip(&g).for_each(|(p, gi)| *p -= lr * gi);
    }
    comm.flush(Duration::from_secs(5)).await;
    let dc = |p: usize| p / PER_DC;
    let (wan, total) = bytes_sent(&comm, |p| dc(p) != dc(rank)).await?;
    counted(&mut comm).await;
    Ok(RankOutcome { params, wan, total, deadlines, ledgers: vec![sync.ledger()] })
}

async fn train_cross_dc(
    rank: usize,
    mut sync: CrossDcSemiSync,
    (mut dc, mut leaders): (Communicator, Option<Communicator>),
    mut params: Vec<f32>,
    budget: Budget,
) -> Result<RankOutcome, String> {
    let shard = mlp::dataset(TASK, 100 + rank as u64 + SEED_STRIDE * budget.seed, budget.shard);
    let mut r = mlp::Rng::new(rank as u64 + SEED_STRIDE * budget.seed);
    let mut deadlines = 0;
    for step in 1..=budget.steps {
        let lr = budget.lr_at(step - 1);
        let mut g = mlp::gradient(&params, &shard, &sample(&mut r, shard.x.len()));
        match sync.sync_gradients(&mut dc, &mut g).await {
            Ok(_) => {}
            Err(CommError::Deadline { .. }) => deadlines += 1,
            Err(e) => return Err(format!("rank {rank}: {e}")),
        }
        params.iter_mut().zip(&g).for_each(|(p, gi)| *p -= lr * gi);
        match sync.after_inner_step(&mut dc, leaders.as_mut(), &mut params).await {
            Ok(_) => {}
            Err(CommError::Deadline { .. }) => deadlines += 1,
            Err(e) => return Err(format!("rank {rank}: {e}")),
        }
    }
    sync.resync(&mut dc, leaders.as_mut(), &mut params).await.map_err(|e| format!("rank {rank}: resync: {e}"))?;
    let dc_index = rank % PER_DC;
    let (mut wan, mut total) = (0, 0);
    for p in (0..PER_DC).filter(|p| *p != dc_index) {
        dc.handle().flush(RankId(p as u32), Duration::from_secs(5)).await;
    }
    let (_, dc_total) = bytes_sent(&dc, |_| false).await?;
    total += dc_total;
    if let Some(l) = leaders.as_ref() {
        for p in 0..WORLD / PER_DC {
            l.handle().flush(RankId(p as u32), Duration::from_secs(5)).await;
        }
        let (w, t) = bytes_sent(l, |_| true).await?;
        wan += w;
        total += t;
    }
    counted(&mut dc).await;
    if let Some(l) = leaders.as_mut() {
        counted(l).await;
    }
    let (inner, outer) = sync.ledgers();
    Ok(RankOutcome { params, wan, total, deadlines, ledgers: vec![inner, outer] })
}
