//! `phalanx launch`: starts N local ranks of a training command (like torchrun's agent),
//! restarts a rank that dies (bounded retries, exponential backoff), and hands each rank its
//! place in the job through environment variables (docs/launch.md):
//!
//! | variable | value |
//! |---|---|
//! | `PHALANX_COORDINATORS` | the coordinator group, `ID=ADDR,...` |
//! | `PHALANX_RANK` | the launcher's rank for this process: `node_rank * nprocs + local_rank` |
//! | `PHALANX_LOCAL_RANK` | `0..nprocs` on this host |
//! | `PHALANX_WORLD` | `nnodes * nprocs`, the world the job starts with |
//! | `PHALANX_NPROCS` | ranks on this host |
//! | `PHALANX_RESTART_COUNT` | how often this local rank was restarted |
//! | `PHALANX_INCARNATION` | differs at every start (the rank's incarnation when it joins) |
//! | `PHALANX_SECRET` | the cluster secret, when `--secret` is given |
//!
//! The world can change later: elastic ranks learn their epoch's members from the
//! coordinators, not from these variables. Events go to stderr as JSON lines
//! (`{"launcher": "started" | "exited" | "restarting" | "gave_up" | "done", ...}`).

use std::time::Duration;

use clap::Args;
use serde_json::json;
use tokio::process::Command as Process;

use crate::coordinator_cmd::parse_peer;
use crate::CliError;

/// Arguments of `phalanx launch`.
#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Ranks to start on this host.
    #[arg(long)]
    pub nprocs: u32,
    /// The coordinator group: `ID=ADDR,...`, or one `ADDR` (coordinator 1).
    #[arg(long)]
    pub coordinator: String,
    /// Hosts in the job (for PHALANX_WORLD).
    #[arg(long, default_value_t = 1)]
    pub nnodes: u32,
    /// This host's index among them (for PHALANX_RANK).
    #[arg(long, default_value_t = 0)]
    pub node_rank: u32,
    /// Restarts allowed per local rank before the launcher gives up.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// First wait before a restart, in milliseconds (doubles each time, up to 30 s).
    #[arg(long, default_value_t = 1000)]
    pub backoff_ms: u64,
    /// Cluster secret passed to the ranks.
    #[arg(long)]
    pub secret: Option<String>,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// How one local rank ended.
enum RankEnd {
    Done,
    GaveUp(String),
}

/// Runs `phalanx launch` until every rank has exited successfully (status 0), or one has
/// failed past its restarts (status 1; the others are stopped).
pub async fn run(a: LaunchArgs) -> Result<(), CliError> {
    if a.nprocs == 0 || a.nnodes == 0 || a.node_rank >= a.nnodes {
        return Err(CliError::Usage("need --nprocs >= 1, --nnodes >= 1 and --node-rank < --nnodes".into()));
    }
    let coordinators = if a.coordinator.contains('=') { a.coordinator.clone() } else { format!("1={}", a.coordinator) };
    for part in coordinators.split(',') {
        parse_peer(part).map_err(|e| CliError::Usage(format!("--coordinator: {e}")))?;
    }
    let (program, args) = a.command.split_first().ok_or_else(|| CliError::Usage("no command to launch".into()))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut ranks = tokio::task::JoinSet::new();
    for local in 0..a.nprocs {
        let env = RankEnv {
            coordinators: coordinators.clone(),
            rank: a.node_rank * a.nprocs + local,
            local,
            world: a.nnodes * a.nprocs,
            nprocs: a.nprocs,
            secret: a.secret.clone(),
        };
        let (program, args) = (program.clone(), args.to_vec());
        let (max_restarts, backoff) = (a.max_restarts, Duration::from_millis(a.backoff_ms));
        let stop = stop_rx.clone();
        ranks.spawn(async move { supervise(program, args, env, max_restarts, backoff, stop).await });
    }
    let interrupted = crate::shutdown_requested();
    tokio::pin!(interrupted);
    let mut failure = None;
    loop {
        tokio::select! {
            next = ranks.join_next() => match next {
                None => break,
                Some(Ok(RankEnd::Done)) => {}
                Some(Ok(RankEnd::GaveUp(why))) => {
                    if failure.is_none() {
                        failure = Some(why);
                        let _ = stop_tx.send(true);
                    }
                }
                Some(Err(e)) => {
                    failure.get_or_insert_with(|| format!("supervisor task failed: {e}"));
                    let _ = stop_tx.send(true);
                }
            },
            _ = &mut interrupted, if failure.is_none() => {
                failure = Some("interrupted".into());
                let _ = stop_tx.send(true);
            }
        }
    }
    match failure {
        None => {
            event(json!({"launcher": "done", "nprocs": a.nprocs}));
            Ok(())
        }
        Some(why) => Err(CliError::Failed(why)),
    }
}

