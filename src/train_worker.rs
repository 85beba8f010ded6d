//! `phalanx train-worker` (hidden): one rank of the training demo. It joins the job through the
//! coordinators, builds its communicators per epoch, and trains the small model of
//! [`crate::mlp`] on its own shard, semi-synchronously across data centres
//! ([`CrossDcSemiSync`]): every step its gradient is averaged inside its data centre (quorum
//! rounds), and every H steps the data centres' leaders run (streaming) DiLoCo across the WAN
//! and realign their DCs. It publishes its state every step for live recovery and — when it is
//! a restarted process joining a running job — recovers the state from its DC's peers first.
//! It reports JSON lines on stdout: `joined`, `recovered`, `step` (every `--report-every`
//! steps), `epoch`, `wan_cut`, `round_failed`, `done`.
//!
//! SIGUSR1 cuts every path it dialed to the other data centre for `--cut-ms` (the demo sends it
//! to every worker, so the two DCs are partitioned for that long).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use phalanx_collectives::reduce::DType;
use phalanx_node::elastic::{Boundary, ElasticConfig, ElasticError, ElasticMember};
use phalanx_node::semisync::{CrossDcSemiSync, SemiSyncConfig};
use phalanx_node::{CallOptions, CommError, FaultPolicy, Op, Outcome as CommOutcome};
use phalanx_proto::TransportConfig;
use phalanx_runtime::semisync::SyncMode;
use serde_json::json;

use crate::bench::BenchCompression;
use crate::coordinator_cmd::parse_peer;
use crate::mlp;

/// Arguments of `phalanx train-worker`.
#[derive(Args, Debug)]
pub struct TrainWorkerArgs {
    /// The coordinators, `ID=ADDR,...`.
    #[arg(long, value_delimiter = ',', value_parser = parse_peer, required = true)]
    pub coordinators: Vec<(u64, SocketAddr)>,
    /// Cluster secret.
    #[arg(long, default_value = "phalanx-dev-secret")]
    pub secret: String,
    /// Data centre.
    #[arg(long)]
    pub dc: u32,
    /// Host name (the same across restarts: a restarted process gets its rank id back).
    #[arg(long)]
    pub host: String,
    /// Transport address (fixed across epochs and restarts).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Address serving the training state to recovering ranks.
    #[arg(long)]
    pub state_listen: SocketAddr,
    /// Process incarnation (differs at every start).
    #[arg(long, default_value_t = 1)]
    pub incarnation: u64,
    /// Ranks before the first epoch begins.
    #[arg(long)]
    pub start_world: usize,
    /// Inner steps to train.
    #[arg(long)]
    pub steps: u64,
    /// Inner steps between syncs of one fragment (H).
    #[arg(long, default_value_t = 20)]
    pub every: u64,
    /// Parameter fragments of streaming DiLoCo (1: plain DiLoCo).
    #[arg(long, default_value_t = 4)]
    pub fragments: usize,
    /// What the data centres' leaders run across the WAN (`sync`: no DCs, synchronous data
    /// parallel over all ranks — the baseline).
    #[arg(long, value_enum, default_value_t = OuterAlgorithm::StreamingDiloco)]
    pub algorithm: OuterAlgorithm,
    /// Learning rate of the inner optimizer (SGD).
    #[arg(long, default_value_t = 0.1)]
    pub lr: f32,
    /// How outer gradients cross the WAN.
    #[arg(long, value_enum, default_value = "int8")]
    pub compression: BenchCompression,
    /// Sleep this long on every third step (a straggler).
    #[arg(long, default_value_t = 0)]
    pub straggle_ms: u64,
    /// How long SIGUSR1 cuts the WAN paths.
    #[arg(long, default_value_t = 1500)]
    pub cut_ms: u64,
    /// Report every this many steps.
    #[arg(long, default_value_t = 10)]
    pub report_every: u64,
    /// Training examples in this rank's shard.
    #[arg(long, default_value_t = 1024)]
    pub shard: usize,
    /// Seed of this rank's shard (default: 100 + its rank).
    #[arg(long)]
    pub data_seed: Option<u64>,
    /// Seed of the initial parameters (every rank of a job must pass the same).
    #[arg(long, default_value_t = 7)]
    pub init_seed: u64,
    /// Seed of the batch order (default: its rank, mixed with the incarnation).
    #[arg(long)]
    pub batch_seed: Option<u64>,
    /// Decay the learning rate along a cosine to 0 at `--steps` (default: constant).
    #[arg(long)]
    pub cosine: bool,
    /// Outer learning rate (default: DiLoCo's 0.7).
    #[arg(long)]
    pub outer_lr: Option<f32>,
    /// Outer Nesterov momentum (default: DiLoCo's 0.9).
    #[arg(long)]
    pub outer_momentum: Option<f32>,
    /// The straggler sleeps on every this many steps.
    #[arg(long, default_value_t = 3)]
    pub straggle_every: u64,
}

