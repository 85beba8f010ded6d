//! `phalanx bench`: measured the way `../shared/bench/baselines/` measures (barrier, time one
//! operation, keep the slowest rank, median after warm-up), printed in the baselines' CSV
//! columns so rows can be set side by side.
//!
//! `p2p` is one direction between two ranks: rank 0 sends a message of `--bytes`, rank 1
//! acknowledges once it has the whole message; the time from send to acknowledgement is one
//! sample (it includes one small-message round trip, about 0.05 ms on loopback).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, ValueEnum};
use phalanx_net::{LinkKind, Node, NodeConfig, NodeHandle, PathFaults, PathSpec};
use phalanx_proto::{ChannelId, RankId};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::size::parse_size;
use crate::CliError;
use phalanx_proto::harness::pattern;

const CH_DATA: ChannelId = ChannelId(1);
const CH_CTRL: ChannelId = ChannelId(2);
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Transports a benchmark can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchTransport {
    /// TCP over loopback.
    Tcp,
    /// QUIC over loopback (mutual TLS).
    Quic,
    /// In-memory pipes inside one process.
    Mem,
}

impl BenchTransport {
    fn column(self) -> &'static str {
        match self {
            BenchTransport::Tcp => "tcp-loopback",
            BenchTransport::Quic => "quic-loopback",
            BenchTransport::Mem => "memory",
        }
    }
}

/// Operations `phalanx bench` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchOp {
    /// One direction between two ranks.
    P2p,
    /// All-reduce (f32 sum).
    Allreduce,
    /// All-gather (`--bytes` is the gathered size).
    Allgather,
    /// Reduce-scatter (f32 sum; `--bytes` is the input size).
    Reducescatter,
    /// All-to-all (`--bytes` is the send buffer; `bytes/world` to each rank).
    Alltoall,
    /// Broadcast from rank 0.
    Broadcast,
    /// The coordinator group: commit latency, leader failover, epoch rebuild of `--world`
    /// elastic ranks (3 coordinator processes on loopback).
    Membership,
}

/// Where the rank processes of a collective benchmark run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchBind {
    /// Each rank on a CPU of its own (rank `r` on the `r`-th CPU this process may use) when
    /// there are at least as many CPUs as ranks — Open MPI's default (`--bind-to core` up to
    /// two ranks), and how trainers pin one rank per GPU; with more ranks than CPUs,
    /// consecutive ranks share one, in equal blocks (Open MPI binds nothing there; binding
    /// changes its figures by less than their noise: docs/performance.md).
    Core,
    /// Wherever the OS puts them.
    None,
}

/// Which all-reduce algorithm a benchmark runs (the override of the automatic choice).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchAlgorithm {
    /// By size: recursive doubling below 64 KiB (world 2) or 128 KiB (larger worlds), else the
    /// ring.
    Auto,
    /// The ring, at every size.
    Ring,
    /// Recursive doubling, at every size.
    RecursiveDoubling,
    /// Recursive halving then doubling (Rabenseifner) at every size; the ring when the world is
    /// not a power of two.
    HalvingDoubling,
}

impl BenchAlgorithm {
    /// The collectives' setting.
    pub fn algorithm(self) -> phalanx_node::AllReduceAlgorithm {
        match self {
            BenchAlgorithm::Auto => phalanx_node::AllReduceAlgorithm::Auto,
            BenchAlgorithm::Ring => phalanx_node::AllReduceAlgorithm::Ring,
            BenchAlgorithm::RecursiveDoubling => phalanx_node::AllReduceAlgorithm::RecursiveDoubling,
            BenchAlgorithm::HalvingDoubling => phalanx_node::AllReduceAlgorithm::HalvingDoubling,
        }
    }
}

/// Compression of an all-reduce's contributions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchCompression {
    /// As is.
    None,
    /// 8-bit integers, a scale per 256 elements.
    Int8,
    /// 4-bit integers, a scale per 256 elements.
    Int4,
}

