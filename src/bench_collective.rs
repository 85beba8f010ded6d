//! `phalanx bench allreduce|allgather|reducescatter|alltoall|broadcast`: N ranks, each its own
//! process on loopback (or all in one process over memory links), timed as the baselines time:
//! a barrier, then one operation timed on every rank; the iteration's time is the slowest
//! rank's; the median over iterations after warm-up is reported.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::ValueEnum;
use phalanx_collectives::reduce::{DType, ReduceOp};
use phalanx_net::{LinkKind, Node, NodeConfig, PathFaults, PathSpec};
use phalanx_node::{CallOptions, Communicator, ErrorFeedback};
use phalanx_proto::RankId;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::bench::{BenchAlgorithm, BenchArgs, BenchBind, BenchCompression, BenchOp, BenchTransport, LinkTuning};

const SECRET: &[u8] = b"phalanx-bench";
const DEADLINE: Duration = Duration::from_secs(120);

/// Arguments of the hidden `coll-worker` (one rank of a collective benchmark).
#[derive(clap::Args, Debug)]
pub struct CollWorkerArgs {
    #[arg(long, value_enum)]
    pub op: BenchOp,
    #[arg(long)]
    pub rank: usize,
    #[arg(long)]
    pub world: usize,
    #[arg(long)]
    pub bytes: u64,
    #[arg(long)]
    pub iters: u32,
    #[arg(long)]
    pub warmup: u32,
    /// Higher ranks to dial: `RANK=ADDR` (repeatable).
    #[arg(long = "peer")]
    pub peers: Vec<String>,
    /// All-reduce contributions compressed.
    #[arg(long, value_enum, default_value_t = BenchCompression::None)]
    pub compression: BenchCompression,
    /// Largest data message.
    #[arg(long)]
    pub segment: Option<u64>,
    /// All-reduce algorithm.
    #[arg(long, value_enum, default_value_t = BenchAlgorithm::Auto)]
    pub algorithm: BenchAlgorithm,
    /// Links over QUIC (with the certificates in `--tls-dir`) instead of TCP.
    #[arg(long)]
    pub quic: bool,
    /// Directory with `ca.pem` and `rank-R.{cert,key}.pem`.
    #[arg(long = "tls-dir")]
    pub tls_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub tuning: LinkTuning,
}

/// The busbw factor of nccl-tests for `op` over `n` ranks.
pub fn bus_factor(op: BenchOp, n: usize) -> f64 {
    let n = n as f64;
    match op {
        BenchOp::Allreduce => 2.0 * (n - 1.0) / n,
        BenchOp::Allgather | BenchOp::Reducescatter | BenchOp::Alltoall => (n - 1.0) / n,
        BenchOp::Broadcast | BenchOp::P2p | BenchOp::Membership => 1.0,
    }
}

/// Runs one timed operation (after a barrier) and returns its duration in microseconds.
async fn one_op(
    comm: &mut Communicator,
    op: BenchOp,
    bytes: usize,
    compression: BenchCompression,
    algorithm: BenchAlgorithm,
    pattern: &[u8],
) -> Result<f64, String> {
    let world = comm.world();
    let rank = comm.rank();
    let e = |e: phalanx_node::CommError| e.to_string();
    // Inputs are made before the clock starts: `pattern` repeated (small floats, exact sums),
    // copied in blocks. (All-to-all sends its own buffers below.)
    let count = if op == BenchOp::Alltoall { 0 } else { bytes / 4 };
    let mut buf = Vec::with_capacity(count * 4);
    while buf.len() < count * 4 {
        let n = (count * 4 - buf.len()).min(pattern.len());
        buf.extend_from_slice(&pattern[..n]);
    }
    let send: Vec<Bytes> = if op == BenchOp::Alltoall {
        (0..world).map(|_| Bytes::from(vec![rank as u8; bytes / world])).collect()
    } else {
        Vec::new()
    };
    comm.barrier(DEADLINE).await.map_err(e)?;
    let t0 = Instant::now();
    match op {
        BenchOp::Allreduce if compression != BenchCompression::None => {
            let mut feedback = ErrorFeedback::new();
            let options = CallOptions::default();
            comm.all_reduce_compressed(buf, ReduceOp::Sum, compression.codec(), &mut feedback, options, DEADLINE)
                .await
                .map_err(e)?;
        }
        BenchOp::Allreduce => {
            comm.all_reduce(buf, DType::F32, ReduceOp::Sum, algorithm.algorithm(), DEADLINE).await.map_err(e)?;
        }
        BenchOp::Reducescatter => {
            comm.reduce_scatter(buf, DType::F32, ReduceOp::Sum, DEADLINE).await.map_err(e)?;
        }
        BenchOp::Allgather => {
            comm.all_gather(buf, DType::F32, DEADLINE).await.map_err(e)?;
        }
        BenchOp::Broadcast => {
            comm.broadcast(buf, 0, DEADLINE).await.map_err(e)?;
        }
        BenchOp::Alltoall => {
            comm.all_to_all(send, DEADLINE).await.map_err(e)?;
        }
        BenchOp::P2p | BenchOp::Membership => return Err(format!("{op:?} is not a collective")),
    }
    Ok(t0.elapsed().as_secs_f64() * 1e6)
}