impl TrainWorkerArgs {
    /// The inner learning rate at `step` (0-based).
    fn lr_at(&self, step: u64) -> f32 {
        mlp::learning_rate(self.lr, self.cosine, step, self.steps)
    }
}

/// The cross-DC algorithm of the demo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OuterAlgorithm {
    /// DiLoCo with the parameters in `--fragments` fragments synced on staggered schedules.
    StreamingDiloco,
    /// DiLoCo: every parameter every H steps.
    Diloco,
    /// Local SGD: the parameters averaged every H steps (no outer momentum).
    LocalSgd,
    /// No data centres: synchronous data parallel over all ranks, gradients all-reduced
    /// (hierarchically) every step — the baseline.
    Sync,
}

impl OuterAlgorithm {
    /// The schedule it runs.
    pub fn mode(self, every: u64, fragments: usize) -> SyncMode {
        match self {
            OuterAlgorithm::StreamingDiloco => SyncMode::StreamingDiloco { every, fragments: fragments.max(1) },
            OuterAlgorithm::Diloco => SyncMode::Diloco { every },
            OuterAlgorithm::LocalSgd => SyncMode::LocalSgd { every },
            OuterAlgorithm::Sync => SyncMode::Synchronous,
        }
    }

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            OuterAlgorithm::StreamingDiloco => "streaming-diloco",
            OuterAlgorithm::Diloco => "diloco",
            OuterAlgorithm::LocalSgd => "local-sgd",
            OuterAlgorithm::Sync => "sync",
        }
    }
}

/// Bytes this rank sent in the current epoch, in all and on links to other data centres (a
/// link that died leaves the node's counters; `wan_links` keeps its last count). `None` when
/// the endpoint is gone.
async fn bytes_sent(
    m: &mut ElasticMember,
    dc: u32,
    wan_links: &mut std::collections::BTreeMap<u64, u64>,
) -> Option<(u64, u64)> {
    let (totals, links) = m.communicator().ok()?.handle().counters().await.ok()?;
    let dcs = m.member_dcs();
    for (link, peer, c) in &links {
        if dcs.get(peer.0 as usize).is_some_and(|d| *d != dc) {
            wan_links.insert(link.0, c.bytes_sent);
        }
    }
    Some((totals.bytes_sent, wan_links.values().sum()))
}

/// A round that failed: reported with its error, and whether it ran out of time (a deadline:
/// what the experiment counts as a hang) or failed otherwise (e.g. its root was lost).
fn round_failed(rank: u32, step: u64, scope: &str, e: &CommError) -> serde_json::Value {
    let deadline = matches!(e, CommError::Deadline { .. });
    json!({"event": "round_failed", "rank": rank, "step": step, "scope": scope, "error": e.to_string(), "deadline": deadline})
}

fn emit(v: serde_json::Value) {
    println!("{v}");
}