impl BenchCompression {
    /// The codec's setting.
    pub fn codec(self) -> phalanx_node::Compression {
        match self {
            BenchCompression::None => phalanx_node::Compression::None,
            BenchCompression::Int8 => phalanx_node::Compression::Int8,
            BenchCompression::Int4 => phalanx_node::Compression::Int4,
        }
    }
}

/// Arguments of `phalanx bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Operation to measure.
    #[arg(value_enum)]
    pub op: BenchOp,
    /// Ranks (p2p: always 2).
    #[arg(long, default_value_t = 2)]
    pub world: u32,
    /// Message size, e.g. 4096, 64KiB, 64MiB.
    #[arg(long, value_parser = parse_size, default_value = "64MiB")]
    pub bytes: u64,
    /// Transport.
    #[arg(long, value_enum, default_value_t = BenchTransport::Tcp)]
    pub transport: BenchTransport,
    /// Timed iterations.
    #[arg(long, default_value_t = 20)]
    pub iters: u32,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 3)]
    pub warmup: u32,
    #[command(flatten)]
    pub tuning: LinkTuning,
    /// Collectives over processes: pin each rank to a CPU of its own (when there are enough;
    /// else consecutive ranks share one). Two ranks left to the OS scheduler share one core in
    /// some runs (it keeps processes that wake each other together), and then a 4 KiB exchange
    /// takes 50-60 µs instead of 15-20; four on two CPUs move between them and take up to twice
    /// as long for 4 KiB to 64 KiB as when bound, a quarter longer at 1 MiB.
    #[arg(long, value_enum, default_value_t = BenchBind::Core)]
    pub bind: BenchBind,
    /// All-reduce only: send contributions compressed (`Compression` with error feedback).
    #[arg(long, value_enum, default_value_t = BenchCompression::None)]
    pub compression: BenchCompression,
    /// Collectives: the largest data message, the unit of pipelining (default: the
    /// executor's, just under 1 MiB).
    #[arg(long, value_parser = parse_size)]
    pub segment: Option<u64>,
    /// All-reduce only: the algorithm (default: chosen by size).
    #[arg(long, value_enum, default_value_t = BenchAlgorithm::Auto)]
    pub algorithm: BenchAlgorithm,
    /// Print one JSON object.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print one CSV row in the baselines' columns (no header).
    #[arg(long)]
    pub csv: bool,
}

/// Arguments of the hidden `bench-worker` (one rank of a benchmark, spawned by `bench`).
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// 0: sender, 1: receiver.
    #[arg(long)]
    pub rank: u32,
    #[arg(long, value_enum)]
    pub transport: BenchTransport,
    /// Receiver: address to listen on.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Sender: receiver's address.
    #[arg(long)]
    pub connect: Option<SocketAddr>,
    #[arg(long, value_parser = parse_size)]
    pub bytes: u64,
    #[arg(long)]
    pub iters: u32,
    #[arg(long)]
    pub warmup: u32,
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    #[command(flatten)]
    pub tuning: LinkTuning,
}

/// How the two benchmark ranks are connected (shared by `bench` and its workers).
#[derive(Args, Clone, Debug)]
pub struct LinkTuning {
    /// Paths (connections) between the two ranks.
    #[arg(long, default_value_t = 1)]
    pub paths: u32,
    /// Transport chunk (frame payload) size.
    #[arg(long, value_parser = parse_size, default_value = "1MiB")]
    pub chunk: u64,
    /// Unacknowledged bytes allowed per path.
    #[arg(long, value_parser = parse_size, default_value = "8MiB")]
    pub window: u64,
    /// QUIC: streams per connection (each a link).
    #[arg(long, default_value_t = 1)]
    pub quic_streams: u32,
    /// Collectives: how long a call polls for its next message before it sleeps, in
    /// microseconds (0: it sleeps at once). Default: the communicator's (`BOUND_SPIN` for a
    /// rank bound to a CPU of its own, else `DEFAULT_SPIN`).
    #[arg(long)]
    pub spin_us: Option<u64>,
}