async fn rank_loop(
    mut comm: Communicator,
    op: BenchOp,
    bytes: usize,
    warmup: u32,
    iters: u32,
    compression: BenchCompression,
    algorithm: BenchAlgorithm,
) -> Result<Vec<f64>, String> {
    let mut samples = Vec::with_capacity(iters as usize);
    // With more ranks than CPUs, a rank's work between calls takes CPU time from ranks still in
    // their timed call: the input pattern is made once, and every rank is done with the
    // previous call (the barrier) before any makes its next input.
    let pattern: Vec<u8> = (0..1024).flat_map(|i| (((comm.rank() + i) % 7) as f32).to_le_bytes()).collect();
    for i in 0..warmup + iters {
        comm.barrier(DEADLINE).await.map_err(|e| e.to_string())?;
        let us = one_op(&mut comm, op, bytes, compression, algorithm, &pattern).await?;
        if i >= warmup {
            samples.push(us);
        }
    }
    // A last barrier, and every message acknowledged, before a rank may exit.
    comm.barrier(DEADLINE).await.map_err(|e| e.to_string())?;
    comm.flush(Duration::from_secs(10)).await;
    Ok(samples)
}

/// Per-iteration slowest rank, then the median.
fn slowest_median(per_rank: &[Vec<f64>]) -> f64 {
    let iters = per_rank.iter().map(|s| s.len()).min().unwrap_or(0);
    let mut worst: Vec<f64> = (0..iters).map(|i| per_rank.iter().map(|s| s[i]).fold(0.0, f64::max)).collect();
    worst.sort_by(f64::total_cmp);
    match worst.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => worst[n / 2],
        n => (worst[n / 2 - 1] + worst[n / 2]) / 2.0,
    }
}

/// Runs the collective benchmark; returns the median of the slowest rank, in microseconds.
pub async fn run(args: &BenchArgs) -> Result<f64, String> {
    let world = args.world as usize;
    let per_rank = match args.transport {
        BenchTransport::Mem => in_process(args, world).await?,
        BenchTransport::Tcp | BenchTransport::Quic => processes(args, world).await?,
    };
    Ok(slowest_median(&per_rank))
}

async fn in_process(args: &BenchArgs, world: usize) -> Result<Vec<Vec<f64>>, String> {
    let transport = args.tuning.transport()?;
    let mut nodes = Vec::new();
    for r in 0..world {
        let mut c = NodeConfig::new(RankId(r as u32), SECRET);
        c.transport = transport.clone();
        nodes.push(Node::start(c).await.map_err(|e| e.to_string())?);
    }
    for a in 0..world {
        for b in a + 1..world {
            phalanx_net::connect_mem(&nodes[a].handle(), &nodes[b].handle(), PathFaults::new())
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    let mut tasks = Vec::new();
    for (r, node) in nodes.into_iter().enumerate() {
        let comm = Communicator::new(node, r, world);
        // Ranks in one process share its CPUs: they poll as a rank with a thread of its own
        // but no CPU of its own does.
        let spin = args.tuning.spin_us.map_or(phalanx_node::DEFAULT_SPIN, Duration::from_micros);
        comm.set_spin_wait(spin).await;
        if let Some(b) = args.segment {
            comm.set_segment_bytes(b as usize).await;
        }
        tasks.push(tokio::spawn(rank_loop(
            comm,
            args.op,
            args.bytes as usize,
            args.warmup,
            args.iters,
            args.compression,
            args.algorithm,
        )));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.map_err(|e| e.to_string())??);
    }
    Ok(out)
}

async fn processes(args: &BenchArgs, world: usize) -> Result<Vec<Vec<f64>>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let tls_dir = if args.transport == BenchTransport::Quic {
        let dir = std::env::temp_dir().join(format!("phalanx-coll-tls-{}", std::process::id()));
        let ca = phalanx_net::tls::ClusterCa::generate("phalanx bench").map_err(|e| e.to_string())?;
        let names: Vec<String> = (0..world).map(|r| format!("rank-{r}")).collect();
        ca.write_dir(&dir, &names).map_err(|e| e.to_string())?;
        Some(dir)
    } else {
        None
    };
    let result = spawn_ranks(args, world, &exe, tls_dir.as_deref()).await;
    if let Some(d) = tls_dir {
        let _ = std::fs::remove_dir_all(d);
    }
    result
}