/// Runs one worker until the job's last step.
pub async fn run(a: TrainWorkerArgs) -> Result<(), String> {
    let mut config = ElasticConfig::new(a.coordinators.clone(), a.secret.as_bytes(), &a.host, a.listen);
    config.dc = a.dc;
    config.incarnation = a.incarnation;
    config.start_world = a.start_world;
    config.boundary_every = 10;
    config.heartbeat_every = Duration::from_millis(250);
    config.sync_deadline = Duration::from_secs(30);
    config.admission_timeout = Duration::from_secs(60);
    config.state_listen = Some(a.state_listen);
    config.transport = TransportConfig {
        heartbeat_interval: Duration::from_millis(50),
        link_timeout: Duration::from_millis(500),
        unreachable_after: Duration::from_secs(4),
        ..TransportConfig::default()
    };
    let wan = config.wan_faults.clone();
    let cut = Duration::from_millis(a.cut_ms);
    #[cfg(unix)]
    if let Ok(mut usr1) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) {
        let wan = wan.clone();
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                wan.cut();
                emit(json!({"event": "wan_cut", "ms": cut.as_millis() as u64}));
                tokio::time::sleep(cut).await;
                wan.restore();
                emit(json!({"event": "wan_restored"}));
            }
        });
    }

    let mut m = ElasticMember::join(config).await.map_err(|e| e.to_string())?;
    let rank = m.rank();
    emit(
        json!({"event": "joined", "rank": rank, "dc": a.dc, "epoch": m.epoch(), "step": m.step(), "world": m.members().len()}),
    );
    // Inside a DC: quorum rounds every step (a straggler is waited for 300 ms at most).
    let quorum = FaultPolicy::Quorum { min: 1, wait: Duration::from_millis(300) };
    let inner = SemiSyncConfig {
        policy: quorum,
        deadline: Duration::from_secs(30),
        ..SemiSyncConfig::new(SyncMode::Synchronous)
    };
    // Across DCs, between the leaders: quorum rounds, int8 outer gradients, healed.
    let defaults = SemiSyncConfig::new(a.algorithm.mode(a.every, a.fragments));
    let outer = SemiSyncConfig {
        compression: a.compression.codec(),
        policy: quorum,
        deadline: Duration::from_secs(30),
        heal_every: 2,
        outer_lr: a.outer_lr.unwrap_or(defaults.outer_lr),
        outer_momentum: a.outer_momentum.unwrap_or(defaults.outer_momentum),
        ..defaults
    };
    let (mut sync, mut params) = if m.step() > 0 {
        // Joined a running job: the state comes from its DC's peers (replicas of its model),
        // not from a checkpoint.
        let state = m.recover_state_within_dc(Duration::from_secs(30)).await.map_err(|e| e.to_string())?;
        let (mut sync, params) = CrossDcSemiSync::import(inner, outer, state.step, &state.buffers)?;
        // Admitted at an epoch's boundary, where every member marks its groups changed.
        sync.group_changed();
        emit(
            json!({"event": "recovered", "rank": rank, "step": state.step, "bytes": state.buffers.iter().map(|(_, b)| b.len()).sum::<usize>(),
                    "sources": state.bytes_per_source.iter().filter(|(_, b)| *b > 0).count(), "ms": state.elapsed.as_millis() as u64}),
        );
        (sync, params)
    } else {
        let params = mlp::init(a.init_seed, 1.0);
        (CrossDcSemiSync::new(&params, inner, outer), params)
    };
    m.publish_state(m.step(), sync.export(&params));
    let shard = mlp::dataset(42, a.data_seed.unwrap_or(100 + u64::from(rank)), a.shard);
    let mut rng = mlp::Rng::new(a.batch_seed.unwrap_or(u64::from(rank) ^ a.incarnation));
    let mut last_loss = f32::NAN;
    // Cross-DC rounds this rank (a leader) was late for: its contribution carried.
    let mut late_rounds = 0u64;
    // Byte counters are per epoch (a new endpoint each time): carry the earlier epochs'.
    let (mut bytes_before, mut wan_before, mut bytes_now, mut wan_now) = (0u64, 0u64, 0u64, 0u64);
    // Per link ever seen in this epoch (a link that died leaves the counters, its bytes stay).
    let mut wan_links: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
    loop {
        match m.begin_step().await {
            Ok(Boundary::Departed { .. }) => return Ok(()),
            Ok(Boundary::Rebuilt { epoch, members }) => {
                sync.group_changed();
                bytes_before += std::mem::take(&mut bytes_now);
                wan_before += std::mem::take(&mut wan_now);
                wan_links.clear();
                emit(json!({"event": "epoch", "rank": rank, "epoch": epoch, "world": members.len(), "step": m.step()}));
            }
            Ok(Boundary::Continue) => {}
            Err(ElasticError::Fenced { epoch, .. }) => {
                emit(json!({"event": "fenced", "rank": rank, "epoch": epoch}));
                return Err(format!("rank {rank} was declared failed: restart to rejoin"));
            }
            Err(e) => return Err(e.to_string()),
        }
        let step = m.step();
        if step >= a.steps {
            break;
        }
        if a.straggle_ms > 0 && step % a.straggle_every.max(1) == 0 {
            tokio::time::sleep(Duration::from_millis(a.straggle_ms)).await;
        }
        let lr = a.lr_at(step);
        let batch: Vec<usize> = (0..32).map(|_| rng.below(shard.x.len())).collect();
        let mut g = mlp::gradient(&params, &shard, &batch);
        if a.algorithm == OuterAlgorithm::Sync {
            // The baseline: every step, the gradient averaged over all ranks.
            let all = m.communicator().map_err(|e| e.to_string())?;
            if let Err(e) = sync.sync_gradients(all, &mut g).await {
                emit(round_failed(rank, step, "all", &e));
            }
            params.iter_mut().zip(&g).for_each(|(p, gi)| *p -= lr * gi);
        } else {
            let (dc, leaders) = m.dc_communicators().map_err(|e| e.to_string())?;
            // A round that failed (its deadline passed) is reported and counted dropped; the next
            // boundary sorts out who is still there.
            if let Err(e) = sync.sync_gradients(dc, &mut g).await {
                emit(round_failed(rank, step, "dc", &e));
            }
            params.iter_mut().zip(&g).for_each(|(p, gi)| *p -= lr * gi);
            match sync.after_inner_step(dc, leaders, &mut params).await {
                Ok(reports) => late_rounds += reports.iter().filter(|r| r.late).count() as u64,
                Err(e) => emit(round_failed(rank, step, "wan", &e)),
            }
        }
        if step % a.report_every == 0 {
            last_loss = mlp::loss(&params, &shard);
            // (The endpoint may be shut down: a fenced rank learns why at its next boundary.)
            let Some(now) = bytes_sent(&mut m, a.dc, &mut wan_links).await else {
                m.end_step();
                continue;
            };
            (bytes_now, wan_now) = now;
            let world = m.member_dcs().len();
            let (_, l) = sync.ledgers();
            emit(json!({"event": "step", "rank": rank, "dc": a.dc, "step": step, "epoch": m.epoch(), "world": world,
                        "loss": last_loss, "bytes": bytes_before + bytes_now, "wan_bytes": wan_before + wan_now, "offered": l.offered,
                        "applied": l.applied, "pending": l.pending, "dropped": l.dropped}));
        }
        m.end_step();
        // The state of the next step, served before its boundary (a rank admitted there
        // recovers it while the others wait at the admission barrier).
        m.publish_state(m.step(), sync.export(&params));
    }
    if a.algorithm == OuterAlgorithm::Sync {
        // Every rank ends on rank 0's model (a rank late for a round stepped on its own
        // gradient).
        let all = m.communicator().map_err(|e| e.to_string())?;
        let options = CallOptions { policy: FaultPolicy::Shrink, verify: false };
        let bytes: Vec<u8> = params.iter().flat_map(|x| x.to_le_bytes()).collect();
        let outcome = all.collective(Op::Broadcast { root: 0 }, DType::U8, bytes, options, Duration::from_secs(30));
        if let Ok(CommOutcome::Done { data, .. }) = outcome.await {
            for (p, c) in params.iter_mut().zip(data.chunks_exact(4)) {
                *p = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    } else {
        let (dc, leaders) = m.dc_communicators().map_err(|e| e.to_string())?;
        sync.resync(dc, leaders, &mut params).await.map_err(|e| format!("final resync: {e}"))?;
    }
    let eval = mlp::dataset(42, 999, 2048);
    let (inner, l) = sync.ledgers();
    if let Some(now) = bytes_sent(&mut m, a.dc, &mut wan_links).await {
        (bytes_now, wan_now) = now;
    }
    emit(
        json!({"event": "done", "rank": rank, "dc": a.dc, "step": m.step(), "epoch": m.epoch(), "eval_loss": mlp::loss(&params, &eval),
                "bytes": bytes_before + bytes_now, "wan_bytes": wan_before + wan_now,
                "train_loss": last_loss, "offered": l.offered, "applied": l.applied, "pending": l.pending, "dropped": l.dropped,
                "late_rounds": late_rounds, "dc_offered": inner.offered, "dc_applied": inner.applied, "dc_pending": inner.pending, "dc_dropped": inner.dropped}),
    );
    // Let the others get our last messages before the endpoint goes.
    m.communicator().map_err(|e| e.to_string())?.flush(Duration::from_secs(5)).await;
    Ok(())
}