impl LinkTuning {
    /// The transport configuration a benchmark runs with.
    pub fn transport(&self) -> Result<phalanx_proto::TransportConfig, String> {
        let t = phalanx_proto::TransportConfig {
            chunk_bytes: self.chunk as usize,
            path_window_bytes: self.window,
            ..phalanx_proto::TransportConfig::default()
        };
        t.validate().map_err(|e| format!("invalid --chunk/--window: {e}"))?;
        Ok(t)
    }

    /// The same settings as command-line arguments (for the worker processes).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--paths".into(),
            self.paths.to_string(),
            "--chunk".into(),
            self.chunk.to_string(),
            "--window".into(),
            self.window.to_string(),
            "--quic-streams".into(),
            self.quic_streams.to_string(),
        ];
        if let Some(us) = self.spin_us {
            args.extend(["--spin-us".into(), us.to_string()]);
        }
        args
    }
}

const SECRET: &[u8] = b"phalanx-bench";

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    }
}

/// The op's name in the baselines' CSV.
fn op_column(op: BenchOp) -> &'static str {
    match op {
        BenchOp::P2p => "p2p",
        BenchOp::Allreduce => "allreduce",
        BenchOp::Allgather => "allgather",
        BenchOp::Reducescatter => "reducescatter",
        BenchOp::Alltoall => "alltoall",
        BenchOp::Broadcast => "broadcast",
        BenchOp::Membership => "membership",
    }
}

/// Runs `phalanx bench`.
pub async fn run(args: BenchArgs) -> Result<(), CliError> {
    if args.op == BenchOp::Membership {
        return crate::bench_membership::run(&args).await;
    }
    if args.op == BenchOp::P2p && args.world != 2 {
        return Err(CliError::Usage("p2p runs between exactly 2 ranks (--world 2)".into()));
    }
    if args.world == 0 || args.world > 64 {
        return Err(CliError::Usage("--world must be 1..=64".into()));
    }
    if args.tuning.paths == 0 || args.iters == 0 {
        return Err(CliError::Usage("--paths and --iters must be at least 1".into()));
    }
    args.tuning.transport().map_err(CliError::Usage)?;
    if args.segment.is_some_and(|b| !(64..=64 << 20).contains(&b)) {
        return Err(CliError::Usage("--segment must be 64 bytes..=64 MiB".into()));
    }
    let (med, op_name) = if args.op == BenchOp::P2p {
        let mut samples = match args.transport {
            BenchTransport::Mem => p2p_in_process(&args).await?,
            _ => p2p_processes(&args).await?,
        };
        (median(&mut samples), "p2p")
    } else {
        (crate::bench_collective::run(&args).await?, op_column(args.op))
    };
    let algbw = args.bytes as f64 / med / 1e3;
    let busbw = algbw * crate::bench_collective::bus_factor(args.op, args.world as usize);
    let row = json!({
        "tool": "phalanx", "transport": args.transport.column(), "op": op_name, "world": args.world,
        "bytes": args.bytes, "median_us": (med * 10.0).round() / 10.0,
        "algbw_GBps": algbw, "busbw_GBps": busbw, "paths": args.tuning.paths, "iters": args.iters,
        "chunk": args.tuning.chunk, "window": args.tuning.window,
    });
    if args.json {
        println!("{row}");
    } else if args.csv {
        let (transport, world, bytes) = (args.transport.column(), args.world, args.bytes);
        println!("phalanx,{transport},{op_name},{world},{bytes},{med:.1},{algbw:.4},{busbw:.4}");
    } else {
        println!(
            "{op_name} world {} {} bytes over {} ({} path{}): median {:.1} us, algbw {:.3} GB/s, busbw {busbw:.3} GB/s  ({} iterations after {} warm-up)",
            args.world,
            args.bytes,
            args.transport.column(),
            args.tuning.paths,
            if args.tuning.paths == 1 { "" } else { "s" },
            med,
            algbw,
            args.iters,
            args.warmup
        );
    }
    Ok(())
}

