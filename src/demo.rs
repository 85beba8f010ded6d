//! `phalanx demo`: three ranks on loopback, rank 0 streaming to rank 1 over two TCP paths while
//! the paths under it fail. Shows what the transport promises: one path cut → failover; both
//! direct paths cut → relay through rank 2; paths restored → back on the direct route; bit
//! flips → detected and repaired. Every message is checked (length and CRC32C) on arrival.
//!
//! Then a second part (`demo_membership`): an embedded coordinator and elastic ranks, with a
//! join, a leave and a crash changing the world size at step boundaries. Then the third
//! (`demo_training`): rank processes in two data centres training a small model with streaming
//! DiLoCo while a rank is killed and restarted, one straggles and the WAN is cut.

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use phalanx_net::{LinkKind, Node, NodeConfig, PathFaults, PathSpec};
use phalanx_proto::{ChannelId, EndpointCounters, RankId, TransportConfig};

use crate::size::parse_size;
use phalanx_proto::harness::pattern;

/// Arguments of `phalanx demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Size of each message.
    #[arg(long, value_parser = parse_size, default_value = "16MiB")]
    pub bytes: u64,
    /// Messages per phase.
    #[arg(long, default_value_t = 8)]
    pub messages: u32,
    /// Run without injecting faults.
    #[arg(long)]
    pub no_faults: bool,
    /// A shorter run (for CI).
    #[arg(long)]
    pub quick: bool,
    /// Training part: rank processes (two data centres).
    #[arg(long, default_value_t = 8)]
    pub ranks: usize,
    /// Training part: inner steps (default 400; quick 150).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Training part: inner steps between syncs of one fragment (H).
    #[arg(long, default_value_t = 20)]
    pub every: u64,
    /// Training part: fragments of streaming DiLoCo (1: plain DiLoCo).
    #[arg(long, default_value_t = 4)]
    pub fragments: usize,
    /// Training part: learning rate of the inner optimizer (SGD).
    #[arg(long, default_value_t = 0.1)]
    pub lr: f32,
    /// Training part: what the data centres run between them (`sync`: no DCs, synchronous
    /// data parallel over all ranks, the baseline).
    #[arg(long, value_enum, default_value_t = crate::train_worker::OuterAlgorithm::StreamingDiloco)]
    pub algorithm: crate::train_worker::OuterAlgorithm,
    /// Training part: where to write the SVG plot of loss and events.
    #[arg(long, default_value = "phalanx-demo.svg")]
    pub plot: std::path::PathBuf,
    /// Run only the training part.
    #[arg(long)]
    pub training_only: bool,
}

struct Phase {
    name: &'static str,
    seconds: f64,
    bytes: u64,
    relayed: u64,
    retransmits: u64,
    failovers: u64,
    checksum_failures: u64,
}