struct RankEnv {
    coordinators: String,
    rank: u32,
    local: u32,
    world: u32,
    nprocs: u32,
    secret: Option<String>,
}

fn event(v: serde_json::Value) {
    eprintln!("{v}");
}

/// Runs one local rank, restarting it after a failure until it succeeds or its restarts run
/// out; stops it (SIGKILL) when told to.
async fn supervise(
    program: String,
    args: Vec<String>,
    env: RankEnv,
    max_restarts: u32,
    backoff: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> RankEnd {
    let local = env.local;
    let mut wait = backoff;
    for restart in 0..=max_restarts {
        let incarnation = (u64::from(std::process::id()) << 32) ^ (u64::from(local) << 16) ^ u64::from(restart);
        let mut cmd = Process::new(&program);
        cmd.args(&args)
            .env("PHALANX_COORDINATORS", &env.coordinators)
            .env("PHALANX_RANK", env.rank.to_string())
            .env("PHALANX_LOCAL_RANK", local.to_string())
            .env("PHALANX_WORLD", env.world.to_string())
            .env("PHALANX_NPROCS", env.nprocs.to_string())
            .env("PHALANX_RESTART_COUNT", restart.to_string())
            .env("PHALANX_INCARNATION", incarnation.to_string())
            .kill_on_drop(true);
        if let Some(s) = &env.secret {
            cmd.env("PHALANX_SECRET", s);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return RankEnd::GaveUp(format!("local rank {local}: cannot start {program:?}: {e}")),
        };
        event(json!({"launcher": "started", "local_rank": local, "pid": child.id(), "restart": restart}));
        let status = tokio::select! {
            s = child.wait() => s,
            _ = stopped(&mut stop) => {
                let _ = child.kill().await;
                event(json!({"launcher": "stopped", "local_rank": local}));
                return RankEnd::Done;
            }
        };
        let how = match &status {
            Ok(s) if s.success() => {
                event(json!({"launcher": "exited", "local_rank": local, "code": 0}));
                return RankEnd::Done;
            }
            Ok(s) => describe(s),
            Err(e) => format!("wait failed: {e}"),
        };
        event(json!({"launcher": "exited", "local_rank": local, "how": how, "restart": restart}));
        if restart == max_restarts {
            event(json!({"launcher": "gave_up", "local_rank": local, "restarts": max_restarts}));
            return RankEnd::GaveUp(format!("local rank {local} failed {} times (last: {how})", max_restarts + 1));
        }
        event(json!({"launcher": "restarting", "local_rank": local, "backoff_ms": wait.as_millis() as u64}));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped(&mut stop) => return RankEnd::Done,
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    }
    RankEnd::Done
}

/// Resolves once the launcher says stop (never, if the launcher is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn describe(s: &std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = s.signal() {
            return format!("killed by signal {sig}");
        }
    }
    match s.code() {
        Some(c) => format!("exit status {c}"),
        None => "ended without status".into(),
    }
}