async fn p2p_in_process(args: &BenchArgs) -> Result<Vec<f64>, String> {
    let mut ca = NodeConfig::new(RankId(0), SECRET);
    ca.transport = args.tuning.transport()?;
    let mut cb = NodeConfig::new(RankId(1), SECRET);
    cb.transport = ca.transport.clone();
    let a = Node::start(ca).await.map_err(|e| e.to_string())?;
    let b = Node::start(cb).await.map_err(|e| e.to_string())?;
    for _ in 0..args.tuning.paths {
        phalanx_net::connect_mem(&a.handle(), &b.handle(), PathFaults::new()).await.map_err(|e| e.to_string())?;
    }
    let total = args.warmup + args.iters;
    let receiver = tokio::spawn(receive_loop(b, args.bytes, total));
    let samples = send_loop(a, args.bytes, args.warmup, args.iters).await?;
    receiver.await.map_err(|e| e.to_string())??;
    Ok(samples)
}

async fn p2p_processes(args: &BenchArgs) -> Result<Vec<f64>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let tls_dir = if args.transport == BenchTransport::Quic {
        let dir = std::env::temp_dir().join(format!("phalanx-bench-tls-{}", std::process::id()));
        let ca = phalanx_net::tls::ClusterCa::generate("phalanx bench").map_err(|e| e.to_string())?;
        ca.write_dir(&dir, &["rank-0".into(), "rank-1".into()]).map_err(|e| e.to_string())?;
        Some(dir)
    } else {
        None
    };
    let common = |cmd: &mut tokio::process::Command| {
        cmd.arg("bench-worker")
            .arg("--transport")
            .arg(format!("{:?}", args.transport).to_lowercase())
            .arg("--bytes")
            .arg(args.bytes.to_string())
            .arg("--iters")
            .arg(args.iters.to_string())
            .arg("--warmup")
            .arg(args.warmup.to_string())
            .args(args.tuning.to_args())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(d) = &tls_dir {
            cmd.arg("--tls-dir").arg(d);
        }
    };
    let mut recv_cmd = tokio::process::Command::new(&exe);
    common(&mut recv_cmd);
    recv_cmd.args(["--rank", "1", "--listen", "127.0.0.1:0"]);
    let mut receiver = recv_cmd.spawn().map_err(|e| format!("cannot start receiver: {e}"))?;
    let mut recv_out = BufReader::new(receiver.stdout.take().ok_or("receiver has no stdout")?).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), recv_out.next_line())
        .await
        .map_err(|_| "receiver did not start within 30 s")?
        .map_err(|e| e.to_string())?
        .ok_or("receiver exited before listening")?;
    let v: serde_json::Value = serde_json::from_str(&first).map_err(|e| format!("receiver said {first:?}: {e}"))?;
    let addr = v["listening"].as_str().ok_or_else(|| format!("receiver said {first:?}"))?.to_string();
    let mut send_cmd = tokio::process::Command::new(&exe);
    common(&mut send_cmd);
    send_cmd.args(["--rank", "0", "--connect", &addr]);
    let sender = send_cmd.spawn().map_err(|e| format!("cannot start sender: {e}"))?;
    let out = sender.wait_with_output().await.map_err(|e| e.to_string())?;
    let status = receiver.wait().await.map_err(|e| e.to_string())?;
    if let Some(d) = tls_dir {
        let _ = std::fs::remove_dir_all(d);
    }
    if !out.status.success() || !status.success() {
        return Err(format!("benchmark worker failed (sender {}, receiver {status})", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim()).map_err(|e| format!("sender said {text:?}: {e}"))?;
    v["samples_us"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .ok_or_else(|| format!("sender said {text:?}"))
}

/// Runs one rank of a benchmark as its own process.
pub async fn worker(args: WorkerArgs) -> Result<(), String> {
    let mut cfg = NodeConfig::new(RankId(args.rank), SECRET);
    cfg.transport = args.tuning.transport()?;
    cfg.quic_streams = args.tuning.quic_streams;
    if let Some(dir) = &args.tls_dir {
        cfg.tls = Some(
            phalanx_net::tls::TlsIdentity::load_dir(dir, &format!("rank-{}", args.rank)).map_err(|e| e.to_string())?,
        );
    }
    let kind = match args.transport {
        BenchTransport::Tcp => LinkKind::Tcp,
        BenchTransport::Quic => LinkKind::Quic,
        BenchTransport::Mem => return Err("bench-worker runs tcp or quic".into()),
    };
    let total = args.warmup + args.iters;
    if args.rank == 1 {
        let listen = args.listen.ok_or("receiver needs --listen")?;
        match kind {
            LinkKind::Tcp => cfg.tcp_listen = vec![listen],
            LinkKind::Quic => cfg.quic_listen = Some(listen),
        }
        let node = Node::start(cfg).await.map_err(|e| e.to_string())?;
        let addr = node.tcp_addrs().first().copied().or(node.quic_addr()).ok_or("no listener bound")?;
        println!("{}", json!({ "listening": addr.to_string() }));
        receive_loop(node, args.bytes, total).await
    } else {
        let remote = args.connect.ok_or("sender needs --connect")?;
        for _ in 0..args.tuning.paths {
            cfg.paths.push(PathSpec { peer: RankId(1), kind, remote, bind: None, faults: PathFaults::new() });
        }
        let node = Node::start(cfg).await.map_err(|e| e.to_string())?;
        let samples = send_loop(node, args.bytes, args.warmup, args.iters).await?;
        println!("{}", json!({ "samples_us": samples }));
        Ok(())
    }
}

async fn await_ctrl(node: &mut Node) -> Result<(), String> {
    loop {
        let m = node.next_message(STEP_TIMEOUT, |_| {}).await.ok_or("peer did not answer in time")?;
        if m.channel == CH_CTRL {
            return Ok(());
        }
    }
}

/// Rank 0: barrier, then `warmup + iters` timed sends, each until the receiver acknowledges.
async fn send_loop(mut node: Node, bytes: u64, warmup: u32, iters: u32) -> Result<Vec<f64>, String> {
    let h: NodeHandle = node.handle();
    let peer = RankId(1);
    h.send(peer, CH_CTRL, Bytes::from_static(b"ping")).await.map_err(|e| e.to_string())?;
    await_ctrl(&mut node).await?;
    let payload = pattern(bytes as usize, 7);
    let mut samples = Vec::with_capacity(iters as usize);
    for i in 0..warmup + iters {
        let t0 = Instant::now();
        h.send(peer, CH_DATA, payload.clone()).await.map_err(|e| e.to_string())?;
        await_ctrl(&mut node).await?;
        let us = t0.elapsed().as_secs_f64() * 1e6;
        if i >= warmup {
            samples.push(us);
        }
    }
    Ok(samples)
}

/// Rank 1: answers the barrier, then acknowledges each whole message.
async fn receive_loop(mut node: Node, bytes: u64, total: u32) -> Result<(), String> {
    let h = node.handle();
    let peer = RankId(0);
    let mut got = 0;
    while got < total {
        let m = node.next_message(STEP_TIMEOUT, |_| {}).await.ok_or("sender went silent")?;
        if m.channel == CH_DATA {
            if m.payload.len() as u64 != bytes {
                return Err(format!("received {} bytes, expected {bytes}", m.payload.len()));
            }
            got += 1;
        }
        h.send(peer, CH_CTRL, Bytes::from_static(b"ok")).await.map_err(|e| e.to_string())?;
    }
    // Let the last acknowledgement leave before the process exits.
    h.flush(peer, Duration::from_secs(5)).await;
    Ok(())
}