/// The CPU of each of `world` ranks, from the CPUs `cpus` this process may use: rank `r` on
/// the `r`-th when there are enough; otherwise consecutive ranks share a CPU, in blocks as equal
/// as can be (world 4 on two CPUs: ranks 0 and 1 on the first, 2 and 3 on the second). Ranks
/// left to the OS scheduler there move between CPUs and wait on each other's wake-ups
/// (docs/performance.md, "Oversubscribed ranks bound in blocks").
fn placement(cpus: &[usize], world: usize) -> Vec<usize> {
    (0..world).map(|r| if cpus.len() >= world { cpus[r] } else { cpus[r * cpus.len() / world] }).collect()
}

/// The CPUs this process may run on, ascending (`None` if the OS does not say).
fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: `sched_getaffinity` fills the zeroed set it is given, of the size it is told.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        set
    };
    // SAFETY: `CPU_ISSET` reads the set within its size.
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize).filter(|c| unsafe { libc::CPU_ISSET(*c, &set) }).collect();
    (!cpus.is_empty()).then_some(cpus)
}

/// Restricts the calling process to `cpu` (runs in a forked child before `exec`).
fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: the set is zeroed, then one bit within its size is set and it is passed with
    // its size.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

async fn spawn_ranks(
    args: &BenchArgs,
    world: usize,
    exe: &std::path::Path,
    tls_dir: Option<&std::path::Path>,
) -> Result<Vec<Vec<f64>>, String> {
    let mut children = Vec::new();
    let mut addrs: Vec<(usize, String)> = Vec::new();
    let cpus = match args.bind {
        BenchBind::Core => allowed_cpus().filter(|c| !c.is_empty()).map(|c| placement(&c, world)),
        BenchBind::None => None,
    };
    // Highest rank first: each rank dials the ranks above it, which are already listening.
    for r in (0..world).rev() {
        let mut cmd = tokio::process::Command::new(exe);
        if let Some(cpu) = cpus.as_ref().map(|c| c[r]) {
            // SAFETY: between fork and exec the closure makes one system call on a set built
            // on its own stack; it allocates nothing and takes no lock.
            unsafe {
                cmd.pre_exec(move || pin_to_cpu(cpu));
            }
        }
        cmd.arg("coll-worker")
            .args(["--op", &format!("{:?}", args.op).to_lowercase()])
            .args(["--rank", &r.to_string(), "--world", &world.to_string()])
            .args(["--bytes", &args.bytes.to_string(), "--iters", &args.iters.to_string()])
            .args(["--warmup", &args.warmup.to_string()])
            .args(["--compression", &format!("{:?}", args.compression).to_lowercase()])
            .args(["--algorithm", args.algorithm.to_possible_value().expect("no skipped variants").get_name()])
            .args(args.tuning.to_args())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (peer, addr) in &addrs {
            cmd.arg("--peer").arg(format!("{peer}={addr}"));
        }
        if let Some(d) = tls_dir {
            cmd.arg("--quic").arg("--tls-dir").arg(d);
        }
        if let Some(b) = args.segment {
            cmd.arg("--segment").arg(b.to_string());
        }
        let mut child = cmd.spawn().map_err(|e| format!("cannot start rank {r}: {e}"))?;
        let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| format!("rank {r} did not start within 30 s"))?
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("rank {r} exited before listening"))?;
        let v: serde_json::Value = serde_json::from_str(&first).map_err(|e| format!("rank {r} said {first:?}: {e}"))?;
        let addr = v["listening"].as_str().ok_or_else(|| format!("rank {r} said {first:?}"))?.to_string();
        addrs.push((r, addr));
        children.push((r, child, lines));
    }
    let mut per_rank = vec![Vec::new(); world];
    for (r, mut child, mut lines) in children {
        let line = lines.next_line().await.map_err(|e| e.to_string())?.ok_or_else(|| format!("rank {r} failed"))?;
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| format!("rank {r} said {line:?}: {e}"))?;
        per_rank[r] = v["samples_us"]
            .as_array()
            .ok_or_else(|| format!("rank {r} said {line:?}"))?
            .iter()
            .filter_map(|x| x.as_f64())
            .collect();
        let status = child.wait().await.map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("rank {r} exited with {status}"));
        }
    }
    Ok(per_rank)
}

