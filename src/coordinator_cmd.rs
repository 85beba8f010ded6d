//! `phalanx coordinator`: one member of the Raft coordinator group as a process, and
//! `phalanx membership`: an operator's client of the group (read the view, join, leave, report
//! a failure, begin an epoch), printing JSON.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use phalanx_node::coordinator::{run_coordinator, CoordinatorClient, ServerConfig};
use phalanx_runtime::membership::{ClusterView, Command, Outcome, RankStatus};
use serde_json::json;

use crate::CliError;

/// Arguments of `phalanx coordinator`.
#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// This coordinator's id (one of --peers).
    #[arg(long)]
    pub id: u64,
    /// Every voting coordinator as `ID=ADDR`, comma-separated (this one included: it listens
    /// on its own address).
    #[arg(long, value_delimiter = ',', value_parser = parse_peer, required = true)]
    pub peers: Vec<(u64, SocketAddr)>,
    /// Non-voting coordinators as `ID=ADDR`, comma-separated: they replicate the log and never
    /// vote (a standby, or a replica near a far data centre). Every coordinator gets the same
    /// --peers and --learners.
    #[arg(long, value_delimiter = ',', value_parser = parse_peer)]
    pub learners: Vec<(u64, SocketAddr)>,
    /// Directory of the durable log (created if missing; one process per directory).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Cluster secret (coordinators and clients prove it on every link).
    #[arg(long, default_value = "phalanx-dev-secret")]
    pub secret: String,
    /// One Raft tick, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub tick_ms: u64,
    /// Ticks without a leader before a follower campaigns (plus up to half as many, seeded).
    #[arg(long, default_value_t = 10)]
    pub election_ticks: usize,
    /// Ticks between heartbeats.
    #[arg(long, default_value_t = 2)]
    pub heartbeat_ticks: usize,
    /// Applied entries between snapshots (log compaction).
    #[arg(long, default_value_t = 1024)]
    pub snapshot_after: u64,
    /// A rank without heartbeat this long is declared failed (milliseconds; 0: never).
    #[arg(long, default_value_t = 3000)]
    pub failure_ms: u64,
}

/// `ID=ADDR`.
pub fn parse_peer(s: &str) -> Result<(u64, SocketAddr), String> {
    let (id, addr) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected ID=ADDR"))?;
    let id: u64 = id.parse().map_err(|_| format!("{s:?}: coordinator id {id:?} is not a number"))?;
    if id == 0 || id >= 1 << 31 {
        return Err(format!("{s:?}: coordinator ids are 1..2^31"));
    }
    let addr: SocketAddr = addr.parse().map_err(|_| format!("{s:?}: bad address {addr:?}"))?;
    Ok((id, addr))
}

fn check_peers(peers: &[(u64, SocketAddr)]) -> Result<(), CliError> {
    let mut ids: Vec<u64> = peers.iter().map(|(i, _)| *i).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != peers.len() {
        return Err(CliError::Usage("a coordinator id is listed twice".into()));
    }
    Ok(())
}

/// Runs `phalanx coordinator` until SIGTERM or Ctrl-C.
pub async fn run(a: CoordinatorArgs) -> Result<(), CliError> {
    let everyone: Vec<(u64, SocketAddr)> = a.peers.iter().chain(&a.learners).copied().collect();
    check_peers(&everyone)?;
    if !everyone.iter().any(|(p, _)| *p == a.id) {
        return Err(CliError::Usage(format!("--id {} is not among --peers or --learners", a.id)));
    }
    if a.tick_ms == 0 || a.election_ticks <= a.heartbeat_ticks {
        return Err(CliError::Usage("need --tick-ms > 0 and --election-ticks > --heartbeat-ticks".into()));
    }
    let mut config = ServerConfig::new(a.id, a.peers.clone(), a.data_dir.clone(), a.secret.into_bytes());
    config.learners = a.learners.clone();
    config.tick = Duration::from_millis(a.tick_ms);
    config.election_ticks = a.election_ticks;
    config.heartbeat_ticks = a.heartbeat_ticks;
    config.snapshot_after = a.snapshot_after;
    config.failure_timeout = Duration::from_millis(a.failure_ms);
    // Test failpoint (docs/membership.md): die between writing the log and acknowledging it.
    config.crash_at_sync = std::env::var("PHALANX_FAILPOINT_CRASH_AT_SYNC").ok().and_then(|v| v.parse().ok());
    let id = a.id;
    let shutdown = crate::shutdown_requested();
    run_coordinator(
        config,
        |addr| println!("{}", json!({"event": "listening", "id": id, "addr": addr.to_string()})),
        shutdown,
    )
    .await
    .map_err(|e| CliError::Failed(e.to_string()))
}

