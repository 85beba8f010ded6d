//! `phalanx bench membership`: the coordinator group's figures on loopback — commit latency of
//! a membership command (3 coordinator processes, fsynced logs), leader failover time (SIGKILL
//! the leader, time until the next command commits), and the epoch rebuild time of `--world`
//! elastic ranks (a rank joins, then leaves: the boundary that rebuilds every communicator).

use std::net::SocketAddr;
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use phalanx_node::coordinator::{CoordinatorClient, FileLog};
use phalanx_node::elastic::{Boundary, ElasticConfig, ElasticMember};
use phalanx_proto::TransportConfig;
use phalanx_runtime::membership::{Command, RankStatus};
use serde_json::json;

use crate::bench::BenchArgs;
use crate::CliError;

const SECRET: &[u8] = b"phalanx-bench-membership";

struct Coordinators {
    peers: Vec<(u64, SocketAddr)>,
    root: std::path::PathBuf,
    children: Vec<Option<Child>>,
}

impl Coordinators {
    fn start(&mut self, id: u64) -> Result<(), CliError> {
        let peers: Vec<String> = self.peers.iter().map(|(i, a)| format!("{i}={a}")).collect();
        let exe = std::env::current_exe().map_err(|e| CliError::Failed(format!("own executable: {e}")))?;
        let child = Process::new(exe)
            .args(["coordinator", "--id", &id.to_string(), "--peers", &peers.join(",")])
            .arg("--data-dir")
            .arg(self.root.join(format!("c{id}")))
            .args(["--secret", std::str::from_utf8(SECRET).unwrap_or_default()])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| CliError::Failed(format!("cannot start a coordinator: {e}")))?;
        self.children[id as usize - 1] = Some(child);
        Ok(())
    }

    fn kill9(&mut self, id: u64) {
        if let Some(mut c) = self.children[id as usize - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Coordinators {
    fn drop(&mut self) {
        for id in 1..=self.children.len() as u64 {
            self.kill9(id);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn free_addr() -> Result<SocketAddr, CliError> {
    phalanx_net::free_loopback_addr().map_err(|e| CliError::Failed(format!("no free port: {e}")))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn failed(e: impl std::fmt::Display) -> CliError {
    CliError::Failed(e.to_string())
}

/// Runs the membership benchmark (see the module docs).
pub async fn run(args: &BenchArgs) -> Result<(), CliError> {
    let root = std::env::temp_dir().join(format!("phalanx-bench-membership-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let peers = (1..=3u64).map(|id| free_addr().map(|a| (id, a))).collect::<Result<Vec<_>, _>>()?;
    let mut group = Coordinators { peers: peers.clone(), root, children: vec![None, None, None] };
    for id in 1..=3 {
        group.start(id)?;
    }
    let mut client = CoordinatorClient::connect(&peers, SECRET).await.map_err(failed)?;
    client.try_timeout = Duration::from_millis(300);
    client.read_view().await.map_err(failed)?;

    // Commit latency: sequential commands, each acknowledged after a majority fsynced it.
    let mut commits = Vec::new();
    let mut n = 0u64;
    for _ in 0..args.warmup {
        n += 1;
        let _ = client.propose(bench_command(n)).await.map_err(failed)?;
    }
    for _ in 0..args.iters.max(20) {
        n += 1;
        let t = Instant::now();
        let _ = client.propose(bench_command(n)).await.map_err(failed)?;
        commits.push(t.elapsed().as_secs_f64() * 1e6);
    }
    commits.sort_by(f64::total_cmp);

    // Failover: SIGKILL the leader, time until the next command commits; restart it and let it
    // catch up before the next round.
    let mut failovers = Vec::new();
    for _ in 0..5 {
        let leader = client.leader();
        group.kill9(leader);
        let t = Instant::now();
        n += 1;
        let (index, _) = client.propose(bench_command(n)).await.map_err(failed)?;
        failovers.push(t.elapsed().as_secs_f64() * 1e3);
        group.start(leader)?;
        let dir = group.root.join(format!("c{leader}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while FileLog::read(&dir).map(|r| r.hard_state.commit).unwrap_or(0) < index {
            if Instant::now() > deadline {
                return Err(CliError::Failed(format!("restarted coordinator {leader} did not catch up")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    failovers.sort_by(f64::total_cmp);

    // Epoch rebuild: `world` elastic ranks; one more joins, then leaves.
    let world = args.world as usize;
    let config = |host: String| -> Result<ElasticConfig, CliError> {
        let mut c = ElasticConfig::new(peers.clone(), SECRET, &host, free_addr()?);
        c.start_world = world;
        c.heartbeat_every = Duration::from_millis(200);
        c.transport = TransportConfig { link_timeout: Duration::from_millis(500), ..TransportConfig::default() };
        Ok(c)
    };
    let mut joins = Vec::new();
    for i in 0..world {
        joins.push(tokio::spawn(ElasticMember::join(config(format!("rank-{i}"))?)));
    }
    let mut members = Vec::new();
    for j in joins {
        let mut m = j.await.map_err(failed)?.map_err(failed)?;
        // Step 0's boundary was the admission itself.
        m.end_step();
        members.push(m);
    }
    let mut rebuilds = Vec::new();
    for cycle in 0..args.iters.clamp(3, 10) {
        let extra_config = config(format!("extra-{cycle}"))?;
        let joiner = tokio::spawn(async move {
            let mut m = ElasticMember::join(extra_config).await?;
            m.enter().await?;
            Ok::<_, phalanx_node::elastic::ElasticError>(m)
        });
        loop {
            let (_, v) = client.read_view().await.map_err(failed)?;
            if v.ranks().any(|(_, m)| m.status == RankStatus::Joining) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (back, took) = boundary_all(std::mem::take(&mut members)).await?;
        members = back;
        rebuilds.push(took);
        let mut extra = joiner.await.map_err(failed)?.map_err(failed)?;
        // The joiner was admitted in the boundary of the step the others just ended.
        extra.end_step();
        extra.request_leave().await.map_err(failed)?;
        members.push(extra);
        let (back, took) = boundary_all(std::mem::take(&mut members)).await?;
        members = back;
        rebuilds.push(took);
    }
    rebuilds.sort_by(f64::total_cmp);

    let row = json!({
        "tool": "phalanx", "op": "membership", "coordinators": 3,
        "commit_p50_us": percentile(&commits, 0.5).round(), "commit_p99_us": percentile(&commits, 0.99).round(),
        "commits": commits.len(),
        "failover_ms_median": percentile(&failovers, 0.5).round(), "failover_ms": failovers.iter().map(|f| f.round()).collect::<Vec<_>>(),
        "rebuild_world": world, "rebuild_ms_median": (percentile(&rebuilds, 0.5) * 10.0).round() / 10.0,
        "rebuild_ms_max": (percentile(&rebuilds, 1.0) * 10.0).round() / 10.0, "rebuilds": rebuilds.len(),
    });
    if args.json {
        println!("{row}");
    } else {
        println!(
            "membership: commit p50 {:.0} µs p99 {:.0} µs ({} commands, 3 coordinators, fsync); leader failover median {:.0} ms over {} kills; epoch rebuild of {} ranks median {:.1} ms (max {:.1}) over {} changes",
            percentile(&commits, 0.5),
            percentile(&commits, 0.99),
            commits.len(),
            percentile(&failovers, 0.5),
            failovers.len(),
            world,
            percentile(&rebuilds, 0.5),
            percentile(&rebuilds, 1.0),
            rebuilds.len()
        );
    }
    Ok(())
}

/// A command that goes through the log like any other (appended, fsynced by a majority,
/// applied) but leaves the view as it is: an epoch change from an epoch that never was.
fn bench_command(n: u64) -> Command {
    Command::BeginEpoch { expected: u64::MAX - n }
}

/// Every member runs the next step's boundary at once; returns those still members and the
/// slowest boundary's duration in milliseconds (until the whole group is in the new epoch).
async fn boundary_all(members: Vec<ElasticMember>) -> Result<(Vec<ElasticMember>, f64), CliError> {
    let mut tasks = Vec::new();
    for mut m in members {
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let b = m.begin_step().await;
            let took = t.elapsed().as_secs_f64() * 1e3;
            m.end_step();
            (m, b, took)
        }));
    }
    let mut back = Vec::new();
    let mut slowest: f64 = 0.0;
    for t in tasks {
        let (m, b, took) = t.await.map_err(failed)?;
        match b.map_err(failed)? {
            Boundary::Rebuilt { .. } => back.push(m),
            Boundary::Departed { .. } => {}
            Boundary::Continue => return Err(CliError::Failed(format!("rank {} saw no epoch change", m.rank()))),
        }
        slowest = slowest.max(took);
    }
    Ok((back, slowest))
}