/// One rank of a collective benchmark as its own process.
pub async fn worker(args: CollWorkerArgs) -> Result<(), String> {
    let mut cfg = NodeConfig::new(RankId(args.rank as u32), SECRET);
    cfg.transport = args.tuning.transport()?;
    cfg.quic_streams = args.tuning.quic_streams;
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let kind = if args.quic {
        let dir = args.tls_dir.as_ref().ok_or("--quic needs --tls-dir")?;
        cfg.tls = Some(
            phalanx_net::tls::TlsIdentity::load_dir(dir, &format!("rank-{}", args.rank)).map_err(|e| e.to_string())?,
        );
        cfg.quic_listen = Some(listen);
        LinkKind::Quic
    } else {
        cfg.tcp_listen = vec![listen];
        LinkKind::Tcp
    };
    for p in &args.peers {
        let (rank, addr) = p.split_once('=').ok_or_else(|| format!("bad --peer {p:?}"))?;
        let rank: u32 = rank.parse().map_err(|_| format!("bad --peer {p:?}"))?;
        let remote: SocketAddr = addr.parse().map_err(|_| format!("bad --peer {p:?}"))?;
        for _ in 0..args.tuning.paths {
            cfg.paths.push(PathSpec { peer: RankId(rank), kind, remote, bind: None, faults: PathFaults::new() });
        }
    }
    let node = Node::start(cfg).await.map_err(|e| e.to_string())?;
    let addr = node.tcp_addrs().first().copied().or(node.quic_addr()).ok_or("no listener bound")?;
    println!("{}", json!({ "listening": addr.to_string() }));
    let comm = Communicator::new(node, args.rank, args.world);
    if let Some(us) = args.tuning.spin_us {
        comm.set_spin_wait(Duration::from_micros(us)).await;
    }
    if let Some(b) = args.segment {
        comm.set_segment_bytes(b as usize).await;
    }
    let samples =
        rank_loop(comm, args.op, args.bytes as usize, args.warmup, args.iters, args.compression, args.algorithm)
            .await?;
    println!("{}", json!({ "samples_us": samples }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::placement;

    #[test]
    fn ranks_get_cpus_of_their_own_when_there_are_enough_else_equal_blocks_of_consecutive_ranks() {
        assert_eq!(placement(&[3, 5, 7], 2), vec![3, 5]);
        assert_eq!(placement(&[0, 1], 4), vec![0, 0, 1, 1]);
        assert_eq!(placement(&[2, 6], 3), vec![2, 2, 6]);
        assert_eq!(placement(&[4], 3), vec![4, 4, 4]);
        for (cpus, world) in [(2usize, 5usize), (3, 8), (4, 16), (7, 7), (2, 1)] {
            let list: Vec<usize> = (10..10 + cpus).collect();
            let p = placement(&list, world);
            assert_eq!(p.len(), world);
            assert!(p.windows(2).all(|w| w[0] <= w[1]), "consecutive ranks together: {p:?}");
            let per: Vec<usize> = list.iter().map(|c| p.iter().filter(|x| *x == c).count()).collect();
            let (lo, hi) = (per.iter().min().unwrap(), per.iter().max().unwrap());
            assert!(hi - lo <= 1 && *hi <= world.div_ceil(cpus), "{cpus} CPUs, {world} ranks: {per:?}");
        }
    }
}