/// Arguments of `phalanx membership`.
#[derive(Args, Debug)]
pub struct MembershipArgs {
    /// The coordinators as `ID=ADDR`, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = parse_peer, required = true)]
    pub coordinators: Vec<(u64, SocketAddr)>,
    /// Cluster secret.
    #[arg(long, default_value = "phalanx-dev-secret")]
    pub secret: String,
    /// Give up after this many seconds without a leader.
    #[arg(long, default_value_t = 15)]
    pub timeout_s: u64,
    /// What to do.
    #[command(subcommand)]
    pub action: MembershipAction,
}

/// A membership command.
#[derive(Subcommand, Debug)]
pub enum MembershipAction {
    /// Print the view (read linearizably through the leader).
    View,
    /// Admit a process; prints its rank id.
    Join {
        /// Data centre.
        #[arg(long, default_value_t = 0)]
        dc: u32,
        /// Host name.
        #[arg(long)]
        host: String,
        /// Transport address (repeatable).
        #[arg(long = "addr")]
        addrs: Vec<String>,
        /// Process incarnation.
        #[arg(long, default_value_t = 1)]
        incarnation: u64,
    },
    /// A member leaves at the next epoch.
    Leave {
        /// The rank.
        #[arg(long)]
        rank: u32,
        /// The epoch it is in.
        #[arg(long)]
        epoch: u64,
    },
    /// Declare a rank failed.
    ReportFailure {
        /// The failed rank.
        #[arg(long)]
        rank: u32,
        /// The reporting member (the rank itself for the failure detector's verdict).
        #[arg(long)]
        reporter: u32,
        /// The reporter's epoch.
        #[arg(long)]
        epoch: u64,
    },
    /// Add a running coordinator to the group as a learner (started with itself in --learners).
    AddLearner {
        /// Its id.
        #[arg(long)]
        id: u64,
    },
    /// Start the next epoch (refused unless the view is at --expected).
    BeginEpoch {
        /// The epoch the caller saw.
        #[arg(long)]
        expected: u64,
    },
}

/// Runs `phalanx membership`.
pub async fn membership(a: MembershipArgs) -> Result<(), CliError> {
    check_peers(&a.coordinators)?;
    let mut client = CoordinatorClient::connect(&a.coordinators, a.secret.as_bytes())
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    client.deadline = Duration::from_secs(a.timeout_s);
    let command = match a.action {
        MembershipAction::View => {
            let (index, view) = client.read_view().await.map_err(|e| CliError::Failed(e.to_string()))?;
            println!(
                "{}",
                json!({"event": "view", "index": index, "leader": client.leader(), "view": view_json(&view)})
            );
            return Ok(());
        }
        MembershipAction::AddLearner { id } => {
            let (voters, learners) = client.add_learner(id).await.map_err(|e| CliError::Failed(e.to_string()))?;
            println!("{}", json!({"event": "configured", "voters": voters, "learners": learners}));
            return Ok(());
        }
        MembershipAction::Join { dc, host, addrs, incarnation } => Command::Join { dc, host, addrs, incarnation },
        MembershipAction::Leave { rank, epoch } => Command::Leave { rank, epoch },
        MembershipAction::ReportFailure { rank, reporter, epoch } => Command::ReportFailure { rank, reporter, epoch },
        MembershipAction::BeginEpoch { expected } => Command::BeginEpoch { expected },
    };
    let (index, result) = client.propose(command).await.map_err(|e| CliError::Failed(e.to_string()))?;
    let outcome = match result {
        Ok(Outcome::Joined { rank, from_epoch }) => json!({"joined": rank, "from_epoch": from_epoch}),
        Ok(Outcome::EpochBegan { epoch, members }) => json!({"epoch": epoch, "members": members}),
        Ok(Outcome::Updated) => json!("updated"),
        Ok(Outcome::Unchanged) => json!("unchanged"),
        Err(e) => {
            println!("{}", json!({"event": "refused", "index": index, "reason": e.to_string()}));
            return Err(CliError::Failed(format!("refused: {e}")));
        }
    };
    println!("{}", json!({"event": "applied", "index": index, "leader": client.leader(), "outcome": outcome}));
    Ok(())
}

/// The view as JSON.
pub fn view_json(v: &ClusterView) -> serde_json::Value {
    let ranks: Vec<_> = v
        .ranks()
        .map(|(r, m)| {
            let status = match m.status {
                RankStatus::Joining => "joining",
                RankStatus::Active => "active",
                RankStatus::Leaving => "leaving",
                RankStatus::Failed => "failed",
            };
            json!({"rank": r, "dc": m.dc, "host": m.host, "addrs": m.addrs, "incarnation": m.incarnation,
                   "status": status, "step": m.step})
        })
        .collect();
    json!({"epoch": v.epoch(), "members": v.members(), "ranks": ranks})
}