/// Runs the demo; returns an error if any message arrived wrong or not at all, or a training
/// fault was not survived (`main` has checked the arguments: at least 4 ranks, `every` and
/// `fragments` at least 1, a positive learning rate).
pub async fn run(args: DemoArgs) -> Result<(), String> {
    let training = crate::demo_training::TrainingDemo {
        ranks: args.ranks,
        steps: args.steps.unwrap_or(if args.quick { 150 } else { 400 }),
        every: args.every,
        fragments: args.fragments,
        algorithm: args.algorithm,
        lr: args.lr,
        faults: !args.no_faults,
        plot: args.plot.clone(),
        learning: crate::demo_training::Learning::default(),
        quiet: false,
    };
    if args.training_only {
        return crate::demo_training::run(training).await.map(|_| ());
    }
    let (bytes, messages) =
        if args.quick { (args.bytes.min(4 << 20), args.messages.min(4)) } else { (args.bytes, args.messages) };
    let transport = TransportConfig {
        heartbeat_interval: Duration::from_millis(20),
        link_timeout: Duration::from_millis(200),
        unreachable_after: Duration::from_secs(5),
        ..TransportConfig::default()
    };
    let secret = b"phalanx-demo".to_vec();
    let listen = |rank| {
        let mut c = NodeConfig::new(RankId(rank), secret.clone());
        c.transport = transport.clone();
        c.tcp_listen = vec!["127.0.0.1:0".parse().expect("literal address")];
        c.redial_max = Duration::from_millis(100);
        c
    };
    let c = Node::start(listen(2)).await.map_err(|e| e.to_string())?;
    let mut b_cfg = listen(1);
    b_cfg.paths.push(path(RankId(2), c.tcp_addrs()[0], PathFaults::new()));
    let mut b = Node::start(b_cfg).await.map_err(|e| e.to_string())?;
    let direct = [PathFaults::new(), PathFaults::new()];
    let mut a_cfg = listen(0);
    for f in &direct {
        a_cfg.paths.push(path(RankId(1), b.tcp_addrs()[0], f.clone()));
    }
    a_cfg.paths.push(path(RankId(2), c.tcp_addrs()[0], PathFaults::new()));
    let a = Node::start(a_cfg).await.map_err(|e| e.to_string())?;
    let (ah, ch) = (a.handle(), c.handle());

    println!(
        "phalanx demo: rank 0 -> rank 1, {messages} x {} MiB per phase; two TCP paths 0-1, one each via rank 2",
        bytes >> 20
    );
    println!(
        "{:<34} {:>8} {:>10} {:>12} {:>8} {:>9} {:>9}",
        "phase", "seconds", "GB/s", "relayed MiB", "retrans", "failovers", "bad crc"
    );
    let phases: &[(&str, Injection)] = if args.no_faults {
        &[("healthy", Injection::Nothing)]
    } else {
        &[
            ("healthy: striped over 2 paths", Injection::Nothing),
            ("path 0 cut mid-phase: failover", Injection::CutOneMidPhase),
            ("both direct paths cut: relay", Injection::CutBoth),
            ("paths restored: direct again", Injection::Restore),
            ("bit flips on path 0: repaired", Injection::Corrupt),
        ]
    };
    let mut seed = 0u64;
    let mut summary = Vec::new();
    for &(name, injection) in phases {
        injection.apply(&direct, bytes);
        let before = counters(&ah, &ch).await?;
        let bad_before = counters_of(&b).await?.checksum_failures;
        let t0 = Instant::now();
        for _ in 0..messages {
            seed += 1;
            let payload: Bytes = pattern(bytes as usize, seed);
            let want = phalanx_proto::checksum::crc32c(&payload);
            ah.send(RankId(1), ChannelId(0), payload).await.map_err(|e| e.to_string())?;
            let m = b
                .next_message(Duration::from_secs(30), |_| {})
                .await
                .ok_or_else(|| format!("phase '{name}': message {seed} did not arrive within 30 s"))?;
            if m.payload.len() as u64 != bytes || m.payload.crc32c() != want {
                return Err(format!("phase '{name}': message {seed} arrived damaged"));
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let after = counters(&ah, &ch).await?;
        let p = Phase {
            name,
            seconds: secs,
            bytes: bytes * messages as u64,
            relayed: after.1.relayed_bytes - before.1.relayed_bytes,
            retransmits: after.0.retransmits - before.0.retransmits,
            failovers: after.0.failovers - before.0.failovers,
            checksum_failures: 0,
        };
        let bad = counters_of(&b).await?.checksum_failures - bad_before;
        let p = Phase { checksum_failures: bad, ..p };
        println!(
            "{:<34} {:>8.2} {:>10.3} {:>12.1} {:>8} {:>9} {:>9}",
            p.name,
            p.seconds,
            p.bytes as f64 / p.seconds / 1e9,
            p.relayed as f64 / (1 << 20) as f64,
            p.retransmits,
            p.failovers,
            p.checksum_failures
        );
        summary.push(p);
    }
    drop(a);
    let total: u64 = summary.iter().map(|p| p.bytes).sum();
    println!(
        "summary: {} messages, {:.0} MiB delivered once, intact and in order through {} fault phase(s); 0 lost",
        messages as usize * summary.len(),
        total as f64 / (1 << 20) as f64,
        summary.len().saturating_sub(1)
    );
    crate::demo_membership::run(args.quick, !args.no_faults).await?;
    crate::demo_training::run(training).await.map(|_| ())
}

/// The fault a demo phase starts with.
#[derive(Clone, Copy, Debug)]
enum Injection {
    Nothing,
    CutOneMidPhase,
    CutBoth,
    Restore,
    Corrupt,
}

impl Injection {
    fn apply(self, direct: &[PathFaults; 2], bytes: u64) {
        match self {
            Injection::Nothing => {}
            Injection::CutOneMidPhase => direct[0].cut_after_bytes(bytes),
            Injection::CutBoth => direct.iter().for_each(PathFaults::cut),
            Injection::Restore => direct.iter().for_each(PathFaults::restore),
            Injection::Corrupt => direct[0].corrupt_every(3),
        }
    }
}

fn path(peer: RankId, remote: std::net::SocketAddr, faults: PathFaults) -> PathSpec {
    PathSpec { peer, kind: LinkKind::Tcp, remote, bind: None, faults }
}

async fn counters(
    a: &phalanx_net::NodeHandle,
    c: &phalanx_net::NodeHandle,
) -> Result<(EndpointCounters, EndpointCounters), String> {
    let (ca, _) = a.counters().await.map_err(|e| e.to_string())?;
    let (cc, _) = c.counters().await.map_err(|e| e.to_string())?;
    Ok((ca, cc))
}

async fn counters_of(n: &Node) -> Result<EndpointCounters, String> {
    n.handle().counters().await.map(|(c, _)| c).map_err(|e| e.to_string())
}
